//! A terminal chat on the client SDK.
//!
//! ```text
//! cargo run --release -- up                      # in one terminal
//! cargo run --example chat -- --node http://127.0.0.1:9501 --uid alice
//! cargo run --example chat -- --node http://127.0.0.1:9503 --uid bob
//! cargo run --example chat -- --node https://n1.example:9501 --ca ca.pem --uid carol   # TLS
//! ```
//! Type `bob: hello` to send; `✓ delivered` appears when bob's client acked it. Rooms:
//! `/join team`, then `#team: hello all` (answered with how many members got it), `/leave
//! team`. Give `--node` several times so the client can log in elsewhere when a node dies.

use std::io::Write;

use clap::Parser;
use imgate::client::{Client, ClientConfig, Event, Membership, RoomSendOutcome, SendOutcome};
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

/// What a typed line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// `bob: text`
    Direct(String, String),
    /// `#room: text`
    Room(String, String),
    /// `/join room`
    Join(String),
    /// `/leave room`
    Leave(String),
    /// Anything else.
    Help,
}

fn parse_line(line: &str) -> Line {
    let line = line.trim();
    if let Some(room) = line.strip_prefix("/join ") {
        return Line::Join(room.trim().to_string());
    }
    if let Some(room) = line.strip_prefix("/leave ") {
        return Line::Leave(room.trim().to_string());
    }
    let Some((to, text)) = line.split_once(':') else {
        return Line::Help;
    };
    let text = text.trim().to_string();
    match to.trim().strip_prefix('#') {
        Some(room) if !room.is_empty() => Line::Room(room.to_string(), text),
        Some(_) => Line::Help,
        None if to.trim().is_empty() => Line::Help,
        None => Line::Direct(to.trim().to_string(), text),
    }
}

fn membership(
    room: String,
    pending: Result<imgate::client::PendingMembership, imgate::client::ClientError>,
) {
    match pending {
        Ok(p) => {
            tokio::spawn(async move {
                match p.await {
                    Ok(Membership::Joined { members }) => {
                        println!("  (joined #{room}: {members} members)")
                    }
                    Ok(Membership::Left) => println!("  (left #{room})"),
                    Ok(Membership::Failed(r)) => println!("  ✗ #{room}: {}", r.as_str()),
                    Err(e) => println!("  ✗ {e}"),
                }
            });
        }
        Err(e) => println!("  ✗ {e}"),
    }
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
    println!(
        "type `recipient: message`, `/join room`, `#room: message`, `/leave room`; Ctrl-D quits"
    );
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                let (to, text) = match parse_line(&line) {
                    Line::Direct(to, text) => (to, text),
                    Line::Join(room) => { membership(room.clone(), client.join(&room)); continue; }
                    Line::Leave(room) => { membership(room.clone(), client.leave(&room)); continue; }
                    Line::Room(room, text) => {
                        match client.send_room(&room, serde_json::json!({ "text": text })) {
                            Ok(pending) => {
                                tokio::spawn(async move {
                                    match pending.await {
                                        Ok(RoomSendOutcome::Done { members, delivered, offline, failed }) => println!(
                                            "  ✓ #{room}: {delivered} of {members} got it ({offline} offline, {failed} failed): {text}"
                                        ),
                                        Ok(RoomSendOutcome::Failed(r)) => println!("  ✗ #{room} ({}): {text}", r.as_str()),
                                        Err(e) => println!("  ✗ {e}"),
                                    }
                                });
                            }
                            Err(e) => println!("  ✗ {e}"),
                        }
                        continue;
                    }
                    Line::Help => {
                        println!("  (write `recipient: message`, `/join room`, `#room: message` or `/leave room`)");
                        continue;
                    }
                };
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
                match &m.room {
                    Some(room) => println!("#{room} {}> {text}", m.from),
                    None => println!("{}> {text}", m.from),
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_into_commands() {
        let s = |x: &str| x.to_string();
        assert_eq!(parse_line("bob: hi"), Line::Direct(s("bob"), s("hi")));
        assert_eq!(
            parse_line("#team: hi all"),
            Line::Room(s("team"), s("hi all"))
        );
        assert_eq!(parse_line("/join team"), Line::Join(s("team")));
        assert_eq!(parse_line("  /leave  team "), Line::Leave(s("team")));
        assert_eq!(parse_line("no colon"), Line::Help);
        assert_eq!(parse_line("#: x"), Line::Help);
        assert_eq!(parse_line(": x"), Line::Help);
        // A colon in the text stays in the text.
        assert_eq!(
            parse_line("bob: at 10:30"),
            Line::Direct(s("bob"), s("at 10:30"))
        );
    }
}
