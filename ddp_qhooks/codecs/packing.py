"""Packing of b-bit integer codes (1 <= b <= 8) into bytes, with no wasted bits.

Wire layout: an LSB-first bit stream. Code ``i`` occupies bits ``[i*b, (i+1)*b)`` of the
little-endian byte string, so ``n`` codes take exactly ``ceil(n*b/8)`` bytes; the unused high
bits of the last byte are zero.

Why it is fast in plain torch: every group of 8 codes (8 bytes, one code per byte) is viewed as
one int64 word and its 8 fields are merged pairwise in 3 shift/or levels (8 -> 16 -> 32 -> 64 bit
lanes).  After the level at which a lane holds exactly 8 bits (b=4: 16-bit lanes, b=2: 32-bit
lanes, b=1: 64-bit lanes) a narrowing cast lane -> uint8 yields the packed bytes in order; other
widths take the low ``b`` bytes of each word.  All ops are vectorised integer ops on 1/8 as many
words as codes, so packing costs a fraction of one pass over the float input.  A tail of fewer than
8 codes is packed by a tiny generic routine.
"""
from __future__ import annotations

import torch

__all__ = ["packed_nbytes", "pack_codes", "unpack_codes", "VALID_BITS"]

VALID_BITS = tuple(range(1, 9))


def _i64(value: int) -> int:
    """An unsigned 64-bit mask as the signed int64 torch accepts."""
    return value - (1 << 64) if value >= (1 << 63) else value


def _lane_mask(lane_bits: int, field_bits: int) -> int:
    """Mask keeping the low ``field_bits`` of every ``lane_bits``-wide lane of a 64-bit word."""
    one = (1 << field_bits) - 1
    return _i64(sum(one << s for s in range(0, 64, lane_bits)))


_LANE_DTYPES = {16: torch.int16, 32: torch.int32, 64: torch.int64}


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` codes of ``bits`` bits each (no padding beyond the last byte)."""
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if bits not in VALID_BITS:
        raise ValueError(f"bits must be one of {VALID_BITS}, got {bits!r}")


def _pack_tail(codes: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    # fewer than 8 codes: build the integer bit stream explicitly (<= 56 bits fit in int64)
    shifts = torch.arange(codes.numel(), device=codes.device, dtype=torch.int64) * bits
    word = (codes.to(torch.int64) << shifts).sum()
    byte_shifts = torch.arange(out.numel(), device=codes.device, dtype=torch.int64) * 8
    out.copy_((word >> byte_shifts) & 0xFF)


def _unpack_tail(packed: torch.Tensor, bits: int, numel: int, out: torch.Tensor) -> None:
    byte_shifts = torch.arange(packed.numel(), device=packed.device, dtype=torch.int64) * 8
    word = (packed.to(torch.int64) << byte_shifts).sum()
    shifts = torch.arange(numel, device=packed.device, dtype=torch.int64) * bits
    out.copy_((word >> shifts) & ((1 << bits) - 1))


def pack_codes(codes: torch.Tensor, bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pack a 1-D uint8 tensor of codes (each < 2**bits) into ``packed_nbytes`` bytes.

    Codes must already be in range: high bits are not masked (they would corrupt neighbours),
    which is the caller's contract and is asserted by the tests, not re-checked here for speed.
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise ValueError("codes must be a 1-D uint8 tensor")
    n = codes.numel()
    nbytes = packed_nbytes(n, bits)
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8, device=codes.device)
    elif out.numel() != nbytes or out.dtype != torch.uint8:
        raise ValueError(f"out must be a uint8 tensor of {nbytes} bytes")
    if bits == 8:
        out.copy_(codes)
        return out
    main = n - n % 8
    if main:
        _pack_groups(codes[:main], bits, out[: main * bits // 8])
    if n % 8:
        _pack_tail(codes[main:], bits, out[main * bits // 8:])
    return out


def _pack_groups(codes: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Pack a multiple of 8 codes.  ``codes`` must be contiguous (viewed as int64)."""
    if codes.storage_offset() % 8:
        codes = codes.clone()  # int64 view needs 8-byte alignment
    w = codes.view(torch.int64)
    lane, field = 8, bits
    while True:
        lane2 = lane * 2
        low = _lane_mask(lane2, lane)              # low half of each doubled lane
        high = _i64((~low) & ((1 << 64) - 1))
        w = torch.bitwise_or(w & low, torch.bitwise_right_shift(w & high, lane - field))
        lane, field = lane2, field * 2
        if field == 8 and lane in _LANE_DTYPES:
            out.copy_(w.view(_LANE_DTYPES[lane]))  # narrowing cast keeps the low byte of each lane
            return
        if lane == 64 or (lane == 32 and field == 24):
            nb = field // 8
            out.view(-1, nb).copy_(w.view(torch.uint8).view(-1, lane // 8)[:, :nb])
            return


def unpack_codes(packed: torch.Tensor, bits: int, numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``numel`` uint8 codes from ``packed_nbytes(numel, bits)`` bytes."""
    _check_bits(bits)
    nbytes = packed_nbytes(numel, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != nbytes:
        raise ValueError(f"packed must be a 1-D uint8 tensor of {nbytes} bytes for {numel} {bits}-bit codes")
    if out is None:
        out = torch.empty(numel, dtype=torch.uint8, device=packed.device)
    elif out.numel() != numel or out.dtype != torch.uint8:
        raise ValueError(f"out must be a uint8 tensor of {numel} elements")
    if bits == 8:
        out.copy_(packed)
        return out
    main = numel - numel % 8
    if main:
        _unpack_groups(packed[: main * bits // 8], bits, out[:main])
    if numel % 8:
        _unpack_tail(packed[main * bits // 8:], bits, numel - main, out[main:])
    return out


def _unpack_groups(packed: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    # replay the packing levels backwards: split every lane into two half-width lanes
    lane, field = 8, bits
    plan = []
    while True:
        plan.append((lane, field))
        lane, field = lane * 2, field * 2
        if field == 8 and lane in _LANE_DTYPES:
            # one packed byte per lane: widen bytes to lanes, reinterpret as int64 words
            w = packed.to(_LANE_DTYPES[lane]).view(torch.int64)
            break
        if lane == 64 or (lane == 32 and field == 24):
            nb = field // 8
            words = torch.zeros(packed.numel() // nb, lane // 8, dtype=torch.uint8, device=packed.device)
            words[:, :nb] = packed.view(-1, nb)
            w = words.view(-1).view(torch.int64)
            break
    for half_lane, half_field in reversed(plan):
        mask = _lane_mask(half_lane * 2, half_field)
        lo = w & mask
        hi = torch.bitwise_right_shift(w, half_field) & mask
        w = lo | torch.bitwise_left_shift(hi, half_lane)
    out.copy_(w.view(torch.uint8))
