"""Uniform min-max quantization: deterministic round-to-nearest and unbiased stochastic rounding.

Grid: ``L = 2**bits - 1`` equal steps between a block's min ``lo`` and max ``hi``; value ``x`` gets
code ``c`` in ``0..L`` and decodes to ``lo + c * (hi - lo) / L``.  ``uniform`` rounds to the
nearest level (error <= half a step); ``stochastic`` rounds up with probability equal to the
fractional position between two levels, so ``E[decode(encode(x))] = x``.

Body layout (little-endian)::

    nblocks x (lo: float32, hi: float32)      block metadata, in block order
    packed codes                               ceil(numel * bits / 8) bytes, see packing.py

Blocks: by default one block per bucket.  With ``block_size=B`` every parameter of the bucket is cut
into its own blocks of ``B`` elements (the last block of a parameter may be shorter), so blocks never
straddle two parameters and results do not depend on DDP's bucketing.

Speed (one block per bucket): the data is processed in cache-sized chunks; per chunk one fused
``dither + inv * x`` op, one float->int32 truncation, one int32->uint8 narrowing and the integer
packing, so the float input is read from memory once for the min/max and once for the codes.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from . import _random
from .base import Codec, EncodeInfo, Layout
from .packing import VALID_BITS, pack_codes, packed_nbytes, unpack_codes, unpack_view

_FP32_MAX = torch.finfo(torch.float32).max
CHUNK = 1 << 16  # elements per cache-resident chunk (multiple of 8)


class _Scratch:
    """Per-device chunk buffers, reused across calls so the hot loops allocate nothing."""

    def __init__(self, device: torch.device):
        self.f32 = torch.empty(CHUNK, dtype=torch.float32, device=device)
        self.f32b = torch.empty(CHUNK, dtype=torch.float32, device=device)
        self.i32 = torch.empty(CHUNK, dtype=torch.int32, device=device)
        self.u8 = torch.empty(CHUNK, dtype=torch.uint8, device=device)
        self.lanes = torch.empty(CHUNK // 4, dtype=torch.int64, device=device)  # 2*CHUNK bytes
        self.window = torch.empty(_random.POOL_SIZE + CHUNK, dtype=torch.float32, device=device)


class UniformCodec(Codec):
    """Deterministic min-max quantizer, ``bits`` in 1..8, optional per-parameter ``block_size``."""

    name = "uniform"
    codec_id = 1
    stochastic = False

    def __init__(self, bits: int = 8, block_size: int | None = None):
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
            raise ValueError(f"{self.name}: bits must be an integer in 1..8 (one of {VALID_BITS}), got {bits!r}")
        if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0):
            raise ValueError(f"{self.name}: block_size must be a positive integer or None (one block per bucket), got {block_size!r}")
        super().__init__(bits)
        self.block_size = block_size
        self.levels = (1 << bits) - 1
        self._scratch: dict[torch.device, _Scratch] = {}
        self._lengths: dict[tuple, torch.Tensor] = {}

    def config(self) -> dict:
        return {"codec": self.name, "bits": self.bits, "block_size": self.block_size}

    # -- sizes -------------------------------------------------------------------------------
    def body_nbytes(self, layout: Layout) -> int:
        return 8 * len(layout.block_lengths(self.block_size)) + packed_nbytes(layout.numel, self.bits)

    def _split(self, body: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        nblocks = len(layout.block_lengths(self.block_size))
        meta = body[: 8 * nblocks].view(torch.float32).view(nblocks, 2)
        return meta, body[8 * nblocks:]

    def _scratch_for(self, device: torch.device) -> _Scratch:
        s = self._scratch.get(device)
        if s is None:
            s = self._scratch[device] = _Scratch(device)
        return s

    def _lengths_tensor(self, layout: Layout, device) -> torch.Tensor:
        k = (layout.param_numels, self.block_size, str(device))
        t = self._lengths.get(k)
        if t is None:
            t = self._lengths[k] = torch.tensor(layout.block_lengths(self.block_size), dtype=torch.int64, device=device)
        return t

    # -- encode ------------------------------------------------------------------------------
    def encode(self, x, body, layout, key=0, error_out=None):
        if x.numel() != layout.numel:
            raise ValueError(f"input has {x.numel()} elements, layout describes {layout.numel}")
        meta, codes = self._split(body, layout)
        if x.numel() == 0:
            return EncodeInfo(True, 0.0, 0.0) if error_out is not None else EncodeInfo()
        if self.block_size is None:
            return self._encode_one_block(x, meta, codes, _random.splitmix64(key, layout.param_keys[0]), error_out)
        return self._encode_blocks(x, meta, codes, layout, key, error_out)

    def _encode_one_block(self, x, meta, codes, key, error_out):
        lo_t, hi_t = torch.aminmax(x)
        meta[0, 0] = lo_t
        meta[0, 1] = hi_t
        lo, hi = meta[0].tolist()
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return EncodeInfo(finite=False)
        span = hi - lo  # float64: cannot overflow
        inv = self.levels / span if span > 0 else 0.0
        scale = span / self.levels
        if inv > _FP32_MAX / 4 or scale > _FP32_MAX / 4 or abs(lo * inv) > _FP32_MAX / 4:
            # extreme magnitudes: do this bucket in float64 rather than overflow float32
            return self._encode_blocks(x, meta, codes, Layout.flat(x.numel()), key, error_out, force_fp64=True, meta_done=True)
        s = self._scratch_for(x.device)
        bits, levels, n = self.bits, self.levels, x.numel()
        # One fused op per chunk computes v = window + inv * x, where the window holds the offset
        # -lo*inv plus the rounding term: 0.5 (nearest) or the dither (stochastic).  The window is
        # built once per call; stochastic chunks take consecutive pool stretches, so the dither
        # only repeats every POOL_SIZE elements of a bucket.
        bias = -lo * inv
        if self.stochastic:
            span_w = min(n, _random.POOL_SIZE)
            wlen = span_w + min(CHUNK, n) if n > _random.POOL_SIZE else n
            window = s.window[:wlen]
            _random.fill_dither(window, key)
            window.add_(bias)
        else:
            span_w = None
            window = s.window[:min(CHUNK, n)].fill_(bias + 0.5)
        err_sq = inp_sq = 0.0
        for a in range(0, n, CHUNK):
            c = min(CHUNK, n - a)
            xc = x[a:a + c]
            v = s.f32[:c]
            w0 = a % span_w if span_w else 0
            torch.add(window[w0:w0 + c], xc, alpha=inv, out=v)
            ci = s.i32[:c]
            ci.copy_(v)  # truncation == floor here: v > -1 by construction
            if self.stochastic:
                ci.clamp_max_(levels)  # fp32 round-off at the top of the range only
            if bits == 8:
                codes[a:a + c].copy_(ci)
            else:
                cu = s.u8[:c]
                cu.copy_(ci)
                pack_codes(cu, bits, out=codes[a * bits // 8: packed_nbytes(a + c, bits)], scratch=s.lanes)
            if error_out is not None:
                ec = error_out[a:a + c]
                d = s.f32b[:c]
                d.copy_(ci)
                torch.sub(xc, d, alpha=scale, out=ec)
                ec.sub_(lo)
                err_sq += float(torch.dot(ec, ec))
                xf = xc if xc.dtype == torch.float32 else xc.float()
                inp_sq += float(torch.dot(xf, xf))
        if error_out is not None:
            return EncodeInfo(True, err_sq, inp_sq)
        return EncodeInfo()

    def _block_dither(self, layout: Layout, key: int, device) -> torch.Tensor:
        # keyed by (key, parameter identity): independent of where the parameter sits in a bucket
        d = torch.empty(layout.numel, dtype=torch.float32, device=device)
        for off, n, pkey in zip(layout.param_offsets(), layout.param_numels, layout.param_keys):
            _random.fill_dither(d[off:off + n], _random.splitmix64(key, pkey))
        return d

    def _encode_blocks(self, x, meta, codes, layout, key, error_out, force_fp64=False, meta_done=False):
        lengths = self._lengths_tensor(layout, x.device)
        xf = x.to(torch.float64) if force_fp64 else x.float()
        if not meta_done:
            lo = torch.segment_reduce(xf, "min", lengths=lengths)
            hi = torch.segment_reduce(xf, "max", lengths=lengths)
            meta[:, 0] = lo
            meta[:, 1] = hi
            if not bool(torch.isfinite(meta).all()):
                return EncodeInfo(finite=False)
        lo64, hi64 = meta[:, 0].double(), meta[:, 1].double()
        span = hi64 - lo64
        inv = torch.where(span > 0, self.levels / span, torch.zeros_like(span))
        scale = span / self.levels
        if not force_fp64 and bool((inv.abs().max() > _FP32_MAX / 4) | (scale.max() > _FP32_MAX / 4) | ((lo64 * inv).abs().max() > _FP32_MAX / 4)):
            return self._encode_blocks(x, meta, codes, layout, key, error_out, force_fp64=True, meta_done=True)
        work = torch.float64 if force_fp64 else torch.float32
        xf = xf.to(work)
        inv_e = torch.repeat_interleave(inv.to(work), lengths)
        lo_e = torch.repeat_interleave(lo64.to(work), lengths)
        v = (xf - lo_e) * inv_e if force_fp64 else torch.addcmul(-lo_e * inv_e, xf, inv_e)
        if self.stochastic:
            v += self._block_dither(layout, key, x.device).to(work)
        else:
            v += 0.5
        ci = v.floor_().clamp_(0, self.levels).to(torch.uint8)
        pack_codes(ci, self.bits, out=codes)
        if error_out is None:
            return EncodeInfo()
        scale_e = torch.repeat_interleave(scale.to(work), lengths)
        deq = torch.addcmul(lo_e, ci.to(work), scale_e)
        err = (xf - deq)
        error_out.copy_(err)
        return EncodeInfo(True, float(torch.dot(err, err)), float(torch.dot(xf, xf)))

    # -- decode ------------------------------------------------------------------------------
    def decode(self, bodies: Sequence[torch.Tensor], layout: Layout, out: torch.Tensor, divisor: int = 1) -> torch.Tensor:
        if out.numel() != layout.numel:
            raise ValueError(f"output has {out.numel()} elements, layout describes {layout.numel}")
        if layout.numel == 0 or not bodies:
            return out.zero_()
        parts = [self._split(b, layout) for b in bodies]
        if self.block_size is None:
            lohi = torch.stack([m[0] for m, _ in parts]).double()
            span = lohi[:, 1] - lohi[:, 0]
            scales = (span / self.levels / divisor).tolist()
            const = float(lohi[:, 0].sum() / divisor)
            if max(abs(s) for s in scales) * self.levels < _FP32_MAX / 4 and abs(const) < _FP32_MAX / 4:
                return self._decode_one_block([c for _, c in parts], scales, const, out)
        return self._decode_blocks(parts, layout, out, divisor)

    def _decode_one_block(self, codes_list, scales, const, out):
        s = self._scratch_for(out.device)
        bits, n = self.bits, out.numel()
        direct = out.dtype == torch.float32
        offset = s.f32b[:min(CHUNK, n)].fill_(const)
        for a in range(0, n, CHUNK):
            c = min(CHUNK, n - a)
            acc = out[a:a + c] if direct else s.window[:c]
            for i, (codes, scale) in enumerate(zip(codes_list, scales)):
                cu = unpack_view(codes[a * bits // 8: packed_nbytes(a + c, bits)], bits, c, s.lanes)
                f = s.f32[:c]
                f.copy_(cu)
                if i == 0:
                    torch.add(offset[:c], f, alpha=scale, out=acc)
                else:
                    acc.add_(f, alpha=scale)
            if not direct:
                out[a:a + c].copy_(acc)
        return out

    def _decode_blocks(self, parts, layout, out, divisor):
        lengths = self._lengths_tensor(layout, out.device)
        acc = torch.zeros(layout.numel, dtype=torch.float64, device=out.device)
        for meta, codes in parts:
            lo, hi = meta[:, 0].double(), meta[:, 1].double()
            scale_e = torch.repeat_interleave((hi - lo) / self.levels, lengths)
            lo_e = torch.repeat_interleave(lo, lengths)
            ci = unpack_codes(codes, self.bits, layout.numel).double()
            acc += torch.addcmul(lo_e, ci, scale_e)
        acc /= divisor
        return out.copy_(acc)


class StochasticCodec(UniformCodec):
    """Unbiased stochastic rounding on the uniform min-max grid: ``E[decode(encode(x))] = x``.

    Randomness is keyed by the ``key`` passed to ``encode`` (the hook derives it from seed, rank,
    step and bucket/parameter), see :mod:`ddp_qhooks.codecs._random`.
    """

    name = "stochastic"
    codec_id = 2
    stochastic = True
