// pgbridge's JavaScript client: every change of the tables a pgbridge server publishes, exactly once, in
// order, across drops, restarts and token expiry. One dependency-free ES module, no build step:
//
//   import { connect } from "http://127.0.0.1:8000/client.js";
//   const client = connect("ws://127.0.0.1:8000/api/v1/realtime/ws", { token });
//   client.subscribe("posts", {}, (event) => console.log(event.type, event.data));
//
// Over a WebSocket (the default) all subscriptions share one connection; with `transport: "sse"` each
// has an EventSource of its own. Either way, after any drop the client reconnects with full-jitter
// exponential backoff and resumes every subscription after the last event it delivered, and it drops
// any event that is not past that position. docs/clients.md is the reference.

const WS_PATH = "/api/v1/realtime/ws";
const SSE_PATH = "/api/v1/realtime/subscribe";
const OPERATIONS = ["create", "update", "delete"];

/** Close reasons that mean the token was refused: a new one, from `getToken`, may be accepted. */
const TOKEN_REFUSED = new Set(["Missing token", "Authentication failed", "Token expired"]);
/** Close codes after which the same request would be refused again: the client gives up. */
const FATAL_CODES = new Set([1002, 1003, 1007, 1008, 1009, 1010]);
/** ... except these reasons, which go away with time. */
const PASSING_REASONS = new Set(["Too many connections for this token"]);
/** An error reply with this text is about the server's state, not the request: subscribe again later. */
const TRANSIENT_ERROR = /subscribe again/i;
const MAX_TIMER = 2 ** 31 - 1; // setTimeout's longest delay, in ms

const DEFAULTS = Object.freeze({
  transport: "websocket",
  minReconnectDelay: 500,
  maxReconnectDelay: 20000,
  stableAfter: 5000,
  pingInterval: 25000,
  pongTimeout: 10000,
  probeTimeout: 5000,
  storage: null,
});

/**
 * Connect to a pgbridge server. The connection starts at once (in a microtask, so that subscriptions
 * made right after this call go out with the first connection).
 * @param {string} url the WebSocket URL, `ws(s)://host/api/v1/realtime/ws` (also for `transport: "sse"`)
 * @param {import("./client.d.ts").ConnectOptions} [options]
 * @returns {import("./client.d.ts").Client}
 */
export function connect(url, options = {}) {
  const settings = { ...DEFAULTS, ...options };
  if (settings.transport !== "websocket" && settings.transport !== "sse") {
    throw new TypeError(`transport must be "websocket" or "sse", not ${JSON.stringify(settings.transport)}`);
  }
  return settings.transport === "sse" ? new StreamClient(url, settings) : new SocketClient(url, settings);
}

// -- positions ----------------------------------------------------------------------------------------

const POSITION = /^\d+(\.\d+)*$/;

/**
 * Compare two event ids as tuples of integers (BigInt: their parts may exceed 2^53).
 * @returns {-1 | 0 | 1}
 */
export function compareIds(a, b) {
  const x = a.split(".").map(BigInt);
  const y = b.split(".").map(BigInt);
  for (let i = 0; i < Math.min(x.length, y.length); i += 1) {
    if (x[i] !== y[i]) return x[i] < y[i] ? -1 : 1;
  }
  return Math.sign(x.length - y.length);
}

const isPosition = (id) => typeof id === "string" && POSITION.test(id);

// -- backoff ------------------------------------------------------------------------------------------

/**
 * How long connection attempt number `attempt` waits, in ms (full jitter, as centrifuge-js): attempt 0
 * goes at once; attempt n ≥ 1 waits a uniformly random time in [0, min(max, min · 2^(n-1))].
 */
export function backoff(attempt, min = DEFAULTS.minReconnectDelay, max = DEFAULTS.maxReconnectDelay,
                        random = Math.random) {
  if (attempt <= 0) return 0;
  return Math.round(random() * Math.min(max, min * 2 ** Math.min(attempt - 1, 40)));
}

/** A connection's attempts since it was last stable, and the timer of the next one. */
class Retry {
  constructor(options) {
    this.options = options;
    this.attempt = 0;
    this.timer = null;
    this.stable = null;
  }

  /** Run `action` after the next attempt's delay, plus `retryAfter` seconds; return the delay (ms). */
  schedule(action, retryAfter = null) {
    this.cancel();
    const { minReconnectDelay, maxReconnectDelay } = this.options;
    const delay = backoff(this.attempt, minReconnectDelay, maxReconnectDelay) + (retryAfter ?? 0) * 1000;
    this.attempt += 1;
    this.timer = setTimeout(action, Math.min(delay, MAX_TIMER));
    return delay;
  }

  cancel() {
    clearTimeout(this.timer);
    this.timer = null;
  }

  /** The connection is live: once it has stayed up for `stableAfter`, the next drop retries at once. */
  up() {
    clearTimeout(this.stable);
    this.stable = setTimeout(() => (this.attempt = 0), this.options.stableAfter);
  }

  down() {
    clearTimeout(this.stable);
  }
}

/** A `Retry-After` header's value in seconds (it may be a number of seconds or an HTTP date), or null. */
function parseRetryAfter(value) {
  if (value == null || value.trim() === "") return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds);
  const when = Date.parse(value);
  return Number.isNaN(when) ? null : Math.max(0, (when - Date.now()) / 1000);
}

/**
 * Ask the server, with a plain GET, why a connection failed: a browser cannot see the status of a
 * refused WebSocket upgrade or EventSource. Resolves to `{ status, retryAfter, error }`, or null when the
 * answer cannot be read (the server is down, or a page of another origin may not read it). The body of
 * a successful answer (an event stream) is never read: the request is aborted.
 */
async function probe(url, timeout) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeout);
  try {
    const response = await fetch(url, { cache: "no-store", credentials: "omit", signal: controller.signal });
    const answer = { status: response.status, retryAfter: null, error: null };
    if ([429, 503].includes(response.status)) {
      answer.retryAfter = parseRetryAfter(response.headers.get("Retry-After"));
    }
    if (!response.ok) answer.error = await response.json().then((body) => body?.error ?? null, () => null);
    return answer;
  } catch {
    return null;
  } finally {
    clearTimeout(timer);
    controller.abort();
  }
}

// -- tokens -------------------------------------------------------------------------------------------

/** A JWT's `exp` in ms since the epoch, or null (its payload is read, never verified: the server does). */
function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const bytes = Uint8Array.from(atob(part + "=".repeat((4 - (part.length % 4)) % 4)), (c) => c.charCodeAt(0));
    const { exp } = JSON.parse(new TextDecoder().decode(bytes));
    return typeof exp === "number" ? exp * 1000 : null;
  } catch {
    return null;
  }
}

/**
 * When to replace a token that expires at `expiresAt` (ms): at 80% of its remaining lifetime or 30 s
 * before it expires, whichever is sooner, but not before half of its remaining lifetime has passed.
 */
function refreshDelay(expiresAt, now = Date.now()) {
  const left = expiresAt - now;
  return Math.max(0, Math.min(0.8 * left, left - 30000), 0.5 * left);
}

/** The token in use, and how a new one is had: `getToken`, called once after each refusal. */
class Credentials {
  constructor(token, getToken) {
    this.current = token ?? null;
    this.getToken = getToken ?? null;
    this.refusals = 0; // refusals of tokens from getToken since a token was last accepted
    this.renewing = null;
  }

  get renewable() {
    return typeof this.getToken === "function";
  }

  /** The token to connect with (from getToken when there is none yet). */
  async get() {
    if (this.renewable && !this.current) await this.renew();
    return this.current;
  }

  /** A new token from getToken (one call however many connections ask at once). */
  renew() {
    this.renewing ??= (async () => {
      try {
        const token = await this.getToken();
        if (typeof token !== "string" || !token) throw new TypeError("getToken must resolve to a JWT string");
        this.current = token;
        return token;
      } finally {
        this.renewing = null;
      }
    })();
    return this.renewing;
  }

  /** The server accepted `token`. */
  accepted(token) {
    if (token === this.current) this.refusals = 0;
  }
}

// -- subscriptions ------------------------------------------------------------------------------------

/** A short stable hash of a subscription's options: it names the position kept in `storage`. */
function optionsHash(value) {
  const canonical = (v) =>
    Array.isArray(v) ? v.map(canonical)
      : v && typeof v === "object" ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, canonical(v[k])]))
        : v;
  let hash = 0x811c9dc5; // FNV-1a, 32 bits
  for (const char of JSON.stringify(canonical(value))) {
    hash = Math.imul(hash ^ char.codePointAt(0), 0x01000193) >>> 0;
  }
  return hash.toString(36);
}

/** Call a user's function; what it throws is reported, and never stops the client. */
function safely(callback, ...args) {
  try {
    callback(...args);
  } catch (error) {
    if (typeof globalThis.reportError === "function") globalThis.reportError(error);
    else setTimeout(() => { throw error; });
  }
}

/**
 * One subscription: what it asks for, its position (the id of the last event it delivered, or its
 * starting position), and which of the server's messages it lets through to its callback.
 *
 * Phases: "idle" (not requested on the current connection), "pending" (requested, not yet confirmed:
 * anything before the confirmation belongs to a subscription this one replaced), "snapshot" (taking the
 * rows of a snapshot), "live", "ended".
 */
class Subscription {
  constructor(client, collection, options, callback) {
    this.collection = collection;
    this.client = client;
    this.callback = callback;
    const { operations, filter, snapshot = false, limit } = options;
    const known = (op) => OPERATIONS.includes(op);
    if (operations !== undefined && (!Array.isArray(operations) || !operations.every(known))) {
      throw new TypeError(`operations must be a list of ${OPERATIONS.join(", ")}`);
    }
    this.options = { operations, filter, snapshot: Boolean(snapshot), limit };
    this.phase = "idle";
    this.active = true;
    this.attempts = 0; // requests the server answered "subscribe again" to in a row, for their backoff
    this.retryTimer = null; // the next of those requests
    this.storageKey = client.storage && `pgbridge:${client.url}:${collection}:${optionsHash(this.options)}`;
    this.position = null;
    if (options.since != null && !isPosition(options.since)) {
      throw new TypeError(`since must be an event id such as "57.3.0", not ${JSON.stringify(options.since)}`);
    }
    for (const start of [options.since, this.stored()]) {
      if (!isPosition(start)) continue;
      if (this.position === null || compareIds(start, this.position) > 0) this.position = start;
    }
  }

  /** The id the subscription resumes after: its last delivered event's, or its starting position. */
  get lastId() {
    return this.position;
  }

  /** Stop receiving this collection (its callback is not called again). */
  unsubscribe() {
    if (!this.active) return;
    this.end();
    this.client.removed(this);
  }

  end() {
    this.active = false;
    this.phase = "ended";
  }

  /** Whether this request takes a snapshot: one that has no position yet. */
  get snapshotting() {
    return this.options.snapshot && this.position === null;
  }

  /** What the next request asks for (and the subscription now waits for its confirmation). */
  request() {
    this.phase = "pending";
    const { operations, filter, limit } = this.options;
    const parts = { collection: this.collection };
    if (operations !== undefined) parts.operations = operations;
    if (filter !== undefined) parts.filter = filter;
    if (this.snapshotting) {
      parts.snapshot = true;
      if (limit !== undefined) parts.limit = limit;
    } else if (this.position !== null) {
      parts.since = this.position;
    }
    return parts;
  }

  /** The connection dropped: whatever comes next must be confirmed first. */
  disconnected() {
    if (this.active) this.phase = "idle";
  }

  get confirmed() {
    return this.phase === "snapshot" || this.phase === "live";
  }

  /** One server message about this collection (the same JSON over both transports). */
  receive(body) {
    const type = body.type;
    if (!this.active || typeof type !== "string") return;
    if (type === "subscribed") return this.subscribed(body.id);
    if (!this.confirmed) return;
    if (type === "snapshot_end") return this.snapshotEnd(body.id);
    if (type === "resync_required") return this.resync(body.id ?? null);
    const op = type.slice(type.lastIndexOf(".") + 1);
    if (op === "snapshot") {
      if (this.phase !== "snapshot") return; // not in a snapshot: not one of its rows
      this.emit(event("snapshot", this.collection, "snapshot", null, null, body.data, null));
    } else if (OPERATIONS.includes(op) && this.phase === "live" && this.advance(body.id)) {
      this.emit(event("change", this.collection, op, body.id, body.timestamp ?? null, body.data, body.old ?? null));
    }
  }

  subscribed(id) {
    if (isPosition(id)) {
      this.phase = "live";
      this.advance(id);
    } else if (this.snapshotting) {
      this.phase = "snapshot";
      this.emit({ type: "snapshot_start", collection: this.collection });
    } else {
      this.phase = "live"; // resumed from an id of before ids were positions
    }
  }

  snapshotEnd(id) {
    if (this.phase !== "snapshot" || !this.advance(id)) return;
    this.phase = "live";
    this.emit({ type: "snapshot_end", collection: this.collection, id });
  }

  resync(id) {
    if (id !== null && !this.advance(id)) return;
    this.emit({ type: "resync_required", collection: this.collection, id });
  }

  /** Move the position to `id` if it is past it; false (drop the event) if it is not. */
  advance(id) {
    if (!isPosition(id)) return id != null; // an id this client cannot order: let it through
    if (this.position !== null && compareIds(id, this.position) <= 0) return false;
    this.position = id;
    this.store(id);
    return true;
  }

  /** The server refused this subscription, or ended it: the callback hears why, once, and it ends. */
  fail(error) {
    if (!this.active) return;
    this.unsubscribe();
    this.emit({ type: "error", collection: this.collection, error });
  }

  emit(message) {
    safely(this.callback, message);
  }

  stored() {
    try {
      return this.storageKey ? this.client.storage.getItem(this.storageKey) : null;
    } catch {
      return null;
    }
  }

  store(id) {
    try {
      if (this.storageKey) this.client.storage.setItem(this.storageKey, id);
    } catch {
      // storage full or refused: positions are kept in memory only
    }
  }
}

function event(type, collection, op, id, timestamp, data, old) {
  return { type, collection, op, id, timestamp, data, old };
}

const collectionOf = (type) => (typeof type === "string" ? type.slice(0, type.lastIndexOf(".")) : undefined);

// -- the client ---------------------------------------------------------------------------------------

/** What both transports share: subscriptions, state, tokens. */
class Client {
  constructor(url, options) {
    const base = typeof location === "object" && location ? location.href : undefined;
    const parsed = new URL(url, base);
    if (parsed.protocol === "http:" || parsed.protocol === "https:") {
      parsed.protocol = parsed.protocol.replace("http", "ws");
    }
    const token = options.token ?? parsed.searchParams.get("token");
    parsed.searchParams.delete("token"); // the token travels as a subprotocol, or is added for EventSource
    this.url = parsed.href;
    this.options = options;
    this.storage = options.storage ?? null;
    this.credentials = new Credentials(token, options.getToken);
    this.subscriptions = new Map(); // collection → Subscription
    this.state = "connecting";
    this.detail = {};
    this.stateListeners = new Set();
    this.heartbeatListeners = new Set();
    this.started = false;
    this.ended = false;
    this.refreshTimer = null;
    this.refreshFor = null; // the expiry (ms) the refresh timer is set for
    queueMicrotask(() => {
      if (this.ended) return;
      this.started = true;
      this.start();
    });
  }

  /**
   * Receive a collection's events. Subscribing again to a collection replaces its subscription.
   * @param {string} collection
   * @param {import("./client.d.ts").SubscribeOptions} options
   * @param {(event: import("./client.d.ts").ClientEvent) => void} callback
   */
  subscribe(collection, options, callback) {
    if (typeof options === "function") [options, callback] = [{}, options];
    if (typeof collection !== "string" || !collection) throw new TypeError("collection must be a non-empty string");
    if (typeof callback !== "function") throw new TypeError("subscribe needs a callback");
    const sub = new Subscription(this, collection, options ?? {}, callback);
    if (this.ended) {
      sub.end();
      return sub;
    }
    this.subscriptions.get(collection)?.unsubscribe();
    this.subscriptions.set(collection, sub);
    if (this.started) this.added(sub);
    return sub;
  }

  /** Call `listener(state, detail)` now and on every change of state; returns a function that stops it. */
  onState(listener) {
    this.stateListeners.add(listener);
    safely(listener, this.state, this.detail);
    return () => this.stateListeners.delete(listener);
  }

  /** Call `listener(timestamp)` on each of the server's heartbeats (WebSocket only); returns a stopper. */
  onHeartbeat(listener) {
    this.heartbeatListeners.add(listener);
    return () => this.heartbeatListeners.delete(listener);
  }

  /** Close the connection for good: state "closed" (code 1000), no reconnect. */
  close() {
    this.finish(1000, "Closed by the client");
  }

  removed(sub) {
    if (this.subscriptions.get(sub.collection) === sub) this.subscriptions.delete(sub.collection);
    this.dropped(sub);
  }

  /** The client gives up: state "closed" with the code and reason that ended it. */
  finish(code, reason, more = {}) {
    if (this.ended) return;
    this.ended = true;
    clearTimeout(this.refreshTimer);
    this.stop();
    for (const sub of this.subscriptions.values()) sub.end();
    this.setState("closed", { code, reason, ...more });
  }

  setState(state, detail = {}) {
    if (this.state === "closed") return;
    const same = state === this.state && JSON.stringify(detail) === JSON.stringify(this.detail);
    if (same && state !== "reconnecting") return; // each reconnecting report has its own attempt
    this.state = state;
    this.detail = detail;
    for (const listener of [...this.stateListeners]) safely(listener, state, detail);
  }

  heartbeat(timestamp) {
    for (const listener of [...this.heartbeatListeners]) safely(listener, timestamp);
  }

  /**
   * `token` was refused (`reason`). With getToken and no refusal since a token was last accepted, a new
   * token is fetched and true returned: connect again at once. Otherwise the client closes (false).
   */
  async tokenRefused(token, code, reason, more = {}) {
    const credentials = this.credentials;
    if (credentials.renewing || token !== credentials.current) {
      await credentials.renewing?.catch(() => {});
      return !this.ended;
    }
    if (!credentials.renewable || credentials.refusals >= 1) {
      this.finish(code, reason, more);
      return false;
    }
    credentials.refusals += 1;
    await credentials.renew(); // may throw: the caller retries later
    return !this.ended;
  }

  /**
   * Replace the token before it expires (with getToken); `expiresAt` in ms. A token that expires no
   * later than the one last scheduled (getToken gave nothing newer) is not refreshed again: when it
   * expires, the server says so, and getToken is asked once more.
   */
  scheduleRefresh(expiresAt) {
    if (!this.credentials.renewable || expiresAt == null || this.ended) return;
    if (this.refreshFor !== null && expiresAt <= this.refreshFor) return;
    this.refreshFor = expiresAt;
    clearTimeout(this.refreshTimer);
    this.refreshTimer = setTimeout(() => this.refresh(), Math.min(refreshDelay(expiresAt), MAX_TIMER));
  }

  /** getToken failed or its token was refused: try again at half the time the current token has left. */
  retryRefresh() {
    const expiresAt = tokenExpiry(this.credentials.current ?? "");
    const left = expiresAt === null ? 0 : expiresAt - Date.now();
    clearTimeout(this.refreshTimer);
    if (left <= 2000 || this.ended) return; // too late: the server will say it expired, and getToken is asked
    this.refreshTimer = setTimeout(() => this.refresh(), Math.min(left / 2, MAX_TIMER));
  }
}

// -- over a WebSocket ---------------------------------------------------------------------------------

/** All subscriptions over one WebSocket, its token refreshed in place. */
class SocketClient extends Client {
  constructor(url, options) {
    super(url, options);
    this.socket = null;
    this.retry = new Retry(options);
    this.watch = null;
  }

  start() {
    this.retry.schedule(() => this.open()); // attempt 0: at once
  }

  async open() {
    this.retry.cancel();
    let token;
    try {
      token = await this.credentials.get();
    } catch (error) {
      return this.reconnect({ code: 1006, reason: `getToken failed: ${error?.message ?? error}` }, false);
    }
    if (this.ended) return;
    let ws;
    try {
      ws = token ? new WebSocket(this.url, ["bearer", token]) : new WebSocket(this.url);
    } catch (error) {
      return this.finish(1006, `Cannot connect to ${this.url}: ${error?.message ?? error}`); // a URL no retry fixes
    }
    const connection = { ws, token, opened: false, heard: 0, pinged: false, authenticated: false, live: false };
    this.socket = connection;
    ws.onopen = () => this.opened(connection);
    ws.onmessage = (message) => this.message(connection, message.data);
    ws.onclose = (closing) => this.closed(connection, closing.code, closing.reason);
  }

  send(message) {
    if (this.socket?.ws.readyState === WebSocket.OPEN) this.socket.ws.send(JSON.stringify(message));
  }

  opened(connection) {
    if (connection !== this.socket) return;
    connection.opened = true;
    connection.heard = Date.now();
    this.startWatch(connection);
    for (const sub of this.subscriptions.values()) this.request(sub);
    this.send({ action: "ping" }); // its answer says the token was accepted, subscriptions or not
  }

  request(sub) {
    clearTimeout(sub.retryTimer);
    this.send({ action: "subscribe", ...sub.request() });
  }

  added(sub) {
    if (this.socket?.opened) this.request(sub); // else it goes out when the socket opens
  }

  dropped(sub) {
    clearTimeout(sub.retryTimer);
    if (this.socket?.opened) this.send({ action: "unsubscribe", collection: sub.collection });
    this.checkLive();
  }

  message(connection, data) {
    if (connection !== this.socket) return;
    connection.heard = Date.now();
    connection.pinged = false;
    let body;
    try {
      body = JSON.parse(data);
    } catch {
      return;
    }
    if (!body || typeof body !== "object") return;
    if (!connection.authenticated) this.authenticated(connection);
    if ("error" in body) return this.errorReply(body);
    switch (body.type) {
      case "heartbeat":
        return this.heartbeat(body.timestamp);
      case "pong":
        return this.checkLive();
      case "refreshed": {
        const token = this.credentials.current;
        this.credentials.accepted(token);
        return this.scheduleRefresh(typeof body.exp === "number" ? body.exp * 1000 : tokenExpiry(token));
      }
      case "unsubscribed":
        if (body.reason) this.subscriptions.get(body.collection)?.fail(body.reason);
        return;
    }
    const sub = this.subscriptions.get(body.collection ?? collectionOf(body.type));
    if (!sub) return;
    sub.receive(body);
    if (body.type === "subscribed") {
      sub.attempts = 0;
      this.checkLive();
    }
  }

  /** The server read a message of ours, so it accepted the token. */
  authenticated(connection) {
    connection.authenticated = true;
    this.credentials.accepted(connection.token);
    this.scheduleRefresh(tokenExpiry(connection.token ?? ""));
  }

  /** Live: the token is accepted and every subscription is confirmed (later ones do not change it). */
  checkLive() {
    const connection = this.socket;
    if (!connection?.authenticated || connection.live) return;
    if (![...this.subscriptions.values()].every((sub) => sub.confirmed)) return;
    connection.live = true;
    this.retry.up();
    this.setState("live");
  }

  errorReply(body) {
    if (body.action === "refresh") return this.refreshRefused();
    const sub = this.subscriptions.get(body.collection);
    if (!sub || !["pending", "snapshot"].includes(sub.phase)) return;
    if (!TRANSIENT_ERROR.test(body.error)) {
      sub.fail(body.error);
      return;
    }
    sub.phase = "idle"; // the server cannot serve it now: ask again, with backoff
    sub.attempts += 1;
    const delay = backoff(sub.attempts, this.options.minReconnectDelay, this.options.maxReconnectDelay);
    sub.retryTimer = setTimeout(() => sub.active && this.request(sub), delay);
  }

  async refresh() {
    const connection = this.socket;
    const standing = this.credentials.current;
    let token;
    try {
      token = await this.credentials.renew();
    } catch {
      return this.retryRefresh();
    }
    if (connection !== this.socket || !connection?.opened) return;
    connection.refreshing = { standing, token };
    this.send({ action: "refresh", token });
  }

  /** The server refused the new token: the one the connection has stands, for reconnects too. */
  refreshRefused() {
    const refreshing = this.socket?.refreshing;
    if (refreshing && this.credentials.current === refreshing.token) this.credentials.current = refreshing.standing;
    this.retryRefresh();
  }

  startWatch(connection) {
    const { pingInterval, pongTimeout } = this.options;
    if (!(pingInterval > 0)) return;
    this.watch = setInterval(() => {
      const silent = Date.now() - connection.heard;
      if (silent >= pingInterval + pongTimeout) {
        this.abandon(connection);
      } else if (silent >= pingInterval && !connection.pinged) {
        connection.pinged = true;
        this.send({ action: "ping" });
      }
    }, Math.max(100, Math.min(pingInterval, pongTimeout) / 2));
  }

  /** Nothing came back for too long: leave this socket (its close may take as long) and reconnect. */
  abandon(connection) {
    connection.ws.onclose = null;
    connection.ws.close();
    this.closed(connection, 1006, "The server stopped answering");
  }

  closed(connection, code, reason) {
    if (connection !== this.socket) return;
    this.socket = null;
    this.stopConnection();
    if (this.ended) return;
    if (code === 1008 && TOKEN_REFUSED.has(reason)) return this.refused(connection, code, reason);
    if (FATAL_CODES.has(code) && !PASSING_REASONS.has(reason)) return this.finish(code, reason);
    this.setState("reconnecting", { code, reason });
    // An upgrade refused before it opened may be the connection limit: ask for how long, where we can.
    this.reconnect({ code, reason }, !connection.opened);
  }

  async refused(connection, code, reason) {
    try {
      if (!(await this.tokenRefused(connection.token, code, reason))) return;
      this.setState("reconnecting", { code, reason, delay: 0, attempt: this.retry.attempt });
      this.open(); // at once, with the new token
    } catch (error) {
      this.reconnect({ code, reason: `${reason}; getToken failed: ${error?.message ?? error}` }, false);
    }
  }

  async reconnect(detail, probing) {
    const answer = probing ? await probe(this.url.replace(/^ws/, "http"), this.options.probeTimeout) : null;
    if (this.ended || this.socket) return;
    const retryAfter = answer?.retryAfter ?? null;
    const delay = this.retry.schedule(() => this.open(), retryAfter);
    const status = answer ? { status: answer.status } : {};
    this.setState("reconnecting", { ...detail, ...status, delay, attempt: this.retry.attempt - 1, retryAfter });
  }

  stopConnection() {
    clearInterval(this.watch);
    clearTimeout(this.refreshTimer);
    this.refreshFor = null;
    this.retry.down();
    for (const sub of this.subscriptions.values()) {
      clearTimeout(sub.retryTimer);
      sub.disconnected();
    }
  }

  stop() {
    this.retry.cancel();
    const connection = this.socket;
    this.socket = null;
    this.stopConnection();
    if (connection) {
      connection.ws.onclose = null;
      connection.ws.close(1000);
    }
  }
}

// -- over Server-Sent Events ---------------------------------------------------------------------------

/** One EventSource per subscription; a new token means reopening each stream after its position. */
class StreamClient extends Client {
  constructor(url, options) {
    super(url, options);
    const endpoint = new URL(this.url);
    endpoint.protocol = endpoint.protocol === "wss:" ? "https:" : "http:";
    endpoint.pathname = endpoint.pathname.endsWith(WS_PATH)
      ? endpoint.pathname.slice(0, -WS_PATH.length) + SSE_PATH
      : SSE_PATH;
    this.endpoint = endpoint.href;
    this.streams = new Map(); // Subscription → Stream
  }

  start() {
    for (const sub of this.subscriptions.values()) this.added(sub);
  }

  added(sub) {
    const stream = new Stream(this, sub);
    this.streams.set(sub, stream);
    stream.retry.schedule(() => stream.open()); // attempt 0: at once
  }

  dropped(sub) {
    this.streams.get(sub)?.close();
    this.streams.delete(sub);
    this.streamUp();
  }

  stop() {
    for (const stream of this.streams.values()) stream.close();
    this.streams.clear();
  }

  /** The URL of a stream with these subscription parts and token. */
  streamUrl(parts, token) {
    const url = new URL(this.endpoint);
    url.searchParams.set("collection", parts.collection);
    if (parts.operations) url.searchParams.set("operations", parts.operations.join(","));
    if (parts.filter !== undefined) url.searchParams.set("filter", JSON.stringify(parts.filter));
    if (parts.snapshot) url.searchParams.set("snapshot", "true");
    if (parts.limit !== undefined) url.searchParams.set("limit", String(parts.limit));
    if (parts.since) url.searchParams.set("since", parts.since);
    if (token) url.searchParams.set("token", token);
    return url.href;
  }

  streamUp(stream) {
    if (stream) {
      this.credentials.accepted(stream.token);
      this.scheduleRefresh(tokenExpiry(stream.token ?? ""));
    }
    if (this.ended || ![...this.streams.values()].every((s) => s.live) || !this.streams.size) return;
    this.setState("live");
  }

  streamDown(stream, detail) {
    if (!this.ended) this.setState("reconnecting", { collection: stream.sub.collection, ...detail });
  }

  async refresh() {
    try {
      await this.credentials.renew();
    } catch {
      return this.retryRefresh();
    }
    for (const stream of this.streams.values()) stream.rotate();
  }
}

/** One subscription's EventSource, reopened after its position when it fails or its token changes. */
class Stream {
  constructor(client, sub) {
    this.client = client;
    this.sub = sub;
    this.source = null;
    this.token = null;
    this.url = null;
    this.live = false;
    this.deferred = false;
    this.retry = new Retry(client.options);
  }

  async open() {
    this.retry.cancel();
    let token;
    try {
      token = await this.client.credentials.get();
    } catch (error) {
      return this.reopen({ reason: `getToken failed: ${error?.message ?? error}` });
    }
    if (!this.sub.active || this.client.ended) return;
    this.token = token;
    this.url = this.client.streamUrl(this.sub.request(), token);
    const source = new EventSource(this.url);
    this.source = source;
    const on = (name, handler) => source.addEventListener(name, (e) => source === this.source && handler(e));
    const rows = [...OPERATIONS, "snapshot"].map((op) => `${this.sub.collection}.${op}`);
    for (const name of ["subscribed", "snapshot_end", "resync_required", ...rows]) {
      on(name, (e) => this.message(e.data));
    }
    on("close", (e) => this.serverClosed(e.data));
    on("error", (e) => (e.data === undefined ? this.failed() : this.errorEvent(e.data)));
  }

  message(data) {
    let body;
    try {
      body = JSON.parse(data);
    } catch {
      return;
    }
    this.sub.receive(body);
    if (body.type === "subscribed" && this.sub.confirmed) {
      this.live = true;
      this.retry.up();
      this.client.streamUp(this);
    } else if (body.type === "snapshot_end" && this.deferred) {
      this.deferred = false;
      this.rotate();
    }
  }

  /** The server ended the stream with `{code, reason}` (expiry, shutdown, slow consumer). */
  serverClosed(data) {
    let code = 1006, reason = "";
    try {
      ({ code, reason } = JSON.parse(data));
    } catch {
      // not the server's close event: reconnect all the same
    }
    this.drop();
    if (code === 1008 && TOKEN_REFUSED.has(reason)) return this.refused(code, reason);
    this.reopen({ code, reason });
  }

  /** The server sent an error event (a snapshot that failed): subscribe again, or give up if final. */
  errorEvent(data) {
    let error = String(data);
    try {
      error = JSON.parse(data).error ?? error;
    } catch {
      // keep the raw text
    }
    if (!TRANSIENT_ERROR.test(error)) return this.fail(error);
    this.drop();
    this.reopen({ reason: error });
  }

  /** The EventSource failed: it reconnects by itself (with Last-Event-ID), or, refused, gives up. */
  failed() {
    const source = this.source;
    this.live = false;
    this.sub.disconnected();
    if (source.readyState !== EventSource.CLOSED) {
      this.client.streamDown(this, { reason: "connection lost" });
      return;
    }
    this.drop();
    this.diagnose();
  }

  /** Why the server refused the stream (an EventSource cannot see the status): ask it, then act. */
  async diagnose() {
    const answer = await probe(this.url, this.client.options.probeTimeout);
    if (!this.sub.active || this.client.ended) return;
    const status = answer?.status;
    const reason = answer?.error ?? "";
    if (status === 401) return this.refused(1008, reason || "Authentication failed", { status });
    if (status === 400 || status === 403) return this.fail(reason || `HTTP ${status}`);
    this.reopen({ reason: reason || "refused", status, retryAfter: answer?.retryAfter ?? null }, answer?.retryAfter);
  }

  async refused(code, reason, more = {}) {
    try {
      if (!(await this.client.tokenRefused(this.token, code, reason, more))) return;
      this.client.streamDown(this, { code, reason, ...more, delay: 0, attempt: this.retry.attempt });
      this.open(); // at once, with the new token
    } catch (error) {
      this.reopen({ code, reason: `${reason}; getToken failed: ${error?.message ?? error}`, ...more });
    }
  }

  /** Open again after the backoff delay (and `retryAfter` seconds). */
  reopen(detail, retryAfter = null) {
    this.live = false;
    if (!this.sub.active || this.client.ended) return;
    const delay = this.retry.schedule(() => this.open(), retryAfter);
    this.client.streamDown(this, { ...detail, delay, attempt: this.retry.attempt - 1 });
  }

  /** A new token: reopen after the position (a stream in the middle of its snapshot first finishes it). */
  rotate() {
    if (!this.source) return;
    if (this.sub.phase === "snapshot") {
      this.deferred = true;
      return;
    }
    this.drop();
    this.live = true; // a planned reopen keeps the state as it is, unless it fails
    this.open();
  }

  fail(error) {
    this.close();
    this.sub.fail(error);
  }

  /** Forget the EventSource (closed, so that it does not reconnect by itself). */
  drop() {
    this.source?.close();
    this.source = null;
    this.live = false;
    this.sub.disconnected();
  }

  close() {
    this.retry.cancel();
    this.retry.down();
    this.drop();
  }
}
