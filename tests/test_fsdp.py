"""ddp_qhooks.fsdp inside real multi-process FSDP2 (``fully_shard``, Gloo on CPU, 2-4 ranks).

One spawned run per world size; the workers record every sub-check separately (``_guard``) and
the tests read them, so one failing sub-check fails only its tests.

References: FSDP's own reduce-scatter (a second, identically initialised model without the custom
comm) for the exact ``none`` codec, and its accumulated gradients (true means) for the
error-feedback identity.  The model has nested FSDP modules, dim-0 sizes not divisible by 2, 3 or
4 (uneven shards, empty shards at W=3/4), a frozen parameter and a parameter unused on odd steps.
"""
from __future__ import annotations

import io
import traceback

import _dist  # tests/conftest.py puts tests/ and the repository root on sys.path
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import ddp_qhooks

pytestmark = pytest.mark.slow

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # pragma: no cover
    pytest.skip("torch without FSDP2", allow_module_level=True)


# ================================================================================================
# helpers used in the workers
# ================================================================================================

_POISON: dict = {}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(5, 7)
        self.block = nn.Sequential(nn.Linear(7, 9), nn.ReLU(), nn.Linear(9, 3))
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(3, 2)
        self.aux = nn.Linear(3, 2)   # used on even steps only

    def forward(self, x, use_aux=True):
        e = self.emb(x)
        if _POISON.get("on") and e.requires_grad:  # one inf in emb's gradient (row 0) only
            e.register_hook(lambda g: g.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("inf"))))
        h = torch.tanh(self.frozen(self.block(torch.relu(e))))
        y = self.head(h)
        return y + self.aux(h) if use_aux else y


# the mesh and group of the world size under test (one 4-process run tests W = 2, 3, 4 on the
# first W ranks: spawning costs more than the checks on a loaded 2-core machine)
_CTX: dict = {}


def _build(seed=0):
    torch.manual_seed(seed)
    m = Net()
    fully_shard(m.block[0], mesh=_CTX["mesh"])
    fully_shard(m.block, mesh=_CTX["mesh"])
    fully_shard(m, mesh=_CTX["mesh"])
    return m


def _fsdp_modules(m):
    from torch.distributed.fsdp import FSDPModule
    return [mod for mod in m.modules() if isinstance(mod, FSDPModule)]


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 + 17 * step + rank)
    return torch.randn(6, 5, generator=g) * (1 + rank)


def _backward(m, x, step):
    m(x, use_aux=step % 2 == 0).pow(2).sum().backward()


def _local(p):
    return p.grad.to_local() if p.grad is not None else None


def _maxdiff(a, b):
    return float((a - b).abs().amax()) if a.numel() else 0.0


def _guard(out, name, fn):
    try:
        out[name] = {"ok": True, "value": fn()}
    except BaseException as exc:
        out[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()}


def _exact(rank, world):
    """codec none == FSDP's reduce-scatter (AVG), and with set_force_sum_reduction_for_comms (SUM)
    and set_gradient_divide_factor (PREMUL_SUM, which Gloo itself cannot do)."""
    res = {}
    for mode in ("avg", "sum", "divide"):
        A, B = _build(), _build()
        if mode == "sum":
            for mod in _fsdp_modules(A) + _fsdp_modules(B):
                mod.set_force_sum_reduction_for_comms(True)
        if mode == "divide":
            for mod in _fsdp_modules(B):
                mod.set_gradient_divide_factor(2.5)
        st = ddp_qhooks.fsdp.register(B, "none")
        worst, scale, bitwise = 0.0, 0.0, True
        for step in range(2):
            x = _batch(rank, step)
            for m in (A, B):
                m.zero_grad(set_to_none=True)
                _backward(m, x, step)
            for pa, pb in zip(A.parameters(), B.parameters()):
                ga, gb = _local(pa), _local(pb)
                assert (ga is None) == (gb is None)
                if ga is None:
                    continue
                if mode == "divide":
                    ga = ga * world / 2.5
                worst = max(worst, _maxdiff(ga, gb))
                scale = max(scale, float(ga.abs().amax()) if ga.numel() else 0.0)
                bitwise = bitwise and torch.equal(ga, gb)
        s = st.stats()
        res[mode] = {"worst": worst, "scale": scale, "bitwise": bitwise, "calls": s["calls"], "steps": s["steps"],
                     "modules": s["modules"], "nmse": s["nmse"], "fallback": s["module_level_residuals"]}
    return res


def _accumulate(rank, world):
    """set_requires_gradient_sync(False) on the first micro-batch: FSDP reduces the accumulated
    unsharded gradients on the second; codec none still equals FSDP's own."""
    A, B = _build(), _build()
    st = ddp_qhooks.fsdp.register(B, "none")
    worst = 0.0
    for m in (A, B):
        for micro in range(2):
            m.set_requires_gradient_sync(micro == 1)
            _backward(m, _batch(rank, micro), 0)
    for pa, pb in zip(A.parameters(), B.parameters()):
        if pa.grad is not None:
            worst = max(worst, _maxdiff(_local(pa), _local(pb)))
    return {"worst": worst, "calls": st.stats()["calls"], "steps": st.step,
            "fallback": st.stats()["module_level_residuals"]}


def _identity(rank, world, codec="stochastic", bits=4, residual_dtype=None, steps=4, **kw):
    """Gradients accumulate without zero_grad: B's grads = sum of applied means, A's = sum of true
    means; the pending mean residual closes the gap, per parameter."""
    A, B = _build(), _build()
    st = ddp_qhooks.fsdp.register(B, codec, bits, residual_dtype=residual_dtype, **kw)
    for step in range(steps):
        x = _batch(rank, step)
        for m in (A, B):
            _backward(m, x, step)
    sd = st.state_dict()
    out = {"names": sorted(sd["residuals"]), "per_param": {}, "stats": st.stats(), "nbytes": st.residual_nbytes()}
    for (name, pa), (_, pb) in zip(A.named_parameters(), B.named_parameters()):
        if pa.grad is None:
            out["per_param"][name] = None
            continue
        true, applied = pa.grad.full_tensor().reshape(-1), pb.grad.full_tensor().reshape(-1)
        mean_res = sd["residuals"][name].clone()
        dist.all_reduce(mean_res, group=_CTX["group"])
        mean_res /= world
        out["per_param"][name] = {"gap": _maxdiff(applied + mean_res, true), "scale": float(true.abs().amax()),
                                  "quant_err": _maxdiff(applied, true)}
    return out


def _w_all(rank, world_size):
    from torch.distributed.device_mesh import DeviceMesh
    out, groups = {}, {}
    for world in (2, 3, 4):
        group = groups[world] = dist.new_group(list(range(world)))  # every rank enters new_group
        if rank < world:
            _CTX.update(group=group, mesh=DeviceMesh.from_group(group, "cpu"))
            out[world] = _w_many(rank, world, world == 2)
        dist.barrier()
    _guard(out[4], "hierarchical", lambda: _hierarchical(rank))
    _guard(out[4], "redistribute", lambda: _redistribute(rank, groups))
    return out


def _redistribute(rank, groups):
    """Residuals saved by 2 ranks, loaded (the list of both) by 4: every rank holds their mean."""
    import warnings
    from torch.distributed.device_mesh import DeviceMesh
    sd = None
    if rank < 2:
        _CTX.update(group=groups[2], mesh=DeviceMesh.from_group(groups[2], "cpu"))
        B = _build()
        st = ddp_qhooks.fsdp.register(B, "stochastic", 4)
        for step in range(2):
            _backward(B, _batch(rank, step), step)
        sd = st.state_dict()
    everyone = [None] * 4
    dist.all_gather_object(everyone, sd)
    saved = [d for d in everyone if d is not None]
    _CTX.update(group=groups[4], mesh=DeviceMesh.from_group(groups[4], "cpu"))
    C = _build()
    sc = ddp_qhooks.fsdp.register(C, "stochastic", 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sc.load_state_dict(saved)
    got = sc.state_dict()["residuals"]
    worst = max(_maxdiff(got[k], (saved[0]["residuals"][k] + saved[1]["residuals"][k]) / 2) for k in got)
    nonzero = max(float(v.abs().amax()) for v in got.values())
    _backward(C, _batch(rank, 5), 1)  # the loaded residuals are usable at W=4 (re-padded per row)
    return {"worst": worst, "nonzero": nonzero, "warned": any("REDISTRIBUTED" in str(w.message) for w in caught),
            "names": sorted(got) == sorted(saved[0]["residuals"]), "step": sc.step}


def _hierarchical(rank):
    """2 nodes x 2 ranks: FSDP inside the node, the engine's exchange between nodes; codec none
    equals FSDP over all 4 ranks (full gradients compared), 4-bit sends ~1/8 between nodes."""
    from torch.distributed.device_mesh import DeviceMesh
    mesh2 = ddp_qhooks.fsdp.node_mesh(2)
    out = {}
    for codec, bits in (("none", 8), ("stochastic", 4)):
        _CTX.update(group=dist.group.WORLD, mesh=DeviceMesh.from_group(dist.group.WORLD, "cpu"))
        A = _build()
        _CTX.update(mesh=mesh2["local"])
        B = _build()
        # one range per shard: on these tiny shards per-block scales would dominate the byte count
        st = ddp_qhooks.fsdp.register_between_nodes(B, mesh2, codec,
                                                    **({"bits": bits, "block_size": None} if codec != "none" else {}))
        worst, scale = 0.0, 0.0
        for step in range(2):
            x = _batch(rank, step)
            for m in (A, B):
                m.zero_grad(set_to_none=True)
                _backward(m, x, step)
            for pa, pb in zip(A.parameters(), B.parameters()):
                if pa.grad is None:
                    assert pb.grad is None
                    continue
                ga, gb = pa.grad.full_tensor(), pb.grad.full_tensor()
                worst, scale = max(worst, _maxdiff(ga, gb)), max(scale, float(ga.abs().amax()))
        s = st.stats()
        out[codec] = {"worst": worst, "scale": scale, "wire": s["wire_bytes_sent"], "fp32": s["fp32_bytes"],
                      "steps": s["steps"]}
    out["names"] = _hierarchical_names(B, st, mesh2)
    B.zero_grad(set_to_none=True)
    _POISON["on"] = rank == 3  # lands in local rank 0's shard of node 1 only
    try:
        _backward(B, _batch(rank, 3), 0)
    finally:
        _POISON["on"] = False
    root = [p for n, p in B.named_parameters() if not n.startswith("block") and p.grad is not None]
    out["nan_everywhere"] = all(bool(torch.isnan(_local(p)).all()) for p in root if _local(p).numel())
    out["block_finite"] = all(bool(torch.isfinite(_local(p)).all()) for n, p in B.named_parameters()
                              if n.startswith("block"))
    return out


def _hierarchical_names(model, state, mesh2):
    """Residual names of the hierarchical mode: parameter names (a step without the aux branch's
    gradient made its module's flat slot), loaded back by name into a fresh model's state, and
    from the ``param<i>`` keys of before (slots in the order a backward pass reaches them)."""
    import warnings
    saved = state.state_dict()["residuals"]
    fresh = lambda: ddp_qhooks.fsdp.register_between_nodes(_build(), mesh2, "stochastic", bits=4,  # noqa: E731
                                                           block_size=None)
    by_name = fresh()
    by_name.load_state_dict(state.state_dict())
    loaded = by_name.state_dict()["residuals"]
    backward_order = [n for mod in reversed(_fsdp_modules(model))
                      for n, p in model.named_parameters() if p.requires_grad and _owner(model, n) is mod]
    legacy_sd = state.state_dict()
    legacy_sd["residuals"] = {f"param{i}": saved[n] for i, n in enumerate(backward_order)}
    flat = [n for n in saved if "[flat " in n]
    legacy_sd["residuals"].update({f"param{len(backward_order) + i}": saved[n] for i, n in enumerate(flat)})
    legacy = fresh()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        legacy.load_state_dict(legacy_sd)
    from_legacy = legacy.state_dict()["residuals"]
    return {"saved": sorted(saved), "params": sorted(n for n, p in model.named_parameters() if p.requires_grad),
            "by_name_equal": sorted(loaded) == sorted(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved),
            "legacy_equal": sorted(from_legacy) == sorted(backward_order)
            and all(torch.equal(from_legacy[k], saved[k]) for k in backward_order),
            "legacy_warned": sorted(("left out" in str(w.message), "sizes checked" in str(w.message))
                                    for w in caught if "keyed param<i>" in str(w.message))}


def _owner(model, name):
    """The innermost FSDP module holding parameter ``name``."""
    owner = model
    parts = name.split(".")[:-1]
    mod = model
    for part in parts:
        mod = getattr(mod, part)
        if mod in _fsdp_modules(model):
            owner = mod
    return owner


def _pipelined(rank, world):
    """FSDP's parameter all-gather cut into pieces (chunk_size at its minimum, so that a 700 x 700
    layer takes 2-4 pieces per rank, uneven at W=3) against FSDP's own all-gather: the same
    forward outputs and parameters bitwise over training steps; the collectives themselves against
    all_gather_single / all_to_all_single for odd sizes; the quantized reduce-scatter with its
    payloads in pieces gives the gradients it gives in one all-to-all, bitwise."""
    from ddp_qhooks.engine.chunks import chunk_bounds
    from ddp_qhooks.exchange import collectives
    from ddp_qhooks.integrations.fsdp.all_gather import PipelinedAllGather

    def build():
        torch.manual_seed(3)
        m = nn.Sequential(nn.Linear(700, 700), nn.Tanh(), nn.Linear(700, 3))
        fully_shard(m[0], mesh=_CTX["mesh"])
        fully_shard(m, mesh=_CTX["mesh"])
        return m

    registered = build()
    st = ddp_qhooks.fsdp.register(registered, "none", chunk_size=1 << 16)
    off = ddp_qhooks.fsdp.register(build(), "none", chunk_size=None)
    installed = [type(mod._get_fsdp_state()._fsdp_param_groups[0]._all_gather_comm).__name__
                 for mod in _fsdp_modules(registered)]
    # FSDP's own reduce-scatter in both (the "none" codec sums in another order at W > 2)
    A, B = build(), build()
    for mod in _fsdp_modules(B):
        mod.set_custom_all_gather(PipelinedAllGather(1 << 16))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (A, B)]
    same = True
    for step in range(3):
        g = torch.Generator().manual_seed(50 + 7 * step + rank)
        x = torch.randn(4, 700, generator=g)
        ys = []
        for m, opt in zip((A, B), opts):
            opt.zero_grad()
            y = m(x)
            y.pow(2).sum().backward()
            opt.step()
            ys.append(y.detach())
        same = same and torch.equal(ys[0], ys[1])
    same = same and all(torch.equal(pa.to_local(), pb.to_local()) for pa, pb in zip(A.parameters(), B.parameters()))
    group = _CTX["group"]
    direct = True
    for n, dtype in ((200_003, torch.float32), (70_001, torch.uint8)):
        gen = torch.Generator().manual_seed(rank)
        inp = (torch.randn(n, generator=gen) * 50).to(dtype)
        ref = torch.empty(world * n, dtype=dtype)
        dist.all_gather_into_tensor(ref, inp, group=group)
        got = torch.full((world * n,), 7, dtype=dtype)
        works = collectives.allgather_pieces(inp, got, group, chunk_bounds(n, 1 << 16))
        PipelinedAllGather(1 << 16)(got, inp, group)
        direct = direct and len(works) == -(-n // (1 << 16)) and torch.equal(ref, got)
    for slot in (200_003, 1000):  # bytes per destination: several pieces, and one
        gen = torch.Generator().manual_seed(rank)
        send = torch.randint(0, 256, (world * slot,), dtype=torch.uint8, generator=gen)
        ref = torch.empty_like(send)
        dist.all_to_all_single(ref, send, group=group)
        got = torch.zeros_like(send)
        started = collectives.alltoall_pieces(send, got, group, chunk_bounds(slot, 1 << 16))
        for work, finish in started:
            work.wait()
            finish()
        direct = direct and len(started) == -(-slot // (1 << 16)) and torch.equal(ref, got)
    # the quantized reduce-scatter with its payloads cut into pieces: the same gradients bitwise
    grads = []
    for chunk_size in (1 << 16, None):
        m = build()
        ddp_qhooks.fsdp.register(m, "stochastic", bits=4, chunk_size=chunk_size)
        for step in range(2):
            m.zero_grad()
            m(torch.randn(4, 700, generator=torch.Generator().manual_seed(9 + step + rank))).pow(2).sum().backward()
        grads.append([p.grad.to_local().clone() for p in m.parameters()])
    quantized_same = all(torch.equal(a, b) for a, b in zip(*grads))
    return {"same": same, "direct": direct, "quantized_same": quantized_same, "installed": installed,
            "count": st.stats()["pipelined_all_gathers"], "count_off": off.stats()["pipelined_all_gathers"]}


def _w_many(rank, world, full):
    out = {}
    _guard(out, "exact", lambda: _exact(rank, world))
    _guard(out, "pipelined", lambda: _pipelined(rank, world))
    _guard(out, "identity", lambda: _identity(rank, world))
    if world == 4:  # a model without fully_shard: the check runs on the default group, every rank
        _guard(out, "not_fsdp", lambda: _misconfig(rank, world, {}, plain=True))
    if full:
        _guard(out, "identity_bf16", lambda: _identity(rank, world, residual_dtype="bf16"))
        _guard(out, "identity_int8", lambda: _identity(rank, world, residual_dtype="int8"))
        _guard(out, "state_dict", lambda: _state_dict(rank, world))
        _guard(out, "nonfinite", lambda: _nonfinite(rank, world))
        _guard(out, "accumulate", lambda: _accumulate(rank, world))
        _guard(out, "identity_unstaged", lambda: _identity(rank, world, stage_residuals=False))
        _guard(out, "nonfinite_unstaged", lambda: _nonfinite(rank, world, stage_residuals=False))
        _guard(out, "mismatch", lambda: _misconfig(rank, world, {"bits": 4 if rank == 1 else 8}))
        _guard(out, "invalid", lambda: _misconfig(rank, world, {"codec": "nope" if rank == 1 else "stochastic"}))
        _guard(out, "train", lambda: _train(rank, world))
    return out


def _state_dict(rank, world):
    B, C = _build(), _build()
    sb = ddp_qhooks.fsdp.register(B, "stochastic", 4, seed=3)
    for step in range(2):
        _backward(B, _batch(rank, step), step)
    buf = io.BytesIO()
    torch.save(sb.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    sc = ddp_qhooks.fsdp.register(C, "stochastic", 4, seed=0)
    sc.load_state_dict(loaded)
    same_before = all(torch.equal(loaded["residuals"][k], v) for k, v in sc.state_dict()["residuals"].items())
    for m in (B, C):
        m.zero_grad(set_to_none=True)
        _backward(m, _batch(rank, 2), 2)
    grads_equal = all(torch.equal(_local(pb), _local(pc)) for pb, pc in zip(B.parameters(), C.parameters())
                      if pb.grad is not None)
    res_equal = all(torch.equal(v, sc.state_dict()["residuals"][k]) for k, v in sb.state_dict()["residuals"].items())
    return {"same_before": same_before, "grads_equal": grads_equal, "res_equal": res_equal,
            "step": sc.step, "names": sorted(loaded["residuals"])}


def _nonfinite(rank, world, **kw):
    B = _build()
    st = ddp_qhooks.fsdp.register(B, "stochastic", 4, **kw)
    _backward(B, _batch(rank, 0), 0)
    before = st.state_dict()["residuals"]
    B.zero_grad(set_to_none=True)
    _POISON["on"] = rank == world - 1  # one inf in emb.weight's row 0: rank 0's shard of the root module
    try:
        _backward(B, _batch(rank, 1), 1)
    finally:
        _POISON["on"] = False
    nan_everywhere = all(bool(torch.isnan(_local(p)).all()) for n, p in B.named_parameters()
                         if p.grad is not None and _local(p).numel() and not n.startswith("block"))
    block_finite = all(bool(torch.isfinite(_local(p)).all()) for n, p in B.named_parameters() if n.startswith("block"))
    after = st.state_dict()["residuals"]
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    root_unchanged = all(torch.equal(before[k], after[k]) for k in before if not k.startswith("block"))
    B.zero_grad(set_to_none=True)
    _backward(B, _batch(rank, 2), 2)
    finite_again = all(bool(torch.isfinite(_local(p)).all()) for p in B.parameters() if p.grad is not None)
    return {"nan_everywhere": nan_everywhere, "block_finite": block_finite, "unchanged": unchanged,
            "root_unchanged": root_unchanged, "finite_again": finite_again,
            "nonfinite_steps": st.stats()["nonfinite_steps"], "steps": st.step}


def _misconfig(rank, world, kw, plain=False):
    m = nn.Linear(3, 3) if plain else _build()
    kw = dict(kw)
    codec = kw.pop("codec", "stochastic")
    try:
        ddp_qhooks.fsdp.register(m, codec, **kw)
    except (ddp_qhooks.ConfigMismatchError, ddp_qhooks.InvalidOptionsError) as exc:
        return {"type": type(exc).__name__, "msg": str(exc)}
    return {"type": None}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(16, 33), nn.Linear(33, 33), nn.Linear(33, 1)

    def forward(self, x):
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))


def _train(rank, world, steps=60):
    torch.manual_seed(123)
    teacher = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))
    losses = {}
    for codec, bits in (("none", 8), ("stochastic", 4)):
        torch.manual_seed(7)
        m = MLP()
        for layer in (m.l1, m.l2, m.l3):
            fully_shard(layer, mesh=_CTX["mesh"])
        fully_shard(m, mesh=_CTX["mesh"])
        st = ddp_qhooks.fsdp.register(m, codec, bits)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        tail = []
        for step in range(steps):
            g = torch.Generator().manual_seed(50_000 + 31 * step + rank)
            x = torch.randn(32, 16, generator=g)
            with torch.no_grad():
                y = teacher(x)
            loss = (m(x) - y).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step >= steps - 10:
                t = loss.detach().clone()
                dist.all_reduce(t, group=_CTX["group"])
                tail.append(float(t) / world)
        s = st.stats()
        losses[codec] = {"final": sum(tail) / len(tail), "wire": s["wire_bytes_sent"],
                         "fp32_wire": s["fp32_reduce_scatter_wire_bytes"], "nmse": s["nmse"]}
    return losses


# ================================================================================================
# spawned runs (module scope: one per world size)
# ================================================================================================

@pytest.fixture(scope="module")
def runs():
    return {}


def _run(runs, world):
    if not runs:
        runs.update(enumerate(_dist.results(_w_all, 4, timeout_s=150)))
    return [runs[r][world] for r in range(world)]


def _sub(runs, world, name):
    out = []
    for r, res in enumerate(_run(runs, world)):
        sub = res[name]
        assert sub["ok"], f"rank {r}: {sub['error']}\n{sub['tb']}"
        out.append(sub["value"])
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_none_equals_fsdp_reduce_scatter(runs, world):
    for r, res in enumerate(_sub(runs, world, "exact")):
        for mode, v in res.items():
            # Gloo sums the W shards in its own order: equal to fp32 rounding (bitwise at W=2)
            assert v["worst"] <= 4e-7 * max(1.0, v["scale"]), (r, mode, v)
            if world == 2 and mode != "divide":  # (the divide reference itself rounds)
                assert v["bitwise"], (r, mode, v)
            assert v["modules"] == 3 and v["calls"] == 6 and v["steps"] == 2, (r, mode, v)
            assert v["fallback"] == [] and v["nmse"] == 0.0


@pytest.mark.parametrize("world", [2, 3, 4])
def test_pipelined_parameter_all_gather_equals_fsdp_s_own(runs, world):
    for r, res in enumerate(_sub(runs, world, "pipelined")):
        assert res["same"] and res["direct"] and res["quantized_same"], (r, res)
        assert res["installed"] == ["PipelinedAllGather"] * 2 and res["count"] == 2 and res["count_off"] == 0, res


@pytest.mark.parametrize("world", [2, 3, 4])
def test_error_feedback_identity_per_parameter(runs, world):
    for r, res in enumerate(_sub(runs, world, "identity")):
        assert "frozen.weight" not in res["names"] and "aux.weight" in res["names"]
        assert res["per_param"]["frozen.weight"] is None
        for name, v in res["per_param"].items():
            if v is None:
                continue
            assert v["gap"] <= 2e-6 * max(1.0, v["scale"]), (r, name, v)
        # the codec did quantize: without the residual the gap is large
        assert max(v["quant_err"] for v in res["per_param"].values() if v) > 1e-3


def test_unstaged_residuals_identity_and_memory(runs):
    staged = _sub(runs, 2, "identity")
    for r, res in enumerate(_sub(runs, 2, "identity_unstaged")):
        assert res["nbytes"]["staging"] == 0 and res["nbytes"]["live"] == staged[r]["nbytes"]["live"]
        for name, v in res["per_param"].items():
            if v is not None:
                assert v["gap"] <= 2e-6 * max(1.0, v["scale"]), (r, name, v)


# int8: 8 range bytes per row of each (tiny) parameter, so only <= 1/2 here (0.258 on the example's model)
@pytest.mark.parametrize("kind,ratio", [("identity_bf16", 0.5), ("identity_int8", 0.5)])
def test_compressed_residual(runs, kind, ratio):
    fp32 = _sub(runs, 2, "identity")
    for r, res in enumerate(_sub(runs, 2, kind)):
        assert res["nbytes"]["live"] <= ratio * fp32[r]["nbytes"]["live"], (res["nbytes"], fp32[r]["nbytes"])
        for name, v in res["per_param"].items():
            if v is not None:  # the residual's own rounding is lost: identity to that precision
                assert v["gap"] <= 0.05 * max(1.0, v["scale"]), (r, name, v)


def test_state_dict_round_trip(runs):
    for r, res in enumerate(_sub(runs, 2, "state_dict")):
        assert res["same_before"] and res["grads_equal"] and res["res_equal"], (r, res)
        assert res["step"] == 3 and "block.0.weight" in res["names"]


@pytest.mark.parametrize("kind", ["nonfinite", "nonfinite_unstaged"])
def test_nonfinite_reaches_every_rank(runs, kind):
    """One inf in one value of the last rank's gradient, inside rank 0's shard of the root module:
    every rank's shard of that module is NaN; the step's residuals stay (staged: all of them;
    unstaged: the root module's, while the finite block modules' move on)."""
    for r, res in enumerate(_sub(runs, 2, kind)):
        assert res == {"nan_everywhere": True, "block_finite": True, "unchanged": kind == "nonfinite",
                       "root_unchanged": True, "finite_again": True, "nonfinite_steps": 1, "steps": 3}, (r, res)


def test_misconfig_raises_on_every_rank(runs):
    for name, typ, text, world in (("mismatch", "ConfigMismatchError", "bits", 2),
                                   ("invalid", "InvalidOptionsError", "nope", 2),
                                   ("not_fsdp", "InvalidOptionsError", "fully_shard", 4)):
        for r, res in enumerate(_sub(runs, world, name)):
            assert res["type"] == typ and text in res["msg"], (name, r, res)


def test_quantized_training_close_to_none(runs):
    for r, res in enumerate(_sub(runs, 2, "train")):
        none, q = res["none"]["final"], res["stochastic"]["final"]
        assert q <= none * 1.15 + 1e-3, res
        # 4-bit payloads: < 1/6 of fp32 reduce-scatter bytes (headers and block ranges included)
        assert res["stochastic"]["wire"] < res["stochastic"]["fp32_wire"] / 6, res


def test_hierarchical_between_nodes(runs):
    for r, res in enumerate(_sub(runs, 4, "hierarchical")):
        none, q = res["none"], res["stochastic"]
        assert none["worst"] <= 1e-6 * max(1.0, none["scale"]), (r, res)
        assert q["worst"] <= 0.5 * max(1.0, q["scale"]) and q["worst"] > 0, (r, res)
        # between the 2 nodes each rank sends one payload of its shard (~45 values here, so the
        # 16-byte header and the 8-byte range of each module's payload weigh: 240 vs 816 bytes)
        assert q["wire"] < none["wire"] / 3, (r, res)
        # rank 3's inf in one value of the root module's gradient: every rank's root shard is NaN
        assert res["nan_everywhere"] and res["block_finite"], (r, res)


def test_gradient_accumulation_without_sync(runs):
    for r, res in enumerate(_sub(runs, 2, "accumulate")):
        assert res == {"worst": 0.0, "calls": 3, "steps": 1, "fallback": []}, (r, res)


def test_load_every_rank_at_another_world_size(runs):
    for r, res in enumerate(_sub(runs, 4, "redistribute")):
        assert res["worst"] <= 1e-7 and res["nonzero"] > 0 and res["warned"] and res["names"], (r, res)
        assert res["step"] == 3, (r, res)


def test_hierarchical_residuals_are_keyed_by_parameter_name(runs):
    for r, res in enumerate(_sub(runs, 4, "hierarchical")):
        names = res["names"]
        flat = [n for n in names["saved"] if "[flat " in n]
        assert set(names["saved"]) - set(flat) == set(names["params"]) and len(flat) == 1, (r, names)
        assert names["by_name_equal"] and names["legacy_equal"], (r, names)
        # one warning for the matched residuals, one for the flat slot that cannot be matched
        assert names["legacy_warned"] == [(False, True), (True, False)], (r, names)


def test_hierarchical_backward_is_one_step(runs):
    """Every module's exchange between nodes belongs to its backward's step (engine.end_step at the
    end of the pass): 2 backward passes, 2 steps, whatever the number of FSDP modules."""
    for r, res in enumerate(_sub(runs, 4, "hierarchical")):
        assert res["none"]["steps"] == 2 and res["stochastic"]["steps"] == 2, (r, res)


@pytest.mark.parametrize("chunk_size", [5, 1.5, True, "big"])
def test_invalid_chunk_size_names_the_valid_choices(chunk_size):
    from ddp_qhooks.integrations.fsdp import FSDPQuantState
    with pytest.raises(ValueError, match=r"chunk_size must be None .* or an integer >= 65536"):
        FSDPQuantState("stochastic", 4, chunk_size=chunk_size)
    assert FSDPQuantState("stochastic", 4, chunk_size=None).chunk_size is None
    assert FSDPQuantState("stochastic", 4).chunk_size == 1 << 21
