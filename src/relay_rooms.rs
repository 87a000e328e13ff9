//! Rooms in the cluster core: joins, leaves, room sends and their fan-out, room queries, and
//! the re-announcement of memberships after a ring change. Part of [`Relay`]; no IO.
//!
//! - A membership `(room, uid)` lives on the room's owner (`rooms`, keyed by room) and on the
//!   user's owner (`users`, keyed by uid). A join goes from the user's owner to the room's
//!   owner and is recorded on the user's side when the room's owner accepted it.
//! - A room send goes from the sender's node to the room's owner, which groups the members by
//!   their owner and sends **one** `RoomDeliver` per node (in chunks that fit a frame); each
//!   node delivers to its members through the engine (ack, retry, hold, dedup) and answers one
//!   `RoomTally` when every member's delivery ended. The owner sums them into the sender's one
//!   `room_result`. The body is shared by every member's delivery, never copied per member.
//! - A membership whose room and user have the same owner would die with that one node: the
//!   owner copies it to the room's successor (the next node of the room's preference list,
//!   the one that takes the room over), which keeps it aside (`spare`) and takes it in if it
//!   becomes the room's owner.
//! - After a view or link change ([`Relay::rooms_changed`]), a walk of both tables finds the
//!   entries whose other side is now another node (each entry remembers who it last told) and
//!   queues them for that node; entries this node no longer owns are handed over. The queue
//!   drains at `limits.room_sync_per_second`, so a death or a join costs a bounded rate of
//!   frames, not a storm.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Answer, Output, Relay, RequestId, sorted};
use crate::engine::{Message, NodeId, Outcome, RoomTally, Route, SessionId, Waiter};
use crate::protocol::{FailReason, ServerFrame};
use crate::rooms::{Table, room_key};
use crate::wire::{PeerFrame, RoomAnswer, SyncKind, WireMessage};

/// How long after a view or link change the tables are walked (changes that come together
/// are walked once).
const SYNC_SETTLE: Duration = Duration::from_millis(100);
/// How often the sync queue is drained while it is not empty.
const SYNC_TICK: Duration = Duration::from_millis(50);
/// Most memberships in one `RoomSync` frame.
const SYNC_FRAME: usize = 1024;
/// Bytes of a `RoomDeliver` frame left for the uids, beside the message.
const DELIVER_BUDGET: usize = crate::wire::MAX_FRAME - 8 * 1024;
/// How long a node keeps the memberships of a user or room it no longer owns, after handing
/// a copy to the owner. While views disagree (a draining node has left its own view but not
/// yet its peers'), ownership may come back here, and a copy in flight may die with its
/// receiver: entries are never moved, only copied, and dropped once they stayed another
/// node's this long.
const FOREIGN_TTL: Duration = Duration::from_secs(30);
/// Most uids listed by a room query.
pub const INFO_UIDS: usize = 1000;

/// Who gets the answer of a room request.
#[derive(Debug, Clone)]
pub(super) enum RoomWaiter {
    /// A `join` or `leave` of a local session.
    Session {
        session: SessionId,
        id: Option<Arc<str>>,
    },
    /// A room `send` of a local session (admitted: its outcome releases it).
    Send { session: SessionId, id: Arc<str> },
    /// An HTTP API request on this node.
    Api(RequestId),
    /// A peer's request: answered `RoomReply { req }`.
    Remote { node: NodeId, req: u64 },
}

/// A room request sent to a peer, waiting for its `RoomReply`.
#[derive(Debug)]
pub(super) struct Wait {
    node: NodeId,
    waiter: RoomWaiter,
    room: Arc<str>,
    /// For a join: the user to record as a member when the room's owner accepts.
    joining: Option<Arc<str>>,
    /// A leave: answered `left` even if the room's owner cannot confirm it.
    leaving: bool,
    at: Instant,
    /// Given up after this long.
    limit: Duration,
}

/// A fan-out (or a room query) on the room's owner, waiting for the members' nodes.
#[derive(Debug)]
pub(super) struct Gather {
    waiter: RoomWaiter,
    room: Arc<str>,
    tally: RoomTally,
    /// Per node: chunks and members not answered yet.
    parts: BTreeMap<NodeId, Part>,
    /// For a room query: the uids to list.
    info: Option<Vec<Arc<str>>>,
    at: Instant,
}

#[derive(Debug, Default)]
struct Part {
    chunks: u32,
    members: u32,
}

/// Where a batch's tally goes.
#[derive(Debug, Clone)]
enum BatchReply {
    Peer { node: NodeId, tag: u64 },
    Local(u64),
}

/// The deliveries of one chunk of a fan-out on a member's node.
#[derive(Debug)]
pub(super) struct Batch {
    reply: BatchReply,
    tally: RoomTally,
    remaining: u32,
    at: Instant,
}

/// Entries a walk looks at in one slice (one timer turn of the driver).
pub(super) const WALK_SLICE: usize = 20_000;

/// A walk of the tables under way: the outer keys it has still to look at.
#[derive(Debug, Default)]
pub(super) struct Walk {
    /// Peers whose link came up again since the last walk began.
    resync: HashSet<NodeId>,
    spare: VecDeque<Arc<str>>,
    users: VecDeque<Arc<str>>,
    rooms: VecDeque<Arc<str>>,
}

/// Members of one node, in one frame: the node and their uids.
type Chunk = (NodeId, Vec<Arc<str>>);

/// A membership to announce or hand over: what kind, room, uid.
type SyncEntry = (SyncKind, Arc<str>, Arc<str>);

/// Room state of a relay.
#[derive(Debug, Default)]
pub(super) struct RoomState {
    /// Rooms this node owns: room -> uid -> the member's owner last told.
    pub(super) rooms: Table,
    /// Users this node owns: uid -> room -> the room's owner last told.
    pub(super) users: Table,
    /// Copies kept for rooms whose successor this node is: room -> uid -> the room's owner.
    pub(super) spare: Table,
    waits: HashMap<u64, Wait>,
    gathers: HashMap<u64, Gather>,
    batches: HashMap<u64, Batch>,
    /// When to walk the tables after a change.
    sync_due: Option<Instant>,
    /// Peers whose link came up again: everything told to them is told again.
    resync: HashSet<NodeId>,
    /// Users (`false`) and rooms (`true`) kept here while another node owns them, since when
    /// (see [`FOREIGN_TTL`]).
    foreign: HashMap<(bool, Arc<str>), Instant>,
    /// When the next foreign entries expire (a walk then drops them).
    purge_due: Option<Instant>,
    /// The walk under way, and when its next slice is due.
    walk: Option<Walk>,
    walk_at: Option<Instant>,
    queue: BTreeMap<NodeId, VecDeque<SyncEntry>>,
    queued: usize,
    drain_at: Option<Instant>,
    tokens: f64,
    refilled: Option<Instant>,
}

impl RoomState {
    /// Room work in flight: requests, fan-outs, batches, and memberships to announce.
    pub(super) fn in_flight(&self) -> usize {
        self.waits.len()
            + self.gathers.len()
            + self.batches.len()
            + self.queued
            + usize::from(self.sync_due.is_some())
            + usize::from(self.walk.is_some())
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        [self.sync_due, self.drain_at, self.purge_due, self.walk_at]
            .into_iter()
            .flatten()
            .min()
    }
}

fn target_of(route: Route, me: &NodeId) -> Option<NodeId> {
    match route {
        Route::Local => Some(me.clone()),
        Route::Remote(n) => Some(n),
        Route::Unreachable => None,
    }
}

/// `uids` cut into chunks whose names fit a frame beside a message of `msg_bytes`.
fn chunks(uids: Vec<Arc<str>>, msg_bytes: usize) -> Vec<Vec<Arc<str>>> {
    let budget = DELIVER_BUDGET.saturating_sub(msg_bytes).max(1024);
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut used = 0;
    for uid in uids {
        let n = uid.len() + 2;
        if used + n > budget && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
            used = 0;
        }
        used += n;
        cur.push(uid);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

impl Relay {
    // ----- reading ------------------------------------------------------------------------

    /// The rooms `uid` is a member of, as its owner (this node) knows them.
    pub fn rooms_of(&self, uid: &str) -> Vec<Arc<str>> {
        self.rooms.users.inner(uid)
    }

    /// The members of `room`, as its owner (this node) knows them.
    pub fn members_of(&self, room: &str) -> Vec<Arc<str>> {
        self.rooms.rooms.inner(room)
    }

    /// Memberships kept here as rooms' owner, as users' owner, and as a room's successor.
    pub fn membership_counts(&self) -> (usize, usize, usize) {
        (
            self.rooms.rooms.len(),
            self.rooms.users.len(),
            self.rooms.spare.len(),
        )
    }

    /// The room's successor after `owner`: the next node of its preference list that is
    /// this node or reachable.
    fn successor(&self, room: &str, owner: &NodeId) -> Option<NodeId> {
        let pref = self.view.ring.preference(&room_key(room));
        let at = pref.iter().position(|n| n == owner)?;
        pref.into_iter()
            .skip(at + 1)
            .find(|n| *n == self.me || self.reachable.contains(n))
    }

    /// A membership of a room owned here whose user is owned here too: copied to the room's
    /// successor (recorded as `told`), so that this node's death does not lose it.
    fn back_up(&mut self, now: Instant, room: &Arc<str>, uid: &Arc<str>) {
        let me = self.me.clone();
        let successor = self.successor(room, &me);
        self.rooms.rooms.set_told(
            room,
            uid,
            Some(successor.clone().unwrap_or_else(|| me.clone())),
        );
        if let Some(s) = successor {
            self.enqueue(now, s, SyncKind::Backup, room.clone(), uid.clone());
        }
    }

    /// Room requests, fan-outs and batches waiting, and memberships queued to announce.
    pub fn room_work(&self) -> usize {
        self.rooms.in_flight()
    }

    // ----- API requests -------------------------------------------------------------------

    /// Adds (`join`) or removes a membership for the HTTP API; answered
    /// [`Answer::Room`] (`Joined`, `Left` or `Refused`) to the returned request.
    pub fn room_member(&mut self, now: Instant, room: &str, uid: &str, join: bool) -> RequestId {
        self.arm_sweep(now);
        let (req, open) = self.open_request(now);
        if open {
            let room: Arc<str> = Arc::from(room);
            let uid: Arc<str> = Arc::from(uid);
            let waiter = RoomWaiter::Api(req);
            match self.route(&uid) {
                Route::Local if join => self.join(now, waiter, uid, room),
                Route::Local => self.leave(now, waiter, uid, room),
                Route::Remote(node) => {
                    let r = room.clone();
                    self.ask_peer(now, node, waiter, &r, |req| PeerFrame::RoomMember {
                        req,
                        room,
                        uid,
                        join,
                    })
                }
                Route::Unreachable => self.unanswered(req),
            }
        }
        self.carry_out(now);
        req
    }

    /// A room push from the HTTP API (`from` is `$system`, `room` set); answered
    /// [`Answer::Room`] with the result.
    pub fn room_push(&mut self, now: Instant, msg: Message) -> RequestId {
        self.arm_sweep(now);
        let (req, open) = self.open_request(now);
        if open {
            self.room_send(now, RoomWaiter::Api(req), msg, true);
        }
        self.carry_out(now);
        req
    }

    /// The room as its owner sees it: answered [`Answer::Room`] with `Info`.
    pub fn room_info(&mut self, now: Instant, room: &str) -> RequestId {
        self.arm_sweep(now);
        let (req, open) = self.open_request(now);
        if open {
            let room: Arc<str> = Arc::from(room);
            match self.route(&room_key(&room)) {
                Route::Local => self.info_gather(now, RoomWaiter::Api(req), room),
                Route::Remote(node) => {
                    let r = room.clone();
                    let waiter = RoomWaiter::Api(req);
                    self.ask_peer(now, node, waiter, &r, |req| PeerFrame::RoomQuery {
                        req,
                        room,
                    })
                }
                Route::Unreachable => self.unanswered(req),
            }
        }
        self.carry_out(now);
        req
    }

    /// Asks `node` with the frame `make` builds from a fresh request number; its `RoomReply`
    /// goes to `waiter` (given up after `ask_timeout`).
    fn ask_peer(
        &mut self,
        now: Instant,
        node: NodeId,
        waiter: RoomWaiter,
        room: &Arc<str>,
        make: impl FnOnce(u64) -> PeerFrame,
    ) {
        let req = self.next_tag();
        if self.room_wait(now, req, &node, waiter, room, None, self.cfg.ask_timeout) {
            let frame = make(req);
            self.out.push_back(Output::Peer { node, frame });
        }
    }

    /// API request `req` cannot be asked of anyone: answered `Unanswered`.
    fn unanswered(&mut self, req: RequestId) {
        self.requests.remove(&req);
        self.answer(req, Answer::Unanswered);
    }

    /// A request number for an API request, registered; `false` (answered `Busy`) when too many
    /// wait already.
    fn open_request(&mut self, now: Instant) -> (RequestId, bool) {
        let req = self.next_tag();
        if self.requests.len() >= self.cfg.max_requests {
            self.answer(req, Answer::Busy);
            return (req, false);
        }
        self.requests.insert(
            req,
            super::Request {
                asked: None,
                at: now,
            },
        );
        (req, true)
    }

    // ----- client frames ------------------------------------------------------------------

    pub(super) fn client_join(
        &mut self,
        now: Instant,
        session: SessionId,
        room: String,
        id: Option<String>,
        join: bool,
    ) {
        let Some(uid) = self.engine.session_uid(session).cloned() else {
            return;
        };
        let waiter = RoomWaiter::Session {
            session,
            id: id.map(|i| Arc::from(i.as_str())),
        };
        let room: Arc<str> = Arc::from(room.as_str());
        if join {
            self.join(now, waiter, uid, room);
        } else {
            self.leave(now, waiter, uid, room);
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn client_room_send(
        &mut self,
        now: Instant,
        session: SessionId,
        id: String,
        room: String,
        body: crate::protocol::Body,
        ts: u64,
        transient: bool,
    ) {
        let id: Arc<str> = Arc::from(id.as_str());
        let room: Arc<str> = Arc::from(room.as_str());
        let from = match self.engine.admit(now, session, &id) {
            Ok(uid) => uid,
            Err(None) => return,
            Err(Some(reason)) => {
                self.metrics.failed(reason);
                let frame = ServerFrame::RoomFailed {
                    id: Some(id),
                    room,
                    reason,
                };
                self.out.push_back(Output::Session { session, frame });
                return;
            }
        };
        let waiter = RoomWaiter::Send {
            session,
            id: id.clone(),
        };
        // A user this node does not know as a member may still be one: after a ring change the
        // room's owner can know it before this node does. The room's owner decides.
        let vouched = self.rooms.users.contains(&from, &room);
        let msg = Message {
            from,
            id,
            to: room.clone(),
            body,
            ts,
            transient,
            room: Some(room),
            except: Some(session),
        };
        self.room_send(now, waiter, msg, vouched);
    }

    // ----- joins and leaves (on the user's owner) ------------------------------------------

    fn join(&mut self, now: Instant, waiter: RoomWaiter, uid: Arc<str>, room: Arc<str>) {
        let member = self.rooms.users.contains(&uid, &room);
        if !member
            && (self.rooms.users.count(&uid) >= self.cfg.max_rooms_per_user
                || self.rooms.users.len() >= self.cfg.max_room_memberships)
        {
            return self.room_answer(waiter, &room, RoomAnswer::Refused(FailReason::Limit));
        }
        match self.route(&room_key(&room)) {
            Route::Local => {
                let me = self.me.clone();
                let answer = match self.add_member(&room, &uid, Some(me.clone())) {
                    Some(n) => {
                        self.add_user_room(&uid, &room, Some(me));
                        self.back_up(now, &room, &uid);
                        self.tell_sessions(&uid, &room, &RoomAnswer::Joined(n), &waiter);
                        RoomAnswer::Joined(n)
                    }
                    None => RoomAnswer::Refused(FailReason::Limit),
                };
                self.room_answer(waiter, &room, answer);
            }
            Route::Remote(node) => {
                let req = self.next_tag();
                let limit = self.cfg.ask_timeout;
                if self.room_wait(now, req, &node, waiter, &room, Some(uid.clone()), limit) {
                    let frame = PeerFrame::RoomJoin { req, room, uid };
                    self.out.push_back(Output::Peer { node, frame });
                }
            }
            Route::Unreachable => {
                self.room_answer(waiter, &room, RoomAnswer::Refused(FailReason::Unreachable))
            }
        }
    }

    /// Ends a membership: at once on this side (no more sends); answered `left` once the
    /// room's owner forgot it too, so that no room message sent after the answer reaches
    /// the user. An owner that cannot be asked does not stop the answer (see docs/ROOMS.md).
    fn leave(&mut self, now: Instant, waiter: RoomWaiter, uid: Arc<str>, room: Arc<str>) {
        let was = self.rooms.users.remove(&uid, &room);
        if was {
            self.tell_sessions(&uid, &room, &RoomAnswer::Left, &waiter);
        }
        match self.route(&room_key(&room)) {
            Route::Local => {
                self.rooms.rooms.remove(&room, &uid);
                // The successor may keep a copy.
                let me = self.me.clone();
                if let Some(node) = self.successor(&room, &me).filter(|s| *s != me) {
                    let frame = PeerFrame::RoomLeave {
                        req: 0,
                        room: room.clone(),
                        uid: uid.clone(),
                    };
                    self.out.push_back(Output::Peer { node, frame });
                }
                self.room_answer(waiter, &room, RoomAnswer::Left);
            }
            Route::Remote(node) => {
                let req = self.next_tag();
                let limit = self.cfg.ask_timeout;
                if self.room_wait(now, req, &node, waiter, &room, None, limit) {
                    if let Some(w) = self.rooms.waits.get_mut(&req) {
                        w.leaving = true;
                    }
                    let frame = PeerFrame::RoomLeave { req, room, uid };
                    self.out.push_back(Output::Peer { node, frame });
                }
            }
            Route::Unreachable => self.room_answer(waiter, &room, RoomAnswer::Left),
        }
    }

    /// A request to a peer that cannot be answered: a leave still ends in `left` (this side
    /// forgot the membership); anything else fails `unreachable`.
    fn give_up(&mut self, w: Wait) {
        let answer = if w.leaving {
            tracing::warn!(node = %w.node, room = %w.room, "a leave the room's owner did not confirm");
            RoomAnswer::Left
        } else {
            RoomAnswer::Refused(FailReason::Unreachable)
        };
        self.room_answer(w.waiter, &w.room, answer);
    }

    /// Adds a member to a room owned here; the room's member count, or `None` over a limit.
    fn add_member(&mut self, room: &Arc<str>, uid: &Arc<str>, told: Option<NodeId>) -> Option<u32> {
        let n = self.rooms.rooms.add(
            room,
            uid,
            told,
            self.cfg.max_members_per_room,
            self.cfg.max_room_memberships,
        )?;
        Some(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// Records a membership of a user owned here (no per-user bound: the join checked it, and
    /// a re-announced membership must not be lost to it).
    fn add_user_room(&mut self, uid: &Arc<str>, room: &Arc<str>, told: Option<NodeId>) {
        let max = self.cfg.max_room_memberships;
        if self
            .rooms
            .users
            .add(uid, room, told, usize::MAX, max)
            .is_none()
        {
            tracing::warn!(%uid, %room, "membership not kept: limits.max_room_memberships reached");
        }
    }

    /// Registers a request to `node`; `false` (and the waiter answered `rate_limited`) when
    /// too many wait.
    #[allow(clippy::too_many_arguments)]
    fn room_wait(
        &mut self,
        now: Instant,
        req: u64,
        node: &NodeId,
        waiter: RoomWaiter,
        room: &Arc<str>,
        joining: Option<Arc<str>>,
        limit: Duration,
    ) -> bool {
        if self.rooms.waits.len() >= self.cfg.max_forwards {
            self.room_answer(waiter, room, RoomAnswer::Refused(FailReason::RateLimited));
            return false;
        }
        let wait = Wait {
            node: node.clone(),
            waiter,
            room: room.clone(),
            joining,
            leaving: false,
            at: now,
            limit,
        };
        self.rooms.waits.insert(req, wait);
        true
    }

    /// A membership of `uid` began or ended: its live sessions here (but the one that asked,
    /// which gets the answer) hear `joined` / `left` without an id.
    fn tell_sessions(
        &mut self,
        uid: &str,
        room: &Arc<str>,
        answer: &RoomAnswer,
        waiter: &RoomWaiter,
    ) {
        let asking = match waiter {
            RoomWaiter::Session { session, .. } => Some(*session),
            _ => None,
        };
        for session in self.engine.sessions_of(uid) {
            if Some(session) == asking {
                continue;
            }
            let frame = match answer {
                RoomAnswer::Joined(members) => ServerFrame::Joined {
                    room: room.clone(),
                    members: *members,
                    id: None,
                },
                RoomAnswer::Left => ServerFrame::Left {
                    room: room.clone(),
                    id: None,
                },
                _ => return,
            };
            self.out.push_back(Output::Session { session, frame });
        }
    }

    /// Answers a room request.
    fn room_answer(&mut self, waiter: RoomWaiter, room: &Arc<str>, answer: RoomAnswer) {
        let room = room.clone();
        match waiter {
            RoomWaiter::Session { session, id } => {
                let frame = match answer {
                    RoomAnswer::Joined(members) => ServerFrame::Joined { room, members, id },
                    RoomAnswer::Left => ServerFrame::Left { room, id },
                    RoomAnswer::Refused(reason) => ServerFrame::RoomFailed { id, room, reason },
                    _ => return,
                };
                self.out.push_back(Output::Session { session, frame });
            }
            RoomWaiter::Send { session, id } => {
                let result = match answer {
                    RoomAnswer::Result(tally) => Ok(tally),
                    RoomAnswer::Refused(reason) => {
                        self.metrics.failed(reason);
                        Err(reason)
                    }
                    _ => Err(FailReason::Invalid),
                };
                self.engine
                    .room_outcome(session, &id, &room, result, &mut self.actions);
            }
            RoomWaiter::Api(req) => {
                if self.requests.remove(&req).is_some() {
                    self.answer(req, Answer::Room(answer));
                }
            }
            RoomWaiter::Remote { node, req } => {
                let frame = PeerFrame::RoomReply { req, answer };
                self.out.push_back(Output::Peer { node, frame });
            }
        }
    }

    // ----- room sends ---------------------------------------------------------------------

    /// Sends a room message (its `room` set) to the room's owner, or fans it out here.
    /// `vouched`: the sender is known here as a member (or is the backend).
    fn room_send(&mut self, now: Instant, waiter: RoomWaiter, msg: Message, vouched: bool) {
        let room = msg.room.clone().expect("a room message");
        match self.route(&room_key(&room)) {
            Route::Local => {
                let me = self.me.clone();
                let from = msg.from.clone();
                let learnt = !vouched && self.rooms.rooms.contains(&room, &from);
                self.fan_out(now, waiter, msg, &me, vouched);
                if learnt {
                    self.add_user_room(&from, &room, Some(me));
                }
            }
            Route::Remote(node) => {
                let req = self.next_tag();
                let limit = self.forward_max_age;
                // An unvouched sender is recorded as a member if the room's owner says so.
                let learn = (!vouched).then(|| msg.from.clone());
                if self.room_wait(now, req, &node, waiter, &room, learn, limit) {
                    let frame = PeerFrame::RoomSend {
                        req,
                        msg: WireMessage::from_room_message(&msg, &room),
                        transient: msg.transient,
                        except: msg.except,
                        vouched,
                    };
                    self.metrics.messages_forwarded.inc();
                    self.out.push_back(Output::Peer { node, frame });
                }
            }
            Route::Unreachable => {
                self.room_answer(waiter, &room, RoomAnswer::Refused(FailReason::Unreachable))
            }
        }
    }

    /// On the room's owner: one `RoomDeliver` per node with members (per chunk that fits a
    /// frame); the members here go to a local batch. `from_node` is the sender's node, the
    /// only one whose frame carries the sending session to leave out.
    fn fan_out(
        &mut self,
        now: Instant,
        waiter: RoomWaiter,
        msg: Message,
        from_node: &NodeId,
        vouched: bool,
    ) {
        let room = msg.room.clone().expect("a room message");
        self.metrics.room_sends.inc();
        if &*msg.from != crate::uid::SYSTEM_SENDER && !self.rooms.rooms.contains(&room, &msg.from) {
            if !vouched {
                return self.room_answer(waiter, &room, RoomAnswer::Refused(FailReason::Forbidden));
            }
            // The sender's owner vouches for the membership (it checked it): this side had not
            // heard of it yet (a re-announcement on its way).
            if self
                .add_member(&room, &msg.from, Some(from_node.clone()))
                .is_none()
            {
                return self.room_answer(waiter, &room, RoomAnswer::Refused(FailReason::Limit));
            }
            if *from_node == self.me {
                let from = msg.from.clone();
                self.back_up(now, &room, &from);
            }
        }
        let Some(members) = self.rooms.rooms.entries_of(&room) else {
            return self.room_answer(waiter, &room, RoomAnswer::Result(RoomTally::default()));
        };
        let mut tally = RoomTally {
            members: u32::try_from(members.len()).unwrap_or(u32::MAX),
            ..RoomTally::default()
        };
        let mut by_node: BTreeMap<NodeId, Vec<Arc<str>>> = BTreeMap::new();
        for uid in members.keys() {
            match target_of(self.route(uid), &self.me) {
                Some(node) => by_node.entry(node).or_default().push(uid.clone()),
                None => tally.failed += 1,
            }
        }
        let msg_bytes = msg.body.get().len() + msg.id.len() + msg.from.len() + room.len();
        let gather = Gather {
            waiter,
            room: room.clone(),
            tally,
            parts: BTreeMap::new(),
            info: None,
            at: now,
        };
        let Some((tag, sends)) = self.open_gather(gather, by_node, msg_bytes) else {
            return;
        };
        let wire = WireMessage::from_room_message(&msg, &room);
        for (node, uids) in sends {
            let except = if &node == from_node { msg.except } else { None };
            if node == self.me {
                self.local_batch(now, BatchReply::Local(tag), &msg, uids, except);
            } else {
                let frame = PeerFrame::RoomDeliver {
                    tag,
                    msg: wire.clone(),
                    transient: msg.transient,
                    uids,
                    except,
                };
                self.out.push_back(Output::Peer { node, frame });
            }
        }
    }

    /// Cuts each node's members into chunks that fit a frame beside `msg_bytes`, counted in
    /// the gather's parts, and registers the gather under a fresh tag: the tag and the chunks
    /// to send. With no member on any node the gather is answered at once (`None`).
    fn open_gather(
        &mut self,
        mut gather: Gather,
        by_node: BTreeMap<NodeId, Vec<Arc<str>>>,
        msg_bytes: usize,
    ) -> Option<(u64, Vec<Chunk>)> {
        let mut sends = Vec::new();
        for (node, uids) in by_node {
            for chunk in chunks(sorted(uids), msg_bytes) {
                let part = gather.parts.entry(node.clone()).or_default();
                part.chunks += 1;
                part.members += u32::try_from(chunk.len()).unwrap_or(u32::MAX);
                sends.push((node.clone(), chunk));
            }
        }
        if gather.parts.is_empty() {
            self.finish_gather(gather);
            return None;
        }
        let tag = self.next_tag();
        self.rooms.gathers.insert(tag, gather);
        Some((tag, sends))
    }

    /// Delivers a room message to `uids` (members owned here, as the room's owner sees it):
    /// each through the engine with the batch as waiter; one tally goes back when all ended.
    fn local_batch(
        &mut self,
        now: Instant,
        reply: BatchReply,
        msg: &Message,
        uids: Vec<Arc<str>>,
        except: Option<SessionId>,
    ) {
        let n = u32::try_from(uids.len()).unwrap_or(u32::MAX);
        let tally = RoomTally {
            members: n,
            ..RoomTally::default()
        };
        if n == 0 {
            return self.batch_done(reply, tally);
        }
        let bid = self.next_tag();
        let batch = Batch {
            reply,
            tally,
            remaining: n,
            at: now,
        };
        self.rooms.batches.insert(bid, batch);
        for uid in uids {
            let m = Message {
                to: uid.clone(),
                except: if uid == msg.from { except } else { None },
                ..msg.clone()
            };
            match self.route(&uid) {
                Route::Local => {
                    self.engine
                        .deliver(now, m, Waiter::Batch(bid), &mut self.actions);
                    self.note_local(&uid);
                }
                Route::Remote(node) => self.forward(node, m, vec![Waiter::Batch(bid)], 1, now),
                Route::Unreachable => self.unreachable(vec![Waiter::Batch(bid)], &m.id, &m.to),
            }
        }
    }

    /// One member's delivery of batch `bid` ended.
    pub(super) fn batch_count(&mut self, bid: u64, outcome: Outcome) {
        let Some(b) = self.rooms.batches.get_mut(&bid) else {
            return;
        };
        b.tally.count(outcome);
        b.remaining -= 1;
        if b.remaining == 0 {
            let b = self.rooms.batches.remove(&bid).expect("present");
            self.batch_done(b.reply, b.tally);
        }
    }

    fn batch_done(&mut self, reply: BatchReply, tally: RoomTally) {
        match reply {
            BatchReply::Peer { node, tag } => {
                let frame = PeerFrame::RoomTally { tag, tally };
                self.out.push_back(Output::Peer { node, frame });
            }
            BatchReply::Local(tag) => {
                let me = self.me.clone();
                self.gather_part(tag, &me, tally);
            }
        }
    }

    /// A node's tally for one chunk of a fan-out or query.
    fn gather_part(&mut self, tag: u64, node: &NodeId, tally: RoomTally) {
        let Some(g) = self.rooms.gathers.get_mut(&tag) else {
            return;
        };
        let Some(part) = g.parts.get_mut(node) else {
            return;
        };
        part.chunks -= 1;
        part.members = part.members.saturating_sub(tally.members);
        g.tally.add(&tally);
        if part.chunks == 0 {
            // Members the node did not account for count as failed.
            g.tally.failed += part.members;
            g.parts.remove(node);
        }
        if g.parts.is_empty() {
            let g = self.rooms.gathers.remove(&tag).expect("present");
            self.finish_gather(g);
        }
    }

    fn finish_gather(&mut self, g: Gather) {
        let answer = match g.info {
            Some(uids) => RoomAnswer::Info {
                node: self.me.clone(),
                members: g.tally.members,
                online: g.tally.delivered,
                uids,
            },
            None => RoomAnswer::Result(g.tally),
        };
        self.room_answer(g.waiter, &g.room, answer);
    }

    /// On the room's owner: counts the members online, asking each member node once.
    fn info_gather(&mut self, now: Instant, waiter: RoomWaiter, room: Arc<str>) {
        let Some(members) = self.rooms.rooms.entries_of(&room) else {
            let info = RoomAnswer::Info {
                node: self.me.clone(),
                members: 0,
                online: 0,
                uids: Vec::new(),
            };
            return self.room_answer(waiter, &room, info);
        };
        let all = sorted(members.keys().cloned().collect::<Vec<_>>());
        let mut tally = RoomTally {
            members: u32::try_from(all.len()).unwrap_or(u32::MAX),
            ..RoomTally::default()
        };
        let mut by_node: BTreeMap<NodeId, Vec<Arc<str>>> = BTreeMap::new();
        for uid in &all {
            if let Some(node) = target_of(self.route(uid), &self.me) {
                if node == self.me {
                    tally.delivered += u32::from(self.engine.presence(uid) > 0);
                } else {
                    by_node.entry(node).or_default().push(uid.clone());
                }
            }
        }
        let gather = Gather {
            waiter,
            room,
            tally,
            parts: BTreeMap::new(),
            info: Some(all.into_iter().take(INFO_UIDS).collect()),
            at: now,
        };
        let Some((tag, asks)) = self.open_gather(gather, by_node, 0) else {
            return;
        };
        for (node, uids) in asks {
            let frame = PeerFrame::RoomOnline { tag, uids };
            self.out.push_back(Output::Peer { node, frame });
        }
    }

    // ----- peer frames --------------------------------------------------------------------

    /// A room frame from a peer (the relay passes only room frames here).
    pub(super) fn on_room_frame(&mut self, now: Instant, from: &NodeId, frame: PeerFrame) {
        let valid = |s: &str| crate::uid::validate_uid(s).is_ok();
        match frame {
            PeerFrame::RoomJoin { req, room, uid } => {
                let answer = if !valid(&room) || !valid(&uid) {
                    RoomAnswer::Refused(FailReason::Invalid)
                } else {
                    match self.add_member(&room, &uid, Some(from.clone())) {
                        Some(n) => RoomAnswer::Joined(n),
                        None => RoomAnswer::Refused(FailReason::Limit),
                    }
                };
                let frame = PeerFrame::RoomReply { req, answer };
                self.out.push_back(Output::Peer {
                    node: from.clone(),
                    frame,
                });
            }
            PeerFrame::RoomLeave { req, room, uid } => {
                self.rooms.rooms.remove(&room, &uid);
                self.rooms.spare.remove(&room, &uid);
                if req != 0 {
                    let frame = PeerFrame::RoomReply {
                        req,
                        answer: RoomAnswer::Left,
                    };
                    self.out.push_back(Output::Peer {
                        node: from.clone(),
                        frame,
                    });
                }
            }
            PeerFrame::RoomMember {
                req,
                room,
                uid,
                join,
            } => {
                let waiter = RoomWaiter::Remote {
                    node: from.clone(),
                    req,
                };
                if !valid(&room) || !valid(&uid) {
                    return self.room_answer(
                        waiter,
                        &room,
                        RoomAnswer::Refused(FailReason::Invalid),
                    );
                }
                if join {
                    self.join(now, waiter, uid, room);
                } else {
                    self.leave(now, waiter, uid, room);
                }
            }
            PeerFrame::RoomSend {
                req,
                msg,
                transient,
                except,
                vouched,
            } => {
                let waiter = RoomWaiter::Remote {
                    node: from.clone(),
                    req,
                };
                let room = msg.to.clone();
                match msg
                    .check(self.cfg.max_body_bytes)
                    .ok()
                    .and_then(|()| msg.into_message(transient))
                {
                    Some(mut m) => {
                        m.room = Some(room);
                        m.except = except;
                        self.fan_out(now, waiter, m, from, vouched);
                    }
                    None => {
                        tracing::warn!(peer = %from, "refused a room message from a peer");
                        self.room_answer(waiter, &room, RoomAnswer::Refused(FailReason::Invalid));
                    }
                }
            }
            PeerFrame::RoomDeliver {
                tag,
                msg,
                transient,
                uids,
                except,
            } => {
                let reply = BatchReply::Peer {
                    node: from.clone(),
                    tag,
                };
                let room = msg.to.clone();
                let n = u32::try_from(uids.len()).unwrap_or(u32::MAX);
                let checked = msg
                    .check(self.cfg.max_body_bytes)
                    .ok()
                    .and_then(|()| msg.into_message(transient));
                let Some(mut m) = checked.filter(|_| uids.iter().all(|u| valid(u))) else {
                    tracing::warn!(peer = %from, "refused a room fan-out from a peer");
                    let tally = RoomTally {
                        members: n,
                        failed: n,
                        ..RoomTally::default()
                    };
                    return self.batch_done(reply, tally);
                };
                m.room = Some(room);
                self.local_batch(now, reply, &m, uids, except);
            }
            PeerFrame::RoomOnline { tag, uids } => {
                let online = uids.iter().filter(|u| self.engine.presence(u) > 0).count();
                let tally = RoomTally {
                    members: u32::try_from(uids.len()).unwrap_or(u32::MAX),
                    delivered: u32::try_from(online).unwrap_or(u32::MAX),
                    ..RoomTally::default()
                };
                let frame = PeerFrame::RoomTally { tag, tally };
                self.out.push_back(Output::Peer {
                    node: from.clone(),
                    frame,
                });
            }
            PeerFrame::RoomTally { tag, tally } => self.gather_part(tag, from, tally),
            PeerFrame::RoomQuery { req, room } => {
                let waiter = RoomWaiter::Remote {
                    node: from.clone(),
                    req,
                };
                self.info_gather(now, waiter, room);
            }
            PeerFrame::RoomReply { req, answer } => {
                if self.rooms.waits.get(&req).is_none_or(|w| &w.node != from) {
                    return;
                }
                let w = self.rooms.waits.remove(&req).expect("present");
                match (&w.joining, &answer) {
                    (Some(uid), RoomAnswer::Joined(_)) => {
                        self.add_user_room(uid, &w.room, Some(from.clone()));
                        self.tell_sessions(uid, &w.room, &answer, &w.waiter);
                    }
                    // An unvouched sender the room's owner knows as a member.
                    (Some(uid), RoomAnswer::Result(_)) => {
                        self.add_user_room(uid, &w.room, Some(from.clone()))
                    }
                    _ => {}
                }
                self.room_answer(w.waiter, &w.room, answer);
            }
            PeerFrame::RoomSync { kind, entries } => self.on_sync(now, from, kind, entries),
            _ => {}
        }
    }

    /// Memberships announced or handed over by `from`.
    fn on_sync(
        &mut self,
        now: Instant,
        from: &NodeId,
        kind: SyncKind,
        entries: Vec<(Arc<str>, Arc<str>)>,
    ) {
        let mut elsewhere = false;
        for (room, uid) in entries {
            if crate::uid::validate_uid(&room).is_err() || crate::uid::validate_uid(&uid).is_err() {
                continue;
            }
            match kind {
                SyncKind::ToRoomOwner => {
                    elsewhere |= self.route(&room_key(&room)) != Route::Local;
                    if self.add_member(&room, &uid, Some(from.clone())).is_none() {
                        tracing::warn!(%room, %uid, "re-announced membership over the limits");
                    }
                }
                // Handed over: the other side may not know this owner yet (it may have moved
                // too), so the walk that follows tells it.
                SyncKind::RoomHandOver | SyncKind::Restore => {
                    elsewhere = true;
                    if self.add_member(&room, &uid, None).is_none() {
                        tracing::warn!(%room, %uid, "handed-over membership over the limits");
                    }
                    self.rooms.rooms.set_told(&room, &uid, None);
                }
                SyncKind::Backup => {
                    let max = self.cfg.max_room_memberships;
                    if self
                        .rooms
                        .spare
                        .add(&room, &uid, Some(from.clone()), usize::MAX, max)
                        .is_none()
                    {
                        tracing::warn!(%room, %uid, "membership copy not kept: limits.max_room_memberships reached");
                    }
                    // This node may be the room's owner already (its owner died meanwhile).
                    elsewhere |= self.route(&room_key(&room)) == Route::Local;
                }
                SyncKind::ToMemberOwner => {
                    elsewhere |= self.route(&uid) != Route::Local;
                    self.add_user_room(&uid, &room, Some(from.clone()));
                }
                SyncKind::UserHandOver => {
                    elsewhere = true;
                    self.add_user_room(&uid, &room, None);
                    self.rooms.users.set_told(&uid, &room, None);
                }
            }
        }
        if elsewhere {
            self.rooms_changed(now);
        }
    }

    // ----- failures -----------------------------------------------------------------------

    /// Fails the room requests and fan-out parts waiting on the nodes `lost` selects.
    pub(super) fn fail_room_waits(&mut self, lost: impl Fn(&NodeId) -> bool) {
        let reqs = sorted(
            self.rooms
                .waits
                .iter()
                .filter(|(_, w)| lost(&w.node))
                .map(|(r, _)| *r)
                .collect(),
        );
        for req in reqs {
            let w = self.rooms.waits.remove(&req).expect("present");
            self.give_up(w);
        }
        let tags = sorted(
            self.rooms
                .gathers
                .iter()
                .filter(|(_, g)| g.parts.keys().any(&lost))
                .map(|(t, _)| *t)
                .collect(),
        );
        for tag in tags {
            let g = self.rooms.gathers.get_mut(&tag).expect("present");
            let nodes: Vec<NodeId> = g.parts.keys().filter(|n| lost(n)).cloned().collect();
            for node in nodes {
                let part = g.parts.remove(&node).expect("present");
                g.tally.failed += part.members;
            }
            if g.parts.is_empty() {
                let g = self.rooms.gathers.remove(&tag).expect("present");
                self.finish_gather(g);
            }
        }
    }

    /// A room frame the transport refused.
    pub(super) fn room_refused(&mut self, now: Instant, node: &NodeId, frame: PeerFrame) {
        match frame {
            PeerFrame::RoomJoin { req, .. }
            | PeerFrame::RoomLeave { req, .. }
            | PeerFrame::RoomMember { req, .. }
            | PeerFrame::RoomSend { req, .. }
            | PeerFrame::RoomQuery { req, .. } => {
                if let Some(w) = self.rooms.waits.remove(&req) {
                    self.give_up(w);
                }
            }
            PeerFrame::RoomDeliver { tag, uids, .. } | PeerFrame::RoomOnline { tag, uids } => {
                let n = u32::try_from(uids.len()).unwrap_or(u32::MAX);
                let tally = RoomTally {
                    members: n,
                    failed: n,
                    ..RoomTally::default()
                };
                self.gather_part(tag, node, tally);
            }
            PeerFrame::RoomSync { kind, entries } => match kind {
                // The entries are still here: copied again at the next walk.
                SyncKind::RoomHandOver => {
                    for (room, uid) in entries {
                        self.rooms.rooms.set_told(&room, &uid, None);
                    }
                    self.rooms_changed(now);
                }
                SyncKind::UserHandOver => {
                    for (room, uid) in entries {
                        self.rooms.users.set_told(&uid, &room, None);
                    }
                    self.rooms_changed(now);
                }
                // Told again at the next walk.
                SyncKind::ToRoomOwner => {
                    for (room, uid) in entries {
                        self.rooms.users.set_told(&uid, &room, None);
                    }
                    self.rooms_changed(now);
                }
                SyncKind::ToMemberOwner | SyncKind::Backup => {
                    for (room, uid) in entries {
                        self.rooms.rooms.set_told(&room, &uid, None);
                    }
                    self.rooms_changed(now);
                }
                // The copies stay here; they go again at the next walk.
                SyncKind::Restore => {
                    self.rooms.resync.insert(node.clone());
                    self.rooms_changed(now);
                }
            },
            // Answers and leaves that cannot be sent are given up by the asking side.
            _ => {}
        }
    }

    /// Gives up room requests, fan-outs and batches that can no longer be answered in time.
    pub(super) fn sweep_rooms(&mut self, now: Instant) {
        let late = sorted(
            self.rooms
                .waits
                .iter()
                .filter(|(_, w)| now.saturating_duration_since(w.at) >= w.limit)
                .map(|(r, _)| *r)
                .collect(),
        );
        for req in late {
            let w = self.rooms.waits.remove(&req).expect("present");
            tracing::warn!(node = %w.node, room = %w.room, "no answer from a room's owner in time");
            self.give_up(w);
        }
        let max_age = self.forward_max_age;
        let late = sorted(
            self.rooms
                .gathers
                .iter()
                .filter(|(_, g)| now.saturating_duration_since(g.at) > max_age)
                .map(|(t, _)| *t)
                .collect(),
        );
        for tag in late {
            let mut g = self.rooms.gathers.remove(&tag).expect("present");
            for part in std::mem::take(&mut g.parts).into_values() {
                g.tally.failed += part.members;
            }
            self.finish_gather(g);
        }
        let late = sorted(
            self.rooms
                .batches
                .iter()
                .filter(|(_, b)| now.saturating_duration_since(b.at) > 2 * max_age)
                .map(|(t, _)| *t)
                .collect(),
        );
        for bid in late {
            let mut b = self.rooms.batches.remove(&bid).expect("present");
            b.tally.failed += b.remaining;
            self.batch_done(b.reply, b.tally);
        }
    }

    // ----- re-announcement after a ring change --------------------------------------------

    /// The view or a link changed: the tables are walked shortly.
    pub(super) fn rooms_changed(&mut self, now: Instant) {
        let empty = self.rooms.rooms.is_empty()
            && self.rooms.users.is_empty()
            && self.rooms.spare.is_empty();
        if self.rooms.sync_due.is_none() && !empty {
            self.rooms.sync_due = Some(now + SYNC_SETTLE);
        }
    }

    /// A peer's link came up: what was told to it is told again (it may have restarted).
    pub(super) fn rooms_link_up(&mut self, now: Instant, node: &NodeId) {
        self.rooms.resync.insert(node.clone());
        self.rooms_changed(now);
    }

    /// Due room timers: the walk after a change, the drain of the sync queue.
    pub(super) fn room_timers(&mut self, now: Instant) {
        let purge = self.rooms.purge_due.is_some_and(|at| now >= at);
        if purge || self.rooms.sync_due.is_some_and(|at| now >= at) {
            self.rooms.sync_due = None;
            self.rooms.purge_due = None;
            self.start_walk(now);
        } else if self.rooms.walk_at.is_some_and(|at| now >= at) {
            self.walk_step(now);
        }
        if self.rooms.drain_at.is_some_and(|at| now >= at) {
            self.drain_sync(now);
        }
    }

    /// Starts a walk of the tables (a new one replaces a walk under way, which would have
    /// looked at views that changed since): entries now owned elsewhere are copied to their
    /// owner, entries whose other side moved (or whose peer came back) are announced to its
    /// new owner. The walk goes [`WALK_SLICE`] entries at a time, one slice per timer turn, so
    /// that messages and links are served in between however many memberships there are.
    fn start_walk(&mut self, now: Instant) {
        let mut resync = std::mem::take(&mut self.rooms.resync);
        if let Some(old) = self.rooms.walk.take() {
            resync.extend(old.resync);
        }
        self.rooms.walk = Some(Walk {
            resync,
            spare: self.rooms.spare.outer_keys().into(),
            users: self.rooms.users.outer_keys().into(),
            rooms: self.rooms.rooms.outer_keys().into(),
        });
        self.walk_step(now);
    }

    /// One slice of the walk.
    fn walk_step(&mut self, now: Instant) {
        let Some(mut w) = self.rooms.walk.take() else {
            self.rooms.walk_at = None;
            return;
        };
        let mut budget = WALK_SLICE;
        while budget > 0 {
            if let Some(room) = w.spare.pop_front() {
                budget = budget.saturating_sub(self.rooms.spare.count(&room).max(1));
                self.walk_spare(now, &w.resync, &room);
            } else if let Some(uid) = w.users.pop_front() {
                budget = budget.saturating_sub(self.rooms.users.count(&uid).max(1));
                self.walk_user(now, &w.resync, &uid);
            } else if let Some(room) = w.rooms.pop_front() {
                budget = budget.saturating_sub(self.rooms.rooms.count(&room).max(1));
                self.walk_room(now, &w.resync, &room);
            } else {
                break;
            }
        }
        if w.spare.is_empty() && w.users.is_empty() && w.rooms.is_empty() {
            self.rooms.walk_at = None;
            self.rooms.purge_due = self
                .rooms
                .foreign
                .values()
                .min()
                .map(|since| *since + FOREIGN_TTL);
            if self.rooms.queued > 0 {
                tracing::info!(
                    queued = self.rooms.queued,
                    "memberships to announce after a ring change"
                );
            }
        } else {
            self.rooms.walk = Some(w);
            self.rooms.walk_at = Some(now);
        }
    }

    /// Copies kept for a room whose successor this node is (or was): taken in by a new owner,
    /// kept by the successor, restored to an owner whose link came back, handed to the owner
    /// when this node is no longer its successor.
    fn walk_spare(&mut self, now: Instant, resync: &HashSet<NodeId>, room: &Arc<str>) {
        let me = self.me.clone();
        let Some(owner) = target_of(self.route(&room_key(room)), &me) else {
            return;
        };
        if owner == me {
            for uid in self.rooms.spare.take(room) {
                self.add_member(room, &uid, None);
            }
            // The room may be new here, after the walk took its list of rooms: walked now.
            self.walk_room(now, resync, room);
        } else if resync.contains(&owner) {
            // Its link came up again: it may have restarted empty. It gets the copies (and
            // backs them up here again).
            for uid in self.rooms.spare.inner(room) {
                self.enqueue(now, owner.clone(), SyncKind::Restore, room.clone(), uid);
            }
        } else if self.successor(room, &owner).as_ref() != Some(&me) {
            // No longer the successor: the owner gets them (it backs them up anew).
            for uid in self.rooms.spare.take(room) {
                self.enqueue(now, owner.clone(), SyncKind::Restore, room.clone(), uid);
            }
        }
    }

    /// A user's memberships: copied to its owner if that is another node now; else each one
    /// whose room's owner was not told (or came back) is announced to it.
    fn walk_user(&mut self, now: Instant, resync: &HashSet<NodeId>, uid: &Arc<str>) {
        let me = self.me.clone();
        let Some(owner) = target_of(self.route(uid), &me) else {
            return;
        };
        if owner != me {
            return self.copy_to_owner(now, false, uid, &owner);
        }
        self.owned_again(false, uid);
        for (room, told) in self.rooms.users.snapshot(uid) {
            let Some(target) = target_of(self.route(&room_key(&room)), &me) else {
                continue;
            };
            if told.as_ref() == Some(&target) && !resync.contains(&target) {
                continue;
            }
            self.rooms.users.set_told(uid, &room, Some(target.clone()));
            if target == me {
                // Both sides here: the room's successor gets a copy.
                if self.add_member(&room, uid, Some(me.clone())).is_some() {
                    self.back_up(now, &room, uid);
                }
            } else {
                self.enqueue(now, target, SyncKind::ToRoomOwner, room, uid.clone());
            }
        }
    }

    /// A room's members: copied to its owner if that is another node now; else each member
    /// whose owner was not told (or came back) is announced to it, and a member owned here
    /// too is copied to the room's successor.
    fn walk_room(&mut self, now: Instant, resync: &HashSet<NodeId>, room: &Arc<str>) {
        let me = self.me.clone();
        let Some(owner) = target_of(self.route(&room_key(room)), &me) else {
            return;
        };
        if owner != me {
            return self.copy_to_owner(now, true, room, &owner);
        }
        self.owned_again(true, room);
        let successor = self.successor(room, &me);
        for (uid, told) in self.rooms.rooms.snapshot(room) {
            let Some(target) = target_of(self.route(&uid), &me) else {
                continue;
            };
            // A user owned here too: the copy goes to the room's successor.
            let tell = match &successor {
                Some(s) if target == me => s.clone(),
                _ => target.clone(),
            };
            if told.as_ref() == Some(&tell) && !resync.contains(&tell) {
                continue;
            }
            self.rooms.rooms.set_told(room, &uid, Some(tell.clone()));
            if target == me {
                self.add_user_room(&uid, room, Some(me.clone()));
                if tell != me {
                    self.enqueue(now, tell, SyncKind::Backup, room.clone(), uid);
                }
            } else {
                self.enqueue(now, target, SyncKind::ToMemberOwner, room.clone(), uid);
            }
        }
    }

    /// A user (`room: false`) or room owned by `owner` now: each entry not yet handed to it
    /// is copied there; the entries stay here until they have been another node's for
    /// [`FOREIGN_TTL`].
    fn copy_to_owner(&mut self, now: Instant, room_side: bool, outer: &Arc<str>, owner: &NodeId) {
        let since = *self
            .rooms
            .foreign
            .entry((room_side, outer.clone()))
            .or_insert(now);
        let table = if room_side {
            &mut self.rooms.rooms
        } else {
            &mut self.rooms.users
        };
        if now.saturating_duration_since(since) >= FOREIGN_TTL {
            table.take(outer);
            self.rooms.foreign.remove(&(room_side, outer.clone()));
            return;
        }
        let entries = table.snapshot(outer);
        for (inner, told) in entries {
            if told.as_ref() == Some(owner) {
                continue;
            }
            let (room, uid, kind) = if room_side {
                (outer.clone(), inner.clone(), SyncKind::RoomHandOver)
            } else {
                (inner.clone(), outer.clone(), SyncKind::UserHandOver)
            };
            let table = if room_side {
                &mut self.rooms.rooms
            } else {
                &mut self.rooms.users
            };
            table.set_told(outer, &inner, Some(owner.clone()));
            self.enqueue(now, owner.clone(), kind, room, uid);
        }
    }

    /// A user or room kept as another node's is this node's again: what its entries told the
    /// other side is told again.
    fn owned_again(&mut self, room_side: bool, outer: &Arc<str>) {
        if self
            .rooms
            .foreign
            .remove(&(room_side, outer.clone()))
            .is_none()
        {
            return;
        }
        let table = if room_side {
            &mut self.rooms.rooms
        } else {
            &mut self.rooms.users
        };
        for inner in table.inner(outer) {
            table.set_told(outer, &inner, None);
        }
    }

    fn enqueue(
        &mut self,
        now: Instant,
        node: NodeId,
        kind: SyncKind,
        room: Arc<str>,
        uid: Arc<str>,
    ) {
        self.rooms
            .queue
            .entry(node)
            .or_default()
            .push_back((kind, room, uid));
        self.rooms.queued += 1;
        if self.rooms.drain_at.is_none() {
            self.rooms.drain_at = Some(now);
        }
    }

    /// Sends queued memberships, at most `limits.room_sync_per_second`.
    fn drain_sync(&mut self, now: Instant) {
        let rate = f64::from(self.cfg.room_sync_per_second.max(1));
        let burst = (rate / 10.0).max(SYNC_FRAME as f64);
        let elapsed = self.rooms.refilled.map_or(burst / rate, |t| {
            now.saturating_duration_since(t).as_secs_f64()
        });
        self.rooms.tokens = (self.rooms.tokens + elapsed * rate).min(burst);
        self.rooms.refilled = Some(now);
        let me = self.me.clone();
        let nodes: Vec<NodeId> = self.rooms.queue.keys().cloned().collect();
        for node in nodes {
            while self.rooms.tokens >= 1.0 {
                let Some(q) = self.rooms.queue.get_mut(&node) else {
                    break;
                };
                let Some(&(kind, _, _)) = q.front() else {
                    self.rooms.queue.remove(&node);
                    break;
                };
                let max = SYNC_FRAME.min(self.rooms.tokens as usize);
                let mut entries = Vec::new();
                while entries.len() < max && q.front().is_some_and(|e| e.0 == kind) {
                    let (_, room, uid) = q.pop_front().expect("peeked");
                    entries.push((room, uid));
                }
                self.rooms.queued -= entries.len();
                self.rooms.tokens -= entries.len() as f64;
                // Entries whose target is not their owner any more are dropped: the walk that
                // follows the change sends them to the new one (handed-over entries are still
                // kept here as foreign, and remember the old target).
                let mut valid = Vec::with_capacity(entries.len());
                for (room, uid) in entries {
                    let target = match kind {
                        SyncKind::ToRoomOwner | SyncKind::RoomHandOver | SyncKind::Restore => {
                            target_of(self.route(&room_key(&room)), &me)
                        }
                        SyncKind::ToMemberOwner | SyncKind::UserHandOver => {
                            target_of(self.route(&uid), &me)
                        }
                        SyncKind::Backup => self.successor(&room, &me),
                    };
                    if target.as_ref() == Some(&node) {
                        valid.push((room, uid));
                    }
                }
                if !valid.is_empty() {
                    self.metrics.room_syncs.inc_by(valid.len() as u64);
                    let frame = PeerFrame::RoomSync {
                        kind,
                        entries: valid,
                    };
                    self.out.push_back(Output::Peer {
                        node: node.clone(),
                        frame,
                    });
                }
            }
        }
        self.rooms.queue.retain(|_, q| !q.is_empty());
        self.rooms.drain_at = (self.rooms.queued > 0).then_some(now + SYNC_TICK);
    }

    /// Updates the room gauges.
    pub(super) fn room_gauges(&self) {
        let m = &self.metrics;
        m.room_members.set(self.rooms.rooms.len() as i64);
        m.user_rooms.set(self.rooms.users.len() as i64);
        m.room_state_bytes.set(
            (self.rooms.rooms.bytes() + self.rooms.users.bytes() + self.rooms.spare.bytes()) as i64,
        );
        m.room_pending.set(
            (self.rooms.waits.len() + self.rooms.gathers.len() + self.rooms.batches.len()) as i64,
        );
    }
}
