"""Configuration: defaults work, every mistake is one clear line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pushd import config as config_mod
from pushd.cli import main
from pushd.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_serve_loopback() -> None:
    config = config_mod.load(None)
    assert config.websocket.host == "127.0.0.1" and config.http.host == "127.0.0.1"
    assert set(config.markets) == {"BTCUSDT", "ETHUSDT", "SOLUSDT"}


def test_example_file_loads_and_mentions_every_setting() -> None:
    example = ROOT / "pushd.example.toml"
    config = config_mod.load(example)
    assert config == config_mod.Config() or config.markets
    text = example.read_text()

    def keys(struct: object, prefix: str = "") -> list[str]:
        out = []
        for name in struct.__struct_fields__:  # type: ignore[attr-defined]
            value = getattr(struct, name)
            if hasattr(value, "__struct_fields__") and value.__struct_fields__:
                out += keys(value, f"{prefix}{name}.")
            elif name != "markets":
                out.append(name)
        return out

    settings = keys(config_mod.Config()) + keys(config_mod.MarketConfig())
    missing = [k for k in settings if f"{k} =" not in text]
    assert missing == []


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[websocket]\nprot = 1\n", "websocket: Object contains unknown field `prot`"),
        ("[websocket]\nport = 'x'\n", "websocket.port: Expected `int`, got `str`"),
        ("[websocket]\nport = 70000\n", "websocket.port: Expected `int` <= 65535"),
        ("[limits]\nstall_timeout_s = 0\n", "limits.stall_timeout_s: Expected `float` > 0"),
        ("[auth]\nkind = 'ldap'\n", "auth.kind: Invalid enum value 'ldap'"),
        ("[auth]\nkind = 'jwt'\n", "auth.jwt.key: required"),
        ("[auth]\nkind = 'http'\n", "auth.http.url: an http(s) URL is required"),
        ("[markets.btc]\n", "markets.btc: symbol must be"),
        ("markets = {}\n", "markets: at least one symbol"),
        ("[markets.BTCUSDT]\ndepth_levels = 5000\n", "markets.BTCUSDT.depth_levels: a 5000-level"),
        ("[markets.ETHUSDT.funding]\ncap = 0.5\n", "markets.ETHUSDT.funding.cap: Expected `str`"),
        ("[websocket]\npaths = ['ws']\n", "websocket.paths: 'ws' must start with '/'"),
        # what the Binance exchangeInfo says of a symbol: a tick of 0 makes clients divide by 0
        ("[markets.BTCUSDT]\ntick_size = '0'\n", "markets.BTCUSDT.tick_size: Expected `str`"),
        ("[markets.BTCUSDT]\nstep_size = '-1'\n", "markets.BTCUSDT.step_size: Expected `str`"),
        ("[markets.BTCUSDT]\nmin_notional = '0.0'\n", "markets.BTCUSDT.min_notional: Expected"),
        ("[[websocket]]\n", "websocket: Expected `object`, got `array`"),
        ("websocket = [\n", "TOML syntax error"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "pushd.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        config_mod.load(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pushd.toml"
    path.write_text("[http]\nport = -1\n")
    with pytest.raises(SystemExit) as info:
        main(["check-config", "--config", str(path)])
    assert info.value.code == 2
    assert "http.port: Expected `int` >= 0" in capsys.readouterr().err
    assert main(["check-config", "--config", str(ROOT / "pushd.example.toml")]) == 0


def test_cli_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pushd.toml"
    path.write_text("[auth.hmac]\nsecret = 'abc'\n")
    assert main(["token", "--uid", "1001", "--config", str(path)]) == 0
    token = capsys.readouterr().out.strip()
    import trio

    from pushd.auth import HmacVerifier
    from pushd.config import HmacAuthConfig

    assert trio.run(HmacVerifier(HmacAuthConfig(secret="abc")).verify, token).uid == "1001"
    assert main(["token", "--uid", "1001"]) == 2  # no secret configured
