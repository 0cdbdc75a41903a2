// Chain evaluation at points on the CPU: forward and reverse pass.
#include <torch/library.h>

#include "../op_entries.h"
#include "cpu_common.h"

namespace gradicon_fast::cpu {
namespace {

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
  const ChainTargets<T, D> targets(chain, batch);
  PlainAdd add;
  for_each_point_owning_rows(batch * n, targets.rows, [&](int64_t q, const RowRange* own) {
    const int64_t b = q / n, p = q % n;
    T pos[1][D];
    T stash[kMaxComposed][1][D];
    for (int k = 0; k < D; ++k) pos[0][k] = x[b * x_batch_stride + k * n + p];
    chain_forward<T, D, 1>(chain, b, pos, stash);
    if (!chain_touches_only<T, D, 1>(chain, targets.target, b, stash, own)) return false;
    T a[1][D];
    for (int k = 0; k < D; ++k) a[0][k] = go[b * D * n + k * n + p];
    chain_backward<T, D, 1>(chain, b, stash, a, gx != nullptr, add);
    if (gx) {
      for (int k = 0; k < D; ++k) gx[b * D * n + k * n + p] = a[0][k];
    }
    return true;
  });
}

struct Kernels {
  static constexpr c10::DeviceType kDevice = at::kCPU;

  static at::Tensor forward(const TransformArgs& args) {
    at::Tensor out = at::empty(args.full_shape, args.points.options());
    AT_DISPATCH_FLOATING_TYPES(args.points.scalar_type(), "transform_points_cpu", [&] {
      dispatch_dims(args.d, [&](auto dims) {
        constexpr int D = decltype(dims)::value;
        forward_kernel<scalar_t, D>(chain_ref<scalar_t, D>(args.fields, args.batch), args.points, out, args.batch,
                                    args.n);
      });
    });
    return out;
  }

  static std::tuple<std::vector<at::Tensor>, at::Tensor> backward(const TransformArgs& args, const at::Tensor& grad,
                                                                  const std::vector<bool>& needs,
                                                                  bool points_needs_grad) {
    const auto grads = gradient_buffers(args.fields, needs);
    at::Tensor grad_points = points_needs_grad ? at::empty(args.full_shape, args.points.options()) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(args.points.scalar_type(), "transform_points_backward_cpu", [&] {
      dispatch_dims(args.d, [&](auto dims) {
        constexpr int D = decltype(dims)::value;
        backward_kernel<scalar_t, D>(chain_ref<scalar_t, D>(args.fields, grads, args.batch), args.points, grad,
                                     grad_points, args.batch, args.n);
      });
    });
    return {grads, grad_points};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(gradicon_fast, CPU, m) {
  m.impl("transform_points", &entry::transform_points<Kernels>);
  m.impl("transform_points_backward", &entry::transform_points_backward<Kernels>);
}

}  // namespace gradicon_fast::cpu
