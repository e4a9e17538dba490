"""1-bit sign quantization: every value becomes ``+a`` or ``-a``, one scale ``a`` per block.

Blocks as in blocks.py (``block_size``: 256 by default = blocks of 256 values cut per parameter, an
int ``B`` = blocks of B values, None = one per bucket, "layer" = one per parameter).  Two modes (option ``mode``):

* ``"scaled"`` (default; EF-signSGD, Karimireddy et al. 2019): ``a = mean|x|`` of the block
  (zeros included), ``q = sign(x) * a``.  Biased on its own; meant for error feedback, where the
  difference ``x - q`` goes into the residual.  Exact zeros (``+0.0`` and ``-0.0``) are sent as
  ``+a``: one bit has no room for a third level, and the residual ``-a`` corrects it next step.
* ``"stochastic"`` (unbiased 1-bit): ``a = max|x|`` of the block, ``q = +a`` with probability
  ``(1 + x/a) / 2`` and ``-a`` otherwise, so ``E[q] = x`` (variance ``a^2 - x^2``).  An exact zero
  becomes ``+a`` or ``-a`` with probability 1/2 each.  The draw is ``x / a <= 2u - 1 -> -a`` with
  ``u`` the keyed dither of :mod:`._random` (``2u - 1`` is exact in float32 on its grid), so the
  block's extreme values ``+-a`` always keep their sign.  Its squared error ``sum(a^2 - x^2)`` is
  usually larger than ``|x|^2`` (NMSE > 1): not a contraction, so under error feedback the residual
  grows step after step (a 2-rank training run went to NaN with it and trained without it).  Use
  it with ``error_feedback=False``.

Codes (1 bit per value): ``0 -> +a``, ``1 -> -a`` (a sign bit, as in IEEE floats; decode unit
``1 - 2 * code``).

Body layout (little-endian)::

    nblocks x a: float32           block scales, in block order
    packed sign bits of all values ceil(n/8) bytes, pack_codes(bits=1): planar stripes (packing.py)

so the body is ``4*blocks + ceil(n/8)`` bytes.  ``bits`` is reported as 1.

Edge cases:

* all-zero block: ``a = 0``, every code 0, decoding to exact zeros;
* values near the float32 maximum: ``mean|x|`` is accumulated in float64 and rounded to float32
  (never above the largest ``|x|``, so no overflow), ``max|x|`` is exact and ``x / a`` lies in
  [-1, 1].  In ``scaled`` mode the residual ``x - q`` is at most ``max(|x|, a)`` (``q`` has the
  sign of ``x``, or ``x = 0``).  In ``stochastic`` mode it can reach ``|x| + a``, up to ``2a``: for
  ``a`` above ``FP32_MAX / 2`` (3.4e38 / 2) a float32 residual of a sign flip overflows to inf.
  That is inherent to an unbiased two-level code of such values; use ``scaled`` mode or scale the
  loss if gradients can get that large.  A decoder averaging several huge payloads switches to
  float64 accumulation (on accelerators every decoder does, without the test: a host read);
* tiny and subnormal values: ``mean|x|`` in float64 keeps them; ``x / a`` is a correctly rounded
  quotient even for a subnormal ``a`` (no reciprocal, which would overflow); a decoder dividing
  subnormal scales accumulates in float64 and rounds once;
* NaN/Inf anywhere: ``encode`` returns ``EncodeInfo(finite=False)`` (a device flag from the per-block
  reductions, which propagate them: no host read); ``error_out`` is then unspecified.
"""
from __future__ import annotations

import torch

from . import _fused
from ._blockscaled import BlockScaledCodec, _le, _negative
from .blocks import DEFAULT_BLOCK_SIZE, blocks_for
from .options import check_choice
from .packing import pack_codes, packed_nbytes, unpack_codes

__all__ = ["SignCodec"]

MODES = ("scaled", "stochastic")


class SignCodec(BlockScaledCodec):
    """1-bit signs with a per-block scale: mean|x| (EF-signSGD) or unbiased stochastic with max|x|."""

    name = "sign"
    codec_id = 11
    native = 1
    stochastic = False  # the default mode; set per instance
    body_formula = "4*blocks + ceil(n/8)"
    summary = "1-bit sign per value, one scale per block: mean|x| (EF-signSGD) or unbiased stochastic (max|x|)"
    examples = ((8, {}), (8, {"mode": "stochastic", "block_size": "layer"}))
    option_space = {"mode": ("scaled", "stochastic")}
    fidelity_configs = (("sign (scaled)", 8, {}), ("sign (scaled), layer", 8, {"block_size": "layer"}),
                        ("sign stochastic", 8, {"mode": "stochastic"}))
    # the mean of W signs is no longer a sign: re-encoding it to 1 bit costs accuracy (README)
    server_codec = ("uniform", 2)

    def __init__(self, bits: int = 8, block_size: int | str | None = DEFAULT_BLOCK_SIZE, mode: str = "scaled",
                 compile: bool = False):
        super().__init__(bits, block_size, compile)
        self.mode = check_choice(self.name, "mode", mode, MODES)
        self.stochastic = self.mode == "stochastic"
        # |x - q| can reach 2 max|x| (a sign flip), so a residual fed back into the next step can
        # double the range every step: error feedback diverges.  The hook refuses the combination.
        self.error_feedback_diverges = self.stochastic
        self._fused_code = _stochastic_code if self.stochastic else _scaled_code
        self._fused_unit = _unit

    def config(self) -> dict:
        return {"codec": self.name, "bits": self.bits, "block_size": self.block_size, "mode": self.mode}

    def _scales_fused(self, xf, layout, s):
        if self.stochastic:
            return self._scales(xf, layout, s)
        total = _fused.abs_sum64(xf)  # one read, float64 accumulation (eager: |x| per piece, then sums)
        if total is None:
            return None, None, None
        mean = total / layout.numel
        return mean.float().view(1), mean, None

    def _codes_nbytes(self, numel: int) -> int:
        return packed_nbytes(numel, 1)

    def _scales(self, xf, layout, s):
        if self.stochastic:
            scales = self._block_absmax(xf, layout, s)
            return scales, scales, None
        lengths = blocks_for(layout, self.block_size).lengths_tensor(xf.device, torch.float64)
        mean = self._block_abssum64(xf, layout, s).div_(lengths)
        return mean.float(), mean, None

    def _codes(self, xf, layout, scales, aux, dither, s, codes):
        negative = codes.view(torch.bool)
        if not self.stochastic:
            _negative(xf, negative)  # exact zeros (and -0.0) get bit 0: +a
            return
        parts, size = self._pieces(layout, xf.device)
        t_all = s.get("f32", size, torch.float32)
        flip_all = s.get("f32b", size, torch.float32)
        for start, rows, cols, b in parts:
            m = rows * cols
            t = torch.div(xf[start:start + m].view(rows, cols), scales[b:b + rows, None], out=t_all[:m].view(rows, cols))
            # 2u - 1 in (-1, 1) is exact in float32 on the dither grid; P(x/a <= 2u - 1) = (1 - x/a) / 2,
            # the probability of -a.  An all-zero block gives 0/0 = NaN, which compares False: +0
            d = dither.piece(start, m, flip_all)
            flip = torch.mul(d, 2, out=flip_all[:d.numel()]).sub_(1)
            _le(t.view(-1, d.numel()), flip, negative[start:start + m].view(-1, d.numel()))

    def _pack(self, codes, out):
        pack_codes(codes, 1, out=out)

    def _unpack(self, packed, numel, out):
        return unpack_codes(packed, 1, numel, out=out)

    @staticmethod
    def _units(codes):
        """Sign bits 0, 1 -> units +1, -1 (int8), in place."""
        return codes.view(torch.int8).mul_(-2).add_(1)


# -- the compiled kernels' per-value code (see _blockscaled.BlockScaledCodec) ---------------------
def _scaled_code(plane, scale, dither):
    negative = plane < 0  # exact zeros (and -0.0) get bit 0: +a
    return negative.to(torch.int32), torch.where(negative, -scale, scale)


def _stochastic_code(plane, scale, dither):
    negative = plane / scale <= dither * 2 - 1  # as the eager path: 2u - 1 is exact in float32
    return negative.to(torch.int32), torch.where(negative, -scale, scale)


def _unit(code):
    return 1 - 2 * code  # float codes 0, 1 -> +1, -1
