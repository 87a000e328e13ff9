//! How the driver reaches other nodes: a small trait with two implementations.
//!
//! - [`crate::peer::Links`]: QUIC, one long-lived connection per pair of nodes (production);
//! - [`MemNet`]: channels in one process, with links that tests cut and heal.
//!
//! A transport takes frames with [`Transport::send`] and follows the membership view with
//! [`Transport::update`]; what happens on the links (up, down, a frame arrived) it reports as
//! [`LinkEvent`]s on the channel it was built with, which the driver feeds to the relay.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::engine::NodeId;
use crate::relay::LinkEvent;
use crate::view::View;
use crate::wire::PeerFrame;

/// Links from one node to the others.
pub trait Transport: Send + Sync + 'static {
    /// Queues `frame` for `node` without waiting.
    ///
    /// # Errors
    /// The frame back when it cannot be sent: no link is up, or the queue towards the peer is
    /// full.
    fn send(&self, node: &str, frame: PeerFrame) -> Result<(), PeerFrame>;

    /// Follows a membership view: links to new members, lets links to departed ones go.
    fn update(&self, view: &View);
}

impl Transport for Arc<crate::peer::Links> {
    fn send(&self, node: &str, frame: PeerFrame) -> Result<(), PeerFrame> {
        crate::peer::Links::send(self, node, frame)
    }

    fn update(&self, view: &View) {
        crate::peer::Links::update(self, view);
    }
}

/// An in-memory network of nodes: every pair of joined nodes that both list each other in
/// their views is linked, unless a test cut the link. Frames are delivered in order through
/// bounded channels (a full channel refuses the frame, as a full QUIC queue does).
#[derive(Debug, Clone, Default)]
pub struct MemNet {
    inner: Arc<Mutex<Net>>,
}

#[derive(Debug, Default)]
struct Net {
    /// Each joined node's event channel.
    nodes: HashMap<NodeId, mpsc::Sender<LinkEvent>>,
    /// The members each node's view lists.
    wants: HashMap<NodeId, HashSet<NodeId>>,
    /// Links up, as ordered pairs `(a, b)` with `a < b`.
    up: HashSet<(NodeId, NodeId)>,
    /// Links a test cut.
    cut: HashSet<(NodeId, NodeId)>,
}

fn pair(a: &NodeId, b: &NodeId) -> (NodeId, NodeId) {
    if a < b {
        (a.clone(), b.clone())
    } else {
        (b.clone(), a.clone())
    }
}

impl Net {
    /// Brings links up or down to match the views and the cuts, telling both ends.
    fn settle(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().cloned().collect();
        for a in &ids {
            for b in &ids {
                if a >= b {
                    continue;
                }
                let key = pair(a, b);
                let wanted = self.wants.get(a).is_some_and(|w| w.contains(b))
                    && self.wants.get(b).is_some_and(|w| w.contains(a))
                    && !self.cut.contains(&key);
                let is_up = self.up.contains(&key);
                if wanted == is_up {
                    continue;
                }
                let event = |n: &NodeId| {
                    if wanted {
                        LinkEvent::Up(n.clone())
                    } else {
                        LinkEvent::Down(n.clone())
                    }
                };
                // Link events are few; a full channel loses one only if the node is stuck.
                let _ = self.nodes[a].try_send(event(b));
                let _ = self.nodes[b].try_send(event(a));
                if wanted {
                    self.up.insert(key);
                } else {
                    self.up.remove(&key);
                }
            }
        }
    }
}

impl MemNet {
    /// An empty network.
    pub fn new() -> MemNet {
        MemNet::default()
    }

    /// Joins node `id`: its link events arrive on `events`.
    pub fn join(&self, id: NodeId, events: mpsc::Sender<LinkEvent>) -> MemLink {
        self.inner
            .lock()
            .expect("net lock")
            .nodes
            .insert(id.clone(), events);
        MemLink {
            me: id,
            net: self.clone(),
        }
    }

    /// Removes node `id` (a crash): its links go down at the other ends.
    pub fn leave(&self, id: &str) {
        let mut net = self.inner.lock().expect("net lock");
        net.nodes.remove(id);
        net.wants.remove(id);
        let gone: Vec<(NodeId, NodeId)> = net
            .up
            .iter()
            .filter(|(a, b)| &**a == id || &**b == id)
            .cloned()
            .collect();
        for key in gone {
            net.up.remove(&key);
            let other = if &*key.0 == id { &key.1 } else { &key.0 };
            if let Some(tx) = net.nodes.get(other) {
                let _ = tx.try_send(LinkEvent::Down(Arc::from(id)));
            }
        }
    }

    /// Cuts the link between `a` and `b` (both ends see it go down).
    pub fn cut(&self, a: &str, b: &str) {
        let mut net = self.inner.lock().expect("net lock");
        net.cut.insert(pair(&Arc::from(a), &Arc::from(b)));
        net.settle();
    }

    /// Heals a cut link.
    pub fn heal(&self, a: &str, b: &str) {
        let mut net = self.inner.lock().expect("net lock");
        net.cut.remove(&pair(&Arc::from(a), &Arc::from(b)));
        net.settle();
    }
}

/// One node's end of a [`MemNet`].
#[derive(Debug, Clone)]
pub struct MemLink {
    me: NodeId,
    net: MemNet,
}

impl Transport for MemLink {
    fn send(&self, node: &str, frame: PeerFrame) -> Result<(), PeerFrame> {
        let net = self.net.inner.lock().expect("net lock");
        let key = pair(&self.me, &Arc::from(node));
        let Some(tx) = net.nodes.get(node).filter(|_| net.up.contains(&key)) else {
            return Err(frame);
        };
        let event = LinkEvent::Frame {
            from: self.me.clone(),
            frame,
        };
        tx.try_send(event).map_err(|e| match e.into_inner() {
            LinkEvent::Frame { frame, .. } => frame,
            _ => unreachable!("a frame event was sent"),
        })
    }

    fn update(&self, view: &View) {
        let mut net = self.net.inner.lock().expect("net lock");
        let members = view
            .members
            .keys()
            .filter(|m| **m != self.me)
            .cloned()
            .collect();
        net.wants.insert(self.me.clone(), members);
        net.settle();
    }
}
