"""Tests for the log codec (ddp_qhooks.codecs.log): sign + power-of-two levels below each block's max.

The codec is checked against an independent float64 numpy decoder written from the documented body
layout (float32 block maxima, then the packed codes in the layout of packing.py, sign in the top
bit), and against the documented rounding rules computed here from ``|x| / max`` in float64.
Tolerances: the codec forms ``r = |x| / max`` in float32 (one rounding: a relative 2**-24, or an
absolute 2**-150 for subnormal ``r``); the decoded float32 value is ``max * 2**-k`` rounded once,
so it equals the float64 reference rounded to float32 exactly.
"""
from __future__ import annotations

import math
import pickle
import statistics

import numpy as np
import pytest
import torch
from _reference import decode, f64, ref_block_lengths, ref_unpack

from ddp_qhooks.codecs.base import Layout
from ddp_qhooks.codecs.log import LogCodec

EPS32 = 2.0 ** -23
TINY32 = 2.0 ** -149
FP32_MAX = float(np.finfo(np.float32).max)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------
# independent reference
# ------------------------------------------------------------------------------------------------


def ref_split(body: np.ndarray, param_numels, bits, block_size):
    """(per-element max as float64, codes) from a body."""
    lengths = ref_block_lengths(param_numels, block_size)
    nb, n = len(lengths), sum(param_numels)
    body = np.asarray(body, dtype=np.uint8)
    assert body.size == 4 * nb + (n * bits + 7) // 8
    maxes = np.frombuffer(body[:4 * nb].tobytes(), dtype="<f4").astype(np.float64)
    return np.repeat(maxes, lengths), ref_unpack(body[4 * nb:], bits, n)


def ref_log_levels(bits: int) -> np.ndarray:
    """Relative magnitude levels, ascending: 0, 2**(1-M), ..., 1/2, 1 (index = magnitude code)."""
    M = 2 ** (bits - 1) - 1
    return np.array([0.0] + [2.0 ** (k - M) for k in range(1, M + 1)])


def ref_decode_log(body: np.ndarray, param_numels: list[int], **config) -> np.ndarray:
    """float64 decode of one body: sign bit b-1, magnitude code k -> max * 2**(k - M), 0 -> 0."""
    bits, block_size = config.get("bits", 8), config.get("block_size")
    m, codes = ref_split(body, param_numels, bits, block_size)
    mag = codes & (2 ** (bits - 1) - 1)
    neg = (codes >> (bits - 1)) == 1
    val = ref_log_levels(bits)[mag] * m
    return np.where(neg, -val, val)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def encode(codec, x, layout=None, key=0, error_out=None):
    layout = Layout.flat(x.numel()) if layout is None else layout
    body = torch.full((codec.body_nbytes(layout),), 0xAB, dtype=torch.uint8)   # dirty: every byte must be written
    info = codec.encode(x, body, layout, key=key, error_out=error_out)
    return body, info


def ragged_data(numels, seed, dtype=torch.float32):
    """Heavy-tailed parameters of very different scales, with exact zeros sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    scales = [1e-3, 1.0, 50.0, 0.2, 7.0]
    parts = []
    for i, n in enumerate(numels):
        v = torch.randn(n, generator=g) * torch.exp(2 * torch.randn(n, generator=g)) * scales[i % 5]
        v[torch.rand(n, generator=g) < 0.05] = 0.0
        parts.append(v)
    return (torch.cat(parts) if parts else torch.zeros(0)).to(dtype)


def neighbours(rel: np.ndarray, levels: np.ndarray):
    """Levels lo <= rel <= hi around each relative magnitude (lo == hi on a level)."""
    j = np.clip(np.searchsorted(levels, rel, side="right") - 1, 0, levels.size - 1)
    lo = levels[j]
    hi = np.where(rel > lo, levels[np.minimum(j + 1, levels.size - 1)], lo)
    return lo, hi


def check_log(codec, x, layout, body, out):
    """Every documented property of one body for input ``x`` (float32), against numpy float64."""
    bits, numels = codec.bits, list(layout.param_numels)
    lengths = ref_block_lengths(numels, codec.block_size)
    n = sum(numels)
    assert body.numel() == 4 * len(lengths) + math.ceil(n * bits / 8)
    xd = f64(x.float())
    m, codes = ref_split(body.numpy(), numels, bits, codec.block_size)
    # metadata: the exact max |x| of every block
    starts = np.cumsum([0] + lengths[:-1]).astype(np.int64)
    if n:
        np.testing.assert_array_equal(np.repeat(np.maximum.reduceat(np.abs(xd), starts), lengths), m)
    # codes: one zero code (no sign without magnitude), the sign of x otherwise
    M = 2 ** (bits - 1) - 1
    mag, neg = codes & M, codes >> (bits - 1)
    assert np.all(neg[mag == 0] == 0), "zero magnitude with the sign bit set"
    assert np.all(neg[mag > 0] == (xd[mag > 0] < 0)), "wrong sign"
    # decode == reference rounded once to float32
    ref = ref_decode_log(body.numpy(), numels, **codec.config())
    np.testing.assert_array_equal(f64(out), ref.astype(np.float32).astype(np.float64))
    # the decoded magnitude is one of the two levels around |x| / max (on the level set)
    levels = ref_log_levels(bits)
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.where(m > 0, np.abs(xd) / np.where(m > 0, m, 1), 0.0)
    dec = levels[mag]
    lo, hi = neighbours(rel, levels)
    # the codec sees fl32(rel): it may sit on a level that rel itself misses by a rounding
    slack = 2 * (EPS32 / 2 * rel + 2.0 ** -150)
    lo_s, _ = neighbours(np.maximum(rel - slack, 0), levels)
    _, hi_s = neighbours(np.minimum(rel + slack, 1), levels)
    ok = (dec == lo) | (dec == hi) | (dec == lo_s) | (dec == hi_s)
    assert np.all(ok), f"{int(np.sum(~ok))} values not on a neighbouring level, e.g. rel={rel[~ok][:3]} dec={dec[~ok][:3]}"
    if not codec.stochastic:
        # nearest in linear value (ties either way, up to the float32 rounding of rel)
        best = np.minimum(rel - lo, hi - rel)
        assert np.all(np.abs(dec - rel) <= best + slack), "nearest rounding picked the farther level"
    # values already on a level come back exactly
    on = (rel == lo) & (m > 0)
    np.testing.assert_array_equal(f64(out)[on], xd[on])
    return codes


def round_trip_check(codec, x, layout, key=0):
    body, info = encode(codec, x, layout, key=key)
    assert info.finite
    out = decode(codec, [body], layout)
    check_log(codec, x, layout, body, out)
    return body, out


BITS = (2, 3, 4, 5, 8)
ROUNDINGS = ("nearest", "stochastic")


# ------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("bits", BITS)
def test_round_trip_odd_sizes(bits, rounding):
    codec = LogCodec(bits=bits, rounding=rounding)
    for n in (0, 1, 7, 1001):
        x = ragged_data([n], seed=n + bits)
        round_trip_check(codec, x, Layout.flat(n), key=n)


@pytest.mark.parametrize("bits", (3, 8))
def test_round_trip_large(bits):
    for rounding, bs in (("nearest", None), ("stochastic", 4096)):
        codec = LogCodec(bits=bits, block_size=bs, rounding=rounding)
        x = ragged_data([100003], seed=bits)
        round_trip_check(codec, x, Layout([100003], [5]), key=17)


RAGGED = [1, 0, 5, 64, 65, 130, 7, 1003, 2]


@pytest.mark.parametrize("block_size", [None, "layer", 1, 3, 64])
@pytest.mark.parametrize("bits", (2, 4, 7, 8))
def test_ragged_layouts(bits, block_size):
    layout = Layout(RAGGED, [10 + i for i in range(len(RAGGED))])
    x = ragged_data(RAGGED, seed=bits)
    for rounding in ROUNDINGS:
        codec = LogCodec(bits=bits, block_size=block_size, rounding=rounding)
        body, out = round_trip_check(codec, x, layout, key=bits)
        if block_size == 1:
            assert torch.equal(out, x)   # a single value is its block's max


def test_codes_layout_by_hand():
    """Codes written here by hand, packed by packing.py, must match the body byte for byte."""
    from ddp_qhooks.codecs.packing import pack_codes, unpack_codes
    # b=3: M=3, levels 1, 1/2, 1/4, 0 (x max); sign = bit 2.  Nearest: 0.3 -> 1/4 (code 1),
    # -0.1 -> 0 (below 1/8, no sign), -0.75 -> -1 (tie goes up: 4|3), 0.125 -> 1/4 (tie), -0.5 -> 4|2
    x = torch.tensor([1.0, -0.5, 0.3, 0.0, -0.1, -0.75, 0.125, 0.6])
    expected = [3, 6, 1, 0, 0, 7, 1, 2]
    codec = LogCodec(bits=3, rounding="nearest")
    body, _ = encode(codec, x)
    assert body[:4].numpy().tobytes() == np.float32(1.0).tobytes()
    assert torch.equal(body[4:], pack_codes(torch.tensor(expected, dtype=torch.uint8), 3))
    assert unpack_codes(body[4:], 3, 8).tolist() == expected
    assert ref_unpack(body[4:].numpy(), 3, 8).tolist() == expected
    # b=8: M=127; x = max * 2**-k -> code 127 - k; negative adds 128; two blocks of 3 ("layer")
    x = torch.tensor([4.0, -1.0, 2.0 ** -120, 0.0, -3.0, 3.0 * 2.0 ** -126])
    codec = LogCodec(bits=8, block_size="layer", rounding="stochastic")
    body, _ = encode(codec, x, Layout([3, 3]), key=99)
    np.testing.assert_array_equal(np.frombuffer(body[:8].numpy().tobytes(), "<f4"), [4.0, 3.0])
    assert body[8:].tolist() == [127, 128 + 125, 127 - 122, 0, 128 + 127, 1]


@pytest.mark.parametrize("bits", (2, 3, 8))
def test_nearest_decision_points(bits):
    """Midpoints 1.5 * 2**-k and s/2 (s the smallest level) round up; just below them, down."""
    M = 2 ** (bits - 1) - 1
    levels = ref_log_levels(bits)
    vals, want = [1.0], [1.0]
    for a in levels[1:-1]:
        mid = np.float32(1.5 * a)
        vals += [mid, np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(2))]
        want += [2 * a, a, 2 * a]
    s = levels[1]
    half = np.float32(s / 2)
    vals += [half, np.nextafter(half, np.float32(0)), s]
    want += [s, 0.0, s]
    x = torch.tensor(np.array(vals, dtype=np.float32))
    codec = LogCodec(bits=bits, rounding="nearest", block_size=None)  # one max (1.0) for all values
    body, _ = encode(codec, x)
    assert f64(decode(codec, [body], Layout.flat(x.numel()))).tolist() == want
    assert M == len(levels) - 1


# ------------------------------------------------------------------------------------------------
# sizes, configuration, edge cases
# ------------------------------------------------------------------------------------------------
SIZE_LAYOUTS = [[0], [1], [7], [8], [1000], [3, 0, 5], [64, 65, 1, 129], [100003, 17]]


@pytest.mark.parametrize("bits", range(2, 9))
def test_body_nbytes_formula(bits):
    for numels in SIZE_LAYOUTS:
        layout = Layout(numels)
        n = sum(numels)
        for bs in (None, "layer", 1, 3, 64, 1000):
            codec = LogCodec(bits=bits, block_size=bs)
            nb = len(ref_block_lengths(numels, bs))
            size = codec.body_nbytes(layout)
            assert size == 4 * nb + math.ceil(n * bits / 8)
            assert size == eval(codec.body_formula, {"ceil": math.ceil}, {"n": n, "b": bits, "blocks": nb})


def test_config_and_attributes():
    c = LogCodec()
    assert (c.name, c.codec_id, c.bits, c.block_size, c.rounding, c.stochastic) == ("log", 7, 8, 256, "stochastic", True)
    assert LogCodec.stochastic is True and LogCodec(rounding="nearest").stochastic is False
    assert c.config() == {"codec": "log", "bits": 8, "block_size": 256, "rounding": "stochastic"}
    assert LogCodec(bits=np.int64(3), block_size="layer", rounding="nearest").config() == \
        {"codec": "log", "bits": 3, "block_size": "layer", "rounding": "nearest"}
    assert c.summary and "\n" not in c.summary and c.body_formula == "4*blocks + ceil(n*b/8)"
    assert "rounding='stochastic'" in repr(c)
    # pickles (without device caches) and encodes the same afterwards
    x = ragged_data([300], seed=1)
    b1, _ = encode(c, x, key=3)
    c2 = pickle.loads(pickle.dumps(c))
    assert torch.equal(b1, encode(c2, x, key=3)[0])


@pytest.mark.parametrize("bits", [1, 9, 0, -1, 2.5, 8.0, True, "8", None])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=r"log: bits must be an integer in 2\.\.8"):
        LogCodec(bits=bits)


@pytest.mark.parametrize("block_size", [0, -3, 2.5, True, "64", "layers"])
def test_bad_block_size(block_size):
    with pytest.raises(ValueError, match="block_size") as exc:
        LogCodec(block_size=block_size)
    assert "positive" in str(exc.value) and "'layer'" in str(exc.value) and "None" in str(exc.value)


@pytest.mark.parametrize("rounding", ["floor", "Nearest", None, 1, ""])
def test_bad_rounding(rounding):
    with pytest.raises(ValueError, match="rounding") as exc:
        LogCodec(rounding=rounding)
    assert "'nearest'" in str(exc.value) and "'stochastic'" in str(exc.value)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_empty(rounding):
    codec = LogCodec(bits=5, block_size=3, rounding=rounding)
    for layout in (Layout.flat(0), Layout([0, 0], [3, 4])):
        assert codec.body_nbytes(layout) == 0
        body = torch.zeros(0, dtype=torch.uint8)
        err = torch.zeros(0)
        info = codec.encode(torch.zeros(0), body, layout, key=1, error_out=err)
        assert info.finite and info.error_sq == 0 and info.input_sq == 0
        assert codec.encode(torch.zeros(0), body, layout).finite
        assert decode(codec, [body, body], layout, divisor=2).numel() == 0


EXACT = [3.7, -1.0, 0.0, 1e38, -3.4e38, FP32_MAX, 1e-40, -1e-45, 65000.0, 1e-30]


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("bits", (2, 3, 8))
def test_exact_values(bits, rounding):
    """Constant (also all-zero) blocks, same-magnitude blocks, single values and max * 2**-k are exact."""
    codec = LogCodec(bits=bits, rounding=rounding)
    M = 2 ** (bits - 1) - 1
    for v in EXACT:
        for n, numels in ((1, [1]), (9, [9]), (100, [99, 1])):
            layout = Layout(numels)
            x = torch.full((n,), v)
            x[::2] = -x[::2]    # a block of one magnitude, both signs
            for key in (0, 5):
                err = torch.full((n,), 7.0)
                body, info = encode(codec, x, layout, key=key, error_out=err)
                assert info.finite and info.error_sq == 0 and not bool(err.any()), (v, n)
                assert torch.equal(decode(codec, [body], layout), x)
                assert torch.equal(decode(codec, [body] * 3, layout, divisor=3), x)
    # powers of two below the max, all representable levels, and an all-zero block among others
    x = torch.tensor([2.0 ** -k for k in range(M)] + [-(2.0 ** -k) for k in range(M)] + [0.0] * 4 + [5.0, 0.0])
    layout = Layout([2 * M, 4, 2])
    codec = LogCodec(bits=bits, block_size="layer", rounding=rounding)
    body, _ = encode(codec, x, layout, key=1)
    assert torch.equal(decode(codec, [body], layout), x)


@pytest.mark.parametrize("block_size", [None, 2])
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("bits", (2, 4, 8))
def test_huge_values(bits, rounding, block_size):
    codec = LogCodec(bits=bits, block_size=block_size, rounding=rounding)
    datasets = [
        torch.tensor([FP32_MAX, -FP32_MAX, 0.0, 1.0, -1e38, 2e37]),
        torch.tensor([1e30, -1e30, 1e-40, 5.0, -3e-39, 0.0, 7e29, -1e-30]),
        torch.tensor([3e38, 2.9e38, -3.1e38, 3.0e38]),
    ]
    for i, x in enumerate(datasets):
        layout = Layout.flat(x.numel())
        body, out = round_trip_check(codec, x, layout, key=i)
        assert bool(torch.isfinite(out).all())
        # the mean of several huge payloads does not overflow (float64 accumulation)
        bodies = [encode(codec, x, layout, key=k)[0] for k in range(3)]
        mean = decode(codec, bodies, layout, divisor=3)
        assert bool(torch.isfinite(mean).all())
        ref = np.mean([ref_decode_log(b.numpy(), [x.numel()], **codec.config()) for b in bodies], axis=0)
        np.testing.assert_allclose(f64(mean), ref, rtol=2 * EPS32, atol=TINY32)


TINY_DATA = [
    [1e-40, -1e-40, 3e-41, 0.0, 7e-41, 1.4e-45, -2.2e-41, 5e-42],   # subnormal range
    [1e-37, -1e-37, 3e-38, 0.0, 5e-38, 1.2e-38],                       # smallest normals
    [1e-44, 0.0, 1.4e-45, 4.2e-45],                                    # a few subnormal units
    [1e-30, -3e-31, 1e-33, 7e-36],
]


@pytest.mark.parametrize("block_size", [None, 2])
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("bits", (2, 5, 8))
def test_tiny_and_subnormal_values(bits, rounding, block_size):
    codec = LogCodec(bits=bits, block_size=block_size, rounding=rounding)
    for i, vals in enumerate(TINY_DATA):
        for v in (vals, vals + [1.0, -0.5]):
            x = torch.tensor(v)
            round_trip_check(codec, x, Layout.flat(x.numel()), key=i)


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_half_precision_inputs_and_outputs(in_dtype, rounding):
    numels = [1, 5, 300, 64]
    layout = Layout(numels)
    x = ragged_data(numels, seed=4).clamp(-6e4, 6e4).to(in_dtype)
    for bits, bs in ((3, None), (8, 16)):
        codec = LogCodec(bits=bits, block_size=bs, rounding=rounding)
        err = torch.empty(x.numel())
        body, info = encode(codec, x, layout, key=2, error_out=err)
        out = decode(codec, [body], layout)
        check_log(codec, x.float(), layout, body, out)     # input widened exactly to float32
        assert torch.equal(err, x.float() - out)
        for out_dtype in (torch.float16, torch.bfloat16):
            assert torch.equal(decode(codec, [body], layout, dtype=out_dtype), out.to(out_dtype))
            assert torch.equal(decode(codec, [body, body], layout, divisor=2, dtype=out_dtype), out.to(out_dtype))


# ------------------------------------------------------------------------------------------------
# decode of several bodies, residuals, non-finite input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [None, "layer", 7])
def test_decode_several_bodies_with_divisor(block_size):
    numels = [50, 3, 200]
    layout = Layout(numels)
    codec = LogCodec(bits=4, block_size=block_size)
    bodies = [encode(codec, ragged_data(numels, seed=s), layout, key=s)[0] for s in range(3)]
    refs = [ref_decode_log(b.numpy(), numels, **codec.config()) for b in bodies]
    for W, divisor in ((1, 1), (3, 3), (3, 1), (2, 4)):
        got = f64(decode(codec, bodies[:W], layout, divisor=divisor))
        want = sum(refs[:W]) / divisor
        np.testing.assert_allclose(got, want, rtol=4 * EPS32, atol=4 * EPS32 * np.abs(want).max() / 16)
        for dt in (torch.float16, torch.bfloat16):
            got16 = decode(codec, bodies[:W], layout, divisor=divisor, dtype=dt)
            assert torch.equal(got16, decode(codec, bodies[:W], layout, divisor=divisor).to(dt))
    # no bodies: zeros; bodies are read-only inputs, also at unaligned offsets
    assert not bool(decode(codec, [], layout).any())
    before = [b.clone() for b in bodies]
    shifted = []
    for i, b in enumerate(bodies):
        buf = torch.zeros(b.numel() + 8, dtype=torch.uint8)
        buf[1 + i:1 + i + b.numel()] = b
        shifted.append(buf[1 + i:1 + i + b.numel()])
    assert torch.equal(decode(codec, shifted, layout, divisor=3), decode(codec, bodies, layout, divisor=3))
    assert all(torch.equal(a, b) for a, b in zip(before, bodies))


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("block_size", [None, 16])
def test_error_out(rounding, block_size):
    numels = [1000, 1, 77]
    layout = Layout(numels)
    x = ragged_data(numels, seed=8)
    codec = LogCodec(bits=5, block_size=block_size, rounding=rounding)
    err = torch.full((x.numel(),), float("nan"))
    body, info = encode(codec, x, layout, key=4, error_out=err)
    out = decode(codec, [body], layout)
    assert torch.equal(err, x - out)
    e, v = f64(x) - f64(out), f64(x)
    assert info.finite
    assert math.isclose(info.error_sq, float(e @ e), rel_tol=1e-5)
    assert math.isclose(info.input_sq, float(v @ v), rel_tol=1e-5)
    # the same body with and without error_out
    assert torch.equal(body, encode(codec, x, layout, key=4)[0])
    # huge and tiny inputs: squared sums neither overflow nor vanish
    for scale in (1e30, 1e-30):
        xs = (x * scale).float()
        info = codec.encode(xs, body, layout, key=4, error_out=err)
        assert math.isfinite(info.input_sq) and info.input_sq > 0
        assert math.isclose(info.input_sq, float(f64(xs) @ f64(xs)), rel_tol=1e-5)


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("block_size", [None, "layer", 3])
def test_non_finite_input_is_reported(rounding, block_size):
    codec = LogCodec(bits=4, block_size=block_size, rounding=rounding)
    numels = [5, 8]
    layout = Layout(numels)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for pos in (0, 4, 5, 12):
            x = ragged_data(numels, seed=pos)
            x[pos] = bad
            err = torch.full((13,), 7.0)
            body, info = encode(codec, x, layout, key=1, error_out=err)
            assert info.finite is False  # (error_out is then unspecified: callers drop it)
            assert codec.encode(x, body, layout).finite is False
    assert codec.encode(torch.full((13,), 1e5).half(), body, layout).finite is False   # fp16 inf


# ------------------------------------------------------------------------------------------------
# stochastic rounding
# ------------------------------------------------------------------------------------------------
def _stochastic_vector(bits):
    """Values between every pair of neighbouring levels (positions 0.01 .. 0.99), on levels, and
    under the smallest level; the max is 1, so |x| / max == |x| exactly."""
    levels = ref_log_levels(bits)
    picks = sorted(set(np.linspace(0, levels.size - 2, 6).round().astype(int).tolist()))
    vals = [1.0]
    for j in picks:
        lo, hi = levels[j], levels[j + 1]
        for p in (0.0, 0.01, 0.25, 0.5, 0.9, 0.99):
            vals.append(float(np.float32(lo + p * (hi - lo))))
    vals = np.array(vals)
    vals[1::2] *= -1
    return torch.tensor(vals, dtype=torch.float32)


@pytest.mark.parametrize("block_size", [None, "layer"])
@pytest.mark.parametrize("bits", (2, 3, 8))
def test_stochastic_unbiased(bits, block_size):
    """E[decode] = x: z-test of the mean of K independent roundings per element.

    K = keys x copies: the vector is repeated as R parameters of one bucket (each parameter has its
    own dither stream keyed by (key, parameter)), encoded under 40 keys."""
    x = _stochastic_vector(bits)
    n, R, keys = x.numel(), 50, 40
    K = R * keys
    layout = Layout([n] * R, list(range(100, 100 + R)))
    codec = LogCodec(bits=bits, block_size=block_size, rounding="stochastic")
    xs = x.repeat(R)
    dec = np.empty((keys, R, n))
    for i, key in enumerate(np.random.default_rng(bits).integers(0, 2 ** 62, size=keys).tolist()):
        body, info = encode(codec, xs, layout, key=key)
        assert info.finite
        dec[i] = f64(decode(codec, [body], layout)).reshape(R, n)
    dec = dec.reshape(K, n)
    xd = f64(x)
    rel = np.abs(xd)
    lo, hi = neighbours(rel, ref_log_levels(bits))
    sgn = np.sign(xd)
    assert np.all((dec == sgn * lo) | (dec == sgn * hi)), "a decoded value is not a neighbouring level"
    on = lo == hi
    assert on.sum() >= 2
    np.testing.assert_array_equal(dec[:, on], np.broadcast_to(xd[on], (K, int(on.sum()))))
    # z-test per element, Bonferroni over the tested elements (family alpha 1e-4)
    test = ~on
    p = (rel - lo) / np.where(test, hi - lo, 1)
    var = (hi - lo) ** 2 * p * (1 - p)
    z_crit = statistics.NormalDist().inv_cdf(1 - 1e-4 / (2 * int(test.sum())))
    z = (dec.mean(axis=0)[test] - xd[test]) / np.sqrt(var[test] / K)
    assert np.all(np.abs(z) < z_crit), f"bias: max |z| = {np.max(np.abs(z)):.2f} (crit {z_crit:.2f})"
    # and the spread is the Bernoulli one (loose: a factor 1.5 either way)
    mid = test & (p > 0.2) & (p < 0.8)
    ratio = dec.var(axis=0)[mid] / var[mid]
    assert np.all((ratio > 1 / 1.5) & (ratio < 1.5)), ratio


def test_key_determinism_and_bucketing():
    x = ragged_data([37, 50], seed=7)
    layout = Layout([37, 50], [4, 9])
    codec = LogCodec(bits=4, block_size=8)
    b1, _ = encode(codec, x, layout, key=42)
    assert torch.equal(b1, encode(LogCodec(bits=4, block_size=8), x, layout, key=42)[0])
    assert all(not torch.equal(b1, encode(codec, x, layout, key=k)[0]) for k in (43, 2 ** 40 + 42))
    # with per-parameter blocks a parameter's result depends only on itself, its key and the step key
    both = decode(codec, [b1], layout)
    alone = decode(codec, [encode(codec, x[37:], Layout([50], [9]), key=42)[0]], Layout([50], [9]))
    assert torch.equal(both[37:], alone)
    # nearest ignores the key
    near = LogCodec(bits=4, rounding="nearest")
    assert torch.equal(encode(near, x, layout, key=1)[0], encode(near, x, layout, key=99)[0])
