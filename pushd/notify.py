"""systemd's service notification protocol (``sd_notify``) over ``$NOTIFY_SOCKET``.

``READY=1`` once every listener is bound, ``STATUS=...`` lines an operator sees in
``systemctl status``, ``WATCHDOG=1`` from the event loop every half ``WatchdogSec`` (so a loop
that stops turning gets the service restarted), ``STOPPING=1`` when a shutdown begins. Without
``$NOTIFY_SOCKET`` (not under systemd, or ``Type=simple``) every call does nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping

import structlog
import trio

log = structlog.get_logger("pushd.notify")


def message(**fields: object) -> bytes:
    """One notification datagram: ``KEY=value`` lines."""
    return "\n".join(f"{key}={value}" for key, value in fields.items()).encode()


class Notifier:
    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        path = environ.get("NOTIFY_SOCKET", "")
        # "@name" is an abstract socket: its name starts with a NUL byte
        self._address = "\0" + path[1:] if path.startswith("@") else path
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        for_us = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.watchdog_interval_s = int(usec) / 2e6 if for_us else None
        self._socket: socket.socket | None = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, **fields: object) -> None:
        """Send one notification; a failure is logged once and never raised. The socket never
        blocks: a receiver that stops reading (a wedged systemd, a busy ``--workers``
        supervisor) costs the notifications its queue cannot hold, never this event loop."""
        if not self._address:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto(message(**fields), self._address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("systemd notification failed", error=str(exc)[:200])

    async def watchdog(self, status: Callable[[], str]) -> None:
        """Ping the watchdog from the event loop, with the current status, until cancelled."""
        if self.watchdog_interval_s is None:
            return
        while True:
            self.send(WATCHDOG=1, STATUS=status())
            await trio.sleep(self.watchdog_interval_s)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
