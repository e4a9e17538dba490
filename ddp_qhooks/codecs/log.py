"""Logarithmic (sign + power-of-two) quantization relative to each block's max |x|.

Gradients are heavy-tailed: a few large values set the range and a uniform grid rounds most of
the rest to zero.  Power-of-two levels keep a constant *relative* resolution instead.

Levels: with ``bits = b`` (2..8) there are ``M = 2**(b-1) - 1`` magnitude codes plus zero.  For a
block with ``m = max |x|`` the magnitude code ``k`` decodes to

* ``k = 0``: 0;
* ``k in 1..M``: ``m * 2**(k - M)``,

so the levels are ``m, m/2, ..., m * 2**(1-M), 0`` (b=2: ``{0, m}``; b=8: down to ``m * 2**-126``),
each with either sign.

Code layout (``b`` bits): the top bit ``b-1`` is the sign (1 = negative), the low ``b-1`` bits the
magnitude code.  The encoder writes sign 0 whenever the magnitude is 0 (one code for zero); a
decoder reads "negative zero" (code ``2**(b-1)``) as 0.

Rounding, on ``r = |x| / m`` in [0, 1] (computed in float32):

* ``rounding="nearest"``: the level nearest in linear value: between ``a`` and ``2a`` the midpoint
  ``1.5a``, between 0 and the smallest level ``s`` the midpoint ``s/2``; ties go up.  The error is
  at most a third of ``|x|`` above the smallest level, at most ``s/2`` below it.
* ``rounding="stochastic"`` (default): between neighbouring levels ``lo < |x| <= hi`` round up with
  probability ``(|x| - lo) / (hi - lo)``, so ``E[decode(encode(x))] = x`` (up to the dither
  resolution of :mod:`._random` and the float32 sum position + dither: ~1e-6 of a level spacing).
  The dither is keyed by ``key`` and the parameter identity, see ``_random.param_dither``.

The position of ``r`` between its two levels is read off its float32 bit pattern (exponent =
level, mantissa = position), so the decision is exact for the float32 ``r``.

Body layout (little-endian)::

    nblocks x m: float32          max |x| of every block, in block order (blocks.py)
    packed codes                  ceil(n * b / 8) bytes, every value of the bucket in order (packing.py)

Edge cases:

* all-zero block: ``m = 0``, every code 0, decodes to exact zeros;
* a block whose values all share one magnitude (constant blocks included) decodes exactly, as does
  every value equal to ``m * 2**-j`` for ``j < M`` (and every value of a 1-element block);
* huge values: only ``|x| / m <= 1`` is formed while encoding, never ``m`` times anything, so values
  up to float32 max encode without overflow; the decoder switches to float64 accumulation when
  the summed block maxima of several bodies could overflow float32 (on accelerators it averages
  several bodies in float64 without that test, which would be a host read);
* tiny / subnormal values: ``|x| / m`` of subnormals is a correctly rounded float32 division
  (no reciprocal, which would overflow); a level ``m * 2**(k-M)`` below the float32 range
  decodes to the nearest float32 (possibly 0), as any float32 result would;
* non-finite input: ``m`` is NaN/Inf, encode returns ``EncodeInfo(finite=False)`` (a device flag:
  no host read) and ``error_out`` is unspecified.

The metadata and packing machinery is shared with :mod:`.mulaw` (``_ScaledTableCodec`` below): both
codecs store one float32 scale per block and decode ``table[code] * m``.
"""
from __future__ import annotations

import functools

import torch

from ._scaled import _ScaledTableCodec
from ._scratch import Scratch
from .blocks import DEFAULT_BLOCK_SIZE

__all__ = ["LogCodec"]


class LogCodec(_ScaledTableCodec):
    """Sign + power-of-two magnitudes relative to the block max; nearest or unbiased stochastic."""

    name = "log"
    codec_id = 7
    stochastic = True  # the default rounding; set per instance
    body_formula = "4*blocks + ceil(n*b/8)"
    summary = "sign + power-of-two levels max*2^-k below each block's max|x| (heavy tails), nearest or unbiased stochastic"
    examples = ((4, {}), (3, {"rounding": "nearest", "block_size": "layer"}))
    option_space = {"rounding": ("nearest", "stochastic")}
    fidelity_configs = (("log 8b", 8, {}), ("log 4b", 4, {}), ("log 3b", 3, {}),
                        ("log 4b nearest", 4, {"rounding": "nearest"}))

    def __init__(self, bits: int = 8, block_size: int | str | None = DEFAULT_BLOCK_SIZE, rounding: str = "stochastic",
                 compile: bool = False):
        super().__init__(bits, block_size, rounding, compile)
        self.magnitudes = (1 << (self.bits - 1)) - 1   # M

    @property
    def _fused_code(self):
        return _code_fn(self.bits, self.stochastic)

    @property
    def _fused_value(self):
        return _value_fn(self.bits)

    def _table64(self) -> torch.Tensor:
        b, M = self.bits, self.magnitudes
        code = torch.arange(1 << b, dtype=torch.int64)
        mag = code & ((1 << (b - 1)) - 1)
        val = torch.where(mag > 0, torch.ldexp(torch.ones(1 << b, dtype=torch.float64), mag - M),
                          torch.zeros(1 << b, dtype=torch.float64))
        return torch.where((code >> (b - 1) == 1) & (mag > 0), -val, val)  # no -0.0

    def _codes(self, rel: torch.Tensor, rnd, out: torch.Tensor, s: Scratch) -> None:
        M, c, i32 = self.magnitudes, rel.numel(), torch.int32
        # on the float32 bit pattern: the integer ops are exact and cost a fraction of frexp/abs/where
        rb = rel.view(i32)
        sign = torch.bitwise_right_shift(rb, 31, out=s.get("sign", c, i32)).bitwise_and_(1)  # 1: negative (or -0.0)
        rb.bitwise_and_(0x7FFFFFFF)   # rel is now r = |x| / m
        # r in [0, 1] with biased exponent E lies in [2**(E-127), 2**(E-126)): the level just below
        # has magnitude code E - 127 + M, and the mantissa field is r's position between that level
        # and the next one up (read as the float 1.f, minus 1: exact)
        lower = torch.bitwise_right_shift(rb, 23, out=s.get("lower", c, i32)).add_(M - 127)
        frac = torch.bitwise_and(rb, 0x7FFFFF, out=s.get("frac", c, i32)).bitwise_or_(0x3F800000)
        frac = frac.view(torch.float32).sub_(1.0)
        # under the smallest level s = 2**(1-M) (r == 0 and subnormal r included) the position
        # between 0 and s is r / s: an exact power-of-two scaling
        below = torch.le(lower, 0, out=s.get("below", c, torch.bool))
        torch.where(below, rel.mul_(2.0 ** (M - 1)), frac, out=frac)
        up = s.get("up", c, i32)
        if self.stochastic:   # up with probability = position (position + dither < 2: floor is 0 or 1)
            up.copy_(frac.add_(rnd).floor_())
        else:   # a comparison, not floor(position + 1/2): that sum rounds up just below the midpoint
            up.copy_(torch.ge(frac, 0.5, out=below))
        mag = lower.clamp_(min=0).add_(up)
        sign.mul_(torch.clamp(mag, max=1, out=up))   # zero has one code: sign 0
        out.copy_(mag.bitwise_or_(sign.bitwise_left_shift_(self.bits - 1)))


# -- the compiled kernels' arithmetic (see _scaled._ScaledTableCodec): the same steps as _codes and
# the table, as pure functions (one per width and rounding, cached so that kernels are reused)
@functools.lru_cache(maxsize=None)
def _code_fn(bits: int, stochastic: bool):
    M = (1 << (bits - 1)) - 1

    def code(x, scale, rnd):
        # |r| from the float (not the masked bits viewed back) and the sign from the shifted bits
        r = x / scale
        rb = r.view(torch.int32)
        ab = rb & 0x7FFFFFFF
        lower = (ab >> 23) + (M - 127)
        frac = ((ab & 0x7FFFFF) | 0x3F800000).view(torch.float32) - 1.0
        pos = torch.where(lower <= 0, r.abs() * 2.0 ** (M - 1), frac)
        # pos + rnd >= 0: truncation is the floor (and vectorises; floor did not)
        up = (pos + rnd).to(torch.int32) if stochastic else (pos >= 0.5).to(torch.int32)
        mag = lower.clamp(min=0) + up
        return mag | (((rb >> 31) & mag.clamp(max=1)) << (bits - 1))   # the sign bit, unless mag is 0
    return code


@functools.lru_cache(maxsize=None)
def _value_fn(bits: int):
    M = (1 << (bits - 1)) - 1

    def value(code):
        # +-2**(mag - M) built from its float32 bit pattern (always a normal number), 0 for mag 0
        mag = code & M
        pattern = ((mag + (127 - M)) << 23) | (((code >> (bits - 1)) & 1) << 31)
        return torch.where(mag > 0, pattern, 0).view(torch.float32)
    return value
