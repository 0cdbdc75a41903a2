// Argument checks of the C++ ops (host only, shared by the CPU and CUDA implementations; op_args.h
// and penalty_args.h apply them). The Python API checks the same things with friendlier names
// first; these keep direct calls of torch.ops.gradicon_fast.* memory-safe.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "sampling.h"

namespace gradicon_fast {

inline int64_t merge_batch(int64_t batch, int64_t other, const std::string& name) {
  TORCH_CHECK(other == batch || other == 1 || batch == 1, name, " has batch size ", other,
              ", which does not match batch size ", batch, " of the other inputs");
  return std::max(batch, other);
}

// Checks a chain; returns its number of spatial axes and updates the broadcast batch size.
inline int64_t check_chain(const char* name, at::TensorList chain, int64_t& batch, int max_fields = kMaxChain) {
  TORCH_CHECK(!chain.empty(), name, " is empty: a chain needs at least one displacement field");
  TORCH_CHECK(static_cast<int>(chain.size()) <= max_fields, name, " has ", chain.size(),
              " fields; at most ", max_fields, " are supported");
  const at::Tensor& first = chain[0];
  const int64_t d = first.dim() - 2;
  TORCH_CHECK(d == 2 || d == 3, name, "[0] must be (B, d, *spatial) with d = 2 or 3, got ", first.sizes());
  for (size_t i = 0; i < chain.size(); ++i) {
    const at::Tensor& f = chain[i];
    const std::string fname = std::string(name) + "[" + std::to_string(i) + "]";
    TORCH_CHECK(f.is_floating_point(), fname, " must have a floating-point dtype, got ", f.scalar_type());
    TORCH_CHECK(f.dim() == d + 2, fname, " has ", f.dim() - 2, " spatial axes but ", name, "[0] has ", d);
    TORCH_CHECK(f.size(1) == d, fname, " must have ", d, " channels, got ", f.size(1));
    TORCH_CHECK(f.scalar_type() == first.scalar_type(), fname, " has dtype ", f.scalar_type(), " but ", name,
                "[0] has ", first.scalar_type());
    TORCH_CHECK(f.device() == first.device(), fname, " is on ", f.device(), " but ", name, "[0] is on ",
                first.device());
    for (int64_t k = 2; k < f.dim(); ++k) {
      TORCH_CHECK(f.size(k) >= 1 && f.size(k) < (int64_t(1) << 31), fname, " has an unsupported spatial size ",
                  f.sizes());
    }
    batch = merge_batch(batch, f.size(0), fname);
  }
  return d;
}

inline void check_like(const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", ref_name,
              " has ", ref.scalar_type());
}

inline std::vector<int64_t> points_per_axis(at::IntArrayRef grid, int64_t stride) {
  std::vector<int64_t> count;
  for (int64_t s : grid) count.push_back((s + stride - 1) / stride);
  return count;
}

// Checks the penalty grid and optional noise; returns the points' spatial shape.
inline std::vector<int64_t> check_penalty(int64_t d, at::IntArrayRef grid, int64_t stride,
                                          const c10::optional<at::Tensor>& noise, const at::Tensor& ref) {
  TORCH_CHECK(static_cast<int64_t>(grid.size()) == d, "shape must have ", d, " entries, got ", grid);
  for (int64_t s : grid) TORCH_CHECK(s >= 1 && s < (int64_t(1) << 31), "shape entries must be >= 1, got ", grid);
  TORCH_CHECK(stride >= 1, "stride must be >= 1, got ", stride);
  std::vector<int64_t> count = points_per_axis(grid, stride);
  if (noise.has_value()) {
    std::vector<int64_t> expected{1, d};
    expected.insert(expected.end(), count.begin(), count.end());
    TORCH_CHECK(noise->sizes().vec() == expected, "noise must have shape ", at::IntArrayRef(expected), ", got ",
                noise->sizes());
    check_like("noise", *noise, "chain_AB[0]", ref);
  }
  return count;
}

inline void check_mask(const c10::List<bool>& mask, size_t n, const char* name) {
  TORCH_CHECK(mask.size() == n, name, " must have one entry per field (", n, "), got ", mask.size());
}

// A gradient mask (one entry per field of a chain of n), checked, as a vector.
inline std::vector<bool> checked_mask(const c10::List<bool>& mask, size_t n, const char* name) {
  check_mask(mask, n, name);
  std::vector<bool> out;
  for (bool m : mask) out.push_back(m);
  return out;
}

// The dispatcher sends an op to a backend's kernels when one of its tensors is on that backend's
// device; check_like has checked that every tensor is on ref's device, so it remains to check
// that this is the backend's device type.
inline void check_device_type(const at::Tensor& ref, const char* name, c10::DeviceType backend) {
  TORCH_CHECK(ref.device().type() == backend, name, " must be a ", c10::DeviceTypeName(backend), " tensor for the ",
              c10::DeviceTypeName(backend), " kernels, got one on ", ref.device());
}

// A batch size of 0 would broadcast as if it were 1 (merge_batch) and index an empty tensor:
// rejected.
inline void check_batch_sizes(at::TensorList tensors, const char* name) {
  for (const auto& t : tensors) TORCH_CHECK(t.dim() >= 1 && t.size(0) >= 1, name, " has a tensor with batch size 0");
}

// The output of normal_noise_: (1, d, *P), contiguous, on the backend's device.
inline void check_noise_output(const at::Tensor& out, c10::DeviceType backend) {
  TORCH_CHECK(out.dim() >= 3 && out.size(0) == 1 && out.size(1) >= 1 && out.size(1) <= 4,
              "out must be (1, d, *P) with 1 <= d <= 4, got ", out.sizes());
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  check_device_type(out, "out", backend);
}

inline void check_on(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but chain[0] is on ", ref.device());
}

}  // namespace gradicon_fast
