// The A side of the LoRI layer on CUDA, A generated tile by tile into shared memory (never
// in global memory), the dropout mask regenerated where it is applied:
//   shrink           h = (x * D) @ A.T
//   shrink_backward  (g @ A) * D
// Plain CUDA-core tiled GEMMs (32 x 32 tiles, fp32 accumulation for bf16/fp16).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_common.cuh"
#include "generate_a.h"
#include "layer_checks.h"

namespace lori {
namespace {

struct RngArgs {
  uint64_t seed, dropout_seed;
  float bound, p32, scale;
  Dist dist;
  bool dropout;
};

// `p32` is the checked float32(dropout_p).
RngArgs rng_args(const char* op, int64_t seed, int64_t d_in, c10::string_view dist, float p32,
                 int64_t dropout_seed) {
  const ATile a = make_a_tile(d_in, 0, 1, 0, d_in, parse_dist(op, {dist.data(), dist.size()}));
  return RngArgs{static_cast<uint64_t>(seed), static_cast<uint64_t>(dropout_seed), a.bound, p32,
                 dropout_scale(p32), a.dist, p32 > 0.0f};
}

template <typename scalar_t>
__global__ void shrink_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ h, int64_t M,
                              int64_t K, int64_t r, RngArgs rng) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t xs[kTile][kTile + 1];
  __shared__ acc_t as[kTile][kTile + 1];
  const int row = threadIdx.x / 8, c0 = (threadIdx.x % 8) * 4;
  const int64_t m = tile_start(blockIdx.x) + row, j0 = tile_start(blockIdx.y);
  acc_t acc[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    bool keep[4] = {true, true, true, true};
    if (rng.dropout && m < M) {
      keep_flags(keep, rng.dropout_seed, rng.p32, K, m, k0 + c0);
    }
    for (int c = 0; c < 4; ++c) {
      const int64_t k = k0 + c0 + c;
      xs[row][c0 + c] = m < M && k < K && keep[c] ? static_cast<acc_t>(x[m * K + k]) : acc_t(0);
    }
    load_a_tile<scalar_t>(as, rng.seed, K, r, j0, k0, rng.bound, rng.dist);
    __syncthreads();
    for (int t = 0; t < kTile; ++t) {
      const acc_t xv = xs[row][t];
      for (int c = 0; c < 4; ++c) {
        acc[c] += xv * as[c0 + c][t];
      }
    }
    __syncthreads();
  }
  for (int c = 0; c < 4; ++c) {
    const int64_t j = j0 + c0 + c;
    if (m < M && j < r) {
      h[m * r + j] = static_cast<scalar_t>(rng.dropout ? acc[c] * rng.scale : acc[c]);
    }
  }
}

template <typename scalar_t>
__global__ void shrink_backward_kernel(scalar_t* __restrict__ dx, const scalar_t* __restrict__ g,
                                       int64_t M, int64_t K, int64_t r, RngArgs rng) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t gs[kTile][kTile + 1];
  __shared__ acc_t as[kTile][kTile + 1];
  const int row = threadIdx.x / 8, c0 = (threadIdx.x % 8) * 4;
  const int64_t m = tile_start(blockIdx.x) + row, k0 = tile_start(blockIdx.y);
  acc_t acc[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t j0 = 0; j0 < r; j0 += kTile) {
    for (int c = 0; c < 4; ++c) {
      const int64_t j = j0 + c0 + c;
      gs[row][c0 + c] = m < M && j < r ? static_cast<acc_t>(g[m * r + j]) : acc_t(0);
    }
    load_a_tile<scalar_t>(as, rng.seed, K, r, j0, k0, rng.bound, rng.dist);
    __syncthreads();
    for (int t = 0; t < kTile; ++t) {
      const acc_t gv = gs[row][t];
      for (int c = 0; c < 4; ++c) {
        acc[c] += gv * as[t][c0 + c];
      }
    }
    __syncthreads();
  }
  if (m >= M) {
    return;
  }
  bool keep[4] = {true, true, true, true};
  if (rng.dropout) {
    keep_flags(keep, rng.dropout_seed, rng.p32, K, m, k0 + c0);
  }
  for (int c = 0; c < 4; ++c) {
    const int64_t k = k0 + c0 + c;
    if (k < K) {
      dx[m * K + k] = static_cast<scalar_t>(keep[c] ? (rng.dropout ? acc[c] * rng.scale : acc[c]) : acc_t(0));
    }
  }
}

at::Tensor shrink_cuda(const at::Tensor& x, int64_t seed, int64_t r, c10::string_view dist,
                       double dropout_p, int64_t dropout_seed) {
  const float p32 = check_shrink(x, r, dropout_p);
  const RngArgs rng = rng_args("shrink", seed, x.size(1), dist, p32, dropout_seed);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor h = at::empty({x.size(0), r}, x.options());
  if (x.size(0) == 0) {
    return h;
  }
  const dim3 grid(ceil_div(x.size(0), kTile), ceil_div(r, kTile));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "shrink_cuda", [&] {
    shrink_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), x.size(0), x.size(1), r, rng);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return h;
}

at::Tensor shrink_backward_cuda(const at::Tensor& g, int64_t seed, int64_t d_in, c10::string_view dist,
                                double dropout_p, int64_t dropout_seed) {
  const float p32 = check_shrink_backward(g, d_in, dropout_p);
  const RngArgs rng = rng_args("shrink_backward", seed, d_in, dist, p32, dropout_seed);
  const c10::cuda::CUDAGuard guard(g.device());
  at::Tensor dx = at::empty({g.size(0), d_in}, g.options());
  if (g.size(0) == 0) {
    return dx;
  }
  const dim3 grid(ceil_div(g.size(0), kTile), ceil_div(d_in, kTile));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "shrink_backward_cuda", [&] {
    shrink_backward_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dx.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), g.size(0), d_in, g.size(1), rng);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(lori, CUDA, m) {
  m.impl("shrink", &shrink_cuda);
  m.impl("shrink_backward", &shrink_backward_cuda);
}

}  // namespace lori
