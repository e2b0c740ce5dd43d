// Shared by the CUDA kernels of the fused layer: launch shapes, index clamping, the block-row
// product of the expand kernels and the A tile generator.
#pragma once

#include <cstdint>

#include <ATen/OpMathType.h>

#include "layer_checks.h"
#include "philox.h"

namespace lori {

constexpr int kTile = 32;      // output tile side, and the depth of one reduction step
constexpr int kThreads = 256;  // a tile's threads: 32 rows x 8 groups of 4 columns

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The first row (or column) of the tile of thread block `block` (a blockIdx component),
// in int64: the unsigned 32-bit product blockIdx.x * kTile wraps at 2^32 rows.
__device__ inline int64_t tile_start(unsigned int block) { return static_cast<int64_t>(block) * kTile; }

// An entry of a block or segment index, clamped to [0, hi]: a wrong index cannot make a
// kernel read outside the tensors it indexes.
__device__ inline int64_t clamp_index(int32_t t, int64_t hi) { return t < 0 ? 0 : (t > hi ? hi : t); }

// Output o of one block row of s * h @ B.T before scaling, for the row `h_row` of h: the sum
// over the kept blocks [start, end) of the block row of h_row's block column j . B_k[o, :],
// in the accumulation type (block columns out of range are skipped).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__device__ inline acc_t block_row_dot(const scalar_t* __restrict__ h_row, const scalar_t* __restrict__ b_values,
                                      const int32_t* __restrict__ b_blocks, int64_t start, int64_t end, int64_t o,
                                      const BlockLayout& layout) {
  acc_t acc = acc_t(0);
  for (int64_t k = start; k < end; ++k) {
    const int64_t j = b_blocks[2 * k + 1];
    if (j < 0 || j >= layout.n_cols) {
      continue;
    }
    const scalar_t* hb = h_row + j * layout.br;
    const scalar_t* b = b_values + (k * layout.bo + o) * layout.br;
    for (int64_t c = 0; c < layout.br; ++c) {
      acc += static_cast<acc_t>(hb[c]) * static_cast<acc_t>(b[c]);
    }
  }
  return acc;
}

// Fills as[jj][kk] = A[j0 + jj, k0 + kk] of A [r, d_in] (0 outside), rounded through the
// compute dtype as every backend uses A. Thread t generates row t / 8, columns 4 (t % 8)
// to 4 (t % 8) + 3: one or two Philox calls.
template <typename scalar_t, typename acc_t>
__device__ void load_a_tile(acc_t (&as)[kTile][kTile + 1], uint64_t seed, int64_t d_in, int64_t r,
                            int64_t j0, int64_t k0, float bound, Dist dist) {
  const int row = threadIdx.x / 8, c0 = (threadIdx.x % 8) * 4;
  for (int c = 0; c < 4; ++c) {
    as[row][c0 + c] = acc_t(0);
  }
  const int64_t j = j0 + row, k = k0 + c0;
  if (j < r && k < d_in) {
    const int64_t count = d_in - k < 4 ? d_in - k : 4;
    for_each_word(seed, kStreamA, static_cast<uint64_t>(j) * d_in + k, count, [&](int64_t c, uint32_t w) {
      as[row][c0 + c] = static_cast<acc_t>(static_cast<scalar_t>(word_to_a(w, bound, dist)));
    });
  }
}

// Keep flags of x[m, k .. k+3] (x viewed as [M, d_in]) under the dropout mask of `seed`;
// columns past d_in are not kept.
__device__ inline void keep_flags(bool (&keep)[4], uint64_t seed, float p32, int64_t d_in, int64_t m,
                                  int64_t k) {
  for (int c = 0; c < 4; ++c) {
    keep[c] = false;
  }
  if (k < d_in) {
    const int64_t count = d_in - k < 4 ? d_in - k : 4;
    for_each_word(seed, kStreamDropout, static_cast<uint64_t>(m) * d_in + k, count,
                  [&](int64_t c, uint32_t w) { keep[c] = word_keeps(w, p32); });
  }
}

}  // namespace lori
