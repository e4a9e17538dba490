"""Bandwidth benchmark: our hooks against DDP's fp32 allreduce and torch's built-in hooks, measured.

    python -m ddp_qhooks.bench                                   # 2 local Gloo workers, defaults
    python -m ddp_qhooks.bench --params 25e6 --netsim 200mbit    # 2 namespaced "hosts", 200 Mbit/s
    python -m ddp_qhooks.bench --task fmnist --steps 300         # accuracy on Fashion-MNIST
    torchrun --nnodes=2 --nproc-per-node=1 ... -m ddp_qhooks.bench --params 25e6   # real hosts

Every configuration runs in the same invocation, on the same process group, from the same initial
weights and the same data, one after the other:

* ``fp32``: DDP's default allreduce (no hook), the baseline;
* ``fp16_hook`` / ``bf16_hook``: torch's ``fp16_compress_hook`` / ``bf16_compress_hook``;
* ``powersgd``: torch's PowerSGD (rank 1, error feedback, compression from the 3rd step);
* ``quant_pertensor``: torch's ``quantization_pertensor_hook`` (reported as failing where it raises,
  as on Gloo in torch 2.13);
* ours: ``<codec>[:<bits>][,option=value...]``, e.g. ``stochastic:4``, ``sign``,
  ``topk:8,ratio=0.01``, ``stochastic:2,block_size=256,ef=0`` (``ef=0``: no error feedback).

Measured per configuration: step time (median and 10-90 % spread of the slowest rank per step,
ranks aligned by a barrier before each step), compute time (the same steps under ``no_sync()``:
no communication), communication = step - compute, bytes sent per rank per step (our hooks: the
package's ``wire_bytes_sent``; fp32 / fp16 / bf16: the ring-allreduce volume 2(W-1)/W x size;
PowerSGD: computed from its matrix shapes; with ``--netsim``: also tc's counter of bytes that left
each host, IP/TCP headers included), speedup vs ``fp32``, the ideal speedup
``T_fp32 / (T_compute + T_comm_fp32 * bytes / bytes_fp32)`` and the fraction of it reached, and the
final training loss (``synthetic``) or test accuracy (``fmnist``).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import data
from ..codecs import CODECS
from ..local_sgd import LocalSGD, local_phase_hook

BUILTINS = ("fp32", "fp16_hook", "bf16_hook", "powersgd", "quant_pertensor")
# options that turn a configuration into local SGD / DiLoCo (ddp_qhooks.LocalSGD) instead of a gradient hook
LOCAL_OPTIONS = ("local_steps", "outer", "outer_lr", "outer_momentum", "fragments")
DEFAULT_CONFIGS = ["fp32", "fp16_hook", "powersgd", "quant_pertensor",
                   "stochastic:8", "stochastic:4", "stochastic:2", "uniform:1", "stochastic:1,ef=0",
                   "stochastic:4,ef=0", "uniform:2,block_size=256", "qsgd:4,block_size=512,ef=0",
                   "ternary", "sign", "sign,ef=0", "topk:8,ratio=0.01", "topk:4,ratio=0.1,values=stochastic"]
_FAILED: list = []
RESULT_KEYS = ("config", "kind", "status", "error", "step_s", "step_p10_s", "step_p90_s", "compute_s", "comm_s",
               "bytes_per_step", "bytes_source", "tc_bytes_per_step", "compression_ratio", "speedup_vs_fp32",
               "ideal_speedup", "fraction_of_ideal", "tc_vs_accounted", "final_loss", "test_accuracy", "note",
               "hook_s", "callback_s", "encode_hidden", "timeline", "fewer_bytes_than_fp32")


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
        raise ValueError(f"unknown configuration {spec!r}: use one of {', '.join(BUILTINS)} or "
                         f"<codec>[:<bits>][,option=value...] with codec in {', '.join(CODECS)}")
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
    from ..hook import QuantizedHookState
    QuantizedHookState(codec=codec, bits=cfg["bits"], error_feedback=ef, **options)  # validate now, clearly
    if local:
        if "local_steps" not in local:
            raise ValueError(f"configuration {spec!r}: {', '.join(sorted(local))} need local_steps=H (local SGD)")
        from ..local_sgd import LocalSGD
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


class FashionMnistTask:
    """data.SmallCNN on Fashion-MNIST; each rank draws its own minibatches from the training set.

    ``noniid=p`` (0 <= p <= 1): a fraction p of every minibatch of rank r comes from its two "home"
    classes 2r mod 10 and 2r+1 mod 10, the rest from the whole set (p = 0: IID; p = 0.9: each rank
    sees mostly two classes, the client drift of federated settings)."""

    def __init__(self, batch: int, rank: int, device, path=None, noniid: float = 0.0):
        if not 0.0 <= noniid <= 1.0:
            raise ValueError(f"noniid must be a fraction in [0, 1], got {noniid!r}")
        self.x, self.y = data.load("train", path)
        self.xt, self.yt = data.load("test", path)
        self.batch, self.rank, self.device = batch, rank, device
        self.noniid = noniid
        home = {(2 * rank) % 10, (2 * rank + 1) % 10}
        self.home = torch.nonzero(torch.isin(self.y, torch.tensor(sorted(home)))).view(-1)

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return data.SmallCNN().to(self.device)

    def batch_for(self, step: int):
        g = torch.Generator().manual_seed(7919 * self.rank + step)
        idx = torch.randint(0, self.x.shape[0], (self.batch,), generator=g)
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


def _time_steps(ddp, task, opt, start, count, sync: bool, after_step=None):
    """Per-step seconds of the slowest rank, ranks aligned by a barrier before each step;
    ``after_step()`` (local SGD's outer synchronization) runs inside the timed step."""
    times, loss = [], None
    for step in range(start, start + count):
        x, y = task.batch_for(step)
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
        opt.step()
        if after_step is not None:
            after_step()
        times.append(time.perf_counter() - t0)
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist(), loss


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


def run_worker(args) -> list[dict] | None:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if args.task == "fmnist":
        task = FashionMnistTask(args.batch, rank, device, args.data)
    elif args.task == "lm":  # tools/lm.py; test_accuracy holds the validation loss (lower is better)
        from .lm import LmTask
        task = LmTask(args.batch, rank, device)
    else:
        task = SyntheticTask(int(args.params), args.batch, rank, device)
    configs = [parse_config(c) for c in args.configs]
    ifname = os.environ.get("GLOO_SOCKET_IFNAME") if args.netsim else None
    from .netsim import tc_bytes_sent_here

    if args.compute_s is not None:  # measured by an earlier group of this invocation
        compute_s = args.compute_s
    else:  # compute-only time (no communication), on the fp32 model
        model = task.model()
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        _time_steps(ddp, task, opt, 0, 1, sync=False)
        compute_times, _ = _time_steps(ddp, task, opt, 1, max(3, min(args.steps, 10)), sync=False)
        compute_s = statistics.median(compute_times)
        del ddp, model, opt

    rows = []
    for i, cfg in enumerate(configs):
        row = {k: None for k in RESULT_KEYS}
        row.update(config=cfg["spec"], kind=cfg["kind"], status="ok", compute_s=compute_s)
        if cfg["spec"] == "quant_pertensor" and dist.get_backend() == "gloo" and \
                "DDP_QHOOKS_BENCH_LAUNCH" not in os.environ:
            # in-process (torchrun) a raising hook leaves Gloo's process group unusable: the next
            # collective hangs.  The bench's own launcher runs it in isolated processes instead.
            row["status"] = "failed"
            row["error"] = ("not run under torchrun on Gloo: torch's quantization_pertensor_hook raises there "
                            "(IndexError) and leaves the process group unusable; `python -m ddp_qhooks.bench` "
                            "runs and reports it in isolated processes")
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
            ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **ddp_kw)
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
            for s in range(args.warmup):
                _progress(rank, f"[{i + 1}/{len(configs)}] {cfg['spec']}: warm-up {s + 1}/{args.warmup}")
                _time_steps(ddp, task, opt, s, 1, sync=True)
            if cfg["kind"] == "local":
                state.sync()  # start the timed window at a round boundary (all fragments just synced)
                state.inner_steps = 0
            before = state.stats() if state is not None else None
            tc0 = tc_bytes_sent_here(ifname) if ifname else None
            times, losses = [], []
            for s in range(timed):
                _progress(rank, f"[{i + 1}/{len(configs)}] {cfg['spec']}: step {s + 1}/{timed}")
                t, loss = _time_steps(ddp, task, opt, args.warmup + s, 1, sync=True, after_step=after)
                times += t
                losses.append(float(loss.detach()))
            tc1 = tc_bytes_sent_here(ifname) if ifname else None
            stats_after = state.stats() if state is not None else None  # the timed steps only
            for s in range(args.train_steps):
                if s % 20 == 0:
                    _progress(rank, f"[{i + 1}/{len(configs)}] {cfg['spec']}: training {s + 1}/{args.train_steps}")
                _, loss = _time_steps(ddp, task, opt, args.warmup + timed + s, 1, sync=True, after_step=after)
                losses.append(float(loss.detach()))
            if cfg["kind"] == "local":
                state.sync()  # evaluate the synchronized model
            final = torch.tensor([statistics.fmean(losses[-5:])], dtype=torch.float64)
            dist.all_reduce(final)
            row["final_loss"] = float(final) / world
            row["test_accuracy"] = task.evaluate(model)
            ordered = sorted(times)
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
                row["bytes_per_step"], row["bytes_source"] = _analytic_bytes(cfg["spec"], model, world)
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


def _derive(rows: list[dict], ranks_per_host: int = 1) -> None:
    """Speedups and the ideal, relative to the fp32 row of the same run.

    With several ranks per simulated host, tc counts what the whole host sends over its link (not
    the same-host traffic, which stays on loopback), while the package counts per rank: the two are
    not comparable, so ``tc_vs_accounted`` is left out and the ideal uses the link bytes tc saw."""
    base = next((r for r in rows if r["config"] == "fp32" and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] != "ok" or base is None:
            continue
        r["speedup_vs_fp32"] = base["step_s"] / r["step_s"]
        if r.get("tc_bytes_per_step") and r["bytes_per_step"] and ranks_per_host == 1:
            r["tc_vs_accounted"] = r["tc_bytes_per_step"] / (r["bytes_per_step"] * TCP_FRAMING) - 1
        measure = "bytes_per_step"
        if ranks_per_host > 1 and r.get("tc_bytes_per_step") and base.get("tc_bytes_per_step"):
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
           ("final_loss", "loss", "{:.4g}"), ("test_accuracy", "test acc", "{:.2%}")]


def _cell(row, key, fmt) -> str:
    v = row.get(key)
    if key == "status" and v != "ok":
        return "FAILED (below)"
    if v is None:
        return "–"
    if fmt == "ms":
        return f"{1000 * v:.1f}"
    if fmt == "mb":
        return f"{v / 1e6:.3f}"
    return fmt.format(v)


def format_table(result: dict, markdown: bool) -> str:
    rows = result["rows"]
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows) or c[0] in ("config", "status")]
    head = [c[1] for c in cols]
    body = [[_cell(r, k, f) for k, _, f in cols] for r in rows]
    notes = [f"{r['config']} fails on this backend ({result['meta']['backend']}, torch {result['meta']['torch']}): "
             f"{r['error']}" for r in rows if r["status"] != "ok"]
    notes += [f"{r['config']}: {r['note']}" for r in rows if r.get("note")]
    if result["meta"].get("ranks_per_host", 1) > 1 and any(r.get("tc_bytes_per_step") for r in rows):
        notes.append(f"{result['meta']['ranks_per_host']} ranks per host: tc MB/step is what host 0 sent over its "
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
    if markdown:
        table = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                          ["| " + " | ".join(b) + " |" for b in body])
        return table + "".join(f"\n\n{n}" for n in notes)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    table = "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                      for line in [head] + body)
    return table + "".join(f"\n{n}" for n in notes)


def describe(result: dict) -> str:
    m = result["meta"]
    link = f"netsim {m['netsim']} between {m['nodes']} namespaced hosts" if m["netsim"] else m["launch"]
    return (f"task={m['task']} params={m['params']:,} world={m['world']} backend={m['backend']} ({link}); "
            f"{m['steps']} timed steps after {m['warmup']} warm-up; compute {1000 * m['compute_s']:.1f} ms/step; "
            f"torch {m['torch']}")


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
        f.write(describe(result) + "\n\n" + format_table(result, True) + "\n")
    paths.append(path)
    plot = _plot(result, os.path.join(outdir, "bench.png"))
    if plot:
        paths.append(plot)
    return paths


def _plot(result: dict, path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # optional extra
        return None
    rows = [r for r in result["rows"] if r["status"] == "ok" and r["bytes_per_step"]]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    names = [r["config"] for r in rows]
    axes[0].barh(names, [1000 * r["step_s"] for r in rows])
    axes[0].set_xlabel("step time (ms, median)")
    axes[1].barh(names, [r["speedup_vs_fp32"] or 0 for r in rows], label="measured")
    axes[1].scatter([r["ideal_speedup"] or 0 for r in rows], names, color="k", marker="|", s=200, label="ideal")
    axes[1].set_xlabel("speedup vs fp32 allreduce")
    axes[1].legend()
    metric = "test_accuracy" if any(r["test_accuracy"] is not None for r in rows) else "final_loss"
    axes[2].scatter([8 * r["bytes_per_step"] / 1e6 for r in rows], [r[metric] or 0 for r in rows])
    for r in rows:
        axes[2].annotate(r["config"], (8 * r["bytes_per_step"] / 1e6, r[metric] or 0), fontsize=7)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("Mbit sent per rank per step")
    axes[2].set_ylabel(metric.replace("_", " "))
    fig.suptitle(describe(result), fontsize=8)
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
    return {"task": args.task, "params": _param_count(args), "world": dist.get_world_size(), "backend": dist.get_backend(),
            "netsim": args.netsim, "nodes": args.nodes if args.netsim else None,
            "launch": os.environ.get("DDP_QHOOKS_BENCH_LAUNCH", "torchrun"), "steps": args.steps,
            "warmup": args.warmup, "train_steps": args.train_steps, "batch": args.batch,
            "compute_s": rows[0]["compute_s"] if rows else None, "torch": torch.__version__,
            "configs": args.configs, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _width_for(params: float) -> int:
    """Hidden width of the synthetic MLP (64 -> w -> w -> w -> w -> 10) closest to ``params``."""
    w = max(16, int(math.sqrt(params / 3)))
    while 3 * (w + 1) ** 2 + 78 * (w + 1) + 10 <= params:
        w += 1
    return w


def _param_count(args) -> int:
    if args.task == "fmnist":
        return sum(p.numel() for p in data.SmallCNN().parameters())
    if args.task == "lm":
        from .lm import LmTask
        return sum(p.numel() for p in LmTask(1, 0, "cpu").model().parameters())
    w = _width_for(int(args.params))
    return 64 * w + w + 3 * (w * w + w) + w * 10 + 10


def _report(result: dict, args) -> None:
    print(describe(result))
    print(format_table(result, args.markdown))
    if args.timeline:
        for r in result["rows"]:
            if r.get("timeline"):
                print("\n" + format_timeline(r["config"], r["timeline"]))
    if args.output:
        for path in write_outputs(result, args.output):
            print(f"wrote {path}")


def _worker_argv(args, configs, result_file: str, compute_s) -> list[str]:
    argv = [sys.executable, "-m", "ddp_qhooks.tools.bench", "--_worker", "--result-file", result_file]
    for key in ("task", "params", "batch", "steps", "warmup", "train_steps", "lr", "threads", "timeout", "data",
                "netsim", "nodes"):
        value = getattr(args, key)
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
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


def _run_group(args, configs, net, tmp, compute_s, index) -> dict:
    """One group of ranks (fresh processes, fresh port) running ``configs``; rank 0's result."""
    import socket
    world = args.nodes * args.procs_per_node if net is not None else args.world
    master = net.addr(0) if net is not None else "127.0.0.1"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result_file = os.path.join(tmp, f"result{index}.json")
    procs, logs = [], []
    try:
        for rank in range(world):
            env = dict(os.environ, MASTER_ADDR=master, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                       LOCAL_RANK=str(rank % (args.procs_per_node if net is not None else world)),
                       DDP_QHOOKS_BENCH_LAUNCH="netsim" if net is not None else "local processes",
                       DDP_QHOOKS_BENCH_CPU="1" if args.cpu else "0", DDP_QHOOKS_BENCH_QUIET="1",
                       DDP_QHOOKS_BENCH_HEARTBEAT=os.path.join(tmp, f"beat{index}"))
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
            argv = _worker_argv(args, configs, result_file if rank == 0 else os.path.join(tmp, f"r{index}_{rank}.json"),
                                compute_s)
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
    configuration that crashes its processes (torch's PowerSGD or quantization hooks on Gloo) is
    reported as failed and the others still run; compute time is measured once, by the first group."""
    net = None
    rows, meta = [], None
    compute_s = None
    with tempfile.TemporaryDirectory(prefix="ddp_qhooks_bench_") as tmp:
        try:
            if args.netsim:
                from .netsim import NetSim
                net = NetSim(nodes=args.nodes, rate=args.netsim)
                net.up()
            for i, spec in enumerate(args.configs):
                label = f"[{i + 1}/{len(args.configs)}] {spec}"
                _status(f"{label}: running ...")
                t0 = time.perf_counter()
                res = _run_group(args, [spec], net, tmp, compute_s, i)
                if "crashed" in res:
                    row = {k: None for k in RESULT_KEYS}
                    row.update(config=spec, kind=parse_config(spec)["kind"], status="failed",
                               error=f"crashed the worker processes: {res['crashed']}", compute_s=compute_s)
                    _status(f"{label}: FAILED ({res['crashed'][:80]})", done=True)
                else:
                    row = res["rows"][0]
                    meta = meta or res["meta"]
                    compute_s = row["compute_s"] if compute_s is None else compute_s
                    took = time.perf_counter() - t0
                    state = f"{1000 * row['step_s']:.1f} ms/step" if row["status"] == "ok" else "failed"
                    _status(f"{label}: {state} ({took:.0f} s)", done=True)
                rows.append(row)
            if meta is None:
                raise RuntimeError("every configuration failed; rerun with --verbose to see the workers' output")
            for r in rows:
                r["compute_s"] = r["compute_s"] if r["compute_s"] is not None else compute_s
            _derive(rows, args.procs_per_node if net is not None else 1)
            meta["compute_s"] = compute_s
            meta["ranks_per_host"] = args.procs_per_node if net is not None else 1
            if net is not None:
                meta["tc_bytes_total"] = [net.bytes_sent(n) for n in range(args.nodes)]
            return {"meta": meta, "rows": rows}
        finally:
            if net is not None:
                net.down()


def _status(text: str, done: bool = False) -> None:
    if sys.stderr.isatty():
        print(f"\r\x1b[2K{text}", end="\n" if done else "", file=sys.stderr, flush=True)
    elif done:
        print(text, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddp_qhooks.bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="configurations: " + " ".join(DEFAULT_CONFIGS))
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                   help="fp32, fp16_hook, bf16_hook, powersgd, quant_pertensor, or codec[:bits][,opt=val][,ef=0]")
    p.add_argument("--task", choices=("synthetic", "fmnist", "lm"), default="synthetic",
                   help="synthetic: communication-bound MLP (throughput); fmnist: SmallCNN on Fashion-MNIST (accuracy); "
                        "lm: tools/lm.py's char-level transformer (its test_accuracy column is the validation loss)")
    p.add_argument("--params", type=float, default=5e6, help="synthetic model size in parameters (default 5e6)")
    p.add_argument("--batch", type=int, default=None, help="per-rank batch (default: 4 synthetic, 64 fmnist)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (DDP rebuilds buckets, PowerSGD starts)")
    p.add_argument("--train-steps", type=int, default=None,
                   help="extra untimed training steps before loss/accuracy are read (default: 0 synthetic, 300 fmnist)")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate, momentum 0.9 (default 0.01)")
    p.add_argument("--world", type=int, default=2, help="local processes to spawn (ignored under torchrun)")
    p.add_argument("--netsim", default=None, metavar="RATE",
                   help="run the ranks in network namespaces joined by links shaped to RATE (e.g. 200mbit, 1gbit); root only")
    p.add_argument("--nodes", type=int, default=2, help="simulated hosts with --netsim")
    p.add_argument("--procs-per-node", type=int, default=1, help="ranks per simulated host with --netsim")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--timeout", type=float, default=180,
                   help="seconds without progress (one step) before a configuration is reported as hung")
    p.add_argument("--data", default=None, help="Fashion-MNIST directory (default: Debian package path)")
    p.add_argument("--output", default="bench_results", help="directory for bench.json/.csv/.md/.png ('' = none)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--timeline", action="store_true",
                   help="also print each configuration's per-bucket timeline of the last timed step")
    p.add_argument("--cpu", action="store_true", help="use Gloo on CPU even if CUDA is available")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--compute-s", type=float, default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.batch is None:
        args.batch = 64 if args.task == "fmnist" else 4
    if args.train_steps is None:
        args.train_steps = 300 if args.task == "fmnist" else 0
    if args.lr is None:
        args.lr = 0.01
    for c in args.configs:
        parse_config(c)  # bad configurations fail here, before any process starts
    if args.task == "fmnist":
        data.find_dir(args.data)  # clear error naming the package when the data is missing
    if args.netsim:
        from .netsim import check_environment, parse_rate
        parse_rate(args.netsim)
        check_environment()
    if args._worker or "RANK" in os.environ and "WORLD_SIZE" in os.environ and not args.netsim:
        _worker_main(args)
        return
    result = _launch(args)
    _report(result, args)


if __name__ == "__main__":
    main()
