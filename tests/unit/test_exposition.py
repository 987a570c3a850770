"""The Prometheus text format as ``GET /metrics`` writes it, read with the Prometheus client library's own
parser: histograms, escaped labels, and rates."""

from __future__ import annotations

import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgbridge.metrics import Exposition, Histogram, Rate


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, keyed by name and sorted labels; parsing fails on anything Prometheus would refuse,
    and on a family that the parser reads as another type than the page declares (a counter whose TYPE
    line names the family without ``_total`` is read as an untyped family of its samples)."""
    declared = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    found = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        assert declared.get(name) == family.type, f"{family.name}: parsed as {family.type}, declared {declared}"
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_histogram_buckets_are_cumulative_and_labels_escaped() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 7.0):
        histogram.observe(value)
    out = Exposition()
    out.histogram("wait_seconds", "a histogram", histogram)
    out.labelled("things", "gauge", 'help with "quotes" and \\ backslash', "name", {'a"b\\c\nd': 1.5, "plain": 2})
    out.counter("events_total", "a counter", 12)
    found = samples(out.text())
    assert [found[("pgbridge_wait_seconds_bucket", (("le", le),))] for le in ("0.1", "1.0", "+Inf")] == [2, 3, 4]
    assert found[("pgbridge_wait_seconds_count", ())] == 4
    assert found[("pgbridge_wait_seconds_sum", ())] == pytest.approx(7.65)
    assert found[("pgbridge_things", (("name", 'a"b\\c\nd'),))] == 1.5
    assert found[("pgbridge_events_total", ())] == 12
    assert "# TYPE pgbridge_events_total counter\n" in out.text()  # the sample's own name, as 0.0.4 wants


def test_a_rate_averages_the_last_whole_seconds() -> None:
    rate = Rate(window=10)
    for now in (100.1, 100.5, 100.9, 105.0, 109.99):
        rate.add(now)
    assert rate.per_second(109.99) == 0.4  # seconds 100 and 105; the current second is not over
    assert rate.per_second(110.0) == 0.5
    assert rate.per_second(111.0) == 0.2  # second 100 left the window
    assert rate.per_second(200.0) == 0.0
    rate.add(200.0)  # old seconds are dropped, not kept forever
    assert rate.per_second(201.0) == 0.1
