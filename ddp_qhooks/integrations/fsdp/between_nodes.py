"""Hierarchical sharded training: FSDP inside each node, the engine's quantized exchange of each
shard between nodes (``set_all_reduce_hook``)."""
from __future__ import annotations

import warnings
from typing import Dict, Optional

import torch
import torch.distributed as dist

from ...engine import QuantizedHookState, Unit, end_step, submit
from ...engine.checkpoint import UNPLACEABLE
from ...exchange import check_agreement
from .register import fsdp_units, register


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
    :class:`~ddp_qhooks.QuantizedHookState` (``stats()``, ``state_dict()``; each residual is this
    rank's padded shard of a parameter, keyed by the parameter's fully qualified name; a module's
    step in which some of its parameters got no gradient is exchanged as one flat slot, keyed
    ``<module>[flat <n>]``).  Collective; config agreement over the default group.

    ``nonfinite_everywhere`` (default True) also replaces FSDP's reduce-scatter inside the node by
    :func:`register`'s with codec ``none`` (fp32, equal to FSDP's to fp32 rounding, no residual):
    its headers carry a rank's non-finite flag to every rank of the node, and the exchange between
    nodes then to every rank.  With False, FSDP's own intra-node reduce-scatter stays (NCCL's
    native one on GPUs) and a non-finite value reaches only the ranks whose shard holds it.

    A backward pass is one step of the state: the residuals of all its modules are committed at its
    end (an autograd final callback) if no rank's shard was non-finite in any module.
    """
    error = None
    state = None
    units = []
    try:
        if process_group is None:
            if mesh is None:
                raise ValueError("register_between_nodes needs mesh= (ddp_qhooks.fsdp.node_mesh) or process_group=")
            process_group = mesh.get_group("node")
        units = fsdp_units(model)
        if not units:
            raise ValueError(f"register_between_nodes() found no fully_shard module with parameters in "
                             f"{type(model).__name__}")
        if "module" in options:
            raise ValueError("register_between_nodes does not take module=: residuals are named after the "
                             "parameters of model")
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
    steps = _StepEnd(state)
    names = {id(p): n for n, p in model.named_parameters()}
    hooks = [_NodeHook(state, i, fqn, pg, steps, names) for i, (fqn, mod, pg) in enumerate(units)]
    for (_, mod, _), hook in zip(units, hooks):
        mod.set_all_reduce_hook(hook)
    state._resolve_name = _NameResolver(hooks)
    return state


class _NameResolver:
    """Finds the residual slot of a checkpoint name the state does not know yet: a module's flat
    slot (created on demand), or ``param<i>``, the name of the i-th slot in the order a first
    backward pass reaches them (modules in reverse order of ``named_modules``), which is how the
    residuals of this mode were keyed before they had names."""

    def __init__(self, hooks: list):
        self.hooks = hooks
        self.backward_order = [slot for hook in reversed(hooks) for slot in hook.full]
        self.warned = set()

    def __call__(self, state, name: str):
        for hook in self.hooks:
            prefix = f"{hook.name}[flat "
            if name.startswith(prefix) and name.endswith("]") and name[len(prefix):-1].isdigit():
                return state._key_of(hook.flat_slot(int(name[len(prefix):-1]))[0])
        if not (name.startswith("param") and name[5:].isdigit()):
            return None
        i = int(name[5:])
        if i < len(self.backward_order):
            self._warn_once("matched", "ddp_qhooks: hook state with residuals keyed param<i> (before they were keyed "
                            "by parameter name): matched to the parameters in the order a backward pass reaches "
                            "them (FSDP modules in reverse order of named_modules), sizes checked")
            return state._key_of(self.backward_order[i])
        self._warn_once("dropped", f"ddp_qhooks: hook state with residuals keyed param<i>: {name} is beyond the "
                        "parameters' slots (a flat slot of a step in which some parameters had no gradient), which "
                        "cannot be matched to parameters; left out, with any other such residual")
        return UNPLACEABLE

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            warnings.warn(message, stacklevel=5)


class _StepEnd:
    """Ends the engine state's step once per backward pass: FSDP's modules cannot tell which of
    them is the pass's last (a module whose parameters got no gradient is skipped)."""

    def __init__(self, state):
        self.state, self.queued = state, False

    def after_unit(self) -> None:
        if self.queued:
            return
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._end)
            self.queued = True
        except RuntimeError:  # not inside a backward pass: this exchange is a step of its own
            end_step(self.state)

    def _end(self) -> None:
        self.queued = False
        end_step(self.state)


class _NodeHook:
    """``hook(reduce_output)``: the quantized mean of this shard over the nodes, in place."""

    def __init__(self, state, index: int, fqn: str, pg, steps: _StepEnd, names: dict):
        self.state, self.index, self.steps = state, index, steps
        self.name = fqn or "<root>"
        self.full = []
        for j, fp in enumerate(pg.fsdp_params):
            if fp.sharded_param.requires_grad:
                slot = _ShardSlot(fp.padded_sharded_param_size.numel())
                state._name_param(slot, names.get(id(fp.sharded_param)) or fp._param_fqn or f"{self.name}.<param {j}>")
                self.full.append(slot)
        self._other: Dict[int, list] = {}

    def flat_slot(self, n: int) -> list:
        """The one slot of a step in which only some parameters had a gradient (``n`` values)."""
        slots = self._other.get(n)
        if slots is None:
            slots = self._other[n] = [_ShardSlot(n)]
            self.state._name_param(slots[0], f"{self.name}[flat {n}]")
        return slots

    def __call__(self, reduce_output: torch.Tensor) -> None:
        n = reduce_output.numel()
        slots = self.full if sum(s.numel() for s in self.full) == n else self.flat_slot(n)
        flat = reduce_output.view(-1)
        submit(self.state, Unit(self.index, flat, slots, False)).wait()
        self.steps.after_unit()
