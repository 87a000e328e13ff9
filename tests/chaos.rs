//! Chaos suite: 4 real `imgate node` processes, 40 SDK clients sending all the time, while
//! nodes are killed with SIGKILL, stopped with SIGTERM, paused with SIGSTOP and brought back.
//!
//! Invariants checked at the end:
//! - no message acked `delivered` is missing at its recipient;
//! - every send ends in `delivered` (the SDK resends what fails `unreachable`/`timeout`/`offline`);
//! - no message reaches an application twice;
//! - every node is healthy and all agree on the membership and the ring;
//! - no node log contains a panic.
//!
//! It prints the re-home time after each kill: from the signal until every client that lived on
//! the node is welcomed again elsewhere (p50, p99, max).

mod cluster_support;
mod proc_support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use imgate::client::{Client, ClientConfig, Event, SendOutcome};
use proc_support::ProcCluster;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const NODES: usize = 4;
const CLIENTS: usize = 40;

#[derive(Default)]
struct World {
    /// Sends made: (sender, id).
    sent: HashSet<(String, String)>,
    /// Outcomes: (sender, id) -> outcome.
    outcomes: HashMap<(String, String), SendOutcome>,
    /// (from, id) as applications received them, with how often.
    received: HashMap<(String, String), u32>,
    /// Each client's node of its current session and when it was welcomed.
    at: HashMap<String, (String, Instant)>,
    /// Recipient of each id.
    to: HashMap<String, String>,
    /// Sends that ended in an SDK error.
    errors: Vec<(String, String, String)>,
}

fn client_config(nodes: &[String], uid: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new(nodes.to_vec(), uid);
    cfg.max_attempts = 100;
    cfg.ping_interval = Duration::from_millis(300);
    cfg.min_backoff = Duration::from_millis(20);
    cfg.max_backoff = Duration::from_millis(400);
    cfg
}

fn spawn_client(
    uid: String,
    peers: Vec<String>,
    nodes: Vec<String>,
    world: Arc<Mutex<World>>,
    sending: Arc<std::sync::atomic::AtomicBool>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (client, mut incoming, mut events) = Client::start(client_config(&nodes, &uid));
        let mut tick = tokio::time::interval(Duration::from_millis(150));
        let mut n = 0u64;
        let mut outcomes = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    if !sending.load(std::sync::atomic::Ordering::Relaxed) { continue }
                    n += 1;
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
                    *world.lock().unwrap().received.entry((m.from, m.id)).or_default() += 1;
                }
                e = events.recv() => {
                    if let Some(Event::Connected { node, .. }) = e {
                        world.lock().unwrap().at.insert(uid.clone(), (node, Instant::now()));
                    }
                }
                Some(_) = outcomes.join_next(), if !outcomes.is_empty() => {}
            }
        }
        outcomes.abort_all();
    })
}

fn percentiles(mut v: Vec<Duration>) -> String {
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
fn clients_on(world: &Mutex<World>, node: &str) -> Vec<String> {
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
async fn rehomed(
    world: &Mutex<World>,
    orphans: &[String],
    gone: &str,
    since: Instant,
) -> Vec<Duration> {
    cluster_support::wait_until(Duration::from_secs(30), || {
        let w = world.lock().unwrap();
        orphans
            .iter()
            .all(|u| w.at.get(u).is_some_and(|(n, t)| n != gone && *t > since))
    })
    .await;
    let w = world.lock().unwrap();
    orphans.iter().map(|u| w.at[u].1 - since).collect()
}

async fn wait_delivered(world: &Mutex<World>, more: usize) {
    let target = world.lock().unwrap().outcomes.len() + more;
    cluster_support::wait_until(Duration::from_secs(30), || {
        world.lock().unwrap().outcomes.len() >= target
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kill_term_pause_restart() {
    let started = Instant::now();
    let mut c = ProcCluster::start(
        NODES,
        "[delivery]\nack_timeout_ms = 300\nmax_retries = 3\nhold_ms = 2000\n\
         [http]\nshutdown_timeout_ms = 4000\n",
    );
    c.wait_members(NODES as u64, Duration::from_secs(30)).await;
    let nodes: Vec<String> = c.procs.iter().map(|p| p.http.clone()).collect();
    let ids: Vec<String> = c.procs.iter().map(|p| p.id.clone()).collect();
    let uids: Vec<String> = (0..CLIENTS).map(|i| format!("c{i}")).collect();
    let world = Arc::new(Mutex::new(World::default()));
    let sending = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let stop = CancellationToken::new();
    let tasks: Vec<_> = uids
        .iter()
        .map(|u| {
            let peers = uids.iter().filter(|p| *p != u).cloned().collect();
            spawn_client(
                u.clone(),
                peers,
                nodes.clone(),
                world.clone(),
                sending.clone(),
                stop.clone(),
            )
        })
        .collect();
    cluster_support::wait_until(Duration::from_secs(30), || {
        world.lock().unwrap().at.len() == CLIENTS
    })
    .await;
    wait_delivered(&world, 200).await;

    // 1. kill -9 one node, then another.
    for victim in [3, 2] {
        let orphans = clients_on(&world, &ids[victim]);
        let t0 = Instant::now();
        c.kill9(victim);
        let times = rehomed(&world, &orphans, &ids[victim], t0).await;
        println!("kill -9 {}: re-home {}", ids[victim], percentiles(times));
        wait_delivered(&world, 100).await;
    }
    c.wait_members(2, Duration::from_secs(15)).await;

    // 2. Both come back.
    c.spawn(2);
    c.spawn(3);
    c.wait_members(4, Duration::from_secs(15)).await;
    wait_delivered(&world, 200).await;

    // 3. SIGTERM one (graceful drain) and restart it.
    let orphans = clients_on(&world, &ids[1]);
    let t0 = Instant::now();
    let status = c.terminate(1, Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "graceful stop exits 0: {status:?}"
    );
    let times = rehomed(&world, &orphans, &ids[1], t0).await;
    println!("SIGTERM {}: re-home {}", ids[1], percentiles(times));
    c.spawn(1);
    c.wait_members(4, Duration::from_secs(15)).await;
    wait_delivered(&world, 200).await;

    // 4. SIGSTOP one for longer than failure detection, then SIGCONT.
    let orphans = clients_on(&world, &ids[0]);
    let t0 = Instant::now();
    c.signal(0, libc::SIGSTOP);
    c.wait_members_on(&[1, 2, 3], 3, Duration::from_secs(15))
        .await;
    let times = rehomed(&world, &orphans, &ids[0], t0).await;
    println!("SIGSTOP {}: re-home {}", ids[0], percentiles(times));
    wait_delivered(&world, 100).await;
    c.signal(0, libc::SIGCONT);
    c.wait_members(4, Duration::from_secs(15)).await;
    wait_delivered(&world, 200).await;

    // 5. Stop sending and let every send end.
    sending.store(false, std::sync::atomic::Ordering::Relaxed);
    let all_ended = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            {
                let w = world.lock().unwrap();
                if w.outcomes.len() + w.errors.len() == w.sent.len() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if all_ended.is_err() {
        let w = world.lock().unwrap();
        let open: Vec<_> = w
            .sent
            .iter()
            .filter(|k| !w.outcomes.contains_key(*k))
            .take(20)
            .map(|(s, id)| {
                let to = &w.to[id];
                format!("{s} ({:?}) -> {to} ({:?}): {id}", w.at.get(s), w.at.get(to))
            })
            .collect();
        for (i, p) in c.procs.iter().enumerate() {
            let log = c.log(i);
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            println!(
                "--- {} log tail:\n{}",
                p.id,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        panic!(
            "sends without an outcome after 60 s: {open:?}; errors {:?}",
            w.errors
        );
    }
    assert!(
        world.lock().unwrap().errors.is_empty(),
        "SDK errors: {:?}",
        world.lock().unwrap().errors
    );
    stop.cancel();
    for t in tasks {
        t.await.unwrap();
    }

    let w = std::mem::take(&mut *world.lock().unwrap());
    let failed: Vec<_> = w
        .outcomes
        .iter()
        .filter(|(_, o)| **o != SendOutcome::Delivered)
        .collect();
    assert!(
        failed.is_empty(),
        "sends that did not end delivered: {failed:?}"
    );
    let lost: Vec<_> = w
        .outcomes
        .keys()
        .filter(|k| !w.received.contains_key(*k))
        .collect();
    assert!(lost.is_empty(), "delivered but never received: {lost:?}");
    let dups: Vec<_> = w.received.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "surfaced twice: {dups:?}");
    println!(
        "sends {}, delivered {}, received {}, in {:?}",
        w.sent.len(),
        w.outcomes.len(),
        w.received.len(),
        started.elapsed()
    );
    drop(w);

    // Every node is up, healthy, and agrees on membership and the ring.
    let http = reqwest::Client::new();
    let mut rings = Vec::new();
    for p in &c.procs {
        let v: Value = http
            .get(format!("{}/cluster", p.http))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        rings.push(v["ring_nodes"].clone());
        let h: Value = http
            .get(format!("{}/health", p.http))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(h["status"], "ok");
    }
    assert!(rings.windows(2).all(|w| w[0] == w[1]), "{rings:?}");
    assert_eq!(rings[0].as_array().unwrap().len(), NODES);
    for i in 0..NODES {
        let log = c.log(i);
        assert!(!log.contains("panicked"), "node {i} panicked:\n{log}");
    }
}
