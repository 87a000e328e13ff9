//! Hostile inputs from section 1 of the security review (`SECURITY-REVIEW.md`) that the node
//! already handles as expected: duplicate keys, deep nesting, odd numbers, NUL and escape
//! characters, chunked bodies, forged token headers, binary and control frames.
//!
//! Each test names the review row it covers. Every wait is a bounded read; nothing sleeps.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use imgate::node::NodeHandle;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

// ----- helpers -------------------------------------------------------------------------------

/// POST /login with a raw JSON text.
async fn login_text(node: &NodeHandle, text: impl Into<String>) -> (u16, Value) {
    login_raw(node, Some("application/json"), text.into()).await
}

/// POST /api/push with the API key and a raw JSON text.
async fn push_text(node: &NodeHandle, text: impl Into<String>) -> (u16, Value) {
    let resp = http()
        .post(format!("{}/api/push", node.http_url()))
        .bearer_auth(API_KEY)
        .header("Content-Type", "application/json")
        .body(text.into())
        .send()
        .await
        .expect("push request");
    let (status, _, body) = json_response(resp).await;
    (status, body)
}

/// POST /api/push with the API key and a JSON value.
async fn push(node: &NodeHandle, body: &Value) -> (u16, Value) {
    push_text(node, body.to_string()).await
}

/// Writes `request` as is on a new TCP connection and reads one response.
async fn raw_http(node: &NodeHandle, request: &[u8]) -> (u16, Value) {
    let mut tcp = TcpStream::connect(node.http_addr())
        .await
        .expect("TCP connect");
    tcp.write_all(request).await.expect("write request");
    let deadline = Instant::now() + WAIT;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(resp) = parse_response(&buf, false) {
            return resp;
        }
        match tokio::time::timeout_at(deadline, tcp.read(&mut chunk)).await {
            Err(_) => panic!(
                "no complete response within {WAIT:?}: {:?}",
                String::from_utf8_lossy(&buf)
            ),
            // The node may reset a connection whose body it did not read to the end; what
            // it sent before that has arrived.
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    parse_response(&buf, true).unwrap_or_else(|| {
        panic!(
            "connection ended before a complete response: {:?}",
            String::from_utf8_lossy(&buf)
        )
    })
}

/// A chunked `POST /login` of `body`, cut into chunks of at most 1000 bytes.
fn chunked_login(body: &str) -> Vec<u8> {
    let mut req = b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        .to_vec();
    for chunk in body.as_bytes().chunks(1000) {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    req
}

/// A JWT with `header` and `claims` as given, signed by hand with HMAC-SHA256 and `secret`
/// (whatever `alg` the header names).
fn hmac_sha256_token(header: &Value, claims: &Value, secret: &str) -> String {
    use hmac::{Hmac, Mac};
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let mut mac =
        Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(input.as_bytes());
    let signature = mac.finalize().into_bytes();
    format!("{input}.{}", b64url(&signature))
}

/// Claims as the node issues them for `uid`, valid for the next 10 minutes.
fn fresh_claims(uid: &str) -> Value {
    let now = now_s();
    claims(uid, now, now, now + 600)
}

/// The upgrade with `token` is refused with 401 `invalid_token`.
async fn assert_invalid_token(node: &NodeHandle, token: &str, what: &str) {
    let url = format!("{}?token={token}", node.ws_url());
    let (status, body) = refused_upgrade(url.as_str()).await;
    let body = body.unwrap_or_else(|| panic!("{what}: refusal {status} without a JSON body"));
    assert_eq!(status, 401, "{what}: {body}");
    assert_error(status, &body, 401, "invalid_token");
}

/// The hand signer is right: its HS256 token opens a session (so the refusals below are about
/// the one flaw each forged token has, not about the signing).
async fn assert_hand_signed_hs256_is_accepted(node: &NodeHandle) {
    let token = hmac_sha256_token(
        &json!({"alg": "HS256", "typ": "JWT"}),
        &fresh_claims("alice"),
        SECRET,
    );
    let mut ws = connect_token(node, &token).await;
    let w = next_of(&mut ws, "welcome").await;
    assert_eq!(w["uid"], "alice", "{w}");
}

/// The head of a `msg` frame, read without building a `Value` of its body (which may be
/// nested deeper than `serde_json::Value` accepts).
#[derive(Deserialize)]
struct RawMsg {
    #[serde(rename = "type")]
    ty: String,
    seq: u64,
    from: String,
    id: String,
    body: Box<RawValue>,
}

/// The next text frame as raw text, control frames aside.
async fn next_text(ws: &mut Ws) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let item = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no text frame within {WAIT:?}"));
        match item {
            Some(Ok(Message::Text(t))) => return t.to_string(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

// ----- /login --------------------------------------------------------------------------------

// review row 5
#[tokio::test]
async fn login_with_a_duplicate_key_is_400() {
    let node = start(fast_config()).await;
    for text in [
        r#"{"uid":"a","uid":"b"}"#,
        r#"{"uid":"alice","uid":"alice"}"#,
        r#"{"uid":"alice","password":"x","password":"y"}"#,
    ] {
        let (status, body) = login_text(&node, text).await;
        assert_eq!(status, 400, "{text}: {body}");
        assert_error(status, &body, 400, "bad_request");
    }
    node.shutdown().await;
}

// review row 6
#[tokio::test]
async fn login_skips_an_8000_deep_array_in_an_unknown_field() {
    let node = start(fast_config()).await;
    let deep = format!("{}{}", "[".repeat(8000), "]".repeat(8000));
    let text = format!(r#"{{"uid":"alice","x":{deep}}}"#);
    assert!(text.len() <= 16 * 1024, "under the login body limit");
    let (status, body) = login_text(&node, text).await;
    assert_eq!(status, 200, "{body}");
    let (_, c) = jwt_parts(body["token"].as_str().expect("token"));
    assert_eq!(c["sub"], "alice", "{c}");
    // The node is still there.
    let mut ws = connect(&node, "alice").await;
    ping_pong(&mut ws).await;
    node.shutdown().await;
}

// review row 7
#[tokio::test]
async fn login_with_a_5000_deep_array_as_uid_is_400() {
    let node = start(fast_config()).await;
    let text = format!(r#"{{"uid":{}{}}}"#, "[".repeat(5000), "]".repeat(5000));
    let (status, body) = login_text(&node, text).await;
    assert_error(status, &body, 400, "bad_request");
    // The node is still there.
    let (status, body) = login_json(&node, &json!({"uid": "alice"})).await;
    assert_eq!(status, 200, "{body}");
    node.shutdown().await;
}

// review row 14
#[tokio::test]
async fn login_form_with_a_repeated_uid_is_400() {
    let node = start(fast_config()).await;
    for form in ["uid=a&uid=b", "uid=a&uid=a"] {
        let (status, body) =
            login_raw(&node, Some("application/x-www-form-urlencoded"), form).await;
        assert_eq!(status, 400, "{form}: {body}");
        assert_error(status, &body, 400, "bad_request");
    }
    node.shutdown().await;
}

// review row 16
#[tokio::test]
async fn chunked_login_body_over_the_limit_without_content_length_is_413() {
    let node = start(fast_config()).await;
    // The same framing under the limit is a normal login.
    let (status, body) = raw_http(&node, &chunked_login(r#"{"uid":"alice"}"#)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["token"].is_string(), "{body}");

    let prefix = r#"{"uid":"alice","pad":""#;
    let suffix = r#""}"#;
    let big = format!(
        "{prefix}{}{suffix}",
        "x".repeat(20_000 - prefix.len() - suffix.len())
    );
    assert_eq!(big.len(), 20_000);
    let (status, body) = raw_http(&node, &chunked_login(&big)).await;
    assert_error(status, &body, 413, "too_large");
    node.shutdown().await;
}

// ----- /api ----------------------------------------------------------------------------------

// review row 29
#[tokio::test]
async fn push_wait_ms_that_is_not_a_u64_is_400() {
    let node = start(fast_config()).await;
    let mut bob = connect(&node, "bob").await;
    for wait in ["1e3", "1000.0", "18446744073709551616"] {
        let text = format!(r#"{{"to":"bob","body":1,"wait_ms":{wait}}}"#);
        let (status, body) = push_text(&node, &text).await;
        assert_eq!(status, 400, "{text}: {body}");
        assert_error(status, &body, 400, "bad_request");
    }
    // Nothing was pushed.
    expect_no_frame(&mut bob, QUIET).await;
    node.shutdown().await;
}

// review row 31
#[tokio::test]
async fn push_id_with_nul_is_accepted_and_echoed() {
    let node = start(fast_config()).await;
    let mut bob = connect(&node, "bob").await;
    let id = "a\u{0}b";
    let req = json!({"to": "bob", "id": id, "body": {"t": "hi"}});
    let request = push(&node, &req);
    let client = async {
        let m = expect_msg(&mut bob, "$system", id, 1).await;
        assert_eq!(m["body"], json!({"t": "hi"}));
        ack(&mut bob, 1).await;
    };
    let ((status, answer), ()) = tokio::join!(request, client);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"status": "delivered", "id": id}));
    node.shutdown().await;
}

// review row 32
#[tokio::test]
async fn push_body_nested_30000_levels_is_relayed_byte_for_byte() {
    let node = start(fast_config()).await;
    let mut bob = connect(&node, "bob").await;
    let deep = format!("{}{}", "[".repeat(30_000), "]".repeat(30_000));
    assert!(deep.len() <= 65_536, "within max_body_bytes");
    let text = format!(r#"{{"to":"bob","id":"deep","body":{deep}}}"#);
    let request = push_text(&node, text);
    let client = async {
        let raw = next_text(&mut bob).await;
        let m: RawMsg = serde_json::from_str(&raw).expect("a msg frame");
        assert_eq!(
            (m.ty.as_str(), m.from.as_str(), m.id.as_str(), m.seq),
            ("msg", "$system", "deep", 1)
        );
        assert!(m.body.get() == deep, "the body is relayed as sent");
        ack(&mut bob, 1).await;
    };
    let ((status, answer), ()) = tokio::join!(request, client);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"status": "delivered", "id": "deep"}));
    node.shutdown().await;
}

// review row 33
#[tokio::test]
async fn push_with_a_duplicate_to_key_is_400() {
    let node = start(fast_config()).await;
    let mut bob = connect(&node, "bob").await;
    let mut carol = connect(&node, "carol").await;
    for text in [
        r#"{"to":"bob","to":"carol","body":1}"#,
        r#"{"to":"bob","to":"bob","body":1}"#,
    ] {
        let (status, body) = push_text(&node, text).await;
        assert_eq!(status, 400, "{text}: {body}");
        assert_error(status, &body, 400, "bad_request");
    }
    expect_no_frame(&mut bob, QUIET).await;
    expect_no_frame(&mut carol, QUIET).await;
    node.shutdown().await;
}

// review row 35
#[tokio::test]
async fn presence_with_nul_or_invalid_utf8_in_the_uid_is_400() {
    let node = start(fast_config()).await;
    for path in ["al%00ice", "%00", "al%FFice", "%FF", "%C3%28"] {
        let resp = http()
            .get(format!("{}/api/presence/{path}", node.http_url()))
            .bearer_auth(API_KEY)
            .send()
            .await
            .expect("presence request");
        let (status, _, body) = json_response(resp).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_error(status, &body, 400, "bad_request");
    }
    node.shutdown().await;
}

// ----- /ws upgrade ---------------------------------------------------------------------------

// review row 39
#[tokio::test]
async fn rs256_header_with_an_hmac_signature_is_401() {
    let node = start(fast_config()).await;
    assert_hand_signed_hs256_is_accepted(&node).await;
    let token = hmac_sha256_token(
        &json!({"alg": "RS256", "typ": "JWT"}),
        &fresh_claims("alice"),
        SECRET,
    );
    assert_invalid_token(&node, &token, "RS256 header, HMAC-SHA256 signature").await;
    node.shutdown().await;
}

// review row 40
#[tokio::test]
async fn lowercase_alg_missing_alg_or_missing_jti_is_401() {
    let node = start(fast_config()).await;
    assert_hand_signed_hs256_is_accepted(&node).await;
    let claims = fresh_claims("alice");
    let lowercase = hmac_sha256_token(&json!({"alg": "hs256", "typ": "JWT"}), &claims, SECRET);
    assert_invalid_token(&node, &lowercase, "alg hs256").await;
    let no_alg = hmac_sha256_token(&json!({"typ": "JWT"}), &claims, SECRET);
    assert_invalid_token(&node, &no_alg, "no alg").await;
    let mut no_jti = claims.clone();
    no_jti.as_object_mut().expect("claims object").remove("jti");
    let no_jti = hmac_sha256_token(&json!({"alg": "HS256", "typ": "JWT"}), &no_jti, SECRET);
    assert_invalid_token(&node, &no_jti, "no jti").await;
    node.shutdown().await;
}

// review row 45
#[tokio::test]
async fn node_and_url_claims_naming_another_node_are_accepted() {
    let node = start(fast_config()).await;
    for (other_node, url) in [
        ("n2", "ws://127.0.0.1:9/ws"),
        ("evil", "ws://evil.example/ws"),
    ] {
        let mut c = fresh_claims("alice");
        c["node"] = json!(other_node);
        c["url"] = json!(url);
        let token = forge(&c, Algorithm::HS256, SECRET);
        let mut ws = connect_token(&node, &token).await;
        let w = next_of(&mut ws, "welcome").await;
        assert_eq!(w["uid"], "alice", "{w}");
        assert_eq!(w["node"], "n1", "{w}");
        ping_pong(&mut ws).await;
    }
    node.shutdown().await;
}

// ----- /ws frames ----------------------------------------------------------------------------

// review row 49-50
#[tokio::test]
async fn frame_with_a_duplicate_type_is_bad_frame_and_session_stays_open() {
    let node = start(fast_config()).await;
    let mut ws = connect(&node, "alice").await;
    for text in [
        r#"{"type":"ping","type":"send"}"#,
        r#"{"type":"send","type":"ping"}"#,
        r#"{"type":"ping","type":"ping"}"#,
    ] {
        send_text(&mut ws, text).await;
        let e = next_of(&mut ws, "error").await;
        assert_eq!(e["code"], "bad_frame", "{text}: {e}");
        assert!(e["message"].is_string(), "{e}");
        ping_pong(&mut ws).await;
    }
    node.shutdown().await;
}

// review row 51: duplicates of fields the node does not read are ignored like any unknown
// field (docs/PROTOCOL.md, "Frames"); duplicates of fields it reads are bad frames.
#[tokio::test]
async fn duplicate_unknown_fields_are_ignored_and_duplicate_known_fields_refused() {
    let node = start(fast_config()).await;
    let mut ws = connect(&node, "alice").await;
    send_text(&mut ws, r#"{"type":"ping","x":1,"x":2}"#).await;
    assert_eq!(next_frame(&mut ws, WAIT).await["type"], "pong");
    for text in [
        r#"{"type":"ack","seq":1,"seq":2}"#,
        r#"{"type":"send","id":"a","id":"b","to":"bob"}"#,
        r#"{"type":"send","id":"a","to":"bob","to":"carol"}"#,
        r#"{"type":"send","id":"a","to":"bob","body":1,"body":2}"#,
        r#"{"type":"refresh","token":"a","token":"b"}"#,
    ] {
        send_text(&mut ws, text).await;
        let e = next_of(&mut ws, "error").await;
        assert_eq!(e["code"], "bad_frame", "{text}: {e}");
    }
    ping_pong(&mut ws).await;
    node.shutdown().await;
}

// review row 53
#[tokio::test]
async fn ack_seq_that_is_not_a_plain_u64_is_bad_frame() {
    let node = start(fast_config()).await;
    let mut ws = connect(&node, "alice").await;
    for seq in ["18446744073709551616", "1.0", "1e0", "-0"] {
        let text = format!(r#"{{"type":"ack","seq":{seq}}}"#);
        send_text(&mut ws, &text).await;
        let e = next_of(&mut ws, "error").await;
        assert_eq!(e["code"], "bad_frame", "{text}: {e}");
        ping_pong(&mut ws).await;
    }
    node.shutdown().await;
}

// review row 55
#[tokio::test]
async fn unknown_type_with_nul_and_escape_is_cut_and_session_stays_open() {
    let node = start(fast_config()).await;
    let mut ws = connect(&node, "alice").await;
    let ty: String = format!("evil\u{0}\u{1b}[2J\u{1b}]0;x\u{7}{}", "z".repeat(200))
        .chars()
        .take(200)
        .collect();
    assert_eq!(ty.chars().count(), 200);
    send_json(&mut ws, &json!({"type": ty})).await;
    // `next_of` parses the frame: the NUL and ESC arrive JSON-escaped.
    let e = next_of(&mut ws, "error").await;
    assert_eq!(e["code"], "unknown_type", "{e}");
    let message = e["message"].as_str().expect("message");
    assert!(
        message.chars().count() <= 100,
        "{} chars: {message:?}",
        message.chars().count()
    );
    assert!(message.contains("evil"), "the type is named: {message:?}");
    ping_pong(&mut ws).await;
    node.shutdown().await;
}

// review row 58
#[tokio::test]
async fn send_id_with_nul_is_delivered_and_acked_with_that_id() {
    let node = start(fast_config()).await;
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    let id = "a\u{0}b";
    send_msg(&mut alice, id, "bob", json!({"t": "hi"})).await;
    let m = expect_msg(&mut bob, "alice", id, 1).await;
    assert_eq!(m["body"], json!({"t": "hi"}));
    ack(&mut bob, 1).await;
    let d = next_of(&mut alice, "delivered").await;
    assert_eq!(d, json!({"type": "delivered", "id": id, "to": "bob"}));
    node.shutdown().await;
}

// review row 62
#[tokio::test]
async fn binary_frames_are_bad_frame_and_session_stays_open() {
    let node = start(fast_config()).await;
    let mut ws = connect(&node, "alice").await;
    for bytes in [
        br#"{"type":"ping"}"#.to_vec(),
        Vec::new(),
        vec![0xff, 0xfe, 0x00],
    ] {
        ws.send(Message::binary(bytes.clone()))
            .await
            .expect("write binary frame");
        // Not a pong: a binary ping is not read as a ping.
        let e = next_of(&mut ws, "error").await;
        assert_eq!(e["code"], "bad_frame", "{bytes:?}: {e}");
        ping_pong(&mut ws).await;
    }
    node.shutdown().await;
}

// review row 65
#[tokio::test]
async fn hundred_control_pings_unread_are_answered_and_session_stays_usable() {
    let node = start(fast_config()).await;
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    for i in 0u32..100 {
        alice
            .send(Message::Ping(i.to_be_bytes().to_vec().into()))
            .await
            .expect("write ping");
    }
    send_json(&mut alice, &json!({"type": "ping"})).await;
    // The node handles frames in order: every pong it sends for the control pings comes
    // before the JSON pong.
    let deadline = Instant::now() + WAIT;
    let mut pongs = Vec::new();
    loop {
        let item = tokio::time::timeout_at(deadline, alice.next())
            .await
            .expect("no JSON pong in time");
        match item {
            Some(Ok(Message::Pong(p))) => {
                let i = u32::from_be_bytes(p.as_ref().try_into().expect("a 4-byte payload"));
                pongs.push(i);
            }
            Some(Ok(Message::Ping(_))) => {}
            Some(Ok(Message::Text(t))) => {
                assert_eq!(t.as_str(), r#"{"type":"pong"}"#);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        !pongs.is_empty() && pongs.len() <= 100,
        "{} pongs",
        pongs.len()
    );
    assert!(pongs.windows(2).all(|w| w[0] < w[1]), "in order: {pongs:?}");
    assert_eq!(pongs.last(), Some(&99), "the last ping is answered");
    // Still usable: a message goes through and is acked.
    send_msg(&mut alice, "after", "bob", json!(1)).await;
    expect_msg(&mut bob, "alice", "after", 1).await;
    ack(&mut bob, 1).await;
    let d = next_of(&mut alice, "delivered").await;
    assert_eq!(d["id"], "after", "{d}");
    assert_eq!(presence(&node, "alice").await["sessions"], 1);
    node.shutdown().await;
}
