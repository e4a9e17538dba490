"""Optional fused kernel for the quantizers' hot loop (``compile=True``), built by torch.compile.

Eager torch/numpy needs two passes per chunk (the affine op, then the float->uint8 cast); one
compiled kernel does ``codes = trunc(window + (x - shift) * inv)`` in a single vectorised loop,
~35% less encode time on one CPU core.  Opt-in because the first call compiles (seconds, needs a
C++ compiler); any failure warns once and falls back to the eager path for good.
"""
from __future__ import annotations

import threading
import warnings

import torch

_lock = threading.Lock()
_kernel = None
_broken = False


def _affine_to_codes(xc, rounding, bias, shift, inv, out):
    out.copy_(((rounding + bias) + (xc - shift) * inv).to(torch.int32))


def affine_to_codes(xc: torch.Tensor, rounding: torch.Tensor, bias: float, shift: float, inv: float,
                    out: torch.Tensor) -> bool:
    """``out = trunc(rounding + bias + (xc - shift) * inv)`` as uint8 (``rounding`` broadcasts over
    the last dimension); False when the compiled kernel is unavailable."""
    global _kernel, _broken
    if _broken:
        return False
    try:
        with _lock:  # compilation (and dynamo's caches) are not meant for concurrent first calls
            if _kernel is None:
                _kernel = torch.compile(_affine_to_codes, dynamic=True, fullgraph=True)
            kernel = _kernel
        # scalars travel as 0-d tensors so that new ranges do not trigger recompiles
        kernel(xc, rounding, *(torch.tensor(v, dtype=torch.float32) for v in (bias, shift, inv)), out)
        return True
    except Exception as exc:  # no compiler, unsupported platform, ...: stay correct, just slower
        _broken = True
        warnings.warn(f"ddp_qhooks: compile=True unavailable ({type(exc).__name__}: {exc}); using the eager path",
                      RuntimeWarning, stacklevel=3)
        return False
