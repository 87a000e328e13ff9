//! Process-level tests: real `imgate node` processes on loopback, killed with SIGKILL.
//!
//! Ports are found by binding port 0 and releasing it just before the node binds it again.

mod cluster_support;
mod proc_support;

use proc_support::ProcCluster;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[derive(Default)]
struct Tally {
    /// (sender, id) that the sender saw `delivered`.
    delivered: HashSet<(String, String)>,
    /// (from, id) that a recipient received.
    received: HashSet<(String, String)>,
    /// Re-home times (kill → welcome again) of the killed node's users.
    rehome: Vec<Duration>,
    /// Outcomes seen by reason.
    outcomes: HashMap<String, u64>,
}

/// One user: logs in at any live node, sends to peers, acks, reconnects after a kill.
async fn user_loop(
    uid: String,
    peers: Vec<String>,
    nodes: Vec<String>,
    tally: Arc<Mutex<Tally>>,
    killed_at: Arc<Mutex<Option<(Instant, String)>>>,
    stop_sending: Arc<std::sync::atomic::AtomicBool>,
    done: tokio_util::sync::CancellationToken,
) {
    let http = reqwest::Client::new();
    let mut n = 0u64;
    let mut lost_node: Option<String> = None;
    'session: loop {
        // Log in at the first node that answers, connect to the owner it names.
        let mut ws = None;
        for attempt in 0..300 {
            let base = &nodes[(attempt + uid.len()) % nodes.len()];
            let Ok(resp) = http
                .post(format!("{base}/login"))
                .json(&json!({"uid": uid}))
                .timeout(Duration::from_millis(500))
                .send()
                .await
            else {
                continue;
            };
            let Ok(l) = resp.json::<Value>().await else {
                continue;
            };
            let url = format!(
                "{}?token={}",
                l["url"].as_str().unwrap_or(""),
                l["token"].as_str().unwrap_or("")
            );
            if let Ok(Ok((mut s, _))) = tokio::time::timeout(
                Duration::from_millis(500),
                tokio_tungstenite::connect_async(url),
            )
            .await
                && let Ok(Some(Ok(Message::Text(t)))) =
                    tokio::time::timeout(Duration::from_secs(2), s.next()).await
            {
                let w: Value = serde_json::from_str(&t).unwrap();
                if w["type"] == "welcome" {
                    if let (Some(lost), Some((at, killed))) =
                        (&lost_node, killed_at.lock().unwrap().clone())
                        && *lost == killed
                    {
                        tally.lock().unwrap().rehome.push(at.elapsed());
                    }
                    lost_node = Some(w["node"].as_str().unwrap().to_string());
                    ws = Some(s);
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let Some(ws) = ws else {
            panic!("{uid} could not log in again")
        };
        let (mut tx, mut rx) = ws.split();
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = done.cancelled() => return,
                _ = tick.tick() => {
                    if stop_sending.load(std::sync::atomic::Ordering::Relaxed) { continue }
                    n += 1;
                    let to = &peers[(n as usize) % peers.len()];
                    let f = json!({"type": "send", "id": format!("{uid}-{n}"), "to": to, "body": n});
                    if tx.send(Message::Text(f.to_string().into())).await.is_err() { continue 'session }
                }
                m = rx.next() => {
                    let Some(Ok(m)) = m else { continue 'session };
                    let Message::Text(t) = m else { continue };
                    let f: Value = serde_json::from_str(&t).unwrap();
                    match f["type"].as_str() {
                        Some("msg") => {
                            tally.lock().unwrap().received.insert((
                                f["from"].as_str().unwrap().to_string(),
                                f["id"].as_str().unwrap().to_string(),
                            ));
                            let ack = json!({"type": "ack", "seq": f["seq"]});
                            if tx.send(Message::Text(ack.to_string().into())).await.is_err() { continue 'session }
                        }
                        Some("delivered") => {
                            let mut t = tally.lock().unwrap();
                            t.delivered.insert((uid.clone(), f["id"].as_str().unwrap().to_string()));
                            *t.outcomes.entry("delivered".into()).or_default() += 1;
                        }
                        Some("failed") => {
                            let mut t = tally.lock().unwrap();
                            *t.outcomes.entry(format!("failed:{}", f["reason"].as_str().unwrap())).or_default() += 1;
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_one_of_three_under_traffic() {
    let mut c = ProcCluster::start(
        3,
        "[delivery]\nack_timeout_ms = 500\nmax_retries = 3\nhold_ms = 3000\n",
    );
    let join = c.wait_members(3, Duration::from_secs(20)).await;
    println!("three processes joined in {join:?}");
    let nodes: Vec<String> = c.procs.iter().map(|p| p.http.clone()).collect();
    let uids: Vec<String> = (0..24).map(|i| format!("user{i}")).collect();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let killed_at = Arc::new(Mutex::new(None));
    let stop_sending = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    for uid in &uids {
        let peers: Vec<String> = uids.iter().filter(|u| *u != uid).cloned().collect();
        tasks.push(tokio::spawn(user_loop(
            uid.clone(),
            peers,
            nodes.clone(),
            tally.clone(),
            killed_at.clone(),
            stop_sending.clone(),
            done.clone(),
        )));
    }
    // Traffic flows before the kill.
    cluster_support::wait_until(Duration::from_secs(20), || {
        tally.lock().unwrap().delivered.len() >= 100
    })
    .await;
    let victim = 2;
    *killed_at.lock().unwrap() = Some((Instant::now(), c.procs[victim].id.clone()));
    let kill_time = Instant::now();
    c.kill9(victim);
    let detect = c.wait_members(2, Duration::from_secs(20)).await;
    println!("survivors dropped the killed node from their live sets in {detect:?}");
    // Traffic keeps flowing after the kill, then sends stop and outcomes drain.
    let before = tally.lock().unwrap().delivered.len();
    cluster_support::wait_until(Duration::from_secs(20), || {
        tally.lock().unwrap().delivered.len() >= before + 100
    })
    .await;
    stop_sending.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await; // retries and holds end: ack 0.5 s × 4, hold 3 s
    done.cancel();
    for t in tasks {
        t.await.unwrap();
    }
    let mut t = std::mem::take(&mut *tally.lock().unwrap());
    let missing: Vec<_> = t
        .delivered
        .iter()
        .filter(|(sender, id)| !t.received.contains(&(sender.clone(), id.clone())))
        .collect();
    assert!(
        missing.is_empty(),
        "delivered but never received: {missing:?}"
    );
    let rehomed = t.rehome.len();
    assert!(
        rehomed > 0,
        "some users lived on the killed node and came back"
    );
    let p50 = percentile(&mut t.rehome, 0.5);
    let max = percentile(&mut t.rehome, 1.0);
    println!(
        "kill -9 at +{:?}: {} users re-homed, p50 {p50:?}, max {max:?}; outcomes {:?}",
        kill_time.elapsed(),
        rehomed,
        t.outcomes
    );
    // The killed node comes back on the same addresses and is in every live set again.
    c.spawn(victim);
    let rejoin = c.wait_members(3, Duration::from_secs(20)).await;
    println!("restarted node back in every live set in {rejoin:?}");
    for i in 0..3 {
        let log = c.log(i);
        assert!(!log.contains("panicked"), "node {i} panicked:\n{log}");
    }
}
