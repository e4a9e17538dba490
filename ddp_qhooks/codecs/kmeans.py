"""Non-uniform quantization with per-block 1-D k-means (Lloyd-Max) codebooks: codec ``kmeans``.

Algorithm
    Every block (see blocks.py; default one block per bucket) gets a sorted codebook of
    ``K = 2**bits`` levels.  Codebooks are fitted and kept *normalised*, i.e. for the block's values
    divided by their ``max|x|``, so they lie in [-1, 1].  A fit runs ``iterations`` Lloyd steps
    (assign every value to its nearest level, move each level to the mean of its values) on a
    deterministic subsample of the block: ``S = min(sample, block length)`` values at the indices
    ``floor(j * length / S)``, j = 0..S-1 (evenly strided; the whole block when it is short
    enough).  The sample is sorted once, so each Lloyd step costs K binary searches and prefix-sum
    differences instead of a pass over the sample.  A fit starts from the block's previous codebook
    (warm start) when there is one with at least two distinct levels, else from the mean of the
    sample's K quantiles and an even grid over the sample's range (strictly increasing, so no two
    levels start stuck together, and denser where the data is).  A level left without values keeps its
    position.  When the sample holds at most K distinct values the codebook is those values (the
    last one repeated to fill K slots), so such blocks round-trip exactly up to float32 rounding.

    A block is refitted on the first encode that sees it and then every ``refresh_every``-th
    encode of it (1 = every encode).  In between, the stored normalised codebook is reused,
    scaled by the block's current ``max|x|``; a stored codebook that collapsed to a single level
    (the block was constant or zero) is refitted at once instead, since scaling it cannot
    represent anything else.  On accelerators that decision is made on the device, without a host
    read: every block is fitted and the fit kept where it is due (see ``_encode_on_device``).

    Encoding picks the nearest level: the level index is the number of midpoints between
    neighbouring (normalised) levels below ``x / max|x|``, exactly ``torch.searchsorted`` (a
    batched ``bucketize``) on the midpoints, computed through a bin table on long blocks (see
    :func:`_nearest_codes`); exact ties go to the lower level.  Rounding is deterministic and
    ``key`` is unused.  Lloyd steps split the sample at the same midpoints, so a fit minimises the
    error of the encoder that uses it.

Body layout (native byte order, little-endian on every supported platform)::

    nblocks x K float32     the block's sorted codebook, already scaled by its max|x|, block order
    packed codes            ceil(numel * bits / 8) bytes, see packing.py; code c of a value in
                            block j decodes to codebook[j][c]

    body bytes = 4 * blocks * 2**b + ceil(n * b / 8)

Why the codebook travels in the payload
    Each rank fits its codebooks to its own gradients and needs no extra collective: agreeing on
    one codebook per block would cost an all-reduce (or broadcast) of the statistics per step or
    refresh, one more synchronisation point in the backward pass, and a codebook fitted on data
    the rank did not quantize.  With the codebook in the payload every body decodes on its own,
    ranks may refresh on different steps, and nothing beyond ``bits`` (hence K) and
    ``block_size`` must agree to decode, which the hook's configuration check already covers
    (``config()`` lists the fitting options too, so that differently configured ranks are
    reported rather than silently fitted differently).  The price is
    ``4 * K`` bytes per block: 1 KiB per block at 8 bits, negligible for per-bucket or per-layer
    blocks, but it dominates small integer ``block_size`` values at high bit widths.

Running state
    Per rank, in the codec instance: one normalised codebook per block and an encode counter,
    keyed by (parameter key from ``layout.param_keys``, block index within that parameter) for
    ``block_size="layer"`` or an integer, so it survives DDP's bucket rebuild; by the whole layout
    (parameter sizes and keys) for ``block_size=None``, where a rebuilt bucket starts afresh.  A
    parameter whose size no longer matches its stored state starts afresh too.  Entries are never
    dropped: those of layouts DDP stopped using (``block_size=None``) stay, a few K floats each.
    :meth:`KMeansCodec.state_dict` / :meth:`load_state_dict` checkpoint it (tensors and plain
    Python values only); the codec pickles with its state.  Decoding uses no state.

Edge cases
    * all-zero block: ``max|x| = 0``; the codebook is all zeros and every value decodes to 0.
    * constant block: a single distinct value, so the codebook is that value K times: exact.
    * huge values (up to float32 max): the normalised codebook is in [-1, 1] and is scaled in
      float64 before rounding to float32, so no level overflows; ``decode`` divides every body's
      codebook by ``divisor`` before summing, so averaging W bodies cannot overflow either.
    * tiny values: normalisation keeps their relative precision; only levels that fall in the
      float32 subnormal range (|level| < 1.2e-38) lose bits when scaled back.
    * non-finite input: ``encode`` returns ``EncodeInfo(finite=False)`` and keeps the state (on
      accelerators a device flag, and the state written as ``where(finite, new, old)``).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ._running import BlockState, RunningStateMixin, read_meta, sample_index, write_meta
from .base import Codec, EncodeInfo, Layout, reads_on_host
from .blocks import blocks_for, check_block_size
from .options import check_bits, check_int
from .packing import pack_codes, packed_nbytes, unpack_codes

__all__ = ["BlockState", "KMeansCodec"]


_LUT_MAX_BINS = 4096
_LUT_MIN_BINS = 256
_LUT_SLACK = 2.0 ** -20   # > the rounding of (u + 1) in float32 (2**-23), in units of u
_LUT_MAX_EXTRA = 8


def _nearest_codes(u: torch.Tensor, mids: torch.Tensor, out: torch.Tensor) -> None:
    """``out = number of mids < u`` per row (the nearest level, ties low), exactly as
    ``torch.searchsorted(mids, u)``.  u: (rows, length) in [-1, 1]; mids: (rows, K - 1) sorted.

    On the CPU searchsorted costs 15-45 ns per value; instead each row's [-1, 1] is cut into G
    equal bins and a table gives every bin the count of mids below it, less a slack that covers
    the float32 rounding of the bin index; the few mids that can still fall inside a bin (at most
    ``extra``) are compared explicitly.  That is a handful of streaming ops (~5 ns per value)
    plus 2 binary searches per bin.  Rows too short to amortise the tables, or codebooks packed
    so densely (repeated levels) that a bin holds many mids, use searchsorted directly.
    """
    rows, length = u.shape
    bins = min(_LUT_MAX_BINS, 1 << max(0, (length // 8).bit_length() - 1))
    if bins >= _LUT_MIN_BINS:
        edges = torch.linspace(-1.0, 1.0, bins + 1, dtype=torch.float64, device=u.device)
        lo = (edges[:-1] - _LUT_SLACK).to(torch.float32).expand(rows, bins).contiguous()
        hi = (edges[1:] + _LUT_SLACK).to(torch.float32).expand(rows, bins).contiguous()
        base = torch.searchsorted(mids, lo)
        extra = int((torch.searchsorted(mids, hi, right=True) - base).max())
        if extra <= _LUT_MAX_EXTRA:
            idx = (u + 1.0).mul_(bins / 2).to(torch.int32).clamp_(max=bins - 1)   # u + 1 >= 0: truncation is floor
            if rows > 1:
                idx += torch.arange(0, rows * bins, bins, dtype=torch.int32, device=u.device)[:, None]
            idx = idx.view(-1)
            code = base.to(torch.uint8).view(-1).index_select(0, idx)
            if extra:
                padded = torch.cat([mids, mids.new_full((rows, extra), math.inf)], 1)
                flat = u.reshape(-1)
                for j in range(extra):
                    code += flat > padded.gather(1, base + j).view(-1).index_select(0, idx)
            out.copy_(code.view(rows, length))
            return
    out.copy_(torch.searchsorted(mids, u, out_int32=True))


class KMeansCodec(RunningStateMixin, Codec):
    """Per-block k-means (Lloyd-Max) codebook of ``2**bits`` levels, sent with the codes."""

    _state_field, _state_keys = "codebooks", ("codec", "bits", "block_size")
    name = "kmeans"
    codec_id = 9
    stochastic = False
    body_formula = "4*blocks*2**b + ceil(n*b/8)"
    summary = "non-uniform levels from per-block 1-D k-means (Lloyd-Max), codebook sent in the payload"
    examples = ((3, {}), (2, {"block_size": "layer"}))
    option_space = {"sample": (65536, 1, 5, 100, 4096), "iterations": (8, 1, 3), "refresh_every": (10, 1, 2)}
    fidelity_configs = (("kmeans 4b", 4, {}), ("kmeans 2b", 2, {}), ("kmeans 2b, layer", 2, {"block_size": "layer"}))

    def __init__(self, bits: int = 8, block_size: int | str | None = "layer", sample: int = 65536,
                 iterations: int = 8, refresh_every: int = 10):
        bits = check_bits(self.name, bits)
        super().__init__(bits)
        self.block_size = check_block_size(self.name, block_size)
        self.sample = check_int(self.name, "sample", sample, 1, "a positive integer (values per fit)")
        self.iterations = check_int(self.name, "iterations", iterations, 1, "a positive integer (Lloyd steps per fit)")
        self.refresh_every = check_int(self.name, "refresh_every", refresh_every, 1,
                                       "a positive integer (refit every that many encodes; 1 = every encode)")
        self.levels = 1 << bits
        self._state = BlockState(self.block_size, self.levels, torch.float32)

    def config(self) -> dict:
        # only bits and block_size are needed to decode; the fitting options are included anyway so
        # that ranks (and checkpoints) running differently fitted codebooks are reported
        return {"codec": self.name, "bits": self.bits, "block_size": self.block_size, "sample": self.sample,
                "iterations": self.iterations, "refresh_every": self.refresh_every}

    def body_nbytes(self, layout: Layout) -> int:
        return 4 * self.levels * len(layout.block_lengths(self.block_size)) + packed_nbytes(layout.numel, self.bits)

    # -- encode --------------------------------------------------------------------------------
    def encode(self, x, body, layout, key=0, error_out=None):
        self._check_numel("input", x, layout)
        n = layout.numel
        if n == 0:
            return EncodeInfo(True, 0.0, 0.0) if error_out is not None else EncodeInfo()
        xf = x if x.dtype == torch.float32 else x.float()
        blocks = blocks_for(layout, self.block_size)
        amax = torch.empty(blocks.count, dtype=torch.float32, device=x.device)
        for view, sl in blocks.views(xf):
            lo, hi = torch.aminmax(view, dim=1)   # one pass, no |x| temporary; NaN propagates
            torch.maximum(hi, lo.neg_(), out=amax[sl])
        if not reads_on_host(x.device):
            return self._encode_on_device(x, xf, body, layout, blocks, amax, error_out)
        slots, cb, have, updates, prior = self._state.read(layout, x.device)
        # the encoder's one read of device data: finiteness (the state must stay as it was for a
        # non-finite input) and which codebooks can be rescaled (a single-level one cannot); which
        # blocks to refit is then decided on the host
        flags = torch.cat([torch.isfinite(amax).all().view(1), cb[:, -1] > cb[:, 0]]).tolist()
        if not flags[0]:
            return EncodeInfo(finite=False)
        usable = np.array(flags[1:], dtype=bool) & have.numpy()
        refit = ~usable | (updates.numpy() % self.refresh_every == 0)
        # dividing by 1 leaves an all-zero block at zero
        scale = torch.where(amax > 0, amax, torch.ones_like(amax))
        codes = torch.empty(n, dtype=torch.uint8, device=x.device)
        for start, nb, blen, bi in blocks.runs:
            view = xf[start:start + nb * blen].view(nb, blen)
            sl = slice(bi, bi + nb)
            r = refit[sl]
            if r.all():
                cb[sl] = self._fit(view, scale[sl], cb[sl], torch.from_numpy(usable[sl]).to(x.device))
            elif r.any():
                idx = np.flatnonzero(r)
                rows = torch.from_numpy(idx + bi).to(x.device)
                cb[rows] = self._fit(view.index_select(0, torch.from_numpy(idx).to(x.device)), scale[rows], cb[rows],
                                     torch.from_numpy(usable[idx + bi]).to(x.device))
            c = cb[sl]
            mids = ((c[:, :-1] + c[:, 1:]) * 0.5).contiguous()
            _nearest_codes(view / scale[sl, None], mids, codes[start:start + nb * blen].view(nb, blen))
        levels = (cb.double() * amax.double()[:, None]).to(torch.float32)
        write_meta(body, levels)
        meta_bytes = 4 * levels.numel()
        pack_codes(codes, self.bits, out=body[meta_bytes:meta_bytes + packed_nbytes(n, self.bits)])
        self._state.write(slots, cb, prior)
        if error_out is not None:
            return self._error_via_decode(x, body, layout, error_out)
        return EncodeInfo()

    def _encode_on_device(self, x, xf, body, layout, blocks, amax, error_out) -> EncodeInfo:
        """:meth:`encode` without a host read, where one would wait for the device: finiteness
        stays a device flag, and which codebooks to refit is decided there.  Every block is fitted
        and the fit kept where the CPU path would refit (``torch.where``), so codebooks, codes and
        state are the CPU path's; the state is written as it was where the input is not finite.
        The cost: a fit of every block (one sort of its subsample, ``iterations`` searches of K
        levels) on every encode instead of every ``refresh_every``-th."""
        n = layout.numel
        slots, cb, have, updates, prior = self._state.read_on_device(layout, x.device)
        finite = torch.isfinite(amax).all()
        usable = (cb[:, -1] > cb[:, 0]) & have   # a single-level codebook cannot be rescaled
        refit = ~usable | (updates % self.refresh_every == 0)
        scale = torch.where(amax > 0, amax, torch.ones_like(amax))
        codes = torch.empty(n, dtype=torch.uint8, device=x.device)
        new = torch.empty_like(cb)
        for start, nb, blen, bi in blocks.runs:
            view = xf[start:start + nb * blen].view(nb, blen)
            sl = slice(bi, bi + nb)
            fitted = self._fit(view, scale[sl], cb[sl], usable[sl])
            c = new[sl]
            torch.where(refit[sl, None], fitted, cb[sl], out=c)
            mids = ((c[:, :-1] + c[:, 1:]) * 0.5).contiguous()
            # searchsorted itself: the bin table of _nearest_codes needs its width read on the host
            codes[start:start + nb * blen].view(nb, blen).copy_(
                torch.searchsorted(mids, (view / scale[sl, None]).contiguous(), out_int32=True))
        levels = (new.double() * amax.double()[:, None]).to(torch.float32)
        write_meta(body, levels)
        meta_bytes = 4 * levels.numel()
        pack_codes(codes, self.bits, out=body[meta_bytes:meta_bytes + packed_nbytes(n, self.bits)])
        self._state.write_where(slots, new, cb, prior, finite)
        if error_out is not None:
            info = self._error_via_decode(x, body, layout, error_out)
            return EncodeInfo(finite, info.error_sq, info.input_sq)
        return EncodeInfo(finite)

    def _fit(self, values: torch.Tensor, scale: torch.Tensor, init: torch.Tensor, warm: torch.Tensor) -> torch.Tensor:
        """Normalised codebooks (rows, K) for the blocks ``values`` (rows, length)."""
        rows, length = values.shape
        K, dev = self.levels, values.device
        idx = sample_index(length, self.sample, dev)
        smp = values if idx is None else values[:, idx]
        ss = torch.sort((smp / scale[:, None]).clamp_(-1.0, 1.0), dim=1).values
        S = ss.shape[1]
        qpos = ((torch.arange(K, dtype=torch.float64, device=dev) + 0.5) * (S / K)).long().clamp_(max=S - 1)
        lo, hi = ss[:, :1], ss[:, -1:]
        even = lo + (hi - lo) * torch.linspace(0.0, 1.0, K, device=dev)
        c = torch.where(warm[:, None], init, 0.5 * ss[:, qpos] + 0.5 * even)
        # prefix sums in float64: cluster sums are differences of large partial sums
        cs = torch.zeros(rows, S + 1, dtype=torch.float64, device=dev)
        torch.cumsum(ss.double(), 1, out=cs[:, 1:])
        first = torch.zeros(rows, 1, dtype=torch.int64, device=dev)
        last = torch.full((rows, 1), S, dtype=torch.int64, device=dev)
        for _ in range(self.iterations):
            mids = ((c[:, :-1] + c[:, 1:]) * 0.5).contiguous()
            # values <= mids[i] belong to levels <= i: the same split as searchsorted in encode
            bounds = torch.cat([first, torch.searchsorted(ss, mids, right=True), last], 1)
            count = bounds[:, 1:] - bounds[:, :-1]
            sums = cs.gather(1, bounds[:, 1:]) - cs.gather(1, bounds[:, :-1])
            mean = (sums / count.clamp(min=1)).to(torch.float32)
            c = torch.where(count > 0, mean, c).sort(1).values
        # at most K distinct values: those values are the optimal codebook (zero error)
        new = torch.ones_like(ss, dtype=torch.bool)
        new[:, 1:] = ss[:, 1:] != ss[:, :-1]
        rank = new.to(torch.int64).cumsum(1) - 1
        exact = hi.expand(rows, K).clone().scatter_(1, rank.clamp(max=K - 1), ss)
        return torch.where((rank[:, -1:] < K), exact, c).clamp_(-1.0, 1.0)

    # -- decode --------------------------------------------------------------------------------
    def decode(self, bodies: Sequence[torch.Tensor], layout: Layout, out: torch.Tensor, divisor: int = 1) -> torch.Tensor:
        self._check_numel("output", out, layout)
        n = layout.numel
        if n == 0 or not bodies:
            return out.zero_()
        blocks = blocks_for(layout, self.block_size)
        meta_bytes = 4 * self.levels * blocks.count
        acc = out if out.dtype == torch.float32 else torch.empty(n, dtype=torch.float32, device=out.device)
        acc.zero_()
        for body in bodies:
            levels = read_meta(body, meta_bytes, (blocks.count, self.levels))
            if divisor != 1:
                # each share divided before summing: W shares near float32 max cannot overflow
                levels = (levels.double() / divisor).to(torch.float32)
            codes = unpack_codes(body[meta_bytes:meta_bytes + packed_nbytes(n, self.bits)], self.bits, n).long()
            for start, nb, blen, bi in blocks.runs:
                sl = slice(start, start + nb * blen)
                acc[sl].view(nb, blen).add_(levels[bi:bi + nb].gather(1, codes[sl].view(nb, blen)))
        if acc is not out:
            out.copy_(acc)
        return out
