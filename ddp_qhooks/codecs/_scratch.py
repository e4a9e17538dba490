"""Scratch buffers of the codecs, one set per (device, thread), reused across calls: fresh
bucket-sized tensors cost page faults on every call, more than the arithmetic.  One set per thread
because the engine encodes one unit on the caller's thread while its completion thread decodes
another."""
from __future__ import annotations

import threading

import torch


class Scratch:
    """Named buffers of one (device, thread): ``get`` returns the first ``size`` values of a buffer
    at least that large, allocated once per name and dtype."""

    def __init__(self, device: torch.device):
        self.device = device
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, size: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._bufs.get((name, dtype))
        if buf is None or buf.numel() < size:
            buf = self._bufs[(name, dtype)] = torch.empty(size, dtype=dtype, device=self.device)
        return buf[:size]


class PerThreadScratch:
    """Mixin: a :class:`Scratch` per (device, thread), left out of pickles (rebuilt on use)."""

    def _scratch_for(self, device) -> Scratch:
        scratch = self.__dict__.setdefault("_scratch", {})
        key = (torch.device(device), threading.get_ident())
        s = scratch.get(key)
        if s is None:
            s = scratch[key] = Scratch(torch.device(device))
        return s

    def __getstate__(self):  # buffers are rebuilt on use; keep pickles small
        return {k: v for k, v in self.__dict__.items() if k != "_scratch"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._scratch = {}
