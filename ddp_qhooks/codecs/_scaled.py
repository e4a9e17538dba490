"""Shared machinery of the codecs that send one float32 scale (max |x|) per block and b-bit codes
that index a fixed table of levels in units of that scale (``log``, ``mulaw``): block scales,
chunked encoding, packing, table-lookup decoding with float64 fallback against overflow."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from . import _fused, _random
from .base import Codec, EncodeInfo, Layout, _stats_off, reads_on_host, sum_sq as _sq
from ._scratch import PerThreadScratch, Scratch
from .blocks import blocks_for, check_block_size
from .options import check_bits, check_choice
from .packing import PLANAR_BITS, pack_codes, packed_nbytes, unpack_codes

_FP32_MAX = float(torch.finfo(torch.float32).max)
_ROUNDINGS = ("nearest", "stochastic")
CHUNK = 1 << 18   # values per elementwise pass on the CPU: temporaries stay in cache, per-op overhead amortised


class _ScaledTableCodec(PerThreadScratch, Codec):
    """One float32 scale ``m = max|x|`` per block, then b-bit codes that decode to ``table[code] * m``.

    Subclasses provide ``_table64()`` (float64, ``2**bits`` relative values in [-1, 1]) and
    ``_codes(rel, rnd, out, s)`` (the codes of ``rel = x / m`` for one chunk).

    ``compile=True`` (one block per bucket, CPU): subclasses that set ``_fused_code`` (a function
    ``(x, m, rnd) -> int32 codes``, the same arithmetic as ``_codes``) get one compiled pass from the
    input to the codes; with ``_fused_value`` (int32 code -> float32 ``table[code]``, exactly) the
    decoder also runs one compiled pass per body.  The stochastic rounding of a one-block bucket
    uses one period-long stretch of dither (see _random), compiled or not."""

    _fused_code = None
    _fused_value = None
    _fused_residual_ok = True   # False: value lookups that cost more in the residual pass than the eager decode
    _fused_fma = False   # True: the compiled encoder may contract a * b + c (not bitwise the eager one)
    _fused_min_scale = 0.0   # block max below which the compiled encoder is not used

    def _fused_scale(self, m: torch.Tensor) -> torch.Tensor:
        """What the compiled ``_fused_code`` takes as its second argument, for the block max ``m``."""
        return m

    def __init__(self, bits: int, block_size, rounding: str, compile: bool = False):
        bits = check_bits(self.name, bits, 2)
        block_size = check_block_size(self.name, block_size)
        rounding = check_choice(self.name, "rounding", rounding, _ROUNDINGS)
        if not isinstance(compile, bool):
            raise ValueError(f"{self.name}: compile must be True or False, got {compile!r}")
        self.compile = compile  # a local speed choice: not part of config(), ranks may differ
        super().__init__(bits)
        self.block_size = block_size
        self.rounding = rounding
        self.stochastic = rounding == "stochastic"
        self._tables: dict[tuple, torch.Tensor] = {}

    def config(self) -> dict:
        return {"codec": self.name, "bits": self.bits, "block_size": self.block_size, "rounding": self.rounding}

    def __getstate__(self):  # tables may live on a device: rebuild them on use (scratch: the mixin)
        state = super().__getstate__()
        state.pop("_tables", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._tables = {}

    def _table(self, device, dtype) -> torch.Tensor:
        key = (torch.device(device), dtype)
        t = self._tables.get(key)
        if t is None:
            t = self._tables[key] = self._table64().to(dtype).to(device)
        return t

    @staticmethod
    def _chunk(device: torch.device, numel: int) -> int:
        # accelerators: one pass over the bucket (launch overhead, not cache size, matters there)
        return CHUNK if device.type == "cpu" else max(numel, 1)

    # -- sizes -------------------------------------------------------------------------------
    def body_nbytes(self, layout: Layout) -> int:
        return 4 * blocks_for(layout, self.block_size).count + packed_nbytes(layout.numel, self.bits)

    def _split(self, body: torch.Tensor, layout: Layout):
        nbytes = self.body_nbytes(layout)
        if body.dtype != torch.uint8 or body.dim() != 1 or body.numel() != nbytes:
            raise ValueError(f"{self.name}: body must be a 1-D uint8 tensor of {nbytes} bytes for {layout}")
        nb = blocks_for(layout, self.block_size).count
        return body[:4 * nb], body[4 * nb:]

    # -- encode ------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, body: torch.Tensor, layout: Layout, key: int = 0,
               error_out: torch.Tensor | None = None) -> EncodeInfo:
        self._check_numel("input", x, layout)
        meta, packed = self._split(body, layout)
        n = layout.numel
        if n == 0:
            return EncodeInfo(True, 0.0, 0.0) if error_out is not None else EncodeInfo()
        xf = x.reshape(-1).float()
        blocks = blocks_for(layout, self.block_size)
        scales = blocks.reduce(xf, "absmax")  # NaN and Inf propagate into the block max
        # left on the device: a non-finite input still gets (meaningless) codes, the flag marks it
        finite = torch.isfinite(scales).all()
        # byte copy: the body slice may sit at any offset, a float32 view of it would need alignment
        meta.copy_(scales.view(torch.uint8))
        s = self._scratch_for(xf.device)
        # divide, never multiply by 1/m: the reciprocal of a subnormal max overflows, and x * (1/m)
        # may exceed 1 in magnitude
        denom = torch.where(scales > 0, scales, torch.ones_like(scales))
        codes = packed if self.bits == 8 else s.get("codes", n, torch.uint8)
        chunk = self._chunk(xf.device, n)
        window = tiled = dither = None
        if self.stochastic and self.block_size is None:
            window = _random.PeriodDither(n, _random.splitmix64(key, layout.param_keys[0]), xf.device).window
        elif self.stochastic:
            dither = _random.param_dither(layout, key, xf.device)
        done = packed_upto = 0  # values with codes (in ``codes`` or packed) / packed by the kernel
        if (self.compile and self._fused_code is not None and self.block_size is None and xf.device.type == "cpu"
                and xf.is_contiguous() and n >= _random.PERIOD and float(denom[0]) >= self._fused_min_scale):
            rnd = window if window is not None else torch.tensor(0.5)
            rows = _random.period_rows  # the dither repeats per period
            scale = self._fused_scale(denom[0])
            if self.bits in PLANAR_BITS:
                # the planes of each stripe OR-ed into packed bytes inside the kernel (see packing.py),
                # the last, shorter stripe too when its planes are whole periods
                parts, outs, upto = _fused.planar_parts(xf, packed, self.bits, _random.PERIOD)
                if parts and _fused.table_planar(self._fused_code, self.bits, parts, scale, rnd, outs,
                                                 self._fused_fma):
                    done = packed_upto = upto
            end = done + (n - done) // _random.PERIOD * _random.PERIOD  # whole periods into codes
            # with a dither window: several rows per load of it (table_rows)
            whole_codes = _fused.table_rows if rnd.dim() else _fused.table_codes
            if end > done and whole_codes(self._fused_code, rows(xf[done:end]), scale, rnd, rows(codes[done:end]),
                                          self._fused_fma):
                done = end
        rel = None
        if blocks.count > 1:  # x / m block by block, over the bucket (chunks do not follow blocks)
            rel = s.get("rel", n, torch.float32)
            for (view, sl), (dst, _) in zip(blocks.views(xf), blocks.views(rel)):
                torch.div(view, denom[sl, None], out=dst)
        if window is not None and done < n:
            # chunks start at multiples of the period: one tiled chunk of dither serves them all
            tiled = s.get("dither", min(chunk, n), torch.float32)
            full = tiled.numel() // window.numel() * window.numel()
            tiled[:full].view(-1, window.numel()).copy_(window)
            tiled[full:].copy_(window[:tiled.numel() - full])
        for a in range(done, n, chunk):  # the rest eagerly (under one period when compiled)
            c = min(chunk, n - a)
            rc = rel[a:a + c] if rel is not None else torch.div(xf[a:a + c], denom[0], out=s.get("rel", min(chunk, n), torch.float32)[:c])
            rnd = 0.5 if not self.stochastic else tiled[:c] if tiled is not None else dither[a:a + c]
            with np.errstate(invalid="ignore", over="ignore"):  # NaN / Inf inputs: flagged, not warned about
                self._codes(rc, rnd, codes[a:a + c], s)
        if self.bits != 8 and packed_upto < n:  # planar packing is stripe-local: the rest packs on its own
            pack_codes(codes[packed_upto:n], self.bits, out=packed[packed_upto * self.bits // 8:])
        if error_out is None:
            return EncodeInfo(finite)
        fused = (self.compile and self._fused_value is not None and self._fused_residual_ok and blocks.count == 1
                 and xf.device.type == "cpu" and n >= _random.PERIOD and error_out.dtype == torch.float32
                 and error_out.is_contiguous() and xf.is_contiguous())
        # the block maxima on the host only where needed: the compiled path's range test, the statistics
        mag = float(scales.max()) if fused or not _stats_off() else None
        if fused and mag < _FP32_MAX / 2:
            # one compiled pass for x - decode(body) and both squared sums, reading the codes sent
            # (the decoder's float32 arithmetic: it decodes in float32 below FP32_MAX / 2)
            sent = packed if self.bits == 8 else unpack_codes(packed, self.bits, n, out=s.get("dcodes", n, torch.uint8))
            sums = _fused.value_residual(self._fused_value, xf, sent, scales[0], error_out.view(-1))
            if sums is not None:
                return EncodeInfo(finite, float(sums[0]), float(sums[1]))
        self.decode([body], layout, error_out)
        torch.sub(xf, error_out, out=error_out)
        if mag is None:
            return EncodeInfo(finite, math.nan, math.nan)
        return EncodeInfo(finite, _sq(error_out, mag), _sq(xf, mag))

    def _codes(self, rel: torch.Tensor, rnd, out: torch.Tensor, s: Scratch) -> None:
        """Write the uint8 codes of ``rel = x / m`` (float32 in [-1, 1]; may be overwritten) into
        ``out``; ``rnd`` is 0.5 (nearest) or the chunk's dither; ``s`` lends chunk temporaries."""
        raise NotImplementedError

    def _table64(self) -> torch.Tensor:
        raise NotImplementedError

    # -- decode ------------------------------------------------------------------------------
    def decode(self, bodies: Sequence[torch.Tensor], layout: Layout, out: torch.Tensor, divisor: int = 1) -> torch.Tensor:
        self._check_numel("output", out, layout)
        n = layout.numel
        if n == 0 or not bodies:
            return out.zero_()
        blocks = blocks_for(layout, self.block_size)
        parts = []
        for body in bodies:
            meta, packed = self._split(body, layout)
            parts.append((meta.clone().view(torch.float32), packed))  # clone: an aligned float32 view
        # |partial sums| <= the summed block maxima: float32 unless that could overflow (one body
        # undivided cannot: |value| <= its block max, no read needed); where reads wait for the
        # device, float64 without the test
        if len(parts) == 1 and divisor == 1:
            work = torch.float32
        elif not reads_on_host(out.device):
            work = torch.float64
        else:
            bound = float(torch.stack([m.abs().max() for m, _ in parts]).double().sum())
            work = torch.float32 if bound < _FP32_MAX / 2 else torch.float64
        table = self._table(out.device, work)
        s = self._scratch_for(out.device)
        direct = out.dtype == work and out.is_contiguous()
        acc = out.view(-1) if direct else s.get("acc", n, work)
        chunk = self._chunk(out.device, n)
        if blocks.count == 1 and direct and work == torch.float32 and self._decode_one_block(parts, acc, chunk, s):
            if divisor != 1:
                acc.div_(divisor)
            return out
        vals = s.get("vals", n, work) if len(parts) > 1 else None
        index = s.get("index", min(chunk, n), torch.int32)
        for i, (scales, packed) in enumerate(parts):
            target = acc if i == 0 else vals
            codes = packed if self.bits == 8 else unpack_codes(packed, self.bits, n, out=s.get("dcodes", n, torch.uint8))
            for a in range(0, n, chunk):
                c = min(chunk, n - a)
                idx = index[:c]
                idx.copy_(codes[a:a + c])
                torch.index_select(table, 0, idx, out=target[a:a + c])
            scales = scales.to(work)
            for view, sl in blocks.views(target):
                view.mul_(scales[sl, None])
            if i:
                acc.add_(vals)
        if divisor != 1:
            acc.div_(divisor)
        if not direct:
            out.copy_(acc.view(out.shape))
        return out

    def _decode_one_block(self, parts, acc, chunk, s) -> bool:
        """One scale per bucket, float32 output: the compiled decoder (``compile=True`` and
        ``_fused_value``), else table lookups scaled and summed chunk by chunk while in cache.  The
        same float32 operations, in the same order, as the general path."""
        n = acc.numel()
        fused = (self.compile and self._fused_value is not None and acc.device.type == "cpu"
                 and n >= _random.PERIOD)
        table = self._table(acc.device, torch.float32)
        index = s.get("index", min(chunk, n), torch.int32)
        vals = s.get("vals", min(chunk, n), torch.float32)
        for i, (scales, packed) in enumerate(parts):
            codes = packed if self.bits == 8 else unpack_codes(packed, self.bits, n, out=s.get("dcodes", n, torch.uint8))
            if fused:
                if _fused.value_decode(self._fused_value, codes, scales[0], acc, accumulate=i > 0):
                    continue
                if i:  # the accumulating kernel failed after the first body: start over eagerly
                    return False
                fused = False
            for a in range(0, n, chunk):
                c = min(chunk, n - a)
                idx = index[:c]
                idx.copy_(codes[a:a + c])
                dst = acc[a:a + c] if i == 0 else vals[:c]
                torch.index_select(table, 0, idx, out=dst)
                dst.mul_(scales[0])
                if i:
                    acc[a:a + c].add_(dst)
        return True


def select_by_bits(bits, values: tuple):
    """``values[i]`` where ``i``'s binary digits, least significant first, are the bool tensors
    ``bits`` (``len(values) == 2 ** len(bits)``), as a binary tree of selects: exact (it picks the
    constants themselves), and vectorised in a compiled kernel, where a gather is one load per value."""
    level = list(values)
    for on in bits:
        level = [torch.where(on, hi, lo) for lo, hi in zip(level[0::2], level[1::2])]
    return level[0]


def select_tree(code: torch.Tensor, values: tuple) -> torch.Tensor:
    """``values[code]`` for int32 ``code`` in ``[0, len(values))`` (a power of two): :func:`select_by_bits`
    on the code's bits."""
    return select_by_bits([(code & (1 << b)) != 0 for b in range(len(values).bit_length() - 1)], values)
