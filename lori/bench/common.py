"""What every benchmark row carries, and how rows are timed and written.

Timings follow DESIGN.md: CPU with torch.utils.benchmark's blocked_autorange (median),
GPU with triton.testing.do_bench (warm-up, L2 flushed, median); every row names its
device, versions, commit and date, and every figure sits beside its baseline measured in
the same process.
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

from lori_kernels import block_sparse
from lori_kernels.backends import BACKENDS, TRITON_BACKENDS, unavailable_reason

log = logging.getLogger(__name__)
_announced: set[tuple] = set()

# Relative to the working directory: from a checkout's root, the committed results that the
# README's tables are rendered from.
RESULTS = Path("benchmarks") / "results"

# Llama-3-8B: hidden 4096, MLP 14336, 32 query and 8 key/value heads of 128; its adapted
# projections as (in, out): q and o, k and v, gate and up, down.
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
LLAMA3_8B_PROJECTIONS = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]


def environment(device: torch.device | None = None) -> dict:
    """Device (default: the GPU if there is one), versions, commit and date for a results row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    gpu = torch.cuda.is_available() if device is None else device.type == "cuda"
    if gpu:
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()} ({torch.get_num_threads()} threads)"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "commit": _git_commit(),
        "date": datetime.date.today().isoformat(),
    }


def _git_commit() -> str:
    """The checkout's commit, with ``-dirty`` when tracked files other than results files
    have changed since (a run rewrites the committed results as it goes); ``LORI_BENCH_COMMIT``
    when set (a copy of the tree without ``.git``, as on a lent GPU machine)."""
    if os.environ.get("LORI_BENCH_COMMIT"):
        return os.environ["LORI_BENCH_COMMIT"]

    def git(*args):
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(exclude,top)benchmarks/results")
        return commit + ("-dirty" if changed else "")
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


def median_ms_each(fns: dict, device: torch.device, quick: bool = False, rounds: int = 3) -> dict:
    """Median time in milliseconds of each of ``fns`` (name -> callable). On the CPU they are
    timed in ``rounds`` interleaved rounds (the order rotating), so that another process
    slowing the machine for a while slows them all alike; ``quick``: a tenth of the time, for
    smoke runs whose numbers nobody reads."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return {
            name: do_bench(fn, warmup=25, rep=10 if quick else 100, return_mode="median") for name, fn in fns.items()
        }
    from torch.utils.benchmark import Timer

    names = list(fns)
    times = {name: [] for name in names}
    for k in range(rounds):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            measurement = Timer("fn()", globals={"fn": fns[name]}).blocked_autorange(
                min_run_time=(0.05 if quick else 0.5) / rounds
            )
            times[name] += measurement.times
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def write_csv(name: str, rows: list[dict], results: Path = RESULTS) -> Path:
    """Write ``rows`` to ``results``/<name>.csv (whole or not at all: a temp file renamed)
    and return the path."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.csv"
    partial = path.with_suffix(".csv.partial")
    with partial.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(path)
    return path


def write_json(name: str, document: dict, results: Path = RESULTS) -> Path:
    """Write ``document`` to ``results``/<name>.json and return the path."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{name}.json"
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


def read_csv(path: Path) -> list[dict]:
    """Rows of a results CSV, numbers as numbers."""

    def value(text: str):
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text

    with path.open(newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def interpreted(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` would run on ``device`` in Triton's CPU interpreter (never timed)."""
    return backend in TRITON_BACKENDS and device.type == "cpu"


def lori_backends(device: torch.device, dtype: torch.dtype | None, wanted: list[str] | None = None) -> list[str]:
    """The ``lori_linear`` backends to run on ``device``, fastest first: ``wanted`` (all by
    default) that can run there. Triton on the CPU (its interpreter, for tests) is left out
    unless asked for by name."""
    names = wanted if wanted is not None else [b for b in BACKENDS if not interpreted(b, device)]
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown:
        raise ValueError(f"unknown backends {unknown}; choose from {list(BACKENDS)}")
    runs = [b for b in BACKENDS if b in names and unavailable_reason(b, "lori_linear", device.type, dtype) is None]
    for b in sorted(set(wanted or ()) - set(runs)):
        reason = unavailable_reason(b, "lori_linear", device.type, dtype)
        if (b, reason) not in _announced:
            _announced.add((b, reason))
            log.warning("backend %s left out: %s", b, reason)
    return runs


def kept_blocks(out: int, r: int, block: tuple[int, int], sparsity: float) -> int:
    """How many of B ``[out, r]``'s blocks ``random_block_mask`` keeps: ``1 - sparsity`` of
    them, at least one."""
    n_rows, n_cols = block_sparse.block_grid(out, r, block)
    return max(1, round((1 - sparsity) * n_rows * n_cols))


def random_block_mask(out: int, r: int, block: tuple[int, int], sparsity: float, generator) -> torch.Tensor:
    """A bool ``[out, r]`` mask keeping a random ``1 - sparsity`` of B's blocks (at least one)."""
    n_rows, n_cols = block_sparse.block_grid(out, r, block)
    n_keep = kept_blocks(out, r, block, sparsity)
    kept = torch.zeros(n_rows * n_cols, dtype=torch.bool)
    kept[torch.randperm(n_rows * n_cols, generator=generator)[:n_keep]] = True
    return kept.reshape(n_rows, n_cols).repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:out]


def default_block(r: int) -> tuple[int, int]:
    """LoRIConfig's default block."""
    return (32, min(r, 32))


def synced(device: torch.device, fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` followed by a device sync on a GPU, so wall-clock timing covers its kernels."""
    if device.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run
