"""The clients' side: the WebSocket protocol (``protocol``), a connection's subscriptions and
limits (``session``), the fan-out (``hub``) and the Trio shell that serves sockets (``server``)."""
