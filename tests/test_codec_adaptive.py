"""Tests for the ``adaptive`` codec (ddp_qhooks/codecs/adaptive.py).

The reference decoder :func:`ref_decode_adaptive` is written from the documented body layout only
(float32 (lo, hi) per block, then codes packed as documented in packing.py), in numpy float64; it
calls neither the codec nor packing.py.  The running statistics (moving averages, decaying
bounds, nearest-rank percentiles of the strided subsample) are recomputed here independently.
"""
from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pytest
import torch
from _reference import decode, encode, f64, ragged_data, ref_block_lengths, ref_unpack

from ddp_qhooks.codecs.adaptive import AdaptiveCodec
from ddp_qhooks.codecs.base import Layout

EPS32 = 2.0 ** -23
TINY32 = 2.0 ** -149


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------
# independent reference
# ------------------------------------------------------------------------------------------------


def ref_parts(body, param_numels, bits, block_size="layer", **_):
    """((blocks, 2) float64 ranges, codes, block lengths) from the documented layout."""
    body = np.asarray(body, dtype=np.uint8)
    lengths = ref_block_lengths(param_numels, block_size)
    nb, n = len(lengths), sum(param_numels)
    assert body.size == 8 * nb + math.ceil(n * bits / 8)
    ranges = np.frombuffer(body[: 8 * nb].tobytes(), dtype="<f4").astype(np.float64).reshape(nb, 2)
    return ranges, ref_unpack(body[8 * nb:], bits, n), lengths


def ref_decode_adaptive(body: np.ndarray, param_numels: list[int], **config) -> np.ndarray:
    """float64 decode of one body: code c of block j decodes to lo_j + c * (hi_j - lo_j) / L."""
    ranges, codes, lengths = ref_parts(body, param_numels, **config)
    L = (1 << config["bits"]) - 1
    lo, hi = np.repeat(ranges[:, 0], lengths), np.repeat(ranges[:, 1], lengths)
    return lo + codes * ((hi - lo) / L)


def ref_observe(x: np.ndarray, lengths, stat, percentile=99.9, sample=65536, **_):
    """Per-block observation: (min, max), or the nearest-rank percentile of |x| on the strided
    subsample (the exact max|x| for percentile 100)."""
    out, start = [], 0
    for blen in lengths:
        v = x[start:start + blen]
        start += blen
        if stat == "minmax":
            out.append([v.min(), v.max()])
            continue
        if percentile == 100:
            out.append([np.abs(v).max()])
            continue
        S = min(sample, blen)
        sub = np.abs(v[(np.arange(S) * blen) // S])
        k = max(1, math.ceil(percentile * S / 100))
        out.append([np.sort(sub)[min(k, S) - 1]])
    return np.array(out, dtype=np.float64)


def ref_running(observations, stat, momentum=0.9, decay=None, **_):
    """Running statistics after each step, from a list of per-step observations."""
    r, out = None, []
    for obs in observations:
        if r is None:
            r = obs.copy()
        elif decay is None:
            r = momentum * r + (1 - momentum) * obs
        elif stat == "minmax":
            r = np.stack([np.minimum(obs[:, 0], decay * r[:, 0]), np.maximum(obs[:, 1], decay * r[:, 1])], 1)
        else:
            r = np.maximum(obs, decay * r)
        out.append(r.copy())
    return out


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def check_body(codec, x, layout, body, out=None):
    """Size, reference decode, decoded values on the payload grid, rounding within the range."""
    cfg = codec.config()
    L = (1 << codec.bits) - 1
    ranges, codes, lengths = ref_parts(body.numpy(), layout.param_numels, **cfg)
    assert body.numel() == codec.body_nbytes(layout) == 8 * len(lengths) + math.ceil(layout.numel * codec.bits / 8)
    assert np.all(ranges[:, 0] <= ranges[:, 1])
    assert codes.min(initial=0) >= 0 and codes.max(initial=0) <= L
    ref = ref_decode_adaptive(body.numpy(), list(layout.param_numels), **cfg)
    if out is None:
        out = decode(codec, [body], layout)
    lo, hi = np.repeat(ranges[:, 0], lengths), np.repeat(ranges[:, 1], lengths)
    mag = np.maximum(np.abs(lo), np.abs(hi))
    roundoff = 4 * EPS32 * mag + 2 * TINY32
    np.testing.assert_array_less(np.abs(f64(out) - ref), roundoff + 1e-300)   # on the grid lo + c * step
    step = (hi - lo) / L
    xd = f64(x.float())
    clipped = np.clip(xd, lo, hi)
    half = 1.0 if codec.stochastic else 0.5
    assert np.all(np.abs(clipped - ref) <= half * step * (1 + 1e-5) + roundoff)
    const = step == 0
    np.testing.assert_array_equal(f64(out)[const], lo[const])
    return ranges, codes, lengths


def state_equal(a: dict, b: dict) -> bool:
    if a["codec"] != b["codec"] or len(a["entries"]) != len(b["entries"]):
        return False
    for ea, eb in zip(a["entries"], b["entries"]):
        if set(ea) != set(eb):
            return False
        for k in ea:
            if isinstance(ea[k], torch.Tensor):
                if not torch.equal(ea[k], eb[k]):
                    return False
            elif ea[k] != eb[k]:
                return False
    return True


# ------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", ["uniform", "stochastic"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
def test_round_trip_odd_sizes(bits, grid):
    g = torch.Generator().manual_seed(bits)
    for n in (0, 1, 7, 1001, 100003):
        if n == 100003 and bits not in (1, 3, 8):
            continue
        layout = Layout.flat(n)
        x = torch.randn(n, generator=g) * 3 + 1
        for stat in ("minmax", "percentile"):
            codec = AdaptiveCodec(bits=bits, grid=grid, stat=stat)
            err = torch.full((n,), 7.0)
            body, info = encode(codec, x, layout, key=n, error_out=err)
            assert info.finite
            out = decode(codec, [body], layout)
            ranges, _, lengths = check_body(codec, x, layout, body, out)
            if n and stat == "minmax":   # the first step uses the observed range exactly
                np.testing.assert_array_equal(ranges, ref_observe(f64(x), lengths, "minmax"))
            assert torch.equal(err, x - out)
            np.testing.assert_allclose(info.error_sq, np.sum(f64(err) ** 2), rtol=1e-9, atol=1e-30)
            np.testing.assert_allclose(info.input_sq, np.sum(f64(x) ** 2), rtol=1e-9)


@pytest.mark.parametrize("stat", ["minmax", "percentile"])
@pytest.mark.parametrize("block_size", [None, "layer", 1, 3, 64])
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_ragged_layouts(bits, block_size, stat):
    numels = [1, 0, 5, 64, 65, 130, 7, 1003, 2]
    keys = [10 + 3 * i for i in range(len(numels))]
    layout = Layout(numels, keys)
    codec = AdaptiveCodec(bits=bits, block_size=block_size, stat=stat, percentile=90, grid="uniform")
    for step in range(2):
        x = ragged_data(numels, seed=bits + step) * (1 + step)
        body, info = encode(codec, x, layout, key=step)
        assert info.finite
        _, _, lengths = check_body(codec, x, layout, body)
        assert len(lengths) == len(layout.block_lengths(block_size))
    if block_size is not None:
        # blocks never straddle parameters: each parameter decodes as if it were alone
        out = decode(codec, [body], layout)
        off = 0
        for n, k in zip(numels, keys):
            alone = Layout([n], [k])
            c2 = AdaptiveCodec(bits=bits, block_size=block_size, stat=stat, percentile=90, grid="uniform")
            for step in range(2):
                xs = ragged_data(numels, seed=bits + step)[off:off + n] * (1 + step)
                b2, _ = encode(c2, xs, alone, key=step)
            assert torch.equal(decode(c2, [b2], alone), out[off:off + n])
            off += n


@pytest.mark.parametrize("grid", ["uniform", "stochastic"])
@pytest.mark.parametrize("block_size", [None, "layer", 4])
@pytest.mark.parametrize("stat", ["minmax", "percentile"])
def test_constant_zero_huge_tiny(stat, block_size, grid):
    g = torch.Generator().manual_seed(5)
    parts = [torch.zeros(12), torch.full((8,), 5.0), torch.randn(50, generator=g) * 1e30,
             torch.randn(50, generator=g) * 1e-30,
             torch.tensor([3.4e38, -3.4e38, 1e38, -2e38, 3.0e38, 0.0, 1.0, -3.3e38, 3.4028235e38]),
             torch.full((4,), -2.5)]
    numels = [p.numel() for p in parts]
    layout = Layout(numels)
    x = torch.cat(parts)
    codec = AdaptiveCodec(bits=4, block_size=block_size, stat=stat, percentile=100, grid=grid)
    for step in range(2):
        body, info = encode(codec, x, layout, key=step, error_out=torch.empty_like(x))
        assert info.finite and math.isfinite(info.error_sq) and math.isfinite(info.input_sq)
        out = decode(codec, [body], layout)
        assert bool(torch.isfinite(out).all())
        check_body(codec, x, layout, body, out)
        mean = decode(codec, [body] * 3, layout, divisor=3)
        assert bool(torch.isfinite(mean).all())
        np.testing.assert_allclose(f64(mean), f64(out), rtol=8 * EPS32, atol=1e-44)
        if block_size is not None:
            assert torch.equal(out[:12], x[:12])   # zero blocks
        if block_size is not None and stat == "minmax":
            assert torch.equal(out[12:20], x[12:20]) and torch.equal(out[-4:], x[-4:])   # constant blocks
        if block_size == "layer":
            # scale invariance: tiny and huge blocks are as good as unit-scale ones (4 bits)
            for sl in (slice(20, 70), slice(70, 120)):
                xs, os_ = f64(x[sl]), f64(out[sl])
                assert np.sum((xs - os_) ** 2) / np.sum(xs ** 2) < 0.05


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_and_outputs(dtype):
    numels = [300, 1, 2000]
    layout = Layout(numels)
    x = ragged_data(numels, seed=9, dtype=dtype)
    for block_size in (None, "layer", 64):
        for stat in ("minmax", "percentile"):
            codec = AdaptiveCodec(bits=4, block_size=block_size, stat=stat)
            err = torch.empty(layout.numel)
            body, info = encode(codec, x, layout, key=3, error_out=err)
            ref_body, _ = encode(AdaptiveCodec(bits=4, block_size=block_size, stat=stat), x.float(), layout, key=3)
            assert torch.equal(body, ref_body)   # computed in float32 from the widened input
            out32 = decode(codec, [body], layout)
            check_body(codec, x, layout, body, out32)
            assert torch.equal(err, x.float() - out32)
            out_h = decode(codec, [body], layout, dtype=dtype)
            assert out_h.dtype == dtype and torch.equal(out_h, out32.to(dtype))


# ------------------------------------------------------------------------------------------------
# running statistics
# ------------------------------------------------------------------------------------------------
STAT_CASES = [
    dict(stat="minmax", momentum=0.9),
    dict(stat="minmax", momentum=0.0),
    dict(stat="minmax", momentum=0.5, decay=0.8),
    dict(stat="percentile", percentile=99.0, momentum=0.75),
    dict(stat="percentile", percentile=100, momentum=0.9),
    dict(stat="percentile", percentile=37.5, decay=0.6),
    dict(stat="percentile", percentile=0.01, momentum=0.3, sample=100),
]


@pytest.mark.parametrize("case", range(len(STAT_CASES)))
@pytest.mark.parametrize("block_size", [None, "layer", 300])
def test_running_statistics_against_reference(case, block_size):
    opts = dict(sample=500, **STAT_CASES[case]) if "sample" not in STAT_CASES[case] else dict(STAT_CASES[case])
    numels = [1000, 7, 2345]        # blocks longer than the percentile sample, and shorter ones
    layout = Layout(numels, [3, 1, 2])
    codec = AdaptiveCodec(bits=3, block_size=block_size, grid="uniform", **opts)
    lengths = ref_block_lengths(numels, block_size)
    rng = np.random.default_rng(case)
    xs = [(rng.standard_normal(sum(numels)) * s + o).astype(np.float32)
          for s, o in [(1, 0), (3, 0.5), (0.5, -1), (2, 2), (0.1, 0), (5, -3)]]
    want = ref_running([ref_observe(x.astype(np.float64), lengths, **opts) for x in xs], **opts)
    for step, x in enumerate(xs):
        body, _ = encode(codec, torch.from_numpy(x), layout, key=step)
        ranges, _, _ = check_body(codec, torch.from_numpy(x), layout, body)
        r = want[step]
        expect = r if opts["stat"] == "minmax" else np.concatenate([-r, r], 1)
        np.testing.assert_allclose(ranges, expect.astype(np.float32).astype(np.float64), rtol=2 * EPS32, atol=0)
    # the float64 state itself follows the reference arithmetic
    rows = torch.cat([e["bounds"] for e in sorted(codec.state_dict()["entries"], key=_entry_order(layout))]).numpy()
    np.testing.assert_allclose(rows, want[-1], rtol=1e-12, atol=0)


def _entry_order(layout):
    order = {k: i for i, k in enumerate(layout.param_keys)}
    return lambda e: order[e["param_key"]] if e["scope"] == "param" else 0


def test_decay_widens_at_once_and_shrinks_geometrically():
    layout = Layout([4])
    codec = AdaptiveCodec(bits=8, stat="minmax", decay=0.5, grid="uniform")
    seq = [[-1, 0, 0, 1], [-0.1, 0, 0, 0.1], [-0.1, 0, 0, 0.1], [-4, 0, 0, 0.1], [-0.1, 0, 0, 0.1]]
    his, los = [1, 0.5, 0.25, 0.125, 0.1], [-1, -0.5, -0.25, -4, -2]
    for x, lo, hi in zip(seq, los, his):
        body, _ = encode(codec, torch.tensor(x, dtype=torch.float32), layout)
        ranges, _, _ = ref_parts(body.numpy(), [4], 8)
        np.testing.assert_allclose(ranges[0], np.float32([lo, hi]), rtol=EPS32)


@pytest.mark.parametrize("grid", ["uniform", "stochastic"])
def test_clipping_is_carried_by_the_residual(grid):
    layout = Layout([2000, 1000], [0, 1])
    rng = np.random.default_rng(7)
    codec = AdaptiveCodec(bits=4, stat="minmax", momentum=0.9, grid=grid)
    L = 15
    x0 = torch.from_numpy(rng.uniform(-1, 1, 3000).astype(np.float32))
    encode(codec, x0, layout)
    x1 = torch.from_numpy(rng.uniform(-3, 3, 3000).astype(np.float32))
    err = torch.empty(3000)
    body, info = encode(codec, x1, layout, key=1, error_out=err)
    ranges, codes, lengths = check_body(codec, x1, layout, body)
    out = decode(codec, [body], layout)
    assert torch.equal(err, x1 - out)
    lo, hi = np.repeat(ranges[:, 0], lengths), np.repeat(ranges[:, 1], lengths)
    step = (hi - lo) / L
    xd = f64(x1)
    below, above = xd < lo, xd > hi
    assert below.sum() > 100 and above.sum() > 100, "the moving average lags: values must be clipped"
    assert np.all(codes[below] == 0) and np.all(codes[above] == L)
    e = f64(err)
    clipped_part = xd - np.clip(xd, lo, hi)
    rounding = e - clipped_part
    # the residual is the clipped part plus the rounding of the clipped value
    roundoff = 8 * EPS32 * np.maximum(np.abs(lo), np.abs(hi))
    assert np.all(np.abs(rounding[below | above]) <= roundoff[below | above])
    half = 1.0 if grid == "stochastic" else 0.5
    assert np.all(np.abs(rounding) <= half * step * (1 + 1e-5) + roundoff)
    np.testing.assert_allclose(info.error_sq, np.sum(e ** 2), rtol=1e-9)


@pytest.mark.parametrize("bits, block_size", [(1, None), (2, "layer"), (5, 16), (8, "layer")])
def test_stochastic_grid_unbiased_within_range(bits, block_size):
    L = (1 << bits) - 1
    # 4 parameters of 16 values; every parameter holds 0 and L*step, so all ranges are [0, L*step]
    step = 0.25
    fracs = np.array([0.0, 0.5, 0.25, 0.75, 0.1, 0.9, 0.01, 0.99, 1 / 3, 0.6, 0.05, 0.95, 0.0, 0.4])
    vals = []
    for p in range(4):
        k = (np.arange(14) + p) % max(L, 1)
        vals += [0.0, L * step] + list(np.minimum((k + fracs) * step, L * step))
    x = torch.tensor(vals, dtype=torch.float32)
    layout = Layout([16] * 4)
    codec = AdaptiveCodec(bits=bits, block_size=block_size, stat="minmax", momentum=0.9)
    K = 1000
    keys = np.random.default_rng(1234 + bits).integers(0, 2 ** 62, size=K).tolist()
    dec = np.empty((K, x.numel()))
    for r, key in enumerate(keys):
        body, _ = encode(codec, x, layout, key=key)
        dec[r] = f64(decode(codec, [body], layout))
    xd = f64(x)
    # each decode is one of the two neighbouring levels; the mean converges to x
    lower = np.floor(xd / step + 1e-9) * step
    assert np.all((np.abs(dec - lower) < 1e-6) | (np.abs(dec - lower - step) < 1e-6))
    f = xd / step - np.floor(xd / step + 1e-9)
    sd = step * np.sqrt(f * (1 - f) / K)
    assert np.all(np.abs(dec.mean(0) - xd) <= 5 * sd + 1e-6 * step)
    # and keys matter: not every key gives the same body
    assert len({bytes(encode(codec, x, layout, key=k)[0].numpy()) for k in range(5)}) > 1


# ------------------------------------------------------------------------------------------------
# state, robustness, options
# ------------------------------------------------------------------------------------------------
def test_state_survives_bucket_rebuild():
    a, b = torch.randn(500) * 2, torch.rand(700)
    codec = AdaptiveCodec(bits=4, stat="minmax", momentum=0.5, grid="uniform")
    encode(codec, torch.cat([a, b]), Layout([500, 700], [7, 9]))
    # DDP rebuilt its buckets: parameter 9 now sits alone and keeps its running range
    b2 = torch.rand(700) * 3 - 1
    body, _ = encode(codec, b2, Layout([700], [9]))
    ranges, _, _ = ref_parts(body.numpy(), [700], 4)
    want = 0.5 * np.array([f64(b).min(), f64(b).max()]) + 0.5 * np.array([f64(b2).min(), f64(b2).max()])
    np.testing.assert_allclose(ranges[0], want.astype(np.float32), rtol=EPS32)


def test_state_dict_round_trip_and_pickle():
    layout = Layout([300, 0, 1200, 5], [1, 2, 3, 4])
    rng = np.random.default_rng(11)
    data = [torch.from_numpy((rng.standard_normal(1505) * (1 + s)).astype(np.float32)) for s in range(6)]
    for opts in (dict(block_size=None), dict(block_size="layer", stat="percentile", sample=100),
                 dict(block_size=256, decay=0.7)):
        codec = AdaptiveCodec(bits=3, **opts)
        for s, x in enumerate(data[:2]):
            encode(codec, x, layout, key=s)
        buf = io.BytesIO()
        torch.save(codec.state_dict(), buf)
        buf.seek(0)
        restored = AdaptiveCodec(bits=3, **opts)
        restored.load_state_dict(torch.load(buf, weights_only=True))
        assert state_equal(restored.state_dict(), codec.state_dict())
        pickled = pickle.loads(pickle.dumps(codec))
        for s, x in enumerate(data[2:]):
            b1, _ = encode(codec, x, layout, key=s)
            b2, _ = encode(restored, x, layout, key=s)
            b3, _ = encode(pickled, x, layout, key=s)
            assert torch.equal(b1, b2) and torch.equal(b1, b3)
    with pytest.raises(ValueError, match="stat"):
        AdaptiveCodec(stat="percentile").load_state_dict(AdaptiveCodec().state_dict())
    with pytest.raises(ValueError, match="block_size"):
        AdaptiveCodec(block_size=None).load_state_dict(AdaptiveCodec().state_dict())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("stat", ["minmax", "percentile"])
def test_nonfinite_input_keeps_state(bad, stat):
    layout = Layout([1000, 50])
    rng = np.random.default_rng(4)
    data = [torch.from_numpy(rng.standard_normal(1050).astype(np.float32)) * (s + 1) for s in range(3)]
    for block_size in (None, "layer", 16):
        codec = AdaptiveCodec(bits=2, block_size=block_size, stat=stat, sample=64)
        clean = AdaptiveCodec(bits=2, block_size=block_size, stat=stat, sample=64)
        for c in (codec, clean):
            encode(c, data[0], layout)
        before = codec.state_dict()
        x = data[1].clone()
        x[501] = bad   # not in the percentile subsample (every 15.6th value): still detected
        for dtype in (torch.float32, torch.bfloat16):
            err = torch.full((1050,), 3.0)
            _, info = encode(codec, x.to(dtype), layout, error_out=err)
            assert not info.finite
            assert bool((err == 3.0).all())
        assert state_equal(before, codec.state_dict())
        for s, x in enumerate(data[1:]):
            assert torch.equal(encode(codec, x, layout, key=s)[0], encode(clean, x, layout, key=s)[0])


def test_several_bodies_divisor_unaligned_and_empty():
    numels = [33, 1000, 4]
    layout = Layout(numels)
    for block_size in (None, "layer", 10):
        bodies, refs = [], []
        for r in range(3):
            codec = AdaptiveCodec(bits=5, block_size=block_size)
            x = ragged_data(numels, seed=50 + r) * (r + 1)
            body, _ = encode(codec, x, layout, key=r)
            big = torch.zeros(body.numel() + 5, dtype=torch.uint8)
            big[3:3 + body.numel()] = body
            bodies.append(big[3:3 + body.numel()])   # received bodies sit at any byte offset
            refs.append(ref_decode_adaptive(body.numpy(), numels, **codec.config()))
        for divisor in (1, 3, 7):
            for dtype in (torch.float32, torch.bfloat16):
                out = decode(codec, bodies, layout, divisor=divisor, dtype=dtype)
                want = sum(refs) / divisor
                rtol = 2.0 ** -8 if dtype == torch.bfloat16 else 8 * EPS32
                np.testing.assert_allclose(f64(out), want, rtol=rtol, atol=rtol * np.max(np.abs(want)))
        assert bool((decode(codec, [], layout) == 0).all())
    empty = Layout([0, 0])
    codec = AdaptiveCodec(bits=3)
    assert codec.body_nbytes(empty) == 0
    body, info = encode(codec, torch.zeros(0), empty, error_out=torch.zeros(0))
    assert info.finite and info.error_sq == 0.0
    assert decode(codec, [body], empty).numel() == 0


@pytest.mark.parametrize("kwargs, pattern", [
    ({"bits": 0}, r"bits .*1\.\.8"),
    ({"bits": 9}, r"bits .*1\.\.8"),
    ({"bits": 4.0}, r"bits .*1\.\.8"),
    ({"block_size": -3}, r"block_size .*'layer'"),
    ({"stat": "max"}, r"stat .*'minmax', 'percentile'"),
    ({"stat": None}, r"stat .*'minmax', 'percentile'"),
    ({"grid": "nearest"}, r"grid .*'stochastic', 'uniform'"),
    ({"percentile": 0}, r"percentile .*\(0, 100\]"),
    ({"percentile": 100.5}, r"percentile .*\(0, 100\]"),
    ({"percentile": float("nan")}, r"percentile .*\(0, 100\]"),
    ({"percentile": "99"}, r"percentile .*\(0, 100\]"),
    ({"momentum": 1.0}, r"momentum .*\[0, 1\)"),
    ({"momentum": -0.1}, r"momentum .*\[0, 1\)"),
    ({"momentum": True}, r"momentum .*\[0, 1\)"),
    ({"decay": 1.0}, r"decay .*None .*\(0, 1\)"),
    ({"decay": 0}, r"decay .*None .*\(0, 1\)"),
    ({"sample": 0}, r"sample .*positive integer"),
])
def test_bad_options(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        AdaptiveCodec(**kwargs)


def test_metadata_and_config():
    assert (AdaptiveCodec.name, AdaptiveCodec.codec_id) == ("adaptive", 12)
    assert AdaptiveCodec.needs_error_feedback is True
    assert AdaptiveCodec.body_formula and AdaptiveCodec.summary and "\n" not in AdaptiveCodec.summary
    assert AdaptiveCodec().stochastic and not AdaptiveCodec(grid="uniform").stochastic
    codec = AdaptiveCodec(bits=np.int64(6), block_size=np.int32(128), stat="percentile", percentile=np.float32(99.5),
                          momentum=0, decay=0.9, grid="uniform", sample=1000)
    assert codec.config() == {"codec": "adaptive", "bits": 6, "block_size": 128, "stat": "percentile",
                              "percentile": 99.5, "momentum": 0.0, "decay": 0.9, "grid": "uniform", "sample": 1000}
    assert repr(codec).startswith("AdaptiveCodec(bits=6")
    layout = Layout([100, 300, 5])
    assert codec.body_nbytes(layout) == 8 * 5 + math.ceil(405 * 6 / 8)
    assert AdaptiveCodec(bits=3).body_nbytes(layout) == 8 * 3 + math.ceil(405 * 3 / 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    numels = [5000, 1, 300, 70000]
    layout = Layout(numels)
    x = ragged_data(numels, seed=21)
    for block_size in (None, "layer", 1000):
        for stat, grid in (("minmax", "stochastic"), ("percentile", "uniform")):
            gpu = AdaptiveCodec(bits=3, block_size=block_size, stat=stat, grid=grid, sample=4096)
            cpu = AdaptiveCodec(bits=3, block_size=block_size, stat=stat, grid=grid, sample=4096)
            for step in range(3):
                xs = x * (1 + step)
                body = torch.zeros(gpu.body_nbytes(layout), dtype=torch.uint8, device="cuda")
                err = torch.empty(layout.numel, device="cuda")
                assert gpu.encode(xs.cuda(), body, layout, key=step, error_out=err).finite
                out = torch.empty(layout.numel, device="cuda")
                gpu.decode([body, body], layout, out, divisor=2)
                b_cpu, _ = encode(cpu, xs, layout, key=step)
                check_body(cpu, xs, layout, body.cpu(), out.cpu())
                assert torch.equal(err.cpu(), xs - out.cpu())
                # same statistics and dither: the same ranges, codes equal but for rounding ties
                assert torch.equal(body.cpu()[:8 * len(layout.block_lengths(block_size))],
                                   b_cpu[:8 * len(layout.block_lengths(block_size))])
                np.testing.assert_allclose(f64(out.cpu()), f64(decode(cpu, [b_cpu], layout)),
                                           atol=2 * float(x.abs().max()) * (1 + step) / 7 + 1e-6, rtol=0)


@pytest.mark.parametrize("compiled", [False, True])
def test_stochastic_codes_follow_the_documented_dither(compiled):
    """grid="stochastic": code = floor((clip(x) - lo) * inv + u) in float32, with u of element j of a
    parameter the pool entry at (its keyed offset + j mod the window length), the window being
    PERIOD values long (a shorter parameter: its own length).  Recomputed here in numpy from that
    rule, for parameters longer than several periods, shorter than one, and empty."""
    from ddp_qhooks.codecs import _random
    period = _random.PERIOD
    numels, keys = [5 * period + 1234, 777, 0, 2 * period], [21, 4, 9, 30]
    x = torch.randn(sum(numels), generator=torch.Generator().manual_seed(17))
    layout = Layout(numels, keys)
    codec = AdaptiveCodec(bits=8, compile=compiled)
    body = encode(codec, x, layout, key=99)[0]
    lohi = body[:8 * 3].view(torch.float32).view(3, 2).numpy()
    codes = body[8 * 3:].numpy()
    pool = _random.dither_pool(torch.device("cpu")).numpy()
    xs = x.numpy()
    L, at, blk = np.float32(255), 0, 0
    for n, k in zip(numels, keys):
        if n == 0:
            continue
        lo, hi = lohi[blk]
        inv = np.float32(255.0 / (np.float64(hi) - np.float64(lo)))
        first = _random.splitmix64(99, k) % _random.POOL_SIZE
        u = pool[first + np.arange(n) % min(n, period)]
        v = (np.clip(xs[at:at + n], lo, hi) - lo) * inv + u
        want = np.minimum(np.floor(v), L).astype(np.uint8)
        np.testing.assert_array_equal(codes[at:at + n], want)
        at, blk = at + n, blk + 1


def test_dither_segments_cover_the_piece_with_the_same_values():
    """ParamPeriodDither.segments cuts a stretch into whole-period windows of one parameter and
    leftovers of at most POOL_SIZE values; expanding them gives the stretch's dither as assembled
    by piece(), for stretches starting and ending anywhere (inside periods, across parameters)."""
    from ddp_qhooks.codecs import _random
    P, pool = _random.PERIOD, _random.POOL_SIZE
    layout = Layout([3 * P + 5, 0, 7, P - 1, 2 * pool + P, 40000], [1, 2, 3, 4, 5, 6])
    dither = _random.ParamPeriodDither(layout, 11, "cpu")
    scratch = torch.empty(pool)
    n = layout.numel
    for start, stop in ((0, n), (3, n - 2), (P + 17, 3 * P + 9), (3 * P + 4, 3 * P + 20), (3 * P + 5 + 7 + P - 1, n)):
        want = torch.cat([dither.piece(p, min(pool, stop - p), scratch, window_ok=False).clone()
                          for p in range(start, stop, pool)])
        got, pos = [], start
        for at, take, window in dither.segments(start, stop - start):
            assert at == pos and take > 0
            if window is None:
                assert take <= pool
                got.append(dither.piece(at, take, scratch, window_ok=False).clone())
            else:
                assert take % window.numel() == 0
                got.append(window.repeat(take // window.numel()))
            pos += take
        assert pos == stop
        assert torch.equal(torch.cat(got), want)
