"""mulaw: mu-law companding of x / max|x| per block, uniform levels in the companded domain (codecs/mulaw.py)."""
import math

import numpy as np

from . import CodecSpec
from ._ref import EPS32, TINY32, assert_all, lazy, scaled_nbytes
from .log import signed_levels_below_block_max


def check_levels(case, codec, x, d, body, blocks, first):
    K = (1 << (case.bits - 1)) - 1
    mu = float(case.options.get("mu", 255.0))
    l1p = math.log1p(mu)
    m, ad, ax = signed_levels_below_block_max("mulaw", x, d, body, blocks)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(m > 0, ax / np.where(m > 0, m, 1.0), 0.0)
    t = K * np.log1p(mu * r) / l1p            # K |y| in float64
    reach = 0.5 if case.options.get("rounding", "nearest") == "nearest" else 1.0
    found = np.zeros(d.size, dtype=bool)
    for dq in (-1, 0, 1, 2):
        q = np.clip(np.floor(t) + dq, 0, K)
        val = np.expm1(q / K * l1p) / mu
        val = np.where(q == K, 1.0, val)
        level = m * val
        found |= (np.abs(q - t) <= reach + 1e-3) & (np.abs(ad - level) <= 2 * EPS32 * level + 2 * TINY32)
    assert_all(found, "mulaw value not a (neighbouring) companded level", d, x, m, t, names=("d", "x", "m", "K|y|"))


SPEC = CodecSpec(expected_nbytes=scaled_nbytes, check_levels=check_levels,
                 ref_decode=lazy("test_codec_mulaw", "ref_decode_mulaw"),
                 ddp_examples=((4, {}), (8, {"mu": 100.0, "block_size": 32})))
