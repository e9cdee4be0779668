"""SIGHUP re-reads the config: live settings change for everyone, connected clients included,
settings that need a restart are named and kept, a broken file changes nothing, and nobody is
disconnected."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import httpx
import msgspec
import trio
from conftest import (
    PUBLISH_TOKEN,
    SECRET,
    RawClient,
    make_config,
    open_client,
    pushd_process,
    ready_ports,
    subscribed,
)
from scrape import Scrape
from wsproto.events import RejectConnection

from pushd import config as config_mod
from pushd.auth import issue_hmac_token
from pushd.reload import plan

NEW_SECRET = "rotated-secret"


def with_changes(config: config_mod.Config, **changes: dict[str, object]) -> config_mod.Config:
    raw = msgspec.to_builtins(config)
    for section, values in changes.items():
        for key, value in values.items():
            target = raw[section]
            *parents, last = key.split(".")
            for part in parents:
                target = target.setdefault(part, {})
            target[last] = value
    return config_mod.from_dict(raw)


def test_live_keys_change_and_the_rest_is_named_and_kept() -> None:
    running = make_config()
    wanted = with_changes(
        running,
        auth={"hmac.secret": NEW_SECRET},
        limits={"max_subscriptions": 3},
        log={"level": "warning"},
        websocket={"allowed_origins": ["https://exchange.example"], "port": 9999},
        markets={"BTCUSDT.ticker_interval_ms": 500, "BTCUSDT.depth_levels": 20,
                 "XRPUSDT": {}},
        bus={"history_size": 5},
    )  # fmt: skip
    change = plan(running, wanted)
    assert set(change.applied) == {
        "auth.hmac.secret", "limits.max_subscriptions", "log.level",
        "websocket.allowed_origins", "markets.BTCUSDT.ticker_interval_ms",
    }  # fmt: skip
    assert set(change.refused) == {
        "websocket.port",
        "markets.BTCUSDT.depth_levels",
        "markets.XRPUSDT",
        "bus.history_size",
    }
    config = change.config
    assert config.auth.hmac.secret == NEW_SECRET and config.limits.max_subscriptions == 3
    assert config.markets["BTCUSDT"].ticker_interval_ms == 500
    assert config.websocket.port == running.websocket.port
    assert config.markets["BTCUSDT"].depth_levels == running.markets["BTCUSDT"].depth_levels
    assert "XRPUSDT" not in config.markets and config.bus == running.bus


def test_tls_files_change_live_but_tls_is_not_turned_on_or_off() -> None:
    plain = make_config()
    with_tls = with_changes(plain, websocket={"tls": {"certificate": "a.pem", "key": "a.key"}})
    assert plan(plain, with_tls).refused == ["websocket.tls.certificate", "websocket.tls.key"]
    assert plan(with_tls, plain).refused == ["websocket.tls.certificate", "websocket.tls.key"]
    rotated = with_changes(with_tls, websocket={"tls.certificate": "b.pem"})
    assert plan(with_tls, rotated).applied == ["websocket.tls.certificate"]


def write_config(
    path: Path, ws: int, http: int, secret: str, *, origins: str = "[]", subscriptions: int = 5,
    level: str = "info", connections: int = 15000,
) -> None:  # fmt: skip
    path.write_text(
        f"[websocket]\nport = {ws}\nallowed_origins = {origins}\n"
        f"max_connections = {connections}\n[http]\nport = {http}\n"
        f"publish_token = '{PUBLISH_TOKEN}'\n[auth.hmac]\nsecret = '{secret}'\n[ingest]\n"
        "udp_enabled = false\ntcp_enabled = false\n[engine]\nsnapshot_enabled = false\n"
        f"[limits]\nmax_subscriptions = {subscriptions}\n"
        f"[log]\nformat = 'json'\nlevel = '{level}'\n"
    )


async def test_sighup_applies_live_settings_and_drops_nobody(tmp_path: Path) -> None:
    path = tmp_path / "pushd.toml"
    write_config(path, 0, 0, SECRET)  # the kernel picks the ports: the ready line names them
    command = [sys.executable, "-m", "pushd", "run", "--config", str(path)]
    async with pushd_process(command) as (process, logs):
        ws, http = ready_ports(logs).websocket, ready_ports(logs).http
        url = f"ws://127.0.0.1:{ws}/ws"
        async with open_client(url) as old:
            login = await old.call({"op": "auth", "token": issue_hmac_token(SECRET, "1001", 60)})
            assert login["result"] is True
            assert subscribed(await old.call({"op": "subscribe", "channel": "@order"}), "@order")

            write_config(
                path, 1, 0, NEW_SECRET, origins="['https://exchange.example']",
                subscriptions=1, level="warning", connections=1000,
            )  # fmt: skip
            process.send_signal(signal.SIGHUP)
            with trio.fail_after(10):
                (reloaded,) = await logs.until("config reloaded")
                (kept,) = await logs.until("config change needs a restart: running value kept")
            assert {"auth.hmac.secret", "limits.max_subscriptions", "log.level",
                    "websocket.allowed_origins"} <= set(reloaded["applied"])  # fmt: skip
            assert kept["keys"] == ["websocket.port"]
            mark = len(logs.lines)

            # the connected client is still served, and lives under the new limits
            assert (await old.call({"op": "ping"}))["op"] == "pong"
            async with httpx.AsyncClient() as api:
                r = await api.post(
                    f"http://127.0.0.1:{http}/v1/publish",
                    json={"channel": "user_1001_order", "data": {"id": 1}},
                    headers={"authorization": f"Bearer {PUBLISH_TOKEN}"},
                )
                assert r.status_code == 200, r.text
                metrics = Scrape((await api.get(f"http://127.0.0.1:{http}/metrics")).text)
                assert metrics.value("pushd_connection_limit") == 1000  # what the alert divides by
            assert (await old.recv())["data"] == {"id": 1}
            reply = await old.call({"op": "subscribe", "channel": "BTCUSDT@trades"})
            assert reply["code"] == 10  # over the new max_subscriptions of 1

            # new connections: the new secret, the new origin rule; the old port stays
            async with open_client(url) as new:
                failed = await new.call({"op": "auth", "token": issue_hmac_token(SECRET, "7", 60)})
                assert failed["code"]
                ok = await new.call({"op": "auth", "token": issue_hmac_token(NEW_SECRET, "7", 60)})
                assert ok["result"] is True
            raw = await RawClient.connect(ws, headers=[(b"origin", b"https://evil.example")])
            answer = await raw.handshake()
            assert isinstance(answer, RejectConnection) and answer.status_code == 403
            await raw.aclose()

            # a file that does not load changes nothing
            path.write_text("[websocket\nport = ")
            process.send_signal(signal.SIGHUP)
            with trio.fail_after(10):
                (failed_line,) = await logs.until("config reload failed: running config kept")
            assert "TOML" in failed_line["error"]
            assert (await old.call({"op": "ping"}))["op"] == "pong"
            # log.level = "warning" took: no info line since the reload, though clients came
            infos = [line for line in logs.lines[mark:] if line["level"] == "info"]
            assert infos == [], infos
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                assert await process.wait() == 0


async def test_a_reload_that_would_break_logins_is_refused(tmp_path: Path) -> None:
    """An empty login secret is refused at start; a reload to one is refused the same way."""
    path = tmp_path / "pushd.toml"
    write_config(path, 0, 0, SECRET)
    command = [sys.executable, "-m", "pushd", "run", "--config", str(path)]
    async with pushd_process(command) as (process, logs):
        ws = ready_ports(logs).websocket
        write_config(path, 0, 0, "")
        process.send_signal(signal.SIGHUP)
        with trio.fail_after(10):
            (line,) = await logs.until("config reload failed: running config kept")
        assert "auth.hmac.secret" in line["error"]
        async with open_client(f"ws://127.0.0.1:{ws}/ws") as client:
            reply = await client.call({"op": "auth", "token": issue_hmac_token(SECRET, "1", 60)})
            assert reply["result"] is True
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await process.wait() == 0
