//! The HTTP side of one node: login, CORS, errors, operations endpoints, the chat page and
//! the backend API (push, presence).

mod common;

use std::time::Duration;

use common::*;
use imgate::config::{AuthMode, Config, UserEntry};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

// ----- login --------------------------------------------------------------------------------

fn check_login_answer(node: &imgate::node::NodeHandle, uid: &str, body: &Value, before: u64) {
    let token = body["token"].as_str().expect("token");
    assert_eq!(body["url"], node.ws_url(), "{body}");
    assert!(node.ws_url().starts_with("ws://127.0.0.1:"));
    assert!(node.ws_url().ends_with("/ws"));
    assert_eq!(body["node"], "n1", "{body}");

    // Verified with the configured secret and HS256 only.
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "nbf", "iat", "sub", "iss", "aud"]);
    validation.set_issuer(&["imgate"]);
    validation.set_audience(&["imgate-local"]);
    let data = jsonwebtoken::decode::<Value>(
        token,
        &DecodingKey::from_secret(SECRET.as_bytes()),
        &validation,
    )
    .expect("token verifies with the dev secret");
    assert_eq!(data.header.alg, Algorithm::HS256);
    let c = data.claims;
    assert_eq!(c["sub"], uid, "{c}");
    assert_eq!(
        (c["iss"].as_str(), c["aud"].as_str()),
        (Some("imgate"), Some("imgate-local")),
        "{c}"
    );
    let iat = c["iat"].as_u64().expect("iat");
    assert!(iat >= before && iat <= now_s(), "iat {iat} not now");
    assert_eq!(c["nbf"], iat, "{c}");
    assert_eq!(c["exp"], iat + 7200, "{c}");
    assert_eq!(body["expires_at"], c["exp"], "{body} vs {c}");
    assert!(c["jti"].as_str().is_some_and(|j| !j.is_empty()), "{c}");
    assert_eq!(c["node"], "n1", "{c}");
    assert_eq!(c["url"], node.ws_url(), "{c}");

    // The same claims read by hand, without the library.
    let (header, raw) = jwt_parts(token);
    assert_eq!(header["alg"], "HS256");
    assert_eq!(raw, c);
}

#[tokio::test]
async fn login_json_answers_token_url_node_expires_at() {
    let node = start(Config::for_test()).await;
    let before = now_s();
    let (status, body) = login_json(&node, &json!({"uid": "alice", "password": "ignored"})).await;
    assert_eq!(status, 200, "{body}");
    check_login_answer(&node, "alice", &body, before);
    // Every token has its own jti.
    let (_, again) = login_json(&node, &json!({"uid": "alice"})).await;
    let (_, c1) = jwt_parts(body["token"].as_str().unwrap());
    let (_, c2) = jwt_parts(again["token"].as_str().unwrap());
    assert_ne!(c1["jti"], c2["jti"]);
    node.shutdown().await;
}

#[tokio::test]
async fn login_form_body() {
    let node = start(Config::for_test()).await;
    let before = now_s();
    let (status, body) = login_raw(
        &node,
        Some("application/x-www-form-urlencoded"),
        "uid=al%20ice&password=x",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    check_login_answer(&node, "al ice", &body, before);
    node.shutdown().await;
}

#[tokio::test]
async fn login_accepts_id_as_alias_of_uid() {
    let node = start(Config::for_test()).await;
    let before = now_s();
    let (status, body) = login_json(&node, &json!({"id": "bob"})).await;
    assert_eq!(status, 200, "{body}");
    check_login_answer(&node, "bob", &body, before);
    let (status, body) =
        login_raw(&node, Some("application/x-www-form-urlencoded"), "id=carol").await;
    assert_eq!(status, 200, "{body}");
    check_login_answer(&node, "carol", &body, before);
    node.shutdown().await;
}

#[tokio::test]
async fn login_token_lifetime_follows_config() {
    let mut cfg = Config::for_test();
    cfg.auth.token_ttl_s = 60;
    let node = start(cfg).await;
    let (status, body) = login_json(&node, &json!({"uid": "alice"})).await;
    assert_eq!(status, 200);
    let (_, c) = jwt_parts(body["token"].as_str().unwrap());
    assert_eq!(c["exp"], c["iat"].as_u64().unwrap() + 60);
    assert_eq!(body["expires_at"], c["exp"]);
    node.shutdown().await;
}

#[tokio::test]
async fn login_uid_length_is_counted_in_bytes() {
    let node = start(Config::for_test()).await;
    let (status, body) = login_json(&node, &json!({"uid": "a".repeat(128)})).await;
    assert_eq!(status, 200, "128 bytes is allowed: {body}");
    let (status, body) = login_json(&node, &json!({"uid": "李".repeat(42)})).await; // 126 bytes
    assert_eq!(status, 200, "{body}");
    let (status, body) = login_json(&node, &json!({"uid": "李".repeat(43)})).await; // 129 bytes
    assert_error(status, &body, 400, "bad_request");
    node.shutdown().await;
}

#[tokio::test]
async fn login_bad_bodies_are_400_bad_request() {
    let node = start(Config::for_test()).await;
    let long = format!(r#"{{"uid":"{}"}}"#, "a".repeat(129));
    let cases: Vec<(&str, String)> = vec![
        ("malformed JSON", r#"{"uid": "alice""#.into()),
        ("not JSON at all", "uid=alice".into()),
        ("empty body", String::new()),
        ("empty JSON array", "[]".into()),
        ("JSON string", r#""alice""#.into()),
        ("JSON number", "42".into()),
        ("JSON null", "null".into()),
        ("missing uid", r#"{"password":"x"}"#.into()),
        ("empty object", "{}".into()),
        ("empty uid", r#"{"uid":""}"#.into()),
        ("129-byte uid", long),
        ("control char in uid", r#"{"uid":"al\u0001ice"}"#.into()),
        ("newline in uid", r#"{"uid":"al\nice"}"#.into()),
        ("DEL in uid", r#"{"uid":"al\u007fice"}"#.into()),
        ("uid as number", r#"{"uid":42}"#.into()),
        ("uid as object", r#"{"uid":{"a":1}}"#.into()),
        ("uid null and no id", r#"{"uid":null}"#.into()),
        (
            "password as number",
            r#"{"uid":"alice","password":5}"#.into(),
        ),
    ];
    for (what, body) in cases {
        let (status, answer) = login_raw(&node, Some("application/json"), body).await;
        assert_eq!(status, 400, "{what}: {answer}");
        assert_error(status, &answer, 400, "bad_request");
    }
    // Not UTF-8.
    let (status, answer) = login_raw(
        &node,
        Some("application/json"),
        vec![b'{', b'"', b'u', 0xff, 0xfe, b'}'],
    )
    .await;
    assert_error(status, &answer, 400, "bad_request");
    // Form bodies.
    for (what, body) in [
        ("form without uid", "password=x"),
        ("form with empty uid", "uid=&password=x"),
        ("form with control char", "uid=a%01b"),
    ] {
        let (status, answer) =
            login_raw(&node, Some("application/x-www-form-urlencoded"), body).await;
        assert_eq!(status, 400, "{what}: {answer}");
        assert_error(status, &answer, 400, "bad_request");
    }
    node.shutdown().await;
}

/// The protocol says every JSON body is an object; a JSON array is a malformed body.
#[tokio::test]
async fn login_json_array_with_values_is_400() {
    let node = start(Config::for_test()).await;
    for body in [r#"["alice"]"#, r#"["alice", null, "pw"]"#] {
        let (status, answer) = login_raw(&node, Some("application/json"), body).await;
        assert_error(status, &answer, 400, "bad_request");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn login_needs_a_known_content_type() {
    let node = start(Config::for_test()).await;
    for ct in [
        None,
        Some("text/plain"),
        Some("multipart/form-data; boundary=x"),
        Some("application/xml"),
    ] {
        let (status, body) = login_raw(&node, ct, r#"{"uid":"alice"}"#).await;
        assert_eq!(status, 415, "content type {ct:?}: {body}");
        assert_error(status, &body, 415, "unsupported_media_type");
    }
    // Parameters and case do not matter.
    let (status, body) = login_raw(
        &node,
        Some("Application/JSON; charset=utf-8"),
        r#"{"uid":"alice"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    node.shutdown().await;
}

#[tokio::test]
async fn login_body_over_16_kib_is_413() {
    let node = start(Config::for_test()).await;
    let frame = |len: usize| {
        let empty = r#"{"uid":"alice","pad":""}"#.len();
        format!(r#"{{"uid":"alice","pad":"{}"}}"#, "x".repeat(len - empty))
    };
    let at_limit = frame(16 * 1024);
    assert_eq!(at_limit.len(), 16384);
    let (status, body) = login_raw(&node, Some("application/json"), at_limit).await;
    assert_eq!(status, 200, "a body of exactly 16 KiB is accepted: {body}");
    let (status, body) = login_raw(&node, Some("application/json"), frame(16 * 1024 + 1)).await;
    assert_error(status, &body, 413, "too_large");
    let (status, body) = login_raw(&node, Some("application/json"), frame(200 * 1024)).await;
    assert_error(status, &body, 413, "too_large");
    // The node still serves.
    let (status, _) = login_json(&node, &json!({"uid": "alice"})).await;
    assert_eq!(status, 200);
    node.shutdown().await;
}

fn users_config(users: &[(&str, String)]) -> Config {
    let mut cfg = Config::for_test();
    cfg.auth.mode = AuthMode::Users;
    cfg.auth.users = users
        .iter()
        .map(|(uid, hash)| UserEntry {
            uid: (*uid).into(),
            password_hash: hash.clone(),
        })
        .collect();
    cfg
}

/// In `users` mode, logins waiting for a password check are bounded: beyond
/// `auth.login_concurrency` + `auth.login_queue` a login is answered 503 `busy` at once instead
/// of waiting behind the others (review weakness 12).
#[tokio::test]
async fn login_users_mode_queue_is_bounded() {
    let hash = imgate::auth::hash_password("pw").expect("hash");
    let mut cfg = users_config(&[("alice", hash)]);
    cfg.auth.login_concurrency = 1;
    cfg.auth.login_queue = 1;
    let node = start(cfg).await;
    // The test holds the only password-check slot, so logins queue deterministically.
    let held = node
        .shared()
        .password_checks
        .acquire()
        .await
        .expect("semaphore open");
    let body = json!({"uid": "alice", "password": "pw"});
    /// Starts a login and returns once `n` logins wait for a password check.
    async fn queue(
        node: &imgate::node::NodeHandle,
        body: &Value,
        n: usize,
    ) -> tokio::task::JoinHandle<(u16, reqwest::header::HeaderMap, Value)> {
        let (url, body) = (node.http_url(), body.clone());
        let login = tokio::spawn(async move {
            let resp = http()
                .post(format!("{url}/login"))
                .json(&body)
                .send()
                .await
                .unwrap();
            json_response(resp).await
        });
        let deadline = tokio::time::Instant::now() + WAIT;
        while node
            .shared()
            .login_waiters
            .load(std::sync::atomic::Ordering::Relaxed)
            < n
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "login {n} never queued"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        login
    }
    // Concurrency 1 + queue 1: two logins wait (the slot they wait for is held here), and a
    // third is refused at once.
    let first = queue(&node, &body, 1).await;
    let second = queue(&node, &body, 2).await;
    let (status, refused) = login_json(&node, &body).await;
    assert_error(status, &refused, 503, "busy");
    let text = metrics_text(&node).await;
    assert_eq!(
        metric(&text, "imgate_logins_busy_total"),
        Some(1.0),
        "{text}"
    );
    drop(held);
    for login in [first, second] {
        let (status, _, v) = login.await.unwrap();
        assert_eq!(status, 200, "{v}");
    }
    // With the queue empty again, logins go through.
    let (status, v) = login_json(&node, &body).await;
    assert_eq!(status, 200, "{v}");
    node.shutdown().await;
}

#[tokio::test]
async fn login_users_mode_accepts_a_hash_password_hash() {
    let hash = imgate::auth::hash_password("s3cret").expect("hash");
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let node = start(users_config(&[("alice", hash)])).await;
    let before = now_s();
    let (status, body) = login_json(&node, &json!({"uid": "alice", "password": "s3cret"})).await;
    assert_eq!(status, 200, "{body}");
    check_login_answer(&node, "alice", &body, before);
    node.shutdown().await;
}

#[tokio::test]
async fn login_users_mode_checks_passwords() {
    let node = start(users_config(&[
        ("alice", cheap_hash("s3cret")),
        ("bob", cheap_hash("b0b")),
    ]))
    .await;

    let before = now_s();
    let (status, body) = login_json(&node, &json!({"uid": "alice", "password": "s3cret"})).await;
    assert_eq!(status, 200, "{body}");
    check_login_answer(&node, "alice", &body, before);
    let (status, body) = login_raw(
        &node,
        Some("application/x-www-form-urlencoded"),
        "id=bob&password=b0b",
    )
    .await;
    assert_eq!(status, 200, "form login with the id alias: {body}");
    assert_eq!(jwt_parts(body["token"].as_str().unwrap()).1["sub"], "bob");

    for (uid, password) in [
        ("alice", "wrong"),
        ("alice", ""),
        ("alice", "S3CRET"),
        ("alice", "b0b"),
        ("bob", "s3cret"),
    ] {
        let (status, body) = login_json(&node, &json!({"uid": uid, "password": password})).await;
        assert_eq!(status, 401, "{uid}/{password}: {body}");
        assert_error(status, &body, 401, "invalid_credentials");
    }
    // No password at all is a bad request, not bad credentials.
    let (status, body) = login_json(&node, &json!({"uid": "alice"})).await;
    assert_error(status, &body, 400, "bad_request");
    let (status, body) = login_raw(
        &node,
        Some("application/x-www-form-urlencoded"),
        "uid=alice",
    )
    .await;
    assert_error(status, &body, 400, "bad_request");
    node.shutdown().await;
}

#[tokio::test]
async fn login_users_mode_unknown_user_is_401() {
    let node = start(users_config(&[("alice", cheap_hash("s3cret"))])).await;
    let (status, body) = login_json(&node, &json!({"uid": "mallory", "password": "s3cret"})).await;
    assert_error(status, &body, 401, "invalid_credentials");
    node.shutdown().await;
}

// ----- CORS and generic answers -------------------------------------------------------------

#[tokio::test]
async fn cors_header_on_normal_and_error_responses() {
    let node = start(Config::for_test()).await;
    let base = node.http_url();
    let c = http();
    let answers = [
        c.get(format!("{base}/health")).send().await.unwrap(),
        c.get(format!("{base}/")).send().await.unwrap(),
        c.get(format!("{base}/metrics")).send().await.unwrap(),
        c.get(format!("{base}/nope")).send().await.unwrap(),
        c.get(format!("{base}/login")).send().await.unwrap(),
        c.post(format!("{base}/login"))
            .body("x")
            .send()
            .await
            .unwrap(),
        c.post(format!("{base}/login"))
            .json(&json!({"uid": "a"}))
            .send()
            .await
            .unwrap(),
        c.post(format!("{base}/login"))
            .json(&json!({"uid": ""}))
            .send()
            .await
            .unwrap(),
        c.get(format!("{base}/api/presence/bob"))
            .send()
            .await
            .unwrap(),
        c.get(format!("{base}/ws")).send().await.unwrap(),
    ];
    for resp in answers {
        let url = resp.url().clone();
        let status = resp.status();
        assert_eq!(
            resp.headers()
                .get("access-control-allow-origin")
                .map(|v| v.to_str().unwrap().to_string()),
            Some("*".to_string()),
            "{url} ({status})"
        );
    }
    node.shutdown().await;
}

#[tokio::test]
async fn cors_origin_is_configurable() {
    let mut cfg = Config::for_test();
    cfg.http.cors_origin = "https://chat.example".into();
    let node = start(cfg).await;
    for path in ["/health", "/nope"] {
        let resp = http()
            .get(format!("{}{path}", node.http_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.headers()["access-control-allow-origin"],
            "https://chat.example"
        );
    }
    node.shutdown().await;
}

#[tokio::test]
async fn options_preflight_answers_204_on_any_path() {
    let node = start(Config::for_test()).await;
    for path in ["/login", "/no/such/path", "/api/push", "/ws", "/"] {
        let resp = http()
            .request(
                reqwest::Method::OPTIONS,
                format!("{}{path}", node.http_url()),
            )
            .header("Origin", "http://elsewhere.example")
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "content-type, authorization",
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 204, "{path}");
        let h = resp.headers();
        assert_eq!(h["access-control-allow-origin"], "*", "{path}");
        assert_eq!(
            h["access-control-allow-methods"], "GET, POST, DELETE, OPTIONS",
            "{path}"
        );
        let allow = h["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .to_ascii_lowercase();
        let allowed: Vec<&str> = allow.split(',').map(str::trim).collect();
        assert!(allowed.contains(&"content-type"), "{path}: {allow}");
        assert!(allowed.contains(&"authorization"), "{path}: {allow}");
        assert!(resp.bytes().await.unwrap().is_empty(), "{path}");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn favicon_is_204_without_body() {
    let node = start(Config::for_test()).await;
    let resp = http()
        .get(format!("{}/favicon.ico", node.http_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    assert!(resp.bytes().await.unwrap().is_empty());
    node.shutdown().await;
}

#[tokio::test]
async fn unknown_path_is_404_json() {
    let node = start(Config::for_test()).await;
    for path in ["/nope", "/api/nope", "/login/extra", "/api/presence/"] {
        let resp = http()
            .get(format!("{}{path}", node.http_url()))
            .send()
            .await
            .unwrap();
        let (status, headers, body) = json_response(resp).await;
        assert_error(status, &body, 404, "not_found");
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{path}"
        );
    }
    node.shutdown().await;
}

#[tokio::test]
async fn wrong_method_is_405_json() {
    let node = start(Config::for_test()).await;
    let c = http();
    let base = node.http_url();
    let answers = [
        c.get(format!("{base}/login")).send().await.unwrap(),
        c.post(format!("{base}/health")).send().await.unwrap(),
        c.get(format!("{base}/api/push"))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap(),
        c.delete(format!("{base}/")).send().await.unwrap(),
        c.put(format!("{base}/metrics")).send().await.unwrap(),
    ];
    for resp in answers {
        let url = resp.url().clone();
        let (status, _, body) = json_response(resp).await;
        assert_eq!(status, 405, "{url}: {body}");
        assert_error(status, &body, 405, "method_not_allowed");
    }
    node.shutdown().await;
}

// ----- operations ---------------------------------------------------------------------------

#[tokio::test]
async fn health_reports_node_and_members() {
    let node = start(Config::for_test()).await;
    let resp = http()
        .get(format!("{}/health", node.http_url()))
        .send()
        .await
        .unwrap();
    let (status, _, body) = json_response(resp).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ok");
    assert_eq!(body["node"], "n1");
    assert_eq!(body["members"], 1);
    assert_eq!(body["reachable"], 1);
    assert_eq!(body["ready"], true, "a node alone is ready");
    node.shutdown().await;
}

#[tokio::test]
async fn cluster_lists_this_node_without_secrets() {
    let mut cfg = Config::for_test();
    cfg.auth.jwt_secret = "very-secret-cluster-key".into();
    cfg.api.keys = vec!["very-secret-api-key".into()];
    let node = start(cfg).await;
    let resp = http()
        .get(format!("{}/cluster", node.http_url()))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(!text.contains("very-secret"), "secrets leak: {text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    let members = body["members"].as_array().expect("members array");
    assert_eq!(members.len(), 1, "{body}");
    assert_eq!(members[0]["id"], "n1");
    assert_eq!(members[0]["live"], true);
    assert_eq!(members[0]["http"], node.http_addr().to_string());
    assert!(body.get("ring_version").is_some(), "{body}");
    node.shutdown().await;
}

#[tokio::test]
async fn metrics_expose_the_documented_names() {
    let node = start(fast_config()).await;
    let text = metrics_text(&node).await;
    for name in [
        "imgate_sessions",
        "imgate_messages_in_total",
        "imgate_delivered_total",
        "imgate_failed_total",
        "imgate_retries_total",
        "imgate_connections_total",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing:\n{text}"
        );
    }
    assert_eq!(metric(&text, "imgate_sessions"), Some(0.0), "{text}");
    assert_eq!(
        metric(&text, "imgate_connections_total"),
        Some(0.0),
        "{text}"
    );

    // The numbers move with traffic.
    let mut alice = connect(&node, "alice").await;
    let mut bob = connect(&node, "bob").await;
    send_msg(&mut alice, "m1", "bob", json!("hi")).await;
    let m = expect_msg(&mut bob, "alice", "m1", 1).await;
    ack(&mut bob, m["seq"].as_u64().unwrap()).await;
    next_of(&mut alice, "delivered").await;
    send_msg(&mut alice, "m2", "nobody", json!("hi")).await;
    let f = next_of(&mut alice, "failed").await;
    assert_eq!(f["reason"], "offline");
    let text = metrics_text(&node).await;
    assert_eq!(metric(&text, "imgate_sessions"), Some(2.0), "{text}");
    assert_eq!(
        metric(&text, "imgate_connections_total"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "imgate_messages_in_total"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(metric(&text, "imgate_delivered_total"), Some(1.0), "{text}");
    assert_eq!(
        metric(&text, r#"imgate_failed_total{reason="offline"}"#),
        Some(1.0),
        "{text}"
    );
    node.shutdown().await;
}

/// Every `src`/`href` value and CSS `url(...)`/`@import` in the page.
fn external_refs(html: &str) -> Vec<String> {
    let lower = html.to_ascii_lowercase();
    let mut found = Vec::new();
    for attr in ["src=", "href=", "url(", "@import"] {
        let mut from = 0;
        while let Some(pos) = lower[from..].find(attr) {
            let start = from + pos + attr.len();
            let value: String = lower[start..]
                .trim_start_matches([' ', '"', '\''])
                .chars()
                .take_while(|c| !matches!(c, '"' | '\'' | ')' | ' ' | '>'))
                .collect();
            if value.starts_with("http:") || value.starts_with("https:") || value.starts_with("//")
            {
                found.push(format!("{attr}{value}"));
            }
            from = start;
        }
    }
    found
}

#[tokio::test]
async fn chat_page_is_self_contained_html() {
    let node = start(Config::for_test()).await;
    let resp = http()
        .get(format!("{}/", node.http_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"),
        "{:?}",
        resp.headers()
    );
    let html = resp.text().await.unwrap();
    assert!(html.to_ascii_lowercase().contains("<html"));
    assert_eq!(
        external_refs(&html),
        Vec::<String>::new(),
        "page loads outside resources"
    );
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "page names an outside URL"
    );
    node.shutdown().await;
}

// ----- backend API --------------------------------------------------------------------------

#[tokio::test]
async fn api_needs_a_valid_key() {
    let node = start(fast_config()).await;
    let base = node.http_url();
    let c = http();
    let push = json!({"to": "bob", "body": "x", "wait_ms": 10});
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer "),
        Some("Basic ZGV2LWFwaS1rZXk="),
        Some("dev-api-key"),
        Some("Bearer dev-api-key-2"),
    ] {
        let mut p = c.post(format!("{base}/api/push")).json(&push);
        let mut q = c.get(format!("{base}/api/presence/bob"));
        if let Some(a) = auth {
            p = p.header("Authorization", a);
            q = q.header("Authorization", a);
        }
        for resp in [p.send().await.unwrap(), q.send().await.unwrap()] {
            let url = resp.url().clone();
            let (status, _, body) = json_response(resp).await;
            assert_eq!(status, 401, "{url} with {auth:?}: {body}");
            assert_error(status, &body, 401, "unauthorized");
        }
    }
    // Key check comes before body checks: no key + bad body is still 401.
    let resp = c
        .post(format!("{base}/api/push"))
        .body("garbage")
        .send()
        .await
        .unwrap();
    let (status, _, body) = json_response(resp).await;
    assert_error(status, &body, 401, "unauthorized");
    // The scheme is case-insensitive.
    let resp = c
        .get(format!("{base}/api/presence/bob"))
        .header("Authorization", "bearer dev-api-key")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    node.shutdown().await;
}

#[tokio::test]
async fn api_key_from_config_replaces_the_default() {
    let mut cfg = Config::for_test();
    cfg.api.keys = vec!["k1".into(), "k2".into()];
    let node = start(cfg).await;
    for (key, want) in [("k1", 200), ("k2", 200), (API_KEY, 401)] {
        let resp = http()
            .get(format!("{}/api/presence/bob", node.http_url()))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), want, "key {key}");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn presence_of_offline_and_online_users() {
    let node = start(Config::for_test()).await;
    let p = presence(&node, "bob").await;
    assert_eq!(
        p,
        json!({"uid": "bob", "online": false, "sessions": 0, "node": "n1"})
    );

    let b1 = connect(&node, "bob").await;
    let p = wait_presence(&node, "bob", 1).await;
    assert_eq!(p["online"], true);
    let b2 = connect(&node, "bob").await;
    let p = wait_presence(&node, "bob", 2).await;
    assert_eq!(
        p,
        json!({"uid": "bob", "online": true, "sessions": 2, "node": "n1"})
    );
    // Another user is not counted.
    assert_eq!(presence(&node, "alice").await["sessions"], 0);

    drop(b1);
    let p = wait_presence(&node, "bob", 1).await;
    assert_eq!(p["online"], true);
    drop(b2);
    let p = wait_presence(&node, "bob", 0).await;
    assert_eq!(p["online"], false);
    node.shutdown().await;
}

async fn user_presence(node: &imgate::node::NodeHandle, token: &str, query: &str) -> (u16, Value) {
    let resp = http()
        .get(format!("{}/presence?{query}", node.http_url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let (status, _, body) = json_response(resp).await;
    (status, body)
}

#[tokio::test]
async fn a_user_asks_which_users_are_online_with_its_own_token() {
    let node = start(Config::for_test()).await;
    let token = token_for(&node, "alice").await;
    let _bob = connect(&node, "bob").await;
    wait_presence(&node, "bob", 1).await;
    // Percent-encoded uids, a repeat counted once, unknown keys ignored.
    let (status, body) = user_presence(&node, &token, "uid=bob&uid=car%20ol&uid=bob&x=1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"presence": {"bob": true, "car ol": false}}));
    // The token also works as `?token=`, like the WebSocket's.
    let resp = http()
        .get(format!(
            "{}/presence?uid=bob&token={token}",
            node.http_url()
        ))
        .send()
        .await
        .unwrap();
    let (status, _, body) = json_response(resp).await;
    assert_eq!((status, &body["presence"]["bob"]), (200, &json!(true)));

    // Only a user's token opens it: none, the backend's key, a forged one.
    for bad in ["", API_KEY, "x.y.z"] {
        let (status, body) = user_presence(&node, bad, "uid=bob").await;
        assert_eq!(status, 401, "{bad:?}: {body}");
    }
    // Bounded and checked.
    let many: Vec<String> = (0..=50).map(|i| format!("uid=u{i}")).collect();
    for query in ["", "x=1", "uid=al%01ice", &many.join("&")] {
        let (status, body) = user_presence(&node, &token, query).await;
        assert_error(status, &body, 400, "bad_request");
    }
    let (status, _) = user_presence(&node, &token, &many[..50].join("&")).await;
    assert_eq!(status, 200);
    node.shutdown().await;

    let mut cfg = Config::for_test();
    cfg.api.user_presence = false;
    let node = start(cfg).await;
    let token = token_for(&node, "alice").await;
    let (status, body) = user_presence(&node, &token, "uid=bob").await;
    assert_error(status, &body, 403, "forbidden");
    node.shutdown().await;
}

#[tokio::test]
async fn presence_with_bad_uid_is_400() {
    let node = start(Config::for_test()).await;
    let long = "a".repeat(129);
    for path in ["al%01ice".to_string(), long] {
        let resp = http()
            .get(format!("{}/api/presence/{path}", node.http_url()))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap();
        let (status, _, body) = json_response(resp).await;
        assert_error(status, &body, 400, "bad_request");
    }
    node.shutdown().await;
}

async fn push(node: &imgate::node::NodeHandle, body: &Value) -> (u16, Value) {
    let resp = http()
        .post(format!("{}/api/push", node.http_url()))
        .bearer_auth(API_KEY)
        .json(body)
        .send()
        .await
        .unwrap();
    let (status, _, body) = json_response(resp).await;
    (status, body)
}

#[tokio::test]
async fn push_to_online_user_that_acks_is_delivered() {
    let node = start(fast_config()).await;
    let mut bob = connect(&node, "bob").await;
    let before = now_ms();
    let req = json!({"to": "bob", "body": {"text": "hello"}, "id": "sys-1"});
    let request = push(&node, &req);
    let client = async {
        let m = expect_msg(&mut bob, "$system", "sys-1", 1).await;
        assert_eq!(m["body"], json!({"text": "hello"}));
        let ts = m["ts"].as_u64().expect("ts");
        assert!(ts >= before && ts <= now_ms(), "ts {ts}");
        ack(&mut bob, 1).await;
    };
    let ((status, answer), ()) = tokio::join!(request, client);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "delivered", "{answer}");

    // The same id again is a duplicate: delivered at once, nothing new at bob.
    let (status, answer) = push(&node, &json!({"to": "bob", "body": "again", "id": "sys-1"})).await;
    assert_eq!(status, 200);
    assert_eq!(answer["status"], "delivered", "{answer}");
    expect_no_frame(&mut bob, QUIET).await;

    // Without an id the node makes one.
    let req = json!({"to": "bob", "body": [1, 2]});
    let request = push(&node, &req);
    let client = async {
        let m = next_of(&mut bob, "msg").await;
        assert_eq!(m["from"], "$system");
        assert_eq!(m["seq"], 2);
        assert_eq!(m["body"], json!([1, 2]));
        assert!(m["id"].as_str().is_some_and(|id| !id.is_empty()), "{m}");
        ack(&mut bob, 2).await;
    };
    let ((status, answer), ()) = tokio::join!(request, client);
    assert_eq!(status, 200);
    assert_eq!(answer["status"], "delivered", "{answer}");
    node.shutdown().await;
}

#[tokio::test]
async fn push_to_online_user_that_never_acks_fails_timeout() {
    let node = start(fast_config()).await;
    let mut bob = connect(&node, "bob").await;
    let req = json!({"to": "bob", "body": 1, "id": "p"});
    let request = push(&node, &req);
    let client = async {
        // First push plus two retries, all with seq 1.
        for _ in 0..3 {
            expect_msg(&mut bob, "$system", "p", 1).await;
        }
    };
    let ((status, answer), ()) = tokio::join!(request, client);
    assert_eq!(status, 200);
    assert_eq!(answer["status"], "failed", "{answer}");
    assert_eq!(answer["reason"], "timeout", "{answer}");
    node.shutdown().await;
}

#[tokio::test]
async fn push_to_offline_user_fails_offline_after_hold() {
    let node = start(fast_config()).await;
    let started = tokio::time::Instant::now();
    let (status, answer) = push(&node, &json!({"to": "nobody", "body": "x"})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "failed", "{answer}");
    assert_eq!(answer["reason"], "offline", "{answer}");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "answered before hold_ms: {:?}",
        started.elapsed()
    );
    node.shutdown().await;
}

#[tokio::test]
async fn push_body_too_large_is_413() {
    let mut cfg = fast_config();
    cfg.limits.max_body_bytes = 64;
    let node = start(cfg).await;
    let _bob = connect(&node, "bob").await;
    // 65 encoded bytes.
    let (status, answer) = push(&node, &json!({"to": "bob", "body": "x".repeat(63)})).await;
    assert_error(status, &answer, 413, "too_large");
    // A request body over max_body + 16 KiB.
    let (status, answer) = push(&node, &json!({"to": "bob", "pad": "x".repeat(17 * 1024)})).await;
    assert_error(status, &answer, 413, "too_large");
    node.shutdown().await;
}

#[tokio::test]
async fn push_bad_requests_are_400_or_415() {
    let node = start(fast_config()).await;
    for body in [
        json!({"body": "x"}),
        json!({"to": "", "body": "x"}),
        json!({"to": 5, "body": "x"}),
        json!({"to": null, "body": "x"}),
        json!({"to": "a".repeat(129), "body": "x"}),
        json!({"to": "b\u{0}b", "body": "x"}),
        json!({"to": "bob", "id": 7}),
        json!({"to": "bob", "id": ""}),
        json!({"to": "bob", "id": "i".repeat(65)}),
        json!({"to": "bob", "wait_ms": -1}),
        json!(["bob"]),
        json!("bob"),
    ] {
        let (status, answer) = push(&node, &body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_error(status, &answer, 400, "bad_request");
    }
    let resp = http()
        .post(format!("{}/api/push", node.http_url()))
        .bearer_auth(API_KEY)
        .header("Content-Type", "application/json")
        .body(r#"{"to": "bob""#)
        .send()
        .await
        .unwrap();
    let (status, _, answer) = json_response(resp).await;
    assert_error(status, &answer, 400, "bad_request");
    for ct in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut req = http()
            .post(format!("{}/api/push", node.http_url()))
            .bearer_auth(API_KEY)
            .body(r#"{"to":"bob"}"#);
        if let Some(ct) = ct {
            req = req.header("Content-Type", ct);
        }
        let (status, _, answer) = json_response(req.send().await.unwrap()).await;
        assert_error(status, &answer, 415, "unsupported_media_type");
    }
    node.shutdown().await;
}

/// `start` returns a node that serves: its own /health counts itself (the protocol: members
/// "itself included") and a login at a one-node cluster is taken by that node.
#[tokio::test]
async fn a_started_node_counts_itself_and_serves_at_once() {
    for _ in 0..5 {
        let node = imgate::node::start(Config::for_test(), "n1")
            .await
            .expect("start");
        let resp = http()
            .get(format!("{}/health", node.http_url()))
            .send()
            .await
            .unwrap();
        let (status, _, health) = json_response(resp).await;
        assert_eq!(status, 200);
        assert_eq!(
            health,
            json!({"status": "ok", "node": "n1", "members": 1, "reachable": 1, "ready": true})
        );
        let (status, body) = login_json(&node, &json!({"uid": "alice"})).await;
        assert_eq!(status, 200, "{body}");
        node.shutdown().await;
    }
}

/// The protocol: every JSON body is an object.
#[tokio::test]
async fn push_json_array_body_is_400() {
    let node = start(fast_config()).await;
    let (status, answer) = push(&node, &json!(["bob", "hi", null, 10])).await;
    assert_error(status, &answer, 400, "bad_request");
    node.shutdown().await;
}

/// A node advertised on a network refuses the shipped secrets, naming each; with real ones it
/// starts. (It still binds loopback here: only the advertised name is a network address.)
#[tokio::test]
async fn a_node_on_a_network_refuses_shipped_secrets() {
    let mut cfg = Config::for_test();
    cfg.nodes[0].advertise = Some("chat.example.com:443".into());
    let err = imgate::node::start(cfg.clone(), "n1").await.unwrap_err();
    let text = err.to_string();
    for key in ["cluster.secret", "auth.jwt_secret", "api.keys[0]"] {
        assert!(text.contains(&format!("`{key}`")), "{text}");
    }
    cfg.cluster.secret = imgate::auth::gen_secret();
    cfg.auth.jwt_secret = imgate::auth::gen_secret();
    cfg.api.keys = vec![imgate::auth::gen_secret()];
    let node = imgate::node::start(cfg, "n1")
        .await
        .expect("real secrets start");
    assert_eq!(node.ws_url(), "ws://chat.example.com:443/ws");
    node.shutdown().await;
}

/// `/api/push` with `"transient": true` to a user without a session fails `offline` at once
/// (not after the hold); a `transient` that is not a boolean is 400.
#[tokio::test]
async fn transient_push_fails_offline_at_once_and_the_flag_must_be_a_boolean() {
    let mut cfg = fast_config();
    cfg.delivery.hold_ms = 60_000;
    let node = start(cfg).await;
    let (status, body) = push(&node, &json!({"to": "bob", "body": 1, "transient": true})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["status"].as_str(), body["reason"].as_str()),
        (Some("failed"), Some("offline"))
    );
    let (status, body) = push(&node, &json!({"to": "bob", "body": 1, "transient": "yes"})).await;
    assert_error(status, &body, 400, "bad_request");
    node.shutdown().await;
}
