"""Ahead-of-time compilation of real Triton launches for a GPU that is not there.

Inside ``compiling_for(target)`` the project's own launchers (``lori_kernels.triton_kernels``)
run on meta tensors and every Triton launch compiles for ``target`` instead of running:

- a stand-in driver answers Triton's questions about the current device with ``target``
  (no CUDA driver needed); the device id is the arch, so each target keeps its own cache;
- ``JITFunction.run`` runs with ``warmup=True``: Triton's own binder turns the launch's
  arguments into the signature and specialisation a real launch gets (dtypes, int32 or
  int64 scalars, multiples of 16, ones, ``do_not_specialize``), compiles (an identical
  specialisation reuses Triton's in-process cache: no second compile) and launches nothing;
- ``Autotuner.run`` compiles the configs Triton would time (those its early pruning keeps;
  ``configs="first"``: the first of them) instead of timing them;
- ptxas's ``-v`` report of each compile (Triton runs ptxas with ``-v``; ``dump_ptxas_log``
  prints it) gives registers, stack and spill bytes; an older Triton without that knob gets
  its PTX run through the bundled ptxas once more.

Each compile is one ``Compiled`` in ``compiling_for(...).compiled``. Run it with
``TRITON_INTERPRET`` unset (the interpreter replaces ``triton.jit`` when the kernels are
defined) and a fresh ``TRITON_CACHE_DIR`` (a kernel found in Triton's disk cache is not
compiled, so ptxas reports nothing).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

# Shared memory one block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin, which
# triton.runtime.driver reports on the device): 227 KB on sm_90 (H100/H200), 163 KB on
# sm_80 (A100). A kernel over it fails to launch there.
SHARED_LIMIT = {90: 232448, 80: 166912}
TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}


@dataclasses.dataclass
class Compiled:
    """One kernel compiled for one target (or the error that stopped it)."""

    kernel: str
    config: str  # the autotune config (meta-parameters, warps, stages), or the launch's
    target: str  # "sm_90"
    registers: int = -1
    spill_stores: int = -1  # bytes per thread
    spill_loads: int = -1
    stack: int = -1
    shared: int = -1  # bytes per block
    cubin_bytes: int = -1
    compile_s: float = 0.0  # 0 where the same specialisation was compiled before
    error: str = ""


class _Driver:
    """What Triton asks its active driver on a launch, answered for ``target``."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self):
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("meta")


_USAGE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def ptxas_usage(log: str) -> dict[str, int]:
    """Registers, stack and spill bytes from ptxas ``-v`` output of one function."""
    found = {name: pattern.search(log) for name, pattern in _USAGE.items()}
    return {name: int(m.group(1)) for name, m in found.items() if m}


def _ptxas_again(ptx: str, arch: int) -> str:
    """ptxas ``-v`` on ``ptx`` with the ptxas Triton bundles (for a Triton that does not
    print its own ptxas report)."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        done = subprocess.run(
            [str(ptxas), "-v", "-lineinfo", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    return done.stderr + done.stdout


def _config_label(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


class compiling_for(contextlib.AbstractContextManager):
    """Within it, Triton launches compile for ``target`` (``TARGETS``) and run nothing;
    ``configs="first"`` compiles only the first config of an autotuned kernel."""

    def __init__(self, target: str, configs: str = "all"):
        self.target = target
        self.arch = TARGETS[target].arch
        self.configs = configs
        self.compiled: list[Compiled] = []
        self._seen: dict[int, Compiled] = {}  # id(CompiledKernel) -> its first record
        self._config: dict | None = None

    def __enter__(self):
        from triton import knobs

        self._saved = (JITFunction.run, Autotuner.run, driver._active, knobs.nvidia.dump_ptxas_log)
        driver.set_active(_Driver(TARGETS[self.target]))
        knobs.nvidia.dump_ptxas_log = True
        jit_run, check = self._saved[0], self

        def run(fn, *args, grid, warmup, **kwargs):
            return check._compile(jit_run, fn, args, kwargs, grid)

        def autotuner_run(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args, strict=False))
            chosen = tuner.prune_configs(kwargs)
            chosen = chosen if check.configs == "all" else chosen[:1]
            for config in chosen:
                check._config = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
                try:
                    tuner.fn.run(*args, **kwargs, **config.all_kwargs())
                finally:
                    check._config = None

        JITFunction.run = run
        Autotuner.run = autotuner_run
        return self

    def __exit__(self, *exc):
        from triton import knobs

        JITFunction.run, Autotuner.run, driver._active, knobs.nvidia.dump_ptxas_log = self._saved
        return False

    def _compile(self, jit_run, fn, args, kwargs, grid):
        if self._config is not None:
            label = _config_label(self._config)
        else:  # a kernel without autotuning: its launch's meta-parameters
            meta = {k: v for k, v in kwargs.items() if k.startswith("BLOCK") or k in ("num_warps", "num_stages")}
            label = _config_label(meta) or "launch"
        record = Compiled(fn.__name__, label, self.target)
        log = io.StringIO()
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(log):
                kernel = jit_run(fn, *args, grid=grid, warmup=True, **kwargs)
        except Exception as e:  # a failed compile is a result, not the end of the sweep
            record.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            self.compiled.append(record)
            return None
        first = self._seen.get(id(kernel))
        if first is not None:  # the same specialisation: Triton compiled nothing
            self.compiled.append(dataclasses.replace(first, config=label, compile_s=0.0))
            return kernel
        record.compile_s = round(time.perf_counter() - start, 2)
        usage = ptxas_usage(log.getvalue())
        if "registers" not in usage:
            usage = ptxas_usage(_ptxas_again(kernel.asm["ptx"], self.arch))
        for name, value in usage.items():
            setattr(record, name, value)
        record.shared = kernel.metadata.shared
        record.cubin_bytes = len(kernel.asm["cubin"])
        self._seen[id(kernel)] = record
        self.compiled.append(record)
        return kernel
