//! Helpers for in-process cluster tests: nodes on port 0, a small WebSocket client.
#![allow(dead_code)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use imgate::config::Config;
use imgate::node::NodeHandle;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single expectation may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// Polls `cond` every 10 ms until it holds; panics after `limit`.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The first uid `{prefix}{i}` that `pred` accepts.
pub fn first_uid(prefix: &str, pred: impl Fn(&str) -> bool) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|u| pred(u))
        .unwrap()
}

/// `recipient` gets message `id`, acks it, and `sender` is told `delivered`.
pub async fn expect_delivery(sender: &mut Client, recipient: &mut Client, id: &str) {
    let m = recipient.expect("msg").await;
    assert_eq!(m["id"], id, "{m}");
    recipient.ack(m["seq"].as_u64().unwrap()).await;
    assert_eq!(sender.expect("delivered").await["id"], id);
}

pub struct Cluster {
    pub nodes: Vec<NodeHandle>,
    cfg: Config,
    next: usize,
}

impl Cluster {
    pub async fn start(n: usize) -> Cluster {
        Cluster::start_with(n, |_| {}).await
    }

    /// Starts `n` nodes; `tweak` edits the shared configuration first.
    pub async fn start_with(n: usize, tweak: impl FnOnce(&mut Config)) -> Cluster {
        let mut cfg = Config::for_test_nodes(8);
        tweak(&mut cfg);
        let mut c = Cluster {
            nodes: Vec::new(),
            cfg,
            next: 1,
        };
        for _ in 0..n {
            c.add_node().await;
        }
        c
    }

    /// Starts the next node `n{k}`, seeded with the first node's gossip address.
    pub async fn add_node(&mut self) -> &NodeHandle {
        let mut cfg = self.cfg.clone();
        if let Some(first) = self.nodes.first() {
            cfg.cluster.seeds = vec![first.gossip_addr().to_string()];
        }
        let id = format!("n{}", self.next);
        self.next += 1;
        let node = imgate::node::start(cfg, &id).await.expect("node starts");
        self.nodes.push(node);
        self.nodes.last().unwrap()
    }

    /// Waits until every node sees exactly `n` members and has a link up to each other one.
    pub async fn wait_converged(&self, n: usize) {
        self.wait_members(n).await;
        self.wait_links(n - 1).await;
    }

    /// Waits until every node sees exactly `n` members.
    pub async fn wait_members(&self, n: usize) {
        for node in &self.nodes {
            let mut view = node.shared().view.clone();
            tokio::time::timeout(WAIT, view.wait_for(|v| v.members.len() == n))
                .await
                .unwrap_or_else(|_| panic!("{} did not see {n} members", node.node_id()))
                .unwrap();
        }
    }

    /// Waits until every node has `n` peer links up and counts every member reachable.
    pub async fn wait_links(&self, n: usize) {
        for node in &self.nodes {
            let s = node.shared();
            wait_until(WAIT, || {
                let view = s.current_view();
                s.links.links_up() == n && s.reachable_members(&view) == view.members.len()
            })
            .await;
        }
    }

    /// Two uids owned by different nodes (as node 0 sees it).
    pub fn uids_on_different_nodes(&self) -> (String, String) {
        let s = self.nodes[0].shared();
        let a = "alice".to_string();
        let owner_a = s.owner_of(&a).unwrap().node;
        let b = (0..)
            .map(|i| format!("bob{i}"))
            .find(|u| s.owner_of(u).unwrap().node != owner_a)
            .unwrap();
        (a, b)
    }

    /// A counter from node `i`'s registry.
    pub async fn metric(&self, i: usize, name: &str) -> u64 {
        let text = self.nodes[i].shared().metrics.encode();
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
            .unwrap_or(0)
    }

    pub async fn shutdown(self) {
        for n in self.nodes {
            n.shutdown().await;
        }
    }
}

pub async fn login(http: &str, uid: &str) -> Value {
    let resp = reqwest::Client::new()
        .post(format!("{http}/login"))
        .json(&json!({"uid": uid}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

pub async fn api_get(http: &str, path: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{http}{path}"))
        .bearer_auth("dev-api-key")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

pub async fn api_post(http: &str, path: &str, body: Value) -> Value {
    reqwest::Client::new()
        .post(format!("{http}{path}"))
        .bearer_auth("dev-api-key")
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Connects with `token` and expects one frame then a close; returns both.
pub async fn connect_expect_close(url: &str, token: &str) -> (Value, Option<u16>) {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}?token={token}"))
        .await
        .unwrap();
    let mut first = Value::Null;
    let mut code = None;
    let _ = tokio::time::timeout(WAIT, async {
        while let Some(Ok(m)) = ws.next().await {
            match m {
                Message::Text(t) if first.is_null() => first = serde_json::from_str(&t).unwrap(),
                Message::Close(f) => {
                    code = f.map(|f| u16::from(f.code));
                    break;
                }
                _ => {}
            }
        }
    })
    .await;
    (first, code)
}

/// A logged-in, connected user.
pub struct Client {
    pub uid: String,
    pub node: String,
    pub token: String,
    /// The `welcome` frame.
    pub welcome: Value,
    ws: Ws,
}

impl Client {
    /// Logs in at `http` and connects to the owner it names; expects `welcome`.
    pub async fn login(http: &str, uid: &str) -> Client {
        let l = login(http, uid).await;
        let mut c = Client::connect(l["url"].as_str().unwrap(), l["token"].as_str().unwrap()).await;
        assert_eq!(c.node, l["node"].as_str().unwrap());
        c.uid = uid.to_string();
        c
    }

    /// Connects with a token; expects `welcome`.
    pub async fn connect(url: &str, token: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(format!("{url}?token={token}"))
            .await
            .unwrap();
        let mut c = Client {
            uid: String::new(),
            node: String::new(),
            token: token.to_string(),
            welcome: Value::Null,
            ws,
        };
        let w = c.expect("welcome").await;
        c.welcome = w.clone();
        c.uid = w["uid"].as_str().unwrap().to_string();
        c.node = w["node"].as_str().unwrap().to_string();
        c
    }

    pub async fn send(&mut self, id: &str, to: &str, body: Value) {
        let f = json!({"type": "send", "id": id, "to": to, "body": body});
        self.ws
            .send(Message::Text(f.to_string().into()))
            .await
            .unwrap();
    }

    /// Sends any frame.
    pub async fn send_frame(&mut self, f: Value) {
        self.ws
            .send(Message::Text(f.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn ack(&mut self, seq: u64) {
        let f = json!({"type": "ack", "seq": seq});
        self.ws
            .send(Message::Text(f.to_string().into()))
            .await
            .unwrap();
    }

    /// The next text frame; panics on close or after [`WAIT`].
    pub async fn next(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{}: no frame within {WAIT:?}", self.uid))
                .unwrap_or_else(|| panic!("{}: socket ended", self.uid))
                .unwrap();
            match m {
                Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                Message::Close(f) => panic!("{}: closed: {f:?}", self.uid),
                _ => {}
            }
        }
    }

    /// The next text frame, which must be of `ty`.
    pub async fn expect(&mut self, ty: &str) -> Value {
        let f = self.next().await;
        assert_eq!(f["type"], ty, "{}: expected {ty}, got {f}", self.uid);
        f
    }

    /// Asserts that no text frame arrives for `d` and the session stays open.
    pub async fn expect_nothing(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        while let Ok(m) = tokio::time::timeout_at(deadline, self.ws.next()).await {
            match m {
                Some(Ok(Message::Text(t))) => panic!("{}: unexpected frame {t}", self.uid),
                Some(Ok(Message::Close(f))) => panic!("{}: closed: {f:?}", self.uid),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("{}: socket error: {e}", self.uid),
                None => panic!("{}: socket ended", self.uid),
            }
        }
    }

    /// Reads until the close frame; returns its code.
    pub async fn close_code(&mut self) -> Option<u16> {
        let r = tokio::time::timeout(WAIT, async {
            while let Some(m) = self.ws.next().await {
                match m {
                    Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
                    Ok(_) => {}
                    Err(_) => return None,
                }
            }
            None
        })
        .await;
        r.unwrap_or(None)
    }
}
