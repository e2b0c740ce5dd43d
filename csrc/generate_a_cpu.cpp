#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "generate_a.h"
#include "philox_cpu.h"

namespace lori {

at::Tensor a_tile_cpu(uint64_t seed, const ATile& tile) {
  at::Tensor out = at::empty({tile.rows, tile.cols}, at::TensorOptions().dtype(at::kFloat));
  float* data = out.data_ptr<float>();
  const int64_t rows_per_task = std::max<int64_t>(1, 8192 / std::max<int64_t>(tile.cols, 1));
  at::parallel_for(0, tile.rows, rows_per_task, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> words(tile.cols);
    for (int64_t j = begin; j < end; ++j) {
      const uint64_t start = static_cast<uint64_t>(tile.row0 + j) * static_cast<uint64_t>(tile.d_in) +
                             static_cast<uint64_t>(tile.col0);
      random_words_cpu(seed, kStreamA, start, tile.cols, words.data());
      float* row = data + j * tile.cols;
      for (int64_t c = 0; c < tile.cols; ++c) {
        row[c] = word_to_a(words[c], tile.bound, tile.dist);
      }
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
