// Helpers shared by the fused CPU kernels (selective_scan_cpu.cpp, channel_ops_cpu.cpp): integer
// rounding, the OpenMP work split, an aligned buffer, and vectorisable float math (fmadd, exp,
// log1p, softplus, silu) that the compiler turns into SIMD loops under `#pragma omp simd`.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#ifdef _OPENMP
#include <omp.h>
#endif

typedef int64_t i64;

namespace {

inline i64 ceil_div(i64 a, i64 b) { return (a + b - 1) / b; }
inline i64 round_up(i64 a, i64 b) { return ceil_div(a, b) * b; }

// This thread's share [a, b) of n items, a static split of the team.
inline void my_range(i64 n, i64& a, i64& b) {
#ifdef _OPENMP
  const i64 nt = omp_get_num_threads(), t = omp_get_thread_num();
#else
  const i64 nt = 1, t = 0;
#endif
  a = n * t / nt;
  b = n * (t + 1) / nt;
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// 64-byte aligned, zero-initialised buffer.
template <typename T>
struct Buf {
  T* p = nullptr;
  explicit Buf(i64 n) {
    size_t bytes = round_up(std::max<i64>(n, 1) * (i64)sizeof(T), 64);
    p = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (!p) throw std::bad_alloc();
    std::memset(p, 0, bytes);
  }
  ~Buf() { std::free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};

// ------------------------------------------------------------------------------------------------
// Generic path: loops over the (padded) states, vectorised by the compiler.

inline float fmadd(float a, float b, float c) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}
inline double fmadd(double a, double b, double c) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  return __builtin_fma(a, b, c);
#else
  return a * b + c;
#endif
}

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

// expf, ~1 ulp, vectorisable: Cody-Waite reduction, Cephes polynomial, and the scale 2^k applied
// as two factors so that results down to the smallest subnormal and up to FLT_MAX are right.
// NaN propagates; exp(-inf) = 0; exp(+inf) = inf.
inline float exp_generic(float x) {
  x = x < -104.0f ? -104.0f : x;
  x = x > 89.0f ? 89.0f : x;
  const float k = std::nearbyint(x * 1.44269504088896341f);
  float r = fmadd(k, -0.693359375f, x);
  r = fmadd(k, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmadd(p, r, 1.3981999507e-3f);
  p = fmadd(p, r, 8.3334519073e-3f);
  p = fmadd(p, r, 4.1665795894e-2f);
  p = fmadd(p, r, 1.6666665459e-1f);
  p = fmadd(p, r, 5.0000001201e-1f);
  p = fmadd(p, r, 1.0f);
  p = fmadd(p, r, 1.0f);
  const int32_t ki = (int32_t)k;  // in [-150, 129]
  const int32_t k1 = ki >> 1, k2 = ki - k1;
  return p * bits_to_float((k1 + 127) << 23) * bits_to_float((k2 + 127) << 23);
}
inline double exp_generic(double x) { return std::exp(x); }

// log1p(e) for e in [0, 1], ~1 ulp, vectorisable: log(1 + e) by the Cephes logf polynomial, with
// Goldberg's correction e / ((1 + e) - 1) so that small e keep their relative precision.
inline float log1p_unit(float e) {
  const float u = 1.0f + e;
  const bool big = u > 1.41421356f;
  const float f = big ? fmadd(u, 0.5f, -1.0f) : u - 1.0f;  // exact
  const float k = big ? 1.0f : 0.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = fmadd(p, f, -1.1514610310e-1f);
  p = fmadd(p, f, 1.1676998740e-1f);
  p = fmadd(p, f, -1.2420140846e-1f);
  p = fmadd(p, f, 1.4249322787e-1f);
  p = fmadd(p, f, -1.6668057665e-1f);
  p = fmadd(p, f, 2.0000714765e-1f);
  p = fmadd(p, f, -2.4999993993e-1f);
  p = fmadd(p, f, 3.3333331174e-1f);
  float y = p * f * z;
  y = fmadd(k, -2.12194440e-4f, y);
  y = fmadd(z, -0.5f, y);
  float r = f + y;
  r = fmadd(k, 0.693359375f, r);
  // small e: u - 1 = f differs from e by the rounding of u; rescale (f = 0: log1p(e) = e)
  return big ? r : (f == 0.0f ? e : r * (e / f));
}

// torch.nn.functional.softplus (beta 1, threshold 20): x > 20 ? x : log1p(exp(x)).
inline float softplus_generic(float x) {
  const float m = x > 0.0f ? x : 0.0f;
  const float s = m + log1p_unit(exp_generic(-std::fabs(x)));
  return x > 20.0f ? x : s;
}

// x * sigmoid(x).
inline float silu_generic(float x) { return x / (1.0f + exp_generic(-x)); }

// bfloat16 bits <-> float (the bf16 inference mode's kernels: norm_cl_cpu.cpp, layout_cast_cpu.cpp).
inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even, as torch's float -> bfloat16 conversion; NaN stays NaN.
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace
