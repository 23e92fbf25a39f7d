// Instance normalisation (+ optional leaky ReLU) of bfloat16 feature maps stored channels-last, for the
// reduced-precision CPU inference mode (networks/precision.py).
//
// Why hand-written: PyTorch's instance_norm reshapes the input to (1, B*C, ...) for batch_norm, which
// copies a channels-last map into contiguous order and back (about a third of a bf16 U-Net's time on
// CPU), and its reductions over the spatial axis of a channels-last tensor are not vectorised across
// channels. Here the statistics are one pass reading each token's C contiguous channels, accumulated
// in float within blocks of tokens and in double across blocks (after subtracting a per-channel pivot,
// so that a large mean does not cancel the variance), and the normalisation + activation a second pass.
#include "cpu_common.h"

namespace {

constexpr i64 kBlock = 512;  // tokens summed in float before the double accumulators take them

}  // namespace

extern "C" {

// x, y: (B, S, C) bfloat16 bits (a channels-last (B, C, *spatial) map, S = prod(spatial)); y may be x.
// w, b: (C) float32 or null. act: 0 none, 1 leaky ReLU with `slope` (slope 0: ReLU).
// Per (batch, channel): y = act((x - mean) * (w / sqrt(var + eps)) + b), biased variance over S
// (a constant channel gives exactly b).
int nc_instance_norm_cl_bf16(const uint16_t* x, const float* w, const float* b, uint16_t* y, i64 B, i64 S, i64 C,
                             double eps, int act, double slope, int nthreads) {
  if (B < 0 || S <= 0 || C <= 0) return 2;
  const int nt = std::max(1, nthreads);
  Buf<double> part(static_cast<i64>(nt) * 2 * C);  // per thread: sum, sum of squares (of x - pivot)
  Buf<float> pivot(C), mean(C), scale(C), shift(C);
  const float fslope = static_cast<float>(slope);
  for (i64 bi = 0; bi < B; ++bi) {
    const uint16_t* xb = x + bi * S * C;
    uint16_t* yb = y + bi * S * C;
    for (i64 c = 0; c < C; ++c) pivot.p[c] = bf16_to_float(xb[c]);
    std::memset(part.p, 0, sizeof(double) * nt * 2 * C);
#pragma omp parallel num_threads(nt)
    {
      i64 s0, s1;
      my_range(S, s0, s1);
      double* dsum = part.p + static_cast<i64>(thread_id()) * 2 * C;
      double* dsq = dsum + C;
      Buf<float> fsum(C), fsq(C);
      for (i64 a = s0; a < s1; a += kBlock) {
        const i64 e = std::min(s1, a + kBlock);
        std::memset(fsum.p, 0, sizeof(float) * C);
        std::memset(fsq.p, 0, sizeof(float) * C);
        for (i64 s = a; s < e; ++s) {
          const uint16_t* row = xb + s * C;
#pragma omp simd
          for (i64 c = 0; c < C; ++c) {
            const float v = bf16_to_float(row[c]) - pivot.p[c];
            fsum.p[c] += v;
            fsq.p[c] = fmadd(v, v, fsq.p[c]);
          }
        }
        for (i64 c = 0; c < C; ++c) {
          dsum[c] += fsum.p[c];
          dsq[c] += fsq.p[c];
        }
      }
    }
    for (i64 c = 0; c < C; ++c) {
      double sum = 0.0, sq = 0.0;
      for (int t = 0; t < nt; ++t) {
        sum += part.p[static_cast<i64>(t) * 2 * C + c];
        sq += part.p[static_cast<i64>(t) * 2 * C + C + c];
      }
      const double m = sum / S;  // mean of x - pivot
      const double var = std::max(sq / S - m * m, 0.0);
      const double sc = (w ? w[c] : 1.0) / std::sqrt(var + eps);
      mean.p[c] = static_cast<float>(m + pivot.p[c]);
      scale.p[c] = static_cast<float>(sc);
      shift.p[c] = b ? b[c] : 0.0f;
    }
#pragma omp parallel num_threads(nt)
    {
      i64 s0, s1;
      my_range(S, s0, s1);
      for (i64 s = s0; s < s1; ++s) {
        const uint16_t* row = xb + s * C;
        uint16_t* out = yb + s * C;
        if (act) {
#pragma omp simd
          for (i64 c = 0; c < C; ++c) {
            const float v = fmadd(bf16_to_float(row[c]) - mean.p[c], scale.p[c], shift.p[c]);
            out[c] = float_to_bf16(v < 0.0f ? v * fslope : v);
          }
        } else {
#pragma omp simd
          for (i64 c = 0; c < C; ++c) out[c] = float_to_bf16(fmadd(bf16_to_float(row[c]) - mean.p[c], scale.p[c], shift.p[c]));
        }
      }
    }
  }
  return 0;
}

}  // extern "C"
