"""Uniform min-max quantization: deterministic round-to-nearest and unbiased stochastic rounding.

Grid: ``L = 2**bits - 1`` equal steps between a block's min ``lo`` and max ``hi``; value ``x`` gets
code ``c`` in ``0..L`` and decodes to ``lo + c * (hi - lo) / L``.  ``uniform`` rounds to the
nearest level (error <= half a step); ``stochastic`` rounds up with probability equal to the
fractional position between two levels, so ``E[decode(encode(x))] = x``.

Body layout (little-endian)::

    nblocks x (lo: float32, hi: float32)      block metadata, in block order
    packed codes                               ceil(numel * bits / 8) bytes, see packing.py

Blocks (see blocks.py): by default one block per bucket; ``block_size="layer"`` gives one block per
parameter.  With ``block_size=B`` every parameter of the bucket is cut
into its own blocks of ``B`` elements (the last block of a parameter may be shorter), so blocks never
straddle two parameters and results do not depend on DDP's bucketing.

Speed (one block per bucket): the data is processed in cache-sized chunks; per chunk one fused
``window + inv * x`` op (the window holds the offset and the rounding term or dither), one
truncating float->uint8 cast and the integer packing, so the float input is read from memory once
for the min/max and once for the codes.  ``compile=True`` fuses the affine op and the cast.
"""
from __future__ import annotations

import functools
import math
import threading
from typing import Sequence

import numpy as np
import torch

from . import _fused, _random
from .base import Codec, EncodeInfo, Layout, _stats_off, sum_sq as _sq
from .blocks import DEFAULT_BLOCK_SIZE, blocks_for, check_block_size
from .options import check_bits
from .packing import (
    PLANAR_BITS,
    STRIPE,
    VALID_BITS,
    pack_codes,
    packed_nbytes,
    planes,
    unpack_codes,
)

_FP32_MAX = torch.finfo(torch.float32).max
_MIN_NORMAL_STEP = 2.0 ** -100  # smaller steps lose bits in float32 products: use float64
_HALF = torch.tensor([0.5])  # round-to-nearest term of the compiled kernel
CHUNK = STRIPE  # elements per chunk on the CPU: one packing stripe, a multiple of the dither period


class _Scratch:
    """Per-device chunk buffers, reused across calls so the hot loops allocate nothing.

    On the CPU a chunk is CHUNK elements (cache-resident); on accelerators one chunk covers the
    whole bucket, since per-kernel launch cost, not cache size, is what matters there."""

    def __init__(self, device: torch.device, chunk: int):
        self.chunk = chunk
        self.f32 = torch.empty(chunk, dtype=torch.float32, device=device)
        self.f32b = torch.empty(chunk, dtype=torch.float32, device=device)
        self.u8 = torch.empty(chunk, dtype=torch.uint8, device=device)
        self.lanes = torch.empty((chunk + 7) // 4, dtype=torch.int64, device=device)  # >= 2*chunk bytes
        self._window = None

    @property
    def window(self) -> torch.Tensor:
        """Rounding/dither window of the encoder (one dither period <= chunk), or the accumulator
        of a decoder writing a non-float32 output."""
        if self._window is None:
            self._window = torch.empty(self.chunk, dtype=torch.float32, device=self.f32.device)
        return self._window

    def extra(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """A further chunk-sized buffer (float64 work, converted inputs), made on first use."""
        bufs = self.__dict__.setdefault("_extra", {})
        t = bufs.get(name)
        if t is None:
            t = bufs[name] = torch.empty(self.chunk, dtype=dtype, device=self.f32.device)
        return t

    def whole(self, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket-sized uint8 codes + packing lanes (compiled path, which works on whole buckets)."""
        if getattr(self, "_whole", None) is None or self._whole[0].numel() < numel:
            self._whole = (torch.empty(numel, dtype=torch.uint8, device=self.f32.device),
                           torch.empty((numel + 7) // 4, dtype=torch.int64, device=self.f32.device))
        return self._whole[0][:numel], self._whole[1]


class UniformCodec(Codec):
    """Deterministic min-max quantizer, ``bits`` in 1..8, optional per-parameter ``block_size``."""

    name = "uniform"
    codec_id = 1
    stochastic = False
    body_formula = "8*blocks + ceil(n*b/8)"
    summary = "round-to-nearest on a min-max grid of 2^b levels (error <= half a step)"
    examples = ((4, {}),)
    fidelity_configs = (("uniform 8b", 8, {}), ("uniform 4b", 4, {}), ("uniform 2b", 2, {}), ("uniform 1b", 1, {}))

    def __init__(self, bits: int = 8, block_size: int | str | None = DEFAULT_BLOCK_SIZE, compile: bool = False):
        bits = check_bits(self.name, bits, self.valid_bits[0], self.valid_bits[-1])
        block_size = check_block_size(self.name, block_size)
        if not isinstance(compile, bool):
            raise ValueError(f"{self.name}: compile must be True or False, got {compile!r}")
        super().__init__(bits)
        self.block_size = block_size
        self.compile = compile  # a local speed choice: not part of config(), ranks may differ
        self.levels = self._levels_for(bits)  # the grid has levels + 1 points, codes 0..levels
        self._scratch: dict[tuple, _Scratch] = {}
        self._masks: dict[torch.device, torch.Tensor] = {}  # per-plane byte masks of the planar decoder

    valid_bits = VALID_BITS

    @staticmethod
    def _levels_for(bits: int) -> int:
        return (1 << bits) - 1

    def _range_one(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) of the grid for one block: its min and max."""
        return torch.aminmax(x)

    def _range_run(self, view: torch.Tensor, lo_out: torch.Tensor, hi_out: torch.Tensor) -> None:
        """Per-row (lo, hi) of a (blocks, block_len) view, written into float32 metadata."""
        if view.dtype == torch.float32:
            torch.amin(view, 1, out=lo_out)
            torch.amax(view, 1, out=hi_out)
        else:
            lo_out.copy_(view.amin(1))
            hi_out.copy_(view.amax(1))

    def config(self) -> dict:
        return {"codec": self.name, "bits": self.bits, "block_size": self.block_size}

    def __getstate__(self):  # buffers and caches are rebuilt on use; keep pickles small
        return {k: v for k, v in self.__dict__.items() if k not in ("_scratch", "_masks")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._scratch, self._masks = {}, {}

    # -- sizes -------------------------------------------------------------------------------
    def body_nbytes(self, layout: Layout) -> int:
        return 8 * len(layout.block_lengths(self.block_size)) + packed_nbytes(layout.numel, self.bits)

    def _split(self, body: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        nblocks = len(layout.block_lengths(self.block_size))
        meta = body[: 8 * nblocks].view(torch.float32).view(nblocks, 2)
        return meta, body[8 * nblocks:]

    def _scratch_for(self, device: torch.device, numel: int) -> _Scratch:
        # One set per thread: DDP encodes bucket k+1 on the autograd thread while the
        # communication thread decodes bucket k, and torch releases the GIL inside ops.
        chunk = CHUNK if device.type == "cpu" else max(CHUNK, (numel + 7) // 8 * 8)
        key = (device, threading.get_ident())
        s = self._scratch.get(key)
        if s is None or s.chunk < chunk:
            s = self._scratch[key] = _Scratch(device, chunk)
        return s

    def _fits_fp32(self, step_min: float, step_max: float, offset_min: float, value_max: float) -> bool:
        """Can a grid be applied in float32 without overflow, subnormal steps, or codes drowned in
        the round-off of large offsets?  Arguments are extremes over the blocks: the smallest and
        largest non-zero step (``step_max <= 0``: all blocks constant), the smallest non-zero
        ``|lo|`` and the largest ``max(|lo|, |hi|)``."""
        if step_max <= 0:
            return value_max < _FP32_MAX / 4
        if offset_min < _MIN_NORMAL_STEP:
            return False
        return step_max < _FP32_MAX / 4 / self.levels and step_min > _MIN_NORMAL_STEP and value_max < _FP32_MAX / 4

    def _scalar_grid_ok_fp32(self, lo: float, span: float) -> bool:
        """:meth:`_fits_fp32` for one block, in plain Python (no tensor ops on the hot path)."""
        step = span / self.levels
        return self._fits_fp32(step, step, abs(lo) if lo != 0 else math.inf, max(abs(lo), abs(lo + span)))

    def _grid_ok_fp32(self, lo: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
        """:meth:`_fits_fp32` for float64 per-block ``lo`` / ``span`` tensors, as a 0-dim bool tensor
        computed on their device (False where any is NaN)."""
        scale = span / self.levels
        pos = scale > 0
        step_min = torch.where(pos, scale, math.inf).amin()
        step_max = torch.where(pos, scale, 0.0).amax()
        offset_min = torch.where(lo != 0, lo.abs(), math.inf).amin()
        value_max = torch.maximum(lo.abs(), (lo + span).abs()).amax()
        small = value_max < _FP32_MAX / 4
        varying = (offset_min >= _MIN_NORMAL_STEP) & (step_max < _FP32_MAX / 4 / self.levels) & \
            (step_min > _MIN_NORMAL_STEP) & small
        return torch.where(step_max > 0, varying, small)

    # -- encode ------------------------------------------------------------------------------
    def encode(self, x, body, layout, key=0, error_out=None):
        self._check_numel("input", x, layout)
        meta, codes = self._split(body, layout)
        if x.numel() == 0:
            return EncodeInfo(True, 0.0, 0.0) if error_out is not None else EncodeInfo()
        if self.block_size is None:
            return self._encode_one_block(x, meta, codes, _random.splitmix64(key, layout.param_keys[0]), error_out)
        return self._encode_blocks(x, meta, codes, layout, self.block_size, key, error_out)

    def _encode_one_block(self, x, meta, codes, key, error_out):
        if x.dtype != torch.float32:
            x = x.float()  # half-precision buckets: compute (and form residuals) in float32
        lo_t, hi_t = self._range_one(x)
        meta[0, 0] = lo_t
        meta[0, 1] = hi_t
        lo, hi = meta[0].tolist()
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return EncodeInfo(finite=False)
        span = hi - lo  # float64: cannot overflow
        if not self._scalar_grid_ok_fp32(lo, span):
            return self._encode_blocks(x, meta, codes, Layout.flat(x.numel()), None, key, error_out, meta_done=True)
        inv = self.levels / span if span > 0 else 0.0
        scale = span / self.levels
        s = self._scratch_for(x.device, x.numel())
        bits, levels, n = self.bits, self.levels, x.numel()
        chunk = s.chunk
        mag = max(abs(lo), abs(hi))
        # Fast path: ONE fused op per chunk, v = window + inv * x, where the window holds -lo*inv
        # plus the rounding term (0.5 for nearest, the dither for stochastic), then ONE truncating
        # cast to uint8.  The round-off of v is below err code units; when values sit far from
        # zero relative to their spread, subtract lo first (exact for nearby values) instead.
        fast_err = (mag * inv + levels + 2) * 2.0 ** -21   # bound on the round-off of v
        precise = 2 * fast_err > _random.CAP_MARGIN
        bias = 0.0 if precise else -lo * inv
        on_cpu = x.device.type == "cpu"
        period = min(n, _random.PERIOD) if self.stochastic else None
        done, compiled_codes = 0, None
        if self.compile and on_cpu:
            done, compiled_codes = self._encode_compiled(x, codes, key, bias, lo if precise else 0.0, inv, s)
        err_sq = inp_sq = 0.0
        res_upto = 0  # the residual of [0, res_upto) comes from a compiled kernel too
        if done and error_out is not None and error_out.dtype == torch.float32 and error_out.is_contiguous():
            # the prefix whose codes the kernels computed (stochastic non-planar widths did the tail
            # after the last whole period eagerly), in whole chunks
            upto = done if bits in PLANAR_BITS or not self.stochastic else n // period * period
            res_upto = upto // chunk * chunk
            if res_upto:
                sums = self._residual_compiled(x[:res_upto], error_out.view(-1)[:res_upto], key, bias,
                                               lo if precise else 0.0, inv, lo, scale)
                if sums is None:
                    res_upto = 0
                else:
                    err_sq, inp_sq = float(sums[0]), float(sums[1])
        if done == n:
            window = None
        elif self.stochastic:
            # one period of dither (+ offset), small enough to stay in cache while it is applied
            # to every period-long row of the chunk; the pool's cap keeps v = y + u below L + 1
            # despite round-off, so no clamp is needed
            window = _random.fill_dither(s.window[:period], key, add=bias)
        else:
            window = s.window[:min(chunk, n)].fill_(bias + 0.5)  # v <= L + 0.5 + err: no clamp
        # last chunk first: the min/max pass just streamed through x, so its tail is still cached
        for a in reversed(range(0, n, chunk)):
            c = min(chunk, n - a)
            xc = x[a:a + c]
            if a + c <= res_upto:  # codes and residual both compiled
                break
            if a < done:  # the compiled kernel wrote these codes
                if error_out is None:
                    break
                if compiled_codes is not None:
                    cu = compiled_codes[a:a + c]
                else:
                    cu = unpack_codes(codes[a * bits // 8: packed_nbytes(a + c, bits)], bits, c, out=s.u8[:c])
            else:
                cu = codes[a:a + c] if bits == 8 else s.u8[:c]
                v = s.f32[:c]
                src = xc
                if precise:
                    src = torch.sub(xc, lo, out=v)
                if period is None:
                    torch.add(window[:c], src, alpha=inv, out=v)
                else:  # chunks start at multiples of the period: rows line up with the window
                    full = c // period * period
                    torch.add(window, src[:full].view(-1, period), alpha=inv, out=v[:full].view(-1, period))
                    if full < c:
                        torch.add(window[:c - full], src[full:], alpha=inv, out=v[full:])
                if on_cpu:
                    # numpy's float32 -> uint8 cast is vectorised (torch's is not): truncation, and
                    # -1 < v < L + 1 by construction, so truncation == floor and no clamp is needed
                    np.copyto(cu.numpy(), v.numpy(), casting="unsafe")
                else:
                    cu.copy_(v.clamp_(0, levels))
                if bits != 8:
                    pack_codes(cu, bits, out=codes[a * bits // 8: packed_nbytes(a + c, bits)], scratch=s.lanes)
            if error_out is not None:
                ec = error_out[a:a + c]
                d = s.f32b[:c]
                d.copy_(cu)
                torch.sub(xc, lo, out=ec)   # (x - lo) first: accurate for values near lo
                ec.sub_(d, alpha=scale)
                err_sq += _sq(ec, mag)
                inp_sq += _sq(xc, mag)
        if error_out is not None:
            return EncodeInfo(True, err_sq, inp_sq)
        return EncodeInfo()

    def _encode_compiled(self, x, codes, key, bias, shift, inv, s):
        """Compiled kernels over whole buckets (their per-call overhead is ~0.1 ms, so no chunks),
        reading one period of dither straight from the pool, exactly as the chunked path.

        Returns ``(done, codes)``: elements ``[0, done)`` are encoded into ``codes`` (``done`` is 0
        when the kernel is unavailable, and may stop at the last full stripe for the planar widths,
        whose kernel writes packed bytes directly), and their uint8 codes when they exist
        unpacked (else None)."""
        n, bits = x.numel(), self.bits
        rounding = self._rounding(key, n, x.device)
        if bits in PLANAR_BITS:  # whole stripes, and the last one when its planes are whole periods
            parts, outs, upto = _fused.planar_parts(x, codes, bits, _random.PERIOD if self.stochastic else 1)
            ok = parts and _fused.affine_to_planar(parts, rounding, bias, shift, inv, outs, bits)
            return (upto, None) if ok else (0, None)
        cu = codes[:n] if bits == 8 else s.whole(n)[0]
        if self.stochastic:
            period = rounding.numel()
            full = n // period * period
            ok = _fused.affine_to_codes(x[:full].view(-1, period), rounding, bias, shift, inv, cu[:full].view(-1, period))
            if ok and full < n:  # the tail (< one period) in eager ops: a 2nd compiled call costs more
                v = s.f32[:n - full] if n - full <= s.chunk else torch.empty(n - full, dtype=torch.float32)
                torch.add(rounding[:n - full], bias, out=v)
                xt = x[full:] if not shift else x[full:] - shift
                torch.add(v, xt, alpha=inv, out=v)
                np.copyto(cu[full:].numpy(), v.numpy(), casting="unsafe")
        else:
            ok = _fused.affine_to_codes(x.view(1, n), rounding, bias, shift, inv, cu.view(1, n))
        if not ok:
            return 0, None
        if bits != 8:  # in cache-sized pieces: ~2x faster than one pass over the bucket
            for a in range(0, n, CHUNK):
                c = min(CHUNK, n - a)
                pack_codes(cu[a:a + c], bits, out=codes[a * bits // 8: packed_nbytes(a + c, bits)], scratch=s.whole(n)[1])
        return n, cu

    def _residual_compiled(self, x, err, key, bias, shift, inv, lo, scale):
        """The residual and squared sums of the compiled codes of ``x`` (a prefix of whole dither
        periods), or None when the kernel is unavailable."""
        rounding = self._rounding(key, x.numel(), x.device)
        if self.stochastic:
            x, err = x.view(-1, _random.PERIOD), err.view(-1, _random.PERIOD)
        return _fused.affine_residual(x, rounding, bias, shift, inv, lo, scale, err)

    def _rounding(self, key, n, device) -> torch.Tensor:
        """The compiled kernels' rounding term: 1/2, or one period of the keyed dither (the window
        the chunked path applies to every period-long row)."""
        if self.stochastic:
            return _random.PeriodDither(n, key, device).window
        return _HALF.to(device)

    def _encode_blocks(self, x, meta, codes, layout, block_size, key, error_out, meta_done=False):
        """Per-block scales (``block_size`` "layer" or an integer, and the one-block fallback for
        grids that need float64).  On the CPU the bucket is processed in chunks of ``CHUNK`` values
        (whole packing stripes) through reused scratch buffers: per piece of equal-length blocks
        ``t = x - lo`` (written straight into ``error_out`` when it can hold it) and ``v = t * inv``
        with per-row scalars, then per chunk ``v += dither`` (a view of the pool) or ``v += 0.5``,
        one truncating cast to uint8 and the packing, and for the residual ``t -= floor(v) * scale``.
        These are the whole-bucket ops of :meth:`_encode_blocks_generic`, element by element, so
        codes and residuals are bitwise the same."""
        runs = blocks_for(layout, block_size).runs
        if x.device.type != "cpu":
            return self._encode_blocks_generic(x, meta, codes, layout, block_size, key, error_out, meta_done)
        if not meta_done:
            self._block_ranges(x, meta, runs)
        grid = self._block_grid(meta, check_finite=not meta_done)
        if grid is None:
            return EncodeInfo(finite=False)
        work, lo_w, inv, scale = grid
        n, bits = layout.numel, self.bits
        s = self._scratch_for(x.device, n)
        chunk = s.chunk
        if work == torch.float32:
            vbuf, tbuf = s.f32, s.f32b
        else:
            vbuf, tbuf = s.extra("v64", torch.float64), s.extra("t64", torch.float64)
        # inputs whose conversion to the working type is inexact (float64 buckets in float32) are
        # converted first, as the reference does; narrower ones mix exactly into the ops
        convert = x.dtype != work and not (x.dtype in (torch.float16, torch.bfloat16) or
                                           (x.dtype == torch.float32 and work == torch.float64))
        xbuf = s.extra("x" + str(work), work) if convert else None
        # float64 values worked in float64 may lie outside the float32 (lo, hi) of their block, so
        # v may leave [0, L + 1): clamp (then truncation is the reference's floor + clamp)
        clamp = x.dtype == torch.float64 and work == torch.float64
        err, direct = None, False
        if error_out is not None:
            direct = work == torch.float32 and error_out.dtype == torch.float32 and error_out.is_contiguous()
            err = error_out.view(-1) if direct else torch.empty(n, dtype=work, device=x.device)
        dither = _random.PieceDither(layout, key, x.device) if self.stochastic else None
        plan = _chunk_plan(layout, block_size, chunk)
        levels = self.levels
        for a, c, pieces in plan:
            xc = x[a:a + c]
            if convert:
                xc = xbuf[:c].copy_(xc)
            tc = err[a:a + c] if err is not None else tbuf[:c]
            vc = vbuf[:c]
            for off, rows, rl, bk in pieces:
                m = rows * rl
                tv = tc[off:off + m].view(rows, rl)
                torch.sub(xc[off:off + m].view(rows, rl), lo_w[bk:bk + rows, None], out=tv)
                torch.mul(tv, inv[bk:bk + rows, None], out=vc[off:off + m].view(rows, rl))
            if dither is not None:
                vc.add_(dither.piece(a, c, s.window))
            else:
                vc.add_(0.5)
            if clamp:
                vc.clamp_(0, self.levels)
            # 0 <= v < L + 1 (the dither's cap, see _random): truncation == floor, no clamp needed
            cu = codes[a:a + c] if bits == 8 else s.u8[:c]
            np.copyto(cu.numpy(), vc.numpy(), casting="unsafe")
            if bits != 8:
                pack_codes(cu, bits, out=codes[a * bits // 8: packed_nbytes(a + c, bits)], scratch=s.lanes)
            if err is not None:
                vc.floor_()
                for off, rows, rl, bk in pieces:
                    m = rows * rl
                    fv = vc[off:off + m].view(rows, rl)
                    torch.mul(fv, scale[bk:bk + rows, None], out=fv)
                    tc[off:off + m].view(rows, rl).sub_(fv)
        if err is None:
            return EncodeInfo()
        if not direct:
            error_out.copy_(err)
        return self._error_info(err, x, meta)

    def _block_grid(self, meta, check_finite: bool = True):
        """(working dtype, lo, levels/span, span/levels) per block: float32 where the grid fits it,
        else float64 (``_grid_ok_fp32``); None when ``check_finite`` and a block is not finite.
        Finiteness and the float32 test come to the host together: the encoder's one read."""
        lo = meta[:, 0].double()
        span = meta[:, 1].double() - lo
        ok = self._grid_ok_fp32(lo, span)
        if check_finite:
            finite, ok = torch.stack([torch.isfinite(meta).all(), ok]).tolist()
            if not finite:
                return None
        work = torch.float32 if bool(ok) else torch.float64
        inv = torch.where(span > 0, self.levels / span, torch.zeros_like(span)).to(work)
        return work, lo.to(work), inv, (span / self.levels).to(work)

    def _block_ranges(self, x, meta, runs) -> None:
        """Write every block's (lo, hi) into ``meta``."""
        for start, nb, blen, bi in runs:
            view = x[start:start + nb * blen].view(nb, blen)
            self._range_run(view, meta[bi:bi + nb, 0], meta[bi:bi + nb, 1])

    def _encode_blocks_generic(self, x, meta, codes, layout, block_size, key, error_out, meta_done=False):
        """Per-block encoder in whole-bucket tensor ops (accelerators; the reference of the chunked CPU path)."""
        runs = blocks_for(layout, block_size).runs
        if not meta_done:
            self._block_ranges(x, meta, runs)
        grid = self._block_grid(meta, check_finite=not meta_done)
        if grid is None:
            return EncodeInfo(finite=False)
        work, lo_w, inv, scale = grid
        xw = x.to(work)
        dither = _random.param_dither(layout, key, x.device) if self.stochastic else None
        ci = torch.empty(layout.numel, dtype=torch.uint8, device=x.device)
        err = torch.empty(layout.numel, dtype=work, device=x.device) if error_out is not None else None
        for start, nb, blen, bi in runs:
            sl = slice(start, start + nb * blen)
            xv = xw[sl].view(nb, blen)
            lo_c, inv_c, scale_c = lo_w[bi:bi + nb, None], inv[bi:bi + nb, None], scale[bi:bi + nb, None]
            v = (xv - lo_c).mul_(inv_c)       # subtract first: accurate near lo
            if dither is not None:
                v += dither[sl].view(nb, blen).to(work)
            else:
                v += 0.5
            v.floor_().clamp_(0, self.levels)  # clamp: fp round-off at the range ends only
            ci[sl].copy_(v.view(-1))
            if err is not None:
                torch.sub(xv, lo_c, out=err[sl].view(nb, blen)).sub_(v.mul_(scale_c))
        pack_codes(ci, self.bits, out=codes)
        if err is None:
            return EncodeInfo()
        error_out.copy_(err)
        return self._error_info(err, x, meta)

    @staticmethod
    def _error_info(err, x, meta) -> EncodeInfo:
        """The squared sums of the residual and the input, whose magnitudes ``meta`` bounds (its read
        is skipped with the statistics)."""
        if _stats_off():
            return EncodeInfo(True, math.nan, math.nan)
        mag = float(meta.abs().max()) if meta.numel() else 0.0
        return EncodeInfo(True, _sq(err, mag), _sq(x, mag))

    # -- decode ------------------------------------------------------------------------------
    def decode(self, bodies: Sequence[torch.Tensor], layout: Layout, out: torch.Tensor, divisor: int = 1) -> torch.Tensor:
        self._check_numel("output", out, layout)
        if layout.numel == 0 or not bodies:
            return out.zero_()
        parts = [self._split(b, layout) for b in bodies]
        if self.block_size is None:  # scalars in plain Python: no tensor ops on the hot path
            lohi = torch.stack([m[0] for m, _ in parts]).tolist()
            spans = [hi - lo for lo, hi in lohi]
            const = sum(lo for lo, _ in lohi) / divisor
            if abs(const) < _FP32_MAX / 4 and all(self._scalar_grid_ok_fp32(lo / divisor, sp / divisor)
                                                 for (lo, _), sp in zip(lohi, spans)):
                scales = [sp / self.levels / divisor for sp in spans]
                return self._decode_one_block([c for _, c in parts], scales, const, out)
            return self._decode_blocks(parts, layout, out, divisor, torch.float64)
        metas = torch.stack([m for m, _ in parts]).double()  # (W, nblocks, 2)
        lo, span = metas[..., 0], metas[..., 1] - metas[..., 0]
        ok = self._grid_ok_fp32(lo.reshape(-1) / divisor, span.reshape(-1) / divisor) & \
            (lo.abs().sum(0).amax() / divisor < _FP32_MAX / 4)
        # the decoder's one read: the working type, and whether a (never encoded) negative span occurs
        fp32, negative = torch.stack([ok, (span < 0).any()]).tolist()
        return self._decode_blocks(parts, layout, out, divisor, torch.float32 if fp32 else torch.float64, negative)

    def _decode_one_block(self, codes_list, scales, const, out):
        s = self._scratch_for(out.device, out.numel())
        bits, n, chunk = self.bits, out.numel(), s.chunk
        direct = out.dtype == torch.float32
        offset = s.f32b[:min(chunk, n)].fill_(const)
        planar = bits in PLANAR_BITS
        if planar:
            k = 8 // bits
            masks = self._plane_masks(out.device)
            # byte & (mask << shift) == code << shift: instead of unpacking, weight plane p by
            # scale / 2**(p*bits) (exact: a power-of-two rescaling of a normal float32)
            weights = torch.tensor([[scale / (1 << (p * bits)) for p in range(k)] for scale in scales],
                                   dtype=torch.float32).to(out.device).view(len(scales), 1, k, 1)
        for a in range(0, n, chunk):
            c = min(chunk, n - a)
            acc = out[a:a + c] if direct else s.window[:c]
            stripes = c // STRIPE if planar else 0
            e = stripes * STRIPE
            if stripes:
                m = STRIPE // k
                shape = (stripes, k, m)
                buf, f, a3 = s.u8[:e].view(shape), s.f32[:e].view(shape), acc[:e].view(shape)
            for i, (codes, scale) in enumerate(zip(codes_list, scales)):
                packed = codes[a * bits // 8: packed_nbytes(a + c, bits)]
                if not planar:
                    f1 = s.f32[:c]
                    f1.copy_(packed if bits == 8 else unpack_codes(packed, bits, c, out=s.u8[:c]))
                    if i == 0:
                        torch.add(offset[:c], f1, alpha=scale, out=acc)
                    else:
                        acc.add_(f1, alpha=scale)
                    continue
                if stripes:  # all full stripes at once: one AND, one conversion, one multiply-add
                    torch.bitwise_and(packed[:stripes * m].view(stripes, 1, m), masks, out=buf)
                    f.copy_(buf)
                    if i == 0:
                        torch.addcmul(offset[:e].view(shape), f, weights[i], out=a3)
                    else:
                        a3.addcmul_(f, weights[i])
                if e < c:  # a short last stripe, plane by plane
                    for el, by, shift in planes(acc[e:], packed[e * bits // 8:], bits):
                        size = el.numel()
                        f1 = s.f32[:size]
                        f1.copy_(torch.bitwise_and(by[:size], ((1 << bits) - 1) << shift, out=s.u8[:size]))
                        if i == 0:
                            torch.add(offset[e:e + size], f1, alpha=scale / (1 << shift), out=el)
                        else:
                            el.add_(f1, alpha=scale / (1 << shift))
            if not direct:
                out[a:a + c].copy_(acc)
        return out

    def _plane_masks(self, device):
        masks = self._masks.get(device)
        if masks is None:
            k = 8 // self.bits
            masks = torch.tensor([((1 << self.bits) - 1) << (p * self.bits) for p in range(k)], dtype=torch.uint8, device=device)
            self._masks[device] = masks = masks.view(1, k, 1)
        return masks

    def _decode_blocks(self, parts, layout, out, divisor, work, negative=None):
        """Per-block decoding; on the CPU in chunks of ``CHUNK`` values through reused scratch
        buffers, with the ops of :meth:`_decode_blocks_generic` element by element (bitwise the
        same): per payload ``codes * scale`` with per-row scales, summed in payload order, then
        ``+ lo_sum``.  ``negative``: whether some span is negative (None: found here)."""
        if out.device.type != "cpu":
            return self._decode_blocks_generic(parts, layout, out, divisor, work)
        n, bits = layout.numel, self.bits
        s = self._scratch_for(out.device, n)
        chunk = s.chunk
        lo_sum = (sum(meta[:, 0].to(torch.float64) for meta, _ in parts) / divisor).to(work)
        spans = [meta[:, 1].to(torch.float64) - meta[:, 0].to(torch.float64) for meta, _ in parts]
        scales = [(sp / self.levels / divisor).to(work) for sp in spans]
        # the reference sums into zeros: 0 + (-0.0) is +0.0, so a negative scale (never written by
        # the encoder) makes the first payload add to zeros too
        zero_first = bool(torch.stack([(sp < 0).any() for sp in spans]).any()) if negative is None else bool(negative)
        direct = work == torch.float32 and out.dtype == torch.float32 and out.is_contiguous()
        if work == torch.float32:
            fbuf, abuf = s.f32, s.window
        else:
            fbuf, abuf = s.extra("v64", torch.float64), s.extra("t64", torch.float64)
        flat = dst = out.view(-1) if out.is_contiguous() else out
        for a, c, pieces in _chunk_plan(layout, self.block_size, chunk):
            acc = flat[a:a + c] if direct else abuf[:c]
            f = fbuf[:c]
            if zero_first:
                acc.zero_()
            for i, ((_, codes), scale) in enumerate(zip(parts, scales)):
                packed = codes[a * bits // 8: packed_nbytes(a + c, bits)]
                f.copy_(packed if bits == 8 else unpack_codes(packed, bits, c, out=s.u8[:c]))
                first = i == 0 and not zero_first
                for off, rows, rl, bk in pieces:
                    m = rows * rl
                    fv = f[off:off + m].view(rows, rl)
                    torch.mul(fv, scale[bk:bk + rows, None], out=acc[off:off + m].view(rows, rl) if first else fv)
                if not first:
                    acc.add_(f)
            for off, rows, rl, bk in pieces:
                m = rows * rl
                acc[off:off + m].view(rows, rl).add_(lo_sum[bk:bk + rows, None])
            if not direct:
                dst[a:a + c].copy_(acc)
        return out

    def _decode_blocks_generic(self, parts, layout, out, divisor, work):
        """Per-block decoder in whole-bucket tensor ops (accelerators; the reference of the chunked CPU path)."""
        runs = blocks_for(layout, self.block_size).runs
        acc = torch.zeros(layout.numel, dtype=work, device=out.device)
        # offsets summed over ranks in float64 first and added once (exact for constant blocks)
        lo_sum = (sum(meta[:, 0].to(torch.float64) for meta, _ in parts) / divisor).to(work)
        for meta, codes in parts:
            scale = ((meta[:, 1].to(torch.float64) - meta[:, 0].to(torch.float64)) / self.levels / divisor).to(work)
            ci = unpack_codes(codes, self.bits, layout.numel).to(work)
            for start, nb, blen, bi in runs:
                sl = slice(start, start + nb * blen)
                acc[sl].view(nb, blen).add_(ci[sl].view(nb, blen).mul_(scale[bi:bi + nb, None]))
        for start, nb, blen, bi in runs:
            acc[start:start + nb * blen].view(nb, blen).add_(lo_sum[bi:bi + nb, None])
        return out.copy_(acc)


class StochasticCodec(UniformCodec):
    """Unbiased stochastic rounding on the uniform min-max grid: ``E[decode(encode(x))] = x``.

    Randomness is keyed by the ``key`` passed to ``encode`` (the hook derives it from seed, rank,
    step and bucket/parameter), see :mod:`ddp_qhooks.codecs._random`.
    """

    name = "stochastic"
    codec_id = 2
    stochastic = True
    summary = "unbiased stochastic rounding on a min-max grid of 2^b levels"
    examples = ((2, {"block_size": 16}), (8, {"block_size": "layer"}))
    fidelity_configs = (("stochastic 8b", 8, {}), ("stochastic 4b", 4, {}), ("stochastic 2b", 2, {}),
                        ("stochastic 1b", 1, {}), ("stochastic 4b, layer", 4, {"block_size": "layer"}),
                        ("stochastic 4b, block 256", 4, {"block_size": 256}),
                        ("stochastic 2b, block 256", 2, {"block_size": 256}))

    @property
    def error_feedback_diverges(self) -> bool:
        # with 2 levels (min, max) a value can round to the far end, an error of up to twice the
        # block's max |x|: fed back, residuals can double every step (measured: NaN within 13
        # steps on a 25M-parameter MLP).  Unbiased at 1 bit means: use it without error feedback.
        return self.levels == 1


@functools.lru_cache(maxsize=256)
def _chunk_plan(layout: Layout, block_size, chunk: int) -> tuple:
    """The bucket cut into ``(start, length, pieces)`` chunks of ``chunk`` values; a piece
    ``(offset in chunk, rows, row_len, first_block)`` is ``rows`` consecutive blocks (or one part of a
    block cut by the chunk edges) of ``row_len`` values, i.e. one ``(rows, row_len)`` view with one
    scale per row."""
    runs = blocks_for(layout, block_size).runs
    n = layout.numel
    plan, r = [], 0
    for a in range(0, n, chunk):
        e = min(a + chunk, n)
        pieces = []
        while r < len(runs) and runs[r][0] + runs[r][1] * runs[r][2] <= a:
            r += 1
        q = r
        while q < len(runs) and runs[q][0] < e:
            start, nb, blen, bi = runs[q]
            p, stop = max(start, a), min(start + nb * blen, e)
            while p < stop:
                k, within = divmod(p - start, blen)
                if within or stop - p < blen:  # part of one block
                    take = min(blen - within, stop - p)
                    pieces.append((p - a, 1, take, bi + k))
                else:
                    take = (stop - p) // blen * blen
                    pieces.append((p - a, take // blen, blen, bi + k))
                p += take
            q += 1
        plan.append((a, e - a, tuple(pieces)))
    return tuple(plan)
