// Analytic GradICON penalty on the GPU (docs/conventions.md §2): ‖J - I‖_F² with the exact chain-rule Jacobian of
// φ_AB∘φ_BA at the penalty's points (gradicon_analytic_point.h). One thread per (batch entry,
// point); the forward writes per-block partial sums (double) reduced in a fixed order; the
// backward regenerates the noise, recomputes the forward with its stash and scatters the field
// gradients with atomics (one per corner and channel, as jacobian_backward issues them).
#include <torch/library.h>

#include "../gradicon_analytic_point.h"
#include "../op_entries.h"
#include "cuda_common.cuh"

namespace gradicon_fast::cuda {
namespace {

template <typename T, int D, typename S>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const __grid_constant__ ChainRef<T, D, S> chain, const __grid_constant__ PenaltyPoints<T, D> pts,
                   int64_t batch, double* __restrict__ partial) {
  const int64_t n = pts.num_points;
  double sum = 0.0;
  for (int64_t q = global_thread(); q < batch * n; q += grid_threads()) {
    const int64_t b = q / n, p = q - b * n;
    T y[D], dev[D][D];
    penalty_point(pts, p, y);
    jacobian_forward<T, D>(chain, b, y, dev, nullptr, nullptr);
    sum += squared_deviation(dev);
  }
  write_block_partial(partial, sum);
}

// `chain` runs the forward; `reverse` (cut after the last field that needs a gradient) the
// reverse pass. grad_loss: the incoming gradient, one element on the device.
template <typename T, int D, typename S>
__global__ void __launch_bounds__(kThreads, kBackwardBlocksPerSM<T>)
    backward_kernel(const __grid_constant__ ChainRef<T, D, S> chain, const __grid_constant__ ChainRef<T, D, S> reverse,
                    const __grid_constant__ PenaltyPoints<T, D> pts, int64_t batch, const T* __restrict__ grad_loss) {
  const int64_t n = pts.num_points;
  const T scale = T(2) * *grad_loss / static_cast<T>(batch * D * n);
  AtomicAdd<T> add{0u};
  for (int64_t q = global_thread(); q < batch * n; q += grid_threads()) {
    const int64_t b = q / n, p = q - b * n;
    T y[D], dev[D][D];
    T stash_pos[kMaxComposed][D], stash_dev[kMaxComposed][D][D];
    penalty_point(pts, p, y);
    jacobian_forward<T, D>(chain, b, y, dev, stash_pos, stash_dev);
#pragma unroll
    for (int i = 0; i < D; ++i) {
#pragma unroll
      for (int k = 0; k < D; ++k) dev[i][k] *= scale;
    }
    jacobian_backward<T, D>(reverse, b, stash_pos, stash_dev, dev, add);
  }
}

struct Kernels {
  static constexpr c10::DeviceType kDevice = at::kCUDA;

  static at::Tensor loss(const PairArgs& args) {
    return penalty_mean(args, [&](int blocks, double* partial, cudaStream_t stream) {
      GF_CUDA_DISPATCH(args.fields[0].scalar_type(), "gradicon_analytic_loss_cuda", [&] {
        using T = compute_t<scalar_t>;
        dispatch_dims(args.d, [&](auto dims) {
          constexpr int D = decltype(dims)::value;
          forward_kernel<T, D, scalar_t><<<blocks, kThreads, 0, stream>>>(
              chain_ref<T, D, scalar_t>(args.fields, args.batch), args.points<T, D>(), args.batch, partial);
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static std::vector<at::Tensor> loss_backward(const PairArgs& args, const at::Tensor& grad,
                                               const std::vector<bool>& needs) {
    const c10::cuda::CUDAGuard guard(args.fields[0].device());
    const auto grads = gradient_buffers(args.fields, needs);
    const int reverse_count = backward_count(needs, false);
    const int64_t work = args.batch * args.num_points;
    if (reverse_count == 0 || work == 0) return grads;
    const at::Tensor grad_loss = loss_gradient(grad, args.fields[0]);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    GF_CUDA_DISPATCH(args.fields[0].scalar_type(), "gradicon_analytic_loss_backward_cuda", [&] {
      using T = compute_t<scalar_t>;
      dispatch_dims(args.d, [&](auto dims) {
        constexpr int D = decltype(dims)::value;
        backward_kernel<T, D, scalar_t><<<blocks_for(work), kThreads, 0, stream>>>(
            chain_ref<T, D, scalar_t>(args.fields, grads, args.batch),
            chain_ref<T, D, scalar_t>(args.fields, grads, args.batch, reverse_count), args.points<T, D>(), args.batch,
            grad_loss.data_ptr<T>());
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return grads;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(gradicon_fast, CUDA, m) {
  m.impl("gradicon_analytic_loss", &entry::gradicon_analytic_loss<Kernels>);
  m.impl("gradicon_analytic_loss_backward", &entry::gradicon_analytic_loss_backward<Kernels>);
}

}  // namespace gradicon_fast::cuda
