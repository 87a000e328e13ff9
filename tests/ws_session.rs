//! One WebSocket session: token checks at the upgrade, the `welcome`, frame errors, size
//! limits, keepalive and idle timeout, replaced sessions and shutdown.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use imgate::config::Config;
use imgate::node::NodeHandle;
use jsonwebtoken::Algorithm;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

// ----- upgrade and token ---------------------------------------------------------------------

#[tokio::test]
async fn token_in_query_gives_welcome() {
    let node = start(Config::for_test()).await;
    let token = token_for(&node, "alice").await;
    let mut ws = connect_token(&node, &token).await;
    let w = next_frame(&mut ws, WAIT).await;
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(w["uid"], "alice");
    assert_eq!(w["node"], "n1");
    assert!(w["session"].as_str().is_some_and(|s| !s.is_empty()), "{w}");
    ping_pong(&mut ws).await;
    node.shutdown().await;
}

#[tokio::test]
async fn token_in_bearer_header_gives_welcome() {
    let node = start(Config::for_test()).await;
    let token = token_for(&node, "alice").await;
    let mut req = node.ws_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    assert_eq!(resp.status().as_u16(), 101);
    let w = next_frame(&mut ws, WAIT).await;
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(w["uid"], "alice");
    assert_eq!(w["node"], "n1");
    assert!(w["session"].as_str().is_some_and(|s| !s.is_empty()), "{w}");
    node.shutdown().await;
}

#[tokio::test]
async fn each_session_gets_its_own_session_id() {
    let node = start(Config::for_test()).await;
    let (_a1, w1) = connect_welcome(&node, "alice").await;
    let (_a2, w2) = connect_welcome(&node, "alice").await;
    let (_b, w3) = connect_welcome(&node, "bob").await;
    assert_ne!(w1["session"], w2["session"]);
    assert_ne!(w1["session"], w3["session"]);
    assert_ne!(w2["session"], w3["session"]);
    node.shutdown().await;
}

/// Checks that `token` (or no token) is refused with 401 and `code`, both through a real
/// WebSocket handshake and through a plain GET, and that no session was created.
async fn assert_refused(node: &NodeHandle, token: Option<&str>, code: &str) {
    let url = match token {
        Some(t) => format!("{}?token={t}", node.ws_url()),
        None => node.ws_url().to_string(),
    };
    let (status, body) = refused_upgrade(url.as_str()).await;
    assert_eq!(status, 401, "{code}: {body:?}");
    let body = body.expect("a JSON body with the refusal");
    assert_error(status, &body, 401, code);

    // The same through the header.
    if let Some(t) = token {
        let mut req = node.ws_url().into_client_request().unwrap();
        req.headers_mut()
            .insert("Authorization", format!("Bearer {t}").parse().unwrap());
        let (status, body) = refused_upgrade(req).await;
        assert_eq!(status, 401, "{code} (header): {body:?}");
        if let Some(body) = body {
            assert_error(status, &body, 401, code);
        }
    }

    // A plain GET: the JSON body and the CORS header are there.
    let resp = http()
        .get(url.replacen("ws://", "http://", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    let (status, _, body) = json_response(resp).await;
    assert_error(status, &body, 401, code);

    let text = metrics_text(node).await;
    assert_eq!(metric(&text, "imgate_sessions"), Some(0.0), "{text}");
    assert_eq!(
        metric(&text, "imgate_connections_total"),
        Some(0.0),
        "{text}"
    );
}

#[tokio::test]
async fn upgrade_without_token_is_401() {
    let node = start(Config::for_test()).await;
    assert_refused(&node, None, "missing_token").await;
    // An empty token is no token.
    assert_refused(&node, Some(""), "missing_token").await;
    node.shutdown().await;
}

#[tokio::test]
async fn upgrade_with_garbage_token_is_401() {
    let node = start(Config::for_test()).await;
    assert_refused(&node, Some("garbage"), "invalid_token").await;
    assert_refused(&node, Some("a.b.c"), "invalid_token").await;
    node.shutdown().await;
}

#[tokio::test]
async fn upgrade_with_expired_token_is_401() {
    let node = start(Config::for_test()).await;
    let now = now_s();
    // Expired 100 s ago: beyond the 30 s leeway.
    let t = forge(
        &claims("alice", now - 7300, now - 7300, now - 100),
        Algorithm::HS256,
        SECRET,
    );
    assert_refused(&node, Some(&t), "token_expired").await;
    node.shutdown().await;
}

#[tokio::test]
async fn upgrade_with_token_not_yet_valid_is_401() {
    let node = start(Config::for_test()).await;
    let now = now_s();
    let t = forge(
        &claims("alice", now, now + 120, now + 7200),
        Algorithm::HS256,
        SECRET,
    );
    assert_refused(&node, Some(&t), "token_not_yet_valid").await;
    node.shutdown().await;
}

#[tokio::test]
async fn tokens_within_the_leeway_are_accepted() {
    let node = start(Config::for_test()).await;
    let now = now_s();
    for (nbf, exp) in [(now + 10, now + 7200), (now - 7200, now - 10)] {
        let t = forge(&claims("alice", now, nbf, exp), Algorithm::HS256, SECRET);
        let mut ws = connect_token(&node, &t).await;
        let w = next_of(&mut ws, "welcome").await;
        assert_eq!(w["uid"], "alice");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn upgrade_with_token_of_another_key_is_401() {
    let node = start(Config::for_test()).await;
    let now = now_s();
    let t = forge(
        &claims("alice", now, now, now + 600),
        Algorithm::HS256,
        "another-secret",
    );
    assert_refused(&node, Some(&t), "invalid_token").await;
    node.shutdown().await;
}

#[tokio::test]
async fn upgrade_with_alg_none_token_is_401() {
    let node = start(Config::for_test()).await;
    let now = now_s();
    let t = alg_none_token(&claims("alice", now, now, now + 600));
    assert_refused(&node, Some(&t), "invalid_token").await;
    node.shutdown().await;
}

#[tokio::test]
async fn upgrade_with_hs384_token_is_401() {
    let node = start(Config::for_test()).await;
    let now = now_s();
    let t = forge(
        &claims("alice", now, now, now + 600),
        Algorithm::HS384,
        SECRET,
    );
    assert_refused(&node, Some(&t), "invalid_token").await;
    let t = forge(
        &claims("alice", now, now, now + 600),
        Algorithm::HS512,
        SECRET,
    );
    assert_refused(&node, Some(&t), "invalid_token").await;
    node.shutdown().await;
}

#[tokio::test]
async fn upgrade_with_token_missing_claims_or_bad_sub_is_401() {
    let node = start(Config::for_test()).await;
    let now = now_s();
    let no_exp = json!({"sub": "alice", "iat": now, "nbf": now});
    assert_refused(
        &node,
        Some(&forge(&no_exp, Algorithm::HS256, SECRET)),
        "invalid_token",
    )
    .await;
    let no_sub = json!({"iat": now, "nbf": now, "exp": now + 600});
    assert_refused(
        &node,
        Some(&forge(&no_sub, Algorithm::HS256, SECRET)),
        "invalid_token",
    )
    .await;
    let empty_sub = claims("", now, now, now + 600);
    assert_refused(
        &node,
        Some(&forge(&empty_sub, Algorithm::HS256, SECRET)),
        "invalid_token",
    )
    .await;
    node.shutdown().await;
}

#[tokio::test]
async fn tokens_from_another_secret_config_are_refused_and_own_accepted() {
    let mut cfg = Config::for_test();
    cfg.auth.jwt_secret = "cluster-b".into();
    let node = start(cfg).await;
    let now = now_s();
    let dev = forge(
        &claims("alice", now, now, now + 600),
        Algorithm::HS256,
        SECRET,
    );
    assert_refused(&node, Some(&dev), "invalid_token").await;
    let own = forge(
        &claims("alice", now, now, now + 600),
        Algorithm::HS256,
        "cluster-b",
    );
    let mut ws = connect_token(&node, &own).await;
    next_of(&mut ws, "welcome").await;
    node.shutdown().await;
}

// ----- frames --------------------------------------------------------------------------------

#[tokio::test]
async fn ping_is_answered_by_pong_and_unknown_fields_are_ignored() {
    let node = start(Config::for_test()).await;
    let mut ws = connect(&node, "alice").await;
    ping_pong(&mut ws).await;
    send_json(
        &mut ws,
        &json!({"type": "ping", "extra": {"x": [1, 2]}, "id": 5}),
    )
    .await;
    assert_eq!(next_frame(&mut ws, WAIT).await, json!({"type": "pong"}));
    node.shutdown().await;
}

#[tokio::test]
async fn non_json_text_is_bad_frame_and_session_stays_open() {
    let node = start(Config::for_test()).await;
    let mut ws = connect(&node, "alice").await;
    for text in [
        "hello",
        "",
        "{",
        "42",
        "null",
        r#""ping""#,
        r#"{"type":5}"#,
        r#"{"no":"type"}"#,
    ] {
        send_text(&mut ws, text).await;
        let e = next_of(&mut ws, "error").await;
        assert_eq!(e["code"], "bad_frame", "{text:?}: {e}");
        assert!(e["message"].is_string(), "{e}");
        ping_pong(&mut ws).await;
    }
    node.shutdown().await;
}

/// The protocol: every frame is a JSON object with a `type`.
#[tokio::test]
async fn json_array_frame_is_bad_frame() {
    let node = start(fast_config()).await;
    let mut ws = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    for text in [
        r#"["ping"]"#,
        r#"["ping",null,null,null,null]"#,
        r#"["send","m1","bob",1,null]"#,
    ] {
        send_text(&mut ws, text).await;
        let e = next_frame(&mut ws, WAIT).await;
        assert_eq!(e["type"], "error", "{text}: {e}");
        assert_eq!(e["code"], "bad_frame", "{text}: {e}");
    }
    expect_no_frame(&mut bob, QUIET).await;
    node.shutdown().await;
}

#[tokio::test]
async fn unknown_type_is_error_unknown_type() {
    let node = start(Config::for_test()).await;
    let mut ws = connect(&node, "alice").await;
    send_json(&mut ws, &json!({"type": "fly", "id": "m1"})).await;
    let e = next_of(&mut ws, "error").await;
    assert_eq!(e["code"], "unknown_type", "{e}");
    ping_pong(&mut ws).await;
    node.shutdown().await;
}

#[tokio::test]
async fn send_without_usable_id_is_bad_frame() {
    let node = start(Config::for_test()).await;
    let mut ws = connect(&node, "alice").await;
    for frame in [
        json!({"type": "send", "to": "bob", "body": 1}),
        json!({"type": "send", "id": "", "to": "bob"}),
        json!({"type": "send", "id": 7, "to": "bob"}),
        json!({"type": "send", "id": null, "to": "bob"}),
        json!({"type": "send", "id": "x".repeat(65), "to": "bob"}),
    ] {
        send_json(&mut ws, &frame).await;
        let e = next_frame(&mut ws, WAIT).await;
        assert_eq!(e["type"], "error", "{frame}: {e}");
        assert_eq!(e["code"], "bad_frame", "{frame}: {e}");
    }
    // 64 bytes is a usable id (answered by an outcome, not an error).
    let id64 = "y".repeat(64);
    send_json(&mut ws, &json!({"type": "send", "id": id64, "to": ""})).await;
    let f = next_of(&mut ws, "failed").await;
    assert_eq!(f["id"], id64);
    ping_pong(&mut ws).await;
    node.shutdown().await;
}

#[tokio::test]
async fn send_with_bad_to_fails_invalid_with_the_id() {
    let node = start(Config::for_test()).await;
    let mut ws = connect(&node, "alice").await;
    let cases = [
        (
            "m1",
            json!({"type": "send", "id": "m1", "to": "", "body": 1}),
        ),
        ("m2", json!({"type": "send", "id": "m2", "body": 1})),
        (
            "m3",
            json!({"type": "send", "id": "m3", "to": 5, "body": 1}),
        ),
        (
            "m4",
            json!({"type": "send", "id": "m4", "to": "a".repeat(129), "body": 1}),
        ),
        (
            "m5",
            json!({"type": "send", "id": "m5", "to": "b\u{7}ob", "body": 1}),
        ),
        (
            "m6",
            json!({"type": "send", "id": "m6", "to": null, "body": 1}),
        ),
    ];
    for (id, frame) in cases {
        send_json(&mut ws, &frame).await;
        let f = next_frame(&mut ws, WAIT).await;
        assert_eq!(f["type"], "failed", "{frame}: {f}");
        assert_eq!(f["id"], id, "{f}");
        assert_eq!(f["reason"], "invalid", "{f}");
    }
    // The string recipients are echoed back as sent.
    send_json(
        &mut ws,
        &json!({"type": "send", "id": "m7", "to": "", "body": 1}),
    )
    .await;
    let f = next_of(&mut ws, "failed").await;
    assert_eq!(f["to"], "");
    ping_pong(&mut ws).await;
    node.shutdown().await;
}

fn small_limits() -> Config {
    let mut cfg = fast_config();
    cfg.limits.max_body_bytes = 64;
    cfg.limits.max_frame_bytes = 1024;
    cfg
}

#[tokio::test]
async fn body_over_max_body_fails_too_large() {
    let node = start(small_limits()).await;
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    // "x" * 63 encodes to 65 bytes.
    send_msg(&mut alice, "big", "bob", json!("x".repeat(63))).await;
    let f = next_of(&mut alice, "failed").await;
    assert_eq!(
        f,
        json!({"type": "failed", "id": "big", "to": "bob", "reason": "too_large"})
    );
    // Exactly 64 bytes passes.
    send_msg(&mut alice, "fits", "bob", json!("x".repeat(62))).await;
    let m = expect_msg(&mut bob, "alice", "fits", 1).await;
    assert_eq!(m["body"], json!("x".repeat(62)));
    ack(&mut bob, 1).await;
    let d = next_of(&mut alice, "delivered").await;
    assert_eq!(d["id"], "fits");
    node.shutdown().await;
}

#[tokio::test]
async fn frame_over_max_frame_is_refused_and_session_stays_open() {
    let node = start(small_limits()).await;
    let mut ws = connect(&node, "alice").await;
    // 1500 bytes: over 1024, under 4 x 1024.
    let text = json!({"type": "ping", "pad": "p".repeat(1500)}).to_string();
    assert!(text.len() > 1024 && text.len() < 4096);
    send_text(&mut ws, text).await;
    let e = next_of(&mut ws, "error").await;
    assert_eq!(e["code"], "too_large", "{e}");
    // A send whose frame is too big but carries a usable id ends in `failed: too_large`
    // (delivery rule 1: every send with a usable id gets an outcome).
    let text = json!({"type": "send", "id": "m", "to": "bob", "pad": "p".repeat(1500)}).to_string();
    send_text(&mut ws, text).await;
    let f = next_of(&mut ws, "failed").await;
    assert_eq!(
        (&f["id"], &f["to"], &f["reason"]),
        (&json!("m"), &json!("bob"), &json!("too_large")),
        "{f}"
    );
    ping_pong(&mut ws).await;
    node.shutdown().await;
}

#[tokio::test]
async fn frame_over_four_times_max_frame_closes_with_1009() {
    let node = start(small_limits()).await;
    let mut ws = connect(&node, "alice").await;
    let text = json!({"type": "ping", "pad": "p".repeat(5000)}).to_string();
    assert!(text.len() > 4096);
    // The write may fail if the node has already closed; what matters is the close below.
    let _ = ws.send(Message::text(text)).await;
    let (frames, end) = read_until_close(&mut ws, WAIT).await;
    assert!(frames.is_empty(), "{frames:?}");
    assert!(matches!(end, Event::Close(Some(1009))), "{end:?}");
    // The node survives.
    let mut again = connect(&node, "alice").await;
    ping_pong(&mut again).await;
    wait_presence(&node, "alice", 1).await;
    node.shutdown().await;
}

#[tokio::test]
async fn binary_frame_is_bad_frame() {
    let node = start(Config::for_test()).await;
    let mut ws = connect(&node, "alice").await;
    ws.send(Message::binary(br#"{"type":"ping"}"#.to_vec()))
        .await
        .unwrap();
    let e = next_of(&mut ws, "error").await;
    assert_eq!(e["code"], "bad_frame", "{e}");
    ping_pong(&mut ws).await;
    node.shutdown().await;
}

#[tokio::test]
async fn ack_without_integer_seq_is_bad_frame() {
    let node = start(Config::for_test()).await;
    let mut ws = connect(&node, "alice").await;
    for frame in [
        json!({"type": "ack"}),
        json!({"type": "ack", "seq": "1"}),
        json!({"type": "ack", "seq": -1}),
        json!({"type": "ack", "seq": 1.5}),
    ] {
        send_json(&mut ws, &frame).await;
        let e = next_of(&mut ws, "error").await;
        assert_eq!(e["code"], "bad_frame", "{frame}: {e}");
    }
    ping_pong(&mut ws).await;
    node.shutdown().await;
}

// ----- keepalive -----------------------------------------------------------------------------

fn idle_config() -> Config {
    let mut cfg = Config::for_test();
    cfg.websocket.ping_interval_ms = 100;
    cfg.websocket.idle_timeout_ms = 300;
    cfg
}

#[tokio::test]
async fn a_client_that_keeps_reading_answers_pings_and_stays_connected() {
    let node = start(idle_config()).await;
    let mut ws = connect(&node, "alice").await;
    // Reading makes tungstenite answer the node's pings with pongs; nothing else is sent.
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(700);
    while let Ok(item) =
        tokio::time::timeout_at(until, futures_util::StreamExt::next(&mut ws)).await
    {
        match item {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(pings >= 3, "the node pings every 100 ms, saw {pings}");
    ping_pong(&mut ws).await;
    assert_eq!(presence(&node, "alice").await["sessions"], 1);
    node.shutdown().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_as_idle() {
    let node = start(idle_config()).await;
    let mut ws = connect(&node, "alice").await;
    wait_presence(&node, "alice", 1).await;
    // Not polling the socket means no pongs go out; the node must drop the session after
    // idle_timeout_ms. Presence is polled meanwhile (no sleeping).
    wait_presence(&node, "alice", 0).await;
    // What reached the client: only pings, then a Close with 4000, then the end of TCP.
    let frames = raw_frames_until_eof(&mut ws, WAIT).await;
    let (last, before) = frames.split_last().expect("at least a Close frame");
    assert!(
        before.iter().all(|(op, _)| *op == 0x9),
        "only pings before the close: {frames:?}"
    );
    assert!(!before.is_empty(), "the node pinged before giving up");
    assert_eq!(last.0, 0x8, "last frame is a Close: {frames:?}");
    assert_eq!(
        u16::from_be_bytes([last.1[0], last.1[1]]),
        4000,
        "{frames:?}"
    );
    node.shutdown().await;
}

// ----- sessions per user and shutdown --------------------------------------------------------

#[tokio::test]
async fn oldest_session_is_replaced_beyond_max_sessions_per_user() {
    let mut cfg = Config::for_test();
    cfg.limits.max_sessions_per_user = 2;
    let node = start(cfg).await;
    let mut s1 = connect(&node, "alice").await;
    let mut s2 = connect(&node, "alice").await;
    let mut s3 = connect(&node, "alice").await;
    let (_, end) = read_until_close(&mut s1, WAIT).await;
    assert!(matches!(end, Event::Close(Some(4003))), "{end:?}");
    ping_pong(&mut s2).await;
    ping_pong(&mut s3).await;
    wait_presence(&node, "alice", 2).await;
    node.shutdown().await;
}

#[tokio::test]
async fn too_many_sessions_on_a_node_is_503() {
    let mut cfg = Config::for_test();
    cfg.limits.max_sessions = 1;
    let node = start(cfg).await;
    let _a = connect(&node, "alice").await;
    let token = token_for(&node, "bob").await;
    let (status, body) = refused_upgrade(format!("{}?token={token}", node.ws_url()).as_str()).await;
    assert_eq!(status, 503, "{body:?}");
    if let Some(body) = body {
        assert_eq!(body["error"], "too_many_sessions");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_sessions_with_1001() {
    let node = start(Config::for_test()).await;
    let mut ws = connect(&node, "alice").await;
    let url = node.http_url();
    let stopping = node.shutdown();
    let reading = read_until_close(&mut ws, WAIT);
    let ((), (_, end)) = tokio::join!(stopping, reading);
    assert!(matches!(end, Event::Close(Some(1001))), "{end:?}");
    // The port no longer answers.
    assert!(http().get(format!("{url}/health")).send().await.is_err());
}
