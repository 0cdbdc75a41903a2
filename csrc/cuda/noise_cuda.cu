// The penalties' seeded noise, materialised on the GPU (philox.h): the same numbers as the CPU op
// and as the in-kernel draws of the penalties (to float rounding of log/sin/cos).
#include <torch/library.h>

#include "../philox.h"
#include "cuda_common.cuh"

namespace gradicon_fast::cuda {
namespace {

template <typename S>
__global__ void __launch_bounds__(kThreads) normal_noise_kernel(S* out, int64_t n, int d, uint64_t seed) {
  for (int64_t p = global_thread(); p < n; p += grid_threads()) {
    float z[4];
    normal4(seed, static_cast<uint64_t>(p), z);
    for (int k = 0; k < d; ++k) out[k * n + p] = store_as<S>(z[k]);
  }
}

void normal_noise_cuda(at::Tensor& out, int64_t seed) {
  check_noise_output(out, at::kCUDA);
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t d = out.size(1), n = out.numel() / d;
  if (n == 0) return;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  GF_CUDA_DISPATCH(out.scalar_type(), "normal_noise_cuda", [&] {
    normal_noise_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(out.data_ptr<scalar_t>(), n,
                                                                         static_cast<int>(d),
                                                                         static_cast<uint64_t>(seed));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(gradicon_fast, CUDA, m) { m.impl("normal_noise_", &normal_noise_cuda); }

}  // namespace gradicon_fast::cuda
