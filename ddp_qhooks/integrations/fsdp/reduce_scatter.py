"""The custom ``ReduceScatter`` FSDP calls once per module and backward: residual, encode the W
destination rows, ``all_to_all_single`` of the payloads (in pieces on the CPU), decode and sum the
own shard."""
from __future__ import annotations

import time
from typing import Dict

import torch
import torch.distributed as dist

from ...codecs import Layout
from ...codecs._random import splitmix64
from ...codecs.base import all_finite
from ...codecs.wire import FLAG_NONFINITE, HEADER_BYTES, payload_nbytes
from ...engine.chunks import chunk_bounds
from ...exchange import collectives
from ...exchange.base import body_of, check_headers, nonfinite_flag, set_flag, write_header
from .residuals import MODULE_KEY_BASE, ROW_STRIDE

VALIDATE_USES = 2        # headers are checked on the host during a plan's first uses only

try:  # torch >= 2.6
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
except ImportError:  # pragma: no cover - too old a torch: register() says so
    FSDPModule = None

    class ReduceScatter:  # type: ignore[no-redef]
        pass



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
                sig = tuple(k * ROW_STRIDE + r for r in range(w) for k in keys)
                return Layout(sizes, keys), sig, sizes * w, keys
        # unknown mapping: one residual for the whole module input
        key = MODULE_KEY_BASE + self.index
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
        # several all-to-alls in flight keep a slow Gloo link busy (one large one leaves it idle):
        # pieces of chunk_size / 8 bytes of every slot, the payload of chunk_size / 2 values at 4 bits
        piece = st.chunk_size // 8 if st.chunk_size is not None and device.type == "cpu" else None
        for work, finish in collectives.alltoall_pieces(send, recv, group, chunk_bounds(plan.slot, piece)):
            work.wait()
            finish()
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

