"""Protocol <-> internal channel names, including every row of the request's table."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pushd.channels import (
    KLINE_INTERVALS,
    PRIVATE_STREAMS,
    UID_PATTERN,
    parse_internal,
    private_channel,
    resolve,
)
from pushd.errors import ErrorCode, RequestError

SYMBOLS = frozenset({"BTCUSDT", "ETHUSDT"})

TABLE = [
    ("BTCUSDT@depth", "depth_BTCUSDT", False),
    ("BTCUSDT@trades", "trades_BTCUSDT", False),
    ("BTCUSDT@markPrice", "markprice_BTCUSDT", False),
    ("BTCUSDT@ticker", "ticker_BTCUSDT", False),
    ("BTCUSDT@kline", "kline_BTCUSDT", False),
    ("BTCUSDT@kline_5m", "kline_BTCUSDT_5m", False),
    ("notice", "notice", False),
    ("@balance", "user_1001_balance", True),
    ("@order", "user_1001_order", True),
    ("@position", "user_1001_position", True),
    ("@account", "user_1001_account", True),
]


@pytest.mark.parametrize(("protocol", "internal", "private"), TABLE)
def test_table_both_ways(protocol: str, internal: str, private: bool) -> None:
    channel = resolve(protocol, SYMBOLS, "1001")
    assert (channel.internal, channel.private, channel.protocol) == (internal, private, protocol)
    back = parse_internal(internal, SYMBOLS)
    assert (back.internal, back.protocol, back.private) == (internal, protocol, private)


def test_kline_1m_is_kline() -> None:
    assert resolve("BTCUSDT@kline_1m", SYMBOLS, None).internal == "kline_BTCUSDT"
    assert resolve("BTCUSDT@kline_1m", SYMBOLS, None).protocol == "BTCUSDT@kline"


@pytest.mark.parametrize("interval", KLINE_INTERVALS)
def test_every_kline_interval(interval: str) -> None:
    channel = resolve(f"ETHUSDT@kline_{interval}", SYMBOLS, None)
    assert parse_internal(channel.internal, SYMBOLS).protocol == channel.protocol


@pytest.mark.parametrize("stream", PRIVATE_STREAMS)
def test_private_needs_login(stream: str) -> None:
    with pytest.raises(RequestError) as info:
        resolve(f"@{stream}", SYMBOLS, None)
    assert info.value.code is ErrorCode.LOGIN_REQUIRED


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("user_1002_balance", ErrorCode.UNKNOWN_CHANNEL),
        ("1002@balance", ErrorCode.UNKNOWN_CHANNEL),
        ("BTCUSDT@balance", ErrorCode.UNKNOWN_CHANNEL),
        ("@BALANCE", ErrorCode.UNKNOWN_CHANNEL),
        ("@balance ", ErrorCode.UNKNOWN_CHANNEL),
        ("@balance@1002", ErrorCode.UNKNOWN_CHANNEL),
        ("@user_1002_balance", ErrorCode.UNKNOWN_CHANNEL),
        ("depth_BTCUSDT", ErrorCode.UNKNOWN_CHANNEL),
        ("btcusdt@depth", ErrorCode.UNKNOWN_SYMBOL),
        ("XRPUSDT@depth", ErrorCode.UNKNOWN_SYMBOL),
        ("BTCUSDT@depth_5m", ErrorCode.UNKNOWN_CHANNEL),
        ("BTCUSDT@kline_7m", ErrorCode.UNKNOWN_CHANNEL),
        ("BTCUSDT@", ErrorCode.UNKNOWN_CHANNEL),
        ("BTCUSDT@trades_", ErrorCode.UNKNOWN_CHANNEL),
        ("BTCUSDT@depth_", ErrorCode.UNKNOWN_CHANNEL),
        ("BTCUSDT@kline_", ErrorCode.UNKNOWN_CHANNEL),
        ("BTCUSDT@ticker__", ErrorCode.UNKNOWN_CHANNEL),
        ("", ErrorCode.UNKNOWN_CHANNEL),
        ("@", ErrorCode.UNKNOWN_CHANNEL),
    ],
)
def test_bad_names(name: str, code: ErrorCode) -> None:
    with pytest.raises(RequestError) as info:
        resolve(name, SYMBOLS, "1001")
    assert info.value.code is code


@given(st.text(max_size=40))
def test_no_name_reaches_another_users_channel(name: str) -> None:
    """Whatever a client logged in as 1001 writes, it resolves to public or to 1001's own."""
    try:
        channel = resolve(name, SYMBOLS, "1001")
    except RequestError:
        return
    if channel.private:
        assert channel.internal.startswith("user_1001_")
        assert channel.internal.removeprefix("user_1001_") in PRIVATE_STREAMS
    else:
        assert not channel.internal.startswith("user_")


NAME_PARTS = st.sampled_from(
    ["BTCUSDT", "ETHUSDT", "@", "_", "depth", "trades", "kline", "1m", "5m", "ticker",
     "markPrice", "balance", "notice", " ", "1M"]
)  # fmt: skip


@given(st.lists(NAME_PARTS, max_size=6).map("".join))
def test_one_spelling_per_stream(name: str) -> None:
    """Whatever spelling resolves, the event name is the canonical one of its internal channel,
    so no client's spelling can become the event name other subscribers see."""
    try:
        channel = resolve(name, SYMBOLS, "1001")
    except RequestError:
        return
    if not channel.private:
        assert channel.protocol == parse_internal(channel.internal, SYMBOLS).protocol
    assert resolve(channel.protocol, SYMBOLS, "1001") == channel


@pytest.mark.parametrize(
    "name",
    [
        "user__balance",
        "user_1001_wallet",
        "user_a_b_balance",
        "depth_XRPUSDT",
        "depth_",
        "kline_BTCUSDT_1m",
        "trades_BTCUSDT_5m",
        "foo_BTCUSDT",
    ],
)
def test_bad_internal_names(name: str) -> None:
    with pytest.raises(ValueError):
        parse_internal(name, SYMBOLS)


@given(st.from_regex(UID_PATTERN, fullmatch=True), st.sampled_from(PRIVATE_STREAMS))
def test_private_channel_round_trip(uid: str, stream: str) -> None:
    internal = private_channel(uid, stream)
    assert parse_internal(internal, SYMBOLS).protocol == f"@{stream}"
    assert resolve(f"@{stream}", SYMBOLS, uid).internal == internal
