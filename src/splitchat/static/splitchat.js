// splitchat.js - the browser client for splitchat (POST in, WebSocket out).
//
// A dependency-free ES module: import it straight from the page, no build step.
//
//   import { SplitchatClient } from "/splitchat/splitchat.js";
//   const client = new SplitchatClient({ token, subscriptions: ["general"] });
//   client.on("MESSAGE_CREATE", (message) => render(message));
//   client.onState((state, info) => showBanner(state));
//   client.connect();
//   await client.send("/api/channels/general/messages", { content: "hi" });
//
// Wire format: docs/protocol.md (JSON encoding only; msgpack is intentionally not shipped so the
// module stays dependency-free). Reconnect rules: docs/browser-client.md.

export const Op = Object.freeze({
  DISPATCH: 0,
  HEARTBEAT: 1,
  IDENTIFY: 2,
  RESUME: 6,
  RECONNECT: 7,
  INVALID_SESSION: 9,
  HELLO: 10,
  HEARTBEAT_ACK: 11,
  SUBSCRIBE: 12,
  UNSUBSCRIBE: 13,
});

// Close codes after which the client must not reconnect at all: the token was rejected, so
// retrying would only hammer the server with the same bad credential.
const FATAL_CLOSE_CODES = new Set([4004]);
// Close codes after which the old session cannot be resumed: start over with IDENTIFY.
const REIDENTIFY_CLOSE_CODES = new Set([4007]);
// The close code the client uses when it drops a connection on purpose but wants to RESUME
// (zombie connection, server asked for RECONNECT). 1000/1001 would end the session server-side.
export const RESUMABLE_CLIENT_CLOSE = 4000;
// Consecutive failed attempts (no HELLO) on READY's resume_gateway_url before the client falls
// back to its configured gatewayUrl for the rest of that session, still RESUMEing (the server
// answers RESUMED or INVALID_SESSION). Same rule as the Python client: a dead or wrong resume URL
// must not keep the client away from a healthy gateway forever.
export const RESUME_URL_ATTEMPTS = 2;

/** Full-jitter exponential backoff: a uniform delay in [0, min(cap, base * 2^attempt)) ms. */
export function backoffDelay(attempt, { base = 500, cap = 30000, random = Math.random } = {}) {
  const ceiling = Math.min(cap, base * 2 ** Math.max(0, attempt));
  return Math.floor(random() * ceiling);
}

/** A fresh idempotency nonce (reused on every retry of one logical send). */
export function makeNonce() {
  if (globalThis.crypto && typeof globalThis.crypto.randomUUID === "function") {
    return globalThis.crypto.randomUUID();
  }
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Raised by `request`/`send` for a final (non-retried) error response. */
export class SplitchatHTTPError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.name = "SplitchatHTTPError";
    this.status = status;
    this.body = body;
    this.code = body && body.code;
    this.errors = (body && body.errors) || {};
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const RETRYABLE_STATUS = new Set([408, 425, 429, 500, 502, 503, 504]);

/**
 * Seconds a 429/5xx answer asks the client to wait, or null without a usable hint. One rule,
 * shared with the Python client: the precise body `retry_after` (float seconds) first, else
 * `X-RateLimit-Reset-After`, else `Retry-After` (whole seconds: the least precise); capped at
 * `maxSeconds` so a bogus hint cannot park the caller for an hour.
 */
export function retryAfterSeconds(response, body, maxSeconds = 60) {
  const candidates = [
    body && typeof body.retry_after === "number" ? body.retry_after : null,
    response.headers.get("X-RateLimit-Reset-After"),
    response.headers.get("Retry-After"),
  ];
  for (const candidate of candidates) {
    if (candidate === null || candidate === undefined || candidate === "") continue;
    const seconds = Number(candidate);
    if (Number.isFinite(seconds) && seconds >= 0) return Math.min(seconds, maxSeconds);
  }
  return null;
}

function gatewayUrlFrom(gatewayUrl) {
  const url = new URL(gatewayUrl, globalThis.location ? globalThis.location.href : undefined);
  if (url.protocol === "http:") url.protocol = "ws:";
  if (url.protocol === "https:") url.protocol = "wss:";
  if (!url.searchParams.has("encoding")) url.searchParams.set("encoding", "json");
  return url.toString();
}

/**
 * One user's connection to a splitchat app: HTTP commands with retry + idempotency, and the
 * WebSocket gateway with heartbeats, zombie detection, RESUME and jittered reconnects.
 *
 * States reported to `onState` listeners: "connecting" (first connection), "ready" (READY
 * received), "reconnecting" (connection lost, retrying), "resumed" (RESUME succeeded, missed
 * events replayed), "closed" (by `close()`, or fatally: info.reason = "authentication_failed").
 */
export class SplitchatClient {
  constructor({
    token,
    baseUrl = "",
    gatewayUrl = "/gateway",
    subscriptions = [],
    properties = {},
    onResync = null,
    backoff = { base: 500, cap: 30000 },
    maxRetries = 5,
    maxRetryAfter = 60,
    connectTimeout = 10000,
    WebSocketImpl = globalThis.WebSocket,
    fetchImpl = globalThis.fetch ? globalThis.fetch.bind(globalThis) : null,
  } = {}) {
    this.token = token;
    this.baseUrl = baseUrl;
    this.gatewayUrl = gatewayUrl;
    this.subscriptions = new Set(subscriptions);
    this.properties = properties;
    this.onResync = onResync;
    this.backoff = backoff;
    this.maxRetries = maxRetries;
    this.maxRetryAfter = maxRetryAfter;
    this.connectTimeout = connectTimeout; // ms without HELLO before an attempt counts as failed
    this._WebSocket = WebSocketImpl;
    this._fetch = fetchImpl;

    this.state = "idle";
    this.sessionId = null;
    this.resumeUrl = null;
    this.seq = null; // last dispatch sequence number received (null before READY)
    this.user = null;
    this.hello = null;
    this.granted = new Set(); // channels the server granted to this session

    this._listeners = new Map(); // event type -> Set of callbacks; "*" gets every dispatch
    this._stateListeners = new Set();
    this._rateLimitListeners = new Set();
    this._ws = null;
    this._heartbeatTimer = null;
    this._awaitingAck = false;
    this._attempt = 0;
    this._reconnectTimer = null;
    this._handshakeTimer = null;
    this._viaResumeUrl = false; // the current attempt went to resumeUrl
    this._helloSeen = false; // the current socket got HELLO
    this._resumeUrlFailures = 0; // consecutive attempts on resumeUrl without HELLO
    this._stopped = true;
    this._onOnline = null;
    this._everReady = false;
    this._needsResync = false;
    // Ids of recently delivered bus events, oldest first (a Set keeps insertion order). A resume
    // on another node after a crash may re-send events the app already has, under new sequence
    // numbers ("duplicates_possible" in RESUMED); the stable event id catches them.
    this._recentIds = new Set();
    this._recentIdsMax = 8192;
  }

  // ---- events --------------------------------------------------------------------------------

  /** Call `fn(data, frame)` for every dispatch of `type` ("*" for all). Returns an unsubscriber. */
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return () => this.off(type, fn);
  }

  off(type, fn) {
    const set = this._listeners.get(type);
    if (set) set.delete(fn);
  }

  /** Call `fn(state, info)` on every connection state change. Returns an unsubscriber. */
  onState(fn) {
    this._stateListeners.add(fn);
    return () => this._stateListeners.delete(fn);
  }

  /** Call `fn({retryAfter, scope, source, op?})` whenever an HTTP 429 or a RATE_LIMITED dispatch arrives. */
  onRateLimited(fn) {
    this._rateLimitListeners.add(fn);
    return () => this._rateLimitListeners.delete(fn);
  }

  _emit(type, data, frame) {
    for (const key of [type, "*"]) {
      const set = this._listeners.get(key);
      if (!set) continue;
      for (const fn of [...set]) {
        try {
          fn(data, frame);
        } catch (err) {
          console.error("splitchat listener failed", err);
        }
      }
    }
  }

  _setState(state, info = {}) {
    this.state = state;
    for (const fn of [...this._stateListeners]) {
      try {
        fn(state, info);
      } catch (err) {
        console.error("splitchat state listener failed", err);
      }
    }
  }

  _rateLimited(info) {
    for (const fn of [...this._rateLimitListeners]) {
      try {
        fn(info);
      } catch (err) {
        console.error("splitchat rate-limit listener failed", err);
      }
    }
  }

  // ---- HTTP commands ---------------------------------------------------------------------------

  /**
   * Send an HTTP command. The same nonce (Idempotency-Key header) is used on every retry, so a
   * retried command takes effect once. Retries network errors, 408/425/5xx with full-jitter
   * backoff and 429 after its `retry_after`. Resolves to the parsed JSON body (null for 204);
   * rejects with SplitchatHTTPError for any other error status or when retries run out.
   */
  async request(method, path, { body = undefined, nonce = undefined, retries = this.maxRetries } = {}) {
    const key = nonce === undefined && method !== "GET" ? makeNonce() : nonce;
    const headers = { Accept: "application/json" };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    if (key) headers["Idempotency-Key"] = key;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const init = { method, headers, body: body === undefined ? undefined : JSON.stringify(body) };
    for (let attempt = 0; ; attempt++) {
      let response;
      try {
        response = await this._fetch(this.baseUrl + path, init);
      } catch (networkError) {
        if (attempt >= retries) throw networkError;
        await sleep(backoffDelay(attempt, this.backoff));
        continue;
      }
      const text = response.status === 204 ? "" : await response.text();
      let parsed = null;
      if (text) {
        try {
          parsed = JSON.parse(text);
        } catch {
          parsed = { message: text };
        }
      }
      if (response.ok) return parsed;
      if (response.status === 429) {
        const hint = retryAfterSeconds(response, parsed, this.maxRetryAfter);
        const retryAfter = hint === null ? backoffDelay(attempt, this.backoff) / 1000 : hint;
        this._rateLimited({
          retryAfter,
          scope: response.headers.get("X-RateLimit-Scope"),
          global: Boolean(parsed && parsed.global),
          source: "http",
        });
        if (attempt >= retries) throw new SplitchatHTTPError(429, parsed);
        await sleep(retryAfter * 1000);
        continue;
      }
      if (RETRYABLE_STATUS.has(response.status) && attempt < retries) {
        await sleep(backoffDelay(attempt, this.backoff));
        continue;
      }
      throw new SplitchatHTTPError(response.status, parsed);
    }
  }

  /** POST a command; `nonce` defaults to a fresh one. See `request`. */
  send(path, body, options = {}) {
    return this.request("POST", path, { ...options, body });
  }

  // ---- gateway ---------------------------------------------------------------------------------

  /** Open the gateway connection (idempotent). */
  connect() {
    if (!this._stopped) return;
    this._stopped = false;
    if (globalThis.addEventListener && !this._onOnline) {
      // Back online: skip the rest of the backoff wait (the wait is for an unreachable server,
      // not for a device that just regained its network).
      this._onOnline = () => {
        if (!this._stopped && this._ws === null && this._reconnectTimer !== null) {
          clearTimeout(this._reconnectTimer);
          this._reconnectTimer = null;
          this._open();
        }
      };
      globalThis.addEventListener("online", this._onOnline);
    }
    this._open();
  }

  /** Close for good: sends close 1000, which ends the session server-side. */
  close() {
    this._stopped = true;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    clearTimeout(this._handshakeTimer);
    this._handshakeTimer = null;
    this._stopHeartbeat();
    if (this._onOnline) {
      globalThis.removeEventListener("online", this._onOnline);
      this._onOnline = null;
    }
    if (this._ws) {
      const ws = this._ws;
      this._ws = null;
      ws.close(1000, "client closed");
    }
    this.sessionId = null;
    this.seq = null;
    this._setState("closed", { reason: "client" });
  }

  /** Add channels to this session (persisted across reconnects). */
  subscribe(channels) {
    const fresh = [...channels].filter((channel) => !this.subscriptions.has(channel));
    for (const channel of channels) this.subscriptions.add(channel);
    // Only what the server's limits (HELLO) can grant: the rest stays wanted, unsent.
    const fitting = this._fitting(fresh, this._limit("max_channels", 100) - this.granted.size);
    if (fitting.length) this._sendIfReady({ op: Op.SUBSCRIBE, d: { channels: fitting } });
  }

  /** The channels the server can grant: names within max_channel_length, at most `room`. */
  _fitting(channels, room) {
    const longest = this._limit("max_channel_length", 200);
    return channels.filter((c) => c.length > 0 && c.length <= longest).slice(0, Math.max(room, 0));
  }

  _limit(name, fallback) {
    const value = this.hello && this.hello[name];
    return Number.isInteger(value) && value > 0 ? value : fallback;
  }

  /** Remove channels from this session. */
  unsubscribe(channels) {
    for (const channel of channels) this.subscriptions.delete(channel);
    this._sendIfReady({ op: Op.UNSUBSCRIBE, d: { channels: [...channels] } });
  }

  _sendIfReady(frame) {
    if (this._ws && this._ws.readyState === 1 && this.sessionId) this._ws.send(JSON.stringify(frame));
  }

  _open() {
    if (this.state !== "reconnecting") this._setState("connecting", { attempt: this._attempt });
    this._viaResumeUrl = Boolean(
      this.sessionId && this.resumeUrl && this._resumeUrlFailures < RESUME_URL_ATTEMPTS,
    );
    this._helloSeen = false;
    const url = gatewayUrlFrom(this._viaResumeUrl ? this.resumeUrl : this.gatewayUrl);
    let ws;
    try {
      ws = new this._WebSocket(url);
    } catch (err) {
      this._scheduleReconnect({ error: String(err), ...this._attemptEnded() });
      return;
    }
    this._ws = ws;
    // A host that accepts but never answers (black-holed, half-dead node) would otherwise hold
    // this attempt for the browser's own minutes-long timeout.
    this._handshakeTimer = setTimeout(() => {
      this._handshakeTimer = null;
      if (this._ws === ws && !this._helloSeen) this._drop(ws, "no HELLO in time");
    }, this.connectTimeout);
    ws.onmessage = (message) => {
      if (this._ws !== ws) return;
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        return; // not ours to crash on; the server only sends JSON in this encoding
      }
      this._handleFrame(ws, frame);
    };
    ws.onclose = (event) => {
      if (this._ws !== ws) return; // a socket we already abandoned
      this._ws = null;
      this._stopHeartbeat();
      this._handleClose(event.code, event.reason, this._attemptEnded());
    };
    ws.onerror = () => {}; // always followed by onclose, which decides what to do
  }

  _handleFrame(ws, frame) {
    switch (frame.op) {
      case Op.HELLO:
        clearTimeout(this._handshakeTimer);
        this._handshakeTimer = null;
        this._helloSeen = true;
        if (this._viaResumeUrl) this._resumeUrlFailures = 0; // it answers: keep using it
        this.hello = frame.d;
        this._startHeartbeat(ws, frame.d.heartbeat_interval);
        if (this.sessionId && this.seq !== null) {
          ws.send(
            JSON.stringify({
              op: Op.RESUME,
              d: { token: this.token, session_id: this.sessionId, seq: this.seq },
            }),
          );
        } else {
          ws.send(
            JSON.stringify({
              op: Op.IDENTIFY,
              d: {
                token: this.token,
                subscriptions: this._fitting([...this.subscriptions], this._limit("max_channels", 100)),
                properties: this.properties,
              },
            }),
          );
        }
        return;
      case Op.HEARTBEAT:
        this._sendHeartbeat(ws);
        return;
      case Op.HEARTBEAT_ACK:
        this._awaitingAck = false;
        return;
      case Op.RECONNECT:
        this._drop(ws, "server asked to reconnect");
        return;
      case Op.INVALID_SESSION:
        if (!frame.d) {
          // The session is gone: events may have been missed, so the app must refetch.
          this.sessionId = null;
          this.seq = null;
          this._needsResync = true;
        }
        this._drop(ws, "invalid session");
        return;
      case Op.DISPATCH:
        this._handleDispatch(frame);
        return;
      default:
        return;
    }
  }

  _handleDispatch(frame) {
    if (typeof frame.s === "number") {
      // A replay may overlap with what we already saw; never deliver a sequence number twice.
      if (this.seq !== null && frame.s <= this.seq && frame.t !== "READY") return;
      this.seq = frame.s;
    }
    if (typeof frame.id === "string") {
      if (this._recentIds.has(frame.id)) return; // the same event already reached the app
      this._recentIds.add(frame.id);
      if (this._recentIds.size > this._recentIdsMax) {
        this._recentIds.delete(this._recentIds.values().next().value);
      }
    }
    if (frame.t === "READY") {
      this.granted = new Set(frame.d.subscriptions || []);
      this.sessionId = frame.d.session_id;
      this.resumeUrl = frame.d.resume_gateway_url || null;
      this._resumeUrlFailures = 0; // a new session: its resume URL gets its own chances
      this.user = frame.d.user;
      this._attempt = 0;
      const resync = this._everReady || this._needsResync;
      this._everReady = true;
      this._needsResync = false;
      this._setState("ready", { resync, user: frame.d.user });
      this._emit("READY", frame.d, frame);
      if (resync && this.onResync) this.onResync(frame.d);
      return;
    }
    if (frame.t === "RESUMED") {
      this._attempt = 0;
      this._setState("resumed", frame.d || {});
      this._emit("RESUMED", frame.d, frame);
      return;
    }
    if (frame.t === "SUBSCRIBED") for (const c of frame.d.granted || []) this.granted.add(c);
    if (frame.t === "UNSUBSCRIBED") for (const c of frame.d.channels || []) this.granted.delete(c);
    if (frame.t === "RATE_LIMITED") {
      this._rateLimited({ retryAfter: frame.d.retry_after, op: frame.d.op, source: "gateway" });
    }
    this._emit(frame.t, frame.d, frame);
  }

  _startHeartbeat(ws, intervalMs) {
    this._stopHeartbeat();
    this._awaitingAck = false;
    const beat = () => {
      if (this._ws !== ws) return;
      if (this._awaitingAck) {
        // No ACK since the last beat: the connection is a zombie (half-open). Drop it and resume.
        this._drop(ws, "zombie connection");
        return;
      }
      this._sendHeartbeat(ws);
      this._heartbeatTimer = setTimeout(beat, intervalMs);
    };
    // Jittered first beat: after a server restart, clients do not all beat in lockstep.
    this._heartbeatTimer = setTimeout(beat, Math.floor(intervalMs * Math.random()));
  }

  _sendHeartbeat(ws) {
    if (ws.readyState !== 1) return;
    this._awaitingAck = true;
    ws.send(JSON.stringify({ op: Op.HEARTBEAT, d: this.seq }));
  }

  _stopHeartbeat() {
    clearTimeout(this._heartbeatTimer);
    this._heartbeatTimer = null;
  }

  // Abandon a socket on purpose while keeping the session resumable (close code 4000), then
  // reconnect. The socket is detached first so its late close event cannot trigger a second
  // reconnect.
  _drop(ws, reason) {
    if (this._ws === ws) this._ws = null;
    this._stopHeartbeat();
    try {
      ws.close(RESUMABLE_CLIENT_CLOSE, reason);
    } catch {
      // already closing
    }
    this._scheduleReconnect({ reason, ...this._attemptEnded() });
  }

  // Bookkeeping when a connection attempt ends (however it ended): an attempt on the resume URL
  // that never got HELLO counts against it. Returns extra info for the "reconnecting" state.
  _attemptEnded() {
    clearTimeout(this._handshakeTimer);
    this._handshakeTimer = null;
    const failed = this._viaResumeUrl && !this._helloSeen;
    this._viaResumeUrl = false;
    if (!failed) return {};
    this._resumeUrlFailures += 1;
    return this._resumeUrlFailures === RESUME_URL_ATTEMPTS ? { resumeUrlGivenUp: true } : {};
  }

  _handleClose(code, reason, attemptInfo = {}) {
    if (this._stopped) return;
    if (FATAL_CLOSE_CODES.has(code)) {
      this._stopped = true;
      this.sessionId = null;
      this.seq = null;
      this._setState("closed", { reason: "authentication_failed", code });
      return;
    }
    if (REIDENTIFY_CLOSE_CODES.has(code)) {
      this.sessionId = null;
      this.seq = null;
      this._needsResync = true;
    }
    this._scheduleReconnect({ code, reason, ...attemptInfo });
  }

  _scheduleReconnect(info) {
    if (this._stopped) return;
    clearTimeout(this._reconnectTimer);
    const delay = backoffDelay(this._attempt, this.backoff);
    this._attempt += 1;
    this._setState("reconnecting", { ...info, delay, attempt: this._attempt });
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      if (!this._stopped) this._open();
    }, delay);
  }
}
