"""The HTTP API: publish, control, REST snapshots, health, metrics, the page."""
