// Channel-first companions of the fused scan, for inference on CPU (networks/ops/channel_ops.py).
//
// A Mamba layer on a feature map (B, C, *spatial) sees the voxels as tokens. Kept channel-first,
// (B, C, L) with L = prod(spatial), every projection is a plain matrix product W @ x and no token
// tensor is ever transposed; what PyTorch has no channel-first kernel for is here:
// * a LayerNorm over the channels of each token (torch's layer_norm wants channels last);
// * Mamba's depthwise causal convolution fused with its SiLU, forwards or in reverse (oneDNN's
//   depthwise Conv1d runs at a fraction of memory speed on long rows, and SiLU is one more pass).
// Plain C ABI, float32, OpenMP threads (count passed in); the loops are vectorised by the compiler.

#include "cpu_common.h"

namespace {

// Tokens per block of the layer norm: a (C, T) block stays in L1/L2 for its three passes.
inline i64 ln_block(i64 C) {
  i64 t = (i64)8192 / std::max<i64>(C, 1) / 16 * 16;
  return std::max<i64>(16, std::min<i64>(512, t));
}

void layer_norm_cf(const float* x, const float* w, const float* b, float* y, i64 Bt, i64 C, i64 L, float eps,
                   int nthreads) {
  const i64 T = ln_block(C), nblk = ceil_div(L, T);
  const float inv_c = 1.0f / (float)C;
#pragma omp parallel num_threads(std::max(1, nthreads))
  {
    alignas(64) float mean[512];
    alignas(64) float rstd[512];
    i64 j0, j1;
    my_range(Bt * nblk, j0, j1);
    for (i64 j = j0; j < j1; ++j) {
      const i64 bi = j / nblk, t0 = (j % nblk) * T, len = std::min(T, L - t0);
      const float* xb = x + bi * C * L + t0;
      float* yb = y + bi * C * L + t0;
      for (i64 t = 0; t < len; ++t) mean[t] = 0.0f, rstd[t] = 0.0f;
      for (i64 c = 0; c < C; ++c) {
        const float* xr = xb + c * L;
#pragma omp simd
        for (i64 t = 0; t < len; ++t) mean[t] += xr[t];
      }
#pragma omp simd
      for (i64 t = 0; t < len; ++t) mean[t] *= inv_c;
      for (i64 c = 0; c < C; ++c) {  // two-pass variance: no cancellation
        const float* xr = xb + c * L;
#pragma omp simd
        for (i64 t = 0; t < len; ++t) {
          const float d = xr[t] - mean[t];
          rstd[t] = fmadd(d, d, rstd[t]);
        }
      }
#pragma omp simd
      for (i64 t = 0; t < len; ++t) rstd[t] = 1.0f / std::sqrt(fmadd(rstd[t], inv_c, eps));
      for (i64 c = 0; c < C; ++c) {
        const float* xr = xb + c * L;
        float* yr = yb + c * L;
        const float wc = w ? w[c] : 1.0f, bc = b ? b[c] : 0.0f;
#pragma omp simd
        for (i64 t = 0; t < len; ++t) yr[t] = fmadd((xr[t] - mean[t]) * rstd[t], wc, bc);
      }
    }
  }
}

// y[t] = act(bias + sum_j w'[j] x[t + o + j]), x outside [0, L) read as 0; forwards w' = w and
// o = -(K-1) (causal), in reverse w'[j] = w[K-1-j] and o = 0 (the causal conv of the flipped row).
void conv1d_row(const float* x, const float* w, float bias, float* y, i64 L, i64 K, int reverse, int silu) {
  constexpr i64 TB = 1024;
  alignas(64) float acc[TB];
  float wk[64];
  for (i64 j = 0; j < K; ++j) wk[j] = reverse ? w[K - 1 - j] : w[j];
  const i64 o = reverse ? 0 : -(K - 1);
  for (i64 t0 = 0; t0 < L; t0 += TB) {
    const i64 len = std::min(TB, L - t0);
    // interior: t + o + j in [0, L) for every j
    const i64 lo = std::min(len, std::max<i64>(0, -o - t0)), hi = std::max(lo, std::min(len, L - (K - 1) - o - t0));
#pragma omp simd
    for (i64 t = 0; t < len; ++t) acc[t] = bias;
    for (i64 j = 0; j < K; ++j) {
      const float wj = wk[j];
      const float* xs = x + t0 + o + j;
#pragma omp simd
      for (i64 t = lo; t < hi; ++t) acc[t] = fmadd(wj, xs[t], acc[t]);
      for (i64 t = 0; t < lo; ++t) {
        const i64 p = t0 + t + o + j;
        if (p >= 0 && p < L) acc[t] = fmadd(wj, x[p], acc[t]);
      }
      for (i64 t = hi; t < len; ++t) {
        const i64 p = t0 + t + o + j;
        if (p >= 0 && p < L) acc[t] = fmadd(wj, x[p], acc[t]);
      }
    }
    float* yo = y + t0;
    if (silu) {
#pragma omp simd
      for (i64 t = 0; t < len; ++t) yo[t] = silu_generic(acc[t]);
    } else {
#pragma omp simd
      for (i64 t = 0; t < len; ++t) yo[t] = acc[t];
    }
  }
}

}  // namespace

extern "C" {

// LayerNorm over the channels of each token: x, y (Bt, C, L) contiguous (y may be x); w, b (C) or null.
int co_layer_norm_cf_f32(const float* x, const float* w, const float* b, float* y, i64 Bt, i64 C, i64 L, double eps,
                         int nthreads) {
  if (C <= 0 || L < 0 || Bt < 0) return 2;
  layer_norm_cf(x, w, b, y, Bt, C, L, (float)eps, nthreads);
  return 0;
}

// Depthwise causal Conv1d (+ SiLU when `silu`), forwards or in reverse. x: rows of L, channel
// stride L, batch stride sx; w (D, K) with K <= 64; bias (D) or null; y (Bt, D, L) contiguous.
int co_conv1d_f32(const float* x, const float* w, const float* bias, float* y, i64 Bt, i64 D, i64 L, i64 sx, i64 K,
                  int reverse, int silu, int nthreads) {
  if (K <= 0 || K > 64 || L < 0) return 2;
#pragma omp parallel num_threads(std::max(1, nthreads))
  {
    i64 i0, i1;
    my_range(Bt * D, i0, i1);
    for (i64 i = i0; i < i1; ++i) {
      const i64 bi = i / D, d = i % D;
      conv1d_row(x + bi * sx + d * L, w + d * K, bias ? bias[d] : 0.0f, y + i * L, L, K, reverse, silu);
    }
  }
  return 0;
}

}  // extern "C"
