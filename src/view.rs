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

impl View {
    /// A view of members `ids` with placeholder addresses (`ws://<id>/ws`, port 0), on a ring
    /// of 64 points each: for tests and simulations of the cluster core, which never dial.
    pub fn for_test(ids: &[&str]) -> View {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let members: BTreeMap<NodeId, Member> = ids
            .iter()
            .map(|id| {
                let id: NodeId = Arc::from(*id);
                let member = Member {
                    id: id.clone(),
                    url: Arc::from(format!("ws://{id}/ws")),
                    http: format!("{id}:80"),
                    quic: any,
                    gossip: any,
                    generation: 1,
                };
                (id, member)
            })
            .collect();
        let ring = Ring::new(members.keys().cloned(), 64, 1);
        View { members, ring }
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

/// Checks what a member gossips before it enters a view: the node id follows the uid rule and
/// is at most 64 bytes, `url` is `ws://` or `wss://`, a host and port, and the path `/ws`, and
/// `http` is a `host:port`. Gossip is authenticated, so only a holder of the secret (or a bug)
/// could send anything else; it is still never handed to clients.
///
/// # Errors
/// Which key is not acceptable.
pub fn check_member(id: &str, url: &str, http: &str) -> Result<(), &'static str> {
    if id.len() > 64 || crate::uid::validate_uid(id).is_err() {
        return Err("node id");
    }
    if !valid_ws_url(url) {
        return Err("url");
    }
    if !valid_host_port(http) {
        return Err("http");
    }
    Ok(())
}

/// Whether `url` is a WebSocket URL a node may hand to clients: `ws://` or `wss://`, a host
/// with an optional port, and a path (`/ws`, or a proxy's own path such as `/n1/ws`); no user
/// info, query or fragment, nothing but visible ASCII, at most 512 bytes.
pub fn valid_ws_url(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
    else {
        return false;
    };
    let Some((authority, path)) = rest.split_once('/') else {
        return false;
    };
    let clean = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '?' | '#' | '@' | '\\'))
    };
    let host_ok = if authority.contains(':') && !authority.ends_with(']') {
        valid_host_port(authority)
    } else {
        !authority.is_empty() && !authority.contains('/') && clean(authority)
    };
    url.len() <= 512 && host_ok && clean(path)
}

/// Whether `s` is `host:port`: a non-empty host of printable characters that cannot change
/// the meaning of a URL, and a port number.
pub fn valid_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && host.len() <= 255
        && port.parse::<u16>().is_ok()
        && host
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '/' | '?' | '#' | '@' | '\\'))
}
