//! The browser SDK (`clients/js/imgate.js`): its unit tests under Node's own test runner, and
//! the copy every node serves at `GET /imgate.js`.

mod cluster_support;

use std::process::Command;

use cluster_support::Cluster;

/// `node --test clients/js/test/`: a fake WebSocket, a fake fetch, a fake clock (backoff,
/// resend, dedup, moved, refresh, pings, rooms). Skipped with the reason when Node.js is not
/// installed (`.ci/run` installs it).
#[test]
fn the_sdk_unit_tests_pass_under_node() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/js");
    let Ok(version) = Command::new("node").arg("--version").output() else {
        eprintln!(
            "SKIPPED: node is not installed (.ci/run installs it): the SDK tests did not run"
        );
        return;
    };
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    assert!(
        major >= 20,
        "node {version}: the SDK tests need Node 20 or later"
    );
    let out = Command::new("node")
        .args(["--test", "test/"])
        .current_dir(dir)
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "node --test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("# fail 0"), "{stdout}");
    let passed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("# pass "))
        .and_then(|n| n.trim().parse::<u32>().ok())
        .unwrap_or(0);
    assert!(passed >= 10, "only {passed} SDK tests ran:\n{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_serves_the_sdk_as_a_module() {
    let c = Cluster::start(1).await;
    c.wait_converged(1).await;
    let resp = reqwest::get(format!("{}/imgate.js", c.nodes[0].http_url()))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/javascript"), "{ct}");
    assert!(resp.headers().contains_key("access-control-allow-origin"));
    let body = resp.text().await.unwrap();
    let file =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/clients/js/imgate.js"))
            .unwrap();
    assert_eq!(body, file, "the node serves the file of the repository");
    assert!(body.contains("export class Client"));
    c.shutdown().await;
}
