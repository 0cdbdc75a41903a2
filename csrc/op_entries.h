// The ops' C++ entry points, written once for both backends: each takes its schema's arguments
// (ops.cpp), checks and prepares them (op_args.h, penalty_args.h) and hands them to a backend's
// kernels. `K` is the kernel set of an op file (cpu/<op>_cpu.cpp, cuda/<op>_cuda.cu): a struct with
// the backend's device type as K::kDevice and the functions called below; the op file registers
// entry::<op><K> for its dispatch key.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "op_args.h"
#include "penalty_args.h"

namespace gradicon_fast::entry {

using Grads = std::vector<at::Tensor>;

template <class K>
at::Tensor transform_points(at::TensorList chain, const at::Tensor& points) {
  return K::forward(prepare_transform(chain, points, K::kDevice));
}

// K::backward returns the field gradient buffers and the points' gradient (B, d, *P) in the
// compute type (undefined when not wanted).
template <class K>
std::tuple<Grads, at::Tensor> transform_points_backward(const at::Tensor& grad, at::TensorList chain,
                                                        const at::Tensor& points,
                                                        const c10::List<bool>& chain_needs_grad,
                                                        bool points_needs_grad) {
  const TransformArgs args = prepare_transform(chain, points, K::kDevice);
  const std::vector<bool> needs = checked_mask(chain_needs_grad, chain.size(), "chain_needs_grad");
  auto [grads, grad_points] = K::backward(args, output_gradient(grad, args.full_shape, chain[0]), needs,
                                          points_needs_grad);
  at::Tensor returned_points = no_gradient(args.points);
  if (points_needs_grad) {
    if (args.points.size(0) != args.batch) grad_points = grad_points.sum(0, true);
    returned_points = as_dtype_of(grad_points, args.points);
  }
  return {returned_gradients(grads, args.fields), returned_points};
}

template <class K>
at::Tensor warp(const at::Tensor& image, at::TensorList chain, at::IntArrayRef shape) {
  return K::forward(prepare_warp(image, chain, shape, K::kDevice), shape);
}

// K::backward returns the image's gradient buffer (undefined when not wanted) and the fields'.
template <class K>
std::tuple<at::Tensor, Grads> warp_backward(const at::Tensor& grad, const at::Tensor& image, at::TensorList chain,
                                            at::IntArrayRef shape, bool image_needs_grad,
                                            const c10::List<bool>& chain_needs_grad) {
  const WarpArgs args = prepare_warp(image, chain, shape, K::kDevice);
  const std::vector<bool> needs = checked_mask(chain_needs_grad, chain.size(), "chain_needs_grad");
  auto [grad_image, grads] = K::backward(args, output_gradient(grad, args.out_shape, chain[0]), shape,
                                         image_needs_grad, needs);
  return {image_needs_grad ? as_dtype_of(grad_image, args.image) : no_gradient(args.image),
          returned_gradients(grads, args.fields)};
}

// ---- pair penalties: K::loss_backward returns the gradient buffers of args.fields ----------------

template <class K>
at::Tensor gradicon_loss(at::TensorList chain_ab, at::TensorList chain_ba, at::IntArrayRef shape, int64_t stride,
                         const c10::optional<at::Tensor>& noise, int64_t seed, double delta, double noise_scale) {
  return K::loss(prepare_pair(chain_ab, chain_ba, shape, stride, noise, seed, noise_scale, K::kDevice, delta), delta);
}

template <class K>
std::tuple<Grads, Grads> gradicon_loss_backward(const at::Tensor& grad, at::TensorList chain_ab,
                                                at::TensorList chain_ba, at::IntArrayRef shape, int64_t stride,
                                                const c10::optional<at::Tensor>& noise, int64_t seed, double delta,
                                                double noise_scale, const c10::List<bool>& ab_needs_grad,
                                                const c10::List<bool>& ba_needs_grad) {
  const PairArgs args = prepare_pair(chain_ab, chain_ba, shape, stride, noise, seed, noise_scale, K::kDevice, delta);
  const std::vector<bool> needs = args.needs_grad(ab_needs_grad, ba_needs_grad);
  check_on(grad, "grad", chain_ab[0]);
  return args.split(K::loss_backward(args, grad, needs, delta));
}

// The loss and its gradients for a unit upstream gradient in one pass over the points (for
// callers that will backpropagate anyway). K::loss_and_grad returns the loss and the buffers.
template <class K>
std::tuple<at::Tensor, Grads, Grads> gradicon_loss_and_grad(at::TensorList chain_ab, at::TensorList chain_ba,
                                                            at::IntArrayRef shape, int64_t stride,
                                                            const c10::optional<at::Tensor>& noise, int64_t seed,
                                                            double delta, double noise_scale,
                                                            const c10::List<bool>& ab_needs_grad,
                                                            const c10::List<bool>& ba_needs_grad) {
  const PairArgs args = prepare_pair(chain_ab, chain_ba, shape, stride, noise, seed, noise_scale, K::kDevice, delta);
  auto [loss, grads] = K::loss_and_grad(args, args.needs_grad(ab_needs_grad, ba_needs_grad), delta);
  auto [grad_ab, grad_ba] = args.split(grads);
  return {loss, grad_ab, grad_ba};
}

template <class K>
at::Tensor gradicon_analytic_loss(at::TensorList chain_ab, at::TensorList chain_ba, at::IntArrayRef shape,
                                  int64_t stride, const c10::optional<at::Tensor>& noise, int64_t seed,
                                  double noise_scale) {
  return K::loss(prepare_pair(chain_ab, chain_ba, shape, stride, noise, seed, noise_scale, K::kDevice));
}

template <class K>
std::tuple<Grads, Grads> gradicon_analytic_loss_backward(const at::Tensor& grad, at::TensorList chain_ab,
                                                         at::TensorList chain_ba, at::IntArrayRef shape, int64_t stride,
                                                         const c10::optional<at::Tensor>& noise, int64_t seed,
                                                         double noise_scale, const c10::List<bool>& ab_needs_grad,
                                                         const c10::List<bool>& ba_needs_grad) {
  const PairArgs args = prepare_pair(chain_ab, chain_ba, shape, stride, noise, seed, noise_scale, K::kDevice);
  const std::vector<bool> needs = args.needs_grad(ab_needs_grad, ba_needs_grad);
  check_on(grad, "grad", chain_ab[0]);
  return args.split(K::loss_backward(args, grad, needs));
}

template <class K>
at::Tensor icon_loss(at::TensorList chain_ab, at::TensorList chain_ba, at::IntArrayRef shape,
                     const c10::optional<at::Tensor>& noise, int64_t seed, double noise_scale) {
  return K::loss(prepare_pair(chain_ab, chain_ba, shape, 1, noise, seed, noise_scale, K::kDevice));
}

// K::loss_backward returns the gradient buffers of φ_AB's and φ_BA's fields.
template <class K>
std::tuple<Grads, Grads> icon_loss_backward(const at::Tensor& grad, at::TensorList chain_ab, at::TensorList chain_ba,
                                            at::IntArrayRef shape, const c10::optional<at::Tensor>& noise,
                                            int64_t seed, double noise_scale, const c10::List<bool>& ab_needs_grad,
                                            const c10::List<bool>& ba_needs_grad) {
  const PairArgs args = prepare_pair(chain_ab, chain_ba, shape, 1, noise, seed, noise_scale, K::kDevice);
  const std::vector<bool> needs_ab = checked_mask(ab_needs_grad, chain_ab.size(), "ab_needs_grad");
  const std::vector<bool> needs_ba = checked_mask(ba_needs_grad, chain_ba.size(), "ba_needs_grad");
  check_on(grad, "grad", chain_ab[0]);
  auto [grad_ab, grad_ba] = K::loss_backward(args, grad, needs_ab, needs_ba);
  return {returned_gradients(grad_ab, args.ab), returned_gradients(grad_ba, args.ba)};
}

}  // namespace gradicon_fast::entry
