//! The chaos workload shared by the chaos suite (tests/chaos.rs) and the soak
//! (examples/chaos.rs): SDK clients that send all the time and a tally of what happened.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imgate::client::{
    Attempt, Client, ClientConfig, ClientStats, Event, Membership, RoomSendOutcome, SendOutcome,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Polls `cond` every 10 ms until it holds; panics after `limit`.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[derive(Default)]
pub struct World {
    /// Sends made: (sender, id).
    pub sent: HashSet<(String, String)>,
    /// Outcomes: (sender, id) -> outcome.
    pub outcomes: HashMap<(String, String), SendOutcome>,
    /// (from, id) as applications received them, with how often.
    pub received: HashMap<(String, String), u32>,
    /// Each client's node of its current session and when it was welcomed.
    pub at: HashMap<String, (String, Instant)>,
    /// Recipient of each id.
    pub to: HashMap<String, String>,
    /// Sends that ended in an SDK error.
    pub errors: Vec<(String, String, String)>,
    /// Send frames the SDKs wrote again (summed when the clients stop).
    pub resent: u64,
    /// Incoming duplicates the SDKs dropped before the applications saw them.
    pub suppressed: u64,
    /// Sessions the SDKs were welcomed to.
    pub sessions: u64,
    /// Every answer a node gave to an attempt, before the SDK retried: (sender, attempt).
    pub attempts: Vec<(String, Attempt)>,
    /// Clients whose `join` of [`ROOM`] was answered `joined`.
    pub joined: HashSet<String>,
    /// Room sends made: (sender, id) -> when.
    pub room_sent: HashMap<(String, String), Instant>,
    /// Their outcomes, and when they came.
    pub room_outcomes: HashMap<(String, String), (RoomSendOutcome, Instant)>,
    /// Room messages as applications received them: (receiver, from, id) -> how often.
    pub room_received: HashMap<(String, String, String), u32>,
    /// Rooms the SDKs joined again because a `welcome` lacked them.
    pub rejoined: u64,
}

/// The room every chaos client joins; one send in five goes there.
pub const ROOM: &str = "chaos-room";

pub fn client_config(nodes: &[String], uid: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new(nodes.to_vec(), uid);
    cfg.max_attempts = 20;
    cfg.ping_interval = Duration::from_millis(300);
    cfg.min_backoff = Duration::from_millis(20);
    cfg.max_backoff = Duration::from_millis(400);
    cfg.request_timeout = Duration::from_millis(500);
    cfg
}

pub fn spawn_client(
    uid: String,
    peers: Vec<String>,
    nodes: Vec<String>,
    world: Arc<Mutex<World>>,
    sending: Arc<std::sync::atomic::AtomicBool>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut cfg = client_config(&nodes, &uid);
        let (attempts_tx, mut attempts) = tokio::sync::mpsc::unbounded_channel();
        cfg.attempts = Some(attempts_tx);
        let (client, mut incoming, mut events) = Client::start(cfg);
        let mut tick = tokio::time::interval(Duration::from_millis(150));
        let mut n = 0u64;
        let mut outcomes = tokio::task::JoinSet::new();
        if let Ok(join) = client.join(ROOM) {
            let (world, uid) = (world.clone(), uid.clone());
            outcomes.spawn(async move {
                if let Ok(Membership::Joined { .. }) = join.await {
                    world.lock().unwrap().joined.insert(uid);
                }
            });
        }
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    if !sending.load(std::sync::atomic::Ordering::Relaxed) { continue }
                                        n += 1;
                    if n.is_multiple_of(5) && world.lock().unwrap().joined.contains(&uid) {
                        let Ok(pending) = client.send_room(ROOM, json!({"n": n})) else { continue };
                        let key = (uid.clone(), pending.id().to_string());
                        world.lock().unwrap().room_sent.insert(key.clone(), Instant::now());
                        let world = world.clone();
                        outcomes.spawn(async move {
                            match pending.await {
                                Ok(o) => { world.lock().unwrap().room_outcomes.insert(key, (o, Instant::now())); }
                                Err(e) => { world.lock().unwrap().errors.push((key.0, key.1, e.to_string())); }
                            }
                        });
                        continue;
                    }
                    let to = peers[(n as usize * 7 + uid.len()) % peers.len()].clone();
                    let id = format!("{uid}-{n}");
                    let Ok(pending) = client.send_with_id(&id, &to, json!({"n": n})) else { continue };
                    {
                        let mut w = world.lock().unwrap();
                        w.sent.insert((uid.clone(), id.clone()));
                        w.to.insert(id.clone(), to.clone());
                    }
                    let world = world.clone();
                    let uid = uid.clone();
                    outcomes.spawn(async move {
                        match pending.await {
                            Ok(o) => { world.lock().unwrap().outcomes.insert((uid, id), o); }
                            Err(e) => { world.lock().unwrap().errors.push((uid, id, e.to_string())); }
                        }
                    });
                }
                m = incoming.recv() => {
                                        let Some(m) = m else { break };
                    let mut w = world.lock().unwrap();
                    match m.room {
                        Some(_) => *w.room_received.entry((uid.clone(), m.from, m.id)).or_default() += 1,
                        None => *w.received.entry((m.from, m.id)).or_default() += 1,
                    }
                }
                e = events.recv() => {
                    if let Some(Event::Connected { node, .. }) = e {
                        world.lock().unwrap().at.insert(uid.clone(), (node, Instant::now()));
                    }
                }
                Some(a) = attempts.recv() => world.lock().unwrap().attempts.push((uid.clone(), a)),
                Some(_) = outcomes.join_next(), if !outcomes.is_empty() => {}
            }
        }
        outcomes.abort_all();
        let mut w = world.lock().unwrap();
        add_stats(&mut w, client.stats());
    })
}

fn add_stats(w: &mut World, s: &ClientStats) {
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    w.resent += get(&s.resent);
    w.suppressed += get(&s.duplicates);
    w.sessions += get(&s.sessions);
    w.rejoined += get(&s.rejoined);
}

/// One client per uid, each sending to all the others in turn.
pub fn spawn_clients(
    uids: &[String],
    nodes: &[String],
    world: &Arc<Mutex<World>>,
    sending: &Arc<std::sync::atomic::AtomicBool>,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    uids.iter()
        .map(|u| {
            let peers = uids.iter().filter(|p| *p != u).cloned().collect();
            spawn_client(
                u.clone(),
                peers,
                nodes.to_vec(),
                world.clone(),
                sending.clone(),
                stop.clone(),
            )
        })
        .collect()
}

pub fn percentiles(mut v: Vec<Duration>) -> String {
    v.sort();
    if v.is_empty() {
        return "no clients".into();
    }
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    format!(
        "{} clients: p50 {:?}, p99 {:?}, max {:?}",
        v.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

/// Clients whose session was on `node`.
pub fn clients_on(world: &Mutex<World>, node: &str) -> Vec<String> {
    world
        .lock()
        .unwrap()
        .at
        .iter()
        .filter(|(_, (n, _))| n == node)
        .map(|(u, _)| u.clone())
        .collect()
}

/// Waits until every client of `orphans` was welcomed on another node after `since`; returns
/// the re-home times.
pub async fn rehomed(
    world: &Mutex<World>,
    orphans: &[String],
    gone: &str,
    since: Instant,
) -> Vec<Duration> {
    wait_until(Duration::from_secs(30), || {
        let w = world.lock().unwrap();
        orphans
            .iter()
            .all(|u| w.at.get(u).is_some_and(|(n, t)| n != gone && *t > since))
    })
    .await;
    let w = world.lock().unwrap();
    orphans.iter().map(|u| w.at[u].1 - since).collect()
}

pub async fn wait_delivered(world: &Mutex<World>, more: usize) {
    let target = world.lock().unwrap().outcomes.len() + more;
    wait_until(Duration::from_secs(30), || {
        world.lock().unwrap().outcomes.len() >= target
    })
    .await;
}

/// Waits until every client is connected at the node that owns it (as a login at any node of
/// `nodes` answers): the cluster and its clients are settled.
pub async fn wait_settled(world: &Mutex<World>, nodes: &[String], uids: &[String]) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut owners = HashMap::new();
        for (i, uid) in uids.iter().enumerate() {
            let base = &nodes[i % nodes.len()];
            let owner = async {
                let v: serde_json::Value = http
                    .post(format!("{base}/login"))
                    .json(&json!({"uid": uid}))
                    .timeout(Duration::from_millis(500))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                Some(v["node"].as_str()?.to_string())
            };
            if let Some(node) = owner.await {
                owners.insert(uid.clone(), node);
            }
        }
        let settled = {
            let w = world.lock().unwrap();
            uids.iter().all(|u| {
                owners
                    .get(u)
                    .is_some_and(|o| w.at.get(u).is_some_and(|(n, _)| n == o))
            })
        };
        if settled {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "clients not settled at their owners within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
