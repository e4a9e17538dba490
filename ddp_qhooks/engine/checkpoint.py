"""Checkpoints of a state: ``state_dict`` / ``load_state_dict`` (own rank, or every rank's with
redistribution at another world size) and pickling."""
from __future__ import annotations

import warnings
from typing import Dict

import torch
import torch.distributed as dist

from ..exchange import collectives
from .accounting import TOTALS

STATE_FORMAT = 1
# what a state's ``_resolve_name(state, name)`` returns for a residual it recognises but cannot place
# (and has warned about): it is left out; None means the name is unknown (an error)
UNPLACEABLE = -1
# rebuilt at run time, never pickled
_TRANSIENT = ("process_group", "_plans", "memory", "server_memory", "_param_key", "_lock", "_strategies",
              "_completion", "_optimizer", "_full_plans", "_warmup_strategies", "_warmup_used",
              "_resolve_name")


class Checkpointing:
    """Mixin of :class:`~ddp_qhooks.QuantizedHookState`: its checkpoints."""

    def state_dict(self) -> dict:
        """Residuals (by parameter name), step counter and seed (= the RNG state), config, counters."""
        residuals = {self._name_of(k): v.detach().to("cpu", copy=True) for k, v in self.memory.residuals().items()}
        server = {self._name_of(k): v.detach().to("cpu", copy=True) for k, v in self.server_memory.residuals().items()}
        return {
            "format": STATE_FORMAT,
            "codec": dict(self.codec.config()),
            "error_feedback": self.error_feedback,
            "seed": self.seed,
            "step": self.step,
            "world_size": self._world_size(),
            "rank": collectives.rank(self.process_group) if dist.is_initialized() else 0,
            "residuals": residuals,
            "server_residuals": server,
            "exchange": self.exchange,
            "totals": dict(self._totals),
            # per-rank running state of stateful codecs (k-means codebooks, adaptive ranges)
            "codec_state": self.codec.state_dict() if hasattr(self.codec, "state_dict") else {},
            **({"worker_momentum": {self._name_of(k): v for k, v in self.worker_momentum.state_dict().items()}}
               if self.worker_momentum is not None else {}),
        }

    def load_state_dict(self, state_dict) -> None:
        """Restore residuals, step and seed, e.g. into the state of a NEW DDP model after a restart.

        ``state_dict`` is this rank's own ``state_dict()`` from the checkpoint, or the list of EVERY
        rank's (any order), which also works when the world size changed.  Residuals are matched to
        parameters by name (or ``param<i>`` without a module) and their sizes are checked against
        the model when a module was given.

        At another world size than the one saved (with the process group initialised):

        * given every rank's state dict, the residuals are **redistributed**: every rank gets the
          pending correction of the old run, ``sum(worker residuals) / W_old + sum(server
          residuals)``, so the next averaged gradient receives exactly the correction it would have
          received without the restart;
        * given one state dict, the residuals are **reset** to zero (one rank's residual is only
          1/W of the correction and belongs to a rank that may not exist any more).

        Either way a warning says which.  The step counter, seed and codec state are kept.
        """
        if isinstance(state_dict, (list, tuple)):
            return self._load_every_rank(list(state_dict))
        self._check_format(state_dict)
        residuals = self._residuals_by_key(state_dict["residuals"])
        server = self._residuals_by_key(state_dict.get("server_residuals", {}))
        saved_w = state_dict.get("world_size")
        if saved_w and dist.is_initialized() and saved_w != self._world_size():
            warnings.warn(f"ddp_qhooks: hook state saved at world size {saved_w}, loaded at {self._world_size()}: "
                          "error-feedback residuals RESET to zero (one rank's residuals cannot be redistributed; pass "
                          "the list of every rank's state_dict() to load_state_dict to redistribute them)", stacklevel=2)
            residuals, server = {}, {}
        else:
            saved_rank = state_dict.get("rank")
            if saved_rank is not None and dist.is_initialized() and saved_rank != collectives.rank(self.process_group):
                warnings.warn(f"ddp_qhooks: rank {collectives.rank(self.process_group)} loads the hook state of rank "
                              f"{saved_rank}; residuals differ per rank, so each rank should save and load its own "
                              "state_dict()", stacklevel=2)
        self._restore(state_dict, residuals, server)

    def _load_every_rank(self, state_dicts: list) -> None:
        if not state_dicts:
            raise ValueError("load_state_dict got an empty list; pass every rank's state_dict()")
        for sd in state_dicts:
            self._check_format(sd)
        saved_w = len(state_dicts)
        ranks = sorted(int(sd.get("rank", -1)) for sd in state_dicts)
        sizes = {sd.get("world_size") for sd in state_dicts}
        if ranks != list(range(saved_w)) or sizes - {saved_w, 0, None}:
            raise ValueError(f"load_state_dict needs exactly one state_dict per rank of the saved run: got ranks {ranks} "
                             f"saved at world size(s) {sorted(sizes, key=str)}")
        steps = {int(sd["step"]) for sd in state_dicts}
        if len(steps) != 1:
            raise ValueError(f"the ranks' hook states are from different steps {sorted(steps)}: not one checkpoint")
        by_rank = {int(sd["rank"]): sd for sd in state_dicts}
        me = collectives.rank(self.process_group) if dist.is_initialized() else 0
        w = self._world_size() if dist.is_initialized() else saved_w
        if w == saved_w:
            own = by_rank[me]
            self._restore(own, self._residuals_by_key(own["residuals"]),
                          self._residuals_by_key(own.get("server_residuals", {})))
            return
        pending: Dict[int, torch.Tensor] = {}
        for sd in state_dicts:
            for key, r in self._residuals_by_key(sd["residuals"]).items():
                acc = pending.setdefault(key, torch.zeros(r.numel(), dtype=torch.float64))
                acc.add_(r.reshape(-1).double(), alpha=1.0 / saved_w)
            for key, r in self._residuals_by_key(sd.get("server_residuals", {})).items():
                pending.setdefault(key, torch.zeros(r.numel(), dtype=torch.float64)).add_(r.reshape(-1).double())
        warnings.warn(f"ddp_qhooks: hook state saved at world size {saved_w}, loaded at {w}: error-feedback residuals "
                      f"REDISTRIBUTED (every rank holds the old run's pending correction: the mean of the {saved_w} "
                      "worker residuals plus the server residuals)", stacklevel=3)
        self._restore(by_rank.get(me, by_rank[0]), {k: v.float() for k, v in pending.items()}, {})

    @staticmethod
    def _check_format(state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_FORMAT:
            got = state_dict.get("format") if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(f"unsupported hook state format {got!r} (expected {STATE_FORMAT})")

    def _restore(self, state_dict: dict, residuals: dict, server: dict) -> None:
        if dict(state_dict["codec"]) != self.codec.config():
            warnings.warn(f"ddp_qhooks: loading hook state saved with {state_dict['codec']} into {self.codec.config()}; "
                          "residuals are kept (they are gradient-space errors)", stacklevel=3)
        if bool(state_dict["error_feedback"]) != self.error_feedback:
            warnings.warn(f"ddp_qhooks: checkpoint was saved with error_feedback={state_dict['error_feedback']}; "
                          f"keeping this state's error_feedback={self.error_feedback}", stacklevel=3)
        self.memory.load(residuals)
        # a server residual outside this rank's shards (other world size or bucket layout) is moved
        # into the worker residual when its bucket is first seen: nothing is dropped
        self.server_memory.load(server)
        if self.worker_momentum is not None:
            self.worker_momentum.load_state_dict(self._residuals_by_key(state_dict.get("worker_momentum", {})))
        if state_dict.get("codec_state") and hasattr(self.codec, "load_state_dict"):
            if dict(state_dict["codec"]) == self.codec.config():
                self.codec.load_state_dict(state_dict["codec_state"])
            else:
                warnings.warn("ddp_qhooks: the codec's running state (codebooks / ranges) is not loaded: it was saved "
                              "for another codec configuration", stacklevel=3)
        self.step = int(state_dict["step"])
        self.seed = int(state_dict["seed"])
        self._totals.update({k: int(v) for k, v in state_dict.get("totals", {}).items() if k in self._totals})

    def _residuals_by_key(self, named: dict) -> dict:
        by_name = {v: k for k, v in self._param_names.items()}
        resolve = getattr(self, "_resolve_name", None)  # an integration's names made on demand
        residuals = {}
        for name, tensor in named.items():
            if by_name:
                key = by_name.get(name)
                if key is None and resolve is not None:
                    key = resolve(self, name)
                if key is None:
                    raise ValueError(f"hook state has a residual for {name!r}, which is not a parameter of the model")
                if key == UNPLACEABLE:
                    continue
                if tensor.numel() != self._param_numels[key]:
                    raise ValueError(f"residual for {name!r} has {tensor.numel()} elements, the parameter has {self._param_numels[key]}")
            elif name.startswith("param") and name[5:].isdigit():
                key = int(name[5:])
            else:
                raise ValueError(f"residual {name!r} is keyed by parameter name: create the state with module=...")
            residuals[key] = tensor
        return residuals

    def __getstate__(self):
        """Picklable like ``PowerSGDState``: the process group, the exchange plans and the completion
        thread are dropped (rebuilt at the first step); residuals travel as CPU tensors by key."""
        state = {k: v for k, v in self.__dict__.items() if k not in _TRANSIENT}
        state["_residuals"] = {k: v.detach().cpu().clone() for k, v in self.memory.residuals().items()}
        state["_server_residuals"] = {k: v.detach().cpu().clone() for k, v in self.server_memory.residuals().items()}
        return state

    def __setstate__(self, state):
        residuals = state.pop("_residuals")
        server = state.pop("_server_residuals", {})
        self.__dict__.update(state)
        # a state pickled by an older version lacks the newer counters and per-step fields
        self._totals = {**dict.fromkeys(TOTALS, 0), **self._totals}
        self._new_step()
        self.process_group = None
        self._param_key = {}
        self._needs_bind = bool(self._param_names)
        self._agreed = False
        self._init_runtime()
        self.memory.load(residuals)
        self.server_memory.load(server)
