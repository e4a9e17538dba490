"""Quantization blocks: the granularity at which a codec keeps one scale (range, norm, codebook...).

Every scaled codec takes the same ``block_size`` option:

* ``None`` (default): one block per bucket;
* ``"layer"``: one block per parameter, using the bucket's parameter boundaries (layer-wise scales);
* an integer ``B``: every parameter is cut into its own blocks of ``B`` values (the last block of a
  parameter may be shorter).

Blocks never straddle two parameters (except with ``None``), so with ``"layer"`` or ``B`` results do
not depend on how DDP grouped parameters into buckets.

:class:`Blocks` groups consecutive blocks of equal length into *runs*; a run of ``nb`` blocks of
``blen`` values is one ``(nb, blen)`` view, so per-block reductions and per-block scalars cost one
tensor op per run (a handful per parameter at most), not one per block.
"""
from __future__ import annotations

import functools

import torch

from .base import Layout
from .options import as_int

LAYER = "layer"
#: the default ``block_size`` of the scaled codecs (uniform, stochastic, log, mulaw, sign, ternary):
#: one scale per 256 values of a parameter.  One scale per bucket let a few outliers set the step
#: of millions of values: at their defaults 1-bit and 2-bit codecs lost 3-33 accuracy points under
#: momentum SGD and 4-bit codecs 5-20 % of an LM's validation loss under AdamW (issue 21,
#: docs/results_defaults.md)
DEFAULT_BLOCK_SIZE = 256


def check_block_size(codec: str, block_size):
    """The validated ``block_size`` (None, "layer" or a positive int), or a ValueError naming the choices."""
    if block_size is None or block_size == LAYER:
        return block_size
    block_size = as_int(block_size)  # numpy integers too, but not floats
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"{codec}: block_size must be None (one block per bucket), 'layer' (one per parameter) "
                         f"or a positive integer, got {block_size!r}")
    return block_size


class Blocks:
    """The blocks of one layout at one ``block_size``; build with :func:`blocks_for` (cached)."""

    def __init__(self, layout: Layout, block_size):
        self.layout = layout
        self.lengths = layout.block_lengths(block_size)
        self.count = len(self.lengths)
        runs, start, first = [], 0, 0
        for blen in self.lengths:
            if runs and runs[-1][2] == blen:
                s0, nb, bl, f0 = runs[-1]
                runs[-1] = (s0, nb + 1, bl, f0)
            else:
                runs.append((start, 1, blen, first))
            start += blen
            first += 1
        self.runs = tuple(runs)   # (start, nblocks, block_len, first_block)

    def views(self, x: torch.Tensor):
        """``(view (nb, blen) of x, slice of block indices)`` for every run."""
        for start, nb, blen, first in self.runs:
            yield x[start:start + nb * blen].view(nb, blen), slice(first, first + nb)

    def reduce(self, x: torch.Tensor, op: str, dtype=None) -> torch.Tensor:
        """Per-block ``op`` of ``x``: one of amin, amax, absmax, abssum, sqsum, sum."""
        out = torch.empty(self.count, dtype=dtype or x.dtype, device=x.device)
        for view, sl in self.views(x):
            if dtype is not None and view.dtype != dtype:
                view = view.to(dtype)
            if op == "amin":
                r = view.amin(1)
            elif op == "amax":
                r = view.amax(1)
            elif op == "absmax":  # nothing written; max(-lo, hi) >= 0, abs_ turns -0.0 into +0.0
                lo, hi = _row_minmax(view)
                r = torch.maximum(-lo, hi).abs_()
            elif op == "abssum":
                r = view.abs().sum(1)
            elif op == "sqsum":
                r = (view * view).sum(1)
            elif op == "sum":
                r = view.sum(1)
            else:
                raise ValueError(f"unknown block reduction {op!r}")
            out[sl] = r
        return out

    def expand(self, per_block: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Per-element tensor holding each block's value (``out`` of ``layout.numel`` elements)."""
        if out is None:
            out = torch.empty(self.layout.numel, dtype=per_block.dtype, device=per_block.device)
        for view, sl in self.views(out):
            view.copy_(per_block[sl, None].expand_as(view))
        return out

    def lengths_tensor(self, device, dtype=torch.float32) -> torch.Tensor:
        """The block lengths on ``device`` (not to be written to): made once per device, since copying
        host values to an accelerator waits for it like a read."""
        cache = self.__dict__.setdefault("_lengths", {})
        key = (torch.device(device), dtype)
        t = cache.get(key)
        if t is None:
            t = cache[key] = torch.tensor(self.lengths, dtype=dtype, device=device)
        return t


@functools.lru_cache(maxsize=512)
def blocks_for(layout: Layout, block_size) -> Blocks:
    return Blocks(layout, block_size)


def _row_minmax(view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (min, max) of a 2-D view, NaN propagating.  torch 2.13's ``aminmax(dim=1)`` is ~10x
    slower than ``amin`` + ``amax`` on a CPU core; a single row takes the one-read full ``aminmax``."""
    if view.shape[0] == 1:
        lo, hi = torch.aminmax(view)
        return lo.view(1), hi.view(1)
    return view.amin(1), view.amax(1)
