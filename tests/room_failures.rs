//! Rooms survive node failures: real `imgate node` processes; kill -9 of a room's owner, kill
//! -9 of a member's owner, and a graceful drain of a room's owner. After each, the next room
//! message reaches every member, and no client joins again.

mod cluster_support;
mod proc_support;

use std::time::{Duration, Instant};

use cluster_support::Client;
use proc_support::ProcCluster;
use serde_json::{Value, json};

const KEY: &str = "dev-api-key";

async fn room_info(base: &str, room: &str) -> Option<Value> {
    let resp = reqwest::Client::new()
        .get(format!("{base}/api/rooms/{room}"))
        .bearer_auth(KEY)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    if resp.status() != 200 {
        return None;
    }
    resp.json().await.ok()
}

/// Waits until the room's owner (asked at `base`) counts `members`; returns its node id.
async fn wait_members(base: &str, room: &str, members: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = room_info(base, room).await;
        if let Some(info) = &info
            && info["members"] == members
        {
            return info["node"].as_str().unwrap().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "{room}: the owner never counted {members} members again: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Logs `uid` in at `base` and connects; retries (bounded) until the session's `welcome`
/// lists `room`: the user's new owner learns the membership from the room's owner.
async fn reconnect(base: &str, uid: &str, room: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = Client::login(base, uid).await;
        if c.welcome["rooms"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x == room))
        {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "{uid}: welcome never listed {room}: {}",
            c.welcome
        );
        drop(c);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The members whose session was on `node` come back through `base`, without joining.
async fn reconnect_all(
    clients: &mut [Client],
    uids: &[String],
    node: &str,
    base: &str,
    room: &str,
) {
    for (c, uid) in clients.iter_mut().zip(uids) {
        if c.node == node {
            *c = reconnect(base, uid, room).await;
        }
    }
}

/// `sender` sends to the room; every other member gets it exactly once and acks; the
/// sender's `room_result` counts every member delivered.
async fn everyone_gets(sender: usize, clients: &mut [Client], room: &str, id: &str) {
    let n = clients.len();
    let f = json!({"type": "send", "id": id, "room": room, "body": {"n": id}});
    clients[sender].send_frame(f).await;
    for (i, c) in clients.iter_mut().enumerate() {
        if i == sender {
            continue;
        }
        let m = loop {
            let m = c.expect("msg").await;
            c.ack(m["seq"].as_u64().unwrap()).await;
            if m["id"] == id {
                break m;
            }
        };
        assert_eq!(m["room"], room);
    }
    let r = clients[sender].expect("room_result").await;
    assert_eq!(r["id"], id);
    assert_eq!(r["members"], n as u64, "{r}");
    assert_eq!(r["delivered"], n as u64, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memberships_survive_kill9_of_the_rooms_owner_and_of_a_members_owner_and_a_drain() {
    let mut c = ProcCluster::start(
        5,
        "[delivery]\nack_timeout_ms = 500\nmax_retries = 3\nhold_ms = 2000\n",
    );
    c.wait_ready(5, Duration::from_secs(30)).await;
    let bases: Vec<String> = c.procs.iter().map(|p| p.http.clone()).collect();
    let ids: Vec<String> = c.procs.iter().map(|p| p.id.clone()).collect();
    let node_index = |id: &str| ids.iter().position(|p| p == id).unwrap();
    let room = "ops";
    let uids: Vec<String> = (0..10).map(|i| format!("member{i}")).collect();
    let mut clients = Vec::new();
    for uid in &uids {
        let mut cl = Client::login(&bases[0], uid).await;
        cl.send_frame(json!({"type": "join", "room": room})).await;
        assert_eq!(cl.expect("joined").await["room"], room);
        clients.push(cl);
    }
    let owner = wait_members(&bases[0], room, 10).await;
    everyone_gets(0, &mut clients, room, "before").await;

    println!("room owner {owner}");
    // 1. kill -9 of the room's owner.
    let dead = node_index(&owner);
    c.kill9(dead);
    let live: Vec<usize> = (0..5).filter(|i| c.running(*i)).collect();
    c.wait_ready_on(&live, 4, Duration::from_secs(30)).await;
    let base = bases[live[0]].clone();
    let owner2 = wait_members(&base, room, 10).await;
    assert_ne!(owner2, owner);
    // The members whose sessions were on the dead node come back, without joining.
    reconnect_all(&mut clients, &uids, &owner, &base, room).await;
    everyone_gets(1, &mut clients, room, "after-owner-kill").await;

    // 2. kill -9 of a node that owns members but not the room.
    let victim = clients
        .iter()
        .map(|cl| cl.node.clone())
        .find(|n| *n != owner2)
        .expect("some member lives off the room's owner");
    c.kill9(node_index(&victim));
    let live: Vec<usize> = (0..5).filter(|i| c.running(*i)).collect();
    c.wait_ready_on(&live, 3, Duration::from_secs(30)).await;
    let base = bases[live[0]].clone();
    assert_eq!(wait_members(&base, room, 10).await, owner2);
    reconnect_all(&mut clients, &uids, &victim, &base, room).await;
    let sender = clients.iter().position(|cl| cl.node != owner2).unwrap_or(0);
    everyone_gets(sender, &mut clients, room, "after-member-kill").await;

    // 3. Graceful drain of the room's owner: it hands its rooms over.
    let draining = node_index(&owner2);
    let status = c.terminate(draining, Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "drain exit: {status:?}"
    );
    let live: Vec<usize> = (0..5).filter(|i| c.running(*i)).collect();
    c.wait_ready_on(&live, 2, Duration::from_secs(30)).await;
    let base = bases[live[0]].clone();
    let owner3 = wait_members(&base, room, 10).await;
    assert_ne!(owner3, owner2);
    reconnect_all(&mut clients, &uids, &owner2, &base, room).await;
    everyone_gets(2, &mut clients, room, "after-drain").await;
    let log = c.log(draining);
    assert!(log.contains("drained"), "{log}");
}
