"""A /metrics answer read with prometheus' own parser: the one way tests look at metrics (never a
line split by hand, never a client library object's private ``_value``)."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# the series each metric type exports under its family's name
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count",
            "_created"), "gauge": ("",), "info": ("_info",), "unknown": ("",)}  # fmt: skip


class Scrape:
    """One /metrics answer: its families, the exported series names (with the suffixes each
    type gets) and the label names each series' samples carry."""

    def __init__(self, text: str) -> None:
        self.families: dict[str, Any] = {f.name: f for f in text_string_to_metric_families(text)}
        self.labels: dict[str, set[str]] = {}
        for family in self.families.values():
            for suffix in SUFFIXES[family.type]:
                self.labels[family.name + suffix] = set()
            for sample in family.samples:
                self.labels.setdefault(sample.name, set()).update(sample.labels)

    def samples(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        """The samples of series ``name`` whose labels include ``labels``."""
        return [
            (sample.labels, float(sample.value))
            for family in self.families.values()
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        ]

    def value(self, name: str, **labels: str) -> float:
        """The first sample of ``name`` with these labels (KeyError if there is none)."""
        found = self.samples(name, **labels)
        if not found:
            raise KeyError(f"{name}{labels}")
        return found[0][1]

    def total(self, name: str, **labels: str) -> float:
        """The sum of every sample of ``name`` with these labels (0 if there is none)."""
        return sum(value for _, value in self.samples(name, **labels))
