//! The driver: the one task that owns a node's [`Relay`] and pumps it.
//!
//! It feeds the relay what arrives (session commands, link events, views, the passing of time)
//! and carries out what comes out: frames to session outboxes (`try_send`; a full outbox is
//! reported back as stalled), session ends, frames to the transport (a refused one is reported
//! back), answers to the HTTP requests waiting on them, and kicks to record. It makes no
//! decision of its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::engine::SessionId;
use crate::kicks::Kicks;
use crate::outbox::{Outbox, PushError};
use crate::relay::{Answer, ClientEvent, LinkEvent, Output, Relay, RequestId};
use crate::state::Command;
use crate::transport::Transport;
use crate::view::View;
use crate::webhooks::{Event, Webhooks};

/// Most inputs of one kind handled before the outputs are carried out.
const BATCH: usize = 256;

/// What the driver listens to.
#[derive(Debug)]
pub struct Inputs {
    /// Sessions and HTTP handlers.
    pub commands: mpsc::Receiver<Command>,
    /// The transport's link events.
    pub links: mpsc::Receiver<LinkEvent>,
    /// The membership view.
    pub view: watch::Receiver<Arc<View>>,
    /// Stops the driver.
    pub shutdown: CancellationToken,
}

/// The task that owns a relay.
#[derive(Debug)]
pub struct Driver<T> {
    relay: Relay,
    transport: T,
    kicks: Arc<Kicks>,
    webhooks: Option<Arc<Webhooks>>,
    outboxes: HashMap<SessionId, Outbox>,
    replies: HashMap<RequestId, oneshot::Sender<Answer>>,
}

impl<T: Transport> Driver<T> {
    /// A driver of `relay` over `transport`; `kicks` is the node's kick table.
    pub fn new(relay: Relay, transport: T, kicks: Arc<Kicks>) -> Driver<T> {
        Driver {
            relay,
            transport,
            kicks,
            webhooks: None,
            outboxes: HashMap::new(),
            replies: HashMap::new(),
        }
    }

    /// Sends the `offline` events to `webhooks`.
    pub fn with_webhooks(mut self, webhooks: Option<Arc<Webhooks>>) -> Driver<T> {
        self.webhooks = webhooks;
        self
    }

    /// Pumps until shutdown or until the commands channel closes.
    pub async fn run(mut self, mut inputs: Inputs) {
        let first = inputs.view.borrow_and_update().clone();
        self.view(first);
        loop {
            let far = Instant::now() + Duration::from_secs(3600);
            let wake = self.relay.next_deadline().map_or(far, Instant::from_std);
            tokio::select! {
                biased;
                _ = inputs.shutdown.cancelled() => break,
                cmd = inputs.commands.recv() => {
                    let Some(cmd) = cmd else { break };
                    // One clock reading serves the whole batch.
                    let now = now();
                    self.command(cmd, now);
                    for _ in 1..BATCH {
                        let Ok(cmd) = inputs.commands.try_recv() else { break };
                        self.command(cmd, now);
                    }
                }
                Some(event) = inputs.links.recv() => {
                    let now = now();
                    self.relay.handle_link(now, event);
                    for _ in 1..BATCH {
                        let Ok(event) = inputs.links.try_recv() else { break };
                        self.relay.handle_link(now, event);
                    }
                }
                Ok(()) = inputs.view.changed() => {
                    let view = inputs.view.borrow_and_update().clone();
                    self.view(view);
                }
                _ = tokio::time::sleep_until(wake) => self.relay.handle_timeout(now()),
            }
            self.carry_out();
        }
        tracing::debug!(status = ?self.relay.status(), "driver stopped");
    }

    fn view(&mut self, view: Arc<View>) {
        self.transport.update(&view);
        self.relay.handle_view(now(), view);
        self.carry_out();
    }

    fn command(&mut self, cmd: Command, now: std::time::Instant) {
        let relay = &mut self.relay;
        let (req, reply) = match cmd {
            Command::Open {
                session,
                uid,
                iat,
                outbox,
            } => {
                let revoked = self.kicks.revokes(&uid, iat);
                self.outboxes.insert(session, outbox);
                let open = ClientEvent::Open {
                    session,
                    uid,
                    iat,
                    revoked,
                };
                return relay.handle_client(now, open);
            }
            Command::Client(event) => {
                if let ClientEvent::Close { session } = &event {
                    self.outboxes.remove(session);
                }
                return relay.handle_client(now, event);
            }
            Command::Status { reply } => return reply.send(relay.status()).unwrap_or(()),
            Command::Kick {
                uid,
                at,
                reply: None,
            } => return relay.kick_local(now, &uid, at),
            Command::Kick {
                uid,
                at,
                reply: Some(reply),
            } => (relay.kick(now, &uid, at), reply),
            Command::Push { msg, reply } => (relay.push(now, msg), reply),
            Command::Presence { uid, reply } => (relay.presence(now, &uid), reply),
            Command::RoomMember {
                room,
                uid,
                join,
                reply,
            } => (relay.room_member(now, &room, &uid, join), reply),
            Command::RoomPush { msg, reply } => (relay.room_push(now, msg), reply),
            Command::RoomInfo { room, reply } => (relay.room_info(now, &room), reply),
        };
        self.replies.insert(req, reply);
    }

    /// Carries out the relay's outputs; a full outbox or a refused frame, reported back, can
    /// make more.
    fn carry_out(&mut self) {
        while let Some(output) = self.relay.poll_output() {
            match output {
                Output::Session { session, frame } => {
                    let full = self
                        .outboxes
                        .get(&session)
                        .is_some_and(|o| o.frames.push(frame) == Err(PushError::Full));
                    if full {
                        let stalled = ClientEvent::Stalled { session };
                        self.relay.handle_client(now(), stalled);
                    }
                }
                Output::End { session, end } => {
                    if let Some(outbox) = self.outboxes.remove(&session) {
                        let _ = outbox.end.send(end);
                    }
                }
                Output::Peer { node, frame } => {
                    if let Err(frame) = self.transport.send(&node, frame) {
                        self.relay.handle_refused(now(), &node, frame);
                    }
                }
                Output::Answer { req, answer } => {
                    if let Some(reply) = self.replies.remove(&req) {
                        let _ = reply.send(answer);
                    }
                }
                Output::Offline(msg) => {
                    if let Some(w) = &self.webhooks {
                        w.emit(Event::Offline(msg), crate::clock::now_ms());
                    }
                }
                Output::Kicked { uid, at } => {
                    if let Err(e) = self.kicks.record(&uid, at, crate::clock::unix_now()) {
                        tracing::warn!(%uid, error = %e, "kick from a peer not remembered");
                    }
                }
            }
        }
    }
}

fn now() -> std::time::Instant {
    Instant::now().into_std()
}
