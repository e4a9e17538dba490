"""DDP: the comm hook and the one-line ``register``.

Usage, torch style (like ``powerSGD_hook``)::

    from ddp_qhooks import QuantizedHookState, quantized_allgather_hook
    state = QuantizedHookState(process_group=None, codec="stochastic", bits=4, module=ddp.module)
    ddp.register_comm_hook(state, quantized_allgather_hook)

or simply ``state = ddp_qhooks.register(ddp, codec="stochastic", bits=4)``.
"""

import torch
import torch.distributed as dist

from ..engine import QuantizedHookState, Unit, submit
from ..exchange import check_agreement

__all__ = ["quantized_allgather_hook", "register"]


def quantized_allgather_hook(state: QuantizedHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The DDP comm hook: quantize the ``bucket`` (a ``dist.GradBucket``) with ``state``'s codec and
    error feedback, exchange packed payloads (see ``state.exchange``) and return a Future of the
    decoded mean (DDP does not divide by the world size when a hook is registered)."""
    return submit(state, Unit(bucket.index(), bucket.buffer(), bucket.parameters(), bucket.is_last()))


def register(ddp_model, codec: str = "stochastic", *, bits: int = 8, error_feedback: bool = True,
             process_group=None, exchange: str = "auto", **options) -> QuantizedHookState:
    """Register the quantized hook on a DistributedDataParallel model; return its state.

    Args:
        ddp_model: the ``DistributedDataParallel`` model (one hook per model, DDP's rule).
        codec: codec name (``ddp_qhooks.codecs.available()``), default ``"stochastic"``.
        bits: bits per value (valid range per codec), default 8.
        error_feedback: keep per-parameter residuals (default True).
        process_group: the group to average over (default: the model's).
        exchange: ``"auto"`` (default), ``"allgather"``, ``"alltoall"`` or ``"hierarchical"``.
        options: codec options and state options, below.

    Collective, like DDP's constructor: call it on every rank.  ``options`` go to the codec (e.g.
    ``block_size``) or to the state (``seed``, ``measure_error``, ``chunk_size``, ``server_bits``,
    ``ranks_per_node``; see :class:`~ddp_qhooks.QuantizedHookState`).  With
    ``find_unused_parameters=True`` the residuals of parameters unused in a step are held back.
    Invalid options raise :class:`~ddp_qhooks.InvalidOptionsError` (a ValueError) on every rank,
    ranks configured differently :class:`~ddp_qhooks.ConfigMismatchError`, before any step.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(f"register() needs a torch.nn.parallel.DistributedDataParallel model, got {type(ddp_model).__name__}")
    if getattr(ddp_model, "mixed_precision", None) is not None:
        raise ValueError("DDP's mixed_precision option installs its own comm hook; use codec='bf16'/'fp16' instead")
    state_options = {k: options.pop(k) for k in ("seed", "measure_error", "hold_unused_residuals") if k in options}
    state_options["exchange"] = exchange
    state_options.setdefault("hold_unused_residuals", bool(getattr(ddp_model, "find_unused_parameters", False)))
    if process_group is None:
        process_group = getattr(ddp_model, "process_group", None)
    error = None
    try:
        state = QuantizedHookState(process_group=process_group, codec=codec, bits=bits, error_feedback=error_feedback,
                                   module=ddp_model.module, **state_options, **options)
    except (ValueError, TypeError) as exc:
        error = exc
    # agree on validity and configuration here, so that one misconfigured rank raises the same
    # error everywhere instead of a hang
    device = next((p.device for p in ddp_model.module.parameters()), torch.device("cpu"))
    if dist.is_initialized():
        check_agreement(None if error else state.agreed_config(), device, process_group,
                        local_error=None if error is None else str(error))
        state._agreed = True
    elif error is not None:
        raise error
    try:
        ddp_model.register_comm_hook(state, quantized_allgather_hook)
    except RuntimeError as exc:
        if "only be called once" not in str(exc):
            raise
        raise RuntimeError("ddp_qhooks.register: this DDP model already has a communication hook, and DDP accepts "
                           "one per model. To change the codec or its options, wrap the module in a new "
                           "DistributedDataParallel and register on that (carry the error-feedback residuals "
                           "over with old_state.state_dict() -> new_state.load_state_dict())") from None
    return state
