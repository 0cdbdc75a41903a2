// Warping an image by a chain on the CPU: warped = sample(I, φ(id)) on a chosen grid (docs/conventions.md §1).
#include <torch/library.h>

#include "../op_entries.h"
#include "../warp_grid.h"
#include "cpu_common.h"

namespace gradicon_fast::cpu {
namespace {

template <typename T, int D>
void forward_kernel(const ChainRef<T, D>& chain, const FieldRef<T, D>& image, const Grid<D>& grid, at::Tensor& out,
                    int64_t batch) {
  T* o = out.data_ptr<T>();
  const int64_t n = grid.count, channels = image.channels;
  at::parallel_for(0, batch * n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t b = q / n, p = q % n;
      const WarpSample<T, D> s = warp_sample(chain, image, grid, b, p);
      const T* data = image.data + b * image.batch_stride;
      for (int64_t ch = 0; ch < channels; ++ch) {
        o[(b * channels + ch) * n + p] = interpolate(data + ch * image.channel_stride, s.cell) + s.poison;
      }
    }
  });
}

template <typename T, int D>
void backward_kernel(const ChainRef<T, D>& chain, const FieldRef<T, D>& image, const Grid<D>& grid,
                     const at::Tensor& grad_out, int64_t batch) {
  const T* go = grad_out.data_ptr<T>();
  const int64_t n = grid.count;
  const int channels = image.channels;
  ChainTargets<T, D> targets(chain, batch);  // the image is target chain.count
  std::vector<int64_t> rows = targets.rows;
  rows.push_back(gradient_rows(image, batch));
  const bool chain_grad = [&] {
    for (int j = 0; j < chain.count; ++j)
      if (chain.field[j].grad) return true;
    return false;
  }();
  PlainAdd add;
  for_each_point_owning_rows(batch * n, rows, [&](int64_t q, const RowRange* own) {
    const int64_t b = q / n, p = q % n;
    T y[1][D];
    T stash[kMaxComposed][1][D];
    grid_point(grid, p, y);
    chain_forward<T, D, 1>(chain, b, y, stash);
    if (!chain_touches_only<T, D, 1>(chain, targets.target, b, stash, own)) return false;
    if (image.grad && !touches_only(image, b, y[0][0], own[chain.count])) return false;
    const Cell<T, D> c = locate_in(image, y[0]);
    const T* data = image.data + b * image.batch_stride;
    T* grad_image = image.grad ? image.grad + b * image.batch_stride : nullptr;
    T w[1 << D];
    int64_t offset[1 << D];
    corner_weights(c, w, offset);
    T a[1][D] = {};
    for (int ch = 0; ch < channels; ++ch) {
      const T g = go[(b * channels + ch) * n + p];
      if (grad_image) {
        for (int corner = 0; corner < (1 << D); ++corner) add(grad_image + ch * image.channel_stride + offset[corner], g * w[corner]);
      }
      if (chain_grad) {
        T grad_i[D];
        interpolate_gradient(data + ch * image.channel_stride, c, grad_i);
        for (int k = 0; k < D; ++k) a[0][k] += g * grad_i[k];
      }
    }
    if (chain_grad) chain_backward<T, D, 1>(chain, b, stash, a, false, add);
    return true;
  });
}

struct Kernels {
  static constexpr c10::DeviceType kDevice = at::kCPU;

  static at::Tensor forward(const WarpArgs& args, at::IntArrayRef shape) {
    at::Tensor out = at::empty(args.out_shape, args.image.options());
    AT_DISPATCH_FLOATING_TYPES(args.image.scalar_type(), "warp_cpu", [&] {
      dispatch_dims(args.d, [&](auto dims) {
        constexpr int D = decltype(dims)::value;
        forward_kernel<scalar_t, D>(chain_ref<scalar_t, D>(args.fields, args.batch),
                                    field_ref<scalar_t, D>(args.image, at::Tensor(), args.batch), make_grid<D>(shape),
                                    out, args.batch);
      });
    });
    return out;
  }

  static std::tuple<at::Tensor, std::vector<at::Tensor>> backward(const WarpArgs& args, const at::Tensor& grad,
                                                                  at::IntArrayRef shape, bool image_needs_grad,
                                                                  const std::vector<bool>& needs) {
    const auto grads = gradient_buffers(args.fields, needs);
    at::Tensor grad_image = image_needs_grad ? zeroed_buffer(args.image) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(args.image.scalar_type(), "warp_backward_cpu", [&] {
      dispatch_dims(args.d, [&](auto dims) {
        constexpr int D = decltype(dims)::value;
        backward_kernel<scalar_t, D>(chain_ref<scalar_t, D>(args.fields, grads, args.batch),
                                     field_ref<scalar_t, D>(args.image, grad_image, args.batch), make_grid<D>(shape),
                                     grad, args.batch);
      });
    });
    return {grad_image, grads};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(gradicon_fast, CPU, m) {
  m.impl("warp", &entry::warp<Kernels>);
  m.impl("warp_backward", &entry::warp_backward<Kernels>);
}

}  // namespace gradicon_fast::cpu
