"""Minimal DDP training with the one-line quantized hook.

Runs as is: with no launcher it spawns 2 local Gloo workers; under torchrun it uses the
environment torchrun sets (any number of nodes/processes, Gloo on CPU, NCCL on GPUs).

    python examples/train_minimal.py                       # 2 local workers, stochastic 8-bit + EF
    python examples/train_minimal.py --codec uniform --bits 2 --compare-fp32
    torchrun --nproc-per-node=4 examples/train_minimal.py --bits 4

The task is a synthetic classification problem (a fixed random teacher network labels Gaussian
inputs), so nothing is downloaded.  Every rank sees different data.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ddp_qhooks


def make_data(rank: int, n: int, dim: int, classes: int):
    teacher = nn.Sequential(nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, classes))
    torch.manual_seed(1234)  # same teacher on every rank
    for p in teacher.parameters():
        nn.init.normal_(p, std=1.0)
    g = torch.Generator().manual_seed(100 + rank)  # different inputs per rank
    x = torch.randn(n, dim, generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    return x, y


def train(rank: int, world: int, args) -> dict:
    use_cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    x, y = make_data(rank, 4096, 32, 10)
    x, y = x.to(device), y.to(device)
    results = {}
    for label, codec in ([("fp32 allreduce", None)] if args.compare_fp32 else []) + [(f"{args.codec} {args.bits}-bit", args.codec)]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
        ddp = DDP(model, device_ids=[device.index] if use_cuda else None)
        state = None
        if codec is not None:
            # the one line:
            state = ddp_qhooks.register(ddp, codec, bits=args.bits, error_feedback=not args.no_error_feedback,
                                        **({"block_size": args.block_size} if args.block_size else {}))
        opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
        t0 = time.perf_counter()
        for step in range(args.steps):
            idx = torch.randint(0, x.shape[0], (args.batch,), generator=torch.Generator().manual_seed(step * 1000 + rank))
            loss = nn.functional.cross_entropy(ddp(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
                extra = ""
                if state is not None:
                    s = state.stats()
                    extra = f"  payload {s['payload_bytes_last_step']} B/step  ratio {s['compression_ratio']:.1f}x  nmse {s['nmse']:.2e}"
                print(f"[{label}] step {step:4d}  loss {loss.item():.4f}{extra}", flush=True)
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).float().mean().item()
        results[label] = {"loss": loss.item(), "train_acc": acc, "seconds": time.perf_counter() - t0,
                          "stats": state.stats() if state else None}
        if rank == 0:
            print(f"[{label}] final loss {loss.item():.4f}  accuracy {acc:.3f}  time {results[label]['seconds']:.2f}s", flush=True)
    return results


def _worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train(rank, world, args)
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--codec", default="stochastic", choices=sorted(ddp_qhooks.CODECS))
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--no-error-feedback", action="store_true")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--world-size", type=int, default=2, help="local workers when not under torchrun")
    p.add_argument("--compare-fp32", action="store_true", help="also train with DDP's plain fp32 allreduce")
    p.add_argument("--cpu", action="store_true", help="ignore GPUs")
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun / SLURM-style launch
        backend = "nccl" if torch.cuda.is_available() and not args.cpu else "gloo"
        dist.init_process_group(backend)
        try:
            train(dist.get_rank(), dist.get_world_size(), args)
        finally:
            dist.destroy_process_group()
        return
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args.cpu = True
    mp.start_processes(_worker, args=(args.world_size, port, args), nprocs=args.world_size, start_method="spawn")


if __name__ == "__main__":
    main()
