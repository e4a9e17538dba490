"""Codecs: pure tensor -> payload body -> tensor.  No torch.distributed in this package.

Add a codec: one new module with a :class:`~ddp_qhooks.codecs.base.Codec` subclass and one line in
``CODECS`` below.
"""
from __future__ import annotations

import inspect

from .base import Codec, EncodeInfo, Layout
from .cast import Bf16Codec, Fp16Codec, NoneCodec
from .packing import VALID_BITS, pack_codes, packed_nbytes, unpack_codes
from .qsgd import QsgdCodec
from .uniform import StochasticCodec, UniformCodec

CODECS: dict[str, type[Codec]] = {
    "uniform": UniformCodec,
    "stochastic": StochasticCodec,
    "none": NoneCodec,
    "fp16": Fp16Codec,
    "bf16": Bf16Codec,
    "qsgd": QsgdCodec,
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


__all__ = ["Codec", "EncodeInfo", "Layout", "CODECS", "make_codec", "codec_options", "pack_codes",
           "unpack_codes", "packed_nbytes", "VALID_BITS", "UniformCodec", "StochasticCodec",
           "NoneCodec", "Fp16Codec", "Bf16Codec", "QsgdCodec"]
