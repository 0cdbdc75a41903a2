// Tensors → the FieldRef / ChainRef views the kernels read (chain.h). Host code, shared by the
// CPU and CUDA op files.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "chain.h"

namespace gradicon_fast {

// A contiguous (B|1, C, *S) tensor stored as S, and optionally its gradient buffer (same shape,
// compute type T; undefined when no gradient is wanted).
template <typename T, int D, typename S = T>
FieldRef<T, D, S> field_ref(const at::Tensor& t, const at::Tensor& grad, int64_t batch) {
  FieldRef<T, D, S> f;
  f.data = t.data_ptr<S>();
  f.grad = grad.defined() ? grad.data_ptr<T>() : nullptr;
  f.channels = static_cast<int>(t.size(1));
  int64_t stride = 1;
  for (int k = D - 1; k >= 0; --k) {
    f.size[k] = static_cast<int>(t.size(2 + k));
    f.stride[k] = stride;
    stride *= t.size(2 + k);
  }
  f.channel_stride = stride;
  f.batch_stride = (t.size(0) == 1 && batch > 1) ? 0 : stride * t.size(1);
  return f;
}

// Fields outermost first; grads[i] undefined where no gradient is wanted. `count` limits the
// chain to its first fields (a reverse pass may stop after the last field that needs anything).
template <typename T, int D, typename S = T>
ChainRef<T, D, S> chain_ref(const std::vector<at::Tensor>& fields, const std::vector<at::Tensor>& grads,
                            int64_t batch, int count = -1) {
  ChainRef<T, D, S> c;
  c.count = count < 0 ? static_cast<int>(fields.size()) : count;
  TORCH_INTERNAL_ASSERT(c.count <= kMaxComposed && c.count <= static_cast<int>(fields.size()));
  for (int i = 0; i < c.count; ++i) c.field[i] = field_ref<T, D, S>(fields[i], grads[i], batch);
  return c;
}

// The same without gradients (a forward pass).
template <typename T, int D, typename S = T>
ChainRef<T, D, S> chain_ref(const std::vector<at::Tensor>& fields, int64_t batch) {
  return chain_ref<T, D, S>(fields, std::vector<at::Tensor>(fields.size()), batch);
}

}  // namespace gradicon_fast
