//! Configuration: the `cluster.toml` file, its defaults, environment overrides and validation.
//!
//! Every section is a serde struct with `deny_unknown_fields`, so a misspelt key is refused at
//! start with a message naming it. [`Config::validate`] checks values that parse but make no
//! sense (a zero timeout, duplicate node ids, `users` mode without users, ...).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::EngineConfig;

/// Errors from loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path that was read.
        path: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key or a value of the wrong type.
    #[error("{path}: {message}")]
    Parse {
        /// The path that was parsed.
        path: String,
        /// The parser's message, which names the key and line.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("invalid configuration: `{key}`: {message}")]
    Invalid {
        /// The dotted key, e.g. `delivery.ack_timeout_ms`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// `--id` names a node that the file does not list.
    #[error("node `{0}` is not listed in [[nodes]]")]
    UnknownNode(String),
    /// The node listens (or is advertised) beyond loopback while a secret is the shipped
    /// default or too short.
    #[error(
        "node `{node}` has an address that is not loopback ({address}), so its secrets must be \
         real: {}. Make one with `imgate gen-secret`",
        .problems.join("; ")
    )]
    WeakSecrets {
        /// The node.
        node: String,
        /// The first address that is not loopback.
        address: String,
        /// One line per offending key, naming it.
        problems: Vec<String>,
    },
}

/// Secrets that ship in the defaults and in `cluster.toml`: fine on loopback, refused on a
/// network.
pub const SHIPPED_SECRETS: [&str; 3] = [
    "dev-cluster-secret-change-me",
    "dev-only-change-me",
    "dev-api-key",
];

/// Shortest secret accepted on a network, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

/// Whether `host` (an IP address or a name) is loopback. Names other than `localhost` count
/// as network addresses.
fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[cluster]`: cluster identity and seeds.
    pub cluster: ClusterConfig,
    /// `[auth]`: login and tokens.
    pub auth: AuthConfig,
    /// `[api]`: the backend HTTP API.
    pub api: ApiConfig,
    /// `[delivery]`: acks, retries, hold and dedup.
    pub delivery: DeliveryConfig,
    /// `[limits]`: sizes and per-session bounds.
    pub limits: LimitsConfig,
    /// `[websocket]`: keepalive and idle timeout.
    pub websocket: WebSocketConfig,
    /// `[http]`: CORS and shutdown.
    pub http: HttpConfig,
    /// `[gossip]`: membership timing and failure detection.
    pub gossip: GossipConfig,
    /// `[quic]`: node-to-node links.
    pub quic: QuicConfig,
    /// `[tls]`: HTTPS and WSS for clients.
    pub tls: TlsConfig,
    /// `[webhooks]`: events POSTed to the application's backend.
    pub webhooks: WebhooksConfig,
    /// `[[nodes]]`: every node of the cluster.
    pub nodes: Vec<NodeConfig>,
}

/// `[cluster]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Gossip cluster id; nodes of different ids never mix. Default `imgate-local`.
    pub id: String,
    /// Gossip addresses (`host:port`) to join through. Default: none.
    pub seeds: Vec<String>,
    /// Shared secret from which every node derives the cluster CA for mutual TLS between
    /// nodes; a process without it can neither read nor inject cluster traffic. Env
    /// `IMGATE_CLUSTER_SECRET` wins. Default `dev-cluster-secret-change-me`.
    pub secret: String,
    /// Virtual nodes per member on the hash ring. Default 160.
    pub vnodes: u32,
}

/// `[gossip]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GossipConfig {
    /// Milliseconds between gossip rounds. Default 100.
    pub interval_ms: u64,
    /// Phi-accrual threshold above which a member is considered dead. Default 8.0.
    pub phi_threshold: f64,
    /// Heartbeat interval assumed before any is measured, in milliseconds. Default 100.
    pub initial_interval_ms: u64,
    /// Heartbeat gaps longer than this are not sampled, in milliseconds. Default 2000.
    pub max_interval_ms: u64,
    /// Seconds a dead member is remembered before it is forgotten. Default 60.
    pub dead_grace_s: u64,
}

/// `[quic]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuicConfig {
    /// Keep-alive interval of node-to-node connections, in milliseconds. Default 500.
    pub keepalive_ms: u64,
    /// A link silent this long is closed and its peer counted unreachable, in milliseconds. Default 2000.
    pub idle_timeout_ms: u64,
    /// Frames queued towards one peer; beyond it forwards fail `unreachable`. Default 65536.
    pub peer_queue: usize,
    /// Bytes of message bodies queued towards one peer; beyond it forwards fail
    /// `unreachable`. Default 67108864 (64 MiB).
    pub peer_queue_bytes: usize,
    /// Longest reconnect backoff, in milliseconds. Default 1000.
    pub max_backoff_ms: u64,
}

impl Default for GossipConfig {
    fn default() -> Self {
        GossipConfig {
            interval_ms: 100,
            phi_threshold: 8.0,
            initial_interval_ms: 100,
            max_interval_ms: 2000,
            dead_grace_s: 60,
        }
    }
}

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            keepalive_ms: 500,
            idle_timeout_ms: 2000,
            peer_queue: 65_536,
            peer_queue_bytes: 64 << 20,
            max_backoff_ms: 1000,
        }
    }
}

/// How `/login` checks users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Any uid logs in; the password is ignored.
    Open,
    /// Only the uids listed in `[[auth.users]]`, with their argon2 password.
    Users,
}

/// `[auth]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `open` or `users`. Default `open`.
    pub mode: AuthMode,
    /// HS256 secret for tokens. Env `IMGATE_JWT_SECRET` wins. Default `dev-only-change-me`.
    pub jwt_secret: String,
    /// Token lifetime in seconds. Default 7200.
    pub token_ttl_s: u64,
    /// Clock-skew leeway for `exp`/`nbf`, in seconds. Default 30.
    pub leeway_s: u64,
    /// The `iss` claim of issued tokens; tokens naming another issuer are refused. Default `imgate`.
    pub issuer: String,
    /// Password checks (argon2) running at once in `users` mode. Default 4.
    pub login_concurrency: usize,
    /// `users`-mode logins waiting for a password check; more are refused with 503 `busy`.
    /// Default 256.
    pub login_queue: usize,
    /// Kicks remembered at once (each for as long as the tokens it revokes could be valid);
    /// more are refused with 503 `busy`. Default 10000.
    pub max_kicks: usize,
    /// Users for `users` mode.
    pub users: Vec<UserEntry>,
}

/// One `[[auth.users]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    /// The user id.
    pub uid: String,
    /// An argon2 PHC string, as printed by `imgate hash-password`.
    pub password_hash: String,
}

/// `[api]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Bearer keys accepted by `/api/*`. Env `IMGATE_API_KEY` replaces them. Default `["dev-api-key"]`.
    pub keys: Vec<String>,
    /// Whether logged-in users may ask `GET /presence` which users are online (the chat page's
    /// contact list). Default true; false answers 403.
    pub user_presence: bool,
}

/// `[webhooks]`: events POSTed to the application's backend, signed with `secret`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// Where events are POSTed: an `http://` or `https://` URL. Default: none (no webhooks).
    pub url: Option<String>,
    /// Key of the `X-Imgate-Signature` HMAC-SHA256; required with `url`. Env
    /// `IMGATE_WEBHOOK_SECRET` replaces it.
    pub secret: String,
    /// Events to send: any of `offline`, `connect`, `disconnect`. Default: all three.
    pub events: Vec<String>,
    /// Events waiting to be sent on this node; beyond it they are dropped and counted
    /// (`imgate_webhook_dropped_total`). Default 10000.
    pub max_queue: usize,
    /// Timeout of one POST, in ms. Default 5000.
    pub timeout_ms: u64,
    /// POSTs of one event before it is given up (`imgate_webhook_failed_total`), with backoff
    /// and jitter between them. Default 5.
    pub max_attempts: u32,
    /// POSTs in flight at once on this node. Default 16.
    pub concurrency: usize,
}

impl WebhooksConfig {
    /// Every event name.
    pub const EVENTS: [&'static str; 3] = ["offline", "connect", "disconnect"];

    /// Whether `event` is to be sent.
    pub fn wants(&self, event: &str) -> bool {
        self.url.is_some() && self.events.iter().any(|e| e == event)
    }
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            url: None,
            secret: String::new(),
            events: WebhooksConfig::EVENTS.map(String::from).to_vec(),
            max_queue: 10_000,
            timeout_ms: 5000,
            max_attempts: 5,
            concurrency: 16,
        }
    }
}

/// `[delivery]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Milliseconds to wait for an `ack` before pushing again. Default 1000.
    pub ack_timeout_ms: u64,
    /// Pushes after the first before `failed: timeout`. Default 3.
    pub max_retries: u32,
    /// Milliseconds a message waits for a recipient with no session. Default 5000.
    pub hold_ms: u64,
    /// Seconds a `(from, id)` outcome is remembered for dedup. Default 300.
    pub dedup_window_s: u64,
    /// Most `(from, id)` entries remembered per node; the oldest go first. Default 200000.
    pub max_dedup_entries: usize,
    /// Most messages held for one offline user; more fail `offline`. Default 1000.
    pub max_held_per_user: usize,
    /// Most messages in delivery at once on a node (pushed or held); more fail `rate_limited`. Default 1000000.
    pub max_deliveries: usize,
    /// Most bytes of message bodies in delivery at once on a node (pushed or held); more fail
    /// `rate_limited`. Default 268435456 (256 MiB).
    pub max_held_bytes: usize,
}

/// `[limits]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest encoded `body` of a `send`, in bytes. Default 65536.
    pub max_body_bytes: usize,
    /// Largest WebSocket text frame answered with an `error` frame instead of being read, in
    /// bytes. Default 131072. Frames over 4× this close the connection with 1009.
    pub max_frame_bytes: usize,
    /// Largest `/login` and `/api` request body, in bytes. Default 16384 (`/api/push` allows `max_body_bytes` + 16384).
    pub max_login_body_bytes: usize,
    /// Sends of one session waiting for an outcome; more fail `rate_limited`. Default 1024.
    pub max_inflight_per_session: usize,
    /// Sends per second per session (token bucket, burst of the same size). Default 2000.
    pub sends_per_second: u32,
    /// Un-acked `msg` pushes per session before it is closed as a slow consumer. Default 4096.
    pub max_unacked_per_session: usize,
    /// Frames queued towards one WebSocket before it is closed as a slow consumer. Default 4096.
    pub outbound_queue: usize,
    /// Sessions (devices) per user on a node; the oldest is closed when exceeded. Default 16.
    pub max_sessions_per_user: usize,
    /// WebSocket sessions per node; more are refused with 503. Default 200000.
    pub max_sessions: usize,
    /// Frames other than `send` (`ping`, `ack`, `refresh`, control frames, bad frames) per
    /// second per session (token bucket, burst of the same size); over it they are answered
    /// `error` `rate_limited`, and a session that goes on past another second's worth is
    /// closed with 4008. Default 4 × `sends_per_second`.
    pub other_frames_per_second: Option<u32>,
    /// Messages forwarded to their owner node and waiting for its outcome, on this node; a
    /// forward beyond it fails `rate_limited`. Gauge `imgate_forwards`. Default 262144.
    pub max_forwards: usize,
    /// HTTP API requests (push, presence, kick) waiting for an answer, on this node; beyond it
    /// a push fails `rate_limited` and presence or kick answer 503 `busy`. Gauge
    /// `imgate_pending_requests`. Default 65536.
    pub max_pending_requests: usize,
    /// Rooms one user may be a member of; a join beyond it fails `limit` (409 on the API).
    /// Default 1000.
    pub max_rooms_per_user: usize,
    /// Members of one room; a join beyond it fails `limit`. Default 100000.
    pub max_members_per_room: usize,
    /// Memberships one node keeps on each side (as rooms' owner, as users' owner); a join
    /// beyond it fails `limit`. Gauges `imgate_room_members`, `imgate_user_rooms`,
    /// `imgate_room_state_bytes`. Default 4000000.
    pub max_room_memberships: usize,
    /// Memberships re-announced or handed over per second after a ring change, per node, so
    /// that a death or a join is not a storm. Default 50000.
    pub room_sync_per_second: u32,
}

impl LimitsConfig {
    /// The per-session budget of frames other than `send`, per second.
    pub fn other_frames_per_second(&self) -> u32 {
        self.other_frames_per_second
            .unwrap_or_else(|| self.sends_per_second.saturating_mul(4))
    }
}

/// `[websocket]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Interval of WebSocket ping control frames from the node, in milliseconds. Default 20000.
    pub ping_interval_ms: u64,
    /// A session that sends nothing (not even a pong) for this long is closed, in milliseconds. Default 60000.
    pub idle_timeout_ms: u64,
    /// Initial read buffer of a session, in bytes; larger frames grow it. Small keeps idle
    /// sessions cheap. Default 1024.
    pub read_buffer_bytes: usize,
    /// Deadline of every write to a session's socket, in milliseconds: a socket that accepts
    /// nothing for this long is closed (4002) and the session freed. Default 10000.
    pub write_timeout_ms: u64,
}

/// `[http]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Value of `Access-Control-Allow-Origin`. Default `*`.
    pub cors_origin: String,
    /// Bound on a graceful shutdown, in milliseconds. Default 10000.
    pub shutdown_timeout_ms: u64,
    /// A request's headers must arrive within this many milliseconds of the connection
    /// waiting for them (hyper's header read timeout); else the connection is closed. Default 10000.
    pub header_timeout_ms: u64,
    /// A request body must arrive within this many milliseconds; else 408 `timeout`. Default 30000.
    pub body_timeout_ms: u64,
    /// A connection with no request in progress and no bytes moving for this long is
    /// closed, in milliseconds. Default 60000.
    pub idle_timeout_ms: u64,
    /// Open HTTP connections (WebSocket sessions included) at once; further ones are closed
    /// at accept. Default 250000.
    pub max_connections: usize,
}

/// `[tls]`: a certificate for the `http` address of every node (a `[[nodes]]` entry may set
/// its own pair). Without one, the node serves plain HTTP and WebSocket.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, leaf first. Env `IMGATE_TLS_CERT`.
    pub cert_path: Option<std::path::PathBuf>,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1). Env `IMGATE_TLS_KEY`.
    pub key_path: Option<std::path::PathBuf>,
}

/// What `imgate node` was given by flags or environment variables for its own entry (flags
/// win over variables).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NodeOverrides {
    /// This node's id (its `[[nodes]]` entry, or a new one).
    #[arg(long, env = "IMGATE_NODE_ID")]
    pub id: String,
    /// HTTP and WebSocket listen address, ip:port.
    #[arg(long, env = "IMGATE_HTTP")]
    pub http: Option<SocketAddr>,
    /// Gossip (UDP) listen address, ip:port (not a wildcard: peers dial it).
    #[arg(long, env = "IMGATE_GOSSIP")]
    pub gossip: Option<SocketAddr>,
    /// QUIC (UDP) listen address, ip:port (not a wildcard: peers dial it).
    #[arg(long, env = "IMGATE_QUIC")]
    pub quic: Option<SocketAddr>,
    /// host:port used in the URLs given to clients.
    #[arg(long, env = "IMGATE_ADVERTISE")]
    pub advertise: Option<String>,
    /// The exact ws:// or wss:// URL given to clients (behind a TLS proxy).
    #[arg(long, env = "IMGATE_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Gossip addresses to join through, comma separated host:port (DNS names allowed);
    /// replaces `cluster.seeds`.
    #[arg(long, env = "IMGATE_SEEDS")]
    pub seeds: Option<String>,
    /// The cluster id (`cluster.id`).
    #[arg(long, env = "IMGATE_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Certificate chain (PEM) for HTTPS and WSS (sets `tls.cert_path`).
    #[arg(long, env = "IMGATE_TLS_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) for HTTPS and WSS (sets `tls.key_path`).
    #[arg(long, env = "IMGATE_TLS_KEY")]
    pub tls_key: Option<std::path::PathBuf>,
}

/// One `[[nodes]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node id, unique in the cluster.
    pub id: String,
    /// HTTP + WebSocket listen address.
    pub http: SocketAddr,
    /// Gossip (UDP) listen address.
    pub gossip: SocketAddr,
    /// QUIC (UDP) listen address.
    pub quic: SocketAddr,
    /// Public `host:port` used in URLs handed to clients; defaults to `http`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// The exact WebSocket URL handed to clients for this node (`ws://` or `wss://`), for a
    /// node behind a TLS-terminating proxy; wins over `advertise`.
    #[serde(default)]
    pub public_url: Option<String>,
    /// This node's certificate chain (PEM), instead of `[tls] cert_path`.
    #[serde(default)]
    pub cert_path: Option<std::path::PathBuf>,
    /// This node's private key (PEM), instead of `[tls] key_path`.
    #[serde(default)]
    pub key_path: Option<std::path::PathBuf>,
}

impl NodeConfig {
    /// An entry with these addresses and nothing else set.
    pub fn new(id: &str, http: SocketAddr, gossip: SocketAddr, quic: SocketAddr) -> NodeConfig {
        NodeConfig {
            id: id.to_string(),
            http,
            gossip,
            quic,
            advertise: None,
            public_url: None,
            cert_path: None,
            key_path: None,
        }
    }

    /// The certificate and key this node serves with, if any: its own pair, else `[tls]`'s.
    pub fn tls_files<'a>(
        &'a self,
        tls: &'a TlsConfig,
    ) -> Option<(&'a std::path::Path, &'a std::path::Path)> {
        match (&self.cert_path, &self.key_path) {
            (Some(c), Some(k)) => Some((c, k)),
            _ => match (&tls.cert_path, &tls.key_path) {
                (Some(c), Some(k)) => Some((c, k)),
                _ => None,
            },
        }
    }

    /// The WebSocket URL clients are given for this node: `public_url`, else
    /// `ws(s)://<advertise or bound http>/ws`.
    pub fn client_url(&self, bound_http: SocketAddr, tls: bool) -> String {
        if let Some(url) = &self.public_url {
            return url.clone();
        }
        let host = self
            .advertise
            .clone()
            .unwrap_or_else(|| bound_http.to_string());
        let scheme = if tls { "wss" } else { "ws" };
        format!("{scheme}://{host}/ws")
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            id: "imgate-local".into(),
            seeds: Vec::new(),
            secret: "dev-cluster-secret-change-me".into(),
            vnodes: 160,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::Open,
            jwt_secret: "dev-only-change-me".into(),
            token_ttl_s: 7200,
            leeway_s: 30,
            issuer: "imgate".into(),
            login_concurrency: 4,
            login_queue: 256,
            max_kicks: 10_000,
            users: Vec::new(),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            keys: vec!["dev-api-key".into()],
            user_presence: true,
        }
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            ack_timeout_ms: 1000,
            max_retries: 3,
            hold_ms: 5000,
            dedup_window_s: 300,
            max_dedup_entries: 200_000,
            max_held_per_user: 1000,
            max_deliveries: 1_000_000,
            max_held_bytes: 256 << 20,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_body_bytes: 64 * 1024,
            max_frame_bytes: 128 * 1024,
            max_login_body_bytes: 16 * 1024,
            max_inflight_per_session: 1024,
            sends_per_second: 2000,
            max_unacked_per_session: 4096,
            outbound_queue: 4096,
            max_sessions_per_user: 16,
            max_sessions: 200_000,
            other_frames_per_second: None,
            max_forwards: 1 << 18,
            max_pending_requests: 1 << 16,
            max_rooms_per_user: 1000,
            max_members_per_room: 100_000,
            max_room_memberships: 4_000_000,
            room_sync_per_second: 50_000,
        }
    }
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            ping_interval_ms: 20_000,
            idle_timeout_ms: 60_000,
            read_buffer_bytes: 1024,
            write_timeout_ms: 10_000,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            cors_origin: "*".into(),
            shutdown_timeout_ms: 10_000,
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            max_connections: 250_000,
        }
    }
}

impl Config {
    /// Reads, parses and validates a file, then applies the environment overrides.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, key or value at fault.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let mut cfg = Config::read(path)?;
        cfg.apply_env(|k| std::env::var(k).ok());
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and parses a file (no env overrides, no validation); errors name the file.
    fn read(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// The configuration of `imgate node`: the file if any (else the defaults), the node's
    /// flags and variables, the secret variables; then validated.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, key, flag or value at fault.
    pub fn load_for_node(file: Option<&Path>, o: &NodeOverrides) -> Result<Config, ConfigError> {
        let mut cfg = match file {
            Some(path) => Config::read(path)?,
            None => Config::default(),
        };
        cfg.apply_node_overrides(o)?;
        cfg.apply_env(|k| std::env::var(k).ok());
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses TOML text (no env overrides, no validation).
    ///
    /// # Errors
    /// [`ConfigError::Parse`] with the parser's message (it names the unknown or bad key).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<config>".into(),
            message: e.to_string(),
        })
    }

    /// Applies `IMGATE_JWT_SECRET`, `IMGATE_API_KEY`, `IMGATE_CLUSTER_SECRET` and
    /// `IMGATE_WEBHOOK_SECRET` from `get`
    /// (the process env in `load`).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        if let Some(secret) = get("IMGATE_JWT_SECRET").filter(|s| !s.is_empty()) {
            self.auth.jwt_secret = secret;
        }
        if let Some(key) = get("IMGATE_API_KEY").filter(|s| !s.is_empty()) {
            self.api.keys = vec![key];
        }
        if let Some(secret) = get("IMGATE_CLUSTER_SECRET").filter(|s| !s.is_empty()) {
            self.cluster.secret = secret;
        }
        if let Some(secret) = get("IMGATE_WEBHOOK_SECRET").filter(|s| !s.is_empty()) {
            self.webhooks.secret = secret;
        }
    }

    /// Applies what `imgate node` was given by flags or `IMGATE_*` variables (which win over
    /// the file): the entry of node `o.id` is updated, or created when the file does not list
    /// it (then `http`, `gossip` and `quic` must all be given).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the flag (and variable) that is missing or bad.
    pub fn apply_node_overrides(&mut self, o: &NodeOverrides) -> Result<(), ConfigError> {
        if let Some(id) = &o.cluster_id {
            self.cluster.id = id.clone();
        }
        if let Some(seeds) = &o.seeds {
            self.cluster.seeds = seeds
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
        }
        if o.tls_cert.is_some() || o.tls_key.is_some() {
            self.tls.cert_path = o.tls_cert.clone();
            self.tls.key_path = o.tls_key.clone();
        }
        let index = match self.nodes.iter().position(|n| n.id == o.id) {
            Some(i) => i,
            None => {
                let missing: Vec<&str> = [
                    ("--http (IMGATE_HTTP)", o.http.is_none()),
                    ("--gossip (IMGATE_GOSSIP)", o.gossip.is_none()),
                    ("--quic (IMGATE_QUIC)", o.quic.is_none()),
                ]
                .iter()
                .filter(|(_, m)| *m)
                .map(|(name, _)| *name)
                .collect();
                if !missing.is_empty() {
                    return Err(invalid(
                        "nodes",
                        format!(
                            "node `{}` is not listed in the file, so it needs {}",
                            o.id,
                            missing.join(", ")
                        ),
                    ));
                }
                let any: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
                self.nodes.push(NodeConfig::new(&o.id, any, any, any));
                self.nodes.len() - 1
            }
        };
        let n = &mut self.nodes[index];
        if let Some(a) = o.http {
            n.http = a;
        }
        if let Some(a) = o.gossip {
            n.gossip = a;
        }
        if let Some(a) = o.quic {
            n.quic = a;
        }
        if let Some(a) = &o.advertise {
            n.advertise = Some(a.clone());
        }
        if let Some(u) = &o.public_url {
            n.public_url = Some(u.clone());
        }
        Ok(())
    }

    fn validate_webhooks(&self) -> Result<(), ConfigError> {
        let w = &self.webhooks;
        for e in &w.events {
            if !WebhooksConfig::EVENTS.contains(&e.as_str()) {
                return Err(invalid(
                    "webhooks.events",
                    format!("unknown event {e:?}: the events are offline, connect, disconnect"),
                ));
            }
        }
        for (key, v) in [
            ("webhooks.max_queue", w.max_queue as u64),
            ("webhooks.timeout_ms", w.timeout_ms),
            ("webhooks.max_attempts", u64::from(w.max_attempts)),
            ("webhooks.concurrency", w.concurrency as u64),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        let Some(url) = &w.url else { return Ok(()) };
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| invalid("webhooks.url", format!("{url:?} is not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(invalid(
                "webhooks.url",
                format!("{url:?} must be an http:// or https:// URL with a host"),
            ));
        }
        if w.secret.is_empty() {
            return Err(invalid(
                "webhooks.secret",
                "must be set with webhooks.url (env IMGATE_WEBHOOK_SECRET)",
            ));
        }
        Ok(())
    }

    /// Checks values that parse but cannot work.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_webhooks()?;
        if self.cluster.id.trim().is_empty() {
            return Err(invalid("cluster.id", "must not be empty"));
        }
        if self.cluster.secret.is_empty() {
            return Err(invalid("cluster.secret", "must not be empty"));
        }
        if self.cluster.vnodes == 0 || self.cluster.vnodes > 4096 {
            return Err(invalid("cluster.vnodes", "must be 1 to 4096"));
        }
        for (i, seed) in self.cluster.seeds.iter().enumerate() {
            if seed
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(invalid(&format!("cluster.seeds[{i}]"), "must be host:port"));
            }
        }
        let g = &self.gossip;
        if g.interval_ms == 0
            || g.initial_interval_ms == 0
            || g.max_interval_ms == 0
            || g.dead_grace_s == 0
        {
            return Err(invalid(
                "gossip",
                "intervals and grace periods must be greater than 0",
            ));
        }
        if !(g.phi_threshold.is_finite() && g.phi_threshold > 0.0) {
            return Err(invalid("gossip.phi_threshold", "must be a positive number"));
        }
        let q = &self.quic;
        if q.keepalive_ms == 0 || q.peer_queue == 0 || q.max_backoff_ms == 0 {
            return Err(invalid(
                "quic",
                "keepalive_ms, peer_queue and max_backoff_ms must be greater than 0",
            ));
        }
        if q.idle_timeout_ms <= q.keepalive_ms {
            return Err(invalid(
                "quic.idle_timeout_ms",
                "must be longer than quic.keepalive_ms",
            ));
        }
        if self.auth.jwt_secret.is_empty() {
            return Err(invalid("auth.jwt_secret", "must not be empty"));
        }
        if self.auth.token_ttl_s == 0 {
            return Err(invalid("auth.token_ttl_s", "must be at least 1 second"));
        }
        if self.auth.mode == AuthMode::Users && self.auth.users.is_empty() {
            return Err(invalid(
                "auth.users",
                "mode = \"users\" needs at least one [[auth.users]] entry",
            ));
        }
        let mut uids = HashSet::new();
        for (i, user) in self.auth.users.iter().enumerate() {
            if let Err(e) = crate::uid::validate_uid(&user.uid) {
                return Err(invalid(&format!("auth.users[{i}].uid"), e));
            }
            if !uids.insert(user.uid.as_str()) {
                return Err(invalid(
                    &format!("auth.users[{i}].uid"),
                    format!("`{}` is listed twice", user.uid),
                ));
            }
            if argon2::PasswordHash::new(&user.password_hash).is_err() {
                return Err(invalid(
                    &format!("auth.users[{i}].password_hash"),
                    "not an argon2 PHC string (make one with `imgate hash-password`)",
                ));
            }
        }
        if self.api.keys.iter().any(|k| k.is_empty()) {
            return Err(invalid("api.keys", "keys must not be empty strings"));
        }
        let d = &self.delivery;
        for (key, v) in [
            ("delivery.ack_timeout_ms", d.ack_timeout_ms),
            ("delivery.dedup_window_s", d.dedup_window_s),
            ("delivery.max_dedup_entries", d.max_dedup_entries as u64),
            ("delivery.max_held_per_user", d.max_held_per_user as u64),
            ("delivery.max_deliveries", d.max_deliveries as u64),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        let l = &self.limits;
        for (key, v) in [
            ("limits.max_body_bytes", l.max_body_bytes),
            ("limits.max_frame_bytes", l.max_frame_bytes),
            ("limits.max_login_body_bytes", l.max_login_body_bytes),
            (
                "limits.max_inflight_per_session",
                l.max_inflight_per_session,
            ),
            ("limits.sends_per_second", l.sends_per_second as usize),
            ("limits.max_unacked_per_session", l.max_unacked_per_session),
            ("limits.outbound_queue", l.outbound_queue),
            ("limits.max_sessions_per_user", l.max_sessions_per_user),
            ("limits.max_sessions", l.max_sessions),
            ("limits.max_forwards", l.max_forwards),
            ("limits.max_pending_requests", l.max_pending_requests),
            ("limits.max_rooms_per_user", l.max_rooms_per_user),
            ("limits.max_members_per_room", l.max_members_per_room),
            ("limits.max_room_memberships", l.max_room_memberships),
            (
                "limits.room_sync_per_second",
                l.room_sync_per_second as usize,
            ),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if l.outbound_queue
            < l.max_inflight_per_session
                .saturating_add(self.delivery.max_held_per_user)
        {
            return Err(invalid(
                "limits.outbound_queue",
                "must be at least limits.max_inflight_per_session + delivery.max_held_per_user, \
                 so that a burst of outcomes or held messages never closes a healthy reader",
            ));
        }
        if l.max_body_bytes > crate::wire::MAX_BODY {
            return Err(invalid(
                "limits.max_body_bytes",
                format!(
                    "must be at most {} (a message must fit one node-to-node frame)",
                    crate::wire::MAX_BODY
                ),
            ));
        }
        if l.max_frame_bytes < l.max_body_bytes {
            return Err(invalid(
                "limits.max_frame_bytes",
                "must be at least limits.max_body_bytes",
            ));
        }
        if self.websocket.read_buffer_bytes < 64 {
            return Err(invalid(
                "websocket.read_buffer_bytes",
                "must be at least 64",
            ));
        }
        if self.websocket.ping_interval_ms == 0 {
            return Err(invalid(
                "websocket.ping_interval_ms",
                "must be greater than 0",
            ));
        }
        if self.websocket.idle_timeout_ms <= self.websocket.ping_interval_ms {
            return Err(invalid(
                "websocket.idle_timeout_ms",
                "must be longer than websocket.ping_interval_ms",
            ));
        }
        let h = &self.http;
        for (key, v) in [
            ("http.header_timeout_ms", h.header_timeout_ms),
            ("http.body_timeout_ms", h.body_timeout_ms),
            ("http.idle_timeout_ms", h.idle_timeout_ms),
            ("http.max_connections", h.max_connections as u64),
            (
                "websocket.write_timeout_ms",
                self.websocket.write_timeout_ms,
            ),
            (
                "delivery.max_held_bytes",
                self.delivery.max_held_bytes as u64,
            ),
            ("quic.peer_queue_bytes", self.quic.peer_queue_bytes as u64),
            ("auth.login_concurrency", self.auth.login_concurrency as u64),
            ("auth.max_kicks", self.auth.max_kicks as u64),
            (
                "limits.other_frames_per_second",
                u64::from(self.limits.other_frames_per_second()),
            ),
        ] {
            if v == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        // Durations far beyond any sensible value would overflow clock arithmetic.
        const DAY_MS: u64 = 86_400_000;
        for (key, v) in [
            ("delivery.ack_timeout_ms", self.delivery.ack_timeout_ms),
            ("delivery.hold_ms", self.delivery.hold_ms),
            (
                "delivery.dedup_window_s",
                self.delivery.dedup_window_s.saturating_mul(1000),
            ),
            (
                "auth.token_ttl_s",
                self.auth.token_ttl_s.saturating_mul(1000),
            ),
            ("auth.leeway_s", self.auth.leeway_s.saturating_mul(1000)),
            (
                "websocket.ping_interval_ms",
                self.websocket.ping_interval_ms,
            ),
            ("websocket.idle_timeout_ms", self.websocket.idle_timeout_ms),
            (
                "websocket.write_timeout_ms",
                self.websocket.write_timeout_ms,
            ),
            ("http.header_timeout_ms", h.header_timeout_ms),
            ("http.body_timeout_ms", h.body_timeout_ms),
            ("http.idle_timeout_ms", h.idle_timeout_ms),
            ("http.shutdown_timeout_ms", h.shutdown_timeout_ms),
            ("quic.keepalive_ms", self.quic.keepalive_ms),
            ("quic.idle_timeout_ms", self.quic.idle_timeout_ms),
            ("quic.max_backoff_ms", self.quic.max_backoff_ms),
            ("gossip.interval_ms", self.gossip.interval_ms),
            ("gossip.max_interval_ms", self.gossip.max_interval_ms),
            (
                "gossip.dead_grace_s",
                self.gossip.dead_grace_s.saturating_mul(1000),
            ),
        ] {
            if v > 7 * DAY_MS {
                return Err(invalid(key, "must be at most 7 days"));
            }
        }
        if self.delivery.max_retries > 1000 {
            return Err(invalid("delivery.max_retries", "must be at most 1000"));
        }
        if self.auth.issuer.is_empty() {
            return Err(invalid("auth.issuer", "must not be empty"));
        }
        if self.http.cors_origin.is_empty()
            || axum::http::HeaderValue::from_str(&self.http.cors_origin).is_err()
        {
            return Err(invalid("http.cors_origin", "must be a valid header value"));
        }
        if self.tls.cert_path.is_some() != self.tls.key_path.is_some() {
            return Err(invalid(
                "tls.cert_path",
                "cert_path and key_path go together",
            ));
        }
        if self.nodes.is_empty() {
            return Err(invalid("nodes", "at least one [[nodes]] entry is needed"));
        }
        let mut ids = HashSet::new();
        let mut addrs = HashSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if n.id.is_empty() || n.id.len() > 64 || n.id.chars().any(|c| c.is_control()) {
                return Err(invalid(
                    &format!("nodes[{i}].id"),
                    "must be 1 to 64 bytes without control characters",
                ));
            }
            if !ids.insert(n.id.as_str()) {
                return Err(invalid(
                    &format!("nodes[{i}].id"),
                    format!("`{}` is listed twice", n.id),
                ));
            }
            // Peers dial the gossip and QUIC addresses a node announces, which are the bound
            // ones: a wildcard would be announced as such and reached by nobody.
            for (what, a) in [("gossip", n.gossip), ("quic", n.quic)] {
                if a.ip().is_unspecified() {
                    return Err(invalid(
                        &format!("nodes[{i}].{what}"),
                        format!(
                            "{a} is a wildcard address; other nodes dial this address, so give \
                             one they can reach (e.g. the host's or pod's IP)"
                        ),
                    ));
                }
            }
            for (what, a) in [("http", n.http), ("gossip", n.gossip), ("quic", n.quic)] {
                if a.port() != 0 && !addrs.insert((a, what == "http")) {
                    return Err(invalid(
                        &format!("nodes[{i}].{what}"),
                        format!("address {a} is used twice"),
                    ));
                }
            }
            if let Some(adv) = &n.advertise
                && !crate::view::valid_host_port(adv)
            {
                return Err(invalid(
                    &format!("nodes[{i}].advertise"),
                    "must be host:port",
                ));
            }
            if let Some(url) = &n.public_url
                && crate::view::check_member("n", url, "h:1").is_err()
            {
                return Err(invalid(
                    &format!("nodes[{i}].public_url"),
                    "must be ws://host:port/ws or wss://host:port/ws (a host, a port, the path /ws)",
                ));
            }
            if n.cert_path.is_some() != n.key_path.is_some() {
                return Err(invalid(
                    &format!("nodes[{i}].cert_path"),
                    "cert_path and key_path go together",
                ));
            }
        }
        Ok(())
    }

    /// The entry of node `id`.
    ///
    /// # Errors
    /// [`ConfigError::UnknownNode`] if the file does not list it.
    pub fn node(&self, id: &str) -> Result<&NodeConfig, ConfigError> {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .ok_or_else(|| ConfigError::UnknownNode(id.to_string()))
    }

    /// The secrets that are unfit for a network, each named by its key: a shipped default or
    /// shorter than [`MIN_SECRET_BYTES`].
    pub fn weak_secrets(&self) -> Vec<String> {
        let mut secrets = vec![
            ("cluster.secret".to_string(), &self.cluster.secret),
            ("auth.jwt_secret".to_string(), &self.auth.jwt_secret),
        ];
        for (i, key) in self.api.keys.iter().enumerate() {
            secrets.push((format!("api.keys[{i}]"), key));
        }
        secrets
            .into_iter()
            .filter_map(|(name, value)| {
                if SHIPPED_SECRETS.contains(&value.as_str()) {
                    Some(format!("`{name}` is the shipped default"))
                } else if value.len() < MIN_SECRET_BYTES {
                    Some(format!(
                        "`{name}` is {} bytes, shorter than {MIN_SECRET_BYTES}",
                        value.len()
                    ))
                } else {
                    None
                }
            })
            .collect()
    }

    /// Refuses to run node `id` on a network with weak secrets: when any of its addresses
    /// (`http`, `gossip`, `quic`, or the host of `advertise`) is not loopback, every secret
    /// must pass [`Config::weak_secrets`]. On loopback anything goes, so the one-command
    /// start keeps working.
    ///
    /// # Errors
    /// [`ConfigError::WeakSecrets`] naming each offending key, or
    /// [`ConfigError::UnknownNode`].
    pub fn check_secrets_for(&self, id: &str) -> Result<(), ConfigError> {
        let node = self.node(id)?;
        let mut addresses: Vec<String> = [node.http, node.gossip, node.quic]
            .iter()
            .filter(|a| !a.ip().is_loopback())
            .map(|a| a.to_string())
            .collect();
        if let Some(adv) = &node.advertise {
            let host = adv.rsplit_once(':').map_or(adv.as_str(), |(h, _)| h);
            if !is_loopback_host(host) {
                addresses.push(adv.clone());
            }
        }
        let Some(address) = addresses.into_iter().next() else {
            return Ok(());
        };
        let problems = self.weak_secrets();
        if problems.is_empty() {
            return Ok(());
        }
        Err(ConfigError::WeakSecrets {
            node: id.to_string(),
            address,
            problems,
        })
    }

    /// A one-node configuration on `127.0.0.1:0` ports, for tests.
    pub fn for_test() -> Config {
        Config::for_test_nodes(1)
    }

    /// `n` nodes `n1..` on `127.0.0.1:0` ports, for in-process cluster tests (seeds are set
    /// once the first node is bound).
    pub fn for_test_nodes(n: usize) -> Config {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
        Config {
            nodes: (1..=n)
                .map(|i| NodeConfig::new(&format!("n{i}"), any, any, any))
                .collect(),
            ..Config::default()
        }
    }
}

// The engine takes its settings from here; it does not know the configuration file.
impl EngineConfig {
    /// From the `[delivery]` and `[limits]` sections.
    pub fn from_config(d: &DeliveryConfig, l: &LimitsConfig) -> EngineConfig {
        EngineConfig {
            ack_timeout: Duration::from_millis(d.ack_timeout_ms),
            max_retries: d.max_retries,
            hold: Duration::from_millis(d.hold_ms),
            dedup_window: Duration::from_secs(d.dedup_window_s),
            max_dedup_entries: d.max_dedup_entries,
            max_held_per_user: d.max_held_per_user,
            max_deliveries: d.max_deliveries,
            max_held_bytes: d.max_held_bytes,
            max_inflight_per_session: l.max_inflight_per_session,
            sends_per_second: l.sends_per_second,
            max_unacked_per_session: l.max_unacked_per_session,
            max_sessions_per_user: l.max_sessions_per_user,
            report_offline: false,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig::from_config(&DeliveryConfig::default(), &LimitsConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[cluster]
id = "imgate-local"
seeds = ["127.0.0.1:7001"]
[auth]
mode = "open"
jwt_secret = "dev-only-change-me"
token_ttl_s = 7200
[api]
keys = ["dev-api-key"]
[delivery]
ack_timeout_ms = 1000
max_retries = 3
hold_ms = 5000
[[nodes]]
id = "n1"
http = "127.0.0.1:9501"
gossip = "127.0.0.1:7001"
quic = "127.0.0.1:7101"
"#;

    #[test]
    fn sample_parses_and_validates() {
        let cfg = Config::parse(SAMPLE).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.nodes[0].id, "n1");
        assert_eq!(cfg.limits.max_body_bytes, 65536);
    }

    #[test]
    fn shipped_cluster_toml_is_valid() {
        let text = include_str!("../cluster.toml");
        let cfg = Config::parse(text).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.nodes.len(), 3);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::parse(&format!("{SAMPLE}\n[delivery2]\nx = 1\n")).unwrap_err();
        assert!(err.to_string().contains("delivery2"), "{err}");
        let err = Config::parse(&SAMPLE.replace("max_retries", "max_retrys")).unwrap_err();
        assert!(err.to_string().contains("max_retrys"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let mut cfg = Config::parse(SAMPLE).unwrap();
        cfg.delivery.ack_timeout_ms = 0;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("delivery.ack_timeout_ms"), "{err}");

        let mut cfg = Config::parse(SAMPLE).unwrap();
        cfg.auth.mode = AuthMode::Users;
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("auth.users")
        );

        let mut cfg = Config::parse(SAMPLE).unwrap();
        cfg.nodes.push(cfg.nodes[0].clone());
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("nodes[1].id")
        );

        let mut cfg = Config::parse(SAMPLE).unwrap();
        cfg.limits.max_body_bytes = crate::wire::MAX_BODY + 1;
        cfg.limits.max_frame_bytes = 2 * crate::wire::MAX_BODY;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("limits.max_body_bytes"), "{err}");

        for adv in ["chat.example.com", "a@b:1", "h:1/x", "h h:1", "h:port"] {
            let mut cfg = Config::parse(SAMPLE).unwrap();
            cfg.nodes[0].advertise = Some(adv.into());
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains("nodes[0].advertise"), "{adv}: {err}");
        }

        let err = Config::parse(&SAMPLE.replace("9501", "\"x\"")).unwrap_err();
        assert!(err.to_string().contains("http"), "{err}");

        let mut cfg = Config::parse(SAMPLE).unwrap();
        cfg.auth.users.push(UserEntry {
            uid: "a".into(),
            password_hash: "plain".into(),
        });
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("auth.users[0].password_hash"), "{err}");
    }

    #[test]
    fn webhooks_are_checked() {
        let ok = |f: &dyn Fn(&mut Config)| {
            let mut c = Config::for_test();
            f(&mut c);
            c.validate()
        };
        let key_of = |r: Result<(), ConfigError>| match r {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert!(ok(&|_| {}).is_ok(), "no url: no webhooks, valid");
        let with = |url: &str| {
            let url = url.to_string();
            move |c: &mut Config| {
                c.webhooks.url = Some(url.clone());
                c.webhooks.secret = "s".into();
            }
        };
        assert!(ok(&with("https://backend.example/imgate")).is_ok());
        for bad in ["ftp://backend/x", "not a url", "http://", "unix:/tmp/sock"] {
            assert_eq!(key_of(ok(&with(bad))), "webhooks.url", "{bad}");
        }
        let no_secret = |c: &mut Config| c.webhooks.url = Some("http://b/x".into());
        assert_eq!(key_of(ok(&no_secret)), "webhooks.secret");
        let unknown = |c: &mut Config| c.webhooks.events = vec!["typing".into()];
        assert_eq!(key_of(ok(&unknown)), "webhooks.events");
        let zero = |c: &mut Config| c.webhooks.max_queue = 0;
        assert_eq!(key_of(ok(&zero)), "webhooks.max_queue");
        let mut c = Config::for_test();
        c.apply_env(|k| (k == "IMGATE_WEBHOOK_SECRET").then(|| "from-env".to_string()));
        assert_eq!(c.webhooks.secret, "from-env");
    }

    #[test]
    fn env_overrides_win() {
        let mut cfg = Config::parse(SAMPLE).unwrap();
        cfg.apply_env(|k| match k {
            "IMGATE_JWT_SECRET" => Some("from-env".into()),
            "IMGATE_API_KEY" => Some("key-env".into()),
            _ => None,
        });
        assert_eq!(cfg.auth.jwt_secret, "from-env");
        assert_eq!(cfg.api.keys, vec!["key-env".to_string()]);
    }

    const STRONG: &str = "0123456789abcdef0123456789abcdef";

    fn strong(mut cfg: Config) -> Config {
        cfg.cluster.secret = format!("c{STRONG}");
        cfg.auth.jwt_secret = format!("j{STRONG}");
        cfg.api.keys = vec![format!("k{STRONG}")];
        cfg
    }

    #[test]
    fn weak_secrets_are_fine_on_loopback_only() {
        let mut cfg = Config::parse(SAMPLE).unwrap();
        assert_eq!(cfg.weak_secrets().len(), 3, "{:?}", cfg.weak_secrets());
        cfg.check_secrets_for("n1")
            .expect("loopback accepts the defaults");
        cfg.nodes[0].http = "0.0.0.0:9501".parse().unwrap();
        let err = cfg.check_secrets_for("n1").unwrap_err();
        let text = err.to_string();
        for key in ["cluster.secret", "auth.jwt_secret", "api.keys[0]"] {
            assert!(
                text.contains(&format!("`{key}` is the shipped default")),
                "{text}"
            );
        }
        assert!(
            text.contains("0.0.0.0:9501") && text.contains("gen-secret"),
            "{text}"
        );
        strong(cfg).check_secrets_for("n1").expect("real secrets");
    }

    #[test]
    fn each_weak_secret_is_named() {
        let mut base = strong(Config::parse(SAMPLE).unwrap());
        base.nodes[0].gossip = "10.1.2.3:7001".parse().unwrap();
        base.check_secrets_for("n1").unwrap();
        type Weaken = fn(&mut Config);
        let cases: [(&str, Weaken); 5] = [
            ("`cluster.secret` is the shipped default", |c| {
                c.cluster.secret = "dev-cluster-secret-change-me".into()
            }),
            ("`cluster.secret` is 31 bytes, shorter than 32", |c| {
                c.cluster.secret = "x".repeat(31)
            }),
            ("`auth.jwt_secret` is the shipped default", |c| {
                c.auth.jwt_secret = "dev-only-change-me".into()
            }),
            ("`auth.jwt_secret` is 5 bytes, shorter than 32", |c| {
                c.auth.jwt_secret = "short".into()
            }),
            ("`api.keys[1]` is the shipped default", |c| {
                c.api.keys.push("dev-api-key".into())
            }),
        ];
        for (want, weaken) in cases {
            let mut cfg = base.clone();
            weaken(&mut cfg);
            match cfg.check_secrets_for("n1") {
                Err(ConfigError::WeakSecrets {
                    problems, address, ..
                }) => {
                    assert_eq!(problems, [want.to_string()]);
                    assert_eq!(address, "10.1.2.3:7001");
                }
                other => panic!("{want}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_advertised_name_counts_as_a_network() {
        let mut cfg = Config::parse(SAMPLE).unwrap();
        cfg.nodes[0].advertise = Some("localhost:9501".into());
        cfg.check_secrets_for("n1").unwrap();
        cfg.nodes[0].advertise = Some("[::1]:9501".into());
        cfg.check_secrets_for("n1").unwrap();
        cfg.nodes[0].advertise = Some("chat.example.com:443".into());
        assert!(matches!(
            cfg.check_secrets_for("n1"),
            Err(ConfigError::WeakSecrets { ref address, .. }) if address == "chat.example.com:443"
        ));
    }

    #[test]
    fn unknown_node_id() {
        let cfg = Config::parse(SAMPLE).unwrap();
        assert!(matches!(cfg.node("n9"), Err(ConfigError::UnknownNode(_))));
    }
}
