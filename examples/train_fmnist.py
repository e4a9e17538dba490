"""Train a small CNN on Fashion-MNIST with DDP and a quantized gradient hook; checkpoint and resume.

Runs as is (2 local Gloo workers), under torchrun (one or many nodes, Gloo on CPU, NCCL on GPUs)
and under SLURM's srun (one task per rank; see slurm/):

    python examples/train_fmnist.py --codec stochastic --bits 4
    python examples/train_fmnist.py --codec stochastic --bits 4 --local-steps 16 --noniid 0.9   # DiLoCo, non-IID
    torchrun --nproc-per-node=4 examples/train_fmnist.py --codec sign --epochs 2
    torchrun --nnodes=2 --node-rank=0 --master-addr=10.0.0.1 --master-port=29500 \\
        --nproc-per-node=1 examples/train_fmnist.py --checkpoint-dir ckpt --resume

Data: the Debian package ``dataset-fashion-mnist`` (or ``--data DIR`` with the four IDX files).
Each rank trains on its own shard (DistributedSampler), so the global batch is
``--batch-size x world size``.

Checkpoints (``--checkpoint-dir``): every rank writes model, optimizer and its own hook state
(error-feedback residuals differ per rank) to ``step<N>/rank<r>.pt``; after all ranks have
written, the first rank of each node updates ``latest.json`` (so nodes without a shared file system
each keep a complete set for their own ranks).  A run killed mid-save resumes from the previous
complete step.  ``--resume`` continues from ``latest.json`` if present (else starts fresh), so a
requeued job simply runs the same command again.  Resuming at another world size restores model
and optimizer and resets the residuals, with a warning.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler

import ddp_qhooks
from ddp_qhooks.integrations import launch
from ddp_qhooks.tools import data

KEEP_CHECKPOINTS = 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--codec", default="stochastic", choices=["fp32"] + sorted(ddp_qhooks.CODECS),
                   help="gradient codec; fp32 = DDP's own allreduce, no hook")
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--block-size", default=None, help="codec block_size: an integer or 'layer'")
    p.add_argument("--no-error-feedback", action="store_true")
    p.add_argument("--exchange", default=None, choices=ddp_qhooks.EXCHANGES,
                   help="how payloads are exchanged (default: the hook's default)")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="for --exchange hierarchical outside torchrun (which sets LOCAL_WORLD_SIZE)")
    p.add_argument("--server-bits", type=int, default=None,
                   help="bits of the re-encoded mean in the two-phase exchange (default: the hook's default)")
    p.add_argument("--local-steps", type=int, default=None, metavar="H",
                   help="local SGD / DiLoCo: no gradient exchange, the codec quantizes pseudo-gradients every H steps")
    p.add_argument("--outer", default="average", choices=["average", "nesterov"], help="with --local-steps")
    p.add_argument("--outer-lr", type=float, default=None, help="with --local-steps (default 0.7 nesterov, 1 average)")
    p.add_argument("--fragments", type=int, default=1, help="with --local-steps: staggered parameter groups")
    p.add_argument("--noniid", type=float, default=0.0, metavar="P",
                   help="fraction of each rank's minibatch drawn from its two home classes (0: IID)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="directory with the Fashion-MNIST IDX files")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps (default: end of each epoch)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir/latest.json if present")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--cpu", action="store_true", help="ignore GPUs")
    p.add_argument("--timeout", type=float, default=300.0, help="process-group timeout, seconds")
    p.add_argument("--world-size", type=int, default=2, help="local workers when started without a launcher")
    args = p.parse_args(argv)
    if args.block_size is not None and args.block_size != "layer":
        try:
            args.block_size = int(args.block_size)
        except ValueError:
            p.error(f"--block-size must be an integer or 'layer', got {args.block_size!r}")
    if args.resume and not args.checkpoint_dir:
        p.error("--resume needs --checkpoint-dir")
    if args.local_steps is not None and args.codec == "fp32":
        p.error("--local-steps needs a codec for the pseudo-gradients (--codec none: fp32)")
    if not 0.0 <= args.noniid <= 1.0:
        p.error(f"--noniid must be a fraction in [0, 1], got {args.noniid}")
    return args


def emit(line: str) -> None:
    """One write(2) per line: lines of ranks sharing a pipe never interleave mid-line."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def log(rank: int, *parts) -> None:
    if rank == 0:
        emit(" ".join(str(p) for p in parts))


def params_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# -- checkpoints ------------------------------------------------------------------------------
def latest_step(ckpt_dir: str) -> int | None:
    try:
        with open(os.path.join(ckpt_dir, "latest.json")) as f:
            return int(json.load(f)["step"])
    except FileNotFoundError:
        return None


def save_checkpoint(ckpt_dir: str, step: int, epoch: int, model, opt, hook_state, env: launch.Launch) -> None:
    world, rank = env.world_size, env.rank
    step_dir = os.path.join(ckpt_dir, f"step{step}")
    os.makedirs(step_dir, exist_ok=True)
    blob = {"step": step, "epoch": epoch, "world_size": world, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "hook": hook_state.state_dict() if hook_state else None}
    tmp = os.path.join(step_dir, f".rank{rank}.pt.tmp")
    torch.save(blob, tmp)
    os.replace(tmp, os.path.join(step_dir, f"rank{rank}.pt"))
    dist.barrier()  # every rank's file is complete before the marker moves
    # one writer per node: without a shared file system each node keeps its own ranks' files
    if env.local_rank == 0:
        tmp = os.path.join(ckpt_dir, f".latest.json.{rank}.tmp")
        with open(tmp, "w") as f:
            json.dump({"step": step, "epoch": epoch, "world_size": world}, f)
        os.replace(tmp, os.path.join(ckpt_dir, "latest.json"))
        kept = sorted((int(d[4:]) for d in os.listdir(ckpt_dir) if d.startswith("step") and d[4:].isdigit()))
        for old in kept[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(os.path.join(ckpt_dir, f"step{old}"), ignore_errors=True)
    dist.barrier()


def load_checkpoint(ckpt_dir: str, model, opt, hook_state, world: int, rank: int, device) -> tuple[int, str | None]:
    """Return (step, path) of the checkpoint loaded, (0, None) when there is none."""
    step = latest_step(ckpt_dir)
    if step is None:
        return 0, None
    step_dir = os.path.join(ckpt_dir, f"step{step}")
    own = os.path.join(step_dir, f"rank{rank}.pt")
    path = own if os.path.exists(own) else os.path.join(step_dir, "rank0.pt")
    blob = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(blob["model"])
    opt.load_state_dict(blob["optimizer"])
    if hook_state is not None and blob["hook"] is not None:
        saved = [os.path.join(step_dir, f"rank{r}.pt") for r in range(blob["world_size"])]
        if isinstance(hook_state, ddp_qhooks.LocalSGD):
            hook_state.load_state_dict(blob["hook"])  # its hook state resets residuals at another world size
        elif blob["world_size"] != world and all(os.path.exists(f) for f in saved):
            # another world size: every rank's residuals are here (shared file system), so the hook
            # can redistribute them; with only its own file it resets them (both warn)
            hook_state.load_state_dict([torch.load(f, map_location="cpu", weights_only=True)["hook"] for f in saved])
        else:
            hook_state.load_state_dict(blob["hook"])
    return int(blob["step"]), path


# -- training ---------------------------------------------------------------------------------
def evaluate(model, x, y, rank: int, world: int, device) -> float:
    """Test accuracy over the whole test set, each rank scoring its own slice."""
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for i in range(rank * 1000, x.shape[0], world * 1000):
            xb, yb = x[i:i + 1000].to(device), y[i:i + 1000].to(device)
            correct[0] += (model(xb).argmax(1) == yb).sum()
            correct[1] += yb.numel()
    dist.all_reduce(correct)
    model.train()
    return (correct[0] / correct[1]).item()


def train(env: launch.Launch, args) -> dict:
    rank, world, device = env.rank, env.world_size, env.device
    x_train, y_train = data.load("train", args.data)
    home = torch.nonzero((y_train == (2 * rank) % 10) | (y_train == (2 * rank + 1) % 10)).view(-1)
    x_test, y_test = data.load("test", args.data)
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = data.SmallCNN().to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    hook_state = sync = None
    if args.local_steps is not None:
        ddp.register_comm_hook(None, ddp_qhooks.local_phase_hook)  # the local phase: no gradient exchange
        options = {"block_size": args.block_size} if args.block_size is not None else {}
        if args.exchange is not None:
            options["exchange"] = args.exchange
        hook_state = sync = ddp_qhooks.LocalSGD(model, args.local_steps, args.codec, bits=args.bits,
                                                error_feedback=not args.no_error_feedback, outer=args.outer,
                                                outer_lr=args.outer_lr, fragments=args.fragments, seed=args.seed,
                                                **options)
    elif args.codec != "fp32":
        options = {"seed": args.seed}
        if args.block_size is not None:
            options["block_size"] = args.block_size
        if args.exchange is not None:
            options["exchange"] = args.exchange
        if args.ranks_per_node is not None:
            options["ranks_per_node"] = args.ranks_per_node
        if args.server_bits is not None:
            options["server_bits"] = args.server_bits
        # the one line:
        hook_state = ddp_qhooks.register(ddp, args.codec, bits=args.bits,
                                         error_feedback=not args.no_error_feedback, **options)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=args.momentum)

    sampler = DistributedSampler(range(x_train.shape[0]), num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    every = args.checkpoint_every or steps_per_epoch

    step = 0
    if args.resume:
        step, path = load_checkpoint(args.checkpoint_dir, model, opt, hook_state, world, rank, device)
        if path is not None:
            log(rank, f"resumed from {os.path.dirname(path)} at step {step}")
    codec = hook_state.hook.codec if sync is not None else getattr(hook_state, "codec", None)
    mode = (f"local SGD H={args.local_steps} ({args.outer} outer step, {args.fragments} fragment(s)), "
            if sync is not None else "")
    log(rank, f"training SmallCNN on Fashion-MNIST: {world} ranks ({env.backend}, {env.launcher}), {mode}codec "
              f"{args.codec}{'' if codec is None else f' {codec.bits}-bit'}, error feedback "
              f"{'off' if args.no_error_feedback else 'on'}, {'non-IID ' + str(args.noniid) + ', ' if args.noniid else ''}"
              f"{steps_per_epoch} steps/epoch, steps {step}..{total_steps}")

    window_t, window_n, loss = time.perf_counter(), 0, torch.tensor(float("nan"))
    epoch = step // steps_per_epoch
    while step < total_steps:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        start = (step % steps_per_epoch) * args.batch_size
        for begin in range(start, steps_per_epoch * args.batch_size, args.batch_size):
            if step >= total_steps:
                break
            idx = order[begin:begin + args.batch_size]
            if args.noniid:  # part of the batch from this rank's two home classes (client drift)
                g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
                local = round(args.noniid * idx.numel())
                idx = idx.clone()
                idx[:local] = home[torch.randint(0, home.numel(), (local,), generator=g)]
            xb, yb = x_train[idx].to(device, non_blocking=True), y_train[idx].to(device, non_blocking=True)
            loss = F.cross_entropy(ddp(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sync is not None:
                sync.step()
            step += 1
            window_n += 1
            if step % args.log_every == 0 or step == total_steps:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                ms = 1000 * (time.perf_counter() - window_t) / window_n
                hook = ""
                if hook_state is not None:
                    s = hook_state.stats()
                    hook = (f"  payload {s['payload_bytes_last_step']} B/step  ratio {s['compression_ratio']:.1f}x"
                            f"  sent {s['wire_bytes_sent'] / 1e6:.2f} MB")
                log(rank, f"step {step:5d}  epoch {epoch}  loss {loss.item():.4f}  step_time {ms:.1f} ms{hook}")
                window_t, window_n = time.perf_counter(), 0
            if args.checkpoint_dir and (step % every == 0 or step == total_steps):
                save_checkpoint(args.checkpoint_dir, step, epoch, model, opt, hook_state, env)
        if step % steps_per_epoch == 0 and step < total_steps and sync is None:  # (local SGD: ranks differ)
            log(rank, f"epoch {epoch} done  test_acc {evaluate(model, x_test, y_test, rank, world, device):.4f}")

    if sync is not None and (len(sync.fragments) > 1 or sync.inner_steps % args.local_steps):
        sync.sync()  # evaluate a synchronized model
    acc = evaluate(model, x_test, y_test, rank, world, device)
    result = {"step": step, "test_acc": acc, "world_size": world}
    if not bool(torch.isnan(loss)):  # nan only when the run resumed at its last step: no step taken
        result["loss"] = loss.item()
    if hook_state is not None:
        s = hook_state.stats()
        result.update(compression_ratio=s["compression_ratio"], wire_bytes_sent=s["wire_bytes_sent"],
                      fp32_allreduce_wire_bytes=s["fp32_allreduce_wire_bytes"])
        if sync is not None:  # what fp32 DDP would have sent in these steps (the hook counts syncs only)
            numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
            result["fp32_allreduce_wire_bytes"] = int(2 * (world - 1) / world * 4 * numel * sync.inner_steps)
    log(rank, "final " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    emit(f"[rank {rank}] params_sha256 {params_sha256(model)}")
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        data.find_dir(args.data)
    except data.DatasetMissing as exc:
        sys.exit(f"error: {exc}")
    launch.run(train, args, world_size=args.world_size, cpu=args.cpu, timeout_s=args.timeout)


if __name__ == "__main__":
    main()
