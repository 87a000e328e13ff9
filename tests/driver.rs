//! The driver pumping real relays over the in-memory transport: two nodes in one process, no
//! sockets, paused time. What the simulation checks of the core, this checks of the pump: that
//! commands, link events, views and timers reach the relay and its outputs reach sessions,
//! peers and waiting requests.

use std::sync::Arc;
use std::time::Duration;

use imgate::driver::{Driver, Inputs};
use imgate::engine::{Message, Outcome};
use imgate::kicks::Kicks;
use imgate::metrics::Metrics;
use imgate::outbox::{FrameQueue, Outbox};
use imgate::protocol::{Body, FailReason, ServerFrame};
use imgate::relay::{Answer, ClientEvent, Relay, RelayConfig, SessionEnd, Status};
use imgate::state::Command;
use imgate::transport::MemNet;
use imgate::view::View;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

fn view(ids: &[&str]) -> Arc<View> {
    Arc::new(View::for_test(ids))
}

fn uid_owned_by(v: &View, node: &str, prefix: &str) -> String {
    (0..10_000)
        .map(|i| format!("{prefix}{i}"))
        .find(|u| v.ring.primary(u).is_some_and(|p| &**p == node))
        .unwrap()
}

struct TestNode {
    commands: mpsc::Sender<Command>,
    view: watch::Sender<Arc<View>>,
    next_session: u64,
}

impl TestNode {
    fn start(net: &MemNet, id: &str, v: Arc<View>, stop: &CancellationToken) -> TestNode {
        let (commands, commands_rx) = mpsc::channel(64);
        let (links_tx, links_rx) = mpsc::channel(64);
        let (view, view_rx) = watch::channel(v);
        let link = net.join(Arc::from(id), links_tx);
        let relay = Relay::new(
            RelayConfig::default(),
            Arc::from(id),
            Arc::new(Metrics::new()),
        );
        let kicks = Arc::new(Kicks::new(3600, 100));
        let driver = Driver::new(relay, link, kicks);
        tokio::spawn(driver.run(Inputs {
            commands: commands_rx,
            links: links_rx,
            view: view_rx,
            shutdown: stop.clone(),
        }));
        TestNode {
            commands,
            view,
            next_session: 1,
        }
    }

    async fn open(&mut self, uid: &str) -> (u64, Arc<FrameQueue>, oneshot::Receiver<SessionEnd>) {
        let session = self.next_session;
        self.next_session += 1;
        let (outbox, frames, end) = Outbox::new(64);
        let open = Command::Open {
            session,
            uid: Arc::from(uid),
            iat: 1,
            outbox,
        };
        self.commands.send(open).await.unwrap();
        // The driver queues `welcome` first, with the user's rooms.
        match next_frame(&frames).await {
            ServerFrame::Welcome { uid: u, rooms, .. } => {
                assert_eq!((u.as_str(), rooms.len()), (uid, 0));
            }
            other => panic!("expected welcome, got {other:?}"),
        }
        (session, frames, end)
    }

    async fn status(&self) -> Status {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Status { reply }).await.unwrap();
        answer.await.unwrap()
    }
}

async fn next_frame(q: &FrameQueue) -> ServerFrame {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), q.pop_batch(&mut out, 1))
        .await
        .expect("a frame in time");
    out.remove(0)
}

fn body() -> Body {
    Arc::from(serde_json::value::RawValue::from_string("{}".into()).unwrap())
}

/// Two nodes whose links are up: a send crosses, the ack comes back as `delivered`; the link is
/// cut while a message waits for its ack, and the sender learns `failed: unreachable`.
#[tokio::test(start_paused = true)]
async fn a_message_crosses_the_memory_transport_and_its_outcome_returns() {
    let net = MemNet::new();
    let stop = CancellationToken::new();
    let v = view(&["n1", "n2"]);
    let mut n1 = TestNode::start(&net, "n1", v.clone(), &stop);
    let mut n2 = TestNode::start(&net, "n2", v.clone(), &stop);
    let alice = uid_owned_by(&v, "n1", "alice");
    let bob = uid_owned_by(&v, "n2", "bob");
    // Links come up as both views list each other; until n1 hears of it, bob is n1's.
    let (a, alice_q, _alice_end) = n1.open(&alice).await;
    let (_, bob_q, _bob_end) = n2.open(&bob).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let send = |id: &str| {
        Command::Client(ClientEvent::Send {
            transient: false,
            session: a,
            id: id.into(),
            to: bob.clone(),
            body: body(),
            ts: 1,
        })
    };
    n1.commands.send(send("m1")).await.unwrap();
    let ServerFrame::Msg { seq, id, .. } = next_frame(&bob_q).await else {
        panic!("bob gets the message")
    };
    assert_eq!(&*id, "m1");
    let ack = Command::Client(ClientEvent::Ack { session: 1, seq });
    n2.commands.send(ack).await.unwrap();
    assert!(
        matches!(next_frame(&alice_q).await, ServerFrame::Delivered { id, .. } if &*id == "m1")
    );

    n1.commands.send(send("m2")).await.unwrap();
    assert!(matches!(next_frame(&bob_q).await, ServerFrame::Msg { .. }));
    assert_eq!(n1.status().await.forwards, 1);
    net.cut("n1", "n2");
    match next_frame(&alice_q).await {
        ServerFrame::Failed { id, reason, .. } => {
            assert_eq!((&*id, reason), ("m2", FailReason::Unreachable))
        }
        other => panic!("expected failed, got {other:?}"),
    }
    assert_eq!(n1.status().await.forwards, 0);
    stop.cancel();
}

/// A view that hands a user to the other node moves its session there; presence and pushes
/// from the API are answered through the driver, across the link.
#[tokio::test(start_paused = true)]
async fn views_move_sessions_and_requests_are_answered() {
    let net = MemNet::new();
    let stop = CancellationToken::new();
    let both = view(&["n1", "n2"]);
    let alone = view(&["n1"]);
    let mut n1 = TestNode::start(&net, "n1", alone, &stop);
    let _n2 = TestNode::start(&net, "n2", both.clone(), &stop);
    let bob = uid_owned_by(&both, "n2", "bob");
    let (_, _, end) = n1.open(&bob).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(n1.status().await.sessions, 1, "n1 owns everyone alone");
    n1.view.send(both.clone()).unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), end)
        .await
        .expect("moved in time")
        .unwrap();
    assert!(matches!(end, SessionEnd::Moved(o) if &*o.node == "n2"));

    let (reply, answer) = oneshot::channel();
    let presence = Command::Presence {
        uid: bob.clone(),
        reply,
    };
    n1.commands.send(presence).await.unwrap();
    assert_eq!(answer.await.unwrap(), Answer::Sessions(0));

    // A push for bob, who has no session: held at n2, then failed `offline` after the hold.
    let (reply, answer) = oneshot::channel();
    let msg = Message {
        transient: false,
        from: Arc::from("$system"),
        id: Arc::from("p1"),
        to: Arc::from(bob.as_str()),
        body: body(),
        ts: 1,
        room: None,
        except: None,
    };
    n1.commands
        .send(Command::Push { msg, reply })
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(60), answer)
        .await
        .expect("an outcome after the hold")
        .unwrap();
    assert_eq!(
        answer,
        Answer::Outcome(Outcome::Failed(FailReason::Offline))
    );
    stop.cancel();
}
