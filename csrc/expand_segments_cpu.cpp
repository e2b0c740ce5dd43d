// The B side of a mixed-adapter batch (lori_linear_multi) on the CPU, every segment in one call:
//   expand_segments_  y[rows[i]] += scaling[s] * h[i] @ B_s.T   for the rows i of each segment s
// B_s is the blocks row_ptr[s] of the concatenated b_values / b_blocks. A unit of work is
// (segment, tile of up to kRowTile of its rows, block row of B_s); units run in parallel and
// write disjoint parts of y (rows are unique). A unit copies its blocks transposed into the
// accumulation type (fp32 for bf16/fp16, the input's otherwise), then adds each row's product
// as contiguous multiply-adds over the block row's outputs, and rounds into y once.
// The indices are read and checked on every call (check_segments_cpu).
#include <algorithm>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "layer_checks.h"
#include "sparse_b_cpu.h"

namespace lori {
namespace {

constexpr int64_t kRowTile = 64;       // rows of a segment per unit: its blocks are transposed once for them
constexpr int64_t kUnitWork = 32768;   // multiply-adds worth handing to a thread

// seg_ptr runs from 0 to h's rows without decreasing, no segment is longer than `longest`, rows
// are distinct rows of y, and row_ptr[s] is, for each segment, the block row index of blocks of
// b_blocks in range, each block row's sorted and unique.
void check_segments_cpu(const at::Tensor& y, const at::Tensor& rows, const at::Tensor& seg_ptr, int64_t longest,
                        const at::Tensor& b_blocks, const at::Tensor& row_ptr, const BlockLayout& layout) {
  const int32_t* seg = seg_ptr.data_ptr<int32_t>();
  const int64_t segments = seg_ptr.size(0) - 1, m_g = rows.size(0);
  TORCH_CHECK(seg[0] == 0 && seg[segments] == m_g, "expand_segments_: seg_ptr must run from 0 to the ", m_g,
              " rows of h, got ", seg[0], " to ", seg[segments]);
  for (int64_t s = 0; s < segments; ++s) {
    TORCH_CHECK(seg[s] <= seg[s + 1], "expand_segments_: seg_ptr must not decrease, but seg_ptr[", s + 1, "] = ",
                seg[s + 1], " < seg_ptr[", s, "] = ", seg[s]);
    TORCH_CHECK(seg[s + 1] - seg[s] <= longest, "expand_segments_: longest = ", longest, " but segment ", s,
                " has ", seg[s + 1] - seg[s], " rows");
  }
  const int64_t* dest = rows.data_ptr<int64_t>();
  std::vector<bool> taken(y.size(0));
  for (int64_t m = 0; m < m_g; ++m) {
    TORCH_CHECK(dest[m] >= 0 && dest[m] < y.size(0), "expand_segments_: rows[", m, "] = ", dest[m],
                " is out of range: y has ", y.size(0), " rows");
    TORCH_CHECK(!taken[dest[m]], "expand_segments_: rows must be distinct, but rows[", m, "] = ", dest[m],
                " comes twice");
    taken[dest[m]] = true;
  }
  const int32_t* blocks = b_blocks.data_ptr<int32_t>();
  for (int64_t s = 0; s < segments; ++s) {
    const int32_t* p = row_ptr.data_ptr<int32_t>() + s * (layout.n_rows + 1);
    TORCH_CHECK(p[0] >= 0 && p[layout.n_rows] <= layout.nnz, "expand_segments_: row_ptr[", s,
                "] must lie in [0, ", layout.nnz, "] (the blocks of b_blocks), got ", p[0], " to ",
                p[layout.n_rows]);
    for (int64_t i = 0; i < layout.n_rows; ++i) {
      TORCH_CHECK(p[i] <= p[i + 1], "expand_segments_: row_ptr[", s, "] must not decrease, but row_ptr[", s, ", ",
                  i + 1, "] = ", p[i + 1], " < row_ptr[", s, ", ", i, "] = ", p[i]);
    }
    for (int64_t i = 0; i < layout.n_rows; ++i) {
      for (int64_t k = p[i]; k < p[i + 1]; ++k) {
        const int64_t j = blocks[2 * k + 1];
        TORCH_CHECK(blocks[2 * k] == i && j >= 0 && j < layout.n_cols && (k == p[i] || j > blocks[2 * k - 1]),
                    "expand_segments_: b_blocks[", k, "] = (", blocks[2 * k], ", ", j,
                    ") is not the next block of block row ", i, " of segment ", s, " (B has ", layout.n_cols,
                    " block columns; a block row's blocks are sorted and unique)");
      }
    }
  }
}

template <typename scalar_t>
void expand_segments_typed(at::Tensor& y, const at::Tensor& h, const at::Tensor& rows, const at::Tensor& seg_ptr,
                           const at::Tensor& b_values, const at::Tensor& b_blocks, const at::Tensor& row_ptr,
                           const at::Tensor& scaling, const BlockLayout& layout) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t out = y.size(1), r = h.size(1), bo = layout.bo, br = layout.br, n_rows = layout.n_rows;
  const int64_t segments = seg_ptr.size(0) - 1;
  const int32_t* seg = seg_ptr.data_ptr<int32_t>();
  const int32_t* ptr = row_ptr.data_ptr<int32_t>();
  // first[s]: the first unit of segment s (first[segments]: how many); work: multiply-adds in all.
  std::vector<int64_t> first(segments + 1, 0);
  int64_t work = 0;
  for (int64_t s = 0; s < segments; ++s) {
    const int64_t count = seg[s + 1] - seg[s], nnz = ptr[(s + 1) * (n_rows + 1) - 1] - ptr[s * (n_rows + 1)];
    first[s + 1] = first[s] + (count + kRowTile - 1) / kRowTile * n_rows;
    work += count * nnz * bo * br;
  }
  if (work == 0) {
    return;
  }
  const int32_t* blocks = b_blocks.data_ptr<int32_t>();
  const int64_t* dest = rows.data_ptr<int64_t>();
  const float* scale = scaling.data_ptr<float>();
  const scalar_t* h_data = h.data_ptr<scalar_t>();
  const scalar_t* b_data = b_values.data_ptr<scalar_t>();
  scalar_t* y_data = y.data_ptr<scalar_t>();
  const int64_t units = first[segments];
  at::parallel_for(0, units, std::max<int64_t>(1, units * kUnitWork / work), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> bt, acc(bo);
    int64_t s = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
    for (int64_t u = begin; u < end; ++u) {
      while (u >= first[s + 1]) {
        ++s;
      }
      const int64_t tile = (u - first[s]) / n_rows, i = (u - first[s]) % n_rows;
      const int64_t start = ptr[s * (n_rows + 1) + i], n_blocks = ptr[s * (n_rows + 1) + i + 1] - start;
      if (n_blocks == 0) {
        continue;
      }
      // bt[(t * br + c) * outputs + o] = B block start + t at (o, c)
      const int64_t outputs = real_rows(layout, i, out);
      bt.resize(n_blocks * br * outputs);
      for (int64_t t = 0; t < n_blocks; ++t) {
        for (int64_t o = 0; o < outputs; ++o) {
          const scalar_t* b = b_data + ((start + t) * bo + o) * br;
          for (int64_t c = 0; c < br; ++c) {
            bt[(t * br + c) * outputs + o] = static_cast<acc_t>(b[c]);
          }
        }
      }
      const int64_t m0 = seg[s] + tile * kRowTile, m1 = std::min<int64_t>(m0 + kRowTile, seg[s + 1]);
      for (int64_t m = m0; m < m1; ++m) {
        std::fill(acc.begin(), acc.begin() + outputs, acc_t(0));
        for (int64_t t = 0; t < n_blocks; ++t) {
          const scalar_t* h_block = h_data + m * r + blocks[2 * (start + t) + 1] * br;
          for (int64_t c = 0; c < br; ++c) {
            const acc_t x = static_cast<acc_t>(h_block[c]);
            const acc_t* b_column = bt.data() + (t * br + c) * outputs;
            for (int64_t o = 0; o < outputs; ++o) {
              acc[o] += x * b_column[o];
            }
          }
        }
        scalar_t* y_row = y_data + dest[m] * out + i * bo;
        for (int64_t o = 0; o < outputs; ++o) {
          y_row[o] = static_cast<scalar_t>(static_cast<acc_t>(y_row[o]) + static_cast<acc_t>(scale[s]) * acc[o]);
        }
      }
    }
  });
}

void expand_segments_cpu(at::Tensor& y, const at::Tensor& h, const at::Tensor& rows, const at::Tensor& seg_ptr,
                         int64_t longest, const at::Tensor& b_values, const at::Tensor& b_blocks,
                         const at::Tensor& row_ptr, const at::Tensor& scaling) {
  const BlockLayout layout = check_expand_segments(y, h, rows, seg_ptr, longest, b_values, b_blocks, row_ptr, scaling);
  check_segments_cpu(y, rows, seg_ptr, longest, b_blocks, row_ptr, layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "expand_segments_cpu", [&] {
    expand_segments_typed<scalar_t>(y, h, rows, seg_ptr, b_values, b_blocks, row_ptr, scaling, layout);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lori, CPU, m) { m.impl("expand_segments_", &expand_segments_cpu); }

}  // namespace lori
