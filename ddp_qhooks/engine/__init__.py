"""The engine: one pipeline per unit of gradient (residual -> encode -> exchange -> decode -> commit),
shared by every integration.  ``state.py`` holds the configured state, ``pipeline.py`` the
pipeline, ``completion.py`` the thread that finishes launched exchanges, ``chunks.py`` the cutting
of large units, ``accounting.py`` and ``checkpoint.py`` the state's reports and checkpoints."""
from .pipeline import Unit, end_step, submit
from .state import QuantizedHookState

__all__ = ["QuantizedHookState", "Unit", "end_step", "submit"]
