"""FSDP2 rows of the bandwidth benchmark (``python -m ddp_qhooks.bench --fsdp``).

Every direct child of the task's model that holds parameters and then the model itself are
``fully_shard``-ed with ``reshard_after_forward=False`` (parameters are gathered once per step, in
the forward: the gradient reduce-scatter is then half of FSDP's fp32 traffic instead of a third).

* ``fp32``: FSDP's own reduce-scatter over all ranks, the baseline;
* ours, ``<codec>[:<bits>][,option=value...]``: ``ddp_qhooks.fsdp.register`` on every FSDP module;
* with ``--procs-per-node L > 1`` (``--nodes N`` hosts of L ranks), ours is the hierarchical mode
  instead: FSDP over the L ranks of a host (``node_mesh``), ``register_between_nodes`` across hosts
  (codec ``none``: fp32 between hosts, FSDP's hybrid sharding).

Bytes per step and rank: the parameter all-gathers (fp32, counted from FSDP's padded shards:
``(W_shard - 1) x shard`` per module) plus the reduce-scatter (fp32: ``(W - 1) x S x 4`` per
module; ours: the package's ``wire_bytes_sent``).  In the hierarchical mode the all-gathers and the
intra-host reduce-scatter stay on the host: bytes are what crosses hosts (the package's count); for
the flat fp32 baseline the cross-host share of its exchanges, ``(W - L) / (W - 1)``, assuming every
rank exchanges directly with every other (tc's counters measure it with ``--netsim``).  Compute
time: the same steps on an unsharded copy of the model, without communication.  Measured with
``--netsim 200mbit`` at W = 2: Gloo's fp32 reduce-scatter puts 1.5x the textbook bytes on the
link (what an allreduce sends), so there the ideal speedup is computed from tc's byte counters.
"""
from __future__ import annotations

import math
import statistics
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn as nn

FSDP_BUILTINS = ("fp32",)


def shard(model: nn.Module, mesh=None) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    for child in model.children():
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    return model


def gather_bytes(model: nn.Module) -> int:
    """Bytes one rank sends per step in FSDP's parameter all-gathers (once per module and step)."""
    from torch.distributed.fsdp import FSDPModule
    total = 0
    for mod in model.modules():
        if not isinstance(mod, FSDPModule):
            continue
        for pg in mod._get_fsdp_state()._fsdp_param_groups:
            w = pg._all_gather_process_group.size()
            for fp in pg.fsdp_params:
                total += (w - 1) * fp.padded_sharded_param_size.numel() * fp.sharded_param.element_size()
    return total


def fp32_reduce_scatter_bytes(model: nn.Module) -> int:
    """Bytes one rank sends per step in FSDP's fp32 reduce-scatter: (W - 1) x S x 4 per module."""
    from torch.distributed.fsdp import FSDPModule
    total = 0
    for mod in model.modules():
        if not isinstance(mod, FSDPModule):
            continue
        for pg in mod._get_fsdp_state()._fsdp_param_groups:
            w = pg._reduce_scatter_process_group.size()
            total += (w - 1) * 4 * sum(fp.padded_sharded_param_size.numel() for fp in pg.fsdp_params
                                       if fp.sharded_param.requires_grad)
    return total


def _step(model, task, opt, step):
    x, y = task.batch_for(step)
    loss = task.loss(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def _timed(model, task, opt, start, count, device, progress=None):
    from .bench import _max_over_ranks
    times, losses = [], []
    for s in range(start, start + count):
        if progress:
            progress(s - start)
        dist.barrier()
        t0 = time.perf_counter()
        loss = _step(model, task, opt, s)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    return _max_over_ranks(times, device), losses


def _compute_seconds(task, args, device) -> float:
    """Median step of an unsharded local copy: forward, backward, optimizer, no communication."""
    from .bench import _max_over_ranks
    model = task.model()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    times = []
    for s in range(1 + max(3, min(args.steps, 10))):
        t0 = time.perf_counter()
        _step(model, task, opt, s)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(_max_over_ranks(times[1:], device))


def run_fsdp_worker(args, task, configs, device, ifname) -> list | None:
    """Rank side of ``--fsdp``: every configuration one after the other from the same weights."""
    import ddp_qhooks

    from .bench import RESULT_KEYS, _derive, _innermost_error, _mean_over_ranks, _progress
    from .netsim import tc_bytes_sent_here
    rank, world = dist.get_rank(), dist.get_world_size()
    per_node = args.procs_per_node
    hierarchical = per_node > 1
    compute_s = args.compute_s if args.compute_s is not None else _compute_seconds(task, args, device)
    rows = []
    for i, cfg in enumerate(configs):
        row = {k: None for k in RESULT_KEYS}
        row.update(config=cfg["spec"], kind=cfg["kind"], status="ok", compute_s=compute_s, link=args.netsim)
        try:
            model = task.model()
            state = None
            if cfg["spec"] == "fp32":
                shard(model)
                row["note"] = ("FSDP's own fp32 reduce-scatter over all ranks (bytes: the textbook volume; Gloo's "
                               "reduce-scatter sends more, see tc MB/step: with --netsim the ideal uses tc's bytes)")
            elif hierarchical:
                mesh = ddp_qhooks.fsdp.node_mesh(per_node, device.type)
                shard(model, mesh["local"])
                state = ddp_qhooks.fsdp.register_between_nodes(model, mesh, cfg["codec"], bits=cfg["bits"],
                                                               error_feedback=cfg["error_feedback"], **cfg["options"])
                row["note"] = f"hierarchical: FSDP over the {per_node} ranks of a host, {cfg['codec']} between hosts"
            else:
                shard(model)
                state = ddp_qhooks.fsdp.register(model, cfg["codec"], cfg["bits"],
                                                 error_feedback=cfg["error_feedback"], **cfg["options"])
            opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
            label = f"[{i + 1}/{len(configs)}] fsdp {cfg['spec']}"
            _timed(model, task, opt, 0, args.warmup, device, lambda s: _progress(rank, f"{label}: warm-up {s + 1}"))
            before = state.stats()["wire_bytes_sent"] if state is not None else 0
            tc0 = tc_bytes_sent_here(ifname) if ifname else None
            times, losses = _timed(model, task, opt, args.warmup, args.steps, device,
                                   lambda s: _progress(rank, f"{label}: step {s + 1}/{args.steps}"))
            tc1 = tc_bytes_sent_here(ifname) if ifname else None
            if args.train_steps:
                _, more = _timed(model, task, opt, args.warmup + args.steps, args.train_steps, device)
                losses += more
            row["final_loss"] = _mean_over_ranks(statistics.fmean(losses[-5:]), device)
            ordered = sorted(times)
            row["step_s"] = statistics.median(times)
            row["step_p10_s"] = ordered[int(0.1 * (len(ordered) - 1))]
            row["step_p90_s"] = ordered[int(math.ceil(0.9 * (len(ordered) - 1)))]
            row["comm_s"] = max(0.0, row["step_s"] - compute_s)
            gather = gather_bytes(model)
            if state is None:
                total = gather + fp32_reduce_scatter_bytes(model)
                row["bytes_per_step"] = total * (world - per_node) / (world - 1) if hierarchical else total
                row["bytes_source"] = "computed from FSDP's padded shards" + \
                    (" (cross-host share)" if hierarchical else "")
            else:
                sent = (state.stats()["wire_bytes_sent"] - before) / args.steps
                row["bytes_per_step"] = sent if hierarchical else gather + sent
                row["bytes_source"] = "package (wire_bytes_sent" + (", between hosts)" if hierarchical else
                                                                     " + computed all-gathers)")
                row["compression_ratio"] = state.stats()["compression_ratio"]
            if tc0 is not None and tc1 is not None:
                row["tc_bytes_per_step"] = (tc1 - tc0) / args.steps
            del model, opt, state
        except Exception as exc:
            row["status"] = "failed"
            row["error"] = _innermost_error(exc)
            if args.verbose:
                traceback.print_exc()
        rows.append(row)
    _progress(rank, "done")
    _derive(rows, per_node if ifname else 1, prefer_tc=True)
    return rows if rank == 0 else None
