"""Smoke runs of the benchmark scripts (timings are never asserted)."""

import csv
import subprocess
import sys
from pathlib import Path


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_generate_a_quick(ext, tmp_path):
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_generate_a.py"), "--quick", "--results", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader((tmp_path / "generate_a_cpu.csv").open()))
    assert len(rows) == 2
    for row in rows:
        assert row["device"] and row["torch"] and row["commit"] and float(row["speedup"]) > 0
