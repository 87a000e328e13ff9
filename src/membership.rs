//! Membership by gossip (chitchat): who is alive, where they listen, and the ring built on it.
//!
//! Each node gossips its id, WebSocket URL, HTTP and QUIC addresses and peer protocol version
//! as key-values. A task watches chitchat's live set and publishes a [`View`] (members plus a
//! [`Ring`] with a version number) on a `watch` channel whenever it changes. A node that is
//! draining sets `status = leaving`; an extra liveness predicate drops it from every live set
//! at once, so others stop routing to it before it goes.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState, ProtocolVersion,
    spawn_chitchat,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::NodeId;
use crate::gossip::AuthTransport;
use crate::ring::Ring;
use crate::view::check_member;
pub use crate::view::{Member, View};

/// Gossip key: WebSocket URL.
pub const KEY_URL: &str = "url";
/// Gossip key: advertised HTTP `host:port`.
pub const KEY_HTTP: &str = "http";
/// Gossip key: QUIC address.
pub const KEY_QUIC: &str = "quic";
/// Gossip key: peer protocol version.
pub const KEY_PROTO: &str = "proto";
/// Gossip key: `serving` or `leaving`.
pub const KEY_STATUS: &str = "status";

/// What this node gossips about itself.
#[derive(Debug, Clone)]
pub struct SelfInfo {
    /// Node id.
    pub id: String,
    /// WebSocket URL.
    pub url: String,
    /// Advertised HTTP `host:port`.
    pub http: String,
    /// Bound QUIC address.
    pub quic: SocketAddr,
}

/// Gossips this node's kicks (`kick:<uid>` = `at` in its own state).
#[derive(Clone)]
pub struct KickGossip(Arc<tokio::sync::Mutex<chitchat::Chitchat>>);

impl std::fmt::Debug for KickGossip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KickGossip")
    }
}

impl KickGossip {
    /// Gossips a kick under this node's own key, so that it outlives any other node.
    pub async fn publish(&self, uid: &str, at: u64) {
        let key = format!("{}{uid}", crate::kicks::KEY_PREFIX);
        self.0
            .lock()
            .await
            .self_node_state()
            .set(key, at.to_string());
    }

    /// Stops gossiping a kick whose keeping time is over.
    pub async fn forget(&self, uid: &str) {
        let key = format!("{}{uid}", crate::kicks::KEY_PREFIX);
        let mut chitchat = self.0.lock().await;
        let state = chitchat.self_node_state();
        if state.get(&key).is_some() {
            state.delete(&key);
        }
    }
}

/// A running membership.
pub struct Membership {
    handle: Option<ChitchatHandle>,
    leaving: Arc<std::sync::atomic::AtomicBool>,
    refresh: Arc<tokio::sync::Notify>,
    view: watch::Receiver<Arc<View>>,
    gossip_addr: SocketAddr,
    stop: CancellationToken,
    failure: watch::Receiver<Option<String>>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("gossip_addr", &self.gossip_addr)
            .finish_non_exhaustive()
    }
}

fn member_of(state: &NodeState, id: &ChitchatId) -> Option<Member> {
    if state.get(KEY_PROTO) != Some(&crate::wire::VERSION.to_string()) {
        return None;
    }
    let (url, http) = (state.get(KEY_URL)?, state.get(KEY_HTTP)?);
    if let Err(key) = check_member(&id.node_id, url, http) {
        tracing::warn!(node = %id.node_id.chars().take(64).collect::<String>(), key, "member left out of the view: bad gossiped value");
        return None;
    }
    Some(Member {
        id: Arc::from(&*id.node_id),
        url: Arc::from(url),
        http: http.to_string(),
        quic: state.get(KEY_QUIC)?.parse().ok()?,
        gossip: id.gossip_advertise_addr,
        generation: id.generation_id,
    })
}

/// Builds the member map from chitchat's live set: the newest generation of each node id.
fn members_of(live: &BTreeMap<ChitchatId, NodeState>) -> BTreeMap<NodeId, Member> {
    let mut members: BTreeMap<NodeId, Member> = BTreeMap::new();
    for (id, state) in live {
        if let Some(m) = member_of(state, id) {
            match members.get(&m.id) {
                Some(old) if old.generation >= m.generation => {}
                _ => {
                    members.insert(m.id.clone(), m);
                }
            }
        }
    }
    members
}

impl Membership {
    /// Joins the cluster through `cfg.cluster.seeds`, gossiping on `gossip` (port 0 picks a
    /// free port: chitchat binds its own socket, so the port is found by a probe bind first).
    ///
    /// # Errors
    /// If the address cannot be bound or chitchat cannot start.
    pub async fn start(
        cfg: &Config,
        me: SelfInfo,
        gossip: SocketAddr,
        metrics: Arc<crate::metrics::Metrics>,
        kicks: Arc<crate::kicks::Kicks>,
    ) -> anyhow::Result<Membership> {
        let gossip_addr = if gossip.port() == 0 {
            StdUdpSocket::bind(gossip)?.local_addr()?
        } else {
            gossip
        };
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let g = &cfg.gossip;
        let chitchat_cfg = ChitchatConfig {
            chitchat_id: ChitchatId::new(me.id.clone(), generation, gossip_addr),
            cluster_id: cfg.cluster.id.clone(),
            gossip_interval: Duration::from_millis(g.interval_ms),
            listen_addr: gossip_addr,
            seed_nodes: cfg
                .cluster
                .seeds
                .iter()
                .filter(|s| s.parse::<SocketAddr>().ok() != Some(gossip_addr))
                .cloned()
                .collect(),
            failure_detector_config: FailureDetectorConfig::new(
                g.phi_threshold,
                1000,
                Duration::from_millis(g.max_interval_ms),
                Duration::from_millis(g.initial_interval_ms),
                Duration::from_secs(g.dead_grace_s),
            ),
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: Some(Box::new(|state: &NodeState| {
                state.get(KEY_STATUS) != Some("leaving")
            })),
            protocol_version: ProtocolVersion::V0,
        };
        let kvs = vec![
            (KEY_URL.to_string(), me.url.clone()),
            (KEY_HTTP.to_string(), me.http.clone()),
            (KEY_QUIC.to_string(), me.quic.to_string()),
            (KEY_PROTO.to_string(), crate::wire::VERSION.to_string()),
            (KEY_STATUS.to_string(), "serving".to_string()),
        ];
        let transport = AuthTransport::new(&cfg.cluster.secret, &cfg.cluster.id, metrics);
        let handle = spawn_chitchat(chitchat_cfg, kvs, &transport).await?;
        // Kicks gossiped by any member (the callback runs under chitchat's lock: it only
        // records; the node's kick task acts on what is new).
        handle
            .chitchat()
            .lock()
            .await
            .subscribe_event(crate::kicks::KEY_PREFIX, move |event| {
                let Ok(at) = event.value.parse::<u64>() else {
                    return;
                };
                if crate::uid::validate_uid(event.key).is_err() {
                    return;
                }
                if let Err(e) = kicks.record(event.key, at, crate::clock::unix_now()) {
                    tracing::warn!(uid = %event.key, error = %e, "gossiped kick not remembered");
                }
            })
            .forever();
        let mut live = handle.chitchat().lock().await.live_nodes_watcher();
        let vnodes = cfg.cluster.vnodes;
        // This node is a member from the first instant (chitchat's live set may only list it
        // after its first round), and stops being one as soon as it announces leaving.
        let me_member = Member {
            id: Arc::from(me.id.as_str()),
            url: Arc::from(me.url.as_str()),
            http: me.http.clone(),
            quic: me.quic,
            gossip: gossip_addr,
            generation,
        };
        let leaving = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refresh = Arc::new(tokio::sync::Notify::new());
        let with_self = {
            let me_member = me_member.clone();
            let leaving = leaving.clone();
            move |mut members: BTreeMap<NodeId, Member>| {
                if leaving.load(std::sync::atomic::Ordering::SeqCst) {
                    members.remove(&me_member.id);
                } else {
                    members.insert(me_member.id.clone(), me_member.clone());
                }
                members
            }
        };
        let first = with_self(members_of(&live.borrow_and_update()));
        let ring = Ring::new(first.keys().cloned(), vnodes, 1);
        let (tx, view) = watch::channel(Arc::new(View {
            members: first,
            ring,
        }));
        let stop = CancellationToken::new();
        let stop_watch = stop.clone();
        let refresh_watch = refresh.clone();
        tokio::spawn(async move {
            let mut version = 1;
            loop {
                tokio::select! {
                    _ = stop_watch.cancelled() => break,
                    _ = refresh_watch.notified() => {}
                    changed = live.changed() => if changed.is_err() { break },
                }
                let members = with_self(members_of(&live.borrow_and_update()));
                let current = tx.borrow().clone();
                if members == current.members {
                    continue;
                }
                let same_set = members.keys().eq(current.members.keys());
                let ring = if same_set {
                    current.ring.clone()
                } else {
                    version += 1;
                    Ring::new(members.keys().cloned(), vnodes, version)
                };
                tracing::info!(
                    members = ?members.keys().map(|k| &**k).collect::<Vec<_>>(),
                    ring_version = ring.version(),
                    "membership changed"
                );
                if tx.send(Arc::new(View { members, ring })).is_err() {
                    break;
                }
            }
        });
        // The gossip task must outlive the node: if it ends (or panics) before `shutdown`,
        // the view is frozen, and the node must say so instead of serving it.
        let (failure_tx, failure) = watch::channel(None);
        let ended = handle.termination_watcher();
        let stop_failure = stop.clone();
        tokio::spawn(async move {
            let why = tokio::select! {
                _ = stop_failure.cancelled() => return,
                r = ended => match r {
                    Ok(()) => "the gossip task ended".to_string(),
                    Err(e) => format!("the gossip task failed: {e:#}"),
                },
            };
            if !stop_failure.is_cancelled() {
                let _ = failure_tx.send(Some(why));
            }
        });
        Ok(Membership {
            handle: Some(handle),
            leaving,
            refresh,
            view,
            gossip_addr,
            stop,
            failure,
        })
    }

    /// The handle through which kicks are gossiped.
    pub fn kick_gossip(&self) -> Option<KickGossip> {
        self.handle.as_ref().map(|h| KickGossip(h.chitchat()))
    }

    /// Resolves with the reason if gossip stops while the node is not shutting down.
    pub fn failed(&self) -> impl std::future::Future<Output = String> + Send + use<> {
        crate::first_failure(self.failure.clone())
    }

    /// Test hook: stops the gossip task as if it had died, without shutting the node down.
    #[doc(hidden)]
    pub fn stop_gossip_task_for_test(&self) {
        if let Some(h) = &self.handle {
            let _ = h.initiate_shutdown();
        }
    }

    /// The current view and its updates.
    pub fn view(&self) -> watch::Receiver<Arc<View>> {
        self.view.clone()
    }

    /// The bound gossip address.
    pub fn gossip_addr(&self) -> SocketAddr {
        self.gossip_addr
    }

    /// Drops this node from its own view: from now on it owns nobody.
    pub fn step_down(&self) {
        self.leaving
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.refresh.notify_one();
    }

    /// Announces `status = leaving`: peers drop this node from their live sets.
    pub async fn announce_leaving(&self) {
        if let Some(h) = &self.handle {
            h.with_chitchat(|c| c.self_node_state().set(KEY_STATUS, "leaving"))
                .await;
        }
    }

    /// Stops gossiping (peers then detect this node as dead).
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(h) = self.handle.take() {
            let _ = h.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gossiped_members_are_checked() {
        let ok = |id, url, http| check_member(id, url, http);
        assert_eq!(ok("n1", "ws://127.0.0.1:9501/ws", "127.0.0.1:9501"), Ok(()));
        assert_eq!(
            ok("n1", "wss://chat.example.com:443/ws", "[::1]:80"),
            Ok(())
        );
        // At the bounds: a 64-byte node id; a 255-byte host (so a URL stays short).
        let (id64, host) = ("n".repeat(64), "h".repeat(255));
        let (url255, url256) = (format!("ws://{host}:1/ws"), format!("ws://{host}h:1/ws"));
        assert_eq!(check_member(&id64, "ws://h:1/ws", "h:1"), Ok(()));
        assert_eq!(check_member("n1", &url255, "h:1"), Ok(()));
        assert_eq!(check_member("n1", &url256, "h:1"), Err("url"));
        // Behind a proxy: no port, a path of the proxy's own.
        assert_eq!(ok("n1", "wss://n1.chat.example.com/ws", "h:1"), Ok(()));
        assert_eq!(ok("n1", "wss://chat.example.com/n1/ws", "h:1"), Ok(()));
        for (id, url, http, bad) in [
            ("", "ws://h:1/ws", "h:1", "node id"),
            (&*"n".repeat(65), "ws://h:1/ws", "h:1", "node id"),
            ("n\u{7}", "ws://h:1/ws", "h:1", "node id"),
            ("n1", "http://h:1/ws", "h:1", "url"),
            ("n1", "ws://h:1", "h:1", "url"),
            ("n1", "ws://:1/ws", "h:1", "url"),
            ("n1", "ws://evil.example@h:1/ws", "h:1", "url"),
            ("n1", "ws://h:1/x?/ws", "h:1", "url"),
            ("n1", "ws://h:1/ws", "h", "http"),
            ("n1", "ws://h:1/ws", "h:99999", "http"),
            ("n1", "ws://h:1/ws", "h h:1", "http"),
        ] {
            assert_eq!(ok(id, url, http), Err(bad), "{id:?} {url:?} {http:?}");
        }
    }
}
