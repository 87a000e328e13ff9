//! Unit tests of the delivery rules, with fabricated time: no IO, no sleeping.

use super::*;
use serde_json::value::RawValue;

fn body(text: &str) -> Body {
    Arc::from(RawValue::from_string(format!("\"{text}\"")).unwrap())
}

fn test_cfg() -> EngineConfig {
    EngineConfig {
        ack_timeout: Duration::from_millis(1000),
        max_retries: 3,
        hold: Duration::from_millis(5000),
        dedup_window: Duration::from_secs(300),
        max_dedup_entries: 1000,
        max_held_per_user: 100,
        max_deliveries: 10_000,
        max_held_bytes: 1 << 30,
        max_inflight_per_session: 256,
        sends_per_second: 1000,
        max_unacked_per_session: 1000,
        max_sessions_per_user: 16,
        report_offline: true,
    }
}

struct Harness {
    engine: Engine,
    now: Instant,
    out: Vec<Action>,
}

impl Harness {
    fn new() -> Harness {
        Harness::with(test_cfg())
    }

    fn with(cfg: EngineConfig) -> Harness {
        Harness {
            engine: Engine::new(cfg, Arc::new(Metrics::new())),
            now: Instant::now(),
            out: Vec::new(),
        }
    }

    fn open(&mut self, s: SessionId, uid: &str) -> Vec<String> {
        self.engine.open_session(self.now, s, uid, &mut self.out);
        self.take()
    }

    fn close(&mut self, s: SessionId) -> Vec<String> {
        self.engine.close_session(self.now, s, &mut self.out);
        self.take()
    }

    fn send(&mut self, s: SessionId, id: &str, to: &str) -> Vec<String> {
        self.send_routed(s, id, to, Route::Local)
    }

    fn send_routed(&mut self, s: SessionId, id: &str, to: &str, route: Route) -> Vec<String> {
        self.engine.send(
            self.now,
            s,
            id,
            to,
            body(id),
            42,
            false,
            route,
            &mut self.out,
        );
        self.take()
    }

    fn send_transient(&mut self, s: SessionId, id: &str, to: &str) -> Vec<String> {
        self.engine.send(
            self.now,
            s,
            id,
            to,
            body(id),
            42,
            true,
            Route::Local,
            &mut self.out,
        );
        self.take()
    }

    fn ack(&mut self, s: SessionId, seq: u64) -> Vec<String> {
        self.engine.ack(self.now, s, seq, &mut self.out);
        self.take()
    }

    fn deliver(&mut self, from: &str, id: &str, to: &str, waiter: Waiter) -> Vec<String> {
        self.deliver_as(from, id, to, waiter, false)
    }

    fn deliver_as(
        &mut self,
        from: &str,
        id: &str,
        to: &str,
        waiter: Waiter,
        transient: bool,
    ) -> Vec<String> {
        let msg = Message {
            from: from.into(),
            id: id.into(),
            to: to.into(),
            body: body(id),
            ts: 7,
            transient,
            room: None,
            except: None,
        };
        self.engine.deliver(self.now, msg, waiter, &mut self.out);
        self.take()
    }

    /// Moves time forward by `ms`, running every timer on its own deadline.
    fn advance(&mut self, ms: u64) -> Vec<String> {
        let target = self.now + Duration::from_millis(ms);
        while let Some(at) = self.engine.next_deadline() {
            if at > target {
                break;
            }
            self.now = self.now.max(at);
            self.engine.tick(self.now, &mut self.out);
        }
        self.now = target;
        self.take()
    }

    fn take(&mut self) -> Vec<String> {
        self.out.drain(..).map(|a| describe(&a)).collect()
    }
}

fn describe(a: &Action) -> String {
    match a {
        Action::Push { session, frame } => match frame {
            ServerFrame::Msg { seq, from, id, .. } => format!("s{session} msg {seq} {from} {id}"),
            ServerFrame::Delivered { id, to } => format!("s{session} delivered {id} {to}"),
            ServerFrame::Failed { id, reason, .. } => {
                format!("s{session} failed {id} {}", reason.as_str())
            }
            other => format!("s{session} {other:?}"),
        },
        Action::Close { session, reason } => format!("close s{session} {reason:?}"),
        Action::Report {
            waiter,
            id,
            outcome,
            ..
        } => format!("report {waiter:?} {id} {outcome:?}"),
        Action::Forward { node, session, msg } => format!("forward {node} s{session} {}", msg.id),
    }
}

#[test]
fn send_push_ack_delivered() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.open(2, "bob");
    assert_eq!(h.send(1, "m1", "bob"), ["s2 msg 1 alice m1"]);
    assert_eq!(h.send(1, "m2", "bob"), ["s2 msg 2 alice m2"]);
    assert_eq!(h.ack(2, 1), ["s1 delivered m1 bob"]);
    assert_eq!(h.ack(2, 2), ["s1 delivered m2 bob"]);
    assert_eq!(h.engine.deliveries_in_flight(), 0);
}

#[test]
fn retries_with_same_seq_then_timeout() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.open(2, "bob");
    h.send(1, "m1", "bob");
    assert!(h.advance(999).is_empty());
    assert_eq!(h.advance(1), ["s2 msg 1 alice m1"]);
    assert_eq!(h.advance(1000), ["s2 msg 1 alice m1"]);
    assert_eq!(h.advance(1000), ["s2 msg 1 alice m1"]);
    // Three retries done: the fourth deadline fails the send (4 s after the first push).
    assert_eq!(h.advance(1000), ["s1 failed m1 timeout"]);
    assert!(h.advance(10_000).is_empty());
    // A late ack is ignored.
    assert!(h.ack(2, 1).is_empty());
}

#[test]
fn ack_after_a_retry_delivers_once() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.open(2, "bob");
    h.send(1, "m1", "bob");
    h.advance(1000);
    assert_eq!(h.ack(2, 1), ["s1 delivered m1 bob"]);
    assert!(h.ack(2, 1).is_empty(), "duplicate ack is ignored");
    assert!(h.advance(10_000).is_empty(), "no retry after the ack");
}

#[test]
fn unknown_ack_is_ignored() {
    let mut h = Harness::new();
    h.open(2, "bob");
    assert!(h.ack(2, 99).is_empty());
    assert!(h.ack(7, 1).is_empty());
}

#[test]
fn offline_then_held_until_a_session_appears() {
    let mut h = Harness::new();
    h.open(1, "alice");
    assert!(h.send(1, "m1", "bob").is_empty());
    assert!(h.advance(4000).is_empty());
    assert_eq!(h.open(2, "bob"), ["s2 msg 1 alice m1"]);
    assert_eq!(h.ack(2, 1), ["s1 delivered m1 bob"]);
}

#[test]
fn offline_fails_after_hold() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.send(1, "m1", "bob");
    assert!(h.advance(4999).is_empty());
    assert_eq!(h.advance(1), ["s1 failed m1 offline"]);
    // Nothing left for a later session.
    assert!(h.open(2, "bob").is_empty());
    assert_eq!(h.engine.deliveries_in_flight(), 0);
}

#[test]
fn held_messages_keep_their_order() {
    let mut h = Harness::new();
    h.open(1, "alice");
    for i in 0..5 {
        h.send(1, &format!("m{i}"), "bob");
    }
    let pushed = h.open(2, "bob");
    let expected: Vec<String> = (0..5)
        .map(|i| format!("s2 msg {} alice m{i}", i + 1))
        .collect();
    assert_eq!(pushed, expected);
}

#[test]
fn hold_is_bounded_per_user() {
    let mut cfg = test_cfg();
    cfg.max_held_per_user = 2;
    let mut h = Harness::with(cfg);
    h.open(1, "alice");
    assert!(h.send(1, "a", "bob").is_empty());
    assert!(h.send(1, "b", "bob").is_empty());
    assert_eq!(h.send(1, "c", "bob"), ["s1 failed c offline"]);
}

#[test]
fn duplicate_in_flight_gets_the_same_outcome_once_delivered() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.open(2, "bob");
    assert_eq!(h.send(1, "m1", "bob"), ["s2 msg 1 alice m1"]);
    assert!(h.send(1, "m1", "bob").is_empty(), "not pushed again");
    assert_eq!(
        h.ack(2, 1),
        ["s1 delivered m1 bob", "s1 delivered m1 bob"],
        "both sends end"
    );
    // Nothing of m1 is left in flight for alice: a late outcome for it reaches no one.
    h.engine
        .outcome(1, "m1", "bob", Outcome::Delivered, &mut h.out);
    assert!(h.take().is_empty(), "no third outcome");
}

#[test]
fn duplicates_in_flight_join_up_to_a_bound() {
    let mut cfg = test_cfg();
    cfg.max_sessions_per_user = 1000;
    let mut h = Harness::with(cfg);
    h.open(2, "bob");
    // Senders from many sessions (the per-session bound is not what is tested here).
    let joiners = MAX_WAITERS + 1;
    for s in 0..joiners as u64 {
        h.open(10 + s, "alice");
    }
    assert_eq!(h.send(10, "m1", "bob"), ["s2 msg 1 alice m1"]);
    for s in 1..MAX_WAITERS as u64 {
        assert!(h.send(10 + s, "m1", "bob").is_empty(), "joins the delivery");
    }
    let last = 10 + MAX_WAITERS as u64;
    assert_eq!(
        h.send(last, "m1", "bob"),
        [format!("s{last} failed m1 rate_limited")],
        "one waiter too many"
    );
    assert_eq!(h.ack(2, 1).len(), MAX_WAITERS, "every joined send ends");
}

#[test]
fn duplicate_after_delivered_is_answered_from_the_window() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.open(2, "bob");
    h.send(1, "m1", "bob");
    h.ack(2, 1);
    assert_eq!(h.engine.dedup_len(), 1);
    // Time passes within the window (timers run): still answered from it.
    assert!(h.advance(1000).is_empty());
    assert_eq!(h.send(1, "m1", "bob"), ["s1 delivered m1 bob"]);
    // Another session of alice (ids are per user) is answered the same way.
    h.open(3, "alice");
    assert_eq!(h.send(3, "m1", "bob"), ["s3 delivered m1 bob"]);
    // After the window the id is new again.
    h.advance(300_000);
    assert_eq!(h.send(1, "m1", "bob"), ["s2 msg 2 alice m1"]);
}

#[test]
fn an_id_reused_for_another_recipient_is_a_new_message() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.open(2, "bob");
    h.open(3, "carol");
    // In flight to bob: the same id to carol is not a duplicate of it.
    assert_eq!(h.send(1, "m1", "bob"), ["s2 msg 1 alice m1"]);
    assert_eq!(h.send(1, "m1", "carol"), ["s3 msg 1 alice m1"]);
    assert_eq!(h.ack(3, 1), ["s1 delivered m1 carol"]);
    assert_eq!(h.ack(2, 1), ["s1 delivered m1 bob"]);
    // Delivered to bob and carol: the same id to dave is not answered from the window.
    h.open(4, "dave");
    assert_eq!(h.send(1, "m1", "dave"), ["s4 msg 1 alice m1"]);
    assert_eq!(h.ack(4, 1), ["s1 delivered m1 dave"]);
    // While a repeat to bob still is.
    assert_eq!(h.send(1, "m1", "bob"), ["s1 delivered m1 bob"]);
}

#[test]
fn after_failed_the_same_id_is_a_new_attempt() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.send(1, "m1", "bob");
    assert_eq!(h.advance(5000), ["s1 failed m1 offline"]);
    h.open(2, "bob");
    assert_eq!(h.send(1, "m1", "bob"), ["s2 msg 1 alice m1"]);
    assert_eq!(h.ack(2, 1), ["s1 delivered m1 bob"]);
}

#[test]
fn dedup_window_is_bounded() {
    let mut cfg = test_cfg();
    cfg.max_dedup_entries = 3;
    let mut h = Harness::with(cfg);
    h.open(1, "alice");
    h.open(2, "bob");
    for (i, id) in ["a", "b", "c", "d", "e"].iter().enumerate() {
        h.send(1, id, "bob");
        h.ack(2, i as u64 + 1);
    }
    assert_eq!(h.engine.dedup_len(), 3, "exactly the bound");
    // The newest three are still remembered, the oldest are not.
    assert_eq!(h.send(1, "c", "bob"), ["s1 delivered c bob"]);
    assert_eq!(h.send(1, "e", "bob"), ["s1 delivered e bob"]);
    assert_eq!(h.send(1, "a", "bob"), ["s2 msg 6 alice a"]);
}

/// Alice (s1) sends m1 to bob, who has two sessions (s2, s3): each gets it as its seq 1.
fn fanned_out() -> Harness {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.open(2, "bob");
    h.open(3, "bob");
    assert_eq!(
        h.send(1, "m1", "bob"),
        ["s2 msg 1 alice m1", "s3 msg 1 alice m1"]
    );
    h
}

#[test]
fn fan_out_to_every_session_and_one_delivered() {
    let mut h = fanned_out();
    assert_eq!((h.engine.unacked(2), h.engine.unacked(3)), (1, 1));
    assert_eq!(h.ack(3, 1), ["s1 delivered m1 bob"]);
    assert_eq!(
        (h.engine.unacked(2), h.engine.unacked(3)),
        (0, 0),
        "the other session's push ends with the delivery"
    );
    assert!(h.ack(2, 1).is_empty(), "second ack is ignored");
    assert!(
        h.advance(10_000).is_empty(),
        "the other session is not retried"
    );
}

#[test]
fn fan_out_times_out_only_when_every_session_did() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.open(2, "bob");
    h.send(1, "m1", "bob");
    h.advance(500);
    h.open(3, "bob"); // opened after the push: it does not get m1
    let out = h.advance(3500);
    assert_eq!(out.len(), 4, "{out:?}");
    assert_eq!(out[3], "s1 failed m1 timeout");
}

#[test]
fn send_to_oneself_reaches_every_own_session() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.open(2, "alice");
    assert_eq!(
        h.send(1, "m1", "alice"),
        ["s1 msg 1 alice m1", "s2 msg 1 alice m1"]
    );
    assert_eq!(h.ack(1, 1), ["s1 delivered m1 alice"]);
}

#[test]
fn order_per_sender_and_recipient() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.open(2, "bob");
    let mut pushed = Vec::new();
    for i in 0..100 {
        pushed.extend(h.send(1, &format!("m{i}"), "bob"));
    }
    let expected: Vec<String> = (0..100)
        .map(|i| format!("s2 msg {} alice m{i}", i + 1))
        .collect();
    assert_eq!(pushed, expected);
}

#[test]
fn closed_session_hands_unacked_to_other_sessions() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.open(2, "bob");
    h.send(1, "m1", "bob");
    h.open(3, "bob");
    assert_eq!(h.close(2), ["s3 msg 1 alice m1"]);
    assert_eq!(h.ack(3, 1), ["s1 delivered m1 bob"]);
}

#[test]
fn closed_session_unacked_is_held_then_redelivered() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.open(2, "bob");
    h.send(1, "m1", "bob");
    h.send(1, "m2", "bob");
    assert!(h.close(2).is_empty(), "held, not dropped, not failed yet");
    assert_eq!(h.open(4, "bob"), ["s4 msg 1 alice m1", "s4 msg 2 alice m2"]);
    assert_eq!(h.ack(4, 2), ["s1 delivered m2 bob"]);
    assert_eq!(h.ack(4, 1), ["s1 delivered m1 bob"]);
}

#[test]
fn closed_session_unacked_fails_offline_when_nobody_comes() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.open(2, "bob");
    h.send(1, "m1", "bob");
    h.close(2);
    assert_eq!(h.advance(5000), ["s1 failed m1 offline"]);
}

#[test]
fn a_message_is_placed_a_bounded_number_of_times() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.send(1, "m1", "bob");
    let mut outcome = Vec::new();
    for s in 10..20 {
        let pushed = h.open(s, "bob");
        outcome = h.close(s);
        if !outcome.is_empty() {
            assert!(pushed.len() == 1);
            break;
        }
    }
    assert_eq!(outcome, ["s1 failed m1 timeout"]);
}

#[test]
fn sender_gone_gets_no_frame() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.open(2, "bob");
    h.send(1, "m1", "bob");
    h.close(1);
    assert!(h.ack(2, 1).is_empty());
    assert_eq!(h.engine.deliveries_in_flight(), 0);
}

#[test]
fn rate_limit_refuses_with_failed() {
    let mut cfg = test_cfg();
    cfg.sends_per_second = 3;
    let mut h = Harness::with(cfg);
    h.open(1, "alice");
    h.open(2, "bob");
    for i in 0..3 {
        assert_eq!(h.send(1, &format!("m{i}"), "bob").len(), 1);
    }
    assert_eq!(h.send(1, "m3", "bob"), ["s1 failed m3 rate_limited"]);
    h.advance(1000);
    assert_eq!(h.send(1, "m4", "bob"), ["s2 msg 4 alice m4"]);
}

#[test]
fn inflight_bound_refuses_with_failed() {
    let mut cfg = test_cfg();
    cfg.max_inflight_per_session = 2;
    let mut h = Harness::with(cfg);
    h.open(1, "alice");
    h.open(2, "bob");
    h.send(1, "a", "bob");
    h.send(1, "b", "bob");
    assert_eq!(h.send(1, "c", "bob"), ["s1 failed c rate_limited"]);
    // An outcome frees a place.
    assert_eq!(h.ack(2, 1), ["s1 delivered a bob"]);
    assert_eq!(h.send(1, "d", "bob"), ["s2 msg 3 alice d"]);
    assert_eq!(h.send(1, "e", "bob"), ["s1 failed e rate_limited"]);
}

#[test]
fn node_wide_delivery_bound() {
    let mut cfg = test_cfg();
    cfg.max_deliveries = 2;
    let mut h = Harness::with(cfg);
    h.open(1, "alice");
    h.send(1, "a", "bob");
    h.send(1, "b", "bob");
    assert_eq!(h.send(1, "c", "bob"), ["s1 failed c rate_limited"]);
}

#[test]
fn node_wide_byte_bound_counts_pushed_and_held_bodies() {
    // Bodies are the ids as JSON strings: `"a"` is 3 bytes.
    let mut cfg = test_cfg();
    cfg.max_held_bytes = 6;
    let mut h = Harness::with(cfg);
    h.open(1, "alice");
    h.open(2, "bob");
    assert_eq!(h.send(1, "a", "bob"), ["s2 msg 1 alice a"]);
    // Held for an offline user: counted too.
    assert!(h.send(1, "b", "carol").is_empty());
    assert_eq!(h.engine.delivery_bytes(), 6);
    assert_eq!(h.send(1, "c", "bob"), ["s1 failed c rate_limited"]);
    // An ack frees the bytes of its message...
    assert_eq!(h.ack(2, 1), ["s1 delivered a bob"]);
    assert_eq!(h.engine.delivery_bytes(), 3);
    assert_eq!(h.send(1, "d", "bob"), ["s2 msg 2 alice d"]);
    // ... and so does handing held messages over to another node.
    assert_eq!(h.engine.take_held("carol").len(), 1);
    assert_eq!(h.engine.delivery_bytes(), 3);
    assert_eq!(h.send(1, "e", "bob"), ["s2 msg 3 alice e"]);
    assert_eq!(h.engine.delivery_bytes(), 6);
    // Failures free them as well.
    h.advance(60_000);
    assert_eq!(h.engine.delivery_bytes(), 0);
}

#[test]
fn slow_consumer_is_closed_and_its_messages_held() {
    let mut cfg = test_cfg();
    cfg.max_unacked_per_session = 2;
    let mut h = Harness::with(cfg);
    h.open(1, "alice");
    h.open(2, "bob");
    h.send(1, "a", "bob");
    h.send(1, "b", "bob");
    assert_eq!(
        h.send(1, "c", "bob"),
        ["s2 msg 3 alice c", "close s2 SlowConsumer"]
    );
    assert_eq!(h.engine.presence("bob"), 0);
    // Nothing was lost: a new session gets all three.
    assert_eq!(
        h.open(3, "bob"),
        ["s3 msg 1 alice a", "s3 msg 2 alice b", "s3 msg 3 alice c"]
    );
}

#[test]
fn too_many_sessions_replace_the_oldest() {
    let mut cfg = test_cfg();
    cfg.max_sessions_per_user = 2;
    let mut h = Harness::with(cfg);
    h.open(1, "bob");
    h.open(2, "bob");
    assert_eq!(h.open(3, "bob"), ["close s1 Replaced"]);
    assert_eq!(h.engine.presence("bob"), 2);
}

#[test]
fn api_and_remote_waiters_get_reports() {
    let mut h = Harness::new();
    h.open(2, "bob");
    assert_eq!(
        h.deliver("$system", "p1", "bob", Waiter::Api(9)),
        ["s2 msg 1 $system p1"]
    );
    assert_eq!(h.ack(2, 1), ["report Api(9) p1 Delivered"]);
    let remote = Waiter::Remote {
        node: "n2".into(),
        tag: 5,
    };
    h.deliver("carol", "r1", "dave", remote);
    assert_eq!(
        h.advance(5000),
        [r#"report Remote { node: "n2", tag: 5 } r1 Failed(Offline)"#]
    );
}

#[test]
fn remote_route_forwards_and_outcome_comes_back() {
    let mut h = Harness::new();
    h.open(1, "alice");
    assert_eq!(
        h.send_routed(1, "m1", "bob", Route::Remote("n2".into())),
        ["forward n2 s1 m1"]
    );
    h.engine
        .outcome(1, "m1", "bob", Outcome::Delivered, &mut h.out);
    assert_eq!(h.take(), ["s1 delivered m1 bob"]);
    // An outcome nobody waits for is ignored.
    h.engine
        .outcome(1, "m1", "bob", Outcome::Delivered, &mut h.out);
    assert!(h.take().is_empty());
    assert_eq!(
        h.send_routed(1, "m2", "bob", Route::Unreachable),
        ["s1 failed m2 unreachable"]
    );
}

#[test]
fn presence_counts_sessions() {
    let mut h = Harness::new();
    assert_eq!(h.engine.presence("bob"), 0);
    h.open(2, "bob");
    h.open(3, "bob");
    assert_eq!(h.engine.presence("bob"), 2);
    h.close(2);
    h.close(3);
    assert_eq!(h.engine.presence("bob"), 0);
}

#[test]
fn state_is_empty_after_everything_ends() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.open(2, "bob");
    for i in 0..10 {
        h.send(1, &format!("m{i}"), "bob");
    }
    h.close(2);
    h.advance(6000);
    h.close(1);
    h.advance(400_000);
    assert_eq!(h.engine.deliveries_in_flight(), 0);
    assert_eq!(h.engine.dedup_len(), 0);
    assert!(h.engine.users.is_empty());
    assert!(h.engine.sessions.is_empty());
    assert!(h.engine.next_deadline().is_none());
}

#[test]
fn take_held_hands_messages_and_waiters_over() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.open(2, "bob");
    h.send(1, "m1", "bob");
    h.send(1, "m2", "bob");
    h.close(2); // both held now
    let taken = h.engine.take_held("bob");
    let ids: Vec<&str> = taken.iter().map(|(m, _)| &*m.id).collect();
    assert_eq!(ids, ["m1", "m2"]);
    assert_eq!(taken[0].1, vec![Waiter::Session(1)]);
    assert_eq!(h.engine.deliveries_in_flight(), 0);
    assert_eq!(h.engine.dedup_len(), 0);
    assert!(
        h.advance(10_000).is_empty(),
        "no hold expiry for what was handed over"
    );
    // The new owner's outcome reaches alice through the sender side.
    h.engine
        .outcome(1, "m1", "bob", Outcome::Delivered, &mut h.out);
    assert_eq!(h.take(), ["s1 delivered m1 bob"]);
}

#[test]
fn held_gauge_and_users_with_held_follow_the_held_messages() {
    let mut h = Harness::new();
    let held = |h: &Harness| h.engine.metrics().held.get();
    h.open(1, "alice");
    h.send(1, "m1", "bob");
    h.send(1, "m2", "bob");
    h.send(1, "m3", "carol");
    assert_eq!(held(&h), 3);
    let mut users: Vec<String> = h
        .engine
        .users_with_held()
        .iter()
        .map(|u| u.to_string())
        .collect();
    users.sort();
    assert_eq!(users, ["bob", "carol"]);
    // A session of bob takes bob's two; taking carol's hands the last one over.
    assert_eq!(h.open(2, "bob"), ["s2 msg 1 alice m1", "s2 msg 2 alice m2"]);
    assert_eq!(held(&h), 1);
    assert_eq!(h.engine.take_held("carol").len(), 1);
    assert_eq!(held(&h), 0);
    assert!(h.engine.users_with_held().is_empty());
}

#[test]
fn closing_one_of_two_sessions_keeps_the_push_on_the_other() {
    let mut h = fanned_out();
    // Closing one leaves the other's push in place: nothing is pushed again.
    assert!(h.close(2).is_empty());
    assert_eq!(h.ack(3, 1), ["s1 delivered m1 bob"]);
}

#[test]
fn session_queries_name_the_live_sessions() {
    let mut h = Harness::new();
    assert_eq!(h.engine.session_count(), 0);
    h.open(1, "alice");
    h.open(2, "bob");
    let mut all = h.engine.sessions();
    all.sort();
    assert_eq!(all, [(1, Arc::from("alice")), (2, Arc::from("bob"))]);
    assert_eq!(h.engine.session_count(), 2);
    assert_eq!(h.engine.session_uid(2).map(|u| &**u), Some("bob"));
    h.close(2);
    assert_eq!(h.engine.session_uid(2), None);
    assert_eq!(h.engine.session_count(), 1);
}

#[test]
fn each_held_message_expires_on_its_own() {
    let mut h = Harness::new();
    h.open(1, "alice");
    assert!(h.send(1, "m1", "bob").is_empty());
    assert_eq!(h.engine.deliveries_in_flight(), 1);
    h.advance(1000);
    assert!(h.send(1, "m2", "bob").is_empty());
    assert_eq!(h.engine.metrics().held.get(), 2);
    // m1's hold ends first; m2 stays held.
    assert_eq!(h.advance(4000), ["s1 failed m1 offline"]);
    assert_eq!(h.engine.metrics().held.get(), 1);
    assert_eq!(h.engine.deliveries_in_flight(), 1);
    assert_eq!(h.open(2, "bob"), ["s2 msg 1 alice m2"]);
    assert_eq!(h.engine.metrics().held.get(), 0);
    assert_eq!(h.ack(2, 1), ["s1 delivered m2 bob"]);
}

// ----- transient messages -----------------------------------------------------------------------

#[test]
fn a_transient_message_is_delivered_on_ack() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.open(2, "bob");
    h.open(3, "bob");
    assert_eq!(
        h.send_transient(1, "t1", "bob"),
        ["s2 msg 1 alice t1", "s3 msg 1 alice t1"]
    );
    assert_eq!(h.ack(3, 1), ["s1 delivered t1 bob"]);
    assert_eq!(h.engine.deliveries_in_flight(), 0);
    assert_eq!(h.engine.dedup_len(), 0, "nothing remembered");
}

#[test]
fn a_transient_message_to_a_user_without_a_session_fails_offline_at_once() {
    let mut h = Harness::new();
    h.open(1, "alice");
    assert_eq!(h.send_transient(1, "t1", "bob"), ["s1 failed t1 offline"]);
    assert_eq!(h.engine.deliveries_in_flight(), 0, "not held");
    assert!(
        h.open(2, "bob").is_empty(),
        "nothing pushed to a later session"
    );
}

#[test]
fn a_transient_message_is_not_retried_and_times_out() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.open(2, "bob");
    h.send_transient(1, "t1", "bob");
    assert_eq!(h.advance(1000), ["s1 failed t1 timeout"], "no second push");
    assert!(h.advance(10_000).is_empty());
    assert!(h.ack(2, 1).is_empty(), "a late ack is ignored");
}

#[test]
fn a_transient_message_whose_session_closes_is_not_pushed_again() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.open(2, "bob");
    h.send_transient(1, "t1", "bob");
    h.open(3, "bob");
    assert_eq!(h.close(2), ["s1 failed t1 offline"]);
}

#[test]
fn a_repeated_transient_id_is_a_new_message() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.open(2, "bob");
    h.send_transient(1, "t1", "bob");
    assert_eq!(h.ack(2, 1), ["s1 delivered t1 bob"]);
    assert_eq!(h.send_transient(1, "t1", "bob"), ["s2 msg 2 alice t1"]);
    // And it does not spoil the dedup of a durable message with the same id.
    h.ack(2, 2);
    h.send(1, "m1", "bob");
    h.ack(2, 3);
    assert_eq!(
        h.deliver_as("alice", "m1", "bob", Waiter::Api(9), true)
            .len(),
        1
    );
    assert_eq!(
        h.deliver("alice", "m1", "bob", Waiter::Api(10)),
        ["report Api(10) m1 Delivered"]
    );
}

// ----- the offline webhook's source ------------------------------------------------------------

#[test]
fn messages_that_end_offline_are_kept_for_the_webhook_once() {
    let mut h = Harness::new();
    h.open(1, "alice");
    h.send(1, "m1", "bob");
    h.send_transient(1, "t1", "bob");
    assert!(
        h.engine.take_offline().is_empty(),
        "m1 is held, t1 not kept"
    );
    assert_eq!(h.advance(5000), ["s1 failed m1 offline"]);
    let offline: Vec<String> = h
        .engine
        .take_offline()
        .iter()
        .map(|m| m.id.to_string())
        .collect();
    assert_eq!(offline, ["m1"]);
    assert!(h.engine.take_offline().is_empty(), "taken once");
    // Without the webhook nothing is kept.
    let mut cfg = test_cfg();
    cfg.report_offline = false;
    let mut h = Harness::with(cfg);
    h.open(1, "alice");
    h.send(1, "m2", "bob");
    h.advance(5000);
    assert!(h.engine.take_offline().is_empty());
}
