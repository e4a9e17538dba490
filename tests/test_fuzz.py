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

Properties, checked against the formats documented in each codec module (never by calling the
codec's own helpers):

* building a codec from a valid configuration and encoding any input never raise; ``body_nbytes``
  equals the documented body formula;
* ``EncodeInfo.finite`` is False exactly when the input (for the casts: the input cast to the
  format) holds a NaN or an infinity; then ``error_out`` is left untouched;
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

import functools
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddp_qhooks.codecs import CODECS, EncodeInfo, Layout, codec_options, make_codec

EPS32 = 2.0 ** -23
TINY32 = 2.0 ** -149                      # smallest positive float32 subnormal
MIN_NORMAL32 = 2.0 ** -126
FP32_MAX = float(np.finfo(np.float32).max)
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
CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16, "none": torch.float32}
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
ROUNDING = {"log": ("nearest", "stochastic"), "mulaw": ("nearest", "stochastic")}


def option_strategy(name: str) -> st.SearchStrategy:
    """Options of the named codec (besides bits), as documented in its module."""
    if name in ("uniform", "stochastic", "qsgd"):
        return st.fixed_dictionaries({"block_size": BLOCK_SIZES})
    if name in ("log", "mulaw"):
        opts = {"block_size": BLOCK_SIZES, "rounding": st.sampled_from(ROUNDING[name])}
        if name == "mulaw":
            opts["mu"] = st.sampled_from([255.0, 1e-30, 0.5, 1.0, 10.0, 1e6, 1e30])
        return st.fixed_dictionaries(opts)
    if name == "kmeans":
        return st.fixed_dictionaries({"block_size": BLOCK_SIZES, "sample": st.sampled_from([65536, 1, 5, 100, 4096]),
                                      "iterations": st.sampled_from([8, 1, 3]),
                                      "refresh_every": st.sampled_from([10, 1, 2])})
    if name == "adaptive":
        return st.fixed_dictionaries({
            "block_size": BLOCK_SIZES, "stat": st.sampled_from(["minmax", "percentile"]),
            "percentile": st.sampled_from([99.9, 50.0, 100.0, 1e-3]), "momentum": st.sampled_from([0.9, 0.0, 0.5]),
            "decay": st.sampled_from([None, 0.5, 0.99]), "grid": st.sampled_from(["stochastic", "uniform"]),
            "sample": st.sampled_from([65536, 1, 10, 1000])})
    if name == "ternary":
        return st.fixed_dictionaries({"block_size": BLOCK_SIZES, "rounding": st.sampled_from(["stochastic", "threshold"]),
                                      "threshold": st.sampled_from([0.7, 1e-3, 1.0, 3.0, 1e30]),
                                      "packing": st.sampled_from(["2bit", "base3"])})
    if name == "sign":
        return st.fixed_dictionaries({"block_size": BLOCK_SIZES, "mode": st.sampled_from(["scaled", "stochastic"])})
    if name == "topk":
        return _topk_options()
    assert name in CASTS, f"no option strategy for codec {name!r}: add one"
    return st.just({})


_TOPK_HOW = st.sampled_from(["default", "ratio", "k"])
_TOPK_RATIO = st.sampled_from([0.07, 0.5, 1.0, 1e-9, 0.3333])
_TOPK_K = st.sampled_from([1, 2, 3, 100])
_TOPK_VALUES = st.sampled_from(["fp32", "fp32", "fp32"] + sorted(n for n in CODECS if n != "topk"))
_TOPK_VALUE_BS = st.sampled_from(["layer", 1, 5, 64])


@st.composite
def _topk_options(draw):
    opts = {"block_size": draw(BLOCK_SIZES)}
    how = draw(_TOPK_HOW)
    if how == "ratio":
        opts["ratio"] = draw(_TOPK_RATIO)
    elif how == "k":
        opts["k"] = draw(_TOPK_K)
    values = draw(_TOPK_VALUES)
    opts["values"] = values
    if values != "fp32" and "block_size" in codec_options(values) and draw(st.booleans()):
        # (a kmeans codebook per tiny block of kept values would cost seconds per example)
        opts["value_block_size"] = "layer" if values == "kmeans" else draw(_TOPK_VALUE_BS)
    return opts


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
    if tier == "large" and name in ("kmeans", "adaptive", "topk"):
        tier = "medium"
    return draw(_TIERS[tier])


_CUTS = st.lists(st.integers(0, 2 ** 20), max_size=4)
_SCALE_EXP = st.one_of(st.sampled_from([0, -149, -140, -126, -100, -60, -20, 20, 60, 100, 120, 126, 127]),
                       st.integers(-149, 127), st.integers(-10, 10))
_SPECIAL_LIST = st.lists(st.tuples(st.sampled_from(FINITE_SPECIALS * 2 + ["inf", "-inf", "nan"]), st.integers(1, 3),
                                   st.sampled_from(["random", "first", "last"])), max_size=4)
_DTYPE = st.sampled_from(["float32"] * 5 + ["float16", "bfloat16", "float64"])
_OPTIONS = {}
_NUMELS = {name: numel_strategy(name) for name in NAMES}
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
    options = dict(draw(_OPTIONS[name]))
    bits = draw(bits_strategy(name, options))
    numel = draw(_NUMELS[name])
    # the layout: parameter sizes summing to numel (empty parameters included)
    cuts = sorted(c % (numel + 1) for c in draw(_CUTS))
    edges = [0] + cuts + [numel]
    numels = [b - a for a, b in zip(edges[:-1], edges[1:])]
    keys = [1000 + 7 * i for i in range(len(numels))] if draw(st.booleans()) else None
    bs = options.get("block_size")
    if name == "kmeans" and isinstance(bs, int):
        # a codebook of 2^bits floats per block: keep kmeans to <= 512 blocks per bucket
        options["block_size"] = max(bs, -(-max(numels) // 64), -(-numel // 512))
    dtype = draw(_DTYPE)
    recipe = draw(_RECIPE)
    scale_exp = draw(_SCALE_EXP)
    specials = draw(_SPECIAL_LIST) if draw(_ONE_IN_3) == 0 else []
    steps = 2 if name in ("kmeans", "adaptive") and numel <= 5000 and draw(st.booleans()) else 1
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


# ------------------------------------------------------------------------------------------------
# independent helpers
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _block_lengths(numels: tuple, block_size) -> np.ndarray:
    """The documented blocks (blocks.py): one per bucket (None), one per non-empty parameter
    ("layer"), or every parameter cut into blocks of ``block_size`` (the last one may be shorter)."""
    if block_size is None:
        return np.array([sum(numels)] if sum(numels) else [], dtype=np.int64)
    if block_size == "layer":
        return np.array([n for n in numels if n], dtype=np.int64)
    parts = []
    for n in numels:
        full, rest = divmod(n, block_size)
        parts.append(np.full(full, block_size, dtype=np.int64))
        if rest:
            parts.append(np.array([rest], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def ref_block_lengths(numels, block_size) -> np.ndarray:
    return _block_lengths(tuple(numels), block_size)


class Blocks:
    """The documented block segmentation (blocks.py)."""

    def __init__(self, numels, block_size):
        self.lengths = ref_block_lengths(numels, block_size)
        self.count = self.lengths.size
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64) if self.count else \
            np.zeros(0, dtype=np.int64)
        self.ids = np.repeat(np.arange(self.count), self.lengths)

    def reduce(self, ufunc, a: np.ndarray) -> np.ndarray:
        return ufunc.reduceat(a, self.starts) if self.count else np.zeros(0, dtype=a.dtype)

    def expand(self, per_block: np.ndarray) -> np.ndarray:
        return per_block[self.ids]

    def rows(self):
        """(start, nblocks, block_len, first block) of runs of equal-length consecutive blocks."""
        if not self.count:
            return []
        first = np.concatenate([[0], np.flatnonzero(np.diff(self.lengths)) + 1])
        nbs = np.diff(np.concatenate([first, [self.count]]))
        return [(int(self.starts[f]), int(nb), int(self.lengths[f]), int(f)) for f, nb in zip(first, nbs)]


def meta_floats(body: torch.Tensor, count: int) -> np.ndarray:
    """The first ``count`` little-endian float32 of a body, as float64."""
    return np.frombuffer(body[:4 * count].numpy().tobytes(), dtype="<f4").astype(np.float64)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def topk_k(options: dict, block_len: int) -> int:
    """Values kept in a block, from the module docstring."""
    if options.get("k") is not None:
        return min(options["k"], block_len)
    r = Fraction(repr(float(options.get("ratio") or 0.01)))
    return min(block_len, max(1, math.ceil(r * block_len)))


# each codec's default block_size (codec modules; issue 21: blocks of 256 values for the scaled codecs)
DEFAULT_BLOCK_SIZE = {"adaptive": "layer", "kmeans": "layer", "qsgd": None, "topk": None}


def default_block_size(name: str):
    return DEFAULT_BLOCK_SIZE.get(name, 256)


def expected_nbytes(name: str, bits: int, options: dict, numels) -> int:
    """Body bytes from the formulas in the codec modules' docstrings."""
    n = sum(numels)
    nb = len(ref_block_lengths(numels, options.get("block_size", default_block_size(name))))
    packed = ceil_div(n * bits, 8)
    if name in ("uniform", "stochastic", "qsgd", "adaptive"):
        return 8 * nb + packed
    if name in ("log", "mulaw"):
        return 4 * nb + packed
    if name == "kmeans":
        return 4 * nb * 2 ** bits + packed
    if name == "ternary":
        return 4 * nb + (ceil_div(n, 4) if options.get("packing", "2bit") == "2bit" else ceil_div(n, 5))
    if name == "sign":
        return 4 * nb + ceil_div(n, 8)
    if name in ("fp16", "bf16"):
        return 2 * n
    if name == "none":
        return 4 * n
    assert name == "topk"
    per_width: dict[int, int] = {}
    blens, counts = np.unique(ref_block_lengths(numels, options.get("block_size", default_block_size(name))),
                              return_counts=True)
    for blen, count in zip(blens.tolist(), counts.tolist()):
        w = math.ceil(math.log2(blen)) if blen > 1 else 0
        per_width[w] = per_width.get(w, 0) + count * topk_k(options, blen)
    index = sum(ceil_div(n_w * min(8, w - f), 8) for w, n_w in per_width.items() if w for f in range(0, w, 8))
    kept = sum(per_width.values())
    values = options.get("values", "fp32")
    if values == "fp32":
        return index + 4 * kept
    vopts = {} if options.get("value_block_size") is None else {"block_size": options["value_block_size"]}
    return index + expected_nbytes(values, make_codec(values, bits, **vopts).bits, vopts, [kept])


def expected_finite(case: Case, x: torch.Tensor) -> bool:
    """Documented: NaN/Inf anywhere is reported; the casts report values the format cannot hold
    (fp16 above 65504), as does topk whose fp16/bf16 value codec must send each block's max |x|."""
    x32 = x.float()
    if x32.numel() == 0:
        return True
    if not bool(torch.isfinite(x32).all()):
        return False
    fmt = CASTS.get(case.name)
    if case.name == "topk" and case.options.get("values") in ("fp16", "bf16"):
        fmt = CASTS[case.options["values"]]
    if fmt is not None:
        cast = x.to(fmt) if case.name in CASTS else x32.abs().max().to(fmt)
        return bool(torch.isfinite(cast).all())
    return True


def levels_ok(d, lo, step, levels, tol) -> np.ndarray:
    """Is ``d`` within ``tol`` of ``lo + k * step`` for an integer k in 0..levels?"""
    with np.errstate(invalid="ignore", divide="ignore"):
        k = np.where(step > 0, np.rint((d - lo) / np.where(step > 0, step, 1.0)), 0.0)
    k = np.clip(k, 0, levels)
    return np.abs(d - (lo + k * step)) <= tol


def assert_equal(got: np.ndarray, want: np.ndarray, what: str):
    assert_all(np.asarray(got == want), what, got, want, names=("got", "want"))


def assert_close(got, want, rtol: float, atol: float, what: str):
    got, want = np.atleast_1d(np.asarray(got, dtype=np.float64)), np.atleast_1d(np.asarray(want, dtype=np.float64))
    assert_all(np.asarray(np.abs(got - want) <= rtol * np.abs(want) + atol), what, got, want, names=("got", "want"))


def assert_all(mask: np.ndarray, what: str, *arrays, names=()):
    if mask.all():
        return
    bad = np.flatnonzero(~mask)[:5]
    detail = "; ".join(f"{nm}={np.asarray(a)[bad].tolist()}" for nm, a in zip(names, arrays))
    raise AssertionError(f"{what}: {int((~mask).sum())} of {mask.size} values fail, e.g. at {bad.tolist()}: {detail}")


# ------------------------------------------------------------------------------------------------
# per-codec level-set / rounding checks (x: float32 input as float64, d: decoded as float64)
# ------------------------------------------------------------------------------------------------
def check_uniform(case, codec, x, d, body, blocks, first):
    meta = meta_floats(body, 2 * blocks.count).reshape(-1, 2)
    lo_b, hi_b = meta[:, 0], meta[:, 1]
    if case.name == "qsgd":
        check_qsgd(case, codec, x, d, blocks, lo_b, hi_b)
        return
    if case.name == "adaptive":
        check_adaptive_range(case, codec, x, blocks, lo_b, hi_b, first)
    else:  # documented: the grid spans the block's min and max
        assert_equal(lo_b, blocks.reduce(np.minimum, x), "lo must be the block min")
        assert_equal(hi_b, blocks.reduce(np.maximum, x), "hi must be the block max")
    L = (1 << case.bits) - 1
    lo, hi = blocks.expand(lo_b), blocks.expand(hi_b)
    step = (hi - lo) / L
    mag = np.maximum(np.abs(lo), np.abs(hi))
    tol = 1e-5 * step + 4 * EPS32 * mag + 4 * TINY32
    assert_all(levels_ok(d, lo, step, L, tol), "decoded value off the grid lo + k (hi - lo) / L",
               d, lo, hi, x, names=("d", "lo", "hi", "x"))
    assert_all((d >= lo - tol) & (d <= hi + tol), "decoded value outside [lo, hi]", d, lo, hi, names=("d", "lo", "hi"))
    assert_all(np.where(step == 0, d == lo, True), "a constant block must decode exactly", d, lo, names=("d", "lo"))
    xc = np.clip(x, lo, hi)  # adaptive clips to its range; the others' range holds every value
    nearest = case.name == "uniform" or (case.name == "adaptive" and case.options.get("grid") == "uniform")
    bound = step * (0.5 + 2.0 ** -9) if nearest else step * (1 + 2.0 ** -9)
    assert_all(np.abs(d - xc) <= bound + tol, "rounding error beyond " + ("half a step" if nearest else "one step"),
               d, x, step, names=("d", "x", "step"))


def check_qsgd(case, codec, x, d, blocks, lo_b, hi_b):
    assert_equal(lo_b, -hi_b, "qsgd sends lo = -||v||")
    norm = np.sqrt(blocks.reduce(np.add, x * x)) if blocks.count else np.zeros(0)
    amax = blocks.reduce(np.maximum, np.abs(x))
    ref = np.minimum(np.maximum(norm, amax), FP32_MAX)
    assert np.all(hi_b >= amax), "the norm must never come out below max |v|"
    assert np.all(hi_b <= FP32_MAX)
    # a float32 sum of squares: relative error up to (block length) * 2**-24 in the worst case
    rtol = 1e-6 + blocks.lengths * 2.0 ** -24
    assert_all(np.abs(hi_b - ref) <= rtol * ref + 4 * TINY32, "block norm", hi_b, ref, names=("sent", "norm"))
    s = (1 << (case.bits - 1)) - 1
    N = blocks.expand(hi_b)
    step = N / s
    tol = 1e-5 * step + 4 * EPS32 * N + 4 * TINY32
    assert_all(levels_ok(d, -N, step, 2 * s, tol), "decoded value off the grid l ||v|| / s", d, N, x,
               names=("d", "N", "x"))
    # the sign is kept, except that the float32 round-off of the code position (documented in
    # uniform.py: a few 2**-21 of the L = 2s levels) may send a value that close to 0 to -+1 level
    near_zero = (np.abs(x) <= 2.0 ** -18 * N) & (np.abs(d) <= step + tol)
    assert_all((d * x >= -tol * np.abs(x)) | near_zero, "qsgd flipped a sign", d, x, N, names=("d", "x", "N"))
    assert_all(np.abs(d - x) <= step * (1 + 2.0 ** -9) + tol, "qsgd rounding beyond one level", d, x, step,
               names=("d", "x", "step"))


def _percentile_obs(case, xv: np.ndarray) -> np.ndarray:
    """The documented percentile observation of each row (block) of ``xv`` (nblocks, length)."""
    p, sample = case.options.get("percentile", 99.9), case.options.get("sample", 65536)
    a = np.abs(xv)
    if p == 100:
        return a.max(1)
    n = a.shape[1]
    S = min(sample, n)
    smp = a if n <= sample else a[:, np.arange(S, dtype=np.int64) * n // S]
    k = min(max(1, math.ceil(p * S / 100)), S)
    return np.partition(smp, k - 1, axis=1)[:, k - 1]


def check_adaptive_range(case, codec, x, blocks, lo_b, hi_b, first):
    """The range sent is the running statistic of the documented update rule, rounded to float32."""
    stat = case.options.get("stat", "minmax")
    if stat == "minmax":
        obs = np.stack([blocks.reduce(np.minimum, x), blocks.reduce(np.maximum, x)], 1)
    else:
        obs = np.zeros((blocks.count, 1))
        for start, nb, blen, first_block in blocks.rows():
            obs[first_block:first_block + nb, 0] = _percentile_obs(case, x[start:start + nb * blen].reshape(nb, blen))
    prev = case.extra.get("adaptive_prev")
    if first or prev is None:
        run = obs
    elif case.options.get("decay") is None:
        m = case.options.get("momentum", 0.9)
        run = prev * m + obs * (1 - m)
    else:
        dcy = case.options["decay"]
        if stat == "minmax":
            run = np.stack([np.minimum(obs[:, 0], prev[:, 0] * dcy), np.maximum(obs[:, 1], prev[:, 1] * dcy)], 1)
        else:
            run = np.maximum(obs, prev * dcy)
    case.extra["adaptive_prev"] = run
    lohi = run if stat == "minmax" else np.concatenate([-run, run], 1)
    want = lohi.astype(np.float32).astype(np.float64)
    assert_close(lo_b, want[:, 0], rtol=2 * EPS32, atol=0, what="adaptive lo")
    assert_close(hi_b, want[:, 1], rtol=2 * EPS32, atol=0, what="adaptive hi")


def _signed_levels_below_block_max(name, x, d, body, blocks):
    """log / mulaw: the block scale is max |x|; 0 stays 0, signs are kept, |d| <= the scale.
    Returns (per-value scale, |d|, |x|)."""
    m_b = meta_floats(body, blocks.count)
    assert_equal(m_b, blocks.reduce(np.maximum, np.abs(x)), f"{name} scale must be max |x|")
    m = blocks.expand(m_b)
    ad, ax = np.abs(d), np.abs(x)
    assert_all(np.where(x == 0, d == 0, True), "zero must decode to 0", d, x, names=("d", "x"))
    assert_all((d == 0) | (np.sign(d) == np.sign(x)), f"{name} flipped a sign", d, x, names=("d", "x"))
    assert_all(ad <= m, "|decoded| above the block max", d, m, names=("d", "m"))
    return m, ad, ax


def check_log(case, codec, x, d, body, blocks):
    M = (1 << (case.bits - 1)) - 1
    m, ad, ax = _signed_levels_below_block_max("log", x, d, body, blocks)
    # |d| is one of m * 2**-j, j = 0..M-1 (rounded to float32), or 0
    with np.errstate(divide="ignore", invalid="ignore"):
        j = np.clip(np.rint(np.log2(np.where(ad > 0, m / ad, 1.0))), 0, M - 1)
    level = np.ldexp(m, -j.astype(np.int64))
    assert_all((ad == 0) | (np.abs(ad - level) <= 2 * EPS32 * level + TINY32), "not a power-of-two level",
               d, m, names=("d", "m"))
    s = np.ldexp(m, 1 - M)  # smallest level
    slack = 1 + 2.0 ** -20
    if case.options.get("rounding", "stochastic") == "nearest":
        ok = np.where(ax >= s, np.abs(ad - ax) <= ax / 3 * slack + TINY32,
                      np.abs(ad - ax) <= s / 2 * slack + TINY32)
        assert_all(ok, "nearest log rounding error beyond the documented bound", d, x, m, names=("d", "x", "m"))
    else:  # between the two neighbouring levels
        ok = np.where(ax >= s, (ad <= 2 * ax * slack + TINY32) & (ad >= ax / 2 / slack - TINY32),
                      (ad == 0) | (np.abs(ad - s) <= 2 * EPS32 * s + TINY32))
        assert_all(ok, "stochastic log value not a neighbouring level", d, x, m, names=("d", "x", "m"))


def check_mulaw(case, codec, x, d, body, blocks):
    K = (1 << (case.bits - 1)) - 1
    mu = float(case.options.get("mu", 255.0))
    l1p = math.log1p(mu)
    m, ad, ax = _signed_levels_below_block_max("mulaw", x, d, body, blocks)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(m > 0, ax / np.where(m > 0, m, 1.0), 0.0)
    t = K * np.log1p(mu * r) / l1p            # K |y| in float64
    reach = 0.5 if case.options.get("rounding", "nearest") == "nearest" else 1.0
    found = np.zeros(d.size, dtype=bool)
    for dq in (-1, 0, 1, 2):
        q = np.clip(np.floor(t) + dq, 0, K)
        val = np.expm1(q / K * l1p) / mu
        val = np.where(q == K, 1.0, val)
        level = m * val
        found |= (np.abs(q - t) <= reach + 1e-3) & (np.abs(ad - level) <= 2 * EPS32 * level + 2 * TINY32)
    assert_all(found, "mulaw value not a (neighbouring) companded level", d, x, m, t, names=("d", "x", "m", "K|y|"))


def _rows_member(levels: torch.Tensor, values: torch.Tensor):
    """Per row: nearest level index, and distance of ``values`` to the nearest level."""
    idx = torch.searchsorted(levels, values).clamp_(0, levels.shape[1] - 1)
    below = (idx - 1).clamp_(min=0)
    a, b = levels.gather(1, below), levels.gather(1, idx)
    return torch.minimum((values - a).abs(), (values - b).abs())


def check_kmeans(case, codec, x, d, body, blocks, first):
    K = 1 << case.bits
    cb = meta_floats(body, K * blocks.count).reshape(-1, K)
    assert np.all(np.diff(cb, axis=1) >= 0), "codebooks must be sorted"
    m_b = blocks.reduce(np.maximum, np.abs(x))
    assert np.all(np.abs(cb) <= m_b[:, None]), "codebook level beyond the block max |x|"
    if first:  # a fresh fit: levels are means of (sub)sample values, within the block's range
        lo, hi, tol = blocks.reduce(np.minimum, x), blocks.reduce(np.maximum, x), 4 * EPS32 * m_b + TINY32
        assert np.all((cb >= (lo - tol)[:, None]) & (cb <= (hi + tol)[:, None])), "level outside [min, max]"
    for start, nb, blen, first_block in blocks.rows():
        sl = slice(start, start + nb * blen)
        levels = torch.from_numpy(cb[first_block:first_block + nb])
        dv = torch.from_numpy(d[sl]).view(nb, blen)
        xv = torch.from_numpy(x[sl]).view(nb, blen)
        assert bool((_rows_member(levels, dv) == 0).all()), "decoded value not in its block's codebook"
        mb = torch.from_numpy(m_b[first_block:first_block + nb])[:, None]
        gap = (xv - dv).abs() - _rows_member(levels, xv)
        assert bool((gap <= 4 * EPS32 * mb + TINY32).all()), "a value did not get its nearest level"
        if first and blen <= case.options.get("sample", 65536):
            # at most K distinct values in the (whole-block) sample: they are the codebook
            for i in range(nb):
                xb = xv[i]
                if torch.unique(xb).numel() <= K:
                    tol = 2.0 ** -22 * xb.abs() + 2 * TINY32 * max(float(mb[i]), 1.0)
                    assert bool(((dv[i] - xb).abs() <= tol).all()), "a block of <= K distinct values must be exact"


def check_ternary(case, codec, x, d, body, blocks):
    a_b = meta_floats(body, blocks.count)
    a = blocks.expand(a_b)
    ax = np.abs(x)
    assert_all((d == 0) | (d == a) | (d == -a), "ternary value not in {-a, 0, +a}", d, a, names=("d", "a"))
    assert_all((d == 0) | (np.sign(d) == np.sign(x)), "ternary flipped a sign", d, x, names=("d", "x"))
    assert_all(np.where(x == 0, d == 0, True), "zero must decode to 0", d, x, names=("d", "x"))
    if case.options.get("rounding", "stochastic") == "stochastic":
        assert_equal(a_b, blocks.reduce(np.maximum, ax), "ternary scale must be max |x|")
        assert_all(np.where((ax == a) & (a > 0), d == np.sign(x) * a, True), "the block max must be kept",
                   d, x, names=("d", "x"))
        return
    delta = blocks.reduce(np.add, ax) / blocks.lengths * case.options.get("threshold", 0.7) if blocks.count else \
        np.zeros(0)
    de = blocks.expand(delta)
    unsure = np.abs(ax - de) <= 1e-10 * de
    kept = ax > de
    assert_all(unsure | ((d != 0) == (kept & (a > 0))), "threshold selection differs from |x| > delta",
               d, x, de, names=("d", "x", "delta"))
    if not unsure.any():
        cnt = blocks.reduce(np.add, kept.astype(np.float64))
        tot = blocks.reduce(np.add, np.where(kept, ax, 0.0))
        with np.errstate(invalid="ignore"):
            ref = np.where(cnt > 0, tot / np.maximum(cnt, 1), 0.0)
        assert_close(a_b, ref, rtol=2.0 ** -22, atol=TINY32, what="threshold scale = mean kept |x|")


def check_sign(case, codec, x, d, body, blocks):
    a_b = meta_floats(body, blocks.count)
    a = blocks.expand(a_b)
    if case.options.get("mode", "scaled") == "scaled":
        ref = (blocks.reduce(np.add, np.abs(x)) / blocks.lengths).astype(np.float32).astype(np.float64) \
            if blocks.count else np.zeros(0)
        assert_close(a_b, ref, rtol=2.0 ** -22, atol=TINY32, what="sign scale = mean |x|")
        assert_all(d == np.where(x < 0, -a, a), "sign: +a for x >= 0 (and -0.0), -a for x < 0", d, x, a,
                   names=("d", "x", "a"))
        return
    assert_equal(a_b, blocks.reduce(np.maximum, np.abs(x)), "stochastic sign scale = max |x|")
    assert_all((d == a) | (d == -a), "sign value not +-a", d, a, names=("d", "a"))
    assert_all(np.where((np.abs(x) == a) & (a > 0), d == np.sign(x) * a, True), "the extremes keep their sign",
               d, x, names=("d", "x"))


def check_topk(case, codec, x, d, blocks):
    ax = np.abs(x)
    fp32 = case.options.get("values", "fp32") == "fp32"
    for start, nb, blen, _ in blocks.rows():
        sl = slice(start, start + nb * blen)
        k = topk_k(case.options, blen)
        xv, dv, av = x[sl].reshape(nb, blen), d[sl].reshape(nb, blen), ax[sl].reshape(nb, blen)
        nz = dv != 0
        cnt = nz.sum(1)
        assert np.all(cnt <= k), f"more than k={k} values sent in a block"
        # a value is sent only if its |x| is among the k largest of its block
        kth = np.partition(av, blen - k, axis=1)[:, blen - k]
        assert np.all(np.where(nz, av >= kth[:, None], True)), "a value outside the top-k was sent"
        if fp32:
            assert np.all((dv == 0) | (dv == xv)), "kept fp32 values must be exact"
            assert np.all(cnt == np.minimum(k, (xv != 0).sum(1))), "exactly k values (or every non-zero) kept"


def check_cast(case, x_in: torch.Tensor, d):
    ref = x_in.to(CASTS[case.name]).double().numpy()
    assert_all((d == ref) & (np.signbit(d) == np.signbit(ref)) if case.name == "none" else d == ref,
               f"{case.name} must decode to x cast to the format", d, ref, names=("d", "cast"))


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
    name = case.name
    if name in ("uniform", "stochastic", "qsgd", "adaptive"):
        check_uniform(case, codec, x32, d, body, blocks, first)
    elif name == "log":
        check_log(case, codec, x32, d, body, blocks)
    elif name == "mulaw":
        check_mulaw(case, codec, x32, d, body, blocks)
    elif name == "kmeans":
        check_kmeans(case, codec, x32, d, body, blocks, first)
    elif name == "ternary":
        check_ternary(case, codec, x32, d, body, blocks)
    elif name == "sign":
        check_sign(case, codec, x32, d, body, blocks)
    elif name == "topk":
        check_topk(case, codec, x32, d, blocks)
    else:
        raise AssertionError(f"no level-set check for codec {name!r}: add one")


def run_case(case: Case) -> None:
    codec = new_codec(case)           # valid configurations never raise
    layout = Layout(case.numels, case.keys)
    n = layout.numel
    nbytes = codec.body_nbytes(layout)
    assert nbytes == expected_nbytes(case.name, codec.bits, case.options, case.numels), "body_nbytes formula"
    blocks = Blocks(case.numels, case.options.get("block_size", default_block_size(case.name)))
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
            if err is not None:
                assert torch.equal(err, sentinel), "error_out must be left untouched for a non-finite input"
            return  # (a non-finite step leaves the running state of the stateful codecs as it was)
        out = decode(codec, [body], layout)
        d = out.double().numpy()
        x32 = x.float().double().numpy()
        assert np.all(np.isfinite(d)), "a finite input decoded to a non-finite value"
        if case.name in CASTS:
            check_cast(case, x, d)
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
    if case.name in ("uniform", "stochastic", "qsgd", "adaptive") and blocks.count:
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
@pytest.mark.fuzz
@pytest.mark.parametrize("name", NAMES)
def test_fuzz_codec(name):
    ran = [0]

    @FUZZ
    @given(case=case_strategy(name))
    def fuzz(case):
        ran[0] += 1
        run_case(case)

    fuzz()
    assert ran[0] >= EXAMPLES, f"only {ran[0]} examples ran for {name}"


def test_every_codec_has_a_strategy():
    assert set(NAMES) == set(CODECS)
    for name in NAMES:
        option_strategy(name)


@pytest.mark.fuzz
@settings(FUZZ, max_examples=300)
@given(name=st.sampled_from(NAMES), data=st.data())
def test_fuzz_documented_errors(name, data):
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
        assert codec.encode(x, body, layout, 0, error_out=err).finite is finite
        assert finite or bool((err == 5.0).all())
