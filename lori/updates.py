"""Adapters outside a model: per adapted linear, one ``LayerUpdate`` (``ΔW = scaling·B·A``).

LoRI checkpoints and PEFT adapters are read into this one form; merging combines it;
``install`` turns it into ``LoRILinear``s inside a base model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lori.config import LoRIConfig
from lori.layer import LoRILinear, is_conv1d, linear_shape
from lori.model import check_no_adapter, inject_layers
from lori_kernels import block_sparse, generate_a

__all__ = ["LayerUpdate", "install"]


@dataclass(frozen=True)
class LayerUpdate:
    """One adapter of one ``nn.Linear`` ``[out, in]``: ``ΔW = scaling · B · A``.

    ``b`` is B as float32 ``[out, r]``, zero outside ``mask`` (bool ``[out, r]``, the
    elements that train); A ``[r, in]`` is regenerated from ``seed`` (with ``dist``) or,
    for adapters without a seed, the stored float32 ``a``. ``block`` is the block layout
    the layer gets: the blocks covering ``mask``.
    """

    b: torch.Tensor
    mask: torch.Tensor
    scaling: float
    in_features: int
    block: tuple[int, int]
    dist: str = "uniform"
    seed: int | None = None
    a: torch.Tensor | None = None

    def __post_init__(self):
        if (self.seed is None) == (self.a is None):
            raise ValueError("a LayerUpdate has either a seed or a stored A")

    @property
    def r(self) -> int:
        return self.b.shape[1]

    @property
    def out_features(self) -> int:
        return self.b.shape[0]

    def a_matrix(self) -> torch.Tensor:
        """A ``[r, in]`` in float32."""
        if self.a is not None:
            return self.a
        return generate_a(self.seed, self.r, self.in_features, dist=self.dist, device=self.b.device)


def install(
    model: nn.Module,
    config: LoRIConfig,
    updates: dict[str, LayerUpdate],
    *,
    backend: str = "auto",
    device: torch.device | str | None = None,
) -> nn.Module:
    """Put ``updates`` into a model without adapters, each as a ``LoRILinear`` on the
    linear of the same name (``config`` gives r, dropout and becomes the model's); every
    layer is checked against the model before the model changes. The adapters live on
    ``device`` (default: each base weight's; e.g. the CPU under a ``meta`` base)."""
    check_no_adapter(model)
    modules = dict(model.named_modules())
    targets = {}
    for name, u in updates.items():
        linear = modules.get(name)
        if not (isinstance(linear, nn.Linear) or is_conv1d(linear)):
            found = "nothing" if linear is None else type(linear).__name__
            raise ValueError(
                f"the adapter adapts {name}, but the model has {found} there (an nn.Linear or Conv1D is needed)"
            )
        if linear_shape(linear) != (u.out_features, u.in_features):
            raise ValueError(
                f"{name} is {list(linear_shape(linear))} in the model but [{u.out_features}, {u.in_features}] in the "
                "adapter"
            )
        if u.r != config.r:
            raise ValueError(f"{name} has rank {u.r}, the adapter's config says {config.r}")
        targets[name] = linear

    def make_layer(name: str, linear: nn.Linear) -> LoRILinear:
        u = updates[name]
        where = device if device is not None else linear.weight.device
        b_blocks = block_sparse.blocks_covering(u.mask.to(where), u.block)
        layer = LoRILinear(
            linear,
            r=u.r,
            alpha=u.scaling * u.r,
            seed=0 if u.seed is None else u.seed,
            block=u.block,
            dist=u.dist,
            dropout=config.dropout,
            b_blocks=b_blocks,
            backend=backend,
            a=u.a,
            device=where,
        )
        with torch.no_grad():
            layer.b_values.copy_(block_sparse.gather_blocks(u.b.to(where), b_blocks, u.block))
        return layer

    return inject_layers(model, config, targets, make_layer)
