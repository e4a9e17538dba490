"""All-gather: every rank receives every other rank's payload and decodes the W of them.

One quantization, (W-1) x payload bytes sent per rank: the cheapest at W = 2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import collectives
from .base import PieceResult, Strategy, body_of


@dataclass
class _Buffers:
    body: int
    payload: torch.Tensor   # this rank's payload
    gathered: torch.Tensor  # W payloads


class AllGather(Strategy):
    name = "allgather"

    def prepare(self, layout, device) -> _Buffers:
        body = self.codec.body_nbytes(layout)
        payload = self._payload(layout.numel, body, device)
        return _Buffers(body, payload, torch.empty(self.world * payload.numel(), dtype=torch.uint8, device=device))

    def bytes(self, layout, b: _Buffers):
        n = b.payload.numel()
        return n, (self.world - 1) * n, layout.numel

    def run(self, piece, b: _Buffers):
        info = self._encode(self.codec, piece.x, b.payload, b.body, piece.layout, piece.key, piece.err,
                            piece.stats)
        yield collectives.allgather(b.payload, b.gathered, self.group)
        rows = b.gathered.view(self.world, -1)
        bad = self._received(rows, piece.layout.numel, piece.validate)
        self.codec.decode([body_of(rows[r], b.body) for r in range(self.world)], piece.layout, piece.out,
                          divisor=self.world)
        piece.out.masked_fill_(bad, float("nan"))
        return PieceResult(info, bad)
