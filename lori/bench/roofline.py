"""A roofline model of each backend's kernel plan: ``lori bench --suite roofline``.

No GPU has measured the layer yet, so this predicts it: for every kernel that a backend's
fused layer launches in forward and backward (``plan_of``: ``PLANS``, with ``SPARSE_FORWARD``
where B is sparse enough; checked against the code by ``tests/test_roofline.py``), the bytes
it moves through HBM, its tensor-core, CUDA-core and
integer (Philox) work and its launches; each kernel's time is the slowest of those at the
device's datasheet peak times an efficiency, plus a launch cost per launch; the layer's is the
sum over its plan, divided by the frozen base linear's forward + backward (cuBLAS ``x·Wᵀ + b``
and ``dy·W``) on the same model. A cuBLAS GEMM that accumulates onto a tensor (``addmm``: the
backward's ``dx += dy·W`` onto the adapter's part) reads it in its epilogue: counted in its
bytes, which a compute-bound GEMM hides. Every assumption is a named constant below.

Cases: Llama-3-8B and 70B projections, M 2k–32k tokens, r 16/32/64, block sparsity 0/0.9 (the
default block ``(32, min(r, 32))``, kept blocks spread at random), dropout 0/0.05, bf16.
Tables: ``roofline`` (one row per case and plan: predicted ratio and time on H100 SXM and
H200) and ``roofline_kernels`` (one row per kernel of a plan: bytes, work, launches, time and
what bounds it; at M 8192 of Llama-3-8B unless ``full``).

A kernel's resources are taken to overlap perfectly (the slowest bounds it, not their sum):
optimistic where a GEMM's epilogue regenerates A or a dropout mask after its main loop. Dropout
is assumed to leave the Triton GEMMs' tiles as they are (with dropout they choose among smaller
ones). The model is pure arithmetic (seconds for the whole grid): it says which data flow can reach the
≤ 1.05× target and under which GEMM efficiency, not what a GPU will measure; a GPU run of
``lori bench --suite kernels`` beside it (``benchmarks/gpu_session.sh roofline``) says how
far off it is.
"""

from __future__ import annotations

import dataclasses

from lori_kernels.fused import reads_x_once

from .common import LLAMA3_8B_PROJECTIONS, default_block, environment

RESULTS_LABEL = "model"  # results files are roofline_model.csv etc. (a prediction, of no machine here)

# Datasheet peaks (dense, no structured sparsity) and derived integer throughput.


@dataclasses.dataclass(frozen=True)
class Gpu:
    """A GPU's peaks: bf16 tensor-core FLOP/s, fp32 CUDA-core FLOP/s, 32-bit integer op/s (SMs
    × 64 INT32 lanes × boost clock: not a datasheet figure), HBM bytes/s, SM count."""

    name: str
    tensor_flops: float
    core_flops: float
    int_ops: float
    bandwidth: float
    sms: int


H100_SXM = Gpu("H100 SXM", 989.4e12, 66.9e12, 132 * 64 * 1.98e9, 3.35e12, 132)
H200 = Gpu("H200", 989.4e12, 66.9e12, 132 * 64 * 1.98e9, 4.8e12, 132)
GPUS = {"h100": H100_SXM, "h200": H200}

CUBLAS_GEMM_EFFICIENCY = 0.70
"""Fraction of the tensor-core peak that cuBLAS reaches on the base GEMMs (bf16, sides ≥ 1024):
~700 of 989 TFLOP/s is what large bf16 GEMMs measure on an H100 SXM."""

TRITON_GEMM_EFFICIENCY = 0.60
"""The same for Triton's tiled GEMMs (``triton_kernels/gemm.py``: wgmma with software
pipelining, but no TMA, no persistent scheduling, no warp specialisation): ~85% of cuBLAS.
The one assumption the verdict turns on: see ``break_even_gemm_efficiency``."""

BANDWIDTH_EFFICIENCY = 0.85
"""Fraction of the HBM peak that a streaming kernel reaches (reads and writes of whole tiles)."""

CUDA_CORE_EFFICIENCY = 0.25
"""Fraction of the fp32 peak of the extension's 32 × 32 shared-memory tiled kernels: each FMA
loads one shared-memory word, and shared memory serves 32 words per clock per SM against 128
FMA lanes."""

INTEGER_EFFICIENCY = 0.7
"""Fraction of the integer peak that Philox reaches (its multiplies are the slow part)."""

RNG_OPS_PER_ELEMENT = 16
"""Integer instructions per generated element of A or of a dropout mask: one Philox4x32-10
call serves 4 elements, 10 rounds of 2 wide multiplies (high and low words: 2 instructions
each) and 2 three-input xors, ~50 with the counter's bookkeeping; then ~3 turn a word into a
value."""

LAUNCH_COST_S = 3e-6
"""Seconds per kernel launch, the GPU-side gap between dependent kernels (launch latency, the
ramp and tail of a grid) with the CPU running ahead: 2-4 µs on an H100."""

TRITON_ROWS_PER_PROGRAM = 128
"""Rows of x (or dy) per program of the Triton kernels that regenerate A (``shrink``,
``shrink_backward``, the GEMMs): A is regenerated once per such program. 128 is the largest
of their autotuning tiles (the one the autotuner should pick at these sizes)."""

EXTENSION_TILE = 32
"""The tile of the extension's CUDA kernels (``kTile`` in csrc/cuda_common.cuh): A is
regenerated per 32-row tile, and ``shrink`` reads x once per 32 columns of r."""

# The torch reference regenerates A and dropout masks with int64 tensor ops (lori_kernels.rng):
# launches and bytes (inputs + outputs of every op) per element, counted by
# tests/test_roofline.py under a torch dispatch mode.
TORCH_RNG_A_LAUNCHES = 242
TORCH_RNG_A_BYTES_PER_ELEMENT = 1128
TORCH_RNG_MASK_LAUNCHES = 240
TORCH_RNG_MASK_BYTES_PER_ELEMENT = 1108

# What the fused layer launches (lori_kernels/fused.py composing a backend's LayerKernels, A from
# its seed: a stored A runs the A side in plain torch), in order: a LayerKernels field, or
# "linear" (torch's F.linear, cuBLAS), "matmul" (dy @ W) and "addmm" (dx += dy @ W, in place).
# Every backend's kernels come from one implementation family ("triton", "extension",
# "torch") whose costs are below. tests/test_roofline.py runs the fused layer of each backend
# with its kernels wrapped and checks this table against what is called, and counts the
# launches inside each kernel.
_UNFUSED = {
    "forward": ("shrink", "linear", "expand_"),
    "backward": ("expand_backward", "shrink_backward", "addmm", "sddmm"),
}
PLANS = {
    "triton": _UNFUSED,
    "triton_epilogue": {
        "forward": ("shrink", "linear_expand"),
        "backward": ("expand_backward", "linear_shrink_backward", "sddmm"),
    },
    "cuda_ext": _UNFUSED,
    "reference": _UNFUSED,
}
SPARSE_FORWARD = {"triton_epilogue": ("linear_shrink", "expand_")}
"""The forward of these backends where B is sparse enough (``lori_kernels.fused.reads_x_once``):
the GEMM computing ``h`` from the x tiles it reads, then y's kept block rows updated."""
FAMILIES = {"triton": "triton", "triton_epilogue": "triton", "cuda_ext": "extension", "reference": "torch"}
BASE_PLAN = {"forward": ("linear",), "backward": ("matmul",)}
TRITON_GEMMS = {"linear_expand", "linear_shrink_backward", "linear_shrink"}  # the frozen weight's GEMMs in Triton
NAMES = ("base", *PLANS)  # every modelled plan: the base linear's and each backend's

MODELS = {
    "Llama-3-8B": dict(zip(("q,o", "k,v", "gate,up", "down"), LLAMA3_8B_PROJECTIONS, strict=True)),
    "Llama-3-70B": {"q,o": (8192, 8192), "k,v": (8192, 1024), "gate,up": (8192, 28672), "down": (28672, 8192)},
}
TOKENS = (2048, 4096, 8192, 16384, 32768)
RANKS = (16, 32, 64)
SPARSITIES = (0.0, 0.9)
DROPOUTS = (0.0, 0.05)
CENTRE = dict(model="Llama-3-8B", m=8192, r=32, sparsity=0.9)  # the target case (every projection)
DECODER_LAYER = "decoder layer"  # rows summing a decoder layer's projections
PER_DECODER_LAYER = {"q,o": 2, "k,v": 2, "gate,up": 2, "down": 1}  # how many of each projection a layer has


@dataclasses.dataclass(frozen=True)
class Case:
    """One layer: M tokens through ``inp -> out``, rank r, block sparsity, dropout; elements of
    ``element_bytes`` (bf16: 2)."""

    m: int
    inp: int
    out: int
    r: int
    sparsity: float
    dropout: float = 0.0
    element_bytes: int = 2

    @property
    def block(self) -> tuple[int, int]:
        return default_block(self.r)

    @property
    def block_rows(self) -> int:
        return -(-self.out // self.block[0])

    @property
    def block_cols(self) -> int:
        return self.r // self.block[1]

    @property
    def nnz(self) -> int:
        """Kept blocks (as the benchmarks' random masks keep them: at least one)."""
        return max(1, round((1 - self.sparsity) * self.block_rows * self.block_cols))

    @property
    def touched_rows(self) -> float:
        """Rows of y (output features) with a kept block: a block row is touched unless all its
        blocks are dropped (kept blocks spread at random)."""
        return min(self.out, self.block[0] * self.block_rows * (1 - self.sparsity**self.block_cols))

    @property
    def r_pad(self) -> int:
        """r as the Triton kernels' tiles hold it (``tuning.tile``: a power of two ≥ 16)."""
        return max(16, 1 << (self.r - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Work:
    """One kernel's work: bytes through HBM, tensor-core FLOPs (at ``gemm``'s efficiency),
    CUDA-core FLOPs, integer ops (Philox), launches."""

    bytes: float = 0.0
    tensor_flops: float = 0.0
    core_flops: float = 0.0
    int_ops: float = 0.0
    launches: int = 1
    gemm: str = "dot"  # whose efficiency the tensor-core FLOPs run at: "cublas", "triton" (a GEMM), "dot"

    def limits(self, gpu: Gpu, triton_efficiency: float | None = None) -> dict[str, float]:
        """Seconds each resource alone would take (Triton GEMMs at ``triton_efficiency``, default
        ``TRITON_GEMM_EFFICIENCY``)."""
        # The narrow dots of the side kernels ("dot": r or a block wide) never bound them; they
        # run at the Triton GEMM efficiency assumed, whatever efficiency is asked of the GEMMs.
        if self.gemm == "cublas":
            efficiency = CUBLAS_GEMM_EFFICIENCY
        elif self.gemm == "triton" and triton_efficiency is not None:
            efficiency = triton_efficiency
        else:
            efficiency = TRITON_GEMM_EFFICIENCY
        return {
            "memory": self.bytes / (gpu.bandwidth * BANDWIDTH_EFFICIENCY),
            "tensor": self.tensor_flops / (gpu.tensor_flops * efficiency),
            "cuda_core": self.core_flops / (gpu.core_flops * CUDA_CORE_EFFICIENCY),
            "integer": self.int_ops / (gpu.int_ops * INTEGER_EFFICIENCY),
        }

    def seconds(self, gpu: Gpu, triton_efficiency: float | None = None) -> float:
        return max(self.limits(gpu, triton_efficiency).values()) + self.launches * LAUNCH_COST_S

    def bound(self, gpu: Gpu) -> str:
        """What limits the kernel: the slowest resource, or its launches if they cost more."""
        limits = self.limits(gpu)
        slowest = max(limits, key=limits.get)
        return "launch" if self.launches * LAUNCH_COST_S > limits[slowest] else slowest


def sddmm_splits(case: Case, sms: int) -> int:
    """Programs along M per kept block of the Triton and CUDA ``sddmm`` (fill the GPU twice,
    each reducing ≥ 256 rows); more than one adds torch's sum of the fp32 partials."""
    return max(1, min(-(-2 * sms // case.nnz), -(-case.m // 256)))


def _gemm(c: Case, rows: int, inner: int, cols: int, efficiency: str) -> Work:
    """``[rows, inner] @ [inner, cols]``, every operand read once."""
    e = c.element_bytes
    return Work(
        bytes=e * (rows * inner + inner * cols + rows * cols), tensor_flops=2 * rows * inner * cols, gemm=efficiency
    )


def _rng(elements: float) -> float:
    return RNG_OPS_PER_ELEMENT * elements


def _kept_blocks(c: Case) -> tuple[float, float]:
    """(bytes of dy's kept block columns, one read each; FLOPs of ``[M, bo] x [bo, br]`` per block)."""
    bo, br = c.block
    return c.element_bytes * c.nnz * bo * c.m, 2 * c.m * bo * br * c.nnz


def kernel_work(family: str, kernel: str, c: Case, gpu: Gpu) -> Work:
    """The work of ``kernel`` of implementation ``family`` on case ``c``. Small tensors (h, g,
    b_values, index) are counted once: L2 holds them between the programs that share them."""
    e, m, k, n, r = c.element_bytes, c.m, c.inp, c.out, c.r
    dropout = c.dropout > 0
    if kernel == "linear":
        gemm = _gemm(c, m, k, n, "cublas")
        return dataclasses.replace(gemm, bytes=gemm.bytes + e * n)  # and the bias
    if kernel == "matmul":
        return _gemm(c, m, n, k, "cublas")
    if kernel == "addmm":
        gemm = _gemm(c, m, n, k, "cublas")
        return dataclasses.replace(gemm, bytes=gemm.bytes + e * m * k)  # and dx read in the epilogue
    if family == "torch":
        return _torch_work(kernel, c)
    dy_kept, block_flops = _kept_blocks(c)
    y_touched = 2 * e * m * c.touched_rows  # read and write y's kept block rows
    small = e * (m * r + c.nnz * c.block[0] * c.block[1])  # h or g, and b_values
    if family == "extension":
        # CUDA cores; each 32-row tile regenerates A: shrink's (one program per 32 columns of r,
        # each reading its rows of x) A[32 columns, all of in], shrink_backward's A[r, 32 columns].
        row_tiles, r_tiles = -(-m // EXTENSION_TILE), -(-r // EXTENSION_TILE)
        shrink_programs_rows = row_tiles * r_tiles * EXTENSION_TILE
        works = {
            "shrink": Work(
                bytes=e * (m * k * r_tiles + m * r),
                core_flops=2 * m * k * r,
                int_ops=_rng(shrink_programs_rows * k * (1 + dropout)),
            ),
            "shrink_backward": Work(
                bytes=e * (m * k + m * r),
                core_flops=2 * m * k * r,
                int_ops=_rng(row_tiles * r * k + dropout * m * k),
            ),
            "expand_": Work(bytes=y_touched + small, core_flops=block_flops),
            "expand_backward": Work(bytes=dy_kept + small, core_flops=block_flops),
            # the kernel, then torch: partial.sum(0), .mul_(scaling), .to(dtype)
            "sddmm": Work(
                bytes=dy_kept + small + 3 * 4 * sddmm_splits(c, gpu.sms) * c.nnz * c.block[0] * c.block[1],
                core_flops=block_flops,
                launches=3 + (e != 4),
            ),
        }
        return works[kernel]
    # Triton: tensor-core dots; A regenerated once per program of TRITON_ROWS_PER_PROGRAM rows.
    programs = -(-m // TRITON_ROWS_PER_PROGRAM)
    a_regenerated = programs * c.r_pad * k
    splits = sddmm_splits(c, gpu.sms)
    sddmm_launches = 1 + (splits > 1)  # + the sum of the fp32 partials
    sddmm_bytes = dy_kept + small + (splits > 1) * 2 * 4 * splits * c.nnz * c.block[0] * c.block[1]
    works = {
        "shrink": Work(
            bytes=e * (m * k + m * r), tensor_flops=2 * m * k * c.r_pad, int_ops=_rng(a_regenerated + dropout * m * k)
        ),
        "shrink_backward": Work(
            bytes=e * (m * k + m * r),
            tensor_flops=2 * m * k * c.r_pad,
            int_ops=_rng(a_regenerated + dropout * m * k),
        ),
        "expand_": Work(bytes=y_touched + small, tensor_flops=block_flops),
        "expand_backward": Work(bytes=dy_kept + small, tensor_flops=block_flops),
        "sddmm": Work(bytes=sddmm_bytes, tensor_flops=block_flops, launches=sddmm_launches),
        # the epilogue's dot runs over all of r for every output tile (dropped blocks as zeros)
        "linear_expand": Work(
            bytes=_gemm(c, m, k, n, "triton").bytes + e * n + small,
            tensor_flops=2 * m * n * (k + c.r_pad),
            gemm="triton",
        ),
        "linear_shrink_backward": Work(
            bytes=_gemm(c, m, n, k, "triton").bytes + e * m * r,
            tensor_flops=2 * m * k * (n + c.r_pad),
            int_ops=_rng(a_regenerated + dropout * m * k),
            gemm="triton",
        ),
        # the first column of output tiles accumulates h: x read once, A and D regenerated there
        "linear_shrink": Work(
            bytes=_gemm(c, m, k, n, "triton").bytes + e * (n + m * r),
            tensor_flops=2 * m * k * (n + c.r_pad),
            int_ops=_rng(a_regenerated + dropout * m * k),
            gemm="triton",
        ),
    }
    return works[kernel]


def _torch_work(kernel: str, c: Case) -> Work:
    """The reference's kernels: torch ops, each a launch reading its inputs and writing its output."""
    e, m, k, n, r = c.element_bytes, c.m, c.inp, c.out, c.r
    bo, br = c.block
    b_dense = e * c.block_rows * bo * r  # the dense B that expand and its backward scatter into
    # scatter_blocks: zeros, 2 index casts, index_put (tiles in and out, values, indices)
    scatter = Work(bytes=b_dense * 3 + e * c.nnz * bo * br + 3 * 8 * c.nnz, launches=4)
    a = Work(
        bytes=TORCH_RNG_A_BYTES_PER_ELEMENT * r * k + (4 + e) * r * k, launches=TORCH_RNG_A_LAUNCHES + 1
    )  # A in float32, then in x's dtype
    mask = Work(
        bytes=TORCH_RNG_MASK_BYTES_PER_ELEMENT * m * k + (1 + e) * m * k + 2 * e * m * k + 3 * e * m * k,
        launches=TORCH_RNG_MASK_LAUNCHES + 3,
    )  # keep mask, .to(dtype), * 1/(1-p), x * D (or (g @ A) * D)
    parts = {
        "shrink": [a, _gemm(c, m, k, r, "cublas")] + [mask] * (c.dropout > 0),
        "shrink_backward": [a, _gemm(c, m, r, k, "cublas")] + [mask] * (c.dropout > 0),
        "expand_": [scatter, _gemm(c, m, r, n, "cublas"), Work(bytes=2 * e * m * n), Work(bytes=3 * e * m * n)],
        "expand_backward": [scatter, _gemm(c, m, n, r, "cublas"), Work(bytes=2 * e * m * r)],
        # dy.T @ h dense, * scaling, gather_blocks (2 index casts, index)
        "sddmm": [
            _gemm(c, n, m, r, "cublas"),
            Work(bytes=2 * e * n * r),
            Work(bytes=b_dense + e * c.nnz * bo * br + 3 * 8 * c.nnz, launches=3),
        ],
    }[kernel]
    return Work(
        bytes=sum(p.bytes for p in parts),
        tensor_flops=sum(p.tensor_flops for p in parts),
        launches=sum(p.launches for p in parts),
        gemm="cublas",
    )


def plan_kernels(plan: dict, family: str, c: Case, gpu: Gpu) -> list[tuple[str, str, Work]]:
    """(pass, kernel, work) of every kernel of ``plan``, forward then backward."""
    return [(p, kernel, kernel_work(family, kernel, c, gpu)) for p in ("forward", "backward") for kernel in plan[p]]


def plan_seconds(plan: dict, family: str, c: Case, gpu: Gpu, triton_efficiency: float | None = None) -> float:
    return sum(work.seconds(gpu, triton_efficiency) for _, _, work in plan_kernels(plan, family, c, gpu))


def plan_of(name: str, c: Case) -> tuple[dict, str]:
    """(kernels per pass, family) of plan ``name`` (``NAMES``) on case ``c``: the fused layer's
    choice of forward by B's density included."""
    if name == "base":
        return BASE_PLAN, "triton"
    kernels = PLANS[name]
    if name in SPARSE_FORWARD and reads_x_once(c.inp, c.out, c.nnz, c.block[0]):
        kernels = {**kernels, "forward": SPARSE_FORWARD[name]}
    return kernels, FAMILIES[name]


def seconds(name: str, model: str, projection: str, c: Case, gpu: Gpu, triton_efficiency: float | None = None) -> float:
    """Predicted forward + backward seconds of plan ``name`` on case ``c`` at ``projection`` of
    ``model`` (``c``'s own in and out), or over a whole decoder layer (``DECODER_LAYER``: q, k,
    v, o, gate, up, down)."""
    if projection != DECODER_LAYER:
        return plan_seconds(*plan_of(name, c), c, gpu, triton_efficiency)
    return sum(
        PER_DECODER_LAYER[p] * plan_seconds(*plan_of(name, case), case, gpu, triton_efficiency)
        for p, case in at_projections(model, c).items()
    )


def ratio(
    name: str, c: Case, gpu: Gpu, *, model: str = "", projection: str = "", triton_efficiency: float | None = None
) -> float:
    """Predicted forward + backward time of plan ``name`` over the base linear's."""
    return seconds(name, model, projection, c, gpu, triton_efficiency) / seconds(
        "base", model, projection, c, gpu, triton_efficiency
    )


def fastest(c: Case, gpu: Gpu, candidates: tuple[str, ...] = tuple(PLANS), **where) -> str:
    """The backend among ``candidates`` that the model predicts fastest on ``c`` (``where``:
    ``model`` and ``projection``, as ``ratio`` takes them)."""
    return min(candidates, key=lambda name: ratio(name, c, gpu, **where))


def runs_triton_gemms(name: str) -> bool:
    """Whether plan ``name`` runs the frozen weight's GEMMs in Triton."""
    if name == "base":
        return False
    kernels = {*PLANS[name]["forward"], *PLANS[name]["backward"], *SPARSE_FORWARD.get(name, ())}
    return FAMILIES[name] == "triton" and bool(TRITON_GEMMS & kernels)


def break_even_gemm_efficiency(name: str, c: Case, gpu: Gpu, target: float = 1.05, **where) -> float | None:
    """The Triton GEMM efficiency (to 0.001) at which plan ``name`` reaches ``target`` on ``c``
    (``where`` as ``ratio`` takes it); None if the plan runs no Triton GEMM, or misses the
    target even at 1.0."""
    if not runs_triton_gemms(name) or ratio(name, c, gpu, triton_efficiency=1.0, **where) > target:
        return None
    low, high = 0.0, 1.0
    while high - low > 1e-3:
        middle = (low + high) / 2
        low, high = (
            (low, middle) if ratio(name, c, gpu, triton_efficiency=middle, **where) <= target else (middle, high)
        )
    return high


def cases(*, quick: bool = False) -> list[tuple[str, Case]]:
    """(model, case) of every setting of M, r, sparsity and dropout, at each model's first
    projection (``at_projections`` gives the others); quick: the centre's."""
    out = []
    for model, projections in MODELS.items():
        inp, outf = next(iter(projections.values()))
        for m in TOKENS:
            for r in RANKS:
                for s in SPARSITIES:
                    for p in DROPOUTS:
                        if not quick or (model, m, r, s) == tuple(CENTRE.values()):
                            out.append((model, Case(m, inp, outf, r, s, p)))
    return out


def at_projections(model: str, c: Case) -> dict[str, Case]:
    """``c`` at each projection of ``model``."""
    return {name: dataclasses.replace(c, inp=i, out=o) for name, (i, o) in MODELS[model].items()}


def _columns(model: str, projection: str, c: Case) -> dict:
    return {
        "model": model,
        "projection": projection,
        "in": c.inp if projection != DECODER_LAYER else "-",
        "out": c.out if projection != DECODER_LAYER else "-",
        "M": c.m,
        "r": c.r,
        "block": "x".join(map(str, c.block)),
        "sparsity": c.sparsity,
        "dropout": c.dropout,
        "dtype": "bfloat16",
    }


def run(device=None, *, quick: bool = False, full: bool = False, backends: list[str] | None = None) -> dict:
    """Tables ``roofline``, ``roofline_kernels`` and ``roofline_assumptions`` (``device`` is not
    used: the model predicts H100 SXM and H200 on any machine; ``backends``: the plans to model,
    default every backend's)."""
    env = environment(device)
    stamp = {"commit": env["commit"], "date": env["date"]}
    names = [name for name in NAMES if name == "base" or backends is None or name in backends]
    layer_rows, kernel_rows = [], []
    for model, setting in cases(quick=quick):
        for projection, c in {**at_projections(model, setting), DECODER_LAYER: setting}.items():
            for name in names:
                row = {**_columns(model, projection, c), "plan": name, "launches": "-", "MB": "-", "GFLOP": "-"}
                if projection != DECODER_LAYER:
                    kernels = plan_kernels(*plan_of(name, c), c, H100_SXM)
                    row["launches"] = sum(w.launches for _, _, w in kernels)
                    row["MB"] = round(sum(w.bytes for _, _, w in kernels) / 1e6, 2)
                    row["GFLOP"] = round(sum(w.tensor_flops + w.core_flops for _, _, w in kernels) / 1e9, 2)
                    if full or (model, c.m) == (CENTRE["model"], CENTRE["m"]):
                        kernel_rows += _kernel_rows(model, projection, c, name, kernels, stamp)
                for key, gpu in GPUS.items():
                    row[f"{key}_us"] = round(seconds(name, model, projection, c, gpu) * 1e6, 1)
                    row[f"{key}_ratio"] = round(ratio(name, c, gpu, model=model, projection=projection), 4)
                    row[f"{key}_break_even"] = row[f"{key}_ratio_cublas_gemm"] = "-"
                    if runs_triton_gemms(name):  # the efficiency its GEMMs need, and its ratio at cuBLAS's
                        even = break_even_gemm_efficiency(name, c, gpu, model=model, projection=projection)
                        row[f"{key}_break_even"] = "> 1" if even is None else round(even, 3)
                        at_cublas = ratio(
                            name, c, gpu, model=model, projection=projection, triton_efficiency=CUBLAS_GEMM_EFFICIENCY
                        )
                        row[f"{key}_ratio_cublas_gemm"] = round(at_cublas, 4)
                layer_rows.append({**row, **stamp})
    constants = [{"name": name, "value": value, **stamp} for name, value in assumptions().items()]
    return {"roofline": layer_rows, "roofline_kernels": kernel_rows, "roofline_assumptions": constants}


def _kernel_rows(model: str, projection: str, c: Case, name: str, kernels, stamp: dict) -> list[dict]:
    rows = []
    for p, kernel, work in kernels:
        line = {**_columns(model, projection, c), "plan": name, "pass": p, "kernel": kernel, "launches": work.launches}
        line["MB"] = round(work.bytes / 1e6, 3)
        line["tensor_GFLOP"] = round(work.tensor_flops / 1e9, 3)
        line["core_GFLOP"] = round(work.core_flops / 1e9, 3)
        line["int_Gops"] = round(work.int_ops / 1e9, 3)
        for key, gpu in GPUS.items():
            line[f"{key}_us"] = round(work.seconds(gpu) * 1e6, 2)
            line[f"{key}_bound"] = work.bound(gpu)
        rows.append({**line, **stamp})
    return rows


def assumptions() -> dict:
    """The model's constants by name (the GPUs' peaks as ``<gpu>_<peak>``)."""
    peaks = {
        f"{key}_{field}": getattr(gpu, field)
        for key, gpu in GPUS.items()
        for field in ("tensor_flops", "core_flops", "int_ops", "bandwidth")
    }
    names = (
        "CUBLAS_GEMM_EFFICIENCY",
        "TRITON_GEMM_EFFICIENCY",
        "BANDWIDTH_EFFICIENCY",
        "CUDA_CORE_EFFICIENCY",
        "INTEGER_EFFICIENCY",
        "RNG_OPS_PER_ELEMENT",
        "LAUNCH_COST_S",
        "TRITON_ROWS_PER_PROGRAM",
        "EXTENSION_TILE",
    )
    return {**peaks, **{name: globals()[name] for name in names}}


def compare(measured: list[dict]) -> list[dict]:
    """The model beside a GPU run of the kernels suite (its ``kernels_cuda.csv`` rows): per
    measured layer case and backend (fwd+bwd, bf16), the measured ratio to the base linear and
    the predicted one on the GPU it ran on (an H200 if its name says so, else an H100 SXM)."""
    rows = []
    for r in measured:
        if (r["part"], r["pass"], r["dtype"]) != ("layer", "fwd+bwd", "bfloat16") or r["impl"] not in PLANS:
            continue
        gpu = H200 if "H200" in r["device"] else H100_SXM
        c = Case(r["M"], r["in"], r["out"], r["r"], r["sparsity"])
        predicted = ratio(r["impl"], c, gpu)
        rows.append(
            {
                "device": r["device"],
                "in": r["in"],
                "out": r["out"],
                "M": r["M"],
                "r": r["r"],
                "sparsity": r["sparsity"],
                "backend": r["impl"],
                "measured_ratio": r["ratio"],
                "predicted_ratio": round(predicted, 4),
                "measured_over_predicted": round(r["ratio"] / predicted, 3),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m lori.bench.roofline DIR``: the model beside the kernels suite's GPU results in
    DIR (``kernels_cuda.csv``), as a markdown table and ``roofline_vs_measured_cuda.csv``."""
    import argparse
    from pathlib import Path

    from .common import read_csv, write_csv

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="directory holding kernels_cuda.csv")
    args = parser.parse_args(argv)
    path = args.results / "kernels_cuda.csv"
    if not path.is_file():
        parser.error(f"{path} not found: run lori bench --suite kernels on a GPU first")
    rows = compare(read_csv(path))
    if not rows:
        parser.error(f"{path} has no bfloat16 fwd+bwd layer rows of a modelled backend")
    write_csv("roofline_vs_measured_cuda", rows, args.results)
    header = list(rows[0])
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    print("\n".join("| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
