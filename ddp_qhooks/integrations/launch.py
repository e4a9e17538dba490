"""Join the process group from whatever launched this process: torchrun, SLURM's srun, or nothing.

``torchrun`` (and ``torch.distributed.launch``, Lightning, Accelerate) set ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; torch reads them itself.
``srun`` with one task per rank sets ``SLURM_PROCID``, ``SLURM_LOCALID``
and ``SLURM_STEP_NUM_TASKS`` instead: :func:`init_from_env` maps those to torch's names, so the same script runs under both.
The address of the first node must still be exported by the job script (``MASTER_ADDR``,
``MASTER_PORT``; see ``slurm/srun.sbatch``), because SLURM does not define one.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Launch:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    launcher: str  # "torchrun", "env" or "slurm"


def launcher() -> str | None:
    """``"torchrun"`` under torchrun, ``"env"`` when torch's variables were set otherwise,
    ``"slurm"`` inside an srun step with more than one task, else ``None`` (a plain ``python script.py``)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "env"
    # SLURM_STEP_NUM_TASKS exists only inside an srun step, not in the batch script itself, where
    # SLURM_NTASKS would describe ranks that were never started
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        return "slurm"
    return None


def init_from_env(cpu: bool = False, timeout_s: float | None = None) -> Launch:
    """Initialise the default process group from the launcher's environment.

    NCCL on ``cuda:LOCAL_RANK`` when CUDA is available and ``cpu`` is false, else Gloo on the CPU.
    Raises ``RuntimeError`` naming what is missing when no launcher environment is present.
    """
    kind = launcher()
    if kind is None:
        raise RuntimeError("no launcher environment: run under torchrun (RANK/WORLD_SIZE) or srun "
                           "(SLURM_PROCID/SLURM_STEP_NUM_TASKS with MASTER_ADDR/MASTER_PORT exported)")
    if kind == "slurm":
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise RuntimeError(f"running under srun but {' and '.join(missing)} not set: export the first node's "
                               "address and a free port in the job script (see slurm/srun.sbatch)")
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_STEP_NUM_TASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and not cpu:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    if kind == "torchrun" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        # torchrun (torch 2.13) hands every restart attempt the agent's store under the same keys:
        # after `--max-restarts` restarts a worker, the new ranks can read the dead attempt's Gloo
        # addresses and fail ("connectFullMesh ... Connection refused") or hang.  A per-attempt
        # key prefix keeps the attempts apart.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=kwargs.get("timeout", datetime.timedelta(minutes=5)))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        kwargs.update(store=dist.PrefixStore(f"ddp_qhooks/attempt{attempt}", store),
                      rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    dist.init_process_group(backend, **kwargs)
    return Launch(dist.get_rank(), dist.get_world_size(), local_rank, device, backend, kind)


def run(train, *args, world_size: int = 2, cpu: bool = False, timeout_s: float | None = None) -> None:
    """Call ``train(env, *args)`` on every rank in a process group, ``env`` being this rank's
    :class:`Launch`: under a launcher (torchrun, srun) in this process; from a plain ``python
    script.py``, in ``world_size`` local processes on the CPU, each with the variables torchrun
    would set.  ``train`` must be a module-level function (local processes are spawned)."""
    if launcher() is not None:
        _in_group(train, args, cpu, timeout_s)
        return
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_local_rank, args=(world_size, port, train, args, timeout_s), nprocs=world_size,
                       start_method="spawn")


def _local_rank(rank: int, world: int, port: int, train, args, timeout_s) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # the local ranks share this machine's cores
    _in_group(train, args, True, timeout_s)


def _in_group(train, args, cpu: bool, timeout_s) -> None:
    env = init_from_env(cpu=cpu, timeout_s=timeout_s)
    try:
        train(env, *args)
    finally:
        dist.destroy_process_group()
