#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "generate_a.h"

namespace lori {

at::Tensor a_tile_cpu(uint64_t seed, const ATile& tile) {
  at::Tensor out = at::empty({tile.rows, tile.cols}, at::TensorOptions().dtype(at::kFloat));
  float* data = out.data_ptr<float>();
  const int64_t quads = tile.quads_per_row();
  at::parallel_for(0, tile.rows * quads, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      fill_a_quad(data, seed, tile, t / quads, t % quads);
    }
  });
  return out;
}

namespace {

at::Tensor generate_a_cpu(const at::Tensor& seed, int64_t d_in, int64_t row0, int64_t rows,
                          int64_t col0, int64_t cols, c10::string_view dist) {
  const ATile tile = check_generate_a_args(seed, d_in, row0, rows, col0, cols,
                                           std::string_view(dist.data(), dist.size()));
  return a_tile_cpu(static_cast<uint64_t>(seed.item<int64_t>()), tile);
}

}  // namespace

TORCH_LIBRARY_IMPL(lori, CPU, m) { m.impl("generate_a", &generate_a_cpu); }

}  // namespace lori
