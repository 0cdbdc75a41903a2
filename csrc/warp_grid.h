// The output grid of a warp (docs/conventions.md §1): per-point math shared by the CPU and CUDA
// kernels.
#pragma once

#include <cstdint>

#include "chain.h"
#include "penalty_points.h"
#include "sampling.h"

namespace gradicon_fast {

template <int D>
struct Grid {
  int size[D];
  int64_t count;
};

template <int D, typename Shape>
Grid<D> make_grid(const Shape& shape) {
  Grid<D> g;
  g.count = 1;
  for (int k = 0; k < D; ++k) {
    g.size[k] = static_cast<int>(shape[k]);
    g.count *= shape[k];
  }
  return g;
}

// The identity coordinates of grid point p (flat index, last axis fastest).
template <typename T, int D>
GF_HD void grid_point(const Grid<D>& grid, int64_t p, T (&x)[1][D]) {
  int64_t rest = p;
#pragma unroll
  for (int k = D - 1; k >= 0; --k) {
    const int64_t next = rest / grid.size[k];
    x[0][k] = grid_coordinate<T>(rest - next * grid.size[k], grid.size[k]);
    rest = next;
  }
}

// 0 for a finite point, NaN otherwise: added to the warped value so that a non-finite map never
// yields a finite image (clamping alone would sample the border).
template <typename T, int D>
GF_HD T poison(const T (&y)[1][D]) {
  T z = T(0);
#pragma unroll
  for (int k = 0; k < D; ++k) z += y[0][k] - y[0][k];
  return z;
}

// Where grid point p of batch entry b samples the image: the cell of φ(x_p), and the poison to
// add to every channel's value.
template <typename T, int D>
struct WarpSample {
  Cell<T, D> cell;
  T poison;
};

template <typename T, int D, typename S>
GF_HD WarpSample<T, D> warp_sample(const ChainRef<T, D, S>& chain, const FieldRef<T, D, S>& image,
                                   const Grid<D>& grid, int64_t b, int64_t p) {
  T y[1][D];
  grid_point(grid, p, y);
  chain_forward<T, D, 1>(chain, b, y, nullptr);
  return {locate_in(image, y[0]), poison(y)};
}

}  // namespace gradicon_fast
