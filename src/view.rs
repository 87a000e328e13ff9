//! A node's view of the cluster: the live members and the ring over them.
//!
//! Plain data, produced by [`crate::membership`] from gossip and read by the relay, the links
//! and the HTTP routes; it sits below all of them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::engine::NodeId;
use crate::ring::Ring;

/// A live member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Node id.
    pub id: NodeId,
    /// WebSocket URL for clients.
    pub url: Arc<str>,
    /// Advertised HTTP `host:port`.
    pub http: String,
    /// QUIC address.
    pub quic: SocketAddr,
    /// Gossip address.
    pub gossip: SocketAddr,
    /// Start time of that process (ms), chitchat's generation.
    pub generation: u64,
}

/// One node's view of the cluster.
#[derive(Debug, Clone)]
pub struct View {
    /// Live members by id, this node included.
    pub members: BTreeMap<NodeId, Member>,
    /// The ring over them.
    pub ring: Ring,
}

impl View {
    /// The ring version.
    pub fn version(&self) -> u64 {
        self.ring.version()
    }
}


impl Default for View {
    /// No member and an empty ring: nobody owns anyone.
    fn default() -> Self {
        View {
            members: BTreeMap::new(),
            ring: Ring::new(Vec::new(), 1, 0),
        }
    }
}
