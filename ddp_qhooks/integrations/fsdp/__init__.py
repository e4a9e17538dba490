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
3. exchanges them with ``all_to_all_single`` of equal slots (on the CPU in pieces all in flight,
   ``chunk_size``; FSDP's parameter all-gather is pipelined the same way: ``all_gather.py``),
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

The package follows the engine's layers: ``residuals`` (the residual stores),
``reduce_scatter`` (the custom comm), ``all_gather`` (the pipelined parameter all-gather), ``state`` and ``checkpoint`` (what ``register`` returns),
``register``, ``between_nodes`` (hierarchical sharded training).
"""
from .between_nodes import node_mesh, register_between_nodes
from .reduce_scatter import QuantizedReduceScatter
from .register import register
from .checkpoint import STATE_FORMAT
from .state import FSDPQuantState

__all__ = ["register", "FSDPQuantState", "QuantizedReduceScatter", "STATE_FORMAT", "node_mesh",
           "register_between_nodes"]
