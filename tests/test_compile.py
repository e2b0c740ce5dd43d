"""The GPU kernels compile for sm_90 and sm_80 without a GPU, within the targets' shared
memory and without spills in bfloat16/float16: a representative subset of
``benchmarks/compile_check.py`` (the first autotune config of every Triton kernel, in one
bfloat16 variant with dropout and bias, and one ``.cu`` file of the extension), and the
committed tables of its full sweep (``make compile-check``).
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from benchmarks import compile_check  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = ("sm_90", "sm_80")
CUDA_FILE = "csrc/generate_a_cuda.cu"  # the extension's smallest file: nvcc takes tens of seconds per file


def read_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return [
            {
                k: int(v) if k in ("registers", "spill_stores", "spill_loads", "stack", "shared") else v
                for k, v in r.items()
            }
            for r in csv.DictReader(f)
        ]


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    """The subset's stdout and its rows, from a process of its own (the tests' Triton
    interprets; the check compiles)."""
    out = tmp_path_factory.mktemp("compile_check")
    command = [sys.executable, "-m", "benchmarks.compile_check", "--subset", "--results", str(out)]
    if compile_check._nvcc() is not None:
        command += ["--cuda-ext", CUDA_FILE]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LORI_TRITON_AUTOTUNE")}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    rows = [
        row
        for t in TARGETS
        if (out / f"compile_{t.replace('_', '')}.csv").exists()
        for row in read_rows(out / f"compile_{t.replace('_', '')}.csv")
    ]
    return done, rows


def test_subset_compiles_without_spills(subset):
    """Every kernel compiles for both targets in its first config; the check passes (shared
    memory within the limit, no bfloat16 spill stores, nothing left out)."""
    done, rows = subset
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    for target in TARGETS:
        compiled = {r["kernel"] for r in rows if r["target"] == target and r["source"] == "triton"}
        assert compiled == compile_check.all_kernels(), target
    triton_rows = [r for r in rows if r["source"] == "triton"]
    assert triton_rows and all(r["registers"] > 0 and r["spill_stores"] == 0 for r in triton_rows)
    assert all(r["shared"] <= compile_check._shared_limit(r["target"]) for r in rows)


def test_subset_checks_the_cuda_extension(subset):
    if compile_check._nvcc() is None:
        pytest.skip("no nvcc (CUDA_HOME): the extension is checked where the CI builds it")
    _, rows = subset
    for target in TARGETS:
        kernels = [r for r in rows if r["source"] == "cuda_ext" and r["target"] == target]
        assert kernels and all(not r["error"] and r["registers"] > 0 and r["spill_stores"] == 0 for r in kernels)


def test_committed_tables_show_no_spills_and_current_configs(subset):
    """The committed full sweep: every kernel on both targets, no failed check (no spill
    stores in bfloat16/float16 at widths in % 8 == 0, nor in the extension), and made with
    the kernels' current first configs (else rerun make compile-check)."""
    _, fresh = subset
    committed = []
    for target in TARGETS:
        path = RESULTS / f"compile_{target.replace('_', '')}.csv"
        assert path.exists(), f"{path} is missing: run make compile-check"
        committed += read_rows(path)
    failures, _ = compile_check.problems(committed, list(TARGETS), every_kernel=True)
    assert not failures, "\n".join(failures[:20])
    configs = {(r["target"], r["kernel"], r["config"]) for r in committed}
    stale = {(r["target"], r["kernel"], r["config"]) for r in fresh if r["source"] == "triton"} - configs
    assert not stale, f"the committed tables predate these configs (rerun make compile-check): {sorted(stale)}"


def row(**values) -> dict:
    base = dict(source="triton", launcher="shrink", kernel="_shrink_kernel", config="BLOCK_M=64", target="sm_90")
    base.update({k: "-" for k in compile_check.VARIANT_COLUMNS}, dtype="bfloat16", width="16", error="")
    base.update(registers=100, spill_stores=0, spill_loads=0, stack=0, shared=1024, cubin_bytes=1, compile_s=1.0)
    return dict(base, **values)


def test_checks_fail_what_they_should():
    """Spill stores fail in bfloat16/float16 at widths in % 8 == 0 and in the extension, and
    are only reported in float32 or at odd widths; so are shared memory over the target's
    limit, a failed compile and a kernel never compiled."""
    cases = {
        "spill": (row(spill_stores=8), True),
        "spill in8": (row(width="8", dtype="float16", spill_stores=8), True),
        "spill cuda": (row(source="cuda_ext", dtype="-", width="-", spill_stores=8), True),
        "spill fp32": (row(dtype="float32", spill_stores=8), False),
        "spill odd": (row(width="odd", spill_stores=8), False),
        "shared": (row(target="sm_80", shared=200 * 1024), True),
        "shared sm_90": (row(target="sm_90", shared=200 * 1024), False),
        "error": (row(error="CompilationError: ..."), True),
        "fine": (row(), False),
    }
    for name, (r, fails) in cases.items():
        failures, notes = compile_check.problems([r], ["sm_90"], every_kernel=False)
        assert bool(failures) == fails, name
        assert bool(notes) == (name in ("spill fp32", "spill odd")), name
    failures, _ = compile_check.problems([row()], ["sm_90"], every_kernel=True)
    assert any("_linear_expand_kernel: never compiled" in f for f in failures)
