"""wss:// and https:// served by pushd itself, with certificates the tests make (trustme):
events arrive whole and in order through TLS, broken TLS peers end alone, and a reload swaps
the certificate for new connections while open ones go on."""

from __future__ import annotations

import socket
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import pytest
import trio
import trustme
from conftest import (
    PUBLISH_TOKEN,
    Running,
    make_config,
    open_client,
    start_daemon,
    subscribed,
)
from cryptography import x509

from pushd import config as config_mod

AUTH = {"authorization": f"Bearer {PUBLISH_TOKEN}"}


class Certificates:
    """A test CA, and a server certificate for 127.0.0.1 written where the config points."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.certificate = directory / "server.pem"
        self.key = directory / "server.key"
        self.serial = self.issue()

    def issue(self, ca: trustme.CA | None = None) -> int:
        """A new server certificate in the same files; returns its serial number."""
        cert = (ca or self.ca).issue_cert("127.0.0.1", "localhost")
        self.certificate.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(self.key))
        return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).serial_number

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def tls_section(self) -> dict[str, object]:
        return {"tls": {"certificate": str(self.certificate), "key": str(self.key)}}


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return Certificates(tmp_path)


@pytest.fixture
async def tls_daemon(nursery: trio.Nursery, certs: Certificates) -> AsyncIterator[Running]:
    config = make_config(websocket=certs.tls_section(), http=certs.tls_section())
    running = await start_daemon(nursery, config)
    running.daemon.load_config = lambda: config
    yield running


def wss(running: Running) -> str:
    return f"wss://127.0.0.1:{running.ports.websocket}/ws"


async def publish(running: Running, certs: Certificates, messages: list[dict[str, object]]) -> None:
    async with httpx.AsyncClient(verify=certs.client_context(), timeout=30) as api:
        r = await api.post(
            f"https://127.0.0.1:{running.ports.http}/v1/publish/batch",
            json={"messages": messages}, headers=AUTH,
        )  # fmt: skip
        assert r.status_code == 200, r.text


async def test_events_arrive_whole_and_in_order_over_wss(
    tls_daemon: Running, certs: Certificates
) -> None:
    """Frames of all sizes, more than the socket buffer holds at once: TLS records are
    written in parts, and every event still arrives once, in order."""
    async with open_client(wss(tls_daemon), ssl_context=certs.client_context()) as client:
        token = tls_daemon.token("1001")
        assert (await client.call({"op": "auth", "token": token}))["result"] is True
        assert subscribed(await client.call({"op": "subscribe", "channel": "@order"}), "@order")
        sizes = [10, 3000, 20_000, 1, 15_000] * 5  # ~190 KB: under the outbound buffer
        batch = [{"channel": "user_1001_order", "data": {"n": n, "pad": "x" * size}}
                 for n, size in enumerate(sizes)]  # fmt: skip
        await publish(tls_daemon, certs, batch)
        for n, size in enumerate(sizes):
            event = await client.recv()
            assert event["data"] == {"n": n, "pad": "x" * size}
    metrics = await _metrics(tls_daemon, certs)
    assert "pushd_bytes_sent_total" in metrics


async def _metrics(running: Running, certs: Certificates) -> str:
    async with httpx.AsyncClient(verify=certs.client_context()) as api:
        r = await api.get(f"https://127.0.0.1:{running.ports.http}/metrics")
        assert r.status_code == 200
        return r.text


async def test_broken_tls_peers_end_alone(tls_daemon: Running, certs: Certificates) -> None:
    """Plain HTTP on the TLS port, garbage, a reset in the middle of the handshake, a client
    that does not trust the certificate: each ends that peer; a wss client is served all along."""
    port = tls_daemon.ports.websocket
    async with open_client(wss(tls_daemon), ssl_context=certs.client_context()) as client:

        async def peer(data: bytes, *, wait_answer: bool) -> bytes:
            with trio.socket.socket() as sock:
                await sock.connect(("127.0.0.1", port))
                await sock.send(data)
                if not wait_answer:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    return b""
                with trio.fail_after(5):
                    return await sock.recv(4096)

        await peer(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n", wait_answer=True)
        await peer(b"\x16\x03\x01\x02\x00" + b"\xff" * 600, wait_answer=True)
        hello = ssl.create_default_context()
        hello.check_hostname, hello.verify_mode = False, ssl.CERT_NONE
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        half = hello.wrap_bio(incoming, outgoing)
        with pytest.raises(ssl.SSLWantReadError):
            half.do_handshake()
        await peer(outgoing.read(), wait_answer=False)  # ClientHello, then a reset
        untrusting = ssl.create_default_context()  # no trust in the test CA
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=untrusting)
        with pytest.raises(trio.BrokenResourceError) as refused_cert:
            await stream.do_handshake()
        assert isinstance(refused_cert.value.__cause__, ssl.SSLCertVerificationError)
        await stream.aclose()
        assert (await client.call({"op": "ping"}))["op"] == "pong"
    metrics = await _metrics(tls_daemon, certs)
    refused = [line for line in metrics.splitlines()
               if line.startswith('pushd_handshakes_rejected_total{reason="tls"}')]  # fmt: skip
    assert refused and float(refused[0].split()[-1]) >= 3


async def _served_serial(certs: Certificates, port: int) -> int:
    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", port, ssl_context=certs.client_context()
    )
    async with stream:
        await stream.do_handshake()
        der = stream.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


async def test_a_reload_swaps_the_certificate_for_new_connections(
    tls_daemon: Running, certs: Certificates
) -> None:
    ws_port, http_port = tls_daemon.ports.websocket, tls_daemon.ports.http
    assert await _served_serial(certs, ws_port) == certs.serial
    async with open_client(wss(tls_daemon), ssl_context=certs.client_context()) as old:
        new_serial = certs.issue()  # rotated in place, as certbot does
        change = await tls_daemon.daemon.reload()
        assert change is not None
        assert await _served_serial(certs, ws_port) == new_serial
        assert await _served_serial(certs, http_port) == new_serial
        assert (await old.call({"op": "ping"}))["op"] == "pong"  # the open one goes on

        # a key that does not match its certificate: refused, the running one stays
        other = trustme.CA().issue_cert("127.0.0.1")
        other.private_key_pem.write_to_path(str(certs.key))
        assert await tls_daemon.daemon.reload() is None
        assert await _served_serial(certs, ws_port) == new_serial
        assert (await old.call({"op": "ping"}))["op"] == "pong"


async def test_run_with_an_unreadable_certificate_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "pushd.toml"
    config.write_text(
        f"[websocket]\nport = 0\n[websocket.tls]\ncertificate = '{tmp_path}/none.pem'\n"
        f"key = '{tmp_path}/none.key'\n[http]\nport = 0\n"
        "[auth.hmac]\nsecret = 's'\n[ingest]\nudp_enabled = false\ntcp_enabled = false\n"
    )
    result = await trio.run_process(
        [sys.executable, "-m", "pushd", "run", "--config", str(config)],
        capture_stderr=True, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.decode().strip().splitlines() == [
        f"pushd: websocket.tls: cannot load {tmp_path}/none.pem: No such file or directory"
    ]


def test_tls_needs_both_files() -> None:
    raw = msgspec.to_builtins(make_config())
    raw["http"]["tls"] = {"certificate": "a.pem"}
    with pytest.raises(config_mod.ConfigError, match=r"http\.tls: set both"):
        config_mod.from_dict(raw)
