// pushd-client.js under `node --test`: its pure parts, then against a running daemon.
//
//   PUSHD_WS=ws://127.0.0.1:8765/ws PUSHD_HTTP=http://127.0.0.1:8080 \
//     node --experimental-websocket --test tests/js/
//
// Without PUSHD_WS the daemon tests are skipped with that reason; tests/test_client_js.py
// runs this file against a daemon on a simulated market, so in CI they always run.
// The token for the private stream: PUSHD_TOKEN, else the demo's GET /demo/login.

import assert from "node:assert/strict";
import { describe, it } from "node:test";

import {
  LocalBook,
  BookError,
  PushdClient,
  bookChecksum,
  crc32,
  eventName,
} from "../../pushd/static/pushd-client.js";

const WS = process.env.PUSHD_WS;
const HTTP = process.env.PUSHD_HTTP ?? "http://127.0.0.1:8080";
const SYMBOL = process.env.PUSHD_SYMBOL ?? "BTCUSDT";
const live = WS ? { timeout: 20_000 } : { skip: "PUSHD_WS is not set (no daemon to test against)" };

/** Resolves with the first `type` event's detail that `test` accepts. */
function next(target, type, test = () => true) {
  return new Promise((resolve) => {
    const listener = (event) => {
      if (test(event.detail)) {
        target.removeEventListener(type, listener);
        resolve(event.detail);
      }
    };
    target.addEventListener(type, listener);
  });
}

describe("the pure parts", () => {
  it("computes zlib's CRC-32 over UTF-8", () => {
    assert.equal(crc32("123456789"), 3421780262);
    assert.equal(crc32("é€"), 608641629);
  });

  it("computes the depth checksum as pushd does (values from pushd.market.depth)", () => {
    const bids = [["65009.3", "1.204"], ["65008.9", "0.5"]];
    assert.equal(bookChecksum(bids, [["65012.1", "0.300"]]), 2354726420);
  });

  it("keeps a book and refuses a broken chain or checksum", () => {
    const book = new LocalBook();
    const bids = [["100.1", "2"], ["100.0", "1"]];
    const asks = [["100.3", "1"]];
    book.apply({ e: "snapshot", u: 5, bids, asks, checksum: bookChecksum(bids, asks), T: 1 });
    const after = [[["100.1", "2"]], [["100.2", "4"], ["100.3", "1"]]];
    book.apply({
      e: "depthUpdate", U: 6, u: 7, pu: 5, bids: [["100.0", "0"]], asks: [["100.2", "4"]],
      checksum: bookChecksum(...after), T: 2,
    });
    assert.deepEqual([book.levels("bids"), book.levels("asks")], after);
    assert.equal(book.u, 7);
    const skip = { e: "depthUpdate", U: 9, u: 9, pu: 8, bids: [], asks: [], checksum: 0, T: 3 };
    assert.throws(() => book.apply(skip), (e) => e instanceof BookError && e.reason === "chain");
    const wrong = { e: "depthUpdate", U: 8, u: 8, pu: 7, bids: [], asks: [], checksum: 1, T: 3 };
    assert.throws(() => book.apply(wrong), (e) => e instanceof BookError && e.reason === "checksum");
    assert.equal(book.u, null); // broken: only a snapshot mends it
  });

  it("names events as the server does", () => {
    assert.equal(eventName("BTCUSDT@kline_1m"), "BTCUSDT@kline");
    assert.equal(eventName("BTCUSDT@kline_5m"), "BTCUSDT@kline_5m");
  });

  it("reports a seq jump as a gap and a new epoch as a reload", () => {
    const client = new PushdClient("ws://unused");
    const seen = [];
    client.subscribe("BTCUSDT@trades", (event, info) => seen.push([event.seq, info]));
    const gaps = [];
    client.addEventListener("gap", (e) => gaps.push(e.detail));
    for (const [seq, epoch] of [[1, "a"], [2, "a"], [5, "a"], [1, "b"]]) {
      client._event({ event: "BTCUSDT@trades", data: {}, seq, epoch });
    }
    assert.deepEqual(seen, [[1, {}], [2, {}], [5, { gap: true }], [1, { reload: true }]]);
    assert.deepEqual(gaps, [{ channel: "BTCUSDT@trades", after: 2, seq: 5 }]);
  });

  it("logs in with a fresh token when the server says its token expires", async () => {
    const tokens = ["fresh-1"];
    const client = new PushdClient("ws://unused", { token: async () => tokens.shift() });
    const sent = [];
    const ws = { readyState: 1, send: (text) => sent.push(JSON.parse(text)), close() {} };
    client._ws = ws;
    client.state = "live";
    client.uid = "1001";
    const expiring = next(client, "expiring");
    client._received(ws, JSON.stringify({ event: "@auth", data: { expiresIn: 59.9, exp: 1e9 } }));
    assert.deepEqual(await expiring, { expiresIn: 59.9, exp: 1e9 });
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(sent.length, 1);
    assert.deepEqual({ ...sent[0], id: 0 }, { op: "auth", token: "fresh-1", id: 0 });
    client._received(ws, JSON.stringify({ result: true, uid: "1001", id: sent[0].id }));
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(client.token, "fresh-1");
    assert.equal(client.uid, "1001");
    client.stop();
  });
});

describe("a subscribe's reply and the events after it in one read", () => {
  // Node's WebSocket dispatches every message of one read in one tick, before any promise
  // continuation: the reply must take effect where it stands in the stream, not after the
  // events that followed it (the daemon test saw each trade twice across a reconnect)

  it("goes on from the last event it handled: no gap after, since it on a reconnect", async () => {
    const { client, sockets, sent, seen, live } = fakeTrades();
    const first = await sockets.opened();
    first.answer(streamAt("e", 10), trade(11, "e"), trade(12, "e"));
    await live;
    first.read(trade(13, "e")); // a gap here made a book resubscribe (a "resync")
    first.drop();
    await sockets.opened();
    assert.deepEqual(seen, [[11, {}], [12, {}], [13, {}]]);
    assert.deepEqual(sent.at(-1).since, { epoch: "e", seq: 13 });
    client.stop();
  });

  it("reloads before the events that follow a refused since, without a gap or a resync", async () => {
    const { client, sockets, sent, seen, live } = fakeTrades();
    const first = await sockets.opened();
    first.answer(streamAt("old", 4), trade(5, "old"));
    await live;
    const trouble = [];
    for (const type of ["gap", "resync"]) client.addEventListener(type, (e) => trouble.push(e.detail));
    first.drop();
    const second = await sockets.opened();
    assert.deepEqual(sent.at(-1).since, { epoch: "old", seq: 5 });
    second.answer({ ...streamAt("new", 20), recovered: false, reason: "epoch" }, trade(21, "new"));
    await next(client, "recovery");
    assert.deepEqual(seen, [[5, {}], [20, { reload: true }], [21, {}]]);
    assert.deepEqual(trouble, []);
    client.stop();
  });
});

describe("against a running daemon", live, () => {
  it("keeps a book equal to GET /v1/depth at the same update id", async () => {
    const client = new PushdClient(WS).start();
    try {
      const seen = new Map(); // u -> top 100 levels, as the book stood
      const books = watcher();
      let resyncs = 0;
      client.addEventListener("resync", () => (resyncs += 1));
      client.book(SYMBOL, (book) => {
        seen.set(book.u, JSON.stringify([book.levels("bids", 100), book.levels("asks", 100)]));
        books.notify();
      });
      await books.until(() => seen.size >= 3);
      const rest = await (await fetch(`${HTTP}/v1/depth?symbol=${SYMBOL}&limit=100`)).json();
      const u = rest.data.u;
      await books.until(() => seen.has(u)); // the stream passes every u the REST can answer
      assert.equal(seen.get(u), JSON.stringify([rest.data.bids, rest.data.asks]));
      assert.equal(resyncs, 0);
    } finally {
      client.stop();
    }
  });

  it("logs in and gets its own order events", async () => {
    const token =
      process.env.PUSHD_TOKEN ?? (await (await fetch(`${HTTP}/demo/login`)).json()).token;
    const client = new PushdClient(WS).start();
    try {
      const uid = await client.login(token);
      const order = new Promise((resolve) => client.subscribe("@order", (e) => e.data && resolve(e)));
      const event = await order;
      assert.equal(event.data.uid, uid);
      assert.equal(event.data.type, "order");
    } finally {
      client.stop();
    }
  });

  it("goes on with public streams when its token is refused after a reconnect", async () => {
    const token =
      process.env.PUSHD_TOKEN ?? (await (await fetch(`${HTTP}/demo/login`)).json()).token;
    const client = new PushdClient(WS, { minBackoffMs: 50 }).start();
    try {
      await client.login(token);
      client.token = "expired"; // as if the exchange rotated its secret while we were away
      const refused = next(client, "login");
      const live = next(client, "state", (d) => d.state === "live");
      client._ws.close();
      assert.match((await refused).message, /pushd error 8/);
      await live; // not a loop of reconnects: live, logged out
      assert.equal(client.uid, null);
      assert.equal(client.reconnects, 1);
    } finally {
      client.stop();
    }
  });

  it("reconnects after a dropped connection and recovers the trades it missed", async () => {
    const client = new PushdClient(WS, { minBackoffMs: 50 }).start();
    try {
      const ids = [];
      const trades = watcher();
      let gaps = 0;
      client.addEventListener("gap", () => (gaps += 1));
      let reloads = 0;
      client.subscribe(`${SYMBOL}@trades`, (event, info) => {
        if (info.reload) reloads += 1;
        for (const trade of event.data?.trades ?? []) ids.push(trade.id);
        trades.notify();
      });
      await trades.until(() => ids.length >= 3);
      const recovery = next(client, "recovery");
      const reconnecting = next(client, "state", (d) => d.state === "reconnecting");
      client._ws.close(); // the network drops us
      await reconnecting;
      const outcome = await recovery;
      assert.deepEqual(outcome, { recovered: [`${SYMBOL}@trades`], reloaded: [] });
      const before = ids.length;
      await trades.until(() => ids.length > before + 2);
      // every trade exactly once and in order across the drop: ids rise by one
      assert.deepEqual(ids, ids.map((_, i) => ids[0] + i));
      assert.equal(gaps, 0);
      assert.equal(reloads, 0);
      assert.equal(client.reconnects, 1);
    } finally {
      client.stop();
    }
  });

  it("recovers a replay larger than its buffer while events pour in, and converges", async () => {
    // ~95 notices of 4 KB while it is away: more than the 256 KiB outbound buffer, which
    // closed it with 4002 before the reply (and again on every retry) until replays were paced;
    // fewer than the 200 messages of history, so the ones poured in before it asks (one per
    // publish round trip while it reconnects) still leave its since inside history
    const publishToken = process.env.PUSHD_PUBLISH_TOKEN;
    assert.ok(publishToken, "PUSHD_PUBLISH_TOKEN names the daemon's publish token");
    const publish = async (count) => {
      const messages = Array.from({ length: count }, () => ({
        channel: "notice", data: { pad: "z".repeat(4000) },
      }));
      const r = await fetch(`${HTTP}/v1/publish/batch`, {
        method: "POST", body: JSON.stringify({ messages }),
        headers: { authorization: `Bearer ${publishToken}`, "content-type": "application/json" },
      });
      const body = await r.text();
      assert.equal(r.status, 200, body);
      return JSON.parse(body).seqs.at(-1);
    };
    const client = new PushdClient(WS, { minBackoffMs: 50 });
    const started = next(client, "state", (d) => d.state === "live");
    let pouring = false;
    client.start();
    try {
      const seqs = [];
      const notices = watcher();
      let trouble = 0;
      for (const type of ["gap", "resync"]) client.addEventListener(type, () => (trouble += 1));
      client.subscribe("notice", (event, info) => {
        if (info.reload || info.gap || info.resync) trouble += 1;
        if (event.data) seqs.push(event.seq);
        notices.notify();
      });
      await started; // subscribed
      let last = await publish(1);
      await notices.until(() => seqs.includes(last));
      const connect = client._connect.bind(client);
      let release;
      const gate = new Promise((resolve) => (release = resolve));
      client._connect = () => gate.then(connect); // the network stays down until released
      const reconnecting = next(client, "state", (d) => d.state === "reconnecting");
      client._ws.close();
      await reconnecting;
      last = await publish(95);
      const since = Date.now();
      const recovery = next(client, "recovery");
      release();
      pouring = true;
      let pours = 0;
      const poured = (async () => {
        for (; pouring || pours < 20; pours++) last = await publish(1); // live during the replay
      })();
      const outcome = await recovery;
      const poursBefore = pours;
      assert.deepEqual(outcome, { recovered: ["notice"], reloaded: [] }, `${pours} poured first`);
      pouring = false;
      await poured;
      await notices.until(() => seqs.includes(last));
      console.log(`# converged: ${Date.now() - since} ms to recover (${poursBefore} poured first) and reach seq ${last}`);
      assert.deepEqual(seqs, seqs.map((_, i) => seqs[0] + i)); // no gap, double or reorder
      assert.equal(trouble, 0);
      assert.equal(client.reconnects, 1); // one reconnect: no 4002 loop
    } finally {
      pouring = false; // a failed assertion must not leave the pour running (node would not exit)
      client.stop();
    }
  });
});

/** Wait for a condition that callbacks change: `until(test)` resolves once `test()` holds,
 * checked at once and after every `notify()` (no polling). */
function watcher() {
  let waiting = [];
  return {
    notify() {
      waiting = waiting.filter((check) => !check());
    },
    until(test) {
      return new Promise((resolve) => {
        const check = () => test() && (resolve(), true);
        if (!check()) waiting.push(check);
      });
    },
  };
}

/** A trades event, and a subscribe's reply that puts the trades stream at `seq`. */
function trade(seq, epoch) {
  return { event: "BTCUSDT@trades", data: { trades: [] }, seq, epoch };
}
function streamAt(epoch, seq) {
  return { result: true, streams: { "BTCUSDT@trades": { epoch, seq } } };
}

/** A started client on fake sockets, subscribed to the trades stream: `seen` holds each
 * event's [seq, info], `sent` every request, `live` resolves when it is first live.
 * `sockets.opened()` resolves with the next socket once it is open; its `read(...messages)`
 * delivers messages in one tick (as one read of Node's WebSocket does), `answer(reply,
 * ...events)` reads the reply to the last request and events after it, `drop()` loses it. */
function fakeTrades() {
  const sent = [];
  const waiting = [];
  class FakeSocket {
    constructor() {
      this.readyState = 1;
      setImmediate(() => {
        this.onopen();
        waiting.shift()?.(this);
      });
    }
    send(text) {
      sent.push(JSON.parse(text));
    }
    close() {}
    read(...messages) {
      for (const message of messages) this.onmessage({ data: JSON.stringify(message) });
    }
    answer(reply, ...events) {
      this.read({ ...reply, id: sent.at(-1).id }, ...events);
    }
    drop() {
      this.readyState = 3;
      this.onclose();
    }
  }
  const client = new PushdClient("ws://unused", { WebSocket: FakeSocket, minBackoffMs: 1 });
  const seen = [];
  client.subscribe("BTCUSDT@trades", (event, info) => seen.push([event.seq, info]));
  const live = next(client, "state", (d) => d.state === "live");
  client.start();
  const sockets = { opened: () => new Promise((resolve) => waiting.push(resolve)) };
  return { client, sockets, sent, seen, live };
}
