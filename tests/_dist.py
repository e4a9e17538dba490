"""Run a function in W real processes on this machine (Gloo by default, fresh port per call).

torch 2.13 + Gloo on CPU occasionally aborts a worker during interpreter shutdown, AFTER the
process group was destroyed ("terminate called without an active exception", SIGABRT; seen in
~10% of runs even with plain DDP and no comm hook).  Workers therefore leave with os._exit(0)
once their result file is written and the group destroyed; a rank that dies earlier leaves no
result file and is reported as failed.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, outdir, timeout_s, backend):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
        try:
            result = fn(rank, world, *args)
            torch.save({"ok": True, "result": result}, os.path.join(outdir, f"{rank}.pt"))
        except BaseException as exc:  # report, do not hang the other ranks
            torch.save({"ok": False, "error": f"{type(exc).__name__}: {exc}", "type": type(exc).__name__,
                        "tb": traceback.format_exc()}, os.path.join(outdir, f"{rank}.pt"))
        finally:
            try:
                dist.destroy_process_group()
            except Exception:
                pass
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def run(fn, world: int, *args, timeout_s: float = 60.0, backend: str = "gloo"):
    """Per-rank dicts {"ok": True, "result"} or {"ok": False, "error", "type", "tb"}."""
    with tempfile.TemporaryDirectory() as outdir:
        mp.start_processes(_entry, args=(world, free_port(), fn, args, outdir, timeout_s, backend), nprocs=world,
                           join=True, start_method="spawn")
        out = []
        for r in range(world):
            path = os.path.join(outdir, f"{r}.pt")
            if os.path.exists(path):
                out.append(torch.load(path, weights_only=False))
            else:
                out.append({"ok": False, "error": f"rank {r} exited without a result", "type": "NoResult", "tb": ""})
        return out


def results(fn, world: int, *args, **kw):
    """Like run() but raise if any rank failed; returns the per-rank results."""
    out = run(fn, world, *args, **kw)
    for r, o in enumerate(out):
        if not o["ok"]:
            raise AssertionError(f"rank {r} failed: {o['error']}\n{o['tb']}")
    return [o["result"] for o in out]
