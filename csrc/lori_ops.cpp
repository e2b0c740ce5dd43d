// The schemas of every lori:: op, declared once; kernels register per device in
// *_cpu.cpp / *_cuda.cu with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

// Importing lori_kernels._C runs the static registrations below; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

// Seeds of the layer ops are the uint64 seeds in two's complement. B is the compact
// b_values [nnz, bo, br] at b_blocks int32 [nnz, 2] (sorted block row, block column). The
// expand ops walk B through its index, built once per b_blocks and cached by the caller
// (lori_kernels/block_index.py), all int32: row_ptr [n_rows + 1] (the blocks of block row i
// are row_ptr[i]:row_ptr[i+1]), col_ptr [n_cols + 1] and col_order [nnz] (those of block
// column j are col_order[col_ptr[j]:col_ptr[j+1]], in block row order).
TORCH_LIBRARY(lori, m) {
  // The float32 tile A[row0:row0+rows, col0:col0+cols] of A [*, d_in], on seed's device.
  m.def(
      "generate_a(Tensor seed, int d_in, int row0, int rows, int col0, int cols, str dist) "
      "-> Tensor");
  // h = (x * D) @ A.T  [M, r]
  m.def("shrink(Tensor x, int seed, int r, str dist, float dropout_p, int dropout_seed) -> Tensor");
  // (g @ A) * D  [M, d_in]: the adapter's part of dx (the fused layer adds dy @ W to it)
  m.def("shrink_backward(Tensor g, int seed, int d_in, str dist, float dropout_p, int dropout_seed) -> Tensor");
  // y += scaling * h @ B.T over the kept blocks
  m.def(
      "expand_(Tensor(a!) y, Tensor h, Tensor b_values, Tensor b_blocks, Tensor row_ptr, float scaling) "
      "-> ()");
  // y[rows[i]] += scaling[s] * h[i] @ B_s.T for the rows i of each segment s (seg_ptr int32 [S + 1]
  // into h; rows int64, distinct rows of y; longest: the largest segment's row count), B_s the
  // blocks row_ptr[s] (int32 [S, n_rows + 1]) of the concatenated b_values / b_blocks; scaling
  // float32 [S]. The mixed-adapter batches of lori_kernels/multi.py.
  m.def(
      "expand_segments_(Tensor(a!) y, Tensor h, Tensor rows, Tensor seg_ptr, int longest, Tensor b_values, "
      "Tensor b_blocks, Tensor row_ptr, Tensor scaling) -> ()");
  // g = scaling * dy @ B  [M, r]
  m.def(
      "expand_backward(Tensor dy, Tensor b_values, Tensor b_blocks, Tensor col_ptr, Tensor col_order, int r, "
      "float scaling) -> Tensor");
  // db_values = scaling * dy.T @ h at the kept blocks  [nnz, bo, br]
  m.def("sddmm(Tensor dy, Tensor h, Tensor b_blocks, int bo, int br, float scaling) -> Tensor");
}

// The ops are kernels of the fused layer, which differentiates itself (lori_kernels/fused.py):
// they have no derivatives, and backpropagating through one raises an error naming it.
TORCH_LIBRARY_IMPL(lori, Autograd, m) {
  for (const char* op : {"generate_a", "shrink", "shrink_backward", "expand_", "expand_segments_", "expand_backward",
                         "sddmm"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}

TORCH_LIBRARY_IMPL(lori, ADInplaceOrView, m) {
  for (const char* op : {"expand_", "expand_segments_"}) {
    m.impl(op, torch::autograd::autogradNotImplementedInplaceOrViewFallback());
  }
}
