"""Checkpoints of the FSDP state: residuals by parameter name (the world-size independent flat
unsharded shape), own rank or every rank's with redistribution at another world size."""
from __future__ import annotations

import warnings
from typing import Dict

import torch
import torch.distributed as dist

from .residuals import MODULE_KEY_BASE, ROW_STRIDE

STATE_FORMAT = 1


class Checkpointing:
    """Mixin of :class:`~ddp_qhooks.fsdp.FSDPQuantState`: its checkpoints."""

    def state_dict(self) -> dict:
        """Residuals by parameter name (fp32, the parameter's flat unsharded local gradient shape;
        ``<module>#flat`` for a module-level residual), step, seed, config, counters."""
        rows: Dict[int, Dict[int, torch.Tensor]] = {}
        named: Dict[str, torch.Tensor] = {}
        for vkey, t in self.store.residuals().items() if self.error_feedback else ():
            if vkey >= MODULE_KEY_BASE:
                idx = vkey - MODULE_KEY_BASE
                fqn = self.comms[idx].module_fqn if idx < len(self.comms) else str(idx)
                named[f"{fqn}#flat"] = t.detach().to("cpu", torch.float32, copy=True)
            else:
                rows.setdefault(vkey // ROW_STRIDE, {})[vkey % ROW_STRIDE] = t
        for key, parts in rows.items():
            n, _, w = self._geometry[key]
            flat = torch.cat([parts[r].detach().reshape(-1).float().cpu() for r in range(w) if r in parts])
            if len(parts) != w:
                raise RuntimeError(f"residual of {self._names[key]!r} is incomplete ({len(parts)} of {w} rows)")
            named[self._names[key]] = flat[:n].clone()
        return {
            "format": STATE_FORMAT,
            "kind": "fsdp",
            "codec": dict(self.codec.config()),
            "error_feedback": self.error_feedback,
            "residual_dtype": self.residual_kind,
            "seed": self.seed,
            "step": self.step,
            "world_size": self._world(),
            "rank": dist.get_rank(self.process_group) if dist.is_initialized() else 0,
            "residuals": named,
            "totals": dict(self._totals),
        }

    def _world(self) -> int:
        return dist.get_world_size(self.process_group) if dist.is_initialized() else 1

    def load_state_dict(self, state_dict) -> None:
        """Restore residuals, step and seed (after a restart: ``register`` on the new model first).

        Pass this rank's own ``state_dict()``; or the list of every rank's, which also works at
        another world size (every rank then holds the old run's pending correction, the mean of
        the old ranks' residuals).  One rank's dict at another world size resets the residuals
        (with a warning): it is only 1/W of the correction."""
        if isinstance(state_dict, (list, tuple)):
            sds = list(state_dict)
            for sd in sds:
                self._check(sd)
            if len(sds) == self._world():
                me = dist.get_rank(self.process_group) if dist.is_initialized() else 0
                own = [sd for sd in sds if sd.get("rank") == me]
                if len(own) == 1:
                    return self._restore(own[0], own[0]["residuals"])
            mean: Dict[str, torch.Tensor] = {}
            for sd in sds:
                for name, t in sd["residuals"].items():
                    mean.setdefault(name, torch.zeros(t.numel(), dtype=torch.float64)).add_(
                        t.reshape(-1).double(), alpha=1.0 / len(sds))
            warnings.warn(f"ddp_qhooks.fsdp: residuals of {len(sds)} ranks REDISTRIBUTED at world size "
                          f"{self._world()} (every rank holds their mean)", stacklevel=2)
            return self._restore(sds[0], {k: v.float() for k, v in mean.items()})
        self._check(state_dict)
        residuals = state_dict["residuals"]
        if state_dict.get("world_size") not in (None, self._world()):
            warnings.warn(f"ddp_qhooks.fsdp: state saved at world size {state_dict['world_size']}, loaded at "
                          f"{self._world()}: residuals RESET (pass every rank's state_dict() to redistribute)",
                          stacklevel=2)
            residuals = {}
        self._restore(state_dict, residuals)

    @staticmethod
    def _check(sd) -> None:
        if not isinstance(sd, dict) or sd.get("format") != STATE_FORMAT or sd.get("kind") != "fsdp":
            raise ValueError("not a ddp_qhooks.fsdp state_dict (format/kind differ)")

    def _restore(self, sd: dict, named: dict) -> None:
        if dict(sd["codec"]) != self.codec.config():
            warnings.warn(f"ddp_qhooks.fsdp: loading residuals saved with {sd['codec']} into {self.codec.config()}",
                          stacklevel=3)
        by_name = {n: k for k, n in self._names.items()}
        by_module = {f"{c.module_fqn}#flat": MODULE_KEY_BASE + c.index for c in self.comms}
        pending: Dict[int, torch.Tensor] = {}
        for name, t in named.items():
            t = t.detach().reshape(-1).float()
            if name in by_module:
                pending[by_module[name]] = t
                continue
            key = by_name.get(name)
            if key is None or key not in self._geometry:
                raise ValueError(f"residual for {name!r}, which is not a sharded trainable parameter of the model")
            n, P, w = self._geometry[key]
            if t.numel() != n:
                raise ValueError(f"residual for {name!r} has {t.numel()} elements, the parameter has {n}")
            padded = torch.zeros(P * w, dtype=torch.float32)
            padded[:n] = t
            for r in range(w):
                pending[key * ROW_STRIDE + r] = padded[r * P:(r + 1) * P]
        if self.error_feedback:
            self.store.load(pending)
        self.step = int(sd["step"])
        self.seed = int(sd["seed"])
        self._totals.update({k: int(v) for k, v in sd.get("totals", {}).items() if k in self._totals})

