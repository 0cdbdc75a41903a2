// Analytic GradICON penalty on the GPU (docs/conventions.md §2): ‖J - I‖_F² with the exact chain-rule Jacobian of
// φ_AB∘φ_BA at the penalty's points (gradicon_analytic_point.h). One thread per (batch entry,
// point); the forward writes per-block partial sums (double) reduced in a fixed order; the
// backward regenerates the noise, recomputes the forward with its stash and scatters the field
// gradients with atomics (one per corner and channel, as jacobian_backward issues them).
#include <torch/library.h>

#include "../gradicon_analytic_point.h"
#include "../penalty_args.h"
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

at::Tensor gradicon_analytic_loss_cuda(at::TensorList chain_ab, at::TensorList chain_ba, at::IntArrayRef shape,
                                       int64_t stride, const c10::optional<at::Tensor>& noise, int64_t seed,
                                       double noise_scale) {
  const PairArgs args = prepare_pair(chain_ab, chain_ba, shape, stride, noise, seed, noise_scale, at::kCUDA);
  return penalty_mean(args, [&](int blocks, double* partial, cudaStream_t stream) {
    GF_CUDA_DISPATCH(chain_ab[0].scalar_type(), "gradicon_analytic_loss_cuda", [&] {
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

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> gradicon_analytic_loss_backward_cuda(
    const at::Tensor& grad, at::TensorList chain_ab, at::TensorList chain_ba, at::IntArrayRef shape, int64_t stride,
    const c10::optional<at::Tensor>& noise, int64_t seed, double noise_scale, const c10::List<bool>& ab_needs_grad,
    const c10::List<bool>& ba_needs_grad) {
  const PairArgs args = prepare_pair(chain_ab, chain_ba, shape, stride, noise, seed, noise_scale, at::kCUDA);
  const std::vector<bool> needs = args.needs_grad(ab_needs_grad, ba_needs_grad);
  check_on(grad, "grad", chain_ab[0]);
  const c10::cuda::CUDAGuard guard(chain_ab[0].device());
  const auto grads = gradient_buffers(args.fields, needs);
  const int reverse_count = backward_count(needs, false);
  const int64_t work = args.batch * args.num_points;
  if (reverse_count > 0 && work > 0) {
    const at::Tensor grad_loss = loss_gradient(grad, chain_ab[0]);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    GF_CUDA_DISPATCH(chain_ab[0].scalar_type(), "gradicon_analytic_loss_backward_cuda", [&] {
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
  }
  return args.split(grads);
}

}  // namespace

TORCH_LIBRARY_IMPL(gradicon_fast, CUDA, m) {
  m.impl("gradicon_analytic_loss", &gradicon_analytic_loss_cuda);
  m.impl("gradicon_analytic_loss_backward", &gradicon_analytic_loss_backward_cuda);
}

}  // namespace gradicon_fast::cuda
