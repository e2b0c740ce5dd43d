// CSR/CSC views of sorted b_blocks on the GPU, built with ATen ops and no host sync
// (searchsorted instead of bincount, whose output size needs a sync).
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/searchsorted.h>

namespace lori {

struct BlockIndex {
  at::Tensor row_ptr;    // int64 [n_rows + 1]: blocks row_ptr[i]:row_ptr[i+1] are in block row i
  at::Tensor col_ptr;    // int64 [n_cols + 1]: col_order[col_ptr[j]:col_ptr[j+1]] are in column j
  at::Tensor col_order;  // int64 [nnz]
};

inline BlockIndex block_index(const at::Tensor& b_blocks, int64_t n_rows, int64_t n_cols) {
  const at::Tensor rows = b_blocks.select(1, 0).to(at::kLong).contiguous();
  const at::Tensor cols = b_blocks.select(1, 1).to(at::kLong);
  const at::Tensor col_order = at::argsort(cols.mul(n_rows).add(rows)).contiguous();
  const at::Tensor sorted_cols = cols.index_select(0, col_order).contiguous();
  const auto bounds = [&](int64_t n) { return at::arange(n + 1, rows.options()); };
  return BlockIndex{at::searchsorted(rows, bounds(n_rows)), at::searchsorted(sorted_cols, bounds(n_cols)),
                    col_order};
}

}  // namespace lori
