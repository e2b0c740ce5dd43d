"""``LoRILinear``: a frozen ``nn.Linear`` plus a LoRI adapter, one fused op per call, and
``NamedAdapter``: one more (frozen) adapter of the same layer, loaded beside it by name."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

import lori_kernels
from lori_kernels import block_sparse, rng

__all__ = [
    "LoRILinear",
    "NamedAdapter",
    "count_training_forward",
    "is_conv1d",
    "is_quantized",
    "linear_shape",
    "quantized_weight_shapes",
]


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's projections: a linear layer
    whose weight is stored transposed, ``[in, out]``)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of an ``nn.Linear`` (quantized ones included: a packed
    weight's shape is not the layer's) or a ``Conv1D``."""
    if is_conv1d(module):
        return tuple(module.weight.shape[::-1])
    return module.out_features, module.in_features


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module``'s weight is quantized: a tensor subclass that only the module's own
    forward multiplies (torchao's ``Int8Tensor``, ``IntxUnpackedToInt8Tensor``, ``NF4Tensor``;
    bitsandbytes' ``Params4bit``, ``Int8Params``). FSDP2's sharded ``DTensor`` is not."""
    weight = module.weight
    return type(weight) not in (torch.Tensor, nn.Parameter) and not isinstance(weight, DTensor)


def quantized_weight_shapes(model: nn.Module) -> dict[int, tuple[int, int]]:
    """``id(weight) -> (out, in)`` of every quantized linear layer's weight in ``model``: the
    shape it stands for, which a packed weight's own shape is not (bitsandbytes' 4-bit)."""
    return {id(m.weight): linear_shape(m) for m in model.modules() if isinstance(m, nn.Linear) and is_quantized(m)}


class LoRILinear(nn.Module):
    """``y = base_layer(x) + scaling * ((x * D) @ A.T) @ B.T``.

    ``base_layer`` stays frozen; A ``[r, in]`` is regenerated from the layer's 64-bit seed
    (buffer ``seed``, the uint64 in two's complement); B ``[out, r]`` exists only as its
    kept blocks: parameter ``b_values`` ``[nnz, bo, br]`` (zero at creation, as LoRA's B)
    at buffer ``b_blocks`` int32 ``[nnz, 2]``, fixed for the layer's life. Without
    ``b_blocks`` every block is kept (LoRI-D). ``b_values`` is float32 (the optimizer's
    master copy) and cast to the base weight's dtype in forward.

    The adapter's tensors live on ``device`` (default: the base weight's), e.g. real CPU
    adapters over a base built on the ``meta`` device, to save or size a checkpoint of a
    model too large to load.

    With ``a`` given, the layer keeps that A ``[r, in]`` as buffer ``stored_a`` instead of
    regenerating it (adapters imported from PEFT or the original LoRI code, merges of
    adapters with different seeds) and has no seed; ``lori_linear`` then takes the stored A
    (``a=``) in place of the seed.

    Dropout (training only) draws its mask from ``rng.dropout_seed(layer_seed, step,
    rank)``: the layer's seed, the process's rank (data-parallel ranks draw different
    masks) and ``step``, the count of training forwards in ``dropout_calls`` (an int64 CPU
    tensor, so that ``torch.compile`` compiles once for every step). A layer on its own
    counts its own forwards; in a model made by ``lori.get_lori_model`` (``inject_layers``)
    all layers share the model's count, kept by a forward pre-hook on the model itself, so
    that a forward recomputed during backward by activation checkpointing (which reruns
    decoder layers, never the model) reuses the count, hence the mask.

    ``load_state_dict`` checks what it would load into the layer (the seed, the kept
    blocks, shapes and dtypes) before anything of it is copied, and raises a ValueError
    naming the layer and the fault.

    ``base_layer`` is an ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2), whose weight is
    stored ``[in, out]``: the kernels take it as a transposed view (``base_weight``), never a
    copy. A quantized ``base_layer`` (``is_quantized``: torchao's weight-only int8 / int4 /
    NF4 tensors, bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``, as QLoRA) runs its own
    forward (and backward into ``x``), and the adapter runs beside it in ``x``'s dtype
    (``lori_linear`` without a weight); it cannot be folded into (``merge_adapter`` refuses).

    Several adapters (``lori.load_lori(..., adapter_name=...)``, as PEFT's ``load_adapter``):
    the layer's own adapter is named ``adapter_name`` ("default" unless loaded under another
    name); others are ``NamedAdapter`` modules in ``lori_adapters`` (a ``ModuleDict`` that
    exists once one is loaded). ``active_adapter`` names the one that runs
    (``lori.set_adapter``); ``mixed_batch``, set by ``lori.adapter_batch``, runs one adapter
    per batch row instead.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        *,
        r: int,
        alpha: float,
        seed: int,
        block: tuple[int, int] | None = None,
        dist: str = "uniform",
        dropout: float = 0.0,
        b_blocks: torch.Tensor | None = None,
        backend: str = "auto",
        a: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Linear) and not is_conv1d(base_layer):
            raise TypeError(f"LoRILinear wraps an nn.Linear or a Conv1D, got {type(base_layer).__name__}")
        block = block_sparse.check_block(block if block is not None else (32, min(r, 32)), r)
        if dist not in rng.DISTRIBUTIONS:
            raise ValueError(f"dist must be one of {rng.DISTRIBUTIONS}, got {dist!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base_layer = base_layer.requires_grad_(False)
        self.out_features, self.in_features = linear_shape(base_layer)
        self.transposed = is_conv1d(base_layer)  # the weight is stored [in, out]
        self.r, self.alpha, self.scaling = r, float(alpha), float(alpha) / r
        self.block, self.dist, self.dropout, self.backend = block, dist, float(dropout), backend
        device = torch.device(device) if device is not None else base_layer.weight.device
        if b_blocks is None:
            b_blocks = block_sparse.dense_blocks(self.out_features, r, block)
        b_blocks = b_blocks.to(device=device, dtype=torch.int32).contiguous()
        if not b_blocks.is_meta:  # on the meta device nothing is read: load_state_dict checks the real ones
            block_sparse.check_b_blocks(b_blocks, self.out_features, r, block)
        self.register_buffer("seed", torch.tensor(rng.to_int64(seed), dtype=torch.int64, device=device))
        self.register_buffer("b_blocks", b_blocks)
        self.b_values = nn.Parameter(torch.zeros(b_blocks.shape[0], *block, device=device))
        if a is not None:
            if not isinstance(a, torch.Tensor) or tuple(a.shape) != (r, self.in_features):
                got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
                raise ValueError(f"a stored A must be a tensor of shape {[r, self.in_features]} (r, in), got {got}")
            if not a.is_floating_point() or not torch.isfinite(a).all():
                raise ValueError("a stored A must be floating point and finite")
            a = a.detach().to(device=device, dtype=torch.float32).contiguous()
        self.register_buffer("stored_a", a)
        self.layer_seed = rng.to_uint64(seed)  # a host copy: no device sync per forward
        # A plain attribute, not a buffer: .to(device) and FSDP leave it on the CPU.
        self.dropout_calls = torch.zeros((), dtype=torch.int64, device="cpu")
        self._own_count = self.register_forward_pre_hook(count_training_forward)
        self.enabled = True
        self.fold = None  # while the adapter is folded into the base weight (lori.merge_adapter)
        self.adapter_name = self.active_adapter = "default"
        self.mixed_batch = None  # lori.serving's per-row adapters, inside lori.adapter_batch
        self.register_load_state_dict_pre_hook(_check_state_before_load)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.fold is not None:
            return self.base_layer(x)
        if self.mixed_batch is not None:
            return self.mixed_batch(self, x)
        adapter = self if self.active_adapter == self.adapter_name else self.lori_adapters[self.active_adapter]
        if adapter.b_values.shape[0] == 0:
            return self.base_layer(x)
        quantized = is_quantized(self.base_layer)
        weight = None if quantized else self.base_weight()
        dtype = x.dtype if quantized else weight.dtype
        p = self.dropout if self.training else 0.0
        dropout_seed = rng.dropout_seed_tensor(adapter.layer_seed, self.dropout_calls, _rank()) if p > 0 else 0
        stored = adapter.stored_a is not None
        y = lori_kernels.lori_linear(
            x.to(dtype),
            weight,
            None if quantized else self.base_layer.bias,
            None if stored else adapter.layer_seed,
            adapter.b_values.to(dtype),
            adapter.b_blocks,
            r=adapter.r,
            block=adapter.block,
            scaling=adapter.scaling,
            dist=adapter.dist,
            dropout_p=p,
            dropout_seed=dropout_seed,
            backend=self.backend,
            a=adapter.stored_a.to(dtype) if stored else None,
            out_features=self.out_features if quantized else None,
        )
        if quantized:  # the base layer's own forward
            y = self.base_layer(x) + y
        # Under autocast y stays in the autocast dtype, as nn.Linear's output does.
        return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)

    def base_weight(self) -> torch.Tensor:
        """The base weight as ``[out, in]``: a transposed view of a ``Conv1D``'s."""
        weight = self.base_layer.weight
        return weight.T if self.transposed else weight

    def named_adapters(self) -> dict[str, LoRILinear | NamedAdapter]:
        """Every adapter of this layer by name: its own first (the layer itself), then the
        ``NamedAdapter`` modules loaded beside it."""
        others = self._modules.get("lori_adapters")
        return {self.adapter_name: self, **(dict(others.items()) if others is not None else {})}

    def share_dropout_calls(self, calls: torch.Tensor) -> None:
        """Count training forwards in ``calls``, a model's count that a forward pre-hook on
        the model keeps (``count_training_forward``), instead of counting this layer's own."""
        self.dropout_calls = calls
        self._own_count.remove()

    def a(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """This layer's A ``[r, in]``: the stored one, or regenerated from its seed."""
        if self.stored_a is not None:
            return self.stored_a.to(dtype)
        return lori_kernels.generate_a(
            self.layer_seed, self.r, self.in_features, dist=self.dist, dtype=dtype, device=self.b_values.device
        )

    def full_b_values(self) -> torch.Tensor:
        """``b_values`` as one local tensor (detached), gathered if FSDP sharded it (a
        collective then: every rank calls it)."""
        values = self.b_values.detach()
        return values.full_tensor() if hasattr(values, "full_tensor") else values

    def b_dense(self) -> torch.Tensor:
        """This layer's B ``[out, r]`` (float32, zero outside the kept blocks)."""
        return block_sparse.scatter_blocks(self.full_b_values().float(), self.b_blocks, self.out_features, self.r)

    def mask(self) -> torch.Tensor:
        """Bool ``[out, r]``: the elements of B this layer keeps."""
        return block_sparse.mask_from_blocks(self.b_blocks, self.out_features, self.r, self.block)

    def extra_repr(self) -> str:
        kept = self.b_blocks.shape[0] / _n_blocks(self)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha:g}, block={self.block}, kept={kept:.1%}, dist={self.dist!r}, "
            f"dropout={self.dropout:g}, "
            + ("A stored" if self.stored_a is not None else f"seed={self.layer_seed:#018x}")
        )


class NamedAdapter(nn.Module):
    """One more adapter of a ``LoRILinear``, loaded beside the layer's own under a name
    (``lori.load_lori(..., adapter_name=...)``): the same fields as the layer's adapter
    (buffers ``seed``, ``b_blocks``, ``stored_a``; ``b_values``, a frozen parameter: extra
    adapters serve, they do not train) and its ``config`` (a ``LoRIConfig``, for
    ``save_lori``). Built from a checkpoint's checked tensors, copied."""

    def __init__(
        self,
        layer: LoRILinear,
        config,
        *,
        seed: torch.Tensor,
        b_values: torch.Tensor,
        b_blocks: torch.Tensor,
        stored_a: torch.Tensor | None = None,
    ):
        super().__init__()
        device = layer.b_values.device
        self.config = config
        self.in_features, self.out_features = layer.in_features, layer.out_features
        # As a layer installed from the same checkpoint computes them (lori.updates.install).
        self.r, self.alpha = config.r, float(config.scaling * config.r)
        self.scaling = self.alpha / self.r
        self.block, self.dist = tuple(config.block), config.dist
        self.register_buffer("seed", seed.detach().reshape(()).to(device, torch.int64, copy=True))
        self.register_buffer("b_blocks", b_blocks.detach().to(device, torch.int32, copy=True).contiguous())
        self.b_values = nn.Parameter(b_values.detach().to(device, torch.float32, copy=True), requires_grad=False)
        a = None if stored_a is None else stored_a.detach().to(device, torch.float32, copy=True).contiguous()
        self.register_buffer("stored_a", a)
        self.layer_seed = rng.to_uint64(self.seed)

    full_b_values = LoRILinear.full_b_values
    b_dense = LoRILinear.b_dense
    mask = LoRILinear.mask

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, block={self.block}, nnz={self.b_blocks.shape[0]}"


def count_training_forward(module: nn.Module, args) -> None:
    """A forward pre-hook: one more training forward of ``module`` in its
    ``dropout_calls``."""
    if module.training:
        module.dropout_calls.add_(1)


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _n_blocks(layer: LoRILinear) -> int:
    n_rows, n_cols = block_sparse.block_grid(layer.out_features, layer.r, layer.block)
    return n_rows * n_cols


_STATE = ("seed", "b_values", "b_blocks", "stored_a")  # what load_state_dict copies into a LoRILinear itself


def _check_state_before_load(
    module: LoRILinear, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    """A load_state_dict pre-hook: check this layer's entries of ``state_dict`` (those
    present: a partial dict loads with ``strict=False``) before any is copied, so that a
    bad state leaves the layer as it was; then set the host copy of the seed."""
    incoming = {name: state_dict[prefix + name] for name in _STATE if prefix + name in state_dict}
    try:
        _check_state(module, incoming)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot load the LoRI layer {prefix[:-1] or '(the root module)'}: {e}") from None
    seed = incoming.get("seed")
    if seed is not None and not seed.is_meta:
        module.layer_seed = rng.to_uint64(seed)


def _check_state(layer: LoRILinear, incoming: dict) -> None:
    """Check a layer's tensors to be loaded: their shapes and dtypes (only metadata of
    ``b_values``, which may be a DTensor: nothing is gathered), the seed (one int64) and the
    kept blocks (in range, sorted, unique: read once per load; not on the meta device)."""
    for name, value in incoming.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
        current = getattr(layer, name)
        if name != "seed" and current is not None and tuple(value.shape) != tuple(current.shape):
            raise ValueError(
                f"{name} has shape {list(value.shape)} but the layer's is {list(current.shape)} "
                "(its kept blocks, r and in_features are fixed for its life)"
            )
    if "seed" in incoming and rng.check_seed_tensor(incoming["seed"]).dim() > 1:
        raise ValueError(f"seed must have shape [] or [1], got {list(incoming['seed'].shape)}")
    stored_a = incoming.get("stored_a")
    if stored_a is not None and not stored_a.is_floating_point():
        raise TypeError(f"stored_a must be floating point, got {stored_a.dtype}")
    b_values, b_blocks = incoming.get("b_values", layer.b_values), incoming.get("b_blocks", layer.b_blocks)
    block_sparse.check_b_layout(_meta(b_values), _meta(b_blocks), layer.block)
    if "b_blocks" in incoming and not b_blocks.is_meta:
        block_sparse.check_b_blocks(b_blocks, layer.out_features, layer.r, layer.block)


def _meta(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor with ``t``'s (global) shape and dtype: for checks of metadata only."""
    return torch.empty(t.shape, dtype=t.dtype, device="meta")
