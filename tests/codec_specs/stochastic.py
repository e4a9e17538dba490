"""stochastic: unbiased stochastic rounding on the block's min-max grid (codecs/uniform.py)."""
from . import CodecSpec
from ._ref import check_minmax_grid, minmax_nbytes, minmax_ref_decode


def check_levels(case, codec, x, d, body, blocks, first):
    check_minmax_grid(case, codec, x, d, body, blocks, first, nearest=False)


SPEC = CodecSpec(expected_nbytes=minmax_nbytes, check_levels=check_levels, ref_decode=minmax_ref_decode("stochastic"),
                 range_meta=True,
                 ddp_examples=((2, {"block_size": 16}), (3, {"block_size": "layer"})))
