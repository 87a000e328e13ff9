//! Process-level tests: real `imgate node` processes on loopback, killed with SIGKILL, and
//! `imgate up`.
//!
//! Ports are found by binding port 0 and releasing it just before the node binds it again.

mod cluster_support;
mod proc_support;

use proc_support::ProcCluster;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Outcome reasons a send may end with while a node dies; anything else is a bug.
const ALLOWED: [&str; 4] = [
    "delivered",
    "failed:unreachable",
    "failed:timeout",
    "failed:offline",
];

/// A send as the test saw it.
struct Send {
    /// Epoch (see [`Shared::epoch`]) when it was last written.
    written: u64,
    /// Its outcome and the epoch it arrived in.
    outcome: Option<(String, u64)>,
}

#[derive(Default)]
struct Tally {
    /// (sender, id) -> what happened to it.
    sends: HashMap<(String, String), Send>,
    /// Outcomes that arrived for a send that already had one, or that was never made.
    stray_outcomes: Vec<String>,
    /// (from, id) that a recipient received.
    received: HashSet<(String, String)>,
    /// Each user's node of its current session.
    at: HashMap<String, (String, Instant)>,
}

/// What the test and the users share.
struct Shared {
    tally: Mutex<Tally>,
    /// Phases of the test. Odd epochs are calm: every node up (or the dead one out of every
    /// view), every user at its owner, no fault under way. A send written and resolved within
    /// one calm epoch must end `delivered`.
    epoch: AtomicU64,
    sending: AtomicBool,
}

impl Shared {
    fn calm(epoch: u64) -> bool {
        epoch % 2 == 1
    }
}

/// Logs in at the first node that answers and connects to the owner it names (following
/// `moved`); returns the socket and the node that welcomed it. Bounded: panics after 20 s.
async fn connect(
    http: &reqwest::Client,
    uid: &str,
    nodes: &[String],
) -> (
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    String,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut attempt = uid.len();
    while Instant::now() < deadline {
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let base = &nodes[attempt % nodes.len()];
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
        let (Some(mut url), Some(token)) = (
            l["url"].as_str().map(str::to_string),
            l["token"].as_str().map(str::to_string),
        ) else {
            continue;
        };
        for _ in 0..3 {
            let Ok(Ok((mut s, _))) = tokio::time::timeout(
                Duration::from_millis(500),
                tokio_tungstenite::connect_async(format!("{url}?token={token}")),
            )
            .await
            else {
                break;
            };
            let Ok(Some(Ok(Message::Text(t)))) =
                tokio::time::timeout(Duration::from_secs(2), s.next()).await
            else {
                break;
            };
            let w: Value = serde_json::from_str(&t).unwrap();
            match w["type"].as_str() {
                Some("welcome") => return (s, w["node"].as_str().unwrap().to_string()),
                Some("moved") => url = w["url"].as_str().unwrap().to_string(),
                _ => break,
            }
        }
    }
    panic!("{uid} could not log in within 20 s");
}

/// One user: sends to its peers every 50 ms, acks what it gets, reconnects when its session
/// ends and then writes again every send that has no outcome yet (same id).
async fn user_loop(
    uid: String,
    peers: Vec<String>,
    nodes: Vec<String>,
    shared: Arc<Shared>,
    done: tokio_util::sync::CancellationToken,
) {
    let http = reqwest::Client::new();
    let mut n = 0u64;
    // Sends without an outcome: id -> recipient, in the order they were made.
    let mut open: Vec<(String, String)> = Vec::new();
    loop {
        let (ws, node) = tokio::select! {
            _ = done.cancelled() => return,
            c = connect(&http, &uid, &nodes) => c,
        };
        shared
            .tally
            .lock()
            .unwrap()
            .at
            .insert(uid.clone(), (node, Instant::now()));
        let (mut tx, mut rx) = ws.split();
        let write = |id: &str, to: &str| {
            let epoch = shared.epoch.load(Ordering::SeqCst);
            let mut t = shared.tally.lock().unwrap();
            let s = t
                .sends
                .entry((uid.clone(), id.to_string()))
                .or_insert(Send {
                    written: epoch,
                    outcome: None,
                });
            s.written = epoch;
            Message::Text(
                json!({"type": "send", "id": id, "to": to, "body": id})
                    .to_string()
                    .into(),
            )
        };
        let mut broken = false;
        for (id, to) in &open {
            if tx.send(write(id, to)).await.is_err() {
                broken = true;
                break;
            }
        }
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        while !broken {
            tokio::select! {
                _ = done.cancelled() => return,
                _ = tick.tick() => {
                    if !shared.sending.load(Ordering::SeqCst) { continue }
                    n += 1;
                    let to = peers[(n as usize) % peers.len()].clone();
                    let id = format!("{uid}-{n}");
                    let frame = write(&id, &to);
                    open.push((id, to));
                    broken = tx.send(frame).await.is_err();
                }
                m = rx.next() => {
                    let Some(Ok(m)) = m else { break };
                    let Message::Text(t) = m else { continue };
                    let f: Value = serde_json::from_str(&t).unwrap();
                    match f["type"].as_str() {
                        Some("msg") => {
                            shared.tally.lock().unwrap().received.insert((
                                f["from"].as_str().unwrap().to_string(),
                                f["id"].as_str().unwrap().to_string(),
                            ));
                            let ack = json!({"type": "ack", "seq": f["seq"]});
                            broken = tx.send(Message::Text(ack.to_string().into())).await.is_err();
                        }
                        Some(kind @ ("delivered" | "failed")) => {
                            let id = f["id"].as_str().unwrap().to_string();
                            let outcome = match f["reason"].as_str() {
                                Some(r) => format!("{kind}:{r}"),
                                None => kind.to_string(),
                            };
                            open.retain(|(i, _)| *i != id);
                            let epoch = shared.epoch.load(Ordering::SeqCst);
                            let mut t = shared.tally.lock().unwrap();
                            match t.sends.get_mut(&(uid.clone(), id.clone())) {
                                Some(s) if s.outcome.is_none() => s.outcome = Some((outcome, epoch)),
                                _ => t.stray_outcomes.push(format!("{uid} {id} {outcome}")),
                            }
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

/// Waits until `cond` holds on the tally (bounded).
async fn wait_tally(shared: &Shared, limit: Duration, cond: impl Fn(&Tally) -> bool) {
    cluster_support::wait_until(limit, || cond(&shared.tally.lock().unwrap())).await;
}

fn delivered(t: &Tally) -> usize {
    t.sends
        .values()
        .filter(|s| s.outcome.as_ref().is_some_and(|(o, _)| o == "delivered"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_one_of_three_under_traffic() {
    let mut c = ProcCluster::start(
        3,
        "[delivery]\nack_timeout_ms = 500\nmax_retries = 3\nhold_ms = 3000\n",
    );
    let join = c.wait_ready(3, Duration::from_secs(20)).await;
    println!("three processes joined, every link up, in {join:?}");
    let nodes: Vec<String> = c.procs.iter().map(|p| p.http.clone()).collect();
    let uids: Vec<String> = (0..24).map(|i| format!("user{i}")).collect();
    let shared = Arc::new(Shared {
        tally: Mutex::new(Tally::default()),
        epoch: AtomicU64::new(0),
        sending: AtomicBool::new(false),
    });
    let done = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    for uid in &uids {
        let peers: Vec<String> = uids.iter().filter(|u| *u != uid).cloned().collect();
        tasks.push(tokio::spawn(user_loop(
            uid.clone(),
            peers,
            nodes.clone(),
            shared.clone(),
            done.clone(),
        )));
    }
    // Calm: everyone is connected; traffic flows.
    wait_tally(&shared, Duration::from_secs(20), |t| {
        t.at.len() == uids.len()
    })
    .await;
    shared.epoch.store(1, Ordering::SeqCst);
    shared.sending.store(true, Ordering::SeqCst);
    wait_tally(&shared, Duration::from_secs(20), |t| delivered(t) >= 100).await;

    // The fault: kill -9 one node under traffic.
    let victim = 2;
    let victim_id = c.procs[victim].id.clone();
    let orphans: Vec<String> = {
        let t = shared.tally.lock().unwrap();
        t.at.iter()
            .filter(|(_, (n, _))| *n == victim_id)
            .map(|(u, _)| u.clone())
            .collect()
    };
    assert!(!orphans.is_empty(), "some users live on {victim_id}");
    shared.epoch.store(2, Ordering::SeqCst);
    let kill_time = Instant::now();
    c.kill9(victim);
    let detect = c.wait_ready(2, Duration::from_secs(20)).await;
    println!("survivors dropped the killed node and are ready in {detect:?}");
    // Every user of the killed node is welcomed again by a survivor.
    wait_tally(&shared, Duration::from_secs(20), |t| {
        orphans.iter().all(|u| {
            t.at.get(u)
                .is_some_and(|(n, at)| *n != victim_id && *at > kill_time)
        })
    })
    .await;
    let mut rehome: Vec<Duration> = {
        let t = shared.tally.lock().unwrap();
        orphans.iter().map(|u| t.at[u].1 - kill_time).collect()
    };

    // Calm again: traffic among the survivors' users, then sends stop and every send ends.
    shared.epoch.store(3, Ordering::SeqCst);
    let before = delivered(&shared.tally.lock().unwrap());
    wait_tally(&shared, Duration::from_secs(20), |t| {
        delivered(t) >= before + 100
    })
    .await;
    shared.sending.store(false, Ordering::SeqCst);
    wait_tally(&shared, Duration::from_secs(30), |t| {
        t.sends.values().all(|s| s.outcome.is_some())
    })
    .await;
    done.cancel();
    for t in tasks {
        t.await.unwrap();
    }

    let t = std::mem::take(&mut *shared.tally.lock().unwrap());
    let mut by_outcome: HashMap<&str, u64> = HashMap::new();
    for s in t.sends.values() {
        *by_outcome
            .entry(s.outcome.as_ref().unwrap().0.as_str())
            .or_default() += 1;
    }
    println!(
        "kill -9: {} users re-homed, p50 {:?}, max {:?}; {} sends, outcomes {by_outcome:?}",
        rehome.len(),
        percentile(&mut rehome, 0.5),
        percentile(&mut rehome, 1.0),
        t.sends.len(),
    );
    assert!(
        t.stray_outcomes.is_empty(),
        "a send had two outcomes, or an outcome came for no send: {:?}",
        t.stray_outcomes
    );
    let odd: Vec<_> = by_outcome.keys().filter(|o| !ALLOWED.contains(o)).collect();
    assert!(odd.is_empty(), "outcomes no fault explains: {odd:?}");
    // Within a calm phase nothing may fail: written and resolved in one calm epoch => delivered.
    for epoch in [1, 3] {
        let calm: Vec<_> = t
            .sends
            .iter()
            .filter(|(_, s)| s.written == epoch && s.outcome.as_ref().unwrap().1 == epoch)
            .collect();
        assert!(calm.len() >= 50, "epoch {epoch}: only {} sends", calm.len());
        let bad: Vec<_> = calm
            .iter()
            .filter(|(_, s)| s.outcome.as_ref().unwrap().0 != "delivered")
            .map(|(k, s)| (k, &s.outcome))
            .take(10)
            .collect();
        assert!(
            bad.is_empty(),
            "calm epoch {epoch}: sends that did not end delivered: {bad:?}"
        );
        assert!(Shared::calm(epoch));
    }
    let missing: Vec<_> = t
        .sends
        .iter()
        .filter(|(_, s)| s.outcome.as_ref().unwrap().0 == "delivered")
        .filter(|(k, _)| !t.received.contains(k))
        .map(|(k, _)| k)
        .collect();
    assert!(
        missing.is_empty(),
        "delivered but never received: {missing:?}"
    );
    // The killed node comes back on the same addresses and is in every live set again.
    c.spawn(victim);
    let rejoin = c.wait_ready(3, Duration::from_secs(20)).await;
    println!("restarted node back in every live set, every link up, in {rejoin:?}");
    for i in 0..3 {
        let log = c.log(i);
        assert!(!log.contains("panicked"), "node {i} panicked:\n{log}");
    }
}

/// `imgate up` says the cluster is ready only when it is: from that line on, a login at any
/// node names the owner that welcomes the session (never `moved`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_says_ready_when_every_login_is_welcomed() {
    use tokio::io::AsyncBufReadExt;
    let (dir, nodes) = proc_support::write_config(3, "");
    let mut up = tokio::process::Command::new(proc_support::imgate_binary())
        .arg("up")
        .arg("--config")
        .arg(dir.join("cluster.toml"))
        .env("IMGATE_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(up.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.starts_with("[up] cluster ready") || line.starts_with("[up] warning") {
                return line;
            }
        }
        panic!("imgate up ended before the cluster was ready");
    })
    .await
    .expect("imgate up reports readiness within 30 s");
    assert!(ready.starts_with("[up] cluster ready: 3 nodes"), "{ready}");
    let http = reqwest::Client::new();
    for i in 0..60 {
        let uid = format!("ready-{i}");
        let l: Value = http
            .post(format!("{}/login", nodes[i % 3]))
            .json(&json!({"uid": uid}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let url = format!(
            "{}?token={}",
            l["url"].as_str().unwrap(),
            l["token"].as_str().unwrap()
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a first frame")
            .unwrap()
            .unwrap();
        let first: Value = serde_json::from_str(first.to_text().unwrap()).unwrap();
        assert_eq!(first["type"], "welcome", "{uid} at {}: {first}", l["node"]);
        assert_eq!(first["node"], l["node"]);
    }
    // SIGTERM to `up` stops every node gracefully, and `up` itself exits.
    // SAFETY: kill(2) on a child we spawned, with a valid signal number.
    unsafe {
        libc::kill(up.id().unwrap() as libc::pid_t, libc::SIGTERM);
    }
    let status = tokio::time::timeout(Duration::from_secs(20), up.wait())
        .await
        .expect("imgate up stops within 20 s")
        .unwrap();
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `imgate node` and `imgate up` refuse to start on a network with the shipped secrets, and
/// say which keys; `imgate gen-secret` makes one that is accepted.
#[test]
fn binaries_refuse_shipped_secrets_on_a_network() {
    let dir = std::env::temp_dir().join(format!("imgate-weak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cluster.toml");
    let node = "[[nodes]]\nid = \"n1\"\nhttp = \"127.0.0.1:0\"\ngossip = \"127.0.0.1:0\"\n\
                quic = \"127.0.0.1:0\"\nadvertise = \"chat.example.com:443\"\n";
    std::fs::write(&path, node).unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(proc_support::imgate_binary())
            .args(args)
            .env("IMGATE_LOG", "warn")
            .env_remove("IMGATE_CLUSTER_SECRET")
            .env_remove("IMGATE_JWT_SECRET")
            .env_remove("IMGATE_API_KEY")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let config = path.to_str().unwrap();
    for args in [
        &["node", "--config", config, "--id", "n1"][..],
        &["up", "--config", config][..],
    ] {
        let out = run(args);
        assert!(!out.status.success(), "{args:?} started");
        let err = String::from_utf8_lossy(&out.stderr);
        for key in ["cluster.secret", "auth.jwt_secret", "api.keys[0]"] {
            assert!(
                err.contains(&format!("`{key}` is the shipped default")),
                "{args:?}: {err}"
            );
        }
    }
    let secret = run(&["gen-secret"]);
    assert!(secret.status.success());
    let secret = String::from_utf8(secret.stdout).unwrap();
    assert_eq!(secret.trim().len(), 44, "{secret}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A node process whose gossip task dies exits non-zero within 5 s (so that `imgate up`,
/// systemd or Kubernetes restart it) instead of serving a frozen view.
#[test]
fn a_node_whose_gossip_dies_exits_non_zero() {
    let (dir, _) = proc_support::write_config(1, "");
    let mut child = std::process::Command::new(proc_support::imgate_binary())
        .args(["node", "--config"])
        .arg(dir.join("cluster.toml"))
        .args(["--id", "n1"])
        .env("IMGATE_LOG", "info")
        .env("IMGATE_TEST_STOP_GOSSIP_MS", "300")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "still running after 15 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = started.elapsed();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{status:?}\n{err}");
    assert!(err.contains("node degraded"), "{err}");
    // The hook fires 300 ms after start-up; the node reports at once and stops for at most
    // 3 s (`DEGRADED_EXIT`). The bound leaves room for a slow start on a loaded machine.
    assert!(took < Duration::from_secs(10), "{took:?}");
    println!("gossip died at 300 ms; the process exited after {took:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `imgate node` configured by `IMGATE_*` variables alone, in a directory with no file (as in
/// a container): it starts, becomes ready, serves a login, and stops cleanly on SIGTERM. A
/// node the variables do not fully describe refuses to start and names what is missing.
#[tokio::test]
async fn a_node_from_variables_alone_starts_ready_and_stops_on_sigterm() {
    let dir = std::env::temp_dir().join(format!("imgate-env-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let http = proc_support::free_tcp();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_imgate"))
        .arg("node")
        .current_dir(&dir)
        .env("IMGATE_NODE_ID", "e1")
        .env("IMGATE_HTTP", format!("127.0.0.1:{http}"))
        .env(
            "IMGATE_GOSSIP",
            format!("127.0.0.1:{}", proc_support::free_udp()),
        )
        .env(
            "IMGATE_QUIC",
            format!("127.0.0.1:{}", proc_support::free_udp()),
        )
        .env("IMGATE_CLUSTER_ID", "env-test")
        .env("IMGATE_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("imgate runs");
    let base = format!("http://127.0.0.1:{http}");
    let took = imgate::up::wait_ready(std::slice::from_ref(&base), 1, Duration::from_secs(15))
        .await
        .expect("the node never became ready");
    eprintln!("a node from variables alone was ready after {took:?}");
    let login = reqwest::Client::new()
        .post(format!("{base}/login"))
        .json(&json!({"uid": "alice"}))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(login["node"], "e1", "{login}");
    assert_eq!(login["url"], format!("ws://127.0.0.1:{http}/ws"), "{login}");
    let pid = child.id().expect("running") as libc::pid_t;
    // SAFETY: kill(2) on the child we spawned.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("no exit after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
    // Without a file and without --quic: a clear refusal.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_imgate"))
        .args([
            "node",
            "--id",
            "e2",
            "--http",
            "127.0.0.1:0",
            "--gossip",
            "127.0.0.1:0",
        ])
        .current_dir(&dir)
        .env_remove("IMGATE_QUIC")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--quic (IMGATE_QUIC)"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
