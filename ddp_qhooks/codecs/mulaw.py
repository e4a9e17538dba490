"""mu-law companding quantization relative to each block's max |x|.

A logarithmic compander followed by a uniform grid: fine steps near zero, coarse ones near the
block max, with a smooth transition set by ``mu`` (instead of :mod:`.log`'s strict octaves).

Levels: for a block with ``m = max |x|`` the companded value

    y = sign(x) * ln(1 + mu*|x|/m) / ln(1 + mu)        in [-1, 1]

is quantized on the uniform grid of ``2**b - 1`` levels ``y_c = (c - K) / K``, ``c = 0..2K`` with
``K = 2**(b-1) - 1`` (so 0 is a level; b=2: ``{-1, 0, 1}``; b=8: 255 levels), and decodes to

    x_hat = sign(y_c) * m * ((1 + mu)**|y_c| - 1) / mu      (computed as expm1(|y_c| * log1p(mu)) / mu)

Codes 0 and 2K decode to exactly ``-m`` and ``+m``.

Code layout (``b`` bits, offset binary): ``c = K + round(K * y)``; there is no separate sign bit,
``c = K`` is zero, ``c > K`` positive, ``c < K`` negative.  Code ``2**b - 1`` is never written; this
decoder reads it as ``+m`` (like ``2K``).

Rounding (in the companded domain, on ``K * |y|``, then the sign is applied, so the grid is
symmetric):

* ``rounding="nearest"`` (default): the nearest grid level of ``y``, ties away from zero (up to the
  float32 round-off of the compander, a few ulps of ``K*|y|``);
* ``rounding="stochastic"``: up with probability equal to the position between the two
  neighbouring grid levels, so ``E[y_hat] = y``.  This is NOT unbiased in ``x``: the expansion is
  convex in ``|y|``, so ``|E[x_hat]| >= |x|`` (magnitudes are biased upwards by up to roughly
  ``(ln(1+mu) / (2K))**2 / 2`` relative, more near zero).  Use :mod:`.log` or ``stochastic`` where an
  unbiased estimate matters; error feedback compensates the bias over steps.

Body layout (little-endian)::

    nblocks x m: float32          max |x| of every block, in block order (blocks.py)
    packed codes                  ceil(n * b / 8) bytes, every value of the bucket in order (packing.py)

Edge cases:

* all-zero block: ``m = 0``, every code ``K``, decodes to exact zeros;
* values of magnitude ``m`` (so constant blocks, and 1-element blocks) decode exactly;
* huge values: encoding forms ``|x| / m <= 1`` and ``mu * that``, never ``m`` times anything, so
  values up to float32 max do not overflow; the decoder accumulates in float64 when summed block
  maxima of several bodies could overflow float32;
* tiny / subnormal values: ``|x| / m`` is a correctly rounded float32 division (no reciprocal of a
  subnormal max); decoded levels below the float32 range round to the nearest float32;
* ``mu`` must lie in [1e-30, 1e30], so that the float32 constants ``mu`` and ``K / ln(1 + mu)`` of
  the compander are finite and normal; ``mu -> 0`` approaches a uniform grid on [-m, m];
* non-finite input: encode returns ``EncodeInfo(finite=False)`` and writes no residual.
"""
from __future__ import annotations

import functools
import math
import numbers

import torch

from ._scaled import _ScaledTableCodec

__all__ = ["MuLawCodec"]

MU_MIN, MU_MAX = 1e-30, 1e30


class MuLawCodec(_ScaledTableCodec):
    """mu-law companding + uniform grid in the companded domain, per-block max scale."""

    name = "mulaw"
    codec_id = 8
    stochastic = False  # the default rounding; set per instance
    body_formula = "4*blocks + ceil(n*b/8)"
    summary = "mu-law companding of x/max|x| per block, uniform 2^b-1 level grid in the companded domain"

    def __init__(self, bits: int = 8, block_size: int | str | None = None, mu: float = 255.0,
                 rounding: str = "nearest", compile: bool = False):
        if isinstance(mu, bool) or not isinstance(mu, numbers.Real) or not MU_MIN <= float(mu) <= MU_MAX:
            raise ValueError(f"{self.name}: mu must be a number in [{MU_MIN:g}, {MU_MAX:g}] (> 0), got {mu!r}")
        super().__init__(bits, block_size, rounding, compile)
        self.mu = float(mu)
        self.half_levels = (1 << (self.bits - 1)) - 1   # K
        self._log1p_mu = math.log1p(self.mu)

    @property
    def _fused_code(self):
        return _code_fn(self.half_levels, self.mu, self.stochastic)

    def config(self) -> dict:
        return {**super().config(), "mu": self.mu}

    def _table64(self) -> torch.Tensor:
        K = self.half_levels
        c = torch.arange(1 << self.bits, dtype=torch.float64).clamp_(max=2 * K)  # the unused top code reads as 2K
        y = (c - K) / K
        val = torch.expm1(y.abs() * self._log1p_mu) / self.mu
        val[c == 2 * K] = 1.0   # the ends exactly: values equal to the block max come back unchanged
        val[c == 0] = 1.0
        return torch.where(y < 0, -val, val)

    def _codes(self, rel: torch.Tensor, rnd, out: torch.Tensor, s) -> None:
        K, c, i32 = self.half_levels, rel.numel(), torch.int32
        rb = rel.view(i32)
        sign = torch.bitwise_right_shift(rb, 31, out=s.get("sign", c, i32))   # -1: negative (or -0.0), else 0
        r = rb.bitwise_and_(0x7FFFFFFF).view(torch.float32)   # r = |x| / m
        top = torch.ge(r, 1.0, out=s.get("top", c, torch.bool))
        t = r.mul_(self.mu).log1p_().mul_(K / self._log1p_mu)   # K * |y|
        # r == 1 exactly: K, not K*(1 +- ulp), so that stochastic rounding keeps block maxima exact
        t.masked_fill_(top, float(K))
        q = s.get("q", c, i32)
        q.copy_(t.add_(rnd).floor_().clamp_(0, K))
        out.copy_(q.mul_(sign.mul_(2).add_(1)).add_(K))   # K + q, or K - q for negative values


# -- the compiled kernel's arithmetic (see _scaled._ScaledTableCodec): _codes as a pure function
@functools.lru_cache(maxsize=None)
def _code_fn(K: int, mu: float, stochastic: bool):
    gain = K / math.log1p(mu)

    def code(x, scale, rnd):
        rel = x / scale
        r = rel.abs()
        t = torch.where(r >= 1.0, float(K), torch.log1p(r * mu) * gain)
        q = (t + rnd).to(torch.int32).clamp(0, K)  # t + rnd >= 0: truncation is the floor
        return torch.where(rel.view(torch.int32) < 0, K - q, K + q)
    return code
