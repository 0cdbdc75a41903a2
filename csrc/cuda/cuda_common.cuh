// CUDA-side plumbing shared by the CUDA kernels (one op per file in this folder): dtype policy,
// gradient buffers, launch sizes, the atomics policy of the gradient scatter (with
// warp-level aggregation), and the deterministic block reduction of the losses.
//
// Precision: float32 and float64 fields are computed in their own type; float16 and bfloat16
// fields are loaded through load_as (sampling.h) and computed, accumulated and scattered in
// float32 (their gradients are accumulated in float32 buffers and rounded once at the end).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../chain.h"
#include "../op_args.h"
#include "../penalty_args.h"

#ifndef GF_CUDA_BACKWARD_MIN_BLOCKS
#define GF_CUDA_BACKWARD_MIN_BLOCKS 2
#endif

namespace gradicon_fast::cuda {

constexpr int kThreads = 256;  // threads per block of every kernel (a multiple of the warp size)
constexpr int kWarp = 32;

// Register budget. The reverse passes keep chain.h's stash (the position each field was sampled
// at: fields × E × D numbers per thread) on the stack: chain.h's loops index it with the runtime
// field number, so it lives in local memory (L1/L2-cached) whatever its declared size, and only
// the count × E × D entries in use generate traffic. Templating the kernels on a maximum chain
// length would shrink the reservation, not the traffic; keeping the stash in registers would need
// compile-time chain lengths (fully unrolled loops in chain.h). The kernels size it kMaxChain
// (single chains) or kMaxComposed (φ_AB∘φ_BA).
//
// Minimum resident blocks per SM asked of the compiler for the penalties' reverse passes
// (__launch_bounds__): 2 caps float kernels at 128 registers (16 warps per SM instead of 8);
// double kernels need more registers than that and keep 1.
template <typename T>
constexpr int kBackwardBlocksPerSM = sizeof(T) == 4 ? GF_CUDA_BACKWARD_MIN_BLOCKS : 1;

// ---- dtypes ---------------------------------------------------------------------------------

// Compute type of a storage type: itself for float and double, float for the 16-bit types
// (compute_dtype of op_args.h for the dtype).
template <typename S>
using compute_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

// A value of the compute (or accumulation) type rounded once to the storage type.
template <typename S, typename V>
__host__ __device__ __forceinline__ S store_as(V v) {
  return S(static_cast<compute_t<S>>(v));
}

// Float, double, half and bfloat16, with scalar_t the storage type.
#define GF_CUDA_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// ---- arguments (on top of op_args.h) -------------------------------------------------------

// The incoming gradient of a scalar loss, as a one-element tensor of the compute type on the
// device: read by the kernels (no host synchronisation, unlike .item()).
inline at::Tensor loss_gradient(const at::Tensor& grad, const at::Tensor& ref) {
  TORCH_CHECK(grad.numel() == 1, "grad must be a scalar (the gradient of the loss), got shape ", grad.sizes());
  return grad.to(ref.device(), compute_dtype(ref.scalar_type())).reshape({1}).contiguous();
}

// Zeroed gradient accumulators in the compute type for the fields whose mask entry is set.
inline std::vector<at::Tensor> gradient_buffers(const std::vector<at::Tensor>& fields, const std::vector<bool>& mask) {
  std::vector<at::Tensor> grads(fields.size());
  for (size_t i = 0; i < fields.size(); ++i) {
    if (mask[i]) grads[i] = at::zeros(fields[i].sizes(), fields[i].options().dtype(compute_dtype(fields[i].scalar_type())));
  }
  return grads;
}

// Number of fields the reverse pass must visit: through the last one that needs a gradient, or
// all of them when the gradient with respect to the points is wanted. 0: nothing to do.
inline int backward_count(const std::vector<bool>& field_needs_grad, bool need_point_grad) {
  if (need_point_grad) return static_cast<int>(field_needs_grad.size());
  int count = 0;
  for (size_t j = 0; j < field_needs_grad.size(); ++j) {
    if (field_needs_grad[j]) count = static_cast<int>(j) + 1;
  }
  return count;
}

// Whether to aggregate a tensor's gradient scatter across the lanes of a warp: when neighbouring
// threads (consecutive points along the last axis) are expected to fall in the same cell, i.e.
// the tensor is coarser than the point grid along that axis by 1.5x or more.
inline bool coarse_for(const at::Tensor& field, int64_t points_along_last_axis) {
  const int64_t cells = std::max<int64_t>(field.size(-1) - 1, 1);
  return 2 * points_along_last_axis >= 3 * cells;
}

// Bit j set: aggregate the scatter into field j.
inline uint32_t aggregation_mask(const std::vector<at::Tensor>& fields, int64_t points_along_last_axis) {
  uint32_t mask = 0;
  for (size_t j = 0; j < fields.size(); ++j) {
    if (coarse_for(fields[j], points_along_last_axis)) mask |= 1u << j;
  }
  return mask;
}

// ---- launch sizes ---------------------------------------------------------------------------

inline int multiprocessors() {
  static std::atomic<int> cache[64] = {};
  const int device = c10::cuda::current_device();
  if (device >= 0 && device < 64) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known > 0) return known;
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  count = std::max(count, 1);
  if (device >= 0 && device < 64) cache[device].store(count, std::memory_order_relaxed);
  return count;
}

// Blocks for a grid-stride loop over `work` items: enough to fill the device several times
// over, never more than the work needs.
inline int blocks_for(int64_t work, int blocks_per_sm = 16) {
  const int64_t needed = (work + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(multiprocessors()) * blocks_per_sm;
  return static_cast<int>(std::max<int64_t>(1, std::min(needed, cap)));
}

// Flat index of this thread and the grid-stride step, in 64 bits.
__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ int64_t grid_threads() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

__device__ __forceinline__ unsigned lane_id() { return threadIdx.x & (kWarp - 1); }

// ---- atomics policy -------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void atomic_add(T* p, T v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 600
  if constexpr (std::is_same_v<T, double>) {
    auto* address = reinterpret_cast<unsigned long long*>(p);
    unsigned long long old = *address, assumed;
    do {
      assumed = old;
      old = atomicCAS(address, assumed, __double_as_longlong(v + __longlong_as_double(assumed)));
    } while (assumed != old);
    return;
  }
#endif
  atomicAdd(p, v);
}

// Sums the N values v over each group of lanes that share a key (`peers`, from
// __match_any_sync over `mask`); afterwards the lowest lane of each group holds its group's
// totals. Every lane of `mask` must call it together. ceil(log2(group size)) rounds of shuffles.
template <int N, typename T>
__device__ __forceinline__ void reduce_peers(unsigned mask, unsigned peers, T (&v)[N]) {
  const unsigned lane = lane_id();
  unsigned rank = __popc(peers & ((1u << lane) - 1u));  // position among the peers
  unsigned higher = peers & ~((2u << lane) - 1u);       // peers on higher lanes (2u << 31 wraps to 0)
  while (__any_sync(mask, higher != 0)) {
    const int next = __ffs(higher);  // 1 + the next remaining peer above, 0 if none
    const int source = next ? next - 1 : static_cast<int>(lane);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const T t = __shfl_sync(mask, v[i], source);
      if (next) v[i] += t;
    }
    // Peers at odd positions have been read by the one below them: they drop out.
    higher &= ~__ballot_sync(mask, rank & 1u);
    rank >>= 1;
  }
}

// The gradient scatter policy of the CUDA kernels: atomicAdd, with the adds of a warp's lanes
// aggregated per cell for the fields whose bit is set in `aggregate` (see scatter_field below).
template <typename T>
struct AtomicAdd {
  uint32_t aggregate = 0;  // bit j: field j of the chain is coarse (several lanes per cell)

  __device__ __forceinline__ void operator()(T* p, T v) const { atomic_add(p, v); }
};

// Adds the contributions of one thread's E points (D channels each: a chain's field) to the 2^D
// corners of their cells, aggregated across the lanes of the warp: the lanes are grouped by cell
// (__match_any_sync on the cell's address; the same address means the same corners), each
// group's contributions are summed by shuffles and its lowest lane issues one atomic per corner
// and channel. Points of one thread that share a cell (GradICON's δ-shifted points, usually) are
// summed first, as in scatter_to_cells. Never more atomics than the plain scatter, i.e. than
// grid_sample's backward.
template <typename T, int D, int E>
__device__ __forceinline__ void scatter_aggregated(T* grad, int64_t channel_stride, const Cell<T, D> (&c)[E],
                                                   const T* const (&a)[E]) {
  constexpr int kCorners = 1 << D;
  bool merged = true;
#pragma unroll
  for (int e = 1; e < E; ++e) merged = merged && same_cell(c[0], c[e]);
  const unsigned mask = __activemask();
  const unsigned lane = lane_id();
  // Slot s carries point s's contributions, or, when the points share one cell, slot 0 carries
  // the sum of all of them and the other slots are empty.
#pragma unroll
  for (int s = 0; s < E; ++s) {
    const bool active = s == 0 || !merged;
    if (s > 0 && !__any_sync(mask, active)) continue;
    T v[D * kCorners];
#pragma unroll
    for (int i = 0; i < D * kCorners; ++i) v[i] = T(0);
    if (active) {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        if (e != s && !(s == 0 && merged)) continue;
        T w[kCorners];
        int64_t unused[kCorners];
        corner_weights(c[e], w, unused);
#pragma unroll
        for (int ch = 0; ch < D; ++ch) {
#pragma unroll
          for (int corner = 0; corner < kCorners; ++corner) v[ch * kCorners + corner] += a[e][ch] * w[corner];
        }
      }
    }
    const unsigned long long key = active ? reinterpret_cast<unsigned long long>(grad + c[s].base) : 0ull;
    const unsigned peers = __match_any_sync(mask, key);
    if (__any_sync(mask, active && __popc(peers) > 1)) reduce_peers<D * kCorners>(mask, peers, v);
    if (active && __ffs(peers) - 1 == static_cast<int>(lane)) {
      T unused[kCorners];
      int64_t offset[kCorners];
      corner_weights(c[s], unused, offset);
#pragma unroll
      for (int ch = 0; ch < D; ++ch) {
        T* g = grad + ch * channel_stride;
#pragma unroll
        for (int corner = 0; corner < kCorners; ++corner) atomic_add(g + offset[corner], v[ch * kCorners + corner]);
      }
    }
  }
}

// The chain.h customisation point for AtomicAdd (found by argument-dependent lookup): fine
// fields take chain.h's plain scatter (merged per thread, one atomic per corner and channel),
// coarse ones the warp-aggregated one. `channels` is D (chain fields).
template <typename T, int D, int E>
__device__ __forceinline__ void scatter_field(AtomicAdd<T>& add, int field, T* grad, int64_t channel_stride,
                                              int channels, const Cell<T, D> (&c)[E], const T* const (&a)[E]) {
  if ((add.aggregate >> field) & 1u) {
    scatter_aggregated<T, D, E>(grad, channel_stride, c, a);
  } else {
    scatter_to_cells<T, D, E>(grad, channel_stride, channels, c, a, add);
  }
}

// ---- loss reduction -------------------------------------------------------------------------

// Sum over the block in a fixed order (warp shuffles, then shared memory); thread 0 gets it.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double warp_sums[kThreads / kWarp];
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / kWarp;
  if (lane_id() == 0) warp_sums[warp] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
    for (int i = 0; i < static_cast<int>(blockDim.x / kWarp); ++i) total += warp_sums[i];
  }
  __syncthreads();  // warp_sums may be reused by a following call
  return total;
}

// partial[blockIdx.x] = Σ over the block of v. Every thread of the block must call it.
__device__ __forceinline__ void write_block_partial(double* partial, double v) {
  const double total = block_sum(v);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// out[0] = (Σ partial) / denominator in the output dtype, summed in a fixed order, so that the
// loss is bitwise reproducible (for a given device and launch size). One block.
template <typename S>
__global__ void __launch_bounds__(kThreads) finish_mean_kernel(const double* partial, int count, double denominator,
                                                               S* out) {
  double v = 0.0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) v += partial[i];
  const double total = block_sum(v);
  if (threadIdx.x == 0) out[0] = store_as<S>(total / denominator);
}

// Launches `body(blocks, partial)` (a kernel writing one partial sum per block) and reduces the
// partial sums into a 0-dim tensor of `dtype`: the mean over `denominator` terms.
template <typename Launch>
at::Tensor mean_of_blocks(int64_t work, double denominator, const at::Tensor& like, const Launch& launch) {
  const int blocks = blocks_for(work, 4);
  at::Tensor partial = at::empty({blocks}, like.options().dtype(at::kDouble));
  at::Tensor out = at::empty({}, like.options());
  launch(blocks, partial.data_ptr<double>());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  GF_CUDA_DISPATCH(like.scalar_type(), "gradicon_fast_finish_mean", [&] {
    finish_mean_kernel<scalar_t><<<1, kThreads, 0, stream>>>(partial.data_ptr<double>(), blocks, denominator,
                                                             out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// A pair penalty's loss: launch(blocks, partial, stream) runs its forward kernel, which writes one
// partial sum of the terms per block; their mean over B·d·N (mean_of_blocks).
template <typename Launch>
at::Tensor penalty_mean(const PairArgs& args, const Launch& launch) {
  const c10::cuda::CUDAGuard guard(args.fields[0].device());
  const int64_t n = args.num_points;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  return mean_of_blocks(args.batch * n, static_cast<double>(args.batch * args.d * n), args.fields[0],
                        [&](int blocks, double* partial) { launch(blocks, partial, stream); });
}

}  // namespace gradicon_fast::cuda
