"""Tests of the 1-bit sign codec (scaled EF-signSGD and unbiased stochastic signs).

Every check compares the codec with an independent computation written here: a numpy float64
decoder of the documented body layout (its own planar 1-bit unpacker and block segmentation),
numpy per-block means / maxima for the scales, and z-tests of the stochastic mode against the
variance ``a^2 - x^2`` of an unbiased two-level value.
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
from ddp_qhooks.codecs.sign import SignCodec
from ddp_qhooks.codecs.ternary import BlockScaledCodec

EPS32 = 2.0 ** -23
TINY32 = 2.0 ** -149        # smallest float32 subnormal
FP32_MAX = float(np.finfo(np.float32).max)
MODES = ("scaled", "stochastic")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------
# independent numpy reference
# ------------------------------------------------------------------------------------------------


def _starts(lengths):
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def ref_scales(body: np.ndarray, nblocks: int) -> np.ndarray:
    return np.frombuffer(np.ascontiguousarray(body[:4 * nblocks]).tobytes(), dtype="<f4").astype(np.float64)


def ref_codes_sign(body: np.ndarray, param_numels, block_size=None, **_) -> np.ndarray:
    body = np.asarray(body, dtype=np.uint8)
    lengths = ref_block_lengths(param_numels, block_size)
    return ref_unpack(body[4 * len(lengths):], 1, sum(lengths))


def ref_decode_sign(body: np.ndarray, param_numels: list[int], **config) -> np.ndarray:
    """float64 values of a sign body: bit 0 -> +a, bit 1 -> -a, one float32 a per block."""
    lengths = ref_block_lengths(param_numels, config.get("block_size"))
    codes = ref_codes_sign(body, param_numels, **config)
    return (1.0 - 2.0 * codes) * np.repeat(ref_scales(np.asarray(body, dtype=np.uint8), len(lengths)), lengths)


def ref_mean_abs(x: np.ndarray, lengths) -> np.ndarray:
    """float32(mean |x|) per block, from float64 sums."""
    if not lengths:
        return np.zeros(0)
    m = np.add.reduceat(np.abs(x.astype(np.float64)), _starts(lengths)) / np.asarray(lengths)
    return m.astype(np.float32).astype(np.float64)


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


def check_body(codec, x, layout, body, out):
    """Levels, scales, signs and the reference decode of one body for input ``x``."""
    numels = list(layout.param_numels)
    lengths = ref_block_lengths(numels, codec.block_size)
    n = sum(lengths)
    assert body.numel() == 4 * len(lengths) + (n + 7) // 8
    b = body.numpy()
    ref = ref_decode_sign(b, numels, block_size=codec.block_size)
    np.testing.assert_array_equal(f64(out), ref)              # +-a of a float32 a: exact in float32
    xd, od = f64(x.float()), f64(out)
    scales = ref_scales(b, len(lengths))
    a = np.repeat(scales, lengths)
    assert np.all((od == a) | (od == -a)), "a value is not one of {-a, +a}"
    if codec.mode == "scaled":
        np.testing.assert_array_equal(scales, ref_mean_abs(xd, lengths))   # |decode| = mean|x| per block
        codes = ref_codes_sign(b, numels, block_size=codec.block_size)
        np.testing.assert_array_equal(codes, (xd < 0).astype(np.int64))  # exact zeros -> bit 0 (+a)
    else:
        np.testing.assert_array_equal(scales, ref_absmax(xd, lengths))
        top = (np.abs(xd) == a) & (a > 0)
        np.testing.assert_array_equal(od[top], xd[top])       # x = +-a: probability 1
    return ref


LAYOUTS = {
    "ragged": [1, 0, 5, 64, 65, 130, 7, 1003, 2],
    "two": [37, 50],
}


# ------------------------------------------------------------------------------------------------
# round trips and body layout
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("block_size", [None, "layer", 1, 64])
def test_round_trip_odd_sizes(mode, block_size):
    codec = SignCodec(block_size=block_size, mode=mode)
    for n in (0, 1, 7, 1001, 100003):
        layout = Layout.flat(n)
        x = ragged_data([n], seed=n)
        body, info = encode(codec, x, layout, key=n)
        assert info.finite
        check_body(codec, x, layout, body, decode(codec, [body], layout))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("block_size", [None, "layer", 3, 64, 1000])
@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
def test_round_trip_ragged_layouts(layout_name, block_size, mode):
    numels = LAYOUTS[layout_name]
    layout = Layout(numels)
    codec = SignCodec(block_size=block_size, mode=mode)
    x = ragged_data(numels, seed=len(numels) + (block_size if isinstance(block_size, int) else 0))
    x[3] = 0.0   # an exact zero in the middle of a block
    for key in (0, 5):
        body, info = encode(codec, x, layout, key=key)
        assert info.finite
        check_body(codec, x, layout, body, decode(codec, [body], layout))


@pytest.mark.parametrize("mode", MODES)
def test_multi_stripe_bucket(mode):
    """More values than one planar stripe (2**19), two parameters, blocks of 4096."""
    numels = [REF_STRIPE + 13, 999]
    layout = Layout(numels)
    codec = SignCodec(block_size=4096, mode=mode)
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
@pytest.mark.parametrize("mode", MODES)
def test_internal_paths(monkeypatch, path, mode):
    numels = [1, 0, 5, 64, 65, 130, 7, 303, 2]
    layout = Layout(numels)
    x = ragged_data(numels, seed=11)
    x[10] = 0.0
    configs = [{"block_size": bs, "mode": mode} for bs in (None, "layer", 3, 50)]
    before = [encode(SignCodec(**cfg), x, layout, key=3)[0] for cfg in configs]
    _use_path(monkeypatch, path)
    for cfg, ref_body in zip(configs, before):
        codec = SignCodec(**cfg)
        err = torch.zeros(layout.numel)
        body, info = encode(codec, x, layout, key=3, error_out=err)
        out = decode(codec, [body], layout)
        check_body(codec, x, layout, body, out)
        assert torch.equal(err, x - out)
        np.testing.assert_allclose(info.error_sq, float(np.sum(f64(err) ** 2)), rtol=1e-5)  # float32 sums where safe
        if path == "accelerator" or mode == "stochastic":   # scaled: float64 sums in another order
            assert torch.equal(body, ref_body)
        bodies = [body, encode(codec, -2 * x, layout, key=4)[0], ref_body]
        terms = [ref_decode_sign(b.numpy(), numels, block_size=codec.block_size) / 3 for b in bodies]
        got = decode(codec, bodies, layout, divisor=3, dtype=torch.bfloat16)
        ref = sum(terms)
        assert np.all(np.abs(f64(got) - ref) <= 2.0 ** -8 * np.abs(ref) + 4 * EPS32 * sum(np.abs(t) for t in terms))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("block_size", [None, "layer", 1, 5, 64])
def test_body_size_formula(mode, block_size):
    codec = SignCodec(block_size=block_size, mode=mode)
    assert codec.body_formula == "4*blocks + ceil(n/8)"
    for numels in ([0], [0, 0], [1], [7], [8], [9], [4, 5, 6], [1001], [100003], [1, 0, 5, 64, 65, 130, 7, 1003, 2]):
        layout = Layout(numels)
        blocks = len(ref_block_lengths(numels, block_size))
        assert codec.body_nbytes(layout) == 4 * blocks + math.ceil(sum(numels) / 8)


def test_scaled_hand_example():
    x = torch.tensor([1.0, -2.0, 0.0, 3.0, -0.0])   # mean|x| = 6/5
    codec = SignCodec()
    out = decode(codec, [encode(codec, x, Layout.flat(5))[0]], Layout.flat(5))
    a = np.float32(1.2)
    np.testing.assert_array_equal(out.numpy(), np.array([a, -a, a, a, a], dtype=np.float32))


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [None, "layer", 16])
def test_scaled_magnitude_is_block_mean(block_size, in_dtype):
    numels = [300, 1, 77, 1000]
    layout = Layout(numels)
    x = ragged_data(numels, seed=4, dtype=in_dtype)
    codec = SignCodec(block_size=block_size)
    body, _ = encode(codec, x, layout, key=123)
    out = decode(codec, [body], layout)
    lengths = ref_block_lengths(numels, block_size)
    mags = np.abs(f64(out))
    want = ref_mean_abs(f64(x), lengths)
    for blk, m in zip(np.split(mags, np.cumsum(lengths)[:-1]), want):
        assert np.all(blk == m)
    np.testing.assert_array_equal(np.sign(f64(out)), np.where(f64(x) < 0, -1.0, 1.0))
    assert torch.equal(encode(codec, x, layout, key=99)[0], body)    # deterministic: no key


def test_blocked_result_independent_of_bucketing():
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(37, generator=g), torch.randn(50, generator=g) * 3
    for mode in MODES:
        codec = SignCodec(block_size=8, mode=mode)
        both = decode(codec, [encode(codec, torch.cat([a, b]), Layout([37, 50], [4, 9]), key=5)[0]], Layout([37, 50], [4, 9]))
        alone = decode(codec, [encode(codec, b, Layout([50], [9]), key=5)[0]], Layout([50], [9]))
        assert torch.equal(both[37:], alone)


# ------------------------------------------------------------------------------------------------
# stochastic mode: unbiased with variance a^2 - x^2
# ------------------------------------------------------------------------------------------------
def _stochastic_vector():
    """Two blocks of 32; each holds +-max, zeros and ratios x/a across (-1, 1)."""
    fracs = [0.5, 0.25, 0.75, 0.1, 0.9, 0.01, 0.99, 1 / 3, 0.6, 0.05, 0.95, 0.4, 0.2, 0.8]
    vals = []
    for a in (2.0, 0.375):
        block = [a, -a, 0.0, 0.0]
        for p in fracs:
            block += [a * p, -a * p]
        vals += block[:32]
    return torch.tensor(vals, dtype=torch.float32)


@pytest.mark.parametrize("block_size", [None, 32])
def test_stochastic_unbiased(block_size):
    K = 2000
    x = _stochastic_vector()
    n = x.numel()
    layout = Layout.flat(n)
    codec = SignCodec(block_size=block_size, mode="stochastic")
    assert codec.stochastic
    keys = np.random.default_rng(78).integers(0, 2 ** 62, size=K).tolist()
    dec = np.empty((K, n))
    for r, key in enumerate(keys):
        body, info = encode(codec, x, layout, key=key)
        assert info.finite
        dec[r] = f64(decode(codec, [body], layout))
    xd = f64(x)
    lengths = ref_block_lengths([n], block_size)
    a = np.repeat(ref_absmax(xd, lengths), lengths)
    assert np.all(np.abs(dec) == a), "a value is not +-a"
    sure = np.abs(xd) == a
    np.testing.assert_array_equal(dec[:, sure], np.broadcast_to(xd[sure], (K, int(sure.sum()))))
    test = ~sure
    m = int(test.sum())
    z_crit = statistics.NormalDist().inv_cdf(1 - 1e-4 / (2 * m))   # Bonferroni, family alpha 1e-4
    var = a ** 2 - xd ** 2
    z = (dec.mean(0)[test] - xd[test]) / np.sqrt(var[test] / K)
    assert np.all(np.abs(z) < z_crit), f"bias: max |z| = {np.max(np.abs(z)):.2f} (crit {z_crit:.2f})"
    # zeros: +a and -a with probability 1/2 each (covered above; checked explicitly as a rate too)
    zeros = xd == 0
    assert zeros.sum() >= 2
    rate = (dec[:, zeros] > 0).mean(0)
    assert np.all(np.abs(rate - 0.5) < z_crit * math.sqrt(0.25 / K))


def test_stochastic_key_determinism():
    x = _stochastic_vector()
    layout = Layout.flat(x.numel())
    codec = SignCodec(mode="stochastic")
    b1, _ = encode(codec, x, layout, key=42)
    assert torch.equal(b1, encode(SignCodec(mode="stochastic"), x, layout, key=42)[0])
    assert all(not torch.equal(b1, encode(codec, x, layout, key=k)[0]) for k in (43, 2 ** 40 + 42, 7))


# ------------------------------------------------------------------------------------------------
# edge cases
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_constant_and_all_zero_blocks(mode):
    for block_size in (None, "layer", 4):
        codec = SignCodec(block_size=block_size, mode=mode)
        for v in (3.7, -1.0, 1e38, -3.4e38, 1e-40, -1e-45, 0.0):
            for numels in ([1], [9], [8, 1]):
                layout = Layout(numels)
                x = torch.full((layout.numel,), v)
                err = torch.full((layout.numel,), 7.0)
                body, info = encode(codec, x, layout, key=4, error_out=err)
                out = decode(codec, [body], layout)
                # constant blocks: a = |c| in both modes, and x/a = +-1 is never flipped
                assert info.finite and torch.equal(out, x), (v, numels, block_size)
                assert info.error_sq == 0 and not bool(err.any())
                assert torch.equal(decode(codec, [body, body, body], layout, divisor=3), x)
        x = torch.cat([torch.zeros(10), torch.linspace(-1, 1, 9)])
        layout = Layout([10, 9])
        body, _ = encode(codec, x, layout, key=1)
        out = decode(codec, [body], layout)
        if block_size is not None:   # the zero parameter has blocks of its own: a = 0
            assert ref_scales(body.numpy(), 1)[0] == 0 and not bool(out[:10].any())


HUGE_TINY = [
    [FP32_MAX, -FP32_MAX, 0.0, 1.0, -1e38, 2e37],
    [1e30, -1e30, 3e29, 1.0, -2.0, 0.0, 7e29],
    [3e38, 2.9e38, 3.1e38, 3.0e38, -3.3e38],
    [1e-30, -1e-30, 3e-31, 0.0, 2e-30],
    [1e-40, -1e-40, 3e-41, 0.0, 7e-41, 1.4e-45, -2.2e-41, 5e-42],
    [1e-44, 0.0, 1.4e-45, 4.2e-45],
    [1e-40, 1.0, -0.5, 1e30, 1e-30],
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("block_size", [None, 2])
def test_huge_and_tiny_values(block_size, mode):
    codec = SignCodec(block_size=block_size, mode=mode)
    for i, vals in enumerate(HUGE_TINY):
        x = torch.tensor(vals, dtype=torch.float32)
        layout = Layout.flat(x.numel())
        lengths = ref_block_lengths([x.numel()], block_size)
        bodies = []
        for key in range(3):
            err = torch.zeros(x.numel())
            body, info = encode(codec, x, layout, key=10 * i + key, error_out=err)
            assert info.finite
            out = decode(codec, [body], layout)
            assert bool(torch.isfinite(out).all())
            check_body(codec, x, layout, body, out)
            assert torch.equal(err, x - out)
            np.testing.assert_allclose(info.input_sq, float(np.sum(f64(x) ** 2)), rtol=1e-5)
            # a residual overflows only where documented: a stochastic flip with a > FP32_MAX / 2
            a = np.repeat(ref_scales(body.numpy(), len(lengths)), lengths)
            flipped = np.sign(f64(out)) != np.sign(f64(x))
            may_overflow = flipped & (a > FP32_MAX / 2) & (mode == "stochastic")
            assert bool(torch.isfinite(err[torch.from_numpy(~may_overflow)]).all())
            if not may_overflow.any():
                assert math.isfinite(info.error_sq)
            bodies.append(body)
        mean = decode(codec, bodies, layout, divisor=3)
        terms = [ref_decode_sign(b.numpy(), [x.numel()], block_size=block_size) / 3 for b in bodies]
        ref, mag = sum(terms), sum(np.abs(t) for t in terms)
        assert bool(torch.isfinite(mean).all())
        assert np.all(np.abs(f64(mean) - ref) <= 4 * EPS32 * mag + TINY32)


def test_stochastic_residual_overflow_is_the_documented_case():
    """x = FP32_MAX flipped to -FP32_MAX: x - q = 2 * FP32_MAX is not a float32 (inf), as documented."""
    codec = SignCodec(mode="stochastic")
    x = torch.tensor([FP32_MAX, 0.0])    # the zero flips for about half the keys, its residual is finite
    layout = Layout.flat(2)
    for key in range(8):
        err = torch.zeros(2)
        _, info = encode(codec, x, layout, key=key, error_out=err)
        assert info.finite and float(err[0]) == 0.0 and abs(float(err[1])) == FP32_MAX


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_inputs_and_outputs(mode, in_dtype):
    numels = [100, 3, 257]
    layout = Layout(numels)
    x = ragged_data(numels, seed=21).to(in_dtype)
    codec = SignCodec(block_size="layer", mode=mode)
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
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("numels", [[5000], [1, 700, 33, 4266]], ids=["flat", "ragged"])
def test_error_out_and_stats(numels, mode):
    layout = Layout(numels)
    x = ragged_data(numels, seed=len(numels))
    for block_size in (None, 64):
        codec = SignCodec(block_size=block_size, mode=mode)
        err = torch.full((layout.numel,), 1234.0)
        body, info = encode(codec, x, layout, key=17, error_out=err)
        out = decode(codec, [body], layout)
        assert info.finite
        assert torch.equal(err, x - out)
        xd, ed = f64(x), f64(err)
        np.testing.assert_allclose(info.input_sq, float(np.sum(xd ** 2)), rtol=1e-5)
        np.testing.assert_allclose(info.error_sq, float(np.sum(ed ** 2)), rtol=1e-5)
        assert torch.equal(encode(codec, x, layout, key=17)[0], body)
        err16 = torch.zeros(layout.numel, dtype=torch.bfloat16)
        codec.encode(x, torch.zeros_like(body), layout, key=17, error_out=err16)
        assert torch.equal(err16, (x - out).to(torch.bfloat16))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("block_size", [None, "layer", 7])
@pytest.mark.parametrize("W", [1, 2, 3, 5])
def test_decode_mean_of_bodies(W, block_size, mode):
    numels = [40, 1, 77]
    layout = Layout(numels)
    g = torch.Generator().manual_seed(W)
    codec = SignCodec(block_size=block_size, mode=mode)
    xs = [torch.randn(layout.numel, generator=g) * (r + 1) + r for r in range(W)]
    bodies = [encode(codec, xr, layout, key=r)[0] for r, xr in enumerate(xs)]
    terms = [ref_decode_sign(b.numpy(), numels, block_size=block_size) / W for b in bodies]
    ref, mag = sum(terms), sum(np.abs(t) for t in terms)
    saved = [b.clone() for b in bodies]
    got = decode(codec, bodies, layout, divisor=W)
    assert np.all(np.abs(f64(got) - ref) <= 4 * EPS32 * mag)
    got16 = decode(codec, bodies, layout, divisor=W, dtype=torch.float16)
    assert np.all(np.abs(f64(got16) - ref) <= 2.0 ** -11 * np.abs(ref) + 4 * EPS32 * mag + 2.0 ** -24)
    assert all(torch.equal(b, s) for b, s in zip(bodies, saved)), "decode modified a body"
    # bodies at odd byte offsets of one gathered buffer (as the hook receives them)
    size = bodies[0].numel()
    gathered = torch.zeros(1 + W * (size + 2), dtype=torch.uint8)
    views = []
    for r, b in enumerate(bodies):
        off = 1 + r * (size + 2)
        gathered[off:off + size] = b
        views.append(gathered[off:off + size])
    assert torch.equal(decode(codec, views, layout, divisor=W), got)
    assert torch.equal(decode(codec, [], layout), torch.zeros(layout.numel))


# ------------------------------------------------------------------------------------------------
# non-finite input, configuration
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("block_size", [None, "layer", 4])
def test_non_finite_input_is_reported(block_size, mode):
    numels = [5, 11, 1, 8]
    layout = Layout(numels)
    n = layout.numel
    codec = SignCodec(block_size=block_size, mode=mode)
    base = ragged_data(numels, seed=8)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for pos in (0, 5, 16, n - 1):
            for dtype in (torch.float32, torch.bfloat16):
                x = base.clone()
                x[pos] = bad
                err = torch.arange(n, dtype=torch.float32)
                _, info = encode(codec, x.to(dtype), layout, key=pos, error_out=err)
                assert info.finite is False, (bad, pos, dtype)  # error_out: unspecified, callers drop it
                assert encode(codec, x.to(dtype), layout)[1].finite is False
    assert encode(codec, torch.tensor([float("inf"), float("-inf")] * 12 + [1.0]), layout)[1].finite is False


def test_empty_input():
    for mode in MODES:
        codec = SignCodec(mode=mode, block_size="layer")
        layout = Layout([0, 0])
        assert codec.body_nbytes(layout) == 0
        body = torch.zeros(0, dtype=torch.uint8)
        info = codec.encode(torch.zeros(0), body, layout, error_out=torch.zeros(0))
        assert info.finite and info.error_sq == 0 and info.input_sq == 0
        assert codec.decode([body, body], layout, torch.zeros(0), divisor=2).numel() == 0


def test_config_and_attributes():
    c = SignCodec()
    assert (c.name, c.codec_id, c.bits, c.stochastic) == ("sign", 11, 1, False)
    assert c.config() == {"codec": "sign", "bits": 1, "block_size": 256, "mode": "scaled"}  # one scale per 256 values
    s = SignCodec(bits=1, block_size="layer", mode="stochastic")
    assert s.bits == 1 and s.stochastic is True
    assert s.config() == {"codec": "sign", "bits": 1, "block_size": "layer", "mode": "stochastic"}
    assert SignCodec.summary and "SignCodec(" in repr(s)


@pytest.mark.parametrize("bits", [0, 2, 4, 16, -1, 1.0, True, "8", None])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits") as exc:
        SignCodec(bits=bits)
    # names the width it sends and what to pass (not register()'s default 8)
    assert f"bits={bits!r} is not available" in str(exc.value) and "omit bits or pass bits=1" in str(exc.value)


@pytest.mark.parametrize("option,value,choices", [
    ("mode", "sign", ("'scaled'", "'stochastic'")),
    ("mode", None, ("'scaled'", "'stochastic'")),
    ("mode", "Scaled", ("'scaled'", "'stochastic'")),
    ("block_size", 0, ("None", "'layer'", "positive")),
    ("block_size", "64", ("None", "'layer'", "positive")),
])
def test_bad_options(option, value, choices):
    with pytest.raises(ValueError, match=option) as exc:
        SignCodec(**{option: value})
    assert all(c in str(exc.value) for c in choices), str(exc.value)
