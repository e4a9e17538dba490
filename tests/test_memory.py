"""The hook's extra memory is what README's formula says, and does not grow across steps.

Measured by walking the state's object graph (``soak._walk``: distinct tensor storages the state
holds, and apart from them the codecs' per-thread scratch), compared with the formula computed
here from the bucket sizes and the codec's documented body size (stochastic, one block per bucket:
8 bytes of range + ceil(N * bits / 8) bytes of codes, plus the 16-byte wire header)."""
import math

import _dist  # tests/conftest.py puts tests/ on sys.path
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_qhooks
from ddp_qhooks.tools.soak import _walk

HEADER = 16
BITS = 4


def _payload(numel: int) -> int:
    return HEADER + 8 + math.ceil(numel * BITS / 8)


def _w_memory(rank, world, exchange, error_feedback):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(300, 300) for _ in range(6)])
    ddp = DDP(model, bucket_cap_mb=0.5)
    state = ddp_qhooks.register(ddp, codec="stochastic", bits=BITS, exchange=exchange, error_feedback=error_feedback,
                                block_size=None)  # one block per bucket: the formula below
    walks = []
    for step in range(5):
        torch.manual_seed(100 * rank + step)
        ddp(torch.randn(8, 300)).sum().backward()
        walks.append(_walk(state))
    return {"walks": walks, "numels": [e["numel"] for e in state.timeline()],
            "modes": {e["mode"] for e in state.timeline()}}


def _formula(numels, world, exchange, error_feedback) -> int:
    total = 0
    for n in numels:
        p = _payload(n)
        residuals = 8 * n if error_feedback else 4 * n   # residual + staged residual, or the error scratch
        if exchange == "allgather":
            total += (world + 1) * p + residuals
        else:
            shard = math.ceil(n / world)
            slot = _payload(shard)   # the largest shard's payload; the mean uses the same codec
            # W send + W receive slots, own mean + W gathered means, float32 mean of the
            # own shard, worker and server residuals (each with its staged copy)
            total += 2 * world * slot + (world + 1) * slot + 4 * shard + residuals * (2 if error_feedback else 1)
    return total


def test_held_memory_is_the_formula_and_flat():
    for exchange, ef in (("allgather", True), ("alltoall", True), ("allgather", False)):
        for run in _dist.results(_w_memory, 3, exchange, ef):
            assert run["modes"] == {exchange} and len(run["numels"]) == 3
            want = _formula(run["numels"], 3, exchange, ef)
            held = [w["held_bytes"] for w in run["walks"][1:]]  # after DDP's bucket rebuild
            assert len(set(held)) == 1, f"{exchange}: held bytes change across steps: {held}"
            # beyond the formula: codec constants only (plane masks: a few bytes)
            assert 0 <= held[0] - want < 1024, (exchange, ef, held[0], want)
            scratch = [w["scratch_bytes"] for w in run["walks"][2:]]
            assert len(set(scratch)) == 1 and scratch[0] < 48 * 2**20  # per-thread chunk buffers (<= 12 MiB each), flat
