"""TLS for wss:// and https:// without a proxy.

The gateway keeps its plain non-blocking sockets and its single flusher: a TLS connection adds
one ``TlsLayer``, an ``ssl.SSLObject`` over memory BIOs (sans-IO, like wsproto): ciphertext in,
plaintext out, and the flusher's already-encoded frames in, records out. Frames are still
encoded once per message; only the encryption is per connection.

A reload re-reads the certificate files into the same ``SSLContext`` that every listener
uses, so new handshakes get the new certificate and open connections keep theirs.
"""

from __future__ import annotations

import ssl

from pushd.config import TlsConfig
from pushd.errors import ConfigError, TlsClosed


def _fresh(tls: TlsConfig, section: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])  # WebSocket upgrades are HTTP/1.1
    context.options |= ssl.OP_NO_COMPRESSION
    try:
        context.load_cert_chain(tls.certificate, tls.key)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise ConfigError(f"{section}.tls: cannot load {tls.certificate}: {reason}") from None
    return context


def server_context(tls: TlsConfig, section: str) -> ssl.SSLContext | None:
    """The context of a listener, or None without TLS. Raises ConfigError."""
    return _fresh(tls, section) if tls.enabled else None


def reload_context(context: ssl.SSLContext, tls: TlsConfig, section: str) -> None:
    """Re-read the files into ``context``: checked in a fresh context first, so a bad file
    leaves the running certificate in place. Raises ConfigError."""
    _fresh(tls, section)
    context.load_cert_chain(tls.certificate, tls.key)


class TlsLayer:
    """One server-side TLS session over memory buffers; the caller moves the bytes."""

    __slots__ = ("_incoming", "_outgoing", "_tls")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)

    def handshake(self, data: bytes) -> bool:
        """Feed ciphertext; True once the handshake is complete (``pending`` has the answer)."""
        if data:
            self._incoming.write(data)
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as exc:
            raise TlsClosed(f"TLS handshake failed: {exc.reason or exc}") from None
        return True

    def receive(self, data: bytes) -> bytes:
        """Feed ciphertext; the plaintext it completes (b"" if a record is still partial).
        Raises TlsClosed on close_notify or a broken record."""
        if data:
            self._incoming.write(data)
        chunks = []
        while True:
            try:
                chunk = self._tls.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                raise TlsClosed("peer sent close_notify") from None
            except ssl.SSLError as exc:
                raise TlsClosed(f"bad TLS record: {exc.reason or exc}") from None
            if not chunk:
                raise TlsClosed("peer sent close_notify")
            chunks.append(chunk)
        return b"".join(chunks)

    def send(self, plaintext: bytes | bytearray | memoryview) -> bytes:
        """Encrypt; the records to write (with anything the session still had to say)."""
        if plaintext:
            self._tls.write(plaintext)
        return self._outgoing.read()

    def pending(self) -> bytes:
        """Records the session produced on its own (handshake answers, tickets, key updates)."""
        return self._outgoing.read()
