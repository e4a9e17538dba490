"""ddp_qhooks: quantized gradient exchange with error feedback for PyTorch DDP, LocalSGD and more.

One line after wrapping the model::

    state = ddp_qhooks.register(ddp_model, codec="stochastic", bits=4)

Layers: ``codecs`` (tensor <-> payload), ``error_feedback`` (residual memory), ``exchange``
(strategies, the only layer that talks to torch.distributed), ``engine`` (the per-unit pipeline
and its state), ``optim`` (1-bit Adam), ``integrations`` (DDP, LocalSGD, Lightning, Accelerate, launch), ``tools``.
"""
from . import codecs
from .codecs import CODECS, make_codec
from .engine import QuantizedHookState
from .exchange import EXCHANGES, ConfigMismatchError, InvalidOptionsError
from .integrations.ddp import quantized_allgather_hook, register
from .integrations.local_sgd import LocalSGD, local_phase_hook
from .integrations import fsdp
from . import optim

__version__ = "0.1.0"
__all__ = ["register", "QuantizedHookState", "quantized_allgather_hook", "codecs", "CODECS", "make_codec",
           "ConfigMismatchError", "InvalidOptionsError", "EXCHANGES", "LocalSGD", "local_phase_hook", "fsdp", "optim",
           "__version__"]
