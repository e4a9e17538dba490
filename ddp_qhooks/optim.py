"""1-bit Adam for a comm hook: AdamW during a warm-up, then a frozen second moment and a compressed
momentum (Tang et al. 2021, "1-bit Adam", arXiv 2102.02888), with a compressed warm-up.

Compressing raw gradients before Adam fails for 1-bit codecs: Adam divides every coordinate by its
own running RMS, so the error-feedback residual's delayed mass comes back as full-size steps.  1-bit
Adam compresses the *momentum* instead, which Adam's update is linear in once its second moment
is frozen.  The one line the user changes is the optimizer's construction::

    state = ddp_qhooks.register(ddp, "sign")
    opt = ddp_qhooks.optim.OneBitAdam(groups, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                      warmup_steps=60, hook=state)   # was torch.optim.AdamW(...)

Phases, decided by the optimizer's count of completed steps ``t`` (the hook asks it, so both agree
on every rank):

* ``t < warmup_steps``: the hook sends each rank's gradient through the warm-up codec (default
  stochastic rounding to 2 bits, unbiased, without error feedback; ``warmup_codec=None``: an fp32
  all-reduce, the paper's warm-up) and :meth:`step` is ``torch.optim.AdamW.step`` on the mean.
* afterwards: the hook forms each worker's momentum ``m_i = beta1 * m + (1 - beta1) * g_i`` from the
  shared momentum ``m`` of the previous step (this optimizer's ``exp_avg``), compresses it with
  error feedback and returns the mean ``m'``; :meth:`step` takes ``m'`` (what the gradient
  attribute then holds, after any clipping the script does) as the new ``exp_avg`` and applies
  ``p -= lr * (m' / (1 - beta1^t)) / (sqrt(v / (1 - beta2^N)) + eps)`` after AdamW's decoupled
  decay ``p *= 1 - lr * weight_decay``; ``v`` (``exp_avg_sq``) stays as it was after the ``N``
  warm-up steps.

Why the warm-up is compressed: the variance may freeze only once the learning-rate warm-up is over
(frozen earlier it stalls or diverges even without compression), and a learning-rate warm-up is a
share of the run (10 % in the study's recipe), so an fp32 warm-up alone caps the saving at a few
times (``1 / (share + (1 - share) / c)`` for a codec ``c`` times smaller than fp32: 4.4x measured,
under 8x for any run length at a 10 % share).  With unbiased rounding the warm-up's moments see the
mean gradient plus zero-mean noise (the second moment comes out larger by the rounding variance),
which measured no worse than fp32 here; a biased codec's error would build up without error
feedback, so the warm-up codec must round stochastically.

With codec ``"none"`` the compressed phase is that frozen-variance Adam exactly.  Clipping in the
script (``clip_grad_norm_``) acts on the gradient during the warm-up and on the exchanged momentum
afterwards (the hook runs before it).  Not for GradScaler's fp16 loss scaling (the hook would mix
scaled gradients with an unscaled momentum).

Measured (docs/results_defaults.md, section 7; the study's 300-step LM, sign, 3 seeds): with a
60-step 2-bit warm-up 1.008x fp32's validation loss at 23.7x fewer bytes over the run; with a
60-step fp32 warm-up 0.999x at 4.4x; frozen after 4, 8, 15 or (on some seeds) 30 steps the
variance fails even without compression.

State (``exp_avg``, ``exp_avg_sq``, ``step``, the step count at which each variance froze, the
phase counter, the warm-up codec) is in :meth:`state_dict`; with the hook state's ``state_dict``
(residuals) a resumed run repeats the uninterrupted one bitwise.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["OneBitAdam"]

LOSSLESS_ENOUGH = ("none", "fp16", "bf16")  # warm-up codecs whose rounding needs no correction


class OneBitAdam(torch.optim.AdamW):
    """AdamW whose second moment freezes after ``warmup_steps`` and whose momentum is exchanged
    compressed by ``hook`` (a :class:`~ddp_qhooks.QuantizedHookState`, e.g. what
    :func:`~ddp_qhooks.register` returned).

    Args:
        params, lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
        warmup_steps: steps of AdamW on the averaged gradients (exchanged through ``warmup_codec``)
            before the variance freezes and the momentum is compressed (>= 1: the variance must be
            estimated).  Freeze after the learning-rate warm-up (the study's recipe needed twice its
            length); the bytes saved over a run of ``T`` steps are about
            ``T / (warmup_steps / w + (T - warmup_steps) / c)`` for warm-up and hook codecs ``w`` and
            ``c`` times smaller than fp32.
        hook: the hook state whose exchanges this optimizer drives (keyword only).
        variance_refresh: step numbers (counted from 0, each >= ``warmup_steps``) at which the hook
            exchanges the gradient in full precision again and both moments take the mean
            gradient (0/1 Adam's sparse variance updates, Lu et al. 2022).  Over a gap of ``d``
            steps since the variance's last update it becomes ``beta2^d * v + (1 - beta2^d) * g^2``
            (AdamW's ``v`` had the squared gradient stayed ``g^2`` in the gap), bias-corrected for
            the step count.  Each costs one fp32 exchange.  Default: none.
        warmup_codec, warmup_bits, warmup_options: the codec (a name of
            ``ddp_qhooks.codecs.available()``), its bits and keyword options for the warm-up's
            gradient exchange, which keeps no error feedback, so it must round without bias:
            ``"stochastic"`` (default, at 2 bits), ``"qsgd"``, ``"log"``, sign with
            ``mode="stochastic"``, ternary with ``rounding="stochastic"``, or ``"fp16"`` /
            ``"bf16"`` / ``"none"``; ``None``: an fp32 all-reduce.  The hook's exchange choice (all-gather, two-phase, ...) applies to it too.

    Build it on every rank at the same point of the script (like any optimizer): the ranks check at
    the next exchange that their schedules and phases agree.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 *, warmup_steps: int, hook, variance_refresh=(), warmup_codec: Optional[str] = "stochastic",
                 warmup_bits: int = 2, warmup_options: Optional[dict] = None) -> None:
        from .codecs import make_codec
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
        self.warmup_codec = None
        if warmup_codec is not None:
            if not isinstance(warmup_codec, str):
                raise ValueError("OneBitAdam: warmup_codec must be a codec name (one of ddp_qhooks.codecs.available()) "
                                 f"or None (full-precision warm-up), got {warmup_codec!r}")
            try:
                self.warmup_codec = make_codec(warmup_codec, warmup_bits, **(warmup_options or {}))
            except (ValueError, TypeError) as e:
                raise ValueError(f"OneBitAdam: warmup_codec={warmup_codec!r}, warmup_bits={warmup_bits!r}, "
                                 f"warmup_options={warmup_options!r}: {e}") from None
            if not (getattr(self.warmup_codec, "stochastic", False) or self.warmup_codec.name in LOSSLESS_ENOUGH) \
                    or getattr(self.warmup_codec, "needs_error_feedback", False):
                raise ValueError(f"OneBitAdam: warmup_codec={warmup_codec!r} with {self.warmup_codec.config()} is biased "
                                 "(or clips and relies on error feedback), and the warm-up exchange keeps no error "
                                 "feedback, so its rounding error would build up in the moments; use an unbiased, "
                                 "stochastically rounding codec: 'stochastic' (the default), 'qsgd', 'log', 'sign' with "
                                 "mode='stochastic', 'ternary' with rounding='stochastic'; or "
                                 f"{', '.join(LOSSLESS_ENOUGH)}; or None (fp32)")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.warmup_steps = warmup_steps
        self.variance_refresh = frozenset(refresh)
        self.hook = hook
        self._steps = 0          # completed steps: the phase
        self._mixed_at = None    # the step at which the hook last mixed momentum into a bucket
        self._groups = None
        hook._optimizer = self
        hook._agreed = False     # the phases must agree across ranks too: checked at the next exchange

    # -- the hook's side ---------------------------------------------------------------------------
    def compressing(self) -> bool:
        """Whether the current step's exchange compresses the momentum (past the warm-up, not a refresh)."""
        return self._steps >= self.warmup_steps and self._steps not in self.variance_refresh

    def warmup_exchange_codec(self):
        """The codec of the current step's gradient exchange when :meth:`compressing` is False: the
        warm-up codec during the warm-up, None (full precision) for a variance refresh."""
        return self.warmup_codec if self._steps < self.warmup_steps else None

    def agreed_config(self) -> dict:
        """What every rank's optimizer must have alike (the hook checks it with its own)."""
        return {"warmup_steps": self.warmup_steps, "variance_refresh": sorted(self.variance_refresh),
                "warmup_codec": None if self.warmup_codec is None else self.warmup_codec.config(),
                "steps": self._steps}  # the phase: a rank that missed load_state_dict would be in another

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
        if self.warmup_codec is not None:
            sd["onebit"]["warmup_codec"] = dict(self.warmup_codec.config())
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
        saved_codec = onebit.get("warmup_codec")
        mine = None if self.warmup_codec is None else dict(self.warmup_codec.config())
        if int(onebit["steps"]) < self.warmup_steps and saved_codec != mine:
            raise ValueError(f"OneBitAdam.load_state_dict: saved with warm-up codec {saved_codec} (None: full "
                             f"precision) before the end of its warm-up; this optimizer has {mine}: build it with "
                             "the saved one (warmup_codec=None for a full-precision warm-up)")
        super().load_state_dict(state_dict)
        self._steps = int(onebit["steps"])
        self._groups = None
        self.hook._agreed = False  # the loaded phase is checked across ranks at the next exchange
