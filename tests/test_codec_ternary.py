"""Tests of the ternary codec (TernGrad) and the base-3 packer.

Every check compares the codec with an independent computation written here: a numpy float64
decoder of the documented body layout (its own planar 2-bit and base-3 unpackers, its own block
segmentation), a numpy threshold quantizer, and z-tests of the stochastic rounding against the
variance ``a|x| - x^2`` of a TernGrad value.
"""
from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from _reference import REF_STRIPE, decode, ragged_data, ref_block_lengths, ref_unpack

from ddp_qhooks.codecs import (
    _blockscaled as ternary,  # CHUNK, NUMPY_ON_CPU live in the shared base
)
from ddp_qhooks.codecs.base import Layout
from ddp_qhooks.codecs.packing import pack_trits, trit_nbytes, unpack_trits
from ddp_qhooks.codecs.ternary import BlockScaledCodec, TernaryCodec

EPS32 = 2.0 ** -23
TINY32 = 2.0 ** -149        # smallest float32 subnormal
FP32_MAX = float(np.finfo(np.float32).max)
PACKINGS = ("2bit", "base3")
ROUNDINGS = ("stochastic", "threshold")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------
# independent numpy reference
# ------------------------------------------------------------------------------------------------


def ref_unpack_base3(packed: np.ndarray, n: int) -> np.ndarray:
    """byte i = sum_j t[5i+j] * 3**j."""
    assert packed.size == -(-n // 5) and np.all(packed <= 242)
    digits = (packed.astype(np.int64)[:, None] // (3 ** np.arange(5))[None, :]) % 3
    return digits.reshape(-1)[:n]


def ref_pack_base3(trits: np.ndarray) -> np.ndarray:
    padded = np.zeros(-(-trits.size // 5) * 5, dtype=np.int64)
    padded[:trits.size] = trits
    return (padded.reshape(-1, 5) * (3 ** np.arange(5))).sum(1).astype(np.uint8)


def ref_scales(body: np.ndarray, nblocks: int) -> np.ndarray:
    return np.frombuffer(np.ascontiguousarray(body[:4 * nblocks]).tobytes(), dtype="<f4").astype(np.float64)


def ref_codes_ternary(body: np.ndarray, param_numels, block_size=None, packing="2bit", **_) -> np.ndarray:
    body = np.asarray(body, dtype=np.uint8)
    lengths = ref_block_lengths(param_numels, block_size)
    n = sum(lengths)
    packed = body[4 * len(lengths):]
    codes = ref_unpack(packed, 2, n) if packing == "2bit" else ref_unpack_base3(packed, n)
    assert np.all(codes <= 2), "trit code 3 is never sent"
    return codes


def ref_decode_ternary(body: np.ndarray, param_numels: list[int], **config) -> np.ndarray:
    """float64 values of a ternary body: code 0 -> 0, 1 -> +a, 2 -> -a, one float32 a per block."""
    lengths = ref_block_lengths(param_numels, config.get("block_size"))
    codes = ref_codes_ternary(body, param_numels, **config)
    unit = np.select([codes == 1, codes == 2], [1.0, -1.0], 0.0)
    return unit * np.repeat(ref_scales(np.asarray(body, dtype=np.uint8), len(lengths)), lengths)


def _starts(lengths):
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def ref_threshold(x: np.ndarray, lengths, threshold=0.7):
    """(per-block a as float32, per-element kept mask) of the threshold rule, in float64."""
    if not lengths:
        return np.zeros(0), np.zeros(0, dtype=bool)
    ax = np.abs(x.astype(np.float64))
    starts, lens = _starts(lengths), np.asarray(lengths)
    keep = ax > np.repeat(threshold * (np.add.reduceat(ax, starts) / lens), lens)
    count = np.add.reduceat(keep.astype(np.int64), starts)
    kept = np.add.reduceat(np.where(keep, ax, 0.0), starts)
    a = np.where(count > 0, kept / np.maximum(count, 1), 0.0).astype(np.float32).astype(np.float64)
    return a, keep


def ref_absmax(x: np.ndarray, lengths) -> np.ndarray:
    if not lengths:
        return np.zeros(0)
    return np.maximum.reduceat(np.abs(x.astype(np.float64)), _starts(lengths))


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def encode(codec, x, layout, key=0, error_out=None):
    body = torch.zeros(codec.body_nbytes(layout), dtype=torch.uint8)
    info = codec.encode(x, body, layout, key=key, error_out=error_out)
    return body, info


def cfg_of(codec):
    return {"block_size": codec.block_size, "packing": codec.packing}


def check_body(codec, x, layout, body, out):
    """Levels, scales, signs and the reference decode of one body for input ``x``."""
    numels = list(layout.param_numels)
    lengths = ref_block_lengths(numels, codec.block_size)
    n = sum(lengths)
    per_value = n // 4 + (n % 4 > 0) if codec.packing == "2bit" else n // 5 + (n % 5 > 0)
    assert body.numel() == 4 * len(lengths) + per_value
    b = body.numpy()
    ref = ref_decode_ternary(b, numels, **cfg_of(codec))
    np.testing.assert_array_equal(f64(out), ref)              # +-a of a float32 a: exact in float32
    xd = f64(x.float())
    a = np.repeat(ref_scales(b, len(lengths)), lengths)
    od = f64(out)
    assert np.all((od == 0) | (od == a) | (od == -a)), "a value is not one of {-a, 0, +a}"
    kept = od != 0
    assert np.all(np.sign(od[kept]) == np.sign(xd[kept])), "a kept value changed sign"
    assert np.all(od[xd == 0] == 0), "an exact zero was not sent as 0"
    scales = ref_scales(b, len(lengths))
    if codec.rounding == "stochastic":
        np.testing.assert_array_equal(scales, ref_absmax(xd, lengths))
        top = np.abs(xd) == a
        np.testing.assert_array_equal(od[top & (a > 0)], xd[top & (a > 0)])   # p = 1: always kept
    else:
        want_a, want_keep = ref_threshold(xd, lengths, codec.threshold)
        np.testing.assert_array_equal(scales, want_a)
        np.testing.assert_array_equal(kept, want_keep & (a > 0))
    return ref


LAYOUTS = {
    "ragged": [1, 0, 5, 64, 65, 130, 7, 1003, 2],
    "two": [37, 50],
}


# ------------------------------------------------------------------------------------------------
# round trips and body layout
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("block_size", [None, "layer", 1, 64])
def test_round_trip_odd_sizes(rounding, packing, block_size):
    codec = TernaryCodec(block_size=block_size, rounding=rounding, packing=packing)
    for n in (0, 1, 7, 1001, 100003):
        layout = Layout.flat(n)
        x = ragged_data([n], seed=n)
        body, info = encode(codec, x, layout, key=n)
        assert info.finite
        check_body(codec, x, layout, body, decode(codec, [body], layout))


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("block_size", [None, "layer", 3, 64, 1000])
@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
def test_round_trip_ragged_layouts(layout_name, block_size, rounding, packing):
    numels = LAYOUTS[layout_name]
    layout = Layout(numels)
    codec = TernaryCodec(block_size=block_size, rounding=rounding, packing=packing)
    x = ragged_data(numels, seed=len(numels) + (block_size if isinstance(block_size, int) else 0))
    for key in (0, 5):
        body, info = encode(codec, x, layout, key=key)
        assert info.finite
        check_body(codec, x, layout, body, decode(codec, [body], layout))


@pytest.mark.parametrize("packing", PACKINGS)
def test_multi_stripe_bucket(packing):
    """More values than one planar stripe (2**19), two parameters, blocks of 4096."""
    numels = [REF_STRIPE + 13, 999]
    layout = Layout(numels)
    codec = TernaryCodec(block_size=4096, packing=packing)
    x = ragged_data(numels, seed=3)
    body, info = encode(codec, x, layout, key=1)
    assert info.finite
    check_body(codec, x, layout, body, decode(codec, [body], layout))


def _use_path(monkeypatch, path):
    """Switch the codec's internal path: tiny pieces (long blocks split into partial pieces), or
    the accelerators' torch-only path with one piece per run, here on the CPU."""
    if path == "tiny-pieces":
        monkeypatch.setattr(ternary, "CHUNK", 7)
    else:
        monkeypatch.setattr(ternary, "NUMPY_ON_CPU", False)
        monkeypatch.setattr(BlockScaledCodec, "_chunk", lambda self, numel, device: max(ternary.CHUNK, numel))


@pytest.mark.parametrize("path", ["tiny-pieces", "accelerator"])
@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_internal_paths(monkeypatch, path, rounding, packing):
    numels = [1, 0, 5, 64, 65, 130, 7, 303, 2]
    layout = Layout(numels)
    x = ragged_data(numels, seed=11)
    x[10] = 0.0
    configs = [{"block_size": bs, "rounding": rounding, "packing": packing} for bs in (None, "layer", 3, 50)]
    before = [encode(TernaryCodec(**cfg), x, layout, key=3)[0] for cfg in configs]
    _use_path(monkeypatch, path)
    for cfg, ref_body in zip(configs, before):
        codec = TernaryCodec(**cfg)
        err = torch.zeros(layout.numel)
        body, info = encode(codec, x, layout, key=3, error_out=err)
        out = decode(codec, [body], layout)
        check_body(codec, x, layout, body, out)
        assert torch.equal(err, x - out)
        np.testing.assert_allclose(info.error_sq, float(np.sum(f64(err) ** 2)), rtol=1e-5)  # float32 sums where safe
        if path == "accelerator" or rounding == "stochastic":   # threshold: float64 sums in another order
            assert torch.equal(body, ref_body)
        bodies = [body, encode(codec, -2 * x, layout, key=4)[0], ref_body]
        terms = [ref_decode_ternary(b.numpy(), numels, **cfg_of(codec)) / 3 for b in bodies]
        got = decode(codec, bodies, layout, divisor=3, dtype=torch.bfloat16)
        ref = sum(terms)
        assert np.all(np.abs(f64(got) - ref) <= 2.0 ** -8 * np.abs(ref) + 4 * EPS32 * sum(np.abs(t) for t in terms))


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("block_size", [None, "layer", 1, 5, 64])
def test_body_size_formula(packing, block_size):
    codec = TernaryCodec(block_size=block_size, packing=packing)
    per = 4 if packing == "2bit" else 5
    assert codec.body_formula == f"4*blocks + ceil(n/{per})"
    for numels in ([0], [0, 0], [1], [7], [4, 5, 6], [1001], [100003], [1, 0, 5, 64, 65, 130, 7, 1003, 2]):
        layout = Layout(numels)
        blocks = len(ref_block_lengths(numels, block_size))
        assert codec.body_nbytes(layout) == 4 * blocks + math.ceil(sum(numels) / per)


def test_body_size_ratio_base3():
    """base3: 1.6 bits per value, 2bit: 2 bits per value (plus the scales)."""
    layout = Layout.flat(10 ** 6)
    assert TernaryCodec(packing="base3", block_size=None).body_nbytes(layout) == 4 + 200000
    assert TernaryCodec(packing="2bit", block_size=None).body_nbytes(layout) == 4 + 250000
    # the default: one float32 scale per 256 values, 10**6 / 256 = 3906.25 -> 3907 blocks
    assert TernaryCodec(packing="base3").body_nbytes(layout) == 4 * 3907 + 200000
    assert TernaryCodec().body_nbytes(layout) == 4 * 3907 + 250000


def test_blocks_never_straddle_parameters():
    # block_size 4 over [0,0,0,0,1 | 100,200,300,400,500]: blocks [0,0,0,0] [1] [100..400] [500]
    x = torch.tensor([0, 0, 0, 0, 1, 100, 200, 300, 400, 500], dtype=torch.float32)
    layout = Layout([5, 5])
    for rounding in ROUNDINGS:
        codec = TernaryCodec(block_size=4, rounding=rounding)
        body, _ = encode(codec, x, layout, key=2)
        scales = ref_scales(body.numpy(), 4)
        assert scales[0] == 0 and scales[1] == 1 and scales[3] == 500
        out = decode(codec, [body], layout)
        assert out[4].item() == 1.0 and out[9].item() == 500.0 and not bool(out[:4].any())


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_blocked_result_independent_of_bucketing(rounding):
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(37, generator=g), torch.randn(50, generator=g) * 3
    codec = TernaryCodec(block_size="layer", rounding=rounding)
    both = decode(codec, [encode(codec, torch.cat([a, b]), Layout([37, 50], [4, 9]), key=5)[0]], Layout([37, 50], [4, 9]))
    alone = decode(codec, [encode(codec, b, Layout([50], [9]), key=5)[0]], Layout([50], [9]))
    assert torch.equal(both[37:], alone)


# ------------------------------------------------------------------------------------------------
# threshold rounding against numpy
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threshold", [0.7, 0.05, 1.0, 2.5])
@pytest.mark.parametrize("block_size", [None, "layer", 16])
def test_threshold_matches_numpy_exactly(block_size, threshold, in_dtype):
    numels = [300, 1, 77, 1000]
    layout = Layout(numels)
    x = ragged_data(numels, seed=int(threshold * 100), dtype=in_dtype)
    codec = TernaryCodec(block_size=block_size, rounding="threshold", threshold=threshold)
    body, info = encode(codec, x, layout, key=123)
    assert info.finite
    lengths = ref_block_lengths(numels, block_size)
    want_a, want_keep = ref_threshold(f64(x), lengths, threshold)
    np.testing.assert_array_equal(ref_scales(body.numpy(), len(lengths)), want_a)       # same a
    codes = ref_codes_ternary(body.numpy(), numels, **cfg_of(codec))
    np.testing.assert_array_equal(codes != 0, want_keep)                               # same zero set
    np.testing.assert_array_equal(codes[want_keep], np.where(f64(x)[want_keep] < 0, 2, 1))
    # deterministic: the key does not matter
    assert torch.equal(encode(codec, x, layout, key=99)[0], body)


def test_threshold_hand_example():
    x = torch.tensor([1.0, -2.0, 0.1, 0.0, 4.0, -0.2])   # mean|x| = 7.3/6, delta = 0.85167
    codec = TernaryCodec(rounding="threshold")
    out = decode(codec, [encode(codec, x, Layout.flat(6))[0]], Layout.flat(6))
    a = np.float32((1 + 2 + 4) / 3)
    np.testing.assert_array_equal(out.numpy(), np.array([a, -a, 0, 0, a, 0], dtype=np.float32))


# ------------------------------------------------------------------------------------------------
# stochastic rounding: unbiased with the TernGrad variance
# ------------------------------------------------------------------------------------------------
def _stochastic_vector():
    """Two blocks of 32; each holds its max, zeros and fractions p = |x|/a across (0, 1)."""
    fracs = [0.5, 0.25, 0.75, 0.1, 0.9, 0.01, 0.99, 1 / 3, 0.6, 0.05, 0.95, 0.4, 0.2, 0.8, 0.3]
    vals = []
    for a in (2.0, 0.375):
        block = [a, 0.0]
        for i, p in enumerate(fracs):
            block += [a * p, -a * p]
        vals += block[:32]
    return torch.tensor(vals, dtype=torch.float32)


@pytest.mark.parametrize("block_size,packing", [(None, "2bit"), (32, "base3")])
def test_stochastic_unbiased(block_size, packing):
    K = 2000
    x = _stochastic_vector()
    n = x.numel()
    layout = Layout.flat(n)
    codec = TernaryCodec(block_size=block_size, packing=packing, rounding="stochastic")
    assert codec.stochastic
    keys = np.random.default_rng(77).integers(0, 2 ** 62, size=K).tolist()
    dec = np.empty((K, n))
    for r, key in enumerate(keys):
        body, info = encode(codec, x, layout, key=key)
        assert info.finite
        dec[r] = f64(decode(codec, [body], layout))
    xd = f64(x)
    lengths = ref_block_lengths([n], block_size)
    a = np.repeat(ref_absmax(xd, lengths), lengths)
    assert np.all((dec == 0) | (dec == np.sign(xd) * a)), "a value is neither 0 nor sign(x) * a"
    sure = (xd == 0) | (np.abs(xd) == a)
    np.testing.assert_array_equal(dec[:, sure], np.broadcast_to(xd[sure], (K, int(sure.sum()))))
    test = ~sure
    m = int(test.sum())
    z_crit = statistics.NormalDist().inv_cdf(1 - 1e-4 / (2 * m))   # Bonferroni, family alpha 1e-4
    var = a * np.abs(xd) - xd ** 2
    z = (dec.mean(0)[test] - xd[test]) / np.sqrt(var[test] / K)
    assert np.all(np.abs(z) < z_crit), f"bias: max |z| = {np.max(np.abs(z)):.2f} (crit {z_crit:.2f})"
    # the keep rate is |x| / a (a Bernoulli: its variance is fixed by its mean, so this is the variance check)
    rate = (dec != 0).mean(0)
    p = np.abs(xd) / a
    zr = (rate[test] - p[test]) / np.sqrt(p[test] * (1 - p[test]) / K)
    assert np.all(np.abs(zr) < z_crit)


def test_stochastic_key_determinism():
    x = _stochastic_vector()
    layout = Layout.flat(x.numel())
    codec = TernaryCodec(rounding="stochastic")
    b1, _ = encode(codec, x, layout, key=42)
    assert torch.equal(b1, encode(TernaryCodec(rounding="stochastic"), x, layout, key=42)[0])
    assert all(not torch.equal(b1, encode(codec, x, layout, key=k)[0]) for k in (43, 2 ** 40 + 42, 7))


# ------------------------------------------------------------------------------------------------
# edge cases
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_constant_and_all_zero_blocks(rounding, packing):
    for block_size in (None, "layer", 4):
        codec = TernaryCodec(block_size=block_size, rounding=rounding, packing=packing)
        for v in (3.7, -1.0, 1e38, -3.4e38, 1e-40, -1e-45, 0.0):
            for numels in ([1], [9], [8, 1]):
                layout = Layout(numels)
                x = torch.full((layout.numel,), v)
                err = torch.full((layout.numel,), 7.0)
                body, info = encode(codec, x, layout, key=4, error_out=err)
                out = decode(codec, [body], layout)
                # constant blocks: stochastic keeps all (p = 1), threshold keeps all (|x| > 0.7 |x|)
                assert info.finite and torch.equal(out, x), (v, numels, block_size)
                assert info.error_sq == 0 and not bool(err.any())
                assert torch.equal(decode(codec, [body, body, body], layout, divisor=3), x)
        # a zero parameter next to non-zero ones: its blocks decode to zeros (a = 0 with "layer")
        x = torch.cat([torch.zeros(10), torch.linspace(-1, 1, 9)])
        layout = Layout([10, 9])
        body, _ = encode(codec, x, layout, key=1)
        out = decode(codec, [body], layout)
        assert not bool(out[:10].any())
        if block_size is not None:
            assert ref_scales(body.numpy(), 1)[0] == 0


def test_threshold_above_one_on_a_constant_block():
    """No |x| exceeds threshold * mean|x| = 1.5 |c|: documented as a = 0, all zeros."""
    codec = TernaryCodec(rounding="threshold", threshold=1.5)
    x = torch.full((6,), 2.0)
    body, _ = encode(codec, x, Layout.flat(6))
    assert ref_scales(body.numpy(), 1)[0] == 0 and not bool(decode(codec, [body], Layout.flat(6)).any())


HUGE_TINY = [
    [FP32_MAX, -FP32_MAX, 0.0, 1.0, -1e38, 2e37],
    [1e30, -1e30, 3e29, 1.0, -2.0, 0.0, 7e29],
    [3e38, 2.9e38, 3.1e38, 3.0e38, -3.3e38],
    [1e-30, -1e-30, 3e-31, 0.0, 2e-30],
    [1e-40, -1e-40, 3e-41, 0.0, 7e-41, 1.4e-45, -2.2e-41, 5e-42],
    [1e-44, 0.0, 1.4e-45, 4.2e-45],
    [1e-40, 1.0, -0.5, 1e30, 1e-30],
]


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("block_size", [None, 2])
def test_huge_and_tiny_values(block_size, rounding, packing):
    codec = TernaryCodec(block_size=block_size, rounding=rounding, packing=packing)
    for i, vals in enumerate(HUGE_TINY):
        x = torch.tensor(vals, dtype=torch.float32)
        layout = Layout.flat(x.numel())
        err = torch.zeros(x.numel())
        bodies = []
        for key in range(3):
            body, info = encode(codec, x, layout, key=10 * i + key, error_out=err)
            assert info.finite
            out = decode(codec, [body], layout)
            assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(err).all())
            check_body(codec, x, layout, body, out)
            assert torch.equal(err, x - out)
            assert math.isfinite(info.error_sq) and math.isfinite(info.input_sq)
            np.testing.assert_allclose(info.input_sq, float(np.sum(f64(x) ** 2)), rtol=1e-5)
            bodies.append(body)
        # the mean of three huge payloads does not overflow; subnormal shares keep their precision
        mean = decode(codec, bodies, layout, divisor=3)
        ref = sum(ref_decode_ternary(b.numpy(), [x.numel()], **cfg_of(codec)) for b in bodies) / 3
        assert bool(torch.isfinite(mean).all())
        mag = sum(np.abs(ref_decode_ternary(b.numpy(), [x.numel()], **cfg_of(codec))) for b in bodies) / 3
        assert np.all(np.abs(f64(mean) - ref) <= 4 * EPS32 * mag + TINY32)


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_low_precision_inputs_and_outputs(rounding, in_dtype):
    numels = [100, 3, 257]
    layout = Layout(numels)
    x = ragged_data(numels, seed=21).to(in_dtype)
    codec = TernaryCodec(block_size="layer", rounding=rounding)
    err = torch.full((layout.numel,), 99.0)
    body, info = encode(codec, x, layout, key=2, error_out=err)
    assert info.finite
    out = decode(codec, [body], layout)
    check_body(codec, x, layout, body, out)
    assert torch.equal(err, x.float() - out)
    assert torch.equal(encode(codec, x, layout, key=2)[0], body)
    for out_dtype in (torch.float16, torch.bfloat16):
        low = decode(codec, [body], layout, dtype=out_dtype)
        assert low.dtype == out_dtype and torch.equal(low, out.to(out_dtype))


# ------------------------------------------------------------------------------------------------
# error feedback and several bodies
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("numels", [[5000], [1, 700, 33, 4266]], ids=["flat", "ragged"])
def test_error_out_and_stats(numels, rounding, packing):
    layout = Layout(numels)
    x = ragged_data(numels, seed=len(numels))
    for block_size in (None, 64):
        codec = TernaryCodec(block_size=block_size, rounding=rounding, packing=packing)
        err = torch.full((layout.numel,), 1234.0)
        body, info = encode(codec, x, layout, key=17, error_out=err)
        out = decode(codec, [body], layout)
        assert info.finite
        assert torch.equal(err, x - out)          # the same float32 products as the decoder
        xd, ed = f64(x), f64(err)
        np.testing.assert_allclose(info.input_sq, float(np.sum(xd ** 2)), rtol=1e-5)
        np.testing.assert_allclose(info.error_sq, float(np.sum(ed ** 2)), rtol=1e-5)
        assert torch.equal(encode(codec, x, layout, key=17)[0], body)
        # a half-precision error buffer receives the same residual, rounded
        err16 = torch.zeros(layout.numel, dtype=torch.bfloat16)
        codec.encode(x, torch.zeros_like(body), layout, key=17, error_out=err16)
        assert torch.equal(err16, (x - out).to(torch.bfloat16))


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("block_size", [None, "layer", 7])
@pytest.mark.parametrize("W", [1, 2, 3, 5])
def test_decode_mean_of_bodies(W, block_size, packing):
    numels = [40, 1, 77]
    layout = Layout(numels)
    g = torch.Generator().manual_seed(W)
    codec = TernaryCodec(block_size=block_size, packing=packing, rounding="stochastic" if W % 2 else "threshold")
    xs = [torch.randn(layout.numel, generator=g) * (r + 1) + r for r in range(W)]
    bodies = [encode(codec, xr, layout, key=r)[0] for r, xr in enumerate(xs)]
    terms = [ref_decode_ternary(b.numpy(), numels, **cfg_of(codec)) / W for b in bodies]
    ref, mag = sum(terms), sum(np.abs(t) for t in terms)
    saved = [b.clone() for b in bodies]
    got = decode(codec, bodies, layout, divisor=W)
    assert np.all(np.abs(f64(got) - ref) <= 4 * EPS32 * mag)
    got16 = decode(codec, bodies, layout, divisor=W, dtype=torch.bfloat16)
    assert np.all(np.abs(f64(got16) - ref) <= 2.0 ** -8 * np.abs(ref) + 4 * EPS32 * mag)
    assert all(torch.equal(b, s) for b, s in zip(bodies, saved)), "decode modified a body"
    # bodies at odd byte offsets of one gathered buffer (as the hook receives them)
    size = bodies[0].numel()
    gathered = torch.zeros(3 + W * (size + 1), dtype=torch.uint8)
    views = []
    for r, b in enumerate(bodies):
        off = 3 + r * (size + 1)
        gathered[off:off + size] = b
        views.append(gathered[off:off + size])
    assert torch.equal(decode(codec, views, layout, divisor=W), got)
    assert torch.equal(decode(codec, [], layout), torch.zeros(layout.numel))


# ------------------------------------------------------------------------------------------------
# base-3 packing
# ------------------------------------------------------------------------------------------------
def test_base3_pack_unpack_exact():
    rng = np.random.default_rng(5)
    for n in list(range(13)) + [99, 1001, 100003]:
        trits = rng.integers(0, 3, size=n, dtype=np.uint8)
        if n:
            trits[-1] = 2
        packed = pack_trits(torch.from_numpy(trits))
        assert packed.dtype == torch.uint8 and packed.numel() == trit_nbytes(n) == math.ceil(n / 5)
        np.testing.assert_array_equal(packed.numpy(), ref_pack_base3(trits), err_msg=f"n={n}")
        assert int(packed.max()) <= 242 if n else True
        np.testing.assert_array_equal(unpack_trits(packed, n).numpy(), trits)
        np.testing.assert_array_equal(ref_unpack_base3(packed.numpy(), n), trits)
        # into dirty slices of larger buffers, from a read-only source that must not change
        dirty = torch.full((packed.numel() + 6,), 0xFF, dtype=torch.uint8)
        pack_trits(torch.from_numpy(trits), out=dirty[3:3 + packed.numel()])
        assert torch.equal(dirty[3:3 + packed.numel()], packed)
        assert bool((dirty[:3] == 0xFF).all()) and bool((dirty[3 + packed.numel():] == 0xFF).all())
        src = packed.clone()
        out = torch.full((n,), 0xEE, dtype=torch.uint8)
        unpack_trits(src, n, out=out)
        assert torch.equal(out, torch.from_numpy(trits)) and torch.equal(src, packed)


def test_base3_all_values_of_a_byte():
    trits = np.array([(v // 3 ** j) % 3 for v in range(243) for j in range(5)], dtype=np.uint8)
    packed = pack_trits(torch.from_numpy(trits))
    np.testing.assert_array_equal(packed.numpy(), np.arange(243, dtype=np.uint8))
    np.testing.assert_array_equal(unpack_trits(packed, trits.size).numpy(), trits)


def test_base3_rejects_bad_sizes():
    with pytest.raises(ValueError):
        unpack_trits(torch.zeros(2, dtype=torch.uint8), 11)   # 11 trits need 3 bytes
    with pytest.raises(ValueError):
        pack_trits(torch.zeros(6, dtype=torch.uint8), out=torch.zeros(1, dtype=torch.uint8))
    with pytest.raises(ValueError):
        pack_trits(torch.zeros(6, dtype=torch.int64))


# ------------------------------------------------------------------------------------------------
# non-finite input, configuration
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("block_size", [None, "layer", 4])
def test_non_finite_input_is_reported(block_size, rounding):
    numels = [5, 11, 1, 8]
    layout = Layout(numels)
    n = layout.numel
    codec = TernaryCodec(block_size=block_size, rounding=rounding)
    base = ragged_data(numels, seed=8)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for pos in (0, 5, 16, n - 1):
            for dtype in (torch.float32, torch.float16):
                x = base.clone()
                x[pos] = bad
                err = torch.arange(n, dtype=torch.float32)
                _, info = encode(codec, x.to(dtype), layout, key=pos, error_out=err)
                assert info.finite is False, (bad, pos, dtype)  # error_out: unspecified, callers drop it
                assert encode(codec, x.to(dtype), layout)[1].finite is False
    assert encode(codec, torch.tensor([float("inf"), float("-inf")] * 12 + [1.0]), layout)[1].finite is False


def test_empty_input():
    for rounding in ROUNDINGS:
        for packing in PACKINGS:
            codec = TernaryCodec(rounding=rounding, packing=packing, block_size="layer")
            layout = Layout([0, 0])
            assert codec.body_nbytes(layout) == 0
            body = torch.zeros(0, dtype=torch.uint8)
            info = codec.encode(torch.zeros(0), body, layout, error_out=torch.zeros(0))
            assert info.finite and info.error_sq == 0 and info.input_sq == 0
            assert codec.decode([body, body], layout, torch.zeros(0), divisor=2).numel() == 0


def test_config_and_attributes():
    c = TernaryCodec()  # defaults: threshold rounding (contractive, safe with EF), one scale per 256 values
    assert (c.name, c.codec_id, c.bits, c.stochastic) == ("ternary", 10, 2, False)
    assert c.config() == {"codec": "ternary", "bits": 2, "block_size": 256, "rounding": "threshold", "packing": "2bit",
                          "threshold": 0.7}
    assert not c.error_feedback_diverges and TernaryCodec(rounding="stochastic").error_feedback_diverges
    s = TernaryCodec(block_size=None, rounding="stochastic")
    assert s.stochastic and s.config() == {"codec": "ternary", "bits": 2, "block_size": None, "rounding": "stochastic",
                                           "packing": "2bit"}
    t = TernaryCodec(bits=2, block_size=np.int64(8), rounding="threshold", threshold=0.5, packing="base3")
    assert t.bits == 2 and t.stochastic is False and t.block_size == 8
    assert t.config() == {"codec": "ternary", "bits": 2, "block_size": 8, "rounding": "threshold",
                          "packing": "base3", "threshold": 0.5}
    assert TernaryCodec.summary and TernaryCodec.body_formula
    assert "TernaryCodec(" in repr(t)


@pytest.mark.parametrize("bits", [0, 1, 3, 4, 16, -1, 2.5, 8.0, True, "8", None])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits") as exc:
        TernaryCodec(bits=bits)
    # names the width it sends and what to pass (not register()'s default 8)
    assert f"bits={bits!r} is not available" in str(exc.value) and "omit bits or pass bits=2" in str(exc.value)


@pytest.mark.parametrize("option,value,choices", [
    ("rounding", "nearest", ("'stochastic'", "'threshold'")),
    ("rounding", None, ("'stochastic'", "'threshold'")),
    ("packing", "1.6bit", ("'2bit'", "'base3'")),
    ("packing", 2, ("'2bit'", "'base3'")),
    ("threshold", 0, ("> 0",)),
    ("threshold", -0.7, ("> 0",)),
    ("threshold", float("nan"), ("> 0",)),
    ("threshold", float("inf"), ("> 0",)),
    ("threshold", True, ("> 0",)),
    ("threshold", "0.7", ("> 0",)),
    ("block_size", 0, ("None", "'layer'", "positive")),
    ("block_size", 2.5, ("None", "'layer'", "positive")),
])
def test_bad_options(option, value, choices):
    with pytest.raises(ValueError, match=option) as exc:
        TernaryCodec(**{option: value})
    assert all(c in str(exc.value) for c in choices), str(exc.value)
