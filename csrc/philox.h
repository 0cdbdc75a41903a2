// Counter-based normal noise shared by the CPU, CUDA and Triton kernels.
//
// The noise of point `offset` (flat index over the penalty's points, shared by the batch) under
// `seed` is Philox4x32-10 with key (seed_lo, seed_hi) and counter (offset_lo, offset_hi, 0, 0),
// mapped to uniforms and then normals exactly as Triton's tl.randn4x does, so that the Triton
// kernels can call tl.randn4x and every backend draws the same numbers (to float rounding of
// log/sin/cos: the GPUs use their logf/sinf/cosf, the CPU the polynomials of box_muller.h).
// Channel k of the point takes normal number k.
#pragma once

#include <cmath>
#include <cstdint>

#include "sampling.h"
#if !defined(__CUDACC__)
#include "box_muller.h"
#endif

namespace gradicon_fast {

GF_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

GF_HD void philox4x32_10(uint64_t seed, uint64_t offset, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t p0 = c0, p2 = c2;
    c0 = mulhi32(0xCD9E8D57u, p2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, p0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * p2;
    c3 = 0xD2511F53u * p0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Triton's uint_to_uniform_float for 32-bit integers: [0, 1).
GF_HD float uniform_from_bits(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Four standard normal numbers for one point: Box-Muller on two uniform pairs.
GF_HD void normal4(uint64_t seed, uint64_t offset, float out[4]) {
  uint32_t bits[4];
  philox4x32_10(seed, offset, bits);
#pragma unroll
  for (int pair = 0; pair < 2; ++pair) {
    float u1 = uniform_from_bits(bits[2 * pair]);
    const float u2 = uniform_from_bits(bits[2 * pair + 1]);
#if defined(__CUDACC__)
    u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
    const float theta = 6.283185307179586f * u2;
    const float r = sqrtf(-2.0f * logf(u1));
    out[2 * pair] = r * cosf(theta);
    out[2 * pair + 1] = r * sinf(theta);
#else  // the CPU: the same bits as the eight-lane noise of cpu/noise8.h
    box_muller::normal_pair<float, int32_t>(u1, u2, out[2 * pair], out[2 * pair + 1]);
#endif
  }
}

}  // namespace gradicon_fast
