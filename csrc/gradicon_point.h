// Per-point pieces of the finite-difference GradICON penalty (docs/conventions.md §2), shared by the CPU and
// CUDA kernels. Each point x travels with its D shifted copies x + δ ê_k (E = D + 1 points);
// g_k = (e(x) - e(x + δ ê_k)) / δ with e(x) = x - φ(x).
#pragma once

#include "penalty_points.h"
#include "sampling.h"

namespace gradicon_fast {

template <typename T, int D>
GF_HD void shifted_points(const T (&x)[D], T delta, T (&start)[D + 1][D]) {
#pragma unroll
  for (int e = 0; e <= D; ++e) {
#pragma unroll
    for (int k = 0; k < D; ++k) start[e][k] = x[k];
  }
#pragma unroll
  for (int k = 0; k < D; ++k) start[k + 1][k] = x[k] + delta;
}

// The E points of x as start (kept) and end (to be mapped through φ): equal on return.
template <typename T, int D>
GF_HD void start_and_end_points(const T (&x)[D], T delta, T (&start)[D + 1][D], T (&end)[D + 1][D]) {
  shifted_points(x, delta, start);
#pragma unroll
  for (int e = 0; e <= D; ++e) {
#pragma unroll
    for (int k = 0; k < D; ++k) end[e][k] = start[e][k];
  }
}

// The same for penalty point p.
template <typename T, int D>
GF_HD void start_and_end_points_at(const PenaltyPoints<T, D>& pts, int64_t p, T delta, T (&start)[D + 1][D],
                                   T (&end)[D + 1][D]) {
  T x[D];
  penalty_point(pts, p, x);
  start_and_end_points(x, delta, start, end);
}

// g[k][c] for the E evaluated points (start → end); returns Σ g² in double.
template <typename T, int D>
GF_HD double fd_gradient_error(const T (&start)[D + 1][D], const T (&end)[D + 1][D], T delta, T (&g)[D][D]) {
  double sum = 0.0;
#pragma unroll
  for (int k = 0; k < D; ++k) {
#pragma unroll
    for (int c = 0; c < D; ++c) {
      const T e0 = start[0][c] - end[0][c];
      const T ek = start[k + 1][c] - end[k + 1][c];
      g[k][c] = (e0 - ek) / delta;
      sum += static_cast<double>(g[k][c] * g[k][c]);
    }
  }
  return sum;
}

// ∂L/∂φ(start[e]) for L = scale_sum · Σ g², where scale_sum = grad_loss / (B·D·N).
template <typename T, int D>
GF_HD void fd_gradient_error_adjoint(const T (&g)[D][D], T delta, T scale_sum, T (&a)[D + 1][D]) {
  const T s = T(2) * scale_sum / delta;
#pragma unroll
  for (int c = 0; c < D; ++c) a[0][c] = T(0);
#pragma unroll
  for (int k = 0; k < D; ++k) {
#pragma unroll
    for (int c = 0; c < D; ++c) {
      const T v = g[k][c] * s;
      a[0][c] -= v;
      a[k + 1][c] = v;
    }
  }
}

}  // namespace gradicon_fast
