"""A config file that cannot be read or is not valid is one line naming the file and the problem:
at start and in ``check-config`` (exit code 2), and on reload (SIGHUP), where the daemon logs the
refusal and keeps serving on the config it has. Fuzzed over the file's bytes (random, and
mutations of valid files) and over parsed tables, sans-IO (``config.parse``, ``from_dict``,
``reload.plan``) and through ``check-config``.

``PUSHD_CONFIG_FUZZ_EXAMPLES`` sets the cases per fuzz test.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import typing
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from conftest import SECRET, Client, Logs, open_client, ready_ports
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pushd import config as config_mod
from pushd.auth import issue_hmac_token
from pushd.cli import main
from pushd.errors import ConfigError
from pushd.reload import plan

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = (ROOT / "pushd.example.toml").read_bytes()
EXAMPLES = int(os.environ.get("PUSHD_CONFIG_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)  # fmt: skip
# the daemon's command line starts with this: run as someone a file's mode applies to (root
# reads a mode-000 file). setpriv execs the interpreter before it gives up root's capabilities
AS_USER = (
    ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
)

REDIS_CONFIG = b"""
[bus]
kind = "redis"
[bus.redis]
url = "redis://:pw@127.0.0.1:6379/0"
[auth]
kind = "jwt"
[auth.jwt]
key = "k"
algorithms = ["HS256", "RS256"]
[markets.BTCUSDT.funding]
cap = "0.01"
"""
SEEDS = [EXAMPLE, REDIS_CONFIG, b"[websocket]\nport = 1\n[auth.hmac]\nsecret = 's'\n"]


def deep(n: int) -> bytes:
    return b"a = " + b"[" * n + b"]" * n + b"\n"


def unreadable(path: Path) -> None:
    path.write_bytes(b"")
    path.chmod(0)


# each kind of broken file: what to do at the path, and a word its one line must carry
BAD_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "not UTF-8": (lambda p: p.write_bytes(b"# caf\xe9\n[limits]\n"), "not UTF-8"),
    "not TOML": (lambda p: p.write_bytes(b"[websocket\nport = "), "TOML syntax error"),
    "wrong type": (lambda p: p.write_bytes(b"[websocket]\nport = 'x'\n"), "websocket.port"),
    "unknown key": (lambda p: p.write_bytes(b"[limits]\nmax_subscription = 1\n"), "unknown"),
    "NUL byte": (lambda p: p.write_bytes(b'[auth.hmac]\nsecret = "a\x00b"\n'), "TOML syntax"),
    "newline in a key": (lambda p: p.write_bytes(b'[markets."BTC\\nUSDT"]\n'), "markets.BTC"),
    "deeply nested": (lambda p: p.write_bytes(deep(50_000)), "nested too deeply"),
    "huge": (lambda p: p.write_bytes(b"#" * (2 << 20) + b"\n"), "more than"),
    "bad Redis URL": (
        lambda p: p.write_bytes(b"[bus]\nkind = 'redis'\n[bus.redis]\nurl = 'redis://h:port'\n"),
        "bus.redis.url",
    ),
    "bad login URL": (
        lambda p: p.write_bytes(b"[auth]\nkind = 'http'\n[auth.http]\nurl = 'http://[::1'\n"),
        "auth.http.url",
    ),
    "a directory": (lambda p: p.mkdir(), "directory"),
    "missing": (lambda p: None, "No such file"),
    "permission denied": (lambda p: unreadable(p), "Permission"),
    "a FIFO": (lambda p: os.mkfifo(p), "not a regular file"),
    "a device": (lambda p: p.symlink_to("/dev/zero"), "not a regular file"),
}
IN_PROCESS = [kind for kind in BAD_FILES if kind != "permission denied" or not AS_USER]


def one_line(message: str, source: str) -> None:
    """The rule for every refusal: one line that starts with the file's name."""
    assert "\n" not in message and "\r" not in message, message
    assert message.startswith(f"{source}: "), message
    assert message.isprintable(), message


def commands(path: Path) -> Iterator[tuple[str, int, str, str]]:
    """``check-config`` and ``run`` in this process: (command, exit code, stdout, stderr)."""
    for command in ("check-config", "run"):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([command, "--config", str(path)])
            except SystemExit as exc:
                code = int(str(exc.code))
        yield command, code, out.getvalue(), err.getvalue()


def refused(command: str, code: int, out: str, err: str, path: Path, word: str) -> None:
    """Exit code 2, nothing on stdout, one line on stderr naming the file and the problem."""
    assert code == 2, (command, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, (command, err)
    one_line(lines[0], f"pushd: {path}")
    assert word in lines[0]


@pytest.mark.parametrize("kind", IN_PROCESS)
def test_every_bad_file_is_one_line(tmp_path: Path, kind: str) -> None:
    make, word = BAD_FILES[kind]
    path = tmp_path / "pushd.toml"
    make(path)
    with pytest.raises(ConfigError) as info:
        config_mod.load(path)
    one_line(str(info.value), str(path))
    assert word in str(info.value)
    for command, code, out, err in commands(path):
        refused(command, code, out, err, path, word)


@contextlib.contextmanager
def shared_dir() -> Iterator[Path]:
    """A directory an unprivileged daemon can read (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="pushd-config-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.parametrize("kind", ["not UTF-8", "deeply nested", "permission denied", "a FIFO"])
def test_real_command_lines_refuse_with_one_line(kind: str) -> None:
    """The installed command lines, as an operator (not root) runs them: no traceback."""
    make, word = BAD_FILES[kind]
    with shared_dir() as folder:
        path = folder / "pushd.toml"
        make(path)
        for command in ("check-config", "run"):
            done = subprocess.run(
                [*AS_USER, sys.executable, "-m", "pushd", command, "--config", str(path)],
                capture_output=True, text=True, timeout=60, cwd=ROOT,
            )  # fmt: skip
            refused(command, done.returncode, done.stdout, done.stderr, path, word)


# -- fuzz ------------------------------------------------------------------------------------

TOKENS = [
    b"\xe9",
    b"\xff",
    b"\x00",
    b"\r",
    b"\n",
    b"[",
    b"]",
    b"[[",
    b"{",
    b"}",
    b'"',
    b"'",
    b"'''",
    b'"""',
    b"=",
    b".",
    b",",
    b"#",
    b"\\",
    b"\\u0000",
    b"\\n",
    b"nan",
    b"inf",
    b"-inf",
    b"1e999",
    b"99999999999999999999999",
    b"-1",
    b"0",
    b"true",
    b"1979-05-27T07:32:00Z",
    b"07:32:00",
    b"[" * 2000,
    b"{a=" * 600,
    b"a.b.c.d.e.f.g.h = 1",
    b"[markets.X]",
    b"[bus]\nkind='redis'",
    b"kind = 'redis'",
    b"role = 'gateway'",
    b"url = 'redis://:@[::1'",
    b"\xef\xbb\xbf",
    b"\xed\xa0\x80",  # an encoded surrogate: not UTF-8
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid file with a few bytes flipped, cut, doubled or replaced by a hostile token."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "flip", "duplicate"]))
        if op == "insert":
            piece = draw(st.sampled_from(TOKENS) | st.binary(min_size=1, max_size=8))
            data[at:at] = piece
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 40))]
        elif op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 200))]
    return bytes(data)


def refused_or_valid(check: Callable[[], config_mod.Config], source: str) -> str:
    """``check`` either gives a Config that survives a round trip and a reload plan, or
    raises ConfigError with one line naming ``source``; any other exception fails."""
    try:
        config = check()
    except ConfigError as exc:
        one_line(str(exc), source)
        return "refused"
    assert config_mod.from_dict(msgspec.to_builtins(config)) == config
    try:
        plan(config_mod.Config(), config)
    except ConfigError as exc:
        one_line(str(exc), "reload")
    return "valid"


OUTCOMES: dict[str, dict[str, int]] = {}


def counted(test: str, outcome: str) -> None:
    counts = OUTCOMES.setdefault(test, {})
    counts[outcome] = counts.get(outcome, 0) + 1


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data: bytes) -> None:
    counted("random bytes", refused_or_valid(lambda: config_mod.parse(data, "f.toml"), "f.toml"))


@FUZZ
@given(mutated())
def test_fuzz_mutated_files(data: bytes) -> None:
    counted("mutated", refused_or_valid(lambda: config_mod.parse(data, "f.toml"), "f.toml"))


SCALARS = (
    st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
    | st.datetimes() | st.dates() | st.times()
    | st.sampled_from(["redis://:pw@h:1", "redis://h:x", "unix://", "http://[::1", "", "jwt",
                       "redis", "memory", "gateway", "compute", "BTCUSDT", "/ws", "0.1"])
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12,
)  # fmt: skip


def shaped(kind: Any) -> st.SearchStrategy[Any]:
    """Values of roughly the right type for a field (often valid, sometimes out of range)."""
    while typing.get_origin(kind) is typing.Annotated:
        kind = typing.get_args(kind)[0]
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin is list:
        return st.lists(shaped(args[0]), max_size=3)
    if kind is bool:
        return st.booleans()
    if kind is int:
        return st.integers(-1, 70_000)
    if kind is float:
        return st.floats(-1, 1e5) | st.integers(0, 100)
    return SCALARS  # str, str | None, Decimal strings


def tables(struct: type[msgspec.Struct]) -> st.SearchStrategy[dict[str, Any]]:
    """Tables shaped like ``struct``: some of its keys (now and then a stranger) with values of
    the right shape or of any TOML type, nested sections shaped the same way."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in msgspec.structs.fields(struct):
        if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            fields[field.name] = tables(field.type) | VALUES
        elif field.name == "markets":
            symbol = st.sampled_from(["BTCUSDT", "ETHUSDT", "X", "btc", "A" * 40]) | st.text()
            market = tables(config_mod.MarketConfig) | VALUES
            fields[field.name] = st.dictionaries(symbol, market, max_size=3) | VALUES
        else:
            fields[field.name] = shaped(field.type) | VALUES
    stranger = st.just({}) | st.just({}) | st.dictionaries(st.text(max_size=12), VALUES,
                                                            min_size=1, max_size=1)  # fmt: skip
    own = st.fixed_dictionaries({}, optional=fields)
    return st.builds(lambda table, extra: {**extra, **table}, own, stranger)


@settings(FUZZ, max_examples=max(EXAMPLES // 2, 20))  # drawing nested tables is the slow part
@given(tables(config_mod.Config))
def test_fuzz_parsed_tables(raw: dict[str, Any]) -> None:
    """The layer after TOML: every shape of table (wrong types, values, unknown keys)."""
    counted("tables", refused_or_valid(lambda: config_mod.from_dict(raw, source="t"), "t"))


@settings(FUZZ, max_examples=max(EXAMPLES // 5, 20))
@given(mutated() | st.binary(max_size=512))
def test_fuzz_check_config_command(tmp_path: Path, data: bytes) -> None:
    """Through the file and the command: exit 0 with ``ok`` or exit 2 with one line."""
    path = tmp_path / "pushd.toml"
    path.write_bytes(data)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["check-config", "--config", str(path)])
        except SystemExit as exc:
            code = int(str(exc.code))
    if code == 0:
        assert out.getvalue() == f"{path}: ok\n" and err.getvalue() == ""
    else:
        assert code == 2 and out.getvalue() == ""
        (line,) = err.getvalue().splitlines()
        one_line(line, f"pushd: {path}")
    counted("check-config", "valid" if code == 0 else "refused")


def test_fuzz_found_both_outcomes() -> None:
    """The fuzz reached both sides (a fuzz that only makes garbage tests one branch); the
    counts are printed for the notes (run with -s)."""
    print(f"\nconfig fuzz cases: {OUTCOMES}")
    for test in ("mutated", "tables"):
        assert OUTCOMES.get(test, {}).get("valid", 0) > 0, OUTCOMES
        assert OUTCOMES.get(test, {}).get("refused", 0) > 0, OUTCOMES


# -- reload in a real daemon -----------------------------------------------------------------


def good_config(level: str = "info") -> bytes:
    """Port 0 everywhere: the running daemon's ports come from its ready line."""
    return (
        f"[websocket]\nport = 0\n[http]\nport = 0\n[auth.hmac]\nsecret = '{SECRET}'\n"
        "[ingest]\nudp_enabled = false\ntcp_enabled = false\n[engine]\n"
        f"snapshot_enabled = false\n[log]\nformat = 'json'\nlevel = '{level}'\n"
    ).encode()


def clear(path: Path) -> None:
    if path.is_symlink() or path.is_file() or path.is_fifo():
        path.unlink()
    elif path.is_dir():
        path.rmdir()


def slow_to_parse(path: Path) -> None:
    path.write_bytes(b"a = [" + b"1," * ((config_mod.MAX_FILE_BYTES - 8) // 2) + b"]\n")


async def slow_file_is_parsed_aside(
    process: trio.Process, logs: Logs, path: Path, client: Client, count: int
) -> None:
    """A file just under the size cap that takes seconds to parse: the client's ping is
    answered while it is parsed (before the refusal is logged), not after."""
    clear(path)
    slow_to_parse(path)
    process.send_signal(signal.SIGHUP)
    with trio.fail_after(10):
        await logs.until("signal received", count, signal="SIGHUP")
    assert (await client.call({"op": "ping"}))["op"] == "pong"
    answered = datetime.now(UTC)
    with trio.fail_after(60):
        lines = await logs.until("config reload failed: running config kept", count)
    assert "unknown field `a`" in lines[-1]["error"]
    refused = datetime.fromisoformat(lines[-1]["timestamp"])
    assert answered < refused, (answered, refused)


async def test_sighup_with_every_bad_file_keeps_serving() -> None:
    """A running daemon given each broken file by SIGHUP logs the refusal, keeps its config
    and serves its client and new ones; a good file after all that still reloads."""
    with shared_dir() as folder:
        path = folder / "pushd.toml"
        path.write_bytes(good_config())
        path.chmod(0o644)
        process = await trio.lowlevel.open_process(
            [*AS_USER, sys.executable, "-m", "pushd", "run", "--config", str(path)],
            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=ROOT,
        )  # fmt: skip
        try:
            assert process.stderr is not None
            logs = Logs(process.stderr)
            with trio.fail_after(30):
                await logs.until("pushd ready")
            url = f"ws://127.0.0.1:{ready_ports(logs).websocket}/ws"
            async with open_client(url) as old:
                reply = await old.call({"op": "auth", "token": issue_hmac_token(SECRET, "1", 60)})
                assert reply["result"] is True
                for count, (kind, (make, word)) in enumerate(BAD_FILES.items(), start=1):
                    clear(path)
                    make(path)
                    process.send_signal(signal.SIGHUP)
                    with trio.fail_after(10):
                        lines = await logs.until("config reload failed: running config kept",
                                                 count)  # fmt: skip
                    error = lines[-1]["error"]
                    assert word in error and str(path) in error, (kind, error)
                    assert (await old.call({"op": "ping"}))["op"] == "pong", kind
                    async with open_client(url) as new:
                        token = issue_hmac_token(SECRET, "2", 60)
                        assert (await new.call({"op": "auth", "token": token}))["result"], kind
                await slow_file_is_parsed_aside(process, logs, path, old, len(BAD_FILES) + 1)
                clear(path)
                path.write_bytes(good_config(level="warning"))
                process.send_signal(signal.SIGHUP)
                with trio.fail_after(10):
                    (reloaded,) = await logs.until("config reloaded")
                assert reloaded["applied"] == ["log.level"]
                assert (await old.call({"op": "ping"}))["op"] == "pong"
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                assert await process.wait() == 0
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()


# -- an ingest source's key_file -------------------------------------------------------------

KEY_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "a FIFO": (lambda p: os.mkfifo(p), "not a regular file"),
    "a device": (lambda p: p.symlink_to("/dev/zero"), "not a regular file"),
    "a directory": (lambda p: p.mkdir(), "directory"),
    "huge": (lambda p: p.write_bytes(b"k" * (2 << 20)), "more than"),
    "not UTF-8": (lambda p: p.write_bytes(b"k" * 40 + b"\xe9"), "not UTF-8"),
}


def limited_memory() -> None:
    """The child may not take the machine's memory while it reads ``/dev/zero``."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


@pytest.mark.parametrize("kind", list(KEY_FILES))
def test_a_bad_key_file_is_one_line(tmp_path: Path, kind: str) -> None:
    """A key file is read like the config: a FIFO or a device is refused at once (never waited
    on or read without end), so start, ``check-config`` and a reload cannot hang on it. The
    timeout only guards the test run; a refusal takes well under a second."""
    make, word = KEY_FILES[kind]
    key = tmp_path / "engine.key"
    make(key)
    path = tmp_path / "pushd.toml"
    path.write_text(f"[ingest]\nsources = [{{id = 1, key_file = '{key}'}}]\n")
    done = subprocess.run(
        [sys.executable, "-m", "pushd", "check-config", "--config", str(path)],
        capture_output=True, text=True, timeout=30, cwd=ROOT, preexec_fn=limited_memory,
    )  # fmt: skip
    refused("check-config", done.returncode, done.stdout, done.stderr, path, word)
    assert f"{path}: ingest.sources.0.key_file: " in done.stderr
    with pytest.raises(ConfigError) as info:  # and in this process, now that it cannot hang
        config_mod.load(path)
    one_line(str(info.value), str(path))
    assert word in str(info.value)
