//! The chat page in real headless Chromium, driven over the DevTools protocol: two pages log in
//! at an in-process node, one types, the other shows "… is typing…" (a transient message), then
//! gets the message itself and the indicator goes.
//!
//! Needs `chromium` on the PATH (`.ci/run` installs Debian's); without it the test says so and
//! passes as skipped. The DevTools client is the few calls the test needs, over the WebSocket
//! crate imgate already uses.

mod cluster_support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cluster_support::Cluster;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const WAIT: Duration = Duration::from_secs(15);

/// A headless Chromium with its own profile directory; killed on drop.
struct Browser {
    child: Child,
    profile: PathBuf,
    devtools: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join(name))
                    .find(|p| p.is_file())
            })
        })
}

impl Browser {
    async fn launch(exe: &PathBuf) -> Browser {
        let profile = std::env::temp_dir().join(format!(
            "imgate-browser-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&profile).unwrap();
        let child = Command::new(exe)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                "about:blank",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium starts");
        // Chromium writes the port it picked, and the browser target's path, to this file.
        let file = profile.join("DevToolsActivePort");
        let deadline = tokio::time::Instant::now() + WAIT;
        let text = loop {
            if let Ok(t) = std::fs::read_to_string(&file)
                && t.lines().count() >= 2
            {
                break t;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no DevToolsActivePort"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut lines = text.lines();
        let (port, path) = (lines.next().unwrap(), lines.next().unwrap());
        let (devtools, _) =
            tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}{path}"))
                .await
                .expect("DevTools WebSocket");
        Browser {
            child,
            profile,
            devtools,
            next_id: 1,
        }
    }

    /// One DevTools call; events in between are skipped.
    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.devtools
            .send(Message::Text(msg.to_string().into()))
            .await
            .unwrap();
        loop {
            let m = tokio::time::timeout(WAIT, self.devtools.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .expect("DevTools open")
                .unwrap();
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Opens `url` in a new page; returns the page's session.
    async fn open(&mut self, url: &str) -> String {
        let target = self
            .call(None, "Target.createTarget", json!({"url": url}))
            .await;
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        attached["sessionId"].as_str().unwrap().to_string()
    }

    /// Evaluates `js` in a page; returns its value.
    async fn eval(&mut self, page: &str, js: &str) -> Value {
        let r = self
            .call(
                Some(page),
                "Runtime.evaluate",
                json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        assert!(r.get("exceptionDetails").is_none(), "{js}: {r}");
        r["result"]["value"].clone()
    }

    /// Saves a PNG of `page` as `<CARGO_TARGET_TMPDIR>/screenshots/<name>.png` for a person to
    /// look at; returns its path.
    async fn screenshot(&mut self, page: &str, name: &str) -> PathBuf {
        use base64::Engine as _;
        let shot = self
            .call(
                Some(page),
                "Page.captureScreenshot",
                json!({"format": "png"}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Waits until `js` evaluates to true in `page`.
    async fn wait_for(&mut self, page: &str, js: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if self.eval(page, js).await == json!(true) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "never true: {js}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Logs `uid` in on `page` and waits for the session.
async fn login(b: &mut Browser, page: &str, uid: &str) {
    b.wait_for(
        page,
        "document.readyState === 'complete' && !!document.getElementById('login')",
    )
    .await;
    b.eval(
        page,
        &format!("document.getElementById('uid').value = '{uid}'; document.getElementById('login').click(); true"),
    )
    .await;
    b.wait_for(
        page,
        &format!("document.getElementById('status').textContent.startsWith('connected as {uid}')"),
    )
    .await;
}

/// Chromium and a one-node cluster; `None` (the test is skipped, saying why) without chromium.
async fn one_node_and_a_browser(
    tweak: impl FnOnce(&mut imgate::config::Config),
) -> Option<(Cluster, Browser)> {
    let Some(exe) = chromium() else {
        println!("skipped: no chromium on the PATH (.ci/run installs it)");
        return None;
    };
    let c = Cluster::start_with(1, tweak).await;
    c.wait_converged(1).await;
    Some((c, Browser::launch(&exe).await))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_page_shows_who_is_typing() {
    let Some((c, mut b)) = one_node_and_a_browser(|_| {}).await else {
        return;
    };
    let url = format!("{}/", c.nodes[0].http_url());
    let alice = b.open(&url).await;
    let bob = b.open(&url).await;
    login(&mut b, &alice, "alice").await;
    login(&mut b, &bob, "bob").await;
    // alice types to bob: one keystroke's `input` event.
    b.eval(
        &alice,
        "document.getElementById('to').value = 'bob';
         const t = document.getElementById('text');
         t.value = 'h'; t.dispatchEvent(new Event('input')); true",
    )
    .await;
    b.wait_for(
        &bob,
        "document.getElementById('typing').textContent === 'alice is typing…'",
    )
    .await;
    assert_eq!(
        b.eval(&bob, "document.querySelectorAll('#log li.incoming').length")
            .await,
        json!(0),
        "the typing signal is not a message"
    );
    // The message itself: shown, and the indicator goes at once.
    b.eval(
        &alice,
        "document.getElementById('text').value = 'hello bob';
         document.getElementById('send').click(); true",
    )
    .await;
    b.wait_for(
        &bob,
        "[...document.querySelectorAll('#log li.incoming .body')].some(e => e.textContent === 'hello bob')",
    )
    .await;
    assert_eq!(
        b.eval(&bob, "document.getElementById('typing').textContent")
            .await,
        json!("")
    );
    b.wait_for(
        &alice,
        "[...document.querySelectorAll('#log li .status')].some(e => e.textContent.includes('delivered'))",
    )
    .await;
    drop(b);
    c.shutdown().await;
}

/// On a 375 px phone screen every message stays readable (its text gets most of the width),
/// and a body that looks like HTML is shown as text, never run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_page_is_readable_on_a_phone_and_shows_markup_as_text() {
    let Some((c, mut b)) = one_node_and_a_browser(|_| {}).await else {
        return;
    };
    let url = format!("{}/", c.nodes[0].http_url());
    let alice = b.open(&url).await;
    let bob = b.open(&url).await;
    for page in [&alice, &bob] {
        let phone = json!({"width": 375, "height": 740, "deviceScaleFactor": 2, "mobile": true});
        b.call(Some(page), "Emulation.setDeviceMetricsOverride", phone)
            .await;
    }
    login(&mut b, &alice, "alice").await;
    login(&mut b, &bob, "bob").await;
    let evil = r#"<img src=x onerror=\"window.__xss = 1\"> and a long sentence that has to wrap on a phone"#;
    b.eval(
        &alice,
        &format!(
            "document.getElementById('to').value = 'bob';
             document.getElementById('text').value = \"{evil}\";
             document.getElementById('send').click(); true"
        ),
    )
    .await;
    b.wait_for(
        &bob,
        "document.querySelectorAll('#log li.incoming .body').length === 1",
    )
    .await;
    let shown = b
        .eval(
            &bob,
            "document.querySelector('#log li.incoming .body').textContent",
        )
        .await;
    assert!(shown.as_str().unwrap().starts_with("<img src=x"), "{shown}");
    assert_eq!(
        b.eval(&bob, "typeof window.__xss").await,
        json!("undefined")
    );
    assert_eq!(
        b.eval(&bob, "document.querySelectorAll('#log img').length")
            .await,
        json!(0)
    );
    for page in [&alice, &bob] {
        let narrowest = b
            .eval(
                page,
                "Math.min(...[...document.querySelectorAll('#log li .body')]
                   .map(e => e.getBoundingClientRect().width))",
            )
            .await;
        let width = narrowest.as_f64().unwrap();
        assert!(
            width >= 250.0,
            "a message body is {width} px wide on a 375 px screen"
        );
        let overflow = b
            .eval(
                page,
                "document.documentElement.scrollWidth > window.innerWidth",
            )
            .await;
        assert_eq!(overflow, json!(false), "the page scrolls sideways");
    }
    for (page, name) in [(&alice, "phone-alice"), (&bob, "phone-bob")] {
        println!("screenshot: {}", b.screenshot(page, name).await.display());
    }
    drop(b);
    c.shutdown().await;
}

/// The node that served the page goes away: a new login (the Reconnect button) finds another
/// node from the page's list of members, and a later message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_logs_in_through_another_node_when_its_own_is_gone() {
    let Some(exe) = chromium() else {
        println!("skipped: no chromium on the PATH (.ci/run installs it)");
        return;
    };
    let mut c = Cluster::start(2).await;
    c.wait_converged(2).await;
    let owner_of = |c: &Cluster, uid: &str| c.nodes[1].shared().owner_of(uid).unwrap().node;
    // alice and bob both live on n2; the page comes from n1.
    let alice = cluster_support::first_uid("alice", |u| &*owner_of(&c, u) == "n2");
    let bob = cluster_support::first_uid("bob", |u| &*owner_of(&c, u) == "n2");
    let url = format!("{}/", c.nodes[0].http_url());
    let mut b = Browser::launch(&exe).await;
    let page = b.open(&url).await;
    login(&mut b, &page, &alice).await;
    let n1 = c.nodes.remove(0);
    n1.shutdown().await;
    b.eval(&page, "document.getElementById('reconnect').click(); true")
        .await;
    b.wait_for(
        &page,
        &format!(
            "document.getElementById('status').textContent.startsWith('connected as {alice} @ n2')"
        ),
    )
    .await;
    let mut bobc = cluster_support::Client::login(&c.nodes[0].http_url(), &bob).await;
    bobc.send("after", &alice, json!({"text": "still here?"}))
        .await;
    b.wait_for(
        &page,
        "[...document.querySelectorAll('#log li.incoming .body')].some(e => e.textContent === 'still here?')",
    )
    .await;
    assert_eq!(bobc.expect("delivered").await["id"], "after");
    drop(b);
    c.shutdown().await;
}

/// A message waiting for its ack when the page's connection drops is sent again, with the same
/// id, once the page is back; the node answers the repeat with the first one's outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_in_flight_during_a_drop_is_resent_and_ends_delivered() {
    // No retry push while the test holds the ack back: any second `msg` would be a duplicate.
    let tweak = |cfg: &mut imgate::config::Config| cfg.delivery.ack_timeout_ms = 30_000;
    let Some((c, mut b)) = one_node_and_a_browser(tweak).await else {
        return;
    };
    let http = c.nodes[0].http_url();
    let page = b.open(&format!("{http}/")).await;
    login(&mut b, &page, "alice").await;
    let mut bob = cluster_support::Client::login(&http, "bob").await;
    b.eval(
        &page,
        "document.getElementById('to').value = 'bob';
         document.getElementById('text').value = 'across the drop';
         document.getElementById('send').click(); true",
    )
    .await;
    let m = bob.expect("msg").await;
    // Not acked yet: the page's connection drops, and the page logs in again by itself.
    b.eval(&page, "ws.close(4000); true").await;
    b.wait_for(
        &page,
        "document.getElementById('status').textContent.startsWith('disconnected')",
    )
    .await;
    b.wait_for(
        &page,
        "document.getElementById('status').textContent.startsWith('connected as alice')",
    )
    .await;
    b.wait_for(
        &page,
        "[...document.querySelectorAll('#log li .status')].some(e => e.textContent === 'resent')",
    )
    .await;
    bob.ack(m["seq"].as_u64().unwrap()).await;
    b.wait_for(
        &page,
        "[...document.querySelectorAll('#log li .status')].some(e => e.textContent.includes('delivered'))",
    )
    .await;
    bob.expect_nothing(Duration::from_millis(300)).await;
    drop(b);
    c.shutdown().await;
}

/// A send still waiting for its outcome is not resent under another user after a login as
/// someone else: it ends "unknown" on the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_as_another_user_does_not_resend_the_first_users_sends() {
    let tweak = |cfg: &mut imgate::config::Config| cfg.delivery.hold_ms = 30_000;
    let Some((c, mut b)) = one_node_and_a_browser(tweak).await else {
        return;
    };
    let page = b.open(&format!("{}/", c.nodes[0].http_url())).await;
    login(&mut b, &page, "alice").await;
    b.eval(
        &page,
        "document.getElementById('to').value = 'bob';
         document.getElementById('text').value = 'held for bob';
         document.getElementById('send').click(); true",
    )
    .await;
    login(&mut b, &page, "carol").await;
    b.wait_for(
        &page,
        "[...document.querySelectorAll('#log li .status')]
           .some(e => e.textContent === '? unknown: logged in as another user')",
    )
    .await;
    let mut bob = cluster_support::Client::login(&c.nodes[0].http_url(), "bob").await;
    let m = bob.expect("msg").await;
    assert_eq!(
        m["from"], "alice",
        "only alice's one message, never as carol: {m}"
    );
    bob.expect_nothing(Duration::from_millis(300)).await;
    drop(b);
    c.shutdown().await;
}
