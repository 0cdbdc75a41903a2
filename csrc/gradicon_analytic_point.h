// Per-point math of the analytic GradICON penalty (docs/conventions.md §2, "Analytic GradICON"), shared by the
// CPU and CUDA kernels.
//
// The chain φ = Φ_1∘…∘Φ_M (fields outermost first, field M applied first) maps x through
// y_M = x, y_{j-1} = y_j + s_j(y_j), with s_j(y) = sample(D_j, y). Its exact Jacobian is
//   J = (I + G_1)(I + G_2)…(I + G_M),   G_j = ∇s_j(y_j)   (G[c][k] = ∂s_c/∂x_k),
// the gradient of the (tri)linear interpolant inside the cell, zero along an axis whose index is
// clamped (sampling.h's interpolate_gradient). The penalty at a point is ‖J - I‖_F²; the loss is
// its sum over the batch and the points divided by B·d·N.
//
// Forward. J - I is accumulated as a deviation M (no cancellation when J ≈ I):
//   M_{M+1} = 0,   M_j = G_j + M_{j+1} + G_j M_{j+1}   (= (I + G_j)(I + M_{j+1}) - I),   J - I = M_1.
//
// Reverse (fields outermost first, j = 1…M), with M̄_1 = ∂L/∂(J - I) = 2·scale·M_1 and ȳ_0 = 0
// (the end point φ(x) itself is not penalised):
//   Ḡ_j      = M̄_j (I + M_{j+1})ᵀ = M̄_j + M̄_j M_{j+1}ᵀ
//   M̄_{j+1}  = M̄_j + G_jᵀ M̄_j
// Field j enters through s_j(y_j) (into y_{j-1}) and G_j. With corner weights w_c(y) of y's cell
// and corner values V_c, s_j(y) = Σ_c w_c V_c and G_j[ch][k] = Σ_c ∂_k w_c V_c[ch], so
//   ∂L/∂V_c[ch] = ȳ_{j-1}[ch] w_c + Σ_k Ḡ_j[ch][k] ∂_k w_c,
//   ȳ_j[m]      = ȳ_{j-1}[m] + Σ_ch ȳ_{j-1}[ch] G_j[ch][m] + Σ_{ch, k≠m} Ḡ_j[ch][k] ∂²s_ch/∂x_k∂x_m.
// For multilinear interpolation ∂²/∂x_k² vanishes inside a cell; the mixed partials are
//   ∂_k∂_m w_c = σ_k σ_m p'_k p'_m Π_{i≠k,m} φ_i(c),
// with φ_i(c) = frac_i on the upper corner and 1 - frac_i on the lower one, σ = ±1 (upper/lower)
// and p'_k = d(index)/dx_k (size - 1 inside, 0 where clamped, so clamped axes contribute nothing).
// The forward is recomputed per point in the backward op; the positions y_j and the deviations
// M_{j+1} are stashed on the stack (M·d·(d + 1) numbers): nothing is stored between the ops.
#pragma once

#include "chain.h"

namespace gradicon_fast {

// Σ ‖M‖_F² in double.
template <typename T, int D>
GF_HD double squared_deviation(const T (&m)[D][D]) {
  double s = 0.0;
#pragma unroll
  for (int i = 0; i < D; ++i) {
#pragma unroll
    for (int k = 0; k < D; ++k) s += static_cast<double>(m[i][k] * m[i][k]);
  }
  return s;
}

// out = c + op(a) op(b), op(m) = mᵀ where the flag is set, summed left to right from c: out[i][k] =
// c[i][k] + Σ_l a(i, l) b(l, k). out must not alias the inputs.
template <bool kTransA, bool kTransB, typename T, int D>
GF_HD void plus_product(const T (&c)[D][D], const T (&a)[D][D], const T (&b)[D][D], T (&out)[D][D]) {
#pragma unroll
  for (int i = 0; i < D; ++i) {
#pragma unroll
    for (int k = 0; k < D; ++k) {
      T s = c[i][k];
#pragma unroll
      for (int l = 0; l < D; ++l) s += (kTransA ? a[l][i] : a[i][l]) * (kTransB ? b[k][l] : b[l][k]);
      out[i][k] = s;
    }
  }
}

// Forward pass at one point x of batch entry b: y ← φ(x) and dev ← J(x) - I, computed in T.
// `Chain` is a ChainRef (chain.h); its fields may be stored in another type than T (e.g. half
// values computed in float). When the stash pointers are set, stash_pos[j] receives y_j (where field j is sampled) and stash_dev[j] the
// deviation M_{j+1} before field j is applied.
template <typename T, int D, typename Chain>
GF_HD void jacobian_forward(const Chain& chain, int64_t b, T (&y)[D], T (&dev)[D][D], T (*stash_pos)[D],
                            T (*stash_dev)[D][D]) {
#pragma unroll
  for (int i = 0; i < D; ++i) {
#pragma unroll
    for (int k = 0; k < D; ++k) dev[i][k] = T(0);
  }
  for (int j = chain.count - 1; j >= 0; --j) {
    const auto& f = chain.field[j];
    const auto* data = f.data + b * f.batch_stride;
    const Cell<T, D> c = locate_in(f, y);
    if (stash_pos) {
#pragma unroll
      for (int k = 0; k < D; ++k) stash_pos[j][k] = y[k];
    }
    if (stash_dev) {
#pragma unroll
      for (int i = 0; i < D; ++i) {
#pragma unroll
        for (int k = 0; k < D; ++k) stash_dev[j][i][k] = dev[i][k];
      }
    }
    T s[D], g[D][D];
#pragma unroll
    for (int ch = 0; ch < D; ++ch) {
      const auto* fc = data + ch * f.channel_stride;
      s[ch] = interpolate(fc, c);
      interpolate_gradient(fc, c, g[ch]);
    }
    // dev ← G + dev + G·dev
    T next[D][D];
#pragma unroll
    for (int i = 0; i < D; ++i) {
#pragma unroll
      for (int k = 0; k < D; ++k) {
        T v = g[i][k] + dev[i][k];
#pragma unroll
        for (int l = 0; l < D; ++l) v += g[i][l] * dev[l][k];
        next[i][k] = v;
      }
    }
#pragma unroll
    for (int i = 0; i < D; ++i) {
#pragma unroll
      for (int k = 0; k < D; ++k) dev[i][k] = next[i][k];
    }
#pragma unroll
    for (int k = 0; k < D; ++k) y[k] += s[k];
  }
}

// Corner weights of a cell and their first derivatives with respect to the coordinates.
// Corner bit (D - 1 - k) set = upper corner along axis k (sampling.h's corner_weights order).
template <typename T, int D>
struct CornerDerivatives {
  static constexpr int kCorners = 1 << D;
  T factor[D][2];           // φ_k for the lower [0] and upper [1] corner: 1 - frac, frac
  T slope[D][2];            // dφ_k/dx_k: -p'_k, +p'_k
  T w[kCorners];            // Π_k φ_k
  T dw[D][kCorners];        // ∂w/∂x_k
  int64_t offset[kCorners];
};

template <typename T, int D>
GF_HD void corner_derivatives(const Cell<T, D>& c, CornerDerivatives<T, D>& cd) {
#pragma unroll
  for (int k = 0; k < D; ++k) {
    cd.factor[k][0] = T(1) - c.ax[k].frac;
    cd.factor[k][1] = c.ax[k].frac;
    cd.slope[k][0] = -c.ax[k].dpdx;
    cd.slope[k][1] = c.ax[k].dpdx;
  }
#pragma unroll
  for (int corner = 0; corner < (1 << D); ++corner) {
    int64_t o = c.base;
    T w = T(1);
#pragma unroll
    for (int k = 0; k < D; ++k) {
      const int u = (corner >> (D - 1 - k)) & 1;
      w *= cd.factor[k][u];
      o += u ? c.ax[k].step : 0;
    }
    cd.w[corner] = w;
    cd.offset[corner] = o;
#pragma unroll
    for (int k = 0; k < D; ++k) {
      T v = cd.slope[k][(corner >> (D - 1 - k)) & 1];
#pragma unroll
      for (int i = 0; i < D; ++i) {
        if (i != k) v *= cd.factor[i][(corner >> (D - 1 - i)) & 1];
      }
      cd.dw[k][corner] = v;
    }
  }
}

// ∂²w_c/∂x_k∂x_m for k ≠ m.
template <typename T, int D>
GF_HD T mixed_weight_derivative(const CornerDerivatives<T, D>& cd, int corner, int k, int m) {
  T v = cd.slope[k][(corner >> (D - 1 - k)) & 1] * cd.slope[m][(corner >> (D - 1 - m)) & 1];
#pragma unroll
  for (int i = 0; i < D; ++i) {
    if (i != k && i != m) v *= cd.factor[i][(corner >> (D - 1 - i)) & 1];
  }
  return v;
}

// Reverse pass of jacobian_forward at one point of batch entry b, from the stash it filled.
// dev_adj holds ∂L/∂(J - I) on entry (it is overwritten). Field gradients (for the fields with a
// gradient buffer, in T) go through add(pointer, value): one call per corner and channel.
template <typename T, int D, typename Chain, typename Add>
GF_HD void jacobian_backward(const Chain& chain, int64_t b, const T (*stash_pos)[D],
                             const T (*stash_dev)[D][D], T (&dev_adj)[D][D], Add& add) {
  constexpr int kCorners = 1 << D;
  T y_adj[D];  // ∂L/∂y_{j-1}
#pragma unroll
  for (int k = 0; k < D; ++k) y_adj[k] = T(0);
  for (int j = 0; j < chain.count; ++j) {
    const auto& f = chain.field[j];
    const bool last = j == chain.count - 1;  // applied first, at x: no adjoint beyond it
    if (!f.grad && last) break;
    const auto* data = f.data + b * f.batch_stride;
    const Cell<T, D> c = locate_in(f, stash_pos[j]);
    CornerDerivatives<T, D> cd;
    corner_derivatives(c, cd);
    T v[kCorners][D];
#pragma unroll
    for (int corner = 0; corner < kCorners; ++corner) {
#pragma unroll
      for (int ch = 0; ch < D; ++ch) v[corner][ch] = static_cast<T>(data[ch * f.channel_stride + cd.offset[corner]]);
    }
    // Ḡ = M̄ + M̄ M_{j+1}ᵀ
    T g_adj[D][D];
    plus_product<false, true>(dev_adj, dev_adj, stash_dev[j], g_adj);
    if (f.grad) {
      T* grad = f.grad + b * f.batch_stride;
#pragma unroll
      for (int corner = 0; corner < kCorners; ++corner) {
#pragma unroll
        for (int ch = 0; ch < D; ++ch) {
          T a = y_adj[ch] * cd.w[corner];
#pragma unroll
          for (int k = 0; k < D; ++k) a += g_adj[ch][k] * cd.dw[k][corner];
          add(grad + ch * f.channel_stride + cd.offset[corner], a);
        }
      }
    }
    if (last) break;
    // ȳ_j[m] = ȳ[m] + Σ_c (r_c ∂_m w_c + Σ_{k≠m} q_c[k] ∂_k∂_m w_c),
    // r_c = Σ_ch V_c[ch] ȳ[ch], q_c[k] = Σ_ch V_c[ch] Ḡ[ch][k]; and G = Σ_c V_c ⊗ ∇w_c.
    T next[D], g[D][D];
#pragma unroll
    for (int m = 0; m < D; ++m) {
      next[m] = y_adj[m];
#pragma unroll
      for (int ch = 0; ch < D; ++ch) g[ch][m] = T(0);
    }
#pragma unroll
    for (int corner = 0; corner < kCorners; ++corner) {
      T r = T(0), q[D];
#pragma unroll
      for (int k = 0; k < D; ++k) q[k] = T(0);
#pragma unroll
      for (int ch = 0; ch < D; ++ch) {
        r += v[corner][ch] * y_adj[ch];
#pragma unroll
        for (int k = 0; k < D; ++k) q[k] += v[corner][ch] * g_adj[ch][k];
      }
#pragma unroll
      for (int m = 0; m < D; ++m) {
        T t = r * cd.dw[m][corner];
#pragma unroll
        for (int k = 0; k < D; ++k) {
          if (k != m) t += q[k] * mixed_weight_derivative(cd, corner, k, m);
        }
        next[m] += t;
#pragma unroll
        for (int ch = 0; ch < D; ++ch) g[ch][m] += v[corner][ch] * cd.dw[m][corner];
      }
    }
    // M̄_{j+1} = M̄_j + Gᵀ M̄_j
    T dnext[D][D];
    plus_product<true, false>(dev_adj, g, dev_adj, dnext);
#pragma unroll
    for (int i = 0; i < D; ++i) {
      y_adj[i] = next[i];
#pragma unroll
      for (int k = 0; k < D; ++k) dev_adj[i][k] = dnext[i][k];
    }
  }
}

}  // namespace gradicon_fast
