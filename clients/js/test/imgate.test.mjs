// Unit tests of imgate.js under Node's own test runner (`node --test clients/js/test/`), with a
// fake WebSocket, a fake fetch and a fake clock: no server, no real time.

import { test } from "node:test";
import assert from "node:assert/strict";
import { Client, backoffDelay, closeReason } from "../imgate.js";

/** A clock whose timers run only when the test advances it. */
class Clock {
  constructor() {
    this.t = 1_800_000_000_000;
    this.timers = new Map();
    this.next = 1;
  }
  set(f, ms) {
    const id = this.next++;
    this.timers.set(id, { at: this.t + ms, f, ms });
    return id;
  }
  clear(id) {
    this.timers.delete(id);
  }
  now() {
    return this.t;
  }
  /** Runs every timer due within `ms`, in time order, then lets promises settle. */
  async advance(ms) {
    const end = this.t + ms;
    for (;;) {
      const due = [...this.timers.entries()]
        .filter(([, v]) => v.at <= end)
        .sort((a, b) => a[1].at - b[1].at)[0];
      if (!due) break;
      this.timers.delete(due[0]);
      this.t = due[1].at;
      due[1].f();
      await settle();
    }
    this.t = end;
    await settle();
  }
  /** The delays of the timers waiting now. */
  pending() {
    return [...this.timers.values()].map((v) => v.ms);
  }
}

async function settle() {
  for (let i = 0; i < 10; i++) await new Promise((r) => setImmediate(r));
}

/** A fake WebSocket: the test plays the server. */
function fakeSockets() {
  const sockets = [];
  class FakeWebSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 1;
      this.sent = [];
      sockets.push(this);
    }
    send(data) {
      if (this.readyState !== 1) throw new Error("not open");
      this.sent.push(JSON.parse(data));
    }
    close(code = 1000) {
      this.readyState = 3;
      this.closedWith = code;
    }
    // Server side.
    deliver(frame) {
      this.onmessage?.({ data: JSON.stringify(frame) });
    }
    drop(code = 1006) {
      this.readyState = 3;
      this.onclose?.({ code });
    }
    frames(type) {
      return this.sent.filter((f) => f.type === type);
    }
  }
  return { FakeWebSocket, sockets };
}

/** A fake fetch: `nodes[base]` answers a login (or throws when it is down). */
function fakeFetch(nodes, calls) {
  return async (url, init) => {
    const base = url.replace(/\/login$/, "");
    calls.push({ base, body: JSON.parse(init.body) });
    const answer = nodes[base];
    if (!answer) throw new TypeError("Failed to fetch");
    const { status = 200, body } = answer();
    return { ok: status < 300, status, json: async () => body };
  };
}

function login(node, expiresAt = 1_800_007_200) {
  return () => ({
    body: { token: `tok-${node}`, url: `ws://${node}/ws`, node, expires_at: expiresAt },
  });
}

function setup(extra = {}) {
  const clock = new Clock();
  const { FakeWebSocket, sockets } = fakeSockets();
  const calls = [];
  const nodes = { "http://a": login("a"), "http://b": login("b"), ...extra.nodes };
  const client = new Client({
    nodes: extra.list ?? ["http://a", "http://b"],
    uid: "alice",
    WebSocket: FakeWebSocket,
    fetch: fakeFetch(nodes, calls),
    timers: clock,
    random: () => 0,
    idPrefix: "p",
    ...extra.options,
  });
  return { client, clock, sockets, calls, nodes };
}

/** The newest socket, once the client made it, gets its `welcome`. */
async function welcomed(env, rooms = []) {
  await settle();
  const ws = env.sockets.at(-1);
  ws.deliver({ type: "welcome", uid: "alice", node: ws.url.split("/")[2], session: "x-1", rooms });
  await settle();
  return ws;
}

test("logs in at the first node that answers and connects with its token", async () => {
  const env = setup({ nodes: { "http://a": () => { throw new TypeError("down"); } } });
  const states = [];
  env.client.on("state", (s) => states.push(s.state));
  env.client.start();
  await settle();
  assert.equal(env.sockets.length, 1);
  assert.equal(env.sockets[0].url, "ws://b/ws?token=tok-b");
  await welcomed(env);
  assert.equal(env.client.state, "connected");
  assert.deepEqual(states, ["connecting", "connected"]);
});

test("a send resolves to its outcome", async () => {
  const env = setup();
  env.client.start();
  const ws = await welcomed(env);
  const p = env.client.send("bob", { text: "hi" });
  const q = env.client.send("carol", 1);
  assert.deepEqual(ws.frames("send"), [
    { type: "send", id: "p-1", to: "bob", body: { text: "hi" } },
    { type: "send", id: "p-2", to: "carol", body: 1 },
  ]);
  ws.deliver({ type: "delivered", id: "p-1", to: "bob" });
  ws.deliver({ type: "failed", id: "p-2", to: "carol", reason: "offline" });
  assert.deepEqual(await p, { status: "delivered" });
  assert.deepEqual(await q, { status: "failed", reason: "offline" });
});

test("reconnects with growing delays, logs in elsewhere, and resends without outcome with the same id", async () => {
  const env = setup();
  env.client.start();
  let ws = await welcomed(env);
  const p = env.client.send("bob", "one");
  ws.drop(1006);
  assert.equal(env.client.state, "reconnecting");
  // Every node is down for a while: 250, 500, 1000 ms... (jitter 0 here).
  const saved = { ...env.nodes };
  env.nodes["http://a"] = () => { throw new TypeError("down"); };
  env.nodes["http://b"] = () => { throw new TypeError("down"); };
  const delays = [];
  for (let i = 0; i < 4; i++) {
    delays.push(...env.clock.pending());
    await env.clock.advance(Math.max(...env.clock.pending()));
  }
  assert.deepEqual(delays.slice(0, 4), [250, 500, 1000, 2000]);
  assert.equal(backoffDelay(10, 250, 5000, () => 0), 5000, "capped");
  assert.equal(backoffDelay(1, 250, 5000, () => 1), 375, "up to half again of jitter");
  Object.assign(env.nodes, saved);
  await env.clock.advance(Math.max(...env.clock.pending()));
  ws = await welcomed(env);
  const q = env.client.send("carol", "two");
  assert.deepEqual(
    ws.frames("send").map((f) => f.id),
    ["p-1", "p-2"],
    "the old send first, with its id, then the new one",
  );
  ws.deliver({ type: "delivered", id: "p-1", to: "bob" });
  assert.deepEqual(await p, { status: "delivered" });
  ws.deliver({ type: "delivered", id: "p-2", to: "carol" });
  assert.deepEqual(await q, { status: "delivered" });
  assert.equal(env.client.stats.resent, 1);
});

test("a repeated message reaches the application once and is acked each time", async () => {
  const env = setup();
  const got = [];
  env.client.on("message", (m) => got.push(m));
  env.client.start();
  const ws = await welcomed(env);
  const m = { type: "msg", seq: 1, from: "bob", id: "b-1", body: { t: 1 }, ts: 5 };
  ws.deliver(m);
  ws.deliver({ ...m, seq: 2 });
  ws.deliver({ type: "msg", seq: 3, from: "bob", id: "b-1", body: 1, ts: 6, room: "team" });
  assert.deepEqual(got, [
    { from: "bob", id: "b-1", body: { t: 1 }, ts: 5 },
    { from: "bob", id: "b-1", body: 1, ts: 6, room: "team" },
  ]);
  assert.deepEqual(ws.frames("ack").map((f) => f.seq), [1, 2, 3]);
  assert.equal(env.client.stats.duplicates, 1);
});

test("follows moved with the same token", async () => {
  const env = setup();
  env.client.start();
  await settle();
  env.sockets[0].deliver({ type: "moved", url: "ws://c/ws", node: "c" });
  await settle();
  assert.equal(env.sockets.length, 2);
  assert.equal(env.sockets[1].url, "ws://c/ws?token=tok-a");
  await welcomed(env);
  assert.equal(env.client.state, "connected");
});

test("gets a new token before the old one expires and hands it over in a refresh frame", async () => {
  const now = 1_800_000_000;
  // (No pongs in this test: pings far apart.)
  const env = setup({
    nodes: { "http://a": login("a", now + 120) },
    options: { pingIntervalMs: 1e9 },
  });
  env.client.start();
  const ws = await welcomed(env);
  env.nodes["http://a"] = () => ({
    body: { token: "tok-new", url: "ws://a/ws", node: "a", expires_at: now + 7200 },
  });
  await env.clock.advance(59_000);
  assert.equal(ws.frames("refresh").length, 0);
  await env.clock.advance(2_000);
  assert.deepEqual(ws.frames("refresh"), [{ type: "refresh", token: "tok-new" }]);
});

test("a connection that stops answering is given up and made again", async () => {
  const env = setup({ options: { pingIntervalMs: 1000 } });
  env.client.start();
  const ws = await welcomed(env);
  await env.clock.advance(1000);
  assert.equal(ws.frames("ping").length, 1);
  await env.clock.advance(2000);
  assert.equal(ws.closedWith, 4000);
  assert.equal(env.client.state, "reconnecting");
  await env.clock.advance(1000);
  assert.equal(env.sockets.length, 2);
});

test("rooms: join, room send, leave, and a re-join when a welcome lacks the room", async () => {
  const env = setup();
  env.client.start();
  let ws = await welcomed(env);
  const j = env.client.join("team");
  const jf = ws.frames("join")[0];
  assert.equal(jf.room, "team");
  ws.deliver({ type: "joined", room: "team", members: 3, id: jf.id });
  assert.deepEqual(await j, { status: "joined", members: 3 });
  assert.deepEqual(env.client.rooms, ["team"]);
  const r = env.client.sendRoom("team", "hi all");
  const rf = ws.frames("send")[0];
  assert.deepEqual(rf, { type: "send", id: rf.id, room: "team", body: "hi all" });
  ws.deliver({ type: "room_result", id: rf.id, room: "team", members: 3, delivered: 2, offline: 1, failed: 0 });
  assert.deepEqual(await r, { status: "done", members: 3, delivered: 2, offline: 1, failed: 0 });
  const f = env.client.sendRoom("ops", 1);
  const ff = ws.frames("send")[1];
  ws.deliver({ type: "failed", id: ff.id, room: "ops", reason: "forbidden" });
  assert.deepEqual(await f, { status: "failed", reason: "forbidden" });
  // The cluster forgot the membership (a whole restart): joined again without being asked.
  ws.drop(1001);
  await env.clock.advance(Math.max(...env.clock.pending()));
  ws = await welcomed(env, []);
  assert.deepEqual(ws.frames("join"), [{ type: "join", room: "team" }]);
  assert.equal(env.client.stats.rejoined, 1);
  // Another device left the room: no re-join after that.
  ws.deliver({ type: "left", room: "team" });
  assert.deepEqual(env.client.rooms, []);
  const l = env.client.leave("team");
  const lf = ws.frames("leave")[0];
  ws.deliver({ type: "left", room: "team", id: lf.id });
  assert.deepEqual(await l, { status: "left" });
});

test("a transient send is never sent again", async () => {
  const env = setup();
  env.client.start();
  const ws = await welcomed(env);
  const p = env.client.send("bob", "typing", { transient: true });
  assert.equal(ws.frames("send")[0].transient, true);
  ws.drop(1006);
  assert.deepEqual(await p, { status: "failed", reason: "unreachable" });
  const q = env.client.send("bob", "typing", { transient: true });
  assert.deepEqual(await q, { status: "failed", reason: "unreachable" }, "while disconnected");
});

test("a refused login is final, close() ends what waits, and errors are in words", async () => {
  const env = setup({
    list: ["http://a"],
    nodes: { "http://a": () => ({ status: 401, body: { error: "unauthorized", message: "wrong password" } }) },
  });
  const states = [];
  env.client.on("state", (s) => states.push(`${s.state}: ${s.detail}`));
  env.client.start();
  await settle();
  assert.equal(env.client.state, "closed");
  assert.match(states.at(-1), /wrong password/);
  const env2 = setup();
  env2.client.start();
  await welcomed(env2);
  const p = env2.client.send("bob", 1);
  env2.client.close();
  assert.deepEqual(await p, { status: "failed", reason: "closed" });
  assert.equal(closeReason(1006), "the connection was lost");
  assert.equal(closeReason(4003), "replaced by a newer connection of the same user");
  assert.throws(() => new Client({ nodes: [], uid: "x" }), TypeError);
});

test("presence asks with the session's token, at the next node when one is down", async () => {
  const asked = [];
  const env = setup();
  const login = env.client.fetch;
  env.client.fetch = async (url, init) => {
    if (!url.includes("/presence?")) return login(url, init);
    asked.push({ url, auth: init.headers.authorization });
    if (url.startsWith("http://a/")) throw new TypeError("Failed to fetch");
    return { ok: true, status: 200, json: async () => ({ presence: { bob: true, "c d": false } }) };
  };
  await assert.rejects(env.client.presence(["bob"]), /not logged in/);
  env.client.start();
  await welcomed(env);
  assert.deepEqual(await env.client.presence(["bob", "c d"]), { bob: true, "c d": false });
  assert.deepEqual(asked.at(-1), { url: "http://b/presence?uid=bob&uid=c%20d", auth: "Bearer tok-a" });
  assert.equal(asked.length, 2, "a, down, then b");
  // A refusal is an error with the server's words, not a next node.
  env.client.fetch = async () => ({ ok: false, status: 403, json: async () => ({ error: "forbidden", message: "not here" }) });
    await assert.rejects(env.client.presence(["bob"]), { message: "not here", status: 403 });
});
