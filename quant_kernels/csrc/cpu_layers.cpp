// The small per-layer ops of a decoder step, one call each instead of 5-15 torch ops
// (each torch op costs 5-15 us on a small CPU; at batch 1 that is most of a layer).
// Every op computes a row from that row alone, in a fixed order: batch invariant.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "pool.h"
#include "simd.h"

namespace quantrt_cpu {
namespace {

void check_rows(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": ", name, " must be fp32");
  TORCH_CHECK(x.stride(-1) == 1, op, ": ", name, " must be contiguous in its last dimension");
}

}  // namespace

// RMSNorm of x [T, H] (rows may be strided) with weight [H], as LlamaRMSNorm in fp32:
// w * (x * rsqrt(mean(x^2) + eps)).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_rows(x, "rms_norm", "x");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous() &&
                  w.scalar_type() == at::kFloat, "rms_norm: expects x [T, H] and weight [H]");
  const int64_t T = x.size(0), H = x.size(1), ld = x.stride(0);
  at::Tensor y = at::empty({T, H}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  parallel_range(T, std::max<int64_t>(1, 32768 / std::max<int64_t>(H, 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const float* r = xp + t * ld;
      float* o = yp + t * H;
      __m256 acc = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + 8 <= H; j += 8) {
        __m256 v = _mm256_loadu_ps(r + j);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      float ss = hsum(acc);
      for (; j < H; ++j) ss += r[j] * r[j];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + static_cast<float>(eps));
      const __m256 vi = _mm256_set1_ps(inv);
      for (j = 0; j + 8 <= H; j += 8)
        _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_loadu_ps(wp + j),
                                              _mm256_mul_ps(_mm256_loadu_ps(r + j), vi)));
      for (; j < H; ++j) o[j] = wp[j] * (r[j] * inv);
    }
  });
  return y;
}

// Rotate-half (NeoX) rotary embedding of x [T, heads, D] (strided rows and heads, unit
// stride inside a head) over its first rot dims; cos/sin [T, ..., rot] with unit last stride.
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_rows(x, "rope", "x");
  check_rows(cos, "rope", "cos");
  check_rows(sin, "rope", "sin");
  TORCH_CHECK(x.dim() == 3 && cos.size(0) == x.size(0) && sin.size(0) == x.size(0) &&
                  cos.size(-1) == sin.size(-1) && cos.size(-1) <= x.size(2) && cos.size(-1) % 2 == 0,
              "rope: expects x [T, heads, D] and cos/sin [T, ..., rot] with even rot <= D");
  const int64_t T = x.size(0), Hn = x.size(1), D = x.size(2), rot = cos.size(-1), half = rot / 2;
  at::Tensor y = at::empty({T, Hn, D}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), cs = cos.stride(0), ss = sin.stride(0);
  parallel_range(T, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const float* c = cp + t * cs;
      const float* s = sp + t * ss;
      for (int64_t h = 0; h < Hn; ++h) {
        const float* r = xp + t * xs0 + h * xs1;
        float* o = yp + (t * Hn + h) * D;
        int64_t j = 0;
        for (; j + 8 <= half; j += 8) {
          __m256 a = _mm256_loadu_ps(r + j), b = _mm256_loadu_ps(r + j + half);
          _mm256_storeu_ps(o + j, _mm256_sub_ps(_mm256_mul_ps(a, _mm256_loadu_ps(c + j)),
                                                _mm256_mul_ps(b, _mm256_loadu_ps(s + j))));
          _mm256_storeu_ps(o + j + half, _mm256_add_ps(_mm256_mul_ps(b, _mm256_loadu_ps(c + j + half)),
                                                       _mm256_mul_ps(a, _mm256_loadu_ps(s + j + half))));
        }
        for (; j < half; ++j) {
          const float a = r[j], b = r[j + half];
          const float ac = a * c[j], bs = b * s[j], bc = b * c[j + half], as = a * s[j + half];
          o[j] = ac - bs;
          o[j + half] = bc + as;
        }
        for (j = rot; j < D; ++j) o[j] = r[j];
      }
    }
  });
  return y;
}

// silu(x[:, :I]) * x[:, I:] for x [T, 2I] (the gated MLP's activation).
at::Tensor silu_mul(const at::Tensor& x) {
  check_rows(x, "silu_mul", "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "silu_mul: expects x [T, 2I]");
  const int64_t T = x.size(0), I = x.size(1) / 2, ld = x.stride(0);
  at::Tensor y = at::empty({T, I}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  parallel_range(T, std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1)), [&](int64_t lo, int64_t hi) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (int64_t t = lo; t < hi; ++t) {
      const float* g = xp + t * ld;
      const float* u = g + I;
      float* o = yp + t * I;
      int64_t j = 0;
      for (; j + 8 <= I; j += 8) {
        __m256 gv = _mm256_loadu_ps(g + j);
        __m256 sig = _mm256_div_ps(gv, _mm256_add_ps(one, exp256(_mm256_sub_ps(zero, gv))));
        _mm256_storeu_ps(o + j, _mm256_mul_ps(sig, _mm256_loadu_ps(u + j)));
      }
      for (; j < I; ++j) o[j] = g[j] / (1.0f + std::exp(-g[j])) * u[j];
    }
  });
  return y;
}

// Scatter k/v [T, kv_heads, D] (strided rows and heads) into the caches
// [blocks, block_size, kv_heads, D] at flat slots slot_mapping [T].
void write_kv(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slots) {
  check_rows(k, "write_kv", "k");
  check_rows(v, "write_kv", "v");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat &&
                  k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 &&
                  v_cache.sizes() == k_cache.sizes(), "write_kv: caches must be contiguous fp32 4-D");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.is_contiguous(),
              "write_kv: slot_mapping must be int64 [T]");
  const int64_t T = k.size(0), Hk = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.size(0) == slots.size(0) && v.size(0) == T &&
                  k.size(1) == Hk && k.size(2) == D && v.size(1) == Hk && v.size(2) == D,
              "write_kv: k/v must be [T, kv_heads, head_dim] matching the cache");
  const int64_t total = k_cache.size(0) * k_cache.size(1);
  const int64_t* sp = slots.data_ptr<int64_t>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < total, "write_kv: slot ", sp[t], " is outside the cache");
    for (int64_t h = 0; h < Hk; ++h) {
      std::memcpy(kc + (sp[t] * Hk + h) * D, kp + t * k.stride(0) + h * k.stride(1), D * sizeof(float));
      std::memcpy(vc + (sp[t] * Hk + h) * D, vp + t * v.stride(0) + h * v.stride(1), D * sizeof(float));
    }
  }
}

}  // namespace quantrt_cpu
