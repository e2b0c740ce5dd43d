"""Regenerating A from its seed: the torch reference vs the compiled kernel, per device.

    python benchmarks/bench_generate_a.py [--quick] [--results DIR]

Prints a table and writes generate_a_<cpu|cuda>.csv under benchmarks/results/. The compiled
kernel's output is checked bit for bit against the reference before it is timed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import RESULTS, environment, median_ms, write_csv

import lori_kernels

SHAPES = [(16, 4096), (32, 4096), (64, 4096), (32, 14336), (64, 14336)]
SEED = 2**63 + 12345


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes only")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write the CSV")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compiled = f"{device.type}_ext"
    if compiled not in lori_kernels.available_backends("generate_a"):
        raise SystemExit(f"no {compiled} backend here: build lori_kernels._C first (make install)")
    env = environment()
    rows = []
    for r, d_in in SHAPES[:2] if args.quick else SHAPES:
        ref = lori_kernels.generate_a(SEED, r, d_in, device=device, backend="reference")
        ours = lori_kernels.generate_a(SEED, r, d_in, device=device, backend=compiled)
        assert torch.equal(ref.view(torch.int32), ours.view(torch.int32)), "backends disagree"
        t_ref = median_ms(lambda: lori_kernels.generate_a(SEED, r, d_in, device=device, backend="reference"), device)
        t_ext = median_ms(lambda: lori_kernels.generate_a(SEED, r, d_in, device=device, backend=compiled), device)
        rows.append(
            {
                **env,
                "op": "generate_a",
                "r": r,
                "d_in": d_in,
                "dtype": "float32",
                "baseline": "reference",
                "baseline_ms": round(t_ref, 4),
                "backend": compiled,
                "backend_ms": round(t_ext, 4),
                "speedup": round(t_ref / t_ext, 2),
            }
        )
        print(f"r={r:3d} d_in={d_in:6d}  reference {t_ref:9.3f} ms  {compiled} {t_ext:8.3f} ms  {t_ref / t_ext:7.1f}x")
    print(f"wrote {write_csv(f'generate_a_{device.type}', rows, args.results)}")


if __name__ == "__main__":
    main()
