"""The compiled path of ``adaptive`` (``compile=True``, CPU): the eager encoder's float32 steps as
torch.compile'd passes, bitwise the same codes, and the residual from them."""
from __future__ import annotations

import functools

import torch

from . import _fused, _random
from .blocks import blocks_for
from .packing import PLANAR_BITS, STRIPE


class CompiledPath:
    """:meth:`_encode_compiled` of :class:`~ddp_qhooks.codecs.adaptive.AdaptiveCodec` (a mixin: it
    uses the codec's ``levels``, ``bits`` and pieces)."""

    def _encode_compiled(self, xf, layout, bounds, dither, codes, packed, s, err=None):
        """The eager steps as compiled passes (:func:`_code_fn`: the same float32 steps in the same
        order, bitwise the same codes), in as few calls as the dither allows (a call costs ~60 us):
        stretches of one block with the constant 1/2, or of whole dither periods of one parameter
        (the window broadcast over window-long rows, several rows per load of it); whole packing
        stripes inside such a stretch go straight to packed bytes (1, 2, 4 bits).  The rest: runs of
        short blocks, several per pass, and parts of periods, with the dither assembled.

        Returns the ``(first, end)`` stripe ranges written to ``packed`` (the rest of the codes are
        in ``codes``), or None when compilation is unavailable.  With ``err``: the same passes write
        the residual ``x - decode(codes)`` there instead (the codes again, then :func:`_error`) and
        it returns the float64 squared sums of the residual and of ``x``."""
        if not xf.is_contiguous():
            return None
        code, bits, fused, sums = _code_fn(self.levels), self.bits, [], []
        k = 8 // bits
        half, d_all = torch.tensor(0.5), None

        def dither_piece(pos, take):
            nonlocal d_all
            d_all = s.get("dither", _random.POOL_SIZE, torch.float32) if d_all is None else d_all
            return dither.piece(pos, take, d_all, window_ok=False)

        def run(pos, rows, cols, bnd, u, shared=False):   # rows x cols values from pos; shared: u is every row's
            xv, m = xf[pos:pos + rows * cols].view(rows, cols), rows * cols
            if err is not None:
                sums.append(_fused.table_residual(code, _error, xv, bnd, u, err[pos:pos + m].view(rows, cols)))
                return sums[-1] is not None
            return (_fused.table_rows if shared else _fused.table_codes)(code, xv, bnd, u, codes[pos:pos + m].view(rows, cols))

        def part(a, e, b, win, pos):   # values a .. e of a stretch of block b whose periods start at pos
            if win is None:
                return a >= e or run(a, 1, e - a, bounds[:, b], half)
            w = win.numel()
            c = (a - pos) % w
            if c and a < e:   # up to the next period start
                h = min(w - c, e - a)
                if not run(a, 1, h, bounds[:, b], win[c:c + h]):
                    return False
                a += h
            rows = (e - a) // w
            if rows and not run(a, rows, w, bounds[:, b], win, shared=True):
                return False
            a += rows * w
            return a >= e or run(a, 1, e - a, bounds[:, b], win[:e - a])

        def stretch(pos, take, b, win):
            first, end = -(-pos // STRIPE), (pos + take) // STRIPE
            w = 1 if win is None else win.numel()
            if err is not None or bits not in PLANAR_BITS or STRIPE // k % w:
                return part(pos, pos + take, b, win, pos)
            # the whole stripes inside the stretch, and the bucket's last, shorter stripe too when
            # the stretch ends the bucket (planar_parts takes it when its planes are whole windows)
            a, stop = first * STRIPE, (pos + take if pos + take == xf.numel() else end * STRIPE)
            parts, outs, upto = _fused.planar_parts(xf[a:stop], packed[a // k:], bits, w) if stop > a else ((), (), 0)
            if not parts:
                return part(pos, pos + take, b, win, pos)
            u = half
            if win is not None:   # every plane starts at the same dither index (a whole number of
                c = (a - pos) % w   # periods after a stripe start, which w divides)
                u = win if c == 0 else torch.cat([win[c:], win[:c]], out=s.get("rotated", w, torch.float32))
            if not _fused.table_planar(code, bits, parts, bounds[:, b], u, outs):
                return False
            fused.append((first, first + -(-upto // STRIPE)))
            return part(pos, a, b, win, pos) and part(a + upto, pos + take, b, win, pos)

        for start, nb, blen, first in blocks_for(layout, self.block_size).runs:
            if nb > 1 and blen < STRIPE:   # short blocks: whole ones per pass
                per = max(1, _random.POOL_SIZE // blen)
                for r in range(0, nb, per):
                    rows, at = min(per, nb - r), start + r * blen
                    u = half if dither is None else dither_piece(at, rows * blen).view(rows, blen)
                    if not run(at, rows, blen, bounds[:, first + r:first + r + rows, None], u):
                        return None
                continue
            for b in range(first, first + nb):
                at = start + (b - first) * blen
                segments = [(at, blen, None)] if dither is None else dither.segments(at, blen)
                for pos, take, win in segments:
                    if not (stretch(pos, take, b, win) if win is not None or dither is None
                            else run(pos, 1, take, bounds[:, b], dither_piece(pos, take))):
                        return None
        if err is None:
            return fused
        return tuple(float(sum(t[i] for t in sums)) for i in range(2))


@functools.lru_cache(maxsize=None)
def _code_fn(levels: int):
    """The encoder's per-value steps for the compiled kernels (one function per level count, so
    that kernels are reused): ``bounds`` holds lo, hi and inv along its first dimension."""
    def code(x, bounds, u):
        # clip to [lo, hi], (v - lo) * inv, + u, truncation (the operand is >= 0: the floor), at most
        # levels (round-off at hi): the eager order
        lo, hi, inv = bounds[0], bounds[1], bounds[2]
        return ((torch.clamp(x, lo, hi) - lo) * inv + u).to(torch.int32).clamp(max=levels)
    return code


def _error(x, code, bounds):
    """The compiled residual: ``x`` minus the decoder's value ``lo + code * step`` (``bounds`` as in
    :func:`_code_fn`, step in its fourth row), rounded twice where the decoder's add(alpha) rounds
    once: it may differ from ``x - decode(body)`` by an ulp of the range."""
    return x - (bounds[0] + code.to(torch.float32) * bounds[3])
