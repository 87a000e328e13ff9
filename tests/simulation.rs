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
    let (mut room_results, mut membership_checks) = (0, 0);
    let mut slowest = (0, 0);
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
                room_results += stats.room_results;
                membership_checks += stats.membership_checks;
                slowest = slowest.max((stats.quiet_after, seed));
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
                  {delivered} delivered, {failed} failed; {room_results} room results; memberships \
         checked after {membership_checks} single-failure runs; faults: {mix:?}; slowest to \
         quiesce: {} ms after the faults (seed {})",
        count as f64 / secs,
        slowest.0 / MS,
        slowest.1
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

/// A run depends on its seed alone: the same seed twice gives the same trace, event for event.
#[test]
fn a_seed_replays_exactly() {
    for seed in [3, 17, 224] {
        let run = || {
            run_seed(seed, true)
                .map(|(stats, _)| stats)
                .map_err(|v| v.what)
        };
        let (a, b) = (run(), run());
        assert!(a.as_ref().is_ok_and(|s| s.trace_hash != 0), "{a:?}");
        assert_eq!(a, b, "seed {seed} ran two ways");
    }
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

// ----- the historic bugs, as fixed plans -------------------------------------------------------

use sim_support::{Fault, MS, Plan, S, run_plan};

/// Runs `plan` with seeds 1 to 20 (each seed shuffles delays, clients and sends differently).
fn scripted(name: &str, plan: Plan) {
    for seed in 1..=20 {
        if run_plan(seed, &plan, false).is_err() {
            let v = run_plan(seed, &plan, true).expect_err("a seed fails the same way twice");
            panic!(
                "{name}, seed {seed}: {}\nrerun: cargo test --test simulation {name}\n{}",
                v.what,
                v.trace.join("\n")
            );
        }
    }
}

/// 6794c0d, first half: a client told to connect to its owner arrives after a view change
/// made another node the owner (nodes join and die while clients log in); the node must send
/// it on with `moved`, not serve it. Fails when `Relay::handle_client` opens without checking.
#[test]
fn regression_6794c0d_session_opened_on_a_non_owner_after_a_view_change() {
    let plan = Plan {
        nodes: 3,
        clients: 10,
        sends: 8,
        faults: vec![
            (800 * MS, Fault::Start(3)),
            (1500 * MS, Fault::Start(4)),
            (3 * S, Fault::Kill(1)),
            (3500 * MS, Fault::Start(1)),
        ],
        busy_until: 8 * S,
        refuse_per_mille: 0,
    };
    scripted(
        "regression_6794c0d_session_opened_on_a_non_owner_after_a_view_change",
        plan,
    );
}

/// 6794c0d, second half: while the link to a user's owner is cut, the user lands on the next
/// node of its preference list; when the link comes back (or a paused owner resumes), that
/// node must hand the user over. Fails when a link coming up hands over nobody.
#[test]
fn regression_6794c0d_sessions_left_behind_when_the_owner_is_reachable_again() {
    let plan = Plan {
        nodes: 3,
        clients: 10,
        sends: 8,
        faults: vec![
            (S, Fault::Cut(0, 1)),
            (S, Fault::Cut(0, 2)),
            (4 * S, Fault::Heal(0, 1)),
            (4 * S, Fault::Heal(0, 2)),
            (6 * S, Fault::Pause(2, 4 * S)),
        ],
        busy_until: 12 * S,
        refuse_per_mille: 0,
    };
    scripted(
        "regression_6794c0d_sessions_left_behind_when_the_owner_is_reachable_again",
        plan,
    );
}

/// 05b4ae8: a member that joined the view but whose link is not up yet (or never comes up, as
/// with a wrong secret) must own nobody. Fails when view members count as reachable.
#[test]
fn regression_05b4ae8_a_member_without_a_link_owns_nobody() {
    let plan = Plan {
        nodes: 2,
        clients: 8,
        sends: 5,
        faults: vec![(500 * MS, Fault::Start(2)), (2 * S, Fault::Start(3))],
        busy_until: 5 * S,
        refuse_per_mille: 0,
    };
    scripted(
        "regression_05b4ae8_a_member_without_a_link_owns_nobody",
        plan,
    );
}
