"""``pip install .`` into a fresh venv outside the checkout gives a working ``pushd``: its
version, the page and the Redis bus's Lua scripts inside the package, the files an operator
installs from (example config, systemd unit, alert rules, dashboard), a daemon that starts."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pip_install_outside_the_checkout(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy of the tracked files: the build writes next to them
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()  # fmt: skip
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    # and what scripts/setup fetched from npm (pinned by package-lock.json): the chart library
    shutil.copytree(ROOT / "pushd/static/vendor", source / "pushd/static/vendor")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(source)],
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    shutil.rmtree(source)  # nothing may come from the checkout any more
    pushd = str(venv / "bin" / "pushd")
    version = subprocess.run([pushd, "--version"], capture_output=True, text=True, check=True,
                             cwd=tmp_path).stdout.strip()  # fmt: skip
    assert version == "pushd 0.1.0"
    files = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "from importlib.resources import files; p = files('pushd');"
         "print(all(p.joinpath(f).is_file() for f in ('static/index.html', 'bus/lua/publish.lua',"
         " 'bus/lua/recover.lua', 'bus/lua/lease.lua', 'static/pushd-client.js',"
         " 'static/vendor/lightweight-charts.standalone.production.js')))"],  # the page offline
        capture_output=True, text=True, check=True, cwd=tmp_path,
    ).stdout.strip()  # fmt: skip
    assert files == "True"
    shipped = subprocess.run([pushd, "files"], capture_output=True, text=True, check=True,
                             cwd=tmp_path).stdout.split()  # fmt: skip
    assert [Path(p).name for p in shipped] == [
        "pushd.example.toml",
        "pushd.service",
        "alerts.yml",
        "scrape.yml",
        "pushd-dashboard.json",
    ]
    for path in shipped:
        assert Path(path).is_file() and Path(path).is_relative_to(venv), path
    subprocess.run([pushd, "check-config", "--config", shipped[0]], check=True, cwd=tmp_path,
                   capture_output=True)  # fmt: skip
    config = tmp_path / "pushd.toml"
    config.write_text(
        "[websocket]\nport = 0\n[http]\nport = 0\n[auth.hmac]\nsecret = 's'\n"
        "[ingest]\nallow_unauthenticated = true\n"  # no engine keys here
        "udp_port = 0\ntcp_port = 0\n[engine]\nsnapshot_enabled = false\n"
        "[log]\nformat = 'json'\n"
    )
    daemon = subprocess.Popen([pushd, "run", "--config", str(config)], cwd=tmp_path,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        assert daemon.stderr is not None
        for line in daemon.stderr:  # the daemon says when it listens, and on which ports
            if b'"pushd ready"' in line:
                http_port = json.loads(line)["http"]
                break
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=10) as page:
            assert b"<html" in page.read().lower()  # the page comes from the installed package
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=30)  # reads the rest of its log while it drains
        assert daemon.returncode == 0
