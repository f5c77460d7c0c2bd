"""Memory per GPU: sharded weights, KV cache per token and per sequence, the activation
peak of one forward pass, fixed CUDA overheads, and whether it all fits.

The budget follows vLLM's: ``gpu_memory_utilization`` x total memory must hold the weights,
the activation peak of a ``max_num_batched_tokens`` forward pass and the memory torch does
not see (CUDA context, NCCL, CUDA graphs); what is left is KV cache, in blocks of 16 tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from quantrt.errors import ConfigError
from quantrt.estimate.arch import SPLIT, Arch, Weight, weights
from quantrt.parallel.plan import TPRank, coarsest_unit, head_split, split_range
from quantrt.estimate.gpus import GPU, MIB
from quantrt.estimate.layouts import DTYPE_BYTES, Context, Layout, cdiv

BLOCK_SIZE = 16
# "auto" = the compute dtype, as in vLLM; the fp8 names are vLLM's.
KV_CACHE_DTYPES = {"auto": None, "bfloat16": 2, "float16": 2, "fp8": 1, "fp8_e4m3": 1,
                   "fp8_e5m2": 1}
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Overheads:
    """Per-GPU memory outside torch's allocator (defaults: typical CUDA 12 figures)."""

    # Measured on H100s (torch 2.11, CUDA 13): 687-759 MiB outside torch's allocator after
    # a forward pass (driver context, kernel images, cuBLAS handles).
    cuda_context: int = 768 * MIB
    cuda_graphs: int = 512 * MIB      # captured graphs' pools, when graphs are on
    nccl: int = 256 * MIB             # communicator buffers, with more than one GPU

    def __post_init__(self) -> None:
        for name in ("cuda_context", "cuda_graphs", "nccl"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"overhead {name} must be a non-negative number of bytes")

    def total(self, num_gpus: int, cuda_graphs: bool) -> int:
        return (self.cuda_context + (self.cuda_graphs if cuda_graphs else 0)
                + (self.nccl if num_gpus > 1 else 0))


@dataclass(frozen=True)
class Settings:
    num_gpus: int = 1
    max_model_len: int | None = None          # None: the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float = 0.90
    cuda_graphs: bool = True
    compute_dtype: str = "bfloat16"
    overheads: Overheads = field(default_factory=Overheads)

    def __post_init__(self) -> None:
        for name in ("num_gpus", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and (
                isinstance(self.max_model_len, bool) or not isinstance(self.max_model_len, int)
                or self.max_model_len < 1):
            raise ConfigError(f"max_model_len must be a positive integer, "
                              f"got {self.max_model_len!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"unknown kv_cache_dtype {self.kv_cache_dtype!r}",
                              hint=f"one of {', '.join(KV_CACHE_DTYPES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, "
                              f"got {self.compute_dtype!r}")
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not (0 < u <= 1):
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {u!r}")

    @property
    def kv_bytes(self) -> int:
        return KV_CACHE_DTYPES[self.kv_cache_dtype] or DTYPE_BYTES[self.compute_dtype]


def check_parallel(arch: Arch, tp: int) -> None:
    """The split rules of :mod:`quantrt.parallel.plan` (the loader's): heads, KV heads and
    the MLP may split unevenly and KV heads replicate; only fewer heads than GPUs fails."""
    if tp > 1 and arch.heads < tp:
        raise ConfigError(f"{arch.heads} attention heads cannot be split over {tp} GPUs",
                          hint=f"use at most {arch.heads} GPUs")


def _down_group(arch: Arch, layout: Layout, ctx: Context) -> int:
    """down_proj's quantization group along K: the loader cuts the intermediate dimension
    between groups (quantrt.parallel.plan.mlp_cuts)."""
    settings = getattr(layout, "wq_settings", None)
    for w in weights(arch):
        if w.role == "down" and settings is not None and layout.quantizes(w):
            try:
                got = settings(w, w.shape[1])
            except NotImplementedError:
                return 1
            if got is not None and 0 < got[1] < w.shape[1] and not got[2]:
                return got[1]
            return 1
    return 1


def kv_heads_per_gpu(arch: Arch, tp: int) -> int:
    """KV heads of the rank that holds the most (replicated when fewer than GPUs)."""
    if tp == 1:
        return arch.kv_heads
    return max(k1 - k0 for _, (k0, k1) in
               (head_split(arch.heads, arch.kv_heads, TPRank(r, tp)) for r in range(tp)))


def shard(w: Weight, arch: Arch, tp: int, rank: int = 0,
          mlp_unit: int = 1) -> tuple[tuple[int, ...], int, str]:
    """(shape rank ``rank`` holds, full K, how it was split) for weight ``w``; the MLP's
    intermediate dimension is cut at multiples of ``mlp_unit`` (down_proj's group)."""
    split = SPLIT.get(w.role, "none") if tp > 1 else "none"
    shape = w.shape
    full_k = shape[1] if len(shape) == 2 else 0
    if split == "none":
        return shape, full_k, split
    info = TPRank(rank, tp)
    (q0, q1), (k0, k1) = head_split(arch.heads, arch.kv_heads, info)
    unit = coarsest_unit(arch.intermediate, tp, mlp_unit)
    i0, i1 = split_range(arch.intermediate, unit, tp, rank)
    if split == "column":
        rows = (q1 - q0) * arch.head_dim if w.role == "q" else i1 - i0
        shape = (rows, shape[1])
    elif split == "kv":
        shape = ((k1 - k0) * arch.head_dim, shape[1])
    elif split == "row":
        cols = (q1 - q0) * arch.head_dim if w.role == "o" else i1 - i0
        shape = (shape[0], cols)
    elif split == "vocab":
        v0, v1 = split_range(shape[0], 1, tp, rank)
        shape = (v1 - v0, shape[1])
    return shape, full_k, split


@dataclass(frozen=True)
class WeightBytes:
    checkpoint: int          # every tensor on disk, whole model
    loaded: int              # in GPU memory after loading, whole model on one GPU
    per_gpu: int             # in GPU memory on each GPU (largest rank) with tensor parallelism
    quantized_params: int    # parameters stored quantized


def weight_bytes_of(arch: Arch, layout: Layout, tp: int = 1, compute: str = "bfloat16",
                    extra: int = 0) -> WeightBytes:
    """Exact weight bytes of ``arch`` stored with ``layout``; ``extra`` bytes of tensors
    outside the architecture (a GGUF's rope_freqs) count as replicated."""
    ctx = Context(arch, compute)
    disk = loaded = quantized = 0
    per_rank = [0] * tp
    # quantrt's loader never refuses a split: it widens a cut and pads the input instead
    mlp_unit = _down_group(arch, layout, ctx) if tp > 1 else 1
    for w in weights(arch):
        specs = layout.tensors(w, w.shape, w.shape[1] if len(w.shape) == 2 else 0, ctx)
        disk += sum(s.disk_bytes for s in specs)
        loaded += layout.loaded_bytes(w, w.shape, w.shape[1] if len(w.shape) == 2 else 0, ctx)
        if w.is_linear and layout.quantizes(w):
            quantized += w.numel
        for rank in range(tp if tp > 1 else 0):
            shape, full_k, split = shard(w, arch, tp, rank, mlp_unit)
            per_rank[rank] += layout.loaded_bytes(w, shape, full_k, ctx)
    per_gpu = max(per_rank) if tp > 1 else loaded
    return WeightBytes(disk + extra, loaded + extra, per_gpu + extra, quantized)


def kv_bytes_per_token(arch: Arch, tp: int, kv_bytes: int) -> int:
    """K and V of one token in every layer, on one GPU."""
    return 2 * arch.layers * kv_heads_per_gpu(arch, tp) * arch.head_dim * kv_bytes


def kv_bytes_per_sequence(arch: Arch, tp: int, kv_bytes: int, length: int) -> int:
    """KV cache one ``length``-token sequence occupies on one GPU: whole blocks, and
    sliding-window layers hold at most their window."""
    per_layer = 2 * kv_heads_per_gpu(arch, tp) * arch.head_dim * kv_bytes
    total = 0
    for i in range(arch.layers):
        window = arch.window(i)
        tokens = length if window is None else min(length, window)
        total += cdiv(tokens, BLOCK_SIZE) * BLOCK_SIZE * per_layer
    return total


# quantrt's prefill attention is PyTorch's SDPA with a mask, which for grouped-query heads
# takes the math path: fp32 scores and probabilities for every (head, query, key), about
# 10 bytes each (measured on an H100: 737 MB peak for a 2048-token prefill of a 16-head
# model, of which 671 MB is this term).
ATTENTION_SCORE_BYTES = 10
# Sampler bytes per (row, vocabulary entry): fp32 logits, a descending sort for top-k/top-p
# (fp32 values and int64 indices), probabilities and their cumulative sum.
SAMPLER_BYTES_PER_LOGIT = 4 + 4 + 8 + 4 + 4


# quant_kernels.triton_wq.DENSE_FROM_M, the fewest tokens for which the integer kernels may
# take their dequantize + cuBLAS path (kept here so estimates need no Triton import;
# tests/test_estimate_kernels.py checks that the two agree)
DENSE_FROM_M = 65


def activation_peak(arch: Arch, tp: int, layout: Layout, tokens: int, seqs: int,
                    act_bytes: int) -> int:
    """Peak of live activations in one forward pass of ``tokens`` tokens, one GPU.

    The largest of three stages, plus the kernels' first-use workspace.  Attention:
    residual and normed input, Q/K/V, the K/V gathered from the paged cache, the scores
    (ATTENTION_SCORE_BYTES) and the output.  MLP: residual and input, gate/up output and
    their product (MoE: fp32 router logits and the fused-MoE caches of top-k copies), plus
    one dequantized weight for methods whose kernels dequantize at large batch.  Sampler:
    ``seqs`` rows over the whole vocabulary (gathered on every GPU).
    """
    h, a = arch.hidden, act_bytes
    q, kv = arch.q_size // tp, kv_heads_per_gpu(arch, tp) * arch.head_dim
    f = arch.intermediate // tp
    base = 2 * tokens * h * a
    heads = arch.heads // tp
    attention = (base + tokens * (2 * q + 4 * kv) * a
                 + heads * tokens * tokens * ATTENTION_SCORE_BYTES)
    if arch.experts:
        mlp = base + tokens * arch.experts * 4 + tokens * arch.experts_per_token * (3 * f + h) * a
    else:
        mlp = base + tokens * 3 * f * a
    if layout.dequantizes_weights:
        biggest = max(w.numel for w in weights(arch) if w.is_linear and w.role != "lm_head")
        mlp += biggest // tp * a
    sampler = min(seqs, tokens) * arch.vocab * SAMPLER_BYTES_PER_LOGIT + tokens * h * a
    workspace = layout.kernel_workspace
    if workspace and tokens >= DENSE_FROM_M and not layout.dequantizes_weights:
        # A batch this large may take the integer kernels' dequantize + cuBLAS path, which
        # does not autotune: its transient is one dense copy of the largest quantized weight
        # (measured on the H100: 1B/8B-shape AWQ prefill peaks equal bf16's plus that copy).
        biggest = max(w.numel for w in weights(arch) if w.is_linear and w.role != "lm_head")
        workspace = biggest // tp * a
    return max(attention, mlp, sampler) + workspace


@dataclass(frozen=True)
class Fit:
    usable: int                   # gpu_memory_utilization x memory, per GPU
    kv_budget: int                # what is left for KV cache, per GPU (may be negative)
    kv_tokens: int                # tokens the KV cache holds (whole blocks)
    max_seqs: int                 # concurrent sequences of max_model_len (<= max_num_seqs)
    kv_limited_seqs: int          # the same without the max_num_seqs cap
    fits: bool
    reason: str                   # why not (empty when it fits)


def fit(gpu: GPU, settings: Settings, weights_per_gpu: int, activations: int, overhead: int,
        per_token: int, per_sequence: int, blocker: str = "") -> Fit:
    usable = int(gpu.memory_bytes * settings.gpu_memory_utilization)
    budget = usable - weights_per_gpu - activations - overhead
    tokens = max(0, budget) // (per_token * BLOCK_SIZE) * BLOCK_SIZE
    seqs = max(0, budget) // per_sequence
    capped = min(seqs, settings.max_num_seqs)
    reason = blocker
    if not reason and weights_per_gpu > usable:
        reason = f"weights alone need {_gib(weights_per_gpu)} of {_gib(usable)} usable"
    elif not reason and budget < per_sequence:
        reason = (f"no room for one full-length sequence: its KV cache needs "
                  f"{_gib(per_sequence)}, {_gib(max(0, budget))} left")
    return Fit(usable, budget, tokens, capped, seqs, not reason, reason)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"
