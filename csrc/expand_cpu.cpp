// The B side of the LoRI layer on the CPU, over B's kept blocks, with the BLAS:
//   expand_          y += s * h @ B.T   one GEMM per kept block row (its blocks side by side)
//   expand_backward  g  = s * dy @ B    one GEMM per kept block column (its blocks stacked)
// The rows and columns are walked through the index of b_blocks passed in (row_ptr; col_ptr
// and col_order), after checking it against b_blocks.
// Each output element is accumulated inside one GEMM (fp32 accumulation for bf16/fp16).
#include <utility>
#include <vector>

#include <ATen/ops/cat.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "layer_checks.h"
#include "sparse_b_cpu.h"

namespace lori {
namespace {

void expand_cpu(at::Tensor& y, const at::Tensor& h, const at::Tensor& b_values,
                const at::Tensor& b_blocks, const at::Tensor& row_ptr, double scaling) {
  const BlockLayout layout = check_expand(y, h, b_values, b_blocks, row_ptr);
  const int64_t out = y.size(1), r = h.size(1);
  check_block_indices_cpu("expand_", b_blocks, layout);
  check_row_ptr_cpu("expand_", b_blocks, row_ptr, layout);
  if (layout.nnz == 0 || y.size(0) == 0) {
    return;
  }
  if (use_dense_b(layout, out, r)) {
    y.addmm_(h, dense_b(b_values, b_blocks, layout, out, r).t(), 1.0, scaling);
    return;
  }
  for (const BlockGroup& row : group_blocks(b_blocks, row_ptr, nullptr, layout.n_rows)) {
    std::vector<at::Tensor> blocks;
    std::vector<std::pair<int64_t, int64_t>> h_columns;
    for (size_t t = 0; t < row.blocks.size(); ++t) {
      blocks.push_back(b_values[row.blocks[t]]);
      h_columns.emplace_back(row.other[t] * layout.br, layout.br);
    }
    const int64_t rows = real_rows(layout, row.index, out);
    y.narrow(1, row.index * layout.bo, rows)
        .addmm_(column_ranges(h, h_columns), at::cat(blocks, 1).narrow(0, 0, rows).t(), 1.0, scaling);
  }
}

at::Tensor expand_backward_cpu(const at::Tensor& dy, const at::Tensor& b_values,
                               const at::Tensor& b_blocks, const at::Tensor& col_ptr,
                               const at::Tensor& col_order, int64_t r, double scaling) {
  const BlockLayout layout = check_expand_backward(dy, b_values, b_blocks, col_ptr, col_order, r);
  const int64_t out = dy.size(1);
  check_block_indices_cpu("expand_backward", b_blocks, layout);
  check_col_index_cpu("expand_backward", b_blocks, col_ptr, col_order, layout);
  if (layout.nnz > 0 && dy.size(0) > 0 && use_dense_b(layout, out, r)) {
    return at::mm(dy, dense_b(b_values, b_blocks, layout, out, r)).mul_(scaling);
  }
  at::Tensor g = at::zeros({dy.size(0), r}, dy.options());
  if (dy.size(0) == 0) {
    return g;
  }
  for (const BlockGroup& col : group_blocks(b_blocks, col_ptr, &col_order, layout.n_cols)) {
    std::vector<at::Tensor> blocks;
    std::vector<std::pair<int64_t, int64_t>> dy_columns;
    for (size_t t = 0; t < col.blocks.size(); ++t) {
      const int64_t rows = real_rows(layout, col.other[t], out);
      blocks.push_back(b_values[col.blocks[t]].narrow(0, 0, rows));
      dy_columns.emplace_back(col.other[t] * layout.bo, rows);
    }
    g.narrow(1, col.index * layout.br, layout.br)
        .addmm_(column_ranges(dy, dy_columns), at::cat(blocks, 0), 0.0, scaling);
  }
  return g;
}

}  // namespace

TORCH_LIBRARY_IMPL(lori, CPU, m) {
  m.impl("expand_", &expand_cpu);
  m.impl("expand_backward", &expand_backward_cpu);
}

}  // namespace lori
