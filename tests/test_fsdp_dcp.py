"""Resuming FSDP2 training with torch.distributed.checkpoint (DCP): model and optimizer through
DCP's state_dict helpers, the hook's residuals through its own state_dict (torch.save, loaded with
weights_only=True), in fresh processes.  Reference: the same run continued without a restart."""
from __future__ import annotations

import os

import _dist  # tests/conftest.py puts tests/ and the repository root on sys.path
import pytest
import torch
import torch.nn as nn

import ddp_qhooks

pytestmark = pytest.mark.slow

try:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard
except ImportError:  # pragma: no cover
    pytest.skip("torch without FSDP2 / distributed checkpoint", allow_module_level=True)

SAVED_AT, STEPS = 3, 5


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 17), nn.Linear(17, 13), nn.Linear(13, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _setup(seed):
    torch.manual_seed(seed)
    m = Net()
    for layer in (m.a, m.b):
        fully_shard(layer)
    fully_shard(m)
    st = ddp_qhooks.fsdp.register(m, "stochastic", 4)
    opt = torch.optim.AdamW(m.parameters(), lr=0.01)
    return m, st, opt


def _step(m, opt, rank, step):
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(8, 6, generator=g)
    loss = (m(x) - x[:, :3]).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _params(m):
    return {n: p.detach().full_tensor().clone() for n, p in m.named_parameters()}


def _uninterrupted(rank, world, ckpt):
    m, st, opt = _setup(0)
    for step in range(SAVED_AT):
        _step(m, opt, rank, step)
    msd, osd = get_state_dict(m, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(ckpt, "dcp"))
    torch.save(st.state_dict(), os.path.join(ckpt, f"hook{rank}.pt"))
    residual_norm = sum(float(v.norm()) for v in st.state_dict()["residuals"].values())
    for step in range(SAVED_AT, STEPS):
        _step(m, opt, rank, step)
    return {"params": _params(m), "residual_norm": residual_norm}


def _resumed(rank, world, ckpt, load_hook=True):
    m, st, opt = _setup(1)  # other initial weights: everything must come from the checkpoint
    msd, osd = get_state_dict(m, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=os.path.join(ckpt, "dcp"))
    set_state_dict(m, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if load_hook:
        st.load_state_dict(torch.load(os.path.join(ckpt, f"hook{rank}.pt"), weights_only=True))
    for step in range(SAVED_AT, STEPS):
        _step(m, opt, rank, step)
    return {"params": _params(m), "step": st.step}


def _resume_both(rank, world, ckpt):
    return {"with_hook": _resumed(rank, world, ckpt), "without_hook": _resumed(rank, world, ckpt, False)}


def test_dcp_resume_is_bitwise_equal_to_the_uninterrupted_run(tmp_path):
    ckpt = str(tmp_path)
    ref = _dist.results(_uninterrupted, 2, ckpt, timeout_s=120)
    got = _dist.results(_resume_both, 2, ckpt, timeout_s=120)
    assert ref[0]["residual_norm"] > 0  # the checkpoint did hold residuals
    for r in range(2):
        want, res = ref[r]["params"], got[r]["with_hook"]
        assert res["step"] == STEPS
        for name, t in want.items():
            assert torch.equal(res["params"][name], t), (r, name, float((res["params"][name] - t).abs().max()))
        # without the hook's residuals (and step: other random rounding) the run is not the same
        other = got[r]["without_hook"]["params"]
        assert any(not torch.equal(other[n], t) for n, t in want.items())
