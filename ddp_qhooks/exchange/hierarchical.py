"""Hierarchical: full precision inside each node, quantized only between nodes.

Node n holds ranks n*L .. n*L+L-1 (as torchrun and srun number them).  The piece (residual already
added) is summed in full precision inside the node; local rank i quantizes chunk i of the node sum
and all-gathers it with the same-numbered ranks of the other nodes; it decodes their mean; the node
all-gathers the mean chunks.  (N-1) x payload / L bytes per rank between nodes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..codecs._random import splitmix64
from . import collectives
from .base import PieceResult, Strategy, body_of, piece_layouts


@dataclass
class _Buffers:
    bounds: list            # (start, end) of each local rank's chunk
    layout: object          # this rank's chunk
    body: int
    payload: torch.Tensor   # one slot
    gathered: torch.Tensor  # one slot per node
    mean: torch.Tensor      # float32, the largest chunk's size (padding for the node all-gather)
    node_means: torch.Tensor  # float32, L x mean.numel()


class Hierarchical(Strategy):
    name = "hierarchical"

    def __init__(self, *args, ranks_per_node: int, **kw):
        super().__init__(*args, **kw)
        self.lpn = ranks_per_node
        self.nodes = self.world // ranks_per_node
        self.local = self.rank % ranks_per_node
        self._groups = None

    def groups(self):
        """(intra-node group for the full-precision sum, intra-node group for the final all-gather,
        cross-node group of the ranks with this local rank): created once, in the same order on
        every rank."""
        if self._groups is None:
            ranks = dist.get_process_group_ranks(self.group) if self.group is not None \
                else list(range(dist.get_world_size()))
            nodes = [ranks[n * self.lpn:(n + 1) * self.lpn] for n in range(len(ranks) // self.lpn)]
            cross = [[node[i] for node in nodes] for i in range(self.lpn)]
            self._groups = tuple(collectives.subgroups(self.group, e) for e in (nodes, nodes, cross))
        return self._groups

    def prepare(self, layout, device) -> _Buffers:
        self.groups()
        bounds = collectives.shard_bounds(layout.numel, self.lpn)
        mine = piece_layouts(layout, bounds)[self.local]
        body = self.codec.body_nbytes(mine)
        payload = self._payload(mine.numel, body, device)
        widest = max(e - s for s, e in bounds)
        return _Buffers(bounds, mine, body, payload,
                        torch.empty(self.nodes * payload.numel(), dtype=torch.uint8, device=device),
                        torch.zeros(widest, dtype=torch.float32, device=device),
                        torch.empty(self.lpn * widest, dtype=torch.float32, device=device))

    def bytes(self, layout, b: _Buffers):
        n = b.payload.numel()
        start, end = b.bounds[self.local]
        return n, (self.nodes - 1) * n, end - start

    def run(self, piece, b: _Buffers):
        first, second, across = self.groups()
        start, end = b.bounds[self.local]
        n = end - start
        err = piece.err
        if err is not None:  # the next residual lives in the own chunk only (a residual elsewhere was just spent)
            err[:start].zero_()
            err[end:].zero_()
        yield collectives.allreduce(piece.x, first)

        info = self._encode(self.codec, piece.x[start:end], b.payload, b.body, b.layout, splitmix64(piece.key, 3),
                            None if err is None else err[start:end], piece.stats)
        yield collectives.allgather(b.payload, b.gathered, across)

        rows = b.gathered.view(self.nodes, -1)
        mean = b.mean[:n]
        bad_in = self._received(rows, n, piece.validate)
        self.codec.decode([body_of(rows[r], b.body) for r in range(self.nodes)], b.layout, mean,
                          divisor=self.nodes * self.lpn)
        mean.masked_fill_(bad_in, float("nan"))
        yield collectives.allgather(b.mean, b.node_means, second)

        rows = b.node_means.view(self.lpn, -1)
        for i, (s0, e0) in enumerate(b.bounds):
            piece.out[s0:e0].copy_(rows[i, :e0 - s0])
        # one non-finite chunk anywhere makes the piece non-finite on every rank (min and max
        # carry any NaN or infinity, without a piece-sized temporary)
        lo, hi = torch.aminmax(piece.out)
        bad = lo.isfinite().logical_and(hi.isfinite()).logical_not()
        piece.out.masked_fill_(bad, float("nan"))
        return PieceResult(info, bad)
