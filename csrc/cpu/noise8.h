// The seeded noise of eight consecutive points at once: philox.h's Philox4x32-10 and Box-Muller
// on AVX2 vectors, the same bits as normal4() point by point (box_muller.h is one template for
// both). Drawing the noise point by point was about 20 ms of the 0.33 s lung-scale GradICON step.
#pragma once

#include "simd8.h"

#ifdef GF_HAVE_SIMD8

#include "../box_muller.h"

namespace gradicon_fast::cpu::simd {

// High and low 32 bits of a·b for eight unsigned lanes, b the same in all.
inline void mul_wide8(i8 a, uint32_t b, i8& hi, i8& lo) {
  const __m256i va = reinterpret_cast<__m256i>(a), vb = _mm256_set1_epi32(static_cast<int32_t>(b));
  const __m256i even = _mm256_mul_epu32(va, vb);                            // lanes 0, 2, 4, 6 (64 bits)
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(va, 32), vb);     // lanes 1, 3, 5, 7
  hi = reinterpret_cast<i8>(_mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA));
  lo = reinterpret_cast<i8>(_mm256_mullo_epi32(va, vb));
}

// Four normal numbers for each of the points first, first + 1, ..., first + 7 under seed.
inline void normal4x8(uint64_t seed, uint64_t first, f8 (&out)[4]) {
  i8 c0, c1;
  for (int l = 0; l < kLanes; ++l) {
    const uint64_t offset = first + static_cast<uint64_t>(l);
    c0[l] = static_cast<int32_t>(static_cast<uint32_t>(offset));
    c1[l] = static_cast<int32_t>(static_cast<uint32_t>(offset >> 32));
  }
  i8 c2 = splat_i(0), c3 = splat_i(0);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    i8 hi0, lo0, hi2, lo2;
    mul_wide8(c2, 0xCD9E8D57u, hi2, lo2);
    mul_wide8(c0, 0xD2511F53u, hi0, lo0);
    c0 = hi2 ^ c1 ^ splat_i(static_cast<int32_t>(k0));
    c2 = hi0 ^ c3 ^ splat_i(static_cast<int32_t>(k1));
    c1 = lo2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const i8 bits[4] = {c0, c1, c2, c3};
  f8 u[4];
  for (int k = 0; k < 4; ++k) {  // uniform_from_bits
    const i8 x = bits[k] < splat_i(0) ? ~bits[k] : bits[k];
    u[k] = __builtin_convertvector(x, f8) * splat(4.6566127342e-10f);
  }
  box_muller::normal_pair<f8, i8>(u[0], u[1], out[0], out[1]);
  box_muller::normal_pair<f8, i8>(u[2], u[3], out[2], out[3]);
}

}  // namespace gradicon_fast::cpu::simd

#endif  // GF_HAVE_SIMD8
