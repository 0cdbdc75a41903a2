// The order in which the CPU penalty kernels visit their points: sorted by where the noisy points
// fall, brick by brick. In grid order, noise of a voxel or two sends neighbouring points to
// different planes of the fields, so consecutive points read far-apart memory and the large
// (lung-scale) fields are read at memory latency; in this order consecutive points read
// neighbouring voxels of the first field, and of the later ones as far as the maps are smooth.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../penalty_points.h"
#include "noise8.h"

namespace gradicon_fast::cpu {

// Points per brick side: a brick of 8³ points of the lung-scale sparse grid (16³ voxels of a
// 175³ field, with the maps' displacement) keeps each field's working set within the L2/L3
// caches; 4 measured the same, 16 and whole planes slower.
constexpr int64_t kVisitBrick = 8;

// The points in visiting order, with their positions: computed once here, where the order needs
// them, and kept, because drawing the noise is most of a position's cost (drawing it again in the
// main pass cost about 10 ms of a 0.4 s lung-scale step).
template <typename T, int D>
struct VisitingOrder {
  std::vector<int32_t> index;  // point indices in visiting order; empty: grid order, nothing stored
  std::vector<T> x;            // x[k * n + p]: coordinate k of point p (grid order)

  // Point i of the order: its index p and position x.
  void point(const PenaltyPoints<T, D>& pts, int64_t i, int64_t& p, T (&xp)[D]) const {
    if (index.empty()) {
      p = i;
      penalty_point(pts, p, xp);
      return;
    }
    p = index[i];
    for (int k = 0; k < D; ++k) xp[k] = x[k * pts.num_points + p];
  }
};

// The seeded noise of points first, first + 1, ... in groups: eight at a time where AVX2 is
// built (the same bits as normal4 point by point).
#ifdef GF_HAVE_SIMD8
constexpr int kNoiseLanes = simd::kLanes;
inline void draw_noise(uint64_t seed, int64_t first, float (&drawn)[kNoiseLanes][4]) {
  simd::f8 z[4];
  simd::normal4x8(seed, static_cast<uint64_t>(first), z);
  for (int l = 0; l < kNoiseLanes; ++l)
    for (int k = 0; k < 4; ++k) drawn[l][k] = z[k][l];
}
#else
constexpr int kNoiseLanes = 1;
inline void draw_noise(uint64_t seed, int64_t first, float (&drawn)[kNoiseLanes][4]) {
  normal4(seed, static_cast<uint64_t>(first), drawn[0]);
}
#endif

// Bricks of kVisitBrick^D cells of the point grid in z-major order, the cells inside a brick
// likewise, points in a cell by index (a stable counting sort, so the order is deterministic).
// 4 + 4·D bytes a point, plus 8 while sorting. Grid order (nothing stored) when the indices would
// not fit int32.
template <typename T, int D>
VisitingOrder<T, D> visiting_order(const PenaltyPoints<T, D>& pts) {
  const int64_t n = pts.num_points;
  int64_t bricks[D], brick_cells = 1, buckets = 1;
  for (int a = 0; a < D; ++a) {
    bricks[a] = (pts.count[a] + kVisitBrick - 1) / kVisitBrick;
    brick_cells *= kVisitBrick;
    buckets *= bricks[a] * kVisitBrick;
  }
  VisitingOrder<T, D> v;
  if (buckets >= INT32_MAX) return v;
  v.x.resize(static_cast<size_t>(D * n));
  std::vector<int32_t> bucket(n);
  at::parallel_for(0, n, 4096, [&](int64_t first, int64_t last) {
    float drawn8[kNoiseLanes][4];
    for (int64_t p = first; p < last; ++p) {
      T x[D];
      if (pts.noise) {
        penalty_point(pts, p, x);
      } else {
        const int lane = static_cast<int>((p - first) % kNoiseLanes);
        if (lane == 0) draw_noise(pts.seed, p, drawn8);
        penalty_point_drawn(pts, p, drawn8[lane], x);
      }
      int64_t outer = 0, inner = 0;
      for (int a = 0; a < D; ++a) {
        v.x[a * n + p] = x[a];
        // nearest point-grid index, clamped (a NaN lands on 0)
        const T hi = static_cast<T>(pts.count[a] - 1);
        const T c = x[a] * hi + T(0.5);
        const int64_t i = c > T(0) ? static_cast<int64_t>(std::min(c, hi)) : 0;
        outer = outer * bricks[a] + i / kVisitBrick;
        inner = inner * kVisitBrick + i % kVisitBrick;
      }
      bucket[p] = static_cast<int32_t>(outer * brick_cells + inner);
    }
  });
  std::vector<int32_t> start(buckets + 1, 0);
  v.index.resize(n);
  for (int64_t p = 0; p < n; ++p) ++start[bucket[p] + 1];
  for (int64_t k = 0; k < buckets; ++k) start[k + 1] += start[k];
  for (int64_t p = 0; p < n; ++p) v.index[start[bucket[p]]++] = static_cast<int32_t>(p);
  return v;
}

}  // namespace gradicon_fast::cpu
