"""Funding rate and mark price: worked examples, each number checked by hand in the comments."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from pushd.config import FundingConfig
from pushd.market.funding import (
    FundingState,
    RunningMean,
    WeightedPremium,
    funding_rate,
    impact_price,
    premium_index,
    weighted_premium,
)

HOUR = 3_600_000
CFG = FundingConfig()  # interest 0.0001, clamp 0.0005, cap 0.0075, impact notional 10000


def test_impact_prices() -> None:
    # selling 10000 into bids: 100.5 x 50 = 5025 fills 50; the other 4975 at 100 fills 49.75;
    # 10000 / 99.75 = 100.2506265664160401...
    bid = impact_price([("100.5", "50"), ("100", "100")], Decimal(10000))
    assert bid is not None and str(bid)[:14] == "100.2506265664"
    # buying 10000 from a 101 x 200 level: all at 101
    assert impact_price([("101", "200")], Decimal(10000)) == Decimal(101)
    # a book too thin for the notional has no impact price
    assert impact_price([("101", "1")], Decimal(10000)) is None


def test_premium_index_and_its_weighted_average() -> None:
    # impact bid above the index: (101 - 100) / 100
    assert premium_index(Decimal(100), Decimal(101), Decimal(102)) == Decimal("0.01")
    # impact ask below the index: -(100 - 99) / 100
    assert premium_index(Decimal(100), Decimal(98), Decimal(99)) == Decimal("-0.01")
    # index inside the impact spread: 0
    assert premium_index(Decimal(100), Decimal(99), Decimal(101)) == 0
    # (1 x 0.001 + 2 x 0.002 + 3 x 0.004) / (1 + 2 + 3) = 0.017 / 6
    avg = weighted_premium([Decimal("0.001"), Decimal("0.002"), Decimal("0.004")])
    assert str(avg)[:12] == "0.0028333333"


def test_funding_rate_clamp_and_cap() -> None:
    # small premium: 0.0002 + clamp(0.0001 - 0.0002) = 0.0002 - 0.0001 = the interest rate
    assert funding_rate(Decimal("0.0002"), CFG) == Decimal("0.0001")
    # premium 0.002: 0.002 + clamp(-0.0019, +-0.0005) = 0.0015
    assert funding_rate(Decimal("0.002"), CFG) == Decimal("0.0015")
    # negative premium -0.001: -0.001 + clamp(0.0011) = -0.0005
    assert funding_rate(Decimal("-0.001"), CFG) == Decimal("-0.0005")
    # premium 0.02: 0.0195, capped at 0.0075; and the floor alike
    assert funding_rate(Decimal("0.02"), CFG) == Decimal("0.0075")
    assert funding_rate(Decimal("-0.02"), CFG) == Decimal("-0.0075")


def test_mark_price_worked_example() -> None:
    state = FundingState("BTCUSDT", CFG)
    now = 4 * HOUR  # half way through the 00:00-08:00 funding period
    for source, price in (("spotA", "100"), ("spotB", "101"), ("spotC", "99.5")):
        state.index_price(source, price, now)  # index = median = 100
    bids, asks = [("100.5", "50"), ("100", "100")], [("101", "200")]
    state.sample(now, bids, asks)
    data = state.data(now, last_price="100.05")
    assert data is not None
    assert data.indexPrice == "100.00000000"
    # premium = (100.25062656641604 - 100) / 100 = 0.0025062656641604
    assert data.premiumIndex == "0.00250627"
    # rate = 0.0025062656641604 - 0.0005 (clamped) = 0.0020062656641604
    assert data.fundingRate == "0.00200627"
    # price 1 = 100 x (1 + 0.0020062656641604 x 4h / 8h) = 100.10031328320802
    # price 2 = 100 + basis MA; mid (100.5 + 101) / 2 = 100.75, basis 0.75 -> 100.75
    # mark = median(100.10031328, 100.75, last 100.05) = 100.10031328
    assert data.markPrice == "100.10031328"
    assert data.estimatedSettlePrice == "100.00000000"  # the hour's only index sample
    assert data.nextFundingTime == 8 * HOUR


def test_stale_sources_are_ignored_and_no_index_means_no_mark() -> None:
    state = FundingState("BTCUSDT", CFG)
    assert state.data(0, None) is None
    state.index_price("spotA", "100", 0)
    state.index_price("spotB", "200", 60_000)
    assert state.index(60_000) == Decimal(200)  # spotA is 60 s old, over the 10 s limit
    data = state.data(60_000, None)  # no trade yet: mean of price 1 and price 2
    # no premium samples: rate = 0 + clamp(0.0001) = 0.0001; to funding 8h - 60 s
    # price 1 = 200 x (1 + 0.0001 x 28740/28800) = 200.01995833...; price 2 = 200 (no basis)
    assert data is not None and data.fundingRate == "0.00010000"
    assert data.markPrice == "200.00997917"


def test_premiums_restart_at_each_funding_time() -> None:
    state = FundingState("BTCUSDT", CFG)
    before = 8 * HOUR - 1000  # one second before the 08:00 funding
    for source in ("spotA", "spotB"):
        state.index_price(source, "100", before)
    state.sample(before, [("100.5", "50"), ("100", "100")], [("101", "200")])
    data = state.data(before, "100")
    assert data is not None and data.fundingRate == "0.00200627"  # the worked example's
    after = 8 * HOUR + 10  # the next sample is not due yet (5 s period), but the period turned
    state.sample(after, [("100.5", "50"), ("100", "100")], [("101", "200")])
    data = state.data(after, "100")
    # no premium in the new period yet: rate = 0 + clamp(interest 0.0001) = the interest rate
    assert data is not None and data.fundingRate == "0.00010000"
    assert data.nextFundingTime == 16 * HOUR


DECIMALS = st.decimals(min_value=-1, max_value=1, places=6, allow_nan=False)


@given(st.lists(DECIMALS, max_size=50))
def test_weighted_premium_kept_in_o1_equals_the_sum(premiums: list[Decimal]) -> None:
    kept = WeightedPremium()
    for p in premiums:
        kept.add(p)
    assert kept.average() == weighted_premium(premiums)


@given(st.lists(DECIMALS, max_size=50), st.integers(1, 10))
def test_running_mean_equals_the_window_mean(values: list[Decimal], maxlen: int) -> None:
    mean = RunningMean(maxlen=maxlen)
    hour = RunningMean()
    for at, v in enumerate(values):
        mean.add(at, v)
        hour.add(at, v)
        hour.drop_until(at - 5)
        window = values[max(0, at + 1 - maxlen) : at + 1]
        assert mean.mean() == sum(window, Decimal(0)) / len(window)
        recent = values[max(0, at - 4) : at + 1]
        assert hour.mean() == sum(recent, Decimal(0)) / len(recent)


def test_index_sources_are_bounded() -> None:
    from pushd.market.funding import MAX_INDEX_SOURCES

    state = FundingState("BTCUSDT", CFG)
    for n in range(MAX_INDEX_SOURCES):
        assert state.index_price(f"s{n}", "100", 1000)
    assert not state.index_price("one-too-many", "1", 1000)  # all fresh: the new one waits
    assert state.index(1000) == Decimal(100)
    assert state.index_price("fresh", "100", 1000 + CFG.index_stale_ms + 1)  # the stale go
    assert len(state._sources) == 1
