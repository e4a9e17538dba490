"""LocalSGD's federated options (drift correction, partial participation, delayed rounds) against an
independent single-process simulation of W clients."""
import _dist  # tests/conftest.py puts tests/ on sys.path
import pytest
import torch

from ddp_qhooks.integrations.local_sgd import LocalSGD
from ddp_qhooks.integrations.local_sgd.rounds import participants

LR = 0.05


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, 6, generator=g)
    return x, x[:, :3] * (1 + rank) - x[:, 3:]  # a different target per rank: drift to correct


def _flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors]).clone()


def _cat(frags):
    return _flat([t for f in frags for t in f])


def _residual(hook, model):
    sd = hook.state_dict()["residuals"]
    return torch.cat([sd[n].reshape(-1) if n in sd else torch.zeros(p.numel()) for n, p in model.named_parameters()])


def _run(rank, world, steps, kw, restart_at=None):
    """Plain SGD inner steps on rank-specific data; optionally checkpoint and rebuild mid-run."""
    model = _model()
    if rank:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # LocalSGD starts everyone from rank 0's weights
    sync = LocalSGD(model, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sync.attach(opt)
    log = []
    for step in range(1, steps + 1):
        if step == restart_at:
            sd, params = sync.state_dict(), _flat(model.parameters())
            assert sd["pending"] or not kw.get("delay"), "the checkpoint is meant to hold an exchange in flight"
            model = _model()
            sync = LocalSGD(model, **kw)
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(params, model.parameters())
            sync.load_state_dict(sd)
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            sync.attach(opt)
        x, y = _batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if sync.step():
            log.append({"step": step, "who": sync.stats()["participants_last_sync"],
                        "residual": _residual(sync.hook, model)})
    out = {"final": _flat(model.parameters()), "stats": sync.stats(), "log": log,
           "residual": _residual(sync.hook, model)}
    if sync.cv_hook is not None:
        out.update(c=_cat(sync.drift.c), ci=_cat(sync.drift.ci), cv_residual=_residual(sync.cv_hook, model))
    return out


def _grad(y, rank, step):
    model = _model()
    torch.nn.utils.vector_to_parameters(y, model.parameters())
    x, t = _batch(rank, step)
    torch.nn.functional.mse_loss(model(x), t).backward()
    return torch.nn.utils.parameters_to_vector(p.grad for p in model.parameters()).detach()


def _simulate(world, steps, kw):
    """SCAFFOLD / FedProx / FedAvg as in the papers, W clients in one process, plain SGD inside,
    outer averaging; a round's mean lands ``delay`` steps late with the local progress kept, and
    the inner steps use the c and c_i of the same (last applied) round."""
    h, drift, delay = kw["local_steps"], kw.get("drift", "none"), kw.get("delay", 0)
    option, mu, frac = kw.get("scaffold_option", "II"), kw.get("mu", 0.01), kw.get("participation", 1.0)
    x = torch.nn.utils.parameters_to_vector(_model().parameters()).detach().double()
    y = [x.clone() for _ in range(world)]
    zero = torch.zeros_like(x)
    c, ci = zero.clone(), [zero.clone() for _ in range(world)]
    used = [zero.clone() for _ in range(world)]  # the c_i of the round whose c was applied last
    gsum, first, k = [zero.clone() for _ in range(world)], [None] * world, [0] * world
    pending, rounds = [], 0

    def apply(due):
        nonlocal x, c
        for p in [p for p in pending if p[0] <= due]:
            pending.remove(p)
            _, sent, who, dc = p
            new = sum(sent[i] for i in who) / len(who)
            for i in range(world):
                y[i] = new + (y[i] - sent[i])
            x = new
            c = c + dc / world
            used[:] = [t.clone() for t in ci]

    for step in range(1, steps + 1):
        for i in range(world):
            g = _grad(y[i].float(), i, step).double()
            gsum[i] += g
            first[i] = g if k[i] == 0 else first[i]
            k[i] += 1
            if drift == "scaffold":
                g = g + c - used[i]
            elif drift == "fedprox":
                g = g + mu * (y[i] - x)
            y[i] = y[i] - LR * g
        apply(step)
        if step % h == 0:
            who = participants(kw.get("seed", 0), 0, rounds, world, frac)
            rounds += 1
            dc = zero.clone()
            for i in who:
                if option == "I":
                    new = first[i]
                elif delay == 0:  # the paper's option II (plain SGD, c fixed during the round)
                    new = ci[i] - c + (x - y[i]) / (k[i] * LR)
                else:
                    new = gsum[i] / k[i]
                dc += new - ci[i]
                ci[i] = new
            gsum, k = [zero.clone() for _ in range(world)], [0] * world
            pending.append((step + delay, [t.clone() for t in y], who, dc))
            apply(step)
    return {"y": y, "c": c, "ci": ci}


CASES = {  # name: (steps, LocalSGD options); codec none unless set
    "scaffold_II": (9, {"local_steps": 3, "drift": "scaffold"}),
    "scaffold_I": (9, {"local_steps": 3, "drift": "scaffold", "scaffold_option": "I"}),
    "fedprox": (9, {"local_steps": 3, "drift": "fedprox", "mu": 0.5}),
    "participation": (8, {"local_steps": 2, "drift": "scaffold", "participation": 0.5, "seed": 3}),
    "delay": (10, {"local_steps": 3, "drift": "scaffold", "delay": 2, "overlap": True}),
}


def _w_cases(rank, world):
    out = {name: _run(rank, world, steps, {"codec": "none", **kw}) for name, (steps, kw) in CASES.items()}
    sto = {"codec": "stochastic", "bits": 4, "local_steps": 4, "fragments": 2, "drift": "scaffold"}
    out["sync"] = _run(rank, world, 8, sto)
    out["overlap0"] = _run(rank, world, 8, {**sto, "overlap": True, "delay": 0})
    ef = {"codec": "stochastic", "bits": 2, "local_steps": 2, "drift": "scaffold", "exchange": "allgather"}
    out["ef"] = _run(rank, world, 10, ef)
    part = {"codec": "stochastic", "bits": 4, "local_steps": 2, "participation": 0.5, "seed": 1}
    out["part_sto"] = _run(rank, world, 12, part)
    res = {**sto, "delay": 1, "participation": 0.5}
    out["resume_plain"] = _run(rank, world, 11, res)
    out["resume"] = _run(rank, world, 11, res, restart_at=3)  # fragment 1's exchange of step 2 is in flight
    return out


@pytest.fixture(scope="module")
def cases():
    return _dist.results(_w_cases, 4, timeout_s=120)


@pytest.mark.parametrize("name", list(CASES))
def test_codec_none_equals_the_independent_simulation(cases, name):
    steps, kw = CASES[name]
    world = len(cases)
    ref = _simulate(world, steps, kw)
    for rank, r in enumerate(cases):
        got = r[name]
        torch.testing.assert_close(got["final"].double(), ref["y"][rank], rtol=1e-4, atol=1e-5)
        if kw.get("drift") == "scaffold":
            torch.testing.assert_close(got["c"].double(), ref["c"], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got["ci"].double(), ref["ci"][rank], rtol=1e-4, atol=1e-5)


def test_participation_is_a_seeded_subset_and_the_mean_is_over_it(cases):
    world = len(cases)
    logs = [r["participation"]["log"] for r in cases]
    drawn = [entry["who"] for entry in logs[0]]
    assert all([e["who"] for e in lg] == drawn for lg in logs)  # the same draw on every rank
    assert drawn == [participants(3, 0, r, world, 0.5) for r in range(len(drawn))]
    assert all(len(w) == 2 for w in drawn) and len({tuple(w) for w in drawn}) > 1
    stats = [r["participation"]["stats"] for r in cases]
    for rank, s in enumerate(stats):
        assert s["participated_syncs"] == sum(rank in w for w in drawn)
        assert s["contributed_wire_bytes"] == s["participated_syncs"] * s["wire_bytes_last_sync"]
        assert s["wire_bytes_sent"] == s["syncs"] * s["wire_bytes_last_sync"] > 0  # zeros still travel
        assert s["control_variate_wire_bytes"] > 0  # counted in wire_bytes_sent
    # a rank sitting out keeps its residual; a participant's changes (stochastic 4-bit)
    for rank, r in enumerate(cases):
        log = r["part_sto"]["log"]
        prev = torch.zeros_like(log[0]["residual"])
        for entry in log:
            assert torch.equal(entry["residual"], prev) == (rank not in entry["who"]), (rank, entry["step"])
            prev = entry["residual"]


def test_error_feedback_identity_on_control_variates(cases):
    """c (every rank's) + the mean control-variate residual == the mean of the c_i."""
    runs = [r["ef"] for r in cases]
    assert all(torch.equal(r["c"], runs[0]["c"]) for r in runs)
    mean_ci = sum(r["ci"] for r in runs).double() / len(runs)
    mean_res = sum(r["cv_residual"] for r in runs).double() / len(runs)
    torch.testing.assert_close(runs[0]["c"].double() + mean_res, mean_ci, rtol=1e-5, atol=1e-6)
    assert float(mean_res.abs().max()) > 1e-4  # 2-bit quantization did hold something back
    assert runs[0]["stats"]["control_variate_wire_bytes"] > 0


def test_overlap_with_zero_delay_is_the_synchronous_path_bitwise(cases):
    for r in cases:
        for key in ("final", "c", "ci", "residual", "cv_residual"):
            assert torch.equal(r["sync"][key], r["overlap0"][key]), key


def test_resume_with_an_exchange_in_flight_is_bitwise(cases):
    for r in cases:
        for key in ("final", "c", "ci", "residual", "cv_residual"):
            assert torch.equal(r["resume_plain"][key], r["resume"][key]), key
        assert r["resume"]["stats"]["syncs"] == r["resume_plain"]["stats"]["syncs"]


def _w_matrix(rank, world):
    """Every exchange x fragments {1, 2} x overlap {off, on}, SCAFFOLD (two exchanges per round),
    half of the configurations with half the ranks taking part."""
    out = {}
    for exchange in ("auto", "allgather", "alltoall", "hierarchical"):
        for fragments in (1, 2):
            for overlap in (False, True):
                kw = {"local_steps": 2, "codec": "stochastic", "bits": 4, "exchange": exchange,
                      "fragments": fragments, "overlap": overlap, "drift": "scaffold",
                      "participation": 0.5 if fragments == 2 else 1.0}
                if exchange == "hierarchical":
                    kw["ranks_per_node"] = 1
                r = _run(rank, world, 5, kw)
                out[(exchange, fragments, overlap)] = (r["final"], r["c"], r["stats"]["syncs"])
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_exchange_fragments_and_overlap_finishes(world):
    runs = _dist.results(_w_matrix, world, timeout_s=180)
    for cfg, (final, c, syncs) in runs[0].items():
        _, fragments, overlap = cfg
        due = LocalSGD(_model(), local_steps=2, codec="none", fragments=fragments).due
        assert syncs == sum(len(due(s)) for s in range(1, 6 - overlap)), cfg  # applied a step later with overlap
        assert bool(torch.isfinite(final).all()) and bool(c.abs().sum() > 0), cfg
        assert all(torch.equal(other[cfg][1], c) for other in runs[1:]), cfg  # c agrees everywhere


def _w_collective_meanwhile(rank, world):
    """Rank 1 issues its own collective on the default group before it launches the second round,
    rank 0 after: the two ranks' default-group queues disagree unless the round runs in a group of
    its own.  (The first round is left alone: its launch checks the configuration, a blocking
    collective, once.)"""
    import torch.distributed as dist
    model = _model()
    sync = LocalSGD(model, local_steps=2, codec="stochastic", bits=4, overlap=True)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = _batch(rank, 1)
    t = torch.ones(1) * (rank + 1)
    for step in range(1, 7):
        if step == 4 and rank == 1:
            dist.all_reduce(t)      # the training loop's own collective (a metric)
        (model(x) - y).square().mean().backward()
        opt.step()
        sync.step()                 # launches a round after steps 2, 4, 6
        if step == 4 and rank == 0:
            dist.all_reduce(t)
    return float(t), sync.stats()["syncs"]


def test_the_loop_s_own_collectives_do_not_queue_behind_a_round_in_flight():
    for total, syncs in _dist.results(_w_collective_meanwhile, 2, timeout_s=30):
        assert total == 3 and syncs == 2


def test_bad_options_name_the_valid_choices():
    model = _model()
    for kw, msg in (({"drift": "fedavg"}, r"drift must be one of \('none', 'scaffold', 'fedprox'\)"),
                    ({"scaffold_option": "III"}, r"scaffold_option must be one of \('I', 'II'\)"),
                    ({"mu": -1}, r"mu must be a number >= 0"),
                    ({"participation": 0}, r"participation must be a fraction in \(0, 1\]"),
                    ({"participation": 1.5}, r"participation must be a fraction"),
                    ({"overlap": "yes"}, "overlap must be True or False"),
                    ({"delay": 4}, r"delay must be an integer in 0\.\.3"),
                    ({"delay": -1}, r"delay must be an integer in 0\.\.3")):
        with pytest.raises(ValueError, match=msg):
            LocalSGD(model, local_steps=4, codec="none", **kw)
    sync = LocalSGD(model, local_steps=4, codec="none", drift="fedprox")
    with pytest.raises(RuntimeError, match=r"call sync.attach\(optimizer\)"):
        sync.step()
