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
import types
import warnings

import torch

from .packing import STRIPE

_lock = threading.Lock()
_kernels: dict = {}
_broken = False
_FMA = {"cpp.enable_floating_point_contract_flag": "fast"}


def _affine_code(xc, params, rounding):
    # params: (bias, shift, inv, lo, step)
    return ((rounding + params[0]) + (xc - params[1]) * params[2]).to(torch.int32)


def _affine_error(xc, code, params):
    # the residual as the eager path forms it: (x - lo) first, then minus code * step
    return (xc - params[3]) - code.to(torch.float32) * params[4]


def _sq_sums(e, x):
    e64, x64 = e.double(), x.double()  # float64 squares: no overflow or underflow
    if x.dim() > 1:  # row sums first (2.6x faster here)
        return (e64 * e64).sum(-1).sum(), (x64 * x64).sum(-1).sum()
    return (e64 * e64).sum(), (x64 * x64).sum()


# Kernels parameterised by a function (a codec's per-value arithmetic) are templates whose
# parameters are globals of a copy (:func:`_instantiate`): reached through a closure cell instead,
# the traced kernel came out 2.4x slower (torch 2.13).
def _unit_encode_template(xs, scale, dither, out, err):
    # xs: (stripes, PLANES, ...) planes of one stripe each; out: (stripes, ...) packed bytes, plane
    # p at bit offset p*BITS.  Codes are formed per plane (a shared tensor would be materialized).
    acc = code_of(xs[:, 0], scale, dither)[0]  # noqa: F821 (a global of the instance)
    for p in range(1, PLANES):  # noqa: F821
        acc = acc | (code_of(xs[:, p], scale, dither)[0] << (p * BITS))  # noqa: F821
    out.copy_(acc)
    if not WITH_ERROR:  # noqa: F821
        return None
    # the residual x - unit * a, one rounding as in the decoder; squared sums in float64 (a float32
    # square can overflow or underflow) in the same loop
    e = xs - code_of(xs, scale, dither)[1]  # noqa: F821
    err.copy_(e)
    e64, x64 = e.double(), xs.double()
    return (e64 * e64).sum(), (x64 * x64).sum()


def _unit_decode_template(codes, share, out):
    # unit_of works on float codes: bit tricks on uint8 compile to slow scalar code here.  The
    # product unit * share is exact (+-share or 0), so out + unit * share rounds once, as the eager
    # addcmul_ does
    v = unit_of(codes.to(torch.float32)) * share  # noqa: F821
    out.copy_(out + v if ACCUMULATE else v)  # noqa: F821


def _table_codes_template(x, scale, rnd, out):
    out.copy_(code_of(x, scale, rnd))  # noqa: F821


def _table_rows_template(xs, scale, rnd, outs):
    # xs: (groups, len(outs), window) rows that all take the dither window rnd; outs: the code views
    # of xs[:, p].  One loop over (groups, window) serves len(outs) rows per load of rnd
    for p, out in enumerate(outs):
        out.copy_(code_of(xs[:, p], scale, rnd))  # noqa: F821 (a global of the instance)


def _table_planar_template(parts, scale, rnd, outs):
    # parts[i]: (stripes, PLANES, ...); outs[i]: (stripes, ...) packed bytes, plane p at bit offset
    # p*BITS.  Several parts (whole stripes, a shorter last one) in one call: a call costs ~0.1 ms
    for xs, out in zip(parts, outs):
        acc = code_of(xs[:, 0], scale, rnd)  # noqa: F821 (a global of the instance)
        for p in range(1, PLANES):  # noqa: F821
            acc = acc | (code_of(xs[:, p], scale, rnd) << (p * BITS))  # noqa: F821
        out.copy_(acc)


def _value_decode_template(codes, scale, out):
    v = value_of(codes.to(torch.int32)) * scale  # noqa: F821
    out.copy_(out + v if ACCUMULATE else v)  # noqa: F821


def _table_residual_template(x, scale, rnd, err):
    # the codes again by code_of (the codes kernels' arithmetic), the residual error_of forms from
    # them, and the float64 squared sums of it and of x, in one pass
    e = error_of(x, code_of(x, scale, rnd), scale)  # noqa: F821 (globals of the instance)
    err.copy_(e)
    return _sq_sums(e, x)


def _table_residual_rows_template(xs, scale, rnd, errs):
    # xs: (groups, len(errs), window) rows that all take the dither window rnd (see table_rows)
    total_e = total_x = 0.0
    for p, err in enumerate(errs):
        x = xs[:, p]
        e = error_of(x, code_of(x, scale, rnd), scale)  # noqa: F821 (globals of the instance)
        err.copy_(e)
        sums = _sq_sums(e, x)
        total_e, total_x = total_e + sums[0], total_x + sums[1]
    return total_e, total_x


def _value_residual_template(x, codes, scale, err):
    # the residual x - decode(codes) as the eager path forms it (the decoded value rounded first),
    # and the float64 squared sums of it and of x, in one pass
    e = x - value_of(codes.to(torch.int32)) * scale  # noqa: F821 (a global of the instance)
    err.copy_(e)
    return _sq_sums(e, x)


def _instantiate(template, **params):
    """``template`` with ``params`` as globals (:func:`_call` gives it a code object of its own)."""
    return types.FunctionType(template.__code__, {**template.__globals__, **params}, template.__name__)


def _abs_sum64(x):
    return x.abs().sum(dtype=torch.float64)


def _sum_sq64(x):
    x64 = x.double()  # squares of float32 values neither overflow nor underflow in float64
    return (x64 * x64).sum()


def unit_encode(name: str, code_of, bits: int, xs: torch.Tensor, scale: torch.Tensor, dither, out: torch.Tensor,
                err: torch.Tensor | None):
    """Codes of a block-scaled codec (units in {-1, 0, +1} times one scale) for ``xs`` of shape
    ``(stripes, 8/bits, ...)``, packed into ``out`` (``(stripes, ...)``; plane p at bit offset
    ``p*bits``).  ``code_of(plane, scale, dither)`` gives ``(int32 code, float32 unit * scale)``.
    With ``err``: writes the residual and returns its float64 squared sum and the input's.
    Returns False when compilation is unavailable, None without ``err``."""
    ok, sums = _call(("unit", name, code_of, bits, err is not None),
                     lambda: _instantiate(_unit_encode_template, code_of=code_of, BITS=bits, PLANES=8 // bits,
                                          WITH_ERROR=err is not None),
                     xs, scale, dither, out, err)
    return sums if ok else False


def unit_decode(name: str, unit_of, codes: torch.Tensor, share: torch.Tensor, out: torch.Tensor,
                accumulate: bool) -> bool:
    """``out = (out +) unit_of(float codes) * share`` for the uint8 ``codes``; False when compilation
    is unavailable."""
    return _call(("unit-decode", name, unit_of, accumulate),
                 lambda: _instantiate(_unit_decode_template, unit_of=unit_of, ACCUMULATE=accumulate),
                 codes, share, out)[0]


def table_codes(code_of, x: torch.Tensor, scale: torch.Tensor, rnd: torch.Tensor, out: torch.Tensor,
                fma: bool = False) -> bool:
    """``out = code_of(x, scale, rnd)`` (uint8 codes; ``rnd``: the dither window, broadcast over the
    last dimension, or a 0-d tensor); False when compilation is unavailable.  ``fma=True`` lets the
    C++ compiler contract ``a * b + c`` into fused multiply-adds (one rounding instead of two): only
    for arithmetic that is not meant to be bitwise the eager one."""
    # one compiled function per argument form (dynamo compiles at most 8 variants of a function)
    return _call(("table-codes", code_of, fma, x.dim(), rnd.dim(), x.dim() > 1 and x.shape[0] == 1),
                 lambda: _instantiate(_table_codes_template, code_of=code_of),
                 x, scale, rnd, out, options=_FMA if fma else None)[0]


ROW_GROUP = 4  # rows per load of a dither window in :func:`table_rows`


def _row_groups(x: torch.Tensor, out: torch.Tensor):
    """The first ``whole`` rows of ``x`` (a multiple of ``ROW_GROUP``) as ``(groups, ROW_GROUP, w)``,
    the matching rows of ``out`` as ``ROW_GROUP`` separate ``(groups, w)`` views, and ``whole``."""
    whole, w = x.shape[0] // ROW_GROUP * ROW_GROUP, x.shape[1]
    outs = out[:whole].view(-1, ROW_GROUP, w)
    return x[:whole].view(-1, ROW_GROUP, w), tuple(outs[:, p] for p in range(ROW_GROUP)), whole


def table_rows(code_of, x: torch.Tensor, scale: torch.Tensor, rnd: torch.Tensor, out: torch.Tensor,
               fma: bool = False) -> bool:
    """:func:`table_codes` for ``x`` of shape ``(rows, len(rnd))``, every row taking the dither window
    ``rnd``, ``ROW_GROUP`` rows per loop iteration: one load of the window then serves several rows
    (a load per row, though the window stays in cache, cost as much as the rest of a pass: 1.6x)."""
    xs, outs, whole = _row_groups(x, out)
    if whole and not _call(("table-rows", code_of, fma), lambda: _instantiate(_table_rows_template, code_of=code_of),
                           xs, scale, rnd, outs, options=_FMA if fma else None)[0]:
        return False
    return whole == x.shape[0] or table_codes(code_of, x[whole:], scale, rnd, out[whole:], fma)


def table_planar(code_of, bits: int, parts: tuple, scale: torch.Tensor, rnd: torch.Tensor, outs: tuple,
                 fma: bool = False) -> bool:
    """:func:`table_codes` for each of ``parts`` of shape ``(stripes, 8/bits, ...)``, packed into the
    matching ``outs`` of shape ``(stripes, ...)``: plane ``p`` at bit offset ``p*bits``; one call for
    all of them (:func:`planar_parts` cuts a bucket into such parts)."""
    return _call(("table-planar", code_of, bits, fma, len(parts)),
                 lambda: _instantiate(_table_planar_template, code_of=code_of, BITS=bits, PLANES=8 // bits),
                 parts, scale, rnd, outs, options=_FMA if fma else None)[0]


def planar_parts(x: torch.Tensor, packed: torch.Tensor, bits: int, period: int):
    """The packing stripes of the 1-D ``x`` (starting on a stripe) as planes for :func:`table_planar`
    (packing.py's layout): the whole stripes as ``(stripes, 8/bits, STRIPE*bits/8)``, and the last,
    shorter stripe as ``(1, 8/bits, r*bits/8)`` when its planes are whole multiples of ``period``,
    with the views of ``packed`` they go to, and how many values of ``x`` they cover.  ``period``:
    the length of a dither window (which must divide a stripe's planes), 1 without one; above 1 the
    last dimension is cut into period-long rows, over which the window broadcasts."""
    k, n = 8 // bits, x.numel()
    stripes, m = n // STRIPE, STRIPE // k
    rows = (lambda t: t.view(*t.shape[:-1], -1, period)) if period > 1 else (lambda t: t)
    parts, outs = [], []
    if stripes:
        parts.append(rows(x[:stripes * STRIPE].view(stripes, k, m)))
        outs.append(rows(packed[:stripes * m].view(stripes, m)))
    tail, done = n - stripes * STRIPE, stripes * STRIPE
    if tail and tail % (k * period) == 0:
        parts.append(rows(x[done:].view(1, k, tail // k)))
        outs.append(rows(packed[done // k:done // k + tail // k].view(1, tail // k)))
        done = n
    return tuple(parts), tuple(outs), done


# A ``value_of`` marked ``gathers`` reads a table at the code.  Inductor vectorises such a read by
# widening the indices to int64 in a stack buffer and loading lane by lane; the plain scalar loop
# the C++ compiler makes without it is ~1.4x faster (mu-law 8-bit decode of 25 MiB: 3.6 vs 5.0 ms).
_GATHER_OPTIONS = {"cpp.simdlen": 1}


def _value_options(value_of):
    return _GATHER_OPTIONS if getattr(value_of, "gathers", False) else None


def value_decode(value_of, codes: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, accumulate: bool) -> bool:
    """``out = (out +) value_of(int32 codes) * scale``; False when compilation is unavailable."""
    return _call(("value-decode", value_of, accumulate),
                 lambda: _instantiate(_value_decode_template, value_of=value_of, ACCUMULATE=accumulate),
                 codes, scale, out, options=_value_options(value_of))[0]


def table_residual(code_of, error_of, x: torch.Tensor, scale: torch.Tensor, rnd: torch.Tensor, err: torch.Tensor):
    """``err = error_of(x, code_of(x, scale, rnd), scale)`` (the codes of :func:`table_codes` again, and
    ``x`` minus their value) and the float64 squared sums of ``err`` and ``x`` (0-d tensors); rows of
    ``x`` that all take the dither window ``rnd`` are handled ``ROW_GROUP`` per load of it.  None when
    compilation is unavailable."""
    xs, errs, whole = _row_groups(x, err) if rnd.dim() == 1 and x.dim() == 2 else (None, None, 0)
    total = (0.0, 0.0)
    if whole:
        ok, total = _call(("table-residual-rows", code_of, error_of),
                          lambda: _instantiate(_table_residual_rows_template, code_of=code_of, error_of=error_of),
                          xs, scale, rnd, errs)
        if not ok:
            return None
        if whole == x.shape[0]:
            return total
        x, err = x[whole:], err[whole:]
    ok, sums = _call(("table-residual", code_of, error_of, x.dim(), rnd.dim(), x.dim() > 1 and x.shape[0] == 1),
                     lambda: _instantiate(_table_residual_template, code_of=code_of, error_of=error_of),
                     x, scale, rnd, err)
    return (total[0] + sums[0], total[1] + sums[1]) if ok else None


def value_residual(value_of, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, err: torch.Tensor):
    """``err = x - value_of(int32 codes) * scale`` and the float64 squared sums of ``err`` and ``x``;
    None when compilation is unavailable."""
    ok, sums = _call(("value-residual", value_of),
                     lambda: _instantiate(_value_residual_template, value_of=value_of), x, codes, scale, err,
                     options=_value_options(value_of))
    return sums if ok else None


def sum_sq64(x: torch.Tensor):
    """``sum x^2`` accumulated in float64 (a 0-d tensor) in one read of ``x``, or None when
    compilation is unavailable."""
    ok, total = _call("sum-sq64", lambda: _sum_sq64, x)
    return total if ok else None


def abs_sum64(x: torch.Tensor):
    """``sum |x|`` accumulated in float64 (a 0-d tensor) in one read of ``x``, or None when compilation
    is unavailable."""
    ok, total = _call("abs-sum64", lambda: _abs_sum64, x)
    return total if ok else None


def _own_code(fn):
    """``fn`` with a code object of its own: dynamo keeps its compiled variants (and its recompile
    limit, 8) per code object, and the kernels made by one factory would otherwise share them."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _call(name, make, *args, options=None) -> tuple[bool, object]:
    """Compile ``make()`` once per ``name`` (with inductor ``options``) and run it on ``args``:
    ``(True, result)``, or ``(False, None)`` (and a warning, once) when compilation is unavailable,
    and from then on without trying again."""
    global _broken
    if _broken:
        return False, None
    try:
        with _lock:  # compilation (and dynamo's caches) are not meant for concurrent first calls
            kernel = _kernels.get(name)
            if kernel is None:
                kernel = torch.compile(_own_code(make()), dynamic=True, fullgraph=True, options=options)
                # the first call compiles.  Python float constants of a kernel (a codec's gain,
                # polynomial coefficients) become literals, not per-call inputs: with dynamic=True
                # dynamo would pass them as 0-d doubles, reloaded in the loop (the mu-law encoder
                # ran 1.4x slower).  Scalars that vary travel as 0-d tensors anyway.
                with torch._dynamo.config.patch(specialize_float=True):
                    result = kernel(*args)
                _kernels[name] = kernel
                return True, result
        return True, kernel(*args)
    except Exception as exc:  # no compiler, unsupported platform, ...: stay correct, just slower
        _broken = True
        warnings.warn(f"ddp_qhooks: compile=True unavailable ({type(exc).__name__}: {exc}); using the eager path",
                      RuntimeWarning, stacklevel=4)
        return False, None


def _affine_params(bias: float, shift: float, inv: float, lo: float = 0.0, step: float = 0.0) -> torch.Tensor:
    # a tensor, so that new ranges do not trigger recompiles
    return torch.tensor([bias, shift, inv, lo, step], dtype=torch.float32)


def affine_to_codes(xc: torch.Tensor, rounding: torch.Tensor, bias: float, shift: float, inv: float,
                    out: torch.Tensor) -> bool:
    """``out = trunc(rounding + bias + (xc - shift) * inv)`` as uint8 (``rounding`` broadcasts over
    the last dimension: a window over rows is loaded once per ``ROW_GROUP`` rows); False when the
    compiled kernel is unavailable."""
    codes = table_rows if rounding.dim() and xc.dim() == 2 else table_codes
    return codes(_affine_code, xc, _affine_params(bias, shift, inv), rounding, out)


def affine_to_planar(parts: tuple, rounding: torch.Tensor, bias: float, shift: float, inv: float, outs: tuple,
                     bits: int) -> bool:
    """Codes as in :func:`affine_to_codes` for each of ``parts`` of shape ``(stripes, 8/bits, ...)``,
    packed into ``outs`` as :func:`table_planar` does."""
    return table_planar(_affine_code, bits, parts, _affine_params(bias, shift, inv), rounding, outs)


def affine_residual(xc: torch.Tensor, rounding: torch.Tensor, bias: float, shift: float, inv: float, lo: float,
                    scale: float, err: torch.Tensor):
    """``err = (x - lo) - code * scale`` for the codes of :func:`affine_to_codes` (recomputed, same
    arithmetic), and the float64 squared sums of ``err`` and ``x``; None when compilation is
    unavailable."""
    return table_residual(_affine_code, _affine_error, xc, _affine_params(bias, shift, inv, lo, scale), rounding, err)
