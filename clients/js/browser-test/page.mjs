// The chat page (GET /) in real headless Chromium against real `imgate node` processes
// (started by tests/js_browser.rs). Alice on a desktop-sized page served by n1, bob on a
// 375 px phone page served by n2: they chat both ways, see unread counts, presence, typing,
// delivered and failed marks, a room; a markup-looking message stays text; then n1 (the node
// that served alice's page and owns her) is killed with SIGKILL and the page reconnects
// through another node, resends what was in flight, and gets a later message.
//
// Env: IMGATE_NODES (base URLs), IMGATE_IDS (their node ids), IMGATE_PIDS (their process ids),
// CHROMIUM (its path), SHOTS (the folder for the screenshots, one per step).

import { chromium } from "playwright-core";
import assert from "node:assert/strict";
import { mkdirSync, rmSync } from "node:fs";

const nodes = (process.env.IMGATE_NODES ?? "").split(",").filter(Boolean);
const ids = (process.env.IMGATE_IDS ?? "").split(",").filter(Boolean);
const pids = (process.env.IMGATE_PIDS ?? "").split(",").filter(Boolean).map(Number);
assert.ok(nodes.length >= 3 && ids.length === nodes.length && pids.length === nodes.length, "three nodes with ids and pids");
const shots = process.env.SHOTS ?? "target/tmp/screenshots/page";
rmSync(shots, { recursive: true, force: true });
mkdirSync(shots, { recursive: true });

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const errors = [];
let step = 0;

async function shot(page, name) {
  step += 1;
  const file = `${shots}/${String(step).padStart(2, "0")}-${name}.png`;
  await page.screenshot({ path: file });
  console.log(`screenshot ${file}`);
}

/** The first uid `prefix0`, `prefix1`... whose owner is (or is not) node `id`. */
async function uidOwned(base, prefix, ownedBy, notBy) {
  for (let i = 0; i < 200; i++) {
    const uid = `${prefix}${i}`;
    const res = await fetch(`${base}/login`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ uid }),
    });
    const { node } = await res.json();
    if ((ownedBy && node === ownedBy) || (notBy && node !== notBy)) return uid;
  }
  throw new Error(`no uid ${prefix}N owned as wanted`);
}

async function openPage(base, uid, viewport) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.on("pageerror", (e) => errors.push(`${uid}: ${e.message}`));
  await page.goto(`${base}/`);
  return page;
}

async function signIn(page, uid) {
  await page.fill("#uid", uid);
  await page.click("#signin-btn");
  await page.waitForSelector("#conn.ok", { timeout: 15000 });
}

async function startChat(page, who) {
  await page.fill("#new", who);
  await page.click("#new-btn");
  await page.waitForSelector("#chat-title", { state: "visible" });
}

async function write(page, text) {
  await page.fill("#text", text);
  await page.press("#text", "Enter");
}

/** The mark of my last message in the open conversation, once it is not "Sending…". */
async function lastMark(page, cls, timeout = 15000) {
  const sel = `#msgs .msg.mine:last-child .mark.${cls}`;
  await page.waitForSelector(sel, { timeout });
  return page.textContent(sel);
}

async function waitBubble(page, text, side = "theirs", timeout = 15000) {
  await page.waitForFunction(
    ({ text, side }) => [...document.querySelectorAll(`#msgs .msg.${side} .bubble`)].some((b) => b.textContent === text),
    { text, side },
    { timeout },
  );
}

try {
  const alice = await uidOwned(nodes[0], "alice", ids[0], null);
  const bob = await uidOwned(nodes[1], "bob", null, ids[0]);
  const desktop = { width: 1280, height: 800 };
  const phone = { width: 375, height: 740 };

  // Sign-in and empty states.
  const a = await openPage(nodes[0], alice, desktop);
    await shot(a, "desktop-sign-in");
  // A refused login comes back to the form with the server's words.
  await a.fill("#uid", "$system");
  await a.click("#signin-btn");
  await a.waitForFunction(() => document.querySelector("#signin-error").textContent.startsWith("Could not sign in: "));
  assert.ok(await a.isVisible("#signin-form"));
  await shot(a, "desktop-sign-in-refused");
  await signIn(a, alice);
  assert.match(await a.textContent("#conn"), new RegExp(`Connected \\(server ${ids[0]}\\)`));
  assert.ok(await a.isVisible("#side-empty"), "an empty state says what to do");
  await shot(a, "desktop-empty");
  const b = await openPage(nodes[1], bob, phone);
  await signIn(b, bob);
  await shot(b, "phone-empty");

  // Alice writes; bob's phone lists the conversation with an unread count.
  await startChat(a, bob);
  await a.waitForSelector(`.conv[data-key="u:${bob}"] .dot.online`, { timeout: 15000 });
  await write(a, "hi bob");
  assert.equal(await lastMark(a, "delivered"), "✓ Delivered");
  await b.waitForSelector(`.conv[data-key="u:${alice}"] .badge`);
  assert.equal(await b.textContent(`.conv[data-key="u:${alice}"] .badge`), "1");
  await shot(b, "phone-unread");
  await b.click(`.conv[data-key="u:${alice}"]`);
  await waitBubble(b, "hi bob");
  assert.equal(await b.$(`.conv[data-key="u:${alice}"] .badge`), null, "read once open");

  // Typing, then replies from the phone, one of them long.
  await a.fill("#text", "typ");
  await a.type("#text", "ing");
  await b.waitForFunction(() => document.querySelector("#typing").textContent.includes("is typing"), null, { timeout: 10000 });
  await a.fill("#text", "");
  await write(b, "hi alice, from a phone");
  assert.equal(await lastMark(b, "delivered"), "✓ Delivered");
  const long = `${"a-very-long-word-".repeat(12)} and then a sentence that has to wrap over several lines on a narrow phone screen.`;
  await write(b, long);
  await lastMark(b, "delivered");
  await waitBubble(a, "hi alice, from a phone");
  await waitBubble(a, long);

  // Markup from the other side stays text.
  const xss = `<img src=x onerror="window.__xss=1"><b>bold?</b>`;
  await write(b, xss);
  await waitBubble(a, xss);
  assert.equal(await a.evaluate(() => document.querySelectorAll("#msgs img, #msgs b").length), 0);
  assert.equal(await a.evaluate(() => window.__xss), undefined);
  await shot(b, "phone-chat");
  await shot(a, "desktop-chat");

  // The phone keeps every message readable: nothing wider than the screen, and a long message
  // gets most of the width, not a sliver.
  const layout = await b.evaluate(() => ({
    scroll: document.documentElement.scrollWidth,
    bubbles: [...document.querySelectorAll("#msgs .bubble")].map((e) => {
      const r = e.getBoundingClientRect();
      return { left: r.left, right: r.right, width: r.width, text: e.textContent };
    }),
  }));
  assert.ok(layout.scroll <= phone.width, `no sideways scrolling: ${layout.scroll}`);
  for (const x of layout.bubbles) {
    assert.ok(x.left >= 0 && x.right <= phone.width, `inside the screen: ${JSON.stringify(x)}`);
  }
  const wide = layout.bubbles.find((x) => x.text === long);
  assert.ok(wide.width >= 0.6 * phone.width, `a long message is wide enough to read: ${wide.width}px`);

  // Someone who is not connected: failed, in words, and shown offline.
  await startChat(a, "nobody-here");
  await write(a, "are you there?");
  assert.equal(await lastMark(a, "failed"), "✗ Not delivered: the recipient was not connected");
  await a.waitForSelector(`.conv[data-key="u:nobody-here"] .dot:not(.online)`);
  await shot(a, "desktop-offline-failed");

    // A backend push (a plain string body) shows as a conversation with the service.
  const push = await fetch(`${nodes[2]}/api/push`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: "Bearer dev-api-key" },
    body: JSON.stringify({ to: alice, body: "your order has shipped", wait_ms: 5000 }),
  });
  assert.equal((await push.json()).status, "delivered");
  await a.click('.conv[data-key="u:$system"]');
  await waitBubble(a, "your order has shipped");
  assert.equal(await a.isVisible("#compose"), false, "nobody can answer $system");

  // A room.
  await startChat(a, "#team");
  await b.click("#back");
  await startChat(b, "#team");
  await write(a, "hello team");
  assert.equal(await lastMark(a, "delivered"), "✓ Delivered (1 of 1 got it)");
  await waitBubble(b, "hello team");
    await shot(b, "phone-room");
  await b.click("#back");
  await b.click(`.conv[data-key="u:${alice}"]`);

  // Kill -9 of the node that served alice's page and owns her.
  await a.click(`.conv[data-key="u:${bob}"]`);
  process.kill(pids[0], "SIGKILL");
  await a.waitForSelector("#conn.bad", { timeout: 15000 });
  assert.match(await a.textContent("#conn"), /Connection lost: .*attempt \d+/);
  await write(a, "written while the server was gone");
  await shot(a, "desktop-failover-reconnecting");
  await a.waitForSelector("#conn.ok", { timeout: 30000 });
  const now = await a.textContent("#conn");
  assert.ok(!now.includes(`server ${ids[0]})`), `on another node now: ${now}`);
  assert.equal(await lastMark(a, "delivered", 20000), "✓ Delivered", "the send in flight was resent");
    await waitBubble(b, "written while the server was gone");
  await write(b, "after the failover");
  assert.equal(await lastMark(b, "delivered", 20000), "✓ Delivered");
  await waitBubble(a, "after the failover");
  await shot(a, "desktop-failover-reconnected");
  await shot(b, "phone-after-failover");

  // 320 px, the narrowest phone: still no sideways scrolling.
  await b.setViewportSize({ width: 320, height: 640 });
  assert.ok((await b.evaluate(() => document.documentElement.scrollWidth)) <= 320, "fits 320 px");
  await shot(b, "phone-320");

    // Bounded: at most 200 conversations, the oldest forgotten first, never the newest.
  const kept = await a.evaluate(() => {
    for (let i = 0; i < 205; i++) {
      document.querySelector("#new").value = `someone-${i}`;
      document.querySelector("#newchat").requestSubmit();
    }
    return [...document.querySelectorAll(".conv")].map((e) => e.dataset.key);
  });
  assert.equal(kept.length, 200);
  assert.ok(kept.includes("u:someone-204") && !kept.includes("u:someone-0"), kept.slice(0, 3).join());
  assert.equal(await a.textContent("#chat-title"), "someone-204");

  assert.deepEqual(errors, [], "no uncaught page errors");
  console.log("chat page in chromium: ok");
} catch (e) {
  console.error(`FAILED at step ${step}: ${e.stack ?? e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
