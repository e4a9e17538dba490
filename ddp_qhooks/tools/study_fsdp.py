"""The language model under FSDP2: does a quantized reduce-scatter reach fp32 FSDP's validation loss?

    python -m ddp_qhooks.tools.study_fsdp --configs fp32 stochastic:4 --seeds 0 1 2 --steps 300
    python -m ddp_qhooks.tools.study_fsdp --nodes 2 --procs-per-node 2 --configs fp32 stochastic:4

Trains ``tools/lm.py``'s TinyGPT (each block its own ``fully_shard`` module, then the root, which
holds the tied embedding) with its AdamW recipe (warm-up, cosine decay, weight decay, gradient
clipping) on W local Gloo ranks.  ``fp32``: FSDP's own reduce-scatter over all ranks; other
configurations (the bench's syntax, ``codec[:bits][,option=value...][,ef=0]``):
``ddp_qhooks.fsdp.register`` on every module, or with ``--procs-per-node L > 1`` the hierarchical
mode (FSDP over the L ranks of each of ``--nodes`` simulated hosts, ``register_between_nodes``
across them).  Every configuration of a seed starts from the same weights and sees the same
minibatches.  Reports the final validation loss (nats per byte, 256 fixed windows), its
difference to fp32, and the bytes each rank sent: flat, the reduce-scatter's payloads against
an fp32 reduce-scatter's; hierarchical, what crossed hosts against the same exchange in fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .bench import parse_config
from .lm import CLIP, DEFAULT_LR, LmTask, TinyGPT, adamw_recipe


def _model(task, seed, mesh):
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(seed)
    model = TinyGPT(task.vocab, context=task.context)
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _train(rank, world, spec, seed, args) -> dict:
    import ddp_qhooks
    from torch.distributed.device_mesh import DeviceMesh
    cfg = parse_config(spec)
    task = LmTask(args.batch, rank, torch.device("cpu"))
    per_node = args.procs_per_node
    state, out = None, {"config": spec, "seed": seed}
    if cfg["kind"] == "baseline":
        model = _model(task, seed, DeviceMesh.from_group(dist.group.WORLD, "cpu"))
    elif per_node > 1:
        mesh = ddp_qhooks.fsdp.node_mesh(per_node, "cpu")
        model = _model(task, seed, mesh["local"])
        state = ddp_qhooks.fsdp.register_between_nodes(model, mesh, cfg["codec"], bits=cfg["bits"],
                                                       error_feedback=cfg["error_feedback"], seed=seed,
                                                       **cfg["options"])
    else:
        model = _model(task, seed, DeviceMesh.from_group(dist.group.WORLD, "cpu"))
        state = ddp_qhooks.fsdp.register(model, cfg["codec"], cfg["bits"], error_feedback=cfg["error_feedback"],
                                         seed=seed, **cfg["options"])
    opt, sched = adamw_recipe(model, args.steps, lr=args.lr)
    t0, losses = time.perf_counter(), []
    for step in range(args.steps):
        x, y = task.batch_for(1_000_003 * seed + step)
        loss = task.loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    out["val_loss"] = task.evaluate(model)  # every rank: the forward all-gathers the parameters
    out["train_loss"] = statistics.fmean(losses[-20:])
    out["train_s"] = time.perf_counter() - t0
    if state is not None:
        s = state.stats()
        out["bytes_sent"] = s["wire_bytes_sent"]
        if per_node > 1:  # the engine's all-gather between hosts: (nodes - 1) payloads per rank
            out["fp32_bytes_sent"] = s["fp32_bytes"] * (world // per_node - 1)
        else:
            out["fp32_bytes_sent"] = s["fp32_reduce_scatter_wire_bytes"]
    return out


def _entry(rank, world, port, configs, seed, args, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        runs = []
        for spec in configs:
            if rank == 0:
                print(f"  seed {seed}: {spec} ...", file=sys.stderr, flush=True)
            runs.append(_train(rank, world, spec, seed, args))
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(runs, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(args) -> list:
    world = args.nodes * args.procs_per_node if args.procs_per_node > 1 else args.world
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            out = os.path.join(tmp, f"seed{seed}.json")
            mp.start_processes(_entry, args=(world, port, args.configs, seed, args, out), nprocs=world, join=True,
                               start_method="spawn")
            with open(out) as f:
                runs += json.load(f)
    return runs


def table(runs: list) -> str:
    base = {r["seed"]: r["val_loss"] for r in runs if r["config"] == "fp32"}
    lines = ["| config | seed | val loss | vs fp32 | bytes sent per rank | fp32 bytes of the same exchange | fewer |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        diff = f"{100 * (r['val_loss'] / base[r['seed']] - 1):+.2f} %" if r["seed"] in base else "–"
        sent, fp32 = r.get("bytes_sent"), r.get("fp32_bytes_sent")
        lines.append(f"| {r['config']} | {r['seed']} | {r['val_loss']:.4f} | {diff} | "
                     f"{'–' if sent is None else f'{sent:,}'} | {'–' if fp32 is None else f'{fp32:,}'} | "
                     f"{'–' if not sent else f'{fp32 / sent:.2f}x'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ddp_qhooks.tools.study_fsdp", description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["fp32", "stochastic:4"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16, help="minibatch per rank")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help="AdamW peak learning rate")
    p.add_argument("--world", type=int, default=2, help="ranks (flat mode)")
    p.add_argument("--nodes", type=int, default=2, help="simulated hosts (hierarchical mode)")
    p.add_argument("--procs-per-node", type=int, default=1, help="ranks per host; > 1: the hierarchical mode")
    p.add_argument("--output", default="", help="write the runs as JSON to this file")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "world", "nodes", "procs_per_node"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for c in args.configs:
        try:
            kind = parse_config(c)["kind"]
        except Exception as exc:
            p.error(f"--configs: {exc}")
        if kind not in ("baseline", "ours"):
            p.error(f"--configs: {c!r} is not an FSDP configuration; use fp32 or <codec>[:<bits>][,option=value...]")
    runs = run(args)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(runs, f, indent=1)
    print(table(runs))


if __name__ == "__main__":
    main()
