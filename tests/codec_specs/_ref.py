"""Independent reference helpers shared by the codec test specs and tests/test_fuzz.py: the
documented block segmentation, body fields, tolerance-aware assertions (with the failing values in
the message), and the check of the min-max grid family."""
from __future__ import annotations

import functools
import importlib
from fractions import Fraction

import math

import numpy as np
import torch

EPS32 = 2.0 ** -23
TINY32 = 2.0 ** -149                      # smallest positive float32 subnormal
MIN_NORMAL32 = 2.0 ** -126
FP32_MAX = float(np.finfo(np.float32).max)


def lazy(module: str, attr: str):
    """``module.attr`` resolved at the first call (a codec's own test module holds its reference
    decoder; importing it only when a test needs it)."""
    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), attr)(*args, **kwargs)
    call.__name__ = attr
    return call


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


def nblocks(numels, options: dict, default=None) -> int:
    return len(ref_block_lengths(numels, options.get("block_size", default)))


def topk_k(options: dict, block_len: int) -> int:
    """Values kept in a block, from topk's module docstring."""
    if options.get("k") is not None:
        return min(options["k"], block_len)
    r = Fraction(repr(float(options.get("ratio") or 0.01)))
    return min(block_len, max(1, math.ceil(r * block_len)))


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


def minmax_nbytes(bits, options, numels, default_block=None) -> int:
    """uniform / stochastic / qsgd / adaptive: (lo, hi) float32 per block, then the packed codes."""
    return 8 * nblocks(numels, options, default_block) + ceil_div(sum(numels) * bits, 8)


def scaled_nbytes(bits, options, numels) -> int:
    """log / mulaw: one float32 scale per block, then the packed codes."""
    return 4 * nblocks(numels, options) + ceil_div(sum(numels) * bits, 8)


def check_minmax_grid(case, codec, x, d, body, blocks, first, *, nearest: bool, range_check=None):
    """uniform / stochastic / adaptive: values on ``lo + k (hi - lo) / (2^b - 1)``, within half a step
    (``nearest``) or one step of the input clipped to [lo, hi].  ``range_check(lo_b, hi_b)`` checks the
    range sent; default: the block's min and max."""
    meta = meta_floats(body, 2 * blocks.count).reshape(-1, 2)
    lo_b, hi_b = meta[:, 0], meta[:, 1]
    if range_check is not None:
        range_check(lo_b, hi_b)
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
    bound = step * (0.5 + 2.0 ** -9) if nearest else step * (1 + 2.0 ** -9)
    assert_all(np.abs(d - xc) <= bound + tol, "rounding error beyond " + ("half a step" if nearest else "one step"),
               d, x, step, names=("d", "x", "step"))


def minmax_ref_decode(codec: str):
    """The numpy decoder of the min-max family (tests/test_codec_qsgd.py) for ``codec``."""
    family = lazy("test_codec_qsgd", "ref_decode_minmax_family")
    return lambda body, numels, **o: family(body, numels, codec=codec, **o)


def cast_ref_decode(dtype):
    """Raw values of a cast body: float32, float16, or bfloat16 (the top 16 bits of a float32)."""
    def cast(body, param_numels, **_):
        raw = np.asarray(body, dtype=np.uint8)
        if dtype is not None:
            return np.frombuffer(raw.tobytes(), dtype=dtype).astype(np.float64)
        u16 = np.frombuffer(raw.tobytes(), dtype="<u2").astype(np.uint32) << 16
        return u16.view(np.float32).astype(np.float64)
    return cast


def check_cast(case, x_in: torch.Tensor, d, dtype):
    ref = x_in.to(dtype).double().numpy()
    exact = dtype == torch.float32
    assert_all((d == ref) & (np.signbit(d) == np.signbit(ref)) if exact else d == ref,
               f"{case.name} must decode to x cast to the format", d, ref, names=("d", "cast"))


def default_of(name: str, option: str):
    """The default of a codec's keyword option, from its signature (so a changed default needs no
    change in the tests that fill it in)."""
    import inspect

    from ddp_qhooks.codecs import CODECS
    param = inspect.signature(CODECS[name].__init__).parameters.get(option)
    return None if param is None else param.default
