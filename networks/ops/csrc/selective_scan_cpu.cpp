// Fused CPU selective scan (forward and backward), the `fused` backend of networks.ops.selective_scan.
//
// Plain C ABI, no Torch or Python headers: compiled in a few seconds by networks/ops/scan_fused.py
// and called through ctypes (which releases the GIL). Threads: OpenMP, with the thread count
// passed in by the caller (torch.get_num_threads()).
//
// Core semantics (delta already biased and softplus-ed):
//   h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t,   h_{-1} = 0,   y_t = <C_t, h_t>
// u, delta, y: (Bt, D, L); A: (D, N); B, C: (Bt, N, L); all contiguous, one dtype.
//
// Layout of the work:
// * the Bt * D channels are split into equal contiguous ranges, one per thread. A thread walks the
//   sequence in chunks of K steps; per chunk it transposes B and C into (K, Np) rows (Np = N padded
//   to the vector width with zeros: a zero state never moves) and scans each of its channels over
//   the chunk, the channel's N states in registers. No barriers: threads never wait for each other
//   in the forward pass;
// * the forward pass stores the state entering each chunk (Bt * D * ceil(L/K) * Np values,
//   O(L * D) for K >= N) and, when asked, the state after the last token (Bt, D, N) (mamba-ssm's
//   return_last_state);
// * the backward pass walks chunks in reverse: per channel it recomputes the chunk's states and
//   decays into a (K, Np) buffer, then runs the adjoint recurrence
//       g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}
//   backwards, the term after the last token being the adjoint of the last state when it is
//   given, else 0 (the decay terms use exp(delta_t A) h_{t-1} from the buffer: exact even when a
//   decay is tiny, where h_t - delta_t u_t B_t would cancel catastrophically). dB and dC sum over
//   channels, which may belong to several threads: see backward_impl;
// * the SIMD paths (float32; AVX-512 and AVX2+FMA, each compiled when the compiler targets it) run
//   one kernel over W-lane vectors (W = 16, 8). Decays are 2^(delta * A log2 e): A log2 e is
//   rounded once (from double), an error the size of the rounding of delta * A that any float32
//   exp(delta * A) has; the fraction delta * A log2 e - k is fused; the Cephes exp2f polynomial is
//   < 1 ulp; underflow to 0 and overflow to inf are exact; NaN propagates. W per-step dot products
//   are reduced at a time with a transpose-add tree. The generic path (any ISA, float32 and
//   float64) is plain loops over the states that the compiler vectorises, with a vectorisable
//   expf (Cody-Waite, ~1 ulp; float64: std::exp).

#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu_common.h"

namespace {

// ------------------------------------------------------------------------------------------------
// Generic path: loops over the (padded) states, vectorised by the compiler.

template <typename T>
struct Generic {
  static constexpr i64 pad = 1;

  // Scans `len` steps of one channel; h (Np) in/out; writes y[0..len).
  static void fwd_chunk(const T* u, const T* dl, const T* A, const T* /*A2*/, const T* BT, const T* CT, i64 Np,
                        T* y, T* h, i64 len) {
    for (i64 t = 0; t < len; ++t) {
      const T dt = dl[t], dtu = dt * u[t];
      const T* b = BT + t * Np;
      const T* c = CT + t * Np;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (i64 n = 0; n < Np; ++n) {
        const T e = exp_generic(dt * A[n]);
        const T x = dtu * b[n];
        const T hn = fmadd(e, h[n], x);
        h[n] = hn;
        acc += c[n] * hn;
      }
      y[t] = acc;
    }
  }

  // Backward of one chunk of one channel; see the file comment. `carry` (Np) holds
  // exp(delta_{t+1} A) g_{t+1} for the step after the chunk (in) and for its first step (out).
  static void bwd_chunk(const T* u, const T* dl, const T* dy, const T* A, const T* /*A2*/, const T* BT,
                        const T* CT, i64 Np, const T* h0, T* H, T* E, T* carry, double* dA, T* Pb, T* Pc, T* du, T* ddl, i64 len) {
    for (i64 t = 0; t < len; ++t) {
      const T dt = dl[t], dtu = dt * u[t];
      const T* b = BT + t * Np;
      const T* hp = t ? H + (t - 1) * Np : h0;
      T* ht = H + t * Np;
      T* et = E + t * Np;
#pragma omp simd
      for (i64 n = 0; n < Np; ++n) {
        const T e = exp_generic(dt * A[n]);
        const T x = dtu * b[n];
        et[n] = e;
        ht[n] = fmadd(e, hp[n], x);
      }
    }
    T* dAl = E + len * Np;  // scratch row after the decays
    for (i64 n = 0; n < Np; ++n) dAl[n] = 0;
    for (i64 t = len - 1; t >= 0; --t) {
      const T dt = dl[t], dtu = dt * u[t], g_out = dy[t];
      const T* b = BT + t * Np;
      const T* c = CT + t * Np;
      const T* ht = H + t * Np;
      const T* hp = t ? H + (t - 1) * Np : h0;
      const T* et = E + t * Np;
      T* pb = Pb + t * Np;
      T* pc = Pc + t * Np;
      T s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
      for (i64 n = 0; n < Np; ++n) {
        const T g = fmadd(c[n], g_out, carry[n]);
        pc[n] = fmadd(g_out, ht[n], pc[n]);
        pb[n] = fmadd(dtu, g, pb[n]);
        const T q = g * (et[n] * hp[n]);  // g * exp(delta_t A) h_{t-1}
        s1 += g * b[n];
        s2 += q * A[n];
        dAl[n] = fmadd(q, dt, dAl[n]);
        carry[n] = et[n] * g;
      }
      du[t] = dt * s1;
      ddl[t] = u[t] * s1 + s2;
    }
    for (i64 n = 0; n < Np; ++n) dA[n] += (double)dAl[n];
  }
};

// ------------------------------------------------------------------------------------------------
// SIMD paths (float32): one kernel, written over a vector type V of W lanes (AVX-512: 16, AVX2: 8).
//
// V provides: load/store (aligned), loadu/storeu, set1, zero, add, sub, mul, fmadd, exp2 (2^x, see
// below), hsum (sum of the lanes) and reduce (W vectors -> one vector of their W lane sums, a
// transpose-add tree), and W.

#if defined(__AVX512F__)
struct V512 {
  typedef __m512 v;
  static constexpr int W = 16;
  static v load(const float* p) { return _mm512_load_ps(p); }
  static v loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, v a) { _mm512_store_ps(p, a); }
  static void storeu(float* p, v a) { _mm512_storeu_ps(p, a); }
  static v set1(float x) { return _mm512_set1_ps(x); }
  static v zero() { return _mm512_setzero_ps(); }
  static v add(v a, v b) { return _mm512_add_ps(a, b); }
  static v sub(v a, v b) { return _mm512_sub_ps(a, b); }
  static v mul(v a, v b) { return _mm512_mul_ps(a, b); }
  static v fmadd(v a, v b, v c) { return _mm512_fmadd_ps(a, b, c); }
  static float hsum(v a) { return _mm512_reduce_add_ps(a); }

  // 2^(a b): k = round(a b); f = a b - k with one rounding (fused); Cephes exp2f polynomial on
  // [-0.5, 0.5] (< 1 ulp); vscalefps, which underflows to subnormals and 0 and overflows to inf
  // exactly. a b is clamped to [-200, 200] by one vrangeps (the smaller magnitude of a b and 200,
  // with a b's sign: one op where max + min took two, of about 14 per state update); NaN propagates
  // (vrangeps returns a NaN first operand).
  static v exp2(v a, v b) {
    const v t = _mm512_range_ps(_mm512_mul_ps(a, b), _mm512_set1_ps(200.0f), 0x02);
    const v k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_scalef_ps(exp2_poly(_mm512_fmsub_ps(a, b, k)), k);
  }
  static v exp2_poly(v f) {
    v p = set1(1.535336188319500e-4f);
    p = fmadd(p, f, set1(1.339887440266574e-3f));
    p = fmadd(p, f, set1(9.618437357674640e-3f));
    p = fmadd(p, f, set1(5.550332471162809e-2f));
    p = fmadd(p, f, set1(2.402264791363012e-1f));
    p = fmadd(p, f, set1(6.931472028550421e-1f));
    return fmadd(p, f, set1(1.0f));
  }

  static v reduce(const v* x) {
    v a[8], b[4], c[2];
    for (int i = 0; i < 8; ++i)
      a[i] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]), _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
    // a[i], per 128-bit lane: [x2i, x2i+1, x2i, x2i+1] partial sums
    for (int i = 0; i < 4; ++i)
      b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    // b[i], per 128-bit lane: [x4i .. x4i+3] partial sums
    for (int i = 0; i < 2; ++i)
      c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    // c[i]: lanes 0-1 hold halves of x8i..x8i+3, lanes 2-3 of x8i+4..x8i+7
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
};
#endif  // __AVX512F__

#if defined(__AVX2__) && defined(__FMA__)
struct V256 {
  typedef __m256 v;
  static constexpr int W = 8;
  static v load(const float* p) { return _mm256_load_ps(p); }
  static v loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, v a) { _mm256_store_ps(p, a); }
  static void storeu(float* p, v a) { _mm256_storeu_ps(p, a); }
  static v set1(float x) { return _mm256_set1_ps(x); }
  static v zero() { return _mm256_setzero_ps(); }
  static v add(v a, v b) { return _mm256_add_ps(a, b); }
  static v sub(v a, v b) { return _mm256_sub_ps(a, b); }
  static v mul(v a, v b) { return _mm256_mul_ps(a, b); }
  static v fmadd(v a, v b, v c) { return _mm256_fmadd_ps(a, b, c); }
  static float hsum(v a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }

  // 2^t as above; the scale 2^k is applied as two exact factors (k split in halves), so results
  // are right down to the subnormals and up to FLT_MAX; NaN propagates.
  static v exp2(v a, v b) {
    v t = _mm256_mul_ps(a, b);
    t = _mm256_max_ps(_mm256_set1_ps(-200.0f), t);  // NaN t (second operand) kept, -inf clamped
    t = _mm256_min_ps(_mm256_set1_ps(200.0f), t);
    const v k = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const v p = poly(_mm256_fmsub_ps(a, b, k));
    // k in [-200, 200]: clamp to [-151, 129] (beyond, the result is 0 or inf either way)
    __m256i ki = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(k, set1(-151.0f)), set1(129.0f)));
    const __m256i k1 = _mm256_srai_epi32(ki, 1), k2 = _mm256_sub_epi32(ki, k1);
    const __m256i bias = _mm256_set1_epi32(127);
    const v s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23));
    const v s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, bias), 23));
    return mul(mul(p, s1), s2);
  }
  static v poly(v f) {
    v p = set1(1.535336188319500e-4f);
    p = fmadd(p, f, set1(1.339887440266574e-3f));
    p = fmadd(p, f, set1(9.618437357674640e-3f));
    p = fmadd(p, f, set1(5.550332471162809e-2f));
    p = fmadd(p, f, set1(2.402264791363012e-1f));
    p = fmadd(p, f, set1(6.931472028550421e-1f));
    return fmadd(p, f, set1(1.0f));
  }

  static v reduce(const v* x) {
    const v a = _mm256_hadd_ps(_mm256_hadd_ps(x[0], x[1]), _mm256_hadd_ps(x[2], x[3]));
    const v b = _mm256_hadd_ps(_mm256_hadd_ps(x[4], x[5]), _mm256_hadd_ps(x[6], x[7]));
    // a: [x0..x3 low-half sums | x0..x3 high-half sums], b likewise for x4..x7
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  }
};
#endif  // __AVX2__ && __FMA__

template <typename V>
struct Simd {
  typedef typename V::v v;
  static constexpr int W = V::W;
  static constexpr i64 pad = W;
  static constexpr int MAXV = 1024 / W;  // Np <= 1024 (the caller checks)

  template <int NVT>
  static void fwd_chunk_v(int nvr, const float* u, const float* dl, const float* A2, const float* BT,
                          const float* CT, i64 Np, float* y, float* hmem, i64 len) {
    const int nv = NVT ? NVT : nvr;
    v a2[NVT ? NVT : MAXV], h[NVT ? NVT : MAXV];
    for (int k = 0; k < nv; ++k) {
      a2[k] = V::load(A2 + W * k);
      h[k] = V::loadu(hmem + W * k);
    }
    auto step = [&](i64 t) -> v {
      const float dt = dl[t];
      const v vdt = V::set1(dt), vdtu = V::set1(dt * u[t]);
      const float* b = BT + t * Np;
      const float* c = CT + t * Np;
      v acc = V::zero();
      for (int k = 0; k < nv; ++k) {
        const v e = V::exp2(vdt, a2[k]);
        const v x = V::mul(vdtu, V::load(b + W * k));
        h[k] = V::fmadd(e, h[k], x);
        acc = V::fmadd(V::load(c + W * k), h[k], acc);
      }
      return acc;
    };
    i64 t = 0;
    for (; t + W <= len; t += W) {
      v acc[W];
      for (int j = 0; j < W; ++j) acc[j] = step(t + j);
      V::storeu(y + t, V::reduce(acc));
    }
    for (; t < len; ++t) y[t] = V::hsum(step(t));
    for (int k = 0; k < nv; ++k) V::storeu(hmem + W * k, h[k]);
  }

  template <int NVT>
  static void bwd_chunk_v(int nvr, const float* u, const float* dl, const float* dy, const float* A,
                          const float* A2, const float* BT, const float* CT, i64 Np, const float* h0, float* H,
                          float* E, float* carry, double* dA, float* Pb, float* Pc, float* du, float* ddl, i64 len) {
    const int nv = NVT ? NVT : nvr;
    v a[NVT ? NVT : MAXV], h[NVT ? NVT : MAXV];
    for (int k = 0; k < nv; ++k) {
      a[k] = V::load(A2 + W * k);
      h[k] = V::loadu(h0 + W * k);
    }
    // recompute the chunk's states and decays
    for (i64 t = 0; t < len; ++t) {
      const float dt = dl[t];
      const v vdt = V::set1(dt), vdtu = V::set1(dt * u[t]);
      const float* b = BT + t * Np;
      for (int k = 0; k < nv; ++k) {
        const v e = V::exp2(vdt, a[k]);
        const v x = V::mul(vdtu, V::load(b + W * k));
        h[k] = V::fmadd(e, h[k], x);
        V::store(H + t * Np + W * k, h[k]);
        V::store(E + t * Np + W * k, e);
      }
    }
    // adjoint, in reverse: g_t = exp(delta_{t+1} A) g_{t+1} + C_t dy_t, one FMA on the dependency
    // chain. gn/en hold g_{t+1} and exp(delta_{t+1} A); entering the chunk, the carry and 1.
    v* gn = h;
    v en[NVT ? NVT : MAXV], dacc[NVT ? NVT : MAXV];
    for (int k = 0; k < nv; ++k) {
      a[k] = V::load(A + W * k);
      gn[k] = V::load(carry + W * k);
      en[k] = V::set1(1.0f);
      dacc[k] = V::zero();
    }
    auto step = [&](i64 t, v& s1, v& s2) {
      const float dt = dl[t];
      const v vdt = V::set1(dt), vdtu = V::set1(dt * u[t]), vdy = V::set1(dy[t]);
      const float* b = BT + t * Np;
      const float* c = CT + t * Np;
      const float* ht = H + t * Np;
      const float* hp = t ? H + (t - 1) * Np : h0;
      const float* et = E + t * Np;
      float* pb = Pb + t * Np;
      float* pc = Pc + t * Np;
      s1 = V::zero();
      s2 = V::zero();
      for (int k = 0; k < nv; ++k) {
        const v bv = V::load(b + W * k), ev = V::load(et + W * k);
        const v g = V::fmadd(en[k], gn[k], V::mul(V::load(c + W * k), vdy));
        V::store(pc + W * k, V::fmadd(vdy, V::load(ht + W * k), V::load(pc + W * k)));
        V::store(pb + W * k, V::fmadd(vdtu, g, V::load(pb + W * k)));
        // g exp(delta_t A) h_{t-1}, from the stored h_{t-1}: no cancellation when decays are tiny
        const v q = V::mul(g, V::mul(ev, V::loadu(hp + W * k)));
        s1 = V::fmadd(g, bv, s1);
        s2 = V::fmadd(q, a[k], s2);
        dacc[k] = V::fmadd(q, vdt, dacc[k]);
        gn[k] = g;
        en[k] = ev;
      }
    };
    const i64 full = (len / W) * W;
    for (i64 t = len - 1; t >= full; --t) {
      v s1, s2;
      step(t, s1, s2);
      const float r1 = V::hsum(s1), r2 = V::hsum(s2);
      du[t] = dl[t] * r1;
      ddl[t] = u[t] * r1 + r2;
    }
    for (i64 t0 = full - W; t0 >= 0; t0 -= W) {
      v s1[W], s2[W];
      for (int j = W - 1; j >= 0; --j) step(t0 + j, s1[j], s2[j]);
      const v r1 = V::reduce(s1), r2 = V::reduce(s2);
      V::storeu(du + t0, V::mul(V::loadu(dl + t0), r1));
      V::storeu(ddl + t0, V::fmadd(V::loadu(u + t0), r1, r2));
    }
    alignas(64) float tmp[W];
    for (int k = 0; k < nv; ++k) {
      V::store(carry + W * k, V::mul(en[k], gn[k]));
      V::store(tmp, dacc[k]);
      for (int j = 0; j < W; ++j) dA[W * k + j] += (double)tmp[j];
    }
  }

  static void fwd_chunk(const float* u, const float* dl, const float* /*A*/, const float* A2, const float* BT,
                        const float* CT, i64 Np, float* y, float* h, i64 len) {
    const int nv = (int)(Np / W);
    switch (nv) {
      case 1: return fwd_chunk_v<1>(nv, u, dl, A2, BT, CT, Np, y, h, len);
      case 2: return fwd_chunk_v<2>(nv, u, dl, A2, BT, CT, Np, y, h, len);
      case 3: return fwd_chunk_v<3>(nv, u, dl, A2, BT, CT, Np, y, h, len);
      case 4: return fwd_chunk_v<4>(nv, u, dl, A2, BT, CT, Np, y, h, len);
      default: return fwd_chunk_v<0>(nv, u, dl, A2, BT, CT, Np, y, h, len);
    }
  }
  static void bwd_chunk(const float* u, const float* dl, const float* dy, const float* A, const float* A2,
                        const float* BT, const float* CT, i64 Np, const float* h0, float* H, float* E, float* carry,
                        double* dA, float* Pb, float* Pc, float* du, float* ddl, i64 len) {
    const int nv = (int)(Np / W);
#define NETWORKS_BWD_ARGS nv, u, dl, dy, A, A2, BT, CT, Np, h0, H, E, carry, dA, Pb, Pc, du, ddl, len
    switch (nv) {
      case 1: return bwd_chunk_v<1>(NETWORKS_BWD_ARGS);
      case 2: return bwd_chunk_v<2>(NETWORKS_BWD_ARGS);
      case 3: return bwd_chunk_v<3>(NETWORKS_BWD_ARGS);
      case 4: return bwd_chunk_v<4>(NETWORKS_BWD_ARGS);
      default: return bwd_chunk_v<0>(NETWORKS_BWD_ARGS);
    }
#undef NETWORKS_BWD_ARGS
  }
};

// ------------------------------------------------------------------------------------------------
// Drivers.

// Work split: the Bt * D channels, flattened, in equal contiguous ranges, one per thread (as
// `my_range`). Nothing else is shared between threads, except that dB and dC sum over channels:
// see backward_impl.

// B[n][c0 + dir * t] -> BT[t][n] for t < len, n < N (rows of Np; padding entries are left as they are);
// dir = -1 reads the chunk backwards from position c0.
template <typename T>
inline void transpose_chunk(const T* Bm, i64 N, i64 L, i64 Np, i64 c0, i64 len, T* BT, i64 dir = 1) {
  for (i64 n = 0; n < N; ++n) {
    const T* src = Bm + n * L + c0;
    for (i64 t = 0; t < len; ++t) BT[t * Np + n] = src[dir * t];
  }
}

template <typename T>
struct Padded {  // A and A * log2(e) padded to Np with zeros (a zero state never moves)
  Buf<T> A, A2;
  Padded(const T* a, i64 D, i64 N, i64 Np) : A(D * Np), A2(D * Np) {
    for (i64 d = 0; d < D; ++d)
      for (i64 n = 0; n < N; ++n) {
        A.p[d * Np + n] = a[d * N + n];
        A2.p[d * Np + n] = (T)((double)a[d * N + n] * 1.4426950408889634074);
      }
  }
};

template <typename T, typename Kern>
void forward_impl(const T* u, const T* dl, const T* A, const T* Bm, const T* Cm, T* y, T* ck, T* last, i64 Bt,
                  i64 D, i64 L, i64 N, i64 K, int nthreads) {
  const i64 Np = round_up(N, Kern::pad), nck = ceil_div(L, K);
  const int nt = std::max(1, nthreads);
  const Padded<T> Ap(A, D, N, Np);
  Buf<T> H(Bt * D * Np);                // state of every channel, carried from chunk to chunk
  Buf<T> BCT((i64)nt * 2 * K * Np);     // per thread: the current chunk of B and C, transposed
#pragma omp parallel num_threads(nt)
  {
    i64 i0, i1;
    my_range(Bt * D, i0, i1);
    T* BT = BCT.p + (i64)thread_id() * 2 * K * Np;
    T* CT = BT + K * Np;
    for (i64 b = i0 / D; i0 < i1 && b <= (i1 - 1) / D; ++b) {
      const i64 d0 = std::max(i0, b * D) - b * D, d1 = std::min(i1, (b + 1) * D) - b * D;
      for (i64 c0 = 0; c0 < L; c0 += K) {
        const i64 clen = std::min(K, L - c0);
        transpose_chunk(Bm + b * N * L, N, L, Np, c0, clen, BT);
        transpose_chunk(Cm + b * N * L, N, L, Np, c0, clen, CT);
        for (i64 d = d0; d < d1; ++d) {
          const i64 i = b * D + d;
          T* h = H.p + i * Np;
          if (ck) std::memcpy(ck + (i * nck + c0 / K) * Np, h, Np * sizeof(T));
          Kern::fwd_chunk(u + i * L + c0, dl + i * L + c0, Ap.A.p + d * Np, Ap.A2.p + d * Np, BT, CT, Np,
                          y + i * L + c0, h, clen);
        }
      }
    }
  }
  if (last)  // the state after the last token, (Bt, D, N) (mamba-ssm's return_last_state)
    for (i64 i = 0; i < Bt * D; ++i) std::memcpy(last + i * N, H.p + i * Np, N * sizeof(T));
}

// pre[t] = bias + sum_r Wd[r] dtl[r * L + base + dir * t], t < len.
inline void delta_pre(const float* dtl, const float* Wd, float bd, i64 L, i64 R, i64 base, i64 dir, i64 len,
                      float* pre) {
#pragma omp simd
  for (i64 t = 0; t < len; ++t) pre[t] = bd;
  for (i64 r = 0; r < R; ++r) {
    const float w = Wd[r];
    const float* src = dtl + r * L + base;
#pragma omp simd
    for (i64 t = 0; t < len; ++t) pre[t] = fmadd(w, src[dir * t], pre[t]);
  }
}

// Inference forward of Mamba's whole scan step, fused (no states kept, nothing for a backward pass):
//   delta = softplus(Wdt @ dtl + bias)      (softplus optional; Wdt (D, R), dtl (Bt, R, L))
//   y     = (scan(u, delta, A, B, C) + Dskip * u) * silu(z)      (Dskip, z optional)
// read in reverse when `reverse` (the scan runs from the last token to the first: the result is
// flip(f(flip(inputs))), which a bidirectional layer needs without copying flipped tensors).
// u, y: (Bt, D, L) contiguous. dtl, B, C: rows of L, batch stride sx (the slices of Mamba's
// x_proj output (Bt, R + 2N, L)); z: rows of L, batch stride sz (the gate half of in_proj's
// output). Per thread, per chunk, delta, the (reversed) input and the core output live in
// K-long buffers, so the prologue and epilogue cost no pass over memory of their own.
// Training also asks for the core scan's output ys (Bt, D, L), at sequence positions, and the
// state entering each scan-order chunk, ck (Bt, D, ceil(L/K), Np), which the training backward
// (GatedIO, ss_bwd_gated_f32) reads; inference passes null for both.

template <typename Kern>
void gated_forward_impl(const float* u, const float* dtl, const float* Wdt, const float* bias, const float* A,
                        const float* Bm, const float* Cm, const float* Dskip, const float* z, float* y, float* ys,
                        float* ck, i64 Bt, i64 D, i64 L, i64 N, i64 R, i64 sx, i64 sz, int softplus, int reverse, i64 K,
                        int nthreads, float* state) {
  const i64 Np = round_up(N, Kern::pad), nck = ceil_div(L, K);
  const int nt = std::max(1, nthreads);
  const Padded<float> Ap(A, D, N, Np);
  Buf<float> Hown(state ? 1 : Bt * D * Np);
  // the states entering the sequence: zero, or the caller's (Bt, D, Np), left holding the final states
  float* const Hp = state ? state : Hown.p;
  const i64 per_thread = round_up(2 * K * Np + 3 * K, 16);  // B, C chunks; delta, input, output
  Buf<float> work((i64)nt * per_thread);
#pragma omp parallel num_threads(nt)
  {
    i64 i0, i1;
    my_range(Bt * D, i0, i1);
    float* BT = work.p + (i64)thread_id() * per_thread;
    float* CT = BT + K * Np;
    float* dbuf = CT + K * Np;
    float* ubuf = dbuf + K;
    float* ybuf = ubuf + K;
    for (i64 b = i0 / D; i0 < i1 && b <= (i1 - 1) / D; ++b) {
      const i64 d0 = std::max(i0, b * D) - b * D, d1 = std::min(i1, (b + 1) * D) - b * D;
      const float* dtb = dtl + b * sx;
      for (i64 c0 = 0; c0 < L; c0 += K) {
        const i64 len = std::min(K, L - c0);
        // scan step t of this chunk reads sequence position p(t) = c0 + t, or L - 1 - c0 - t
        const i64 base = reverse ? L - 1 - c0 : c0, dir = reverse ? -1 : 1;
        transpose_chunk(Bm + b * sx, N, L, Np, base, len, BT, dir);
        transpose_chunk(Cm + b * sx, N, L, Np, base, len, CT, dir);
        for (i64 d = d0; d < d1; ++d) {
          const i64 i = b * D + d;
          delta_pre(dtb, Wdt + d * R, bias ? bias[d] : 0.0f, L, R, base, dir, len, dbuf);
          if (softplus) {
#pragma omp simd
            for (i64 t = 0; t < len; ++t) dbuf[t] = softplus_generic(dbuf[t]);
          }
          const float* ur = u + i * L + base;
#pragma omp simd
          for (i64 t = 0; t < len; ++t) ubuf[t] = ur[dir * t];
          if (ck) std::memcpy(ck + (i * nck + c0 / K) * Np, Hp + i * Np, Np * sizeof(float));
          Kern::fwd_chunk(ubuf, dbuf, Ap.A.p + d * Np, Ap.A2.p + d * Np, BT, CT, Np, ybuf, Hp + i * Np, len);
          if (ys) {
            float* ysr = ys + i * L + base;
#pragma omp simd
            for (i64 t = 0; t < len; ++t) ysr[dir * t] = ybuf[t];
          }
          const float dd = Dskip ? Dskip[d] : 0.0f;
          float* yr = y + i * L + base;
          if (z) {
            const float* zr = z + b * sz + d * L + base;
#pragma omp simd
            for (i64 t = 0; t < len; ++t) yr[dir * t] = fmadd(dd, ubuf[t], ybuf[t]) * silu_generic(zr[dir * t]);
          } else {
#pragma omp simd
            for (i64 t = 0; t < len; ++t) yr[dir * t] = fmadd(dd, ubuf[t], ybuf[t]);
          }
        }
      }
    }
  }
}

// Backward. Each thread walks the sequence in reverse, super-block (S steps) by super-block, and
// within one chunk (K steps) by chunk over its channels. Its dB/dC contributions for a batch
// element go to a private (S, Np) partial, one of R in a ring; the last thread to finish a
// (batch element, super-block) sums the partials of all threads that share the batch element, in
// thread order, into dB and dC, and frees the ring slot. Threads wait only when one is R
// super-blocks ahead of another (never, when the machine is not oversubscribed): no barriers, so
// a thread the OS preempts does not stall the others at every step.
//
// Where a chunk's inputs (u, delta, dy: K-long rows in scan order) come from and where its
// gradients (du, ddelta) go is the IO policy's: `PlainIO` points into the caller's tensors (the
// core scan, ss_bwd_*), `GatedIO` computes them per chunk from Mamba's step-size projection and
// gate and writes the gradients of those (ss_bwd_gated_f32). `io.enter(tid, b, d, c0, len)`
// returns the rows of scan-order chunk [c0, c0 + len) of channel (b, d); `io.leave` (same
// arguments) runs after the chunk's core backward. B and C: rows of L, batch stride sbc; read,
// and dB, dC ((Bt, N, L) contiguous) written, at sequence positions p(t) = t, or L - 1 - t when
// `reverse`.
template <typename T>
struct ChunkRows {
  const T *u, *dl, *dy;
  T *du, *ddl;
};

template <typename T>
struct PlainIO {  // u, delta, dy, du, ddelta: (Bt, D, L) contiguous, scan order = sequence order
  const T *u, *dl, *dy;
  T *du, *ddl;
  i64 D, L;
  ChunkRows<T> enter(int, i64 b, i64 d, i64 c0, i64) const {
    const i64 r = (b * D + d) * L + c0;
    return {u + r, dl + r, dy + r, du + r, ddl + r};
  }
  void leave(int, i64, i64, i64, i64) const {}
};

template <typename T, typename Kern, typename IO>
void backward_impl(IO& io, const T* A, const T* Bm, const T* Cm, i64 sbc, const T* ck, const T* dlast, T* dA, T* dB,
                   T* dC, i64 Bt, i64 D, i64 L, i64 N, i64 K, i64 S, int reverse, int nthreads) {
  const i64 Np = round_up(N, Kern::pad), nck = ceil_div(L, K);
  const i64 dir = reverse ? -1 : 1;
  const int nt = std::max(1, nthreads);
  const int R = 3;
  if (S <= 0) S = ((i64)1 << 18) / (2 * Np * (i64)sizeof(T));  // a partial (dB and dC rows) of ~256 KiB
  S = std::max<i64>(K, std::min<i64>(S, 16384) / K * K);
  S = std::min<i64>(S, round_up(L, K));
  const i64 nsb = ceil_div(L, S);
  const Padded<T> Ap(A, D, N, Np);
  Buf<T> carry(Bt * D * Np);  // exp(delta_{t+1} A) g_{t+1} entering each channel's current chunk
  if (dlast)  // the adjoint of the last state (Bt, D, N) enters after the last token
    for (i64 i = 0; i < Bt * D; ++i) std::memcpy(carry.p + i * Np, dlast + i * N, N * sizeof(T));
  Buf<double> dAacc(Bt * D * Np);
  Buf<T> scratch((i64)nt * (2 * K * Np + (2 * K + 1) * Np));  // per thread: B, C chunk; states, decays
  // Ring of partials: thread t's segment for batch element b is t's channels of b.
  // first_b[t], last_b[t]: t's batch elements; seg0[t]: index of t's first segment.
  std::vector<i64> first_b(nt), last_b(nt), seg0(nt + 1, 0);
  for (int t = 0; t < nt; ++t) {
    const i64 i0 = Bt * D * t / nt, i1 = Bt * D * (t + 1) / nt;
    first_b[t] = i0 / D;
    last_b[t] = i1 > i0 ? (i1 - 1) / D : i0 / D - 1;  // empty range: no segments
    seg0[t + 1] = seg0[t] + std::max<i64>(0, last_b[t] - first_b[t] + 1);
  }
  Buf<T> part(seg0[nt] * R * 2 * S * Np);
  std::unique_ptr<std::atomic<i64>[]> occupant(new std::atomic<i64>[Bt * R]);  // super-block a slot awaits
  std::unique_ptr<std::atomic<int>[]> done(new std::atomic<int>[Bt * R]);       // finished segments
  for (i64 b = 0; b < Bt; ++b)
    for (int r = 0; r < R; ++r) {
      i64 first = nsb - 1 - ((nsb - 1 - r) % R + R) % R;  // largest sb < nsb with sb % R == r
      occupant[b * R + r].store(first < 0 ? -1 : first, std::memory_order_relaxed);
      done[b * R + r].store(0, std::memory_order_relaxed);
    }
  std::vector<int> owners(Bt, 0);
  for (int t = 0; t < nt; ++t)
    for (i64 b = first_b[t]; b <= last_b[t]; ++b) ++owners[b];
  auto part_of = [&](int t, i64 b, i64 slot) { return part.p + ((seg0[t] + b - first_b[t]) * R + slot) * 2 * S * Np; };

#pragma omp parallel num_threads(nt)
  {
    // Shares are planned for a team of nt; should the runtime grant fewer threads, each present
    // thread also runs the missing threads' shares (t = tid, tid + team, ...).
    const int tid = thread_id();
#ifdef _OPENMP
    const int team = omp_get_num_threads();
#else
    const int team = 1;
#endif
    T* BT = scratch.p + (i64)tid * (2 * K * Np + (2 * K + 1) * Np);
    T* CT = BT + K * Np;
    T* Hb = CT + K * Np;
    T* Eb = Hb + K * Np;
    for (i64 sb = nsb - 1; sb >= 0; --sb) {
      const i64 s0 = sb * S, len = std::min(S, L - s0), slot = sb % R;
      for (int t = tid; t < nt; t += team) {
        const i64 i0 = Bt * D * t / nt, i1 = Bt * D * (t + 1) / nt;
        for (i64 b = first_b[t]; b <= last_b[t]; ++b) {
          const i64 d0 = std::max(i0, b * D) - b * D, d1 = std::min(i1, (b + 1) * D) - b * D;
          std::atomic<i64>& occ = occupant[b * R + slot];
          while (occ.load(std::memory_order_acquire) != sb) std::this_thread::yield();
          T* pb = part_of(t, b, slot);
          T* pc = pb + S * Np;
          std::memset(pb, 0, 2 * S * Np * sizeof(T));
          for (i64 c0 = s0 + (len - 1) / K * K; c0 >= s0; c0 -= K) {
            const i64 clen = std::min(K, s0 + len - c0), off = c0 - s0;
            const i64 base = reverse ? L - 1 - c0 : c0;
            transpose_chunk(Bm + b * sbc, N, L, Np, base, clen, BT, dir);
            transpose_chunk(Cm + b * sbc, N, L, Np, base, clen, CT, dir);
            for (i64 d = d0; d < d1; ++d) {
              const i64 i = b * D + d;
              const ChunkRows<T> rows = io.enter(tid, b, d, c0, clen);
              Kern::bwd_chunk(rows.u, rows.dl, rows.dy, Ap.A.p + d * Np, Ap.A2.p + d * Np, BT, CT, Np,
                              ck + (i * nck + c0 / K) * Np, Hb, Eb, carry.p + i * Np, dAacc.p + i * Np,
                              pb + off * Np, pc + off * Np, rows.du, rows.ddl, clen);
              io.leave(tid, b, d, c0, clen);
            }
          }
          if (done[b * R + slot].fetch_add(1, std::memory_order_acq_rel) == owners[b] - 1) {
            // last segment of (b, sb) done: dB/dC = sum of the owners' partials, in thread order
            for (i64 n = 0; n < N; ++n) {
              T* ob = dB + (b * N + n) * L + (reverse ? L - 1 - s0 : s0);
              T* oc = dC + (b * N + n) * L + (reverse ? L - 1 - s0 : s0);
              bool first = true;
              for (int o = 0; o < nt; ++o) {
                if (b < first_b[o] || b > last_b[o]) continue;
                const T* qb = part_of(o, b, slot) + n;
                const T* qc = qb + S * Np;
                if (first) {
                  for (i64 k = 0; k < len; ++k) ob[dir * k] = qb[k * Np], oc[dir * k] = qc[k * Np];
                  first = false;
                } else {
                  for (i64 k = 0; k < len; ++k) ob[dir * k] += qb[k * Np], oc[dir * k] += qc[k * Np];
                }
              }
            }
            done[b * R + slot].store(0, std::memory_order_relaxed);
            occ.store(sb - R, std::memory_order_release);
          }
        }
      }
    }
  }
  for (i64 d = 0; d < D; ++d)
    for (i64 n = 0; n < N; ++n) {
      double s = 0;
      for (i64 b = 0; b < Bt; ++b) s += dAacc.p[(b * D + d) * Np + n];
      dA[d * N + n] = (T)s;
    }
}

// Implementations: 0 = best built, 1 = generic, 2 = AVX2, 3 = AVX-512 (SIMD ones: float32, N <= 1024).
enum Impl { kAuto = 0, kGeneric = 1, kAvx2 = 2, kAvx512 = 3 };

inline bool impl_built(int impl) {
  switch (impl) {
    case kGeneric: return true;
#if defined(__AVX2__) && defined(__FMA__)
    case kAvx2: return true;
#endif
#if defined(__AVX512F__)
    case kAvx512: return true;
#endif
    default: return false;
  }
}

// The implementation that runs for (dtype, impl, N): -1 if the requested one is not built.
inline int resolve_impl(int dtype, int impl, i64 N) {
  if (dtype != 0 || N > 1024) return impl == kAuto || impl_built(impl) ? kGeneric : -1;
  if (impl == kAuto) return impl_built(kAvx512) ? kAvx512 : impl_built(kAvx2) ? kAvx2 : kGeneric;
  return impl_built(impl) ? impl : -1;
}

inline i64 pad_of(int resolved) { return resolved == kAvx512 ? 16 : resolved == kAvx2 ? 8 : 1; }

template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::bad_alloc&) {
    return 1;
  } catch (...) {
    return 2;
  }
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// C ABI. Return 0 on success, 1 out of memory, 2 bad argument, 3 implementation not built.

extern "C" {

int ss_abi_version() { return 9; }

// Whether implementation `impl` (1 generic, 2 avx2, 3 avx512) is built into this library.
int ss_has_impl(int impl) { return impl_built(impl) ? 1 : 0; }

int ss_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// The implementation that runs for dtype code (0 float32, 1 float64), impl and N (-1: not built).
int ss_resolve(int dtype, int impl, i64 N) { return resolve_impl(dtype, impl, N); }

// Length of a saved-state row (N padded to the vector width) for dtype, impl and N.
i64 ss_state_pad(int dtype, int impl, i64 N) {
  const int r = resolve_impl(dtype, impl, N);
  return r < 0 ? -1 : round_up(N, pad_of(r));
}

int ss_fwd_f32(const float* u, const float* dl, const float* A, const float* B, const float* C, float* y, float* ck,
               float* last, i64 Bt, i64 D, i64 L, i64 N, i64 K, int nthreads, int impl) {
  if (K <= 0 || (K % 16) != 0) return 2;
  const int r = resolve_impl(0, impl, N);
  if (r < 0) return 3;
  return guarded([&] {
#if defined(__AVX512F__)
    if (r == kAvx512) return forward_impl<float, Simd<V512>>(u, dl, A, B, C, y, ck, last, Bt, D, L, N, K, nthreads);
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (r == kAvx2) return forward_impl<float, Simd<V256>>(u, dl, A, B, C, y, ck, last, Bt, D, L, N, K, nthreads);
#endif
    forward_impl<float, Generic<float>>(u, dl, A, B, C, y, ck, last, Bt, D, L, N, K, nthreads);
  });
}

int ss_fwd_f64(const double* u, const double* dl, const double* A, const double* B, const double* C, double* y,
               double* ck, double* last, i64 Bt, i64 D, i64 L, i64 N, i64 K, int nthreads, int impl) {
  if (K <= 0 || (K % 16) != 0) return 2;
  if (resolve_impl(1, impl, N) < 0) return 3;
  return guarded([&] { forward_impl<double, Generic<double>>(u, dl, A, B, C, y, ck, last, Bt, D, L, N, K, nthreads); });
}

int ss_bwd_f32(const float* u, const float* dl, const float* A, const float* B, const float* C, const float* ck,
               const float* dy, const float* dlast, float* du, float* ddl, float* dA, float* dB, float* dC, i64 Bt,
               i64 D, i64 L, i64 N, i64 K, i64 S, int nthreads, int impl) {
  if (K <= 0 || (K % 16) != 0) return 2;
  const int r = resolve_impl(0, impl, N);
  if (r < 0) return 3;
  return guarded([&] {
    PlainIO<float> io{u, dl, dy, du, ddl, D, L};
#define NETWORKS_BWD_CALL io, A, B, C, N * L, ck, dlast, dA, dB, dC, Bt, D, L, N, K, S, 0, nthreads
#if defined(__AVX512F__)
    if (r == kAvx512) return backward_impl<float, Simd<V512>>(NETWORKS_BWD_CALL);
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (r == kAvx2) return backward_impl<float, Simd<V256>>(NETWORKS_BWD_CALL);
#endif
    backward_impl<float, Generic<float>>(NETWORKS_BWD_CALL);
  });
}

int ss_bwd_f64(const double* u, const double* dl, const double* A, const double* B, const double* C,
               const double* ck, const double* dy, const double* dlast, double* du, double* ddl, double* dA, double* dB, double* dC,
               i64 Bt, i64 D, i64 L, i64 N, i64 K, i64 S, int nthreads, int impl) {
  if (K <= 0 || (K % 16) != 0) return 2;
  if (resolve_impl(1, impl, N) < 0) return 3;
  return guarded([&] {
    PlainIO<double> io{u, dl, dy, du, ddl, D, L};
    backward_impl<double, Generic<double>>(NETWORKS_BWD_CALL);
#undef NETWORKS_BWD_CALL
  });
}

// Mamba's fused scan step (gated_forward_impl), float32; bias, Dskip and z may be null; ys and ck
// null for inference, given for training (the core scan's output and the chunk-entering states
// that ss_bwd_gated_f32 reads). state (Bt, D, Np) or null: the states entering the sequence (null:
// zero), overwritten with those after its last token in scan order; consecutive pieces of a sequence
// (in scan order) scanned with one state give what the whole sequence gives.
int ss_fwd_gated_f32(const float* u, const float* dtl, const float* Wdt, const float* bias, const float* A,
                     const float* B, const float* C, const float* Dskip, const float* z, float* y, float* ys, float* ck,
                     i64 Bt, i64 D, i64 L, i64 N, i64 R, i64 sx, i64 sz, int softplus, int reverse, i64 K, int nthreads,
                     int impl, float* state) {
  if (K <= 0 || (K % 16) != 0 || R < 0) return 2;
  const int r = resolve_impl(0, impl, N);
  if (r < 0) return 3;
  return guarded([&] {
#define NETWORKS_GATED_ARGS u, dtl, Wdt, bias, A, B, C, Dskip, z, y, ys, ck, Bt, D, L, N, R, sx, sz, softplus, reverse, K, nthreads, state
#if defined(__AVX512F__)
    if (r == kAvx512) return gated_forward_impl<Simd<V512>>(NETWORKS_GATED_ARGS);
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (r == kAvx2) return gated_forward_impl<Simd<V256>>(NETWORKS_GATED_ARGS);
#endif
    gated_forward_impl<Generic<float>>(NETWORKS_GATED_ARGS);
#undef NETWORKS_GATED_ARGS
  });
}

}  // extern "C"

// ------------------------------------------------------------------------------------------------
// Training backward of Mamba's scan step (of ss_fwd_gated_f32), one pass: per chunk
// and channel, GatedIO recomputes what the core backward needs and turns its gradients into
// those of the step's inputs, in K-long buffers (no (Bt, D, L) intermediate):
//   enter: pre = Wdt @ dtl + bias, delta = softplus(pre) (or pre), us = u at p(t),
//          g = dy silu(z) (the core output's adjoint), dz = dy (ys + Dskip us) silu'(z),
//          dDrow += sum g us
//   leave: du = du_core + Dskip g, dpre = ddelta softplus'(pre) (sigmoid; 1 above torch's
//          threshold 20; ddelta without softplus)
// u, dy, ys, du, dpre, dz: (Bt, D, L) contiguous, at sequence positions; dtl, z: rows of L with
// batch strides sx, sz; scan step t is sequence position p(t) = t, or L - 1 - t when `reverse`.

namespace {

struct GatedIO {
  const float *u, *dtl, *Wdt, *bias, *Dskip, *z, *dy, *ys;
  float *du, *dpre, *dz;
  i64 D, L, R, sx, sz, K;
  int softplus, reverse;
  i64 per;                // floats per thread: pre, delta, us, g, du_core, ddelta
  Buf<float> work;
  Buf<double> dDacc;      // per channel: sum g us over the chunks (one thread owns a channel)

  GatedIO(const float* u_, const float* dtl_, const float* Wdt_, const float* bias_, const float* Dskip_,
          const float* z_, const float* dy_, const float* ys_, float* du_, float* dpre_, float* dz_, i64 Bt, i64 D_,
          i64 L_, i64 R_, i64 sx_, i64 sz_, i64 K_, int softplus_, int reverse_, int nt)
      : u(u_), dtl(dtl_), Wdt(Wdt_), bias(bias_), Dskip(Dskip_), z(z_), dy(dy_), ys(ys_), du(du_), dpre(dpre_),
        dz(dz_), D(D_), L(L_), R(R_), sx(sx_), sz(sz_), K(K_), softplus(softplus_), reverse(reverse_),
        per(round_up(6 * K_, 16)), work((i64)std::max(1, nt) * per), dDacc(Bt * D_) {}

  float* buf(int tid, int k) const { return work.p + tid * per + k * K; }

  ChunkRows<float> enter(int tid, i64 b, i64 d, i64 c0, i64 len) {
    float *pre = buf(tid, 0), *dl = buf(tid, 1), *us = buf(tid, 2), *g = buf(tid, 3);
    const i64 i = b * D + d, base = reverse ? L - 1 - c0 : c0, dir = reverse ? -1 : 1;
    delta_pre(dtl + b * sx, Wdt + d * R, bias ? bias[d] : 0.0f, L, R, base, dir, len, pre);
    if (softplus) {
#pragma omp simd
      for (i64 t = 0; t < len; ++t) dl[t] = softplus_generic(pre[t]);
    } else {
      std::memcpy(dl, pre, len * sizeof(float));
    }
    const float* ur = u + i * L + base;
    const float* dyr = dy + i * L + base;
    const float dd = Dskip ? Dskip[d] : 0.0f;
    float part = 0.0f;
    if (z) {
      const float* zr = z + b * sz + d * L + base;
      const float* ysr = ys + i * L + base;
      float* dzr = dz + i * L + base;
#pragma omp simd reduction(+ : part)
      for (i64 t = 0; t < len; ++t) {
        const float uv = ur[dir * t], zv = zr[dir * t], s = 1.0f / (1.0f + exp_generic(-zv)), gy = dyr[dir * t];
        const float gt = gy * (zv * s);
        dzr[dir * t] = gy * fmadd(dd, uv, ysr[dir * t]) * (s * fmadd(zv, 1.0f - s, 1.0f));
        us[t] = uv;
        g[t] = gt;
        part = fmadd(gt, uv, part);
      }
    } else {
#pragma omp simd reduction(+ : part)
      for (i64 t = 0; t < len; ++t) {
        const float uv = ur[dir * t], gt = dyr[dir * t];
        us[t] = uv;
        g[t] = gt;
        part = fmadd(gt, uv, part);
      }
    }
    dDacc.p[i] += (double)part;
    return {us, dl, g, buf(tid, 4), buf(tid, 5)};
  }

  void leave(int tid, i64 b, i64 d, i64 c0, i64 len) const {
    const float *pre = buf(tid, 0), *g = buf(tid, 3), *duc = buf(tid, 4), *ddl = buf(tid, 5);
    const i64 i = b * D + d, base = reverse ? L - 1 - c0 : c0, dir = reverse ? -1 : 1;
    const float dd = Dskip ? Dskip[d] : 0.0f;
    float* duo = du + i * L + base;
    float* dpo = dpre + i * L + base;
#pragma omp simd
    for (i64 t = 0; t < len; ++t) duo[dir * t] = fmadd(dd, g[t], duc[t]);
    if (softplus) {
#pragma omp simd
      for (i64 t = 0; t < len; ++t) {
        const float x = pre[t];
        dpo[dir * t] = x > 20.0f ? ddl[t] : ddl[t] / (1.0f + exp_generic(-x));
      }
    } else {
#pragma omp simd
      for (i64 t = 0; t < len; ++t) dpo[dir * t] = ddl[t];
    }
  }
};

}  // namespace

extern "C" {

// Gradients of ss_fwd_gated_f32's inputs from dy: du, dpre (of Wdt @ dtl + bias), dz (when z),
// dDrow (Bt, D) (dDskip summed over L, per batch element), dA (D, N), dB, dC (Bt, N, L)
// contiguous. ck and K: as the forward wrote them. B, C: rows of L with batch stride sx (as dtl).
int ss_bwd_gated_f32(const float* u, const float* dtl, const float* Wdt, const float* bias, const float* A,
                     const float* B, const float* C, const float* Dskip, const float* z, const float* ys,
                     const float* ck, const float* dy, float* du, float* dpre, float* dz, float* dDrow, float* dA,
                     float* dB, float* dC, i64 Bt, i64 D, i64 L, i64 N, i64 R, i64 sx, i64 sz, int softplus,
                     int reverse, i64 K, i64 S, int nthreads, int impl) {
  if (K <= 0 || (K % 16) != 0 || R < 0 || L < 0) return 2;
  const int r = resolve_impl(0, impl, N);
  if (r < 0) return 3;
  return guarded([&] {
    GatedIO io(u, dtl, Wdt, bias, Dskip, z, dy, ys, du, dpre, dz, Bt, D, L, R, sx, sz, K, softplus, reverse, nthreads);
#define NETWORKS_BWD_CALL io, A, B, C, sx, ck, nullptr, dA, dB, dC, Bt, D, L, N, K, S, reverse, nthreads
#if defined(__AVX512F__)
    if (r == kAvx512) backward_impl<float, Simd<V512>>(NETWORKS_BWD_CALL);
#endif
#if defined(__AVX2__) && defined(__FMA__)
    if (r == kAvx2) backward_impl<float, Simd<V256>>(NETWORKS_BWD_CALL);
#endif
    if (r == kGeneric) backward_impl<float, Generic<float>>(NETWORKS_BWD_CALL);
#undef NETWORKS_BWD_CALL
    for (i64 i = 0; i < Bt * D; ++i) dDrow[i] = (float)io.dDacc.p[i];
  });
}

}  // extern "C"
