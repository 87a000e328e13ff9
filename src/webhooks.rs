//! Webhooks: events POSTed to the application's backend, off the delivery path.
//!
//! `[webhooks]` names a URL, a secret and the events to send (`offline`, `connect`,
//! `disconnect`). [`Webhooks::emit`] never waits: it serializes the event and puts it on a
//! bounded queue (`webhooks.max_queue`), or drops and counts it
//! (`imgate_webhook_dropped_total`) when the queue is full or the event is too large. One task
//! takes events off the queue and posts each in a task of its own, at most
//! `webhooks.concurrency` at once, with the header `X-Imgate-Signature: sha256=<hex HMAC-SHA256
//! of the body>`. A POST that is not answered 2xx within `webhooks.timeout_ms` is tried again
//! after a backoff (100 ms doubling, with jitter, at most 5 s), up to `webhooks.max_attempts`
//! POSTs, then given up (`imgate_webhook_failed_total`). A slow or dead backend therefore
//! costs a node at most the queue's memory; the sessions and the driver never wait on it.
//!
//! Each event is sent by one node: `offline` by the recipient's owner (where the delivery ended),
//! `connect` and `disconnect` by the node that served the session.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::value::RawValue;
use sha2::Sha256;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::WebhooksConfig;
use crate::engine::{Message, NodeId, SessionId};
use crate::metrics::Metrics;

/// Largest event body posted, in bytes (an `offline` event carries the message body, at most
/// `limits.max_body_bytes`, plus its envelope).
pub const MAX_EVENT_BYTES: usize = 2 << 20;

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "x-imgate-signature";

/// An event for the backend.
#[derive(Debug, Clone)]
pub enum Event {
    /// A message ended `failed: offline` on its recipient's owner.
    Offline(Message),
    /// A session went live.
    Connect {
        /// Its user.
        uid: Arc<str>,
        /// Its id (as in `welcome.session`).
        session: SessionId,
    },
    /// A session ended.
    Disconnect {
        /// Its user.
        uid: Arc<str>,
        /// Its id.
        session: SessionId,
    },
}

impl Event {
    /// The event's name in `webhooks.events` and in the payload.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Offline(_) => "offline",
            Event::Connect { .. } => "connect",
            Event::Disconnect { .. } => "disconnect",
        }
    }
}

/// The sending end of a node's webhooks.
#[derive(Debug)]
pub struct Webhooks {
    node: NodeId,
    events: [bool; 3],
    queue: mpsc::Sender<Vec<u8>>,
    metrics: Arc<Metrics>,
}

/// `sha256=<hex>` of `body` under `secret`: the `X-Imgate-Signature` value.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

impl Webhooks {
    /// Starts the sender of node `node` when `cfg` names a URL; `None` otherwise. Its tasks end
    /// at `stop` (what is still queued then is dropped).
    ///
    /// # Errors
    /// Why the HTTP client cannot be built.
    pub fn start(
        cfg: &WebhooksConfig,
        node: NodeId,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Option<Arc<Webhooks>>, String> {
        let Some(url) = cfg.url.clone() else {
            return Ok(None);
        };
        let (queue, rx) = mpsc::channel(cfg.max_queue);
        let events = WebhooksConfig::EVENTS.map(|e| cfg.wants(e));
        // https:// backends are checked against the web's public roots.
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .use_preconfigured_tls(tls)
            .build()
            .map_err(|e| e.to_string())?;
        let poster = Poster {
            client,
            url,
            secret: cfg.secret.clone(),
            attempts: cfg.max_attempts,
            metrics: metrics.clone(),
            stop: stop.clone(),
        };
        tracker.spawn(run(
            rx,
            Arc::new(poster),
            Arc::new(Semaphore::new(cfg.concurrency)),
            tracker.clone(),
        ));
        Ok(Some(Arc::new(Webhooks {
            node,
            events,
            queue,
            metrics,
        })))
    }

    /// Queues `event` if it is one of `webhooks.events`; never waits.
    pub fn emit(&self, event: Event, now_ms: u64) {
        let wanted = WebhooksConfig::EVENTS
            .iter()
            .position(|e| *e == event.name())
            .is_some_and(|i| self.events[i]);
        if !wanted {
            return;
        }
        let node = &*self.node;
        let event_name = event.name();
        let body = match &event {
            // The message body goes in as it came (raw JSON), not parsed again.
            Event::Offline(m) => serde_json::to_vec(&OfflinePayload {
                event: event_name,
                node,
                ts: now_ms,
                from: &m.from,
                to: &m.to,
                id: &m.id,
                body: &m.body,
                room: m.room.as_deref(),
            }),
            Event::Connect { uid, session } | Event::Disconnect { uid, session } => {
                serde_json::to_vec(&SessionPayload {
                    event: event_name,
                    node,
                    ts: now_ms,
                    uid,
                    session: &format!("{node}-{session}"),
                })
            }
        };
        let Ok(body) = body else {
            self.metrics.webhook_dropped.inc();
            return;
        };
        if body.len() > MAX_EVENT_BYTES {
            self.metrics.webhook_dropped.inc();
            tracing::warn!(
                event = event.name(),
                bytes = body.len(),
                "webhook event too large; dropped"
            );
            return;
        }
        match self.queue.try_send(body) {
            Ok(()) => {
                self.metrics.webhook_queue.inc();
            }
            Err(_) => {
                self.metrics.webhook_dropped.inc();
            }
        }
    }
}

#[derive(Serialize)]
struct OfflinePayload<'a> {
    event: &'static str,
    node: &'a str,
    ts: u64,
    from: &'a str,
    to: &'a str,
    id: &'a str,
    body: &'a RawValue,
    /// The room, for a room message that ended `offline` for the member `to`.
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
}

#[derive(Serialize)]
struct SessionPayload<'a> {
    event: &'static str,
    node: &'a str,
    ts: u64,
    uid: &'a str,
    session: &'a str,
}

/// What posts one event.
struct Poster {
    client: reqwest::Client,
    url: String,
    secret: String,
    attempts: u32,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
}

impl Poster {
    /// POSTs `body` until a 2xx answer or `attempts` POSTs.
    async fn post(&self, body: Vec<u8>) {
        let signature = signature(&self.secret, &body);
        let mut backoff = Duration::from_millis(100);
        for attempt in 1..=self.attempts {
            let sent = self
                .client
                .post(&self.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(SIGNATURE_HEADER, &signature)
                .body(body.clone())
                .send()
                .await;
            // The contract: every answer that is not 2xx is retried, with backoff.
            let why = match sent {
                Ok(r) if r.status().is_success() => {
                    self.metrics.webhook_sent.inc();
                    return;
                }
                Ok(r) => format!("answered {}", r.status()),
                Err(e) => e.to_string(),
            };
            if attempt == self.attempts {
                self.metrics.webhook_failed.inc();
                tracing::warn!(url = %self.url, attempts = attempt, reason = %why, "webhook event given up");
                return;
            }
            tracing::debug!(url = %self.url, attempt, reason = %why, "webhook POST failed; trying again");
            let jitter = Duration::from_millis(rand::random::<u64>() % 100);
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(backoff + jitter) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<Vec<u8>>,
    poster: Arc<Poster>,
    slots: Arc<Semaphore>,
    tracker: TaskTracker,
) {
    loop {
        // A slot first, then an event: an event is either queued or being posted, so at most
        // `max_queue` + `concurrency` are held.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let body = tokio::select! {
            _ = poster.stop.cancelled() => return,
            body = rx.recv() => match body { Some(b) => b, None => return },
        };
        let poster = poster.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = poster.stop.cancelled() => {}
                _ = poster.post(body) => {}
            }
            poster.metrics.webhook_queue.dec();
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signature matches Python's `hmac.new(b"s", body, hashlib.sha256).hexdigest()`.
    #[test]
    fn the_signature_is_the_hex_hmac_sha256_of_the_body() {
        assert_eq!(
            signature("s", br#"{"event":"connect"}"#),
            "sha256=e013ff21b3b8776d793c6d381c11cab13ea58882277b2744686fb9235e6f44cd"
        );
    }
}
