"""The state :func:`~ddp_qhooks.fsdp.register` returns: configuration, residual store, per-step
bookkeeping (commit at the end of each backward) and ``stats()``."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ...codecs import Layout, make_codec
from ...codecs.wire import fingerprint
from ...engine.chunks import DEFAULT_CHUNK_SIZE, check_chunk_size
from .checkpoint import Checkpointing
from .residuals import CodedResiduals, DenseResiduals, residual_kind

STATE_OPTIONS = ("seed", "measure_error", "residual_block_size", "stage_residuals", "chunk_size")


class FSDPQuantState(Checkpointing):
    """What :func:`register` returns: configuration, residuals, counters of every quantized
    reduce-scatter of one model.  ``state_dict()`` holds only tensors and plain values."""

    def __init__(self, codec: str = "stochastic", bits: int = 8, error_feedback: bool = True, residual_dtype=None,
                 seed: int = 0, measure_error: bool = True, residual_block_size: int = 256,
                 stage_residuals: bool = True, chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE, **codec_options):
        self.codec = make_codec(codec, bits, **codec_options)
        if not isinstance(error_feedback, bool):
            raise ValueError(f"error_feedback must be True or False, got {error_feedback!r}")
        if getattr(self.codec, "error_feedback_diverges", False) and error_feedback:
            raise ValueError(f"codec {codec!r} with {self.codec.config()} is unbiased but its error can exceed the "
                             "value itself, so error-feedback residuals grow without bound; use error_feedback=False")
        if getattr(self.codec, "needs_error_feedback", False) and not error_feedback:
            raise ValueError(f"codec {codec!r} clips values to its range and relies on error feedback; use "
                             "error_feedback=True")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if isinstance(residual_block_size, bool) or not isinstance(residual_block_size, int) or residual_block_size < 1:
            raise ValueError(f"residual_block_size must be a positive integer, got {residual_block_size!r}")
        self.residual_kind, dtype, rbits = residual_kind(residual_dtype)
        if residual_dtype is not None and not error_feedback:
            raise ValueError("residual_dtype only applies with error_feedback=True")
        self.residual_block_size = residual_block_size
        if not isinstance(stage_residuals, bool):
            raise ValueError(f"stage_residuals must be True or False, got {stage_residuals!r}")
        self.stage_residuals = stage_residuals
        self.chunk_size = check_chunk_size(chunk_size)
        self.store = (DenseResiduals(dtype, not stage_residuals) if rbits is None
                      else CodedResiduals(rbits, residual_block_size, not stage_residuals))
        self.error_feedback, self.seed, self.measure_error = error_feedback, seed, measure_error
        self._print = fingerprint(self.codec.config())
        self.comms: list = []  # QuantizedReduceScatter of every FSDP module
        self.pipelined_all_gathers = 0  # FSDP modules whose parameter all-gather is pipelined (chunk_size)
        self.process_group = None
        self.step = 0
        self._module_fallback: set = set()
        self._names: Dict[int, str] = {}           # parameter key -> fully qualified name
        self._key_by_param: Dict[int, int] = {}    # id(sharded parameter) -> key
        self._geometry: Dict[int, tuple] = {}      # key -> (numel, padded sharded numel, W)
        self._fsdp_bytes = {"sharded_param_bytes": 0, "sharded_grad_bytes": 0}
        self._scratch_buf: Optional[torch.Tensor] = None
        self._wire: Optional[tuple] = None
        self._totals = {"payload_bytes": 0, "wire_bytes_sent": 0, "fp32_reduce_scatter_wire_bytes": 0,
                        "fsdp_reduce_scatter_wire_bytes": 0, "calls": 0, "nonfinite_steps": 0}
        self._seconds = 0.0
        self._last = {"nmse": float("nan"), "calls": 0, "payload_bytes": 0}
        self._new_step()

    # -- identities ------------------------------------------------------------------------------
    def _key_of_fsdp_param(self, fp) -> Optional[int]:
        return self._key_by_param.get(id(fp.sharded_param))

    def _bind(self, model: torch.nn.Module) -> None:
        named = list(model.named_parameters())
        self._key_by_param = {id(p): i for i, (_, p) in enumerate(named)}
        self._names = {i: n for i, (n, _) in enumerate(named)}

    def _padding_ranges(self, keys, layout: Layout, w: int) -> list:
        """(start, end) in the W x S input of the values past each parameter's true size."""
        S, out = layout.numel, []
        for k, off, P in zip(keys, layout.param_offsets(), layout.param_numels):
            n = self._geometry[k][0]
            for r in range(w):
                lo = max(n - r * P, 0)  # values of this row's chunk that are real
                if lo < P:
                    out.append((r * S + off + lo, r * S + off + P))
        return out

    def _wire_buffers(self, nbytes, device):
        """(send, receive) byte buffers shared by every module's calls (grown on demand)."""
        if self._wire is None or self._wire[0].numel() < nbytes or self._wire[0].device != device:
            self._wire = (torch.empty(nbytes, dtype=torch.uint8, device=device),
                          torch.empty(nbytes, dtype=torch.uint8, device=device))
        return self._wire[0][:nbytes], self._wire[1][:nbytes]

    def _scratch(self, numel, device):
        if self._scratch_buf is None or self._scratch_buf.numel() < numel or self._scratch_buf.device != device:
            self._scratch_buf = torch.empty(numel, dtype=torch.float32, device=device)
        return self._scratch_buf[:numel]

    # -- steps -----------------------------------------------------------------------------------
    def _new_step(self) -> None:
        self._staged: list = []
        self._bads: list = []
        self._err = self._inp = 0.0
        self._calls = 0
        self._payload = 0
        self._queued = False

    def _record(self, comm, sig, bad, plan, w, S, elem, err_sq, inp_sq, seconds) -> None:
        t = self._totals
        t["calls"] += 1
        t["payload_bytes"] += w * plan.slot
        t["wire_bytes_sent"] += (w - 1) * plan.slot
        t["fp32_reduce_scatter_wire_bytes"] += 4 * (w - 1) * S
        t["fsdp_reduce_scatter_wire_bytes"] += elem * (w - 1) * S
        self._seconds += seconds
        self._calls += 1
        self._payload += w * plan.slot
        self._err += err_sq
        self._inp += inp_sq
        self._bads.append(bad)
        if self.error_feedback:
            self._staged.append(sig)
        if not self._queued:
            try:
                torch.autograd.Variable._execution_engine.queue_callback(self._end_step)
                self._queued = True
            except RuntimeError:  # not inside a backward pass: this call is a step of its own
                self._end_step()

    def _end_step(self) -> None:
        """End of a backward pass: commit the staged residuals if every input was finite."""
        bad = bool(torch.stack(self._bads).any()) if self._bads else False
        if bad:
            self._totals["nonfinite_steps"] += 1
        elif self._staged:
            self.store.commit(self._staged)
        nmse = float("nan")
        if self.measure_error and not bad and self._inp > 0:
            nmse = self._err / self._inp
        elif self.measure_error and not bad and self._calls:
            nmse = 0.0 if self._err == 0 else float("inf")
        self._last = {"nmse": nmse, "calls": self._calls, "payload_bytes": self._payload}
        self.step += 1
        self._new_step()

    # -- reports ---------------------------------------------------------------------------------
    def residual_nbytes(self) -> dict:
        """Bytes of error-feedback memory on this rank: ``live`` residuals, ``staging`` (the next
        residuals until the step is committed), ``total``."""
        live, staged = self.store.nbytes() if self.error_feedback else (0, 0)
        return {"live": live, "staging": staged, "total": live + staged}

    def stats(self) -> dict:
        """Counters of this rank.  ``payload_bytes``: its W payloads per call, summed;
        ``wire_bytes_sent``: the (W-1) payloads it sends; ``fp32_reduce_scatter_wire_bytes``: what
        a fp32 reduce-scatter sends per rank ((W-1) x S x 4), ``fsdp_reduce_scatter_wire_bytes``
        the same in FSDP's reduce dtype; ``nmse``: last step's sum of squared quantization errors
        / sum of squared inputs; ``residual_bytes`` / ``residual_staging_bytes`` (see
        :meth:`residual_nbytes`) next to FSDP's own ``sharded_param_bytes`` / ``sharded_grad_bytes``
        of this rank; ``pipelined_all_gathers``: FSDP modules whose parameter all-gather is cut into
        pieces in flight (``chunk_size``, Gloo)."""
        t = self._totals
        res = self.residual_nbytes()
        return {
            "steps": self.step,
            "calls": t["calls"],
            "modules": len(self.comms),
            "pipelined_all_gathers": self.pipelined_all_gathers,
            "payload_bytes": t["payload_bytes"],
            "wire_bytes_sent": t["wire_bytes_sent"],
            "fp32_reduce_scatter_wire_bytes": t["fp32_reduce_scatter_wire_bytes"],
            "fsdp_reduce_scatter_wire_bytes": t["fsdp_reduce_scatter_wire_bytes"],
            "compression_ratio": (t["fp32_reduce_scatter_wire_bytes"] / t["wire_bytes_sent"]
                                  if t["wire_bytes_sent"] else 0.0),
            "nmse": self._last["nmse"],
            "calls_last_step": self._last["calls"],
            "payload_bytes_last_step": self._last["payload_bytes"],
            "nonfinite_steps": t["nonfinite_steps"],
            "residual_dtype": self.residual_kind,
            "residual_bytes": res["live"],
            "residual_staging_bytes": res["staging"],
            **self._fsdp_bytes,
            "module_level_residuals": sorted(self._module_fallback),
            "codec": self.codec.name,
            "bits": self.codec.bits,
            "seconds": self._seconds,
        }

