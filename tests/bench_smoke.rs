//! Smoke runs of every benchmark scenario at tiny size, so the benchmark never rots.
//! (`cargo test` builds the examples; the Socket.IO peer needs Node.js and Redis and is only
//! run by bench/run.sh.)

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn bench_binary() -> PathBuf {
    // target/<profile>/imgate -> target/<profile>/examples/bench
    let imgate = PathBuf::from(env!("CARGO_BIN_EXE_imgate"));
    imgate.parent().unwrap().join("examples").join("bench")
}

fn run(args: &[&str]) -> Value {
    let bin = bench_binary();
    assert!(
        bin.exists(),
        "{} missing: cargo test builds the examples",
        bin.display()
    );
    let out = Command::new(&bin).args(args).output().expect("bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("a JSON line");
    serde_json::from_str(last).expect("the last line is JSON")
}

#[test]
fn chat_imgate_and_relay() {
    let v = run(&[
        "chat",
        "--target",
        "imgate",
        "--users",
        "6",
        "--window",
        "2",
        "--seconds",
        "1",
    ]);
    assert!(v["delivered"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    assert_eq!(v["cross_node_pairs"], 6, "every pair crosses nodes: {v}");
    assert_eq!(v["servers"].as_array().unwrap().len(), 3);
    let v = run(&[
        "chat",
        "--target",
        "relay",
        "--users",
        "4",
        "--window",
        "2",
        "--seconds",
        "1",
    ]);
    assert!(v["delivered"].as_u64().unwrap() > 0, "{v}");
}

#[test]
fn idle_login_failover() {
    let v = run(&["idle", "--target", "imgate", "--sessions", "50,100"]);
    assert_eq!(v["steps"][1]["alive"], 100, "{v}");
    let v = run(&["login", "--concurrency", "4", "--seconds", "0.5"]);
    assert!(v["ok"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    let v = run(&["failover", "--users", "20"]);
    assert!(v["orphans"].as_u64().unwrap() > 0, "{v}");
}

#[test]
fn room_imgate_and_membership_memory() {
    let v = run(&[
        "room",
        "--target",
        "imgate",
        "--members",
        "12",
        "--senders",
        "2",
        "--window",
        "2",
        "--seconds",
        "1",
    ]);
    assert!(v["results"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    // Every result counts the 11 other members, each acked.
    assert!(
        v["member_acked_per_s"].as_f64().unwrap() >= v["room_sends_per_s"].as_f64().unwrap() * 10.0,
        "{v}"
    );
    // The membership memory target holds (a count of bytes, not a timing).
    let exe = bench_binary().with_file_name("room_memory");
    let out = Command::new(&exe)
        .args(["--rooms", "20", "--members", "1000", "--users", "5000"])
        .output()
        .expect("room_memory runs");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let per = v["bytes_per_membership_room_side"].as_f64().unwrap();
    assert!(per > 30.0 && per <= 200.0, "{v}");
}
