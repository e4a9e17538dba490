"""The collectives the strategies use, the process groups they need and the one-off agreement check.

Every launcher returns the backend's ``Work``; completion is waited for with ``work.wait()`` on a
thread the engine owns (see ``engine/completion.py``), never with a Python callback on a backend
thread.
"""
from __future__ import annotations

import atexit
import collections
import datetime
import json
import time

import torch
import torch.distributed as dist

from ..codecs.wire import fingerprint

__all__ = ["world_size", "rank", "allgather", "allreduce", "alltoall", "shard_bounds", "new_group", "subgroups",
           "timeout_of", "check_agreement", "ConfigMismatchError", "InvalidOptionsError"]


def world_size(group=None) -> int:
    return dist.get_world_size(group)


def rank(group=None) -> int:
    return dist.get_rank(group)


_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# The last Works launched, kept referenced from Python.  A Gloo Work carries the launching thread's
# ThreadLocalState, which holds a Python object; the backend thread that ran the Work drops its own
# reference only after marking it complete, so if Python dropped its reference first (right after
# ``wait()``), the Work is destroyed on the backend thread, which must take the GIL for that.  When
# the interpreter is finalizing, taking the GIL ends the thread from inside a noexcept destructor:
# "terminate called without an active exception" at exit (seen in a core dump: ~AsyncAllgatherWork
# -> ~ThreadLocalState -> SafePyObject decref -> take_gil -> pthread_exit -> std::terminate).
# Keeping the recent Works here makes Python's reference the last one (released when this module is
# torn down, on the main thread); the handler below lets the backend threads finish with them before
# finalization begins.
_RECENT_WORKS: collections.deque = collections.deque(maxlen=32)
_EXIT_SETTLE_S = 0.05


def _launched(work):
    if not _RECENT_WORKS:
        atexit.register(_settle_recent_works)
    _RECENT_WORKS.append(work)
    return work


def _settle_recent_works() -> None:
    """At exit, while Python is whole: give the backend threads time to drop their references to
    the recent Works (ours stay until the module is torn down, on a Python thread)."""
    if any(not w.is_completed() for w in list(_RECENT_WORKS)):
        return  # a Work never waited for: its owner's problem, and waiting here could hang the exit
    time.sleep(_EXIT_SETTLE_S)


def allgather(payload: torch.Tensor, out: torch.Tensor, group=None):
    """Start the all-gather of ``payload`` into ``out`` (W * payload bytes); returns the Work.

    Read ``out`` afterwards: the value of the Work's future differs between backends."""
    try:
        return _launched(_all_gather_single(out, payload, group=group, async_op=True))
    except RuntimeError as exc:  # older Gloo builds lack the flat variant
        if "not supported" not in str(exc).lower() and "not implemented" not in str(exc).lower():
            raise
        return _launched(dist.all_gather(list(out.view(-1, payload.numel()).unbind(0)), payload, group=group,
                                         async_op=True))


def allgather_pieces(inp: torch.Tensor, out: torch.Tensor, group, bounds) -> list:
    """Start the all-gather of ``inp`` into ``out`` (W x ``inp.numel()`` values, rank-major, as
    ``all_gather_single``) as one all-gather per ``(lo, hi)`` of ``bounds`` (pieces of ``inp``),
    all in flight at once; returns their Works.  Each piece gathers straight into row slices of
    ``out``."""
    flat, rows = inp.view(-1), out.view(world_size(group), inp.numel())
    return [_launched(dist.all_gather(list(rows[:, lo:hi].unbind(0)), flat[lo:hi], group=group, async_op=True))
            for lo, hi in bounds if hi > lo]


def allreduce(tensor: torch.Tensor, group):
    """Start the in-place full-precision sum of ``tensor`` over ``group``; returns the Work."""
    return _launched(dist.all_reduce(tensor, group=group, async_op=True))


def alltoall(send: torch.Tensor, recv: torch.Tensor, group=None):
    """Start an all-to-all of W equal slots (slot s of ``send`` goes to rank s, slot r of ``recv``
    comes from rank r); returns the Work."""
    return _launched(dist.all_to_all_single(recv, send, group=group, async_op=True))


def alltoall_pieces(send: torch.Tensor, recv: torch.Tensor, group, bounds) -> list:
    """Start the all-to-all of W equal slots (as :func:`alltoall`) as one all-to-all per ``(lo,
    hi)`` of ``bounds`` (byte ranges of a slot), all in flight at once; returns ``(work, finish)``
    pairs: after ``work.wait()``, ``finish()`` copies that piece into ``recv``."""
    if len(bounds) == 1:
        return [(alltoall(send, recv, group), lambda: None)]
    w = world_size(group)
    sends, recvs = send.view(w, -1), recv.view(w, -1)
    started = []
    for lo, hi in bounds:
        out = torch.empty(w, hi - lo, dtype=recv.dtype, device=recv.device)
        work = alltoall(sends[:, lo:hi].contiguous(), out, group)
        started.append((work, lambda out=out, lo=lo, hi=hi: recvs[:, lo:hi].copy_(out)))
    return started


def shard_bounds(numel: int, world: int) -> list[tuple[int, int]]:
    """Contiguous shards of ``numel`` values, one per rank, sizes differing by at most one."""
    base, extra = divmod(numel, world)
    bounds, start = [], 0
    for s in range(world):
        end = start + base + (1 if s < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def timeout_of(group) -> "datetime.timedelta | None":
    """The collective timeout of ``group`` (the default group: ``init_process_group(timeout=)``),
    or None where the backend does not tell."""
    pg = group if group is not None else dist.group.WORLD
    for device in ("cpu", "cuda"):
        try:
            return pg._get_backend(torch.device(device)).options._timeout
        except Exception:
            continue
    return None


def new_group(parent, ranks=None):
    """A new group of ``ranks`` (default: the parent's) with the PARENT's timeout.

    ``dist.new_group`` would use torch's 30-minute default whatever ``init_process_group`` was
    given, so a dead or stalled rank would hang the extra phases for half an hour."""
    if ranks is None and parent is not None:
        ranks = dist.get_process_group_ranks(parent)
    return dist.new_group(ranks, timeout=timeout_of(parent))


def subgroups(parent, enumeration):
    """This rank's group of ``dist.new_subgroups_by_enumeration`` with the parent's timeout."""
    group, _ = dist.new_subgroups_by_enumeration(enumeration, timeout=timeout_of(parent))
    return group


class ConfigMismatchError(ValueError):
    """Ranks were configured differently; raised on every rank, naming the ranks and settings."""


class InvalidOptionsError(ValueError):
    """The options are invalid (on every rank alike, or on some ranks); raised on every rank."""


MAX_RANKS_LISTED = 8


def _ranks_text(ranks: list) -> str:
    shown = ", ".join(str(r) for r in ranks[:MAX_RANKS_LISTED])
    return shown + (f" and {len(ranks) - MAX_RANKS_LISTED} more" if len(ranks) > MAX_RANKS_LISTED else "")


def check_agreement(config, device, group=None, local_error: str | None = None) -> None:
    """Blocking all-gather of a fixed-size (validity, fingerprint) pair; raise on every rank if any
    rank failed to configure (``local_error``) or the configurations differ.

    Fixed size on purpose: gathering variable-sized objects from misconfigured ranks could itself
    mismatch.  Details are exchanged only when something differs, to name it in the error: the
    same message once when every failing rank failed alike, per-rank detail (capped) only where
    ranks differ.
    """
    w = world_size(group)
    mine = torch.tensor([0 if local_error is None else 1, 0 if config is None else fingerprint(config)],
                        dtype=torch.int64, device=device)
    everyone = torch.empty(2 * w, dtype=torch.int64, device=device)
    _all_gather_single(everyone, mine, group=group)
    rows = everyone.view(w, 2).tolist()
    if not any(bad for bad, _ in rows) and len({fp for _, fp in rows}) == 1:
        return
    details: list = [None] * w
    dist.all_gather_object(details, {"error": local_error, "config": config}, group=group)
    failed = [(r, d["error"]) for r, d in enumerate(details) if d["error"] is not None]
    if failed:
        messages = {}
        for r, e in failed:
            messages.setdefault(e, []).append(r)
        if len(failed) == w and len(messages) == 1:
            raise InvalidOptionsError(f"ddp_qhooks: {failed[0][1]}")
        listed = "; ".join(f"rank(s) {_ranks_text(rs)}: {e}" for e, rs in list(messages.items())[:MAX_RANKS_LISTED])
        raise InvalidOptionsError(f"ddp_qhooks: invalid options on {len(failed)} of {w} ranks: {listed}")
    configs = [d["config"] for d in details]
    keys = sorted({k for c in configs for k in c})
    differing = [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1]
    groups: dict = {}
    for r, c in enumerate(configs):
        groups.setdefault(", ".join(f"{k}={c.get(k)!r}" for k in differing), []).append(r)
    table = "; ".join(f"rank(s) {_ranks_text(rs)}: {v}" for v, rs in list(groups.items())[:MAX_RANKS_LISTED])
    raise ConfigMismatchError(f"ddp_qhooks: ranks are configured differently ({', '.join(differing)} differ): {table}")
