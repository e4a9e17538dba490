"""Tests for the top-k sparsification codec (ddp_qhooks/codecs/topk.py).

The codec is checked against an independent numpy reference written from the body layout in the
module docstring (its own block segmentation, k-per-block rule, width grouping, field split and
bit unpacking of the packed-code layouts documented in packing.py), and the selection against
numpy's sort: with distinct magnitudes the kept set must be exactly the k largest per block.
"""
from __future__ import annotations

import math
import pickle
from fractions import Fraction

import numpy as np
import pytest
import torch
from _reference import decode, ref_block_lengths, ref_unpack

from ddp_qhooks.codecs import CODECS, Layout, make_codec
from ddp_qhooks.codecs.topk import TopKCodec

EPS32 = 2.0 ** -23


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------
# independent reference
# ------------------------------------------------------------------------------------------------


def ref_k(blen, ratio=None, k=None):
    if k is not None:
        return min(k, blen)
    r = Fraction(repr(float(0.01 if ratio is None else ratio)))  # the decimal value, as documented
    return min(blen, max(1, math.ceil(r * blen)))


def ref_index_width(blen):
    return math.ceil(math.log2(blen)) if blen > 1 else 0


VALUE_BYTES = {"fp32": 4, "none": 4, "fp16": 2, "bf16": 2}


def ref_parse_topk(body, param_numels, block_size=None, ratio=None, k=None, values="fp32", **_):
    """(absolute positions in block order, index section bytes, per-block k) from the body bytes."""
    body = np.asarray(body, dtype=np.uint8)
    lengths = ref_block_lengths(param_numels, block_size)
    ks = np.array([ref_k(n, ratio, k) for n in lengths], dtype=np.int64)
    starts = np.cumsum([0] + lengths[:-1]).astype(np.int64)[: len(lengths)]
    widths = np.array([ref_index_width(n) for n in lengths], dtype=np.int64)
    slot_width = np.repeat(widths, ks)
    rel = np.zeros(int(ks.sum()), dtype=np.int64)   # width-0 blocks: index 0
    pos = 0
    for w in sorted(set(widths.tolist()) - {0}):
        n_w = int((slot_width == w).sum())
        idx = np.zeros(n_w, dtype=np.int64)
        for shift in range(0, w, 8):
            b = min(8, w - shift)
            nbytes = (n_w * b + 7) // 8
            idx |= ref_unpack(body[pos:pos + nbytes], b, n_w) << shift
            pos += nbytes
        rel[slot_width == w] = idx   # block order inside a width's stream
    blen_of_slot = np.repeat(np.array(lengths, dtype=np.int64), ks)
    assert np.all(rel < blen_of_slot), "index beyond its block"
    return np.repeat(starts, ks) + rel, pos, ks


def ref_decode_topk(body: np.ndarray, param_numels: list[int], **config) -> np.ndarray:
    """float64 decode of a values='fp32' / 'none' / 'fp16' / 'bf16' body."""
    body = np.asarray(body, dtype=np.uint8)
    values = config.get("values", "fp32")
    positions, pos, ks = ref_parse_topk(body, param_numels, **config)
    K = int(ks.sum())
    assert body.size == pos + VALUE_BYTES[values] * K, "body size differs from the documented layout"
    raw = body[pos:].tobytes()
    if values == "bf16":  # the high half of a float32
        vals = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        vals = vals.view(np.float32).astype(np.float64)
    else:
        vals = np.frombuffer(raw, dtype="<f2" if values == "fp16" else "<f4").astype(np.float64)
    out = np.zeros(sum(param_numels))
    assert np.unique(positions).size == positions.size, "a position sent twice"
    out[positions] = vals
    return out


def ref_value_nbytes(values, bits, value_block_size, K):
    if values in VALUE_BYTES:
        return VALUE_BYTES[values] * K
    assert values in ("uniform", "stochastic")
    # value_block_size=None: the value codec's own default, blocks of 256 (documented in uniform.py)
    nblocks = len(ref_block_lengths([K], 256 if value_block_size is None else value_block_size))
    return 8 * nblocks + (K * bits + 7) // 8


def ref_body_nbytes(param_numels, block_size=None, ratio=None, k=None, values="fp32", bits=8,
                    value_block_size=None):
    lengths = ref_block_lengths(param_numels, block_size)
    ks = [ref_k(n, ratio, k) for n in lengths]
    per_width = {}
    for n, kb in zip(lengths, ks):
        per_width[ref_index_width(n)] = per_width.get(ref_index_width(n), 0) + kb
    index = sum((n_w * min(8, w - f) + 7) // 8 for w, n_w in per_width.items() for f in range(0, w, 8))
    return index + ref_value_nbytes(values, bits, value_block_size, sum(ks))


def ref_topk_mask(x: np.ndarray, param_numels, block_size, ratio=None, k=None) -> np.ndarray:
    """Kept positions for distinct magnitudes: numpy's sort, one block id per element."""
    lengths = ref_block_lengths(param_numels, block_size)
    n = sum(lengths)
    block = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.repeat(np.cumsum([0] + lengths[:-1])[: len(lengths)], lengths)
    order = np.lexsort((-np.abs(x), block))          # by block, then by decreasing magnitude
    rank = np.arange(n) - starts                     # rank of order[i] within its block
    ks = np.repeat([ref_k(b, ratio, k) for b in lengths], lengths)
    mask = np.zeros(n, dtype=bool)
    mask[order[rank < ks]] = True
    return mask


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def encode(codec, x, layout, key=0, error_out=None):
    body = torch.full((codec.body_nbytes(layout),), 0xA5, dtype=torch.uint8)   # dirty: all bytes must be written
    info = codec.encode(x, body, layout, key=key, error_out=error_out)
    return body, info


def distinct_data(n, seed, dtype=torch.float32):
    """Distinct magnitudes, exact in ``dtype`` (fp16: up to 2048 values; bf16: up to 8000), random signs."""
    rng = np.random.default_rng(seed)
    if dtype == torch.bfloat16:   # consecutive bf16 numbers from 1.0 up (all exact in fp16 too)
        mags = ((0x3F80 + rng.permutation(n).astype(np.uint32)) << 16).view(np.float32).astype(np.float64)
    else:
        mags = (rng.permutation(n) + 1).astype(np.float64) / 64
    x = mags * rng.choice([-1.0, 1.0], size=n)
    return torch.from_numpy(x).to(dtype)


def kept_values_codec(values, bits, value_block_size):
    opts = {} if value_block_size is None else {"block_size": value_block_size}
    return make_codec(values, bits, **opts)


LAYOUTS = {
    "empty": [0],
    "one": [1],
    "seven": [7],
    "n1001": [1001],
    "n100003": [100003],
    "ragged": [1, 0, 5, 64, 65, 130, 7, 1003, 2],
    "ragged2": [3, 0, 300, 1, 17, 2, 4096],
}
SELECTIONS = [dict(), dict(ratio=0.1), dict(ratio=0.5), dict(ratio=1.0), dict(k=1), dict(k=3), dict(k=100)]
BLOCK_SIZES = [None, "layer", 1, 2, 7, 64, 1000]


def _cases():
    for name in LAYOUTS:
        for block_size in BLOCK_SIZES:
            for sel in SELECTIONS:
                if name == "n100003" and (block_size in (1, 2, 7) or sel in (dict(ratio=0.5), dict(ratio=1.0))):
                    continue  # the big layout: enough at a few settings
                yield pytest.param(name, block_size, sel, id=f"{name}-{block_size}-{'-'.join(f'{k}{v}' for k, v in sel.items()) or 'default'}")


# ------------------------------------------------------------------------------------------------
# selection, values, layout
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout_name, block_size, sel", list(_cases()))
def test_keeps_exactly_the_k_largest(layout_name, block_size, sel):
    numels = LAYOUTS[layout_name]
    layout = Layout(numels)
    x = distinct_data(layout.numel, seed=len(numels) * 31 + (block_size if isinstance(block_size, int) else 0))
    codec = TopKCodec(block_size=block_size, **sel)
    body, info = encode(codec, x, layout)
    assert info.finite
    assert body.numel() == ref_body_nbytes(numels, block_size, **sel)
    out = decode(codec, [body], layout)
    ref = ref_decode_topk(body.numpy(), numels, **codec.config())
    np.testing.assert_array_equal(out.numpy().astype(np.float64), ref)
    xd = x.double().numpy()
    mask = ref_topk_mask(xd, numels, block_size, **sel)
    positions, _, ks = ref_parse_topk(body.numpy(), numels, **codec.config())
    assert sorted(positions.tolist()) == np.flatnonzero(mask).tolist()
    np.testing.assert_array_equal(ref[mask], xd[mask])   # fp32 values: exact
    assert not ref[~mask].any()
    assert codec.k_per_block(layout) == tuple(ks.tolist())
    # kept positions ascend inside every block (canonical bodies)
    lengths = ref_block_lengths(numels, block_size)
    block_of = np.repeat(np.arange(len(lengths)), ks)
    same = block_of[1:] == block_of[:-1]
    assert np.all(np.diff(positions)[same] > 0)


@pytest.mark.parametrize("block_size", [None, "layer", 5, 64])
@pytest.mark.parametrize("sel", [dict(ratio=0.1), dict(k=4), dict(ratio=0.6)])
def test_ties_keep_count_and_magnitude_order(block_size, sel):
    numels = [1, 0, 5, 64, 65, 130, 7, 1003, 2]
    layout = Layout(numels)
    rng = np.random.default_rng(11)
    x = torch.from_numpy(rng.integers(-3, 4, size=layout.numel).astype(np.float32))   # many equal magnitudes
    codec = TopKCodec(block_size=block_size, **sel)
    body, _ = encode(codec, x, layout)
    positions, _, ks = ref_parse_topk(body.numpy(), numels, **codec.config())
    lengths = ref_block_lengths(numels, block_size)
    starts = np.cumsum([0] + lengths[:-1])[: len(lengths)]
    kept = np.zeros(layout.numel, dtype=bool)
    kept[positions] = True
    assert kept.sum() == positions.size == ks.sum()
    np.testing.assert_array_equal(np.add.reduceat(kept.astype(np.int64), starts), ks)   # exactly k per block
    mag = np.abs(x.numpy().astype(np.float64))
    kept_min = np.minimum.reduceat(np.where(kept, mag, np.inf), starts)
    dropped_max = np.maximum.reduceat(np.where(kept, -np.inf, mag), starts)
    assert np.all(kept_min >= dropped_max)
    out = decode(codec, [body], layout)
    np.testing.assert_array_equal(out.numpy(), np.where(kept, x.numpy(), 0))


def test_k_per_block_formula():
    c = TopKCodec(ratio=0.1)
    assert [c.k_for(n) for n in (1, 9, 10, 11, 30, 1000)] == [1, 1, 1, 2, 3, 100]
    # decimal ratios: 0.07 * 100 == 7.000000000000001 and 0.14 * 100 == 14.000000000000002 in floats
    assert TopKCodec(ratio=0.07).k_for(100) == 7 and TopKCodec(ratio=0.14).k_for(100) == 14
    assert [TopKCodec(ratio=0.7).k_for(n) for n in (10, 3)] == [7, 3]
    assert [TopKCodec(ratio=1).k_for(n) for n in (1, 5, 77)] == [1, 5, 77]
    assert [TopKCodec().k_for(n) for n in (1, 99, 100, 101, 1000)] == [1, 1, 1, 2, 10]   # default ratio 0.01
    assert [TopKCodec(k=5).k_for(n) for n in (1, 3, 5, 100)] == [1, 3, 5, 5]
    numels = [3, 0, 300, 1, 17, 2, 4096]
    for block_size in BLOCK_SIZES:
        for sel in SELECTIONS:
            codec = TopKCodec(block_size=block_size, **sel)
            expect = tuple(ref_k(n, **sel) for n in ref_block_lengths(numels, block_size))
            assert codec.k_per_block(Layout(numels)) == expect
    # with block_size None, k is per bucket; with a block size, per block
    assert TopKCodec(k=10).k_per_block(Layout([30, 40])) == (10,)
    assert TopKCodec(k=10, block_size=25).k_per_block(Layout([30, 40])) == (10, 5, 10, 10)


@pytest.mark.parametrize("cfg", [dict(), dict(block_size=7, ratio=0.3), dict(block_size="layer", k=2),
                                 dict(values="uniform", bits=4), dict(values="stochastic", bits=3, value_block_size=16),
                                 dict(values="fp16", block_size=64, ratio=0.25), dict(values="bf16", k=33)])
def test_body_size_formula_and_fixed(cfg):
    for numels in ([0], [1], [7], [1001], [100003], [1, 0, 5, 64, 65, 130, 7, 1003, 2], [70000, 3, 300]):
        layout = Layout(numels)
        codec = TopKCodec(**cfg)
        nbytes = ref_body_nbytes(numels, **cfg)
        assert codec.body_nbytes(layout) == nbytes
        if layout.numel in (1001, 7):
            for seed in range(3):   # every input fills exactly those bytes
                x = torch.randn(layout.numel, generator=torch.Generator().manual_seed(seed)) * 10 ** seed
                body, info = encode(codec, x, layout, key=seed)
                assert info.finite and body.numel() == nbytes
                positions, _, ks = ref_parse_topk(body.numpy(), numels, **cfg)
                assert positions.size == ks.sum()


def test_index_fields_of_a_wide_block():
    """A 2**22 + 5 element block has 23-bit indices: fields of 8, 8 and 7 bits (a 2-element block: 1 bit)."""
    numels = [(1 << 22) + 5, 2]
    layout = Layout(numels)
    codec = TopKCodec(k=3, block_size="layer")
    assert codec.body_nbytes(layout) == 3 * 3 + 1 + 4 * 5
    x = torch.zeros(layout.numel)
    x[[0, 3_000_000, (1 << 22) + 4, (1 << 22) + 5]] = torch.tensor([1.0, -2.0, 3.0, 4.0])
    x[(1 << 22) + 6] = 0.5
    body, _ = encode(codec, x, layout)
    positions, _, _ = ref_parse_topk(body.numpy(), numels, block_size="layer", k=3)
    assert positions.tolist() == [0, 3_000_000, (1 << 22) + 4, (1 << 22) + 5, (1 << 22) + 6]
    np.testing.assert_array_equal(decode(codec, [body], layout).numpy(), x.numpy())


@pytest.mark.parametrize("block_size", [None, "layer", 3])
def test_zero_and_constant_blocks(block_size):
    numels = [10, 7, 0, 20, 1]
    layout = Layout(numels)
    codec = TopKCodec(block_size=block_size, ratio=0.25)
    zeros = torch.zeros(layout.numel)
    body, info = encode(codec, zeros, layout)
    assert info.finite
    positions, _, ks = ref_parse_topk(body.numpy(), numels, **codec.config())
    assert positions.size == ks.sum() and np.unique(positions).size == positions.size
    assert not decode(codec, [body], layout).any()
    const = torch.cat([torch.full((n,), c) for n, c in zip(numels, (2.5, -1.0, 9.0, 0.125, 3.0))])
    body, _ = encode(codec, const, layout)
    out = decode(codec, [body], layout)
    positions, _, ks = ref_parse_topk(body.numpy(), numels, **codec.config())
    kept = np.zeros(layout.numel, dtype=bool)
    kept[positions] = True
    assert kept.sum() == ks.sum()
    np.testing.assert_array_equal(out.numpy(), np.where(kept, const.numpy(), 0))


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("values", ["fp32", "fp16"])
def test_low_precision_inputs(in_dtype, values):
    numels = [1, 0, 5, 64, 65, 130, 7, 1003, 2]
    layout = Layout(numels)
    x = distinct_data(layout.numel, seed=5, dtype=in_dtype)   # magnitudes k/64, k <= 1277: exact in both
    codec = TopKCodec(block_size=16, ratio=0.2, values=values)
    err = torch.empty(layout.numel)
    body, info = encode(codec, x, layout, error_out=err)
    assert info.finite
    out = decode(codec, [body], layout)
    ref = ref_decode_topk(body.numpy(), numels, **codec.config())
    np.testing.assert_array_equal(out.numpy().astype(np.float64), ref)
    xd = x.double().numpy()
    mask = ref_topk_mask(xd, numels, 16, ratio=0.2)
    np.testing.assert_array_equal(ref, np.where(mask, xd, 0))
    assert torch.equal(err, x.float() - out)
    out16 = decode(codec, [body], layout, dtype=in_dtype)
    assert torch.equal(out16, out.to(in_dtype))


def test_empty_and_no_bodies():
    for cfg in (dict(), dict(values="uniform", bits=4), dict(values="fp16", block_size=3)):
        codec = TopKCodec(**cfg)
        layout = Layout([0, 0])
        assert codec.body_nbytes(layout) == 0
        err = torch.empty(0)
        body, info = encode(codec, torch.zeros(0), layout, error_out=err)
        assert info.finite and info.error_sq == 0.0 and info.input_sq == 0.0
        assert decode(codec, [body], layout).numel() == 0
        assert not decode(codec, [], Layout([4, 3])).any()


# ------------------------------------------------------------------------------------------------
# value codecs
# ------------------------------------------------------------------------------------------------
HYBRIDS = [("uniform", 8, None), ("uniform", 4, None), ("stochastic", 8, None), ("stochastic", 4, None),
           ("uniform", 4, 16), ("stochastic", 4, "layer"), ("fp16", 8, None), ("bf16", 16, None), ("none", 8, None)]


@pytest.mark.parametrize("values, bits, value_block_size", HYBRIDS)
@pytest.mark.parametrize("block_size", [None, "layer", 50])
def test_value_codec_section(values, bits, value_block_size, block_size):
    """decode == the value codec's own decode of the values section, scattered to the kept positions."""
    numels = [1, 0, 5, 64, 65, 130, 7, 1003, 2]
    layout = Layout(numels)
    x = distinct_data(layout.numel, seed=17)
    codec = TopKCodec(bits=bits, block_size=block_size, ratio=0.1, values=values, value_block_size=value_block_size)
    vc = kept_values_codec(values, bits, value_block_size)
    assert codec.bits == vc.bits and codec.stochastic == vc.stochastic
    assert codec.config()["value_config"] == vc.config()
    err = torch.empty(layout.numel)
    body, info = encode(codec, x, layout, key=77, error_out=err)
    assert info.finite
    assert body.numel() == ref_body_nbytes(numels, block_size, ratio=0.1, values=values, bits=bits,
                                           value_block_size=value_block_size)
    positions, index_nbytes, ks = ref_parse_topk(body.numpy(), numels, block_size=block_size, ratio=0.1)
    K = int(ks.sum())
    vlayout = Layout.flat(K)
    section = body[index_nbytes:].clone()
    assert section.numel() == vc.body_nbytes(vlayout)
    kept_vals = torch.empty(K)
    vc.decode([section], vlayout, kept_vals)
    expect = torch.zeros(layout.numel)
    expect[torch.from_numpy(positions)] = kept_vals
    out = decode(codec, [body], layout)
    assert torch.equal(out, expect)
    mask = ref_topk_mask(x.double().numpy(), numels, block_size, ratio=0.1)
    assert sorted(positions.tolist()) == np.flatnonzero(mask).tolist()
    # the section is the value codec's encoding of the kept values, in block order
    vbody = torch.zeros(vc.body_nbytes(vlayout), dtype=torch.uint8)
    vc.encode(x[torch.from_numpy(positions)], vbody, vlayout, key=77)
    assert torch.equal(vbody, section)
    assert torch.equal(err, x - out)
    if values in ("uniform", "stochastic") and bits == 8:
        span = float(x.abs().max()) * 2
        assert float((out - x)[torch.from_numpy(mask)].abs().max()) <= span / 255 * (1 + 1e-5)


def test_every_registered_codec_works_as_value_codec():
    numels = [5, 64, 1003]
    layout = Layout(numels)
    x = distinct_data(layout.numel, seed=3)
    for name in sorted(CODECS):
        if name == "topk":
            continue
        codec = TopKCodec(values=name, block_size="layer", ratio=0.05)
        vc = make_codec(name)
        body, info = encode(codec, x, layout, key=5)
        assert info.finite, name
        positions, index_nbytes, ks = ref_parse_topk(body.numpy(), numels, block_size="layer", ratio=0.05)
        kept_vals = torch.empty(int(ks.sum()))
        vc.decode([body[index_nbytes:].clone()], Layout.flat(int(ks.sum())), kept_vals)
        expect = torch.zeros(layout.numel)
        expect[torch.from_numpy(positions)] = kept_vals
        assert torch.equal(decode(codec, [body], layout), expect), name


# ------------------------------------------------------------------------------------------------
# residuals, averaging, robustness
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [dict(), dict(block_size=8, ratio=0.3), dict(values="uniform", bits=4, k=20),
                                 dict(values="stochastic", bits=2, block_size="layer"), dict(values="fp16", ratio=0.5)])
def test_error_out_is_input_minus_decode(cfg):
    numels = [1, 0, 5, 64, 65, 130, 7, 1003, 2]
    layout = Layout(numels)
    x = torch.randn(layout.numel, generator=torch.Generator().manual_seed(2)) * 3
    codec = TopKCodec(**cfg)
    err = torch.full((layout.numel,), 7.0)
    body, info = encode(codec, x, layout, key=9, error_out=err)
    out = decode(codec, [body], layout)
    assert torch.equal(err, x - out)
    e, v = err.double(), x.double()
    assert info.finite
    assert info.error_sq == pytest.approx(float(e @ e), rel=1e-12)
    assert info.input_sq == pytest.approx(float(v @ v), rel=1e-12)
    assert 0 < info.error_sq < info.input_sq
    # the body is the same with or without error_out
    assert torch.equal(encode(codec, x, layout, key=9)[0], body)


def test_error_feedback_telescopes():
    """With residuals, sum of sent tensors + final residual == sum of inputs, and every coordinate is sent."""
    n = 300
    layout = Layout([100, 200])
    codec = TopKCodec(block_size="layer", ratio=0.05)
    g = torch.Generator().manual_seed(4)
    residual = torch.zeros(n)
    sent_total = torch.zeros(n, dtype=torch.float64)
    grad_total = torch.zeros(n, dtype=torch.float64)
    ever = torch.zeros(n, dtype=torch.bool)
    for step in range(60):
        grad = torch.rand(n, generator=g) + 0.1
        x = grad + residual
        body, _ = encode(codec, x, layout, error_out=residual)
        sent = decode(codec, [body], layout)
        sent_total += sent.double()
        grad_total += grad.double()
        ever |= sent != 0
    np.testing.assert_allclose((sent_total + residual.double()).numpy(), grad_total.numpy(), rtol=1e-5)
    assert bool(ever.all())


@pytest.mark.parametrize("cfg", [dict(block_size=10, ratio=0.3), dict(values="uniform", bits=4, block_size="layer"),
                                 dict(values="fp16")])
@pytest.mark.parametrize("W", [1, 3])
def test_decode_mean_of_bodies(cfg, W):
    numels = [1, 0, 5, 64, 65, 130, 7, 1003, 2]
    layout = Layout(numels)
    codec = TopKCodec(**cfg)
    xs = [torch.randn(layout.numel, generator=torch.Generator().manual_seed(50 + r)) for r in range(W)]
    bodies = [encode(codec, x, layout, key=r)[0] for r, x in enumerate(xs)]
    singles = [decode(codec, [b], layout).double() for b in bodies]
    expect = sum(singles) / W
    # bodies at odd byte offsets of larger read-only-by-contract buffers
    shifted = []
    for r, b in enumerate(bodies):
        buf = torch.zeros(b.numel() + 8, dtype=torch.uint8)
        buf[r + 1:r + 1 + b.numel()] = b
        shifted.append(buf[r + 1:r + 1 + b.numel()])
    before = [s.clone() for s in shifted]
    out = decode(codec, shifted, layout, divisor=W)
    tol = 3 * EPS32 * sum(s.abs() for s in singles).numpy() / W   # float32 shares, summed in float32
    assert np.all(np.abs(out.double().numpy() - expect.numpy()) <= tol)
    assert all(torch.equal(s, b) for s, b in zip(shifted, before))
    if "values" not in cfg:
        ref = sum(ref_decode_topk(b.numpy(), numels, **codec.config()) for b in bodies) / W
        assert np.all(np.abs(out.double().numpy() - ref) <= tol)
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(decode(codec, shifted, layout, divisor=W, dtype=dtype), out.to(dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("cfg", [dict(), dict(block_size=4, ratio=0.25), dict(values="uniform", bits=4, k=2)])
def test_non_finite_input(bad, cfg):
    layout = Layout([10, 20])
    codec = TopKCodec(**cfg)
    for where in (0, 17, 29):
        for dtype in (torch.float32, torch.float16):
            x = torch.ones(30, dtype=dtype)
            x[5] = 100.0   # a large finite value that would win the selection
            x[where] = bad
            err = torch.full((30,), 3.0)
            body, info = encode(codec, x, layout, error_out=err)
            assert info.finite is False  # (error_out is then unspecified: callers drop it)


def test_value_codec_overflow_is_non_finite():
    codec = TopKCodec(values="fp16", k=2)
    x = torch.tensor([1.0, 1e6, -3.0, 0.5])
    err = torch.full((4,), 3.0)
    _, info = encode(codec, x, Layout.flat(4), error_out=err)
    assert info.finite is False  # (error_out is then unspecified)


def test_deterministic_and_keyed():
    layout = Layout([100, 901])
    x = torch.randn(layout.numel, generator=torch.Generator().manual_seed(1))
    det = TopKCodec(values="uniform", bits=3, ratio=0.2)
    assert torch.equal(encode(det, x, layout, key=1)[0], encode(det, x, layout, key=2)[0])
    sto = TopKCodec(values="stochastic", bits=3, ratio=0.2)
    assert torch.equal(encode(sto, x, layout, key=1)[0], encode(sto, x, layout, key=1)[0])
    assert not torch.equal(encode(sto, x, layout, key=1)[0], encode(sto, x, layout, key=2)[0])


# ------------------------------------------------------------------------------------------------
# options, config
# ------------------------------------------------------------------------------------------------
def test_config_and_attributes():
    c = TopKCodec()
    assert (c.name, c.codec_id, c.bits, c.stochastic) == ("topk", 13, 32, False)
    assert c.config() == {"codec": "topk", "bits": 32, "block_size": None, "ratio": 0.01, "k": None,
                          "values": "fp32", "value_config": None}
    assert TopKCodec(bits=32).config() == c.config()
    c2 = TopKCodec(bits=4, block_size=128, k=7, values="stochastic", value_block_size="layer")
    assert c2.config() == {"codec": "topk", "bits": 4, "block_size": 128, "ratio": None, "k": 7, "values": "stochastic",
                           "value_config": {"codec": "stochastic", "bits": 4, "block_size": "layer"}}
    assert c2.stochastic and TopKCodec.body_formula and TopKCodec.summary
    assert TopKCodec(values="fp16").bits == 16
    # config distinguishes what changes the wire format
    configs = [TopKCodec(**o).config() for o in (dict(), dict(ratio=0.02), dict(k=3), dict(block_size="layer"),
                                                dict(values="none"), dict(values="uniform", value_block_size=8))]
    assert len({repr(sorted(cf.items())) for cf in configs}) == len(configs)
    # pickles (as part of the hook state) and still encodes the same
    layout = Layout([50, 60])
    x = torch.randn(110, generator=torch.Generator().manual_seed(0))
    c3 = pickle.loads(pickle.dumps(c2))
    c2.body_nbytes(layout)
    assert c3.config() == c2.config()
    assert torch.equal(encode(c3, x, layout, key=4)[0], encode(c2, x, layout, key=4)[0])


@pytest.mark.parametrize("opts, match", [
    (dict(ratio=0), r"ratio must be a number in \(0, 1\]"),
    (dict(ratio=1.5), r"ratio must be a number in \(0, 1\]"),
    (dict(ratio=-0.1), r"ratio must"),
    (dict(ratio=float("nan")), r"ratio must"),
    (dict(ratio="0.1"), r"ratio must"),
    (dict(ratio=True), r"ratio must"),
    (dict(k=0), r"k must be a positive integer"),
    (dict(k=-3), r"k must be a positive integer"),
    (dict(k=2.5), r"k must be a positive integer"),
    (dict(k=True), r"k must be a positive integer"),
    (dict(ratio=0.1, k=3), r"either ratio .* or k"),
    (dict(block_size=0), r"block_size must be None .*'layer'"),
    (dict(block_size="bucket"), r"block_size must be None"),
    (dict(values="nope"), r"values must be one of fp32, .*bf16.*fp16.*none.*stochastic.*uniform"),
    (dict(values="topk"), r"values must be one of .*cannot nest"),
    (dict(values=None), r"values must be one of"),
    (dict(bits=4), r"bits must be 32"),
    (dict(bits=True), r"bits must be 32"),
    (dict(value_block_size=8), r"value_block_size only applies.*uniform"),
    (dict(values="uniform", bits=9), r"value codec 'uniform'.*bits must be an integer in 1..8"),
    (dict(values="uniform", value_block_size=0), r"value codec 'uniform'.*block_size must be"),
    (dict(values="fp16", bits=4), r"value codec 'fp16'"),
    (dict(values="fp16", value_block_size=8), r"value codec 'fp16'.*valid options"),
])
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        TopKCodec(**opts)


def test_numpy_integer_options_accepted():
    c = TopKCodec(k=np.int64(3), block_size=np.int32(10))
    assert c.config()["k"] == 3 and c.config()["block_size"] == 10
    assert TopKCodec(ratio=np.float32(0.5)).k_for(10) == 5
