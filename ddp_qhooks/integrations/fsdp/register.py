"""``register``: install the quantized reduce-scatter on every FSDP module of a model, after a
collective agreement on the configuration."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ...exchange import check_agreement
from .all_gather import PipelinedAllGather
from .reduce_scatter import FSDPModule, QuantizedReduceScatter
from .state import STATE_OPTIONS, FSDPQuantState


def fsdp_units(model) -> list:
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
    GradScaler skips, the finite modules' residuals have moved on), ``chunk_size`` (default
    2**21; on Gloo with a CPU model FSDP's parameter all-gather is cut into collectives of at most
    this many values per rank, all in flight: the same parameters, a slow link kept busy; None
    keeps FSDP's own all-gather).
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
        units = fsdp_units(model)
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
        if state.chunk_size is not None and device.type == "cpu" and _is_gloo(pg._all_gather_process_group):
            mod.set_custom_all_gather(PipelinedAllGather(state.chunk_size))
            state.pipelined_all_gathers += 1
    return state


def _is_gloo(group) -> bool:
    try:
        return dist.get_backend(group) == "gloo"
    except (RuntimeError, ValueError):  # not a process group torch.distributed knows
        return False


def _config_before(state: FSDPQuantState, units: list) -> dict:
    """The agreed configuration, computed before the comms are installed."""
    modules = []
    for fqn, _, pg in units:
        keys = [state._key_by_param[id(fp.sharded_param)] for fp in pg.fsdp_params]
        modules.append([fqn or "<root>", sum(state._geometry[k][1] for k in keys if k in state._geometry)])
    return {**state.codec.config(), "error_feedback": state.error_feedback, "residual": state.residual_kind,
            "residual_block_size": state.residual_block_size, "stage_residuals": state.stage_residuals,
            "chunk_size": state.chunk_size, "modules": modules}

