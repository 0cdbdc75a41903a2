// The arguments of the pair penalties (GradICON, analytic GradICON, ICON) on (chain_AB, chain_BA),
// checked and prepared once for the CPU and CUDA ops (host code), and the set-up of their points.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "op_args.h"
#include "penalty_points.h"

namespace gradicon_fast {

// The composed chain φ_outer∘φ_inner as one list of fields, outermost first.
inline std::vector<at::Tensor> concatenated(const std::vector<at::Tensor>& outer, const std::vector<at::Tensor>& inner) {
  std::vector<at::Tensor> all(outer);
  all.insert(all.end(), inner.begin(), inner.end());
  return all;
}

struct PairArgs {
  std::vector<at::Tensor> ab, ba;  // contiguous
  std::vector<at::Tensor> fields;  // φ_AB's fields then φ_BA's: φ_AB∘φ_BA
  int64_t d, batch;
  std::vector<int64_t> grid;   // the `shape` argument: the grid the loss is taken on
  int64_t stride;
  std::vector<int64_t> count;  // points per axis
  int64_t num_points;          // Π count
  at::Tensor noise;            // contiguous, in the compute type; undefined to draw from the seed
  int64_t seed;
  double noise_scale;

  template <typename T, int D>
  PenaltyPoints<T, D> points() const {
    PenaltyPoints<T, D> pts;
    pts.num_points = num_points;
    for (int k = 0; k < D; ++k) {
      pts.grid[k] = static_cast<int>(grid[k]);
      pts.count[k] = static_cast<int>(count[k]);
    }
    pts.stride = static_cast<int>(stride);
    pts.noise = noise.defined() ? noise.data_ptr<T>() : nullptr;
    pts.seed = static_cast<uint64_t>(seed);
    pts.noise_scale = static_cast<T>(noise_scale);
    return pts;
  }

  // The fields' gradient mask, φ_AB's entries then φ_BA's, checked.
  std::vector<bool> needs_grad(const c10::List<bool>& ab_needs_grad, const c10::List<bool>& ba_needs_grad) const {
    std::vector<bool> needs = checked_mask(ab_needs_grad, ab.size(), "ab_needs_grad");
    for (bool m : checked_mask(ba_needs_grad, ba.size(), "ba_needs_grad")) needs.push_back(m);
    return needs;
  }

  // Gradients of `fields` (as returned_gradients gives them) split into φ_AB's and φ_BA's.
  std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> split(const std::vector<at::Tensor>& grads) const {
    const auto out = returned_gradients(grads, fields);
    return {std::vector<at::Tensor>(out.begin(), out.begin() + ab.size()),
            std::vector<at::Tensor>(out.begin() + ab.size(), out.end())};
  }
};

// `delta`: GradICON's finite-difference step, checked where the penalty has one. ICON passes
// stride 1.
inline PairArgs prepare_pair(at::TensorList chain_ab, at::TensorList chain_ba, at::IntArrayRef shape, int64_t stride,
                             const c10::optional<at::Tensor>& noise, int64_t seed, double noise_scale,
                             c10::DeviceType backend, std::optional<double> delta = std::nullopt) {
  PairArgs args;
  args.batch = 1;
  args.d = check_chain("chain_AB", chain_ab, args.batch);
  TORCH_CHECK(check_chain("chain_BA", chain_ba, args.batch) == args.d, "chain_AB and chain_BA must both be 2D or 3D");
  check_like("chain_BA[0]", chain_ba[0], "chain_AB[0]", chain_ab[0]);
  check_device_type(chain_ab[0], "chain_AB[0]", backend);
  check_batch_sizes(chain_ab, "chain_AB");
  check_batch_sizes(chain_ba, "chain_BA");
  args.count = check_penalty(args.d, shape, stride, noise, chain_ab[0]);
  if (delta.has_value()) TORCH_CHECK(*delta > 0, "delta must be positive, got ", *delta);
  TORCH_CHECK(noise_scale >= 0, "noise_scale must be >= 0, got ", noise_scale);
  args.ab = contiguous_all(chain_ab);
  args.ba = contiguous_all(chain_ba);
  args.fields = concatenated(args.ab, args.ba);
  args.grid = shape.vec();
  args.stride = stride;
  args.num_points = 1;
  for (int64_t c : args.count) args.num_points *= c;
  if (noise.has_value()) args.noise = noise->contiguous().to(compute_dtype(noise->scalar_type()));
  args.seed = seed;
  args.noise_scale = noise_scale;
  return args;
}

}  // namespace gradicon_fast
