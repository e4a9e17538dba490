"""PyTorch Lightning integration: a DDP strategy that always registers the quantized hook.

Lightning's own ``DDPStrategy(ddp_comm_hook=..., ddp_comm_state=...)`` registers a comm hook only
when the device is CUDA (Lightning 2.x): on CPU it silently trains with DDP's plain fp32 allreduce
and the hook is never called.  :class:`QuantizedDDPStrategy` registers ``ddp_qhooks.register(...)``
on every device type (CPU/Gloo and CUDA/NCCL) and keeps the hook state in checkpoints::

    from ddp_qhooks.integrations.lightning import QuantizedDDPStrategy
    strategy = QuantizedDDPStrategy(codec="stochastic", bits=8)
    trainer = lightning.pytorch.Trainer(accelerator="cpu", devices=2, strategy=strategy)
    trainer.fit(model)
    print(strategy.hook_state.stats())          # in every training process

:class:`RequireCommHook` is a callback for any DDP strategy: it raises at the first optimizer
step if no ``ddp_qhooks`` hook was actually called (e.g. the plain ``DDPStrategy`` on CPU).

Checkpoints: the hook state is per rank (every rank has its own error-feedback residuals), while
Lightning writes the checkpoint from global rank 0 only.  ``QuantizedDDPStrategy.save_checkpoint``
therefore gathers every rank's ``state_dict()`` to rank 0 and stores them under
``checkpoint["ddp_qhooks"] = {"format": 1, "world_size": W, "ranks": [state of rank 0, ...]}``.
Saving is a collective, which Lightning already requires (``trainer.save_checkpoint`` and
``ModelCheckpoint`` run on every rank).  On resume (``trainer.fit(..., ckpt_path=...)``) rank r
loads entry r.  If the world size changed, the residuals are not loaded (a warning says so) and
error feedback starts from zero, as in a fresh run.  Weights-only checkpoints carry no hook state.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Optional

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

try:
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import DDPStrategy
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("ddp_qhooks.integrations.lightning needs PyTorch Lightning 2.x: pip install lightning") from exc

from ..engine import QuantizedHookState
from .ddp import register

__all__ = ["QuantizedDDPStrategy", "RequireCommHook", "CHECKPOINT_KEY"]

CHECKPOINT_KEY = "ddp_qhooks"
CHECKPOINT_FORMAT = 1

_DDP_KWARGS = frozenset(inspect.signature(DistributedDataParallel.__init__).parameters) - {"self", "module"}


class QuantizedDDPStrategy(DDPStrategy):
    """``DDPStrategy`` that registers the ``ddp_qhooks`` quantized all-gather hook on CPU and CUDA.

    Args:
        codec, bits, error_feedback: as in :func:`ddp_qhooks.register`.
        **kwargs: keyword arguments of ``DistributedDataParallel`` (``find_unused_parameters``,
            ``bucket_cap_mb``, ...) and of ``DDPStrategy`` (``start_method``, ``timeout``, ...)
            are passed on; all other keywords are codec / hook-state options
            (``block_size``, ``seed``, ``measure_error``, ...).

    ``hook_state`` is the :class:`~ddp_qhooks.QuantizedHookState` of this process once
    ``trainer.fit`` has wrapped the model (``None`` before).  With ``start_method="spawn"`` /
    ``"fork"`` the training runs in child processes, so read it there (e.g. in a callback).
    """

    def __init__(self, codec: str = "stochastic", bits: int = 8, error_feedback: bool = True, **kwargs: Any):
        for name in ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper"):
            if kwargs.get(name) is not None:
                raise ValueError(f"QuantizedDDPStrategy registers its own comm hook; do not pass {name}=")
            kwargs.pop(name, None)
        strategy_kwargs = set(inspect.signature(DDPStrategy.__init__).parameters) - {"self", "kwargs"}
        codec_options = {k: kwargs.pop(k) for k in list(kwargs) if k not in _DDP_KWARGS and k not in strategy_kwargs}
        # fail in the launching process, before any worker starts, on an invalid configuration
        QuantizedHookState(None, codec=codec, bits=bits, error_feedback=error_feedback, **codec_options)
        super().__init__(**kwargs)
        self._hook_config = dict(codec=codec, bits=bits, error_feedback=error_feedback, **codec_options)
        self.hook_state: Optional[QuantizedHookState] = None
        self._pending_hook_state: Optional[dict] = None

    def _register_ddp_hooks(self) -> None:
        assert isinstance(self.model, DistributedDataParallel)
        self.hook_state = register(self.model, **self._hook_config)
        if self._pending_hook_state is not None:
            self._restore_hook_state(self._pending_hook_state)
            self._pending_hook_state = None

    def setup(self, trainer) -> None:
        super().setup(trainer)
        self._pending_hook_state = None  # only the checkpoint loaded for this run applies

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Optional[Any] = None) -> None:
        if self.hook_state is not None and "optimizer_states" in checkpoint:  # not for weights-only
            group = self.hook_state.process_group
            mine = self.hook_state.state_dict()
            every = [None] * dist.get_world_size(group) if self.is_global_zero else None
            dist.gather_object(mine, every, dst=0, group=group)
            if self.is_global_zero:
                checkpoint = {**checkpoint, CHECKPOINT_KEY: {"format": CHECKPOINT_FORMAT, "world_size": len(every),
                                                             "ranks": every}}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        # Lightning loads the checkpoint before wrapping the model in DDP: keep the hook state
        # until _register_ddp_hooks has created the QuantizedHookState
        self._pending_hook_state = checkpoint.get(CHECKPOINT_KEY)
        return checkpoint

    def _restore_hook_state(self, saved: dict) -> None:
        if saved.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unsupported ddp_qhooks checkpoint entry format {saved.get('format')!r}")
        group = self.hook_state.process_group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if saved["world_size"] != world:
            warnings.warn(f"ddp_qhooks: checkpoint holds hook state for {saved['world_size']} ranks, this run has "
                          f"{world}; error-feedback residuals start from zero", stacklevel=2)
            return
        self.hook_state.load_state_dict(saved["ranks"][rank])


class RequireCommHook(Callback):
    """Raise at the first optimizer step if no ``ddp_qhooks`` hook has been called.

    Guards against silently uncompressed training, e.g. Lightning's plain
    ``DDPStrategy(ddp_comm_hook=quantized_allgather_hook, ddp_comm_state=state)`` on CPU, which
    never registers the hook.  Pass the state you gave to ``ddp_comm_state``, or nothing: the
    state is then looked up on the strategy (``QuantizedDDPStrategy.hook_state``, Lightning's
    ``ddp_comm_state``) and among the hooks registered on the DDP model.  Does nothing when the
    model is not wrapped in DDP (no gradient communication to compress).
    """

    def __init__(self, state: Optional[QuantizedHookState] = None):
        self.state = state
        self._checked = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._checked or trainer.global_step < 1:  # no synchronised step yet (e.g. accumulating)
            return
        self._checked = True
        strategy = trainer.strategy
        model = getattr(strategy, "model", None)
        if not isinstance(model, DistributedDataParallel):
            return
        states = [self.state, getattr(strategy, "hook_state", None), getattr(strategy, "_ddp_comm_state", None)]
        states += [s for _, s in getattr(model, "_comm_hooks", ())]
        states = [s for s in states if isinstance(s, QuantizedHookState)]
        if any(s.stats()["hook_calls"] > 0 for s in states):
            return
        what = ("the ddp_qhooks hook was never called" if states else "no ddp_qhooks hook is registered on the DDP model")
        raise RuntimeError(
            f"ddp_qhooks: {what} in {trainer.global_step} optimizer step(s) on {strategy.root_device.type}, so "
            f"gradients were exchanged UNCOMPRESSED by DDP's fp32 allreduce. Lightning's "
            f"DDPStrategy(ddp_comm_hook=...) registers comm hooks only on CUDA devices; use "
            f"ddp_qhooks.integrations.lightning.QuantizedDDPStrategy(codec=..., bits=...), which registers the hook "
            f"on every device.")
