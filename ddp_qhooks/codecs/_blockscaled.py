"""Shared machinery of the codecs that send one float32 scale per block and a small integer
code per value meaning {-1, 0, +1} x scale (``ternary``, ``sign``): option checks, cache-sized
pieces, vectorised comparisons (numpy on CPU), chunked encode/decode,
and the optional fused kernels (``compile=True``, one scale per bucket, CPU)."""
from __future__ import annotations

import functools
import math
from typing import ClassVar, Sequence

import numpy as np
import torch

from . import _fused, _random
from .base import Codec, EncodeInfo, Layout, reads_on_host, sum_sq_checked
from .blocks import DEFAULT_BLOCK_SIZE, blocks_for, check_block_size
from .options import as_int
from ._scratch import PerThreadScratch
from .packing import STRIPE

_FP32_MAX = float(torch.finfo(torch.float32).max)
_FP32_MIN_NORMAL = float(torch.finfo(torch.float32).tiny)
# elements per piece on the CPU: the float32/bool temporaries of a piece stay cache-resident
CHUNK = STRIPE // 4


# -- option checks -----------------------------------------------------------------------------
def native_bits(codec: str, bits, native: int) -> int:
    """``bits`` must be 8 (what the hook passes to every codec) or the codec's own code width."""
    value = as_int(bits)
    if isinstance(value, bool) or not isinstance(value, int) or value not in (8, native):
        raise ValueError(f"{codec}: sends {native}-bit codes, so bits={bits!r} is not available; omit bits "
                         f"or pass bits={native} (for other widths use stochastic or uniform)")
    return native


# -- pieces and elementwise helpers ----------------------------------------------------------------
@functools.lru_cache(maxsize=512)
def pieces(layout: Layout, block_size, chunk: int) -> tuple[tuple[int, int, int, int], ...]:
    """``(start, rows, cols, block)`` pieces of at most ``chunk`` values (or one whole block) that
    cover the bucket in order: ``rows`` whole blocks of ``cols`` values from block index ``block``,
    or (``rows == 1``) a part of one block longer than ``chunk``."""
    out = []
    for start, nb, blen, first in blocks_for(layout, block_size).runs:
        if blen > chunk:
            for b in range(nb):
                for a in range(0, blen, chunk):
                    out.append((start + b * blen + a, 1, min(chunk, blen - a), first + b))
        else:
            per = chunk // blen
            for r in range(0, nb, per):
                out.append((start + r * blen, min(per, nb - r), blen, first + r))
    return tuple(out)


# torch's comparisons into bool tensors are ~5x slower than numpy's on the CPU; results are
# identical (IEEE comparisons are exact), so the CPU uses numpy on the same memory.  The tests
# clear NUMPY_ON_CPU to run the accelerators' torch path on the CPU.
NUMPY_ON_CPU = True


def _numpy(t: torch.Tensor) -> bool:
    return NUMPY_ON_CPU and t.device.type == "cpu"


def _gt(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    if _numpy(out):
        np.greater(a.numpy(), b.numpy(), out=out.numpy())
    else:
        torch.gt(a, b, out=out)


def _le(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    if _numpy(out):
        np.less_equal(a.numpy(), b.numpy(), out=out.numpy())
    else:
        torch.le(a, b, out=out)


def _negative(x: torch.Tensor, out: torch.Tensor) -> None:
    if _numpy(out):
        np.less(x.numpy(), np.float32(0), out=out.numpy())
    else:
        torch.lt(x, 0, out=out)


def _abs(t: torch.Tensor) -> torch.Tensor:
    """``|t|`` in place."""
    if _numpy(t):
        np.abs(t.numpy(), out=t.numpy())
        return t
    return t.abs_()


def _shift_left(flags: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> None:
    """``out = flags << shift`` for bool tensors, as uint8 (0, 1 or 2)."""
    if _numpy(out):
        np.left_shift(flags.numpy().view(np.uint8), shift.numpy().view(np.uint8), out=out.numpy())
    else:
        torch.bitwise_left_shift(flags.view(torch.uint8), shift.view(torch.uint8), out=out)


def _mask(t: torch.Tensor, keep: torch.Tensor) -> None:
    """``t *= keep`` (bool), in place."""
    if _numpy(t):
        np.multiply(t.numpy(), keep.numpy(), out=t.numpy())
    else:
        t.mul_(keep)


# -- shared machinery ----------------------------------------------------------------------------
class BlockScaledCodec(PerThreadScratch, Codec):
    """Codes that decode to ``unit * a``, unit in {-1, 0, +1}, with one float32 ``a`` per block.

    Body: the float32 scales, then the packed codes.  Subclasses implement ``_scales`` (the
    per-block scales and a tensor whose non-finite entries flag a non-finite input), ``_codes``
    (fill the uint8 codes), ``_units`` (codes -> int8 units, in place), ``_pack``, ``_unpack`` and
    ``_codes_nbytes``.  Encoding and decoding walk the bucket in cache-sized :func:`pieces`.

    ``compile=True`` (one scale per bucket, planar codes, CPU, buckets of at least one packing
    stripe): subclasses that set ``_fused_code`` (a module-level ``(plane, scale, dither) -> (int32
    code, unit * scale)``) get one compiled kernel that writes the packed codes (plus the residual
    and its squared sums) of all full stripes, the partial last stripe done eagerly; with
    ``_fused_unit`` (float code -> float unit) the decoder turns unpacked codes into the output in
    one compiled pass per body.  The same values as the eager path (tested).
    """

    native: ClassVar[int] = 8
    _fused_code = None
    _fused_unit = None

    def __init__(self, bits: int = 8, block_size: int | str | None = DEFAULT_BLOCK_SIZE, compile: bool = False):
        super().__init__(native_bits(self.name, bits, self.native))
        self.block_size = check_block_size(self.name, block_size)
        if not isinstance(compile, bool):
            raise ValueError(f"{self.name}: compile must be True or False, got {compile!r}")
        self.compile = compile  # a local speed choice: not part of config(), ranks may differ

    def _chunk(self, numel: int, device: torch.device) -> int:
        """Values per piece: cache-sized on the CPU; the whole bucket on accelerators (one piece per
        run), where launch overhead, not cache size, is what counts."""
        return CHUNK if device.type == "cpu" else max(CHUNK, numel)

    def _pieces(self, layout: Layout, device: torch.device):
        """The pieces of the bucket, and the size of a buffer that holds any one of them."""
        chunk = self._chunk(layout.numel, device)
        return pieces(layout, self.block_size, chunk), min(chunk, layout.numel)

    def body_nbytes(self, layout: Layout) -> int:
        return 4 * len(layout.block_lengths(self.block_size)) + self._codes_nbytes(layout.numel)

    def _dither(self, layout: Layout, key: int, device):
        """Keyed dither of the stochastic modes: one period-long stretch per bucket when the whole
        bucket is one block (its scale depends on the bucketing anyway), else per parameter, so a
        parameter's blocks get the same values wherever it sits in a bucket."""
        if self.block_size is None:
            return _random.PeriodDither(layout.numel, _random.splitmix64(key, layout.param_keys[0]), device)
        return _random.PieceDither(layout, key, device)

    def _fusable(self, xf: torch.Tensor, layout: Layout, out: torch.Tensor | None) -> bool:
        """Can the compiled kernels take this call?  ``out``: the residual (encode) or the output."""
        return (self.compile and not _fused._broken and self.block_size is None
                and xf.device.type == "cpu" and layout.numel >= STRIPE
                and (out is None or (out.dtype == torch.float32 and out.is_contiguous())))

    # -- per-block statistics, in pieces ---------------------------------------------------------
    def _block_absmax(self, xf, layout, s) -> torch.Tensor:
        nb = blocks_for(layout, self.block_size).count
        if nb == 1:  # one read of the bucket, nothing written: max|x| = max(-min, max); NaN propagates
            lo, hi = torch.aminmax(xf)
            return torch.maximum(-lo, hi).view(1)
        scales = torch.zeros(nb, dtype=torch.float32, device=xf.device)
        parts, size = self._pieces(layout, xf.device)
        t_all = s.get("f32", size, torch.float32)
        for start, rows, cols, b in parts:
            t = torch.abs(xf[start:start + rows * cols].view(rows, cols), out=t_all[:rows * cols].view(rows, cols))
            if rows == 1:  # maybe a part of a long block: combine (NaN propagates through both)
                torch.maximum(scales[b:b + 1], t.amax(), out=scales[b:b + 1])
            else:
                torch.amax(t, 1, out=scales[b:b + rows])
        return scales

    def _block_abssum64(self, xf, layout, s) -> torch.Tensor:
        """Per-block sum of |x| accumulated in float64 (no overflow, subnormals kept)."""
        nb = blocks_for(layout, self.block_size).count
        sums = torch.zeros(nb, dtype=torch.float64, device=xf.device)
        parts, size = self._pieces(layout, xf.device)
        t_all = s.get("f32", size, torch.float32)
        for start, rows, cols, b in parts:
            t = torch.abs(xf[start:start + rows * cols].view(rows, cols), out=t_all[:rows * cols].view(rows, cols))
            if rows == 1:
                sums[b:b + 1] += t.sum(dtype=torch.float64)
            else:
                torch.sum(t, 1, dtype=torch.float64, out=sums[b:b + rows])
        return sums

    # -- encode ----------------------------------------------------------------------------------
    def encode(self, x, body, layout, key=0, error_out=None):
        n = layout.numel
        self._check_numel("input", x, layout)
        if n == 0:
            return EncodeInfo(True, 0.0, 0.0) if error_out is not None else EncodeInfo()
        xf = x.detach()
        if xf.dtype != torch.float32:
            xf = xf.float()  # half-precision buckets: compute (and form residuals) in float32
        xf = xf.contiguous().view(-1)
        s = self._scratch_for(xf.device)
        if self._fused_code is not None and self._fusable(xf, layout, error_out):
            info = self._encode_fused(xf, body, layout, key, error_out, s)
            if info is not None:
                return info
        scales, check, aux = self._scales(xf, layout, s)
        # left on the device: a non-finite input still gets (meaningless) codes, the flag marks it
        finite = torch.isfinite(check).all()
        codes = s.get("codes", n, torch.uint8)
        with np.errstate(invalid="ignore", over="ignore"):  # NaN / Inf inputs: flagged above, not warned about
            self._codes(xf, layout, scales, aux, self._dither(layout, key, xf.device) if self.stochastic else None,
                        s, codes)
        scales.abs_()  # turns the -0.0 scale an all-zero block may get into +0.0 (else a no-op)
        nb = scales.numel()
        body[: 4 * nb].copy_(scales.view(torch.uint8))  # byte copy: any alignment of the body
        self._pack(codes, body[4 * nb:])
        if error_out is None:
            return EncodeInfo(finite)
        info = self._residual(xf, layout, scales, self._units(codes), s, error_out)
        return EncodeInfo(finite, info.error_sq, info.input_sq)

    def _encode_fused(self, xf, body, layout, key, error_out, s) -> EncodeInfo | None:
        """The compiled kernel over the full stripes, the partial last stripe eagerly; None when the
        kernels are unavailable (before anything was written)."""
        n, bits = layout.numel, self.native
        scales, check, aux = self._scales_fused(xf, layout, s)
        if scales is None:
            return None
        finite = torch.isfinite(check).all()
        scales.abs_()
        k = 8 // bits
        stripes, m = n // STRIPE, STRIPE // k
        full = stripes * STRIPE
        dither = self._dither(layout, key, xf.device) if self.stochastic else None
        # the dither window broadcasts over period-long rows (stripes and planes are whole periods)
        rows = _random.period_rows if dither is not None else (lambda t: t)
        err = None if error_out is None else error_out.view(-1)
        err_sq = inp_sq = 0.0

        def kernel(start: int, groups: int, plane: int):
            """The kernel on ``groups`` stripes of ``k`` planes of ``plane`` values from ``start``."""
            end, at = start + groups * k * plane, 4 + start // k
            return _fused.unit_encode(self.name, self._fused_code, bits, rows(xf[start:end].view(groups, k, plane)),
                                      scales[0], dither.window if dither is not None else scales[0],
                                      rows(body[at:at + groups * plane].view(groups, plane)),
                                      None if err is None else rows(err[start:end].view(groups, k, plane)))

        sums = kernel(0, stripes, m)
        if sums is False:
            return None
        body[:4].copy_(scales.view(torch.uint8))
        r = n - full
        if r and r % k == 0 and (dither is None or r // k % _random.PERIOD == 0):
            # a partial last stripe of equal planes (packing.planes) is one more stripe for the kernel
            tail = kernel(full, 1, r // k)
            if tail is not False:
                sums, full = ((sums[0] + tail[0], sums[1] + tail[1]) if sums is not None else None), n
        if sums is not None:
            err_sq, inp_sq = float(sums[0]), float(sums[1])
        if full < n:  # the partial last stripe, eagerly (its dither: full is a multiple of the period)
            tail, tail_layout = xf[full:], Layout.flat(n - full)
            codes = s.get("codes", n - full, torch.uint8)
            with np.errstate(invalid="ignore", over="ignore"):
                self._codes(tail, tail_layout, scales, aux, dither, s, codes)
            self._pack(codes, body[4 + stripes * m: 4 + self._codes_nbytes(n)])
            if err is not None:
                info = self._residual(tail, tail_layout, scales, self._units(codes), s, err[full:])
                err_sq, inp_sq = err_sq + info.error_sq, inp_sq + info.input_sq
        return EncodeInfo(finite) if err is None else EncodeInfo(finite, err_sq, inp_sq)

    def _scales_fused(self, xf, layout, s):
        """``_scales`` for the compiled path; ``(None, None, None)`` when its kernel is unavailable."""
        return self._scales(xf, layout, s)

    def _residual(self, xf, layout, scales, units, s, error_out) -> EncodeInfo:
        """``error_out = x - a * unit``: the same float32 products as a decoder of this one body
        with divisor 1; squared sums (statistics) in float32 per cache-resident piece, again in
        float64 where that overflowed or underflowed (``base.sum_sq_checked``)."""
        n = xf.numel()
        direct = error_out.dtype == torch.float32 and error_out.is_contiguous()
        err = error_out.view(-1) if direct else torch.empty(n, dtype=torch.float32, device=xf.device)
        parts, _ = self._pieces(layout, xf.device)
        err_sq = inp_sq = 0.0
        for start, rows, cols, b in parts:
            m = rows * cols
            xv = xf[start:start + m].view(rows, cols)
            e = err[start:start + m].view(rows, cols)
            torch.mul(units[start:start + m].view(rows, cols), scales[b:b + rows, None], out=e)
            torch.sub(xv, e, out=e)
            err_sq += sum_sq_checked(e.view(-1))  # while the piece is in cache
            inp_sq += sum_sq_checked(xv.reshape(-1))
        if not direct:
            error_out.copy_(err.view(error_out.shape))
        return EncodeInfo(True, err_sq, inp_sq)

    # -- decode ----------------------------------------------------------------------------------
    def decode(self, bodies: Sequence[torch.Tensor], layout: Layout, out: torch.Tensor, divisor: int = 1) -> torch.Tensor:
        n = layout.numel
        self._check_numel("output", out, layout)
        if n == 0 or not bodies:
            return out.zero_()
        nb = blocks_for(layout, self.block_size).count
        metas = []
        for body in bodies:
            raw = body[: 4 * nb]
            if raw.storage_offset() % 4:
                raw = raw.clone()  # received bodies sit at arbitrary byte offsets of the gathered buffer
            metas.append(raw.view(torch.float32))
        # each share divided before summing (a sum of huge shares would overflow), in float64
        shares = torch.stack(metas).double().div_(divisor)  # (W, nblocks)
        # float32 unless the sum could overflow or a share is subnormal (it would lose precision);
        # where that read would wait for the device, float64 without the test
        work = torch.float64
        if reads_on_host(out.device):
            mags = shares.abs()
            peak, smallest = torch.stack([mags.sum(0).max(), torch.where(mags > 0, mags, math.inf).min()]).tolist()
            if peak < _FP32_MAX / 2 and smallest >= _FP32_MIN_NORMAL:
                work = torch.float32
        shares = shares.to(work)
        s = self._scratch_for(out.device)
        direct = out.dtype == work and out.is_contiguous()
        if direct:
            acc = out.view(-1)
        else:  # half-precision outputs reuse a float32 buffer; the rare float64 one is not kept
            acc = s.get("acc", n, work) if work == torch.float32 else torch.empty(n, dtype=work, device=out.device)
        if work == torch.float32 and direct and self._fused_unit is not None and self._fusable(acc, layout, out) \
                and self._decode_fused(bodies, layout, shares, acc, nb, s):
            return out
        parts, _ = self._pieces(layout, out.device)
        codes = s.get("codes", n, torch.uint8)  # the encoder's buffer: a thread encodes or decodes
        for r, body in enumerate(bodies):
            units = self._units(self._unpack(body[4 * nb: 4 * nb + self._codes_nbytes(n)], n, codes))
            share = shares[r]
            for start, rows, cols, b in parts:
                m = rows * cols
                u = units[start:start + m].view(rows, cols)
                a = acc[start:start + m].view(rows, cols)
                if r == 0:  # int8 -> float32 copy, then a float32 product: ~1.3x faster than one mixed-type mul
                    a.copy_(u).mul_(share[b:b + rows, None])
                else:
                    a.addcmul_(u, share[b:b + rows, None])
        if not direct:
            out.copy_(acc.view(out.shape))
        return out

    def _decode_fused(self, bodies, layout, shares, acc, nb, s) -> bool:
        """The eager unpacking (integer tricks, fast) and one compiled pass per body from the codes to
        the output; False when the kernel is unavailable (the eager path then rewrites everything)."""
        n = layout.numel
        codes = s.get("codes", n, torch.uint8)
        for r, body in enumerate(bodies):
            self._unpack(body[4 * nb: 4 * nb + self._codes_nbytes(n)], n, codes)
            if not _fused.unit_decode(self.name, self._fused_unit, codes, shares[r, 0], acc, accumulate=r > 0):
                return False
        return True

    # -- subclass hooks --------------------------------------------------------------------------
    def _codes_nbytes(self, numel: int) -> int:
        raise NotImplementedError

    def _scales(self, xf, layout, s) -> tuple[torch.Tensor, torch.Tensor, object]:
        """``(scales, check, aux)``: float32 scales (or a buffer ``_codes`` fills), a tensor whose
        non-finite entries mean a non-finite input, and anything ``_codes`` needs."""
        raise NotImplementedError

    def _codes(self, xf, layout, scales, aux, dither, s, codes) -> None:
        """Fill ``codes``; ``dither``: the stochastic modes' (``_dither``), else None."""
        raise NotImplementedError

    def _pack(self, codes: torch.Tensor, out: torch.Tensor) -> None:
        raise NotImplementedError

    def _unpack(self, packed: torch.Tensor, numel: int, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _units(codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# -- the codec ---------------------------------------------------------------------------------
