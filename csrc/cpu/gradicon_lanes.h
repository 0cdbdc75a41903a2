// GradICON's E = D + 1 evaluations of one point (x and x + δ ê_k) as the lanes of one 4-wide
// vector, for the CPU kernels.
//
// The E points lie within ~δ of each other, so at each field they usually fall in the same
// cell: then the cell's corners are loaded once and broadcast, the E interpolations run as one
// vector interpolation, and the E gradient contributions are summed before a single write per
// voxel. Lanes that fall in another cell take the scalar code of sampling.h, which the vector
// code mirrors operation for operation. GCC vector extensions: SSE2 suffices, AVX when built
// with -mavx2. In 2D the fourth lane repeats the first with a zero adjoint.
#pragma once

#include <cstdint>

#include "../chain.h"
#include "cpu_common.h"
#include "lane_math.h"

namespace gradicon_fast::cpu::lanes {

typedef float f4 __attribute__((vector_size(16)));
typedef int32_t i4 __attribute__((vector_size(16)));

inline f4 splat(float v) { return f4{v, v, v, v}; }
inline i4 splat_i(int32_t v) { return i4{v, v, v, v}; }
inline float hsum(f4 v) { return (v[0] + v[1]) + (v[2] + v[3]); }

using Axis4 = AxisLanes<f4, i4>;

inline Axis4 locate4(f4 x, int size, int32_t stride) { return locate_lanes<f4, i4>(x, size, stride); }

template <int D>
struct Cell4 {
  Axis4 ax[D];
  i4 base;
  bool shared;  // all lanes in the cell of lane 0
};

template <int D>
inline Cell4<D> locate_cell4(const f4* x, const int* size, const int32_t* stride) {
  Cell4<D> c;
  c.base = splat_i(0);
  i4 same = splat_i(-1);
  for (int k = 0; k < D; ++k) {
    c.ax[k] = locate4(x[k], size[k], stride[k]);
    c.base += c.ax[k].index * splat_i(stride[k]);
    same &= c.ax[k].step == splat_i(c.ax[k].step[0]);
  }
  same &= c.base == splat_i(c.base[0]);
  c.shared = (same[0] & same[1] & same[2] & same[3]) != 0;
  return c;
}

// The 2^D corner values of one channel of a shared cell, broadcast to all lanes; corner bit k
// set = upper corner along axis k (corner_weights' numbering).
template <int D>
inline void load_corners(const float* f, const Cell4<D>& c, f4* v) {
  const float* p = f + c.base[0];
  for (int corner = 0; corner < (1 << D); ++corner) {
    int32_t o = 0;
    for (int k = 0; k < D; ++k)
      if ((corner >> (D - 1 - k)) & 1) o += c.ax[k].step[0];
    v[corner] = splat(p[o]);
  }
}

template <int D>
inline Cell<float, D> lane_cell(const FieldRef<float, D>& f, const f4* y, int lane) {
  float x[D];
  for (int k = 0; k < D; ++k) x[k] = y[k][lane];
  return locate_in(f, x);
}

// y ← y + sample(field, y) for the four lanes; stash (if given) keeps y.
template <int D>
inline void field_forward(const FieldRef<float, D>& f, const int32_t* stride32, int64_t b, f4 (&y)[D], f4* stash) {
  const float* data = f.data + b * f.batch_stride;
  const Cell4<D> c = locate_cell4<D>(y, f.size, stride32);
  f4 s[D];
  if (c.shared) {
    for (int ch = 0; ch < D; ++ch) {
      f4 v[1 << D];
      load_corners<D>(data + ch * f.channel_stride, c, v);
      s[ch] = interpolate_corners(v, c);
    }
  } else {
    for (int lane = 0; lane < 4; ++lane) {
      const Cell<float, D> cl = lane_cell(f, y, lane);
      for (int ch = 0; ch < D; ++ch) s[ch][lane] = interpolate(data + ch * f.channel_stride, cl);
    }
  }
  for (int k = 0; k < D; ++k) {
    if (stash) stash[k] = y[k];
    y[k] += s[k];
  }
}

template <int D>
inline void chain_forward4(const ChainRef<float, D>& chain, const int32_t (*stride32)[D], int64_t b, f4 (&y)[D],
                           f4 (*stash)[D]) {
  for (int j = chain.count - 1; j >= 0; --j) field_forward(chain.field[j], stride32[j], b, y, stash ? stash[j] : nullptr);
}

// Reverse step through one field at the stashed positions y: adds a ⊗ weights to the field's
// gradient and turns a (∂L/∂ after) into ∂L/∂y (when update_adjoint).
template <int D>
inline void field_backward(const FieldRef<float, D>& f, const int32_t* stride32, int64_t b, const f4 (&y)[D],
                           f4 (&a)[D], bool update_adjoint) {
  constexpr int kCorners = 1 << D;
  const float* data = f.data + b * f.batch_stride;
  float* grad = f.grad ? f.grad + b * f.batch_stride : nullptr;
  const Cell4<D> c = locate_cell4<D>(y, f.size, stride32);
  if (c.shared) {
    if (grad) {
      // Corner weights per lane, then Σ over lanes of a[ch] * weight: one write per voxel.
      f4 w[kCorners];
      for (int corner = 0; corner < kCorners; ++corner) {
        f4 wc = splat(1.f);
        for (int k = 0; k < D; ++k) wc *= ((corner >> (D - 1 - k)) & 1) ? c.ax[k].frac : splat(1.f) - c.ax[k].frac;
        w[corner] = wc;
      }
      float* g = grad + c.base[0];
      for (int ch = 0; ch < D; ++ch) {
        float* gc = g + ch * f.channel_stride;
        for (int corner = 0; corner < kCorners; ++corner) {
          int32_t o = 0;
          for (int k = 0; k < D; ++k)
            if ((corner >> (D - 1 - k)) & 1) o += c.ax[k].step[0];
          gc[o] += hsum(a[ch] * w[corner]);
        }
      }
    }
    if (update_adjoint) {
      // Jᵀa = ∇(Σ_ch a_ch s_ch): interpolate the adjoint-weighted field once.
      f4 u[kCorners];
      for (int corner = 0; corner < kCorners; ++corner) u[corner] = splat(0.f);
      for (int ch = 0; ch < D; ++ch) {
        f4 v[kCorners];
        load_corners<D>(data + ch * f.channel_stride, c, v);
        for (int corner = 0; corner < kCorners; ++corner) u[corner] += a[ch] * v[corner];
      }
      f4 gu[D];
      gradient_corners(u, c, gu);
      for (int k = 0; k < D; ++k) a[k] += gu[k];
    }
    return;
  }
  PlainAdd add;
  for (int lane = 0; lane < 4; ++lane) {
    const Cell<float, D> cl = lane_cell(f, y, lane);
    float al[D];
    for (int k = 0; k < D; ++k) al[k] = a[k][lane];
    if (grad) {
      const Cell<float, D> cells[1] = {cl};
      const float* adjoint[1] = {al};
      scatter_to_cells<float, D, 1>(grad, f.channel_stride, D, cells, adjoint, add);
    }
    if (update_adjoint) {
      float next[D];
      for (int k = 0; k < D; ++k) next[k] = al[k];
      for (int ch = 0; ch < D; ++ch) {
        float gs[D];
        interpolate_gradient(data + ch * f.channel_stride, cl, gs);
        for (int k = 0; k < D; ++k) next[k] += al[ch] * gs[k];
      }
      for (int k = 0; k < D; ++k) a[k][lane] = next[k];
    }
  }
}

template <int D>
inline void chain_backward4(const ChainRef<float, D>& chain, const int32_t (*stride32)[D], int64_t b,
                            const f4 (*stash)[D], f4 (&a)[D]) {
  for (int j = 0; j < chain.count; ++j)
    field_backward(chain.field[j], stride32[j], b, stash[j], a, j < chain.count - 1);
}

}  // namespace gradicon_fast::cpu::lanes
