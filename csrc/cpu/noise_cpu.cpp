// The penalties' seeded noise, materialised (for tests and for users who want to see it).
#include <torch/library.h>

#include "../op_checks.h"
#include "../philox.h"
#include "cpu_common.h"

namespace gradicon_fast::cpu {
namespace {

void normal_noise_cpu(at::Tensor& out, int64_t seed) {
  check_noise_output(out, at::kCPU);
  const int64_t d = out.size(1), n = out.numel() / d;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "normal_noise_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        float z[4];
        normal4(static_cast<uint64_t>(seed), static_cast<uint64_t>(p), z);
        for (int64_t k = 0; k < d; ++k) o[k * n + p] = static_cast<scalar_t>(z[k]);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(gradicon_fast, CPU, m) { m.impl("normal_noise_", &normal_noise_cpu); }

}  // namespace gradicon_fast::cpu
