"""The wiring between models and kernels: one door, one way, few frames.

- A call from ``LoRILinear.forward`` to a Triton kernel passes through at most 5 Python
  frames of the project in at most 4 files, one way (no return trips between packages).
- The training library reaches the kernels only through the public operators.
"""

import ast
import inspect
from pathlib import Path

import pytest
import torch

import lori_kernels

ROOT = Path(__file__).resolve().parent.parent
GPU = torch.cuda.is_available()


class _Launched(Exception):
    """Raised by the patched launcher, with the stack it saw."""

    def __init__(self, stack):
        self.stack = stack


def test_layer_to_triton_kernel_is_five_frames_in_four_files_one_way(monkeypatch):
    pytest.importorskip("triton")
    import lori
    from lori_kernels.triton_kernels import shrink

    def launch(*args, **kwargs):
        raise _Launched(inspect.stack())

    monkeypatch.setattr(shrink._shrink_kernel, "run", launch)
    device = "cuda" if GPU else "cpu"
    layer = lori.LoRILinear(torch.nn.Linear(40, 70), r=8, alpha=16, seed=1, block=(32, 4), backend="triton")
    with pytest.raises(_Launched) as launched:
        layer.to(device)(torch.randn(3, 40, device=device))
    # The project's frames from the launcher down to LoRILinear.forward (innermost first).
    project = (ROOT / "lori", ROOT / "lori_kernels")
    ours = [
        f
        for f in launched.value.stack
        if Path(f.filename).resolve().is_relative_to(project[0])
        or Path(f.filename).resolve().is_relative_to(project[1])
    ]
    first = next(i for i, f in enumerate(ours) if f.function == "forward" and f.filename.endswith("lori/layer.py"))
    chain = [(Path(f.filename).relative_to(ROOT).as_posix(), f.function) for f in reversed(ours[: first + 1])]
    assert chain[0] == ("lori/layer.py", "forward") and chain[-1] == ("lori_kernels/triton_kernels/shrink.py", "shrink")
    assert len(chain) <= 5, chain
    assert len({file for file, _ in chain}) <= 4, chain
    packages = [str(Path(file).parent) for file, _ in chain]
    assert packages == sorted(packages, key=["lori", "lori_kernels", "lori_kernels/triton_kernels"].index), chain


# What the training library may use of lori_kernels: the public operators and helpers.
# the operators, the B format, the generator, and the measuring helpers (lori.quantize measures
# a quantized weight's bytes with them): no kernel, backend or dispatch
PUBLIC_MODULES = {"lori_kernels", "lori_kernels.block_sparse", "lori_kernels.rng", "lori_kernels.testing"}
PUBLIC_NAMES = set(lori_kernels.__all__) - {"extension_available"}


def test_the_training_library_uses_only_public_operators():
    """No module of ``lori`` (its benchmark suites aside, which time each backend's kernels)
    imports a kernel, a backend or the dispatch: only ``lori_kernels``' public names."""
    for path in sorted((ROOT / "lori").rglob("*.py")):
        if "bench" in path.relative_to(ROOT / "lori").parts:
            continue
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lori_kernels"):
                assert node.module in PUBLIC_MODULES or (
                    node.module == "lori_kernels.backends" and {a.name for a in node.names} <= {"BACKENDS"}
                ), f"{where}:{node.lineno} imports from {node.module}"
                if node.module == "lori_kernels":
                    assert {a.name for a in node.names} <= PUBLIC_NAMES, f"{where}:{node.lineno}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("lori_kernels.") or alias.name in PUBLIC_MODULES, (
                        f"{where}:{node.lineno} imports {alias.name}"
                    )
            elif (
                isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "lori_kernels"
            ):
                assert node.attr in PUBLIC_NAMES, f"{where}:{node.lineno} uses lori_kernels.{node.attr}"
