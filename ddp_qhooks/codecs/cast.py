"""Cast baselines: ``fp16`` and ``bf16`` (2 bytes per value) and ``none`` (fp32, 4 bytes).

They travel through the same payload / all-gather / error-feedback path as the quantizers, so a
comparison isolates the effect of the number format.  ``none`` is exact: its average equals DDP's
fp32 allreduce (each rank's gradient divided by the world size, then summed).  ``bits`` does not
apply to them and is ignored.  fp16 overflows above 65504: such a value becomes inf and the step is
reported non-finite on every rank, as with AMP.  bf16 has float32's exponent range but fewer
mantissa bits, so the float32 values of magnitude >= 3.3962e38 (the top half-step below float32
max) round to inf in bf16 and are reported non-finite the same way.
"""
from __future__ import annotations

import threading
from typing import Sequence

import torch

from .base import Codec, EncodeInfo, Layout, finite_flag, sum_sq_checked as _sq


class CastCodec(Codec):
    dtype: torch.dtype = torch.float32

    def __init__(self, bits: int | None = None):
        native = torch.finfo(self.dtype).bits
        # 8 is register()'s default for every codec; anything else must be this format's width
        if bits is not None and (isinstance(bits, bool) or bits not in (8, native)):
            raise ValueError(f"{self.name}: always sends {native}-bit values, so bits={bits!r} is not available; "
                             f"omit bits or pass bits={native}")
        super().__init__(native)
        self._shares: dict[tuple, torch.Tensor] = {}  # decode's float32 share buffer, per thread and device

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_shares"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._shares = {}

    def config(self) -> dict:
        return {"codec": self.name, "bits": self.bits}

    def body_nbytes(self, layout: Layout) -> int:
        return layout.numel * torch.finfo(self.dtype).bits // 8

    def encode(self, x, body, layout, key=0, error_out=None):
        self._check_numel("input", x, layout)
        values = body.view(self.dtype)
        values.copy_(x)
        # decided on the device (min and max carry any NaN or Inf): no host read
        finite = finite_flag(values)
        if error_out is None:
            return EncodeInfo(finite)
        xf = x.float()
        torch.sub(xf, values, out=error_out)
        return EncodeInfo(finite, _sq(error_out), _sq(xf))

    def decode(self, bodies: Sequence[torch.Tensor], layout: Layout, out: torch.Tensor, divisor: int = 1):
        self._check_numel("output", out, layout)
        if not bodies:
            return out.zero_()
        # every share is widened to float32 BEFORE dividing, as DDP's fp32 allreduce divides
        # float32 gradients; bodies are never modified (they may be views of received buffers)
        acc = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32, device=out.device)
        share = self._share(acc) if len(bodies) > 1 else None
        for i, body in enumerate(bodies):
            target = acc if i == 0 else share
            target.copy_(body.view(self.dtype))
            target.div_(divisor)
            if i:
                acc.add_(share)
        if acc is not out:
            out.copy_(acc)
        return out

    def _share(self, like: torch.Tensor) -> torch.Tensor:
        # one per thread: the caller's thread and the completion thread may decode at once
        key = (like.device, threading.get_ident())
        buf = self._shares.get(key)
        if buf is None or buf.numel() < like.numel():
            buf = self._shares[key] = torch.empty(like.numel(), dtype=torch.float32, device=like.device)
        return buf[:like.numel()].view(like.shape)


class NoneCodec(CastCodec):
    """fp32 through the all-gather path (debugging / reference)."""

    name = "none"
    codec_id = 3
    dtype = torch.float32
    body_formula = "4*n"
    summary = "fp32 through the same all-gather path (reference; = DDP's allreduce)"
    examples = ((8, {}),)
    fidelity_configs = ()  # exact: nothing to measure


class Fp16Codec(CastCodec):
    name = "fp16"
    codec_id = 4
    dtype = torch.float16
    body_formula = "2*n"
    summary = "cast to fp16 (overflows above 65504 are reported non-finite)"
    examples = ((8, {}),)
    fidelity_configs = (("fp16", 8, {}),)


class Bf16Codec(CastCodec):
    name = "bf16"
    codec_id = 5
    dtype = torch.bfloat16
    body_formula = "2*n"
    summary = "cast to bf16"
    examples = ((8, {}),)
    fidelity_configs = (("bf16", 8, {}),)
