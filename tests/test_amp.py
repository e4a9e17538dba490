"""Mixed precision: torch.autocast on the CPU (bf16 and fp16) with a GradScaler, and a step whose
gradient is non-finite on ONE rank.  The hook must turn that bucket into NaN on every rank, so that
every rank's GradScaler skips the same step and lowers its scale; the residuals must stay as they
were before the bad step (finite), and training must go on."""
from __future__ import annotations

import _dist
import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_qhooks

pytestmark = pytest.mark.slow
BAD_STEP, STEPS = 3, 20
CONFIGS = [("stochastic", 4, 8, "allgather"), ("sign", 1, 8, "allgather"), ("stochastic", 4, 8, "alltoall"),
           ("ternary", 2, 8, "alltoall")]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _residuals(state):
    sd = state.state_dict()
    return {("w", k): v.clone() for k, v in sd["residuals"].items()} | \
        {("s", k): v.clone() for k, v in sd["server_residuals"].items()}


def _amp_run(rank, world, codec, bits, block_size, exch, dtype_name):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
    ddp = DDP(model)
    opts = {} if block_size is None else {"block_size": block_size}
    state = ddp_qhooks.register(ddp, codec, bits=bits, exchange=exch, **opts)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    g = torch.Generator().manual_seed(100 + rank)
    w_true = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    x_eval = torch.randn(256, 12, generator=torch.Generator().manual_seed(1))
    log = []

    def eval_loss():
        with torch.no_grad():
            return float(((model(x_eval) - x_eval @ w_true) ** 2).mean())

    first_eval = eval_loss()
    for step in range(STEPS):
        x = torch.randn(32, 12, generator=g)
        y = x @ w_true
        if step == BAD_STEP and rank == world - 1:
            x[0, 0] = float("inf")  # one rank's batch overflows
        before = [p.detach().clone() for p in model.parameters()]
        res_before = _residuals(state)
        scale_before = scaler.get_scale()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=DTYPES[dtype_name]):
            loss = ((ddp(x) - y) ** 2).mean()
        scaler.scale(loss).backward()
        grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        scaler.step(opt)
        scaler.update()
        res_after = _residuals(state)
        log.append({"loss": float(loss.float()), "grads_finite": grads_finite,
                    "params_unchanged": all(torch.equal(a, p) for a, p in zip(before, model.parameters())),
                    "scale": (scale_before, scaler.get_scale()),
                    "residuals_unchanged": all(torch.equal(v, res_after[k]) for k, v in res_before.items()),
                    "residuals_finite": all(bool(torch.isfinite(v).all()) for v in res_after.values()),
                    "has_residuals": bool(res_before)})
    return {"log": log, "params": [p.detach().clone() for p in model.parameters()], "stats": state.stats(),
            "eval": (first_eval, eval_loss())}


@pytest.fixture(scope="module", params=list(DTYPES))
def amp_runs(request):
    return _dist.results(_amp_worker, 2, request.param)


def _amp_worker(rank, world, dtype_name):
    return {c: _amp_run(rank, world, *c, dtype_name) for c in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-{c[3]}")
def test_inf_step_under_autocast_is_skipped_everywhere_and_training_goes_on(amp_runs, config):
    for rank, res in enumerate(amp_runs):
        log = res[config]["log"]
        bad = log[BAD_STEP]
        assert not bad["grads_finite"], f"rank {rank}: the non-finite bucket must reach every rank"
        assert bad["params_unchanged"], f"rank {rank}: GradScaler must skip the step"
        assert bad["scale"][1] == bad["scale"][0] / 2, f"rank {rank}: scale must back off, got {bad['scale']}"
        assert bad["residuals_unchanged"] and bad["residuals_finite"], f"rank {rank}: residuals touched by the bad step"
        for step, entry in enumerate(log):
            assert entry["residuals_finite"], (rank, step)
            if step != BAD_STEP:
                assert entry["grads_finite"] and not entry["params_unchanged"], (rank, step)
        assert log[BAD_STEP + 1]["has_residuals"]
        first, last = res[config]["eval"]
        assert last < 0.75 * first, f"training must go on after the skipped step: eval loss {first:.3f} -> {last:.3f}"
        assert res[config]["stats"]["nonfinite_steps"] == 1
    for a, b in zip(amp_runs[0][config]["params"], amp_runs[1][config]["params"]):
        assert torch.equal(a, b), "ranks diverged"
