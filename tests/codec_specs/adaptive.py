"""adaptive: uniform grid on a running min-max or percentile range per block (codecs/adaptive.py)."""
import math

import numpy as np

from . import CodecSpec
from ._ref import EPS32, assert_close, check_minmax_grid, default_of, lazy, minmax_nbytes


def _percentile_obs(case, xv: np.ndarray) -> np.ndarray:
    """The documented percentile observation of each row (block) of ``xv`` (nblocks, length)."""
    p, sample = case.options.get("percentile", 99.9), case.options.get("sample", 65536)
    a = np.abs(xv)
    if p == 100:
        return a.max(1)
    n = a.shape[1]
    S = min(sample, n)
    smp = a if n <= sample else a[:, np.arange(S, dtype=np.int64) * n // S]
    k = min(max(1, math.ceil(p * S / 100)), S)
    return np.partition(smp, k - 1, axis=1)[:, k - 1]


def check_adaptive_range(case, codec, x, blocks, lo_b, hi_b, first):
    """The range sent is the running statistic of the documented update rule, rounded to float32."""
    stat = case.options.get("stat", "minmax")
    if stat == "minmax":
        obs = np.stack([blocks.reduce(np.minimum, x), blocks.reduce(np.maximum, x)], 1)
    else:
        obs = np.zeros((blocks.count, 1))
        for start, nb, blen, first_block in blocks.rows():
            obs[first_block:first_block + nb, 0] = _percentile_obs(case, x[start:start + nb * blen].reshape(nb, blen))
    prev = case.extra.get("adaptive_prev")
    if first or prev is None:
        run = obs
    elif case.options.get("decay") is None:
        m = case.options.get("momentum", 0.9)
        run = prev * m + obs * (1 - m)
    else:
        dcy = case.options["decay"]
        if stat == "minmax":
            run = np.stack([np.minimum(obs[:, 0], prev[:, 0] * dcy), np.maximum(obs[:, 1], prev[:, 1] * dcy)], 1)
        else:
            run = np.maximum(obs, prev * dcy)
    case.extra["adaptive_prev"] = run
    lohi = run if stat == "minmax" else np.concatenate([-run, run], 1)
    want = lohi.astype(np.float32).astype(np.float64)
    assert_close(lo_b, want[:, 0], rtol=2 * EPS32, atol=0, what="adaptive lo")
    assert_close(hi_b, want[:, 1], rtol=2 * EPS32, atol=0, what="adaptive hi")


def check_levels(case, codec, x, d, body, blocks, first):
    check_minmax_grid(case, codec, x, d, body, blocks, first, nearest=case.options.get("grid") == "uniform",
                      range_check=lambda lo_b, hi_b: check_adaptive_range(case, codec, x, blocks, lo_b, hi_b, first))


SPEC = CodecSpec(expected_nbytes=lambda bits, options, numels: minmax_nbytes(bits, options, numels,
                                                                             default_of("adaptive", "block_size")),
                 check_levels=check_levels, ref_decode=lazy("test_codec_adaptive", "ref_decode_adaptive"),
                 stateful=True, slow=True, range_meta=True,
                 ddp_examples=((4, {}), (2, {"stat": "percentile", "grid": "uniform"})))
