// The schemas of every lori:: op, declared once; kernels register per device in
// *_cpu.cpp / *_cuda.cu with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

// Importing lori_kernels._C runs the static registrations below; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

// Seeds of the layer ops are the uint64 seeds in two's complement. B is the compact
// b_values [nnz, bo, br] at b_blocks int32 [nnz, 2] (sorted block row, block column).
TORCH_LIBRARY(lori, m) {
  // The float32 tile A[row0:row0+rows, col0:col0+cols] of A [*, d_in], on seed's device.
  m.def(
      "generate_a(Tensor seed, int d_in, int row0, int rows, int col0, int cols, str dist) "
      "-> Tensor");
  // h = (x * D) @ A.T  [M, r]
  m.def("shrink(Tensor x, int seed, int r, str dist, float dropout_p, int dropout_seed) -> Tensor");
  // dx += (g @ A) * D
  m.def(
      "shrink_backward_(Tensor(a!) dx, Tensor g, int seed, str dist, float dropout_p, "
      "int dropout_seed) -> ()");
  // y += scaling * h @ B.T over the kept blocks
  m.def("expand_(Tensor(a!) y, Tensor h, Tensor b_values, Tensor b_blocks, float scaling) -> ()");
  // g = scaling * dy @ B  [M, r]
  m.def("expand_backward(Tensor dy, Tensor b_values, Tensor b_blocks, int r, float scaling) -> Tensor");
  // db_values = scaling * dy.T @ h at the kept blocks  [nnz, bo, br]
  m.def("sddmm(Tensor dy, Tensor h, Tensor b_blocks, int bo, int br, float scaling) -> Tensor");
}
