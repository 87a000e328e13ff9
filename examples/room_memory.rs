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
}

fn main() {
    let args = Args::parse();
    let nodes: Vec<Arc<str>> = ["n1", "n2", "n3"].iter().map(|n| Arc::from(*n)).collect();
    let entries = args.rooms * args.members;
    // The names arrive from the network: each entry's uid is its own allocation, as in the
    // relay (a frame's strings are not interned).
    let before = LIVE.load(Ordering::Relaxed);
    let mut rooms = Table::default();
    for r in 0..args.rooms {
        let room: Arc<str> = Arc::from(format!("room-{r}").as_str());
        for m in 0..args.members {
            let uid: Arc<str> =
                Arc::from(format!("user-{:06}", (r * 7919 + m) % args.users).as_str());
            let told = Some(nodes[m % nodes.len()].clone());
            rooms.add(&room, &uid, told, usize::MAX, usize::MAX);
        }
    }
    let room_side = LIVE.load(Ordering::Relaxed) - before;
    let before = LIVE.load(Ordering::Relaxed);
    let mut users = Table::default();
    for r in 0..args.rooms {
        let room: Arc<str> = Arc::from(format!("room-{r}").as_str());
        for m in 0..args.members {
            let uid: Arc<str> =
                Arc::from(format!("user-{:06}", (r * 7919 + m) % args.users).as_str());
            let told = Some(nodes[r % nodes.len()].clone());
            users.add(&uid, &room, told, usize::MAX, usize::MAX);
        }
    }
    let user_side = LIVE.load(Ordering::Relaxed) - before;
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
    println!("{result:#}");
    println!("{result}");
}
