// Eight points at once: the sampling math of sampling.h on AVX2 vectors (float32 only), for
// the hot CPU kernels. Gathers load the cell corners of eight points in one instruction each and
// keep eight independent dependency chains in flight, which hides the cache misses of large
// fields. The arithmetic is the scalar code's, operation for operation (no fused multiply-add),
// so both paths give the same bits.
//
// Compiled only when the build targets AVX2 and FMA (setup.py adds -mavx2 -mfma when the
// building machine has them); otherwise GF_HAVE_SIMD8 stays undefined and the scalar kernels run.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#define GF_HAVE_SIMD8 1

#include <immintrin.h>

#include <cstdint>

#include "../sampling.h"
#include "lane_math.h"

namespace gradicon_fast::cpu::simd {

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

constexpr int kLanes = 8;

inline f8 splat(float v) { return f8{v, v, v, v, v, v, v, v}; }
inline i8 splat_i(int32_t v) { return i8{v, v, v, v, v, v, v, v}; }

inline f8 gather(const float* base, i8 index) {
  return reinterpret_cast<f8>(_mm256_i32gather_ps(base, reinterpret_cast<__m256i>(index), 4));
}

// locate() of sampling.h for eight coordinates, with the lower corner's offset (index * stride).
struct Axis8 : AxisLanes<f8, i8> {
  i8 offset;
};

inline Axis8 locate8(f8 x, int size, int32_t stride) {
  Axis8 a;
  static_cast<AxisLanes<f8, i8>&>(a) = locate_lanes<f8, i8>(x, size, stride);
  a.offset = a.index * splat_i(stride);
  return a;
}

template <int D>
struct Cell8 {
  Axis8 ax[D];
  i8 base;
};

template <int D>
inline Cell8<D> locate_cell8(const f8* x, const int* size, const int32_t* stride) {
  Cell8<D> c;
  c.base = splat_i(0);
  for (int k = 0; k < D; ++k) {
    c.ax[k] = locate8(x[k], size[k], stride[k]);
    c.base += c.ax[k].offset;
  }
  return c;
}

// The 2^D corner values of one channel (corner bit k set = upper corner along axis k).
inline void gather_corners8(const float* f, const Cell8<2>& c, f8 (&v)[4]) {
  const i8 sy = c.ax[0].step, sx = c.ax[1].step, b = c.base;
  v[0] = gather(f, b), v[1] = gather(f, b + sx), v[2] = gather(f, b + sy), v[3] = gather(f, b + sy + sx);
}

inline f8 gather_masked(const float* base, i8 index, f8 src, i8 mask) {
  return reinterpret_cast<f8>(_mm256_mask_i32gather_ps(reinterpret_cast<__m256>(src), base,
                                                       reinterpret_cast<__m256i>(index),
                                                       reinterpret_cast<__m256>(mask), 4));
}

// Offset of a cell's corner (bit k set = upper corner along axis k, axis 0 the highest bit).
template <int D>
inline i8 corner_offset8(const Cell8<D>& c, int corner) {
  i8 o = c.base;
  for (int k = 0; k < D; ++k)
    if ((corner >> (D - 1 - k)) & 1) o += c.ax[k].step;
  return o;
}

// How the cell of a point relates to the cell `c0` of point 0 of the same lane: the same, the
// next cell along `axis` (`face`: the two share a face), or any other (`other`). Cells are
// compared by their base offset, which determines the indices. The lane sets as bit masks too.
struct CellMove {
  int axis = 0;
  i8 face = i8{}, other = i8{};
  unsigned face_lanes = 0, other_lanes = 0;
};

inline unsigned lane_bits(i8 mask) { return static_cast<unsigned>(_mm256_movemask_ps(reinterpret_cast<__m256>(mask))); }

template <int D>
inline CellMove cell_move8(const Cell8<D>& c0, const Cell8<D>& c, int axis) {
  CellMove m;
  m.axis = axis;
  const i8 same = c.base == c0.base;
  m.face = (c.base == c0.base + c0.ax[axis].step) & (c0.ax[axis].step != splat_i(0)) & ~same;
  m.other = ~(same | m.face);
  m.face_lanes = lane_bits(m.face);
  m.other_lanes = lane_bits(m.other);
  return m;
}

// The corners on the upper face along `axis` (bit q set: corner q).
template <int D>
constexpr unsigned face_corners(int axis) {
  unsigned out = 0;
  for (int q = 0; q < (1 << D); ++q)
    if (q & (1 << (D - 1 - axis))) out |= 1u << q;
  return out;
}

// v[ch][q] ← channel ch of cell c's corner q, for the corners in `which` (bit q) and the lanes in
// `lanes` (bit l; `mask` the same as a vector); the other lanes and corners keep their values.
// A masked gather costs a whole gather however few lanes it loads, and GradICON's shifted
// points leave point 0's cell in one lane or two of eight: for up to four lanes, scalar loads
// blended into the vectors are cheaper.
template <int D>
inline void load_lane_corners8(const float* f, int64_t channel_stride, const Cell8<D>& c, unsigned which, i8 mask,
                               unsigned lanes, f8 (&v)[D][1 << D]) {
  constexpr int kCorners = 1 << D;
  if (__builtin_popcount(lanes) > 4) {
    for (int q = 0; q < kCorners; ++q) {
      if (!(which >> q & 1)) continue;
      const i8 offset = corner_offset8(c, q);
      for (int ch = 0; ch < D; ++ch) v[ch][q] = gather_masked(f + ch * channel_stride, offset, v[ch][q], mask);
    }
    return;
  }
  i8 offset[kCorners];
  for (int q = 0; q < kCorners; ++q)
    if (which >> q & 1) offset[q] = corner_offset8(c, q);
  const i8 lane_index = i8{0, 1, 2, 3, 4, 5, 6, 7};
  for (; lanes; lanes &= lanes - 1) {
    const int l = __builtin_ctz(lanes);
    const i8 pick = lane_index == splat_i(l);
    for (int q = 0; q < kCorners; ++q) {
      if (!(which >> q & 1)) continue;
      for (int ch = 0; ch < D; ++ch) v[ch][q] = pick ? splat(f[ch * channel_stride + offset[q][l]]) : v[ch][q];
    }
  }
}

inline void gather_corners8(const float* f, const Cell8<3>& c, f8 (&v)[8]) {
  const i8 sz = c.ax[0].step, sy = c.ax[1].step, sx = c.ax[2].step, b = c.base;
  v[0] = gather(f, b), v[1] = gather(f, b + sx), v[2] = gather(f, b + sy), v[3] = gather(f, b + sy + sx);
  v[4] = gather(f, b + sz), v[5] = gather(f, b + sz + sx);
  v[6] = gather(f, b + sz + sy), v[7] = gather(f, b + sz + sy + sx);
}

// Lanes l's corner pair (o[l], o[l] + 1), for eight lanes: even[l] = f[o[l]], odd[l] = f[o[l] + 1].
inline void load_pairs8(const float* f, const int32_t* o, f8& even, f8& odd) {
  auto pair = [&](int l) { return _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(f + o[l]))); };
  auto two = [&](int l) { return _mm_loadh_pi(pair(l), reinterpret_cast<const __m64*>(f + o[l + 1])); };
  const __m256 lo = _mm256_insertf128_ps(_mm256_castps128_ps256(two(0)), two(4), 1);  // lanes 0 1 | 4 5
  const __m256 hi = _mm256_insertf128_ps(_mm256_castps128_ps256(two(2)), two(6), 1);  // lanes 2 3 | 6 7
  even = reinterpret_cast<f8>(_mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0)));
  odd = reinterpret_cast<f8>(_mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1)));
}

// v[ch][q] = corner q of cell c in channel ch (channel stride cs). A cell's two corners along x
// are neighbours in memory: they are loaded as pairs with plain loads, which on Zen 4 keep more
// cache misses in flight than gathers (the lung-scale forward pass: 0.18 -> 0.14 s). At the
// last voxel along x (step 0) the pair that ends at the voxel is loaded, and its second value
// serves both corners; fields one voxel wide along x (size_x) are gathered.
template <int D>
inline void load_corners8(const float* f, int64_t cs, int size_x, const Cell8<D>& c, f8 (&v)[D][1 << D]) {
  constexpr int kRows = 1 << (D - 1);  // corner 2r starts row r, corner 2r + 1 is its neighbour
  if (size_x < 2) {
    for (int ch = 0; ch < D; ++ch) gather_corners8(f + ch * cs, c, v[ch]);
    return;
  }
  const i8 last_x = c.ax[D - 1].step == splat_i(0);
  alignas(32) int32_t row[kRows][kLanes];
  for (int r = 0; r < kRows; ++r) *reinterpret_cast<i8*>(row[r]) = corner_offset8(c, 2 * r) + last_x;  // -1 there
  for (int ch = 0; ch < D; ++ch)
    for (int r = 0; r < kRows; ++r) {
      f8 even, odd;
      load_pairs8(f + ch * cs, row[r], even, odd);
      v[ch][2 * r] = last_x ? odd : even;
      v[ch][2 * r + 1] = odd;
    }
}

// corner_weights() of sampling.h: the weight of each of the 2^D corners.
template <int D>
inline void corner_weights8(const Cell8<D>& c, f8* weight) {
  for (int corner = 0; corner < (1 << D); ++corner) {
    f8 w = splat(1.f);
    for (int k = 0; k < D; ++k) w *= (corner >> (D - 1 - k)) & 1 ? c.ax[k].frac : splat(1.f) - c.ax[k].frac;
    weight[corner] = w;
  }
}

}  // namespace gradicon_fast::cpu::simd

#endif  // AVX2 && FMA
