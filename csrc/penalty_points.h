// The points a penalty (GradICON, ICON) is evaluated at: id[..., ::stride, ...] + noise_scale * noise
// (docs/conventions.md §2), computed per point from its flat index so that nothing is stored.
#pragma once

#include "philox.h"
#include "sampling.h"

namespace gradicon_fast {

template <typename T, int D>
struct PenaltyPoints {
  int grid[D];         // the grid the loss is taken on
  int count[D];        // points per axis: ceil(grid / stride)
  int stride;
  int64_t num_points;  // Π count
  const T* noise;      // (1, D, *count), or nullptr to draw it from `seed`
  uint64_t seed;
  T noise_scale;
};

// Identity coordinate i / (size - 1), computed in double and rounded once (docs/conventions.md §1).
template <typename T>
GF_HD T grid_coordinate(int64_t index, int size) {
  return size == 1 ? T(0) : static_cast<T>(static_cast<double>(index) / static_cast<double>(size - 1));
}

// Point p, its seeded noise already drawn (drawn: normal4 of p; unused with explicit noise).
template <typename T, int D>
GF_HD void penalty_point_drawn(const PenaltyPoints<T, D>& pts, int64_t p, const float (&drawn)[4], T (&x)[D]) {
  int64_t index[D];
  int64_t rest = p;
#pragma unroll
  for (int k = D - 1; k >= 0; --k) {
    index[k] = rest % pts.count[k];
    rest /= pts.count[k];
  }
#pragma unroll
  for (int k = 0; k < D; ++k) {
    const T n = pts.noise ? pts.noise[k * pts.num_points + p] : static_cast<T>(drawn[k]);
    const T scaled = pts.noise_scale * n;  // rounded before the add, as the reference does
    x[k] = grid_coordinate<T>(index[k] * pts.stride, pts.grid[k]) + scaled;
  }
}

template <typename T, int D>
GF_HD void penalty_point(const PenaltyPoints<T, D>& pts, int64_t p, T (&x)[D]) {
  float drawn[4] = {0.f, 0.f, 0.f, 0.f};
  if (!pts.noise) normal4(pts.seed, static_cast<uint64_t>(p), drawn);
  penalty_point_drawn(pts, p, drawn, x);
}

}  // namespace gradicon_fast
