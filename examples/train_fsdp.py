"""FSDP2 (``fully_shard``) training with the quantized reduce-scatter of ``ddp_qhooks.fsdp``.

    torchrun --nproc-per-node=2 examples/train_fsdp.py                      # stochastic 4-bit + EF
    torchrun --nproc-per-node=2 examples/train_fsdp.py --compare none       # and fp32 (codec none) first
    torchrun --nproc-per-node=2 examples/train_fsdp.py --residual-dtype bf16
    torchrun --nproc-per-node=4 examples/train_fsdp.py --ranks-per-node 2  # hierarchical: 2 "nodes" x 2
    python examples/train_fsdp.py                                           # no launcher: 2 local workers
    torchrun ... examples/train_fsdp.py --checkpoint-dir ckpt --resume      # continue from ckpt's latest

A small causal transformer language model (every block its own FSDP module, the root owns the
embeddings and the head) learns a synthetic token stream: a fixed random first-order Markov chain
with a few likely successors per token, so nothing is downloaded and the loss has a known floor.
Every rank sees different sequences.  Gloo on CPU, NCCL on GPUs.

Checkpoints (``--checkpoint-dir``, every ``--checkpoint-every`` steps and at the end): model and
optimizer with torch.distributed.checkpoint (each rank writes its shards), and per rank the hook's
``state_dict()`` with the data generator's state (``torch.load(weights_only=True)``); ``--resume``
continues from the latest one bitwise as if never stopped.
"""
import argparse
import hashlib
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import ddp_qhooks


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, ctx: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx):
        t = idx.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf"), device=idx.device), 1)
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for b in self.blocks:
            x = b(x, mask)
        return self.head(self.ln(x))


def markov_chain(vocab: int, fanout: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)  # the same chain on every rank
    succ = torch.stack([torch.randperm(vocab, generator=g)[:fanout] for _ in range(vocab)])
    probs = torch.zeros(vocab, vocab)
    probs.scatter_(1, succ, torch.tensor([0.55, 0.25, 0.12, 0.08])[:fanout].expand(vocab, fanout))
    return probs


def batch(probs, n: int, t: int, gen) -> torch.Tensor:
    out = torch.empty(n, t + 1, dtype=torch.long)
    out[:, 0] = torch.randint(0, probs.shape[0], (n,), generator=gen)
    for i in range(t):
        out[:, i + 1] = torch.multinomial(probs[out[:, i]], 1, generator=gen).squeeze(1)
    return out


def save(ckpt_dir: str, step: int, model, opt, state, gen, rank: int) -> None:
    where = os.path.join(ckpt_dir, f"step{step}")
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=where)
    torch.save({"hook": state.state_dict(), "gen": gen.get_state()}, os.path.join(where, f"hook{rank}.pt"))
    dist.barrier()  # every rank's files are there before latest.json points at them
    if rank == 0:
        with open(os.path.join(ckpt_dir, "latest.json.tmp"), "w") as f:
            json.dump({"step": step, "dir": where}, f)
        os.replace(os.path.join(ckpt_dir, "latest.json.tmp"), os.path.join(ckpt_dir, "latest.json"))


def resume(ckpt_dir: str, model, opt, state, gen, rank: int) -> int:
    """The step to continue from (0 without a checkpoint); loads model, optimizer, hook, data."""
    latest = os.path.join(ckpt_dir, "latest.json")
    if not os.path.exists(latest):
        return 0
    with open(latest) as f:
        info = json.load(f)
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=info["dir"])
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    own = torch.load(os.path.join(info["dir"], f"hook{rank}.pt"), weights_only=True)
    state.load_state_dict(own["hook"])
    gen.set_state(own["gen"])
    if rank == 0:
        print(f"resumed from {info['dir']} at step {info['step']}", flush=True)
    return int(info["step"])


def train(rank: int, world: int, args) -> None:
    use_cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    probs = markov_chain(args.vocab)
    for codec in ([args.compare] if args.compare else []) + [args.codec]:
        torch.manual_seed(0)
        model = TinyLM(args.vocab, args.width, args.layers, args.heads, args.ctx).to(device)
        quantized = codec not in ("none", "bf16", "fp16")
        bits = {"bits": args.bits} if quantized else {}
        # "auto": torchrun's LOCAL_WORLD_SIZE, the workers of this node
        per_node = None if args.ranks_per_node == "auto" else args.ranks_per_node and int(args.ranks_per_node)
        mesh = ddp_qhooks.fsdp.node_mesh(per_node) if args.ranks_per_node else None
        for block in model.blocks:
            fully_shard(block, mesh=None if mesh is None else mesh["local"])
        fully_shard(model, mesh=None if mesh is None else mesh["local"])
        if mesh is None:
            # the one line (collective: every rank):
            state = ddp_qhooks.fsdp.register(model, codec, **bits,
                                             residual_dtype=args.residual_dtype if quantized else None)
        else:  # hierarchical: fp32 reduce-scatter inside each node, quantized between nodes
            state = ddp_qhooks.fsdp.register_between_nodes(model, mesh, codec, **bits)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        gen = torch.Generator().manual_seed(10_000 + rank)
        t0, tail = time.perf_counter(), []
        main_run = codec == args.codec and args.checkpoint_dir
        start = resume(args.checkpoint_dir, model, opt, state, gen, rank) if main_run and args.resume else 0
        for step in range(start, args.steps):
            seq = batch(probs, args.batch, args.ctx, gen).to(device)
            logits = model(seq[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, args.vocab), seq[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            mean = float(mean) / world
            if step >= args.steps - 10:
                tail.append(mean)
            if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
                print(f"[{codec}] step {step:4d}  loss {mean:.4f}", flush=True)
            if main_run and ((step + 1) % args.checkpoint_every == 0 or step + 1 == args.steps):
                save(args.checkpoint_dir, step + 1, model, opt, state, gen, rank)
        if main_run:  # the same value after an interrupted and resumed run as after an uninterrupted one
            digest = hashlib.sha256()
            for p in model.parameters():
                digest.update(p.detach().full_tensor().cpu().numpy().tobytes())
            print(f"[rank {rank}] params_sha256 {digest.hexdigest()}", flush=True)
        s = state.stats()
        if rank == 0 and mesh is not None:
            print(f"[{codec}] hierarchical ({args.ranks_per_node} ranks per node): final loss (mean of last 10 "
                  f"steps) {sum(tail) / max(1, len(tail)):.4f}, {time.perf_counter() - t0:.1f} s; bytes sent between "
                  f"nodes per rank {s['wire_bytes_sent']:,} (fp32 values exchanged: {s['fp32_bytes']:,} B), residual "
                  f"memory {sum(v.numel() * 4 for v in state.memory.residuals().values()):,} B", flush=True)
        elif rank == 0:
            res = state.residual_nbytes()
            print(f"[{codec}] {state.codec.bits}-bit: final loss (mean of last 10 steps) "
                  f"{sum(tail) / max(1, len(tail)):.4f}, {time.perf_counter() - t0:.1f} s, {s['modules']} FSDP "
                  "modules\n"
                  f"  bytes sent per rank {s['wire_bytes_sent']:,} vs fp32 reduce-scatter "
                  f"{s['fp32_reduce_scatter_wire_bytes']:,} ({s['compression_ratio']:.2f}x less), "
                  f"nmse {s['nmse']:.4f}\n"
                  f"  residual memory per rank: {res['live']:,} B live + {res['staging']:,} B staging "
                  f"({s['residual_dtype']}); FSDP's own sharded params {s['sharded_param_bytes']:,} B, "
                  f"sharded grads {s['sharded_grad_bytes']:,} B", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--codec", default="stochastic")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--residual-dtype", default=None, help="None/fp32, bf16, fp16, int8 ... int2")
    p.add_argument("--compare", default=None, help="train with this codec first (e.g. none = fp32)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ctx", type=int, default=32)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--ranks-per-node", default=None,
                   help="hierarchical: FSDP inside groups of this many ranks, quantized exchange between them "
                        "('auto': torchrun's workers per node)")
    p.add_argument("--checkpoint-dir", default=None, help="write checkpoints here (DCP + the hook's state_dict)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir's latest checkpoint")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args()
    if args.ranks_per_node not in (None, "auto") and not str(args.ranks_per_node).isdigit():
        p.error(f"--ranks-per-node must be a positive integer or 'auto', got {args.ranks_per_node!r}")
    if args.checkpoint_dir:
        os.makedirs(args.checkpoint_dir, exist_ok=True)
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() and not args.cpu else "gloo")
        torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        try:
            train(dist.get_rank(), dist.get_world_size(), args)
        finally:
            dist.destroy_process_group()
    else:
        import socket

        import torch.multiprocessing as mp
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_spawned, args=(2, port, args), nprocs=2, start_method="spawn")


def _spawned(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train(rank, world, args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
