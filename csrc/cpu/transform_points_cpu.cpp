// Chain evaluation at points on the CPU: forward and reverse pass.
#include <torch/library.h>

#include "../op_checks.h"
#include "cpu_common.h"

namespace gradicon_fast::cpu {
namespace {

int64_t check_points(const at::Tensor& points, int64_t d, const at::Tensor& chain0, int64_t& batch) {
  TORCH_CHECK(points.dim() >= 3 && points.size(1) == d, "points must be (B, ", d, ", *P), got ", points.sizes());
  check_like("points", points, "chain[0]", chain0);
  batch = merge_batch(batch, points.size(0), "points");
  return points.numel() / (points.size(0) * d);
}

template <typename T, int D>
void forward_kernel(const ChainRef<T, D>& chain, const at::Tensor& points, at::Tensor& out, int64_t batch, int64_t n) {
  const T* x = points.data_ptr<T>();
  const int64_t x_batch_stride = points.size(0) == 1 ? 0 : D * n;
  T* y = out.data_ptr<T>();
  at::parallel_for(0, batch * n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t b = q / n, p = q % n;
      T pos[1][D];
      for (int k = 0; k < D; ++k) pos[0][k] = x[b * x_batch_stride + k * n + p];
      chain_forward<T, D, 1>(chain, b, pos, nullptr);
      for (int k = 0; k < D; ++k) y[b * D * n + k * n + p] = pos[0][k];
    }
  });
}

template <typename T, int D>
void backward_kernel(const ChainRef<T, D>& chain, const at::Tensor& points, const at::Tensor& grad_out,
                     at::Tensor& grad_points, int64_t batch, int64_t n) {
  const T* x = points.data_ptr<T>();
  const int64_t x_batch_stride = points.size(0) == 1 ? 0 : D * n;
  const T* go = grad_out.data_ptr<T>();
  T* gx = grad_points.defined() ? grad_points.data_ptr<T>() : nullptr;  // (B, D, n)
  std::vector<int64_t> rows;
  int target[kMaxComposed];
  for (int j = 0; j < chain.count; ++j) {
    rows.push_back(gradient_rows(chain.field[j], batch));
    target[j] = j;
  }
  PlainAdd add;
  for_each_point_owning_rows(batch * n, rows, [&](int64_t q, const RowRange* own) {
    const int64_t b = q / n, p = q % n;
    T pos[1][D];
    T stash[kMaxComposed][1][D];
    for (int k = 0; k < D; ++k) pos[0][k] = x[b * x_batch_stride + k * n + p];
    chain_forward<T, D, 1>(chain, b, pos, stash);
    if (!chain_touches_only<T, D, 1>(chain, target, b, stash, own)) return false;
    T a[1][D];
    for (int k = 0; k < D; ++k) a[0][k] = go[b * D * n + k * n + p];
    chain_backward<T, D, 1>(chain, b, stash, a, gx != nullptr, add);
    if (gx) {
      for (int k = 0; k < D; ++k) gx[b * D * n + k * n + p] = a[0][k];
    }
    return true;
  });
}

at::Tensor transform_points_cpu(at::TensorList chain_in, const at::Tensor& points_in) {
  int64_t batch = 1;
  const int64_t d = check_chain("chain", chain_in, batch);
  const int64_t n = check_points(points_in, d, chain_in[0], batch);
  const auto fields = contiguous_all(chain_in);
  const at::Tensor points = points_in.contiguous();
  std::vector<int64_t> out_shape = points.sizes().vec();
  out_shape[0] = batch;
  at::Tensor out = at::empty(out_shape, points.options());
  const std::vector<at::Tensor> no_grads(fields.size());
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "transform_points_cpu", [&] {
    if (d == 2) {
      forward_kernel<scalar_t, 2>(chain_ref<scalar_t, 2>(fields, no_grads, batch), points, out, batch, n);
    } else {
      forward_kernel<scalar_t, 3>(chain_ref<scalar_t, 3>(fields, no_grads, batch), points, out, batch, n);
    }
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> transform_points_backward_cpu(
    const at::Tensor& grad_in, at::TensorList chain_in, const at::Tensor& points_in,
    const c10::List<bool>& chain_needs_grad, bool points_needs_grad) {
  int64_t batch = 1;
  const int64_t d = check_chain("chain", chain_in, batch);
  const int64_t n = check_points(points_in, d, chain_in[0], batch);
  check_mask(chain_needs_grad, chain_in.size(), "chain_needs_grad");
  const auto fields = contiguous_all(chain_in);
  const at::Tensor points = points_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  std::vector<int64_t> full_shape = points.sizes().vec();
  full_shape[0] = batch;
  TORCH_CHECK(grad.sizes().vec() == full_shape, "grad must have shape ", at::IntArrayRef(full_shape), ", got ",
              grad.sizes());
  const auto grads = gradient_buffers(fields, chain_needs_grad);
  at::Tensor grad_points = points_needs_grad ? at::empty(full_shape, points.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "transform_points_backward_cpu", [&] {
    if (d == 2) {
      backward_kernel<scalar_t, 2>(chain_ref<scalar_t, 2>(fields, grads, batch), points, grad, grad_points, batch, n);
    } else {
      backward_kernel<scalar_t, 3>(chain_ref<scalar_t, 3>(fields, grads, batch), points, grad, grad_points, batch, n);
    }
  });
  if (points_needs_grad && points.size(0) != batch) grad_points = grad_points.sum(0, true);
  return {returned_gradients(grads, points), points_needs_grad ? grad_points : no_gradient(points)};
}

}  // namespace

TORCH_LIBRARY_IMPL(gradicon_fast, CPU, m) {
  m.impl("transform_points", &transform_points_cpu);
  m.impl("transform_points_backward", &transform_points_backward_cpu);
}

}  // namespace gradicon_fast::cpu
