"""The files an operator installs from: the example config, the systemd unit, the Prometheus
rules and the Grafana dashboard. ``pip install`` puts them in ``<prefix>/share/pushd``
(pyproject's data-files); a checkout has them at its root."""

from __future__ import annotations

import sysconfig
from pathlib import Path

SHIPPED = (
    "pushd.example.toml",
    "systemd/pushd.service",
    "ops/prometheus/alerts.yml",
    "ops/prometheus/scrape.yml",
    "ops/grafana/pushd-dashboard.json",
)


def share_dir() -> Path:
    installed = Path(sysconfig.get_path("data")) / "share" / "pushd"
    if (installed / SHIPPED[0]).is_file():
        return installed
    return Path(__file__).resolve().parent.parent  # a checkout


def shipped_files() -> list[Path]:
    root = share_dir()
    return [root / name for name in SHIPPED]
