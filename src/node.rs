//! A running node: binds its ports, joins the cluster, drives the delivery engine.
//!
//! The engine runs in one task (the *driver*) that owns it exclusively. Sessions, HTTP
//! handlers and peer links talk to it through one bounded command channel, and it carries
//! out the engine's [`Action`]s: frames go to each session's bounded outbox with `try_send` (a
//! full outbox closes the session as a slow consumer; the driver never blocks on a client),
//! messages for users owned elsewhere go to peer links, outcomes go back to whoever waits.
//! Timers are one `sleep_until(engine.next_deadline())`.
//!
//! Cross-node waiting is tracked here, not in the engine: every message forwarded to another
//! node gets a tag and a [`Forward`] entry holding its waiters; the owner answers
//! `Outcome { tag }`. A link that goes down fails its forwards with `unreachable`, and a sweep
//! fails any forward older than a delivery can take, so every send ends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::TokenKeys;
use crate::config::{Config, ConfigError};
use crate::engine::{
    Action, CloseReason, Engine, EngineConfig, MAX_PLACEMENTS, Message, NodeId, Outcome, Route,
    SessionId, Waiter,
};
use crate::membership::{Membership, SelfInfo, View};
use crate::metrics::Metrics;
use crate::peer::{Links, PeerError};
use crate::protocol::{Body, FailReason, ServerFrame};
use crate::wire::{PeerFrame, WireMessage};

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
    /// The QUIC endpoint could not start.
    #[error(transparent)]
    Peer(#[from] PeerError),
    /// Gossip could not start.
    #[error("gossip: {0}")]
    Gossip(String),
    /// The client TLS certificate or key cannot be used.
    #[error("client TLS: {0}")]
    Tls(#[from] crate::client_tls::TlsError),
}

/// How a session must end, sent by the driver.
#[derive(Debug, Clone)]
pub enum SessionEnd {
    /// Close for this reason.
    Closed(CloseReason),
    /// The user's owner is now another node: send `moved`, close with 4001.
    Moved(Owner),
}

/// A session's queue of frames from the driver: bounded, and allocation-free while empty (an
/// idle session costs a few dozen bytes here, where a channel would pre-allocate a block).
#[derive(Debug)]
pub struct FrameQueue {
    frames: std::sync::Mutex<std::collections::VecDeque<ServerFrame>>,
    ready: tokio::sync::Notify,
    capacity: usize,
    closed: std::sync::atomic::AtomicBool,
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The queue holds `capacity` frames: the session does not keep up.
    Full,
    /// The session is gone.
    Closed,
}

impl FrameQueue {
    /// An empty queue of at most `capacity` frames.
    pub fn new(capacity: usize) -> FrameQueue {
        FrameQueue {
            frames: std::sync::Mutex::new(std::collections::VecDeque::new()),
            ready: tokio::sync::Notify::new(),
            capacity,
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Queues a frame without waiting.
    ///
    /// # Errors
    /// [`PushError`] when the queue is full or the session gone.
    pub fn push(&self, frame: ServerFrame) -> Result<(), PushError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(PushError::Closed);
        }
        let mut q = self.frames.lock().expect("frame queue lock");
        if q.len() >= self.capacity {
            return Err(PushError::Full);
        }
        q.push_back(frame);
        drop(q);
        self.ready.notify_one();
        Ok(())
    }

    /// Waits for frames, then moves up to `max` of them into `out`. Cancel-safe: frames move
    /// only in the poll that completes.
    pub async fn pop_batch(&self, out: &mut Vec<ServerFrame>, max: usize) {
        loop {
            {
                let mut q = self.frames.lock().expect("frame queue lock");
                if !q.is_empty() {
                    let n = q.len().min(max);
                    out.extend(q.drain(..n));
                    // Give back what a burst grew, so an idle session stays small.
                    if q.is_empty() && q.capacity() > 64 {
                        q.shrink_to(0);
                    }
                    return;
                }
            }
            self.ready.notified().await;
        }
    }

    /// Marks the session gone: later pushes fail with [`PushError::Closed`].
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

/// The driver's end of a session: its bounded frame queue and an end signal that works even
/// when the queue is full.
#[derive(Debug)]
pub struct Outbox {
    /// Frames to write.
    pub frames: Arc<FrameQueue>,
    /// End the session.
    pub end: oneshot::Sender<SessionEnd>,
    /// `iat` of the token the session lives on now (a `refresh` moves it), for kicks.
    pub token_iat: Arc<AtomicU64>,
}

impl Outbox {
    /// A new outbox of `capacity` frames for a session whose token's `iat` is in `token_iat`,
    /// and the session's receiving ends.
    pub fn new(
        capacity: usize,
        token_iat: Arc<AtomicU64>,
    ) -> (Outbox, Arc<FrameQueue>, oneshot::Receiver<SessionEnd>) {
        let frames = Arc::new(FrameQueue::new(capacity));
        let (end, end_rx) = oneshot::channel();
        (
            Outbox {
                frames: frames.clone(),
                end,
                token_iat,
            },
            frames,
            end_rx,
        )
    }
}

/// Requests to the engine driver.
#[derive(Debug)]
pub enum Command {
    /// A session is live; its frames go to `outbox`.
    Open {
        /// Session id.
        session: SessionId,
        /// Its uid.
        uid: Arc<str>,
        /// Its outbound queue and end signal.
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
    /// `uid` was kicked at `at`: close its sessions whose token is revoked. With `reply`
    /// (from the API), the owner is asked and answers how many it closed; without (a kick
    /// learnt from gossip), only this node's sessions are closed.
    Kick {
        /// The uid.
        uid: Arc<str>,
        /// Kick time, unix seconds.
        at: u64,
        /// The answer (dropped if the owner cannot be asked).
        reply: Option<oneshot::Sender<usize>>,
    },
    /// How many sessions `uid` has at its owner.
    Presence {
        /// The uid.
        uid: String,
        /// The answer (dropped if the owner cannot be asked).
        reply: oneshot::Sender<usize>,
    },
    /// A frame from a peer node.
    Peer {
        /// The peer.
        from: NodeId,
        /// The frame.
        frame: PeerFrame,
    },
    /// The link to a peer went down.
    PeerDown {
        /// The peer.
        node: NodeId,
    },
    /// A link to a peer came up.
    PeerUp {
        /// The peer.
        node: NodeId,
    },
    /// What is still in flight here (for draining).
    Status {
        /// The answer.
        reply: oneshot::Sender<DriverStatus>,
    },
}

/// What a node still has in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DriverStatus {
    /// Live sessions.
    pub sessions: usize,
    /// Messages in delivery (pushed or held).
    pub deliveries: usize,
    /// Messages forwarded to other nodes and waiting for their outcome.
    pub forwards: usize,
}

/// Where a uid lives, as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Owner node id.
    pub node: NodeId,
    /// Its WebSocket URL.
    pub url: Arc<str>,
}

/// State shared by the HTTP handlers, sessions and the driver of a node.
#[derive(Debug)]
pub struct Shared {
    /// The configuration.
    pub cfg: Config,
    /// This node's id.
    pub node_id: NodeId,
    /// This node's WebSocket URL as clients reach it.
    pub ws_url: Arc<str>,
    /// The bound HTTP address.
    pub http_addr: SocketAddr,
    /// The bound gossip address.
    pub gossip_addr: SocketAddr,
    /// TLS for clients, if this node serves HTTPS and WSS.
    pub tls: Option<crate::client_tls::ClientTls>,
    /// When the node started.
    pub started: std::time::Instant,
    /// When the membership view last changed, in ms after `started`.
    view_changed_ms: AtomicU64,
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
    /// `users`-mode logins waiting for or running a password check, for `auth.login_queue`.
    pub login_waiters: AtomicUsize,
    /// Kicks: tokens revoked cluster-wide.
    pub kicks: Arc<crate::kicks::Kicks>,
    /// In `users` mode, the hash checked for unknown uids (built at start, with the
    /// parameters of the configured hashes); empty otherwise.
    pub decoy_hash: String,
    /// Live WebSocket sessions, for `limits.max_sessions`.
    pub live_sessions: AtomicUsize,
    /// The membership view.
    pub view: watch::Receiver<Arc<View>>,
    /// Links to the other nodes.
    pub links: Arc<Links>,
    /// Set (once, with the reason) when gossip or the QUIC endpoint stopped while the node was
    /// not shutting down: `/health` answers 503 `degraded` and the process exits.
    pub degraded: std::sync::OnceLock<String>,
    next_session: AtomicU64,
}

/// Why a node is not ready (`GET /ready`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// Shutting down.
    Stopping,
    /// Gossip or QUIC died.
    Degraded(String),
    /// Some live members cannot be reached over a link yet.
    Links {
        /// Members in the view.
        members: usize,
        /// Of them, reachable from here.
        reachable: usize,
    },
    /// The view changed less than the settling time ago.
    Settling,
    /// Seeds are configured but no other member has been seen yet (within the join grace).
    Joining,
}

/// How long a view must stay the same before a node is ready, in gossip rounds.
const SETTLE_ROUNDS: u64 = 3;
/// How long a node with seeds waits to meet another member before it is ready alone.
const JOIN_GRACE: Duration = Duration::from_secs(5);

impl Shared {
    /// Records that the membership view changed now.
    fn view_changed(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.view_changed_ms.store(ms, Ordering::Relaxed);
    }

    /// Whether this node is ready for a rolling deploy to move on: not stopping or degraded;
    /// it has met another member (or, with no other seed, or after a grace of 5 s, it is
    /// alone); its view has not changed for 3 gossip rounds; and every live member is
    /// reachable over its link, so that it names the same owners as every other node.
    ///
    /// # Errors
    /// [`NotReady`] with the first reason.
    pub fn readiness(&self) -> Result<(), NotReady> {
        if let Some(why) = self.degraded.get() {
            return Err(NotReady::Degraded(why.clone()));
        }
        if self.shutdown.is_cancelled() {
            return Err(NotReady::Stopping);
        }
        let view = self.current_view();
        let members = view.members.len();
        let has_seeds = self
            .cfg
            .cluster
            .seeds
            .iter()
            .any(|s| s.parse::<SocketAddr>().ok() != Some(self.gossip_addr));
        if has_seeds && members < 2 && self.started.elapsed() < JOIN_GRACE {
            return Err(NotReady::Joining);
        }
        let reachable = self.reachable_members(&view);
        if reachable != members {
            return Err(NotReady::Links { members, reachable });
        }
        let settle = Duration::from_millis(self.cfg.gossip.interval_ms * SETTLE_ROUNDS);
        let changed = Duration::from_millis(self.view_changed_ms.load(Ordering::Relaxed));
        if self.started.elapsed().saturating_sub(changed) < settle {
            return Err(NotReady::Settling);
        }
        Ok(())
    }

    /// A fresh session id.
    pub fn next_session_id(&self) -> SessionId {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// The current membership view.
    pub fn current_view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// The owner of `uid`: the first node of its preference list that is live (in the view)
    /// and reachable from here (this node, or a peer whose link is not down).
    pub fn owner_of(&self, uid: &str) -> Option<Owner> {
        owner_in(&self.current_view(), uid, &self.node_id, |n| {
            self.links.reachable(n)
        })
    }

    /// How many members of `view` can own users from here: this node and every peer whose
    /// link is up. The node is *ready* when this equals the member count: then every node of
    /// the view answers logins with the same owners this one does.
    pub fn reachable_members(&self, view: &View) -> usize {
        view.members.keys().filter(|m| self.can_own(m)).count()
    }

    /// Whether `node` can own users from here: this node, or a peer whose link is up.
    pub fn can_own(&self, node: &str) -> bool {
        node == &*self.node_id || self.links.reachable(node)
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

/// The ownership rule over a view: first of the preference list that is this node or passes
/// `reachable`.
pub fn owner_in(
    view: &View,
    uid: &str,
    me: &str,
    reachable: impl Fn(&str) -> bool,
) -> Option<Owner> {
    let usable = |n: &NodeId| &**n == me || reachable(n);
    let owner = match view.ring.primary(uid) {
        Some(p) if usable(p) => p.clone(),
        Some(_) => view.ring.preference(uid).into_iter().find(|n| usable(n))?,
        None => return None,
    };
    let member = view.members.get(&owner)?;
    Some(Owner {
        node: owner,
        url: member.url.clone(),
    })
}

/// A running node.
#[derive(Debug)]
pub struct NodeHandle {
    shared: Arc<Shared>,
    tracker: TaskTracker,
    server: JoinHandle<()>,
    membership: Membership,
    failed: watch::Receiver<Option<String>>,
}

/// Inbox of the engine driver: bounded so that a flood of client frames waits at the
/// sessions' readers (TCP backpressure) instead of growing memory.
const ENGINE_INBOX: usize = 8192;

/// Starts node `node_id` of `cfg`: binds its ports, joins the cluster, spawns its tasks.
///
/// # Errors
/// [`NodeError`] if the node is not in the configuration or a port cannot be bound.
pub async fn start(cfg: Config, node_id: &str) -> Result<NodeHandle, NodeError> {
    cfg.validate()?;
    cfg.check_secrets_for(node_id)?;
    let node_cfg = cfg.node(node_id)?.clone();
    let bind_err = |what, addr| move |source| NodeError::Bind { what, addr, source };
    let listener = TcpListener::bind(node_cfg.http)
        .await
        .map_err(bind_err("http", node_cfg.http))?;
    let http_addr = listener
        .local_addr()
        .map_err(bind_err("http", node_cfg.http))?;
    let advertised = node_cfg
        .advertise
        .clone()
        .unwrap_or_else(|| http_addr.to_string());
    let index = cfg
        .nodes
        .iter()
        .position(|n| n.id == node_id)
        .expect("node() found it");
    let tls = match node_cfg.tls_files(&cfg.tls) {
        None => None,
        Some((cert, key)) => {
            let own = node_cfg.cert_path.is_some();
            let setting = |what: &str| {
                if own {
                    format!("nodes[{index}].{what}")
                } else {
                    format!("tls.{what}")
                }
            };
            let files = crate::client_tls::TlsFiles {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                cert_setting: setting("cert_path"),
                key_setting: setting("key_path"),
            };
            Some(crate::client_tls::ClientTls::new(files)?)
        }
    };
    let ws_url: Arc<str> = Arc::from(node_cfg.client_url(http_addr, tls.is_some()));
    let node_id: NodeId = Arc::from(node_id);
    let metrics = Arc::new(Metrics::new());
    let (engine_tx, engine_rx) = mpsc::channel(ENGINE_INBOX);
    let links = Links::start(
        node_id.clone(),
        cfg.cluster.id.clone(),
        node_cfg.quic,
        &cfg.cluster.secret,
        cfg.quic.clone(),
        engine_tx.clone(),
        metrics.clone(),
    )?;
    let me = SelfInfo {
        id: node_id.to_string(),
        url: ws_url.to_string(),
        http: advertised.clone(),
        quic: links.local_addr(),
    };
    let kicks = Arc::new(crate::kicks::Kicks::new(
        cfg.auth
            .token_ttl_s
            .saturating_add(cfg.auth.leeway_s.saturating_mul(2)),
        cfg.auth.max_kicks,
    ));
    let shared_login_concurrency = cfg.auth.login_concurrency;
    let decoy_hash = if cfg.auth.mode == crate::config::AuthMode::Users {
        let like = cfg.auth.users.first().map(|u| u.password_hash.clone());
        tokio::task::spawn_blocking(move || crate::auth::decoy_hash(like.as_deref()))
            .await
            .unwrap_or_default()
    } else {
        String::new()
    };
    let membership = Membership::start(&cfg, me, node_cfg.gossip, metrics.clone(), kicks.clone())
        .await
        .map_err(|e| NodeError::Gossip(format!("{e:#}")))?;
    let shutdown = CancellationToken::new();
    let shared = Arc::new(Shared {
        tokens: TokenKeys::new(
            &cfg.auth.jwt_secret,
            &cfg.auth.issuer,
            &cfg.cluster.id,
            cfg.auth.token_ttl_s,
            cfg.auth.leeway_s,
        ),
        node_id: node_id.clone(),
        ws_url,
        http_addr,
        tls: tls.clone(),
        started: std::time::Instant::now(),
        view_changed_ms: AtomicU64::new(0),
        gossip_addr: membership.gossip_addr(),
        metrics: metrics.clone(),
        engine: engine_tx,
        shutdown: shutdown.clone(),
        password_checks: Semaphore::new(shared_login_concurrency),
        login_waiters: AtomicUsize::new(0),
        kicks: kicks.clone(),
        decoy_hash,
        live_sessions: AtomicUsize::new(0),
        view: membership.view(),
        links,
        degraded: std::sync::OnceLock::new(),
        next_session: AtomicU64::new(1),
        cfg,
    });
    // A node whose gossip or QUIC endpoint died serves a frozen view: say so, and let the
    // process end (`NodeHandle::failed`) so that a supervisor restarts it.
    let (failed_tx, failed) = watch::channel(None);
    {
        let gossip = membership.failed();
        let quic = shared.links.failed();
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let why = tokio::select! {
                _ = shutdown.cancelled() => return,
                why = gossip => why,
                why = quic => why,
            };
            tracing::error!(node = %shared.node_id, reason = %why, "node degraded");
            let _ = shared.degraded.set(why.clone());
            let _ = failed_tx.send(Some(why));
        });
    }
    let tracker = TaskTracker::new();
    let engine = Engine::new(
        EngineConfig::from_config(&shared.cfg.delivery, &shared.cfg.limits),
        metrics,
    );
    let driver = Driver::new(engine, shared.clone());
    tracker.spawn(driver.run(engine_rx, membership.view(), shutdown.clone()));
    if let Some(gossip) = membership.kick_gossip() {
        tracker.spawn(kick_task(shared.clone(), gossip));
    }
    let app = crate::http::router(shared.clone(), tracker.clone());
    let server_shutdown = shutdown.clone();
    let server = tokio::spawn(crate::serve::serve(
        listener,
        app,
        shared.cfg.http.clone(),
        shared.metrics.clone(),
        tls,
        server_shutdown,
    ));
    tracing::info!(
        node = %node_id,
        http = %http_addr,
        gossip = %shared.gossip_addr,
        quic = %shared.links.local_addr(),
        url = %shared.ws_url,
        "node started"
    );
    Ok(NodeHandle {
        shared,
        tracker,
        server,
        membership,
        failed,
    })
}

/// Acts on kicks as they are recorded (by the API, a peer or gossip): gossips each under this
/// node's key and closes this node's sessions it revokes; forgets kicks past their keeping time.
async fn kick_task(shared: Arc<Shared>, gossip: crate::membership::KickGossip) {
    let mut expire = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = shared.kicks.changed() => {}
            _ = expire.tick() => {
                for uid in shared.kicks.expire(crate::auth::unix_now()) {
                    gossip.forget(&uid).await;
                }
                shared.metrics.kicks.set(shared.kicks.len() as i64);
            }
        }
        for (uid, at) in shared.kicks.take_fresh() {
            gossip.publish(&uid, at).await;
            let kick = Command::Kick {
                uid,
                at,
                reply: None,
            };
            if shared.engine.send(kick).await.is_err() {
                return;
            }
        }
        shared.metrics.kicks.set(shared.kicks.len() as i64);
    }
}

impl NodeHandle {
    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.shared.http_addr
    }

    /// `http://addr` (`https://` with TLS), for clients.
    pub fn http_url(&self) -> String {
        let scheme = if self.shared.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.shared.http_addr)
    }

    /// Reads the client TLS certificate and key again (SIGHUP); open connections keep theirs.
    ///
    /// # Errors
    /// Why the new files cannot be used; the old certificate stays in use.
    pub fn reload_tls(&self) -> Result<(), crate::client_tls::TlsError> {
        match &self.shared.tls {
            Some(tls) => tls.reload(),
            None => Ok(()),
        }
    }

    /// The bound gossip address (to seed other nodes with).
    pub fn gossip_addr(&self) -> SocketAddr {
        self.shared.gossip_addr
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

    /// The membership (for measuring failure detection).
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// Resolves with the reason when the node is degraded: its gossip or QUIC endpoint
    /// stopped while it was not shutting down. The process should then exit (non-zero) so
    /// that its supervisor starts it again.
    pub async fn failed(&self) -> String {
        crate::first_failure(self.failed.clone()).await
    }

    /// Resolves when the node was asked to stop.
    pub async fn stopped(&self) {
        self.shared.shutdown.cancelled().await;
    }

    /// What the engine driver still has in flight.
    pub async fn status(&self) -> Option<DriverStatus> {
        let (reply, answer) = oneshot::channel();
        self.shared
            .engine
            .send(Command::Status { reply })
            .await
            .ok()?;
        answer.await.ok()
    }

    /// Drains and stops the node, within `http.shutdown_timeout_ms`:
    /// 1. announces `leaving` in gossip and keeps serving for five gossip rounds, so that peers
    ///    drop it from their views before its users arrive at their new owners;
    /// 2. drops itself from its own view, which sends `moved` (with the new owner) to every
    ///    session and hands the messages held here to their new owners;
    /// 3. waits until no session, delivery or forward is left (or half the bound passed);
    /// 4. closes what is left (sessions with 1001), closes peer links explicitly, stops gossip.
    pub async fn shutdown(self) {
        let bound = Duration::from_millis(self.shared.cfg.http.shutdown_timeout_ms);
        let shared = self.shared.clone();
        let all = async move {
            self.membership.announce_leaving().await;
            let others = self.shared.current_view().members.len() > 1;
            if others {
                let settle = Duration::from_millis(self.shared.cfg.gossip.interval_ms * 5);
                tokio::time::sleep(settle.min(bound / 4)).await;
            }
            self.membership.step_down();
            self.drain(bound / 2).await;
            self.shared.shutdown.cancel();
            self.tracker.close();
            // HTTP connections finish their request in progress; one that dribbles a body must
            // not keep the links and gossip from closing explicitly, so this wait is bounded.
            let _ = tokio::time::timeout(bound / 4, self.server).await;
            self.tracker.wait().await;
            self.shared.links.shutdown().await;
            self.membership.shutdown().await;
        };
        if tokio::time::timeout(bound, all).await.is_err() {
            tracing::warn!(node = %shared.node_id, "shutdown bound reached; tasks left behind");
        }
    }
}

impl NodeHandle {
    async fn drain(&self, budget: Duration) {
        let start = Instant::now();
        // Let the view change reach the driver before judging it idle.
        let settle = Duration::from_millis(self.shared.cfg.gossip.interval_ms);
        loop {
            let others = self.shared.current_view().members.len();
            let status = self.status().await.unwrap_or_default();
            let idle = status == DriverStatus::default();
            if others == 0 && status.sessions == 0 || idle && start.elapsed() >= settle {
                tracing::info!(elapsed = ?start.elapsed(), "drained");
                return;
            }
            if others == 0 && start.elapsed() >= settle {
                tracing::info!(?status, "no other node to hand over to");
                return;
            }
            if start.elapsed() >= budget {
                tracing::warn!(?status, "drain budget spent; closing what is left");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Most commands handled before the driver carries out their actions.
const BATCH: usize = 256;

/// A message forwarded to its owner, waiting for `Outcome { tag }`.
#[derive(Debug)]
struct Forward {
    node: NodeId,
    waiters: Vec<Waiter>,
    id: Arc<str>,
    to: Arc<str>,
    at: std::time::Instant,
}

/// The task that owns the engine.
struct Driver {
    engine: Engine,
    shared: Arc<Shared>,
    outboxes: HashMap<SessionId, Outbox>,
    api_waiters: HashMap<u64, oneshot::Sender<Outcome>>,
    presence_waiters: HashMap<u64, (NodeId, std::time::Instant, oneshot::Sender<usize>)>,
    forwards: HashMap<u64, Forward>,
    next_tag: u64,
    actions: Vec<Action>,
    full: Vec<SessionId>,
    forward_max_age: Duration,
}

impl Driver {
    fn new(engine: Engine, shared: Arc<Shared>) -> Driver {
        let d = &shared.cfg.delivery;
        let one_placement =
            Duration::from_millis(d.hold_ms + d.ack_timeout_ms * (u64::from(d.max_retries) + 1));
        Driver {
            engine,
            outboxes: HashMap::new(),
            api_waiters: HashMap::new(),
            presence_waiters: HashMap::new(),
            forwards: HashMap::new(),
            next_tag: 1,
            actions: Vec::with_capacity(BATCH),
            full: Vec::new(),
            forward_max_age: one_placement * (MAX_PLACEMENTS + 1) + Duration::from_secs(5),
            shared,
        }
    }

    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        mut view: watch::Receiver<Arc<View>>,
        shutdown: CancellationToken,
    ) {
        let far = Duration::from_secs(3600);
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let first = view.borrow_and_update().clone();
        self.on_view(&first);
        loop {
            let wake = self
                .engine
                .next_deadline()
                .map(Instant::from_std)
                .unwrap_or_else(|| Instant::now() + far);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    let now = Instant::now().into_std();
                    self.handle(cmd, now);
                    for _ in 1..BATCH {
                        match rx.try_recv() {
                            Ok(cmd) => self.handle(cmd, now),
                            Err(_) => break,
                        }
                    }
                }
                changed = view.changed() => {
                    if changed.is_err() { break }
                    let v = view.borrow_and_update().clone();
                    self.on_view(&v);
                }
                _ = tokio::time::sleep_until(wake) => {
                    self.engine.tick(Instant::now().into_std(), &mut self.actions);
                }
                _ = sweep.tick() => self.sweep(Instant::now().into_std()),
            }
            self.carry_out();
        }
        tracing::debug!(
            sessions = self.engine.session_count(),
            "engine driver stopped"
        );
    }

    fn handle(&mut self, cmd: Command, now: std::time::Instant) {
        match cmd {
            Command::Open {
                session,
                uid,
                outbox,
            } => {
                // The view may have changed since the upgrade was accepted; view changes are
                // handled here too, so checking again here leaves no window for a session to
                // stay on a node that does not own its user.
                if let Some(owner) = self.shared.owner_of(&uid)
                    && owner.node != self.shared.node_id
                {
                    let _ = outbox.end.send(SessionEnd::Moved(owner));
                    return;
                }
                // A kick recorded after the upgrade checked the token.
                if self
                    .shared
                    .kicks
                    .revokes(&uid, outbox.token_iat.load(Ordering::Relaxed))
                {
                    let _ = outbox.end.send(SessionEnd::Closed(CloseReason::Kicked));
                    return;
                }
                self.outboxes.insert(session, outbox);
                self.engine
                    .open_session(now, session, &uid, &mut self.actions);
            }
            Command::Close { session } => {
                self.outboxes.remove(&session);
                self.engine.close_session(now, session, &mut self.actions);
            }
            Command::Send {
                session,
                id,
                to,
                body,
                ts,
            } => {
                let route = self.shared.route(&to);
                self.engine
                    .send(now, session, &id, &to, body, ts, route, &mut self.actions);
            }
            Command::Ack { session, seq } => self.engine.ack(now, session, seq, &mut self.actions),
            Command::Push { msg, reply } => {
                let req = self.next_tag();
                self.api_waiters.insert(req, reply);
                match self.shared.route(&msg.to) {
                    Route::Local => {
                        self.engine
                            .deliver(now, msg, Waiter::Api(req), &mut self.actions)
                    }
                    Route::Remote(node) => self.forward(node, msg, vec![Waiter::Api(req)], 0, now),
                    Route::Unreachable => {
                        self.unreachable(vec![Waiter::Api(req)], &msg.id, &msg.to);
                    }
                }
            }
            Command::Kick { uid, at, reply } => match reply {
                None => {
                    self.kick_here(&uid, at, now);
                }
                Some(reply) => match self.shared.route(&uid) {
                    Route::Local => {
                        let _ = reply.send(self.kick_here(&uid, at, now));
                    }
                    Route::Remote(node) => {
                        let req = self.next_tag();
                        let frame = PeerFrame::Kick {
                            req,
                            uid: uid.to_string(),
                            at,
                        };
                        if self.shared.links.send(&node, frame) {
                            self.presence_waiters.insert(req, (node, now, reply));
                        }
                    }
                    Route::Unreachable => {}
                },
            },
            Command::Presence { uid, reply } => match self.shared.route(&uid) {
                Route::Local => {
                    let _ = reply.send(self.engine.presence(&uid));
                }
                Route::Remote(node) => {
                    let req = self.next_tag();
                    if self
                        .shared
                        .links
                        .send(&node, PeerFrame::PresenceQuery { req, uid })
                    {
                        self.presence_waiters.insert(req, (node, now, reply));
                    }
                }
                Route::Unreachable => {}
            },
            Command::Peer { from, frame } => self.on_peer_frame(from, frame, now),
            // Reachability is part of the ownership rule: a link that comes or goes can change
            // the owner of users whose sessions live here.
            Command::PeerDown { node } => {
                self.fail_forwards(|n| *n == node, "link down");
                self.rebalance(now);
            }
            Command::PeerUp { .. } => self.rebalance(now),
            Command::Status { reply } => {
                let _ = reply.send(DriverStatus {
                    sessions: self.engine.session_count(),
                    deliveries: self.engine.deliveries_in_flight(),
                    // Forwards whose only waiters are sessions that are gone need no waiting.
                    forwards: self
                        .forwards
                        .values()
                        .filter(|f| {
                            f.waiters.iter().any(|w| match w {
                                Waiter::Session(s) => self.engine.session_uid(*s).is_some(),
                                _ => true,
                            })
                        })
                        .count(),
                });
            }
        }
    }

    fn on_peer_frame(&mut self, from: NodeId, frame: PeerFrame, now: std::time::Instant) {
        match frame {
            PeerFrame::Hello { .. } => {}
            PeerFrame::Deliver { tag, hops, msg } => {
                let checked = match msg.check(self.shared.cfg.limits.max_body_bytes) {
                    Ok(()) => msg.into_message(),
                    Err(why) => {
                        tracing::warn!(peer = %from, why, "refused a message from a peer");
                        None
                    }
                };
                let Some(msg) = checked else {
                    self.shared.metrics.failed(FailReason::Invalid);
                    let outcome = Outcome::Failed(FailReason::Invalid).into();
                    self.shared
                        .links
                        .send(&from, PeerFrame::Outcome { tag, outcome });
                    return;
                };
                let waiter = Waiter::Remote {
                    node: from.clone(),
                    tag,
                };
                match self.shared.route(&msg.to) {
                    // During a ring change the sender may be behind: pass it on, a bounded
                    // number of times, then deliver here (the user will be held for).
                    Route::Remote(node) if hops < 2 && node != from => {
                        self.forward(node, msg, vec![waiter], hops + 1, now)
                    }
                    Route::Unreachable => self.unreachable(vec![waiter], &msg.id, &msg.to),
                    _ => self.engine.deliver(now, msg, waiter, &mut self.actions),
                }
            }
            PeerFrame::Outcome { tag, outcome } => {
                if let Some(f) = self.forwards.remove(&tag) {
                    self.shared
                        .metrics
                        .forward_latency
                        .observe(now.saturating_duration_since(f.at).as_secs_f64());
                    self.resolve(f.waiters, &f.id, &f.to, outcome.into());
                }
            }
            PeerFrame::PresenceQuery { req, uid } => {
                let sessions = u32::try_from(self.engine.presence(&uid)).unwrap_or(u32::MAX);
                self.shared
                    .links
                    .send(&from, PeerFrame::PresenceAnswer { req, sessions });
            }
            PeerFrame::Kick { req, uid, at } => {
                if crate::auth::validate_uid(&uid).is_err() {
                    tracing::warn!(peer = %from, "kick of a malformed uid from a peer ignored");
                    return;
                }
                // Recorded here too (it also comes by gossip), so that this node refuses the
                // revoked tokens from now on.
                if let Err(e) = self.shared.kicks.record(&uid, at, crate::auth::unix_now()) {
                    tracing::warn!(peer = %from, %uid, error = %e, "kick not remembered");
                }
                let closed = self.kick_here(&uid, at, now);
                let sessions = u32::try_from(closed).unwrap_or(u32::MAX);
                self.shared
                    .links
                    .send(&from, PeerFrame::KickAnswer { req, sessions });
            }
            PeerFrame::KickAnswer { req, sessions }
            | PeerFrame::PresenceAnswer { req, sessions } => {
                if let Some((_, _, reply)) = self.presence_waiters.remove(&req) {
                    let _ = reply.send(sessions as usize);
                }
            }
        }
    }

    /// Fails the forwards (and presence questions) to the nodes `lost` selects.
    fn fail_forwards(&mut self, lost: impl Fn(&NodeId) -> bool, why: &str) {
        let tags: Vec<u64> = self
            .forwards
            .iter()
            .filter(|(_, f)| lost(&f.node))
            .map(|(t, _)| *t)
            .collect();
        if !tags.is_empty() {
            tracing::warn!(
                forwards = tags.len(),
                why,
                "failing forwards in flight as unreachable"
            );
        }
        for tag in tags {
            if let Some(f) = self.forwards.remove(&tag) {
                self.unreachable(f.waiters, &f.id, &f.to);
            }
        }
        self.presence_waiters.retain(|_, (n, _, _)| !lost(n));
    }

    fn next_tag(&mut self) -> u64 {
        let t = self.next_tag;
        self.next_tag += 1;
        t
    }

    /// Sends `msg` to its owner `node`; its waiters learn the outcome when it comes back.
    fn forward(
        &mut self,
        node: NodeId,
        msg: Message,
        waiters: Vec<Waiter>,
        hops: u8,
        now: std::time::Instant,
    ) {
        let tag = self.next_tag();
        let frame = PeerFrame::Deliver {
            tag,
            hops,
            msg: WireMessage::from_message(&msg),
        };
        if self.shared.links.send(&node, frame) {
            self.shared.metrics.messages_forwarded.inc();
            self.forwards.insert(
                tag,
                Forward {
                    node,
                    waiters,
                    id: msg.id,
                    to: msg.to,
                    at: now,
                },
            );
        } else {
            self.unreachable(waiters, &msg.id, &msg.to);
        }
    }

    fn unreachable(&mut self, waiters: Vec<Waiter>, id: &str, to: &str) {
        self.shared.metrics.failed(FailReason::Unreachable);
        self.resolve(waiters, id, to, Outcome::Failed(FailReason::Unreachable));
    }

    /// Tells each waiter how a message ended.
    fn resolve(&mut self, waiters: Vec<Waiter>, id: &str, to: &str, outcome: Outcome) {
        for waiter in waiters {
            match waiter {
                Waiter::Session(session) => {
                    self.engine
                        .outcome(session, id, to, outcome, &mut self.actions)
                }
                Waiter::Api(req) => {
                    if let Some(reply) = self.api_waiters.remove(&req) {
                        let _ = reply.send(outcome);
                    }
                }
                Waiter::Remote { node, tag } => {
                    self.shared.links.send(
                        &node,
                        PeerFrame::Outcome {
                            tag,
                            outcome: outcome.into(),
                        },
                    );
                }
            }
        }
    }

    /// Carries out the engine's actions; closing slow sessions can yield more.
    fn carry_out(&mut self) {
        while !self.actions.is_empty() {
            let now = Instant::now().into_std();
            let batch: Vec<Action> = self.actions.drain(..).collect();
            for action in batch {
                match action {
                    Action::Push { session, frame } => {
                        if let Some(outbox) = self.outboxes.get(&session)
                            && let Err(PushError::Full) = outbox.frames.push(frame)
                            && !self.full.contains(&session)
                        {
                            self.full.push(session);
                        }
                    }
                    Action::Close { session, reason } => {
                        if let Some(outbox) = self.outboxes.remove(&session) {
                            let _ = outbox.end.send(SessionEnd::Closed(reason));
                        }
                    }
                    Action::Report {
                        waiter,
                        id,
                        to,
                        outcome,
                        ..
                    } => self.resolve(vec![waiter], &id, &to, outcome),
                    Action::Forward { node, session, msg } => {
                        self.forward(node, msg, vec![Waiter::Session(session)], 0, now)
                    }
                }
            }
            for session in std::mem::take(&mut self.full) {
                if let Some(outbox) = self.outboxes.remove(&session) {
                    self.shared.metrics.slow_consumers.inc();
                    let _ = outbox
                        .end
                        .send(SessionEnd::Closed(CloseReason::SlowConsumer));
                    self.engine.close_session(now, session, &mut self.actions);
                }
            }
        }
    }

    /// A new membership view: relink, then move away the users this node no longer owns.
    fn on_view(&mut self, view: &Arc<View>) {
        self.shared.view_changed();
        self.shared.links.update(view);
        // A node that left the view but still has its link up is draining: it hands what it
        // holds over and relays the outcomes, so its forwards wait (a dead one's link times out).
        let links = self.shared.links.clone();
        self.fail_forwards(
            |n| !view.members.contains_key(n) && !links.is_up(n),
            "owner left the cluster",
        );
        self.shared
            .metrics
            .gossip_members
            .set(view.members.len() as i64);
        self.rebalance(Instant::now().into_std());
    }

    /// Closes (4005) the sessions of `uid` here whose token was issued up to `at`; returns how
    /// many.
    fn kick_here(&mut self, uid: &str, at: u64, now: std::time::Instant) -> usize {
        let mut closed = 0;
        for session in self.engine.sessions_of(uid) {
            let revoked = self
                .outboxes
                .get(&session)
                .is_some_and(|o| o.token_iat.load(Ordering::Relaxed) <= at);
            if !revoked {
                continue;
            }
            if let Some(outbox) = self.outboxes.remove(&session) {
                let _ = outbox.end.send(SessionEnd::Closed(CloseReason::Kicked));
            }
            self.engine.close_session(now, session, &mut self.actions);
            closed += 1;
        }
        if closed > 0 {
            tracing::info!(%uid, sessions = closed, "kicked");
        }
        closed
    }

    /// Moves away the sessions and held messages of users this node no longer owns.
    fn rebalance(&mut self, now: std::time::Instant) {
        let mut moved = 0usize;
        for (session, uid) in self.engine.sessions() {
            let Some(owner) = self.shared.owner_of(&uid) else {
                continue;
            };
            if owner.node == self.shared.node_id {
                continue;
            }
            if let Some(outbox) = self.outboxes.remove(&session) {
                let _ = outbox.end.send(SessionEnd::Moved(owner));
            }
            self.engine.close_session(now, session, &mut self.actions);
            moved += 1;
        }
        for uid in self.engine.users_with_held() {
            if let Route::Remote(node) = self.shared.route(&uid) {
                for (msg, waiters) in self.engine.take_held(&uid) {
                    self.forward(node.clone(), msg, waiters, 1, now);
                }
            }
        }
        if moved > 0 {
            tracing::info!(moved, "sessions moved to their new owners");
        }
    }

    /// Fails forwards and presence questions that can no longer be answered in time.
    fn sweep(&mut self, now: std::time::Instant) {
        let max_age = self.forward_max_age;
        let stale: Vec<u64> = self
            .forwards
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.at) > max_age)
            .map(|(t, _)| *t)
            .collect();
        for tag in stale {
            if let Some(f) = self.forwards.remove(&tag) {
                tracing::warn!(node = %f.node, id = %f.id, "no outcome from the owner in time");
                self.unreachable(f.waiters, &f.id, &f.to);
            }
        }
        self.presence_waiters
            .retain(|_, (_, at, _)| now.saturating_duration_since(*at) < Duration::from_secs(5));
        self.api_waiters.retain(|_, reply| !reply.is_closed());
    }
}
