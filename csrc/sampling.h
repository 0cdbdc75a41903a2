// Per-point sampling math shared by the CPU and CUDA kernels (docs/conventions.md §1).
//
// A coordinate x in [0, 1] on an axis of `size` voxels is the continuous index p = x * (size - 1),
// clamped to [0, size - 1] (border padding, align-corners). Interpolation is separable linear:
// lerp along the last axis first. The derivative of the clamp is 1 strictly inside and 0 at or
// beyond the border, as in grid_sample's backward.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GF_HD __host__ __device__ __forceinline__
#else
#define GF_HD inline __attribute__((always_inline))
#endif

namespace gradicon_fast {

constexpr int kMaxChain = 8;                  // fields in one chain
constexpr int kMaxComposed = 2 * kMaxChain;   // fields in φ_AB∘φ_BA

// Where a coordinate falls along one axis.
template <typename T>
struct AxisPos {
  int64_t offset;  // element offset of the lower corner (index * stride)
  int64_t step;    // element offset from lower to upper corner; 0 when the lower corner is the last voxel
  int index;       // lower corner index
  T frac;          // position inside the cell, [0, 1)
  T dpdx;          // d(clamped index)/dx: size - 1 strictly inside, 0 when clamped
};

template <typename T>
GF_HD AxisPos<T> locate(T x, int size, int64_t stride) {
  const T hi = T(size - 1);
  const T p = x * hi;
  const bool inside = p > T(0) && p < hi;
  // NaN compares false and lands on index 0: memory stays in bounds, and the NaN still reaches
  // the result through y = x + sample(D, x).
  const T clamped = inside ? p : (p > T(0) ? hi : T(0));
  AxisPos<T> a;
  a.index = static_cast<int>(clamped);  // clamped >= 0, so truncation is floor
  a.frac = clamped - T(a.index);
  a.offset = static_cast<int64_t>(a.index) * stride;
  a.step = a.index < size - 1 ? stride : 0;
  a.dpdx = inside ? hi : T(0);
  return a;
}

template <typename T>
GF_HD T lerp(T a, T b, T t) {
  return a + t * (b - a);
}

// Element i of a tensor stored as S, read as the compute type T: the identity when S is T (float
// and double), a widening conversion for half-precision storage (CUDA kernels).
template <typename T, typename S>
GF_HD T load_as(const S* p, int64_t i) {
  return static_cast<T>(p[i]);
}

// A point located in a D-dimensional grid: one AxisPos per axis and the flat offset of the
// lower corner.
template <typename T, int D>
struct Cell {
  AxisPos<T> ax[D];
  int64_t base;
};

template <typename T, int D>
GF_HD Cell<T, D> locate_cell(const T* x, const int* size, const int64_t* stride) {
  Cell<T, D> c;
  c.base = 0;
#pragma unroll
  for (int k = 0; k < D; ++k) {
    c.ax[k] = locate(x[k], size[k], stride[k]);
    c.base += c.ax[k].offset;
  }
  return c;
}

template <typename T, int D>
GF_HD bool same_cell(const Cell<T, D>& a, const Cell<T, D>& b) {
  bool same = a.base == b.base;
#pragma unroll
  for (int k = 0; k < D; ++k) same = same && a.ax[k].step == b.ax[k].step;
  return same;
}

// Value of one channel (pointer to its first voxel, stored as S) at a cell.
template <typename T, typename S>
GF_HD T interpolate(const S* f, const Cell<T, 2>& c) {
  const S* p = f + c.base;
  const int64_t sy = c.ax[0].step, sx = c.ax[1].step;
  const T fx = c.ax[1].frac, fy = c.ax[0].frac;
  return lerp(lerp(load_as<T>(p, 0), load_as<T>(p, sx), fx), lerp(load_as<T>(p, sy), load_as<T>(p, sy + sx), fx), fy);
}

template <typename T, typename S>
GF_HD T interpolate(const S* f, const Cell<T, 3>& c) {
  const S* p = f + c.base;
  const int64_t sz = c.ax[0].step, sy = c.ax[1].step, sx = c.ax[2].step;
  const T fx = c.ax[2].frac, fy = c.ax[1].frac, fz = c.ax[0].frac;
  const T c00 = lerp(load_as<T>(p, 0), load_as<T>(p, sx), fx), c01 = lerp(load_as<T>(p, sy), load_as<T>(p, sy + sx), fx);
  const T c10 = lerp(load_as<T>(p, sz), load_as<T>(p, sz + sx), fx);
  const T c11 = lerp(load_as<T>(p, sz + sy), load_as<T>(p, sz + sy + sx), fx);
  return lerp(lerp(c00, c01, fy), lerp(c10, c11, fy), fz);
}

// Gradient of one channel with respect to the coordinates x (not the index p): grad[k] = ∂f/∂x_k.
template <typename T, typename S>
GF_HD void interpolate_gradient(const S* f, const Cell<T, 2>& c, T* grad) {
  const S* p = f + c.base;
  const int64_t sy = c.ax[0].step, sx = c.ax[1].step;
  const T fx = c.ax[1].frac, fy = c.ax[0].frac;
  const T v00 = load_as<T>(p, 0), v01 = load_as<T>(p, sx), v10 = load_as<T>(p, sy), v11 = load_as<T>(p, sy + sx);
  grad[0] = (lerp(v10, v11, fx) - lerp(v00, v01, fx)) * c.ax[0].dpdx;
  grad[1] = lerp(v01 - v00, v11 - v10, fy) * c.ax[1].dpdx;
}

template <typename T, typename S>
GF_HD void interpolate_gradient(const S* f, const Cell<T, 3>& c, T* grad) {
  const S* p = f + c.base;
  const int64_t sz = c.ax[0].step, sy = c.ax[1].step, sx = c.ax[2].step;
  const T fx = c.ax[2].frac, fy = c.ax[1].frac, fz = c.ax[0].frac;
  const T v000 = load_as<T>(p, 0), v001 = load_as<T>(p, sx), v010 = load_as<T>(p, sy), v011 = load_as<T>(p, sy + sx);
  const T v100 = load_as<T>(p, sz), v101 = load_as<T>(p, sz + sx), v110 = load_as<T>(p, sz + sy);
  const T v111 = load_as<T>(p, sz + sy + sx);
  const T c00 = lerp(v000, v001, fx), c01 = lerp(v010, v011, fx);
  const T c10 = lerp(v100, v101, fx), c11 = lerp(v110, v111, fx);
  grad[0] = (lerp(c10, c11, fy) - lerp(c00, c01, fy)) * c.ax[0].dpdx;
  grad[1] = lerp(c01 - c00, c11 - c10, fz) * c.ax[1].dpdx;
  grad[2] = lerp(lerp(v001 - v000, v011 - v010, fy), lerp(v101 - v100, v111 - v110, fy), fz) * c.ax[2].dpdx;
}

// The 2^D corner weights and offsets of a cell, corner bit k set = upper corner along axis k.
template <typename T, int D>
GF_HD void corner_weights(const Cell<T, D>& c, T* weight, int64_t* offset) {
#pragma unroll
  for (int corner = 0; corner < (1 << D); ++corner) {
    T w = T(1);
    int64_t o = c.base;
#pragma unroll
    for (int k = 0; k < D; ++k) {
      const bool upper = (corner >> (D - 1 - k)) & 1;
      w *= upper ? c.ax[k].frac : T(1) - c.ax[k].frac;
      o += upper ? c.ax[k].step : 0;
    }
    weight[corner] = w;
    offset[corner] = o;
  }
}

}  // namespace gradicon_fast
