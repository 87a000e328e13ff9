//! Rooms on a 3-node in-process cluster: every frame and endpoint of PROTOCOL.md's "Rooms",
//! and the bad input the issue lists.

mod cluster_support;

use std::time::Duration;

use cluster_support::{Client, Cluster, first_uid};
use imgate::config::Config;
use imgate::rooms::room_key;
use serde_json::{Value, json};

const KEY: &str = "dev-api-key";

/// Three uids owned by three different nodes, and the owner of each.
fn three_users(c: &Cluster) -> [String; 3] {
    let s = c.nodes[0].shared();
    let owner = |u: &str| s.owner_of(u).unwrap().node;
    let nodes: Vec<String> = c.nodes.iter().map(|n| n.node_id().to_string()).collect();
    let pick = |i: usize| first_uid(&format!("u{i}-"), |u| *owner(u) == *nodes[i]);
    [pick(0), pick(1), pick(2)]
}

/// A room whose owner is node `i`.
fn room_on(c: &Cluster, i: usize) -> String {
    let s = c.nodes[0].shared();
    let node = c.nodes[i].node_id().to_string();
    first_uid("room-", |r| {
        *s.owner_of(&room_key(r)).unwrap().node == *node
    })
}

async fn join(c: &mut Client, room: &str, id: &str) -> Value {
    c.send_frame(json!({"type": "join", "room": room, "id": id}))
        .await;
    c.next().await
}

async fn room_send(c: &mut Client, id: &str, room: &str, body: Value) {
    c.send_frame(json!({"type": "send", "id": id, "room": room, "body": body}))
        .await;
}

/// Reads `msg` frames until one with `id`, acks it, and returns it.
async fn take_msg(c: &mut Client, id: &str) -> Value {
    loop {
        let f = c.expect("msg").await;
        c.ack(f["seq"].as_u64().unwrap()).await;
        if f["id"] == id {
            return f;
        }
    }
}

async fn api(
    method: reqwest::Method,
    url: String,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, url);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let v = resp.json().await.unwrap_or(Value::Null);
    (status, v)
}

fn small(cfg: &mut Config) {
    cfg.delivery.hold_ms = 400;
    cfg.delivery.ack_timeout_ms = 300;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_message_reaches_every_member_on_three_nodes_with_one_result() {
    let c = Cluster::start_with(3, small).await;
    c.wait_converged(3).await;
    let [a, b, d] = three_users(&c);
    // The room lives on the node of none of the senders' choosing: the third.
    let room = room_on(&c, 2);
    let http = c.nodes[0].http_url();
    let mut alice = Client::login(&http, &a).await;
    let mut alice2 = Client::login(&http, &a).await;
    let mut bob = Client::login(&http, &b).await;
    let mut dan = Client::login(&http, &d).await;
    let j = join(&mut alice, &room, "j1").await;
    assert_eq!(
        j,
        json!({"type": "joined", "room": room, "members": 1, "id": "j1"})
    );
    // Membership is per user: alice's other session hears of it, without an id.
    assert_eq!(
        alice2.next().await,
        json!({"type": "joined", "room": room, "members": 1})
    );
    assert_eq!(join(&mut bob, &room, "j2").await["members"], 2);
    // Joining twice is no new membership.
    assert_eq!(join(&mut bob, &room, "j3").await["members"], 2);
    dan.send_frame(json!({"type": "join", "room": room})).await;
    assert_eq!(
        dan.next().await,
        json!({"type": "joined", "room": room, "members": 3})
    );

    room_send(&mut alice, "r1", &room, json!({"t": "hi all"})).await;
    for member in [&mut alice2, &mut bob, &mut dan] {
        let m = take_msg(member, "r1").await;
        assert_eq!(m["room"], room.as_str());
        assert_eq!(m["from"], a.as_str());
        assert_eq!(m["body"], json!({"t": "hi all"}));
        assert!(m["ts"].as_u64().unwrap() > 0);
    }
    let r = alice.expect("room_result").await;
    assert_eq!(
        r,
        json!({"type": "room_result", "id": "r1", "room": room, "members": 3,
               "delivered": 3, "offline": 0, "failed": 0})
    );
    // The sending session did not get its own message; nobody got it twice.
    alice.expect_nothing(Duration::from_millis(300)).await;
    bob.expect_nothing(Duration::from_millis(100)).await;
    // The room's owner fanned it out once.
    assert_eq!(c.metric(2, "imgate_room_sends_total").await, 1);

    // A new session of a member is told its rooms in `welcome`.
    let bob2 = Client::login(&http, &b).await;
    assert_eq!(bob2.welcome["rooms"], json!([room]));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_members_are_held_then_counted_and_a_leave_ends_the_membership() {
    let c = Cluster::start_with(3, small).await;
    c.wait_converged(3).await;
    let [a, b, d] = three_users(&c);
    let room = room_on(&c, 1);
    let http = c.nodes[0].http_url();
    let mut alice = Client::login(&http, &a).await;
    let mut bob = Client::login(&http, &b).await;
    join(&mut alice, &room, "j1").await;
    join(&mut bob, &room, "j2").await;
    // Dan is made a member by the backend while he has no session.
    let url = format!("{http}/api/rooms/{room}/members");
    let (status, v) = api(
        reqwest::Method::POST,
        url,
        Some(KEY),
        Some(json!({"uid": d})),
    )
    .await;
    assert_eq!(
        (status, &v),
        (200, &json!({"room": room, "uid": d, "members": 3}))
    );
    room_send(&mut alice, "r1", &room, json!(1)).await;
    take_msg(&mut bob, "r1").await;
    let r = alice.expect("room_result").await;
    assert_eq!(
        (r["members"].as_u64(), r["delivered"].as_u64()),
        (Some(3), Some(2))
    );
    assert_eq!(
        (r["offline"].as_u64(), r["failed"].as_u64()),
        (Some(1), Some(0))
    );

    // Held like 1:1: dan connects within the hold time and gets it.
    room_send(&mut alice, "r2", &room, json!(2)).await;
    take_msg(&mut bob, "r2").await;
    let mut dan = Client::login(&http, &d).await;
    let m = take_msg(&mut dan, "r2").await;
    assert_eq!(m["room"], room.as_str());
    assert_eq!(alice.expect("room_result").await["delivered"], 3);

    // A transient room message is not held: offline at once for a member with no session.
    drop(dan);
    tokio::time::sleep(Duration::from_millis(200)).await;
    alice
        .send_frame(
            json!({"type": "send", "id": "t1", "room": room, "body": "typing", "transient": true}),
        )
        .await;
    take_msg(&mut bob, "t1").await;
    let r = alice.expect("room_result").await;
    assert_eq!(
        (r["delivered"].as_u64(), r["offline"].as_u64()),
        (Some(2), Some(1))
    );

    // Bob leaves (twice: idempotent); he gets nothing more, and the room counts 2.
    bob.send_frame(json!({"type": "leave", "room": room, "id": "l1"}))
        .await;
    assert_eq!(
        bob.next().await,
        json!({"type": "left", "room": room, "id": "l1"})
    );
    bob.send_frame(json!({"type": "leave", "room": room})).await;
    assert_eq!(bob.next().await, json!({"type": "left", "room": room}));
    room_send(&mut alice, "r3", &room, json!(3)).await;
    let r = alice.expect("room_result").await;
    assert_eq!(r["members"], 2);
    bob.expect_nothing(Duration::from_millis(200)).await;
    // And he may not send there any more.
    room_send(&mut bob, "b1", &room, json!(0)).await;
    assert_eq!(
        bob.next().await,
        json!({"type": "failed", "id": "b1", "room": room, "reason": "forbidden"})
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_room_frames_get_clear_answers_and_the_session_stays_open() {
    let c = Cluster::start_with(3, |cfg| {
        cfg.limits.max_rooms_per_user = 2;
        cfg.limits.max_members_per_room = 2;
    })
    .await;
    c.wait_converged(3).await;
    let [a, b, d] = three_users(&c);
    let http = c.nodes[0].http_url();
    let mut alice = Client::login(&http, &a).await;
    let expect = |id: &str, room: &str, reason: &str| json!({"type": "failed", "id": id, "room": room, "reason": reason});
    // Not a member.
    room_send(&mut alice, "s1", "nobody-here", json!(1)).await;
    assert_eq!(alice.next().await, expect("s1", "nobody-here", "forbidden"));
    // Room ids follow the uid rules.
    for bad in ["", "$sys", "a\u{200b}b"] {
        alice
            .send_frame(json!({"type": "join", "room": bad, "id": "j"}))
            .await;
        assert_eq!(alice.next().await, expect("j", bad, "invalid"));
        room_send(&mut alice, "s2", bad, json!(1)).await;
        assert_eq!(alice.next().await, expect("s2", bad, "invalid"));
    }
    let long = "r".repeat(129);
    alice
        .send_frame(json!({"type": "join", "room": long, "id": "j"}))
        .await;
    assert_eq!(alice.next().await["reason"], "invalid");
    // No id: an `error` frame.
    alice.send_frame(json!({"type": "join", "room": 5})).await;
    let e = alice.expect("error").await;
    assert_eq!(e["code"], "bad_frame");
    alice
        .send_frame(json!({"type": "leave", "room": "x", "id": 7}))
        .await;
    assert_eq!(alice.expect("error").await["code"], "bad_frame");
    // `to` and `room` both: invalid; neither: invalid too.
    alice
        .send_frame(json!({"type": "send", "id": "s3", "room": "x", "to": b, "body": 1}))
        .await;
    assert_eq!(alice.next().await, expect("s3", "x", "invalid"));
    alice
        .send_frame(json!({"type": "send", "id": "s4", "body": 1}))
        .await;
    assert_eq!(
        alice.next().await,
        json!({"type": "failed", "id": "s4", "to": "", "reason": "invalid"})
    );
    // Leaving a room one is not in: `left`.
    alice
        .send_frame(json!({"type": "leave", "room": "never", "id": "l"}))
        .await;
    assert_eq!(
        alice.next().await,
        json!({"type": "left", "room": "never", "id": "l"})
    );
    // Limits: two rooms per user, two members per room.
    assert_eq!(join(&mut alice, "one", "j1").await["type"], "joined");
    assert_eq!(join(&mut alice, "two", "j2").await["type"], "joined");
    assert_eq!(
        join(&mut alice, "three", "j3").await,
        expect("j3", "three", "limit")
    );
    // A room already joined is no new membership.
    assert_eq!(join(&mut alice, "one", "j4").await["type"], "joined");
    let mut bob = Client::login(&http, &b).await;
    assert_eq!(join(&mut bob, "one", "j5").await["members"], 2);
    let mut dan = Client::login(&http, &d).await;
    assert_eq!(
        join(&mut dan, "one", "j6").await,
        expect("j6", "one", "limit")
    );
    let url = format!("{http}/api/rooms/one/members");
    let (status, v) = api(
        reqwest::Method::POST,
        url,
        Some(KEY),
        Some(json!({"uid": "zed"})),
    )
    .await;
    assert_eq!((status, v["error"].as_str()), (409, Some("limit")));
    // The session is still open and in order.
    alice.send_frame(json!({"type": "ping"})).await;
    assert_eq!(alice.expect("pong").await["type"], "pong");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_sends_share_the_per_session_rate_limit() {
    let c = Cluster::start_with(1, |cfg| cfg.limits.sends_per_second = 3).await;
    c.wait_converged(1).await;
    let http = c.nodes[0].http_url();
    let mut alice = Client::login(&http, "alice").await;
    join(&mut alice, "r", "j").await;
    alice.send("d1", "alice", json!(1)).await;
    for i in 0..3 {
        room_send(&mut alice, &format!("s{i}"), "r", json!(i)).await;
    }
    let mut reasons = Vec::new();
    for _ in 0..5 {
        let f = alice.next().await;
        match f["type"].as_str().unwrap() {
            "msg" => alice.ack(f["seq"].as_u64().unwrap()).await,
            "failed" => reasons.push((f["id"].clone(), f["reason"].clone())),
            _ => {}
        }
    }
    assert!(
        reasons.contains(&(json!("s2"), json!("rate_limited"))),
        "{reasons:?}"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rooms_api_adds_lists_pushes_and_removes() {
    let c = Cluster::start_with(3, small).await;
    c.wait_converged(3).await;
    let [a, b, d] = three_users(&c);
    let room = room_on(&c, 2);
    // Asked at a node that owns neither the room nor the users.
    let http = c.nodes[0].http_url();
    let members = format!("{http}/api/rooms/{room}/members");
    for uid in [&a, &b, &d] {
        let (status, _) = api(
            reqwest::Method::POST,
            members.clone(),
            Some(KEY),
            Some(json!({"uid": uid})),
        )
        .await;
        assert_eq!(status, 200);
    }
    let mut alice = Client::login(&http, &a).await;
    let mut bob = Client::login(&http, &b).await;
    // The membership is on the users' owners too: `welcome` lists it.
    let mut alice2 = Client::login(&http, &a).await;
    assert_eq!(alice2.welcome["rooms"], json!([room]));

    let (status, info) = api(
        reqwest::Method::GET,
        format!("{http}/api/rooms/{room}"),
        Some(KEY),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(info["node"], c.nodes[2].node_id());
    assert_eq!(
        (info["members"].as_u64(), info["online"].as_u64()),
        (Some(3), Some(2))
    );
    let mut uids = vec![a.clone(), b.clone(), d.clone()];
    uids.sort();
    assert_eq!(info["uids"], json!(uids));

    let push = format!("{http}/api/rooms/{room}/push");
    let api_push = tokio::spawn(api(
        reqwest::Method::POST,
        push.clone(),
        Some(KEY),
        Some(json!({"body": {"n": 1}, "id": "p1", "wait_ms": 5000})),
    ));
    for member in [&mut alice, &mut alice2, &mut bob] {
        let m = take_msg(member, "p1").await;
        assert_eq!(
            (m["from"].as_str(), m["room"].as_str()),
            (Some("$system"), Some(room.as_str()))
        );
    }
    let (status, r) = api_push.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        r,
        json!({"status": "done", "id": "p1", "room": room, "members": 3,
               "delivered": 2, "offline": 1, "failed": 0})
    );
    // Pending when wait_ms passes first.
    let (status, r) = api(
        reqwest::Method::POST,
        push.clone(),
        Some(KEY),
        Some(json!({"body": 2, "wait_ms": 1})),
    )
    .await;
    assert_eq!((status, r["status"].as_str()), (202, Some("pending")));

    // Removing is idempotent; the user's owner forgets it too.
    for _ in 0..2 {
        let (status, v) = api(
            reqwest::Method::DELETE,
            format!("{members}/{b}"),
            Some(KEY),
            None,
        )
        .await;
        assert_eq!(
            (status, &v),
            (200, &json!({"room": room, "uid": b, "left": true}))
        );
    }
    // Bob's session hears that the backend ended his membership (once: the second DELETE
    // finds none), then may not send there.
    let f = loop {
        let f = bob.next().await;
        if f["type"] == "msg" {
            bob.ack(f["seq"].as_u64().unwrap()).await;
            continue;
        }
        break f;
    };
    assert_eq!(f, json!({"type": "left", "room": room}));
    room_send(&mut bob, "b1", &room, json!(0)).await;
    let f = bob.next().await;
    assert_eq!(f["reason"], "forbidden", "{f}");
    let (_, info) = api(
        reqwest::Method::GET,
        format!("{http}/api/rooms/{room}"),
        Some(KEY),
        None,
    )
    .await;
    assert_eq!(info["members"], 2);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rooms_api_refuses_bad_requests_with_json_errors() {
    let c = Cluster::start(1).await;
    c.wait_converged(1).await;
    let http = c.nodes[0].http_url();
    use reqwest::Method;
    let endpoints = [
        (Method::GET, format!("{http}/api/rooms/r"), None),
        (
            Method::POST,
            format!("{http}/api/rooms/r/members"),
            Some(json!({"uid": "u"})),
        ),
        (
            Method::DELETE,
            format!("{http}/api/rooms/r/members/u"),
            None,
        ),
        (
            Method::POST,
            format!("{http}/api/rooms/r/push"),
            Some(json!({"body": 1})),
        ),
    ];
    for (m, url, body) in &endpoints {
        let (status, v) = api(m.clone(), url.clone(), None, body.clone()).await;
        assert_eq!(status, 401, "{m} {url}: {v}");
        assert!(v["error"].is_string());
        let (status, _) = api(m.clone(), url.clone(), Some("wrong"), body.clone()).await;
        assert_eq!(status, 401);
    }
    // Unknown rooms.
    let (status, v) = api(
        Method::GET,
        format!("{http}/api/rooms/nope"),
        Some(KEY),
        None,
    )
    .await;
    assert_eq!((status, v["error"].as_str()), (404, Some("unknown_room")));
    let (status, v) = api(
        Method::POST,
        format!("{http}/api/rooms/nope/push"),
        Some(KEY),
        Some(json!({"body": 1})),
    )
    .await;
    assert_eq!((status, v["error"].as_str()), (404, Some("unknown_room")));
    // Bad ids and bodies.
    for (m, url, body) in [
        (Method::GET, format!("{http}/api/rooms/%24sys"), None),
        (
            Method::POST,
            format!("{http}/api/rooms/r/members"),
            Some(json!({"uid": "$system"})),
        ),
        (
            Method::POST,
            format!("{http}/api/rooms/r/members"),
            Some(json!({"uid": 5})),
        ),
        (
            Method::POST,
            format!("{http}/api/rooms/r/members"),
            Some(json!([1])),
        ),
        (
            Method::DELETE,
            format!("{http}/api/rooms/r/members/%24x"),
            None,
        ),
        (
            Method::POST,
            format!("{http}/api/rooms/r/push"),
            Some(json!({"body": 1, "id": ""})),
        ),
        (
            Method::GET,
            format!("{http}/api/rooms/{}", "x".repeat(129)),
            None,
        ),
    ] {
        let (status, v) = api(m.clone(), url.clone(), Some(KEY), body).await;
        assert_eq!(status, 400, "{m} {url}: {v}");
        assert!(v["message"].is_string(), "{v}");
    }
    c.shutdown().await;
}
