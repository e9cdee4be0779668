"""The daemon's side of the matching engine: ingest listeners (``listeners``), per-source
sequence checks (``sequencing``, ``intake``), book snapshot polling (``poller``) and the routing
of private events to their owner's channels (``routing``). The engine's side (wire format,
senders, simulator) is the top-level ``ingest`` package."""
