"""sign: 1-bit signs with one scale per block, mean |x| or stochastic with max |x| (codecs/sign.py)."""
import numpy as np

from . import CodecSpec
from ._ref import TINY32, assert_all, assert_close, assert_equal, ceil_div, lazy, meta_floats, nblocks


def expected_nbytes(bits, options, numels):
    return 4 * nblocks(numels, options) + ceil_div(sum(numels), 8)


def check_levels(case, codec, x, d, body, blocks, first):
    a_b = meta_floats(body, blocks.count)
    a = blocks.expand(a_b)
    if case.options.get("mode", "scaled") == "scaled":
        ref = (blocks.reduce(np.add, np.abs(x)) / blocks.lengths).astype(np.float32).astype(np.float64) \
            if blocks.count else np.zeros(0)
        assert_close(a_b, ref, rtol=2.0 ** -22, atol=TINY32, what="sign scale = mean |x|")
        assert_all(d == np.where(x < 0, -a, a), "sign: +a for x >= 0 (and -0.0), -a for x < 0", d, x, a,
                   names=("d", "x", "a"))
        return
    assert_equal(a_b, blocks.reduce(np.maximum, np.abs(x)), "stochastic sign scale = max |x|")
    assert_all((d == a) | (d == -a), "sign value not +-a", d, a, names=("d", "a"))
    assert_all(np.where((np.abs(x) == a) & (a > 0), d == np.sign(x) * a, True), "the extremes keep their sign",
               d, x, names=("d", "x"))


SPEC = CodecSpec(expected_nbytes=expected_nbytes, check_levels=check_levels,
                 ref_decode=lazy("test_codec_sign", "ref_decode_sign"),
                 ddp_examples=((8, {}), (8, {"mode": "stochastic", "block_size": 32})))
