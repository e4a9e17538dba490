"""Hypothesis fuzzing of every registered codec through the codec layer API.

Hypothesis draws the *structure* of a case: the bucket size (0..100,000, biased to small and
boundary sizes), the layout (parameter sizes summing to it, empty parameters included), the codec
options (``bits`` among the codec's valid widths, ``block_size`` among None / "layer" / integers,
the codec's own options), the input dtype (float32 as the hook passes, float16 / bfloat16 /
float64 buckets, which the codecs widen or round to float32) and a value *recipe*: a distribution,
a power-of-two scale from 2**-149 to 2**127, special values (+-0, the smallest subnormal, the
smallest normal, +-float32 max, +-inf, NaN) inserted at drawn places, constant and all-zero
tensors.  The tensor itself is then built by numpy from a drawn seed (drawing 10^5 floats through
hypothesis would be far too slow).

Every registered codec is fuzzed (``ddp_qhooks.codecs.CODECS``); its options come from the codec
class's ``option_space`` metadata, and its independent references (body size formula, level-set
check) from its test spec ``tests/codec_specs/<name>.py``.  Properties, checked against the formats
documented in each codec module (never by calling the codec's own helpers):

* building a codec from a valid configuration and encoding any input never raise; ``body_nbytes``
  equals the documented body formula;
* ``EncodeInfo.finite`` is False exactly when the input (for the casts: the input cast to the
  format) holds a NaN or an infinity (``error_out`` is then unspecified: callers drop it);
* a finite input decodes to finite float32 values, one per value of the layout;
* level sets: uniform / stochastic / adaptive values lie on ``lo + k (hi - lo) / (2^b - 1)``,
  qsgd on ``l ||v|| / s``, log on ``+-m 2^-j`` or 0, mulaw on the companded grid, kmeans on its
  block's codebook (at most ``2^b`` distinct values), ternary on ``{-a, 0, +a}``, sign on ``+-a``,
  topk keeps at most ``k`` values per block (the largest ones), the casts equal ``x`` cast to the
  format and back, ``none`` is exact; plus each codec's rounding / range guarantee;
* ``error_out`` is ``x - decode(body)`` and the squared sums in ``EncodeInfo`` match it;
* small cases also decode several bodies with a divisor (the mean of W payloads) and no bodies.

Every codec runs >= 1,000 derandomized examples (reproducible: a failure shows the falsifying
``Case`` and recurs on every run) under the ``fuzz`` marker, which is part of the default run
(``-m "not fuzz"`` skips it; ``DDP_QHOOKS_FUZZ_EXAMPLES=N`` changes the count while debugging).
Regression tests for the bugs the fuzzer found are plain tests at the end of the file.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from codec_specs import spec
from codec_specs._ref import (  # noqa: F401 (re-exported: the helpers the regression tests below use)
    EPS32,
    FP32_MAX,
    MIN_NORMAL32,
    TINY32,
    Blocks,
    assert_all,
    assert_close,
    assert_equal,
    ceil_div,
    check_cast,
    default_of,
    levels_ok,
    meta_floats,
    ref_block_lengths,
    topk_k,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddp_qhooks.codecs import CODECS, EncodeInfo, Layout, codec_options, make_codec, option_space

NAMES = tuple(CODECS)
EXAMPLES = int(os.environ.get("DDP_QHOOKS_FUZZ_EXAMPLES", "1000"))  # >= 1000 in the normal run

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

SPECIALS = {
    "+0": 0.0, "-0": -0.0, "tiny": TINY32, "-tiny": -TINY32, "min_normal": MIN_NORMAL32,
    "max": FP32_MAX, "-max": -FP32_MAX, "inf": math.inf, "-inf": -math.inf, "nan": math.nan,
}
FINITE_SPECIALS = [k for k, v in SPECIALS.items() if math.isfinite(v)]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
HALF_OUT = (torch.float16, torch.bfloat16)
RECIPES = ("normal", "uniform", "heavy", "wide", "ints", "const", "zeros", "offset", "sparse", "positive",
           "negative")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------
# configuration strategies
# ------------------------------------------------------------------------------------------------
_VALID_BITS: dict = {}


def valid_bits(name: str, options: dict) -> tuple[int, ...]:
    """Widths ``make_codec`` accepts for these options (1..32, probed once and cached)."""
    return _bits_entry(name, options)[0]


def bits_strategy(name: str, options: dict) -> st.SearchStrategy:
    return _bits_entry(name, options)[1]


def _bits_entry(name: str, options: dict):
    # the accepted widths do not depend on the block size or on how many values topk keeps
    options = {k: v for k, v in options.items() if k not in ("block_size", "ratio", "k")}
    key = (name, tuple(sorted(options.items(), key=repr)))
    if key not in _VALID_BITS:
        ok = []
        for b in range(1, 33):
            try:
                make_codec(name, bits=b, **options)
            except ValueError:
                continue
            ok.append(b)
        _VALID_BITS[key] = (tuple(ok), st.sampled_from(ok))
    return _VALID_BITS[key]


BLOCK_SIZES = st.one_of(st.none(), st.just("layer"), st.sampled_from([1, 2, 3, 7, 8, 9, 64, 1000]),
                        st.integers(1, 5000))


def option_strategy(name: str) -> st.SearchStrategy:
    """Options of the named codec (besides bits): its spec's strategy, or ``block_size`` (when the
    codec takes one) and each option of the codec's ``option_space`` drawn from its values."""
    custom = spec(name).fuzz_options
    if custom is not None:
        return custom(BLOCK_SIZES)
    opts = {"block_size": BLOCK_SIZES} if "block_size" in codec_options(name) else {}
    opts.update({k: st.sampled_from(v) for k, v in option_space(name).items()})
    return st.fixed_dictionaries(opts)


SPECIAL_SIZES = [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257,
                 1023, 1024, 1025, 4095, 4096, 4097, 65535, 65536, 65537, 99999, 100000]
_TIER = st.sampled_from(["special"] * 2 + ["small"] * 5 + ["medium"] * 2 + ["large"])
_TIERS = {"special": st.sampled_from(SPECIAL_SIZES), "small": st.integers(0, 70), "medium": st.integers(71, 5000),
          "large": st.integers(5001, 100_000)}


@st.composite
def numel_strategy(draw, name: str):
    """0..100,000 values, mostly small: boundary sizes, small, medium, and some large buckets (the
    slower codecs reach 10^5 through SPECIAL_SIZES only)."""
    tier = draw(_TIER)
    if tier == "large" and spec(name).slow:
        tier = "medium"
    return draw(_TIERS[tier])


_CUTS = st.lists(st.integers(0, 2 ** 20), max_size=4)
_SCALE_EXP = st.one_of(st.sampled_from([0, -149, -140, -126, -100, -60, -20, 20, 60, 100, 120, 126, 127]),
                       st.integers(-149, 127), st.integers(-10, 10))
_SPECIAL_LIST = st.lists(st.tuples(st.sampled_from(FINITE_SPECIALS * 2 + ["inf", "-inf", "nan"]), st.integers(1, 3),
                                   st.sampled_from(["random", "first", "last"])), max_size=4)
_DTYPE = st.sampled_from(["float32"] * 5 + ["float16", "bfloat16", "float64"])
_OPTIONS = {}
_NUMELS = {}
_RECIPE = st.sampled_from(RECIPES)
_ONE_IN_3 = st.integers(0, 2)
_MULTI = st.sampled_from([0, 0, 0, 0, 0, 2, 3])
_DIVISOR = st.sampled_from([1, 2, 3, 7])
_SEED = st.integers(0, 2 ** 32 - 1)


@dataclass
class Case:
    name: str
    bits: int
    options: dict
    numels: list
    keys: list | None
    dtype: str
    recipe: str
    scale_exp: int
    specials: list            # [(special name, count, where)]
    seed: int
    key: int
    error_out: bool
    steps: int                # encodes with the same codec (stateful codecs keep running state)
    multi: int                # bodies averaged in the multi-body check (0: skipped)
    divisor: int
    extra: dict = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(self.numels)


@st.composite
def case_strategy(draw, name: str):
    if name not in _OPTIONS:
        _OPTIONS[name] = option_strategy(name)
        _NUMELS[name] = numel_strategy(name)
    options = dict(draw(_OPTIONS[name]))
    bits = draw(bits_strategy(name, options))
    numel = draw(_NUMELS[name])
    # the layout: parameter sizes summing to numel (empty parameters included)
    cuts = sorted(c % (numel + 1) for c in draw(_CUTS))
    edges = [0] + cuts + [numel]
    numels = [b - a for a, b in zip(edges[:-1], edges[1:])]
    keys = [1000 + 7 * i for i in range(len(numels))] if draw(st.booleans()) else None
    if spec(name).fuzz_adjust is not None:   # e.g. bound the work per example for the layout drawn
        options = spec(name).fuzz_adjust(options, numels)
    dtype = draw(_DTYPE)
    recipe = draw(_RECIPE)
    scale_exp = draw(_SCALE_EXP)
    specials = draw(_SPECIAL_LIST) if draw(_ONE_IN_3) == 0 else []
    steps = 2 if spec(name).stateful and numel <= 5000 and draw(st.booleans()) else 1
    multi = draw(_MULTI) if numel <= 5000 else 0
    seed = draw(_SEED)
    return Case(name=name, bits=bits, options=options, numels=numels, keys=keys, dtype=dtype, recipe=recipe,
                scale_exp=scale_exp, specials=specials, seed=seed,
                key=(seed * 0x9E3779B97F4A7C15) % 2 ** 64,   # the codec's 64-bit key: any value is valid
                error_out=draw(st.booleans()), steps=steps, multi=multi, divisor=draw(_DIVISOR) if multi else 1)


# ------------------------------------------------------------------------------------------------
# the input tensor, built by numpy from the recipe
# ------------------------------------------------------------------------------------------------
def build_values(n: int, recipe: str, scale_exp: int, specials, seed: int) -> np.ndarray:
    """float32 values of the recipe (finite unless a non-finite special is inserted)."""
    rng = np.random.default_rng(seed)
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0) if recipe in ("heavy", "wide") else None
    if recipe == "normal":
        base = rng.standard_normal(n)
    elif recipe == "uniform":
        base = rng.uniform(-1.0, 1.0, n)
    elif recipe == "heavy":
        base = sign * np.exp(rng.standard_normal(n) * 8)
    elif recipe == "wide":       # every binade of float32 at once, whatever the scale
        base = sign * np.exp2(rng.uniform(-150.0, 128.0, n) - scale_exp)
    elif recipe == "ints":
        base = rng.integers(-3, 4, n).astype(np.float64)
    elif recipe == "const":
        base = np.full(n, rng.standard_normal())
    elif recipe == "zeros":
        base = np.zeros(n)
    elif recipe == "offset":     # far from zero relative to the spread
        base = 1.0 + rng.standard_normal(n) * 2.0 ** -int(rng.integers(5, 30))
    elif recipe == "sparse":
        base = rng.standard_normal(n) * (rng.random(n) < 0.02)
    elif recipe == "positive":
        base = np.abs(rng.standard_normal(n))
    else:
        base = -np.abs(rng.standard_normal(n))
    with np.errstate(over="ignore", invalid="ignore"):
        x = np.clip(base * np.exp2(float(scale_exp)), -FP32_MAX, FP32_MAX).astype(np.float32)
    if n:
        for which, count, where in specials:
            pos = {"first": np.arange(min(count, n)), "last": n - 1 - np.arange(min(count, n))}.get(where)
            if pos is None:
                pos = rng.integers(0, n, count)
            x[pos] = np.float32(SPECIALS[which])
    return x


def to_input(x32: np.ndarray, dtype: str, seed: int) -> torch.Tensor:
    t = torch.from_numpy(x32.copy())
    if dtype == "float64":
        # float64 buckets hold values between the float32 ones: nudge them off the float32 grid
        # (by far less than half a float32 ulp, so float32 max stays finite)
        rng = np.random.default_rng(seed ^ 0x5A5A)
        with np.errstate(invalid="ignore"):
            x64 = x32.astype(np.float64) * (1.0 + rng.uniform(-1e-9, 1e-9, x32.size))
        return torch.from_numpy(np.where(np.isnan(x64), x32.astype(np.float64), x64))
    return t.to(DTYPES[dtype])


def input_of(case: Case, seed_offset: int = 0, finite: bool = False) -> torch.Tensor:
    specials = [s for s in case.specials if not finite or s[0] in FINITE_SPECIALS]
    x32 = build_values(case.numel, case.recipe, case.scale_exp, specials, case.seed + seed_offset)
    return to_input(x32, case.dtype, case.seed + seed_offset)


def expected_nbytes(name: str, bits: int, options: dict, numels) -> int:
    """Body bytes from the formula in the codec module's docstring (its test spec)."""
    return spec(name).expected_nbytes(bits, options, numels)


def expected_finite(case: Case, x: torch.Tensor) -> bool:
    """Documented: NaN/Inf anywhere is reported; the casts report values the format cannot hold
    (fp16 above 65504), as does topk whose fp16/bf16 value codec must send each block's max |x|."""
    x32 = x.float()
    if x32.numel() == 0:
        return True
    if not bool(torch.isfinite(x32).all()):
        return False
    s = spec(case.name)
    if s.cast_dtype is not None:
        return bool(torch.isfinite(x.to(s.cast_dtype)).all())
    return True if s.finite is None else s.finite(case.options, x)


# ------------------------------------------------------------------------------------------------
# the round trip of one case
# ------------------------------------------------------------------------------------------------
def new_codec(case: Case, registry: bool = True):
    if registry:
        return make_codec(case.name, bits=case.bits, **case.options)
    return CODECS[case.name](bits=case.bits, **case.options)   # the same, without make_codec's option check


def encode(codec, x, layout, key, error_out=None):
    body = torch.full((codec.body_nbytes(layout),), 0xAB, dtype=torch.uint8)
    info = codec.encode(x, body, layout, key, error_out=error_out)
    return body, info


def decode(codec, bodies, layout, divisor=1):
    out = torch.full((layout.numel,), -12345.0)
    codec.decode(list(bodies), layout, out, divisor=divisor)
    assert out.shape == (layout.numel,) and out.dtype == torch.float32
    return out


def check_residual(info, x32: np.ndarray, d: np.ndarray, err: torch.Tensor, blocks_max: float):
    """error_out = x - decode(body) (float32: it may overflow where |x - d| > float32 max)."""
    e = err.double().numpy()
    ref = x32 - d
    tol = 1e-6 * blocks_max + 4 * TINY32
    with np.errstate(invalid="ignore"):
        ok = np.abs(e - ref) <= tol
    if not ok.all():   # where x - d exceeds the float32 range, error_out saturates (or is inf)
        big = np.abs(ref) > FP32_MAX * (1 - 1e-6)
        ok |= big & (np.abs(e) >= FP32_MAX * (1 - 1e-5)) & (np.sign(e) == np.sign(ref))
    assert_all(ok, "error_out is not x - decode(body)", e, ref, names=("err", "x - d"))
    assert info.error_sq is not None and info.input_sq is not None
    # float32 accumulation is allowed: relative 1e-4, plus the subnormal squares it may lose
    atol = x32.size * TINY32
    assert_close(info.input_sq, float(np.dot(x32, x32)), rtol=1e-4, atol=atol, what="input_sq")
    assert (info.input_sq > 0) == bool(np.any(x32 != 0)), f"input_sq = {info.input_sq} for max |x| {np.abs(x32).max()}"
    if np.all(np.isfinite(e)):
        assert_close(info.error_sq, float(np.dot(e, e)), rtol=1e-4, atol=atol, what="error_sq")


def check_levels(case, codec, x32, d, body, blocks, first):
    """The codec's documented level set / rounding guarantee (its test spec's check_levels)."""
    check = spec(case.name).check_levels
    if check is not None:
        check(case, codec, x32, d, body, blocks, first)


def run_case(case: Case) -> None:
    codec = new_codec(case)           # valid configurations never raise
    layout = Layout(case.numels, case.keys)
    n = layout.numel
    nbytes = codec.body_nbytes(layout)
    assert nbytes == expected_nbytes(case.name, codec.bits, case.options, case.numels), "body_nbytes formula"
    blocks = Blocks(case.numels, case.options.get("block_size", default_of(case.name, "block_size")))
    for step in range(case.steps):
        x = input_of(case, seed_offset=step, finite=step > 0)
        sentinel = torch.arange(n, dtype=torch.float32) * 0.5 - 3.0
        err = sentinel.clone() if case.error_out else None
        body, info = encode(codec, x, layout, case.key + step, error_out=err)
        assert isinstance(info, EncodeInfo)
        assert body.numel() == nbytes
        finite = expected_finite(case, x)
        assert info.finite is finite, f"EncodeInfo.finite is {info.finite}, input finite: {finite}"
        if not finite:
            return  # (a non-finite step leaves the running state of the stateful codecs as it was)
        out = decode(codec, [body], layout)
        d = out.double().numpy()
        x32 = x.float().double().numpy()
        assert np.all(np.isfinite(d)), "a finite input decoded to a non-finite value"
        cast = spec(case.name).cast_dtype
        if cast is not None:
            check_cast(case, x, d, cast)
        else:
            check_levels(case, codec, x32, d, body, blocks, first=step == 0)
        if err is not None:
            check_residual(info, x32, d, err, max(grid_mag(case, body, blocks, d), float(np.abs(x32).max()) if n else 0.0))
    if case.multi:
        check_multi(case, layout, blocks)


def grid_mag(case: Case, body: torch.Tensor, blocks: Blocks, d: np.ndarray) -> float:
    """The magnitude at whose float32 precision values are decoded: max |d|, or for the range codecs
    the largest |lo|, |hi| sent (qsgd's norm, adaptive's running range may exceed every |x|)."""
    mag = float(np.abs(d).max()) if d.size else 0.0
    if spec(case.name).range_meta and blocks.count:
        mag = max(mag, float(np.abs(meta_floats(body, 2 * blocks.count)).max()))
    return mag


def check_multi(case: Case, layout: Layout, blocks: Blocks) -> None:
    """Averaging W bodies of different ranks: sum(decode(b)) / divisor, no overflow, no bodies = 0."""
    n = layout.numel
    bodies, singles = [], []
    for r in range(case.multi):
        codec = new_codec(case, registry=False)      # every rank has its own codec (and running state)
        x = input_of(case, seed_offset=100 + r, finite=True)
        if not expected_finite(case, x):
            return
        body, info = encode(codec, x, layout, case.key + 17 * r)
        assert info.finite
        bodies.append(body)
        singles.append(decode(codec, [body], layout).double().numpy())
    mags = [grid_mag(case, b, blocks, s) for b, s in zip(bodies, singles)]
    codec = new_codec(case, registry=False)
    W = case.multi
    sent = [b.clone() for b in bodies]
    got = decode(codec, bodies, layout, divisor=W).double().numpy()
    assert all(torch.equal(a, b) for a, b in zip(sent, bodies)), "decode modified a body"
    ref = sum(singles) / W
    assert np.all(np.isfinite(got)), "the mean of finite payloads overflowed"
    tol = 8 * EPS32 * sum(mags) / W + 8 * TINY32 * W
    assert_all(np.abs(got - ref) <= tol, "decode of several bodies is not sum(decode(b)) / W", got, ref,
               names=("got", "ref"))
    div = case.divisor
    one = decode(codec, bodies[:1], layout, divisor=div).double().numpy()
    mag = mags[0] / div
    assert_all(np.abs(one - singles[0] / div) <= 4 * EPS32 * mag + 4 * TINY32, "decode with a divisor",
               one, singles[0] / div, names=("got", "ref"))
    assert bool((decode(codec, [], layout) == 0).all()), "no bodies must decode to zeros"
    # a half-precision output holds the float32 decode, rounded once (where the format can hold it)
    half = HALF_OUT[case.seed % 2]
    out = torch.full((n,), 7.0, dtype=half)
    codec.decode(bodies[:1], layout, out)
    ref = torch.from_numpy(singles[0]).float()
    fits = ref.abs() <= torch.finfo(half).max
    rel = 2.0 ** -10 if half == torch.float16 else 2.0 ** -7
    ok = (out.double() - ref.double()).abs() <= rel * ref.double().abs() + 2 * mag + float(torch.finfo(half).smallest_normal)
    assert bool((ok | ~fits).all()), f"decode into a {half} output"


# ------------------------------------------------------------------------------------------------
# the fuzz tests
# ------------------------------------------------------------------------------------------------
def fuzz_codec(name: str, examples: int = EXAMPLES) -> None:
    """``examples`` derandomized cases of the named (registered) codec through :func:`run_case`."""
    ran = [0]

    @settings(FUZZ, max_examples=examples)
    @given(case=case_strategy(name))
    def fuzz(case):
        ran[0] += 1
        run_case(case)

    fuzz()
    assert ran[0] >= examples, f"only {ran[0]} examples ran for {name}"


@pytest.mark.fuzz
@pytest.mark.parametrize("name", NAMES)
def test_fuzz_codec(name):
    fuzz_codec(name)


def test_every_codec_has_a_spec_and_strategy():
    assert set(NAMES) == set(CODECS)
    for name in NAMES:
        s = spec(name)  # tests/codec_specs/<name>.py
        assert callable(s.expected_nbytes), name
        assert s.check_levels is not None or s.cast_dtype is not None, f"{name}: no level-set check in its test spec"
        option_strategy(name)


@pytest.mark.fuzz
@settings(FUZZ, max_examples=300)
@given(name=st.sampled_from(NAMES), data=st.data())
def test_fuzz_documented_errors(name, data):
    check_documented_errors(name, data)


def check_documented_errors(name, data):
    """Bad calls get the documented ValueError: input / output sizes that differ from the layout,
    bits a codec does not accept."""
    options = data.draw(option_strategy(name))
    bits = data.draw(st.sampled_from(valid_bits(name, options)))
    bad_bits = data.draw(st.sampled_from([b for b in (0, 9, 16, 33, -1) if b not in valid_bits(name, options)]))
    with pytest.raises(ValueError):
        make_codec(name, bits=bad_bits, **options)
    codec = make_codec(name, bits=bits, **options)
    numels = data.draw(st.lists(st.integers(0, 300), min_size=1, max_size=4))
    layout = Layout(numels)
    n = layout.numel
    off = data.draw(st.sampled_from([-1, 1, 5]))
    if n + off >= 0:
        body = torch.zeros(codec.body_nbytes(layout), dtype=torch.uint8)
        with pytest.raises(ValueError, match="layout"):
            codec.encode(torch.randn(n + off), body, layout, 0)
        codec.encode(torch.randn(n), body, layout, 0)
        with pytest.raises(ValueError, match="layout"):
            codec.decode([body], layout, torch.empty(n + off))


# ------------------------------------------------------------------------------------------------
# regression tests for bugs the fuzzer found
# ------------------------------------------------------------------------------------------------
def _encode_with_error(codec, x, layout):
    body = torch.zeros(codec.body_nbytes(layout), dtype=torch.uint8)
    err = torch.empty(layout.numel)
    info = codec.encode(x, body, layout, 3, error_out=err)
    out = torch.empty(layout.numel)
    codec.decode([body], layout, out)
    return body, info, err, out


def test_qsgd_norm_of_many_large_values_does_not_overflow():
    """qsgd took a plain float32 norm whenever max |v| < 2**60; 10^5 values of 1e17 overflow that
    sum (1e39 > 3.4e38): the norm came out inf, was capped at float32 max, and the whole bucket
    decoded to 0 (with an error_out of 0 instead of x)."""
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 1e17
    layout = Layout.flat(x.numel())
    codec = make_codec("qsgd", bits=8)
    body, info, err, out = _encode_with_error(codec, x, layout)
    norm = float(x.double().norm())
    assert meta_floats(body, 2)[1] == pytest.approx(norm, rel=1e-5)
    assert int((out != 0).sum()) > 10_000   # not the all-zero decode of a grid of +-float32 max
    assert torch.equal(err, x - out) or float((err - (x - out)).abs().max()) <= 1e-6 * norm
    assert info.error_sq == pytest.approx(float((x.double() - out.double()).square().sum()), rel=1e-4, abs=0)


@pytest.mark.parametrize("name", ["uniform", "stochastic", "qsgd", "log", "mulaw"])
@pytest.mark.parametrize("block_size", [None, 50_000])
def test_error_statistics_of_large_buckets_do_not_overflow(name, block_size):
    """The squared sums in EncodeInfo were accumulated in float32 for block maxima below 1e18 whatever
    the count: 10^5 values of ~1e17 gave input_sq = inf (a finite input, an inf statistic)."""
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(1)) * 1e17
    layout = Layout.flat(x.numel())
    codec = make_codec(name, bits=4, block_size=block_size)
    _, info, err, _ = _encode_with_error(codec, x, layout)
    assert info.finite
    assert info.input_sq == pytest.approx(float(x.double().square().sum()), rel=1e-4, abs=0)
    assert info.error_sq == pytest.approx(float(err.double().square().sum()), rel=1e-4, abs=0)


@pytest.mark.parametrize("name", ["uniform", "stochastic", "qsgd", "log", "mulaw"])
def test_error_statistics_of_tiny_buckets_do_not_underflow(name):
    """uniform / stochastic / qsgd squared their values in float32 below 1e18: for a bucket of
    values ~1e-25 every square underflowed and input_sq came out 0 for a non-zero input."""
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2)) * 1e-25
    layout = Layout.flat(x.numel())
    _, info, err, _ = _encode_with_error(make_codec(name, bits=4), x, layout)
    assert info.input_sq == pytest.approx(float(x.double().square().sum()), rel=1e-4, abs=0)
    assert info.error_sq == pytest.approx(float(err.double().square().sum()), rel=1e-4, abs=0)


def test_bf16_overflow_near_float32_max_is_reported_non_finite():
    """Found by the fuzzer, documented in cast.py: finite float32 values within half a bf16 step of
    float32 max round to inf in bf16; the step is reported non-finite (as fp16 overflow is)."""
    codec = make_codec("bf16")
    layout = Layout.flat(3)
    for big, finite in ((3.3895e38, True), (float(np.finfo(np.float32).max), False), (-3.3962e38, False)):
        x = torch.tensor([1.0, big, -2.0])
        body = torch.zeros(codec.body_nbytes(layout), dtype=torch.uint8)
        err = torch.full((3,), 5.0)
        assert codec.encode(x, body, layout, 0, error_out=err).finite is finite  # (error_out: unspecified if not)
