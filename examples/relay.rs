//! The raw relay: the smallest tokio-tungstenite program that relays frames between sockets.
//!
//! No auth, no acks, no cluster, no retries: a client connects to `ws://HOST:PORT/?uid=NAME`,
//! and every text frame it sends that carries `"to": "<uid>"` is written unchanged to that
//! user's socket. It is the ceiling for imgate's per-message cost in BENCHMARKS.md.
//!
//! ```text
//! cargo run --release --example relay -- 127.0.0.1:9600
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

type Peers = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Message>>>>;

#[derive(Deserialize)]
struct To<'a> {
    #[serde(borrow)]
    to: Option<&'a str>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9600".into());
    let listener = TcpListener::bind(&addr).await?;
    println!("ready {}", listener.local_addr()?);
    let peers: Peers = Arc::default();
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let peers = peers.clone();
        tokio::spawn(async move {
            let mut uid = String::new();
            // The error type is tungstenite's; its size is not ours to choose.
            #[allow(clippy::result_large_err)]
            let callback = |req: &Request, resp: Response| {
                if let Some(q) = req.uri().query() {
                    uid = q.strip_prefix("uid=").unwrap_or(q).to_string();
                }
                Ok(resp)
            };
            let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
                return;
            };
            let (mut sink, mut stream) = ws.split();
            let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
            peers.lock().unwrap().insert(uid.clone(), tx);
            let writer = tokio::spawn(async move {
                while let Some(m) = rx.recv().await {
                    if sink.feed(m).await.is_err() {
                        return;
                    }
                    while let Ok(m) = rx.try_recv() {
                        if sink.feed(m).await.is_err() {
                            return;
                        }
                    }
                    if sink.flush().await.is_err() {
                        return;
                    }
                }
            });
            while let Some(Ok(m)) = stream.next().await {
                if let Message::Text(t) = &m
                    && let Ok(To { to: Some(to) }) = serde_json::from_str::<To>(t)
                    && let Some(tx) = peers.lock().unwrap().get(to)
                {
                    let _ = tx.send(m.clone());
                }
            }
            peers.lock().unwrap().remove(&uid);
            writer.abort();
        });
    }
}
