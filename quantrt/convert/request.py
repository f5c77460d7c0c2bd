"""What a ``quantrt convert`` run is asked to produce, checked before any file is read.

Every unsupported combination (3-bit AWQ, act-order without GPTQ, a GGUF type gguf-py
cannot quantize, an output directory that already exists...) is refused here with a
one-line :class:`~quantrt.errors.ConfigError`, so that a bad request never costs a
model load or leaves anything on disk.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from quantrt.errors import ConfigError, SourceError, UnsupportedError

# --to METHOD -> (kind, default bits, allowed bits).  "kind" picks the writer.
METHODS: dict[str, tuple[str, int | None, tuple[int, ...]]] = {
    "gptq": ("gptq", 4, (2, 3, 4, 8)),
    "awq": ("awq", 4, (4,)),
    "ct-w4a16": ("ct-int", 4, (4,)),
    "ct-w8a16": ("ct-int", 8, (8,)),
    "ct-fp8": ("ct-fp8", None, ()),
    "ct-fp8-block": ("ct-fp8", None, ()),
    "fp8": ("fp8", None, ()),
    "bnb-nf4": ("bnb", None, ()),
    "bnb-int8": ("bnb", None, ()),
    "hqq": ("hqq", 4, (1, 2, 3, 4, 8)),
    "gguf": ("gguf", None, ()),
    "bf16": ("float", None, ()),
    "fp16": ("float", None, ()),
}
ALGOS = ("rtn", "gptq", "awq")
INT_KINDS = ("gptq", "awq", "ct-int")  # methods whose weights are grouped integers
FP8_SCHEMES = ("tensor", "channel", "block")
# The AWQ recipe `--to awq` runs: clip search only, q/k clipped too.  On the demo model it
# recovers 58% of asymmetric RTN's 4-bit perplexity increase, the published recipe (scale
# search + clip, q/k unclipped: awq_scales=True, awq_clip_qk=False) 28%, AutoAWQ's own
# run of it 20% (BENCHMARKS.md, "Convert: quality").
AWQ_DEFAULTS = {"awq_scales": False, "awq_clip_qk": True}
# GGML types gguf-py 0.19 can quantize itself (gguf.quants.quantize).
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
GGUF_K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K")


@dataclass
class ConvertRequest:
    method: str
    bits: int | None = None
    group_size: int = 128
    sym: bool | None = None           # None: the method's usual choice
    act_order: bool = False
    algo: str | None = None           # None: gptq for --to gptq, awq for --to awq, else rtn
    calib: str | None = None          # text file; None = the built-in text
    calib_samples: int = 32
    calib_seqlen: int = 512
    damp: float = 0.01                # GPTQ dampening, fraction of mean(diag(H))
    true_sequential: bool = True
    awq_scales: bool | None = None    # AWQ: search per-channel scales; None: AWQ_DEFAULTS
    awq_clip_qk: bool | None = None   # AWQ: clip q/k too; None: AWQ_DEFAULTS
    fp8_scheme: str = "tensor"
    fp8_block: tuple[int, int] = (128, 128)
    gguf_type: str = "Q4_0"
    double_quant: bool = False        # bnb-nf4: quantize the absmax too
    dtype: str = "float16"            # dtype of every tensor left unquantized
    shard_bytes: int = 512 << 20      # output held in memory until its shard is written

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown target method {self.method!r}",
                              hint="one of " + ", ".join(METHODS))
        kind, default_bits, allowed = METHODS[self.method]
        if self.method == "bf16" and self.dtype == "float16":
            self.dtype = "bfloat16"
        if self.dtype not in ("float16", "bfloat16", "float32"):
            raise ConfigError(f"--dtype {self.dtype!r}", hint="float16, bfloat16 or float32")
        if self.bits is None:
            self.bits = default_bits
        elif not allowed:
            raise ConfigError(f"--bits does not apply to --to {self.method}",
                              hint="its width is fixed by the format")
        elif self.bits not in allowed:
            raise UnsupportedError(f"{self.bits}-bit {self.method} is not a format the "
                                   f"{self.method} ecosystem loads",
                                   hint="allowed bits: " + ", ".join(map(str, allowed)))
        if self.group_size != -1 and self.group_size <= 0:
            raise ConfigError(f"--group-size {self.group_size}", hint="a positive size, or -1 "
                              "for one group per row")
        if self.method == "ct-w8a16" and self.group_size == 128:
            self.group_size = -1  # llm-compressor's W8A16 preset is per channel
        # An integer source is transcoded as stored unless an algorithm is asked for.
        self.algo_given = self.algo is not None
        if self.algo is None:
            self.algo = {"gptq": "gptq", "awq": "awq"}.get(self.method, "rtn")
        if self.algo not in ALGOS:
            raise ConfigError(f"unknown --algo {self.algo!r}", hint="rtn, gptq or awq")
        if self.algo != "rtn" and kind not in INT_KINDS:
            raise UnsupportedError(f"--algo {self.algo} needs an integer target (gptq, awq, "
                                   f"ct-w4a16, ct-w8a16), not {self.method}",
                                   hint="use --algo rtn")
        if self.sym is None:
            self.sym = kind != "awq" and kind != "hqq"
        if kind == "awq" and self.sym:
            raise UnsupportedError("AWQ checkpoints always carry zero points (asymmetric)",
                                   hint="drop --sym, or use --to gptq / ct-w4a16 for "
                                        "symmetric weights")
        if self.algo == "awq" and self.sym:
            raise UnsupportedError("the AWQ algorithm quantizes asymmetrically", hint="add --asym")
        if self.act_order and self.algo != "gptq":
            raise ConfigError("--act-order only applies to the GPTQ algorithm",
                              hint="add --algo gptq or drop --act-order")
        if self.act_order and self.method == "awq":
            raise UnsupportedError("AWQ checkpoints have no g_idx, so no act-order")
        self._resolve_awq_switches()
        if not 0 < self.damp < 1:
            raise ConfigError(f"--damp {self.damp}", hint="a fraction in (0, 1), e.g. 0.01")
        if self.calib_samples < 1 or self.calib_seqlen < 8:
            raise ConfigError("--calib-samples must be >= 1 and --calib-seqlen >= 8")
        if self.calib is not None:
            if self.algo == "rtn":
                raise ConfigError("--calib is only read by --algo gptq or awq")
            if not os.path.isfile(self.calib):
                raise SourceError("calibration text not found", where=self.calib,
                                  hint="pass a UTF-8 text file, or omit --calib for the "
                                       "built-in text")
            if os.path.getsize(self.calib) == 0:
                raise ConfigError("calibration text is empty", where=self.calib)
        if self.method == "ct-fp8-block":
            self.fp8_scheme = "block"
        elif self.method == "ct-fp8" and self.fp8_scheme == "tensor":
            self.fp8_scheme = "channel"  # llm-compressor's FP8_DYNAMIC preset
        if self.fp8_scheme not in FP8_SCHEMES:
            raise ConfigError(f"--fp8-scheme {self.fp8_scheme!r}", hint=", ".join(FP8_SCHEMES))
        if self.method == "gguf":
            t = self.gguf_type.upper()
            if t in GGUF_K_QUANTS:
                raise UnsupportedError(f"gguf-py cannot quantize {t} (it only dequantizes "
                                       "K-quants)", hint="use Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0, "
                                       "or llama.cpp's llama-quantize on our F16 GGUF")
            if t not in GGUF_TYPES:
                raise ConfigError(f"--gguf-type {self.gguf_type!r}", hint=", ".join(GGUF_TYPES))
            self.gguf_type = t
        if self.double_quant and self.method != "bnb-nf4":
            raise ConfigError("--double-quant only applies to --to bnb-nf4")

    def _resolve_awq_switches(self) -> None:
        """A switch left unset (None) takes AWQ_DEFAULTS; one set explicitly for another
        algorithm is refused, like --act-order without GPTQ: it would be ignored."""
        given = [("--" if v else "--no-") + f.replace("_", "-")
                 for f in AWQ_DEFAULTS if (v := getattr(self, f)) is not None]
        if given and self.algo != "awq":
            verb = "applies" if len(given) == 1 else "apply"
            raise ConfigError(f"{' and '.join(given)} only {verb} to the AWQ algorithm, not "
                              f"--algo {self.algo}", hint="add --algo awq (or --to awq), "
                              "or drop " + " and ".join(given))
        for f, default in AWQ_DEFAULTS.items():
            if getattr(self, f) is None:
                setattr(self, f, default)

    @property
    def kind(self) -> str:
        return METHODS[self.method][0]

    @property
    def calibrated(self) -> bool:
        return self.algo != "rtn"

    def check_output(self, out: str | os.PathLike) -> None:
        """The output must not exist (never overwrite a checkpoint); its parent must."""
        out = os.fspath(out)
        if os.path.lexists(out):
            raise ConfigError("output already exists", where=out,
                              hint="choose a new directory name or remove the old one")
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise SourceError("parent directory of the output does not exist", where=parent)
        if self.method == "gguf" and not out.endswith(".gguf"):
            raise ConfigError("a GGUF output is one file: name it *.gguf", where=out)
