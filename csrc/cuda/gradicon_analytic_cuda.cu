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

struct Args {
  std::vector<at::Tensor> fields;  // φ_AB's fields then φ_BA's
  int64_t d, batch;
  std::vector<int64_t> count;
  at::Tensor noise;  // contiguous, in the compute type; undefined to draw from the seed
};

Args prepare(at::TensorList chain_ab, at::TensorList chain_ba, at::IntArrayRef shape, int64_t stride,
             const c10::optional<at::Tensor>& noise, double noise_scale) {
  Args args;
  args.batch = 1;
  args.d = check_chain("chain_AB", chain_ab, args.batch);
  TORCH_CHECK(check_chain("chain_BA", chain_ba, args.batch) == args.d, "chain_AB and chain_BA must both be 2D or 3D");
  check_like("chain_BA[0]", chain_ba[0], "chain_AB[0]", chain_ab[0]);
  check_cuda(chain_ab[0], "chain_AB[0]");
  check_batch_sizes(chain_ab, "chain_AB");
  check_batch_sizes(chain_ba, "chain_BA");
  args.count = check_penalty(args.d, shape, stride, noise, chain_ab[0]);
  TORCH_CHECK(noise_scale >= 0, "noise_scale must be >= 0, got ", noise_scale);
  args.fields = concatenated(contiguous_all(chain_ab), contiguous_all(chain_ba));
  if (noise.has_value()) args.noise = noise->contiguous().to(compute_dtype(noise->scalar_type()));
  return args;
}

int64_t num_points(const Args& args) {
  int64_t n = 1;
  for (int64_t c : args.count) n *= c;
  return n;
}

at::Tensor gradicon_analytic_loss_cuda(at::TensorList chain_ab, at::TensorList chain_ba, at::IntArrayRef shape,
                                       int64_t stride, const c10::optional<at::Tensor>& noise, int64_t seed,
                                       double noise_scale) {
  const Args args = prepare(chain_ab, chain_ba, shape, stride, noise, noise_scale);
  const c10::cuda::CUDAGuard guard(chain_ab[0].device());
  const int64_t n = num_points(args);
  const std::vector<at::Tensor> no_grads(args.fields.size());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  return mean_of_blocks(args.batch * n, static_cast<double>(args.batch * args.d * n), chain_ab[0],
                        [&](int blocks, double* partial) {
    GF_CUDA_DISPATCH(chain_ab[0].scalar_type(), "gradicon_analytic_loss_cuda", [&] {
      using T = compute_t<scalar_t>;
      if (args.d == 2) {
        forward_kernel<T, 2, scalar_t><<<blocks, kThreads, 0, stream>>>(
            chain_ref<T, 2, scalar_t>(args.fields, no_grads, args.batch),
            penalty_points_from<T, 2>(shape, stride, args.count, args.noise, seed, noise_scale), args.batch, partial);
      } else {
        forward_kernel<T, 3, scalar_t><<<blocks, kThreads, 0, stream>>>(
            chain_ref<T, 3, scalar_t>(args.fields, no_grads, args.batch),
            penalty_points_from<T, 3>(shape, stride, args.count, args.noise, seed, noise_scale), args.batch, partial);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> gradicon_analytic_loss_backward_cuda(
    const at::Tensor& grad, at::TensorList chain_ab, at::TensorList chain_ba, at::IntArrayRef shape, int64_t stride,
    const c10::optional<at::Tensor>& noise, int64_t seed, double noise_scale, const c10::List<bool>& ab_needs_grad,
    const c10::List<bool>& ba_needs_grad) {
  const Args args = prepare(chain_ab, chain_ba, shape, stride, noise, noise_scale);
  check_mask(ab_needs_grad, chain_ab.size(), "ab_needs_grad");
  check_mask(ba_needs_grad, chain_ba.size(), "ba_needs_grad");
  check_on(grad, "grad", chain_ab[0]);
  const c10::cuda::CUDAGuard guard(chain_ab[0].device());
  std::vector<bool> needs = to_vector(ab_needs_grad);
  for (bool m : ba_needs_grad) needs.push_back(m);
  const auto grads = gradient_buffers(args.fields, needs);
  const int reverse_count = backward_count(needs, false);
  const int64_t work = args.batch * num_points(args);
  if (reverse_count > 0 && work > 0) {
    const at::Tensor grad_loss = loss_gradient(grad, chain_ab[0]);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    GF_CUDA_DISPATCH(chain_ab[0].scalar_type(), "gradicon_analytic_loss_backward_cuda", [&] {
      using T = compute_t<scalar_t>;
      if (args.d == 2) {
        backward_kernel<T, 2, scalar_t><<<blocks_for(work), kThreads, 0, stream>>>(
            chain_ref<T, 2, scalar_t>(args.fields, grads, args.batch),
            chain_ref<T, 2, scalar_t>(args.fields, grads, args.batch, reverse_count),
            penalty_points_from<T, 2>(shape, stride, args.count, args.noise, seed, noise_scale), args.batch,
            grad_loss.data_ptr<T>());
      } else {
        backward_kernel<T, 3, scalar_t><<<blocks_for(work), kThreads, 0, stream>>>(
            chain_ref<T, 3, scalar_t>(args.fields, grads, args.batch),
            chain_ref<T, 3, scalar_t>(args.fields, grads, args.batch, reverse_count),
            penalty_points_from<T, 3>(shape, stride, args.count, args.noise, seed, noise_scale), args.batch,
            grad_loss.data_ptr<T>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto out = returned_gradients(grads, args.fields);
  return {std::vector<at::Tensor>(out.begin(), out.begin() + chain_ab.size()),
          std::vector<at::Tensor>(out.begin() + chain_ab.size(), out.end())};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradicon_fast, CUDA, m) {
  m.impl("gradicon_analytic_loss", &gradicon_analytic_loss_cuda);
  m.impl("gradicon_analytic_loss_backward", &gradicon_analytic_loss_backward_cuda);
}

}  // namespace gradicon_fast::cuda
