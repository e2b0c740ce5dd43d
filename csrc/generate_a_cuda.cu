#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "generate_a.h"

namespace lori {
namespace {

__global__ void generate_a_kernel(float* __restrict__ out, const int64_t* __restrict__ seed,
                                  ATile tile, int64_t total) {
  const uint64_t s = static_cast<uint64_t>(*seed);
  const int64_t quads = tile.quads_per_row();
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    fill_a_quad(out, s, tile, t / quads, t % quads);
  }
}

at::Tensor generate_a_cuda(const at::Tensor& seed, int64_t d_in, int64_t row0, int64_t rows,
                           int64_t col0, int64_t cols, c10::string_view dist) {
  const ATile tile =
      check_generate_a_args(seed, d_in, row0, rows, col0, cols, std::string_view(dist.data(), dist.size()));
  const c10::cuda::CUDAGuard guard(seed.device());
  at::Tensor out = at::empty({rows, cols}, seed.options().dtype(at::kFloat));
  const int64_t total = rows * tile.quads_per_row();
  if (total == 0 || cols == 0) {
    return out;
  }
  constexpr int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535);
  generate_a_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), seed.data_ptr<int64_t>(), tile, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lori, CUDA, m) { m.impl("generate_a", &generate_a_cuda); }

}  // namespace lori
