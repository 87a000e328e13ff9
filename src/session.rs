//! One WebSocket session: reads client frames, writes node frames, keeps the socket alive.
//!
//! A session is one task that owns its socket. Client frames are parsed here (so a bad frame
//! costs the engine nothing) and requests go to the engine driver; frames from the engine
//! arrive on the session's bounded outbox. The task also sends WebSocket pings every
//! `websocket.ping_interval_ms` and closes a socket silent for `websocket.idle_timeout_ms`.
//!
//! Close codes: 1001 node shutting down, 1009 frame too big, 4000 idle timeout,
//! 4001 moved (sent by the upgrade handler), 4002 slow consumer, 4003 replaced by a newer
//! session of the same user.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;

use crate::engine::{CloseReason, SessionId};
use crate::node::{Command, Outbox, SessionEnd, Shared};
use crate::protocol::{ClientFrame, FrameError, ServerFrame, parse_client_frame};

/// Close code: idle timeout.
pub const CLOSE_IDLE: u16 = 4000;
/// Close code: the user's owner is another node.
pub const CLOSE_MOVED: u16 = 4001;
/// Close code: the session did not keep up with its messages.
pub const CLOSE_SLOW: u16 = 4002;
/// Close code: a newer session of the same user replaced this one.
pub const CLOSE_REPLACED: u16 = 4003;
/// Close code: a frame over the hard size limit.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code: the node is shutting down.
pub const CLOSE_GOING_AWAY: u16 = 1001;

/// Most frames written before a flush.
const WRITE_BATCH: usize = 64;

/// Milliseconds since the unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn close_frame(code: u16, reason: &'static str) -> WsMessage {
    WsMessage::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}

/// Sends `moved` and closes with 4001.
pub async fn send_moved(mut socket: WebSocket, url: String, node: String) {
    let frame = ServerFrame::Moved { url, node }.to_json();
    let _ = socket.send(WsMessage::Text(frame.into())).await;
    let _ = socket.send(close_frame(CLOSE_MOVED, "moved")).await;
}

/// Runs a live session of `uid` until it closes.
pub async fn run(shared: Arc<Shared>, socket: WebSocket, uid: Arc<str>) {
    let session = shared.next_session_id();
    shared.metrics.sessions.inc();
    let result = serve(&shared, socket, session, uid.clone()).await;
    let _ = shared.engine.send(Command::Close { session }).await;
    shared.metrics.sessions.dec();
    shared.live_sessions.fetch_sub(1, Ordering::Relaxed);
    tracing::debug!(session, %uid, ended = result, "session closed");
}

async fn serve(
    shared: &Shared,
    socket: WebSocket,
    session: SessionId,
    uid: Arc<str>,
) -> &'static str {
    let (mut sink, mut stream) = socket.split();
    let welcome = ServerFrame::Welcome {
        uid: uid.to_string(),
        node: shared.node_id.to_string(),
        session: format!("{}-{session}", shared.node_id),
    };
    if sink
        .send(WsMessage::Text(welcome.to_json().into()))
        .await
        .is_err()
    {
        return "write failed";
    }
    let (outbox, frames, mut close_rx) = Outbox::new(shared.cfg.limits.outbound_queue);
    let _closed = CloseOnDrop(frames.clone());
    let mut batch: Vec<ServerFrame> = Vec::new();
    let open = Command::Open {
        session,
        uid: uid.clone(),
        outbox,
    };
    if shared.engine.send(open).await.is_err() {
        return "node stopping";
    }
    let limits = &shared.cfg.limits;
    let ping_every = Duration::from_millis(shared.cfg.websocket.ping_interval_ms);
    let idle = Duration::from_millis(shared.cfg.websocket.idle_timeout_ms);
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => {
                let _ = sink.send(close_frame(CLOSE_GOING_AWAY, "node shutting down")).await;
                return "shutdown";
            }
            end = &mut close_rx => {
                let (code, text) = match end {
                    Ok(SessionEnd::Closed(CloseReason::SlowConsumer)) => (CLOSE_SLOW, "slow consumer"),
                    Ok(SessionEnd::Closed(CloseReason::Replaced)) => (CLOSE_REPLACED, "replaced by a newer session"),
                    Ok(SessionEnd::Moved(owner)) => {
                        let frame = ServerFrame::Moved { url: owner.url.to_string(), node: owner.node.to_string() };
                        let _ = sink.send(WsMessage::Text(frame.to_json().into())).await;
                        (CLOSE_MOVED, "moved")
                    }
                    Err(_) => (CLOSE_GOING_AWAY, "node shutting down"),
                };
                let _ = sink.send(close_frame(code, text)).await;
                return text;
            }
            _ = frames.pop_batch(&mut batch, WRITE_BATCH) => {
                if write_batch(&mut sink, &mut batch).await.is_err() {
                    return "write failed";
                }
            }
            incoming = stream.next() => {
                last_heard = Instant::now();
                let text = match incoming {
                    None => return "client went away",
                    Some(Err(e)) => {
                        if is_capacity_error(&e) {
                            shared.metrics.frame_errors.inc();
                            let _ = sink.send(close_frame(CLOSE_TOO_BIG, "frame too big")).await;
                            return "frame too big";
                        }
                        return "read failed";
                    }
                    Some(Ok(WsMessage::Text(text))) => text,
                    Some(Ok(WsMessage::Binary(_))) => {
                        let err = ServerFrame::Error {
                            code: "bad_frame",
                            message: "binary frames are not supported; send JSON text".into(),
                            id: None,
                        };
                        shared.metrics.frame_errors.inc();
                        if sink.send(WsMessage::Text(err.to_json().into())).await.is_err() {
                            return "write failed";
                        }
                        continue;
                    }
                    Some(Ok(WsMessage::Close(_))) => return "client closed",
                    Some(Ok(_)) => continue, // ping/pong: tungstenite answers pings itself
                };
                if let Some(reply) = handle_text(shared, session, &text, limits.max_frame_bytes, limits.max_body_bytes).await
                    && sink.send(WsMessage::Text(reply.to_json().into())).await.is_err()
                {
                    return "write failed";
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() >= idle {
                    let _ = sink.send(close_frame(CLOSE_IDLE, "idle timeout")).await;
                    return "idle timeout";
                }
                if sink.send(WsMessage::Ping(Default::default())).await.is_err() {
                    return "write failed";
                }
            }
        }
    }
}

/// Marks the frame queue closed when the session ends, however it ends.
struct CloseOnDrop(std::sync::Arc<crate::node::FrameQueue>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Writes a batch of frames, then flushes once.
async fn write_batch<S>(sink: &mut S, batch: &mut Vec<ServerFrame>) -> Result<(), S::Error>
where
    S: futures_util::Sink<WsMessage> + Unpin,
{
    for f in batch.drain(..) {
        sink.feed(WsMessage::Text(f.to_json().into())).await?;
    }
    sink.flush().await
}

fn is_capacity_error(e: &axum::Error) -> bool {
    use std::error::Error as _;
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(t) = s.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
            return matches!(t, tokio_tungstenite::tungstenite::Error::Capacity(_));
        }
        source = s.source();
    }
    e.to_string()
        .to_ascii_lowercase()
        .contains("space limit exceeded")
}

/// Handles one text frame; returns a frame to answer directly, if any.
async fn handle_text(
    shared: &Shared,
    session: SessionId,
    text: &str,
    max_frame: usize,
    max_body: usize,
) -> Option<ServerFrame> {
    if text.len() > max_frame {
        let answer = crate::protocol::oversize_answer(text, max_frame);
        match &answer {
            ServerFrame::Failed { reason, .. } => shared.metrics.failed(*reason),
            _ => {
                shared.metrics.frame_errors.inc();
            }
        }
        return Some(answer);
    }
    let cmd = match parse_client_frame(text, max_body) {
        Ok(ClientFrame::Ping) => return Some(ServerFrame::Pong),
        Ok(ClientFrame::Ack { seq }) => Command::Ack { session, seq },
        Ok(ClientFrame::Send { id, to, body }) => Command::Send {
            session,
            id,
            to,
            body,
            ts: now_ms(),
        },
        Err(err) => {
            if let FrameError::Refused { reason, .. } = &err {
                shared.metrics.failed(*reason);
            } else {
                shared.metrics.frame_errors.inc();
            }
            return Some(ServerFrame::from_frame_error(&err));
        }
    };
    // A closed engine means the node is stopping; the shutdown branch closes the socket.
    let _ = shared.engine.send(cmd).await;
    None
}
