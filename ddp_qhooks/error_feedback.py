"""Error-feedback memory: the residual ``e`` of every parameter, kept across steps.

Per step and bucket: ``g' = g + e``; ``q = Q(g')``; ``e = g' - deq(q)``.

Residuals belong to parameters, not to bucket indices: DDP rebuilds its buckets after the first
iteration(s) (and a resumed run starts again with one big bucket), so the same bucket index then
holds other parameters.  At run time each distinct bucket (identified by the tuple of parameter
keys it holds) gets one flat residual buffer aligned with the bucket buffer, for speed; when a new
bucket appears, its buffer is assembled from wherever those parameters' residuals live (an older
bucket's buffer or a loaded checkpoint), and buffers whose parameters have all moved are freed.
A residual is therefore never lost and never applied to another parameter; sizes are checked.
A bucket layout may also come back after some of its parameters moved to another one (FSDP
reduces only the parameters that got a gradient, so a module's layout changes with the parameters
used in a step): its buffer is then stale and is rebuilt from where each parameter's residual lives
now (:meth:`ResidualMemory.evict` does the same on request).

New residuals are written to a staging buffer and committed (a buffer swap, no copy) only once the
whole step is known to be finite on every rank: a step that GradScaler skips leaves every residual
as it was.  This costs one extra residual-sized buffer per bucket.
"""
from __future__ import annotations

import torch

__all__ = ["ResidualMemory", "add_residual", "restore_held", "param_slices"]


class ResidualMemory:
    def __init__(self) -> None:
        self._buffers: dict[tuple[int, ...], torch.Tensor] = {}
        # parameter key -> (bucket signature, offset, numel) of its live residual
        self._where: dict[int, tuple[tuple[int, ...], int, int]] = {}
        # residuals loaded from a checkpoint, not yet claimed by a bucket
        self._pending: dict[int, torch.Tensor] = {}
        # bucket signature -> buffer holding the next residual until the step is committed
        self._staging: dict[tuple[int, ...], torch.Tensor] = {}
        # signatures whose buffer some (not all) of their parameters have left: stale if they return
        self._partial: set[tuple[int, ...]] = set()

    def bucket_residual(self, signature: tuple[int, ...], numels: tuple[int, ...], device, dtype=torch.float32) -> torch.Tensor:
        """The flat residual of the bucket holding parameters ``signature`` (sizes ``numels``)."""
        buf = self._buffers.get(signature)
        if buf is not None:
            if signature not in self._partial:
                return buf
            self.evict(signature)
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
                self._staging.pop(sig, None)
                self._partial.discard(sig)
            else:
                self._partial.add(sig)
        return buf

    def evict(self, signature: tuple[int, ...]) -> None:
        """Detach the bucket's buffer when its layout changes: the residuals of the parameters that
        still live in it move to the pool of unplaced residuals (copied), where the next
        :meth:`bucket_residual` holding them finds them; its staging buffer is dropped.  Nothing is
        lost; a bucket that was never built is left alone."""
        buf = self._buffers.pop(signature, None)
        self._staging.pop(signature, None)
        self._partial.discard(signature)
        if buf is None:
            return
        for key in signature:
            loc = self._where.get(key)
            if loc is not None and loc[0] == signature:
                _, off, n = self._where.pop(key)
                self._pending[key] = buf[off:off + n].clone()

    def nbytes(self) -> tuple[int, int]:
        """(bytes of the live residual buffers, bytes of the staging buffers)."""
        return (sum(b.numel() * b.element_size() for b in self._buffers.values()),
                sum(b.numel() * b.element_size() for b in self._staging.values()))

    def staging(self, signature: tuple[int, ...]) -> torch.Tensor:
        """Where the bucket's next residual is written before :meth:`commit`."""
        st = self._staging.get(signature)
        if st is None:
            st = self._staging[signature] = torch.empty_like(self._buffers[signature])
        return st

    def commit(self, signatures) -> None:
        """Make the staged residuals of these buckets current (the old buffers become staging)."""
        for sig in signatures:
            if sig in self._buffers and sig in self._staging:
                self._buffers[sig], self._staging[sig] = self._staging[sig], self._buffers[sig]

    def holds_any(self, signature: tuple[int, ...]) -> bool:
        """Whether any of these parameters has a residual (live or loaded)."""
        return any(k in self._where or k in self._pending for k in signature)

    def release(self, signature: tuple[int, ...]) -> None:
        """Forget the bucket's residuals (the caller has moved them elsewhere)."""
        self._buffers.pop(signature, None)
        self._staging.pop(signature, None)
        self._partial.discard(signature)
        for key in signature:
            if key in self._where and self._where[key][0] == signature:
                del self._where[key]

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
        self._staging.clear()
        self._partial.clear()
        self._pending = {int(k): v.detach().reshape(-1).clone() for k, v in residuals.items()}

    def clear(self) -> None:
        self.load({})


def add_residual(x: torch.Tensor, residual: torch.Tensor, layout, hold_unused: bool) -> list:
    """``x += residual`` (the error-feedback input ``g + e``).

    With ``hold_unused`` (DDP's ``find_unused_parameters``), a parameter whose values in ``x`` are
    all exactly zero was unused in this step: it sends zero and keeps its residual.  Decided on the
    device, without reading anything on the host; returns the (slice, used) pairs that
    :func:`restore_held` needs."""
    if not hold_unused:
        x.add_(residual)
        return []
    held = []
    for sl in param_slices(layout):
        used = x[sl].ne(0).any()
        x[sl].addcmul_(residual[sl], used.to(x.dtype))  # no parameter-sized temporary
        held.append((sl, used))
    return held


def restore_held(next_residual: torch.Tensor, residual: torch.Tensor, held: list) -> None:
    """Where a parameter was unused, its next residual is the old one (see :func:`add_residual`)."""
    for sl, used in held:
        torch.where(used, next_residual[sl], residual[sl], out=next_residual[sl])


def param_slices(layout) -> list:
    return [slice(off, off + n) for off, n in zip(layout.param_offsets(), layout.param_numels)]
