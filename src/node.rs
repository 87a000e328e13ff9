//! A running node: binds its ports, joins the cluster, starts its tasks, and drains and stops
//! them.
//!
//! [`start`] wires the parts together: the QUIC links ([`crate::peer`]) and gossip
//! ([`crate::membership`]) feed the driver ([`crate::driver`]), which owns the node's relay
//! ([`crate::relay`]); the HTTP server ([`crate::serve`], [`crate::http`]) and the sessions
//! ([`crate::session`]) reach it through [`Shared::engine`]. [`NodeHandle::shutdown`] drains.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::TokenKeys;
use crate::config::{Config, ConfigError};
use crate::driver::{Driver, Inputs};
use crate::engine::NodeId;
use crate::membership::{Membership, SelfInfo};
use crate::metrics::Metrics;
use crate::peer::{Links, PeerError};
use crate::relay::{Relay, RelayConfig, Status};
use crate::state::{Command, Shared};

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
    /// The webhook sender cannot start.
    #[error("webhooks: {0}")]
    Webhooks(String),
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

/// Inbox of the driver: bounded so that a flood of client frames waits at the sessions'
/// readers (TCP backpressure) instead of growing memory.
const ENGINE_INBOX: usize = 8192;
/// Link events waiting for the driver: bounded so that a fast peer waits (QUIC flow control).
const LINK_INBOX: usize = 8192;

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
    let (link_tx, link_rx) = mpsc::channel(LINK_INBOX);
    let links = Links::start(
        node_id.clone(),
        cfg.cluster.id.clone(),
        node_cfg.quic,
        &cfg.cluster.secret,
        cfg.quic.clone(),
        link_tx.clone(),
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
    let tracker = TaskTracker::new();
    let webhooks = crate::webhooks::Webhooks::start(
        &cfg.webhooks,
        node_id.clone(),
        metrics.clone(),
        shutdown.clone(),
        &tracker,
    )
    .map_err(NodeError::Webhooks)?;
    let shared = Arc::new(Shared {
        webhooks: webhooks.clone(),
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
        link_events: link_tx,
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
    let relay = Relay::new(
        RelayConfig::from_config(&shared.cfg),
        node_id.clone(),
        metrics,
    );
    let driver = Driver::new(relay, shared.links.clone(), kicks.clone()).with_webhooks(webhooks);
    tracker.spawn(driver.run(Inputs {
        commands: engine_rx,
        links: link_rx,
        view: membership.view(),
        shutdown: shutdown.clone(),
    }));
    // Readiness waits for the view to settle.
    {
        let shared = shared.clone();
        let mut view = membership.view();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    changed = view.changed() => {
                        if changed.is_err() { return }
                        shared.view_changed();
                    }
                }
            }
        });
    }
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
                for uid in shared.kicks.expire(crate::clock::unix_now()) {
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

    /// What the driver still has in flight.
    pub async fn status(&self) -> Option<Status> {
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
            let idle = status == Status::default();
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
