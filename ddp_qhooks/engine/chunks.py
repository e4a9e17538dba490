"""Cutting large units into chunks that are pipelined.

A unit (a DDP bucket, a LocalSGD fragment) above ``chunk_size`` values is cut into equal chunks;
each is encoded and its collective launched at once, so encoding chunk i+1 overlaps sending chunk
i, several collectives are in flight (one large Gloo all-gather leaves the link idle part of the
time), and chunk i is decoded while later ones are still on the wire.

Each chunk gets its own scales: with ``block_size=None`` a chunk has one range instead of the whole
bucket sharing one; with ``"layer"`` or an integer, blocks are cut per parameter *piece* inside the
chunk, so a block may end at a chunk boundary.  No range pass over the whole bucket is needed
first, which is what lets the first chunk leave before the last one is encoded.
"""
from __future__ import annotations

from ..codecs.options import as_int
from ..exchange.collectives import shard_bounds

#: default chunk size in values (8 MiB of fp32 gradient); chosen by the one-big-parameter benchmark
#: at 200 Mbit/s and 1 Gbit/s (docs/results.md)
DEFAULT_CHUNK_SIZE = 1 << 21
MIN_CHUNK_SIZE = 1 << 16


def check_chunk_size(chunk_size):
    chunk_size = as_int(chunk_size)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < MIN_CHUNK_SIZE):
        raise ValueError(f"chunk_size must be None (never cut a bucket) or an integer >= {MIN_CHUNK_SIZE} "
                         f"(values per pipelined chunk), got {chunk_size!r}")
    return chunk_size


def chunk_bounds(numel: int, chunk_size) -> list[tuple[int, int]]:
    """Equal contiguous chunks of at most ``chunk_size`` values (one chunk when None or smaller)."""
    if chunk_size is None or numel <= chunk_size:
        return [(0, numel)]
    return shard_bounds(numel, -(-numel // chunk_size))
