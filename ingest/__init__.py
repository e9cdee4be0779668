"""The matching-engine side of pushd: wire format, senders, snapshot server."""
