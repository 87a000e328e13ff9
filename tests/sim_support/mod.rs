//! A deterministic simulation of whole imgate clusters, built from the real cluster core.
//!
//! Each simulated node is a real [`Relay`]; nothing else of imgate runs. One seeded scheduler
//! plays everything around the relays:
//! - **time**: a virtual clock; every input carries its `now`, and each node's timer is an
//!   event at its relay's `next_deadline`;
//! - **the network**: a delay per link and direction (frames keep their order), links that are
//!   cut and heal (both ends learn after a detection delay; frames on a cut link are lost),
//!   partitions that split gossip and links alike;
//! - **membership**: each node's view is delivered after a delay of its own, so nodes disagree
//!   for a while, as gossip does; a link comes up only after a handshake delay;
//! - **faults**: kill (all state lost), restart (same id, empty state), pause (inputs wait; a
//!   long pause is seen as a failure by the others), graceful drain, join of a new node;
//! - **clients** that behave like the SDK: log in at a random node, connect to the owner it
//!   names, follow `moved`, reconnect with backoff, resend sends without an outcome with the
//!   same id, deduplicate by `(from, id)`, and ack (sometimes late, forcing retries).
//!
//! After every step the invariants are checked ([`Sim::check_step`]); at the end, the
//! quiescence invariants ([`Sim::check_end`]). A violation carries the last events as a trace.

#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use imgate::engine::{EngineConfig, NodeId, SessionId};
use imgate::metrics::Metrics;
use imgate::protocol::ServerFrame;
use imgate::relay::{Answer, ClientEvent, LinkEvent, Output, Relay, RelayConfig, SessionEnd};
use imgate::ring::Ring;
use imgate::view::{Member, View};
use imgate::wire::PeerFrame;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Virtual nanoseconds since the start of a run.
pub type T = u64;

pub const MS: T = 1_000_000;
pub const S: T = 1_000 * MS;

/// How a run is shaped; [`Plan::random`] draws one from the seed.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Nodes at the start.
    pub nodes: usize,
    /// Clients (one uid each).
    pub clients: usize,
    /// Sends per client.
    pub sends: usize,
    /// Faults, each at its time.
    pub faults: Vec<(T, Fault)>,
    /// When sends and faults stop; quiescence is checked after.
    pub busy_until: T,
    /// Per mille of frames to peers the transport refuses (a full queue), while busy.
    pub refuse_per_mille: u32,
}

/// A fault the scheduler injects.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Kill a node: it loses all state; peers see its links drop after a detection delay.
    Kill(usize),
    /// Start a killed node again (same id, empty state), or a new node if the index is new.
    Start(usize),
    /// Stop a node from handling anything for this long.
    Pause(usize, T),
    /// Drain a node and stop it, as `SIGTERM` does.
    Drain(usize),
    /// Cut the QUIC link between two nodes (gossip still flows).
    Cut(usize, usize),
    /// Heal it.
    Heal(usize, usize),
    /// Split the nodes into these two sides (gossip and links).
    Partition(Vec<usize>),
    /// End the partition.
    Unpartition,
}

impl Plan {
    /// A random plan: 3 to 5 nodes, 4 to 10 clients, and 1 to 6 faults in the first 20 s.
    pub fn random(rng: &mut StdRng) -> Plan {
        let nodes = rng.random_range(3..=5);
        let clients = rng.random_range(4..=10);
        let busy_until = 20 * S;
        let mut faults = Vec::new();
        let mut next_new = nodes;
        let count = rng.random_range(1..=6);
        for _ in 0..count {
            let at = rng.random_range(S..busy_until - 4 * S);
            let n = rng.random_range(0..nodes);
            let m = (n + rng.random_range(1..nodes)) % nodes;
            let heal_at = at + rng.random_range(200 * MS..4 * S);
            match rng.random_range(0..7) {
                0 => {
                    faults.push((at, Fault::Kill(n)));
                    if rng.random_bool(0.7) {
                        faults.push((heal_at, Fault::Start(n)));
                    }
                }
                1 => faults.push((at, Fault::Pause(n, rng.random_range(100 * MS..5 * S)))),
                2 => faults.push((at, Fault::Drain(n))),
                3 => {
                    faults.push((at, Fault::Start(next_new)));
                    next_new += 1;
                }
                4 => {
                    faults.push((at, Fault::Cut(n, m)));
                    faults.push((heal_at, Fault::Heal(n, m)));
                }
                5 => {
                    let side: Vec<usize> = (0..nodes).filter(|_| rng.random_bool(0.5)).collect();
                    faults.push((at, Fault::Partition(side)));
                    faults.push((heal_at, Fault::Unpartition));
                }
                _ => {
                    faults.push((at, Fault::Kill(n)));
                    faults.push((at + rng.random_range(0..S), Fault::Start(n)));
                }
            }
        }
        faults.sort_by_key(|(t, _)| *t);
        // One run in five also has queues towards peers that refuse frames now and then.
        let refuse_per_mille = if rng.random_bool(0.2) {
            rng.random_range(1..=20)
        } else {
            0
        };
        Plan {
            nodes,
            clients,
            sends: rng.random_range(5..=20),
            faults,
            busy_until,
            refuse_per_mille,
        }
    }

    /// How long after the faults every send and request must have ended: 30 s, or 90 s when
    /// frames are refused (a lost outcome is given up by the sender's sweep after 50 s).
    pub fn quiesce(&self) -> T {
        if self.refuse_per_mille > 0 {
            90 * S
        } else {
            QUIESCE
        }
    }

    /// The kinds of fault in this plan, for the report of the mix.
    pub fn fault_kinds(&self) -> Vec<&'static str> {
        self.faults
            .iter()
            .map(|(_, f)| match f {
                Fault::Kill(_) => "kill",
                Fault::Start(_) => "start",
                Fault::Pause(..) => "pause",
                Fault::Drain(_) => "drain",
                Fault::Cut(..) => "cut",
                Fault::Heal(..) => "heal",
                Fault::Partition(_) => "partition",
                Fault::Unpartition => "unpartition",
            })
            .chain((self.refuse_per_mille > 0).then_some("refusals"))
            .collect()
    }
}

/// What went wrong in a run.
#[derive(Debug)]
pub struct Violation {
    /// The invariant broken, with the facts.
    pub what: String,
    /// The last events before it, oldest first.
    pub trace: Vec<String>,
}

/// Per-run counters, for the report.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Stats {
    pub events: u64,
    pub sends: u64,
    pub delivered: u64,
    pub failed: u64,
    pub duplicates_dropped: u64,
    /// Room sends that got their one `room_result` or `failed`.
    pub room_results: u64,
    /// Runs whose memberships were checked (one failure at most).
    pub membership_checks: u64,
    pub moved: u64,
    pub reconnects: u64,
    pub sim_time: T,
    /// Time from the end of the faults until every send had its outcome.
    pub quiet_after: T,
    /// A hash (FNV-1a) of every trace line, when the trace is on.
    pub trace_hash: u64,
}

/// An input for a node, or something for the scheduler itself.
#[derive(Debug)]
enum Ev {
    /// A link event for node `to` (incarnation `inc`).
    Link {
        to: usize,
        inc: u64,
        event: LinkEvent,
    },
    /// A frame from `from` to `to` sent on link epoch `epoch`.
    Frame {
        from: usize,
        to: usize,
        inc: u64,
        epoch: u64,
        frame: PeerFrame,
    },
    /// Node `to` gets its current view.
    View { to: usize, inc: u64 },
    /// Node `to`'s timer.
    Timer { to: usize, inc: u64 },
    /// A client event reaching node `to` over connection `conn`.
    Client {
        to: usize,
        inc: u64,
        conn: u64,
        event: ClientEvent,
    },
    /// A server frame reaching client `client` over connection `conn`.
    ToClient {
        client: usize,
        conn: u64,
        frame: ServerFrame,
    },
    /// The server ended connection `conn` of `client`.
    EndClient {
        client: usize,
        conn: u64,
        end: SessionEnd,
    },
    /// The client acts: log in, connect, or send.
    Act { client: usize },
    /// Client acks `seq` on `conn`.
    Ack { client: usize, conn: u64, seq: u64 },
    /// A paused node resumes.
    Resume { node: usize, inc: u64 },
    /// A draining node stops.
    DrainDone { node: usize, inc: u64 },
    /// A fault of the plan.
    Fault(Fault),
    /// The backend pushes a message (`/api/push`) or asks presence, at a random node.
    Backend,
}

#[derive(Debug)]
struct Node {
    id: NodeId,
    relay: Option<Relay>,
    /// Bumped at each start; events for an older incarnation are dropped.
    inc: u64,
    paused_until: Option<T>,
    /// Inputs that arrived while paused.
    backlog: VecDeque<Ev>,
    draining: bool,
    timer_at: Option<T>,
    /// Sessions here: session -> (client, connection).
    sessions: HashMap<SessionId, (usize, u64)>,
    next_session: SessionId,
    /// Whether the view the node holds lists each node (for link dialling).
    knows: BTreeSet<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Conn {
    /// Not connected; acts (logs in) at the next `Act`.
    Idle,
    /// Connected (as far as the client knows) to `node` over `conn`.
    Live { node: usize, conn: u64 },
}

#[derive(Debug)]
struct Client {
    uid: Arc<str>,
    conn: Conn,
    /// Sends without an outcome: id -> recipient.
    pending: BTreeMap<String, usize>,
    sent: usize,
    /// Outcomes by id.
    outcomes: HashMap<String, bool>,
    /// `(from, id)` the application received.
    app: HashSet<(Arc<str>, Arc<str>)>,
    /// Per connection, the seq each `(from, id)` came with.
    seqs: HashMap<(Arc<str>, Arc<str>), u64>,
    backoff: T,
    /// Rooms whose `join` was answered `joined`, and when.
    rooms: BTreeMap<Arc<str>, T>,
    /// Rooms whose `join` has no answer yet (sent again at each act and connection).
    joining: BTreeSet<Arc<str>>,
    /// Room sends without an outcome: id -> room.
    room_sends: BTreeMap<String, Arc<str>>,
}

/// The rooms of the simulation; client `c` joins the ones [`rooms_for`] names.
const ROOMS: [&str; 2] = ["lobby", "ops"];

fn rooms_for(c: usize) -> Vec<Arc<str>> {
    let mut out = Vec::new();
    if c.is_multiple_of(2) || c == 1 {
        out.push(Arc::from(ROOMS[0]));
    }
    if c.is_multiple_of(3) || c == 1 {
        out.push(Arc::from(ROOMS[1]));
    }
    out
}

/// One simulated cluster.
pub struct Sim {
    seed: u64,
    rng: StdRng,
    now: T,
    base: Instant,
    seq: u64,
    queue: BinaryHeap<Reverse<(T, u64)>>,
    events: HashMap<u64, Ev>,
    nodes: Vec<Node>,
    clients: Vec<Client>,
    /// Link state per unordered pair: `Some(epoch)` while up.
    links: HashMap<(usize, usize), Option<u64>>,
    next_epoch: u64,
    /// Latest time an event was scheduled on each ordered channel (keeps per-channel order).
    fifo: HashMap<(u8, usize, usize), T>,
    /// Per ordered node pair, the one-way delay.
    delay: HashMap<(usize, usize), T>,
    cut: HashSet<(usize, usize)>,
    /// The side of each node while a partition lasts.
    side: Option<HashSet<usize>>,
    next_conn: u64,
    cfg: RelayConfig,
    trace: VecDeque<String>,
    pub stats: Stats,
    busy_until: T,
    sends_per_client: usize,
    /// The kinds of fault in the plan.
    pub fault_mix: Vec<&'static str>,
    /// A violation found while handling an event, reported after it.
    pending_violation: Option<String>,
    /// Link ups each node was told of, and not told down since: `(node, peer)`.
    told_up: HashSet<(usize, usize)>,
    /// The recipient of each send: `(sender uid, id)` -> client.
    recipients: HashMap<(Arc<str>, String), usize>,
    /// Whether events are written to the trace (a failing seed is run again with it).
    tracing: bool,
    /// API requests waiting for their answer: `(node, incarnation, request)` -> the push's
    /// `(id, recipient)`, or `None` for a presence question.
    requests: HashMap<(usize, u64, u64), Option<(String, usize)>>,
    /// Pushes made so far.
    pushes: u64,
    refuse_per_mille: u32,
    quiesce: T,
    /// Pushes answered `delivered`: `(id, recipient)`.
    pushes_delivered: Vec<(String, usize)>,
    /// The node the last event went to, whose invariants are checked after it.
    touched: Option<usize>,
    /// Whether the plan is one failure at most: no partition, cut or pause, and at most one
    /// kill. Memberships must survive it.
    single_failure: bool,
    /// When the first node was killed.
    killed_at: Option<T>,
}

const TRACE: usize = 400;
/// Every send must have its outcome this long after the faults stop.
pub const QUIESCE: T = 30 * S;
/// After that, this long at rest empties every table (it is over the 50 s a forward may wait).
pub const REST: T = 60 * S;
const VNODES: u32 = 16;

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

fn node_id(i: usize) -> NodeId {
    Arc::from(format!("n{}", i + 1))
}

impl Sim {
    /// A cluster for `seed` following `plan`.
    pub fn new(seed: u64, plan: &Plan, tracing: bool) -> Sim {
        let mut cfg = RelayConfig::default();
        cfg.engine = EngineConfig {
            max_dedup_entries: 4096,
            max_deliveries: 4096,
            ..cfg.engine
        };
        cfg.max_forwards = 256;
        cfg.max_requests = 64;
        let mut sim = Sim {
            seed,
            rng: StdRng::seed_from_u64(seed ^ 0x5eed),
            now: 0,
            base: Instant::now(),
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            nodes: Vec::new(),
            clients: Vec::new(),
            links: HashMap::new(),
            next_epoch: 1,
            fifo: HashMap::new(),
            delay: HashMap::new(),
            cut: HashSet::new(),
            side: None,
            next_conn: 1,
            cfg,
            trace: VecDeque::new(),
            stats: Stats::default(),
            busy_until: plan.busy_until,
            sends_per_client: plan.sends,
            fault_mix: plan.fault_kinds(),
            pending_violation: None,
            told_up: HashSet::new(),
            recipients: HashMap::new(),
            tracing,
            touched: None,
            requests: HashMap::new(),
            pushes: 0,
            pushes_delivered: Vec::new(),
            refuse_per_mille: plan.refuse_per_mille,
            quiesce: plan.quiesce(),
            single_failure: plan
                .faults
                .iter()
                .filter(|(_, f)| matches!(f, Fault::Kill(_)))
                .count()
                <= 1
                && !plan.faults.iter().any(|(_, f)| {
                    matches!(f, Fault::Partition(_) | Fault::Cut(..) | Fault::Pause(..))
                }),
            killed_at: None,
        };
        for i in 0..plan.nodes {
            sim.start_node(i);
        }
        for c in 0..plan.clients {
            sim.clients.push(Client {
                uid: Arc::from(format!("u{c}")),
                conn: Conn::Idle,
                pending: BTreeMap::new(),
                sent: 0,
                outcomes: HashMap::new(),
                app: HashSet::new(),
                seqs: HashMap::new(),
                backoff: 50 * MS,
                rooms: BTreeMap::new(),
                joining: rooms_for(c).into_iter().collect(),
                room_sends: BTreeMap::new(),
            });
            let at = sim.rng.random_range(0..S);
            sim.at(at, Ev::Act { client: c });
        }
        for (t, f) in &plan.faults {
            sim.at(*t, Ev::Fault(f.clone()));
        }
        let first = sim.rng.random_range(0..S);
        sim.at(first, Ev::Backend);
        sim
    }

    fn note(&mut self, line: impl FnOnce() -> String) {
        if !self.tracing {
            return;
        }
        if self.trace.len() == TRACE {
            self.trace.pop_front();
        }
        let t = self.now as f64 / S as f64;
        let line = format!("{t:9.4}s {}", line());
        for b in line.bytes() {
            self.stats.trace_hash =
                (self.stats.trace_hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        self.trace.push_back(line);
    }

    fn at(&mut self, t: T, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((t.max(self.now), self.seq)));
        self.events.insert(self.seq, ev);
    }

    /// Schedules on an ordered channel `(kind, a, b)`: never before what was scheduled on it.
    fn at_fifo(&mut self, chan: (u8, usize, usize), t: T, ev: Ev) {
        let last = self.fifo.get(&chan).copied().unwrap_or(0);
        let t = t.max(last);
        self.fifo.insert(chan, t);
        self.at(t, ev);
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_nanos(self.now)
    }

    fn link_delay(&mut self, a: usize, b: usize) -> T {
        if let Some(d) = self.delay.get(&(a, b)) {
            return *d;
        }
        let d = self.rng.random_range(200_000..20 * MS);
        self.delay.insert((a, b), d);
        d
    }

    fn client_delay(&mut self) -> T {
        self.rng.random_range(500_000..10 * MS)
    }

    fn alive(&self, n: usize) -> bool {
        self.nodes.get(n).is_some_and(|x| x.relay.is_some())
    }

    fn same_side(&self, a: usize, b: usize) -> bool {
        match &self.side {
            None => true,
            Some(s) => s.contains(&a) == s.contains(&b),
        }
    }

    /// The members node `n` would see once gossip settles.
    fn members_seen_by(&self, n: usize) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&m| self.alive(m) && self.same_side(n, m))
            .filter(|&m| !self.nodes[m].draining)
            .filter(|&m| self.nodes[m].paused_until.is_none() || m == n)
            .collect()
    }

    fn build_view(&self, members: &[usize]) -> Arc<View> {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut map = BTreeMap::new();
        for &m in members {
            let id = self.nodes[m].id.clone();
            map.insert(
                id.clone(),
                Member {
                    id: id.clone(),
                    url: Arc::from(format!("ws://{id}/ws")),
                    http: format!("{id}:80"),
                    quic: any,
                    gossip: any,
                    generation: self.nodes[m].inc,
                },
            );
        }
        let ids: Vec<NodeId> = members.iter().map(|&m| self.nodes[m].id.clone()).collect();
        Arc::new(View {
            members: map,
            ring: Ring::new(ids, VNODES, self.now),
        })
    }

    /// Schedules a fresh view for every live node, each after its own gossip delay.
    fn gossip(&mut self, slow: bool) {
        for n in 0..self.nodes.len() {
            if !self.alive(n) {
                continue;
            }
            let d = if slow {
                self.rng.random_range(500 * MS..3 * S)
            } else {
                self.rng.random_range(50 * MS..1500 * MS)
            };
            let inc = self.nodes[n].inc;
            let t = self.now + d;
            self.at(t, Ev::View { to: n, inc });
        }
    }

    fn start_node(&mut self, i: usize) {
        while self.nodes.len() <= i {
            let id = node_id(self.nodes.len());
            self.nodes.push(Node {
                id,
                relay: None,
                inc: 0,
                paused_until: None,
                backlog: VecDeque::new(),
                draining: false,
                timer_at: None,
                sessions: HashMap::new(),
                next_session: 1,
                knows: BTreeSet::new(),
            });
        }
        if self.alive(i) {
            return;
        }
        let metrics = Arc::new(Metrics::new());
        let relay = Relay::new(self.cfg.clone(), self.nodes[i].id.clone(), metrics);
        let node = &mut self.nodes[i];
        node.relay = Some(relay);
        node.inc += 1;
        node.draining = false;
        node.paused_until = None;
        node.backlog.clear();
        node.timer_at = None;
        node.sessions.clear();
        node.knows.clear();
        let inc = node.inc;
        self.told_up.retain(|(a, _)| *a != i);
        let id = node.id.clone();
        self.note(|| format!("start {id} (incarnation {inc})"));
        // A node starts seeing only itself; gossip brings the others.
        let view = self.build_view(&[i]);
        self.input(i, |r, now| r.handle_view(now, view));
        self.gossip(false);
    }

    fn kill_node(&mut self, i: usize, why: &str) {
        if !self.alive(i) {
            return;
        }
        let id = self.nodes[i].id.clone();
        self.note(|| format!("kill {id} ({why})"));
        self.nodes[i].relay = None;
        self.nodes[i].draining = false;
        self.nodes[i].paused_until = None;
        self.nodes[i].backlog.clear();
        // Its clients see the connection drop.
        // Sorted wherever a hash map is walked: a run must depend on its seed alone.
        let mut sessions: Vec<(usize, u64)> =
            self.nodes[i].sessions.drain().map(|(_, v)| v).collect();
        sessions.sort_unstable();
        for (client, conn) in sessions {
            let d = self.client_delay();
            self.at(
                self.now + d,
                Ev::EndClient {
                    client,
                    conn,
                    end: SessionEnd::Closed(imgate::engine::CloseReason::SlowConsumer),
                },
            );
        }
        self.relink();
        self.gossip(true);
    }

    /// Brings links up or down to match liveness, cuts, sides and views; both ends learn
    /// after a handshake (up) or detection (down) delay.
    fn relink(&mut self) {
        let n = self.nodes.len();
        for a in 0..n {
            for b in a + 1..n {
                let key = (a, b);
                let want = self.alive(a)
                    && self.alive(b)
                    && !self.cut.contains(&key)
                    && self.same_side(a, b)
                    && self.nodes[a].paused_until.is_none()
                    && self.nodes[b].paused_until.is_none()
                    && (self.nodes[a].knows.contains(&b) || self.nodes[b].knows.contains(&a));
                let up = self.links.get(&key).copied().flatten();
                match (want, up) {
                    (true, None) => {
                        let epoch = self.next_epoch;
                        self.next_epoch += 1;
                        self.links.insert(key, Some(epoch));
                        let d = self.rng.random_range(5 * MS..300 * MS);
                        self.note(|| {
                            format!("link n{}-n{} up (handshake {} ms)", a + 1, b + 1, d / MS)
                        });
                        for (x, y) in [(a, b), (b, a)] {
                            let inc = self.nodes[x].inc;
                            let ev = Ev::Link {
                                to: x,
                                inc,
                                event: LinkEvent::Up(self.nodes[y].id.clone()),
                            };
                            self.at_fifo((0, x, y), self.now + d, ev);
                        }
                    }
                    (false, Some(_)) => {
                        self.links.insert(key, None);
                        let d = self.rng.random_range(100 * MS..2 * S);
                        self.note(|| {
                            format!("link n{}-n{} down (noticed in {} ms)", a + 1, b + 1, d / MS)
                        });
                        for (x, y) in [(a, b), (b, a)] {
                            if !self.alive(x) {
                                continue;
                            }
                            let inc = self.nodes[x].inc;
                            let ev = Ev::Link {
                                to: x,
                                inc,
                                event: LinkEvent::Down(self.nodes[y].id.clone()),
                            };
                            self.at_fifo((0, x, y), self.now + d, ev);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Whether node `a`'s link to the peer named `b` is up in the network (not as `a` sees it).
    fn linked(&self, a: usize, b: &str) -> bool {
        let Some(bi) = self.nodes.iter().position(|n| &*n.id == b) else {
            return false;
        };
        self.links.get(&pair(a, bi)).copied().flatten().is_some()
    }

    fn index_of(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| &*n.id == id)
    }

    /// Feeds an input to node `n`'s relay and carries out what comes out.
    fn input(&mut self, n: usize, f: impl FnOnce(&mut Relay, Instant)) {
        let now = self.instant();
        let Some(relay) = self.nodes[n].relay.as_mut() else {
            return;
        };
        f(relay, now);
        self.touched = Some(n);
        self.outputs(n);
    }

    fn outputs(&mut self, n: usize) {
        while let Some(out) = self.nodes[n].relay.as_mut().and_then(Relay::poll_output) {
            match out {
                Output::Session { session, frame } => {
                    if let Some(&(client, conn)) = self.nodes[n].sessions.get(&session) {
                        let d = self.client_delay();
                        self.at_fifo(
                            (1, n, client),
                            self.now + d,
                            Ev::ToClient {
                                client,
                                conn,
                                frame,
                            },
                        );
                    }
                }
                Output::End { session, end } => {
                    if let Some((client, conn)) = self.nodes[n].sessions.remove(&session) {
                        let d = self.client_delay();
                        self.at_fifo(
                            (1, n, client),
                            self.now + d,
                            Ev::EndClient { client, conn, end },
                        );
                    }
                }
                Output::Peer { node, frame } => {
                    let Some(to) = self.index_of(&node) else {
                        continue;
                    };
                    let refused = self.now < self.busy_until
                        && self.refuse_per_mille > 0
                        && self.rng.random_range(0..1000) < self.refuse_per_mille;
                    match self.links.get(&pair(n, to)).copied().flatten() {
                        Some(epoch) if !refused => {
                            let d = self.link_delay(n, to);
                            let inc = self.nodes[to].inc;
                            let ev = Ev::Frame {
                                from: n,
                                to,
                                inc,
                                epoch,
                                frame,
                            };
                            self.at_fifo((2, n, to), self.now + d, ev);
                        }
                        _ => {
                            let now = self.instant();
                            if let Some(r) = self.nodes[n].relay.as_mut() {
                                r.handle_refused(now, &node, frame);
                            }
                        }
                    }
                }
                Output::Answer { req, answer } => {
                    let inc = self.nodes[n].inc;
                    match self.requests.remove(&(n, inc, req)) {
                        None => {
                            self.pending_violation = Some(format!(
                                "n{} answered request {req} ({answer:?}) that was not waiting",
                                n + 1
                            ));
                        }
                        Some(Some((id, to))) => {
                            let line = format!("n{} push {id} answered {answer:?}", n + 1);
                            self.note(|| line);
                            if answer == Answer::Outcome(imgate::engine::Outcome::Delivered) {
                                self.pushes_delivered.push((id, to));
                            }
                        }
                        Some(None) => {}
                    }
                }
                // Kick tables and webhooks are outside the core; the simulation has neither.
                Output::Kicked { .. } | Output::Offline(_) => {}
            }
        }
        self.arm_timer(n);
    }

    fn arm_timer(&mut self, n: usize) {
        let Some(relay) = self.nodes[n].relay.as_ref() else {
            return;
        };
        let Some(deadline) = relay.next_deadline() else {
            return;
        };
        let t = deadline.saturating_duration_since(self.base).as_nanos() as T;
        let t = t.max(self.now);
        if self.nodes[n]
            .timer_at
            .is_some_and(|at| at <= t && at >= self.now)
        {
            return;
        }
        self.nodes[n].timer_at = Some(t);
        let inc = self.nodes[n].inc;
        self.at(t, Ev::Timer { to: n, inc });
    }

    /// Runs until `until`, checking the step invariants after every event.
    pub fn run_until(&mut self, until: T) -> Result<(), Violation> {
        while let Some(Reverse((t, seq))) = self.queue.peek().copied() {
            if t > until {
                break;
            }
            self.queue.pop();
            let ev = self.events.remove(&seq).expect("scheduled event");
            self.now = t;
            self.stats.events += 1;
            if self.stats.events > 2_000_000 {
                return Err(self.violation("more than 2 000 000 events: a loop".into()));
            }
            self.step(ev);
            self.check_step()?;
        }
        self.now = self.now.max(until);
        Ok(())
    }

    fn target(ev: &Ev) -> Option<(usize, u64)> {
        match ev {
            Ev::Link { to, inc, .. }
            | Ev::Frame { to, inc, .. }
            | Ev::View { to, inc }
            | Ev::Timer { to, inc }
            | Ev::Client { to, inc, .. } => Some((*to, *inc)),
            _ => None,
        }
    }

    fn step(&mut self, ev: Ev) {
        if let Some((n, inc)) = Self::target(&ev) {
            if !self.alive(n) || self.nodes[n].inc != inc {
                return;
            }
            if self.nodes[n].paused_until.is_some() {
                self.nodes[n].backlog.push_back(ev);
                return;
            }
        }
        match ev {
            Ev::Link { to, event, .. } => {
                let line = format!("n{} link {:?}", to + 1, event);
                self.note(|| line);
                match &event {
                    LinkEvent::Up(p) => {
                        if let Some(p) = self.index_of(p) {
                            self.told_up.insert((to, p));
                        }
                    }
                    LinkEvent::Down(p) => {
                        if let Some(p) = self.index_of(p) {
                            self.told_up.remove(&(to, p));
                        }
                    }
                    LinkEvent::Frame { .. } => {}
                }
                self.input(to, |r, now| r.handle_link(now, event));
            }
            Ev::Frame {
                from,
                to,
                epoch,
                frame,
                ..
            } => {
                // Frames on a link that went down since (or a sender that died) are lost.
                if self.links.get(&pair(from, to)).copied().flatten() != Some(epoch) {
                    return;
                }
                let from_id = self.nodes[from].id.clone();
                let line = format!("n{} <- {from_id}: {}", to + 1, short(&frame));
                self.note(|| line);
                self.input(to, |r, now| {
                    r.handle_link(
                        now,
                        LinkEvent::Frame {
                            from: from_id,
                            frame,
                        },
                    )
                });
            }
            Ev::View { to, .. } => {
                let members = if self.nodes[to].draining {
                    self.members_seen_by(to)
                        .into_iter()
                        .filter(|&m| m != to)
                        .collect()
                } else {
                    self.members_seen_by(to)
                };
                let view = self.build_view(&members);
                let names: Vec<String> = members.iter().map(|m| format!("n{}", m + 1)).collect();
                self.note(|| format!("n{} view [{}]", to + 1, names.join(" ")));
                self.nodes[to].knows = members.iter().copied().collect();
                self.input(to, |r, now| r.handle_view(now, view));
                self.relink();
            }
            Ev::Timer { to, .. } => {
                if self.nodes[to].timer_at == Some(self.now) {
                    self.nodes[to].timer_at = None;
                }
                self.input(to, |r, now| r.handle_timeout(now));
            }
            Ev::Client {
                to, conn, event, ..
            } => self.client_event(to, conn, event),
            Ev::ToClient {
                client,
                conn,
                frame,
            } => self.client_frame(client, conn, frame),
            Ev::EndClient { client, conn, end } => {
                if self.clients[client].conn
                    == (Conn::Live {
                        node: self.conn_node(client),
                        conn,
                    })
                {
                    self.client_ended(client, end);
                }
            }
            Ev::Act { client } => self.client_act(client),
            Ev::Ack { client, conn, seq } => {
                if let Conn::Live { node, conn: c } = self.clients[client].conn
                    && c == conn
                {
                    let d = self.client_delay();
                    let session = self.session_of(node, client, conn);
                    if let Some(session) = session {
                        let inc = self.nodes[node].inc;
                        let ev = Ev::Client {
                            to: node,
                            inc,
                            conn,
                            event: ClientEvent::Ack { session, seq },
                        };
                        self.at_fifo((3, client, node), self.now + d, ev);
                    }
                }
            }
            Ev::Resume { node, inc } => {
                if self.nodes[node].inc != inc || self.nodes[node].paused_until.is_none() {
                    return;
                }
                self.note(|| format!("resume n{}", node + 1));
                self.nodes[node].paused_until = None;
                let backlog: Vec<Ev> = self.nodes[node].backlog.drain(..).collect();
                for ev in backlog {
                    self.step(ev);
                }
                self.nodes[node].timer_at = None;
                self.arm_timer(node);
                self.relink();
                self.gossip(false);
            }
            Ev::DrainDone { node, inc } => {
                if self.nodes[node].inc == inc && self.nodes[node].draining {
                    self.kill_node(node, "drained");
                }
            }
            Ev::Fault(f) => self.fault(f),
            Ev::Backend => self.backend(),
        }
    }

    /// A push or a presence question at a random serving node, as the HTTP API makes them.
    fn backend(&mut self) {
        if self.now < self.busy_until {
            let every = self.rng.random_range(50 * MS..400 * MS);
            self.at(self.now + every, Ev::Backend);
        }
        let n = self.rng.random_range(0..self.nodes.len());
        if !self.alive(n) || self.nodes[n].paused_until.is_some() {
            return;
        }
        let to = self.rng.random_range(0..self.clients.len());
        let uid = self.clients[to].uid.clone();
        let now = self.instant();
        let inc = self.nodes[n].inc;
        let relay = self.nodes[n].relay.as_mut().expect("alive");
        if self.rng.random_bool(0.7) {
            self.pushes += 1;
            let id = format!("p{}", self.pushes);
            let body: imgate::protocol::Body = Arc::from(
                serde_json::value::RawValue::from_string("{\"push\":true}".into()).expect("json"),
            );
            let msg = imgate::engine::Message {
                transient: false,
                from: Arc::from(imgate::uid::SYSTEM_SENDER),
                id: Arc::from(id.as_str()),
                to: uid,
                body,
                ts: self.now / MS,
                room: None,
                except: None,
            };
            let req = relay.push(now, msg);
            self.requests.insert((n, inc, req), Some((id.clone(), to)));
            self.note(|| format!("n{} push {id} to u{to} (request {req})", n + 1));
        } else if self.rng.random_bool(0.5) {
            let req = relay.presence(now, &uid);
            self.requests.insert((n, inc, req), None);
        } else {
            self.pushes += 1;
            let room = ROOMS[self.rng.random_range(0..ROOMS.len())];
            let id = format!("rp{}", self.pushes);
            let body: imgate::protocol::Body = Arc::from(
                serde_json::value::RawValue::from_string("{\"room\":true}".into()).expect("json"),
            );
            let msg = imgate::engine::Message {
                room: Some(Arc::from(room)),
                ..imgate::engine::Message::direct(
                    imgate::uid::SYSTEM_SENDER,
                    &id,
                    room,
                    body,
                    self.now / MS,
                )
            };
            let req = relay.room_push(now, msg);
            self.requests.insert((n, inc, req), None);
            self.note(|| format!("n{} room push {id} to {room} (request {req})", n + 1));
        }
        self.touched = Some(n);
        self.outputs(n);
    }

    /// Nodes alive and not draining, other than `n`.
    fn up_besides(&self, n: usize) -> usize {
        (0..self.nodes.len())
            .filter(|&m| m != n && self.alive(m) && !self.nodes[m].draining)
            .count()
    }

    fn conn_node(&self, client: usize) -> usize {
        match self.clients[client].conn {
            Conn::Live { node, .. } => node,
            Conn::Idle => usize::MAX,
        }
    }

    fn session_of(&self, node: usize, client: usize, conn: u64) -> Option<SessionId> {
        self.nodes[node]
            .sessions
            .iter()
            .find(|(_, v)| **v == (client, conn))
            .map(|(s, _)| *s)
    }

    fn fault(&mut self, f: Fault) {
        let line = format!("fault {f:?}");
        self.note(|| line);
        match f {
            Fault::Kill(n) => {
                // Keep one node up and not draining: a cluster with none left tests nothing.
                let others = self.up_besides(n);
                if others > 0 {
                    self.killed_at.get_or_insert(self.now);
                    self.kill_node(n, "fault");
                }
            }
            Fault::Start(n) => self.start_node(n),
            Fault::Pause(n, d) => {
                if self.alive(n) && self.nodes[n].paused_until.is_none() {
                    self.nodes[n].paused_until = Some(self.now + d);
                    let inc = self.nodes[n].inc;
                    self.at(self.now + d, Ev::Resume { node: n, inc });
                    // A long pause is seen as a failure: links time out, gossip drops it, and
                    // its clients give up on their connections (the SDK's ping timeout).
                    if d > 2 * S {
                        self.relink();
                        self.gossip(true);
                    }
                    if d > 3 * S {
                        let mut sessions: Vec<(SessionId, (usize, u64))> = self.nodes[n]
                            .sessions
                            .iter()
                            .map(|(s, v)| (*s, *v))
                            .collect();
                        sessions.sort_unstable();
                        for (session, (client, conn)) in sessions {
                            let t = self.now + 3 * S;
                            self.at(
                                t,
                                Ev::EndClient {
                                    client,
                                    conn,
                                    end: SessionEnd::Closed(
                                        imgate::engine::CloseReason::SlowConsumer,
                                    ),
                                },
                            );
                            self.at(
                                t,
                                Ev::Client {
                                    to: n,
                                    inc,
                                    conn,
                                    event: ClientEvent::Close { session },
                                },
                            );
                        }
                    }
                }
            }
            Fault::Drain(n) => {
                if self.alive(n) && !self.nodes[n].draining && self.up_besides(n) > 0 {
                    self.nodes[n].draining = true;
                    self.gossip(false);
                    let inc = self.nodes[n].inc;
                    // Its own view drops itself after a few gossip rounds; it stops once idle
                    // or after the drain budget.
                    let step_down = self.now + 500 * MS;
                    self.at(step_down, Ev::View { to: n, inc });
                    self.at(step_down + 5 * S, Ev::DrainDone { node: n, inc });
                }
            }
            Fault::Cut(a, b) => {
                self.cut.insert(pair(a, b));
                self.relink();
            }
            Fault::Heal(a, b) => {
                self.cut.remove(&pair(a, b));
                self.relink();
            }
            Fault::Partition(side) => {
                self.side = Some(side.into_iter().collect());
                self.relink();
                self.gossip(true);
            }
            Fault::Unpartition => {
                self.side = None;
                self.relink();
                self.gossip(false);
            }
        }
    }

    // ----- clients --------------------------------------------------------------------------

    fn client_act(&mut self, c: usize) {
        match self.clients[c].conn {
            Conn::Idle => self.login(c),
            Conn::Live { node, conn } => {
                self.send_joins(c, node, conn);
                if self.now < self.busy_until && self.clients[c].sent < self.sends_per_client {
                    self.send_next(c, node, conn);
                }
                let every = self.rng.random_range(100 * MS..1500 * MS);
                if self.now < self.busy_until {
                    self.at(self.now + every, Ev::Act { client: c });
                }
            }
        }
    }

    /// Logs in at a random node and connects to the owner it names.
    fn login(&mut self, c: usize) {
        let n = self.rng.random_range(0..self.nodes.len());
        let owner = self.nodes[n]
            .relay
            .as_ref()
            .filter(|_| self.nodes[n].paused_until.is_none())
            .and_then(|r| r.owner(&self.clients[c].uid));
        match owner.and_then(|o| self.index_of(&o.node)) {
            Some(owner) => self.connect(c, owner),
            None => self.retry_later(c),
        }
    }

    fn retry_later(&mut self, c: usize) {
        let b = self.clients[c].backoff;
        self.clients[c].backoff = (b * 2).min(2 * S);
        let jitter = self.rng.random_range(0..b / 2 + 1);
        self.clients[c].conn = Conn::Idle;
        self.at(self.now + b + jitter, Ev::Act { client: c });
    }

    fn connect(&mut self, c: usize, node: usize) {
        if !self.alive(node) || self.nodes[node].paused_until.is_some() {
            return self.retry_later(c);
        }
        let conn = self.next_conn;
        self.next_conn += 1;
        let session = self.nodes[node].next_session;
        self.nodes[node].next_session += 1;
        self.nodes[node].sessions.insert(session, (c, conn));
        self.clients[c].conn = Conn::Live { node, conn };
        self.clients[c].seqs.clear();
        self.clients[c].backoff = 50 * MS;
        self.stats.reconnects += 1;
        let uid = self.clients[c].uid.clone();
        self.note(|| format!("{uid} connects to n{} (session {session})", node + 1));
        self.input(node, |r, now| {
            r.handle_client(
                now,
                ClientEvent::Open {
                    session,
                    uid,
                    iat: 0,
                    revoked: false,
                },
            )
        });
        // The SDK resends what has no outcome yet, with the same ids.
        let pending: Vec<(String, usize)> = self.clients[c]
            .pending
            .iter()
            .map(|(id, to)| (id.clone(), *to))
            .collect();
        for (id, to) in pending {
            self.send_frame(c, node, conn, id, to);
        }
        let rooms: Vec<(String, Arc<str>)> = self.clients[c]
            .room_sends
            .iter()
            .map(|(id, room)| (id.clone(), room.clone()))
            .collect();
        for (id, room) in rooms {
            self.send_room_frame(c, node, conn, id, room);
        }
        self.send_joins(c, node, conn);
        let every = self.rng.random_range(50 * MS..500 * MS);
        self.at(self.now + every, Ev::Act { client: c });
    }

    /// Joins without an answer are asked again (the SDK keeps them until answered). Rooms a
    /// `welcome` lacks are NOT joined again here: memberships must survive by themselves.
    fn send_joins(&mut self, c: usize, node: usize, conn: u64) {
        let Some(session) = self.session_of(node, c, conn) else {
            return;
        };
        let rooms: Vec<Arc<str>> = self.clients[c].joining.iter().cloned().collect();
        for room in rooms {
            let event = ClientEvent::Join {
                session,
                room: room.to_string(),
                id: Some(format!("j-{room}")),
                join: true,
            };
            self.client_input(c, node, conn, event);
        }
    }

    fn send_room_frame(&mut self, c: usize, node: usize, conn: u64, id: String, room: Arc<str>) {
        let Some(session) = self.session_of(node, c, conn) else {
            return;
        };
        let body: imgate::protocol::Body = Arc::from(
            serde_json::value::RawValue::from_string(format!("{{\"id\":\"{id}\"}}")).expect("json"),
        );
        let event = ClientEvent::RoomSend {
            transient: is_transient(&id),
            session,
            id,
            room: room.to_string(),
            body,
            ts: self.now / MS,
        };
        self.client_input(c, node, conn, event);
    }

    fn send_next(&mut self, c: usize, node: usize, conn: u64) {
        if !self.clients[c].rooms.is_empty() && self.rng.random_bool(0.3) {
            let rooms: Vec<Arc<str>> = self.clients[c].rooms.keys().cloned().collect();
            let room = rooms[self.rng.random_range(0..rooms.len())].clone();
            let id = format!("{}-{}", self.clients[c].uid, self.clients[c].sent);
            self.clients[c].sent += 1;
            self.clients[c].room_sends.insert(id.clone(), room.clone());
            self.stats.sends += 1;
            return self.send_room_frame(c, node, conn, id, room);
        }
        let others = self.clients.len() - 1;
        let to = (c + 1 + self.rng.random_range(0..others)) % self.clients.len();
        let id = format!("{}-{}", self.clients[c].uid, self.clients[c].sent);
        self.clients[c].sent += 1;
        self.clients[c].pending.insert(id.clone(), to);
        self.recipients
            .insert((self.clients[c].uid.clone(), id.clone()), to);
        self.stats.sends += 1;
        self.send_frame(c, node, conn, id, to);
    }

    fn send_frame(&mut self, c: usize, node: usize, conn: u64, id: String, to: usize) {
        let Some(session) = self.session_of(node, c, conn) else {
            return;
        };
        let body: imgate::protocol::Body = Arc::from(
            serde_json::value::RawValue::from_string(format!("{{\"id\":\"{id}\"}}")).expect("json"),
        );
        let transient = is_transient(&id);
        let event = ClientEvent::Send {
            transient,
            session,
            id,
            to: self.clients[to].uid.to_string(),
            body,
            ts: self.now / MS,
        };
        self.client_input(c, node, conn, event);
    }

    /// Client `c` sends `event` to `node` over `conn`, after a client delay, in order.
    fn client_input(&mut self, c: usize, node: usize, conn: u64, event: ClientEvent) {
        let d = self.client_delay();
        let inc = self.nodes[node].inc;
        self.at_fifo(
            (3, c, node),
            self.now + d,
            Ev::Client {
                to: node,
                inc,
                conn,
                event,
            },
        );
    }

    fn client_event(&mut self, n: usize, conn: u64, event: ClientEvent) {
        // The session may have ended meanwhile; the node ignores unknown sessions itself, but
        // a connection the node already ended must not reopen anything.
        let line = format!("n{} client {}", n + 1, short_client(&event));
        self.note(|| line);
        if let ClientEvent::Close { session } = &event {
            self.nodes[n].sessions.remove(session);
        }
        let _ = conn;
        self.input(n, |r, now| r.handle_client(now, event));
    }

    fn client_frame(&mut self, c: usize, conn: u64, frame: ServerFrame) {
        let Conn::Live { conn: live, .. } = self.clients[c].conn else {
            return;
        };
        if live != conn {
            return;
        }
        let uid = self.clients[c].uid.clone();
        let ok = matches!(frame, ServerFrame::Delivered { .. });
        match frame {
            ServerFrame::Msg { seq, from, id, .. } => {
                let key = (from.clone(), id.clone());
                // A transient message is not remembered: its resend is a new message.
                let transient = is_transient(&id);
                if let Some(&first) = self.clients[c].seqs.get(&key)
                    && first != seq
                    && !transient
                {
                    self.pending_violation = Some(format!(
                        "{uid} got ({from}, {id}) twice on one session, as seq {first} and {seq}"
                    ));
                }
                self.clients[c].seqs.insert(key.clone(), seq);
                if !self.clients[c].app.insert(key) {
                    self.stats.duplicates_dropped += 1;
                }
                // Most acks come at once; some after the ack timeout, so pushes are retried.
                let late = self.rng.random_bool(0.05);
                let d = if late {
                    self.rng.random_range(1100 * MS..3 * S)
                } else {
                    self.rng.random_range(MS..30 * MS)
                };
                self.at(
                    self.now + d,
                    Ev::Ack {
                        client: c,
                        conn,
                        seq,
                    },
                );
            }
            ServerFrame::Joined {
                room, id: Some(_), ..
            } => {
                self.clients[c].joining.remove(&room);
                let now = self.now;
                self.clients[c].rooms.entry(room).or_insert(now);
            }
            ServerFrame::RoomResult {
                id,
                room,
                members,
                delivered,
                offline,
                failed,
            } => {
                self.note(|| {
                    format!("{uid} room result {id} in {room}: {delivered}/{members} delivered, {offline} offline, {failed} failed")
                });
                if delivered + offline + failed != members {
                    self.pending_violation = Some(format!(
                        "{uid}'s room send {id}: {delivered} + {offline} + {failed} members ended, of {members}"
                    ));
                }
                self.room_outcome(c, &id);
            }
            ServerFrame::RoomFailed {
                id: Some(id),
                room,
                reason,
            } => {
                self.note(|| format!("{uid} room failed {id} in {room}: {reason:?}"));
                // A join refused (unreachable, ...) is asked again; a send has its outcome.
                if !id.starts_with("j-") {
                    self.room_outcome(c, &id);
                }
            }
            ServerFrame::Delivered { id, .. } | ServerFrame::Failed { id, .. } => {
                self.note(|| {
                    format!(
                        "{uid} outcome {id}: {}",
                        if ok { "delivered" } else { "failed" }
                    )
                });
                if self.clients[c].pending.remove(&*id).is_none() {
                    self.pending_violation = Some(format!(
                        "{uid} got a second outcome for {id} (first: {:?})",
                        self.clients[c].outcomes.get(&*id)
                    ));
                }
                self.clients[c].outcomes.insert(id.to_string(), ok);
                if ok {
                    self.stats.delivered += 1;
                } else {
                    self.stats.failed += 1;
                }
            }
            _ => {}
        }
    }

    fn room_outcome(&mut self, c: usize, id: &str) {
        if self.clients[c].room_sends.remove(id).is_none() {
            self.pending_violation = Some(format!(
                "{} got a second outcome for room send {id}",
                self.clients[c].uid
            ));
        } else {
            self.stats.room_results += 1;
        }
    }

    fn client_ended(&mut self, c: usize, end: SessionEnd) {
        let uid = self.clients[c].uid.clone();
        match end {
            SessionEnd::Moved(owner) => {
                self.stats.moved += 1;
                self.note(|| format!("{uid} moved to {}", owner.node));
                match self.index_of(&owner.node) {
                    Some(n) => self.connect(c, n),
                    None => self.retry_later(c),
                }
            }
            SessionEnd::Closed(reason) => {
                self.note(|| format!("{uid} closed: {reason:?}"));
                self.retry_later(c);
            }
        }
    }
}

/// Every fifth message of a client is transient (a typing indicator): no hold, no retry, no
/// dedup memory.
fn is_transient(id: &str) -> bool {
    id.rsplit('-')
        .next()
        .and_then(|n| n.parse::<u64>().ok())
        .is_some_and(|n| n % 5 == 4)
}

fn short(frame: &PeerFrame) -> String {
    match frame {
        PeerFrame::Deliver { tag, hops, msg } => {
            format!(
                "deliver tag {tag} hops {hops} {}→{} {}",
                msg.from, msg.to, msg.id
            )
        }
        PeerFrame::Outcome { tag, outcome } => format!("outcome tag {tag} {outcome:?}"),
        other => format!("{other:?}"),
    }
}

fn short_client(event: &ClientEvent) -> String {
    match event {
        ClientEvent::Send {
            session, id, to, ..
        } => format!("send s{session} {id} → {to}"),
        ClientEvent::Ack { session, seq } => format!("ack s{session} seq {seq}"),
        other => format!("{other:?}"),
    }
}

// ----- invariants ---------------------------------------------------------------------------

impl Sim {
    fn violation(&self, what: String) -> Violation {
        Violation {
            what,
            trace: self.trace.iter().cloned().collect(),
        }
    }

    /// Nodes that are up and handling inputs.
    fn serving(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&n| self.alive(n) && self.nodes[n].paused_until.is_none())
    }

    /// Checked after every event.
    pub fn check_step(&mut self) -> Result<(), Violation> {
        if let Some(what) = self.pending_violation.take() {
            return Err(self.violation(what));
        }
        let Some(n) = self.touched.take() else {
            return Ok(());
        };
        // Only the node that handled the event changed; a paused node is checked on resume.
        if self.alive(n) && self.nodes[n].paused_until.is_none() {
            let relay = self.nodes[n].relay.as_ref().expect("serving");
            let me = relay.node_id().clone();
            // 6794c0d: a node keeps no session of a user another node owns.
            for (session, uid) in relay.sessions() {
                if let Some(o) = relay.owner(&uid)
                    && o.node != me
                {
                    return Err(self.violation(format!(
                        "{me} keeps session {session} of {uid}, whose owner it thinks is {}",
                        o.node
                    )));
                }
            }
            // 05b4ae8: a node names as owner only peers whose link it was told is up.
            for c in &self.clients {
                if let Some(o) = relay.owner(&c.uid)
                    && o.node != me
                {
                    let p = self.index_of(&o.node).expect("known node");
                    if !self.told_up.contains(&(n, p)) {
                        return Err(self.violation(format!(
                            "{me} names {} the owner of {} with no link to it up",
                            o.node, c.uid
                        )));
                    }
                }
            }
            // Bounded maps stay bounded.
            let cfg = relay.config();
            let engine = relay.engine();
            let bounds = [
                ("forwards", relay.forward_count(), cfg.max_forwards),
                ("requests", relay.request_count(), cfg.max_requests),
                (
                    "deliveries",
                    engine.deliveries_in_flight(),
                    cfg.engine.max_deliveries,
                ),
                ("dedup", engine.dedup_len(), cfg.engine.max_dedup_entries),
                (
                    "hand-over index",
                    relay.handover_index_len(),
                    2048 + 4 * engine.local_user_count(),
                ),
                (
                    "room memberships",
                    relay.membership_counts().0,
                    cfg.max_room_memberships,
                ),
                (
                    "user memberships",
                    relay.membership_counts().1,
                    cfg.max_room_memberships,
                ),
            ];
            for (what, len, max) in bounds {
                if len > max {
                    return Err(self.violation(format!("{me}: {what} holds {len}, over {max}")));
                }
            }
        }
        Ok(())
    }

    /// After the faults: every node that serves names the same owner for every uid.
    pub fn check_agreement(&self) -> Result<(), Violation> {
        let serving: Vec<usize> = self
            .serving()
            .filter(|&n| !self.nodes[n].draining)
            .collect();
        for c in &self.clients {
            let owners: BTreeSet<Option<String>> = serving
                .iter()
                .map(|&n| {
                    let r = self.nodes[n].relay.as_ref().expect("serving");
                    r.owner(&c.uid).map(|o| o.node.to_string())
                })
                .collect();
            if owners.len() != 1 || owners.contains(&None) {
                return Err(self.violation(format!(
                    "nodes disagree on the owner of {} after the faults stopped: {owners:?}",
                    c.uid
                )));
            }
        }
        Ok(())
    }

    /// At rest: no live relay holds a forward, a request or a delivery.
    pub fn check_rest(&self) -> Result<(), Violation> {
        for n in self.serving() {
            let r = self.nodes[n].relay.as_ref().expect("serving");
            let left = [
                ("forwards", r.forward_count()),
                ("requests", r.request_count()),
                ("deliveries", r.engine().deliveries_in_flight()),
                ("room requests, fan-outs or announcements", r.room_work()),
            ];
            for (what, count) in left {
                if count > 0 {
                    return Err(self.violation(format!(
                        "n{} still holds {count} {what} after {} s at rest",
                        n + 1,
                        REST / S
                    )));
                }
            }
        }
        Ok(())
    }

    /// At the end: every send has its outcome, and everything reported delivered reached the
    /// recipient's application.
    pub fn check_end(&self) -> Result<(), Violation> {
        if let Some(((n, _, req), what)) = self
            .requests
            .iter()
            .find(|((n, inc, _), _)| self.alive(*n) && self.nodes[*n].inc == *inc)
        {
            return Err(self.violation(format!(
                "n{}'s API request {req} ({what:?}) has no answer {} s after the faults stopped",
                n + 1,
                self.quiesce / S
            )));
        }
        for (id, to) in &self.pushes_delivered {
            let key = (
                Arc::from(imgate::uid::SYSTEM_SENDER),
                Arc::from(id.as_str()),
            );
            if !self.clients[*to].app.contains(&key) {
                return Err(self.violation(format!(
                    "push {id} was answered delivered but u{to} never received it"
                )));
            }
        }
        for c in &self.clients {
            if let Some((id, room)) = c.room_sends.iter().next() {
                return Err(self.violation(format!(
                    "{}'s room send {id} to {room} has no room_result {} s after the faults \
                     stopped",
                    c.uid,
                    self.quiesce / S
                )));
            }
            if let Some((id, to)) = c.pending.iter().next() {
                return Err(self.violation(format!(
                    "{}'s send {id} to u{to} has no outcome {} s after the faults stopped \
                     ({} without)",
                    c.uid,
                    self.quiesce / S,
                    c.pending.len()
                )));
            }
            for (id, ok) in &c.outcomes {
                let Some(to) = id_recipient(self, c, id) else {
                    continue;
                };
                let key = (c.uid.clone(), Arc::from(id.as_str()));
                if *ok && !self.clients[to].app.contains(&key) {
                    return Err(self.violation(format!(
                        "{}'s send {id} was reported delivered but u{to} never received it",
                        c.uid
                    )));
                }
            }
        }
        Ok(())
    }

    /// After a single failure: every membership a client saw confirmed is known, at rest, on
    /// both the room's owner and the user's owner. A membership confirmed just before the kill
    /// may not have reached a second node yet (a node with no link up yet keeps it alone, and
    /// a frame in flight dies with its sender): those confirmed in the 3 s before it are not
    /// held to it.
    pub fn check_memberships(&mut self) -> Result<(), Violation> {
        if !self.single_failure {
            return Ok(());
        }
        self.stats.membership_checks += 1;
        let Some(any) = self.serving().find(|&n| !self.nodes[n].draining) else {
            return Ok(());
        };
        let view = self.nodes[any].relay.as_ref().expect("serving");
        for c in &self.clients {
            for (room, at) in &c.rooms {
                if self.killed_at.is_some_and(|k| *at + 3 * S > k) {
                    continue;
                }
                let key = imgate::rooms::room_key(room);
                let sides = [(view.owner(&key), true), (view.owner(&c.uid), false)];
                for (owner, room_side) in sides {
                    let Some(n) = owner.and_then(|o| self.index_of(&o.node)) else {
                        continue;
                    };
                    let r = self.nodes[n].relay.as_ref().expect("an owner serves");
                    let known = if room_side {
                        r.members_of(room).contains(&c.uid)
                    } else {
                        r.rooms_of(&c.uid).contains(room)
                    };
                    if !known {
                        let side = if room_side { "room's" } else { "user's" };
                        return Err(self.violation(format!(
                            "{} joined {room}, but n{} (the {side} owner) does not know it at rest",
                            c.uid,
                            n + 1
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether no send waits for an outcome and no request of a live node for its answer.
    fn quiet(&self) -> bool {
        self.clients
            .iter()
            .all(|c| c.pending.is_empty() && c.room_sends.is_empty())
            && !self
                .requests
                .keys()
                .any(|(n, inc, _)| self.alive(*n) && self.nodes[*n].inc == *inc)
    }
}

/// The recipient a client sent `id` to (recorded at the send).
fn id_recipient(sim: &Sim, c: &Client, id: &str) -> Option<usize> {
    sim.recipients
        .get(&(c.uid.clone(), id.to_string()))
        .copied()
}

/// Runs one seed end to end: a random plan, the busy phase, then quiescence.
///
/// # Errors
/// The first invariant broken, with a trace.
pub fn run_seed(seed: u64, tracing: bool) -> Result<(Stats, Vec<&'static str>), Violation> {
    let mut rng = StdRng::seed_from_u64(seed);
    let plan = Plan::random(&mut rng);
    run_plan(seed, &plan, tracing)
}

/// Runs `plan` with `seed`.
///
/// # Errors
/// The first invariant broken, with a trace.
pub fn run_plan(
    seed: u64,
    plan: &Plan,
    tracing: bool,
) -> Result<(Stats, Vec<&'static str>), Violation> {
    let mut sim = Sim::new(seed, plan, tracing);
    let faults_end = plan
        .faults
        .iter()
        .map(|(t, f)| match f {
            Fault::Pause(_, d) => t + d,
            Fault::Drain(_) => t + 6 * S,
            _ => *t,
        })
        .max()
        .unwrap_or(0)
        .max(plan.busy_until);
    // All faults end: killed nodes stay dead, but partitions and cuts heal.
    sim.run_until(faults_end)?;
    sim.at(faults_end, Ev::Fault(Fault::Unpartition));
    let mut cuts: Vec<(usize, usize)> = sim.cut.iter().copied().collect();
    cuts.sort_unstable();
    for (a, b) in cuts {
        sim.at(faults_end, Ev::Fault(Fault::Heal(a, b)));
    }
    // Every send ends within `QUIESCE`, and within 10 s every node names the same owners.
    let limit = faults_end + plan.quiesce();
    while !sim.quiet() && sim.now < limit {
        let next = sim.now + 100 * MS;
        sim.run_until(next)?;
    }
    sim.stats.quiet_after = sim.now.saturating_sub(faults_end);
    sim.check_end()?;
    sim.run_until(faults_end + 10 * S)?;
    sim.check_agreement()?;
    // At rest, past the longest a forward may wait, nothing is left in any table.
    sim.run_until(faults_end + plan.quiesce() + REST)?;
    sim.check_rest()?;
    sim.check_memberships()?;
    sim.stats.sim_time = sim.now;
    Ok((sim.stats.clone(), sim.fault_mix.clone()))
}

/// The command that replays `seed`.
pub fn replay_command(seed: u64) -> String {
    format!("IMGATE_SIM_SEED={seed} cargo test --test simulation replay -- --nocapture")
}

/// A failure report: the invariant, the replay command and the trace.
pub fn report(seed: u64, v: &Violation) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "seed {seed}: {}", v.what);
    let _ = writeln!(out, "replay: {}", replay_command(seed));
    let _ = writeln!(out, "last {} events:", v.trace.len());
    for line in &v.trace {
        let _ = writeln!(out, "  {line}");
    }
    out
}
