// Layout-changing casts between the bf16 inference mode's two kinds of feature map (networks/precision.py):
// bfloat16 channels-last (B, S, C) around the convolutions, float32 channel-first (B, C, S) in the Mamba
// layers, whose channel-first kernels read each channel's S tokens contiguously.
//
// Why hand-written: torch's `x.to(float32, memory_format=contiguous_format)` on a bf16 channels-last map
// runs an element-wise copy with a gather on one side (0.47 s for a 32 x 48x192x192 map of two windows on
// 2 cores, and 0.17 s the other way), several times the time of reading and writing the bytes. Here a block
// of tokens x all channels is read once into L1 and written as C short contiguous rows, so both sides stream.
#include "cpu_common.h"

namespace {

// Tokens per block: a block's C rows of kTile floats are whole cache lines, and C * kTile elements of the
// token-major side (C <= 1024: at most 256 KiB of floats) stay in L1/L2 while the other side is written.
constexpr i64 kTile = 64;

// The blocks of a (B, S) token range, split evenly over the team.
template <typename F>
void for_blocks(i64 B, i64 S, int nthreads, F&& body) {
  const i64 per_batch = ceil_div(S, kTile), total = B * per_batch;
  const int nt = static_cast<int>(std::max<i64>(1, std::min<i64>(nthreads, total)));
#pragma omp parallel num_threads(nt)
  {
    i64 a, e;
    my_range(total, a, e);
    for (i64 k = a; k < e; ++k) {
      const i64 b = k / per_batch, s0 = (k % per_batch) * kTile;
      body(b, s0, std::min(S, s0 + kTile));
    }
  }
}

// y = convert(x) transposed between (B, S, C) (token-major) and (B, C, S) (channel-first), per block of tokens:
// kToChannelFirst reads (B, S, C) and writes (B, C, S), else the reverse.
template <bool kToChannelFirst, typename Src, typename Dst, typename F>
void transpose_cast(const Src* x, Dst* y, i64 B, i64 S, i64 C, int nthreads, F convert) {
  for_blocks(B, S, nthreads, [&](i64 b, i64 s0, i64 s1) {
    const Src* xb = x + b * S * C;
    Dst* yb = y + b * S * C;
    for (i64 c = 0; c < C; ++c) {
      if constexpr (kToChannelFirst) {
        Dst* row = yb + c * S;
#pragma omp simd
        for (i64 s = s0; s < s1; ++s) row[s] = convert(xb[s * C + c]);
      } else {
        const Src* row = xb + c * S;
#pragma omp simd
        for (i64 s = s0; s < s1; ++s) yb[s * C + c] = convert(row[s]);
      }
    }
  });
}

}  // namespace

extern "C" {

// x: (B, S, C) bfloat16 bits (a channels-last (B, C, *spatial) map, S = prod(spatial)); y: (B, C, S) float32
// (the same map channel-first). Exact: every bfloat16 is a float32.
int lc_cl_bf16_to_cf_f32(const uint16_t* x, float* y, i64 B, i64 S, i64 C, int nthreads) {
  if (B < 0 || S < 0 || C <= 0) return 2;
  transpose_cast<true>(x, y, B, S, C, nthreads, [](uint16_t h) { return bf16_to_float(h); });
  return 0;
}

// x: (B, C, S) float32 (channel-first); y: (B, S, C) bfloat16 bits (the same map channels-last), rounded
// to nearest even as torch rounds; NaN stays NaN, infinities stay infinite.
int lc_cf_f32_to_cl_bf16(const float* x, uint16_t* y, i64 B, i64 C, i64 S, int nthreads) {
  if (B < 0 || S < 0 || C <= 0) return 2;
  transpose_cast<false>(x, y, B, S, C, nthreads, [](float f) { return float_to_bf16(f); });
  return 0;
}

}  // extern "C"
