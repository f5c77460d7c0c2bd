// Registers the CPU kernels as torch.ops.quantrt_cpu.* (built and loaded by
// quant_kernels/cpu_ext.py).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace quantrt_cpu {
at::Tensor ggml_mm(const at::Tensor& x, const at::Tensor& w, int64_t type);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_mul(const at::Tensor& x);
void write_kv(at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slots);
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& context_lens,
                           const at::Tensor& query_start_loc, double scale, int64_t window,
                           double softcap);
at::Tensor attention_block(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                           at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slots,
                           const at::Tensor& block_tables, const at::Tensor& context_lens,
                           const at::Tensor& query_start_loc, int64_t heads, int64_t kv_heads,
                           double scale, int64_t window, double softcap);
}  // namespace quantrt_cpu

TORCH_LIBRARY(quantrt_cpu, m) {
  m.def("ggml_mm(Tensor x, Tensor w, int type) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("silu_mul(Tensor x) -> Tensor");
  m.def("write_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slots) -> ()");
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, Tensor query_start_loc, float scale, int window, float softcap) -> Tensor");
  m.def("attention_block(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slots, Tensor block_tables, Tensor context_lens, Tensor query_start_loc, int heads, "
        "int kv_heads, float scale, int window, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(quantrt_cpu, CPU, m) {
  m.impl("ggml_mm", &quantrt_cpu::ggml_mm);
  m.impl("rms_norm", &quantrt_cpu::rms_norm);
  m.impl("rope", &quantrt_cpu::rope);
  m.impl("silu_mul", &quantrt_cpu::silu_mul);
  m.impl("write_kv", &quantrt_cpu::write_kv);
  m.impl("paged_attention", &quantrt_cpu::paged_attention);
  m.impl("attention_block", &quantrt_cpu::attention_block);
}
