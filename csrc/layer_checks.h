// Argument checks of the layer ops (shrink, expand, sddmm, expand_segments_), shared by the CPU and
// CUDA implementations: every failure names the op and the argument.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace lori {

inline void check_matrix(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be a 2-D tensor, got shape ", t.sizes());
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be a floating-point tensor, got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_like(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but ", ref_name, " has ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
}

inline void check_rows(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.size(0) == ref.size(0), op, ": ", name, " has ", t.size(0), " rows but ", ref_name,
              " has ", ref.size(0));
}

// float32(p), after checking that 0 <= p < 1.
inline float check_dropout(const char* op, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
  return static_cast<float>(p);
}

// float32(1 / (1 - float64(p32))): the factor on kept inputs.
inline float dropout_scale(float p32) {
  return static_cast<float>(1.0 / (1.0 - static_cast<double>(p32)));
}

struct BlockLayout {
  int64_t nnz, bo, br, n_rows, n_cols;
};

// Checks b_blocks (int32 [nnz, 2], contiguous, on the device of `like`) and the block
// (bo, br) against B [out, r]; reads no block indices.
inline BlockLayout check_layout(const char* op, const at::Tensor& b_blocks, int64_t bo, int64_t br,
                                int64_t out, int64_t r, const char* like_name, const at::Tensor& like) {
  TORCH_CHECK(b_blocks.scalar_type() == at::kInt && b_blocks.dim() == 2 && b_blocks.size(1) == 2,
              op, ": b_blocks must be an int32 tensor [nnz, 2], got ", b_blocks.scalar_type(),
              " with shape ", b_blocks.sizes());
  TORCH_CHECK(b_blocks.device() == like.device(), op, ": b_blocks is on ", b_blocks.device(),
              " but ", like_name, " is on ", like.device());
  TORCH_CHECK(b_blocks.is_contiguous(), op, ": b_blocks must be contiguous");
  TORCH_CHECK(bo > 0 && br > 0 && r > 0 && r % br == 0, op, ": block (", bo, ", ", br,
              ") does not fit r=", r, ": br must divide r");
  TORCH_CHECK(out > 0, op, ": B must have at least one row, got out=", out);
  return BlockLayout{b_blocks.size(0), bo, br, (out + bo - 1) / bo, r / br};
}

// Checks the compact B (b_values [nnz, bo, br] contiguous, in the dtype and on the device
// of `like`, and its b_blocks) of a B [out, r]; reads no block indices.
inline BlockLayout check_b(const char* op, const at::Tensor& b_values, const at::Tensor& b_blocks,
                           int64_t out, int64_t r, const char* like_name, const at::Tensor& like) {
  TORCH_CHECK(b_values.dim() == 3, op, ": b_values must be [nnz, bo, br], got shape ",
              b_values.sizes());
  check_like(op, "b_values", b_values, like_name, like);
  TORCH_CHECK(b_values.is_contiguous(), op, ": b_values must be contiguous");
  const BlockLayout layout =
      check_layout(op, b_blocks, b_values.size(1), b_values.size(2), out, r, like_name, like);
  TORCH_CHECK(layout.nnz == b_values.size(0), op, ": b_blocks has ", layout.nnz,
              " blocks but b_values has ", b_values.size(0));
  return layout;
}

// The arguments of each layer op, shared by its CPU and CUDA implementations.

// `t` is an activation [M, *] beside `ref`: 2-D, contiguous, same dtype, device and rows.
inline void check_beside(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                         const at::Tensor& ref) {
  check_matrix(op, name, t);
  check_like(op, name, t, ref_name, ref);
  check_rows(op, name, t, ref_name, ref);
}

// shrink(x, seed, r, dist, dropout_p, ...): float32(dropout_p).
inline float check_shrink(const at::Tensor& x, int64_t r, double dropout_p) {
  check_matrix("shrink", "x", x);
  TORCH_CHECK(r > 0, "shrink: r must be positive, got ", r);
  return check_dropout("shrink", dropout_p);
}

// shrink_backward(g, seed, d_in, dist, dropout_p, ...): float32(dropout_p).
inline float check_shrink_backward(const at::Tensor& g, int64_t d_in, double dropout_p) {
  check_matrix("shrink_backward", "g", g);
  TORCH_CHECK(d_in > 0, "shrink_backward: d_in must be positive, got ", d_in);
  return check_dropout("shrink_backward", dropout_p);
}

// An index of b_blocks (row_ptr, col_ptr, col_order): int32 [size], contiguous, on b_blocks'
// device; reads no values.
inline void check_index(const char* op, const char* name, const at::Tensor& index, int64_t size,
                        const at::Tensor& b_blocks) {
  TORCH_CHECK(index.scalar_type() == at::kInt && index.dim() == 1 && index.size(0) == size, op, ": ",
              name, " must be an int32 tensor [", size, "], got ", index.scalar_type(), " with shape ",
              index.sizes());
  TORCH_CHECK(index.device() == b_blocks.device(), op, ": ", name, " is on ", index.device(),
              " but b_blocks is on ", b_blocks.device());
  TORCH_CHECK(index.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline BlockLayout check_expand(const at::Tensor& y, const at::Tensor& h, const at::Tensor& b_values,
                                const at::Tensor& b_blocks, const at::Tensor& row_ptr) {
  check_matrix("expand_", "y", y);
  check_beside("expand_", "h", h, "y", y);
  const BlockLayout layout = check_b("expand_", b_values, b_blocks, y.size(1), h.size(1), "y", y);
  check_index("expand_", "row_ptr", row_ptr, layout.n_rows + 1, b_blocks);
  return layout;
}

inline BlockLayout check_expand_backward(const at::Tensor& dy, const at::Tensor& b_values,
                                         const at::Tensor& b_blocks, const at::Tensor& col_ptr,
                                         const at::Tensor& col_order, int64_t r) {
  check_matrix("expand_backward", "dy", dy);
  const BlockLayout layout = check_b("expand_backward", b_values, b_blocks, dy.size(1), r, "dy", dy);
  check_index("expand_backward", "col_ptr", col_ptr, layout.n_cols + 1, b_blocks);
  check_index("expand_backward", "col_order", col_order, layout.nnz, b_blocks);
  return layout;
}

inline BlockLayout check_sddmm(const at::Tensor& dy, const at::Tensor& h, const at::Tensor& b_blocks,
                               int64_t bo, int64_t br) {
  check_matrix("sddmm", "dy", dy);
  check_beside("sddmm", "h", h, "dy", dy);
  return check_layout("sddmm", b_blocks, bo, br, dy.size(1), h.size(1), "dy", dy);
}

}  // namespace lori

namespace lori {

// CPU tensors only: every block index in range, sorted by (row, column), unique.
inline void check_block_indices_cpu(const char* op, const at::Tensor& b_blocks,
                                    const BlockLayout& layout) {
  const int32_t* blocks = b_blocks.data_ptr<int32_t>();
  for (int64_t k = 0; k < layout.nnz; ++k) {
    const int64_t i = blocks[2 * k], j = blocks[2 * k + 1];
    TORCH_CHECK(i >= 0 && i < layout.n_rows && j >= 0 && j < layout.n_cols, op, ": b_blocks[", k,
                "] = (", i, ", ", j, ") is out of range: B has ", layout.n_rows,
                " block rows and ", layout.n_cols, " block columns");
    if (k > 0) {
      const int64_t pi = blocks[2 * k - 2], pj = blocks[2 * k - 1];
      TORCH_CHECK(i > pi || (i == pi && j > pj), op, ": b_blocks must be sorted and unique: b_blocks[",
                  k, "] = (", i, ", ", j, ") comes after (", pi, ", ", pj, ")");
    }
  }
}

// CPU tensors only, after check_block_indices_cpu: row_ptr is the block row index of b_blocks
// (row_ptr[i] blocks lie in the block rows before i).
inline void check_row_ptr_cpu(const char* op, const at::Tensor& b_blocks, const at::Tensor& row_ptr,
                              const BlockLayout& layout) {
  const int32_t* blocks = b_blocks.data_ptr<int32_t>();
  const int32_t* ptr = row_ptr.data_ptr<int32_t>();
  int64_t k = 0;
  for (int64_t i = 0; i <= layout.n_rows; ++i) {
    while (k < layout.nnz && blocks[2 * k] < i) {
      ++k;
    }
    TORCH_CHECK(ptr[i] == k, op, ": row_ptr[", i, "] = ", ptr[i], " but ", k,
                " blocks of b_blocks lie in the block rows before ", i);
  }
}

// CPU tensors only, after check_block_indices_cpu: col_order[col_ptr[j]:col_ptr[j+1]] are the
// blocks of block column j, in b_blocks' order (so every block is listed once).
inline void check_col_index_cpu(const char* op, const at::Tensor& b_blocks, const at::Tensor& col_ptr,
                                const at::Tensor& col_order, const BlockLayout& layout) {
  const int32_t* blocks = b_blocks.data_ptr<int32_t>();
  const int32_t* ptr = col_ptr.data_ptr<int32_t>();
  const int32_t* order = col_order.data_ptr<int32_t>();
  TORCH_CHECK(ptr[0] == 0 && ptr[layout.n_cols] == layout.nnz, op, ": col_ptr must run from 0 to nnz = ",
              layout.nnz, ", got ", ptr[0], " to ", ptr[layout.n_cols]);
  for (int64_t j = 0; j < layout.n_cols; ++j) {
    TORCH_CHECK(ptr[j] <= ptr[j + 1], op, ": col_ptr must not decrease, but col_ptr[", j + 1, "] = ",
                ptr[j + 1], " < col_ptr[", j, "] = ", ptr[j]);
    for (int64_t t = ptr[j]; t < ptr[j + 1]; ++t) {
      const int64_t k = order[t];
      TORCH_CHECK(k >= 0 && k < layout.nnz && blocks[2 * k + 1] == j && (t == ptr[j] || k > order[t - 1]),
                  op, ": col_order[", t, "] = ", k, " is not the next block of block column ", j);
    }
  }
}

// A per-row or per-segment argument: `dtype` [size], contiguous, on y's device.
inline void check_segment_vector(const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t size,
                                 const at::Tensor& y) {
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 1 && t.size(0) == size, "expand_segments_: ", name,
              " must be a ", dtype, " tensor [", size, "], got ", t.scalar_type(), " with shape ", t.sizes());
  TORCH_CHECK(t.device() == y.device(), "expand_segments_: ", name, " is on ", t.device(), " but y is on ",
              y.device());
  TORCH_CHECK(t.is_contiguous(), "expand_segments_: ", name, " must be contiguous");
}

// y [M, out], h [M_g, r] (the rows of S segments, seg_ptr int32 [S + 1]), rows int64 [M_g]
// (rows of y), longest >= 0, the concatenated B of the segments (b_values, b_blocks),
// row_ptr int32 [S, n_rows + 1] and scaling float32 [S]; reads no values.
inline BlockLayout check_expand_segments(const at::Tensor& y, const at::Tensor& h, const at::Tensor& rows,
                                         const at::Tensor& seg_ptr, int64_t longest, const at::Tensor& b_values,
                                         const at::Tensor& b_blocks, const at::Tensor& row_ptr,
                                         const at::Tensor& scaling) {
  check_matrix("expand_segments_", "y", y);
  check_matrix("expand_segments_", "h", h);
  check_like("expand_segments_", "h", h, "y", y);
  const BlockLayout layout = check_b("expand_segments_", b_values, b_blocks, y.size(1), h.size(1), "y", y);
  check_segment_vector("rows", rows, at::kLong, h.size(0), y);
  TORCH_CHECK(seg_ptr.dim() == 1 && seg_ptr.size(0) >= 1,
              "expand_segments_: seg_ptr must be an int32 tensor [S + 1], got shape ", seg_ptr.sizes());
  const int64_t segments = seg_ptr.size(0) - 1;
  check_segment_vector("seg_ptr", seg_ptr, at::kInt, segments + 1, y);
  check_segment_vector("scaling", scaling, at::kFloat, segments, y);
  TORCH_CHECK(row_ptr.scalar_type() == at::kInt && row_ptr.dim() == 2 && row_ptr.size(0) == segments &&
                  row_ptr.size(1) == layout.n_rows + 1,
              "expand_segments_: row_ptr must be an int32 tensor [", segments, ", ", layout.n_rows + 1,
              "] (segments, block rows + 1), got ", row_ptr.scalar_type(), " with shape ", row_ptr.sizes());
  TORCH_CHECK(row_ptr.device() == y.device(), "expand_segments_: row_ptr is on ", row_ptr.device(),
              " but y is on ", y.device());
  TORCH_CHECK(row_ptr.is_contiguous(), "expand_segments_: row_ptr must be contiguous");
  TORCH_CHECK(longest >= 0, "expand_segments_: longest must be >= 0, got ", longest);
  return layout;
}

}  // namespace lori
