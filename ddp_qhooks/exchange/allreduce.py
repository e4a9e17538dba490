"""Full-precision all-reduce: the uncompressed exchange of an optimizer's warm-up (1-bit Adam).

Not one of the user-selectable ``exchange`` choices: the engine takes it for the steps in which an
attached optimizer (``ddp_qhooks.optim.OneBitAdam``) asks for exact gradients.  Counted as a ring
all-reduce sends it: 2(W-1)/W x 4 bytes per value per rank.
"""
from __future__ import annotations

import torch

from ..codecs.base import finite_flag
from . import collectives
from .base import PieceResult, Strategy


class FullPrecision(Strategy):
    name = "allreduce"

    def prepare(self, layout, device):
        return None

    def bytes(self, layout, buffers):
        n = layout.numel
        return 4 * n, (2 * (self.world - 1) * 4 * n) // self.world, n

    def run(self, piece, buffers):
        x = piece.x
        yield collectives.allreduce(x, self.group)
        if x.data_ptr() != piece.out.data_ptr():
            piece.out.copy_(x.div_(self.world))
        else:
            piece.out.div_(self.world)
        # the flag GradScaler's skip relies on: any rank's non-finite value is in the sum
        return PieceResult(None, ~finite_flag(x))
