//! Authenticated gossip against forged datagrams: a running in-process cluster is sent junk,
//! compression bombs, and real chitchat traffic from peers without the cluster secret (a fake
//! member, a 65 KB node id, a peer posing as n1 that rewrites its `url` and `status`). Nothing
//! of it may reach a view, and gossip must keep working.

mod cluster_support;

use std::net::SocketAddr;
use std::time::Duration;

use chitchat::transport::UdpTransport;
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ProtocolVersion,
};
use cluster_support::Cluster;
use imgate::gossip::{FORMAT, Sealer};

/// The peak resident set size of this process so far (`VmHWM`), in bytes: memory that was
/// inflated and freed again still shows here.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// A chitchat `Ack` whose delta is `blocks` zstd blocks that each inflate to 65 535 zero
/// bytes: 13 bytes each on the wire (the zstd frame is one RLE block), 64 KiB each inflated.
fn zstd_bomb(blocks: usize) -> Vec<u8> {
    let frame = [
        0x28, 0xB5, 0x2F, 0xFD, // zstd magic
        0x00, // frame header: no content size, no checksum
        0x30, // window 64 KiB
        0xFB, 0xFF, 0x07, // last block, RLE, 65 535 bytes
        0x00, // the byte to repeat
    ];
    let mut out = Vec::new();
    out.extend_from_slice(&45_139u16.to_le_bytes()); // chitchat magic
    out.push(0); // protocol version 0
    out.push(2); // Ack
    for _ in 0..blocks {
        out.push(1); // compressed block
        out.extend_from_slice(&(frame.len() as u16).to_le_bytes());
        out.extend_from_slice(&frame);
    }
    out.push(0); // no more blocks
    out
}

/// A plain chitchat node (no MAC) gossiping to `seed`.
async fn plain_chitchat(
    id: ChitchatId,
    cluster: &str,
    seed: SocketAddr,
    kvs: Vec<(String, String)>,
) -> ChitchatHandle {
    let cfg = ChitchatConfig {
        listen_addr: id.gossip_advertise_addr,
        chitchat_id: id,
        cluster_id: cluster.to_string(),
        gossip_interval: Duration::from_millis(50),
        seed_nodes: vec![seed.to_string()],
        failure_detector_config: FailureDetectorConfig::default(),
        marked_for_deletion_grace_period: Duration::from_secs(3600),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: ProtocolVersion::V0,
    };
    chitchat::spawn_chitchat(cfg, kvs, &UdpTransport)
        .await
        .expect("plain chitchat starts")
}

fn free_udp() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_gossip_changes_nothing_and_gossip_keeps_working() {
    let mut c = Cluster::start(3).await;
    c.wait_converged(3).await;
    let cluster_id = c.nodes[0].shared().cfg.cluster.id.clone();
    let secret = c.nodes[0].shared().cfg.cluster.secret.clone();
    let views_before: Vec<_> = c
        .nodes
        .iter()
        .map(|n| n.shared().current_view().members.clone())
        .collect();
    let rejected_before: Vec<u64> = c
        .nodes
        .iter()
        .map(|n| n.shared().metrics.gossip_rejected_total())
        .collect();
    let rss_before = peak_rss();
    let targets: Vec<SocketAddr> = c.nodes.iter().map(|n| n.gossip_addr()).collect();
    let probe = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut sent_per_node = 0u64;
    let mut send_all = async |bytes: &[u8]| {
        for t in &targets {
            probe.send_to(bytes, t).await.unwrap();
        }
        sent_per_node += 1;
    };

    // Junk: random bytes of many lengths, our format byte with a forged tag, a full datagram.
    for len in [0usize, 1, 8, 40, 41, 42, 100, 1200, 9000] {
        let junk: Vec<u8> = (0..len).map(|_| rand::random()).collect();
        send_all(&junk).await;
    }
    let mut forged = vec![FORMAT];
    forged.extend((0..200).map(|_| rand::random::<u8>()));
    send_all(&forged).await;
    send_all(&vec![FORMAT; 65_000]).await;
    // A compression bomb (3000 blocks: about 196 MB if inflated), bare and with a forged tag.
    let bomb = zstd_bomb(3000);
    send_all(&bomb).await;
    let mut wrong_key = Vec::new();
    Sealer::new("not-the-secret", &cluster_id).seal(now_ms(), &bomb, &mut wrong_key);
    send_all(&wrong_key).await;
    // Even sealed with the right key (only a holder of the secret can), the bomb inflates no
    // further than the patched chitchat's cap; and a datagram replayed is refused.
    let mut sealed = Vec::new();
    Sealer::new(&secret, &cluster_id).seal(now_ms(), &bomb, &mut sealed);
    send_all(&sealed).await;
    send_all(&sealed).await;

    // Real chitchat traffic without the secret: a fake member, a 65 KB node id, and a peer
    // posing as n1 with higher versions of `url` and `status`.
    let evil_kvs = |n: usize| {
        let mut kvs = vec![
            ("url".to_string(), "ws://evil.example/ws".to_string()),
            ("http".to_string(), "evil.example:80".to_string()),
            ("quic".to_string(), "127.0.0.1:9".to_string()),
            ("proto".to_string(), "1".to_string()),
            ("status".to_string(), "leaving".to_string()),
        ];
        kvs.extend((0..n).map(|i| (format!("pad{i}"), "x".to_string())));
        kvs
    };
    let fake = plain_chitchat(
        ChitchatId::new("zz-evil", 1, free_udp()),
        &cluster_id,
        targets[0],
        evil_kvs(0),
    )
    .await;
    let giant = plain_chitchat(
        ChitchatId::new("g".repeat(65_400), 1, free_udp()),
        &cluster_id,
        targets[1],
        Vec::new(),
    )
    .await;
    let n1 = &views_before[0]["n1"];
    let impostor = plain_chitchat(
        ChitchatId::new("n1", n1.generation, free_udp()),
        &cluster_id,
        targets[2],
        evil_kvs(2000),
    )
    .await;

    // Every node refused at least what was sent to it, and the plain peers' traffic too.
    cluster_support::wait_until(Duration::from_secs(10), || {
        c.nodes.iter().zip(&rejected_before).all(|(n, before)| {
            n.shared().metrics.gossip_rejected_total() >= before + sent_per_node + 3
        })
    })
    .await;
    let text = c.nodes[0].shared().metrics.encode();
    for reason in ["short", "format", "bad_mac", "replay", "undecodable"] {
        let line = format!("imgate_gossip_rejected_total{{reason=\"{reason}\"}}");
        let count: f64 = text
            .lines()
            .find(|l| l.starts_with(&line))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        assert!(count >= 1.0, "{reason}: {count}\n{text}");
    }
    // Gossip goes on among the real nodes: a new one joins every view.
    c.add_node().await;
    c.wait_converged(4).await;
    for n in &c.nodes {
        let view = n.shared().current_view();
        assert!(
            !view.members.contains_key("zz-evil"),
            "{:?}",
            view.members.keys()
        );
        assert_eq!(
            view.members.len(),
            4,
            "{}: {:?}",
            n.node_id(),
            view.members.keys()
        );
        for (id, before) in &views_before[0] {
            assert_eq!(&view.members[id], before, "{id} as {} sees it", n.node_id());
        }
    }
    // No node ever answered the plain chitchat peers: they know nobody but themselves.
    for h in [&fake, &giant, &impostor] {
        let known = h.chitchat().lock().await.live_nodes().count();
        assert_eq!(known, 1, "a plain chitchat peer learned of other nodes");
    }
    let grown = peak_rss().saturating_sub(rss_before);
    assert!(grown < 48 << 20, "peak memory grew by {grown} bytes");
    println!(
        "{sent_per_node} forged datagrams per node plus three plain chitchat peers refused; peak RSS +{} KiB",
        grown / 1024
    );
    for h in [fake, giant, impostor] {
        let _ = h.shutdown().await;
    }
    c.shutdown().await;
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A node whose gossip task dies says so (`/health` 503 `degraded`) and reports the failure,
/// so that its process exits; the other nodes drop it from their views.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_gossip_dies_is_degraded() {
    let c = Cluster::start(2).await;
    c.wait_converged(2).await;
    let n2 = &c.nodes[1];
    let health = cluster_support::api_get(&n2.http_url(), "/health").await;
    assert_eq!(health["status"], "ok");
    n2.membership().stop_gossip_task_for_test();
    let why = tokio::time::timeout(Duration::from_secs(5), n2.failed())
        .await
        .expect("the failure is reported within 5 s");
    assert!(why.contains("gossip"), "{why}");
    let resp = reqwest::get(format!("{}/health", n2.http_url()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["ready"], false);
    assert!(
        body["reason"].as_str().unwrap().contains("gossip"),
        "{body}"
    );
    // n1 stops hearing n2's heartbeats and drops it.
    let mut view = c.nodes[0].shared().view.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        view.wait_for(|v| !v.members.contains_key("n2")),
    )
    .await
    .expect("n1 drops n2")
    .unwrap();
    // n1 itself is healthy.
    let health = cluster_support::api_get(&c.nodes[0].http_url(), "/health").await;
    assert_eq!(health["status"], "ok");
    c.shutdown().await;
}
