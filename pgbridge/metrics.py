"""Prometheus text exposition (format 0.0.4) of the bridge's figures: a writer and a histogram.

Pure and dependency-free: :mod:`pgbridge.server` gathers the values when ``/metrics`` is scraped.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Mapping

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds: from a millisecond (a change routed as it commits) to half a minute (a listener that was away)."""


class Histogram:
    """Counts of observations by upper bound, their sum and their number, as Prometheus keeps them."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Iterable[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


class Rate:
    """Events per second over the last ``window`` seconds, kept as counts per second."""

    __slots__ = ("_seconds", "_window")

    def __init__(self, window: int = 10) -> None:
        self._window = window
        self._seconds: deque[list[int]] = deque()  # [second, count], oldest first

    def add(self, now: float) -> None:
        second = int(now)
        if self._seconds and self._seconds[-1][0] == second:
            self._seconds[-1][1] += 1
        else:
            self._seconds.append([second, 1])
            while self._seconds[0][0] <= second - self._window:
                self._seconds.popleft()

    def per_second(self, now: float) -> float:
        """The average over the last ``window`` whole seconds (the current one not yet over is left out)."""
        second = int(now)
        return sum(n for s, n in self._seconds if second - self._window <= s < second) / self._window


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if isinstance(value, int) or value.is_integer():
        return str(int(value))
    return repr(value)


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


class Exposition:
    """Metric families written one after another, each with its HELP and TYPE lines."""

    def __init__(self, prefix: str = "pgbridge_") -> None:
        self._prefix = prefix
        self._lines: list[str] = []

    def _family(self, name: str, kind: str, help: str) -> str:
        full = self._prefix + name
        self._lines.append(f"# HELP {full} {help.replace(chr(92), chr(92) * 2).replace(chr(10), ' ')}")
        self._lines.append(f"# TYPE {full} {kind}")
        return full

    def gauge(self, name: str, help: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        full = self._family(name, "gauge", help)
        self._lines.append(f"{full}{_labels(labels or {})} {_number(value)}")

    def counter(self, name: str, help: str, value: float) -> None:
        """A counter named ``name``, which ends in ``_total`` as Prometheus names counters. In the text
        format 0.0.4, its HELP and TYPE lines name the sample itself, ``_total`` included."""
        assert name.endswith("_total"), name
        full = self._family(name, "counter", help)
        self._lines.append(f"{full} {_number(value)}")

    def labelled(self, name: str, kind: str, help: str, label: str, values: Mapping[str, float]) -> None:
        """One family with a sample per value of ``label`` (a counter's name ends in ``_total``)."""
        assert kind != "counter" or name.endswith("_total"), name
        full = self._family(name, kind, help)
        for key in sorted(values):
            self._lines.append(f"{full}{_labels({label: key})} {_number(values[key])}")

    def histogram(self, name: str, help: str, histogram: Histogram) -> None:
        full = self._family(name, "histogram", help)
        cumulative = 0
        for bound, count in zip((*histogram.bounds, math.inf), histogram.counts, strict=True):
            cumulative += count
            le = "+Inf" if math.isinf(bound) else repr(float(bound))  # "1.0", as Prometheus's clients write it
            self._lines.append(f'{full}_bucket{{le="{le}"}} {cumulative}')
        self._lines.append(f"{full}_sum {_number(histogram.sum)}")
        self._lines.append(f"{full}_count {histogram.count}")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"
