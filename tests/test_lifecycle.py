"""A connection's lifecycle without sockets: the legal moves, the first Disconnect wins, a frame
queued in a wrong phase raises, one writer at a time."""

from __future__ import annotations

import pytest

from pushd.errors import CloseCode, LocalStateError
from pushd.gateway import lifecycle
from pushd.gateway.lifecycle import PHASES, Lifecycle, Phase, Writer


def test_a_connection_opens_ends_once_and_closes() -> None:
    life = Lifecycle()
    assert life.phase is Phase.HANDSHAKE and life.writer is Writer.SHELL
    with pytest.raises(LocalStateError):
        life.check_write()  # nothing is queued before the handshake is answered
    life.opened()
    assert life.phase is Phase.OPEN and life.writer is Writer.FLUSHER
    life.check_write()
    assert life.end(lifecycle.SLOW_CONSUMER)
    assert not life.end(lifecycle.GOING_AWAY)  # the first reason stays
    assert life.ending is lifecycle.SLOW_CONSUMER and life.closing
    with pytest.raises(LocalStateError):
        life.check_write()  # no frame after the close frame
    life.closed()
    assert life.phase is Phase.CLOSED
    with pytest.raises(LocalStateError):
        life.opened()


def test_every_phase_move_not_in_the_table_raises() -> None:
    for start in Phase:
        for target in Phase:
            if target is start or target in PHASES[start]:
                continue
            life = Lifecycle()
            for step in (Phase.OPEN, Phase.CLOSING, Phase.CLOSED):  # walk to ``start``
                if life.phase is start:
                    break
                life._to(step)
            assert life.phase is start
            with pytest.raises(LocalStateError):
                life._to(target)


def test_one_writer_at_a_time() -> None:
    life = Lifecycle()
    with pytest.raises(LocalStateError):
        life.hand_to(Writer.DRAIN)  # a drain only takes over from the flusher
    life.opened()
    life.check_writer(Writer.FLUSHER)
    life.hand_to(Writer.DRAIN)
    with pytest.raises(LocalStateError):
        life.check_writer(Writer.FLUSHER)  # the flusher must skip it meanwhile
    life.hand_to(Writer.FLUSHER)
    life.hand_to(Writer.SHELL)  # the connection's task ended: it writes the last bytes
    with pytest.raises(LocalStateError):
        life.hand_to(Writer.DRAIN)


def test_disconnects_name_their_code_label_and_kind() -> None:
    assert lifecycle.SLOW_CONSUMER.code == CloseCode.SLOW_CONSUMER
    assert lifecycle.STALLED.abort and lifecycle.STALLED.label == "stalled"
    assert lifecycle.GOING_AWAY.label is None  # a shutdown is not counted as the peer's fault
    too_big = lifecycle.message_too_big(4096)
    assert (too_big.code, too_big.reason) == (CloseCode.MESSAGE_TOO_BIG, "message over 4096 B")
    client = lifecycle.by_client(1000, "bye")
    assert client.by == "client" and client.label is None and client.echo == "bye"
    assert len(lifecycle.protocol_error(1002, "x" * 500).reason) == 200
    assert lifecycle.gone("peer sent close_notify").abort  # no close frame to a gone peer
