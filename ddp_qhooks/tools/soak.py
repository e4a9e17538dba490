"""Soak test: many steps of a small model per codec; memory and the hook state must stay flat.

    python -m ddp_qhooks.tools.soak                                   # every codec, 2,000 steps, 2 ranks
    python -m ddp_qhooks.tools.soak --codecs stochastic topk --steps 500 --exchange alltoall --json soak.json

Per codec, W local Gloo processes (spawned, one torch thread each) train a 3-layer MLP (49,504
parameters in 6 tensors; ``bucket_cap_mb`` small enough for 3 DDP buckets) on synthetic data from
a fixed seed, with ``ddp_qhooks.register(ddp, codec, bits=..., ...)``.  A *control* run trains the
same model with plain DDP (no comm hook) under the same conditions.  At step ``--warmup`` (after
DDP's bucket rebuild and the allocator's warm-up), every ``--sample-every`` steps and at the end,
each rank records, after ``gc.collect()``:

* ``rss``: resident set size (``/proc/self/statm``), MiB, read after the C heap has handed its
  free pages back (``malloc_trim(0)``), so that pages an arena keeps after a free do not count;
* ``heap``: bytes the C heap has handed out and not got back (glibc ``mallinfo2``), MiB: unlike
  RSS it does not count memory the allocator keeps after a free, nor fragmentation, so it is
  exact to a few KiB from step to step;
* the hook state's size: bytes of all tensors in ``state.state_dict()`` (``sd_bytes``); the
  tensors the state object holds, found by walking its object graph (``held_tensors`` and the
  bytes of their distinct storages, ``held_bytes``: residuals, staging, payload and gather
  buffers, codec tables); the entries of every dict / list / set / tuple in that graph
  (``entries``: per-step Python bookkeeping that piles up); ``len(pickle.dumps(state))``; and
  apart, the codecs' per-thread scratch buffers (``scratch_bytes``, see :func:`_walk`);
* ``live_tensors`` / ``py_objects``: torch.Tensor objects / all objects the garbage collector
  tracks that were created after the training loop started (``gc.freeze()`` before it).

The ranks run with torch's c10d flight recorder off (``TORCH_FR_BUFFER_SIZE=0``; ``--flight-recorder``
changes it): it keeps a ring of the last 2,000 collectives (~0.85 KiB each), so with it the heap
grows ~1.7 MiB over a process group's first 2,000 collectives and then stays flat (measured with
plain ``dist.all_reduce``, no hook) -- torch's, bounded, and it would hide the hook's figures.

Verdict per codec and rank (a row FAILs if any rank does):

* the run failed, or the loss is not finite;
* the hook state's ``sd_bytes``, ``held_tensors``, ``held_bytes``, ``entries`` are not exactly the
  same in every sample from warm-up on (a hook that does not leak allocates its buffers once per
  bucket layout and reuses them; codec scratch, sized on demand per thread, is left to the heap
  check), or its pickle grew by more than ``PICKLE_SLACK`` bytes (only
  step and traffic counters grow; a Python int pickles in 1, 2 or 4 bytes);
* ``live_tensors`` or ``py_objects`` end more than ``COUNT_SLACK`` above their lowest reading from
  warm-up on (they may drop once, e.g. when DDP's own bookkeeping settles; a leak of one object a
  step ends hundreds above);
* heap: its growth from warm-up to end in excess of the control's (same rank, same steps) is
  ``HEAP_EXCESS_MIB`` or more, or the least-squares slope of that excess over the second half of
  the run is ``HEAP_SLOPE_KIB`` KiB per 1,000 steps or more (and rises by ``HEAP_SLOPE_FLOOR_KIB``
  or more over that half: short windows give noisy slopes);
* RSS: growth from warm-up to end of ``RSS_GROWTH_MIB`` or more, or a least-squares slope over the
  second half of the run of ``RSS_SLOPE_KIB`` KiB per 1,000 steps or more (rising by
  ``RSS_SLOPE_FLOOR_KIB`` or more over that half).  RSS also sees what
  the C heap does not (Python's object arenas, memory a library maps itself) but moves in
  page-sized and arena-sized jumps, hence the looser limits; see the constants.

Second-half slopes: a leak grows linearly in both halves, warm-up effects (allocator free lists)
only early on.  The control run is judged on its object counts only.

Each codec runs in a fresh group of processes by default: in one long-lived process a later codec
would reuse the heap an earlier codec freed, so its RSS growth could hide in those holes.
``--reuse-processes``
runs the control and all codecs one after the other in one group instead (faster; each codec is
still measured from its own warm-up and the heap figures stay exact).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

__all__ = ["soak", "format_table", "failed", "main", "codec_settings", "rss_mib", "heap_mib", "CONTROL", "DEFAULT_STEPS",
           "HEAP_EXCESS_MIB", "HEAP_SLOPE_KIB", "RSS_GROWTH_MIB", "RSS_SLOPE_KIB"]

DEFAULT_STEPS = 2000
DEFAULT_WARMUP = 200
DEFAULT_SAMPLE_EVERY = 100
DEFAULT_BITS = 4
CONTROL = "ddp"             # the control run: plain DDP allreduce, no comm hook

# Sizes: the model's weights, grads and SGD momentum are 3 x 193 KiB; the hook's buffers for the 3
# buckets (payload, gather, residual, staging) 0.5-1 MiB, plus codec scratch (up to ~7.5 MiB per
# thread that ran the codec); the smallest buffer it allocates per bucket is the 4-bit payload of
# the smallest bucket, 3 KiB.  Over the 1,800 steps after warm-up of the default run, and measured
# on all 13 codecs x {allgather, alltoall} at 2,000 steps (results/soak.txt):
# * HEAP_EXCESS_MIB: 0.5 MiB is 290 bytes a step: any per-step leak of a tensor (its TensorImpl and
#   storage alone are > 300 bytes), let alone of a buffer.  Measured: +0.00 to +0.05 MiB;
# * HEAP_SLOPE_KIB: 128 KiB / 1,000 steps = 131 bytes a step over the second half: a leak that
#   starts late, or is masked by a one-off free.  Measured: -3 to +17 KiB/1k steps;
# * RSS_GROWTH_MIB: a bound on one-off jumps; a leaked payload of the smallest bucket per step
#   (3 KiB x 1,800 = 5.3 MiB) plus the fragmentation it causes exceeds it (the self-check's 1 KiB
#   a step grows RSS by ~30 KiB a step), larger leaks by far.  Measured: +0.02 to +1.31 MiB;
# * RSS_SLOPE_KIB: 1 KiB a step over the second half.  RSS moves in 4 KiB pages and in whole
#   arenas, so a tighter bound flags noise.  Measured: +6 to +333 KiB/1k steps.
#   The heap and object checks are the precise ones.
HEAP_EXCESS_MIB = 0.5
HEAP_SLOPE_KIB = 128.0      # KiB per 1,000 steps
RSS_GROWTH_MIB = 8.0
RSS_SLOPE_KIB = 1024.0      # KiB per 1,000 steps
# A slope fails only if the rise it makes over the second half also reaches this floor: a slope
# fitted to a short window (the test's 100 steps) is noise-dominated.  Measured rises of
# non-leaking runs over the second half: heap <= 14 KiB, RSS <= 300 KiB (2,000 steps), <= 10 KiB /
# 80 KiB (300 steps); the self-check leak rises by 140 KiB (heap) in 100 steps.
HEAP_SLOPE_FLOOR_KIB = 64.0
RSS_SLOPE_FLOOR_KIB = 1024.0
PICKLE_SLACK = 64           # bytes
SELF_CHECK_LEAK = 1024      # bytes a step leaked by the self-check run (1.8 MiB over 1,800 steps)
FLAT_KEYS = ("sd_bytes", "held_tensors", "held_bytes", "entries")   # the hook state's: exactly constant
COUNT_KEYS = ("live_tensors", "py_objects")   # process-wide: must not end above their lowest reading
# ... by more than this: a Python object created by a backend thread (a frame, a Work wrapper) can
# be alive at one sample and gone at the next; a leak grows with every step, far past it.
COUNT_SLACK = 3

IN_FEATURES, HIDDEN, CLASSES, BATCH = 128, (192, 96), 64, 32
BUCKET_CAP_MB = 0.02        # 21 KiB: each weight (96, 72, 24 KiB) closes a bucket with the bias before it: 3 buckets


# -- configuration ----------------------------------------------------------------------------------
def codec_settings(name: str, bits: int = DEFAULT_BITS) -> dict:
    """The configuration the soak uses for codec ``name``: ``bits`` where the codec accepts it
    (fixed-width codecs get the hook's default 8 and use their own width), error feedback on
    unless the hook refuses it for this codec (qsgd without small blocks: unbiased, its error can
    exceed the value), default codec options."""
    if name == CONTROL:
        return {"codec": CONTROL, "bits": 32, "error_feedback": False, "options": {}}
    from ..codecs import _valid_bits
    from ..engine import QuantizedHookState

    valid = _valid_bits(name)
    b = bits if bits in valid else (8 if 8 in valid else valid[0])
    try:
        QuantizedHookState(codec=name, bits=b, error_feedback=True)
        ef = True
    except ValueError:
        QuantizedHookState(codec=name, bits=b, error_feedback=False)  # raises if neither is valid
        ef = False
    return {"codec": name, "bits": b, "error_feedback": ef, "options": {}}


# -- measurements (inside a rank) ---------------------------------------------------------------------
def rss_mib() -> float:
    """Resident set size of this process in MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # not Linux: the peak is the best there is
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**20 if sys.platform == "darwin" else 2**10)


_MALLINFO2 = None


def heap_mib() -> float | None:
    """Bytes handed out by the C heap and not yet freed, MiB (glibc >= 2.33 ``mallinfo2``:
    ``uordblks``, summed over all arenas, + ``hblkhd``, the chunks it mmapped); None elsewhere."""
    global _MALLINFO2
    if _MALLINFO2 is None:
        _MALLINFO2 = False
        try:
            import ctypes

            class Mallinfo2(ctypes.Structure):
                _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                           "fsmblks", "uordblks", "fordblks", "keepcost")]
            fn = ctypes.CDLL("libc.so.6").mallinfo2
            fn.restype = Mallinfo2
            _MALLINFO2 = fn
        except (OSError, AttributeError):
            pass
    if not _MALLINFO2:
        return None
    info = _MALLINFO2()
    return (info.uordblks + info.hblkhd) / 2**20


def _return_free_pages() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim(0)``, every arena)
    before RSS is read, so that RSS counts memory in use, not pages a thread's arena kept after
    a free: each codec's completion thread takes an arena of its own, and in a reused process
    those arenas' free pages moved RSS by 1-3 MiB in single jumps while the heap stayed flat."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _walk(root) -> dict:
    """What the object graph of ``root`` holds, through ddp_qhooks objects and plain containers
    (not into process groups and other torch objects): ``held_tensors``, ``held_bytes`` (of their
    distinct storages) and ``entries`` (of every dict / list / set / tuple), and apart from them
    the codecs' per-thread scratch (attributes named ``_scratch``): ``scratch_tensors``,
    ``scratch_bytes``.  Scratch buffers are sized on demand, per (device, thread): a Gloo thread
    that decodes a larger bucket than before for the first time grows its buffer, at any step
    (seen: mulaw, +56 KiB at step ~125 on one rank of two); bounded, and in the C heap, which the
    heap check watches."""
    seen, storages = set(), ({}, {})
    counts = {"held_tensors": 0, "entries": 0, "scratch_tensors": 0}
    stack = [(root, False)]
    while stack:
        obj, scratch = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            counts["scratch_tensors" if scratch else "held_tensors"] += 1
            st = obj.untyped_storage()
            storages[scratch][(st.device.type, st.data_ptr())] = st.nbytes()
            continue
        if isinstance(obj, dict):
            if not scratch:
                counts["entries"] += len(obj)
            stack.extend((v, scratch) for v in obj.keys())
            stack.extend((v, scratch) for v in obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            if not scratch:
                counts["entries"] += len(obj)
            stack.extend((v, scratch) for v in obj)
        elif type(obj).__module__.startswith("ddp_qhooks"):
            if hasattr(obj, "__dict__"):
                stack.extend((v, scratch or k == "_scratch") for k, v in vars(obj).items())
            for slot in getattr(type(obj), "__slots__", ()):
                if hasattr(obj, slot):
                    stack.append((getattr(obj, slot), scratch or slot == "_scratch"))
    # a storage reached both ways counts once, as held
    scratch_only = {k: v for k, v in storages[True].items() if k not in storages[False]}
    return {**counts, "held_bytes": sum(storages[False].values()), "scratch_bytes": sum(scratch_only.values())}


def _object_counts() -> tuple[int, int]:
    """(tensors, all objects) the garbage collector tracks, not counting the ones frozen by
    ``gc.freeze()`` before the training loop (imports, model, optimizer): only objects created
    since can pile up, and skipping the ~280k frozen ones makes a sample ~50x cheaper."""
    objs = gc.get_objects()
    # issubclass(type(o)) rather than isinstance: isinstance reads __class__, which trips
    # deprecation proxies such as torch.distributed.reduce_op
    return sum(1 for o in objs if issubclass(type(o), torch.Tensor)), len(objs)


def _settled_counts(previous) -> tuple[int, int]:
    """:func:`_object_counts`, re-read a few times if they differ from the previous sample: right
    after a step a Gloo thread may still be dropping its last references to a bucket's tensors
    (seen: +2 tensors, +3 objects, in ~1 of 50 samples).  A leak does not go away; the least of
    the readings is kept."""
    counts = _object_counts()
    for _ in range(8):
        if previous is None or counts == previous:
            break
        time.sleep(0.05)
        gc.collect()
        again = _object_counts()
        counts = (min(counts[0], again[0]), min(counts[1], again[1]))
    return counts


def _sample(step: int, state, elapsed: float, previous=None) -> dict:
    gc.collect()
    _return_free_pages()
    out = {"step": step, "rss": rss_mib(), "heap": heap_mib(), "elapsed_s": elapsed}
    if state is not None:
        out.update(sd_bytes=_tensor_bytes(state.state_dict()), **_walk(state), pickle_bytes=len(pickle.dumps(state)))
    prev = None if previous is None else (previous["live_tensors"], previous["py_objects"])
    out["live_tensors"], out["py_objects"] = _settled_counts(prev)
    return out


# -- one codec in one rank ----------------------------------------------------------------------------
def _model() -> nn.Module:
    h1, h2 = HIDDEN
    return nn.Sequential(nn.Linear(IN_FEATURES, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, CLASSES))


def _train_codec(rank: int, world: int, cfg: dict, exchange: str, steps: int, warmup: int, every: int,
                 seed: int) -> dict:
    import ddp_qhooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(seed)  # same initial model on every rank (DDP broadcasts rank 0's anyway)
    model = _model()
    teacher = torch.randn(IN_FEATURES, CLASSES, generator=torch.Generator().manual_seed(seed + 1))
    data = torch.Generator().manual_seed(seed * 1000 + 2 + rank)
    ddp = DDP(model, bucket_cap_mb=BUCKET_CAP_MB)
    state = None
    if cfg["codec"] != CONTROL:
        state = ddp_qhooks.register(ddp, cfg["codec"], bits=cfg["bits"], error_feedback=cfg["error_feedback"],
                                    exchange=exchange, seed=seed, **cfg["options"])
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    marks = set(range(every, steps + 1, every)) | {warmup, steps}
    leak_bytes = int(cfg.get("leak_bytes_per_step", 0))
    leaked = []  # the self-check's deliberate leak: held here, out of the hook state's reach
    samples, first, last = [], [], []
    sample_s = 0.0
    gc.collect()
    gc.freeze()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x = torch.randn(BATCH, IN_FEATURES, generator=data)
        y = (x @ teacher).argmax(1)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(ddp(x), y)
        loss.backward()
        opt.step()
        if step <= 10:
            first.append(float(loss.detach()))
        elif step > steps - 10:
            last.append(float(loss.detach()))
        del x, y, loss
        if leak_bytes:
            leaked.append(torch.zeros(leak_bytes, dtype=torch.uint8))
        if step in marks:
            t1 = time.perf_counter()
            samples.append(_sample(step, state, t1 - t0, samples[-1] if step > warmup else None))
            sample_s += time.perf_counter() - t1
    seconds = time.perf_counter() - t0
    stats = state.stats() if state is not None else {}
    out = {"samples": samples, "loss_first": sum(first) / len(first), "loss_last": sum(last or first) / len(last or first),
           "seconds": seconds, "sample_seconds": sample_s, "buckets": stats.get("buckets_last_step"),
           "modes": stats.get("exchange_last_step", {}), "hook_steps": stats.get("steps"),
           "codec_bits": stats.get("bits", cfg["bits"])}
    del ddp, state, opt, model, leaked
    gc.unfreeze()
    gc.collect()
    return out


def _entry(rank, world, port, jobs, exchange, steps, warmup, every, seed, outdir, timeout_s, flight_recorder):
    """One rank: run each job (codec configuration) in turn, write a JSON file per job."""
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if flight_recorder is not None:
            os.environ["TORCH_FR_BUFFER_SIZE"] = str(flight_recorder)
        torch.set_num_threads(1)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
        try:
            for j, cfg in enumerate(jobs):
                try:
                    res = {"ok": True, **_train_codec(rank, world, cfg, exchange, steps, warmup, every, seed)}
                except BaseException as exc:  # report; the other ranks fail alike or time out
                    res = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()}
                with open(os.path.join(outdir, f"{j}.{rank}.json"), "w") as f:
                    json.dump(res, f)
                if not res["ok"]:
                    break  # the process group may be unusable after a failed collective
        finally:
            try:
                dist.destroy_process_group()
            except Exception:
                pass
    finally:
        # torch + Gloo on CPU occasionally aborts during interpreter shutdown after the group was
        # destroyed (see tests/_dist.py): the results are written, leave without the shutdown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_group(jobs, world, exchange, steps, warmup, every, seed, timeout_s, flight_recorder) -> list[list[dict]]:
    """Spawn ``world`` ranks that run ``jobs`` one after the other; per job, the per-rank results."""
    with tempfile.TemporaryDirectory(prefix="ddp_qhooks_soak_") as outdir:
        err = None
        try:
            mp.start_processes(_entry, args=(world, _free_port(), jobs, exchange, steps, warmup, every, seed, outdir,
                                             timeout_s, flight_recorder), nprocs=world, join=True, start_method="spawn")
        except mp.ProcessExitedException as exc:
            err = f"rank exited abnormally: {exc}"
        out = []
        for j in range(len(jobs)):
            ranks = []
            for r in range(world):
                path = os.path.join(outdir, f"{j}.{r}.json")
                if os.path.exists(path):
                    with open(path) as f:
                        ranks.append(json.load(f))
                else:
                    ranks.append({"ok": False, "error": err or f"rank {r} left no result", "tb": ""})
            out.append(ranks)
        return out


# -- verdict --------------------------------------------------------------------------------------
def _slope_kib_per_1000(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (step, MiB) points, in KiB per 1,000 steps."""
    if len(points) < 2:
        return 0.0
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return 1000 * 1024 * sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


def _judge_rank(res: dict, control, warmup: int, limits: dict, is_control: bool = False) -> dict:
    if not res.get("ok"):
        return {"why": [res.get("error", "failed")]}
    samples = [s for s in res["samples"] if s["step"] >= warmup]
    warm, end = samples[0], samples[-1]
    why = []
    if not all(map(_finite, (res["loss_first"], res["loss_last"]))):
        why.append(f"loss not finite ({res['loss_first']} -> {res['loss_last']})")
    for k in FLAT_KEYS:
        vals = [s[k] for s in samples if k in s]
        if len(set(vals)) > 1:
            why.append(f"{k} not flat: {vals[0]} -> {vals[-1]} (min {min(vals)}, max {max(vals)})")
    for k in COUNT_KEYS:
        vals = [s[k] for s in samples]
        if vals[-1] > min(vals) + COUNT_SLACK:
            why.append(f"{k} grew: {vals[0]} at step {warm['step']}, least {min(vals)}, {vals[-1]} at the end")
    if "pickle_bytes" in warm and end["pickle_bytes"] - warm["pickle_bytes"] > PICKLE_SLACK:
        why.append(f"pickled state grew {end['pickle_bytes'] - warm['pickle_bytes']} B")
    out = {"warm": warm, "end": end, "rss_growth": end["rss"] - warm["rss"]}
    half = (warm["step"] + end["step"]) / 2
    second = [s for s in samples if s["step"] >= half]
    span = (second[-1]["step"] - second[0]["step"]) / 1000  # thousands of steps the slopes are fitted over
    out["rss_slope"] = _slope_kib_per_1000([(s["step"], s["rss"]) for s in second])
    if is_control:  # the control run is the reference: judged on its object counts only
        out["why"] = why
        return out
    if out["rss_growth"] >= limits["rss_growth_mib"]:
        why.append(f"RSS grew {out['rss_growth']:.2f} MiB (limit {limits['rss_growth_mib']})")
    if out["rss_slope"] >= limits["rss_slope_kib"] and out["rss_slope"] * span >= RSS_SLOPE_FLOOR_KIB:
        why.append(f"RSS slope {out['rss_slope']:.0f} KiB/1000 steps over the second half "
                   f"(limit {limits['rss_slope_kib']})")
    out["heap_growth"] = end["heap"] - warm["heap"] if warm["heap"] is not None else None
    if control is not None and control.get("ok") and warm["heap"] is not None:
        ctl = {s["step"]: s["heap"] for s in control["samples"]}
        excess = [(s["step"], s["heap"] - ctl[s["step"]]) for s in samples if s["step"] in ctl]
        if len(excess) >= 2:
            out["heap_excess"] = excess[-1][1] - excess[0][1]
            out["heap_slope"] = _slope_kib_per_1000([(x, y) for x, y in excess if x >= half])
            if out["heap_excess"] >= limits["heap_excess_mib"]:
                why.append(f"heap grew {out['heap_excess']:.3f} MiB more than the control's "
                           f"(limit {limits['heap_excess_mib']})")
            if out["heap_slope"] >= limits["heap_slope_kib"] and out["heap_slope"] * span >= HEAP_SLOPE_FLOOR_KIB:
                why.append(f"heap excess over the control rises {out['heap_slope']:.0f} KiB/1000 steps "
                           f"(limit {limits['heap_slope_kib']})")
    out["why"] = why
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and x == x and abs(x) != float("inf")


def _row(cfg: dict, ranks: list[dict], controls, warmup: int, limits: dict) -> dict:
    controls = controls or [None] * len(ranks)
    judged = [_judge_rank(r, c, warmup, limits, is_control=cfg["codec"] == CONTROL) for r, c in zip(ranks, controls)]
    row = {"codec": cfg["codec"], "bits": cfg["bits"], "error_feedback": cfg["error_feedback"],
           "options": cfg["options"], "ranks": ranks, "leak_bytes_per_step": cfg.get("leak_bytes_per_step", 0),
           "expect_fail": bool(cfg.get("leak_bytes_per_step"))}
    row["why"] = [f"rank {i}: {w}" for i, j in enumerate(judged) for w in j["why"]]
    row["verdict"] = "FAIL" if row["why"] else "PASS"
    ok = [(i, j) for i, j in enumerate(judged) if "warm" in j]
    if ok:
        i, worst = max(ok, key=lambda ij: ij[1]["rss_growth"])
        w, e, r = worst["warm"], worst["end"], ranks[i]
        row.update(worst_rank=i, steps=e["step"], warm_step=w["step"], rss_warm=w["rss"], rss_end=e["rss"],
                   rss_growth=worst["rss_growth"], rss_slope=max(j["rss_slope"] for _, j in ok),
                   heap_warm=w["heap"], heap_end=e["heap"],
                   codec_bits=r["codec_bits"], buckets=r["buckets"], modes=r["modes"], loss_first=r["loss_first"],
                   loss_last=r["loss_last"], train_seconds=max(ranks[k]["seconds"] for k, _ in ok),
                   sample_seconds=max(ranks[k]["sample_seconds"] for k, _ in ok))
        excess = [j["heap_excess"] for _, j in ok if "heap_excess" in j]
        slopes = [j["heap_slope"] for _, j in ok if "heap_slope" in j]
        row["heap_excess"] = max(excess) if excess else None
        row["heap_slope"] = max(slopes) if slopes else None
        for k in FLAT_KEYS + COUNT_KEYS + ("pickle_bytes", "scratch_tensors", "scratch_bytes"):
            row[f"{k}_warm"], row[f"{k}_end"] = w.get(k), e.get(k)
    return row


def soak(codecs=None, steps: int = DEFAULT_STEPS, world: int = 2, exchange: str = "auto", bits: int = DEFAULT_BITS,
         warmup: int = DEFAULT_WARMUP, sample_every: int = DEFAULT_SAMPLE_EVERY, fresh: bool = True, seed: int = 0,
         heap_excess_mib: float = HEAP_EXCESS_MIB, heap_slope_kib: float = HEAP_SLOPE_KIB,
         rss_growth_mib: float = RSS_GROWTH_MIB, rss_slope_kib: float = RSS_SLOPE_KIB, timeout_s: float = 300.0,
         flight_recorder: int | None = 0, configs=None, self_check: bool = False, progress=None) -> dict:
    """Run the soak; returns ``{"rows": [...], "control": row, "config": {...}, "seconds": ...}``.

    ``codecs``: names (default: every codec), each with :func:`codec_settings`; or ``configs``:
    dicts ``{"codec", "bits", "error_feedback", "options"}`` for other settings.  ``self_check``
    adds a run of codec ``none`` that leaks ``SELF_CHECK_LEAK`` bytes a step outside the hook;
    its row must FAIL (``expect_fail``), else :func:`failed` reports the soak as failed: the
    detector is then blind.

    Each row: ``codec``, ``bits``, ``error_feedback``, ``verdict`` (``PASS`` / ``FAIL``), ``why``
    (the reasons of a FAIL), figures of the rank with the largest RSS growth (``rss_warm``,
    ``rss_end``, ``rss_growth``, ``heap_warm``, ``heap_end``, ``sd_bytes_warm`` / ``_end``,
    ``held_*``, ``entries_*``, ``live_tensors_*``, ``pickle_bytes_*``), the worst over ranks of
    ``rss_slope``, ``heap_excess`` and ``heap_slope``, ``ranks`` (every rank's samples) and
    ``seconds`` (wall time of its process group, spawn included; with ``fresh=False`` the
    training time).
    """
    from ..codecs import CODECS
    from ..exchange import check_exchange

    check_exchange(exchange)
    if configs is not None and codecs:
        raise ValueError("pass codecs or configs, not both")
    if configs is None:
        names = list(CODECS) if not codecs else list(codecs)
        unknown = [n for n in names if n not in CODECS]
        if unknown:
            raise ValueError(f"unknown codec(s) {', '.join(unknown)}; valid: {', '.join(CODECS)}")
        configs = [codec_settings(n, bits) for n in names]
    else:
        configs = [{"error_feedback": True, "options": {}, "bits": bits, **c} for c in configs]
    if self_check:
        configs = configs + [{**codec_settings("none"), "leak_bytes_per_step": SELF_CHECK_LEAK}]
    if steps < 2 or world < 1 or sample_every < 1 or not 1 <= warmup < steps:
        raise ValueError("need steps >= 2, world >= 1, sample_every >= 1 and 1 <= warmup < steps")
    limits = {"heap_excess_mib": heap_excess_mib, "heap_slope_kib": heap_slope_kib,
              "rss_growth_mib": rss_growth_mib, "rss_slope_kib": rss_slope_kib}
    configs = [codec_settings(CONTROL)] + configs
    t_start = time.perf_counter()
    groups = [[c] for c in configs] if fresh else [configs]
    results = []  # (cfg, per-rank results, seconds)
    for group in groups:
        t0 = time.perf_counter()
        per_job = _run_group(group, world, exchange, steps, warmup, sample_every, seed, timeout_s, flight_recorder)
        group_s = time.perf_counter() - t0
        for cfg, ranks in zip(group, per_job):
            secs = group_s if fresh else max((r["seconds"] for r in ranks if r.get("ok")), default=0.0)
            results.append((cfg, ranks, secs))
            if progress:
                progress(cfg["codec"], ranks, secs)
    controls = results[0][1]
    rows = []
    for cfg, ranks, secs in results:
        row = _row(cfg, ranks, None if cfg["codec"] == CONTROL else controls, warmup, limits)
        row["seconds"] = secs
        rows.append(row)
    return {"control": rows[0], "rows": rows[1:], "seconds": time.perf_counter() - t_start,
            "config": {"steps": steps, "world": world, "exchange": exchange, "bits": bits, "warmup": warmup,
                       "sample_every": sample_every, "fresh_processes": fresh, "seed": seed, **limits,
                       "flight_recorder_entries": flight_recorder, "self_check_leak_bytes": SELF_CHECK_LEAK if self_check else 0,
                       "pickle_slack_bytes": PICKLE_SLACK, "model_params": sum(p.numel() for p in _model().parameters()),
                       "bucket_cap_mb": BUCKET_CAP_MB, "batch": BATCH, "torch": torch.__version__}}


# -- report ---------------------------------------------------------------------------------------
def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_table(result: dict) -> str:
    cfg = result["config"]
    head = (f"soak: {cfg['steps']} steps, world {cfg['world']}, exchange={cfg['exchange']}, "
            f"{cfg['model_params']}-parameter MLP, batch {cfg['batch']}, bucket_cap_mb={cfg['bucket_cap_mb']}, "
            f"warm-up step {cfg['warmup']}, samples every {cfg['sample_every']} steps, "
            f"{'fresh processes per codec' if cfg['fresh_processes'] else 'one process group for all codecs'}, "
            f"torch {cfg['torch']}\n"
            f"torch flight recorder entries: {cfg['flight_recorder_entries']}\n"
            f"limits: state B / held tensors / held B / entries exactly flat; live tensors / py objects end at their "
            f"least; pickle +<= {cfg['pickle_slack_bytes']} B; heap growth over the control's < {cfg['heap_excess_mib']} MiB, its "
            f"slope (2nd half) < {cfg['heap_slope_kib']} KiB/1k steps or rising < {HEAP_SLOPE_FLOOR_KIB:.0f} KiB; RSS "
            f"growth < {cfg['rss_growth_mib']} MiB, RSS slope (2nd half) < {cfg['rss_slope_kib']} KiB/1k steps or "
            f"rising < {RSS_SLOPE_FLOOR_KIB:.0f} KiB.\n"
            f"RSS / heap / state figures: the rank with the largest RSS growth; slopes and heap excess: the worst rank.")
    cols = ["codec", "bits", "EF", "steps", "bkts", "RSS warm", "RSS end", "growth", "slope 2nd half",
            "heap warm", "heap end", "excess", "excess slope", "state B warm/end", "held tensors", "held B warm/end",
            "entries", "scratch B warm/end", "live tensors", "py objects", "pickle B warm/end", "loss first->last", "s", "verdict"]
    units = ["", "", "", "", "", "MiB", "MiB", "MiB", "KiB/1k", "MiB", "MiB", "MiB", "KiB/1k 2nd half", "", "", "",
             "", "", "", "", "", "", "", ""]

    def pair(r, k):
        return "-" if r.get(f"{k}_warm") is None else f"{r[f'{k}_warm']}/{r[f'{k}_end']}"

    lines = []
    for r in [result["control"]] + result["rows"]:
        name = f"({CONTROL})" if r["codec"] == CONTROL else r["codec"]
        verdict = r["verdict"]
        if r["codec"] == CONTROL:
            verdict = "control" if verdict == "PASS" else "FAIL"
        elif r.get("expect_fail"):
            name = f"{name}+leak {r['leak_bytes_per_step']} B/step"
            verdict = "FAIL (expected: self-check)" if verdict == "FAIL" else "PASS (self-check MISSED the leak)"
        if "rss_warm" not in r:
            lines.append([name, str(r["bits"]), "y" if r["error_feedback"] else "n"] + ["-"] * 20 + [verdict])
            continue
        lines.append([
            name, str(r["codec_bits"]), "y" if r["error_feedback"] else "n", str(r["steps"]), _f(r["buckets"], "d"),
            f"{r['rss_warm']:.2f}", f"{r['rss_end']:.2f}", f"{r['rss_growth']:+.2f}", f"{r['rss_slope']:+.0f}",
            _f(r["heap_warm"], ".3f"), _f(r["heap_end"], ".3f"), _f(r["heap_excess"], "+.3f"), _f(r["heap_slope"], "+.1f"),
            pair(r, "sd_bytes"), pair(r, "held_tensors"), pair(r, "held_bytes"), pair(r, "entries"),
            pair(r, "scratch_bytes"),
            pair(r, "live_tensors"), pair(r, "py_objects"), pair(r, "pickle_bytes"),
            f"{r['loss_first']:.3f}->{r['loss_last']:.3f}", f"{r['seconds']:.1f}", verdict])
    widths = [max(len(c), len(u), *(len(line[i]) for line in lines)) for i, (c, u) in enumerate(zip(cols, units))]

    def fmt(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [head, "", fmt(cols), fmt(units), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines]
    for r in [result["control"]] + result["rows"]:
        if r["verdict"] != "PASS":
            label = "expected FAIL (self-check)" if r.get("expect_fail") else "FAIL"
            out.append(f"{label} {r['codec']}: " + "; ".join(r["why"]))
    codecs = [r for r in result["rows"] if not r.get("expect_fail")]
    checks = [r for r in result["rows"] if r.get("expect_fail")]
    out.append(f"{sum(r['verdict'] == 'PASS' for r in codecs)}/{len(codecs)} codecs PASS"
               + ("" if result["control"]["verdict"] == "PASS" else "; control run FAILED")
               + ("" if not checks else "; self-check leak " + ("detected" if all(r["verdict"] == "FAIL" for r in checks)
                                                                  else "NOT DETECTED"))
               + f"; {result['seconds']:.1f} s")
    return "\n".join(out)


def failed(result: dict) -> bool:
    """Whether any codec, or the control run, failed (or a self-check leak went unnoticed)."""
    return result["control"]["verdict"] != "PASS" or any(
        (r["verdict"] == "PASS") == r["expect_fail"] for r in result["rows"])


def build_parser() -> argparse.ArgumentParser:
    from ..codecs import CODECS
    from ..exchange import EXCHANGES

    p = argparse.ArgumentParser(prog="python -m ddp_qhooks.tools.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--codecs", nargs="+", default=None, metavar="CODEC",
                   help=f"codecs to soak, space or comma separated (default: all of {', '.join(CODECS)})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--world", type=int, default=2, help="local Gloo processes")
    p.add_argument("--exchange", nargs="+", default=["auto"], choices=[e for e in EXCHANGES if e != "hierarchical"],
                   help="exchange(s) to soak with; several: one table each")
    p.add_argument("--bits", type=int, default=DEFAULT_BITS, help="bits of the quantizers that accept them")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP, help="step of the reference sample")
    p.add_argument("--sample-every", type=int, default=DEFAULT_SAMPLE_EVERY)
    p.add_argument("--reuse-processes", action="store_true",
                   help="run the control and all codecs in one process group (faster, less isolated)")
    p.add_argument("--heap-excess-mib", type=float, default=HEAP_EXCESS_MIB)
    p.add_argument("--heap-slope-kib", type=float, default=HEAP_SLOPE_KIB, help="KiB per 1,000 steps")
    p.add_argument("--rss-growth-mib", type=float, default=RSS_GROWTH_MIB)
    p.add_argument("--rss-slope-kib", type=float, default=RSS_SLOPE_KIB, help="KiB per 1,000 steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="collective timeout, seconds")
    p.add_argument("--flight-recorder", type=int, default=0, metavar="N",
                   help="TORCH_FR_BUFFER_SIZE in the ranks (default 0: off; -1: leave torch's default, 2000 entries)")
    p.add_argument("--self-check", action="store_true",
                   help=f"add a run that leaks {SELF_CHECK_LEAK} B a step outside the hook: it must FAIL")
    p.add_argument("--json", metavar="PATH", help="write every sample of every rank as JSON")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    codecs = [c for item in args.codecs for c in item.split(",") if c] if args.codecs else None
    from ..codecs import CODECS
    unknown = [c for c in codecs or () if c not in CODECS]
    if unknown:
        parser.error(f"unknown codec(s) {', '.join(unknown)}; valid: {', '.join(CODECS)}")
    results = []
    for ex in args.exchange:
        def progress(name, ranks, secs, ex=ex):
            state = "ok" if all(r.get("ok") for r in ranks) else "failed: " + "; ".join(
                r.get("error", "") for r in ranks if not r.get("ok"))
            print(f"[soak {ex}] {name}: {state} ({secs:.1f} s)", file=sys.stderr, flush=True)
        res = soak(codecs, steps=args.steps, world=args.world, exchange=ex, bits=args.bits, warmup=args.warmup,
                   sample_every=args.sample_every, fresh=not args.reuse_processes, seed=args.seed,
                   heap_excess_mib=args.heap_excess_mib, heap_slope_kib=args.heap_slope_kib,
                   rss_growth_mib=args.rss_growth_mib, rss_slope_kib=args.rss_slope_kib, timeout_s=args.timeout,
                   flight_recorder=None if args.flight_recorder < 0 else args.flight_recorder,
                   self_check=args.self_check, progress=progress)
        print(format_table(res), flush=True)
        print(flush=True)
        results.append(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results if len(results) > 1 else results[0], f, indent=1)
    return 1 if any(failed(r) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
