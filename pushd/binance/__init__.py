"""A Binance-compatible surface (issue 21): Binance's public market-data dialect, spot and
USD-M futures, computed from pushd's own streams, so that Binance clients (ccxt, python-binance,
cryptofeed, binance-sdk-spot) work with only their base URLs changed. docs/binance.md is the
user's page; this is the design.

Rooms
-----
Sans-IO (tested without sockets, ``tests/test_binance_units.py``):

- ``streams``: Binance stream names (``btcusdt@depth@100ms``, ``@trade``, ``@aggTrade``,
  ``@ticker``, ``@miniTicker``, ``@kline_1m``, ``@bookTicker``, ``@depth5|10|20``,
  ``@markPrice[@1s]``) parsed into a ``Stream``: its kind and pushd's internal channel;
- ``paths``: which WebSocket paths are served (``/ws``, ``/ws/<n>``, ``/ws/<stream>``,
  ``/stream[?streams=a/b]``, under ``/public`` and ``/market`` too) and what each asks for;
- ``ids``: the dialect's depth update id, ``epoch_ms * 1000 + seq`` (below);
- ``payloads``: one native event -> that stream's Binance payloads (``Translator``);
- ``session``: one connection's requests (SUBSCRIBE, UNSUBSCRIBE, LIST_SUBSCRIPTIONS,
  SET_PROPERTY / GET_PROPERTY ``combined``) and the nested error replies.
- ``budget``: what requests cost: REST routes their Binance request weight, against a budget
  per client address (``X-MBX-USED-WEIGHT`` headers; 429 ``-1003`` with ``Retry-After``), and a
  WebSocket SUBSCRIBE a message token per hundred streams.
- ``arrays``: the all-market streams (``!ticker@arr``, ``!miniTicker@arr``,
  ``!markPrice@arr``): each second one array of the symbols that changed.

Trio and HTTP shells:

- ``dialect``: the gateway ``Dialect`` (``pushd.gateway.requests``): a session per connection,
  the request rate, server pings, and the hub views it joins and leaves;
- ``surface``: a spot or futures listener as a gateway ``Surface`` (``pushd.gateway.server``):
  its own host, port, TLS, message limit (a 200-stream SUBSCRIBE is ~5 KB; pushd's own limit
  is 4 KiB) and path rule; the daemon runs one ``Gateway`` per enabled surface, all on the
  node's one hub;
- ``rest``: ``/api/v3``, ``/fapi/v1`` and ``/dapi/v1/exchangeInfo`` on pushd's HTTP port, read
  from the native snapshot endpoints (``pushd.http.api``) so REST and streams agree by id.

One encoding per event per view
-------------------------------
The hub frames an event once per channel for pushd's protocol. A Binance subscriber joins the
channel through a *view* (``Hub.join_view``): a key ``(market, stream name, combined)`` and an
encoder (``dialect.frames``), made when the first subscriber of that key joins on this node. On
each event the route calls each view's encoder once, when it has subscribers, and appends the
same bytes to each of them. ``@trade`` and ``@aggTrade`` of one channel are two views (two
encodings), as are a raw and a combined connection's; a thousand ccxt clients of
``btcusdt@depth@100ms`` on one node share one. The hub knows nothing of Binance: a view is an
opaque key and a callable returning whole frames.

A view subscriber gets live events only: no state first (Binance has no snapshot on the
stream; clients fetch REST depth), no replay, no resync notice. One whose outbound buffer
overflows is closed (slow consumer): Binance clients resync on reconnect, and a silent hole
in a trade stream would not be seen.

Update ids never go backwards
-----------------------------
ccxt drops every depth event whose ``u`` is at or below its book's id, so ids that restart
lower freeze its book with no error. The rule (``ids``): epochs are time-prefixed
(``pushd.bus.model.new_epoch``: 12 hex digits of ms since 1970, then 4 random), and a depth
event's id is ``epoch_ms * 1000 + seq`` with ``seq`` the depth channel's bus seq -- the same on
every node (gateways, ``--workers`` children), one more per event:

- spot's ``U = previous u + 1`` and USD-M's ``pu = previous u`` hold within an epoch (each
  event is one id: ``U = u``);
- an event a node lost (bus gap), or one the dialect does not send (pushd's mid-stream
  ``snapshot`` after an engine resync takes a seq and is not sent), is a visible break: the
  client fetches REST depth again, as Binance tells it to;
- a new epoch starts above the old one unless the old epoch's seq passed 1000 x the ms between
  the two starts (depth publishes at most 100 events a second: 0.1 per ms);
- ids stay below 2**53 (JavaScript's exact integers) until the year 2255;
- an epoch that begins more than a day after this node's clock is refused (``ids.EpochGuard``):
  no depth event of it is sent and REST depth answers -1001, since its ids would stand above
  those of every correct epoch after it.

Why not the engine's own book versions (pushd's native ``U``/``u``): they restart when the
engine restarts, and a gap in them is not a lost event. Why not a counter of the dialect's own:
it would differ between nodes and restart with the process.

REST depth's ``lastUpdateId`` is the id of the depth event whose book it is: the native
snapshot endpoint's ``(epoch, seq)``. (On a gateway node with Redis that is the state the
compute node stored last, which may be a few events behind the stream: the current-state
source being unified on another branch will make it exact; ``rest.BinanceRest.depth`` is the
one place to re-point.)

Partial depth and ``bookTicker`` read the top of a book mirror (``payloads.BookMirror``, one
per view): seeded by the hub's ``current`` depth state where this process keeps the books, or
on a gateway node by the state the bus stores and the diffs after it (the view says it
``wants_state``; the Redis bus reads one as it does for a native depth join and the hub's
``offer_state`` hands it over); an event that does not follow drops the mirror's book until a
state comes again.

All-market streams
-----------------
``!ticker@arr`` and friends are no view (no one channel): while anyone follows one, the
dialect *taps* every symbol's channel of its source (``Hub.tap``: told each event, no
subscriber), keeping each symbol's latest data; one task per surface in the gateway's nursery
sends, each second, each followed stream's array, made and encoded once (``arrays``), to all
its followers (``Hub.deliver``), and ends with the last follower.

Not served yet: user-data streams, the WebSocket API, COIN-M (``/dapi`` answers no symbols),
continuous klines; see docs/binance.md.
"""
