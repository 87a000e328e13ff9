//! Chaos suite: 4 real `imgate node` processes, 40 SDK clients sending all the time, while
//! nodes are killed with SIGKILL, stopped with SIGTERM, paused with SIGSTOP and brought back.
//!
//! Invariants checked at the end:
//! - what the nodes answered to each attempt, recorded before the SDK retries: only
//!   `delivered`, `unreachable`, `timeout` or `offline`; nothing but `delivered` during the
//!   graceful stop; nothing but `delivered` in a calm window (every node up and linked, every
//!   client at its owner), so that a server bug cannot hide behind the SDK's retries;
//! - no message acked `delivered` is missing at its recipient;
//! - every send ends in `delivered` (the SDK resends what fails `unreachable`/`timeout`/`offline`);
//! - no message reaches an application twice;
//! - every node is healthy and all agree on the membership and the ring;
//! - no node log contains a panic;
//! - rooms: every client joined one room and sends one message in five there; every room send
//!   ends in a `room_result` (never `forbidden`: no membership is lost), no member's
//!   application gets a room message twice, a room send made and answered in a calm window
//!   reached all 40 members, and the room's owner counts 40 members at the end.
//!
//! It prints the re-home time after each kill: from the signal until every client that lived on
//! the node is welcomed again elsewhere (p50, p99, max).

mod chaos_support;
mod proc_support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chaos_support::{
    ROOM, World, clients_on, percentiles, rehomed, spawn_clients, wait_delivered, wait_settled,
    wait_until,
};
use imgate::client::{RoomSendOutcome, SendOutcome};
use imgate::protocol::FailReason;
use proc_support::ProcCluster;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const NODES: usize = 4;
const CLIENTS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kill_term_pause_restart() {
    let started = Instant::now();
    let mut c = ProcCluster::start(
        NODES,
        "[delivery]\nack_timeout_ms = 300\nmax_retries = 3\nhold_ms = 2000\n\
         [http]\nshutdown_timeout_ms = 4000\n",
    );
    c.wait_ready(NODES as u64, Duration::from_secs(30)).await;
    let nodes: Vec<String> = c.procs.iter().map(|p| p.http.clone()).collect();
    let ids: Vec<String> = c.procs.iter().map(|p| p.id.clone()).collect();
    let uids: Vec<String> = (0..CLIENTS).map(|i| format!("c{i}")).collect();
    let world = Arc::new(Mutex::new(World::default()));
    let sending = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let stop = CancellationToken::new();
    let tasks = spawn_clients(&uids, &nodes, &world, &sending, &stop);
    wait_until(Duration::from_secs(30), || {
        let w = world.lock().unwrap();
        w.at.len() == CLIENTS && w.joined.len() == CLIENTS
    })
    .await;
    // Calm windows: from when every client is at its owner until the next fault starts.
    let mut calm: Vec<(Instant, Instant)> = Vec::new();
    // Phases by start time, to report what nodes answered in each.
    let mut phases: Vec<(&str, Instant)> = vec![("start", Instant::now())];
    wait_settled(&world, &nodes, &uids).await;
    let calm_from = Instant::now();
    phases.push(("calm", calm_from));
    wait_delivered(&world, 200).await;
    calm.push((calm_from, Instant::now()));

    // 1. kill -9 one node, then another.
    phases.push(("kill -9", Instant::now()));
    for victim in [3, 2] {
        let orphans = clients_on(&world, &ids[victim]);
        let t0 = Instant::now();
        c.kill9(victim);
        let times = rehomed(&world, &orphans, &ids[victim], t0).await;
        println!("kill -9 {}: re-home {}", ids[victim], percentiles(times));
        wait_delivered(&world, 100).await;
    }
    c.wait_ready(2, Duration::from_secs(15)).await;

    // 2. Both come back.
    c.spawn(2);
    c.spawn(3);
    c.wait_ready(4, Duration::from_secs(15)).await;
    wait_settled(&world, &nodes, &uids).await;
    let calm_from = Instant::now();
    phases.push(("calm", calm_from));
    wait_delivered(&world, 200).await;
    calm.push((calm_from, Instant::now()));

    // 3. SIGTERM one (graceful drain) and restart it.
    phases.push(("SIGTERM", Instant::now()));
    let orphans = clients_on(&world, &ids[1]);
    let t0 = Instant::now();
    let status = c.terminate(1, Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "graceful stop exits 0: {status:?}"
    );
    let times = rehomed(&world, &orphans, &ids[1], t0).await;
    println!("SIGTERM {}: re-home {}", ids[1], percentiles(times));
    c.spawn(1);
    c.wait_ready(4, Duration::from_secs(15)).await;
    wait_settled(&world, &nodes, &uids).await;
    let calm_from = Instant::now();
    phases.push(("calm", calm_from));
    wait_delivered(&world, 200).await;
    calm.push((calm_from, Instant::now()));

    // 4. SIGSTOP one for longer than failure detection, then SIGCONT.
    phases.push(("SIGSTOP", Instant::now()));
    let orphans = clients_on(&world, &ids[0]);
    let t0 = Instant::now();
    c.signal(0, libc::SIGSTOP);
    c.wait_ready_on(&[1, 2, 3], 3, Duration::from_secs(15))
        .await;
    let times = rehomed(&world, &orphans, &ids[0], t0).await;
    println!("SIGSTOP {}: re-home {}", ids[0], percentiles(times));
    wait_delivered(&world, 100).await;
    c.signal(0, libc::SIGCONT);
    c.wait_ready(4, Duration::from_secs(15)).await;
    wait_settled(&world, &nodes, &uids).await;
    let calm_from = Instant::now();
    phases.push(("calm", calm_from));
    wait_delivered(&world, 200).await;

    // 5. Stop sending and let every send end.
    sending.store(false, std::sync::atomic::Ordering::Relaxed);
    let all_ended = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            {
                let w = world.lock().unwrap();
                if w.outcomes.len() + w.room_outcomes.len() + w.errors.len()
                    == w.sent.len() + w.room_sent.len()
                {
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
    calm.push((calm_from, Instant::now()));
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
    check_attempts(&w, &calm, &phases);
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
    check_rooms(&w, &calm);
    println!(
        "sends {}, delivered {}, received {}, resent {}, duplicates suppressed {}, sessions {}, in {:?}",
        w.sent.len(),
        w.outcomes.len(),
        w.received.len(),
        w.resent,
        w.suppressed,
        w.sessions,
        started.elapsed()
    );
    drop(w);

    // Every node is up, healthy, and agrees on membership and the ring.
    let http = reqwest::Client::new();
    let get = |url: String| {
        let http = http.clone();
        async move {
            http.get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let mut rings = Vec::new();
    for p in &c.procs {
        rings.push(get(format!("{}/cluster", p.http)).await["ring_nodes"].clone());
        assert_eq!(get(format!("{}/health", p.http)).await["status"], "ok");
    }
    assert!(rings.windows(2).all(|w| w[0] == w[1]), "{rings:?}");
    let room = http
        .get(format!("{}/api/rooms/{ROOM}", c.procs[0].http))
        .bearer_auth("dev-api-key")
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(room["members"], CLIENTS as u64, "{room}");
    assert_eq!(rings[0].as_array().unwrap().len(), NODES);
    for i in 0..NODES {
        let log = c.log(i);
        assert!(!log.contains("panicked"), "node {i} panicked:\n{log}");
    }
}

/// Rooms: every room send ended in a result (a membership lost would show as `forbidden`), no
/// member got a room message twice, and in a calm window every member got it.
fn check_rooms(w: &World, calm: &[(Instant, Instant)]) {
    let refused: Vec<_> = w
        .room_outcomes
        .iter()
        .filter(|(_, (o, _))| matches!(o, RoomSendOutcome::Failed(_)))
        .take(10)
        .collect();
    assert!(refused.is_empty(), "room sends refused: {refused:?}");
    let dups: Vec<_> = w.room_received.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "room messages surfaced twice: {dups:?}");
    let mut in_calm = 0;
    for (key, (outcome, answered)) in &w.room_outcomes {
        let written = w.room_sent[key];
        if !calm
            .iter()
            .any(|(from, to)| written >= *from && answered <= to)
        {
            continue;
        }
        in_calm += 1;
        assert_eq!(
            *outcome,
            RoomSendOutcome::Done {
                members: CLIENTS as u32,
                delivered: CLIENTS as u32,
                offline: 0,
                failed: 0
            },
            "room send {key:?} in a calm window"
        );
    }
    assert!(in_calm >= 20, "only {in_calm} room sends in calm windows");
    println!(
        "room sends {}, in calm windows {in_calm}, room messages received {}, rooms joined \
         again by SDKs {}",
        w.room_sent.len(),
        w.room_received.len(),
        w.rejoined
    );
}

/// What the nodes answered, before any SDK retry: only reasons a fault explains, and in a calm
/// window (every node up and linked, every client at its owner) nothing but `delivered`.
fn check_attempts(w: &World, calm: &[(Instant, Instant)], phases: &[(&str, Instant)]) {
    use std::collections::BTreeMap;
    let phase_of = |t: tokio::time::Instant| {
        let t = t.into_std();
        phases.iter().rposition(|(_, from)| *from <= t).unwrap_or(0)
    };
    let mut per_phase: Vec<BTreeMap<String, u64>> = vec![BTreeMap::new(); phases.len()];
    for (_, a) in &w.attempts {
        let key = match a.outcome {
            SendOutcome::Delivered => "delivered".to_string(),
            SendOutcome::Failed(r) => format!("failed:{}", r.as_str()),
        };
        *per_phase[phase_of(a.answered)].entry(key).or_default() += 1;
    }
    for ((name, _), counts) in phases.iter().zip(&per_phase) {
        println!("node answers during {name}: {counts:?}");
        // A graceful stop hands sessions, held messages and forwards over: nothing fails.
        if *name == "SIGTERM" {
            assert!(
                counts.keys().all(|k| k == "delivered"),
                "a graceful stop failed sends: {counts:?}"
            );
        }
    }
    let unexplained: Vec<_> = w
        .attempts
        .iter()
        .filter(|(_, a)| {
            !matches!(
                a.outcome,
                SendOutcome::Delivered
                    | SendOutcome::Failed(
                        FailReason::Unreachable | FailReason::Timeout | FailReason::Offline
                    )
            )
        })
        .take(10)
        .collect();
    assert!(
        unexplained.is_empty(),
        "answers no fault explains: {unexplained:?}"
    );
    for (from, to) in calm {
        let inside: Vec<_> = w
            .attempts
            .iter()
            .filter(|(_, a)| a.written.into_std() >= *from && a.answered.into_std() <= *to)
            .collect();
        assert!(
            inside.len() >= 100,
            "a calm window with {} answers",
            inside.len()
        );
        let bad: Vec<_> = inside
            .iter()
            .filter(|(_, a)| a.outcome != SendOutcome::Delivered)
            .take(10)
            .collect();
        assert!(bad.is_empty(), "failed in a calm window: {bad:?}");
    }
}
