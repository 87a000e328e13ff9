//! Node-to-node frames: what travels over QUIC, and its bytes.
//!
//! A peer stream starts with [`PREAMBLE`] (magic and protocol version), then carries frames,
//! each a 4-byte big-endian length followed by one version byte and a bincode 2 payload
//! (`standard()` config, size-limited). Parsing never touches a socket.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::engine::{Message, NodeId, Outcome, RoomTally};
use crate::protocol::FailReason;

/// Peer protocol version; also the version byte of every frame.
pub const VERSION: u8 = 1;

/// First bytes of every peer stream: `IMGQ` and the version.
pub const PREAMBLE: [u8; 5] = [b'I', b'M', b'G', b'Q', VERSION];

/// Largest frame accepted from a peer, in bytes.
pub const MAX_FRAME: usize = 1 << 20;

/// Largest message body that fits a frame with room to spare for the rest of a `Deliver`
/// (uids, id, varints); `limits.max_body_bytes` may not be larger.
pub const MAX_BODY: usize = MAX_FRAME - 16 * 1024;

/// Errors reading peer bytes.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream did not start with the imgate preamble of this version.
    #[error("bad preamble: not an imgate v{VERSION} peer stream")]
    Preamble,
    /// A frame's version byte is not ours.
    #[error("unsupported frame version {0}")]
    Version(u8),
    /// A frame is over [`MAX_FRAME`].
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    /// A payload did not decode.
    #[error("undecodable frame: {0}")]
    Decode(String),
}

/// A message as it travels between nodes. The fields are shared with the engine's
/// [`Message`]: forwarding one copies no string but the body (whose JSON is checked again on
/// arrival, see [`WireMessage::into_message`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireMessage {
    /// Sender uid.
    pub from: Arc<str>,
    /// Message id.
    pub id: Arc<str>,
    /// Recipient uid.
    pub to: Arc<str>,
    /// Raw JSON body text.
    pub body: Arc<str>,
    /// Taken at, ms since the epoch.
    pub ts: u64,
}

impl WireMessage {
    /// From an engine message.
    pub fn from_message(m: &Message) -> WireMessage {
        WireMessage {
            from: m.from.clone(),
            id: m.id.clone(),
            to: m.to.clone(),
            body: Arc::from(m.body.get()),
            ts: m.ts,
        }
    }

    /// Checks the fields with the rules client input follows: `from` is a uid or `$system`,
    /// `to` is a uid, `id` is 1 to 64 bytes, the body at most `max_body` bytes. A peer holds
    /// the cluster secret, but a bug or a compromised node must not smuggle in what no client
    /// could send.
    ///
    /// # Errors
    /// Which rule is broken.
    pub fn check(&self, max_body: usize) -> Result<(), &'static str> {
        crate::uid::validate_sender(&self.from).map_err(|_| "from is not a uid")?;
        crate::uid::validate_uid(&self.to).map_err(|_| "to is not a uid")?;
        if self.id.is_empty() || self.id.len() > crate::protocol::MAX_ID_BYTES {
            return Err("id must be 1 to 64 bytes");
        }
        if self.body.len() > max_body {
            return Err("body over limits.max_body_bytes");
        }
        Ok(())
    }

    /// A room message as it travels to the room's owner and to the members' nodes: `to` is
    /// the room.
    pub fn from_room_message(m: &Message, room: &Arc<str>) -> WireMessage {
        WireMessage {
            to: room.clone(),
            ..WireMessage::from_message(m)
        }
    }

    /// Into an engine message; `None` if the body is not JSON. The body is parsed once more
    /// (without allocating) because it came from another process: a node must not hand its
    /// clients what no client could send, even from a peer with a bug.
    pub fn into_message(self, transient: bool) -> Option<Message> {
        let body: &RawValue = serde_json::from_str(&self.body).ok()?;
        Some(Message {
            body: Arc::from(body.to_owned()),
            from: self.from,
            id: self.id,
            to: self.to,
            ts: self.ts,
            transient,
            room: None,
            except: None,
        })
    }
}

/// The outcome of a forwarded message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireOutcome {
    /// Acked by a session of the recipient.
    Delivered,
    /// Ended in `failed`.
    Failed(FailReason),
}

impl From<Outcome> for WireOutcome {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Delivered => WireOutcome::Delivered,
            Outcome::Failed(r) => WireOutcome::Failed(r),
        }
    }
}

impl From<WireOutcome> for Outcome {
    fn from(o: WireOutcome) -> Self {
        match o {
            WireOutcome::Delivered => Outcome::Delivered,
            WireOutcome::Failed(r) => Outcome::Failed(r),
        }
    }
}

/// What a room request is answered (to a peer in `RoomReply`, to the HTTP API as
/// [`crate::relay::Answer::Room`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoomAnswer {
    /// Joined; the room's members now.
    Joined(u32),
    /// Left (or was not a member).
    Left,
    /// Refused at once: `forbidden`, `limit`, `unreachable`, `rate_limited`, `invalid`.
    Refused(FailReason),
    /// A room send ended for every member.
    Result(RoomTally),
    /// The room as its owner sees it.
    Info {
        /// The room's owner.
        node: NodeId,
        /// Members.
        members: u32,
        /// Members with a live session.
        online: u32,
        /// Up to 1000 member uids, sorted.
        uids: Vec<Arc<str>>,
    },
}

/// What a `RoomSync` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SyncKind {
    /// From a member's owner to the room's owner: these users are members.
    ToRoomOwner,
    /// From a room's owner to a member's owner: these users are members.
    ToMemberOwner,
    /// A room's old owner hands its rooms to their new owner.
    RoomHandOver,
    /// A user's old owner hands its memberships to their new owner.
    UserHandOver,
    /// From a room's owner to the room's successor (the next node of its preference list):
    /// memberships whose user it owns too, which no other node would know if it died.
    Backup,
    /// From the room's successor to the room's owner whose link came up again (it may have
    /// restarted empty): the copies it keeps.
    Restore,
}

/// A node-to-node frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerFrame {
    /// First frame of a stream: who is speaking.
    Hello {
        /// Sender node id.
        node: String,
        /// Sender's cluster id.
        cluster: String,
    },
    /// Deliver `msg`, whose recipient the receiver owns; answer with `Outcome { tag }`.
    Deliver {
        /// Sender-chosen tag to match the outcome.
        tag: u64,
        /// Times the message was already forwarded (bounds re-forwarding during a ring change).
        hops: u8,
        /// The message.
        msg: WireMessage,
    },
    /// How a `Deliver` ended.
    Outcome {
        /// The `Deliver`'s tag.
        tag: u64,
        /// Its outcome.
        outcome: WireOutcome,
    },
    /// How many sessions `uid` has at the receiver.
    PresenceQuery {
        /// Request number.
        req: u64,
        /// The uid.
        uid: String,
    },
    /// Answer to `PresenceQuery`.
    PresenceAnswer {
        /// Request number.
        req: u64,
        /// Live sessions.
        sessions: u32,
    },
    /// `uid` was kicked at `at` (unix seconds): revoke its tokens issued up to then and close
    /// its sessions; answer with `KickAnswer`.
    Kick {
        /// Request number.
        req: u64,
        /// The uid.
        uid: String,
        /// Kick time, unix seconds.
        at: u64,
    },
    /// Answer to `Kick`.
    KickAnswer {
        /// Request number.
        req: u64,
        /// Sessions closed.
        sessions: u32,
    },
    /// `Deliver` of a transient message (no hold, no retry, no dedup memory). A variant of its
    /// own, added after the others, so that the frames of version 1 keep their bytes.
    DeliverTransient {
        /// Sender-chosen tag to match the outcome.
        tag: u64,
        /// Times the message was already forwarded.
        hops: u8,
        /// The message.
        msg: WireMessage,
    },
    // Rooms (added after the others: the frames above keep their bytes).
    /// Member owner to room owner: make `uid` a member; answer `RoomReply`.
    RoomJoin {
        /// Request number.
        req: u64,
        /// The room.
        room: Arc<str>,
        /// The user.
        uid: Arc<str>,
    },
    /// Member owner to room owner (or to the room's successor, which may keep a copy): `uid`
    /// left the room; answered `RoomReply` `Left`.
    RoomLeave {
        /// Request number.
        req: u64,
        /// The room.
        room: Arc<str>,
        /// The user.
        uid: Arc<str>,
    },
    /// To a user's owner (from the HTTP API's node): add or remove a membership; answer
    /// `RoomReply`.
    RoomMember {
        /// Request number.
        req: u64,
        /// The room.
        room: Arc<str>,
        /// The user.
        uid: Arc<str>,
        /// Join (true) or leave.
        join: bool,
    },
    /// To the room's owner: send `msg` (whose `to` is the room) to every member; answer
    /// `RoomReply` with the result.
    RoomSend {
        /// Request number.
        req: u64,
        /// The message; `to` is the room.
        msg: WireMessage,
        /// Transient (no hold, no retry, no dedup memory).
        transient: bool,
        /// The sending session on the sender's node, which must not get the message.
        except: Option<u64>,
        /// The sender's owner knows the sender is a member (else the room's owner checks it,
        /// and refuses `forbidden` a sender it does not know either).
        vouched: bool,
    },
    /// Room owner to a member's node: deliver `msg` to these members; answer `RoomTally`
    /// once every delivery ended.
    RoomDeliver {
        /// The room owner's tag.
        tag: u64,
        /// The message; `to` is the room.
        msg: WireMessage,
        /// Transient.
        transient: bool,
        /// The members on the receiver.
        uids: Vec<Arc<str>>,
        /// The sending session, when the receiver is the sender's node.
        except: Option<u64>,
    },
    /// Room owner to a member's node: how many of these members have a live session; answer
    /// `RoomTally` (`delivered` counts the online ones).
    RoomOnline {
        /// The room owner's tag.
        tag: u64,
        /// The members.
        uids: Vec<Arc<str>>,
    },
    /// Answer to `RoomDeliver` and `RoomOnline`.
    RoomTally {
        /// Their tag.
        tag: u64,
        /// Outcomes; `members` is the number of uids asked about.
        tally: RoomTally,
    },
    /// To the room's owner: the room's members and how many are online; answer `RoomReply`.
    RoomQuery {
        /// Request number.
        req: u64,
        /// The room.
        room: Arc<str>,
    },
    /// Answer to `RoomJoin`, `RoomMember`, `RoomSend` and `RoomQuery`.
    RoomReply {
        /// Request number.
        req: u64,
        /// The answer.
        answer: RoomAnswer,
    },
    /// Memberships re-announced or handed over after a ring change: `(room, uid)` pairs.
    RoomSync {
        /// Which side learns them.
        kind: SyncKind,
        /// `(room, uid)` pairs.
        entries: Vec<(Arc<str>, Arc<str>)>,
    },
    /// A room message for one member, passed on to the member's owner (a `Deliver` with the
    /// room); answered `Outcome`.
    DeliverRoom {
        /// Sender-chosen tag to match the outcome.
        tag: u64,
        /// Times the message was already forwarded.
        hops: u8,
        /// The message; `to` is the member.
        msg: WireMessage,
        /// The room.
        room: Arc<str>,
        /// Transient.
        transient: bool,
    },
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

/// Appends one length-prefixed frame to `buf`.
pub fn encode(frame: &PeerFrame, buf: &mut BytesMut) {
    let start = buf.len();
    buf.put_u32(0);
    buf.put_u8(VERSION);
    let mut writer = buf.writer();
    bincode::serde::encode_into_std_write(frame, &mut writer, config())
        .expect("peer frames encode");
    let buf = writer.into_inner();
    let len = (buf.len() - start - 4) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Decodes one frame body (without its length prefix).
///
/// # Errors
/// [`WireError`] for another version or an undecodable payload.
pub fn decode(mut body: Bytes) -> Result<PeerFrame, WireError> {
    if body.is_empty() {
        return Err(WireError::Decode("empty frame".into()));
    }
    let version = body.get_u8();
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let (frame, used) = bincode::serde::decode_from_slice::<PeerFrame, _>(&body, config())
        .map_err(|e| WireError::Decode(e.to_string()))?;
    if used != body.len() {
        return Err(WireError::Decode("trailing bytes".into()));
    }
    Ok(frame)
}

/// Checks a stream preamble.
///
/// # Errors
/// [`WireError::Preamble`] if it is not ours.
pub fn check_preamble(bytes: &[u8; 5]) -> Result<(), WireError> {
    if *bytes == PREAMBLE {
        Ok(())
    } else {
        Err(WireError::Preamble)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer's length prefix of 4 GB, or a string length of 4 GB inside a frame, is refused
    /// without allocating it.
    #[test]
    fn huge_lengths_are_refused_without_allocating() {
        use tokio_util::codec::Decoder;
        let mut codec = tokio_util::codec::LengthDelimitedCodec::builder()
            .max_frame_length(MAX_FRAME)
            .new_codec();
        let mut buf = BytesMut::from(&[0xFF, 0xFF, 0xFF, 0xFF, VERSION, 0, 0][..]);
        assert!(codec.decode(&mut buf).is_err(), "4 GB length prefix");
        // Deliver { tag: 7, hops: 0, msg.from: <length 2^32> ... }
        let mut body = vec![VERSION, 1, 7, 0, 253];
        body.extend_from_slice(&(1u64 << 32).to_le_bytes());
        body.extend_from_slice(b"abc");
        assert!(decode(Bytes::from(body)).is_err(), "4 GB string length");
    }

    #[test]
    fn peer_messages_follow_the_client_rules() {
        let good = WireMessage {
            from: "alice".into(),
            id: "m1".into(),
            to: "bob".into(),
            body: "\"hi\"".into(),
            ts: 1,
        };
        assert_eq!(good.check(64), Ok(()));
        let system = WireMessage {
            from: "$system".into(),
            ..good.clone()
        };
        assert_eq!(system.check(64), Ok(()));
        type Break = fn(&mut WireMessage);
        let cases: [(&str, Break); 6] = [
            ("from", |m| m.from = "a\u{1b}b".into()),
            ("from", |m| m.from = "".into()),
            ("to", |m| m.to = "x".repeat(129).into()),
            ("id", |m| m.id = "".into()),
            ("id", |m| m.id = "i".repeat(65).into()),
            ("body", |m| m.body = "1".repeat(65).into()),
        ];
        for (what, breaks) in cases {
            let mut m = good.clone();
            breaks(&mut m);
            let err = m.check(64).unwrap_err();
            assert!(err.starts_with(what), "{what}: {err}");
        }
    }

    fn frames() -> Vec<PeerFrame> {
        vec![
            PeerFrame::Hello {
                node: "n1".into(),
                cluster: "c".into(),
            },
            PeerFrame::Deliver {
                tag: 7,
                hops: 0,
                msg: WireMessage {
                    from: "alice".into(),
                    id: "m1".into(),
                    to: "bob".into(),
                    body: r#"{"t":"hi ✓"}"#.into(),
                    ts: 1_700_000_000_000,
                },
            },
            PeerFrame::Outcome {
                tag: 7,
                outcome: WireOutcome::Failed(FailReason::Offline),
            },
            PeerFrame::Outcome {
                tag: 8,
                outcome: WireOutcome::Delivered,
            },
            PeerFrame::PresenceQuery {
                req: 1,
                uid: "bob".into(),
            },
            PeerFrame::Kick {
                req: 2,
                uid: "bob".into(),
                at: 1_700_000_000,
            },
            PeerFrame::KickAnswer {
                req: 2,
                sessions: 3,
            },
            PeerFrame::PresenceAnswer {
                req: 1,
                sessions: 2,
            },
        ]
    }

    #[test]
    fn round_trip_with_length_prefix() {
        let mut buf = BytesMut::new();
        for f in frames() {
            encode(&f, &mut buf);
        }
        let mut bytes = buf.freeze();
        for f in frames() {
            let len = bytes.get_u32() as usize;
            let body = bytes.split_to(len);
            assert_eq!(decode(body).unwrap(), f);
        }
        assert!(bytes.is_empty());
    }

    #[test]
    fn refuses_other_versions_and_garbage() {
        let mut buf = BytesMut::new();
        encode(&frames()[0], &mut buf);
        let mut body = buf.split_off(4);
        body[0] = 2;
        assert!(matches!(decode(body.freeze()), Err(WireError::Version(2))));
        assert!(decode(Bytes::from_static(&[VERSION, 0xff, 0xff, 0xff])).is_err());
        assert!(decode(Bytes::new()).is_err());
        assert!(check_preamble(b"IMGQ\x01").is_ok());
        assert!(check_preamble(b"HTTP/").is_err());
    }

    #[test]
    fn message_conversion_keeps_the_body_text() {
        let w = WireMessage {
            from: "a".into(),
            id: "i".into(),
            to: "b".into(),
            body: "[1, 2]".into(),
            ts: 3,
        };
        let m = w.clone().into_message(false).unwrap();
        assert_eq!(m.body.get(), "[1, 2]");
        assert_eq!(WireMessage::from_message(&m), w);
        let bad = WireMessage {
            body: "{".into(),
            ..w
        };
        assert!(bad.into_message(false).is_none());
    }
}
