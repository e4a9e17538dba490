"""The configured state of a quantized exchange (like torch's ``PowerSGDState``)."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.distributed as dist

from ..codecs import Layout, make_codec, server_codec_for
from ..error_feedback import ResidualMemory
from ..worker_momentum import WorkerMomentum
from ..exchange.allreduce import FullPrecision
from ..exchange import STRATEGIES, TwoPhase, check_exchange, choose, collectives, piece_layouts
from .accounting import Accounting
from .checkpoint import Checkpointing
from .chunks import DEFAULT_CHUNK_SIZE, check_chunk_size, chunk_bounds
from .completion import Completion

STATE_OPTIONS = ("seed", "measure_error", "hold_unused_residuals", "exchange", "ranks_per_node", "server_bits",
                 "chunk_size", "worker_momentum")


@dataclass
class Plan:
    """How one unit layout is exchanged; built once per layout, reused every step."""

    layout: Layout
    mode: str
    reason: str
    strategy: object
    bounds: list                  # (start, end) of each pipelined chunk
    layouts: list                 # Layout of each chunk
    buffers: list                 # the strategy's buffers of each chunk
    payload_bytes: int
    sent_bytes: int
    fp32_values: int
    scratch: Optional[torch.Tensor] = None  # error buffer for measure_error without error feedback
    uses: int = 0
    extra: dict = field(default_factory=dict)


class QuantizedHookState(Accounting, Checkpointing):
    """State of :func:`~ddp_qhooks.quantized_allgather_hook` and of every integration built on the
    engine (LocalSGD).  Picklable (the process group is dropped, as in PowerSGD); its
    :meth:`state_dict` holds only tensors and plain values (``torch.load(weights_only=True)``).

    Args:
        process_group: the group to communicate in (``None``: the default group).
        codec: codec name, one of ``ddp_qhooks.codecs.available()``.
        bits: bits per value for quantizing codecs (the valid range depends on the codec).
        error_feedback: keep per-parameter residuals and add them to the next step's gradient
            (default True).
        seed: seeds stochastic rounding; randomness is keyed by (seed, rank, step) and, with
            ``block_size``, by parameter, so a resumed run repeats the same random choices.
        module: the wrapped model (``ddp.module``).  Gives parameters stable identities (their index
            in ``module.parameters()``) and names in ``state_dict``.  Without it, parameters are
            numbered in the order the first hook calls see them.
        measure_error: compute the relative quantization error (``nmse`` in :meth:`stats`).
        hold_unused_residuals: for DDP's ``find_unused_parameters=True`` (``register`` sets it from
            the model): a parameter whose local gradient is exactly zero in a step (unused here)
            neither receives nor updates its residual that step, since DDP discards the result for
            globally unused parameters.
        exchange: how payloads travel, one of ``ddp_qhooks.EXCHANGES``: ``"allgather"`` (one
            quantization, (W-1) x payload per rank), ``"alltoall"`` (two-phase: bytes flat in W, the
            mean re-encoded with a server-side residual), ``"hierarchical"`` (full precision inside
            each node, quantized between nodes), ``"auto"`` (default: hierarchical when several
            nodes each hold several ranks, else per bucket whichever sends fewer bytes).
        ranks_per_node: ranks per machine for the hierarchical exchange (default: torchrun's
            ``LOCAL_WORLD_SIZE``).
        server_bits: two-phase only: bits of the re-encoded mean of each shard (default: the
            codec's own, except codecs whose class names a ``server_codec``, such as sign and
            ternary, and 1-bit codecs: ``uniform`` at 2 bits; see
            ``ddp_qhooks.codecs.server_codec_for``).
        chunk_size: buckets above this many values are cut into chunks that are encoded, sent and
            decoded as a pipeline, several collectives in flight (default 2**21; ``None``: never
            cut).  Each chunk has its own scales.
        worker_momentum: ``beta`` for momentum kept on each worker and compressed instead of the
            gradient (``m = beta * m + g``, then error feedback on ``m``): the remedy for 1-bit codecs
            under momentum SGD; the optimizer then runs without momentum (``momentum=0``, the one
            line the user changes).  Default None (off).  With codec ``none`` it equals SGD with
            momentum ``beta``.
        **codec_options: codec specific, e.g. ``block_size``.
    """

    def __init__(self, process_group=None, codec: str = "stochastic", bits: int = 8, error_feedback: bool = True,
                 seed: int = 0, module: Optional[torch.nn.Module] = None, measure_error: bool = True,
                 hold_unused_residuals: bool = False, exchange: str = "auto", ranks_per_node: Optional[int] = None,
                 server_bits: Optional[int] = None, chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
                 worker_momentum: Optional[float] = None, **codec_options):
        # -- configuration (must agree across ranks) --
        self.codec = make_codec(codec, bits, _extra_valid=STATE_OPTIONS, **codec_options)
        self.server_codec = server_codec_for(self.codec, server_bits, codec_options)
        self.exchange = check_exchange(exchange)
        self.chunk_size = check_chunk_size(chunk_size)
        self.worker_momentum = None if worker_momentum is None else WorkerMomentum(worker_momentum)
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
        # -- parameter identities --
        self._param_key: Dict[int, int] = {}
        self._param_names: Dict[int, str] = {}
        self._param_numels: Dict[int, int] = {}
        self._needs_bind = False
        if module is not None:
            self.bind(module)
        # -- progress --
        self.step = 0
        self._agreed = False
        self._announced = False
        self._init_runtime()
        self._reset_stats()

    def _init_runtime(self) -> None:
        """What is rebuilt after unpickling: memories, plans, strategies, the completion thread."""
        self.memory = ResidualMemory()
        # two-phase: residual of the re-encoded mean of this rank's shards, kept per parameter
        # (zero outside the own shards) so that it survives bucket rebuilds like ``memory``
        self.server_memory = ResidualMemory()
        self._plans: Dict[tuple, Plan] = {}
        # plans and strategies of an attached optimizer's warm-up and variance refreshes
        self._full_plans: Dict[tuple, Plan] = {}
        self._warmup_strategies: Dict[str, object] = {}  # of the optimizer's one warm-up codec, by mode
        self._warmup_used: set = set()
        self._optimizer = None  # attached by ddp_qhooks.optim.OneBitAdam(hook=...): decides the phase
        self._strategies: Dict[str, object] = {}
        self._used_this_step: set = set()
        self._lock = threading.Lock()
        self._completion = Completion()

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

    def _name_param(self, obj, name: str) -> None:
        """Give ``obj`` (anything with ``numel()`` standing for a parameter, such as a shard) the
        next key and ``name`` for checkpoints."""
        key = self._param_key[id(obj)] = len(self._param_key)
        self._param_names[key] = name
        self._param_numels[key] = obj.numel()

    def _key_of(self, p: torch.Tensor) -> int:
        key = self._param_key.get(id(p))
        if key is None:
            key = self._param_key[id(p)] = len(self._param_key)
            self._param_numels[key] = p.numel()
        return key

    def _name_of(self, key: int) -> str:
        return self._param_names.get(key, f"param{key}")

    def agreed_config(self) -> dict:
        """What every rank must have alike (checked once, collectively)."""
        agreed = {**self.codec.config(), "error_feedback": self.error_feedback, "exchange": self.exchange,
                  "ranks_per_node": self.ranks_per_node, "server_codec": self.server_codec.config(),
                  "chunk_size": self.chunk_size,
                  "worker_momentum": None if self.worker_momentum is None else self.worker_momentum.beta}
        if self._optimizer is not None:
            agreed["optimizer"] = self._optimizer.agreed_config()
        return agreed

    # -- plans -------------------------------------------------------------------------------------
    def _plan(self, signature: tuple, numels: list, device) -> Plan:
        plan = self._plans.get(signature)
        if plan is None:
            scratch = None
            if self.measure_error and not self.error_feedback:
                scratch = torch.empty(sum(numels), dtype=torch.float32, device=device)
            plan = self._plans[signature] = self._build_plan(signature, numels, device, self.codec,
                                                             self.server_codec, self._strategies, scratch)
        return plan

    def _warmup_plan(self, signature: tuple, numels: list, device, codec) -> Plan:
        """The plan of an attached optimizer's warm-up or variance refresh: ``codec`` None is a
        full-precision all-reduce; a codec (``OneBitAdam``'s warm-up codec, fixed for the optimizer
        the hook has) is exchanged like the hook's own, without error feedback."""
        key = (signature, codec is None)
        self._warmup_used.add(key)
        plan = self._full_plans.get(key)
        if plan is not None:
            return plan
        if codec is None:
            layout = Layout(numels, signature)
            w, me = collectives.world_size(self.process_group), collectives.rank(self.process_group)
            strategy = FullPrecision(self.codec, self.server_codec, self.process_group, w, me)
            payload, sent, values = strategy.bytes(layout, None)
            plan = Plan(layout, strategy.name, "the optimizer's uncompressed warm-up", strategy, [(0, layout.numel)],
                        [layout], [None], payload, sent, values)
        else:
            server = server_codec_for(codec, None, codec.config())
            plan = self._build_plan(signature, numels, device, codec, server, self._warmup_strategies, None)
            plan.reason = f"the optimizer's warm-up codec; {plan.reason}"
        self._full_plans[key] = plan
        return plan

    def _build_plan(self, signature, numels, device, codec, server_codec, strategies: dict, scratch) -> Plan:
        layout = Layout(numels, signature)
        w, me = collectives.world_size(self.process_group), collectives.rank(self.process_group)
        bounds = chunk_bounds(layout.numel, self.chunk_size)
        layouts = piece_layouts(layout, bounds)
        mode, reason = self._choose(layouts[0], w, codec, server_codec)
        strategy = strategies.get(mode)
        if strategy is None:
            extra = {"ranks_per_node": self.ranks_per_node} if mode == "hierarchical" else {}
            strategy = strategies[mode] = STRATEGIES[mode](codec, server_codec, self.process_group, w, me, **extra)
        buffers = [strategy.prepare(sl, device) for sl in layouts]
        sizes = [strategy.bytes(sl, b) for sl, b in zip(layouts, buffers)]
        return Plan(layout, mode, reason, strategy, bounds, layouts, buffers, sum(s[0] for s in sizes),
                    sum(s[1] for s in sizes), sum(s[2] for s in sizes), scratch)

    def _choose(self, layout: Layout, w: int, codec, server_codec) -> tuple:
        if w != dist.get_world_size():
            # the extra groups of the other exchanges are created by dist.new_group, which every
            # rank of the job must enter: ranks outside this subgroup never would (a hang)
            if self.exchange in ("alltoall", "hierarchical"):
                raise ValueError(f"exchange={self.exchange!r} needs the default process group (this one has {w} of "
                                 f"{dist.get_world_size()} ranks); use exchange='allgather' for a subgroup")
            return "allgather", "process group is a subgroup: all-gather only"
        from ..codecs.wire import payload_nbytes
        size = payload_nbytes(codec.body_nbytes(layout))
        slot, mean_slot = TwoPhase.slots(codec, server_codec, layout, w) if layout.numel >= w > 1 else (0, 0)
        return choose(self.exchange, w, layout.numel, (w - 1) * size, (w - 1) * (slot + mean_slot),
                      ranks_per_node=self._ranks_per_node_checked(w), bits=server_codec.bits)

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
