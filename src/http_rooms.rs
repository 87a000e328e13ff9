//! The rooms API: `POST /api/rooms/{room}/members`, `DELETE /api/rooms/{room}/members/{uid}`,
//! `GET /api/rooms/{room}`, `POST /api/rooms/{room}/push`. Every route needs the API key.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use super::{
    ApiError, AppState, MAX_WAIT_MS, api_request, check_api_key, check_percent_encoding, push_body,
    push_id,
};
use crate::engine::Message;
use crate::protocol::FailReason;
use crate::relay::Answer;
use crate::state::{Command, Shared};
use crate::uid::validate_uid;
use crate::wire::RoomAnswer;

/// How long the API waits for a membership change or a room query.
const ASK_WAIT: Duration = Duration::from_secs(3);

fn check_room(room: &str) -> Result<(), ApiError> {
    validate_uid(room).map_err(|why| {
        ApiError::bad_request(format!(
            "`{{room}}` must be a room id (the uid rules): {why}"
        ))
    })
}

/// The checks every rooms route makes first, in order: the API key (401), the path's
/// percent-encoding and the room id (400).
fn check_request(
    shared: &Shared,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
    room: &str,
) -> Result<(), ApiError> {
    check_api_key(shared, headers)?;
    check_percent_encoding(uri)?;
    check_room(room)
}

fn limit_error(shared: &Shared) -> ApiError {
    let l = &shared.cfg.limits;
    ApiError::new(
        StatusCode::CONFLICT,
        "limit",
        format!(
            "over limits.max_rooms_per_user = {}, limits.max_members_per_room = {} or \
             limits.max_room_memberships = {}",
            l.max_rooms_per_user, l.max_members_per_room, l.max_room_memberships
        ),
    )
}

fn unreachable(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unreachable",
        format!("{what} could not be asked; try again"),
    )
}

fn busy(shared: &Shared) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "busy",
        format!(
            "too many requests wait for answers (limits.max_pending_requests = {})",
            shared.cfg.limits.max_pending_requests
        ),
    )
}

/// Hands `cmd` to the driver and waits up to `wait` for its room answer.
async fn ask(
    shared: &Shared,
    cmd: Command,
    answer: oneshot::Receiver<Answer>,
    wait: Duration,
) -> Result<Option<RoomAnswer>, ApiError> {
    shared
        .engine
        .send(cmd)
        .await
        .map_err(|_| ApiError::stopping())?;
    match tokio::time::timeout(wait, answer).await {
        Ok(Ok(Answer::Room(a))) => Ok(Some(a)),
        Ok(Ok(Answer::Busy)) => Err(busy(shared)),
        Ok(Ok(_)) => Err(unreachable("the owner node")),
        Ok(Err(_)) => Err(ApiError::stopping()),
        Err(_) => Ok(None),
    }
}

#[derive(Deserialize)]
pub(super) struct MemberBody {
    uid: Option<serde_json::Value>,
}

/// `POST /api/rooms/{room}/members` `{"uid"}`: makes `uid` a member. 200
/// `{"room", "uid", "members"}`; 409 `limit`.
pub(super) async fn add_member(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Path(room): Path<String>,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let shared = &state.shared;
    check_request(shared, &headers, &uri, &room)?;
    let limit = shared.cfg.limits.max_login_body_bytes;
    let req: MemberBody = api_request(shared, &headers, body, limit).await?;
    let uid = match req.uid {
        Some(serde_json::Value::String(s)) if validate_uid(&s).is_ok() => s,
        _ => return Err(ApiError::bad_request("`uid` must be a uid")),
    };
    match member(shared, &room, &uid, true).await? {
        RoomAnswer::Joined(members) => {
            tracing::info!(%room, %uid, members, "member added");
            Ok(Json(json!({"room": room, "uid": uid, "members": members})))
        }
        RoomAnswer::Refused(FailReason::Limit) => Err(limit_error(shared)),
        _ => Err(unreachable("the room's owner")),
    }
}

/// `DELETE /api/rooms/{room}/members/{uid}`: ends the membership (idempotent). 200
/// `{"room", "uid", "left": true}`.
pub(super) async fn remove_member(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Path((room, uid)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let shared = &state.shared;
    check_request(shared, &headers, &uri, &room)?;
    validate_uid(&uid).map_err(ApiError::bad_request)?;
    match member(shared, &room, &uid, false).await? {
        RoomAnswer::Left => Ok(Json(json!({"room": room, "uid": uid, "left": true}))),
        _ => Err(unreachable("the user's owner")),
    }
}

async fn member(
    shared: &Shared,
    room: &str,
    uid: &str,
    join: bool,
) -> Result<RoomAnswer, ApiError> {
    let (reply, answer) = oneshot::channel();
    let cmd = Command::RoomMember {
        room: Arc::from(room),
        uid: Arc::from(uid),
        join,
        reply,
    };
    ask(shared, cmd, answer, ASK_WAIT)
        .await?
        .ok_or_else(|| unreachable("the user's owner"))
}

/// `GET /api/rooms/{room}`: `{"room", "node", "members", "online", "uids"}` from the room's
/// owner; 404 `unknown_room` when it has no members.
pub(super) async fn info(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Path(room): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let shared = &state.shared;
    check_request(shared, &headers, &uri, &room)?;
    let (reply, answer) = oneshot::channel();
    let cmd = Command::RoomInfo {
        room: Arc::from(room.as_str()),
        reply,
    };
    match ask(shared, cmd, answer, ASK_WAIT).await? {
        Some(RoomAnswer::Info { members: 0, .. }) => Err(unknown_room(&room)),
        Some(RoomAnswer::Info {
            node,
            members,
            online,
            uids,
        }) => Ok(Json(json!({
            "room": room,
            "node": &*node,
            "members": members,
            "online": online,
            "uids": uids,
        }))),
        _ => Err(unreachable("the room's owner")),
    }
}

fn unknown_room(room: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "unknown_room",
        format!("room `{room}` has no members"),
    )
}

#[derive(Deserialize)]
pub(super) struct RoomPushBody {
    body: Option<Box<RawValue>>,
    id: Option<serde_json::Value>,
    wait_ms: Option<u64>,
    transient: Option<bool>,
}

/// `POST /api/rooms/{room}/push` `{"body", "id"?, "wait_ms"?, "transient"?}`: sends to every
/// member from `$system`. 200 with the `room_result` fields and `"status": "done"`, 202
/// `pending` when `wait_ms` passes first, 404 `unknown_room`.
pub(super) async fn push(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: axum::http::Uri,
    Path(room): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let shared = &state.shared;
    check_request(shared, &headers, &uri, &room)?;
    let limit = shared.cfg.limits.max_body_bytes + shared.cfg.limits.max_login_body_bytes;
    let req: RoomPushBody = api_request(shared, &headers, body, limit).await?;
    let id = push_id(req.id)?;
    let body = push_body(shared, req.body)?;
    let wait = Duration::from_millis(req.wait_ms.unwrap_or(5000).min(MAX_WAIT_MS));
    let room_id: Arc<str> = Arc::from(room.as_str());
    let msg = Message {
        transient: req.transient.unwrap_or(false),
        room: Some(room_id.clone()),
        to: room_id,
        ..Message::direct(
            crate::uid::SYSTEM_SENDER,
            &id,
            &room,
            Arc::from(body),
            crate::clock::now_ms(),
        )
    };
    let (reply, answer) = oneshot::channel();
    let cmd = Command::RoomPush { msg, reply };
    Ok(match ask(shared, cmd, answer, wait).await? {
        Some(RoomAnswer::Result(t)) if t.members == 0 => return Err(unknown_room(&room)),
        Some(RoomAnswer::Result(t)) => Json(json!({
            "status": "done",
            "id": id,
            "room": room,
            "members": t.members,
            "delivered": t.delivered,
            "offline": t.offline,
            "failed": t.failed,
        }))
        .into_response(),
        Some(RoomAnswer::Refused(reason)) => {
            Json(json!({"status": "failed", "reason": reason.as_str(), "id": id, "room": room}))
                .into_response()
        }
        Some(_) => return Err(unreachable("the room's owner")),
        None => (
            StatusCode::ACCEPTED,
            Json(json!({"status": "pending", "id": id, "room": room})),
        )
            .into_response(),
    })
}
