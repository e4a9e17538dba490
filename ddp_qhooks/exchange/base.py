"""The interface every exchange strategy implements, and what the strategies share.

A strategy moves one *piece* of gradient (a DDP bucket, a chunk of one, a LocalSGD fragment)
between the ranks: it encodes the piece, launches collectives and decodes the mean.  ``run`` is a
generator: it encodes and launches the first collective when first advanced (on the caller's
thread, so encoding overlaps the backward pass), then yields each launched ``Work``; the engine
resumes it on its completion thread once that Work is done.  Its return value is a
:class:`PieceResult`.  Strategies never wait themselves and never read device values on the host
(header checks on the first uses aside).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generator, Optional

import torch

from ..codecs import Layout
from ..codecs.base import EncodeInfo, error_stats
from ..codecs.wire import FLAG_NONFINITE, HEADER_BYTES, WIRE_VERSION, fingerprint, header_bytes, parse_header, \
    payload_nbytes
from . import collectives

__all__ = ["Piece", "PieceResult", "Strategy", "piece_layouts", "nonfinite_flag", "check_headers", "body_of",
           "write_header", "set_flag", "HEADER_BYTES", "payload_nbytes"]


@dataclass
class Piece:
    """One piece to exchange.  ``x`` is the input (float32, residual already added), ``out`` where
    the mean goes, ``err`` where the encoder writes the next residual (or None), ``server`` /
    ``server_err`` the live and staged server residual over the piece (two-phase, or None)."""

    layout: Layout
    x: torch.Tensor
    out: torch.Tensor
    err: Optional[torch.Tensor]
    key: int
    validate: bool
    server: Optional[torch.Tensor] = None
    server_err: Optional[torch.Tensor] = None
    hold_unused: bool = False
    stats: bool = True      # compute the encoders' error statistics (measure_error)


@dataclass
class PieceResult:
    """``info``: the worker encode's statistics; ``bad``: a 0-dim bool tensor on the piece's device,
    true where any rank's input was not finite (``out`` is then NaN everywhere)."""

    info: Optional[EncodeInfo]
    bad: torch.Tensor


class Strategy:
    """Base class: one strategy per exchange; see the module docstring for ``run``.

    ``prepare(layout, device)`` allocates a piece layout's buffers once (called on every rank in
    the same order, so it may create process groups); ``bytes(layout)`` gives (payload bytes,
    bytes sent by this rank, full-precision values this rank is responsible for)."""

    name = ""

    def __init__(self, codec, server_codec, group, world: int, rank: int):
        self.codec, self.server_codec = codec, server_codec
        self.group, self.world, self.rank = group, world, rank
        self._print = fingerprint(codec.config())
        self._server_print = fingerprint(server_codec.config())

    def prepare(self, layout: Layout, device):
        raise NotImplementedError

    def bytes(self, layout: Layout, buffers) -> tuple[int, int, int]:
        raise NotImplementedError

    def run(self, piece: Piece, buffers) -> Generator:
        raise NotImplementedError

    # -- shared pieces ------------------------------------------------------------------------
    def _payload(self, numel: int, body: int, device, codec=None) -> torch.Tensor:
        codec = codec or self.codec
        slot = torch.zeros(payload_nbytes(body), dtype=torch.uint8, device=device)
        write_header(slot, codec, self._print if codec is self.codec else self._server_print, numel)
        return slot

    def _encode(self, codec, x, slot: torch.Tensor, body: int, layout: Layout, key: int, err,
                stats: bool = True) -> EncodeInfo:
        with error_stats(stats):
            info = codec.encode(x, body_of(slot, body), layout, key, error_out=err)
        set_flag(slot, info.finite_flag)
        return info

    def _received(self, rows: torch.Tensor, numel, validate: bool, codec=None) -> torch.Tensor:
        """Checks the headers of received payloads (first uses only) and returns their non-finite flag."""
        if validate:
            codec = codec or self.codec
            check_headers(rows, codec, self._print if codec is self.codec else self._server_print, numel)
        return nonfinite_flag(rows)


def body_of(slot: torch.Tensor, body: int) -> torch.Tensor:
    return slot[HEADER_BYTES:HEADER_BYTES + body]


def write_header(slot: torch.Tensor, codec, config_print: int, numel: int) -> None:
    slot[:HEADER_BYTES] = header_bytes(codec.codec_id, codec.bits, config_print, numel).to(slot.device)


def set_flag(slot: torch.Tensor, finite) -> None:
    """Header flag byte from ``finite``: a bool, or a 0-dim bool tensor (set on the device, unread)."""
    if isinstance(finite, torch.Tensor):
        torch.mul(finite.logical_not(), FLAG_NONFINITE, out=slot[3])
    else:
        slot[3] = 0 if finite else FLAG_NONFINITE


def nonfinite_flag(rows: torch.Tensor) -> torch.Tensor:
    """0-dim bool: any row's header carries the non-finite flag (stays on the device)."""
    return rows[:, 3].bitwise_and(FLAG_NONFINITE).ne(0).any()


def check_headers(rows: torch.Tensor, codec, config_print: int, numel) -> None:
    expected = {"version": WIRE_VERSION, "codec_id": codec.codec_id, "bits": codec.bits, "fingerprint": config_print}
    if numel is not None:
        expected["numel"] = numel
    for r, raw in enumerate(rows[:, :HEADER_BYTES].cpu()):
        got = parse_header(bytes(raw.tolist()))
        bad = [f"{k}={got[k]} (expected {v})" for k, v in expected.items() if got[k] != v]
        if bad:
            raise collectives.ConfigMismatchError(f"ddp_qhooks: payload from rank {r} does not match this rank's "
                                                  f"configuration: {', '.join(bad)}")


def piece_layouts(layout: Layout, bounds) -> list:
    """The Layout of each ``(start, end)`` range of a flat layout: the pieces of its parameters that
    fall into it (so a block never straddles two parameters, nor two ranges)."""
    out = []
    offsets = layout.param_offsets()
    for start, end in bounds:
        numels, keys = [], []
        for off, n, k in zip(offsets, layout.param_numels, layout.param_keys):
            lo, hi = max(off, start), min(off + n, end)
            if hi > lo:
                numels.append(hi - lo)
                keys.append(k)
        out.append(Layout(numels, keys) if numels else Layout([0], [0]))
    return out
