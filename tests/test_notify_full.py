"""A notify receiver that stops reading (systemd wedged, or the ``--workers`` supervisor busy):
the sender's event loop must not block on a full socket queue. It runs every child's beats."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from pushd.notify import Notifier


def test_a_receiver_that_does_not_read_never_blocks_the_sender(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        sent = threading.Event()

        def send_many() -> None:  # the queue holds ~10 datagrams (net.unix.max_dgram_qlen)
            for _ in range(1000):
                notifier.send(WATCHDOG=1)
            sent.set()

        threading.Thread(target=send_many, daemon=True).start()
        assert sent.wait(10), "send() blocked on a receiver that does not read"
        receiver.setblocking(False)
        assert receiver.recv(4096) == b"WATCHDOG=1"  # what fitted arrived
        notifier.close()
