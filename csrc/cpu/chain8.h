// chain_forward / chain_backward of chain.h for eight points at once (AVX2, float32).
#pragma once

#include "simd8.h"

#ifdef GF_HAVE_SIMD8

#include "../chain.h"
#include "cpu_common.h"

namespace gradicon_fast::cpu::simd {

template <int D, int E>
inline void chain_forward8(const ChainRef<float, D>& chain, const Strides32<D>& s32, int64_t b, f8 (&y)[E][D],
                           f8 (*stash)[E][D]) {
  for (int j = chain.count - 1; j >= 0; --j) {
    const FieldRef<float, D>& f = chain.field[j];
    const float* data = f.data + b * f.batch_stride;
    for (int e = 0; e < E; ++e) {
      const Cell8<D> c = locate_cell8<D>(y[e], f.size, s32.stride[j]);
      f8 v[D];
      for (int ch = 0; ch < D; ++ch) v[ch] = interpolate8(data + ch * f.channel_stride, c);
      for (int k = 0; k < D; ++k) {
        if (stash) stash[j][e][k] = y[e][k];
        y[e][k] += v[k];
      }
    }
  }
}

// Lanes whose every gradient write through `chain` stays inside `ranges` (bit l = lane l).
template <int D, int E>
inline unsigned owned_lanes8(const ChainRef<float, D>& chain, const int* target, int64_t b, const f8 (*stash)[E][D],
                             const RowRange* ranges) {
  i8 ok = splat_i(-1);
  for (int j = 0; j < chain.count; ++j) {
    const FieldRef<float, D>& f = chain.field[j];
    if (!f.grad) continue;
    const int64_t row0 = f.batch_stride ? b * f.size[0] : 0;
    // Rows relative to row0 fit int32 (size < 2^31).
    const i8 lo = splat_i(static_cast<int32_t>(std::max<int64_t>(ranges[target[j]].lo - row0, INT32_MIN)));
    const i8 hi = splat_i(static_cast<int32_t>(std::min<int64_t>(ranges[target[j]].hi - row0, INT32_MAX)));
    for (int e = 0; e < E; ++e) {
      const Axis8 a = locate8(stash[j][e][0], f.size[0], 0);
      const i8 top = a.index + (a.index < splat_i(f.size[0] - 1) ? splat_i(1) : splat_i(0));
      ok &= (a.index >= lo) & (top < hi);
    }
  }
  return static_cast<unsigned>(_mm256_movemask_ps(reinterpret_cast<__m256>(ok)));
}

// Adds a[e][ch] * weight to the corners of each active lane's cells; when a lane's E points
// share a cell, their contributions are summed before the write (as scatter_to_cells does).
template <int D, int E>
inline void scatter8(float* grad, int64_t channel_stride, const Cell8<D> (&c)[E], const f8 (&a)[E][D],
                     unsigned active) {
  constexpr int kCorners = 1 << D;
  alignas(32) float w[E][kCorners][kLanes];
  alignas(32) int32_t off[E][kCorners][kLanes];
  alignas(32) float adj[E][D][kLanes];
  for (int e = 0; e < E; ++e) {
    f8 wv[kCorners];
    i8 ov[kCorners];
    corner_weights8<D>(c[e], wv, ov);
    for (int corner = 0; corner < kCorners; ++corner) {
      *reinterpret_cast<f8*>(w[e][corner]) = wv[corner];
      *reinterpret_cast<i8*>(off[e][corner]) = ov[corner];
    }
    for (int ch = 0; ch < D; ++ch) *reinterpret_cast<f8*>(adj[e][ch]) = a[e][ch];
  }
  while (active) {
    const int l = __builtin_ctz(active);
    active &= active - 1;
    bool merged = true;
    for (int e = 1; e < E; ++e)
      for (int corner = 0; corner < kCorners; ++corner) merged = merged && off[e][corner][l] == off[0][corner][l];
    if (merged) {
      for (int ch = 0; ch < D; ++ch) {
        float* g = grad + ch * channel_stride;
        for (int corner = 0; corner < kCorners; ++corner) {
          float v = 0.f;
          for (int e = 0; e < E; ++e) v += adj[e][ch][l] * w[e][corner][l];
          g[off[0][corner][l]] += v;
        }
      }
    } else {
      for (int e = 0; e < E; ++e) {
        for (int ch = 0; ch < D; ++ch) {
          float* g = grad + ch * channel_stride;
          for (int corner = 0; corner < kCorners; ++corner) g[off[e][corner][l]] += adj[e][ch][l] * w[e][corner][l];
        }
      }
    }
  }
}

// Reverse pass for the active lanes; a[e] holds ∂L/∂φ(x_e) on entry, ∂L/∂x_e on exit.
template <int D, int E>
inline void chain_backward8(const ChainRef<float, D>& chain, const Strides32<D>& s32, int64_t b,
                            const f8 (*stash)[E][D], f8 (&a)[E][D], unsigned active, bool need_point_grad) {
  for (int j = 0; j < chain.count; ++j) {
    const FieldRef<float, D>& f = chain.field[j];
    Cell8<D> c[E];
    for (int e = 0; e < E; ++e) c[e] = locate_cell8<D>(stash[j][e], f.size, s32.stride[j]);
    if (f.grad) scatter8<D, E>(f.grad + b * f.batch_stride, f.channel_stride, c, a, active);
    if (j == chain.count - 1 && !need_point_grad) break;
    const float* data = f.data + b * f.batch_stride;
    for (int e = 0; e < E; ++e) {
      f8 next[D];
      for (int k = 0; k < D; ++k) next[k] = a[e][k];
      for (int ch = 0; ch < D; ++ch) {
        f8 grad_s[D];
        interpolate_gradient8(data + ch * f.channel_stride, c[e], grad_s);
        for (int k = 0; k < D; ++k) next[k] += a[e][ch] * grad_s[k];
      }
      for (int k = 0; k < D; ++k) a[e][k] = next[k];
    }
  }
}

}  // namespace gradicon_fast::cpu::simd

#endif  // GF_HAVE_SIMD8
