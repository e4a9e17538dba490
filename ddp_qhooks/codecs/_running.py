"""Per-block running state of ``kmeans`` and ``adaptive`` (:class:`BlockState`), its checkpointing
(:class:`RunningStateMixin`), and the body helpers both codecs share.

The state is kept in one of two ways.  Where codecs read on the host (the CPU), an encoder learns
finiteness first and writes the state only for a finite input, with update counts as Python ints.
Where a read would wait for the device (:func:`~ddp_qhooks.codecs.base.reads_on_host` is False),
the counts stay on the device too (0-dim int64 tensors) and the encoder writes ``where(finite,
new, old)`` rows and ``count + finite``: the state ends up as the host path leaves it, without the
encoder reading the flag.  A block whose count is 0 reads as absent (it never saw a finite input).
"""
from __future__ import annotations

import torch

from .blocks import LAYER
from .base import Layout

STATE_FORMAT = 1

__all__ = ["BlockState", "RunningStateMixin", "read_meta", "write_meta", "sample_index"]


def read_meta(body: torch.Tensor, nbytes: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Float32 metadata at the start of a body; copied first because bodies may sit at any byte
    offset of a received buffer, and a float32 view needs 4-byte alignment."""
    return body[:nbytes].clone().view(torch.float32).view(shape)


def write_meta(body: torch.Tensor, meta: torch.Tensor) -> None:
    flat = meta.to(torch.float32).contiguous().view(-1)
    body[: 4 * flat.numel()].copy_(flat.view(torch.uint8))


def sample_index(length: int, sample: int, device) -> torch.Tensor | None:
    """Evenly strided subsample ``floor(j * length / S)``, S = min(sample, length); None = all."""
    if length <= sample:
        return None
    return torch.arange(sample, dtype=torch.int64, device=device) * length // sample


def _count(updates) -> int:
    """An entry's update count as a number (a device count is read: host path, checkpoints)."""
    return updates if isinstance(updates, int) else int(updates)


class BlockState:
    """Per-rank running state: one row of ``width`` values per block, plus an update counter.

    Rows are stored per parameter key (``block_size`` "layer" or an integer: row i is the
    parameter's block i) so that they survive DDP regrouping parameters into new buckets, or per
    layout (``block_size=None``: the block is the bucket itself).
    """

    def __init__(self, block_size, width: int, dtype: torch.dtype):
        self.block_size = block_size
        self.width = width
        self.dtype = dtype
        self.entries: dict[tuple, tuple] = {}   # key -> (rows, updates: int or 0-dim int64 tensor, numel)

    def slots(self, layout: Layout) -> list[tuple[tuple, int, int, int]]:
        """``(key, first block, blocks, numel)`` of every state entry the layout uses, in block order."""
        if self.block_size is None:
            return [(("bucket", layout.param_numels, layout.param_keys), 0, 1, layout.numel)] if layout.numel else []
        out, first = [], 0
        for n, k in zip(layout.param_numels, layout.param_keys):
            if n:
                nb = 1 if self.block_size == LAYER else -(-n // self.block_size)
                out.append((("param", k), first, nb, n))
                first += nb
        return out

    def _entry(self, key, nb: int, numel: int):
        e = self.entries.get(key)
        return e if e is not None and e[2] == numel and tuple(e[0].shape) == (nb, self.width) else None

    def read(self, layout: Layout, device) -> tuple[list, torch.Tensor, torch.Tensor, torch.Tensor, list]:
        """``(slots, rows, have, updates, prior)``: rows (zeros where absent) on ``device``; per block
        CPU tensors ``have`` (bool) and ``updates`` (int64); ``prior`` per slot (None = start afresh)."""
        slots = self.slots(layout)
        nblocks = sum(s[2] for s in slots)
        rows = torch.zeros(nblocks, self.width, dtype=self.dtype, device=device)
        prior, have, counts, nbs = [], [], [], []
        for key, first, nb, numel in slots:
            e = self._entry(key, nb, numel)
            n = _count(e[1]) if e is not None else 0
            ok = n > 0
            if ok:
                rows[first:first + nb] = e[0]
            prior.append(n if ok else None)
            have.append(ok)
            counts.append(n)
            nbs.append(nb)
        have_t, counts_t = torch.tensor(have, dtype=torch.bool), torch.tensor(counts, dtype=torch.int64)
        if nblocks != len(slots):   # per block (repeat_interleave costs ~80 us a call: not for one block per slot)
            reps = torch.tensor(nbs, dtype=torch.int64)
            have_t, counts_t = have_t.repeat_interleave(reps), counts_t.repeat_interleave(reps)
        return slots, rows, have_t, counts_t, prior

    def write(self, slots: list, rows: torch.Tensor, prior: list) -> None:
        for (key, first, nb, numel), p in zip(slots, prior):
            self.entries[key] = (rows[first:first + nb].clone(), (p or 0) + 1, numel)

    def read_on_device(self, layout: Layout, device) -> tuple[list, torch.Tensor, torch.Tensor, torch.Tensor, list]:
        """:meth:`read` with nothing built on the host: ``have`` and ``updates`` per block and
        ``prior`` per slot (0-dim int64, 0 = start afresh) are tensors on ``device``, made by
        device ops only (a host tensor copied to an accelerator would wait for it too), in a few
        kernels per bucket rather than a few per parameter."""
        slots = self.slots(layout)
        parts, prior = [], []
        for key, first, nb, numel in slots:
            e = self._entry(key, nb, numel)
            if e is None:
                parts.append(torch.zeros(nb, self.width, dtype=self.dtype, device=device))
                prior.append(torch.zeros((), dtype=torch.int64, device=device))
                continue
            parts.append(e[0].to(device))
            n = e[1]
            prior.append(n.to(device) if isinstance(n, torch.Tensor) else torch.full((), n, dtype=torch.int64, device=device))
        if not slots:
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            return slots, torch.zeros(0, self.width, dtype=self.dtype, device=device), empty > 0, empty, prior
        rows = torch.cat(parts)
        counts = torch.stack(prior)
        if len(rows) != len(slots):   # per block
            counts = torch.cat([p.view(1).expand(s[2]) for p, s in zip(prior, slots)])
        return slots, rows, counts > 0, counts, prior

    def write_where(self, slots: list, rows: torch.Tensor, old: torch.Tensor, prior: list,
                    finite: torch.Tensor) -> None:
        """After :meth:`read_on_device`: the new ``rows`` and one more update where ``finite`` (a
        0-dim bool tensor, unread), else the ``old`` rows and counts.  Entries are views of two
        fresh tensors (no copy per parameter): nothing writes to them later."""
        if not slots:
            return
        kept = torch.where(finite, rows, old)
        counts = torch.stack(prior) + finite
        for i, (key, first, nb, numel) in enumerate(slots):
            self.entries[key] = (kept[first:first + nb], counts[i], numel)

    def to_list(self, field: str) -> list[dict]:
        out = []
        for key, (rows, updates, numel) in self.entries.items():
            updates = _count(updates)
            if not updates:   # recorded on the device path for a block that never saw a finite input
                continue
            d = {"scope": key[0]}
            if key[0] == "bucket":
                d.update(param_numels=list(key[1]), param_keys=list(key[2]))
            else:
                d["param_key"] = key[1]
            d.update({"numel": numel, "updates": updates, field: rows.detach().cpu().clone()})
            out.append(d)
        return out

    def from_list(self, entries: list, field: str, codec: str) -> None:
        loaded = {}
        for d in entries:
            if d["scope"] == "bucket":
                key = ("bucket", tuple(int(v) for v in d["param_numels"]), tuple(int(v) for v in d["param_keys"]))
            elif d["scope"] == "param":
                key = ("param", int(d["param_key"]))
            else:
                raise ValueError(f"{codec}: unknown state entry scope {d['scope']!r}")
            rows = d[field]
            if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[1] != self.width:
                raise ValueError(f"{codec}: state entry {key} holds {field} of the wrong shape")
            loaded[key] = (rows.to(self.dtype).clone(), int(d["updates"]), int(d["numel"]))
        self.entries = loaded


class RunningStateMixin:
    """``state_dict`` / ``load_state_dict`` for codecs that keep per-block running state in a
    :class:`BlockState` (``self._state``): plain lists of tensors, so the hook can checkpoint them.
    A state is refused if the settings that give it its shape or meaning differ (``_state_keys``)."""

    _state_field: str = ""
    _state_keys: tuple = ()

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "codec": self.config(), "entries": self._state.to_list(self._state_field)}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("format") != STATE_FORMAT:
            raise ValueError(f"{self.name}: unsupported state format {state_dict.get('format')!r} (expected {STATE_FORMAT})")
        saved = dict(state_dict["codec"])
        for key in self._state_keys:
            if saved.get(key) != self.config()[key]:
                raise ValueError(f"{self.name}: state saved with {key}={saved.get(key)!r}, this codec has {self.config()[key]!r}")
        self._state.from_list(state_dict["entries"], self._state_field, self.name)
