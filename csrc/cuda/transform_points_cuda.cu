// Chain evaluation at points on the GPU: forward and reverse pass (docs/conventions.md §1). One thread per
// (batch entry, point); the reverse pass recomputes the forward with its stash and scatters the
// field gradients with atomics (cuda_common.cuh).
#include <torch/library.h>

#include <cmath>

#include "../op_entries.h"
#include "cuda_common.cuh"

namespace gradicon_fast::cuda {
namespace {

template <typename T, int D, typename S>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const __grid_constant__ ChainRef<T, D, S> chain, const S* __restrict__ x, int64_t x_batch_stride,
                   S* __restrict__ y, int64_t batch, int64_t n) {
  for (int64_t q = global_thread(); q < batch * n; q += grid_threads()) {
    const int64_t b = q / n, p = q - b * n;
    T pos[1][D];
#pragma unroll
    for (int k = 0; k < D; ++k) pos[0][k] = load_as<T>(x, b * x_batch_stride + k * n + p);
    chain_forward<T, D, 1>(chain, b, pos, nullptr);
#pragma unroll
    for (int k = 0; k < D; ++k) y[(b * D + k) * n + p] = store_as<S>(pos[0][k]);
  }
}

// `chain` runs the forward; `reverse` (the same fields, cut after the last one the reverse pass
// needs) the reverse pass. grad_x (B, D, n) in the compute type, or null.
template <typename T, int D, typename S>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const __grid_constant__ ChainRef<T, D, S> chain, const __grid_constant__ ChainRef<T, D, S> reverse,
                    uint32_t aggregate, const S* __restrict__ x, int64_t x_batch_stride, const S* __restrict__ grad_y,
                    T* __restrict__ grad_x, int64_t batch, int64_t n) {
  AtomicAdd<T> add{aggregate};
  for (int64_t q = global_thread(); q < batch * n; q += grid_threads()) {
    const int64_t b = q / n, p = q - b * n;
    T pos[1][D];
    T stash[kMaxChain][1][D];  // a chain has at most kMaxChain fields (check_chain)
#pragma unroll
    for (int k = 0; k < D; ++k) pos[0][k] = load_as<T>(x, b * x_batch_stride + k * n + p);
    chain_forward<T, D, 1>(chain, b, pos, stash);
    T a[1][D];
#pragma unroll
    for (int k = 0; k < D; ++k) a[0][k] = load_as<T>(grad_y, (b * D + k) * n + p);
    chain_backward<T, D, 1>(reverse, b, stash, a, grad_x != nullptr, add);
    if (grad_x) {
#pragma unroll
      for (int k = 0; k < D; ++k) grad_x[(b * D + k) * n + p] = a[0][k];
    }
  }
}

struct Kernels {
  static constexpr c10::DeviceType kDevice = at::kCUDA;

  static at::Tensor forward(const TransformArgs& args) {
    const c10::cuda::CUDAGuard guard(args.points.device());
    at::Tensor out = at::empty(args.full_shape, args.points.options());
    const int64_t work = args.batch * args.n;
    if (work == 0) return out;
    const int64_t x_batch_stride = args.points.size(0) == 1 ? 0 : args.d * args.n;
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    GF_CUDA_DISPATCH(args.points.scalar_type(), "transform_points_cuda", [&] {
      using T = compute_t<scalar_t>;
      const scalar_t* x = args.points.data_ptr<scalar_t>();
      scalar_t* y = out.data_ptr<scalar_t>();
      dispatch_dims(args.d, [&](auto dims) {
        constexpr int D = decltype(dims)::value;
        forward_kernel<T, D, scalar_t><<<blocks_for(work), kThreads, 0, stream>>>(
            chain_ref<T, D, scalar_t>(args.fields, args.batch), x, x_batch_stride, y, args.batch, args.n);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }

  static std::tuple<std::vector<at::Tensor>, at::Tensor> backward(const TransformArgs& args, const at::Tensor& grad,
                                                                  const std::vector<bool>& needs,
                                                                  bool points_needs_grad) {
    const c10::cuda::CUDAGuard guard(args.points.device());
    const auto grads = gradient_buffers(args.fields, needs);
    at::Tensor grad_points = points_needs_grad ? at::empty(args.full_shape, args.points.options().dtype(
                                                                                 compute_dtype(args.points.scalar_type())))
                                               : at::Tensor();
    const int reverse_count = backward_count(needs, points_needs_grad);
    const int64_t work = args.batch * args.n;
    if (reverse_count > 0 && work > 0) {
      const int64_t x_batch_stride = args.points.size(0) == 1 ? 0 : args.d * args.n;
      // Points laid out as a grid (B, d, *S): consecutive threads walk its last axis. Any other
      // layout: judge by the density, as if the points were a grid of n points.
      const int64_t along = args.points.dim() == args.d + 2
                                ? args.points.size(-1)
                                : static_cast<int64_t>(std::pow(static_cast<double>(args.n), 1.0 / args.d));
      const uint32_t aggregate = aggregation_mask(args.fields, along);
      cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
      GF_CUDA_DISPATCH(args.points.scalar_type(), "transform_points_backward_cuda", [&] {
        using T = compute_t<scalar_t>;
        const scalar_t* x = args.points.data_ptr<scalar_t>();
        const scalar_t* gy = grad.data_ptr<scalar_t>();
        T* gx = points_needs_grad ? grad_points.data_ptr<T>() : nullptr;
        dispatch_dims(args.d, [&](auto dims) {
          constexpr int D = decltype(dims)::value;
          backward_kernel<T, D, scalar_t><<<blocks_for(work), kThreads, 0, stream>>>(
              chain_ref<T, D, scalar_t>(args.fields, grads, args.batch),
              chain_ref<T, D, scalar_t>(args.fields, grads, args.batch, reverse_count), aggregate, x, x_batch_stride,
              gy, gx, args.batch, args.n);
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else if (points_needs_grad) {
      grad_points.zero_();  // no work: an empty (or zero-size) gradient
    }
    return {grads, grad_points};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(gradicon_fast, CUDA, m) {
  m.impl("transform_points", &entry::transform_points<Kernels>);
  m.impl("transform_points_backward", &entry::transform_points_backward<Kernels>);
}

}  // namespace gradicon_fast::cuda
