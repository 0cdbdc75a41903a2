// chain_forward / chain_backward of chain.h for eight points at once (AVX2, float32).
#pragma once

#include "simd8.h"

#ifdef GF_HAVE_SIMD8

#include "../chain.h"
#include "cpu_common.h"

namespace gradicon_fast::cpu::simd {

// Gradients of fields at least this large do not stay in the caches between a group's forward
// pass and its reverse pass; smaller ones do, and prefetching them only costs instructions.
constexpr size_t kPrefetchGradBytes = size_t(16) << 20;

// Asks for the gradient rows of cell c (their first corners) into L2 ahead of the reverse pass,
// which adds to them after the rest of the chain: the lung-scale step 2-3 % faster. Inline
// assembly, because GCC 12 deletes a loop of __builtin_prefetch it does not unroll completely.
template <int D>
inline void prefetch_rows8(const float* grad, int64_t channel_stride, const Cell8<D>& c) {
  for (int q = 0; q < (1 << D); q += 2) {
    const i8 o = corner_offset8(c, q);
    for (int l = 0; l < kLanes; ++l)
      for (int ch = 0; ch < D; ++ch)
        asm volatile("prefetcht1 %0" : : "m"(*reinterpret_cast<const char*>(grad + ch * channel_stride + o[l])));
  }
}

// y ← f(y) for one field f of a chain, at GradICON's E points per lane: point 0 and its shifts
// x + δ ê_k (e = k + 1), in two halves, so that a caller stepping several groups of lanes issues
// the loads of all of them before any arithmetic waits on one (their cache misses overlap):
// field_begin8 locates the cells and loads point 0's corners, field_finish8 does the rest. stash
// (if given) keeps the positions f is sampled at, and jacobian (if given) its spatial derivatives
// there, jacobian[e][ch][k] = ∂f_ch/∂x_k, for the reverse pass.
//
// The shifted points mostly fall in point 0's cell, or in the next one along axis k when δ
// crosses a voxel boundary (δ is a sixth of a voxel at 175³): those share a face with point 0's
// cell and load only the other face. Lanes whose cell differs otherwise load all corners.
// (Prefetching the rows the next group will read, guessed from these, measured within noise.)
template <int D, int E>
struct FieldStep8 {
  Cell8<D> c[E];
  f8 corners0[D][1 << D];
};

template <int D, int E>
inline void field_begin8(const FieldRef<float, D>& f, const int32_t* stride, int64_t b, const f8 (&y)[E][D],
                         FieldStep8<D, E>& s) {
  for (int e = 0; e < E; ++e) s.c[e] = locate_cell8<D>(y[e], f.size, stride);
  load_corners8<D>(f.data + b * f.batch_stride, f.channel_stride, f.size[D - 1], s.c[0], s.corners0);
  if (f.grad && f.channel_stride * D * sizeof(float) >= kPrefetchGradBytes)
    prefetch_rows8<D>(f.grad + b * f.batch_stride, f.channel_stride, s.c[0]);
}

template <int D, int E>
inline void field_finish8(const FieldRef<float, D>& f, int64_t b, const FieldStep8<D, E>& s, f8 (&y)[E][D],
                          f8 (*stash)[D], f8 (*jacobian)[D][D]) {
  constexpr int kCorners = 1 << D;
  const float* data = f.data + b * f.batch_stride;
  const Cell8<D>(&c)[E] = s.c;
  f8 v[E][D];
  for (int e = 0; e < E; ++e) {
    f8 corners[D][kCorners];
    for (int ch = 0; ch < D; ++ch)
      for (int q = 0; q < kCorners; ++q) corners[ch][q] = s.corners0[ch][q];
    if (e > 0) {
      const CellMove m = cell_move8<D>(c[0], c[e], (e - 1) % D);
      if (m.face_lanes) {
        const int bit = 1 << (D - 1 - m.axis);
        for (int ch = 0; ch < D; ++ch)
          for (int q = 0; q < kCorners; ++q)
            if (!(q & bit)) corners[ch][q] = m.face ? s.corners0[ch][q | bit] : corners[ch][q];
        load_lane_corners8<D>(data, f.channel_stride, c[e], face_corners<D>(m.axis), m.face, m.face_lanes, corners);
      }
      if (m.other_lanes)
        load_lane_corners8<D>(data, f.channel_stride, c[e], (1u << kCorners) - 1, m.other, m.other_lanes, corners);
    }
    for (int ch = 0; ch < D; ++ch) {
      v[e][ch] = interpolate_corners(corners[ch], c[e]);
      if (jacobian) gradient_corners(corners[ch], c[e], jacobian[e][ch]);
    }
  }
  for (int e = 0; e < E; ++e)
    for (int k = 0; k < D; ++k) {
      if (stash) stash[e][k] = y[e][k];
      y[e][k] += v[e][k];
    }
}

// y[g] ← φ(y[g]) through the chain for G groups of eight lanes, field by field. stash (if given)
// keeps each field's input positions and jacobian (if given) its spatial derivatives there,
// jacobian[g][j][e][ch][k] = ∂field_j,ch/∂x_k, for every field but the innermost (j = count - 1):
// the reverse pass stops at that field's gradient and never carries ∂L/∂y past it.
template <int D, int E, int G>
inline void chain_forward8(const ChainRef<float, D>& chain, const Strides32<D>& s32, int64_t b, f8 (&y)[G][E][D],
                           f8 (*stash)[kMaxComposed][E][D], f8 (*jacobian)[kMaxComposed][E][D][D]) {
  for (int j = chain.count - 1; j >= 0; --j) {
    FieldStep8<D, E> step[G];
    for (int g = 0; g < G; ++g) field_begin8<D, E>(chain.field[j], s32.stride[j], b, y[g], step[g]);
    for (int g = 0; g < G; ++g)
      field_finish8<D, E>(chain.field[j], b, step[g], y[g], stash ? stash[g][j] : nullptr,
                          jacobian && j != chain.count - 1 ? jacobian[g][j] : nullptr);
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

// Adds v[ch][q] (lane l) to channel ch of corner q of lane l's cell c, for the lanes in `lanes`.
// A cell's two corners along x are neighbours in memory, so they are added as one pair (one
// 64-bit load, add and store instead of two of each: the lung-scale step 3-4 % faster). At the
// last voxel along x (step 0, both corners the same voxel) the pair that ends at the voxel gets
// (0, v[q] + v[q + 1]); fields one voxel wide along x are added corner by corner.
template <int D>
inline void add_corners8(float* grad, int64_t channel_stride, int size_x, const Cell8<D>& c,
                         const f8 (&v)[D][1 << D], unsigned lanes) {
  constexpr int kCorners = 1 << D, kRows = kCorners / 2;
  if (size_x < 2) {
    alignas(32) int32_t off[kCorners][kLanes];
    for (int q = 0; q < kCorners; ++q) *reinterpret_cast<i8*>(off[q]) = corner_offset8(c, q);
    for (; lanes; lanes &= lanes - 1) {
      const int l = __builtin_ctz(lanes);
      for (int ch = 0; ch < D; ++ch) {
        float* g = grad + ch * channel_stride;
        for (int q = 0; q < kCorners; ++q) g[off[q][l]] += v[ch][q][l];
      }
    }
    return;
  }
  const i8 last_x = c.ax[D - 1].step == splat_i(0);
  alignas(32) int32_t row[kRows][kLanes];
  for (int r = 0; r < kRows; ++r) *reinterpret_cast<i8*>(row[r]) = corner_offset8(c, 2 * r) + last_x;  // -1 there
  // pair[ch][r] holds the eight lanes' pairs in the order _mm256_unpack{lo,hi}_ps leave them:
  // lanes 0 1 4 5, then 2 3 6 7
  alignas(32) float pair[D][kRows][2 * kLanes];
  for (int ch = 0; ch < D; ++ch)
    for (int r = 0; r < kRows; ++r) {
      const f8 even = v[ch][2 * r], odd = v[ch][2 * r + 1];
      const __m256 lo = reinterpret_cast<__m256>(last_x ? splat(0.f) : even);
      const __m256 hi = reinterpret_cast<__m256>(last_x ? even + odd : odd);
      _mm256_store_ps(pair[ch][r], _mm256_unpacklo_ps(lo, hi));
      _mm256_store_ps(pair[ch][r] + kLanes, _mm256_unpackhi_ps(lo, hi));
    }
  for (; lanes; lanes &= lanes - 1) {
    const int l = __builtin_ctz(lanes);
    const int slot = 2 * ((l & 1) + (l & 4 ? 2 : 0) + (l & 2 ? 4 : 0));
    for (int ch = 0; ch < D; ++ch) {
      float* g = grad + ch * channel_stride;
      for (int r = 0; r < kRows; ++r) {
        double* at = reinterpret_cast<double*>(g + row[r][l]);
        const __m128 old = _mm_castpd_ps(_mm_load_sd(at));
        const __m128 add = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(pair[ch][r] + slot)));
        _mm_store_sd(at, _mm_castps_pd(_mm_add_ps(old, add)));
      }
    }
  }
}

// Adds a[e][ch] * weight to the corners of each active lane's cells. The contributions of the
// points that share point 0's cell (all E of them in most lanes) are summed on vectors and
// written once; a point in another cell writes its own corners.
template <int D, int E>
inline void scatter8(float* grad, int64_t channel_stride, int size_x, const Cell8<D> (&c)[E], const f8 (&a)[E][D],
                     unsigned active) {
  constexpr int kCorners = 1 << D;
  f8 w[E][kCorners];
  for (int e = 0; e < E; ++e) corner_weights8<D>(c[e], w[e]);
  i8 same[E];
  unsigned moved[E];
  for (int e = 1; e < E; ++e) {
    same[e] = c[e].base == c[0].base;
    moved[e] = active & ~lane_bits(same[e]);
  }
  f8 sum[D][kCorners];
  for (int ch = 0; ch < D; ++ch)
    for (int corner = 0; corner < kCorners; ++corner) {
      f8 v = a[0][ch] * w[0][corner];
      for (int e = 1; e < E; ++e) v += same[e] ? a[e][ch] * w[e][corner] : splat(0.f);
      sum[ch][corner] = v;
    }
  add_corners8<D>(grad, channel_stride, size_x, c[0], sum, active);
  for (int e = 1; e < E; ++e) {
    if (!moved[e]) continue;
    f8 term[D][kCorners];
    for (int ch = 0; ch < D; ++ch)
      for (int corner = 0; corner < kCorners; ++corner) term[ch][corner] = a[e][ch] * w[e][corner];
    add_corners8<D>(grad, channel_stride, size_x, c[e], term, moved[e]);
  }
}

// Reverse pass for the active lanes, from chain_forward8's stash and jacobian: adds to the
// gradients of the fields; a[e] holds ∂L/∂φ(x_e) on entry and is used up on the way.
template <int D, int E>
inline void chain_backward8(const ChainRef<float, D>& chain, const Strides32<D>& s32, int64_t b,
                            const f8 (*stash)[E][D], const f8 (*jacobian)[E][D][D], f8 (&a)[E][D], unsigned active) {
  for (int j = 0; j < chain.count; ++j) {
    const FieldRef<float, D>& f = chain.field[j];
    Cell8<D> c[E];
    for (int e = 0; e < E; ++e) c[e] = locate_cell8<D>(stash[j][e], f.size, s32.stride[j]);
    if (f.grad) scatter8<D, E>(f.grad + b * f.batch_stride, f.channel_stride, f.size[D - 1], c, a, active);
    if (j == chain.count - 1) break;  // the points' own gradient is not needed
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
