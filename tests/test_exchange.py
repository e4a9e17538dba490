"""The two-phase (all-to-all + all-gather) exchange inside real multi-process DDP, W = 2, 3, 4.

The workers record, for every hook call, the bucket's input gradient, its parameters and the
output; the test process then replays the same steps with an independent implementation of the
two-phase arithmetic written from the description in hook.py:

    x_q = g_q + e_q                        worker residual e_q, per parameter
    shard s of x_q -> encode (key mix(k_q, 1, s)), e_q = x_q - deq
    owner s: m_s = mean_q deq(shard s of q) + f_s     server residual f_s
             encode m_s (key mix(k_s, 2)), f_s = m_s + ... - deq;   everyone decodes the W means

with k_q = splitmix64(seed, q, step), shards of sizes differing by at most one, and a shard's
blocks cut per parameter piece.  Only the codecs' encode/decode (tested on their own in
test_codecs*.py) are shared with the package.  Residual bookkeeping across bucket rebuilds is
replayed as documented: a server residual outside the own shard moves W-fold into the worker
residual.
"""
from __future__ import annotations

import _dist
import numpy as np
import pytest
import torch
import torch.nn as nn
from _reference import decode as ref_decode
from _reference import encode as ref_encode
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_qhooks
from ddp_qhooks.codecs import Layout, make_codec
from ddp_qhooks.codecs._random import splitmix64
from ddp_qhooks.codecs.wire import payload_nbytes

pytestmark = pytest.mark.slow
STEPS = 4


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 33), nn.Tanh(), nn.Linear(33, 7), nn.Tanh(), nn.Linear(7, 2))


def _data(rank, step):
    g = torch.Generator().manual_seed(7919 * rank + step)
    return torch.randn(8, 16, generator=g), torch.randn(8, 2, generator=g)


def _w_run(rank, world, codec, bits, options, exchange, bucket_cap_mb, nan_step=None, ranks_per_node=None):
    model = _model()
    ddp = DDP(model, bucket_cap_mb=bucket_cap_mb)
    state = ddp_qhooks.QuantizedHookState(None, codec=codec, bits=bits, module=model, seed=5, exchange=exchange,
                                          ranks_per_node=ranks_per_node, **options)
    calls = []

    def hook(st, bucket):
        params = bucket.parameters()
        rec = {"step": st.step, "index": bucket.index(), "keys": [st._key_of(p) for p in params],
               "numels": [p.numel() for p in params], "input": bucket.buffer().clone()}
        calls.append(rec)

        def keep(fut):
            rec["output"] = fut.value().clone()
            return fut.value()
        return ddp_qhooks.quantized_allgather_hook(st, bucket).then(keep)

    ddp.register_comm_hook(state, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for step in range(STEPS):
        x, y = _data(rank, step)
        loss = ((ddp(x) - y) ** 2).mean()
        if step == nan_step and rank == world - 1:
            loss = loss * float("nan")
        opt.zero_grad()
        loss.backward()
        if all(torch.isfinite(p.grad).all() for p in model.parameters()):
            opt.step()
    sd = state.state_dict()
    names = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    return {"calls": calls, "stats": state.stats(), "timeline": state.timeline(),
            "residuals": {names[n]: t for n, t in sd["residuals"].items()},
            "server": {names[n]: t for n, t in sd["server_residuals"].items()},
            "state_dict": sd}


def _bounds(n, w):
    base, extra = divmod(n, w)
    out, a = [], 0
    for s in range(w):
        out.append((a, a + base + (s < extra)))
        a = out[-1][1]
    return out


def _pieces(numels, keys, a, b):
    off, nums, ks = 0, [], []
    for n, k in zip(numels, keys):
        lo, hi = max(off, a), min(off + n, b)
        if hi > lo:
            nums.append(hi - lo)
            ks.append(k)
        off += n
    return Layout(nums, ks)


def _zero_residuals(runs, world):
    """Per rank, a zero residual for every parameter the recorded calls saw."""
    numel_of = {}
    for call in runs[0]["calls"]:
        numel_of.update(zip(call["keys"], call["numels"]))
    return [{k: torch.zeros(n) for k, n in numel_of.items()} for _ in range(world)]


def _calls_by_bucket(runs, world):
    """(step, [the W ranks' records of one bucket]) in step and bucket order."""
    by_step = {}
    for q in range(world):
        for call in runs[q]["calls"]:
            by_step.setdefault((call["step"], call["index"]), [None] * world)[q] = call
    return [(step, calls) for (step, _), calls in sorted(by_step.items())]


def _replay(runs, world, codec_name, bits, options):
    """Independent two-phase arithmetic over the recorded calls; returns per-rank outputs and the
    final worker / server residuals keyed by parameter."""
    options = dict(options)
    server_bits = options.pop("server_bits", None)
    codec = make_codec(codec_name, bits, **options)
    # documented rule: the mean is re-encoded with the same codec (server_bits=bits: also for sign),
    # except sign / ternary means by default: the deterministic uniform codec at 2 bits, same blocks
    mean_codec = codec if codec_name not in ("sign", "ternary") or server_bits == bits else \
        make_codec("uniform", 2, **{k: v for k, v in options.items() if k == "block_size"})
    worker, server = _zero_residuals(runs, world), _zero_residuals(runs, world)
    owner_layout = {}  # bucket keys -> bounds, to detect layout changes (like the package, on first sight)
    outputs = [[] for _ in range(world)]
    for step, calls in _calls_by_bucket(runs, world):
        keys, numels = calls[0]["keys"], calls[0]["numels"]
        n = sum(numels)
        flat = lambda store, q: torch.cat([store[q][k] for k in keys])  # noqa: E731
        # documented rule: two-phase unless the bucket has fewer values than ranks, or (W > 2) it would
        # send at least as many bytes as the all-gather
        twophase = n >= world
        if twophase and world > 2:
            pieces = [_pieces(numels, keys, a, b) for a, b in _bounds(n, world)]
            slot = max(payload_nbytes(codec.body_nbytes(p)) for p in pieces)
            mean_slot = max(payload_nbytes(mean_codec.body_nbytes(p)) for p in pieces)
            twophase = slot + mean_slot < payload_nbytes(codec.body_nbytes(Layout(numels, keys)))
        bounds = _bounds(n, world) if twophase else [(0, 0)] * world
        if tuple(keys) not in owner_layout:  # new bucket: server residual outside own shard -> worker
            owner_layout[tuple(keys)] = bounds
            for q in range(world):
                f, e = flat(server, q), flat(worker, q)
                a, b = bounds[q]
                e[:a] += world * f[:a]
                e[b:] += world * f[b:]
                f[:a] = 0
                f[b:] = 0
                _scatter(server, q, keys, numels, f)
                _scatter(worker, q, keys, numels, e)
        nonfinite = any(not bool(torch.isfinite(c["input"]).all()) for c in calls)
        if not twophase:  # all-gather of whole-bucket payloads
            layout = Layout(numels, keys)
            bodies, errs = [], []
            for q in range(world):
                x = calls[q]["input"] + flat(worker, q)
                err = torch.empty_like(x)
                body, _ = ref_encode(codec, x, layout, splitmix64(5, q, step), err)
                bodies.append(body)
                errs.append(err)
            out = ref_decode(codec, bodies, layout, divisor=world)
            for q in range(world):
                outputs[q].append(torch.full_like(out, float("nan")) if nonfinite else out)
                if not nonfinite:
                    _scatter(worker, q, keys, numels, errs[q])
            continue
        bodies = [[None] * world for _ in range(world)]  # [shard][rank]
        new_worker = []
        for q in range(world):
            x = calls[q]["input"] + flat(worker, q)
            err = torch.empty_like(x)
            kq = splitmix64(5, q, step)
            for s, (a, b) in enumerate(bounds):
                body, _ = ref_encode(codec, x[a:b].clone(), _pieces(numels, keys, a, b), splitmix64(kq, 1, s), err[a:b])
                bodies[s][q] = body
            new_worker.append(err)
        means, new_server = [], []
        for s, (a, b) in enumerate(bounds):
            layout = _pieces(numels, keys, a, b)
            m = ref_decode(codec, bodies[s], layout, divisor=world) + flat(server, s)[a:b]
            err = torch.empty_like(m)
            body, _ = ref_encode(mean_codec, m, layout, splitmix64(splitmix64(5, s, step), 2), err)
            means.append(ref_decode(mean_codec, [body], layout))
            new_server.append(err)
        out = torch.cat(means)
        for q in range(world):
            outputs[q].append(torch.full_like(out, float("nan")) if nonfinite else out)
            if not nonfinite:
                _scatter(worker, q, keys, numels, new_worker[q])
                f = flat(server, q)
                a, b = bounds[q]
                f[a:b] = new_server[q]
                _scatter(server, q, keys, numels, f)
    return outputs, worker, server


def _scatter(store, q, keys, numels, flat):
    off = 0
    for k, n in zip(keys, numels):
        store[q][k] = flat[off:off + n].clone()
        off += n


CASES = [  # world, codec, bits, options, bucket_cap_mb
    (3, "uniform", 4, {}, 25),
    (4, "uniform", 2, {"block_size": "layer"}, 25),
    (3, "stochastic", 4, {"block_size": 16}, 1e-5),  # one bucket per parameter, one too small to shard
    (4, "sign", 1, {"server_bits": 1}, 1e-5),
    (4, "ternary", 2, {"block_size": 64}, 25),  # the mean re-encoded by uniform at 2 bits
    (2, "stochastic", 8, {}, 25),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"W{c[0]}-{c[1]}{c[2]}-{c[3]}-cap{c[4]}")
def case_run(request):
    world, codec, bits, options, cap = request.param
    runs = _dist.results(_w_run, world, codec, bits, options, "alltoall", cap)
    return request.param, runs


def test_outputs_and_residuals_equal_independent_two_phase_replay(case_run):
    (world, codec, bits, options, cap), runs = case_run
    outputs, worker, server = _replay(runs, world, codec, bits, options)
    for q in range(world):
        got = [c["output"] for c in sorted(runs[q]["calls"], key=lambda c: (c["step"], c["index"]))]
        assert any(sum(c["numels"]) >= world for c in runs[q]["calls"]), "no bucket used the two-phase exchange"
        for g, c, ref in zip(got, sorted(runs[q]["calls"], key=lambda c: (c["step"], c["index"])), outputs[q]):
            assert torch.equal(g, ref), f"rank {q} step {c['step']} bucket {c['index']} ({sum(c['numels'])} values)"
        for k, ref in worker[q].items():
            assert torch.equal(runs[q]["residuals"][k], ref), f"worker residual of param {k} on rank {q}"
            assert torch.equal(runs[q]["server"].get(k, torch.zeros_like(ref)), server[q][k]), \
                f"server residual of param {k} on rank {q}"
    # every rank holds the same result
    for q in range(1, world):
        for a, b in zip(runs[0]["calls"], runs[q]["calls"]):
            assert torch.equal(a["output"], b["output"])


def test_bytes_and_choice_reported(case_run):
    (world, codec, bits, options, cap), runs = case_run
    st = runs[0]["stats"]
    assert st["exchange"] == "alltoall" and st["steps"] == STEPS
    assert st["exchange_last_step"].get("alltoall", 0) >= 1
    assert "alltoall: exchange='alltoall'" in st["exchange_reason"]
    if cap < 1 and world > 2:
        assert st["exchange_last_step"].get("allgather", 0) >= 1 and "two-phase would send more" in st["exchange_reason"]
    # server residuals are in the state_dict, keyed by parameter name, zero outside the own shards
    sd = runs[1]["state_dict"]
    assert sd["server_residuals"] and any(float(t.abs().sum()) > 0 for t in sd["server_residuals"].values())


def _check_timeline(run, modes):
    """The last step's per-bucket timings: one row per bucket of that step, in bucket order, each
    entered -> launched -> received -> done, and the time totals cover them."""
    tl, st = run["timeline"], run["stats"]
    last = [c for c in run["calls"] if c["step"] == STEPS - 1]
    assert [e["bucket"] for e in tl] == sorted(c["index"] for c in last)
    assert [e["numel"] for e in tl] == [sum(c["numels"]) for c in sorted(last, key=lambda c: c["index"])]
    assert {e["mode"] for e in tl} <= set(modes) and tl[0]["enter"] == 0.0
    for e in tl:
        assert 0.0 <= e["enter"] <= e["launched"] <= e["received"] <= e["done"], e
        assert 0.0 < e["callback_s"] <= e["done"] - e["launched"] + 1e-6
    assert st["hook_seconds"] >= sum(e["launched"] - e["enter"] for e in tl) > 0
    assert st["callback_seconds"] >= sum(e["callback_s"] for e in tl) - 1e-9


def test_timeline_and_time_totals(case_run):
    (world, codec, bits, options, cap), runs = case_run
    for run in runs:
        _check_timeline(run, ("alltoall", "allgather"))


def test_timeline_all_gather():
    for run in _dist.results(_w_run, 2, "uniform", 4, {}, "allgather", 1e-5):
        _check_timeline(run, ("allgather",))
        assert len(run["timeline"]) > 2


def _w_plain_vs_none(rank, world):
    out = {}
    for name in ("plain", "none"):
        model = _model()
        ddp = DDP(model)
        state = None
        if name == "none":
            state = ddp_qhooks.register(ddp, "none", exchange="alltoall")
        x, y = _data(rank, 0)
        ((ddp(x) - y) ** 2).mean().backward()
        out[name] = [p.grad.clone() for p in model.parameters()]
        if state is not None:
            out["stats"] = state.stats()
    return out


@pytest.mark.parametrize("world", [3, 4])
def test_codec_none_equals_plain_ddp(world):
    for r in _dist.results(_w_plain_vs_none, world):
        assert r["stats"]["exchange_last_step"] == {"alltoall": 1}
        for a, b in zip(r["plain"], r["none"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _w_bytes(rank, world):
    out = {}
    for exchange in ("allgather", "alltoall", "auto"):
        torch.manual_seed(0)
        model = nn.Linear(1000, 100)
        ddp = DDP(model)
        # one range per shard payload: the byte counts below are exact
        state = ddp_qhooks.register(ddp, "stochastic", bits=4, exchange=exchange, block_size=None)
        for step in range(2):
            ddp(torch.randn(4, 1000)).sum().backward()
        out[exchange] = state.stats()
    return out


def test_bytes_per_rank_flat_in_world_size_for_two_phase():
    """All-gather sends (W-1) payloads per rank; two-phase 2 (W-1)/W of one: flat in W."""
    numel = 1000 * 100 + 100
    per_step = {}
    for world in (2, 3, 4):
        for exchange, st in _dist.results(_w_bytes, world)[0].items():
            per_step[world, exchange] = st["wire_bytes_sent"] / st["steps"]
            if exchange == "auto":
                assert st["exchange_last_step"] == ({"allgather": 1} if world == 2 else {"alltoall": 1}), st
                assert ("all-gather" in st["exchange_reason"]) and ("two-phase sends" in st["exchange_reason"])
    for world in (2, 3, 4):
        headers = 2 * (world - 1) * 32  # two 16-byte headers + a range per shard payload, padded
        assert per_step[world, "allgather"] == pytest.approx((world - 1) * numel / 2, rel=0.001)
        assert per_step[world, "alltoall"] == pytest.approx(2 * (world - 1) / world * numel / 2, abs=headers)
    assert per_step[4, "alltoall"] / per_step[2, "alltoall"] < 1.51  # 2(W-1)/W: 1.0 -> 1.5
    assert per_step[4, "allgather"] / per_step[2, "allgather"] > 2.99  # (W-1): 1 -> 3


def test_nonfinite_step_is_nan_everywhere_and_keeps_residuals():
    world = 3
    runs = _dist.results(_w_run, world, "uniform", 4, {}, "alltoall", 25, 2)
    outputs, worker, server = _replay(runs, world, "uniform", 4, {})
    for q in range(world):
        calls = sorted(runs[q]["calls"], key=lambda c: (c["step"], c["index"]))
        for c, ref in zip(calls, outputs[q]):
            if c["step"] == 2:
                assert bool(torch.isnan(c["output"]).all())
            else:
                assert torch.equal(c["output"], ref)
        assert runs[q]["stats"]["nonfinite_steps"] == 1
        for k, ref in worker[q].items():
            assert torch.equal(runs[q]["residuals"][k], ref)
            assert bool(torch.isfinite(runs[q]["residuals"][k]).all())


def test_choice_rules():
    from ddp_qhooks.exchange import choose, shard_bounds

    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert [b - a for a, b in shard_bounds(7, 4)] == [2, 2, 2, 1]
    assert choose("auto", 2, 10**6, 500_000, 500_064)[0] == "allgather"
    assert choose("auto", 4, 10**6, 1_500_000, 750_000)[0] == "alltoall"
    assert choose("auto", 4, 10**6, 1_500_000, 750_000, bits=4)[0] == "alltoall"
    assert choose("auto", 4, 10**6, 1_500_000, 750_000, bits=1)[0] == "allgather"  # 1-bit: one quantization
    assert choose("alltoall", 4, 10**6, 1_500_000, 750_000, bits=1)[0] == "alltoall"  # asked for explicitly
    assert choose("alltoall", 2, 10**6, 500_000, 500_064)[0] == "alltoall"
    assert choose("alltoall", 4, 3, 100, 200) == ("allgather", "bucket of 3 values cannot be cut into 4 shards")
    assert choose("alltoall", 4, 40, 100, 200)[0] == "allgather"
    assert choose("auto", 8, 10**6, 1, 1, ranks_per_node=4)[0] == "hierarchical"
    assert choose("auto", 4, 10**6, 1, 2, ranks_per_node=4)[0] == "allgather"  # one node: nothing to save
    assert choose("auto", 4, 10**6, 2, 1, ranks_per_node=1)[0] == "alltoall"
    with pytest.raises(ValueError, match="'auto', 'allgather', 'alltoall', 'hierarchical'"):
        ddp_qhooks.QuantizedHookState(None, exchange="ring")
    with pytest.raises(ValueError, match="ranks_per_node"):
        ddp_qhooks.QuantizedHookState(None, exchange="hierarchical", ranks_per_node=0)
    np.testing.assert_equal(len(ddp_qhooks.EXCHANGES), 4)


# ------------------------------------------------------------------------------------------------
# hierarchical: full-precision node sums, quantized chunks between nodes, node all-gather
# ------------------------------------------------------------------------------------------------
def _replay_hierarchical(runs, world, lpn, codec_name, bits, options):
    """x_q = g_q + e_q; node sum S_n = sum over the node's ranks (exact in fp32 for 2 ranks);
    rank (n, l) encodes chunk l of S_n (key mix(k_q, 3)), e_q = that chunk's error (zero elsewhere);
    chunk l of the result = decode of the N nodes' chunk-l payloads / W."""
    codec = make_codec(codec_name, bits, **options)
    nodes = world // lpn
    worker = _zero_residuals(runs, world)
    outputs = [[] for _ in range(world)]
    for step, calls in _calls_by_bucket(runs, world):
        keys, numels = calls[0]["keys"], calls[0]["numels"]
        n = sum(numels)
        x = [calls[q]["input"] + torch.cat([worker[q][k] for k in keys]) for q in range(world)]
        sums = []
        for node in range(nodes):
            acc = x[node * lpn].clone()
            for q in range(node * lpn + 1, (node + 1) * lpn):
                acc += x[q]
            sums.append(acc)
        bounds = _bounds(n, lpn)
        out = torch.empty(n)
        new_res = []
        for q in range(world):
            new_res.append(torch.zeros(n))
        for l, (a, b) in enumerate(bounds):
            layout = _pieces(numels, keys, a, b)
            bodies = []
            for node in range(nodes):
                q = node * lpn + l
                err = torch.empty(b - a)
                body, _ = ref_encode(codec, sums[node][a:b].clone(), layout, splitmix64(splitmix64(5, q, step), 3), err)
                bodies.append(body)
                new_res[q][a:b] = err
            out[a:b] = ref_decode(codec, bodies, layout, divisor=world)
        for q in range(world):
            outputs[q].append(out)
            _scatter(worker, q, keys, numels, new_res[q])
    return outputs, worker


@pytest.mark.parametrize("world,lpn,codec,bits,options,cap", [
    (4, 2, "uniform", 4, {}, 25),
    (4, 2, "stochastic", 2, {"block_size": "layer"}, 1e-5),
    (2, 1, "sign", 1, {}, 25),
], ids=["2x2-uniform4", "2x2-stochastic2-layer-buckets", "2x1-sign"])
def test_hierarchical_equals_independent_replay(world, lpn, codec, bits, options, cap):
    runs = _dist.results(_w_run, world, codec, bits, options, "hierarchical", cap, None, lpn)
    outputs, worker = _replay_hierarchical(runs, world, lpn, codec, bits, options)
    for q in range(world):
        calls = sorted(runs[q]["calls"], key=lambda c: (c["step"], c["index"]))
        for c, ref in zip(calls, outputs[q]):
            assert torch.equal(c["output"], ref), f"rank {q} step {c['step']} bucket {c['index']}"
        for k, ref in worker[q].items():
            assert torch.equal(runs[q]["residuals"][k], ref), f"residual of param {k} on rank {q}"
        st = runs[q]["stats"]
        assert st["exchange_last_step"].get("hierarchical", 0) >= 1 and "node(s)" in st["exchange_reason"]
        _check_timeline(runs[q], ("hierarchical", "allgather"))


def _w_hier_plain(rank, world):
    out = {}
    for name in ("plain", "none"):
        model = _model()
        ddp = DDP(model)
        if name == "none":
            ddp_qhooks.register(ddp, "none", exchange="hierarchical", ranks_per_node=2)
        x, y = _data(rank, 0)
        ((ddp(x) - y) ** 2).mean().backward()
        out[name] = [p.grad.clone() for p in model.parameters()]
    return out


def test_hierarchical_none_equals_plain_ddp_and_misconfiguration_is_clear():
    for r in _dist.results(_w_hier_plain, 4):
        for a, b in zip(r["plain"], r["none"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    res = _dist.run(_w_run, 3, "uniform", 4, {}, "hierarchical", 25, None, 2)
    assert all(not r["ok"] and "ranks_per_node=2 does not divide the world size 3" in r["error"] for r in res)


def test_state_dict_round_trip_keeps_server_residuals(case_run):
    """Load a rank's saved state into a fresh state (a restart) and save it again: worker and
    server residuals come back unchanged, by parameter name."""
    (world, codec, bits, options, cap), runs = case_run
    saved = runs[world - 1]["state_dict"]
    fresh = ddp_qhooks.QuantizedHookState(None, codec=codec, bits=bits, module=_model(), seed=5, exchange="alltoall",
                                          **options)
    fresh.load_state_dict(saved)
    again = fresh.state_dict()
    assert again["step"] == STEPS and again["exchange"] == "alltoall"
    for key in ("residuals", "server_residuals"):
        assert saved[key].keys() == again[key].keys() and saved[key]
        for name, t in saved[key].items():
            assert torch.equal(again[key][name], t), (key, name)


def _w_subgroup(rank, world):
    import torch.distributed as dist
    sub, _ = dist.new_subgroups_by_enumeration([[0, 1], [2, 3]])
    model = _model()
    ddp = DDP(model, process_group=sub)
    state = ddp_qhooks.register(ddp, "uniform", bits=4)  # auto
    x, y = _data(rank, 0)
    ((ddp(x) - y) ** 2).mean().backward()
    refused = None
    try:
        ddp_qhooks.register(DDP(_model(), process_group=sub), "uniform", bits=4, exchange="alltoall")
    except ValueError as exc:
        refused = str(exc)
    ddp2 = DDP(_model(), process_group=sub)
    ddp_qhooks.register(ddp2, "uniform", bits=4, exchange="alltoall")
    try:
        ((ddp2(x) - y) ** 2).mean().backward()
    except Exception as exc:  # noqa: BLE001
        refused = str(exc)
    return state.stats(), refused


def test_subgroup_uses_allgather_and_refuses_the_others_clearly():
    for stats, refused in _dist.results(_w_subgroup, 4):
        assert stats["exchange_last_step"] == {"allgather": 1} and "subgroup" in stats["exchange_reason"]
        assert refused and "needs the default process group" in refused
