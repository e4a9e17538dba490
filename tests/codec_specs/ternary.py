"""ternary: {-a, 0, +a} per block, stochastic or threshold rounding, 2-bit or base-3 codes (codecs/ternary.py)."""
import numpy as np

from . import CodecSpec
from ._ref import TINY32, assert_all, assert_close, assert_equal, ceil_div, lazy, meta_floats, nblocks


def expected_nbytes(bits, options, numels):
    n = sum(numels)
    return 4 * nblocks(numels, options) + (ceil_div(n, 4) if options.get("packing", "2bit") == "2bit" else ceil_div(n, 5))


def check_levels(case, codec, x, d, body, blocks, first):
    a_b = meta_floats(body, blocks.count)
    a = blocks.expand(a_b)
    ax = np.abs(x)
    assert_all((d == 0) | (d == a) | (d == -a), "ternary value not in {-a, 0, +a}", d, a, names=("d", "a"))
    assert_all((d == 0) | (np.sign(d) == np.sign(x)), "ternary flipped a sign", d, x, names=("d", "x"))
    assert_all(np.where(x == 0, d == 0, True), "zero must decode to 0", d, x, names=("d", "x"))
    if case.options.get("rounding", "stochastic") == "stochastic":
        assert_equal(a_b, blocks.reduce(np.maximum, ax), "ternary scale must be max |x|")
        assert_all(np.where((ax == a) & (a > 0), d == np.sign(x) * a, True), "the block max must be kept",
                   d, x, names=("d", "x"))
        return
    delta = blocks.reduce(np.add, ax) / blocks.lengths * case.options.get("threshold", 0.7) if blocks.count else \
        np.zeros(0)
    de = blocks.expand(delta)
    unsure = np.abs(ax - de) <= 1e-10 * de
    kept = ax > de
    assert_all(unsure | ((d != 0) == (kept & (a > 0))), "threshold selection differs from |x| > delta",
               d, x, de, names=("d", "x", "delta"))
    if not unsure.any():
        cnt = blocks.reduce(np.add, kept.astype(np.float64))
        tot = blocks.reduce(np.add, np.where(kept, ax, 0.0))
        with np.errstate(invalid="ignore"):
            ref = np.where(cnt > 0, tot / np.maximum(cnt, 1), 0.0)
        assert_close(a_b, ref, rtol=2.0 ** -22, atol=TINY32, what="threshold scale = mean kept |x|")


SPEC = CodecSpec(expected_nbytes=expected_nbytes, check_levels=check_levels,
                 ref_decode=lazy("test_codec_ternary", "ref_decode_ternary"),
                 ddp_examples=((8, {}), (8, {"rounding": "threshold", "packing": "base3", "block_size": "layer"})))
