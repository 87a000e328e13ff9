//! Prometheus metrics of one node, served as text at `GET /metrics`.
//!
//! Every metric is an atomic handle, so the delivery engine and the sessions update them
//! without locks; the registry is only locked when `/metrics` encodes it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::protocol::FailReason;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// The reasons a gossip datagram is refused, as metric labels (`crate::gossip::Reject`).
pub const GOSSIP_REJECTS: [&str; 6] = [
    "short",
    "format",
    "bad_mac",
    "stale",
    "replay",
    "undecodable",
];

/// The node's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// WebSocket upgrades accepted.
    pub connections: Counter,
    /// Live WebSocket sessions (`imgate_sessions`).
    pub sessions: Gauge,
    /// Sends taken into delivery on this node (local sends, API pushes, forwarded in).
    pub messages_in: Counter,
    /// `msg` frames pushed to sessions, first pushes only.
    pub messages_out: Counter,
    /// Messages forwarded to another node.
    pub messages_forwarded: Counter,
    /// Messages acked end to end.
    pub delivered: Counter,
    failed: [Counter; FailReason::ALL.len()],
    /// Pushes repeated after `ack_timeout_ms`.
    pub retries: Counter,
    /// Sends answered from the dedup window instead of delivered again.
    pub duplicates: Counter,
    /// Messages currently held for users with no session.
    pub held: Gauge,
    /// Sessions closed because they did not keep up.
    pub slow_consumers: Counter,
    /// Client frames answered with `error`.
    pub frame_errors: Counter,
    logins_ok: Counter,
    logins_refused: Counter,
    /// QUIC peers connected.
    pub quic_peers: Gauge,
    /// Live gossip members, this node included.
    pub gossip_members: Gauge,
    gossip_rejected: [Counter; GOSSIP_REJECTS.len()],
    /// Open HTTP connections (WebSocket sessions included).
    pub http_connections: Gauge,
    /// HTTP connections closed at accept because `http.max_connections` were open.
    pub http_connections_refused: Counter,
    /// Sessions closed because a write to their socket missed `websocket.write_timeout_ms`.
    pub write_timeouts: Counter,
    /// Client frames other than `send` refused by the per-session budget.
    pub frames_rate_limited: Counter,
    /// Sessions closed (4008) for going on past their frame budget.
    pub sessions_flooding: Counter,
    /// Sessions closed (4004) at the expiry of their token.
    pub sessions_expired: Counter,
    /// Kicks remembered (each revokes the older tokens of one uid).
    pub kicks: Gauge,
    /// Bytes of message bodies in delivery on this node (held or pushed).
    pub delivery_bytes: Gauge,
    /// Bytes of message bodies queued towards peer nodes, all peers together.
    pub peer_queue_bytes: Gauge,
    /// Messages forwarded to their owner node and waiting for its outcome.
    pub forwards: Gauge,
    /// HTTP API requests (push, presence, kick) waiting for an answer.
    pub pending_requests: Gauge,
    /// Webhook events the backend answered 2xx.
    pub webhook_sent: Counter,
    /// Webhook events dropped: the queue was full, or the event too large to post.
    pub webhook_dropped: Counter,
    /// Webhook events given up after `webhooks.max_attempts` POSTs.
    pub webhook_failed: Counter,
    /// Webhook events waiting or being posted.
    pub webhook_queue: Gauge,
    /// `users`-mode logins refused with 503 `busy` (the password-check queue was full).
    pub logins_busy: Counter,
    /// Memberships this node keeps as the owner of rooms: `(room, uid)` pairs.
    pub room_members: Gauge,
    /// Memberships this node keeps as the owner of users: `(uid, room)` pairs.
    pub user_rooms: Gauge,
    /// Bytes of membership state on this node, both sides (an estimate from the entries).
    pub room_state_bytes: Gauge,
    /// Room sends fanned out by this node as the room's owner.
    pub room_sends: Counter,
    /// Memberships re-announced to a new owner after a ring change (or handed over).
    pub room_syncs: Counter,
    /// Room sends and `room_result`s waiting on this node (as sender's node or room owner).
    pub room_pending: Gauge,
    /// Seconds from taking a message to its first ack.
    pub delivery_latency: Histogram,
    /// Seconds from forwarding a message to another node until its outcome came back.
    pub forward_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every imgate metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("imgate");
        let connections = Counter::default();
        registry.register(
            "connections",
            "WebSocket upgrades accepted",
            connections.clone(),
        );
        let sessions = Gauge::default();
        registry.register("sessions", "Live WebSocket sessions", sessions.clone());
        let messages_in = Counter::default();
        registry.register(
            "messages_in",
            "Messages taken into delivery on this node",
            messages_in.clone(),
        );
        let messages_out = Counter::default();
        registry.register(
            "messages_out",
            "msg frames pushed to sessions (first pushes)",
            messages_out.clone(),
        );
        let messages_forwarded = Counter::default();
        registry.register(
            "messages_forwarded",
            "Messages forwarded to another node",
            messages_forwarded.clone(),
        );
        let delivered = Counter::default();
        registry.register("delivered", "Messages acked end to end", delivered.clone());
        let failed_family = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "failed",
            "Messages that ended in failed, by reason",
            failed_family.clone(),
        );
        let failed = FailReason::ALL
            .map(|r| failed_family.get_or_create_owned(&ReasonLabel { reason: r.as_str() }));
        let rejected_family = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "gossip_rejected",
            "Gossip datagrams refused before decoding, by reason",
            rejected_family.clone(),
        );
        let gossip_rejected =
            GOSSIP_REJECTS.map(|r| rejected_family.get_or_create_owned(&ReasonLabel { reason: r }));
        let retries = Counter::default();
        registry.register(
            "retries",
            "Pushes repeated after the ack timeout",
            retries.clone(),
        );
        let duplicates = Counter::default();
        registry.register(
            "duplicates",
            "Sends answered from the dedup window",
            duplicates.clone(),
        );
        let held = Gauge::default();
        registry.register(
            "held",
            "Messages held for users with no session",
            held.clone(),
        );
        let slow_consumers = Counter::default();
        registry.register(
            "slow_consumers",
            "Sessions closed for not keeping up",
            slow_consumers.clone(),
        );
        let frame_errors = Counter::default();
        registry.register(
            "frame_errors",
            "Client frames answered with an error frame",
            frame_errors.clone(),
        );
        let logins = Family::<ResultLabel, Counter>::default();
        registry.register("logins", "Logins by result", logins.clone());
        let logins_ok = logins.get_or_create_owned(&ResultLabel { result: "ok" });
        let logins_refused = logins.get_or_create_owned(&ResultLabel { result: "refused" });
        let quic_peers = Gauge::default();
        registry.register("quic_peers", "QUIC peers connected", quic_peers.clone());
        let gossip_members = Gauge::default();
        registry.register(
            "gossip_members",
            "Live gossip members, this node included",
            gossip_members.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let http_connections = gauge(
            &mut registry,
            "http_connections",
            "Open HTTP connections, WebSocket sessions included",
        );
        let http_connections_refused = counter(
            &mut registry,
            "http_connections_refused",
            "HTTP connections closed at accept (http.max_connections)",
        );
        let write_timeouts = counter(
            &mut registry,
            "write_timeouts",
            "Sessions closed because a socket write missed websocket.write_timeout_ms",
        );
        let frames_rate_limited = counter(
            &mut registry,
            "frames_rate_limited",
            "Client frames other than send refused by the per-session budget",
        );
        let sessions_flooding = counter(
            &mut registry,
            "sessions_flooding",
            "Sessions closed (4008) for going on past their frame budget",
        );
        let sessions_expired = counter(
            &mut registry,
            "sessions_expired",
            "Sessions closed (4004) when their token expired",
        );
        let kicks = gauge(&mut registry, "kicks", "Kicks remembered");
        let delivery_bytes = gauge(
            &mut registry,
            "delivery_bytes",
            "Bytes of message bodies in delivery on this node",
        );
        let peer_queue_bytes = gauge(
            &mut registry,
            "peer_queue_bytes",
            "Bytes of message bodies queued towards peer nodes",
        );
        let forwards = gauge(
            &mut registry,
            "forwards",
            "Messages forwarded to their owner node and waiting for its outcome",
        );
        let pending_requests = gauge(
            &mut registry,
            "pending_requests",
            "HTTP API requests waiting for an answer",
        );
        let webhook_sent = counter(
            &mut registry,
            "webhook_sent",
            "Webhook events the backend answered with 2xx",
        );
        let webhook_dropped = counter(
            &mut registry,
            "webhook_dropped",
            "Webhook events dropped (queue full, or too large to post)",
        );
        let webhook_failed = counter(
            &mut registry,
            "webhook_failed",
            "Webhook events given up after webhooks.max_attempts POSTs",
        );
        let webhook_queue = gauge(
            &mut registry,
            "webhook_queue",
            "Webhook events waiting or being posted",
        );
        let logins_busy = counter(
            &mut registry,
            "logins_busy",
            "Logins refused with 503 busy (password-check queue full)",
        );
        let room_members = gauge(
            &mut registry,
            "room_members",
            "Memberships kept as the owner of rooms: (room, uid) pairs",
        );
        let user_rooms = gauge(
            &mut registry,
            "user_rooms",
            "Memberships kept as the owner of users: (uid, room) pairs",
        );
        let room_state_bytes = gauge(
            &mut registry,
            "room_state_bytes",
            "Bytes of room membership state, both sides (estimate)",
        );
        let room_sends = counter(
            &mut registry,
            "room_sends",
            "Room sends fanned out as the room's owner",
        );
        let room_syncs = counter(
            &mut registry,
            "room_syncs",
            "Memberships re-announced to a new owner after a ring change",
        );
        let room_pending = gauge(
            &mut registry,
            "room_pending",
            "Room sends and joins waiting for an answer on this node",
        );
        let delivery_latency = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register(
            "delivery_latency_seconds",
            "Time from taking a message to its first ack",
            delivery_latency.clone(),
        );
        let forward_latency = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register(
            "forward_latency_seconds",
            "Time from forwarding a message until its outcome came back",
            forward_latency.clone(),
        );
        Metrics {
            registry,
            connections,
            sessions,
            messages_in,
            messages_out,
            messages_forwarded,
            delivered,
            failed,
            retries,
            duplicates,
            held,
            slow_consumers,
            frame_errors,
            logins_ok,
            logins_refused,
            quic_peers,
            gossip_members,
            gossip_rejected,
            http_connections,
            http_connections_refused,
            write_timeouts,
            frames_rate_limited,
            sessions_flooding,
            sessions_expired,
            kicks,
            delivery_bytes,
            peer_queue_bytes,
            forwards,
            pending_requests,
            webhook_sent,
            webhook_dropped,
            webhook_failed,
            webhook_queue,
            logins_busy,
            room_members,
            user_rooms,
            room_state_bytes,
            room_sends,
            room_syncs,
            room_pending,
            delivery_latency,
            forward_latency,
        }
    }

    /// Counts one gossip datagram refused, by its reason's label (one of [`GOSSIP_REJECTS`]).
    pub fn gossip_rejected(&self, reason: &str) {
        if let Some(i) = GOSSIP_REJECTS.iter().position(|r| *r == reason) {
            self.gossip_rejected[i].inc();
        }
    }

    /// Gossip datagrams refused so far, every reason together.
    pub fn gossip_rejected_total(&self) -> u64 {
        self.gossip_rejected.iter().map(Counter::get).sum()
    }

    /// Counts one `failed` outcome.
    pub fn failed(&self, reason: FailReason) {
        let i = FailReason::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("ALL lists every reason");
        self.failed[i].inc();
    }

    /// Counts one login.
    pub fn login(&self, ok: bool) {
        if ok {
            self.logins_ok.inc();
        } else {
            self.logins_refused.inc();
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
