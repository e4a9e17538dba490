"""worker_momentum.WorkerMomentum and the hook's ``worker_momentum=`` option: with the lossless codec
"none" and the optimizer's momentum set to 0, training equals SGD with momentum exactly."""
import _dist  # tests/conftest.py puts tests/ on sys.path
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_qhooks
from ddp_qhooks.worker_momentum import WorkerMomentum


def test_apply_is_heavy_ball_per_parameter_across_bucket_rebuilds():
    torch.manual_seed(0)
    wm = WorkerMomentum(0.9)
    ref = {0: torch.zeros(3), 1: torch.zeros(5), 2: torch.zeros(2)}
    for step in range(6):
        g = {k: torch.randn(v.numel()) for k, v in ref.items()}
        for k in ref:
            ref[k] = 0.9 * ref[k] + g[k]
        # DDP rebuilds its buckets after the first step: other groupings of the same parameters
        buckets = [((0, 1, 2),)] if step == 0 else [((2,),), ((0, 1),)] if step < 4 else [((1, 2),), ((0,),)]
        for (sig,) in buckets:
            x = torch.cat([g[k] for k in sig])
            out = wm.apply(sig, [g[k].numel() for k in sig], x)
            assert out is x
            torch.testing.assert_close(x, torch.cat([ref[k] for k in sig]), rtol=0, atol=1e-6)
        wm.commit([sig for (sig,) in buckets])  # the engine does this at the end of a finite step
    sd = wm.state_dict()
    assert sorted(sd) == [0, 1, 2] and all(torch.allclose(sd[k], ref[k], atol=1e-6) for k in ref)
    other = WorkerMomentum(0.9)
    other.load_state_dict(sd)
    x = torch.ones(10)
    other.apply((0, 1, 2), (3, 5, 2), x)
    torch.testing.assert_close(x, 0.9 * torch.cat([ref[0], ref[1], ref[2]]) + 1, rtol=0, atol=1e-6)


def test_nonfinite_bucket_leaves_the_momentum_and_bad_beta_is_refused():
    wm = WorkerMomentum(0.5)
    wm.apply((0,), (2,), torch.tensor([1.0, 2.0]))
    wm.commit([(0,)])
    bad = torch.tensor([float("nan"), 1.0])
    wm.apply((0,), (2,), bad)   # a non-finite step: the engine does not commit it
    assert torch.isnan(bad[0])
    torch.testing.assert_close(wm.state_dict()[0], torch.tensor([1.0, 2.0]))
    for beta in (1.0, -0.1, float("nan"), True, "0.9"):
        with pytest.raises(ValueError, match="worker_momentum"):
            WorkerMomentum(beta)
    with pytest.raises(ValueError, match="worker_momentum"):
        ddp_qhooks.QuantizedHookState(codec="none", worker_momentum=1.5)


def _w_equivalence(rank, world):
    out = {}
    for variant in ("sgd_momentum", "worker_momentum"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 3))
        ddp = DDP(model, bucket_cap_mb=0.01)  # several buckets, rebuilt after the first step
        if variant == "worker_momentum":
            state = ddp_qhooks.register(ddp, "none", worker_momentum=0.9)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.0)
        else:
            state = None
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        g = torch.Generator().manual_seed(100 + rank)
        for step in range(12):
            x = torch.randn(16, 20, generator=g)
            y = torch.randn(16, 3, generator=g)
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[variant] = [p.detach().clone() for p in model.parameters()]
        if state is not None:
            sd = state.state_dict()
            out["names"] = sorted(sd["worker_momentum"])
            out["bufs"] = {n: t.clone() for n, t in sd["worker_momentum"].items()}
            fresh = ddp_qhooks.QuantizedHookState(codec="none", worker_momentum=0.9, module=model)
            fresh.load_state_dict(sd)
            out["reloaded"] = {k: v for k, v in fresh.worker_momentum.state_dict().items()}
    return out


def test_hook_worker_momentum_with_codec_none_equals_sgd_momentum():
    res = _dist.results(_w_equivalence, 2)
    for r in res:
        for a, b in zip(r["sgd_momentum"], r["worker_momentum"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert r["names"] == sorted(n for n, _ in torch.nn.Sequential(
            torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
            torch.nn.Linear(64, 3)).named_parameters())
        assert len(r["reloaded"]) == len(r["names"])
        assert all(torch.equal(r["reloaded"][k], r["bufs"][n]) for k, n in
                   enumerate([n for n in ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")]))
    # the workers' momenta differ (local gradients), their mean is the global momentum
    assert not torch.equal(res[0]["bufs"]["0.weight"], res[1]["bufs"]["0.weight"])
