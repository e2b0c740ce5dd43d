"""LoRI kernels: the fused LoRI layer (frozen W, seeded A, block-sparse B) and its parts.

Public API: ``generate_a``, ``lori_linear``, ``available_backends``, ``layer_seed`` and
the compact-B helpers in ``lori_kernels.block_sparse``. Nothing is compiled or loaded at
import; the extension ``lori_kernels._C`` is loaded on first use.
"""

from lori_kernels import block_sparse, rng
from lori_kernels._extension import is_available as extension_available
from lori_kernels.backends import available_backends
from lori_kernels.functional import generate_a, layer_kernels, lori_linear
from lori_kernels.rng import RNG_VERSION, layer_seed

__version__ = "0.1.0"

__all__ = [
    "RNG_VERSION",
    "available_backends",
    "block_sparse",
    "extension_available",
    "generate_a",
    "layer_kernels",
    "layer_seed",
    "lori_linear",
    "rng",
]
