"""No configured secret reaches a log line or a command's output: not the Redis password (right
or wrong), the login secret or key, the publish token, the login endpoint's credentials, nor the
contents of a TLS key (its path is not secret). A real daemon on a password-protected Redis is
driven through its error paths at debug level and all it writes is searched for each secret."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import structlog
import trio
import trustme
from conftest import Logs, free_port, open_client, ready_ports
from redis_servers import REDIS_CLI, RedisServer

from ingest import wire
from pushd import config as config_mod
from pushd import logs
from pushd.auth import issue_hmac_token
from pushd.cli import main
from pushd.reload import Reload

ROOT = Path(__file__).resolve().parent.parent


def secret(kind: str) -> str:
    return f"{kind}-{secrets.token_hex(12)}"


REDIS_PASSWORD = secret("redis-password")
WRONG_PASSWORD = secret("wrong-password")
HMAC_SECRET = secret("hmac-secret")
PUBLISH_TOKEN = secret("publish-token")
JWT_KEY = secret("jwt-key")
LOGIN_PASSWORD = secret("login-password")
ENGINE_KEY = secret("engine-key")  # an ingest source's key: also a secret


# -- sans-IO: the rules ----------------------------------------------------------------------


def test_redact_cuts_credentials_out_of_any_url() -> None:
    cases = {
        "redis://:pw@127.0.0.1:6379/0": "redis://***@127.0.0.1:6379/0",
        "rediss://user:p@ss@h:1": "rediss://***@h:1",  # an unescaped "@" in the password
        "error connecting to unix://:pw@/run/redis.sock": "error connecting to unix://***@/run/redis.sock",
        "https://u:p@login.example/v1?token=abc&x=1": "https://***@login.example/v1?token=***&x=1",
        "redis://h:1?password=pw&db=0": "redis://h:1?password=***&db=0",
        "no url, a@b and k=v": "no url, a@b and k=v",
    }  # fmt: skip
    for text, want in cases.items():
        assert logs.redact(text) == want


def test_every_log_line_is_redacted() -> None:
    """The processor works at the line's depth: nested values, exception text, config."""
    out, before = io.StringIO(), structlog.get_config()
    logs.configure("debug", "json")
    # no caching: no logger of another test keeps writing here
    structlog.configure(
        logger_factory=structlog.WriteLoggerFactory(out), cache_logger_on_first_use=False
    )
    try:
        lines = log_everything(out)
    finally:
        structlog.configure(**before)
        logs.set_level("info")
    assert lines[0]["nested"] == {"urls": ["redis://***@h"]}
    assert "redis://***@h:1" in lines[0]["exception"]
    assert lines[1]["config"]["auth"]["hmac"]["secret"] == "***"
    assert lines[1]["config"]["bus"]["redis"]["url"] == "redis://***@h:1"
    assert lines[2]["change"]["config"]["http"]["publish_token"] == "***"
    for value in (REDIS_PASSWORD, WRONG_PASSWORD, HMAC_SECRET, PUBLISH_TOKEN):
        assert value not in out.getvalue()


def test_libraries_standard_logging_goes_through_the_same_rules() -> None:
    """httpx, coredis and hypercorn log with the standard ``logging`` module: their warnings
    and errors are JSON lines of the same shape, redacted; their per-request info is not."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out, err = io.StringIO(), sys.stderr
    try:
        sys.stderr = out
        logs.configure("debug", "json")
        library = logging.getLogger("hypercorn.error")
        library.info("HTTP Request: POST https://u:%s@login/v1", LOGIN_PASSWORD)
        try:
            raise OSError(f"redis://:{REDIS_PASSWORD}@h:1 refused")
        except OSError:
            library.exception("Error in ASGI Framework at %s", f"redis://:{WRONG_PASSWORD}@h")
    finally:
        sys.stderr = err
        root.handlers[:], root.level = handlers, level
        logs.set_level("info")
    (line,) = [json.loads(text) for text in out.getvalue().splitlines()]
    assert line["level"] == "error" and line["logger"] == "hypercorn.error"
    assert line["event"] == "Error in ASGI Framework at redis://***@h"
    assert "redis://***@h:1 refused" in line["exception"] and "timestamp" in line
    for value in (LOGIN_PASSWORD, REDIS_PASSWORD, WRONG_PASSWORD):
        assert value not in out.getvalue()


def log_everything(out: io.StringIO) -> list[dict[str, Any]]:
    """A line with a traceback and nested URLs, and one with a whole config."""
    config = config_mod.from_dict(
        {"auth": {"hmac": {"secret": HMAC_SECRET}}, "http": {"publish_token": PUBLISH_TOKEN},
         "bus": {"redis": {"url": f"redis://:{REDIS_PASSWORD}@h:1"}}}
    )  # fmt: skip
    log = structlog.get_logger("test")
    try:
        raise ConnectionError(f"cannot reach redis://:{REDIS_PASSWORD}@h:1")
    except ConnectionError:
        log.exception("failed", nested={"urls": [f"redis://:{WRONG_PASSWORD}@h"]})
    log.warning("config", config=config, error=ValueError(f"redis://:{REDIS_PASSWORD}@h"))
    log.info("reload", change=Reload(config, ["auth.hmac.secret"], []))
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_config_shows_no_secret() -> None:
    config = config_mod.from_dict(
        {"auth": {"hmac": {"secret": HMAC_SECRET}, "jwt": {"key": JWT_KEY},
                  "http": {"url": f"https://u:{LOGIN_PASSWORD}@h/login"}},
         "http": {"publish_token": PUBLISH_TOKEN},
         "bus": {"redis": {"url": f"redis://:{REDIS_PASSWORD}@h:1"}},
         "websocket": {"tls": {"certificate": "/etc/pushd/c.pem", "key": "/etc/pushd/k.pem"}}}
    )  # fmt: skip
    for shown in (repr(config), str(config), repr(config.auth.hmac), str(config.redacted())):
        for value in (HMAC_SECRET, JWT_KEY, LOGIN_PASSWORD, PUBLISH_TOKEN, REDIS_PASSWORD):
            assert value not in shown
        assert "/etc/pushd/k.pem" in shown or shown == repr(config.auth.hmac)  # a path is not
    assert config.redacted()["auth"]["http"]["url"] == "https://***@h/login"
    assert config.redacted()["websocket"]["tls"]["key"] == "/etc/pushd/k.pem"
    # unset secrets show as unset, and the struct itself is untouched
    assert config_mod.Config().redacted()["http"]["publish_token"] == ""
    assert config.auth.hmac.secret == HMAC_SECRET


# -- a real daemon ---------------------------------------------------------------------------


class Tee(trio.abc.ReceiveStream):
    """A process's stderr as ``Logs`` reads it, every byte kept."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.raw = bytearray()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.stream.receive_some(max_bytes)
        self.raw += data
        return bytes(data)

    async def aclose(self) -> None:
        await self.stream.aclose()


class Setup:
    """Ports, certificate files and the config file of the daemon under test."""

    def __init__(self, folder: Path, redis_port: int) -> None:
        self.folder = folder
        self.redis_port = redis_port
        self.ws = self.http = self.udp = 0  # the running daemon's, from its ready line
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("127.0.0.1")
        self.certificate, self.key = folder / "server.pem", folder / "server.key"
        self.certificate.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(self.key))
        self.path = folder / "pushd.toml"
        self.output: list[bytes] = []  # everything every process wrote

    @property
    def key_contents(self) -> list[str]:
        """The lines of the private key's body: each one a secret."""
        return [line for line in self.key.read_text().splitlines() if "-----" not in line]

    def write(self, password: str, auth: str = "hmac", tail: str = "") -> None:
        login_url = f"http://user:{LOGIN_PASSWORD}@127.0.0.1:{free_port()}/login"
        self.path.write_text(
            "[websocket]\nport = 0\n"  # every port: the kernel picks, the ready line names it
            f"[http]\nport = 0\npublish_token = '{PUBLISH_TOKEN}'\n"
            f"[http.tls]\ncertificate = '{self.certificate}'\nkey = '{self.key}'\n"
            f"[auth]\nkind = '{auth}'\n[auth.hmac]\nsecret = '{HMAC_SECRET}'\n"
            f"[auth.jwt]\nkey = '{JWT_KEY}'\n[auth.http]\nurl = '{login_url}'\n"
            f"[bus]\nkind = 'redis'\n[bus.redis]\n"
            f"url = 'redis://:{password}@127.0.0.1:{self.redis_port}/0'\ntimeout_s = 1.0\n"
            "[ingest]\nudp_port = 0\ntcp_enabled = false\n"
            f"[[ingest.sources]]\nid = 7\nkey = '{ENGINE_KEY}'\nprivate = true\n"
            "[engine]\nsnapshot_enabled = false\n[log]\nformat = 'json'\nlevel = 'debug'\n" + tail
        )

    def api(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=f"https://127.0.0.1:{self.http}", verify=self.client_context(), timeout=10
        )

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@contextlib.asynccontextmanager
async def daemon(setup: Setup) -> AsyncIterator[tuple[trio.Process, Logs]]:
    """``pushd run`` on the setup's file; its stdout and stderr go to ``setup.output``."""
    stdout = setup.folder / f"stdout-{len(setup.output)}"
    with stdout.open("wb") as out:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "pushd", "run", "--config", str(setup.path)],
            stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip
    assert process.stderr is not None
    tee = Tee(process.stderr)
    try:
        lines = Logs(tee)
        with trio.fail_after(30):
            await lines.until("pushd ready")
        ports = ready_ports(lines)
        setup.ws, setup.http, setup.udp = ports.websocket, ports.http, ports.ingest_udp
        yield process, lines
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        with trio.move_on_after(5):
            while await tee.receive_some():
                pass
        setup.output += [bytes(tee.raw), stdout.read_bytes()]


async def reload(process: trio.Process, lines: Logs, event: str, count: int) -> dict[str, Any]:
    process.send_signal(signal.SIGHUP)
    with trio.fail_after(10):
        return (await lines.until(event, count))[-1]


def command(*args: str) -> bytes:
    """A ``pushd`` command run in this process: what it printed, and its exit code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code  # type: ignore[assignment]
    return f"{out.getvalue()}{err.getvalue()} exit {code}".encode()


async def test_no_secret_in_anything_a_daemon_writes(tmp_path: Path) -> None:
    with RedisServer() as redis:
        done = await trio.run_process(
            [REDIS_CLI, "-p", str(redis.port), "config", "set", "requirepass", REDIS_PASSWORD],
            capture_stdout=True,
        )
        assert done.stdout.strip() == b"OK", done
        setup = Setup(tmp_path, redis.port)
        await wrong_password(setup)
        await right_password(setup)
    found = b"\n".join(setup.output)
    everything = {
        "Redis password": REDIS_PASSWORD, "wrong Redis password": WRONG_PASSWORD,
        "HMAC secret": HMAC_SECRET, "publish token": PUBLISH_TOKEN, "JWT key": JWT_KEY,
        "login endpoint password": LOGIN_PASSWORD, "engine key": ENGINE_KEY,
        **{f"TLS key line {n}": line for n, line in enumerate(setup.key_contents)},
    }  # fmt: skip
    leaked = [name for name, value in everything.items() if value.encode() in found]
    assert leaked == []


async def wrong_password(setup: Setup) -> None:
    """Redis refuses the password: the node says so (about once a second), and serves on."""
    setup.write(WRONG_PASSWORD)
    async with daemon(setup) as (_process, lines):
        with trio.fail_after(20):
            said = await lines.until("Redis unreachable", 3)
        assert all(line["url"].startswith("redis://***@127.0.0.1:") for line in said), said
        assert "WRONGPASS" in said[0]["error"] or "AUTH" in said[0]["error"].upper(), said
        async with setup.api() as api:
            bad = {"authorization": "Bearer not-the-token"}
            r = await api.post("/v1/publish", json={"channel": "notice", "data": 1}, headers=bad)
            assert r.status_code == 401


async def right_password(setup: Setup) -> None:
    """Every login kind's refusal, a refused publish token, stats, metrics, reloads good and
    bad, and check-config on good and bad files."""
    setup.write(REDIS_PASSWORD)
    setup.output.append(command("check-config", "--config", str(setup.path)))
    async with daemon(setup) as (process, lines), setup.api() as api:
        auth = {"authorization": f"Bearer {PUBLISH_TOKEN}"}
        bad = {"authorization": f"Bearer {PUBLISH_TOKEN}x"}
        r = await api.post("/v1/publish", json={"channel": "notice", "data": 1}, headers=bad)
        assert r.status_code == 401
        r = await api.post("/v1/publish", json={"channel": "notice", "data": 1}, headers=auth)
        assert r.status_code == 200, r.text
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:  # refused: logged
            body = wire.encode(wire.Envelope(src=7, epoch=1, seq=1, events=[]))
            udp.sendto(wire.seal(body, 7, b"not-the-key" * 4, int(time.time() * 1000)),
                       ("127.0.0.1", setup.udp))  # fmt: skip
        await lines.until("UDP engine frame refused")
        for path in ("/v1/stats", "/metrics", "/readyz", "/healthz", "/openapi.json"):
            setup.output.append((await api.get(path, headers=auth)).content)

        url = f"ws://127.0.0.1:{setup.ws}/ws"
        async with open_client(url) as client:
            assert (await client.call({"op": "auth", "token": "garbage"}))["code"]
            token = issue_hmac_token(HMAC_SECRET, "1001", 60)
            assert (await client.call({"op": "auth", "token": token}))["result"] is True

            setup.write(REDIS_PASSWORD, auth="jwt")
            assert "auth.kind" in (await reload(process, lines, "config reloaded", 1))["applied"]
            wrong = jwt.encode({"sub": "7", "exp": time.time() + 60}, secret("not-the-key"))
            assert (await client.call({"op": "auth", "token": wrong}))["code"]
            right = jwt.encode({"sub": "7", "exp": time.time() + 60}, JWT_KEY)
            assert (await client.call({"op": "auth", "token": right}))["result"] is True

            setup.write(REDIS_PASSWORD, auth="http")  # an endpoint that is not there
            await reload(process, lines, "config reloaded", 2)
            assert (await client.call({"op": "auth", "token": "t"}))["code"]
            await lines.until("login backend unavailable")

            for broken in ("[auth.hmac]\nsecret = 'x' y\n", "[bus]\nkind = 1\n", "\xe9"):
                setup.write(REDIS_PASSWORD, tail=broken)
                setup.output.append(command("check-config", "--config", str(setup.path)))
            setup.path.write_bytes(setup.path.read_bytes() + b"# \xe9\n")
            setup.output.append(command("check-config", "--config", str(setup.path)))
            await reload(process, lines, "config reload failed: running config kept", 1)
            assert (await client.call({"op": "ping"}))["op"] == "pong"
        assert {"info", "warning", "error"} <= {line["level"] for line in lines.lines}
        assert any(line.get("event") == "login failed" for line in lines.lines)
