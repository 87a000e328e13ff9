//! The client SDK against in-process clusters.

mod cluster_support;

use std::time::Duration;

use cluster_support::Cluster;
use imgate::client::{
    Client, ClientConfig, ClientError, Event, Incoming, Membership, PendingSend, RoomSendOutcome,
    SendOutcome,
};
use serde_json::json;
use tokio::sync::mpsc;

fn config(c: &Cluster, uid: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new(c.nodes.iter().map(|n| n.http_url()).collect(), uid);
    cfg.max_attempts = 10;
    cfg.ping_interval = Duration::from_millis(500);
    cfg
}

async fn connected(events: &mut mpsc::Receiver<Event>) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Some(Event::Connected { node, .. })) => return node,
            Ok(Some(_)) => {}
            other => panic!("no connection: {other:?}"),
        }
    }
}

/// The outcome of a send, within 10 s.
async fn outcome(pending: PendingSend) -> Result<SendOutcome, ClientError> {
    tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("an outcome in time")
}

async fn next_incoming(rx: &mut mpsc::Receiver<Incoming>) -> Incoming {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a message in time")
        .expect("client running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_receive_and_outcome() {
    let c = Cluster::start(3).await;
    c.wait_converged(3).await;
    let (alice, _ain, mut aev) = Client::start(config(&c, "alice"));
    let (_bob, mut bin, mut bev) = Client::start(config(&c, "bob"));
    connected(&mut aev).await;
    connected(&mut bev).await;
    let got = outcome(alice.send("bob", json!({"text": "hi"})).unwrap()).await;
    assert_eq!(got, Ok(SendOutcome::Delivered));
    let m = next_incoming(&mut bin).await;
    assert_eq!(
        (m.from.as_str(), &m.body),
        ("alice", &json!({"text": "hi"}))
    );
    // A failed send is final with max_attempts = 1 (hold_ms is 5 s by default).
    let mut cfg = config(&c, "carol");
    cfg.max_attempts = 1;
    let (carol, _cin, mut cev) = Client::start(cfg);
    connected(&mut cev).await;
    let got = outcome(carol.send_with_id("c1", "nobody-online", json!(1)).unwrap()).await;
    assert_eq!(
        got,
        Ok(SendOutcome::Failed(imgate::protocol::FailReason::Offline))
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_moved_resends_and_surfaces_each_message_once() {
    let mut c = Cluster::start_with(3, |cfg| cfg.delivery.hold_ms = 8000).await;
    c.wait_converged(3).await;
    let on = |node: &str, prefix: &str| {
        (0..)
            .map(|i| format!("{prefix}{i}"))
            .find(|u| c.nodes[0].shared().owner_of(u).unwrap().node.as_ref() == node)
            .unwrap()
    };
    let sender = on("n3", "sender");
    let target = on("n1", "target");
    let (alice, _ain, mut aev) = Client::start(config(&c, &sender));
    assert_eq!(connected(&mut aev).await, "n3");
    // The target is offline: the send is held at its owner and has no outcome yet.
    let pending = alice.send_with_id("m-1", &target, json!("x")).unwrap();
    // The sender's node drains: the SDK follows `moved` and resends the send (same id).
    let n3 = c.nodes.pop().unwrap();
    tokio::time::timeout(Duration::from_secs(20), n3.shutdown())
        .await
        .expect("n3 drains within 20 s");
    let node = connected(&mut aev).await;
    assert_ne!(node, "n3");
    // The target comes online: it gets the message once, however often it was sent.
    let (_t, mut tin, mut tev) = Client::start(config(&c, &target));
    connected(&mut tev).await;
    let m = next_incoming(&mut tin).await;
    assert_eq!((m.from.as_str(), m.id.as_str()), (sender.as_str(), "m-1"));
    assert_eq!(outcome(pending).await, Ok(SendOutcome::Delivered));
    let resent = alice
        .stats()
        .resent
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        resent >= 1,
        "the pending send was written again after the move"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), tin.recv())
            .await
            .is_err(),
        "no duplicate reaches the application"
    );
    c.shutdown().await;
}

/// With `max_attempts > 1` the SDK sends again (same id) what failed `offline`, and reports the
/// last failure once the attempts are spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_failures_are_retried_up_to_max_attempts() {
    let c = Cluster::start_with(2, |cfg| cfg.delivery.hold_ms = 200).await;
    c.wait_converged(2).await;
    let mut cfg = config(&c, "alice");
    cfg.max_attempts = 3;
    let (attempts_tx, mut attempts) = mpsc::unbounded_channel();
    cfg.attempts = Some(attempts_tx);
    let (alice, _ain, mut aev) = Client::start(cfg);
    connected(&mut aev).await;
    let got = outcome(alice.send_with_id("o1", "nobody-online", json!(1)).unwrap()).await;
    assert_eq!(
        got,
        Ok(SendOutcome::Failed(imgate::protocol::FailReason::Offline))
    );
    let resent = alice
        .stats()
        .resent
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(resent, 2, "three attempts in all");
    let mut seen = Vec::new();
    while let Ok(a) = attempts.try_recv() {
        assert_eq!((a.id.as_str(), a.to.as_str()), ("o1", "nobody-online"));
        assert!(a.answered >= a.written);
        seen.push((a.number, a.outcome));
    }
    let offline = SendOutcome::Failed(imgate::protocol::FailReason::Offline);
    assert_eq!(seen, [(1, offline), (2, offline), (3, offline)]);
    let failed = c.metric(0, "imgate_failed_total{reason=\"offline\"}").await
        + c.metric(1, "imgate_failed_total{reason=\"offline\"}").await;
    assert_eq!(failed, 3, "each attempt reached the recipient's owner");
    c.shutdown().await;
}

/// A node that pushes the same `(from, id)` twice (as can happen when a message is handed
/// over between nodes) reaches the application once: this checks the SDK's own dedup, with a
/// fake node that does no dedup of its own. Every push is acked, duplicates included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_surfaces_a_repeated_message_once() {
    use axum::extract::ws::{Message as AxMessage, WebSocket, WebSocketUpgrade};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (acks_tx, mut acks) = mpsc::unbounded_channel::<u64>();
    let pushes = [
        ("bob", "m1"),
        ("bob", "m1"),   // the same message again
        ("carol", "m1"), // another sender's id: a different message
        ("bob", "m2"),
    ];
    let serve = move |mut ws: WebSocket| async move {
        let welcome = json!({"type": "welcome", "uid": "alice", "node": "fake", "session": "s1"});
        ws.send(AxMessage::Text(welcome.to_string().into()))
            .await
            .unwrap();
        for (seq, (from, id)) in pushes.iter().enumerate() {
            let m = json!({"type": "msg", "seq": seq + 1, "from": from, "id": id, "body": seq, "ts": 1});
            ws.send(AxMessage::Text(m.to_string().into()))
                .await
                .unwrap();
        }
        while let Some(Ok(m)) = ws.recv().await {
            if let AxMessage::Text(t) = m {
                let f: serde_json::Value = serde_json::from_str(&t).unwrap();
                match f["type"].as_str() {
                    Some("ack") => acks_tx.send(f["seq"].as_u64().unwrap()).unwrap(),
                    Some("ping") => {
                        let pong = json!({"type": "pong"}).to_string();
                        let _ = ws.send(AxMessage::Text(pong.into())).await;
                    }
                    _ => {}
                }
            }
        }
    };
    let app = axum::Router::new()
        .route(
            "/login",
            axum::routing::post(move || async move {
                axum::Json(json!({
                    "token": "t", "url": format!("ws://{addr}/ws"), "node": "fake",
                    "expires_at": imgate::auth::unix_now() + 3600,
                }))
            }),
        )
        .route(
            "/ws",
            axum::routing::get(move |up: WebSocketUpgrade| {
                let serve = serve.clone();
                async move { up.on_upgrade(serve) }
            }),
        );
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut cfg = ClientConfig::new(vec![format!("http://{addr}")], "alice");
    cfg.ping_interval = Duration::from_millis(500);
    let (alice, mut incoming, mut events) = Client::start(cfg);
    assert_eq!(connected(&mut events).await, "fake");
    let mut got = Vec::new();
    for _ in 0..3 {
        let m = next_incoming(&mut incoming).await;
        got.push((m.from, m.id));
    }
    let want: Vec<(String, String)> = [("bob", "m1"), ("carol", "m1"), ("bob", "m2")]
        .iter()
        .map(|(f, i)| (f.to_string(), i.to_string()))
        .collect();
    assert_eq!(got, want);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), incoming.recv())
            .await
            .is_err(),
        "the repeat did not reach the application"
    );
    let mut acked = Vec::new();
    for _ in 0..4 {
        let seq = tokio::time::timeout(Duration::from_secs(5), acks.recv())
            .await
            .expect("every push acked")
            .unwrap();
        acked.push(seq);
    }
    acked.sort();
    assert_eq!(acked, [1, 2, 3, 4]);
    let dups = alice
        .stats()
        .duplicates
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(dups, 1);
    server.abort();
}

/// `send_transient`: delivered to an online user; `offline` at once (no retry, even with
/// `max_attempts` 10) to a user with no session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_sends_are_delivered_or_fail_without_retries() {
    let c = Cluster::start(2).await;
    c.wait_converged(2).await;
    let (alice, _ain, mut aev) = Client::start(config(&c, "alice"));
    let (_bob, mut bin, mut bev) = Client::start(config(&c, "bob"));
    connected(&mut aev).await;
    connected(&mut bev).await;
    let got = outcome(
        alice
            .send_transient("bob", json!({"typing": true}))
            .unwrap(),
    )
    .await;
    assert_eq!(got, Ok(SendOutcome::Delivered));
    assert_eq!(next_incoming(&mut bin).await.body, json!({"typing": true}));
    let started = tokio::time::Instant::now();
    let got = outcome(alice.send_transient("nobody-online", json!(1)).unwrap()).await;
    assert_eq!(
        got,
        Ok(SendOutcome::Failed(imgate::protocol::FailReason::Offline))
    );
    // A durable send would be retried up to 10 times over the 5 s hold each; this is one try.
    println!("transient offline outcome after {:?}", started.elapsed());
    let resent = alice
        .stats()
        .resent
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(resent, 0, "nothing was sent again");
    c.shutdown().await;
}

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("an answer in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_join_send_and_leave() {
    let c = Cluster::start(3).await;
    c.wait_converged(3).await;
    let (alice, _ain, mut aev) = Client::start(config(&c, "alice"));
    let (bob, mut bin, mut bev) = Client::start(config(&c, "bob"));
    let (carol, mut cin, mut cev) = Client::start(config(&c, "carol"));
    for ev in [&mut aev, &mut bev, &mut cev] {
        connected(ev).await;
    }
    assert_eq!(
        within(alice.join("team").unwrap()).await,
        Ok(Membership::Joined { members: 1 })
    );
    within(bob.join("team").unwrap()).await.unwrap();
    within(carol.join("team").unwrap()).await.unwrap();
    let sent = alice.send_room("team", json!({"text": "hi team"})).unwrap();
    for rx in [&mut bin, &mut cin] {
        let m = next_incoming(rx).await;
        assert_eq!(m.room.as_deref(), Some("team"));
        assert_eq!(
            (m.from.as_str(), &m.body),
            ("alice", &json!({"text": "hi team"}))
        );
    }
    assert_eq!(
        within(sent).await,
        Ok(RoomSendOutcome::Done {
            members: 3,
            delivered: 3,
            offline: 0,
            failed: 0
        })
    );
    assert_eq!(
        within(carol.leave("team").unwrap()).await,
        Ok(Membership::Left)
    );
    let r = within(bob.send_room("team", json!(2)).unwrap()).await;
    assert!(
        matches!(r, Ok(RoomSendOutcome::Done { members: 2, .. })),
        "{r:?}"
    );
    assert_eq!(
        within(carol.send_room("team", json!(3)).unwrap()).await,
        Ok(RoomSendOutcome::Failed(
            imgate::protocol::FailReason::Forbidden
        ))
    );
    assert!(matches!(alice.join("$bad"), Err(ClientError::Invalid(_))));
    c.shutdown().await;
}

/// The whole cluster restarts (memberships live in memory only): the client finds its room
/// missing from `welcome.rooms` and joins it again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_joins_again_when_a_restarted_cluster_forgot_its_rooms() {
    use imgate::config::{Config, NodeConfig};
    let cfg = Config::for_test_nodes(1);
    let node = imgate::node::start(cfg.clone(), "n1").await.unwrap();
    let http = node.http_addr();
    let mut ccfg = ClientConfig::new(vec![node.http_url()], "alice");
    ccfg.ping_interval = Duration::from_millis(500);
    let (alice, mut ain, mut aev) = Client::start(ccfg);
    connected(&mut aev).await;
    within(alice.join("team").unwrap()).await.unwrap();
    node.shutdown().await;
    // The same address, an empty node.
    let mut cfg2 = cfg.clone();
    let any = "127.0.0.1:0".parse().unwrap();
    cfg2.nodes[0] = NodeConfig::new("n1", http, any, any);
    let node = imgate::node::start(cfg2, "n1").await.unwrap();
    connected(&mut aev).await;
    let rejoined = || {
        alice
            .stats()
            .rejoined
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    cluster_support::wait_until(Duration::from_secs(10), || rejoined() == 1).await;
    // Bob's room message reaches alice without her asking to join.
    let mut bcfg = ClientConfig::new(vec![node.http_url()], "bob");
    bcfg.ping_interval = Duration::from_millis(500);
    let (bob, _bin, mut bev) = Client::start(bcfg);
    connected(&mut bev).await;
    within(bob.join("team").unwrap()).await.unwrap();
    let sent = bob.send_room("team", json!("back")).unwrap();
    let m = next_incoming(&mut ain).await;
    assert_eq!((m.room.as_deref(), m.body), (Some("team"), json!("back")));
    assert!(matches!(
        within(sent).await,
        Ok(RoomSendOutcome::Done {
            members: 2,
            delivered: 2,
            ..
        })
    ));
    node.shutdown().await;
}
