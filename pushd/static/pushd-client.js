// pushd-client.js — a client of the pushd WebSocket protocol, for browsers and Node (>= 20).
//
// One ES module, no dependencies. It does what docs/protocol.md and docs/streams.md ask of a
// correct client, so that a front-end team does not have to:
//   - connect, log in (again after every reconnect), subscribe with request ids;
//   - track each stream's epoch and seq: a jump is a gap, a new epoch a restart;
//   - keep a local order book from the depth stream (snapshot, `pu` continuity, CRC-32
//     checksum) and resubscribe for a fresh snapshot when it breaks;
//   - reconnect with exponential backoff and jitter, then subscribe again with `since` so the
//     server replays what was missed (`recovered: true`), or say that state must be reloaded
//     (`recovered: false`);
//   - detect a dead connection with the application ping (browsers cannot send ping frames).
// docs/client.md is its guide. The demo page (index.html) is built on it.

/**
 * @typedef {[string, string]} Level  a [price, quantity] pair, exact decimal strings
 * @typedef {{epoch: string, seq: number}} Position  where a stream stands
 * @typedef {"idle"|"connecting"|"live"|"reconnecting"|"stopped"} ClientState
 * @typedef {{event: string, data?: any, seq: number, epoch: string, resync?: boolean}} StreamEvent
 * @typedef {{reload?: boolean, resync?: boolean, gap?: boolean}} EventInfo
 *   reload: the stream restarted or could not be replayed: reload what you keep of it (REST);
 *   resync: a resync notice or state (the server dropped events for a slow reader);
 *   gap: events were lost before this one (seq jump)
 * @typedef {(event: StreamEvent, info: EventInfo) => void} EventHandler
 * @typedef {{
 *   WebSocket?: any,
 *   minBackoffMs?: number,
 *   maxBackoffMs?: number,
 *   pingMs?: number,
 *   requestTimeoutMs?: number,
 *   token?: () => string | Promise<string>,
 * }} ClientOptions
 *   token: where a fresh token comes from (the exchange's backend). With it the client logs
 *   in again by itself when the server says the login's token expires (the "@auth" notice)
 *   and before every reconnect; without it, answer the "expiring" event with `login()`.
 */

const CHECKSUM_LEVELS = 10;

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

/** CRC-32 (zlib's) of the UTF-8 bytes of `text`, unsigned. */
export function crc32(text) {
  let crc = 0xffffffff;
  for (const byte of new TextEncoder().encode(text)) {
    crc = CRC_TABLE[(crc ^ byte) & 0xff] ^ (crc >>> 8);
  }
  return (crc ^ 0xffffffff) >>> 0;
}

/**
 * The depth stream's checksum of a book: top 10 of each side, best first, interleaved.
 * @param {Level[]} bids  best (highest) first
 * @param {Level[]} asks  best (lowest) first
 */
export function bookChecksum(bids, asks) {
  const parts = [];
  for (let i = 0; i < CHECKSUM_LEVELS; i++) {
    if (i < bids.length) parts.push(bids[i][0], bids[i][1]);
    if (i < asks.length) parts.push(asks[i][0], asks[i][1]);
  }
  return crc32(parts.join(":"));
}

/** The local book is broken (`reason` "chain" or "checksum"): resubscribe for a snapshot. */
export class BookError extends Error {
  /** @param {"chain"|"checksum"} reason @param {string} message */
  constructor(reason, message) {
    super(message);
    this.reason = reason;
  }
}

/** One symbol's order book, kept from its depth events exactly as docs/streams.md says. */
export class LocalBook {
  constructor() {
    /** @type {Map<string, string>} */ this.bids = new Map();
    /** @type {Map<string, string>} */ this.asks = new Map();
    /** @type {number|null} the engine book version held */ this.u = null;
    /** @type {number} engine time of the book, ms */ this.time = 0;
    this.stale = false;
    this._sorted = { bids: null, asks: null }; // each side sorted once per event, on demand
  }

  /**
   * Apply one depth event's data; throws BookError when the chain or the checksum breaks.
   * @param {any} data
   */
  apply(data) {
    if (data.e === "snapshot") {
      this.bids = new Map(data.bids);
      this.asks = new Map(data.asks);
    } else {
      if (this.u === null || data.pu !== this.u) {
        throw new BookError("chain", `depth gap: pu ${data.pu} after u ${this.u}`);
      }
      for (const [side, levels] of [[this.bids, data.bids], [this.asks, data.asks]]) {
        for (const [price, qty] of levels) {
          if (Number(qty) === 0) side.delete(price);
          else side.set(price, qty);
        }
      }
    }
    this._sorted = { bids: null, asks: null };
    this.u = data.u;
    this.time = data.T;
    this.stale = Boolean(data.stale);
    const [bids, asks] = [this.levels("bids"), this.levels("asks")];
    if (bookChecksum(bids, asks) !== data.checksum) {
      this.u = null;
      throw new BookError("checksum", `depth checksum mismatch at u ${data.u}`);
    }
  }

  /**
   * A side's levels, best first.
   * @param {"bids"|"asks"} side
   * @param {number} [limit]
   * @returns {Level[]}
   */
  levels(side, limit = Infinity) {
    if (this._sorted[side] === null) {
      const sign = side === "bids" ? -1 : 1;
      this._sorted[side] = [...this[side]].sort((a, b) => sign * (Number(a[0]) - Number(b[0])));
    }
    const sorted = this._sorted[side];
    return sorted.slice(0, Math.min(limit, sorted.length)); // a copy: the caller may keep it
  }
}

/** The name a stream's events carry (`@kline_1m` is `@kline`). */
export function eventName(channel) {
  return channel.endsWith("@kline_1m") ? channel.slice(0, -3) : channel;
}

class Subscription {
  /** @param {PushdClient} client @param {string} channel @param {EventHandler} handler */
  constructor(client, channel, handler) {
    this.client = client;
    this.channel = channel;
    this.name = eventName(channel);
    this.handler = handler;
    /** @type {Position|null} */ this.at = null;
  }

  unsubscribe() {
    this.client._unsubscribe(this);
  }
}

/**
 * A pushd connection that stays up: subscribe once, get every event, across reconnects.
 *
 * Events (an EventTarget; `detail` holds the facts):
 *   "state"    {state, attempt, delayMs}      connecting / live / reconnecting / stopped
 *   "recovery" {recovered: string[], reloaded: string[]}  after a reconnect's resubscribe
 *   "gap"      {channel, after, seq}          a seq jump: events were lost
 *   "resync"   {channel, reason}              a book resubscribed, a resync notice, an epoch
 *   "error"    {message}                      a request failed (also its promise rejects)
 *   "login"    {ok: false, message}           the token was refused after a reconnect
 *   "expiring" {expiresIn, exp}               the login's token expires soon (server's notice);
 *                                             log in with a fresh one, or 4004 closes at exp
 */
export class PushdClient extends EventTarget {
  /** @param {string} url  ws:// or wss:// URL of the gateway @param {ClientOptions} [options] */
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this.minBackoffMs = options.minBackoffMs ?? 500;
    this.maxBackoffMs = options.maxBackoffMs ?? 15_000;
    this.pingMs = options.pingMs ?? 15_000;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 10_000;
    this.tokenSource = options.token ?? null;
    /** @type {ClientState} */ this.state = "idle";
    /** @type {string|null} */ this.uid = null;
    this.token = /** @type {string|null} */ (null);
    this.reconnects = 0;
    /** @type {Map<string, Subscription>} by event name */ this.subscriptions = new Map();
    this._ws = null;
    this._ids = 0;
    /** @type {Map<number, {resolve: Function, reject: Function, timer: any}>} */
    this._pending = new Map();
    this._attempt = 0;
    this._timers = new Set();
    this._lastHeard = 0;
    this._wasLive = false;
  }

  /** Connect, and keep reconnecting until `stop()`. */
  start() {
    if (this.state === "idle" || this.state === "stopped") this._connect();
    return this;
  }

  /** Close for good: no reconnect, every pending request rejected. */
  stop() {
    this._setState("stopped");
    for (const timer of this._timers) clearTimeout(timer);
    this._timers.clear();
    clearInterval(this._pinger);
    this._failPending(new Error("client stopped"));
    if (this._ws) this._ws.close(1000);
    this._ws = null;
  }

  /**
   * Log in (and again after every reconnect); resolves with the uid.
   * @param {string} token
   */
  async login(token) {
    this.token = token;
    if (this.state !== "live") return new Promise((resolve, reject) => {
      const onState = () => {
        if (this.state === "live") {
          this.removeEventListener("state", onState);
          this.uid ? resolve(this.uid) : this.login(token).then(resolve, reject);
        }
      };
      this.addEventListener("state", onState);
    });
    const before = this.uid;
    const reply = await this.request({ op: "auth", token });
    this.uid = reply.uid;
    // the server dropped the previous user's private streams (a fresh token of the same user
    // keeps them): subscribe them for this one
    if (reply.uid !== before) this._resubscribePrivate();
    return reply.uid;
  }

  /**
   * Subscribe to a channel; `handler` gets every event (and the current state first for depth,
   * ticker, markPrice, kline). Private channels wait for a login.
   * @param {string} channel @param {EventHandler} handler
   */
  subscribe(channel, handler) {
    const sub = new Subscription(this, channel, handler);
    const old = this.subscriptions.get(sub.name);
    if (old) this._unsubscribe(old);
    this.subscriptions.set(sub.name, sub);
    if (this.state === "live" && (!channel.startsWith("@") || this.uid)) this._subscribe(sub);
    return sub;
  }

  /**
   * A local order book kept from `<symbol>@depth`; `onBook(book)` after every event. A broken
   * chain or checksum resubscribes for a new snapshot (a "resync" event says so).
   * @param {string} symbol @param {(book: LocalBook) => void} onBook
   */
  book(symbol, onBook) {
    const book = new LocalBook();
    const channel = `${symbol}@depth`;
    const sub = this.subscribe(channel, (event, info) => {
      if (!event.data) return; // a resync notice (gateway node): resubscribe below
      if (info.gap && event.data.e !== "snapshot") return this._rebook(sub, book, "gap");
      try {
        book.apply(event.data);
      } catch (error) {
        if (!(error instanceof BookError)) throw error;
        return this._rebook(sub, book, error.reason);
      }
      onBook(book);
    });
    sub.book = book;
    return sub;
  }

  /**
   * Send a request with an id; resolves with the reply, rejects with its error.
   * `onReply(reply)`, if given, runs as the reply is read, before any message after it (a
   * promise's continuation runs only after every message of the same read: Node's WebSocket
   * dispatches them in one tick); the promise resolves with what it returns.
   * @param {Record<string, any>} body @param {(reply: any) => any} [onReply]
   */
  request(body, onReply = (reply) => reply) {
    const id = ++this._ids;
    return new Promise((resolve, reject) => {
      if (!this._ws || this._ws.readyState !== 1) return reject(new Error("not connected"));
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new Error(`no reply to ${body.op} in ${this.requestTimeoutMs} ms`));
      }, this.requestTimeoutMs);
      this._pending.set(id, { resolve, reject, timer, onReply });
      this._ws.send(JSON.stringify({ ...body, id }));
    });
  }

  // -- the connection ----------------------------------------------------------------------

  _connect() {
    this._setState(this._wasLive ? "reconnecting" : "connecting");
    let ws;
    try {
      ws = new this.WebSocket(this.url);
    } catch (error) {
      return this._retry();
    }
    this._ws = ws;
    ws.onopen = () => this._opened(ws);
    ws.onmessage = (message) => this._received(ws, message.data);
    ws.onclose = () => this._closed(ws);
    ws.onerror = () => {}; // onclose follows and reconnects
  }

  async _opened(ws) {
    this._lastHeard = Date.now();
    clearInterval(this._pinger);
    this._pinger = setInterval(() => this._ping(ws), this.pingMs);
    this._pinger.unref?.(); // Node: do not keep the process alive for it
    const resumed = this._wasLive;
    const outcome = { recovered: [], reloaded: [] };
    try {
      if (this.token) await this._relogin();
      for (const sub of this.subscriptions.values()) {
        if (sub.channel.startsWith("@") && !this.uid) continue;
        const recovered = await this._subscribe(sub);
        if (recovered !== null) outcome[recovered ? "recovered" : "reloaded"].push(sub.name);
      }
    } catch (error) {
      if (ws !== this._ws) return;
      this._emit("error", { message: String(error.message ?? error) });
      return ws.close(4000); // and reconnect
    }
    if (ws !== this._ws) return;
    this._attempt = 0;
    this._wasLive = true;
    this._setState("live");
    if (resumed) this._emit("recovery", outcome);
  }

  /** Log in again after a reconnect. A refused token (expired, or the daemon's secret changed)
   * does not hold the connection hostage: public streams go on, "login" says why. */
  async _relogin() {
    try {
      if (this.tokenSource) this.token = await this.tokenSource(); // the old one may be spent
      this.uid = (await this.request({ op: "auth", token: this.token })).uid;
    } catch (error) {
      if (error.code === undefined) throw error; // no answer: the connection is broken
      this.token = null;
      this.uid = null;
      this._emit("login", { ok: false, message: error.message });
    }
  }

  _received(ws, text) {
    if (ws !== this._ws) return;
    this._lastHeard = Date.now();
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    if (message.event === "@auth") return this._expiring(message.data ?? {});
    if (message.event !== undefined) return this._event(message);
    if (message.id !== undefined && this._pending.has(message.id)) {
      const { resolve, reject, timer, onReply } = this._pending.get(message.id);
      this._pending.delete(message.id);
      clearTimeout(timer);
      if (message.code !== undefined) {
        const error = new Error(`pushd error ${message.code}: ${message.msg}`);
        error.code = message.code;
        return reject(error);
      }
      try {
        resolve(onReply(message));
      } catch (error) {
        reject(error);
      }
    }
  }

  /** The server's notice that the login's token expires soon: log in with a fresh one. */
  async _expiring(data) {
    this._emit("expiring", data);
    if (!this.tokenSource) return;
    try {
      await this.login(await this.tokenSource());
    } catch (error) {
      this._emit("error", { message: `token refresh failed: ${error.message ?? error}` });
    }
  }

  _closed(ws) {
    if (ws !== this._ws) return;
    this._ws = null;
    clearInterval(this._pinger);
    this._failPending(new Error("connection closed"));
    if (this.state !== "stopped") this._retry();
  }

  _retry() {
    if (this._wasLive) this.reconnects += 1;
    const base = Math.min(this.maxBackoffMs, this.minBackoffMs * 2 ** this._attempt);
    const delayMs = Math.round(base * (0.5 + Math.random() / 2)); // jitter: no thundering herd
    this._attempt += 1;
    this._setState(this._wasLive ? "reconnecting" : "connecting", delayMs);
    const timer = setTimeout(() => {
      this._timers.delete(timer);
      if (this.state !== "stopped") this._connect();
    }, delayMs);
    this._timers.add(timer);
  }

  _ping(ws) {
    if (ws !== this._ws) return;
    if (Date.now() - this._lastHeard > 2 * this.pingMs) return ws.close(4000); // dead: reconnect
    this.request({ op: "ping" }).catch(() => {});
  }

  // -- streams -----------------------------------------------------------------------------

  /**
   * Subscribe on the wire; with a position, `since` it. Resolves true/false (recovered or
   * not) when a position was sent, else null. The reply is taken where it stands among the
   * stream's messages (`request`'s `onReply`): the events after it are judged from the
   * position it gives, and never move it back.
   * @param {Subscription} sub
   */
  _subscribe(sub) {
    const body = { op: "subscribe", channel: sub.channel };
    const since = sub.at;
    if (since) body.since = since;
    return this.request(body, (reply) => {
      if (this.subscriptions.get(sub.name) !== sub) return null;
      const at = reply.streams?.[sub.name];
      const recovered = since ? reply.recovered === true : null;
      if (!recovered && at) sub.at = { epoch: at.epoch, seq: at.seq };
      if (recovered === false) sub.handler({ event: sub.name, seq: at?.seq ?? 0, epoch: at?.epoch ?? "" }, { reload: true });
      return recovered;
    });
  }

  _unsubscribe(sub) {
    if (this.subscriptions.get(sub.name) !== sub) return;
    this.subscriptions.delete(sub.name);
    if (this.state === "live") this.request({ op: "unsubscribe", channel: sub.channel }).catch(() => {});
  }

  _resubscribePrivate() {
    for (const sub of this.subscriptions.values()) {
      if (sub.channel.startsWith("@")) {
        sub.at = null; // a login (maybe as someone else): their streams start fresh
        this._subscribe(sub).catch((error) => this._emit("error", { message: error.message }));
      }
    }
  }

  /** @param {StreamEvent} event */
  _event(event) {
    const sub = this.subscriptions.get(event.event);
    if (!sub) return;
    /** @type {EventInfo} */
    const info = {};
    const at = sub.at;
    if (at && event.epoch !== at.epoch) {
      info.reload = true; // the numbering restarted: its history is gone
      this._emit("resync", { channel: sub.name, reason: "epoch" });
    } else if (at && event.seq > at.seq + 1) {
      info.gap = true;
      this._emit("gap", { channel: sub.name, after: at.seq, seq: event.seq });
    }
    if (event.resync) {
      info.resync = true;
      this._emit("resync", { channel: sub.name, reason: event.data ? "state" : "notice" });
    }
    if (!at || event.epoch !== at.epoch || event.seq > at.seq) {
      sub.at = { epoch: event.epoch, seq: event.seq };
    }
    sub.handler(event, info);
  }

  _rebook(sub, book, reason) {
    book.u = null;
    this._emit("resync", { channel: sub.name, reason });
    if (this.subscriptions.get(sub.name) !== sub || this.state !== "live") return;
    sub.at = null; // a plain subscribe: the snapshot comes first
    this.request({ op: "unsubscribe", channel: sub.channel })
      .then(() => this._subscribe(sub))
      .catch(() => {}); // a closed connection resubscribes on reconnect
  }

  _failPending(error) {
    for (const { reject, timer } of this._pending.values()) {
      clearTimeout(timer);
      reject(error);
    }
    this._pending.clear();
  }

  _setState(state, delayMs = 0) {
    this.state = state;
    this._emit("state", { state, attempt: this._attempt, delayMs });
  }

  _emit(type, detail) {
    const event = new Event(type);
    event.detail = detail;
    this.dispatchEvent(event);
  }
}
