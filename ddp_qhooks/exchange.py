"""Collectives: the only module that talks to torch.distributed.

All-gather of equal-sized packed payloads (one collective per bucket), and a one-off agreement
check that every rank uses the same codec configuration, so a misconfigured rank produces the same
clear error everywhere instead of a hang or garbage.
"""
from __future__ import annotations

import json

import torch
import torch.distributed as dist

from .codecs.wire import fingerprint

__all__ = ["EXCHANGES", "world_size", "rank", "allgather_async", "check_agreement", "ConfigMismatchError"]

# how a bucket's payloads travel between ranks
EXCHANGES = ("allgather",)


def check_exchange(exchange: str) -> str:
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {', '.join(map(repr, EXCHANGES))}, got {exchange!r}")
    return exchange


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
