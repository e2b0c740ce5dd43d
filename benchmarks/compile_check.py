"""Compile check without a GPU: every Triton kernel of ``lori_kernels`` x every autotune
config x the variants real launches use, and the CUDA extension's kernels, for sm_90 and sm_80.

    .venv/bin/python -m benchmarks.compile_check             # full sweep: make compile-check
    .venv/bin/python -m benchmarks.compile_check --subset    # one config per kernel, bfloat16

Triton: the real launchers (``shrink``, ``linear_expand``, ... ``generate_a_tile``) run on
meta tensors inside ``benchmarks.aot.compiling_for``, so each kernel is compiled with the
signature and specialisation Triton's own binder gives that launch. Variants: dtype
(bfloat16, float16, float32) x r (16, 32, 64, block ``(32, min(r, 32))``) x width
(``in = out`` = 4096: multiples of 16; 4104: of 8 only; 4097 with M odd: nothing aligned,
``d_in % 4 != 0``) x dropout (0, 0.05) x bias (with, without) x sddmm's split of M (fp32
partial sums, or written in place), where the launcher takes them; then the Rademacher A and
int32 seed halves (``key0 .. dkey1`` below 2^31: the int32 specialisation; the default has all
four >= 2^31: int64) each at r 32, width 4096. An identical specialisation (a factor the
kernel does not see) is compiled once and its row repeats the numbers with ``compile_s`` 0.

CUDA extension: ``nvcc -Xptxas -v`` on ``csrc/*.cu`` with the flags setup.py's build uses
(torch's include paths and defines, C++20, -O3), sm_80 and sm_90 in one call per file.

Checks (a list and exit status 1 when one fails): every compile succeeds and every kernel of
``lori_kernels.triton_kernels`` is compiled; shared memory per block is within the target's
opt-in maximum (``aot.SHARED_LIMIT``); no spill stores in bfloat16/float16 variants at widths
with ``in % 8 == 0``, nor in the extension. Spills elsewhere (float32, odd widths) are listed,
not failed.

Tables: ``benchmarks/results/compile_sm90.csv`` and ``compile_sm80.csv`` (``--results``), one
row per kernel x config x variant (Triton) or kernel (extension), with registers, spill
bytes, stack, shared memory, cubin size and compile time. Jobs (one per launcher and target,
one per ``.cu`` file) run in ``--jobs`` processes (default: every core).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOAT_DTYPES = ("bfloat16", "float16", "float32")
LOW_PRECISION = ("bfloat16", "float16")
WIDTHS = {"16": (8192, 4096), "8": (8192, 4104), "odd": (8191, 4097)}  # width -> (M, in = out)
ALIGNED_WIDTHS = ("16", "8")  # in % 8 == 0: no spills allowed in bfloat16/float16
SEEDS = {"i64": 0xFFFF_FFF0_FFFF_FFF1, "i32": 0x0000_0003_0000_0005}  # both 32-bit halves >= 2^31, < 2^31
# Streaming multiprocessors of the GPUs of each target (H100/H200 SXM, A100): sddmm splits
# M by them, so its variants are those launches on those GPUs.
PROCESSORS = {"sm_90": 132, "sm_80": 108}
# Kernels that only Triton's CPU interpreter runs (no GPU launch to check).
INTERPRETER_ONLY = {"_dot_probe_kernel"}
VARIANT_COLUMNS = ("dtype", "r", "width", "dropout", "bias", "split", "dist", "seeds")


@dataclasses.dataclass(frozen=True)
class Variant:
    """The launch arguments that can change a kernel's code; "-" where a launcher does not take it."""

    dtype: str = "-"
    r: int | str = "-"
    width: str = "16"
    dropout: str = "-"  # "0" or "0.05"
    bias: str = "-"  # "yes" or "no"
    split: str = "-"  # sddmm: "yes" (float32 partial sums) or "no"
    dist: str = "-"
    seeds: str = "-"


# Each launcher: the factors of Variant it takes (the longest sweeps first).
FACTORS = {
    "linear_shrink_backward": ("dtype", "r", "width", "dropout", "dist", "seeds"),
    "linear_shrink": ("dtype", "r", "width", "dropout", "bias", "dist", "seeds"),
    "linear_expand": ("dtype", "r", "width", "bias"),
    "shrink_backward": ("dtype", "r", "width", "dropout", "dist", "seeds"),
    "shrink": ("dtype", "r", "width", "dropout", "dist", "seeds"),
    "expand_": ("dtype", "r", "width"),
    "expand_backward": ("dtype", "r", "width"),
    "expand_segments_": ("dtype", "r", "width"),
    "sddmm": ("dtype", "r", "width", "split"),
    "generate_a_tile": ("width", "dist", "seeds"),
    "dropout_keep": ("width", "seeds"),
}
CHOICES = {  # the values of each factor
    "dtype": FLOAT_DTYPES,
    "r": (16, 32, 64),
    "width": tuple(WIDTHS),
    "dropout": ("0", "0.05"),
    "bias": ("yes", "no"),
    "split": ("yes", "no"),
    "dist": ("uniform", "rademacher"),
    "seeds": ("i64", "i32"),
}
# What the full sweep crosses; the RNG's distribution and seed types vary one at a time from
# the default (uniform, int64), at r 32 and width 4096, except in the small RNG kernels.
CROSSED = ("dtype", "r", "width", "dropout", "bias", "split")
DEVIATIONS = {"dist": ("uniform", "rademacher"), "seeds": ("i64", "i32")}
RNG_ONLY = ("generate_a_tile", "dropout_keep")
# --subset: one variant per launcher (the heaviest of the common case) and first configs.
SUBSET = Variant(
    dtype="bfloat16", r=32, width="16", dropout="0.05", bias="yes", split="yes", dist="uniform", seeds="i64"
)


def variants(launcher: str, subset: bool) -> list[Variant]:
    """The variants of ``launcher`` the sweep compiles."""
    factors = FACTORS[launcher]
    if subset:
        return [Variant(**{f: getattr(SUBSET, f) for f in factors})]
    crossed = factors if launcher in RNG_ONLY else [f for f in factors if f in CROSSED]
    default = {f: DEVIATIONS[f][0] for f in factors if f not in crossed}
    found = [
        Variant(**default, **dict(zip(crossed, values, strict=True)))
        for values in itertools.product(*(CHOICES[f] for f in crossed))
    ]
    for factor in default:
        found += [
            dataclasses.replace(v, **{factor: value})
            for v in found
            if v.r in (32, "-") and v.width == "16"
            for value in DEVIATIONS[factor][1:]
        ]
    return list(dict.fromkeys(found))


def launch(launcher: str, v: Variant, processors: int) -> None:
    """Calls ``launcher`` as the layer would for variant ``v``, on meta tensors."""
    import torch

    from lori_kernels.triton_kernels import expand, expand_segments, gemm, philox, sddmm, shrink

    m, width = WIDTHS[v.width]
    dtype = getattr(torch, v.dtype) if v.dtype != "-" else torch.float32
    r = v.r if v.r != "-" else 32
    block = (32, min(r, 32))
    seed = SEEDS[v.seeds] if v.seeds != "-" else SEEDS["i64"]
    p = float(v.dropout) if v.dropout != "-" else 0.0
    dist = v.dist if v.dist != "-" else "uniform"

    def meta(*shape, dtype=dtype):
        return torch.empty(*shape, dtype=dtype, device="meta")

    n_blocks = -(-width // block[0]) * (r // block[1])
    nnz = max(1, n_blocks // 10)  # 90% sparsity
    if v.split == "no":
        nnz = 8 * processors  # as a dense B at 14336 x 64: one program per block fills the GPU
    b_values, b_blocks = meta(nnz, *block), meta(nnz, 2, dtype=torch.int32)
    if launcher == "shrink":
        shrink.shrink(meta(m, width), seed, r, dist, p, seed)
    elif launcher == "shrink_backward":
        shrink.shrink_backward(meta(m, r), seed, width, dist, p, seed)
    elif launcher == "linear_shrink_backward":
        gemm.linear_shrink_backward(meta(m, width), meta(width, width), meta(m, r), seed, dist, p, seed)
    elif launcher == "expand_":
        expand.expand_(meta(m, width), meta(m, r), b_values, b_blocks, 2.0)
    elif launcher == "expand_backward":
        expand.expand_backward(meta(m, width), b_values, b_blocks, r, 2.0)
    elif launcher == "expand_segments_":  # a mixed batch of 8 adapters' segments
        segments, n_block_rows = 8, -(-width // block[0])
        expand_segments.expand_segments_(
            meta(m, width),
            meta(m, r),
            meta(m, dtype=torch.int64),
            meta(segments + 1, dtype=torch.int32),
            m,
            meta(segments * nnz, *block),
            meta(segments * nnz, 2, dtype=torch.int32),
            meta(segments, n_block_rows + 1, dtype=torch.int32),
            meta(segments, dtype=torch.float32),
        )
    elif launcher == "sddmm":
        saved = sddmm.processor_count
        sddmm.processor_count = lambda device: processors
        try:
            sddmm.sddmm(meta(m, width), meta(m, r), b_blocks, *block, 2.0)
        finally:
            sddmm.processor_count = saved
    elif launcher == "linear_shrink":
        bias = meta(width) if v.bias == "yes" else None
        gemm.linear_shrink(meta(m, width), meta(width, width), bias, seed, r, dist, p, seed)
    elif launcher == "linear_expand":
        bias = meta(width) if v.bias == "yes" else None
        gemm.linear_expand(meta(m, width), meta(width, width), bias, meta(m, r), b_values, b_blocks, 2.0)
    elif launcher == "generate_a_tile":
        philox.generate_a_tile(seed, width, 0, r, 0, width, dist=dist, device="meta")
    elif launcher == "dropout_keep":
        philox.dropout_keep(seed, 0.05, m, width, device="meta")
    else:
        raise ValueError(f"unknown launcher {launcher!r}")


def _prepare_process(cache_dir: str) -> None:
    """Environment of a sweep process, before Triton is imported: kernels compiled (not
    interpreted), every autotune config, a fresh Triton cache (so ptxas reports each compile)."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("LORI_TRITON_AUTOTUNE", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def triton_job(launcher: str, target: str, subset: bool) -> list[dict]:
    """Compiles every variant of ``launcher`` for ``target``: one row per kernel x config x variant."""
    from benchmarks import aot

    rows = []
    for v in variants(launcher, subset):
        with aot.compiling_for(target, configs="first" if subset else "all") as check:
            launch(launcher, v, PROCESSORS[target])
        for c in check.compiled:
            row = dict(source="triton", launcher=launcher, kernel=c.kernel, config=c.config)
            row.update({k: getattr(v, k) for k in VARIANT_COLUMNS})
            row.update({k: getattr(c, k) for k in _USAGE_COLUMNS}, target=target, error=c.error)
            rows.append(row)
    return rows


_USAGE_COLUMNS = ("registers", "spill_stores", "spill_loads", "stack", "shared", "cubin_bytes", "compile_s")


# ---------------------------------------------------------------------------------------
# The CUDA extension


def _nvcc() -> Path | None:
    home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    return Path(home) / "bin" / "nvcc" if home and (Path(home) / "bin" / "nvcc").exists() else None


def nvcc_command(source: Path, targets: list[str], out: Path) -> list[str]:
    """nvcc on one ``.cu`` file as setup.py's CUDAExtension builds it (torch's include paths
    and defines, C++20, -O3), for ``targets``, with ptxas ``-v``."""
    nvcc = _nvcc()
    os.environ.setdefault("CUDA_HOME", str(nvcc.parent.parent))
    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths(device_type="cuda"), sysconfig.get_paths()["include"]]
    gencodes = [f"-gencode=arch=compute_{t[3:]},code={t}" for t in targets]
    return [
        str(nvcc),
        *(f"-I{p}" for p in includes),
        "-c",
        str(source),
        "-o",
        str(out),
        *cpp_extension.COMMON_NVCC_FLAGS,
        "--compiler-options",
        "-fPIC",
        "-O3",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        *gencodes,
        "-std=c++20",
        "-Xptxas",
        "-v",
    ]


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")


def parse_nvcc_ptxas(log: str) -> list[tuple[str, str, str]]:
    """``(mangled kernel, target, its ptxas report)`` for each entry function in nvcc's log."""
    found = []
    for block in re.split(r"(?=ptxas info\s*: Compiling entry function)", log):
        m = _ENTRY.search(block)
        if m:
            found.append((m.group(1), m.group(2), block))
    return found


def _without_parameters(signature: str) -> str:
    """``void ns::kernel<T>(args)`` -> ``ns::kernel<T>``: the last balanced ``(...)`` dropped."""
    depth = 0
    for i in range(len(signature) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(signature[i], 0)
        if depth == 0 and signature[i] == "(":
            signature = signature[:i]
            break
    return signature.removeprefix("void ").strip()


def _demangle(names: list[str]) -> dict[str, str]:
    """Kernel names without their parameter lists (``lori::shrink_kernel<c10::BFloat16, true>``)."""
    tool = shutil.which("cu++filt", path=str(_nvcc().parent)) or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    done = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    readable = done.stdout.splitlines()
    if done.returncode != 0 or len(readable) != len(names):
        return {n: n for n in names}
    return {n: _without_parameters(d) for n, d in zip(names, readable, strict=True)}


def cuda_job(source: str, targets: list[str]) -> list[dict]:
    """ptxas's report on every kernel of one ``.cu`` file, for ``targets``."""
    from benchmarks import aot

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        done = subprocess.run(
            nvcc_command(ROOT / source, targets, Path(tmp) / "out.o"), capture_output=True, text=True, cwd=ROOT
        )
        seconds = round(time.perf_counter() - start, 1)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        tail = " | ".join(log.strip().splitlines()[-3:])[:300]
        return [
            _cuda_row(source, "(nvcc)", t, {}, seconds, f"nvcc failed ({done.returncode}): {tail}") for t in targets
        ]
    entries = parse_nvcc_ptxas(log)
    names = _demangle(sorted({name for name, _, _ in entries}))
    rows = []
    for name, target, report in entries:
        usage = aot.ptxas_usage(report)
        smem = re.search(r"(\d+) bytes smem", report)
        usage["shared"] = int(smem.group(1)) if smem else 0
        rows.append(_cuda_row(source, names[name], target, usage, seconds, ""))
    return rows


def _cuda_row(source, kernel, target, usage, seconds, error) -> dict:
    row = dict(source="cuda_ext", launcher=Path(source).name, kernel=kernel, config="-")
    row.update({k: "-" for k in VARIANT_COLUMNS})
    row.update({k: usage.get(k, -1) for k in _USAGE_COLUMNS}, compile_s=seconds, target=target, error=error)
    row["cubin_bytes"] = -1  # nvcc writes one object for every target
    return row


# ---------------------------------------------------------------------------------------
# Checks and tables


def all_kernels() -> set[str]:
    """Names of every kernel (a ``@triton.jit`` function launched from the host: wrapped by
    an autotuner or named ``*_kernel``) in ``lori_kernels.triton_kernels``, read from source
    without importing Triton."""
    found = set()
    for path in (ROOT / "lori_kernels" / "triton_kernels").glob("*.py"):
        found |= set(re.findall(r"@triton\.jit[^\n]*\ndef (_?\w+_kernel)\(", path.read_text()))
    return found - INTERPRETER_ONLY


def problems(rows: list[dict], targets: list[str], every_kernel: bool) -> tuple[list[str], list[str]]:
    """(failures, notes): what breaks the checks, and spills that are only reported;
    ``every_kernel``: whether every kernel should have been compiled."""
    failures, notes = [], []
    for row in rows:
        where = (
            f"{row['target']} {row['kernel']} [{row['config']}] "
            + " ".join(f"{k}={row[k]}" for k in VARIANT_COLUMNS if row[k] != "-")
        ).strip()
        if row["error"]:
            failures.append(f"{where}: {row['error']}")
            continue
        limit = _shared_limit(row["target"])
        if row["shared"] > limit:
            failures.append(f"{where}: {row['shared']} bytes of shared memory > {limit}")
        if row["spill_stores"] > 0:
            strict = row["source"] == "cuda_ext" or (row["dtype"] in LOW_PRECISION and row["width"] in ALIGNED_WIDTHS)
            line = f"{where}: {row['spill_stores']} bytes spill stores, {row['spill_loads']} loads"
            (failures if strict else notes).append(line)
    if every_kernel:
        for target in targets:
            missing = all_kernels() - {r["kernel"] for r in rows if r["target"] == target and r["source"] == "triton"}
            failures += [f"{target} {k}: never compiled (no launcher of the sweep reaches it)" for k in sorted(missing)]
    return failures, notes


def _shared_limit(target: str) -> int:
    from benchmarks.aot import SHARED_LIMIT

    return SHARED_LIMIT[int(target[3:])]


def environment_columns() -> dict:
    import torch
    import triton

    from lori.bench.common import environment

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    version = subprocess.run([str(ptxas), "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\S+),", version)
    env = environment(torch.device("cpu"))
    return dict(
        triton=triton.__version__,
        ptxas=found.group(1) if found else "unknown",
        torch=env["torch"],
        commit=env["commit"],
        date=env["date"],
    )


def run(targets: list[str], launchers: list[str], subset: bool, cuda_sources: list[str], jobs: int) -> list[dict]:
    """Every job, in ``jobs`` processes; rows in a stable order."""
    cache = tempfile.mkdtemp(prefix="lori-compile-check-")
    _prepare_process(cache)
    # The longest jobs first (FACTORS' order), the extension's after the two GEMMs.
    work = [(triton_job, (launcher, t, subset)) for launcher in FACTORS if launcher in launchers for t in targets]
    work[2 * len(targets) : 2 * len(targets)] = [(cuda_job, (source, targets)) for source in cuda_sources]
    rows: list[dict] = []
    context = multiprocessing.get_context("spawn")
    try:
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=jobs, mp_context=context, initializer=_prepare_process, initargs=(cache,)
        ) as pool:
            futures = {pool.submit(fn, *args): args for fn, args in work}
            for future in concurrent.futures.as_completed(futures):
                got = future.result()
                rows += got
                print(f"  {' '.join(map(str, futures[future]))[:60]}: {len(got)} rows", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    order = {name: i for i, name in enumerate(FACTORS)}
    rows.sort(key=lambda r: (r["target"], r["source"], order.get(r["launcher"], 99), r["launcher"], r["kernel"]))
    return rows


def write_tables(rows: list[dict], results: Path) -> list[Path]:
    from lori.bench.common import write_csv

    env = environment_columns()
    paths = []
    for target in sorted({r["target"] for r in rows}):
        table = [dict(r, **env) for r in rows if r["target"] == target]
        paths.append(write_csv(f"compile_{target.replace('_', '')}", table, results))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", action="store_true", help="first config of each kernel, one bfloat16 variant")
    parser.add_argument("--targets", nargs="+", default=["sm_90", "sm_80"], choices=["sm_90", "sm_80"])
    parser.add_argument(
        "--cuda-ext",
        nargs="*",
        default=None,
        help="the .cu files to check (default: every csrc/*.cu; none with --subset unless named; no arguments: none)",
    )
    parser.add_argument("--launchers", nargs="+", default=list(FACTORS), choices=list(FACTORS), metavar="LAUNCHER")
    parser.add_argument("--results", type=Path, default=None, help="write compile_sm90.csv etc. here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.cuda_ext is None:
        args.cuda_ext = [] if args.subset else [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").glob("*.cu"))]
    if args.cuda_ext and _nvcc() is None:
        print("no nvcc (set CUDA_HOME): the CUDA extension is not checked", file=sys.stderr)
        args.cuda_ext = []
    start = time.perf_counter()
    rows = run(args.targets, args.launchers, args.subset, args.cuda_ext, args.jobs)
    seconds = time.perf_counter() - start
    if args.results is not None:
        for path in write_tables(rows, args.results):
            print(f"wrote {path}", file=sys.stderr)
    failures, notes = problems(rows, args.targets, every_kernel=args.launchers == list(FACTORS))
    compiled = sum(1 for r in rows if r["compile_s"] > 0 and r["source"] == "triton")
    print(
        f"{len(rows)} rows, {compiled} Triton compiles, {len(args.cuda_ext)} .cu files, "
        f"{len(failures)} failures, {len(notes)} spills reported only, in {seconds:.0f} s"
    )
    for line in notes:
        print(f"  spill (reported): {line}")
    for line in failures:
        print(f"  FAIL: {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
