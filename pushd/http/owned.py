"""What a backend may publish, by any way in (the HTTP API, the engine link). No I/O.

Backends own ``notice`` and ``user_<uid>_<stream>``; the market channels are computed by pushd
(their seqs and depth update ids are a chain a backend must not break), so a publish to one is
refused unless the HTTP API is told otherwise (``http.allow_market_publish``, for benchmarks).
"""

from __future__ import annotations

from collections.abc import Container

import msgspec

from pushd.bus.model import Outgoing, checked
from pushd.channels import NOTICE, parse_internal
from pushd.errors import ApiError, MalformedData


def backend_message(
    channel: str,
    data: bytes | msgspec.Raw,
    symbols: Container[str],
    max_data: int,
    *,
    market_publish: bool = False,
) -> Outgoing:
    """A backend's message, once it is one it may publish: a channel it owns, data of at most
    ``max_data`` bytes that is one JSON value in UTF-8.

    Raises:
        ApiError: 400 (no such channel, data not JSON), 403 (a channel pushd computes), 413
            (data too big); its ``msg`` says which.
    """
    try:
        parsed = parse_internal(channel, symbols)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    if not (parsed.private or parsed.internal == NOTICE or market_publish):
        raise ApiError(
            403, f"{channel} is computed by pushd: publish notice or user_<uid>_<stream>"
        )
    if len(data) > max_data:
        raise ApiError(413, f"data of {channel} over {max_data} bytes")
    try:  # before a seq is taken: a message no client can be sent gets none
        raw = checked(data)
    except MalformedData as exc:
        raise ApiError(400, f"data of {channel} is not JSON in UTF-8: {exc}") from None
    return Outgoing(channel, raw)
