// A Linear layer on channel-first tokens, y = W x + bias, for inference on CPU
// (networks/ops/channel_ops.py `linear_channels`).
//
// Why hand-written: a Mamba layer's projections are products of a small matrix W (M x K, M and K
// from 32 to a few hundred) with a very wide one x (K x L, L up to 1.8 M tokens). BLAS sgemm (and
// oneDNN's 1x1 convolution) reach 50-80 GFLOP/s on these shapes on a 2-core AVX-512 EPYC, under
// half of what the FMA units give; this register-blocked kernel reads x once, packing it in tiles
// of K x up to 1024 tokens that stay in L2 while W passes over them, accumulates 4 output rows x 64
// tokens in registers, and reaches 106-164 GFLOP/s there (a stage-0 SegMamba layer: 2.11 -> 1.33 s,
// bench/bench_mamba_layers.py).
//
// Layout: x rows of L floats (channel stride L, batch stride sx: a channel slice of a larger
// tensor is fine); W (M, K) row-major; y (Bt, M, L) contiguous. Each output is the sum over k in
// ascending order, one fused multiply-add per term, plus the bias.
// Plain C ABI, float32, OpenMP threads (count passed in).

#include "cpu_common.h"

namespace {

// A vector of 16 floats: one AVX-512 register, two AVX2 ones, or an array the compiler vectorises.
#if defined(__AVX512F__)
#include <immintrin.h>
typedef __m512 vf;
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
// A store that bypasses the caches (p 64-byte aligned): for outputs far larger than the caches.
inline void vstream(float* p, vf v) { _mm512_stream_ps(p, v); }
inline vf vset1(float a) { return _mm512_set1_ps(a); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
// Keeps v in a register: the compiler would otherwise fold the load into each of the MR FMAs that use it.
inline void pin(vf& v) { __asm__("" : "+v"(v)); }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
struct vf {
  __m256 lo, hi;
};
inline vf vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v.lo), _mm256_storeu_ps(p + 8, v.hi); }
inline void vstream(float* p, vf v) { vstore(p, v); }
inline vf vset1(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
inline vf vfma(vf a, vf b, vf c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline void pin(vf&) {}
#else
struct vf {
  float v[16];
};
inline vf vload(const float* p) {
  vf r;
  std::memcpy(r.v, p, sizeof r.v);
  return r;
}
inline void vstore(float* p, vf v) { std::memcpy(p, v.v, sizeof v.v); }
inline void vstream(float* p, vf v) { vstore(p, v); }
inline vf vset1(float a) {
  vf r;
  for (int i = 0; i < 16; ++i) r.v[i] = a;
  return r;
}
inline vf vfma(vf a, vf b, vf c) {
  for (int i = 0; i < 16; ++i) c.v[i] = fmadd(a.v[i], b.v[i], c.v[i]);
  return c;
}
inline void pin(vf&) {}
#endif
constexpr i64 VW = 16;       // floats per vector
constexpr i64 NV = 4;        // vectors per token block
constexpr i64 TB = VW * NV;  // tokens per block: 64
constexpr int MR = 4;        // output rows per block: 16 accumulators, 4 x vectors, 1 broadcast

// R output rows x TB tokens: acc[i][j] = bias[i] + sum_k W[i, k] x[k, j]. xs: row stride of x.
template <int R>
inline void block(const float* W, i64 K, const float* bias, const float* x, i64 xs, float* y, i64 ys, bool stream) {
  vf acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = vset1(bias ? bias[i] : 0.0f);
  for (i64 k = 0; k < K; ++k) {
    vf xv[NV];
    for (int j = 0; j < NV; ++j) {
      xv[j] = vload(x + k * xs + j * VW);
      pin(xv[j]);
    }
    for (int i = 0; i < R; ++i) {
      const vf w = vset1(W[i * K + k]);
      for (int j = 0; j < NV; ++j) acc[i][j] = vfma(w, xv[j], acc[i][j]);
    }
  }
  if (stream) {
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < NV; ++j) vstream(y + i * ys + j * VW, acc[i][j]);
  } else {
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < NV; ++j) vstore(y + i * ys + j * VW, acc[i][j]);
  }
}

// Tokens per tile: a packed K x tile copy of x stays in L2 while every row block of W passes over it.
inline i64 tile_tokens(i64 K) { return std::max<i64>(TB, std::min<i64>(1024, (i64)32768 / K / TB * TB)); }

// y[:, 0:len) = W xp + bias for one tile; xp (K, TL) packed, zero beyond len; ypad (M, TB) scratch.
inline void tile(const float* W, i64 M, i64 K, const float* bias, const float* xp, i64 TL, i64 len, float* y, i64 ys,
                 float* ypad, bool stream) {
  const i64 full = len / TB * TB;
  for (i64 m = 0; m < M; m += MR) {
    const int mr = (int)std::min<i64>(MR, M - m);
    const float* Wm = W + m * K;
    const float* bm = bias ? bias + m : nullptr;
    auto run = [&](const float* xs, float* yo, i64 yst, bool st) {
      switch (mr) {
        case 4: block<4>(Wm, K, bm, xs, TL, yo, yst, st); break;
        case 3: block<3>(Wm, K, bm, xs, TL, yo, yst, st); break;
        case 2: block<2>(Wm, K, bm, xs, TL, yo, yst, st); break;
        default: block<1>(Wm, K, bm, xs, TL, yo, yst, st); break;
      }
    };
    for (i64 t = 0; t < full; t += TB) run(xp + t, y + m * ys + t, ys, stream);
    if (full < len) {
      run(xp + full, ypad, TB, false);
      for (int i = 0; i < mr; ++i) std::memcpy(y + (m + i) * ys + full, ypad + i * TB, (len - full) * sizeof(float));
    }
  }
}

}  // namespace

extern "C" {

// y (Bt, M, L) = W (M, K) @ x (Bt, K, L) + bias (M, or null). x: channel stride rx (>= L), batch
// stride sx; y: channel stride ry (>= L), batch stride sy (a contiguous y: ry = L, sy = M L). Strides
// other than L let a piece of a longer sequence be read and written in place.
int co_linear_cf_f32(const float* W, const float* x, const float* bias, float* y, i64 Bt, i64 M, i64 K, i64 L, i64 sx,
                     i64 rx, i64 sy, i64 ry, int nthreads) {
  if (M <= 0 || K <= 0 || L < 0 || Bt < 0 || rx < L || ry < L) return 2;
  const i64 TL = tile_tokens(K), ntile = ceil_div(L, TL);
  const int nt = std::max(1, nthreads);
  // Outputs far larger than the caches are written around them (the next op reads them from memory
  // anyway), which saves reading each line before it is overwritten; needs 64-byte aligned rows.
  const bool stream = Bt * M * L * (i64)sizeof(float) > ((i64)64 << 20) &&
                      reinterpret_cast<uintptr_t>(y) % 64 == 0 && (ry * (i64)sizeof(float)) % 64 == 0 &&
                      (Bt == 1 || (sy * (i64)sizeof(float)) % 64 == 0);
  try {
    Buf<float> work((i64)nt * (K * TL + MR * TB));  // per thread: the packed tile of x, a padded output block
#pragma omp parallel num_threads(nt)
    {
      i64 j0, j1;
      my_range(Bt * ntile, j0, j1);
      float* xp = work.p + (i64)thread_id() * (K * TL + MR * TB);
      float* ypad = xp + K * TL;
      for (i64 j = j0; j < j1; ++j) {
        const i64 bi = j / ntile, t0 = (j % ntile) * TL, len = std::min(TL, L - t0);
        // packing streams each of the K rows contiguously (a few prefetched streams, not K)
        for (i64 k = 0; k < K; ++k) {
          std::memcpy(xp + k * TL, x + bi * sx + k * rx + t0, len * sizeof(float));
          if (len < TL) std::memset(xp + k * TL + len, 0, (TL - len) * sizeof(float));
        }
        tile(W, M, K, bias, xp, TL, len, y + bi * sy + t0, ry, ypad, stream);
      }
#if defined(__AVX512F__)
      if (stream) _mm_sfence();  // this thread's streamed stores are globally visible before the barrier
#endif
    }
  } catch (const std::bad_alloc&) {
    return 1;
  }
  return 0;
}

}  // extern "C"
