// Finite-difference GradICON penalty on the GPU (docs/conventions.md §2). One thread per (batch entry, point),
// the point and its D δ-shifted copies evaluated in lockstep through φ_AB∘φ_BA (E = D + 1).
// Forward: per-block partial sums (double), reduced in a fixed order. Backward: the noise is
// regenerated from the seed (philox.h), the forward recomputed with its stash, the field
// gradients scattered with atomics (cuda_common.cuh). Nothing is stored between the two.
// gradicon_loss_and_grad: the reverse pass summing the loss as well (one pass instead of two).
#include <torch/library.h>

#include "../gradicon_point.h"
#include "../op_entries.h"
#include "cuda_common.cuh"

namespace gradicon_fast::cuda {
namespace {

template <typename T, int D, typename S>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const __grid_constant__ ChainRef<T, D, S> chain, const __grid_constant__ PenaltyPoints<T, D> pts,
                   int64_t batch, T delta, double* __restrict__ partial) {
  constexpr int E = D + 1;
  const int64_t n = pts.num_points;
  double sum = 0.0;
  for (int64_t q = global_thread(); q < batch * n; q += grid_threads()) {
    const int64_t b = q / n, p = q - b * n;
    T start[E][D], end[E][D];
    start_and_end_points_at(pts, p, delta, start, end);
    chain_forward<T, D, E>(chain, b, end, nullptr);
    T g[D][D];
    sum += fd_gradient_error(start, end, delta, g);
  }
  write_block_partial(partial, sum);
}

// `chain` runs the forward; `reverse` (cut after the last field that needs a gradient) the
// reverse pass. grad_loss: the incoming gradient, one element on the device (null: 1). With
// kLoss, the loss's per-block partial sums go to `partial` as in forward_kernel (the loss and its
// gradients in one pass: gradicon_loss_and_grad).
template <typename T, int D, typename S, bool kLoss>
__global__ void __launch_bounds__(kThreads, kBackwardBlocksPerSM<T>)
    backward_kernel(const __grid_constant__ ChainRef<T, D, S> chain, const __grid_constant__ ChainRef<T, D, S> reverse,
                    uint32_t aggregate, const __grid_constant__ PenaltyPoints<T, D> pts, int64_t batch, T delta,
                    const T* __restrict__ grad_loss, double* __restrict__ partial) {
  constexpr int E = D + 1;
  const int64_t n = pts.num_points;
  const T scale_sum = (grad_loss ? *grad_loss : T(1)) / static_cast<T>(batch * D * n);
  AtomicAdd<T> add{aggregate};
  double sum = 0.0;
  for (int64_t q = global_thread(); q < batch * n; q += grid_threads()) {
    const int64_t b = q / n, p = q - b * n;
    T start[E][D], end[E][D];
    T stash[kMaxComposed][E][D];
    start_and_end_points_at(pts, p, delta, start, end);
    chain_forward<T, D, E>(chain, b, end, stash);
    T g[D][D], a[E][D];
    const double s = fd_gradient_error(start, end, delta, g);
    if constexpr (kLoss) sum += s;
    fd_gradient_error_adjoint(g, delta, scale_sum, a);
    chain_backward<T, D, E>(reverse, b, stash, a, false, add);
  }
  if constexpr (kLoss) write_block_partial(partial, sum);
}

// Launches the reverse pass for the fields whose `needs` entry is set (grads: their buffers).
template <bool kLoss>
void launch_backward(const PairArgs& args, const std::vector<at::Tensor>& grads, const std::vector<bool>& needs,
                     double delta, const at::Tensor& grad_loss, int blocks, double* partial) {
  const int reverse_count = backward_count(needs, false);
  const uint32_t aggregate = aggregation_mask(args.fields, args.count.back());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  GF_CUDA_DISPATCH(args.fields[0].scalar_type(), "gradicon_loss_backward_cuda", [&] {
    using T = compute_t<scalar_t>;
    const T* g = grad_loss.defined() ? grad_loss.data_ptr<T>() : nullptr;
    dispatch_dims(args.d, [&](auto dims) {
      constexpr int D = decltype(dims)::value;
      backward_kernel<T, D, scalar_t, kLoss><<<blocks, kThreads, 0, stream>>>(
          chain_ref<T, D, scalar_t>(args.fields, grads, args.batch),
          chain_ref<T, D, scalar_t>(args.fields, grads, args.batch, reverse_count), aggregate, args.points<T, D>(),
          args.batch, static_cast<T>(delta), g, partial);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

struct Kernels {
  static constexpr c10::DeviceType kDevice = at::kCUDA;

  static at::Tensor loss(const PairArgs& args, double delta) {
    return penalty_mean(args, [&](int blocks, double* partial, cudaStream_t stream) {
      GF_CUDA_DISPATCH(args.fields[0].scalar_type(), "gradicon_loss_cuda", [&] {
        using T = compute_t<scalar_t>;
        dispatch_dims(args.d, [&](auto dims) {
          constexpr int D = decltype(dims)::value;
          forward_kernel<T, D, scalar_t><<<blocks, kThreads, 0, stream>>>(
              chain_ref<T, D, scalar_t>(args.fields, args.batch), args.points<T, D>(), args.batch,
              static_cast<T>(delta), partial);
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static std::vector<at::Tensor> loss_backward(const PairArgs& args, const at::Tensor& grad,
                                               const std::vector<bool>& needs, double delta) {
    const c10::cuda::CUDAGuard guard(args.fields[0].device());
    const auto grads = gradient_buffers(args.fields, needs);
    const int64_t work = args.batch * args.num_points;
    if (backward_count(needs, false) > 0 && work > 0) {
      launch_backward<false>(args, grads, needs, delta, loss_gradient(grad, args.fields[0]), blocks_for(work),
                             nullptr);
    }
    return grads;
  }

  // The reverse pass evaluates everything the loss needs, so it sums the loss too (a third less
  // work than gradicon_loss followed by gradicon_loss_backward).
  static std::pair<at::Tensor, std::vector<at::Tensor>> loss_and_grad(const PairArgs& args,
                                                                      const std::vector<bool>& needs, double delta) {
    const c10::cuda::CUDAGuard guard(args.fields[0].device());
    const auto grads = gradient_buffers(args.fields, needs);
    if (backward_count(needs, false) == 0) return {loss(args, delta), grads};
    const at::Tensor mean = penalty_mean(args, [&](int blocks, double* partial, cudaStream_t) {
      launch_backward<true>(args, grads, needs, delta, at::Tensor(), blocks, partial);
    });
    return {mean, grads};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(gradicon_fast, CUDA, m) {
  m.impl("gradicon_loss", &entry::gradicon_loss<Kernels>);
  m.impl("gradicon_loss_backward", &entry::gradicon_loss_backward<Kernels>);
  m.impl("gradicon_loss_and_grad", &entry::gradicon_loss_and_grad<Kernels>);
}

}  // namespace gradicon_fast::cuda
