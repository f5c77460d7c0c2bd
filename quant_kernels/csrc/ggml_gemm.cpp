// y = x @ W.T straight from GGML blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), x in fp32.
//
// Each row of x is first quantized to int8 in blocks of 32 (one fp32 scale per block, as
// the weights are), then every weight block is dotted with the matching activation block
// in integer arithmetic (AVX2 maddubs) and scaled once per block.  For a weight block
// w = d * q + m (Q4_0/Q5_0: m = -8d / -16d; Q8_0: m = 0) and an activation block
// x ~ da * a:   sum(w * x) = d * da * dot(q, a) + m * (da * sum(a)).
//
// Batch invariance: output (i, n) is computed by one thread with the same instructions in
// the same order whatever M is and whichever other rows share the call, so a request's
// tokens do not depend on what else is batched with it.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#include "pool.h"
#include "simd.h"

namespace quantrt_cpu {
namespace {

constexpr int QK = 32;  // values per block, weights and activations
enum GgmlType { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8 };

// Activations of M rows quantized per block of 32: int8 values, the block scale and the
// scale times the sum of the values (for the weights' offset term).
struct QuantAct {
  std::vector<int8_t> q;
  std::vector<float> d, s;
  int64_t nb;
};

void quantize_row(const float* x, int64_t nb, int8_t* q, float* d, float* s) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * QK;
    __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
    __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
    __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                             _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    float amax = hmax(m);
    float db = amax / 127.0f;
    __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    // cvtps rounds to nearest (even) in the default MXCSR mode
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inv));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv));
    int sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * QK),
                        _mm256_permutevar8x32_epi32(p, order));
    d[b] = db;
    s[b] = db * static_cast<float>(sum);
  }
}

QuantAct quantize(const float* x, int64_t M, int64_t K) {
  QuantAct a;
  a.nb = K / QK;
  a.q.resize(M * K);
  a.d.resize(M * a.nb);
  a.s.resize(M * a.nb);
  parallel_range(M, std::max<int64_t>(1, 16384 / K), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i)
      quantize_row(x + i * K, a.nb, a.q.data() + i * K, a.d.data() + i * a.nb, a.s.data() + i * a.nb);
  });
  return a;
}

// The 32 quants of a 16-byte nibble array: low nibbles are values 0..15, high ones 16..31.
inline __m256i nibbles(const uint8_t* qs) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i low = _mm_set1_epi8(0x0f);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), low), _mm_and_si128(v, low));
}

// The fifth bits of a Q5 block (bit j of the 32-bit qh is value j's) as 0x10 per byte.
inline __m256i fifth_bits(const uint8_t* qh) {
  uint32_t bits;
  std::memcpy(&bits, qh, 4);
  const __m256i spread = _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101,
                                            0x0202020202020202, 0x0303030303030303);
  const __m256i mask = _mm256_set1_epi64x(0x8040201008040201);
  __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), spread);
  v = _mm256_cmpeq_epi8(_mm256_and_si256(v, mask), mask);
  return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

// Per type: bytes per block, the 32 quants (unsigned except Q8_0), scale d and offset m.
template <int T> struct Block;
template <> struct Block<Q4_0> {
  static constexpr int bytes = 18;
  static __m256i quants(const uint8_t* b) { return nibbles(b + 2); }
  static float offset(const uint8_t*, float d) { return -8.0f * d; }
};
template <> struct Block<Q4_1> {
  static constexpr int bytes = 20;
  static __m256i quants(const uint8_t* b) { return nibbles(b + 4); }
  static float offset(const uint8_t* b, float) { return fp16_to_float(b + 2); }
};
template <> struct Block<Q5_0> {
  static constexpr int bytes = 22;
  static __m256i quants(const uint8_t* b) { return _mm256_or_si256(nibbles(b + 6), fifth_bits(b + 2)); }
  static float offset(const uint8_t*, float d) { return -16.0f * d; }
};
template <> struct Block<Q5_1> {
  static constexpr int bytes = 24;
  static __m256i quants(const uint8_t* b) { return _mm256_or_si256(nibbles(b + 8), fifth_bits(b + 4)); }
  static float offset(const uint8_t* b, float) { return fp16_to_float(b + 2); }
};
template <> struct Block<Q8_0> {
  static constexpr int bytes = 34;
  static __m256i quants(const uint8_t* b) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
  }
  static float offset(const uint8_t*, float) { return 0.0f; }
};

// One weight row against R activation rows (R <= 4): the weight block is unpacked once
// and reused by each activation row.
template <int T, int R>
inline void row_dot(const uint8_t* w, const QuantAct& a, int64_t i0, float* out, int64_t ldo) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t nb = a.nb;
  __m256 acc[R];
  float off[R];
  const int8_t* aq[R];
  const float* ad[R];
  const float* as[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    off[r] = 0.0f;
    aq[r] = a.q.data() + (i0 + r) * nb * QK;
    ad[r] = a.d.data() + (i0 + r) * nb;
    as[r] = a.s.data() + (i0 + r) * nb;
  }
  for (int64_t b = 0; b < nb; ++b, w += Block<T>::bytes) {
    __m256i q = Block<T>::quants(w);
    const float d = fp16_to_float(w);
    const float m = Block<T>::offset(w, d);
    __m256i uq = q;
    if constexpr (T == Q8_0) uq = _mm256_sign_epi8(q, q);  // |q|; the sign moves to a
    for (int r = 0; r < R; ++r) {
      __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(aq[r] + b * QK));
      if constexpr (T == Q8_0) av = _mm256_sign_epi8(av, q);
      __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(uq, av), ones);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d * ad[r][b]), acc[r]);
      if constexpr (T != Q8_0) off[r] += m * as[r][b];
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = hsum(acc[r]) + off[r];
}

template <int T>
void gemm(const QuantAct& a, const uint8_t* w, int64_t row_bytes, int64_t M, int64_t N, float* y) {
  // Chunks of ~2048 block dots (a few microseconds: far more than claiming one costs), and
  // at least 8 of them so the threads can even out.
  const int64_t grain = std::max<int64_t>(
      4, std::min<int64_t>(2048 / std::max<int64_t>(1, a.nb * M), (N + 7) / 8));
  // Activation rows are taken 64 at a time so their quants stay in L2 while a task's
  // weight rows pass over them.
  constexpr int64_t MT = 64;
  parallel_range(N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += MT) {
      const int64_t m1 = std::min(M, m0 + MT);
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* wr = w + n * row_bytes;
        int64_t i = m0;
        for (; i + 4 <= m1; i += 4) row_dot<T, 4>(wr, a, i, y + i * N + n, N);
        switch (m1 - i) {
          case 3: row_dot<T, 3>(wr, a, i, y + i * N + n, N); break;
          case 2: row_dot<T, 2>(wr, a, i, y + i * N + n, N); break;
          case 1: row_dot<T, 1>(wr, a, i, y + i * N + n, N); break;
          default: break;
        }
      }
    }
  });
}

int64_t block_bytes(int64_t type) {
  switch (type) {
    case Q4_0: return Block<Q4_0>::bytes;
    case Q4_1: return Block<Q4_1>::bytes;
    case Q5_0: return Block<Q5_0>::bytes;
    case Q5_1: return Block<Q5_1>::bytes;
    case Q8_0: return Block<Q8_0>::bytes;
    default: return 0;
  }
}

}  // namespace

// x: fp32 [M, K]; w: uint8 [N, K / 32 * block bytes] (GGML rows as stored) -> fp32 [M, N]
at::Tensor ggml_mm(const at::Tensor& x_in, const at::Tensor& w, int64_t type) {
  const int64_t bb = block_bytes(type);
  TORCH_CHECK(bb > 0, "ggml_mm: unsupported GGML type ", type);
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "ggml_mm: x must be fp32 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(),
              "ggml_mm: w must be contiguous uint8 [N, row_bytes]");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(K % QK == 0 && w.size(1) == K / QK * bb, "ggml_mm: x has K=", K,
              " but the weight rows hold ", w.size(1), " bytes");
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  QuantAct a = quantize(x.data_ptr<float>(), M, K);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  switch (type) {
    case Q4_0: gemm<Q4_0>(a, wp, w.size(1), M, N, yp); break;
    case Q4_1: gemm<Q4_1>(a, wp, w.size(1), M, N, yp); break;
    case Q5_0: gemm<Q5_0>(a, wp, w.size(1), M, N, yp); break;
    case Q5_1: gemm<Q5_1>(a, wp, w.size(1), M, N, yp); break;
    case Q8_0: gemm<Q8_0>(a, wp, w.size(1), M, N, yp); break;
  }
  return y;
}

}  // namespace quantrt_cpu
