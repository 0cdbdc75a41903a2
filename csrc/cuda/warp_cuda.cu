// Warping an image by a chain on the GPU: warped = sample(I, φ(id)) on a chosen grid (docs/conventions.md §1).
// One thread per (batch entry, grid point); the reverse pass recomputes φ with its stash,
// scatters the image gradient (aggregated across the warp when the image is coarser than the
// grid) and pulls the adjoint back through the chain (cuda_common.cuh).
#include <torch/library.h>

#include "../warp_grid.h"
#include "../op_entries.h"
#include "cuda_common.cuh"

namespace gradicon_fast::cuda {
namespace {

template <typename T, int D, typename S>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const __grid_constant__ ChainRef<T, D, S> chain, const __grid_constant__ FieldRef<T, D, S> image,
                   Grid<D> grid, S* __restrict__ out, int64_t batch) {
  const int64_t n = grid.count;
  const int channels = image.channels;
  for (int64_t q = global_thread(); q < batch * n; q += grid_threads()) {
    const int64_t b = q / n, p = q - b * n;
    const WarpSample<T, D> s = warp_sample(chain, image, grid, b, p);
    const S* data = image.data + b * image.batch_stride;
    for (int ch = 0; ch < channels; ++ch) {
      const T v = interpolate<T>(data + ch * image.channel_stride, s.cell) + s.poison;
      out[(b * channels + ch) * n + p] = store_as<S>(v);
    }
  }
}

// `chain` runs the forward; `reverse` (cut after the last field that needs a gradient, count 0
// when none does) the reverse pass. image.grad is null when the image needs no gradient.
template <typename T, int D, typename S>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const __grid_constant__ ChainRef<T, D, S> chain, const __grid_constant__ ChainRef<T, D, S> reverse,
                    uint32_t aggregate, const __grid_constant__ FieldRef<T, D, S> image, bool aggregate_image,
                    Grid<D> grid, const S* __restrict__ grad_out, int64_t batch) {
  constexpr int kCorners = 1 << D;
  const int64_t n = grid.count;
  const int channels = image.channels;
  const bool chain_grad = reverse.count > 0;
  AtomicAdd<T> add{aggregate};
  for (int64_t q = global_thread(); q < batch * n; q += grid_threads()) {
    const int64_t b = q / n, p = q - b * n;
    T y[1][D];
    T stash[kMaxChain][1][D];  // a chain has at most kMaxChain fields (check_chain)
    grid_point(grid, p, y);
    chain_forward<T, D, 1>(chain, b, y, chain_grad ? stash : nullptr);
    const Cell<T, D> c = locate_in(image, y[0]);
    const S* data = image.data + b * image.batch_stride;
    T* grad_image = image.grad ? image.grad + b * image.batch_stride : nullptr;
    T w[kCorners];
    int64_t offset[kCorners];
    corner_weights(c, w, offset);
    // Lanes sampling the same image cell (a coarse image): one atomic per corner and channel per group.
    unsigned mask = 0, peers = 0;
    bool shared = false, leader = true;
    if (grad_image && aggregate_image) {
      mask = __activemask();
      peers = __match_any_sync(mask, reinterpret_cast<unsigned long long>(grad_image + c.base));
      shared = __any_sync(mask, __popc(peers) > 1);
      leader = __ffs(peers) - 1 == static_cast<int>(lane_id());
    }
    T a[1][D];
#pragma unroll
    for (int k = 0; k < D; ++k) a[0][k] = T(0);
    for (int ch = 0; ch < channels; ++ch) {
      const T g = load_as<T>(grad_out, (b * channels + ch) * n + p);
      if (grad_image) {
        T v[kCorners];
#pragma unroll
        for (int corner = 0; corner < kCorners; ++corner) v[corner] = g * w[corner];
        if (shared) reduce_peers<kCorners>(mask, peers, v);
        if (leader) {
          T* gi = grad_image + ch * image.channel_stride;
#pragma unroll
          for (int corner = 0; corner < kCorners; ++corner) atomic_add(gi + offset[corner], v[corner]);
        }
      }
      if (chain_grad) {
        T grad_i[D];
        interpolate_gradient(data + ch * image.channel_stride, c, grad_i);
#pragma unroll
        for (int k = 0; k < D; ++k) a[0][k] += g * grad_i[k];
      }
    }
    if (chain_grad) chain_backward<T, D, 1>(reverse, b, stash, a, false, add);
  }
}

struct Kernels {
  static constexpr c10::DeviceType kDevice = at::kCUDA;

  static at::Tensor forward(const WarpArgs& args, at::IntArrayRef shape) {
    const c10::cuda::CUDAGuard guard(args.image.device());
    at::Tensor out = at::empty(args.out_shape, args.image.options());
    const int64_t work = args.batch * args.grid_points;
    if (work == 0) return out;
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    GF_CUDA_DISPATCH(args.image.scalar_type(), "warp_cuda", [&] {
      using T = compute_t<scalar_t>;
      dispatch_dims(args.d, [&](auto dims) {
        constexpr int D = decltype(dims)::value;
        forward_kernel<T, D, scalar_t><<<blocks_for(work), kThreads, 0, stream>>>(
            chain_ref<T, D, scalar_t>(args.fields, args.batch),
            field_ref<T, D, scalar_t>(args.image, at::Tensor(), args.batch), make_grid<D>(shape),
            out.data_ptr<scalar_t>(), args.batch);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }

  static std::tuple<at::Tensor, std::vector<at::Tensor>> backward(const WarpArgs& args, const at::Tensor& grad,
                                                                  at::IntArrayRef shape, bool image_needs_grad,
                                                                  const std::vector<bool>& needs) {
    const c10::cuda::CUDAGuard guard(args.image.device());
    const auto grads = gradient_buffers(args.fields, needs);
    at::Tensor grad_image = image_needs_grad ? at::zeros(args.image.sizes(), args.image.options().dtype(
                                                                                 compute_dtype(args.image.scalar_type())))
                                             : at::Tensor();
    const int reverse_count = backward_count(needs, false);
    const int64_t work = args.batch * args.grid_points;
    if ((reverse_count > 0 || image_needs_grad) && work > 0) {
      const uint32_t aggregate = aggregation_mask(args.fields, shape.back());
      const bool aggregate_image = coarse_for(args.image, shape.back());
      cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
      GF_CUDA_DISPATCH(args.image.scalar_type(), "warp_backward_cuda", [&] {
        using T = compute_t<scalar_t>;
        dispatch_dims(args.d, [&](auto dims) {
          constexpr int D = decltype(dims)::value;
          backward_kernel<T, D, scalar_t><<<blocks_for(work), kThreads, 0, stream>>>(
              chain_ref<T, D, scalar_t>(args.fields, grads, args.batch),
              chain_ref<T, D, scalar_t>(args.fields, grads, args.batch, reverse_count), aggregate,
              field_ref<T, D, scalar_t>(args.image, grad_image, args.batch), aggregate_image, make_grid<D>(shape),
              grad.data_ptr<scalar_t>(), args.batch);
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    return {grad_image, grads};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(gradicon_fast, CUDA, m) {
  m.impl("warp", &entry::warp<Kernels>);
  m.impl("warp_backward", &entry::warp_backward<Kernels>);
}

}  // namespace gradicon_fast::cuda
