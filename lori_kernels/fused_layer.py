"""The fused LoRI layer composed from five kernels, registered as ``torch.library`` custom
ops with fake (meta) and autograd implementations, once per kernel set (Triton, Triton
with its own GEMMs, and the compiled C++/CUDA extension):

    forward   y = x @ W.T + b           (torch matmul)
              h = (x * D) @ A.T          shrink
              y += s * h @ B.T           expand_, in place over the kept blocks
    backward  g = s * dy @ B             expand_backward
              dx = dy @ W                (torch matmul)
              dx += (g @ A) * D          shrink_backward_, in place
              db_values = s * dy.T @ h   sddmm, kept blocks only

A kernel set may also bring the two GEMMs with the adapter in their epilogues
(``linear_expand``, ``linear_shrink_backward``), which then replace each torch matmul and
the in-place kernel after it.

Only ``h`` [M, r] is saved for backward (besides the frozen weight and B, which are no
activations); A and the dropout mask D are regenerated from their seeds, so
``torch.compile(fullgraph=True)`` traces the layer and activation checkpointing
recomputes it exactly. The dropout seed reaches the ops as a one-element int64 tensor,
read inside them: a seed that changes every step (``LoRILinear``'s count of forwards)
costs ``torch.compile`` no guard and no recompilation.

The layer has no second-order gradients: differentiating its backward raises
``DOUBLE_BACKWARD_ERROR``.
"""

from collections.abc import Callable
from typing import NamedTuple, Optional

import torch

from lori_kernels import rng
from lori_kernels.layer_spec import LayerSpec

__all__ = ["DOUBLE_BACKWARD_ERROR", "LayerKernels", "register_fused_layer"]

DOUBLE_BACKWARD_ERROR = (
    "lori_linear does not support double backward (second-order gradients): its backward is not "
    "differentiable. Differentiate only once through LoRI layers (no create_graph=True through them)."
)


class LayerKernels(NamedTuple):
    """The kernels of a backend. Tensors are contiguous; seeds are int64 (the uint64
    seed in two's complement); B is ``b_values`` [nnz, bo, br] at sorted ``b_blocks``."""

    shrink: Callable  # (x, seed, r, dist, dropout_p, dropout_seed) -> h [M, r]
    shrink_backward_: Callable  # (dx, g, seed, dist, dropout_p, dropout_seed) -> None
    expand_: Callable  # (y, h, b_values, b_blocks, scaling) -> None
    expand_backward: Callable  # (dy, b_values, b_blocks, r, scaling) -> g [M, r]
    sddmm: Callable  # (dy, h, b_blocks, bo, br, scaling) -> db_values [nnz, bo, br]
    # Optional GEMMs with the adapter in the epilogue (None: torch matmul, then expand_ /
    # shrink_backward_ in place).
    linear_expand: Callable | None = None  # (x, weight, bias, h, b_values, b_blocks, scaling) -> y
    linear_shrink_backward: Callable | None = None  # (dy, weight, g, seed, dist, dropout_p, dropout_seed) -> dx


def register_fused_layer(namespace: str, kernels: LayerKernels) -> Callable:
    """Register ``<namespace>::forward`` and ``<namespace>::backward`` over ``kernels`` and
    return the backend function ``(x, weight, bias, b_values, b_blocks, spec) -> y``.

    The custom ops are what ``torch.compile`` traces; in eager mode the same two functions
    run under a plain ``torch.autograd.Function``, which skips the custom ops' dispatch
    (about a millisecond per layer forward + backward on a CPU, all of it at small shapes).
    """

    def forward_impl(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],  # noqa: UP045 (torch.library's schema inference reads typing.Optional)
        b_values: torch.Tensor,
        b_blocks: torch.Tensor,
        seed: int,
        r: int,
        scaling: float,
        dist: str,
        dropout_p: float,
        dropout_seed: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = kernels.shrink(x, seed, r, dist, dropout_p, int(dropout_seed))
        if kernels.linear_expand is not None:
            return kernels.linear_expand(x, weight, bias, h, b_values, b_blocks, scaling), h
        y = torch.nn.functional.linear(x, weight, bias)
        kernels.expand_(y, h, b_values, b_blocks, scaling)
        return y, h

    def backward_impl(
        dy: torch.Tensor,
        h: torch.Tensor,
        weight: torch.Tensor,
        b_values: torch.Tensor,
        b_blocks: torch.Tensor,
        seed: int,
        scaling: float,
        dist: str,
        dropout_p: float,
        dropout_seed: torch.Tensor,
        need_dx: bool,
        need_db: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dx, db_values)``; an output that is not needed comes back empty."""
        dx = db_values = dy.new_empty(0)
        if need_dx:
            dropout_seed = int(dropout_seed)
            g = kernels.expand_backward(dy, b_values, b_blocks, h.shape[1], scaling)
            if kernels.linear_shrink_backward is not None:
                dx = kernels.linear_shrink_backward(dy, weight, g, seed, dist, dropout_p, dropout_seed)
            else:
                dx = dy @ weight
                kernels.shrink_backward_(dx, g, seed, dist, dropout_p, dropout_seed)
        if need_db:
            db_values = kernels.sddmm(dy, h, b_blocks, b_values.shape[1], b_values.shape[2], scaling)
        return dx, db_values

    forward = torch.library.custom_op(f"{namespace}::forward", forward_impl, mutates_args=())
    backward = torch.library.custom_op(f"{namespace}::backward", backward_impl, mutates_args=())

    @forward.register_fake
    def _(x, weight, bias, b_values, b_blocks, seed, r, scaling, dist, dropout_p, dropout_seed):
        return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], r)

    @backward.register_fake
    def _(dy, h, weight, b_values, b_blocks, seed, scaling, dist, dropout_p, dropout_seed, need_dx, need_db):
        dx = dy.new_empty(dy.shape[0], weight.shape[1]) if need_dx else dy.new_empty(0)
        return dx, b_values.new_empty(b_values.shape) if need_db else dy.new_empty(0)

    def save_context(ctx, inputs, output):
        _, weight, _, b_values, b_blocks, seed, _, scaling, dist, dropout_p, dropout_seed = inputs
        ctx.save_for_backward(output[1], weight, b_values, b_blocks)
        ctx.rng_args = (seed, scaling, dist, dropout_p, dropout_seed)

    def gradients(ctx, dy, run_backward):
        h, weight, b_values, b_blocks = ctx.saved_tensors
        need_dx, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        dx, db_values = run_backward(dy.contiguous(), h, weight, b_values, b_blocks, *ctx.rng_args, need_dx, need_db)
        return (dx if need_dx else None), None, None, (db_values if need_db else None), *([None] * 7)

    forward.register_autograd(lambda ctx, dy, _dh: gradients(ctx, dy, backward), setup_context=save_context)
    backward.register_autograd(_refuse_double_backward)

    class EagerLayer(torch.autograd.Function):
        @staticmethod
        def forward(*inputs):
            return forward_impl(*inputs)

        setup_context = staticmethod(save_context)

        @staticmethod
        def backward(ctx, dy, _dh):
            # Under create_graph=True (grad mode on) the backward op builds the graph of the
            # gradients, whose own backward refuses with DOUBLE_BACKWARD_ERROR.
            return gradients(ctx, dy, backward if torch.is_grad_enabled() else backward_impl)

    def lori_linear_fused(x, weight, bias, b_values, b_blocks, spec: LayerSpec) -> torch.Tensor:
        run = forward if torch.compiler.is_compiling() else EagerLayer.apply
        dropout_seed = spec.dropout_seed
        if not isinstance(dropout_seed, torch.Tensor):
            dropout_seed = torch.tensor(rng.to_int64(dropout_seed), dtype=torch.int64, device="cpu")
        y, _ = run(
            x.reshape(-1, spec.in_features).contiguous(),
            weight,
            bias,
            b_values.contiguous(),
            b_blocks.contiguous(),
            rng.to_int64(spec.seed),
            spec.r,
            spec.scaling,
            spec.dist,
            spec.dropout_p,
            dropout_seed,
        )
        return y.reshape(*x.shape[:-1], spec.out_features)

    return lori_linear_fused


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_ERROR)
