"""LocalSGD (local steps + quantized outer synchronization) against independent computations."""
import _dist  # tests/conftest.py puts tests/ on sys.path
import pytest
import torch

import ddp_qhooks
from ddp_qhooks.integrations.local_sgd import LocalSGD, _split


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, 6, generator=g)
    return x, x[:, :3] * (1 + rank) - x[:, 3:]


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _w_train(rank, world, steps, kw, restart_at=None):
    """Inner SGD (momentum 0.9) on rank-specific data; record, at every synchronization, the
    start point, the local parameters before it and the parameters after it."""
    model = _model()
    if rank:  # different local weights: LocalSGD must start everyone from rank 0's
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    sync = LocalSGD(model, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start = _flat(model)
    log = {"start0": start.clone(), "syncs": []}
    for step in range(1, steps + 1):
        if restart_at is not None and step == restart_at + 1:  # checkpoint, rebuild, load
            sd, opt_sd, params = sync.state_dict(), opt.state_dict(), _flat(model)
            model = _model()
            sync = LocalSGD(model, **kw)
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(params, model.parameters())
            sync.load_state_dict(sd)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            opt.load_state_dict(opt_sd)
        x, y = _batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        local = _flat(model)
        if sync.step():
            log["syncs"].append({"step": step, "start": start, "local": local, "after": _flat(model)})
            start = _flat(model)
    sd = sync.hook.state_dict()
    log["residual"] = torch.cat([sd["residuals"][n].reshape(-1) for n, _ in model.named_parameters()]) \
        if sd["residuals"] else None
    server = sd["server_residuals"]
    log["server"] = torch.cat([server[n].reshape(-1) if n in server else torch.zeros(p.numel())
                               for n, p in model.named_parameters()])
    log["stats"] = sync.stats()
    log["final"] = _flat(model)
    return log


def _w_both(rank, world):
    return {"average": _w_train(rank, world, 9, {"local_steps": 3, "codec": "none", "outer": "average"}),
            "nesterov": _w_train(rank, world, 8, {"local_steps": 2, "codec": "none", "outer": "nesterov",
                                                  "outer_lr": 0.7, "outer_momentum": 0.9})}


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"W{w}")
def none_runs(request):
    return request.param, _dist.results(_w_both, request.param)


def test_codec_none_average_is_exact_parameter_averaging(none_runs):
    world, both = none_runs
    runs = [b["average"] for b in both]
    assert all(torch.equal(r["start0"], runs[0]["start0"]) for r in runs)  # broadcast from rank 0
    for k in range(3):
        steps = {r["syncs"][k]["step"] for r in runs}
        assert steps == {3 * (k + 1)}
        mean = sum(r["syncs"][k]["local"] for r in runs) / world
        for r in runs:
            torch.testing.assert_close(r["syncs"][k]["after"], mean, rtol=1e-6, atol=1e-7)
    st = runs[0]["stats"]
    assert st["syncs"] == 3 and st["inner_steps"] == 9 and st["local_steps"] == 3


def test_codec_none_nesterov_is_the_diloco_update(none_runs):
    world, both = none_runs
    runs = [b["nesterov"] for b in both]
    lr, mu = 0.7, 0.9
    buf = None
    theta = runs[0]["start0"].double()
    for k in range(4):
        delta = sum(theta - r["syncs"][k]["local"].double() for r in runs) / world  # mean pseudo-gradient
        buf = delta if buf is None else mu * buf + delta
        theta = theta - lr * (delta + mu * buf)
        for r in runs:
            torch.testing.assert_close(r["syncs"][k]["after"].double(), theta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("exchange,world", [("allgather", 3), ("alltoall", 2)])  # W=3: this tiny model's
def test_error_feedback_telescopes_on_pseudo_gradients(exchange, world):      # two-phase falls back to all-gather
    """sum over syncs of the applied mean + the pending correction == sum of the true mean
    pseudo-gradients (outer averaging with lr 1: applied mean = start - after).  The pending
    correction is the mean worker residual, plus, two-phase, the sum of the server residuals."""
    runs = _dist.results(_w_train, world, 12, {"local_steps": 3, "codec": "stochastic", "bits": 2, "outer": "average",
                                               "exchange": exchange})
    applied = sum(s["start"] - s["after"] for s in runs[0]["syncs"]).double()
    true = sum(sum(s["start"] - s["local"] for s in r["syncs"]) for r in runs).double() / world
    residual = sum(r["residual"] for r in runs).double() / world + sum(r["server"] for r in runs).double()
    assert runs[0]["stats"]["exchange_last_step"] == {exchange: 1}
    assert (exchange == "alltoall") == any(float(r["server"].abs().max()) > 0 for r in runs)
    torch.testing.assert_close(applied + residual, true, rtol=1e-5, atol=1e-6)
    assert float((applied - true).abs().max()) > 1e-4  # the quantization did lose something
    assert all(torch.equal(r["final"], runs[0]["final"]) for r in runs)


def test_checkpoint_round_trip_continues_bitwise():
    kw = {"local_steps": 3, "codec": "stochastic", "bits": 4, "outer": "nesterov", "fragments": 2}
    plain = _dist.results(_w_train, 2, 10, kw)
    resumed = _dist.results(_w_train, 2, 10, kw, 5)
    for a, b in zip(plain, resumed):
        assert torch.equal(a["final"], b["final"])
        assert torch.equal(a["residual"], b["residual"])


def test_fragments_staggered_and_split_evenly():
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 10), torch.nn.Linear(10, 4))
    params = list(model.parameters())
    groups = _split(params, 3)
    assert [p for g in groups for p in g] == params and len(groups) == 3 and all(groups)
    sync = LocalSGD(model, local_steps=4, codec="none", fragments=2)
    assert [sync.due(s) for s in range(1, 9)] == [[], [1], [], [0], [], [1], [], [0]]
    assert [len(_split(params, k)) for k in range(1, 7)] == list(range(1, 7))


def test_bad_arguments_are_clear():
    model = _model()
    for kw, msg in (({"local_steps": 0}, "local_steps"), ({"outer": "adam"}, "outer must be one of"),
                    ({"outer_lr": 0}, "outer_lr"), ({"outer_momentum": 1.0}, "outer_momentum"),
                    ({"fragments": 99}, "fragments must be"), ({"codec": "nope"}, "nope")):
        with pytest.raises(ValueError, match=msg):
            LocalSGD(model, **kw)
    assert ddp_qhooks.LocalSGD is LocalSGD


def _w_local_phase(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = _model()
    ddp = DDP(model)
    ddp.register_comm_hook(None, ddp_qhooks.local_phase_hook)
    x, y = _batch(rank, 0)
    torch.nn.functional.mse_loss(ddp(x), y).backward()
    plain = _model()
    torch.nn.functional.mse_loss(plain(x), y).backward()
    return {"ddp": [p.grad.clone() for p in model.parameters()], "own": [p.grad.clone() for p in plain.parameters()]}


def test_local_phase_hook_keeps_each_ranks_own_gradient():
    runs = _dist.results(_w_local_phase, 2)
    for r in runs:
        for a, b in zip(r["ddp"], r["own"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(runs[0]["ddp"][0], runs[1]["ddp"][0])


def _w_nonfinite(rank, world):
    import warnings
    model = _model()
    sync = LocalSGD(model, local_steps=2, codec="stochastic", bits=4, outer="average")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = {}
    for step in range(1, 7):
        x, y = _batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if step == 3:
            out["start"] = torch.cat([s.reshape(-1) for f in sync._start for s in f]).clone()
            out["residual"] = {k: v.clone() for k, v in sync.hook.state_dict()["residuals"].items()}
            if rank == 1:
                with torch.no_grad():
                    next(model.parameters())[0, 0] = float("nan")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sync.step()
        if step == 4:
            out["after"] = _flat(model)
            out["warned"] = any("non-finite pseudo-gradient" in str(w.message) for w in caught)
            out["residual_after"] = sync.hook.state_dict()["residuals"]
    out["stats"] = sync.stats()
    out["final"] = _flat(model)
    return out


def test_nonfinite_round_is_dropped_everywhere():
    runs = _dist.results(_w_nonfinite, 2)
    for r in runs:
        assert r["warned"] and r["stats"]["nonfinite_syncs"] == 1 and r["stats"]["syncs"] == 2
        assert torch.equal(r["after"], r["start"])  # back to the last synchronized point
        for k, v in r["residual"].items():
            assert torch.equal(r["residual_after"][k], v)  # residuals kept
        assert bool(torch.isfinite(r["final"]).all())
    assert torch.equal(runs[0]["final"], runs[1]["final"])


def _w_matrix(rank, world):
    """Every exchange x fragments in {1, 2, 3}: LocalSGD drives the engine directly, with no
    ordering gate between fragments, so none of these may hang; every rank ends with the same
    parameters; with codec none (two of the configurations) synchronization is exact averaging."""
    out = {}
    for exchange in ("auto", "allgather", "alltoall", "hierarchical"):
        for fragments in (1, 2, 3):
            codec = "none" if (exchange, fragments) in (("alltoall", 2), ("hierarchical", 3)) else "stochastic"
            kw = {"local_steps": 2, "codec": codec, "exchange": exchange, "fragments": fragments}
            if codec == "stochastic":
                kw["bits"] = 4
            if exchange == "hierarchical":
                kw["ranks_per_node"] = 1
            log = _w_train(rank, world, 4, kw)
            out[(exchange, fragments, codec)] = (log["final"], log["syncs"], log["stats"]["syncs"])
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_every_exchange_and_fragment_count_finishes(world):
    runs = _dist.results(_w_matrix, world, timeout_s=120)
    for cfg, (final, syncs, count) in runs[0].items():
        assert count == 2 * cfg[1], cfg  # every fragment synchronized once per 2 steps
        if cfg[1] == 1:
            assert all(torch.equal(other[cfg][0], final) for other in runs[1:]), cfg
        for k, s in enumerate(syncs):
            synced = s["after"] != s["local"]  # the fragment synchronized at this step
            assert bool(synced.any()), cfg
            for other in runs[1:]:
                assert torch.equal(other[cfg][1][k]["after"][synced], s["after"][synced]), cfg
            if cfg[2] == "none":
                mean = sum(r[cfg][1][k]["local"] for r in runs) / world
                torch.testing.assert_close(s["after"][synced], mean[synced], rtol=1e-6, atol=1e-7)
