"""ddp_qhooks.optim.OneBitAdam with the DDP hook: exact AdamW on the mean gradient during a
full-precision warm-up, AdamW on a mean within the warm-up codec's rounding of the exact one during a
compressed warm-up, the frozen-variance update on the averaged momentum afterwards (checked against
a reference written here), bitwise resume, the warm-up's bytes in stats(), and the misuse errors."""
import math

import _dist  # tests/conftest.py puts tests/ on sys.path
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_qhooks
from ddp_qhooks.optim import OneBitAdam

LR, BETAS, EPS, WD = 0.01, (0.9, 0.95), 1e-8, 0.1


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def _groups(model):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": WD}, {"params": rest, "weight_decay": 0.0}]


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 12, generator=g), torch.randn(8, 4, generator=g)


def _mean_grads(model, world, step):
    """The mean over the ranks' batches of the gradient, computed in this process alone."""
    grads = None
    for r in range(world):
        model.zero_grad()
        x, y = _batch(r, step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        g = [p.grad.detach().clone() for p in model.parameters()]
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
    return [g / world for g in grads]


def _train(rank, world, codec, warmup, steps, clip, bucket_mb=0.001, refresh=(), warmup_codec=None):
    model = _model()
    ddp = DDP(model, bucket_cap_mb=bucket_mb)  # several buckets, rebuilt after the first step
    state = ddp_qhooks.register(ddp, codec)
    opt = OneBitAdam(_groups(model), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, warmup_steps=warmup, hook=state,
                     variance_refresh=refresh, warmup_codec=warmup_codec)
    params, grads, nmse, warmup_plans = [], [], [], []
    for step in range(steps):
        x, y = _batch(rank, step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        params.append([p.detach().clone() for p in model.parameters()])
        nmse.append(state.stats()["nmse"])
        warmup_plans.append(len(state._full_plans))
    return {"params": params, "grads": grads, "stats": state.stats(), "nmse": nmse, "warmup_plans": warmup_plans,
            "numel": sum(p.numel() for p in model.parameters())}


def _w_warmup(rank, world):
    return _train(rank, world, "sign", warmup=100, steps=6, clip=0.5)


def _w_compressed_warmup(rank, world):
    return _train(rank, world, "sign", warmup=100, steps=4, clip=None, bucket_mb=25, warmup_codec="stochastic")


@pytest.mark.parametrize("world", [2, 3])
def test_compressed_warmup_is_adamw_on_a_mean_within_the_codec_s_rounding(world):
    """The default warm-up sends stochastic 2-bit payloads: each rank's gradient is off by less than
    one rounding interval, (max - min) / 3 of its block, so the mean is within that of the exact
    mean (two roundings at W=3, where the two-phase exchange re-encodes the mean); the optimizer is
    AdamW on what arrived; the bytes are the 2-bit payloads'."""
    res = _dist.results(_w_compressed_warmup, world)
    model = _model()
    ref_model = _model()
    ref = torch.optim.AdamW(_groups(ref_model), lr=LR, betas=BETAS, eps=EPS)
    roundings = 1 if world == 2 else 2
    off = []
    for step in range(4):
        per_rank = []
        for r in range(world):
            model.zero_grad()
            x, y = _batch(r, step)
            torch.nn.functional.mse_loss(model(x), y).backward()
            per_rank.append([p.grad.detach().clone() for p in model.parameters()])
        exact = [sum(gs) / world for gs in zip(*per_rank)]
        interval = [max(float(g.max() - g.min()) for g in gs) / 3 for gs in zip(*per_rank)]
        for a, b in zip(res[0]["grads"][step], res[-1]["grads"][step]):
            assert torch.equal(a, b)  # every rank holds the same mean
        for got, want, tol in zip(res[0]["grads"][step], exact, interval):
            assert float((got - want).abs().max()) <= roundings * tol * (1 + 1e-5) + 1e-7
            off.append(float((got - want).abs().max()))
        for p, g in zip(ref_model.parameters(), res[0]["grads"][step]):
            p.grad = g
        ref.step()
        for a, b in zip(res[0]["params"][step], ref_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        with torch.no_grad():  # the exact-gradient model follows the same parameters
            for p, q in zip(model.parameters(), ref_model.parameters()):
                p.copy_(q)
    assert max(off) > 0  # compressed, not the exact mean
    st = res[0]["stats"]
    assert st["compressed_warmup_steps"] == 4 and st["uncompressed_steps"] == 0 and st["steps"] == 4
    if world == 2:  # one bucket, all-gathered: one payload per step
        payload = ddp_qhooks.codecs.payload_nbytes("stochastic", [p.numel() for p in model.parameters()], bits=2)
        assert st["exchange_last_step"] == {"allgather": 1} and st["wire_bytes_sent"] == 4 * payload
    else:  # the hook's own choice at W=3 for this bucket
        assert st["exchange_last_step"] == {"alltoall": 1}


def test_warmup_is_adamw_on_the_mean_gradient_and_sends_fp32():
    res = _dist.results(_w_warmup, 2)
    ref_model = _model()
    ref = torch.optim.AdamW(_groups(ref_model), lr=LR, betas=BETAS, eps=EPS)
    for step in range(6):
        grads = _mean_grads(ref_model, 2, step)
        for p, g in zip(ref_model.parameters(), grads):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5)
        ref.step()
        for r in res:
            for a, b in zip(r["params"][step], ref_model.parameters()):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    st = res[0]["stats"]
    # a sign codec, yet every step went uncompressed: a ring all-reduce's bytes, 2(W-1)/W x 4 per value
    assert st["uncompressed_steps"] == 6 and st["steps"] == 6
    assert st["wire_bytes_sent"] == 6 * 4 * res[0]["numel"] and set(st["exchange_last_step"]) == {"allreduce"}


def _w_end_of_warmup(rank, world):
    return _train(rank, world, "sign", warmup=3, steps=5, clip=None, warmup_codec="stochastic")


def test_the_warmup_s_plans_go_when_it_ends_and_its_steps_report_no_error_figure():
    for r in _dist.results(_w_end_of_warmup, 2):
        assert r["warmup_plans"][:3] != [0, 0, 0] and r["warmup_plans"][3:] == [0, 0], r["warmup_plans"]
        # the warm-up's quantization error is not measured (no error feedback): NaN, not 0
        assert all(math.isnan(v) for v in r["nmse"][:3]) and all(0 < v < 1 for v in r["nmse"][3:]), r["nmse"]
        assert r["stats"]["compressed_warmup_steps"] == 3 and r["stats"]["steps"] == 5


def _w_none(rank, world):
    return _train(rank, world, "none", warmup=3, steps=10, clip=None, refresh=(6,))


def test_after_warmup_with_codec_none_is_frozen_variance_adam_on_the_momentum():
    res = _dist.results(_w_none, 2)
    model = _model()
    warm = torch.optim.AdamW(_groups(model), lr=LR, betas=BETAS, eps=EPS)
    b1, b2 = BETAS
    m = v = None
    k = 3  # the step count of the variance's last update: the warm-up's, then the refresh at step 6
    for step in range(10):
        grads = _mean_grads(model, 2, step)
        if step < 3:  # torch's AdamW is the reference of the warm-up
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            warm.step()
        else:
            if m is None:  # the variance freezes after 3 steps
                m = [warm.state[p]["exp_avg"].clone() for p in model.parameters()]
                v = [warm.state[p]["exp_avg_sq"].clone() for p in model.parameters()]
            t = step + 1
            with torch.no_grad():
                if step == 6:  # the variance last moved at step count 3, now it is 7: a gap of 4
                    k = 7
                for i, (p, g) in enumerate(zip(model.parameters(), grads)):
                    m[i] = b1 * m[i] + (1 - b1) * g
                    if step == 6:
                        v[i] = b2 ** 4 * v[i] + (1 - b2 ** 4) * g * g
                    wd = WD if p.dim() >= 2 else 0.0
                    p.mul_(1 - LR * wd)
                    p.sub_(LR / (1 - b1 ** t) * m[i] / ((v[i] / (1 - b2 ** k)).sqrt() + EPS))
        for r in res:
            for a, b in zip(r["params"][step], model.parameters()):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    st = res[0]["stats"]
    assert st["uncompressed_steps"] == 4 and st["steps"] == 10  # the warm-up and the refresh


def _w_resume(rank, world, tmp):
    def build():
        model = _model()
        ddp = DDP(model, bucket_cap_mb=0.001)
        state = ddp_qhooks.register(ddp, "sign")
        opt = OneBitAdam(_groups(model), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, warmup_steps=4, hook=state,
                         variance_refresh=(7,))  # the default warm-up: stochastic 2-bit
        return model, ddp, state, opt

    def run(model, ddp, opt, lo, hi):
        for step in range(lo, hi):
            x, y = _batch(rank, step)
            opt.zero_grad()
            torch.nn.functional.mse_loss(ddp(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()

    model, ddp, state, opt = build()
    run(model, ddp, opt, 0, 10)
    straight = [p.detach().clone() for p in model.parameters()]
    sent = state.stats()["wire_bytes_sent"]

    model, ddp, state, opt = build()
    run(model, ddp, opt, 0, 3)  # stopped inside the warm-up
    path = f"{tmp}/ckpt{rank}.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()}, path)
    del model, ddp, state, opt
    ck = torch.load(path, weights_only=True)
    model, ddp, state, opt = build()
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    state.load_state_dict(ck["hook"])
    run(model, ddp, opt, 3, 10)
    resumed = [p.detach().clone() for p in model.parameters()]
    return {"straight": straight, "resumed": resumed, "sent": sent, "resent": state.stats()["wire_bytes_sent"],
            "uncompressed": state.stats()["uncompressed_steps"], "warmup": state.stats()["compressed_warmup_steps"],
            "steps": ck["opt"]["onebit"]["steps"]}


def test_resume_is_bitwise(tmp_path):
    res = _dist.results(_w_resume, 2, str(tmp_path))
    for r in res:
        assert r["steps"] == 3 and r["warmup"] == 4 and r["uncompressed"] == 1  # the refresh at step 7
        assert all(torch.equal(a, b) for a, b in zip(r["straight"], r["resumed"]))
        assert r["sent"] == r["resent"]  # the byte counters travel with the hook state


def test_misuse_is_refused_with_one_clear_error():
    model = _model()
    state = ddp_qhooks.QuantizedHookState(codec="none", module=model)
    for bad in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match="warmup_steps must be an integer >= 1"):
            OneBitAdam(model.parameters(), warmup_steps=bad, hook=state)
    for bad in ((1,), [5, "7"], 7, (True,)):
        with pytest.raises(ValueError, match="variance_refresh must be a list of step numbers"):
            OneBitAdam(model.parameters(), warmup_steps=2, hook=state, variance_refresh=bad)
    with pytest.raises(TypeError, match="hook must be the ddp_qhooks.QuantizedHookState"):
        OneBitAdam(model.parameters(), warmup_steps=2, hook=None)
    with pytest.raises(ValueError, match="worker momentum"):
        OneBitAdam(model.parameters(), warmup_steps=2,
                   hook=ddp_qhooks.QuantizedHookState(codec="sign", worker_momentum=0.9, module=model))
    for bad, match in ((3, "warmup_codec must be a codec name"), ("nope", "valid codecs: "),
                       ("adaptive", "relies on error feedback"), ("uniform", "warmup_bits=9.*1..8"),
                       ("sign", "is biased"), ("ternary", "is biased"), ("topk", "is biased")):
        with pytest.raises(ValueError, match=match):
            OneBitAdam(model.parameters(), warmup_steps=2, hook=state, warmup_codec=bad,
                       warmup_bits={"uniform": 9, "sign": 1, "topk": 8}.get(bad, 2))
    assert state._optimizer is None  # a refused optimizer leaves the hook free
    for name, bits, options in (("sign", 1, {"mode": "stochastic"}), ("ternary", 2, {"rounding": "stochastic"}),
                                ("qsgd", 4, None), ("fp16", 16, None)):  # unbiased: accepted
        OneBitAdam(model.parameters(), warmup_steps=2, warmup_codec=name, warmup_bits=bits, warmup_options=options,
                   hook=ddp_qhooks.QuantizedHookState(codec="none", module=model))
    full = OneBitAdam(model.parameters(), warmup_steps=2, hook=ddp_qhooks.QuantizedHookState(codec="none", module=model),
                      warmup_codec=None).state_dict()
    opt = OneBitAdam(model.parameters(), warmup_steps=2, hook=state)
    with pytest.raises(ValueError, match="before the end of its warm-up.*warmup_codec=None"):
        opt.load_state_dict(full)  # a full-precision warm-up resumed with the compressed one
    state._optimizer = None
    opt = OneBitAdam(model.parameters(), warmup_steps=1, hook=state)
    with pytest.raises(ValueError, match="already drives another OneBitAdam"):
        OneBitAdam(model.parameters(), warmup_steps=1, hook=state)
    with pytest.raises(ValueError, match="not a OneBitAdam state_dict"):
        opt.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # the warm-up step: plain AdamW, no hook needed
    with pytest.raises(RuntimeError, match="did not pass through the hook"):
        opt.step()  # gradients set by hand after the warm-up: not the hook's momentum
    assert math.isfinite(float(next(model.parameters()).detach().sum()))


def _w_disagree(rank, world, what):
    model = _model()
    ddp = DDP(model)
    state = ddp_qhooks.register(ddp, "sign")
    opt = OneBitAdam(model.parameters(), warmup_steps=3 + rank if what == "warmup_steps" else 3, hook=state)
    if what == "steps" and rank == 1:  # a rank resumed from another checkpoint: another phase
        sd = opt.state_dict()
        sd["onebit"]["steps"] = 2
        opt.load_state_dict(sd)
    x, y = _batch(rank, 0)
    try:
        torch.nn.functional.mse_loss(ddp(x), y).backward()
    except Exception as e:  # noqa: BLE001 - the message is the result
        return str(e)
    opt.step()
    return "trained"


@pytest.mark.parametrize("what", ["warmup_steps", "steps"])
def test_ranks_with_different_warmups_or_phases_fail_with_a_clear_error_instead_of_hanging(what):
    res = _dist.results(_w_disagree, 2, what)
    for message in res:
        assert "optimizer" in message and f"'{what}'" in message, message
