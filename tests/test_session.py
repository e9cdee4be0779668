"""A client's protocol state: login, re-login, subscriptions and limits, without sockets."""

from __future__ import annotations

import pytest

from pushd.config import LimitsConfig
from pushd.errors import ErrorCode, RequestError
from pushd.gateway.ratelimit import TokenBucket
from pushd.gateway.session import Session

SYMBOLS = frozenset({"BTCUSDT"})


def make(**limits: float) -> Session:
    return Session(SYMBOLS, LimitsConfig(**limits), now=0.0)  # type: ignore[arg-type]


def test_relogin_as_other_user_drops_private_subscriptions() -> None:
    s = make()
    s.login("1001")
    s.subscribe(["@balance", "@order", "BTCUSDT@depth"])
    dropped = s.login("1002")
    assert sorted(c.internal for c in dropped) == ["user_1001_balance", "user_1001_order"]
    assert list(s.subscriptions) == ["depth_BTCUSDT"]
    assert [c.internal for c in s.subscribe(["@balance"])] == ["user_1002_balance"]


def test_relogin_as_same_user_keeps_subscriptions() -> None:
    s = make()
    s.login("1001")
    s.subscribe(["@balance"])
    assert s.login("1001") == []
    assert list(s.subscriptions) == ["user_1001_balance"]


def test_subscribe_is_all_or_nothing() -> None:
    s = make()
    with pytest.raises(RequestError) as info:
        s.subscribe(["BTCUSDT@depth", "@balance"])
    assert info.value.code is ErrorCode.LOGIN_REQUIRED
    assert s.subscriptions == {}


def test_subscribe_twice_returns_only_new() -> None:
    s = make()
    assert len(s.subscribe(["BTCUSDT@depth"])) == 1
    assert s.subscribe(["BTCUSDT@depth", "BTCUSDT@depth"]) == []


def test_subscription_limit() -> None:
    s = make(max_subscriptions=2)
    s.subscribe(["BTCUSDT@depth", "BTCUSDT@trades"])
    with pytest.raises(RequestError) as info:
        s.subscribe(["BTCUSDT@ticker"])
    assert info.value.code is ErrorCode.TOO_MANY_SUBSCRIPTIONS
    s.unsubscribe(["BTCUSDT@depth"])
    s.subscribe(["BTCUSDT@ticker"])


def test_unsubscribe_unknown_is_quiet_but_bad_name_is_an_error() -> None:
    s = make()
    assert s.unsubscribe(["BTCUSDT@depth"]) == []
    with pytest.raises(RequestError):
        s.unsubscribe(["nope"])


def test_failed_logins_are_rate_limited() -> None:
    s = make(failed_logins_per_minute=6, failed_login_burst=2)
    for _ in range(2):
        s.check_login_allowed(0.0)
        s.login_failed(0.0)
    with pytest.raises(RequestError) as info:
        s.check_login_allowed(0.0)
    assert info.value.code is ErrorCode.AUTH_RATE_LIMITED
    s.check_login_allowed(10.0)  # six a minute: one back after ten seconds


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5)
    assert not bucket.take(0.5)
    assert not bucket.has_token(0.5)
    assert bucket.has_token(100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
