"""The chunked CPU per-block path of uniform / stochastic (``UniformCodec._encode_blocks`` /
``_decode_blocks``) against a frozen copy of the whole-bucket implementation it replaced: codes,
bodies, residuals, squared sums and decoded outputs must be bitwise the same (bits 1..8, block
sizes 16 / 64 / 256 / "layer", ragged layouts, chunk edges inside blocks, half-precision and float64
inputs, non-finite inputs, constant blocks, magnitudes that need the float64 grid)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ddp_qhooks.codecs import _random
from ddp_qhooks.codecs.base import EncodeInfo, Layout, sum_sq as _sq
from ddp_qhooks.codecs.blocks import blocks_for
from ddp_qhooks.codecs.packing import pack_codes, unpack_codes
from ddp_qhooks.codecs.uniform import CHUNK, StochasticCodec, UniformCodec


class _Frozen:
    """The per-block methods as they were before the chunked CPU path (verbatim)."""

    def _encode_blocks(self, x, meta, codes, layout, block_size, key, error_out, meta_done=False):
        runs = blocks_for(layout, block_size).runs
        nblocks = meta.shape[0]
        if not meta_done:
            for start, nb, blen, bi in runs:
                view = x[start:start + nb * blen].view(nb, blen)
                self._range_run(view, meta[bi:bi + nb, 0], meta[bi:bi + nb, 1])
            if not bool(torch.isfinite(meta).all()):
                return EncodeInfo(finite=False)
        lo = meta[:, 0].double()
        span = meta[:, 1].double() - lo
        work = torch.float32 if self._grid_ok_fp32(lo, span) else torch.float64
        inv = torch.where(span > 0, self.levels / span, torch.zeros_like(span)).to(work)
        scale = (span / self.levels).to(work)
        lo_w = lo.to(work)
        xw = x.to(work)
        dither = _random.param_dither(layout, key, x.device) if self.stochastic else None
        ci = torch.empty(layout.numel, dtype=torch.uint8, device=x.device)
        err = torch.empty(layout.numel, dtype=work, device=x.device) if error_out is not None else None
        for start, nb, blen, bi in runs:
            sl = slice(start, start + nb * blen)
            xv = xw[sl].view(nb, blen)
            lo_c, inv_c, scale_c = lo_w[bi:bi + nb, None], inv[bi:bi + nb, None], scale[bi:bi + nb, None]
            v = (xv - lo_c).mul_(inv_c)       # subtract first: accurate near lo
            if dither is not None:
                v += dither[sl].view(nb, blen).to(work)
            else:
                v += 0.5
            v.floor_().clamp_(0, self.levels)  # clamp: fp round-off at the range ends only
            ci[sl].copy_(v.view(-1))
            if err is not None:
                torch.sub(xv, lo_c, out=err[sl].view(nb, blen)).sub_(v.mul_(scale_c))
        pack_codes(ci, self.bits, out=codes)
        if err is None:
            return EncodeInfo()
        error_out.copy_(err)
        mag = float(meta.abs().max()) if nblocks else 0.0
        return EncodeInfo(True, _sq(err, mag), _sq(x, mag))

    def _decode_blocks(self, parts, layout, out, divisor, work, negative=None):  # (negative: not used here)
        runs = blocks_for(layout, self.block_size).runs
        acc = torch.zeros(layout.numel, dtype=work, device=out.device)
        # offsets summed over ranks in float64 first and added once (exact for constant blocks)
        lo_sum = (sum(meta[:, 0].to(torch.float64) for meta, _ in parts) / divisor).to(work)
        for meta, codes in parts:
            scale = ((meta[:, 1].to(torch.float64) - meta[:, 0].to(torch.float64)) / self.levels / divisor).to(work)
            ci = unpack_codes(codes, self.bits, layout.numel).to(work)
            for start, nb, blen, bi in runs:
                sl = slice(start, start + nb * blen)
                acc[sl].view(nb, blen).add_(ci[sl].view(nb, blen).mul_(scale[bi:bi + nb, None]))
        for start, nb, blen, bi in runs:
            acc[start:start + nb * blen].view(nb, blen).add_(lo_sum[bi:bi + nb, None])
        return out.copy_(acc)


class RefUniform(_Frozen, UniformCodec):
    pass


class RefStochastic(_Frozen, StochasticCodec):
    pass


REF = {"uniform": RefUniform, "stochastic": RefStochastic}
NEW = {"uniform": UniformCodec, "stochastic": StochasticCodec}


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns (NaNs compare by payload, -0.0 differs from +0.0)."""
    t = t.contiguous()
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits_of(a), bits_of(b))


def sq_same(a, b) -> bool:
    return a == b or (a is not None and b is not None and math.isnan(a) and math.isnan(b))


RECIPES = ("normal", "offset", "huge", "tiny", "const_blocks", "zeros", "wide", "ints", "nonfinite",
           "mixed_blocks", "positive", "bigspan")


def make_values(recipe: str, n: int, rng: np.random.Generator, block: int) -> np.ndarray:
    if recipe == "normal":
        v = rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 4)
    elif recipe == "offset":  # far from zero relative to the spread
        v = 1000.0 + rng.standard_normal(n) * 1e-3
    elif recipe == "huge":
        v = rng.standard_normal(n) * 1e37
    elif recipe == "tiny":
        v = rng.standard_normal(n) * 1e-33
    elif recipe == "const_blocks":  # constant runs of the block length: many spans are 0
        v = np.repeat(rng.standard_normal(n // max(block, 1) + 2), max(block, 1))[:n]
        v[rng.integers(0, n, max(1, n // 997))] += 1.0
    elif recipe == "zeros":
        v = np.zeros(n)
    elif recipe == "wide":
        v = np.sign(rng.standard_normal(n)) * np.exp2(rng.uniform(-140, 120, n))
    elif recipe == "ints":
        v = rng.integers(-3, 4, n).astype(np.float64)
    elif recipe == "nonfinite":
        v = rng.standard_normal(n)
        v[rng.integers(0, n)] = [np.nan, np.inf, -np.inf][rng.integers(0, 3)]
    elif recipe == "mixed_blocks":  # scales varying block to block
        v = rng.standard_normal(n) * np.exp2(rng.integers(-30, 30, n // 7 + 1)).repeat(7)[:n]
    elif recipe == "positive":
        v = rng.uniform(0.5, 2.0, n)
    else:  # bigspan: spans near the float32 limit of the grid
        v = rng.uniform(-1, 1, n) * 3e37
    return v


def random_layout(rng: np.random.Generator, big: bool) -> Layout:
    if big:  # crossing chunk edges inside blocks
        sizes = [int(rng.integers(CHUNK // 3, CHUNK)), int(rng.integers(1, 300)), int(rng.integers(CHUNK // 2, CHUNK))]
    else:
        sizes = [int(rng.integers(0, 2000)) if rng.random() < 0.8 else int(rng.integers(0, 5)) for _ in range(int(rng.integers(1, 7)))]
        if sum(sizes) == 0:
            sizes.append(1)
    keys = [int(k) for k in rng.integers(0, 2 ** 62, len(sizes))]
    return Layout(sizes, keys)


def check_case(name, bits, block, layout, x, key, err_dtype, divisor, out_dtype, rng):
    ref, new = REF[name](bits, block_size=block), NEW[name](bits, block_size=block)
    n = layout.numel
    nbytes = new.body_nbytes(layout)
    bodies = []
    for _ in range(2):  # the second call reuses the scratch buffers
        b_ref = torch.full((nbytes,), 7, dtype=torch.uint8)
        b_new = torch.full((nbytes,), 7, dtype=torch.uint8)
        e_ref = e_new = None
        if err_dtype == "strided":
            e_ref = torch.full((2 * n,), 3.0)[::2]
            e_new = torch.full((2 * n,), 3.0)[::2]
        elif err_dtype is not None:
            e_ref = torch.full((n,), 3.0, dtype=err_dtype)
            e_new = torch.full((n,), 3.0, dtype=err_dtype)
        i_ref = ref.encode(x, b_ref, layout, key, error_out=e_ref)
        i_new = new.encode(x, b_new, layout, key, error_out=e_new)
        case = (name, bits, block, layout.param_numels, x.dtype, err_dtype)
        assert i_ref.finite == i_new.finite, case
        assert same(b_ref, b_new), case
        if e_ref is not None:
            assert same(e_ref, e_new), case
            assert sq_same(i_ref.error_sq, i_new.error_sq) and sq_same(i_ref.input_sq, i_new.input_sq), case
        bodies.append(b_new)
        key += 1
    if not i_new.finite:
        return
    if rng.random() < 0.2:  # a body whose metadata has hi < lo (never encoded; decoders must agree)
        nblocks = len(layout.block_lengths(block))
        meta = bodies[0][: 8 * nblocks].view(torch.float32).view(nblocks, 2)
        meta[:, [0, 1]] = meta[:, [1, 0]].clone()
    for count in (1, 2):
        o_ref = torch.full((n,), 5.0, dtype=out_dtype)
        o_new = torch.full((n,), 5.0, dtype=out_dtype)
        ref.decode(bodies[:count], layout, o_ref, divisor=divisor)
        new.decode(bodies[:count], layout, o_new, divisor=divisor)
        assert same(o_ref, o_new), (name, bits, block, layout.param_numels, count, divisor, out_dtype)


BLOCKS = (16, 64, 256, "layer", 1, 3, 1000, None)


@pytest.mark.parametrize("name", ["uniform", "stochastic"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_blocks_bitwise_equal_to_reference(name, bits, one_torch_thread):
    rng = np.random.default_rng(1000 * bits + (name == "stochastic"))
    for case in range(60):
        block = BLOCKS[case % len(BLOCKS)]
        recipe = RECIPES[(case // len(BLOCKS) + case) % len(RECIPES)]
        layout = random_layout(rng, big=False)
        dtype = [torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.float64][int(rng.integers(0, 5))]
        values = make_values(recipe, layout.numel, rng, block if isinstance(block, int) else 64)
        with np.errstate(over="ignore", invalid="ignore"):
            x = torch.from_numpy(values).to(dtype)
        err_dtype = [torch.float32, torch.float32, None, "strided", torch.float16][int(rng.integers(0, 5))]
        out_dtype = [torch.float32, torch.float32, torch.float16, torch.bfloat16][int(rng.integers(0, 4))]
        check_case(name, bits, block, layout, x, int(rng.integers(0, 2 ** 62)), err_dtype,
                   int(rng.integers(1, 4)), out_dtype, rng)


@pytest.mark.parametrize("name", ["uniform", "stochastic"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("block", [16, 256, "layer", 1000])
def test_blocks_bitwise_large_layouts(name, bits, block, one_torch_thread):
    """Buckets of more than one chunk, with chunk edges inside blocks and parameters."""
    rng = np.random.default_rng(7 + bits)
    for recipe in ("normal", "const_blocks", "tiny"):
        layout = random_layout(rng, big=True)
        x = torch.from_numpy(make_values(recipe, layout.numel, rng, block if isinstance(block, int) else 64)).float()
        check_case(name, bits, block, layout, x, 12345, torch.float32, 2, torch.float32, rng)
    layout = Layout([CHUNK + 256 * 3, 512, 2 * CHUNK + 5])  # whole blocks, several chunks
    x = torch.randn(layout.numel, generator=torch.Generator().manual_seed(bits)).to(torch.bfloat16)
    check_case(name, bits, block, layout, x, 99, None, 1, torch.float32, rng)
    check_case(name, bits, block, layout, x, 98, torch.float32, 3, torch.bfloat16, rng)


@pytest.mark.parametrize("name", ["uniform", "stochastic"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_blocks_bitwise_float64_inputs_outside_their_float32_range(name, bits, one_torch_thread):
    """float64 buckets worked in float64 (a tiny value forces it): values off the float32 grid lie
    outside their block's float32 (lo, hi), so v leaves [0, L + 1) and must be clamped (found by the
    fuzzer: stochastic 2 bits, blocks of 2, values near 1)."""
    rng = np.random.default_rng(500 + bits)
    for block in (2, 3, 16, 256, "layer", None):
        for spread in (1e-7, 1e-9, 1e-5):
            n = int(rng.integers(100, 6000))
            layout = Layout([n // 3, n - n // 3], [1, 2])
            values = 1.0 + rng.standard_normal(n) * spread
            values[int(rng.integers(0, n))] = 1e-45
            x = torch.from_numpy(values)
            for err_dtype in (torch.float32, None):
                check_case(name, bits, block, layout, x, int(rng.integers(0, 2 ** 62)), err_dtype, 1, torch.float32, rng)


def test_nonfinite_leaves_error_out(one_torch_thread):
    layout = Layout([300, 700])
    x = torch.randn(1000)
    x[555] = math.inf
    for name in NEW:
        codec = NEW[name](4, block_size=256)
        err = torch.full((1000,), 3.0)
        body = torch.zeros(codec.body_nbytes(layout), dtype=torch.uint8)
        assert codec.encode(x, body, layout, 1, error_out=err) == EncodeInfo(finite=False)
        assert bool((err == 3.0).all())
