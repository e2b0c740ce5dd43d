"""Builds lori_kernels._C, the compiled CPU (C++) and CUDA ops.

A CUDAExtension when torch is a CUDA build and a CUDA toolkit is found (CUDA_HOME,
default /usr/local/cuda), else a CppExtension. Never decided by
torch.cuda.is_available(): build machines often have no GPU.

Environment switches:
  LORI_BUILD_EXT=0        skip the extension (the package then runs reference + Triton)
  LORI_FORCE_CPU_EXT=1    build the CPU-only extension even where CUDA could be built
  CUDA_HOME               the CUDA toolkit (default /usr/local/cuda when it has bin/nvcc)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0")
  MAX_JOBS                parallel compile jobs (read by torch's ninja build)
"""

import glob
import logging
import os

from setuptools import setup

log = logging.getLogger("lori_kernels.setup")


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return home if os.path.exists(os.path.join(home, "bin", "nvcc")) else None


def ext_modules():
    if os.environ.get("LORI_BUILD_EXT", "1") == "0":
        log.warning("LORI_BUILD_EXT=0: not building lori_kernels._C")
        return []
    cuda_home = _cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads these when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    try:
        import torch
        from torch.utils.cpp_extension import CppExtension, CUDAExtension
    except ImportError:
        log.warning(
            "torch is not importable in this build environment: not building "
            "lori_kernels._C; install torch first, then `pip install --no-build-isolation .`"
        )
        return []

    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    # No fast-math and no FMA contraction: the RNG's float conversion must stay exact.
    cxx_flags = ["-O3", "-ffp-contract=off", "-fopenmp"]
    use_cuda = (
        torch.version.cuda is not None and cuda_home is not None and os.environ.get("LORI_FORCE_CPU_EXT", "0") != "1"
    )
    if use_cuda:
        log.warning("building lori_kernels._C with CUDA kernels (CUDA_HOME=%s)", cuda_home)
        return [
            CUDAExtension(
                "lori_kernels._C",
                cpp_sources + cuda_sources,
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
                extra_link_args=["-fopenmp"],
            )
        ]
    log.warning("building lori_kernels._C for CPU only (no CUDA build of torch or no nvcc)")
    return [
        CppExtension(
            "lori_kernels._C",
            cpp_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]


def cmdclass(extensions):
    if not extensions:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


_extensions = ext_modules()
setup(ext_modules=_extensions, cmdclass=cmdclass(_extensions))
