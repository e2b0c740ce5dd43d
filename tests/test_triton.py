"""The Triton kernels' LoRI-RNG bit for bit, the GEMMs with epilogues against torch, op
registration and backend selection (the fused layer's numerics are in
test_fused_layer.py, for every backend).

Without a GPU these run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest).
"""

import random

import pytest
import torch
from helpers import assert_bitwise_equal, make_layer

import lori_kernels
from lori_kernels import backends, rng

pytest.importorskip("triton")

import triton  # noqa: E402

from lori_kernels.triton_kernels import expand, gemm, philox, sddmm, shrink  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_a_golden(golden):
    for key in ["a_uniform", "a_rademacher"]:
        case = golden[key]
        a = philox.generate_a_tile(
            case["seed"], case["d_in"], 0, case["r"], 0, case["d_in"], dist=case["dist"], device=DEVICE
        )
        assert_bitwise_equal(
            a.cpu(), rng.generate_a_tile(case["seed"], case["d_in"], 0, case["r"], 0, case["d_in"], dist=case["dist"])
        )


@pytest.mark.parametrize("dist", ["uniform", "rademacher"])
def test_a_tiles_match_torch_rng(dist):
    """Aligned (d_in % 4 == 0: one Philox call per four elements) and unaligned tiles,
    seeds >= 2^63, flat indices past 2^32 and 2^63."""
    rand = random.Random(dist)
    cases = [
        (40, 0, 8, 0, 40),
        (41, 0, 8, 0, 41),
        (4096, 3, 5, 128, 100),
        (2**20 + 3, 4097, 2, 100, 1001),
        (2**31 - 1, 2**32 + 5, 2, 2**31 - 1002, 1001),
        (2**30, 2**33 + 5, 2, 2**29, 100),
    ]
    for d_in, row0, rows, col0, cols in cases:
        seed = rand.choice([0, 2**64 - 1, rand.getrandbits(64) | 2**63, rand.getrandbits(64)])
        got = philox.generate_a_tile(seed, d_in, row0, rows, col0, cols, dist=dist, device=DEVICE)
        assert_bitwise_equal(got.cpu(), rng.generate_a_tile(seed, d_in, row0, rows, col0, cols, dist=dist))


def test_generate_a_backend():
    a = lori_kernels.generate_a(2**63 + 5, 16, 77, dtype=torch.float16, device=DEVICE, backend="triton")
    assert_bitwise_equal(a.cpu(), rng.generate_a_tile(2**63 + 5, 77, 0, 16, 0, 77).to(torch.float16))


@pytest.mark.parametrize("p", [0.1, 0.3, 0.7, 0.9])
@pytest.mark.parametrize("d_in", [40, 41])
def test_dropout_masks_match_torch_rng(p, d_in):
    seed = 0x0123456789ABCDEF
    got = philox.dropout_keep(seed, p, 37, d_in, row0=5, device=DEVICE)
    assert torch.equal(got.cpu(), rng.dropout_keep(seed, p, 37, d_in, row0=5))


def test_dropout_golden(golden):
    for case in golden["dropout"]:
        keep = philox.dropout_keep(case["dropout_seed"], case["p"], case["M"], case["d_in"], device=DEVICE)
        assert keep.to(torch.int64).tolist() == case["keep"]


@pytest.mark.parametrize("bias", [True, False])
def test_linear_expand(bias):
    """x @ W.T + b + s * h @ B.T with W stored transposed (strided), M and out not
    multiples of the tile, a partial last block row."""
    layer = make_layer(70, 40, 8, (32, 4), keep=0.5, bias=bias, device=DEVICE)
    weight = layer["weight"].t().contiguous().t()
    x, h = torch.randn(37, 40, device=DEVICE), torch.randn(37, 8, device=DEVICE)
    y = gemm.linear_expand(x, weight, layer["bias"], h, layer["b_values"], layer["b_blocks"], 0.5)
    want = torch.nn.functional.linear(x, weight, layer["bias"]) + 0.5 * h @ layer["b_dense"].T
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_features, dropout_p", [(40, 0.0), (41, 0.3)])
def test_linear_shrink_backward(in_features, dropout_p):
    """dy @ W + (g @ A) * D, A and D regenerated (d_in % 4 == 0 or not)."""
    weight = torch.randn(70, in_features, device=DEVICE)
    dy, g = torch.randn(37, 70, device=DEVICE), torch.randn(37, 8, device=DEVICE)
    seed, dropout_seed = 2**63 + 9, 4
    dx = gemm.linear_shrink_backward(dy, weight, g, seed, "rademacher", dropout_p, dropout_seed)
    a = rng.generate_a_tile(seed, in_features, 0, 8, 0, in_features, dist="rademacher").to(DEVICE)
    keep = rng.dropout_keep(dropout_seed, dropout_p, 37, in_features).to(DEVICE)
    want = dy @ weight + (g @ a) * keep / (1 - dropout_p)
    torch.testing.assert_close(dx, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [40, 600])
def test_sddmm_split_over_m(m):
    """db_values at the kept blocks, with M whole (in dy's dtype) and split over programs
    (fp32 partial sums added up), both scaled."""
    layer = make_layer(70, 40, 8, (32, 4), keep=0.5, device=DEVICE)
    dy, h = torch.randn(m, 70, device=DEVICE), torch.randn(m, 8, device=DEVICE)
    got = sddmm.sddmm(dy, h, layer["b_blocks"], 32, 4, 0.5)
    want = lori_kernels.block_sparse.gather_blocks(0.5 * dy.T @ h, layer["b_blocks"], (32, 4))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_autotuning_candidates(monkeypatch):
    """On a GPU every option is tried (LORI_TRITON_AUTOTUNE=0: the first only); the
    interpreter gets its one small config."""
    from lori_kernels.triton_kernels import tuning

    options = [dict(BLOCK_M=64, num_warps=4), dict(BLOCK_M=128, num_warps=8, num_stages=4)]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tried = tuning.configs(options, interpreter=dict(BLOCK_M=16))
    assert [(c.kwargs, c.num_warps, c.num_stages) for c in tried] == [({"BLOCK_M": 64}, 4, 3), ({"BLOCK_M": 128}, 8, 4)]
    monkeypatch.setenv("LORI_TRITON_AUTOTUNE", "0")
    assert [c.kwargs for c in tuning.configs(options, interpreter=dict(BLOCK_M=16))] == [{"BLOCK_M": 64}]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert [c.kwargs for c in tuning.configs(options, interpreter=dict(BLOCK_M=16))] == [{"BLOCK_M": 16}]


def test_autotuning_keys_name_kernel_arguments():
    """A key that names no argument fails only where there is more than one config to
    choose from, i.e. on a GPU: check every autotuned kernel here."""
    tuned = [
        k
        for module in (expand, gemm, shrink, sddmm)
        for k in vars(module).values()
        if isinstance(k, triton.runtime.Autotuner)
    ]
    assert len(tuned) == 8
    for kernel in tuned:
        assert set(kernel.keys) <= set(kernel.arg_names), kernel.fn.__name__
        assert set(kernel.restore_value) <= set(kernel.arg_names), kernel.fn.__name__


def test_in_place_kernel_survives_autotuning(monkeypatch):
    """Autotuning runs a kernel once per config it tries; expand_ adds into its output, which
    is restored in between, so a new shape's first call adds once."""
    kernel = expand._expand_kernel
    first = kernel.configs[0]
    other = triton.Config(dict(first.kwargs, BLOCK_M=32), num_warps=first.num_warps)
    monkeypatch.setattr(kernel, "configs", [first, other])
    monkeypatch.setattr(kernel, "early_config_prune", None)  # try both, whatever the case
    monkeypatch.setattr(kernel, "cache", {})
    layer = make_layer(70, 40, 8, (32, 4), keep=0.5, device=DEVICE)
    h, y = torch.randn(37, 8, device=DEVICE), torch.randn(37, 70, device=DEVICE)
    want = y + 0.5 * h @ layer["b_dense"].T
    torch.testing.assert_close(expand.expand_(y, h, layer["b_values"], layer["b_blocks"], 0.5), want)


def test_backend_selection(monkeypatch):
    assert "triton" in lori_kernels.available_backends()
    # On the CPU, auto never picks the interpreter; on a GPU it picks Triton, except for
    # float64, which the Triton kernels do not take.
    auto32 = backends.resolve("auto", "lori_linear", torch.device(DEVICE), torch.float32)
    assert (auto32 == "triton") == (DEVICE == "cuda")
    assert backends.resolve("auto", "lori_linear", torch.device(DEVICE), torch.float64) != "triton"
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        backends.resolve("triton", "lori_linear", torch.device(DEVICE), torch.float64)
    # The GEMM-epilogue variant runs lori_linear only, and auto never picks it.
    assert "triton_epilogue" not in lori_kernels.available_backends("generate_a")
    assert "triton_epilogue" in lori_kernels.available_backends("lori_linear")
    with pytest.raises(RuntimeError, match="use 'triton'"):
        backends.resolve("triton_epilogue", "generate_a", torch.device(DEVICE))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="Triton runs on CUDA devices"):
        backends.resolve("triton", "lori_linear", torch.device("cpu"), torch.float32)
