"""Ternary quantization (TernGrad, Wen et al. 2017): every value becomes one of ``{-a, 0, +a}``.

One scale ``a`` per block (``block_size``: 256 by default = blocks of 256 values cut per parameter,
an int ``B`` = blocks of B values, None = one per bucket, "layer" = one per parameter; see blocks.py).  Two ways to choose the levels
(option ``rounding``):

* ``"stochastic"`` (TernGrad): ``a = max|x|`` of the block; ``x`` becomes ``sign(x) * a``
  with probability ``|x| / a`` and 0 otherwise, so ``E[decode] = x`` (variance ``a|x| - x^2``).
  The draw keeps ``x`` when ``|x| / a`` (a correctly rounded float32 quotient in [0, 1]) exceeds
  the keyed dither of :mod:`._random`; the block's largest values are always kept (dither < 1).
  TernGrad itself runs without error feedback; the squared error ``sum(a|x| - x^2)`` can exceed
  ``|x|^2`` (NMSE > 1), which error feedback does not damp: the hook refuses it with error feedback.
* ``"threshold"`` (default, deterministic): ``delta = threshold * mean|x|`` of the block (``threshold``
  > 0, default 0.7); the values with ``|x| > delta`` become ``sign(x) * a`` with ``a`` the mean of
  their ``|x|``, all others 0; ``a = 0`` when no value exceeds ``delta``.  Both means are
  accumulated in float64 from the float32 values and ``|x| > delta`` is decided exactly as in
  float64 (against ``delta`` rounded down to float32, which selects the same values); ``a`` is
  then rounded to float32 (no overflow: a mean never exceeds the largest of its float32 terms).

Trit codes: ``0 -> 0``, ``1 -> +a``, ``2 -> -a`` (decode: ``code - 3 * (code >> 1)`` gives the
unit 0, +1, -1).

Body layout (little-endian)::

    nblocks x a: float32              block scales, in block order
    packed trit codes of all values   packing="2bit":  ceil(n/4) bytes, pack_codes(bits=2), i.e.
                                                       planar stripes (packing.py); code 3 unused
                                      packing="base3": ceil(n/5) bytes, 5 trits per byte (trits.py)

so the body is ``4*blocks + ceil(n/4)`` (2bit) or ``4*blocks + ceil(n/5)`` (base3, 1.6 bits/value)
bytes.  ``bits`` is reported as 2 for both packings (the wire header's field is an integer).

Edge cases:

* all-zero block: ``a = 0`` and every code 0, decoding to exact zeros (stochastic: ``0 / 0`` is NaN
  and a NaN never compares above the dither, so no value is kept);
* exact zeros (including ``-0.0``) always get code 0, in both roundings;
* values near the float32 maximum: the scale is a max (stochastic) or a float64 mean rounded to
  float32 (threshold), so it never overflows; ``|x| / a <= 1``; the residual ``x - q`` is at most
  ``max(|x|, a)`` because ``q`` is 0 or has the sign of ``x``, so it cannot overflow either; a
  decoder that averages several huge payloads switches to float64 accumulation (on accelerators
  every decoder does, without the test: a host read);
* tiny and subnormal values: ``|x| / a`` is a correctly rounded quotient even for subnormal ``a``
  (no reciprocal, which would overflow), so the keep probability stays exact to float32 precision;
  a decoder that divides subnormal scales accumulates in float64 and rounds once;
* NaN/Inf anywhere: ``encode`` returns ``EncodeInfo(finite=False)`` (a device flag from the per-block
  reductions, which propagate them: no host read); ``error_out`` is then unspecified.

The module also holds :class:`BlockScaledCodec`, the machinery shared with :mod:`.sign` (codes that
decode to a unit in {-1, 0, +1} times one float32 scale per block).  Speed: the bucket is walked in
cache-sized pieces (whole blocks, or parts of a long block) with reused per-thread buffers, so no
bucket-sized float temporary is allocated except the dither of the stochastic variants
(``_random.param_dither``); on the CPU the comparisons run in numpy on the same memory (torch's
comparisons into bool tensors are ~5x slower there), on accelerators everything is torch, with one
piece per run.
"""
from __future__ import annotations

import math
import numbers

import torch

from ._blockscaled import BlockScaledCodec, _abs, _gt, _mask, _negative, _shift_left
from .blocks import DEFAULT_BLOCK_SIZE, blocks_for
from .options import check_choice
from .packing import (
    pack_codes,
    pack_trits,
    packed_nbytes,
    trit_nbytes,
    unpack_codes,
    unpack_trits,
)

ROUNDINGS = ("stochastic", "threshold")
PACKINGS = ("2bit", "base3")


class TernaryCodec(BlockScaledCodec):
    """TernGrad: ``{-a, 0, +a}`` per block, stochastic (unbiased) or threshold rounding."""

    name = "ternary"
    codec_id = 10
    native = 2
    stochastic = False  # the default (threshold) rounding; set per instance
    body_formula = "4*blocks + ceil(n/4) (packing='2bit') or 4*blocks + ceil(n/5) (packing='base3')"
    summary = "TernGrad {-a, 0, +a} per block: unbiased stochastic or threshold rounding, 2-bit or base-3 (1.6-bit) codes"
    examples = ((8, {}), (8, {"rounding": "threshold", "packing": "base3", "block_size": 16}))
    option_space = {"rounding": ("stochastic", "threshold"), "threshold": (0.7, 1e-3, 1.0, 3.0, 1e30),
                    "packing": ("2bit", "base3")}
    fidelity_configs = (("ternary (TernGrad)", 8, {}), ("ternary, layer", 8, {"block_size": "layer"}),
                        ("ternary threshold", 8, {"rounding": "threshold"}), ("ternary base-3", 8, {"packing": "base3"}))
    # the mean of W trits is no longer a trit, and a stochastic trit's error exceeds the value (a
    # server residual would grow without bound): the two-phase exchange re-encodes it with uniform
    server_codec = ("uniform", 2)

    def __init__(self, bits: int = 8, block_size: int | str | None = DEFAULT_BLOCK_SIZE, rounding: str = "threshold",
                 threshold: float = 0.7, packing: str = "2bit", compile: bool = False):
        super().__init__(bits, block_size, compile)
        self.rounding = check_choice(self.name, "rounding", rounding, ROUNDINGS)
        self.packing = check_choice(self.name, "packing", packing, PACKINGS)
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) \
                or not math.isfinite(threshold) or threshold <= 0:
            raise ValueError(f"{self.name}: threshold must be a finite number > 0 (a multiple of the block's "
                             f"mean |x|, default 0.7), got {threshold!r}")
        self.threshold = float(threshold)
        self.stochastic = self.rounding == "stochastic"
        # a stochastic trit's error reaches a = max|x| of the block for EVERY kept or dropped value,
        # far above |x| for most of them: fed back, residuals settle ~50x above the gradient (one
        # scale per bucket; the LM's pre-clip gradient norm grew 300x).  Threshold rounding is
        # contractive (||x - q||^2 = ||x||^2 - k a^2 per block).  The hook refuses stochastic + EF.
        self.error_feedback_diverges = self.stochastic
        self.body_formula = "4*blocks + ceil(n/4)" if packing == "2bit" else "4*blocks + ceil(n/5)"
        planar = self.packing == "2bit"  # the compiled kernels write and read planar 2-bit codes
        self._fused_code = _stochastic_code if planar and self.stochastic else None
        self._fused_unit = _unit if planar else None

    def config(self) -> dict:
        cfg = {"codec": self.name, "bits": self.bits, "block_size": self.block_size,
               "rounding": self.rounding, "packing": self.packing}
        if self.rounding == "threshold":  # unused otherwise: ranks may differ in it
            cfg["threshold"] = self.threshold
        return cfg

    def _codes_nbytes(self, numel: int) -> int:
        return packed_nbytes(numel, 2) if self.packing == "2bit" else trit_nbytes(numel)

    def _scales(self, xf, layout, s):
        if self.stochastic:
            scales = self._block_absmax(xf, layout, s)
            return scales, scales, None
        lengths = blocks_for(layout, self.block_size).lengths_tensor(xf.device, torch.float64)
        delta = self._block_abssum64(xf, layout, s).div_(lengths).mul_(self.threshold)
        return torch.empty_like(delta, dtype=torch.float32), delta, delta  # a is set in _codes

    def _codes(self, xf, layout, scales, delta, dither, s, codes):
        parts, size = self._pieces(layout, xf.device)
        t_all = s.get("f32", size, torch.float32)
        keep_all = s.get("keep", size, torch.bool)
        neg_all = s.get("neg", size, torch.bool)
        if self.stochastic:
            dither_buf = s.get("dither", size, torch.float32)
        else:
            # v > delta  <=>  v > (delta rounded down to float32), for every float32 v
            bound = delta.float()
            bound = torch.where(bound.double() > delta, torch.nextafter(bound, torch.full_like(bound, -math.inf)), bound)
            count = torch.zeros(delta.numel(), dtype=torch.int64, device=xf.device)
            kept = torch.zeros(delta.numel(), dtype=torch.float64, device=xf.device)
        for start, rows, cols, b in parts:
            m = rows * cols
            xv = xf[start:start + m].view(rows, cols)
            keep = keep_all[:m].view(rows, cols)
            neg = neg_all[:m].view(rows, cols)
            if self.stochastic:
                # |x| / a == |x / a| exactly (division is sign-symmetric), so one pass over x gives
                # both the sign and the keep probability; 0/0 of an all-zero block is NaN: code 0
                t = torch.div(xv, scales[b:b + rows, None], out=t_all[:m].view(rows, cols))
                _negative(t, neg)
                d = dither.piece(start, m, dither_buf)
                _gt(_abs(t).view(-1, d.numel()), d, keep.view(-1, d.numel()))
                _shift_left(keep, neg, codes[start:start + m].view(rows, cols))  # 0, 1 << 0 = 1 (+a), 1 << 1 = 2 (-a)
                continue
            t = torch.abs(xv, out=t_all[:m].view(rows, cols))
            _gt(t, bound[b:b + rows, None], keep)
            _mask(t, keep)
            if rows == 1:
                count[b:b + 1] += keep.sum()
                kept[b:b + 1] += t.sum(dtype=torch.float64)
            else:
                torch.sum(keep, 1, out=count[b:b + rows])
                torch.sum(t, 1, dtype=torch.float64, out=kept[b:b + rows])
            _negative(xv, neg)
            neg.logical_and_(keep)
            # code = keep + (keep and negative): 0, 1 (+a) or 2 (-a)
            torch.add(keep.view(torch.uint8), neg.view(torch.uint8), out=codes[start:start + m].view(rows, cols))
        if not self.stochastic:
            scales.copy_(torch.where(count > 0, kept / count.clamp(min=1), 0.0))

    def _pack(self, codes, out):
        if self.packing == "2bit":
            pack_codes(codes, 2, out=out)
        else:
            pack_trits(codes, out=out)

    def _unpack(self, packed, numel, out):
        if self.packing == "2bit":
            return unpack_codes(packed, 2, numel, out=out)
        return unpack_trits(packed, numel, out=out)

    @staticmethod
    def _units(codes):
        """Trit codes 0, 1, 2 -> units 0, +1, -1 (int8), in place."""
        u = codes.view(torch.int8)
        return u.sub_(torch.bitwise_right_shift(u, 1).mul_(3))


# -- the compiled kernels' per-value code (see _blockscaled.BlockScaledCodec) ---------------------
def _stochastic_code(plane, scale, dither):
    t = plane / scale  # as the eager path: a correctly rounded quotient; NaN (0/0) is never kept
    negative, keep = t < 0, t.abs() > dither
    code = keep.to(torch.int32) << negative.to(torch.int32)
    return code, torch.where(keep, torch.where(negative, -scale, scale), 0.0)


def _unit(code):
    return code * (2.5 - 1.5 * code)  # float codes 0, 1, 2 -> 0, +1, -1 (exact in float32)
