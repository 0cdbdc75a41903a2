// ICON penalty on the CPU (docs/conventions.md §2): mean((x - φ_AB(φ_BA(x)))²) + mean((x - φ_BA(φ_AB(x)))²).
#include <torch/library.h>

#include "../op_entries.h"
#include "cpu_common.h"

namespace gradicon_fast::cpu {
namespace {

// Both compositions of the pair. Field gradient targets: φ_AB's fields are 0..n_ab-1, φ_BA's follow.
template <typename T, int D>
struct Pair {
  ChainRef<T, D> ab_ba, ba_ab;
  int target_ab_ba[kMaxComposed], target_ba_ab[kMaxComposed];
};

template <typename T, int D>
Pair<T, D> make_pair(const std::vector<at::Tensor>& ab, const std::vector<at::Tensor>& ba,
                     const std::vector<at::Tensor>& grad_ab, const std::vector<at::Tensor>& grad_ba, int64_t batch) {
  Pair<T, D> pair;
  pair.ab_ba = chain_ref<T, D>(concatenated(ab, ba), concatenated(grad_ab, grad_ba), batch);
  pair.ba_ab = chain_ref<T, D>(concatenated(ba, ab), concatenated(grad_ba, grad_ab), batch);
  const int n_ab = static_cast<int>(ab.size()), n_ba = static_cast<int>(ba.size());
  for (int j = 0; j < n_ab + n_ba; ++j) {
    pair.target_ab_ba[j] = j;
    pair.target_ba_ab[j] = j < n_ba ? n_ab + j : j - n_ba;
  }
  return pair;
}

template <typename T, int D>
double squared_error(const T (&x)[D], const T (&y)[1][D]) {
  double s = 0.0;
  for (int k = 0; k < D; ++k) {
    const T e = x[k] - y[0][k];
    s += static_cast<double>(e * e);
  }
  return s;
}

template <typename T, int D>
double forward_kernel(const Pair<T, D>& pair, const PenaltyPoints<T, D>& pts, int64_t batch) {
  return penalty_mean(pts, batch, [&](const T (&x)[D], int64_t b) {
    T y1[1][D], y2[1][D];
    for (int k = 0; k < D; ++k) y1[0][k] = y2[0][k] = x[k];
    chain_forward<T, D, 1>(pair.ab_ba, b, y1, nullptr);
    chain_forward<T, D, 1>(pair.ba_ab, b, y2, nullptr);
    return squared_error(x, y1) + squared_error(x, y2);
  });
}

template <typename T, int D>
void backward_kernel(const Pair<T, D>& pair, const PenaltyPoints<T, D>& pts, int64_t batch, T grad_loss,
                     const std::vector<int64_t>& rows) {
  const int64_t n = pts.num_points;
  const T scale = T(2) * grad_loss / static_cast<T>(batch * D * n);
  PlainAdd add;
  for_each_point_owning_rows(batch * n, rows, [&](int64_t q, const RowRange* own) {
    const int64_t b = q / n, p = q % n;
    T x[D];
    penalty_point(pts, p, x);
    T y1[1][D], y2[1][D], stash1[kMaxComposed][1][D], stash2[kMaxComposed][1][D];
    for (int k = 0; k < D; ++k) y1[0][k] = y2[0][k] = x[k];
    chain_forward<T, D, 1>(pair.ab_ba, b, y1, stash1);
    chain_forward<T, D, 1>(pair.ba_ab, b, y2, stash2);
    if (!chain_touches_only<T, D, 1>(pair.ab_ba, pair.target_ab_ba, b, stash1, own) ||
        !chain_touches_only<T, D, 1>(pair.ba_ab, pair.target_ba_ab, b, stash2, own)) {
      return false;
    }
    T a1[1][D], a2[1][D];
    for (int k = 0; k < D; ++k) {
      a1[0][k] = -scale * (x[k] - y1[0][k]);
      a2[0][k] = -scale * (x[k] - y2[0][k]);
    }
    chain_backward<T, D, 1>(pair.ab_ba, b, stash1, a1, false, add);
    chain_backward<T, D, 1>(pair.ba_ab, b, stash2, a2, false, add);
    return true;
  });
}

struct Kernels {
  static constexpr c10::DeviceType kDevice = at::kCPU;

  static at::Tensor loss(const PairArgs& args) {
    const std::vector<at::Tensor> none_ab(args.ab.size()), none_ba(args.ba.size());
    double mean = 0.0;
    AT_DISPATCH_FLOATING_TYPES(args.fields[0].scalar_type(), "icon_loss_cpu", [&] {
      dispatch_dims(args.d, [&](auto dims) {
        constexpr int D = decltype(dims)::value;
        mean = forward_kernel<scalar_t, D>(make_pair<scalar_t, D>(args.ab, args.ba, none_ab, none_ba, args.batch),
                                           args.points<scalar_t, D>(), args.batch);
      });
    });
    return at::scalar_tensor(mean, args.fields[0].options());
  }

  static std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> loss_backward(
      const PairArgs& args, const at::Tensor& grad, const std::vector<bool>& needs_ab,
      const std::vector<bool>& needs_ba) {
    const auto grad_ab = gradient_buffers(args.ab, needs_ab), grad_ba = gradient_buffers(args.ba, needs_ba);
    AT_DISPATCH_FLOATING_TYPES(args.fields[0].scalar_type(), "icon_loss_backward_cpu", [&] {
      const scalar_t grad_loss = grad.item<scalar_t>();
      dispatch_dims(args.d, [&](auto dims) {
        constexpr int D = decltype(dims)::value;
        const auto pair = make_pair<scalar_t, D>(args.ab, args.ba, grad_ab, grad_ba, args.batch);
        std::vector<int64_t> rows;
        for (int j = 0; j < pair.ab_ba.count; ++j) rows.push_back(gradient_rows(pair.ab_ba.field[j], args.batch));
        backward_kernel<scalar_t, D>(pair, args.points<scalar_t, D>(), args.batch, grad_loss, rows);
      });
    });
    return {grad_ab, grad_ba};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(gradicon_fast, CPU, m) {
  m.impl("icon_loss", &entry::icon_loss<Kernels>);
  m.impl("icon_loss_backward", &entry::icon_loss_backward<Kernels>);
}

}  // namespace gradicon_fast::cpu
