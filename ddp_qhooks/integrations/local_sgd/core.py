"""Fewer and smaller messages: local steps, then a quantized outer synchronization (local SGD / DiLoCo).

Every rank runs ``local_steps`` (H) optimizer steps on its own data without any gradient exchange.
Then, per parameter, the *pseudo-gradient* ``delta = theta_start - theta_local`` (what the rank's
inner steps moved since the last synchronization) goes through the same machinery as a gradient
bucket: error feedback (a residual per parameter), any codec, the exchange layer (all-gather, or
two-phase), and comes back as the mean over ranks.  An outer optimizer applies it to
``theta_start``:

* ``outer="average"`` (default): ``theta = theta_start - outer_lr * mean(delta)``; with ``outer_lr=1``
  that is parameter averaging (local SGD, FedAvg), exactly so with ``codec="none"``;
* ``outer="nesterov"`` (DiLoCo, Douillard et al. 2023): ``torch.optim.SGD`` with Nesterov momentum on
  the pseudo-gradient (default ``outer_lr=0.7``, ``outer_momentum=0.9``).  It pays off over many
  outer steps; with 25 of them (Fashion-MNIST, 400 steps, H=16) it lost 3.3 pt where averaging
  lost 0.4 (README), hence the default.

Inner optimizer state (momentum, Adam moments) stays local, as in DiLoCo.  With ``fragments=F``
(Streaming DiLoCo, Douillard et al. 2025) the parameters are cut into F groups of about equal size,
synchronized at staggered steps (fragment f when ``step % H == f * H // F``), so each
synchronization moves 1/F of the model: the same bytes per H steps, a peak F times lower.

Federated options (see :class:`LocalSGD`'s arguments and ``drift.py`` / ``rounds.py``):
``drift="scaffold"`` / ``"fedprox"`` correct each inner gradient for client drift (call
:meth:`LocalSGD.attach` with the inner optimizer); ``participation=p`` lets a seeded subset of ranks
contribute to each round; ``overlap=True`` / ``delay=tau`` leaves each exchange running on the
engine's completion thread while the next tau inner steps go on, then applies it.

Usage::

    model = Net()                                   # not wrapped in DDP: nothing syncs gradients
    sync = ddp_qhooks.LocalSGD(model, local_steps=16, codec="stochastic", bits=4)
    opt = torch.optim.AdamW(model.parameters())
    for x, y in loader:
        loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
        sync.step()                                 # every H steps: exchange + outer step

A DDP-wrapped model works too: register :func:`local_phase_hook` (no communication) instead of a
gradient hook (DDP then also keeps buffers such as BatchNorm statistics equal, broadcasting rank 0's
every forward); with a plain module, buffers are not synchronized.  A round whose pseudo-gradient is
not finite on some rank is dropped on every rank (parameters back to the last synchronized point,
residuals kept, a warning).  ``state_dict()`` holds everything needed to resume: the outer start point, the
outer momentum, the residuals and the counters.
"""

import warnings

import torch
import torch.distributed as dist

from ...codecs.base import finite_flag
from ...engine import QuantizedHookState, Unit, submit
from ...exchange import check_agreement, collectives
from .drift import DRIFTS, SCAFFOLD_OPTIONS, make_drift
from .rounds import Pending, _first_rank, _split, participants

__all__ = ["LocalSGD", "local_phase_hook", "OUTER_OPTIMIZERS", "DRIFTS", "SCAFFOLD_OPTIONS"]

OUTER_OPTIMIZERS = ("average", "nesterov")
STATE_FORMAT = 1
# configuration keys added after the first format, with the values older checkpoints implied
_CONFIG_DEFAULTS = {"drift": "none", "mu": 0.0, "scaffold_option": "II", "participation": 1.0, "delay": 0}
_CV_SEED = 0x5CAF  # the control variates' stochastic rounding must not repeat the pseudo-gradients'


def local_phase_hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A DDP comm hook that communicates nothing: each rank keeps its own gradient (the local phase of
    :class:`LocalSGD` for a model that stays wrapped in DDP).  ``state`` is ignored (register it with
    ``None``); ``bucket`` is DDP's GradBucket, returned unchanged."""
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _number(name, value, ok, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


class LocalSGD:
    """H local steps, then quantized pseudo-gradients with error feedback and an outer step.

    Args:
        module: the model every rank trains (all ranks must hold the same architecture; the
            starting weights are broadcast from rank 0 here).
        local_steps: H, inner steps between synchronizations of a fragment (>= 1).
        codec, bits, error_feedback, exchange, seed, **codec_options: as for :func:`~ddp_qhooks.register`
            (:class:`~ddp_qhooks.QuantizedHookState`); error feedback acts on pseudo-gradients.
        outer: ``"average"`` or ``"nesterov"`` (see the module docstring).
        outer_lr: outer learning rate (default 1.0 for average, 0.7 for nesterov).
        outer_momentum: Nesterov momentum (default 0.9; ignored by average).
        fragments: F, the number of parameter groups synchronized at staggered steps (1..#params).
        process_group: the group to synchronize in (default: the default group).
        drift: client-drift correction, one of ``DRIFTS``: ``"none"`` (default), ``"scaffold"``
            (control variates; their deltas are quantized like the pseudo-gradients, with residuals
            of their own) or ``"fedprox"`` (proximal term ``mu * (x - x_start)``).  Both act on the
            inner gradients: call :meth:`attach` with the inner optimizer.
        mu: FedProx's proximal weight (>= 0; default 0.01).
        scaffold_option: ``"II"`` (default: ``c_i`` = the mean of the round's uncorrected gradients)
            or ``"I"`` (the gradient of the round's first inner step, at the round's start point).
        participation: fraction p in (0, 1] of the ranks that contribute to each round (default 1):
            a seeded draw of ``max(1, round(p * W))`` ranks, the same on every rank; the others
            send zeros and keep their residuals and control variates; the mean is over the
            participants.
        overlap: run each fragment's exchange in the background while the inner steps go on and
            apply it ``delay`` steps later (``overlap=True`` alone: ``delay=1``).
        delay: tau, inner steps between launching a fragment's exchange and applying it (0 <= tau <
            H; default 0 without overlap: synchronous).  The local progress made meanwhile is kept
            on top of the new outer point (``x = x_outer + (x_now - x_sent)``); with outer
            averaging this is the eager update that uses the rank's own pseudo-gradient as a stand-in
            for the mean until the mean arrives.  The exchanges then run on a process group
            of their own (created here, once), so collectives the training loop issues on
            ``process_group`` meanwhile do not wait behind a round in flight.
    """

    def __init__(self, module: torch.nn.Module, local_steps: int = 16, codec: str = "stochastic", bits: int = 8, *,
                 error_feedback: bool = True, outer: str = "average", outer_lr: float | None = None,
                 outer_momentum: float = 0.9, fragments: int = 1, process_group=None, exchange: str = "auto",
                 seed: int = 0, drift: str = "none", mu: float = 0.01, scaffold_option: str = "II",
                 participation: float = 1.0, overlap: bool = False, delay: int | None = None, **codec_options):
        if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
            raise ValueError(f"local_steps must be an integer >= 1, got {local_steps!r}")
        if outer not in OUTER_OPTIMIZERS:
            raise ValueError(f"outer must be one of {OUTER_OPTIMIZERS}, got {outer!r}")
        if outer_lr is None:
            outer_lr = 1.0 if outer == "average" else 0.7
        if not (isinstance(outer_lr, (int, float)) and outer_lr > 0):
            raise ValueError(f"outer_lr must be a number > 0, got {outer_lr!r}")
        if not (isinstance(outer_momentum, (int, float)) and 0 <= outer_momentum < 1):
            raise ValueError(f"outer_momentum must be in [0, 1), got {outer_momentum!r}")
        if drift not in DRIFTS:
            raise ValueError(f"drift must be one of {DRIFTS}, got {drift!r}")
        mu = _number("mu", mu, lambda v: v >= 0, "a number >= 0 (FedProx's proximal weight)")
        if scaffold_option not in SCAFFOLD_OPTIONS:
            raise ValueError(f"scaffold_option must be one of {SCAFFOLD_OPTIONS}, got {scaffold_option!r}")
        participation = _number("participation", participation, lambda v: 0 < v <= 1,
                                "a fraction in (0, 1] of the ranks taking part in each round")
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap must be True or False, got {overlap!r}")
        if delay is None:
            delay = 1 if overlap else 0
        if isinstance(delay, bool) or not isinstance(delay, int) or not 0 <= delay < local_steps:
            raise ValueError(f"delay must be an integer in 0..{local_steps - 1} (below local_steps, so a fragment's "
                             f"update lands before its next round), got {delay!r}")
        if participation < 1 and codec_options.get("worker_momentum") is not None:
            raise ValueError("participation < 1 does not support worker_momentum (a rank sitting out a round has no "
                             "momentum update); use one or the other")
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the module has no trainable parameters")
        if isinstance(fragments, bool) or not isinstance(fragments, int) or not 1 <= fragments <= len(params):
            raise ValueError(f"fragments must be an integer in 1..{len(params)} (the number of trainable "
                             f"parameters), got {fragments!r}")
        self.module = module
        self.local_steps = local_steps
        self.outer = outer
        self.outer_lr = float(outer_lr)
        self.outer_momentum = float(outer_momentum)
        self.process_group = process_group
        self.drift_name, self.mu, self.scaffold_option = drift, mu, scaffold_option
        self.participation, self.delay, self.seed = participation, delay, seed
        self.hook = QuantizedHookState(process_group, codec=codec, bits=bits, error_feedback=error_feedback,
                                       seed=seed, module=module, exchange=exchange, **codec_options)
        self.fragments = _split(params, fragments)
        self.drift = make_drift(drift, self.fragments, mu, scaffold_option)
        # the control-variate deltas: same codec and exchange, residuals (and byte counters) of their own
        self.cv_hook = None if not self.drift.exchanges else QuantizedHookState(
            process_group, codec=codec, bits=bits, error_feedback=error_feedback, seed=seed ^ _CV_SEED,
            module=module, exchange=exchange, **codec_options)
        self.inner_steps = 0
        self.syncs = 0
        self.nonfinite_syncs = 0
        self._rounds = [0] * len(self.fragments)
        self._pending: list[Pending] = []
        self._deltas = [None] * len(self.fragments)
        self._optimizer_hook = None
        self._counts = {"participated_syncs": 0, "contributed_wire_bytes": 0, "wire_bytes_last_sync": 0}
        self._participants_last = []
        with torch.no_grad():
            if dist.is_initialized():
                for p in module.parameters():  # the same start everywhere, as DDP's constructor does
                    dist.broadcast(p.data, src=_first_rank(process_group), group=process_group)
            self._start = [[p.detach().clone() for p in frag] for frag in self.fragments]
        # outer optimizers act on the parameters themselves (theta_start + pseudo-gradient as .grad)
        self._outer = [self._make_outer(frag) for frag in self.fragments]
        if dist.is_initialized():
            check_agreement({"local_steps": local_steps, "outer": outer, "outer_lr": self.outer_lr,
                             "outer_momentum": self.outer_momentum, "fragments": fragments,
                             "params": [p.numel() for p in params], **self._round_config()},
                            params[0].device, process_group)
            if delay > 0:
                # a group of its own for the exchanges in flight: Gloo runs a group's collectives in
                # order, so the training loop's own (DDP's buffer broadcast, a metrics all-reduce,
                # a barrier) would otherwise wait for the round.  Created only once every rank has
                # agreed on the configuration above, so a misconfigured rank cannot leave the
                # others waiting in it.
                group = collectives.new_group(process_group)
                for hook in (self.hook, self.cv_hook):
                    if hook is not None:
                        hook.process_group = group

    def _round_config(self) -> dict:
        return {"drift": self.drift_name, "mu": self.mu, "scaffold_option": self.scaffold_option,
                "participation": self.participation, "delay": self.delay}

    def _make_outer(self, frag):
        if self.outer == "average":
            return torch.optim.SGD(frag, lr=self.outer_lr)
        return torch.optim.SGD(frag, lr=self.outer_lr, momentum=self.outer_momentum, nesterov=True)

    # -- training loop ---------------------------------------------------------------------------
    def attach(self, optimizer: torch.optim.Optimizer):
        """Correct the gradients before every step of ``optimizer`` (the inner optimizer) for
        ``drift="scaffold"`` / ``"fedprox"``; needed with a drift correction, harmless without.
        Returns the hook's handle (``.remove()`` detaches it)."""
        if self._optimizer_hook is not None:
            self._optimizer_hook.remove()
        self._optimizer_hook = optimizer.register_step_pre_hook(lambda *_: self.drift.correct(self._start))
        return self._optimizer_hook

    def due(self, step: int) -> list[int]:
        """Fragments that synchronize after inner step ``step`` (1-based)."""
        h, f = self.local_steps, len(self.fragments)
        return [i for i in range(f) if step % h == (i * h) // f]

    def step(self) -> bool:
        """Call after every inner optimizer step; launches the exchanges of the fragments that are due
        and applies those that have waited ``delay`` steps.  Returns whether an outer update was
        applied."""
        if self.drift_name != "none" and self._optimizer_hook is None:
            raise RuntimeError(f"LocalSGD(drift={self.drift_name!r}) corrects the inner gradients in the optimizer "
                               "step: call sync.attach(optimizer) once before training")
        self.inner_steps += 1
        applied = self._apply_due()
        for i in self.due(self.inner_steps):
            self._launch(i, self.inner_steps + self.delay)
        return self._apply_due() or applied

    def sync(self) -> None:
        """Synchronize every fragment now (e.g. before evaluating or saving the final model); exchanges
        still in flight are applied first."""
        self._apply_due(everything=True)
        for i in range(len(self.fragments)):
            self._launch(i, self.inner_steps)
        self._apply_due(everything=True)

    def _apply_due(self, everything: bool = False) -> bool:
        ready = [p for p in self._pending if everything or p.due <= self.inner_steps]
        self._pending = [p for p in self._pending if p not in ready]
        for p in ready:
            self._apply(p)
        return bool(ready)

    @torch.no_grad()
    def _launch(self, i: int, due: int) -> None:
        # the engine keys stochastic rounding by its step counter, which advances when an exchange
        # completes: finishing the earlier ones first keeps every key, hence every bit, reproducible
        for p in self._pending:
            p.wait()
        frag, start = self.fragments[i], self._start[i]
        world = collectives.world_size(self.process_group) if dist.is_initialized() else 1
        me = collectives.rank(self.process_group) if dist.is_initialized() else 0
        who = participants(self.seed, i, self._rounds[i], world, self.participation)
        self._rounds[i] += 1
        mine = me in who
        before = self._wire_bytes()
        delta = self._delta_buffer(i)
        if mine:
            offset = 0
            for s, p in zip(start, frag):
                torch.sub(s.reshape(-1), p.detach().reshape(-1), out=delta[offset:offset + p.numel()])
                offset += p.numel()
        else:
            delta.zero_()
        future = submit(self.hook, Unit(i, delta, frag, is_last=True, contribute=mine))
        cv_future, undo = None, None
        if self.cv_hook is not None:
            cv_delta, undo = self.drift.round_end(i, mine)
            cv_future = submit(self.cv_hook, Unit(i, cv_delta, frag, is_last=True, contribute=mine))
        else:
            self.drift.round_end(i, mine)
        sent = [p.detach().clone() for p in frag] if due > self.inner_steps else None
        self._pending.append(Pending(i, due, who, future, cv_future, sent, undo, mine))
        sent_bytes = self._wire_bytes() - before
        self._counts["wire_bytes_last_sync"] = sent_bytes
        if mine:
            self._counts["participated_syncs"] += 1
            self._counts["contributed_wire_bytes"] += sent_bytes

    @torch.no_grad()
    def _apply(self, pend: Pending) -> None:
        i = pend.index
        frag, start = self.fragments[i], self._start[i]
        mean = pend.future.wait()
        cv_mean = None if pend.cv_future is None else pend.cv_future.wait()
        self._participants_last = list(pend.participants)
        flags = [finite_flag(mean)] + ([] if cv_mean is None else [finite_flag(cv_mean)])
        finite = bool(torch.stack(flags).all())
        if not finite:
            # some rank's local steps went non-finite: the hook made the mean NaN on every rank and
            # kept the residuals; every rank drops the round and restarts from the last start point
            for s, p in zip(start, frag):
                p.copy_(s)
            self.drift.restore(i, pend.undo)
            self.nonfinite_syncs += 1
            warnings.warn(f"LocalSGD: non-finite pseudo-gradient in fragment {i} at inner step {self.inner_steps}: "
                          "round dropped on every rank, parameters reset to the last synchronized point",
                          RuntimeWarning, stacklevel=4)
            return
        world = collectives.world_size(self.process_group) if dist.is_initialized() else 1
        if len(pend.participants) != world:
            mean = mean * (world / len(pend.participants))  # the others sent zeros
        progress = None
        if pend.sent is not None:  # x_now - x_sent, in the buffers that held x_sent (not needed after)
            progress = [torch.sub(p, s, out=s) for p, s in zip(frag, pend.sent)]
        saved = [p.grad for p in frag]
        offset = 0
        for s, p in zip(start, frag):
            n = p.numel()
            p.copy_(s)
            p.grad = mean[offset:offset + n].view_as(p).to(p.dtype)
            offset += n
        self._outer[i].step()
        for s, p, g in zip(start, frag, saved):
            s.copy_(p)
            p.grad = g
        if progress is not None:
            for p, d in zip(frag, progress):
                p.add_(d)
        if cv_mean is not None:
            held = self.cv_hook.memory.residuals()  # committed: the exchange has completed
            self.drift.apply(i, cv_mean, [held.get(self.cv_hook._key_of(p)) for p in frag])
        self.syncs += 1

    def _delta_buffer(self, i: int) -> torch.Tensor:
        """Fragment ``i``'s flat pseudo-gradient, allocated once: its previous round has been applied
        before it is launched again (``delay`` < H, and ``sync()`` applies first)."""
        frag = self.fragments[i]
        if self._deltas[i] is None:
            self._deltas[i] = torch.empty(sum(p.numel() for p in frag), dtype=torch.float32, device=frag[0].device)
        return self._deltas[i]

    def _wire_bytes(self) -> int:
        return self.hook._totals["wire_bytes_sent"] + (0 if self.cv_hook is None else
                                                       self.cv_hook._totals["wire_bytes_sent"])

    # -- reporting and checkpoints ---------------------------------------------------------------
    def stats(self) -> dict:
        """The engine's counters for the pseudo-gradient exchanges (``wire_bytes_sent``,
        ``compression_ratio``, ... as in :meth:`QuantizedHookState.stats`; with ``drift="scaffold"``
        ``payload_bytes``, ``wire_bytes_sent``, ``fp32_bytes``, ``fp32_allreduce_wire_bytes`` and
        ``compression_ratio`` include the control-variate exchanges), plus ``inner_steps``
        (optimizer steps so far), ``syncs`` (fragment synchronizations applied so far),
        ``nonfinite_syncs`` (rounds dropped because a pseudo-gradient was not finite),
        ``local_steps`` (H), ``fragments`` (F), ``wire_bytes_per_inner_step`` (bytes sent per
        inner step, averaged), ``control_variate_wire_bytes`` (of ``wire_bytes_sent``, the bytes of
        control-variate deltas; 0 without SCAFFOLD), ``participated_syncs`` (rounds this rank
        contributed to), ``contributed_wire_bytes`` (bytes sent in those rounds: what this rank
        sends when a sitting-out rank sends nothing), ``wire_bytes_last_sync`` (bytes this rank sent
        in the last round launched), ``participants_last_sync`` (the ranks whose contributions made
        the last applied round), ``drift`` and ``delay`` (the configuration) and
        ``pending_syncs`` (exchanges in flight, launched but not yet applied)."""
        s = self.hook.stats()
        cv_bytes = 0
        if self.cv_hook is not None:
            c = self.cv_hook.stats()
            cv_bytes = c["wire_bytes_sent"]
            for k in ("payload_bytes", "wire_bytes_sent", "fp32_bytes", "fp32_allreduce_wire_bytes"):
                s[k] += c[k]
            s["compression_ratio"] = s["fp32_bytes"] / s["payload_bytes"] if s["payload_bytes"] else 0.0
        s.update(inner_steps=self.inner_steps, syncs=self.syncs, nonfinite_syncs=self.nonfinite_syncs,
                 local_steps=self.local_steps,
                 fragments=len(self.fragments),
                 wire_bytes_per_inner_step=s["wire_bytes_sent"] / self.inner_steps if self.inner_steps else 0.0,
                 control_variate_wire_bytes=cv_bytes, participants_last_sync=list(self._participants_last),
                 drift=self.drift_name, delay=self.delay, pending_syncs=len(self._pending), **self._counts)
        return s

    def state_dict(self) -> dict:
        """Everything needed to resume bitwise: the outer start point, the outer optimizers' state,
        the engine's state (residuals, step, seed), the drift state (control variates), the
        exchanges in flight (waited for, with their means), the counters and the configuration."""
        for p in self._pending:  # first: a finished exchange has committed its residuals and step
            p.wait()
        return {"format": STATE_FORMAT, "inner_steps": self.inner_steps, "syncs": self.syncs,
                "nonfinite_syncs": self.nonfinite_syncs,
                "start": [[t.detach().cpu().clone() for t in frag] for frag in self._start],
                "outer": [opt.state_dict() for opt in self._outer], "hook": self.hook.state_dict(),
                "cv_hook": None if self.cv_hook is None else self.cv_hook.state_dict(),
                "drift": self.drift.state_dict(), "rounds": list(self._rounds),
                "pending": [p.state_dict() for p in self._pending], "counts": dict(self._counts),
                "participants_last": list(self._participants_last),
                "config": {"local_steps": self.local_steps, "outer": self.outer, "outer_lr": self.outer_lr,
                           "outer_momentum": self.outer_momentum, "fragments": len(self.fragments),
                           **self._round_config()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (``state``) saved with the same configuration and model."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a LocalSGD state_dict (format {state.get('format')!r}, expected {STATE_FORMAT})")
        mine = self.state_dict()["config"]
        saved_config = {**_CONFIG_DEFAULTS, **state["config"]}
        if saved_config != mine:
            raise ValueError(f"LocalSGD state_dict was saved with {saved_config}, this one is {mine}")
        shapes = [[tuple(t.shape) for t in frag] for frag in self._start]
        if [[tuple(t.shape) for t in frag] for frag in state["start"]] != shapes:
            raise ValueError("LocalSGD state_dict: the saved start point does not match this model's parameters")
        with torch.no_grad():
            for mine_frag, saved in zip(self._start, state["start"]):
                for t, s in zip(mine_frag, saved):
                    t.copy_(s)
        for opt, sd in zip(self._outer, state["outer"]):
            opt.load_state_dict(sd)
        self.hook.load_state_dict(state["hook"])
        if self.cv_hook is not None:
            self.cv_hook.load_state_dict(state["cv_hook"])
        self.drift.load_state_dict(state.get("drift", {}))
        self._rounds = [int(r) for r in state.get("rounds", [0] * len(self.fragments))]
        device = self._start[0][0].device
        self._pending = [Pending.from_state(p, device) for p in state.get("pending", [])]
        self._counts.update(state.get("counts", {}))
        self._participants_last = list(state.get("participants_last", []))
        self.inner_steps, self.syncs = int(state["inner_steps"]), int(state["syncs"])
        self.nonfinite_syncs = int(state.get("nonfinite_syncs", 0))

