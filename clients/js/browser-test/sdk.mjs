// imgate.js in real headless Chromium against running nodes (started by tests/js_browser.rs).
// Debian's chromium, driven by the pinned playwright-core of package.json; nothing downloads a
// browser. Env: IMGATE_NODES (comma-separated base URLs), CHROMIUM (its path), SHOTS (a
// folder for screenshots). Exits non-zero with the reason on the first broken expectation.

import { chromium } from "playwright-core";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";

const nodes = (process.env.IMGATE_NODES ?? "").split(",").filter(Boolean);
assert.ok(nodes.length >= 2, "IMGATE_NODES must name two nodes");
const shots = process.env.SHOTS ?? "target/tmp/screenshots";
mkdirSync(shots, { recursive: true });

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const errors = [];

/** A page of node `base` with a client of `uid` made from the node's own /imgate.js. */
async function user(base, uid) {
  const page = await browser.newPage();
  page.on("pageerror", (e) => errors.push(`${uid}: ${e.message}`));
  await page.goto(`${base}/health`);
  await page.evaluate(
    async ({ nodes, uid }) => {
      const { Client } = await import("/imgate.js");
      const c = new Client({ nodes, uid });
      window.got = [];
      window.states = [];
      c.on("message", (m) => window.got.push(m));
      c.on("state", (s) => window.states.push(`${s.state}: ${s.detail}`));
      window.client = c;
      c.start();
      await new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`not connected: ${window.states.join(" | ")}`)), 10000);
        c.on("state", (s) => {
          if (s.state === "connected") {
            clearTimeout(t);
            resolve();
          }
        });
      });
    },
    { nodes, uid },
  );
  return page;
}

async function waitFor(page, fn, arg, what) {
  try {
    await page.waitForFunction(fn, arg, { timeout: 10000 });
  } catch (e) {
    throw new Error(`${what}: ${e.message}`);
  }
}

try {
  // Each logs in through a different node (the client tries its list from a random start).
  const alice = await user(nodes[0], "alice");
  const bob = await user(nodes[1], "bob");

  // 1:1, both ways, end to end acked.
  const out = await alice.evaluate(() => window.client.send("bob", { text: "hi bob" }));
  assert.deepEqual(out, { status: "delivered" });
  await waitFor(bob, () => window.got.some((m) => m.body?.text === "hi bob"), null, "bob gets it");
  const back = await bob.evaluate(() => window.client.send("alice", "<img src=x onerror=alert(1)>"));
  assert.deepEqual(back, { status: "delivered" });
  const seen = await alice.evaluate(() => window.got.map((m) => m.body));
  assert.ok(seen.includes("<img src=x onerror=alert(1)>"), "a body is data, never markup");

  // Offline: failed with the reason.
  const off = await alice.evaluate(() => window.client.send("nobody-here", 1));
  assert.deepEqual(off, { status: "failed", reason: "offline" });

  // Rooms.
  assert.deepEqual(await alice.evaluate(() => window.client.join("team")), { status: "joined", members: 1 });
  assert.deepEqual(await bob.evaluate(() => window.client.join("team")), { status: "joined", members: 2 });
  const r = await alice.evaluate(() => window.client.sendRoom("team", "hi team"));
  assert.deepEqual(r, { status: "done", members: 2, delivered: 2, offline: 0, failed: 0 });
  await waitFor(bob, () => window.got.some((m) => m.room === "team" && m.body === "hi team"), null, "bob gets the room message");

  await alice.screenshot({ path: `${shots}/sdk-alice.png` });
  assert.deepEqual(errors, [], "no uncaught page errors");
  console.log("imgate.js in chromium: ok");
} catch (e) {
  console.error(`FAILED: ${e.stack ?? e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
