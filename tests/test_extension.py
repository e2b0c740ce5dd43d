"""The compiled extension: its build, and generate_a (C++ CPU kernel, CUDA kernel) against the torch LoRI-RNG."""

import os
import random
import shutil

import pytest
import torch
from helpers import assert_bitwise_equal, devices

import lori_kernels
from lori_kernels import _extension, backends, rng


def ext_tile(ops, seed, d_in, row0, rows, col0, cols, dist, device="cpu"):
    seed_t = torch.tensor(rng.to_int64(seed), device=device)
    return ops.generate_a(seed_t, d_in, row0, rows, col0, cols, dist)


def random_cases(n, rand):
    for _ in range(n):
        d_in = rand.choice([1, 2, 3, 5, 7, 64, 129, 1023, 4096, rand.randint(1, 3000)])
        rows = rand.randint(0, 40)
        col0 = rand.randint(0, d_in - 1)
        cols = rand.randint(0, d_in - col0)
        seed = rand.choice([0, 1, 2**63 - 1, 2**63, 2**64 - 1, rand.getrandbits(64), rand.getrandbits(64) | 2**63])
        yield seed, d_in, rand.randint(0, 100), rows, col0, cols


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dist", ["uniform", "rademacher"])
def test_matches_torch_rng_on_random_tiles(ext, device, dist):
    rand = random.Random(f"ext-{dist}")
    for seed, d_in, row0, rows, col0, cols in random_cases(60, rand):
        got = ext_tile(ext, seed, d_in, row0, rows, col0, cols, dist, device)
        want = rng.generate_a_tile(seed, d_in, row0, rows, col0, cols, dist=dist, device=device)
        assert_bitwise_equal(got, want)


@pytest.mark.parametrize("device", devices())
def test_flat_indices_past_2_32_and_2_63(ext, device):
    """Rows far down a wide A: flat indices >= 2^32 (counter word c1) and >= 2^63, and a row
    across flat index 2^34, where the quad counter's low word wraps inside a batch of calls."""
    for d_in, row0 in [(2**20 + 3, 4097), (2**31 - 1, 2**32 + 5), (2000, 8589934)]:
        seed = 2**63 + 977
        got = ext_tile(ext, seed, d_in, row0, 2, d_in - 1001, 1001, "uniform", device)
        want = rng.generate_a_tile(seed, d_in, row0, 2, d_in - 1001, 1001, device=device)
        assert (row0 + 1) * d_in > 2**32
        assert_bitwise_equal(got, want)


def test_golden_a(ext, golden):
    for key in ["a_uniform", "a_rademacher"]:
        case = golden[key]
        got = ext_tile(ext, case["seed"], case["d_in"], 0, case["r"], 0, case["d_in"], case["dist"])
        assert got.view(torch.int32).tolist() == [
            [int(h, 16) - (1 << 32 if int(h, 16) >= 1 << 31 else 0) for h in row] for row in case["float32_hex"]
        ]


@pytest.mark.parametrize("device", devices())
def test_generate_a_auto_uses_extension(ext, device):
    expected = "cuda_ext" if device == "cuda" else "cpu_ext"
    assert backends.resolve("auto", "generate_a", torch.device(device)) == expected
    a = lori_kernels.generate_a(2**64 - 1, 32, 4095, dtype=torch.bfloat16, device=device)
    want = rng.generate_a_tile(2**64 - 1, 4095, 0, 32, 0, 4095, device=device).to(torch.bfloat16)
    assert_bitwise_equal(a, want)


@pytest.mark.parametrize("device", devices())
def test_opcheck(ext, device):
    seed = torch.tensor(-5, device=device)
    for args in [(seed, 10, 0, 3, 0, 10, "uniform"), (seed, 7, 2, 0, 1, 5, "rademacher")]:
        torch.library.opcheck(ext.generate_a.default, args)


def test_torch_compile_fullgraph(ext):
    seed = torch.tensor(123)
    compiled = torch.compile(lambda s: ext.generate_a(s, 33, 0, 4, 0, 33, "uniform") * 2, fullgraph=True)
    assert_bitwise_equal(compiled(seed), rng.generate_a_tile(123, 33, 0, 4, 0, 33) * 2)


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.tensor(1.0), 4, 0, 1, 0, 4, "uniform"), "seed must be a one-element int64 tensor"),
        ((torch.tensor([1, 2]), 4, 0, 1, 0, 4, "uniform"), "seed must be a one-element int64 tensor"),
        ((torch.tensor(1), 0, 0, 1, 0, 0, "uniform"), "d_in must be positive"),
        ((torch.tensor(1), 4, -1, 1, 0, 4, "uniform"), "rows must be a non-negative range"),
        ((torch.tensor(1), 4, 0, 1, 2, 3, "uniform"), "do not fit d_in=4"),
        ((torch.tensor(1), 4, 0, 1, 0, 4, "normal"), "dist must be"),
    ],
)
def test_errors_name_the_argument(ext, args, message):
    with pytest.raises(RuntimeError, match=message):
        ext.generate_a(*args)


def test_built_with_cuda_where_a_toolkit_is_present(ext):
    """A CI machine has nvcc but no GPU: the CUDA kernels must still have been compiled."""
    if os.environ.get("LORI_FORCE_CPU_EXT") == "1":
        pytest.skip("LORI_FORCE_CPU_EXT=1 builds the CPU-only extension")
    toolkit = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if torch.version.cuda is None or not shutil.which("nvcc", path=os.path.join(toolkit, "bin")):
        pytest.skip("no CUDA build of torch or no CUDA toolkit to compile with")
    for op in ["generate_a", "shrink", "shrink_backward", "expand_", "expand_segments_", "expand_backward", "sddmm"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lori::{op}", "CUDA"), op


def test_missing_extension_gives_one_clear_sentence(monkeypatch):
    monkeypatch.setattr(_extension, "load_error", lambda: _extension.BUILD_HINT)
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation"):
        lori_kernels.generate_a(1, 2, 3, backend="cpu_ext")
    assert "cpu_ext" not in lori_kernels.available_backends("generate_a")
    assert_bitwise_equal(lori_kernels.generate_a(1, 2, 3), rng.generate_a_tile(1, 3, 0, 2, 0, 3))
