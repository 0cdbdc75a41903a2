// Finite-difference GradICON penalty on the CPU (docs/conventions.md §2): one pass over the points for the
// loss, one for the gradients, nothing stored in between but the seed.
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "../gradicon_point.h"
#include "../op_entries.h"
#include "chain8.h"
#include "gradicon_lanes.h"
#include "cpu_common.h"
#include "visiting_order.h"

namespace gradicon_fast::cpu {
namespace {

template <typename T, int D>
double forward_kernel(const ChainRef<T, D>& chain, const PenaltyPoints<T, D>& pts, int64_t batch, T delta) {
  constexpr int E = D + 1;
  return penalty_mean(pts, batch, [&](const T (&x)[D], int64_t b) {
    T start[E][D], end[E][D];
    start_and_end_points(x, delta, start, end);
    chain_forward<T, D, E>(chain, b, end, nullptr);
    T g[D][D];
    return fd_gradient_error(start, end, delta, g);
  });
}

// The reverse pass of one point (batch entry b, point p); false, having written nothing, if it
// would add outside `own`.
template <typename T, int D>
bool backward_point(const ChainRef<T, D>& chain, const int* target, const PenaltyPoints<T, D>& pts, int64_t b,
                    int64_t p, T delta, T scale_sum, const RowRange* own, double* squared_sum) {
  constexpr int E = D + 1;
  T start[E][D], end[E][D];
  T stash[kMaxComposed][E][D];
  start_and_end_points_at(pts, p, delta, start, end);
  chain_forward<T, D, E>(chain, b, end, stash);
  if (!chain_touches_only<T, D, E>(chain, target, b, stash, own)) return false;
  T g[D][D], a[E][D];
  *squared_sum = fd_gradient_error(start, end, delta, g);
  fd_gradient_error_adjoint(g, delta, scale_sum, a);
  PlainAdd add;
  chain_backward<T, D, E>(chain, b, stash, a, false, add);
  return true;
}

// Adds ∂L/∂field to the gradient buffers of the chain, L = grad_loss · loss; returns Σ g² over
// every point and batch entry (the loss times B·D·N), which the fused forward-backward uses.
template <typename T, int D>
double backward_kernel(const ChainRef<T, D>& chain, const PenaltyPoints<T, D>& pts, int64_t batch, T delta,
                       T grad_loss) {
  const int64_t n = pts.num_points;
  const T scale_sum = grad_loss / static_cast<T>(batch * D * n);
  const ChainTargets<T, D> targets(chain, batch);
  const std::vector<RowRange> all = whole_rows(targets.rows);
  return for_each_item_owning_rows(
      batch * n, targets.rows, 256,
      [&](int64_t q, const RowRange* own, std::vector<int64_t>& deferred) {
        double sq = 0.0;
        if (!backward_point(chain, targets.target, pts, q / n, q % n, delta, scale_sum, own, &sq)) deferred.push_back(q);
        return sq;
      },
      [&](int64_t q) {
        double sq = 0.0;
        backward_point(chain, targets.target, pts, q / n, q % n, delta, scale_sum, all.data(), &sq);
        return sq;
      });
}

#ifdef GF_HAVE_SIMD8
using namespace simd;

// Eight points of a visiting order from position i0 (their indices go to p). Lanes past the last
// point repeat it and are inactive.
template <int D>
unsigned load_points8(const PenaltyPoints<float, D>& pts, const VisitingOrder<float, D>& order, int64_t i0,
                      f8 (&x)[D], int64_t (&p)[kLanes]) {
  alignas(32) float xs[D][kLanes];
  unsigned active = 0;
  for (int l = 0; l < kLanes; ++l) {
    if (i0 + l < pts.num_points) active |= 1u << l;
    float xp[D];
    order.point(pts, std::min(i0 + l, pts.num_points - 1), p[l], xp);
    for (int k = 0; k < D; ++k) xs[k][l] = xp[k];
  }
  for (int k = 0; k < D; ++k) x[k] = *reinterpret_cast<const f8*>(xs[k]);
  return active;
}

template <int D>
void shifted_points8(const f8 (&x)[D], float delta, f8 (&start)[D + 1][D]) {
  for (int e = 0; e <= D; ++e)
    for (int k = 0; k < D; ++k) start[e][k] = x[k];
  for (int k = 0; k < D; ++k) start[k + 1][k] = x[k] + splat(delta);
}

// g[k][c] = ((x - φ(x)) - (x_k - φ(x_k))) / δ per lane.
template <int D>
void fd_gradient_error8(const f8 (&start)[D + 1][D], const f8 (&end)[D + 1][D], float delta, f8 (&g)[D][D]) {
  for (int k = 0; k < D; ++k)
    for (int c = 0; c < D; ++c) g[k][c] = ((start[0][c] - end[0][c]) - (start[k + 1][c] - end[k + 1][c])) / splat(delta);
}

// Groups of eight points that go through the chain together, field by field (chain_forward8),
// so that the cache misses of one group's loads overlap the other's: the lung-scale step 6 %
// faster with two than with one; four measured the same as two.
constexpr int kGroupsPerItem = 2;

// Σ g² over the active lanes.
template <int D>
double squared_sum8(const f8 (&g)[D][D], unsigned active) {
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) {
    if (!(active >> l & 1)) continue;
    for (int k = 0; k < D; ++k)
      for (int c = 0; c < D; ++c) s += static_cast<double>(g[k][c][l] * g[k][c][l]);
  }
  return s;
}

template <int D>
double forward_kernel8(const ChainRef<float, D>& chain, const PenaltyPoints<float, D>& pts, int64_t batch, float delta) {
  constexpr int E = D + 1, G = kGroupsPerItem;
  const Strides32<D> s32 = strides32(chain);
  const int64_t items = (pts.num_points + G * kLanes - 1) / (G * kLanes);
  const VisitingOrder<float, D> order = visiting_order(pts);
  const double sum = deterministic_sum(items, [&](int64_t item) {
    f8 x[G][D];
    int64_t p[G][kLanes];
    unsigned active[G];
    for (int g = 0; g < G; ++g) active[g] = load_points8(pts, order, (item * G + g) * kLanes, x[g], p[g]);
    double s = 0.0;
    for (int64_t b = 0; b < batch; ++b) {
      f8 start[G][E][D], end[G][E][D];
      for (int g = 0; g < G; ++g) {
        shifted_points8(x[g], delta, start[g]);
        for (int e = 0; e < E; ++e)
          for (int k = 0; k < D; ++k) end[g][e][k] = start[g][e][k];
      }
      chain_forward8<D, E, G>(chain, s32, b, end, nullptr, nullptr);
      for (int g = 0; g < G; ++g) {
        f8 err[D][D];
        fd_gradient_error8(start[g], end[g], delta, err);
        s += squared_sum8(err, active[g]);
      }
    }
    return s;
  });
  return sum / static_cast<double>(batch * D * pts.num_points);
}

template <int D>
double backward_kernel8(const ChainRef<float, D>& chain, const PenaltyPoints<float, D>& pts, int64_t batch, float delta,
                      float grad_loss) {
  constexpr int E = D + 1, G = kGroupsPerItem;
  const int64_t n = pts.num_points;
  const int64_t items = (n + G * kLanes - 1) / (G * kLanes);  // per batch entry
  const float scale_sum = grad_loss / static_cast<float>(batch * D * n);
  const float s = 2.f * scale_sum / delta;
  const Strides32<D> s32 = strides32(chain);
  const ChainTargets<float, D> targets(chain, batch);
  const std::vector<RowRange> all = whole_rows(targets.rows);
  const VisitingOrder<float, D> order = visiting_order(pts);
  return for_each_item_owning_rows(
      batch * items, targets.rows, 32 / G,
      [&](int64_t item, const RowRange* own, std::vector<int64_t>& deferred) {
        const int64_t b = item / items;
        f8 x[G][D];
        int64_t p[G][kLanes];
        unsigned active[G];
        for (int g = 0; g < G; ++g) active[g] = load_points8(pts, order, ((item % items) * G + g) * kLanes, x[g], p[g]);
        f8 start[G][E][D], end[G][E][D];
        f8 stash[G][kMaxComposed][E][D];
        f8 jacobian[G][kMaxComposed][E][D][D];
        for (int g = 0; g < G; ++g) {
          shifted_points8(x[g], delta, start[g]);
          for (int e = 0; e < E; ++e)
            for (int k = 0; k < D; ++k) end[g][e][k] = start[g][e][k];
        }
        chain_forward8<D, E, G>(chain, s32, b, end, stash, jacobian);
        double sq = 0.0;
        for (int g = 0; g < G; ++g) {
          const unsigned owned = owned_lanes8<D, E>(chain, targets.target, b, stash[g], own) & active[g];
          for (unsigned rest = active[g] & ~owned; rest; rest &= rest - 1)
            deferred.push_back(b * n + p[g][__builtin_ctz(rest)]);
          f8 err[D][D], a[E][D];
          fd_gradient_error8(start[g], end[g], delta, err);
          for (int c = 0; c < D; ++c) a[0][c] = splat(0.f);
          for (int k = 0; k < D; ++k) {
            for (int c = 0; c < D; ++c) {
              const f8 v = err[k][c] * splat(s);
              a[0][c] -= v;
              a[k + 1][c] = v;
            }
          }
          chain_backward8<D, E>(chain, s32, b, stash[g], jacobian[g], a, owned);
          sq += squared_sum8(err, owned);
        }
        return sq;
      },
      [&](int64_t q) {
        double sq = 0.0;
        backward_point(chain, targets.target, pts, q / n, q % n, delta, scale_sum, all.data(), &sq);
        return sq;
      });
}
#endif  // GF_HAVE_SIMD8

namespace lanes_impl {
using namespace lanes;

// Lane e holds x + δ ê_{e-1} (lane 0: x); in 2D lane 3 repeats lane 0.
template <int D>
void start_lanes(const float (&x)[D], float delta, f4 (&start)[D]) {
  for (int k = 0; k < D; ++k) {
    start[k] = lanes::splat(x[k]);
    start[k][k + 1] = x[k] + delta;
  }
}

template <int D>
double forward(const ChainRef<float, D>& chain, const PenaltyPoints<float, D>& pts, int64_t batch, float delta) {
  const Strides32<D> st = strides32(chain);
  const double sum = deterministic_sum(pts.num_points, [&](int64_t p) {
    float x[D];
    penalty_point(pts, p, x);
    f4 start[D];
    start_lanes(x, delta, start);
    double s = 0.0;
    for (int64_t b = 0; b < batch; ++b) {
      f4 y[D];
      for (int k = 0; k < D; ++k) y[k] = start[k];
      chain_forward4<D>(chain, st.stride, b, y, nullptr);
      f4 e[D];
      for (int c = 0; c < D; ++c) e[c] = start[c] - y[c];
      for (int k = 0; k < D; ++k)
        for (int c = 0; c < D; ++c) {
          const float g = (e[c][0] - e[c][k + 1]) / delta;
          s += static_cast<double>(g * g);
        }
    }
    return s;
  });
  return sum / static_cast<double>(batch * D * pts.num_points);
}

template <int D>
double backward(const ChainRef<float, D>& chain, const PenaltyPoints<float, D>& pts, int64_t batch, float delta,
              float grad_loss) {
  const int64_t n = pts.num_points;
  const float scale_sum = grad_loss / static_cast<float>(batch * D * n);
  const float s = 2.f * scale_sum / delta;
  const Strides32<D> st = strides32(chain);
  const ChainTargets<float, D> targets(chain, batch);
  const std::vector<RowRange> all = whole_rows(targets.rows);
  // Σ g² of point q, or -1 (having written nothing) if it would leave `own`.
  auto point = [&](int64_t q, const RowRange* own) -> double {
    const int64_t b = q / n, p = q % n;
    float x[D];
    penalty_point(pts, p, x);
    f4 start[D], y[D], stash[kMaxComposed][D];
    start_lanes(x, delta, start);
    for (int k = 0; k < D; ++k) y[k] = start[k];
    chain_forward4<D>(chain, st.stride, b, y, stash);
    for (int j = 0; j < chain.count; ++j) {
      if (!chain.field[j].grad) continue;
      for (int e = 0; e <= D; ++e)
        if (!touches_only(chain.field[j], b, stash[j][0][e], own[targets.target[j]])) return -1.0;
    }
    f4 err[D], a[D];
    for (int c = 0; c < D; ++c) {
      err[c] = start[c] - y[c];
      a[c] = lanes::splat(0.f);
    }
    double sq = 0.0;
    for (int k = 0; k < D; ++k)
      for (int c = 0; c < D; ++c) {
        const float g = (err[c][0] - err[c][k + 1]) / delta;
        sq += static_cast<double>(g * g);
        const float v = g * s;
        a[c][0] -= v;
        a[c][k + 1] = v;
      }
    chain_backward4<D>(chain, st.stride, b, stash, a);
    return sq;
  };
  return for_each_item_owning_rows(
      batch * n, targets.rows, 256,
      [&](int64_t q, const RowRange* own, std::vector<int64_t>& deferred) {
        const double sq = point(q, own);
        if (sq >= 0.0) return sq;
        deferred.push_back(q);
        return 0.0;
      },
      [&](int64_t q) { return point(q, all.data()); });
}

}  // namespace lanes_impl

// Float32 goes through the eight-lane kernels when the build has them and the fields fit
// int32 offsets; everything else through the scalar ones.
// Which float32 kernels run: the eight-point AVX2 ones when built with AVX2 ("simd8"), else the
// portable four-lane ones ("lanes"); GRADICON_FAST_CPU_KERNEL=scalar|lanes|simd8 overrides (tests
// run every path). float64 always takes the scalar kernels.
enum class Path { kScalar, kLanes, kSimd8 };

inline Path float_path() {
  const char* env = std::getenv("GRADICON_FAST_CPU_KERNEL");
  const std::string want = env ? env : "";
  if (want == "scalar") return Path::kScalar;
  if (want == "lanes") return Path::kLanes;
#ifdef GF_HAVE_SIMD8
  return Path::kSimd8;
#else
  TORCH_CHECK(want != "simd8", "GRADICON_FAST_CPU_KERNEL=simd8, but the extension was built without AVX2");
  return Path::kLanes;
#endif
}

template <typename T, int D>
double forward(const ChainRef<T, D>& chain, const PenaltyPoints<T, D>& pts, int64_t batch, T delta) {
  if constexpr (std::is_same_v<T, float>) {
    if (fits_int32(chain)) {
      switch (float_path()) {
        case Path::kLanes:
          return lanes_impl::forward<D>(chain, pts, batch, delta);
#ifdef GF_HAVE_SIMD8
        case Path::kSimd8:
          return forward_kernel8<D>(chain, pts, batch, delta);
#endif
        default:
          break;
      }
    }
  }
  return forward_kernel<T, D>(chain, pts, batch, delta);
}

template <typename T, int D>
double backward(const ChainRef<T, D>& chain, const PenaltyPoints<T, D>& pts, int64_t batch, T delta, T grad_loss) {
  if constexpr (std::is_same_v<T, float>) {
    if (fits_int32(chain)) {
      switch (float_path()) {
        case Path::kLanes:
          return lanes_impl::backward<D>(chain, pts, batch, delta, grad_loss);
#ifdef GF_HAVE_SIMD8
        case Path::kSimd8:
          return backward_kernel8<D>(chain, pts, batch, delta, grad_loss);
#endif
        default:
          break;
      }
    }
  }
  return backward_kernel<T, D>(chain, pts, batch, delta, grad_loss);
}

struct Kernels {
  static constexpr c10::DeviceType kDevice = at::kCPU;

  static at::Tensor loss(const PairArgs& args, double delta) {
    double mean = 0.0;
    AT_DISPATCH_FLOATING_TYPES(args.fields[0].scalar_type(), "gradicon_loss_cpu", [&] {
      dispatch_dims(args.d, [&](auto dims) {
        constexpr int D = decltype(dims)::value;
        mean = forward<scalar_t, D>(chain_ref<scalar_t, D>(args.fields, args.batch), args.points<scalar_t, D>(),
                                    args.batch, static_cast<scalar_t>(delta));
      });
    });
    return at::scalar_tensor(mean, args.fields[0].options());
  }

  // Fills gradient buffers for the masked fields with grad_loss · ∂loss/∂field; returns the loss.
  static double run_backward(const PairArgs& args, double grad_loss, double delta,
                             const std::vector<at::Tensor>& grads) {
    double squared_sum = 0.0;
    AT_DISPATCH_FLOATING_TYPES(args.fields[0].scalar_type(), "gradicon_loss_backward_cpu", [&] {
      dispatch_dims(args.d, [&](auto dims) {
        constexpr int D = decltype(dims)::value;
        squared_sum = backward<scalar_t, D>(chain_ref<scalar_t, D>(args.fields, grads, args.batch),
                                            args.points<scalar_t, D>(), args.batch, static_cast<scalar_t>(delta),
                                            static_cast<scalar_t>(grad_loss));
      });
    });
    return squared_sum / static_cast<double>(args.batch * args.d * args.num_points);
  }

  static std::vector<at::Tensor> loss_backward(const PairArgs& args, const at::Tensor& grad,
                                               const std::vector<bool>& needs, double delta) {
    const auto grads = gradient_buffers(args.fields, needs);
    run_backward(args, grad.item<double>(), delta, grads);
    return grads;
  }

  // One pass over the points: half the work of the forward op followed by the backward op.
  static std::pair<at::Tensor, std::vector<at::Tensor>> loss_and_grad(const PairArgs& args,
                                                                      const std::vector<bool>& needs, double delta) {
    const auto grads = gradient_buffers(args.fields, needs);
    const double loss = run_backward(args, 1.0, delta, grads);
    return {at::scalar_tensor(loss, args.fields[0].options()), grads};
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(gradicon_fast, CPU, m) {
  m.impl("gradicon_loss", &entry::gradicon_loss<Kernels>);
  m.impl("gradicon_loss_backward", &entry::gradicon_loss_backward<Kernels>);
  m.impl("gradicon_loss_and_grad", &entry::gradicon_loss_and_grad<Kernels>);
}

}  // namespace gradicon_fast::cpu
