// CPU-side plumbing shared by the CPU kernels: the parallel loop that lets threads add to
// gradients without atomics, deterministic sums, and the gradient buffers. (Tensor → FieldRef
// views and the argument checks are shared with the CUDA ops: ../field_refs.h, ../op_args.h.)
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "../chain.h"
#include "../penalty_points.h"
#ifdef __AVX__
#include <immintrin.h>
#endif

namespace gradicon_fast::cpu {

// Gradient rows along the first spatial axis, counted over the batch for tensors that have one:
// the unit of ownership for for_each_point_owning_rows.
struct RowRange {
  int64_t lo, hi;  // [lo, hi)
};

template <typename T, int D>
int64_t gradient_rows(const FieldRef<T, D>& f, int64_t batch) {
  return f.batch_stride ? batch * f.size[0] : f.size[0];
}

// Every row of each target: the ranges of a point that runs alone.
inline std::vector<RowRange> whole_rows(const std::vector<int64_t>& target_rows) {
  std::vector<RowRange> all(target_rows.size());
  for (size_t i = 0; i < target_rows.size(); ++i) all[i] = {0, target_rows[i]};
  return all;
}

// The gradient targets of a chain's reverse pass when field j is target j: their rows, and the
// field → target map chain_touches_only reads.
template <typename T, int D>
struct ChainTargets {
  std::vector<int64_t> rows;
  int target[kMaxComposed];

  ChainTargets(const ChainRef<T, D>& chain, int64_t batch) {
    for (int j = 0; j < chain.count; ++j) {
      rows.push_back(gradient_rows(chain.field[j], batch));
      target[j] = j;
    }
  }
};

// Does a point sampled at x (axis 0) in batch entry b touch only rows of `range`?
template <typename T, int D>
inline bool touches_only(const FieldRef<T, D>& f, int64_t b, T x0, const RowRange& range) {
  const AxisPos<T> a = locate(x0, f.size[0], 1);  // stride 1: step is 1 exactly when the upper row exists
  const int64_t lo = (f.batch_stride ? b * f.size[0] : 0) + a.index;
  const int64_t hi = lo + a.step;
  return lo >= range.lo && hi < range.hi;
}

// Pairs of slabs that for_each_item_owning_rows cuts the items into: a constant, not the thread
// count, so that every gradient voxel receives its additions in the same order, and the rounded
// sums come out bit-identical, whatever the number of threads (a registration's few ulps per step
// otherwise grow through Adam into differences of millimetres). Two pairs: at lung scale the
// penalty's points, visited in brick layers 16 rows deep (visiting_order.h), leave none of their
// slab's rows with two pairs, but 4 % with four pairs and 32 % with eight, and a left point costs
// a serial pass at the scalar kernels' speed; so more pairs would not be faster. The scattered
// backward passes therefore use at most two threads.
constexpr int64_t kSlabPairs = 2;

// Runs body(item, ranges, deferred) for every item in [0, n), in parallel, without two threads
// ever adding to the same gradient voxel. An item is one point or a group of points. The items
// are cut into 2·P contiguous slabs (P = kSlabPairs, or 1 when n < 2·min_items_per_slab: then one
// slab owning every row), which run in two rounds: the even slabs, then the odd ones, one thread
// per slab. Slab s owns rows [rows·(s - ½)/2P, rows·(s + 1½)/2P) of every gradient target
// (target_rows[i] rows each): its own rows and half of each neighbour's, which no other slab of
// the same round owns. body may add only there; a point that would touch a row outside is left
// alone and its index appended to `deferred`; those points run afterwards through single(point),
// on one thread with every row allowed, slab by slab. Points laid out in grid order touch rows
// near their own, so (almost) none are deferred; any layout is correct. Which points each slab
// adds, and in which order, depends on n and the data only: each gradient voxel gets its
// additions in the same order for any number of threads.
// body and single return a value per call (e.g. the loss of the points they processed); the
// result is their sum, in an order fixed by n (slab by slab, then the deferred points).
template <typename Body, typename Single>
double for_each_item_owning_rows(int64_t n, const std::vector<int64_t>& target_rows, int64_t min_items_per_slab,
                                 const Body& body, const Single& single) {
  const size_t targets = target_rows.size();
  const std::vector<RowRange> all = whole_rows(target_rows);
  const int64_t pairs = std::min<int64_t>(kSlabPairs, std::max<int64_t>(n / std::max<int64_t>(min_items_per_slab, 1), 1));
  const int64_t slabs = pairs <= 1 ? 1 : 2 * pairs;
  std::vector<std::vector<int64_t>> deferred(slabs);
  std::vector<double> partial(slabs, 0.0);
  if (slabs == 1) {
    for (int64_t i = 0; i < n; ++i) partial[0] += body(i, all.data(), deferred[0]);
  } else {
    for (int64_t round = 0; round < 2; ++round) {
      at::parallel_for(0, pairs, 1, [&](int64_t first, int64_t last) {
        std::vector<RowRange> own(targets);
        for (int64_t t = first; t < last; ++t) {
          const int64_t s = 2 * t + round;
          for (size_t i = 0; i < targets; ++i) {
            const int64_t r = target_rows[i];
            own[i] = {std::max<int64_t>(0, (r * (2 * s - 1)) / (2 * slabs)),
                      std::min<int64_t>(r, (r * (2 * s + 3)) / (2 * slabs))};
          }
          const int64_t begin = n * s / slabs, end = n * (s + 1) / slabs;
          double sum = 0.0;
          for (int64_t i = begin; i < end; ++i) sum += body(i, own.data(), deferred[s]);
          partial[s] = sum;
        }
      });
    }
  }
  double total = 0.0;
  for (double v : partial) total += v;
  for (const auto& list : deferred) {
    for (int64_t p : list) total += single(p);
  }
  return total;
}

// The same for one point per item: body(point, ranges) returns false, having written nothing,
// when the point would leave its rows.
template <typename Body>
void for_each_point_owning_rows(int64_t n, const std::vector<int64_t>& target_rows, const Body& body) {
  const std::vector<RowRange> all = whole_rows(target_rows);
  for_each_item_owning_rows(
      n, target_rows, 256,
      [&](int64_t p, const RowRange* own, std::vector<int64_t>& deferred) {
        if (!body(p, own)) deferred.push_back(p);
        return 0.0;
      },
      [&](int64_t p) {
        body(p, all.data());
        return 0.0;
      });
}

// Sum of per-point values over [0, n) in double, in a fixed order (independent of the number
// of threads): fixed blocks, then their partial sums in block order.
template <typename Term>
double deterministic_sum(int64_t n, const Term& term) {
  constexpr int64_t kBlock = 2048;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(blocks, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
    for (int64_t blk = first; blk < last; ++blk) {
      double s = 0.0;
      const int64_t end = std::min(n, (blk + 1) * kBlock);
      for (int64_t p = blk * kBlock; p < end; ++p) s += term(p);
      partial[blk] = s;
    }
  });
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

// A penalty's loss: Σ term(x, b) over its points x and batch entries b, divided by B·D·N; the
// points' sums in deterministic_sum's fixed order.
template <typename T, int D, typename Term>
double penalty_mean(const PenaltyPoints<T, D>& pts, int64_t batch, const Term& term) {
  const double sum = deterministic_sum(pts.num_points, [&](int64_t p) {
    T x[D];
    penalty_point(pts, p, x);
    double s = 0.0;
    for (int64_t b = 0; b < batch; ++b) s += term(x, b);
    return s;
  });
  return sum / static_cast<double>(batch * D * pts.num_points);
}

}  // namespace gradicon_fast::cpu

namespace gradicon_fast::cpu {

// Do all gradient writes of E points' reverse pass through `chain` stay inside `ranges`?
// target[j] is the gradient target (index into ranges) of field j.
template <typename T, int D, int E>
bool chain_touches_only(const ChainRef<T, D>& chain, const int* target, int64_t b, const T (*stash)[E][D],
                        const RowRange* ranges) {
  for (int j = 0; j < chain.count; ++j) {
    const FieldRef<T, D>& f = chain.field[j];
    if (!f.grad) continue;
    for (int e = 0; e < E; ++e) {
      if (!touches_only(f, b, stash[j][e][0], ranges[target[j]])) return false;
    }
  }
  return true;
}

// The vector kernels address fields with int32 offsets: per-field spatial strides as int32, and
// whether every element of the chain's fields fits.
template <int D>
struct Strides32 {
  int32_t stride[kMaxComposed][D];
};

template <int D>
Strides32<D> strides32(const ChainRef<float, D>& chain) {
  Strides32<D> s;
  for (int j = 0; j < chain.count; ++j)
    for (int k = 0; k < D; ++k) s.stride[j][k] = static_cast<int32_t>(chain.field[j].stride[k]);
  return s;
}

template <int D>
bool fits_int32(const ChainRef<float, D>& chain) {
  for (int j = 0; j < chain.count; ++j)
    if (chain.field[j].channel_stride * chain.field[j].channels >= (int64_t(1) << 31)) return false;
  return true;
}

struct PlainAdd {
  template <typename T>
  void operator()(T* p, T v) const {
    *p += v;
  }
};

// Asks Linux to back [data, data + bytes) with 2 MiB transparent huge pages, before the first
// touch. Gradient buffers are fresh allocations (page-fault costs on first touch) written at
// scattered places: at lung scale, zeroing 290 MB of fresh 4 KiB pages takes 60 ms of a 0.45 s
// step, with huge pages 20 ms. A hint only: where THP is off or the call fails nothing changes.
// Where memory is fragmented the kernel may compact on the first faults (slower first calls).
constexpr size_t kHugePage = size_t(2) << 20;

inline void advise_huge_pages(void* data, size_t bytes) {
#ifdef __linux__
  constexpr uintptr_t kHuge = kHugePage;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + bytes) & ~(kHuge - 1);
  if (hi >= lo + 4 * kHuge) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// Zeroes [data, data + bytes) with streaming stores where AVX is built (data 32-byte aligned):
// a buffer far larger than the caches is not read in for ownership first, and the lung-scale
// step's 290 MB of gradients zero in about half the time (the step 3 % faster).
inline void zero_streaming(char* data, size_t bytes) {
  size_t i = 0;
#ifdef __AVX__
  const __m256 zero = _mm256_setzero_ps();
  for (; i + 128 <= bytes; i += 128)
    for (int k = 0; k < 4; ++k) _mm256_stream_ps(reinterpret_cast<float*>(data + i + 32 * k), zero);
  _mm_sfence();  // the streamed stores are weakly ordered: done before anyone reads the buffer
#endif
  std::memset(data + i, 0, bytes - i);
}

#ifdef __linux__
// Freed large gradient mappings, kept for the next call that asks for the same size (a training
// loop asks for the same buffers every step). Pages a process has just freed and mapped again may
// be slow to fault in (on the 2-core development VM, memory that other work had freed cost up to
// 0.3 s more per lung-scale call); a kept mapping is only zeroed again. At most
// GRADICON_FAST_CPU_POOL_MB (default 1024) megabytes are kept; 0 keeps none.
class MappingPool {
 public:
  static MappingPool& instance() {
    static MappingPool* pool = new MappingPool();  // never destroyed: tensors may be freed at exit
    return *pool;
  }

  // A kept mapping of exactly `mapped` bytes, or nullptr.
  void* take(size_t mapped) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < kept_.size(); ++i) {
      if (kept_[i].second == mapped) {
        void* base = kept_[i].first;
        kept_.erase(kept_.begin() + static_cast<std::ptrdiff_t>(i));
        held_ -= mapped;
        return base;
      }
    }
    return nullptr;
  }

  void give(void* base, size_t mapped) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (held_ + mapped <= limit_) {
        kept_.emplace_back(base, mapped);
        held_ += mapped;
        return;
      }
    }
    munmap(base, mapped);
  }

 private:
  MappingPool() {
    const char* env = std::getenv("GRADICON_FAST_CPU_POOL_MB");
    limit_ = (env && *env ? static_cast<size_t>(std::strtoull(env, nullptr, 10)) : size_t(1024)) << 20;
  }
  std::mutex mutex_;
  std::vector<std::pair<void*, size_t>> kept_;
  size_t held_ = 0, limit_ = 0;
};
#endif

// A zeroed contiguous tensor like `t`, on huge pages where it is large.
//
// Large buffers (4 MiB and up) are anonymous mappings of their own. A fresh one Linux hands out
// zeroed: all threads fault its pages in with one write a page, and nothing zeroes it a second
// time (a fill of an allocator's fresh pages pays for the page faults and then writes every byte
// again: at lung scale 0.335 -> 0.325 s a step). Freed, it goes to the MappingPool above (or is
// unmapped); taken from there, all threads zero it (streaming stores).
inline at::Tensor zeroed_buffer(const at::Tensor& t) {
#ifdef __linux__
  const size_t bytes = static_cast<size_t>(t.numel()) * t.element_size();
  if (bytes >= (size_t(4) << 20)) {
    const size_t mapped = bytes + kHugePage;  // room to start on a huge-page boundary
    void* base = MappingPool::instance().take(mapped);
    const bool fresh = base == nullptr;
    if (fresh) base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base != MAP_FAILED) {
      char* data = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(base) + kHugePage - 1) & ~uintptr_t(kHugePage - 1));
      constexpr int64_t kPage = 4096;
      if (fresh) {
        advise_huge_pages(data, bytes);
        at::parallel_for(0, static_cast<int64_t>((bytes + kPage - 1) / kPage), 512, [&](int64_t lo, int64_t hi) {
          for (int64_t i = lo; i < hi; ++i) data[i * kPage] = 0;
        });
      } else {
        constexpr int64_t kChunk = int64_t(1) << 20;
        at::parallel_for(0, static_cast<int64_t>((bytes + kChunk - 1) / kChunk), 4, [&](int64_t lo, int64_t hi) {
          const size_t begin = static_cast<size_t>(lo * kChunk);
          zero_streaming(data + begin, std::min(bytes, static_cast<size_t>(hi * kChunk)) - begin);
        });
      }
      return at::from_blob(
          data, t.sizes(), [base, mapped](void*) { MappingPool::instance().give(base, mapped); }, t.options());
    }
  }
#endif
  at::Tensor out = at::empty_like(t, at::MemoryFormat::Contiguous);
  advise_huge_pages(out.data_ptr(), out.nbytes());
  return out.zero_();
}

// Zero gradient buffers for the fields whose mask entry is set; undefined tensors elsewhere.
inline std::vector<at::Tensor> gradient_buffers(const std::vector<at::Tensor>& fields, const std::vector<bool>& mask) {
  std::vector<at::Tensor> grads(fields.size());
  for (size_t i = 0; i < fields.size(); ++i) {
    if (mask[i]) grads[i] = zeroed_buffer(fields[i]);
  }
  return grads;
}

}  // namespace gradicon_fast::cpu
