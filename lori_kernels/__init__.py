"""LoRI kernels: the fused LoRI layer (frozen W, seeded A, block-sparse B) and its parts.

Public API: the operators ``lori_linear``, ``lori_linear_multi`` (many adapters in one
batch: ``AdapterSpec``, ``pack_adapters``), ``generate_a`` and ``delta_weight`` (in
``lori_kernels.ops``), ``available_backends``, ``layer_seed``, the LoRI-RNG
``lori_kernels.rng`` and the compact-B helpers in ``lori_kernels.block_sparse``; a backend's
kernels are ``lori_kernels.backends.kernels(name)`` (for benchmarks and kernel tests).
Nothing is compiled or loaded at import; the extension ``lori_kernels._C`` is loaded on
first use.
"""

from lori_kernels import block_sparse, rng
from lori_kernels._extension import is_available as extension_available
from lori_kernels.backends import BACKENDS, available_backends
from lori_kernels.multi import AdapterSpec, PackedAdapters, pack_adapters
from lori_kernels.ops import delta_weight, generate_a, lori_linear, lori_linear_multi
from lori_kernels.rng import RNG_VERSION, layer_seed

__version__ = "0.1.0"

__all__ = [
    "AdapterSpec",
    "BACKENDS",
    "PackedAdapters",
    "RNG_VERSION",
    "available_backends",
    "block_sparse",
    "delta_weight",
    "extension_available",
    "generate_a",
    "layer_seed",
    "lori_linear",
    "lori_linear_multi",
    "pack_adapters",
    "rng",
]
