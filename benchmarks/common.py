"""What every benchmark row carries, and how rows are timed and written.

Timings follow DESIGN.md: CPU with torch.utils.benchmark's blocked_autorange (median),
GPU with triton.testing.do_bench (warm-up, L2 flushed, median); every row names its
device, versions, commit and date, and every figure sits beside its baseline measured in
the same process.
"""

from __future__ import annotations

import csv
import datetime
import platform
import subprocess
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def environment() -> dict:
    """Device, versions, commit and date for a results row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"{_cpu_name()} ({torch.get_num_threads()} threads)"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "commit": _git_commit(),
        "date": datetime.date.today().isoformat(),
    }


def _git_commit() -> str:
    """The checkout's commit, with ``-dirty`` when tracked files have changed since."""

    def git(*args):
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def median_ms(fn, device: torch.device) -> float:
    """Median time of ``fn()`` in milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    from torch.utils.benchmark import Timer

    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5).median * 1e3


def write_csv(name: str, rows: list[dict], results: Path = RESULTS) -> Path:
    """Write ``rows`` to ``results``/<name>.csv and return the path."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path
