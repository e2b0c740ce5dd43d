"""Helpers shared by the tests (imported as ``helpers``; pytest puts tests/ on sys.path)."""

import torch


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
