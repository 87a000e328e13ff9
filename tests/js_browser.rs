//! imgate.js in real headless Chromium: Debian's `chromium` driven by the pinned
//! `playwright-core` of `clients/js/browser-test` (installed by `.ci/setup-browser-tests.sh`,
//! which `.ci/run` calls; the browser is never downloaded). Two pages import the SDK from the
//! nodes of an in-process 2-node cluster, chat both ways with end-to-end acks, see an offline
//! failure, keep a markup-looking body as data, and use a room. Skipped with the reason when
//! chromium or the playwright-core install is missing.

mod cluster_support;

use std::path::Path;
use std::process::Command;

use cluster_support::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_works_in_chromium_against_real_nodes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/js/browser-test");
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(chromium) = chromium else {
        eprintln!("SKIPPED: chromium is not installed (.ci/run installs it)");
        return;
    };
    if !dir.join("node_modules/playwright-core").exists() {
        eprintln!("SKIPPED: run .ci/setup-browser-tests.sh first (installs playwright-core)");
        return;
    }
    let c = Cluster::start(2).await;
    c.wait_converged(2).await;
    let nodes: Vec<String> = c.nodes.iter().map(|n| n.http_url()).collect();
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tmp/screenshots");
    let run = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || {
            Command::new("node")
                .arg("sdk.mjs")
                .current_dir(&dir)
                .env("IMGATE_NODES", nodes.join(","))
                .env("CHROMIUM", chromium)
                .env("SHOTS", shots)
                .output()
        }
    });
    let out = tokio::time::timeout(std::time::Duration::from_secs(120), run)
        .await
        .expect("the browser run ends within 2 minutes")
        .unwrap()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("imgate.js in chromium: ok"),
        "{stdout}\n{stderr}"
    );
    c.shutdown().await;
}
