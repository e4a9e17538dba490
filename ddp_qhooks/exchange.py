"""Collectives: the only module that talks to torch.distributed.

* all-gather of equal-sized packed payloads (one collective per bucket);
* all-to-all of per-shard payloads, the first phase of the two-phase exchange;
* :class:`InOrder`: launches second-phase collectives in bucket order on every rank;
* the byte counts :func:`choose` uses to pick an exchange per bucket;
* a one-off agreement check that every rank uses the same configuration, so a misconfigured rank
  produces the same clear error everywhere instead of a hang or garbage;
* :func:`then`: ``Future.then`` for Python callbacks, drained at interpreter exit (see there).
"""
from __future__ import annotations

import atexit
import datetime
import gc
import json
import threading
import time
import weakref

import torch
import torch.distributed as dist

from .codecs.wire import fingerprint

__all__ = ["EXCHANGES", "world_size", "rank", "allgather_async", "allreduce_async", "alltoall_async", "InOrder", "choose",
           "shard_bounds", "check_agreement", "ConfigMismatchError", "timeout_of", "new_group", "subgroups", "then"]

# how a bucket's payloads travel between ranks:
#   allgather  every rank receives every other rank's payload: (W-1) x payload bytes sent per rank
#   alltoall   two phases: each rank reduces one shard, then all-gathers the re-quantized shards:
#              2 (W-1)/W x payload bytes per rank, flat in W, at the cost of a second quantization
#   auto       hierarchical when the ranks span several nodes of several ranks each, else per
#              bucket whichever of all-gather / two-phase sends fewer bytes (all-gather on a tie)
#   hierarchical  full precision inside each node, one quantized chunk per rank between nodes:
#              (N-1) x payload / L bytes per rank for N nodes of L ranks
EXCHANGES = ("auto", "allgather", "alltoall", "hierarchical")


def check_exchange(exchange: str) -> str:
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {', '.join(map(repr, EXCHANGES))}, got {exchange!r}")
    return exchange


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
    """Ranks were configured differently (or some rank's options were invalid); raised on every rank."""


def world_size(group=None) -> int:
    return dist.get_world_size(group)


def rank(group=None) -> int:
    return dist.get_rank(group)


_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def allgather_async(payload: torch.Tensor, out: torch.Tensor, group=None) -> torch.futures.Future:
    """Start the all-gather of ``payload`` into ``out`` (W * payload bytes); returns a Future.

    The future's value differs between backends (Gloo: a list, NCCL: a tensor), so callers read
    ``out`` instead.
    """
    try:
        work = _all_gather_single(out, payload, group=group, async_op=True)
    except RuntimeError as exc:  # older Gloo builds lack the flat variant
        if "not supported" not in str(exc).lower() and "not implemented" not in str(exc).lower():
            raise
        work = dist.all_gather(list(out.view(-1, payload.numel()).unbind(0)), payload, group=group, async_op=True)
    return work.get_future()


def allreduce_async(tensor: torch.Tensor, group) -> torch.futures.Future:
    """In-place sum over ``group`` (full precision); a future of the result."""
    return dist.all_reduce(tensor, group=group, async_op=True).get_future()


def alltoall_async(send: torch.Tensor, recv: torch.Tensor, group=None) -> torch.futures.Future:
    """Start an all-to-all of W equal slots: slot s of ``send`` goes to rank s, slot r of ``recv``
    comes from rank r.  Returns a Future; callers read ``recv``."""
    return dist.all_to_all_single(recv, send, group=group, async_op=True).get_future()


def shard_bounds(numel: int, world: int) -> list[tuple[int, int]]:
    """Contiguous shards of a bucket, one per rank, sizes differing by at most one."""
    base, extra = divmod(numel, world)
    bounds, start = [], 0
    for s in range(world):
        end = start + base + (1 if s < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def choose(exchange: str, world: int, numel: int, allgather_bytes: int, two_phase_bytes: int,
           ranks_per_node: int | None = None, bits: int | None = None) -> tuple[str, str]:
    """(``"allgather"``, ``"alltoall"`` or ``"hierarchical"``, reason) for one bucket, from the node
    layout and the bytes each would send per rank."""
    if exchange == "allgather" or world < 2:
        return "allgather", "exchange='allgather'"
    if exchange == "hierarchical" or (exchange == "auto" and ranks_per_node and 1 < ranks_per_node < world):
        if numel < (ranks_per_node or 1):
            return "allgather", f"bucket of {numel} values cannot be cut into {ranks_per_node} chunks"
        nodes = world // ranks_per_node
        why = f"{nodes} node(s) x {ranks_per_node} ranks: full precision inside nodes, quantized between them"
        return "hierarchical", why if exchange == "hierarchical" else f"auto: {why}"
    if numel < world:
        return "allgather", f"bucket of {numel} values cannot be cut into {world} shards"
    cmp = f"two-phase sends {two_phase_bytes} B per rank, all-gather {allgather_bytes} B"
    if exchange == "alltoall":
        # at W = 2 both send about the same: keep what was asked for; at W > 2 all-gather wins only
        # on buckets so small that headers and scales dominate, or with a much wider server codec
        if world > 2 and two_phase_bytes >= allgather_bytes:
            return "allgather", f"two-phase would send more: {cmp}"
        return "alltoall", "exchange='alltoall'"
    if bits is not None and bits <= 1:
        # only with an explicit server_bits=1: re-encoding the mean to 1 bit cost 0.5-3.3 pt of
        # Fashion-MNIST accuracy (README); by default sign/ternary means are re-encoded at 2 bits
        return "allgather", f"auto: {bits}-bit codec: two-phase would quantize the mean to 1 bit again ({cmp})"
    if two_phase_bytes < allgather_bytes:
        return "alltoall", f"auto: {cmp}"
    return "allgather", f"auto: {cmp} (one quantization instead of two)"


class InOrder:
    """Runs ``launch`` callables in bucket-index order, whatever order they are submitted in.

    Second-phase collectives are started from completion callbacks, which run on backend threads
    in any order; collectives on one group must be issued in the same order on every rank, so
    each waits until every lower-indexed bucket of the step has been launched.
    """

    def __init__(self) -> None:
        # reentrant: a launched collective that is already complete runs its callback inline, and
        # that callback may end the step (reset) on this same thread
        self._lock = threading.RLock()
        self._next = 0
        self._ready: dict = {}

    def submit(self, index: int, launch=None) -> None:
        with self._lock:
            self._ready[index] = launch
            while self._next in self._ready:
                fn = self._ready.pop(self._next)
                self._next += 1
                if fn is not None:
                    fn()

    def reset(self) -> None:
        with self._lock:
            self._next = 0
            self._ready.clear()


def check_agreement(config, device, group=None, local_error: str | None = None) -> None:
    """Blocking all-gather of a fixed-size (validity, fingerprint) pair; raise on every rank if any
    rank failed to configure (``local_error``) or the configurations differ.

    Fixed size on purpose: gathering variable-sized objects from misconfigured ranks could itself
    mismatch.  Details are exchanged only when something differs, to name it in the error.
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
        listed = "; ".join(f"rank {r}: {e}" for r, e in failed)
        raise ConfigMismatchError(f"ddp_qhooks: invalid options on rank(s) {', '.join(str(r) for r, _ in failed)}: {listed}")
    configs = [d["config"] for d in details]
    keys = sorted({k for c in configs for k in c})
    differing = [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1]
    table = "; ".join(f"rank {r}: " + ", ".join(f"{k}={c.get(k)!r}" for k in differing) for r, c in enumerate(configs))
    raise ConfigMismatchError(f"ddp_qhooks: ranks are configured differently ({', '.join(differing)} differ): {table}")


# -- Python callbacks on backend threads vs interpreter exit ---------------------------------------
# A Gloo worker thread runs a future's Python callback, completes the chained future, and only then
# drops its reference to the callable, which needs the GIL.  The training loop, woken by the chained
# future, can reach the end of the script and start finalizing the interpreter in between: the
# worker then cannot take the GIL, its thread is unwound inside a noexcept destructor and the whole
# process aborts ("terminate called without an active exception", SIGABRT after a successful run;
# 1 in ~25 runs of the quickstart on a loaded 2-core machine).  destroy_process_group() does not
# help: DDP and the hook state still hold the group, so its threads outlive it.  Every callable
# handed to a future is therefore tracked until the backend releases it, and an exit handler waits
# (GIL released) until all are released, bounded for collectives that never complete.
_pending_callbacks: set = set()
EXIT_DRAIN_S = 2.0


def then(fut: torch.futures.Future, callback) -> torch.futures.Future:
    """``fut.then(callback)``, with ``callback`` tracked until the backend thread drops it."""
    _pending_callbacks.add(weakref.ref(callback, _pending_callbacks.discard))
    return fut.then(callback)


def _drain_callbacks(timeout: float = EXIT_DRAIN_S) -> int:
    """Wait until no tracked callback is held by a backend thread (or ``timeout`` passed); returns
    how many are still held."""
    deadline = time.monotonic() + timeout
    collected = False
    while _pending_callbacks and time.monotonic() < deadline:
        time.sleep(0.001)  # releases the GIL for the backend thread
        if not collected and _pending_callbacks:
            gc.collect()  # callables kept only by reference cycles of finished steps
            collected = True
    return len(_pending_callbacks)


atexit.register(_drain_callbacks)
