"""Optional fused kernels for the quantizers' hot loop (``compile=True``), built by torch.compile.

Eager torch/numpy needs separate passes per chunk (the affine op, the float->uint8 cast, the
packing); one compiled kernel does ``codes = trunc(window + (x - shift) * inv)`` in a single
vectorised loop, and for the planar widths (1, 2, 4 bits, see packing.py) it also ORs the ``8/b``
planes of a stripe into packed bytes, so the float input is read once and only packed bytes are
written.  Opt-in because the first call compiles (seconds, needs a C++ compiler); any failure warns
once and falls back to the eager path for good.
"""
from __future__ import annotations

import threading
import warnings

import torch

_lock = threading.Lock()
_kernels: dict = {}
_broken = False


def _affine_to_codes(xc, rounding, bias, shift, inv, out):
    out.copy_(((rounding + bias) + (xc - shift) * inv).to(torch.int32))


def _planar_kernel(bits: int):
    k = 8 // bits

    def affine_to_planar(xs, rounding, bias, shift, inv, out):
        # xs: (stripes, k, ...) planes; out: (stripes, ...) packed bytes.  Codes are formed per
        # plane (not once for all of xs and then sliced): that keeps them out of memory, in one loop.
        def code(plane):
            return ((rounding + bias) + (plane - shift) * inv).to(torch.int32)
        acc = code(xs[:, 0])
        for p in range(1, k):
            acc = acc | (code(xs[:, p]) << (p * bits))
        out.copy_(acc)
    return affine_to_planar


def _sign_kernel(with_error: bool):
    def sign_planar(xs, scale, out, err):
        # xs: (stripes, 8, m) planes of one stripe each; bit p of out[s, j] is xs[s, p, j] < 0.
        # The comparison is repeated, not shared: a shared bool tensor gets materialized (2.4x slower)
        acc = (xs[:, 0] < 0).to(torch.int32)
        for p in range(1, 8):
            acc = acc | ((xs[:, p] < 0).to(torch.int32) << p)
        out.copy_(acc)
        if with_error:  # the residual x - (-a if negative else +a), one rounding as in the decoder
            err.copy_(xs - torch.where(xs < 0, -scale, scale))
    return sign_planar


def sign_planar(xs: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, err: torch.Tensor | None) -> bool:
    """Sign bits of ``xs`` (shape ``(stripes, 8, m)``) packed into ``out`` (``(stripes, m)``; plane p
    at bit p), and with ``err`` the residual ``x - a * (+-1)`` for the 0-d float32 ``scale`` a."""
    return _run_plain(("sign", err is not None), lambda: _sign_kernel(err is not None), xs, scale, out, err)


def _run_plain(name, make, *args) -> bool:
    """Compile ``make()`` once per ``name`` and run it on ``args``; False (and a warning, once) when
    compilation is unavailable, and from then on without trying again."""
    global _broken
    if _broken:
        return False
    try:
        with _lock:  # compilation (and dynamo's caches) are not meant for concurrent first calls
            kernel = _kernels.get(name)
            if kernel is None:
                kernel = _kernels[name] = torch.compile(make(), dynamic=True, fullgraph=True)
        kernel(*args)
        return True
    except Exception as exc:  # no compiler, unsupported platform, ...: stay correct, just slower
        _broken = True
        warnings.warn(f"ddp_qhooks: compile=True unavailable ({type(exc).__name__}: {exc}); using the eager path",
                      RuntimeWarning, stacklevel=4)
        return False


def _run(name, make, x, rounding, bias: float, shift: float, inv: float, out) -> bool:
    # scalars travel as 0-d tensors so that new ranges do not trigger recompiles
    scalars = (torch.tensor(v, dtype=torch.float32) for v in (bias, shift, inv))
    return _run_plain(name, make, x, rounding, *scalars, out)


def affine_to_codes(xc: torch.Tensor, rounding: torch.Tensor, bias: float, shift: float, inv: float,
                    out: torch.Tensor) -> bool:
    """``out = trunc(rounding + bias + (xc - shift) * inv)`` as uint8 (``rounding`` broadcasts over
    the last dimension); False when the compiled kernel is unavailable."""
    return _run("codes", lambda: _affine_to_codes, xc, rounding, bias, shift, inv, out)


def affine_to_planar(xs: torch.Tensor, rounding: torch.Tensor, bias: float, shift: float, inv: float,
                     out: torch.Tensor, bits: int) -> bool:
    """Codes as in :func:`affine_to_codes` for ``xs`` of shape ``(stripes, 8/bits, ...)``, packed into
    ``out`` of shape ``(stripes, ...)``: plane ``p`` at bit offset ``p*bits``."""
    return _run(("planar", bits), lambda: _planar_kernel(bits), xs, rounding, bias, shift, inv, out)
