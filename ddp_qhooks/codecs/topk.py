"""Top-k sparsification: per block, send only the ``k`` values of largest magnitude.

Algorithm.  The bucket is cut into blocks (see blocks.py: one per bucket by default, ``"layer"``
or ``block_size=B``).  A block of ``n`` values keeps ``k_b`` of them:

* ``ratio=r`` (default 0.01): ``k_b = min(n, max(1, ceil(r * n)))``.  ``r`` is taken as the
  decimal it prints as (``0.07`` means 7/100, not the binary float just above it), so
  ``ceil(0.07 * 100)`` is 7 although ``0.07 * 100 == 7.000000000000001`` in floating point;
* ``k=K``: ``k_b = min(K, n)`` (with ``block_size=None`` K is per bucket, else per block).

``k_b`` depends on the layout only, never on the data, so the body size is fixed and the
all-gather of equal-sized payloads still works.  Selection is ``torch.topk`` on ``|x|`` of each
run's ``(nblocks, n)`` view; the kept positions are then sorted ascending within their block, so
a body is canonical for a given selection.

Ties.  Which of several equal magnitudes at the selection boundary survive is unspecified (it is
torch.topk's choice, and may differ between CPU and CUDA); what is guaranteed is that exactly
``k_b`` positions survive per block and every survivor's magnitude is >= every dropped one's.
Blocks of zeros or of one constant thus still send exactly ``k_b`` (possibly zero) values.

Index encoding.  A kept position is sent relative to its block start, in
``w = ceil(log2(n))`` bits (``n = 1`` needs 0 bits: its one index is implicitly 0).  Indices of
all blocks with the same width ``w`` are pooled into one stream (in block order), of
``n_w = sum of their k_b`` indices.  That stream is split into byte-wide fields, low bits first:
field ``f`` holds bits ``[8f, 8f + b_f)`` of every index, ``b_f = min(8, w - 8f)``
(23 bits = fields of 8, 8 and 7 bits), and each field is packed with ``pack_codes`` (packing.py),
taking ``ceil(n_w * b_f / 8)`` bytes.

Body layout::

    index section    for each width w >= 1 present, ascending:  for f = 0 .. ceil(w/8)-1:
                         pack_codes(field f of the n_w indices, b_f bits)
    values section   the K = sum_b k_b kept values in block order (ascending position in each
                     block): K little-endian float32 (values="fp32"), or the body of the value
                     codec for ``Layout.flat(K)`` (values=<registered codec name>)

    body bytes = sum_w sum_f ceil(n_w * b_f / 8)  +  (4 * K  or  value_codec.body_nbytes(flat(K)))

No section is padded, so the values section may start at any byte; it is copied to an aligned
buffer when a view as float (or a value codec) needs one.

Error feedback.  With the hook's residuals this is top-k with memory (GRACE / DGC style): the
residual ``e = x - decode(body)`` holds every dropped value in full (plus the value codec's
error on the kept ones), is added to the next step's gradient, and so every coordinate is sent
once its accumulated value grows large enough.  Without error feedback the dropped mass is lost.
"""
from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch

from ._scratch import PerThreadScratch
from .base import Codec, EncodeInfo, Layout, all_finite, sum_sq64
from .blocks import blocks_for, check_block_size
from .options import check_int
from .packing import pack_codes, packed_nbytes, unpack_codes

FP32 = "fp32"
_ALIGN = 16  # value codecs view their body as float32 (or wider) in place
_MAX_PLANS = 64  # layouts cached per codec; DDP has a handful of buckets


class _Plan:
    """Everything about one layout that does not depend on the data."""

    def __init__(self, codec: "TopKCodec", layout: Layout):
        blocks = blocks_for(layout, codec.block_size)
        self.runs = []        # (start, nblocks, block_len, k per block)
        bases, widths = [], []
        for start, nb, blen, _ in blocks.runs:
            k = codec.k_for(blen)
            self.runs.append((start, nb, blen, k))
            bases.append(np.repeat(start + blen * np.arange(nb, dtype=np.int64), k))
            widths.append(np.full(nb * k, (blen - 1).bit_length(), dtype=np.int64))
        self.k_total = sum(nb * k for _, nb, _, k in self.runs)
        base = np.concatenate(bases) if bases else np.zeros(0, dtype=np.int64)
        width = np.concatenate(widths) if widths else np.zeros(0, dtype=np.int64)
        # slots in block order -> grouped by width: a stable sort keeps block order in a group
        order = np.argsort(width, kind="stable")
        identity = bool(np.all(order == np.arange(order.size)))
        self._host = (base, None if identity else order, None if identity else np.argsort(order))
        self.groups = []      # (w, first grouped slot, n_w, [(shift, bits, byte offset, nbytes)])
        offset = slot = 0
        for w, n_w in zip(*np.unique(width, return_counts=True)):
            w, n_w = int(w), int(n_w)
            fields = []
            for shift in range(0, w, 8):
                b = min(8, w - shift)
                nbytes = packed_nbytes(n_w, b)
                fields.append((shift, b, offset, nbytes))
                offset += nbytes
            self.groups.append((w, slot, n_w, fields))
            slot += n_w
        self.index_nbytes = offset
        self.value_layout = Layout.flat(self.k_total)
        vc = codec.value_codec
        self.values_nbytes = 4 * self.k_total if vc is None else vc.body_nbytes(self.value_layout)
        self.nbytes = self.index_nbytes + self.values_nbytes
        self._device: dict[torch.device, tuple] = {}

    def tensors(self, device: torch.device):
        """(block start per slot, block -> grouped gather, grouped -> block order gather) on ``device``;
        the gathers are None when all indices have one width."""
        t = self._device.get(device)
        if t is None:
            base, order, inverse = self._host
            conv = (lambda a: None if a is None else torch.from_numpy(a).to(device))
            t = self._device[device] = (conv(base), conv(order), conv(inverse))
        return t


def _aligned(t: torch.Tensor) -> torch.Tensor:
    if t.data_ptr() % _ALIGN or t.storage_offset() % _ALIGN:
        return t.clone()
    return t


class TopKCodec(PerThreadScratch, Codec):
    """Top-k magnitude sparsification per block; values as float32 or through any registered codec."""

    name = "topk"
    codec_id = 13
    stochastic = False  # per instance: that of the value codec
    body_formula = ("sum_w sum_f ceil(n_w*min(8,w-8f)/8) [w=ceil(log2 block_len), n_w=kept indices of width w] "
                    "+ 4*K (values=fp32) or value_codec body(K); K=sum_b k_b")
    summary = "top-k |x| per block: packed block-relative indices + fp32 or any codec for the kept values"
    examples = ((8, {"ratio": 0.1}), (4, {"k": 3, "block_size": "layer", "values": "stochastic"}))
    # (ratio / k / values / value_block_size depend on each other: the fuzzer's strategy is in tests/codec_specs/topk.py)
    fidelity_configs = (("topk 1% fp32", 8, {"ratio": 0.01}), ("topk 10% fp32", 8, {"ratio": 0.1}),
                        ("topk 10% + stochastic 4b", 4, {"ratio": 0.1, "values": "stochastic"}),
                        ("topk 10% + qsgd 4b", 4, {"ratio": 0.1, "values": "qsgd"}))

    def __init__(self, bits: int = 8, block_size: int | str | None = None, ratio: float | None = None,
                 k: int | None = None, values: str = FP32, value_block_size: int | str | None = None):
        block_size = check_block_size(self.name, block_size)
        if ratio is not None and k is not None:
            raise ValueError(f"{self.name}: give either ratio (fraction kept per block) or k (values kept per "
                             f"block), not both; got ratio={ratio!r}, k={k!r}")
        if k is not None:
            k = check_int(self.name, "k", k, 1, "a positive integer (values kept per block)")
            self._ratio = None
        else:
            if ratio is None:
                ratio = 0.01
            if (isinstance(ratio, bool) or not isinstance(ratio, numbers.Real)
                    or not math.isfinite(float(ratio)) or not 0 < float(ratio) <= 1):
                raise ValueError(f"{self.name}: ratio must be a number in (0, 1] (fraction kept per block), "
                                 f"got {ratio!r}")
            ratio = float(ratio)
            self._ratio = Fraction(repr(ratio))  # the decimal the user wrote (see module docstring)
        self.value_codec = self._make_value_codec(values, bits, value_block_size)
        super().__init__(32 if self.value_codec is None else self.value_codec.bits)
        self.block_size = block_size
        self.ratio = None if k is not None else ratio
        self.k = k
        self.values = values
        self.value_block_size = value_block_size
        self.stochastic = bool(self.value_codec is not None and self.value_codec.stochastic)
        self._plans: dict[Layout, _Plan] = {}

    def _make_value_codec(self, values, bits, value_block_size):
        from . import CODECS, make_codec  # lazily: the registry imports this module

        choices = [FP32] + sorted(n for n in CODECS if n != self.name)
        if not isinstance(values, str) or values not in choices:
            why = " (top-k cannot nest in itself)" if values == self.name else ""
            raise ValueError(f"{self.name}: values must be one of {', '.join(choices)}{why}, got {values!r}")
        if values == FP32:
            if isinstance(bits, bool) or bits not in (8, 32):
                raise ValueError(f"{self.name}: values='fp32' sends 32-bit values, so bits must be 32 "
                                 f"(or the default 8), got {bits!r}")
            if value_block_size is not None:
                raise ValueError(f"{self.name}: value_block_size only applies to a value codec, not "
                                 f"values='fp32'; choose values from {', '.join(choices[1:])}")
            return None
        options = {} if value_block_size is None else {"block_size": value_block_size}
        try:
            return make_codec(values, bits, **options)
        except ValueError as e:
            raise ValueError(f"{self.name}: value codec {values!r}: {e}") from None

    def config(self) -> dict:
        return {"codec": self.name, "bits": self.bits, "block_size": self.block_size, "ratio": self.ratio,
                "k": self.k, "values": self.values,
                "value_config": None if self.value_codec is None else dict(self.value_codec.config())}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_plans", "_scratch")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._plans, self._scratch = {}, {}

    # -- sizes -------------------------------------------------------------------------------
    def k_for(self, block_len: int) -> int:
        """Values kept in a block of ``block_len`` values."""
        if block_len <= 0:
            return 0
        if self.k is not None:
            return min(self.k, block_len)
        r = self._ratio
        return min(block_len, max(1, -(-r.numerator * block_len // r.denominator)))

    def k_per_block(self, layout: Layout) -> tuple[int, ...]:
        return tuple(self.k_for(n) for n in layout.block_lengths(self.block_size))

    def _plan(self, layout: Layout) -> _Plan:
        plan = self._plans.get(layout)
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            plan = self._plans[layout] = _Plan(self, layout)
        return plan

    def body_nbytes(self, layout: Layout) -> int:
        return self._plan(layout).nbytes

    # -- encode ------------------------------------------------------------------------------
    def encode(self, x, body, layout, key=0, error_out=None):
        self._check_numel("input", x, layout)
        plan = self._plan(layout)
        if body.numel() != plan.nbytes:
            raise ValueError(f"body has {body.numel()} bytes, {self.name} needs {plan.nbytes} for this layout")
        xf = x if x.dtype == torch.float32 else x.float()
        if xf.numel() == 0:
            if self.value_codec is not None:
                self.value_codec.encode(xf, body, plan.value_layout, key=key)
            return EncodeInfo(True, 0.0, 0.0) if error_out is not None else EncodeInfo()
        # |x| into a per-thread buffer: no bucket-sized allocation per step
        mag = torch.abs(xf.view(-1), out=self._scratch_for(x.device).get("mag", xf.numel(), torch.float32))
        # left on the device (max propagates NaN): a non-finite input still gets a body, the flag marks it
        finite = torch.isfinite(mag.max())
        rel_parts, val_parts = [], []
        for start, nb, blen, k in plan.runs:
            xv = xf[start:start + nb * blen].view(nb, blen)
            if k == blen:
                rel = torch.arange(blen, device=x.device).expand(nb, blen)
                vals = xv
            else:
                rel = torch.topk(mag[start:start + nb * blen].view(nb, blen), k, dim=1, sorted=False).indices
                rel = rel.sort(dim=1).values
                vals = xv.gather(1, rel)
            rel_parts.append(rel.reshape(-1))
            val_parts.append(vals.reshape(-1))
        rel = torch.cat(rel_parts)
        vals = torch.cat(val_parts)
        base, to_grouped, _ = plan.tensors(x.device)
        grouped = rel if to_grouped is None else rel[to_grouped]
        for w, first, n_w, fields in plan.groups:
            if w == 0:
                continue
            g = grouped[first:first + n_w]
            for shift, bits, offset, nbytes in fields:
                codes = (g >> shift).bitwise_and_((1 << bits) - 1).to(torch.uint8)
                pack_codes(codes, bits, out=body[offset:offset + nbytes])
        section = body[plan.index_nbytes:]
        if self.value_codec is None:
            section.copy_(vals.view(torch.uint8))
            sent = vals
        else:
            target = _aligned(section)
            info = self.value_codec.encode(vals, target, plan.value_layout, key=key)
            finite = all_finite([EncodeInfo(finite), info])
            if target is not section:
                section.copy_(target)
            sent = None
            if error_out is not None:
                sent = torch.empty_like(vals)
                self.value_codec.decode([target], plan.value_layout, sent)
        if error_out is None:
            return EncodeInfo(finite)
        # x - decode(body): the input everywhere, minus what the receivers get at the kept positions
        err = error_out if error_out.dtype == torch.float32 else torch.empty(xf.shape, dtype=torch.float32, device=x.device)
        err.copy_(xf)
        err.index_copy_(0, rel + base, vals - sent)
        if err is not error_out:
            error_out.copy_(err)
        return EncodeInfo(finite, sum_sq64(error_out.reshape(-1)), sum_sq64(xf.reshape(-1)))

    # -- decode ------------------------------------------------------------------------------
    def _positions(self, body: torch.Tensor, plan: _Plan, device) -> torch.Tensor:
        base, _, from_grouped = plan.tensors(device)
        grouped = torch.zeros(plan.k_total, dtype=torch.int64, device=device)
        for w, first, n_w, fields in plan.groups:
            if w == 0:
                continue  # one-value blocks: the index is 0
            g = grouped[first:first + n_w]
            for shift, bits, offset, nbytes in fields:
                codes = unpack_codes(body[offset:offset + nbytes], bits, n_w)
                g.bitwise_or_(codes.to(torch.int64) << shift)
        rel = grouped if from_grouped is None else grouped[from_grouped]
        return rel.add_(base)

    def _values(self, body: torch.Tensor, plan: _Plan) -> torch.Tensor:
        section = _aligned(body[plan.index_nbytes:])
        if self.value_codec is None:
            return section.view(torch.float32)
        vals = torch.empty(plan.k_total, dtype=torch.float32, device=body.device)
        return self.value_codec.decode([section], plan.value_layout, vals)

    def decode(self, bodies: Sequence[torch.Tensor], layout: Layout, out: torch.Tensor, divisor: int = 1) -> torch.Tensor:
        self._check_numel("output", out, layout)
        if layout.numel == 0 or not bodies:
            return out.zero_()
        plan = self._plan(layout)
        acc = out.zero_() if out.dtype == torch.float32 else torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        # one index_add per body: positions within a body are distinct, so no two atomic adds
        # meet on accelerators and the result is deterministic
        for body in bodies:
            if body.numel() != plan.nbytes:
                raise ValueError(f"body has {body.numel()} bytes, {self.name} needs {plan.nbytes} for this layout")
            vals = self._values(body, plan)
            if divisor != 1:  # each share divided before summing, as DDP's fp32 allreduce does
                vals = vals / divisor
            acc.index_add_(0, self._positions(body, plan, out.device), vals)
        if acc is not out:
            out.copy_(acc)
        return out
