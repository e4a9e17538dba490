"""Packing of b-bit integer codes (1 <= b <= 8) into bytes, with no wasted bits.

Wire layout: an LSB-first bit stream. Code ``i`` occupies bits ``[i*b, (i+1)*b)`` of the
little-endian byte string, so ``n`` codes take exactly ``ceil(n*b/8)`` bytes; the unused high
bits of the last byte are zero.

Why it is fast in plain torch: codes arrive one per byte.  For b in {1, 2, 4} the 8/b codes of
one output byte sit in one int64 / int32 / int16 lane, and a single multiplication by a constant
gathers them (see ``_MUL_PACK``), followed by a shift and a narrowing cast.  Other widths merge the
8 codes of an int64 word pairwise in 3 shift/or levels (8 -> 16 -> 32 -> 64 bit lanes) and keep the
low ``b`` bytes.  Unpacking spreads bits back with shifts/masks (or a multiply for b=1).  All ops are
vectorised integer ops over at most as many bytes as there are codes; callers in hot loops pass a
``scratch`` buffer so nothing is allocated per call.  A tail of fewer than 8 codes is handled by a
tiny generic routine.
"""
from __future__ import annotations

import numpy as np
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


def _scratch_view(scratch, nbytes: int, dtype: torch.dtype, device) -> torch.Tensor:
    if scratch is None or scratch.numel() * scratch.element_size() < nbytes:
        return torch.empty(nbytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype, device=device)
    return scratch.view(torch.uint8)[:nbytes].view(dtype)


def pack_codes(codes: torch.Tensor, bits: int, out: torch.Tensor | None = None,
               scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Pack a 1-D uint8 tensor of codes (each < 2**bits) into ``packed_nbytes`` bytes.

    Codes must already be in range: high bits are not masked (they would corrupt neighbours); the
    quantizers guarantee it and the tests check it.  ``scratch``: optional 8-byte aligned buffer
    of at least ``numel`` bytes, to avoid allocating.
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
        _pack_groups(codes[:main], bits, out[: main * bits // 8], scratch)
    if n % 8:
        _pack_tail(codes[main:], bits, out[main * bits // 8:])
    return out


# b in {1, 2, 4}: the k = 8/b codes of one output byte sit in the k bytes of one lane
# (int64 / int32 / int16).  Multiplying the lane by M = sum_j 2**(s - (8-b)*j), s = (8-b)*(k-1),
# moves code j to bit s + b*j; all other partial products land on disjoint bit ranges (checked for
# these three widths: no carries), so bits [s, s+8) of the product are the packed byte.  Overflow
# past the lane width only discards bits above the byte.  The narrowing cast keeps that byte.
_UNSIGNED = {torch.int16: np.uint16, torch.int32: np.uint32, torch.int64: np.uint64}
_MUL_PACK = {
    1: (torch.int64, _i64(0x0102040810204080), 56),
    2: (torch.int32, (1 << 18) + (1 << 12) + (1 << 6) + 1, 18),
    4: (torch.int16, 17, 4),
}


def _pack_groups(codes: torch.Tensor, bits: int, out: torch.Tensor, scratch=None) -> None:
    """Pack a multiple of 8 codes."""
    if codes.storage_offset() % 8 or not codes.is_contiguous():
        codes = codes.clone()  # wide views need alignment
    if bits == 1 and codes.device.type == "cpu":  # numpy's packbits is the fastest 1-bit packer here
        out.numpy()[:] = np.packbits(codes.numpy(), bitorder="little")
        return
    if bits in _MUL_PACK:
        dtype, mul, shift = _MUL_PACK[bits]
        lanes = codes.view(dtype)
        tmp = _scratch_view(scratch, codes.numel(), dtype, codes.device)
        if codes.device.type == "cpu":  # numpy's small-integer loops are ~3x faster than torch's here
            u = _UNSIGNED[dtype]
            t, src = tmp.numpy().view(u), lanes.numpy().view(u)
            if bits == 4:  # (c0 | c1 << 8) | that >> 4 has c0 | c1 << 4 in its low byte: no multiply
                np.right_shift(src, u(4), out=t)
                np.bitwise_or(t, src, out=t)
            else:
                np.multiply(src, u(mul % (1 << (8 * t.itemsize))), out=t)
                np.right_shift(t, u(shift), out=t)
            np.copyto(out.numpy(), t, casting="unsafe")  # narrowing keeps the low byte of each lane
            return
        torch.mul(lanes, mul, out=tmp)
        tmp.bitwise_right_shift_(shift)
        out.copy_(tmp)  # narrowing cast keeps the low byte of each lane
        return
    w = codes.view(torch.int64)
    lane, field = 8, bits
    while True:
        lane2 = lane * 2
        low = _lane_mask(lane2, lane)              # low half of each doubled lane
        high = _i64((~low) & ((1 << 64) - 1))
        w = torch.bitwise_or(w & low, torch.bitwise_right_shift(w & high, lane - field))
        lane, field = lane2, field * 2
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
    out.copy_(unpack_view(packed, bits, numel))
    return out


def unpack_view(packed: torch.Tensor, bits: int, numel: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Unpacked codes as a uint8 tensor that may live in ``scratch`` (>= 2*numel bytes, 8-aligned)
    or alias ``packed`` (bits=8).  No validation: internal fast path for the codecs."""
    if bits == 8:
        return packed
    main = numel - numel % 8
    nb = main * bits // 8
    if numel % 8:  # rare (last chunk of a bucket): simple path with a fresh buffer
        out = torch.empty(numel, dtype=torch.uint8, device=packed.device)
        if main:
            out[:main].copy_(_unpack_groups(packed[:nb], bits, main, None))
        _unpack_tail(packed[nb:], bits, numel - main, out[main:])
        return out
    return _unpack_groups(packed, bits, main, scratch)


def _unpack_groups(packed: torch.Tensor, bits: int, numel: int, scratch) -> torch.Tensor:
    device = packed.device
    if bits == 1:
        # 8 copies of the byte, one per output byte; keep bit j in byte j, then map 2**j -> 1
        w = _scratch_view(scratch, numel, torch.int64, device)
        w.copy_(packed)
        w.mul_(0x0101010101010101).bitwise_and_(_i64(0x8040201008040201))
        return w.view(torch.uint8).clamp_max_(1)
    if bits in (2, 4):
        dtype, steps = (torch.int16, ((4, 0x0F0F),)) if bits == 4 else (torch.int32, ((12, 0x000F000F), (6, 0x03030303)))
        w = _scratch_view(scratch, 2 * numel, dtype, device)
        w, tmp = w[: w.numel() // 2], w[w.numel() // 2:]
        w.copy_(packed)
        for shift, mask in steps:
            torch.bitwise_left_shift(w, shift, out=tmp)
            w.bitwise_or_(tmp).bitwise_and_(mask)
        return w.view(torch.uint8)
    # other widths: replay the packing levels backwards, splitting every lane into two half lanes
    lane, field = 8, bits
    plan = []
    while True:
        plan.append((lane, field))
        lane, field = lane * 2, field * 2
        if lane == 64 or (lane == 32 and field == 24):
            nb = field // 8
            words = torch.zeros(packed.numel() // nb, lane // 8, dtype=torch.uint8, device=device)
            words[:, :nb] = packed.view(-1, nb)
            w = words.view(-1).view(torch.int64)
            break
    for half_lane, half_field in reversed(plan):
        mask = _lane_mask(half_lane * 2, half_field)
        lo = w & mask
        hi = torch.bitwise_right_shift(w, half_field) & mask
        w = lo | torch.bitwise_left_shift(hi, half_lane)
    return w.view(torch.uint8)

