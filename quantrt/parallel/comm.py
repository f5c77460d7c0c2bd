"""The collectives a tensor-parallel model runs, over ``torch.distributed`` (NCCL on GPUs,
gloo on the CPU).  One :class:`TPGroup` per model: the layers that need a collective hold
it (no process-global state beyond what ``torch.distributed`` itself keeps)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from quantrt.parallel.plan import TPRank


@dataclass(eq=False)
class TPGroup:
    rank: int
    size: int
    group: Any = None           # the model's process group (NCCL or gloo)
    control: Any = None         # a gloo group for host-side messages (step inputs)

    @property
    def info(self) -> TPRank:
        return TPRank(self.rank, self.size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (``x`` must be contiguous and owned by the caller)."""
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_rows(self, x: torch.Tensor, widths: list[int]) -> torch.Tensor:
        """Concatenate each rank's ``[M, widths[r]]`` along the last dim (ranks may hold
        different widths: padded to the widest for the collective, trimmed after)."""
        most = max(widths)
        if x.shape[-1] < most:
            x = torch.nn.functional.pad(x, (0, most - x.shape[-1]))
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat([p[..., :w] for p, w in zip(parts, widths)], dim=-1)

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0 sends ``obj``; every rank returns it."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]
