"""topk: the k largest |x| per block, packed block-relative indices + fp32 or any codec's values (codecs/topk.py)."""
import importlib
import math

import numpy as np
import torch

from ddp_qhooks.codecs import CODECS, codec_options, make_codec

from . import CodecSpec, spec
from ._ref import ceil_div, default_of, ref_block_lengths, topk_k

_CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16}


def expected_nbytes(bits, options, numels):
    per_width: dict[int, int] = {}
    blens, counts = np.unique(ref_block_lengths(numels, options.get("block_size")), return_counts=True)
    for blen, count in zip(blens.tolist(), counts.tolist()):
        w = math.ceil(math.log2(blen)) if blen > 1 else 0
        per_width[w] = per_width.get(w, 0) + count * topk_k(options, blen)
    index = sum(ceil_div(n_w * min(8, w - f), 8) for w, n_w in per_width.items() if w for f in range(0, w, 8))
    kept = sum(per_width.values())
    values = options.get("values", "fp32")
    if values == "fp32":
        return index + 4 * kept
    if options.get("value_block_size") is not None:
        vopts = {"block_size": options["value_block_size"]}
    else:  # the value codec at its own default blocks
        vopts = {"block_size": default_of(values, "block_size")} if "block_size" in codec_options(values) else {}
    return index + spec(values).expected_nbytes(make_codec(values, bits, **vopts).bits, vopts, [kept])


def check_levels(case, codec, x, d, body, blocks, first):
    ax = np.abs(x)
    fp32 = case.options.get("values", "fp32") == "fp32"
    for start, nb, blen, _ in blocks.rows():
        sl = slice(start, start + nb * blen)
        k = topk_k(case.options, blen)
        xv, dv, av = x[sl].reshape(nb, blen), d[sl].reshape(nb, blen), ax[sl].reshape(nb, blen)
        nz = dv != 0
        cnt = nz.sum(1)
        assert np.all(cnt <= k), f"more than k={k} values sent in a block"
        # a value is sent only if its |x| is among the k largest of its block
        kth = np.partition(av, blen - k, axis=1)[:, blen - k]
        assert np.all(np.where(nz, av >= kth[:, None], True)), "a value outside the top-k was sent"
        if fp32:
            assert np.all((dv == 0) | (dv == xv)), "kept fp32 values must be exact"
            assert np.all(cnt == np.minimum(k, (xv != 0).sum(1))), "exactly k values (or every non-zero) kept"


def finite(options, x):
    """An fp16 / bf16 value codec must send each block's max |x|: finite where that format holds it."""
    fmt = _CASTS.get(options.get("values"))
    return True if fmt is None else bool(torch.isfinite(x.float().abs().max().to(fmt)))


def fuzz_options(block_sizes):
    from hypothesis import strategies as st
    how_s = st.sampled_from(["default", "ratio", "k"])
    ratio_s = st.sampled_from([0.07, 0.5, 1.0, 1e-9, 0.3333])
    k_s = st.sampled_from([1, 2, 3, 100])
    values_s = st.sampled_from(["fp32", "fp32", "fp32"] + sorted(n for n in CODECS if n != "topk"))
    value_bs = st.sampled_from(["layer", 1, 5, 64])

    @st.composite
    def options(draw):
        opts = {"block_size": draw(block_sizes)}
        how = draw(how_s)
        if how == "ratio":
            opts["ratio"] = draw(ratio_s)
        elif how == "k":
            opts["k"] = draw(k_s)
        values = draw(values_s)
        opts["values"] = values
        if values != "fp32" and "block_size" in codec_options(values) and draw(st.booleans()):
            # (a kmeans codebook per tiny block of kept values would cost seconds per example)
            opts["value_block_size"] = "layer" if values == "kmeans" else draw(value_bs)
        return opts
    return options()


def ref_decode(body, param_numels, **config):
    """topk's reference for raw values; for a quantized values section, the kept positions from the
    topk reference parser and the values from the value codec's own reference decoder."""
    topk = importlib.import_module("test_codec_topk")
    if config["values"] in ("fp32", "none", "fp16", "bf16"):
        return topk.ref_decode_topk(body, param_numels, **config)
    positions, values_at, ks = topk.ref_parse_topk(body, param_numels, **config)
    value_cfg = dict(config["value_config"])
    value_codec = value_cfg.pop("codec")
    values = spec(value_codec).ref_decode(np.asarray(body)[values_at:], [int(ks.sum())], **value_cfg)
    out = np.zeros(sum(param_numels))
    out[positions] = values
    return out


SPEC = CodecSpec(expected_nbytes=expected_nbytes, check_levels=check_levels, ref_decode=ref_decode, finite=finite,
                 fuzz_options=fuzz_options, slow=True,
                 ddp_examples=((8, {"ratio": 0.1}), (8, {"k": 5, "block_size": "layer", "values": "fp16"}),
                               (4, {"ratio": 0.2, "values": "stochastic"})))
