"""The clients' side, in rooms with one job each.

Sans-IO (plain classes, tested without sockets):

- ``protocol``: request decoding, reply and event encoding;
- ``session``: one client's login, subscriptions and request limits;
- ``hub``: channels to subscribers; encode once, frame once, bounded outlets, the dirty list;
- ``lifecycle``: a connection's phases and who writes its socket (the legal moves listed), and
  the ``Disconnect`` values it ends with;
- ``admission``: who gets in (socket caps at accept, HTTP refusals at the upgrade, accept
  errors by class), against the current config;
- ``upgrade``: the upgrade request, read by httptools when plainly valid, else by wsproto/h11;
- ``ratelimit``: token buckets and the per-connection frame budget.

Trio:

- ``connection``: one socket: its bytes in and out (one wire buffer, TLS or not), pings;
- ``writer``: the flusher and the drains (coalescing, one writer per socket);
- ``requests``: what a client's messages mean (``Dialect``; pushd's own is ``Requests``: auth,
  subscribe, unsubscribe, ping, every login's token lifetime in one task, the uid registry);
  a second dialect plugs in here;
- ``server``: the shell (``Gateway``): accepts, handshakes, reads, and ends connections.
"""
