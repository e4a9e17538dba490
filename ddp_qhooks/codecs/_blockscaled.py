"""Shared machinery of the codecs that send one float32 scale per block and a small integer
code per value meaning {-1, 0, +1} x scale (``ternary``, ``sign``): option checks, cache-sized
pieces, per-thread scratch buffers, vectorised comparisons (numpy on CPU), chunked encode/decode."""
from __future__ import annotations

import functools
import math
import threading
from typing import ClassVar, Sequence

import numpy as np
import torch

from .base import Codec, EncodeInfo, Layout, sum_sq_checked
from .blocks import blocks_for, check_block_size
from .options import as_int
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
        raise ValueError(f"{codec}: has a fixed code width (reported as bits={native}), so bits does not apply "
                         f"(leave it at its default 8 or pass {native}), got {bits!r}")
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


class _Scratch:
    """Per (device, thread) buffers reused across calls: fresh bucket-sized allocations cost page
    faults on every call (more than the arithmetic).  One set per thread because DDP encodes on
    the autograd thread while the communication thread decodes."""

    def __init__(self, device: torch.device):
        self.device = device
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, size: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._bufs.get((name, dtype))
        if buf is None or buf.numel() < size:
            buf = self._bufs[(name, dtype)] = torch.empty(size, dtype=dtype, device=self.device)
        return buf[:size]


# -- shared machinery ----------------------------------------------------------------------------
class BlockScaledCodec(Codec):
    """Codes that decode to ``unit * a``, unit in {-1, 0, +1}, with one float32 ``a`` per block.

    Body: the float32 scales, then the packed codes.  Subclasses implement ``_scales`` (the
    per-block scales and a tensor whose non-finite entries flag a non-finite input), ``_codes``
    (fill the uint8 codes), ``_units`` (codes -> int8 units, in place), ``_pack``, ``_unpack`` and
    ``_codes_nbytes``.  Encoding and decoding walk the bucket in cache-sized :func:`pieces`.
    """

    native: ClassVar[int] = 8

    def __init__(self, bits: int = 8, block_size: int | str | None = None):
        super().__init__(native_bits(self.name, bits, self.native))
        self.block_size = check_block_size(self.name, block_size)
        self._scratch: dict[tuple, _Scratch] = {}

    def __getstate__(self):  # buffers are rebuilt on use; keep pickles small
        return {k: v for k, v in self.__dict__.items() if k != "_scratch"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._scratch = {}

    def _scratch_for(self, device: torch.device) -> _Scratch:
        key = (device, threading.get_ident())
        s = self._scratch.get(key)
        if s is None:
            s = self._scratch[key] = _Scratch(device)
        return s

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
        scales, check, aux = self._scales(xf, layout, s)
        if not bool(torch.isfinite(check).all()):
            return EncodeInfo(finite=False)
        codes = s.get("codes", n, torch.uint8)
        self._codes(xf, layout, scales, aux, key, s, codes)
        scales.abs_()  # turns the -0.0 scale an all-zero block may get into +0.0 (else a no-op)
        nb = scales.numel()
        body[: 4 * nb].copy_(scales.view(torch.uint8))  # byte copy: any alignment of the body
        self._pack(codes, body[4 * nb:])
        if error_out is None:
            return EncodeInfo()
        return self._residual(xf, layout, scales, self._units(codes), s, error_out)

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
        mags = shares.abs()
        peak, smallest = torch.stack([mags.sum(0).max(), torch.where(mags > 0, mags, math.inf).min()]).tolist()
        # float32 unless the sum could overflow or a share is subnormal (it would lose precision)
        work = torch.float32 if peak < _FP32_MAX / 2 and smallest >= _FP32_MIN_NORMAL else torch.float64
        shares = shares.to(work)
        s = self._scratch_for(out.device)
        direct = out.dtype == work and out.is_contiguous()
        if direct:
            acc = out.view(-1)
        else:  # half-precision outputs reuse a float32 buffer; the rare float64 one is not kept
            acc = s.get("acc", n, work) if work == torch.float32 else torch.empty(n, dtype=work, device=out.device)
        parts, _ = self._pieces(layout, out.device)
        codes = s.get("codes", n, torch.uint8)  # the encoder's buffer: a thread encodes or decodes
        for r, body in enumerate(bodies):
            units = self._units(self._unpack(body[4 * nb: 4 * nb + self._codes_nbytes(n)], n, codes))
            share = shares[r]
            for start, rows, cols, b in parts:
                m = rows * cols
                u = units[start:start + m].view(rows, cols)
                a = acc[start:start + m].view(rows, cols)
                if r == 0:
                    torch.mul(u, share[b:b + rows, None], out=a)
                else:
                    a.addcmul_(u, share[b:b + rows, None])
        if not direct:
            out.copy_(acc.view(out.shape))
        return out

    # -- subclass hooks --------------------------------------------------------------------------
    def _codes_nbytes(self, numel: int) -> int:
        raise NotImplementedError

    def _scales(self, xf, layout, s) -> tuple[torch.Tensor, torch.Tensor, object]:
        """``(scales, check, aux)``: float32 scales (or a buffer ``_codes`` fills), a tensor whose
        non-finite entries mean a non-finite input, and anything ``_codes`` needs."""
        raise NotImplementedError

    def _codes(self, xf, layout, scales, aux, key, s, codes) -> None:
        raise NotImplementedError

    def _pack(self, codes: torch.Tensor, out: torch.Tensor) -> None:
        raise NotImplementedError

    def _unpack(self, packed: torch.Tensor, numel: int, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _units(codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# -- the codec ---------------------------------------------------------------------------------
