"""Packing of b-bit integer codes (1 <= b <= 8) into bytes, with no wasted bits.

Wire layout (``n`` codes always take exactly ``ceil(n*b/8)`` bytes):

* ``b = 8``: one byte per code.
* ``b in {1, 2, 4}`` (``k = 8/b`` codes per byte): *planar stripes*.  The codes are cut into stripes
  of ``STRIPE`` codes (the last one may be shorter).  A stripe of ``r`` codes takes
  ``m = ceil(r/k)`` bytes, and its byte ``j`` holds the codes ``j, j+m, ..., j+(k-1)m`` of the
  stripe at bit offsets ``0, b, ..., (k-1)b`` (positions past ``r`` count as code 0).  Why not a
  plain bit stream: with planes, packing is ``k-1`` shift-or steps between *contiguous* slices,
  which numpy/torch vectorise fully and a compiled kernel fuses into the quantizer (one pass
  from float input to packed bytes); an interleaved stream needs strided gathers instead.  The
  stripe keeps every plane of a stripe cache-resident while it is packed.
* ``b in {3, 5, 6, 7}``: an LSB-first bit stream: code ``i`` occupies bits ``[i*b, (i+1)*b)`` of the
  little-endian byte string; the unused high bits of the last byte are zero.  The 8 codes of an
  int64 word are merged pairwise in 3 shift/or levels (8 -> 16 -> 32 -> 64 bit lanes) and the low
  ``b`` bytes kept; a tail of fewer than 8 codes is handled by a tiny generic routine.

* trits (the ternary codec's dense option): 5 base-3 digits per byte, see the end of this module.

Codecs that only need ``code * weight`` sums (the quantizers' decoders) use :func:`planes`
directly: masking a byte with ``mask << shift`` yields ``code * 2**shift`` without any shift.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["packed_nbytes", "pack_codes", "unpack_codes", "planes", "VALID_BITS", "PLANAR_BITS", "STRIPE",
           "TRITS_PER_BYTE", "pack_trits", "trit_nbytes", "unpack_trits"]

VALID_BITS = tuple(range(1, 9))
PLANAR_BITS = (1, 2, 4)
STRIPE = 1 << 19  # codes per planar stripe; a multiple of 64 so every stripe is whole bytes and words


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


def planes(elements: torch.Tensor, packed: torch.Tensor, bits: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """The planar layout as views: ``(element_view, byte_view, shift)`` triples of equal shapes,
    meaning ``byte_view`` holds ``code(element_view) << shift`` in its bits ``[shift, shift+bits)``.

    ``elements``: any 1-D tensor with one entry per code (the codes, the float values they encode,
    or the output they decode into); ``packed``: its ``packed_nbytes`` bytes; ``bits`` in
    PLANAR_BITS.  Full stripes come as one batch of 2-D views per plane, so the number of
    triples does not grow with the bucket size (few kernel launches on accelerators).  Shift 0 comes
    first for every byte range, so a packer can copy it and OR the rest.
    """
    k = 8 // bits
    n = elements.numel()
    full = n // STRIPE
    out = []
    if full:
        m = STRIPE // k
        el = elements[: full * STRIPE].view(full, k, m)
        by = packed[: full * m].view(full, m)
        out += [(el[:, p], by, p * bits) for p in range(k)]
    r = n - full * STRIPE
    if r:
        m = -(-r // k)
        base = full * STRIPE
        by = packed[full * (STRIPE // k):]
        for p in range(k):
            length = min(m, r - p * m)
            if length <= 0:
                break
            out.append((elements[base + p * m: base + p * m + length], by[:length], p * bits))
    return out


def _scratch_u8(scratch, shape, device) -> torch.Tensor:
    size = math.prod(shape)
    if scratch is None or scratch.numel() * scratch.element_size() < size:
        return torch.empty(shape, dtype=torch.uint8, device=device)
    return scratch.view(torch.uint8)[:size].view(shape)


def _pack_planar(codes: torch.Tensor, bits: int, out: torch.Tensor, scratch) -> None:
    if codes.device.type == "cpu":
        _pack_planar_numpy(codes.numpy(), bits, out.numpy(), _scratch_u8(scratch, (codes.numel(),), codes.device).numpy())
    else:
        _pack_planar_torch(codes, bits, out)


def _pack_planar_torch(codes: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    for el, by, shift in planes(codes, out, bits):
        dst = by[: el.shape[-1]] if el.dim() == 1 else by
        if shift == 0:
            dst.copy_(el)
        else:
            dst.bitwise_or_(torch.bitwise_left_shift(el, shift))


def _pack_planar_numpy(codes: np.ndarray, bits: int, out: np.ndarray, tmp: np.ndarray) -> None:
    # numpy's uint8 multiply/or are vectorised and cost ~1 us per call (torch: shifts ~2x slower,
    # and several us of overhead per op); a multiply by 2**shift is the shift (codes < 2**bits)
    k, n = 8 // bits, codes.size
    full = n // STRIPE
    groups = []
    if full:
        m = STRIPE // k
        groups.append((codes[: full * STRIPE].reshape(full, k, m), out[: full * m].reshape(full, m), m))
    r = n - full * STRIPE
    if r:
        m = -(-r // k)
        tail = np.zeros(k * m, dtype=np.uint8) if k * m != r else codes[full * STRIPE:]
        if k * m != r:
            tail[:r] = codes[full * STRIPE:]
        groups.append((tail.reshape(1, k, m), out[full * (STRIPE // k):].reshape(1, m), m))
    for planes3, dst, m in groups:
        t = tmp[: dst.size].reshape(dst.shape)
        np.copyto(dst, planes3[:, 0])
        for p in range(1, k):
            np.multiply(planes3[:, p], np.uint8(1 << (p * bits)), out=t)
            np.bitwise_or(dst, t, out=dst)


def _unpack_planar(packed: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    mask = (1 << bits) - 1
    for el, by, shift in planes(out, packed, bits):
        src = by[: el.shape[-1]] if el.dim() == 1 else by
        torch.bitwise_right_shift(src, shift, out=el)
        el.bitwise_and_(mask)


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


def pack_codes(codes: torch.Tensor, bits: int, out: torch.Tensor | None = None,
               scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Pack a 1-D uint8 tensor of codes (each < 2**bits) into ``packed_nbytes`` bytes.

    Codes must already be in range: high bits are not masked (they would corrupt neighbours); the
    quantizers guarantee it and the tests check it.  ``scratch``: optional buffer of at least
    ``numel`` bytes, to avoid allocating.
    """
    _check_bits(bits)
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise ValueError("codes must be a 1-D uint8 tensor")
    n = codes.numel()
    nbytes = packed_nbytes(n, bits)
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8, device=codes.device)
    elif out.numel() != nbytes or out.dtype != torch.uint8 or out.dim() != 1:
        raise ValueError(f"out must be a 1-D uint8 tensor of {nbytes} bytes")
    if bits == 8:
        out.copy_(codes)
    elif bits in PLANAR_BITS:
        _pack_planar(codes, bits, out, scratch)
    else:
        main = n - n % 8
        if main:
            _pack_stream_groups(codes[:main], bits, out[: main * bits // 8])
        if n % 8:
            _pack_tail(codes[main:], bits, out[main * bits // 8:])
    return out


def _pack_stream_groups(codes: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Bit-stream packing of a multiple of 8 codes (b in 3, 5, 6, 7)."""
    if codes.storage_offset() % 8 or not codes.is_contiguous():
        codes = codes.clone()  # wide views need alignment
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
    elif out.numel() != numel or out.dtype != torch.uint8 or out.dim() != 1:
        raise ValueError(f"out must be a 1-D uint8 tensor of {numel} elements")
    if bits == 8:
        out.copy_(packed)
    elif bits in PLANAR_BITS:
        _unpack_planar(packed, bits, out)
    else:
        main = numel - numel % 8
        nb = main * bits // 8
        if main:
            out[:main].copy_(_unpack_stream_groups(packed[:nb], bits))
        if numel % 8:
            _unpack_tail(packed[nb:], bits, numel - main, out[main:])
    return out


def _unpack_stream_groups(packed: torch.Tensor, bits: int) -> torch.Tensor:
    # replay the packing levels backwards, splitting every lane into two half lanes
    lane, field = 8, bits
    plan = []
    while True:
        plan.append((lane, field))
        lane, field = lane * 2, field * 2
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
    return w.view(torch.uint8)


# ------------------------------------------------------------------------------------------------
# base-3 packing of trits (ternary codec)
# ------------------------------------------------------------------------------------------------
# Dense base-3 packing of trit codes (values 0, 1, 2): 5 trits per byte, 1.6 bits per value.
#
# Wire layout (``n`` trits always take exactly ``ceil(n/5)`` bytes): byte ``i`` holds the trits
# ``5i .. 5i+4`` as ``sum_j t[5i+j] * 3**j`` (the first trit is the least significant digit), so a
# byte is at most ``3**5 - 1 = 242``.  Positions past ``n`` in the last byte count as trit 0.
#
# 5 trits per byte is the densest whole-byte grouping (3**5 = 243 <= 256; 3**6 does not fit), 99.1 %
# of the log2(3) = 1.585 bits/trit entropy bound.  Packing is Horner's rule over the 5 strided columns
# of a ``(n/5, 5)`` view in uint8 (every intermediate stays <= 242); unpacking is one row gather from
# a 256 x 5 table of digits (3.5x faster on a CPU than 9 remainder/quotient passes), so both are a
# handful of vectorised ops on any device.
#
# Like :func:`~ddp_qhooks.codecs.packing.pack_codes`, the packer does not check its input: a code of
# 3 or more corrupts its neighbours; a byte above 242 unpacks to the digits of its value (the 5th
# digit of 243..255 is 0 mod 3: no digit is out of range).

TRITS_PER_BYTE = 5
_tables: dict[torch.device, torch.Tensor] = {}


def _digits_table(device: torch.device) -> torch.Tensor:
    """Row ``v`` holds the 5 base-3 digits of ``v``, least significant first (rows 243..255 too,
    so a corrupt byte cannot index out of range)."""
    table = _tables.get(device)
    if table is None:
        v = torch.arange(256, dtype=torch.int64)[:, None] // (3 ** torch.arange(TRITS_PER_BYTE))[None, :] % 3
        table = _tables[device] = v.to(torch.uint8).to(device)
    return table


def trit_nbytes(numel: int) -> int:
    """Bytes needed for ``numel`` trits (no padding beyond the last byte)."""
    return (numel + TRITS_PER_BYTE - 1) // TRITS_PER_BYTE


def _horner(cols: torch.Tensor, out: torch.Tensor) -> None:
    """``out = sum_j cols[:, j] * 3**j`` for a ``(m, 5)`` uint8 tensor, in place in ``out``."""
    torch.mul(cols[:, 4], 3, out=out)
    for j in (3, 2, 1):
        out.add_(cols[:, j]).mul_(3)
    out.add_(cols[:, 0])


def pack_trits(codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Pack a 1-D uint8 tensor of trits (each in 0..2) into ``trit_nbytes(n)`` bytes."""
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise ValueError("codes must be a 1-D uint8 tensor")
    n = codes.numel()
    nbytes = trit_nbytes(n)
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8, device=codes.device)
    elif out.numel() != nbytes or out.dtype != torch.uint8 or out.dim() != 1:
        raise ValueError(f"out must be a 1-D uint8 tensor of {nbytes} bytes")
    full, rest = divmod(n, TRITS_PER_BYTE)
    if full:
        _horner(codes[: full * TRITS_PER_BYTE].view(full, TRITS_PER_BYTE), out[:full])
    if rest:
        # the tail is padded with zero trits, which do not change the byte
        tail = torch.zeros(1, TRITS_PER_BYTE, dtype=torch.uint8, device=codes.device)
        tail[0, :rest] = codes[full * TRITS_PER_BYTE:]
        _horner(tail, out[full:])
    return out


def unpack_trits(packed: torch.Tensor, numel: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_trits`: ``numel`` uint8 trits from ``trit_nbytes(numel)`` bytes."""
    nbytes = trit_nbytes(numel)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != nbytes:
        raise ValueError(f"packed must be a 1-D uint8 tensor of {nbytes} bytes for {numel} trits")
    if out is None:
        out = torch.empty(numel, dtype=torch.uint8, device=packed.device)
    elif out.numel() != numel or out.dtype != torch.uint8 or out.dim() != 1:
        raise ValueError(f"out must be a 1-D uint8 tensor of {numel} elements")
    full, rest = divmod(numel, TRITS_PER_BYTE)
    table = _digits_table(packed.device)
    if full:
        torch.index_select(table, 0, packed[:full].int(), out=out[: full * TRITS_PER_BYTE].view(full, TRITS_PER_BYTE))
    if rest:
        out[full * TRITS_PER_BYTE:].copy_(table[packed[full:].int()][0, :rest])
    return out
