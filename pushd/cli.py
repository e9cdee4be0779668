"""``pushd`` command line: run, demo, token, check-config."""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

import msgspec
import trio

from pushd import config as config_mod
from pushd import logs
from pushd.auth import issue_hmac_token
from pushd.config import Config
from pushd.daemon import Daemon
from pushd.errors import ConfigError

DEMO_UID = "1001"


def _load(path: Path | None) -> Config:
    try:
        return config_mod.load(path)
    except ConfigError as exc:
        print(f"pushd: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    logs.configure(config.log.level, config.log.format)
    trio.run(lambda: Daemon(config).serve(handle_signals=True))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Everything in one process on loopback, with a fresh secret and a demo login token."""
    config = _load(args.config)
    hmac_cfg = msgspec.structs.replace(config.auth.hmac, secret=secrets.token_urlsafe(32))
    auth = msgspec.structs.replace(config.auth, kind="hmac", hmac=hmac_cfg)
    http = msgspec.structs.replace(config.http, publish_token=secrets.token_urlsafe(16))
    config = msgspec.structs.replace(config, auth=auth, http=http)
    logs.configure(config.log.level, config.log.format)

    async def main() -> None:
        daemon = Daemon(config)
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(lambda task_status: daemon.serve(
                handle_signals=True, task_status=task_status))  # fmt: skip
            token = issue_hmac_token(hmac_cfg.secret, DEMO_UID, hmac_cfg.token_ttl_s)
            ws, web = config.websocket.host, config.http.host
            print(
                f"\npushd demo is running (Ctrl-C stops it)\n"
                f"  WebSocket : ws://{ws}:{ports.websocket}/ws\n"
                f"  HTTP API  : http://{web}:{ports.http}/  (publish token: "
                f"{http.publish_token})\n"
                f'  demo login: {{"op":"auth","token":"{token}"}}  (uid {DEMO_UID})\n'
                f"  symbols   : {', '.join(config.markets)}\n"
                f"  (the matching-engine simulator arrives with the ingest work: until then the\n"
                f"   demo serves the gateway alone; publish with the HTTP API to see events)\n",
                flush=True,
            )

    trio.run(main)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    config = _load(args.config)
    secret = config.auth.hmac.secret
    if not secret:
        print("pushd: auth.hmac.secret is not set in the config", file=sys.stderr)
        return 2
    ttl = args.ttl if args.ttl is not None else config.auth.hmac.token_ttl_s
    try:
        print(issue_hmac_token(secret, args.uid, ttl))
    except Exception as exc:
        print(f"pushd: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    _load(args.config)
    print(f"{args.config}: ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pushd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", type=Path, help="TOML config file (defaults if omitted)")
    run.set_defaults(func=cmd_run)
    demo = sub.add_parser("demo", help="run everything on loopback with a demo login")
    demo.add_argument("--config", type=Path)
    demo.set_defaults(func=cmd_demo)
    token = sub.add_parser("token", help="issue an HMAC login token")
    token.add_argument("--uid", required=True)
    token.add_argument("--ttl", type=int, help="seconds (default auth.hmac.token_ttl_s)")
    token.add_argument("--config", type=Path)
    token.set_defaults(func=cmd_token)
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", type=Path, required=True)
    check.set_defaults(func=cmd_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
