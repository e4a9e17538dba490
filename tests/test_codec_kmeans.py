"""Tests for the ``kmeans`` codec (ddp_qhooks/codecs/kmeans.py).

The reference decoder :func:`ref_decode_kmeans` is written from the documented body layout only
(float32 codebooks, then codes packed as documented in packing.py), in numpy float64; it calls
neither the codec nor packing.py.  Properties checked against it: payload size, decode equality,
decoded values on the payload's codebook, nearest-level choice, exactness for few distinct values,
NMSE against a uniform min-max grid, refresh behaviour and the running state.
"""
from __future__ import annotations

import io
import math
import pickle
import re

import numpy as np
import pytest
import torch
from _reference import decode, encode, f64, ragged_data, ref_block_lengths, ref_unpack

from ddp_qhooks.codecs.base import Layout
from ddp_qhooks.codecs.kmeans import KMeansCodec

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


def ref_parts(body, param_numels, bits, block_size=None, **_):
    """(codebooks (blocks, K) float64, codes, block lengths) from the documented layout."""
    body = np.asarray(body, dtype=np.uint8)
    lengths = ref_block_lengths(param_numels, block_size)
    K, nb, n = 1 << bits, len(lengths), sum(param_numels)
    assert body.size == 4 * nb * K + math.ceil(n * bits / 8)
    books = np.frombuffer(body[: 4 * nb * K].tobytes(), dtype="<f4").astype(np.float64).reshape(nb, K)
    codes = ref_unpack(body[4 * nb * K:], bits, n)
    return books, codes, lengths


def ref_decode_kmeans(body: np.ndarray, param_numels: list[int], **config) -> np.ndarray:
    """float64 decode of one body: code c of a value in block j decodes to codebook[j][c]."""
    books, codes, lengths = ref_parts(body, param_numels, **config)
    if not lengths:
        return np.zeros(0)
    block_of = np.repeat(np.arange(len(lengths)), lengths)
    return books[block_of, codes]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def check_body(codec, x, layout, body, out=None):
    """Size, reference decode, sorted codebooks, decoded values on the level set, nearest level."""
    cfg = codec.config()
    assert body.numel() == codec.body_nbytes(layout)
    books, codes, lengths = ref_parts(body.numpy(), layout.param_numels, **cfg)
    K = 1 << codec.bits
    assert body.numel() == 4 * len(lengths) * K + math.ceil(layout.numel * codec.bits / 8)
    assert np.all(np.diff(books, axis=1) >= 0), "codebook not sorted"
    ref = ref_decode_kmeans(body.numpy(), list(layout.param_numels), **cfg)
    if out is None:
        out = decode(codec, [body], layout)
    np.testing.assert_array_equal(f64(out), ref)   # float32 levels, gathered: bit exact
    xd = f64(x.float())
    start = 0
    for j, blen in enumerate(lengths):
        xs, ds, book = xd[start:start + blen], ref[start:start + blen], books[j]
        assert np.all(np.isin(ds, book))
        pos = np.searchsorted(book, xs)
        best = np.minimum(np.abs(xs - book[np.clip(pos - 1, 0, K - 1)]), np.abs(xs - book[np.clip(pos, 0, K - 1)]))
        tol = 4 * EPS32 * np.max(np.abs(xs)) + 2 * TINY32
        assert np.all(np.abs(xs - ds) <= best + tol), f"block {j}: not the nearest level"
        start += blen
    return books, codes, lengths


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
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_round_trip_odd_sizes(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (0, 1, 7, 1001, 100003):
        if n == 100003 and bits not in (2, 3, 8):
            continue
        layout = Layout.flat(n)
        x = torch.randn(n, generator=g) * 3 + 1
        codec = KMeansCodec(bits=bits)
        err = torch.full((n,), 7.0)
        body, info = encode(codec, x, layout, error_out=err)
        assert info.finite
        out = decode(codec, [body], layout)
        check_body(codec, x, layout, body, out)
        # error_out is x - decode, and the squared sums match it
        assert torch.equal(err, x - out)
        np.testing.assert_allclose(info.error_sq, np.sum(f64(err) ** 2), rtol=1e-9, atol=1e-30)
        np.testing.assert_allclose(info.error_sq, np.sum((f64(x) - f64(out)) ** 2), rtol=1e-6)
        np.testing.assert_allclose(info.input_sq, np.sum(f64(x) ** 2), rtol=1e-9)


@pytest.mark.parametrize("block_size", [None, "layer", 1, 3, 64])
@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_ragged_layouts(bits, block_size):
    numels = [1, 0, 5, 64, 65, 130, 7, 1003, 2]
    keys = [10 + 3 * i for i in range(len(numels))]
    layout = Layout(numels, keys)
    x = ragged_data(numels, seed=bits)
    codec = KMeansCodec(bits=bits, block_size=block_size)
    body, info = encode(codec, x, layout)
    assert info.finite
    _, _, lengths = check_body(codec, x, layout, body)
    assert len(lengths) == len(layout.block_lengths(block_size))
    if block_size is not None:
        # blocks never straddle parameters: each parameter decodes as if it were alone
        out = decode(codec, [body], layout)
        off = 0
        for n, k in zip(numels, keys):
            alone = Layout([n], [k])
            c2 = KMeansCodec(bits=bits, block_size=block_size)
            b2, _ = encode(c2, x[off:off + n], alone)
            assert torch.equal(decode(c2, [b2], alone), out[off:off + n])
            off += n
    if block_size == 1 or (block_size == 3 and bits >= 2):
        assert torch.allclose(decode(codec, [body], layout), x, rtol=2 * EPS32, atol=0)  # <= K values per block


@pytest.mark.parametrize("block_size", [None, "layer", 4])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_constant_zero_huge_tiny(bits, block_size):
    g = torch.Generator().manual_seed(5)
    parts = [torch.zeros(10), torch.full((7,), 5.0), torch.randn(50, generator=g) * 1e30,
             torch.randn(50, generator=g) * 1e-30,
             torch.tensor([3.4e38, -3.4e38, 1e38, -2e38, 3.0e38, 0.0, 1.0, -3.3e38, 3.4028235e38]),
             torch.full((3,), -2.5)]
    numels = [p.numel() for p in parts]
    layout = Layout(numels)
    x = torch.cat(parts)
    codec = KMeansCodec(bits=bits, block_size=block_size)
    body, info = encode(codec, x, layout, error_out=torch.empty_like(x))
    assert info.finite and math.isfinite(info.error_sq) and math.isfinite(info.input_sq)
    out = decode(codec, [body], layout)
    assert bool(torch.isfinite(out).all())
    check_body(codec, x, layout, body, out)
    # averaging copies of the extreme body: no overflow, and the mean of equal shares is the share
    mean = decode(codec, [body] * 3, layout, divisor=3)
    assert bool(torch.isfinite(mean).all())
    np.testing.assert_allclose(f64(mean), f64(out), rtol=4 * EPS32, atol=2 * TINY32 / 3 + 1e-45)
    if block_size is not None:
        assert torch.equal(out[:17], x[:17]) and torch.equal(out[-3:], x[-3:])   # zero and constant blocks
    if block_size == "layer":
        # scale invariance: tiny and huge blocks are as good as unit-scale ones
        for sl in (slice(17, 67), slice(67, 117)):
            xs, os_ = f64(x[sl]), f64(out[sl])
            assert np.sum((xs - os_) ** 2) / np.sum(xs ** 2) < 0.4 * 4.0 ** (1 - bits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_and_outputs(dtype):
    numels = [300, 1, 2000]
    layout = Layout(numels)
    x = ragged_data(numels, seed=9, dtype=dtype)
    for block_size in (None, "layer", 64):
        codec = KMeansCodec(bits=4, block_size=block_size)
        err = torch.empty(layout.numel)
        body, info = encode(codec, x, layout, error_out=err)
        ref_body, _ = encode(KMeansCodec(bits=4, block_size=block_size), x.float(), layout)
        assert torch.equal(body, ref_body)   # computed in float32 from the widened input
        out32 = decode(codec, [body], layout)
        check_body(codec, x, layout, body, out32)
        assert torch.equal(err, x.float() - out32)
        out_h = decode(codec, [body], layout, dtype=dtype)
        assert out_h.dtype == dtype and torch.equal(out_h, out32.to(dtype))


@pytest.mark.parametrize("bits", range(1, 9))
def test_exact_when_few_distinct_values(bits):
    K = 1 << bits
    rng = np.random.default_rng(bits)
    for distinct in sorted({1, 2, max(1, K // 2 - 1), K}):
        values = np.unique(rng.standard_normal(distinct) * 10 ** rng.uniform(-3, 3))
        while values.size < distinct:
            values = np.unique(np.concatenate([values, rng.standard_normal(distinct)]))
        idx = rng.integers(0, distinct, size=3001)
        idx[:distinct] = np.arange(distinct)
        x = torch.from_numpy(values[idx].astype(np.float32))
        for block_size in (None, "layer"):
            codec = KMeansCodec(bits=bits, block_size=block_size, iterations=2)
            layout = Layout([1000, 2001])
            if block_size is None:
                layout = Layout.flat(3001)
            body, _ = encode(codec, x, layout)
            books, _, _ = check_body(codec, x, layout, body)
            out = decode(codec, [body], layout)
            np.testing.assert_allclose(f64(out), f64(x), rtol=2 * EPS32, atol=0)


@pytest.mark.parametrize("bits", range(1, 9))
def test_nmse_below_uniform_minmax_grid(bits):
    rng = np.random.default_rng(100 + bits)
    xd = rng.standard_normal(30000).astype(np.float32)
    codec = KMeansCodec(bits=bits)
    layout = Layout.flat(xd.size)
    body, info = encode(codec, torch.from_numpy(xd), layout, error_out=torch.empty(xd.size))
    x64 = xd.astype(np.float64)
    nmse = info.error_sq / info.input_sq
    lo, hi = x64.min(), x64.max()
    step = (hi - lo) / ((1 << bits) - 1)
    uniform = lo + np.round((x64 - lo) / step) * step
    nmse_uniform = np.sum((x64 - uniform) ** 2) / np.sum(x64 ** 2)
    assert nmse < 0.8 * nmse_uniform, (nmse, nmse_uniform)


# ------------------------------------------------------------------------------------------------
# refresh and running state
# ------------------------------------------------------------------------------------------------
def _steps(numels, count, seed):
    """Data whose distribution shape changes every step, so every refit changes the codebook."""
    g = torch.Generator().manual_seed(seed)
    n = sum(numels)
    out = []
    for s in range(count):
        kind = s % 3
        if kind == 0:
            x = torch.randn(n, generator=g)
        elif kind == 1:
            x = torch.rand(n, generator=g) * 2 - 1
        else:
            x = torch.randn(n, generator=g) ** 3
        out.append(x * (1 + s))
    return out


def _normalised_books(body, layout, codec, x):
    books, _, lengths = ref_parts(body.numpy(), layout.param_numels, **codec.config())
    xd, start, out = f64(x), 0, []
    for j, blen in enumerate(lengths):
        out.append(books[j] / np.max(np.abs(xd[start:start + blen])))
        start += blen
    return np.array(out)


@pytest.mark.parametrize("block_size", [None, "layer"])
def test_refresh_every(block_size):
    layout = Layout([400, 3000], [5, 6])
    data = _steps(layout.param_numels, 7, seed=3)
    codec = KMeansCodec(bits=3, block_size=block_size, refresh_every=3)
    every = KMeansCodec(bits=3, block_size=block_size, refresh_every=1)
    books, books_every = [], []
    for x in data:
        body, _ = encode(codec, x, layout)
        check_body(codec, x, layout, body)
        books.append(_normalised_books(body, layout, codec, x))
        body_e, _ = encode(every, x, layout)
        books_every.append(_normalised_books(body_e, layout, every, x))
    for s in range(1, 7):
        same = np.allclose(books[s], books[s - 1], rtol=4 * EPS32, atol=4 * EPS32)
        assert same == (s % 3 != 0), f"step {s}: refit expected only at steps 0, 3, 6"
        assert not np.allclose(books_every[s], books_every[s - 1], rtol=1e-3, atol=1e-3)
    # both codecs fit the first step from scratch
    assert np.allclose(books[0], books_every[0], rtol=4 * EPS32, atol=4 * EPS32)


def test_state_survives_bucket_rebuild():
    a, b = torch.randn(500) * 2, torch.rand(700)
    codec = KMeansCodec(bits=4, block_size="layer", refresh_every=100)
    first = Layout([500, 700], [7, 9])
    body, _ = encode(codec, torch.cat([a, b]), first)
    books0 = _normalised_books(body, first, codec, torch.cat([a, b]))
    # DDP rebuilt its buckets: parameter 9 now sits alone; its codebook is reused (scaled), not refitted
    rebuilt = Layout([700], [9])
    b2 = torch.randn(700) ** 3
    body2, _ = encode(codec, b2, rebuilt)
    np.testing.assert_allclose(_normalised_books(body2, rebuilt, codec, b2), books0[1:], rtol=4 * EPS32, atol=4 * EPS32)
    fresh, _ = encode(KMeansCodec(bits=4, block_size="layer", refresh_every=100), b2, rebuilt)
    assert not torch.equal(fresh, body2)
    # with one block per bucket the state belongs to the layout: a new layout fits afresh
    bucket = KMeansCodec(bits=4, block_size=None, refresh_every=100)
    encode(bucket, torch.cat([a, b]), first)
    body3, _ = encode(bucket, b2, rebuilt)
    fresh_bucket, _ = encode(KMeansCodec(bits=4, block_size=None, refresh_every=100), b2, rebuilt)
    assert torch.equal(body3, fresh_bucket)


def test_state_dict_round_trip_and_pickle():
    layout = Layout([300, 0, 1200, 5], [1, 2, 3, 4])
    data = _steps(layout.param_numels, 8, seed=11)
    for block_size in (None, "layer", 256):
        codec = KMeansCodec(bits=3, block_size=block_size, refresh_every=4, sample=500)
        for x in data[:2]:
            encode(codec, x, layout)
        buf = io.BytesIO()
        torch.save(codec.state_dict(), buf)
        buf.seek(0)
        restored = KMeansCodec(bits=3, block_size=block_size, refresh_every=4, sample=500)
        restored.load_state_dict(torch.load(buf, weights_only=True))
        assert state_equal(restored.state_dict(), codec.state_dict())
        pickled = pickle.loads(pickle.dumps(codec))
        for x in data[2:]:
            b1, _ = encode(codec, x, layout)
            b2, _ = encode(restored, x, layout)
            b3, _ = encode(pickled, x, layout)
            assert torch.equal(b1, b2) and torch.equal(b1, b3)
    with pytest.raises(ValueError, match="bits"):
        KMeansCodec(bits=4).load_state_dict(KMeansCodec(bits=3).state_dict())
    with pytest.raises(ValueError, match="block_size"):
        KMeansCodec(bits=3, block_size="layer").load_state_dict(KMeansCodec(bits=3, block_size=None).state_dict())
    assert KMeansCodec(bits=3).block_size == "layer"  # the default: one codebook per parameter


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("block_size", [None, "layer", 16])
def test_nonfinite_input_keeps_state(bad, block_size):
    layout = Layout([100, 50])
    data = _steps(layout.param_numels, 3, seed=4)
    codec = KMeansCodec(bits=2, block_size=block_size, refresh_every=2)
    clean = KMeansCodec(bits=2, block_size=block_size, refresh_every=2)
    for c in (codec, clean):
        encode(c, data[0], layout)
    before = codec.state_dict()
    x = data[1].clone()
    x[120] = bad
    for dtype in (torch.float32, torch.float16):
        err = torch.full((150,), 3.0)
        _, info = encode(codec, x.to(dtype), layout, error_out=err)
        assert not info.finite
        assert bool((err == 3.0).all())
    assert state_equal(before, codec.state_dict())
    for x in data[1:]:
        assert torch.equal(encode(codec, x, layout)[0], encode(clean, x, layout)[0])


def test_several_bodies_divisor_unaligned_and_empty():
    numels = [33, 1000, 4]
    layout = Layout(numels)
    for block_size in (None, "layer", 10):
        bodies, refs = [], []
        for r in range(3):
            codec = KMeansCodec(bits=5, block_size=block_size)
            x = ragged_data(numels, seed=50 + r) * (r + 1)
            body, _ = encode(codec, x, layout)
            # a received body sits at an arbitrary byte offset of the gathered buffer
            big = torch.zeros(body.numel() + 5, dtype=torch.uint8)
            big[3:3 + body.numel()] = body
            bodies.append(big[3:3 + body.numel()])
            refs.append(ref_decode_kmeans(body.numpy(), numels, **codec.config()))
        for divisor in (1, 3, 7):
            for dtype in (torch.float32, torch.bfloat16):
                out = decode(codec, bodies, layout, divisor=divisor, dtype=dtype)
                want = sum(refs) / divisor
                rtol = 2.0 ** -8 if dtype == torch.bfloat16 else 8 * EPS32
                np.testing.assert_allclose(f64(out), want, rtol=rtol, atol=rtol * np.max(np.abs(want)))
        assert bool((decode(codec, [], layout) == 0).all())
    empty = Layout([0, 0])
    codec = KMeansCodec(bits=3)
    assert codec.body_nbytes(empty) == 0
    body, info = encode(codec, torch.zeros(0), empty, error_out=torch.zeros(0))
    assert info.finite and info.error_sq == 0.0
    assert decode(codec, [body], empty).numel() == 0


# ------------------------------------------------------------------------------------------------
# options and metadata
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, pattern", [
    ({"bits": 0}, r"bits .*1\.\.8"),
    ({"bits": 9}, r"bits .*1\.\.8"),
    ({"bits": 2.0}, r"bits .*1\.\.8"),
    ({"bits": True}, r"bits .*1\.\.8"),
    ({"block_size": 0}, r"block_size .*'layer'"),
    ({"block_size": "bucket"}, r"block_size .*'layer'"),
    ({"sample": 0}, r"sample .*positive integer"),
    ({"sample": 1.5}, r"sample .*positive integer"),
    ({"iterations": 0}, r"iterations .*positive integer"),
    ({"refresh_every": 0}, r"refresh_every .*positive integer"),
    ({"refresh_every": None}, r"refresh_every .*positive integer"),
])
def test_bad_options(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        KMeansCodec(**kwargs)


def test_metadata_and_config():
    codec = KMeansCodec(bits=np.int64(6), block_size=np.int32(128), sample=1000, iterations=3, refresh_every=2)
    assert (KMeansCodec.name, KMeansCodec.codec_id, KMeansCodec.stochastic) == ("kmeans", 9, False)
    assert KMeansCodec.body_formula and KMeansCodec.summary and "\n" not in KMeansCodec.summary
    assert codec.config() == {"codec": "kmeans", "bits": 6, "block_size": 128, "sample": 1000, "iterations": 3,
                              "refresh_every": 2}
    assert re.match(r"KMeansCodec\(bits=6", repr(codec))
    layout = Layout([100, 300, 5])
    assert codec.body_nbytes(layout) == 4 * 64 * 5 + math.ceil(405 * 6 / 8)


def test_collapsed_codebook_refits_alone():
    """A block that was all zero gets a one-level codebook; next step it is refitted at once while
    its neighbours in the same run keep their scaled codebooks until the refresh."""
    layout = Layout([64])
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(64, generator=g)
    x0[16:32] = 0
    x1 = torch.rand(64, generator=g) * 4 - 2
    codec = KMeansCodec(bits=2, block_size=16, refresh_every=50)
    body0, _ = encode(codec, x0, layout)
    books0, _, _ = check_body(codec, x0, layout, body0)
    assert np.all(books0[1] == 0)
    body1, _ = encode(codec, x1, layout)
    check_body(codec, x1, layout, body1)
    n0, n1 = _normalised_books(body0, layout, codec, x0 + (x0 == 0)), _normalised_books(body1, layout, codec, x1)
    for j in (0, 2, 3):
        np.testing.assert_allclose(n1[j], n0[j], rtol=4 * EPS32, atol=4 * EPS32)
    fresh, _ = encode(KMeansCodec(bits=2, block_size=16), x1, layout)
    np.testing.assert_array_equal(ref_parts(body1.numpy(), [64], 2, 16)[0][1], ref_parts(fresh.numpy(), [64], 2, 16)[0][1])


def test_nearest_level_table_matches_searchsorted():
    """The table lookup behind encode picks exactly the level searchsorted picks, including values
    on midpoints, next to them, and next to the table's bin edges; repeated levels included."""
    from ddp_qhooks.codecs.kmeans import _nearest_codes
    g = torch.Generator().manual_seed(0)
    for rows, length in [(1, 40000), (3, 9000), (2, 2048), (4, 100)]:
        for K in (2, 16, 256):
            u = (torch.randn(rows, length, generator=g) / 4).clamp(-1, 1)
            books = {
                "spread": torch.sort(torch.rand(rows, K, generator=g) * 2 - 1).values,
                "dense": torch.sort(torch.rand(rows, K, generator=g) * 1e-3).values,
                "repeated": torch.sort(torch.randint(-3, 4, (rows, K), generator=g).float() / 3).values,
            }
            for cb in books.values():
                mids = ((cb[:, :-1] + cb[:, 1:]) * 0.5).contiguous()
                m = min(K - 1, length // 4)
                u[:, :m] = mids[:, :m]
                u[:, m:2 * m] = torch.nextafter(mids[:, :m], torch.tensor(2.0))
                k = min(length - 2 * m, 4097)
                edges = torch.linspace(-1, 1, 4097)[:k]
                u[:, 2 * m:2 * m + k] = torch.nextafter(edges, torch.tensor(-2.0)).clamp(-1, 1)
                u[:, -1], u[:, -2] = 1.0, -1.0
                out = torch.empty(rows, length, dtype=torch.uint8)
                _nearest_codes(u, mids, out)
                assert torch.equal(out.long(), torch.searchsorted(mids, u))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    numels = [5000, 1, 300, 70000]
    layout = Layout(numels)
    x = ragged_data(numels, seed=21)
    for block_size in (None, "layer", 1000):
        for bits in (2, 3, 8):
            gpu, cpu = KMeansCodec(bits=bits, block_size=block_size), KMeansCodec(bits=bits, block_size=block_size)
            for step in range(3):
                xs = x * (1 + step)
                body = torch.zeros(gpu.body_nbytes(layout), dtype=torch.uint8, device="cuda")
                err = torch.empty(layout.numel, device="cuda")
                info = gpu.encode(xs.cuda(), body, layout, error_out=err)
                assert info.finite
                out = torch.empty(layout.numel, device="cuda")
                gpu.decode([body, body], layout, out, divisor=2)
                check_body(cpu, xs, layout, body.cpu(), out.cpu())
                assert torch.equal(err.cpu(), xs - out.cpu())
                # reductions may round differently on the GPU: compare the quality, not the bits
                _, i_cpu = encode(cpu, xs, layout, error_out=torch.empty(layout.numel))
                assert info.error_sq <= 1.05 * i_cpu.error_sq + 1e-30
            sd = gpu.state_dict()
            assert all(e["codebooks"].device.type == "cpu" for e in sd["entries"])
