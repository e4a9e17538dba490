"""qsgd: QSGD levels relative to the block's L2 norm, unbiasedness, and Lemma 3.1's variance bound.

References are independent numpy float64 computations: the norm per block, the level set
``l/s * ||v||``, and the body decoded straight from its bytes (``test_codecs.ref_unpack``).
"""
from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from _reference import ref_block_lengths, ref_unpack

from ddp_qhooks.codecs import Layout, make_codec

BITS = (2, 3, 4, 8)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def ref_decode_minmax_family(body: np.ndarray, param_numels, bits, block_size=None, codec="uniform", **_):
    """float64 decode from the body bytes of uniform / stochastic / qsgd: per block (lo, hi) float32,
    then b-bit codes; value = lo + c * (hi - lo) / L with L = 2**b - 1 (qsgd: L = 2s = 2**b - 2)."""
    lengths = ref_block_lengths(param_numels, block_size)
    n = sum(param_numels)
    meta = np.frombuffer(np.asarray(body[:8 * len(lengths)], dtype=np.uint8).tobytes(), dtype="<f4")
    meta = meta.astype(np.float64).reshape(-1, 2)
    codes = ref_unpack(np.asarray(body[8 * len(lengths):], dtype=np.uint8), bits, n)
    steps = (1 << bits) - (2 if codec == "qsgd" else 1)
    lo, hi = np.repeat(meta[:, 0], lengths), np.repeat(meta[:, 1], lengths)
    return lo + codes * ((hi - lo) / steps)


def ref_decode_qsgd(body: np.ndarray, param_numels, bits, block_size=None, **_):
    return ref_decode_minmax_family(body, param_numels, bits, block_size, codec="qsgd")


def _encode(codec, x, layout, key=0):
    body = torch.zeros(codec.body_nbytes(layout), dtype=torch.uint8)
    info = codec.encode(x, body, layout, key=key)
    return body, info


def _decode(codec, body, layout):
    out = torch.empty(layout.numel)
    codec.decode([body], layout, out)
    return out.double().numpy()


def _block_norms(x: np.ndarray, lengths):
    norms, a = [], 0
    for n in lengths:
        norms.append(np.linalg.norm(x[a:a + n]))
        a += n
    return np.repeat(np.array(norms), lengths)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block_size", [None, 7, "layer"])
def test_levels_are_signed_multiples_of_norm_over_s(bits, block_size):
    numels = [1, 40, 0, 129, 1003]
    layout = Layout(numels)
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(layout.numel, generator=g) * torch.tensor([0.01, 3.0])[torch.arange(layout.numel) % 2]
    codec = make_codec("qsgd", bits=bits, block_size=block_size)
    lengths = ref_block_lengths(numels, block_size)
    assert codec.body_nbytes(layout) == 8 * len(lengths) + math.ceil(layout.numel * bits / 8)
    body, info = _encode(codec, x, layout, key=11)
    assert info.finite
    dec = _decode(codec, body, layout)
    norm = _block_norms(x.double().numpy(), lengths)
    np.testing.assert_allclose(dec, ref_decode_qsgd(body.numpy(), numels, bits, block_size), rtol=0, atol=1e-6 * norm.max())
    s = (1 << (bits - 1)) - 1
    level = dec / norm * s
    np.testing.assert_allclose(level, np.round(level), atol=1e-4)  # on a level l/s * ||v||
    assert np.all(np.abs(np.round(level)) <= s)
    # stochastic rounding picks one of the two levels around v_i (same sign, or zero)
    r = x.double().numpy() / norm * s
    assert np.all((np.round(level) == np.floor(r)) | (np.round(level) == np.ceil(r)) | (np.abs(np.round(level) - r) < 1e-4))


@pytest.mark.parametrize("bits", (2, 4))
def test_unbiased(bits):
    K, n = 1500, 200
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, generator=g)
    x[0] = 0.0
    layout = Layout.flat(n)
    codec = make_codec("qsgd", bits=bits)
    keys = np.random.default_rng(bits).integers(0, 2 ** 62, size=K).tolist()
    dec = np.stack([_decode(codec, _encode(codec, x, layout, k)[0], layout) for k in keys])
    xd = x.double().numpy()
    s = (1 << (bits - 1)) - 1
    step = np.linalg.norm(xd) / s
    p = np.abs(xd) / step - np.floor(np.abs(xd) / step)
    sigma2 = step ** 2 * p * (1 - p)
    test = sigma2 > 1e-6 * step ** 2
    z_crit = statistics.NormalDist().inv_cdf(1 - 1e-4 / (2 * n))
    z = (dec.mean(0)[test] - xd[test]) / np.sqrt(sigma2[test] / K)
    assert np.all(np.abs(z) < z_crit), f"max |z| {np.abs(z).max():.2f}"
    assert np.all(np.abs(dec[:, 0]) < 1e-6 * step)  # an exact zero stays zero


def _spiky(n, seed):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(n) * 1e-4
    v[rng.integers(n)] = 1.0
    v[rng.integers(n)] = -1.0
    return torch.from_numpy(v.astype(np.float32))


@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("kind", ["gaussian", "spiky"])
def test_lemma_3_1_variance_bound(bits, kind):
    """E||Q(v) - v||^2 <= min(n/s^2, sqrt(n)/s) ||v||^2, estimated over many keys."""
    n, K = 4000, 200
    x = torch.randn(n, generator=torch.Generator().manual_seed(1)) if kind == "gaussian" else _spiky(n, 2)
    layout = Layout.flat(n)
    s = (1 << (bits - 1)) - 1
    xd = x.double().numpy()
    bound = min(n / s ** 2, math.sqrt(n) / s) * float(xd @ xd)
    codec = make_codec("qsgd", bits=bits)
    errs = [float(np.sum((_decode(codec, _encode(codec, x, layout, k)[0], layout) - xd) ** 2)) for k in range(K)]
    mean, sem = statistics.fmean(errs), statistics.stdev(errs) / math.sqrt(K)
    assert mean + 4 * sem <= bound, f"{kind} bits={bits}: E err {mean:.4g} (+-{sem:.2g}) vs bound {bound:.4g}"


def test_min_max_grid_breaks_the_bound_on_spiky_vectors():
    """Why qsgd exists next to `stochastic`: with no zero level, a min-max grid rounds every tiny
    entry with variance ~step^2/4 and exceeds Lemma 3.1's bound at the same number of bits."""
    n, K, bits = 4000, 100, 2
    x = _spiky(n, 2)
    layout = Layout.flat(n)
    xd = x.double().numpy()
    bound = min(n, math.sqrt(n)) * float(xd @ xd)  # s = 1 at 2 bits
    codec = make_codec("stochastic", bits=bits, block_size=None)  # one min-max grid, like qsgd's one norm
    errs = [float(np.sum((_decode(codec, _encode(codec, x, layout, k)[0], layout) - xd) ** 2)) for k in range(K)]
    assert statistics.fmean(errs) > 2 * bound


def test_edge_values_and_dtypes():
    layout = Layout.flat(1001)
    codec = make_codec("qsgd", bits=4)
    for x in (torch.zeros(1001), torch.full((1001,), -2.5), torch.full((1001,), 1e-30),
              torch.full((1001,), 3e37), torch.randn(1001) * 1e30):
        body, info = _encode(codec, x, layout, key=3)
        assert info.finite
        dec = _decode(codec, body, layout)
        assert np.all(np.isfinite(dec))
        norm = np.linalg.norm(x.double().numpy())
        assert np.all(np.abs(dec) <= min(norm, 3.4028234663852886e38) * (1 + 1e-6) + 1e-300)
        if float(x.abs().max()) == 0:
            assert np.all(dec == 0)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(1001).to(dtype)
        body, info = _encode(codec, x, layout, key=3)
        out = torch.empty(1001, dtype=dtype)
        codec.decode([body], layout, out)
        assert info.finite and bool(torch.isfinite(out).all())
    bad = torch.randn(1001)
    bad[5] = float("nan")
    assert not _encode(codec, bad, layout)[1].finite


def test_bad_options():
    with pytest.raises(ValueError, match="2..8"):
        make_codec("qsgd", bits=1)
    with pytest.raises(ValueError, match="block_size"):
        make_codec("qsgd", bits=4, block_size=0)
