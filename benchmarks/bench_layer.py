"""One LoRI layer, forward + backward, against its baselines measured in the same run.

    python benchmarks/bench_layer.py [--quick] [--results DIR]

Two parts are timed (medians of forward + backward):
  layer      the whole layer: base (x @ W.T + b, W frozen: the floor), peft_lora (PEFT's
             LoRA layer on the same W, A frozen as in LoRI), and lori_linear on the
             reference and on every fused backend that runs on the device (triton and
             cuda_ext on a GPU, cpu_ext on the CPU); ratios are to the base.
  lora_path  the adapter alone: PEFT's LoRA branch (B(A(x)) * s, B trained) and each
             backend's five kernels (shrink, expand_, expand_backward, shrink_backward_,
             sddmm); ratios are speed-ups over the reference's kernels.

GPU: Llama-3-8B projection shapes, M = 8192 tokens, bf16, sparsity 0 and 0.9. CPU: float32,
M = 1024, in/out 1024-4096, sparsity 0, 0.5 and 0.9. Before a backend is timed its output
and gradients are checked against the reference. Writes layer_<cpu|cuda>.csv under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import RESULTS, environment, median_ms, write_csv

import lori_kernels
from lori_kernels import block_sparse
from lori_kernels.backends import unavailable_reason

GPU_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in, out)
CPU_SHAPES = [(1024, 1024), (1024, 4096), (4096, 1024), (4096, 4096)]
SCALING = 2.0


def make_case(m, inp, out, r, sparsity, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    block = (32, min(r, 32))
    n_rows, n_cols = block_sparse.block_grid(out, r, block)
    n_keep = max(1, round((1 - sparsity) * n_rows * n_cols))
    kept = torch.zeros(n_rows * n_cols, dtype=torch.bool)
    kept[torch.randperm(n_rows * n_cols, generator=g)[:n_keep]] = True
    mask = kept.reshape(n_rows, n_cols).repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:out]
    b_dense = torch.randn(out, r, generator=g) * 0.01 * mask
    b_values, b_blocks = block_sparse.from_dense(b_dense, block, mask)

    def put(t):
        return t.to(dtype).to(device)

    return dict(
        weight=put(torch.randn(out, inp, generator=g) / inp**0.5),
        bias=put(torch.zeros(out)),
        block=block,
        r=r,
        seed=lori_kernels.layer_seed(seed, "bench"),
        b_values=put(b_values).requires_grad_(),
        b_blocks=b_blocks.to(device),
        b_dense=put(b_dense),
        x=put(torch.randn(m, inp, generator=g)).requires_grad_(),
        dy=put(torch.randn(m, out, generator=g)),
    )


def lori_layer(case, backend):
    return lambda: lori_kernels.lori_linear(
        case["x"],
        case["weight"],
        case["bias"],
        case["seed"],
        case["b_values"],
        case["b_blocks"],
        r=case["r"],
        block=case["block"],
        scaling=SCALING,
        backend=backend,
    )


def peft_layer(case):
    """PEFT's own LoRA layer on the same weights (A frozen), or None without peft."""
    try:
        import peft
    except ImportError:
        return None
    out, inp = case["weight"].shape
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(inp, out, dtype=case["weight"].dtype, device=case["weight"].device))
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=case["r"], lora_alpha=SCALING * case["r"], target_modules=["proj"])
    )
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.base_layer.weight.copy_(case["weight"])
        layer.base_layer.bias.copy_(case["bias"])
        layer.lora_A["default"].weight.copy_(peft_a(case))
        layer.lora_B["default"].weight.copy_(case["b_dense"])
    layer.lora_A["default"].weight.requires_grad_(False)  # LoRI's A is frozen
    return lambda: layer(case["x"])


def peft_a(case):
    inp = case["weight"].shape[1]
    return lori_kernels.generate_a(case["seed"], case["r"], inp, dtype=case["x"].dtype, device=case["x"].device)


def peft_lora_path(case):
    """PEFT's LoRA branch alone: B(A(x)) * scaling with A frozen and B trained."""
    a, b = peft_a(case), case["b_dense"].clone().requires_grad_()
    return lambda: torch.nn.functional.linear(torch.nn.functional.linear(case["x"], a), b) * SCALING


def kernel_lora_path(case, backend):
    """A backend's five kernels doing the adapter's forward + backward (into preallocated
    outputs, as the fused layer does into the base GEMMs' results)."""
    k = lori_kernels.layer_kernels(backend)
    x, dy, bv, bb, r = case["x"].detach(), case["dy"], case["b_values"].detach(), case["b_blocks"], case["r"]
    y, dx = torch.zeros_like(dy), torch.zeros_like(x)
    seed = lori_kernels.rng.to_int64(case["seed"])

    def step():
        h = k.shrink(x, seed, r, "uniform", 0.0, 0)
        k.expand_(y, h, bv, bb, SCALING)
        g = k.expand_backward(dy, bv, bb, r, SCALING)
        k.shrink_backward_(dx, g, seed, "uniform", 0.0, 0)
        k.sddmm(dy, h, bb, *case["block"], SCALING)

    return step


def fwd_bwd(forward, dy):
    def step():
        forward().backward(dy)

    return step


def check_against_reference(case, backend):
    def run(b):
        case["x"].grad = case["b_values"].grad = None
        y = lori_layer(case, b)()
        y.backward(case["dy"])
        return y.float(), case["x"].grad.float(), case["b_values"].grad.float()

    tol = 2e-2 if case["x"].dtype != torch.float32 else 1e-4
    for got, want in zip(run(backend), run("reference"), strict=True):
        scale = want.abs().max().item() or 1.0
        assert (got - want).abs().max().item() <= tol * scale, f"{backend} disagrees with the reference"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, r 32, sparsity 0.9")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write the CSV")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    m = 8192 if gpu else 1024
    sparsities = (0.0, 0.9) if gpu else (0.0, 0.5, 0.9)
    grid = [
        (inp, out, r, s) for inp, out in (GPU_SHAPES if gpu else CPU_SHAPES) for r in (16, 32, 64) for s in sparsities
    ]
    if args.quick:
        m, grid = 256, [(256, 384, 32, 0.9)]
    fused = [
        b
        for b in ("triton", "cuda_ext", "cpu_ext")
        if unavailable_reason(b, "lori_linear", device.type, dtype) is None and (b, device.type) != ("triton", "cpu")
    ]
    env = environment()
    rows = []
    for inp, out, r, sparsity in grid:
        case = make_case(m, inp, out, r, sparsity, dtype, device)
        for b in fused:
            check_against_reference(case, b)
        layer = {"base": lambda: torch.nn.functional.linear(case["x"], case["weight"], case["bias"])}
        path = {}
        if (peft := peft_layer(case)) is not None:
            layer["peft_lora"], path["peft_lora"] = peft, peft_lora_path(case)
        for b in ["reference", *fused]:
            layer[b], path[b] = lori_layer(case, b), kernel_lora_path(case, b)
        times = {("layer", n): median_ms(fwd_bwd(fn, case["dy"]), device) for n, fn in layer.items()} | {
            ("lora_path", n): median_ms(fn if n != "peft_lora" else fwd_bwd(fn, case["dy"]), device)
            for n, fn in path.items()
        }
        for (part, name), t in times.items():
            baseline = times[("layer", "base")] if part == "layer" else times[("lora_path", "reference")]
            rows.append(
                {
                    **env,
                    "M": m,
                    "in": inp,
                    "out": out,
                    "r": r,
                    "block": "x".join(map(str, case["block"])),
                    "sparsity": sparsity,
                    "dtype": str(dtype).removeprefix("torch."),
                    "pass": "fwd+bwd",
                    "part": part,
                    "impl": name,
                    "ms": round(t, 4),
                    "baseline": "base" if part == "layer" else "reference",
                    "ratio": round(t / baseline, 3) if part == "layer" else round(baseline / t, 3),
                }
            )
        print(f"M={m} in={inp} out={out} r={r} sparsity={sparsity}")
        print(
            "  layer (x base):       "
            + "  ".join(
                f"{n} {t:.2f} ms ({t / times[('layer', 'base')]:.2f}x)" for (p, n), t in times.items() if p == "layer"
            )
        )
        print(
            "  LoRA path (speed-up): "
            + "  ".join(
                f"{n} {t:.2f} ms ({times[('lora_path', 'reference')] / t:.2f}x)"
                for (p, n), t in times.items()
                if p == "lora_path"
            )
        )
    print(f"wrote {write_csv(f'layer_{device.type}', rows, args.results)}")


if __name__ == "__main__":
    main()
