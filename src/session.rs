//! One WebSocket session: reads client frames, writes node frames, keeps the socket alive.
//!
//! A session is one task that owns its socket. Client frames are parsed here (so a bad frame
//! costs the relay nothing) and what the client says goes to the driver ([`crate::driver`]);
//! frames for the client arrive on the session's bounded outbox. The task also sends WebSocket pings every
//! `websocket.ping_interval_ms` and closes a socket silent for `websocket.idle_timeout_ms`.
//!
//! Every write has a deadline (`websocket.write_timeout_ms`): a client that stops reading
//! cannot pin the task, its queue or its slot in `limits.max_sessions`. Frames other than
//! `send` spend a per-session budget (`limits.other_frames_per_second`). The session lives
//! only while its token is valid: at `exp` + leeway it closes, unless a `refresh` brought a
//! newer token of the same uid.
//!
//! Close codes: 1001 node shutting down, 1002 WebSocket protocol violation, 1007 text frame
//! not UTF-8, 1009 frame too big, 4000 idle timeout, 4001 moved (also sent by the upgrade
//! handler), 4002 slow consumer (the engine's queue bound, or a write past its deadline), 4003
//! replaced by a newer session of the same user, 4004 token expired, 4005 kicked, 4008 frames
//! over the budget.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;

use crate::auth::{Claims, TokenError};
use crate::clock::unix_now;
use crate::engine::{CloseReason, SessionId};
use crate::outbox::{FrameQueue, Outbox};
use crate::protocol::{ClientFrame, FrameError, ServerFrame, parse_client_frame};
use crate::relay::{ClientEvent, SessionEnd};
use crate::state::{Command, Shared};
use crate::webhooks::Event;

/// Close code: idle timeout.
pub const CLOSE_IDLE: u16 = 4000;
/// Close code: the user's owner is another node.
pub const CLOSE_MOVED: u16 = 4001;
/// Close code: the session did not keep up with its messages.
pub const CLOSE_SLOW: u16 = 4002;
/// Close code: a newer session of the same user replaced this one.
pub const CLOSE_REPLACED: u16 = 4003;
/// Close code: the session's token expired (and no `refresh` came).
pub const CLOSE_TOKEN_EXPIRED: u16 = 4004;
/// Close code: the user was kicked (`POST /api/kick`).
pub const CLOSE_KICKED: u16 = 4005;
/// Close code: the client went on sending past its frame budget.
pub const CLOSE_FLOODING: u16 = 4008;
/// Close code: a frame over the hard size limit.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code: the node is shutting down.
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code: a WebSocket protocol violation (bad opcode, reserved bits, ...).
pub const CLOSE_PROTOCOL: u16 = 1002;
/// Close code: a text frame that is not UTF-8.
pub const CLOSE_BAD_DATA: u16 = 1007;

/// Most frames written before a flush.
const WRITE_BATCH: usize = 64;

/// How long a closing frame may take to go out before the socket is dropped anyway.
const CLOSE_WRITE: Duration = Duration::from_millis(500);

use crate::clock::now_ms;

fn close_frame(code: u16, reason: &'static str) -> WsMessage {
    WsMessage::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

/// Sends `moved` and closes with 4001, each write within `deadline`.
pub async fn send_moved(mut socket: WebSocket, url: String, node: String, deadline: Duration) {
    let frame = ServerFrame::Moved { url, node }.to_json();
    if write(&mut socket, WsMessage::Text(frame.into()), deadline)
        .await
        .is_ok()
    {
        let _ = write(&mut socket, close_frame(CLOSE_MOVED, "moved"), CLOSE_WRITE).await;
    }
}

/// Why a write did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteError {
    /// The socket is gone.
    Failed,
    /// The socket accepted nothing within the deadline.
    TimedOut,
}

impl WriteError {
    fn reason(self) -> &'static str {
        match self {
            WriteError::Failed => "write failed",
            WriteError::TimedOut => "write timeout",
        }
    }
}

/// Runs a socket write within `deadline`. A write that completes at once (the common case:
/// the socket has room) costs no timer; only a write that has to wait arms one.
async fn within<F, E>(deadline: Duration, write: F) -> Result<(), WriteError>
where
    F: std::future::Future<Output = Result<(), E>>,
{
    let mut write = std::pin::pin!(write);
    if let std::task::Poll::Ready(r) = futures_util::poll!(write.as_mut()) {
        return r.map_err(|_| WriteError::Failed);
    }
    // Boxed: the timer exists only while a write waits, not in every idle session's future.
    match Box::pin(tokio::time::timeout(deadline, write)).await {
        Ok(r) => r.map_err(|_| WriteError::Failed),
        Err(_) => Err(WriteError::TimedOut),
    }
}

/// Sends one frame, flushed, within `deadline`.
async fn write<S>(sink: &mut S, msg: WsMessage, deadline: Duration) -> Result<(), WriteError>
where
    S: futures_util::Sink<WsMessage> + Unpin,
{
    within(deadline, sink.send(msg)).await
}

/// Writes a batch of frames, each within `deadline`, then flushes once within `deadline`.
async fn write_batch<S>(
    sink: &mut S,
    batch: &mut Vec<ServerFrame>,
    deadline: Duration,
) -> Result<(), WriteError>
where
    S: futures_util::Sink<WsMessage> + Unpin,
{
    for f in batch.drain(..) {
        within(deadline, sink.feed(WsMessage::Text(f.to_json().into()))).await?;
    }
    within(deadline, sink.flush()).await
}

/// A token bucket: `rate` per second, a burst of `rate`.
#[derive(Debug)]
struct Budget {
    rate: f64,
    tokens: f64,
    refilled: Instant,
    /// Frames refused since the budget last let one through.
    refused: u64,
}

impl Budget {
    fn new(rate: u32) -> Budget {
        Budget {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            refilled: Instant::now(),
            refused: 0,
        }
    }

    /// Spends one token: `Ok` if there was one, else `Err(refused so far)`.
    fn spend(&mut self, now: Instant) -> Result<(), u64> {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused = 0;
            Ok(())
        } else {
            self.refused += 1;
            Err(self.refused)
        }
    }

    /// Refused frames after which the session is closed: another second's worth.
    fn patience(&self) -> u64 {
        self.rate as u64
    }
}

/// The instant a token expiring at `exp` (unix seconds) stops carrying a session.
fn expiry_deadline(exp: u64, leeway_s: u64) -> Instant {
    let left = exp.saturating_add(leeway_s).saturating_sub(unix_now());
    // Bounded so that a far `exp` cannot overflow the clock (tokens live at most the ttl).
    Instant::now() + Duration::from_secs(left.min(366 * 86_400))
}

/// Runs a live session on the token `claims` until it closes.
pub async fn run(shared: Arc<Shared>, socket: WebSocket, claims: Claims) {
    let session = shared.next_session_id();
    // Only what the session needs of the token lives as long as the session.
    let uid: Arc<str> = Arc::from(claims.sub.as_str());
    let (iat, exp) = (claims.iat, claims.exp);
    drop(claims);
    shared.metrics.sessions.inc();
    let mut live = false;
    let result = serve(&shared, socket, session, uid.clone(), iat, exp, &mut live).await;
    if live && let Some(w) = &shared.webhooks {
        let disconnect = Event::Disconnect {
            uid: uid.clone(),
            session,
        };
        w.emit(disconnect, now_ms());
    }
    let _ = shared
        .engine
        .send(Command::Client(ClientEvent::Close { session }))
        .await;
    shared.metrics.sessions.dec();
    shared.live_sessions.fetch_sub(1, Ordering::Relaxed);
    tracing::debug!(session, %uid, ended = result, "session closed");
}

async fn serve(
    shared: &Shared,
    socket: WebSocket,
    session: SessionId,
    uid: Arc<str>,
    iat: u64,
    exp: u64,
    live: &mut bool,
) -> &'static str {
    let deadline = Duration::from_millis(shared.cfg.websocket.write_timeout_ms);
    let (mut sink, mut stream) = socket.split();
    // The driver queues `welcome` (with the user's rooms) as the outbox's first frame.
    let (outbox, frames, mut close_rx) = Outbox::new(shared.cfg.limits.outbound_queue);
    let _closed = CloseOnDrop(frames.clone());
    let mut batch: Vec<ServerFrame> = Vec::new();
    let open = Command::Open {
        session,
        uid: uid.clone(),
        iat,
        outbox,
    };
    if shared.engine.send(open).await.is_err() {
        return "node stopping";
    }
    *live = true;
    if let Some(w) = &shared.webhooks {
        let connect = Event::Connect {
            uid: uid.clone(),
            session,
        };
        w.emit(connect, now_ms());
    }
    let limits = &shared.cfg.limits;
    let ping_every = Duration::from_millis(shared.cfg.websocket.ping_interval_ms);
    let idle = Duration::from_millis(shared.cfg.websocket.idle_timeout_ms);
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    let mut last_heard = Instant::now();
    let mut budget = Budget::new(limits.other_frames_per_second());
    let leeway = shared.tokens.leeway_s();
    let expiry = tokio::time::sleep_until(expiry_deadline(exp, leeway));
    tokio::pin!(expiry);
    // Ends the session with a close frame (best effort: a socket that accepts nothing is
    // simply dropped).
    macro_rules! close {
        ($code:expr, $text:expr) => {{
            let _ = write(&mut sink, close_frame($code, $text), CLOSE_WRITE).await;
            return $text;
        }};
    }
    // Answers the client directly; a write past its deadline ends the session.
    macro_rules! answer {
        ($frame:expr) => {{
            if let Err(e) = write(
                &mut sink,
                WsMessage::Text($frame.to_json().into()),
                deadline,
            )
            .await
            {
                if e == WriteError::TimedOut {
                    shared.metrics.write_timeouts.inc();
                }
                return e.reason();
            }
        }};
    }
    loop {
        tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => close!(CLOSE_GOING_AWAY, "node shutting down"),
            end = &mut close_rx => {
                let (code, text) = match end {
                    Ok(SessionEnd::Closed(CloseReason::SlowConsumer)) => (CLOSE_SLOW, "slow consumer"),
                    Ok(SessionEnd::Closed(CloseReason::Replaced)) => (CLOSE_REPLACED, "replaced by a newer session"),
                    Ok(SessionEnd::Closed(CloseReason::Kicked)) => (CLOSE_KICKED, "kicked"),
                    Ok(SessionEnd::Moved(owner)) => {
                        let frame = ServerFrame::Moved { url: owner.url.to_string(), node: owner.node.to_string() };
                        let _ = write(&mut sink, WsMessage::Text(frame.to_json().into()), CLOSE_WRITE).await;
                        (CLOSE_MOVED, "moved")
                    }
                    Err(_) => (CLOSE_GOING_AWAY, "node shutting down"),
                };
                close!(code, text)
            }
            _ = &mut expiry => {
                shared.metrics.sessions_expired.inc();
                close!(CLOSE_TOKEN_EXPIRED, "token_expired")
            }
            _ = frames.pop_batch(&mut batch, WRITE_BATCH) => {
                if let Err(e) = write_batch(&mut sink, &mut batch, deadline).await {
                    if e == WriteError::TimedOut {
                        shared.metrics.write_timeouts.inc();
                        tracing::debug!(session, %uid, "write deadline missed: closing");
                    }
                    return e.reason();
                }
            }
            incoming = stream.next() => {
                last_heard = Instant::now();
                let text = match incoming {
                    None => return "client went away",
                    Some(Err(e)) => {
                        shared.metrics.frame_errors.inc();
                        match read_error_close(&e) {
                            Some((code, text)) => close!(code, text),
                            None => return "read failed",
                        }
                    }
                    Some(Ok(WsMessage::Text(text))) => text,
                    Some(Ok(WsMessage::Close(_))) => {
                        // The library queued the answering close frame (1002 for a close code
                        // the protocol forbids); send it before the socket goes.
                        let _ = tokio::time::timeout(CLOSE_WRITE, sink.flush()).await;
                        return "client closed";
                    }
                    Some(Ok(other)) => {
                        if let Some(end) = over_budget(shared, &mut budget) {
                            match end {
                                Over::Close => close!(CLOSE_FLOODING, "too many frames"),
                                Over::Answer(frame) => answer!(frame),
                            }
                            continue;
                        }
                        if matches!(other, WsMessage::Binary(_)) {
                            shared.metrics.frame_errors.inc();
                            answer!(ServerFrame::Error {
                                code: "bad_frame",
                                message: "binary frames are not supported; send JSON text".into(),
                                id: None,
                            });
                        }
                        continue; // ping/pong: tungstenite answers pings itself
                    }
                };
                let reply = handle_text(shared, session, &uid, &text, &mut budget, limits.max_frame_bytes, limits.max_body_bytes).await;
                match reply {
                    Reply::None => {}
                    Reply::Frame(frame) => answer!(frame),
                    Reply::Close => close!(CLOSE_FLOODING, "too many frames"),
                    Reply::Refreshed { iat, exp } => {
                        let refreshed = ClientEvent::Refreshed { session, iat };
                        let _ = shared.engine.send(Command::Client(refreshed)).await;
                        expiry.as_mut().reset(expiry_deadline(exp, leeway));
                        answer!(ServerFrame::Refreshed { expires_at: exp });
                    }
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() >= idle {
                    close!(CLOSE_IDLE, "idle timeout");
                }
                if let Err(e) = write(&mut sink, WsMessage::Ping(Default::default()), deadline).await {
                    if e == WriteError::TimedOut {
                        shared.metrics.write_timeouts.inc();
                    }
                    return e.reason();
                }
            }
        }
    }
}

/// What a frame over the budget gets.
enum Over {
    /// `error` `rate_limited`.
    Answer(ServerFrame),
    /// The session went on long past its budget: close 4008.
    Close,
}

/// Spends one frame of the budget; `Some` when there was none left.
fn over_budget(shared: &Shared, budget: &mut Budget) -> Option<Over> {
    let refused = budget.spend(Instant::now()).err()?;
    shared.metrics.frames_rate_limited.inc();
    if refused > budget.patience() {
        shared.metrics.sessions_flooding.inc();
        return Some(Over::Close);
    }
    Some(Over::Answer(ServerFrame::Error {
        code: "rate_limited",
        message: "too many frames other than send; slow down".into(),
        id: None,
    }))
}

/// The close frame a read error deserves, if the socket can still carry one.
fn read_error_close(e: &axum::Error) -> Option<(u16, &'static str)> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    match tungstenite_error(e) {
        Some(WsError::Capacity(_)) => Some((CLOSE_TOO_BIG, "frame too big")),
        Some(WsError::Utf8(_)) => Some((CLOSE_BAD_DATA, "text frame is not UTF-8")),
        Some(WsError::Protocol(_)) => Some((CLOSE_PROTOCOL, "websocket protocol violation")),
        Some(_) => None,
        None => e
            .to_string()
            .to_ascii_lowercase()
            .contains("space limit exceeded")
            .then_some((CLOSE_TOO_BIG, "frame too big")),
    }
}

fn tungstenite_error(e: &axum::Error) -> Option<&tokio_tungstenite::tungstenite::Error> {
    use std::error::Error as _;
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(t) = s.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
            return Some(t);
        }
        source = s.source();
    }
    None
}

/// Marks the frame queue closed when the session ends, however it ends.
struct CloseOnDrop(Arc<FrameQueue>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// What the session does after a text frame.
enum Reply {
    /// Nothing (the engine answers, if anything).
    None,
    /// Answer with this frame.
    Frame(ServerFrame),
    /// Close: the client went on past its budget.
    Close,
    /// A `refresh` was accepted: the session now lives on this token's `iat` and `exp`.
    Refreshed { iat: u64, exp: u64 },
}

/// Handles one text frame.
async fn handle_text(
    shared: &Shared,
    session: SessionId,
    uid: &str,
    text: &str,
    budget: &mut Budget,
    max_frame: usize,
    max_body: usize,
) -> Reply {
    if text.len() > max_frame {
        let answer = crate::protocol::oversize_answer(text, max_frame);
        match &answer {
            ServerFrame::Failed { reason, .. } => shared.metrics.failed(*reason),
            _ => {
                shared.metrics.frame_errors.inc();
            }
        }
        return Reply::Frame(answer);
    }
    let parsed = parse_client_frame(text, max_body);
    // A well-formed `send` spends the engine's send budget; everything else spends this one.
    if !matches!(
        parsed,
        Ok(ClientFrame::Send { .. } | ClientFrame::RoomSend { .. })
    ) && let Some(over) = over_budget(shared, budget)
    {
        return match over {
            Over::Answer(frame) => Reply::Frame(frame),
            Over::Close => Reply::Close,
        };
    }
    let cmd = match parsed {
        Ok(ClientFrame::Ping) => return Reply::Frame(ServerFrame::Pong),
        Ok(ClientFrame::Refresh { token }) => return refresh(shared, uid, &token),
        Ok(ClientFrame::Ack { seq }) => ClientEvent::Ack { session, seq },
        Ok(ClientFrame::Send {
            id,
            to,
            body,
            transient,
        }) => ClientEvent::Send {
            transient,
            session,
            id,
            to,
            body,
            ts: now_ms(),
        },
        Ok(ClientFrame::RoomSend {
            id,
            room,
            body,
            transient,
        }) => ClientEvent::RoomSend {
            session,
            id,
            room,
            body,
            ts: now_ms(),
            transient,
        },
        Ok(ClientFrame::Join { room, id }) => ClientEvent::Join {
            session,
            room,
            id,
            join: true,
        },
        Ok(ClientFrame::Leave { room, id }) => ClientEvent::Join {
            session,
            room,
            id,
            join: false,
        },
        Err(err) => {
            if let FrameError::Refused { reason, .. }
            | FrameError::RoomRefused {
                id: Some(_),
                reason,
                ..
            } = &err
            {
                shared.metrics.failed(*reason);
            } else {
                shared.metrics.frame_errors.inc();
            }
            return Reply::Frame(ServerFrame::from_frame_error(&err));
        }
    };
    // A closed engine means the node is stopping; the shutdown branch closes the socket.
    let _ = shared.engine.send(Command::Client(cmd)).await;
    Reply::None
}

/// Checks a `refresh` token: valid, of this session's uid, and not revoked by a kick.
fn refresh(shared: &Shared, uid: &str, token: &str) -> Reply {
    let refused = |message: String| {
        shared.metrics.frame_errors.inc();
        Reply::Frame(ServerFrame::Error {
            code: "invalid_token",
            message,
            id: None,
        })
    };
    match shared.tokens.verify(token) {
        Ok(c) if c.sub != uid => refused("the token is for another uid".into()),
        Ok(c) if shared.kicks.revokes(&c.sub, c.iat) => refused(TokenError::Revoked.to_string()),
        Ok(c) => Reply::Refreshed {
            iat: c.iat,
            exp: c.exp,
        },
        Err(e) => refused(e.to_string()),
    }
}
