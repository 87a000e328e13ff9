//! Token lifetime, refresh, kicks and uid look-alikes, end to end on in-process nodes.
//!
//! A session lives only while its token is valid (4004 at `exp` + leeway, unless a `refresh`
//! brought a newer token of the same uid); the SDK refreshes by itself; `POST /api/kick`
//! closes a user's sessions (4005) and revokes every token issued up to it on every node,
//! including a node that takes the user over after its owner died and a node that joins
//! later; uids and token claims that imitate the system sender or another cluster are refused.
//!
//! Nothing sleeps to wait for an event: every wait is a bounded read or a bounded poll. Token
//! times are whole unix seconds, so some tests first wait for the start of the next second
//! (polling the clock) to know where in its second each token was issued.

mod cluster_support;
mod common;

use std::time::Duration;

use cluster_support::{Cluster, first_uid, wait_until};
use common::{
    API_KEY, SECRET, Ws, cheap_hash, claims, connect_token, expect_no_frame, forge, http,
    json_response, jwt_parts, login_json, metric, metrics_text, next_frame, next_of, now_ms, now_s,
    ping_pong, refused_upgrade, send_json,
};
use futures_util::StreamExt;
use imgate::config::{AuthMode, Config, UserEntry};
use imgate::node::NodeHandle;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Bound of any poll for something gossip or a ring change brings.
const SPREAD: Duration = Duration::from_secs(8);

/// Tokens that live 2 s, with no leeway.
fn short_tokens(cfg: &mut Config) {
    cfg.auth.token_ttl_s = 2;
    cfg.auth.leeway_s = 0;
}

/// A single node `n1` with 2 s tokens and no leeway.
async fn short_token_node() -> NodeHandle {
    let mut cfg = Config::for_test();
    short_tokens(&mut cfg);
    common::start(cfg).await
}

/// Polls the clock until the unix second is past `t` (at most ~3 s).
async fn wait_past_second(t: u64) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while now_s() <= t {
        assert!(Instant::now() < deadline, "the clock did not pass {t}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Polls the clock until a new unix second starts.
async fn start_of_a_second() {
    wait_past_second(now_s()).await;
}

/// Milliseconds from now until unix time `at_ms` (zero if past).
fn until_ms(at_ms: u64) -> Duration {
    Duration::from_millis(at_ms.saturating_sub(now_ms()))
}

/// POST /login; returns the token and its `expires_at`.
async fn login_token(node: &NodeHandle, uid: &str) -> (String, u64) {
    let (status, body) = login_json(node, &json!({ "uid": uid })).await;
    assert_eq!(status, 200, "login of {uid:?}: {body}");
    (
        body["token"].as_str().unwrap().to_string(),
        body["expires_at"].as_u64().unwrap(),
    )
}

/// The `iat` claim of a token.
fn iat_of(token: &str) -> u64 {
    jwt_parts(token).1["iat"].as_u64().unwrap()
}

/// Connects with `token` at `node` and reads the welcome.
async fn open(node: &NodeHandle, token: &str) -> Ws {
    let mut ws = connect_token(node, token).await;
    next_of(&mut ws, "welcome").await;
    ws
}

/// The upgrade at `node` with `token` is refused; returns the status and the error code.
async fn refusal(node: &NodeHandle, token: &str) -> (u16, String) {
    let url = format!("{}?token={token}", node.ws_url());
    let (status, body) = refused_upgrade(url.as_str()).await;
    let code = body
        .as_ref()
        .and_then(|b| b["error"].as_str())
        .unwrap_or_default()
        .to_string();
    (status, code)
}

/// Reads until the node closes the socket (within `within`): the close code and reason.
/// Fails on any text frame before the close.
async fn close_of(ws: &mut Ws, within: Duration) -> (Option<u16>, String) {
    let deadline = Instant::now() + within;
    loop {
        let item = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("socket still open after {within:?}"));
        match item {
            Some(Ok(Message::Close(f))) => {
                return match f {
                    Some(f) => (Some(u16::from(f.code)), f.reason.to_string()),
                    None => (None, String::new()),
                };
            }
            Some(Ok(Message::Text(t))) => panic!("frame before the close: {t}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("socket failed before a close frame: {e}"),
            None => panic!("socket ended without a close frame"),
        }
    }
}

/// Sends `{"type":"refresh","token"}` and returns the answer.
async fn refresh(ws: &mut Ws, token: &str) -> Value {
    send_json(ws, &json!({"type": "refresh", "token": token})).await;
    next_frame(ws, common::WAIT).await
}

/// The answer is `error` `invalid_token`.
fn assert_invalid_token(answer: &Value, what: &str) {
    assert_eq!(answer["type"], "error", "{what}: {answer}");
    assert_eq!(answer["code"], "invalid_token", "{what}: {answer}");
    assert!(answer["message"].is_string(), "{what}: {answer}");
}

/// `POST /api/kick {"uid"}` at `node` with the API key.
async fn kick(node: &NodeHandle, uid: &str) -> (u16, Value) {
    let resp = http()
        .post(format!("{}/api/kick", node.http_url()))
        .bearer_auth(API_KEY)
        .json(&json!({ "uid": uid }))
        .send()
        .await
        .expect("kick request");
    let (status, _, body) = json_response(resp).await;
    (status, body)
}

/// `sessions_expired` of a node.
async fn sessions_expired(node: &NodeHandle) -> f64 {
    let text = metrics_text(node).await;
    metric(&text, "imgate_sessions_expired_total")
        .unwrap_or_else(|| panic!("no imgate_sessions_expired_total in\n{text}"))
}

/// Kills a node as `kill -9` would, in process: no `leaving` announcement, no hand-over, no
/// drain. Its gossip stops (peers only notice its silence), its QUIC endpoint and HTTP server
/// go away, and its driver stops with whatever it held.
async fn kill_abruptly(node: NodeHandle) {
    node.membership().stop_gossip_task_for_test();
    node.shared().links.shutdown().await;
    node.shared().shutdown.cancel();
    drop(node);
}

fn index_of(c: &Cluster, id: &str) -> usize {
    c.nodes.iter().position(|n| n.node_id() == id).unwrap()
}

// ----- token lifetime and refresh ------------------------------------------------------------

/// A session is closed with 4004 `token_expired` when its token expires (2 s), not before;
/// the expired token no longer opens one; the close is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_closed_with_4004_when_its_token_expires() {
    let node = short_token_node().await;
    assert_eq!(sessions_expired(&node).await, 0.0);
    start_of_a_second().await;
    let login_ms = now_ms();
    let (token, exp) = login_token(&node, "alice").await;
    let mut ws = open(&node, &token).await;
    let exp_ms = exp * 1000;
    assert!(exp_ms <= login_ms + 2000, "a 2 s token: exp {exp}");
    // Open at ~1 s and shortly before the expiry.
    expect_no_frame(&mut ws, until_ms(login_ms + 1000)).await;
    ping_pong(&mut ws).await;
    expect_no_frame(&mut ws, until_ms(exp_ms - 300)).await;
    ping_pong(&mut ws).await;
    // Closed once the token expired (the node counts in whole seconds: within the second).
    let (code, reason) = close_of(&mut ws, until_ms(exp_ms + 1500)).await;
    let closed_ms = now_ms();
    assert_eq!(
        (code, reason.as_str()),
        (Some(4004), "token_expired"),
        "close"
    );
    assert!(
        closed_ms + 50 >= exp_ms,
        "closed {} ms before the token expired",
        exp_ms - closed_ms
    );
    assert!(
        closed_ms - login_ms <= 4000,
        "closed {closed_ms} ms after login at {login_ms}"
    );
    assert_eq!(sessions_expired(&node).await, 1.0);
    // The token opens no session any more.
    wait_past_second(exp).await;
    assert_eq!(
        refusal(&node, &token).await,
        (401, "token_expired".to_string())
    );
    node.shutdown().await;
}

/// `refresh` with a fresh token of the same uid answers `refreshed` with its `exp`, and the
/// session lives past the first token's expiry, until the second one's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_with_a_fresh_token_keeps_the_session_until_the_new_expiry() {
    let node = short_token_node().await;
    start_of_a_second().await;
    let (first, exp1) = login_token(&node, "alice").await;
    let s = iat_of(&first);
    assert_eq!(exp1, s + 2);
    let mut ws = open(&node, &first).await;
    // Halfway into the next second, a new token (exp s + 3), handed over in a refresh: the
    // session now ends about 2 s from here, well after the first token's end (s + 2).
    expect_no_frame(&mut ws, until_ms((s + 1) * 1000 + 500)).await;
    let (second, exp2) = login_token(&node, "alice").await;
    assert_eq!(exp2, s + 3, "the second token was issued in second s + 1");
    let answer = refresh(&mut ws, &second).await;
    assert_eq!(answer, json!({"type": "refreshed", "expires_at": exp2}));
    // Open past the end of the first token's last second.
    expect_no_frame(&mut ws, until_ms(exp1 * 1000 + 1200)).await;
    ping_pong(&mut ws).await;
    let (code, reason) = close_of(&mut ws, until_ms(exp2 * 1000 + 2000)).await;
    assert_eq!((code, reason.as_str()), (Some(4004), "token_expired"));
    assert!(
        now_ms() + 50 >= exp2 * 1000,
        "closed before the second token expired"
    );
    assert_eq!(sessions_expired(&node).await, 1.0);
    node.shutdown().await;
}

/// `refresh` with another uid's token, garbage, or a token of another cluster (right secret,
/// other `aud`) or issuer is answered `invalid_token`; the session stays open and still ends
/// at its own token's expiry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_with_a_bad_token_is_invalid_token_and_changes_nothing() {
    let node = short_token_node().await;
    start_of_a_second().await;
    let (token, exp) = login_token(&node, "alice").await;
    let s = iat_of(&token);
    assert_eq!(exp, s + 2);
    let mut ws = open(&node, &token).await;
    // Tokens issued in the next second expire after alice's: had one been taken, the session
    // would live on past s + 3.
    expect_no_frame(&mut ws, until_ms((s + 1) * 1000 + 50)).await;
    let (mallory, _) = login_token(&node, "mallory").await;
    let now = now_s();
    let mut other_cluster = claims("alice", now, now, now + 2);
    other_cluster["aud"] = json!("another-cluster");
    let mut other_issuer = claims("alice", now, now, now + 2);
    other_issuer["iss"] = json!("sso");
    let cases = [
        ("another uid's token", mallory),
        ("garbage", "garbage".to_string()),
        (
            "a token of another cluster",
            forge(&other_cluster, Algorithm::HS256, SECRET),
        ),
        (
            "a token of another issuer",
            forge(&other_issuer, Algorithm::HS256, SECRET),
        ),
        (
            "an expired token of the same uid",
            forge(
                &claims("alice", now - 3, now - 3, now - 1),
                Algorithm::HS256,
                SECRET,
            ),
        ),
        (
            "a token signed with another secret",
            forge(
                &claims("alice", now, now, now + 2),
                Algorithm::HS256,
                "other-secret",
            ),
        ),
    ];
    for (what, bad) in &cases {
        let answer = refresh(&mut ws, bad).await;
        assert_invalid_token(&answer, what);
        ping_pong(&mut ws).await;
    }
    let (code, reason) = close_of(&mut ws, until_ms(exp * 1000 + 1500)).await;
    assert_eq!((code, reason.as_str()), (Some(4004), "token_expired"));
    assert!(
        now_ms() < (exp + 1) * 1000,
        "the session outlived its own token: a refused refresh extended it"
    );
    node.shutdown().await;
}

// ----- the SDK ------------------------------------------------------------------------------

/// Runs an SDK client of `uid` against `node` with this `relogin_margin` for `for_how_long`,
/// starting at the beginning of a unix second; fails on any event but the first `Connected`.
/// Returns the client and its incoming messages.
async fn sdk_stays_connected(
    node: &NodeHandle,
    uid: &str,
    margin: Duration,
    for_how_long: Duration,
) -> (
    imgate::client::Client,
    tokio::sync::mpsc::Receiver<imgate::client::Incoming>,
) {
    let mut cfg = imgate::client::ClientConfig::new(vec![node.http_url()], uid);
    cfg.relogin_margin = margin;
    cfg.ping_interval = Duration::from_millis(500);
    start_of_a_second().await;
    let (client, incoming, mut events) = imgate::client::Client::start(cfg);
    match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
        Ok(Some(imgate::client::Event::Connected { node: n, .. })) => assert_eq!(n, "n1"),
        other => panic!("no connection: {other:?}"),
    }
    if let Ok(ev) = tokio::time::timeout(for_how_long, events.recv()).await {
        panic!("the SDK's session did not stay up: {ev:?}");
    }
    let sessions = client
        .stats()
        .sessions
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(sessions, 1, "one session all along");
    (client, incoming)
}

/// The SDK refreshes its token by itself: on 2 s tokens without leeway its one session lives
/// ~5 s (no `Disconnected`, no second session), and messages still flow both ways at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_refreshes_its_token_and_stays_connected_past_several_expiries() {
    let node = short_token_node().await;
    let (alice, mut incoming) = sdk_stays_connected(
        &node,
        "alice",
        Duration::from_secs(1),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(sessions_expired(&node).await, 0.0, "no session expired");
    // Messages both ways.
    let mut bob = common::connect(&node, "bob").await;
    let pending = alice.send_with_id("a1", "bob", json!({"n": 1})).unwrap();
    let m = next_of(&mut bob, "msg").await;
    assert_eq!(
        (&m["from"], &m["id"]),
        (&json!("alice"), &json!("a1")),
        "{m}"
    );
    common::ack(&mut bob, m["seq"].as_u64().unwrap()).await;
    let outcome = tokio::time::timeout(common::WAIT, pending)
        .await
        .expect("an outcome in time");
    assert_eq!(outcome, Ok(imgate::client::SendOutcome::Delivered));
    common::send_msg(&mut bob, "b1", "alice", json!({"n": 2})).await;
    let got = tokio::time::timeout(common::WAIT, incoming.recv())
        .await
        .expect("a message in time")
        .expect("client running");
    assert_eq!((got.from.as_str(), got.id.as_str()), ("bob", "b1"));
    assert_eq!(next_of(&mut bob, "delivered").await["id"], "b1");
    node.shutdown().await;
}

/// `relogin_margin` is documented as "a live session gets a new token this long before its
/// token expires (or at half its remaining life, if that comes later), so that the node never
/// closes it with 4004". This test found the SDK computing its lead in whole seconds (a margin
/// under a second became 0, so the refresh came at the expiry itself, after the node had
/// closed the session); it now works in milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_refreshes_before_expiry_with_a_sub_second_margin() {
    let node = short_token_node().await;
    sdk_stays_connected(
        &node,
        "alice",
        Duration::from_millis(500),
        Duration::from_secs(4),
    )
    .await;
    assert_eq!(sessions_expired(&node).await, 0.0, "no session expired");
    node.shutdown().await;
}

// ----- kicks --------------------------------------------------------------------------------

/// A kick at a node that does not own the user closes both of its sessions at the owner
/// (4005), answers `sessions: 2`, and revokes its old token on every node (401
/// `token_revoked`; as a `refresh`, `invalid_token`), while a token issued after it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_at_a_non_owner_closes_every_session_and_revokes_old_tokens_everywhere() {
    let c = Cluster::start(3).await;
    c.wait_converged(3).await;
    let uid = "bob";
    let owner = c.nodes[0].shared().owner_of(uid).unwrap().node;
    let x = index_of(&c, &owner);
    let y = (x + 1) % 3;
    let z = (x + 2) % 3;
    let mut one = cluster_support::Client::login(&c.nodes[y].http_url(), uid).await;
    let mut two = cluster_support::Client::login(&c.nodes[z].http_url(), uid).await;
    assert_eq!((one.node.as_str(), two.node.as_str()), (&*owner, &*owner));
    let old = one.token.clone();
    let old_iat = iat_of(&old);
    let (status, answer) = kick(&c.nodes[y], uid).await;
    let after = now_s();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"uid": uid, "sessions": 2}));
    assert_eq!(one.close_code().await, Some(4005));
    assert_eq!(two.close_code().await, Some(4005));
    // The owner and the node that took the kick refuse the old token at once.
    let revoked = (401, "token_revoked".to_string());
    assert_eq!(refusal(&c.nodes[x], &old).await, revoked, "at the owner");
    assert_eq!(
        refusal(&c.nodes[y], &old).await,
        revoked,
        "at the kicking node"
    );
    // The third node once gossip brought the kick.
    let third = c.nodes[z].shared().clone();
    wait_until(SPREAD, || third.kicks.revokes(uid, old_iat)).await;
    assert_eq!(
        refusal(&c.nodes[z], &old).await,
        revoked,
        "at the third node"
    );
    // A token issued after the kick (the next second) opens a session; the old token handed
    // over as a refresh is refused, and the session stays.
    wait_past_second(after).await;
    let fresh = cluster_support::login(&c.nodes[z].http_url(), uid).await;
    let fresh = fresh["token"].as_str().unwrap().to_string();
    let mut ws = open(&c.nodes[x], &fresh).await;
    assert_invalid_token(&refresh(&mut ws, &old).await, "a revoked token");
    ping_pong(&mut ws).await;
    drop(ws);
    c.shutdown().await;
}

/// A kick of a uid with no session answers `sessions: 0` and still revokes its token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_of_a_uid_without_sessions_answers_0_and_revokes_its_token() {
    let c = Cluster::start(3).await;
    c.wait_converged(3).await;
    let uid = "carol";
    let owner = c.nodes[0].shared().owner_of(uid).unwrap().node;
    let x = index_of(&c, &owner);
    let y = (x + 1) % 3;
    let (token, _) = login_token(&c.nodes[y], uid).await;
    let (status, answer) = kick(&c.nodes[y], uid).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"uid": uid, "sessions": 0}));
    let revoked = (401, "token_revoked".to_string());
    assert_eq!(refusal(&c.nodes[x], &token).await, revoked, "at the owner");
    assert_eq!(
        refusal(&c.nodes[y], &token).await,
        revoked,
        "at the kicking node"
    );
    c.shutdown().await;
}

/// A kick outlives the user's owner: bob is kicked at Y while connected at his owner X, X
/// dies abruptly, and bob's new owner Z refuses his pre-kick token (401 `token_revoked`) and
/// accepts one issued after the kick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_kick_and_the_owners_death_the_new_owner_refuses_the_old_token() {
    let mut c = Cluster::start(3).await;
    c.wait_converged(3).await;
    let uid = "bob";
    // Bob's preference list: X, then Z; Y is the third node.
    let pref = c.nodes[0].shared().current_view().ring.preference(uid);
    let (x_id, z_id, y_id) = (
        pref[0].to_string(),
        pref[1].to_string(),
        pref[2].to_string(),
    );
    let y = index_of(&c, &y_id);
    let mut bob = cluster_support::Client::login(&c.nodes[y].http_url(), uid).await;
    assert_eq!(bob.node, x_id);
    let old = bob.token.clone();
    let old_iat = iat_of(&old);
    let (status, answer) = kick(&c.nodes[y], uid).await;
    let after = now_s();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"uid": uid, "sessions": 1}));
    assert_eq!(bob.close_code().await, Some(4005));
    // kill -9 of the owner, right after the kick.
    let x_node = c.nodes.remove(index_of(&c, &x_id));
    kill_abruptly(x_node).await;
    let (y_shared, z_shared) = (
        c.nodes[index_of(&c, &y_id)].shared().clone(),
        c.nodes[index_of(&c, &z_id)].shared().clone(),
    );
    let owned_by_z = |s: &imgate::state::Shared| s.owner_of(uid).is_some_and(|o| *o.node == *z_id);
    wait_until(SPREAD, || owned_by_z(&z_shared) && owned_by_z(&y_shared)).await;
    wait_until(SPREAD, || z_shared.kicks.revokes(uid, old_iat)).await;
    let z = &c.nodes[index_of(&c, &z_id)];
    assert_eq!(
        refusal(z, &old).await,
        (401, "token_revoked".to_string()),
        "the new owner refuses the pre-kick token"
    );
    // A token issued after the kick works there.
    wait_past_second(after).await;
    let l = cluster_support::login(&c.nodes[index_of(&c, &y_id)].http_url(), uid).await;
    assert_eq!(l["node"], z_id.as_str(), "{l}");
    let fresh =
        cluster_support::Client::connect(l["url"].as_str().unwrap(), l["token"].as_str().unwrap())
            .await;
    assert_eq!(
        (fresh.uid.as_str(), fresh.node.as_str()),
        (uid, z_id.as_str())
    );
    drop(fresh);
    c.shutdown().await;
}

/// A node that joins after a kick learns it from gossip: it refuses the old token at the
/// upgrade of a user it owns, and accepts one issued after the kick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joining_after_a_kick_refuses_the_old_token() {
    let mut c = Cluster::start(3).await;
    c.wait_converged(3).await;
    // A uid that n4 will own once it joins.
    let future = imgate::ring::Ring::new(
        imgate::ring::node_ids(&["n1", "n2", "n3", "n4"]),
        Config::default().cluster.vnodes,
        0,
    );
    let uid = first_uid("bob", |u| &**future.primary(u).unwrap() == "n4");
    let mut bob = cluster_support::Client::login(&c.nodes[0].http_url(), &uid).await;
    let old = bob.token.clone();
    let old_iat = iat_of(&old);
    let (status, answer) = kick(&c.nodes[0], &uid).await;
    let after = now_s();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"uid": uid, "sessions": 1}));
    assert_eq!(bob.close_code().await, Some(4005));
    c.add_node().await;
    c.wait_converged(4).await;
    let n4 = c.nodes[3].shared().clone();
    assert_eq!(n4.owner_of(&uid).unwrap().node.as_ref(), "n4");
    wait_until(SPREAD, || n4.kicks.revokes(&uid, old_iat)).await;
    assert_eq!(
        refusal(&c.nodes[3], &old).await,
        (401, "token_revoked".to_string()),
        "the joined node refuses the pre-kick token"
    );
    wait_past_second(after).await;
    let l = cluster_support::login(&c.nodes[1].http_url(), &uid).await;
    assert_eq!(l["node"], "n4", "{l}");
    let fresh =
        cluster_support::Client::connect(l["url"].as_str().unwrap(), l["token"].as_str().unwrap())
            .await;
    assert_eq!(fresh.node, "n4");
    drop(fresh);
    c.shutdown().await;
}

// ----- uid look-alikes and token claims ------------------------------------------------------

/// Uids that imitate the system sender or hide characters.
const LOOK_ALIKES: [&str; 9] = [
    "$system",
    "\u{ff04}system",  // fullwidth dollar
    "\u{fe69}x",       // small dollar
    "\u{200b}$system", // zero-width space first
    "\u{202e}bob",     // right-to-left override
    "a\u{2066}b",      // left-to-right isolate
    "\u{feff}alice",   // byte order mark
    "   ",             // whitespace only
    "\u{3000}\u{a0}",  // ideographic and no-break spaces
];

async fn status_and_error(resp: reqwest::Response) -> (u16, Value) {
    let (status, _, body) = json_response(resp).await;
    (status, body)
}

// review rows 10, 11, 12
/// Look-alike uids are refused at `/login` on every node; uids the rule allows (a Cyrillic
/// letter, a trailing space) are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_alike_uids_are_refused_at_login_on_every_node() {
    let c = Cluster::start(3).await;
    c.wait_converged(3).await;
    for node in &c.nodes {
        for uid in LOOK_ALIKES {
            let (status, body) = login_json(node, &json!({ "uid": uid })).await;
            assert_eq!(status, 400, "{} login {uid:?}: {body}", node.node_id());
            assert_eq!(body["error"], "bad_request", "{uid:?}: {body}");
        }
        for uid in ["\u{0430}lice", "alice "] {
            let (status, body) = login_json(node, &json!({ "uid": uid })).await;
            assert_eq!(status, 200, "{uid:?} is a uid: {body}");
        }
    }
    c.shutdown().await;
}

// review rows 30, 36, 59
/// Look-alikes as a recipient or an API path: a WebSocket `send` fails `invalid`, `/api/push`
/// and `/api/kick` are 400, `/api/presence` of a zero-width or malformed path is 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_alike_recipients_and_api_paths_are_refused() {
    let c = Cluster::start(3).await;
    c.wait_converged(3).await;
    let mut alice = cluster_support::Client::login(&c.nodes[0].http_url(), "alice").await;
    for (i, to) in LOOK_ALIKES.iter().enumerate() {
        let id = format!("s{i}");
        alice.send(&id, to, json!("hi")).await;
        let f = alice.expect("failed").await;
        assert_eq!(
            (f["id"].as_str(), f["reason"].as_str()),
            (Some(id.as_str()), Some("invalid")),
            "send to {to:?}: {f}"
        );
    }
    for node in &c.nodes {
        for to in ["$system", "\u{ff04}system", "\u{202e}bob"] {
            let resp = http()
                .post(format!("{}/api/push", node.http_url()))
                .bearer_auth(API_KEY)
                .json(&json!({"to": to, "body": {"k": 1}, "wait_ms": 0}))
                .send()
                .await
                .unwrap();
            let (status, body) = status_and_error(resp).await;
            assert_eq!(status, 400, "push to {to:?}: {body}");
            assert_eq!(body["error"], "bad_request", "{body}");
            let (status, body) = kick(node, to).await;
            assert_eq!(status, 400, "kick of {to:?}: {body}");
        }
        for path in [
            "%E2%80%8Bbob",    // zero-width space
            "%EF%BC%84system", // fullwidth dollar
            "%E2%80%AEbob",    // right-to-left override
            "%24system",       // `$system`
            "%EF%B9%A9x",      // small dollar
            "%ZZ",             // malformed percent-encoding
            "bob%",            // a percent at the end
        ] {
            let resp = http()
                .get(format!("{}/api/presence/{path}", node.http_url()))
                .bearer_auth(API_KEY)
                .send()
                .await
                .unwrap();
            let (status, body) = status_and_error(resp).await;
            assert_eq!(status, 400, "presence/{path}: {body}");
            assert_eq!(body["error"], "bad_request", "{body}");
        }
    }
    c.shutdown().await;
}

// review row 43
/// A token whose `sub` is the system sender or a look-alike of it, signed with the right
/// secret, opens no session on any node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_sender_tokens_signed_with_the_right_secret_are_401() {
    let c = Cluster::start(3).await;
    c.wait_converged(3).await;
    let now = now_s();
    for node in &c.nodes {
        for sub in [
            "$system",
            "\u{ff04}system",
            "\u{200b}$system",
            "\u{202e}bob",
        ] {
            let token = forge(&claims(sub, now, now, now + 600), Algorithm::HS256, SECRET);
            assert_eq!(
                refusal(node, &token).await,
                (401, "invalid_token".to_string()),
                "{} sub {sub:?}",
                node.node_id()
            );
        }
    }
    c.shutdown().await;
}

// review rows 40, 46
/// Tokens signed with the right secret but naming another cluster (`aud`) or issuer (`iss`),
/// living longer than the cluster issues, or issued in the future (with `nbf` now) are 401.
/// The same claims without the flaw are accepted, so each refusal is about that flaw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_another_cluster_issuer_lifetime_or_future_are_401() {
    let node = common::start(Config::for_test()).await;
    let cfg = Config::for_test();
    let (ttl, leeway) = (cfg.auth.token_ttl_s, cfg.auth.leeway_s);
    let now = now_s();
    let ok = |c: &Value| forge(c, Algorithm::HS256, SECRET);
    // Controls: as issued, and with the longest lifetime the cluster accepts.
    for c in [
        claims("alice", now, now, now + ttl),
        claims("alice", now, now, now + ttl + leeway),
    ] {
        let mut ws = open(&node, &ok(&c)).await;
        ping_pong(&mut ws).await;
    }
    let mut aud = claims("alice", now, now, now + 600);
    aud["aud"] = json!("another-cluster");
    let mut iss = claims("alice", now, now, now + 600);
    iss["iss"] = json!("another-issuer");
    let long = claims("alice", now, now, now + ttl + leeway + 100);
    let future = claims("alice", now + leeway + 100, now, now + 600);
    for (what, c) in [
        ("aud of another cluster", aud),
        ("iss of another issuer", iss),
        ("exp - iat = ttl + leeway + 100", long),
        ("iat in the future, nbf now", future),
    ] {
        assert_eq!(
            refusal(&node, &ok(&c)).await,
            (401, "invalid_token".to_string()),
            "{what}"
        );
    }
    node.shutdown().await;
}

// review row 44
/// In `users` mode a token signed with the right secret for a uid not in `[[auth.users]]`
/// opens no session; one for a listed uid does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_mode_token_for_an_unlisted_uid_is_401() {
    let mut cfg = Config::for_test();
    cfg.auth.mode = AuthMode::Users;
    cfg.auth.users = vec![UserEntry {
        uid: "alice".into(),
        password_hash: cheap_hash("s3cret"),
    }];
    let node = common::start(cfg).await;
    let (status, body) = login_json(&node, &json!({"uid": "alice", "password": "s3cret"})).await;
    assert_eq!(status, 200, "{body}");
    let mut ws = open(&node, body["token"].as_str().unwrap()).await;
    ping_pong(&mut ws).await;
    let (status, body) = login_json(&node, &json!({"uid": "mallory", "password": "s3cret"})).await;
    assert_eq!(
        (status, &body["error"]),
        (401, &json!("invalid_credentials")),
        "{body}"
    );
    let now = now_s();
    let forged = |uid: &str| forge(&claims(uid, now, now, now + 600), Algorithm::HS256, SECRET);
    let mut ws = open(&node, &forged("alice")).await;
    ping_pong(&mut ws).await;
    assert_eq!(
        refusal(&node, &forged("mallory")).await,
        (401, "invalid_token".to_string())
    );
    node.shutdown().await;
}
