"""The benchmark's report: one printed line per run, the medians of repeated runs, the
Markdown table and the pushd/peer ratios under it."""

from __future__ import annotations

import statistics
from typing import Any


def row(scenario: str, target: str, params: str, **values: Any) -> dict[str, Any]:
    return {"scenario": scenario, "target": target, "params": params, **values}


COLUMNS = (
    "delivered",
    "per_cpu_s",
    "p50",
    "p99",
    "p999",
    "max",
    "load_p99",
    "lost",
    "resyncs",
    "closed",
    "cpu_pct",
    "rss_mib",
    "per_conn_kib",
    "flush_round_ms",
    "loop_stall_ms",
    "gc_full",
    "gc_full_ms",
    "server_kib_per_conn",
    "kernel_kib_per_conn",
    "idle_kib_per_conn",
    "conns_per_s",
    "client_cpu_pct",
    "client_limit",
    "redis_us_msg",
    "per_cpu_s_with_redis",
    "runs",
)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}"
    return str(value)


def print_row(result: dict[str, Any]) -> None:
    print(
        f"  {result['scenario']:<9} {result['target']:<10} {result['params']:<28} "
        + "  ".join(f"{k}={fmt(result[k])}" for k in COLUMNS if k in result),
        flush=True,
    )


def medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (scenario, target, params): the median of each figure over the runs."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["scenario"], r["target"], r["params"]), []).append(r)
    out = []
    for (scenario, target, params), group in groups.items():
        merged = row(scenario, target, params, runs=len(group))
        for key in group[0]:
            if key not in merged:
                values = [g[key] for g in group if key in g]
                merged[key] = (
                    max(values) if isinstance(values[0], str)  # "yes" if any run says so
                    else statistics.median(values)
                )  # fmt: skip
        out.append(merged)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    head = ["scenario", "target", "params", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in head) + " |")
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """pushd/peer at the highest rate both held, per scenario and headline figure."""
    out = []
    best = {
        r["target"]: max(
            x["delivered"]
            for x in rows
            if x["scenario"] == "broadcast" and x["target"] == r["target"]
        )
        for r in rows
        if r["scenario"] == "broadcast"
    }
    for peer in ("websockets", "nchan"):
        if "pushd" in best and best.get(peer):
            out.append(
                f"broadcast max delivered: pushd/{peer} = {best['pushd'] / best[peer]:.2f} "
                f"({best['pushd']:,.0f} vs {best[peer]:,.0f} msgs/s)"
            )
    for scenario, key in (
        ("broadcast", "per_cpu_s"),
        ("broadcast", "delivered"),
        ("idle", "per_conn_kib"),
        ("storm", "conns_per_s"),
    ):
        mine = [r for r in rows if r["scenario"] == scenario and r["target"] == "pushd"]
        for peer in ("websockets", "nchan"):
            theirs = [r for r in rows if r["scenario"] == scenario and r["target"] == peer]
            pairs = [(a, b) for a in mine for b in theirs if a["params"] == b["params"]]
            if pairs:
                a, b = pairs[-1]
                if b.get(key):
                    out.append(
                        f"{scenario} {key}: pushd/{peer} = {a[key] / b[key]:.2f} ({a['params']})"
                    )
    return out
