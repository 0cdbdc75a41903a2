// The sampling math of sampling.h on GCC vectors of float lanes F (with int32 lanes I): locating
// coordinates along an axis, and interpolation and its gradient on a cell's 2^D corner values.
// Shared by the four-lane kernels (gradicon_lanes.h, f4) and the eight-lane AVX2 ones (simd8.h,
// f8). The arithmetic is the scalar code's, operation for operation (no fused multiply-add), so
// every path gives the same bits.
#pragma once

#include <cstdint>

namespace gradicon_fast::cpu {

template <typename F>
inline F lerp_lanes(F a, F b, F t) {
  return a + t * (b - a);
}

template <typename F, typename I>
struct AxisLanes {
  I index;
  I step;  // stride, or 0 at the last voxel
  F frac;
  F dpdx;
};

// locate() of sampling.h for every lane (x + 0 broadcasts the scalar, exactly: size - 1 >= 0).
template <typename F, typename I>
inline AxisLanes<F, I> locate_lanes(F x, int size, int32_t stride) {
  const F zero = F{}, hi = zero + static_cast<float>(size - 1);
  const F p = x * hi;
  const I inside = (p > zero) & (p < hi);
  const F clamped = inside ? p : (p > zero ? hi : zero);
  AxisLanes<F, I> a;
  a.index = __builtin_convertvector(clamped, I);
  a.frac = clamped - __builtin_convertvector(a.index, F);
  a.step = a.index < I{} + (size - 1) ? I{} + stride : I{};
  a.dpdx = inside ? hi : zero;
  return a;
}

// interpolate() of sampling.h on corner values v (corner bit k set = upper corner along axis k).
template <typename F, template <int> class Cell>
inline F interpolate_corners(const F* v, const Cell<2>& c) {
  const F fx = c.ax[1].frac, fy = c.ax[0].frac;
  return lerp_lanes(lerp_lanes(v[0], v[1], fx), lerp_lanes(v[2], v[3], fx), fy);
}

template <typename F, template <int> class Cell>
inline F interpolate_corners(const F* v, const Cell<3>& c) {
  const F fx = c.ax[2].frac, fy = c.ax[1].frac, fz = c.ax[0].frac;
  const F c00 = lerp_lanes(v[0], v[1], fx), c01 = lerp_lanes(v[2], v[3], fx);
  const F c10 = lerp_lanes(v[4], v[5], fx), c11 = lerp_lanes(v[6], v[7], fx);
  return lerp_lanes(lerp_lanes(c00, c01, fy), lerp_lanes(c10, c11, fy), fz);
}

// interpolate_gradient() of sampling.h on corner values: grad[k] = ∂/∂x_k.
template <typename F, template <int> class Cell>
inline void gradient_corners(const F* v, const Cell<2>& c, F* grad) {
  const F fx = c.ax[1].frac, fy = c.ax[0].frac;
  grad[0] = (lerp_lanes(v[2], v[3], fx) - lerp_lanes(v[0], v[1], fx)) * c.ax[0].dpdx;
  grad[1] = lerp_lanes(v[1] - v[0], v[3] - v[2], fy) * c.ax[1].dpdx;
}

template <typename F, template <int> class Cell>
inline void gradient_corners(const F* v, const Cell<3>& c, F* grad) {
  const F fx = c.ax[2].frac, fy = c.ax[1].frac, fz = c.ax[0].frac;
  const F c00 = lerp_lanes(v[0], v[1], fx), c01 = lerp_lanes(v[2], v[3], fx);
  const F c10 = lerp_lanes(v[4], v[5], fx), c11 = lerp_lanes(v[6], v[7], fx);
  grad[0] = (lerp_lanes(c10, c11, fy) - lerp_lanes(c00, c01, fy)) * c.ax[0].dpdx;
  grad[1] = lerp_lanes(c01 - c00, c11 - c10, fz) * c.ax[1].dpdx;
  grad[2] = lerp_lanes(lerp_lanes(v[1] - v[0], v[3] - v[2], fy), lerp_lanes(v[5] - v[4], v[7] - v[6], fy), fz) *
            c.ax[2].dpdx;
}

}  // namespace gradicon_fast::cpu
