"""Validation of codec options, shared by every codec so that bad input gets the same clear
ValueError everywhere: the codec, the option, the valid choices, and the value given."""
from __future__ import annotations

import math
import numbers
import operator


def as_int(value):
    """Integer-like values (numpy integers too) as int; anything else (floats, bools, None) is
    returned unchanged for the caller's check to reject with its own message."""
    if value is None or isinstance(value, (bool, int)):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


def check_bits(codec: str, bits, lo: int = 1, hi: int = 8) -> int:
    bits = as_int(bits)
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise ValueError(f"{codec}: bits must be an integer in {lo}..{hi}, got {bits!r}")
    return bits


def check_choice(codec: str, option: str, value, choices: tuple) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{codec}: {option} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_int(codec: str, option: str, value, minimum: int, what: str) -> int:
    value = as_int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{codec}: {option} must be {what}, got {value!r}")
    return value


def check_real(codec: str, option: str, value, ok, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)) \
            or not ok(float(value)):
        raise ValueError(f"{codec}: {option} must be {what}, got {value!r}")
    return float(value)
