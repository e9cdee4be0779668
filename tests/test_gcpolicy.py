"""The garbage collector's settings for ``pushd run`` (``pushd.gcpolicy``): its pauses, timed
sans-IO, and a real process that froze its startup objects and reports its pauses."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
from conftest import SECRET, pushd_process, ready_ports
from scrape import Scrape

from pushd.gcpolicy import PAUSE_BUCKETS, Pauses


def test_pauses_are_timed_by_generation_into_buckets() -> None:
    now = [0.0]
    pauses = Pauses(clock=lambda: now[0])
    for generation, took in ((0, 0.0004), (2, 0.3), (2, 0.07), (1, 0.002)):
        pauses("start", {"generation": generation})
        now[0] += took
        pauses("stop", {"generation": generation})
    assert pauses.sums[2] == 0.3 + 0.07
    assert pauses.cumulative(0)[-1][1] == 1 and pauses.cumulative(1)[-1][1] == 1
    cumulative = pauses.cumulative(2)  # (upper bound, collections that took at most that)
    assert [n for bound, n in cumulative if bound == 0.05] == [0]
    assert [n for bound, n in cumulative if bound == 0.1] == [1]
    assert cumulative[-1] == (float("inf"), 2)
    assert len(cumulative) == len(PAUSE_BUCKETS) + 1


async def test_pushd_run_freezes_its_startup_objects_and_reports_its_pauses(
    tmp_path: Path,
) -> None:
    """A full collection walks every object alive: the ~90,000 of a started daemon are frozen
    (never walked again), and each pause is in /metrics for operators to alert on."""
    config = tmp_path / "pushd.toml"
    config.write_text(
        f"[websocket]\nport = 0\n[http]\nport = 0\n[auth.hmac]\nsecret = '{SECRET}'\n"
        "[ingest]\nudp_enabled = false\ntcp_enabled = false\n[engine]\nsnapshot_enabled = false\n"
        "[log]\nformat = 'json'\n"
    )
    command = [sys.executable, "-m", "pushd", "run", "--config", str(config)]
    async with pushd_process(command) as (process, logs):
        port = ready_ports(logs).http
        async with httpx.AsyncClient() as client:
            scrape = Scrape((await client.get(f"http://127.0.0.1:{port}/metrics")).text)
        process.terminate()
    [(_, frozen)] = scrape.samples("pushd_gc_frozen_objects")
    assert frozen > 10_000
    [(_, full)] = scrape.samples("pushd_gc_pause_seconds_count", generation="2")
    assert full >= 1  # settle's own collection, before the freeze
    assert scrape.samples("pushd_gc_young_threshold") == [({}, 10_000.0)]
