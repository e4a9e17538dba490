"""Adding a codec takes its module, its registry line and its test spec (docs/adding_a_codec.md).

A throwaway codec defined here (``throwaway_int8``: int8 codes, one float32 max|x| per block, the
worked example's codec under another name and id) is registered at runtime with the documented
mechanism (``ddp_qhooks.codecs.register_codec`` for the codec, ``codec_specs.register`` for its test
spec), and removed after.  While registered, it gets what every codec gets without any other file
naming it: the common codec contract (tests/test_codec_family.py's CONTRACT and metadata check), the
fuzzer (tests/test_fuzz.py), the micro-benchmark and fidelity rows, its row in the generated codec
table, the server-codec policy, and a 2-rank Gloo DDP step through ``ddp_qhooks.register`` whose
averaged gradient is checked against an independent computation within the codec's error bound.
The last test runs the worked example's own code blocks from docs/adding_a_codec.md.
"""
from __future__ import annotations

import os
import re
import sys
import types

import _dist
import codec_specs
import numpy as np
import pytest
import torch
from codec_specs import CodecSpec
from codec_specs._ref import EPS32, TINY32, assert_all, assert_equal, meta_floats, nblocks, ref_block_lengths

import ddp_qhooks
from ddp_qhooks import codecs
from ddp_qhooks.codecs import Codec, EncodeInfo, Layout, register_codec, unregister_codec
from ddp_qhooks.codecs.blocks import check_block_size
from ddp_qhooks.codecs.options import check_bits

NAME = "throwaway_int8"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "adding_a_codec.md")


# -- the codec (what would be ddp_qhooks/codecs/<name>.py) ----------------------------------------
class ThrowawayInt8Codec(Codec):
    """int8 codes ``round(127 x / m)``, one float32 ``m = max|x|`` per block; body ``4*blocks + n``."""

    name = NAME
    codec_id = 250   # one header byte, unused by the built-in codecs
    body_formula = "4*blocks + n"
    summary = "int8 codes round(127 x / max|x|), one float32 max|x| per block"
    examples = ((8, {}), (8, {"block_size": 64}))

    def __init__(self, bits: int = 8, block_size: int | str | None = None):
        super().__init__(check_bits(self.name, bits, 8, 8))
        self.block_size = check_block_size(self.name, block_size)

    def config(self) -> dict:
        return {"codec": self.name, "bits": self.bits, "block_size": self.block_size}

    def body_nbytes(self, layout: Layout) -> int:
        return 4 * len(layout.block_lengths(self.block_size)) + layout.numel

    def _block_ids(self, layout: Layout, device):
        lengths = torch.tensor(layout.block_lengths(self.block_size), dtype=torch.int64, device=device)
        return len(lengths), torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)

    def encode(self, x, body, layout, key=0, error_out=None):
        self._check_numel("input", x, layout)
        x64 = x.float().double().reshape(-1)   # the float32 values, in float64
        if not bool(torch.isfinite(x64).all()):
            return EncodeInfo(finite=False)
        nb, ids = self._block_ids(layout, x.device)
        m = torch.zeros(nb, dtype=torch.float64, device=x.device).scatter_reduce_(0, ids, x64.abs(), "amax")
        body[:4 * nb].copy_(m.float().view(torch.uint8))   # exact: each m is a float32 value
        mv = m[ids]
        q = torch.where(mv > 0, x64 / torch.where(mv > 0, mv, 1.0) * 127, 0.0).round_()
        body[4 * nb:4 * nb + layout.numel].copy_(q.to(torch.int8).view(torch.uint8))
        return EncodeInfo() if error_out is None else self._error_via_decode(x, body, layout, error_out)

    def decode(self, bodies, layout, out, divisor=1):
        self._check_numel("output", out, layout)
        nb, ids = self._block_ids(layout, out.device)
        acc = torch.zeros(layout.numel, dtype=torch.float64, device=out.device)
        for body in bodies:
            m = body[:4 * nb].clone().view(torch.float32).double()
            acc += body[4 * nb:4 * nb + layout.numel].view(torch.int8).double() * (m[ids] / 127)
        out.view(-1).copy_(acc.div_(divisor))
        return out


# -- its test spec (what would be tests/codec_specs/<name>.py) -------------------------------------
def _expected_nbytes(bits, options, numels):
    return 4 * nblocks(numels, options) + sum(numels)


def _check_levels(case, codec, x, d, body, blocks, first):
    m_b = meta_floats(body, blocks.count)
    assert_equal(m_b, blocks.reduce(np.maximum, np.abs(x)), "scale must be max |x|")
    m = blocks.expand(m_b)
    q = np.rint(d / np.where(m > 0, m, 1.0) * 127)
    assert_all(np.abs(d - q * m / 127) <= 2 * EPS32 * m + TINY32, "not on the grid k max|x| / 127", d, m,
               names=("d", "m"))
    assert_all(np.abs(d - x) <= m / 254 * (1 + 2.0 ** -20) + 2 * EPS32 * m + TINY32, "error beyond half a step",
               d, x, m, names=("d", "x", "m"))


def _ref_decode(body, param_numels, bits=8, block_size=None, **_):
    lengths = ref_block_lengths(param_numels, block_size)
    raw = np.asarray(body, dtype=np.uint8)
    m = np.frombuffer(raw[:4 * lengths.size].tobytes(), dtype="<f4").astype(np.float64)
    q = raw[4 * lengths.size:4 * lengths.size + int(lengths.sum())].view(np.int8).astype(np.float64)
    return q * np.repeat(m, lengths) / 127


SPEC = CodecSpec(expected_nbytes=_expected_nbytes, check_levels=_check_levels, ref_decode=_ref_decode)


# -- registered for a test, removed after ---------------------------------------------------------
@pytest.fixture
def throwaway():
    before = dict(codecs.CODECS)
    register_codec(ThrowawayInt8Codec)
    codec_specs.register(NAME, SPEC)
    try:
        yield NAME
    finally:
        unregister_codec(NAME)
        codec_specs.unregister(NAME)
    assert codecs.CODECS == before and 250 not in codecs.CODECS_BY_ID


def test_common_contract(throwaway):
    from test_codec_family import CONTRACT, check_metadata, family
    configs = family([throwaway])
    assert configs == [(NAME, 8, {}), (NAME, 8, {"block_size": 64})]   # from the class's examples
    for cfg in configs:
        for check in CONTRACT:
            check(cfg)
    check_metadata(throwaway)


@pytest.mark.fuzz
def test_fuzzing(throwaway):
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from test_fuzz import EXAMPLES, FUZZ, check_documented_errors, fuzz_codec

    fuzz_codec(throwaway, EXAMPLES)

    @settings(FUZZ, max_examples=100)
    @given(data=st.data())
    def errors(data):
        check_documented_errors(throwaway, data)
    errors()


def test_registry_consumers_see_it(throwaway):
    from ddp_qhooks.tools import fidelity, microbench
    assert throwaway in codecs.available_markdown() and throwaway in {r["name"] for r in codecs.available()}
    assert codecs.valid_bits(throwaway) == (8,) and not codecs.compilable(throwaway)
    assert microbench.default_codecs()[-1] == throwaway
    rows = microbench.run(4099, [throwaway], [8, 4], 1, naive=False)["rows"]
    assert [(r["codec"], r["bits"]) for r in rows] == [(throwaway, 8)] and rows[0]["encode_gbs"] > 0
    configs = codecs.fidelity_configs([throwaway])
    assert [c[1:] for c in configs] == [(throwaway, 8, {}), (throwaway, 8, {"block_size": 64})]
    layout, xs = fidelity.synthetic("gaussian", n=4096, count=2)
    (row,) = fidelity.run({"gaussian": (layout, xs)}, configs[:1])
    assert 0 < row["gaussian"]["nmse"] < 1e-3   # half a step of max|x|/127: ~1e-4 for Gaussian values
    codec = codecs.make_codec(throwaway, block_size="layer")
    assert codecs.server_codec_for(codec, None, {"block_size": "layer"}) is codec   # its mean: re-encoded by itself
    assert codecs.server_codec_for(codec, 2, {"block_size": "layer"}).config() == \
        {"codec": "uniform", "bits": 2, "block_size": "layer"}   # no 2-bit width: the fallback codec
    with pytest.raises(ValueError, match="already registered"):
        register_codec(ThrowawayInt8Codec)


def test_register_codec_checks():
    class Clash(ThrowawayInt8Codec):
        name, codec_id = "clash", 1   # uniform's id
    with pytest.raises(ValueError, match="codec_id 1 is taken"):
        register_codec(Clash)

    class Unnamed(ThrowawayInt8Codec):
        name, codec_id, summary = "unnamed", 251, ""
    with pytest.raises(ValueError, match="summary"):
        register_codec(Unnamed)
    assert "clash" not in codecs.CODECS and "unnamed" not in codecs.CODECS


# -- a 2-rank DDP step on Gloo --------------------------------------------------------------------
def _model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3))


def _ddp_step(rank, world, exchange):
    from torch.nn.parallel import DistributedDataParallel as DDP
    register_codec(ThrowawayInt8Codec)   # a spawned process starts from the built-in registry
    model, ref = _model(), _model()
    ddp = DDP(model)
    state = ddp_qhooks.register(ddp, codec=NAME, block_size="layer", exchange=exchange)
    g = torch.Generator().manual_seed(100 + rank)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    ((ddp(x) - y) ** 2).mean().backward()
    ((ref(x) - y) ** 2).mean().backward()   # this rank's own gradient, without DDP
    modes = {plan.mode for plan in state._plans.values()}
    return {"avg": [p.grad.clone() for p in model.parameters()], "local": [p.grad.clone() for p in ref.parameters()],
            "modes": modes, "config": state.codec.config()}


@pytest.mark.parametrize("exchange,quantizations", [("allgather", 1), ("alltoall", 2)])
def test_two_rank_ddp_step(exchange, quantizations):
    """DDP's averaged gradient = the mean of the ranks' own gradients within the codec's error bound:
    half a step (max|g| / 254 per parameter, "layer" blocks) per quantization: once for the
    all-gather; for the two-phase exchange, the mean is re-encoded by the same codec (its server codec)."""
    out = _dist.results(_ddp_step, 2, exchange, timeout_s=120)
    assert all(o["config"]["codec"] == NAME for o in out)
    assert out[0]["modes"] == {exchange}
    for p in range(len(out[0]["avg"])):
        avg = [o["avg"][p].double() for o in out]
        assert torch.equal(avg[0], avg[1]), "ranks disagree"
        local = [o["local"][p].double() for o in out]
        mean = sum(local) / 2
        half_steps = sum(float(g.abs().max()) for g in local) / 2 / 254   # mean over ranks of max|g| / 254
        bound = quantizations * half_steps * (1 + 1e-5) + 1e-7 * float(mean.abs().max()) + 1e-30
        err = float((avg[0] - mean).abs().max())
        assert err <= bound, (p, err, bound)
        assert err > 0 or half_steps == 0   # it was quantized (not an fp32 allreduce)


# -- the worked example of docs/adding_a_codec.md, run from the page ----------------------------------
def _doc_blocks() -> dict:
    """The page's code blocks that start with a ``# <path>`` line, by path."""
    text = open(DOC, encoding="utf-8").read()
    blocks = {}
    for body in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        first = body.split("\n", 1)[0]
        if first.startswith("# ") and first.endswith(".py"):
            blocks[first[2:].strip()] = body
    return blocks


def test_worked_example_runs():
    """The page's codec module and test spec, loaded as the modules they would be, pass the contract
    and a short fuzz run; its registry lines name them."""
    blocks = _doc_blocks()
    assert set(blocks) == {"ddp_qhooks/codecs/absmax8.py", "ddp_qhooks/codecs/__init__.py", "tests/codec_specs/absmax8.py"}
    assert 'from .absmax8 import AbsMax8Codec' in blocks["ddp_qhooks/codecs/__init__.py"]
    assert '"absmax8": AbsMax8Codec,' in blocks["ddp_qhooks/codecs/__init__.py"]
    if "absmax8" in codecs.CODECS:
        pytest.skip("absmax8 is a real codec now: the shared tests cover it")
    made = {}
    for path, pkg in (("ddp_qhooks/codecs/absmax8.py", "ddp_qhooks.codecs"), ("tests/codec_specs/absmax8.py", "codec_specs")):
        mod = types.ModuleType(f"{pkg}.absmax8")
        mod.__package__ = pkg
        mod.__file__ = os.path.join(ROOT, path)
        sys.modules[mod.__name__] = mod   # pickle finds the class by module and name
        exec(compile(blocks[path], path, "exec"), mod.__dict__)
        made[pkg] = mod
    cls = made["ddp_qhooks.codecs"].AbsMax8Codec
    register_codec(cls)
    codec_specs.register("absmax8", made["codec_specs"].SPEC)
    try:
        from test_codec_family import CONTRACT, check_metadata, family
        from test_fuzz import fuzz_codec
        for cfg in family(["absmax8"]):
            for check in CONTRACT:
                check(cfg)
        check_metadata("absmax8")
        fuzz_codec("absmax8", 100)
    finally:
        unregister_codec("absmax8")
        codec_specs.unregister("absmax8")
        for pkg in made:
            sys.modules.pop(f"{pkg}.absmax8", None)
