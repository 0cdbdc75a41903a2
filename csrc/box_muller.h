// Box-Muller on the CPU: two uniforms to two standard normals with polynomial log and sin/cos,
// written once as a template over float and over eight-lane AVX2 vectors, so that the scalar
// and the vector noise are the same bits (no fused multiply-adds: -ffp-contract=off). The C
// library's logf/sinf/cosf are scalar only, and drawing the lung-scale noise point by point
// took about 20 ms of a 0.33 s GradICON step. Host code only; the GPUs keep their own logf,
// sinf and cosf, an ulp or two away.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace gradicon_fast::box_muller {

// The operations the template needs, for one float ...
inline int32_t bits_of(float x) {
  int32_t i;
  std::memcpy(&i, &x, sizeof i);
  return i;
}
inline float float_of(int32_t i) {
  float x;
  std::memcpy(&x, &i, sizeof x);
  return x;
}
inline int32_t truncated(float x) { return static_cast<int32_t>(x); }
inline float converted(int32_t i) { return static_cast<float>(i); }
inline float root(float x) { return std::sqrt(x); }
inline float select(bool m, float a, float b) { return m ? a : b; }
inline int32_t select(bool m, int32_t a, int32_t b) { return m ? a : b; }

// ... and for eight (GCC vector extensions; the same types as simd8.h's f8 and i8).
#if defined(__AVX2__)
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
inline v8i bits_of(v8f x) { return reinterpret_cast<v8i>(x); }
inline v8f float_of(v8i i) { return reinterpret_cast<v8f>(i); }
inline v8i truncated(v8f x) { return __builtin_convertvector(x, v8i); }
inline v8f converted(v8i i) { return __builtin_convertvector(i, v8f); }
inline v8f root(v8f x) { return __builtin_ia32_sqrtps256(x); }
inline v8f select(v8i m, v8f a, v8f b) { return m ? a : b; }
inline v8i select(v8i m, v8i a, v8i b) { return m ? a : b; }
#endif

// ln x for x in (0, 1] (normal numbers): x = m·2^e with m in [√½, √2), ln(1 + t) for t = m - 1 by
// the Cephes single-precision polynomial, then + e·ln 2 in two parts.
template <typename F, typename I>
inline F log_unit(F x) {
  const I bits = bits_of(x);
  I e = ((bits >> 23) & 0xff) - 126;           // x = m·2^e with m in [0.5, 1)
  const F m = float_of((bits & 0x007fffff) | 0x3f000000);
  const auto low = m < 0.707106781186547524f;  // then use 2m, e - 1: m in [√½, √2)
  e = select(low, e - 1, e);
  const F t = select(low, (m + m) - 1.0f, m - 1.0f);
  const F z = t * t;
  F y = 7.0376836292e-2f * t - 1.1514610310e-1f;
  y = y * t + 1.1676998740e-1f;
  y = y * t - 1.2420140846e-1f;
  y = y * t + 1.4249322787e-1f;
  y = y * t - 1.6668057665e-1f;
  y = y * t + 2.0000714765e-1f;
  y = y * t - 2.4999993993e-1f;
  y = y * t + 3.3333331174e-1f;
  y = y * t * z;
  const F ef = converted(e);
  y = y + -2.12194440e-4f * ef;
  y = y + -0.5f * z;
  return (t + y) + 0.693359375f * ef;
}

// cos(2πu) and sin(2πu) for u in [0, 1): u = q/4 + r exactly (|r| <= 1/8), polynomials for
// |2πr| <= π/4 (Cephes), then the quarter turns q.
template <typename F, typename I>
inline void sincos_turns(F u, F& cos_out, F& sin_out) {
  const I q = truncated(u * 4.0f + 0.5f);
  const F qf = converted(q);
  const F x = (u - qf * 0.25f) * 6.283185307179586f;
  const F z = x * x;
  F s = -1.9515295891e-4f * z + 8.3321608736e-3f;
  s = s * z - 1.6666654611e-1f;
  s = s * z * x + x;
  F c = 2.443315711809948e-5f * z - 1.388731625493765e-3f;
  c = c * z + 4.166664568298827e-2f;
  c = c * z * z - 0.5f * z + 1.0f;
  const I quarter = q & 3;
  const auto swap = (quarter & 1) != 0;
  const F sin_abs = select(swap, c, s), cos_abs = select(swap, s, c);
  sin_out = select((quarter & 2) != 0, -sin_abs, sin_abs);
  cos_out = select(((quarter + 1) & 2) != 0, -cos_abs, cos_abs);
}

// Triton's randn4x pair: u1 clamped away from 0, r = √(-2 ln u1), (r cos 2πu2, r sin 2πu2).
template <typename F, typename I>
inline void normal_pair(F u1, F u2, F& first, F& second) {
  u1 = select(u1 > 1.0e-7f, u1, F{} + 1.0e-7f);
  const F r = root(-2.0f * log_unit<F, I>(u1));
  F c, s;
  sincos_turns<F, I>(u2, c, s);
  first = r * c;
  second = r * s;
}

}  // namespace gradicon_fast::box_muller
