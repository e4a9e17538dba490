"""The per-block path of ``uniform`` / ``stochastic`` (``block_size`` "layer" or an integer, and
the one-block fallback for grids that need float64), and the chunk buffers both paths share.

On the CPU a bucket is processed in chunks of ``CHUNK`` values (whole packing stripes) through
reused per-thread scratch buffers; accelerators use whole-bucket tensor ops (``*_generic``, also
the reference the chunked path equals bitwise).  Each call reads the device once: the encoder its
blocks' finiteness with the float32 test, the decoder the working type with the sign of the spans.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from . import _random
from .base import EncodeInfo, Layout, _stats_off, reads_on_host, sum_sq as _sq
from .blocks import blocks_for
from .packing import STRIPE, pack_codes, packed_nbytes, unpack_codes

_FP32_MAX = torch.finfo(torch.float32).max
_MIN_NORMAL_STEP = 2.0 ** -100  # smaller steps lose bits in float32 products: use float64
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

    def bucket(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A bucket-sized buffer, grown on demand (the one-block norm's scaled copy)."""
        bufs = self.__dict__.setdefault("_buckets", {})
        t = bufs.get((name, dtype))
        if t is None or t.numel() < numel:
            t = bufs[(name, dtype)] = torch.empty(numel, dtype=dtype, device=self.f32.device)
        return t[:numel]

    def whole(self, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket-sized uint8 codes + packing lanes (compiled path, which works on whole buckets)."""
        if getattr(self, "_whole", None) is None or self._whole[0].numel() < numel:
            self._whole = (torch.empty(numel, dtype=torch.uint8, device=self.f32.device),
                           torch.empty((numel + 7) // 4, dtype=torch.int64, device=self.f32.device))
        return self._whole[0][:numel], self._whole[1]



class BlockPath:
    """The per-block methods of :class:`~ddp_qhooks.codecs.uniform.UniformCodec` (a mixin: it uses the
    codec's ``levels``, ``bits``, ``stochastic``, ``block_size``, ``_range_run`` and ``_scratch_for``)."""

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
        if not reads_on_host(x.device):
            return self._encode_blocks_generic(x, meta, codes, layout, block_size, key, error_out, meta_done)
        if not meta_done:
            self._block_ranges(x, meta, runs)
        grid = self._block_grid(meta, check_finite=not meta_done)
        if grid is None:
            return EncodeInfo(finite=False)
        work, lo_w, inv, scale, _ = grid
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
        """(working dtype, lo, levels/span, span/levels, finite) per block: float32 where the grid
        fits it, else float64 (``_grid_ok_fp32``); None when ``check_finite`` and a block is not
        finite.  Finiteness and the float32 test come to the host together: the encoder's one read.
        Where codecs do not read (:func:`reads_on_host`): float64 for every grid, which needs no
        test, and ``finite`` a device flag (None: not checked, or known finite)."""
        lo = meta[:, 0].double()
        span = meta[:, 1].double() - lo
        if not reads_on_host(meta.device):
            inv = torch.where(span > 0, self.levels / span, torch.zeros_like(span))
            flag = torch.isfinite(meta).all() if check_finite else None
            return torch.float64, lo, inv, span / self.levels, flag
        ok = self._grid_ok_fp32(lo, span)
        if check_finite:
            finite, ok = torch.stack([torch.isfinite(meta).all(), ok]).tolist()
            if not finite:
                return None
        work = torch.float32 if bool(ok) else torch.float64
        inv = torch.where(span > 0, self.levels / span, torch.zeros_like(span)).to(work)
        return work, lo.to(work), inv, (span / self.levels).to(work), None

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
        work, lo_w, inv, scale, flag = grid
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
            # clamp: fp round-off at the range ends only (a non-finite block's codes are never
            # decoded: its flag drops the step)
            v.floor_().clamp_(0, self.levels)
            ci[sl].copy_(v.view(-1))
            if err is not None:
                torch.sub(xv, lo_c, out=err[sl].view(nb, blen)).sub_(v.mul_(scale_c))
        pack_codes(ci, self.bits, out=codes)
        if err is None:
            return EncodeInfo() if flag is None else EncodeInfo(finite=flag)
        error_out.copy_(err)
        info = self._error_info(err, x, meta)
        return info if flag is None else EncodeInfo(flag, info.error_sq, info.input_sq)

    @staticmethod
    def _error_info(err, x, meta) -> EncodeInfo:
        """The squared sums of the residual and the input, whose magnitudes ``meta`` bounds (its read
        is skipped with the statistics)."""
        if _stats_off():
            return EncodeInfo(True, math.nan, math.nan)
        mag = float(meta.abs().max()) if meta.numel() else 0.0
        return EncodeInfo(True, _sq(err, mag), _sq(x, mag))

    def _decode_blocks(self, parts, layout, out, divisor, work, negative=None):
        """Per-block decoding; on the CPU in chunks of ``CHUNK`` values through reused scratch
        buffers, with the ops of :meth:`_decode_blocks_generic` element by element (bitwise the
        same): per payload ``codes * scale`` with per-row scales, summed in payload order, then
        ``+ lo_sum``.  ``negative``: whether some span is negative (None: found here)."""
        if not reads_on_host(out.device):
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
