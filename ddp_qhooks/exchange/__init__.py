"""Exchange strategies: how a piece of gradient travels between ranks.  The only layer that talks
to torch.distributed.

* :class:`AllGather` (``allgather``), :class:`TwoPhase` (``alltoall``), :class:`Hierarchical`
  (``hierarchical``), behind the :class:`Strategy` interface (``base.py``);
* ``choose``: the ``auto`` rule; ``collectives``: launches, groups, the agreement check.
"""
from .allgather import AllGather
from .base import Piece, PieceResult, Strategy, piece_layouts
from .choose import EXCHANGES, check_exchange, choose
from .collectives import (ConfigMismatchError, InvalidOptionsError, check_agreement, new_group, rank, shard_bounds,
                          subgroups, timeout_of, world_size)
from .hierarchical import Hierarchical
from .two_phase import TwoPhase

STRATEGIES = {cls.name: cls for cls in (AllGather, TwoPhase, Hierarchical)}

__all__ = ["AllGather", "TwoPhase", "Hierarchical", "Strategy", "Piece", "PieceResult", "STRATEGIES", "EXCHANGES",
           "check_exchange", "choose", "check_agreement", "ConfigMismatchError", "InvalidOptionsError", "new_group",
           "subgroups", "timeout_of", "shard_bounds", "world_size", "rank", "piece_layouts"]
