// Host-side set-up of a penalty's points from the op arguments (CPU and CUDA ops).
#pragma once

#include <ATen/ATen.h>

#include "penalty_points.h"

namespace gradicon_fast {

template <typename T, int D>
PenaltyPoints<T, D> penalty_points_from(at::IntArrayRef grid, int64_t stride, const std::vector<int64_t>& count,
                                        const at::Tensor& noise /* contiguous or undefined */, int64_t seed,
                                        double noise_scale) {
  PenaltyPoints<T, D> pts;
  pts.num_points = 1;
  for (int k = 0; k < D; ++k) {
    pts.grid[k] = static_cast<int>(grid[k]);
    pts.count[k] = static_cast<int>(count[k]);
    pts.num_points *= count[k];
  }
  pts.stride = static_cast<int>(stride);
  pts.noise = noise.defined() ? noise.data_ptr<T>() : nullptr;
  pts.seed = static_cast<uint64_t>(seed);
  pts.noise_scale = static_cast<T>(noise_scale);
  return pts;
}

// The composed chain φ_outer∘φ_inner as one list of fields, outermost first.
inline std::vector<at::Tensor> concatenated(const std::vector<at::Tensor>& outer, const std::vector<at::Tensor>& inner) {
  std::vector<at::Tensor> all(outer);
  all.insert(all.end(), inner.begin(), inner.end());
  return all;
}

}  // namespace gradicon_fast
