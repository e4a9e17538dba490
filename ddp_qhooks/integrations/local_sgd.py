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

from ..engine import QuantizedHookState, Unit, submit
from ..exchange import check_agreement

__all__ = ["LocalSGD", "local_phase_hook", "OUTER_OPTIMIZERS"]

OUTER_OPTIMIZERS = ("average", "nesterov")
STATE_FORMAT = 1


def local_phase_hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A DDP comm hook that communicates nothing: each rank keeps its own gradient (the local phase of
    :class:`LocalSGD` for a model that stays wrapped in DDP).  ``state`` is ignored (register it with
    ``None``); ``bucket`` is DDP's GradBucket, returned unchanged."""
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


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
    """

    def __init__(self, module: torch.nn.Module, local_steps: int = 16, codec: str = "stochastic", bits: int = 8, *,
                 error_feedback: bool = True, outer: str = "average", outer_lr: float | None = None,
                 outer_momentum: float = 0.9, fragments: int = 1, process_group=None, exchange: str = "auto",
                 seed: int = 0, **codec_options):
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
        self.hook = QuantizedHookState(process_group, codec=codec, bits=bits, error_feedback=error_feedback,
                                       seed=seed, module=module, exchange=exchange, **codec_options)
        self.fragments = _split(params, fragments)
        self.inner_steps = 0
        self.syncs = 0
        self.nonfinite_syncs = 0
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
                                      "params": [p.numel() for p in params]}, params[0].device, process_group)

    def _make_outer(self, frag):
        if self.outer == "average":
            return torch.optim.SGD(frag, lr=self.outer_lr)
        return torch.optim.SGD(frag, lr=self.outer_lr, momentum=self.outer_momentum, nesterov=True)

    # -- training loop ---------------------------------------------------------------------------
    def due(self, step: int) -> list[int]:
        """Fragments that synchronize after inner step ``step`` (1-based)."""
        h, f = self.local_steps, len(self.fragments)
        return [i for i in range(f) if step % h == (i * h) // f]

    def step(self) -> bool:
        """Call after every inner optimizer step; synchronizes the fragments that are due. Returns
        whether anything was synchronized."""
        self.inner_steps += 1
        due = self.due(self.inner_steps)
        for i in due:
            self._sync(i)
        return bool(due)

    def sync(self) -> None:
        """Synchronize every fragment now (e.g. before evaluating or saving the final model)."""
        for i in range(len(self.fragments)):
            self._sync(i)

    @torch.no_grad()
    def _sync(self, i: int) -> None:
        frag, start = self.fragments[i], self._start[i]
        delta = torch.cat([(s - p.detach()).reshape(-1).float() for s, p in zip(start, frag)])
        mean = submit(self.hook, Unit(i, delta, frag, is_last=True)).wait()
        if not bool(torch.isfinite(mean).all()):
            # some rank's local steps went non-finite: the hook made the mean NaN on every rank and
            # kept the residuals; every rank drops the round and restarts from the last start point
            for s, p in zip(start, frag):
                p.copy_(s)
            self.nonfinite_syncs += 1
            warnings.warn(f"LocalSGD: non-finite pseudo-gradient in fragment {i} at inner step {self.inner_steps}: "
                          "round dropped on every rank, parameters reset to the last synchronized point",
                          RuntimeWarning, stacklevel=3)
            return
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
        self.syncs += 1

    # -- reporting and checkpoints ---------------------------------------------------------------
    def stats(self) -> dict:
        """The engine's counters for the pseudo-gradient exchanges (``wire_bytes_sent``,
        ``compression_ratio``, ... as in :meth:`QuantizedHookState.stats`), plus ``inner_steps``
        (optimizer steps so far), ``syncs`` (fragment synchronizations so far), ``nonfinite_syncs``
        (rounds dropped because a pseudo-gradient was not finite), ``local_steps`` (H),
        ``fragments`` (F) and ``wire_bytes_per_inner_step`` (bytes sent per inner step, averaged)."""
        s = self.hook.stats()
        s.update(inner_steps=self.inner_steps, syncs=self.syncs, nonfinite_syncs=self.nonfinite_syncs,
                 local_steps=self.local_steps,
                 fragments=len(self.fragments),
                 wire_bytes_per_inner_step=s["wire_bytes_sent"] / self.inner_steps if self.inner_steps else 0.0)
        return s

    def state_dict(self) -> dict:
        """Everything needed to resume bitwise: the outer start point, the outer optimizers' state,
        the engine's state (residuals, step, seed), the counters and the configuration."""
        return {"format": STATE_FORMAT, "inner_steps": self.inner_steps, "syncs": self.syncs,
                "nonfinite_syncs": self.nonfinite_syncs,
                "start": [[t.detach().cpu().clone() for t in frag] for frag in self._start],
                "outer": [opt.state_dict() for opt in self._outer], "hook": self.hook.state_dict(),
                "config": {"local_steps": self.local_steps, "outer": self.outer, "outer_lr": self.outer_lr,
                           "outer_momentum": self.outer_momentum, "fragments": len(self.fragments)}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (``state``) saved with the same configuration and model."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a LocalSGD state_dict (format {state.get('format')!r}, expected {STATE_FORMAT})")
        mine = self.state_dict()["config"]
        if state["config"] != mine:
            raise ValueError(f"LocalSGD state_dict was saved with {state['config']}, this one is {mine}")
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
        self.inner_steps, self.syncs = int(state["inner_steps"]), int(state["syncs"])
        self.nonfinite_syncs = int(state.get("nonfinite_syncs", 0))


def _first_rank(process_group) -> int:
    """Global rank of the group's first member (the broadcast source)."""
    if process_group is None:
        return 0
    return dist.get_global_rank(process_group, 0)


def _split(params: list, parts: int) -> list[list]:
    """``parts`` contiguous groups of parameters with about equal numbers of values."""
    total = sum(p.numel() for p in params)
    groups, current, acc = [], [], 0
    for i, p in enumerate(params):
        current.append(p)
        acc += p.numel()
        left = len(params) - i - 1
        need = parts - len(groups) - 1  # groups still to start after this one
        if need and (acc >= total * (len(groups) + 1) / parts or left == need):
            groups.append(current)
            current = []
    groups.append(current)
    return groups
