// The gradient of B for its kept blocks only, on CUDA:
//   db_values[k] = s * dy[:, rows of block k].T @ h[:, columns of block k]
// A thread block per (kept block, slice of M), a thread per element of the block; the
// slices' fp32 partial sums are added by torch (deterministic, no atomics).
#include <algorithm>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_common.cuh"
#include "layer_checks.h"

namespace lori {
namespace {

template <typename scalar_t>
__global__ void sddmm_kernel(at::opmath_type<scalar_t>* __restrict__ partial,
                             const scalar_t* __restrict__ dy, const scalar_t* __restrict__ h,
                             const int32_t* __restrict__ b_blocks, int64_t M, int64_t out, int64_t r,
                             BlockLayout layout, int64_t rows_per_split) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t k = blockIdx.x, split = blockIdx.y;
  const int64_t i = b_blocks[2 * k], j = b_blocks[2 * k + 1];
  const bool valid = i >= 0 && i < layout.n_rows && j >= 0 && j < layout.n_cols;
  const int64_t rows = valid ? (out - i * layout.bo < layout.bo ? out - i * layout.bo : layout.bo) : 0;
  const int64_t m_begin = split * rows_per_split;
  const int64_t m_end = m_begin + rows_per_split < M ? m_begin + rows_per_split : M;
  for (int64_t e = threadIdx.x; e < layout.bo * layout.br; e += blockDim.x) {
    const int64_t o = e / layout.br, c = e % layout.br;
    acc_t acc = acc_t(0);
    if (o < rows) {
      for (int64_t m = m_begin; m < m_end; ++m) {
        acc += static_cast<acc_t>(dy[m * out + i * layout.bo + o]) *
               static_cast<acc_t>(h[m * r + j * layout.br + c]);
      }
    }
    partial[(split * layout.nnz + k) * layout.bo * layout.br + e] = acc;
  }
}

at::Tensor sddmm_cuda(const at::Tensor& dy, const at::Tensor& h, const at::Tensor& b_blocks, int64_t bo,
                      int64_t br, double scaling) {
  const BlockLayout layout = check_sddmm(dy, h, b_blocks, bo, br);
  const int64_t M = dy.size(0), out = dy.size(1), r = h.size(1);
  const c10::cuda::CUDAGuard guard(dy.device());
  if (layout.nnz == 0 || M == 0) {
    return at::zeros({layout.nnz, bo, br}, dy.options());
  }
  // Enough thread blocks to fill the GPU twice, each reducing at least 256 rows.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dy.get_device()));
  const int64_t splits = std::max<int64_t>(1, std::min(ceil_div(2 * int64_t{sms}, layout.nnz), ceil_div(M, 256)));
  const int64_t rows_per_split = ceil_div(M, splits);
  const at::ScalarType acc_type = at::toOpMathType(dy.scalar_type());
  at::Tensor partial = at::empty({splits, layout.nnz, bo, br}, dy.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "sddmm_cuda", [&] {
    sddmm_kernel<scalar_t><<<dim3(layout.nnz, splits), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        partial.data_ptr<at::opmath_type<scalar_t>>(), dy.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
        b_blocks.data_ptr<int32_t>(), M, out, r, layout, rows_per_split);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial.sum(0).mul_(scaling).to(dy.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(lori, CUDA, m) { m.impl("sddmm", &sddmm_cuda); }

}  // namespace lori
