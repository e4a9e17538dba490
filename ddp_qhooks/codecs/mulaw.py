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
  maxima of several bodies could overflow float32 (on accelerators always for several bodies:
  the test would be a host read);
* tiny / subnormal values: ``|x| / m`` is a correctly rounded float32 division (no reciprocal of a
  subnormal max); decoded levels below the float32 range round to the nearest float32;
* ``mu`` must lie in [1e-30, 1e30], so that the float32 constants ``mu`` and ``K / ln(1 + mu)`` of
  the compander are finite and normal; ``mu -> 0`` approaches a uniform grid on [-m, m];
* non-finite input: encode returns ``EncodeInfo(finite=False)`` (a device flag: no host read) and
  ``error_out`` is unspecified.
"""
from __future__ import annotations

import functools
import math
import numbers

import numpy as np
import torch

from ._scaled import _ScaledTableCodec, select_by_bits, select_tree
from .blocks import DEFAULT_BLOCK_SIZE

_FP32_MAX = float(torch.finfo(torch.float32).max)
__all__ = ["MuLawCodec"]

MU_MIN, MU_MAX = 1e-30, 1e30


class MuLawCodec(_ScaledTableCodec):
    """mu-law companding + uniform grid in the companded domain, per-block max scale."""

    name = "mulaw"
    codec_id = 8
    stochastic = False  # the default rounding; set per instance
    body_formula = "4*blocks + ceil(n*b/8)"
    summary = "mu-law companding of x/max|x| per block, uniform 2^b-1 level grid in the companded domain"
    examples = ((4, {}), (8, {"mu": 10.0, "block_size": 16}))
    option_space = {"rounding": ("nearest", "stochastic"), "mu": (255.0, 1e-30, 0.5, 1.0, 10.0, 1e6, 1e30)}
    fidelity_configs = (("mulaw 8b", 8, {}), ("mulaw 4b", 4, {}), ("mulaw 4b, layer", 4, {"block_size": "layer"}))

    def __init__(self, bits: int = 8, block_size: int | str | None = DEFAULT_BLOCK_SIZE, mu: float = 255.0,
                 rounding: str = "nearest", compile: bool = False):
        if isinstance(mu, bool) or not isinstance(mu, numbers.Real) or not MU_MIN <= float(mu) <= MU_MAX:
            raise ValueError(f"{self.name}: mu must be a number in [{MU_MIN:g}, {MU_MAX:g}] (> 0), got {mu!r}")
        super().__init__(bits, block_size, rounding, compile)
        self.mu = float(mu)
        self.half_levels = (1 << (self.bits - 1)) - 1   # K
        self._log1p_mu = math.log1p(self.mu)

    _fused_fma = True   # the compiled compander is not bitwise the eager one anyway

    def _fused_scale(self, m: torch.Tensor) -> torch.Tensor:
        if not self.stochastic and self.half_levels <= 7:   # the threshold search compares |x| with t_k
            return _scaled_thresholds(self.half_levels, self.mu, m)
        return m

    @property
    def _fused_min_scale(self):   # mu / m stays finite (the 8-bit kernel multiplies by it)
        return 4 * self.mu / _FP32_MAX

    @property
    def _fused_code(self):
        return _code_fn(self.half_levels, self.mu, self.stochastic)

    def config(self) -> dict:
        return {**super().config(), "mu": self.mu}

    @property
    def _fused_value(self):
        return _value_fn(self.bits, self.mu)

    @property
    def _fused_residual_ok(self):  # above 4 bits a table read: as a residual kernel slower than decode + subtract
        return self.bits <= 4

    def _table64(self) -> torch.Tensor:
        return _levels64(self.bits, self.mu)

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


def _levels64(bits: int, mu: float) -> torch.Tensor:
    """The decoder's table: ``table[c]`` relative to the block max, float64, for every b-bit code."""
    K = (1 << (bits - 1)) - 1
    c = torch.arange(1 << bits, dtype=torch.float64).clamp_(max=2 * K)  # the unused top code reads as 2K
    y = (c - K) / K
    val = torch.expm1(y.abs() * math.log1p(mu)) / mu
    val[c == 2 * K] = 1.0   # the ends exactly: values equal to the block max come back unchanged
    val[c == 0] = 1.0
    return torch.where(y < 0, -val, val)


# -- the compiled kernels' arithmetic (see _scaled._ScaledTableCodec) ---------------------------
# log1p does not vectorise in inductor's C++ code (torch 2.13; one scalar call per value, 0.23x
# clone), and its vectorised log is ~2x slower than the rest of the kernel.  The encoder computes
# ln(1 + z) itself: v = 1 + z, its float32 exponent e and mantissa, reduced to [sqrt(1/2), sqrt(2))
# as 1 + f, then ln(1 + f) = f + f^2 * P(f), P of degree 6 fitted at Chebyshev nodes
# (|error| < 1.5e-7 on the range, float32 evaluation included: 3.4e-6 of a code unit at 8 bits and
# mu = 255; degree 7 cost 10% more time for no change in the codes of the float64 comparison test).
_LN_DEGREE = 6


@functools.lru_cache(maxsize=None)
def _ln_poly() -> tuple:
    lo, hi = math.sqrt(0.5) - 1, math.sqrt(2) - 1
    k = np.arange(_LN_DEGREE + 1)
    f = (lo + hi) / 2 + (hi - lo) / 2 * np.cos((2 * k + 1) * np.pi / (2 * _LN_DEGREE + 2))
    return tuple(float(c) for c in np.polyfit(f, (np.log1p(f) - f) / f ** 2, _LN_DEGREE))


@functools.lru_cache(maxsize=None)
def _code_fn(K: int, mu: float, stochastic: bool):
    """The codes of ``_codes`` from ``x`` and the block max, for a compiled kernel: ``K * |y|`` within
    ~5e-6 of the eager float32 value (so a value that close to a rounding boundary may get the
    neighbouring code), the rest exact: ``|x| >= m`` gives ``K``, the sign.  Nearest rounding at up
    to 4 bits (K <= 7) counts the scaled thresholds below ``|x|`` instead
    (:func:`_nearest_by_thresholds`; the kernel then takes them, :meth:`MuLawCodec._fused_scale`)."""
    if not stochastic and K <= 7:
        return _nearest_by_thresholds(K)
    gain = K / math.log1p(mu)
    coeffs = [c * gain for c in _ln_poly()]   # gain folded in: t = gain * ln(v) directly
    gain_ln2 = gain * math.log(2.0)
    # 1 + z rounds off up to 2^-24 of v, which costs gain * 6e-8 in t: negligible at mu = 255
    # (1.4e-6), not for a small mu (gain ~ K / mu), where the rounding error is added back
    compensate = gain * 2.0 ** -24 > 2e-6
    sqrt_half = 0x3F3504F3   # float32 bits of sqrt(1/2)

    def code(x, scale, rnd):
        ax = x.abs()
        # |x| * (mu / m): rounded twice, as (|x| / m) * mu, without a division per value (finite:
        # the codec compiles only for m >= _fused_min_scale)
        z = ax * (mu / scale)
        v = z + 1.0
        bits = v.view(torch.int32) - sqrt_half
        f = ((bits & 0x7FFFFF) + sqrt_half).view(torch.float32) - 1.0   # v = 2^e * (1 + f)
        p = coeffs[0]
        for c in coeffs[1:] + [gain]:   # gain * ln(1 + f) = f * (gain + f * P(f)), by Horner
            p = p * f + c
        t = (bits >> 23).to(torch.float32) * gain_ln2 + p * f
        if compensate:  # z - (v - 1) is exact: what rounding 1 + z lost; ln(1+z) ~ ln v + that / v
            t = t + ((z - (v - 1.0)) / v) * gain
        if stochastic:  # |x| == m exactly: K, as in the eager path (stochastic rounding keeps maxima
            t = torch.where(ax >= scale, float(K), t)   # exact; nearest rounds t ~ K to K anyway)
        # 0 <= t <= K + 3e-5 (|x| <= m) and rnd <= 1 - 2^-10: truncation is the floor, and gives 0..K
        q = (t + rnd).to(torch.int32)
        return torch.where(x < 0, K - q, K + q)   # -0.0: q = 0 either way
    return code


@functools.lru_cache(maxsize=None)
def _boundaries64(K: int, mu: float) -> torch.Tensor:
    """The float64 boundaries between neighbouring levels: ``T_k`` (|y| = (k - 1/2) / K), k = 1..K."""
    k = torch.arange(1, K + 1, dtype=torch.float64)
    return torch.expm1((k - 0.5) / K * math.log1p(mu)) / mu


def _scaled_thresholds(K: int, mu: float, m: torch.Tensor) -> torch.Tensor:
    """``t_k``: the least float32 >= ``T_k * m`` (the product in float64), so that ``|x| >= t_k`` exactly
    when ``|x| / m >= T_k`` (up to the float64 rounding of the boundary): no division per value."""
    bound = _boundaries64(K, mu) * m.double()
    t32 = bound.float()
    return torch.where(t32.double() < bound, torch.nextafter(t32, torch.tensor(math.inf)), t32)


@functools.lru_cache(maxsize=None)
def _nearest_by_thresholds(K: int):
    """Nearest codes as ``q = #{k : |x| >= t_k}`` (:func:`_scaled_thresholds`, the kernel's second
    argument): the nearest level of ``|x| / m``, ties up, found by a binary search of log2(K + 1)
    compares per value instead of a logarithm (and a division)."""

    def code(x, thresholds, rnd):
        r = x.abs()
        # binary search over the K = 2^j - 1 sorted thresholds, one bit of q per level (msb first):
        # the threshold compared at a level is picked by the bits found so far (a select tree)
        found, step = [], (K + 1) // 2
        while step:
            candidates = [thresholds[m * 2 * step + step - 1] for m in range(1 << len(found))]
            found.append(r >= select_by_bits(found[::-1], candidates))
            step //= 2
        q = found[0].to(torch.int32)
        for bit in found[1:]:
            q = q * 2 + bit.to(torch.int32)
        return torch.where(x < 0, K - q, K + q)   # -0.0: q = 0 either way
    return code


@functools.lru_cache(maxsize=None)
def _value_fn(bits: int, mu: float):
    """``table[code]`` (float32) for a compiled decoder, bitwise the eager lookup: up to 4 bits a
    tree of selects between the table's values (vectorised), above that a read of the table at the
    code (marked ``gathers``: compiled as a scalar loop, ~2x slower than the selects where both apply)."""
    table = _levels64(bits, mu).float()
    if bits <= 4:
        return functools.partial(select_tree, values=tuple(table.tolist()))
    torch._dynamo.mark_static(table)   # 2**bits entries: a fixed bound, not a symbolic size per call

    def value(code):
        return table[code]
    value.gathers = True
    return value
