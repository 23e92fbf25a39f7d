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

// mean_out, rstd_out (Bt, L) or null: the per-token statistics, kept for the backward pass.
void layer_norm_cf(const float* x, const float* w, const float* b, float* y, i64 Bt, i64 C, i64 L, float eps,
                   int nthreads, float* mean_out = nullptr, float* rstd_out = nullptr) {
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
      if (mean_out) std::memcpy(mean_out + bi * L + t0, mean, len * sizeof(float));
      if (rstd_out) std::memcpy(rstd_out + bi * L + t0, rstd, len * sizeof(float));
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

// y[t] = act(bias + sum_j w'[j] x[t + o + j]), x outside [0, L) read as 0, or from h when given; forwards
// w' = w and o = -(K-1) (causal), in reverse w'[j] = w[K-1-j] and o = 0 (the causal conv of the flipped
// row). h (K-1 values, or null): the row's tokens just before it in reading order, x[-(K-1) .. -1]
// forwards and x[L .. L+K-2] in reverse, so that a row cut into pieces convolves as the whole row, with
// the same terms in the same order.
void conv1d_row(const float* x, const float* w, float bias, float* y, i64 L, i64 K, int reverse, int silu,
                const float* h) {
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
        else if (h) acc[t] = fmadd(wj, p < 0 ? h[p + K - 1] : h[p - L], acc[t]);
      }
      for (i64 t = hi; t < len; ++t) {
        const i64 p = t0 + t + o + j;
        if (p >= 0 && p < L) acc[t] = fmadd(wj, x[p], acc[t]);
        else if (h) acc[t] = fmadd(wj, p < 0 ? h[p + K - 1] : h[p - L], acc[t]);
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
// stride L, batch stride sx; w (D, K) with K <= 64; bias (D) or null; y (Bt, D, L) contiguous; hist
// (Bt, D, K-1) contiguous or null: each row's K-1 preceding tokens in reading order (`conv1d_row`).
int co_conv1d_f32(const float* x, const float* w, const float* bias, float* y, i64 Bt, i64 D, i64 L, i64 sx, i64 K,
                  int reverse, int silu, const float* hist, int nthreads) {
  if (K <= 0 || K > 64 || L < 0) return 2;
#pragma omp parallel num_threads(std::max(1, nthreads))
  {
    i64 i0, i1;
    my_range(Bt * D, i0, i1);
    for (i64 i = i0; i < i1; ++i) {
      const i64 bi = i / D, d = i % D;
      conv1d_row(x + bi * sx + d * L, w + d * K, bias ? bias[d] : 0.0f, y + i * L, L, K, reverse, silu,
                 hist ? hist + i * (K - 1) : nullptr);
    }
  }
  return 0;
}

}  // extern "C"

// ------------------------------------------------------------------------------------------------
// Backward passes, for training (networks/ops/channel_ops.py: _LayerNormCF, _CausalConv1dCF).

namespace {

// LayerNorm backward over (C, T) token blocks, xhat = (x - mean) rstd, g = dy w:
//   dx = rstd (g - mean_c(g) - xhat mean_c(g xhat)),  dw[c] = sum dy xhat,  db[c] = sum dy.
// dw/db: a float sum per block, added into per-thread double accumulators, reduced in thread order.
void layer_norm_cf_bwd(const float* x, const float* w, const float* mean, const float* rstd, const float* dy,
                       float* dx, float* dw, float* db, i64 Bt, i64 C, i64 L, int nthreads) {
  const i64 T = ln_block(C), nblk = ceil_div(L, T);
  const float inv_c = 1.0f / (float)C;
  const int nt = std::max(1, nthreads);
  Buf<double> acc((i64)nt * 2 * C);  // per thread: dw (C), db (C)
#pragma omp parallel num_threads(nt)
  {
    alignas(64) float s1[512];
    alignas(64) float s2[512];
    double* dwa = acc.p + (i64)thread_id() * 2 * C;
    double* dba = dwa + C;
    i64 j0, j1;
    my_range(Bt * nblk, j0, j1);
    for (i64 j = j0; j < j1; ++j) {
      const i64 bi = j / nblk, t0 = (j % nblk) * T, len = std::min(T, L - t0);
      const float* xb = x + bi * C * L + t0;
      const float* gb = dy + bi * C * L + t0;
      const float* mu = mean + bi * L + t0;
      const float* rs = rstd + bi * L + t0;
      float* dxb = dx + bi * C * L + t0;
      for (i64 t = 0; t < len; ++t) s1[t] = 0.0f, s2[t] = 0.0f;
      for (i64 c = 0; c < C; ++c) {
        const float* xr = xb + c * L;
        const float* gr = gb + c * L;
        const float wc = w ? w[c] : 1.0f;
        float pw = 0.0f, pb = 0.0f;
#pragma omp simd reduction(+ : pw, pb)
        for (i64 t = 0; t < len; ++t) {
          const float xh = (xr[t] - mu[t]) * rs[t], g = gr[t] * wc;
          s1[t] += g;
          s2[t] = fmadd(g, xh, s2[t]);
          pw = fmadd(gr[t], xh, pw);
          pb += gr[t];
        }
        dwa[c] += (double)pw;
        dba[c] += (double)pb;
      }
#pragma omp simd
      for (i64 t = 0; t < len; ++t) s1[t] *= inv_c, s2[t] *= inv_c;
      for (i64 c = 0; c < C; ++c) {
        const float* xr = xb + c * L;
        const float* gr = gb + c * L;
        float* dr = dxb + c * L;
        const float wc = w ? w[c] : 1.0f;
#pragma omp simd
        for (i64 t = 0; t < len; ++t) {
          const float xh = (xr[t] - mu[t]) * rs[t];
          dr[t] = rs[t] * (fmadd(gr[t], wc, -s1[t]) - xh * s2[t]);
        }
      }
    }
  }
  for (i64 c = 0; c < C; ++c) {
    double sw = 0, sb = 0;
    for (int t = 0; t < nt; ++t) sw += acc.p[(i64)t * 2 * C + c], sb += acc.p[(i64)t * 2 * C + C + c];
    if (dw) dw[c] = (float)sw;
    if (db) db[c] = (float)sb;
  }
}

// Backward of one row of `conv1d_row` (same w', o): the pre-activation a is recomputed block by
// block (K multiply-adds per token: cheaper than writing it in the forward pass and reading it
// back, and it saves a (B, D, L) tensor), then da = dy act'(a),
//   dx[t + o + j] += w'[j] da[t],  dw'[j] += da[t] x[t + o + j],  dbias += da[t].
// dx (L) is written whole: blocks run in the order in which the scatter into the K - 1 tokens
// beyond a block only reaches tokens already zeroed (forwards o < 0: left to right; reverse: right
// to left). dwk (K, in w' order), dbias: accumulated in double.
void conv1d_row_bwd(const float* x, const float* w, float bias, const float* dy, float* dx, double* dwk,
                    double* dbias, i64 L, i64 K, int reverse, int silu) {
  constexpr i64 TB = 1024;
  alignas(64) float acc[TB];
  float wk[64];
  for (i64 j = 0; j < K; ++j) wk[j] = reverse ? w[K - 1 - j] : w[j];
  const i64 o = reverse ? 0 : -(K - 1), nb = ceil_div(L, TB);
  for (i64 bb = 0; bb < nb; ++bb) {
    const i64 t0 = (reverse ? nb - 1 - bb : bb) * TB, len = std::min(TB, L - t0);
    const i64 lo = std::min(len, std::max<i64>(0, -o - t0)), hi = std::max(lo, std::min(len, L - (K - 1) - o - t0));
#pragma omp simd
    for (i64 t = 0; t < len; ++t) acc[t] = bias;
    for (i64 j = 0; j < K; ++j) {
      const float wj = wk[j];
      const float* xs = x + t0 + o + j;
#pragma omp simd
      for (i64 t = lo; t < hi; ++t) acc[t] = fmadd(wj, xs[t], acc[t]);
      for (i64 t = 0; t < lo; ++t)
        if (t0 + t + o + j >= 0 && t0 + t + o + j < L) acc[t] = fmadd(wj, xs[t], acc[t]);
      for (i64 t = hi; t < len; ++t)
        if (t0 + t + o + j >= 0 && t0 + t + o + j < L) acc[t] = fmadd(wj, xs[t], acc[t]);
    }
    const float* g = dy + t0;
    float sb = 0.0f;
    if (silu) {
#pragma omp simd reduction(+ : sb)
      for (i64 t = 0; t < len; ++t) {
        const float a = acc[t], s = 1.0f / (1.0f + exp_generic(-a));
        acc[t] = g[t] * (s * fmadd(a, 1.0f - s, 1.0f));  // d silu(a) / da = s (1 + a (1 - s))
        sb += acc[t];
      }
    } else {
#pragma omp simd reduction(+ : sb)
      for (i64 t = 0; t < len; ++t) acc[t] = g[t], sb += g[t];
    }
    *dbias += (double)sb;
    // zero this block's dx (the tokens the previous block scattered into beyond it are elsewhere)
    std::memset(dx + t0, 0, len * sizeof(float));
    for (i64 j = 0; j < K; ++j) {
      const float wj = wk[j];
      const float* xs = x + t0 + o + j;
      float* ds = dx + t0 + o + j;
      float pw = 0.0f;
#pragma omp simd reduction(+ : pw)
      for (i64 t = lo; t < hi; ++t) {
        pw = fmadd(acc[t], xs[t], pw);
        ds[t] = fmadd(wj, acc[t], ds[t]);
      }
      for (i64 t = 0; t < lo; ++t)
        if (t0 + t + o + j >= 0 && t0 + t + o + j < L) pw = fmadd(acc[t], xs[t], pw), ds[t] = fmadd(wj, acc[t], ds[t]);
      for (i64 t = hi; t < len; ++t)
        if (t0 + t + o + j >= 0 && t0 + t + o + j < L) pw = fmadd(acc[t], xs[t], pw), ds[t] = fmadd(wj, acc[t], ds[t]);
      dwk[j] += (double)pw;
    }
  }
}

}  // namespace

extern "C" {

// co_layer_norm_cf_f32, also writing the per-token mean and 1/std to mean, rstd (Bt, L).
int co_layer_norm_cf_stats_f32(const float* x, const float* w, const float* b, float* y, float* mean, float* rstd,
                               i64 Bt, i64 C, i64 L, double eps, int nthreads) {
  if (C <= 0 || L < 0 || Bt < 0) return 2;
  layer_norm_cf(x, w, b, y, Bt, C, L, (float)eps, nthreads, mean, rstd);
  return 0;
}

// Backward of co_layer_norm_cf_stats_f32: x, dy, dx (Bt, C, L) contiguous; mean, rstd (Bt, L) from
// the forward pass; w (C) or null; dw, db (C) or null (not wanted).
int co_layer_norm_cf_bwd_f32(const float* x, const float* w, const float* mean, const float* rstd, const float* dy,
                             float* dx, float* dw, float* db, i64 Bt, i64 C, i64 L, int nthreads) {
  if (C <= 0 || L < 0 || Bt < 0) return 2;
  try {
    layer_norm_cf_bwd(x, w, mean, rstd, dy, dx, dw, db, Bt, C, L, nthreads);
  } catch (const std::bad_alloc&) {
    return 1;
  }
  return 0;
}

// Backward of co_conv1d_f32 (same x, w, bias, layout, direction, activation): dy, dx (Bt, D, L)
// contiguous; dw (D, K); dbias (D) or null. Threads split the channels (each owns its dw, dbias rows).
int co_conv1d_bwd_f32(const float* x, const float* w, const float* bias, const float* dy, float* dx, float* dw,
                      float* dbias, i64 Bt, i64 D, i64 L, i64 sx, i64 K, int reverse, int silu, int nthreads) {
  if (K <= 0 || K > 64 || L < 0) return 2;
#pragma omp parallel num_threads(std::max(1, nthreads))
  {
    i64 d0, d1;
    my_range(D, d0, d1);
    for (i64 d = d0; d < d1; ++d) {
      double dwk[64] = {0}, db = 0;
      for (i64 bi = 0; bi < Bt; ++bi) {
        const i64 i = bi * D + d;
        conv1d_row_bwd(x + bi * sx + d * L, w + d * K, bias ? bias[d] : 0.0f, dy + i * L, dx + i * L, dwk, &db, L, K,
                       reverse, silu);
      }
      for (i64 j = 0; j < K; ++j) dw[d * K + j] = (float)dwk[reverse ? K - 1 - j : j];
      if (dbias) dbias[d] = (float)db;
    }
  }
  return 0;
}

}  // extern "C"
