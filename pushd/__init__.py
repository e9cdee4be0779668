"""pushd: the WebSocket push system of a digital-currency exchange, on Trio."""

__version__ = "0.1.0"
