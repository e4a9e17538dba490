"""ResidualMemory when bucket layouts change and come back (FSDP: a module's layout holds only the
parameters that got a gradient in the step), checked against a plain dict of per-parameter
residuals that follows every write."""
from __future__ import annotations

import random

import pytest
import torch

from ddp_qhooks.error_feedback import ResidualMemory

SIZES = {1: 3, 2: 5, 3: 2, 4: 4}


def _numels(sig):
    return tuple(SIZES[k] for k in sig)


def _check(mem, sig, ref):
    buf = mem.bucket_residual(sig, _numels(sig), "cpu")
    off = 0
    for k in sig:
        n = SIZES[k]
        assert torch.equal(buf[off:off + n], ref.get(k, torch.zeros(n))), (sig, k)
        off += n
    return buf


def test_a_layout_that_comes_back_is_rebuilt_from_where_its_parameters_live():
    mem, ref = ResidualMemory(), {}
    a, b = (1, 2), (2, 3)
    buf = _check(mem, a, ref)
    buf.copy_(torch.arange(8.0))
    ref[1], ref[2] = torch.arange(3.0), torch.arange(3.0, 8.0)
    buf = _check(mem, b, ref)  # parameter 2 moves to b, parameter 1 stays in a's buffer
    buf.fill_(-1.0)
    ref[2], ref[3] = torch.full((5,), -1.0), torch.full((2,), -1.0)
    _check(mem, a, ref)  # a's old buffer still held parameter 2's older residual: not used
    assert set(mem.residuals()) == {1, 2, 3}
    for k, v in mem.residuals().items():
        assert torch.equal(v, ref[k])


def test_evict_keeps_every_residual_and_drops_staging():
    mem, ref = ResidualMemory(), {}
    sig = (1, 4)
    buf = _check(mem, sig, ref)
    buf.copy_(torch.linspace(-1, 1, 7))
    ref[1], ref[4] = buf[:3].clone(), buf[3:].clone()
    mem.staging(sig).fill_(5.0)
    assert mem.nbytes() == (7 * 4, 7 * 4)
    mem.evict(sig)
    assert mem.nbytes() == (0, 0)
    for k, v in mem.residuals().items():
        assert torch.equal(v, ref[k])
    _check(mem, (4,), ref)
    _check(mem, (1,), ref)
    mem.evict((2, 3))  # never built: nothing happens
    assert set(mem.residuals()) == {1, 4}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_layout_changes_with_staged_commits(seed):
    """Random layouts over 4 parameters, each step writing new residuals into staging and committing
    them on most steps: every parameter's residual is always the last committed one."""
    rng = random.Random(seed)
    layouts = [(1, 2, 3, 4), (1, 2), (2, 3), (1, 3, 4), (4,), (2, 4), (3,)]
    mem, ref = ResidualMemory(), {}
    for step in range(60):
        sig = rng.choice(layouts)
        _check(mem, sig, ref)
        st = mem.staging(sig)
        new = torch.randn(st.numel(), generator=torch.Generator().manual_seed(step))
        st.copy_(new)
        if rng.random() < 0.8:  # a skipped step (non-finite somewhere) keeps the old residuals
            mem.commit([sig])
            off = 0
            for k in sig:
                ref[k] = new[off:off + SIZES[k]].clone()
                off += SIZES[k]
        if rng.random() < 0.1:
            mem.evict(rng.choice(layouts))
        for k, v in mem.residuals().items():
            assert torch.equal(v, ref.get(k, torch.zeros(SIZES[k]))), (step, sig, k)
    live, _ = mem.nbytes()
    assert live <= 4 * sum(SIZES.values()) * 2  # freed buffers do not accumulate


def test_bf16_buffers_round_once():
    mem = ResidualMemory()
    buf = mem.bucket_residual((1, 2), (3, 5), "cpu", dtype=torch.bfloat16)
    buf.copy_(torch.tensor([1.0, 2.0, 3.0, 1 / 3, 4.0, 5.0, 6.0, 7.0]))
    mem.bucket_residual((2,), (5,), "cpu", dtype=torch.bfloat16)  # 2 moves out: a is stale
    again = mem.bucket_residual((1, 2), (3, 5), "cpu", dtype=torch.bfloat16)
    assert again.dtype == torch.bfloat16
    assert torch.equal(again.float(), torch.tensor([1.0, 2.0, 3.0, 1 / 3, 4.0, 5.0, 6.0, 7.0]).bfloat16().float())
