"""The engine's pipeline, independent of DDP: ordering between threads, host reads, chunking.

CUDA properties are proved here on the CPU:

* encoding runs on the caller's thread and decoding on the completion thread (on CUDA: on two
  streams), so interleaving bucket k+1's encode between bucket k's launch and its decode must give
  bitwise the sequential result, for every codec and exchange;
* host reads of device values (``.item()``, ``float()``, ``bool()``, ``nonzero``, masked
  selection) are counted with a ``TorchDispatchMode`` in steady-state steps, and ``.tolist()``
  (which does not dispatch) by wrapping it: the engine itself reads one value per step (the
  step's non-finite flag, at its end, on the completion thread), and each codec's own reads are
  pinned to a per-codec budget.
"""
import collections
import threading
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ddp_qhooks
from ddp_qhooks.codecs import CODECS, Layout, examples, make_codec
from ddp_qhooks.codecs.base import read_free
from ddp_qhooks.codecs.blocks import blocks_for
from ddp_qhooks.engine import QuantizedHookState, Unit, submit
from ddp_qhooks.engine.chunks import chunk_bounds
from ddp_qhooks.engine import completion as completion_mod

import _dist

HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::item"}


def _state(name, **kw):
    """A state for the codec's first registry example that accepts error feedback (unbiased codecs
    whose error can exceed the value refuse it: their first example without)."""
    for bits, options in examples(name):
        try:
            return QuantizedHookState(None, codec=name, bits=bits, **options, **kw)
        except ValueError:
            continue
    bits, options = examples(name)[0]
    return QuantizedHookState(None, codec=name, bits=bits, error_feedback=False, **options, **kw)


def _units(rank, step, sizes):
    g = torch.Generator().manual_seed(100 * rank + step)
    params = [[torch.nn.Parameter(torch.zeros(n)) for n in s] for s in sizes]
    return params, [torch.randn(sum(s), generator=g) * (1 + i) for i, s in enumerate(sizes)]


def _run_steps(state, params, sizes, rank, steps, interleave):
    """Two units per step; with ``interleave`` the completion thread is held until the second
    unit is encoded and launched, so unit 0 is decoded after unit 1's encode."""
    outs = []
    for step in range(steps):
        _, bufs = _units(rank, step, sizes)
        gate = threading.Event()
        if interleave:
            real = state._completion._advance

            def held(*a, _real=real):
                gate.wait()
                return _real(*a)
            state._completion._advance = held
        futs = [submit(state, Unit(i, bufs[i], params[i], i == len(bufs) - 1)) for i in range(len(bufs))]
        gate.set()
        if interleave:
            state._completion._advance = real
        outs.append([f.wait().clone() for f in futs])
    return outs


def _w_interleave(rank, world, exchange):
    sizes = [[3000, 17], [2500, 40, 9]]
    out = {}
    for name in CODECS:
        kw = {"ranks_per_node": 2} if exchange == "hierarchical" else {}
        runs = []
        for interleave in (False, True):
            params, _ = _units(rank, 0, sizes)
            state = _state(name, exchange=exchange, seed=3, **kw)
            runs.append(_run_steps(state, params, sizes, rank, 3, interleave))
        out[name] = (runs, state.stats()["exchange_last_step"])
    return out


@pytest.mark.parametrize("exchange,world", [("allgather", 2), ("alltoall", 3), ("hierarchical", 4)])
def test_interleaved_encode_and_decode_equal_the_sequential_order(exchange, world):
    for rank_out in _dist.results(_w_interleave, world, exchange, timeout_s=120):
        # alltoall falls back to all-gather where two-phase would send more (sign, ternary: their
        # mean is re-encoded at 2 bits)
        used = [name for name, (_, modes) in rank_out.items() if set(modes) == {exchange}]
        assert len(used) >= len(CODECS) - 2, (exchange, used)
        for name, ((sequential, interleaved), modes) in rank_out.items():
            assert set(modes) <= {exchange, "allgather"}, (name, modes)
            for a, b in zip(sequential, interleaved):
                for x, y in zip(a, b):
                    assert torch.equal(x, y), name


def _where() -> str:
    """The innermost ddp_qhooks frames of the current stack (for tests/_where_reads.py)."""
    stack = [f for f in traceback.extract_stack()[:-1] if "ddp_qhooks/" in f.filename and "/tests/" not in f.filename]
    return " <- ".join(f"{f.filename.split('ddp_qhooks/')[-1]}:{f.lineno} {f.name}" for f in reversed(stack[-4:]))


class _HostReads(TorchDispatchMode):
    def __init__(self, log, lock, where=False):
        super().__init__()
        self.log, self.lock, self.where = log, lock, where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name in HOST_READS:
            with self.lock:
                self.log.append((threading.current_thread().name, name, _where() if self.where else None))
        return func(*args, **(kwargs or {}))


def _w_reads(rank, world, codecs, options, steps=3, warmup=3, where=False, accelerator_path=False):
    """Host reads per steady-state step, per codec: (on the caller's thread, on the completion thread,
    the ops read; with ``where`` also the reads per step by (thread T/C, op, innermost frames))."""
    out = {}
    if accelerator_path:  # codecs as on an accelerator: their read-free path, on this CPU
        with read_free():
            return _w_reads(rank, world, codecs, options, steps, warmup, where)
    real_advance = completion_mod.Completion._advance
    for name in codecs:
        log, lock = [], threading.Lock()
        counting = {"on": False}

        def advance(self, *a):
            if not counting["on"]:
                return real_advance(self, *a)
            with _HostReads(log, lock, where):
                return real_advance(self, *a)
        completion_mod.Completion._advance = advance
        real_tolist = torch.Tensor.tolist

        def tolist(self):
            if counting["on"]:
                with lock:
                    log.append((threading.current_thread().name, "Tensor.tolist", _where() if where else None))
            return real_tolist(self)
        torch.Tensor.tolist = tolist
        try:
            sizes = [[40000, 64], [30000, 7]]
            params, _ = _units(rank, 0, sizes)
            state = _state(name, measure_error=False, **options)
            _run_steps(state, params, sizes, rank, warmup, False)
            counting["on"] = True
            with _HostReads(log, lock, where):
                _run_steps(state, params, sizes, rank, steps, False)
            counting["on"] = False
        finally:
            completion_mod.Completion._advance = real_advance
            torch.Tensor.tolist = real_tolist
        caller = sum(1 for t, _, _ in log if not t.startswith("ddp_qhooks"))
        completion = sum(1 for t, _, _ in log if t.startswith("ddp_qhooks"))
        out[name] = (caller / steps, completion / steps, sorted({n for _, n, _ in log}))
        if where:
            at = collections.Counter(("C" if t.startswith("ddp_qhooks") else "T", n, f) for t, n, f in log)
            out[name] += ({k: v / steps for k, v in at.items()},)
    return out


def test_host_reads_per_step():
    """The engine reads one value per step (the step's non-finite flag, on the completion thread);
    the rest is each codec's own (see HOST_READ_BUDGET), pinned so that none is added unnoticed."""
    got = _dist.results(_w_reads, 2, list(CODECS), {"exchange": "allgather"}, timeout_s=180)[0]
    report = {k: v[:2] for k, v in got.items()}
    for name, (caller, completion, _) in got.items():
        assert completion >= 1, (name, report)  # the end-of-step flag
        assert caller + completion <= HOST_READ_BUDGET[name], (name, report)


def test_every_codec_reads_nothing_on_an_accelerator():
    """On an accelerator (here: the codecs' read-free path forced on the CPU) every codec leaves
    everything on the device: the step's one read is the engine's, on the completion thread."""
    got = _dist.results(_w_reads, 2, list(CODECS), {"exchange": "allgather"}, 3, 3, False, True,
                        timeout_s=180)[0]
    for name, (caller, completion, ops) in got.items():
        assert (caller, completion) == (0, 1), (name, caller, completion, ops)


@pytest.mark.parametrize("exchange,world", [("alltoall", 3), ("hierarchical", 4)])
def test_two_phase_and_hierarchical_exchanges_read_nothing_on_an_accelerator(exchange, world):
    """The server re-encode (two-phase) and the node's full-precision sum (hierarchical) keep the
    step's one read too."""
    options = {"exchange": exchange, **({"ranks_per_node": 2} if exchange == "hierarchical" else {})}
    got = _dist.results(_w_reads, world, ["stochastic", "sign", "kmeans"], options, 3, 3, False, True,
                        timeout_s=180)[0]
    for name, (caller, completion, ops) in got.items():
        assert (caller, completion) == (0, 1), (exchange, name, caller, completion, ops)


def _grid(name, codec, v):
    """Independent (lo, hi) of the grid a block ``v`` (rows of float64 values) is quantized on:
    its min and max (uniform, stochastic, and adaptive's first encode with stat="minmax"), or
    -+ its L2 norm (qsgd)."""
    if name == "qsgd":
        norm = torch.linalg.vector_norm(v, dim=1)
        return -norm, norm
    return v.amin(1), v.amax(1)


@pytest.mark.parametrize("name,options", [("stochastic", {}), ("uniform", {}), ("stochastic", {"block_size": None}),
                                          ("uniform", {"block_size": "layer"}), ("qsgd", {}),
                                          ("qsgd", {"block_size": 16}), ("adaptive", {}),
                                          ("adaptive", {"grid": "uniform", "block_size": 16})])
def test_the_read_free_path_is_a_valid_quantization(name, options):
    """The read-free grid (float64 arithmetic) gives codes within one step of the value (half a step
    when rounding to nearest), the residual x - deq exactly, and flags a non-finite input."""
    codec = make_codec(name, 4, **options)
    layout = Layout([3000, 700, 5])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(layout.numel, generator=g) * torch.logspace(-3, 3, layout.numel)
    body = torch.empty(codec.body_nbytes(layout), dtype=torch.uint8)
    err = torch.empty(layout.numel)
    with read_free():
        info = codec.encode(x, body, layout, key=7, error_out=err)
        out = codec.decode([body], layout, torch.empty(layout.numel))
    assert info.finite
    step = torch.empty(layout.numel, dtype=torch.float64)
    for start, nb, blen, _ in blocks_for(layout, codec.block_size).runs:
        v = x[start:start + nb * blen].view(nb, blen).double()
        lo, hi = _grid(name, codec, v)
        step[start:start + nb * blen] = ((hi - lo) / codec.levels).repeat_interleave(blen)
    bound = step * (1.0 if codec.stochastic else 0.5) * (1 + 1e-5) + 1e-30
    assert ((x.double() - out.double()).abs() <= bound).all()
    assert torch.allclose(err.double(), x.double() - out.double(), rtol=0, atol=float(step.max()) * 1e-5)
    bad = x.clone()
    bad[1234] = float("nan")
    with read_free():
        info = codec.encode(bad, body, layout, key=7, error_out=err)
    assert isinstance(info.finite_flag, torch.Tensor) and not info.finite


# encoders whose arithmetic differs off the CPU (every grid in float64): a value on a rounding
# boundary may get the neighbouring code there; the others encode bitwise as on the CPU
_GRID64 = {"stochastic", "uniform", "qsgd", "adaptive"}


def _state_of(codec):
    """The codec's running state as plain values (None: it keeps none)."""
    if not hasattr(codec, "state_dict"):
        return None
    return [{k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in e.items()}
            for e in codec.state_dict()["entries"]]


@pytest.mark.parametrize("name,bits,options", [(n, b, o) for n in CODECS for b, o in examples(n)],
                         ids=lambda v: str(v) if not isinstance(v, dict) else "-".join(f"{k}={o}" for k, o in v.items()))
def test_the_read_free_path_agrees_with_the_cpu_path(name, bits, options):
    """Every codec's read-free path (forced on the CPU) against its CPU path over steps that reuse
    running state: the same payloads (bitwise, or within a code of them where the grid is float64),
    the same running state, a residual of x - deq, an average of several payloads equal to the
    float64 mean of their single decodes, and a NaN input flagged on the device with the running
    state left as it was (a first NaN input leaves none)."""
    layout = Layout([3000, 700, 5, 64])
    n = layout.numel
    g = torch.Generator().manual_seed(5)
    cpu, free, other = (make_codec(name, bits, **options) for _ in range(3))

    def encode(codec, x, key, rf):
        body, err = torch.empty(codec.body_nbytes(layout), dtype=torch.uint8), torch.empty(n)
        with read_free(rf):
            return body, err, codec.encode(x, body, layout, key=key, error_out=err)

    def decode(codec, bodies, rf, divisor=1):
        with read_free(rf):
            return codec.decode(bodies, layout, torch.empty(n), divisor).double()

    for step in range(4):
        x = torch.randn(n, generator=g) * (1 + step)
        x[3000:3700] = 0.25 if step == 0 else x[3000:3700]   # a constant block: its first codebook collapses
        tol = 1e-6 * float(torch.linalg.vector_norm(x) if name == "qsgd" else x.abs().max())   # qsgd's grid: +-||x||
        bc, _, ic = encode(cpu, x, step, False)
        bf, ef, i_f = encode(free, x, step, True)
        assert ic.finite and isinstance(i_f.finite_flag, torch.Tensor) and i_f.finite, (name, step)
        dc, df = decode(cpu, [bc], False), decode(free, [bf], True)
        assert torch.allclose(ef.double(), x.double() - df, rtol=0, atol=tol), (name, step)
        if name in _GRID64:
            # the same (lo, hi) per block; codes at most one apart (a value on a rounding boundary,
            # or, rounding stochastically with one range per bucket, another stretch of the dither)
            nb = len(layout.block_lengths(free.block_size))
            mc, mf = (b[:8 * nb].clone().view(torch.float32).view(nb, 2).double() for b in (bc, bf))
            assert torch.allclose(mf, mc, rtol=1e-6, atol=0), (name, step)
            step_of = torch.cat([((mc[bi:bi + nb_, 1] - mc[bi:bi + nb_, 0]) / free.levels).repeat_interleave(blen)
                                 for _, nb_, blen, bi in blocks_for(layout, free.block_size).runs])
            assert ((dc - df).abs() <= step_of * (1 + 1e-5) + tol).all(), (name, step)
        else:
            assert torch.equal(bc, bf) and ((dc - df).abs() <= tol).all(), (name, step)
        assert _state_of(free) == _state_of(cpu), (name, step)
        # an average of payloads of several ranks: the float64 mean of each one decoded on the CPU path
        y = torch.randn(n, generator=g) * 3
        by = encode(other, y, 100 + step, True)[0]
        mean = (decode(cpu, [bf], False) + decode(cpu, [by], False)) / 2
        assert torch.allclose(decode(free, [bf, by], True, 2), mean, rtol=0, atol=4 * tol), (name, step)
        if step == 0:   # a NaN where the collapsed codebook would be refitted: nothing of it is kept
            bad = torch.randn(n, generator=g)
            bad[3001] = float("nan")
            before = _state_of(free)
            info = encode(free, bad, 9, True)[2]
            assert isinstance(info.finite_flag, torch.Tensor) and not info.finite, name
            assert _state_of(free) == before, name
    if hasattr(free, "state_dict"):   # a checkpoint of the device-path state resumes it exactly
        restored = make_codec(name, bits, **options)
        restored.load_state_dict(free.state_dict())
        assert torch.equal(encode(restored, x, 4, True)[0], encode(free, x, 4, True)[0]), name
        assert _state_of(restored) == _state_of(free), name
    fresh, new = make_codec(name, bits, **options), make_codec(name, bits, **options)
    assert not encode(fresh, bad, 9, True)[2].finite
    assert _state_of(fresh) == _state_of(new), name   # a first NaN input leaves no state behind
    assert torch.equal(encode(fresh, x, 3, True)[0], encode(new, x, 3, True)[0]), name


@pytest.mark.parametrize("name", [n for n in CODECS if n != "fp16"])   # fp16 cannot hold 3e38
def test_the_read_free_decoders_average_near_the_float32_limit(name):
    """Without the float32 test the decoders work in float64: the mean of two copies of a payload
    whose values reach 3e38 (their float32 sum would not be finite) is the payload's own value."""
    layout = Layout([300, 64])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(layout.numel, generator=g).sign() * 3e38 * (0.5 + torch.rand(layout.numel, generator=g) / 2)
    bits, options = examples(name)[0]
    codec = make_codec(name, bits, **options)
    body = torch.empty(codec.body_nbytes(layout), dtype=torch.uint8)
    with read_free():
        assert codec.encode(x, body, layout, key=1).finite
        one = codec.decode([body], layout, torch.empty(layout.numel))
        two = codec.decode([body, body], layout, torch.empty(layout.numel), 2)
    assert torch.isfinite(one).all() and torch.allclose(two.double(), one.double(), rtol=1e-6, atol=0)


# host reads per steady-state step on the CPU (2 buckets, 2 ranks, all-gather, measure_error=False,
# error feedback on, each codec's first registry example), as counted by test_host_reads_per_step:
# 1 is the engine's (the step's non-finite flag, at its end); encoders hand finiteness on as a
# device flag (EncodeInfo.finite_flag), copied into the header unread.  What remains per call, on
# 2 encodes (training thread) and 2 decodes (completion thread) a step, are reads that pick the
# faster arithmetic, free on the CPU; on an accelerator no codec reads (every grid in float64,
# finiteness and running state decided on the device: test_every_codec_reads_nothing_on_an_accelerator):
# * uniform / stochastic (per-block grids), decode and encode: 1 each, whether the grids fit
#   float32 or need the float64 fallback (the encoder reads finiteness with it);
# * qsgd (one block per bucket): 1 per encode (lo / hi as numbers for the one-block fast path) and
#   per decode (the grids' float32 test);
# * log, mulaw, sign, ternary: 1 per decode (float32, or float64 where the summed block scales
#   could overflow float32 or a share is subnormal); their encoders read nothing;
# * adaptive: 1 per encode (finiteness, which must keep the running state, with the float32 test
#   and the bounds as numbers) and per decode (the float32 test); kmeans: 2 per encode (finiteness
#   and which codebooks to refit, then the bin-table width of the nearest-level search), none per decode;
# * topk and the casts: none.
HOST_READ_BUDGET = {"stochastic": 5, "uniform": 5, "qsgd": 5, "log": 3, "mulaw": 3, "kmeans": 5, "ternary": 3,
                    "sign": 3, "adaptive": 5, "topk": 1, "fp16": 1, "bf16": 1, "none": 1}


def test_chunk_bounds_are_equal_and_cover_the_unit():
    assert chunk_bounds(10, None) == [(0, 10)]
    assert chunk_bounds(10, 10) == [(0, 10)]
    b = chunk_bounds(1_000_003, 300_000)
    assert len(b) == 4 and b[0][0] == 0 and b[-1][1] == 1_000_003
    assert all(e == s2 for (_, e), (s2, _) in zip(b, b[1:]))
    assert max(e - s for s, e in b) - min(e - s for s, e in b) <= 1


def _w_chunked(rank, world, exchange):
    sizes = [[150_000, 50_000, 33]]
    res = {}
    for codec, bits in (("none", 32), ("stochastic", 4)):
        per = []
        for chunk_size in (None, 1 << 16):
            params, _ = _units(rank, 0, sizes)
            kw = {"bits": bits} if codec != "none" else {}
            state = QuantizedHookState(None, codec=codec, exchange=exchange, chunk_size=chunk_size, **kw)
            outs = _run_steps(state, params, sizes, rank, 2, False)
            per.append((outs, state.stats()["chunks_last_step"]))
        res[codec] = per
    # the exact mean, for comparison
    exact = []
    for step in range(2):
        total = sum(_units(r, step, sizes)[1][0] for r in range(world)) / world
        exact.append(total)
    return res, exact


@pytest.mark.parametrize("exchange,world", [("allgather", 2), ("alltoall", 3)])
def test_chunked_buckets_give_the_same_mean(exchange, world):
    for res, exact in _dist.results(_w_chunked, world, exchange, timeout_s=120):
        (whole, c1), (chunked, c2) = res["none"]
        assert (c1, c2) == (1, 4)
        for step in range(2):
            assert torch.equal(whole[step][0], chunked[step][0])
            torch.testing.assert_close(chunked[step][0], exact[step], rtol=1e-5, atol=1e-6)
        (whole, _), (chunked, _) = res["stochastic"]
        for step in range(2):
            err_whole = (whole[step][0] - exact[step]).norm() / exact[step].norm()
            err_chunked = (chunked[step][0] - exact[step]).norm() / exact[step].norm()
            # 4 bits: each chunk has its own range, never a worse one than the bucket's
            assert 0 < err_chunked < 0.5 and err_chunked <= err_whole * 1.1


def _w_bookkeeping_failure(rank, world):
    from ddp_qhooks.engine import pipeline
    state = QuantizedHookState(None, codec="stochastic", bits=4)
    params, bufs = _units(rank, 0, [[10]])
    real = pipeline._end_of_step

    def broken(state):
        raise RuntimeError("bookkeeping broke")
    pipeline._end_of_step = broken
    try:
        fut = submit(state, Unit(0, bufs[0], params[0], True))
        out, finished = [], threading.Event()

        def wait():
            try:
                fut.wait()
                out.append("completed")
            except Exception as e:  # noqa: BLE001 - the message is the result
                out.append(str(e))
            finished.set()
        threading.Thread(target=wait, daemon=True).start()
        return out[0] if finished.wait(30) else "the future did not complete within 30 s"
    finally:
        pipeline._end_of_step = real


def test_a_failure_on_the_completion_thread_reaches_the_unit_s_future():
    """The step's bookkeeping runs on the completion thread; should it fail, the caller (DDP's
    backward) gets the error instead of waiting forever for a future nobody completes."""
    for message in _dist.results(_w_bookkeeping_failure, 2):
        assert "bookkeeping broke" in message


def test_a_state_pickled_without_newer_fields_still_steps():
    """A state pickled by an older version (no compressed-warm-up counter or per-step flag) is
    completed when unpickled: stats() has every key and a step ends."""
    import pickle
    from ddp_qhooks.engine.pipeline import _end_of_step
    old = QuantizedHookState(None, codec="stochastic", bits=4).__getstate__()
    old["_totals"].pop("compressed_warmup_steps")
    old.pop("_warmup_in_step")
    state = pickle.loads(pickle.dumps(QuantizedHookState(None, codec="stochastic", bits=4)))
    state.__setstate__(old)
    assert state.stats()["compressed_warmup_steps"] == 0
    with state._lock:
        _end_of_step(state)
    assert state.step == 1 and state.stats()["steps"] == 1
