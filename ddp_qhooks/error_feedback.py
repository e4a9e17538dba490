"""Error-feedback memory: the residual ``e`` of every parameter, kept across steps.

Per step and bucket: ``g' = g + e``; ``q = Q(g')``; ``e = g' - deq(q)``.

Residuals belong to parameters, not to bucket indices: DDP rebuilds its buckets after the first
iteration(s) (and a resumed run starts again with one big bucket), so the same bucket index then
holds other parameters.  At run time each distinct bucket (identified by the tuple of parameter
keys it holds) gets one flat residual buffer aligned with the bucket buffer, for speed; when a new
bucket appears, its buffer is assembled from wherever those parameters' residuals live (an older
bucket's buffer or a loaded checkpoint), and buffers whose parameters have all moved are freed.
A residual is therefore never lost and never applied to another parameter; sizes are checked.
"""
from __future__ import annotations

import torch

__all__ = ["ResidualMemory"]


class ResidualMemory:
    def __init__(self) -> None:
        self._buffers: dict[tuple[int, ...], torch.Tensor] = {}
        # parameter key -> (bucket signature, offset, numel) of its live residual
        self._where: dict[int, tuple[tuple[int, ...], int, int]] = {}
        # residuals loaded from a checkpoint, not yet claimed by a bucket
        self._pending: dict[int, torch.Tensor] = {}

    def bucket_residual(self, signature: tuple[int, ...], numels: tuple[int, ...], device, dtype=torch.float32) -> torch.Tensor:
        """The flat residual of the bucket holding parameters ``signature`` (sizes ``numels``)."""
        buf = self._buffers.get(signature)
        if buf is not None:
            return buf
        buf = torch.zeros(sum(numels), dtype=dtype, device=device)
        offset = 0
        emptied = set()
        for key, n in zip(signature, numels):
            src = None
            if key in self._where:
                sig, off, m = self._where[key]
                if m != n:
                    raise RuntimeError(f"error feedback: parameter {key} has {n} elements but its residual has {m}")
                src = self._buffers[sig][off:off + m]
                emptied.add(sig)
            elif key in self._pending:
                src = self._pending.pop(key)
                if src.numel() != n:
                    raise RuntimeError(f"error feedback: checkpointed residual of parameter {key} has {src.numel()} "
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

    def residuals(self) -> dict[int, torch.Tensor]:
        """Every known residual by parameter key (views; copy before keeping)."""
        out = {key: t for key, t in self._pending.items()}
        for key, (sig, off, n) in self._where.items():
            out[key] = self._buffers[sig][off:off + n]
        return out

    def load(self, residuals: dict[int, torch.Tensor]) -> None:
        """Replace all residuals; they are placed into buckets as those buckets appear."""
        self._buffers.clear()
        self._where.clear()
        self._pending = {int(k): v.detach().reshape(-1).clone() for k, v in residuals.items()}

    def clear(self) -> None:
        self.load({})
