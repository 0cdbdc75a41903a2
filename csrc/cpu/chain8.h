// chain_forward / chain_backward of chain.h for eight points at once (AVX2, float32).
#pragma once

#include "simd8.h"

#ifdef GF_HAVE_SIMD8

#include "../chain.h"
#include "cpu_common.h"

namespace gradicon_fast::cpu::simd {

// y ← f(y) for one field f of a chain, at GradICON's E points per lane: point 0 and its shifts
// x + δ ê_k (e = k + 1). stash (if given) keeps the positions f is sampled at, and jacobian (if
// given) its spatial derivatives there, jacobian[e][ch][k] = ∂f_ch/∂x_k, for the reverse pass.
//
// The corners of point 0's cells are loaded; the shifted points mostly fall in the same cell,
// or in the next one along axis k when δ crosses a voxel boundary (δ is a sixth of a voxel at
// 175³): those share a face with point 0's cell and load only the other face. Lanes whose cell
// differs otherwise load all corners. (Prefetching the cells a later group would read, guessed
// from these, stopped paying once these loads were plain loads instead of gathers.)
template <int D, int E>
inline void field_forward8(const FieldRef<float, D>& f, const int32_t* stride, int64_t b, f8 (&y)[E][D],
                           f8 (*stash)[D], f8 (*jacobian)[D][D]) {
  constexpr int kCorners = 1 << D;
  const float* data = f.data + b * f.batch_stride;
  Cell8<D> c[E];
  for (int e = 0; e < E; ++e) c[e] = locate_cell8<D>(y[e], f.size, stride);
  f8 corners0[D][kCorners];
  load_corners8<D>(data, f.channel_stride, f.size[D - 1], c[0], corners0);
  f8 v[E][D];
  for (int e = 0; e < E; ++e) {
    f8 corners[D][kCorners];
    for (int ch = 0; ch < D; ++ch)
      for (int q = 0; q < kCorners; ++q) corners[ch][q] = corners0[ch][q];
    if (e > 0) {
      const CellMove m = cell_move8<D>(c[0], c[e], (e - 1) % D);
      if (m.face_lanes) {
        const int bit = 1 << (D - 1 - m.axis);
        for (int ch = 0; ch < D; ++ch)
          for (int q = 0; q < kCorners; ++q)
            if (!(q & bit)) corners[ch][q] = m.face ? corners0[ch][q | bit] : corners[ch][q];
        load_lane_corners8<D>(data, f.channel_stride, c[e], face_corners<D>(m.axis), m.face, m.face_lanes, corners);
      }
      if (m.other_lanes)
        load_lane_corners8<D>(data, f.channel_stride, c[e], (1u << kCorners) - 1, m.other, m.other_lanes, corners);
    }
    for (int ch = 0; ch < D; ++ch) {
      v[e][ch] = interpolate_corners8(corners[ch], c[e]);
      if (jacobian) gradient_corners8(corners[ch], c[e], jacobian[e][ch]);
    }
  }
  for (int e = 0; e < E; ++e)
    for (int k = 0; k < D; ++k) {
      if (stash) stash[e][k] = y[e][k];
      y[e][k] += v[e][k];
    }
}

// y ← φ(y) through the chain. stash (if given) keeps each field's input positions and jacobian
// (if given) its spatial derivatives there, jacobian[j][e][ch][k] = ∂field_j,ch/∂x_k.
template <int D, int E>
inline void chain_forward8(const ChainRef<float, D>& chain, const Strides32<D>& s32, int64_t b, f8 (&y)[E][D],
                           f8 (*stash)[E][D], f8 (*jacobian)[E][D][D]) {
  for (int j = chain.count - 1; j >= 0; --j)
    field_forward8<D, E>(chain.field[j], s32.stride[j], b, y, stash ? stash[j] : nullptr,
                         jacobian ? jacobian[j] : nullptr);
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

// Adds a[e][ch] * weight to the corners of each active lane's cells. The contributions of the
// points that share point 0's cell (all E of them in most lanes) are summed on vectors and
// written once; a point in another cell writes its own corners. The writes go lane by lane.
template <int D, int E>
inline void scatter8(float* grad, int64_t channel_stride, const Cell8<D> (&c)[E], const f8 (&a)[E][D],
                     unsigned active) {
  constexpr int kCorners = 1 << D;
  f8 w[E][kCorners];
  for (int e = 0; e < E; ++e) corner_weights8<D>(c[e], w[e]);
  alignas(32) int32_t off[kCorners][kLanes];
  for (int corner = 0; corner < kCorners; ++corner) *reinterpret_cast<i8*>(off[corner]) = corner_offset8(c[0], corner);
  i8 same[E];
  unsigned moved[E];
  for (int e = 1; e < E; ++e) {
    same[e] = c[e].base == c[0].base;
    moved[e] = active & ~lane_bits(same[e]);
  }
  alignas(32) float sum[D][kCorners][kLanes];
  for (int ch = 0; ch < D; ++ch)
    for (int corner = 0; corner < kCorners; ++corner) {
      f8 v = a[0][ch] * w[0][corner];
      for (int e = 1; e < E; ++e) v += same[e] ? a[e][ch] * w[e][corner] : splat(0.f);
      *reinterpret_cast<f8*>(sum[ch][corner]) = v;
    }
  for (unsigned rest = active; rest; rest &= rest - 1) {
    const int l = __builtin_ctz(rest);
    for (int ch = 0; ch < D; ++ch) {
      float* g = grad + ch * channel_stride;
      for (int corner = 0; corner < kCorners; ++corner) g[off[corner][l]] += sum[ch][corner][l];
    }
  }
  for (int e = 1; e < E; ++e) {
    if (!moved[e]) continue;
    alignas(32) float term[D][kCorners][kLanes];
    for (int corner = 0; corner < kCorners; ++corner) {
      *reinterpret_cast<i8*>(off[corner]) = corner_offset8(c[e], corner);
      for (int ch = 0; ch < D; ++ch) *reinterpret_cast<f8*>(term[ch][corner]) = a[e][ch] * w[e][corner];
    }
    for (unsigned rest = moved[e]; rest; rest &= rest - 1) {
      const int l = __builtin_ctz(rest);
      for (int ch = 0; ch < D; ++ch) {
        float* g = grad + ch * channel_stride;
        for (int corner = 0; corner < kCorners; ++corner) g[off[corner][l]] += term[ch][corner][l];
      }
    }
  }
}

// Reverse pass for the active lanes, from chain_forward8's stash and jacobian; a[e] holds
// ∂L/∂φ(x_e) on entry, ∂L/∂x_e on exit.
template <int D, int E>
inline void chain_backward8(const ChainRef<float, D>& chain, const Strides32<D>& s32, int64_t b,
                            const f8 (*stash)[E][D], const f8 (*jacobian)[E][D][D], f8 (&a)[E][D], unsigned active,
                            bool need_point_grad) {
  for (int j = 0; j < chain.count; ++j) {
    const FieldRef<float, D>& f = chain.field[j];
    Cell8<D> c[E];
    for (int e = 0; e < E; ++e) c[e] = locate_cell8<D>(stash[j][e], f.size, s32.stride[j]);
    if (f.grad) scatter8<D, E>(f.grad + b * f.batch_stride, f.channel_stride, c, a, active);
    if (j == chain.count - 1 && !need_point_grad) break;
    for (int e = 0; e < E; ++e) {
      f8 next[D];
      for (int k = 0; k < D; ++k) next[k] = a[e][k];
      for (int ch = 0; ch < D; ++ch) {
        for (int k = 0; k < D; ++k) next[k] += a[e][ch] * jacobian[j][e][ch][k];
      }
      for (int k = 0; k < D; ++k) a[e][k] = next[k];
    }
  }
}

}  // namespace gradicon_fast::cpu::simd

#endif  // GF_HAVE_SIMD8
