//! imgate.js and the chat page in real headless Chromium: Debian's `chromium` driven by the
//! pinned `playwright-core` of `clients/js/browser-test` (installed by
//! `.ci/setup-browser-tests.sh`, which `.ci/run` calls; the browser is never downloaded).
//!
//! - `sdk.mjs`: two pages import the SDK from the nodes of an in-process 2-node cluster, chat
//!   both ways with end-to-end acks, see an offline failure, keep a markup-looking body as
//!   data, and use a room.
//! - `page.mjs`: the chat page of real `imgate node` processes, a desktop and a 375 px phone,
//!   through a kill -9 of the node that served the page; screenshots of each step go to
//!   `target/tmp/screenshots/page/`.
//!
//! Each is skipped with the reason when chromium or the playwright-core install is missing.

mod cluster_support;
mod proc_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cluster_support::Cluster;
use proc_support::ProcCluster;

/// The browser-test folder and chromium's path, or `None` (said why) when one is missing.
fn browser_setup() -> Option<(PathBuf, &'static str)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js/browser-test");
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(chromium) = chromium else {
        eprintln!("SKIPPED: chromium is not installed (.ci/run installs it)");
        return None;
    };
    if !dir.join("node_modules/playwright-core").exists() {
        eprintln!("SKIPPED: run .ci/setup-browser-tests.sh first (installs playwright-core)");
        return None;
    }
    Some((dir, chromium))
}

/// Runs `node <script>` in the browser-test folder with `env`; panics with its output unless
/// it exits 0 and prints `ok_line`.
async fn run_script(
    (dir, chromium): (PathBuf, &'static str),
    script: &str,
    env: Vec<(&'static str, String)>,
    ok_line: &str,
    limit: Duration,
) {
    let script = script.to_string();
    let run = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .current_dir(&dir)
            .envs(env)
            .env("CHROMIUM", chromium)
            .output()
    });
    let out = tokio::time::timeout(limit, run)
        .await
        .expect("the browser run ends in time")
        .unwrap()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(ok_line), "{stdout}\n{stderr}");
}

fn shots(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/tmp/screenshots")
        .join(name)
        .display()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_works_in_chromium_against_real_nodes() {
    let Some(setup) = browser_setup() else {
        return;
    };
    let c = Cluster::start(2).await;
    c.wait_converged(2).await;
    let nodes: Vec<String> = c.nodes.iter().map(|n| n.http_url()).collect();
    let env = vec![("IMGATE_NODES", nodes.join(",")), ("SHOTS", shots("sdk"))];
    run_script(
        setup,
        "sdk.mjs",
        env,
        "imgate.js in chromium: ok",
        Duration::from_secs(120),
    )
    .await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_page_in_chromium_on_a_desktop_and_a_phone_through_a_kill_9() {
    let Some(setup) = browser_setup() else {
        return;
    };
    // Offline sends end after 1.5 s instead of 5 s; the rest is the shipped defaults.
    let c = ProcCluster::start(3, "[delivery]\nhold_ms = 1500\n");
    c.wait_ready(3, Duration::from_secs(30)).await;
    let list = |f: &dyn Fn(&proc_support::Proc) -> String| {
        c.procs.iter().map(f).collect::<Vec<_>>().join(",")
    };
    let env = vec![
        ("IMGATE_NODES", list(&|p| p.http.clone())),
        ("IMGATE_IDS", list(&|p| p.id.clone())),
        (
            "IMGATE_PIDS",
            list(&|p| p.child.as_ref().unwrap().id().to_string()),
        ),
        ("SHOTS", shots("page")),
    ];
    run_script(
        setup,
        "page.mjs",
        env,
        "chat page in chromium: ok",
        Duration::from_secs(240),
    )
    .await;
}
