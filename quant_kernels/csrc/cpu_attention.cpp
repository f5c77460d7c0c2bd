// Paged causal attention on the CPU for a whole batch in one call: decode rows and prefill
// chunks of any number of sequences (the torch reference loops over sequences in Python,
// ~10 ops each per layer).  Same semantics as models/attention.py's paged_attention_ref:
// query i of a sequence with c cached tokens (this step's included) and n new ones sits
// at position p = c - n + i and sees keys max(0, p - window + 1) ..= p.
//
// One task is (token, kv head): the group of query heads sharing that kv head reads each
// key and value row once.  Each query's result depends only on its own keys, computed in a
// fixed order: batch invariant.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

#include "pool.h"
#include "simd.h"

namespace quantrt_cpu {
namespace {

inline float dot(const float* a, const float* b, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= D; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
  float s = hsum(acc);
  for (; j < D; ++j) s += a[j] * b[j];
  return s;
}

inline void axpy(float* y, float a, const float* x, int64_t D) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t j = 0;
  for (; j + 8 <= D; j += 8)
    _mm256_storeu_ps(y + j, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
  for (; j < D; ++j) y[j] += a * x[j];
}

// p[j] = exp(p[j] - max) in place; returns the sum.
float exp_shifted(float* p, int64_t n, float mx) {
  const __m256 m = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + j), m));
    _mm256_storeu_ps(p + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  float s = hsum(acc);
  for (; j < n; ++j) {
    p[j] = std::exp(p[j] - mx);
    s += p[j];
  }
  return s;
}

}  // namespace

// q [T, heads, D] (strided rows and heads, unit stride inside a head); caches
// [blocks, block_size, kv_heads, D] fp32; block_tables int32 [B, W]; context_lens int32 [B];
// query_start_loc int32 [B + 1].  window <= 0: none; softcap <= 0: none.  -> [T, heads, D]
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& context_lens,
                           const at::Tensor& query_start_loc, double scale, int64_t window,
                           double softcap) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.stride(2) == 1,
              "paged_attention: q must be fp32 [T, heads, D] with unit stride in D");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.scalar_type() == at::kFloat && k_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == at::kFloat &&
                  v_cache.is_contiguous(), "paged_attention: caches must be contiguous fp32 4-D");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                  context_lens.scalar_type() == at::kInt && query_start_loc.scalar_type() == at::kInt,
              "paged_attention: block tables and lengths must be int32");
  const at::Tensor bt = block_tables.contiguous(), cl = context_lens.contiguous(),
                   qs = query_start_loc.contiguous();
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = k_cache.size(0), BS = k_cache.size(1), Hk = k_cache.size(2), W = bt.size(1);
  const int64_t B = cl.size(0);
  TORCH_CHECK(k_cache.size(3) == D && Hk > 0 && H % Hk == 0 && qs.size(0) == B + 1 && bt.size(0) == B,
              "paged_attention: shapes of q, caches and metadata disagree");
  const int32_t* btp = bt.data_ptr<int32_t>();
  const int32_t* clp = cl.data_ptr<int32_t>();
  const int32_t* qsp = qs.data_ptr<int32_t>();
  TORCH_CHECK(qsp[0] == 0 && qsp[B] == T, "paged_attention: query_start_loc must run from 0 to T");
  // per token: its sequence and position
  std::vector<int64_t> seq_of(T), pos_of(T);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = qsp[b + 1] - qsp[b], c = clp[b];
    TORCH_CHECK(n >= 0 && c >= n && (c + BS - 1) / BS <= W, "paged_attention: sequence ", b,
                " has ", c, " tokens for ", n, " new ones and ", W, " table entries");
    for (int64_t b2 = 0; b2 < (c + BS - 1) / BS; ++b2)
      TORCH_CHECK(btp[b * W + b2] >= 0 && btp[b * W + b2] < NB, "paged_attention: block id out of range");
    for (int64_t t = qsp[b]; t < qsp[b + 1]; ++t) {
      seq_of[t] = b;
      pos_of[t] = c - n + (t - qsp[b]);
    }
  }
  const int64_t G = H / Hk;
  at::Tensor out = at::empty({T, H, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);
  // (token, kv head) tasks per chunk: ~64k multiply-adds each, so a decode step of a short
  // context stays on the calling thread
  int64_t keys = 0;
  for (int64_t t = 0; t < T; ++t) keys += pos_of[t] + 1;
  const int64_t per_task = std::max<int64_t>(1, keys / std::max<int64_t>(T, 1) * G * D);
  parallel_range(T * Hk, std::max<int64_t>(1, 65536 / per_task), [&](int64_t lo, int64_t hi) {
    std::vector<float> p;
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t t = item / Hk, hk = item % Hk, b = seq_of[t], pos = pos_of[t];
      const int64_t first = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
      const int64_t n = pos - first + 1;
      p.resize(G * n);
      const int32_t* table = btp + b * W;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t key = first + j;
        const float* krow = kp + ((table[key / BS] * BS + key % BS) * Hk + hk) * D;
        for (int64_t g = 0; g < G; ++g) {
          float s = dot(qp + t * q.stride(0) + (hk * G + g) * q.stride(1), krow, D) * sc;
          if (cap > 0.0f) s = std::tanh(s / cap) * cap;
          p[g * n + j] = s;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* pg = p.data() + g * n;
        float mx = pg[0];
        for (int64_t j = 1; j < n; ++j) mx = std::max(mx, pg[j]);
        const float inv = 1.0f / exp_shifted(pg, n, mx);
        for (int64_t j = 0; j < n; ++j) pg[j] *= inv;
        float* o = op + (t * H + hk * G + g) * D;
        std::memset(o, 0, D * sizeof(float));
      }
      for (int64_t j = 0; j < n; ++j) {
        const int64_t key = first + j;
        const float* vrow = vp + ((table[key / BS] * BS + key % BS) * Hk + hk) * D;
        for (int64_t g = 0; g < G; ++g) axpy(op + (t * H + hk * G + g) * D, p[g * n + j], vrow, D);
      }
    }
  });
  return out;
}

}  // namespace quantrt_cpu

namespace quantrt_cpu {
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
void write_kv(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slots);

// A layer's attention after its qkv projection, as one call: rotary on q and k, K/V into
// the cache, paged attention.  qkv [T, (heads + 2 kv_heads) * D] -> [T, heads * D].
at::Tensor attention_block(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                           at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots,
                           const at::Tensor& block_tables, const at::Tensor& context_lens,
                           const at::Tensor& query_start_loc, int64_t heads, int64_t kv_heads,
                           double scale, int64_t window, double softcap) {
  TORCH_CHECK(qkv.dim() == 2 && k_cache.dim() == 4, "attention_block: expects qkv [T, width]");
  const int64_t T = qkv.size(0), D = k_cache.size(3);
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * D, "attention_block: qkv has width ",
              qkv.size(1), ", expected (", heads, " + 2 * ", kv_heads, ") * ", D);
  const at::Tensor x = qkv.view({T, heads + 2 * kv_heads, D});
  const at::Tensor qk = rope(x.slice(1, 0, heads + kv_heads), cos, sin);
  write_kv(k_cache, v_cache, qk.slice(1, heads), x.slice(1, heads + kv_heads), slots);
  return paged_attention(qk.slice(1, 0, heads), k_cache, v_cache, block_tables, context_lens,
                         query_start_loc, scale, window, softcap)
      .view({T, heads * D});
}
}  // namespace quantrt_cpu
