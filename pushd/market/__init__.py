"""The market streams' computations: one module a stream, no I/O, no clock (``now`` is passed).

``depth`` (book diffs), ``trades`` (merged batches), ``ticker`` (rolling 24 h), ``kline``
(candles), ``funding`` (index, premium, funding rate, mark price) and ``symbol`` (all of them for
one symbol, with an outbox of what to publish). ``markets`` is the Trio shell around them.
"""
