// Analytic GradICON penalty on the CPU (docs/conventions.md §2): ‖J - I‖_F² with the exact chain-rule Jacobian
// J of φ_AB∘φ_BA at the penalty's points. One pass over the points for the loss, one for the
// gradients (recomputing the forward per point), nothing stored in between but the seed.
#include <torch/library.h>

#include "../gradicon_analytic_point.h"
#include "../op_entries.h"
#include "cpu_common.h"

namespace gradicon_fast::cpu {
namespace {

// Do the writes of a point sampled at x (axis 0) in batch entry b (rows index and index + 1 of
// the cell, counted over the batch when f has one) stay inside `range`? Written out here because
// cpu_common.h's touches_only locates with stride 0, so its upper-row step is always 0 and the
// row just past a block's range goes unchecked.
template <typename T, typename Field>
bool cell_rows_inside(const Field& f, int64_t b, T x0, const RowRange& range) {
  const AxisPos<T> a = locate(x0, f.size[0], int64_t(1));
  const int64_t lo = (f.batch_stride ? b * f.size[0] : 0) + a.index;
  const int64_t hi = lo + a.step;  // step is 1 unless the lower row is the last one
  return lo >= range.lo && hi < range.hi;
}

template <typename T, int D>
double forward_kernel(const ChainRef<T, D>& chain, const PenaltyPoints<T, D>& pts, int64_t batch) {
  return penalty_mean(pts, batch, [&](const T (&x)[D], int64_t b) {
    T y[D], dev[D][D];
    for (int k = 0; k < D; ++k) y[k] = x[k];
    jacobian_forward<T, D>(chain, b, y, dev, nullptr, nullptr);
    return squared_deviation(dev);
  });
}

template <typename T, int D>
void backward_kernel(const ChainRef<T, D>& chain, const PenaltyPoints<T, D>& pts, int64_t batch, T grad_loss) {
  const int64_t n = pts.num_points;
  const T scale = T(2) * grad_loss / static_cast<T>(batch * D * n);
  const ChainTargets<T, D> targets(chain, batch);
  PlainAdd add;
  for_each_point_owning_rows(batch * n, targets.rows, [&](int64_t q, const RowRange* own) {
    const int64_t b = q / n, p = q % n;
    T y[D], dev[D][D];
    penalty_point(pts, p, y);
    T stash_pos[kMaxComposed][D], stash_dev[kMaxComposed][D][D];
    jacobian_forward<T, D>(chain, b, y, dev, stash_pos, stash_dev);
    // Each field's writes touch the cell of y_j only (gradient target j is field j).
    for (int j = 0; j < chain.count; ++j) {
      if (chain.field[j].grad && !cell_rows_inside(chain.field[j], b, stash_pos[j][0], own[j])) return false;
    }
    for (int i = 0; i < D; ++i)
      for (int k = 0; k < D; ++k) dev[i][k] *= scale;
    jacobian_backward<T, D>(chain, b, stash_pos, stash_dev, dev, add);
    return true;
  });
}

struct Kernels {
  static constexpr c10::DeviceType kDevice = at::kCPU;

  static at::Tensor loss(const PairArgs& args) {
    double mean = 0.0;
    AT_DISPATCH_FLOATING_TYPES(args.fields[0].scalar_type(), "gradicon_analytic_loss_cpu", [&] {
      dispatch_dims(args.d, [&](auto dims) {
        constexpr int D = decltype(dims)::value;
        mean = forward_kernel<scalar_t, D>(chain_ref<scalar_t, D>(args.fields, args.batch), args.points<scalar_t, D>(),
                                           args.batch);
      });
    });
    return at::scalar_tensor(mean, args.fields[0].options());
  }

  static std::vector<at::Tensor> loss_backward(const PairArgs& args, const at::Tensor& grad,
                                               const std::vector<bool>& needs) {
    const auto grads = gradient_buffers(args.fields, needs);
    AT_DISPATCH_FLOATING_TYPES(args.fields[0].scalar_type(), "gradicon_analytic_loss_backward_cpu", [&] {
      const scalar_t grad_loss = grad.item<scalar_t>();
      dispatch_dims(args.d, [&](auto dims) {
        constexpr int D = decltype(dims)::value;
        backward_kernel<scalar_t, D>(chain_ref<scalar_t, D>(args.fields, grads, args.batch),
                                     args.points<scalar_t, D>(), args.batch, grad_loss);
      });
    });
    return grads;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(gradicon_fast, CPU, m) {
  m.impl("gradicon_analytic_loss", &entry::gradicon_analytic_loss<Kernels>);
  m.impl("gradicon_analytic_loss_backward", &entry::gradicon_analytic_loss_backward<Kernels>);
}

}  // namespace gradicon_fast::cpu
