//! imgate: a storage-free instant-messaging gateway cluster with end-to-end delivery acks.
//!
//! Modules, one concern each:
//! - [`config`]: `cluster.toml`, defaults, env overrides, validation.
//! - [`auth`]: uid rules, JWT issue/verify, argon2 passwords.
//! - [`protocol`]: client WebSocket frames (parse) and node frames (encode).
//! - [`engine`]: the delivery rules as a state machine without IO.
//! - [`metrics`]: Prometheus metrics of a node.
//! - [`node`]: a running node: the engine driver, sessions and the HTTP server.
//! - [`http`]: the HTTP routes (login, API, operations, chat page) and JSON errors.
//! - [`session`]: one WebSocket session.

pub mod auth;
pub mod client;
pub mod config;
pub mod engine;
pub mod http;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod peer;
pub mod protocol;
pub mod ring;
pub mod session;
pub mod tls;
pub mod up;
pub mod wire;
