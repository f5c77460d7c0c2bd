"""HQQ in its own save format (``AutoHQQHFModel.save_quantized``): config.json without
quantization_config, and ``qmodel.pt``, a ``{module: state dict}`` pickle of plain tensors
and metadata (what formats/hqq_checkpoint.py reads with ``weights_only=True``)."""
from __future__ import annotations

import os
from typing import Any

import torch

from formats import hqq as hqq_format
from formats.hqq_checkpoint import QMODEL
from quantrt.convert.intq import IntWeight
from quantrt.convert.output import write_json
from quantrt.convert.writer_base import Writer, module_of
from quantrt.errors import UnsupportedError


class HQQWriter(Writer):
    def __init__(self, req, source, out_dir) -> None:
        super().__init__(req, source, out_dir)
        self.modules: dict[str, dict[str, Any]] = {}

    def add_tensor(self, name: str, t: torch.Tensor) -> None:
        module, _, key = name.rpartition(".")
        self.modules.setdefault(module, {})[key] = self.cast(t)

    def add_linear(self, name: str, w: torch.Tensor, iw: IntWeight | None = None) -> None:
        g = self.req.group_size if self.req.group_size > 0 else None
        if g is not None and w.numel() % g:
            raise UnsupportedError(f"{name}: HQQ groups of {g} do not tile its {w.numel()} "
                                   "values", hint="choose a group size that divides K")
        bits = self.req.bits
        packing = hqq_format.BIT_TO_PACKING[bits]
        r, _ = hqq_format.view_shape(tuple(w.shape), g, 1)
        per = hqq_format.PACKINGS[packing][1]
        if packing != "3bit_32" and r % per:
            raise UnsupportedError(f"{name}: HQQ {packing} packs {per} groups per byte and "
                                   f"the weight has {r}", hint="choose another group size")
        w_q, scale, zero = hqq_format.quantize(w, bits, g, axis=1)
        state = self.modules.setdefault(module_of(name), {})
        state.update({
            "W_q": w_q, "nbits": bits, "group_size": g, "shape": torch.Size(w.shape),
            "scale": scale.to(self.dtype), "zero": zero.to(self.dtype), "axis": 1,
            "packing": packing, "unpack_view_dtype": hqq_format.PACKINGS[packing][2],
            "view_as_float": False, "quant_scale": False, "quant_zero": False,
            "compute_dtype": self.dtype, "offload_meta": False, "stores_quant_config": True,
            "channel_wise": True, "optimize": False, "round_zero": False})

    def finish(self) -> None:
        torch.save(self.modules, os.path.join(self.out_dir, QMODEL))
        cfg = dict(self.source.config)
        cfg["torch_dtype"] = cfg["dtype"] = self.req.dtype
        write_json(os.path.join(self.out_dir, "config.json"), cfg)
        self.source.write_side_files(self.out_dir)
