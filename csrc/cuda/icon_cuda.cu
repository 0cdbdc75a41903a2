// ICON penalty on the GPU (docs/conventions.md §2): mean((x - φ_AB(φ_BA(x)))²) + mean((x - φ_BA(φ_AB(x)))²).
// Forward: one thread per (batch entry, point) evaluates both compositions; per-block partial
// sums (double) reduced in a fixed order. Backward: one launch per composition (each with its
// own stash, so that only one is live in registers), noise regenerated from the seed.
#include <torch/library.h>

#include "../op_entries.h"
#include "cuda_common.cuh"

namespace gradicon_fast::cuda {
namespace {

template <typename T, int D>
__device__ __forceinline__ double squared_error(const T (&x)[D], const T (&y)[1][D]) {
  double s = 0.0;
#pragma unroll
  for (int k = 0; k < D; ++k) {
    const T e = x[k] - y[0][k];
    s += static_cast<double>(e * e);
  }
  return s;
}

template <typename T, int D, typename S>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const __grid_constant__ ChainRef<T, D, S> ab_ba, const __grid_constant__ ChainRef<T, D, S> ba_ab,
                   const __grid_constant__ PenaltyPoints<T, D> pts, int64_t batch, double* __restrict__ partial) {
  const int64_t n = pts.num_points;
  double sum = 0.0;
  for (int64_t q = global_thread(); q < batch * n; q += grid_threads()) {
    const int64_t b = q / n, p = q - b * n;
    T x[D];
    penalty_point(pts, p, x);
    T y1[1][D], y2[1][D];
#pragma unroll
    for (int k = 0; k < D; ++k) y1[0][k] = y2[0][k] = x[k];
    chain_forward<T, D, 1>(ab_ba, b, y1, nullptr);
    chain_forward<T, D, 1>(ba_ab, b, y2, nullptr);
    sum += squared_error(x, y1) + squared_error(x, y2);
  }
  write_block_partial(partial, sum);
}

// Reverse pass of one composition: `chain` runs the forward, `reverse` (cut after the last field
// that needs a gradient) the reverse pass.
template <typename T, int D, typename S>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const __grid_constant__ ChainRef<T, D, S> chain, const __grid_constant__ ChainRef<T, D, S> reverse,
                    uint32_t aggregate, const __grid_constant__ PenaltyPoints<T, D> pts, int64_t batch,
                    const T* __restrict__ grad_loss) {
  const int64_t n = pts.num_points;
  const T scale = T(2) * *grad_loss / static_cast<T>(batch * D * n);
  AtomicAdd<T> add{aggregate};
  for (int64_t q = global_thread(); q < batch * n; q += grid_threads()) {
    const int64_t b = q / n, p = q - b * n;
    T x[D];
    penalty_point(pts, p, x);
    T y[1][D], stash[kMaxComposed][1][D];
#pragma unroll
    for (int k = 0; k < D; ++k) y[0][k] = x[k];
    chain_forward<T, D, 1>(chain, b, y, stash);
    T a[1][D];
#pragma unroll
    for (int k = 0; k < D; ++k) a[0][k] = -scale * (x[k] - y[0][k]);
    chain_backward<T, D, 1>(reverse, b, stash, a, false, add);
  }
}

struct Kernels {
  static constexpr c10::DeviceType kDevice = at::kCUDA;

  static at::Tensor loss(const PairArgs& args) {
    const auto ba_ab = concatenated(args.ba, args.ab);
    return penalty_mean(args, [&](int blocks, double* partial, cudaStream_t stream) {
      GF_CUDA_DISPATCH(args.fields[0].scalar_type(), "icon_loss_cuda", [&] {
        using T = compute_t<scalar_t>;
        dispatch_dims(args.d, [&](auto dims) {
          constexpr int D = decltype(dims)::value;
          forward_kernel<T, D, scalar_t><<<blocks, kThreads, 0, stream>>>(
              chain_ref<T, D, scalar_t>(args.fields, args.batch), chain_ref<T, D, scalar_t>(ba_ab, args.batch),
              args.points<T, D>(), args.batch, partial);
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> loss_backward(
      const PairArgs& args, const at::Tensor& grad, const std::vector<bool>& needs_ab,
      const std::vector<bool>& needs_ba) {
    const c10::cuda::CUDAGuard guard(args.fields[0].device());
    const auto grad_ab = gradient_buffers(args.ab, needs_ab), grad_ba = gradient_buffers(args.ba, needs_ba);
    const int64_t work = args.batch * args.num_points;
    if (work == 0) return {grad_ab, grad_ba};
    const at::Tensor grad_loss = loss_gradient(grad, args.fields[0]);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    // The two compositions: φ_AB∘φ_BA (AB's fields outermost) and φ_BA∘φ_AB.
    for (int direction = 0; direction < 2; ++direction) {
      const auto& outer = direction == 0 ? args.ab : args.ba;
      const auto& inner = direction == 0 ? args.ba : args.ab;
      const auto fields = concatenated(outer, inner);
      const auto grads = concatenated(direction == 0 ? grad_ab : grad_ba, direction == 0 ? grad_ba : grad_ab);
      std::vector<bool> needs(direction == 0 ? needs_ab : needs_ba);
      for (bool m : (direction == 0 ? needs_ba : needs_ab)) needs.push_back(m);
      const int reverse_count = backward_count(needs, false);
      if (reverse_count == 0) continue;
      const uint32_t aggregate = aggregation_mask(fields, args.count.back());
      GF_CUDA_DISPATCH(args.fields[0].scalar_type(), "icon_loss_backward_cuda", [&] {
        using T = compute_t<scalar_t>;
        dispatch_dims(args.d, [&](auto dims) {
          constexpr int D = decltype(dims)::value;
          backward_kernel<T, D, scalar_t><<<blocks_for(work), kThreads, 0, stream>>>(
              chain_ref<T, D, scalar_t>(fields, grads, args.batch),
              chain_ref<T, D, scalar_t>(fields, grads, args.batch, reverse_count), aggregate, args.points<T, D>(),
              args.batch, grad_loss.data_ptr<T>());
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    return {grad_ab, grad_ba};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(gradicon_fast, CUDA, m) {
  m.impl("icon_loss", &entry::icon_loss<Kernels>);
  m.impl("icon_loss_backward", &entry::icon_loss_backward<Kernels>);
}

}  // namespace gradicon_fast::cuda
