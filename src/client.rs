//! The client SDK: a user's connection to an imgate cluster that survives node failures.
//!
//! [`Client::start`] spawns one task that logs in at any live node of a list, connects to the
//! owner it names, follows `moved`, and reconnects with exponential backoff and jitter when the
//! connection ends or stops answering pings. Every send that has no outcome yet is sent again
//! (same `id`) after each reconnect, so a send only ends in `delivered` or `failed`. Incoming
//! messages are deduplicated by `(from, id)` before the application sees them, and acked once
//! the application's channel has taken them.
//!
//! Rooms: [`Client::join`], [`Client::leave`] and [`Client::send_room`]. The client remembers
//! the rooms it joined; after a reconnect, a room that the session's `welcome.rooms` lacks is
//! joined again (belt and braces: the cluster keeps memberships through node failures).
//!
//! ```no_run
//! # async fn demo() -> Result<(), imgate::client::ClientError> {
//! use imgate::client::{Client, ClientConfig};
//! let (client, mut incoming, _events) =
//!     Client::start(ClientConfig::new(vec!["http://127.0.0.1:9501".into()], "alice"));
//! let outcome = client.send("bob", serde_json::json!({"text": "hi"}))?.await?;
//! println!("{outcome:?}");
//! while let Some(m) = incoming.recv().await {
//!     println!("{}: {}", m.from, m.body);
//! }
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::protocol::FailReason;

/// Settings of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// HTTP base URLs of nodes to log in at (`http://host:port`); any live one will do.
    pub nodes: Vec<String>,
    /// The user.
    pub uid: String,
    /// Password, for `users` auth mode.
    pub password: Option<String>,
    /// First reconnect delay; doubles up to `max_backoff`, with up to 50% jitter.
    pub min_backoff: Duration,
    /// Longest reconnect delay.
    pub max_backoff: Duration,
    /// Log in again when the token expires within this margin; a live session gets a new
    /// token (`refresh`) this long before its token expires (or at half its remaining life,
    /// if that comes later), so that the node never closes it with 4004.
    pub relogin_margin: Duration,
    /// Attempts per send (same id) while it fails `unreachable`, `timeout` or `offline`;
    /// 1 means a `failed` is final.
    pub max_attempts: u32,
    /// Sends waiting for an outcome; more are refused with [`ClientError::TooManyPending`].
    pub max_pending: usize,
    /// Incoming `(from, id)` pairs remembered for dedup.
    pub dedup_capacity: usize,
    /// Interval of application pings; a connection without a pong for two intervals is
    /// dropped and a new one made.
    pub ping_interval: Duration,
    /// Prefix of generated message ids (random per client start by default).
    pub id_prefix: String,
    /// Time allowed for one login request and for one WebSocket connect; a node that does
    /// not answer in time is skipped for the next one.
    pub request_timeout: Duration,
    /// Where to report every answer the node gives to an attempt of a send (`delivered` or
    /// `failed`), before the SDK decides whether to try again: for tests and reports that
    /// must see what the server said, not only the final outcome. `None` by default.
    pub attempts: Option<mpsc::UnboundedSender<Attempt>>,
    /// Extra root certificates (PEM) trusted for `https://` and `wss://`, besides the public
    /// roots (webpki-roots): for a cluster whose certificates come from a private CA.
    pub ca_pem: Option<String>,
}

/// The node's answer to one attempt of a send (see [`ClientConfig::attempts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// The message id.
    pub id: String,
    /// The recipient.
    pub to: String,
    /// Which attempt this was, from 1 (a resend after a reconnect is the same attempt).
    pub number: u32,
    /// What the node answered.
    pub outcome: SendOutcome,
    /// When this attempt's frame was last written.
    pub written: Instant,
    /// When the answer arrived.
    pub answered: Instant,
}

impl ClientConfig {
    /// Defaults for `uid` with these nodes.
    pub fn new(nodes: Vec<String>, uid: &str) -> ClientConfig {
        ClientConfig {
            nodes,
            uid: uid.to_string(),
            password: None,
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            relogin_margin: Duration::from_secs(300),
            max_attempts: 1,
            max_pending: 4096,
            dedup_capacity: 10_000,
            ping_interval: Duration::from_secs(10),
            id_prefix: format!("{:08x}", rand::random::<u32>()),
            request_timeout: Duration::from_secs(2),
            attempts: None,
            ca_pem: None,
        }
    }
}

/// Errors of the SDK.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ClientError {
    /// Too many sends wait for an outcome.
    #[error("too many sends waiting for an outcome")]
    TooManyPending,
    /// The client was closed before the send ended.
    #[error("client closed")]
    Closed,
    /// The id or recipient is not acceptable (id: 1 to 64 bytes; recipient: a uid).
    #[error("invalid send: {0}")]
    Invalid(&'static str),
    /// The node refused the frame (`error` with this id).
    #[error("refused: {code}: {message}")]
    Refused {
        /// Error code.
        code: String,
        /// Message.
        message: String,
    },
}

/// How a send ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// A device of the recipient acked it.
    Delivered,
    /// It will not be delivered.
    Failed(FailReason),
}

/// How a room send ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoomSendOutcome {
    /// Every member's delivery ended (the `room_result` frame).
    Done {
        /// Members it went to.
        members: u32,
        /// Members with a device that acked.
        delivered: u32,
        /// Members with no session within the hold time.
        offline: u32,
        /// Members whose delivery failed otherwise.
        failed: u32,
    },
    /// Refused at once: `forbidden` (not a member), `invalid`, `too_large`, `rate_limited`,
    /// `unreachable`.
    Failed(FailReason),
}

/// How a `join` or `leave` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// A member now; the room's member count.
    Joined {
        /// Members of the room.
        members: u32,
    },
    /// Not a member (any more).
    Left,
    /// Refused: `limit`, `invalid`, `unreachable`.
    Failed(FailReason),
}

/// A message for the application.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    /// The room, for a room message.
    pub room: Option<String>,
    /// Sender uid.
    pub from: String,
    /// Sender's message id.
    pub id: String,
    /// Body.
    pub body: Value,
    /// When the sender's node took it, ms since the epoch.
    pub ts: u64,
}

/// Connection state changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A session is live at `node`.
    Connected {
        /// Node id.
        node: String,
        /// Session id.
        session: String,
    },
    /// The session ended; the client reconnects.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// The node said the user lives elsewhere now.
    Moved {
        /// The new owner.
        node: String,
    },
}

enum Cmd {
    Send {
        id: String,
        target: Target,
        body: Value,
        transient: bool,
        reply: Reply,
    },
    Join {
        room: String,
        join: bool,
        reply: oneshot::Sender<Result<Membership, ClientError>>,
    },
}

/// Where a send goes.
#[derive(Debug, Clone)]
enum Target {
    User(String),
    Room(String),
}

/// Where a send's outcome goes.
enum Reply {
    Direct(oneshot::Sender<Result<SendOutcome, ClientError>>),
    Room(oneshot::Sender<Result<RoomSendOutcome, ClientError>>),
}

impl Reply {
    fn failed(self, reason: FailReason) {
        match self {
            Reply::Direct(tx) => drop(tx.send(Ok(SendOutcome::Failed(reason)))),
            Reply::Room(tx) => drop(tx.send(Ok(RoomSendOutcome::Failed(reason)))),
        }
    }

    fn delivered(self) {
        if let Reply::Direct(tx) = self {
            let _ = tx.send(Ok(SendOutcome::Delivered));
        }
    }

    fn done(self, f: &Value) {
        let n = |k: &str| u32::try_from(f[k].as_u64().unwrap_or(0)).unwrap_or(u32::MAX);
        if let Reply::Room(tx) = self {
            let _ = tx.send(Ok(RoomSendOutcome::Done {
                members: n("members"),
                delivered: n("delivered"),
                offline: n("offline"),
                failed: n("failed"),
            }));
        }
    }

    fn error(self, e: ClientError) {
        match self {
            Reply::Direct(tx) => drop(tx.send(Err(e))),
            Reply::Room(tx) => drop(tx.send(Err(e))),
        }
    }

    fn too_many(self) {
        self.error(ClientError::TooManyPending)
    }
}

/// A room send in flight; resolves to its outcome.
#[derive(Debug)]
pub struct PendingRoomSend {
    id: String,
    rx: oneshot::Receiver<Result<RoomSendOutcome, ClientError>>,
}

impl PendingRoomSend {
    /// The message id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Future for PendingRoomSend {
    type Output = Result<RoomSendOutcome, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(ClientError::Closed)))
    }
}

/// A `join` or `leave` in flight; resolves to its answer.
#[derive(Debug)]
pub struct PendingMembership {
    rx: oneshot::Receiver<Result<Membership, ClientError>>,
}

impl Future for PendingMembership {
    type Output = Result<Membership, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(ClientError::Closed)))
    }
}

/// A send in flight; resolves to its outcome.
#[derive(Debug)]
pub struct PendingSend {
    id: String,
    rx: oneshot::Receiver<Result<SendOutcome, ClientError>>,
}

impl PendingSend {
    /// The message id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Future for PendingSend {
    type Output = Result<SendOutcome, ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(ClientError::Closed)))
    }
}

/// A handle to a running client; cheap to clone. Dropping every handle stops the client.
#[derive(Debug, Clone)]
pub struct Client {
    cmd: mpsc::Sender<Cmd>,
    uid: String,
    prefix: String,
    counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stats: std::sync::Arc<ClientStats>,
}

/// Counters of one client, for reports and tests.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Send frames written again (after a reconnect, or after a retryable `failed`).
    pub resent: std::sync::atomic::AtomicU64,
    /// Incoming messages dropped because their `(from, id)` was already seen.
    pub duplicates: std::sync::atomic::AtomicU64,
    /// Sessions welcomed (the first included).
    pub sessions: std::sync::atomic::AtomicU64,
    /// Rooms joined again after a reconnect because `welcome.rooms` lacked them.
    pub rejoined: std::sync::atomic::AtomicU64,
}

fn bump(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cmd")
    }
}

impl Client {
    /// Starts the client task; returns the handle, incoming messages and state events.
    pub fn start(cfg: ClientConfig) -> (Client, mpsc::Receiver<Incoming>, mpsc::Receiver<Event>) {
        let (cmd_tx, cmd_rx) = mpsc::channel(cfg.max_pending);
        let (in_tx, in_rx) = mpsc::channel(1024);
        let (ev_tx, ev_rx) = mpsc::channel(64);
        let client = Client {
            cmd: cmd_tx,
            uid: cfg.uid.clone(),
            prefix: cfg.id_prefix.clone(),
            counter: Default::default(),
            stats: Default::default(),
        };
        tokio::spawn(run(cfg, cmd_rx, in_tx, ev_tx, client.stats.clone()));
        (client, in_rx, ev_rx)
    }

    /// This client's counters.
    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// The user.
    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// Sends `body` to `to` with a fresh id; the returned future resolves to the outcome.
    ///
    /// # Errors
    /// [`ClientError::TooManyPending`] or [`ClientError::Closed`] at once.
    pub fn send(&self, to: &str, body: Value) -> Result<PendingSend, ClientError> {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.send_with_id(&format!("{}-{n}", self.prefix), to, body)
    }

    /// Sends with a caller-chosen id (unique per user).
    ///
    /// # Errors
    /// [`ClientError::Invalid`], [`ClientError::TooManyPending`] or [`ClientError::Closed`]
    /// at once.
    pub fn send_with_id(
        &self,
        id: &str,
        to: &str,
        body: Value,
    ) -> Result<PendingSend, ClientError> {
        crate::uid::validate_uid(to).map_err(ClientError::Invalid)?;
        let (reply, rx) = oneshot::channel();
        self.queue(
            id,
            Target::User(to.to_string()),
            body,
            false,
            Reply::Direct(reply),
        )?;
        Ok(PendingSend {
            id: id.to_string(),
            rx,
        })
    }

    /// Sends `body` to every member of `room` (this user must be one), with a fresh id; the
    /// future resolves to the `room_result` once every member's delivery ended.
    ///
    /// # Errors
    /// As [`Client::send`].
    pub fn send_room(&self, room: &str, body: Value) -> Result<PendingRoomSend, ClientError> {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}-{n}", self.prefix);
        crate::uid::validate_uid(room).map_err(ClientError::Invalid)?;
        let (reply, rx) = oneshot::channel();
        self.queue(
            &id,
            Target::Room(room.to_string()),
            body,
            false,
            Reply::Room(reply),
        )?;
        Ok(PendingRoomSend { id, rx })
    }

    /// Makes this user a member of `room` (all its devices, now and later).
    ///
    /// # Errors
    /// [`ClientError::Invalid`] for a bad room id; as [`Client::send`] otherwise.
    pub fn join(&self, room: &str) -> Result<PendingMembership, ClientError> {
        self.membership(room, true)
    }

    /// Ends this user's membership of `room` (answered `Left` even if it was none).
    ///
    /// # Errors
    /// As [`Client::join`].
    pub fn leave(&self, room: &str) -> Result<PendingMembership, ClientError> {
        self.membership(room, false)
    }

    fn membership(&self, room: &str, join: bool) -> Result<PendingMembership, ClientError> {
        crate::uid::validate_uid(room).map_err(ClientError::Invalid)?;
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Join {
            room: room.to_string(),
            join,
            reply,
        };
        self.cmd.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ClientError::TooManyPending,
            mpsc::error::TrySendError::Closed(_) => ClientError::Closed,
        })?;
        Ok(PendingMembership { rx })
    }

    /// Sends a transient message (a typing indicator, a read receipt): the node pushes it once
    /// and holds nothing; it resolves to `delivered`, or to `failed` (`offline` at once when `to`
    /// has no session, `timeout` without an ack). It is never sent again: if the session ends
    /// first, it resolves to `failed: unreachable` (outcome unknown).
    ///
    /// # Errors
    /// As [`Client::send`].
    pub fn send_transient(&self, to: &str, body: Value) -> Result<PendingSend, ClientError> {
        let n = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}-{n}", self.prefix);
        crate::uid::validate_uid(to).map_err(ClientError::Invalid)?;
        let (reply, rx) = oneshot::channel();
        self.queue(
            &id,
            Target::User(to.to_string()),
            body,
            true,
            Reply::Direct(reply),
        )?;
        Ok(PendingSend { id, rx })
    }

    fn queue(
        &self,
        id: &str,
        target: Target,
        body: Value,
        transient: bool,
        reply: Reply,
    ) -> Result<(), ClientError> {
        if id.is_empty() || id.len() > crate::protocol::MAX_ID_BYTES {
            return Err(ClientError::Invalid("id must be 1 to 64 bytes"));
        }
        let cmd = Cmd::Send {
            id: id.to_string(),
            target,
            body,
            transient,
            reply,
        };
        self.cmd.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ClientError::TooManyPending,
            mpsc::error::TrySendError::Closed(_) => ClientError::Closed,
        })
    }
}

struct Pending {
    id: String,
    target: Target,
    body: Value,
    transient: bool,
    attempts: u32,
    written: Instant,
    reply: Reply,
}

impl Pending {
    fn new(id: String, target: Target, body: Value, transient: bool, reply: Reply) -> Pending {
        Pending {
            id,
            target,
            body,
            transient,
            attempts: 1,
            written: Instant::now(),
            reply,
        }
    }

    /// The frame to write now (remembering when it was written).
    fn frame(&mut self) -> WsMessage {
        self.written = Instant::now();
        send_frame(self)
    }

    /// Tells `cfg.attempts` how this attempt ended.
    fn report(&self, cfg: &ClientConfig, outcome: SendOutcome) {
        if let Some(tx) = &cfg.attempts {
            let to = match &self.target {
                Target::User(u) | Target::Room(u) => u.clone(),
            };
            let _ = tx.send(Attempt {
                id: self.id.clone(),
                to,
                number: self.attempts,
                outcome,
                written: self.written,
                answered: Instant::now(),
            });
        }
    }
}

/// Sends waiting for an outcome, in the order they were made.
#[derive(Default)]
struct PendingSet {
    by_order: BTreeMap<u64, Pending>,
    order_of: HashMap<String, Vec<u64>>,
    next: u64,
}

impl PendingSet {
    fn len(&self) -> usize {
        self.by_order.len()
    }

    fn insert(&mut self, p: Pending) -> u64 {
        let k = self.next;
        self.next += 1;
        self.order_of.entry(p.id.clone()).or_default().push(k);
        self.by_order.insert(k, p);
        k
    }

    /// Removes the oldest send with `id`.
    fn take(&mut self, id: &str) -> Option<Pending> {
        let keys = self.order_of.get_mut(id)?;
        let k = keys.remove(0);
        if keys.is_empty() {
            self.order_of.remove(id);
        }
        self.by_order.remove(&k)
    }

    /// Removes every transient send: they are never sent again.
    fn take_transient(&mut self) -> Vec<Pending> {
        let keys: Vec<u64> = self
            .by_order
            .iter()
            .filter(|(_, p)| p.transient)
            .map(|(k, _)| *k)
            .collect();
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(p) = self.by_order.remove(&k) {
                if let Some(ks) = self.order_of.get_mut(&p.id) {
                    ks.retain(|x| *x != k);
                    if ks.is_empty() {
                        self.order_of.remove(&p.id);
                    }
                }
                out.push(p);
            }
        }
        out
    }

    fn peek_mut(&mut self, id: &str) -> Option<&mut Pending> {
        let k = *self.order_of.get(id)?.first()?;
        self.by_order.get_mut(&k)
    }
}

/// Remembers the last `cap` incoming `(from, id)`.
struct Seen {
    set: HashSet<(String, String)>,
    order: VecDeque<(String, String)>,
    cap: usize,
}

impl Seen {
    fn insert(&mut self, key: (String, String)) -> bool {
        if self.set.contains(&key) {
            return false;
        }
        if self.order.len() >= self.cap
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.order.push_back(key.clone());
        self.set.insert(key);
        true
    }
}

fn send_frame(p: &Pending) -> WsMessage {
    let mut f = match &p.target {
        Target::User(to) => json!({"type": "send", "id": p.id, "to": to, "body": p.body}),
        Target::Room(room) => json!({"type": "send", "id": p.id, "room": room, "body": p.body}),
    };
    if p.transient {
        f["transient"] = Value::Bool(true);
    }
    WsMessage::Text(f.to_string().into())
}

fn retryable(reason: FailReason) -> bool {
    matches!(
        reason,
        FailReason::Unreachable | FailReason::Timeout | FailReason::Offline
    )
}

/// A `join` or `leave` waiting for its answer.
struct Join {
    room: String,
    join: bool,
    reply: oneshot::Sender<Result<Membership, ClientError>>,
}

fn join_frame(id: &str, j: &Join) -> WsMessage {
    let ty = if j.join { "join" } else { "leave" };
    WsMessage::Text(
        json!({"type": ty, "room": j.room, "id": id})
            .to_string()
            .into(),
    )
}

/// What the client task keeps across sessions.
struct State {
    pending: PendingSet,
    seen: Seen,
    stats: std::sync::Arc<ClientStats>,
    /// Joins and leaves waiting for their answer, by frame id.
    joins: BTreeMap<String, Join>,
    next_join: u64,
    /// `join` frames to write after this welcome.
    rejoin: Vec<WsMessage>,
    /// The rooms this user joined (or was told of by `welcome`), for the re-join check.
    rooms: BTreeSet<String>,
}

impl State {
    /// Registers a join or leave; its frame, or `None` when too many wait (answered).
    fn join(&mut self, cfg: &ClientConfig, j: Join) -> Option<WsMessage> {
        if self.joins.len() >= cfg.max_pending {
            let _ = j.reply.send(Err(ClientError::TooManyPending));
            return None;
        }
        if !j.join {
            self.rooms.remove(&j.room);
        }
        let id = format!("{}-j{}", cfg.id_prefix, self.next_join);
        self.next_join += 1;
        let frame = join_frame(&id, &j);
        self.joins.insert(id, j);
        Some(frame)
    }
}

struct Login {
    token: String,
    url: String,
    expires_at: u64,
}

impl Login {
    /// When a session on this token should get a new one.
    fn refresh_at(&self, margin: Duration) -> Instant {
        let now_ms = crate::clock::now_ms();
        let left = self.expires_at.saturating_mul(1000).saturating_sub(now_ms);
        let lead = (margin.as_millis() as u64).min(left / 2);
        Instant::now() + Duration::from_millis(left - lead)
    }
}

/// The TLS settings of the client: the public roots plus the PEM certificates in `ca_pem`.
///
/// # Errors
/// A message when `ca_pem` holds no usable certificate.
pub fn tls_config(ca_pem: Option<&str>) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = ca_pem {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| format!("not PEM: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("unusable certificate: {e}"))?;
            added += 1;
        }
        if added == 0 {
            return Err("no CERTIFICATE block in ca_pem".into());
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .map_err(|e| e.to_string())
}

/// Opens a WebSocket to `url` (`ws://` or `wss://`, the latter with `tls`).
async fn connect(
    url: String,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let connector = tokio_tungstenite::Connector::Rustls(tls);
    tokio_tungstenite::connect_async_tls_with_config(url, None, false, Some(connector))
        .await
        .map(|(ws, _)| ws)
}

async fn login(http: &reqwest::Client, cfg: &ClientConfig, start: usize) -> Option<Login> {
    for i in 0..cfg.nodes.len() {
        let base = cfg.nodes[(start + i) % cfg.nodes.len()].trim_end_matches('/');
        let mut body = json!({"uid": cfg.uid});
        if let Some(p) = &cfg.password {
            body["password"] = json!(p);
        }
        let resp = http
            .post(format!("{base}/login"))
            .json(&body)
            .timeout(cfg.request_timeout)
            .send()
            .await;
        let Ok(resp) = resp else { continue };
        if !resp.status().is_success() {
            tracing::debug!(node = base, status = %resp.status(), "login refused");
            continue;
        }
        let Ok(v) = resp.json::<Value>().await else {
            continue;
        };
        if let (Some(token), Some(url)) = (v["token"].as_str(), v["url"].as_str()) {
            return Some(Login {
                token: token.to_string(),
                url: url.to_string(),
                expires_at: v["expires_at"].as_u64().unwrap_or(0),
            });
        }
    }
    None
}

async fn run(
    cfg: ClientConfig,
    mut cmds: mpsc::Receiver<Cmd>,
    incoming: mpsc::Sender<Incoming>,
    events: mpsc::Sender<Event>,
    stats: std::sync::Arc<ClientStats>,
) {
    let tls = match tls_config(cfg.ca_pem.as_deref()) {
        Ok(tls) => Arc::new(tls),
        Err(e) => {
            tracing::error!(error = %e, "client TLS configuration");
            let _ = events.try_send(Event::Disconnected {
                reason: format!("bad ca_pem: {e}"),
            });
            return;
        }
    };
    let http = match reqwest::Client::builder()
        .use_preconfigured_tls((*tls).clone())
        .build()
    {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "HTTP client");
            return;
        }
    };
    let mut st = State {
        pending: PendingSet::default(),
        seen: Seen {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap: cfg.dedup_capacity.max(1),
        },
        stats,
        joins: BTreeMap::new(),
        next_join: 0,
        rejoin: Vec::new(),
        rooms: BTreeSet::new(),
    };
    let mut session: Option<Login> = None;
    let mut backoff = cfg.min_backoff;
    let mut start = rand::random::<u32>() as usize;
    let mut moves = 0u32;
    loop {
        // 1. A token and the owner's URL.
        let now = crate::clock::unix_now();
        let fresh = session
            .as_ref()
            .is_some_and(|s| s.expires_at > now + cfg.relogin_margin.as_secs());
        if !fresh {
            session = login(&http, &cfg, start).await;
            start = start.wrapping_add(1);
        }
        let Some(s) = &session else {
            if !wait_backoff(&mut backoff, &cfg, &mut cmds, &mut st).await {
                return;
            }
            continue;
        };
        // 2. The WebSocket and its welcome (or a moved).
        let url = format!("{}?token={}", s.url, s.token);
        let connected = tokio::time::timeout(cfg.request_timeout, connect(url, tls.clone())).await;
        let mut ws = match connected {
            Ok(Ok(ws)) => ws,
            _ => {
                session = None; // the owner may be gone: ask a node again
                if !wait_backoff(&mut backoff, &cfg, &mut cmds, &mut st).await {
                    return;
                }
                continue;
            }
        };
        let first = tokio::time::timeout(Duration::from_secs(3), ws.next()).await;
        let first: Value = match first {
            Ok(Some(Ok(WsMessage::Text(t)))) => serde_json::from_str(&t).unwrap_or(Value::Null),
            _ => Value::Null,
        };
        match first["type"].as_str() {
            Some("welcome") => {
                moves = 0;
                bump(&st.stats.sessions);
                rejoin_check(&mut st, &first);
                let _ = events.try_send(Event::Connected {
                    node: first["node"].as_str().unwrap_or("").to_string(),
                    session: first["session"].as_str().unwrap_or("").to_string(),
                });
            }
            Some("moved") => {
                let _ = events.try_send(Event::Moved {
                    node: first["node"].as_str().unwrap_or("").to_string(),
                });
                moves += 1;
                if let (Some(s), Some(url)) = (session.as_mut(), first["url"].as_str())
                    && moves < 4
                {
                    s.url = url.to_string();
                    continue;
                }
                session = None;
                if !wait_backoff(&mut backoff, &cfg, &mut cmds, &mut st).await {
                    return;
                }
                continue;
            }
            _ => {
                session = None;
                if !wait_backoff(&mut backoff, &cfg, &mut cmds, &mut st).await {
                    return;
                }
                continue;
            }
        }
        backoff = cfg.min_backoff;
        // 3. Resend everything without an outcome, in order, with the same ids; transient sends
        //    are not sent again (their outcome is unknown).
        for p in st.pending.take_transient() {
            p.reply.failed(FailReason::Unreachable);
        }
        let mut ok = true;
        // Joins and leaves without an answer (idempotent), and rooms the welcome lacked.
        let frames: Vec<WsMessage> = st
            .joins
            .iter()
            .map(|(id, j)| join_frame(id, j))
            .chain(st.rejoin.drain(..))
            .collect();
        for f in frames {
            if ws.feed(f).await.is_err() {
                ok = false;
                break;
            }
        }
        for p in st.pending.by_order.values_mut() {
            bump(&st.stats.resent);
            if ws.feed(p.frame()).await.is_err() {
                ok = false;
                break;
            }
        }
        if ok && ws.flush().await.is_err() {
            ok = false;
        }
        // 4. Serve the session.
        let reason = if ok {
            serve(
                &cfg,
                &http,
                &mut ws,
                &mut cmds,
                &incoming,
                &mut st,
                &mut session,
            )
            .await
        } else {
            Ended::Reconnect("write failed".into())
        };
        match reason {
            Ended::Stop => {
                let _ = ws.close(None).await;
                return;
            }
            Ended::Moved(node) => {
                let _ = events.try_send(Event::Moved { node });
            }
            Ended::Reconnect(reason) => {
                let _ = events.try_send(Event::Disconnected { reason });
                session = None;
                if !wait_backoff(&mut backoff, &cfg, &mut cmds, &mut st).await {
                    return;
                }
            }
        }
    }
}

/// Compares the session's `welcome.rooms` with the rooms this client joined: the ones it lacks
/// are joined again (frames in `st.rejoin`), the ones it lists are remembered.
fn rejoin_check(st: &mut State, welcome: &Value) {
    let listed: BTreeSet<String> = welcome["rooms"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let leaving: HashSet<&str> = st
        .joins
        .values()
        .filter(|j| !j.join)
        .map(|j| j.room.as_str())
        .collect();
    st.rejoin.clear();
    for room in st.rooms.difference(&listed) {
        tracing::info!(%room, "welcome lacks a joined room; joining again");
        bump(&st.stats.rejoined);
        let f = json!({"type": "join", "room": room});
        st.rejoin.push(WsMessage::Text(f.to_string().into()));
    }
    let fresh: Vec<String> = listed
        .into_iter()
        .filter(|r| !leaving.contains(r.as_str()))
        .collect();
    st.rooms.extend(fresh);
}

enum Ended {
    Stop,
    Moved(String),
    Reconnect(String),
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn serve(
    cfg: &ClientConfig,
    http: &reqwest::Client,
    ws: &mut Ws,
    cmds: &mut mpsc::Receiver<Cmd>,
    incoming: &mpsc::Sender<Incoming>,
    st: &mut State,
    session: &mut Option<Login>,
) -> Ended {
    let mut ping = tokio::time::interval_at(Instant::now() + cfg.ping_interval, cfg.ping_interval);
    let mut last_heard = Instant::now();
    // A new token before this one expires: logged in on a task, so that the session goes on
    // meanwhile, then handed to the node in a `refresh` frame.
    let far = Duration::from_secs(366 * 86_400);
    let refresh = tokio::time::sleep_until(
        session
            .as_ref()
            .map_or(Instant::now() + far, |s| s.refresh_at(cfg.relogin_margin)),
    );
    tokio::pin!(refresh);
    let mut relogin: Option<tokio::task::JoinHandle<Option<Login>>> = None;
    loop {
        tokio::select! {
            _ = &mut refresh, if relogin.is_none() => {
                let (http, cfg) = (http.clone(), cfg.clone());
                let start = rand::random::<u32>() as usize;
                relogin = Some(tokio::spawn(async move { login(&http, &cfg, start).await }));
                refresh.as_mut().reset(Instant::now() + far);
            }
            fresh = async { relogin.as_mut().expect("guarded").await }, if relogin.is_some() => {
                relogin = None;
                match fresh.ok().flatten() {
                    Some(new) => {
                        let f = json!({"type": "refresh", "token": new.token});
                        if ws.send(WsMessage::Text(f.to_string().into())).await.is_err() {
                            return Ended::Reconnect("write failed".into());
                        }
                        if let Some(s) = session.as_mut() {
                            s.token = new.token;
                            s.expires_at = new.expires_at;
                            refresh.as_mut().reset(s.refresh_at(cfg.relogin_margin));
                        }
                    }
                    // No node answered: try again shortly; the session lives until expiry.
                    None => refresh.as_mut().reset(Instant::now() + cfg.max_backoff),
                }
            }
                        cmd = cmds.recv() => {
                let frame = match cmd {
                    None => return Ended::Stop,
                    Some(Cmd::Join { room, join, reply }) => {
                        match st.join(cfg, Join { room, join, reply }) {
                            Some(f) => f,
                            None => continue,
                        }
                    }
                    Some(Cmd::Send { id, target, body, transient, reply }) => {
                        if st.pending.len() >= cfg.max_pending {
                            reply.too_many();
                            continue;
                        }
                        let mut p = Pending::new(id, target, body, transient, reply);
                        let frame = p.frame();
                        st.pending.insert(p);
                        frame
                    }
                };
                if ws.send(frame).await.is_err() {
                    return Ended::Reconnect("write failed".into());
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > cfg.ping_interval * 2 {
                    return Ended::Reconnect("no answer to pings".into());
                }
                let f = WsMessage::Text(json!({"type": "ping"}).to_string().into());
                if ws.send(f).await.is_err() {
                    return Ended::Reconnect("write failed".into());
                }
            }
            m = ws.next() => {
                last_heard = Instant::now();
                let text = match m {
                    Some(Ok(WsMessage::Text(t))) => t,
                    Some(Ok(WsMessage::Close(f))) => {
                        return Ended::Reconnect(format!("closed: {f:?}"));
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Ended::Reconnect(e.to_string()),
                    None => return Ended::Reconnect("connection ended".into()),
                };
                let f: Value = match serde_json::from_str(&text) {
                    Ok(v) => v,
                    Err(_) => continue,
                };
                match f["type"].as_str() {
                    Some("msg") => {
                        let from = f["from"].as_str().unwrap_or("").to_string();
                        let id = f["id"].as_str().unwrap_or("").to_string();
                        if !st.seen.insert((from.clone(), id.clone())) {
                            bump(&st.stats.duplicates);
                        } else {
                                                        let m = Incoming {
                                room: f["room"].as_str().map(String::from),
                                from,
                                id,
                                body: f["body"].clone(),
                                ts: f["ts"].as_u64().unwrap_or(0),
                            };
                            if incoming.send(m).await.is_err() {
                                return Ended::Stop;
                            }
                        }
                        let ack = json!({"type": "ack", "seq": f["seq"]});
                        if ws.send(WsMessage::Text(ack.to_string().into())).await.is_err() {
                            return Ended::Reconnect("write failed".into());
                        }
                    }
                    Some("delivered") => {
                        if let Some(p) = f["id"].as_str().and_then(|id| st.pending.take(id)) {
                                                        p.report(cfg, SendOutcome::Delivered);
                            p.reply.delivered();
                        }
                    }
                    Some("room_result") => {
                        if let Some(p) = f["id"].as_str().and_then(|id| st.pending.take(id)) {
                            p.reply.done(&f);
                        }
                    }
                                        Some(ty @ ("joined" | "left")) => {
                        // Without an id: another device of this user, or the backend, changed it.
                        let Some(j) = f["id"].as_str().and_then(|id| st.joins.remove(id)) else {
                            if let Some(room) = f["room"].as_str() {
                                if ty == "joined" {
                                    st.rooms.insert(room.to_string());
                                } else {
                                    st.rooms.remove(room);
                                }
                            }
                            continue;
                        };
                        let answer = if ty == "joined" {
                            st.rooms.insert(j.room);
                            let members = f["members"].as_u64().unwrap_or(0);
                            Membership::Joined { members: u32::try_from(members).unwrap_or(u32::MAX) }
                        } else {
                            Membership::Left
                        };
                        let _ = j.reply.send(Ok(answer));
                    }
                    Some("failed") => {
                        let Some(id) = f["id"].as_str() else { continue };
                        if let Some(j) = st.joins.remove(id) {
                            let reason = serde_json::from_value(f["reason"].clone()).unwrap_or(FailReason::Invalid);
                            let _ = j.reply.send(Ok(Membership::Failed(reason)));
                            continue;
                        }
                        let reason: FailReason = serde_json::from_value(f["reason"].clone()).unwrap_or(FailReason::Invalid);
                        let again = st.pending.peek_mut(id).is_some_and(|p| {
                            p.report(cfg, SendOutcome::Failed(reason));
                            retryable(reason) && p.attempts < cfg.max_attempts && !p.transient
                        });
                        if again {
                            let p = st.pending.peek_mut(id).expect("checked");
                            p.attempts += 1;
                            bump(&st.stats.resent);
                            let frame = p.frame();
                            if ws.send(frame).await.is_err() {
                                return Ended::Reconnect("write failed".into());
                            }
                                                } else if let Some(p) = st.pending.take(id) {
                            p.reply.failed(reason);
                        }
                    }
                    Some("error") => {
                                                if let Some(p) = f["id"].as_str().and_then(|id| st.pending.take(id)) {
                            p.reply.error(ClientError::Refused {
                                code: f["code"].as_str().unwrap_or("").to_string(),
                                message: f["message"].as_str().unwrap_or("").to_string(),
                            });
                        }
                    }
                    Some("moved") => {
                        let node = f["node"].as_str().unwrap_or("").to_string();
                        if let (Some(s), Some(url)) = (session.as_mut(), f["url"].as_str()) {
                            s.url = url.to_string();
                        }
                        return Ended::Moved(node);
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Sleeps the backoff (with jitter) while still taking new sends; false if the client stops.
async fn wait_backoff(
    backoff: &mut Duration,
    cfg: &ClientConfig,
    cmds: &mut mpsc::Receiver<Cmd>,
    st: &mut State,
) -> bool {
    let jitter = backoff.mul_f64(rand::random::<f64>() * 0.5);
    let until = Instant::now() + *backoff + jitter;
    *backoff = (*backoff * 2).min(cfg.max_backoff);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return true,
                        cmd = cmds.recv() => match cmd {
                None => return false,
                // Written when the next session is up.
                Some(Cmd::Join { room, join, reply }) => drop(st.join(cfg, Join { room, join, reply })),
                Some(Cmd::Send { id, target, body, transient, reply }) => {
                    if st.pending.len() >= cfg.max_pending {
                        reply.too_many();
                    } else if transient {
                        // A signal made while disconnected is stale by the time a session is up.
                        reply.failed(FailReason::Unreachable);
                    } else {
                        st.pending.insert(Pending::new(id, target, body, false, reply));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(id: &str) -> (Pending, oneshot::Receiver<Result<SendOutcome, ClientError>>) {
        let (reply, rx) = oneshot::channel();
        (
            Pending::new(
                id.into(),
                Target::User("b".into()),
                Value::Null,
                false,
                Reply::Direct(reply),
            ),
            rx,
        )
    }

    #[test]
    fn pending_keeps_order_and_repeats() {
        let mut set = PendingSet::default();
        let (a, _ra) = pending("a");
        let (b, _rb) = pending("b");
        let (a2, _ra2) = pending("a");
        set.insert(a);
        set.insert(b);
        set.insert(a2);
        let ids: Vec<&str> = set.by_order.values().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "a"]);
        assert!(set.take("a").is_some());
        assert_eq!(set.len(), 2);
        assert!(set.take("a").is_some());
        assert!(set.take("a").is_none());
        assert!(set.take("zz").is_none());
    }

    #[test]
    fn seen_is_bounded() {
        let mut seen = Seen {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap: 2,
        };
        assert!(seen.insert(("a".into(), "1".into())));
        assert!(!seen.insert(("a".into(), "1".into())));
        assert!(seen.insert(("a".into(), "2".into())));
        assert!(seen.insert(("a".into(), "3".into())));
        assert_eq!(seen.set.len(), 2);
        assert!(
            seen.insert(("a".into(), "1".into())),
            "forgotten beyond capacity"
        );
    }

    fn state() -> State {
        State {
            pending: PendingSet::default(),
            seen: Seen {
                set: HashSet::new(),
                order: VecDeque::new(),
                cap: 4,
            },
            stats: Default::default(),
            joins: BTreeMap::new(),
            next_join: 0,
            rejoin: Vec::new(),
            rooms: BTreeSet::new(),
        }
    }

    #[test]
    fn a_welcome_that_lacks_a_joined_room_makes_the_client_join_again() {
        let mut st = state();
        st.rooms.extend(["a".to_string(), "b".to_string()]);
        rejoin_check(&mut st, &json!({"type": "welcome", "rooms": ["a", "c"]}));
        let frames: Vec<String> = st
            .rejoin
            .iter()
            .map(|m| m.to_text().unwrap().to_string())
            .collect();
        assert_eq!(frames, [json!({"type": "join", "room": "b"}).to_string()]);
        assert_eq!(
            st.stats.rejoined.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        // Rooms the welcome lists are remembered (a backend may have added them).
        assert!(st.rooms.contains("c"));
        // Nothing lacking: nothing to write.
        rejoin_check(
            &mut st,
            &json!({"type": "welcome", "rooms": ["a", "b", "c"]}),
        );
        assert!(st.rejoin.is_empty());
    }
}
