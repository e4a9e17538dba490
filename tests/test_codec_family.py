"""Properties every registered codec must have, checked the same way for all of them.

Codec-specific behaviour (level sets, unbiasedness, formulas) is tested in each codec's own test
module against an independent reference; this file makes sure no codec misses the common contract:
sizes, empty / constant / zero / extreme / half-precision inputs, non-finite inputs, averaging of
several payloads, the residual buffer, determinism per key, pickling, and ``available()``.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from codec_specs import spec

from ddp_qhooks.codecs import (
    CODECS,
    Layout,
    available,
    available_markdown,
    codec_options,
    examples,
    fidelity_configs,
    make_codec,
    option_space,
    payload_nbytes,
)
from ddp_qhooks.codecs.base import read_free
from ddp_qhooks.codecs.wire import FLAG_NONFINITE, HEADER_BYTES
from ddp_qhooks.exchange.base import set_flag


def family(names=None) -> list:
    """Every registered codec's representative configurations (its class's ``examples``): (codec, bits, options)."""
    return [(name, b, o) for name in (CODECS if names is None else names) for b, o in examples(name)]


def cfg_id(cfg) -> str:
    c, b, o = cfg
    return f"{c}-{b}-" + "-".join(f"{k}={v}" for k, v in sorted(o.items()))


FAMILY = family()
IDS = [cfg_id(c) for c in FAMILY]
LAYOUTS = [[0], [1], [7], [1001], [5, 0, 64, 1, 300]]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _finite_by_spec(cfg, x) -> bool:
    """Whether the codec's test spec says this finite input encodes as finite (casts: the format holds it)."""
    s = spec(cfg[0])
    if s.cast_dtype is not None:
        return bool(torch.isfinite(x.to(s.cast_dtype)).all())
    return True if s.finite is None else s.finite(cfg[2], x)


def _codec(cfg):
    name, bits, opts = cfg
    return make_codec(name, bits=bits, **opts)


def _roundtrip(codec, x, layout, key=1, out_dtype=torch.float32):
    body = torch.full((codec.body_nbytes(layout),), 0xAB, dtype=torch.uint8)
    info = codec.encode(x, body, layout, key=key)
    out = torch.full((layout.numel,), 7.0, dtype=out_dtype)
    codec.decode([body], layout, out)
    return body, info, out


def test_every_registered_codec_is_covered():
    assert {c for c, _, _ in FAMILY} == set(CODECS)


def check_sizes_and_ordinary_values(cfg):
    g = torch.Generator().manual_seed(3)
    for numels in LAYOUTS:
        layout = Layout(numels)
        codec = _codec(cfg)
        x = torch.randn(layout.numel, generator=g)
        body, info, out = _roundtrip(codec, x, layout)
        assert info.finite and out.shape == (layout.numel,) and out.dtype == torch.float32
        assert bool(torch.isfinite(out).all())
        if layout.numel:
            # the payload size depends only on the layout (one all-gather serves every rank)
            other = _roundtrip(_codec(cfg), torch.randn(layout.numel, generator=g) * 100, layout)[0]
            assert other.numel() == body.numel()
            assert float(((out - x) ** 2).sum()) <= 200 * float((x ** 2).sum()) + 1e-12  # sane, not garbage
    assert payload_nbytes(cfg[0], [1000], bits=cfg[1], **cfg[2]) % 4 == 0


def check_zero_constant_extreme_and_half_inputs(cfg):
    layout = Layout([40, 1, 200])
    n = layout.numel
    for x in (torch.zeros(n), torch.full((n,), 0.75), torch.full((n,), -3e-30),
              torch.randn(n, generator=torch.Generator().manual_seed(0)) * 1e30):
        body, info, out = _roundtrip(_codec(cfg), x, layout)
        if not _finite_by_spec(cfg, x):
            assert not info.finite  # documented: e.g. fp16 overflow is reported non-finite
            continue
        assert info.finite, x[:3]
        assert bool(torch.isfinite(out).all())
        if float(x.abs().max()) == 0:
            assert bool((out == 0).all()), "an all-zero bucket must decode to zeros"
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype)
        body, info, out = _roundtrip(_codec(cfg), x, layout, out_dtype=dtype)
        assert info.finite and out.dtype == dtype and bool(torch.isfinite(out).all())


def check_nonfinite_input_is_reported_not_raised(cfg, bad):
    layout = Layout([10, 90])
    x = torch.randn(100)
    x[37] = bad
    codec = _codec(cfg)
    body = torch.zeros(codec.body_nbytes(layout), dtype=torch.uint8)
    err = torch.full((100,), 5.0)
    info = codec.encode(x, body, layout, key=1, error_out=err)
    assert not info.finite  # error_out is then unspecified: every caller drops it
    # the flag as handed on (a bool, or a device tensor left unread) marks the payload's header
    header = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    set_flag(header, info.finite_flag)
    assert int(header[3]) == FLAG_NONFINITE
    set_flag(header, codec.encode(torch.randn(100), body, layout, key=1).finite_flag)
    assert int(header[3]) == 0


def check_average_of_payloads_and_residual(cfg):
    layout = Layout([33, 0, 150, 17])
    n = layout.numel
    g = torch.Generator().manual_seed(9)
    codec = _codec(cfg)
    bodies, singles = [], []
    for r in range(3):
        x = torch.randn(n, generator=g) * (r + 1)
        body = torch.zeros(codec.body_nbytes(layout), dtype=torch.uint8)
        err = torch.empty(n)
        info = codec.encode(x, body, layout, key=10 + r, error_out=err)
        out = torch.empty(n)
        codec.decode([body], layout, out)
        # error_out is the residual x - decode(payload)
        np.testing.assert_allclose(err.double().numpy(), (x - out).double().numpy(), rtol=0,
                                   atol=1e-6 * float(x.abs().max()))
        assert info.error_sq is not None and info.input_sq is not None
        np.testing.assert_allclose(info.error_sq, float((err.double() ** 2).sum()), rtol=1e-4, atol=1e-12)
        bodies.append(body)
        singles.append(out.double())
    avg = torch.empty(n)
    codec.decode(bodies, layout, avg, divisor=3)
    np.testing.assert_allclose(avg.double().numpy(), (sum(singles) / 3).numpy(), rtol=0,
                               atol=1e-5 * float(max(s.abs().max() for s in singles)) + 1e-30)
    empty = torch.full((n,), 3.0)
    codec.decode([], layout, empty)
    assert bool((empty == 0).all())


def check_same_key_same_payload_and_pickle(cfg):
    layout = Layout([64, 200])
    x = torch.randn(layout.numel, generator=torch.Generator().manual_seed(4))
    a = _roundtrip(_codec(cfg), x, layout, key=77)[0]
    b = _roundtrip(_codec(cfg), x, layout, key=77)[0]
    assert torch.equal(a, b), "a fresh codec must encode the same input and key identically"
    clone = pickle.loads(pickle.dumps(_codec(cfg)))
    assert clone.config() == _codec(cfg).config()
    assert torch.equal(_roundtrip(clone, x, layout, key=77)[0], a)


def check_nonfinite_inputs(cfg):
    for bad in (float("nan"), float("inf"), float("-inf")):
        check_nonfinite_input_is_reported_not_raised(cfg, bad)


def check_metadata(name):
    """The registry metadata of a codec: its examples, option values and fidelity rows build, and
    it has its row in available() and the docs table."""
    assert examples(name), f"{name}: no example configuration"
    for bits, opts in examples(name):
        make_codec(name, bits=bits, **opts)
    for option, values in option_space(name).items():
        assert option in codec_options(name) and values, (name, option)
        for v in values:
            make_codec(name, **{option: v})
    for label, _, bits, opts in fidelity_configs([name]):
        assert label
        make_codec(name, bits=bits, **opts)
    row = {r["name"]: r for r in available()}[name]
    assert row["summary"] and row["body_bytes"] and row["bits"]
    assert f"| `{name}` |" in available_markdown()


#: the common contract every registered codec gets, per configuration (a codec registered at runtime
#: runs the same list: tests/test_add_codec.py)
CONTRACT = [check_sizes_and_ordinary_values, check_zero_constant_extreme_and_half_inputs, check_nonfinite_inputs,
            check_average_of_payloads_and_residual, check_same_key_same_payload_and_pickle]


@pytest.mark.parametrize("cfg", FAMILY, ids=IDS)
def test_sizes_and_ordinary_values(cfg):
    check_sizes_and_ordinary_values(cfg)


@pytest.mark.parametrize("cfg", FAMILY, ids=IDS)
def test_zero_constant_extreme_and_half_inputs(cfg):
    check_zero_constant_extreme_and_half_inputs(cfg)


@pytest.mark.parametrize("cfg", FAMILY, ids=IDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_is_reported_not_raised(cfg, bad):
    check_nonfinite_input_is_reported_not_raised(cfg, bad)


@pytest.mark.parametrize("cfg", FAMILY, ids=IDS)
def test_average_of_payloads_and_residual(cfg):
    check_average_of_payloads_and_residual(cfg)


@pytest.mark.parametrize("cfg", FAMILY, ids=IDS)
def test_same_key_same_payload_and_pickle(cfg):
    check_same_key_same_payload_and_pickle(cfg)


@pytest.mark.parametrize("cfg", FAMILY, ids=IDS)
def test_the_contract_holds_on_the_read_free_path(cfg):
    """The accelerators' read-free path (float64 grids, finiteness left on the device), forced on
    the CPU: the same contract, extreme and subnormal inputs and averages included."""
    with read_free():
        for check in CONTRACT:
            check(cfg)


@pytest.mark.parametrize("name", list(CODECS))
def test_registry_metadata(name):
    check_metadata(name)


def test_available_lists_every_codec_with_formula():
    rows = {r["name"]: r for r in available()}
    assert set(rows) == set(CODECS)
    for name, r in rows.items():
        assert r["summary"] and r["body_bytes"] and r["bits"], name
        assert "block_size" in r["options"] or spec(name).cast_dtype is not None, name  # every quantizer takes blocks
        for bits, bpv in r["bits_per_value_1M"].items():
            assert 0 < bpv < 40
    table = available_markdown()
    assert all(f"`{name}`" in table for name in CODECS)
    # default block_size 256: ceil(1e6 / 256) = 3907 blocks of 8 bytes (min, scale) + the 16-byte header
    assert rows["stochastic"]["options"]["block_size"] == 256
    assert rows["stochastic"]["bits_per_value_1M"][8] == pytest.approx(8 * (16 + 8 * 3907 + 10 ** 6) / 1e6)
    assert rows["stochastic"]["bits_per_value_1M"][1] == pytest.approx(8 * (16 + 8 * 3907 + 125000) / 1e6)


def test_server_codec_policy_from_metadata():
    """The two-phase exchange's re-encoding of a shard mean (codecs.server_codec_for), as documented:
    the worker codec itself; the codec its class names in ``server_codec`` (sign, ternary: uniform at
    2 bits) or, for 1-bit codecs, uniform at 2 bits, with the worker's block_size; an explicit
    server_bits: the worker codec at that width where it has one, else that fallback codec."""
    from ddp_qhooks.codecs import LOW_BITS_SERVER_CODEC, server_codec_for
    assert LOW_BITS_SERVER_CODEC == ("uniform", 2)
    assert {n for n, cls in CODECS.items() if cls.server_codec is not None} == {"sign", "ternary"}
    for name, bits, opts in FAMILY + [("stochastic", 1, {"block_size": 16}), ("uniform", 1, {})]:
        codec = make_codec(name, bits=bits, **opts)
        block = {"block_size": opts["block_size"]} if "block_size" in opts else {}
        low = name in ("sign", "ternary") or codec.bits == 1
        got = server_codec_for(codec, None, opts)
        if low:
            assert got.config() == make_codec("uniform", 2, **block).config(), (name, bits, opts)
        else:
            assert got is codec, (name, bits, opts)
        if codec.bits <= 8:   # (server_bits is 1..8: casts and topk report 16 / 32)
            assert server_codec_for(codec, codec.bits, opts) is codec
        for sb in (2, 3, 8):
            if sb == codec.bits:
                continue
            got = server_codec_for(codec, sb, opts)
            try:
                same = make_codec(name, sb, **opts)
            except ValueError:
                same = None
            want = same if same is not None and same.bits == sb else make_codec("uniform", sb, **block)
            assert got.config() == want.config(), (name, bits, opts, sb)
        for bad in (0, 9, 2.5, True, "4"):
            with pytest.raises(ValueError, match="server_bits"):
                server_codec_for(codec, bad, opts)
