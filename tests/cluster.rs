//! In-process clusters on port 0: membership, ownership, cross-node delivery, rebalancing.

mod cluster_support;

use std::time::Duration;

use cluster_support::{Client, Cluster, expect_delivery, first_uid};
use imgate::engine::Message;
use imgate::outbox::Outbox;
use imgate::relay::{Answer, LinkEvent, SessionEnd};
use imgate::state::Command;
use imgate::wire::{PeerFrame, WireMessage};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_converge_and_agree_on_owners() {
    let c = Cluster::start(3).await;
    c.wait_converged(3).await;
    let views: Vec<_> = c.nodes.iter().map(|n| n.shared().current_view()).collect();
    for v in &views {
        assert_eq!(v.members.len(), 3);
    }
    let mut per_node = std::collections::HashMap::new();
    for i in 0..1000 {
        let uid = format!("user-{i}");
        let owners: Vec<_> = c
            .nodes
            .iter()
            .map(|n| n.shared().owner_of(&uid).unwrap().node)
            .collect();
        assert!(owners.windows(2).all(|w| w[0] == w[1]), "{uid}: {owners:?}");
        *per_node.entry(owners[0].clone()).or_insert(0) += 1;
    }
    assert_eq!(per_node.len(), 3);
    for (node, count) in &per_node {
        assert!((200..470).contains(count), "{node} owns {count} of 1000");
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_anywhere_and_cross_node_delivery_with_e2e_acks() {
    let c = Cluster::start(3).await;
    c.wait_converged(3).await;
    let (alice_uid, bob_uid) = c.uids_on_different_nodes();
    // Alice logs in at node 1, bob at node 3: both are sent to their owners.
    let mut alice = Client::login(&c.nodes[0].http_url(), &alice_uid).await;
    let mut bob = Client::login(&c.nodes[2].http_url(), &bob_uid).await;
    assert_ne!(alice.node, bob.node);
    for i in 0..20 {
        alice
            .send(&format!("a{i}"), &bob_uid, json!({"n": i}))
            .await;
    }
    for i in 0..20 {
        let m = bob.expect("msg").await;
        assert_eq!(m["id"], format!("a{i}"), "in order");
        assert_eq!(m["from"], alice_uid.as_str());
        bob.ack(m["seq"].as_u64().unwrap()).await;
    }
    for i in 0..20 {
        let d = alice.expect("delivered").await;
        assert_eq!(d["id"], format!("a{i}"));
        assert_eq!(d["to"], bob_uid.as_str());
    }
    // And back.
    bob.send("b1", &alice_uid, json!("hi")).await;
    let m = alice.expect("msg").await;
    alice.ack(m["seq"].as_u64().unwrap()).await;
    assert_eq!(bob.expect("delivered").await["id"], "b1");
    let fwd: u64 = c.metric(0, "imgate_messages_forwarded_total").await
        + c.metric(1, "imgate_messages_forwarded_total").await
        + c.metric(2, "imgate_messages_forwarded_total").await;
    assert!(fwd >= 21, "forwarded {fwd}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_node_says_moved() {
    let c = Cluster::start(2).await;
    c.wait_converged(2).await;
    let (uid, _) = c.uids_on_different_nodes();
    let login = cluster_support::login(&c.nodes[0].http_url(), &uid).await;
    let owner = login["node"].as_str().unwrap().to_string();
    let other = c.nodes.iter().find(|n| n.node_id() != owner).unwrap();
    let (frame, code) =
        cluster_support::connect_expect_close(other.ws_url(), login["token"].as_str().unwrap())
            .await;
    assert_eq!(frame["type"], "moved");
    assert_eq!(frame["node"], owner.as_str());
    assert_eq!(frame["url"], login["url"]);
    assert_eq!(code, Some(4001));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_and_offline_across_nodes() {
    let c = Cluster::start_with(2, |cfg| {
        cfg.delivery.ack_timeout_ms = 100;
        cfg.delivery.max_retries = 1;
        cfg.delivery.hold_ms = 200;
    })
    .await;
    c.wait_converged(2).await;
    let (a, b) = c.uids_on_different_nodes();
    let mut alice = Client::login(&c.nodes[0].http_url(), &a).await;
    // Offline recipient on another node.
    alice.send("x1", &b, json!(1)).await;
    let f = alice.expect("failed").await;
    assert_eq!(
        (f["id"].as_str(), f["reason"].as_str()),
        (Some("x1"), Some("offline"))
    );
    // Recipient that never acks: one retry with the same seq, then timeout.
    let mut bob = Client::login(&c.nodes[1].http_url(), &b).await;
    alice.send("x2", &b, json!(2)).await;
    let m1 = bob.expect("msg").await;
    let m2 = bob.expect("msg").await;
    assert_eq!(m1["seq"], m2["seq"]);
    let f = alice.expect("failed").await;
    assert_eq!(
        (f["id"].as_str(), f["reason"].as_str()),
        (Some("x2"), Some("timeout"))
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_device_across_logins_at_different_nodes() {
    let c = Cluster::start(3).await;
    c.wait_converged(3).await;
    let (a, b) = c.uids_on_different_nodes();
    let mut alice = Client::login(&c.nodes[0].http_url(), &a).await;
    let mut bob1 = Client::login(&c.nodes[1].http_url(), &b).await;
    let mut bob2 = Client::login(&c.nodes[2].http_url(), &b).await;
    assert_eq!(bob1.node, bob2.node, "both devices live on the owner");
    alice.send("m", &b, json!("x")).await;
    let m1 = bob1.expect("msg").await;
    let m2 = bob2.expect("msg").await;
    assert_eq!(m1["id"], "m");
    assert_eq!(m2["id"], "m");
    bob2.ack(m2["seq"].as_u64().unwrap()).await;
    assert_eq!(alice.expect("delivered").await["id"], "m");
    alice.expect_nothing(Duration::from_millis(300)).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_push_from_any_node() {
    let c = Cluster::start(3).await;
    c.wait_converged(3).await;
    let (a, b) = c.uids_on_different_nodes();
    let mut bob = Client::login(&c.nodes[0].http_url(), &b).await;
    for n in &c.nodes {
        let p = cluster_support::api_get(&n.http_url(), &format!("/api/presence/{b}")).await;
        assert_eq!(p["online"], true, "{p}");
        assert_eq!(p["sessions"], 1);
        assert_eq!(p["node"], bob.node.as_str());
        let p = cluster_support::api_get(&n.http_url(), &format!("/api/presence/{a}")).await;
        assert_eq!(p["online"], false);
        // A user asks too, with its own token, through any node: the chat page's contacts.
        let token = cluster_support::login(&n.http_url(), "viewer").await["token"]
            .as_str()
            .unwrap()
            .to_string();
        let p: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/presence", n.http_url()))
            .query(&[("uid", &a), ("uid", &b)])
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(p["presence"][&b], true, "{p}");
        assert_eq!(p["presence"][&a], false, "{p}");
    }
    let pusher = c
        .nodes
        .iter()
        .find(|n| n.node_id() != bob.node)
        .unwrap()
        .http_url();
    let push = tokio::spawn(async move {
        cluster_support::api_post(
            &pusher,
            "/api/push",
            json!({"to": b, "body": {"k": 1}, "id": "p1"}),
        )
        .await
    });
    let m = bob.expect("msg").await;
    assert_eq!(m["from"], "$system");
    bob.ack(m["seq"].as_u64().unwrap()).await;
    let answer = push.await.unwrap();
    assert_eq!(answer["status"], "delivered", "{answer}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_moves_users_and_loses_nothing() {
    let mut c = Cluster::start_with(2, |cfg| cfg.delivery.hold_ms = 3000).await;
    c.wait_converged(2).await;
    // Find a uid that n3 will own once it joins.
    let future = imgate::ring::Ring::new(imgate::ring::node_ids(&["n1", "n2", "n3"]), 160, 0);
    let moving = first_uid("mover-", |u| &**future.primary(u).unwrap() == "n3");
    let staying = first_uid("stayer-", |u| &**future.primary(u).unwrap() != "n3");
    let mut mover = Client::login(&c.nodes[0].http_url(), &moving).await;
    let mut stayer = Client::login(&c.nodes[0].http_url(), &staying).await;
    let version = c.nodes[0].shared().current_view().version();
    c.add_node().await;
    c.wait_converged(3).await;
    let view = c.nodes[0].shared().current_view();
    assert!(view.version() > version, "a join makes a new ring version");
    assert_eq!(view.ring.nodes().len(), 3);
    let moved = mover.expect("moved").await;
    assert_eq!(moved["node"], "n3");
    assert_eq!(mover.close_code().await, Some(4001));
    // Messages sent while the user moves are held by the new owner, not failed offline.
    stayer.send("during", &moving, json!("x")).await;
    let mut mover = Client::connect(moved["url"].as_str().unwrap(), &mover.token).await;
    expect_delivery(&mut stayer, &mut mover, "during").await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_moves_users_to_survivors() {
    let mut c = Cluster::start(3).await;
    c.wait_converged(3).await;
    let uid = (0..)
        .map(|i| format!("u{i}"))
        .find(|u| c.nodes[2].shared().owner_of(u).unwrap().node.as_ref() == "n3")
        .unwrap();
    let mut client = Client::login(&c.nodes[0].http_url(), &uid).await;
    assert_eq!(client.node, "n3");
    let n3 = c.nodes.pop().unwrap();
    n3.shutdown().await;
    c.wait_converged(2).await;
    // The leaver told its session where the user lives now before closing it.
    let moved = client.expect("moved").await;
    assert_ne!(moved["node"], "n3");
    assert_eq!(client.close_code().await, Some(4001));
    let mut again = Client::login(&c.nodes[0].http_url(), &uid).await;
    assert_ne!(again.node, "n3");
    again.send("self", &uid, json!(0)).await;
    let m = again.expect("msg").await;
    again.ack(m["seq"].as_u64().unwrap()).await;
    assert_eq!(again.expect("delivered").await["id"], "self");
    c.shutdown().await;
}

/// A node started with another cluster secret never joins: its gossip is refused before it is
/// decoded, so it shows in no view, `/health`, `/cluster` or ring, and no QUIC link comes up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_secret_never_joins() {
    let c = Cluster::start(2).await;
    c.wait_converged(2).await;
    let before: Vec<u64> = c
        .nodes
        .iter()
        .map(|n| n.shared().metrics.gossip_rejected_total())
        .collect();
    let mut cfg = imgate::config::Config::for_test_nodes(3);
    cfg.cluster.secret = "not-the-cluster-secret".into();
    cfg.cluster.seeds = vec![c.nodes[0].gossip_addr().to_string()];
    let intruder = imgate::node::start(cfg, "n3").await.unwrap();
    // Its datagrams reach the seed and are refused (and the seed's answers, if any, by it).
    cluster_support::wait_until(Duration::from_secs(10), || {
        c.nodes[0].shared().metrics.gossip_rejected_total() >= before[0] + 5
    })
    .await;
    for n in &c.nodes {
        let view = n.shared().current_view();
        assert_eq!(
            view.members.len(),
            2,
            "{}: {:?}",
            n.node_id(),
            view.members.keys()
        );
        assert!(!n.shared().links.reachable("n3"));
        let health = cluster_support::api_get(&n.http_url(), "/health").await;
        assert_eq!(
            (&health["members"], &health["reachable"], &health["ready"]),
            (&json!(2), &json!(2), &json!(true)),
            "{health}"
        );
        let cluster = cluster_support::api_get(&n.http_url(), "/cluster").await;
        assert_eq!(cluster["ring_nodes"], json!(["n1", "n2"]), "{cluster}");
        let ids: Vec<&str> = cluster["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["n1", "n2"]);
    }
    assert_eq!(intruder.shared().current_view().members.len(), 1);
    // The cluster serves on as before.
    let (a, b) = c.uids_on_different_nodes();
    let mut alice = Client::login(&c.nodes[0].http_url(), &a).await;
    let mut bob = Client::login(&c.nodes[1].http_url(), &b).await;
    alice.send("s1", &b, json!(1)).await;
    expect_delivery(&mut alice, &mut bob, "s1").await;
    assert_eq!(intruder.shared().metrics.quic_peers.get(), 0);
    assert_eq!(intruder.shared().metrics.messages_in.get(), 0);
    intruder.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_moves_sessions_and_hands_over_held_messages() {
    let mut c = Cluster::start_with(3, |cfg| cfg.delivery.hold_ms = 5000).await;
    c.wait_converged(3).await;
    let owned_by_n3 = |prefix: &str| {
        (0..)
            .map(|i| format!("{prefix}{i}"))
            .find(|u| c.nodes[0].shared().owner_of(u).unwrap().node.as_ref() == "n3")
            .unwrap()
    };
    let (online, offline) = (owned_by_n3("on"), owned_by_n3("off"));
    let sender_uid = (0..)
        .map(|i| format!("s{i}"))
        .find(|u| c.nodes[0].shared().owner_of(u).unwrap().node.as_ref() != "n3")
        .unwrap();
    let mut sender = Client::login(&c.nodes[0].http_url(), &sender_uid).await;
    let mut user = Client::login(&c.nodes[0].http_url(), &online).await;
    assert_eq!(user.node, "n3");
    // A message held on n3 for a user who is not connected yet.
    sender.send("held-1", &offline, json!("x")).await;
    cluster_support::wait_until(Duration::from_secs(5), || {
        c.nodes[2].shared().metrics.held.get() == 1
    })
    .await;
    let n3 = c.nodes.pop().unwrap();
    let stopping = tokio::spawn(n3.shutdown());
    // The connected user is told where to go, with code 4001, and is served there.
    let moved = user.expect("moved").await;
    assert_ne!(moved["node"], "n3");
    assert_eq!(user.close_code().await, Some(4001));
    c.wait_members(2).await;
    let mut user = Client::connect(moved["url"].as_str().unwrap(), &user.token).await;
    assert_eq!(user.node, moved["node"].as_str().unwrap());
    // The held message was handed to the new owner and reaches the user when they log in.
    let mut late = Client::login(&c.nodes[0].http_url(), &offline).await;
    assert_ne!(late.node, "n3");
    let m = late.expect("msg").await;
    assert_eq!(m["id"], "held-1");
    late.ack(m["seq"].as_u64().unwrap()).await;
    assert_eq!(sender.expect("delivered").await["id"], "held-1");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown within its bound")
        .unwrap();
    c.wait_converged(2).await;
    user.send("after", &sender_uid, json!(1)).await;
    let m = sender.expect("msg").await;
    sender.ack(m["seq"].as_u64().unwrap()).await;
    assert_eq!(user.expect("delivered").await["id"], "after");
    c.shutdown().await;
}

/// The first uid with `prefix` that node 0 sees owned by `node`.
fn owned_by(c: &Cluster, node: &str, prefix: &str) -> String {
    first_uid(prefix, |u| {
        c.nodes[0].shared().owner_of(u).unwrap().node.as_ref() == node
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_hands_held_messages_to_the_new_owner() {
    let mut c = Cluster::start_with(2, |cfg| cfg.delivery.hold_ms = 8000).await;
    c.wait_converged(2).await;
    let future = imgate::ring::Ring::new(imgate::ring::node_ids(&["n1", "n2", "n3"]), 160, 0);
    let moving = first_uid("mover-", |u| &**future.primary(u).unwrap() == "n3");
    let old_owner = c.nodes[0].shared().owner_of(&moving).unwrap().node;
    let old = c
        .nodes
        .iter()
        .position(|n| n.node_id() == &*old_owner)
        .unwrap();
    let sender_uid = first_uid("sender-", |u| &**future.primary(u).unwrap() != "n3");
    let mut sender = Client::login(&c.nodes[0].http_url(), &sender_uid).await;
    // Held at the old owner: the recipient is offline.
    sender.send("held-1", &moving, json!("x")).await;
    cluster_support::wait_until(Duration::from_secs(5), || {
        c.nodes[old].shared().metrics.held.get() == 1
    })
    .await;
    c.add_node().await;
    c.wait_converged(3).await;
    // The old owner hands it to n3, which holds it until the user comes.
    cluster_support::wait_until(Duration::from_secs(5), || {
        c.nodes[2].shared().metrics.held.get() == 1 && c.nodes[old].shared().metrics.held.get() == 0
    })
    .await;
    let mut mover = Client::login(&c.nodes[0].http_url(), &moving).await;
    assert_eq!(mover.node, "n3");
    expect_delivery(&mut sender, &mut mover, "held-1").await;
    c.shutdown().await;
}

/// A session can reach the driver after the view changed under it (the upgrade saw the old
/// view): the driver checks ownership again and sends it away instead of serving it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_rechecks_ownership_when_a_session_opens() {
    let c = Cluster::start(2).await;
    c.wait_converged(2).await;
    let uid = owned_by(&c, "n2", "u");
    let n1 = c.nodes[0].shared();
    let (outbox, frames, end) = Outbox::new(16);
    n1.engine
        .send(Command::Open {
            session: n1.next_session_id(),
            uid: uid.as_str().into(),
            iat: 0,
            outbox,
        })
        .await
        .unwrap();
    let end = tokio::time::timeout(cluster_support::WAIT, end)
        .await
        .expect("the driver ends the session")
        .unwrap();
    match end {
        SessionEnd::Moved(owner) => {
            assert_eq!(&*owner.node, "n2");
            assert_eq!(&*owner.url, c.nodes[1].ws_url());
        }
        other => panic!("expected moved, got {other:?}"),
    }
    let mut out = Vec::new();
    assert!(
        tokio::time::timeout(Duration::from_millis(100), frames.pop_batch(&mut out, 8))
            .await
            .is_err(),
        "no frame for a session that is not served: {out:?}"
    );
    let status = c.nodes[0].status().await.unwrap();
    assert_eq!(status.sessions, 0, "not registered at n1: {status:?}");
    c.shutdown().await;
}

/// A link that goes down while gossip still lists the peer fails the forwards in flight over
/// it at once (not after the sweep's age bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_goes_down_fails_its_forwards() {
    let c = Cluster::start_with(2, |cfg| {
        // Long enough that no retry, timeout or sweep can end the send during the test.
        cfg.delivery.ack_timeout_ms = 60_000;
    })
    .await;
    c.wait_converged(2).await;
    let a = owned_by(&c, "n1", "a");
    let b = owned_by(&c, "n2", "b");
    let mut alice = Client::login(&c.nodes[0].http_url(), &a).await;
    let mut bob = Client::login(&c.nodes[1].http_url(), &b).await;
    alice.send("m1", &b, json!(1)).await;
    assert_eq!(bob.expect("msg").await["id"], "m1"); // and never acked
    // n2 closes its QUIC links; its gossip goes on.
    c.nodes[1].shared().links.shutdown().await;
    let f = alice.expect("failed").await;
    assert_eq!(
        (f["id"].as_str(), f["reason"].as_str()),
        (Some("m1"), Some("unreachable")),
        "{f}"
    );
    assert!(
        c.nodes[0]
            .shared()
            .current_view()
            .members
            .contains_key("n2"),
        "failed by the link, not by a view change"
    );
    c.shutdown().await;
}

fn wire(from: &str, id: &str, to: &str) -> WireMessage {
    let body = serde_json::value::RawValue::from_string("\"x\"".into()).unwrap();
    WireMessage::from_message(&Message {
        transient: false,
        from: from.into(),
        id: id.into(),
        to: to.into(),
        body: body.into(),
        ts: 1,
        room: None,
        except: None,
    })
}

/// A `Deliver` reaching a node that does not own the recipient (the sender's view was behind)
/// is passed on to the owner, a bounded number of times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deliver_that_reaches_a_non_owner_is_passed_on() {
    let c = Cluster::start(3).await;
    c.wait_converged(3).await;
    let b = owned_by(&c, "n2", "b");
    let mut bob = Client::login(&c.nodes[1].http_url(), &b).await;
    let n3 = c.nodes[2].shared();
    let deliver = |id: &str, hops: u8| LinkEvent::Frame {
        from: "n1".into(),
        frame: PeerFrame::Deliver {
            tag: 7,
            hops,
            msg: wire("alice", id, &b),
        },
    };
    n3.link_events.send(deliver("stale-1", 0)).await.unwrap();
    let m = bob.expect("msg").await;
    assert_eq!(
        (m["id"].as_str(), m["from"].as_str()),
        (Some("stale-1"), Some("alice"))
    );
    bob.ack(m["seq"].as_u64().unwrap()).await;
    assert_eq!(c.metric(2, "imgate_messages_forwarded_total").await, 1);
    // At the bound it is not passed on again: the node holds it for the user itself.
    n3.link_events.send(deliver("stale-2", 2)).await.unwrap();
    cluster_support::wait_until(Duration::from_secs(5), || n3.metrics.held.get() == 1).await;
    bob.expect_nothing(Duration::from_millis(200)).await;
    assert_eq!(c.metric(2, "imgate_messages_forwarded_total").await, 1);
    c.shutdown().await;
}

/// A `Deliver` from a peer is checked like client input: a malformed one fails `invalid` and
/// reaches nobody; a good one right after is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_deliver_from_a_peer_is_refused() {
    let c = Cluster::start(2).await;
    c.wait_converged(2).await;
    let b = owned_by(&c, "n2", "b");
    let mut bob = Client::login(&c.nodes[1].http_url(), &b).await;
    let n2 = c.nodes[1].shared();
    let invalid = r#"imgate_failed_total{reason="invalid"}"#;
    let before = c.metric(1, invalid).await;
    let bad = [
        wire("a\u{1b}", "x1", &b), // control character in `from`
        wire("alice", "", &b),     // empty id
        wire("alice", &"i".repeat(65), &b),
        wire("alice", "x4", &"t".repeat(129)),
    ];
    let mut oversize = wire("alice", "x5", &b);
    oversize.body = format!("\"{}\"", "x".repeat(n2.cfg.limits.max_body_bytes)).into();
    for (i, msg) in bad.into_iter().chain([oversize]).enumerate() {
        n2.link_events
            .send(LinkEvent::Frame {
                from: "n1".into(),
                frame: PeerFrame::Deliver {
                    tag: i as u64,
                    hops: 0,
                    msg,
                },
            })
            .await
            .unwrap();
    }
    cluster_support::wait_until(Duration::from_secs(5), || {
        n2.metrics
            .encode()
            .contains(&format!("{invalid} {}", before + 5))
    })
    .await;
    n2.link_events
        .send(LinkEvent::Frame {
            from: "n1".into(),
            frame: PeerFrame::Deliver {
                tag: 9,
                hops: 0,
                msg: wire("alice", "ok", &b),
            },
        })
        .await
        .unwrap();
    let m = bob.expect("msg").await;
    assert_eq!(m["id"], "ok", "only the good one arrives: {m}");
    c.shutdown().await;
}

/// A forward whose only waiter is a session that is gone does not count as work in flight, so
/// a draining node does not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_of_departed_sessions_are_not_waited_for() {
    let c = Cluster::start_with(2, |cfg| cfg.delivery.ack_timeout_ms = 60_000).await;
    c.wait_converged(2).await;
    let a = owned_by(&c, "n1", "a");
    let b = owned_by(&c, "n2", "b");
    let mut alice = Client::login(&c.nodes[0].http_url(), &a).await;
    let mut bob = Client::login(&c.nodes[1].http_url(), &b).await;
    alice.send("m1", &b, json!(1)).await;
    assert_eq!(bob.expect("msg").await["id"], "m1"); // never acked
    let status = c.nodes[0].status().await.unwrap();
    assert_eq!((status.sessions, status.forwards), (1, 1), "{status:?}");
    drop(alice);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let status = loop {
        let status = c.nodes[0].status().await.unwrap();
        if status.sessions == 0 {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "alice's session never ended"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(status.forwards, 0, "{status:?}");
    c.shutdown().await;
}

/// A link going down fails only the presence questions to that node: one in flight to another
/// node is still answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_down_keeps_presence_questions_to_other_nodes() {
    let c = Cluster::start(3).await;
    c.wait_converged(3).await;
    let uid = owned_by(&c, "n3", "p");
    let n1 = c.nodes[0].shared();
    let (reply, answer) = tokio::sync::oneshot::channel();
    // Both commands reach the driver before n3 can answer the question.
    n1.engine
        .send(Command::Presence { uid, reply })
        .await
        .unwrap();
    n1.link_events
        .send(LinkEvent::Down("n2".into()))
        .await
        .unwrap();
    let sessions = tokio::time::timeout(cluster_support::WAIT, answer)
        .await
        .expect("an answer in time")
        .expect("the question to n3 was kept");
    assert_eq!(sessions, Answer::Sessions(0));
    c.shutdown().await;
}

/// A transient message crosses nodes as its own peer frame: delivered on the ack, `offline` at
/// once for a user with no session on its owner, and pushed once; `/api/push` takes the flag too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_messages_cross_nodes_and_are_not_held() {
    let c = Cluster::start_with(2, |cfg| cfg.delivery.hold_ms = 30_000).await;
    c.wait_converged(2).await;
    let a = owned_by(&c, "n1", "a");
    let b = owned_by(&c, "n2", "b");
    let away = owned_by(&c, "n2", "away");
    let mut alice = Client::login(&c.nodes[0].http_url(), &a).await;
    let mut bob = Client::login(&c.nodes[1].http_url(), &b).await;
    let send = |id: &str, to: &str| json!({"type": "send", "id": id, "to": to, "body": {"typing": true}, "transient": true});
    alice.send_frame(send("t1", &b)).await;
    let m = bob.expect("msg").await;
    bob.ack(m["seq"].as_u64().unwrap()).await;
    assert_eq!(alice.expect("delivered").await["id"], "t1");
    // Held for 30 s if it were durable: transient fails at once.
    alice.send_frame(send("t2", &away)).await;
    let f = alice.expect("failed").await;
    assert_eq!(
        (f["id"].as_str(), f["reason"].as_str()),
        (Some("t2"), Some("offline"))
    );
    assert_eq!(c.metric(1, "imgate_held").await, 0);
    let pushed = cluster_support::api_post(
        &c.nodes[0].http_url(),
        "/api/push",
        json!({"to": away, "body": 1, "transient": true}),
    )
    .await;
    assert_eq!(
        (pushed["status"].as_str(), pushed["reason"].as_str()),
        (Some("failed"), Some("offline")),
        "{pushed}"
    );
    c.shutdown().await;
}
