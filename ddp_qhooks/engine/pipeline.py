"""The per-unit pipeline every integration uses: add residual, encode, exchange, decode and average,
commit the residual.  A unit is a DDP bucket or a LocalSGD fragment.

:func:`submit` runs the first half on the caller's thread (the residual is added, every chunk is
encoded and its first collective launched) and returns a Future of the unit's mean; the completion
thread finishes each chunk (``engine/completion.py``).  Residuals are staged and committed only at
the end of a step in which every rank's input was finite, which is the one value read on the host
per step (GradScaler then skips the step with every residual unchanged).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..codecs._random import splitmix64
from ..error_feedback import add_residual, restore_held
from ..exchange import Piece, collectives
from .state import Plan, QuantizedHookState

_log = logging.getLogger("ddp_qhooks")
VALIDATE_USES = 2  # payload headers are checked on the host during a plan's first uses only


@dataclass
class Unit:
    """A flat gradient to average over the ranks: ``buffer`` (its mean is written back in place),
    the ``params`` it is made of, in order, its ``index`` within the step and whether it is the
    step's last.  ``contribute=False`` (a rank sitting out a federated round): the caller passes
    zeros, and this rank's own residual is neither added nor updated (it keeps it for a later
    round); server-side residuals (two-phase) still act, since the shard mean is everyone's."""

    index: int
    buffer: torch.Tensor
    params: list
    is_last: bool
    contribute: bool = True


def submit(state: QuantizedHookState, unit: Unit) -> torch.futures.Future:
    t_enter = time.perf_counter()
    state._event(unit.index, "enter", t_enter)
    if state._needs_bind:
        raise RuntimeError("ddp_qhooks: this hook state was unpickled; call state.bind(ddp_model.module) before "
                           "training so residuals are matched to the right parameters")
    buf = unit.buffer
    signature = tuple(state._key_of(p) for p in unit.params)
    if not state._agreed:
        collectives.check_agreement(state.agreed_config(), buf.device, state.process_group)
        state._agreed = True
    if state._optimizer is not None and not state._optimizer.compressing():
        # the attached optimizer's warm-up or variance refresh: the plain mean, residuals left as they are
        return _submit_warmup(state, unit, signature, buf if buf.dtype == torch.float32 else buf.float(), t_enter,
                              state._optimizer.warmup_exchange_codec())
    plan = state._plan(signature, [p.numel() for p in unit.params], buf.device)
    if plan.uses == 0:
        _settle_server_residuals(state, signature, plan, buf.device)
    state._used_this_step.add(signature)
    if not state._announced:
        state._announced = True
        if collectives.rank(state.process_group) == 0:
            _log.info("ddp_qhooks: bucket %d (%d values, %d chunk(s)) uses %s: %s", unit.index, plan.layout.numel,
                      len(plan.bounds), plan.mode, plan.reason)

    x = buf if buf.dtype == torch.float32 else buf.float()
    if state._optimizer is not None:  # compress the optimizer's momentum, not the gradient
        state._optimizer.mix_momentum(unit.params, x)
    if state.worker_momentum is not None and unit.contribute:  # compress m = beta * m + g instead of g
        state.worker_momentum.apply(signature, plan.layout.param_numels, x)
    residual, held = None, []
    if state.error_feedback and unit.contribute:
        residual = state.memory.bucket_residual(signature, plan.layout.param_numels, buf.device)
        held = add_residual(x, residual, plan.layout, state.hold_unused_residuals)
    # the next residual e = g' - deq(own payload) is formed by the encoder while the data is hot,
    # and staged until the step is known to be finite everywhere
    err = state.memory.staging(signature) if residual is not None else plan.scratch
    server = server_err = None
    if state.error_feedback and plan.mode == "alltoall":
        server = state.server_memory.bucket_residual(signature, plan.layout.param_numels, buf.device)
        server_err = state.server_memory.staging(signature)
    state._count(plan, unit.is_last)
    tracker = _UnitTracker(state, unit, plan, signature, residual is not None, server is not None)
    started = _launch(state, plan, x, buf, err, server, server_err)
    if held and plan.mode != "hierarchical":
        restore_held(err, residual, held)
    return _follow(state, unit, plan, tracker, started, t_enter)


def _submit_warmup(state: QuantizedHookState, unit: Unit, signature, x, t_enter: float, codec):
    """The mean of the unit for an attached optimizer's warm-up or variance refresh: in full
    precision (``codec`` None: an all-reduce) or through the optimizer's warm-up codec without error
    feedback.  Residuals, worker momentum and the hook codec's state are left as they are."""
    plan = state._warmup_plan(signature, [p.numel() for p in unit.params], unit.buffer.device, codec)
    state._count(plan, unit.is_last)
    with state._lock:
        if codec is None:
            state._uncompressed_in_step = True
        else:
            state._warmup_in_step = True
    tracker = _UnitTracker(state, unit, plan, signature, False, False)
    started = _launch(state, plan, x, unit.buffer, None, None, None, stats=False)
    return _follow(state, unit, plan, tracker, started, t_enter)


def _launch(state: QuantizedHookState, plan: Plan, x, buf, err, server, server_err, stats: bool = True) -> list:
    """Encode every chunk of the unit and launch its first collective, on the caller's thread."""
    key = splitmix64(state.seed, collectives.rank(state.process_group), state.step)
    started = []
    for c, ((lo, hi), layout, buffers) in enumerate(zip(plan.bounds, plan.layouts, plan.buffers)):
        piece = Piece(layout, x[lo:hi], buf[lo:hi], None if err is None else err[lo:hi],
                      key if len(plan.bounds) == 1 else splitmix64(key, 4, c), plan.uses < VALIDATE_USES,
                      None if server is None else server[lo:hi], None if server_err is None else server_err[lo:hi],
                      state.hold_unused_residuals, state.measure_error and stats)
        gen = plan.strategy.run(piece, buffers)
        started.append((gen, next(gen)))
    return started


def _follow(state: QuantizedHookState, unit: Unit, plan: Plan, tracker, started: list, t_enter: float):
    """Hand the launched chunks to the completion thread; the unit's future completes with the last."""
    plan.uses += 1
    state._event(unit.index, "launched")
    for gen, work in started:
        state._completion.follow(gen, work, tracker.piece_done, unit.buffer.device)
    with state._lock:
        state._timing["hook_seconds"] += time.perf_counter() - t_enter
    return tracker.surfaced


class _UnitTracker:
    """Collects a unit's chunk results on the completion thread and completes its future."""

    def __init__(self, state, unit: Unit, plan: Plan, signature, staged: bool, staged_server: bool):
        self.state, self.unit, self.plan, self.signature = state, unit, plan, signature
        self.staged, self.staged_server = staged, staged_server
        self.pending = len(plan.bounds)
        self.results = []
        self.error = None
        device = unit.buffer.device
        self.future = torch.futures.Future(devices=[device] if device.type == "cuda" else None)
        # DDP's reducer reads a hook future's value as a tensor: an exception set on the future
        # itself reached it as "Unable to cast <message> to Tensor"; a chained future re-raises it
        # (the chained callback runs on the completion thread, which sets the result)
        self.surfaced = self.future.then(_value)

    def piece_done(self, result, exc, busy: float) -> None:
        try:
            self._piece_done(result, exc, busy)
        except BaseException as failure:  # noqa: BLE001 - the unit's future must complete, or DDP waits forever
            if not self.future.done():
                self.future.set_exception(failure)
            else:
                raise

    def _piece_done(self, result, exc, busy: float) -> None:
        state = self.state
        state._event(self.unit.index, "received")
        state._callback_time(self.unit.index, busy)
        if exc is not None and self.error is None:
            self.error = exc
        if result is not None:
            self.results.append(result)
        self.pending -= 1
        if self.pending:
            return
        if self.error is not None:
            _unit_failed(state)
            self.future.set_exception(self.error)
            return
        buf = self.unit.buffer
        bad = self.results[0].bad if len(self.results) == 1 else torch.stack([r.bad for r in self.results]).any()
        if len(self.results) > 1:
            buf.masked_fill_(bad, float("nan"))  # every chunk NaN where one is: the step is skipped whole
        infos = [r.info for r in self.results]
        _unit_done(state, self, bad, infos)
        self.future.set_result(buf)


def _value(fut):
    return fut.value()


def _unit_done(state: QuantizedHookState, tracker: _UnitTracker, bad: torch.Tensor, infos: list) -> None:
    now = time.perf_counter()
    plan = tracker.plan
    with state._lock:
        ev = state._step_events.setdefault(tracker.unit.index, {})
        ev.update(done=now, numel=plan.layout.numel, mode=plan.mode, chunks=len(plan.bounds))
        if state.measure_error:
            for info in infos:
                if info is not None and info.error_sq is not None:
                    state._step_err += info.error_sq
                    state._step_inp += info.input_sq
        state._step_bad = bad if state._step_bad is None else state._step_bad.logical_or(bad)
        if tracker.staged:
            state._staged.append(tracker.signature)
        if tracker.staged_server:
            state._staged_server.append(tracker.signature)
        state._done += 1
        if state._last_seen and state._done == state._calls:
            _end_of_step(state)


def _unit_failed(state: QuantizedHookState) -> None:
    """A collective or a check failed: DDP raises; the step ends without committing anything."""
    with state._lock:
        state._step_bad = torch.ones((), dtype=torch.bool)
        state._done += 1
        if state._last_seen and state._done == state._calls:
            _end_of_step(state)


def end_step(state: QuantizedHookState) -> None:
    """End the state's current step, for integrations whose units cannot tell which one is a step's
    last (FSDP exchanges module by module, and a module without gradients in a step is skipped):
    submit every unit with ``is_last=False``, then call this once per step, e.g. from an autograd
    final callback.  The step ends when its units have all completed (now, or when the last one in
    flight does): residuals are committed if every rank's input was finite, counters roll over.
    A step with no unit submitted, or one already ending, is left alone."""
    with state._lock:
        if state._calls == 0 or state._last_seen:
            return
        state._last_seen = True
        if state._done == state._calls:
            _end_of_step(state)


def _end_of_step(state: QuantizedHookState) -> None:
    """Every unit of the step has been exchanged and decoded (called under the lock)."""
    bad = state._step_bad is not None and bool(state._step_bad)  # the one host read per step
    state._step_bad_host = bad
    if bad:
        state._totals["nonfinite_steps"] += 1  # GradScaler drops the step: keep the old residuals
    else:
        state.memory.commit(state._staged)
        state.server_memory.commit(state._staged_server)
        if state.worker_momentum is not None:
            state.worker_momentum.commit(state._used_this_step)
    if state._uncompressed_in_step:
        state._totals["uncompressed_steps"] += 1
    if state._warmup_in_step:
        state._totals["compressed_warmup_steps"] += 1
    state.step += 1
    state._close_step_record()
    state._new_step()
    if state._used_this_step:  # not a step of an attached optimizer's warm-up or refresh alone
        for sig in [s for s in state._plans if s not in state._used_this_step]:
            del state._plans[sig]  # layouts DDP no longer uses (e.g. before the bucket rebuild)
    for key in [k for k in state._full_plans if k not in state._warmup_used]:
        del state._full_plans[key]  # and the warm-up's, once it is over
    if all(full for _, full in state._full_plans):  # no warm-up codec plan left
        state._warmup_strategies.clear()
    state._used_this_step.clear()
    state._warmup_used.clear()


def _settle_server_residuals(state: QuantizedHookState, signature, plan: Plan, device) -> None:
    """Place the server residuals of a new bucket layout.  The part inside this rank's shards stays
    a server residual; any other part (the bucket is exchanged by all-gather now, or the shard went
    to another rank after a rebuild or a restart at another world size) is added W-fold to this
    rank's worker residual, which brings it into the next mean unchanged."""
    if not state.error_feedback:
        return
    inherited = state.server_memory.holds_any(signature)
    if plan.mode != "alltoall" and not inherited:
        return
    server = state.server_memory.bucket_residual(signature, plan.layout.param_numels, device)
    if inherited:
        w = collectives.world_size(state.process_group)
        me = collectives.rank(state.process_group)
        keep = torch.zeros(plan.layout.numel, dtype=torch.bool, device=device)
        if plan.mode == "alltoall":
            for (lo, _), b in zip(plan.bounds, plan.buffers):
                s, e = b.bounds[me]
                keep[lo + s:lo + e] = True
        worker = state.memory.bucket_residual(signature, plan.layout.param_numels, device)
        worker.add_(server * (~keep), alpha=w)
        server.mul_(keep)
    if plan.mode == "alltoall":
        state.server_memory.staging(signature).zero_()
    else:
        state.server_memory.release(signature)
