// The B side of a mixed-adapter batch (lori_linear_multi) on CUDA, every segment in one launch:
//   expand_segments_  y[rows[i]] += scaling[s] * h[i] @ B_s.T   for the rows i of each segment s
// A thread block per (32 rows of segment s, block row of B_s, segment s); one thread per output
// element, fp32 accumulation for bf16/fp16, over the blocks row_ptr[s] of the concatenated B.
// `longest` (the largest segment, known on the host) sizes the grid. Indices are not read on the
// host (that would need a sync): entries of seg_ptr and row_ptr are clamped, and rows of y and
// block columns out of range are skipped, so a wrong index cannot make the kernel read or write
// outside its tensors.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda_common.cuh"
#include "layer_checks.h"

namespace lori {
namespace {

constexpr int64_t kMaxGridYZ = 65535;  // the largest gridDim.y and gridDim.z

template <typename scalar_t>
__global__ void expand_segments_kernel(scalar_t* __restrict__ y, const scalar_t* __restrict__ h,
                                       const int64_t* __restrict__ rows, const int32_t* __restrict__ seg_ptr,
                                       const scalar_t* __restrict__ b_values, const int32_t* __restrict__ b_blocks,
                                       const int32_t* __restrict__ row_ptr, const float* __restrict__ scaling,
                                       int64_t M, int64_t m_g, int64_t out, int64_t r, BlockLayout layout) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = blockIdx.y, s = blockIdx.z;
  const int32_t* p = row_ptr + s * (layout.n_rows + 1);
  const int64_t start = clamp_index(p[i], layout.nnz), end = clamp_index(p[i + 1], layout.nnz);
  const int64_t m0 = clamp_index(seg_ptr[s], m_g) + tile_start(blockIdx.x), seg_end = clamp_index(seg_ptr[s + 1], m_g);
  if (start >= end || m0 >= seg_end) {
    return;
  }
  const int64_t outputs = out - i * layout.bo < layout.bo ? out - i * layout.bo : layout.bo;
  const acc_t scale = static_cast<acc_t>(scaling[s]);
  for (int64_t e = threadIdx.x; e < kTile * outputs; e += blockDim.x) {
    const int64_t m = m0 + e / outputs, o = e % outputs;
    const int64_t dest = m < seg_end ? rows[m] : -1;
    if (dest < 0 || dest >= M) {
      continue;
    }
    const acc_t acc = block_row_dot(h + m * r, b_values, b_blocks, start, end, o, layout);
    scalar_t& target = y[dest * out + i * layout.bo + o];
    target = static_cast<scalar_t>(static_cast<acc_t>(target) + scale * acc);
  }
}

void expand_segments_cuda(at::Tensor& y, const at::Tensor& h, const at::Tensor& rows, const at::Tensor& seg_ptr,
                          int64_t longest, const at::Tensor& b_values, const at::Tensor& b_blocks,
                          const at::Tensor& row_ptr, const at::Tensor& scaling) {
  const BlockLayout layout = check_expand_segments(y, h, rows, seg_ptr, longest, b_values, b_blocks, row_ptr, scaling);
  const int64_t segments = seg_ptr.size(0) - 1;
  TORCH_CHECK(segments <= kMaxGridYZ && layout.n_rows <= kMaxGridYZ, "expand_segments_: ", segments,
              " segments of B with ", layout.n_rows, " block rows is too many for one launch (at most ",
              kMaxGridYZ, " of each)");
  if (longest == 0 || segments == 0 || layout.nnz == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(y.device());
  const dim3 grid(ceil_div(longest, kTile), layout.n_rows, segments);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "expand_segments_cuda", [&] {
    expand_segments_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        y.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(), seg_ptr.data_ptr<int32_t>(),
        b_values.data_ptr<scalar_t>(), b_blocks.data_ptr<int32_t>(), row_ptr.data_ptr<int32_t>(),
        scaling.data_ptr<float>(), y.size(0), h.size(0), y.size(1), h.size(1), layout);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(lori, CUDA, m) { m.impl("expand_segments_", &expand_segments_cuda); }

}  // namespace lori
