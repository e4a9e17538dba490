"""FSDP's parameter all-gather, pipelined: several collectives of at most ``chunk_size`` values
per rank in flight at once instead of one.

One large Gloo all-gather leaves a slow link idle part of the time (docs/fsdp.md, "Keeping a slow
Gloo link busy"), and FSDP gathers every module's parameters in full precision every step.  The
output is the same rank-major buffer FSDP's own all-gather fills, so its copy-out is unchanged and
the gathered parameters are bitwise the same.  Installed by :func:`~ddp_qhooks.fsdp.register` on
Gloo process groups of CPU models only (NCCL's all-gather keeps its link busy, and streams would
need the pieces ordered)."""
from __future__ import annotations

import torch

from ...engine.chunks import chunk_bounds
from ...exchange import collectives

try:  # torch >= 2.6
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather
except ImportError:  # pragma: no cover - too old a torch: register() says so
    class AllGather:  # type: ignore[no-redef]
        pass


class PipelinedAllGather(AllGather):
    """FSDP's ``AllGather`` interface; completes before it returns (FSDP then reads the output
    as after a synchronous all-gather, also where it asked for ``async_op``)."""

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        bounds = chunk_bounds(input_tensor.numel(), self.chunk_size)
        for work in collectives.allgather_pieces(input_tensor, output_tensor, group, bounds):
            work.wait()
        return None
