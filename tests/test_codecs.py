"""Unit tests for ddp_qhooks.codecs (packing, uniform/stochastic quantizers, cast codecs).

Every check compares the codec against an independent computation written here: a numpy
bit-stream packer, a float64 numpy reference quantizer with its own block segmentation, and
plain float64 sums for decoding.  Tolerances are derived from the documented guarantees:

* uniform: |decode - x| <= step/2 (round to nearest); stochastic: decode is one of the two
  grid levels around x and E[decode] = x;
* plus fp32 round-off: a relative 1e-5 of a step, ``2 * eps32 * max(|lo|, |hi|)`` (the codec
  works in float32, so the value itself is only known to that precision) and two units of the
  smallest fp32 subnormal (absolute resolution of a float32 near zero).

Regression tests for bugs found while writing this file (near-constant buckets, subnormal steps,
cast decode precision, statistics overflow) are plain tests now that the bugs are fixed.
"""
from __future__ import annotations

import math
import shutil
import statistics

import numpy as np
import pytest
import torch
from _reference import REF_STRIPE, ref_block_lengths, ref_unpack
from codec_specs import spec

from ddp_qhooks.codecs import (
    CODECS,
    Layout,
    make_codec,
    pack_codes,
    packed_nbytes,
    unpack_codes,
)

EPS32 = 2.0 ** -23          # float32 machine epsilon
TINY32 = 2.0 ** -149        # smallest positive float32 subnormal
FP32_MAX = float(np.finfo(np.float32).max)
QUANTIZERS = ("uniform", "stochastic")
# the cast codecs (their test specs name the format), e.g. {"fp16": torch.float16, "bf16": ..., "none": torch.float32}
CASTS = {name: spec(name).cast_dtype for name in CODECS if spec(name).cast_dtype is not None}


# ------------------------------------------------------------------------------------------------
# independent reference implementations
# ------------------------------------------------------------------------------------------------


def _ref_stream_pack(codes, bits):
    """LSB-first bit stream: bit j of code i is bit i*bits + j of the little-endian byte string."""
    stream = ((codes[:, None].astype(np.uint32) >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(stream.reshape(-1), bitorder="little")


def _ref_planar_pack(codes, bits):
    """Planar stripes: in a stripe of r codes, byte j = sum_p code[j + p*m] << (p*bits), m = ceil(r*bits/8)."""
    k, out = 8 // bits, []
    for a in range(0, codes.size, REF_STRIPE):
        stripe = codes[a:a + REF_STRIPE].astype(np.int64)
        m = -(-stripe.size // k)
        padded = np.zeros(k * m, dtype=np.int64)
        padded[:stripe.size] = stripe
        out.append((padded.reshape(k, m) << (np.arange(k)[:, None] * bits)).sum(0).astype(np.uint8))
    return np.concatenate(out)


def ref_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.size == 0:
        return np.zeros(0, dtype=np.uint8)
    if bits == 8:
        return codes.copy()
    return _ref_planar_pack(codes, bits) if bits in (1, 2, 4) else _ref_stream_pack(codes, bits)


def body_meta(body: torch.Tensor, nblocks: int) -> np.ndarray:
    """(nblocks, 2) float64 array of the little-endian float32 (lo, hi) metadata."""
    raw = body[: 8 * nblocks].numpy().tobytes()
    return np.frombuffer(raw, dtype="<f4").astype(np.float64).reshape(nblocks, 2)


def body_codes(body: torch.Tensor, nblocks: int, n: int, bits: int) -> np.ndarray:
    packed = body[8 * nblocks:].numpy()
    assert packed.size == (n * bits + 7) // 8
    return ref_unpack(packed, bits, n)


def ref_decode(body: torch.Tensor, lengths, bits: int) -> np.ndarray:
    """float64 decode straight from the body bytes: lo + code * (hi - lo) / L."""
    n = sum(lengths)
    meta = body_meta(body, len(lengths))
    codes = body_codes(body, len(lengths), n, bits)
    L = (1 << bits) - 1
    lo = np.repeat(meta[:, 0], lengths)
    hi = np.repeat(meta[:, 1], lengths)
    return lo + codes * ((hi - lo) / L)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def new_body(codec, layout):
    return torch.zeros(codec.body_nbytes(layout), dtype=torch.uint8)


def encode(codec, x, layout=None, key=0, error_out=None):
    layout = Layout.flat(x.numel()) if layout is None else layout
    body = new_body(codec, layout)
    info = codec.encode(x, body, layout, key=key, error_out=error_out)
    return body, info


def decode(codec, bodies, layout, n, divisor=1, dtype=torch.float32):
    out = torch.full((n,), 12345.0, dtype=dtype)
    codec.decode(list(bodies), layout, out, divisor=divisor)
    return out


def round_trip(codec, x, layout=None, key=0, dtype=torch.float32):
    layout = Layout.flat(x.numel()) if layout is None else layout
    body, info = encode(codec, x, layout, key)
    return body, info, decode(codec, [body], layout, x.numel(), dtype=dtype)


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def check_quantized(codec, x, layout, body, out, stochastic):
    """All the guarantees of a uniform/stochastic body for input ``x``, against numpy in float64."""
    bits = codec.bits
    L = (1 << bits) - 1
    lengths = ref_block_lengths(layout.param_numels, codec.block_size)
    n = sum(lengths)
    assert body.numel() == 8 * len(lengths) + (n * bits + 7) // 8
    xd = f64(x)
    od = f64(out)
    meta = body_meta(body, len(lengths))
    # metadata: exact min and max of each block (blocks cut per parameter)
    starts = np.cumsum([0] + lengths[:-1]).astype(np.int64)
    if n:
        np.testing.assert_array_equal(meta[:, 0], np.minimum.reduceat(xd, starts))
        np.testing.assert_array_equal(meta[:, 1], np.maximum.reduceat(xd, starts))
    codes = body_codes(body, len(lengths), n, bits)
    assert codes.min(initial=0) >= 0 and codes.max(initial=0) <= L
    lo = np.repeat(meta[:, 0], lengths)
    hi = np.repeat(meta[:, 1], lengths)
    step = (hi - lo) / L
    mag = np.maximum(np.abs(lo), np.abs(hi))
    roundoff = 2 * EPS32 * mag + 2 * TINY32
    # decoded values lie on the block's grid lo + k * step (up to fp32 round-off)
    grid = lo + codes * step
    assert np.all(np.abs(od - grid) <= 2 * EPS32 * (np.abs(lo) + codes * step) + 2 * TINY32), \
        f"off grid by {np.max(np.abs(od - grid) / np.where(step > 0, step, 1))} steps"
    # constant blocks decode exactly
    const = step == 0
    np.testing.assert_array_equal(od[const], xd[const])
    # error bound
    half = 1.0 if stochastic else 0.5
    err = np.abs(od - xd)
    bound = half * step * (1 + 1e-5) + roundoff
    assert np.all(err <= bound), f"error {np.max(err / np.where(bound > 0, bound, 1))} x the bound"
    # code choice against the reference quantizer
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(step > 0, (xd - lo) / np.where(step > 0, step, 1), 0.0)
    tol = 1e-5 + np.where(step > 0, roundoff / np.where(step > 0, step, 1), 0.0)
    if stochastic:
        lo_code = np.clip(np.floor(t - tol), 0, L)
        hi_code = np.clip(np.ceil(t + tol), 0, L)
        assert np.all((codes >= lo_code) & (codes <= hi_code)), "stochastic code is not a neighbouring level"
    else:
        ref = np.clip(np.floor(t + 0.5), 0, L)
        differ = codes != ref
        frac = t - np.floor(t)
        tie = np.abs(frac - 0.5) <= tol
        assert np.all(~differ | tie), f"{int(np.sum(differ & ~tie))} codes differ from round-to-nearest away from ties"
        assert np.all(np.abs(codes - t) <= 0.5 + tol)
    return codes


def ragged_data(numels, seed, dtype=torch.float32):
    """Parameters with very different scales and offsets, one after another."""
    g = torch.Generator().manual_seed(seed)
    scales = [1e-3, 1.0, 50.0, 0.2, 7.0]
    offsets = [0.0, 2.0, -7.0, 0.5, -0.25]
    parts = [torch.randn(n, generator=g) * scales[i % 5] + offsets[i % 5] for i, n in enumerate(numels)]
    return (torch.cat(parts) if parts else torch.zeros(0)).to(dtype)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: intra-op threads only add overhead (repeat_interleave costs ~8 ms per call
    with 2 threads on a 2-core box, ~10 us with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


LAYOUTS = {
    "flat1000": [1000],
    "ragged": [1, 0, 5, 64, 65, 130, 7, 1003, 2],
}


# ------------------------------------------------------------------------------------------------
# 1. packing
# ------------------------------------------------------------------------------------------------
PACK_LENGTHS = [0, 1, 2, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000, 1001, 100003, REF_STRIPE, 2 * REF_STRIPE + 13]


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_matches_reference_layout(bits):
    rng = np.random.default_rng(1000 + bits)
    for n in PACK_LENGTHS:
        codes = rng.integers(0, 1 << bits, size=n, dtype=np.uint8)
        if n >= 2:
            codes[0], codes[-1] = (1 << bits) - 1, (1 << bits) - 1   # extreme codes at both ends
        nbytes = math.ceil(n * bits / 8)
        assert packed_nbytes(n, bits) == nbytes
        packed = pack_codes(torch.from_numpy(codes), bits)
        assert packed.dtype == torch.uint8 and packed.shape == (nbytes,)
        np.testing.assert_array_equal(packed.numpy(), ref_pack(codes, bits), err_msg=f"n={n}")
        back = unpack_codes(packed, bits, n)
        assert back.dtype == torch.uint8 and back.shape == (n,)
        np.testing.assert_array_equal(back.numpy(), codes, err_msg=f"n={n}")


@pytest.mark.parametrize("bits", range(1, 9))
def test_unpack_reference_stream_and_into_buffers(bits):
    """unpack of an independently packed stream; pack into a dirty ``out`` slice from an unaligned input."""
    rng = np.random.default_rng(2000 + bits)
    for n in PACK_LENGTHS:
        codes = rng.integers(0, 1 << bits, size=n, dtype=np.uint8)
        ref = ref_pack(codes, bits)
        np.testing.assert_array_equal(unpack_codes(torch.from_numpy(ref.copy()), bits, n).numpy(), codes)
        # input starting at an odd storage offset, output slice of a buffer full of 0xFF
        big = torch.zeros(n + 11, dtype=torch.uint8)
        big[3:3 + n] = torch.from_numpy(codes)
        dirty = torch.full((ref.size + 10,), 0xFF, dtype=torch.uint8)
        res = pack_codes(big[3:3 + n], bits, out=dirty[5:5 + ref.size])
        np.testing.assert_array_equal(res.numpy(), ref)
        np.testing.assert_array_equal(dirty[5:5 + ref.size].numpy(), ref)
        assert bool((dirty[:5] == 0xFF).all()) and bool((dirty[5 + ref.size:] == 0xFF).all())
        # unpack from an unaligned slice into a dirty out
        src = torch.zeros(ref.size + 7, dtype=torch.uint8)
        src[3:3 + ref.size] = torch.from_numpy(ref)
        out = torch.full((n,), 0xEE, dtype=torch.uint8)
        unpack_codes(src[3:3 + ref.size], bits, n, out=out)
        np.testing.assert_array_equal(out.numpy(), codes)


@pytest.mark.parametrize("bits", (1, 2, 4))
def test_planar_torch_packer_matches_reference(bits):
    """The torch-ops packer (used on accelerators) against the reference, here on CPU tensors."""
    from ddp_qhooks.codecs.packing import _pack_planar_torch
    rng = np.random.default_rng(3000 + bits)
    for n in (1, 9, 1001, REF_STRIPE + 77):
        codes = rng.integers(0, 1 << bits, size=n, dtype=np.uint8)
        out = torch.full((packed_nbytes(n, bits),), 0xAA, dtype=torch.uint8)
        _pack_planar_torch(torch.from_numpy(codes), bits, out)
        np.testing.assert_array_equal(out.numpy(), ref_pack(codes, bits), err_msg=f"n={n}")


def test_pack_rejects_bad_bits_and_sizes():
    codes = torch.zeros(16, dtype=torch.uint8)
    for bits in (0, 9, -1):
        with pytest.raises(ValueError):
            pack_codes(codes, bits)
        with pytest.raises(ValueError):
            unpack_codes(torch.zeros(2, dtype=torch.uint8), bits, 16)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 1, 16)   # 16 one-bit codes need 2 bytes
    with pytest.raises(ValueError):
        pack_codes(codes, 4, out=torch.zeros(9, dtype=torch.uint8))


# ------------------------------------------------------------------------------------------------
# 2. deterministic uniform (and the same generic guarantees for stochastic)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
@pytest.mark.parametrize("block_size", [None, 1, 3, 64, 1000])
@pytest.mark.parametrize("bits", range(1, 9))
def test_uniform_round_to_nearest(bits, block_size, layout_name):
    numels = LAYOUTS[layout_name]
    layout = Layout(numels)
    x = ragged_data(numels, seed=bits * 7 + (block_size or 0))
    codec = make_codec("uniform", bits=bits, block_size=block_size)
    body, info, out = round_trip(codec, x, layout)
    assert info.finite
    check_quantized(codec, x, layout, body, out, stochastic=False)
    np.testing.assert_allclose(f64(out), ref_decode(body, ref_block_lengths(numels, block_size), bits),
                               rtol=4 * EPS32, atol=4 * EPS32 * float(x.abs().max()))
    if block_size == 1:
        assert torch.equal(out, x)   # every block is a single value: exact


@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
@pytest.mark.parametrize("block_size", [None, 3, 64])
@pytest.mark.parametrize("bits", range(1, 9))
def test_stochastic_codes_are_neighbouring_levels(bits, block_size, layout_name):
    numels = LAYOUTS[layout_name]
    layout = Layout(numels)
    x = ragged_data(numels, seed=100 + bits)
    codec = make_codec("stochastic", bits=bits, block_size=block_size)
    for key in (0, 1, 987654321987):
        body, info, out = round_trip(codec, x, layout, key=key)
        assert info.finite
        check_quantized(codec, x, layout, body, out, stochastic=True)


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("bits", [3, 8])
def test_quantizer_across_chunk_boundaries(name, bits):
    """A bucket longer than the codec's internal chunking (> 2**17 values), ragged layout."""
    numels = [70001, 5, 61000]
    layout = Layout(numels)
    x = ragged_data(numels, seed=5 + bits)
    for block_size in (None, 4096):
        codec = make_codec(name, bits=bits, block_size=block_size)
        body, info, out = round_trip(codec, x, layout, key=3)
        check_quantized(codec, x, layout, body, out, stochastic=(name == "stochastic"))
        out16 = decode(codec, [body], layout, x.numel(), dtype=torch.float16)
        np.testing.assert_allclose(f64(out16), f64(out), rtol=2.0 ** -10, atol=2.0 ** -24)


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_blocks_never_straddle_parameters(name, bits):
    # param 0 = [0, 0, 0, 0, 1], param 1 = [100, 200, 300, 400, 500], block_size 4.
    # Per-parameter blocks: [0,0,0,0] [1] [100..400] [500]: 1 and 500 are alone, hence exact.
    # A block cut across the bucket would put 1 together with 100..300 and quantize it coarsely.
    x = torch.tensor([0, 0, 0, 0, 1, 100, 200, 300, 400, 500], dtype=torch.float32)
    layout = Layout([5, 5])
    codec = make_codec(name, bits=bits, block_size=4)
    assert codec.body_nbytes(layout) == 8 * 4 + math.ceil(10 * bits / 8)
    body, info, out = round_trip(codec, x, layout, key=11)
    np.testing.assert_array_equal(body_meta(body, 4), [[0, 0], [1, 1], [100, 400], [500, 500]])
    assert out[4].item() == 1.0 and out[9].item() == 500.0
    assert torch.equal(out[:4], x[:4])
    check_quantized(codec, x, layout, body, out, stochastic=(name == "stochastic"))


@pytest.mark.parametrize("name", QUANTIZERS)
def test_blocked_result_independent_of_bucketing(name):
    """With block_size, a parameter's result depends only on itself (and its key), not on its bucket."""
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(37, generator=g), torch.randn(50, generator=g) * 3
    codec = make_codec(name, bits=3, block_size=8)
    _, _, both = round_trip(codec, torch.cat([a, b]), Layout([37, 50], [4, 9]), key=5)
    _, _, alone = round_trip(codec, b, Layout([50], [9]), key=5)
    assert torch.equal(both[37:], alone)
    _, _, alone_a = round_trip(codec, a, Layout([37], [4]), key=5)
    assert torch.equal(both[:37], alone_a)


# ------------------------------------------------------------------------------------------------
# 3. stochastic rounding: unbiasedness and Bernoulli variance
# ------------------------------------------------------------------------------------------------
def _stochastic_vector(bits):
    """64 values in 4 blocks of 16; every block holds lo and hi, so all blocks share one exact grid."""
    L = (1 << bits) - 1
    step = 2.0 ** -4
    lo = -step * (L // 2)
    hi = lo + L * step
    fracs = [0.0, 0.5, 0.25, 0.75, 0.1, 0.9, 0.01, 0.99, 1 / 3, 0.6, 0.05, 0.95, 0.0, 0.4]
    ks_per_block = [0, L - 1, L // 2, max(0, L - 2)]
    vals = []
    for blk, k0 in enumerate(ks_per_block):
        block = [lo, hi]
        for i, p in enumerate(fracs):
            k = min(L - 1, k0 + (i % 2) * blk) if L > 1 else 0
            block.append(lo + (k + p) * step)
        vals += block
    x = torch.tensor(vals, dtype=torch.float32)
    return x, lo, hi, step


@pytest.mark.parametrize("block_size", [None, 16])
@pytest.mark.parametrize("bits", [1, 2, 8])
def test_stochastic_unbiased_with_bernoulli_variance(bits, block_size):
    K = 2000
    x, lo, hi, step = _stochastic_vector(bits)
    L = (1 << bits) - 1
    n = x.numel()
    layout = Layout.flat(n)
    codec = make_codec("stochastic", bits=bits, block_size=block_size)
    keys = np.random.default_rng(1234 + bits).integers(0, 2 ** 62, size=K).tolist()
    dec = np.empty((K, n))
    for r, key in enumerate(keys):
        body, info = encode(codec, x, layout, key=key)
        assert info.finite
        dec[r] = f64(decode(codec, [body], layout, n))

    xd = f64(x)
    t = (xd - lo) / step                       # exact: power-of-two step, representable grid
    down = np.floor(t)
    p = t - down
    lower = lo + down * step
    upper = lo + np.minimum(down + 1, L) * step
    # each decode is exactly one of the two neighbouring grid levels
    is_up = dec == upper
    assert np.all((dec == lower) | is_up), "a decoded value is not one of the two neighbouring levels"
    up_rate = is_up.mean(axis=0)

    # values exactly on a level: essentially never moved (fp32 round-off of dither near 1 only)
    on_grid = p == 0
    assert on_grid.sum() >= 8
    assert np.all(up_rate[on_grid & (down < L)] <= 0.005)
    np.testing.assert_array_equal(dec[:, on_grid & (down == L)], np.broadcast_to(xd[on_grid & (down == L)], (K, int(np.sum(on_grid & (down == L))))))

    # z-test of the mean per element, Bonferroni over the tested elements (family alpha 1e-4)
    test = ~on_grid
    m = int(test.sum())
    z_crit = statistics.NormalDist().inv_cdf(1 - 1e-4 / (2 * 2 * m))
    sigma2 = step ** 2 * p * (1 - p)
    mean = dec.mean(axis=0)
    z = (mean[test] - xd[test]) / np.sqrt(sigma2[test] / K)
    assert np.all(np.abs(z) < z_crit), f"bias: max |z| = {np.max(np.abs(z)):.2f} (crit {z_crit:.2f})"

    # empirical variance vs step^2 p (1-p), for p away from 0/1 where the asymptotics hold
    mid = test & (p >= 0.05) & (p <= 0.95)
    var = dec.var(axis=0, ddof=1)
    mu4 = step ** 4 * p * (1 - p) * (1 - 3 * p * (1 - p))
    se = np.sqrt(np.maximum(mu4 - sigma2 ** 2, 0) / K)
    # s^2 of a two-point sample is a function of the up-rate: first-order term + the second-order
    # term (p_hat - p)^2 step^2, which dominates at p = 1/2 where the first-order term vanishes
    tol = z_crit * se + z_crit ** 2 * sigma2 / K + sigma2 / (K - 1)
    assert np.all(np.abs(var[mid] - sigma2[mid]) <= tol[mid]), \
        f"variance mismatch: {np.max(np.abs(var[mid] - sigma2[mid]) / tol[mid]):.2f} x tolerance"

    # successive keys give unrelated roundings: lag-1 correlation of the up indicators
    ind = is_up[:, mid].astype(float)
    ind -= ind.mean(axis=0)
    corr = (ind[1:] * ind[:-1]).mean(axis=0) / np.maximum(ind.var(axis=0), 1e-12)
    assert abs(float(corr.mean())) < 5 / math.sqrt(K)


@pytest.mark.parametrize("block_size", [None, 16])
def test_stochastic_key_determinism(block_size):
    x, *_ = _stochastic_vector(8)
    layout = Layout.flat(x.numel())
    codec = make_codec("stochastic", bits=8, block_size=block_size)
    b1, _ = encode(codec, x, layout, key=42)
    b2, _ = encode(codec, x, layout, key=42)
    assert torch.equal(b1, b2)
    others = [encode(codec, x, layout, key=k)[0] for k in (43, 2 ** 40 + 42, 7)]
    assert all(not torch.equal(b1, o) for o in others)
    # a fresh codec object gives the same result for the same key
    b3, _ = encode(make_codec("stochastic", bits=8, block_size=block_size), x, layout, key=42)
    assert torch.equal(b1, b3)


def test_uniform_ignores_key():
    x = ragged_data([300], seed=3)
    codec = make_codec("uniform", bits=4)
    assert torch.equal(encode(codec, x, key=1)[0], encode(codec, x, key=99)[0])


# ------------------------------------------------------------------------------------------------
# 4. edge cases for every codec
# ------------------------------------------------------------------------------------------------
QUANT_CONFIGS = [(name, bits, bs) for name in QUANTIZERS for bits in (1, 2, 5, 8) for bs in (None, 3)]
ALL_CONFIGS = [(n, b, bs) for n, b, bs in QUANT_CONFIGS] + [(n, 8, None) for n in CASTS]


def _codec(name, bits, bs):
    return make_codec(name, bits=bits, block_size=bs) if name in QUANTIZERS else make_codec(name)


def _cfg_id(cfg):
    return f"{cfg[0]}-b{cfg[1]}-bs{cfg[2]}"


def check_any(codec, x, layout=None, key=0, out_dtype=torch.float32):
    """Round trip through any codec and check it against the codec's documented semantics."""
    layout = Layout.flat(x.numel()) if layout is None else layout
    body, info, out = round_trip(codec, x, layout, key=key, dtype=out_dtype)
    x32 = x.float()
    if codec.name in CASTS:
        dt = CASTS[codec.name]
        cast = x.to(dt)
        assert torch.equal(body.view(dt), cast)
        assert info.finite == bool(torch.isfinite(cast).all())
        if info.finite:
            assert torch.equal(out, cast.to(out_dtype))
        return body, info, out
    assert info.finite
    assert bool(torch.isfinite(out).all()), "decode overflowed"
    if out_dtype == torch.float32:
        check_quantized(codec, x32, layout, body, out, stochastic=codec.stochastic)
    else:
        out32 = decode(codec, [body], layout, x.numel())
        check_quantized(codec, x32, layout, body, out32, stochastic=codec.stochastic)
        rel = 2.0 ** -10 if out_dtype == torch.float16 else 2.0 ** -7
        np.testing.assert_allclose(f64(out), f64(out32), rtol=rel, atol=float(torch.finfo(out_dtype).tiny))
    return body, info, out


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=_cfg_id)
def test_empty_and_single_element(cfg):
    codec = _codec(*cfg)
    empty = torch.zeros(0)
    layout = Layout.flat(0)
    assert codec.body_nbytes(layout) == 0
    body = new_body(codec, layout)
    err = torch.zeros(0)
    info = codec.encode(empty, body, layout, key=1, error_out=err)
    assert info.finite and info.error_sq == 0 and info.input_sq == 0
    assert codec.encode(empty, body, layout, key=1).finite
    out = torch.zeros(0)
    codec.decode([body, body], layout, out, divisor=2)
    # layout with empty parameters only
    assert codec.body_nbytes(Layout([0, 0], [3, 4])) == 0
    for v in (3.25, -1e-3, 0.0, 1e30, -2.5e-39):
        x = torch.tensor([v])
        if codec.name in CASTS:
            check_any(codec, x, key=9)        # equals the torch cast (fp16 of 1e30 is inf: non-finite)
        else:
            body, info, out = round_trip(codec, x, key=9)
            assert info.finite and torch.equal(out, x), (v, out)


CONSTANTS = [3.7, -1.0, 0.0, 1e38, -3.4e38, 1e-40, -1e-45, 65000.0]


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=_cfg_id)
def test_constant_tensors(cfg):
    codec = _codec(*cfg)
    for n in (2, 9, 100):
        layout = Layout([n - 1, 1]) if n > 2 else Layout.flat(n)
        for v in CONSTANTS:
            x = torch.full((n,), v)
            if codec.name in QUANTIZERS:
                err = torch.full((n,), 7.0)
                body, info = encode(codec, x, layout, key=4, error_out=err)
                out = decode(codec, [body], layout, n)
                assert info.finite and torch.equal(out, x), (v, n)
                assert info.error_sq == 0 and not bool(err.any())
                # several identical bodies averaged: still exact
                assert torch.equal(decode(codec, [body, body, body], layout, n, divisor=3), x)
            else:
                check_any(codec, x, layout)


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=_cfg_id)
def test_huge_and_mixed_magnitudes(cfg):
    codec = _codec(*cfg)
    datasets = [
        torch.tensor([FP32_MAX, -FP32_MAX, 0.0, 1.0, -1e38, 2e37]),
        torch.tensor([1e38, -1e38, 1e-40, 5.0, -3e-39, 0.0, 7e37, -1e-30]),
        torch.tensor([3e38, 2.9e38, 3.1e38, 3.0e38]),          # huge, positive, narrow-ish
        torch.tensor([-1e20, 1e20, 3.0, -2.0, 1e19]),
    ]
    for i, x in enumerate(datasets):
        _, info, out = check_any(codec, x, key=i)
        if codec.name in QUANTIZERS:
            # average of several huge payloads: no overflow either
            layout = Layout.flat(x.numel())
            bodies = [encode(codec, x, layout, key=k)[0] for k in range(3)]
            mean = decode(codec, bodies, layout, x.numel(), divisor=3)
            assert bool(torch.isfinite(mean).all())
            ref = np.mean([ref_decode(b, ref_block_lengths([x.numel()], codec.block_size), codec.bits)
                           for b in bodies], axis=0)
            np.testing.assert_allclose(f64(mean), ref, rtol=0, atol=4 * EPS32 * float(x.abs().max()))


TINY_DATA = [
    [1e-40, -1e-40, 3e-41, 0.0, 7e-41, 1.4e-45, -2.2e-41, 5e-42],   # subnormal range
    [1e-37, -1e-37, 3e-38, 0.0, 5e-38, 1.2e-38],                       # smallest normals
    [1e-44, 0.0, 1.4e-45, 4.2e-45],                                    # a few subnormal units
]


# one block per bucket with bits >= 3: see test_subnormal_bucket_decodes_on_grid
@pytest.mark.parametrize("cfg", [c for c in ALL_CONFIGS if not (c[0] in QUANTIZERS and c[2] is None and c[1] >= 3)],
                         ids=_cfg_id)
def test_tiny_and_subnormal_magnitudes(cfg):
    codec = _codec(*cfg)
    for i, vals in enumerate(TINY_DATA):
        check_any(codec, torch.tensor(vals), key=i)
        # tiny values next to ordinary ones
        check_any(codec, torch.tensor(vals + [1.0, -0.5]), key=i)


@pytest.mark.parametrize("bits", [5, 8])
@pytest.mark.parametrize("name", QUANTIZERS)
def test_subnormal_bucket_decodes_on_grid(name, bits):
    codec = make_codec(name, bits=bits)
    for vals in TINY_DATA:
        x = torch.tensor(vals)
        for key in range(4):
            body, _, out = round_trip(codec, x, key=key)
            check_quantized(codec, x, Layout.flat(x.numel()), body, out, stochastic=codec.stochastic)


@pytest.mark.parametrize("in_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=_cfg_id)
def test_low_precision_inputs(cfg, in_dtype):
    codec = _codec(*cfg)
    numels = [100, 3, 257]
    layout = Layout(numels)
    x = ragged_data(numels, seed=21).to(in_dtype)
    body, info, out = check_any(codec, x, layout, key=2)
    # error feedback: error_out is x - decode(body), in float32
    err = torch.full((x.numel(),), 99.0)
    body2, info2 = encode(codec, x, layout, key=2, error_out=err)
    assert torch.equal(body2, body)
    np.testing.assert_allclose(f64(err), f64(x) - f64(out), rtol=0, atol=1e-6 * float(x.float().abs().max()))
    np.testing.assert_allclose(info2.input_sq, float((f64(x) ** 2).sum()), rtol=1e-5)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=_cfg_id)
def test_low_precision_outputs(cfg, out_dtype):
    codec = _codec(*cfg)
    numels = [100, 3, 257]
    layout = Layout(numels)
    x = ragged_data(numels, seed=22)
    check_any(codec, x, layout, key=2, out_dtype=out_dtype)


# ------------------------------------------------------------------------------------------------
# 5. decoding several payloads with a divisor
# ------------------------------------------------------------------------------------------------
def _payloads(codec, layout, W, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(layout.numel, generator=g) * (r + 1) + r for r in range(W)]
    bodies = [encode(codec, xr, layout, key=r)[0] for r, xr in enumerate(xs)]
    return xs, bodies


@pytest.mark.parametrize("W", [1, 2, 3, 5])
@pytest.mark.parametrize("cfg", QUANT_CONFIGS, ids=_cfg_id)
def test_quantizer_decode_mean_of_bodies(cfg, W):
    codec = _codec(*cfg)
    numels = [40, 1, 77]
    layout = Layout(numels)
    n = layout.numel
    xs, bodies = _payloads(codec, layout, W, seed=W)
    lengths = ref_block_lengths(numels, codec.block_size)
    singles = [f64(decode(codec, [b], layout, n)) for b in bodies]
    ref = sum(ref_decode(b, lengths, codec.bits) for b in bodies) / W
    mag = sum(float(xr.abs().max()) for xr in xs) / W
    got = decode(codec, bodies, layout, n, divisor=W)
    np.testing.assert_allclose(f64(got), ref, rtol=0, atol=4 * EPS32 * mag)
    np.testing.assert_allclose(f64(got), sum(singles) / W, rtol=0, atol=4 * EPS32 * mag)
    got16 = decode(codec, bodies, layout, n, divisor=W, dtype=torch.bfloat16)
    np.testing.assert_allclose(f64(got16), ref, rtol=2.0 ** -7, atol=4 * EPS32 * mag)
    # decoding does not change the bodies
    again = decode(codec, bodies, layout, n, divisor=W)
    assert torch.equal(again, got)


@pytest.mark.parametrize("W", [1, 2, 3, 5, 8])
def test_none_decode_is_ordered_sum_of_quotients(W):
    codec = make_codec("none")
    layout = Layout([33, 30])
    xs, bodies = _payloads(codec, layout, W, seed=10 + W)
    got = decode(codec, bodies, layout, layout.numel, divisor=W)
    acc = xs[0].numpy() / np.float32(W)
    for xr in xs[1:]:
        acc = acc + xr.numpy() / np.float32(W)       # float32 arithmetic, rank order
    assert acc.dtype == np.float32
    np.testing.assert_array_equal(got.numpy(), acc)


@pytest.mark.parametrize("name", ["uniform", "stochastic", "fp16", "bf16", "none"])
def test_decode_leaves_bodies_unchanged(name):
    codec = _codec(name, 4, None)
    layout = Layout.flat(50)
    _, bodies = _payloads(codec, layout, 3, seed=1)
    saved = [b.clone() for b in bodies]
    decode(codec, bodies, layout, 50, divisor=3)
    assert all(torch.equal(b, s) for b, s in zip(bodies, saved))


def test_none_decode_repeated_body():
    codec = make_codec("none")
    x = torch.arange(1.0, 6.0)
    layout = Layout.flat(5)
    body, _ = encode(codec, x, layout)
    np.testing.assert_allclose(f64(decode(codec, [body, body, body], layout, 5, divisor=3)), f64(x), rtol=1e-6)


@pytest.mark.parametrize("W", [1, 3])
@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_cast_decode_mean_in_float32(name, W):
    codec = make_codec(name)
    dt = CASTS[name]
    layout = Layout.flat(400)
    xs, bodies = _payloads(codec, layout, W, seed=W)
    got = decode(codec, bodies, layout, 400, divisor=3)   # divisor 3 even for one body
    terms = [b.view(dt).double().numpy() / 3 for b in bodies]
    ref = sum(terms)
    mag = sum(np.abs(t) for t in terms)
    assert np.all(np.abs(f64(got) - ref) <= 4 * EPS32 * mag + TINY32), \
        f"max error {np.max(np.abs(f64(got) - ref) / np.maximum(mag, 1e-30)):.2e} relative"


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_cast_decode_mean_power_of_two_divisor(name):
    """With W = 2 or 4 (exact division, values far from underflow) fp16/bf16 decode is exact."""
    codec = make_codec(name)
    dt = CASTS[name]
    layout = Layout.flat(300)
    for W in (2, 4):
        xs, bodies = _payloads(codec, layout, W, seed=W)
        got = decode(codec, bodies, layout, 300, divisor=W)
        ref = sum(b.view(dt).double().numpy() / W for b in bodies)
        mag = sum(np.abs(b.view(dt).double().numpy()) / W for b in bodies)
        assert np.all(np.abs(f64(got) - ref) <= 4 * EPS32 * mag)


# ------------------------------------------------------------------------------------------------
# 6. non-finite input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=_cfg_id)
def test_non_finite_input_is_reported(cfg):
    codec = _codec(*cfg)
    numels = [5, 11, 1, 8]
    layout = Layout(numels)
    n = layout.numel
    base = ragged_data(numels, seed=8)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for pos in (0, 4, 5, 12, 16, n - 1):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                x = base.clone()
                x[pos] = bad
                x = x.to(dtype)
                # error_out is then unspecified (callers drop the residual of a non-finite step)
                err = torch.arange(n, dtype=torch.float32) * 0.5 - 3
                body, info = encode(codec, x, layout, key=pos, error_out=err)
                assert info.finite is False, (bad, pos, dtype)
                assert encode(codec, x, layout, key=pos)[1].finite is False
    # all values non-finite, and both infinities together
    for vals in ([float("inf")] * n, [float("nan")] * n, [float("-inf"), float("inf")] * (n // 2) + [1.0] * (n % 2)):
        x = torch.tensor(vals)
        err = torch.full((n,), 5.0)
        _, info = encode(codec, x, layout, error_out=err)
        assert info.finite is False


@pytest.mark.parametrize("name", ["fp16"])
def test_fp16_overflow_is_non_finite(name):
    """fp16 turns |x| > 65504 into inf: the payload must be reported non-finite (as documented)."""
    codec = make_codec(name)
    x = torch.tensor([1.0, 70000.0, -2.0])
    err = torch.zeros(3)
    _, info = encode(codec, x, error_out=err)
    assert info.finite is False  # (error_out is then unspecified)


# ------------------------------------------------------------------------------------------------
# 7. error_out and the error statistics
# ------------------------------------------------------------------------------------------------
ERR_CONFIGS = ([("uniform", b, bs) for b in (1, 4, 8) for bs in (None, 64)]
               + [("stochastic", b, bs) for b in (2, 8) for bs in (None, 64)]
               + [(n, 8, None) for n in CASTS])


@pytest.mark.parametrize("numels", [[5000], [1, 700, 33, 4266], [70000, 3]], ids=["flat", "ragged", "chunks"])
@pytest.mark.parametrize("cfg", ERR_CONFIGS, ids=_cfg_id)
def test_error_out_and_stats(cfg, numels):
    codec = _codec(*cfg)
    layout = Layout(numels)
    n = layout.numel
    x = ragged_data(numels, seed=len(numels))
    err = torch.full((n,), 1234.0)
    body, info = encode(codec, x, layout, key=17, error_out=err)
    out = decode(codec, [body], layout, n)
    assert info.finite
    xd, od, ed = f64(x), f64(out), f64(err)
    scale = float(np.abs(xd).max())
    delta = 1e-6 * scale
    assert np.all(np.abs(ed - (xd - od)) <= delta), f"error_out != x - decode: {np.max(np.abs(ed - (xd - od))):.3g}"
    ref_input_sq = float(np.sum(xd ** 2))
    np.testing.assert_allclose(info.input_sq, ref_input_sq, rtol=1e-5)
    ref_err_sq = float(np.sum(ed ** 2))
    np.testing.assert_allclose(info.error_sq, ref_err_sq, rtol=1e-5, atol=1e-30)
    direct = float(np.sum((xd - od) ** 2))
    assert abs(info.error_sq - direct) <= 1e-5 * direct + 2 * delta * float(np.sum(np.abs(xd - od))) + n * delta ** 2 + 1e-30
    # with an error buffer the body is the same as without
    assert torch.equal(encode(codec, x, layout, key=17)[0], body)


@pytest.mark.parametrize("cfg", [("uniform", 8, None), ("uniform", 8, 64), ("stochastic", 4, None), ("none", 8, None),
                                 ("bf16", 8, None)], ids=_cfg_id)
def test_input_sq_does_not_overflow(cfg):
    codec = _codec(*cfg)
    x = torch.tensor([1e20, -1e20, 3.0, 0.5])
    err = torch.zeros(4)
    _, info = encode(codec, x, error_out=err)
    assert info.finite
    assert math.isfinite(info.input_sq) and math.isclose(info.input_sq, float(np.sum(f64(x) ** 2)), rel_tol=1e-5)


# ------------------------------------------------------------------------------------------------
# 2b. large offset relative to the range (near-constant buckets)
# ------------------------------------------------------------------------------------------------
def _near_constant(off, span_ulps, count=33):
    u = float(np.spacing(np.float32(abs(off))))
    return torch.tensor(np.sign(off) * (abs(off) + np.arange(count) / (count - 1) * span_ulps * u), dtype=torch.float32)


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_near_constant_bucket_with_blocks(name, bits):
    """Offsets far larger than the range: the blocked path stays within half a step + fp32 round-off."""
    for off in (-1000.0, 1e4, -1e7, 1e7, 123.0):
        for span_ulps in (1, 3, 16, 64, 256, 1000):
            x = _near_constant(off, span_ulps)
            codec = make_codec(name, bits=bits, block_size=16)
            for key in range(3):
                body, _, out = round_trip(codec, x, key=key)
                check_quantized(codec, x, Layout.flat(x.numel()), body, out, stochastic=codec.stochastic)


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("bits", [1, 2, 8])
def test_large_offset_moderate_range(name, bits):
    """|x| up to ~1e3 x the range: still within the bound (one block and blocked)."""
    for block_size in (None, 100):
        x = (1000.0 + torch.linspace(0, 1, 1001, dtype=torch.float64)).float()
        codec = make_codec(name, bits=bits, block_size=block_size)
        body, _, out = round_trip(codec, x, key=1)
        check_quantized(codec, x, Layout.flat(x.numel()), body, out, stochastic=codec.stochastic)


@pytest.mark.parametrize("name,bits,off,span_ulps", [("uniform", 8, -1000.0, 256), ("uniform", 8, -100.0, 64),
                                                     ("uniform", 4, -1e7, 16), ("uniform", 8, 1e7, 64),
                                                     ("stochastic", 8, 1e7, 64), ("stochastic", 8, -1e7, 32)])
def test_near_constant_bucket_one_block(name, bits, off, span_ulps):
    # e.g. 33 values from -1000 to -1000 - 0.0156 (256 float32 ulps of 1000): the range is 6.4e4
    # times smaller than |x|, still 128 x the float32 resolution there, so the decode must be good
    # to ~1/100 of the range, but the value at lo decodes at hi (a wrapped code), error ~ the range.
    x = _near_constant(off, span_ulps)
    codec = make_codec(name, bits=bits)
    for key in range(5):
        body, _, out = round_trip(codec, x, key=key)
        check_quantized(codec, x, Layout.flat(x.numel()), body, out, stochastic=codec.stochastic)


# ------------------------------------------------------------------------------------------------
# 8. bad configuration
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("bits", [0, 9, -1, 2.5, True, False, "8", None])
def test_bad_bits(name, bits):
    with pytest.raises(ValueError, match=r"1\.\.8"):
        make_codec(name, bits=bits)


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("block_size", [0, -3, 2.5, True, "64"])
def test_bad_block_size(name, block_size):
    with pytest.raises(ValueError, match="block_size") as exc:
        make_codec(name, bits=4, block_size=block_size)
    assert "positive" in str(exc.value) and "None" in str(exc.value)


def test_unknown_codec_lists_choices():
    with pytest.raises(ValueError) as exc:
        make_codec("foo")
    msg = str(exc.value)
    assert "foo" in msg
    for name in CODECS:
        assert name in msg
    assert {"uniform", "stochastic", "none", "fp16", "bf16", "qsgd"} <= set(CODECS)


@pytest.mark.parametrize("name,valid", [("uniform", "block_size"), ("stochastic", "block_size"), ("none", "bits"),
                                        ("fp16", "bits"), ("bf16", "bits")])
def test_unknown_option_lists_choices(name, valid):
    with pytest.raises(ValueError) as exc:
        make_codec(name, bits=8, blocksize=64)
    assert "blocksize" in str(exc.value) and valid in str(exc.value) and "bits" in str(exc.value)
    if name not in QUANTIZERS:
        with pytest.raises(ValueError, match="block_size"):
            make_codec(name, block_size=64)


def test_valid_configs_accepted():
    for name in QUANTIZERS:
        for bits in range(1, 9):
            for bs in (None, 1, 7, 4096):
                c = make_codec(name, bits=bits, block_size=bs)
                assert c.bits == bits and c.block_size == bs and c.name == name
    for name in CASTS:
        assert make_codec(name).name == name


def test_layout_rejects_mismatched_keys():
    with pytest.raises(ValueError):
        Layout([3, 4], [1])


# ------------------------------------------------------------------------------------------------
# 9. body sizes
# ------------------------------------------------------------------------------------------------
SIZE_LAYOUTS = [[0], [1], [7], [8], [1000], [3, 0, 5], [64, 65, 1, 129], [100003, 17]]


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("bits", range(1, 9))
def test_quantizer_body_nbytes(name, bits):
    for numels in SIZE_LAYOUTS:
        layout = Layout(numels)
        n = sum(numels)
        for bs in (None, 1, 3, 64, 1000):
            nblocks = (1 if n else 0) if bs is None else sum(math.ceil(m / bs) for m in numels)
            assert make_codec(name, bits=bits, block_size=bs).body_nbytes(layout) == 8 * nblocks + math.ceil(n * bits / 8)


@pytest.mark.parametrize("name,per_value", [("fp16", 2), ("bf16", 2), ("none", 4)])
def test_cast_body_nbytes(name, per_value):
    for numels in SIZE_LAYOUTS:
        assert make_codec(name).body_nbytes(Layout(numels)) == per_value * sum(numels)


# ------------------------------------------------------------------------------------------------
# compile=True: the optional fused kernel must give the same codes as the eager path
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", QUANTIZERS)
def test_compiled_kernel_matches_eager(name):
    g = torch.Generator().manual_seed(11)
    for bits, with_error in ((8, True), (4, False), (3, True), (2, True), (1, False)):
        # one call, several dither periods plus a tail, and two full packing stripes plus a tail
        # (then plus a last stripe of whole periods, which the planar kernel packs too)
        for n in (1, 1001, (1 << 20) + 4099) + (((1 << 20) + (1 << 18),) if bits in (4, 2) else ()):
            x = torch.randn(n, generator=g) * 2 + 0.3
            layout = Layout.flat(n)
            # the compiled kernels serve one block per bucket
            eager, fused = make_codec(name, bits=bits, block_size=None), make_codec(name, bits=bits, compile=True,
                                                                                   block_size=None)
            bodies = []
            for codec in (eager, fused):
                body = torch.empty(codec.body_nbytes(layout), dtype=torch.uint8)
                err = torch.empty(n)
                info = codec.encode(x, body, layout, key=5, error_out=err if with_error else None)
                if not with_error:
                    err = x - decode(codec, [body], layout, n)
                else:  # the squared sums (the compiled residual kernel's in float64) match float64 here
                    e64 = (x.double() - decode(codec, [body], layout, n).double())
                    assert info.error_sq == pytest.approx(float((e64 * e64).sum()), rel=1e-4, abs=1e-12)
                    assert info.input_sq == pytest.approx(float((x.double() ** 2).sum()), rel=1e-5)
                bodies.append((body, err))
            out_e, out_f = torch.empty(n), torch.empty(n)
            eager.decode([bodies[0][0]], layout, out_e)
            eager.decode([bodies[1][0]], layout, out_f)
            # identical up to float ties (fused multiply-add vs two roundings)
            assert float((out_e != out_f).float().mean()) < 1e-4, (name, bits, n)
            assert torch.allclose(bodies[1][1], x - out_f, atol=1e-5)
    from ddp_qhooks.codecs import _fused
    if shutil.which("g++") or shutil.which("c++"):
        assert not _fused._broken, "a C++ compiler is present, yet the compiled kernel fell back to eager"


@pytest.mark.parametrize("name,options", [("sign", {}), ("sign", {"mode": "stochastic"}),
                                          ("ternary", {"rounding": "stochastic"}),
                                          ("ternary", {"rounding": "threshold"}), ("ternary", {"packing": "base3"})])
def test_compiled_block_scaled_codec_is_bitwise_the_eager_path(name, options):
    """sign and ternary with compile=True (one scale per bucket): the fused kernels write the same
    packed codes and residual, and decode to the same values, as the eager path (settings without a
    kernel fall back to it); the residual's squared sums agree with float64 sums computed here."""
    g = torch.Generator().manual_seed(12)
    stripe = 1 << 19
    for n in (1001, stripe, 2 * stripe + 4099, 2 * stripe + (1 << 18)):  # a tail of equal planes: compiled too
        x = torch.randn(n, generator=g)
        x[::7], x[::11] = 0.0, -0.0  # exact zeros of both signs
        layout = Layout.flat(n)
        eager, fused = (make_codec(name, block_size=None, **options),
                        make_codec(name, compile=True, block_size=None, **options))
        with_error = not getattr(eager, "error_feedback_diverges", False)
        out = []
        for codec in (eager, fused):
            body = torch.empty(codec.body_nbytes(layout), dtype=torch.uint8)
            other = torch.empty_like(body)
            err = torch.empty(n) if with_error else None
            info = codec.encode(x, body, layout, key=7, error_out=err)
            codec.encode(x * 3, other, layout, key=8)
            dec = torch.empty(n)
            codec.decode([body, other, body], layout, dec, divisor=3)
            out.append((body, err, info, dec))
        (b0, e0, i0, d0), (b1, e1, i1, d1) = out
        assert torch.equal(b0, b1) and torch.equal(d0, d1), (name, options, n)
        if with_error:
            assert torch.equal(e0, e1)
            want = float((e0.double() ** 2).sum()), float((x.double() ** 2).sum())
            fused_ran = n >= stripe and options.get("packing") != "base3" and options.get("rounding") != "threshold"
            rel = 1e-7 if fused_ran else 1e-4  # float64 sums in the kernel (the tail eager); float32 per piece eagerly
            assert (i1.error_sq, i1.input_sq) == pytest.approx(want, rel=rel)
            assert (i0.error_sq, i0.input_sq) == pytest.approx(want, rel=1e-4)
    assert make_codec(name, compile=True).config() == make_codec(name).config()  # a local speed choice
    for bad in ("yes", 1):
        with pytest.raises(ValueError, match="compile must be True or False"):
            make_codec(name, compile=bad)
    from ddp_qhooks.codecs import _fused
    if shutil.which("g++") or shutil.which("c++"):
        assert not _fused._broken


def test_compiled_qsgd_norm_is_one_float64_pass():
    """qsgd with compile=True: the one-block norm comes from float64 squares (within an ulp of the
    float64 norm computed here, never below max|v|), a non-finite input is flagged, a norm past the
    float32 range is capped; the codes then follow the eager quantizer on that grid."""
    stripe = 1 << 19
    g = torch.Generator().manual_seed(13)
    for scale in (1.0, 1e30, 1e-30):
        x = torch.randn(2 * stripe + 77, generator=g) * scale
        layout = Layout.flat(x.numel())
        codec = make_codec("qsgd", bits=4, compile=True)
        body = torch.empty(codec.body_nbytes(layout), dtype=torch.uint8)
        assert codec.encode(x, body, layout, key=1).finite
        lo, hi = body[:8].view(torch.float32).tolist()
        want = float(x.double().pow(2).sum().sqrt())
        assert lo == -hi and abs(hi - want) <= 2 * np.spacing(np.float32(want)) and hi >= float(x.abs().max())
        step = 2 * hi / codec.levels
        out = decode(codec, [body], layout, x.numel())
        assert float((out - x).abs().max()) <= step * (1 + 1e-5)
    big = torch.full((stripe,), 3e38)
    body = torch.empty(codec.body_nbytes(Layout.flat(stripe)), dtype=torch.uint8)
    assert codec.encode(big, body, Layout.flat(stripe)).finite
    assert body[4:8].view(torch.float32).item() == torch.finfo(torch.float32).max
    big[9] = float("nan")
    assert not codec.encode(big, body, Layout.flat(stripe)).finite


@pytest.mark.parametrize("name", ["log", "mulaw"])
def test_compiled_table_codec_matches_eager(name):
    """log and mulaw with compile=True (one block per bucket): the compiled pass writes the same codes
    as the eager one (log bitwise; mulaw's compiled log1p may differ from the eager one in the last
    bit, which can move a value sitting on a level boundary), and log's compiled decoder gives the
    same values as the table lookup.  Stochastic rounding of a one-block bucket uses the same dither
    either way."""
    g = torch.Generator().manual_seed(14)
    for bits in (8, 3, 2):  # byte-wide, packed after the kernel, packed inside it (planar)
        for rounding in ("nearest", "stochastic"):
            # (2 bits: two packing stripes and a tail; two stripes and a last one of whole periods)
            for n in (1001, 3 * 65536 + 1001) + ((2 * (1 << 19) + 4099, 2 * (1 << 19) + (1 << 18)) if bits == 2 else ()):
                x = torch.randn(n, generator=g) ** 3
                x[::9] = 0.0
                layout = Layout.flat(n)
                out = []
                for compiled in (False, True):
                    codec = make_codec(name, bits=bits, rounding=rounding, compile=compiled)
                    body, other = (torch.empty(codec.body_nbytes(layout), dtype=torch.uint8) for _ in range(2))
                    err = torch.empty(n)
                    info = codec.encode(x, body, layout, key=3, error_out=err)
                    codec.encode(x * 2, other, layout, key=4)
                    dec = torch.empty(n)
                    codec.decode([body, other], layout, dec, divisor=2)
                    out.append((codec, body, other, err, info, dec))
                (c0, b0, o0, e0, i0, d0), (c1, b1, o1, e1, i1, d1) = out
                if name == "log":
                    assert torch.equal(b0, b1) and torch.equal(o0, o1), (bits, rounding, n)
                    assert torch.equal(e0, e1) and torch.equal(d0, d1)
                else:
                    differ = float((b0 != b1).float().mean())
                    assert differ < 1e-3, (bits, rounding, n, differ)
                    assert torch.equal(e1, x - decode(c0, [b1], layout, n))
                assert i1.error_sq == pytest.approx(i0.error_sq, rel=1e-3)
                # the compiled decoder of the compiled bodies equals the eager decoder of them
                assert torch.equal(d1, decode(c0, [b1, o1], layout, n, divisor=2))
    assert make_codec(name, compile=True).config() == make_codec(name).config()
    with pytest.raises(ValueError, match="compile must be True or False"):
        make_codec(name, compile="yes")
    from ddp_qhooks.codecs import _fused
    if shutil.which("g++") or shutil.which("c++"):
        assert not _fused._broken


@pytest.mark.parametrize("mu,bits", [(255.0, 8), (1e-3, 8), (1e30, 8), (255.0, 4), (255.0, 2)])
def test_compiled_mulaw_compander_against_float64(mu, bits):
    """mulaw's compiled encoder computes ln(1 + mu*r) itself (8 bits: a polynomial, not log1p; up to
    4 bits: a search of float64 level boundaries): its nearest codes equal the float64 compander's,
    except for values within 2e-5 of a code unit of a rounding boundary, and then by one code; the
    block max keeps its code exactly."""
    n, K = 3 * (1 << 19) + 77, (1 << (bits - 1)) - 1
    x = torch.randn(n, generator=torch.Generator().manual_seed(15)) ** 3
    x[::7] *= 1e-4   # small r: where rounding 1 + mu*r loses the most (compensated for small mu)
    layout = Layout.flat(n)
    codec = make_codec("mulaw", bits=bits, mu=mu, rounding="nearest", compile=True, block_size=None)
    codes = torch.from_numpy(ref_unpack(encode(codec, x, layout)[0][4:].numpy(), bits, n)).to(torch.int64)
    m = x.abs().max().double()
    t = torch.log1p((x.double().abs() / m) * mu) * (K / math.log1p(mu))
    q = torch.floor(t + 0.5)
    want = torch.where(x < 0, K - q, K + q).to(torch.int64)
    differ = codes != want
    assert float(differ.double().mean()) < 1e-4
    assert bool(((codes - want).abs() <= 1).all())
    assert bool(((t - t.floor() - 0.5).abs()[differ] < 2e-5).all())
    i = int(x.abs().argmax())
    assert int(codes[i]) == (2 * K if x[i] > 0 else 0)


def test_compiled_adaptive_matches_eager():
    """adaptive with compile=True writes bitwise the eager codes (same float32 steps in the same
    order): for parameters longer than the dither pool (whole dither windows broadcast over rows,
    then a tail), runs of small blocks several to a pass, empty parameters, one block per bucket,
    long blocks starting inside a dither period, both grids; and for ranges that need float64 (the
    eager path then)."""
    pool = 1 << 20
    numels = [2 * pool + 12345, 0, 777, 777, 3, pool, 5000]
    g = torch.Generator().manual_seed(16)
    x = torch.randn(sum(numels), generator=g)
    x[:100] *= 50.0
    layout = Layout(numels, [7, 8, 9, 10, 11, 12, 13])
    # (each distinct level count and piece shape is a compile: few of them keep a cold CI cache cheap)
    for block_size, grid, bits in (("layer", "stochastic", 8), ("layer", "uniform", 8), (4096, "stochastic", 8),
                                   (None, "stochastic", 4), (pool + 1000, "stochastic", 8)):
        bodies = []
        for compiled in (False, True):
            codec = make_codec("adaptive", bits=bits, block_size=block_size, grid=grid, compile=compiled)
            body = new_body(codec, layout)
            codec.encode(x, body, layout, key=5)
            codec.encode(x * 0.5, body, layout, key=6)   # on the running ranges of the first step
            bodies.append(body)
        assert torch.equal(bodies[0], bodies[1]), (block_size, grid, bits)
        if block_size != "layer":   # (the residual's kernel forms: windows, tails, short blocks, no dither)
            continue
        # with error feedback the compiled passes form the residual from the codes again: x minus the
        # decoded value lo + code * step, which the decoder rounds once (add with alpha) and the kernel
        # twice: equal up to an ulp of the range (a wrong code or step would be off by a step)
        infos, errs = [], []
        for compiled in (False, True):
            codec = make_codec("adaptive", bits=bits, block_size=block_size, grid=grid, compile=compiled)
            body, err = new_body(codec, layout), torch.empty_like(x)
            infos.append(codec.encode(x, body, layout, key=5, error_out=err))
            errs.append(err)
        ulp = torch.finfo(torch.float32).eps * 2 * float(x.abs().max())
        assert float((errs[1] - errs[0]).abs().max()) <= ulp, (block_size, grid, bits)
        assert infos[1].error_sq == pytest.approx(infos[0].error_sq, rel=1e-5)
        assert infos[1].input_sq == pytest.approx(infos[0].input_sq, rel=1e-9)
    # the bucket's last, shorter packing stripe, packed by the kernel when its planes are whole
    # windows: after whole stripes, and in a parameter of whole periods that starts mid-stripe
    for numels in ([2 * REF_STRIPE + 2 * 65536], [65536, REF_STRIPE + 3 * 65536]):
        y = torch.randn(sum(numels), generator=g)
        layout = Layout(numels, list(range(len(numels))))
        bodies = []
        for compiled in (False, True):
            codec = make_codec("adaptive", bits=4, compile=compiled)
            bodies.append(new_body(codec, layout))
            codec.encode(y, bodies[-1], layout, key=5)
        assert torch.equal(bodies[0], bodies[1]), numels
    from ddp_qhooks.codecs import _fused
    if shutil.which("g++") or shutil.which("c++"):  # the compiled pass ran (not an eager fallback)
        from ddp_qhooks.codecs._adaptive_compiled import _code_fn
        # window rows four to a loop (8 bits), and 4-bit stripes packed by the kernel (whole
        # stripes, or a last shorter one, alone or both in one call)
        assert not _fused._broken and ("table-rows", _code_fn(255), False) in _fused._kernels
        assert all(("table-planar", _code_fn(15), 4, False, parts) in _fused._kernels for parts in (1, 2))
    huge = torch.full((pool + 5,), 3e38)
    huge[::3] = -3e38
    for compiled in (False, True):
        codec = make_codec("adaptive", bits=8, compile=compiled)
        bodies.append(encode(codec, huge)[0])
    assert torch.equal(bodies[-2], bodies[-1])
    assert make_codec("adaptive", compile=True).config() == make_codec("adaptive").config()
    with pytest.raises(ValueError, match="compile must be True or False"):
        make_codec("adaptive", compile=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_finite_flag_matches_isfinite(dtype):
    from ddp_qhooks.codecs.base import finite_flag
    g = torch.Generator().manual_seed(5)
    for bad in (None, float("nan"), float("inf"), float("-inf")):
        x = (torch.randn(1001, generator=g) * 100).to(dtype)
        if bad is not None:
            x[int(torch.randint(0, 1001, (1,), generator=g))] = bad
        flag = finite_flag(x)
        assert flag.dtype == torch.bool and flag.dim() == 0
        assert bool(flag) == bool(torch.isfinite(x).all()) == (bad is None)
    assert bool(finite_flag(torch.empty(0, dtype=dtype)))
