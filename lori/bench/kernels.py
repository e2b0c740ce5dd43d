"""Kernel speed: one LoRI layer against its baselines, all measured in the same process.

Every implementation computes the same layer ``y = x·Wᵀ + b + s·((x·Aᵀ)·Bᵀ)`` (W frozen,
A = LoRI's A from the layer seed, B block-sparse) on the same weights:

  base           ``F.linear(x, W, b)`` alone: the floor every ``layer`` ratio is taken to
  peft_lora      PEFT's LoRA layer, A and B trained (plain LoRA)
  lori_original  the original LoRI code's way: PEFT's LoRA layer with A frozen and a dense
                 B whose gradient is multiplied by the mask (a hook, as its masked optimizer)
  <backend>      ``lori_linear`` on each backend (``reference``, ``cpu_ext``; ``triton``,
                 ``triton_epilogue`` and ``cuda_ext`` on a GPU; Triton is never timed on the
                 CPU, where it only runs in its interpreter)

Passes: ``fwd`` (a training forward: the graph is recorded), ``bwd`` (backward alone, over a
retained graph) and ``fwd+bwd``. Part ``lora_path`` times the adapter alone (fwd+bwd): an
unfused torch ``B(A(x))·s`` and each backend's five kernels, as ratios to the reference's.
``triton_epilogue`` runs the ``triton`` backend's five kernels, so it has no ``lora_path``
(or ``merge``) rows of its own: what it changes is the layer around them (the base GEMMs).
Table ``generate_a``: regenerating A, the torch reference against the compiled kernels
(bit-identical outputs checked first). Table ``merge``: materializing ``ΔW = s·B·A`` in float32
to fold an adapter into its base weight (``lori.merge.delta_weight``: A regenerated, the
backend's block-sparse expand kernel over the kept blocks) against PEFT's way, a dense
``B @ A · s`` of stored A and B, at the full Llama-3-8B projection shapes (results checked
against float64 math first).

Before anything of a case is timed, every implementation's output and gradients (x and B
at the kept blocks) are checked against the reference backend's.

GPU: Llama-3-8B projections (in × out 4096 × 4096, 4096 × 1024, 4096 × 14336, 14336 × 4096),
bf16. CPU: the same shapes / 4, float32 and bfloat16. By default a star around a centre case
(GPU: 4096 × 14336, M 8192; CPU: 1024 × 1024, M 1024; r 32, sparsity 0.9): every shape at
sparsity 0 and 0.9, then sparsity 0 / 0.5 / 0.9 / 0.99, r 16 / 32 / 64, M (1, one decoded
token, where the host's cost of a call dominates, then 256 to 8192) and dtype, one at a time.
``full=True`` runs every combination instead.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

import lori_kernels
from lori_kernels import block_sparse
from lori_kernels.backends import kernels as backend_kernels
from lori_kernels.backends import unavailable_reason

from .common import (
    LLAMA3_8B_PROJECTIONS,
    default_block,
    dtype_name,
    environment,
    interpreted,
    lori_backends,
    median_ms_each,
    random_block_mask,
)

log = logging.getLogger(__name__)

SCALING = 2.0  # alpha = 2r, the LoRI recipe's
PASSES = ("fwd", "bwd", "fwd+bwd")
GENERATE_A_SHAPES = [(16, 4096), (32, 4096), (64, 4096), (32, 14336), (64, 14336)]  # (r, d_in)
GENERATE_A_SEED = 2**63 + 12345
QUICK_MERGE_SHAPES = [(256, 384)]  # (in, out)
SAME_KERNELS_AS_TRITON = ("triton_epilogue",)  # timed as a layer only


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark case: M tokens through an ``inp -> out`` layer of rank ``r``."""

    m: int
    inp: int
    out: int
    r: int
    sparsity: float
    dtype: torch.dtype

    @property
    def block(self) -> tuple[int, int]:
        return default_block(self.r)

    def columns(self) -> dict:
        return {
            "M": self.m,
            "in": self.inp,
            "out": self.out,
            "r": self.r,
            "block": "x".join(map(str, self.block)),
            "sparsity": self.sparsity,
            "dtype": dtype_name(self.dtype),
        }

    def __str__(self) -> str:
        return f"M={self.m} {self.inp}x{self.out} r={self.r} sparsity={self.sparsity} {dtype_name(self.dtype)}"


QUICK_SHAPE = Shape(128, 256, 384, 32, 0.9, torch.float32)


def centre(device_type: str, *, quick: bool = False) -> Shape:
    """The centre case of the star: r 32, sparsity 0.9, the device's main dtype."""
    if quick:
        return QUICK_SHAPE
    if device_type == "cuda":
        return Shape(8192, 4096, 14336, 32, 0.9, torch.bfloat16)
    return Shape(1024, 1024, 1024, 32, 0.9, torch.float32)


def grid(device_type: str, *, quick: bool = False, full: bool = False) -> list[Shape]:
    """The cases run on ``device_type`` (see the module's docstring)."""
    if quick:
        return [QUICK_SHAPE]
    gpu = device_type == "cuda"
    shapes = LLAMA3_8B_PROJECTIONS if gpu else [(i // 4, o // 4) for i, o in LLAMA3_8B_PROJECTIONS]
    # M 1 is one decoded token: the host's cost of a call (checks, dispatch, launches) dominates.
    tokens = (1, 1024, 4096, 8192) if gpu else (1, 256, 1024, 4096)
    dtypes = (torch.bfloat16,) if gpu else (torch.float32, torch.bfloat16)
    ranks, sparsities = (16, 32, 64), (0.0, 0.5, 0.9, 0.99)
    if full:
        return [
            Shape(m, i, o, r, s, d)
            for d in dtypes
            for i, o in shapes
            for m in tokens
            for r in ranks
            for s in sparsities
        ]
    mid = centre(device_type)
    star = [dataclasses.replace(mid, inp=i, out=o, sparsity=s) for i, o in shapes for s in (0.0, 0.9)]
    star += [dataclasses.replace(mid, sparsity=s) for s in sparsities]
    star += [dataclasses.replace(mid, r=r) for r in ranks]
    star += [dataclasses.replace(mid, m=m) for m in tokens]
    star += [dataclasses.replace(mid, dtype=d, sparsity=s) for d in dtypes[1:] for s in (0.0, 0.9)]
    return list(dict.fromkeys(star))


def make_case(shape: Shape, device: torch.device, seed: int = 0) -> dict:
    """Weights, B (dense and as kept blocks), x and dy of a case, deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    mask = random_block_mask(shape.out, shape.r, shape.block, shape.sparsity, g)
    b_dense = torch.randn(shape.out, shape.r, generator=g) * 0.01 * mask
    b_values, b_blocks = block_sparse.from_dense(b_dense, shape.block, mask)

    def put(t):
        return t.to(shape.dtype).to(device)

    return dict(
        shape=shape,
        weight=put(torch.randn(shape.out, shape.inp, generator=g) / shape.inp**0.5),
        bias=put(torch.zeros(shape.out)),
        seed=lori_kernels.layer_seed(seed, "bench"),
        mask=put(mask),
        b_values=put(b_values).requires_grad_(),
        b_blocks=b_blocks.to(device),
        b_dense=put(b_dense),
        x=put(torch.randn(shape.m, shape.inp, generator=g)).requires_grad_(),
        dy=put(torch.randn(shape.m, shape.out, generator=g)),
    )


def timing_row(env: dict, columns: dict, impl: str, ms: float, baseline: str, baseline_ms: float) -> dict:
    """One results row: environment, the case's columns, a time and its ratio to the baseline's."""
    return {
        **env,
        **columns,
        "impl": impl,
        "ms": round(ms, 4),
        "baseline": baseline,
        "baseline_ms": round(baseline_ms, 4),
        "ratio": round(ms / baseline_ms, 4),
    }


@dataclasses.dataclass
class Impl:
    """One way of running the layer of a case."""

    forward: Callable[[], torch.Tensor]
    b_grad: Callable[[], torch.Tensor | None]  # dB at the kept blocks [nnz, bo, br] after backward
    leaves: tuple[torch.Tensor, ...]  # what trains: their .grad is reset between runs
    held: tuple[torch.Tensor, ...]  # what the layer holds anyway: weights, parameters, index buffers


def lora_a(case: dict) -> torch.Tensor:
    """LoRI's A of the case, as PEFT's ``lora_A`` weight."""
    x = case["x"]
    return lori_kernels.generate_a(case["seed"], case["shape"].r, x.shape[1], dtype=x.dtype, device=x.device)


def lori_impl(case: dict, backend: str, dropout: float = 0.0) -> Impl:
    shape = case["shape"]

    def forward():
        return lori_kernels.lori_linear(
            case["x"],
            case["weight"],
            case["bias"],
            case["seed"],
            case["b_values"],
            case["b_blocks"],
            r=shape.r,
            block=shape.block,
            scaling=SCALING,
            dropout_p=dropout,
            dropout_seed=1,
            backend=backend,
        )

    return Impl(
        forward,
        lambda: case["b_values"].grad,
        (case["x"], case["b_values"]),
        (case["weight"], case["bias"], case["b_values"], case["b_blocks"]),
    )


def peft_impl(case: dict, *, train_a: bool, masked: bool, dropout: float = 0.0) -> Impl:
    """PEFT's own LoRA layer on the case's weights; ``masked``: B's gradient times the mask
    (the original LoRI code's LoRI-S). The adapter runs in the weights' dtype."""
    import peft

    shape, weight = case["shape"], case["weight"]
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(shape.inp, shape.out, dtype=weight.dtype, device=weight.device))
    config = peft.LoraConfig(r=shape.r, lora_alpha=SCALING * shape.r, target_modules=["proj"], lora_dropout=dropout)
    layer = peft.get_peft_model(base, config, autocast_adapter_dtype=False).base_model.model.proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        layer.base_layer.bias.copy_(case["bias"])
        a.copy_(lora_a(case))
        b.copy_(case["b_dense"])
    a.requires_grad_(train_a)
    if masked:
        b.register_hook(lambda g: g * case["mask"])
    return Impl(
        lambda: layer(case["x"]),
        lambda: block_sparse.gather_blocks(b.grad, case["b_blocks"], shape.block),
        (case["x"], a, b),
        tuple(layer.parameters()),
    )


def implementations(case: dict, backends: list[str], dropout: float = 0.0) -> dict[str, Impl]:
    """``base``, the PEFT baselines (when peft is installed) and ``lori_linear`` on each of
    ``backends``, all on the case's weights."""
    x, weight, bias = case["x"], case["weight"], case["bias"]
    impls = {"base": Impl(lambda: F.linear(x, weight, bias), lambda: None, (x,), (weight, bias))}
    try:
        import peft  # noqa: F401
    except ImportError:
        log.warning("peft is not installed: the peft_lora and lori_original baselines are left out")
    else:
        impls["peft_lora"] = peft_impl(case, train_a=True, masked=False, dropout=dropout)
        impls["lori_original"] = peft_impl(case, train_a=False, masked=True, dropout=dropout)
    for backend in backends:
        impls[backend] = lori_impl(case, backend, dropout)
    return impls


def _reset(impl: Impl) -> None:
    for t in impl.leaves:
        t.grad = None


def check_against_reference(case: dict, impls: dict[str, Impl]) -> None:
    """Every implementation's output, dx and dB equal the reference backend's (to the
    rounding of the case's dtype), or AssertionError."""

    def run(impl):
        _reset(impl)
        y = impl.forward()
        y.backward(case["dy"])
        return y.detach().float(), case["x"].grad.float(), impl.b_grad().float()

    want = run(impls["reference"])
    tol = 1e-4 if case["x"].dtype == torch.float32 else 2e-2
    for name, impl in impls.items():
        if name in ("base", "reference"):
            continue
        for what, got, ref in zip(("output", "dx", "dB"), run(impl), want, strict=True):
            err, scale = (got - ref).abs().max().item(), ref.abs().max().item() or 1.0
            assert err <= tol * scale, (
                f"{name} disagrees with the reference on {what} ({err:.3g} > {tol} x {scale:.3g})"
            )


def passes(impl: Impl, dy: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The timed closures of an implementation: fwd, bwd (over a retained graph), fwd+bwd."""
    y = impl.forward()

    def bwd():
        _reset(impl)
        y.backward(dy, retain_graph=True)

    def fwd_bwd():
        _reset(impl)
        impl.forward().backward(dy)

    return {"fwd": impl.forward, "bwd": bwd, "fwd+bwd": fwd_bwd}


def unfused_lora_path(case: dict):
    """The adapter alone, unfused as PEFT runs it: ``B(A(x))·s``, A frozen, B trained."""
    a, b = lora_a(case), case["b_dense"].clone().requires_grad_()
    x, dy = case["x"], case["dy"]

    def step():
        b.grad = x.grad = None
        F.linear(F.linear(x, a), b).mul(SCALING).backward(dy)

    return step


def lora_paths(case: dict, backends: list[str]) -> dict:
    """The adapter alone, forward + backward: unfused, and each backend's five kernels."""
    paths = {"unfused": unfused_lora_path(case)}
    return paths | {b: kernel_lora_path(case, b) for b in backends if b not in SAME_KERNELS_AS_TRITON}


def kernel_lora_path(case: dict, backend: str):
    """A backend's five kernels doing the adapter's forward + backward (``expand_`` into a
    preallocated ``y``, as the fused layer does into the base GEMM's result)."""
    shape = case["shape"]
    k = backend_kernels(backend)
    x, dy, bv, bb, r = case["x"].detach(), case["dy"], case["b_values"].detach(), case["b_blocks"], shape.r
    y = torch.zeros_like(dy)
    seed = lori_kernels.rng.to_int64(case["seed"])

    def step():
        h = k.shrink(x, seed, r, "uniform", 0.0, 0)
        k.expand_(y, h, bv, bb, SCALING)
        g = k.expand_backward(dy, bv, bb, r, SCALING)
        k.shrink_backward(g, seed, x.shape[1], "uniform", 0.0, 0)
        k.sddmm(dy, h, bb, *shape.block, SCALING)

    return step


def time_case(shape: Shape, device: torch.device, backends: list[str], env: dict, quick: bool = False) -> list[dict]:
    """Check, then time one case: ``layer`` rows (every implementation, every pass, as ratios
    to base in the same pass) and ``lora_path`` rows (ratios to the reference's kernels)."""
    case = make_case(shape, device)
    impls = implementations(case, backends)
    check_against_reference(case, impls)
    rows = []

    def add(part, pass_, name, ms, baseline, baseline_ms):
        columns = {**shape.columns(), "part": part, "pass": pass_}
        rows.append(timing_row(env, columns, name, ms, baseline, baseline_ms))

    timed = {(name, p): fn for name, impl in impls.items() for p, fn in passes(impl, case["dy"]).items()}
    timed |= {(name, "lora_path"): fn for name, fn in lora_paths(case, backends).items()}
    measured = median_ms_each(timed, device, quick)
    times = {name: {p: measured[(name, p)] for p in PASSES} for name in impls}
    for name, by_pass in times.items():
        for p, ms in by_pass.items():
            add("layer", p, name, ms, "base", times["base"][p])
    path_times = {name: ms for (name, p), ms in measured.items() if p == "lora_path"}
    for name, ms in path_times.items():
        add("lora_path", "fwd+bwd", name, ms, "reference", path_times["reference"])
    log.info(
        "%s  fwd+bwd x base: %s",
        shape,
        "  ".join(
            f"{n} {t['fwd+bwd']:.2f} ms ({t['fwd+bwd'] / times['base']['fwd+bwd']:.2f}x)" for n, t in times.items()
        ),
    )
    return rows


def generate_a_rows(device: torch.device, backends: list[str], env: dict, quick: bool) -> list[dict]:
    """Regenerating A (float32): the reference against each compiled backend of ``backends``."""
    compiled = [
        b
        for b in backends
        if b != "reference" and unavailable_reason(b, "generate_a", device.type) is None and not interpreted(b, device)
    ]
    if not compiled:
        log.info("generate_a: no compiled backend among those chosen runs on %s; table left out", device.type)
        return []
    rows = []
    for r, d_in in GENERATE_A_SHAPES[:2] if quick else GENERATE_A_SHAPES:

        def generate(backend):
            return lambda: lori_kernels.generate_a(GENERATE_A_SEED, r, d_in, device=device, backend=backend)

        want = generate("reference")()
        for backend in compiled:
            got = generate(backend)()
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), f"generate_a: {backend} != reference"
        times = median_ms_each({b: generate(b) for b in ["reference", *compiled]}, device, quick)
        columns = {"r": r, "d_in": d_in, "dtype": "float32"}
        rows += [timing_row(env, columns, b, ms, "reference", times["reference"]) for b, ms in times.items()]
        log.info("generate_a r=%d d_in=%d: %s", r, d_in, "  ".join(f"{b} {ms:.3f} ms" for b, ms in times.items()))
    return rows


def merge_rows(device: torch.device, backends: list[str], env: dict, quick: bool) -> list[dict]:
    """``ΔW`` for folding: PEFT's dense ``B @ A · s`` against ``delta_weight`` per backend."""
    from lori.layer import LoRILinear
    from lori.merge import delta_weight

    r, block = 32, default_block(32)
    rows = []
    for inp, out in QUICK_MERGE_SHAPES if quick else LLAMA3_8B_PROJECTIONS:
        for sparsity in (0.0, 0.9):
            g = torch.Generator().manual_seed(0)
            mask = random_block_mask(out, r, block, sparsity, g)
            base = torch.nn.utils.skip_init(torch.nn.Linear, inp, out, bias=False, device=device)
            layer = LoRILinear(
                base, r=r, alpha=2 * r, seed=1, block=block, b_blocks=block_sparse.blocks_from_mask(mask, block)
            )
            with torch.no_grad():
                layer.b_values.normal_(generator=g)
            a, b = layer.a(), layer.b_dense()
            want = layer.scaling * (b.double() @ a.double())

            def delta(backend):
                def run():
                    layer.backend = backend
                    return delta_weight(layer)

                return run

            fns = {"peft_merge": lambda a=a, b=b: (b @ a) * layer.scaling}
            for backend in backends:
                torch.testing.assert_close(delta(backend)().double(), want, rtol=1e-4, atol=1e-6)
                fns[backend] = delta(backend)
            times = median_ms_each(fns, device, quick)
            columns = {
                "in": inp,
                "out": out,
                "r": r,
                "block": "x".join(map(str, block)),
                "sparsity": sparsity,
                "dtype": "float32",
            }
            rows += [timing_row(env, columns, n, ms, "peft_merge", times["peft_merge"]) for n, ms in times.items()]
            summary = "  ".join(f"{n} {t:.1f} ms" for n, t in times.items())
            log.info("merge %dx%d sparsity %g: %s", inp, out, sparsity, summary)
    return rows


def run(
    device: torch.device,
    *,
    quick: bool = False,
    full: bool = False,
    backends: list[str] | None = None,
    progress: Callable[[list[dict]], None] | None = None,
) -> dict:
    """The kernel suite on ``device``: tables ``kernels``, ``generate_a`` and ``merge``.
    ``progress`` gets the ``kernels`` rows so far after every case (a long run that is
    stopped keeps what it measured)."""
    env = environment(device)
    rows = []
    for shape in grid(device.type, quick=quick, full=full):
        names = lori_backends(device, shape.dtype, backends)
        if "reference" not in names:
            names.append("reference")  # the twin every check and lora_path ratio needs
        rows += time_case(shape, device, names, env, quick)
        if progress is not None:
            progress(rows)
    ours = lori_backends(device, None, backends)
    return {
        "kernels": rows,
        "generate_a": generate_a_rows(device, ours, env, quick),
        "merge": merge_rows(
            device, [b for b in ours if not interpreted(b, device) and b not in SAME_KERNELS_AS_TRITON], env, quick
        ),
    }
