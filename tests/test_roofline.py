"""The roofline model (lori/bench/roofline.py): its plans are what the code launches, its
arithmetic is right on a hand-checked case, and its predictions move the way they must."""

import functools
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lori.bench import roofline
from lori.bench.common import random_block_mask
from lori_kernels import backends, block_sparse, fused, reference
from lori_kernels.backends import LayerKernels

ROOT = Path(__file__).resolve().parents[1]
# aten ops that launch no kernel: views, allocations, metadata, and reads of CPU scalars into
# Python (the dropout seed, dropout_scale's float32 rounding: CPU tensors on a GPU run too)
NOT_LAUNCHES = {
    "_local_scalar_dense",
    "view",
    "_unsafe_view",
    "t",
    "transpose",
    "expand",
    "reshape",
    "_reshape_alias",
    "as_strided",
    "unsqueeze",
    "squeeze",
    "slice",
    "select",
    "permute",
    "alias",
    "detach",
    "empty",
    "empty_strided",
    "new_empty",
    "lift_fresh",
    "unbind",
    "split",
    "split_with_sizes",
}
TORCH_GEMMS = ("linear", "matmul", "addmm")  # the model's names of torch's GEMMs
SMALL = roofline.Case(m=256, inp=512, out=384, r=32, sparsity=0.5)  # 12 blocks of (32, 32), 6 kept
TINY = roofline.Case(m=32, inp=64, out=96, r=32, sparsity=0.5)  # 3 blocks, 2 kept
TINY_SPARSE = roofline.Case(m=32, inp=160, out=96, r=32, sparsity=0.7)  # 1 kept: linear_shrink's forward


class Launches(TorchDispatchMode):
    """Records the aten ops that launch a kernel (name, bytes read and written) while ``counting``."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self.counting = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if self.counting and name not in NOT_LAUNCHES:
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.ops.append((name, sum(t.numel() * t.element_size() for t in tensors)))
        return out


def layer_inputs(c: roofline.Case, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    mask = random_block_mask(c.out, c.r, c.block, c.sparsity, g)
    b_values, b_blocks = block_sparse.from_dense(torch.randn(c.out, c.r, generator=g) * mask, c.block, mask)
    assert b_blocks.shape[0] == c.nnz
    return dict(
        x=torch.randn(c.m, c.inp, generator=g).to(dtype),
        dy=torch.randn(c.m, c.out, generator=g).to(dtype),
        h=torch.randn(c.m, c.r, generator=g).to(dtype),
        weight=(torch.randn(c.out, c.inp, generator=g) / c.inp**0.5).to(dtype),
        bias=torch.randn(c.out, generator=g).to(dtype),
        b_values=b_values.to(dtype),
        b_blocks=b_blocks,
    )


# The reference twins of the optional GEMMs: what a recording kernel set runs in their place.
def _linear_expand_ref(x, weight, bias, h, b_values, b_blocks, scaling):
    y = F.linear(x, weight, bias)
    return reference.expand_ref_(y, h, b_values, b_blocks, scaling) or y


def _linear_shrink_backward_ref(dy, weight, g, seed, dist, dropout_p, dropout_seed):
    return reference.shrink_backward_ref(g, seed, weight.shape[1], dist, dropout_p, dropout_seed).addmm_(dy, weight)


def _linear_shrink_ref(x, weight, bias, seed, r, dist, dropout_p, dropout_seed):
    return F.linear(x, weight, bias), reference.shrink_ref(x, seed, r, dist, dropout_p, dropout_seed)


TWINS = reference.KERNELS._replace(
    linear_expand=_linear_expand_ref,
    linear_shrink_backward=_linear_shrink_backward_ref,
    linear_shrink=_linear_shrink_ref,
)


def backend_kernel_set(name: str) -> LayerKernels:
    """The kernel set of backend ``name`` (the extension's needs lori_kernels._C built)."""
    try:
        return backends.kernels(name)
    except RuntimeError as error:
        pytest.skip(str(error))


def called_plan(name: str, case: roofline.Case, dropout_p: float, monkeypatch) -> dict:
    """What the fused layer of backend ``name`` calls, in order, per pass: its kernel set's
    fields (each run as its torch twin) and torch's own GEMMs in between."""
    mode = Launches()
    calls = []

    def recorded(field, *args, **kwargs):
        calls.append(field)
        mode.counting = False
        try:
            return getattr(TWINS, field)(*args, **kwargs)
        finally:
            mode.counting = True

    real = backend_kernel_set(name)
    wrapped = LayerKernels(
        **{f: None if getattr(real, f) is None else functools.partial(recorded, f) for f in LayerKernels._fields}
    )
    layer = fused.LAYERS[name]
    monkeypatch.setitem(layer.__dict__, "kernels", wrapped)
    t = layer_inputs(case)
    rng = dict(seed=12345, dist="uniform", dropout_p=dropout_p, dropout_seed=torch.tensor(7))
    plan = {}
    for p in ("forward", "backward"):
        calls.clear()
        mode.ops.clear()
        with mode:
            if p == "forward":
                y, h = layer.forward(
                    t["x"],
                    t["weight"],
                    t["bias"],
                    t["b_values"],
                    t["b_blocks"],
                    r=case.r,
                    out_features=t["weight"].shape[0],
                    scaling=2.0,
                    **rng,
                )
            else:
                layer.backward(
                    t["dy"],
                    h,
                    t["weight"],
                    t["b_values"],
                    t["b_blocks"],
                    in_features=t["weight"].shape[1],
                    scaling=2.0,
                    need_dx=True,
                    need_db=True,
                    **rng,
                )
        # torch's GEMMs between the kernels: F.linear (addmm), dy @ W (mm) and dx += dy @ W (addmm_)
        torch_ops = [{"addmm": "linear", "mm": "matmul", "addmm_": "addmm"}.get(op, op) for op, _ in mode.ops]
        plan[p] = (calls[:], torch_ops)
    return plan


@pytest.mark.parametrize("case", [TINY, TINY_SPARSE], ids=["dense", "sparse"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.05])
@pytest.mark.parametrize("name", list(roofline.PLANS))
def test_plan_is_what_the_fused_layer_calls(name, dropout_p, case, monkeypatch):
    plan = called_plan(name, case, dropout_p, monkeypatch)
    for p in ("forward", "backward"):
        kernels, torch_ops = plan[p]
        modelled = roofline.plan_of(name, case)[0][p]
        assert set(torch_ops) <= set(TORCH_GEMMS), torch_ops  # nothing else outside the kernels
        assert [k for k in modelled if k not in TORCH_GEMMS] == kernels
        assert [k for k in modelled if k in TORCH_GEMMS] == torch_ops


def test_every_backend_with_a_fused_layer_is_modelled():
    cuda_backends = [row.name for row in backends.TABLE if row.device_types is None or "cuda" in row.device_types]
    assert sorted(roofline.PLANS) == sorted(cuda_backends)
    assert set(roofline.FAMILIES) == set(roofline.PLANS) >= set(roofline.SPARSE_FORWARD)
    assert roofline.plan_of("triton_epilogue", TINY_SPARSE)[0]["forward"] == ("linear_shrink", "expand_")
    assert roofline.plan_of("triton_epilogue", TINY)[0]["forward"] == ("shrink", "linear_expand")


class TritonLaunches:
    """Counts Triton kernel launches under the interpreter (each grid run); the torch ops the
    interpreter runs to stage a grid's tensors are not counted by ``torch_launches``."""

    def __init__(self, monkeypatch, torch_launches: Launches):
        from triton.runtime import interpreter

        self.count = 0
        run = interpreter.GridExecutor.__call__

        def counted(executor, *args, **kwargs):
            self.count += 1
            torch_launches.counting = False
            try:
                return run(executor, *args, **kwargs)
            finally:
                torch_launches.counting = True

        monkeypatch.setattr(interpreter.GridExecutor, "__call__", counted)


@pytest.mark.parametrize(
    "kernel",
    [
        "shrink",
        "expand_",
        "expand_backward",
        "shrink_backward",
        "sddmm",
        "linear_expand",
        "linear_shrink",
        "linear_shrink_backward",
    ],
)
def test_triton_launches_per_kernel(kernel, monkeypatch):
    """Launches inside each Triton kernel (its Triton grids and torch's ops), steady state (the
    block index is built and cached by the first call)."""
    from lori_kernels.triton_kernels import EPILOGUE_KERNELS

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("counts launches in the Triton interpreter (a CPU run)")
    # 1 kept block of 2; at M 512 sddmm splits M over 2 programs, and a second kernel sums their partials
    c = roofline.Case(m=512 if kernel == "sddmm" else 64, inp=64, out=64, r=32, sparsity=0.9, element_bytes=4)
    t = layer_inputs(c)
    fn = getattr(EPILOGUE_KERNELS, kernel)
    g = t["h"]
    args = {
        "shrink": (t["x"], 5, c.r, "uniform", 0.0, 0),
        "expand_": (t["dy"].clone(), t["h"], t["b_values"], t["b_blocks"], 2.0),
        "expand_backward": (t["dy"], t["b_values"], t["b_blocks"], c.r, 2.0),
        "shrink_backward": (g, 5, c.inp, "uniform", 0.0, 0),
        "sddmm": (t["dy"], t["h"], t["b_blocks"], *c.block, 2.0),
        "linear_expand": (t["x"], t["weight"], t["bias"], t["h"], t["b_values"], t["b_blocks"], 2.0),
        "linear_shrink": (t["x"], t["weight"], t["bias"], 5, c.r, "uniform", 0.0, 0),
        "linear_shrink_backward": (t["dy"], t["weight"], g, 5, "uniform", 0.0, 0),
    }[kernel]
    fn(*args)  # builds the cached block index
    torch_launches = Launches()
    triton_launches = TritonLaunches(monkeypatch, torch_launches)
    with torch_launches:
        fn(*args)
    gpu = roofline.dataclasses.replace(roofline.H100_SXM, sms=2)  # tuning.processor_count on the CPU
    modelled = roofline.kernel_work("triton", kernel, c, gpu).launches
    assert triton_launches.count + len(torch_launches.ops) == modelled, torch_launches.ops


def test_extension_launches_per_kernel():
    """The CUDA extension's kernels launch one grid each; sddmm adds torch's sum, scaling and cast
    (read from csrc/: there is no GPU to count them on)."""
    sources = {name: (ROOT / "csrc" / f"{name}_cuda.cu").read_text() for name in ("shrink", "expand", "sddmm")}
    assert {name: text.count("<<<") for name, text in sources.items()} == {"shrink": 2, "expand": 2, "sddmm": 1}
    assert "return partial.sum(0).mul_(scaling).to(dy.scalar_type());" in sources["sddmm"]
    bf16 = roofline.Case(m=8192, inp=4096, out=4096, r=32, sparsity=0.9)
    launches = {
        k: roofline.kernel_work("extension", k, bf16, roofline.H100_SXM).launches for k in roofline._UNFUSED["backward"]
    }
    assert launches == {"expand_backward": 1, "shrink_backward": 1, "addmm": 1, "sddmm": 4}


@pytest.mark.parametrize("dropout_p", [0.0, 0.05])
@pytest.mark.parametrize("kernel", ["shrink", "expand_", "expand_backward", "shrink_backward", "sddmm"])
def test_reference_launches_and_bytes_per_kernel(kernel, dropout_p):
    """The reference's torch ops, counted: launches exactly, bytes (every op's inputs and outputs)
    within 5% of the model's."""
    c = roofline.dataclasses.replace(SMALL, dropout=dropout_p)
    t = layer_inputs(c, torch.bfloat16)
    run = {
        "shrink": lambda: reference.shrink_ref(t["x"], 9, c.r, "uniform", dropout_p, 3),
        "expand_": lambda: reference.expand_ref_(t["dy"], t["h"], t["b_values"], t["b_blocks"], 2.0),
        "expand_backward": lambda: reference.expand_backward_ref(t["dy"], t["b_values"], t["b_blocks"], c.r, 2.0),
        "shrink_backward": lambda: reference.shrink_backward_ref(t["h"], 9, c.inp, "uniform", dropout_p, 3),
        "sddmm": lambda: reference.sddmm_ref(t["dy"], t["h"], t["b_blocks"], *c.block, 2.0),
    }[kernel]
    with Launches() as counted:
        run()
    work = roofline.kernel_work("torch", kernel, c, roofline.H100_SXM)
    assert len(counted.ops) == work.launches, [op for op, _ in counted.ops][-12:]
    measured = sum(b for _, b in counted.ops)
    assert abs(work.bytes - measured) <= 0.05 * measured, (work.bytes, measured)


def test_hand_checked_case():
    """Llama-3-8B q projection, M 8192, r 32, 90% of the (32, 32) blocks dropped, bf16, H100 SXM."""
    c = roofline.Case(m=8192, inp=4096, out=4096, r=32, sparsity=0.9)
    assert (c.nnz, c.block_rows, c.touched_rows) == (13, 128, pytest.approx(409.6))
    shrink = roofline.kernel_work("triton", "shrink", c, roofline.H100_SXM)
    assert shrink.bytes == 2 * (8192 * 4096 + 8192 * 32) == 67_633_152  # x read once, h written
    assert shrink.tensor_flops == 2 * 8192 * 4096 * 32
    assert shrink.int_ops == 16 * (8192 // 128) * 32 * 4096  # A regenerated once per 128 rows
    dx = roofline.kernel_work("triton", "shrink_backward", c, roofline.H100_SXM)
    assert dx.bytes == 2 * (8192 * 4096 + 8192 * 32) == 67_633_152  # the adapter's part of dx written, g read
    addmm = roofline.kernel_work("triton", "addmm", c, roofline.H100_SXM)
    assert addmm.bytes == 2 * (8192 * 4096 + 4096 * 4096 + 2 * 8192 * 4096)  # dy, W, dx written and read
    assert addmm.seconds(roofline.H100_SXM) == roofline.kernel_work("triton", "matmul", c, roofline.H100_SXM).seconds(
        roofline.H100_SXM
    )  # compute bound: the epilogue's read is hidden
    base = roofline.kernel_work("triton", "linear", c, roofline.H100_SXM)
    assert base.tensor_flops == 2 * 8192 * 4096 * 4096 and base.gemm == "cublas"
    base_s = 2 * 8192 * 4096 * 4096 / (989.4e12 * 0.70) + 3e-6  # compute bound
    assert base.seconds(roofline.H100_SXM) == pytest.approx(base_s)
    memory_s = 67_633_152 / (3.35e12 * 0.85)
    assert shrink.seconds(roofline.H100_SXM) == pytest.approx(memory_s + 3e-6)
    assert shrink.bound(roofline.H100_SXM) == "memory"
    sddmm = roofline.kernel_work("triton", "sddmm", c, roofline.H100_SXM)
    assert roofline.sddmm_splits(c, 132) == 21 and sddmm.launches == 2  # kernel, sum of partials (in bf16)
    plan = roofline.plan_kernels(roofline.PLANS["triton"], "triton", c, roofline.H100_SXM)
    assert sum(w.launches for _, _, w in plan) == 8
    assert roofline.ratio("triton", c, roofline.H100_SXM) == pytest.approx(1.095, abs=0.002)


def ratios(name: str, gpu=roofline.H100_SXM, **change) -> float:
    c = roofline.dataclasses.replace(roofline.Case(m=8192, inp=4096, out=14336, r=32, sparsity=0.9), **change)
    return roofline.ratio(name, c, gpu)


@pytest.mark.parametrize("name", roofline.NAMES[1:])
def test_ratios_move_the_way_they_must(name):
    by_m = [ratios(name, m=m) for m in roofline.TOKENS]
    assert by_m == sorted(by_m, reverse=True)  # launches amortised over more tokens
    by_r = [ratios(name, r=r) for r in roofline.RANKS]
    assert by_r == sorted(by_r)  # more rank, more work beside the same base
    assert ratios(name, sparsity=0.9) <= ratios(name, sparsity=0.0)
    assert ratios(name, dropout=0.05) >= ratios(name, dropout=0.0)
    assert ratios(name, roofline.H200) <= ratios(name, roofline.H100_SXM)  # same compute, more bandwidth
    assert ratios("base") == 1.0


def test_auto_picks_what_the_model_predicts_fastest():
    """``auto`` on CUDA takes the first CUDA row of the backend table: the model must agree, at
    the target case (a Llama-3-8B decoder layer, M 8192, r 32, 90% sparsity), on both GPUs."""
    first = next(row.name for row in backends.TABLE if row.device_types and "cuda" in row.device_types)
    c = roofline.Case(m=8192, inp=4096, out=4096, r=32, sparsity=0.9)
    for gpu in roofline.GPUS.values():
        for dropout in roofline.DROPOUTS:
            case = roofline.dataclasses.replace(c, dropout=dropout)
            assert roofline.fastest(case, gpu, model="Llama-3-8B", projection=roofline.DECODER_LAYER) == first


def test_break_even_gemm_efficiency():
    c = roofline.Case(m=8192, inp=4096, out=4096, r=32, sparsity=0.9)
    where = dict(model="Llama-3-8B", projection=roofline.DECODER_LAYER)
    even = roofline.break_even_gemm_efficiency("triton_epilogue", c, roofline.H100_SXM, **where)
    assert roofline.ratio("triton_epilogue", c, roofline.H100_SXM, triton_efficiency=even, **where) <= 1.05
    assert roofline.ratio("triton_epilogue", c, roofline.H100_SXM, triton_efficiency=even - 0.002, **where) > 1.05
    assert roofline.break_even_gemm_efficiency("triton", c, roofline.H100_SXM, **where) is None  # cuBLAS GEMMs


def test_quick_run_tables():
    tables = roofline.run(torch.device("cpu"), quick=True)
    layer = tables["roofline"]
    assert {r["plan"] for r in layer} == set(roofline.NAMES)
    assert {r["projection"] for r in layer} == {*roofline.MODELS["Llama-3-8B"], roofline.DECODER_LAYER}
    assert all(r["h100_ratio"] >= r["h200_ratio"] * 0.99 for r in layer)
    assert {r["kernel"] for r in tables["roofline_kernels"]} >= {"shrink", "linear_shrink", "linear_shrink_backward"}
    assert {r["name"] for r in tables["roofline_assumptions"]} >= {"TRITON_GEMM_EFFICIENCY", "LAUNCH_COST_S"}
    assert re.fullmatch(r"[0-9a-f]+(-dirty)?|unknown", layer[0]["commit"])


def test_measured_beside_predicted(tmp_path, capsys):
    """``python -m lori.bench.roofline DIR`` (gpu_session.sh roofline) puts a GPU run of the
    kernels suite beside the model: here two made-up measured rows."""
    from lori.bench.common import read_csv, write_csv

    case = dict(part="layer", dtype="bfloat16", M=8192, r=32, sparsity=0.9, block="32x32")
    measured = [
        dict(device="NVIDIA H200", **case, pass_="fwd+bwd", impl="triton", ratio=1.2),
        dict(device="NVIDIA H100 80GB HBM3", **case, pass_="fwd+bwd", impl="triton_epilogue", ratio=1.3),
        dict(device="NVIDIA H200", **case, pass_="fwd", impl="triton", ratio=1.1),  # not fwd+bwd: left out
    ]
    write_csv("kernels_cuda", [{**r, "in": 4096, "out": 4096, "pass": r.pop("pass_")} for r in measured], tmp_path)
    assert roofline.main([str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "roofline_vs_measured_cuda.csv")
    c = roofline.Case(m=8192, inp=4096, out=4096, r=32, sparsity=0.9)
    assert [r["backend"] for r in rows] == ["triton", "triton_epilogue"]
    assert rows[0]["predicted_ratio"] == round(roofline.ratio("triton", c, roofline.H200), 4)
    assert rows[1]["predicted_ratio"] == round(roofline.ratio("triton_epilogue", c, roofline.H100_SXM), 4)
    assert "| backend | measured_ratio | predicted_ratio |" in capsys.readouterr().out
