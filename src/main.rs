//! The `imgate` binary: parses flags, loads the configuration, sets up logging, runs.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// imgate: a storage-free instant-messaging gateway cluster with end-to-end delivery acks.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start
enum Cmd {
    /// Run one node (graceful shutdown on SIGINT/SIGTERM; SIGHUP re-reads the TLS files).
    /// Its entry comes from the file, from these flags or `IMGATE_*` variables (flags win over
    /// variables, variables over the file), or from both.
    Node {
        /// The cluster file; without it, `cluster.toml` if there is one here, else none.
        #[arg(long, short, env = "IMGATE_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        overrides: imgate::config::NodeOverrides,
    },
    /// Run every `[[nodes]]` entry of the file as its own child process (so one can be
    /// killed alone), with each child's log lines prefixed by its id. Ctrl-C stops them all.
    Up {
        /// The cluster file.
        #[arg(long, short, default_value = "cluster.toml")]
        config: PathBuf,
    },
    /// Print a new random secret (32 bytes from the OS-seeded CSPRNG, base64) for
    /// `cluster.secret`, `auth.jwt_secret` or an `api.keys` entry.
    GenSecret,
    /// Print an argon2id hash for an `[[auth.users]]` entry. Reads the password from
    /// stdin (one line) unless --password is given.
    HashPassword {
        /// The password (visible in the process list and shell history: prefer stdin).
        #[arg(long)]
        password: Option<String>,
    },
}

/// How long a degraded node spends stopping before it exits (the contract allows 5 s).
const DEGRADED_EXIT: std::time::Duration = std::time::Duration::from_secs(3);

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("IMGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::GenSecret => {
            println!("{}", imgate::auth::gen_secret());
            Ok(())
        }
        Cmd::HashPassword { password } => {
            let password = match password {
                Some(p) => p,
                None => {
                    if std::io::stdin().is_terminal() {
                        eprintln!("password (then Enter):");
                    }
                    let mut line = String::new();
                    std::io::stdin().lock().read_line(&mut line)?;
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
            };
            anyhow::ensure!(!password.is_empty(), "empty password");
            let hash = imgate::auth::hash_password(&password)
                .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?;
            println!("{hash}");
            Ok(())
        }
        Cmd::Up { config } => {
            let cfg = imgate::config::Config::load(&config)?;
            let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            rt.block_on(imgate::up::run(cfg, config, stop_signal()))
        }
        Cmd::Node { config, overrides } => {
            init_tracing();
            let id = overrides.id.clone();
            let default_file = PathBuf::from("cluster.toml");
            let file = config.or_else(|| default_file.exists().then_some(default_file));
            let cfg = imgate::config::Config::load_for_node(file.as_deref(), &overrides)?;
            let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            rt.block_on(async move {
                let node = imgate::node::start(cfg, &id).await?;
                // Test hook (tests/process.rs): gossip dies this long after start.
                let mut hook = std::env::var("IMGATE_TEST_STOP_GOSSIP_MS")
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(|ms| Box::pin(tokio::time::sleep(std::time::Duration::from_millis(ms))));
                #[cfg(unix)]
                let mut hup =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                        .context("installing a SIGHUP handler")?;
                let degraded = loop {
                    #[cfg(unix)]
                    let reload = hup.recv();
                    #[cfg(not(unix))]
                    let reload = std::future::pending::<Option<()>>();
                    tokio::select! {
                        _ = reload => {
                            match node.reload_tls() {
                                Ok(()) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                                Err(e) => tracing::error!(error = %e, "SIGHUP: TLS reload failed; the old certificate stays"),
                            }
                        }
                        _ = stop_signal() => {
                            tracing::info!("signal received, shutting down");
                            break None;
                        }
                        _ = node.stopped() => break None,
                        why = node.failed() => break Some(why),
                        () = async { hook.as_mut().expect("guarded").await }, if hook.is_some() => {
                            node.membership().stop_gossip_task_for_test();
                            hook = None;
                        }
                    }
                };
                match degraded {
                    None => {
                        node.shutdown().await;
                        tracing::info!("stopped");
                        anyhow::Ok(())
                    }
                    Some(why) => {
                        // Hand what can be handed over, briefly, then exit non-zero so that
                        // `imgate up`, systemd or Kubernetes start the node again.
                        let _ = tokio::time::timeout(DEGRADED_EXIT, node.shutdown()).await;
                        anyhow::bail!("node degraded, exiting: {why}")
                    }
                }
            })
        }
    }
}
