"""Helpers shared by the tests (imported as ``helpers``; pytest puts tests/ on sys.path)."""

import torch

import lori_kernels
from lori_kernels import block_sparse as bs


def devices():
    """CPU, plus CUDA when a GPU is present: for parametrizing device-generic tests."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    as_int = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    assert torch.equal(a.view(as_int), b.view(as_int)), "tensors differ bitwise"


def assert_error_earned(got: torch.Tensor, same_precision: torch.Tensor, truth: torch.Tensor, factor: float = 2.0):
    """flash-attention's rule: ``got``'s error against the float64 ``truth`` is at most
    ``factor`` times that of a plain torch computation in the same precision (plus a few
    ulps of the output, so that exact float64 results compare too)."""
    truth = truth.double()
    err = (got.double() - truth).abs().max().item() if truth.numel() else 0.0
    base = (same_precision.double() - truth).abs().max().item() if truth.numel() else 0.0
    ulps = 4 * torch.finfo(got.dtype).eps * (truth.abs().max().item() if truth.numel() else 0.0)
    assert err <= factor * base + ulps, f"error {err:.3g} > {factor} x torch's {base:.3g} (+{ulps:.3g})"


def make_layer(out, inp, r, block, keep=1.0, dtype=torch.float32, bias=True, seed=0, device="cpu"):
    """A frozen base linear and a compact B that keeps a random fraction of its blocks."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=g) / inp**0.5
    b = torch.randn(out, generator=g) if bias else None
    n_rows, n_cols = bs.block_grid(out, r, block)
    kept = torch.rand(n_rows, n_cols, generator=g) < keep
    mask = kept.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:out]
    b_dense = torch.randn(out, r, generator=g) * mask
    b_values, b_blocks = bs.from_dense(b_dense, block, mask)
    to = dict(dtype=dtype, device=device)
    return dict(
        weight=weight.to(**to),
        bias=None if b is None else b.to(**to),
        b_values=b_values.to(**to),
        b_blocks=b_blocks.to(device),
        b_dense=b_dense.to(**to),
        seed=2**64 - 7 - seed,
    )


def run(layer, x, r, block, scaling=2.0, dropout_p=0.0, dropout_seed=11, backend="reference"):
    """``lori_linear`` on a layer of ``make_layer`` or ``adapter_alone`` (the reference backend unless told)."""
    return lori_kernels.lori_linear(
        x,
        layer["weight"],
        layer["bias"],
        layer["seed"],
        layer["b_values"],
        layer["b_blocks"],
        r=r,
        block=block,
        scaling=scaling,
        dropout_p=dropout_p,
        dropout_seed=dropout_seed,
        backend=backend,
        out_features=layer.get("out_features"),
    )


def adapter_alone(layer):
    """A layer of ``make_layer`` without its base: ``lori_linear(x, None, None, ..., out_features=out)``."""
    return dict(layer, weight=None, bias=None, out_features=layer["weight"].shape[0])
