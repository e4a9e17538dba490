"""Worker-side momentum: compress the momentum instead of the gradient (EF-SGDM / EF21-SGDM style).

Every worker ``i`` keeps, per parameter, ``m_i = beta * m_i + g_i`` (its local gradient ``g_i``,
``m_i = 0`` before the first step) and the hook compresses ``m_i`` (plus the error-feedback residual)
instead of ``g_i``.  The hook returns the mean over workers of the compressed ``m_i``; the user's
optimizer then runs WITHOUT momentum (one changed line)::

    state = ddp_qhooks.register(ddp, "sign", worker_momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)   # was momentum=0.9

Exactness.  The mean of the workers' momenta is the momentum of the mean gradient (the update is
linear), so with a lossless codec (``"none"``) this is ``torch.optim.SGD(momentum=beta,
dampening=0, nesterov=False)`` exactly, provided ``weight_decay=0`` (SGD adds ``weight_decay * p``
to the gradient *before* its momentum; with worker momentum the decay term is added after it).

Why it helps 1-bit codecs: the compressor (with error feedback) sees the smooth momentum, and its
error is not amplified by the optimizer's momentum (Fatkhullin et al. 2023, arXiv 2305.15155;
1-bit SGD / Signum).

Measured (docs/results_defaults.md): on Fashion-MNIST with SGD momentum 0.9 -> 0, sign with worker
momentum loses 1.56 pt with error feedback and 0.20 pt without it (plain sign: 2.55 pt); under an
unchanged AdamW it does NOT help (LM validation loss 1.62x fp32): it is a remedy for momentum SGD only.

Buffers belong to parameters, not to bucket indices: like ``error_feedback.ResidualMemory``, each
distinct bucket (identified by the tuple of parameter keys it holds, its *signature*) gets one flat
buffer, assembled from wherever those parameters' momenta live when DDP rebuilds its buckets or a
checkpoint is loaded.  The new buffer is staged and committed by the engine at the end of a step
whose input was finite on every rank: a step GradScaler skips leaves the momentum as it was.
"""
from __future__ import annotations

import math

import torch

from .error_feedback import ResidualMemory

__all__ = ["WorkerMomentum"]


class WorkerMomentum:
    """Per-parameter momentum buffers, kept like error-feedback residuals (a
    :class:`~ddp_qhooks.error_feedback.ResidualMemory`: rebuild-safe, keyed by parameter, staged).

    The new buffer is written to staging and made current by :meth:`commit` at the end of a step
    in which every rank's input was finite, so a step GradScaler skips leaves every buffer as it
    was, with no value read on the host."""

    def __init__(self, beta: float = 0.9) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) \
                or not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"worker_momentum must be a number in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self.memory = ResidualMemory()

    @torch.no_grad()
    def apply(self, signature: tuple[int, ...], numels, x: torch.Tensor) -> torch.Tensor:
        """``m' = beta * m + x`` for the bucket's parameters (staged), then ``x = m'`` in place;
        returns ``x``."""
        signature, numels = tuple(signature), tuple(int(n) for n in numels)
        if sum(numels) != x.numel():
            raise ValueError(f"worker momentum: the bucket has {x.numel()} values, the parameters {sum(numels)}")
        m = self.memory.bucket_residual(signature, numels, x.device)
        staged = self.memory.staging(signature)
        torch.add(x, m, alpha=self.beta, out=staged)
        x.copy_(staged)
        return x

    def commit(self, signatures) -> None:
        """Make the staged buffers of these buckets current (end of a finite step)."""
        self.memory.commit(signatures)

    def state_dict(self) -> dict[int, torch.Tensor]:
        """Every momentum buffer by parameter key (CPU copies)."""
        return {k: v.detach().cpu().clone() for k, v in self.memory.residuals().items()}

    def load_state_dict(self, state: dict) -> None:
        """Replace every buffer; each is placed into its bucket when that bucket is next seen."""
        self.memory.load({int(k): torch.as_tensor(v).detach().reshape(-1).float() for k, v in state.items()})
