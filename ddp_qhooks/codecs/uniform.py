"""Uniform min-max quantization: deterministic round-to-nearest and unbiased stochastic rounding.

Grid: ``L = 2**bits - 1`` equal steps between a block's min ``lo`` and max ``hi``; value ``x`` gets
code ``c`` in ``0..L`` and decodes to ``lo + c * (hi - lo) / L``.  ``uniform`` rounds to the
nearest level (error <= half a step); ``stochastic`` rounds up with probability equal to the
fractional position between two levels, so ``E[decode(encode(x))] = x``.

Body layout (little-endian)::

    nblocks x (lo: float32, hi: float32)      block metadata, in block order
    packed codes                               ceil(numel * bits / 8) bytes, see packing.py

Blocks (see blocks.py): by default one block per bucket; ``block_size="layer"`` gives one block per
parameter.  With ``block_size=B`` every parameter of the bucket is cut
into its own blocks of ``B`` elements (the last block of a parameter may be shorter), so blocks never
straddle two parameters and results do not depend on DDP's bucketing.  The per-block path lives
in ``_uniform_blocks.py``.

Speed (one block per bucket): the data is processed in cache-sized chunks; per chunk one fused
``window + inv * x`` op (the window holds the offset and the rounding term or dither), one
truncating float->uint8 cast and the integer packing, so the float input is read from memory once
for the min/max and once for the codes.  ``compile=True`` fuses the affine op and the cast.
"""
from __future__ import annotations

import math
import threading
from typing import Sequence

import numpy as np
import torch

from . import _fused, _random
from ._uniform_blocks import _FP32_MAX, _MIN_NORMAL_STEP, CHUNK, BlockPath, _Scratch
from .base import Codec, EncodeInfo, Layout, reads_on_host, sum_sq as _sq
from .blocks import DEFAULT_BLOCK_SIZE, check_block_size
from .options import check_bits
from .packing import (
    PLANAR_BITS,
    STRIPE,
    VALID_BITS,
    pack_codes,
    packed_nbytes,
    planes,
    unpack_codes,
)

_HALF = torch.tensor([0.5])  # round-to-nearest term of the compiled kernel


class UniformCodec(BlockPath, Codec):
    """Deterministic min-max quantizer, ``bits`` in 1..8, optional per-parameter ``block_size``."""

    name = "uniform"
    codec_id = 1
    stochastic = False
    body_formula = "8*blocks + ceil(n*b/8)"
    summary = "round-to-nearest on a min-max grid of 2^b levels (error <= half a step)"
    examples = ((4, {}),)
    fidelity_configs = (("uniform 8b", 8, {}), ("uniform 4b", 4, {}), ("uniform 2b", 2, {}), ("uniform 1b", 1, {}))

    def __init__(self, bits: int = 8, block_size: int | str | None = DEFAULT_BLOCK_SIZE, compile: bool = False):
        bits = check_bits(self.name, bits, self.valid_bits[0], self.valid_bits[-1])
        block_size = check_block_size(self.name, block_size)
        if not isinstance(compile, bool):
            raise ValueError(f"{self.name}: compile must be True or False, got {compile!r}")
        super().__init__(bits)
        self.block_size = block_size
        self.compile = compile  # a local speed choice: not part of config(), ranks may differ
        self.levels = self._levels_for(bits)  # the grid has levels + 1 points, codes 0..levels
        self._scratch: dict[tuple, _Scratch] = {}
        self._masks: dict[torch.device, torch.Tensor] = {}  # per-plane byte masks of the planar decoder

    valid_bits = VALID_BITS

    @staticmethod
    def _levels_for(bits: int) -> int:
        return (1 << bits) - 1

    def _range_one(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) of the grid for one block: its min and max."""
        return torch.aminmax(x)

    def _range_run(self, view: torch.Tensor, lo_out: torch.Tensor, hi_out: torch.Tensor) -> None:
        """Per-row (lo, hi) of a (blocks, block_len) view, written into float32 metadata."""
        if view.dtype == torch.float32:
            torch.amin(view, 1, out=lo_out)
            torch.amax(view, 1, out=hi_out)
        else:
            lo_out.copy_(view.amin(1))
            hi_out.copy_(view.amax(1))

    def config(self) -> dict:
        return {"codec": self.name, "bits": self.bits, "block_size": self.block_size}

    def __getstate__(self):  # buffers and caches are rebuilt on use; keep pickles small
        return {k: v for k, v in self.__dict__.items() if k not in ("_scratch", "_masks")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._scratch, self._masks = {}, {}

    # -- sizes -------------------------------------------------------------------------------
    def body_nbytes(self, layout: Layout) -> int:
        return 8 * len(layout.block_lengths(self.block_size)) + packed_nbytes(layout.numel, self.bits)

    def _split(self, body: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
        nblocks = len(layout.block_lengths(self.block_size))
        meta = body[: 8 * nblocks].view(torch.float32).view(nblocks, 2)
        return meta, body[8 * nblocks:]

    def _scratch_for(self, device: torch.device, numel: int) -> _Scratch:
        # One set per thread: DDP encodes bucket k+1 on the autograd thread while the
        # communication thread decodes bucket k, and torch releases the GIL inside ops.
        chunk = CHUNK if device.type == "cpu" else max(CHUNK, (numel + 7) // 8 * 8)
        key = (device, threading.get_ident())
        s = self._scratch.get(key)
        if s is None or s.chunk < chunk:
            s = self._scratch[key] = _Scratch(device, chunk)
        return s

    def _fits_fp32(self, step_min: float, step_max: float, offset_min: float, value_max: float) -> bool:
        """Can a grid be applied in float32 without overflow, subnormal steps, or codes drowned in
        the round-off of large offsets?  Arguments are extremes over the blocks: the smallest and
        largest non-zero step (``step_max <= 0``: all blocks constant), the smallest non-zero
        ``|lo|`` and the largest ``max(|lo|, |hi|)``."""
        if step_max <= 0:
            return value_max < _FP32_MAX / 4
        if offset_min < _MIN_NORMAL_STEP:
            return False
        return step_max < _FP32_MAX / 4 / self.levels and step_min > _MIN_NORMAL_STEP and value_max < _FP32_MAX / 4

    def _scalar_grid_ok_fp32(self, lo: float, span: float) -> bool:
        """:meth:`_fits_fp32` for one block, in plain Python (no tensor ops on the hot path)."""
        step = span / self.levels
        return self._fits_fp32(step, step, abs(lo) if lo != 0 else math.inf, max(abs(lo), abs(lo + span)))

    # -- encode ------------------------------------------------------------------------------
    def encode(self, x, body, layout, key=0, error_out=None):
        self._check_numel("input", x, layout)
        meta, codes = self._split(body, layout)
        if x.numel() == 0:
            return EncodeInfo(True, 0.0, 0.0) if error_out is not None else EncodeInfo()
        if self.block_size is None and reads_on_host(x.device):
            return self._encode_one_block(x, meta, codes, _random.splitmix64(key, layout.param_keys[0]), error_out)
        if self.block_size is None:  # the one-block path reads its range on the host: take the per-block one
            x = x if x.dtype == torch.float32 else x.float()
            flat = Layout.flat(x.numel())
            return self._encode_blocks(x, meta, codes, flat, None, _random.splitmix64(key, layout.param_keys[0]),
                                       error_out)
        return self._encode_blocks(x, meta, codes, layout, self.block_size, key, error_out)

    def _encode_one_block(self, x, meta, codes, key, error_out):
        if x.dtype != torch.float32:
            x = x.float()  # half-precision buckets: compute (and form residuals) in float32
        lo_t, hi_t = self._range_one(x)
        meta[0, 0] = lo_t
        meta[0, 1] = hi_t
        lo, hi = meta[0].tolist()
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return EncodeInfo(finite=False)
        span = hi - lo  # float64: cannot overflow
        if not self._scalar_grid_ok_fp32(lo, span):
            return self._encode_blocks(x, meta, codes, Layout.flat(x.numel()), None, key, error_out, meta_done=True)
        inv = self.levels / span if span > 0 else 0.0
        scale = span / self.levels
        s = self._scratch_for(x.device, x.numel())
        bits, levels, n = self.bits, self.levels, x.numel()
        chunk = s.chunk
        mag = max(abs(lo), abs(hi))
        # Fast path: ONE fused op per chunk, v = window + inv * x, where the window holds -lo*inv
        # plus the rounding term (0.5 for nearest, the dither for stochastic), then ONE truncating
        # cast to uint8.  The round-off of v is below err code units; when values sit far from
        # zero relative to their spread, subtract lo first (exact for nearby values) instead.
        fast_err = (mag * inv + levels + 2) * 2.0 ** -21   # bound on the round-off of v
        precise = 2 * fast_err > _random.CAP_MARGIN
        bias = 0.0 if precise else -lo * inv
        on_cpu = x.device.type == "cpu"
        period = min(n, _random.PERIOD) if self.stochastic else None
        done, compiled_codes = 0, None
        if self.compile and on_cpu:
            done, compiled_codes = self._encode_compiled(x, codes, key, bias, lo if precise else 0.0, inv, s)
        err_sq = inp_sq = 0.0
        res_upto = 0  # the residual of [0, res_upto) comes from a compiled kernel too
        if done and error_out is not None and error_out.dtype == torch.float32 and error_out.is_contiguous():
            # the prefix whose codes the kernels computed (stochastic non-planar widths did the tail
            # after the last whole period eagerly), in whole chunks
            upto = done if bits in PLANAR_BITS or not self.stochastic else n // period * period
            res_upto = upto // chunk * chunk
            if res_upto:
                sums = self._residual_compiled(x[:res_upto], error_out.view(-1)[:res_upto], key, bias,
                                               lo if precise else 0.0, inv, lo, scale)
                if sums is None:
                    res_upto = 0
                else:
                    err_sq, inp_sq = float(sums[0]), float(sums[1])
        if done == n:
            window = None
        elif self.stochastic:
            # one period of dither (+ offset), small enough to stay in cache while it is applied
            # to every period-long row of the chunk; the pool's cap keeps v = y + u below L + 1
            # despite round-off, so no clamp is needed
            window = _random.fill_dither(s.window[:period], key, add=bias)
        else:
            window = s.window[:min(chunk, n)].fill_(bias + 0.5)  # v <= L + 0.5 + err: no clamp
        # last chunk first: the min/max pass just streamed through x, so its tail is still cached
        for a in reversed(range(0, n, chunk)):
            c = min(chunk, n - a)
            xc = x[a:a + c]
            if a + c <= res_upto:  # codes and residual both compiled
                break
            if a < done:  # the compiled kernel wrote these codes
                if error_out is None:
                    break
                if compiled_codes is not None:
                    cu = compiled_codes[a:a + c]
                else:
                    cu = unpack_codes(codes[a * bits // 8: packed_nbytes(a + c, bits)], bits, c, out=s.u8[:c])
            else:
                cu = codes[a:a + c] if bits == 8 else s.u8[:c]
                v = s.f32[:c]
                src = xc
                if precise:
                    src = torch.sub(xc, lo, out=v)
                if period is None:
                    torch.add(window[:c], src, alpha=inv, out=v)
                else:  # chunks start at multiples of the period: rows line up with the window
                    full = c // period * period
                    torch.add(window, src[:full].view(-1, period), alpha=inv, out=v[:full].view(-1, period))
                    if full < c:
                        torch.add(window[:c - full], src[full:], alpha=inv, out=v[full:])
                if on_cpu:
                    # numpy's float32 -> uint8 cast is vectorised (torch's is not): truncation, and
                    # -1 < v < L + 1 by construction, so truncation == floor and no clamp is needed
                    np.copyto(cu.numpy(), v.numpy(), casting="unsafe")
                else:
                    cu.copy_(v.clamp_(0, levels))
                if bits != 8:
                    pack_codes(cu, bits, out=codes[a * bits // 8: packed_nbytes(a + c, bits)], scratch=s.lanes)
            if error_out is not None:
                ec = error_out[a:a + c]
                d = s.f32b[:c]
                d.copy_(cu)
                torch.sub(xc, lo, out=ec)   # (x - lo) first: accurate for values near lo
                ec.sub_(d, alpha=scale)
                err_sq += _sq(ec, mag)
                inp_sq += _sq(xc, mag)
        if error_out is not None:
            return EncodeInfo(True, err_sq, inp_sq)
        return EncodeInfo()

    def _encode_compiled(self, x, codes, key, bias, shift, inv, s):
        """Compiled kernels over whole buckets (their per-call overhead is ~0.1 ms, so no chunks),
        reading one period of dither straight from the pool, exactly as the chunked path.

        Returns ``(done, codes)``: elements ``[0, done)`` are encoded into ``codes`` (``done`` is 0
        when the kernel is unavailable, and may stop at the last full stripe for the planar widths,
        whose kernel writes packed bytes directly), and their uint8 codes when they exist
        unpacked (else None)."""
        n, bits = x.numel(), self.bits
        rounding = self._rounding(key, n, x.device)
        if bits in PLANAR_BITS:  # whole stripes, and the last one when its planes are whole periods
            parts, outs, upto = _fused.planar_parts(x, codes, bits, _random.PERIOD if self.stochastic else 1)
            ok = parts and _fused.affine_to_planar(parts, rounding, bias, shift, inv, outs, bits)
            return (upto, None) if ok else (0, None)
        cu = codes[:n] if bits == 8 else s.whole(n)[0]
        if self.stochastic:
            period = rounding.numel()
            full = n // period * period
            ok = _fused.affine_to_codes(x[:full].view(-1, period), rounding, bias, shift, inv, cu[:full].view(-1, period))
            if ok and full < n:  # the tail (< one period) in eager ops: a 2nd compiled call costs more
                v = s.f32[:n - full] if n - full <= s.chunk else torch.empty(n - full, dtype=torch.float32)
                torch.add(rounding[:n - full], bias, out=v)
                xt = x[full:] if not shift else x[full:] - shift
                torch.add(v, xt, alpha=inv, out=v)
                np.copyto(cu[full:].numpy(), v.numpy(), casting="unsafe")
        else:
            ok = _fused.affine_to_codes(x.view(1, n), rounding, bias, shift, inv, cu.view(1, n))
        if not ok:
            return 0, None
        if bits != 8:  # in cache-sized pieces: ~2x faster than one pass over the bucket
            for a in range(0, n, CHUNK):
                c = min(CHUNK, n - a)
                pack_codes(cu[a:a + c], bits, out=codes[a * bits // 8: packed_nbytes(a + c, bits)], scratch=s.whole(n)[1])
        return n, cu

    def _residual_compiled(self, x, err, key, bias, shift, inv, lo, scale):
        """The residual and squared sums of the compiled codes of ``x`` (a prefix of whole dither
        periods), or None when the kernel is unavailable."""
        rounding = self._rounding(key, x.numel(), x.device)
        if self.stochastic:
            x, err = x.view(-1, _random.PERIOD), err.view(-1, _random.PERIOD)
        return _fused.affine_residual(x, rounding, bias, shift, inv, lo, scale, err)

    def _rounding(self, key, n, device) -> torch.Tensor:
        """The compiled kernels' rounding term: 1/2, or one period of the keyed dither (the window
        the chunked path applies to every period-long row)."""
        if self.stochastic:
            return _random.PeriodDither(n, key, device).window
        return _HALF.to(device)

    # -- decode ------------------------------------------------------------------------------
    def decode(self, bodies: Sequence[torch.Tensor], layout: Layout, out: torch.Tensor, divisor: int = 1) -> torch.Tensor:
        self._check_numel("output", out, layout)
        if layout.numel == 0 or not bodies:
            return out.zero_()
        parts = [self._split(b, layout) for b in bodies]
        if not reads_on_host(out.device):  # float64 for every grid: no test to read
            return self._decode_blocks(parts, layout, out, divisor, torch.float64, False)
        if self.block_size is None:  # scalars in plain Python: no tensor ops on the hot path
            lohi = torch.stack([m[0] for m, _ in parts]).tolist()
            spans = [hi - lo for lo, hi in lohi]
            const = sum(lo for lo, _ in lohi) / divisor
            if abs(const) < _FP32_MAX / 4 and all(self._scalar_grid_ok_fp32(lo / divisor, sp / divisor)
                                                 for (lo, _), sp in zip(lohi, spans)):
                scales = [sp / self.levels / divisor for sp in spans]
                return self._decode_one_block([c for _, c in parts], scales, const, out)
            return self._decode_blocks(parts, layout, out, divisor, torch.float64)
        metas = torch.stack([m for m, _ in parts]).double()  # (W, nblocks, 2)
        lo, span = metas[..., 0], metas[..., 1] - metas[..., 0]
        ok = self._grid_ok_fp32(lo.reshape(-1) / divisor, span.reshape(-1) / divisor) & \
            (lo.abs().sum(0).amax() / divisor < _FP32_MAX / 4)
        # the decoder's one read: the working type, and whether a (never encoded) negative span occurs
        fp32, negative = torch.stack([ok, (span < 0).any()]).tolist()
        return self._decode_blocks(parts, layout, out, divisor, torch.float32 if fp32 else torch.float64, negative)

    def _decode_one_block(self, codes_list, scales, const, out):
        s = self._scratch_for(out.device, out.numel())
        bits, n, chunk = self.bits, out.numel(), s.chunk
        direct = out.dtype == torch.float32
        offset = s.f32b[:min(chunk, n)].fill_(const)
        planar = bits in PLANAR_BITS
        if planar:
            k = 8 // bits
            masks = self._plane_masks(out.device)
            # byte & (mask << shift) == code << shift: instead of unpacking, weight plane p by
            # scale / 2**(p*bits) (exact: a power-of-two rescaling of a normal float32)
            weights = torch.tensor([[scale / (1 << (p * bits)) for p in range(k)] for scale in scales],
                                   dtype=torch.float32).to(out.device).view(len(scales), 1, k, 1)
        for a in range(0, n, chunk):
            c = min(chunk, n - a)
            acc = out[a:a + c] if direct else s.window[:c]
            stripes = c // STRIPE if planar else 0
            e = stripes * STRIPE
            if stripes:
                m = STRIPE // k
                shape = (stripes, k, m)
                buf, f, a3 = s.u8[:e].view(shape), s.f32[:e].view(shape), acc[:e].view(shape)
            for i, (codes, scale) in enumerate(zip(codes_list, scales)):
                packed = codes[a * bits // 8: packed_nbytes(a + c, bits)]
                if not planar:
                    f1 = s.f32[:c]
                    f1.copy_(packed if bits == 8 else unpack_codes(packed, bits, c, out=s.u8[:c]))
                    if i == 0:
                        torch.add(offset[:c], f1, alpha=scale, out=acc)
                    else:
                        acc.add_(f1, alpha=scale)
                    continue
                if stripes:  # all full stripes at once: one AND, one conversion, one multiply-add
                    torch.bitwise_and(packed[:stripes * m].view(stripes, 1, m), masks, out=buf)
                    f.copy_(buf)
                    if i == 0:
                        torch.addcmul(offset[:e].view(shape), f, weights[i], out=a3)
                    else:
                        a3.addcmul_(f, weights[i])
                if e < c:  # a short last stripe, plane by plane
                    for el, by, shift in planes(acc[e:], packed[e * bits // 8:], bits):
                        size = el.numel()
                        f1 = s.f32[:size]
                        f1.copy_(torch.bitwise_and(by[:size], ((1 << bits) - 1) << shift, out=s.u8[:size]))
                        if i == 0:
                            torch.add(offset[e:e + size], f1, alpha=scale / (1 << shift), out=el)
                        else:
                            el.add_(f1, alpha=scale / (1 << shift))
            if not direct:
                out[a:a + c].copy_(acc)
        return out

    def _plane_masks(self, device):
        masks = self._masks.get(device)
        if masks is None:
            k = 8 // self.bits
            masks = torch.tensor([((1 << self.bits) - 1) << (p * self.bits) for p in range(k)], dtype=torch.uint8, device=device)
            self._masks[device] = masks = masks.view(1, k, 1)
        return masks

class StochasticCodec(UniformCodec):
    """Unbiased stochastic rounding on the uniform min-max grid: ``E[decode(encode(x))] = x``.

    Randomness is keyed by the ``key`` passed to ``encode`` (the hook derives it from seed, rank,
    step and bucket/parameter), see :mod:`ddp_qhooks.codecs._random`.
    """

    name = "stochastic"
    codec_id = 2
    stochastic = True
    summary = "unbiased stochastic rounding on a min-max grid of 2^b levels"
    examples = ((2, {"block_size": 16}), (8, {"block_size": "layer"}))
    fidelity_configs = (("stochastic 8b", 8, {}), ("stochastic 4b", 4, {}), ("stochastic 2b", 2, {}),
                        ("stochastic 1b", 1, {}), ("stochastic 4b, layer", 4, {"block_size": "layer"}),
                        ("stochastic 4b, block 256", 4, {"block_size": 256}),
                        ("stochastic 2b, block 256", 2, {"block_size": 256}))

    @property
    def error_feedback_diverges(self) -> bool:
        # with 2 levels (min, max) a value can round to the far end, an error of up to twice the
        # block's max |x|: fed back, residuals can double every step (measured: NaN within 13
        # steps on a 25M-parameter MLP).  Unbiased at 1 bit means: use it without error feedback.
        return self.levels == 1
