"""Rounds of :class:`~ddp_qhooks.LocalSGD`: the fragments, who takes part, and exchanges still in flight.

Participation: in fragment ``i``'s ``r``-th round, ``max(1, round(p * W))`` ranks contribute, drawn
without replacement from a generator seeded by ``(seed, i, r)``, so every rank draws the same set
without communicating, and a resumed run draws the same sets again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ...codecs._random import splitmix64

_PARTICIPATION_TAG = 0x50415254  # keeps these draws apart from the codecs' (seed, rank, step) keys


def participants(seed: int, fragment: int, round_: int, world: int, fraction: float) -> list[int]:
    """The sorted ranks (within the group) that contribute to fragment ``fragment``'s round ``round_``."""
    k = min(world, max(1, round(fraction * world)))
    if k == world:
        return list(range(world))
    g = torch.Generator().manual_seed(splitmix64(seed, _PARTICIPATION_TAG, fragment, round_) >> 1)
    return sorted(torch.randperm(world, generator=g)[:k].tolist())


def done_future(value: torch.Tensor) -> torch.futures.Future:
    fut = torch.futures.Future()
    fut.set_result(value)
    return fut


@dataclass(eq=False)  # compared by identity: fields hold tensors
class Pending:
    """A fragment's exchange launched at inner step ``sent_at`` and applied at ``due``."""

    index: int
    due: int
    participants: list
    future: torch.futures.Future
    cv_future: Optional[torch.futures.Future]
    sent: Optional[list]        # the fragment's local parameters when it was sent (delay > 0)
    undo: Optional[list]        # the drift state to restore if the round is dropped
    contributed: bool

    def wait(self) -> None:
        self.future.wait()
        if self.cv_future is not None:
            self.cv_future.wait()

    def state_dict(self) -> dict:
        self.wait()
        cpu = lambda ts: None if ts is None else [t.detach().cpu().clone() for t in ts]  # noqa: E731
        return {"index": self.index, "due": self.due, "participants": list(self.participants),
                "mean": self.future.wait().cpu().clone(),
                "cv_mean": None if self.cv_future is None else self.cv_future.wait().cpu().clone(),
                "sent": cpu(self.sent), "undo": cpu(self.undo), "contributed": self.contributed}

    @classmethod
    def from_state(cls, state: dict, device) -> "Pending":
        dev = lambda ts: None if ts is None else [t.to(device) for t in ts]  # noqa: E731
        cv = state["cv_mean"]
        return cls(int(state["index"]), int(state["due"]), list(state["participants"]),
                   done_future(state["mean"].to(device)), None if cv is None else done_future(cv.to(device)),
                   dev(state["sent"]), dev(state["undo"]), bool(state["contributed"]))


def _first_rank(process_group) -> int:
    """Global rank of the group's first member (the broadcast source)."""
    if process_group is None:
        return 0
    return dist.get_global_rank(process_group, 0)


def _split(params: list, parts: int) -> list[list]:
    """``parts`` contiguous groups of parameters with about equal numbers of values."""
    total = sum(p.numel() for p in params)
    groups, current, acc = [], [], 0
    for i, p in enumerate(params):
        current.append(p)
        acc += p.numel()
        left = len(params) - i - 1
        need = parts - len(groups) - 1  # groups still to start after this one
        if need and (acc >= total * (len(groups) + 1) / parts or left == need):
            groups.append(current)
            current = []
    groups.append(current)
    return groups
