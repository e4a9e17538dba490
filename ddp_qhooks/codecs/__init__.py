"""Codecs: pure tensor -> payload body -> tensor.  No torch.distributed in this package.

Add a codec: one new module with a :class:`~ddp_qhooks.codecs.base.Codec` subclass and one line in
``CODECS`` below.
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


def codec_options(name: str) -> tuple[str, ...]:
    """Keyword options the named codec accepts (besides ``bits``)."""
    params = inspect.signature(CODECS[name].__init__).parameters
    return tuple(p for p in params if p not in ("self", "bits"))


def make_codec(name: str, bits: int = 8, _extra_valid: tuple = (), **options) -> Codec:
    """Build a codec by name, with a clear ValueError for unknown names or options."""
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; valid codecs: {', '.join(sorted(CODECS))}")
    valid = codec_options(name) + tuple(_extra_valid)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"codec {name!r} does not take option(s) {', '.join(unknown)}; "
                         f"valid options: bits{''.join(', ' + v for v in valid)}")
    return CODECS[name](bits=bits, **options)


def _valid_bits(name: str) -> tuple[int, ...]:
    ok = []
    for b in range(1, 9):
        try:
            make_codec(name, bits=b)
        except ValueError:
            continue
        ok.append(b)
    return tuple(ok)


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
        valid = _valid_bits(name)
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
           "available_markdown", "payload_nbytes", "pack_codes",
           "unpack_codes", "packed_nbytes", "VALID_BITS", "UniformCodec", "StochasticCodec",
           "NoneCodec", "Fp16Codec", "Bf16Codec", "QsgdCodec", "TopKCodec", "KMeansCodec", "AdaptiveCodec", "LogCodec", "MuLawCodec", "TernaryCodec", "SignCodec"]
