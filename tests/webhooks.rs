//! Webhooks (PROTOCOL.md, "Backend webhooks") against a real HTTP receiver in this process, on
//! port 0: every event type and its signature, retries after 500s, a dead backend that fills
//! the queue while chat goes on, and one `offline` event per message across a cluster.

mod cluster_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use cluster_support::{Client, Cluster};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::mpsc;

const SECRET: &str = "webhook-test-secret";
const WAIT: Duration = Duration::from_secs(10);

/// One POST the receiver got.
struct Post {
    signature: String,
    body: Vec<u8>,
}

impl Post {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

#[derive(Clone)]
struct Receiver {
    posts: mpsc::UnboundedSender<Post>,
    /// Answer 500 to this many POSTs first.
    fail_first: Arc<AtomicUsize>,
}

async fn hook(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let signature = headers
        .get("x-imgate-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let _ = r.posts.send(Post {
        signature,
        body: body.to_vec(),
    });
    let failing = r
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if failing {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::NO_CONTENT
    }
}

/// A receiver on port 0: its URL and the POSTs it gets.
async fn receiver(fail_first: usize) -> (String, mpsc::UnboundedReceiver<Post>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let state = Receiver {
        posts: tx,
        fail_first: Arc::new(AtomicUsize::new(fail_first)),
    };
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, rx)
}

/// The signature computed here, independently of the node's code.
fn expected_signature(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

/// The next POST of `event`, skipping others; its signature is checked.
async fn next_event(rx: &mut mpsc::UnboundedReceiver<Post>, event: &str) -> Value {
    loop {
        let post = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {event} event within {WAIT:?}"))
            .expect("receiver running");
        assert_eq!(post.signature, expected_signature(&post.body), "signature");
        let v = post.json();
        if v["event"] == event {
            return v;
        }
    }
}

fn with_webhooks(cfg: &mut imgate::config::Config, url: &str) {
    cfg.webhooks.url = Some(url.to_string());
    cfg.webhooks.secret = SECRET.into();
    cfg.delivery.hold_ms = 300;
}

/// `connect`, `offline` (with the message) and `disconnect`, each signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_posted_and_signed() {
    let (url, mut posts) = receiver(0).await;
    let c = Cluster::start_with(1, |cfg| with_webhooks(cfg, &url)).await;
    c.wait_converged(1).await;
    let mut alice = Client::login(&c.nodes[0].http_url(), "alice").await;
    let connect = next_event(&mut posts, "connect").await;
    assert_eq!(
        (connect["uid"].as_str(), connect["node"].as_str()),
        (Some("alice"), Some("n1"))
    );
    let session = connect["session"].as_str().unwrap().to_string();
    assert!(session.starts_with("n1-"), "{connect}");
    assert!(connect["ts"].as_u64().is_some(), "{connect}");

    alice
        .send("m1", "bob", json!({"text": "are you there?"}))
        .await;
    assert_eq!(alice.expect("failed").await["reason"], "offline");
    let offline = next_event(&mut posts, "offline").await;
    assert_eq!(
        offline,
        json!({"event": "offline", "node": "n1", "ts": offline["ts"], "from": "alice",
                              "to": "bob", "id": "m1", "body": {"text": "are you there?"}})
    );

    // A room message that ends `offline` for a member names the room.
    alice
        .send_frame(json!({"type": "join", "room": "team", "id": "j"}))
        .await;
    assert_eq!(alice.expect("joined").await["room"], "team");
    let add = reqwest::Client::new()
        .post(format!("{}/api/rooms/team/members", c.nodes[0].http_url()))
        .bearer_auth("dev-api-key")
        .json(&json!({"uid": "bob"}))
        .send()
        .await
        .unwrap();
    assert_eq!(add.status(), 200);
    alice
        .send_frame(json!({"type": "send", "id": "r1", "room": "team", "body": 1}))
        .await;
    let r = alice.expect("room_result").await;
    assert_eq!(
        (r["members"].as_u64(), r["offline"].as_u64()),
        (Some(2), Some(1))
    );
    let offline = next_event(&mut posts, "offline").await;
    assert_eq!(
        offline,
        json!({"event": "offline", "node": "n1", "ts": offline["ts"], "from": "alice",
               "to": "bob", "id": "r1", "body": 1, "room": "team"})
    );

    drop(alice);
    let disconnect = next_event(&mut posts, "disconnect").await;
    assert_eq!(
        (disconnect["uid"].as_str(), disconnect["session"].as_str()),
        (Some("alice"), Some(session.as_str()))
    );
    c.shutdown().await;
}

/// A backend that answers 500 gets the same event again (same bytes, same signature) until it
/// answers 2xx; `webhooks.events` leaves out what is not listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_answering_500_gets_the_event_again() {
    let (url, mut posts) = receiver(2).await;
    let c = Cluster::start_with(1, |cfg| {
        with_webhooks(cfg, &url);
        cfg.webhooks.events = vec!["offline".into()];
    })
    .await;
    c.wait_converged(1).await;
    let mut alice = Client::login(&c.nodes[0].http_url(), "alice").await;
    alice.send("m1", "bob", json!(1)).await;
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let post = tokio::time::timeout(WAIT, posts.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(post.signature, expected_signature(&post.body));
        bodies.push(post.body);
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "the same event each time"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&bodies[0]).unwrap()["event"],
        "offline"
    );
    cluster_support::wait_until(WAIT, || c.nodes[0].shared().metrics.webhook_sent.get() == 1).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), posts.recv())
            .await
            .is_err(),
        "no connect event (not in webhooks.events) and no fourth POST"
    );
    c.shutdown().await;
}

/// A backend that accepts connections and never answers: the queue fills to
/// `webhooks.max_queue`, the rest is dropped and counted, and chat goes on (its latency is
/// printed, with and without the stuck backend).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_fills_the_queue_and_chat_goes_on() {
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", dead.local_addr().unwrap());
    // Accept and hold every connection, answering nothing.
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = dead.accept().await {
            held.push(s);
        }
    });
    let c = Cluster::start_with(1, |cfg| {
        with_webhooks(cfg, &url);
        cfg.webhooks.max_queue = 4;
        cfg.webhooks.concurrency = 1;
        cfg.webhooks.timeout_ms = 60_000;
    })
    .await;
    c.wait_converged(1).await;
    let http = c.nodes[0].http_url();
    let mut alice = Client::login(&http, "alice").await;
    let mut bob = Client::login(&http, "bob").await;
    let quiet = round_trip(&mut alice, &mut bob).await;
    // 40 connect and disconnect events, for a queue of 4 behind one stuck POST.
    for i in 0..20 {
        let c = Client::login(&http, &format!("churn{i}")).await;
        drop(c);
    }
    let metrics = &c.nodes[0].shared().metrics;
    cluster_support::wait_until(WAIT, || metrics.webhook_dropped.get() >= 30).await;
    let stuck = round_trip(&mut alice, &mut bob).await;
    println!(
        "chat send-to-delivered: median {:?}, max {:?} with a quiet backend; median {:?}, max \
         {:?} with a stuck one ({} events dropped, {} queued)",
        quiet.0,
        quiet.1,
        stuck.0,
        stuck.1,
        metrics.webhook_dropped.get(),
        metrics.webhook_queue.get()
    );
    assert!(
        metrics.webhook_queue.get() <= 5,
        "queue of 4 plus one in flight"
    );
    c.shutdown().await;
}

/// 20 messages alice to bob, one at a time: the median and the largest send-to-delivered time.
async fn round_trip(alice: &mut Client, bob: &mut Client) -> (Duration, Duration) {
    let mut times = Vec::new();
    for i in 0..20 {
        let id = format!("m{i}-{}", rand_id());
        let start = tokio::time::Instant::now();
        alice.send(&id, "bob", json!(i)).await;
        let m = bob.expect("msg").await;
        bob.ack(m["seq"].as_u64().unwrap()).await;
        assert_eq!(alice.expect("delivered").await["id"], id.as_str());
        times.push(start.elapsed());
    }
    times.sort();
    (times[10], times[19])
}

fn rand_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Three nodes post to one backend: a message to an offline user owned by another node than
/// the sender's gives exactly one `offline` event, from the recipient's owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_offline_event_per_message_across_a_cluster() {
    let (url, mut posts) = receiver(0).await;
    let c = Cluster::start_with(3, |cfg| {
        with_webhooks(cfg, &url);
        cfg.webhooks.events = vec!["offline".into()];
    })
    .await;
    c.wait_converged(3).await;
    let owner_of = |uid: &str| c.nodes[0].shared().owner_of(uid).unwrap().node.to_string();
    let sender = cluster_support::first_uid("s", |u| owner_of(u) == "n1");
    let away = cluster_support::first_uid("away", |u| owner_of(u) == "n2");
    let mut s = Client::login(&c.nodes[0].http_url(), &sender).await;
    for i in 0..3 {
        s.send(&format!("m{i}"), &away, json!(i)).await;
    }
    for _ in 0..3 {
        assert_eq!(s.expect("failed").await["reason"], "offline");
    }
    let mut ids = Vec::new();
    for _ in 0..3 {
        let e = next_event(&mut posts, "offline").await;
        assert_eq!(
            (e["node"].as_str(), e["to"].as_str()),
            (Some("n2"), Some(away.as_str()))
        );
        ids.push(e["id"].as_str().unwrap().to_string());
    }
    ids.sort();
    assert_eq!(ids, ["m0", "m1", "m2"]);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), posts.recv())
            .await
            .is_err(),
        "one event per message"
    );
    c.shutdown().await;
}

/// A backend that refuses an event (413), closes the connection, or answers after the
/// timeout: every answer that is not 2xx is retried (PROTOCOL.md), so the event is given up
/// and counted after `max_attempts` POSTs; the node goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_closed_connections_and_slow_answers_are_given_up() {
    for mode in ["refuse", "close", "slow"] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let posts = Arc::new(AtomicUsize::new(0));
        let seen = posts.clone();
        let counted = posts.clone();
        tokio::spawn(async move {
            let app = axum::Router::new().route(
                "/hook",
                axum::routing::post(move || {
                    let seen = seen.clone();
                    async move {
                        seen.fetch_add(1, Ordering::SeqCst);
                        if mode == "slow" {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                        }
                        StatusCode::PAYLOAD_TOO_LARGE
                    }
                }),
            );
            if mode == "close" {
                // Accept, count, and hang up without a word.
                while let Ok((s, _)) = listener.accept().await {
                    counted.fetch_add(1, Ordering::SeqCst);
                    drop(s);
                }
            } else {
                let _ = axum::serve(listener, app).await;
            }
        });
        let c = Cluster::start_with(1, |cfg| {
            with_webhooks(cfg, &url);
            cfg.webhooks.events = vec!["connect".into()];
            cfg.webhooks.max_attempts = 3;
            cfg.webhooks.timeout_ms = 200;
        })
        .await;
        c.wait_converged(1).await;
        let _alice = Client::login(&c.nodes[0].http_url(), "alice").await;
        let metrics = &c.nodes[0].shared().metrics;
        cluster_support::wait_until(WAIT, || metrics.webhook_failed.get() == 1).await;
        assert_eq!(posts.load(Ordering::SeqCst), 3, "{mode}: POSTs");
        assert_eq!(metrics.webhook_sent.get(), 0, "{mode}");
        c.shutdown().await;
    }
}
