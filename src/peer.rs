//! Node-to-node links over QUIC: one long-lived connection per pair of nodes.
//!
//! The node with the smaller id dials; the other accepts. Each side opens one long-lived
//! unidirectional stream for everything it sends (a [`wire::PREAMBLE`], a `Hello`, then frames
//! written in batches), and reads the other side's stream. One task per peer owns the link: it
//! dials (or waits for the accepted connection), writes what the driver queued, and on
//! loss marks the peer unreachable, drops what was queued, reports [`LinkEvent::Down`] (the
//! relay fails the forwards in flight) and reconnects with backoff. Reading happens in a second
//! task per link that reports each frame as [`LinkEvent::Frame`].
//!
//! Only nodes holding the cluster secret complete the mutual-TLS handshake ([`crate::tls`]), and
//! each certificate names its node: the dialer asks for the node it expects, the acceptor
//! checks the name against the hello. A live link is never replaced by a second connection for
//! the same peer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio::sync::{mpsc, watch};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::QuicConfig;
use crate::engine::NodeId;
use crate::metrics::Metrics;
use crate::relay::LinkEvent;
use crate::tls::{Credential, check_names_node, node_name};
use crate::view::View;
use crate::wire::{self, PeerFrame};

type FrameReader = FramedRead<RecvStream, LengthDelimitedCodec>;

/// Most frames written per batch before the stream is written to.
const WRITE_BATCH: usize = 256;

/// Time allowed for a dial and the hello exchange.
const HANDSHAKE: Duration = Duration::from_secs(3);

/// Errors setting up the QUIC endpoint.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The credential could not be built.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The endpoint could not be bound.
    #[error("cannot bind quic address {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The IO error.
        source: std::io::Error,
    },
    /// rustls config not usable for QUIC.
    #[error("quic crypto: {0}")]
    Crypto(String),
}

struct Peer {
    id: NodeId,
    tx: mpsc::Sender<PeerFrame>,
    addr: watch::Sender<Option<SocketAddr>>,
    incoming: mpsc::Sender<(Connection, FrameReader)>,
    /// No link is up (not yet, or not any more): routing skips this peer and nothing is
    /// queued for it. A peer counts as reachable only once a mutually authenticated link is
    /// up, so a member that cannot complete the handshake never owns anyone, not even for the
    /// moment between joining the view and failing its first dial.
    failed: AtomicBool,
    /// A connection is up now.
    up: AtomicBool,
    /// Bytes of the frames in `tx` (see [`queued_size`]), for `quic.peer_queue_bytes`.
    queued_bytes: AtomicUsize,
    stop: CancellationToken,
}

/// What a queued frame counts against `quic.peer_queue_bytes`: a message's body and ids; the
/// other frames are small and bounded by the frame count.
fn queued_size(frame: &PeerFrame) -> usize {
    match frame {
        PeerFrame::Deliver { msg, .. }
        | PeerFrame::DeliverTransient { msg, .. }
        | PeerFrame::DeliverRoom { msg, .. }
        | PeerFrame::RoomSend { msg, .. } => {
            msg.body.len() + msg.id.len() + msg.from.len() + msg.to.len()
        }
        PeerFrame::RoomDeliver { msg, uids, .. } => {
            msg.body.len()
                + msg.id.len()
                + msg.from.len()
                + msg.to.len()
                + uids.iter().map(|u| u.len()).sum::<usize>()
        }
        _ => 0,
    }
}

impl Peer {
    /// Takes a frame's bytes off the queue's count once it has left the queue.
    fn dequeued(&self, frame: &PeerFrame, metrics: &Metrics) {
        let n = queued_size(frame);
        if n > 0 {
            self.queued_bytes.fetch_sub(n, Ordering::Relaxed);
            metrics.peer_queue_bytes.dec_by(n as i64);
        }
    }
}

/// The links of one node to all others.
pub struct Links {
    me: NodeId,
    cluster: String,
    endpoint: Endpoint,
    client: quinn::ClientConfig,
    peers: RwLock<HashMap<NodeId, Arc<Peer>>>,
    events: mpsc::Sender<LinkEvent>,
    cfg: QuicConfig,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    tracker: TaskTracker,
    /// Set when the endpoint stops accepting while the node is not shutting down.
    failure: watch::Sender<Option<String>>,
}

impl std::fmt::Debug for Links {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Links")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

fn transport(cfg: &QuicConfig) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(cfg.keepalive_ms)));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_millis(cfg.idle_timeout_ms))
            .unwrap_or(quinn::IdleTimeout::from(quinn::VarInt::from_u32(10_000))),
    ));
    // Nodes of a cluster sit on one network: quinn's default first guess of the RTT (333 ms)
    // made a handshake whose first packets were lost (a link healing after a partition) wait
    // about a second per retransmission, within a 3 s dial. 50 ms resends them quickly; on a
    // slower path the only cost is a few early retransmissions before the RTT is measured.
    t.initial_rtt(Duration::from_millis(50));
    t.max_concurrent_bidi_streams(0u32.into());
    t.max_concurrent_uni_streams(4u32.into());
    Arc::new(t)
}

impl Links {
    /// Binds the QUIC endpoint on `bind` and starts accepting peers.
    ///
    /// # Errors
    /// [`PeerError`] if the credential or the socket cannot be set up.
    pub fn start(
        me: NodeId,
        cluster: String,
        bind: SocketAddr,
        secret: &str,
        cfg: QuicConfig,
        events: mpsc::Sender<LinkEvent>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Links>, PeerError> {
        let cred = Credential::for_node(secret, &me)?;
        Links::start_with(me, cluster, bind, &cred, cfg, events, metrics)
    }

    /// [`Links::start`] with a given credential (tests build ones that name another node).
    pub(crate) fn start_with(
        me: NodeId,
        cluster: String,
        bind: SocketAddr,
        cred: &Credential,
        cfg: QuicConfig,
        events: mpsc::Sender<LinkEvent>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Links>, PeerError> {
        let server_crypto = QuicServerConfig::try_from(cred.server_config()?)
            .map_err(|e| PeerError::Crypto(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport(&cfg));
        let client_crypto = QuicClientConfig::try_from(cred.client_config()?)
            .map_err(|e| PeerError::Crypto(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport(&cfg));
        let endpoint = Endpoint::server(server, bind)
            .map_err(|source| PeerError::Bind { addr: bind, source })?;
        let links = Arc::new(Links {
            me,
            cluster,
            endpoint,
            client,
            peers: RwLock::new(HashMap::new()),
            events,
            cfg,
            metrics,
            stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
            failure: watch::channel(None).0,
        });
        let accepting = links.tracker.spawn(accept_loop(links.clone()));
        let watcher = links.clone();
        links.tracker.spawn(async move {
            let ended = accepting.await;
            if !watcher.stop.is_cancelled() {
                let why = match ended {
                    Ok(()) => "the QUIC endpoint stopped accepting".to_string(),
                    Err(e) => format!("the QUIC accept task failed: {e}"),
                };
                watcher.failure.send_replace(Some(why));
            }
        });
        Ok(links)
    }

    /// Resolves with the reason if the QUIC endpoint stops while the node is not shutting
    /// down.
    pub fn failed(&self) -> impl std::future::Future<Output = String> + Send + use<> {
        crate::first_failure(self.failure.subscribe())
    }

    /// The bound QUIC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("bound endpoint has an address")
    }

    /// Follows a membership view: links to new members, drops links to members gone.
    pub fn update(self: &Arc<Self>, view: &View) {
        let mut peers = self.peers.write().expect("peers lock");
        for m in view.members.values() {
            if m.id == self.me {
                continue;
            }
            match peers.get(&m.id) {
                Some(p) => {
                    p.addr.send_if_modified(|a| {
                        let changed = *a != Some(m.quic);
                        *a = Some(m.quic);
                        changed
                    });
                }
                None => {
                    let p = self.spawn_peer(m.id.clone(), Some(m.quic));
                    peers.insert(m.id.clone(), p);
                }
            }
        }
        // A peer whose link is up stays even if gossip has not shown it yet (it dialled us
        // first, proving it holds the credential); a dead one loses its link by idle timeout.
        peers.retain(|id, p| {
            let keep = view.members.contains_key(id) || p.up.load(Ordering::Relaxed);
            if !keep {
                p.stop.cancel();
            }
            keep
        });
    }

    fn spawn_peer(self: &Arc<Self>, id: NodeId, addr: Option<SocketAddr>) -> Arc<Peer> {
        let (tx, rx) = mpsc::channel(self.cfg.peer_queue);
        let (incoming, incoming_rx) = mpsc::channel(2);
        let (addr_tx, addr_rx) = watch::channel(addr);
        let peer = Arc::new(Peer {
            id,
            tx,
            addr: addr_tx,
            incoming,
            failed: AtomicBool::new(true),
            up: AtomicBool::new(false),
            queued_bytes: AtomicUsize::new(0),
            stop: self.stop.child_token(),
        });
        self.tracker.spawn(run_peer(
            self.clone(),
            peer.clone(),
            rx,
            incoming_rx,
            addr_rx,
        ));
        peer
    }

    /// Queues `frame` for `node`.
    ///
    /// # Errors
    /// The frame back if there is no link to `node` or its queue is full (in frames,
    /// `quic.peer_queue`, or in bytes, `quic.peer_queue_bytes`).
    pub fn send(&self, node: &str, frame: PeerFrame) -> Result<(), PeerFrame> {
        let peers = self.peers.read().expect("peers lock");
        let Some(p) = peers.get(node) else {
            return Err(frame);
        };
        if p.failed.load(Ordering::Relaxed) {
            return Err(frame);
        }
        let n = queued_size(&frame);
        if n > 0 {
            let before = p.queued_bytes.fetch_add(n, Ordering::Relaxed);
            if before + n > self.cfg.peer_queue_bytes {
                p.queued_bytes.fetch_sub(n, Ordering::Relaxed);
                return Err(frame);
            }
            self.metrics.peer_queue_bytes.inc_by(n as i64);
        }
        p.tx.try_send(frame).map_err(|e| {
            let frame = e.into_inner();
            p.dequeued(&frame, &self.metrics);
            frame
        })
    }

    /// Whether `node` can be used as an owner from here: its link is up.
    pub fn reachable(&self, node: &str) -> bool {
        self.peers
            .read()
            .expect("peers lock")
            .get(node)
            .is_some_and(|p| !p.failed.load(Ordering::Relaxed))
    }

    /// Whether a link to `node` is up now.
    pub fn is_up(&self, node: &str) -> bool {
        self.peers
            .read()
            .expect("peers lock")
            .get(node)
            .is_some_and(|p| p.up.load(Ordering::Relaxed))
    }

    /// Number of peers with a link up now.
    pub fn links_up(&self) -> usize {
        self.peers
            .read()
            .expect("peers lock")
            .values()
            .filter(|p| p.up.load(Ordering::Relaxed))
            .count()
    }

    /// Closes every link explicitly (peers learn at once) and waits for the endpoint.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.endpoint.close(0u32.into(), b"node stopping");
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            self.tracker.wait().await;
            self.endpoint.wait_idle().await;
        })
        .await;
    }

    fn hello(&self) -> PeerFrame {
        PeerFrame::Hello {
            node: self.me.to_string(),
            cluster: self.cluster.clone(),
        }
    }

    /// Opens our sending stream on `conn` and writes the preamble and hello.
    async fn open_sender(&self, conn: &Connection) -> anyhow::Result<SendStream> {
        let mut send = conn.open_uni().await?;
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&wire::PREAMBLE);
        wire::encode(&self.hello(), &mut buf);
        send.write_all(&buf).await?;
        Ok(send)
    }

    /// Accepts the other side's stream and reads its preamble and hello; returns its node id.
    async fn accept_reader(&self, conn: &Connection) -> anyhow::Result<(String, FrameReader)> {
        let mut recv = conn.accept_uni().await?;
        let mut preamble = [0u8; 5];
        recv.read_exact(&mut preamble).await?;
        wire::check_preamble(&preamble)?;
        let codec = LengthDelimitedCodec::builder()
            .max_frame_length(wire::MAX_FRAME)
            .new_codec();
        let mut reader = FramedRead::new(recv, codec);
        let first = reader
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("stream ended before hello"))??;
        match wire::decode(first.freeze())? {
            PeerFrame::Hello { node, cluster } if cluster == self.cluster => Ok((node, reader)),
            PeerFrame::Hello { cluster, .. } => {
                anyhow::bail!("peer of another cluster `{cluster}`")
            }
            other => anyhow::bail!("expected hello, got {other:?}"),
        }
    }

    async fn dial(
        &self,
        addr: SocketAddr,
        expect: &str,
    ) -> anyhow::Result<(Connection, SendStream, FrameReader)> {
        let conn = self
            .endpoint
            .connect_with(self.client.clone(), addr, &node_name(expect))?
            .await?;
        let send = self.open_sender(&conn).await?;
        let (node, reader) = self.accept_reader(&conn).await?;
        if node != expect {
            conn.close(1u32.into(), b"unexpected node");
            anyhow::bail!("dialled {expect} at {addr} but {node} answered");
        }
        Ok((conn, send, reader))
    }
}

async fn accept_loop(links: Arc<Links>) {
    loop {
        let incoming = tokio::select! {
            _ = links.stop.cancelled() => return,
            i = links.endpoint.accept() => match i { Some(i) => i, None => return },
        };
        let links2 = links.clone();
        links.tracker.spawn(async move {
            let remote = incoming.remote_address();
            let result = tokio::time::timeout(HANDSHAKE, async {
                let conn = incoming.await?;
                let (node, reader) = links2.accept_reader(&conn).await?;
                // The hello's node id must be the one the certificate names.
                if let Err(why) = peer_certificate(&conn)
                    .ok_or_else(|| "no certificate".to_string())
                    .and_then(|cert| check_names_node(&cert, &node))
                {
                    conn.close(3u32.into(), b"identity mismatch");
                    anyhow::bail!("peer says it is `{node}`: {why}");
                }
                anyhow::Ok((conn, node, reader))
            })
            .await;
            match result {
                Ok(Ok((conn, node, reader))) => {
                    let node: NodeId = Arc::from(node.as_str());
                    let peer = {
                        let mut peers = links2.peers.write().expect("peers lock");
                        peers
                            .entry(node.clone())
                            .or_insert_with(|| links2.spawn_peer(node.clone(), None))
                            .clone()
                    };
                    if peer.incoming.send((conn, reader)).await.is_err() {
                        tracing::debug!(%node, "peer gone before its connection was adopted");
                    }
                }
                Ok(Err(e)) => tracing::warn!(%remote, error = %e, "refused a peer connection"),
                Err(_) => tracing::warn!(%remote, "peer handshake timed out"),
            }
        });
    }
}

/// The leaf certificate the peer presented on `conn`.
fn peer_certificate(conn: &Connection) -> Option<rustls::pki_types::CertificateDer<'static>> {
    conn.peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?
        .into_iter()
        .next()
}

async fn read_frames(links: Arc<Links>, node: NodeId, mut reader: FrameReader, conn: Connection) {
    while let Some(item) = reader.next().await {
        let bytes = match item {
            Ok(b) => b,
            Err(e) => {
                // The link ended (or a length prefix was over the limit); the writer side
                // sees the connection close and reconnects.
                tracing::debug!(%node, error = %e, "peer stream ended");
                conn.close(2u32.into(), b"stream ended");
                return;
            }
        };
        let frame = match wire::decode(bytes.freeze()) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(%node, error = %e, "bad frame from peer; closing the link");
                conn.close(2u32.into(), b"bad frame");
                return;
            }
        };
        let event = LinkEvent::Frame {
            from: node.clone(),
            frame,
        };
        if links.events.send(event).await.is_err() {
            return;
        }
    }
}

async fn run_peer(
    links: Arc<Links>,
    peer: Arc<Peer>,
    mut rx: mpsc::Receiver<PeerFrame>,
    incoming: mpsc::Receiver<(Connection, FrameReader)>,
    addr: watch::Receiver<Option<SocketAddr>>,
) {
    serve_peer(&links, &peer, &mut rx, incoming, addr).await;
    // Whatever is still queued is dropped with the peer: take it off the byte count.
    rx.close();
    while let Ok(f) = rx.try_recv() {
        peer.dequeued(&f, &links.metrics);
    }
}

async fn serve_peer(
    links: &Arc<Links>,
    peer: &Arc<Peer>,
    rx: &mut mpsc::Receiver<PeerFrame>,
    mut incoming: mpsc::Receiver<(Connection, FrameReader)>,
    mut addr: watch::Receiver<Option<SocketAddr>>,
) {
    let dialer = links.me < peer.id;
    let min_backoff = Duration::from_millis(25);
    let max_backoff = Duration::from_millis(links.cfg.max_backoff_ms);
    let mut backoff = min_backoff;
    let mut adopted: Option<(Connection, FrameReader)> = None;
    loop {
        // 1. Get a connection: dial, or wait for the peer to dial us.
        let setup = if let Some((conn, reader)) = adopted.take() {
            match links.open_sender(&conn).await {
                Ok(send) => Ok((conn, send, reader)),
                Err(e) => Err(e),
            }
        } else if dialer {
            let target = *addr.borrow_and_update();
            match target {
                Some(a) => tokio::select! {
                    _ = peer.stop.cancelled() => return,
                    r = tokio::time::timeout(HANDSHAKE, links.dial(a, &peer.id)) => {
                        r.unwrap_or_else(|_| Err(anyhow::anyhow!("dial timed out")))
                    }
                },
                None => Err(anyhow::anyhow!("address unknown")),
            }
        } else {
            tokio::select! {
                _ = peer.stop.cancelled() => return,
                c = incoming.recv() => match c {
                    Some(c) => { adopted = Some(c); continue; }
                    None => return,
                },
            }
        };
        let (conn, mut send, reader) = match setup {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(peer = %peer.id, error = %e, "link setup failed");
                link_down(links, peer, rx).await;
                let jitter = Duration::from_millis(rand::random::<u64>() % 25);
                tokio::select! {
                    _ = peer.stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff + jitter) => {}
                    _ = addr.changed() => {}
                    c = incoming.recv() => if let Some(c) = c { adopted = Some(c) },
                }
                backoff = (backoff * 2).min(max_backoff);
                continue;
            }
        };
        backoff = min_backoff;
        peer.failed.store(false, Ordering::Relaxed);
        peer.up.store(true, Ordering::Relaxed);
        links.metrics.quic_peers.inc();
        tracing::info!(peer = %peer.id, remote = %conn.remote_address(), "peer link up");
        let _ = links.events.send(LinkEvent::Up(peer.id.clone())).await;
        links.tracker.spawn(read_frames(
            links.clone(),
            peer.id.clone(),
            reader,
            conn.clone(),
        ));

        // 2. Write what is queued, in batches, until the link or the node goes.
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let ended = loop {
            tokio::select! {
                biased;
                _ = peer.stop.cancelled() => {
                    let _ = send.finish();
                    conn.close(0u32.into(), b"bye");
                    peer.up.store(false, Ordering::Relaxed);
                    links.metrics.quic_peers.dec();
                    link_down(links, peer, rx).await;
                    return;
                }
                reason = conn.closed() => break format!("closed: {reason}"),
                c = incoming.recv() => {
                    // A live link is never replaced: a second connection claiming this peer
                    // is refused. (A peer that restarted gets in once the old link has closed,
                    // at once after a graceful stop, within the idle timeout after a crash.)
                    if let Some((newer, _)) = c {
                        tracing::warn!(peer = %peer.id, remote = %newer.remote_address(), "refused a second connection for a peer whose link is up");
                        newer.close(4u32.into(), b"link already up");
                    }
                }
                frame = rx.recv() => {
                    let Some(frame) = frame else { return };
                    peer.dequeued(&frame, &links.metrics);
                    wire::encode(&frame, &mut buf);
                    for _ in 1..WRITE_BATCH {
                        match rx.try_recv() {
                            Ok(f) => {
                                peer.dequeued(&f, &links.metrics);
                                wire::encode(&f, &mut buf);
                            }
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = send.write_all(&buf).await {
                        break format!("write failed: {e}");
                    }
                    buf.clear();
                }
            }
        };
        peer.up.store(false, Ordering::Relaxed);
        links.metrics.quic_peers.dec();
        tracing::warn!(peer = %peer.id, reason = %ended, "peer link down");
        if adopted.is_none() {
            link_down(links, peer, rx).await;
        }
    }
}

/// Marks the peer unreachable, drops what was queued for it and tells the driver, which fails
/// the forwards in flight to it.
async fn link_down(links: &Links, peer: &Peer, rx: &mut mpsc::Receiver<PeerFrame>) {
    let was_failed = peer.failed.swap(true, Ordering::Relaxed);
    while let Ok(f) = rx.try_recv() {
        peer.dequeued(&f, &links.metrics);
    }
    if !was_failed {
        let _ = links.events.send(LinkEvent::Down(peer.id.clone())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::Ring;
    use crate::view::Member;
    use std::collections::BTreeMap;

    fn member(id: &str, quic: SocketAddr) -> (NodeId, Member) {
        let id: NodeId = Arc::from(id);
        let m = Member {
            id: id.clone(),
            url: Arc::from(format!("ws://{id}/ws")),
            http: format!("{id}:80"),
            quic,
            gossip: quic,
            generation: 1,
        };
        (id, m)
    }

    fn view(members: Vec<(NodeId, Member)>) -> View {
        let ring = Ring::new(members.iter().map(|(id, _)| id.clone()), 16, 1);
        View {
            members: members.into_iter().collect::<BTreeMap<_, _>>(),
            ring,
        }
    }

    fn links(id: &str, events: mpsc::Sender<LinkEvent>) -> Arc<Links> {
        links_named(id, id, events)
    }

    /// Links of node `id` whose certificate names node `named`.
    fn links_named(id: &str, named: &str, events: mpsc::Sender<LinkEvent>) -> Arc<Links> {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        Links::start_with(
            Arc::from(id),
            "test".into(),
            any,
            &Credential::for_node("secret", named).unwrap(),
            QuicConfig::default(),
            events,
            Arc::new(Metrics::new()),
        )
        .unwrap()
    }

    /// A peer with another cluster secret never completes the handshake, in either role.
    #[tokio::test]
    async fn a_peer_with_another_secret_never_links() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let (tx1, mut rx1) = mpsc::channel(64);
        let (tx2, mut rx2) = mpsc::channel(64);
        let n1 = links("n1", tx1);
        let other = Links::start(
            Arc::from("n2"),
            "test".into(),
            any,
            "another-secret",
            QuicConfig::default(),
            tx2,
            Arc::new(Metrics::new()),
        )
        .unwrap();
        introduce(&n1, &other);
        assert!(!peer_up(&mut rx1, "n2", Duration::from_millis(1500)).await);
        assert!(!peer_up(&mut rx2, "n1", Duration::from_millis(10)).await);
        assert!(!n1.reachable("n2") && !other.reachable("n1"));
        n1.shutdown().await;
        other.shutdown().await;
    }

    /// Gives `a` and `b` a view of the two of them.
    fn introduce(a: &Arc<Links>, b: &Arc<Links>) {
        let v = view(vec![
            member(&a.me, a.local_addr()),
            member(&b.me, b.local_addr()),
        ]);
        a.update(&v);
        b.update(&v);
    }

    /// Waits for `LinkEvent::Up` of `node` on `rx`, at most `limit`; false if none came.
    async fn peer_up(rx: &mut mpsc::Receiver<LinkEvent>, node: &str, limit: Duration) -> bool {
        tokio::time::timeout(limit, async {
            loop {
                match rx.recv().await {
                    Some(LinkEvent::Up(n)) if &*n == node => return,
                    Some(_) => {}
                    None => std::future::pending::<()>().await,
                }
            }
        })
        .await
        .is_ok()
    }

    /// The dialer asks for the node it expects: a peer whose certificate names another node
    /// fails the handshake, and never counts as reachable.
    #[tokio::test]
    async fn a_dialer_refuses_a_certificate_for_another_node() {
        let (tx1, mut rx1) = mpsc::channel(64);
        let (tx2, mut rx2) = mpsc::channel(64);
        let n1 = links("n1", tx1);
        let fake = links_named("n2", "n3", tx2); // says n2, certified as n3
        introduce(&n1, &fake);
        assert!(!peer_up(&mut rx1, "n2", Duration::from_millis(1500)).await);
        assert!(!peer_up(&mut rx2, "n1", Duration::from_millis(10)).await);
        assert!(!n1.reachable("n2") && !n1.is_up("n2"));
        n1.shutdown().await;
        fake.shutdown().await;
    }

    /// The acceptor checks the hello against the certificate: a dialer that says it is `n0`
    /// with a certificate for `n5` is refused.
    #[tokio::test]
    async fn an_acceptor_refuses_a_hello_its_certificate_does_not_name() {
        let (tx1, mut rx1) = mpsc::channel(64);
        let (tx0, _rx0) = mpsc::channel(64);
        let n1 = links("n1", tx1);
        let fake = links_named("n0", "n5", tx0);
        introduce(&n1, &fake); // "n0" < "n1": the fake dials
        assert!(!peer_up(&mut rx1, "n0", Duration::from_millis(1500)).await);
        assert!(!n1.reachable("n0") && !n1.is_up("n0"));
        // The same dial with a true certificate is accepted.
        let (tx0b, _rx0b) = mpsc::channel(64);
        let real = links("n0", tx0b);
        introduce(&n1, &real);
        assert!(peer_up(&mut rx1, "n0", Duration::from_secs(10)).await);
        for l in [n1, fake, real] {
            l.shutdown().await;
        }
    }

    /// A live link is never replaced by a second connection for the same node, even one with
    /// a certificate that names it (which a holder of the secret can make).
    #[tokio::test]
    async fn a_live_link_is_not_taken_over() {
        let (tx1, _rx1) = mpsc::channel(64);
        let (tx2, mut rx2) = mpsc::channel(64);
        let n1 = links("n1", tx1);
        let n2 = links("n2", tx2);
        introduce(&n1, &n2);
        assert!(peer_up(&mut rx2, "n1", Duration::from_secs(10)).await);
        // A second "n1" elsewhere dials n2.
        let (tx3, mut rx3) = mpsc::channel(64);
        let other = links("n1", tx3);
        other.update(&view(vec![
            member("n1", other.local_addr()),
            member("n2", n2.local_addr()),
        ]));
        assert!(!peer_up(&mut rx3, "n2", Duration::from_millis(1500)).await);
        let mut down = false;
        while let Ok(cmd) = rx2.try_recv() {
            down |= matches!(cmd, LinkEvent::Down(_) | LinkEvent::Up(_));
        }
        assert!(
            !down,
            "n2's link to the real n1 never went down or was replaced"
        );
        assert!(n1.is_up("n2") && n2.is_up("n1"));
        for l in [n1, n2, other] {
            l.shutdown().await;
        }
    }

    /// A member that joins the view but never completes the handshake (here: a UDP port that
    /// answers nothing, so the dial hangs until its timeout) is never reachable, not even in
    /// the moment between joining and failing its first dial.
    #[tokio::test]
    async fn a_new_peer_is_unreachable_until_its_link_is_up() {
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (tx, _rx) = mpsc::channel(16);
        let n1 = links("n1", tx);
        let v = view(vec![
            member("n1", n1.local_addr()),
            member("n2", silent.local_addr().unwrap()),
        ]);
        n1.update(&v);
        assert!(!n1.reachable("n2"), "reachable before any link is up");
        let query = PeerFrame::PresenceQuery {
            req: 1,
            uid: "u".into(),
        };
        assert!(n1.send("n2", query).is_err());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !n1.reachable("n2"),
            "reachable while the dial is still pending"
        );
        assert!(!n1.is_up("n2"));
        n1.shutdown().await;
    }

    /// With a real peer the link comes up, and the peer is reachable by the time the driver
    /// hears `LinkEvent::Up`.
    #[tokio::test]
    async fn a_peer_is_reachable_once_its_link_is_up() {
        let (tx1, mut rx1) = mpsc::channel(16);
        let (tx2, _rx2) = mpsc::channel(16);
        let n1 = links("n1", tx1);
        let n2 = links("n2", tx2);
        introduce(&n1, &n2);
        assert!(peer_up(&mut rx1, "n2", Duration::from_secs(10)).await);
        assert!(n1.reachable("n2") && n1.is_up("n2"));
        let query = PeerFrame::PresenceQuery {
            req: 1,
            uid: "u".into(),
        };
        assert!(n1.send("n2", query).is_ok());
        n1.shutdown().await;
        n2.shutdown().await;
    }

    /// A peer that does not keep up fills the queue towards it up to `quic.peer_queue_bytes`
    /// (not to the frame bound), then forwards are refused; the bytes are given back as the
    /// queue drains.
    #[tokio::test]
    async fn the_queue_to_a_slow_peer_is_bounded_in_bytes() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let budget = 256 * 1024;
        let start = |id: &str, engine| {
            let cfg = QuicConfig {
                peer_queue_bytes: budget,
                ..QuicConfig::default()
            };
            let metrics = Arc::new(Metrics::new());
            let links = Links::start_with(
                Arc::from(id),
                "test".into(),
                any,
                &Credential::for_node("secret", id).unwrap(),
                cfg,
                engine,
                metrics.clone(),
            )
            .unwrap();
            (links, metrics)
        };
        let (tx1, mut rx1) = mpsc::channel(16);
        // n2's driver is this test, which reads nothing for now: n2 stops reading its stream
        // once its inbox is full, and QUIC flow control holds n1's writer.
        let (tx2, mut rx2) = mpsc::channel(4);
        let (n1, metrics1) = start("n1", tx1);
        let (n2, _) = start("n2", tx2);
        introduce(&n1, &n2);
        assert!(peer_up(&mut rx1, "n2", Duration::from_secs(10)).await);
        let body = format!("\"{}\"", "x".repeat(32 * 1024));
        let deliver = |tag| PeerFrame::Deliver {
            tag,
            hops: 0,
            msg: wire::WireMessage {
                from: "alice".into(),
                id: format!("m{tag}").into(),
                to: "bob".into(),
                body: body.as_str().into(),
                ts: 1,
            },
        };
        let mut accepted = 0u64;
        let mut refused = false;
        for tag in 0..2000 {
            if n1.send("n2", deliver(tag)).is_ok() {
                accepted += 1;
                let queued = metrics1.peer_queue_bytes.get();
                assert!(queued as usize <= budget, "{queued} bytes queued");
            } else {
                refused = true;
                break;
            }
            // Let the writer take what flow control allows.
            tokio::task::yield_now().await;
        }
        assert!(refused, "all {accepted} forwards were queued");
        assert!(accepted < 2000);
        assert!(n1.reachable("n2"), "a full queue is not a link failure");
        // n2 catches up: the queue drains and its bytes are given back.
        let drained = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                tokio::select! {
                    _ = rx2.recv() => {}
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {
                        if metrics1.peer_queue_bytes.get() == 0 {
                            return;
                        }
                    }
                }
            }
        })
        .await;
        assert!(
            drained.is_ok(),
            "{} bytes still queued",
            metrics1.peer_queue_bytes.get()
        );
        assert!(n1.send("n2", deliver(9999)).is_ok());
        n1.shutdown().await;
        n2.shutdown().await;
    }
}
