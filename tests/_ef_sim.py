"""Single-process simulation of the hook's error feedback: W workers, one bucket holding every
parameter of a small MLP, each worker ``x = g + e; body = Q(x); e = x - deq(body)`` with
``ResidualMemory`` (staging + commit, as the hook does), the mean of the decoded bodies as the
gradient of a momentum-SGD or AdamW (clip 1.0) step.  Returns the per-step norms."""
from __future__ import annotations

import math

import torch

from ddp_qhooks.codecs import Layout, make_codec
from ddp_qhooks.error_feedback import ResidualMemory


def simulate(codec: str, bits: int = 8, optimizer: str = "sgd", steps: int = 500, world: int = 2, seed: int = 0,
             **options) -> dict:
    torch.manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    params = list(model.parameters())
    layout = Layout([p.numel() for p in params], list(range(len(params))))
    signature = tuple(range(len(params)))
    q = make_codec(codec, bits, **options)
    bodies = [torch.empty(q.body_nbytes(layout), dtype=torch.uint8) for _ in range(world)]
    memories = [ResidualMemory() for _ in range(world)]
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    gens = [torch.Generator().manual_seed(1000 * seed + r) for r in range(world)]
    residual_norms, grad_norms, losses = [], [], []
    mean = torch.empty(layout.numel)
    for step in range(steps):
        grads = []
        for r in range(world):
            x = torch.randn(32, 32, generator=gens[r])
            with torch.no_grad():
                y = teacher(x) + 0.1 * torch.randn(32, 10, generator=gens[r])
            loss = torch.nn.functional.mse_loss(model(x), y)
            g = torch.autograd.grad(loss, params)
            grads.append(torch.cat([t.reshape(-1) for t in g]))
            if r == 0:
                losses.append(float(loss.detach()))
        for r in range(world):
            e = memories[r].bucket_residual(signature, layout.param_numels, "cpu")
            x = grads[r] + e
            err = memories[r].staging(signature)
            info = q.encode(x, bodies[r], layout, key=(seed * 7919 + step) * 31 + r, error_out=err)
            if not info.finite:
                raise FloatingPointError(f"{codec}: non-finite input at step {step}")
            memories[r].commit([signature])
        q.decode(bodies, layout, mean, divisor=world)
        residual_norms.append(float(memories[0].bucket_residual(signature, layout.param_numels, "cpu").norm()))
        grad_norms.append(float(grads[0].norm()))
        off = 0
        for p in params:
            p.grad = mean[off:off + p.numel()].view_as(p).clone()
            off += p.numel()
        if optimizer != "sgd":
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return {"residual": residual_norms, "grad": grad_norms, "loss": losses}


def summary(res: dict) -> dict:
    e, g = res["residual"], res["grad"]
    n = len(e)
    early = max(e[n // 10:n // 2])
    late = max(e[n // 2:])
    ratio = sum(a / max(b, 1e-12) for a, b in zip(e[-100:], g[-100:])) / 100
    return {"early_max": early, "late_max": late, "growth": late / max(early, 1e-12), "e_over_g": ratio,
            "final_loss": sum(res["loss"][-50:]) / 50, "finite": all(math.isfinite(v) for v in e)}
