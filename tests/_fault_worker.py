"""Worker processes for tests/test_faults.py (run as scripts, never imported by pytest).

``python tests/_fault_worker.py fmnist ARGS...``
    examples/train_fmnist.py with ARGS, unchanged, except that every optimizer step is followed by
    a sleep of ``$FAULT_STEP_SLEEP`` seconds (default 0).  The sleep touches no tensor, so results
    are bit for bit those of the example; it only gives the test a wide window to kill a worker
    between two checkpoints.  Meant to be started by torchrun.

``python tests/_fault_worker.py jobs SPEC.json``
    Small Gloo DDP jobs with ``ddp_qhooks.register``, all at once: this process imports torch once,
    then forks every rank of every job (importing torch and what DDP imports costs ~3.5
    CPU-seconds per process, which on two shared cores would dominate the test), and reaps them.
    Rank r of a job writes JSON lines to ``DIR/rank<r>.out`` (stderr to ``DIR/rank<r>.err``);
    the launcher appends each rank's exit status to ``DIR/exits.out``.  A rank's options are
    those of ``python tests/_fault_worker.py rank --rank R --world W --port P ...``.

    At step ``--fault-step`` the rank ``--fault-rank`` dies (``exit``: os._exit(3); ``kill``:
    SIGKILL to itself) or stalls (sleeps far longer than the process-group
    timeout), either at the start of the step (``--where step``) or inside the hook, just before
    it would launch the collective that follows the first phase (``--where phase2``: the second
    group of the two-phase exchange, the cross-node group of the hierarchical one; the survivors
    are then blocked on a group the library created, so only that group's timeout frees them).

        {"event": "start", "rank", "pid"}
        {"event": "step", "rank", "step", "modes"}          after each completed step
        {"event": "fault", "rank", "kind", "where", "step", "t"}   the faulty rank, just before it
        {"event": "raised", "rank", "step", "phase", "type", "mro", "msg", "t"}   a survivor's error

    after which a survivor LINGERS (sleeps, process and sockets alive) until the test kills it,
    so that no survivor is freed early by another survivor's exit closing its connections.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import runpy
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = os.path.join(ROOT, "examples", "train_fmnist.py")
STALL_S = 600.0  # a stalled or lingering rank; killed by the test long before


def _emit(**rec) -> None:
    sys.stdout.write(json.dumps(rec) + "\n")
    sys.stdout.flush()


def fmnist(argv) -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    # which attempt this is (torchrun counts restarts of the worker group)
    print(f"[rank {os.environ.get('RANK')}] attempt {os.environ.get('TORCHELASTIC_RESTART_COUNT')}", flush=True)
    delay = float(os.environ.get("FAULT_STEP_SLEEP", "0"))
    if delay > 0:
        register_optimizer_step_post_hook(lambda opt, args, kwargs: time.sleep(delay))
    sys.argv = [FMNIST] + list(argv)
    sys.path.insert(0, ROOT)
    runpy.run_path(FMNIST, run_name="__main__")


def _die_with_parent() -> None:
    """SIGKILL this process when its parent dies (Linux PR_SET_PDEATHSIG), so that no rank outlives
    a test process that was itself killed before it could clean up."""
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(6)


def jobs(argv) -> None:
    """``jobs SPEC.json``: SPEC is a list of {"out_dir", "world", "args"}; fork every rank of every
    job, then reap them, appending {"event": "exit", "rank", "code", "t"} to ``<out_dir>/exits.out``."""
    with open(argv[0]) as f:
        spec = json.load(f)
    _die_with_parent()  # the test process; the ranks die with this launcher in turn
    sys.path.insert(0, ROOT)
    # imported once here, inherited by the forked ranks; DDP's constructor imports torch._dynamo
    # (1.5 CPU-seconds per rank otherwise)
    import torch._dynamo
    import torch.distributed
    import torch.nn  # noqa: F401

    import ddp_qhooks  # noqa: F401

    ranks = {}
    for job in spec:
        for r in range(job["world"]):
            pid = os.fork()
            if pid == 0:
                try:
                    _die_with_parent()
                    for fd, name in ((1, f"rank{r}.out"), (2, f"rank{r}.err")):
                        f = os.open(os.path.join(job["out_dir"], name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                        os.dup2(f, fd)
                        os.close(f)
                    rank_main(job["args"] + ["--rank", str(r), "--world", str(job["world"])])
                except BaseException:  # noqa: BLE001
                    import traceback
                    traceback.print_exc()
                    sys.stderr.flush()
                finally:
                    os._exit(5)
            ranks[pid] = (job["out_dir"], r)
    while ranks:
        pid, status = os.wait()
        out_dir, r = ranks.pop(pid)
        with open(os.path.join(out_dir, "exits.out"), "a") as log:
            log.write(json.dumps({"event": "exit", "rank": r, "code": os.waitstatus_to_exitcode(status),
                                  "t": time.time()}) + "\n")


def rank_main(argv) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--exchange", default="allgather")
    p.add_argument("--ranks-per-node", type=int, default=None)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--fault", choices=["exit", "kill", "stall"], required=True)
    p.add_argument("--where", choices=["step", "phase2"], default="step")
    p.add_argument("--fault-rank", type=int, required=True)
    p.add_argument("--fault-step", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    a = p.parse_args(argv)

    sys.path.insert(0, ROOT)
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    import ddp_qhooks
    import ddp_qhooks.exchange.collectives as ex

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(a.port))
    dist.init_process_group("gloo", rank=a.rank, world_size=a.world, timeout=datetime.timedelta(seconds=a.timeout))
    torch.manual_seed(0)
    # one DDP bucket of ~19k values: large enough that the two-phase exchange is really used at 3 ranks
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 10))
    ddp = DDP(model)
    options = {} if a.ranks_per_node is None else {"ranks_per_node": a.ranks_per_node}
    state = ddp_qhooks.register(ddp, "stochastic", bits=4, exchange=a.exchange, **options)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    faulty = a.rank == a.fault_rank
    _emit(event="start", rank=a.rank, pid=os.getpid(), t=time.time())
    current = {"step": -1}

    def fault() -> None:
        _emit(event="fault", rank=a.rank, kind=a.fault, where=a.where, step=current["step"], t=time.time())
        if a.fault == "exit":
            os._exit(3)
        if a.fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(STALL_S)

    if faulty and a.where == "phase2":
        world_group = dist.group.WORLD
        real = ex.allgather

        def allgather(payload, out, group=None):
            # the first collective of the step on a group other than the default one: the
            # second phase (alltoall) or the cross-node all-gather (hierarchical)
            if current["step"] == a.fault_step and group is not None and group is not world_group:
                fault()
            return real(payload, out, group)
        ex.allgather = allgather

    for step in range(a.steps):
        current["step"] = step
        if faulty and a.where == "step" and step == a.fault_step:
            fault()
        g = torch.Generator().manual_seed(1000 * a.rank + step)
        x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
        phase = "forward"
        try:
            loss = nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            phase = "backward"
            loss.backward()
            phase = "optimizer"
            opt.step()
        except BaseException as exc:  # noqa: BLE001 - report what DDP raised, then linger
            _emit(event="raised", rank=a.rank, step=step, phase=phase, type=type(exc).__name__,
                  mro=[c.__name__ for c in type(exc).__mro__], msg=str(exc)[:2000], t=time.time())
            time.sleep(STALL_S)
            os._exit(4)
        _emit(event="step", rank=a.rank, step=step, modes=state.stats()["exchange_last_step"], t=time.time())
    _emit(event="done", rank=a.rank, t=time.time())
    os._exit(0)  # not destroy_process_group(): the other ranks may be gone or stalled


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    {"fmnist": fmnist, "jobs": jobs, "rank": rank_main}[mode](rest)
