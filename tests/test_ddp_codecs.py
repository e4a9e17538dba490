"""Every codec of the family through the real hook: 2-rank Gloo DDP.

Per codec configuration one spawned run records, for 5 steps, each rank's true local gradient, the
averaged gradient DDP applied, the residuals, and the gathered payloads of the (single) bucket.
Checks, in the pytest process:

* all ranks hold identical grads, equal to the mean over ranks of each payload decoded by the
  codec's *independent* numpy reference decoder (``ref_decode`` of its test spec,
  tests/codec_specs/<codec>.py, mostly ``ref_decode_<codec>`` in its test module);
* the error-feedback identity per rank and step: decoded own payload == g + e_prev - e_new;
* a NaN in one rank's gradient (step 3) makes the averaged bucket non-finite on every rank and
  leaves every residual as it was; step 4 is finite again.
"""
from __future__ import annotations

import _dist
import numpy as np
import pytest
import torch
from codec_specs import spec
from test_ddp import (
    _assert_same_on_all_ranks,
    _batch,
    _flat,
    _grads,
    _guard,
    _loss,
    _mlp,
    _ok,
    _register,
)
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_qhooks
from ddp_qhooks.codecs import CODECS

pytestmark = pytest.mark.slow

# (codec, bits, options): every registered codec, the configurations of its test spec's ddp_examples
# (default: the codec's examples), more than one variant where the codec has them
CONFIGS = [cfg for name in CODECS for cfg in spec(name).ddp_configs(name)]
STEPS, POISON = 5, 3


def _cfg_id(c):
    return f"{c[0]}-{c[1]}-" + "-".join(f"{k}={v}" for k, v in sorted(c[2].items()))


def _one(rank, config):
    codec, bits, opts = config
    model = _mlp(7, hidden=40)
    ref = _mlp(7, hidden=40)
    names = [n for n, _ in model.named_parameters()]
    ddp = DDP(model, bucket_cap_mb=64)  # one bucket
    # codecs whose error can exceed the value refuse error feedback (it would diverge): run them without
    ef = not getattr(ddp_qhooks.codecs.make_codec(codec, bits=bits, **opts), "error_feedback_diverges", False)
    state = _register(ddp, codec, bits=bits, error_feedback=ef, **opts)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    poison = {"on": False}

    def hook(g):
        if poison["on"] and rank == 1:
            g = g.clone()
            g.view(-1)[3] = float("nan")
        return g

    model[2].weight.register_hook(hook)
    rec = []
    for step in range(STEPS):
        poison["on"] = step == POISON
        x, y = _batch(rank, step, salt=21)
        ref.load_state_dict(model.state_dict())
        ref.zero_grad(set_to_none=True)
        _loss(ref(x), y).backward()
        before = state.state_dict()["residuals"]
        opt.zero_grad(set_to_none=True)
        _loss(ddp(x), y).backward()
        after = state.state_dict()["residuals"]
        (plan,) = state._plans.values()  # one bucket, one chunk, all-gather
        signature = next(iter(state._plans))
        (buffers,) = plan.buffers
        rec.append({"local": _grads(ref), "avg": _grads(model),
                    "before": [before.get(n) for n in names], "after": [after.get(n) for n in names],
                    "gathered": buffers.gathered.clone(), "signature": list(signature),
                    "bucket_numels": list(plan.layout.param_numels), "body_nbytes": buffers.body})
        if step != POISON:  # like GradScaler: skip the update of a non-finite step
            opt.step()
    return {"steps": rec, "numels": [p.numel() for p in model.parameters()], "config": state.codec.config(),
            "stats": state.stats(), "error_feedback": ef}


def _w_codecs(rank, world):
    return {c[0] + repr(sorted(c[2].items())) + str(c[1]): _guard(_one, rank, c) for c in CONFIGS}


@pytest.fixture(scope="module")
def runs():
    return _dist.results(_w_codecs, 2, timeout_s=300)


def _reference_decoder(codec: str):
    """The codec's independent numpy decoder, from its test spec (tests/codec_specs/<codec>.py)."""
    decoder = spec(codec).ref_decode
    assert decoder is not None, f"codec {codec!r}: no ref_decode in its test spec"
    return decoder


def _decoded_payloads(step_rec, config, world):
    """Per rank: the reference decode of its payload, in model parameter order."""
    rows = step_rec["gathered"].view(world, -1).numpy()
    body = slice(16, 16 + step_rec["body_nbytes"])
    opts = {k: v for k, v in config.items() if k != "codec"}
    decoder = _reference_decoder(config["codec"])
    order = step_rec["signature"]
    out = []
    for r in range(world):
        flat = decoder(rows[r, body].copy(), step_rec["bucket_numels"], **opts)
        parts, a = {}, 0
        for key, n in zip(order, step_rec["bucket_numels"]):
            parts[key] = flat[a:a + n]
            a += n
        out.append(np.concatenate([parts[k] for k in sorted(parts)]))
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=[_cfg_id(c) for c in CONFIGS])
def test_codec_through_the_hook(runs, config):
    key = config[0] + repr(sorted(config[2].items())) + str(config[1])
    per_rank = [_ok(r[key]) for r in runs]
    world = len(per_rank)
    numels = per_rank[0]["numels"]
    cfg = per_rank[0]["config"]
    prev = [np.zeros(sum(numels)) for _ in range(world)]
    for step in range(STEPS):
        recs = [pr["steps"][step] for pr in per_rank]
        avgs = [rc["avg"] for rc in recs]
        _assert_same_on_all_ranks(avgs, f"step {step}")
        avg = _flat(avgs[0], numels)
        if step == POISON:
            assert not np.isfinite(avg).all(), "a NaN on one rank must make the averaged bucket non-finite"
            for pr in per_rank:  # no residual changes in a dropped step
                for b, a in zip(pr["steps"][step]["before"], pr["steps"][step]["after"]):
                    assert (a is None and b is None) or torch.equal(b, a)
            continue
        deq = _decoded_payloads(recs[0], cfg, world)
        g = [_flat(rc["local"], numels) for rc in recs]
        e = [_flat(rc["after"], numels) for rc in recs]
        scale = max(np.abs(v).max() for v in g + prev + deq) + 1e-30
        # identical grads on all ranks == mean of the independently decoded payloads
        np.testing.assert_allclose(avg, sum(deq) / world, rtol=0, atol=2e-6 * scale, err_msg=f"step {step}")
        if not per_rank[0]["error_feedback"]:
            for r in range(world):  # no error feedback: what rank r sent is its own gradient, quantized
                assert np.abs(e[r]).max() == 0
            prev = e
            continue
        for r in range(world):  # error feedback: what rank r sent == g + e_prev - e_new
            np.testing.assert_allclose(deq[r], g[r] + prev[r] - e[r], rtol=0, atol=4e-6 * scale,
                                       err_msg=f"rank {r} step {step}")
            assert np.isfinite(e[r]).all()
        prev = e
    assert all(pr["stats"]["steps"] == STEPS and pr["stats"]["nonfinite_steps"] == 1 for pr in per_rank)


def test_register_refuses_unsafe_error_feedback_settings():
    from ddp_qhooks import QuantizedHookState
    with pytest.raises(ValueError, match="error_feedback=False"):
        QuantizedHookState(codec="sign", mode="stochastic")  # residuals would grow without bound
    QuantizedHookState(codec="sign", mode="stochastic", error_feedback=False)
    with pytest.raises(ValueError, match="error_feedback=False"):
        QuantizedHookState(codec="stochastic", bits=1)   # 2 levels: errors up to 2x the block max
    with pytest.raises(ValueError, match="error_feedback=False"):
        QuantizedHookState(codec="qsgd", bits=4, block_size=512)  # Lemma 3.1's w = 3.2 >= 1
    QuantizedHookState(codec="qsgd", bits=4, block_size=16)      # w = 0.33
    with pytest.raises(ValueError, match="error_feedback=True"):
        QuantizedHookState(codec="adaptive", bits=4, error_feedback=False)  # clipped values would be lost
