// generate_a: the float32 tile A[row0:row0+rows, col0:col0+cols] of the frozen LoRI A
// [*, d_in], shared by the CPU (generate_a_cpu.cpp) and CUDA (generate_a_cuda.cu) kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <string_view>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "philox.h"

namespace lori {

struct ATile {
  int64_t d_in, row0, rows, col0, cols;
  Dist dist;
  float bound;
  // Quads (groups of four flat indices) a row of `cols` elements can touch.
  LORI_HD int64_t quads_per_row() const { return (cols + 3) / 4 + 1; }
};

inline Dist parse_dist(const char* op, std::string_view dist) {
  TORCH_CHECK(dist == "uniform" || dist == "rademacher", op,
              ": dist must be \"uniform\" or \"rademacher\", got \"", dist, "\"");
  return dist == "uniform" ? Dist::kUniform : Dist::kRademacher;
}

// The tile of A [*, d_in] at (row0, col0), with PyTorch's kaiming bound float32(1/sqrt(d_in)).
inline ATile make_a_tile(int64_t d_in, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                         Dist dist) {
  const float bound = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d_in)));
  return ATile{d_in, row0, rows, col0, cols, dist, bound};
}

inline ATile check_generate_a_args(const at::Tensor& seed, int64_t d_in, int64_t row0,
                                   int64_t rows, int64_t col0, int64_t cols,
                                   std::string_view dist) {
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "generate_a: seed must be a one-element int64 tensor, got ", seed.scalar_type(),
              " with ", seed.numel(), " elements");
  TORCH_CHECK(d_in > 0, "generate_a: d_in must be positive, got ", d_in);
  TORCH_CHECK(row0 >= 0 && rows >= 0, "generate_a: rows must be a non-negative range, got row0=",
              row0, " rows=", rows);
  TORCH_CHECK(col0 >= 0 && cols >= 0 && col0 + cols <= d_in,
              "generate_a: columns [", col0, ", ", col0 + cols, ") do not fit d_in=", d_in);
  return make_a_tile(d_in, row0, rows, col0, cols, parse_dist("generate_a", dist));
}

// float32 tile of A on the CPU (generate_a_cpu.cpp), parallel over the tile.
at::Tensor a_tile_cpu(uint64_t seed, const ATile& tile);

// Writes the (up to four) elements of row `j` of the tile that quad number `qi` of that
// row covers; `out` is the row-major float32 tile.
LORI_HD void fill_a_quad(float* out, uint64_t seed, const ATile& t, int64_t j, int64_t qi) {
  const uint64_t start = static_cast<uint64_t>(t.row0 + j) * static_cast<uint64_t>(t.d_in) +
                         static_cast<uint64_t>(t.col0);
  const uint64_t q = start / 4 + static_cast<uint64_t>(qi);
  const Words4 words = random_quad(seed, kStreamA, q);
  for (int lane = 0; lane < 4; ++lane) {
    const uint64_t i = 4 * q + lane;
    if (i >= start && i < start + static_cast<uint64_t>(t.cols)) {
      out[j * t.cols + static_cast<int64_t>(i - start)] = word_to_a(words.w[lane], t.bound, t.dist);
    }
  }
}

}  // namespace lori
