"""FSDP2 (``torch.distributed.fsdp.fully_shard``): a quantized reduce-scatter with per-parameter
error feedback.

Usage, after ``fully_shard`` (collective: call it on every rank)::

    state = ddp_qhooks.fsdp.register(model, codec="stochastic", bits=4)

On every FSDP module of ``model`` that owns parameters (nested ones included) this installs a
:class:`QuantizedReduceScatter` with ``FSDPModule.set_custom_reduce_scatter``.  FSDP hands it the
flat padded gradient of the module, ``W x S`` values where row ``r`` is the concatenation of the
``r``-th dim-0 chunk of every parameter (padded to a multiple of ``W`` rows), and an ``S``-value
output.  Per call each rank

1. adds its residual (error feedback) to the ``W x S`` input,
2. encodes the ``W`` rows, each a payload with the wire header (``codecs/wire.py``); a rank whose
   input is not finite flags all ``W`` payloads, so every rank sees it,
3. exchanges them with ONE ``all_to_all_single`` of equal slots,
4. decodes and sums the ``W`` payloads of its own shard into ``output_tensor`` and applies ``op``
   (``AVG``: / W, as Gloo's and NCCL's reduce-scatter do; ``SUM``; ``PREMUL_SUM(f)``: x f, which
   FSDP uses for ``set_gradient_divide_factor``; the pre/post divide factors FSDP applies around
   the call for fp16 reductions and ``set_force_sum_reduction_for_comms`` stay FSDP's),
5. stages its new residual ``input + residual - decode(own payloads)``; the residuals of one
   backward pass are committed together at its end (an autograd final callback), only if no
   rank's input was non-finite in any module of that pass (the optimizer / GradScaler then sees
   NaN in every rank's shard and the residuals stay as they were).  ``stage_residuals=False``
   commits per module instead (no staging buffer: half the residual memory).

Residuals are kept per parameter (by fully qualified name in ``state_dict``), as the flat padded
unsharded local gradient of that parameter: ``4 x numel`` bytes per parameter on every rank (the
full model's size, W times FSDP's own sharded gradient), which is why ``residual_dtype`` offers a
compressed residual (``"bf16"`` / ``"fp16"``: 2 bytes per value, ``"int8"`` ... ``"int2"``:
blockwise min-max codes, ``residual_block_size`` values per block with 8 bytes of range each).
"""
from __future__ import annotations

import re
import time
import warnings
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ..codecs import Layout, make_codec
from ..codecs._random import splitmix64
from ..codecs.base import all_finite
from ..codecs.wire import FLAG_NONFINITE, HEADER_BYTES, fingerprint, payload_nbytes
from ..error_feedback import ResidualMemory
from ..exchange import check_agreement, collectives
from ..exchange.base import body_of, check_headers, nonfinite_flag, set_flag, write_header

__all__ = ["register", "FSDPQuantState", "QuantizedReduceScatter", "STATE_FORMAT", "node_mesh",
           "register_between_nodes"]

STATE_FORMAT = 1
VALIDATE_USES = 2        # headers are checked on the host during a plan's first uses only
_ROW_STRIDE = 1 << 16    # virtual residual key of (parameter k, row r): k * _ROW_STRIDE + r
_MODULE_KEY_BASE = 1 << 30  # fallback keys (one flat residual per FSDP module), see _layout_of
STATE_OPTIONS = ("seed", "measure_error", "residual_block_size", "stage_residuals")

try:  # torch >= 2.6
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
except ImportError:  # pragma: no cover - too old a torch: register() says so
    FSDPModule = None

    class ReduceScatter:  # type: ignore[no-redef]
        pass


# ================================================================================================
# residual stores: dense (fp32 / bf16 / fp16, the engine's ResidualMemory) or coded (intN blocks)
# ================================================================================================

def _residual_kind(residual_dtype):
    """(name, dtype or None, bits or None) for the ``residual_dtype`` option."""
    if residual_dtype is None:
        return "fp32", torch.float32, None
    dense = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if isinstance(residual_dtype, torch.dtype):
        for name, dt in dense.items():
            if dt == residual_dtype:
                return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name), dt, None
    if isinstance(residual_dtype, str):
        if residual_dtype in dense:
            dt = dense[residual_dtype]
            return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dt], dt, None
        m = re.fullmatch(r"int([2-8])", residual_dtype)
        if m:
            return residual_dtype, None, int(m.group(1))
    raise ValueError(f"residual_dtype must be None / 'fp32', 'bf16', 'fp16' or 'int8' ... 'int2' (blockwise codes), "
                     f"got {residual_dtype!r}")


class _DenseResiduals:
    """fp32 (the encoder writes the next residual straight into the staging buffer) or bf16/fp16
    (written to an fp32 scratch, then rounded into staging)."""

    def __init__(self, dtype, immediate: bool = False):
        self.dtype, self.immediate = dtype, immediate
        self.memory = ResidualMemory()
        self._scratch: Optional[torch.Tensor] = None

    def add_to(self, x, sig, numels):
        mem = self.memory
        # ResidualMemory assumes a superseded bucket never returns (DDP rebuilds once); here the
        # set of parameters of a module's input changes whenever one is unused in a step, and an
        # older signature may come back: its buffer is stale once any of its parameters moved
        if sig in mem._buffers and any(mem._where.get(k, (sig,))[0] != sig for k in sig):
            old = mem._buffers.pop(sig)
            mem._staging.pop(sig, None)
            for k in sig:  # the parameters still living here move to the loaded-residual pool
                if k in mem._where and mem._where[k][0] == sig:
                    _, off, n = mem._where.pop(k)
                    mem._pending[k] = old[off:off + n].clone()
        x.add_(mem.bucket_residual(sig, numels, x.device, self.dtype))

    def err_buffer(self, sig, numel, device):
        if self.dtype == torch.float32 and not self.immediate:
            return self.memory.staging(sig)
        if self._scratch is None or self._scratch.numel() < numel or self._scratch.device != device:
            self._scratch = torch.empty(numel, dtype=torch.float32, device=device)
        return self._scratch[:numel]

    def stage(self, sig, err, bad):
        if self.immediate:  # this module's residual now, unless some rank's input was not finite
            res = self.memory._buffers[sig]
            res.copy_(torch.where(bad, res.float() if res.dtype != torch.float32 else res, err, out=err))
            return
        st = self.memory.staging(sig)
        if st.data_ptr() != err.data_ptr():
            st.copy_(err)

    def commit(self, sigs):
        self.memory.commit(sigs)

    def residuals(self):
        return {k: v.float() for k, v in self.memory.residuals().items()}

    def load(self, residuals):
        self.memory.load(residuals)

    def nbytes(self):
        live = sum(b.numel() * b.element_size() for b in self.memory._buffers.values())
        staged = sum(b.numel() * b.element_size() for b in self.memory._staging.values())
        return live, staged


class _CodedResiduals:
    """Residuals held as blockwise min-max codes (the ``uniform`` codec, round to nearest, blocks
    never straddle two parameter rows).  What the rounding of the residual loses is lost."""

    def __init__(self, bits: int, block_size: int, immediate: bool = False):
        self.immediate = immediate
        self.codec = make_codec("uniform", bits, block_size=block_size)
        self._bodies: Dict[tuple, torch.Tensor] = {}
        self._staging: Dict[tuple, torch.Tensor] = {}
        self._layouts: Dict[tuple, Layout] = {}
        self._where: Dict[int, tuple] = {}       # virtual key -> signature holding it
        self._pending: Dict[int, torch.Tensor] = {}
        self._scratch: Optional[torch.Tensor] = None

    def _fp32(self, numel, device):
        if self._scratch is None or self._scratch.numel() < numel or self._scratch.device != device:
            self._scratch = torch.empty(numel, dtype=torch.float32, device=device)
        return self._scratch[:numel]

    def _decoded(self, sig) -> torch.Tensor:
        layout = self._layouts[sig]
        out = torch.empty(layout.numel, dtype=torch.float32, device=self._bodies[sig].device)
        return self.codec.decode([self._bodies[sig]], layout, out)

    def _build(self, sig, numels, device):
        layout = Layout(numels, [k // _ROW_STRIDE if k < _MODULE_KEY_BASE else k for k in sig])
        buf = torch.zeros(layout.numel, dtype=torch.float32, device=device)
        decoded_old: Dict[tuple, torch.Tensor] = {}
        off = 0
        for key, n in zip(sig, numels):
            src = None
            if key in self._where:
                old = self._where[key]
                if old not in decoded_old:
                    decoded_old[old] = self._decoded(old)
                o = 0
                for k2, n2 in zip(old, self._layouts[old].param_numels):
                    if k2 == key:
                        src = decoded_old[old][o:o + n2]
                        break
                    o += n2
            elif key in self._pending:
                src = self._pending.pop(key)
            if src is not None:
                if src.numel() != n:
                    raise RuntimeError(f"error feedback: residual {key} has {src.numel()} elements, expected {n}")
                buf[off:off + n].copy_(src.reshape(-1))
            self._where[key] = sig
            off += n
        for old in decoded_old:
            if not any(s == old for s in self._where.values()):
                for d in (self._bodies, self._staging, self._layouts):
                    d.pop(old, None)
        body = torch.zeros(self.codec.body_nbytes(layout), dtype=torch.uint8, device=device)
        self.codec.encode(buf, body, layout)
        self._bodies[sig], self._layouts[sig] = body, layout

    def add_to(self, x, sig, numels):
        if sig in self._bodies and any(self._where.get(k, sig) != sig for k in sig):
            dec, o = self._decoded(sig), 0  # stale: see _DenseResiduals.add_to
            for k, n in zip(sig, self._layouts[sig].param_numels):
                if self._where.get(k) == sig:
                    del self._where[k]
                    self._pending[k] = dec[o:o + n].clone()
                o += n
            for d in (self._bodies, self._staging, self._layouts):
                d.pop(sig, None)
        if sig not in self._bodies:
            self._build(sig, numels, x.device)
        tmp = self._fp32(x.numel(), x.device)
        x.add_(self.codec.decode([self._bodies[sig]], self._layouts[sig], tmp))

    def err_buffer(self, sig, numel, device):
        return self._fp32(numel, device)

    def stage(self, sig, err, bad):
        if self.immediate:
            if not bool(bad):  # one host read per module in this mode
                self.codec.encode(err, self._bodies[sig], self._layouts[sig])
            return
        st = self._staging.get(sig)
        if st is None:
            st = self._staging[sig] = torch.empty_like(self._bodies[sig])
        self.codec.encode(err, st, self._layouts[sig])

    def commit(self, sigs):
        for sig in sigs:
            if sig in self._bodies and sig in self._staging:
                self._bodies[sig], self._staging[sig] = self._staging[sig], self._bodies[sig]

    def residuals(self):
        out = {k: v for k, v in self._pending.items()}
        for sig in self._bodies:
            dec, o = self._decoded(sig), 0
            for k, n in zip(sig, self._layouts[sig].param_numels):
                out[k] = dec[o:o + n]
                o += n
        return out

    def load(self, residuals):
        for d in (self._bodies, self._staging, self._layouts, self._where):
            d.clear()
        self._pending = {int(k): v.detach().reshape(-1).float().clone() for k, v in residuals.items()}

    def nbytes(self):
        return sum(b.numel() for b in self._bodies.values()), sum(b.numel() for b in self._staging.values())


# ================================================================================================
# the custom reduce-scatter
# ================================================================================================

class _Plan:
    """Sizes and headers of one (world size, input layout), built once.  The send / receive
    buffers themselves are shared by all modules (:meth:`FSDPQuantState._wire_buffers`): a call
    completes before it returns, so only one module's payloads exist at a time."""

    def __init__(self, codec, config_print, layout: Layout, w: int, device):
        self.layout = layout                    # one row (= one destination shard)
        self.S = layout.numel
        self.body = codec.body_nbytes(layout)
        self.slot = payload_nbytes(self.body)
        self.headers = torch.zeros(w, HEADER_BYTES, dtype=torch.uint8, device=device)
        for r in range(w):
            write_header(self.headers[r], codec, config_print, self.S)
        self.uses = 0
        self.padding: list = []                 # (start, end) of padding values in the W x S input


class QuantizedReduceScatter(ReduceScatter):
    """FSDP's ``ReduceScatter`` interface, quantized; one per FSDP module (see the module docstring)."""

    def __init__(self, state: "FSDPQuantState", index: int, module_fqn: str, param_group):
        self.state, self.index, self.module_fqn = state, index, module_fqn
        self.param_group = param_group
        self._participants = None
        self._plans: Dict[tuple, _Plan] = {}
        if param_group is not None:
            self._wrap_post_backward(param_group)

    # FSDP leaves out the parameters without a gradient in this backward (frozen, unused): record
    # which ones it reduces, with the same test as FSDPParamGroup.post_backward, just before it runs
    def _wrap_post_backward(self, pg) -> None:
        original = pg.post_backward
        comm = self

        def post_backward(*args, **kwargs):
            try:
                unused_too = bool(getattr(pg, "reduce_scatter_unused_params", False))
                comm._participants = [
                    fp for fp in pg.fsdp_params if hasattr(fp, "_unsharded_param") and (
                        getattr(fp, "unsharded_accumulated_grad", None) is not None
                        or fp.unsharded_param.grad is not None
                        or (unused_too and fp.unsharded_param.requires_grad))]
            except Exception:  # torch internals changed: fall back to the module-level residual
                comm._participants = None
            return original(*args, **kwargs)

        pg.post_backward = post_backward

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def _layout_of(self, S: int, w: int) -> tuple:
        """(row layout keyed by parameter, residual signature, residual numels, per-param keys)."""
        participants, self._participants = self._participants, None
        st = self.state
        candidates = []
        if participants is not None:
            candidates.append(participants)
        if self.param_group is not None:
            candidates.append([fp for fp in self.param_group.fsdp_params if fp.sharded_param.requires_grad])
        for fps in candidates:
            keys = [st._key_of_fsdp_param(fp) for fp in fps]
            sizes = [fp.padded_sharded_param_size.numel() for fp in fps]
            if fps and sum(sizes) == S and None not in keys:
                sig = tuple(k * _ROW_STRIDE + r for r in range(w) for k in keys)
                return Layout(sizes, keys), sig, sizes * w, keys
        # unknown mapping: one residual for the whole module input
        key = _MODULE_KEY_BASE + self.index
        st._module_fallback.add(self.module_fqn)
        return Layout([S], [key]), (key,), [w * S], []

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        st = self.state
        t0 = time.perf_counter()
        w, me = group.size(), group.rank()
        S = output_tensor.numel()
        if input_tensor.numel() != w * S:
            raise RuntimeError(f"ddp_qhooks.fsdp: reduce-scatter input has {input_tensor.numel()} values, "
                               f"expected {w} x {S}")
        factor = _op_factor(op, w)
        layout, sig, numels, keys = self._layout_of(S, w)
        device = input_tensor.device
        plan = self._plans.get((w, layout))
        if plan is None:
            plan = self._plans[(w, layout)] = _Plan(st.codec, st._print, layout, w, device)
            plan.padding = st._padding_ranges(keys, layout, w) if keys else []
        x = input_tensor if input_tensor.dtype == torch.float32 else input_tensor.float()
        if st.error_feedback:
            st.store.add_to(x, sig, numels)
            err = st.store.err_buffer(sig, w * S, device)
        else:
            err = st._scratch(w * S, device) if st.measure_error else None
        # per-row layouts: the row layout is the same for every destination
        row_layout = layout if keys else Layout([S], layout.param_keys)
        base_key = splitmix64(st.seed, collectives.rank(group), st.step, self.index)
        err_sq = inp_sq = 0.0
        infos = []
        send, recv = st._wire_buffers(w * plan.slot, device)
        send.view(w, plan.slot)[:, :HEADER_BYTES].copy_(plan.headers)
        for r in range(w):
            slot = send[r * plan.slot:(r + 1) * plan.slot]
            info = st.codec.encode(x[r * S:(r + 1) * S], body_of(slot, plan.body), row_layout, splitmix64(base_key, r),
                                   None if err is None else err[r * S:(r + 1) * S])
            set_flag(slot, info.finite_flag)
            infos.append(info)
            if info.error_sq is not None:
                err_sq += info.error_sq
                inp_sq += info.input_sq
        # every destination learns that this rank's input was not finite (on the device, unread)
        finite = all_finite(infos)
        if isinstance(finite, torch.Tensor):
            send.view(w, plan.slot)[:, 3].bitwise_or_(finite.logical_not().to(torch.uint8))
        elif not finite:
            send.view(w, plan.slot)[:, 3] = FLAG_NONFINITE
        collectives.alltoall(send, recv, group).wait()
        rows = recv.view(w, plan.slot)
        if plan.uses < VALIDATE_USES:
            check_headers(rows, st.codec, st._print, S)
        plan.uses += 1
        bad = nonfinite_flag(rows)
        acc = output_tensor if output_tensor.dtype == torch.float32 else \
            torch.empty(S, dtype=torch.float32, device=device)
        # sum in rank order, then scale: what Gloo's reduce-scatter does for AVG
        st.codec.decode([body_of(rows[r], plan.body) for r in range(w)], row_layout, acc.view(-1), divisor=1)
        if factor != 1.0:
            if factor == 1.0 / w:
                acc.div_(w)
            else:
                acc.mul_(factor)
        acc.masked_fill_(bad, float("nan"))
        if acc is not output_tensor:
            output_tensor.copy_(acc.view(output_tensor.shape))
        if st.error_feedback:
            for lo, hi in plan.padding:  # padding rows stay zero: they belong to no parameter
                err[lo:hi].zero_()
            st.store.stage(sig, err, bad)
        st._record(self, sig, bad, plan, w, S, input_tensor.element_size(), err_sq, inp_sq, time.perf_counter() - t0)
        return None


def _op_factor(op, w: int) -> float:
    """The scale FSDP's ``op`` asks of the summed shard: AVG 1/W, SUM 1, PREMUL_SUM(f) f."""
    kind = getattr(op, "op", op)
    if kind == dist.ReduceOp.AVG:
        return 1.0 / w
    if kind == dist.ReduceOp.SUM:
        return 1.0
    if kind == dist.ReduceOp.PREMUL_SUM:
        f = getattr(op, "factor", None)
        if isinstance(f, (int, float)):
            return float(f)
        raise RuntimeError("ddp_qhooks.fsdp: PREMUL_SUM with a tensor factor is not supported")
    raise RuntimeError(f"ddp_qhooks.fsdp: unsupported reduce op {op!r} (FSDP uses AVG, SUM or PREMUL_SUM)")


# ================================================================================================
# the state
# ================================================================================================

class FSDPQuantState:
    """What :func:`register` returns: configuration, residuals, counters of every quantized
    reduce-scatter of one model.  ``state_dict()`` holds only tensors and plain values."""

    def __init__(self, codec: str = "stochastic", bits: int = 8, error_feedback: bool = True, residual_dtype=None,
                 seed: int = 0, measure_error: bool = True, residual_block_size: int = 256,
                 stage_residuals: bool = True, **codec_options):
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
        self.residual_kind, dtype, rbits = _residual_kind(residual_dtype)
        if residual_dtype is not None and not error_feedback:
            raise ValueError("residual_dtype only applies with error_feedback=True")
        self.residual_block_size = residual_block_size
        if not isinstance(stage_residuals, bool):
            raise ValueError(f"stage_residuals must be True or False, got {stage_residuals!r}")
        self.stage_residuals = stage_residuals
        self.store = (_DenseResiduals(dtype, not stage_residuals) if rbits is None
                      else _CodedResiduals(rbits, residual_block_size, not stage_residuals))
        self.error_feedback, self.seed, self.measure_error = error_feedback, seed, measure_error
        self._print = fingerprint(self.codec.config())
        self.comms: List[QuantizedReduceScatter] = []
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
        of this rank."""
        t = self._totals
        res = self.residual_nbytes()
        return {
            "steps": self.step,
            "calls": t["calls"],
            "modules": len(self.comms),
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

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Residuals by parameter name (fp32, the parameter's flat unsharded local gradient shape;
        ``<module>#flat`` for a module-level residual), step, seed, config, counters."""
        rows: Dict[int, Dict[int, torch.Tensor]] = {}
        named: Dict[str, torch.Tensor] = {}
        for vkey, t in self.store.residuals().items() if self.error_feedback else ():
            if vkey >= _MODULE_KEY_BASE:
                idx = vkey - _MODULE_KEY_BASE
                fqn = self.comms[idx].module_fqn if idx < len(self.comms) else str(idx)
                named[f"{fqn}#flat"] = t.detach().to("cpu", torch.float32, copy=True)
            else:
                rows.setdefault(vkey // _ROW_STRIDE, {})[vkey % _ROW_STRIDE] = t
        for key, parts in rows.items():
            n, _, w = self._geometry[key]
            flat = torch.cat([parts[r].detach().reshape(-1).float().cpu() for r in range(w) if r in parts])
            if len(parts) != w:
                raise RuntimeError(f"residual of {self._names[key]!r} is incomplete ({len(parts)} of {w} rows)")
            named[self._names[key]] = flat[:n].clone()
        return {
            "format": STATE_FORMAT,
            "kind": "fsdp",
            "codec": dict(self.codec.config()),
            "error_feedback": self.error_feedback,
            "residual_dtype": self.residual_kind,
            "seed": self.seed,
            "step": self.step,
            "world_size": self._world(),
            "rank": dist.get_rank(self.process_group) if dist.is_initialized() else 0,
            "residuals": named,
            "totals": dict(self._totals),
        }

    def _world(self) -> int:
        return dist.get_world_size(self.process_group) if dist.is_initialized() else 1

    def load_state_dict(self, state_dict) -> None:
        """Restore residuals, step and seed (after a restart: ``register`` on the new model first).

        Pass this rank's own ``state_dict()``; or the list of every rank's, which also works at
        another world size (every rank then holds the old run's pending correction, the mean of
        the old ranks' residuals).  One rank's dict at another world size resets the residuals
        (with a warning): it is only 1/W of the correction."""
        if isinstance(state_dict, (list, tuple)):
            sds = list(state_dict)
            for sd in sds:
                self._check(sd)
            if len(sds) == self._world():
                me = dist.get_rank(self.process_group) if dist.is_initialized() else 0
                own = [sd for sd in sds if sd.get("rank") == me]
                if len(own) == 1:
                    return self._restore(own[0], own[0]["residuals"])
            mean: Dict[str, torch.Tensor] = {}
            for sd in sds:
                for name, t in sd["residuals"].items():
                    mean.setdefault(name, torch.zeros(t.numel(), dtype=torch.float64)).add_(
                        t.reshape(-1).double(), alpha=1.0 / len(sds))
            warnings.warn(f"ddp_qhooks.fsdp: residuals of {len(sds)} ranks REDISTRIBUTED at world size "
                          f"{self._world()} (every rank holds their mean)", stacklevel=2)
            return self._restore(sds[0], {k: v.float() for k, v in mean.items()})
        self._check(state_dict)
        residuals = state_dict["residuals"]
        if state_dict.get("world_size") not in (None, self._world()):
            warnings.warn(f"ddp_qhooks.fsdp: state saved at world size {state_dict['world_size']}, loaded at "
                          f"{self._world()}: residuals RESET (pass every rank's state_dict() to redistribute)",
                          stacklevel=2)
            residuals = {}
        self._restore(state_dict, residuals)

    @staticmethod
    def _check(sd) -> None:
        if not isinstance(sd, dict) or sd.get("format") != STATE_FORMAT or sd.get("kind") != "fsdp":
            raise ValueError("not a ddp_qhooks.fsdp state_dict (format/kind differ)")

    def _restore(self, sd: dict, named: dict) -> None:
        if dict(sd["codec"]) != self.codec.config():
            warnings.warn(f"ddp_qhooks.fsdp: loading residuals saved with {sd['codec']} into {self.codec.config()}",
                          stacklevel=3)
        by_name = {n: k for k, n in self._names.items()}
        by_module = {f"{c.module_fqn}#flat": _MODULE_KEY_BASE + c.index for c in self.comms}
        pending: Dict[int, torch.Tensor] = {}
        for name, t in named.items():
            t = t.detach().reshape(-1).float()
            if name in by_module:
                pending[by_module[name]] = t
                continue
            key = by_name.get(name)
            if key is None or key not in self._geometry:
                raise ValueError(f"residual for {name!r}, which is not a sharded trainable parameter of the model")
            n, P, w = self._geometry[key]
            if t.numel() != n:
                raise ValueError(f"residual for {name!r} has {t.numel()} elements, the parameter has {n}")
            padded = torch.zeros(P * w, dtype=torch.float32)
            padded[:n] = t
            for r in range(w):
                pending[key * _ROW_STRIDE + r] = padded[r * P:(r + 1) * P]
        if self.error_feedback:
            self.store.load(pending)
        self.step = int(sd["step"])
        self.seed = int(sd["seed"])
        self._totals.update({k: int(v) for k, v in sd.get("totals", {}).items() if k in self._totals})


# ================================================================================================
# register
# ================================================================================================

def _fsdp_units(model) -> list:
    """(fqn, module, its single FSDPParamGroup or None) of every FSDP module owning parameters."""
    units = []
    for fqn, mod in model.named_modules():
        if FSDPModule is None or not isinstance(mod, FSDPModule):
            continue
        groups = list(mod._get_fsdp_state()._fsdp_param_groups)
        if len(groups) > 1:
            raise ValueError(f"FSDP module {fqn or '<root>'} has {len(groups)} parameter groups (per-parameter "
                             "meshes); FSDP's custom reduce-scatter supports one")
        if groups:
            units.append((fqn, mod, groups[0]))
    return units


def register(model, codec: str = "stochastic", bits: int = 8, *, error_feedback: bool = True,
             residual_dtype=None, **options) -> FSDPQuantState:
    """Install the quantized reduce-scatter on every FSDP module of ``model`` (after
    ``fully_shard``); return its :class:`FSDPQuantState`.

    Collective: call it on every rank.  ``options`` go to the codec (e.g. ``block_size``) or to the
    state (``seed``, ``measure_error``, ``residual_block_size`` for ``residual_dtype="int8"`` ...,
    ``stage_residuals``: True (default) stages each module's next residual and commits them all at
    the end of the backward only if every input of every module was finite, which holds one more
    residual-sized buffer; False updates each module's residual right after its exchange unless
    that module's input was non-finite on some rank: half the residual memory, but after a step
    GradScaler skips, the finite modules' residuals have moved on).
    ``residual_dtype``: ``None``/``"fp32"``, ``"bf16"``, ``"fp16"``, or ``"int8"`` ... ``"int2"``.
    Invalid options raise :class:`~ddp_qhooks.InvalidOptionsError` on every rank, ranks configured
    differently (codec, bits, residual, model structure) :class:`~ddp_qhooks.ConfigMismatchError`.
    """
    error = None
    state = None
    units = []
    try:
        if FSDPModule is None:
            raise ValueError("ddp_qhooks.fsdp needs torch with torch.distributed.fsdp.fully_shard (FSDP2)")
        units = _fsdp_units(model)
        if not units:
            raise ValueError(f"register() found no fully_shard module with parameters in {type(model).__name__}; "
                             "call torch.distributed.fsdp.fully_shard(...) first")
        state_options = {k: options.pop(k) for k in STATE_OPTIONS if k in options}
        state = FSDPQuantState(codec, bits, error_feedback, residual_dtype, **state_options, **options)
        state._bind(model)
        for i, (fqn, mod, pg) in enumerate(units):
            w = pg._reduce_scatter_process_group.size()
            for fp in pg.fsdp_params:
                key = state._key_by_param.get(id(fp.sharded_param))
                if key is None:
                    raise ValueError(f"a parameter of FSDP module {fqn or '<root>'} is not in model.named_parameters()")
                psize = fp.padded_sharded_param_size.numel()
                elem = fp.sharded_param.element_size()
                state._fsdp_bytes["sharded_param_bytes"] += fp.sharded_size.numel() * elem
                if fp.sharded_param.requires_grad:
                    state._geometry[key] = (fp._orig_size.numel(), psize, w)
                    state._fsdp_bytes["sharded_grad_bytes"] += fp.sharded_size.numel() * elem
    except (ValueError, TypeError) as exc:
        error = exc
    group = units[0][2]._reduce_scatter_process_group if units else None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "meta":
        device = torch.device("cpu")
    if dist.is_initialized():
        check_agreement(None if error else _config_before(state, units), device, group,
                        local_error=None if error is None else str(error))
    elif error is not None:
        raise error
    state.process_group = group
    for i, (fqn, mod, pg) in enumerate(units):
        comm = QuantizedReduceScatter(state, i, fqn or "<root>", pg)
        state.comms.append(comm)
        mod.set_custom_reduce_scatter(comm)
    return state


def _config_before(state: FSDPQuantState, units: list) -> dict:
    """The agreed configuration, computed before the comms are installed."""
    modules = []
    for fqn, _, pg in units:
        keys = [state._key_by_param[id(fp.sharded_param)] for fp in pg.fsdp_params]
        modules.append([fqn or "<root>", sum(state._geometry[k][1] for k in keys if k in state._geometry)])
    return {**state.codec.config(), "error_feedback": state.error_feedback, "residual": state.residual_kind,
            "residual_block_size": state.residual_block_size, "stage_residuals": state.stage_residuals,
            "modules": modules}


# ================================================================================================
# hierarchical: FSDP inside each node, the quantized exchange of each shard between nodes
# ================================================================================================

def node_mesh(ranks_per_node: Optional[int] = None, device_type: Optional[str] = None):
    """A 2-D DeviceMesh ``("node", "local")`` of the default group: shard with
    ``fully_shard(module, mesh=mesh["local"])`` (full-precision reduce-scatter over the ranks of a
    node), then :func:`register_between_nodes` (quantized exchange over ``mesh["node"]``).
    ``ranks_per_node`` defaults to torchrun's ``LOCAL_WORLD_SIZE``.  Collective."""
    import os

    from torch.distributed.device_mesh import init_device_mesh
    if ranks_per_node is None and os.environ.get("LOCAL_WORLD_SIZE", "").isdigit():
        ranks_per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    w = dist.get_world_size()
    if isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int) or ranks_per_node < 1 \
            or w % ranks_per_node:
        raise ValueError(f"ranks_per_node must be a positive divisor of the world size {w}, got {ranks_per_node!r}")
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (w // ranks_per_node, ranks_per_node), mesh_dim_names=("node", "local"))


class _ShardSlot:
    """Stands for one parameter's padded shard in the engine's Unit (identity and size only)."""

    def __init__(self, numel: int):
        self._numel = numel

    def numel(self) -> int:
        return self._numel


def register_between_nodes(model, mesh=None, codec: str = "stochastic", bits: int = 8, *,
                           error_feedback: bool = True, process_group=None, nonfinite_everywhere: bool = True,
                           **options):
    """Hierarchical sharded training: after ``fully_shard(..., mesh=mesh["local"])`` (FSDP over
    the ranks of one node, its own full-precision reduce-scatter on the fast link), average each
    rank's gradient shard with the same shard of the other nodes by the engine's quantized
    exchange (``set_all_reduce_hook`` on every FSDP module), with error feedback on the shard:
    1/L of the model per rank.  ``mesh``: the 2-D mesh of :func:`node_mesh` (its ``"node"``
    dimension), or pass the cross-node ``process_group`` itself.  Returns the engine's
    :class:`~ddp_qhooks.QuantizedHookState` (``stats()``, ``state_dict()``; residuals are keyed
    ``param<i>`` per shard slot).  Collective; config agreement over the default group.

    ``nonfinite_everywhere`` (default True) also replaces FSDP's reduce-scatter inside the node by
    :func:`register`'s with codec ``none`` (fp32, equal to FSDP's to fp32 rounding, no residual):
    its headers carry a rank's non-finite flag to every rank of the node, and the exchange between
    nodes then to every rank.  With False, FSDP's own intra-node reduce-scatter stays (NCCL's
    native one on GPUs) and a non-finite value reaches only the ranks whose shard holds it.

    Limit of this first version: each module's exchange ends a step of the state (residuals
    committed per module, a module whose shard was non-finite keeps its residuals).
    """
    from ..engine import QuantizedHookState

    error = None
    state = None
    units = []
    try:
        if process_group is None:
            if mesh is None:
                raise ValueError("register_between_nodes needs mesh= (ddp_qhooks.fsdp.node_mesh) or process_group=")
            process_group = mesh.get_group("node")
        units = _fsdp_units(model)
        if not units:
            raise ValueError(f"register_between_nodes() found no fully_shard module with parameters in "
                             f"{type(model).__name__}")
        options.setdefault("exchange", "allgather")
        state = QuantizedHookState(process_group=process_group, codec=codec, bits=bits,
                                   error_feedback=error_feedback, **options)
    except (ValueError, TypeError) as exc:
        error = exc
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if dist.is_initialized():
        config = None if error else {**state.agreed_config(), "modules": [fqn for fqn, _, _ in units]}
        check_agreement(config, device, None, local_error=None if error is None else str(error))
        state._agreed = True
    elif error is not None:
        raise error
    if nonfinite_everywhere:
        register(model, "none", error_feedback=False, measure_error=False)
    for i, (fqn, mod, pg) in enumerate(units):
        mod.set_all_reduce_hook(_NodeHook(state, i, pg))
    return state


class _NodeHook:
    """``hook(reduce_output)``: the quantized mean of this shard over the nodes, in place."""

    def __init__(self, state, index: int, pg):
        self.state, self.index = state, index
        self.full = [_ShardSlot(fp.padded_sharded_param_size.numel()) for fp in pg.fsdp_params
                     if fp.sharded_param.requires_grad]
        self._other: Dict[int, list] = {}

    def __call__(self, reduce_output: torch.Tensor) -> None:
        from ..engine import Unit, submit
        n = reduce_output.numel()
        slots = self.full if sum(s.numel() for s in self.full) == n else \
            self._other.setdefault(n, [_ShardSlot(n)])  # some parameters had no gradient: one flat slot
        flat = reduce_output.view(-1)
        submit(self.state, Unit(self.index, flat, slots, True)).wait()
