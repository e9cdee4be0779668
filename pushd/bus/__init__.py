"""How messages reach the hubs of the nodes. ``model``: what every bus speaks (positions,
epochs, history, recovery; the ``Bus`` interface; sans-IO). The buses number each channel's
messages at publish and carry them: ``memory`` (one process) and ``redis`` (many processes and
machines; ``follow`` is its per-channel subscription state, sans-IO). With Redis, ``control``
carries cluster-wide commands and ``lease`` decides which compute node publishes what.
``backplane``: the memory-or-Redis choice behind one interface (what the hub follows, the one
source of current state, REST reads, cluster-wide commands), which only the daemon builds."""
