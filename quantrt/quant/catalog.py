"""Every quantization method quantrt knows by name.

Importing this module registers the implemented methods (their modules subclass
``QuantConfig``).  ``NOT_SUPPORTED`` names the rest of vLLM's ``--quantization`` list so that
a checkpoint using one gets a clear "recognised, not supported" error, never a silent
unquantized load.
"""
from __future__ import annotations

from quantrt.quant import awq as _awq  # noqa: F401
from quantrt.quant import bnb as _bnb  # noqa: F401
from quantrt.quant import compressed_tensors as _compressed_tensors  # noqa: F401
from quantrt.quant import fp8 as _fp8  # noqa: F401
from quantrt.quant import gguf as _gguf  # noqa: F401
from quantrt.quant import gptq as _gptq  # noqa: F401
from quantrt.quant import hqq as _hqq  # noqa: F401
from quantrt.quant import marlin as _marlin  # noqa: F401
from quantrt.quant import unquantized as _unquantized  # noqa: F401

_LATER = "support is planned; meanwhile convert the checkpoint to a supported format"

NOT_SUPPORTED: dict[str, str] = {
    "aqlm": "AQLM additive codebooks are not implemented",
    "qqq": "QQQ (W4A8 with per-group int8) is not implemented",
    "gptq-marlin-24": "2:4 sparse Marlin needs sparse tensor cores; not implemented",
    "deepspeedfp": "DeepSpeed FP6/FP8 weights are not implemented",
    "experts-int8": "MoE expert int8 weights are not implemented",
    "tpu-int8": "needs a TPU",
    "neuron-quant": "needs AWS Neuron hardware",
    "ipex": "needs Intel Extension for PyTorch on Intel hardware",
    "modelopt-fp4": "NVFP4 needs Blackwell GPUs; not implemented",
    "mxfp4": "MXFP4 is not implemented",
    "ptpc-fp8": "per-token-per-channel FP8 (ROCm) is not implemented",
    "bitblas": "BitBLAS kernels are not implemented",
    "gptq-bitblas": "BitBLAS kernels are not implemented",
    "quark": "AMD Quark checkpoints are not implemented",
    "moe-wna16": "MoE WNA16 is not implemented",
    "torchao": "torchao-serialised tensor subclasses are not implemented",
    "auto-round": "AutoRound checkpoints are not implemented",
    "inc": "Intel Neural Compressor checkpoints are not implemented",
    "rtn": "vLLM's online RTN is not implemented",
    "petit-nvfp4": "NVFP4 is not implemented",
    "eetq": "EETQ int8 kernels are not implemented",
    "exl2": "ExLlamaV2 checkpoints are not implemented",
    "higgs": "HIGGS is not implemented",
    "vptq": "VPTQ is not implemented",
    "spqr": "SpQR is not implemented",
    "fp-quant": "FP-Quant is not implemented",
    "bitnet": "BitNet checkpoints are not implemented",
}
