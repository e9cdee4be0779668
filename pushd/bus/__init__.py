"""How messages reach the hubs of the nodes: the ``Publisher`` that numbers them, and the buses
that carry them (``memory``: one process; Redis: many processes and machines)."""
