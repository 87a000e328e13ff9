//! A terminal chat on the client SDK.
//!
//! ```text
//! cargo run --release -- up                      # in one terminal
//! cargo run --example chat -- --node http://127.0.0.1:9501 --uid alice
//! cargo run --example chat -- --node http://127.0.0.1:9503 --uid bob
//! cargo run --example chat -- --node https://n1.example:9501 --ca ca.pem --uid carol   # TLS
//! ```
//! Type `bob: hello` to send; `✓ delivered` appears when bob's client acked it. Give
//! `--node` several times so the client can log in elsewhere when a node dies.

use std::io::Write;

use clap::Parser;
use imgate::client::{Client, ClientConfig, Event, SendOutcome};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Terminal chat against an imgate cluster.
#[derive(Parser)]
struct Args {
    /// Node HTTP base URL (repeat for more nodes).
    #[arg(long = "node", default_value = "http://127.0.0.1:9501")]
    nodes: Vec<String>,
    /// Your user id.
    #[arg(long)]
    uid: String,
    /// Password (auth mode `users`).
    #[arg(long)]
    password: Option<String>,
    /// A PEM file of extra root certificates to trust for https:// and wss:// (a private CA).
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cfg = ClientConfig::new(args.nodes, &args.uid);
    cfg.password = args.password;
    cfg.max_attempts = 5;
    if let Some(ca) = &args.ca {
        cfg.ca_pem = Some(std::fs::read_to_string(ca)?);
    }
    let (client, mut incoming, mut events) = Client::start(cfg);
    println!("type `recipient: message`, Ctrl-D to quit");
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                let Some((to, text)) = line.split_once(':') else {
                    println!("  (write `recipient: message`)");
                    continue;
                };
                let (to, text) = (to.trim().to_string(), text.trim().to_string());
                match client.send(&to, serde_json::json!({ "text": text })) {
                    Ok(pending) => {
                        tokio::spawn(async move {
                            match pending.await {
                                Ok(SendOutcome::Delivered) => println!("  ✓ delivered to {to}: {text}"),
                                Ok(SendOutcome::Failed(r)) => println!("  ✗ failed ({}) to {to}: {text}", r.as_str()),
                                Err(e) => println!("  ✗ {e}"),
                            }
                        });
                    }
                    Err(e) => println!("  ✗ {e}"),
                }
            }
            m = incoming.recv() => {
                let Some(m) = m else { break };
                let text = m.body.get("text").and_then(|t| t.as_str()).map(str::to_string)
                    .unwrap_or_else(|| m.body.to_string());
                println!("{}> {text}", m.from);
            }
            e = events.recv() => {
                match e {
                    Some(Event::Connected { node, .. }) => println!("  (connected at {node})"),
                    Some(Event::Disconnected { reason }) => println!("  (disconnected: {reason}; reconnecting)"),
                    Some(Event::Moved { node }) => println!("  (moving to {node})"),
                    None => {}
                }
            }
        }
        std::io::stdout().flush()?;
    }
    Ok(())
}
