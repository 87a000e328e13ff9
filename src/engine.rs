//! The delivery engine: every delivery rule of the protocol as a state machine with no IO.
//!
//! Inputs are method calls (a session opened or closed, a `send`, an `ack`, a message handed
//! over by another node or the HTTP API, the passing of time); each takes `now` and appends
//! [`Action`]s to an output buffer that the cluster core ([`crate::relay`]) turns into outputs:
//! frames to push to sessions, sessions to close, outcomes to report to waiters that are not
//! local sessions, messages to forward to other nodes. Timers are not armed here: the driver
//! asks [`Engine::next_deadline`] and calls [`Engine::tick`] when it passes.
//!
//! The engine has two halves that meet at [`Engine::deliver`]:
//! - the **sender side** (`send`, `outcome`): per-session rate limit and in-flight bound, and
//!   turning outcomes into `delivered`/`failed` frames for the sending session;
//! - the **recipient side** (`deliver`, `ack`, timers): dedup of `(from, id)`, fan-out to every
//!   session of the recipient, retries with the same `seq`, hold while the user has no session.
//!
//! A message whose sender lives on another node enters the recipient side with a
//! [`Waiter::Remote`]; a message whose recipient lives elsewhere leaves the sender side as
//! [`Action::Forward`]. That is the whole seam a cluster needs.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::Metrics;
use crate::protocol::{Body, FailReason, ServerFrame};

/// A session, unique within a node for the node's lifetime.
pub type SessionId = u64;

/// A node id.
pub type NodeId = Arc<str>;

/// The engine's limits and timeouts, taken from the configuration.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Wait for an ack before pushing again.
    pub ack_timeout: Duration,
    /// Pushes after the first.
    pub max_retries: u32,
    /// How long a message waits for a session.
    pub hold: Duration,
    /// How long a delivered `(from, id)` is remembered.
    pub dedup_window: Duration,
    /// Most remembered `(from, id)` outcomes.
    pub max_dedup_entries: usize,
    /// Most messages held for one user.
    pub max_held_per_user: usize,
    /// Most messages in delivery on this node.
    pub max_deliveries: usize,
    /// Most bytes of bodies in delivery on this node.
    pub max_held_bytes: usize,
    /// Most sends of one session waiting for an outcome.
    pub max_inflight_per_session: usize,
    /// Sends per second per session (bucket of the same size).
    pub sends_per_second: u32,
    /// Un-acked pushes before a session counts as a slow consumer.
    pub max_unacked_per_session: usize,
    /// Sessions per user; the oldest is closed beyond it.
    pub max_sessions_per_user: usize,
    /// Keep the messages that end `failed: offline` (not transient ones) for
    /// [`Engine::take_offline`]: the `offline` webhook.
    pub report_offline: bool,
}

/// A message in delivery.
#[derive(Debug, Clone)]
pub struct Message {
    /// Sender uid (`$system` for API pushes).
    pub from: Arc<str>,
    /// Sender's message id.
    pub id: Arc<str>,
    /// Recipient uid.
    pub to: Arc<str>,
    /// Raw JSON body.
    pub body: Body,
    /// Milliseconds since the epoch when the sender's node took it.
    pub ts: u64,
    /// No hold, no retry, no dedup memory: delivered if a session acks within the ack
    /// timeout, else failed (`offline` at once when the recipient has no session).
    pub transient: bool,
    /// The room, for a room message (one copy per member; the body is shared).
    pub room: Option<Arc<str>>,
    /// A session of the recipient that must not get it: the room message's sending session,
    /// on the node it was sent from. When it is the recipient's only session, the message
    /// counts as delivered (the sender has it).
    pub except: Option<SessionId>,
}

impl Message {
    /// A 1:1 message.
    pub fn direct(from: &str, id: &str, to: &str, body: Body, ts: u64) -> Message {
        Message {
            from: Arc::from(from),
            id: Arc::from(id),
            to: Arc::from(to),
            body,
            ts,
            transient: false,
            room: None,
            except: None,
        }
    }
}

/// The end of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A session of the recipient acked it.
    Delivered,
    /// It will not be delivered.
    Failed(FailReason),
}

/// How a room message ended for its members (the fields of `room_result`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoomTally {
    /// Members it was addressed to.
    pub members: u32,
    /// Members with a session that acked.
    pub delivered: u32,
    /// Members that had no session within the hold time.
    pub offline: u32,
    /// Members whose delivery failed otherwise (timeout, unreachable, limits).
    pub failed: u32,
}

impl RoomTally {
    /// Counts one member's outcome.
    pub fn count(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Delivered => self.delivered += 1,
            Outcome::Failed(FailReason::Offline) => self.offline += 1,
            Outcome::Failed(_) => self.failed += 1,
        }
    }

    /// Adds another tally's outcomes (not its `members`).
    pub fn add(&mut self, other: &RoomTally) {
        self.delivered += other.delivered;
        self.offline += other.offline;
        self.failed += other.failed;
    }

    /// Members whose outcome is counted.
    pub fn ended(&self) -> u32 {
        self.delivered + self.offline + self.failed
    }
}

/// Who waits for the outcome of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Waiter {
    /// A session on this node sent it.
    Session(SessionId),
    /// An HTTP API request on this node (the driver's request number).
    Api(u64),
    /// Another node forwarded it and waits for `Outcome { tag }`.
    Remote {
        /// The forwarding node.
        node: NodeId,
        /// That node's tag for the forward.
        tag: u64,
    },
    /// The fan-out of a room message to this node's members: the relay's batch number.
    Batch(u64),
}

/// Where the owner of a recipient is, as the driver sees the ring now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This node owns the recipient.
    Local,
    /// Another node owns it.
    Remote(NodeId),
    /// No live, reachable node owns it.
    Unreachable,
}

/// Why the engine closes a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Too many un-acked pushes, or its outbound queue was full.
    SlowConsumer,
    /// The user opened more sessions than allowed; this was the oldest.
    Replaced,
    /// The user was kicked (`POST /api/kick`); decided by the driver, never by the engine.
    Kicked,
}

/// What the driver must do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Write `frame` to `session`.
    Push {
        /// Target session.
        session: SessionId,
        /// The frame.
        frame: ServerFrame,
    },
    /// Close `session`; the engine already forgot it.
    Close {
        /// Target session.
        session: SessionId,
        /// Why.
        reason: CloseReason,
    },
    /// Tell a waiter that is not a local session how a message ended.
    Report {
        /// The waiter.
        waiter: Waiter,
        /// Sender uid.
        from: Arc<str>,
        /// Message id.
        id: Arc<str>,
        /// Recipient uid.
        to: Arc<str>,
        /// The outcome.
        outcome: Outcome,
    },
    /// Hand `msg` to the recipient's owner `node`; its outcome comes back through
    /// [`Engine::outcome`] for `session`.
    Forward {
        /// The owner.
        node: NodeId,
        /// The sending session on this node.
        session: SessionId,
        /// The message.
        msg: Message,
    },
}

type DeliveryId = u64;

/// A dedup key: `(from, to, id, room)`. Rule 5 speaks of `(from, id)`; the recipient (and the
/// room, for a room message) is part of the key so that an id reused for another recipient is
/// never answered with the first one's outcome.
type DedupKey = (Arc<str>, Arc<str>, Arc<str>, Option<Arc<str>>);

fn dedup_key(msg: &Message) -> DedupKey {
    (
        msg.from.clone(),
        msg.to.clone(),
        msg.id.clone(),
        msg.room.clone(),
    )
}

#[derive(Debug)]
struct Delivery {
    msg: Message,
    waiters: Vec<Waiter>,
    /// Live pushes: `(session, seq)` waiting for an ack.
    pushes: Vec<(SessionId, u64)>,
    /// Held (no session) until this instant.
    held_until: Option<Instant>,
    /// Times the message was placed (pushed to sessions or held); bounded.
    placements: u32,
    taken: Instant,
}

#[derive(Debug)]
struct Pending {
    delivery: DeliveryId,
    retries: u32,
    deadline: Instant,
}

#[derive(Debug)]
struct Session {
    uid: Arc<str>,
    next_seq: u64,
    /// Un-acked pushes by `seq`.
    pending: BTreeMap<u64, Pending>,
    /// Sends of this session waiting for an outcome: id -> how many.
    inflight: HashMap<Arc<str>, u32>,
    /// Sum of `inflight`'s counts, kept so the bound check is O(1) per send.
    inflight_total: usize,
    tokens: f64,
    refilled: Instant,
}

#[derive(Debug, Default)]
struct User {
    /// Sessions, oldest first.
    sessions: Vec<SessionId>,
    /// Held deliveries, oldest first.
    held: VecDeque<DeliveryId>,
}

#[derive(Debug, Clone, Copy)]
enum Dedup {
    InFlight(DeliveryId),
    Delivered(Instant),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Retry(SessionId, u64),
    HoldExpiry(DeliveryId),
}

/// The delivery state machine of one node.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
    sessions: HashMap<SessionId, Session>,
    users: HashMap<Arc<str>, User>,
    deliveries: HashMap<DeliveryId, Delivery>,
    next_delivery: DeliveryId,
    dedup: HashMap<DedupKey, Dedup>,
    /// Delivered dedup entries by expiry, oldest first.
    dedup_order: VecDeque<(Instant, DedupKey)>,
    timers: BinaryHeap<Reverse<(Instant, Timer)>>,
    held_count: usize,
    /// Bytes of the distinct bodies of `deliveries`, for `max_held_bytes`: the members of a
    /// room share one body, which is counted once.
    delivery_bytes: usize,
    /// Deliveries per body (by the address of its shared allocation).
    bodies: HashMap<usize, u32>,
    /// Sessions found over their un-acked bound, closed once the current input is done (closing
    /// in the middle of a fan-out would re-place the message onto sessions it is about to reach).
    slow: Vec<SessionId>,
    /// Messages that ended `failed: offline` since the last [`Engine::take_offline`] (only with
    /// `report_offline`).
    offline: Vec<Message>,
}

/// Most waiters on one delivery (repeated sends of an id in flight).
const MAX_WAITERS: usize = 64;

/// Most times one message is placed (pushed to the sessions of its recipient, or held): a
/// message whose sessions keep closing before they ack ends in `failed: timeout`.
pub const MAX_PLACEMENTS: u32 = 4;

impl Engine {
    /// An engine with no sessions.
    pub fn new(cfg: EngineConfig, metrics: Arc<Metrics>) -> Engine {
        Engine {
            cfg,
            metrics,
            sessions: HashMap::new(),
            users: HashMap::new(),
            deliveries: HashMap::new(),
            next_delivery: 1,
            dedup: HashMap::new(),
            dedup_order: VecDeque::new(),
            timers: BinaryHeap::new(),
            held_count: 0,
            delivery_bytes: 0,
            bodies: HashMap::new(),
            slow: Vec::new(),
            offline: Vec::new(),
        }
    }

    // ----- sessions -------------------------------------------------------------------------

    /// A session of `uid` is live. Messages held for the user are pushed to it.
    pub fn open_session(
        &mut self,
        now: Instant,
        session: SessionId,
        uid: &str,
        out: &mut Vec<Action>,
    ) {
        if self.sessions.contains_key(&session) {
            return;
        }
        let uid: Arc<str> = match self.users.get_key_value(uid) {
            Some((k, _)) => k.clone(),
            None => Arc::from(uid),
        };
        self.sessions.insert(
            session,
            Session {
                uid: uid.clone(),
                next_seq: 1,
                pending: BTreeMap::new(),
                inflight: HashMap::new(),
                inflight_total: 0,
                tokens: f64::from(self.cfg.sends_per_second),
                refilled: now,
            },
        );
        let user = self.users.entry(uid.clone()).or_default();
        user.sessions.push(session);
        let oldest =
            (user.sessions.len() > self.cfg.max_sessions_per_user).then(|| user.sessions[0]);
        if let Some(old) = oldest {
            out.push(Action::Close {
                session: old,
                reason: CloseReason::Replaced,
            });
            self.drop_session(now, old, out);
        }
        let held: Vec<DeliveryId> = match self.users.get_mut(&uid) {
            Some(user) => user.held.drain(..).collect(),
            None => Vec::new(),
        };
        for did in held {
            let Some(d) = self.deliveries.get_mut(&did) else {
                continue;
            };
            if d.held_until.take().is_none() {
                continue;
            }
            self.held_count -= 1;
            // Held messages are bounded by `max_held_per_user`; a new session gets them all.
            self.push_to(now, did, session, false, out);
        }
        self.metrics.held.set(self.held_count as i64);
        self.close_slow(now, out);
    }

    /// A session is gone. What it had not acked is pushed to the user's other sessions, or
    /// held; its own sends in flight will end without a frame.
    pub fn close_session(&mut self, now: Instant, session: SessionId, out: &mut Vec<Action>) {
        self.drop_session(now, session, out);
        self.close_slow(now, out);
    }

    fn drop_session(&mut self, now: Instant, session: SessionId, out: &mut Vec<Action>) {
        let Some(s) = self.sessions.remove(&session) else {
            return;
        };
        if let Some(user) = self.users.get_mut(&s.uid) {
            user.sessions.retain(|&x| x != session);
        }
        for (seq, p) in s.pending {
            let Some(d) = self.deliveries.get_mut(&p.delivery) else {
                continue;
            };
            d.pushes.retain(|&(ss, sq)| !(ss == session && sq == seq));
            if d.pushes.is_empty() {
                self.place(now, p.delivery, out);
            }
        }
        self.forget_user_if_idle(&s.uid);
    }

    /// Number of live sessions of `uid` on this node.
    pub fn presence(&self, uid: &str) -> usize {
        self.users.get(uid).map_or(0, |u| u.sessions.len())
    }

    /// The live sessions of `uid`.
    pub fn sessions_of(&self, uid: &str) -> Vec<SessionId> {
        self.users
            .get(uid)
            .map_or_else(Vec::new, |u| u.sessions.to_vec())
    }

    /// Every live session and its uid.
    pub fn sessions(&self) -> Vec<(SessionId, Arc<str>)> {
        self.sessions
            .iter()
            .map(|(id, s)| (*id, s.uid.clone()))
            .collect()
    }

    /// Users with sessions or messages in delivery here.
    pub fn local_users(&self) -> impl Iterator<Item = &Arc<str>> {
        self.users.keys()
    }

    /// How many users have sessions or messages in delivery here.
    pub fn local_user_count(&self) -> usize {
        self.users.len()
    }

    /// Whether `uid` has sessions or messages in delivery here.
    pub fn is_local_user(&self, uid: &str) -> bool {
        self.users.contains_key(uid)
    }

    /// Users that have messages held for them.
    pub fn users_with_held(&self) -> Vec<Arc<str>> {
        self.users
            .iter()
            .filter(|(_, u)| !u.held.is_empty())
            .map(|(uid, _)| uid.clone())
            .collect()
    }

    /// Takes the messages held for `uid` out of this engine, oldest first, with their waiters:
    /// the user moved to another node, which takes over their delivery. Their dedup entries go
    /// with them (the new owner deduplicates from now on).
    pub fn take_held(&mut self, uid: &str) -> Vec<(Message, Vec<Waiter>)> {
        let Some(key) = self.users.get_key_value(uid).map(|(k, _)| k.clone()) else {
            return Vec::new();
        };
        let held: Vec<DeliveryId> = match self.users.get_mut(uid) {
            Some(user) => user.held.drain(..).collect(),
            None => Vec::new(),
        };
        let mut out = Vec::with_capacity(held.len());
        for did in held {
            let Some(d) = self.deliveries.remove(&did) else {
                continue;
            };
            self.release_body(&d.msg.body);
            if d.held_until.is_some() {
                self.held_count -= 1;
            }
            self.dedup.remove(&dedup_key(&d.msg));
            out.push((d.msg, d.waiters));
        }
        self.metrics.held.set(self.held_count as i64);
        self.forget_user_if_idle(&key);
        out
    }

    /// The metrics this engine updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Number of live sessions on this node.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// The uid of a live session.
    pub fn session_uid(&self, session: SessionId) -> Option<&Arc<str>> {
        self.sessions.get(&session).map(|s| &s.uid)
    }

    // ----- sender side ----------------------------------------------------------------------

    /// Admits a send of local `session` (1:1 or room): spends a token of its rate limit and
    /// counts `id` in flight. The outcome must come back through [`Engine::outcome`] or
    /// [`Engine::room_outcome`]. `Err(None)`: the session is gone.
    ///
    /// # Errors
    /// `Some(RateLimited)` when over the rate or the in-flight bound (nothing is counted).
    pub fn admit(
        &mut self,
        now: Instant,
        session: SessionId,
        id: &Arc<str>,
    ) -> Result<Arc<str>, Option<FailReason>> {
        let cfg_rate = f64::from(self.cfg.sends_per_second);
        let max_inflight = self.cfg.max_inflight_per_session;
        let Some(s) = self.sessions.get_mut(&session) else {
            return Err(None);
        };
        let elapsed = now.saturating_duration_since(s.refilled).as_secs_f64();
        s.tokens = (s.tokens + elapsed * cfg_rate).min(cfg_rate);
        s.refilled = now;
        if s.tokens < 1.0 {
            return Err(Some(FailReason::RateLimited));
        }
        s.tokens -= 1.0;
        if s.inflight_total >= max_inflight {
            return Err(Some(FailReason::RateLimited));
        }
        *s.inflight.entry(id.clone()).or_insert(0) += 1;
        s.inflight_total += 1;
        Ok(s.uid.clone())
    }

    /// A `send` from a local session. `route` is where the recipient's owner is now.
    #[allow(clippy::too_many_arguments)]
    pub fn send(
        &mut self,
        now: Instant,
        session: SessionId,
        id: &str,
        to: &str,
        body: Body,
        ts: u64,
        transient: bool,
        route: Route,
        out: &mut Vec<Action>,
    ) {
        let id: Arc<str> = Arc::from(id);
        let to: Arc<str> = Arc::from(to);
        let from = match self.admit(now, session, &id) {
            Ok(uid) => uid,
            Err(None) => return,
            Err(Some(reason)) => {
                self.metrics.failed(reason);
                out.push(Action::Push {
                    session,
                    frame: ServerFrame::Failed { id, to, reason },
                });
                return;
            }
        };
        let msg = Message {
            from,
            id,
            to,
            body,
            ts,
            transient,
            room: None,
            except: None,
        };
        match route {
            Route::Local => {
                self.take(now, msg, Waiter::Session(session), out);
                self.close_slow(now, out);
            }
            Route::Remote(node) => out.push(Action::Forward { node, session, msg }),
            Route::Unreachable => {
                self.metrics.failed(FailReason::Unreachable);
                self.outcome(
                    session,
                    &msg.id,
                    &msg.to,
                    Outcome::Failed(FailReason::Unreachable),
                    out,
                );
            }
        }
    }

    /// The outcome of a send of local `session` (from this engine or from another node).
    /// Unknown sessions and ids are ignored: the sending session is gone.
    pub fn outcome(
        &mut self,
        session: SessionId,
        id: &str,
        to: &str,
        outcome: Outcome,
        out: &mut Vec<Action>,
    ) {
        let Some(key) = self.release(session, id) else {
            return;
        };
        let to: Arc<str> = Arc::from(to);
        let frame = match outcome {
            Outcome::Delivered => ServerFrame::Delivered { id: key, to },
            Outcome::Failed(reason) => ServerFrame::Failed {
                id: key,
                to,
                reason,
            },
        };
        out.push(Action::Push { session, frame });
    }

    /// The end of a room send of local `session` (admitted by [`Engine::admit`]): pushes its
    /// `room_result` or `failed`. Unknown sessions and ids are ignored.
    pub fn room_outcome(
        &mut self,
        session: SessionId,
        id: &str,
        room: &Arc<str>,
        result: Result<RoomTally, FailReason>,
        out: &mut Vec<Action>,
    ) {
        let Some(id) = self.release(session, id) else {
            return;
        };
        let room = room.clone();
        let frame = match result {
            Ok(t) => ServerFrame::RoomResult {
                id,
                room,
                members: t.members,
                delivered: t.delivered,
                offline: t.offline,
                failed: t.failed,
            },
            Err(reason) => ServerFrame::RoomFailed {
                id: Some(id),
                room,
                reason,
            },
        };
        out.push(Action::Push { session, frame });
    }

    /// Ends one in-flight count of `id` for `session`; the id as it was admitted.
    fn release(&mut self, session: SessionId, id: &str) -> Option<Arc<str>> {
        let s = self.sessions.get_mut(&session)?;
        let (key, count) = s.inflight.get_key_value(id).map(|(k, c)| (k.clone(), *c))?;
        s.inflight_total -= 1;
        if count <= 1 {
            s.inflight.remove(id);
        } else {
            s.inflight.insert(key.clone(), count - 1);
        }
        Some(key)
    }

    // ----- recipient side -------------------------------------------------------------------

    /// Takes a message whose recipient this node owns; `waiter` learns the outcome.
    pub fn deliver(&mut self, now: Instant, msg: Message, waiter: Waiter, out: &mut Vec<Action>) {
        self.take(now, msg, waiter, out);
        self.close_slow(now, out);
    }

    fn take(&mut self, now: Instant, msg: Message, waiter: Waiter, out: &mut Vec<Action>) {
        let key = dedup_key(&msg);
        // A transient message is never remembered: a repeated id is a new message.
        let seen = if msg.transient {
            None
        } else {
            self.dedup.get(&key)
        };
        match seen {
            Some(Dedup::InFlight(did)) => {
                let did = *did;
                self.metrics.duplicates.inc();
                let d = self
                    .deliveries
                    .get_mut(&did)
                    .expect("in-flight dedup entry has a delivery");
                if d.waiters.len() < MAX_WAITERS {
                    d.waiters.push(waiter);
                } else {
                    self.metrics.failed(FailReason::RateLimited);
                    self.report(waiter, &msg, Outcome::Failed(FailReason::RateLimited), out);
                }
                return;
            }
            Some(Dedup::Delivered(_)) => {
                self.metrics.duplicates.inc();
                self.report(waiter, &msg, Outcome::Delivered, out);
                return;
            }
            None => {}
        }
        // A body another delivery holds already (a room message) costs nothing more.
        let bytes = if self.bodies.contains_key(&body_key(&msg.body)) {
            0
        } else {
            msg.body.get().len()
        };
        if self.deliveries.len() >= self.cfg.max_deliveries
            || self.delivery_bytes + bytes > self.cfg.max_held_bytes
        {
            self.metrics.failed(FailReason::RateLimited);
            self.report(waiter, &msg, Outcome::Failed(FailReason::RateLimited), out);
            return;
        }
        self.metrics.messages_in.inc();
        let did = self.next_delivery;
        self.next_delivery += 1;
        if !msg.transient {
            self.dedup.insert(key, Dedup::InFlight(did));
        }
        self.hold_body(&msg.body);
        self.deliveries.insert(
            did,
            Delivery {
                msg,
                waiters: vec![waiter],
                pushes: Vec::new(),
                held_until: None,
                placements: 0,
                taken: now,
            },
        );
        self.place(now, did, out);
    }

    /// An `ack` from a local session. Unknown or already acked `seq`s are ignored.
    pub fn ack(&mut self, now: Instant, session: SessionId, seq: u64, out: &mut Vec<Action>) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some(p) = s.pending.remove(&seq) else {
            return;
        };
        let Some(d) = self.deliveries.get_mut(&p.delivery) else {
            return;
        };
        d.pushes.retain(|&(ss, sq)| !(ss == session && sq == seq));
        self.metrics
            .delivery_latency
            .observe(now.saturating_duration_since(d.taken).as_secs_f64());
        self.finish(now, p.delivery, Outcome::Delivered, out);
    }

    /// The earliest instant at which [`Engine::tick`] has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        let timer = self.timers.peek().map(|Reverse((t, _))| *t);
        let dedup = self.dedup_order.front().map(|(t, _)| *t);
        match (timer, dedup) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs every timer due at `now`: retries, timeouts, hold expiry, dedup expiry.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        while let Some(Reverse((at, timer))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            match timer {
                Timer::Retry(session, seq) => self.retry(now, at, session, seq, out),
                Timer::HoldExpiry(did) => {
                    let due = self
                        .deliveries
                        .get(&did)
                        .is_some_and(|d| d.held_until == Some(at));
                    if due {
                        let uid = self.deliveries[&did].msg.to.clone();
                        if let Some(user) = self.users.get_mut(&uid) {
                            user.held.retain(|&x| x != did);
                        }
                        self.deliveries.get_mut(&did).expect("checked").held_until = None;
                        self.held_count -= 1;
                        self.metrics.held.set(self.held_count as i64);
                        self.finish(now, did, Outcome::Failed(FailReason::Offline), out);
                        self.forget_user_if_idle(&uid);
                    }
                }
            }
        }
        while let Some((at, _)) = self.dedup_order.front() {
            if *at > now {
                break;
            }
            let (at, key) = self.dedup_order.pop_front().expect("peeked");
            if matches!(self.dedup.get(&key), Some(Dedup::Delivered(t)) if *t == at) {
                self.dedup.remove(&key);
            }
        }
    }

    /// Pushes to `session` waiting for its ack.
    pub fn unacked(&self, session: SessionId) -> usize {
        self.sessions.get(&session).map_or(0, |s| s.pending.len())
    }

    /// Messages in delivery (pushed or held) on this node.
    pub fn deliveries_in_flight(&self) -> usize {
        self.deliveries.len()
    }

    /// Bytes of the bodies in delivery (pushed or held) on this node, each shared body once.
    pub fn delivery_bytes(&self) -> usize {
        self.delivery_bytes
    }

    fn hold_body(&mut self, body: &Body) {
        let n = self.bodies.entry(body_key(body)).or_insert(0);
        if *n == 0 {
            self.delivery_bytes += body.get().len();
            self.metrics.delivery_bytes.set(self.delivery_bytes as i64);
        }
        *n += 1;
    }

    fn release_body(&mut self, body: &Body) {
        let key = body_key(body);
        let Some(n) = self.bodies.get_mut(&key) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            self.bodies.remove(&key);
            self.delivery_bytes -= body.get().len();
            self.metrics.delivery_bytes.set(self.delivery_bytes as i64);
        }
    }

    /// The messages that ended `failed: offline` since the last call (with `report_offline`;
    /// transient ones are not kept). The caller takes them after every input.
    pub fn take_offline(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.offline)
    }

    /// Remembered `(from, id)` entries.
    pub fn dedup_len(&self) -> usize {
        self.dedup.len()
    }

    // ----- internals ------------------------------------------------------------------------

    /// Pushes a delivery to every session of its recipient, or holds it.
    fn place(&mut self, now: Instant, did: DeliveryId, out: &mut Vec<Action>) {
        let d = self
            .deliveries
            .get_mut(&did)
            .expect("placing a live delivery");
        if d.placements >= MAX_PLACEMENTS {
            self.finish(now, did, Outcome::Failed(FailReason::Timeout), out);
            return;
        }
        // A transient message is placed once: the sessions it was pushed to closed without an
        // ack, and it is not pushed again.
        if d.msg.transient && d.placements > 0 {
            self.finish(now, did, Outcome::Failed(FailReason::Offline), out);
            return;
        }
        d.placements += 1;
        let transient = d.msg.transient;
        let to = d.msg.to.clone();
        let except = d.msg.except;
        let mut sessions: Vec<SessionId> = self
            .users
            .get(&to)
            .map(|u| u.sessions.clone())
            .unwrap_or_default();
        if let Some(x) = except
            && sessions.contains(&x)
        {
            sessions.retain(|&s| s != x);
            if sessions.is_empty() {
                // The room message's sender is this user's only session: it has the message.
                self.finish(now, did, Outcome::Delivered, out);
                return;
            }
        }
        if !sessions.is_empty() {
            for session in sessions {
                self.push_to(now, did, session, true, out);
            }
            return;
        }
        // Not held: `offline` at once.
        if transient {
            self.finish(now, did, Outcome::Failed(FailReason::Offline), out);
            return;
        }
        let user = self.users.entry(to.clone()).or_default();
        if user.held.len() >= self.cfg.max_held_per_user {
            self.finish(now, did, Outcome::Failed(FailReason::Offline), out);
            self.forget_user_if_idle(&to);
            return;
        }
        user.held.push_back(did);
        let until = now + self.cfg.hold;
        d_mut(&mut self.deliveries, did).held_until = Some(until);
        self.held_count += 1;
        self.metrics.held.set(self.held_count as i64);
        self.timers.push(Reverse((until, Timer::HoldExpiry(did))));
    }

    /// Pushes a delivery to one session with a new `seq`. With `bounded`, a session over its
    /// un-acked bound is marked slow.
    fn push_to(
        &mut self,
        now: Instant,
        did: DeliveryId,
        session: SessionId,
        bounded: bool,
        out: &mut Vec<Action>,
    ) {
        let max_unacked = self.cfg.max_unacked_per_session;
        let deadline = now + self.cfg.ack_timeout;
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let seq = s.next_seq;
        s.next_seq += 1;
        s.pending.insert(
            seq,
            Pending {
                delivery: did,
                retries: 0,
                deadline,
            },
        );
        let slow = bounded && s.pending.len() > max_unacked;
        let d = d_mut(&mut self.deliveries, did);
        d.pushes.push((session, seq));
        out.push(Action::Push {
            session,
            frame: msg_frame(seq, &d.msg),
        });
        self.metrics.messages_out.inc();
        self.timers
            .push(Reverse((deadline, Timer::Retry(session, seq))));
        if slow && !self.slow.contains(&session) {
            self.slow.push(session);
        }
    }

    /// Closes the sessions found slow while handling the last input.
    fn close_slow(&mut self, now: Instant, out: &mut Vec<Action>) {
        while let Some(session) = self.slow.pop() {
            if self.sessions.contains_key(&session) {
                self.metrics.slow_consumers.inc();
                out.push(Action::Close {
                    session,
                    reason: CloseReason::SlowConsumer,
                });
                self.drop_session(now, session, out);
            }
        }
    }

    fn retry(
        &mut self,
        now: Instant,
        at: Instant,
        session: SessionId,
        seq: u64,
        out: &mut Vec<Action>,
    ) {
        let max_retries = self.cfg.max_retries;
        let ack_timeout = self.cfg.ack_timeout;
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some(p) = s.pending.get_mut(&seq) else {
            return;
        };
        if p.deadline != at {
            return;
        }
        let transient = self
            .deliveries
            .get(&p.delivery)
            .is_some_and(|d| d.msg.transient);
        if p.retries < max_retries && !transient {
            p.retries += 1;
            p.deadline = now + ack_timeout;
            let deadline = p.deadline;
            let did = p.delivery;
            let d = &self.deliveries[&did];
            out.push(Action::Push {
                session,
                frame: msg_frame(seq, &d.msg),
            });
            self.metrics.retries.inc();
            self.timers
                .push(Reverse((deadline, Timer::Retry(session, seq))));
            return;
        }
        let did = p.delivery;
        s.pending.remove(&seq);
        let d = d_mut(&mut self.deliveries, did);
        d.pushes.retain(|&(ss, sq)| !(ss == session && sq == seq));
        if d.pushes.is_empty() {
            self.finish(now, did, Outcome::Failed(FailReason::Timeout), out);
        }
    }

    /// Ends a delivery: tells every waiter, cancels the other pushes, updates dedup.
    fn finish(&mut self, now: Instant, did: DeliveryId, outcome: Outcome, out: &mut Vec<Action>) {
        let Some(d) = self.deliveries.remove(&did) else {
            return;
        };
        self.release_body(&d.msg.body);
        for (session, seq) in &d.pushes {
            if let Some(s) = self.sessions.get_mut(session) {
                s.pending.remove(seq);
            }
        }
        let key = dedup_key(&d.msg);
        match outcome {
            _ if d.msg.transient => {
                if let Outcome::Failed(reason) = outcome {
                    self.metrics.failed(reason);
                } else {
                    self.metrics.delivered.inc();
                }
            }
            Outcome::Delivered => {
                self.metrics.delivered.inc();
                let until = now + self.cfg.dedup_window;
                self.dedup.insert(key.clone(), Dedup::Delivered(until));
                self.dedup_order.push_back((until, key));
                while self.dedup.len() > self.cfg.max_dedup_entries {
                    let Some((at, old)) = self.dedup_order.pop_front() else {
                        break;
                    };
                    if matches!(self.dedup.get(&old), Some(Dedup::Delivered(t)) if *t == at) {
                        self.dedup.remove(&old);
                    }
                }
            }
            Outcome::Failed(reason) => {
                self.metrics.failed(reason);
                self.dedup.remove(&key);
            }
        }
        if self.cfg.report_offline
            && outcome == Outcome::Failed(FailReason::Offline)
            && !d.msg.transient
        {
            self.offline.push(d.msg.clone());
        }
        for waiter in d.waiters {
            self.report(waiter, &d.msg, outcome, out);
        }
    }

    fn report(&mut self, waiter: Waiter, msg: &Message, outcome: Outcome, out: &mut Vec<Action>) {
        match waiter {
            Waiter::Session(session) => self.outcome(session, &msg.id, &msg.to, outcome, out),
            other => out.push(Action::Report {
                waiter: other,
                from: msg.from.clone(),
                id: msg.id.clone(),
                to: msg.to.clone(),
                outcome,
            }),
        }
    }

    fn forget_user_if_idle(&mut self, uid: &Arc<str>) {
        if let Entry::Occupied(e) = self.users.entry(uid.clone())
            && e.get().sessions.is_empty()
            && e.get().held.is_empty()
        {
            e.remove();
        }
    }
}

/// The identity of a shared body: the address of its allocation (alive as long as a delivery
/// holds it, so no other body can have it meanwhile).
fn body_key(body: &Body) -> usize {
    Arc::as_ptr(body).cast::<u8>() as usize
}

fn d_mut(deliveries: &mut HashMap<DeliveryId, Delivery>, did: DeliveryId) -> &mut Delivery {
    deliveries.get_mut(&did).expect("live delivery")
}

fn msg_frame(seq: u64, msg: &Message) -> ServerFrame {
    ServerFrame::Msg {
        seq,
        from: msg.from.clone(),
        id: msg.id.clone(),
        body: msg.body.clone(),
        ts: msg.ts,
        room: msg.room.clone(),
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
