// Host-side preparation of the ops' arguments, shared by the CPU (cpu/) and CUDA (cuda/) op files:
// every check of op_checks.h in one order for both backends, contiguous inputs, output shapes, the
// gradients the backward ops return, and the dispatch on the number of spatial axes. The pair
// penalties' arguments are in penalty_args.h.
#pragma once

#include <ATen/ATen.h>

#include <type_traits>
#include <vector>

#include "field_refs.h"
#include "op_checks.h"

namespace gradicon_fast {

// Compute type of a storage dtype: itself for float and double, float for the 16-bit types
// (which only the CUDA kernels take).
inline at::ScalarType compute_dtype(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

inline std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

// body(std::integral_constant<int, D>()) with D = d: the kernels are templates on the number of
// spatial axes, 2 or 3 (check_chain allows no other).
template <typename Body>
void dispatch_dims(int64_t d, const Body& body) {
  if (d == 2) {
    body(std::integral_constant<int, 2>());
  } else {
    body(std::integral_constant<int, 3>());
  }
}

// What the backward ops return for a gradient nobody asked for.
inline at::Tensor no_gradient(const at::Tensor& like) { return at::empty({0}, like.options()); }

// A finished gradient in the dtype of its input (a no-op for float and double).
inline at::Tensor as_dtype_of(const at::Tensor& g, const at::Tensor& like) {
  return g.scalar_type() == like.scalar_type() ? g : g.to(like.scalar_type());
}

// The fields' gradients as returned: grads[i] in fields[i]'s dtype, or empty where undefined.
inline std::vector<at::Tensor> returned_gradients(const std::vector<at::Tensor>& grads,
                                                  const std::vector<at::Tensor>& fields) {
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < grads.size(); ++i) {
    out.push_back(grads[i].defined() ? as_dtype_of(grads[i], fields[i]) : no_gradient(fields[i]));
  }
  return out;
}

// The incoming gradient of an op's tensor output: like chain[0] (`ref`), of the output's shape,
// contiguous.
inline at::Tensor output_gradient(const at::Tensor& grad, const std::vector<int64_t>& shape, const at::Tensor& ref) {
  check_like("grad", grad, "chain[0]", ref);
  at::Tensor out = grad.contiguous();
  TORCH_CHECK(out.sizes().vec() == shape, "grad must have shape ", at::IntArrayRef(shape), ", got ", out.sizes());
  return out;
}

// transform_points(chain, points): a chain evaluated at points (B|1, d, *P).
struct TransformArgs {
  std::vector<at::Tensor> fields;  // contiguous
  at::Tensor points;               // contiguous
  int64_t d, batch, n;             // n: points per batch entry
  std::vector<int64_t> full_shape;  // points' shape with the broadcast batch size: the output's
};

inline TransformArgs prepare_transform(at::TensorList chain, const at::Tensor& points, c10::DeviceType backend) {
  TransformArgs args;
  args.batch = 1;
  args.d = check_chain("chain", chain, args.batch);
  TORCH_CHECK(points.dim() >= 3 && points.size(1) == args.d, "points must be (B, ", args.d, ", *P), got ",
              points.sizes());
  check_like("points", points, "chain[0]", chain[0]);
  check_device_type(chain[0], "chain[0]", backend);
  check_batch_sizes(chain, "chain");
  check_batch_sizes({points}, "points");
  args.batch = merge_batch(args.batch, points.size(0), "points");
  args.n = 1;
  for (int64_t k = 2; k < points.dim(); ++k) args.n *= points.size(k);
  args.fields = contiguous_all(chain);
  args.points = points.contiguous();
  args.full_shape = args.points.sizes().vec();
  args.full_shape[0] = args.batch;
  return args;
}

// warp(image, chain, shape): an image (B|1, C, *S) sampled at φ(id) on a grid of `shape`.
struct WarpArgs {
  std::vector<at::Tensor> fields;  // contiguous
  at::Tensor image;                // contiguous
  int64_t d, batch;
  int64_t grid_points;             // Π shape
  std::vector<int64_t> out_shape;  // (batch, C, *shape)
};

inline WarpArgs prepare_warp(const at::Tensor& image, at::TensorList chain, at::IntArrayRef shape,
                             c10::DeviceType backend) {
  WarpArgs args;
  args.batch = 1;
  args.d = check_chain("chain", chain, args.batch);
  TORCH_CHECK(image.dim() == args.d + 2, "image must be (B, C, *spatial) with ", args.d,
              " spatial axes like the chain, got ", image.sizes());
  TORCH_CHECK(image.size(1) >= 1, "image must have at least one channel");
  for (int64_t k = 2; k < image.dim(); ++k) {
    TORCH_CHECK(image.size(k) >= 1 && image.size(k) < (int64_t(1) << 31), "image has an unsupported spatial size ",
                image.sizes());
  }
  TORCH_CHECK(image.size(1) < (int64_t(1) << 31), "image has too many channels: ", image.size(1));
  check_like("image", image, "chain[0]", chain[0]);
  check_device_type(chain[0], "chain[0]", backend);
  check_batch_sizes(chain, "chain");
  check_batch_sizes({image}, "image");
  args.batch = merge_batch(args.batch, image.size(0), "image");
  TORCH_CHECK(static_cast<int64_t>(shape.size()) == args.d, "shape must have ", args.d, " entries, got ", shape);
  for (int64_t s : shape) TORCH_CHECK(s >= 1 && s < (int64_t(1) << 31), "shape entries must be >= 1, got ", shape);
  args.fields = contiguous_all(chain);
  args.image = image.contiguous();
  args.grid_points = 1;
  for (int64_t s : shape) args.grid_points *= s;
  args.out_shape = {args.batch, image.size(1)};
  args.out_shape.insert(args.out_shape.end(), shape.begin(), shape.end());
  return args;
}

}  // namespace gradicon_fast
