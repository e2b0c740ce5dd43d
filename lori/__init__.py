"""LoRI training library: configuration, the demo and command line (LoRILinear, masks,
training, checkpoints and merging are built on ``lori_kernels.lori_linear``)."""

from lori.config import DEFAULT_TARGET_MODULES, LoRIConfig

__all__ = ["DEFAULT_TARGET_MODULES", "LoRIConfig"]
