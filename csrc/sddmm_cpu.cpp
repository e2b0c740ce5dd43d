// The gradient of B for its kept blocks only, on the CPU:
//   db_values[k] = s * dy[:, rows of block k].T @ h[:, columns of block k]
// one GEMM per kept block, reducing over all M rows (fp32 accumulation inside the BLAS);
// tiny blocks or a B kept at least half go through one dense GEMM and a gather
// (use_dense_b in sparse_b_cpu.h).
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "layer_checks.h"
#include "sparse_b_cpu.h"

namespace lori {
namespace {

at::Tensor sddmm_cpu(const at::Tensor& dy, const at::Tensor& h, const at::Tensor& b_blocks,
                     int64_t bo, int64_t br, double scaling) {
  const BlockLayout layout = check_sddmm(dy, h, b_blocks, bo, br);
  const int64_t out = dy.size(1), r = h.size(1);
  check_block_indices_cpu("sddmm", b_blocks, layout);
  if (layout.nnz > 0 && dy.size(0) > 0 && use_dense_b(layout, out, r)) {
    return gather_b(at::mm(dy.t(), h), b_blocks, layout).mul_(scaling);
  }
  at::Tensor db = at::zeros({layout.nnz, bo, br}, dy.options());
  if (layout.nnz == 0 || dy.size(0) == 0) {
    return db;
  }
  const int32_t* blocks = b_blocks.data_ptr<int32_t>();
  for (int64_t k = 0; k < layout.nnz; ++k) {
    const int64_t rows = real_rows(layout, blocks[2 * k], out);
    at::Tensor db_k = db[k].narrow(0, 0, rows);
    at::mm_out(db_k, dy.narrow(1, blocks[2 * k] * bo, rows).t(), h.narrow(1, blocks[2 * k + 1] * br, br));
  }
  return db.mul_(scaling);
}

}  // namespace

TORCH_LIBRARY_IMPL(lori, CPU, m) { m.impl("sddmm", &sddmm_cpu); }

}  // namespace lori
