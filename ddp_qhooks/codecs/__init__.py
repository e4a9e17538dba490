"""Codecs: pure tensor -> payload body -> tensor.  No torch.distributed in this package.

Add a codec: one new module with a :class:`~ddp_qhooks.codecs.base.Codec` subclass (its metadata
included: ``summary``, ``body_formula``, ``examples``, ``option_space``, ``fidelity_configs``,
``server_codec``), one line in ``CODECS`` below, and its test spec ``tests/codec_specs/<name>.py``.
Tests, fuzzing, the micro-benchmark, the fidelity table, the docs table and the two-phase
exchange's server-codec policy derive from the registry and that metadata (docs/adding_a_codec.md).
Codecs defined elsewhere (plugins, tests) join at runtime with :func:`register_codec`.
"""
from __future__ import annotations

import inspect

from .adaptive import AdaptiveCodec
from .base import Codec, EncodeInfo, Layout
from .cast import Bf16Codec, Fp16Codec, NoneCodec
from .kmeans import KMeansCodec
from .log import LogCodec
from .mulaw import MuLawCodec
from .packing import VALID_BITS, pack_codes, packed_nbytes, unpack_codes
from .qsgd import QsgdCodec
from .sign import SignCodec
from .ternary import TernaryCodec
from .topk import TopKCodec
from .uniform import StochasticCodec, UniformCodec

CODECS: dict[str, type[Codec]] = {
    "stochastic": StochasticCodec,
    "uniform": UniformCodec,
    "qsgd": QsgdCodec,
    "log": LogCodec,
    "mulaw": MuLawCodec,
    "kmeans": KMeansCodec,
    "ternary": TernaryCodec,
    "sign": SignCodec,
    "adaptive": AdaptiveCodec,
    "topk": TopKCodec,
    "fp16": Fp16Codec,
    "bf16": Bf16Codec,
    "none": NoneCodec,
}

CODECS_BY_ID = {cls.codec_id: cls for cls in CODECS.values()}
assert len(CODECS_BY_ID) == len(CODECS), "codec ids must be unique"

#: ``(codec, bits)`` that re-encodes the shard means of a codec sending 1 bit per value in the
#: two-phase exchange (unless the codec's ``server_codec`` names another): the deterministic,
#: contractive uniform grid at 2 bits
LOW_BITS_SERVER_CODEC = ("uniform", 2)


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Add a codec class to the registry at runtime (usable as a class decorator): ``make_codec``,
    ``available()``, the hook and the tools then know it by ``cls.name``.  Built-in codecs are the
    lines of ``CODECS`` instead.  The name and the one-byte ``codec_id`` (in every payload header)
    must be new; ``summary`` and ``body_formula`` must be set (the docs table shows them)."""
    if not (isinstance(cls, type) and issubclass(cls, Codec)):
        raise TypeError(f"register_codec takes a Codec subclass, got {cls!r}")
    if not isinstance(cls.name, str) or not cls.name.isidentifier():
        raise ValueError(f"codec name must be an identifier, got {cls.name!r}")
    if cls.name in CODECS:
        raise ValueError(f"codec {cls.name!r} is already registered ({CODECS[cls.name].__name__}); "
                         "unregister_codec() it first")
    if isinstance(cls.codec_id, bool) or not isinstance(cls.codec_id, int) or not 0 <= cls.codec_id <= 255:
        raise ValueError(f"{cls.name}: codec_id must be an integer in 0..255 (one header byte), got {cls.codec_id!r}")
    if cls.codec_id in CODECS_BY_ID:
        raise ValueError(f"{cls.name}: codec_id {cls.codec_id} is taken by {CODECS_BY_ID[cls.codec_id].name!r}")
    if not cls.summary or not cls.body_formula:
        raise ValueError(f"{cls.name}: set summary and body_formula (they make its row of the codec table)")
    CODECS[cls.name] = cls
    CODECS_BY_ID[cls.codec_id] = cls
    return cls


def unregister_codec(name: str) -> type[Codec]:
    """Remove a codec registered with :func:`register_codec` (or any, e.g. in tests); returns its class."""
    cls = CODECS.pop(name)
    CODECS_BY_ID.pop(cls.codec_id, None)
    return cls


def codec_options(name: str) -> tuple[str, ...]:
    """Keyword options the named codec accepts (besides ``bits``)."""
    params = inspect.signature(CODECS[name].__init__).parameters
    return tuple(p for p in params if p not in ("self", "bits"))


def make_codec(name: str, bits: int = 8, _extra_valid: tuple = (), **options) -> Codec:
    """Build a codec by name, with a clear ValueError for unknown names or options.

    ``name`` is a key of ``CODECS`` (the registry); ``bits`` the width in 1..8 (fixed-width codecs
    accept 8, the hook's default, and their own width, see :func:`valid_bits`); ``options`` the
    codec's own keyword options (``codec_options(name)`` lists them, e.g. ``block_size``,
    ``rounding``, ``compile``), passed to its constructor unchanged."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; valid codecs: {', '.join(sorted(CODECS))}")
    valid = codec_options(name) + tuple(_extra_valid)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"codec {name!r} does not take option(s) {', '.join(unknown)}; "
                         f"valid options: bits{''.join(', ' + v for v in valid)}")
    return CODECS[name](bits=bits, **options)


def valid_bits(name: str, **options) -> tuple[int, ...]:
    """The ``bits`` values in 1..8 the named codec accepts with these options (probed: the
    constructor is the one place that decides).  Fixed-width codecs accept 8 (the hook's default)
    and their own width, and report their own width as ``codec.bits``."""
    ok = []
    for b in range(1, 9):
        try:
            make_codec(name, bits=b, **options)
        except ValueError:
            continue
        ok.append(b)
    return tuple(ok)


_valid_bits = valid_bits


def widths(name: str) -> dict[int, int]:
    """Reported width (``codec.bits``) -> the ``bits`` to pass for it (8 where 8 gives it), default
    options, largest width first."""
    out: dict[int, int] = {}
    for b in valid_bits(name):
        w = make_codec(name, bits=b).bits
        if w not in out or b == 8:
            out[w] = b
    return dict(sorted(out.items(), reverse=True))


def examples(name: str) -> tuple:
    """The named codec's representative ``(bits, options)`` configurations (``Codec.examples``;
    default: default options at its largest and smallest width)."""
    cls = CODECS[name]
    own = vars(cls).get("examples")
    if own:
        return tuple((b, dict(o)) for b, o in own)
    w = widths(name)
    return tuple((w[k], {}) for k in sorted({max(w), min(w)}, reverse=True))


def option_space(name: str) -> dict:
    """Option -> representative values of the named codec, for fuzzing (``Codec.option_space``);
    ``block_size`` is left to the caller when the codec takes it."""
    return {k: tuple(v) for k, v in (vars(CODECS[name]).get("option_space") or {}).items()}


def fidelity_configs(names=None) -> list[tuple]:
    """``(label, codec, bits, options)`` rows of the fidelity table for the named (default: every
    registered) codecs, from ``Codec.fidelity_configs`` or else from :func:`examples`."""
    rows = []
    for name in (CODECS if names is None else names):
        own = vars(CODECS[name])
        if "fidelity_configs" in own:  # () leaves the codec out (e.g. the exact fp32 reference)
            rows += [(label, name, b, dict(o)) for label, b, o in own["fidelity_configs"]]
            continue
        for b, o in examples(name):
            width = make_codec(name, bits=b, **o).bits
            label = name if len(widths(name)) == 1 else f"{name} {width}b"
            rows.append((label + "".join(f", {k}={v}" for k, v in o.items()), name, b, dict(o)))
    return rows


def compilable(name: str) -> bool:
    """Whether the named codec has fused kernels behind a ``compile=True`` option."""
    return "compile" in codec_options(name)


def server_codec_for(codec: Codec, server_bits: int | None = None, options: dict | None = None) -> Codec:
    """The codec that re-encodes the mean of a shard in the two-phase exchange, for the worker
    ``codec`` built with ``options`` (its keyword options besides ``bits``).

    By default the worker codec itself, unless its class names another in ``server_codec`` (sign,
    ternary: the mean of W signs or trits is no longer one, and re-encoding it to 1 bit / 3 levels
    with a server residual costs accuracy or diverges) or it sends 1 bit per value; then
    ``server_codec`` (default ``LOW_BITS_SERVER_CODEC``: the deterministic, contractive ``uniform``
    at 2 bits) with the worker's ``block_size``.  An explicit ``server_bits`` uses the worker codec
    at that width where it has one, else that fallback codec at ``server_bits``.
    """
    options = dict(options or {})
    fallback = type(codec).server_codec
    if server_bits is None:
        if fallback is None and codec.bits > 1:
            return codec
        name, bits = fallback or LOW_BITS_SERVER_CODEC
        return _with_blocks(name, bits, options)
    if isinstance(server_bits, bool) or not isinstance(server_bits, int) or not 1 <= server_bits <= 8:
        raise ValueError(f"server_bits must be an integer in 1..8 (bits of the re-encoded mean in the two-phase "
                         f"exchange), got {server_bits!r}")
    if server_bits == codec.bits:
        return codec
    try:
        same = make_codec(codec.name, server_bits, **options)
        if same.bits == server_bits:
            return same
    except (ValueError, TypeError):
        pass
    return _with_blocks((fallback or LOW_BITS_SERVER_CODEC)[0], server_bits, options)


def _with_blocks(name: str, bits: int, options: dict) -> Codec:
    """``name`` at ``bits`` with the worker's ``block_size`` (where both take one)."""
    block = {"block_size": options["block_size"]} if "block_size" in options and "block_size" in codec_options(name) else {}
    return make_codec(name, bits, **block)


def payload_nbytes(codec: str, param_numels, bits: int = 8, **options) -> int:
    """Exact bytes of one rank's payload for a bucket of parameters with these sizes (header and
    padding included), e.g. ``payload_nbytes("stochastic", [1_000_000], bits=4)``."""
    from .wire import payload_nbytes as _with_header
    numels = [param_numels] if isinstance(param_numels, int) else list(param_numels)
    return _with_header(make_codec(codec, bits=bits, **options).body_nbytes(Layout(numels)))


def available() -> list[dict]:
    """Every registered codec: ``name``, ``summary``, accepted ``bits``, ``options`` with their
    defaults, ``body_bytes`` (formula in n = values, b = bits, blocks = blocks of the block_size
    option, k = kept values...) and ``bits_per_value_1M`` (exact payload bits per value for one
    1,000,000-value bucket at the codec's largest and smallest accepted bits, default options;
    the payload adds a 16-byte header and pads to 4 bytes)."""
    rows = []
    for name, cls in CODECS.items():
        params = inspect.signature(cls.__init__).parameters
        valid = valid_bits(name)
        per_value = {}
        for b in sorted({valid[0], valid[-1]}, reverse=True):
            codec = make_codec(name, bits=b)
            per_value[codec.bits] = 8 * payload_nbytes(name, [1_000_000], bits=b) / 1_000_000
        rows.append({
            "name": name,
            "summary": cls.summary,
            # codecs with a fixed width (casts, ternary, sign) accept the hook's default 8 and report their own
            "bits": tuple(sorted({make_codec(name, bits=b).bits for b in valid})),
            "options": {p: params[p].default for p in params if p not in ("self", "bits")},
            "body_bytes": cls.body_formula,
            "bits_per_value_1M": per_value,
        })
    return rows


def available_markdown() -> str:
    """:func:`available` as the Markdown table of the README."""
    lines = ["| codec | what it sends | bits | options (defaults) | body bytes | bits/value (1M values) |",
             "|---|---|---|---|---|---|"]
    for r in available():
        bits = r["bits"]
        bits_txt = f"{bits[0]}..{bits[-1]}" if len(bits) > 1 and bits == tuple(range(bits[0], bits[-1] + 1)) else \
            ", ".join(map(str, bits))
        opts = ", ".join(f"`{k}={v!r}`" for k, v in r["options"].items()) or "–"
        bpv = ", ".join(f"{v:.4f} @{b}b" for b, v in r["bits_per_value_1M"].items())
        cells = [f"`{r['name']}`", r["summary"], bits_txt, opts, f"`{r['body_bytes']}`", bpv]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


__all__ = ["Codec", "EncodeInfo", "Layout", "CODECS", "make_codec", "codec_options", "available",
           "available_markdown", "payload_nbytes", "register_codec", "unregister_codec", "valid_bits", "widths",
           "examples", "option_space", "fidelity_configs", "compilable", "server_codec_for",
           "LOW_BITS_SERVER_CODEC", "pack_codes",
           "unpack_codes", "packed_nbytes", "VALID_BITS", "UniformCodec", "StochasticCodec",
           "NoneCodec", "Fp16Codec", "Bf16Codec", "QsgdCodec", "TopKCodec", "KMeansCodec", "AdaptiveCodec", "LogCodec", "MuLawCodec", "TernaryCodec", "SignCodec"]
