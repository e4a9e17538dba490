"""Two-phase (reduce-scatter, then all-gather): bytes per rank flat in W.

The piece is cut into W shards, each encoded and sent (one all-to-all) to the rank that owns it;
the owner decodes the W copies of its shard, averages them, adds its *server* residual, re-encodes
the mean (the new server residual is what that encoding lost) and all-gathers it; every rank
decodes the W mean shards.  Sends 2(W-1)/W x payload per rank instead of (W-1) x payload, at the
cost of a second quantization (corrected by the server residual with error feedback).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codecs.base import EncodeInfo, all_finite
from ..codecs.wire import payload_nbytes
from ..error_feedback import add_residual, restore_held
from ..codecs._random import splitmix64
from . import collectives
from .base import PieceResult, Strategy, body_of, piece_layouts, write_header


@dataclass
class _Buffers:
    bounds: list            # (start, end) of each rank's shard in the piece
    layouts: list           # Layout of each shard
    bodies: list            # body bytes of each shard's payload
    slot: int               # bytes per payload slot (the largest shard's payload)
    send: torch.Tensor      # W slots
    recv: torch.Tensor      # W copies of the own shard, one per rank
    mean_bodies: list       # body bytes of each shard's re-encoded mean
    mean_slot: int
    own_mean: torch.Tensor  # the own shard's re-encoded mean, one slot
    gathered: torch.Tensor  # W re-encoded mean shards
    mean: torch.Tensor      # float32 mean of the own shard


class TwoPhase(Strategy):
    name = "alltoall"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._second = None

    @staticmethod
    def slots(codec, server_codec, layout, world) -> tuple[int, int]:
        """(payload slot, mean slot) bytes: what the exchange choice compares."""
        layouts = piece_layouts(layout, collectives.shard_bounds(layout.numel, world))
        return (max(payload_nbytes(codec.body_nbytes(sl)) for sl in layouts),
                max(payload_nbytes(server_codec.body_nbytes(sl)) for sl in layouts))

    def prepare(self, layout, device) -> _Buffers:
        if self._second is None:
            # the second phase starts on the completion thread while the caller issues the next
            # pieces' first phase: it needs a group of its own (created here, in the same order
            # on every rank)
            self._second = collectives.new_group(self.group)
        w, me = self.world, self.rank
        bounds = collectives.shard_bounds(layout.numel, w)
        layouts = piece_layouts(layout, bounds)
        bodies = [self.codec.body_nbytes(sl) for sl in layouts]
        mean_bodies = [self.server_codec.body_nbytes(sl) for sl in layouts]
        slot = max(payload_nbytes(b) for b in bodies)
        mean_slot = max(payload_nbytes(b) for b in mean_bodies)
        send = torch.zeros(w * slot, dtype=torch.uint8, device=device)
        for s, sl in enumerate(layouts):
            write_header(send[s * slot:(s + 1) * slot], self.codec, self._print, sl.numel)
        own_mean = torch.zeros(mean_slot, dtype=torch.uint8, device=device)
        write_header(own_mean, self.server_codec, self._server_print, layouts[me].numel)
        return _Buffers(bounds, layouts, bodies, slot, send, torch.empty(w * slot, dtype=torch.uint8, device=device),
                        mean_bodies, mean_slot, own_mean, torch.empty(w * mean_slot, dtype=torch.uint8, device=device),
                        torch.empty(layouts[me].numel, dtype=torch.float32, device=device))

    def bytes(self, layout, b: _Buffers):
        return self.world * b.slot, (self.world - 1) * (b.slot + b.mean_slot), layout.numel

    def run(self, piece, b: _Buffers):
        w, me = self.world, self.rank
        infos = []
        for s, ((start, end), layout) in enumerate(zip(b.bounds, b.layouts)):
            slot = b.send[s * b.slot:(s + 1) * b.slot]
            infos.append(self._encode(self.codec, piece.x[start:end], slot, b.bodies[s], layout,
                                      splitmix64(piece.key, 1, s), None if piece.err is None else piece.err[start:end],
                                      piece.stats))
        info = _merged(infos) if piece.err is not None else None
        yield collectives.alltoall(b.send, b.recv, self.group)

        rows = b.recv.view(w, -1)
        layout = b.layouts[me]
        bad_in = self._received(rows, layout.numel, piece.validate)
        self.codec.decode([body_of(rows[r], b.bodies[me]) for r in range(w)], layout, b.mean, divisor=w)
        start, end = b.bounds[me]
        server = None if piece.server is None else piece.server[start:end]
        server_err = None if piece.server_err is None else piece.server_err[start:end]
        held = add_residual(b.mean, server, layout, piece.hold_unused) if server is not None else []
        self._encode(self.server_codec, b.mean, b.own_mean, b.mean_bodies[me], layout, splitmix64(piece.key, 2),
                     server_err, False)  # the server residual's error is not reported
        if held:
            restore_held(server_err, server, held)
        b.own_mean[3:4].bitwise_or_(bad_in.to(torch.uint8))  # a non-finite input anywhere reaches every rank
        yield collectives.allgather(b.own_mean, b.gathered, self._second)

        rows = b.gathered.view(w, -1)
        bad = self._received(rows, None, False)
        for s, ((start, end), sl) in enumerate(zip(b.bounds, b.layouts)):
            self.server_codec.decode([body_of(rows[s], b.mean_bodies[s])], sl, piece.out[start:end])
        piece.out.masked_fill_(bad, float("nan"))
        return PieceResult(info, bad)


def _merged(infos: list) -> EncodeInfo:
    finite = all_finite(infos)
    if any(i.error_sq is None for i in infos):
        return EncodeInfo(finite)
    return EncodeInfo(finite, sum(i.error_sq for i in infos), sum(i.input_sq for i in infos))
