//! The delivery rules of the protocol, end to end, with several users on one node.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use imgate::config::Config;
use serde_json::{Value, json};
use tokio::time::Instant;

/// Reads `n` outcome frames (`delivered`/`failed`) from `ws`, by id. Fails on anything else
/// and on a second outcome for the same id.
async fn outcomes(ws: &mut Ws, n: usize) -> HashMap<String, Value> {
    let mut got = HashMap::new();
    while got.len() < n {
        let f = next_frame(ws, WAIT).await;
        let ty = f["type"].as_str().unwrap_or_default();
        assert!(
            ty == "delivered" || ty == "failed",
            "expected an outcome, got {f}"
        );
        let id = f["id"].as_str().expect("outcome id").to_string();
        if let Some(first) = got.insert(id.clone(), f.clone()) {
            panic!("two outcomes for {id}: {first} and {f}");
        }
    }
    got
}

#[tokio::test]
async fn message_is_pushed_acked_and_reported_delivered() {
    let node = start(fast_config()).await;
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    let before = now_ms();
    send_msg(
        &mut alice,
        "m1",
        "bob",
        json!({"text": "hi", "n": [1, 2.5, null]}),
    )
    .await;
    let m = next_frame(&mut bob, WAIT).await;
    let ts = m["ts"].as_u64().expect("ts in ms");
    assert!(
        ts >= before && ts <= now_ms(),
        "ts {ts} not when the node took it"
    );
    assert_eq!(
        m,
        json!({"type": "msg", "seq": 1, "from": "alice", "id": "m1",
               "body": {"text": "hi", "n": [1, 2.5, null]}, "ts": ts})
    );
    // Nothing reaches alice before the ack.
    expect_no_frame(&mut alice, Duration::from_millis(50)).await;
    ack(&mut bob, 1).await;
    let d = next_frame(&mut alice, WAIT).await;
    assert_eq!(d, json!({"type": "delivered", "id": "m1", "to": "bob"}));
    // Acked: no retry at bob, no second outcome at alice.
    expect_no_frame(&mut bob, QUIET).await;
    expect_no_frame(&mut alice, Duration::from_millis(50)).await;
    node.shutdown().await;
}

#[tokio::test]
async fn body_defaults_to_null_and_any_json_body_passes_through() {
    let node = start(fast_config()).await;
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    send_json(
        &mut alice,
        &json!({"type": "send", "id": "m0", "to": "bob"}),
    )
    .await;
    let m = expect_msg(&mut bob, "alice", "m0", 1).await;
    assert_eq!(m["body"], Value::Null);
    let bodies = [
        json!("text"),
        json!(7),
        json!(true),
        json!([]),
        json!({"a": {"b": "ü李"}}),
    ];
    for (i, body) in bodies.iter().enumerate() {
        send_msg(&mut alice, &format!("m{}", i + 1), "bob", body.clone()).await;
        let m = expect_msg(&mut bob, "alice", &format!("m{}", i + 1), i as u64 + 2).await;
        assert_eq!(&m["body"], body);
    }
    node.shutdown().await;
}

#[tokio::test]
async fn seq_grows_by_one_per_new_message_and_starts_at_1_per_session() {
    let node = start(fast_config()).await;
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    let mut carol = connect(&node, "carol").await;
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        send_msg(&mut alice, id, "bob", json!(i)).await;
        expect_msg(&mut bob, "alice", id, i as u64 + 1).await;
    }
    // Another sender to the same session continues the same sequence.
    send_msg(&mut carol, "c1", "bob", json!(0)).await;
    expect_msg(&mut bob, "carol", "c1", 4).await;
    // A new session of bob starts at 1; the old one goes on at 5.
    let mut bob2 = connect(&node, "bob").await;
    send_msg(&mut alice, "d", "bob", json!(0)).await;
    expect_msg(&mut bob2, "alice", "d", 1).await;
    expect_msg(&mut bob, "alice", "d", 5).await;
    // Acks in any order.
    for seq in [3, 1, 5, 2, 4] {
        ack(&mut bob, seq).await;
    }
    let got = outcomes(&mut alice, 4).await;
    for id in ["a", "b", "c", "d"] {
        assert_eq!(got[id]["type"], "delivered", "{id}: {:?}", got[id]);
    }
    assert_eq!(outcomes(&mut carol, 1).await["c1"]["type"], "delivered");
    node.shutdown().await;
}

#[tokio::test]
async fn unacked_msg_is_pushed_again_with_same_seq_then_fails_timeout() {
    // ack 150 ms, 2 retries.
    let node = start(fast_config()).await;
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    send_msg(&mut alice, "m1", "bob", json!("x")).await;
    let first = expect_msg(&mut bob, "alice", "m1", 1).await;
    let t0 = Instant::now();
    let mut last = t0;
    for _ in 0..2 {
        let again = expect_msg(&mut bob, "alice", "m1", 1).await;
        assert_eq!(again, first, "a retry is the same msg");
        let gap = last.elapsed();
        assert!(
            gap >= Duration::from_millis(120),
            "retried after {gap:?}, before ack_timeout_ms"
        );
        last = Instant::now();
    }
    let f = next_frame(&mut alice, WAIT).await;
    assert_eq!(
        f,
        json!({"type": "failed", "id": "m1", "to": "bob", "reason": "timeout"})
    );
    let total = t0.elapsed();
    assert!(
        total >= Duration::from_millis(400),
        "failed after {total:?}"
    );
    // No more pushes after the last retry, and a late ack is ignored without an answer.
    expect_no_frame(&mut bob, QUIET).await;
    ack(&mut bob, 1).await;
    expect_no_frame(&mut alice, QUIET).await;
    ping_pong(&mut bob).await;
    // The retry counter moved.
    let text = metrics_text(&node).await;
    assert_eq!(metric(&text, "imgate_retries_total"), Some(2.0), "{text}");
    assert_eq!(
        metric(&text, r#"imgate_failed_total{reason="timeout"}"#),
        Some(1.0),
        "{text}"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn ack_of_a_retry_delivers() {
    let node = start(fast_config()).await;
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    send_msg(&mut alice, "m1", "bob", json!("x")).await;
    expect_msg(&mut bob, "alice", "m1", 1).await;
    expect_msg(&mut bob, "alice", "m1", 1).await; // first retry
    ack(&mut bob, 1).await;
    let d = next_frame(&mut alice, WAIT).await;
    assert_eq!(d, json!({"type": "delivered", "id": "m1", "to": "bob"}));
    expect_no_frame(&mut bob, QUIET).await;
    node.shutdown().await;
}

#[tokio::test]
async fn offline_recipient_gets_held_message_when_connecting_within_hold() {
    let mut cfg = fast_config();
    cfg.delivery.hold_ms = 1500;
    let node = start(cfg).await;
    let mut alice = connect(&node, "alice").await;
    send_msg(&mut alice, "m1", "bob", json!("while you were away")).await;
    ping_pong(&mut alice).await; // the send reached the engine
    let (mut bob, _welcome) = connect_welcome(&node, "bob").await; // welcome comes first
    let m = expect_msg(&mut bob, "alice", "m1", 1).await;
    assert_eq!(m["body"], "while you were away");
    ack(&mut bob, 1).await;
    let d = next_frame(&mut alice, WAIT).await;
    assert_eq!(d, json!({"type": "delivered", "id": "m1", "to": "bob"}));
    node.shutdown().await;
}

#[tokio::test]
async fn offline_recipient_that_never_connects_fails_offline() {
    let node = start(fast_config()).await; // hold 300 ms
    let mut alice = connect(&node, "alice").await;
    let t0 = Instant::now();
    send_msg(&mut alice, "m1", "bob", json!(1)).await;
    let f = next_frame(&mut alice, WAIT).await;
    assert_eq!(
        f,
        json!({"type": "failed", "id": "m1", "to": "bob", "reason": "offline"})
    );
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "failed before hold_ms: {waited:?}"
    );
    // Bob connecting later gets nothing.
    let mut bob = connect(&node, "bob").await;
    expect_no_frame(&mut bob, QUIET).await;
    node.shutdown().await;
}

#[tokio::test]
async fn held_messages_go_to_the_first_session_in_order() {
    let mut cfg = fast_config();
    cfg.delivery.hold_ms = 1500;
    let node = start(cfg).await;
    let mut alice = connect(&node, "alice").await;
    for i in 0..5 {
        send_msg(&mut alice, &format!("h{i}"), "bob", json!(i)).await;
    }
    ping_pong(&mut alice).await;
    let mut bob = connect(&node, "bob").await;
    for i in 0..5 {
        expect_msg(&mut bob, "alice", &format!("h{i}"), i + 1).await;
        ack(&mut bob, i + 1).await;
    }
    let got = outcomes(&mut alice, 5).await;
    assert!(got.values().all(|f| f["type"] == "delivered"), "{got:?}");
    node.shutdown().await;
}

#[tokio::test]
async fn duplicate_in_flight_is_pushed_once_and_answered_twice() {
    let node = start(fast_config()).await;
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    send_msg(&mut alice, "dup", "bob", json!("one")).await;
    send_msg(&mut alice, "dup", "bob", json!("two")).await;
    // The pong proves both sends reached the engine before bob's ack can.
    ping_pong(&mut alice).await;
    let m = expect_msg(&mut bob, "alice", "dup", 1).await;
    assert_eq!(m["body"], "one");
    ack(&mut bob, 1).await;
    for _ in 0..2 {
        let d = next_frame(&mut alice, WAIT).await;
        assert_eq!(d, json!({"type": "delivered", "id": "dup", "to": "bob"}));
    }
    // One msg only, and no retry after the ack.
    expect_no_frame(&mut bob, QUIET).await;
    expect_no_frame(&mut alice, Duration::from_millis(50)).await;
    node.shutdown().await;
}

#[tokio::test]
async fn duplicate_from_another_session_of_the_sender_is_deduplicated() {
    let node = start(fast_config()).await;
    let mut a1 = connect(&node, "alice").await;
    let mut a2 = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    send_msg(&mut a1, "x", "bob", json!(1)).await;
    ping_pong(&mut a1).await;
    send_msg(&mut a2, "x", "bob", json!(1)).await;
    ping_pong(&mut a2).await;
    expect_msg(&mut bob, "alice", "x", 1).await;
    ack(&mut bob, 1).await;
    assert_eq!(next_of(&mut a1, "delivered").await["id"], "x");
    assert_eq!(next_of(&mut a2, "delivered").await["id"], "x");
    expect_no_frame(&mut bob, QUIET).await;
    node.shutdown().await;
}

#[tokio::test]
async fn duplicate_after_delivered_is_delivered_again_at_once() {
    let node = start(fast_config()).await;
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    send_msg(&mut alice, "m1", "bob", json!(1)).await;
    expect_msg(&mut bob, "alice", "m1", 1).await;
    ack(&mut bob, 1).await;
    assert_eq!(next_of(&mut alice, "delivered").await["id"], "m1");
    // Same (from, id) again, even with another body: delivered, and bob sees nothing new.
    send_msg(&mut alice, "m1", "bob", json!("changed")).await;
    let d = next_frame(&mut alice, WAIT).await;
    assert_eq!(d, json!({"type": "delivered", "id": "m1", "to": "bob"}));
    expect_no_frame(&mut bob, QUIET).await;
    // A different sender with the same id is a different message.
    let mut carol = connect(&node, "carol").await;
    send_msg(&mut carol, "m1", "bob", json!(2)).await;
    expect_msg(&mut bob, "carol", "m1", 2).await;
    node.shutdown().await;
}

#[tokio::test]
async fn after_failed_the_same_id_is_a_new_attempt() {
    let node = start(fast_config()).await;
    let mut alice = connect(&node, "alice").await;
    // First attempt: bob offline.
    send_msg(&mut alice, "m1", "bob", json!("first")).await;
    let f = next_frame(&mut alice, WAIT).await;
    assert_eq!(
        f,
        json!({"type": "failed", "id": "m1", "to": "bob", "reason": "offline"})
    );
    // Second attempt: bob online but does not ack -> timeout.
    let mut bob = connect(&node, "bob").await;
    send_msg(&mut alice, "m1", "bob", json!("second")).await;
    for _ in 0..3 {
        let m = expect_msg(&mut bob, "alice", "m1", 1).await;
        assert_eq!(m["body"], "second");
    }
    assert_eq!(next_of(&mut alice, "failed").await["reason"], "timeout");
    // Third attempt: delivered.
    send_msg(&mut alice, "m1", "bob", json!("third")).await;
    let m = expect_msg(&mut bob, "alice", "m1", 2).await;
    assert_eq!(m["body"], "third");
    ack(&mut bob, 2).await;
    let d = next_frame(&mut alice, WAIT).await;
    assert_eq!(d, json!({"type": "delivered", "id": "m1", "to": "bob"}));
    node.shutdown().await;
}

#[tokio::test]
async fn fan_out_to_every_session_and_one_ack_settles_it() {
    let node = start(fast_config()).await;
    let mut alice = connect(&node, "alice").await;
    let mut b1 = connect(&node, "bob").await;
    let mut b2 = connect(&node, "bob").await;
    send_msg(&mut alice, "m1", "bob", json!("both")).await;
    let m1 = expect_msg(&mut b1, "alice", "m1", 1).await;
    let m2 = expect_msg(&mut b2, "alice", "m1", 1).await;
    assert_eq!(m1["body"], "both");
    assert_eq!(m1["ts"], m2["ts"]);
    ack(&mut b2, 1).await;
    let d = next_frame(&mut alice, WAIT).await;
    assert_eq!(d, json!({"type": "delivered", "id": "m1", "to": "bob"}));
    // Exactly one outcome; the session that did not ack gets no retry (watched for longer
    // than ack_timeout x (retries + 1)).
    let window = Duration::from_millis(600);
    let (_, _) = tokio::join!(
        expect_no_frame(&mut b1, window),
        expect_no_frame(&mut alice, window)
    );
    expect_no_frame(&mut b2, Duration::from_millis(50)).await;
    node.shutdown().await;
}

#[tokio::test]
async fn fan_out_with_no_ack_times_out_once() {
    let node = start(fast_config()).await;
    let mut alice = connect(&node, "alice").await;
    let mut b1 = connect(&node, "bob").await;
    let mut b2 = connect(&node, "bob").await;
    send_msg(&mut alice, "m1", "bob", json!(1)).await;
    let reading = async {
        for ws in [&mut b1, &mut b2] {
            for _ in 0..3 {
                expect_msg(ws, "alice", "m1", 1).await;
            }
        }
    };
    let (_, f) = tokio::join!(reading, next_frame(&mut alice, WAIT));
    assert_eq!(
        f,
        json!({"type": "failed", "id": "m1", "to": "bob", "reason": "timeout"})
    );
    expect_no_frame(&mut alice, QUIET).await;
    node.shutdown().await;
}

#[tokio::test]
async fn order_of_fifty_messages_is_kept() {
    let node = start(fast_config()).await;
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    for i in 0..50 {
        send_msg(&mut alice, &format!("m{i:02}"), "bob", json!(i)).await;
    }
    for i in 0..50u64 {
        let m = next_of(&mut bob, "msg").await;
        assert_eq!(m["id"], format!("m{i:02}"), "out of order: {m}");
        assert_eq!(m["seq"], i + 1, "{m}");
        assert_eq!(m["body"], i, "{m}");
        ack(&mut bob, i + 1).await;
    }
    let got = outcomes(&mut alice, 50).await;
    assert!(
        got.values()
            .all(|f| f["type"] == "delivered" && f["to"] == "bob"),
        "{got:?}"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn send_to_oneself_reaches_every_own_session() {
    let node = start(fast_config()).await;
    let mut a1 = connect(&node, "alice").await;
    let mut a2 = connect(&node, "alice").await;
    send_msg(&mut a1, "note", "alice", json!("to self")).await;
    let m1 = expect_msg(&mut a1, "alice", "note", 1).await;
    let m2 = expect_msg(&mut a2, "alice", "note", 1).await;
    assert_eq!(m1["body"], "to self");
    assert_eq!(m2["body"], "to self");
    ack(&mut a2, 1).await;
    let d = next_frame(&mut a1, WAIT).await;
    assert_eq!(d, json!({"type": "delivered", "id": "note", "to": "alice"}));
    // Settled: no retry to either session, no outcome at the session that did not send.
    let window = Duration::from_millis(500);
    let (_, _) = tokio::join!(
        expect_no_frame(&mut a1, window),
        expect_no_frame(&mut a2, window)
    );
    node.shutdown().await;
}

#[tokio::test]
async fn send_to_oneself_with_one_session_acked_by_itself() {
    let node = start(fast_config()).await;
    let mut a = connect(&node, "alice").await;
    send_msg(&mut a, "n", "alice", json!(1)).await;
    expect_msg(&mut a, "alice", "n", 1).await;
    ack(&mut a, 1).await;
    let d = next_frame(&mut a, WAIT).await;
    assert_eq!(d, json!({"type": "delivered", "id": "n", "to": "alice"}));
    node.shutdown().await;
}

#[tokio::test]
async fn unknown_and_repeated_acks_are_ignored_silently() {
    let node = start(fast_config()).await;
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    // Acks for seqs never pushed.
    for seq in [0, 1, 99, u64::MAX] {
        ack(&mut bob, seq).await;
    }
    expect_no_frame(&mut bob, Duration::from_millis(100)).await;
    send_msg(&mut alice, "m1", "bob", json!(1)).await;
    expect_msg(&mut bob, "alice", "m1", 1).await;
    ack(&mut bob, 1).await;
    ack(&mut bob, 1).await;
    ack(&mut bob, 2).await;
    assert_eq!(next_of(&mut alice, "delivered").await["id"], "m1");
    expect_no_frame(&mut alice, QUIET).await;
    expect_no_frame(&mut bob, Duration::from_millis(50)).await;
    // An ack of another session's seq does nothing either.
    let mut carol = connect(&node, "carol").await;
    send_msg(&mut alice, "m2", "bob", json!(2)).await;
    expect_msg(&mut bob, "alice", "m2", 2).await;
    ack(&mut carol, 2).await;
    ping_pong(&mut carol).await;
    // Bob's msg is still un-acked: it is pushed again.
    expect_msg(&mut bob, "alice", "m2", 2).await;
    ack(&mut bob, 2).await;
    assert_eq!(next_of(&mut alice, "delivered").await["id"], "m2");
    node.shutdown().await;
}

#[tokio::test]
async fn burst_over_sends_per_second_is_rate_limited() {
    let mut cfg = fast_config();
    cfg.limits.sends_per_second = 5;
    let node = start(cfg).await;
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    for i in 1..=6 {
        send_msg(&mut alice, &format!("r{i}"), "bob", json!(i)).await;
    }
    for i in 1..=5u64 {
        expect_msg(&mut bob, "alice", &format!("r{i}"), i).await;
        ack(&mut bob, i).await;
    }
    let got = outcomes(&mut alice, 6).await;
    for i in 1..=5 {
        assert_eq!(got[&format!("r{i}")]["type"], "delivered", "{got:?}");
    }
    assert_eq!(
        got["r6"],
        json!({"type": "failed", "id": "r6", "to": "bob", "reason": "rate_limited"})
    );
    expect_no_frame(&mut bob, Duration::from_millis(50)).await;
    node.shutdown().await;
}

#[tokio::test]
async fn sends_in_flight_are_bounded_per_session() {
    let mut cfg = fast_config();
    cfg.limits.max_inflight_per_session = 3;
    let node = start(cfg).await;
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    for i in 1..=4 {
        send_msg(&mut alice, &format!("f{i}"), "bob", json!(i)).await;
    }
    // The 4th is refused on the spot, long before the others can time out.
    let f = next_frame(&mut alice, WAIT).await;
    assert_eq!(
        f,
        json!({"type": "failed", "id": "f4", "to": "bob", "reason": "rate_limited"})
    );
    // Bob reads (so he is not a slow consumer) but never acks: the three time out.
    let reading = async {
        for _ in 0..9 {
            next_of(&mut bob, "msg").await;
        }
    };
    let (_, got) = tokio::join!(reading, outcomes(&mut alice, 3));
    for i in 1..=3 {
        assert_eq!(got[&format!("f{i}")]["reason"], "timeout", "{got:?}");
    }
    // Room again: a new send goes through.
    send_msg(&mut alice, "f5", "bob", json!(5)).await;
    expect_msg(&mut bob, "alice", "f5", 4).await;
    ack(&mut bob, 4).await;
    assert_eq!(next_of(&mut alice, "delivered").await["id"], "f5");
    node.shutdown().await;
}

/// `delivery.max_held_bytes` bounds the bodies in delivery on a node, held and pushed alike,
/// whoever sends them: a send or a push that would go over fails `rate_limited`, and the
/// bytes come back when messages end.
#[tokio::test]
async fn bodies_in_delivery_are_bounded_in_bytes_per_node() {
    let mut cfg = fast_config();
    cfg.delivery.max_held_bytes = 250;
    cfg.delivery.hold_ms = 60_000;
    let node = start(cfg).await;
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    let body = json!("x".repeat(98)); // 100 bytes encoded
    // Held for an offline user, then pushed to a session that does not ack yet: 200 bytes.
    send_msg(&mut alice, "b1", "carol", body.clone()).await;
    send_msg(&mut alice, "b2", "bob", body.clone()).await;
    expect_msg(&mut bob, "alice", "b2", 1).await;
    let text = metrics_text(&node).await;
    assert_eq!(
        metric(&text, "imgate_delivery_bytes"),
        Some(200.0),
        "{text}"
    );
    // A third would make 300: refused, for a client and for the API alike.
    send_msg(&mut alice, "b3", "bob", body.clone()).await;
    assert_eq!(
        next_frame(&mut alice, WAIT).await,
        json!({"type": "failed", "id": "b3", "to": "bob", "reason": "rate_limited"})
    );
    let push = http()
        .post(format!("{}/api/push", node.http_url()))
        .bearer_auth(API_KEY)
        .json(&json!({"to": "bob", "body": body, "id": "p1", "wait_ms": 1000}))
        .send()
        .await
        .unwrap();
    let (status, _, v) = json_response(push).await;
    assert_eq!(
        (status, &v["status"], &v["reason"]),
        (200, &json!("failed"), &json!("rate_limited")),
        "{v}"
    );
    // A small one still fits (200 + 10 <= 250).
    send_msg(&mut alice, "b4", "bob", json!("12345678")).await;
    expect_msg(&mut bob, "alice", "b4", 2).await;
    // Acks give the bytes back: then a full-size message fits again.
    ack(&mut bob, 1).await;
    ack(&mut bob, 2).await;
    let mut done = outcomes(&mut alice, 2).await;
    assert_eq!(done.remove("b2").unwrap()["type"], "delivered");
    send_msg(&mut alice, "b5", "bob", body).await;
    expect_msg(&mut bob, "alice", "b5", 3).await;
    let text = metrics_text(&node).await;
    assert_eq!(
        metric(&text, "imgate_delivery_bytes"),
        Some(200.0),
        "{text}"
    );
    node.shutdown().await;
}

/// Checks that `got` holds a `failed` (timeout or offline) for every id.
fn all_failed_undelivered(got: &HashMap<String, Value>, ids: &[String]) {
    assert_eq!(got.len(), ids.len(), "{got:?}");
    for id in ids {
        let f = got.get(id).unwrap_or_else(|| panic!("no outcome for {id}"));
        assert_eq!(f["type"], "failed", "bob never acks, yet {f}");
        assert_eq!(f["to"], "bob", "{f}");
        let reason = f["reason"].as_str().unwrap();
        assert!(reason == "offline" || reason == "timeout", "{f}");
    }
}

#[tokio::test]
async fn slow_consumer_over_unacked_bound_is_closed_and_every_send_still_ends() {
    let mut cfg = fast_config();
    cfg.limits.max_unacked_per_session = 4;
    let node = start(cfg).await;
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await; // bob never reads until the end
    let ids: Vec<String> = (0..30).map(|i| format!("s{i}")).collect();
    for id in &ids {
        send_msg(&mut alice, id, "bob", json!(id)).await;
    }
    let got = outcomes(&mut alice, ids.len()).await;
    all_failed_undelivered(&got, &ids);
    expect_no_frame(&mut alice, Duration::from_millis(50)).await;
    // Bob's socket was closed as a slow consumer.
    let (frames, end) = read_until_close(&mut bob, WAIT).await;
    assert!(frames.iter().all(|f| f["type"] == "msg"), "{frames:?}");
    assert!(
        frames.len() <= 5,
        "pushed past the un-acked bound: {}",
        frames.len()
    );
    assert!(matches!(end, Event::Close(Some(4002))), "{end:?}");
    assert_eq!(presence(&node, "bob").await["sessions"], 0);
    let text = metrics_text(&node).await;
    assert_eq!(
        metric(&text, "imgate_slow_consumers_total"),
        Some(1.0),
        "{text}"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn slow_consumer_over_outbound_queue_is_closed_and_every_send_still_ends() {
    // Bob never reads his socket. Eight senders keep 32 large messages each in flight, more
    // than the kernel's socket buffers and bob's queue of 64 frames can take: his queue fills
    // and the node closes him (4002) instead of buffering without bound.
    let mut cfg = fast_config();
    cfg.limits.outbound_queue = 64;
    cfg.limits.max_inflight_per_session = 32;
    cfg.delivery.max_held_per_user = 32;
    cfg.delivery.hold_ms = 800;
    let node = start(cfg).await;
    let (mut bob, _) = connect_welcome(&node, "bob").await;
    let big = "x".repeat(60_000);
    let mut senders = Vec::new();
    let mut all_ids = Vec::new();
    for s in 0..8 {
        let mut ws = connect(&node, &format!("sender{s}")).await;
        let ids: Vec<String> = (0..32).map(|i| format!("s{s}-{i}")).collect();
        for id in &ids {
            send_msg(&mut ws, id, "bob", json!(big)).await;
        }
        all_ids.push(ids);
        senders.push(ws);
    }
    let (frames, end) = read_until_close(&mut bob, WAIT).await;
    assert!(
        frames.iter().all(|f| f["type"] == "msg"),
        "only msgs before the close"
    );
    assert!(
        frames.len() < 8 * 32,
        "the close came before everything was written"
    );
    assert!(matches!(end, Event::Close(Some(4002))), "{end:?}");
    assert_eq!(wait_presence(&node, "bob", 0).await["online"], false);
    // Bob never acked: every send still ends, in failed, none lost.
    for (ws, ids) in senders.iter_mut().zip(&all_ids) {
        let got = outcomes(ws, ids.len()).await;
        all_failed_undelivered(&got, ids);
    }
    let text = metrics_text(&node).await;
    assert!(
        metric(&text, "imgate_slow_consumers_total").unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn presence_drops_to_zero_after_disconnect_and_unacked_msgs_fail() {
    let node = start(fast_config()).await;
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    assert_eq!(wait_presence(&node, "bob", 1).await["online"], true);
    send_msg(&mut alice, "m1", "bob", json!(1)).await;
    expect_msg(&mut bob, "alice", "m1", 1).await;
    bob.close(None).await.unwrap();
    drop(bob);
    let p = wait_presence(&node, "bob", 0).await;
    assert_eq!(
        p,
        json!({"uid": "bob", "online": false, "sessions": 0, "node": "n1"})
    );
    // The un-acked msg is held again, then fails (no session came back).
    let f = next_frame(&mut alice, WAIT).await;
    assert_eq!(f["id"], "m1");
    assert_eq!(f["type"], "failed", "{f}");
    let text = metrics_text(&node).await;
    assert_eq!(metric(&text, "imgate_sessions"), Some(1.0), "{text}");
    node.shutdown().await;
}

#[tokio::test]
async fn unacked_msg_moves_to_a_new_session_after_disconnect() {
    let mut cfg = fast_config();
    cfg.delivery.ack_timeout_ms = 1000;
    cfg.delivery.hold_ms = 1500;
    let node = start(cfg).await;
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    send_msg(&mut alice, "m1", "bob", json!("again")).await;
    expect_msg(&mut bob, "alice", "m1", 1).await;
    drop(bob);
    wait_presence(&node, "bob", 0).await;
    let mut bob2 = connect(&node, "bob").await;
    let m = expect_msg(&mut bob2, "alice", "m1", 1).await;
    assert_eq!(m["body"], "again");
    ack(&mut bob2, 1).await;
    assert_eq!(
        next_frame(&mut alice, WAIT).await,
        json!({"type": "delivered", "id": "m1", "to": "bob"})
    );
    node.shutdown().await;
}

#[tokio::test]
async fn outcome_of_a_gone_sender_is_dropped_quietly() {
    let mut cfg = Config::for_test();
    cfg.delivery.ack_timeout_ms = 1000;
    let node = start(cfg).await;
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    send_msg(&mut alice, "m1", "bob", json!(1)).await;
    expect_msg(&mut bob, "alice", "m1", 1).await;
    drop(alice);
    wait_presence(&node, "alice", 0).await;
    ack(&mut bob, 1).await;
    ping_pong(&mut bob).await;
    // The node keeps serving.
    let mut alice = connect(&node, "alice").await;
    send_msg(&mut alice, "m2", "bob", json!(2)).await;
    expect_msg(&mut bob, "alice", "m2", 2).await;
    ack(&mut bob, 2).await;
    assert_eq!(next_of(&mut alice, "delivered").await["id"], "m2");
    node.shutdown().await;
}

// ----- transient messages (PROTOCOL.md, "Transient messages") ---------------------------------

/// Online: pushed once, `delivered` on the ack; a repeat of the id is a new message (nothing
/// remembered); offline: `failed: offline` at once, and a later session gets nothing.
#[tokio::test]
async fn transient_messages_are_delivered_or_fail_at_once_and_are_not_remembered() {
    let node = start(fast_config()).await;
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    let typing = json!({"type": "send", "id": "t1", "to": "bob", "body": {"typing": true},
                        "transient": true});
    send_json(&mut alice, &typing).await;
    let m = next_frame(&mut bob, WAIT).await;
    assert_eq!((m["id"].as_str(), m["seq"].as_u64()), (Some("t1"), Some(1)));
    ack(&mut bob, 1).await;
    assert_eq!(
        next_frame(&mut alice, WAIT).await,
        json!({"type": "delivered", "id": "t1", "to": "bob"})
    );
    send_json(&mut alice, &typing).await;
    let again = next_frame(&mut bob, WAIT).await;
    assert_eq!(
        again["seq"], 2,
        "a repeated transient id is a new message: {again}"
    );
    ack(&mut bob, 2).await;
    next_of(&mut alice, "delivered").await;

    let to_carol = json!({"type": "send", "id": "t2", "to": "carol", "body": 1,
                          "transient": true});
    send_json(&mut alice, &to_carol).await;
    assert_eq!(
        next_frame(&mut alice, WAIT).await,
        json!({"type": "failed", "id": "t2", "to": "carol", "reason": "offline"})
    );
    let mut carol = connect(&node, "carol").await;
    expect_no_frame(&mut carol, QUIET).await;
    node.shutdown().await;
}

/// No ack: the push is not repeated, and the sender learns `failed: timeout` after one ack
/// timeout (not after the retries a durable message gets).
#[tokio::test]
async fn an_unacked_transient_message_is_not_retried() {
    let node = start(fast_config()).await;
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    let typing = json!({"type": "send", "id": "t1", "to": "bob", "body": 1, "transient": true});
    send_json(&mut alice, &typing).await;
    next_of(&mut bob, "msg").await;
    let failed = next_frame(&mut alice, WAIT).await;
    assert_eq!(failed["reason"], "timeout", "{failed}");
    expect_no_frame(&mut bob, QUIET).await;
    node.shutdown().await;
}

/// `transient` must be a boolean (`null` counts as absent, as for every optional field):
/// anything else fails the send `invalid`, and the session stays.
#[tokio::test]
async fn a_transient_flag_that_is_not_a_boolean_fails_invalid() {
    let node = start(fast_config()).await;
    let mut alice = connect(&node, "alice").await;
    for flag in [json!("yes"), json!(1), json!([true])] {
        let send = json!({"type": "send", "id": "t1", "to": "bob", "body": 1, "transient": flag});
        send_json(&mut alice, &send).await;
        let f = next_frame(&mut alice, WAIT).await;
        assert_eq!(
            (f["type"].as_str(), f["reason"].as_str()),
            (Some("failed"), Some("invalid")),
            "{flag}: {f}"
        );
    }
    ping_pong(&mut alice).await;
    node.shutdown().await;
}
