"""ddp_qhooks: quantized DDP communication hooks with error feedback.

One line after wrapping the model::

    state = ddp_qhooks.register(ddp_model, codec="stochastic", bits=4)
"""
from . import codecs
from .codecs import CODECS, make_codec
from .exchange import EXCHANGES, ConfigMismatchError
from .hook import QuantizedHookState, quantized_allgather_hook, register
from .local_sgd import LocalSGD, local_phase_hook

__version__ = "0.1.0"
__all__ = ["register", "QuantizedHookState", "quantized_allgather_hook", "codecs", "CODECS", "make_codec",
           "ConfigMismatchError", "EXCHANGES", "LocalSGD", "local_phase_hook", "__version__"]
