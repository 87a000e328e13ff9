//! imgate: a storage-free instant-messaging gateway cluster with end-to-end delivery acks.
//!
//! Modules, one concern each:
//! - [`config`]: `cluster.toml`, defaults, env overrides, validation.
//! - [`uid`]: the uid rule.
//! - [`clock`]: wall-clock readings (only the edges read the clock).
//! - [`auth`]: JWT issue/verify, argon2 passwords.
//! - [`protocol`]: client WebSocket frames (parse) and node frames (encode).
//! - [`engine`]: the delivery rules as a state machine without IO.
//! - [`relay`]: the cluster core around the engine (routing, forwards, hand-over, requests),
//!   also without IO; a seeded simulation runs whole clusters of it (`tests/simulation.rs`).
//! - [`view`]: a node's view of the cluster (members and ring), plain data.
//! - [`metrics`]: Prometheus metrics of a node.
//! - [`ring`]: the consistent-hash ring (hashring, virtual nodes, explicit-byte hashing).
//! - [`gossip`]: chitchat's transport with every datagram sealed by an HMAC and checked first.
//! - [`membership`]: gossip membership (chitchat) and the view: live members plus ring.
//! - [`wire`]: node-to-node frames (bincode 2 behind a version byte).
//! - [`keys`]: keys derived from the cluster secret (HKDF-SHA256, one label per use).
//! - [`tls`]: the cluster credential: mutual TLS from a CA derived from the cluster secret.
//! - [`transport`]: the links a driver sends through, as a trait: QUIC ([`peer`]) or in memory.
//! - [`peer`]: node-to-node links over QUIC, one connection per pair of nodes.
//! - [`outbox`]: a session's bounded queue of frames and its end signal.
//! - [`state`]: what a node's tasks share, and the driver's command set.
//! - [`driver`]: the task that pumps a node's relay; it decides nothing.
//! - [`node`]: a running node: start-up, the handle, drain and shutdown.
//! - [`http`]: the HTTP routes (login, API, operations, chat page) and JSON errors.
//! - [`session`]: one WebSocket session.
//! - [`client`]: the client SDK (reconnect, resend, dedup, auto-ack).
//! - [`up`]: `imgate up`, every node of a file as a child process.
//! - [`webhooks`]: signed events POSTed to the application's backend, off the delivery path.

pub mod auth;
pub mod client;
pub mod client_tls;
pub mod clock;
pub mod config;
pub mod driver;
pub mod engine;
pub mod gossip;
pub mod http;
pub mod keys;
pub mod kicks;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod outbox;
pub mod peer;
pub mod protocol;
pub mod relay;
pub mod ring;
pub mod rooms;
pub mod serve;
pub mod session;
pub mod state;
pub mod tls;
pub mod transport;
pub mod uid;
pub mod up;
pub mod view;
pub mod webhooks;
pub mod wire;

/// Resolves with the reason once `failure` holds one; never, if its sender is dropped first
/// (the task that would report a failure ended on purpose, at shutdown).
pub(crate) async fn first_failure(
    mut failure: tokio::sync::watch::Receiver<Option<String>>,
) -> String {
    let why = failure
        .wait_for(Option::is_some)
        .await
        .map(|why| why.clone().unwrap_or_default());
    match why {
        Ok(why) => why,
        Err(_) => std::future::pending().await,
    }
}
