//! The client SDK against in-process clusters.

mod cluster_support;

use std::time::Duration;

use cluster_support::Cluster;
use imgate::client::{Client, ClientConfig, Event, Incoming, SendOutcome};
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
    let outcome = alice.send("bob", json!({"text": "hi"})).unwrap().await;
    assert_eq!(outcome, Ok(SendOutcome::Delivered));
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
    let outcome = carol
        .send_with_id("c1", "nobody-online", json!(1))
        .unwrap()
        .await;
    assert_eq!(
        outcome,
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
    n3.shutdown().await;
    let node = connected(&mut aev).await;
    assert_ne!(node, "n3");
    // The target comes online: it gets the message once, however often it was sent.
    let (_t, mut tin, mut tev) = Client::start(config(&c, &target));
    connected(&mut tev).await;
    let m = next_incoming(&mut tin).await;
    assert_eq!((m.from.as_str(), m.id.as_str()), (sender.as_str(), "m-1"));
    assert_eq!(pending.await, Ok(SendOutcome::Delivered));
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
