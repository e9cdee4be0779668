"""The requests room: what a client's messages mean, and who is logged in where.

The shell (``server``) hands each complete message of an open connection to a ``Dialect`` and
tells it when a connection opens and ends; that is the whole interface, so a second WebSocket
dialect (a Binance-compatible surface, issue 21) plugs in here as another ``Dialect`` over the
same hub, bus and sessions. ``Requests`` is pushd's own dialect (docs/protocol.md): ``auth``,
``subscribe`` (with ``since``), ``unsubscribe``, ``ping``, the token's lifetime, and the uid
registry the operator's disconnect reads (``kick``).

A request's rules live in the sans-IO ``Session`` and ``Hub``; this room carries answers
between them, the bus, the login verifier and the connection.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Container
from typing import Protocol

import structlog
import trio

from pushd.auth import Verifier
from pushd.bus.model import Bus, Position, Recovery
from pushd.channels import Channel
from pushd.config import LimitsConfig
from pushd.errors import AuthError, AuthUnavailable, BusUnavailable, ErrorCode, RequestError
from pushd.gateway import lifecycle, protocol
from pushd.gateway.connection import Connection
from pushd.gateway.hub import Hub, text_frame
from pushd.gateway.lifecycle import Disconnect
from pushd.gateway.session import Session, TokenExpired, TokenNotice
from pushd.metrics import GatewayMetrics

log = structlog.get_logger("pushd.gateway.requests")
MAX_EMPTIED = 64  # emptied token checks the heap may hold before it is rebuilt without them


class Dialect(Protocol):
    """What the shell needs of a WebSocket dialect."""

    def opened(self, conn: Connection, now: float) -> None:
        """The handshake is answered: set up the connection's session."""

    async def on_message(self, conn: Connection, text: str, binary: bool) -> None:
        """One complete message of an open connection (``text`` is empty when binary)."""

    def closed(self, conn: Connection) -> None:
        """The connection has ended: forget it."""

    def reconfigure(self, limits: LimitsConfig, verifier: Verifier) -> None:
        """A reload's limits and logins."""

    def serving(self, nursery: trio.Nursery) -> None:
        """The gateway serves: ``nursery`` is where the dialect's own tasks run (the Binance
        all-market arrays' timer), ended with the gateway."""


class TokenWatch:
    """A token check filed for a connection (``Requests.run_token_timers``); emptied
    (``conn`` None) when the connection logs in again or ends."""

    __slots__ = ("at", "conn")

    def __init__(self, at: float, conn: Connection) -> None:
        self.at = at  # Unix time
        self.conn: Connection | None = conn

    def __lt__(self, other: TokenWatch) -> bool:
        return self.at < other.at


class Requests:
    """pushd's own dialect (``Dialect``)."""

    def __init__(
        self,
        symbols: Container[str],
        limits: LimitsConfig,
        hub: Hub,
        bus: Bus,
        verifier: Verifier,
        metrics: GatewayMetrics,
        end: Callable[[Connection, Disconnect], None],
    ) -> None:
        self._symbols = symbols
        self._limits = limits
        self._hub = hub
        self._bus = bus
        self._verifier = verifier
        self._metrics = metrics
        self._end = end
        self._by_uid: dict[str, set[Connection]] = {}
        self._watches: list[TokenWatch] = []  # a heap: the next token check first
        self._timers_wake: trio.CancelScope | None = None  # the timers' sleep, while it runs
        self._emptied = 0  # checks in the heap emptied since it was last rebuilt (about)

    def reconfigure(self, limits: LimitsConfig, verifier: Verifier) -> None:
        self._limits = limits
        self._verifier = verifier

    def serving(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self.run_token_timers)  # every login's token lifetime, one task

    def opened(self, conn: Connection, now: float) -> None:
        conn.session = Session(self._symbols, self._limits, now)

    def closed(self, conn: Connection) -> None:
        self._unwatch(conn)
        if (uid := conn.uid) is not None:
            self._leave_uid(conn, uid)

    def kick(self, uid: str) -> int:
        """Close every connection logged in as ``uid`` (operator's request); returns how many."""
        conns = list(self._by_uid.get(uid, ()))
        for conn in conns:
            self._end(conn, lifecycle.KICKED)
        return len(conns)

    def _leave_uid(self, conn: Connection, uid: str) -> None:
        peers = self._by_uid.get(uid)
        if peers is not None:
            peers.discard(conn)
            if not peers:
                del self._by_uid[uid]

    async def on_message(self, conn: Connection, text: str, binary: bool) -> None:
        session = conn.session
        assert session is not None
        now = trio.current_time()
        if not session.take_request(now):
            self._end(conn, lifecycle.RATE_LIMITED)
            return
        request_id: int | str | None = None
        try:
            if binary:
                raise RequestError(ErrorCode.BINARY_NOT_SUPPORTED)
            request = protocol.parse_request(text)
            request_id = request.id
            match request:
                case protocol.Auth():
                    await self._auth(conn, session, request, now)
                case protocol.Subscribe():
                    await self._subscribe(conn, session, request)
                case protocol.Unsubscribe():
                    for channel in session.unsubscribe(protocol.channels_of(request)):
                        self._hub.unsubscribe(conn.outlet, channel.internal)
                    conn.send(text_frame(protocol.encode_result(request_id)))
                case protocol.Ping():
                    pong = protocol.encode_pong(int(time.time() * 1000), request_id)
                    conn.send(text_frame(pong))
        except RequestError as err:
            if err.request_id is None:
                err.request_id = request_id
            self._metrics.errors.labels(code=str(int(err.code))).inc()
            if not conn.closing:
                conn.send(text_frame(protocol.encode_error(err)))

    async def _subscribe(
        self, conn: Connection, session: Session, request: protocol.Subscribe
    ) -> None:
        """Join each new stream as pending (live events are kept for it), ask the bus what it
        missed or where it stands, then in one synchronous step: the reply, each stream's
        replay or current state, and the kept events after it."""
        names = protocol.channels_of(request)
        since = None
        if request.since is not None:
            if len(names) != 1:
                raise RequestError(ErrorCode.INVALID_REQUEST, "since takes exactly one channel")
            since = Position(request.since.epoch, request.since.seq)
        added = session.subscribe(names)
        for channel in added:
            self._hub.join(conn.outlet, channel)
        recoveries: list[Recovery] = []
        try:
            for channel in added:
                recoveries.append(await self._bus.recover(channel.internal, since))
        except BusUnavailable:
            for channel in session.unsubscribe([c.protocol for c in added]):
                self._hub.unsubscribe(conn.outlet, channel.internal)
            raise RequestError(ErrorCode.UNAVAILABLE) from None
        if conn.closing:
            return
        recovered: bool | None = None
        reason: str | None = None
        if since is not None:
            recovered, reason = self._recovered(conn, added, recoveries, since)
            if not recovered and recoveries and recoveries[0].recovered:  # cannot be paced
                recoveries[0] = Recovery(recoveries[0].position, False)
        conn.life.check_write()

        def reply(starts: list[Position | None]) -> bytes:
            streams = {}
            for channel, recovery, start in zip(added, recoveries, starts, strict=True):
                at = start or recovery.position
                streams[channel.protocol] = protocol.StreamPosition(at.epoch, at.seq)
            return protocol.encode_subscribed(streams, request.id, recovered, reason)

        self._hub.settle_with_reply(conn.outlet, list(zip(added, recoveries, strict=True)), reply)

    def _recovered(
        self, conn: Connection, added: list[Channel], recoveries: list[Recovery], since: Position
    ) -> tuple[bool, str | None]:
        """Whether a ``since`` is answered with a replay, else why not: ``subscribed`` (the
        channel was already subscribed), ``epoch`` (the numbering restarted), ``history``
        (history no longer reaches back, or ``since`` is ahead of the stream), ``size`` (an
        event to replay is larger than the whole outbound buffer: it cannot be paced)."""
        if not added:
            return False, "subscribed"
        recovery = recoveries[0]
        if not recovery.recovered:
            return False, "epoch" if recovery.position.epoch != since.epoch else "history"
        reason = self._hub.unpaceable(conn.outlet, added[0], recovery)
        return reason is None, reason

    async def run_token_timers(self) -> None:
        """Every login's token lifetime, in one task for the gateway: the ``@auth`` notice
        before ``exp``, then 4004 at ``exp`` (a task per login cost each logged-in connection
        a task, its cancel scopes and its memory; issue 22). The session owns the times: a
        login or a notice files the session's next check (``_watch``); an entry whose
        connection logged in again, or ended, was emptied then and is skipped."""
        while True:
            with trio.CancelScope() as self._timers_wake:
                self._aim_timers()
                await trio.sleep_forever()
            self._timers_wake = None
            now = time.time()
            due = []
            while self._watches and self._watches[0].at <= now:
                due.append(heapq.heappop(self._watches).conn)
            for conn in due:  # (what they file now waits for the next turn)
                if conn is None:
                    self._emptied = max(0, self._emptied - 1)
                    continue
                conn.token_watch = None  # off the heap: nothing left to empty at its end
                if conn.closing or (session := conn.session) is None:
                    continue
                try:
                    self._check_token(conn, session, now)
                except Exception:  # a bug in one session's check: it ends that connection,
                    # not this task (every login's lifetime runs here)
                    log.exception("token check failed", conn_id=conn.conn_id, peer=conn.peer)
                    self._end(conn, lifecycle.INTERNAL_ERROR)

    def _check_token(self, conn: Connection, session: Session, now: float) -> None:
        match session.token_due(now):
            case TokenNotice(expires_in=expires_in, exp=exp):
                conn.send(text_frame(protocol.encode_auth_notice(expires_in, exp)))
                self._watch(conn, session)
            case TokenExpired():
                self._end(conn, lifecycle.TOKEN_EXPIRED)
            case None:
                self._watch(conn, session)

    def _watch(self, conn: Connection, session: Session) -> None:
        """File the session's next token check (its previous one, if any, is emptied)."""
        self._unwatch(conn)
        if (at := session.token_check_at()) is None:
            return
        conn.token_watch = watch = TokenWatch(at, conn)
        heapq.heappush(self._watches, watch)
        if self._watches[0] is watch:
            self._aim_timers()

    def _unwatch(self, conn: Connection) -> None:
        """Empty the connection's filed check; once most of the heap is empty checks (a
        client that logs in again and again), it is rebuilt without them."""
        if (watch := conn.token_watch) is None:
            return
        watch.conn = conn.token_watch = None
        self._emptied += 1
        if self._emptied > MAX_EMPTIED and self._emptied * 2 > len(self._watches):
            self._watches = [w for w in self._watches if w.conn is not None]
            heapq.heapify(self._watches)
            self._emptied = 0

    def _aim_timers(self) -> None:
        """The timers' task wakes at the first check filed (token times are Unix time)."""
        if self._timers_wake is not None and self._watches:
            wait_s = max(0.0, self._watches[0].at - time.time())
            self._timers_wake.deadline = trio.current_time() + wait_s

    async def _auth(
        self, conn: Connection, session: Session, request: protocol.Auth, now: float
    ) -> None:
        session.check_login_allowed(now)
        try:
            login = await self._verifier.verify(request.token)
        except AuthUnavailable as exc:
            session.login_failed(now)  # a burst of tokens costs its connection either way
            self._metrics.auth.labels(result="unavailable").inc()
            log.warning("login backend unavailable", conn_id=conn.conn_id, error=str(exc))
            raise RequestError(ErrorCode.AUTH_UNAVAILABLE) from None
        except AuthError as exc:
            session.login_failed(now)
            self._metrics.auth.labels(result="failed").inc()
            log.info("login failed", conn_id=conn.conn_id, peer=conn.peer, error=str(exc))
            raise RequestError(ErrorCode.AUTH_FAILED) from None
        if conn.closing:
            return
        previous, uid = session.uid, login.uid
        for channel in session.login(uid, login.exp, time.time()):
            self._hub.unsubscribe(conn.outlet, channel.internal)
        if login.exp is not None or conn.token_watch is not None:
            self._watch(conn, session)  # the latest token's exp, longer or shorter
        if previous != uid:
            if previous is not None:
                self._leave_uid(conn, previous)
            self._by_uid.setdefault(uid, set()).add(conn)
        self._metrics.auth.labels(result="ok").inc()
        log.info("login", conn_id=conn.conn_id, uid=uid, previous_uid=previous)
        conn.send(text_frame(protocol.encode_result(request.id, uid=uid)))
