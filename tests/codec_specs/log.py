"""log: sign + power-of-two levels below each block's max |x| (codecs/log.py)."""
import numpy as np

from . import CodecSpec
from ._ref import EPS32, TINY32, assert_all, assert_equal, lazy, meta_floats, scaled_nbytes


def signed_levels_below_block_max(name, x, d, body, blocks):
    """log / mulaw: the block scale is max |x|; 0 stays 0, signs are kept, |d| <= the scale.
    Returns (per-value scale, |d|, |x|)."""
    m_b = meta_floats(body, blocks.count)
    assert_equal(m_b, blocks.reduce(np.maximum, np.abs(x)), f"{name} scale must be max |x|")
    m = blocks.expand(m_b)
    ad, ax = np.abs(d), np.abs(x)
    assert_all(np.where(x == 0, d == 0, True), "zero must decode to 0", d, x, names=("d", "x"))
    assert_all((d == 0) | (np.sign(d) == np.sign(x)), f"{name} flipped a sign", d, x, names=("d", "x"))
    assert_all(ad <= m, "|decoded| above the block max", d, m, names=("d", "m"))
    return m, ad, ax


def check_levels(case, codec, x, d, body, blocks, first):
    M = (1 << (case.bits - 1)) - 1
    m, ad, ax = signed_levels_below_block_max("log", x, d, body, blocks)
    # |d| is one of m * 2**-j, j = 0..M-1 (rounded to float32), or 0
    with np.errstate(divide="ignore", invalid="ignore"):
        j = np.clip(np.rint(np.log2(np.where(ad > 0, m / ad, 1.0))), 0, M - 1)
    level = np.ldexp(m, -j.astype(np.int64))
    assert_all((ad == 0) | (np.abs(ad - level) <= 2 * EPS32 * level + TINY32), "not a power-of-two level",
               d, m, names=("d", "m"))
    s = np.ldexp(m, 1 - M)  # smallest level
    slack = 1 + 2.0 ** -20
    if case.options.get("rounding", "stochastic") == "nearest":
        ok = np.where(ax >= s, np.abs(ad - ax) <= ax / 3 * slack + TINY32,
                      np.abs(ad - ax) <= s / 2 * slack + TINY32)
        assert_all(ok, "nearest log rounding error beyond the documented bound", d, x, m, names=("d", "x", "m"))
    else:  # between the two neighbouring levels
        ok = np.where(ax >= s, (ad <= 2 * ax * slack + TINY32) & (ad >= ax / 2 / slack - TINY32),
                      (ad == 0) | (np.abs(ad - s) <= 2 * EPS32 * s + TINY32))
        assert_all(ok, "stochastic log value not a neighbouring level", d, x, m, names=("d", "x", "m"))


SPEC = CodecSpec(expected_nbytes=scaled_nbytes, check_levels=check_levels, ref_decode=lazy("test_codec_log", "ref_decode_log"))
