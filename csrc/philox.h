// LoRI-RNG v1 (docs/RNG_SPEC.md): Philox4x32-10 and the conversion of its words to A
// values and dropout decisions. One header for the C++ CPU kernels and the CUDA kernels,
// so every compiled backend runs the same arithmetic.
//
// Floating point here must be exact as written: host code is compiled with
// -ffp-contract=off, and device code uses the __*_rn intrinsics, which nvcc never
// contracts into an FMA.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LORI_HD __host__ __device__ __forceinline__
#else
#define LORI_HD inline
#endif

namespace lori {

constexpr uint32_t kStreamA = 0;
constexpr uint32_t kStreamDropout = 1;

enum class Dist : int64_t { kUniform = 0, kRademacher = 1 };

struct Words4 {
  uint32_t w[4];
};

LORI_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

LORI_HD Words4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                             uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, c0, hi0, lo0);
    mulhilo32(0xCD9E8D57u, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Words4{{c0, c1, c2, c3}};
}

// The four words of flat indices 4q .. 4q+3 of `stream` under `seed`.
LORI_HD Words4 random_quad(uint64_t seed, uint32_t stream, uint64_t q) {
  return philox4x32_10(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), stream, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// u = float32(w >> 8) * 2^-24, in [0, 1), exact.
LORI_HD float word_to_uniform(uint32_t w) {
  return static_cast<float>(w >> 8) * 5.9604644775390625e-08f;
}

// One value of A: (2u - 1) * bound for "uniform" (2u - 1 exact, one rounding in the
// product), +-bound for "rademacher" (sign from the top bit).
LORI_HD float word_to_a(uint32_t w, float bound, Dist dist) {
  if (dist == Dist::kRademacher) {
    return (w >> 31) == 0u ? bound : -bound;
  }
  const float u = word_to_uniform(w);
#if defined(__CUDA_ARCH__)
  return __fmul_rn(__fsub_rn(__fmul_rn(2.0f, u), 1.0f), bound);
#else
  return (2.0f * u - 1.0f) * bound;
#endif
}

// Dropout: element kept iff u >= float32(p), compared in float32.
LORI_HD bool word_keeps(uint32_t w, float p32) { return word_to_uniform(w) >= p32; }

// Calls f(c, word) for c in [0, count): the words of `stream` at flat indices start + c,
// one Philox call per four consecutive indices.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable  // f may be device-only when called from device code
#endif
template <typename F>
LORI_HD void for_each_word(uint64_t seed, uint32_t stream, uint64_t start, int64_t count, F&& f) {
  uint64_t q = start / 4;
  int lane = static_cast<int>(start % 4);
  for (int64_t c = 0; c < count; ++q, lane = 0) {
    const Words4 words = random_quad(seed, stream, q);
    for (; lane < 4 && c < count; ++lane, ++c) {
      f(c, words.w[lane]);
    }
  }
}

}  // namespace lori
