// Finite-difference GradICON penalty on the GPU (docs/conventions.md §2). One thread per (batch entry, point),
// the point and its D δ-shifted copies evaluated in lockstep through φ_AB∘φ_BA (E = D + 1).
// Forward: per-block partial sums (double), reduced in a fixed order. Backward: the noise is
// regenerated from the seed (philox.h), the forward recomputed with its stash, the field
// gradients scattered with atomics (cuda_common.cuh). Nothing is stored between the two.
// gradicon_loss_and_grad: the reverse pass summing the loss as well (one pass instead of two).
#include <torch/library.h>

#include "../gradicon_point.h"
#include "../penalty_args.h"
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
    T x[D];
    penalty_point(pts, p, x);
    T start[E][D], end[E][D];
    shifted_points(x, delta, start);
#pragma unroll
    for (int e = 0; e < E; ++e) {
#pragma unroll
      for (int k = 0; k < D; ++k) end[e][k] = start[e][k];
    }
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
    T x[D];
    penalty_point(pts, p, x);
    T start[E][D], end[E][D];
    T stash[kMaxComposed][E][D];
    shifted_points(x, delta, start);
#pragma unroll
    for (int e = 0; e < E; ++e) {
#pragma unroll
      for (int k = 0; k < D; ++k) end[e][k] = start[e][k];
    }
    chain_forward<T, D, E>(chain, b, end, stash);
    T g[D][D], a[E][D];
    const double s = fd_gradient_error(start, end, delta, g);
    if constexpr (kLoss) sum += s;
    fd_gradient_error_adjoint(g, delta, scale_sum, a);
    chain_backward<T, D, E>(reverse, b, stash, a, false, add);
  }
  if constexpr (kLoss) write_block_partial(partial, sum);
}

struct Args {
  std::vector<at::Tensor> fields;  // φ_AB's fields then φ_BA's
  int64_t d, batch;
  std::vector<int64_t> count;
  at::Tensor noise;  // contiguous, in the compute type; undefined to draw from the seed
};

Args prepare(at::TensorList chain_ab, at::TensorList chain_ba, at::IntArrayRef shape, int64_t stride,
             const c10::optional<at::Tensor>& noise, double delta, double noise_scale) {
  Args args;
  args.batch = 1;
  args.d = check_chain("chain_AB", chain_ab, args.batch);
  TORCH_CHECK(check_chain("chain_BA", chain_ba, args.batch) == args.d, "chain_AB and chain_BA must both be 2D or 3D");
  check_like("chain_BA[0]", chain_ba[0], "chain_AB[0]", chain_ab[0]);
  check_cuda(chain_ab[0], "chain_AB[0]");
  check_batch_sizes(chain_ab, "chain_AB");
  check_batch_sizes(chain_ba, "chain_BA");
  args.count = check_penalty(args.d, shape, stride, noise, chain_ab[0]);
  TORCH_CHECK(delta > 0, "delta must be positive, got ", delta);
  TORCH_CHECK(noise_scale >= 0, "noise_scale must be >= 0, got ", noise_scale);
  args.fields = concatenated(contiguous_all(chain_ab), contiguous_all(chain_ba));
  if (noise.has_value()) args.noise = noise->contiguous().to(compute_dtype(noise->scalar_type()));
  return args;
}

// Launches the reverse pass for the fields whose `needs` entry is set (grads: their buffers).
template <bool kLoss>
void launch_backward(const Args& args, const std::vector<at::Tensor>& grads, const std::vector<bool>& needs,
                     at::IntArrayRef shape, int64_t stride, int64_t seed, double delta, double noise_scale,
                     const at::Tensor& grad_loss, int blocks, double* partial) {
  const int reverse_count = backward_count(needs, false);
  const uint32_t aggregate = aggregation_mask(args.fields, args.count.back());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  GF_CUDA_DISPATCH(args.fields[0].scalar_type(), "gradicon_loss_backward_cuda", [&] {
    using T = compute_t<scalar_t>;
    const T* g = grad_loss.defined() ? grad_loss.data_ptr<T>() : nullptr;
    if (args.d == 2) {
      backward_kernel<T, 2, scalar_t, kLoss><<<blocks, kThreads, 0, stream>>>(
          chain_ref<T, 2, scalar_t>(args.fields, grads, args.batch),
          chain_ref<T, 2, scalar_t>(args.fields, grads, args.batch, reverse_count), aggregate,
          penalty_points_from<T, 2>(shape, stride, args.count, args.noise, seed, noise_scale), args.batch,
          static_cast<T>(delta), g, partial);
    } else {
      backward_kernel<T, 3, scalar_t, kLoss><<<blocks, kThreads, 0, stream>>>(
          chain_ref<T, 3, scalar_t>(args.fields, grads, args.batch),
          chain_ref<T, 3, scalar_t>(args.fields, grads, args.batch, reverse_count), aggregate,
          penalty_points_from<T, 3>(shape, stride, args.count, args.noise, seed, noise_scale), args.batch,
          static_cast<T>(delta), g, partial);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

int64_t num_points(const Args& args) {
  int64_t n = 1;
  for (int64_t c : args.count) n *= c;
  return n;
}

at::Tensor gradicon_loss_cuda(at::TensorList chain_ab, at::TensorList chain_ba, at::IntArrayRef shape, int64_t stride,
                              const c10::optional<at::Tensor>& noise, int64_t seed, double delta,
                              double noise_scale) {
  const Args args = prepare(chain_ab, chain_ba, shape, stride, noise, delta, noise_scale);
  const c10::cuda::CUDAGuard guard(chain_ab[0].device());
  const int64_t n = num_points(args);
  const std::vector<at::Tensor> no_grads(args.fields.size());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  return mean_of_blocks(args.batch * n, static_cast<double>(args.batch * args.d * n), chain_ab[0],
                        [&](int blocks, double* partial) {
    GF_CUDA_DISPATCH(chain_ab[0].scalar_type(), "gradicon_loss_cuda", [&] {
      using T = compute_t<scalar_t>;
      if (args.d == 2) {
        forward_kernel<T, 2, scalar_t><<<blocks, kThreads, 0, stream>>>(
            chain_ref<T, 2, scalar_t>(args.fields, no_grads, args.batch),
            penalty_points_from<T, 2>(shape, stride, args.count, args.noise, seed, noise_scale), args.batch,
            static_cast<T>(delta), partial);
      } else {
        forward_kernel<T, 3, scalar_t><<<blocks, kThreads, 0, stream>>>(
            chain_ref<T, 3, scalar_t>(args.fields, no_grads, args.batch),
            penalty_points_from<T, 3>(shape, stride, args.count, args.noise, seed, noise_scale), args.batch,
            static_cast<T>(delta), partial);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> gradicon_loss_backward_cuda(
    const at::Tensor& grad, at::TensorList chain_ab, at::TensorList chain_ba, at::IntArrayRef shape, int64_t stride,
    const c10::optional<at::Tensor>& noise, int64_t seed, double delta, double noise_scale,
    const c10::List<bool>& ab_needs_grad, const c10::List<bool>& ba_needs_grad) {
  const Args args = prepare(chain_ab, chain_ba, shape, stride, noise, delta, noise_scale);
  check_mask(ab_needs_grad, chain_ab.size(), "ab_needs_grad");
  check_mask(ba_needs_grad, chain_ba.size(), "ba_needs_grad");
  check_on(grad, "grad", chain_ab[0]);
  const c10::cuda::CUDAGuard guard(chain_ab[0].device());
  std::vector<bool> needs = to_vector(ab_needs_grad);
  for (bool m : ba_needs_grad) needs.push_back(m);
  const auto grads = gradient_buffers(args.fields, needs);
  const int64_t work = args.batch * num_points(args);
  if (backward_count(needs, false) > 0 && work > 0) {
    launch_backward<false>(args, grads, needs, shape, stride, seed, delta, noise_scale,
                           loss_gradient(grad, chain_ab[0]), blocks_for(work), nullptr);
  }
  const auto out = returned_gradients(grads, args.fields);
  return {std::vector<at::Tensor>(out.begin(), out.begin() + chain_ab.size()),
          std::vector<at::Tensor>(out.begin() + chain_ab.size(), out.end())};
}

// The loss and its gradients for a unit upstream gradient in one pass over the points: the
// reverse pass evaluates everything the loss needs, so it sums the loss too (a third less work
// than gradicon_loss followed by gradicon_loss_backward). Gradients of the fields whose mask
// entry is false are empty tensors.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> gradicon_loss_and_grad_cuda(
    at::TensorList chain_ab, at::TensorList chain_ba, at::IntArrayRef shape, int64_t stride,
    const c10::optional<at::Tensor>& noise, int64_t seed, double delta, double noise_scale,
    const c10::List<bool>& ab_needs_grad, const c10::List<bool>& ba_needs_grad) {
  const Args args = prepare(chain_ab, chain_ba, shape, stride, noise, delta, noise_scale);
  check_mask(ab_needs_grad, chain_ab.size(), "ab_needs_grad");
  check_mask(ba_needs_grad, chain_ba.size(), "ba_needs_grad");
  const c10::cuda::CUDAGuard guard(chain_ab[0].device());
  std::vector<bool> needs = to_vector(ab_needs_grad);
  for (bool m : ba_needs_grad) needs.push_back(m);
  const auto grads = gradient_buffers(args.fields, needs);
  at::Tensor loss;
  if (backward_count(needs, false) == 0) {
    loss = gradicon_loss_cuda(chain_ab, chain_ba, shape, stride, noise, seed, delta, noise_scale);
  } else {
    const int64_t n = num_points(args);
    loss = mean_of_blocks(args.batch * n, static_cast<double>(args.batch * args.d * n), chain_ab[0],
                          [&](int blocks, double* partial) {
      launch_backward<true>(args, grads, needs, shape, stride, seed, delta, noise_scale, at::Tensor(), blocks,
                            partial);
    });
  }
  const auto out = returned_gradients(grads, args.fields);
  return {loss, std::vector<at::Tensor>(out.begin(), out.begin() + chain_ab.size()),
          std::vector<at::Tensor>(out.begin() + chain_ab.size(), out.end())};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradicon_fast, CUDA, m) {
  m.impl("gradicon_loss", &gradicon_loss_cuda);
  m.impl("gradicon_loss_backward", &gradicon_loss_backward_cuda);
  m.impl("gradicon_loss_and_grad", &gradicon_loss_and_grad_cuda);
}

}  // namespace gradicon_fast::cuda
