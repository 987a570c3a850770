// Types of pgbridge's JavaScript client (client.js). The reference is docs/clients.md.

export type Operation = "create" | "update" | "delete";

/** A row filter: `{column: value}` (equality) or `{column: {eq|neq|lt|lte|gt|gte: value, in: [values]}}`. */
export type Filter = Record<string, unknown>;

/** A row as the server renders it (PostgreSQL's `to_jsonb`, minus hidden columns). */
export type Row = Record<string, unknown>;

/**
 * - `connecting`: the first connection is being made.
 * - `live`: connected, the token accepted, every subscription confirmed; events flow.
 * - `reconnecting`: a connection dropped or failed; the client waits `detail.delay` ms, then tries again.
 * - `closed`: for good, after `close()` (code 1000) or a refusal that retrying cannot help.
 */
export type State = "connecting" | "live" | "reconnecting" | "closed";

export interface StateDetail {
  /** The close code: the WebSocket's, the SSE `close` event's, or 1008 for a token an SSE request was refused. */
  code?: number;
  /** The server's reason (`Token expired`, `Server shutting down`, ...), or what the client saw. */
  reason?: string;
  /** The HTTP status the client learnt by probing a failed connection, when it could read it. */
  status?: number;
  /** ms until the next attempt (reconnecting). */
  delay?: number;
  /** The number of that attempt since the connection was last stable (0 goes at once). */
  attempt?: number;
  /** The server's `Retry-After`, in seconds, when the client could read it. */
  retryAfter?: number | null;
  /** With `transport: "sse"`: the subscription whose stream this is about. */
  collection?: string;
}

export interface ConnectOptions {
  /** The JWT. Without `getToken`, a token refused or expired ends the client (state `closed`). */
  token?: string;
  /**
   * Where new tokens come from: called to connect when there is no token, before the token expires
   * (at 80% of its remaining lifetime or 30 s before, whichever is sooner, never before half of it), and
   * once after a token is refused at connect.
   */
  getToken?: () => Promise<string> | string;
  /** `"websocket"` (default): one connection for all subscriptions. `"sse"`: one EventSource each. */
  transport?: "websocket" | "sse";
  /** Keeps each subscription's position across page reloads (`localStorage`, `sessionStorage`, ...). */
  storage?: Pick<Storage, "getItem" | "setItem"> | null;
  /** Backoff: attempt n ≥ 1 waits a random time in [0, min(maxReconnectDelay, minReconnectDelay · 2^(n-1))] ms. */
  minReconnectDelay?: number;
  /** The backoff's cap, in ms (default 20000). */
  maxReconnectDelay?: number;
  /** A connection live this long (ms, default 5000) resets the backoff: the next drop retries at once. */
  stableAfter?: number;
  /** WebSocket: after this many ms without a message (default 25000) the client sends a ping... */
  pingInterval?: number;
  /** ...and gives the connection up if nothing arrives within this many ms more (default 10000). */
  pongTimeout?: number;
  /** How long a probe of a failed connection may take, in ms (default 5000). */
  probeTimeout?: number;
}

export interface SubscribeOptions {
  /** Default: every operation the token allows. */
  operations?: Operation[];
  filter?: Filter;
  /** Start with the table's rows (`snapshot` events between `snapshot_start` and `snapshot_end`). */
  snapshot?: boolean;
  /** At most this many snapshot rows. */
  limit?: number;
  /** Start after this event id (a position kept in `storage` wins when it is later). */
  since?: string;
}

export interface ChangeEvent {
  type: "change";
  collection: string;
  op: Operation;
  /** The change's position, `tick.change.row`. */
  id: string;
  /** When the statement ran in the database (ISO 8601, UTC). */
  timestamp: string | null;
  /** The new row (the deleted row, for a delete). */
  data: Row;
  /** The row before an update (and the deleted row on a delete); null on a create. */
  old: Row | null;
}

export interface SnapshotRowEvent {
  type: "snapshot";
  collection: string;
  op: "snapshot";
  id: null;
  timestamp: null;
  data: Row;
  old: null;
}

/** A snapshot begins (again, after a drop during one): forget the rows you had. */
export interface SnapshotStartEvent {
  type: "snapshot_start";
  collection: string;
}

/** The snapshot's rows are all there; changes after `id` follow. */
export interface SnapshotEndEvent {
  type: "snapshot_end";
  collection: string;
  id: string;
}

/** Your copy of the collection can no longer be kept up to date by events: reload it. Events go on. */
export interface ResyncRequiredEvent {
  type: "resync_required";
  collection: string;
  id: string | null;
}

/** The server refused or ended the subscription (not allowed, not published, invalid): it is over. */
export interface SubscriptionErrorEvent {
  type: "error";
  collection: string;
  error: string;
}

export type ClientEvent =
  | ChangeEvent
  | SnapshotRowEvent
  | SnapshotStartEvent
  | SnapshotEndEvent
  | ResyncRequiredEvent
  | SubscriptionErrorEvent;

export interface Subscription {
  readonly collection: string;
  /** The id the subscription resumes after: its last event's, else its starting position; null before either. */
  readonly lastId: string | null;
  /** False once unsubscribed, refused, or its client closed. */
  readonly active: boolean;
  unsubscribe(): void;
}

export interface Client {
  readonly state: State;
  /** Subscribing again to a collection replaces its subscription. */
  subscribe(collection: string, options: SubscribeOptions, callback: (event: ClientEvent) => void): Subscription;
  subscribe(collection: string, callback: (event: ClientEvent) => void): Subscription;
  /** Called at once with the current state, then on every change; returns a function that stops it. */
  onState(listener: (state: State, detail: StateDetail) => void): () => void;
  /** The server's heartbeats (WebSocket only: an EventSource cannot see them); returns a stopper. */
  onHeartbeat(listener: (timestamp: string) => void): () => void;
  /** Close for good: state `closed`, code 1000. */
  close(): void;
}

/** Connect to a pgbridge server: `ws(s)://host/api/v1/realtime/ws` (for `transport: "sse"` too). */
export function connect(url: string, options?: ConnectOptions): Client;

/** The delay (ms) before attempt `attempt`: 0 for attempt 0, else random in [0, min(max, min · 2^(attempt-1))]. */
export function backoff(attempt: number, min?: number, max?: number, random?: () => number): number;

/** Compare two event ids as tuples of integers (exactly, beyond 2^53). */
export function compareIds(a: string, b: string): -1 | 0 | 1;
