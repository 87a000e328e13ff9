//! The cluster core of a node: every routing, forwarding and ownership decision, with no IO.
//!
//! [`Relay`] owns the delivery [`Engine`] and everything around it that makes a cluster:
//! - the **view** (members and ring) and the set of peers whose link is up, kept as plain state,
//!   so that routing a send takes no lock and clones no ring. A uid's owner is the first node of
//!   its preference list that is this node or a reachable member ([`owner_in`]);
//! - the **forward table**: a message for a user owned elsewhere leaves with a tag and waits in
//!   a [`Forward`] for `Outcome { tag }`; a link that goes down, an owner that leaves, or a
//!   sweep past the longest a delivery can take, fails it `unreachable`, so every send ends;
//! - the **hops rule**: a peer's message for a user this node does not own is passed on at most
//!   twice, then delivered here (held for the user) rather than bounced around a changing ring;
//! - **hand-over**: when the view or a link changes, the sessions of users owned elsewhere now
//!   get `moved` and their held messages go to the new owner. A link that comes up only
//!   re-checks the users it can take (those whose preference list puts that peer ahead of this
//!   node); a link that goes down cannot move a user away from this node and checks nobody;
//! - **requests** from the HTTP API (push, presence, kick) by request id, each answered exactly
//!   once, and bounded in number.
//!
//! Inputs are `handle_*` calls that take `now`; outputs are drained with [`Relay::poll_output`];
//! [`Relay::next_deadline`] says when to call [`Relay::handle_timeout`]. Nothing here touches
//! tokio, a socket or the clock, so a whole cluster of relays can be run by a seeded simulation
//! (`tests/simulation.rs`). The async driver ([`crate::driver`]) only pumps.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{
    Action, CloseReason, Engine, EngineConfig, MAX_PLACEMENTS, Message, NodeId, Outcome, Route,
    SessionId, Waiter,
};
use crate::metrics::Metrics;
use crate::protocol::{Body, FailReason, ServerFrame};
use crate::view::View;
use crate::wire::{PeerFrame, RoomAnswer, WireMessage};

#[path = "relay_rooms.rs"]
mod room_core;
pub use room_core::INFO_UIDS;

/// A request from the HTTP API, answered once with an [`Answer`].
pub type RequestId = u64;

/// Where a uid lives, as a node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Owner node id.
    pub node: NodeId,
    /// Its WebSocket URL.
    pub url: Arc<str>,
}

/// How a session must end.
#[derive(Debug, Clone)]
pub enum SessionEnd {
    /// Close for this reason.
    Closed(CloseReason),
    /// The user's owner is now another node: send `moved`, close with 4001.
    Moved(Owner),
}

/// What a session tells the relay.
#[derive(Debug)]
pub enum ClientEvent {
    /// A session of `uid` is live, on a token issued at `iat` (unix seconds).
    Open {
        /// Session id.
        session: SessionId,
        /// Its uid.
        uid: Arc<str>,
        /// `iat` of its token.
        iat: u64,
        /// A kick recorded after the upgrade checked the token revokes it.
        revoked: bool,
    },
    /// A session is gone.
    Close {
        /// Session id.
        session: SessionId,
    },
    /// A `send`.
    Send {
        /// Sending session.
        session: SessionId,
        /// Message id.
        id: String,
        /// Recipient.
        to: String,
        /// Body.
        body: Body,
        /// Taken at, ms since the epoch.
        ts: u64,
        /// No hold, no retry, no dedup memory.
        transient: bool,
    },
    /// A `send` to a room.
    RoomSend {
        /// Sending session.
        session: SessionId,
        /// Message id.
        id: String,
        /// The room.
        room: String,
        /// Body.
        body: Body,
        /// Taken at, ms since the epoch.
        ts: u64,
        /// No hold, no retry, no dedup memory.
        transient: bool,
    },
    /// A `join` (or, with `join: false`, a `leave`).
    Join {
        /// The session.
        session: SessionId,
        /// The room.
        room: String,
        /// The frame's id, echoed.
        id: Option<String>,
        /// Join or leave.
        join: bool,
    },
    /// An `ack`.
    Ack {
        /// Acking session.
        session: SessionId,
        /// The seq.
        seq: u64,
    },
    /// The session accepted a `refresh`: it lives on a token issued at `iat` now.
    Refreshed {
        /// Session id.
        session: SessionId,
        /// The new token's `iat`.
        iat: u64,
    },
    /// The session's outbound queue is full: it does not keep up.
    Stalled {
        /// Session id.
        session: SessionId,
    },
}

/// What a link to a peer reports. Transports emit these ([`crate::transport`]).
#[derive(Debug)]
pub enum LinkEvent {
    /// A mutually authenticated link to the peer is up.
    Up(NodeId),
    /// The link to the peer is down (its queued frames are lost).
    Down(NodeId),
    /// A frame arrived from the peer.
    Frame {
        /// The peer.
        from: NodeId,
        /// The frame.
        frame: PeerFrame,
    },
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// How a push ended.
    Outcome(Outcome),
    /// Sessions of the uid at its owner (presence), or sessions closed there (kick).
    Sessions(usize),
    /// The owner could not be asked, or did not answer in time.
    Unanswered,
    /// Too many requests wait for answers already (`limits.max_pending_requests`).
    Busy,
    /// The answer of a room request (membership, room push, room query).
    Room(RoomAnswer),
}

/// What the driver must carry out.
#[derive(Debug)]
pub enum Output {
    /// Queue `frame` for `session`.
    Session {
        /// Target session.
        session: SessionId,
        /// The frame.
        frame: ServerFrame,
    },
    /// End `session`; the relay already forgot it.
    End {
        /// Target session.
        session: SessionId,
        /// How.
        end: SessionEnd,
    },
    /// Send `frame` to `node`; if the transport refuses it, call [`Relay::handle_refused`].
    Peer {
        /// The peer.
        node: NodeId,
        /// The frame.
        frame: PeerFrame,
    },
    /// The answer to request `req`.
    Answer {
        /// The request.
        req: RequestId,
        /// Its answer.
        answer: Answer,
    },
    /// A message ended `failed: offline` here, on its recipient's owner: the `offline`
    /// webhook (only with `EngineConfig::report_offline`).
    Offline(Message),
    /// A peer reported a kick: record it in the node's kick table (it also refuses the
    /// revoked tokens at login and refresh).
    Kicked {
        /// The uid.
        uid: Arc<str>,
        /// Kick time, unix seconds.
        at: u64,
    },
}

/// What a node still has in flight (for draining).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Status {
    /// Live sessions.
    pub sessions: usize,
    /// Messages in delivery (pushed or held).
    pub deliveries: usize,
    /// Messages forwarded to other nodes and waiting for their outcome.
    pub forwards: usize,
    /// Room requests, fan-outs and member batches waiting, and memberships not yet handed over
    /// or announced after a ring change.
    pub rooms: usize,
}

/// The relay's limits and timeouts.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The delivery engine's.
    pub engine: EngineConfig,
    /// Largest body accepted from a peer, in bytes (`limits.max_body_bytes`).
    pub max_body_bytes: usize,
    /// Most messages forwarded and waiting for their outcome (`limits.max_forwards`).
    pub max_forwards: usize,
    /// Most API requests waiting for an answer (`limits.max_pending_requests`).
    pub max_requests: usize,
    /// A presence or kick question to a peer unanswered this long is given up.
    pub ask_timeout: Duration,
    /// Rooms one user may be a member of (`limits.max_rooms_per_user`).
    pub max_rooms_per_user: usize,
    /// Members of one room (`limits.max_members_per_room`).
    pub max_members_per_room: usize,
    /// Memberships kept on this node, on each side (`limits.max_room_memberships`).
    pub max_room_memberships: usize,
    /// Memberships re-announced per second after a ring change
    /// (`limits.room_sync_per_second`).
    pub room_sync_per_second: u32,
}

impl RelayConfig {
    /// From the configuration.
    pub fn from_config(cfg: &crate::config::Config) -> RelayConfig {
        let mut engine = EngineConfig::from_config(&cfg.delivery, &cfg.limits);
        engine.report_offline = cfg.webhooks.wants("offline");
        RelayConfig {
            engine,
            max_body_bytes: cfg.limits.max_body_bytes,
            max_forwards: cfg.limits.max_forwards,
            max_requests: cfg.limits.max_pending_requests,
            ask_timeout: ASK_TIMEOUT,
            max_rooms_per_user: cfg.limits.max_rooms_per_user,
            max_members_per_room: cfg.limits.max_members_per_room,
            max_room_memberships: cfg.limits.max_room_memberships,
            room_sync_per_second: cfg.limits.room_sync_per_second,
        }
    }

    /// How long a forward may wait for its outcome: the longest the owner can take to end a
    /// delivery (every placement held and retried), plus a margin.
    fn forward_max_age(&self) -> Duration {
        let e = &self.engine;
        let one_placement = e.hold + e.ack_timeout * (e.max_retries + 1);
        one_placement * (MAX_PLACEMENTS + 1) + Duration::from_secs(5)
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig::from_config(&crate::config::Config::default())
    }
}

/// A presence or kick question to a peer gets 5 s (the API waits 3 s for it).
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often forwards and questions are checked for age.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Forwards of a message among owners, after the sender's, before the hops rule delivers
/// it where it is.
const MAX_HOPS: u8 = 2;

/// A message forwarded to its owner, waiting for `Outcome { tag }`.
#[derive(Debug)]
struct Forward {
    node: NodeId,
    waiters: Vec<Waiter>,
    id: Arc<str>,
    to: Arc<str>,
    at: Instant,
}

/// An API request waiting for its answer.
#[derive(Debug)]
struct Request {
    /// The peer asked (presence, kick); `None` for a push, which the engine or a forward
    /// answers.
    asked: Option<NodeId>,
    at: Instant,
}

/// The cluster core of one node.
#[derive(Debug)]
pub struct Relay {
    cfg: RelayConfig,
    me: NodeId,
    engine: Engine,
    metrics: Arc<Metrics>,
    view: Arc<View>,
    /// Peers whose link is up.
    reachable: HashSet<NodeId>,
    /// `iat` of each session's token, for kicks.
    iats: HashMap<SessionId, u64>,
    forwards: HashMap<u64, Forward>,
    requests: HashMap<RequestId, Request>,
    next_tag: u64,
    /// Local users whose preference list puts an unreachable peer ahead of this node, by that
    /// peer: when its link comes up they are the only users that can move.
    behind: HashMap<NodeId, HashSet<Arc<str>>>,
    /// Entries in `behind`, summed.
    behind_len: usize,
    actions: Vec<Action>,
    out: VecDeque<Output>,
    next_sweep: Option<Instant>,
    forward_max_age: Duration,
    /// Room memberships and room requests in flight.
    rooms: room_core::RoomState,
}

/// The ownership rule over a view: the first node of `uid`'s preference list that is `me` or
/// passes `reachable`.
pub fn owner_in(
    view: &View,
    uid: &str,
    me: &str,
    reachable: impl Fn(&str) -> bool,
) -> Option<Owner> {
    let usable = |n: &NodeId| &**n == me || reachable(n);
    let owner = match view.ring.primary(uid) {
        Some(p) if usable(p) => p.clone(),
        Some(_) => view.ring.preference(uid).into_iter().find(|n| usable(n))?,
        None => return None,
    };
    let member = view.members.get(&owner)?;
    Some(Owner {
        node: owner,
        url: member.url.clone(),
    })
}

impl Relay {
    /// The relay of node `me`, with an empty view (no owner for anyone until the first
    /// [`Relay::handle_view`]).
    pub fn new(cfg: RelayConfig, me: NodeId, metrics: Arc<Metrics>) -> Relay {
        let forward_max_age = cfg.forward_max_age();
        Relay {
            engine: Engine::new(cfg.engine.clone(), metrics.clone()),
            cfg,
            me,
            metrics,
            view: Arc::new(View::default()),
            reachable: HashSet::new(),
            iats: HashMap::new(),
            forwards: HashMap::new(),
            requests: HashMap::new(),
            next_tag: 1,
            behind: HashMap::new(),
            behind_len: 0,
            actions: Vec::new(),
            out: VecDeque::new(),
            next_sweep: None,
            forward_max_age,
            rooms: room_core::RoomState::default(),
        }
    }

    // ----- reading ------------------------------------------------------------------------

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.me
    }

    /// The owner of `uid` as this node sees it now.
    pub fn owner(&self, uid: &str) -> Option<Owner> {
        owner_in(&self.view, uid, &self.me, |n| self.reachable.contains(n))
    }

    /// Where a message to `uid` goes.
    pub fn route(&self, uid: &str) -> Route {
        let usable = |n: &NodeId| *n == self.me || self.reachable.contains(n);
        let owner = match self.view.ring.primary(uid) {
            Some(p) if usable(p) => p.clone(),
            Some(_) => match self.view.ring.preference(uid).into_iter().find(usable) {
                Some(n) => n,
                None => return Route::Unreachable,
            },
            None => return Route::Unreachable,
        };
        if owner == self.me {
            Route::Local
        } else {
            Route::Remote(owner)
        }
    }

    /// The current view.
    pub fn view(&self) -> &Arc<View> {
        &self.view
    }

    /// Whether the link to `node` is up.
    pub fn is_reachable(&self, node: &str) -> bool {
        self.reachable.contains(node)
    }

    /// What is still in flight here. Forwards whose only waiters are sessions that are gone
    /// need no waiting.
    pub fn status(&self) -> Status {
        Status {
            sessions: self.engine.session_count(),
            deliveries: self.engine.deliveries_in_flight(),
            forwards: self
                .forwards
                .values()
                .filter(|f| {
                    f.waiters.iter().any(|w| match w {
                        Waiter::Session(s) => self.engine.session_uid(*s).is_some(),
                        _ => true,
                    })
                })
                .count(),
            rooms: self.rooms.in_flight(),
        }
    }

    /// The engine (for checks).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Messages forwarded and waiting for their outcome.
    pub fn forward_count(&self) -> usize {
        self.forwards.len()
    }

    /// API requests waiting for their answer.
    pub fn request_count(&self) -> usize {
        self.requests.len()
    }

    /// Entries of the hand-over index (bounded by the sweep).
    pub fn handover_index_len(&self) -> usize {
        self.behind_len
    }

    /// The relay's configuration.
    pub fn config(&self) -> &RelayConfig {
        &self.cfg
    }

    /// Every live session here and its uid.
    pub fn sessions(&self) -> Vec<(SessionId, Arc<str>)> {
        self.engine.sessions()
    }

    // ----- outputs ------------------------------------------------------------------------

    /// The next thing to carry out, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`Relay::handle_timeout`] must run next.
    pub fn next_deadline(&self) -> Option<Instant> {
        [
            self.engine.next_deadline(),
            self.next_sweep,
            self.rooms.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    // ----- inputs -------------------------------------------------------------------------

    /// A session event.
    pub fn handle_client(&mut self, now: Instant, event: ClientEvent) {
        self.arm_sweep(now);
        match event {
            ClientEvent::Open {
                session,
                uid,
                iat,
                revoked,
            } => {
                // The view may have changed since the upgrade checked the owner: a session
                // of a user owned elsewhere is moved at once.
                if let Some(owner) = self.owner(&uid)
                    && owner.node != self.me
                {
                    self.end(session, SessionEnd::Moved(owner));
                } else if revoked {
                    self.end(session, SessionEnd::Closed(CloseReason::Kicked));
                } else {
                    self.iats.insert(session, iat);
                    let welcome = ServerFrame::Welcome {
                        uid: uid.to_string(),
                        node: self.me.to_string(),
                        session: format!("{}-{session}", self.me),
                        rooms: self.rooms_of(&uid),
                    };
                    self.out.push_back(Output::Session {
                        session,
                        frame: welcome,
                    });
                    self.engine
                        .open_session(now, session, &uid, &mut self.actions);
                    self.note_local(&uid);
                }
            }
            ClientEvent::Close { session } => {
                self.iats.remove(&session);
                self.engine.close_session(now, session, &mut self.actions);
            }
            ClientEvent::Send {
                session,
                id,
                to,
                body,
                ts,
                transient,
            } => {
                let route = self.route(&to);
                let local = route == Route::Local;
                self.engine.send(
                    now,
                    session,
                    &id,
                    &to,
                    body,
                    ts,
                    transient,
                    route,
                    &mut self.actions,
                );
                if local {
                    self.note_local(&to);
                }
            }
            ClientEvent::RoomSend {
                session,
                id,
                room,
                body,
                ts,
                transient,
            } => self.client_room_send(now, session, id, room, body, ts, transient),
            ClientEvent::Join {
                session,
                room,
                id,
                join,
            } => self.client_join(now, session, room, id, join),
            ClientEvent::Ack { session, seq } => {
                self.engine.ack(now, session, seq, &mut self.actions)
            }
            ClientEvent::Refreshed { session, iat } => {
                if let Some(old) = self.iats.get_mut(&session) {
                    *old = iat;
                }
            }
            ClientEvent::Stalled { session } => {
                if self.iats.remove(&session).is_some() {
                    self.metrics.slow_consumers.inc();
                    self.out.push_back(Output::End {
                        session,
                        end: SessionEnd::Closed(CloseReason::SlowConsumer),
                    });
                    self.engine.close_session(now, session, &mut self.actions);
                }
            }
        }
        self.carry_out(now);
    }

    /// A push from the HTTP API; its outcome is answered to the returned request.
    pub fn push(&mut self, now: Instant, msg: Message) -> RequestId {
        self.arm_sweep(now);
        let req = self.next_tag();
        if self.requests.len() >= self.cfg.max_requests {
            self.answer(
                req,
                Answer::Outcome(Outcome::Failed(FailReason::RateLimited)),
            );
            self.metrics.failed(FailReason::RateLimited);
            return req;
        }
        self.requests.insert(
            req,
            Request {
                asked: None,
                at: now,
            },
        );
        let waiter = Waiter::Api(req);
        match self.route(&msg.to) {
            Route::Local => {
                let to = msg.to.clone();
                self.engine.deliver(now, msg, waiter, &mut self.actions);
                self.note_local(&to);
            }
            Route::Remote(node) => self.forward(node, msg, vec![waiter], 0, now),
            Route::Unreachable => self.unreachable(vec![waiter], &msg.id, &msg.to),
        }
        self.carry_out(now);
        req
    }

    /// How many sessions `uid` has at its owner; answered to the returned request.
    pub fn presence(&mut self, now: Instant, uid: &str) -> RequestId {
        let req = self.next_tag();
        match self.route(uid) {
            Route::Local => self.answer(req, Answer::Sessions(self.engine.presence(uid))),
            Route::Remote(node) => {
                let frame = PeerFrame::PresenceQuery {
                    req,
                    uid: uid.to_string(),
                };
                self.ask(now, req, node, frame);
            }
            Route::Unreachable => self.answer(req, Answer::Unanswered),
        }
        req
    }

    /// `uid` was kicked at `at` (unix seconds). The owner closes its sessions whose token was
    /// issued up to `at` and answers how many to the returned request.
    pub fn kick(&mut self, now: Instant, uid: &str, at: u64) -> RequestId {
        let req = self.next_tag();
        match self.route(uid) {
            Route::Local => {
                let closed = self.kick_here(now, uid, at);
                self.answer(req, Answer::Sessions(closed));
            }
            Route::Remote(node) => {
                let frame = PeerFrame::Kick {
                    req,
                    uid: uid.to_string(),
                    at,
                };
                self.ask(now, req, node, frame);
            }
            Route::Unreachable => self.answer(req, Answer::Unanswered),
        }
        self.carry_out(now);
        req
    }

    /// A kick learnt from gossip: closes this node's sessions of `uid` that it revokes.
    pub fn kick_local(&mut self, now: Instant, uid: &str, at: u64) {
        self.kick_here(now, uid, at);
        self.carry_out(now);
    }

    /// A new membership view: forwards to owners that left (and are not draining over a live
    /// link) fail, then every local user is checked and the ones owned elsewhere now move.
    pub fn handle_view(&mut self, now: Instant, view: Arc<View>) {
        self.arm_sweep(now);
        self.view = view;
        self.metrics
            .gossip_members
            .set(self.view.members.len() as i64);
        let view = self.view.clone();
        let reachable = self.reachable.clone();
        self.fail_forwards(
            |n| !view.members.contains_key(n) && !reachable.contains(n),
            "owner left the cluster",
        );
        self.fail_room_waits(|n| !view.members.contains_key(n) && !reachable.contains(n));
        self.rooms_changed(now);
        self.behind.clear();
        self.behind_len = 0;
        let users = sorted(self.engine.local_users().cloned().collect());
        self.hand_over(now, users);
        self.carry_out(now);
    }

    /// A link event.
    pub fn handle_link(&mut self, now: Instant, event: LinkEvent) {
        self.arm_sweep(now);
        match event {
            LinkEvent::Up(node) => {
                self.reachable.insert(node.clone());
                // Only users that put this peer ahead of this node can move to it.
                if let Some(users) = self.behind.remove(&node) {
                    self.behind_len -= users.len();
                    self.hand_over(now, sorted(users.into_iter().collect()));
                }
                self.rooms_link_up(now, &node);
            }
            // A peer going away cannot make another node the owner of a user this node owns:
            // only the forwards and questions to it fail.
            LinkEvent::Down(node) => {
                self.reachable.remove(&node);
                self.fail_forwards(|n| *n == node, "link down");
                // A room owned by that peer has another owner now.
                self.fail_room_waits(|n| *n == node);
                self.rooms_changed(now);
            }
            LinkEvent::Frame { from, frame } => self.on_peer_frame(now, from, frame),
        }
        self.carry_out(now);
    }

    /// The transport refused a frame this relay output for `node` (no link, or its queue is
    /// full): what waited on it fails now.
    pub fn handle_refused(&mut self, now: Instant, node: &NodeId, frame: PeerFrame) {
        match frame {
            PeerFrame::Deliver { tag, .. }
            | PeerFrame::DeliverTransient { tag, .. }
            | PeerFrame::DeliverRoom { tag, .. } => {
                if let Some(f) = self.forwards.remove(&tag) {
                    tracing::debug!(peer = %node, id = %f.id, "forward refused by the link");
                    self.unreachable(f.waiters, &f.id, &f.to);
                }
            }
            PeerFrame::PresenceQuery { req, .. } | PeerFrame::Kick { req, .. }
                if self.requests.remove(&req).is_some() =>
            {
                self.answer(req, Answer::Unanswered);
            }
            // An outcome or answer that cannot be sent is given up by the asking node's sweep.
            PeerFrame::Outcome { .. }
            | PeerFrame::PresenceAnswer { .. }
            | PeerFrame::KickAnswer { .. }
            | PeerFrame::Hello { .. }
            | PeerFrame::PresenceQuery { .. }
            | PeerFrame::Kick { .. } => {}
            room => self.room_refused(now, node, room),
        }
        self.carry_out(now);
    }

    /// Time passed: retries, hold expiries, and (once a second) the sweep of forwards and
    /// questions that can no longer be answered in time.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.engine.tick(now, &mut self.actions);
        self.room_timers(now);
        if self.next_sweep.is_some_and(|at| now >= at) {
            self.sweep(now);
            self.next_sweep = None;
            self.arm_sweep(now);
        }
        self.carry_out(now);
    }

    // ----- internals ----------------------------------------------------------------------

    fn arm_sweep(&mut self, now: Instant) {
        if self.next_sweep.is_none() {
            self.next_sweep = Some(now + SWEEP_EVERY);
        }
    }

    fn next_tag(&mut self) -> u64 {
        let t = self.next_tag;
        self.next_tag += 1;
        t
    }

    fn answer(&mut self, req: RequestId, answer: Answer) {
        self.out.push_back(Output::Answer { req, answer });
    }

    fn end(&mut self, session: SessionId, end: SessionEnd) {
        self.out.push_back(Output::End { session, end });
    }

    fn ask(&mut self, now: Instant, req: RequestId, node: NodeId, frame: PeerFrame) {
        if self.requests.len() >= self.cfg.max_requests {
            self.answer(req, Answer::Busy);
            return;
        }
        self.requests.insert(
            req,
            Request {
                asked: Some(node.clone()),
                at: now,
            },
        );
        self.out.push_back(Output::Peer { node, frame });
    }

    /// Records that `uid` has sessions or messages here: if peers it prefers are unreachable
    /// now, it is filed under each of them for the hand-over when their link comes up.
    fn note_local(&mut self, uid: &str) {
        if self.view.ring.primary(uid) == Some(&self.me) {
            return;
        }
        let uid: Arc<str> = Arc::from(uid);
        for node in self.view.ring.preference(&uid) {
            if node == self.me {
                break;
            }
            if self.behind.entry(node).or_default().insert(uid.clone()) {
                self.behind_len += 1;
            }
        }
    }

    /// Moves the `users` this node no longer owns to their owners: `moved` to their sessions,
    /// their held messages forwarded. The rest stay, filed for later hand-overs.
    fn hand_over(&mut self, now: Instant, users: Vec<Arc<str>>) {
        let mut moved = 0usize;
        for uid in users {
            let owner = match self.owner(&uid) {
                Some(o) if o.node != self.me => o,
                // Still this node's, or nobody's for now (no usable node in its preference
                // list): filed for the links that would move it.
                _ => {
                    if self.engine.is_local_user(&uid) {
                        self.note_local(&uid);
                    }
                    continue;
                }
            };
            for session in self.engine.sessions_of(&uid) {
                self.iats.remove(&session);
                self.end(session, SessionEnd::Moved(owner.clone()));
                self.engine.close_session(now, session, &mut self.actions);
                moved += 1;
            }
            for (msg, waiters) in self.engine.take_held(&uid) {
                self.forward(owner.node.clone(), msg, waiters, 1, now);
            }
        }
        if moved > 0 {
            tracing::info!(moved, "sessions moved to their new owners");
        }
    }

    /// Closes (4005) the sessions of `uid` here whose token was issued up to `at`; returns how
    /// many.
    fn kick_here(&mut self, now: Instant, uid: &str, at: u64) -> usize {
        let mut closed = 0;
        for session in self.engine.sessions_of(uid) {
            if self.iats.get(&session).is_none_or(|&iat| iat > at) {
                continue;
            }
            self.iats.remove(&session);
            self.end(session, SessionEnd::Closed(CloseReason::Kicked));
            self.engine.close_session(now, session, &mut self.actions);
            closed += 1;
        }
        if closed > 0 {
            tracing::info!(%uid, sessions = closed, "kicked");
        }
        closed
    }

    fn on_peer_frame(&mut self, now: Instant, from: NodeId, frame: PeerFrame) {
        match frame {
            PeerFrame::Hello { .. } => {}
            PeerFrame::Deliver { tag, hops, msg } => {
                self.on_deliver_in(now, from, tag, hops, msg, false, None)
            }
            PeerFrame::DeliverTransient { tag, hops, msg } => {
                self.on_deliver_in(now, from, tag, hops, msg, true, None)
            }
            PeerFrame::DeliverRoom {
                tag,
                hops,
                msg,
                room,
                transient,
            } => {
                if crate::uid::validate_uid(&room).is_err() {
                    tracing::warn!(peer = %from, "room message with a malformed room refused");
                    let outcome = Outcome::Failed(FailReason::Invalid).into();
                    let frame = PeerFrame::Outcome { tag, outcome };
                    self.out.push_back(Output::Peer { node: from, frame });
                    return;
                }
                self.on_deliver_in(now, from, tag, hops, msg, transient, Some(room))
            }
            PeerFrame::Outcome { tag, outcome } => {
                if let Some(f) = self.forwards.remove(&tag) {
                    self.metrics
                        .forward_latency
                        .observe(now.saturating_duration_since(f.at).as_secs_f64());
                    self.resolve(f.waiters, &f.id, &f.to, outcome.into());
                }
            }
            PeerFrame::PresenceQuery { req, uid } => {
                let sessions = u32::try_from(self.engine.presence(&uid)).unwrap_or(u32::MAX);
                let frame = PeerFrame::PresenceAnswer { req, sessions };
                self.out.push_back(Output::Peer { node: from, frame });
            }
            PeerFrame::Kick { req, uid, at } => {
                if crate::uid::validate_uid(&uid).is_err() {
                    tracing::warn!(peer = %from, "kick of a malformed uid from a peer ignored");
                    return;
                }
                let uid: Arc<str> = Arc::from(uid);
                // Recorded here too (it also comes by gossip), so that this node refuses the
                // revoked tokens from now on.
                self.out.push_back(Output::Kicked {
                    uid: uid.clone(),
                    at,
                });
                let closed = self.kick_here(now, &uid, at);
                let sessions = u32::try_from(closed).unwrap_or(u32::MAX);
                let frame = PeerFrame::KickAnswer { req, sessions };
                self.out.push_back(Output::Peer { node: from, frame });
            }
            room @ (PeerFrame::RoomJoin { .. }
            | PeerFrame::RoomLeave { .. }
            | PeerFrame::RoomMember { .. }
            | PeerFrame::RoomSend { .. }
            | PeerFrame::RoomDeliver { .. }
            | PeerFrame::RoomOnline { .. }
            | PeerFrame::RoomTally { .. }
            | PeerFrame::RoomQuery { .. }
            | PeerFrame::RoomReply { .. }
            | PeerFrame::RoomSync { .. }) => self.on_room_frame(now, &from, room),
            PeerFrame::KickAnswer { req, sessions }
            | PeerFrame::PresenceAnswer { req, sessions } => {
                // Only a request still waiting, and only from the peer it was asked of.
                if self
                    .requests
                    .get(&req)
                    .is_some_and(|r| r.asked.as_ref() == Some(&from))
                {
                    self.requests.remove(&req);
                    self.answer(req, Answer::Sessions(sessions as usize));
                }
            }
        }
    }

    /// A message for one recipient from a peer (of `room`, when it is a room message).
    #[allow(clippy::too_many_arguments)]
    fn on_deliver_in(
        &mut self,
        now: Instant,
        from: NodeId,
        tag: u64,
        hops: u8,
        msg: WireMessage,
        transient: bool,
        room: Option<Arc<str>>,
    ) {
        let checked = match msg.check(self.cfg.max_body_bytes) {
            Ok(()) => msg.into_message(transient).map(|mut m| {
                m.room = room;
                m
            }),
            Err(why) => {
                tracing::warn!(peer = %from, why, "refused a message from a peer");
                None
            }
        };
        let Some(msg) = checked else {
            self.metrics.failed(FailReason::Invalid);
            let outcome = Outcome::Failed(FailReason::Invalid).into();
            let frame = PeerFrame::Outcome { tag, outcome };
            self.out.push_back(Output::Peer { node: from, frame });
            return;
        };
        let waiter = Waiter::Remote {
            node: from.clone(),
            tag,
        };
        match self.route(&msg.to) {
            // During a ring change the sender may be behind: pass it on, a bounded number of
            // times, then deliver here (the user will be held for).
            Route::Remote(node) if hops < MAX_HOPS && node != from => {
                self.forward(node, msg, vec![waiter], hops + 1, now)
            }
            Route::Unreachable => self.unreachable(vec![waiter], &msg.id, &msg.to),
            _ => {
                let to = msg.to.clone();
                self.engine.deliver(now, msg, waiter, &mut self.actions);
                self.note_local(&to);
            }
        }
    }

    /// Fails the forwards and questions to the nodes `lost` selects.
    fn fail_forwards(&mut self, lost: impl Fn(&NodeId) -> bool, why: &str) {
        let tags: Vec<u64> = self
            .forwards
            .iter()
            .filter(|(_, f)| lost(&f.node))
            .map(|(t, _)| *t)
            .collect();
        // In tag order, so that a run's outputs depend on its inputs alone (the simulation
        // replays a seed exactly).
        let tags = sorted(tags);
        if !tags.is_empty() {
            tracing::warn!(
                forwards = tags.len(),
                why,
                "failing forwards in flight as unreachable"
            );
        }
        for tag in tags {
            if let Some(f) = self.forwards.remove(&tag) {
                self.unreachable(f.waiters, &f.id, &f.to);
            }
        }
        let asks: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.asked.as_ref().is_some_and(&lost))
            .map(|(req, _)| *req)
            .collect();
        let asks = sorted(asks);
        for req in asks {
            self.requests.remove(&req);
            self.answer(req, Answer::Unanswered);
        }
    }

    /// Sends `msg` to its owner `node`; its waiters learn the outcome when it comes back.
    fn forward(
        &mut self,
        node: NodeId,
        msg: Message,
        waiters: Vec<Waiter>,
        hops: u8,
        now: Instant,
    ) {
        if !self.reachable.contains(&node) {
            self.unreachable(waiters, &msg.id, &msg.to);
            return;
        }
        if self.forwards.len() >= self.cfg.max_forwards {
            self.metrics.failed(FailReason::RateLimited);
            self.resolve(
                waiters,
                &msg.id,
                &msg.to,
                Outcome::Failed(FailReason::RateLimited),
            );
            return;
        }
        let tag = self.next_tag();
        let wire = WireMessage::from_message(&msg);
        let frame = if let Some(room) = &msg.room {
            PeerFrame::DeliverRoom {
                tag,
                hops,
                msg: wire,
                room: room.clone(),
                transient: msg.transient,
            }
        } else if msg.transient {
            PeerFrame::DeliverTransient {
                tag,
                hops,
                msg: wire,
            }
        } else {
            PeerFrame::Deliver {
                tag,
                hops,
                msg: wire,
            }
        };
        self.metrics.messages_forwarded.inc();
        self.forwards.insert(
            tag,
            Forward {
                node: node.clone(),
                waiters,
                id: msg.id,
                to: msg.to,
                at: now,
            },
        );
        self.out.push_back(Output::Peer { node, frame });
    }

    fn unreachable(&mut self, waiters: Vec<Waiter>, id: &str, to: &str) {
        self.metrics.failed(FailReason::Unreachable);
        self.resolve(waiters, id, to, Outcome::Failed(FailReason::Unreachable));
    }

    /// Tells each waiter how a message ended.
    fn resolve(&mut self, waiters: Vec<Waiter>, id: &str, to: &str, outcome: Outcome) {
        for waiter in waiters {
            match waiter {
                Waiter::Session(session) => {
                    self.engine
                        .outcome(session, id, to, outcome, &mut self.actions)
                }
                Waiter::Api(req) => {
                    if self.requests.remove(&req).is_some() {
                        self.answer(req, Answer::Outcome(outcome));
                    }
                }
                Waiter::Remote { node, tag } => {
                    let frame = PeerFrame::Outcome {
                        tag,
                        outcome: outcome.into(),
                    };
                    self.out.push_back(Output::Peer { node, frame });
                }
                Waiter::Batch(bid) => self.batch_count(bid, outcome),
            }
        }
    }

    /// Turns the engine's actions into outputs.
    fn carry_out(&mut self, now: Instant) {
        while !self.actions.is_empty() {
            let batch = std::mem::take(&mut self.actions);
            for action in batch {
                match action {
                    Action::Push { session, frame } => {
                        self.out.push_back(Output::Session { session, frame })
                    }
                    Action::Close { session, reason } => {
                        self.iats.remove(&session);
                        self.end(session, SessionEnd::Closed(reason));
                    }
                    Action::Report {
                        waiter,
                        id,
                        to,
                        outcome,
                        ..
                    } => self.resolve(vec![waiter], &id, &to, outcome),
                    Action::Forward { node, session, msg } => {
                        self.forward(node, msg, vec![Waiter::Session(session)], 0, now)
                    }
                }
            }
        }
        for msg in self.engine.take_offline() {
            self.out.push_back(Output::Offline(msg));
        }
        self.metrics.forwards.set(self.forwards.len() as i64);
        self.room_gauges();
        self.metrics
            .pending_requests
            .set(self.requests.len() as i64);
    }

    /// Fails forwards and questions that can no longer be answered in time, and rebuilds the
    /// hand-over index when stale entries (users gone since) outnumber the live ones.
    fn sweep(&mut self, now: Instant) {
        let max_age = self.forward_max_age;
        let stale: Vec<u64> = self
            .forwards
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.at) > max_age)
            .map(|(t, _)| *t)
            .collect();
        let stale = sorted(stale);
        for tag in stale {
            if let Some(f) = self.forwards.remove(&tag) {
                tracing::warn!(node = %f.node, id = %f.id, "no outcome from the owner in time");
                self.unreachable(f.waiters, &f.id, &f.to);
            }
        }
        let ask_timeout = self.cfg.ask_timeout;
        let late: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, r)| {
                r.asked.is_some() && now.saturating_duration_since(r.at) >= ask_timeout
            })
            .map(|(req, _)| *req)
            .collect();
        let late = sorted(late);
        for req in late {
            self.requests.remove(&req);
            self.answer(req, Answer::Unanswered);
        }
        self.sweep_rooms(now);
        let live = self.engine.local_user_count();
        if self.behind_len > 2 * live + 1024 {
            self.behind.clear();
            self.behind_len = 0;
            let users: Vec<Arc<str>> = self.engine.local_users().cloned().collect();
            for uid in users {
                self.note_local(&uid);
            }
        }
    }
}

/// `v` in order: what the relay does with the entries of a hash map must not depend on the
/// map's random iteration order.
fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort_unstable();
    v
}

#[cfg(test)]
#[path = "relay_tests.rs"]
mod tests;
