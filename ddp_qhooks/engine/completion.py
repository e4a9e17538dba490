"""The engine's completion thread: resumes launched exchanges, in launch order.

A strategy's ``run`` generator yields each collective it launched; this thread waits for it
(``work.wait()``, the GIL released) and resumes the generator, which decodes and may launch the
next phase.  Launch order is the order of submission, the same on every rank, so second and third
phases are issued in the same order everywhere without any locking.

Why a thread of our own rather than ``Future.then``: a Python callback handed to a backend future
runs on, and is later released by, a C++ backend thread.  When the training script ends while such
a thread still holds a Python object, the thread needs the GIL during interpreter finalization and
the process aborts ("terminate called without an active exception").  No Python object is ever
handed to a backend thread here; this thread is a ``ThreadPoolExecutor`` worker, which Python
joins before it finalizes.

On CUDA the thread runs under a stream of its own: ``work.wait()`` then only orders that stream
after the collective (no host wait), decoding overlaps the backward pass on the compute stream,
and the result future records the stream so DDP's wait orders the compute stream after it.
Encoders run on the caller's thread and decoders on this one, so per-thread scratch buffers are
never shared between the two streams.
"""
from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch

_log = logging.getLogger("ddp_qhooks")


def _deliver(done, result, exc, busy: float) -> None:
    """``done`` completes the caller's future; should it fail anyway, say so rather than let the
    executor keep the exception where nobody looks."""
    try:
        done(result, exc, busy)
    except BaseException:  # noqa: BLE001
        _log.exception("ddp_qhooks: completing an exchange failed")


class Completion:
    def __init__(self) -> None:
        self._executor = None
        self._streams: dict = {}

    def follow(self, gen, work, done, device) -> None:
        """Wait for ``work`` then resume ``gen``, until it returns; then ``done(result, exc, busy)``,
        ``busy`` being the seconds spent resuming it (decoding, later phases), waits excluded."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ddp_qhooks")
        self._executor.submit(self._advance, gen, work, done, device, 0.0)

    def stream_context(self, device):
        """The context to run continuations (and complete result futures) in."""
        if device.type != "cuda":
            return contextlib.nullcontext()
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return torch.cuda.stream(stream)

    def _advance(self, gen, work, done, device, busy: float) -> None:
        with self.stream_context(device):
            try:
                work.wait()
                t0 = time.perf_counter()
                try:
                    nxt = gen.send(None)
                finally:
                    busy += time.perf_counter() - t0
            except StopIteration as stop:
                _deliver(done, stop.value, None, busy)
                return
            except BaseException as exc:  # noqa: BLE001 - delivered to the result future, never lost
                _deliver(done, None, exc, busy)
                return
        self._executor.submit(self._advance, gen, nxt, done, device, busy)

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
