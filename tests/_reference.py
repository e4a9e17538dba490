"""Independent numpy references shared by the codec tests, written from the documented layouts
(packing.py, blocks.py), never by calling the package."""
from __future__ import annotations

import numpy as np
import torch

REF_STRIPE = 1 << 19  # codes per planar stripe, as documented in packing.py


def ref_unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Codes from the packing.py layout: bytes (8), planar stripes (1/2/4), LSB-first stream (3/5/6/7)."""
    packed = np.asarray(packed, dtype=np.uint8)
    assert packed.size == (n * bits + 7) // 8, "packed size differs from ceil(n*bits/8)"
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if bits == 8:
        return packed[:n].astype(np.int64)
    if bits not in (1, 2, 4):
        stream = np.unpackbits(packed, bitorder="little")[: n * bits].reshape(n, bits).astype(np.int64)
        return stream @ (np.int64(1) << np.arange(bits, dtype=np.int64))
    k, out, pos = 8 // bits, [], 0
    for a in range(0, n, REF_STRIPE):
        r = min(REF_STRIPE, n - a)
        m = -(-r // k)
        stripe = packed[pos:pos + m].astype(np.int64)
        pos += m
        out.append(((stripe[None, :] >> (np.arange(k)[:, None] * bits)) & ((1 << bits) - 1)).reshape(-1)[:r])
    return np.concatenate(out)


def ref_block_lengths(param_numels, block_size) -> list[int]:
    """Scale blocks: one per bucket (None), one per non-empty parameter ("layer"), or each parameter
    cut into blocks of ``block_size`` (never straddling two parameters)."""
    if block_size is None:
        total = sum(param_numels)
        return [total] if total else []
    if block_size == "layer":
        return [n for n in param_numels if n]
    return [min(block_size, n - s) for n in param_numels for s in range(0, n, block_size)]


# ------------------------------------------------------------------------------------------------
# small torch helpers the codec test modules share
# ------------------------------------------------------------------------------------------------
def f64(t):
    return t.detach().to(torch.float64).numpy()


def encode(codec, x, layout, key=0, error_out=None):
    """Encode into a body pre-filled with 0xAB (so unwritten bytes show)."""
    body = torch.full((codec.body_nbytes(layout),), 0xAB, dtype=torch.uint8)
    info = codec.encode(x, body, layout, key=key, error_out=error_out)
    return body, info


def decode(codec, bodies, layout, divisor=1, dtype=torch.float32):
    """Decode into an output pre-filled with 12345 (so unwritten values show)."""
    out = torch.full((layout.numel,), 12345.0, dtype=dtype)
    codec.decode(list(bodies), layout, out, divisor=divisor)
    return out


def ragged_data(numels, seed, dtype=torch.float32):
    """Parameters with very different scales and offsets, one after another."""
    g = torch.Generator().manual_seed(seed)
    scales = [1e-3, 1.0, 50.0, 0.2, 7.0]
    offsets = [0.0, 2.0, -7.0, 0.5, -0.25]
    parts = [torch.randn(n, generator=g) * scales[i % 5] + offsets[i % 5] for i, n in enumerate(numels)]
    return (torch.cat(parts) if parts else torch.zeros(0)).to(dtype)
