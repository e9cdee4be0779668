"""The engine simulator: reproducible, a sane moving book, bursty trades, accounts that add up."""

from __future__ import annotations

import statistics
from collections import defaultdict
from decimal import Decimal

import msgspec

from ingest import wire
from ingest.sim import INITIAL_USDT, Market

STEP_MS = 50


def run(
    seed: int, steps: int, rate: float = 1.0
) -> tuple[Market, list[wire.Event], list[wire.Event]]:
    market = Market(seed=seed, rate=rate)
    public: list[wire.Event] = []
    private: list[wire.Event] = []
    for i in range(1, steps + 1):
        m, p = market.step(i * STEP_MS)
        public += m
        private += p
    return market, public, private


def test_same_seed_same_events() -> None:
    _, a_pub, a_priv = run(7, 400)
    _, b_pub, b_priv = run(7, 400)
    _, c_pub, _ = run(8, 400)
    assert a_pub == b_pub and a_priv == b_priv
    assert a_pub != c_pub


def test_book_is_sane_and_moves() -> None:
    market = Market(seed=3)
    mids = []
    for i in range(1, 1201):
        market.step(i * STEP_MS)
        if i % 100 == 0:
            snap = market.book("BTCUSDT", 500, i)
            bids = [Decimal(p) for p, _ in snap.bids]
            asks = [Decimal(p) for p, _ in snap.asks]
            assert bids == sorted(bids, reverse=True) and len(set(bids)) == len(bids)
            assert asks == sorted(asks) and len(set(asks)) == len(asks)
            assert bids[0] < asks[0]
            assert 200 <= len(bids) <= 500 and 200 <= len(asks) <= 500
            assert all(Decimal(q) > 0 for _, q in snap.bids + snap.asks)
            assert all(Decimal(p) % Decimal("0.1") == 0 for p in bids)
            mids.append((bids[0] + asks[0]) / 2)
    assert len(set(mids)) > 5  # it moves
    assert all(abs(m / mids[0] - 1) < Decimal("0.05") for m in mids)  # but like a market


def test_trades_are_bursty_and_numbered() -> None:
    _, public, _ = run(11, 3000, rate=1.0)  # 150 simulated seconds
    trades = [e for e in public if isinstance(e, wire.Trade)]
    by_symbol: dict[str, list[int]] = defaultdict(list)
    for t in trades:
        by_symbol[t.symbol].append(t.id)
    for ids in by_symbol.values():
        assert ids == list(range(1, len(ids) + 1))
    per_window: dict[int, int] = defaultdict(int)
    for t in trades:
        per_window[t.ts // 1000] += 1
    counts = [per_window.get(s, 0) for s in range(150)]
    assert statistics.mean(counts) > 20
    assert statistics.variance(counts) > 3 * statistics.mean(counts)  # not Poisson: bursts
    index = [e for e in public if isinstance(e, wire.IndexPrice)]
    assert {e.source for e in index} == {"spotA", "spotB", "spotC"}
    assert len(index) >= 3 * 3 * 149


def test_rate_scales_trades() -> None:
    _, slow, _ = run(5, 600, rate=1.0)
    _, fast, _ = run(5, 600, rate=10.0)
    n_slow = sum(isinstance(e, wire.Trade) for e in slow)
    n_fast = sum(isinstance(e, wire.Trade) for e in fast)
    assert n_fast > 5 * n_slow


def test_user_accounts_add_up() -> None:
    market, _, private = run(2, 5000)  # four simulated minutes
    fees: dict[str, Decimal] = defaultdict(Decimal)
    fills: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    order_fills: dict[int, Decimal] = defaultdict(Decimal)
    balance: dict[str, wire.BalanceUpdate] = {}
    position: dict[tuple[str, str], wire.PositionUpdate] = {}
    statuses: dict[str, int] = defaultdict(int)
    for e in private:
        match e:
            case wire.OrderUpdate():
                statuses[e.status] += 1
                fees[e.uid] += Decimal(e.fee)
                qty = Decimal(e.last_fill_qty)
                fills[(e.uid, e.symbol)] += qty if e.side == "buy" else -qty
                order_fills[e.order_id] += qty
                assert Decimal(e.filled_qty) == order_fills[e.order_id]
                if e.status == "filled":
                    assert Decimal(e.filled_qty) == Decimal(e.qty)
            case wire.BalanceUpdate():
                balance[e.uid] = e
            case wire.PositionUpdate():
                position[(e.uid, e.symbol)] = e
    assert statuses["new"] > 50 and statuses["filled"] > 10 and statuses["canceled"] > 10
    assert statuses["partially_filled"] > 0
    for (uid, symbol), pos in position.items():
        assert Decimal(pos.qty) == fills[(uid, symbol)]
    for uid, bal in balance.items():
        realized = sum(
            (Decimal(p.realized_pnl) for (u, _), p in position.items() if u == uid), Decimal(0)
        )
        total = Decimal(bal.free) + Decimal(bal.locked)
        assert total == INITIAL_USDT + realized - fees[uid], uid
        assert Decimal(bal.locked) >= 0
    assert any(Decimal(p.realized_pnl) != 0 for p in position.values())
    for uid, account in market.accounts.items():  # the last events are the engine's state
        if uid in balance:
            assert Decimal(balance[uid].locked) == account.locked.quantize(Decimal("1e-8"))


def test_first_step_on_a_wall_clock_simulates_one_second_at_most() -> None:
    """A market created at t=0 and stepped to today must not replay 56 years of trading."""
    far = Market(seed=5)
    events, _ = far.step(1_764_000_000_000)
    near = Market(seed=5)
    reference, _ = near.step(1000)
    assert len(events) == len(reference)


def test_every_event_is_valid_on_the_wire() -> None:
    """What the simulator emits passes pushd's own decoder (decimals without exponents, ...)."""
    market = Market(seed=11, rate=5.0)
    for i in range(1, 400):
        market_events, private_events = market.step(i * 50)
        events = market_events + private_events
        if events:
            assert wire.decode(wire.encode(wire.Envelope(1, 1, i, events))).events == events


# -- the simulated past (the demo opens on a market with 24 h of history) -------------------

DAY_MS = 86_400_000
NOW_MS = 1_795_573_133_000


def test_history_is_reproducible_and_leads_into_the_live_market() -> None:
    a, b, c = Market(seed=4), Market(seed=4), Market(seed=5)
    past = a.history(DAY_MS, NOW_MS)
    assert past == b.history(DAY_MS, NOW_MS)
    assert past != c.history(DAY_MS, NOW_MS)
    for symbol, book in a.books.items():
        trades = [t for t in past if isinstance(t, wire.Trade) and t.symbol == symbol]
        # a day of trades, every minute-ish, ids 1..n in time order, all inside the window
        assert len(trades) > 10_000
        assert [t.id for t in trades] == list(range(1, len(trades) + 1))
        assert all(NOW_MS - DAY_MS <= t.ts < NOW_MS for t in trades)
        assert [t.ts for t in trades] == sorted(t.ts for t in trades)
        # the past ends where the live market stands: its last price is near the fair price
        last = Decimal(trades[-1].price) * 10**book.spec.price_scale
        assert abs(float(last) / book.fair - 1) < 0.01
        # the live market goes on with the next trade id
        assert book.trade_id == len(trades)
        # the price moved during the day (a chart with a shape), but stayed a market
        prices = [Decimal(t.price) for t in trades]
        assert 1.01 < max(prices) / min(prices) < 3
    # the live market's own random sequence is untouched by the history
    fresh = Market(seed=4)
    assert a.step(NOW_MS)[0][:5] == [
        _shifted(e, len([t for t in past if isinstance(t, wire.Trade) and t.symbol == e.symbol]))
        for e in fresh.step(NOW_MS)[0][:5]
    ]


def _shifted(event: wire.Event, ids: int) -> wire.Event:
    """The same trade with its id after ``ids`` historical trades."""
    if isinstance(event, wire.Trade):
        return msgspec.structs.replace(event, id=event.id + ids)
    return event


def test_a_halted_market_stands_still() -> None:
    """After ``halt`` a step moves nothing and returns no events: the books, the tape and the
    accounts stand where the last step left them (a feed stopped this way has sent every event
    of its last step whole; a cancelled one may be cut between two datagrams)."""
    market, _, _ = run(5, 40, rate=5)
    book = market.book("BTCUSDT", 1000, 1)
    trade_ids = {symbol: b.trade_id for symbol, b in market.books.items()}
    accounts = {uid: (a.free, a.locked, dict(a.positions)) for uid, a in market.accounts.items()}
    market.halt()
    for i in range(41, 81):
        assert market.step(i * STEP_MS) == ([], [])
    assert market.book("BTCUSDT", 1000, 1) == msgspec.structs.replace(book, ts=80 * STEP_MS)
    assert {symbol: b.trade_id for symbol, b in market.books.items()} == trade_ids
    assert {
        uid: (a.free, a.locked, dict(a.positions)) for uid, a in market.accounts.items()
    } == accounts
