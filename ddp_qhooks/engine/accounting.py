"""Traffic, quality and timing figures of a state: ``stats()`` and ``timeline()``."""
from __future__ import annotations

import time

from ..exchange import collectives


TOTALS = ("payload_bytes", "wire_bytes_sent", "fp32_bytes", "hook_calls", "nonfinite_steps", "uncompressed_steps",
          "compressed_warmup_steps")


class Accounting:
    """Mixin of :class:`~ddp_qhooks.QuantizedHookState`: counters and their report."""

    def _reset_stats(self) -> None:
        self._totals = dict.fromkeys(TOTALS, 0)
        self._last = {"nmse": float("nan"), "payload_bytes": 0, "buckets": 0, "modes": {}, "timeline": []}
        # seconds, not checkpointed: inside hook calls (the autograd thread waits) and on the
        # completion thread (decoding, later phases)
        self._timing = {"hook_seconds": 0.0, "callback_seconds": 0.0}
        self._new_step()

    def _new_step(self) -> None:
        self._step_err = self._step_inp = 0.0
        self._step_payload = self._step_buckets = 0
        self._step_modes = {}
        self._step_events = {}
        self._step_bad = None      # 0-dim bool tensor on the device: some input of the step was not finite
        self._calls = self._done = 0
        self._last_seen = False
        self._staged = []
        self._staged_server = []
        self._step_chunks = 0
        self._uncompressed_in_step = False
        self._warmup_in_step = False

    def stats(self) -> dict:
        """Cumulative traffic and quality figures of this rank.

        Keys: ``steps`` (synchronised iterations), ``payload_bytes`` (bytes of this rank's
        payloads; two-phase: its W shard payloads), ``wire_bytes_sent`` (bytes this rank sends at
        this world size: all-gather (W-1) x payload, two-phase (W-1) x (shard payload + re-encoded
        mean payload)), ``fp32_bytes`` (4 bytes per gradient value: what an fp32 payload
        would have been), ``compression_ratio`` (fp32_bytes / payload_bytes), ``nmse`` (last step:
        sum of squared quantization errors / sum of squared inputs, over all buckets; NaN with
        ``measure_error=False`` and in a compressed warm-up step), ``fp32_allreduce_wire_bytes`` (what a ring fp32 allreduce sends
        per rank: 2(W-1)/W x 4 bytes per value), ``exchange`` (as configured),
        ``exchange_last_step`` (buckets per exchange used, e.g. ``{"alltoall": 3, "allgather": 1}``),
        ``exchange_reason`` (why, per exchange used), ``chunks_last_step`` (pipelined chunks in the
        last step, see ``chunk_size``), ``payload_bytes_last_step`` and ``buckets_last_step`` (the
        last step's payload bytes and buckets), ``hook_calls`` (buckets exchanged so far),
        ``nonfinite_steps`` (steps with a non-finite input on some rank: NaN everywhere, residuals
        kept), ``uncompressed_steps`` (steps exchanged in full precision, an all-reduce of fp32,
        because an attached ``ddp_qhooks.optim.OneBitAdam`` was in an uncompressed warm-up or refreshing
        its variance; their bytes are in ``wire_bytes_sent`` as a ring all-reduce sends them),
        ``compressed_warmup_steps`` (steps of such an optimizer's warm-up exchanged through its
        ``warmup_codec``, without error feedback),
        ``world_size``, ``codec`` and ``bits`` (the configuration).  Time (seconds,
        since the state was built, not checkpointed): ``hook_seconds`` spent inside hook calls
        (adding residuals, encoding, launching: the autograd thread waits for it) and
        ``callback_seconds`` on the completion thread (decoding, later phases: overlapping later
        buckets); the last step's per-bucket timeline is :meth:`timeline`.
        """
        t = self._totals
        w = self._world_size()
        return {
            "steps": self.step,
            "payload_bytes": t["payload_bytes"],
            "wire_bytes_sent": t["wire_bytes_sent"],
            "fp32_bytes": t["fp32_bytes"],
            "compression_ratio": t["fp32_bytes"] / t["payload_bytes"] if t["payload_bytes"] else 0.0,
            "nmse": self._last["nmse"],
            "fp32_allreduce_wire_bytes": int(t["fp32_bytes"] * 2 * (w - 1) / w) if w else 0,
            "payload_bytes_last_step": self._last["payload_bytes"],
            "buckets_last_step": self._last["buckets"],
            "chunks_last_step": self._last.get("chunks", 0),
            "exchange": self.exchange,
            "exchange_last_step": dict(self._last["modes"]),
            "exchange_reason": "; ".join(sorted({f"{p.mode}: {p.reason}" for p in self._plans.values()})),
            "hook_calls": t["hook_calls"],
            "nonfinite_steps": t["nonfinite_steps"],
            "uncompressed_steps": t["uncompressed_steps"],
            "compressed_warmup_steps": t["compressed_warmup_steps"],
            "world_size": w,
            "codec": self.codec.name,
            "bits": self.codec.bits,
            "hook_seconds": self._timing["hook_seconds"],
            "callback_seconds": self._timing["callback_seconds"],
        }

    def timeline(self) -> list:
        """Per-bucket timings of the last completed step, in bucket order: dicts with ``bucket``,
        ``numel``, ``mode``, ``chunks`` and the seconds since the step's first hook call at which
        the hook was entered (``enter``), returned its future (``launched``: every chunk encoded
        and its first collective issued), the first collective completed (``received``) and the
        bucket's mean was ready (``done``); ``callback_s``: time spent on the completion thread for
        it.  Encoding of bucket k+1 overlaps the collectives of bucket k when its
        ``[enter, launched]`` falls inside k's ``[launched, received]``."""
        return [dict(e) for e in self._last["timeline"]]

    def _world_size(self) -> int:
        import torch.distributed as dist
        return collectives.world_size(self.process_group) if dist.is_initialized() else 0

    # -- recording (under self._lock) -----------------------------------------------------------
    def _count(self, plan, is_last: bool) -> None:
        with self._lock:
            self._totals["hook_calls"] += 1
            self._totals["payload_bytes"] += plan.payload_bytes
            self._totals["wire_bytes_sent"] += plan.sent_bytes
            self._totals["fp32_bytes"] += 4 * plan.fp32_values
            self._step_payload += plan.payload_bytes
            self._step_buckets += 1
            self._step_modes[plan.mode] = self._step_modes.get(plan.mode, 0) + 1
            self._step_chunks += len(plan.bounds)
            self._calls += 1
            self._last_seen = self._last_seen or is_last

    def _event(self, index: int, name: str, when: float | None = None) -> None:
        with self._lock:
            self._step_events.setdefault(index, {}).setdefault(name, time.perf_counter() if when is None else when)

    def _callback_time(self, index: int, seconds: float) -> None:
        with self._lock:
            self._timing["callback_seconds"] += seconds
            ev = self._step_events.setdefault(index, {})
            ev["callback_s"] = ev.get("callback_s", 0.0) + seconds

    def _close_step_record(self) -> None:
        nmse = float("nan")
        if self.measure_error and self._step_bad_host is False and not self._warmup_in_step:
            nmse = self._step_err / self._step_inp if self._step_inp > 0 else (0.0 if self._step_err == 0 else float("inf"))
        self._last = {"nmse": nmse, "payload_bytes": self._step_payload, "buckets": self._step_buckets,
                      "modes": dict(self._step_modes), "timeline": _timeline(self._step_events),
                      "chunks": self._step_chunks}


def _timeline(events: dict) -> list:
    if not events:
        return []
    origin = min(e.get("enter", float("inf")) for e in events.values())
    rows = []
    for index in sorted(events):
        e = events[index]
        row = {"bucket": index, "numel": e.get("numel"), "mode": e.get("mode"), "chunks": e.get("chunks"),
               "callback_s": e.get("callback_s", 0.0)}
        for k in ("enter", "launched", "received", "done"):
            row[k] = e[k] - origin if k in e else None
        rows.append(row)
    return rows
