"""How messages reach the hubs of the nodes. ``model``: what every bus speaks (positions,
epochs, history, recovery; the ``Bus`` interface and ``Delivery``, what a bus delivers to;
sans-IO). The buses number each channel's messages at publish and carry them: ``memory`` (one
process) and ``redis`` (many processes and machines). The Redis bus is one link and two roles:
``link`` (coredis adapted: clients, probes, the links' states), ``publisher`` (the outbox into
Redis), ``follower`` (pub/sub, whole; ``follow`` is its per-channel subscription state,
sans-IO) and ``store`` (where a channel lives in Redis, and reading what Redis hands back).
With Redis, ``control`` carries cluster-wide commands and ``lease`` decides which compute node
publishes what.
``backplane``: the memory-or-Redis choice behind one interface (what the hub follows, the one
source of current state, REST reads, cluster-wide commands), which only the daemon builds."""
