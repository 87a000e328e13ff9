// Types of imgate.js (the module itself is plain JavaScript, no build step).

/** Settings of a {@link Client}. */
export interface ClientOptions {
  /** Node base URLs to log in at, e.g. `["https://n1.example:9501"]`; at least one. */
  nodes: string[];
  /** The user. */
  uid: string;
  /** Password, when the cluster runs `auth.mode = "users"`. */
  password?: string;
  /** First reconnect delay, doubled per attempt up to `maxBackoffMs`, plus up to 50 % jitter. Default 250. */
  minBackoffMs?: number;
  /** Longest reconnect delay before jitter. Default 5000. */
  maxBackoffMs?: number;
  /** A ping every this many ms; a connection silent for twice as long is dropped and made again. Default 15000. */
  pingIntervalMs?: number;
  /** Get a new token this many seconds before the current one expires. Default 60. */
  refreshMarginS?: number;
  /** A login request that takes longer fails over to the next node. Default 5000. */
  requestTimeoutMs?: number;
  /** Sends waiting for their outcome; more resolve `failed: rate_limited`. Default 1024. */
  maxPending?: number;
  /** Incoming `(from, id)` remembered to drop repeats. Default 10000. */
  dedupCapacity?: number;
  /** `moved` answers followed in a row while connecting. Default 3. */
  maxMoves?: number;
  /** Prefix of generated message ids (unique per client start). Default: 8 random characters. */
  idPrefix?: string;
  /** For tests and non-browser hosts: the WebSocket class, fetch, timers and randomness. */
  WebSocket?: unknown;
  fetch?: (url: string, init: object) => Promise<{ ok: boolean; status: number; json(): Promise<any> }>;
  timers?: { set(f: () => void, ms: number): unknown; clear(t: unknown): void; now(): number };
  random?: () => number;
}

/** Why something failed: the node's reason, or `closed` when the client was closed. */
export type FailReason =
  | "offline"
  | "timeout"
  | "unreachable"
  | "too_large"
  | "rate_limited"
  | "invalid"
  | "forbidden"
  | "limit"
  | "closed"
  | string;

export type SendOutcome = { status: "delivered" } | { status: "failed"; reason: FailReason };

export type RoomSendOutcome =
  | { status: "done"; members: number; delivered: number; offline: number; failed: number }
  | { status: "failed"; reason: FailReason };

export type Membership =
  | { status: "joined"; members: number }
  | { status: "left" }
  | { status: "failed"; reason: FailReason };

/** A message for the application (repeats already dropped). */
export interface Incoming {
  from: string;
  id: string;
  body: unknown;
  /** When the sender's node took it, ms since the epoch. */
  ts: number;
  /** The room, for a room message. */
  room?: string;
}

export type State = "idle" | "connecting" | "connected" | "reconnecting" | "closed";

export interface StateChange {
  state: State;
  /** What happened, in words ("the connection was lost; trying again in 2 s"). */
  detail: string;
  /** Reconnect attempts since the last welcome. */
  attempt: number;
  /** The node of the session, when known. */
  node: string | null;
}

export interface Events {
  message: Incoming;
  state: StateChange;
  moved: { node: string };
  rooms: string[];
  error: { code: string; message: string };
}

export class Client {
  constructor(options: ClientOptions);
  /** Logs in and connects; reconnects by itself until `close()`. */
  start(): void;
  /** Closes for good; what waits for an outcome resolves `failed: closed`. */
  close(): void;
  on<K extends keyof Events>(event: K, handler: (value: Events[K]) => void): () => void;
  off<K extends keyof Events>(event: K, handler: (value: Events[K]) => void): void;
  readonly state: State;
  /** The rooms this user is a member of, as far as this client knows. */
  readonly rooms: string[];
  /** Counters: resent, duplicates, sessions, rejoined, reconnects. */
  readonly stats: { resent: number; duplicates: number; sessions: number; rejoined: number; reconnects: number };
  /** More node base URLs to log in at. */
  addNodes(urls: string[]): void;
  send(to: string, body: unknown, options?: { id?: string; transient?: boolean }): Promise<SendOutcome>;
  sendRoom(room: string, body: unknown, options?: { id?: string; transient?: boolean }): Promise<RoomSendOutcome>;
  join(room: string): Promise<Membership>;
    leave(room: string): Promise<Membership>;
  /**
   * Which of `uids` (1 to 50) are online: `true`, `false`, or `null` when the node could not
   * tell. Asked with the session's token (`GET /presence`); rejects when there is no session or
      * no node answers or the server refuses; the Error's `status` is the refusal's HTTP status
   * (403: `api.user_presence = false`), 0 when no node answered.
   */
  presence(uids: string[]): Promise<Record<string, boolean | null>>;
}

/** Plain words for each reason. */
export const REASONS: Record<string, string>;
/** Plain words for a WebSocket close code. */
export function closeReason(code: number): string;
/** The delay before reconnect attempt `attempt` (1, 2, ...). */
export function backoffDelay(attempt: number, minMs: number, maxMs: number, random?: () => number): number;
