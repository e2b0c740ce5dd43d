"""One LoRI layer, forward + backward, against its baselines measured in the same run.

    python benchmarks/bench_layer.py [--quick] [--results DIR]

Rows (every time is a median, every ratio is to the frozen base ``F.linear`` alone):
  base        x @ W.T + b, W frozen (the floor)
  peft_lora   PEFT's LoRA layer with the same W (dense A and B, A frozen as in LoRI)
  reference   lori_linear(backend="reference")
  triton      lori_linear(backend="triton")      (on a GPU)

GPU: Llama-3-8B projection shapes, M = 8192 tokens, bf16. CPU: scaled-down shapes in
float32 so the run takes minutes. Before a backend is timed its output and gradients are
checked against the reference. Writes layer_<cpu|cuda>.csv under benchmarks/results/.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from common import RESULTS, environment, median_ms, write_csv

import lori_kernels
from lori_kernels import block_sparse

GPU_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in, out)
CPU_SHAPES = [(1024, 1024), (1024, 2816)]


def make_case(m, inp, out, r, sparsity, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    block = (32, min(r, 32))
    weight = (torch.randn(out, inp, generator=g) / inp**0.5).to(dtype).to(device)
    bias = torch.zeros(out, dtype=dtype, device=device)
    n_rows, n_cols = block_sparse.block_grid(out, r, block)
    n_keep = max(1, round((1 - sparsity) * n_rows * n_cols))
    kept = torch.zeros(n_rows * n_cols, dtype=torch.bool)
    kept[torch.randperm(n_rows * n_cols, generator=g)[:n_keep]] = True
    mask = kept.reshape(n_rows, n_cols).repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:out]
    b_dense = torch.randn(out, r, generator=g) * 0.01 * mask
    b_values, b_blocks = block_sparse.from_dense(b_dense, block, mask)
    return dict(
        weight=weight, bias=bias, block=block, r=r, seed=lori_kernels.layer_seed(seed, "bench"),
        b_values=b_values.to(dtype).to(device).requires_grad_(), b_blocks=b_blocks.to(device),
        b_dense=b_dense.to(dtype).to(device), x=torch.randn(m, inp, generator=g).to(dtype).to(device).requires_grad_(),
        dy=torch.randn(m, out, generator=g).to(dtype).to(device),
    )


def lori_fn(case, backend):
    def forward():
        return lori_kernels.lori_linear(
            case["x"], case["weight"], case["bias"], case["seed"], case["b_values"], case["b_blocks"],
            r=case["r"], block=case["block"], scaling=2.0, backend=backend,
        )
    return forward


def peft_fn(case):
    """PEFT's own LoRA layer on the same weights, or None without peft."""
    try:
        import peft
    except ImportError:
        return None
    out, inp = case["weight"].shape
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(inp, out, dtype=case["weight"].dtype, device=case["weight"].device))
    model = peft.get_peft_model(base, peft.LoraConfig(r=case["r"], lora_alpha=2 * case["r"], target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.base_layer.weight.copy_(case["weight"])
        layer.base_layer.bias.copy_(case["bias"])
        a = lori_kernels.generate_a(case["seed"], case["r"], inp, dtype=case["weight"].dtype, device=case["weight"].device)
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(case["b_dense"])
    layer.lora_A["default"].weight.requires_grad_(False)  # LoRI's A is frozen
    return lambda: layer(case["x"])


def fwd_bwd(forward, dy):
    def step():
        forward().backward(dy)
    return step


def check_against_reference(case, backend):
    def run(b):
        case["x"].grad = case["b_values"].grad = None
        y = lori_kernels.lori_linear(
            case["x"], case["weight"], case["bias"], case["seed"], case["b_values"], case["b_blocks"],
            r=case["r"], block=case["block"], scaling=2.0, backend=b,
        )
        y.backward(case["dy"])
        return y.float(), case["x"].grad.float(), case["b_values"].grad.float()

    tol = 2e-2 if case["x"].dtype != torch.float32 else 1e-4
    for got, want in zip(run(backend), run("reference")):
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
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    grid = [(inp, out, r, s) for inp, out in shapes for r in (16, 32, 64) for s in (0.0, 0.9)]
    if args.quick:
        m, grid = 256, [(256, 384, 32, 0.9)]
    backends = [b for b in ("triton", "reference") if device.type == "cuda" or b != "triton"]
    env = environment()
    rows = []
    for inp, out, r, sparsity in grid:
        case = make_case(m, inp, out, r, sparsity, dtype, device)
        fns = {"base": lambda: torch.nn.functional.linear(case["x"], case["weight"], case["bias"])}
        peft_forward = peft_fn(case)
        if peft_forward is not None:
            fns["peft_lora"] = peft_forward
        for b in backends:
            if b != "reference":
                check_against_reference(case, b)
            fns[b] = lori_fn(case, b)
        times = {name: median_ms(fwd_bwd(fn, case["dy"]), device) for name, fn in fns.items()}
        for name, t in times.items():
            rows.append({
                **env, "M": m, "in": inp, "out": out, "r": r, "block": "x".join(map(str, case["block"])),
                "sparsity": sparsity, "dtype": str(dtype).removeprefix("torch."), "pass": "fwd+bwd",
                "impl": name, "ms": round(t, 4), "ratio_to_base": round(t / times["base"], 3),
            })
        print(f"M={m} in={inp} out={out} r={r} sparsity={sparsity}: " + "  ".join(
            f"{n} {t:.3f} ms ({t / times['base']:.2f}x)" for n, t in times.items()))
    print(f"wrote {write_csv(f'layer_{device.type}', rows, args.results)}")


if __name__ == "__main__":
    main()
