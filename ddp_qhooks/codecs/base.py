"""Codec interface: a flat float tensor <-> the codec-specific body of a payload.

A codec is pure tensor code (no torch.distributed).  The hook puts a small header in front of the
body (see :mod:`ddp_qhooks.codecs.wire`) and the exchange layer moves the bytes.
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import contextlib
import math
import threading

import torch

__all__ = ["Codec", "Layout", "EncodeInfo"]


class Layout:
    """How a flat bucket is made of parameters.

    ``param_numels`` are the sizes of the parameters in bucket order and ``param_keys`` stable
    integer identities for them (their index in the model), used to key per-parameter randomness.
    A codec with a ``block_size`` cuts every parameter into its own blocks, so blocks never
    straddle two parameters and the result does not depend on how DDP grouped parameters.
    """

    def __init__(self, param_numels: Sequence[int], param_keys: Sequence[int] | None = None):
        self.param_numels = tuple(int(n) for n in param_numels)
        self.param_keys = tuple(range(len(self.param_numels))) if param_keys is None else tuple(int(k) for k in param_keys)
        if len(self.param_keys) != len(self.param_numels):
            raise ValueError("param_keys and param_numels differ in length")
        self.numel = sum(self.param_numels)
        self._blocks: dict[int | str | None, tuple[int, ...]] = {}

    @classmethod
    def flat(cls, numel: int) -> "Layout":
        return cls([numel], [0])

    def block_lengths(self, block_size: int | str | None) -> tuple[int, ...]:
        """Lengths of the quantization blocks: one per bucket (None), one per non-empty parameter
        ("layer"), or each parameter cut into blocks of ``block_size`` (see codecs/blocks.py)."""
        if block_size not in self._blocks:
            if block_size is None:
                lengths = (self.numel,) if self.numel else ()
            elif block_size == "layer":
                lengths = tuple(n for n in self.param_numels if n)
            else:
                lengths = []
                for n in self.param_numels:
                    full, rest = divmod(n, block_size)
                    lengths += [block_size] * full + ([rest] if rest else [])
                lengths = tuple(lengths)
            self._blocks[block_size] = lengths
        return self._blocks[block_size]

    def param_offsets(self) -> list[int]:
        offsets, acc = [], 0
        for n in self.param_numels:
            offsets.append(acc)
            acc += n
        return offsets

    def __eq__(self, other) -> bool:
        return isinstance(other, Layout) and (self.param_numels, self.param_keys) == (other.param_numels, other.param_keys)

    def __hash__(self) -> int:
        return hash((self.param_numels, self.param_keys))

    def __repr__(self) -> str:
        return f"Layout(numel={self.numel}, params={len(self.param_numels)})"


class EncodeInfo:
    """What an encode call learned about its input.

    ``finite`` may be given as a 0-dim bool tensor on the input's device: an encoder that decides
    finiteness there leaves it unread, the exchange copies it into the payload's header on the
    device (:attr:`finite_flag`), and reading :attr:`finite` on the host is one device read."""

    __slots__ = ("_finite", "error_sq", "input_sq")

    def __init__(self, finite: "bool | torch.Tensor" = True, error_sq: float | None = None,
                 input_sq: float | None = None):
        self._finite = finite
        self.error_sq = error_sq    # ||x - decode(encode(x))||^2, when an error buffer was given
        self.input_sq = input_sq    # ||x||^2, alongside error_sq

    @property
    def finite(self) -> bool:
        f = self._finite
        return bool(f) if isinstance(f, torch.Tensor) else f

    @property
    def finite_flag(self) -> "bool | torch.Tensor":
        """``finite`` as given: a Python bool, or a 0-dim bool tensor left on the device."""
        return self._finite

    def __eq__(self, other) -> bool:
        if not isinstance(other, EncodeInfo):
            return NotImplemented
        return (self.finite, self.error_sq, self.input_sq) == (other.finite, other.error_sq, other.input_sq)

    def __repr__(self) -> str:
        return f"EncodeInfo(finite={self._finite!r}, error_sq={self.error_sq!r}, input_sq={self.input_sq!r})"


def finite_flag(t: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor on ``t``'s device: whether every value of ``t`` is finite.  One pass and no
    temporary of ``t``'s size (``isfinite(t).all()`` makes a bool copy first): NaN propagates
    through the min and max, an infinity shows in one of them."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    return torch.isfinite(torch.stack(torch.aminmax(t))).all()


def all_finite(infos) -> "bool | torch.Tensor":
    """Whether every one of these EncodeInfos is finite, without reading device flags: a bool, or
    a 0-dim bool tensor when some flag is one (and no bool flag is False)."""
    flags = [i.finite_flag for i in infos]
    if not all(f for f in flags if not isinstance(f, torch.Tensor)):
        return False
    tensors = [f for f in flags if isinstance(f, torch.Tensor)]
    if not tensors:
        return True
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors).all()


class Codec:
    """Base class.  Subclasses set ``name`` and ``codec_id`` and implement the four methods.

    ``encode(x, body, layout, key, error_out)`` writes the body bytes for the flat float tensor
    ``x``; when ``error_out`` is given it also writes ``x - decode(body)`` there (the error-feedback
    residual, computed while the data is hot).  ``key`` is an integer that seeds stochastic codecs;
    deterministic codecs ignore it.  ``decode(bodies, layout, out, divisor)`` writes
    ``sum(decode(b) for b in bodies) / divisor`` into ``out`` (averaging W payloads in one pass).

    A non-finite input must not raise: ``encode`` returns ``EncodeInfo(finite=False)`` (or a
    device flag, see :class:`EncodeInfo`), and the hook marks the payload so every rank yields a
    non-finite result.  ``error_out`` is then unspecified: every caller stages residuals and drops
    those of a non-finite step, so an encoder need not read the flag on the host to spare it.
    """

    name: ClassVar[str] = ""
    codec_id: ClassVar[int] = -1
    stochastic: ClassVar[bool] = False
    #: body size in bytes as a formula of n (values), blocks (see blocks.py), b (bits) ..., for available()
    body_formula: ClassVar[str] = ""
    #: one-line description for available() and the README table
    summary: ClassVar[str] = ""

    # -- registry metadata: what tests, fuzzing, tools and the hook derive per codec ---------------
    # Read from the class itself (not inherited: a subclass is another codec with other options);
    # see ddp_qhooks.codecs.examples / option_space / fidelity_configs / server_codec_for.
    #: representative configurations ``(bits, options)``: every one runs through the common codec
    #: contract (tests/test_codec_family.py) and the 2-rank DDP test.  Default: the codec's default
    #: options at each width it reports (its largest and smallest accepted ``bits``).
    examples: ClassVar[tuple] = ()
    #: option name -> representative values (besides ``bits`` and ``block_size``, which the fuzzer
    #: draws for every codec that takes them); the fuzzer draws each option from its tuple.
    option_space: ClassVar[dict] = {}
    #: ``(label, bits, options)`` rows of the fidelity table (``python -m ddp_qhooks.tools.fidelity``).
    #: Default: one row per configuration of ``examples``.
    fidelity_configs: ClassVar[tuple] = ()
    #: ``(codec name, bits)`` that re-encodes the mean of a shard in the two-phase exchange, for
    #: codecs whose mean is no longer on their own grid (the mean of W signs is not a sign); None:
    #: the codec itself (or, sending 1 bit per value, ``LOW_BITS_SERVER_CODEC``).  Inherited.
    server_codec: ClassVar[tuple | None] = None

    def __init__(self, bits: int = 8, **options):
        self.bits = bits

    def config(self) -> dict:
        """Everything that must agree across ranks for payloads to be decodable."""
        return {"codec": self.name, "bits": self.bits}

    def body_nbytes(self, layout: Layout) -> int:
        raise NotImplementedError

    def encode(self, x: torch.Tensor, body: torch.Tensor, layout: Layout, key: int = 0,
               error_out: torch.Tensor | None = None) -> EncodeInfo:
        raise NotImplementedError

    def decode(self, bodies: Sequence[torch.Tensor], layout: Layout, out: torch.Tensor, divisor: int = 1) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _check_numel(what: str, t: torch.Tensor, layout: Layout) -> None:
        """``what`` ("input" / "output") must have one element per value of the layout."""
        if t.numel() != layout.numel:
            raise ValueError(f"{what} has {t.numel()} elements, layout describes {layout.numel}")

    def _error_via_decode(self, x: torch.Tensor, body: torch.Tensor, layout: Layout,
                          error_out: torch.Tensor, decoded: bool = False) -> EncodeInfo:
        """Generic ``error_out = x - decode(body)`` with the squared sums, for codecs that have no
        cheaper way to form the residual while encoding (``decoded``: ``error_out`` already holds
        ``decode(body)``)."""
        if not decoded:
            self.decode([body], layout, error_out)
        xf = x.float()
        torch.sub(xf, error_out, out=error_out)
        return EncodeInfo(True, sum_sq64(error_out.reshape(-1)), sum_sq64(xf.reshape(-1)))

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "codec")
        return f"{type(self).__name__}({opts})"


_stats = threading.local()


@contextlib.contextmanager
def error_stats(enabled: bool):
    """Within this context (on this thread), ``enabled=False`` makes the error statistics of
    ``EncodeInfo`` NaN instead of computing them: each is a device-to-host read, which the engine
    avoids when ``measure_error=False``.  The residual itself is always formed."""
    previous = getattr(_stats, "off", False)
    _stats.off = not enabled
    try:
        yield
    finally:
        _stats.off = previous


def _stats_off() -> bool:
    return getattr(_stats, "off", False)


_READ_FREE = {"everywhere": False}


def reads_on_host(device: torch.device) -> bool:
    """Whether a codec may read a small value on the host to choose its arithmetic (float32 or a
    float64 fallback) or to learn finiteness early.  On the CPU a read is free and picks the fast
    path; on an accelerator it would wait for the device (a host sync per call), so codecs that
    implement a read-free path take it there: float64 arithmetic for every grid, finiteness left
    on the device.  :func:`read_free` makes the CPU take that path too, which is how CPU tests
    prove the accelerator path's properties."""
    return device.type == "cpu" and not _READ_FREE["everywhere"]


@contextlib.contextmanager
def read_free(enabled: bool = True):
    """Within this context (process-wide: the engine encodes on the caller's thread and decodes on
    its completion thread), codecs take their read-free path on the CPU as on accelerators."""
    previous = _READ_FREE["everywhere"]
    _READ_FREE["everywhere"] = enabled
    try:
        yield
    finally:
        _READ_FREE["everywhere"] = previous


SQ_LIMIT = 2.0 ** 120  # magnitude**2 * count at or above this: a float32 sum of squares may overflow (max 2**128)
SQ_TINY = 1e-18  # non-zero magnitudes below this: float32 squares underflow
SQ_PIECE = 1 << 17


def sum_sq(t: torch.Tensor, magnitude: float) -> float:
    """Sum of squares of values of at most ``magnitude`` (for error statistics), in float64 where
    the float32 sum could overflow (it grows with the count: 1e5 values of 1e17 already do) or the
    squares underflow."""
    if _stats_off():
        return math.nan
    if t.dtype != torch.float32 or magnitude * magnitude * t.numel() >= SQ_LIMIT or 0 < magnitude < SQ_TINY:
        t = t.double()
    return float(torch.dot(t, t))


def sum_sq_checked(t: torch.Tensor) -> float:
    """Sum of squares when no bound on the magnitudes is at hand: float32 first (fast), again in
    float64 when that overflowed or may have underflowed."""
    if _stats_off():
        return math.nan
    if t.dtype == torch.float32:
        # float32 dots over pieces of SQ_PIECE values, summed in float64: a single float32 dot over
        # millions of values drifts by ~1e-3 relative
        total = sum(float(torch.dot(c, c)) for c in t.split(SQ_PIECE)) if t.numel() > SQ_PIECE else float(torch.dot(t, t))
        if math.isfinite(total) and total > SQ_TINY:
            return total
        if total == 0 and t.numel():
            lo, hi = torch.aminmax(t)
            if float(lo) == 0 == float(hi):  # truly zero (the residual of an exact codec), not underflow
                return 0.0
    t = t.double()
    return float(torch.dot(t, t))


def sum_sq64(t: torch.Tensor) -> float:
    """Sum of squares in float64 (exact squares of float32 values, no overflow or underflow), one
    cache-sized piece at a time: a bucket-sized float64 copy cost ~10x more."""
    if _stats_off():
        return math.nan
    return sum(float(torch.dot(c, c)) for c in (p.double() for p in t.split(SQ_PIECE)))
