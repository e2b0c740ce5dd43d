// The A side of the LoRI layer on the CPU: A [r, in] is generated once per call (LoRI-RNG,
// parallel) in the compute dtype and multiplied with the BLAS; the dropout mask is
// generated row by row (random_words_cpu), then applied.
//   shrink           h = (x * D) @ A.T
//   shrink_backward  (g @ A) * D
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "generate_a.h"
#include "layer_checks.h"
#include "philox_cpu.h"

namespace lori {
namespace {

at::Tensor a_matrix(int64_t seed, int64_t r, int64_t d_in, Dist dist, at::ScalarType dtype) {
  return a_tile_cpu(static_cast<uint64_t>(seed), make_a_tile(d_in, 0, r, 0, d_in, dist)).to(dtype);
}

// dst[m, k] = keep(m, k) ? src[m, k] * factor : 0 under the dropout mask of `seed`, in
// float32 arithmetic with one rounding to the output dtype (dst may be src).
void apply_dropout(const at::Tensor& src, at::Tensor& dst, uint64_t seed, float p32, float factor) {
  const int64_t rows = src.size(0), cols = src.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "apply_dropout", [&] {
    const scalar_t* in = src.data_ptr<scalar_t>();
    scalar_t* out = dst.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)),
                     [&](int64_t begin, int64_t end) {
      std::vector<uint32_t> words(cols);
      for (int64_t m = begin; m < end; ++m) {
        const scalar_t* in_row = in + m * cols;
        scalar_t* out_row = out + m * cols;
        random_words_cpu(seed, kStreamDropout, static_cast<uint64_t>(m) * cols, cols, words.data());
        for (int64_t c = 0; c < cols; ++c) {
          out_row[c] =
              static_cast<scalar_t>(word_keeps(words[c], p32) ? static_cast<float>(in_row[c]) * factor : 0.0f);
        }
      }
    });
  });
}

at::Tensor shrink_cpu(const at::Tensor& x, int64_t seed, int64_t r, c10::string_view dist,
                      double dropout_p, int64_t dropout_seed) {
  const float p32 = check_shrink(x, r, dropout_p);
  const at::Tensor a = a_matrix(seed, r, x.size(1), parse_dist("shrink", {dist.data(), dist.size()}),
                                x.scalar_type());
  if (p32 == 0.0f) {
    return at::mm(x, a.t());
  }
  at::Tensor kept = at::empty_like(x);
  apply_dropout(x, kept, static_cast<uint64_t>(dropout_seed), p32, 1.0f);
  return at::mm(kept, a.t()).mul_(dropout_scale(p32));
}

at::Tensor shrink_backward_cpu(const at::Tensor& g, int64_t seed, int64_t d_in, c10::string_view dist,
                               double dropout_p, int64_t dropout_seed) {
  const float p32 = check_shrink_backward(g, d_in, dropout_p);
  const at::Tensor a = a_matrix(seed, g.size(1), d_in, parse_dist("shrink_backward", {dist.data(), dist.size()}),
                                g.scalar_type());
  at::Tensor dx = at::mm(g, a);
  if (p32 != 0.0f) {
    apply_dropout(dx, dx, static_cast<uint64_t>(dropout_seed), p32, dropout_scale(p32));
  }
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(lori, CPU, m) {
  m.impl("shrink", &shrink_cpu);
  m.impl("shrink_backward", &shrink_backward_cpu);
}

}  // namespace lori
