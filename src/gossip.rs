//! Authenticated gossip: chitchat's datagrams, each sealed with an HMAC-SHA256 tag keyed from
//! `cluster.secret`, and checked before chitchat decodes a byte.
//!
//! A datagram is:
//!
//! ```text
//! +--------+----------------+---------------------------+-------------------+
//! | 0xA1   | sent at: u64 BE | chitchat envelope bytes   | HMAC-SHA256: 32 B |
//! | format | ms since epoch  | (chitchat's own encoding) | over all before it|
//! +--------+----------------+---------------------------+-------------------+
//! ```
//!
//! The key is [`crate::keys::derive`]`(secret, GossipMac, cluster.id)`. A datagram is refused,
//! and counted in `imgate_gossip_rejected_total{reason}`, when it is shorter than a header and
//! a tag (`short`), has another format byte (`format`), its tag does not verify (`bad_mac`:
//! anyone without the secret, including a plain chitchat peer), its time is more than
//! [`MAX_SKEW`] away from this node's clock (`stale`), it was already accepted (`replay`), or
//! its verified payload is not a chitchat message (`undecodable`). Only then is the envelope
//! decoded, so an outsider's bytes never reach chitchat's decoder, its asserts or its zstd
//! inflation (capped anyway in the patched chitchat, `vendor/chitchat/IMGATE-PATCH.md`).

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::clock::now_ms;
use crate::metrics::Metrics;

type HmacSha256 = Hmac<Sha256>;

/// First byte of every datagram (chitchat's own datagrams start with 0x53).
pub const FORMAT: u8 = 0xA1;
/// Format byte and send time.
const HEADER: usize = 1 + 8;
/// HMAC-SHA256 tag length.
const TAG: usize = 32;
/// The largest UDP payload.
pub const MAX_DATAGRAM: usize = 65_507;
/// How far a datagram's send time may be from the receiver's clock. Node clocks must agree
/// within this (NTP); older datagrams are refused, newer ones are remembered until then.
pub const MAX_SKEW: Duration = Duration::from_secs(60);
/// Tags remembered to refuse replays. Honest traffic is a few dozen datagrams per second per
/// node; past this the oldest are forgotten (a replay that old is harmless, see
/// docs/PROTOCOL.md).
const REPLAY_MEMORY: usize = 65_536;

/// Why a datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Shorter than a header and a tag.
    Short,
    /// Not our format byte.
    Format,
    /// The tag does not verify: not sealed with this cluster's key.
    BadMac,
    /// Sent more than [`MAX_SKEW`] from now.
    Stale,
    /// Already accepted once.
    Replay,
    /// Verified, but not a chitchat message.
    Undecodable,
}

impl Reject {
    /// Every reason, in a fixed order (metric label values).
    pub const ALL: [Reject; 6] = [
        Reject::Short,
        Reject::Format,
        Reject::BadMac,
        Reject::Stale,
        Reject::Replay,
        Reject::Undecodable,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Short => "short",
            Reject::Format => "format",
            Reject::BadMac => "bad_mac",
            Reject::Stale => "stale",
            Reject::Replay => "replay",
            Reject::Undecodable => "undecodable",
        }
    }
}

/// The sealing and checking of datagrams, without sockets.
pub struct Sealer {
    mac: HmacSha256,
    seen: HashSet<[u8; 16]>,
    order: VecDeque<([u8; 16], u64)>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("remembered", &self.seen.len())
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer for the gossip key of `secret` in cluster `cluster_id`.
    pub fn new(secret: &str, cluster_id: &str) -> Sealer {
        let key = crate::keys::derive(secret, crate::keys::KeyUse::GossipMac, cluster_id);
        Sealer {
            mac: HmacSha256::new_from_slice(&key).expect("HMAC takes any key length"),
            seen: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// Writes the datagram for `payload`, sent at `now_ms`, into `out`.
    pub fn seal(&self, now_ms: u64, payload: &[u8], out: &mut Vec<u8>) {
        out.clear();
        out.push(FORMAT);
        out.extend_from_slice(&now_ms.to_be_bytes());
        out.extend_from_slice(payload);
        let tag = self
            .mac
            .clone()
            .chain_update(&out[..])
            .finalize()
            .into_bytes();
        out.extend_from_slice(&tag);
    }

    /// Checks `datagram` received at `now_ms`; returns the payload it carries.
    ///
    /// # Errors
    /// The [`Reject`] reason.
    pub fn open<'a>(&mut self, now_ms: u64, datagram: &'a [u8]) -> Result<&'a [u8], Reject> {
        if datagram.len() < HEADER + TAG {
            return Err(Reject::Short);
        }
        if datagram[0] != FORMAT {
            return Err(Reject::Format);
        }
        let (body, tag) = datagram.split_at(datagram.len() - TAG);
        self.mac
            .clone()
            .chain_update(body)
            .verify_slice(tag)
            .map_err(|_| Reject::BadMac)?;
        let sent = u64::from_be_bytes(body[1..HEADER].try_into().expect("8 bytes"));
        let skew = MAX_SKEW.as_millis() as u64;
        if sent.abs_diff(now_ms) > skew {
            return Err(Reject::Stale);
        }
        // Forget what can no longer be replayed (sent more than MAX_SKEW ago, seen more than
        // twice that ago), then remember this one.
        while let Some((old, at)) = self.order.front() {
            if now_ms.saturating_sub(*at) <= 2 * skew && self.order.len() < REPLAY_MEMORY {
                break;
            }
            self.seen.remove(old);
            self.order.pop_front();
        }
        let id: [u8; 16] = tag[..16].try_into().expect("16 bytes");
        if !self.seen.insert(id) {
            return Err(Reject::Replay);
        }
        self.order.push_back((id, now_ms));
        Ok(&body[HEADER..])
    }
}

/// chitchat's transport with every datagram sealed and checked ([`Sealer`]).
pub struct AuthTransport {
    secret: String,
    cluster_id: String,
    metrics: Arc<Metrics>,
}

impl AuthTransport {
    /// The transport of a node with this secret in this cluster.
    pub fn new(secret: &str, cluster_id: &str, metrics: Arc<Metrics>) -> AuthTransport {
        AuthTransport {
            secret: secret.to_string(),
            cluster_id: cluster_id.to_string(),
            metrics,
        }
    }
}

#[async_trait]
impl Transport for AuthTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = tokio::net::UdpSocket::bind(listen_addr)
            .await
            .with_context(|| format!("binding the gossip socket {listen_addr}"))?;
        Ok(Box::new(AuthSocket {
            socket,
            sealer: Sealer::new(&self.secret, &self.cluster_id),
            recv_buf: vec![0; MAX_DATAGRAM + 1],
            payload: Vec::new(),
            out: Vec::new(),
            metrics: self.metrics.clone(),
        }))
    }
}

struct AuthSocket {
    socket: tokio::net::UdpSocket,
    sealer: Sealer,
    recv_buf: Vec<u8>,
    payload: Vec<u8>,
    out: Vec<u8>,
    metrics: Arc<Metrics>,
}

fn is_transient(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::OutOfMemory
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionRefused
    )
}

#[async_trait]
impl Socket for AuthSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        self.payload.clear();
        envelope.serialize(&mut self.payload);
        self.sealer.seal(now_ms(), &self.payload, &mut self.out);
        if self.out.len() > MAX_DATAGRAM {
            // Not fatal: chitchat logs it and gossips again next round.
            anyhow::bail!(
                "gossip datagram of {} bytes is over {MAX_DATAGRAM}",
                self.out.len()
            );
        }
        let num_bytes_sent = self.socket.send_to(&self.out, to).await?;
        Ok(SendOutcome { num_bytes_sent })
    }

    /// Cancel-safe: nothing is awaited after a datagram is taken off the socket.
    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let (n, from_addr) = match self.socket.recv_from(&mut self.recv_buf).await {
                Ok(r) => r,
                Err(e) if is_transient(&e) => continue,
                Err(e) => return Err(e).context("gossip socket failed"),
            };
            let checked =
                self.sealer
                    .open(now_ms(), &self.recv_buf[..n])
                    .and_then(|mut payload| {
                        ChitchatEnvelope::deserialize(&mut payload).map_err(|_| Reject::Undecodable)
                    });
            match checked {
                Ok(envelope) => {
                    return Ok(RecvOutcome {
                        from_addr,
                        envelope,
                        num_bytes_received: n,
                    });
                }
                Err(reason) => {
                    self.metrics.gossip_rejected(reason.as_str());
                    tracing::debug!(from = %from_addr, len = n, reason = reason.as_str(), "gossip datagram refused");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metric labels list every reason, in the same order.
    #[test]
    fn every_reason_has_its_metric_label() {
        let labels: Vec<&str> = Reject::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels, crate::metrics::GOSSIP_REJECTS);
    }

    const NOW: u64 = 1_800_000_000_000;

    #[test]
    fn sealed_datagrams_open_once_with_the_same_key_only() {
        let mut a = Sealer::new("secret", "c");
        let b = Sealer::new("secret", "c");
        let mut out = Vec::new();
        b.seal(NOW, b"hello", &mut out);
        assert_eq!(out.len(), HEADER + 5 + TAG);
        assert_eq!(a.open(NOW + 10, &out), Ok(&b"hello"[..]));
        assert_eq!(a.open(NOW + 20, &out), Err(Reject::Replay));
        // Another secret or another cluster id is another key.
        for other in [Sealer::new("other", "c"), Sealer::new("secret", "d")] {
            other.seal(NOW, b"hello", &mut out);
            assert_eq!(a.open(NOW, &out), Err(Reject::BadMac));
        }
    }

    #[test]
    fn any_changed_byte_is_refused() {
        let mut a = Sealer::new("secret", "c");
        let mut sealed = Vec::new();
        a.seal(NOW, b"payload bytes", &mut sealed);
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            let want = if i == 0 {
                Reject::Format
            } else {
                Reject::BadMac
            };
            assert_eq!(a.open(NOW, &bad), Err(want), "byte {i}");
        }
        assert_eq!(a.open(NOW, &sealed[..HEADER + TAG - 1]), Err(Reject::Short));
        assert_eq!(
            a.open(NOW, &sealed[..sealed.len() - 1]),
            Err(Reject::BadMac)
        );
        assert!(a.open(NOW, &sealed).is_ok(), "the original still opens");
    }

    #[test]
    fn old_and_future_datagrams_are_stale() {
        let mut a = Sealer::new("secret", "c");
        let skew = MAX_SKEW.as_millis() as u64;
        let mut out = Vec::new();
        for (sent, ok) in [
            (NOW - skew - 1, false),
            (NOW - skew, true),
            (NOW + skew, true),
            (NOW + skew + 1, false),
        ] {
            a.seal(sent, b"x", &mut out);
            let got = a.open(NOW, &out);
            assert_eq!(got.is_ok(), ok, "sent at {sent}: {got:?}");
            if !ok {
                assert_eq!(got, Err(Reject::Stale));
            }
        }
    }

    #[test]
    fn replay_memory_is_bounded_and_forgets_only_what_is_stale() {
        let mut a = Sealer::new("secret", "c");
        let mut out = Vec::new();
        let skew = MAX_SKEW.as_millis() as u64;
        a.seal(NOW, b"first", &mut out);
        let first = out.clone();
        a.open(NOW, &first).unwrap();
        // Later datagrams within the window keep the first one remembered.
        for i in 0..100u64 {
            a.seal(NOW + i, &i.to_be_bytes(), &mut out);
            a.open(NOW + i, &out).unwrap();
        }
        assert_eq!(a.open(NOW + skew, &first), Err(Reject::Replay));
        // Once it is stale it is both refused as stale and forgotten.
        let late = NOW + 2 * skew + 1;
        a.seal(late, b"late", &mut out);
        a.open(late, &out).unwrap();
        assert_eq!(a.open(late, &first), Err(Reject::Stale));
        // Left: the 99 sent after `first` (still replayable until `late`), and `late`.
        assert_eq!(a.seen.len(), 100);
        // The memory never holds more than its bound.
        for i in 0..(REPLAY_MEMORY as u64 + 10) {
            a.seal(late, &i.to_be_bytes(), &mut out);
            a.open(late, &out).unwrap();
        }
        assert!(a.seen.len() <= REPLAY_MEMORY && a.order.len() == a.seen.len());
    }
}
