"""The compact block-sparse B: converters and validation."""

import pytest
import torch

from lori_kernels import block_sparse as bs


def random_block_mask(out, r, block, keep, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_rows, n_cols = bs.block_grid(out, r, block)
    kept = torch.rand(n_rows, n_cols, generator=g) < keep
    mask = kept.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:out]
    return mask


@pytest.mark.parametrize(
    "out, r, block", [(64, 32, (32, 32)), (70, 16, (32, 8)), (5, 4, (1, 1)), (33, 6, (16, 3)), (3, 8, (32, 8))]
)
@pytest.mark.parametrize("keep", [0.0, 0.5, 1.0])
def test_mask_round_trip(out, r, block, keep):
    mask = random_block_mask(out, r, block, keep)
    dense = torch.randn(out, r) * mask
    b_values, b_blocks = bs.from_dense(dense, block, mask)
    assert b_blocks.dtype == torch.int32 and b_values.shape == (b_blocks.shape[0], *block)
    bs.check_b_blocks(b_blocks, out, r, block)
    assert torch.equal(bs.mask_from_blocks(b_blocks, out, r, block), mask)
    assert torch.equal(bs.to_dense(b_values, b_blocks, out, r), dense)


def test_dense_keeps_every_block_in_order():
    b_blocks = bs.dense_blocks(70, 8, (32, 4))
    assert b_blocks.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]]
    dense = torch.randn(70, 8)
    b_values, blocks2 = bs.from_dense(dense, (32, 4))
    assert torch.equal(blocks2, b_blocks)
    # The padded rows of the partial last block row are zero.
    assert b_values[-2:, 6:].abs().sum() == 0
    assert torch.equal(bs.to_dense(b_values, b_blocks, 70, 8), dense)


def test_element_mask_is_block_1x1():
    mask = torch.rand(9, 4, generator=torch.Generator().manual_seed(1)) < 0.3
    b_blocks = bs.blocks_from_mask(mask, (1, 1))
    assert b_blocks.tolist() == mask.nonzero().tolist()


def test_scatter_ignores_padding_and_its_gradient_is_zero():
    b_values = torch.randn(2, 32, 4, requires_grad=True)
    b_blocks = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)
    dense = bs.scatter_blocks(b_values, b_blocks, 70, 8)
    assert dense.shape == (70, 8)
    dense.sum().backward()
    assert b_values.grad[0].eq(1).all()
    assert b_values.grad[1, :6].eq(1).all() and b_values.grad[1, 6:].eq(0).all()


def test_mask_with_partly_set_block_is_rejected():
    mask = torch.zeros(64, 8, dtype=torch.bool)
    mask[3, 1] = True
    with pytest.raises(ValueError, match=r"block \(0, 0\) is partly set .*block \(1, 1\)"):
        bs.blocks_from_mask(mask, (32, 4))


def test_values_outside_mask_are_not_dropped_silently():
    mask = torch.zeros(64, 8, dtype=torch.bool)
    mask[32:, :4] = True
    dense = torch.ones(64, 8)
    with pytest.raises(ValueError, match="nonzero values outside the mask"):
        bs.from_dense(dense, (32, 4), mask)


@pytest.mark.parametrize(
    "blocks, message",
    [
        ([[0, 0], [3, 0]], r"b_blocks\[1\] = \(3, 0\) is out of range"),
        ([[0, 0], [0, 2]], r"b_blocks\[1\] = \(0, 2\) is out of range"),
        ([[-1, 0]], "out of range"),
        ([[1, 0], [0, 1]], r"b_blocks\[1\] = \(0, 1\) is not sorted"),
        ([[1, 0], [1, 0]], r"b_blocks\[1\] = \(1, 0\) is duplicated"),
    ],
)
def test_check_b_blocks_names_the_bad_entry(blocks, message):
    with pytest.raises(ValueError, match=message):
        bs.check_b_blocks(torch.tensor(blocks, dtype=torch.int32), 70, 8, (32, 4))


@pytest.mark.parametrize(
    "b_values, b_blocks, error, message",
    [
        (torch.zeros(1, 32, 4), torch.zeros(1, 2, dtype=torch.int64), TypeError, "b_blocks must be an int32"),
        (torch.zeros(1, 32, 4), torch.zeros(1, 3, dtype=torch.int32), ValueError, r"shape \[nnz, 2\]"),
        (torch.zeros(2, 32, 4), torch.zeros(1, 2, dtype=torch.int32), ValueError, r"\[1, 32, 4\]"),
        (torch.zeros(1, 16, 4), torch.zeros(1, 2, dtype=torch.int32), ValueError, "b_values must have shape"),
        (torch.zeros(1, 32, 4, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int32), TypeError, "floating-point"),
        (torch.zeros(1, 32, 4, device="meta"), torch.zeros(1, 2, dtype=torch.int32), ValueError, "b_values is on meta"),
    ],
)
def test_check_b_layout(b_values, b_blocks, error, message):
    with pytest.raises(error, match=message):
        bs.check_b_layout(b_values, b_blocks, (32, 4))


@pytest.mark.parametrize(
    "block, r, message",
    [
        ((32, 5), 32, "br=5 must divide r=32"),
        ((0, 4), 32, "must be positive"),
        ((32,), 32, "pair"),
        ((32.0, 4), 32, "pair"),
        ((True, 4), 32, "pair"),
        ((32, 4), 0, "r must be a positive int"),
    ],
)
def test_check_block(block, r, message):
    with pytest.raises(ValueError, match=message):
        bs.check_block(block, r)


def test_mask_shape_must_match():
    with pytest.raises(ValueError, match="does not match B shape"):
        bs.from_dense(torch.zeros(8, 4), (1, 1), torch.zeros(8, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool"):
        bs.blocks_from_mask(torch.zeros(8, 4), (1, 1))
