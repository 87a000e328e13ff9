//! Unit tests of the relay: one core at a time, fed by hand, no sockets and no sleeps.

use super::*;
use crate::engine::RoomTally;

fn t0() -> Instant {
    Instant::now()
}

fn view(ids: &[&str]) -> Arc<View> {
    Arc::new(View::for_test(ids))
}

fn relay(me: &str, cfg: RelayConfig) -> Relay {
    Relay::new(cfg, Arc::from(me), Arc::new(Metrics::new()))
}

fn drain(r: &mut Relay) -> Vec<Output> {
    std::iter::from_fn(|| r.poll_output()).collect()
}

/// A uid whose preference list starts with `order`, in `v`.
fn uid_with_preference(v: &View, order: &[&str]) -> String {
    (0..10_000)
        .map(|i| format!("user{i}"))
        .find(|u| {
            let pref = v.ring.preference(u);
            order.iter().zip(&pref).all(|(a, b)| *a == &**b)
        })
        .expect("some uid has that preference")
}

/// A uid whose preference list starts with `first`, in `v`.
fn uid_with_primary(v: &View, first: &str) -> String {
    (0..10_000)
        .map(|i| format!("user{i}"))
        .find(|u| v.ring.primary(u).is_some_and(|p| &**p == first))
        .expect("some uid lands there")
}

fn open(r: &mut Relay, now: Instant, session: SessionId, uid: &str, iat: u64) {
    let event = ClientEvent::Open {
        session,
        uid: Arc::from(uid),
        iat,
        revoked: false,
    };
    r.handle_client(now, event);
}

fn send(r: &mut Relay, now: Instant, session: SessionId, id: &str, to: &str) {
    let body: Body = Arc::from(serde_json::value::RawValue::from_string("{}".into()).unwrap());
    let event = ClientEvent::Send {
        transient: false,
        session,
        id: id.into(),
        to: to.into(),
        body,
        ts: 1,
    };
    r.handle_client(now, event);
}

fn peer_frames(out: &[Output]) -> Vec<(&str, &PeerFrame)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Peer { node, frame } => Some((&**node, frame)),
            _ => None,
        })
        .collect()
}

fn failed_reasons(out: &[Output]) -> Vec<FailReason> {
    out.iter()
        .filter_map(|o| match o {
            Output::Session {
                frame: ServerFrame::Failed { reason, .. },
                ..
            } => Some(*reason),
            _ => None,
        })
        .collect()
}

/// A member of the view whose link never came up owns nobody: its users are this node's.
#[test]
fn a_member_without_a_link_up_owns_nobody() {
    let now = t0();
    let v = view(&["n1", "n2"]);
    let mut r = relay("n1", RelayConfig::default());
    r.handle_view(now, v.clone());
    let theirs = uid_with_primary(&v, "n2");
    assert_eq!(r.route(&theirs), Route::Local);
    assert_eq!(&*r.owner(&theirs).unwrap().node, "n1");
    r.handle_link(now, LinkEvent::Up(Arc::from("n2")));
    assert_eq!(r.route(&theirs), Route::Remote(Arc::from("n2")));
}

/// A session opened after the view moved its user elsewhere is moved at once.
#[test]
fn a_session_of_a_user_owned_elsewhere_is_moved_on_open() {
    let now = t0();
    let v = view(&["n1", "n2"]);
    let theirs = uid_with_primary(&v, "n2");
    let mut r = relay("n1", RelayConfig::default());
    r.handle_view(now, v);
    r.handle_link(now, LinkEvent::Up(Arc::from("n2")));
    drain(&mut r);
    open(&mut r, now, 7, &theirs, 0);
    let out = drain(&mut r);
    assert!(
        matches!(&out[..], [Output::End { session: 7, end: SessionEnd::Moved(o) }] if &*o.node == "n2"),
        "{out:?}"
    );
    assert_eq!(r.status().sessions, 0);
}

/// Users kept here while their preferred peer was unreachable move to it when its link comes
/// up; users this node owns anyway stay.
#[test]
fn a_link_coming_up_hands_over_only_the_users_that_prefer_that_peer() {
    let now = t0();
    let v = view(&["n1", "n2", "n3"]);
    let theirs = uid_with_preference(&v, &["n2", "n1"]);
    let mine = uid_with_primary(&v, "n1");
    let mut r = relay("n1", RelayConfig::default());
    r.handle_view(now, v);
    r.handle_link(now, LinkEvent::Up(Arc::from("n3")));
    open(&mut r, now, 1, &theirs, 0);
    open(&mut r, now, 2, &mine, 0);
    drain(&mut r);
    assert_eq!(r.status().sessions, 2);
    assert_eq!(
        r.handover_index_len(),
        1,
        "filed under n2 for the hand-over"
    );
    r.handle_link(now, LinkEvent::Up(Arc::from("n2")));
    let out = drain(&mut r);
    let ended: Vec<SessionId> = out
        .iter()
        .filter_map(|o| match o {
            Output::End { session, .. } => Some(*session),
            _ => None,
        })
        .collect();
    assert_eq!(ended, vec![1], "{out:?}");
    assert_eq!(r.sessions(), vec![(2, Arc::from(mine.as_str()))]);
    // A link going down moves nobody away.
    r.handle_link(now, LinkEvent::Down(Arc::from("n3")));
    assert!(
        !drain(&mut r)
            .iter()
            .any(|o| matches!(o, Output::End { .. }))
    );
}

/// A forward in flight fails `unreachable` when its link goes down, and a refused frame fails
/// its forward at once.
#[test]
fn forwards_fail_when_their_link_goes_down_or_refuses_them() {
    let now = t0();
    let v = view(&["n1", "n2"]);
    let theirs = uid_with_primary(&v, "n2");
    let mine = uid_with_primary(&v, "n1");
    let mut r = relay("n1", RelayConfig::default());
    r.handle_view(now, v);
    r.handle_link(now, LinkEvent::Up(Arc::from("n2")));
    open(&mut r, now, 1, &mine, 0);
    drain(&mut r);
    send(&mut r, now, 1, "a", &theirs);
    let out = drain(&mut r);
    let frames = peer_frames(&out);
    assert!(matches!(
        frames[..],
        [("n2", PeerFrame::Deliver { hops: 0, .. })]
    ));
    assert_eq!(r.forward_count(), 1);
    r.handle_link(now, LinkEvent::Down(Arc::from("n2")));
    assert_eq!(
        failed_reasons(&drain(&mut r)),
        vec![FailReason::Unreachable]
    );
    assert_eq!(r.forward_count(), 0);

    r.handle_link(now, LinkEvent::Up(Arc::from("n2")));
    send(&mut r, now, 1, "b", &theirs);
    let out = drain(&mut r);
    let Some(Output::Peer { node, frame }) =
        out.into_iter().find(|o| matches!(o, Output::Peer { .. }))
    else {
        panic!("no forward");
    };
    r.handle_refused(now, &node, frame);
    assert_eq!(
        failed_reasons(&drain(&mut r)),
        vec![FailReason::Unreachable]
    );
    assert_eq!(r.forward_count(), 0);
}

/// Past `max_forwards`, a forward fails `rate_limited`; the table never grows past it.
#[test]
fn the_forward_table_is_bounded() {
    let now = t0();
    let v = view(&["n1", "n2"]);
    let theirs = uid_with_primary(&v, "n2");
    let mine = uid_with_primary(&v, "n1");
    let cfg = RelayConfig {
        max_forwards: 2,
        ..RelayConfig::default()
    };
    let mut r = relay("n1", cfg);
    r.handle_view(now, v);
    r.handle_link(now, LinkEvent::Up(Arc::from("n2")));
    open(&mut r, now, 1, &mine, 0);
    for id in ["a", "b", "c"] {
        send(&mut r, now, 1, id, &theirs);
    }
    let out = drain(&mut r);
    assert_eq!(peer_frames(&out).len(), 2);
    assert_eq!(failed_reasons(&out), vec![FailReason::RateLimited]);
    assert_eq!(r.forward_count(), 2);
}

/// A message from a peer for a user owned elsewhere is passed on at most twice, then kept here.
#[test]
fn the_hops_rule_stops_re_forwarding() {
    let now = t0();
    let v = view(&["n1", "n2", "n3"]);
    let theirs = uid_with_primary(&v, "n3");
    let mut r = relay("n1", RelayConfig::default());
    r.handle_view(now, v);
    for p in ["n2", "n3"] {
        r.handle_link(now, LinkEvent::Up(Arc::from(p)));
    }
    drain(&mut r);
    let deliver = |hops| PeerFrame::Deliver {
        tag: 9,
        hops,
        msg: WireMessage {
            from: "alice".into(),
            id: format!("m{hops}").into(),
            to: theirs.as_str().into(),
            body: "{}".into(),
            ts: 1,
        },
    };
    let from: NodeId = Arc::from("n2");
    r.handle_link(
        now,
        LinkEvent::Frame {
            from: from.clone(),
            frame: deliver(1),
        },
    );
    let out = drain(&mut r);
    assert!(matches!(
        peer_frames(&out)[..],
        [("n3", PeerFrame::Deliver { hops: 2, .. })]
    ));
    r.handle_link(
        now,
        LinkEvent::Frame {
            from,
            frame: deliver(2),
        },
    );
    assert!(peer_frames(&drain(&mut r)).is_empty(), "kept here");
    assert_eq!(r.status().deliveries, 1);
}

/// A presence question is answered by the peer asked (not another), once; one left unanswered
/// is given up by the sweep; past `max_requests` the answer is `Busy`.
#[test]
fn questions_to_peers_are_answered_once_swept_and_bounded() {
    let now = t0();
    let v = view(&["n1", "n2", "n3"]);
    let theirs = uid_with_primary(&v, "n2");
    let cfg = RelayConfig {
        max_requests: 2,
        ..RelayConfig::default()
    };
    let mut r = relay("n1", cfg);
    r.handle_view(now, v);
    for p in ["n2", "n3"] {
        r.handle_link(now, LinkEvent::Up(Arc::from(p)));
    }
    drain(&mut r);
    let a = r.presence(now, &theirs);
    let b = r.presence(now, &theirs);
    let c = r.presence(now, &theirs);
    let out = drain(&mut r);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Answer { req, answer: Answer::Busy } if *req == c))
    );
    assert_eq!(r.request_count(), 2);
    let answer = |req| PeerFrame::PresenceAnswer { req, sessions: 3 };
    r.handle_link(
        now,
        LinkEvent::Frame {
            from: Arc::from("n3"),
            frame: answer(a),
        },
    );
    assert!(
        drain(&mut r).is_empty(),
        "an answer from a peer not asked is ignored"
    );
    r.handle_link(
        now,
        LinkEvent::Frame {
            from: Arc::from("n2"),
            frame: answer(a),
        },
    );
    let out = drain(&mut r);
    assert!(matches!(
        out[..],
        [Output::Answer {
            answer: Answer::Sessions(3),
            ..
        }]
    ));
    r.handle_link(
        now,
        LinkEvent::Frame {
            from: Arc::from("n2"),
            frame: answer(a),
        },
    );
    assert!(drain(&mut r).is_empty(), "answered once");
    let later = now + ASK_TIMEOUT + SWEEP_EVERY * 2;
    r.handle_timeout(now + SWEEP_EVERY);
    r.handle_timeout(later);
    let out = drain(&mut r);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Answer { req, answer: Answer::Unanswered } if *req == b)),
        "{out:?}"
    );
    assert_eq!(r.request_count(), 0);
}

/// A kick closes the sessions whose token was issued up to it; a refresh moves a session past.
#[test]
fn kicks_close_sessions_by_token_age() {
    let now = t0();
    let v = view(&["n1"]);
    let mut r = relay("n1", RelayConfig::default());
    r.handle_view(now, v);
    open(&mut r, now, 1, "kim", 100);
    open(&mut r, now, 2, "kim", 100);
    open(&mut r, now, 3, "kim", 300);
    r.handle_client(
        now,
        ClientEvent::Refreshed {
            session: 2,
            iat: 250,
        },
    );
    drain(&mut r);
    let req = r.kick(now, "kim", 200);
    let out = drain(&mut r);
    assert!(out.iter().any(|o| matches!(
        o,
        Output::End {
            session: 1,
            end: SessionEnd::Closed(CloseReason::Kicked)
        }
    )));
    assert!(
        out.iter().any(
            |o| matches!(o, Output::Answer { req: q, answer: Answer::Sessions(1) } if *q == req)
        )
    );
    assert_eq!(r.status().sessions, 2);
}

/// A stalled session is closed as a slow consumer, once.
#[test]
fn a_stalled_session_is_closed_once() {
    let now = t0();
    let mut r = relay("n1", RelayConfig::default());
    r.handle_view(now, view(&["n1"]));
    open(&mut r, now, 1, "sam", 0);
    drain(&mut r);
    r.handle_client(now, ClientEvent::Stalled { session: 1 });
    r.handle_client(now, ClientEvent::Stalled { session: 1 });
    let out = drain(&mut r);
    assert_eq!(out.len(), 1, "{out:?}");
    assert!(matches!(
        out[0],
        Output::End {
            end: SessionEnd::Closed(CloseReason::SlowConsumer),
            ..
        }
    ));
}

/// A push answers its request with the outcome, and a full request table fails it
/// `rate_limited`.
#[test]
fn pushes_answer_their_request() {
    let now = t0();
    let cfg = RelayConfig {
        max_requests: 1,
        ..RelayConfig::default()
    };
    let mut r = relay("n1", cfg);
    r.handle_view(now, view(&["n1"]));
    open(&mut r, now, 1, "pat", 0);
    drain(&mut r);
    let msg = |id: &str| Message {
        transient: false,
        from: Arc::from("$system"),
        id: Arc::from(id),
        to: Arc::from("pat"),
        body: Arc::from(serde_json::value::RawValue::from_string("{}".into()).unwrap()),
        ts: 1,
        room: None,
        except: None,
    };
    let first = r.push(now, msg("p1"));
    let second = r.push(now, msg("p2"));
    let out = drain(&mut r);
    assert!(out.iter().any(|o| matches!(o, Output::Answer { req, answer: Answer::Outcome(Outcome::Failed(FailReason::RateLimited)) } if *req == second)));
    let seq = out
        .iter()
        .find_map(|o| match o {
            Output::Session {
                frame: ServerFrame::Msg { seq, .. },
                ..
            } => Some(*seq),
            _ => None,
        })
        .expect("pushed");
    r.handle_client(now, ClientEvent::Ack { session: 1, seq });
    let out = drain(&mut r);
    assert!(out.iter().any(|o| matches!(o, Output::Answer { req, answer: Answer::Outcome(Outcome::Delivered) } if *req == first)));
    assert_eq!(r.request_count(), 0);
}

// ----- rooms -------------------------------------------------------------------------------

fn body_of(s: &str) -> Body {
    Arc::from(serde_json::value::RawValue::from_string(s.into()).unwrap())
}

fn room_msg(from: &str, id: &str, room: &str) -> Message {
    Message {
        room: Some(Arc::from(room)),
        ..Message::direct(from, id, room, body_of("{\"big\":\"body\"}"), 1)
    }
}

/// The first `n` rooms (`room0`, `room1`, ...) whose ring key lands on `node` first.
fn rooms_on(v: &View, node: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("room{i}"))
        .filter(|r| {
            v.ring
                .primary(&crate::rooms::room_key(r))
                .is_some_and(|p| &**p == node)
        })
        .take(n)
        .collect()
}

/// A room whose ring key lands on `node` first.
fn room_on(v: &View, node: &str) -> String {
    rooms_on(v, node, 1).remove(0)
}

/// The first `n` uids (`u0`, `u1`, ...) whose preference list starts with `node`.
fn uids_on(v: &View, node: &str, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("u{i}"))
        .filter(|u| v.ring.primary(u).is_some_and(|p| &**p == node))
        .take(n)
        .collect()
}

/// A relay `me` of a cluster of `ids`, every link up.
fn cluster_relay(me: &str, ids: &[&str], cfg: RelayConfig) -> (Relay, Arc<View>) {
    let now = t0();
    let v = view(ids);
    let mut r = relay(me, cfg);
    r.handle_view(now, v.clone());
    for id in ids.iter().filter(|id| **id != me) {
        r.handle_link(now, LinkEvent::Up(Arc::from(*id)));
    }
    drain(&mut r);
    (r, v)
}

/// Members announced to the room's owner by their owners, as after a ring change.
fn announce(r: &mut Relay, now: Instant, v: &View, room: &str, uids: &[String]) {
    for uid in uids {
        let from = v.ring.primary(uid).unwrap().clone();
        let frame = PeerFrame::RoomSync {
            kind: crate::wire::SyncKind::ToRoomOwner,
            entries: vec![(Arc::from(room), Arc::from(uid.as_str()))],
        };
        r.handle_link(now, LinkEvent::Frame { from, frame });
    }
}

/// The room's owner sends ONE frame to each node with members (the body shared), delivers
/// its own members itself, and sums the nodes' tallies into one result.
#[test]
fn a_room_send_is_one_frame_per_node_and_one_result() {
    let now = t0();
    let (mut r, v) = cluster_relay("n1", &["n1", "n2", "n3"], RelayConfig::default());
    let room = room_on(&v, "n1");
    let uids: Vec<String> = (0..300).map(|i| format!("m{i}")).collect();
    announce(&mut r, now, &v, &room, &uids);
    drain(&mut r);
    assert_eq!(r.members_of(&room).len(), 300);
    let req = r.room_push(now, room_msg("$system", "p1", &room));
    let out = drain(&mut r);
    let frames = peer_frames(&out);
    let delivers: Vec<(&str, usize)> = frames
        .iter()
        .filter_map(|(n, f)| match f {
            PeerFrame::RoomDeliver { uids, .. } => Some((*n, uids.len())),
            _ => None,
        })
        .collect();
    let on = |n: &str| {
        uids.iter()
            .filter(|u| &**v.ring.primary(u).unwrap() == n)
            .count()
    };
    let mut expected = vec![("n2", on("n2")), ("n3", on("n3"))];
    expected.retain(|(_, k)| *k > 0);
    assert_eq!(delivers, expected, "one frame per node, with its members");
    assert_eq!(
        r.engine().deliveries_in_flight(),
        on("n1"),
        "local members here"
    );
    // The nodes answer; the local members are held, then offline.
    let tag = match frames[0].1 {
        PeerFrame::RoomDeliver { tag, .. } => *tag,
        _ => unreachable!(),
    };
    for (node, n) in &expected {
        let tally = RoomTally {
            members: *n as u32,
            delivered: *n as u32,
            ..RoomTally::default()
        };
        let frame = PeerFrame::RoomTally { tag, tally };
        r.handle_link(
            now,
            LinkEvent::Frame {
                from: Arc::from(*node),
                frame,
            },
        );
    }
    assert!(
        drain(&mut r).is_empty(),
        "not before the local members ended"
    );
    let later = now + r.config().engine.hold + Duration::from_millis(1);
    r.handle_timeout(later);
    let out = drain(&mut r);
    let answers: Vec<&Answer> = out
        .iter()
        .filter_map(|o| match o {
            Output::Answer { req: q, answer } if *q == req => Some(answer),
            _ => None,
        })
        .collect();
    let want = RoomTally {
        members: 300,
        delivered: (300 - on("n1")) as u32,
        offline: on("n1") as u32,
        failed: 0,
    };
    assert_eq!(answers, vec![&Answer::Room(RoomAnswer::Result(want))]);
}

/// A node's tally that never comes: its link going down counts its members failed, and the
/// result still comes, once.
#[test]
fn a_member_node_lost_mid_fan_out_counts_its_members_failed() {
    let now = t0();
    let (mut r, v) = cluster_relay("n1", &["n1", "n2"], RelayConfig::default());
    let room = room_on(&v, "n1");
    let theirs: Vec<String> = (0..50)
        .map(|i| format!("m{i}"))
        .filter(|u| &**v.ring.primary(u).unwrap() == "n2")
        .collect();
    announce(&mut r, now, &v, &room, &theirs);
    drain(&mut r);
    let req = r.room_push(now, room_msg("$system", "p1", &room));
    drain(&mut r);
    r.handle_link(now, LinkEvent::Down(Arc::from("n2")));
    let out = drain(&mut r);
    let n = theirs.len() as u32;
    assert!(out.iter().any(|o| matches!(o,
        Output::Answer { req: q, answer: Answer::Room(RoomAnswer::Result(t)) }
            if *q == req && t.members == n && t.failed == n)));
}

/// After the room's owner dies, the member's owner announces its memberships to the new
/// owner, at no more than `room_sync_per_second`, and all of them in the end.
#[test]
fn memberships_are_reannounced_to_a_new_owner_at_a_bounded_rate() {
    let cfg = RelayConfig {
        room_sync_per_second: 2000,
        ..RelayConfig::default()
    };
    let now = t0();
    let (mut r, v) = cluster_relay("n1", &["n1", "n2", "n3"], cfg);
    // Users of n1 in rooms of n2, each joined through n2.
    let users = uids_on(&v, "n1", 500);
    let rooms = rooms_on(&v, "n2", 20);
    for (i, uid) in users.iter().enumerate() {
        r.handle_client(
            now,
            ClientEvent::Open {
                session: i as u64 + 1,
                uid: Arc::from(uid.as_str()),
                iat: 0,
                revoked: false,
            },
        );
        for room in &rooms {
            r.handle_client(
                now,
                ClientEvent::Join {
                    session: i as u64 + 1,
                    room: room.clone(),
                    id: None,
                    join: true,
                },
            );
        }
    }
    // n2 accepts every join.
    for o in drain(&mut r) {
        if let Output::Peer {
            frame: PeerFrame::RoomJoin { req, .. },
            ..
        } = o
        {
            let frame = PeerFrame::RoomReply {
                req,
                answer: RoomAnswer::Joined(1),
            };
            r.handle_link(
                now,
                LinkEvent::Frame {
                    from: Arc::from("n2"),
                    frame,
                },
            );
        }
    }
    drain(&mut r);
    let total = users.len() * rooms.len();
    assert_eq!(r.membership_counts().1, total);
    // n2 dies: its rooms go to n1 or n3.
    r.handle_view(now, view(&["n1", "n3"]));
    let mut sent = HashMap::new();
    let mut by_second = Vec::new();
    for step in 0..200 {
        r.handle_timeout(now + Duration::from_millis(50 * step));
        let mut n = 0;
        for o in drain(&mut r) {
            if let Output::Peer {
                node,
                frame: PeerFrame::RoomSync { entries, kind },
            } = o
            {
                assert_eq!(&*node, "n3");
                *sent.entry(kind).or_insert(0usize) += entries.len();
                n += entries.len();
            }
        }
        by_second.push(n);
    }
    let to_n3 = rooms
        .iter()
        .filter(|x| {
            &**view(&["n1", "n3"])
                .ring
                .primary(&crate::rooms::room_key(x))
                .unwrap()
                == "n3"
        })
        .count()
        * users.len();
    use crate::wire::SyncKind;
    assert_eq!(
        sent.get(&SyncKind::ToRoomOwner).copied().unwrap_or(0),
        to_n3,
        "every membership of a room now on n3 is announced once"
    );
    assert_eq!(
        sent.get(&SyncKind::Backup).copied().unwrap_or(0),
        total - to_n3,
        "rooms taken over here are copied to their successor, n3"
    );
    // Never more than the burst (a tenth of the rate, or a frame) plus the rate per second.
    for w in by_second.windows(20) {
        let s: usize = w.iter().sum();
        assert!(s <= 2000 + 1024, "{s} in one second");
    }

    // Rooms now on n1 itself are taken in here (and copied to their successor n3).
    assert_eq!(r.membership_counts().0, total - to_n3);
    assert_eq!(r.status().rooms, 0, "nothing left to announce");
}

/// A user this node does not know as a member of a room (the re-announcement after a ring
/// change is on its way) may still send: the room's owner decides, and its `Result` teaches
/// this node the membership.
#[test]
fn an_unknown_membership_is_checked_by_the_rooms_owner() {
    let now = t0();
    let (mut r, v) = cluster_relay("n1", &["n1", "n2"], RelayConfig::default());
    let uid = uid_with_primary(&v, "n1");
    let room = room_on(&v, "n2");
    open(&mut r, now, 1, &uid, 0);
    drain(&mut r);
    r.handle_client(
        now,
        ClientEvent::RoomSend {
            session: 1,
            id: "s1".into(),
            room: room.clone(),
            body: body_of("1"),
            ts: 1,
            transient: false,
        },
    );
    let out = drain(&mut r);
    let req = match peer_frames(&out)[..] {
        [("n2", PeerFrame::RoomSend { req, vouched, .. })] => {
            assert!(!vouched, "not vouched for");
            *req
        }
        ref other => panic!("{other:?}"),
    };
    assert!(r.rooms_of(&uid).is_empty());
    let tally = RoomTally {
        members: 2,
        delivered: 2,
        ..RoomTally::default()
    };
    let frame = PeerFrame::RoomReply {
        req,
        answer: RoomAnswer::Result(tally),
    };
    r.handle_link(
        now,
        LinkEvent::Frame {
            from: Arc::from("n2"),
            frame,
        },
    );
    assert_eq!(r.rooms_of(&uid), vec![Arc::<str>::from(room.as_str())]);
    let out = drain(&mut r);
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Session {
            session: 1,
            frame: ServerFrame::RoomResult { delivered: 2, .. }
        }
    )));
}

/// A room message to many members holds ONE body: every member's delivery shares it, and the
/// engine's byte bound counts it once (a 64 KiB body to 10 000 members is 64 KiB, not 640 MiB).
#[test]
fn a_room_message_shares_one_body_among_its_members() {
    let now = t0();
    let mut cfg = RelayConfig {
        max_room_memberships: 20_000,
        ..RelayConfig::default()
    };
    // Room for the one body, not for two.
    cfg.engine.max_held_bytes = 100 * 1024;
    let mut r = relay("n1", cfg);
    r.handle_view(now, view(&["n1"]));
    for i in 0..10_000 {
        r.room_member(now, "big", &format!("m{i}"), true);
    }
    drain(&mut r);
    assert_eq!(r.members_of("big").len(), 10_000);
    let body = body_of(&format!("\"{}\"", "x".repeat(64 * 1024 - 2)));
    let msg = Message {
        room: Some(Arc::from("big")),
        ..Message::direct("$system", "p1", "big", body.clone(), 1)
    };
    r.room_push(now, msg);
    drain(&mut r);
    // Nobody is online: every member's delivery is held, each with the same body.
    assert_eq!(r.engine().deliveries_in_flight(), 10_000);
    assert!(
        Arc::strong_count(&body) > 10_000,
        "{}",
        Arc::strong_count(&body)
    );
    assert_eq!(r.engine().delivery_bytes(), 64 * 1024);
    // When the holds end, the body is released once.
    r.handle_timeout(now + r.config().engine.hold + Duration::from_millis(1));
    drain(&mut r);
    assert_eq!(r.engine().delivery_bytes(), 0);
    assert_eq!(Arc::strong_count(&body), 1);
}

/// The walk after a view change goes a slice at a time (the driver serves messages between
/// slices), and still reaches every membership.
#[test]
fn the_walk_after_a_view_change_goes_in_slices() {
    let now = t0();
    let cfg = RelayConfig {
        room_sync_per_second: 1_000_000,
        ..RelayConfig::default()
    };
    let (mut r, v) = cluster_relay("n1", &["n1", "n2", "n3"], cfg);
    let users = uids_on(&v, "n1", 700);
    let rooms = rooms_on(&v, "n2", 100);
    // n2, the rooms' owner, told n1 of its users' memberships.
    for room in &rooms {
        let entries = users
            .iter()
            .map(|u| (Arc::from(room.as_str()), Arc::from(u.as_str())))
            .collect();
        let frame = PeerFrame::RoomSync {
            kind: crate::wire::SyncKind::ToMemberOwner,
            entries,
        };
        r.handle_link(
            now,
            LinkEvent::Frame {
                from: Arc::from("n2"),
                frame,
            },
        );
    }
    drain(&mut r);
    let total = users.len() * rooms.len();
    assert_eq!(r.membership_counts().1, total);
    assert!(total > 3 * room_core::WALK_SLICE, "more than a few slices");
    r.handle_view(now, view(&["n1", "n3"]));
    let t = now + Duration::from_millis(150);
    r.handle_timeout(t);
    // One slice done, more to come, due at once (after whatever input waits).
    assert!(r.status().rooms > 0);
    assert_eq!(r.next_deadline(), Some(t));
    let mut turns = 1;
    let mut announced = 0;
    for step in 0..1000 {
        announced += drain(&mut r)
            .iter()
            .filter_map(|o| match o {
                Output::Peer {
                    frame: PeerFrame::RoomSync { entries, .. },
                    ..
                } => Some(entries.len()),
                _ => None,
            })
            .sum::<usize>();
        if r.status().rooms == 0 {
            break;
        }
        r.handle_timeout(t + Duration::from_millis(50 * step));
        turns += 1;
    }
    assert!(turns > 3, "{turns} turns");
    // Each membership went to n3 (its room's owner now) or, for rooms now owned here, to the
    // room's successor.
    assert_eq!(announced, total);
}
