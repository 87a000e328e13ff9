//! The client WebSocket protocol: parsing client frames and encoding node frames.
//!
//! Parsing never touches a socket and never panics: any text yields either a request or a
//! [`FrameError`] that the session answers with an `error` frame (or `failed`, for a `send`
//! whose `id` could be read; see delivery rule 1 of the protocol).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::uid::validate_uid;

/// Longest message `id`, in bytes.
pub const MAX_ID_BYTES: usize = 64;

/// A message body: raw JSON text, shared by every push of the message.
pub type Body = Arc<RawValue>;

/// A request read from a client frame.
#[derive(Debug, Clone)]
pub enum ClientFrame {
    /// `send`.
    Send {
        /// Sender-chosen message id.
        id: String,
        /// Recipient uid.
        to: String,
        /// Raw JSON body.
        body: Body,
        /// `"transient": true`: no hold, no retry, no dedup memory (typing indicators).
        transient: bool,
    },
    /// `send` with `room` instead of `to`: to every member of the room.
    RoomSend {
        /// Sender-chosen message id.
        id: String,
        /// The room.
        room: String,
        /// Raw JSON body.
        body: Body,
        /// No hold, no retry, no dedup memory.
        transient: bool,
    },
    /// `join`: make this user a member of `room`.
    Join {
        /// The room.
        room: String,
        /// Optional request id, echoed in the answer.
        id: Option<String>,
    },
    /// `leave`: end this user's membership of `room`.
    Leave {
        /// The room.
        room: String,
        /// Optional request id, echoed in the answer.
        id: Option<String>,
    },
    /// `ack`.
    Ack {
        /// The acked `seq`.
        seq: u64,
    },
    /// `ping`.
    Ping,
    /// `refresh`: a new token for the same uid, to keep the session past its token's expiry.
    Refresh {
        /// The new JWT.
        token: String,
    },
}

/// Why the frame was refused; maps to an `error` frame or, with an id, a `failed` outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Not a JSON object, no `type`, or a field of the wrong kind: `error` with `bad_frame`.
    BadFrame(String),
    /// A `type` this node does not know: `error` with `unknown_type`.
    UnknownType(String),
    /// A `send` with a usable `id` that is refused on the spot: `failed` with `reason`.
    Refused {
        /// The message id.
        id: String,
        /// The recipient as sent, or empty when it was not a string.
        to: String,
        /// The failure reason.
        reason: FailReason,
    },
    /// A room `send`, `join` or `leave` refused on the spot: `failed` `{id, room, reason}`, or
    /// `error` when it carries no id.
    RoomRefused {
        /// The id, when the frame had a usable one.
        id: Option<String>,
        /// The room as sent, or empty when it was not a string.
        room: String,
        /// The failure reason.
        reason: FailReason,
        /// Human text for the `error` frame.
        message: &'static str,
    },
}

/// Why a message will not be delivered (the `reason` of a `failed` frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailReason {
    /// The recipient had no session within `hold_ms`.
    Offline,
    /// No session acked within the retries.
    Timeout,
    /// The recipient's owner could not be reached.
    Unreachable,
    /// The body was over `max_body`.
    TooLarge,
    /// A per-session or per-node limit refused the send.
    RateLimited,
    /// The request was not acceptable (bad `to`, ...).
    Invalid,
    /// A room send from a user who is not a member of the room.
    Forbidden,
    /// A join beyond `limits.max_rooms_per_user` or `limits.max_members_per_room`.
    Limit,
}

impl FailReason {
    /// Every reason, for metrics labels.
    pub const ALL: [FailReason; 8] = [
        FailReason::Offline,
        FailReason::Timeout,
        FailReason::Unreachable,
        FailReason::TooLarge,
        FailReason::RateLimited,
        FailReason::Invalid,
        FailReason::Forbidden,
        FailReason::Limit,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::Offline => "offline",
            FailReason::Timeout => "timeout",
            FailReason::Unreachable => "unreachable",
            FailReason::TooLarge => "too_large",
            FailReason::RateLimited => "rate_limited",
            FailReason::Invalid => "invalid",
            FailReason::Forbidden => "forbidden",
            FailReason::Limit => "limit",
        }
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    ty: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    to: Option<&'a RawValue>,
    #[serde(borrow)]
    body: Option<&'a RawValue>,
    #[serde(borrow)]
    seq: Option<&'a RawValue>,
    #[serde(borrow)]
    token: Option<&'a RawValue>,
    #[serde(borrow)]
    transient: Option<&'a RawValue>,
    #[serde(borrow)]
    room: Option<&'a RawValue>,
}

fn as_string(raw: Option<&RawValue>) -> Option<String> {
    raw.and_then(|r| serde_json::from_str::<String>(r.get()).ok())
}

/// Parses one text frame. `max_body` is the largest encoded body accepted.
///
/// # Errors
/// [`FrameError`] describing what the session must answer.
pub fn parse_client_frame(text: &str, max_body: usize) -> Result<ClientFrame, FrameError> {
    // serde's derived structs also accept JSON arrays (fields by position): refuse them.
    if !text.trim_start().starts_with('{') {
        return Err(FrameError::BadFrame(
            "frame must be a JSON object with a `type`".into(),
        ));
    }
    let env: Envelope<'_> = serde_json::from_str(text).map_err(|e| {
        FrameError::BadFrame(format!("frame must be a JSON object with a `type`: {e}"))
    })?;
    let ty =
        as_string(env.ty).ok_or_else(|| FrameError::BadFrame("`type` must be a string".into()))?;
    match ty.as_str() {
        "send" => {
            let id = as_string(env.id)
                .filter(|id| !id.is_empty() && id.len() <= MAX_ID_BYTES)
                .ok_or_else(|| {
                    FrameError::BadFrame("`send` needs an `id`: a string of 1 to 64 bytes".into())
                })?;
            if env.room.is_some() {
                return parse_room_send(id, &env, max_body);
            }
            let to = as_string(env.to);
            let Some(to) = to.filter(|t| validate_uid(t).is_ok()) else {
                return Err(FrameError::Refused {
                    to: as_string(env.to).unwrap_or_default(),
                    id,
                    reason: FailReason::Invalid,
                });
            };
            let body = env.body.unwrap_or(RawValue::NULL);
            if body.get().len() > max_body {
                return Err(FrameError::Refused {
                    id,
                    to,
                    reason: FailReason::TooLarge,
                });
            }
            let transient = match env.transient.map(RawValue::get) {
                None | Some("false") => false,
                Some("true") => true,
                Some(_) => {
                    return Err(FrameError::Refused {
                        id,
                        to,
                        reason: FailReason::Invalid,
                    });
                }
            };
            // The frame's parse validated the body: it is copied, not parsed again.
            let body: Body = Arc::from(body.to_owned());
            Ok(ClientFrame::Send {
                id,
                to,
                body,
                transient,
            })
        }
        "join" | "leave" => {
            let id = match env.id {
                None => None,
                Some(raw) => Some(
                    as_string(Some(raw))
                        .filter(|id| !id.is_empty() && id.len() <= MAX_ID_BYTES)
                        .ok_or_else(|| {
                            FrameError::BadFrame("`id` must be a string of 1 to 64 bytes".into())
                        })?,
                ),
            };
            let room = room_of(&env, id.clone())?;
            Ok(if ty == "join" {
                ClientFrame::Join { room, id }
            } else {
                ClientFrame::Leave { room, id }
            })
        }
        "ack" => {
            let seq = env
                .seq
                .and_then(|r| serde_json::from_str::<u64>(r.get()).ok())
                .ok_or_else(|| {
                    FrameError::BadFrame("`ack` needs `seq`: a non-negative integer".into())
                })?;
            Ok(ClientFrame::Ack { seq })
        }
        "ping" => Ok(ClientFrame::Ping),
        "refresh" => {
            let token = as_string(env.token)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    FrameError::BadFrame("`refresh` needs `token`: a non-empty string".into())
                })?;
            Ok(ClientFrame::Refresh { token })
        }
        other => {
            let shown: String = other.chars().take(64).collect();
            Err(FrameError::UnknownType(shown))
        }
    }
}

/// The frame's `room`, checked with the id rules.
fn room_of(env: &Envelope<'_>, id: Option<String>) -> Result<String, FrameError> {
    match as_string(env.room) {
        Some(room) if validate_uid(&room).is_ok() => Ok(room),
        other => Err(FrameError::RoomRefused {
            id,
            room: other.unwrap_or_default(),
            reason: FailReason::Invalid,
            message: "`room` must be a room id: 1 to 128 bytes, no control or format \
                      characters, not starting with `$`",
        }),
    }
}

/// A `send` with `room`: `to` must be absent.
fn parse_room_send(
    id: String,
    env: &Envelope<'_>,
    max_body: usize,
) -> Result<ClientFrame, FrameError> {
    let room = room_of(env, Some(id.clone()))?;
    let refused = |reason, message| FrameError::RoomRefused {
        id: Some(id.clone()),
        room: room.clone(),
        reason,
        message,
    };
    if env.to.is_some() {
        return Err(refused(
            FailReason::Invalid,
            "a `send` names `to` or `room`, not both",
        ));
    }
    let body = env.body.unwrap_or(RawValue::NULL);
    if body.get().len() > max_body {
        return Err(refused(FailReason::TooLarge, "body over the limit"));
    }
    let transient = match env.transient.map(RawValue::get) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return Err(refused(
                FailReason::Invalid,
                "`transient` must be true or false",
            ));
        }
    };
    Ok(ClientFrame::RoomSend {
        body: Arc::from(body.to_owned()),
        id,
        room,
        transient,
    })
}

/// For a frame over the size limit: if it is a `send` with a usable id, the `failed:
/// too_large` it gets (delivery rule 1); otherwise the `error` frame.
pub fn oversize_answer(text: &str, max_frame: usize) -> ServerFrame {
    match parse_client_frame(text, 0) {
        Err(FrameError::Refused { id, to, .. }) => {
            return ServerFrame::Failed {
                id: id.as_str().into(),
                to: to.as_str().into(),
                reason: FailReason::TooLarge,
            };
        }
        Err(FrameError::RoomRefused {
            id: Some(id), room, ..
        }) => {
            return ServerFrame::RoomFailed {
                id: Some(id.as_str().into()),
                room: room.as_str().into(),
                reason: FailReason::TooLarge,
            };
        }
        _ => {}
    }
    ServerFrame::Error {
        code: "too_large",
        message: format!(
            "frame of {} bytes is over the limit of {max_frame}",
            text.len()
        ),
        id: None,
    }
}

/// A frame from the node to a client.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// First frame of a live session.
    Welcome {
        /// The session's uid.
        uid: String,
        /// This node's id.
        node: String,
        /// Session id, unique on the node.
        session: String,
        /// The rooms this user is a member of.
        rooms: Vec<Arc<str>>,
    },
    /// A message.
    Msg {
        /// Per-session sequence number.
        seq: u64,
        /// Sender uid.
        from: Arc<str>,
        /// Sender's message id.
        id: Arc<str>,
        /// Raw JSON body.
        body: Body,
        /// Milliseconds since the epoch when the sender's node took it.
        ts: u64,
        /// The room, for a room message.
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<Arc<str>>,
    },
    /// Answer to `join`.
    Joined {
        /// The room.
        room: Arc<str>,
        /// Its members now.
        members: u32,
        /// The `join`'s id, when it had one.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Arc<str>>,
    },
    /// Answer to `leave`.
    Left {
        /// The room.
        room: Arc<str>,
        /// The `leave`'s id, when it had one.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Arc<str>>,
    },
    /// How a room send ended, once every member's delivery ended.
    RoomResult {
        /// Message id.
        id: Arc<str>,
        /// The room.
        room: Arc<str>,
        /// Members it went to (the sender included: its other sessions get it).
        members: u32,
        /// Members with a session that acked.
        delivered: u32,
        /// Members with no session within the hold time.
        offline: u32,
        /// Members whose delivery failed otherwise.
        failed: u32,
    },
    /// A room `send`, `join` or `leave` refused at once.
    #[serde(rename = "failed")]
    RoomFailed {
        /// The frame's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<Arc<str>>,
        /// The room.
        room: Arc<str>,
        /// Why.
        reason: FailReason,
    },
    /// End-to-end ack.
    Delivered {
        /// Message id.
        id: Arc<str>,
        /// Recipient.
        to: Arc<str>,
    },
    /// Final failure.
    Failed {
        /// Message id.
        id: Arc<str>,
        /// Recipient.
        to: Arc<str>,
        /// Why.
        reason: FailReason,
    },
    /// Answer to `ping`.
    Pong,
    /// Answer to a `refresh` whose token was accepted.
    Refreshed {
        /// The new token's `exp`, unix seconds: the session lives until then (plus the leeway).
        expires_at: u64,
    },
    /// A frame that could not be processed.
    Error {
        /// Machine-readable code.
        code: &'static str,
        /// Human text.
        message: String,
        /// The id of the frame, when it had one.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// Reconnect at `url`.
    Moved {
        /// The owner's WebSocket URL.
        url: String,
        /// The owner's node id.
        node: String,
    },
}

impl ServerFrame {
    /// JSON text of the frame.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }

    /// The `error` frame answering a [`FrameError`] that has no id.
    pub fn from_frame_error(err: &FrameError) -> ServerFrame {
        match err {
            FrameError::BadFrame(m) => ServerFrame::Error {
                code: "bad_frame",
                message: m.clone(),
                id: None,
            },
            FrameError::UnknownType(t) => ServerFrame::Error {
                code: "unknown_type",
                message: format!("unknown frame type `{t}`"),
                id: None,
            },
            FrameError::Refused { id, to, reason } => ServerFrame::Failed {
                id: id.as_str().into(),
                to: to.as_str().into(),
                reason: *reason,
            },
            FrameError::RoomRefused {
                id: Some(id),
                room,
                reason,
                ..
            } => ServerFrame::RoomFailed {
                id: Some(id.as_str().into()),
                room: room.as_str().into(),
                reason: *reason,
            },
            FrameError::RoomRefused {
                id: None, message, ..
            } => ServerFrame::Error {
                code: "bad_frame",
                message: (*message).to_string(),
                id: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ClientFrame, FrameError> {
        parse_client_frame(s, 16)
    }

    #[test]
    fn parses_requests() {
        match parse(r#"{"type":"send","id":"m1","to":"bob","body":{"t":"hi"},"x":1}"#).unwrap() {
            ClientFrame::Send {
                id,
                to,
                body,
                transient,
            } => {
                assert!(!transient);
                assert_eq!((id.as_str(), to.as_str()), ("m1", "bob"));
                assert_eq!(body.get(), r#"{"t":"hi"}"#);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(r#"{"type":"ack","seq":7}"#),
            Ok(ClientFrame::Ack { seq: 7 })
        ));
        assert!(matches!(parse(r#"{"type":"ping"}"#), Ok(ClientFrame::Ping)));
        assert!(matches!(
            parse(r#"{"type":"refresh","token":"a.b.c"}"#),
            Ok(ClientFrame::Refresh { token }) if token == "a.b.c"
        ));
    }

    #[test]
    fn classifies_errors() {
        for bad in [
            "",
            "nope",
            "[1]",
            "3",
            r#"{"type":1}"#,
            r#"{"x":1}"#,
            r#"{"type":"send","to":"bob"}"#,
            r#"{"type":"send","id":"","to":"bob"}"#,
            r#"{"type":"send","id":5,"to":"bob"}"#,
            r#"{"type":"ack"}"#,
            r#"{"type":"ack","seq":-1}"#,
            r#"{"type":"ack","seq":"1"}"#,
            r#"{"type":"refresh"}"#,
            r#"{"type":"refresh","token":""}"#,
            r#"{"type":"refresh","token":5}"#,
        ] {
            assert!(
                matches!(parse(bad), Err(FrameError::BadFrame(_))),
                "{bad}: {:?}",
                parse(bad)
            );
        }
        let long_id = format!(r#"{{"type":"send","id":"{}","to":"b"}}"#, "x".repeat(65));
        assert!(matches!(parse(&long_id), Err(FrameError::BadFrame(_))));
        assert!(matches!(
            parse(r#"{"type":"fly"}"#),
            Err(FrameError::UnknownType(t)) if t == "fly"
        ));
        assert!(matches!(
            parse(r#"{"type":"send","id":"m","to":""}"#),
            Err(FrameError::Refused {
                reason: FailReason::Invalid,
                ..
            })
        ));
        assert!(matches!(
            parse(r#"{"type":"send","id":"m","to":7}"#),
            Err(FrameError::Refused {
                reason: FailReason::Invalid,
                ..
            })
        ));
        assert!(matches!(
            parse(r#"{"type":"send","id":"m","to":"b","body":"01234567890123456789"}"#),
            Err(FrameError::Refused {
                reason: FailReason::TooLarge,
                ..
            })
        ));
    }

    #[test]
    fn arrays_are_not_frames() {
        for bad in [
            r#"["ping",null,null,null,null]"#,
            r#"["send","m1","bob",1,null]"#,
            " [1]",
        ] {
            assert!(matches!(parse(bad), Err(FrameError::BadFrame(_))), "{bad}");
        }
    }

    #[test]
    fn oversize_send_with_id_fails_too_large() {
        let big = r#"{"type":"send","id":"m9","to":"bob","body":"xxxxxxxx"}"#;
        match oversize_answer(big, 10) {
            ServerFrame::Failed { id, reason, .. } => {
                assert_eq!((&*id, reason), ("m9", FailReason::TooLarge));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            oversize_answer(r#"{"type":"ping","pad":"xxxxxxxxxxxx"}"#, 10),
            ServerFrame::Error {
                code: "too_large",
                ..
            }
        ));
        assert!(matches!(
            oversize_answer("not json at all", 3),
            ServerFrame::Error { .. }
        ));
    }

    #[test]
    fn missing_body_is_null() {
        match parse(r#"{"type":"send","id":"m","to":"b"}"#).unwrap() {
            ClientFrame::Send { body, .. } => assert_eq!(body.get(), "null"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn server_frames_encode() {
        let f = ServerFrame::Msg {
            seq: 1,
            from: "a".into(),
            id: "m".into(),
            body: Arc::from(RawValue::from_string("{\"x\":[1,2]}".into()).unwrap()),
            ts: 5,
            room: None,
        };
        assert_eq!(
            f.to_json(),
            r#"{"type":"msg","seq":1,"from":"a","id":"m","body":{"x":[1,2]},"ts":5}"#
        );
        assert_eq!(ServerFrame::Pong.to_json(), r#"{"type":"pong"}"#);
        let failed = ServerFrame::Failed {
            id: "m".into(),
            to: "b".into(),
            reason: FailReason::RateLimited,
        };
        assert_eq!(
            failed.to_json(),
            r#"{"type":"failed","id":"m","to":"b","reason":"rate_limited"}"#
        );
    }
}
