// Warping an image by a chain on the CPU: warped = sample(I, φ(id)) on a chosen grid (docs/conventions.md §1).
#include <torch/library.h>

#include "../op_checks.h"
#include "../penalty_points.h"
#include "cpu_common.h"

namespace gradicon_fast::cpu {
namespace {

template <int D>
struct Grid {
  int size[D];
  int64_t count;
};

template <typename T, int D>
void grid_point(const Grid<D>& grid, int64_t p, T (&x)[1][D]) {
  int64_t rest = p;
  for (int k = D - 1; k >= 0; --k) {
    x[0][k] = grid_coordinate<T>(rest % grid.size[k], grid.size[k]);
    rest /= grid.size[k];
  }
}

// 0 for a finite point, NaN otherwise: added to the warped value so that a non-finite map never
// yields a finite image (clamping alone would sample the border).
template <typename T, int D>
T poison(const T (&y)[1][D]) {
  T z = T(0);
  for (int k = 0; k < D; ++k) z += y[0][k] - y[0][k];
  return z;
}

template <typename T, int D>
void forward_kernel(const ChainRef<T, D>& chain, const FieldRef<T, D>& image, const Grid<D>& grid, at::Tensor& out,
                    int64_t batch) {
  T* o = out.data_ptr<T>();
  const int64_t n = grid.count, channels = image.channels;
  at::parallel_for(0, batch * n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t b = q / n, p = q % n;
      T y[1][D];
      grid_point(grid, p, y);
      chain_forward<T, D, 1>(chain, b, y, nullptr);
      const Cell<T, D> c = locate_in(image, y[0]);
      const T* data = image.data + b * image.batch_stride;
      const T z = poison(y);
      for (int64_t ch = 0; ch < channels; ++ch) {
        o[(b * channels + ch) * n + p] = interpolate(data + ch * image.channel_stride, c) + z;
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
  std::vector<int64_t> rows;
  int target[kMaxComposed];
  for (int j = 0; j < chain.count; ++j) {
    rows.push_back(gradient_rows(chain.field[j], batch));
    target[j] = j;
  }
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
    if (!chain_touches_only<T, D, 1>(chain, target, b, stash, own)) return false;
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

struct Args {
  std::vector<at::Tensor> fields;
  at::Tensor image;
  int64_t d, batch;
  std::vector<int64_t> out_shape;
};

Args prepare(const at::Tensor& image, at::TensorList chain, at::IntArrayRef shape) {
  Args args;
  args.batch = 1;
  args.d = check_chain("chain", chain, args.batch);
  TORCH_CHECK(image.dim() == args.d + 2, "image must be (B, C, *spatial) with ", args.d,
              " spatial axes like the chain, got ", image.sizes());
  TORCH_CHECK(image.size(1) >= 1, "image must have at least one channel");
  check_like("image", image, "chain[0]", chain[0]);
  args.batch = merge_batch(args.batch, image.size(0), "image");
  TORCH_CHECK(static_cast<int64_t>(shape.size()) == args.d, "shape must have ", args.d, " entries, got ", shape);
  for (int64_t s : shape) TORCH_CHECK(s >= 1 && s < (int64_t(1) << 31), "shape entries must be >= 1, got ", shape);
  args.fields = contiguous_all(chain);
  args.image = image.contiguous();
  args.out_shape = {args.batch, image.size(1)};
  args.out_shape.insert(args.out_shape.end(), shape.begin(), shape.end());
  return args;
}

template <int D>
Grid<D> make_grid(at::IntArrayRef shape) {
  Grid<D> g;
  g.count = 1;
  for (int k = 0; k < D; ++k) {
    g.size[k] = static_cast<int>(shape[k]);
    g.count *= shape[k];
  }
  return g;
}

at::Tensor warp_cpu(const at::Tensor& image_in, at::TensorList chain, at::IntArrayRef shape) {
  const Args args = prepare(image_in, chain, shape);
  at::Tensor out = at::empty(args.out_shape, args.image.options());
  const std::vector<at::Tensor> no_grads(args.fields.size());
  AT_DISPATCH_FLOATING_TYPES(args.image.scalar_type(), "warp_cpu", [&] {
    if (args.d == 2) {
      forward_kernel<scalar_t, 2>(chain_ref<scalar_t, 2>(args.fields, no_grads, args.batch),
                                  field_ref<scalar_t, 2>(args.image, at::Tensor(), args.batch), make_grid<2>(shape), out,
                                  args.batch);
    } else {
      forward_kernel<scalar_t, 3>(chain_ref<scalar_t, 3>(args.fields, no_grads, args.batch),
                                  field_ref<scalar_t, 3>(args.image, at::Tensor(), args.batch), make_grid<3>(shape), out,
                                  args.batch);
    }
  });
  return out;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> warp_backward_cpu(const at::Tensor& grad_in, const at::Tensor& image_in,
                                                                  at::TensorList chain, at::IntArrayRef shape,
                                                                  bool image_needs_grad,
                                                                  const c10::List<bool>& chain_needs_grad) {
  const Args args = prepare(image_in, chain, shape);
  check_mask(chain_needs_grad, chain.size(), "chain_needs_grad");
  const at::Tensor grad = grad_in.contiguous();
  TORCH_CHECK(grad.sizes().vec() == args.out_shape, "grad must have shape ", at::IntArrayRef(args.out_shape), ", got ",
              grad.sizes());
  const auto grads = gradient_buffers(args.fields, chain_needs_grad);
  at::Tensor grad_image = image_needs_grad ? zeroed_buffer(args.image) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(args.image.scalar_type(), "warp_backward_cpu", [&] {
    if (args.d == 2) {
      backward_kernel<scalar_t, 2>(chain_ref<scalar_t, 2>(args.fields, grads, args.batch),
                                   field_ref<scalar_t, 2>(args.image, grad_image, args.batch), make_grid<2>(shape), grad,
                                   args.batch);
    } else {
      backward_kernel<scalar_t, 3>(chain_ref<scalar_t, 3>(args.fields, grads, args.batch),
                                   field_ref<scalar_t, 3>(args.image, grad_image, args.batch), make_grid<3>(shape), grad,
                                   args.batch);
    }
  });
  return {image_needs_grad ? grad_image : no_gradient(args.image), returned_gradients(grads, args.image)};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradicon_fast, CPU, m) {
  m.impl("warp", &warp_cpu);
  m.impl("warp_backward", &warp_backward_cpu);
}

}  // namespace gradicon_fast::cpu
