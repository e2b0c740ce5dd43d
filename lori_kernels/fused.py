"""The fused LoRI layer: ``FusedLayer`` composes one backend's kernels (``backends.LayerKernels``),
and ``LAYERS`` holds one per row of the backend table, registered as the ``torch.library``
custom ops ``lori_<backend>::forward`` and ``::backward`` with fake and autograd implementations:

    forward   y = x @ W.T + b           (torch matmul)
              h = (x * D) @ A.T          shrink
              y += s * h @ B.T           expand_, in place over the kept blocks
    backward  g = s * dy @ B             expand_backward
              dx = (g @ A) * D           shrink_backward
              dx += dy @ W               (torch addmm_: the GEMM adds into dx, written once)
              db_values = s * dy.T @ h   sddmm, kept blocks only

The backward GEMM takes the adapter's part of dx as its accumulator (cuBLAS reads it in its
epilogue, under the GEMM's compute), so dx is written once by a kernel and once by the GEMM,
not read back and written again after it. A kernel set may bring the GEMMs with the adapter inside
(``linear_expand``, ``linear_shrink_backward``: each replaces a torch GEMM and the kernel
beside it; ``linear_shrink`` replaces the forward GEMM and ``shrink`` where B is sparse enough,
``reads_x_once``). With a stored A (``a``) instead of a seed, the A side is plain torch
(``reference.shrink_a_ref`` and its backward), the B side the backend's kernels. Without a
weight (the adapter alone, beside a quantized base layer's own linear) ``y`` starts from zeros
and ``dx`` is the adapter's part alone.

Only ``h`` [M, r] is saved for backward (besides the frozen weight, B and a stored A: no
activations); A and the dropout mask D are regenerated from their seeds, so
``torch.compile(fullgraph=True)`` traces the layer and activation checkpointing recomputes it
exactly. The dropout seed reaches the ops as a one-element int64 tensor, read inside them: a
seed that changes every step (``LoRILinear``'s count of forwards) costs ``torch.compile`` no
guard and no recompilation. ``torch.compile`` traces the custom ops; eagerly the same
forward (``layer_forward``) and ``backward`` run under ``EagerLayer``, a plain
``torch.autograd.Function`` (no custom-op dispatch: about 0.3 ms less per layer on a CPU).
Differentiating the layer's backward raises ``DOUBLE_BACKWARD_ERROR``.
"""

import collections
import functools
import inspect
from collections.abc import Callable

import torch

from lori_kernels import backends, reference
from lori_kernels.backends import LayerKernels
from lori_kernels.block_sparse import check_b_blocks
from lori_kernels.checks import LayerSpec

DOUBLE_BACKWARD_ERROR = (
    "lori_linear does not support double backward (second-order gradients): its backward is not "
    "differentiable. Differentiate only once through LoRI layers (no create_graph=True through them)."
)
_RNG_SCHEMA = "int seed, float scaling, str dist, float dropout_p, Tensor dropout_seed"
_FORWARD_SCHEMA = (
    "(Tensor x, Tensor? weight, Tensor? bias, Tensor b_values, Tensor b_blocks, int seed, int r, int out_features, "
    "float scaling, str dist, float dropout_p, Tensor dropout_seed, Tensor? a=None) -> (Tensor, Tensor)"
)
_BACKWARD_SCHEMA = (
    f"(Tensor dy, Tensor h, Tensor? weight, Tensor b_values, Tensor b_blocks, int in_features, {_RNG_SCHEMA}, "
    "bool need_dx, bool need_db, Tensor? a=None) -> (Tensor, Tensor)"
)


def reads_x_once(in_features: int, out_features: int, nnz: int, bo: int) -> bool:
    """Whether a kernel set's ``linear_shrink`` then ``expand_`` moves fewer bytes than
    ``shrink`` then ``linear_expand``: y's kept block rows (at most ``nnz * bo`` of
    ``out_features``), read and written by ``expand_``, against x, read again by ``shrink``
    (``in_features`` per row). From shapes alone: no look at ``b_blocks``, no host sync."""
    return 2 * min(out_features, nnz * bo) < in_features


class FusedLayer:
    """The fused layer over one backend's kernels (``load_kernels()``, called on its first
    run), registered as ``<namespace>::forward`` and ``::backward``. Calling it runs the layer
    on validated arguments; ``checks_b_blocks``: read ``b_blocks`` (range, order, uniqueness)
    on every eager call."""

    def __init__(self, namespace: str, load_kernels: Callable[[], LayerKernels], checks_b_blocks: bool = False):
        self._load_kernels = load_kernels
        self.checks_b_blocks = checks_b_blocks
        op = functools.partial(torch.library.custom_op, mutates_args=())
        self.forward_op = op(f"{namespace}::forward", self.forward, schema=_FORWARD_SCHEMA)
        self.backward_op = op(f"{namespace}::backward", self.backward, schema=_BACKWARD_SCHEMA)
        self.forward_op.register_fake(_forward_fake)
        self.backward_op.register_fake(_backward_fake)
        self.forward_op.register_autograd(self._gradients_of_op, setup_context=_save_for_backward)
        self.backward_op.register_autograd(_refuse_double_backward)

    @functools.cached_property
    def kernels(self) -> LayerKernels:
        return self._load_kernels()

    def __call__(self, x, weight, bias, b_values, b_blocks, spec: LayerSpec, a=None) -> torch.Tensor:
        """``y`` [..., out] of ``x`` [..., in] (any leading dimensions): the ``forward`` op
        under ``torch.compile``; eagerly ``EagerLayer``, or ``layer_forward`` alone where
        nothing is differentiated (no autograd node: inference)."""
        compiling = torch.compiler.is_compiling()
        if self.checks_b_blocks and not compiling:
            check_b_blocks(b_blocks, spec.out_features, spec.r, spec.block)
        x2 = x.reshape(-1, spec.in_features).contiguous()
        args = (x2, weight, bias, b_values.contiguous(), b_blocks.contiguous(), spec.seed, spec.r, spec.out_features)
        if compiling:
            run = self.forward_op
        elif torch.is_grad_enabled() and (x.requires_grad or b_values.requires_grad):
            run = functools.partial(EagerLayer.apply, self)
        else:  # weight, bias and a stored A never require grad (checks.py)
            run = functools.partial(layer_forward, None, self)
        y, _ = run(*args, spec.scaling, spec.dist, spec.dropout_p, spec.dropout_seed, a)
        return y.reshape(*x.shape[:-1], spec.out_features)

    def forward(self, *inputs, **named):
        """``(y, h)``: ``layer_forward`` over this layer's kernels (the ``forward`` op's body)."""
        return layer_forward(None, self, *inputs, **named)

    def backward(
        self,
        dy,
        h,
        weight,
        b_values,
        b_blocks,
        in_features,
        seed,
        scaling,
        dist,
        dropout_p,
        dropout_seed,
        need_dx,
        need_db,
        a=None,
    ):
        """``(dx, db_values)``; an output that is not needed comes back empty."""
        kernels = self.kernels
        dx = db_values = dy.new_empty(0)
        if need_dx:
            dropout_seed = int(dropout_seed)
            g = kernels.expand_backward(dy, b_values, b_blocks, h.shape[1], scaling)
            if a is None and weight is not None and kernels.linear_shrink_backward is not None:
                dx = kernels.linear_shrink_backward(dy, weight, g, seed, dist, dropout_p, dropout_seed)
            else:
                if a is None:
                    dx = kernels.shrink_backward(g, seed, in_features, dist, dropout_p, dropout_seed)
                else:
                    dx = reference.shrink_a_backward_ref(g, a, dropout_p, dropout_seed)
                if weight is not None:
                    dx.addmm_(dy, weight)
        if need_db:
            db_values = kernels.sddmm(dy, h, b_blocks, b_values.shape[1], b_values.shape[2], scaling)
        return dx, db_values

    def _gradients_of_op(self, ctx, dy, _dh):
        return tuple(_gradients(ctx, dy, self.backward_op))


def layer_forward(
    ctx,
    layer,
    x,
    weight,
    bias,
    b_values,
    b_blocks,
    seed,
    r,
    out_features,
    scaling,
    dist,
    dropout_p,
    dropout_seed,
    a=None,
):
    """``(y, h)`` for a 2-D contiguous ``x`` [M, in] over ``layer.kernels``; without a
    ``weight``, the adapter's part alone (``y`` starts from zeros). ``ctx``: the eager
    autograd.Function's context, which it saves for backward into (``EagerLayer.forward`` is
    this function itself: no frame between them); None as the ``forward`` op's body, whose
    autograd registration saves."""
    kernels, mask_seed = layer.kernels, int(dropout_seed)
    sparse = reads_x_once(x.shape[1], out_features, *b_values.shape[:2])
    if a is None and weight is not None and kernels.linear_shrink is not None and sparse:
        y, h = kernels.linear_shrink(x, weight, bias, seed, r, dist, dropout_p, mask_seed)
        kernels.expand_(y, h, b_values, b_blocks, scaling)
    else:
        if a is None:
            h = kernels.shrink(x, seed, r, dist, dropout_p, mask_seed)
        else:
            h = reference.shrink_a_ref(x, a, dropout_p, mask_seed)
        if weight is not None and kernels.linear_expand is not None:
            y = kernels.linear_expand(x, weight, bias, h, b_values, b_blocks, scaling)
        else:
            y = x.new_zeros(x.shape[0], out_features) if weight is None else torch.nn.functional.linear(x, weight, bias)
            kernels.expand_(y, h, b_values, b_blocks, scaling)
    if ctx is not None:
        ctx.layer = layer
        inputs = (x, weight, bias, b_values, b_blocks, seed, r, out_features, scaling, dist, dropout_p, dropout_seed, a)
        _save_for_backward(ctx, inputs, (y, h))
    return y, h


# The ops' arguments by name (for the forward op: its inputs, and the gradients returned for them).
Inputs = collections.namedtuple("Inputs", list(inspect.signature(layer_forward).parameters)[2:], defaults=[None])
BackwardInputs = collections.namedtuple(
    "BackwardInputs", list(inspect.signature(FusedLayer.backward).parameters)[1:], defaults=[None]
)
_NO_GRADIENTS = Inputs(*[None] * len(Inputs._fields))


def _forward_fake(*args):
    i = Inputs(*args)
    return i.x.new_empty(i.x.shape[0], i.out_features), i.x.new_empty(i.x.shape[0], i.r)


def _backward_fake(*args):
    i = BackwardInputs(*args)
    dx = i.dy.new_empty(i.dy.shape[0], i.in_features) if i.need_dx else i.dy.new_empty(0)
    return dx, i.b_values.new_empty(i.b_values.shape) if i.need_db else i.dy.new_empty(0)


def _save_for_backward(ctx, inputs, output) -> None:
    """Keeps ``h`` (the only activation), the frozen weight, B, a stored A, in_features and the RNG's arguments."""
    args = Inputs(*inputs)
    ctx.save_for_backward(output[1], args.weight, args.b_values, args.b_blocks, args.a)
    ctx.backward_args = (args.x.shape[1], args.seed, args.scaling, args.dist, args.dropout_p, args.dropout_seed)


def _gradients(ctx, dy, run_backward) -> Inputs:
    """The gradients of the forward op's inputs: of ``x`` and ``b_values`` where needed."""
    h, weight, b_values, b_blocks, a = ctx.saved_tensors
    needs = Inputs(*ctx.needs_input_grad[-len(Inputs._fields) :])  # the eager Function's start with the layer's
    dx, db_values = run_backward(
        dy.contiguous(), h, weight, b_values, b_blocks, *ctx.backward_args, needs.x, needs.b_values, a
    )
    return _NO_GRADIENTS._replace(x=dx if needs.x else None, b_values=db_values if needs.b_values else None)


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(DOUBLE_BACKWARD_ERROR)


class EagerLayer(torch.autograd.Function):
    """A ``FusedLayer`` in eager mode: its forward (``layer_forward``) and ``backward`` under a
    plain autograd.Function (no custom-op dispatch); the first input is the layer itself, then
    every input of its ``forward`` op in order. ``forward`` takes ``ctx`` itself: with a
    ``setup_context`` instead, torch binds every call's arguments to the signature by
    ``inspect`` (about 80 µs a call)."""

    forward = staticmethod(layer_forward)

    @staticmethod
    def backward(ctx, dy, _dh):
        # Under create_graph=True (grad mode on) the backward op builds the graph of the
        # gradients, whose own backward refuses with DOUBLE_BACKWARD_ERROR.
        layer = ctx.layer
        return None, *_gradients(ctx, dy, layer.backward_op if torch.is_grad_enabled() else layer.backward)


LAYERS = {
    row.name: FusedLayer(f"lori_{row.name}", functools.partial(backends.kernels, row.name), row.checks_b_blocks)
    for row in backends.TABLE
}
