//! Memory of room memberships, measured with a counting allocator.
//!
//! ```text
//! cargo run --release --example room_memory -- --rooms 1000 --members 1000
//! ```
//! Builds the membership tables of one node (`imgate::rooms::Table`) as the relay keeps them:
//! the room owner's side (room -> uid -> the member's owner last told) and the user owner's
//! side (uid -> room -> the room's owner last told), with uids like `user-123456` shared by
//! nothing else, and reports the bytes allocated per `(user, room)` on each side next to the
//! estimate the `imgate_room_state_bytes` gauge uses. Target: at most 200 bytes per
//! `(user, room)` on the room owner's side.
//!
//! With `--walk N`, it also times what a view change costs a node that keeps N memberships as
//! rooms' owner: the walk of its tables that looks for entries to hand over or announce. It
//! runs on the node's driver in slices of 20 000 entries, messages being served in between:
//! the longest slice is how long a message can wait behind it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use clap::Parser;
use imgate::rooms::Table;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[derive(Parser)]
struct Args {
    /// Rooms.
    #[arg(long, default_value_t = 1000)]
    rooms: usize,
    /// Members per room.
    #[arg(long, default_value_t = 1000)]
    members: usize,
    /// Distinct users the members are drawn from.
    #[arg(long, default_value_t = 100_000)]
    users: usize,
    /// Also time a view change's walk over this many memberships (0: do not).
    #[arg(long, default_value_t = 0)]
    walk: usize,
}

/// A relay `n1` of three nodes owning `n` memberships as rooms' owner (told by their users'
/// owners), then the time one walk over them takes after a view change that moves nothing.
fn time_walk(n: usize) -> (usize, std::time::Duration, std::time::Duration) {
    use imgate::relay::{LinkEvent, Relay, RelayConfig};
    use imgate::wire::{PeerFrame, SyncKind};
    let now = std::time::Instant::now();
    let cfg = RelayConfig {
        max_room_memberships: n + 1,
        ..RelayConfig::default()
    };
    let mut r = Relay::new(
        cfg,
        Arc::from("n1"),
        Arc::new(imgate::metrics::Metrics::new()),
    );
    let view = Arc::new(imgate::view::View::for_test(&["n1", "n2", "n3"]));
    r.handle_view(now, view.clone());
    for peer in ["n2", "n3"] {
        r.handle_link(now, LinkEvent::Up(Arc::from(peer)));
    }
    let mine: Vec<String> = (0..)
        .map(|i| format!("room-{i}"))
        .filter(|room| {
            view.ring
                .primary(&imgate::rooms::room_key(room))
                .is_some_and(|p| &**p == "n1")
        })
        .take(n.div_ceil(1000))
        .collect();
    let mut added = 0;
    'rooms: for room in &mine {
        for m in 0..1000 {
            if added == n {
                break 'rooms;
            }
            let uid = format!("user-{:07}", added);
            let from = view.ring.primary(&uid).expect("an owner").clone();
            if &*from == "n1" {
                added += 1;
                continue;
            }
            let _ = m;
            let frame = PeerFrame::RoomSync {
                kind: SyncKind::ToRoomOwner,
                entries: vec![(Arc::from(room.as_str()), Arc::from(uid.as_str()))],
            };
            r.handle_link(now, LinkEvent::Frame { from, frame });
            added += 1;
        }
    }
    while r.poll_output().is_some() {}
    let kept = r.membership_counts().0;
    // The same view again: nothing moves, but every entry is looked at.
    let later = now + std::time::Duration::from_secs(1);
    r.handle_view(later, view);
    // The walk runs 100 ms after the change; the sweep's timer may come first.
    let due = later + std::time::Duration::from_millis(200);
    r.handle_timeout(later);
    while r.poll_output().is_some() {}
    // Slice after slice (the driver serves messages in between), until the walk is done.
    let (mut total, mut longest) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    for _ in 0..100_000 {
        let started = std::time::Instant::now();
        r.handle_timeout(due);
        let took = started.elapsed();
        total += took;
        longest = longest.max(took);
        while r.poll_output().is_some() {}
        if r.room_work() == 0 {
            break;
        }
    }
    (kept, total, longest)
}

/// One side's table of every membership, and the bytes it allocated: keyed by room (the room
/// owner's side, told the member's owner) or by uid (the user owner's side, told the room's
/// owner). The names arrive from the network: each entry's strings are their own allocations,
/// as in the relay (a frame's strings are not interned).
fn build(args: &Args, nodes: &[Arc<str>], room_side: bool) -> (Table, isize) {
    let before = LIVE.load(Ordering::Relaxed);
    let mut table = Table::default();
    for r in 0..args.rooms {
        let room: Arc<str> = Arc::from(format!("room-{r}").as_str());
        for m in 0..args.members {
            let uid: Arc<str> =
                Arc::from(format!("user-{:06}", (r * 7919 + m) % args.users).as_str());
            if room_side {
                let told = Some(nodes[m % nodes.len()].clone());
                table.add(&room, &uid, told, usize::MAX, usize::MAX);
            } else {
                let told = Some(nodes[r % nodes.len()].clone());
                table.add(&uid, &room, told, usize::MAX, usize::MAX);
            }
        }
    }
    (table, LIVE.load(Ordering::Relaxed) - before)
}

fn main() {
    let args = Args::parse();
    let nodes: Vec<Arc<str>> = ["n1", "n2", "n3"].iter().map(|n| Arc::from(*n)).collect();
    let entries = args.rooms * args.members;
    let (rooms, room_side) = build(&args, &nodes, true);
    let (users, user_side) = build(&args, &nodes, false);
    let per = |bytes: isize, n: usize| bytes as f64 / n as f64;
    let result = serde_json::json!({
        "scenario": "room_memory",
        "rooms": args.rooms,
        "members_per_room": args.members,
        "memberships_room_side": rooms.len(),
        "memberships_user_side": users.len(),
        "bytes_per_membership_room_side": (per(room_side, rooms.len()) * 10.0).round() / 10.0,
        "bytes_per_membership_user_side": (per(user_side, users.len()) * 10.0).round() / 10.0,
        "gauge_estimate_per_membership_room_side": (per(rooms.bytes() as isize, rooms.len()) * 10.0).round() / 10.0,
        "gauge_estimate_per_membership_user_side": (per(users.bytes() as isize, users.len()) * 10.0).round() / 10.0,
                "entries": entries,
    });
    let mut result = result;
    if args.walk > 0 {
        let (kept, total, longest) = time_walk(args.walk);
        let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
        result["walk_memberships"] = serde_json::json!(kept);
        result["walk_ms"] = serde_json::json!(ms(total));
        result["walk_longest_slice_ms"] = serde_json::json!(ms(longest));
    }
    println!("{result:#}");
    println!("{result}");
}
