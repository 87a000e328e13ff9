#!/usr/bin/env node
// Socket.IO 4 comparison peer for the imgate benchmark.
//
// Usage: REDIS_URL=redis://127.0.0.1:6379 node server.js <port>
// Optional env: ACK_TIMEOUT_MS (5000), PING_INTERVAL_MS (25000), PING_TIMEOUT_MS (20000), HOST (127.0.0.1)
//
// Several processes pointed at the same Redis form one cluster through
// @socket.io/redis-adapter. Semantics (1:1 chat, end-to-end ack):
//   - the client connects with auth {uid: "<user>"} and is joined to room <uid>;
//     connections without a string uid are rejected (CONNECT_ERROR);
//   - the client emits "send" {to, id, body} with an ack callback;
//   - the server broadcasts "msg" {from, id, body, ts} to room <to> with
//     emitWithAck, so the sender's ack fires only after every socket of the
//     recipient (on any node) acked:
//       delivered -> {status: "delivered", id}
//       no socket -> {status: "failed", reason: "offline", id}
//       timeout   -> {status: "failed", reason: "timeout", id}
//
// Rooms (the `bench room` scenario, Socket.IO's own rooms over the Redis adapter):
//   - "join" {room} with an ack callback: socket.join("room:" + room), acked {status: "joined"};
//   - "room_send" {room, id, body} with an ack callback: "msg" {from, id, body, ts, room} to
//     every other socket of the room with emitWithAck, so the sender's ack fires once every
//     member socket (on any node) acked: {status: "done", delivered: <sockets that acked>, id},
//     or {status: "failed", reason: "timeout", id}.
//
// Prints "ready <port>" on stdout once listening; exits cleanly on SIGTERM/SIGINT.
"use strict";

const http = require("http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const PORT = Number.parseInt(process.argv[2] || process.env.PORT || "3000", 10);
const HOST = process.env.HOST || "127.0.0.1";
const REDIS_URL = process.env.REDIS_URL || "redis://127.0.0.1:6379";
const ACK_TIMEOUT_MS = Number.parseInt(process.env.ACK_TIMEOUT_MS || "5000", 10);
const PING_INTERVAL_MS = Number.parseInt(process.env.PING_INTERVAL_MS || "25000", 10);
const PING_TIMEOUT_MS = Number.parseInt(process.env.PING_TIMEOUT_MS || "20000", 10);

if (!Number.isInteger(PORT) || PORT < 0 || PORT > 65535) {
  console.error(`invalid port: ${process.argv[2]}`);
  process.exit(2);
}
if (!Number.isInteger(ACK_TIMEOUT_MS) || ACK_TIMEOUT_MS <= 0) {
  console.error(`invalid ACK_TIMEOUT_MS: ${process.env.ACK_TIMEOUT_MS}`);
  process.exit(2);
}

async function main() {
  const pubClient = createClient({ url: REDIS_URL });
  const subClient = pubClient.duplicate();
  for (const [name, c] of [["pub", pubClient], ["sub", subClient]]) {
    c.on("error", (err) => console.error(`redis ${name} client error: ${err.message}`));
  }
  await Promise.all([pubClient.connect(), subClient.connect()]);

  const httpServer = http.createServer();
  const io = new Server(httpServer, {
    adapter: createAdapter(pubClient, subClient),
    // polling stays allowed; benchmark clients connect with transport=websocket directly
    transports: ["polling", "websocket"],
    maxHttpBufferSize: 1e6,
    perMessageDeflate: false,
    httpCompression: false,
    pingInterval: PING_INTERVAL_MS,
    pingTimeout: PING_TIMEOUT_MS,
    serveClient: false,
    cors: { origin: true },
  });

  io.use((socket, next) => {
    const auth = socket.handshake.auth || {};
    if (typeof auth.uid !== "string" || auth.uid.length === 0) {
      return next(new Error("uid required"));
    }
    next();
  });

  io.on("connection", (socket) => {
    const uid = socket.handshake.auth.uid;
    socket.data.uid = uid;
    socket.join(uid);

        socket.on("join", (payload, ack) => {
      const reply = typeof ack === "function" ? ack : () => {};
      if (payload === null || typeof payload !== "object" || typeof payload.room !== "string") {
        reply({ status: "failed", reason: "bad_request" });
        return;
      }
      socket.join(`room:${payload.room}`);
      reply({ status: "joined" });
    });

    socket.on("room_send", async (payload, ack) => {
      const reply = typeof ack === "function" ? ack : () => {};
      if (payload === null || typeof payload !== "object" || typeof payload.room !== "string") {
        reply({ status: "failed", reason: "bad_request", id: payload && payload.id });
        return;
      }
      const { room, id, body } = payload;
      try {
        const res = await io
          .to(`room:${room}`)
          .except(socket.id)
          .timeout(ACK_TIMEOUT_MS)
          .emitWithAck("msg", { from: uid, id, body, ts: Date.now(), room });
        reply({ status: "done", delivered: res.length, id });
      } catch (_err) {
        reply({ status: "failed", reason: "timeout", id });
      }
    });

    socket.on("send", async (payload, ack) => {
      const reply = typeof ack === "function" ? ack : () => {};
      if (payload === null || typeof payload !== "object" || typeof payload.to !== "string") {
        reply({ status: "failed", reason: "bad_request", id: payload && payload.id });
        return;
      }
      const { to, id, body } = payload;
      try {
        const res = await io
          .to(to)
          .timeout(ACK_TIMEOUT_MS)
          .emitWithAck("msg", { from: uid, id, body, ts: Date.now() });
        if (res.length > 0) {
          reply({ status: "delivered", id });
        } else {
          reply({ status: "failed", reason: "offline", id });
        }
      } catch (_err) {
        reply({ status: "failed", reason: "timeout", id });
      }
    });
  });

  await new Promise((resolve, reject) => {
    httpServer.once("error", reject);
    httpServer.listen(PORT, HOST, resolve);
  });
  process.stdout.write(`ready ${httpServer.address().port}\n`);

  let closing = false;
  const shutdown = async (signal) => {
    if (closing) return;
    closing = true;
    // hard stop if something hangs
    setTimeout(() => process.exit(0), 3000).unref();
    try {
      await new Promise((resolve) => io.close(() => resolve()));
    } catch (_e) {
      /* ignore */
    }
    await Promise.allSettled([pubClient.quit(), subClient.quit()]);
    console.error(`closed on ${signal}`);
    process.exit(0);
  };
  process.on("SIGTERM", () => shutdown("SIGTERM"));
  process.on("SIGINT", () => shutdown("SIGINT"));
}

main().catch((err) => {
  console.error(`fatal: ${err && err.stack ? err.stack : err}`);
  process.exit(1);
});
