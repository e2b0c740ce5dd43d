// LoRI-RNG v1 words on the CPU, many Philox calls at once: the CPU kernels' generator of A
// (generate_a_cpu.cpp) and of dropout masks (shrink_cpu.cpp). The same words as philox.h's
// for_each_word, which makes one Philox call at a time; here kQuads consecutive calls run
// side by side, so that the compiler puts them in vector lanes.
#pragma once

#include <algorithm>
#include <cstdint>

#include "philox.h"

namespace lori {

constexpr int64_t kQuads = 32;  // Philox calls side by side: 128 words

// out[c] = the word of `stream` under `seed` at flat index start + c, for c in [0, count).
inline void random_words_cpu(uint64_t seed, uint32_t stream, uint64_t start, int64_t count, uint32_t* out) {
  const uint64_t q0 = start / 4;
  const int64_t skip = static_cast<int64_t>(start % 4);  // words of the first quad before `start`
  for (int64_t first = 0; 4 * first - skip < count; first += kQuads) {
    uint32_t words[4 * kQuads];  // word `lane` of call i at 4 * i + lane
    const uint64_t base = q0 + static_cast<uint64_t>(first);
    const uint32_t lo = static_cast<uint32_t>(base), hi = static_cast<uint32_t>(base >> 32);
    for (int64_t i = 0; i < kQuads; ++i) {  // the calls side by side: vector lanes
      const uint32_t x0_ = lo + static_cast<uint32_t>(i);
      uint32_t x0 = x0_, x1 = hi + (x0_ < lo ? 1u : 0u), x2 = stream, x3 = 0u;
      uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
      for (int round = 0; round < 10; ++round) {
        if (round > 0) {
          k0 += 0x9E3779B9u;
          k1 += 0xBB67AE85u;
        }
        const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * x0;
        const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * x2;
        x0 = static_cast<uint32_t>(p1 >> 32) ^ x1 ^ k0;
        x2 = static_cast<uint32_t>(p0 >> 32) ^ x3 ^ k1;
        x1 = static_cast<uint32_t>(p1);
        x3 = static_cast<uint32_t>(p0);
      }
      words[4 * i] = x0;
      words[4 * i + 1] = x1;
      words[4 * i + 2] = x2;
      words[4 * i + 3] = x3;
    }
    const int64_t from = std::max<int64_t>(0, skip - 4 * first);  // the first word of this batch to keep
    const int64_t to = std::min<int64_t>(4 * kQuads, count + skip - 4 * first);
    std::copy(words + from, words + to, out + 4 * first + from - skip);
  }
}

}  // namespace lori
