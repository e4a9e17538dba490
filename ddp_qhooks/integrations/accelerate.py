"""Hugging Face Accelerate integration: the hook, plus its per-rank state in ``save_state``.

With several processes, ``accelerator.prepare(model)`` returns torch's ``DistributedDataParallel``
(MULTI_CPU with Gloo, MULTI_GPU with NCCL), so :func:`ddp_qhooks.register` works on it directly,
and ``accelerator.accumulate(model)`` (DDP's ``no_sync``) calls the hook on synchronising steps only.

What this module adds is checkpointing.  The hook state is per rank (every rank has its own
error-feedback residuals).  ``accelerator.register_for_checkpointing(state)`` would write the main
process's ``state_dict()`` only and load that one file on every rank, giving every rank rank 0's
residuals.  :func:`register` instead hooks ``accelerator.save_state`` / ``load_state`` (which run
on every rank) so that each rank writes and reads its own ``ddp_qhooks_rank{r}.pt`` in the
checkpoint folder::

    model, opt, loader = accelerator.prepare(model, opt, loader)
    state = ddp_qhooks.integrations.accelerate.register(accelerator, model, codec="stochastic", bits=8)
    ...
    accelerator.save_state("ckpt")     # every rank: ckpt/ddp_qhooks_rank{r}.pt
    accelerator.load_state("ckpt")     # every rank reads its own file

On a resume with another world size the residuals are not loaded (warning); error feedback then
starts from zero.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..engine import QuantizedHookState
from .ddp import register as _register

__all__ = ["register", "state_file"]


def state_file(directory: str, rank: int) -> str:
    """Where rank ``rank`` keeps its hook state inside an ``accelerator.save_state`` folder."""
    return os.path.join(directory, f"ddp_qhooks_rank{rank}.pt")


def register(accelerator, model, codec: str = "stochastic", *, bits: int = 8, error_feedback: bool = True,
             **codec_options) -> Optional[QuantizedHookState]:
    """:func:`ddp_qhooks.register` on a model returned by ``accelerator.prepare``, with the hook
    state saved / loaded per rank by ``accelerator.save_state`` / ``load_state``.

    Collective like ``ddp_qhooks.register``: call on every rank.  Returns ``None`` in a
    single-process run (the model is not wrapped: nothing is communicated).  Raises TypeError
    when several processes run but the model is not DDP (FSDP, DeepSpeed, ...).
    """
    if not isinstance(model, DistributedDataParallel):
        if accelerator.num_processes == 1:
            return None
        raise TypeError(f"ddp_qhooks needs a DistributedDataParallel model; accelerator.prepare returned "
                        f"{type(model).__name__} (distributed_type={accelerator.distributed_type})")
    state = _register(model, codec, bits=bits, error_feedback=error_feedback, **codec_options)

    def save_hook(models, weights, output_dir):
        torch.save(state.state_dict(), state_file(output_dir, dist.get_rank(state.process_group)))

    def load_hook(models, input_dir):
        rank, world = dist.get_rank(state.process_group), dist.get_world_size(state.process_group)
        path = state_file(input_dir, rank)
        saved = torch.load(path, map_location="cpu", weights_only=True) if os.path.exists(path) else None
        if saved is None or saved.get("world_size") != world:
            warnings.warn(f"ddp_qhooks: {input_dir} holds no hook state for rank {rank} of {world} "
                          f"({'saved at world size ' + str(saved.get('world_size')) if saved else 'no file'}); "
                          "error-feedback residuals start from zero", stacklevel=2)
            return
        state.load_state_dict(saved)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    return state
