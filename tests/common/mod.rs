//! Helpers shared by the integration tests: start a node in-process on `127.0.0.1:0`, log
//! in over HTTP, open WebSocket sessions, read frames with a deadline, forge tokens.
//!
//! Nothing here sleeps to wait for an event: every wait is a read bounded by
//! `tokio::time::timeout` that fails the test when the deadline passes.

#![allow(dead_code)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use imgate::config::Config;
use imgate::node::NodeHandle;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A client WebSocket.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a frame or response that must come may take.
pub const WAIT: Duration = Duration::from_secs(2);
/// A short window over which silence is asserted.
pub const QUIET: Duration = Duration::from_millis(250);
/// The default JWT secret of `Config::for_test`.
pub const SECRET: &str = "dev-only-change-me";
/// The default API key of `Config::for_test`.
pub const API_KEY: &str = "dev-api-key";

/// `Config::for_test` with small delivery timings: ack 150 ms, 2 retries, hold 300 ms.
pub fn fast_config() -> Config {
    let mut cfg = Config::for_test();
    cfg.delivery.ack_timeout_ms = 150;
    cfg.delivery.max_retries = 2;
    cfg.delivery.hold_ms = 300;
    cfg
}

/// Starts node `n1` of `cfg` and waits until its membership view holds itself (until then a
/// fresh node answers logins with 503 `no_nodes`; see `a_started_node_counts_itself_and_serves_at_once`).
pub async fn start(cfg: Config) -> NodeHandle {
    let node = imgate::node::start(cfg, "n1").await.expect("node starts");
    let mut view = node.shared().view.clone();
    tokio::time::timeout(WAIT, view.wait_for(|v| v.members.contains_key("n1")))
        .await
        .expect("the node did not see itself as a member in time")
        .expect("membership view closed");
    node
}

/// An HTTP client that ignores any proxy settings of the environment.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("reqwest client")
}

/// Status, headers and JSON body of a response (panics if the body is not JSON).
pub async fn json_response(resp: reqwest::Response) -> (u16, reqwest::header::HeaderMap, Value) {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("response body");
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text:?}"));
    (status, headers, body)
}

/// Asserts a JSON error response: exact status, `error` code and a string `message`.
pub fn assert_error(status: u16, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "body: {body}");
    assert_eq!(body["error"], want_code, "body: {body}");
    assert!(body["message"].is_string(), "error without message: {body}");
}

/// POST /login with a JSON body; returns status and JSON answer.
pub async fn login_json(node: &NodeHandle, body: &Value) -> (u16, Value) {
    let resp = http()
        .post(format!("{}/login", node.http_url()))
        .json(body)
        .send()
        .await
        .expect("login request");
    let (status, _, body) = json_response(resp).await;
    (status, body)
}

/// POST /login with raw bytes and a content type (or none).
pub async fn login_raw(
    node: &NodeHandle,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let mut req = http().post(format!("{}/login", node.http_url()));
    if let Some(ct) = content_type {
        req = req.header("Content-Type", ct);
    }
    let resp = req.body(body).send().await.expect("login request");
    let (status, _, body) = json_response(resp).await;
    (status, body)
}

/// Logs `uid` in (open mode) and returns its token.
pub async fn token_for(node: &NodeHandle, uid: &str) -> String {
    let (status, body) = login_json(node, &json!({ "uid": uid })).await;
    assert_eq!(status, 200, "login of {uid}: {body}");
    body["token"]
        .as_str()
        .expect("token is a string")
        .to_string()
}

/// Opens a WebSocket with `token` in the query, without reading anything.
pub async fn connect_token(node: &NodeHandle, token: &str) -> Ws {
    let url = format!("{}?token={token}", node.ws_url());
    let (ws, resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("WebSocket connect timed out")
        .expect("WebSocket upgrade accepted");
    assert_eq!(resp.status().as_u16(), 101);
    ws
}

/// Logs `uid` in, connects, and checks the `welcome` frame; returns the socket and the welcome.
pub async fn connect_welcome(node: &NodeHandle, uid: &str) -> (Ws, Value) {
    let token = token_for(node, uid).await;
    let mut ws = connect_token(node, &token).await;
    let welcome = next_frame(&mut ws, WAIT).await;
    assert_eq!(welcome["type"], "welcome", "first frame: {welcome}");
    assert_eq!(welcome["uid"], uid, "{welcome}");
    assert_eq!(welcome["node"], "n1", "{welcome}");
    assert!(
        welcome["session"].as_str().is_some_and(|s| !s.is_empty()),
        "{welcome}"
    );
    (ws, welcome)
}

/// Logs `uid` in and connects; the `welcome` frame is checked and consumed.
pub async fn connect(node: &NodeHandle, uid: &str) -> Ws {
    connect_welcome(node, uid).await.0
}

/// What a client socket yields next, control frames aside.
#[derive(Debug)]
pub enum Event {
    /// A text frame, parsed as JSON.
    Frame(Value),
    /// A binary frame.
    Binary(Vec<u8>),
    /// A Close frame with its code, if it had one.
    Close(Option<u16>),
    /// The stream ended or failed without a Close frame.
    Gone(String),
}

/// The next event, or `None` if nothing but control frames came within `within`.
pub async fn next_event(ws: &mut Ws, within: Duration) -> Option<Event> {
    let deadline = Instant::now() + within;
    loop {
        let item = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return None,
            Ok(item) => item,
        };
        return Some(match item {
            None => Event::Gone("stream ended".into()),
            Some(Err(e)) => Event::Gone(e.to_string()),
            Some(Ok(Message::Text(t))) => {
                Event::Frame(serde_json::from_str(t.as_str()).unwrap_or_else(|e| {
                    panic!("node sent a text frame that is not JSON ({e}): {t}")
                }))
            }
            Some(Ok(Message::Binary(b))) => Event::Binary(b.to_vec()),
            Some(Ok(Message::Close(frame))) => Event::Close(frame.map(|f| u16::from(f.code))),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
        });
    }
}

/// The next JSON frame; fails the test on timeout, close or a non-text frame.
pub async fn next_frame(ws: &mut Ws, within: Duration) -> Value {
    match next_event(ws, within).await {
        Some(Event::Frame(v)) => v,
        None => panic!("no frame within {within:?}"),
        Some(other) => panic!("expected a frame, got {other:?}"),
    }
}

/// The next frame, which must be of `ty`.
pub async fn next_of(ws: &mut Ws, ty: &str) -> Value {
    let f = next_frame(ws, WAIT).await;
    assert_eq!(f["type"], ty, "expected a `{ty}` frame, got {f}");
    f
}

/// Asserts that no frame (and no close) arrives within `within`.
pub async fn expect_no_frame(ws: &mut Ws, within: Duration) {
    if let Some(ev) = next_event(ws, within).await {
        panic!("expected silence for {within:?}, got {ev:?}");
    }
}

/// Reads until the socket closes; returns the frames seen before and the close event.
/// Fails the test if it does not close within `within`.
pub async fn read_until_close(ws: &mut Ws, within: Duration) -> (Vec<Value>, Event) {
    let deadline = Instant::now() + within;
    let mut frames = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_event(ws, left).await {
            None => panic!("socket still open after {within:?}; frames seen: {frames:?}"),
            Some(Event::Frame(v)) => frames.push(v),
            Some(Event::Binary(b)) => panic!("unexpected binary frame {b:?}"),
            Some(ev) => return (frames, ev),
        }
    }
}

/// Sends a text frame.
pub async fn send_text(ws: &mut Ws, text: impl Into<String>) {
    ws.send(Message::text(text.into()))
        .await
        .expect("write to WebSocket");
}

/// Sends a JSON frame.
pub async fn send_json(ws: &mut Ws, v: &Value) {
    send_text(ws, v.to_string()).await;
}

/// Sends `{"type":"send","id","to","body"}`.
pub async fn send_msg(ws: &mut Ws, id: &str, to: &str, body: Value) {
    send_json(
        ws,
        &json!({"type": "send", "id": id, "to": to, "body": body}),
    )
    .await;
}

/// Sends `{"type":"ack","seq"}`.
pub async fn ack(ws: &mut Ws, seq: u64) {
    send_json(ws, &json!({"type": "ack", "seq": seq})).await;
}

/// Sends `ping` and expects `pong` as the next frame. Because a session handles its frames in
/// order, the pong also proves every frame sent before it was handed to the engine.
pub async fn ping_pong(ws: &mut Ws) {
    send_json(ws, &json!({"type": "ping"})).await;
    let f = next_frame(ws, WAIT).await;
    assert_eq!(f, json!({"type": "pong"}));
}

/// Reads a `msg` frame and checks its sender, id and seq.
pub async fn expect_msg(ws: &mut Ws, from: &str, id: &str, seq: u64) -> Value {
    let f = next_of(ws, "msg").await;
    assert_eq!(f["from"], from, "{f}");
    assert_eq!(f["id"], id, "{f}");
    assert_eq!(f["seq"], seq, "{f}");
    f
}

/// GET /api/presence/{uid} with the API key.
pub async fn presence(node: &NodeHandle, uid: &str) -> Value {
    let resp = http()
        .get(format!("{}/api/presence/{uid}", node.http_url()))
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("presence request");
    let (status, _, body) = json_response(resp).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Polls presence (each poll is a full HTTP round trip; no sleeping) until `uid` has
/// `sessions` sessions; fails after `WAIT`.
pub async fn wait_presence(node: &NodeHandle, uid: &str, sessions: u64) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let p = presence(node, uid).await;
        if p["sessions"] == sessions {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "presence of {uid} still {p} after {WAIT:?}, wanted {sessions} sessions"
        );
        tokio::task::yield_now().await;
    }
}

/// GET /metrics as text.
pub async fn metrics_text(node: &NodeHandle) -> String {
    let resp = http()
        .get(format!("{}/metrics", node.http_url()))
        .send()
        .await
        .expect("metrics request");
    assert_eq!(resp.status().as_u16(), 200);
    resp.text().await.expect("metrics body")
}

/// The value of the sample named exactly `name` (labels included, e.g. `x_total{reason="a"}`).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let value = rest.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// Seconds since the unix epoch.
pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Milliseconds since the unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Claims as the node issues them, with chosen times (`iss` and `aud` as `Config::for_test`
/// expects them: `imgate` and `imgate-local`).
pub fn claims(uid: &str, iat: u64, nbf: u64, exp: u64) -> Value {
    json!({
        "sub": uid, "iat": iat, "nbf": nbf, "exp": exp, "iss": "imgate", "aud": "imgate-local",
        "jti": "0123456789abcdef0123456789abcdef", "node": "n1", "url": "ws://127.0.0.1:1/ws",
    })
}

/// A token signed with `alg` and `secret`.
pub fn forge(claims: &Value, alg: Algorithm, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode token")
}

/// An unsigned token with header `{"alg":"none","typ":"JWT"}` and an empty signature.
pub fn alg_none_token(claims: &Value) -> String {
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let body = b64url(claims.to_string().as_bytes());
    format!("{header}.{body}.")
}

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// base64url without padding.
pub fn b64url(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(B64URL[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Decodes base64url without padding.
pub fn b64url_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = B64URL
            .iter()
            .position(|&x| x == c)
            .unwrap_or_else(|| panic!("not base64url: {c}")) as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// The header and claims of a JWT, read without checking the signature.
pub fn jwt_parts(token: &str) -> (Value, Value) {
    let mut parts = token.split('.');
    let header = parts.next().expect("header part");
    let claims = parts.next().expect("claims part");
    assert!(parts.next().is_some(), "signature part");
    (
        serde_json::from_slice(&b64url_decode(header)).expect("header JSON"),
        serde_json::from_slice(&b64url_decode(claims)).expect("claims JSON"),
    )
}

/// Tries a WebSocket upgrade that must be refused; returns the status and the JSON body.
pub async fn refused_upgrade(req: impl IntoClientRequest + Unpin) -> (u16, Option<Value>) {
    let res = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("upgrade answer timed out");
    match res {
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .filter(|b| !b.is_empty())
                .map(|b| serde_json::from_slice(b).expect("refusal body is JSON"));
            (resp.status().as_u16(), body)
        }
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected the upgrade to be refused, but it was accepted"),
    }
}

/// Reads the raw bytes the node sends until it closes the TCP connection and splits them
/// into WebSocket frames `(opcode, payload)`.
///
/// For a socket whose client side was not polled for a while: on its next read tungstenite
/// first writes the pongs it owes, which fails with a broken pipe once the node has closed,
/// before the Close frame is shown. Reading below tungstenite avoids that.
pub async fn raw_frames_until_eof(ws: &mut Ws, within: Duration) -> Vec<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let MaybeTlsStream::Plain(tcp) = ws.get_mut() else {
        panic!("tests use plain TCP");
    };
    let mut bytes = Vec::new();
    tokio::time::timeout(within, tcp.read_to_end(&mut bytes))
        .await
        .expect("the node did not close the TCP connection in time")
        .expect("read from TCP");
    let mut frames = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        assert!(i + 2 <= bytes.len(), "truncated frame header");
        let opcode = bytes[i] & 0x0f;
        assert_eq!(bytes[i + 1] & 0x80, 0, "a node never masks its frames");
        let (len, header) = match bytes[i + 1] & 0x7f {
            126 => (u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize, 4),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&bytes[i + 2..i + 10]);
                (u64::from_be_bytes(b) as usize, 10)
            }
            n => (n as usize, 2),
        };
        let start = i + header;
        assert!(start + len <= bytes.len(), "truncated frame payload");
        frames.push((opcode, bytes[start..start + len].to_vec()));
        i = start + len;
    }
    frames
}

/// A complete HTTP/1.1 response in `buf`: status and JSON body. With a `Content-Length` it is
/// complete once that many body bytes are in; without one, only at the end of the stream.
pub fn parse_response(buf: &[u8], eof: bool) -> Option<(u16, Value)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).expect("response head is text");
    let body = &buf[end + 4..];
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let length = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim().eq_ignore_ascii_case("content-length").then(|| {
            value
                .trim()
                .parse::<usize>()
                .expect("numeric Content-Length")
        })
    });
    let body = match length {
        Some(n) if body.len() >= n => &body[..n],
        None if eof => body,
        _ => return None,
    };
    let json = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "status {status}: body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(body)
        )
    });
    Some((status, json))
}

/// An argon2id PHC string with tiny parameters: verification reads the parameters from the
/// string, so it checks the same logic as a default-cost hash in a fraction of the time
/// (default-cost argon2 takes most of a second in a debug build).
pub fn cheap_hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let params = argon2::Params::new(64, 1, 1, None).expect("argon2 params");
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::from_b64("c2FsdHNhbHRzYWx0").expect("salt");
    argon
        .hash_password(password.as_bytes(), &salt)
        .expect("hash")
        .to_string()
}
