"""``make bench`` keeps working: its short version runs every scenario and writes every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ("writes, ", "ingest, end to end", "commit to delivery", "fan-out, ", "memory", "latency p99",
             "subscribed sockets", "broadcast to", "filters, ", "routing per change", "snapshot, ", "bridge RSS",
             "SSE streams, deliveries/s", "idle subscribed streams", "asyncio, /healthz", "asyncio, marker",
             "uvloop, /healthz", "uvloop, marker", "filters defeating the index", "replicas:  4 bridges, tps",
             "replicas: commit to receive", "haproxy, 3 replicas")  # fmt: skip


def test_the_benchmark_runs_every_scenario(tmp_path: Path) -> None:
    env = {**os.environ, "PGBRIDGE_BENCH_QUICK": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads((tmp_path / ".pgbridge" / "bench.json").read_text())
    names = [f["scenario"] for f in figures]
    assert [s for s in SCENARIOS if not any(name.startswith(s) or s in name for name in names)] == []
    for f in figures:
        if f["scenario"].endswith("waits"):  # sessions seen waiting on a lock: none is a real figure
            assert f["value"] >= 0 and f["baseline_value"] >= 0, f
            continue
        assert f["value"] > 0, f
        if f["baseline"].startswith("bare listener p"):  # told of a commit as soon as its writer: 0 ms is real
            assert f["baseline_value"] >= 0, f
        else:
            assert f["baseline_value"] > 0 and f["ratio"] > 0, f
    assert all(f["scenario"] in done.stdout for f in figures)  # the table is printed too
