//! The HTTP side of a node: login, WebSocket upgrade, backend API, operations, chat page.
//!
//! Two middlewares wrap every route: CORS (every response carries
//! `Access-Control-Allow-Origin`; `OPTIONS` on any path answers 204) and JSON errors (any
//! error response that is not JSON yet, such as axum's own 404/405 or upgrade rejections,
//! is rewritten to `{"error", "message"}`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

use crate::auth::{TokenError, random_id, verify_password};
use crate::clock::unix_now;
use crate::config::AuthMode;
use crate::engine::{Message, Outcome};
use crate::protocol::MAX_ID_BYTES;
use crate::relay::Answer;
use crate::state::{Command, Shared};
use crate::uid::validate_uid;

/// An HTTP error: a status and a JSON body `{"error": code, "message": text}`.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code.
    pub code: &'static str,
    /// Human text.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 503: the node is shutting down.
    fn stopping() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "node stopping",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": self.code, "message": self.message})),
        )
            .into_response()
    }
}

/// The router of a node, with its middlewares.
pub fn router(shared: Arc<Shared>, tracker: TaskTracker) -> Router {
    let state = AppState { shared, tracker };
    Router::new()
        .route("/", get(page))
        .route("/imgate.js", get(imgate_js))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/login", post(login))
        .route("/ws", get(ws_upgrade))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/cluster", get(cluster))
        .route("/metrics", get(metrics))
        .route("/api/push", post(api_push))
        .route("/api/presence/{uid}", get(api_presence))
        .route("/presence", get(user_presence))
        .route("/api/kick", post(api_kick))
        .route("/api/rooms/{room}", get(rooms::info))
        .route("/api/rooms/{room}/members", post(rooms::add_member))
        .route(
            "/api/rooms/{room}/members/{uid}",
            axum::routing::delete(rooms::remove_member),
        )
        .route("/api/rooms/{room}/push", post(rooms::push))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such path") })
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(state.clone(), cors))
        .with_state(state)
}

#[path = "http_rooms.rs"]
mod rooms;

#[derive(Clone)]
struct AppState {
    shared: Arc<Shared>,
    tracker: TaskTracker,
}

async fn cors(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let origin = HeaderValue::from_str(&state.shared.cfg.http.cors_origin)
        .unwrap_or_else(|_| HeaderValue::from_static("*"));
    let mut resp = if req.method() == Method::OPTIONS {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Content-Type, Authorization"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        r
    } else {
        next.run(req).await
    };
    resp.headers_mut()
        .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    resp
}

/// Rewrites error responses that are not JSON (axum's own rejections) into JSON errors.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let detail = axum::body::to_bytes(body, 4096)
        .await
        .ok()
        .and_then(|b| String::from_utf8(b.to_vec()).ok())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_string());
    let code = match status {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UPGRADE_REQUIRED => "upgrade_required",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        StatusCode::REQUEST_TIMEOUT => "timeout",
        _ => "error",
    };
    let mut out = ApiError::new(status, code, detail).into_response();
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

/// The browser SDK (`clients/js/imgate.js`), compiled into the binary like the page.
pub const IMGATE_JS: &str = include_str!("../clients/js/imgate.js");

async fn imgate_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        IMGATE_JS,
    )
        .into_response()
}

async fn health(State(state): State<AppState>) -> Response {
    let s = &state.shared;
    let view = s.current_view();
    let members = view.members.len();
    let reachable = s.reachable_members(&view);
    let ready = reachable == members;
    if let Some(reason) = s.degraded.get() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({"status": "degraded", "node": &*s.node_id, "members": members,
                "reachable": reachable, "ready": false, "reason": reason}),
            ),
        )
            .into_response();
    }
    if s.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({"status": "stopping", "node": &*s.node_id, "members": members,
                "reachable": reachable, "ready": false}),
            ),
        )
            .into_response();
    }
    Json(
        json!({"status": "ok", "node": &*s.node_id, "members": members,
        "reachable": reachable, "ready": ready}),
    )
    .into_response()
}

/// `GET /ready`: 200 once the node can take its share of users (see `Shared::readiness`), else
/// 503 with the reason. For readiness probes, rolling deploys, `imgate up` and the tests.
async fn ready(State(state): State<AppState>) -> Response {
    use crate::state::NotReady;
    let s = &state.shared;
    let view = s.current_view();
    let (members, reachable) = (view.members.len(), s.reachable_members(&view));
    match s.readiness() {
        Ok(()) => Json(
            json!({"ready": true, "node": &*s.node_id, "members": members,
            "reachable": reachable}),
        )
        .into_response(),
        Err(why) => {
            let reason = match &why {
                NotReady::Stopping => "stopping".to_string(),
                NotReady::Degraded(w) => format!("degraded: {w}"),
                NotReady::Links { members, reachable } => {
                    format!("{reachable} of {members} members reachable")
                }
                NotReady::Settling => "membership changed moments ago".to_string(),
                NotReady::Joining => "no other member seen yet".to_string(),
            };
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(
                    json!({"ready": false, "error": "not_ready", "message": reason,
                    "node": &*s.node_id, "members": members, "reachable": reachable}),
                ),
            )
                .into_response()
        }
    }
}

async fn cluster(State(state): State<AppState>) -> Json<serde_json::Value> {
    let s = &state.shared;
    let view = s.current_view();
    let members: Vec<serde_json::Value> = view
        .members
        .values()
        .map(|m| {
            let me = m.id == s.node_id;
            json!({
                "id": &*m.id,
                "http": m.http,
                "url": &*m.url,
                "gossip": m.gossip.to_string(),
                "quic": m.quic.to_string(),
                "live": true,
                "reachable": s.can_own(&m.id),
                "self": me,
                "generation": m.generation,
            })
        })
        .collect();
    Json(json!({
        "node": &*s.node_id,
        "cluster_id": s.cfg.cluster.id,
        "ring_version": view.version(),
        "ring_nodes": view.ring.nodes().iter().map(|n| &**n).collect::<Vec<_>>(),
        "members": members,
    }))
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.shared.metrics.encode(),
    )
        .into_response()
}

// ----- login --------------------------------------------------------------------------------

#[derive(Deserialize)]
struct LoginBody {
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
enum BodyKind {
    Json,
    Form,
}

fn body_kind(headers: &HeaderMap) -> Result<BodyKind, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "application/json" => Ok(BodyKind::Json),
        "application/x-www-form-urlencoded" => Ok(BodyKind::Form),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send application/json or application/x-www-form-urlencoded",
        )),
    }
}

/// Parses a JSON object into `T`; serde's derived structs would also take an array.
fn json_object<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err("not a JSON object".into());
    }
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// Reads a request body of at most `limit` bytes within `http.body_timeout_ms`. A
/// `Content-Length` over the limit is refused before any of the body is read.
async fn read_body(
    shared: &Shared,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<bytes::Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body over the limit of {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let within = Duration::from_millis(shared.cfg.http.body_timeout_ms);
    match tokio::time::timeout(within, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(too_large()),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!(
                "the request body did not arrive within {} ms",
                shared.cfg.http.body_timeout_ms
            ),
        )),
    }
}

/// Holds a place in the `users`-mode login queue; gives it back when dropped.
struct LoginSlot<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for LoginSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn login(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let result = do_login(&state.shared, &headers, body).await;
    state.shared.metrics.login(result.is_ok());
    match result {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn do_login(
    shared: &Shared,
    headers: &HeaderMap,
    body: Body,
) -> Result<serde_json::Value, ApiError> {
    let kind = body_kind(headers)?;
    let bytes = read_body(
        shared,
        headers,
        body,
        shared.cfg.limits.max_login_body_bytes,
    )
    .await?;
    let parsed: LoginBody = match kind {
        BodyKind::Json => json_object(&bytes).map_err(|e| {
            ApiError::bad_request(format!(
                "body must be a JSON object with string fields uid and password: {e}"
            ))
        })?,
        BodyKind::Form => serde_urlencoded::from_bytes(&bytes)
            .map_err(|e| ApiError::bad_request(format!("malformed form body: {e}")))?,
    };
    let uid = parsed
        .uid
        .or(parsed.id)
        .ok_or_else(|| ApiError::bad_request("uid is required"))?;
    validate_uid(&uid).map_err(ApiError::bad_request)?;
    if shared.cfg.auth.mode == AuthMode::Users {
        let password = parsed
            .password
            .ok_or_else(|| ApiError::bad_request("password is required"))?;
        let entry = shared.cfg.auth.users.iter().find(|u| u.uid == uid);
        let hash = entry.map_or_else(|| shared.decoy_hash.clone(), |u| u.password_hash.clone());
        // A bounded queue: a flood of logins is answered 503 at once instead of making every
        // honest login wait behind it.
        let waiting = shared
            .login_waiters
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _slot = LoginSlot(&shared.login_waiters);
        if waiting >= shared.cfg.auth.login_concurrency + shared.cfg.auth.login_queue {
            shared.metrics.logins_busy.inc();
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy",
                "too many logins waiting for a password check; try again shortly",
            ));
        }
        let _permit = shared
            .password_checks
            .acquire()
            .await
            .map_err(|_| ApiError::stopping())?;
        let ok = tokio::task::spawn_blocking(move || verify_password(&password, &hash))
            .await
            .unwrap_or(false);
        if !ok || entry.is_none() {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                "unknown uid or wrong password",
            ));
        }
    }
    let owner = shared.owner_of(&uid).ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_nodes",
            "no live node can take this user",
        )
    })?;
    let (token, claims) = shared
        .tokens
        .issue(&uid, &owner.node, &owner.url, unix_now());
    Ok(json!({
        "token": token,
        "url": &*owner.url,
        "node": &*owner.node,
        "expires_at": claims.exp,
    }))
}

// ----- WebSocket upgrade -------------------------------------------------------------------

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

fn token_from(req_query: Option<&str>, headers: &HeaderMap) -> Option<String> {
    if let Some(q) = req_query
        && let Ok(TokenQuery { token: Some(t) }) = serde_urlencoded::from_str::<TokenQuery>(q)
        && !t.is_empty()
    {
        return Some(t);
    }
    bearer(headers).map(str::to_string)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|t| !t.is_empty())
}

/// The claims of a user's token (`?token=` or `Authorization: Bearer`), or the 401 that says
/// why it is refused: missing, expired, not yet valid, revoked by a kick, or invalid.
fn user_claims(
    shared: &Shared,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<crate::auth::Claims, ApiError> {
    token_from(query, headers)
        .ok_or(TokenError::Missing)
        .and_then(|t| shared.tokens.verify(&t))
        .and_then(|c| {
            if shared.kicks.revokes(&c.sub, c.iat) {
                Err(TokenError::Revoked)
            } else if shared.cfg.auth.mode == AuthMode::Users
                && !shared.cfg.auth.users.iter().any(|u| u.uid == c.sub)
            {
                Err(TokenError::Invalid("uid not in auth.users".into()))
            } else {
                Ok(c)
            }
        })
        .map_err(|e| {
            let code = match e {
                TokenError::Missing => "missing_token",
                TokenError::Expired => "token_expired",
                TokenError::NotYetValid => "token_not_yet_valid",
                TokenError::Revoked => "token_revoked",
                TokenError::Invalid(_) => "invalid_token",
            };
            ApiError::new(StatusCode::UNAUTHORIZED, code, e.to_string())
        })
}

async fn ws_upgrade(
    State(state): State<AppState>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let shared = state.shared.clone();
    let claims = match user_claims(&shared, uri.query(), &headers) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rejection) => return rejection.into_response(),
    };
    if shared.shutdown.is_cancelled() {
        return ApiError::stopping().into_response();
    }
    let limits = &shared.cfg.limits;
    let upgrade = upgrade
        .max_message_size(limits.max_frame_bytes.saturating_mul(4))
        .max_frame_size(limits.max_frame_bytes.saturating_mul(4))
        .read_buffer_size(shared.cfg.websocket.read_buffer_bytes)
        .write_buffer_size(0);
    let uid: Arc<str> = Arc::from(claims.sub.as_str());
    match shared.owner_of(&uid) {
        Some(owner) if owner.node == shared.node_id => {}
        Some(owner) => {
            let (url, node) = (owner.url.to_string(), owner.node.to_string());
            let deadline = Duration::from_millis(shared.cfg.websocket.write_timeout_ms);
            return upgrade
                .on_upgrade(move |socket| crate::session::send_moved(socket, url, node, deadline));
        }
        None => {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_nodes",
                "no live node can take this user",
            )
            .into_response();
        }
    }
    let live = shared
        .live_sessions
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if live >= limits.max_sessions {
        shared
            .live_sessions
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_sessions",
            "this node is full",
        )
        .into_response();
    }
    shared.metrics.connections.inc();
    let tracker = state.tracker.clone();
    upgrade
        .on_failed_upgrade({
            let shared = shared.clone();
            move |_| {
                shared
                    .live_sessions
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
        .on_upgrade(move |socket| tracker.track_future(crate::session::run(shared, socket, claims)))
}

// ----- backend API --------------------------------------------------------------------------

fn check_api_key(shared: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = bearer(headers).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing Authorization: Bearer <api key>",
        )
    })?;
    // Compared as SHA-256 digests, every key, without stopping early: the time taken says
    // nothing about how much of a key was right, or which key.
    let given = sha256(given.as_bytes());
    let matches = shared.cfg.api.keys.iter().fold(0u8, |acc, k| {
        acc | u8::from(constant_time_eq(&sha256(k.as_bytes()), &given))
    });
    if matches == 1 {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "invalid api key",
        ))
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The checks of a backend API request with a body, in order: the API key (401), a JSON
/// content type (415), the body within `limit` bytes and its deadline (413, 408), a JSON
/// object of type `T` (400).
async fn api_request<T: serde::de::DeserializeOwned>(
    shared: &Shared,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<T, ApiError> {
    check_api_key(shared, headers)?;
    if body_kind(headers)? != BodyKind::Json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send application/json",
        ));
    }
    let bytes = read_body(shared, headers, body, limit).await?;
    json_object(&bytes)
        .map_err(|e| ApiError::bad_request(format!("body must be a JSON object: {e}")))
}

#[derive(Deserialize)]
struct PushBody {
    to: Option<serde_json::Value>,
    body: Option<Box<RawValue>>,
    id: Option<serde_json::Value>,
    wait_ms: Option<u64>,
    transient: Option<bool>,
}

/// The `id` of a push: the one given (1 to 64 bytes), or a fresh one.
fn push_id(id: Option<serde_json::Value>) -> Result<String, ApiError> {
    match id {
        None | Some(serde_json::Value::Null) => Ok(random_id()),
        Some(serde_json::Value::String(s)) if !s.is_empty() && s.len() <= MAX_ID_BYTES => Ok(s),
        _ => Err(ApiError::bad_request(
            "`id` must be a string of 1 to 64 bytes",
        )),
    }
}

/// The `body` of a push (`null` when missing), within `limits.max_body_bytes` (413). The
/// request's parse validated it: it is kept as it came, not parsed again.
fn push_body(shared: &Shared, body: Option<Box<RawValue>>) -> Result<Box<RawValue>, ApiError> {
    let body = body.unwrap_or_else(|| RawValue::NULL.to_owned());
    if body.get().len() > shared.cfg.limits.max_body_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "body over the limit of {} bytes",
                shared.cfg.limits.max_body_bytes
            ),
        ));
    }
    Ok(body)
}

/// Longest `wait_ms` honoured by `/api/push`, in milliseconds.
const MAX_WAIT_MS: u64 = 60_000;

async fn api_push(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let shared = &state.shared;
    let limit = shared.cfg.limits.max_body_bytes + shared.cfg.limits.max_login_body_bytes;
    let req: PushBody = api_request(shared, &headers, body, limit).await?;
    let to = match req.to {
        Some(serde_json::Value::String(s)) if validate_uid(&s).is_ok() => s,
        _ => {
            return Err(ApiError::bad_request(
                "`to` must be a uid: 1 to 128 bytes, no control or format characters, not \
                 starting with `$`",
            ));
        }
    };
    let id = push_id(req.id)?;
    let body = push_body(shared, req.body)?;
    let body: crate::protocol::Body = Arc::from(body);
    let wait = Duration::from_millis(req.wait_ms.unwrap_or(5000).min(MAX_WAIT_MS));
    let (reply, outcome) = oneshot::channel();
    let msg = Message {
        transient: req.transient.unwrap_or(false),
        from: Arc::from(crate::uid::SYSTEM_SENDER),
        id: Arc::from(id.as_str()),
        to: Arc::from(to.as_str()),
        body,
        ts: crate::clock::now_ms(),
        room: None,
        except: None,
    };
    shared
        .engine
        .send(Command::Push { msg, reply })
        .await
        .map_err(|_| ApiError::stopping())?;
    Ok(match tokio::time::timeout(wait, outcome).await {
        Ok(Ok(Answer::Outcome(Outcome::Delivered))) => {
            Json(json!({"status": "delivered", "id": id})).into_response()
        }
        Ok(Ok(Answer::Outcome(Outcome::Failed(reason)))) => {
            Json(json!({"status": "failed", "reason": reason.as_str(), "id": id})).into_response()
        }
        Ok(Ok(_) | Err(_)) => {
            return Err(ApiError::stopping());
        }
        Err(_) => (
            StatusCode::ACCEPTED,
            Json(json!({"status": "pending", "id": id})),
        )
            .into_response(),
    })
}

/// Hands `cmd` to the driver and waits for the owner's count on `answer`. An owner that cannot
/// be asked, or does not answer within 3 s, is 503 `unreachable` with `message`; too many
/// questions waiting already is 503 `busy`.
async fn ask_owner(
    shared: &Shared,
    cmd: Command,
    answer: oneshot::Receiver<Answer>,
    message: String,
) -> Result<usize, ApiError> {
    shared
        .engine
        .send(cmd)
        .await
        .map_err(|_| ApiError::stopping())?;
    match tokio::time::timeout(Duration::from_secs(3), answer).await {
        Ok(Ok(Answer::Sessions(n))) => Ok(n),
        Ok(Ok(Answer::Busy)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!(
                "too many requests wait for answers (limits.max_pending_requests = {})",
                shared.cfg.limits.max_pending_requests
            ),
        )),
        _ => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unreachable",
            message,
        )),
    }
}

/// The number of live sessions of `uid` at its owner (a presence question, over QUIC when the
/// owner is another node); `unreachable` carries `message`.
async fn sessions_of(shared: &Shared, uid: &str, message: String) -> Result<usize, ApiError> {
    let (reply, answer) = oneshot::channel();
    let cmd = Command::Presence {
        uid: uid.to_string(),
        reply,
    };
    ask_owner(shared, cmd, answer, message).await
}

/// Refuses a path whose percent-encoding is malformed (`%ZZ`, a `%` at the end): the router
/// would otherwise take it literally.
fn check_percent_encoding(uri: &axum::http::Uri) -> Result<(), ApiError> {
    let path = uri.path().as_bytes();
    let bad = path.iter().enumerate().any(|(i, &b)| {
        b == b'%'
            && !(path.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && path.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    });
    if bad {
        return Err(ApiError::bad_request("badly encoded path"));
    }
    Ok(())
}

async fn api_presence(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Path(uid): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let shared = &state.shared;
    check_api_key(shared, &headers)?;
    check_percent_encoding(&uri)?;
    validate_uid(&uid).map_err(ApiError::bad_request)?;
    let owner = shared.owner_of(&uid).ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_nodes", "no live node")
    })?;
    let sessions = sessions_of(
        shared,
        &uid,
        format!("the owner node {} could not be asked", owner.node),
    )
    .await?;
    Ok(Json(json!({
        "uid": uid,
        "online": sessions > 0,
        "node": &*owner.node,
        "sessions": sessions,
    })))
}

/// Most uids one `GET /presence` asks about.
pub const MAX_PRESENCE_UIDS: usize = 50;

/// `GET /presence?uid=bob&uid=carol` with a user's token: which of those users are online,
/// `{"presence": {"bob": true, "carol": false}}`, `null` for one whose owner could not be asked.
/// For a chat page's contact list; `api.user_presence = false` turns it off (403).
async fn user_presence(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Result<Json<serde_json::Value>, ApiError> {
    let shared = &state.shared;
    user_claims(shared, uri.query(), &headers)?;
    if shared.shutdown.is_cancelled() {
        return Err(ApiError::stopping());
    }
    if !shared.cfg.api.user_presence {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "presence is not shown to users here (api.user_presence = false)",
        ));
    }
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(uri.query().unwrap_or(""))
        .map_err(|_| ApiError::bad_request("badly encoded query"))?;
    let mut uids: Vec<String> = Vec::new();
    for (key, uid) in pairs {
        if key != "uid" || uids.contains(&uid) {
            continue;
        }
        validate_uid(&uid)
            .map_err(|e| ApiError::bad_request(format!("a `uid` is not valid: {e}")))?;
        if uids.len() == MAX_PRESENCE_UIDS {
            return Err(ApiError::bad_request(format!(
                "at most {MAX_PRESENCE_UIDS} uids per request"
            )));
        }
        uids.push(uid);
    }
    if uids.is_empty() {
        return Err(ApiError::bad_request("name at least one `uid`"));
    }
    let asks = uids.iter().map(|uid| async move {
        match sessions_of(shared, uid, String::new()).await {
            Ok(n) => json!(n > 0),
            Err(_) => serde_json::Value::Null,
        }
    });
    let answers = futures_util::future::join_all(asks).await;
    let presence: serde_json::Map<String, serde_json::Value> =
        uids.into_iter().zip(answers).collect();
    Ok(Json(json!({ "presence": presence })))
}

#[derive(Deserialize)]
struct KickBody {
    uid: Option<serde_json::Value>,
}

/// `POST /api/kick` `{"uid"}`: revokes the uid's tokens issued up to now, cluster-wide, and
/// closes its sessions (4005). Answers how many sessions its owner closed.
async fn api_kick(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let shared = &state.shared;
    let limit = shared.cfg.limits.max_login_body_bytes;
    let req: KickBody = api_request(shared, &headers, body, limit).await?;
    let uid = match req.uid {
        Some(serde_json::Value::String(s)) if validate_uid(&s).is_ok() => s,
        _ => return Err(ApiError::bad_request("`uid` must be a uid")),
    };
    let at = unix_now();
    shared.kicks.record(&uid, at, at).map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!(
                "{e}: at most auth.max_kicks = {}",
                shared.cfg.auth.max_kicks
            ),
        )
    })?;
    let (reply, answer) = oneshot::channel();
    let kick = Command::Kick {
        uid: Arc::from(uid.as_str()),
        at,
        reply: Some(reply),
    };
    // If the owner cannot be asked, the kick still holds (every node refuses the revoked
    // tokens once gossip reaches it); only the owner's sessions could not be closed now, and
    // asking again is harmless.
    let sessions = ask_owner(
        shared,
        kick,
        answer,
        "the kick is recorded, but the user's owner could not be asked to close its sessions; \
         try again"
            .into(),
    )
    .await?;
    tracing::info!(%uid, at, sessions, "kick");
    Ok(Json(json!({"uid": uid, "sessions": sessions})))
}
