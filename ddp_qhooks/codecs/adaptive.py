"""Uniform quantization on a range from running per-block statistics: codec ``adaptive``.

Algorithm
    Each block (see blocks.py; default ``block_size="layer"``, one block per parameter) keeps a
    running range, updated by every encode *before* it is used, so a step quantizes with the
    statistics including its own observation and the first step uses exactly the observed range:

    * ``stat="minmax"``: running ``lo`` and ``hi`` from the block's observed min and max;
    * ``stat="percentile"``: a running ``c`` from the ``percentile``-th percentile of ``|x|``; the
      range is ``[-c, c]``.  The observation is the nearest-rank percentile of an evenly strided
      subsample of S = min(sample, block length) values at the indices ``floor(j * length / S)``:
      the k-th smallest ``|x|`` of the subsample with ``k = max(1, ceil(percentile * S / 100))``
      (evaluated in float64), found with ``torch.kthvalue``.  ``percentile=100`` takes the exact
      ``max|x|`` of the whole block instead.

    Update of each running bound ``r`` from the observation ``o`` (in float64; the first
    observation of a block initialises ``r = o``):

    * ``decay=None``: exponential moving average ``r = momentum * r + (1 - momentum) * o``;
    * ``decay=d``: time-decaying bound ``r = max(o, d * r)`` for ``hi`` and ``c``, and
      ``r = min(o, d * r)`` for ``lo``: the range widens at once to cover a new extreme and
      otherwise shrinks geometrically towards zero (``momentum`` is then unused).  A decaying
      range always contains the block's current values (never clips); for a block of one sign
      the bound nearer zero drifts to zero, i.e. the range then covers zero too.

    The range sent and used is ``(lo, hi)`` rounded to float32.  Values are clipped to it, then
    quantized on ``L = 2**bits - 1`` equal steps: code ``floor((x - lo) / step + u)`` with
    ``step = (hi - lo) / L``, ``u = 1/2`` for ``grid="uniform"`` (nearest level) or ``u`` the keyed
    dither of ``_random.ParamPeriodDither`` for ``grid="stochastic"`` (per parameter, one
    ``PERIOD``-long stretch of the dither pool repeated along it; unbiased within the range:
    ``E[decode] = clip(x)``).  A constant range (``lo == hi``) sends code 0.

Clipping and error feedback
    An EMA range lags behind the data and a percentile range cuts the tails on purpose, so values
    outside the range are clipped.  The clipped part is not lost: the hook's error feedback adds
    ``x - decode(body)`` (clipped part plus rounding error) to the next step's gradient.  Without
    error feedback it would be a biased, silently dropped part of the gradient, so the codec sets
    ``needs_error_feedback = True`` and the hook refuses to run it without.

Body layout (native byte order, little-endian on every supported platform)::

    nblocks x (lo: float32, hi: float32)     the range each block was quantized on, block order
    packed codes                              ceil(numel * bits / 8) bytes, see packing.py; code c
                                              of block j decodes to lo_j + c * (hi_j - lo_j) / L

    body bytes = 8 * blocks + ceil(n * b / 8)

Every payload carries its own ranges, so ranks keep their own statistics and need not agree on
them; decoding uses no state.

Speed
    ``compile=True`` (CPU, float32 ranges): the clip/scale/dither/floor steps run as one compiled
    pass (torch.compile; the first call compiles, a failure warns once and stays eager), bitwise the
    eager codes.  Not part of ``config()``: ranks may differ.

Running state
    Per rank, in the codec instance: float64 ``(lo, hi)`` (minmax) or ``c`` (percentile) per block
    and an update counter, keyed by (parameter key from ``layout.param_keys``, block index within
    that parameter) for ``block_size="layer"`` or an integer, so it survives DDP's bucket rebuild;
    by the whole layout for ``block_size=None`` (a rebuilt bucket starts afresh).  A parameter
    whose size no longer matches its state starts afresh.  :meth:`AdaptiveCodec.state_dict` /
    :meth:`load_state_dict` checkpoint it (tensors and plain Python values); the codec pickles
    with its state.  A non-finite input returns ``EncodeInfo(finite=False)`` before any update; on
    accelerators the flag stays on the device and the state is written as ``where(finite, new,
    old)`` (see _running.py): the same state, no host read.

Edge cases
    * all-zero or constant block whose range collapsed to that value: ``lo == hi``, exact.
    * huge values (up to float32 max): a range or step beyond float32 comfort (any bound above
      float32 max / 4) switches the per-element arithmetic to float64, in encode and decode (on
      accelerators every grid is float64: the test would be a host read); the
      decoder divides each body's range by ``divisor`` before summing, so averages cannot overflow.
    * tiny values: steps below 2**-100 (float32 products would lose bits near the subnormal range)
      are handled in float64 as well; the float32 range itself is exact down to subnormals.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from . import _random
from ._adaptive_compiled import CompiledPath
from ._blockscaled import CHUNK, pieces
from ._scratch import PerThreadScratch
from ._running import BlockState, RunningStateMixin, read_meta, sample_index, write_meta
from .base import Codec, EncodeInfo, Layout, reads_on_host
from .blocks import _row_minmax, blocks_for, check_block_size
from .options import check_bits, check_choice, check_int, check_real
from .packing import STRIPE, pack_codes, packed_nbytes, unpack_codes

STATS = ("minmax", "percentile")
GRIDS = ("stochastic", "uniform")
_FP32_MAX = float(torch.finfo(torch.float32).max)
_MIN_STEP = 2.0 ** -100   # smaller steps lose bits in float32 products

__all__ = ["AdaptiveCodec"]


class AdaptiveCodec(CompiledPath, PerThreadScratch, RunningStateMixin, Codec):
    """Uniform ``bits``-bit grid on a running min-max or percentile range per block; clips."""

    _state_field, _state_keys = "bounds", ("codec", "block_size", "stat")
    name = "adaptive"
    codec_id = 12
    stochastic = True   # the default grid; set per instance from ``grid``
    needs_error_feedback = True
    body_formula = "8*blocks + ceil(n*b/8)"
    summary = "uniform grid on a running (EMA or decaying) min-max or percentile range per block; clips, needs error feedback"
    examples = ((4, {}), (2, {"stat": "percentile", "block_size": 16}))
    option_space = {"stat": ("minmax", "percentile"), "percentile": (99.9, 50.0, 100.0, 1e-3),
                    "momentum": (0.9, 0.0, 0.5), "decay": (None, 0.5, 0.99), "grid": ("stochastic", "uniform"),
                    "sample": (65536, 1, 10, 1000)}
    fidelity_configs = (("adaptive 4b", 4, {}), ("adaptive 2b", 2, {}), ("adaptive 4b, p99.9", 4, {"stat": "percentile"}))

    def __init__(self, bits: int = 8, block_size: int | str | None = "layer", stat: str = "minmax",
                 percentile: float = 99.9, momentum: float = 0.9, decay: float | None = None,
                 grid: str = "stochastic", sample: int = 65536, compile: bool = False):
        bits = check_bits(self.name, bits)
        if not isinstance(compile, bool):
            raise ValueError(f"{self.name}: compile must be True or False, got {compile!r}")
        super().__init__(bits)
        self.compile = compile  # a local speed choice: not part of config(), ranks may differ
        self.block_size = check_block_size(self.name, block_size)
        self.stat = check_choice(self.name, "stat", stat, STATS)
        self.percentile = check_real(self.name, "percentile", percentile, lambda v: 0 < v <= 100,
                                     "a number in (0, 100]")
        self.momentum = check_real(self.name, "momentum", momentum, lambda v: 0 <= v < 1, "a number in [0, 1)")
        if decay is not None:
            decay = check_real(self.name, "decay", decay, lambda v: 0 < v < 1,
                               "None (moving average) or a number in (0, 1) (decaying bounds)")
        self.decay = decay
        self.grid = check_choice(self.name, "grid", grid, GRIDS)
        self.sample = check_int(self.name, "sample", sample, 1, "a positive integer (values per percentile)")
        self.stochastic = self.grid == "stochastic"
        self.levels = (1 << bits) - 1
        self._state = BlockState(self.block_size, 2 if self.stat == "minmax" else 1, torch.float64)

    def _pieces(self, layout: Layout, device):
        """Cache-sized pieces on the CPU (temporaries stay in cache); one per run elsewhere."""
        return pieces(layout, self.block_size, CHUNK if torch.device(device).type == "cpu" else max(layout.numel, 1))

    def config(self) -> dict:
        # decoding needs only bits and block_size; the statistics options are included so that
        # ranks (and checkpoints) quantizing on differently computed ranges are reported
        return {"codec": self.name, "bits": self.bits, "block_size": self.block_size, "stat": self.stat,
                "percentile": self.percentile, "momentum": self.momentum, "decay": self.decay,
                "grid": self.grid, "sample": self.sample}

    def body_nbytes(self, layout: Layout) -> int:
        return 8 * len(layout.block_lengths(self.block_size)) + packed_nbytes(layout.numel, self.bits)

    # -- state ---------------------------------------------------------------------------------

    # -- statistics ----------------------------------------------------------------------------
    def _observe(self, xf: torch.Tensor, blocks) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-block observation, (blocks, 2) min/max or (blocks, 1) percentile, and whether the
        input is finite (a 0-dim bool tensor, unread)."""
        if self.stat == "minmax":
            obs = torch.empty(blocks.count, 2, dtype=xf.dtype, device=xf.device)
            for view, sl in blocks.views(xf):
                obs[sl, 0], obs[sl, 1] = _row_minmax(view)
            return obs, torch.isfinite(obs).all()
        amax = blocks.reduce(xf, "absmax")   # also the finiteness check the subsample cannot give
        finite = torch.isfinite(amax).all()
        if self.percentile == 100:
            return amax[:, None], finite
        obs = torch.empty(blocks.count, 1, dtype=torch.float32, device=xf.device)
        for view, sl in blocks.views(xf):
            idx = sample_index(view.shape[1], self.sample, xf.device)
            smp = (view if idx is None else view[:, idx]).abs()
            S = smp.shape[1]
            k = max(1, math.ceil(self.percentile * S / 100))
            obs[sl, 0] = torch.kthvalue(smp, min(k, S), dim=1).values
        return obs, finite

    def _update(self, prev: torch.Tensor, have: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        if self.decay is None:
            upd = prev * self.momentum + obs * (1 - self.momentum)
        elif self.stat == "minmax":
            upd = torch.stack([torch.minimum(obs[:, 0], prev[:, 0] * self.decay),
                               torch.maximum(obs[:, 1], prev[:, 1] * self.decay)], 1)
        else:
            upd = torch.maximum(obs, prev * self.decay)
        return torch.where(have[:, None], upd, obs)

    # -- encode --------------------------------------------------------------------------------
    def encode(self, x, body, layout, key=0, error_out=None):
        self._check_numel("input", x, layout)
        n = layout.numel
        if n == 0:
            return EncodeInfo(True, 0.0, 0.0) if error_out is not None else EncodeInfo()
        xf = x if x.dtype == torch.float32 else x.float()
        blocks = blocks_for(layout, self.block_size)
        obs, finite = self._observe(xf, blocks)
        # reads: the host may read (the CPU), and takes the bounds as numbers; elsewhere the counts stay
        # on the device and finiteness a device flag (the state is kept where it is False)
        reads = reads_on_host(x.device)
        if reads:
            slots, prev, have, _, prior = self._state.read(layout, x.device)
            have = have.to(x.device)
        else:
            slots, prev, have, _, prior = self._state.read_on_device(layout, x.device)
        running = self._update(prev, have, obs.double())
        lohi = running if self.stat == "minmax" else torch.cat([-running, running], 1)
        meta = lohi.to(torch.float32)
        span = meta[:, 1].double() - meta[:, 0].double()   # float64: cannot overflow
        inv64 = torch.where(span > 0, self.levels / span, torch.zeros_like(span))
        work = torch.float64   # without the read: every grid in float64, which needs no test
        if reads:
            # the encoder's one read: finiteness (the state must stay as it was for a non-finite
            # input), the float32 test, and the bounds as numbers for the eager pieces
            head = torch.stack([finite, _fits_fp32(meta, span / self.levels)]).double()
            got = torch.cat([head, meta.double().t().reshape(-1), inv64, span / self.levels]).tolist()
            if not got[0]:
                return EncodeInfo(finite=False)
            finite = True
            work = torch.float32 if got[1] else torch.float64
        inv = inv64.to(work)
        lo_w, hi_w = meta[:, 0].to(work), meta[:, 1].to(work)
        host = None
        if reads:
            nb = meta.shape[0]
            host = (got[2:2 + nb], got[2 + nb:2 + 2 * nb], _as_work(got[2 + 2 * nb:2 + 3 * nb], work))
        dither = _random.ParamPeriodDither(layout, key, x.device) if self.stochastic else None
        s = self._scratch_for(x.device)
        packed = body[meta.numel() * 4:meta.numel() * 4 + packed_nbytes(n, self.bits)]
        codes = packed if self.bits == 8 else s.get("codes", n, torch.uint8)   # 8 bits: no packing
        fused = bounds = None   # stripe ranges the compiled pass packed itself
        if self.compile and x.device.type == "cpu" and work == torch.float32:
            # what _code_fn and _error take: lo, hi, inv and the decoder's step per block
            bounds = torch.stack([lo_w, hi_w, inv, (span / self.levels).to(work)])
            fused = self._encode_compiled(xf, layout, bounds, dither, codes, packed, s)
        if fused is None:
            self._encode_eager(xf, layout, lo_w, hi_w, inv, dither, codes, s, host)
            fused = []
        write_meta(body, meta)
        if self.bits != 8:   # stripes pack independently (packing.py): the ones the kernels left
            done = 0
            for first, end in fused + [(-(-n // STRIPE), None)]:
                if first * STRIPE > done:
                    stop = min(first * STRIPE, n)
                    pack_codes(codes[done:stop], self.bits, out=packed[done * self.bits // 8:packed_nbytes(stop, self.bits)])
                done = end * STRIPE if end is not None else n
        if reads:
            self._state.write(slots, running, prior)
        else:
            self._state.write_where(slots, running, prev, prior, finite)
        if error_out is not None:
            if bounds is not None and error_out.dtype == torch.float32 and error_out.is_contiguous():
                # the residual from the codes again, compiled
                sums = self._encode_compiled(xf, layout, bounds, dither, codes, packed, s, err=error_out.view(-1))
                if sums is not None:
                    return EncodeInfo(True, *sums)
            # x - decode(body), the decoder told what this read found (no second read)
            known = (work, [_as_work(got[2 + 3 * meta.shape[0]:], work)] if reads else None)
            self._decode([body], layout, error_out, 1, known)
            info = self._error_via_decode(x, body, layout, error_out, decoded=True)
            return EncodeInfo(finite, info.error_sq, info.input_sq)
        return EncodeInfo(finite)

    def _encode_eager(self, xf, layout, lo_w, hi_w, inv, dither, codes, s, host=None) -> None:
        work = lo_w.dtype
        parts = self._pieces(layout, xf.device)
        size = max(r * c for _, r, c, _ in parts)
        v_all, d_all = s.get("v", size, work), s.get("dither", size, torch.float32)
        on_cpu = xf.device.type == "cpu"
        numbers = reads_on_host(xf.device)   # the CPU, outside read_free()
        if numbers:  # a piece of one block takes its bounds as numbers: 6x faster than broadcasting
            lo_n, hi_n, inv_n = host if host is not None else (lo_w.tolist(), hi_w.tolist(), inv.tolist())
        # piece by piece (whole blocks or parts of one): the temporaries stay in cache
        for start, rows, cols, b in parts:
            m = rows * cols
            if numbers and rows == 1:
                lo_c, hi_c, inv_c = lo_n[b], hi_n[b], inv_n[b]
            else:
                lo_c, hi_c, inv_c = lo_w[b:b + rows, None], hi_w[b:b + rows, None], inv[b:b + rows, None]
            v = torch.clamp(xf[start:start + m].view(rows, cols).to(work), lo_c, hi_c, out=v_all[:m].view(rows, cols))
            v.sub_(lo_c).mul_(inv_c)
            if dither is None:
                v.add_(0.5)
            else:
                d = dither.piece(start, m, d_all)   # the piece's dither, or one window of it
                v.view(-1, d.numel()).add_(d)
            v.floor_().clamp_(0, self.levels)  # clamp: round-off at hi
            if on_cpu:  # numpy's float -> uint8 cast is vectorised (torch's is not); exact on 0..L
                with np.errstate(invalid="ignore"):   # NaN (read-free path): flagged, not warned about
                    np.copyto(codes[start:start + m].numpy(), v.view(-1).numpy(), casting="unsafe")
            else:
                codes[start:start + m].copy_(v.view(-1))

    # -- decode --------------------------------------------------------------------------------
    def decode(self, bodies: Sequence[torch.Tensor], layout: Layout, out: torch.Tensor, divisor: int = 1) -> torch.Tensor:
        return self._decode(bodies, layout, out, divisor)

    def _decode(self, bodies, layout, out, divisor, known=None) -> torch.Tensor:
        """``known``: ``(working type, per body the steps / divisor as numbers or None)``, from a
        caller that has read them (the encoder's residual); else this reads them once."""
        self._check_numel("output", out, layout)
        n = layout.numel
        if n == 0 or not bodies:
            return out.zero_()
        blocks = blocks_for(layout, self.block_size)
        meta_bytes = 8 * blocks.count
        metas = [read_meta(b, meta_bytes, (blocks.count, 2)) for b in bodies]
        steps = [(m[:, 1].double() - m[:, 0].double()) / self.levels for m in metas]
        reads = reads_on_host(out.device)   # and takes the steps as numbers
        nb = blocks.count
        if known is None and not reads:   # no read: float64 for every grid, which needs no test
            known = (torch.float64, None)
        if known is None:
            # the decoder's one read: the float32 test over every body, on the CPU the steps as numbers
            fits = _fits_fp32(torch.stack(metas), torch.stack(steps)).double().view(1)
            got = torch.cat([fits] + ([st / divisor for st in steps] if reads else [])).tolist()
            work = torch.float32 if got[0] else torch.float64
            steps_n = [_as_work(got[1 + i * nb:1 + (i + 1) * nb], work) for i in range(len(bodies))] if reads else None
        else:
            work, steps_n = known
        direct = out.dtype == work and out.is_contiguous()
        acc = out.view(-1) if direct else torch.empty(n, dtype=work, device=out.device)
        s = self._scratch_for(out.device)
        parts = self._pieces(layout, out.device)
        size = max(r * c for _, r, c, _ in parts)
        c_all, v_all = s.get("dcodes_f", size, work), s.get("dvals", size, work)
        codes = s.get("dcodes", n, torch.uint8)
        for i, (body, meta, step) in enumerate(zip(bodies, metas, steps)):
            # each share divided before summing: W shares near float32 max cannot overflow
            lo = (meta[:, 0].double() / divisor).to(work)
            step = (step / divisor).to(work)
            step_n = steps_n[i] if reads else None
            unpack_codes(body[meta_bytes:meta_bytes + packed_nbytes(n, self.bits)], self.bits, n, out=codes)
            for start, rows, cols, b in parts:
                m = rows * cols
                c = c_all[:m].view(rows, cols)
                c.copy_(codes[start:start + m].view(rows, cols))
                dst = acc[start:start + m].view(rows, cols)
                v = dst if i == 0 else v_all[:m].view(rows, cols)   # the first share straight into the output
                if reads and rows == 1:
                    # lo + c * step with one rounding, as addcmul (both fuse the multiply-add; tested
                    # bitwise equal), 4x faster than addcmul's broadcast operands
                    torch.add(lo[b], c, alpha=step_n[b], out=v)
                else:
                    torch.addcmul(lo[b:b + rows, None], c, step[b:b + rows, None], out=v)
                if i:
                    dst.add_(v)
        if not direct:
            out.copy_(acc.view(out.shape))
        return out


def _as_work(values: list, work: torch.dtype) -> list:
    """Float64 numbers as the working type holds them (float32: rounded to nearest, as ``.to``)."""
    if work == torch.float64:
        return values
    return np.asarray(values, dtype=np.float64).astype(np.float32).tolist()


def _fits_fp32(meta: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Can the grids ``meta`` (float32 lo, hi per block) with float64 ``step`` be applied in
    float32 without overflow or steps too small for float32 products?  A 0-dim bool tensor on
    their device (unread)."""
    if meta.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=meta.device)
    small = torch.where(step > 0, step, math.inf).amin()
    return (meta.abs().amax().double() < _FP32_MAX / 4) & (small >= _MIN_STEP)
