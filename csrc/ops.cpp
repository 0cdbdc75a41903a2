// Schemas of the gradicon_fast ops. Kernels are registered per device in cpu/ and cuda/;
// autograd and fake (meta) kernels in gradicon_fast/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import gradicon_fast._C` runs this and the static registrations below; the module itself is
// empty (the ops live in torch.ops.gradicon_fast).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace gradicon_fast {

bool built_with_cuda() {
#ifdef GRADICON_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(gradicon_fast, m) {
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  // Fills out (1, d, *P) with the noise the penalties draw from `seed` (see philox.h).
  m.def("normal_noise_(Tensor(a!) out, int seed) -> ()");
  m.def("transform_points(Tensor[] chain, Tensor points) -> Tensor");
  m.def(
      "transform_points_backward(Tensor grad, Tensor[] chain, Tensor points, bool[] chain_needs_grad, "
      "bool points_needs_grad) -> (Tensor[], Tensor)");
  m.def("warp(Tensor image, Tensor[] chain, int[] shape) -> Tensor");
  m.def(
      "warp_backward(Tensor grad, Tensor image, Tensor[] chain, int[] shape, bool image_needs_grad, "
      "bool[] chain_needs_grad) -> (Tensor, Tensor[])");
  m.def(
      "gradicon_loss(Tensor[] chain_ab, Tensor[] chain_ba, int[] shape, int stride, Tensor? noise, int seed, "
      "float delta, float noise_scale) -> Tensor");
  m.def(
      "gradicon_loss_backward(Tensor grad, Tensor[] chain_ab, Tensor[] chain_ba, int[] shape, int stride, "
      "Tensor? noise, int seed, float delta, float noise_scale, bool[] ab_needs_grad, bool[] ba_needs_grad) "
      "-> (Tensor[], Tensor[])");
  // The loss and its gradients (for a unit upstream gradient) in one pass; gradients of the fields
  // whose mask entry is false are empty tensors.
  m.def(
      "gradicon_loss_and_grad(Tensor[] chain_ab, Tensor[] chain_ba, int[] shape, int stride, Tensor? noise, "
      "int seed, float delta, float noise_scale, bool[] ab_needs_grad, bool[] ba_needs_grad) "
      "-> (Tensor, Tensor[], Tensor[])");
  m.def(
      "icon_loss(Tensor[] chain_ab, Tensor[] chain_ba, int[] shape, Tensor? noise, int seed, float noise_scale) "
      "-> Tensor");
  m.def(
      "icon_loss_backward(Tensor grad, Tensor[] chain_ab, Tensor[] chain_ba, int[] shape, Tensor? noise, "
      "int seed, float noise_scale, bool[] ab_needs_grad, bool[] ba_needs_grad) -> (Tensor[], Tensor[])");
  // Analytic GradICON: the exact chain-rule Jacobian instead of finite differences (docs/conventions.md §2).
  m.def(
      "gradicon_analytic_loss(Tensor[] chain_ab, Tensor[] chain_ba, int[] shape, int stride, Tensor? noise, "
      "int seed, float noise_scale) -> Tensor");
  m.def(
      "gradicon_analytic_loss_backward(Tensor grad, Tensor[] chain_ab, Tensor[] chain_ba, int[] shape, "
      "int stride, Tensor? noise, int seed, float noise_scale, bool[] ab_needs_grad, bool[] ba_needs_grad) "
      "-> (Tensor[], Tensor[])");
}

}  // namespace gradicon_fast
