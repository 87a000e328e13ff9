//! Load generator: imgate against a Socket.IO 4 + Redis cluster and a raw relay, same client.
//!
//! ```text
//! cargo build --release --bins --examples
//! cargo run --release --example bench -- chat --target imgate --users 300 --window 8 --seconds 10
//! cargo run --release --example bench -- idle --target imgate --sessions 10000,50000,100000
//! cargo run --release --example bench -- login --concurrency 64 --seconds 5
//! cargo run --release --example bench -- failover --users 1000
//! cargo run --release --example bench -- room --target imgate --members 1000 --senders 10
//! ```
//! Each run starts its own servers (imgate nodes from the binary next to this example, the
//! relay example, or `node bench/socketio/server.js` with a local `redis-server`), measures,
//! stops them, and prints a human table and one JSON line (also appended to `--json-out`).
//! `bench/run.sh` runs the whole comparison.
//!
//! Scenarios:
//! - `chat`: N users, each with at most W sends outstanding, over 3 nodes (recipients on
//!   another node than their sender); a message counts when its end-to-end ack reaches the
//!   sender. Reports msgs/s, latency p50/p99/p99.9/max, failures, CPU and peak RSS per server.
//! - `idle`: K idle sessions on one node, client sockets spread over 127.0.0.x source
//!   addresses; reports server RSS per session at each step.
//! - `login`: logins/s against one imgate node with C concurrent clients.
//! - `failover`: re-home time of the users of one of three imgate nodes after kill -9.
//! - `room`: one room of M members spread over 3 nodes, S of them sending (W room sends
//!   outstanding each); every member acks every room message. Reports member-acked
//!   deliveries/s (the `delivered` of imgate's `room_result`, less the sender itself; the
//!   sockets that acked `emitWithAck` for Socket.IO) and the latency from a send to its
//!   result, which comes once the last member acked.

#[path = "../tests/proc_support/mod.rs"]
mod proc_support;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::net::TcpSocket;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[derive(Parser)]
#[command(about = "imgate load generator")]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
    /// Append the JSON result line to this file.
    #[arg(long, global = true)]
    json_out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Scenario {
    /// End-to-end acked messages over a 3-node cluster.
    Chat {
        #[arg(long, value_enum, default_value_t = Target::Imgate)]
        target: Target,
        /// Users (each sends and receives).
        #[arg(long, default_value_t = 300)]
        users: usize,
        /// Sends outstanding per user.
        #[arg(long, default_value_t = 8)]
        window: usize,
        /// Measured seconds (after a 2 s warm-up).
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Cap on the total send rate, messages/s (0: as fast as acks allow).
        #[arg(long, default_value_t = 0)]
        rate: u64,
    },
    /// Idle sessions on one node: RSS per session.
    Idle {
        #[arg(long, value_enum, default_value_t = Target::Imgate)]
        target: Target,
        /// Session counts to measure at, ascending.
        #[arg(long, value_delimiter = ',', default_value = "10000,50000,100000")]
        sessions: Vec<usize>,
    },
    /// Logins per second against one imgate node.
    Login {
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Re-home time after kill -9 of one of three imgate nodes.
    Failover {
        #[arg(long, default_value_t = 1000)]
        users: usize,
    },
    /// One room over a 3-node cluster: member-acked deliveries/s and latency to the last
    /// member.
    Room {
        #[arg(long, value_enum, default_value_t = Target::Imgate)]
        target: Target,
        /// Members of the room (each acks every room message).
        #[arg(long, default_value_t = 1000)]
        members: usize,
        /// Members that send.
        #[arg(long, default_value_t = 10)]
        senders: usize,
        /// Room sends outstanding per sender.
        #[arg(long, default_value_t = 4)]
        window: usize,
        /// Measured seconds (after a 2 s warm-up).
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Target {
    Imgate,
    Socketio,
    Relay,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Imgate => "imgate",
            Target::Socketio => "socketio",
            Target::Relay => "relay",
        }
    }
}

// ----- servers ---------------------------------------------------------------------------

struct Server {
    name: String,
    child: Child,
    /// `host:port` clients connect to.
    addr: String,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

struct Servers {
    list: Vec<Server>,
    redis: Option<Child>,
    _cluster: Option<proc_support::ProcCluster>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for s in &mut self.list {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
        if let Some(r) = &mut self.redis {
            let _ = r.kill();
            let _ = r.wait();
        }
    }
}

fn exe_dir() -> PathBuf {
    // target/<profile>/examples/bench -> target/<profile>/examples
    std::env::current_exe()
        .expect("current exe")
        .parent()
        .expect("examples dir")
        .to_path_buf()
}

/// Starts `n` imgate nodes with long keepalive timeouts (idle sessions must stay).
async fn start_imgate(n: usize) -> anyhow::Result<Servers> {
    let mut cluster = proc_support::ProcCluster::start(
        n,
        "[websocket]\nping_interval_ms = 300000\nidle_timeout_ms = 900000\n\
         [limits]\nmax_sessions = 1000000\nsends_per_second = 100000\n",
    );
    cluster.wait_ready(n as u64, Duration::from_secs(20)).await;
    // The bench measures and kills the processes itself; the cluster keeps the config
    // directory (and the node logs) until the servers are dropped.
    let list = cluster
        .procs
        .iter_mut()
        .map(|p| Server {
            name: p.id.clone(),
            child: p.child.take().expect("started"),
            addr: p.http.trim_start_matches("http://").to_string(),
        })
        .collect();
    Ok(Servers {
        list,
        redis: None,
        _cluster: Some(cluster),
    })
}

async fn start_relay() -> anyhow::Result<Servers> {
    let port = proc_support::free_tcp();
    let child = Command::new(exe_dir().join("relay"))
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .spawn()
        .context("starting the relay example (cargo build --examples)")?;
    let addr = format!("127.0.0.1:{port}");
    wait_for(Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(&addr).await.is_ok()
    })
    .await?;
    Ok(Servers {
        list: vec![Server {
            name: "relay".into(),
            child,
            addr,
        }],
        redis: None,
        _cluster: None,
    })
}

/// Starts Redis and `n` Socket.IO processes; a start that does not come up (a port taken
/// meanwhile, loopback ports still in TIME_WAIT) is tried again on other ports, three times
/// in all.
async fn start_socketio(n: usize) -> anyhow::Result<Servers> {
    let mut last = None;
    for attempt in 1..=3 {
        match start_socketio_once(n).await {
            Ok(s) => return Ok(s),
            Err(e) => {
                println!("  socket.io cluster did not come up (attempt {attempt}): {e}");
                last = Some(e);
            }
        }
    }
    Err(last.expect("three attempts"))
}

async fn start_socketio_once(n: usize) -> anyhow::Result<Servers> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/socketio");
    if !dir.join("node_modules").exists() {
        bail!("bench/socketio/node_modules missing: run bench/setup.sh");
    }
    let redis_port = proc_support::free_tcp();
    let redis = Command::new("redis-server")
        .args([
            "--port",
            &redis_port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .context("starting redis-server (bench/setup.sh installs it)")?;
    // Owned by `servers` from here, so that a start that fails kills what it started.
    let mut servers = Servers {
        list: Vec::new(),
        redis: Some(redis),
        _cluster: None,
    };
    let raddr = format!("127.0.0.1:{redis_port}");
    // After the idle scenario's tens of thousands of connections, loopback ports sit in
    // TIME_WAIT for up to 60 s and a connect may fail until they drain.
    wait_for(Duration::from_secs(75), || async {
        tokio::net::TcpStream::connect(&raddr).await.is_ok()
    })
    .await?;
    for i in 0..n {
        let port = proc_support::free_tcp();
        let child = Command::new("node")
            .arg(dir.join("server.js"))
            .arg(port.to_string())
            .env("REDIS_URL", format!("redis://{raddr}"))
            .stdout(Stdio::null())
            .spawn()
            .context("starting node")?;
        servers.list.push(Server {
            name: format!("sio{}", i + 1),
            child,
            addr: format!("127.0.0.1:{port}"),
        });
    }
    for s in &servers.list {
        wait_for(Duration::from_secs(75), || async {
            tokio::net::TcpStream::connect(&s.addr).await.is_ok()
        })
        .await?;
    }
    Ok(servers)
}

async fn wait_for<F, Fut>(limit: Duration, mut probe: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !probe().await {
        if start.elapsed() > limit {
            bail!("not ready within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// CPU seconds (user + system) of a process.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

// ----- clients ---------------------------------------------------------------------------

type Ws = WebSocketStream<tokio::net::TcpStream>;

fn client_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// Opens a TCP connection from 127.0.0.`src` and upgrades it to a WebSocket at `url`.
async fn ws_connect(url: &str, src: u8) -> anyhow::Result<Ws> {
    let uri: tokio_tungstenite::tungstenite::http::Uri = url.parse()?;
    let host = uri.host().context("host")?;
    let port = uri.port_u16().context("port")?;
    let addr: SocketAddr = format!("{host}:{port}").parse()?;
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, src.max(1))),
        0,
    ))?;
    let tcp = socket.connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(url, tcp, Some(client_ws_config())).await?;
    Ok(ws)
}

/// A connected bench user, speaking one target's protocol.
struct User {
    target: Target,
    uid: String,
    /// The server address the session is on (after following `moved`).
    addr: String,
    ws: Ws,
}

/// Most `moved` answers an imgate user follows while connecting (as the SDK does).
const MAX_MOVES: usize = 3;

/// `moved` answers followed while connecting, reported with the chat results.
static MOVES_FOLLOWED: AtomicU64 = AtomicU64::new(0);

const BODY: &str = "hello from the imgate bench";

impl User {
    async fn connect(
        target: Target,
        addr: &str,
        uid: &str,
        token: Option<&str>,
        src: u8,
    ) -> anyhow::Result<User> {
        let url = match target {
            Target::Imgate => format!("ws://{addr}/ws?token={}", token.context("token")?),
            Target::Relay => format!("ws://{addr}/?uid={uid}"),
            Target::Socketio => format!("ws://{addr}/socket.io/?EIO=4&transport=websocket"),
        };
        let mut ws = ws_connect(&url, src).await?;
        let mut addr = addr.to_string();
        // Wait for the session to be live.
        match target {
            Target::Imgate => {
                let token = token.context("token")?;
                let mut moves = 0;
                loop {
                    let first = next_text(&mut ws).await?;
                    let f: Value = serde_json::from_str(&first)?;
                    match f["type"].as_str() {
                        Some("welcome") => break,
                        // The owner changed between login and connect: go where it says.
                        Some("moved") if moves < MAX_MOVES => {
                            moves += 1;
                            MOVES_FOLLOWED.fetch_add(1, Ordering::Relaxed);
                            let url = f["url"].as_str().context("moved without url")?;
                            addr = ws_addr(url).to_string();
                            ws = ws_connect(&format!("{url}?token={token}"), src).await?;
                        }
                        _ => bail!("expected welcome, got {first}"),
                    }
                }
            }
            Target::Socketio => {
                let open = next_text(&mut ws).await?;
                if !open.starts_with('0') {
                    bail!("expected an Engine.IO open packet, got {open}");
                }
                ws.send(Message::text(format!("40{}", json!({ "uid": uid }))))
                    .await?;
                loop {
                    let t = next_text(&mut ws).await?;
                    if t.starts_with("40") {
                        break;
                    }
                    if t.starts_with("44") {
                        bail!("socket.io refused the connection: {t}");
                    }
                }
            }
            Target::Relay => {}
        }
        Ok(User {
            target,
            uid: uid.to_string(),
            addr,
            ws,
        })
    }

    fn send_frame(&self, to: &str, id: u64) -> Message {
        match self.target {
            Target::Imgate => Message::text(format!(
                r#"{{"type":"send","id":"{id}","to":"{to}","body":"{BODY}"}}"#
            )),
            Target::Relay => Message::text(format!(
                r#"{{"type":"send","id":"{id}","to":"{to}","from":"{}","body":"{BODY}"}}"#,
                self.uid
            )),
            Target::Socketio => Message::text(format!(
                r#"42{id}["send",{{"to":"{to}","id":"{id}","body":"{BODY}"}}]"#
            )),
        }
    }
}

async fn next_text(ws: &mut Ws) -> anyhow::Result<String> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .context("no frame within 10 s")?
            .context("socket ended")??;
        if let Message::Text(t) = m {
            return Ok(t.to_string());
        }
    }
}

/// What an incoming frame means to a bench user.
enum Seen {
    /// Our message `id` was acked end to end (or failed, when `ok` is false).
    Outcome {
        id: u64,
        ok: bool,
    },
    /// A reply to write (an ack, a pong).
    Reply(Message),
    Nothing,
}

fn classify(target: Target, me: &str, text: &str) -> Seen {
    match target {
        Target::Imgate => {
            let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
            match v["type"].as_str() {
                Some("msg") => Seen::Reply(Message::text(format!(
                    r#"{{"type":"ack","seq":{}}}"#,
                    v["seq"]
                ))),
                Some("delivered") => Seen::Outcome {
                    id: v["id"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0),
                    ok: true,
                },
                Some("failed") => Seen::Outcome {
                    id: v["id"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0),
                    ok: false,
                },
                _ => Seen::Nothing,
            }
        }
        Target::Relay => {
            let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
            match v["type"].as_str() {
                Some("send") => Seen::Reply(Message::text(format!(
                    r#"{{"type":"ack","to":"{}","id":"{}","from":"{me}"}}"#,
                    v["from"].as_str().unwrap_or(""),
                    v["id"].as_str().unwrap_or("")
                ))),
                Some("ack") => Seen::Outcome {
                    id: v["id"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0),
                    ok: true,
                },
                _ => Seen::Nothing,
            }
        }
        Target::Socketio => {
            if text == "2" {
                return Seen::Reply(Message::text("3"));
            }
            if let Some(rest) = text.strip_prefix("43") {
                // 43<ackid>[{"status":...}]
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                let ok = rest[digits.len()..].contains("\"delivered\"");
                return Seen::Outcome {
                    id: digits.parse().unwrap_or(0),
                    ok,
                };
            }
            if let Some(rest) = text.strip_prefix("42") {
                // 42<ackid>["msg",{...}]: ack it.
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                if !digits.is_empty() {
                    return Seen::Reply(Message::text(format!("43{digits}[]")));
                }
            }
            Seen::Nothing
        }
    }
}

// ----- chat --------------------------------------------------------------------------------

struct ChatResult {
    delivered: u64,
    failed: u64,
    hist: Histogram<u64>,
}

async fn login_token(
    http: &reqwest::Client,
    addr: &str,
    uid: &str,
) -> anyhow::Result<(String, String)> {
    let v: Value = http
        .post(format!("http://{addr}/login"))
        .json(&json!({ "uid": uid }))
        .send()
        .await?
        .json()
        .await?;
    let token = v["token"].as_str().context("token")?.to_string();
    let url = v["url"].as_str().context("url")?;
    Ok((token, ws_addr(url).to_string()))
}

/// `host:port` of an imgate WebSocket URL (`ws://host:port/ws`).
fn ws_addr(url: &str) -> &str {
    url.trim_start_matches("ws://").trim_end_matches("/ws")
}

/// What a bench user's socket gave within one wait.
enum Next {
    Text(tokio_tungstenite::tungstenite::Utf8Bytes),
    /// Nothing to read (the refill tick, a non-text frame): go round again.
    Idle,
    /// The socket ended, or the run did.
    End,
}

async fn next_in(ws: &mut Ws, refill: &mut tokio::time::Interval, end_at: Instant) -> Next {
    let m = tokio::select! {
        m = ws.next() => m,
        _ = refill.tick() => return Next::Idle,
        _ = tokio::time::sleep_until(end_at.into()) => return Next::End,
    };
    match m {
        Some(Ok(Message::Text(t))) => Next::Text(t),
        None | Some(Err(_)) => Next::End,
        Some(Ok(_)) => Next::Idle,
    }
}

#[allow(clippy::too_many_arguments)]
async fn chat_user(
    mut user: User,
    to: String,
    window: usize,
    start_at: Instant,
    measure_from: Instant,
    end_at: Instant,
    go: Arc<AtomicBool>,
    budget: Option<Arc<AtomicU64>>,
) -> ChatResult {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
    let mut sent_at: HashMap<u64, Instant> = HashMap::with_capacity(window * 2);
    let mut next_id: u64 = 1;
    let (mut delivered, mut failed) = (0u64, 0u64);
    tokio::time::sleep_until(start_at.into()).await;
    let _ = go.load(Ordering::Relaxed);
    let mut refill = tokio::time::interval(Duration::from_millis(10));
    loop {
        let now = Instant::now();
        if now >= end_at {
            break;
        }
        // Keep the window full (within the global rate budget, if any).
        let mut wrote = false;
        while sent_at.len() < window {
            if let Some(b) = &budget
                && b.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
                    .is_err()
            {
                break;
            }
            let frame = user.send_frame(&to, next_id);
            if user.ws.feed(frame).await.is_err() {
                return ChatResult {
                    delivered,
                    failed,
                    hist,
                };
            }
            sent_at.insert(next_id, Instant::now());
            next_id += 1;
            wrote = true;
        }
        if wrote && user.ws.flush().await.is_err() {
            break;
        }
        let t = match next_in(&mut user.ws, &mut refill, end_at).await {
            Next::Text(t) => t,
            Next::Idle => continue,
            Next::End => break,
        };
        match classify(user.target, &user.uid, &t) {
            Seen::Outcome { id, ok } => {
                if let Some(at) = sent_at.remove(&id) {
                    let now = Instant::now();
                    if now >= measure_from {
                        if ok {
                            delivered += 1;
                            let _ = hist.record((now - at).as_micros().max(1) as u64);
                        } else {
                            failed += 1;
                        }
                    }
                }
            }
            Seen::Reply(r) => {
                if user.ws.send(r).await.is_err() {
                    break;
                }
            }
            Seen::Nothing => {}
        }
    }
    ChatResult {
        delivered,
        failed,
        hist,
    }
}

async fn chat(
    target: Target,
    users: usize,
    window: usize,
    seconds: f64,
    rate: u64,
) -> anyhow::Result<Value> {
    let servers = match target {
        Target::Imgate => start_imgate(3).await?,
        Target::Socketio => start_socketio(3).await?,
        Target::Relay => start_relay().await?,
    };
    let http = reqwest::Client::new();
    let uids: Vec<String> = (0..users).map(|i| format!("u{i}")).collect();
    // Where each user connects, and its partner on another node.
    let mut placed: Vec<(String, String, Option<String>)> = Vec::new(); // (uid, addr, token)
    for (i, uid) in uids.iter().enumerate() {
        match target {
            Target::Imgate => {
                let entry = &servers.list[i % servers.list.len()].addr;
                let (token, owner) = login_token(&http, entry, uid).await?;
                placed.push((uid.clone(), owner, Some(token)));
            }
            _ => placed.push((
                uid.clone(),
                servers.list[i % servers.list.len()].addr.clone(),
                None,
            )),
        }
    }
    let mut connected = Vec::with_capacity(users);
    for (i, (uid, addr, token)) in placed.iter().enumerate() {
        let u = User::connect(target, addr, uid, token.as_deref(), (1 + i % 200) as u8)
            .await
            .with_context(|| format!("connecting {uid}"))?;
        connected.push(u);
    }
    let mut by_node: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, u) in connected.iter().enumerate() {
        by_node.entry(u.addr.clone()).or_default().push(i);
    }
    // Partner of user i: the user at the same position on the next node (a different node
    // whenever there is more than one), by where the sessions really are.
    let nodes: Vec<String> = {
        let mut v: Vec<String> = by_node.keys().cloned().collect();
        v.sort();
        v
    };
    let mut partner = vec![0usize; users];
    for (k, node) in nodes.iter().enumerate() {
        let other = &by_node[&nodes[(k + 1) % nodes.len()]];
        for (j, &i) in by_node[node].iter().enumerate() {
            partner[i] = other[j % other.len()];
        }
    }
    let cross = (0..users)
        .filter(|&i| connected[i].addr != connected[partner[i]].addr)
        .count();
    let warmup = Duration::from_secs(2);
    let start_at = Instant::now() + Duration::from_millis(200);
    let measure_from = start_at + warmup;
    let end_at = measure_from + Duration::from_secs_f64(seconds);
    let go = Arc::new(AtomicBool::new(true));
    let budget = (rate > 0).then(|| Arc::new(AtomicU64::new(0)));
    if let Some(b) = &budget {
        let b = b.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            loop {
                tick.tick().await;
                b.store(rate / 100, Ordering::Relaxed);
                if Instant::now() > end_at {
                    break;
                }
            }
        });
    }
    let mut tasks = Vec::new();
    for (i, u) in connected.into_iter().enumerate() {
        let to = uids[partner[i]].clone();
        tasks.push(tokio::spawn(chat_user(
            u,
            to,
            window,
            start_at,
            measure_from,
            end_at,
            go.clone(),
            budget.clone(),
        )));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu_before: Vec<f64> = servers.list.iter().map(|s| cpu_seconds(s.pid())).collect();
    let wall = Instant::now();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut delivered, mut failed) = (0, 0);
    for t in tasks {
        let r = t.await?;
        delivered += r.delivered;
        failed += r.failed;
        hist.add(&r.hist)?;
    }
    let wall = wall.elapsed().as_secs_f64().max(seconds);
    let per_server = server_usage(&servers, cpu_before, wall);
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(json!({
        "scenario": "chat", "target": target.name(), "users": users, "window": window,
        "seconds": seconds, "rate_cap": rate, "cross_node_pairs": cross,
        "moved_followed": MOVES_FOLLOWED.load(Ordering::Relaxed),
        "msgs_per_s": (delivered as f64 / seconds).round(), "delivered": delivered, "failed": failed,
        "p50_ms": ms(0.5), "p99_ms": ms(0.99), "p999_ms": ms(0.999), "max_ms": hist.max() as f64 / 1000.0,
        "servers": per_server,
    }))
}

/// Each server's CPU share since `cpu_before` over `wall` seconds, and its peak RSS.
fn server_usage(servers: &Servers, cpu_before: Vec<f64>, wall: f64) -> Vec<Value> {
    servers
        .list
        .iter()
        .zip(cpu_before)
        .map(|(s, before)| {
            json!({
                "name": s.name,
                "cpu_pct": ((cpu_seconds(s.pid()) - before) / wall * 100.0).round(),
                "peak_rss_mib": (status_kib(s.pid(), "VmHWM:") as f64 / 1024.0 * 10.0).round() / 10.0,
            })
        })
        .collect()
}

// ----- room ----------------------------------------------------------------------------------

const ROOM: &str = "bench";
/// The Socket.IO ack id of a member's `join`.
const JOIN_ACK: u64 = 999_999_999;

impl User {
    /// Joins [`ROOM`] and waits for the answer.
    async fn join_room(&mut self) -> anyhow::Result<()> {
        let frame = match self.target {
            Target::Imgate => format!(r#"{{"type":"join","room":"{ROOM}","id":"j"}}"#),
            Target::Socketio => format!(r#"42{JOIN_ACK}["join",{{"room":"{ROOM}"}}]"#),
            Target::Relay => bail!("the relay has no rooms"),
        };
        self.ws.send(Message::text(frame)).await?;
        loop {
            let t = next_text(&mut self.ws).await?;
            let done = match self.target {
                Target::Imgate => t.contains(r#""type":"joined""#),
                _ => t.starts_with(&format!("43{JOIN_ACK}")),
            };
            if done {
                return Ok(());
            }
            if t.contains(r#""type":"failed""#) {
                bail!("join refused: {t}");
            }
        }
    }

    fn room_frame(&self, id: u64) -> Message {
        match self.target {
            Target::Imgate => Message::text(format!(
                r#"{{"type":"send","id":"{id}","room":"{ROOM}","body":"{BODY}"}}"#
            )),
            _ => Message::text(format!(
                r#"42{id}["room_send",{{"room":"{ROOM}","id":"{id}","body":"{BODY}"}}]"#
            )),
        }
    }
}

/// What a room member sees in a frame.
enum RoomSeen {
    /// A room send of ours ended: members that acked (`None`: it failed).
    Result {
        id: u64,
        delivered: Option<u64>,
    },
    /// A reply to write (an ack, a pong).
    Reply(Message),
    Nothing,
}

fn classify_room(target: Target, text: &str) -> RoomSeen {
    match target {
        Target::Imgate => {
            // Most frames are `msg` (the node writes `type` then `seq` first): acked without
            // parsing the rest, as cheaply as the Socket.IO side's prefix check.
            if let Some(rest) = text.strip_prefix(r#"{"type":"msg","seq":"#) {
                let seq: String = rest.chars().take_while(char::is_ascii_digit).collect();
                return RoomSeen::Reply(Message::text(format!(r#"{{"type":"ack","seq":{seq}}}"#)));
            }
            let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
            let id = || v["id"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
            match v["type"].as_str() {
                Some("msg") => RoomSeen::Reply(Message::text(format!(
                    r#"{{"type":"ack","seq":{}}}"#,
                    v["seq"]
                ))),
                // The sender is a member too, counted delivered without an ack of its own:
                // the members that acked are one fewer.
                Some("room_result") => RoomSeen::Result {
                    id: id(),
                    delivered: v["delivered"].as_u64().map(|d| d.saturating_sub(1)),
                },
                Some("failed") => RoomSeen::Result {
                    id: id(),
                    delivered: None,
                },
                _ => RoomSeen::Nothing,
            }
        }
        _ => match classify(target, "", text) {
            Seen::Reply(r) => RoomSeen::Reply(r),
            Seen::Outcome { id, .. } => {
                // 43<id>[{"status":"done","delivered":n,...}]
                let body = text.split_once('[').map_or("", |(_, b)| b);
                let v: Value =
                    serde_json::from_str(body.trim_end_matches(']')).unwrap_or(Value::Null);
                RoomSeen::Result {
                    id,
                    delivered: (v["status"] == "done")
                        .then(|| v["delivered"].as_u64().unwrap_or(0)),
                }
            }
            Seen::Nothing => RoomSeen::Nothing,
        },
    }
}

struct RoomResult {
    results: u64,
    deliveries: u64,
    failed: u64,
    received: u64,
    hist: Histogram<u64>,
}

async fn room_member(
    mut user: User,
    window: usize,
    start_at: Instant,
    measure_from: Instant,
    end_at: Instant,
) -> RoomResult {
    let mut r = RoomResult {
        results: 0,
        deliveries: 0,
        failed: 0,
        received: 0,
        hist: Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
    };
    let mut sent_at: HashMap<u64, Instant> = HashMap::with_capacity(window * 2);
    let mut next_id: u64 = 1;
    tokio::time::sleep_until(start_at.into()).await;
    let mut refill = tokio::time::interval(Duration::from_millis(10));
    loop {
        if Instant::now() >= end_at {
            break;
        }
        let mut wrote = false;
        while sent_at.len() < window {
            if user.ws.feed(user.room_frame(next_id)).await.is_err() {
                return r;
            }
            sent_at.insert(next_id, Instant::now());
            next_id += 1;
            wrote = true;
        }
        if wrote && user.ws.flush().await.is_err() {
            break;
        }
        let t = match next_in(&mut user.ws, &mut refill, end_at).await {
            Next::Text(t) => t,
            Next::Idle => continue,
            Next::End => break,
        };
        match classify_room(user.target, &t) {
            RoomSeen::Result { id, delivered } => {
                if let Some(at) = sent_at.remove(&id) {
                    let now = Instant::now();
                    if now >= measure_from {
                        match delivered {
                            Some(d) => {
                                r.results += 1;
                                r.deliveries += d;
                                let _ = r.hist.record((now - at).as_micros().max(1) as u64);
                            }
                            None => r.failed += 1,
                        }
                    }
                }
            }
            RoomSeen::Reply(m) => {
                if Instant::now() >= measure_from {
                    r.received += 1;
                }
                if user.ws.send(m).await.is_err() {
                    break;
                }
            }
            RoomSeen::Nothing => {}
        }
    }
    r
}

async fn room(
    target: Target,
    members: usize,
    senders: usize,
    window: usize,
    seconds: f64,
) -> anyhow::Result<Value> {
    let fds = raise_fd_limit();
    if members + 200 > fds as usize {
        bail!("{members} members need more than the open-file limit of {fds}");
    }
    let servers = match target {
        Target::Imgate => start_imgate(3).await?,
        Target::Socketio => start_socketio(3).await?,
        Target::Relay => bail!("the relay has no rooms"),
    };
    let http = reqwest::Client::new();
    let mut users = Vec::with_capacity(members);
    for i in 0..members {
        let uid = format!("m{i}");
        let entry = &servers.list[i % servers.list.len()].addr;
        let (addr, token) = match target {
            Target::Imgate => {
                let (token, owner) = login_token(&http, entry, &uid).await?;
                (owner, Some(token))
            }
            _ => (entry.clone(), None),
        };
        let mut u = User::connect(target, &addr, &uid, token.as_deref(), (1 + i % 200) as u8)
            .await
            .with_context(|| format!("connecting {uid}"))?;
        u.join_room()
            .await
            .with_context(|| format!("{uid} joining"))?;
        users.push(u);
    }
    let spread: HashMap<String, usize> = users.iter().fold(HashMap::new(), |mut m, u| {
        *m.entry(u.addr.clone()).or_default() += 1;
        m
    });
    let start_at = Instant::now() + Duration::from_millis(200);
    let measure_from = start_at + Duration::from_secs(2);
    let end_at = measure_from + Duration::from_secs_f64(seconds);
    // Senders spread over the nodes: every members/senders-th member.
    let step = (members / senders.max(1)).max(1);
    let mut tasks = Vec::new();
    for (i, u) in users.into_iter().enumerate() {
        let w = if i % step == 0 && i / step < senders {
            window
        } else {
            0
        };
        tasks.push(tokio::spawn(room_member(
            u,
            w,
            start_at,
            measure_from,
            end_at,
        )));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu_before: Vec<f64> = servers.list.iter().map(|s| cpu_seconds(s.pid())).collect();
    let wall = Instant::now();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut results, mut deliveries, mut failed, mut received) = (0, 0, 0, 0);
    for t in tasks {
        let r = t.await?;
        results += r.results;
        deliveries += r.deliveries;
        failed += r.failed;
        received += r.received;
        hist.add(&r.hist)?;
    }
    let wall = wall.elapsed().as_secs_f64().max(seconds);
    let per_server = server_usage(&servers, cpu_before, wall);
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(json!({
        "scenario": "room", "target": target.name(), "members": members, "senders": senders,
        "window": window, "seconds": seconds, "members_per_node": spread.values().collect::<Vec<_>>(),
        "member_acked_per_s": (deliveries as f64 / seconds).round(),
        "room_sends_per_s": (results as f64 / seconds).round(),
        "msgs_received_per_s": (received as f64 / seconds).round(),
        "results": results, "failed": failed,
        "p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": hist.max() as f64 / 1000.0,
        "servers": per_server,
    }))
}

// ----- idle ----------------------------------------------------------------------------------

async fn idle(target: Target, steps: Vec<usize>) -> anyhow::Result<Value> {
    let fds = raise_fd_limit();
    // Both this process and the server hold one descriptor per session.
    let ceiling = (fds as usize).saturating_sub(1000);
    let steps: Vec<usize> = steps
        .into_iter()
        .map(|n| {
            if n > ceiling {
                println!("  {n} sessions exceed the open-file limit ({fds}); measuring {ceiling}");
            }
            n.min(ceiling)
        })
        .collect();
    let servers = match target {
        Target::Imgate => start_imgate(1).await?,
        Target::Socketio => start_socketio(1).await?,
        Target::Relay => start_relay().await?,
    };
    let server = &servers.list[0];
    // The cluster id of proc_support's generated config is the tokens' audience.
    let keys = imgate::auth::TokenKeys::new("dev-only-change-me", "imgate", "proc-test", 7200, 30);
    let base_rss = status_kib(server.pid(), "VmRSS:");
    let mut results = Vec::new();
    let mut opened = 0usize;
    let alive = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    for &target_n in &steps {
        let mut pending = tokio::task::JoinSet::new();
        while opened < target_n {
            let i = opened;
            opened += 1;
            let uid = format!("idle{i}");
            let token = (target == Target::Imgate)
                .then(|| keys.issue(&uid, "n1", "", imgate::auth::unix_now()).0);
            let addr = server.addr.clone();
            let (alive, stop) = (alive.clone(), stop.clone());
            pending.spawn(async move {
                // 2000 sockets per source address keeps clear of the ephemeral-port range even
                // with earlier runs' connections still in TIME_WAIT.
                let src = (1 + (i / 2_000) % 250) as u8;
                let mut user = User::connect(target, &addr, &uid, token.as_deref(), src).await?;
                alive.fetch_add(1, Ordering::Relaxed);
                // Stay idle but answer pings (tungstenite answers WebSocket pings on read).
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            m = user.ws.next() => match m {
                                Some(Ok(Message::Text(t))) => {
                                    if let Seen::Reply(r) = classify(user.target, &user.uid, &t)
                                        && user.ws.send(r).await.is_err() { break }
                                }
                                Some(Ok(_)) => {}
                                _ => break,
                            },
                        }
                    }
                });
                anyhow::Ok(())
            });
            while pending.len() >= 512 {
                if let Some(r) = pending.join_next().await {
                    r??;
                }
            }
        }
        while let Some(r) = pending.join_next().await {
            r??;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = status_kib(server.pid(), "VmRSS:");
        let per = (rss.saturating_sub(base_rss)) as f64 * 1024.0 / target_n as f64;
        println!(
            "  {target_n} sessions: server RSS {:.1} MiB, {:.0} bytes per session",
            rss as f64 / 1024.0,
            per
        );
        results.push(json!({"sessions": target_n, "alive": alive.load(Ordering::Relaxed),
            "rss_mib": (rss as f64 / 1024.0 * 10.0).round() / 10.0, "bytes_per_session": per.round()}));
    }
    stop.cancel();
    Ok(
        json!({"scenario": "idle", "target": target.name(), "fd_limit": fds,
            "base_rss_mib": base_rss as f64 / 1024.0, "steps": results}),
    )
}

/// Raises the soft open-file limit to the hard one (inherited by the servers); returns it.
fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid resource and a pointer to a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        lim.rlim_cur
    }
}

// ----- login ---------------------------------------------------------------------------------

async fn login(concurrency: usize, seconds: f64) -> anyhow::Result<Value> {
    let servers = start_imgate(1).await?;
    let addr = servers.list[0].addr.clone();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let ok = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_seconds(servers.list[0].pid());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let (http, addr, ok, bad) = (http.clone(), addr.clone(), ok.clone(), bad.clone());
        tasks.push(tokio::spawn(async move {
            let url = format!("http://{addr}/login");
            let mut n = 0u64;
            while Instant::now() < end {
                n += 1;
                let body = format!(r#"{{"uid":"user-{c}-{n}"}}"#);
                let r = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = (cpu_seconds(servers.list[0].pid()) - cpu_before) / wall * 100.0;
    let ok = ok.load(Ordering::Relaxed);
    Ok(
        json!({"scenario": "login", "target": "imgate", "concurrency": concurrency,
        "logins_per_s": (ok as f64 / wall).round(), "ok": ok, "errors": bad.load(Ordering::Relaxed),
        "server_cpu_pct": cpu.round()}),
    )
}

// ----- failover ------------------------------------------------------------------------------

async fn failover(users: usize) -> anyhow::Result<Value> {
    let mut servers = start_imgate(3).await?;
    let nodes: Vec<String> = servers
        .list
        .iter()
        .map(|s| format!("http://{}", s.addr))
        .collect();
    let mut clients = Vec::new();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, String, Instant)>();
    for i in 0..users {
        let mut cfg = imgate::client::ClientConfig::new(nodes.clone(), &format!("f{i}"));
        cfg.ping_interval = Duration::from_millis(500);
        cfg.min_backoff = Duration::from_millis(20);
        cfg.max_backoff = Duration::from_millis(500);
        let (client, _incoming, mut events) = imgate::client::Client::start(cfg);
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                if let imgate::client::Event::Connected { node, .. } = e {
                    let _ = tx.send((i, node, Instant::now()));
                }
            }
        });
        clients.push(client);
    }
    let mut at: HashMap<usize, String> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while at.len() < users {
        let (i, node, _) = tokio::time::timeout_at(deadline.into(), rx.recv())
            .await
            .context("clients did not all connect")?
            .context("events closed")?;
        at.insert(i, node);
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    for n in at.values() {
        *counts.entry(n.clone()).or_default() += 1;
    }
    let (victim_name, _) = counts.iter().max_by_key(|(_, c)| **c).context("no users")?;
    let victim_name = victim_name.clone();
    let orphans: Vec<usize> = at
        .iter()
        .filter(|(_, n)| **n == victim_name)
        .map(|(i, _)| *i)
        .collect();
    let idx = servers
        .list
        .iter()
        .position(|s| s.name == victim_name)
        .context("victim")?;
    let t0 = Instant::now();
    servers.list[idx].child.kill()?;
    let _ = servers.list[idx].child.wait();
    let mut times: HashMap<usize, Duration> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while times.len() < orphans.len() {
        let (i, node, when) = tokio::time::timeout_at(deadline.into(), rx.recv())
            .await
            .context("orphans did not all come back")?
            .context("events closed")?;
        if node != victim_name && orphans.contains(&i) && when > t0 {
            times.entry(i).or_insert(when - t0);
        }
    }
    let mut v: Vec<Duration> = times.into_values().collect();
    v.sort();
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0;
    drop(clients);
    Ok(
        json!({"scenario": "failover", "target": "imgate", "users": users, "orphans": v.len(),
        "killed": victim_name, "rehome_p50_ms": q(0.5), "rehome_p99_ms": q(0.99), "rehome_max_ms": q(1.0)}),
    )
}

// ----- main ----------------------------------------------------------------------------------

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let result = match args.scenario {
        Scenario::Chat {
            target,
            users,
            window,
            seconds,
            rate,
        } => chat(target, users, window, seconds, rate).await?,
        Scenario::Idle { target, sessions } => idle(target, sessions).await?,
        Scenario::Login {
            concurrency,
            seconds,
        } => login(concurrency, seconds).await?,
        Scenario::Failover { users } => failover(users).await?,
        Scenario::Room {
            target,
            members,
            senders,
            window,
            seconds,
        } => room(target, members, senders, window, seconds).await?,
    };
    print_table(&result);
    let line = result.to_string();
    println!("{line}");
    if let Some(path) = args.json_out {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}

fn print_table(v: &Value) {
    println!(
        "== {} / {}",
        v["scenario"].as_str().unwrap_or(""),
        v["target"].as_str().unwrap_or("")
    );
    if let Some(obj) = v.as_object() {
        for (k, val) in obj {
            if k == "scenario" || k == "target" {
                continue;
            }
            match val {
                Value::Array(items) => {
                    for it in items {
                        println!("  {k:<18} {it}");
                    }
                }
                other => println!("  {k:<18} {other}"),
            }
        }
    }
}
