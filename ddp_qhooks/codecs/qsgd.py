"""QSGD (Alistarh et al., NeurIPS 2017): stochastic quantization relative to the L2 norm.

Each block ``v`` (one per bucket by default, see blocks.py) is sent as its norm ``||v||`` and, per
value, one of the ``2s + 1`` signed levels ``l/s * ||v||``, ``l = -s..s`` (zero is a level), chosen
by unbiased stochastic rounding: with ``r = |v_i| * s / ||v||`` between integers ``k <= r < k+1``,
the magnitude is ``k+1`` with probability ``r - k`` and ``k`` otherwise, the sign kept.

How ``bits`` maps to ``s``: a code of ``b`` bits (2..8) holds ``2s + 1`` values with
``s = 2**(b-1) - 1`` (b=2: s=1, i.e. {-1, 0, 1}·||v||; b=4: s=7; b=8: s=127); code ``c`` means level
``c - s``.  Fixed-width codes keep every rank's payload the same size (the paper's Elias coding
would not), so one all-gather serves.

Implementation: stochastic rounding of the *signed* value ``v_i * s / ||v||`` on the integer grid
``-s..s`` has exactly QSGD's distribution (the grid is symmetric and contains 0), so this is the
stochastic min-max quantizer of uniform.py with its range set to ``[-||v||, +||v||]`` and
``2s`` steps: the same body (per block ``lo = -||v||``, ``hi = +||v||`` as float32, then the packed
codes), the same keyed dither, the same decoder.  Storing ``lo`` costs 4 redundant bytes per block
and buys the shared, tested fast paths.

Variance (Lemma 3.1): ``E||Q(v) - v||^2 <= min(n/s^2, sqrt(n)/s) * ||v||^2``.  It holds for any
vector, including spiky ones (one large entry, many tiny): the tiny entries round to the zero level
or the first level with probability proportional to their size.  A min-max grid has no zero level
in general and rounds every tiny entry with variance ~ step^2 / 4, which breaks the bound (see the
tests).

Norms are computed so that they neither overflow nor underflow in float32 (scaled by a power of
two near the block's 1 / max |v| when needed; the per-bucket norm decides that on the device), and never come out below max |v| through round-off (every value must lie on
the grid's range).  A norm beyond the float32 range is capped at float32 max (every value still
lies inside the range).  With ``compile=True`` the norm of a one-block bucket is one compiled pass
accumulating float64 squares (more precise, so a norm may differ from the eager one in its last bit).
"""
from __future__ import annotations

import torch

from . import _fused
from .base import SQ_LIMIT
from .packing import STRIPE
from .uniform import StochasticCodec

_FP32_MAX = torch.finfo(torch.float32).max
_SAFE_LO = 2.0 ** -60  # max |v| above this: float32 squares do not underflow


class QsgdCodec(StochasticCodec):
    """QSGD with ``s = 2**(bits-1) - 1`` levels per sign; ``bits`` in 2..8, optional ``block_size``."""

    name = "qsgd"
    codec_id = 6
    valid_bits = tuple(range(2, 9))
    body_formula = "8*blocks + ceil(n*b/8)"
    summary = "QSGD: sign + stochastic levels l/s of the block's L2 norm, s = 2^(b-1) - 1 (unbiased)"
    examples = ((4, {}), (3, {"block_size": 16}))
    fidelity_configs = (("qsgd 8b", 8, {}), ("qsgd 4b", 4, {}), ("qsgd 2b", 2, {}),
                        ("qsgd 4b, block 256", 4, {"block_size": 256}))

    def __init__(self, bits: int = 8, block_size: int | str | None = None, compile: bool = False):
        # unlike the other uniform codecs, one norm per bucket stays the default: QSGD is unbiased and
        # meant to run without error feedback (the hook refuses EF unless blocks are small, see below)
        super().__init__(bits, block_size, compile)

    @staticmethod
    def _levels_for(bits: int) -> int:
        return (1 << bits) - 2   # 2s steps between -||v|| and +||v||

    @property
    def s(self) -> int:
        return self.levels // 2

    @property
    def error_feedback_diverges(self) -> bool:
        # Error feedback feeds E||Q(v) - v||^2 <= w ||v||^2 back into the next step; with Lemma 3.1's
        # w = min(B/s^2, sqrt(B)/s) >= 1 the residual can grow every step (measured: NaN on
        # Fashion-MNIST with s = 7, blocks of 512).  QSGD is unbiased: the paper uses no feedback.
        if self.block_size is None or self.block_size == "layer":
            return True  # buckets / layers are large: w >> 1
        b = self.block_size
        return min(b / self.s ** 2, b ** 0.5 / self.s) >= 1

    def _range_one(self, x):
        if self.compile and x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() >= STRIPE:
            total = _fused.sum_sq64(x)
            if total is not None:
                # one read: a float64 sum of float32 squares cannot overflow or underflow, and its
                # square root, rounded to float32, is never below max |v| (max^2 is one of its terms)
                norm = total.sqrt().float() if bool(torch.isfinite(total)) else total.float().fill_(float("nan"))
                hi = norm.clamp_(max=_FP32_MAX)
                return -hi, hi
        lo, hi = torch.aminmax(x)  # max |x| (vector_norm's inf-norm is ~20x slower on a CPU core)
        m = torch.maximum(-lo, hi)
        # decided on the device, no read: where float32 squares could underflow or their sum
        # overflow (the bound grows with the count: 1e5 values of 1e17 overflow a float32 sum),
        # x is scaled by a power of two 2**k near 1 / max |x| (exact: the norm of the scaled
        # values, scaled back, is the norm of x to float32 rounding); else k = 0, the plain norm
        md = m.double()
        safe = ((md > _SAFE_LO) & (md * md * x.numel() < SQ_LIMIT)) | (md == 0) | ~torch.isfinite(md)
        k = torch.where(safe, 0, torch.frexp(m).exponent.neg()).clamp_(-126, 126)
        p = ((k + 127) << 23).to(torch.int32).view(torch.float32)  # 2**k, built from its bits
        scaled = torch.mul(x.view(-1), p, out=self._scratch_for(x.device, x.numel()).bucket("norm", x.numel(), x.dtype))
        norm = torch.linalg.vector_norm(scaled).div_(p)
        # capped at float32 max, but an infinite max |x| must stay non-finite: + m * 0 is NaN then
        hi = torch.maximum(norm, m).clamp_(max=_FP32_MAX).add_(m * 0)
        return -hi, hi

    def _range_run(self, view, lo_out, hi_out):
        m = torch.maximum(-view.amin(1), view.amax(1)).float()
        safe = torch.where(m > 0, m, torch.ones_like(m))
        norm = torch.linalg.vector_norm(view.float() / safe[:, None], dim=1) * safe
        torch.maximum(norm, m, out=hi_out)
        hi_out.clamp_(max=_FP32_MAX)
        torch.neg(hi_out, out=lo_out)
