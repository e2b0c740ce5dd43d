"""Smoke runs of the benchmark scripts (timings are never asserted)."""

import csv
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_quick(script: str, results: Path) -> list[dict]:
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--results", str(results)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    (csv_path,) = results.glob("*.csv")
    rows = list(csv.DictReader(csv_path.open()))
    for row in rows:
        assert row["device"] and row["torch"] and row["commit"] and row["date"]
    return rows


def test_bench_generate_a_quick(ext, tmp_path):
    rows = run_quick("bench_generate_a.py", tmp_path)
    assert len(rows) == 2 and all(float(row["speedup"]) > 0 for row in rows)


def test_bench_layer_quick(tmp_path):
    rows = run_quick("bench_layer.py", tmp_path)
    assert {"base", "peft_lora", "reference"} <= {row["impl"] for row in rows}
    assert {row["part"] for row in rows} == {"layer", "lora_path"}
    assert all(float(row["ratio"]) > 0 for row in rows)
