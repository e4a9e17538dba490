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
checkpoint is loaded.  Steps that GradScaler skips still advance the momentum (the non-finite
gradient is not added: a non-finite bucket leaves the buffer as it was and passes through).
"""
from __future__ import annotations

import math

import torch

__all__ = ["WorkerMomentum"]


class WorkerMomentum:
    def __init__(self, beta: float = 0.9) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) \
                or not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"worker_momentum must be a number in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self._buffers: dict[tuple[int, ...], torch.Tensor] = {}
        self._where: dict[int, tuple[tuple[int, ...], int, int]] = {}   # key -> (signature, offset, numel)
        self._pending: dict[int, torch.Tensor] = {}                     # loaded, not yet claimed

    def _bucket(self, signature: tuple[int, ...], numels, device, dtype) -> torch.Tensor:
        buf = self._buffers.get(signature)
        if buf is not None:
            return buf
        buf = torch.zeros(sum(numels), dtype=dtype, device=device)
        offset, emptied = 0, set()
        for key, n in zip(signature, numels):
            src = None
            if key in self._where:
                sig, off, m = self._where[key]
                if m != n:
                    raise RuntimeError(f"worker momentum: parameter {key} has {n} elements, its buffer {m}")
                src = self._buffers[sig][off:off + m]
                emptied.add(sig)
            elif key in self._pending:
                src = self._pending.pop(key)
                if src.numel() != n:
                    raise RuntimeError(f"worker momentum: checkpointed buffer of parameter {key} has {src.numel()} "
                                       f"elements, the parameter has {n}")
            if src is not None:
                buf[offset:offset + n].copy_(src.reshape(-1))
            self._where[key] = (signature, offset, n)
            offset += n
        self._buffers[signature] = buf
        for sig in emptied:
            if not any(loc[0] == sig for loc in self._where.values()):
                del self._buffers[sig]
        return buf

    @torch.no_grad()
    def apply(self, signature: tuple[int, ...], numels, x: torch.Tensor) -> torch.Tensor:
        """``m = beta * m + x`` for the bucket's parameters, then ``x = m`` (in place); returns ``x``.
        A non-finite ``x`` (a step GradScaler will skip) leaves ``m`` unchanged and ``x`` as it is."""
        numels = tuple(int(n) for n in numels)
        if sum(numels) != x.numel():
            raise ValueError(f"worker momentum: the bucket has {x.numel()} values, the parameters {sum(numels)}")
        if not bool(torch.isfinite(x).all()):
            return x
        m = self._bucket(tuple(signature), numels, x.device, torch.float32)
        m.mul_(self.beta).add_(x)
        x.copy_(m)
        return x

    def state_dict(self) -> dict[int, torch.Tensor]:
        """Every momentum buffer by parameter key (CPU copies)."""
        out = {k: v.detach().cpu().clone() for k, v in self._pending.items()}
        for key, (sig, off, n) in self._where.items():
            out[key] = self._buffers[sig][off:off + n].detach().cpu().clone()
        return out

    def load_state_dict(self, state: dict) -> None:
        """Replace every buffer; each is placed into its bucket when that bucket is next seen."""
        self._buffers.clear()
        self._where.clear()
        self._pending = {int(k): torch.as_tensor(v).detach().reshape(-1).float().clone() for k, v in state.items()}
