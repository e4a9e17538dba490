"""qsgd: sign + stochastic levels l ||v|| / s of the block's L2 norm (codecs/qsgd.py)."""
import numpy as np

from . import CodecSpec
from ._ref import (EPS32, FP32_MAX, TINY32, assert_all, assert_equal, levels_ok, meta_floats, minmax_nbytes,
                   minmax_ref_decode)


def check_levels(case, codec, x, d, body, blocks, first):
    meta = meta_floats(body, 2 * blocks.count).reshape(-1, 2)
    lo_b, hi_b = meta[:, 0], meta[:, 1]
    assert_equal(lo_b, -hi_b, "qsgd sends lo = -||v||")
    norm = np.sqrt(blocks.reduce(np.add, x * x)) if blocks.count else np.zeros(0)
    amax = blocks.reduce(np.maximum, np.abs(x))
    ref = np.minimum(np.maximum(norm, amax), FP32_MAX)
    assert np.all(hi_b >= amax), "the norm must never come out below max |v|"
    assert np.all(hi_b <= FP32_MAX)
    # a float32 sum of squares: relative error up to (block length) * 2**-24 in the worst case
    rtol = 1e-6 + blocks.lengths * 2.0 ** -24
    assert_all(np.abs(hi_b - ref) <= rtol * ref + 4 * TINY32, "block norm", hi_b, ref, names=("sent", "norm"))
    s = (1 << (case.bits - 1)) - 1
    N = blocks.expand(hi_b)
    step = N / s
    tol = 1e-5 * step + 4 * EPS32 * N + 4 * TINY32
    assert_all(levels_ok(d, -N, step, 2 * s, tol), "decoded value off the grid l ||v|| / s", d, N, x,
               names=("d", "N", "x"))
    # the sign is kept, except that the float32 round-off of the code position (documented in
    # uniform.py: a few 2**-21 of the L = 2s levels) may send a value that close to 0 to -+1 level
    near_zero = (np.abs(x) <= 2.0 ** -18 * N) & (np.abs(d) <= step + tol)
    assert_all((d * x >= -tol * np.abs(x)) | near_zero, "qsgd flipped a sign", d, x, N, names=("d", "x", "N"))
    assert_all(np.abs(d - x) <= step * (1 + 2.0 ** -9) + tol, "qsgd rounding beyond one level", d, x, step,
               names=("d", "x", "step"))


SPEC = CodecSpec(expected_nbytes=minmax_nbytes, check_levels=check_levels, ref_decode=minmax_ref_decode("qsgd"),
                 range_meta=True,
                 ddp_examples=((4, {}),                     # w >= 1: without error feedback
                               (8, {"block_size": 64})))    # w = min(64/127^2, 8/127) < 1: with error feedback
