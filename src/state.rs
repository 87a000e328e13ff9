//! What the tasks of a node share: the configuration, keys, metrics, the view, the links, and
//! the inbox of the driver ([`Command`]). Sessions and HTTP handlers read it; only the driver
//! ([`crate::driver`]) decides anything about sessions and messages, through its relay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::auth::TokenKeys;
use crate::config::Config;
use crate::engine::{Message, NodeId, SessionId};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::peer::Links;
use crate::relay::{Answer, ClientEvent, Owner, Status, owner_in};
use crate::view::View;

/// Requests to the driver.
#[derive(Debug)]
pub enum Command {
    /// A session is live; its frames go to `outbox`.
    Open {
        /// Session id.
        session: SessionId,
        /// Its uid.
        uid: Arc<str>,
        /// `iat` of its token, for kicks.
        iat: u64,
        /// Its outbound queue and end signal.
        outbox: Outbox,
    },
    /// What a session says after `Open`: a `send`, an `ack`, a refresh, its end.
    Client(ClientEvent),
    /// A message from the HTTP API; `reply` gets [`Answer::Outcome`] (or [`Answer::Busy`]).
    Push {
        /// The message (`from` is `$system`).
        msg: Message,
        /// Where the answer goes.
        reply: oneshot::Sender<Answer>,
    },
    /// `uid` was kicked at `at`: close its sessions whose token is revoked. With `reply`
    /// (from the API), the owner is asked and answers how many it closed; without (a kick
    /// learnt from gossip), only this node's sessions are closed.
    Kick {
        /// The uid.
        uid: Arc<str>,
        /// Kick time, unix seconds.
        at: u64,
        /// The answer.
        reply: Option<oneshot::Sender<Answer>>,
    },
    /// How many sessions `uid` has at its owner.
    Presence {
        /// The uid.
        uid: String,
        /// The answer.
        reply: oneshot::Sender<Answer>,
    },
    /// Add (`join`) or remove a room membership; `reply` gets [`Answer::Room`].
    RoomMember {
        /// The room.
        room: Arc<str>,
        /// The user.
        uid: Arc<str>,
        /// Add or remove.
        join: bool,
        /// Where the answer goes.
        reply: oneshot::Sender<Answer>,
    },
    /// A room message from the HTTP API (`from` is `$system`, `room` set); `reply` gets
    /// [`Answer::Room`] with the result.
    RoomPush {
        /// The message.
        msg: Message,
        /// Where the answer goes.
        reply: oneshot::Sender<Answer>,
    },
    /// The room as its owner sees it; `reply` gets [`Answer::Room`] with `Info`.
    RoomInfo {
        /// The room.
        room: Arc<str>,
        /// Where the answer goes.
        reply: oneshot::Sender<Answer>,
    },
    /// What is still in flight here (for draining).
    Status {
        /// The answer.
        reply: oneshot::Sender<Status>,
    },
}

/// State shared by the HTTP handlers, sessions and the driver of a node.
#[derive(Debug)]
pub struct Shared {
    /// The configuration.
    pub cfg: Config,
    /// This node's id.
    pub node_id: NodeId,
    /// This node's WebSocket URL as clients reach it.
    pub ws_url: Arc<str>,
    /// The bound HTTP address.
    pub http_addr: SocketAddr,
    /// The bound gossip address.
    pub gossip_addr: SocketAddr,
    /// TLS for clients, if this node serves HTTPS and WSS.
    pub tls: Option<crate::client_tls::ClientTls>,
    /// When the node started.
    pub started: std::time::Instant,
    /// When the membership view last changed, in ms after `started`.
    pub view_changed_ms: AtomicU64,
    /// Token keys.
    pub tokens: TokenKeys,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The driver's inbox.
    pub engine: mpsc::Sender<Command>,
    /// The driver's inbox of link events: the QUIC links send through a clone; tests inject
    /// peer frames through it.
    pub link_events: mpsc::Sender<crate::relay::LinkEvent>,
    /// Cancelled when the node shuts down.
    pub shutdown: CancellationToken,
    /// Bounds concurrent argon2 verifications (each takes ~19 MiB).
    pub password_checks: Semaphore,
    /// `users`-mode logins waiting for or running a password check, for `auth.login_queue`.
    pub login_waiters: AtomicUsize,
    /// The webhook sender, when `[webhooks]` names a URL.
    pub webhooks: Option<Arc<crate::webhooks::Webhooks>>,
    /// Kicks: tokens revoked cluster-wide.
    pub kicks: Arc<crate::kicks::Kicks>,
    /// In `users` mode, the hash checked for unknown uids (built at start, with the
    /// parameters of the configured hashes); empty otherwise.
    pub decoy_hash: String,
    /// Live WebSocket sessions, for `limits.max_sessions`.
    pub live_sessions: AtomicUsize,
    /// The membership view.
    pub view: watch::Receiver<Arc<View>>,
    /// Links to the other nodes.
    pub links: Arc<Links>,
    /// Set (once, with the reason) when gossip or the QUIC endpoint stopped while the node was
    /// not shutting down: `/health` answers 503 `degraded` and the process exits.
    pub degraded: std::sync::OnceLock<String>,
    /// The next session id.
    pub next_session: AtomicU64,
}

/// Why a node is not ready (`GET /ready`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// Shutting down.
    Stopping,
    /// Gossip or QUIC died.
    Degraded(String),
    /// Some live members cannot be reached over a link yet.
    Links {
        /// Members in the view.
        members: usize,
        /// Of them, reachable from here.
        reachable: usize,
    },
    /// The view changed less than the settling time ago.
    Settling,
    /// Seeds are configured but no other member has been seen yet (within the join grace).
    Joining,
}

/// How long a view must stay the same before a node is ready, in gossip rounds.
const SETTLE_ROUNDS: u64 = 3;
/// How long a node with seeds waits to meet another member before it is ready alone.
const JOIN_GRACE: Duration = Duration::from_secs(5);

impl Shared {
    /// Records that the membership view changed now.
    pub fn view_changed(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.view_changed_ms.store(ms, Ordering::Relaxed);
    }

    /// Whether this node is ready for a rolling deploy to move on: not stopping or degraded;
    /// it has met another member (or, with no other seed, or after a grace of 5 s, it is
    /// alone); its view has not changed for 3 gossip rounds; and every live member is
    /// reachable over its link, so that it names the same owners as every other node.
    ///
    /// # Errors
    /// [`NotReady`] with the first reason.
    pub fn readiness(&self) -> Result<(), NotReady> {
        if let Some(why) = self.degraded.get() {
            return Err(NotReady::Degraded(why.clone()));
        }
        if self.shutdown.is_cancelled() {
            return Err(NotReady::Stopping);
        }
        let view = self.current_view();
        let members = view.members.len();
        let has_seeds = self
            .cfg
            .cluster
            .seeds
            .iter()
            .any(|s| s.parse::<SocketAddr>().ok() != Some(self.gossip_addr));
        if has_seeds && members < 2 && self.started.elapsed() < JOIN_GRACE {
            return Err(NotReady::Joining);
        }
        let reachable = self.reachable_members(&view);
        if reachable != members {
            return Err(NotReady::Links { members, reachable });
        }
        let settle = Duration::from_millis(self.cfg.gossip.interval_ms * SETTLE_ROUNDS);
        let changed = Duration::from_millis(self.view_changed_ms.load(Ordering::Relaxed));
        if self.started.elapsed().saturating_sub(changed) < settle {
            return Err(NotReady::Settling);
        }
        Ok(())
    }

    /// A fresh session id.
    pub fn next_session_id(&self) -> SessionId {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// The current membership view.
    pub fn current_view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// The owner of `uid`: the first node of its preference list that is live (in the view)
    /// and reachable from here (this node, or a peer whose link is not down).
    pub fn owner_of(&self, uid: &str) -> Option<Owner> {
        owner_in(&self.current_view(), uid, &self.node_id, |n| {
            self.links.reachable(n)
        })
    }

    /// How many members of `view` can own users from here: this node and every peer whose
    /// link is up. The node is *ready* when this equals the member count: then every node of
    /// the view answers logins with the same owners this one does.
    pub fn reachable_members(&self, view: &View) -> usize {
        view.members.keys().filter(|m| self.can_own(m)).count()
    }

    /// Whether `node` can own users from here: this node, or a peer whose link is up.
    pub fn can_own(&self, node: &str) -> bool {
        node == &*self.node_id || self.links.reachable(node)
    }
}
