"""Test specs: what the shared codec tests need to know about each codec, one module per codec.

A registered codec ``<name>`` has a spec ``SPEC`` in ``tests/codec_specs/<name>.py`` (a codec
registered at runtime, e.g. in a test, passes its spec to :func:`register`).  The shared tests
take every codec from the registry and its representative configurations from the codec class's
metadata (``ddp_qhooks.codecs.examples``, ``option_space``); the spec adds the codec's *independent*
references, written from the format its module documents, never by calling the codec's helpers:

* ``expected_nbytes(bits, options, numels)``: the body size formula (tests/test_fuzz.py);
* ``check_levels(case, codec, x, d, body, blocks, first)``: level set / rounding guarantee of a
  decoded bucket ``d`` for the float32 input ``x`` (both float64 numpy; tests/test_fuzz.py);
* ``ref_decode(body, param_numels, **config)``: a numpy decoder of one body
  (tests/test_ddp_codecs.py checks the hook's averaged gradient against it);
* how the fuzzer should treat the codec (``stateful``, ``slow``, ``fuzz_options``, ...) and
  ``ddp_examples``, the configurations of the 2-rank DDP test (default: the codec's examples).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

from ddp_qhooks.codecs import CODECS, examples


@dataclass(frozen=True)
class CodecSpec:
    #: (bits as the codec reports it, options, parameter sizes) -> body bytes, from the documented format
    expected_nbytes: Callable
    #: (case, codec, x, d, body, blocks, first) -> None, asserting the documented level set / rounding;
    #: None: only the contract every codec gets (size, finiteness, residual, averaging)
    check_levels: Optional[Callable] = None
    #: numpy decoder of one body: (body uint8 array, param_numels, **codec.config() minus "codec") -> float64
    ref_decode: Optional[Callable] = None
    #: casts: the decode is x cast to this torch dtype, and an input the format cannot hold is non-finite
    cast_dtype: object = None
    #: (options, x) -> whether a finite input encodes as finite (default: always; casts: see cast_dtype)
    finite: Optional[Callable] = None
    #: a hypothesis strategy of the options (default: block_size if taken, plus the class's option_space)
    fuzz_options: Optional[Callable] = None
    #: (options, numels) -> options adjusted to the drawn layout (e.g. to bound the work per example)
    fuzz_adjust: Optional[Callable] = None
    #: keeps running state between encodes: the fuzzer encodes two steps with one codec
    stateful: bool = False
    #: slow per value: the fuzzer reaches 10^5 values only through its boundary sizes
    slow: bool = False
    #: the body starts with a (lo, hi) float32 pair per block (its grid magnitude may exceed max |x|)
    range_meta: bool = False
    #: configurations (bits, options) of the 2-rank DDP test; default: the codec's examples
    ddp_examples: Optional[tuple] = None

    def ddp_configs(self, name: str) -> list:
        return [(name, b, dict(o)) for b, o in (self.ddp_examples or examples(name))]


_RUNTIME: dict[str, CodecSpec] = {}


def register(name: str, spec: CodecSpec) -> None:
    """The spec of a codec registered at runtime (``ddp_qhooks.codecs.register_codec``)."""
    _RUNTIME[name] = spec


def unregister(name: str) -> None:
    _RUNTIME.pop(name, None)


def spec(name: str) -> CodecSpec:
    """The test spec of the registered codec ``name``."""
    if name in _RUNTIME:
        return _RUNTIME[name]
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise LookupError(f"codec {name!r} has no test spec: add tests/codec_specs/{name}.py with SPEC = CodecSpec(...) "
                          "(see docs/adding_a_codec.md)") from None
    return module.SPEC


def names() -> tuple:
    """Every registered codec (each must have a spec)."""
    return tuple(CODECS)
