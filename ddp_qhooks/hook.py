"""The DDP communication hook: state object, hook function and one-line ``register``.

Per bucket and step:

1. ``g' = g + e`` (error feedback, residual ``e`` of the bucket's parameters);
2. the codec encodes ``g'`` into ONE packed payload (header + body, see ``codecs/wire.py``) and
   writes the new residual ``e = g' - deq(q)``;
3. ONE asynchronous all-gather of the payloads (``exchange.py``);
4. in the future's callback every rank checks the headers, decodes the W payloads and returns their
   mean (DDP does not divide by the world size when a hook is registered).

With ``exchange="alltoall"`` (or ``"auto"`` choosing it) steps 2-4 become two phases: the bucket is
cut into W shards, each encoded separately and sent with one all-to-all to the rank owning it;
the owner decodes the W copies of its shard, averages them, adds its *server* residual, re-encodes
the mean (new server residual = what that encoding lost) and all-gathers it; every rank decodes
the W mean shards.  Bytes sent per rank: 2(W-1)/W x payload instead of (W-1) x payload (more
where the mean is re-encoded wider than the payload: sign / ternary means at 2 bits).

Usage (torch style, like ``powerSGD_hook``)::

    from ddp_qhooks import QuantizedHookState, quantized_allgather_hook
    state = QuantizedHookState(process_group=None, codec="stochastic", bits=4, module=ddp.module)
    ddp.register_comm_hook(state, quantized_allgather_hook)

or simply ``state = ddp_qhooks.register(ddp, codec="stochastic", bits=4)``.
"""
import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Set, Tuple

import torch
import torch.distributed as dist

from . import exchange
from .codecs import Layout, make_codec
from .codecs.base import EncodeInfo
from .codecs._random import splitmix64
from .codecs.wire import (
    FLAG_NONFINITE,
    HEADER_BYTES,
    WIRE_VERSION,
    fingerprint,
    header_bytes,
    parse_header,
    payload_nbytes,
)
from .error_feedback import ResidualMemory
from .worker_momentum import WorkerMomentum  # worker momentum (issue 21)
from .exchange import InOrder, check_exchange
from .exchange import check_agreement as _check_agreement  # register()'s `exchange` argument shadows the module

__all__ = ["QuantizedHookState", "quantized_allgather_hook", "register"]

STATE_FORMAT = 1
_log = logging.getLogger("ddp_qhooks")
DEFAULT_SERVER_BITS_LOW = 2  # re-encoded mean of sign / ternary codecs in the two-phase exchange (see _server_codec)


@dataclass
class _Shards:
    """Two-phase buffers of one bucket: W shard payloads of ``slot`` bytes each."""

    bounds: list            # (start, end) of each rank's shard in the bucket
    layouts: list           # Layout of each shard (pieces of the bucket's parameters)
    bodies: list            # body bytes of each shard's payload
    slot: int               # bytes per payload slot (the largest shard's payload)
    send: torch.Tensor      # W slots
    recv: torch.Tensor      # W copies of the own shard, one per rank
    mean_bodies: list       # body bytes of each shard's re-encoded mean (server codec)
    mean_slot: int          # bytes per re-encoded mean slot
    own_mean: torch.Tensor  # the own shard's re-encoded mean, one slot
    gathered: torch.Tensor  # W re-encoded mean shards
    mean: torch.Tensor      # float32 mean of the own shard


@dataclass
class _Bucket:
    """Buffers of one bucket layout, allocated once and reused every step."""

    layout: Layout
    body_nbytes: int
    payload: torch.Tensor
    gathered: torch.Tensor
    scratch: Optional[torch.Tensor]
    mode: str = "allgather"
    reason: str = ""
    shards: Optional[_Shards] = None
    chunks: Optional["_Chunks"] = None


@dataclass
class _Chunks:
    """Hierarchical buffers of one bucket: this rank's chunk of the node sum, its payload, the
    payloads of the same chunk from the other nodes, and the node's gathered mean chunks."""

    bounds: list            # (start, end) of each local rank's chunk
    layout: Layout          # this rank's chunk
    body: int
    payload: torch.Tensor   # one slot
    gathered: torch.Tensor  # one slot per node
    mean: torch.Tensor      # float32, the largest chunk's size (padding for the node all-gather)
    node_means: torch.Tensor  # float32, L x mean.numel()


class QuantizedHookState:
    """State of :func:`quantized_allgather_hook`.

    Args:
        process_group: the group to communicate in (``None``: the default group).
        codec: codec name, see ``ddp_qhooks.codecs.available()`` (``stochastic``, ``uniform``, ``qsgd``,
            ``log``, ``mulaw``, ``kmeans``, ``ternary``, ``sign``, ``adaptive``, ``topk``, ``fp16``,
            ``bf16``, ``none``).
        bits: bits per value for quantizing codecs, 1..8 (the valid range depends on the codec).
        error_feedback: keep per-parameter residuals and add them to the next step's gradient.
        seed: seeds stochastic rounding; randomness is keyed by (seed, rank, step) and, with
            ``block_size``, by parameter, so a resumed run repeats the same random choices (bitwise
            with ``block_size``; with one range per bucket results also depend on DDP's bucketing).
        module: the wrapped model (``ddp.module``).  Gives parameters stable identities (their index
            in ``module.parameters()``) and names in ``state_dict``.  Without it, parameters are
            numbered in the order the first hook calls see them, which is the same in every run of
            the same model.
        measure_error: compute the relative quantization error (NMSE) reported by :meth:`stats`.
        hold_unused_residuals: for DDP's ``find_unused_parameters=True`` (``register`` sets it from
            the model).  A parameter whose local gradient is exactly zero in a step (unused here)
            neither receives nor updates its residual that step: DDP discards the result for
            globally unused parameters, which would otherwise silently drop their residual.
        ranks_per_node: ranks per machine for ``exchange="hierarchical"`` (node n holds ranks
            n*L .. n*L+L-1, as torchrun and srun number them); default: torchrun's LOCAL_WORLD_SIZE.
        exchange: how payloads travel between ranks, one of ``ddp_qhooks.EXCHANGES``:
            ``"allgather"`` (every rank receives every other rank's payload; one quantization),
            ``"alltoall"`` (two-phase: bytes flat in W, a second quantization of the mean with its
            own server-side residual), ``"auto"`` (per bucket, whichever sends fewer bytes: at
            W = 2 always all-gather; hierarchical when several nodes each hold several ranks),
            ``"hierarchical"`` (full-precision allreduce inside each node, then each rank of a node
            exchanges its 1/L chunk of the node sum, quantized, with the same-numbered ranks of the
            other nodes; then the chunks are all-gathered inside the node).  The choice per bucket
            and why is in :meth:`stats`.
        server_bits: two-phase only: bits of the re-encoded mean of each shard.  Default: the
            codec's own bits, except sign and ternary, whose means are re-encoded by the
            deterministic ``uniform`` codec at 2 bits (1-bit re-encoding of a mean of signs costs
            accuracy; see ``_server_codec``).  With ``exchange="auto"`` a 1-bit mean keeps the
            all-gather.
        **codec_options: codec specific, e.g. ``block_size`` for ``uniform`` / ``stochastic``.

    The state is picklable (the process group is dropped, as in PowerSGD) and its
    :meth:`state_dict` holds only tensors and plain Python values, so it survives
    ``torch.save`` + ``torch.load(weights_only=True)``.
    """

    def __init__(self, process_group=None, codec: str = "stochastic", bits: int = 8, error_feedback: bool = True,
                 seed: int = 0, module: Optional[torch.nn.Module] = None, measure_error: bool = True,
                 hold_unused_residuals: bool = False, exchange: str = "auto", ranks_per_node: Optional[int] = None,
                 server_bits: Optional[int] = None, worker_momentum: Optional[float] = None, **codec_options):
        # >>> worker momentum (issue 21; to be ported by the lead): compress m = beta*m + g, not g
        self.worker_momentum = None if worker_momentum is None else WorkerMomentum(worker_momentum)
        # <<< worker momentum
        self.codec = make_codec(codec, bits, _extra_valid=("seed", "measure_error", "hold_unused_residuals", "exchange",
                                                           "ranks_per_node", "server_bits"), **codec_options)
        self.server_codec = _server_codec(self.codec, server_bits, codec_options)
        self.exchange = check_exchange(exchange)
        if ranks_per_node is None and os.environ.get("LOCAL_WORLD_SIZE", "").isdigit():
            ranks_per_node = int(os.environ["LOCAL_WORLD_SIZE"])  # torchrun: ranks on this node
        if ranks_per_node is not None and (isinstance(ranks_per_node, bool) or not isinstance(ranks_per_node, int)
                                           or ranks_per_node < 1):
            raise ValueError(f"ranks_per_node must be a positive integer, got {ranks_per_node!r}")
        self.ranks_per_node = ranks_per_node
        if not isinstance(error_feedback, bool):
            raise ValueError(f"error_feedback must be True or False, got {error_feedback!r}")
        if getattr(self.codec, "error_feedback_diverges", False) and error_feedback:
            raise ValueError(f"codec {codec!r} with {self.codec.config()} is unbiased but its error can exceed the value "
                             "itself, so error-feedback residuals grow without bound (training diverges); use "
                             "error_feedback=False with it (unbiased codecs need no feedback), or a biased, "
                             "contractive codec with error feedback: sign (mode='scaled'), ternary, uniform, "
                             "stochastic at >= 2 bits, or qsgd with block_size <= s^2, s = 2^(bits-1) - 1")
        if getattr(self.codec, "needs_error_feedback", False) and not error_feedback:
            raise ValueError(f"codec {codec!r} clips values to its range and relies on error feedback to carry the "
                             "clipped part into the next step; use error_feedback=True")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.process_group = process_group
        self.error_feedback = error_feedback
        self.seed = seed
        self.measure_error = measure_error
        self.hold_unused_residuals = hold_unused_residuals
        self.memory = ResidualMemory()
        # two-phase: residual of the re-encoded mean of this rank's shards, kept per parameter
        # (zero outside the own shards) so that it survives bucket rebuilds like ``memory``
        self.server_memory = ResidualMemory()
        self._in_order = InOrder()
        self._second_group = None
        self._hier_groups = None
        self._in_order_node = InOrder()
        self._announced = False
        self.step = 0
        self._config_print = fingerprint(self.codec.config())
        self._param_key: Dict[int, int] = {}
        self._param_names: Dict[int, str] = {}
        self._param_numels: Dict[int, int] = {}
        self._needs_bind = False
        if module is not None:
            self.bind(module)
        self._buckets: Dict[Tuple[int, ...], _Bucket] = {}
        self._used_this_step: Set[Tuple[int, ...]] = set()
        self._lock = threading.Lock()
        self._agreed = False
        self._reset_stats()

    # -- identities ----------------------------------------------------------------------------
    def bind(self, module: torch.nn.Module) -> "QuantizedHookState":
        """Identify parameters by their index in ``module.parameters()`` (names for checkpoints).

        Needed after unpickling a state that was built with a module: object identities do not
        survive pickling, and guessing the order could attach residuals to the wrong parameters.
        """
        named = list(module.named_parameters())
        if self._param_names and {i: n for i, (n, _) in enumerate(named)} != self._param_names:
            raise ValueError("bind(): the module's parameters differ from the ones this state was built for")
        self._param_key = {id(p): i for i, (_, p) in enumerate(named)}
        self._param_names = {i: n for i, (n, _) in enumerate(named)}
        self._param_numels = {i: p.numel() for i, (_, p) in enumerate(named)}
        self._needs_bind = False
        return self

    def _key_of(self, p: torch.Tensor) -> int:
        key = self._param_key.get(id(p))
        if key is None:
            key = self._param_key[id(p)] = len(self._param_key)
            self._param_numels[key] = p.numel()
        return key

    def _name_of(self, key: int) -> str:
        return self._param_names.get(key, f"param{key}")

    # -- stats -----------------------------------------------------------------------------------
    def _reset_stats(self) -> None:
        self._totals = {"payload_bytes": 0, "wire_bytes_sent": 0, "fp32_bytes": 0, "hook_calls": 0, "nonfinite_steps": 0}
        self._last = {"nmse": float("nan"), "payload_bytes": 0, "buckets": 0, "modes": {}, "timeline": []}
        # seconds, not checkpointed: inside hook calls (the autograd thread waits) and inside
        # completion callbacks (decode / re-encode on the backend's threads)
        self._timing = {"hook_seconds": 0.0, "callback_seconds": 0.0}
        self._new_step()

    def stats(self) -> dict:
        """Cumulative traffic and quality figures of this rank.

        Keys: ``steps`` (synchronised iterations), ``payload_bytes`` (bytes of this rank's
        payloads; two-phase: its W shard payloads), ``wire_bytes_sent`` (bytes this rank sends at
        this world size: all-gather (W-1) x payload, two-phase (W-1) x (shard payload + re-encoded
        mean payload)), ``fp32_bytes`` (4 bytes per gradient value: what an fp32 payload
        would have been), ``compression_ratio`` (fp32_bytes / payload_bytes), ``nmse`` (last step:
        sum of squared quantization errors / sum of squared inputs, over all buckets),
        ``fp32_allreduce_wire_bytes`` (what a ring fp32 allreduce sends per rank: 2(W-1)/W x 4
        bytes per value), ``exchange`` (as configured), ``exchange_last_step`` (buckets per exchange
        used, e.g. ``{"alltoall": 3, "allgather": 1}``), ``exchange_reason`` (why, per exchange
        used), plus ``payload_bytes_last_step``, ``buckets_last_step``, ``hook_calls``,
        ``nonfinite_steps``, ``world_size``, ``codec`` and ``bits``.  Time (seconds, since the state
        was built, not checkpointed): ``hook_seconds`` spent inside hook calls (encoding: the
        autograd thread waits for it) and ``callback_seconds`` inside completion callbacks
        (decoding, re-encoding: on the backend's threads, overlapping later buckets); the last
        step's per-bucket timeline is :meth:`timeline`.
        """
        t = self._totals
        w = self._world_size()
        return {
            "steps": self.step,
            "payload_bytes": t["payload_bytes"],
            "wire_bytes_sent": t["wire_bytes_sent"],
            "fp32_bytes": t["fp32_bytes"],
            "compression_ratio": t["fp32_bytes"] / t["payload_bytes"] if t["payload_bytes"] else 0.0,
            "nmse": self._last["nmse"],
            "fp32_allreduce_wire_bytes": int(t["fp32_bytes"] * 2 * (w - 1) / w) if w else 0,
            "payload_bytes_last_step": self._last["payload_bytes"],
            "buckets_last_step": self._last["buckets"],
            "exchange": self.exchange,
            "exchange_last_step": dict(self._last["modes"]),
            "exchange_reason": "; ".join(sorted({f"{b.mode}: {b.reason}" for b in self._buckets.values()})),
            "hook_calls": t["hook_calls"],
            "nonfinite_steps": t["nonfinite_steps"],
            "world_size": w,
            "codec": self.codec.name,
            "bits": self.codec.bits,
            "hook_seconds": self._timing["hook_seconds"],
            "callback_seconds": self._timing["callback_seconds"],
        }

    def timeline(self) -> list:
        """Per-bucket timings of the last completed step, in bucket order: dicts with ``bucket``,
        ``numel``, ``mode`` and the seconds since the step's first hook call at which the hook was
        entered (``enter``), returned its future (``launched``: encoding done, first collective
        issued), the first collective completed (``received``) and the bucket's mean was ready
        (``done``); ``callback_s``: time spent in its completion callbacks.  Encoding of bucket k+1
        overlaps the collective of bucket k when its ``[enter, launched]`` falls inside k's
        ``[launched, received]``."""
        return [dict(e) for e in self._last["timeline"]]

    def _world_size(self) -> int:
        return exchange.world_size(self.process_group) if dist.is_initialized() else 0

    # -- checkpointing ---------------------------------------------------------------------------
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
            "rank": exchange.rank(self.process_group) if dist.is_initialized() else 0,
            "residuals": residuals,
            "server_residuals": server,
            "exchange": self.exchange,
            "totals": dict(self._totals),
            # per-rank running state of stateful codecs (k-means codebooks, adaptive ranges)
            "codec_state": self.codec.state_dict() if hasattr(self.codec, "state_dict") else {},
            # >>> worker momentum (issue 21): buffers by parameter name <<<
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
            if saved_rank is not None and dist.is_initialized() and saved_rank != exchange.rank(self.process_group):
                warnings.warn(f"ddp_qhooks: rank {exchange.rank(self.process_group)} loads the hook state of rank "
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
        me = exchange.rank(self.process_group) if dist.is_initialized() else 0
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
        if self.worker_momentum is not None:  # >>> worker momentum (issue 21) <<<
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
        residuals = {}
        for name, tensor in named.items():
            if by_name:
                if name not in by_name:
                    raise ValueError(f"hook state has a residual for {name!r}, which is not a parameter of the model")
                key = by_name[name]
                if tensor.numel() != self._param_numels[key]:
                    raise ValueError(f"residual for {name!r} has {tensor.numel()} elements, the parameter has {self._param_numels[key]}")
            elif name.startswith("param") and name[5:].isdigit():
                key = int(name[5:])
            else:
                raise ValueError(f"residual {name!r} is keyed by parameter name: create the state with module=...")
            residuals[key] = tensor
        return residuals

    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("process_group", "_buckets", "memory", "server_memory", "_param_key", "_lock", "_in_order",
                              "_second_group", "_hier_groups", "_in_order_node")}
        state["_residuals"] = {k: v.detach().cpu().clone() for k, v in self.memory.residuals().items()}
        state["_server_residuals"] = {k: v.detach().cpu().clone() for k, v in self.server_memory.residuals().items()}
        return state

    def __setstate__(self, state):
        residuals = state.pop("_residuals")
        server = state.pop("_server_residuals", {})
        state.setdefault("exchange", "allgather")  # pickled before the option existed
        state.setdefault("_announced", False)
        state.setdefault("ranks_per_node", None)
        state.setdefault("server_codec", state["codec"])
        self.__dict__.update(state)
        self.process_group = None
        self._lock = threading.Lock()
        self._buckets = {}
        self._param_key = {}
        self._needs_bind = bool(self._param_names)
        self._agreed = False
        self.memory = ResidualMemory()
        self.memory.load(residuals)
        self.server_memory = ResidualMemory()
        self.server_memory.load(server)
        self._in_order = InOrder()
        self._in_order_node = InOrder()
        self._second_group = None
        self._hier_groups = None

    # -- per bucket buffers ------------------------------------------------------------------------
    def _bucket(self, signature, params, device) -> _Bucket:
        b = self._buckets.get(signature)
        if b is None:
            layout = Layout([p.numel() for p in params], signature)
            body = self.codec.body_nbytes(layout)
            size = payload_nbytes(body)
            w = exchange.world_size(self.process_group)
            payload = torch.zeros(size, dtype=torch.uint8, device=device)
            self._write_header(payload, layout.numel)
            scratch = None
            if self.measure_error and not self.error_feedback:
                scratch = torch.empty(layout.numel, dtype=torch.float32, device=device)
            shard_layouts = _shard_layouts(layout, w) if layout.numel >= w > 1 else None
            slot = max(payload_nbytes(self.codec.body_nbytes(sl)) for sl in shard_layouts) if shard_layouts else 0
            mean_slot = max(payload_nbytes(self.server_codec.body_nbytes(sl)) for sl in shard_layouts) \
                if shard_layouts else 0
            if w != dist.get_world_size():
                # the extra groups of the other exchanges are created by dist.new_group, which every
                # rank of the job must enter: ranks outside this subgroup never would (a hang)
                if self.exchange in ("alltoall", "hierarchical"):
                    raise ValueError(f"exchange={self.exchange!r} needs the default process group (this one has {w} of "
                                     f"{dist.get_world_size()} ranks); use exchange='allgather' for a subgroup")
                mode, reason = "allgather", "process group is a subgroup: all-gather only"
            else:
                mode, reason = exchange.choose(self.exchange, w, layout.numel, (w - 1) * size,
                                               (w - 1) * (slot + mean_slot),
                                               ranks_per_node=self._ranks_per_node_checked(w),
                                               bits=self.server_codec.bits)
            shards = chunks = None
            if mode == "hierarchical":
                chunks = self._make_chunks(layout, device)
                gathered = payload[:0]
            elif mode == "alltoall":
                shards = self._make_shards(layout, shard_layouts, slot, mean_slot, device)
                gathered = payload[:0]
            else:
                gathered = torch.empty(w * size, dtype=torch.uint8, device=device)
            b = self._buckets[signature] = _Bucket(layout, body, payload, gathered, scratch, mode, reason, shards, chunks)
            self._settle_server_residuals(signature, b, device)
        return b

    def _write_header(self, slot: torch.Tensor, numel: int, codec=None) -> None:
        codec = codec or self.codec
        print_ = self._config_print if codec is self.codec else fingerprint(codec.config())
        slot[:HEADER_BYTES] = header_bytes(codec.codec_id, codec.bits, print_, numel).to(slot.device)

    def _ranks_per_node_checked(self, w: int) -> Optional[int]:
        lpn = self.ranks_per_node
        if lpn is None:
            if self.exchange == "hierarchical":
                raise ValueError("exchange='hierarchical' needs the node layout: pass ranks_per_node=... (torchrun's "
                                 "LOCAL_WORLD_SIZE is not set)")
            return None
        if w % lpn:
            raise ValueError(f"ranks_per_node={lpn} does not divide the world size {w}")
        if self.exchange == "hierarchical" and self.hold_unused_residuals:
            raise ValueError("exchange='hierarchical' does not support find_unused_parameters / hold_unused_residuals "
                             "yet; use exchange='allgather' or 'alltoall'")
        return lpn if not self.hold_unused_residuals else None

    def _make_chunks(self, layout: Layout, device) -> "_Chunks":
        lpn = self.ranks_per_node
        me = exchange.rank(self.process_group)
        nodes = exchange.world_size(self.process_group) // lpn
        local = me % lpn
        layouts = _shard_layouts(layout, lpn)
        bounds = exchange.shard_bounds(layout.numel, lpn)
        body = self.codec.body_nbytes(layouts[local])
        slot = payload_nbytes(body)
        payload = torch.zeros(slot, dtype=torch.uint8, device=device)
        self._write_header(payload, layouts[local].numel)
        widest = max(e - s for s, e in bounds)
        return _Chunks(bounds, layouts[local], body, payload,
                       torch.empty(nodes * slot, dtype=torch.uint8, device=device),
                       torch.zeros(widest, dtype=torch.float32, device=device),
                       torch.empty(lpn * widest, dtype=torch.float32, device=device))

    def _hierarchy_groups(self):
        """(intra-node group for the full-precision allreduce, intra-node group for the final
        all-gather, cross-node group of the ranks with this local rank): created once, in the same
        order on every rank."""
        if self._hier_groups is None:
            ranks = dist.get_process_group_ranks(self.process_group) if self.process_group is not None \
                else list(range(dist.get_world_size()))
            lpn = self.ranks_per_node
            nodes = [ranks[n * lpn:(n + 1) * lpn] for n in range(len(ranks) // lpn)]
            cross = [[node[i] for node in nodes] for i in range(lpn)]
            self._hier_groups = tuple(exchange.subgroups(self.process_group, e) for e in (nodes, nodes, cross))
        return self._hier_groups

    def _make_shards(self, layout: Layout, layouts: list, slot: int, mean_slot: int, device) -> _Shards:
        w = len(layouts)
        me = exchange.rank(self.process_group)
        send = torch.zeros(w * slot, dtype=torch.uint8, device=device)
        for s, sl in enumerate(layouts):
            self._write_header(send[s * slot:(s + 1) * slot], sl.numel)
        own_mean = torch.zeros(mean_slot, dtype=torch.uint8, device=device)
        self._write_header(own_mean, layouts[me].numel, self.server_codec)
        bounds = exchange.shard_bounds(layout.numel, w)
        return _Shards(bounds, layouts, [self.codec.body_nbytes(sl) for sl in layouts], slot, send,
                       torch.empty(w * slot, dtype=torch.uint8, device=device),
                       [self.server_codec.body_nbytes(sl) for sl in layouts], mean_slot, own_mean,
                       torch.empty(w * mean_slot, dtype=torch.uint8, device=device),
                       torch.empty(layouts[me].numel, dtype=torch.float32, device=device))

    def _settle_server_residuals(self, signature, b: _Bucket, device) -> None:
        """Place the server residuals of a new bucket layout.  The part inside this rank's shard stays
        a server residual; any other part (the bucket is exchanged by all-gather now, or the shard
        went to another rank after a rebuild or a restart at another world size) is added W-fold
        to this rank's worker residual, which brings it into the next mean unchanged."""
        if not self.error_feedback:
            return
        inherited = self.server_memory.holds_any(signature)
        if b.mode != "alltoall" and not inherited:
            return
        server = self.server_memory.bucket_residual(signature, b.layout.param_numels, device)
        if inherited:
            w = exchange.world_size(self.process_group)
            keep = b.shards.bounds[exchange.rank(self.process_group)] if b.mode == "alltoall" else (0, 0)
            worker = self.memory.bucket_residual(signature, b.layout.param_numels, device)
            for start, end in ((0, keep[0]), (keep[1], b.layout.numel)):
                worker[start:end].add_(server[start:end], alpha=w)
                server[start:end].zero_()
        if b.mode == "alltoall":
            self.server_memory.staging(signature).zero_()
        else:
            self.server_memory.release(signature)

    def _end_of_step(self) -> None:
        """Called (under the lock) when every bucket of the step has been exchanged and decoded."""
        if self._step_nonfinite:
            self._totals["nonfinite_steps"] += 1  # GradScaler drops the step: keep old residuals
        else:
            self.memory.commit(self._staged)
            self.server_memory.commit(self._staged_server)
        self._in_order.reset()
        self._in_order_node.reset()
        self.step += 1
        nmse = float("nan")
        if self.measure_error and not self._step_nonfinite:
            nmse = self._step_err / self._step_inp if self._step_inp > 0 else (0.0 if self._step_err == 0 else float("inf"))
        self._last = {"nmse": nmse, "payload_bytes": self._step_payload, "buckets": self._step_buckets,
                      "modes": dict(self._step_modes), "timeline": _timeline(self._step_events)}
        self._new_step()
        for sig in [s for s in self._buckets if s not in self._used_this_step]:
            del self._buckets[sig]  # layouts DDP no longer uses (e.g. before the bucket rebuild)
        self._used_this_step.clear()

    def _new_step(self) -> None:
        self._step_err = self._step_inp = 0.0
        self._step_payload = self._step_buckets = 0
        self._step_modes = {}
        self._step_events = {}
        self._step_nonfinite = False
        self._calls = self._done = 0
        self._last_seen = False
        self._staged = []
        self._staged_server = []


def quantized_allgather_hook(state: QuantizedHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Quantize the bucket, exchange packed payloads (all-gather or two-phase, see
    ``state.exchange``), return the decoded mean."""
    t0 = time.perf_counter()
    with state._lock:  # this step's record: the step may end inside _hook (a collective done inline)
        events = state._step_events.setdefault(bucket.index(), {})
        events["enter"] = t0
    fut = _hook(state, bucket, events)
    with state._lock:
        state._timing["hook_seconds"] += time.perf_counter() - t0
    return fut


def _hook(state: QuantizedHookState, bucket: dist.GradBucket, events: dict) -> torch.futures.Future[torch.Tensor]:
    if state._needs_bind:
        raise RuntimeError("ddp_qhooks: this hook state was unpickled; call state.bind(ddp_model.module) before "
                           "training so residuals are matched to the right parameters")
    group = state.process_group
    world = exchange.world_size(group)
    buf = bucket.buffer()
    params = bucket.parameters()
    signature = tuple(state._key_of(p) for p in params)
    if not state._agreed:
        exchange.check_agreement(_agreed_config(state), buf.device, group)
        state._agreed = True
    b = state._bucket(signature, params, buf.device)
    state._used_this_step.add(signature)
    if b.mode == "hierarchical":
        state._hierarchy_groups()
    if b.mode == "alltoall" and state._second_group is None:
        # second-phase collectives start from callbacks while this thread issues the next buckets'
        # first phase: they need their own group (created here, in step order on every rank)
        state._second_group = exchange.new_group(group)
    if not state._announced:
        state._announced = True
        if exchange.rank(group) == 0:
            _log.info("ddp_qhooks: bucket %d (%d values) uses %s: %s", bucket.index(), b.layout.numel, b.mode, b.reason)

    x = buf if buf.dtype == torch.float32 else buf.float()
    if state.worker_momentum is not None:  # >>> worker momentum (issue 21): before the residual <<<
        state.worker_momentum.apply(signature, b.layout.param_numels, x)
    residual = None
    held = []
    if state.error_feedback:
        residual = state.memory.bucket_residual(signature, b.layout.param_numels, buf.device)
        held = _add_residual(x, residual, b.layout, state.hold_unused_residuals)
    key = splitmix64(state.seed, exchange.rank(group), state.step)
    # e = g' - deq(own payload), formed by the encoder while the data is hot (no decode of our own
    # payload later) and staged: committed only once the whole step is known to be finite
    err = state.memory.staging(signature) if residual is not None else b.scratch
    if b.mode == "alltoall":
        return _two_phase(state, bucket, b, x, buf, err, held, key, signature, events)
    if b.mode == "hierarchical":
        return _hierarchical(state, bucket, b, x, buf, err, key, signature, events)
    state._in_order.submit(bucket.index())  # nothing to launch later, but later buckets may wait on it
    state._in_order_node.submit(bucket.index())
    body = b.payload[HEADER_BYTES:HEADER_BYTES + b.body_nbytes]
    info = state.codec.encode(x, body, b.layout, key, error_out=err)
    if err is not None and info.finite:
        _restore_held(err, held)
    b.payload[3] = 0 if info.finite else FLAG_NONFINITE
    _count(state, bucket, b, b.payload.numel(), (world - 1) * b.payload.numel())
    validate = buf.device.type == "cpu" or state.step < 3

    def finish(fut: torch.futures.Future) -> torch.Tensor:
        t0 = _received(state, bucket.index())
        fut.value()  # re-raises a failed collective
        rows = b.gathered.view(world, -1)
        nonfinite = _nonfinite_rows(state, rows, b.layout.numel, validate)
        if nonfinite:
            # every rank yields NaN, so GradScaler skips the step everywhere; no residual of this
            # step is committed on any rank (the step's gradient is dropped whole)
            buf.fill_(float("nan"))
        else:
            bodies = [rows[r, HEADER_BYTES:HEADER_BYTES + b.body_nbytes] for r in range(world)]
            state.codec.decode(bodies, b.layout, buf, divisor=world)
        _bucket_done(state, info if err is not None else None, nonfinite, signature if residual is not None else None,
                     index=bucket.index(), started=t0, layout=b.layout, mode=b.mode)
        return buf

    events["launched"] = time.perf_counter()  # (the collective may complete, and the step end, inline)
    return exchange.then(exchange.allgather_async(b.payload, b.gathered, group), finish)


def _two_phase(state: QuantizedHookState, bucket, b: _Bucket, x: torch.Tensor, buf: torch.Tensor, err, held, key: int,
               signature, events: dict) -> torch.futures.Future:
    sh = b.shards
    state._in_order_node.submit(bucket.index())  # no third phase
    group = state.process_group
    world = len(sh.bounds)
    me = exchange.rank(group)
    finite = True
    err_sq = inp_sq = 0.0
    for s, ((start, end), layout) in enumerate(zip(sh.bounds, sh.layouts)):
        body = sh.send[s * sh.slot + HEADER_BYTES:s * sh.slot + HEADER_BYTES + sh.bodies[s]]
        info = state.codec.encode(x[start:end], body, layout, splitmix64(key, 1, s),
                                  error_out=None if err is None else err[start:end])
        sh.send[s * sh.slot + 3] = 0 if info.finite else FLAG_NONFINITE
        finite = finite and info.finite
        if err is not None and info.error_sq is not None:
            err_sq += info.error_sq
            inp_sq += info.input_sq
    if err is not None and finite:
        _restore_held(err, held)
    worker_info = EncodeInfo(finite, err_sq, inp_sq) if err is not None else None
    _count(state, bucket, b, world * sh.slot, (world - 1) * (sh.slot + sh.mean_slot))
    validate = buf.device.type == "cpu" or state.step < 3
    server = None
    if state.error_feedback:
        start, end = sh.bounds[me]
        server = state.server_memory.bucket_residual(signature, b.layout.param_numels, buf.device)[start:end]
        server_err = state.server_memory.staging(signature)[start:end]
    result = torch.futures.Future(devices=[buf.device] if buf.device.type == "cuda" else None)
    own = sh.own_mean

    def assemble() -> torch.Tensor:
        rows = sh.gathered.view(world, -1)
        nonfinite = _nonfinite_rows(state, rows, None, validate=False)  # headers were checked in phase 1
        if nonfinite:
            buf.fill_(float("nan"))
        else:
            for s, ((start, end), layout) in enumerate(zip(sh.bounds, sh.layouts)):
                state.server_codec.decode([rows[s, HEADER_BYTES:HEADER_BYTES + sh.mean_bodies[s]]], layout,
                                          buf[start:end])
        _bucket_done(state, worker_info, nonfinite, signature if err is not None and state.error_feedback else None,
                     server_signature=signature if server is not None else None, index=bucket.index(),
                     started=t_last[0], layout=b.layout, mode=b.mode)
        return buf

    def reduce_own_shard() -> None:
        rows = sh.recv.view(world, -1)
        mean = sh.mean
        layout = sh.layouts[me]
        if _nonfinite_rows(state, rows, layout.numel, validate):
            own[3] = FLAG_NONFINITE
            return
        bodies = [rows[r, HEADER_BYTES:HEADER_BYTES + sh.bodies[me]] for r in range(world)]
        state.codec.decode(bodies, layout, mean, divisor=world)
        held2 = _add_residual(mean, server, layout, state.hold_unused_residuals) if server is not None else []
        info2 = state.server_codec.encode(mean, own[HEADER_BYTES:HEADER_BYTES + sh.mean_bodies[me]], layout,
                                          splitmix64(key, 2), error_out=None if server is None else server_err)
        if server is not None and info2.finite:
            _restore_held(server_err, held2)
        own[3] = 0 if info2.finite else FLAG_NONFINITE

    t_last = [None]
    last = _last_phase(result, assemble, state, bucket.index(), t_last)
    first = _next_phase(result, state._in_order, bucket.index(), reduce_own_shard,
                        lambda: exchange.allgather_async(own, sh.gathered, state._second_group), last, state)
    events["launched"] = time.perf_counter()
    exchange.then(exchange.alltoall_async(sh.send, sh.recv, group), first)
    return _surfaced(result)


def _hierarchical(state: QuantizedHookState, bucket, b: _Bucket, x: torch.Tensor, buf: torch.Tensor, err, key: int,
                  signature, events: dict) -> torch.futures.Future:
    """Full-precision allreduce inside the node (residuals already added: a residual anywhere in the
    bucket enters the node sum exactly), then this rank quantizes its chunk of the node sum and
    all-gathers it with the same-numbered ranks of the other nodes, decodes their mean, and the
    node all-gathers the mean chunks."""
    ch = b.chunks
    first, second, across = state._hierarchy_groups()
    lpn = state.ranks_per_node
    local = exchange.rank(state.process_group) % lpn
    nodes = exchange.world_size(state.process_group) // lpn
    start, end = ch.bounds[local]
    n = end - start
    if err is not None:  # the next residual lives in the own chunk only (a residual elsewhere was just spent)
        err[:start].zero_()
        err[end:].zero_()
    result = torch.futures.Future(devices=[buf.device] if buf.device.type == "cuda" else None)
    _count(state, bucket, b, ch.payload.numel(), (nodes - 1) * ch.payload.numel(), fp32_values=n)
    info_box = {}

    def assemble() -> torch.Tensor:
        rows = ch.node_means.view(lpn, -1)
        for i, (s0, e0) in enumerate(ch.bounds):
            buf[s0:e0].copy_(rows[i, :e0 - s0])
        # one non-finite chunk anywhere makes the bucket non-finite on every rank, so every rank
        # skips the step's residuals alike
        nonfinite = not bool(torch.isfinite(buf).all())
        if nonfinite:
            buf.fill_(float("nan"))
        info = info_box.get("info")
        _bucket_done(state, info if err is not None else None, nonfinite,
                     signature if err is not None and state.error_feedback else None, index=bucket.index(),
                     started=t_last[0], layout=b.layout, mode=b.mode)
        return buf

    def mean_chunk() -> None:
        rows = ch.gathered.view(nodes, -1)
        mean = ch.mean[:n]
        if _nonfinite_rows(state, rows, n, True):
            mean.fill_(float("nan"))
        else:
            bodies = [rows[r, HEADER_BYTES:HEADER_BYTES + ch.body] for r in range(nodes)]
            state.codec.decode(bodies, ch.layout, mean, divisor=nodes * lpn)

    def quantize_chunk() -> None:
        info = state.codec.encode(x[start:end], ch.payload[HEADER_BYTES:HEADER_BYTES + ch.body], ch.layout,
                                  splitmix64(key, 3), error_out=None if err is None else err[start:end])
        info_box["info"] = info
        ch.payload[3] = 0 if info.finite else FLAG_NONFINITE

    t_last = [None]
    last = _last_phase(result, assemble, state, bucket.index(), t_last)
    middle = _next_phase(result, state._in_order_node, bucket.index(), mean_chunk,
                         lambda: exchange.allgather_async(ch.mean, ch.node_means, second), last, state)
    first_cb = _next_phase(result, state._in_order, bucket.index(), quantize_chunk,
                           lambda: exchange.allgather_async(ch.payload, ch.gathered, across), middle, state)
    events["launched"] = time.perf_counter()
    exchange.then(exchange.allreduce_async(x, first), first_cb)
    return _surfaced(result)


def _surfaced(result: torch.futures.Future) -> torch.futures.Future:
    """DDP's reducer reads a hook future's value as a tensor; a future completed by
    ``set_exception`` reached it as "Unable to cast <message> to Tensor".  A chained future re-raises
    the exception, which DDP reports as "Got the following error when running the callback: ..."."""
    return exchange.then(result, lambda fut: fut.value())


def _next_phase(result: torch.futures.Future, in_order: InOrder, index: int, work, start, then, state):
    """A completion callback: run ``work()`` (decode / re-encode), then issue the next collective
    ``start()`` in bucket order and continue with ``then``.  Any failure goes to ``result``, so DDP
    raises instead of waiting forever, and releases later buckets waiting on this one."""
    def callback(fut: torch.futures.Future) -> None:
        t0 = _received(state, index)
        try:
            fut.value()  # re-raises a failed collective
            work()
        except BaseException as exc:  # noqa: BLE001 - DDP must see it, not hang
            in_order.submit(index)
            result.set_exception(exc)
            return
        finally:
            _callback_time(state, index, t0)

        def launch() -> None:
            try:
                exchange.then(start(), then)
            except BaseException as exc:  # noqa: BLE001
                result.set_exception(exc)
        in_order.submit(index, launch)
    return callback


def _last_phase(result: torch.futures.Future, work, state, index: int, started: list):
    """The final completion callback: ``result`` gets ``work()``'s tensor or its exception.
    ``started[0]``: when it began (for the timing kept by ``_bucket_done``)."""
    def callback(fut: torch.futures.Future) -> None:
        started[0] = time.perf_counter()
        try:
            fut.value()
            result.set_result(work())
        except BaseException as exc:  # noqa: BLE001
            result.set_exception(exc)
    return callback


def _count(state: QuantizedHookState, bucket, b: _Bucket, payload: int, sent: int, fp32_values=None) -> None:
    with state._lock:
        state._totals["hook_calls"] += 1
        state._totals["payload_bytes"] += payload
        state._totals["wire_bytes_sent"] += sent
        state._totals["fp32_bytes"] += 4 * (b.layout.numel if fp32_values is None else fp32_values)
        state._step_payload += payload
        state._step_buckets += 1
        state._step_modes[b.mode] = state._step_modes.get(b.mode, 0) + 1
        state._calls += 1
        state._last_seen = state._last_seen or bucket.is_last()


def _nonfinite_rows(state: QuantizedHookState, rows: torch.Tensor, numel: Optional[int], validate: bool) -> bool:
    if validate:
        headers = rows[:, :HEADER_BYTES].cpu()
        _check_headers(state, numel, headers)
        flags = headers[:, 3].tolist()
    else:
        flags = rows[:, 3].cpu().tolist()
    return any(f & FLAG_NONFINITE for f in flags)


def _received(state: QuantizedHookState, index: int) -> float:
    """Stamp the first completed collective of a bucket; returns now."""
    now = time.perf_counter()
    with state._lock:
        state._step_events.setdefault(index, {}).setdefault("received", now)
    return now


def _callback_time(state: QuantizedHookState, index: int, started: float) -> None:
    spent = time.perf_counter() - started
    with state._lock:
        state._timing["callback_seconds"] += spent
        ev = state._step_events.setdefault(index, {})
        ev["callback_s"] = ev.get("callback_s", 0.0) + spent


def _timeline(events: dict) -> list:
    if not events:
        return []
    origin = min(e.get("enter", float("inf")) for e in events.values())
    rows = []
    for index in sorted(events):
        e = events[index]
        row = {"bucket": index, "numel": e.get("numel"), "mode": e.get("mode"), "callback_s": e.get("callback_s", 0.0)}
        for k in ("enter", "launched", "received", "done"):
            row[k] = e[k] - origin if k in e else None
        rows.append(row)
    return rows


def _bucket_done(state: QuantizedHookState, info, nonfinite: bool, signature, server_signature=None, *,
                 index: int, started: float, layout: Layout, mode: str) -> None:
    now = time.perf_counter()
    with state._lock:  # Gloo runs callbacks on several threads, in any order
        state._timing["callback_seconds"] += now - started
        ev = state._step_events.setdefault(index, {})
        ev.update(done=now, numel=layout.numel, mode=mode, callback_s=ev.get("callback_s", 0.0) + now - started)
        if info is not None and state.measure_error and not nonfinite and info.error_sq is not None:
            state._step_err += info.error_sq
            state._step_inp += info.input_sq
        state._step_nonfinite = state._step_nonfinite or nonfinite
        if not nonfinite:
            if signature is not None:
                state._staged.append(signature)
            if server_signature is not None:
                state._staged_server.append(server_signature)
        state._done += 1
        if state._last_seen and state._done == state._calls:
            state._end_of_step()


def _agreed_config(state: QuantizedHookState) -> dict:
    return {**state.codec.config(), "error_feedback": state.error_feedback, "exchange": state.exchange,
            "ranks_per_node": state.ranks_per_node, "server_codec": state.server_codec.config()}


def _server_codec(codec, server_bits: Optional[int], options: dict):
    """The codec that re-encodes the mean of a shard in the two-phase exchange.

    By default the worker codec itself, except for sign and ternary codecs: the mean of W signs or
    trits is no longer one, and re-encoding it to 1 bit / 3 levels with a server residual costs
    accuracy (sign, README) or diverges (stochastic ternary with one scale per bucket: the error of
    a stochastic trit exceeds the value for most values, so the server residual grows without
    bound).  Their mean is re-encoded with the deterministic, contractive ``uniform`` codec at
    ``DEFAULT_SERVER_BITS_LOW`` bits.  An explicit ``server_bits`` uses the worker codec at that
    width where it has one, else ``uniform`` (same ``block_size``).
    """
    block = {"block_size": options["block_size"]} if "block_size" in options else {}
    if server_bits is None:
        if codec.bits > 1 and codec.name != "ternary":
            return codec
        return make_codec("uniform", DEFAULT_SERVER_BITS_LOW, **block)
    if isinstance(server_bits, bool) or not isinstance(server_bits, int) or not 1 <= server_bits <= 8:
        raise ValueError(f"server_bits must be an integer in 1..8 (bits of the re-encoded mean in the two-phase "
                         f"exchange), got {server_bits!r}")
    if server_bits == codec.bits:
        return codec
    try:
        same = make_codec(codec.name, server_bits, **options)
        if same.bits == server_bits:
            return same
    except (ValueError, TypeError):
        pass
    return make_codec("uniform", server_bits, **block)


def _shard_layouts(layout: Layout, world: int) -> list:
    """The Layout of each shard: the pieces of the bucket's parameters that fall into it (a block
    never straddles two parameters, nor two shards)."""
    layouts = []
    offsets = layout.param_offsets()
    for start, end in exchange.shard_bounds(layout.numel, world):
        numels, keys = [], []
        for off, n, k in zip(offsets, layout.param_numels, layout.param_keys):
            lo, hi = max(off, start), min(off + n, end)
            if hi > lo:
                numels.append(hi - lo)
                keys.append(k)
        layouts.append(Layout(numels, keys) if numels else Layout([0], [0]))
    return layouts


def _add_residual(x: torch.Tensor, residual: torch.Tensor, layout: Layout, hold_unused: bool) -> list:
    """``x += residual``.  With ``hold_unused``, a parameter whose values in ``x`` are exactly zero
    (unused in this step) sends zero and keeps its residual: returns those (slice, residual) pairs
    for :func:`_restore_held` to put into the next residual."""
    held = [(sl, residual[sl].clone()) for sl in _param_slices(layout) if not bool(x[sl].any())] if hold_unused else []
    x.add_(residual)
    for sl, _ in held:
        x[sl].zero_()
    return held


def _restore_held(next_residual: torch.Tensor, held: list) -> None:
    for sl, saved in held:
        next_residual[sl].copy_(saved)


def _param_slices(layout: Layout):
    return [slice(off, off + n) for off, n in zip(layout.param_offsets(), layout.param_numels)]


def _check_headers(state: QuantizedHookState, numel: int, headers: torch.Tensor) -> None:
    expected = {"version": WIRE_VERSION, "codec_id": state.codec.codec_id, "bits": state.codec.bits,
                "fingerprint": state._config_print, "numel": numel}
    for r, raw in enumerate(headers):
        got = parse_header(bytes(raw.tolist()))
        bad = [f"{k}={got[k]} (expected {v})" for k, v in expected.items() if got[k] != v]
        if bad:
            raise exchange.ConfigMismatchError(f"ddp_qhooks: payload from rank {r} does not match this rank's "
                                               f"configuration: {', '.join(bad)}")


def register(ddp_model, codec: str = "stochastic", *, bits: int = 8, error_feedback: bool = True,
             process_group=None, exchange: str = "auto", **codec_options) -> QuantizedHookState:
    """Register the quantized all-gather hook on a DistributedDataParallel model; return its state.

    ``codec_options`` go to the codec (e.g. ``block_size``) or to the state (``seed``,
    ``measure_error``).  With ``find_unused_parameters=True`` the residuals of parameters unused
    in a step are held back (see :class:`QuantizedHookState`).  Invalid choices raise ValueError here, before any step.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(f"register() needs a torch.nn.parallel.DistributedDataParallel model, got {type(ddp_model).__name__}")
    if getattr(ddp_model, "mixed_precision", None) is not None:
        raise ValueError("DDP's mixed_precision option installs its own comm hook; use codec='bf16'/'fp16' instead")
    state_options = {k: codec_options.pop(k) for k in ("seed", "measure_error", "hold_unused_residuals", "worker_momentum")
                     if k in codec_options}
    state_options["exchange"] = exchange
    state_options.setdefault("hold_unused_residuals", bool(getattr(ddp_model, "find_unused_parameters", False)))
    if process_group is None:
        process_group = getattr(ddp_model, "process_group", None)
    error = None
    try:
        state = QuantizedHookState(process_group=process_group, codec=codec, bits=bits, error_feedback=error_feedback,
                                   module=ddp_model.module, **state_options, **codec_options)
    except (ValueError, TypeError) as exc:
        error = exc
    # register() runs on every rank, like DDP's constructor: agree on validity and configuration
    # here, so that one misconfigured rank raises the same error everywhere instead of a hang
    device = next((p.device for p in ddp_model.module.parameters()), torch.device("cpu"))
    if dist.is_initialized():
        config = None if error else _agreed_config(state)
        _check_agreement(config, device, process_group, local_error=None if error is None else str(error))
        state._agreed = True
    elif error is not None:
        raise error
    ddp_model.register_comm_hook(state, quantized_allgather_hook)
    return state
