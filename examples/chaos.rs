//! Soak: the chaos workload for minutes, with random kills, stops, pauses and restarts.
//!
//! ```text
//! cargo build --release && cargo run --release --example chaos -- --nodes 5 --clients 200 --minutes 10
//! ```
//! Starts `--nodes` real `imgate node` processes (the release binary next to this example),
//! runs `--clients` SDK clients that send all the time, and every 8 to 15 s does one of:
//! kill -9 a node (restarted 3 to 6 s later), SIGTERM a node (restarted at once), or SIGSTOP a
//! node for 2 s. At the end it stops sending, waits for every send to end, checks the
//! invariants of the chaos suite and prints a report (and one JSON line). Exit code 1 when an
//! invariant is broken.

#[path = "../tests/chaos_support/mod.rs"]
mod chaos_support;
#[path = "../tests/proc_support/mod.rs"]
mod proc_support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};
use tokio::sync::Mutex as AsyncMutex;

use chaos_support::{World, clients_on, percentiles, rehomed, spawn_clients};
use clap::Parser;
use imgate::client::SendOutcome;
use proc_support::ProcCluster;
use tokio_util::sync::CancellationToken;

/// Chaos soak against real imgate processes.
#[derive(Parser)]
struct Args {
    /// Nodes to run.
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// SDK clients.
    #[arg(long, default_value_t = 200)]
    clients: usize,
    /// How long to run the chaos, in minutes (fractions allowed).
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Seed of the random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// A small deterministic generator (xorshift), so a run can be repeated with its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.nodes >= 3, "--nodes must be at least 3");
    anyhow::ensure!(args.clients >= 2, "--clients must be at least 2");
    let bin = proc_support::imgate_binary();
    anyhow::ensure!(
        bin.exists(),
        "{} not found: run `cargo build --release` first",
        bin.display()
    );
    let mut rng = Rng(args.seed.max(1) * 0x9E37_79B9_7F4A_7C15);
    let c = Arc::new(AsyncMutex::new(ProcCluster::start(
        args.nodes,
        "[delivery]\nack_timeout_ms = 500\nmax_retries = 3\nhold_ms = 3000\n\
         [http]\nshutdown_timeout_ms = 5000\n",
    )));
    let (nodes, ids) = {
        let c = c.lock().await;
        (
            c.procs.iter().map(|p| p.http.clone()).collect::<Vec<_>>(),
            c.procs.iter().map(|p| p.id.clone()).collect::<Vec<_>>(),
        )
    };
    let converge = Duration::from_secs(30);
    c.lock().await.wait_ready(args.nodes as u64, converge).await;
    println!("{} nodes up; starting {} clients", args.nodes, args.clients);

    // Peak RSS per node id, sampled every second.
    let rss: Arc<Mutex<HashMap<String, u64>>> = Default::default();
    let sampling = CancellationToken::new();
    {
        let (c, rss, stop) = (c.clone(), rss.clone(), sampling.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while !stop.is_cancelled() {
                tick.tick().await;
                let pids: Vec<(String, u32)> = {
                    let c = c.lock().await;
                    c.procs
                        .iter()
                        .filter_map(|p| Some((p.id.clone(), p.child.as_ref()?.id())))
                        .collect()
                };
                for (id, pid) in pids {
                    if let Some(kib) = rss_kib(pid) {
                        let mut m = rss.lock().unwrap();
                        let e = m.entry(id).or_default();
                        *e = (*e).max(kib);
                    }
                }
            }
        });
    }

    let uids: Vec<String> = (0..args.clients).map(|i| format!("c{i}")).collect();
    let world = Arc::new(Mutex::new(World::default()));
    let sending = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let stop = CancellationToken::new();
    let tasks = spawn_clients(&uids, &nodes, &world, &sending, &stop);

    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.minutes * 60.0);
    let mut rehome: HashMap<&'static str, Vec<Duration>> = HashMap::new();
    let mut events = 0;
    while Instant::now() + Duration::from_secs(15) < deadline {
        tokio::time::sleep(Duration::from_secs(8 + rng.below(8))).await;
        let victim = rng.below(args.nodes as u64) as usize;
        let id = ids[victim].clone();
        let orphans = clients_on(&world, &id);
        let t0 = Instant::now();
        let kind = match rng.below(3) {
            0 => {
                c.lock().await.kill9(victim);
                "kill -9"
            }
            1 => {
                let mut guard = c.lock().await;
                guard.terminate(victim, Duration::from_secs(10)).await;
                "SIGTERM"
            }
            _ => {
                c.lock().await.signal(victim, libc::SIGSTOP);
                "SIGSTOP"
            }
        };
        let times = rehomed(&world, &orphans, &id, t0).await;
        println!(
            "[{:>4}s] {kind} {id}: re-home {}",
            started.elapsed().as_secs(),
            percentiles(times.clone())
        );
        rehome.entry(kind).or_default().extend(times);
        match kind {
            "kill -9" => {
                tokio::time::sleep(Duration::from_secs(3 + rng.below(4))).await;
                c.lock().await.spawn(victim);
            }
            "SIGTERM" => c.lock().await.spawn(victim),
            _ => {
                tokio::time::sleep(Duration::from_secs(2)).await;
                c.lock().await.signal(victim, libc::SIGCONT);
            }
        }
        c.lock().await.wait_ready(args.nodes as u64, converge).await;
        events += 1;
    }

    // Let every send end.
    sending.store(false, std::sync::atomic::Ordering::Relaxed);
    let drain_start = Instant::now();
    loop {
        {
            let w = world.lock().unwrap();
            if w.outcomes.len() + w.errors.len() >= w.sent.len() {
                break;
            }
        }
        if drain_start.elapsed() > Duration::from_secs(120) {
            println!("some sends had no outcome 120 s after sending stopped");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    for t in tasks {
        t.await?;
    }
    sampling.cancel();

    let w = std::mem::take(&mut *world.lock().unwrap());
    let delivered = w
        .outcomes
        .values()
        .filter(|o| **o == SendOutcome::Delivered)
        .count();
    let not_delivered = w.sent.len() - delivered;
    let lost = w
        .outcomes
        .iter()
        .filter(|(k, o)| **o == SendOutcome::Delivered && !w.received.contains_key(*k))
        .count();
    let dups = w.received.values().filter(|n| **n > 1).count();
    let all: Vec<Duration> = rehome.values().flatten().copied().collect();
    println!(
        "\n== soak report ({} nodes, {} clients, {:.1} min, {events} chaos events)",
        args.nodes, args.clients, args.minutes
    );
    println!("messages sent                {}", w.sent.len());
    println!("delivered                    {delivered}");
    println!("not delivered (failed/none)  {not_delivered}");
    println!("acked but lost               {lost}");
    println!("app-visible duplicates       {dups}");
    println!("resent by the SDK            {}", w.resent);
    println!("duplicates suppressed (SDK)  {}", w.suppressed);
    println!("SDK errors                   {}", w.errors.len());
    for (kind, times) in &rehome {
        println!(
            "re-home after {kind:<8}       {}",
            percentiles(times.clone())
        );
    }
    println!("re-home, all events          {}", percentiles(all.clone()));
    let rss = rss.lock().unwrap().clone();
    let mut ids_sorted: Vec<_> = rss.keys().cloned().collect();
    ids_sorted.sort();
    for id in &ids_sorted {
        println!(
            "max RSS {id:<4}                 {:.1} MiB",
            rss[id] as f64 / 1024.0
        );
    }
    let mut sorted = all;
    sorted.sort();
    let p99 = sorted
        .get(((sorted.len().max(1) - 1) as f64 * 0.99).round() as usize)
        .copied()
        .unwrap_or_default();
    println!(
        "{}",
        serde_json::json!({
            "nodes": args.nodes, "clients": args.clients, "minutes": args.minutes, "events": events,
            "sent": w.sent.len(), "delivered": delivered, "not_delivered": not_delivered,
            "acked_but_lost": lost, "app_duplicates": dups, "resent": w.resent,
            "duplicates_suppressed": w.suppressed, "rehome_p99_ms": p99.as_millis(),
            "max_rss_kib": rss,
        })
    );
    let ok = lost == 0 && dups == 0 && not_delivered == 0 && w.errors.is_empty();
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
