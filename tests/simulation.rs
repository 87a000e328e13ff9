//! Seeded simulations of whole clusters of the real cluster core (`imgate::relay`), with faults.
//!
//! `cargo test --test simulation` runs `IMGATE_SIM_SEEDS` seeds (default 1000), split over two
//! tests so that both cores work. A failing seed prints its replay command:
//! `IMGATE_SIM_SEED=<seed> cargo test --test simulation replay -- --nocapture`, which runs that
//! one seed again and prints the trace of its last events. `IMGATE_SIM_FIRST` moves the range.
//! No sockets, no sleeps, no threads: a run is a function of its seed.

mod sim_support;

use std::collections::BTreeMap;
use std::time::Instant;

use sim_support::{report, run_seed};

fn seeds() -> u64 {
    std::env::var("IMGATE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000)
}

fn first() -> u64 {
    std::env::var("IMGATE_SIM_FIRST")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// Runs seeds `first + k` for the `k` of one half; fails with the report of the first failure.
fn run_half(half: u64) {
    let started = Instant::now();
    let (first, n) = (first(), seeds());
    let mut mix: BTreeMap<&str, u64> = BTreeMap::new();
    let (mut sends, mut delivered, mut failed, mut events) = (0, 0, 0, 0);
    let mut count = 0;
    for seed in (first..first + n).filter(|s| s % 2 == half) {
        match run_seed(seed, false) {
            Ok((stats, kinds)) => {
                for k in kinds {
                    *mix.entry(k).or_default() += 1;
                }
                sends += stats.sends;
                delivered += stats.delivered;
                failed += stats.failed;
                events += stats.events;
                count += 1;
            }
            Err(_) => {
                // Runs are deterministic: run it again with the trace on for the report.
                let v = run_seed(seed, true).expect_err("a seed fails the same way twice");
                panic!("{}", report(seed, &v));
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{count} seeds in {secs:.1} s ({:.0} seeds/s); {events} events; {sends} sends: \
         {delivered} delivered, {failed} failed; faults: {mix:?}",
        count as f64 / secs
    );
}

#[test]
fn seeds_even() {
    run_half(0);
}

#[test]
fn seeds_odd() {
    run_half(1);
}

/// Replays `IMGATE_SIM_SEED` (does nothing without it) and prints its trace.
#[test]
fn replay() {
    let Some(seed) = std::env::var("IMGATE_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    else {
        return;
    };
    match run_seed(seed, true) {
        Ok((stats, kinds)) => println!("seed {seed} passes: {stats:?}, faults {kinds:?}"),
        Err(v) => panic!("{}", report(seed, &v)),
    }
}
