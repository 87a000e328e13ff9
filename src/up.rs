//! `imgate up`: runs every node of a cluster file as a child process of this one.
//!
//! Each child is `imgate node --config FILE --id ID`, so any one of them can be killed alone
//! (chaos testing by hand). Their stdout and stderr lines are printed with an `[id]` prefix.
//! On Ctrl-C or SIGTERM every child gets SIGTERM (a graceful stop), then SIGKILL if it is
//! still running after the configured shutdown bound.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

use crate::config::Config;

/// How long `imgate up` waits for the cluster to be ready before it warns.
const READY_LIMIT: Duration = Duration::from_secs(30);

fn prefix_lines<R: AsyncRead + Unpin + Send + 'static>(id: String, reader: R, to_stderr: bool) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if to_stderr {
                eprintln!("[{id}] {line}");
            } else {
                println!("[{id}] {line}");
            }
        }
    });
}

fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a pid we spawned and a valid signal number has no memory effects.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
}

/// One look at whether the nodes at `bases` (`http://host:port`) form a ready cluster of
/// `members`: each answers `GET /ready` 200 with that many members (joined, settled, all of
/// them reachable over their links). `Err` says which node is not there yet and why.
///
/// # Errors
/// A description of the first node that is not ready.
pub async fn check_ready(
    http: &reqwest::Client,
    bases: &[String],
    members: usize,
) -> Result<(), String> {
    for base in bases {
        let ready = http
            .get(format!("{base}/ready"))
            .timeout(Duration::from_millis(500))
            .send()
            .await
            .map_err(|e| format!("{base}: {e}"))?
            .json::<serde_json::Value>()
            .await
            .map_err(|e| format!("{base}: {e}"))?;
        let seen = ready["members"].as_u64().unwrap_or(0);
        let reachable = ready["reachable"].as_u64().unwrap_or(0);
        if seen != members as u64 || ready["ready"] != true {
            return Err(format!(
                "{base} ({}) sees {seen} of {members} members, {reachable} reachable{}",
                ready["node"].as_str().unwrap_or("?"),
                ready["message"]
                    .as_str()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            ));
        }
    }
    Ok(())
}

/// Polls [`check_ready`] every 20 ms until it holds; returns the time it took.
///
/// # Errors
/// After `limit`, the last reason the cluster was not ready.
pub async fn wait_ready(
    bases: &[String],
    members: usize,
    limit: Duration,
) -> Result<Duration, String> {
    let http = reqwest::Client::new();
    let start = tokio::time::Instant::now();
    loop {
        match check_ready(&http, bases, members).await {
            Ok(()) => return Ok(start.elapsed()),
            Err(why) if start.elapsed() >= limit => {
                return Err(format!("not ready after {limit:?}: {why}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Starts every node of `cfg` (read from `path`) and waits for `stop`.
///
/// # Errors
/// If a child cannot be started.
pub async fn run(
    cfg: Config,
    path: PathBuf,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    // Each child would refuse weak secrets on a network; say so once, before starting any.
    for node in &cfg.nodes {
        cfg.check_secrets_for(&node.id)?;
    }
    let exe = std::env::current_exe().context("locating the imgate binary")?;
    let mut children: Vec<(String, Child)> = Vec::new();
    for node in &cfg.nodes {
        let mut child = Command::new(&exe)
            .arg("node")
            .arg("--config")
            .arg(&path)
            .arg("--id")
            .arg(&node.id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting node {}", node.id))?;
        if let Some(out) = child.stdout.take() {
            prefix_lines(node.id.clone(), out, false);
        }
        if let Some(err) = child.stderr.take() {
            prefix_lines(node.id.clone(), err, true);
        }
        let scheme = if node.tls_files(&cfg.tls).is_some() {
            "https"
        } else {
            "http"
        };
        println!(
            "[up] node {} pid {} {scheme}://{} (gossip {}, quic {})",
            node.id,
            child.id().unwrap_or(0),
            node.advertise
                .clone()
                .unwrap_or_else(|| node.http.to_string()),
            node.gossip,
            node.quic
        );
        children.push((node.id.clone(), child));
    }
    if let Some(first) = cfg.nodes.first() {
        let http = first
            .advertise
            .clone()
            .unwrap_or_else(|| first.http.to_string());
        let scheme = if first.tls_files(&cfg.tls).is_some() {
            "https"
        } else {
            "http"
        };
        println!("[up] chat page:   {scheme}://{http}/");
        println!(
            "[up] log in:      curl -s -XPOST {scheme}://{http}/login -H 'content-type: application/json' -d '{{\"uid\":\"alice\"}}'"
        );
        println!("[up] any node answers /login; Ctrl-C stops every node");
    }
    // Say when the cluster is really ready: every node sees every other one and has its link
    // up, so a login at any node names the owner the client will be welcomed by.
    let bases: Vec<String> = cfg
        .nodes
        .iter()
        .map(|n| {
            let http = n.advertise.clone().unwrap_or_else(|| n.http.to_string());
            format!("http://{http}")
        })
        .collect();
    let members = bases.len();
    // `up` is the loopback development runner: it does not know which CA to trust, so with
    // TLS it says so instead of reporting a readiness it cannot see.
    let tls = cfg.nodes.iter().any(|n| n.tls_files(&cfg.tls).is_some());
    if tls {
        println!("[up] TLS is on: check readiness with GET https://<node>/ready and your CA");
    }
    tokio::spawn(async move {
        if tls {
            return;
        }
        match wait_ready(&bases, members, READY_LIMIT).await {
            Ok(took) => println!(
                "[up] cluster ready: {members} nodes, every link up (after {} ms)",
                took.as_millis()
            ),
            Err(why) => println!("[up] warning: cluster {why}"),
        }
    });
    tokio::pin!(stop);
    let mut exited = vec![false; children.len()];
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {
                for (i, (id, child)) in children.iter_mut().enumerate() {
                    if !exited[i] && let Ok(Some(status)) = child.try_wait() {
                        exited[i] = true;
                        let alive = exited.iter().filter(|e| !**e).count();
                        println!("[up] node {id} exited: {status}; {alive} of {} running", exited.len());
                    }
                }
                if exited.iter().all(|e| *e) {
                    println!("[up] every node has exited");
                    return Ok(());
                }
            }
        }
    }
    println!("[up] stopping {} nodes", children.len());
    for (_, child) in &children {
        terminate(child);
    }
    let bound = Duration::from_millis(cfg.http.shutdown_timeout_ms + 1000);
    for (id, mut child) in children {
        match tokio::time::timeout(bound, child.wait()).await {
            Ok(Ok(status)) => println!("[up] node {id} stopped: {status}"),
            _ => {
                println!("[up] node {id} did not stop in time; killing it");
                let _ = child.kill().await;
            }
        }
    }
    Ok(())
}
