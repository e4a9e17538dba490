"""Cast baselines: ``fp16`` and ``bf16`` (2 bytes per value) and ``none`` (fp32, 4 bytes).

They travel through the same payload / all-gather / error-feedback path as the quantizers, so a
comparison isolates the effect of the number format.  ``none`` is exact: its average equals DDP's
fp32 allreduce (each rank's gradient divided by the world size, then summed).  ``bits`` does not
apply to them and is ignored.  fp16 overflows above 65504: such a value becomes inf and the step is
reported non-finite on every rank, as with AMP.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .base import Codec, EncodeInfo, Layout


class CastCodec(Codec):
    dtype: torch.dtype = torch.float32

    def __init__(self, bits: int | None = None):
        super().__init__(torch.finfo(self.dtype).bits)

    def config(self) -> dict:
        return {"codec": self.name, "bits": self.bits}

    def body_nbytes(self, layout: Layout) -> int:
        return layout.numel * torch.finfo(self.dtype).bits // 8

    def encode(self, x, body, layout, key=0, error_out=None):
        if x.numel() != layout.numel:
            raise ValueError(f"input has {x.numel()} elements, layout describes {layout.numel}")
        values = body.view(self.dtype)
        values.copy_(x)
        if values.numel() and not all(math.isfinite(v) for v in torch.stack(torch.aminmax(values)).tolist()):
            return EncodeInfo(finite=False)
        if error_out is None:
            return EncodeInfo()
        torch.sub(x, values, out=error_out)
        xf = x.float()
        return EncodeInfo(True, float(torch.dot(error_out.float(), error_out.float())), float(torch.dot(xf, xf)))

    def decode(self, bodies: Sequence[torch.Tensor], layout: Layout, out: torch.Tensor, divisor: int = 1):
        acc = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32, device=out.device)
        for i, body in enumerate(bodies):
            values = body.view(self.dtype)
            if i == 0:
                torch.div(values, divisor, out=acc)
            else:
                acc.add_(values.float().div_(divisor))
        if acc is not out:
            out.copy_(acc)
        return out


class NoneCodec(CastCodec):
    """fp32 through the all-gather path (debugging / reference)."""

    name = "none"
    codec_id = 3
    dtype = torch.float32


class Fp16Codec(CastCodec):
    name = "fp16"
    codec_id = 4
    dtype = torch.float16


class Bf16Codec(CastCodec):
    name = "bf16"
    codec_id = 5
    dtype = torch.bfloat16
