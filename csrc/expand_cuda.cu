// The B side of the LoRI layer on CUDA, touching only B's kept blocks:
//   expand_          y += s * h @ B.T   a thread block per (32 rows of y, block row of B)
//   expand_backward  g  = s * dy @ B    a thread block per (32 rows of g, block column of B)
// One thread per output element, fp32 accumulation for bf16/fp16. The blocks of a row or
// column come from the index of b_blocks passed in (row_ptr; col_ptr and col_order), built
// and cached by the caller. Block indices out of range are skipped (the caller validates
// b_blocks and builds the index from it; reading them here would need a sync).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_common.cuh"
#include "layer_checks.h"

namespace lori {
namespace {

template <typename scalar_t>
__global__ void expand_kernel(scalar_t* __restrict__ y, const scalar_t* __restrict__ h,
                              const scalar_t* __restrict__ b_values, const int32_t* __restrict__ b_blocks,
                              const int32_t* __restrict__ row_ptr, int64_t M, int64_t out, int64_t r,
                              BlockLayout layout, float scaling) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = blockIdx.y;
  const int64_t start = clamp_index(row_ptr[i], layout.nnz), end = clamp_index(row_ptr[i + 1], layout.nnz);
  const int64_t rows = out - i * layout.bo < layout.bo ? out - i * layout.bo : layout.bo;
  for (int64_t e = threadIdx.x; e < kTile * rows; e += blockDim.x) {
    const int64_t m = tile_start(blockIdx.x) + e / rows, o = e % rows;
    if (m >= M || start == end) {
      continue;
    }
    const acc_t acc = block_row_dot(h + m * r, b_values, b_blocks, start, end, o, layout);
    scalar_t& target = y[m * out + i * layout.bo + o];
    target = static_cast<scalar_t>(static_cast<acc_t>(target) + static_cast<acc_t>(scaling) * acc);
  }
}

template <typename scalar_t>
__global__ void expand_backward_kernel(scalar_t* __restrict__ g, const scalar_t* __restrict__ dy,
                                       const scalar_t* __restrict__ b_values,
                                       const int32_t* __restrict__ b_blocks,
                                       const int32_t* __restrict__ col_ptr,
                                       const int32_t* __restrict__ col_order, int64_t M, int64_t out,
                                       int64_t r, BlockLayout layout, float scaling) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t j = blockIdx.y;
  const int64_t start = clamp_index(col_ptr[j], layout.nnz), end = clamp_index(col_ptr[j + 1], layout.nnz);
  for (int64_t e = threadIdx.x; e < kTile * layout.br; e += blockDim.x) {
    const int64_t m = tile_start(blockIdx.x) + e / layout.br, c = e % layout.br;
    if (m >= M) {
      continue;
    }
    acc_t acc = acc_t(0);
    for (int64_t t = start; t < end; ++t) {
      const int64_t k = col_order[t];
      const int64_t i = k >= 0 && k < layout.nnz ? b_blocks[2 * k] : -1;
      if (i < 0 || i >= layout.n_rows) {
        continue;
      }
      const int64_t rows = out - i * layout.bo < layout.bo ? out - i * layout.bo : layout.bo;
      const scalar_t* d = dy + m * out + i * layout.bo;
      const scalar_t* b = b_values + k * layout.bo * layout.br + c;
      for (int64_t o = 0; o < rows; ++o) {
        acc += static_cast<acc_t>(d[o]) * static_cast<acc_t>(b[o * layout.br]);
      }
    }
    g[m * r + j * layout.br + c] = static_cast<scalar_t>(static_cast<acc_t>(scaling) * acc);
  }
}

void expand_cuda(at::Tensor& y, const at::Tensor& h, const at::Tensor& b_values,
                 const at::Tensor& b_blocks, const at::Tensor& row_ptr, double scaling) {
  const BlockLayout layout = check_expand(y, h, b_values, b_blocks, row_ptr);
  const int64_t out = y.size(1), r = h.size(1);
  if (layout.nnz == 0 || y.size(0) == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(y.device());
  const dim3 grid(ceil_div(y.size(0), kTile), layout.n_rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "expand_cuda", [&] {
    expand_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        y.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), b_values.data_ptr<scalar_t>(),
        b_blocks.data_ptr<int32_t>(), row_ptr.data_ptr<int32_t>(), y.size(0), out, r, layout,
        static_cast<float>(scaling));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor expand_backward_cuda(const at::Tensor& dy, const at::Tensor& b_values,
                                const at::Tensor& b_blocks, const at::Tensor& col_ptr,
                                const at::Tensor& col_order, int64_t r, double scaling) {
  const BlockLayout layout = check_expand_backward(dy, b_values, b_blocks, col_ptr, col_order, r);
  const int64_t out = dy.size(1);
  const c10::cuda::CUDAGuard guard(dy.device());
  at::Tensor g = at::empty({dy.size(0), r}, dy.options());
  if (dy.size(0) == 0) {
    return g;
  }
  const dim3 grid(ceil_div(dy.size(0), kTile), layout.n_cols);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "expand_backward_cuda", [&] {
    expand_backward_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), b_values.data_ptr<scalar_t>(),
        b_blocks.data_ptr<int32_t>(), col_ptr.data_ptr<int32_t>(), col_order.data_ptr<int32_t>(),
        dy.size(0), out, r, layout, static_cast<float>(scaling));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return g;
}

}  // namespace

TORCH_LIBRARY_IMPL(lori, CUDA, m) {
  m.impl("expand_", &expand_cuda);
  m.impl("expand_backward", &expand_backward_cuda);
}

}  // namespace lori
