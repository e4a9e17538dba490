"""Residual stores of the FSDP reduce-scatter, keyed per (parameter, destination row): dense
(fp32 / bf16 / fp16, the engine's ResidualMemory) or blockwise codes (``int8`` ... ``int2``)."""
from __future__ import annotations

import re
from typing import Dict, Optional

import torch

from ...codecs import Layout, make_codec
from ...error_feedback import ResidualMemory

ROW_STRIDE = 1 << 16    # virtual residual key of (parameter k, row r): k * ROW_STRIDE + r
MODULE_KEY_BASE = 1 << 30  # fallback keys (one flat residual per FSDP module), see QuantizedReduceScatter


def residual_kind(residual_dtype):
    """(name, dtype or None, bits or None) for the ``residual_dtype`` option."""
    if residual_dtype is None:
        return "fp32", torch.float32, None
    dense = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if isinstance(residual_dtype, torch.dtype):
        for name, dt in dense.items():
            if dt == residual_dtype:
                return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name, name), dt, None
    if isinstance(residual_dtype, str):
        if residual_dtype in dense:
            dt = dense[residual_dtype]
            return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dt], dt, None
        m = re.fullmatch(r"int([2-8])", residual_dtype)
        if m:
            return residual_dtype, None, int(m.group(1))
    raise ValueError(f"residual_dtype must be None / 'fp32', 'bf16', 'fp16' or 'int8' ... 'int2' (blockwise codes), "
                     f"got {residual_dtype!r}")


class DenseResiduals:
    """fp32 (the encoder writes the next residual straight into the staging buffer) or bf16/fp16
    (written to an fp32 scratch, then rounded into staging)."""

    def __init__(self, dtype, immediate: bool = False):
        self.dtype, self.immediate = dtype, immediate
        self.memory = ResidualMemory()
        self._scratch: Optional[torch.Tensor] = None
        self._live: Optional[torch.Tensor] = None  # the buffer of the module being exchanged

    def add_to(self, x, sig, numels):
        # a module's signature changes whenever one of its parameters is unused in a step, and an
        # older one may come back: ResidualMemory rebuilds such a stale buffer itself
        self._live = self.memory.bucket_residual(sig, numels, x.device, self.dtype)
        x.add_(self._live)

    def err_buffer(self, sig, numel, device):
        if self.dtype == torch.float32 and not self.immediate:
            return self.memory.staging(sig)
        if self._scratch is None or self._scratch.numel() < numel or self._scratch.device != device:
            self._scratch = torch.empty(numel, dtype=torch.float32, device=device)
        return self._scratch[:numel]

    def stage(self, sig, err, bad):
        if self.immediate:  # this module's residual now, unless some rank's input was not finite
            res = self._live
            res.copy_(torch.where(bad, res.float() if res.dtype != torch.float32 else res, err, out=err))
            return
        st = self.memory.staging(sig)
        if st.data_ptr() != err.data_ptr():
            st.copy_(err)

    def commit(self, sigs):
        self.memory.commit(sigs)

    def residuals(self):
        return {k: v.float() for k, v in self.memory.residuals().items()}

    def load(self, residuals):
        self.memory.load(residuals)

    def nbytes(self):
        return self.memory.nbytes()


class CodedResiduals:
    """Residuals held as blockwise min-max codes (the ``uniform`` codec, round to nearest, blocks
    never straddle two parameter rows).  What the rounding of the residual loses is lost."""

    def __init__(self, bits: int, block_size: int, immediate: bool = False):
        self.immediate = immediate
        self.codec = make_codec("uniform", bits, block_size=block_size)
        self._bodies: Dict[tuple, torch.Tensor] = {}
        self._staging: Dict[tuple, torch.Tensor] = {}
        self._layouts: Dict[tuple, Layout] = {}
        self._where: Dict[int, tuple] = {}       # virtual key -> signature holding it
        self._pending: Dict[int, torch.Tensor] = {}
        self._scratch: Optional[torch.Tensor] = None

    def _fp32(self, numel, device):
        if self._scratch is None or self._scratch.numel() < numel or self._scratch.device != device:
            self._scratch = torch.empty(numel, dtype=torch.float32, device=device)
        return self._scratch[:numel]

    def _decoded(self, sig) -> torch.Tensor:
        layout = self._layouts[sig]
        out = torch.empty(layout.numel, dtype=torch.float32, device=self._bodies[sig].device)
        return self.codec.decode([self._bodies[sig]], layout, out)

    def _build(self, sig, numels, device):
        layout = Layout(numels, [k // ROW_STRIDE if k < MODULE_KEY_BASE else k for k in sig])
        buf = torch.zeros(layout.numel, dtype=torch.float32, device=device)
        decoded_old: Dict[tuple, torch.Tensor] = {}
        off = 0
        for key, n in zip(sig, numels):
            src = None
            if key in self._where:
                old = self._where[key]
                if old not in decoded_old:
                    decoded_old[old] = self._decoded(old)
                o = 0
                for k2, n2 in zip(old, self._layouts[old].param_numels):
                    if k2 == key:
                        src = decoded_old[old][o:o + n2]
                        break
                    o += n2
            elif key in self._pending:
                src = self._pending.pop(key)
            if src is not None:
                if src.numel() != n:
                    raise RuntimeError(f"error feedback: residual {key} has {src.numel()} elements, expected {n}")
                buf[off:off + n].copy_(src.reshape(-1))
            self._where[key] = sig
            off += n
        for old in decoded_old:
            if not any(s == old for s in self._where.values()):
                for d in (self._bodies, self._staging, self._layouts):
                    d.pop(old, None)
        body = torch.zeros(self.codec.body_nbytes(layout), dtype=torch.uint8, device=device)
        self.codec.encode(buf, body, layout)
        self._bodies[sig], self._layouts[sig] = body, layout

    def add_to(self, x, sig, numels):
        if sig in self._bodies and any(self._where.get(k, sig) != sig for k in sig):
            dec, o = self._decoded(sig), 0  # stale: some of its parameters moved since
            for k, n in zip(sig, self._layouts[sig].param_numels):
                if self._where.get(k) == sig:
                    del self._where[k]
                    self._pending[k] = dec[o:o + n].clone()
                o += n
            for d in (self._bodies, self._staging, self._layouts):
                d.pop(sig, None)
        if sig not in self._bodies:
            self._build(sig, numels, x.device)
        tmp = self._fp32(x.numel(), x.device)
        x.add_(self.codec.decode([self._bodies[sig]], self._layouts[sig], tmp))

    def err_buffer(self, sig, numel, device):
        return self._fp32(numel, device)

    def stage(self, sig, err, bad):
        if self.immediate:
            if not bool(bad):  # one host read per module in this mode
                self.codec.encode(err, self._bodies[sig], self._layouts[sig])
            return
        st = self._staging.get(sig)
        if st is None:
            st = self._staging[sig] = torch.empty_like(self._bodies[sig])
        self.codec.encode(err, st, self._layouts[sig])

    def commit(self, sigs):
        for sig in sigs:
            if sig in self._bodies and sig in self._staging:
                self._bodies[sig], self._staging[sig] = self._staging[sig], self._bodies[sig]

    def residuals(self):
        out = {k: v for k, v in self._pending.items()}
        for sig in self._bodies:
            dec, o = self._decoded(sig), 0
            for k, n in zip(sig, self._layouts[sig].param_numels):
                out[k] = dec[o:o + n]
                o += n
        return out

    def load(self, residuals):
        for d in (self._bodies, self._staging, self._layouts, self._where):
            d.clear()
        self._pending = {int(k): v.detach().reshape(-1).float().clone() for k, v in residuals.items()}

    def nbytes(self):
        return sum(b.numel() for b in self._bodies.values()), sum(b.numel() for b in self._staging.values())

