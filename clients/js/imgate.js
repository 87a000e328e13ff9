// imgate.js: the browser (and Node) client of an imgate cluster. One ES module, no
// dependencies, no globals. Served by every node at GET /imgate.js.
//
//   import { Client } from "/imgate.js";
//   const c = new Client({ nodes: [location.origin], uid: "alice" });
//   c.on("message", (m) => console.log(m.from, m.body));
//   c.on("state", (s) => console.log(s.state, s.detail));
//   c.start();
//   const outcome = await c.send("bob", { text: "hi" }); // {status: "delivered"} or {status: "failed", reason}
//
// Behaviour (the same as the Rust SDK, src/client.rs): log in at any node of a list, connect
// to the owner it names, follow `moved`, reconnect with exponential backoff and jitter, send
// again (same id) every send without an outcome after a reconnect, drop incoming repeats by
// (from, id), ack a message once the application's handlers have run, ping to notice a dead
// connection, get a new token before the old one expires (`refresh` frame), rooms (`join`,
// `leave`, room sends answered by one `room_result`) with a re-join of any room the session's
// `welcome.rooms` lacks, and which contacts are online (`presence`).

const DEFAULTS = {
  minBackoffMs: 250,
  maxBackoffMs: 5000,
  pingIntervalMs: 15000,
  refreshMarginS: 60,
  requestTimeoutMs: 5000,
  maxPending: 1024,
  dedupCapacity: 10000,
  maxMoves: 3,
};

const MAX_ID_BYTES = 64;

/** Why a send or a membership change ended without success, in plain words. */
export const REASONS = {
  offline: "the recipient was not connected",
  timeout: "no device of the recipient acknowledged it in time",
  unreachable: "the server that owns the recipient could not be reached",
  too_large: "the message is too large",
  rate_limited: "too many messages at once",
  invalid: "the request was not valid",
  forbidden: "you are not a member of that room",
  limit: "a room or membership limit was reached",
  closed: "the client was closed",
};

/** Words for a WebSocket close code, for people. */
export function closeReason(code) {
  switch (code) {
    case 1000: return "closed";
    case 1001: return "the server is going away";
    case 1006: return "the connection was lost";
    case 4001: return "moved to another server";
    case 4002: return "the connection could not keep up";
    case 4003: return "replaced by a newer connection of the same user";
    case 4004: return "the session expired";
    case 4005: return "signed out by the service";
    case 4008: return "too many frames";
    default: return `closed (code ${code})`;
  }
}

function byteLength(s) {
  return new TextEncoder().encode(s).length;
}

function randomPrefix(random) {
  let s = "";
  for (let i = 0; i < 8; i++) s += Math.floor(random() * 36).toString(36);
  return s;
}

/** A bounded set of recently seen keys, oldest forgotten first. */
class Seen {
  constructor(capacity) {
    this.capacity = Math.max(1, capacity);
    this.set = new Set();
  }
  /** Adds `key`; false if it was there already. */
  add(key) {
    if (this.set.has(key)) return false;
    if (this.set.size >= this.capacity) {
      const oldest = this.set.values().next().value;
      this.set.delete(oldest);
    }
    this.set.add(key);
    return true;
  }
}

/**
 * The delay before reconnect attempt `attempt` (1, 2, ...): `minMs` doubled per attempt up to
 * `maxMs`, plus up to half of it again at random.
 */
export function backoffDelay(attempt, minMs, maxMs, random = Math.random) {
  const base = Math.min(maxMs, minMs * 2 ** Math.max(0, attempt - 1));
  return Math.round(base * (1 + random() * 0.5));
}

export class Client {
  /**
   * @param {object} options see imgate.d.ts
   */
  constructor(options) {
    if (!options || typeof options.uid !== "string" || options.uid.length === 0) {
      throw new TypeError("options.uid must be a non-empty string");
    }
    const nodes = options.nodes ?? [];
    if (!Array.isArray(nodes) || nodes.length === 0) {
      throw new TypeError("options.nodes must list at least one node URL");
    }
    this.opts = { ...DEFAULTS, ...options };
    this.uid = options.uid;
    this.nodes = [...new Set(nodes.map((n) => String(n).replace(/\/+$/, "")))];
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);
    this.timers = options.timers ?? {
      set: (f, ms) => setTimeout(f, ms),
      clear: (t) => clearTimeout(t),
      now: () => Date.now(),
    };
    this.random = options.random ?? Math.random;
    this.prefix = options.idPrefix ?? randomPrefix(this.random);
    this.counter = 0;
    this.handlers = new Map();
    this.pending = new Map(); // id -> {frame, resolve, kind, transient}
    this.joins = new Map(); // id -> {room, join, resolve}
    this.roomSet = new Set();
    this.seen = new Seen(this.opts.dedupCapacity);
    this.ws = null;
    this.session = null; // {token, url, node, expiresAt}
    this.stateName = "idle";
    this.attempt = 0;
    this.startNode = Math.floor(this.random() * this.nodes.length);
    this.closed = false;
    this.timer = null;
    this.pingTimer = null;
    this.refreshTimer = null;
    this.lastHeard = 0;
    this.stats = { resent: 0, duplicates: 0, sessions: 0, rejoined: 0, reconnects: 0 };
  }

  // ----- events -----------------------------------------------------------------------------

  /** Adds a handler for `message`, `state`, `delivered`... events; returns a remover. */
  on(event, handler) {
    if (!this.handlers.has(event)) this.handlers.set(event, new Set());
    this.handlers.get(event).add(handler);
    return () => this.off(event, handler);
  }

  off(event, handler) {
    this.handlers.get(event)?.delete(handler);
  }

  emit(event, value) {
    for (const h of [...(this.handlers.get(event) ?? [])]) {
      try {
        h(value);
      } catch (e) {
        // A handler's error is the application's: it must not break the client.
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }

  setState(state, detail = "") {
    this.stateName = state;
    this.emit("state", { state, detail, attempt: this.attempt, node: this.session?.node ?? null });
  }

  /** `idle`, `connecting`, `connected`, `reconnecting` or `closed`. */
  get state() {
    return this.stateName;
  }

  /** The rooms this user is a member of, as far as this client knows. */
  get rooms() {
    return [...this.roomSet].sort();
  }

  /** More node URLs to log in at (a page learns them from `/cluster`). */
  addNodes(urls) {
    for (const u of urls) {
      const n = String(u).replace(/\/+$/, "");
      if (!this.nodes.includes(n)) this.nodes.push(n);
    }
  }

  // ----- life -------------------------------------------------------------------------------

  /** Logs in and connects; reconnects by itself until `close()`. */
  start() {
    if (this.closed || this.stateName !== "idle") return;
    this.setState("connecting");
    this.run();
  }

  /** Closes the connection for good; what waits for an outcome ends `failed: closed`. */
  close() {
    if (this.closed) return;
    this.closed = true;
    this.clearTimers();
    if (this.ws) {
      try {
        this.ws.close(1000);
      } catch (_) {
        /* already closed */
      }
      this.ws = null;
    }
    for (const p of this.pending.values()) p.resolve({ status: "failed", reason: "closed" });
    this.pending.clear();
    for (const j of this.joins.values()) j.resolve({ status: "failed", reason: "closed" });
    this.joins.clear();
    this.setState("closed");
  }

  clearTimers() {
    for (const t of [this.timer, this.pingTimer, this.refreshTimer]) {
      if (t !== null) this.timers.clear(t);
    }
    this.timer = this.pingTimer = this.refreshTimer = null;
  }

  async login() {
    const n = this.nodes.length;
    for (let i = 0; i < n; i++) {
      const base = this.nodes[(this.startNode + i) % n];
      const body = { uid: this.uid };
      if (this.opts.password !== undefined) body.password = this.opts.password;
      try {
        const resp = await this.withTimeout(
          this.fetch(`${base}/login`, {
            method: "POST",
            headers: { "content-type": "application/json" },
            body: JSON.stringify(body),
          }),
        );
        const v = await resp.json();
        if (!resp.ok) {
          // A refused login (wrong password, bad uid) is final; a busy node is not.
          if (resp.status >= 400 && resp.status < 500 && resp.status !== 408 && resp.status !== 429) {
            return { refused: v?.message ?? `login refused (${resp.status})` };
          }
          continue;
        }
        if (typeof v.token === "string" && typeof v.url === "string") {
          this.startNode = (this.startNode + i) % n;
          return { token: v.token, url: v.url, node: v.node, expiresAt: v.expires_at ?? 0 };
        }
      } catch (_) {
        // That node is down or unreachable: the next one.
      }
    }
    this.startNode = (this.startNode + 1) % n;
    return null;
  }

  withTimeout(promise) {
    return new Promise((resolve, reject) => {
      const t = this.timers.set(() => reject(new Error("timeout")), this.opts.requestTimeoutMs);
      promise.then(
        (v) => {
          this.timers.clear(t);
          resolve(v);
        },
        (e) => {
          this.timers.clear(t);
          reject(e);
        },
      );
    });
  }

  async run() {
    if (this.closed) return;
    const nowS = this.timers.now() / 1000;
    const fresh = this.session && this.session.expiresAt > nowS + this.opts.refreshMarginS;
    if (!fresh) {
      const got = await this.login();
      if (this.closed) return;
      if (got && got.refused) {
        this.setState("closed", got.refused);
        this.closed = true;
        for (const p of this.pending.values()) p.resolve({ status: "failed", reason: "closed" });
        this.pending.clear();
        return;
      }
      this.session = got;
    }
    if (!this.session) return this.retry("no server answered the login");
    this.connect(this.session.url, 0);
  }

  retry(why) {
    if (this.closed) return;
    this.attempt += 1;
    this.stats.reconnects += 1;
    const delay = backoffDelay(this.attempt, this.opts.minBackoffMs, this.opts.maxBackoffMs, this.random);
    this.setState("reconnecting", `${why}; trying again in ${Math.ceil(delay / 1000)} s`);
    this.timer = this.timers.set(() => {
      this.timer = null;
      this.run();
    }, delay);
  }

  connect(url, moves) {
    const ws = new this.WebSocket(`${url}?token=${encodeURIComponent(this.session.token)}`);
    this.ws = ws;
    let welcomed = false;
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      this.lastHeard = this.timers.now();
      let f;
      try {
        f = JSON.parse(typeof ev.data === "string" ? ev.data : "");
      } catch (_) {
        return;
      }
      if (!welcomed) {
        if (f.type === "welcome") {
          welcomed = true;
          this.onWelcome(f);
        } else if (f.type === "moved" && typeof f.url === "string") {
          this.ws = null;
          ws.onclose = null;
          try {
            ws.close(1000);
          } catch (_) {
            /* gone */
          }
          this.emit("moved", { node: f.node });
          if (moves < this.opts.maxMoves) return this.connect(f.url, moves + 1);
          this.session = null;
          return this.retry("the servers disagree on where this user lives");
        }
        return;
      }
      this.onFrame(ws, f);
    };
    ws.onclose = (ev) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.pingTimer !== null) this.timers.clear(this.pingTimer);
      if (this.refreshTimer !== null) this.timers.clear(this.refreshTimer);
      this.pingTimer = this.refreshTimer = null;
      // A send that is never sent again (transient) has an unknown outcome.
      for (const [id, p] of this.pending) {
        if (p.transient) {
          this.pending.delete(id);
          p.resolve({ status: "failed", reason: "unreachable" });
        }
      }
      if (this.closed) return;
      // The owner may be gone: ask a node again, unless it said the user moved.
      if (ev.code !== 4001) this.session = null;
      if (ev.code === 4004 || ev.code === 4005) this.session = null;
      this.retry(closeReason(ev.code));
    };
    ws.onerror = () => {};
  }

  onWelcome(f) {
    this.attempt = 0;
    this.stats.sessions += 1;
    this.session.node = f.node;
    this.setState("connected", `connected to ${f.node}`);
    const listed = new Set(Array.isArray(f.rooms) ? f.rooms : []);
    const out = [];
    // Joins and leaves without an answer, then rooms the welcome lacks.
    for (const [id, j] of this.joins) out.push({ type: j.join ? "join" : "leave", room: j.room, id });
    const leaving = new Set([...this.joins.values()].filter((j) => !j.join).map((j) => j.room));
    for (const room of this.roomSet) {
      if (!listed.has(room)) {
        this.stats.rejoined += 1;
        out.push({ type: "join", room });
      }
    }
    for (const room of listed) if (!leaving.has(room)) this.roomSet.add(room);
    // Every send without an outcome, in order, with the same id.
    for (const p of this.pending.values()) {
      this.stats.resent += 1;
      out.push(p.frame);
    }
    for (const frame of out) this.write(frame);
    this.lastHeard = this.timers.now();
    this.schedulePing();
    this.scheduleRefresh();
  }

  schedulePing() {
    this.pingTimer = this.timers.set(() => {
      this.pingTimer = null;
      if (!this.ws) return;
      if (this.timers.now() - this.lastHeard > 2 * this.opts.pingIntervalMs) {
        const ws = this.ws;
        try {
          ws.close(4000);
        } catch (_) {
          /* gone */
        }
        // Some WebSockets never report a close on a dead link: act as if they did.
        ws.onclose?.({ code: 1006 });
        return;
      }
      this.write({ type: "ping" });
      this.schedulePing();
    }, this.opts.pingIntervalMs);
  }

  scheduleRefresh() {
    const s = this.session;
    if (!s || !s.expiresAt) return;
    const leftMs = s.expiresAt * 1000 - this.timers.now();
    const lead = Math.min(this.opts.refreshMarginS * 1000, leftMs / 2);
    this.refreshTimer = this.timers.set(async () => {
      this.refreshTimer = null;
      const got = await this.login();
      if (!got || got.refused || !this.ws || this.closed) {
        if (this.ws && !this.closed) this.refreshTimer = this.timers.set(() => this.scheduleRefresh(), this.opts.maxBackoffMs);
        return;
      }
      this.session.token = got.token;
      this.session.expiresAt = got.expiresAt;
      this.write({ type: "refresh", token: got.token });
      this.scheduleRefresh();
    }, Math.max(0, leftMs - lead));
  }

  write(frame) {
    if (!this.ws || this.ws.readyState !== 1) return false;
    try {
      this.ws.send(JSON.stringify(frame));
      return true;
    } catch (_) {
      return false;
    }
  }

  onFrame(ws, f) {
    switch (f.type) {
      case "msg": {
        const key = `${f.from}\u0000${f.id}\u0000${f.room ?? ""}`;
        if (this.seen.add(key)) {
          const m = { from: f.from, id: f.id, body: f.body, ts: f.ts };
          if (typeof f.room === "string") m.room = f.room;
          this.emit("message", m);
        } else {
          this.stats.duplicates += 1;
        }
        // Acked once the handlers ran (a repeat is acked too, so that it stops).
        this.write({ type: "ack", seq: f.seq });
        break;
      }
      case "delivered":
        this.settle(f.id, { status: "delivered" });
        break;
      case "room_result":
        this.settle(f.id, {
          status: "done",
          members: f.members,
          delivered: f.delivered,
          offline: f.offline,
          failed: f.failed,
        });
        break;
      case "failed": {
        const j = this.joins.get(f.id);
        if (j) {
          this.joins.delete(f.id);
          j.resolve({ status: "failed", reason: f.reason });
          break;
        }
        this.settle(f.id, { status: "failed", reason: f.reason });
        break;
      }
      case "joined":
      case "left": {
        const j = f.id !== undefined ? this.joins.get(f.id) : undefined;
        if (f.type === "joined") this.roomSet.add(f.room);
        else this.roomSet.delete(f.room);
        if (j) {
          this.joins.delete(f.id);
          j.resolve(f.type === "joined" ? { status: "joined", members: f.members } : { status: "left" });
        }
        this.emit("rooms", this.rooms);
        break;
      }
      case "error":
        if (f.id !== undefined && this.pending.has(f.id)) {
          this.settle(f.id, { status: "failed", reason: f.code });
        }
        this.emit("error", { code: f.code, message: f.message });
        break;
      case "moved":
        // The user's owner changed during the session: the node closes with 4001 next.
        this.emit("moved", { node: f.node });
        if (typeof f.url === "string" && this.session) this.session.url = f.url;
        break;
      default:
        break;
    }
  }

  settle(id, outcome) {
    const p = this.pending.get(id);
    if (!p) return;
    this.pending.delete(id);
    p.resolve(outcome);
  }

  // ----- requests ---------------------------------------------------------------------------

  nextId() {
    this.counter += 1;
    return `${this.prefix}-${this.counter}`;
  }

  queue(frame, transient) {
    if (this.closed) return Promise.resolve({ status: "failed", reason: "closed" });
    if (this.pending.size >= this.opts.maxPending) {
      return Promise.resolve({ status: "failed", reason: "rate_limited" });
    }
    if (byteLength(frame.id) > MAX_ID_BYTES || frame.id.length === 0) {
      return Promise.reject(new TypeError("an id is 1 to 64 bytes"));
    }
    return new Promise((resolve) => {
      // A transient send made while disconnected is stale by the time a session is up.
      if (transient && !this.write(frame)) {
        resolve({ status: "failed", reason: "unreachable" });
        return;
      }
      this.pending.set(frame.id, { frame, resolve, transient });
      if (!transient) this.write(frame);
    });
  }

  /**
   * Sends `body` to user `to`; resolves to `{status: "delivered"}` once a device of `to` acked
   * it, or `{status: "failed", reason}`. Sent again with the same id after a reconnect.
   */
  send(to, body, { id, transient = false } = {}) {
    const frame = { type: "send", id: id ?? this.nextId(), to, body };
    if (transient) frame.transient = true;
    return this.queue(frame, transient);
  }

  /**
   * Sends `body` to every member of `room`; resolves to `{status: "done", members, delivered,
   * offline, failed}` once every member's delivery ended, or `{status: "failed", reason}`.
   */
  sendRoom(room, body, { id, transient = false } = {}) {
    const frame = { type: "send", id: id ?? this.nextId(), room, body };
    if (transient) frame.transient = true;
    return this.queue(frame, transient);
  }

    /**
   * Which of `uids` (1 to 50) are online: resolves to `{uid: true | false | null}` (`null`: the
   * node could not tell). Asked with the session's token (`GET /presence`) at the node of the
      * last login, then at the others while nodes do not answer; rejects with an Error when
   * no session exists or every node failed or refused (its `status`: the refusal's HTTP status,
   * 0 when no node answered).
   */
  async presence(uids) {
    const s = this.session;
    if (!s) throw new Error("not logged in");
    const query = uids.map((u) => `uid=${encodeURIComponent(u)}`).join("&");
    const n = this.nodes.length;
        let why = "no server answered";
    let status = 0;
    for (let i = 0; i < n; i++) {
      const base = this.nodes[(this.startNode + i) % n];
      let resp, v;
      try {
        resp = await this.withTimeout(
          this.fetch(`${base}/presence?${query}`, { headers: { authorization: `Bearer ${s.token}` } }),
        );
        v = await resp.json();
      } catch (_) {
        continue; // that node is down: the next one
      }
      if (resp.ok && v && typeof v.presence === "object") return v.presence;
      why = v?.message ?? `presence refused (${resp.status})`;
      status = resp.status;
      if (status < 500) break;
    }
    // `status`: the HTTP status of a refusal (403: presence is turned off), 0 when none answered.
    throw Object.assign(new Error(why), { status });
  }

  /** Makes this user a member of `room`: `{status: "joined", members}` or `{status: "failed", reason}`. */
  join(room) {
    return this.membership(room, true);
  }

  /** Ends this user's membership of `room`: `{status: "left"}`. */
  leave(room) {
    return this.membership(room, false);
  }

  membership(room, join) {
    if (this.closed) return Promise.resolve({ status: "failed", reason: "closed" });
    if (!join) this.roomSet.delete(room);
    const id = `${this.prefix}-j${(this.counter += 1)}`;
    return new Promise((resolve) => {
      this.joins.set(id, { room, join, resolve });
      this.write({ type: join ? "join" : "leave", room, id });
    });
  }
}
