// Helpers of the CPU kernels that walk B's kept blocks with the BLAS (expand_cpu.cpp,
// sddmm_cpu.cpp). Block indices must have passed check_block_indices_cpu, and the indexes of
// b_blocks check_row_ptr_cpu / check_col_index_cpu.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/index_select.h>
#include <ATen/TensorIndexing.h>
#include <ATen/ops/zeros.h>

#include "layer_checks.h"

namespace lori {

// Kept blocks sharing one block row (or column): their numbers k and, for each, the
// other coordinate (its block column, or row).
struct BlockGroup {
  int64_t index;
  std::vector<int64_t> blocks;
  std::vector<int64_t> other;
};

// The non-empty groups of the n block rows (order == nullptr: blocks ptr[i] to ptr[i+1] - 1)
// or block columns (blocks order[ptr[j]] to order[ptr[j+1] - 1]) of a checked index of b_blocks.
inline std::vector<BlockGroup> group_blocks(const at::Tensor& b_blocks, const at::Tensor& ptr,
                                            const at::Tensor* order, int64_t n) {
  const int32_t* blocks = b_blocks.data_ptr<int32_t>();
  const int32_t* p = ptr.data_ptr<int32_t>();
  const bool by_row = order == nullptr;
  std::vector<BlockGroup> groups;
  for (int64_t g = 0; g < n; ++g) {
    if (p[g] == p[g + 1]) {
      continue;
    }
    BlockGroup group{g, {}, {}};
    for (int64_t t = p[g]; t < p[g + 1]; ++t) {
      const int64_t k = by_row ? t : order->data_ptr<int32_t>()[t];
      group.blocks.push_back(k);
      group.other.push_back(blocks[2 * k + (by_row ? 1 : 0)]);
    }
    groups.push_back(std::move(group));
  }
  return groups;
}

// The columns [start, start + length) of each range of `t`, side by side; a view when
// there is a single range.
inline at::Tensor column_ranges(const at::Tensor& t,
                                const std::vector<std::pair<int64_t, int64_t>>& ranges) {
  if (ranges.size() == 1) {
    return t.narrow(1, ranges[0].first, ranges[0].second);
  }
  std::vector<at::Tensor> index;
  for (const auto& [start, length] : ranges) {
    index.push_back(at::arange(start, start + length, t.options().dtype(at::kLong)));
  }
  return at::index_select(t, 1, at::cat(index));
}

// Rows of block row i that exist in B [out, r] (the last block row may be partial).
inline int64_t real_rows(const BlockLayout& layout, int64_t i, int64_t out) {
  return std::min(layout.bo, out - i * layout.bo);
}

// Multiply dense when the blocks are tiny (element masks) or at least half of B is kept:
// then one GEMM beats walking the blocks.
inline bool use_dense_b(const BlockLayout& layout, int64_t out, int64_t r) {
  return layout.bo * layout.br < 256 || 2 * layout.nnz * layout.bo * layout.br >= layout.n_rows * layout.bo * r;
}

// Dense B [out, r] of the compact blocks (padded rows dropped).
inline at::Tensor dense_b(const at::Tensor& b_values, const at::Tensor& b_blocks,
                          const BlockLayout& layout, int64_t out, int64_t r) {
  at::Tensor tiles = at::zeros({layout.n_rows, layout.n_cols, layout.bo, layout.br}, b_values.options());
  const at::Tensor rows = b_blocks.select(1, 0).to(at::kLong), cols = b_blocks.select(1, 1).to(at::kLong);
  tiles.index_put_({rows, cols}, b_values);
  return tiles.permute({0, 2, 1, 3}).reshape({layout.n_rows * layout.bo, r}).narrow(0, 0, out);
}

// The blocks b_blocks of a dense [out, r] as [nnz, bo, br] (zero in padded rows):
// the inverse of dense_b.
inline at::Tensor gather_b(const at::Tensor& dense, const at::Tensor& b_blocks,
                           const BlockLayout& layout) {
  const int64_t out = dense.size(0), r = dense.size(1);
  at::Tensor padded = at::zeros({layout.n_rows * layout.bo, r}, dense.options());
  padded.narrow(0, 0, out).copy_(dense);
  const at::Tensor tiles = padded.reshape({layout.n_rows, layout.bo, layout.n_cols, layout.br}).transpose(1, 2);
  return tiles.index({b_blocks.select(1, 0).to(at::kLong), b_blocks.select(1, 1).to(at::kLong)});
}

}  // namespace lori
