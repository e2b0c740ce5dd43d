// The schemas of every lori:: op, declared once; kernels register per device in
// *_cpu.cpp / *_cuda.cu with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

// Importing lori_kernels._C runs the static registrations below; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(lori, m) {
  m.def(
      "generate_a(Tensor seed, int d_in, int row0, int rows, int col0, int cols, str dist) "
      "-> Tensor");
}
