//! A running node: binds the HTTP port, drives the delivery engine, owns shutdown.
//!
//! The engine runs in one task (the *driver*) that owns it exclusively: sessions and HTTP
//! handlers talk to it through a bounded command channel, and it carries out the engine's
//! [`Action`]s: frames go to each session's bounded outbound queue with `try_send` (a full
//! queue closes the session as a slow consumer, never blocks the driver), outcomes go to
//! waiting API requests. Timers are one `sleep_until(engine.next_deadline())`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::TokenKeys;
use crate::config::{Config, ConfigError};
use crate::engine::{
    Action, CloseReason, Engine, EngineConfig, Message, Outcome, Route, SessionId, Waiter,
};
use crate::metrics::Metrics;
use crate::protocol::{Body, ServerFrame};

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration is not usable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listen address could not be bound.
    #[error("cannot bind {what} address {addr}: {source}")]
    Bind {
        /// Which address (`http`, ...).
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The IO error.
        source: std::io::Error,
    },
}

/// The driver's end of a session: its bounded frame queue and a close signal that works
/// even when the queue is full.
#[derive(Debug)]
pub struct Outbox {
    /// Frames to write.
    pub frames: mpsc::Sender<ServerFrame>,
    /// Close the WebSocket for this reason.
    pub close: oneshot::Sender<CloseReason>,
}

impl Outbox {
    /// A new outbox of `capacity` frames and the session's receiving ends.
    pub fn new(
        capacity: usize,
    ) -> (
        Outbox,
        mpsc::Receiver<ServerFrame>,
        oneshot::Receiver<CloseReason>,
    ) {
        let (frames, frames_rx) = mpsc::channel(capacity);
        let (close, close_rx) = oneshot::channel();
        (Outbox { frames, close }, frames_rx, close_rx)
    }
}

/// Requests to the engine driver.
#[derive(Debug)]
pub enum Command {
    /// A session is live; its frames go to `tx`.
    Open {
        /// Session id.
        session: SessionId,
        /// Its uid.
        uid: Arc<str>,
        /// Its outbound queue and close signal.
        outbox: Outbox,
    },
    /// A session is gone.
    Close {
        /// Session id.
        session: SessionId,
    },
    /// A client `send`.
    Send {
        /// Sending session.
        session: SessionId,
        /// Message id.
        id: String,
        /// Recipient.
        to: String,
        /// Body.
        body: Body,
        /// Taken at, ms since the epoch.
        ts: u64,
    },
    /// A client `ack`.
    Ack {
        /// Acking session.
        session: SessionId,
        /// The seq.
        seq: u64,
    },
    /// A message from the HTTP API; `reply` gets its outcome.
    Push {
        /// The message (`from` is `$system`).
        msg: Message,
        /// Where the outcome goes.
        reply: oneshot::Sender<Outcome>,
    },
    /// How many sessions `uid` has here.
    Presence {
        /// The uid.
        uid: String,
        /// The answer.
        reply: oneshot::Sender<usize>,
    },
}

/// Where a uid lives, as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Owner node id.
    pub node: Arc<str>,
    /// Its WebSocket URL.
    pub url: Arc<str>,
}

/// State shared by the HTTP handlers and sessions of a node.
#[derive(Debug)]
pub struct Shared {
    /// The configuration.
    pub cfg: Config,
    /// This node's id.
    pub node_id: Arc<str>,
    /// This node's WebSocket URL as clients reach it.
    pub ws_url: Arc<str>,
    /// The bound HTTP address.
    pub http_addr: SocketAddr,
    /// Token keys.
    pub tokens: TokenKeys,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The engine driver's inbox.
    pub engine: mpsc::Sender<Command>,
    /// Cancelled when the node shuts down.
    pub shutdown: CancellationToken,
    /// Bounds concurrent argon2 verifications (each takes ~19 MiB).
    pub password_checks: Semaphore,
    /// Live WebSocket sessions, for `limits.max_sessions`.
    pub live_sessions: AtomicUsize,
    next_session: AtomicU64,
}

impl Shared {
    /// A fresh session id.
    pub fn next_session_id(&self) -> SessionId {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// The owner of `uid`: the node that must hold its sessions.
    pub fn owner_of(&self, _uid: &str) -> Option<Owner> {
        Some(Owner {
            node: self.node_id.clone(),
            url: self.ws_url.clone(),
        })
    }

    /// Where a message to `uid` goes.
    pub fn route(&self, uid: &str) -> Route {
        match self.owner_of(uid) {
            Some(o) if o.node == self.node_id => Route::Local,
            Some(o) => Route::Remote(o.node),
            None => Route::Unreachable,
        }
    }
}

/// A running node.
#[derive(Debug)]
pub struct NodeHandle {
    shared: Arc<Shared>,
    tracker: TaskTracker,
    server: JoinHandle<()>,
}

/// Inbox of the engine driver: bounded so that a flood of client frames waits at the
/// sessions' readers (TCP backpressure) instead of growing memory.
const ENGINE_INBOX: usize = 8192;

/// Starts node `node_id` of `cfg`: binds its HTTP port and spawns its tasks.
///
/// # Errors
/// [`NodeError`] if the node is not in the configuration or a port cannot be bound.
pub async fn start(cfg: Config, node_id: &str) -> Result<NodeHandle, NodeError> {
    cfg.validate()?;
    let node_cfg = cfg.node(node_id)?.clone();
    let listener = TcpListener::bind(node_cfg.http)
        .await
        .map_err(|source| NodeError::Bind {
            what: "http",
            addr: node_cfg.http,
            source,
        })?;
    let http_addr = listener.local_addr().map_err(|source| NodeError::Bind {
        what: "http",
        addr: node_cfg.http,
        source,
    })?;
    let advertised = node_cfg
        .advertise
        .clone()
        .unwrap_or_else(|| http_addr.to_string());
    let metrics = Arc::new(Metrics::new());
    metrics.gossip_members.set(1);
    let (engine_tx, engine_rx) = mpsc::channel(ENGINE_INBOX);
    let shutdown = CancellationToken::new();
    let shared = Arc::new(Shared {
        tokens: TokenKeys::new(
            &cfg.auth.jwt_secret,
            cfg.auth.token_ttl_s,
            cfg.auth.leeway_s,
        ),
        node_id: Arc::from(node_id),
        ws_url: Arc::from(format!("ws://{advertised}/ws")),
        http_addr,
        metrics: metrics.clone(),
        engine: engine_tx,
        shutdown: shutdown.clone(),
        password_checks: Semaphore::new(4),
        live_sessions: AtomicUsize::new(0),
        next_session: AtomicU64::new(1),
        cfg,
    });
    let tracker = TaskTracker::new();
    let engine = Engine::new(
        EngineConfig::from_config(&shared.cfg.delivery, &shared.cfg.limits),
        metrics,
    );
    tracker.spawn(drive_engine(engine, engine_rx, shutdown.clone()));
    let app = crate::http::router(shared.clone(), tracker.clone());
    let server_shutdown = shutdown.clone();
    let server = tokio::spawn(async move {
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let result = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(server_shutdown.cancelled_owned())
        .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "http server stopped");
        }
    });
    tracing::info!(node = %node_id, http = %http_addr, url = %shared.ws_url, "node started");
    Ok(NodeHandle {
        shared,
        tracker,
        server,
    })
}

impl NodeHandle {
    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.shared.http_addr
    }

    /// `http://addr`, for clients.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.shared.http_addr)
    }

    /// This node's WebSocket URL.
    pub fn ws_url(&self) -> &str {
        &self.shared.ws_url
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    /// The shared state (for tests and embedding).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Resolves when the node was asked to stop (by [`NodeHandle::shutdown`] or a fatal error).
    pub async fn stopped(&self) {
        self.shared.shutdown.cancelled().await;
    }

    /// Stops the node: sessions are closed with 1001, then every task is awaited, within
    /// `http.shutdown_timeout_ms`.
    pub async fn shutdown(self) {
        self.shared.shutdown.cancel();
        self.tracker.close();
        let bound = Duration::from_millis(self.shared.cfg.http.shutdown_timeout_ms);
        let all = async {
            let _ = self.server.await;
            self.tracker.wait().await;
        };
        if tokio::time::timeout(bound, all).await.is_err() {
            tracing::warn!(node = %self.shared.node_id, "shutdown bound reached; tasks left behind");
        }
    }
}

/// Most commands handled before the driver carries out their actions.
const BATCH: usize = 256;

async fn drive_engine(
    mut engine: Engine,
    mut rx: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
) {
    let mut outboxes: HashMap<SessionId, Outbox> = HashMap::new();
    let mut api_waiters: HashMap<u64, oneshot::Sender<Outcome>> = HashMap::new();
    let mut next_api: u64 = 1;
    let mut actions: Vec<Action> = Vec::with_capacity(BATCH);
    let mut full: Vec<SessionId> = Vec::new();
    let mut unrouted: Vec<(SessionId, Message)> = Vec::new();
    let far = Duration::from_secs(3600);
    loop {
        let wake = engine
            .next_deadline()
            .map(Instant::from_std)
            .unwrap_or_else(|| Instant::now() + far);
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { break };
                let now = Instant::now().into_std();
                handle(&mut engine, cmd, now, &mut outboxes, &mut api_waiters, &mut next_api, &mut actions);
                for _ in 1..BATCH {
                    match rx.try_recv() {
                        Ok(cmd) => handle(&mut engine, cmd, now, &mut outboxes, &mut api_waiters, &mut next_api, &mut actions),
                        Err(_) => break,
                    }
                }
            }
            _ = tokio::time::sleep_until(wake) => {
                engine.tick(Instant::now().into_std(), &mut actions);
            }
        }
        // Carrying out actions can close slow sessions, which yields more actions.
        while !actions.is_empty() {
            for action in actions.drain(..) {
                carry_out(
                    action,
                    &mut outboxes,
                    &mut api_waiters,
                    &mut full,
                    &mut unrouted,
                );
            }
            let now = Instant::now().into_std();
            for session in full.drain(..) {
                if let Some(outbox) = outboxes.remove(&session) {
                    engine.metrics().slow_consumers.inc();
                    let _ = outbox.close.send(CloseReason::SlowConsumer);
                    engine.close_session(now, session, &mut actions);
                }
            }
            for (session, msg) in unrouted.drain(..) {
                let failed = Outcome::Failed(crate::protocol::FailReason::Unreachable);
                engine.outcome(session, &msg.id, &msg.to, failed, &mut actions);
            }
        }
    }
    tracing::debug!(sessions = engine.session_count(), "engine driver stopped");
}

fn handle(
    engine: &mut Engine,
    cmd: Command,
    now: std::time::Instant,
    outboxes: &mut HashMap<SessionId, Outbox>,
    api_waiters: &mut HashMap<u64, oneshot::Sender<Outcome>>,
    next_api: &mut u64,
    actions: &mut Vec<Action>,
) {
    match cmd {
        Command::Open {
            session,
            uid,
            outbox,
        } => {
            outboxes.insert(session, outbox);
            engine.open_session(now, session, &uid, actions);
        }
        Command::Close { session } => {
            outboxes.remove(&session);
            engine.close_session(now, session, actions);
        }
        Command::Send {
            session,
            id,
            to,
            body,
            ts,
        } => {
            // Ownership is decided per node; a single node owns everyone.
            engine.send(now, session, &id, &to, body, ts, Route::Local, actions);
        }
        Command::Ack { session, seq } => engine.ack(now, session, seq, actions),
        Command::Push { msg, reply } => {
            let req = *next_api;
            *next_api += 1;
            api_waiters.insert(req, reply);
            engine.deliver(now, msg, Waiter::Api(req), actions);
        }
        Command::Presence { uid, reply } => {
            let _ = reply.send(engine.presence(&uid));
        }
    }
}

fn carry_out(
    action: Action,
    outboxes: &mut HashMap<SessionId, Outbox>,
    api_waiters: &mut HashMap<u64, oneshot::Sender<Outcome>>,
    full: &mut Vec<SessionId>,
    unrouted: &mut Vec<(SessionId, Message)>,
) {
    match action {
        Action::Push { session, frame } => {
            if let Some(outbox) = outboxes.get(&session)
                && let Err(mpsc::error::TrySendError::Full(_)) = outbox.frames.try_send(frame)
                && !full.contains(&session)
            {
                full.push(session);
            }
        }
        Action::Close { session, reason } => {
            if let Some(outbox) = outboxes.remove(&session) {
                let _ = outbox.close.send(reason);
            }
        }
        Action::Report {
            waiter, outcome, ..
        } => {
            if let Waiter::Api(req) = waiter
                && let Some(reply) = api_waiters.remove(&req)
            {
                let _ = reply.send(outcome);
            }
        }
        Action::Forward { node, session, msg } => {
            tracing::warn!(%node, id = %msg.id, "no link to the owner node");
            unrouted.push((session, msg));
        }
    }
}
