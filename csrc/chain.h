// Evaluating a chain of displacement fields at points, and its reverse pass: per-point math
// shared by the CPU and CUDA kernels (docs/conventions.md §1).
//
// φ = Φ_1∘…∘Φ_K: y = x; for D in reversed(chain): y = y + sample(D, y). The forward pass can
// keep the position each field was sampled at (the "stash", K·d numbers per point, in
// registers or on the stack), so that the reverse pass needs nothing stored between the
// forward and backward ops. E points that travel together (GradICON's x and x + δ ê_k) are
// evaluated in lockstep, so that their reads and gradient writes hit the same cells.
#pragma once

#include "sampling.h"

namespace gradicon_fast {

// One tensor sampled by the kernels: a displacement field of a chain (channels == D), or the
// image of a warp. Contiguous (B|1, C, *size). Values are stored as S and computed with as T (S is
// T except for half-precision fields on CUDA, computed in float); the gradient buffer is in T.
template <typename T, int D, typename S = T>
struct FieldRef {
  const S* data;
  T* grad;                 // nullptr when no gradient is wanted
  int channels;
  int size[D];
  int64_t stride[D];       // spatial strides, in elements
  int64_t channel_stride;  // elements per channel
  int64_t batch_stride;    // elements per batch entry; 0 when the tensor broadcasts over the batch
};

template <typename T, int D, typename S = T>
struct ChainRef {
  FieldRef<T, D, S> field[kMaxComposed];  // outermost first: field[count - 1] is applied first
  int count;
};

template <typename T, int D, typename S>
GF_HD Cell<T, D> locate_in(const FieldRef<T, D, S>& f, const T* x) {
  return locate_cell<T, D>(x, f.size, f.stride);
}

// y[e] ← φ(y[e]) for E points of batch entry b. If stash is not null, stash[j][e] receives the
// position field j was sampled at.
template <typename T, int D, int E, typename S>
GF_HD void chain_forward(const ChainRef<T, D, S>& chain, int64_t b, T (&y)[E][D], T (*stash)[E][D]) {
  for (int j = chain.count - 1; j >= 0; --j) {
    const FieldRef<T, D, S>& f = chain.field[j];
    const S* data = f.data + b * f.batch_stride;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const Cell<T, D> c = locate_in(f, y[e]);
      T s[D];
#pragma unroll
      for (int ch = 0; ch < D; ++ch) s[ch] = interpolate(data + ch * f.channel_stride, c);
#pragma unroll
      for (int k = 0; k < D; ++k) {
        if (stash) stash[j][e][k] = y[e][k];
        y[e][k] += s[k];
      }
    }
  }
}

// grad[ch][corners of c[e]] += a[e][ch] * weight, for E points at once. When all E points lie
// in the same cell (the common case for GradICON's δ-shifted points) their contributions are
// summed first and each voxel is written once.
template <typename T, int D, int E, typename Add>
GF_HD void scatter_to_cells(T* grad, int64_t channel_stride, int channels, const Cell<T, D> (&c)[E],
                            const T* const (&a)[E], Add& add) {
  constexpr int kCorners = 1 << D;
  bool merged = true;
#pragma unroll
  for (int e = 1; e < E; ++e) merged = merged && same_cell(c[0], c[e]);
  if (merged) {
    T w[E][kCorners];
    int64_t offset[kCorners];
#pragma unroll
    for (int e = 0; e < E; ++e) corner_weights(c[e], w[e], offset);
    for (int ch = 0; ch < channels; ++ch) {
      T* g = grad + ch * channel_stride;
#pragma unroll
      for (int corner = 0; corner < kCorners; ++corner) {
        T v = T(0);
#pragma unroll
        for (int e = 0; e < E; ++e) v += a[e][ch] * w[e][corner];
        add(g + offset[corner], v);
      }
    }
    return;
  }
#pragma unroll
  for (int e = 0; e < E; ++e) {
    T w[kCorners];
    int64_t offset[kCorners];
    corner_weights(c[e], w, offset);
    for (int ch = 0; ch < channels; ++ch) {
      T* g = grad + ch * channel_stride;
#pragma unroll
      for (int corner = 0; corner < kCorners; ++corner) add(g + offset[corner], a[e][ch] * w[corner]);
    }
  }
}

// The gradient scatter of field `field` of a chain: the generic version adds every contribution
// through add(pointer, value) (scatter_to_cells). An Add policy may overload scatter_field for its
// own type (found by argument-dependent lookup), e.g. to aggregate across GPU threads.
template <typename T, int D, int E, typename Add>
GF_HD void scatter_field(Add& add, int field, T* grad, int64_t channel_stride, int channels, const Cell<T, D> (&c)[E],
                         const T* const (&a)[E]) {
  (void)field;
  scatter_to_cells<T, D, E>(grad, channel_stride, channels, c, a, add);
}

// Reverse pass of chain_forward. a[e] holds ∂L/∂φ(x_e) on entry and ∂L/∂x_e on exit (when
// need_point_grad). Field gradients go through scatter_field (by default add(pointer, value)).
template <typename T, int D, int E, typename Add, typename S>
GF_HD void chain_backward(const ChainRef<T, D, S>& chain, int64_t b, const T (*stash)[E][D], T (&a)[E][D],
                          bool need_point_grad, Add& add) {
  for (int j = 0; j < chain.count; ++j) {
    const FieldRef<T, D, S>& f = chain.field[j];
    Cell<T, D> c[E];
#pragma unroll
    for (int e = 0; e < E; ++e) c[e] = locate_in(f, stash[j][e]);
    if (f.grad) {
      const T* adjoint[E];
#pragma unroll
      for (int e = 0; e < E; ++e) adjoint[e] = a[e];
      scatter_field<T, D, E>(add, j, f.grad + b * f.batch_stride, f.channel_stride, D, c, adjoint);
    }
    if (j == chain.count - 1 && !need_point_grad) break;
    const S* data = f.data + b * f.batch_stride;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      // y_{j+1} = y_j + s(y_j): ∂L/∂y_j = ā + J_s(y_j)ᵀ ā.
      T next[D];
#pragma unroll
      for (int k = 0; k < D; ++k) next[k] = a[e][k];
#pragma unroll
      for (int ch = 0; ch < D; ++ch) {
        T grad_s[D];
        interpolate_gradient(data + ch * f.channel_stride, c[e], grad_s);
#pragma unroll
        for (int k = 0; k < D; ++k) next[k] += a[e][ch] * grad_s[k];
      }
#pragma unroll
      for (int k = 0; k < D; ++k) a[e][k] = next[k];
    }
  }
}

}  // namespace gradicon_fast
