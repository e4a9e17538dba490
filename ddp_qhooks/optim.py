"""1-bit Adam for a comm hook: exact AdamW during a warm-up, then a frozen second moment and a
compressed momentum (Tang et al. 2021, "1-bit Adam", arXiv 2102.02888).

Compressing raw gradients before Adam fails for 1-bit codecs: Adam divides every coordinate by its
own running RMS, so the error-feedback residual's delayed mass comes back as full-size steps.  1-bit
Adam compresses the *momentum* instead, which Adam's update is linear in once its second moment
is frozen.  The one line the user changes is the optimizer's construction::

    state = ddp_qhooks.register(ddp, "sign")
    opt = ddp_qhooks.optim.OneBitAdam(groups, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                      warmup_steps=60, hook=state)   # was torch.optim.AdamW(...)

Phases, decided by the optimizer's count of completed steps ``t`` (the hook asks it, so both agree
on every rank):

* ``t < warmup_steps``: the hook sends full-precision gradients (an fp32 all-reduce, counted in the
  hook's ``stats()``) and :meth:`step` is ``torch.optim.AdamW.step`` itself.
* afterwards: the hook forms each worker's momentum ``m_i = beta1 * m + (1 - beta1) * g_i`` from the
  shared momentum ``m`` of the previous step (this optimizer's ``exp_avg``), compresses it with
  error feedback and returns the mean ``m'``; :meth:`step` takes ``m'`` (what the gradient
  attribute then holds, after any clipping the script does) as the new ``exp_avg`` and applies
  ``p -= lr * (m' / (1 - beta1^t)) / (sqrt(v / (1 - beta2^N)) + eps)`` after AdamW's decoupled
  decay ``p *= 1 - lr * weight_decay``; ``v`` (``exp_avg_sq``) stays as it was after the ``N``
  warm-up steps.

With codec ``"none"`` the compressed phase is that frozen-variance Adam exactly.  Clipping in the
script (``clip_grad_norm_``) acts on the gradient during the warm-up and on the exchanged momentum
afterwards (the hook runs before it).  Not for GradScaler's fp16 loss scaling (the hook would mix
scaled gradients with an unscaled momentum).

Measured (docs/results_defaults.md, section 7; the study's 300-step LM, sign): with a 60-step
warm-up fp32's validation loss on 3 seeds (0.999x) at 4.4x fewer bytes; frozen after 4, 8, 15 or
(on some seeds) 30 steps the variance fails even without compression, so ">= 20x fewer bytes
than fp32" (at most ~1.5 % of the steps in fp32) needs a run long enough for the variance to
settle within that share.

State (``exp_avg``, ``exp_avg_sq``, ``step``, the step count at which each variance froze, the
phase counter) is in :meth:`state_dict`; with the hook state's ``state_dict`` (residuals) a resumed
run repeats the uninterrupted one bitwise.
"""
from __future__ import annotations

import math

import torch

__all__ = ["OneBitAdam"]


class OneBitAdam(torch.optim.AdamW):
    """AdamW whose second moment freezes after ``warmup_steps`` and whose momentum is exchanged
    compressed by ``hook`` (a :class:`~ddp_qhooks.QuantizedHookState`, e.g. what
    :func:`~ddp_qhooks.register` returned).

    Args:
        params, lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
        warmup_steps: steps of exact AdamW on full-precision averaged gradients before the variance
            freezes and the momentum is compressed (>= 1: the variance must be estimated).  Every
            warm-up step sends as much as fp32 training does; the bytes saved over a run of ``T``
            steps are about ``T / (warmup_steps + T / c)`` for a codec with ratio ``c``.
        hook: the hook state whose exchanges this optimizer drives (keyword only).
        variance_refresh: step numbers (counted from 0, each >= ``warmup_steps``) at which the hook
            exchanges the gradient in full precision again and both moments take the mean
            gradient (0/1 Adam's sparse variance updates, Lu et al. 2022).  Over a gap of ``d``
            steps since the variance's last update it becomes ``beta2^d * v + (1 - beta2^d) * g^2``
            (AdamW's ``v`` had the squared gradient stayed ``g^2`` in the gap), bias-corrected for
            the step count.  Each costs one fp32 exchange.  Default: none.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, warmup_steps: int, hook, variance_refresh=()) -> None:
        from .engine import QuantizedHookState

        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"OneBitAdam: warmup_steps must be an integer >= 1 (the second moment is estimated in "
                             f"the warm-up, then frozen), got {warmup_steps!r}")
        refresh = tuple(variance_refresh) if isinstance(variance_refresh, (list, tuple, range)) else None
        if refresh is None or any(isinstance(t, bool) or not isinstance(t, int) or t < warmup_steps for t in refresh):
            raise ValueError("OneBitAdam: variance_refresh must be a list of step numbers (counted from 0), each >= "
                             f"warmup_steps={warmup_steps}, got {variance_refresh!r}")
        if not isinstance(hook, QuantizedHookState):
            raise TypeError("OneBitAdam: hook must be the ddp_qhooks.QuantizedHookState of the DDP model (what "
                            f"ddp_qhooks.register returns), got {type(hook).__name__}")
        if hook.worker_momentum is not None:
            raise ValueError("OneBitAdam: the hook state keeps its own worker momentum (worker_momentum="
                             f"{hook.worker_momentum.beta}); 1-bit Adam compresses the optimizer's momentum, so "
                             "register the hook without worker_momentum")
        if hook._optimizer is not None:
            raise ValueError("OneBitAdam: this hook state already drives another OneBitAdam; one optimizer per hook")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.warmup_steps = warmup_steps
        self.variance_refresh = frozenset(refresh)
        self.hook = hook
        self._steps = 0          # completed steps: the phase
        self._mixed_at = None    # the step at which the hook last mixed momentum into a bucket
        self._groups = None
        hook._optimizer = self

    # -- the hook's side ---------------------------------------------------------------------------
    def compressing(self) -> bool:
        """Whether the current step's exchange is compressed (past the warm-up, not a refresh)."""
        return self._steps >= self.warmup_steps and self._steps not in self.variance_refresh

    @torch.no_grad()
    def mix_momentum(self, params, x: torch.Tensor) -> None:
        """``x = beta1 * exp_avg + (1 - beta1) * x`` per parameter of a flat bucket ``x`` (called by
        the hook; the parameters are the bucket's, in order)."""
        groups = self._group_of()
        offset = 0
        for p in params:
            n = p.numel()
            group = groups.get(p)
            if group is None:
                raise RuntimeError("OneBitAdam: the hook's bucket holds a parameter this optimizer does not update; "
                                   "give OneBitAdam every parameter of the DDP model")
            beta1 = group["betas"][0]
            seg = x[offset:offset + n]
            seg.mul_(1 - beta1)
            m = self.state[p].get("exp_avg") if p in self.state else None
            if m is not None:
                seg.add_(m.reshape(-1), alpha=beta1)
            offset += n
        self._mixed_at = self._steps

    def _group_of(self) -> dict:
        if self._groups is None:
            self._groups = {p: g for g in self.param_groups for p in g["params"]}
        return self._groups

    def add_param_group(self, param_group) -> None:
        super().add_param_group(param_group)
        self._groups = None

    # -- the optimizer's side ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("OneBitAdam.step does not take a closure (the gradient comes from the DDP hook)")
        if self._steps < self.warmup_steps:
            super().step()
            self._steps += 1
            return None
        refresh = not self.compressing()
        if not refresh and self._mixed_at != self._steps:
            raise RuntimeError(f"OneBitAdam: step {self._steps} is past the warm-up ({self.warmup_steps} steps) but its "
                               "gradients did not pass through the hook given as hook=...: register that state on the "
                               "DDP model that computes the loss, and call step() only after a synchronized backward")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "exp_avg_sq" not in st:
                    raise RuntimeError("OneBitAdam: a parameter received its first gradient after the warm-up, so "
                                       "its second moment was never estimated; every parameter needs a gradient in "
                                       "the warm-up steps")
                if "variance_steps" not in st:  # the step count of the variance's last update
                    st["variance_steps"] = float(st["step"])
                st["step"] += 1
                if refresh:  # the mean gradient in full precision: both moments take it
                    st["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                    # as if the squared gradient had been this one since the last update: the
                    # old estimate decays by beta2 per step of the gap, so a stale one is forgotten
                    decay = beta2 ** (float(st["step"]) - st["variance_steps"])
                    st["exp_avg_sq"].mul_(decay).addcmul_(p.grad, p.grad, value=1 - decay)
                    st["variance_steps"] = float(st["step"])
                else:  # the hook's mean of the compressed momenta
                    st["exp_avg"].copy_(p.grad)
                bias1 = 1 - beta1 ** float(st["step"])
                bias2 = 1 - beta2 ** st["variance_steps"]
                p.mul_(1 - lr * wd)
                denom = (st["exp_avg_sq"].sqrt() / math.sqrt(bias2)).add_(eps)
                p.addcdiv_(st["exp_avg"], denom, value=-lr / bias1)
        self._steps += 1
        return None

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["onebit"] = {"steps": self._steps, "warmup_steps": self.warmup_steps,
                        "variance_refresh": sorted(self.variance_refresh)}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        onebit = state_dict.pop("onebit", None)
        if onebit is None:
            raise ValueError("OneBitAdam.load_state_dict: this state has no 'onebit' entry (phase counter); it is "
                             "not a OneBitAdam state_dict")
        saved = (int(onebit["warmup_steps"]), sorted(int(t) for t in onebit.get("variance_refresh", ())))
        if saved != (self.warmup_steps, sorted(self.variance_refresh)):
            raise ValueError(f"OneBitAdam.load_state_dict: saved with warmup_steps={saved[0]}, variance_refresh="
                             f"{saved[1]}; this optimizer has {self.warmup_steps}, {sorted(self.variance_refresh)}")
        super().load_state_dict(state_dict)
        self._steps = int(onebit["steps"])
        self._groups = None
