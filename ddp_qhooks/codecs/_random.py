"""Cheap, keyed randomness for stochastic rounding.

Generating fresh uniform floats with ``torch.rand`` costs more than the whole quantization pass
(~0.75 ns per value on one CPU core).  Instead every stochastic codec reads its dither from a fixed
pool of ``POOL_SIZE`` stratified values ``(k + 0.5) / POOL_SIZE`` in shuffled order, starting at an
offset drawn from a 64-bit key (seed, rank, step, parameter).  For every element the dither is then
exactly uniform on that grid over the draw of the key, so stochastic rounding is unbiased up to
``1 / (2 * POOL_SIZE)`` of a quantization step (< 5e-7 steps, below fp32 round-off of the codes).
Neighbouring elements take distinct pool entries.  Within one step, the one-range-per-bucket fast
path applies one stretch of ``PERIOD`` dither values to every ``PERIOD``-long row of the bucket, so
that the stretch stays in cache: elements ``PERIOD`` apart share a dither value in that step
(their rounding errors are correlated; their variances and unbiasedness are unaffected, and the
stretch moves every step).  Per-parameter (``block_size``) dither uses consecutive pool values for
the whole parameter.  Keys are mixed with splitmix64 so consecutive steps are unrelated.

The largest ``POOL_SIZE * CAP_MARGIN`` values are lowered to ``1 - CAP_MARGIN``: quantizers can then
truncate ``y + u`` (y in [0, L], computed in float32 with a round-off below CAP_MARGIN / 2) without
ever producing L + 1, and need no clamp.  That moves a 2**-10 fraction of the dither by less than
2**-10, a bias below 2**-20 (1e-6) of a step.
"""
from __future__ import annotations

import bisect

import torch

POOL_SIZE = 1 << 20
PERIOD = 1 << 16  # dither values per row in the one-range-per-bucket path (see above)
CAP_MARGIN = 2.0 ** -10
_MASK64 = (1 << 64) - 1
_pools: dict[torch.device, torch.Tensor] = {}


def splitmix64(*values: int) -> int:
    """Mix integers into one well-distributed 64-bit key."""
    state = 0x9E3779B97F4A7C15
    for v in values:
        state = (state + (int(v) & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state


def dither_pool(device: torch.device) -> torch.Tensor:
    """The pool, stored twice in a row so that any window of up to POOL_SIZE values is one slice."""
    device = torch.device(device)
    pool = _pools.get(device)
    if pool is None:
        gen = torch.Generator().manual_seed(0x5EED)
        grid = (torch.randperm(POOL_SIZE, generator=gen).to(torch.float64) + 0.5) / POOL_SIZE
        grid.clamp_(max=1.0 - CAP_MARGIN)
        pool = grid.to(torch.float32).repeat(2).to(device)
        _pools[device] = pool
    return pool


def offset(key: int) -> int:
    return key % POOL_SIZE


def fill_dither(out: torch.Tensor, key: int, add: float = 0.0) -> torch.Tensor:
    """Write ``add`` + the dither sequence for ``key`` (position i gets pool[(offset + i) % POOL_SIZE])."""
    pool = dither_pool(out.device)
    start, n, pos = offset(key), out.numel(), 0
    while pos < n:
        take = min(n - pos, POOL_SIZE)
        if add:
            torch.add(pool[start:start + take], add, out=out[pos:pos + take])
        else:
            out[pos:pos + take].copy_(pool[start:start + take])
        pos += take
        start = (start + take) % POOL_SIZE
    return out


def param_dither(layout, key: int, device) -> torch.Tensor:
    """Dither for a whole bucket, keyed by (key, parameter identity) for each parameter, so that a
    parameter gets the same values wherever it sits in a bucket (layout-independent results)."""
    d = torch.empty(layout.numel, dtype=torch.float32, device=device)
    for off, n, pkey in zip(layout.param_offsets(), layout.param_numels, layout.param_keys):
        fill_dither(d[off:off + n], splitmix64(key, pkey))
    return d


class PieceDither:
    """:func:`param_dither`'s values, piece by piece, without a bucket-sized tensor: a piece inside
    one parameter is a view of the pool (no copy); one spanning parameters is assembled in a
    caller's scratch buffer (of at least ``length`` values).  Pieces are always ``length`` long
    (:class:`PeriodDither`'s may be shorter, to be broadcast)."""

    def __init__(self, layout, key: int, device):
        self.pool = dither_pool(device)
        self.offsets = layout.param_offsets()
        self.ends = [o + n for o, n in zip(self.offsets, layout.param_numels)]
        self.starts = [offset(splitmix64(key, pkey)) for pkey in layout.param_keys]

    def piece(self, start: int, length: int, scratch: torch.Tensor) -> torch.Tensor:
        i = bisect.bisect_right(self.offsets, start) - 1
        while self.ends[i] <= start:  # skip empty parameters sharing this offset
            i += 1
        if start + length <= self.ends[i] and length <= POOL_SIZE:
            s = (self.starts[i] + start - self.offsets[i]) % POOL_SIZE
            return self.pool[s:s + length]  # the pool is stored twice: a window never wraps
        out = scratch[:length]
        pos = start
        while pos < start + length:
            while self.ends[i] <= pos:
                i += 1
            take = min(self.ends[i], start + length, pos + POOL_SIZE) - pos
            s = (self.starts[i] + pos - self.offsets[i]) % POOL_SIZE
            out[pos - start:pos - start + take].copy_(self.pool[s:s + take])
            pos += take
        return out


def period_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its last dimension cut into ``PERIOD``-long rows, over which a
    :class:`PeriodDither` window broadcasts."""
    return t.view(*t.shape[:-1], -1, PERIOD)


class PeriodDither:
    """The one-range-per-bucket dither (see the module docstring): element ``i`` of the bucket gets
    ``window[i % PERIOD]``, one ``PERIOD``-long stretch of the pool picked by ``key``.  Pieces that
    start and end on the period come back as the window itself, to be broadcast over the piece's
    ``PERIOD``-long rows (it stays in cache); others are assembled in a caller's scratch buffer."""

    def __init__(self, numel: int, key: int, device):
        start = offset(key)
        self.window = dither_pool(device)[start:start + min(numel, PERIOD)]

    def piece(self, start: int, length: int, scratch: torch.Tensor) -> torch.Tensor:
        w = self.window.numel()
        if start % w == 0 and length % w == 0:
            return self.window
        out = scratch[:length]
        pos = 0
        while pos < length:
            a = (start + pos) % w
            take = min(w - a, length - pos)
            out[pos:pos + take].copy_(self.window[a:a + take])
            pos += take
        return out


class ParamPeriodDither:
    """Per-parameter period dither (the adaptive codec): element ``j`` of a parameter gets
    ``window[j % len(window)]``, its window being the ``PERIOD``-long stretch of the pool picked by
    (key, parameter identity) (a shorter parameter: its own length, so values of consecutive pool
    entries as in :func:`param_dither`).  Like :class:`PeriodDither` the window stays in cache, and
    like :func:`param_dither` a parameter's values do not depend on where it sits in a bucket."""

    def __init__(self, layout, key: int, device):
        pool = dither_pool(device)
        self.offsets = layout.param_offsets()
        self.ends = [o + n for o, n in zip(self.offsets, layout.param_numels)]
        self.windows = [pool[s:s + min(n, PERIOD)] for s, n in
                        zip((offset(splitmix64(key, k)) for k in layout.param_keys), layout.param_numels)]

    def _param(self, pos: int) -> int:
        i = bisect.bisect_right(self.offsets, pos) - 1
        while self.ends[i] <= pos:  # skip empty parameters sharing this offset
            i += 1
        return i

    def segments(self, start: int, length: int):
        """Cut values ``start .. start+length`` into ``(pos, take, window)`` stretches, in order:
        ``window`` is the dither of whole periods of one parameter (``take`` a multiple of its
        length, to be broadcast over the stretch cut into window-long rows), or None for the rest
        (parts of periods, runs of short parameters), at most ``POOL_SIZE`` values each: their
        dither comes from :meth:`piece`."""
        pos, stop, loose = start, start + length, start
        i = self._param(start) if length else 0
        while pos < stop:
            while self.ends[i] <= pos:
                i += 1
            w = self.windows[i].numel()
            whole = (min(self.ends[i], stop) - pos) // w * w
            if (pos - self.offsets[i]) % w == 0 and whole:
                yield from _cut(loose, pos)
                yield pos, whole, self.windows[i]
                pos = loose = pos + whole
            else:   # up to the next period start of this parameter, or its end
                pos = min(self.ends[i], stop, pos + w - (pos - self.offsets[i]) % w)
        yield from _cut(loose, stop)

    def piece(self, start: int, length: int, scratch: torch.Tensor, window_ok: bool = True) -> torch.Tensor:
        """The dither of values ``start .. start+length``: with ``window_ok``, the window itself when
        the piece lies in one parameter, starts on its period and is whole periods long (to be
        broadcast over the piece cut into window-long rows); else assembled in ``scratch``."""
        i = self._param(start)
        w = self.windows[i].numel()
        if window_ok and start + length <= self.ends[i] and (start - self.offsets[i]) % w == 0 and length % w == 0:
            return self.windows[i]
        out = scratch[:length]
        pos, stop = start, start + length
        while pos < stop:
            while self.ends[i] <= pos:
                i += 1
            win = self.windows[i]
            a = (pos - self.offsets[i]) % win.numel()
            take = min(win.numel() - a, self.ends[i] - pos, stop - pos)
            out[pos - start:pos - start + take].copy_(win[a:a + take])
            pos += take
        return out


def _cut(start: int, stop: int):
    """``(pos, take, None)`` stretches of at most ``POOL_SIZE`` values covering ``start .. stop``."""
    for pos in range(start, stop, POOL_SIZE):
        yield pos, min(POOL_SIZE, stop - pos), None
