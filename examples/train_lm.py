"""Train a small character-level transformer with AdamW (warm-up, cosine decay, clipping) under DDP
and a quantized gradient hook; with ``--onebit-adam N``, 1-bit Adam (``ddp_qhooks.optim.OneBitAdam``).

Runs as is (2 local Gloo workers) and under torchrun (Gloo on CPU, NCCL on GPUs):

    python examples/train_lm.py --codec stochastic --bits 4            # 4-bit gradients, AdamW unchanged
    python examples/train_lm.py --codec sign --onebit-adam 60          # 1-bit: the momentum is exchanged
    torchrun --nproc-per-node=2 examples/train_lm.py --codec sign --onebit-adam 60 --steps 600

Text: files Debian ships (``/usr/share/common-licenses``, the GNU info manuals), nothing
downloaded; see ``ddp_qhooks.tools.lm``.  The optimizer line is the only one 1-bit Adam changes:
``OneBitAdam(groups, lr, betas, ..., warmup_steps=N, hook=state)`` instead of ``torch.optim.AdamW``.
Freeze its variance after the learning-rate warm-up (here 10 % of ``--steps``; the study's
300-step run needed a 1-bit Adam warm-up of 60 steps).
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_qhooks
from ddp_qhooks.integrations import launch
from ddp_qhooks.tools import lm


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--codec", default="stochastic", choices=["fp32"] + sorted(ddp_qhooks.CODECS),
                   help="gradient codec; fp32 = DDP's own allreduce, no hook")
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--onebit-adam", type=int, default=None, metavar="N",
                   help="1-bit Adam with an N-step warm-up (the hook then exchanges the optimizer's momentum)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16, help="sequences of 64 bytes per rank")
    p.add_argument("--lr", type=float, default=lm.DEFAULT_LR, help="peak learning rate")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--cpu", action="store_true", help="ignore GPUs")
    p.add_argument("--world-size", type=int, default=2, help="local workers when started without a launcher")
    args = p.parse_args(argv)
    if args.onebit_adam is not None and (args.codec == "fp32" or args.onebit_adam < 1):
        p.error("--onebit-adam needs a codec (not fp32) and a warm-up of >= 1 step")
    return args


def train(env: launch.Launch, args) -> dict:
    rank, device = env.rank, env.device
    task = lm.LmTask(args.batch_size, rank, device)
    model = task.model()  # the same initial weights on every rank
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    state = None if args.codec == "fp32" else ddp_qhooks.register(ddp, args.codec, bits=args.bits)
    onebit = None if args.onebit_adam is None else {"warmup_steps": args.onebit_adam}
    opt, sched = lm.adamw_recipe(model, args.steps, lr=args.lr, onebit=onebit, hook=state)
    for step in range(args.steps):
        x, y = task.batch_for(step)
        loss = task.loss(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), lm.CLIP)
        opt.step()
        sched.step()
        if rank == 0 and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
            sent = "" if state is None else f"  sent {state.stats()['wire_bytes_sent'] / 1e6:.1f} MB"
            print(f"step {step + 1:5d}  loss {loss.item():.4f}{sent}", flush=True)
    result = {"val_loss": task.evaluate(model)}
    if state is not None:
        s = state.stats()
        numel = sum(p.numel() for p in model.parameters())
        w = env.world_size
        fp32 = 2 * (w - 1) / w * 4 * numel * args.steps  # a ring all-reduce of fp32 gradients, every step
        result.update(wire_bytes_sent=s["wire_bytes_sent"], fewer_bytes_than_fp32=fp32 / max(1, s["wire_bytes_sent"]))
    if rank == 0:
        print("final " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()),
              flush=True)
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        lm.load_corpus()
    except lm.CorpusMissing as exc:
        sys.exit(f"error: {exc}")
    launch.run(train, args, world_size=args.world_size, cpu=args.cpu)


if __name__ == "__main__":
    main()
