//! Deployment features on in-process nodes: TLS for clients (HTTPS, WSS, reload, bad
//! certificates), a node configured from flags and variables, and `GET /ready`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::WAIT;
use imgate::client::{Client, ClientConfig, SendOutcome};
use imgate::config::{Config, ConfigError, NodeOverrides};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A private CA and what it signs.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("CA cert");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for 127.0.0.1 and `localhost`, valid from `from` to `to` (unix seconds), as
    /// (certificate PEM, key PEM).
    fn leaf(&self, from: i64, to: i64) -> (String, String) {
        let key = KeyPair::generate().expect("leaf key");
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params.not_before = time::OffsetDateTime::from_unix_timestamp(from).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(to).unwrap();
        let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
        (cert.pem(), key.serialize_pem())
    }
}

fn now() -> i64 {
    common::now_s() as i64
}

/// Writes a certificate and key into `dir`; returns their paths.
fn write_pair(dir: &Path, name: &str, pair: &(String, String)) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, &pair.0).unwrap();
    std::fs::write(&key, &pair.1).unwrap();
    (cert, key)
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("imgate-deploy-{tag}-{}", rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_suffix() -> String {
    format!("{}-{:x}", std::process::id(), rand::random::<u32>())
}

fn tls_config(cert: &Path, key: &Path) -> Config {
    let mut cfg = common::fast_config();
    cfg.tls.cert_path = Some(cert.to_path_buf());
    cfg.tls.key_path = Some(key.to_path_buf());
    cfg
}

/// A TLS client trusting `ca_pems` (any of them).
fn tls_client(ca_pems: &[&str]) -> Arc<rustls::ClientConfig> {
    Arc::new(imgate::client::tls_config(Some(&ca_pems.concat())).expect("client TLS"))
}

/// Completes a TLS handshake with `addr` and returns the leaf the server showed.
async fn served_leaf(addr: SocketAddr, ca_pems: &[&str]) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(tls_client(ca_pems))
        .connect(name, tcp)
        .await
        .expect("handshake");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn https(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .use_preconfigured_tls((*tls_client(&[ca_pem])).clone())
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_node_with_a_certificate_serves_https_and_wss_end_to_end() {
    let dir = temp_dir("e2e");
    let ca = Ca::new("test CA");
    let (cert, key) = write_pair(&dir, "n1", &ca.leaf(now() - 60, now() + 3600));
    let node = common::start(tls_config(&cert, &key)).await;
    assert!(node.http_url().starts_with("https://127.0.0.1:"));
    assert!(
        node.ws_url().starts_with("wss://127.0.0.1:"),
        "{}",
        node.ws_url()
    );
    // Login over HTTPS names a wss:// URL.
    let resp = https(&ca.pem)
        .post(format!("{}/login", node.http_url()))
        .json(&json!({"uid": "alice"}))
        .send()
        .await
        .unwrap();
    let (status, _, v) = common::json_response(resp).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["url"], node.ws_url(), "{v}");
    // The SDK, trusting the private CA, delivers end to end over WSS.
    let mut cfg = ClientConfig::new(vec![node.http_url()], "alice");
    cfg.ca_pem = Some(ca.pem.clone());
    let (alice, _in_a, _ev_a) = Client::start(cfg);
    let mut cfg = ClientConfig::new(vec![node.http_url()], "bob");
    cfg.ca_pem = Some(ca.pem.clone());
    let (_bob, mut in_b, _ev_b) = Client::start(cfg);
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            // Bob may not be connected yet: `offline` then, and we try again.
            match alice.send("bob", json!("hi")).unwrap().await {
                Ok(SendOutcome::Delivered) => return,
                Ok(SendOutcome::Failed(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("{e:?}"),
            }
        }
    })
    .await;
    assert!(outcome.is_ok(), "no delivery over WSS within 10 s");
    let m = tokio::time::timeout(WAIT, in_b.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.body, json!("hi"));
    // A client that does not trust the CA gets no answer at all.
    let untrusting = https(&Ca::new("another CA").pem);
    assert!(
        untrusting
            .get(format!("{}/health", node.http_url()))
            .send()
            .await
            .is_err()
    );
    node.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn plain_http_to_a_tls_port_is_closed_cleanly() {
    let dir = temp_dir("plain");
    let ca = Ca::new("test CA");
    let (cert, key) = write_pair(&dir, "n1", &ca.leaf(now() - 60, now() + 3600));
    let node = common::start(tls_config(&cert, &key)).await;
    let mut tcp = tokio::net::TcpStream::connect(node.http_addr())
        .await
        .unwrap();
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, tcp.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the node kept a plain-HTTP connection open");
    assert!(
        !String::from_utf8_lossy(&buf).contains("\"status\""),
        "a plain request was served: {buf:?}"
    );
    // The node still serves TLS clients.
    let resp = https(&ca.pem)
        .get(format!("{}/health", node.http_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    node.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn reloading_the_certificate_serves_the_new_one_and_keeps_sessions() {
    let dir = temp_dir("reload");
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let (cert, key) = write_pair(&dir, "n1", &old_ca.leaf(now() - 60, now() + 3600));
    let node = common::start(tls_config(&cert, &key)).await;
    let cas = [old_ca.pem.as_str(), new_ca.pem.as_str()];
    let before = served_leaf(node.http_addr(), &cas).await;
    // A live session over the old certificate.
    let mut cfg = ClientConfig::new(vec![node.http_url()], "alice");
    cfg.ca_pem = Some(cas.concat());
    let (alice, _in_a, mut events) = Client::start(cfg);
    let connected = tokio::time::timeout(Duration::from_secs(5), events.recv()).await;
    assert!(
        matches!(connected, Ok(Some(imgate::client::Event::Connected { .. }))),
        "{connected:?}"
    );
    // New files, then the reload (what SIGHUP does in the binary).
    write_pair(&dir, "n1", &new_ca.leaf(now() - 60, now() + 3600));
    node.reload_tls().expect("reload");
    let after = served_leaf(node.http_addr(), &cas).await;
    assert_ne!(before, after, "the old certificate is still served");
    assert!(served_leaf(node.http_addr(), &[&new_ca.pem]).await == after);
    // The session opened before the reload goes on.
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        alice.send("alice", json!(1)).unwrap(),
    )
    .await;
    assert!(matches!(r, Ok(Ok(SendOutcome::Delivered))), "{r:?}");
    assert!(events.try_recv().is_err(), "the session was disturbed");
    // A reload from broken files keeps the current certificate.
    std::fs::write(&key, "not a key").unwrap();
    let err = node.reload_tls().expect_err("a broken key must not load");
    assert!(err.to_string().contains("tls.key_path"), "{err}");
    assert_eq!(served_leaf(node.http_addr(), &cas).await, after);
    node.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts node n1 of `cfg` and returns the error text.
async fn start_error(cfg: Config) -> String {
    match imgate::node::start(cfg, "n1").await {
        Ok(node) => {
            node.shutdown().await;
            panic!("the node started")
        }
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn unusable_certificates_stop_the_node_with_the_setting_named() {
    let dir = temp_dir("bad");
    let ca = Ca::new("test CA");
    let (cert, key) = write_pair(&dir, "good", &ca.leaf(now() - 60, now() + 3600));
    let (_, other_key) = write_pair(&dir, "other", &ca.leaf(now() - 60, now() + 3600));
    let (expired, expired_key) = write_pair(&dir, "old", &ca.leaf(now() - 7200, now() - 3600));
    let missing = dir.join("missing.crt");
    for (cfg, want) in [
        (
            tls_config(&missing, &key),
            vec!["tls.cert_path", "cannot read"],
        ),
        (
            tls_config(&cert, &other_key),
            vec!["tls.key_path", "does not match"],
        ),
        (
            tls_config(&expired, &expired_key),
            vec!["tls.cert_path", "expired"],
        ),
        (
            tls_config(&key, &key),
            vec!["tls.cert_path", "no CERTIFICATE"],
        ),
        (
            tls_config(&cert, &cert),
            vec!["tls.key_path", "no private key"],
        ),
    ] {
        let err = start_error(cfg).await;
        for w in want {
            assert!(err.contains(w), "{err:?} should name {w:?}");
        }
    }
    // A node's own pair is named as such.
    let mut cfg = common::fast_config();
    cfg.nodes[0].cert_path = Some(missing.clone());
    cfg.nodes[0].key_path = Some(key.clone());
    let err = start_error(cfg).await;
    assert!(err.contains("nodes[0].cert_path"), "{err}");
    // Half a pair, and a public URL that is not ws(s)://.
    let mut cfg = common::fast_config();
    cfg.tls.cert_path = Some(cert.clone());
    assert!(start_error(cfg).await.contains("tls.cert_path"));
    let mut cfg = common::fast_config();
    cfg.nodes[0].public_url = Some("https://n1.example.com/ws".into());
    assert!(start_error(cfg).await.contains("nodes[0].public_url"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_public_url_is_what_clients_are_given() {
    let mut cfg = common::fast_config();
    cfg.nodes[0].public_url = Some("wss://n1.chat.example.com/ws".into());
    let node = common::start(cfg).await;
    let (status, v) = common::login_json(&node, &json!({"uid": "alice"})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["url"], "wss://n1.chat.example.com/ws");
    node.shutdown().await;
}

#[test]
fn a_node_from_flags_alone_or_over_a_file() {
    // No file: every address must come from flags, and the error names the missing ones.
    let bare = NodeOverrides {
        id: "n4".into(),
        http: Some("127.0.0.1:0".parse().unwrap()),
        ..NodeOverrides::default()
    };
    let err = Config::load_for_node(None, &bare).unwrap_err().to_string();
    assert!(
        err.contains("--gossip (IMGATE_GOSSIP)") && err.contains("--quic (IMGATE_QUIC)"),
        "{err}"
    );
    assert!(!err.contains("--http"), "{err}");
    let full = NodeOverrides {
        gossip: Some("127.0.0.1:0".parse().unwrap()),
        quic: Some("127.0.0.1:0".parse().unwrap()),
        seeds: Some("a.imgate:7001, b.imgate:7001".into()),
        cluster_id: Some("prod".into()),
        public_url: Some("wss://n4.example.com/ws".into()),
        ..bare
    };
    let cfg = Config::load_for_node(None, &full).unwrap();
    assert_eq!(cfg.nodes.len(), 1);
    assert_eq!(cfg.nodes[0].id, "n4");
    assert_eq!(cfg.cluster.seeds, ["a.imgate:7001", "b.imgate:7001"]);
    assert_eq!(cfg.cluster.id, "prod");
    // Over a file: the flags win for the node's own entry, the rest of the file stays.
    let dir = temp_dir("flags");
    let file = dir.join("cluster.toml");
    std::fs::write(
        &file,
        "[cluster]\nid = \"from-file\"\n[[nodes]]\nid = \"n1\"\nhttp = \"127.0.0.1:9501\"\n\
         gossip = \"127.0.0.1:7001\"\nquic = \"127.0.0.1:7101\"\n",
    )
    .unwrap();
    let over = NodeOverrides {
        id: "n1".into(),
        http: Some("127.0.0.1:19999".parse().unwrap()),
        ..NodeOverrides::default()
    };
    let cfg = Config::load_for_node(Some(&file), &over).unwrap();
    assert_eq!(cfg.cluster.id, "from-file");
    assert_eq!(
        cfg.nodes[0].http,
        "127.0.0.1:19999".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        cfg.nodes[0].gossip,
        "127.0.0.1:7001".parse::<SocketAddr>().unwrap()
    );
    // Conflicts are named: half a TLS pair, a bad public URL.
    let half = NodeOverrides {
        tls_cert: Some(dir.join("x.crt")),
        ..over.clone()
    };
    let err = Config::load_for_node(Some(&file), &half).unwrap_err();
    assert!(
        matches!(&err, ConfigError::Invalid { key, .. } if key == "tls.cert_path"),
        "{err}"
    );
    let bad_url = NodeOverrides {
        public_url: Some("http://n1/ws".into()),
        ..over
    };
    let err = Config::load_for_node(Some(&file), &bad_url).unwrap_err();
    assert!(err.to_string().contains("public_url"), "{err}");
    // A wildcard gossip or QUIC address would be announced to peers, who cannot dial it.
    let wildcard = NodeOverrides {
        id: "n1".into(),
        gossip: Some("0.0.0.0:7001".parse().unwrap()),
        ..NodeOverrides::default()
    };
    let err = Config::load_for_node(Some(&file), &wildcard).unwrap_err();
    assert!(
        err.to_string().contains("nodes[0].gossip") && err.to_string().contains("wildcard"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

async fn ready(node: &imgate::node::NodeHandle) -> (u16, Value) {
    let resp = common::http()
        .get(format!("{}/ready", node.http_url()))
        .send()
        .await
        .unwrap();
    let (status, _, v) = common::json_response(resp).await;
    (status, v)
}

#[tokio::test]
async fn ready_waits_for_a_settled_view_and_says_why_not() {
    // Alone, without seeds: ready once its view has settled.
    let node = common::start(common::fast_config()).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, v) = ready(&node).await;
        if status == 200 {
            assert_eq!(v["ready"], true, "{v}");
            break;
        }
        assert_eq!((status, &v["error"]), (503, &json!("not_ready")), "{v}");
        assert!(tokio::time::Instant::now() < deadline, "never ready: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // With a seed that never answers, it is not ready during the join grace.
    let mut cfg = common::fast_config();
    cfg.cluster.seeds = vec!["127.0.0.1:9".into()];
    let lonely = common::start(cfg).await;
    let (status, v) = ready(&lonely).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["message"], "no other member seen yet", "{v}");
    // Stopping nodes are not ready.
    let shared = node.shared().clone();
    shared.shutdown.cancel();
    assert!(matches!(
        shared.readiness(),
        Err(imgate::state::NotReady::Stopping)
    ));
    node.shutdown().await;
    lonely.shutdown().await;
}
