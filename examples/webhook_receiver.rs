//! A tiny webhook receiver: checks each event's signature and prints it.
//!
//! ```sh
//! cargo run --example webhook_receiver -- --listen 127.0.0.1:9700 --secret change-me
//! ```
//!
//! and in `cluster.toml`:
//!
//! ```toml
//! [webhooks]
//! url = "http://127.0.0.1:9700/imgate"
//! secret = "change-me"
//! ```
//!
//! An event whose `X-Imgate-Signature` is not `sha256=` + the hex HMAC-SHA256 of the raw body
//! under the secret is answered 401 and not printed. Compare signatures in constant time, as
//! here: `Mac::verify_slice`.

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use clap::Parser;
use hmac::{Hmac, Mac};
use sha2::Sha256;

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9700")]
    listen: String,
    /// The `[webhooks] secret` of the cluster.
    #[arg(long, env = "IMGATE_WEBHOOK_SECRET")]
    secret: String,
}

/// Whether `header` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under `secret`.
fn verified(secret: &str, header: &str, body: &[u8]) -> bool {
    let Some(hex) = header.strip_prefix("sha256=") else {
        return false;
    };
    let Some(tag) = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&tag).is_ok()
}

async fn event(State(secret): State<String>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let signature = headers
        .get("x-imgate-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !verified(&secret, signature, &body) {
        eprintln!("refused an event with a bad signature");
        return StatusCode::UNAUTHORIZED;
    }
    println!("{}", String::from_utf8_lossy(&body));
    StatusCode::NO_CONTENT
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let app = axum::Router::new()
        .fallback(axum::routing::post(event))
        .with_state(args.secret);
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    eprintln!("webhook receiver on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn signatures_are_checked() {
        let body = br#"{"event":"connect"}"#;
        let good = imgate::webhooks::signature("s", body);
        assert!(super::verified("s", &good, body));
        assert!(!super::verified("t", &good, body));
        assert!(!super::verified("s", &good, b"{}"));
        assert!(!super::verified("s", "sha256=zz", body));
        assert!(!super::verified("s", "md5=00", body));
    }
}
