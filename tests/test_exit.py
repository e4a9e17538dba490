"""A finished run exits cleanly, always.

The abort this guards against ("terminate called without an active exception", SIGABRT after a
successful run) comes from a C++ backend thread that still holds a Python object when the
interpreter finalizes: it needs the GIL and is unwound inside a noexcept destructor.  The engine
therefore never hands Python code or objects to a backend thread: launched collectives are waited
for, and their results decoded, on the engine's own completion thread, which Python joins before
it finalizes.  And a backend thread must never hold the last reference to a launched Work (its
destructor would need the GIL): the recent Works stay referenced from Python.  The first tests
prove those properties for every exchange and every launcher; the last runs the quickstart many
times under CPU load and fails on a single abnormal exit.
"""
import ast
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_qhooks
from ddp_qhooks.exchange import collectives

from _dist import free_port, results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART_RUNS = int(os.environ.get("DDP_QHOOKS_EXIT_RUNS", "6"))


def _threads_running_codec_code(rank, world, exchange, chunk_size):
    if exchange == "hierarchical":
        os.environ["LOCAL_WORLD_SIZE"] = "2"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 4))
    ddp = DDP(model, bucket_cap_mb=0.25)
    state = ddp_qhooks.register(ddp, "stochastic", bits=4, exchange=exchange, chunk_size=chunk_size)
    seen = []
    codec = state.codec
    for name in ("encode", "decode"):
        real = getattr(codec, name)

        def spy(*a, _real=real, _name=name, **kw):
            t = threading.current_thread()
            seen.append((_name, type(t).__name__, t.name))
            return _real(*a, **kw)
        setattr(codec, name, spy)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    for step in range(3):
        x = torch.randn(8, 256, generator=torch.Generator().manual_seed(rank * 10 + step))
        opt.zero_grad()
        ddp(x).square().mean().backward()
        opt.step()
    return seen, state.stats()["exchange_last_step"]


@pytest.mark.parametrize("exchange,world,chunk_size", [("allgather", 2, None), ("allgather", 2, 1 << 16),
                                                       ("alltoall", 3, 1 << 16), ("hierarchical", 4, None)])
def test_no_python_runs_on_a_backend_thread(exchange, world, chunk_size):
    for seen, modes in results(_threads_running_codec_code, world, exchange, chunk_size):
        assert set(modes) == {exchange}
        assert seen and {kind for _, kind, _ in seen} <= {"_MainThread", "Thread"}, seen
        # every decode on the completion thread; the first encode on the training thread (the
        # hierarchical exchange encodes after the node's full-precision sum, on the completion thread)
        assert {name for op, _, name in seen if op == "decode"} and \
            all(name.startswith("ddp_qhooks") for op, _, name in seen if op == "decode")
        assert any(kind == "_MainThread" for op, kind, _ in seen if op == "encode") == (exchange != "hierarchical")


def _works_left_to_backend_threads(rank, world, exchange):
    if exchange == "hierarchical":
        os.environ["LOCAL_WORLD_SIZE"] = "2"
    launched = []
    for name in ("allgather", "allreduce", "alltoall"):
        real = getattr(collectives, name)

        def spy(*a, _real=real, **kw):
            work = _real(*a, **kw)
            launched.append(work)
            return work
        setattr(collectives, name, spy)
    torch.manual_seed(0)
    ddp = DDP(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 4)), bucket_cap_mb=0.02)
    ddp_qhooks.register(ddp, "stochastic", bits=4, exchange=exchange)
    for step in range(2):
        ddp(torch.randn(8, 64, generator=torch.Generator().manual_seed(rank * 10 + step))).square().mean().backward()
    kept = {id(w) for w in collectives._RECENT_WORKS}
    last = launched[-collectives._RECENT_WORKS.maxlen:]
    return len(launched), sum(id(w) not in kept for w in last), all(w.is_completed() for w in last)


@pytest.mark.parametrize("exchange,world", [("allgather", 2), ("alltoall", 3), ("hierarchical", 4)])
def test_the_last_works_stay_referenced_from_python(exchange, world):
    for n, not_kept, completed in results(_works_left_to_backend_threads, world, exchange):
        assert n > 0 and not_kept == 0 and completed, (n, not_kept, completed)


def test_every_collective_is_launched_through_the_keeper():
    """Every ``async_op=True`` call in the package is the argument of ``collectives._launched``, so
    a new launcher cannot bring the abort back."""
    bare = []
    for folder, _, files in os.walk(os.path.join(ROOT, "ddp_qhooks")):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            tree = ast.parse(open(path).read())
            wrapped = {id(c.args[0]) for c in ast.walk(tree) if isinstance(c, ast.Call) and c.args
                       and getattr(c.func, "id", getattr(c.func, "attr", None)) == "_launched"}
            for c in ast.walk(tree):
                if isinstance(c, ast.Call) and any(k.arg == "async_op" and getattr(k.value, "value", None) is True
                                                   for k in c.keywords) and id(c) not in wrapped:
                    bare.append(f"{os.path.relpath(path, ROOT)}:{c.lineno}")
    assert not bare, bare


@pytest.mark.slow
def test_quickstart_exits_cleanly_under_load():
    """README's quickstart, launched as torchrun would (two processes, env:// rendezvous), many
    times while another process keeps a core busy: every run must exit 0 with both ranks' line."""
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    failures = []
    try:
        for i in range(QUICKSTART_RUNS):
            port = free_port()
            procs = []
            for rank in range(2):
                env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
                procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "examples", "quickstart.py")], env=env,
                                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            for rank, p in enumerate(procs):
                out, _ = p.communicate(timeout=180)
                if p.returncode != 0 or f"rank {rank}: loss" not in out:
                    failures.append(f"run {i} rank {rank}: exit {p.returncode}\n{out[-2000:]}")
    finally:
        burner.kill()
        burner.wait()
    assert not failures, f"{len(failures)} abnormal exit(s) in {QUICKSTART_RUNS} runs:\n" + "\n".join(failures)
