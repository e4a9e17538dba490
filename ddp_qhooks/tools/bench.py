"""Bandwidth benchmark: our hooks against DDP's fp32 allreduce and torch's built-in hooks, measured.

    python -m ddp_qhooks.bench                                   # as root: 2 namespaced hosts at 200 Mbit/s
    python -m ddp_qhooks.bench --loopback                        # 2 local processes, no link limit
    python -m ddp_qhooks.bench --netsim 200mbit,1gbit            # several link rates, speedup vs rate
    python -m ddp_qhooks.bench --model linear --netsim 200mbit   # one 5000x5000 weight: one big bucket
    python -m ddp_qhooks.bench --task fmnist --steps 300         # accuracy on Fashion-MNIST
    torchrun --nnodes=2 --nproc-per-node=1 ... -m ddp_qhooks.bench   # real hosts

Quantization pays only where the gradient exchange is bandwidth-bound.  Two processes on one
machine talk over loopback, which is not: there the bench measures the codecs' overhead, and the
codecs are usually slower than fp32.  So by default (root on Linux, iproute2 present) the ranks run in two
network namespaces joined by a link shaped to 200 Mbit/s (``--netsim``, tc tbf); otherwise the
bench says so before it runs on loopback.

Every configuration runs from the same initial weights and the same data, one after the other:

* ``fp32``: DDP's default allreduce (no hook), the baseline;
* ``fp16_hook`` / ``bf16_hook``: torch's ``fp16_compress_hook`` / ``bf16_compress_hook``;
* ``powersgd``: torch's PowerSGD (rank 1, error feedback, compression from the 3rd step);
* ``quant_pertensor`` / ``quant_perchannel``: torch's quantization hooks (they fail on Gloo in
  torch 2.13, so there they are skipped with a note);
* ours: ``<codec>[:<bits>][,option=value...]``, e.g. ``stochastic:4``, ``sign``,
  ``topk:8,ratio=0.01``, ``stochastic:2,block_size=256,ef=0`` (``ef=0``: no error feedback).

Measured per configuration: step time (median and 10-90 % spread of the slowest rank per step,
ranks aligned by a barrier before each step; local SGD rows: the mean over whole rounds, one
barrier before them, as a training loop runs them), compute time (the same steps under ``no_sync()``:
no communication), communication = step - compute, bytes sent per rank per step (our hooks: the
package's ``wire_bytes_sent``; fp32 / fp16 / bf16: the ring-allreduce volume 2(W-1)/W x size;
PowerSGD: computed from its matrix shapes; with ``--netsim``: also tc's counter of bytes that left
each host, IP/TCP headers included), speedup vs ``fp32``, the ideal speedup
``T_fp32 / (T_compute + T_comm_fp32 * bytes / bytes_fp32)`` and the fraction of it reached, and the
final training loss (``synthetic``) or test accuracy (``fmnist``).  The run ends with a verdict:
the fastest configuration at this link against fp32 and torch's fp16 hook.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import inspect
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import data
from ..codecs import CODECS
from ..integrations.local_sgd import LocalSGD, local_phase_hook

BUILTINS = ("fp32", "fp16_hook", "bf16_hook", "powersgd", "quant_pertensor", "quant_perchannel")
# torch's hooks that fail on a backend (torch 2.13): skipped there with this one-line note, not run
KNOWN_FAILING = {
    ("quant_pertensor", "gloo"): "torch's quantization_pertensor_hook fails on Gloo (it indexes all_gather's "
                                 "result as a stacked tensor: IndexError); skipped",
    ("quant_perchannel", "gloo"): "torch's quantization_perchannel_hook fails on Gloo (it indexes all_gather's "
                                  "result as a stacked tensor: IndexError); skipped",
}
# options that turn a configuration into local SGD / DiLoCo (ddp_qhooks.LocalSGD) instead of a gradient hook
LOCAL_OPTIONS = ("local_steps", "outer", "outer_lr", "outer_momentum", "fragments", "drift", "mu", "scaffold_option",
                 "participation", "overlap", "delay")
# the default run: the baselines and a few codecs, sized to finish in ~3 min on 2 cores at 200 Mbit/s
DEFAULT_CONFIGS = ["fp32", "fp16_hook", "stochastic:8", "stochastic:4", "stochastic:2", "ternary", "sign"]
# --configs all: every configuration of README's results tables that runs on Gloo
ALL_CONFIGS = ["fp32", "fp16_hook", "bf16_hook", "powersgd",
               "stochastic:8", "stochastic:4", "stochastic:2", "uniform:1", "stochastic:1,ef=0",
               "stochastic:4,ef=0", "uniform:2,block_size=256", "qsgd:4,block_size=512,ef=0",
               "ternary", "sign", "sign,ef=0", "topk:8,ratio=0.01", "topk:4,ratio=0.1,values=stochastic"]
DEFAULT_RATE = "200mbit"  # the emulated link of the default run (README's 25M table at 200 Mbit/s)
MODELS = ("mlp", "linear")
_FAILED: list = []
RESULT_KEYS = ("config", "kind", "status", "error", "step_s", "step_p10_s", "step_p90_s", "compute_s", "comm_s",
               "bytes_per_step", "bytes_source", "tc_bytes_per_step", "compression_ratio", "speedup_vs_fp32",
               "ideal_speedup", "fraction_of_ideal", "tc_vs_accounted", "final_loss", "test_accuracy", "val_loss", "note",
               "hook_s", "callback_s", "encode_hidden", "timeline", "fewer_bytes_than_fp32", "link")


# ================================================================================================
# configurations
# ================================================================================================
def parse_config(spec: str) -> dict:
    """``fp32`` / built-in name, or ``codec[:bits][,opt=value...]`` for this package's hooks."""
    spec = spec.strip()
    if spec in BUILTINS:
        return {"spec": spec, "kind": "torch" if spec != "fp32" else "baseline"}
    head, *opts = spec.split(",")
    codec, _, bits = head.partition(":")
    if codec not in CODECS:
        raise ValueError(f"unknown configuration {spec!r}: use one of {', '.join(BUILTINS)}, 'all', or "
                         f"<codec>[:<bits>][,option=value...] with codec one of {', '.join(CODECS)}")
    if bits and not bits.isdigit():
        raise ValueError(f"configuration {spec!r}: bits must be a whole number such as {codec}:4, got {bits!r}")
    options, ef, local = {}, True, {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq:
            raise ValueError(f"configuration {spec!r}: option {opt!r} must be key=value")
        if key == "ef":
            ef = value not in ("0", "false", "False", "no")
            continue
        (local if key in LOCAL_OPTIONS else options)[key] = _literal(value)
    cfg = {"spec": spec, "kind": "ours", "codec": codec, "bits": int(bits) if bits else 8, "options": options,
           "error_feedback": ef}
    from ..engine import QuantizedHookState
    QuantizedHookState(codec=codec, bits=cfg["bits"], error_feedback=ef, **options)  # validate now, clearly
    if local:
        if "local_steps" not in local:
            raise ValueError(f"configuration {spec!r}: {', '.join(sorted(local))} need local_steps=H (local SGD)")
        from ..integrations.local_sgd import LocalSGD
        probe = nn.Sequential(*[nn.Linear(1, 1) for _ in range(64)])
        LocalSGD(probe, codec=codec, bits=cfg["bits"], error_feedback=ef, **options, **local)  # validate
        cfg.update(kind="local", local=local)
    return cfg


def _literal(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"None": None, "True": True, "False": False}.get(text, text)


# ================================================================================================
# workloads
# ================================================================================================
class SyntheticTask:
    """A communication-bound MLP of about ``params`` parameters regressing a fixed random teacher."""

    def __init__(self, params: int, batch: int, rank: int, device):
        self.width = _width_for(params)
        self.dim, self.batch, self.rank, self.device = 64, batch, rank, device
        torch.manual_seed(1234)
        self.teacher = nn.Linear(self.dim, 10).to(device)

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        w = self.width
        return nn.Sequential(nn.Linear(self.dim, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w),
                             nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10)).to(self.device)

    def batch_for(self, step: int):
        g = torch.Generator().manual_seed(7919 * self.rank + step)
        x = torch.randn(self.batch, self.dim, generator=g).to(self.device)
        with torch.no_grad():
            y = self.teacher(x)
        return x, y

    def loss(self, out, y):
        return nn.functional.mse_loss(out, y)

    def evaluate(self, model):
        return None


class LinearTask(SyntheticTask):
    """One square ``nn.Linear(n, n)`` of about ``params`` parameters (25e6: n = 5000, a 100 MB fp32
    weight): a single parameter that fills one DDP bucket, like a language model's embedding or
    output matrix.  It regresses half its input reversed (0.5 * x.flip(1)), a fixed linear map."""

    def __init__(self, params: int, batch: int, rank: int, device):
        self.n = _side_for(params)
        self.batch, self.rank, self.device = batch, rank, device

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        layer = nn.Linear(self.n, self.n).to(self.device)
        with torch.no_grad():
            layer.weight.mul_(0.1)
        return layer

    def batch_for(self, step: int):
        g = torch.Generator().manual_seed(7919 * self.rank + step)
        x = torch.randn(self.batch, self.n, generator=g).to(self.device)
        return x, 0.5 * x.flip(1)


def dirichlet_share(labels: torch.Tensor, rank: int, world: int, alpha: float) -> torch.Tensor:
    """Indices of rank ``rank``'s share of a Dirichlet(``alpha``) split of ``labels`` over ``world``
    ranks: every class cut into ``world`` parts with proportions drawn from Dirichlet(alpha)."""
    import numpy as np
    rng = np.random.default_rng(0)  # one split for every seed: runs differ by their training only
    g = torch.Generator().manual_seed(0)
    share = []
    for c in range(int(labels.max()) + 1):
        idx = torch.nonzero(labels == c).view(-1)
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        cuts = (np.cumsum(rng.dirichlet([alpha] * world)) * idx.numel()).round().astype(int)
        lo = 0 if rank == 0 else int(cuts[rank - 1])
        share.append(idx[lo:int(cuts[rank])])
    share = torch.cat(share)
    if share.numel() == 0:
        raise ValueError(f"the Dirichlet({alpha}) split left rank {rank} of {world} without data; use a larger alpha")
    return share


class FashionMnistTask:
    """data.SmallCNN on Fashion-MNIST; each rank draws its own minibatches from the training set.

    ``noniid=p`` (0 <= p <= 1): a fraction p of every minibatch of rank r comes from its two "home"
    classes 2r mod 10 and 2r+1 mod 10, the rest from the whole set (p = 0: IID; p = 0.9: each rank
    sees mostly two classes, the client drift of federated settings).  ``dirichlet=alpha`` (> 0,
    with ``world``): the usual federated split instead: each class's training images are divided
    among the ``world`` ranks in proportions drawn from Dirichlet(alpha) (one fixed draw, the same
    for every seed and configuration), and rank r draws its minibatches from its own share only
    (alpha = 0.1: most ranks hold a few classes; large alpha: IID)."""

    def __init__(self, batch: int, rank: int, device, path=None, noniid: float = 0.0, dirichlet: float | None = None,
                 world: int = 1):
        if not 0.0 <= noniid <= 1.0:
            raise ValueError(f"noniid must be a fraction in [0, 1], got {noniid!r}")
        if dirichlet is not None and (noniid or not dirichlet > 0):
            raise ValueError(f"dirichlet must be a concentration > 0 and cannot be combined with noniid, got "
                             f"dirichlet={dirichlet!r}, noniid={noniid!r}")
        self.x, self.y = data.load("train", path)
        self.xt, self.yt = data.load("test", path)
        self.batch, self.rank, self.device = batch, rank, device
        self.noniid = noniid
        home = {(2 * rank) % 10, (2 * rank + 1) % 10}
        self.home = torch.nonzero(torch.isin(self.y, torch.tensor(sorted(home)))).view(-1)
        self.share = None if dirichlet is None else dirichlet_share(self.y, rank, world, dirichlet)

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return data.SmallCNN().to(self.device)

    def batch_for(self, step: int):
        g = torch.Generator().manual_seed(7919 * self.rank + step)
        idx = torch.randint(0, self.x.shape[0], (self.batch,), generator=g)
        if self.share is not None:
            idx = self.share[torch.randint(0, self.share.numel(), (self.batch,), generator=g)]
        if self.noniid:
            local = round(self.noniid * self.batch)
            idx[:local] = self.home[torch.randint(0, self.home.numel(), (local,), generator=g)]
        return self.x[idx].to(self.device), self.y[idx].to(self.device)

    def loss(self, out, y):
        return nn.functional.cross_entropy(out, y)

    @torch.no_grad()
    def evaluate(self, model):
        model.eval()
        correct = 0
        for a in range(0, self.xt.shape[0], 2000):
            correct += int((model(self.xt[a:a + 2000].to(self.device)).argmax(1).cpu() == self.yt[a:a + 2000]).sum())
        model.train()
        return correct / self.xt.shape[0]


# ================================================================================================
# the worker: every configuration, one after the other
# ================================================================================================
def _register(ddp: DDP, cfg: dict, steps_before_compression: int):
    from torch.distributed.algorithms.ddp_comm_hooks import (
        default_hooks,
        powerSGD_hook,
        quantization_hooks,
    )

    import ddp_qhooks
    spec = cfg["spec"]
    if spec == "fp32":
        return None
    if spec == "fp16_hook":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        return None
    if spec == "bf16_hook":
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
        return None
    if spec == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1,
                                            start_powerSGD_iter=max(2, steps_before_compression), use_error_feedback=True,
                                            warm_start=True, min_compression_rate=1)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return None
    if spec == "quant_pertensor":
        ddp.register_comm_hook(None, quantization_hooks.quantization_pertensor_hook)
        return None
    if spec == "quant_perchannel":
        ddp.register_comm_hook(None, quantization_hooks.quantization_perchannel_hook)
        return None
    return ddp_qhooks.register(ddp, cfg["codec"], bits=cfg["bits"], error_feedback=cfg["error_feedback"], **cfg["options"])


def _analytic_bytes(spec: str, model: nn.Module, world: int) -> tuple[float | None, str]:
    numel = sum(p.numel() for p in model.parameters())
    ring = 2 * (world - 1) / world
    if spec == "fp32":
        return ring * 4 * numel, "ring allreduce"
    if spec in ("fp16_hook", "bf16_hook"):
        return ring * 2 * numel, "ring allreduce"
    if spec == "powersgd":
        total = 0
        for p in model.parameters():
            if p.dim() <= 1:
                total += 4 * p.numel()
            else:
                n, m = p.shape[0], p[0].numel()
                total += 4 * (n + m)  # rank-1 P and Q factors
        return ring * total, "computed from PowerSGD's matrix shapes"
    return None, ""


def worker_device(backend: str, local_rank: int | None = None) -> torch.device:
    """Where a rank's model, batches and every tensor the bench itself all-reduces live: NCCL
    reduces CUDA tensors only, so under NCCL ``cuda:LOCAL_RANK``; under Gloo the CPU."""
    if backend == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank)
    return torch.device("cpu")


def _max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise maximum over ranks, reduced on ``device`` (the backend's device)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _mean_over_ranks(value: float, device: torch.device) -> float:
    """Mean of one number over ranks, reduced on ``device`` (the backend's device)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0]) / dist.get_world_size()


def _time_steps(ddp, task, opt, start, count, sync: bool, after_step=None, device=torch.device("cpu"), idle_s=0.0,
                align: bool = True, losses=None):
    """Per-step seconds of the slowest rank, ranks aligned by a barrier before each step (with
    ``align=False`` before the first only: local SGD's steps between rounds need no collective, and
    one per step would wait behind a round in flight on the link); ``after_step()`` (local SGD's
    outer synchronization) runs inside the timed step; ``idle_s``: a wait after the backward pass
    with the host CPU idle (``--idle-ms``); ``losses``: a list to append every step's loss to."""
    times, loss = [], None
    for step in range(start, start + count):
        x, y = task.batch_for(step)
        if align or step == start:
            dist.barrier()
        t0 = time.perf_counter()
        if sync:
            out = ddp(x)
            loss = task.loss(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        else:
            with ddp.no_sync():
                out = ddp(x)
                loss = task.loss(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
        if idle_s:
            time.sleep(idle_s)
        opt.step()
        if after_step is not None:
            after_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step is done when the GPU is, not when it is queued
        times.append(time.perf_counter() - t0)
        if losses is not None:
            losses.append(float(loss.detach()))
    return _max_over_ranks(times, device), loss


def encode_hidden(timeline: list) -> float | None:
    """Fraction of the time spent encoding buckets 1..K-1 (inside the hook) during which a collective
    of an earlier bucket of the same step was in flight (issued, not yet completed): the encoding
    that overlaps communication instead of delaying it.  None with fewer than two buckets."""
    spans = [(e["enter"], e["launched"], e["received"]) for e in timeline
             if None not in (e["enter"], e["launched"], e["received"])]
    total = hidden = 0.0
    for k in range(1, len(spans)):
        a, b, _ = spans[k]
        busy = sorted((max(a, s[1]), min(b, s[2])) for s in spans[:k] if s[1] < b and s[2] > a)
        covered, end = 0.0, a
        for lo, hi in busy:  # length of the union of the in-flight intervals inside [a, b]
            lo = max(lo, end)
            if hi > lo:
                covered += hi - lo
                end = hi
        total += b - a
        hidden += covered
    return hidden / total if total > 0 else None


def format_timeline(config: str, timeline: list) -> str:
    """One line per bucket: when encoding ran (E), the collective was in flight (~) and decoding /
    later phases ran (D), on a 60-column axis over the step's hook-to-done span."""
    if not timeline:
        return f"{config}: no timeline"
    end = max((e["done"] or 0.0) for e in timeline) or 1.0
    cols = 60

    def at(t):
        return min(cols - 1, int(t / end * cols))
    lines = [f"{config}: last timed step, {1000 * end:.1f} ms from the first hook call to the last mean "
             f"(E encode in hook, ~ collective in flight, D decode/later phases)"]
    for e in timeline:
        bar = [" "] * cols
        if None not in (e["enter"], e["launched"], e["received"], e["done"]):
            for i in range(at(e["launched"]), at(e["received"]) + 1):
                bar[i] = "~"
            for i in range(at(e["received"]), at(e["done"]) + 1):
                bar[i] = "D"
            for i in range(at(e["enter"]), at(e["launched"]) + 1):
                bar[i] = "E"
        lines.append(f"  bucket {e['bucket']:>2} {e['numel']:>10,} {e['mode'] or '':>12} |{''.join(bar)}| "
                     f"hook {1000 * (e['launched'] - e['enter']):.1f} ms, callbacks {1000 * e['callback_s']:.1f} ms"
                     if e["launched"] is not None and e["enter"] is not None else f"  bucket {e['bucket']}: incomplete")
    return "\n".join(lines)


def _progress(rank, text):
    beat = os.environ.get("DDP_QHOOKS_BENCH_HEARTBEAT")
    if beat:  # the launcher's watchdog: a group that stops making progress is reported as hung
        with open(f"{beat}.{rank}", "w") as f:
            f.write(text)
    if rank == 0 and os.environ.get("DDP_QHOOKS_BENCH_QUIET") != "1":
        end = "\r" if sys.stderr.isatty() else "\n"
        print(f"\x1b[2K{text}" if end == "\r" else text, end=end, file=sys.stderr, flush=True)


# Every rank builds the same initial model (same seed), so DDP's broadcast of it at construction is
# skipped where torch allows: 100 MB at 200 Mbit/s is 4 s per configuration.
_NO_INIT_SYNC = {"init_sync": False} if "init_sync" in inspect.signature(DDP.__init__).parameters else {}


def run_worker(args) -> list[dict] | None:
    rank = dist.get_rank()
    backend = dist.get_backend()
    device = worker_device(backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.task == "fmnist":
        task = FashionMnistTask(args.batch, rank, device, args.data)
    elif args.model == "linear":
        task = LinearTask(int(args.params), args.batch, rank, device)
    elif args.task == "lm":  # tools/lm.py; reports val_loss (lower is better) instead of test_accuracy
        from .lm import LmTask
        task = LmTask(args.batch, rank, device)
    else:
        task = SyntheticTask(int(args.params), args.batch, rank, device)
    configs = [parse_config(c) for c in args.configs]
    ifname = os.environ.get("GLOO_SOCKET_IFNAME") if args.netsim else None
    from .netsim import tc_bytes_sent_here
    if args.fsdp:
        from .bench_fsdp import run_fsdp_worker
        return run_fsdp_worker(args, task, configs, device, ifname)
    idle_s = args.idle_ms / 1000

    if args.compute_s is not None:  # measured by an earlier group of this invocation
        compute_s = args.compute_s
    else:  # compute-only time (no communication), on the fp32 model
        model = task.model()
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **_NO_INIT_SYNC)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        _time_steps(ddp, task, opt, 0, 1, sync=False, device=device, idle_s=idle_s)
        compute_times, _ = _time_steps(ddp, task, opt, 1, max(3, min(args.steps, 10)), sync=False, device=device,
                                         idle_s=idle_s)
        compute_s = statistics.median(compute_times)
        del ddp, model, opt

    rows = []
    for i, cfg in enumerate(configs):
        row = {k: None for k in RESULT_KEYS}
        row.update(config=cfg["spec"], kind=cfg["kind"], status="ok", compute_s=compute_s, link=args.netsim)
        if (cfg["spec"], backend) in KNOWN_FAILING:
            # not run: the hook raises, and in-process (torchrun) a raising hook also leaves Gloo's
            # process group unusable (the next collective hangs)
            row.update(status="skipped", error=KNOWN_FAILING[cfg["spec"], backend], compute_s=None)
            rows.append(row)
            continue
        try:
            model = task.model()
            ddp_kw = {}
            if cfg["spec"] == "powersgd" and dist.get_backend() == "gloo":
                # PowerSGD launches its next collectives from completion callbacks; with several
                # buckets, Gloo ranks then issue them in different orders and hang.  One bucket.
                ddp_kw["bucket_cap_mb"] = 1e6
                row["note"] = "one DDP bucket (PowerSGD hangs on Gloo with several)"
            ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **ddp_kw, **_NO_INIT_SYNC)
            after = None
            timed = args.steps
            if cfg["kind"] == "local":
                ddp.register_comm_hook(None, local_phase_hook)  # no gradient exchange: local steps
                state = LocalSGD(model, codec=cfg["codec"], bits=cfg["bits"], error_feedback=cfg["error_feedback"],
                                 **cfg["options"], **cfg["local"])
                after = state.step
                h = state.local_steps
                timed = -(-max(args.steps, 2 * h) // h) * h  # whole rounds: the mean includes every sync
                row["note"] = (f"local SGD, H={h}: step time and bytes are means over {timed} steps "
                               f"({timed // h} synchronizations), not medians")
            else:
                state = _register(ddp, cfg, args.warmup)
            opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
            if cfg["kind"] == "local":
                state.attach(opt)  # drift corrections act on the inner gradients
            for s in range(args.warmup):
                _progress(rank, f"[{i + 1}/{len(configs)}] {cfg['spec']}: warm-up {s + 1}/{args.warmup}")
                _time_steps(ddp, task, opt, s, 1, sync=True, device=device, idle_s=idle_s)
            if cfg["kind"] == "local":
                state.sync()  # start the timed window at a round boundary (all fragments just synced)
                state.inner_steps = 0
            before = state.stats() if state is not None else None
            tc0 = tc_bytes_sent_here(ifname) if ifname else None
            times, losses = [], []
            if cfg["kind"] == "local":  # whole rounds, no collective between steps: as a training loop runs them
                _progress(rank, f"[{i + 1}/{len(configs)}] {cfg['spec']}: {timed} steps")
                times, _ = _time_steps(ddp, task, opt, args.warmup, timed, sync=True, after_step=after, device=device,
                                       idle_s=idle_s, align=False, losses=losses)
            else:
                for s in range(timed):
                    _progress(rank, f"[{i + 1}/{len(configs)}] {cfg['spec']}: step {s + 1}/{timed}")
                    t, _ = _time_steps(ddp, task, opt, args.warmup + s, 1, sync=True, after_step=after, device=device,
                                       idle_s=idle_s, losses=losses)
                    times += t
            tc1 = tc_bytes_sent_here(ifname) if ifname else None
            stats_after = state.stats() if state is not None else None  # the timed steps only
            for s in range(args.train_steps):
                if s % 20 == 0:
                    _progress(rank, f"[{i + 1}/{len(configs)}] {cfg['spec']}: training {s + 1}/{args.train_steps}")
                _time_steps(ddp, task, opt, args.warmup + timed + s, 1, sync=True, after_step=after, device=device,
                            losses=losses)
            if cfg["kind"] == "local":
                state.sync()  # evaluate the synchronized model
            row["final_loss"] = _mean_over_ranks(statistics.fmean(losses[-5:]), device)
            row["val_loss" if args.task == "lm" else "test_accuracy"] = task.evaluate(model)
            ordered = sorted(times)
            row["step_times_s"] = list(times)  # per timed step, the slowest rank's (bench.json)
            row["step_s"] = statistics.fmean(times) if cfg["kind"] == "local" else statistics.median(times)
            row["step_p10_s"] = ordered[int(0.1 * (len(ordered) - 1))]
            row["step_p90_s"] = ordered[int(math.ceil(0.9 * (len(ordered) - 1)))]
            row["comm_s"] = max(0.0, row["step_s"] - compute_s)
            if state is not None:
                row["bytes_per_step"] = (stats_after["wire_bytes_sent"] - before["wire_bytes_sent"]) / timed
                row["bytes_source"] = "package (wire_bytes_sent)"
                row["compression_ratio"] = stats_after["compression_ratio"]
                row["hook_s"] = (stats_after["hook_seconds"] - before["hook_seconds"]) / timed
                row["callback_s"] = (stats_after["callback_seconds"] - before["callback_seconds"]) / timed
                hook_state = state.hook if cfg["kind"] == "local" else state
                row["timeline"] = hook_state.timeline()  # the last timed step (last synchronization)
                row["encode_hidden"] = encode_hidden(row["timeline"])
            else:
                row["bytes_per_step"], row["bytes_source"] = _analytic_bytes(cfg["spec"], model, dist.get_world_size())
            if tc0 is not None and tc1 is not None:
                row["tc_bytes_per_step"] = (tc1 - tc0) / timed
            del ddp, model, opt, state
        except Exception as exc:  # a hook that fails here (e.g. torch's quantization hook on Gloo)
            # keep the failed DDP alive until exit: destroying a reducer whose hook raised mid-backward
            # aborts the process on Gloo (torch 2.13)
            _FAILED.extend(v for k, v in list(locals().items()) if k in ("ddp", "state", "model", "opt"))
            row["status"] = "failed"
            row["error"] = _innermost_error(exc)
            if args.verbose:
                traceback.print_exc()
            dist.barrier()  # both ranks fail the same way; resynchronise before the next config
        rows.append(row)
    _progress(rank, "done")
    if rank == 0 and sys.stderr.isatty():
        print(file=sys.stderr)
    _derive(rows)
    return rows if rank == 0 else None


def _innermost_error(exc: BaseException) -> str:
    """The root cause of an exception raised through DDP's callback wrappers, on one line."""
    import re
    text = f"{type(exc).__name__}: {exc}"
    causes = re.findall(r"([A-Za-z]*Error: [^\n]+)", text)
    last = causes[-1] if causes else text.splitlines()[0]
    while "when running the callback: " in last:
        last = last.split("when running the callback: ", 1)[1]
    return last[:160]


# Bytes on the wire per byte of payload over TCP on a 1500-byte MTU Ethernet link (what tc counts):
# full segments carry 1448 payload bytes in 1514-byte frames (14 Ethernet + 20 IP + 32 TCP with
# timestamps).  ACKs for the peer's data add well under 1 % here (receive offload acknowledges many
# segments at once; measured).  Used to compare the package's byte accounting with tc.
TCP_FRAMING = 1 + 66 / 1448


def _derive(rows: list[dict], ranks_per_host: int = 1, prefer_tc: bool = False) -> None:
    """Speedups and the ideal, relative to the fp32 row of the same run.

    With several ranks per simulated host, tc counts what the whole host sends over its link (not
    the same-host traffic, which stays on loopback), while the package counts per rank: the two are
    not comparable, so ``tc_vs_accounted`` is left out and the ideal uses the link bytes tc saw.
    ``prefer_tc``: the ideal uses tc's bytes wherever it counted them (FSDP: what Gloo's own
    reduce-scatter sends is not the textbook volume)."""
    base = next((r for r in rows if r["config"] == "fp32" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] != "ok" or base is None:
            continue
        r["speedup_vs_fp32"] = base["step_s"] / r["step_s"]
        if r.get("tc_bytes_per_step") and r["bytes_per_step"] and ranks_per_host == 1:
            r["tc_vs_accounted"] = r["tc_bytes_per_step"] / (r["bytes_per_step"] * TCP_FRAMING) - 1
        measure = "bytes_per_step"
        if (ranks_per_host > 1 or prefer_tc) and r.get("tc_bytes_per_step") and base.get("tc_bytes_per_step"):
            measure = "tc_bytes_per_step"
        if base["bytes_per_step"] and r["bytes_per_step"]:
            r["fewer_bytes_than_fp32"] = base["bytes_per_step"] / r["bytes_per_step"]
        if base[measure] and r[measure] is not None:
            frac = r[measure] / base[measure]
            if r["compression_ratio"] is None:
                r["compression_ratio"] = 1 / frac if frac > 0 else None
            comm_fp32 = max(0.0, base["step_s"] - base["compute_s"])
            r["ideal_speedup"] = base["step_s"] / (base["compute_s"] + comm_fp32 * frac)
            r["fraction_of_ideal"] = r["speedup_vs_fp32"] / r["ideal_speedup"]


# ================================================================================================
# output
# ================================================================================================
COLUMNS = [("config", "config", "{}"), ("status", "status", "{}"), ("step_s", "step ms", "ms"),
           ("step_p10_s", "p10 ms", "ms"), ("step_p90_s", "p90 ms", "ms"), ("comm_s", "comm ms", "ms"),
           ("bytes_per_step", "MB/step/rank", "mb"), ("tc_bytes_per_step", "tc MB/step", "mb"),
           ("tc_vs_accounted", "tc vs acct", "{:+.1%}"),
           ("compression_ratio", "ratio", "{:.1f}x"), ("fewer_bytes_than_fp32", "bytes ÷", "{:.1f}x"),
           ("speedup_vs_fp32", "speedup", "{:.2f}x"),
           ("ideal_speedup", "ideal", "{:.2f}x"), ("fraction_of_ideal", "of ideal", "{:.0%}"),
           ("hook_s", "hook ms", "ms"), ("callback_s", "cb ms", "ms"), ("encode_hidden", "enc hidden", "{:.0%}"),
           ("final_loss", "loss", "{:.4g}"), ("test_accuracy", "test acc", "{:.2%}"), ("val_loss", "val loss", "{:.4f}")]


# the default table: what a person reads first (the full table goes to bench.md / .csv / .json, or --wide)
COMPACT = [("config", "config", "{}"), ("status", "status", "{}"), ("step_s", "step ms", "ms"),
           ("speedup_vs_fp32", "speedup", "{:.2f}x"), ("ideal_speedup", "ideal", "{:.2f}x"),
           ("fraction_of_ideal", "of ideal", "{:.0%}"), ("fewer_bytes_than_fp32", "bytes ÷", "{:.1f}x"),
           ("final_loss", "loss", "{:.4g}"), ("test_accuracy", "test acc", "{:.2%}"), ("val_loss", "val loss", "{:.4f}")]
LEGEND = ("speedup: fp32 step time / this step time.  ideal: the speedup if only the bytes shrank: "
          "T_fp32 / (T_compute + T_comm_fp32 x bytes / bytes_fp32).  of ideal: speedup / ideal (usually < 100 %: "
          "the overheads of encoding and of the exchange).  bytes ÷: fp32 allreduce's bytes per step / this row's.")


def _cell(row, key, fmt) -> str:
    v = row.get(key)
    if key == "status" and v != "ok":
        return "skipped (below)" if v == "skipped" else "FAILED (below)"
    if v is None:
        return "–"
    if fmt == "ms":
        return f"{1000 * v:.1f}"
    if fmt == "mb":
        return f"{v / 1e6:.3f}"
    return fmt.format(v)


def _links(rows: list[dict]) -> list:
    """The links measured, in order (None: loopback or real hosts)."""
    out = []
    for r in rows:
        if r.get("link") not in out:
            out.append(r.get("link"))
    return out


def _link_name(result: dict, link) -> str:
    m = result["meta"]
    if link:
        return f"netsim {link} between {m.get('nodes') or 2} namespaced hosts"
    return "loopback (local processes)" if m.get("launch") == "local processes" else m.get("launch", "")


def format_table(result: dict, markdown: bool, compact: bool = False) -> str:
    """The results as a text or Markdown table, one per link, with notes; ``compact``: the few
    columns of the default run's printout and a legend."""
    links = _links(result["rows"])
    parts = []
    for link in links:
        rows = [r for r in result["rows"] if r.get("link") == link]
        table = _format_rows(rows, result["meta"], markdown, compact)
        parts.append(f"{_link_name(result, link)}:\n{table}" if len(links) > 1 else table)
    notes = _notes(result, compact)
    if markdown:
        return "\n\n".join(parts) + "".join(f"\n\n{n}" for n in notes)
    return "\n\n".join(parts) + "".join("\n" + textwrap.fill(n, 100, subsequent_indent="  ") for n in notes)


def _format_rows(rows, meta, markdown: bool, compact: bool) -> str:
    columns = COMPACT if compact else COLUMNS
    cols = [c for c in columns if any(r.get(c[0]) is not None for r in rows) or c[0] == "config"]
    if all(r["status"] == "ok" for r in rows):
        cols = [c for c in cols if c[0] != "status"]
    elif ("status", "status", "{}") not in cols:
        cols.insert(1, ("status", "status", "{}"))
    head = [c[1] for c in cols]
    body = [[_cell(r, k, f) for k, _, f in cols] for r in rows]
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                         ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in [head] + body)


def _notes(result: dict, compact: bool) -> list[str]:
    rows, meta = result["rows"], result["meta"]
    notes, seen = [], set()
    for r in rows:
        if r["status"] == "skipped" and r["config"] not in seen:
            seen.add(r["config"])
            notes.append(f"{r['config']}: {r['error']} (backend {meta['backend']}, torch {meta['torch']})")
    notes += [f"{r['config']} fails on this backend ({meta['backend']}, torch {meta['torch']}): {r['error']}"
              for r in rows if r["status"] == "failed"]
    notes += sorted({f"{r['config']}: {r['note']}" for r in rows if r.get("note")})
    over = [r["config"] for r in rows if (r.get("fraction_of_ideal") or 0) > 1.05]
    if over and meta.get("compute_s"):
        notes.append(f"of ideal above 100 % ({', '.join(over)}): the ideal uses one compute time "
                     f"({_ms(meta['compute_s'])} ms/step, measured with the first configuration); when this "
                     "machine's load changes during the run, the compute time changes too: read it as approximate.")
    if compact:
        return notes + [LEGEND]
    if meta.get("ranks_per_host", 1) > 1 and any(r.get("tc_bytes_per_step") for r in rows):
        notes.append(f"{meta['ranks_per_host']} ranks per host: tc MB/step is what host 0 sent over its "
                     "link (all its ranks; same-host traffic stays on loopback); MB/step/rank is the package's "
                     "per-rank count (hierarchical: inter-node payloads only); the ideal uses tc's bytes")
    if any(r.get("tc_vs_accounted") is not None for r in rows):
        notes.append(f"tc vs acct: tc's bytes sent per step vs the accounted bytes x {TCP_FRAMING:.4f} "
                     "(TCP/IP/Ethernet framing of 1448-byte segments on a 1500-byte MTU link)")
    if any(r.get("kind") == "local" for r in rows):
        notes.append("ratio: payload compression of one exchange; bytes ÷: fp32 DDP's bytes per step / this row's "
                     "(local SGD exchanges once every H steps)")
    if any(r.get("hook_s") is not None for r in rows):
        notes.append("hook ms: time per step inside the hook calls (encoding; DDP's autograd thread waits); cb ms: in "
                     "completion callbacks (decoding, re-encoding; on Gloo's threads); enc hidden: share of the "
                     "encoding of buckets after the first that ran while an earlier bucket's collective was in flight "
                     "(last timed step; `--timeline` prints it)")
    notes.append(LEGEND)
    return notes


def describe(result: dict) -> str:
    m = result["meta"]
    links = _links(result["rows"]) or [m.get("netsim")]
    link = "; ".join(_link_name(result, k) for k in links)
    model = "SmallCNN" if m["task"] == "fmnist" else m.get("model", "mlp")
    model += " under FSDP2 (fully_shard)" if m.get("fsdp") else ""
    return (f"task={m['task']} model={model} params={m['params']:,} world={m['world']} backend={m['backend']} "
            f"({link}); {m['steps']} timed steps after {m['warmup']} warm-up; "
            f"compute {1000 * m['compute_s']:.1f} ms/step"
            + (f" (of which {m['idle_ms']:g} ms idle, --idle-ms)" if m.get("idle_ms") else "")
            + f"; torch {m['torch']}")


def verdict(result: dict, width: int = 100) -> str:
    """The run's conclusion in plain words, per link: the fastest configuration of this package
    against fp32 allreduce and torch's fp16 hook, the bytes saved and the loss/accuracy cost."""
    lines = []
    for link in _links(result["rows"]):
        rows = {r["config"]: r for r in result["rows"] if r.get("link") == link and r["status"] == "ok"}
        text = _verdict_one(result, link, rows)
        if result["meta"].get("fsdp"):
            text = text.replace("fp32 allreduce", "FSDP's fp32 reduce-scatter")
        lines.append(textwrap.fill(text, width))
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    ms = 1000 * seconds
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}"


def _steps_trained(meta: dict) -> int:
    return meta["warmup"] + meta["steps"] + (meta.get("train_steps") or 0)


def _verdict_one(result: dict, link, rows: dict) -> str:
    where = _link_name(result, link)
    fp32, fp16 = rows.get("fp32"), rows.get("fp16_hook")
    ours = [r for r in rows.values() if r["kind"] in ("ours", "local")]
    if fp32 is None or not ours:
        return f"Verdict ({where}): no verdict (it needs the fp32 row and at least one of this package's configurations)."
    best = min(ours, key=lambda r: r["step_s"])
    speed = fp32["step_s"] / best["step_s"]
    loopback = not link and result["meta"].get("launch") == "local processes"
    spread = [best.get("step_p10_s"), best.get("step_p90_s"), fp32.get("step_p10_s"), fp32.get("step_p90_s")]
    noisy = None not in spread and spread[0] <= spread[3] and spread[1] >= spread[2]
    text = [f"Verdict ({where}):"]
    clear = speed >= 1.05 and not noisy and not loopback
    close = [r["config"] for r in ours if r is not best and None not in (r.get("step_p10_s"), best.get("step_p90_s"))
             and r["step_p10_s"] <= best["step_p90_s"]]
    if clear:
        tie = (f" ({', '.join(close)} {'is' if len(close) == 1 else 'are'} within this run's noise of it: "
               "their 10-90 % step times overlap)") if close else ""
        text.append(f"{best['config']} is the fastest{tie}: {speed:.2f}x the training speed of fp32 allreduce "
                    f"({_ms(best['step_s'])} vs {_ms(fp32['step_s'])} ms per step)")
    elif speed >= 1.05:
        text.append(f"no clear speedup here: the fastest of this package's configurations, {best['config']}, "
                    f"measured {speed:.2f}x fp32 allreduce's speed ({_ms(best['step_s'])} vs {_ms(fp32['step_s'])} "
                    "ms per step), but "
                    + (f"its 10-90 % step times ({_ms(spread[0])}-{_ms(spread[1])} ms) overlap fp32's "
                       f"({_ms(spread[2])}-{_ms(spread[3])} ms): noise" if noisy else
                       "on loopback that is not a bandwidth saving (see below)") + ".")
    else:
        text.append(f"no speedup here: the fastest of this package's configurations, {best['config']}, runs at "
                    f"{speed:.2f}x fp32 allreduce's speed ({_ms(best['step_s'])} vs {_ms(fp32['step_s'])} ms "
                    "per step).")
    if fp16 is not None and clear:
        text.append(f"and {fp16['step_s'] / best['step_s']:.2f}x that of torch's fp16_compress_hook "
                    f"({_ms(fp16['step_s'])} ms),")
    elif fp16 is not None:
        text.append(f"Against torch's fp16_compress_hook ({_ms(fp16['step_s'])} ms): "
                    f"{fp16['step_s'] / best['step_s']:.2f}x its speed.")
    if clear:
        text[-1] = text[-1].rstrip(",") + ","
    if best.get("bytes_per_step") and fp32.get("bytes_per_step"):
        text.append(("sending" if clear else "It sends") +
                    f" {fp32['bytes_per_step'] / best['bytes_per_step']:.1f}x fewer bytes "
                    f"({best['bytes_per_step'] / 1e6:.3g} instead of {fp32['bytes_per_step'] / 1e6:.3g} MB per "
                    f"step and rank);")
    if best.get("test_accuracy") is not None and fp32.get("test_accuracy") is not None:
        diff = 100 * (best["test_accuracy"] - fp32["test_accuracy"])
        text.append(f"test accuracy {100 * best['test_accuracy']:.2f} % vs {100 * fp32['test_accuracy']:.2f} % "
                    f"with fp32 ({diff:+.2f} points).")
    elif best.get("val_loss") is not None and fp32.get("val_loss"):
        rel = best["val_loss"] / fp32["val_loss"] - 1
        text.append(f"validation loss {best['val_loss']:.4f} vs {fp32['val_loss']:.4f} with fp32 ({rel:+.2%}).")
    elif best.get("final_loss") is not None and fp32.get("final_loss"):
        rel = best["final_loss"] / fp32["final_loss"] - 1
        text.append(f"training loss {best['final_loss']:.4g} vs {fp32['final_loss']:.4g} with fp32 ({rel:+.2%}) "
                    f"after {_steps_trained(result['meta'])} steps of a synthetic task "
                    f"(accuracy: --task fmnist).")
    if loopback:
        text.append("On loopback the link is not bandwidth-bound, so fewer bytes cannot make a step faster: the "
                    "differences here are the codecs' overhead and this machine's noise. To measure the benefit, "
                    f"run as root (an emulated {DEFAULT_RATE} link) or under torchrun across real hosts.")
    return " ".join(text)


def write_outputs(result: dict, outdir: str) -> list[str]:
    os.makedirs(outdir, exist_ok=True)
    paths = []
    path = os.path.join(outdir, "bench.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    paths.append(path)
    path = os.path.join(outdir, "bench.csv")
    with open(path, "w", newline="") as f:
        keys = [k for k in RESULT_KEYS if k != "timeline"]  # per-bucket lists: bench.json only
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in result["rows"]:
            w.writerow({k: r.get(k) for k in keys})
    paths.append(path)
    path = os.path.join(outdir, "bench.md")
    with open(path, "w") as f:
        f.write(describe(result) + "\n\n" + format_table(result, True) + "\n\n" + verdict(result) + "\n")
    paths.append(path)
    plot = _plot(result, os.path.join(outdir, "bench.png"))
    if plot:
        paths.append(plot)
    return paths


def _rate_bits(link) -> float | None:
    from .netsim import parse_rate
    try:
        return parse_rate(link) if link else None
    except ValueError:
        return None


def _plot(result: dict, path: str) -> str | None:
    """bench.png: step time and bytes per step for every configuration (bars, one colour per link),
    and, when several link rates were measured, speedup vs fp32 against the link rate."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:  # optional extra
        print("bench.png not written: matplotlib is not installed (pip install 'ddp_qhooks[plot]' or "
              "pip install matplotlib)")
        return None
    ok = [r for r in result["rows"] if r["status"] == "ok" and r["bytes_per_step"]]
    if not ok:
        return None
    links = _links(ok)
    names = list(dict.fromkeys(r["config"] for r in ok))
    rated = [k for k in links if _rate_bits(k)]
    panels = 3 if len(rated) >= 2 else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 0.45 * len(names) + 2.2))
    height = 0.8 / len(links)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, link in enumerate(links):
        rows = {r["config"]: r for r in ok if r.get("link") == link}
        ys = [i + (j - (len(links) - 1) / 2) * height for i in range(len(names))]
        label = link or "loopback"
        color = colors[j % len(colors)]
        axes[0].barh(ys, [1000 * rows[n]["step_s"] if n in rows else 0 for n in names], height=height,
                     color=color, label=label)
        ideal = [(rows["fp32"]["step_s"] / rows[n]["ideal_speedup"] * 1000, y) for y, n in zip(ys, names)
                 if n in rows and n != "fp32" and rows[n].get("ideal_speedup") and "fp32" in rows]
        if ideal:
            axes[0].scatter(*zip(*ideal), marker="|", color="k", s=120, zorder=3)
        right = {y: x for x, y in ideal}
        for y, n in zip(ys, names):
            if n in rows and rows[n].get("speedup_vs_fp32"):
                axes[0].annotate(f" {rows[n]['speedup_vs_fp32']:.2f}x", (max(1000 * rows[n]["step_s"], right.get(y, 0)), y),
                                 va="center", fontsize=7)
        compute = rows.get("fp32", {}).get("compute_s")
        if compute and j == 0:
            axes[0].axvline(1000 * compute, color="k", lw=0.8, ls=":")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    axes[0].set_xlim(0, 1.2 * max(1000 * r["step_s"] for r in ok))
    mb = {r["config"]: r["bytes_per_step"] / 1e6 for r in ok}
    axes[1].barh(range(len(names)), [mb[n] for n in names], color="grey")
    for i, n in enumerate(names):
        axes[1].annotate(f" {mb[n]:.3g} MB", (mb[n], i), va="center", fontsize=7)
    axes[1].set_xscale("log")
    axes[1].set_xlim(min(mb.values()) / 2, 4 * max(mb.values()))
    axes[1].xaxis.set_major_formatter(plain)
    axes[1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[1].set_xlabel("MB sent per rank per step (log)")
    axes[0].set_xlabel("step time, ms (median; labels: speedup vs fp32; |: ideal; dotted: compute only)")
    axes[0].set_title("step time (lower is better)", fontsize=9)
    axes[1].set_title("bytes per step (lower is fewer)", fontsize=9)
    for ax in axes[:2]:
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
    axes[1].set_yticklabels([])
    if len(links) > 1:
        axes[0].legend(fontsize=7, loc="best", title="link", title_fontsize=7)
    if panels == 3:
        ax = axes[2]
        xs = sorted(rated, key=_rate_bits)
        for n in [n for n in names if n != "fp32"]:
            pts = [(_rate_bits(k) / 1e6, r["speedup_vs_fp32"]) for k in xs for r in ok
                   if r.get("link") == k and r["config"] == n and r.get("speedup_vs_fp32")]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=n)
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xticks([_rate_bits(k) / 1e6 for k in xs])
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("link rate, Mbit/s (log)")
        ax.set_ylabel("speedup vs fp32 allreduce")
        ax.set_ylim(bottom=0)
        ax.set_title("speedup vs link rate", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(describe(result), 180), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ================================================================================================
# launching: local processes, torchrun, or namespaced hosts
# ================================================================================================
def _init_from_env(timeout_s: float) -> None:
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("DDP_QHOOKS_BENCH_CPU") != "1" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def _worker_main(args) -> None:
    """Entry of one rank (env:// rendezvous: torchrun, our local spawn, or a netsim host)."""
    torch.set_num_threads(args.threads)
    _init_from_env(args.timeout)
    try:
        t0 = time.perf_counter()
        rows = run_worker(args)
        if rows is not None:
            result = {"meta": _meta(args, rows), "rows": rows}
            result["meta"]["seconds"] = time.perf_counter() - t0
            if args.result_file:
                with open(args.result_file, "w") as f:
                    json.dump(result, f)
            else:  # torchrun: rank 0 reports
                _report(result, args)
    finally:
        try:
            dist.destroy_process_group()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            # Skip interpreter teardown: Gloo in torch 2.13 aborts ~10 % of processes at exit even
            # after a clean destroy_process_group, and the destructor of a DDP whose hook raised
            # aborts too (see run_worker).  Results are written by now.
            os._exit(0)


def _meta(args, rows) -> dict:
    return {"task": args.task, "model": "SmallCNN" if args.task == "fmnist" else args.model,
            "params": _param_count(args), "world": dist.get_world_size(), "backend": dist.get_backend(),
            "netsim": args.netsim, "nodes": args.nodes if args.netsim else None,
            "launch": os.environ.get("DDP_QHOOKS_BENCH_LAUNCH", "torchrun"), "steps": args.steps,
            "warmup": args.warmup, "train_steps": args.train_steps, "batch": args.batch,
            "compute_s": rows[0]["compute_s"] if rows else None, "torch": torch.__version__,
            "configs": args.configs, "fsdp": bool(args.fsdp), "idle_ms": args.idle_ms,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _width_for(params: float) -> int:
    """Hidden width of the synthetic MLP (64 -> w -> w -> w -> w -> 10) closest to ``params``."""
    w = max(16, int(math.sqrt(params / 3)))
    while 3 * (w + 1) ** 2 + 78 * (w + 1) + 10 <= params:
        w += 1
    return w


def _side_for(params: float) -> int:
    """n of the one-parameter model nn.Linear(n, n) closest to ``params`` (n * n + n)."""
    return max(2, round(math.sqrt(params)))


def _param_count(args) -> int:
    if args.task == "fmnist":
        return sum(p.numel() for p in data.SmallCNN().parameters())
    if getattr(args, "model", "mlp") == "linear":
        n = _side_for(args.params)
        return n * n + n
    if args.task == "lm":
        from .lm import LmTask
        return sum(p.numel() for p in LmTask(1, 0, "cpu").model().parameters())
    w = _width_for(int(args.params))
    return 64 * w + w + 3 * (w * w + w) + w * 10 + 10


def _report(result: dict, args) -> None:
    """Stdout: the run, the compact table (``--wide``: every column) with its legend, the files
    written, and last the verdict."""
    print(describe(result))
    print(format_table(result, args.markdown, compact=not args.wide))
    if args.timeline:
        for r in result["rows"]:
            if r.get("timeline"):
                print("\n" + format_timeline(r["config"], r["timeline"]))
    if args.output:
        paths = write_outputs(result, args.output)
        print(f"wrote {', '.join(paths)} (the full table: bench.md)")
    print()
    print(verdict(result))
    table = reference_table(result["meta"])
    if table:
        print(f"Compare with the published run of the same model and link: {table}")


def reference_table(meta: dict) -> str | None:
    """The published results (README's tables, raw output in results/) of this run's model and link."""
    if meta["task"] != "synthetic" or meta.get("model", "mlp") != "mlp" or meta["world"] != 2 or meta.get("fsdp"):
        return None
    if abs(meta["params"] - 25e6) > 0.02 * 25e6:
        return None
    links = meta.get("links") or [meta.get("netsim")]
    names = {"200mbit": "results/bench_25M_200mbit.txt", "1gbit": "results/bench_25M_1gbit.txt",
             None: "results/bench_25M_loopback.txt"}
    found = [names[k] for k in links if k in names]
    return ", ".join(found) or None


def _worker_argv(args, configs, result_file: str, compute_s, rate=None) -> list[str]:
    argv = [sys.executable, "-m", "ddp_qhooks.tools.bench", "--_worker", "--result-file", result_file,
            "--netsim", rate or "none"]
    for key in ("task", "model", "params", "batch", "steps", "warmup", "train_steps", "lr", "threads", "timeout", "data",
                "nodes", "procs_per_node", "idle_ms"):
        value = getattr(args, key)
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    if args.fsdp:
        argv.append("--fsdp")
    if compute_s is not None:
        argv += ["--compute-s", repr(compute_s)]
    argv += ["--configs", *configs]
    if args.verbose:
        argv.append("--verbose")
    return argv


def _crash_reason(logs: list[str]) -> str:
    """The most specific error line in the ranks' stderr."""
    import re
    best = ""
    for text in logs:
        for line in text.splitlines():
            line = line.strip().removeprefix("[rank0]: ").removeprefix("[rank1]: ")
            if re.search(r"(Error|what\(\)|Exception)[:(]", line) and "benchmark workers" not in line:
                best = line
    return best[:200] or "the worker processes crashed"


def _launch_world(args, netsim: bool) -> int:
    hierarchical = args.fsdp and args.procs_per_node > 1  # hosts of several ranks, also on loopback
    return args.nodes * args.procs_per_node if netsim or hierarchical else args.world


def _launcher_backend(args, world: int) -> str:
    """The backend of the groups this launcher starts: NCCL where CUDA is there with one GPU per rank
    (every rank of a local or netsim launch is on this machine), Gloo otherwise or with --cpu."""
    if args.cpu or not torch.cuda.is_available() or torch.cuda.device_count() < world:
        return "gloo"
    return "nccl"


def _run_group(args, configs, net, tmp, compute_s, index) -> dict:
    """One group of ranks (fresh processes, fresh port) running ``configs``; rank 0's result."""
    import socket
    world = _launch_world(args, net is not None)
    backend = _launcher_backend(args, world)
    master = net.addr(0) if net is not None else "127.0.0.1"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result_file = os.path.join(tmp, f"result{index}.json")
    procs, logs = [], []
    try:
        for rank in range(world):
            env = dict(os.environ, MASTER_ADDR=master, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                       LOCAL_RANK=str(rank),  # every rank is on this machine: one GPU each under NCCL
                       DDP_QHOOKS_BENCH_LAUNCH="netsim" if net is not None else "local processes",
                       DDP_QHOOKS_BENCH_CPU="1" if backend == "gloo" else "0", DDP_QHOOKS_BENCH_QUIET="1",
                       DDP_QHOOKS_BENCH_HEARTBEAT=os.path.join(tmp, f"beat{index}"))
            if net is not None and backend == "nccl":  # through the shaped link, not shared memory
                env.update(NCCL_P2P_DISABLE="1", NCCL_SHM_DISABLE="1", NCCL_IB_DISABLE="1",
                           NCCL_SOCKET_IFNAME=net.ifname(rank // args.procs_per_node))
            root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
            argv = _worker_argv(args, configs, result_file if rank == 0 else os.path.join(tmp, f"r{index}_{rank}.json"),
                                compute_s, net.rate if net is not None else None)
            log = open(os.path.join(tmp, f"log{index}_{rank}.txt"), "w+")
            logs.append(log)
            kw = dict(stdout=log, stderr=subprocess.STDOUT)
            procs.append(net.popen(rank // args.procs_per_node, argv, env, **kw) if net is not None
                         else subprocess.Popen(argv, env=env, **kw))
        last_beat, hung = time.monotonic(), False
        beats = [os.path.join(tmp, f"beat{index}.{r}") for r in range(world)]
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                time.sleep(2)  # let the other ranks print their side of the failure
                break
            stamps = [os.path.getmtime(b) for b in beats if os.path.exists(b)]
            if stamps:
                last_beat = max(last_beat, min(stamps) if len(stamps) == world else last_beat)
            if time.monotonic() - last_beat > args.timeout:
                hung = True
                break
            time.sleep(0.1)
        ok = os.path.exists(result_file) and all(p.poll() == 0 for p in procs)
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read())
        if args.verbose:
            for rank, text in enumerate(texts):
                sys.stderr.write(f"--- rank {rank} ---\n{text}")
        if ok:
            with open(result_file) as f:
                return json.load(f)
        reason = (f"no progress for {args.timeout:.0f} s (hung; e.g. ranks issuing collectives in different orders)"
                  if hung else _crash_reason(texts))
        return {"crashed": reason}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


def _launch(args) -> dict:
    """Each configuration in its own group of fresh processes (locally or in namespaced hosts), so a
    configuration that crashes its processes is reported as failed and the others still run; compute
    time is measured once, by the first group.  With several link rates, every configuration runs at
    each rate (rows carry their ``link``)."""
    rows, meta = [], None
    compute_s = None
    tc_total = {}
    total = len(args.rates) * len(args.configs)
    with tempfile.TemporaryDirectory(prefix="ddp_qhooks_bench_") as tmp:
        index = 0
        for rate in args.rates:
            net = None
            link_rows = []
            try:
                if rate:
                    from .netsim import NetSim, NetSimError
                    net = NetSim(nodes=args.nodes, rate=rate)
                    try:
                        net.up()
                    except NetSimError as exc:
                        if not args.netsim_auto:
                            raise
                        print(textwrap.fill(f"note: the emulated link could not be set up ({exc}); measuring on "
                                            f"loopback instead.  {LOOPBACK_NOTE}", 100), flush=True)
                        net, rate = None, None
                backend = _launcher_backend(args, _launch_world(args, net is not None))
                for spec in args.configs:
                    index += 1
                    label = f"[{index}/{total}] {spec}" + (f" @ {rate or 'loopback'}" if len(args.rates) > 1 else "")
                    if (spec, backend) in KNOWN_FAILING:
                        row = {k: None for k in RESULT_KEYS}
                        row.update(config=spec, kind=parse_config(spec)["kind"], status="skipped", link=rate,
                                   error=KNOWN_FAILING[spec, backend])
                        _status(f"{label}: skipped (fails on {backend})", done=True)
                        link_rows.append(row)
                        continue
                    _status(f"{label}: running ...")
                    t0 = time.perf_counter()
                    res = _run_group(args, [spec], net, tmp, compute_s, index)
                    if "crashed" in res:
                        row = {k: None for k in RESULT_KEYS}
                        row.update(config=spec, kind=parse_config(spec)["kind"], status="failed", link=rate,
                                   error=f"crashed the worker processes: {res['crashed']}", compute_s=compute_s)
                        _status(f"{label}: FAILED ({res['crashed'][:80]})", done=True)
                    else:
                        row = res["rows"][0]
                        meta = meta or res["meta"]
                        compute_s = row["compute_s"] if compute_s is None else compute_s
                        took = time.perf_counter() - t0
                        state = f"{1000 * row['step_s']:.1f} ms/step" if row["status"] == "ok" else row["status"]
                        _status(f"{label}: {state} ({took:.0f} s)", done=True)
                    link_rows.append(row)
                for r in link_rows:
                    r["compute_s"] = r["compute_s"] if r["compute_s"] is not None or r["status"] == "skipped" \
                        else compute_s
                _derive(link_rows, args.procs_per_node if net is not None else 1, prefer_tc=args.fsdp)
                if net is not None:
                    tc_total[rate] = [net.bytes_sent(n) for n in range(args.nodes)]
            finally:
                if net is not None:
                    net.down()
            rows += link_rows
        if meta is None:
            raise RuntimeError("every configuration failed; rerun with --verbose to see the workers' output")
        meta["compute_s"] = compute_s
        meta["ranks_per_host"] = args.procs_per_node if tc_total else 1
        links = _links(rows)
        meta["links"] = links
        meta["netsim"] = ",".join(k for k in links if k) or None
        meta["nodes"] = args.nodes if tc_total else None
        meta["configs"] = args.configs
        if len(tc_total) == 1:
            meta["tc_bytes_total"] = next(iter(tc_total.values()))
        elif tc_total:
            meta["tc_bytes_total"] = tc_total
        return {"meta": meta, "rows": rows}


def _status(text: str, done: bool = False) -> None:
    if sys.stderr.isatty():
        print(f"\r\x1b[2K{text}", end="\n" if done else "", file=sys.stderr, flush=True)
    elif done:
        print(text, file=sys.stderr, flush=True)


EXAMPLES = f"""examples:
  python -m ddp_qhooks.bench                         # as root: emulated {DEFAULT_RATE} link; else loopback, with a note
  python -m ddp_qhooks.bench --loopback              # 2 local processes on loopback (codec overhead only)
  python -m ddp_qhooks.bench --netsim 200mbit,1gbit  # every configuration at two link rates (plot: speedup vs rate)
  python -m ddp_qhooks.bench --model linear --configs fp32 fp16_hook stochastic:4 sign   # one 100 MB parameter
  python -m ddp_qhooks.bench --configs all --wide    # every configuration of the results tables, every column
  python -m ddp_qhooks.bench --configs fp32 stochastic:4 "sign,ef=0" "topk:8,ratio=0.01,block_size=4096"
  python -m ddp_qhooks.bench --task fmnist           # test accuracy: SmallCNN on Fashion-MNIST
  torchrun --nnodes=2 --nproc-per-node=1 --node-rank=K --master-addr=A --master-port=P -m ddp_qhooks.bench

{textwrap.fill("configurations: fp32 (DDP's allreduce, the baseline), "
              + ", ".join(b for b in BUILTINS if b != "fp32") + " (torch's hooks), 'all', or "
              "<codec>[:<bits>][,option=value...][,ef=0] with codec one of " + ", ".join(CODECS) + ".", 100)}
Results: a compact table and a verdict on stdout; bench.json/.csv/.md (every column) and bench.png
(with matplotlib: pip install 'ddp_qhooks[plot]') in --output.  The default run (25M-parameter MLP,
{DEFAULT_RATE}) is the model and link of results/bench_25M_200mbit.txt (README's 200 Mbit/s table)."""

LOOPBACK_NOTE = ("note: the ranks are processes on this machine talking over loopback, which is not "
                 "bandwidth-bound: fewer bytes cannot make a step faster here, so this run measures the codecs' "
                 f"overhead, not their benefit.  To see the benefit: run as root on Linux (an emulated {DEFAULT_RATE} "
                 f"link between 2 network namespaces, the default there; or --netsim RATE), or under torchrun "
                 "across real hosts.")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description and epilog as written, and every option's default (ArgumentDefaultsHelpFormatter's
    job, without its "(default: None)" / "(default: False)" noise and with lists as typed)."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if "default" in text or not action.option_strings or default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: {' '.join(default) if isinstance(default, list) else default})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddp_qhooks.bench", description=__doc__.split("\n")[0],
                                formatter_class=_HelpFormatter, epilog=EXAMPLES)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, metavar="CONFIG",
                   help="configurations to run, in order ('all': " + " ".join(ALL_CONFIGS) + ")")
    p.add_argument("--task", choices=("synthetic", "fmnist", "lm"), default="synthetic",
                   help="synthetic: communication-bound regression (throughput); fmnist: SmallCNN on Fashion-MNIST "
                        "(accuracy); lm: tools/lm.py's char-level transformer (validation loss, val_loss)")
    p.add_argument("--model", choices=MODELS, default="mlp",
                   help="synthetic task's model: mlp (64-w-w-w-w-10, many DDP buckets) or linear (one nn.Linear(n, n): "
                        "one parameter, one bucket; 25e6 params: n=5000, a 100 MB weight)")
    p.add_argument("--params", type=float, default="25e6", help="synthetic model size in parameters")
    p.add_argument("--batch", type=int, default=None, help="per-rank batch (default: 4 synthetic, 64 fmnist)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (DDP rebuilds buckets, PowerSGD starts)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="extra untimed training steps before loss/accuracy are read (default: 0 synthetic, 300 fmnist)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate, momentum 0.9")
    p.add_argument("--world", type=int, default=2, help="local processes to spawn (loopback; ignored under torchrun)")
    link = p.add_mutually_exclusive_group()
    link.add_argument("--netsim", default="auto", metavar="RATE[,RATE...]",
                      help="run the ranks in network namespaces joined by links shaped to RATE (tc units: 200mbit, "
                           "1gbit; several: every configuration at each rate); 'none': loopback; 'auto': "
                           f"{DEFAULT_RATE} where possible (root on Linux with iproute2), else loopback")
    link.add_argument("--loopback", action="store_true", help="same as --netsim none: local processes, no link limit")
    p.add_argument("--nodes", type=int, default=2, help="simulated hosts with --netsim")
    p.add_argument("--procs-per-node", type=int, default=1,
                   help="ranks per simulated host with --netsim; with --fsdp and > 1: the hierarchical mode "
                        "(FSDP inside a host, register_between_nodes across --nodes hosts, also on loopback)")
    p.add_argument("--fsdp", action="store_true",
                   help="FSDP2 rows: fully_shard the model; fp32 = FSDP's own reduce-scatter, ours = "
                        "ddp_qhooks.fsdp.register (see ddp_qhooks/tools/bench_fsdp.py)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--idle-ms", type=float, default=0.0,
                   help="per step, after the backward pass, also wait this long with the host CPU idle, as while "
                        "an accelerator computes: work running in the background (LocalSGD's overlapped rounds) "
                        "can use it; in every row and in the compute-only time")
    p.add_argument("--timeout", type=float, default=180,
                   help="seconds without progress (one step) before a configuration is reported as hung")
    p.add_argument("--data", default=None, help="Fashion-MNIST directory (default: Debian package path)")
    p.add_argument("--output", default="bench_results", help="directory for bench.json/.csv/.md/.png ('' = none)")
    p.add_argument("--wide", action="store_true", help="print every column (as in bench.md), not the compact table")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--timeline", action="store_true",
                   help="also print each configuration's per-bucket timeline of the last timed step")
    p.add_argument("--cpu", action="store_true", help="use Gloo on CPU even if CUDA is available")
    p.add_argument("--verbose", action="store_true", help="print the workers' output and tracebacks")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--compute-s", type=float, default=None, help=argparse.SUPPRESS)
    return p


_OFF = ("none", "off", "loopback", "0", "")


def _check_args(p: argparse.ArgumentParser, args) -> None:
    """Defaults that depend on other options, and every check that can fail before a process
    starts: ``p.error`` (usage, one line, exit 2) instead of a traceback."""
    from .netsim import NetSimError, check_environment, parse_rate
    if args.batch is None:
        args.batch = 64 if args.task == "fmnist" else 4
    if args.train_steps is None:
        args.train_steps = 300 if args.task == "fmnist" else 0
    for name in ("params", "batch", "steps", "world", "nodes", "procs_per_node", "threads", "lr", "timeout"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name):g}")
    if args.warmup < 0 or args.train_steps < 0:
        p.error("--warmup and --train-steps must be >= 0")
    if args.idle_ms < 0:
        p.error(f"--idle-ms must be >= 0, got {args.idle_ms:g}")
    if args.idle_ms and args.fsdp:
        p.error("--idle-ms is not supported with --fsdp")
    if args.task == "fmnist" and args.model != "mlp":
        p.error("--model applies to --task synthetic (fmnist trains its SmallCNN)")
    if args.fsdp and args.configs == DEFAULT_CONFIGS:
        args.configs = ["fp32"] + (["none"] if args.procs_per_node > 1 else []) + ["stochastic:8", "stochastic:4"]
    configs = []
    for c in args.configs:
        configs += ALL_CONFIGS if c == "all" else [c]
    args.configs = list(dict.fromkeys(configs))
    for c in args.configs:
        try:
            parse_config(c)  # bad configurations fail here, before any process starts
        except Exception as exc:
            p.error(f"--configs: {exc}")
        if args.fsdp and (c in BUILTINS and c != "fp32" or parse_config(c)["kind"] == "local"):
            p.error(f"--fsdp: configuration {c!r} is not an FSDP one; use fp32 (FSDP's reduce-scatter) or "
                    "<codec>[:<bits>][,option=value...]")
    if args.task == "fmnist":
        try:
            data.find_dir(args.data)  # names the package when the data is missing
        except Exception as exc:
            p.error(f"--task fmnist: {exc}")
    netsim = "none" if args.loopback else str(args.netsim).strip()
    args.netsim_auto = netsim.lower() == "auto"
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if args.netsim_auto or netsim.lower() in _OFF:
        args.rates = [None]
    else:
        args.rates = [r.strip() for r in netsim.split(",")]
        for r in args.rates:
            try:
                parse_rate(r)
            except ValueError as exc:
                p.error(f"--netsim: {exc}; or 'none' for loopback")
    args.netsim = args.rates[0] if len(args.rates) == 1 else ",".join(args.rates)
    if args._worker or (torchrun and args.rates == [None]):
        return  # a rank: the launcher (or torchrun's hosts) decided the link
    if args.netsim_auto:
        try:
            check_environment()
            args.rates = [DEFAULT_RATE]
            args.netsim = DEFAULT_RATE
            print(textwrap.fill(f"Measuring on an emulated {DEFAULT_RATE} link between {args.nodes} network "
                                f"namespaces (tc tbf; --loopback for plain loopback, --netsim RATE for another "
                                "rate).", 100), flush=True)
        except NetSimError as exc:
            print(textwrap.fill(f"{LOOPBACK_NOTE} (No emulated link here: {exc})", 100), flush=True)
    elif args.rates != [None]:
        try:
            check_environment()
        except NetSimError as exc:
            p.error(str(exc))
    elif args.world > 1:
        print(textwrap.fill(LOOPBACK_NOTE, 100), flush=True)


def main(argv=None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    _check_args(p, args)
    if args._worker or ("RANK" in os.environ and "WORLD_SIZE" in os.environ and args.rates == [None]):
        _worker_main(args)
        return
    result = _launch(args)
    _report(result, args)


if __name__ == "__main__":
    main()
