"""kmeans: per-block 1-D k-means codebook sent in the payload (codecs/kmeans.py)."""
import numpy as np
import torch

from . import CodecSpec
from ._ref import EPS32, TINY32, ceil_div, lazy, meta_floats, nblocks


def expected_nbytes(bits, options, numels):
    return 4 * nblocks(numels, options) * 2 ** bits + ceil_div(sum(numels) * bits, 8)


def _rows_member(levels: torch.Tensor, values: torch.Tensor):
    """Per row: distance of ``values`` to the nearest level."""
    idx = torch.searchsorted(levels, values).clamp_(0, levels.shape[1] - 1)
    below = (idx - 1).clamp_(min=0)
    a, b = levels.gather(1, below), levels.gather(1, idx)
    return torch.minimum((values - a).abs(), (values - b).abs())


def check_levels(case, codec, x, d, body, blocks, first):
    K = 1 << case.bits
    cb = meta_floats(body, K * blocks.count).reshape(-1, K)
    assert np.all(np.diff(cb, axis=1) >= 0), "codebooks must be sorted"
    m_b = blocks.reduce(np.maximum, np.abs(x))
    assert np.all(np.abs(cb) <= m_b[:, None]), "codebook level beyond the block max |x|"
    if first:  # a fresh fit: levels are means of (sub)sample values, within the block's range
        lo, hi, tol = blocks.reduce(np.minimum, x), blocks.reduce(np.maximum, x), 4 * EPS32 * m_b + TINY32
        assert np.all((cb >= (lo - tol)[:, None]) & (cb <= (hi + tol)[:, None])), "level outside [min, max]"
    for start, nb, blen, first_block in blocks.rows():
        sl = slice(start, start + nb * blen)
        levels = torch.from_numpy(cb[first_block:first_block + nb])
        dv = torch.from_numpy(d[sl]).view(nb, blen)
        xv = torch.from_numpy(x[sl]).view(nb, blen)
        assert bool((_rows_member(levels, dv) == 0).all()), "decoded value not in its block's codebook"
        mb = torch.from_numpy(m_b[first_block:first_block + nb])[:, None]
        gap = (xv - dv).abs() - _rows_member(levels, xv)
        assert bool((gap <= 4 * EPS32 * mb + TINY32).all()), "a value did not get its nearest level"
        if first and blen <= case.options.get("sample", 65536):
            # at most K distinct values in the (whole-block) sample: they are the codebook
            for i in range(nb):
                xb = xv[i]
                if torch.unique(xb).numel() <= K:
                    tol = 2.0 ** -22 * xb.abs() + 2 * TINY32 * max(float(mb[i]), 1.0)
                    assert bool(((dv[i] - xb).abs() <= tol).all()), "a block of <= K distinct values must be exact"


def fuzz_adjust(options, numels):
    bs = options.get("block_size")
    if isinstance(bs, int):
        # a codebook of 2^bits floats per block: keep kmeans to <= 512 blocks per bucket
        options["block_size"] = max(bs, -(-max(numels) // 64), -(-sum(numels) // 512))
    return options


SPEC = CodecSpec(expected_nbytes=expected_nbytes, check_levels=check_levels,
                 ref_decode=lazy("test_codec_kmeans", "ref_decode_kmeans"), fuzz_adjust=fuzz_adjust,
                 stateful=True, slow=True,
                 ddp_examples=((3, {}), (2, {"block_size": "layer", "refresh_every": 2})))
