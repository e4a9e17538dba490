"""CUDA / NCCL checks.  Skipped where no GPU is present (as in CI); run on a GPU machine with
``python -m pytest -q tests/test_cuda.py``."""
import datetime
import os
import subprocess
import sys
import warnings

import _dist
import pytest
import torch
import torch.distributed as dist

import ddp_qhooks
from ddp_qhooks.codecs import CODECS, Layout, examples, make_codec, pack_codes, unpack_codes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_on_cuda_matches_cpu(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (0, 1, 7, 8, 9, 1000, 100_003):
        codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.uint8)
        packed_cpu = pack_codes(codes, bits)
        packed_gpu = pack_codes(codes.cuda(), bits)
        assert torch.equal(packed_gpu.cpu(), packed_cpu)
        assert torch.equal(unpack_codes(packed_gpu, bits, n).cpu(), codes)


@pytest.mark.parametrize("name", ["uniform", "stochastic"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("block_size", [None, 64])
def test_quantizers_on_cuda(name, bits, block_size):
    codec = make_codec(name, bits=bits, block_size=block_size)
    x = torch.randn(300_001, generator=torch.Generator().manual_seed(bits)) * 3
    layout = Layout([100_000, 200_001])
    results = {}
    for device in ("cpu", "cuda"):
        xd = x.to(device)
        body = torch.empty(codec.body_nbytes(layout), dtype=torch.uint8, device=device)
        err = torch.empty_like(xd)
        info = codec.encode(xd, body, layout, key=7, error_out=err)
        out = torch.empty_like(xd)
        codec.decode([body, body], layout, out, divisor=2)
        assert info.finite
        assert torch.allclose(err, xd - out, atol=1e-5)
        results[device] = out.cpu()
    if block_size is None:
        step = float(x.max() - x.min()) / (2 ** bits - 1)
    else:
        step = 6 * 3 * 2 / (2 ** bits - 1)  # generous: per-block ranges are smaller
    bound = 0.5 if name == "uniform" else 1.0
    assert float((results["cuda"] - x).abs().max()) <= bound * step * (1 + 1e-4) + 1e-6
    # same dither / same rounding rule on both devices: identical except fp32 ties
    assert float((results["cuda"] != results["cpu"]).float().mean()) < 1e-3


@pytest.mark.parametrize("name", ["none", "fp16", "bf16"])
def test_casts_on_cuda(name):
    codec = make_codec(name)
    x = torch.randn(10_001, device="cuda")
    layout = Layout.flat(x.numel())
    body = torch.empty(codec.body_nbytes(layout), dtype=torch.uint8, device="cuda")
    codec.encode(x, body, layout)
    out = torch.empty_like(x)
    codec.decode([body], layout, out)
    dtype = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    assert torch.equal(out, x.to(dtype).float())


def _nccl_train(rank, world, codec, steps, **extra):
    torch.cuda.set_device(rank % torch.cuda.device_count())
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)).cuda()
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])
    options = {"bits": 4, "block_size": 128} if codec in ("uniform", "stochastic") else {}
    state = ddp_qhooks.register(ddp, codec, **options, **extra) if codec != "plain" else None
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        x = torch.randn(32, 64, generator=g).cuda()
        y = torch.randint(0, 10, (32,), generator=g).cuda()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    params = torch.cat([p.detach().flatten() for p in model.parameters()]).cpu()
    return {"params": params, "stats": state.stats() if state else None,
            "state": state.state_dict() if state else None}


def _init_nccl_single(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))


@pytest.mark.parametrize("codec", ["uniform", "stochastic", "none", "fp16", "bf16"])
def test_nccl_single_rank_training(codec, tmp_path):
    _init_nccl_single(tmp_path)
    try:
        plain = _nccl_train(0, 1, "plain", 5)
        hooked = _nccl_train(0, 1, codec, 5)
    finally:
        dist.destroy_process_group()
    s = hooked["stats"]
    assert s["steps"] == 5 and s["wire_bytes_sent"] == 0 and s["payload_bytes"] > 0
    assert torch.isfinite(hooked["params"]).all()
    if codec == "none":
        assert torch.equal(hooked["params"], plain["params"])
    else:
        assert torch.allclose(hooked["params"], plain["params"], atol=0.05)
    sd = hooked["state"]
    assert all(v.device.type == "cpu" for v in sd["residuals"].values())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for a 2-rank NCCL run")
def test_nccl_two_ranks_agree():
    out = _dist.results(_nccl_two, 2, backend="nccl")
    assert torch.equal(out[0]["params"], out[1]["params"])


def _nccl_two(rank, world):
    return _nccl_train(rank, world, "stochastic", 5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for a 2-rank NCCL run")
@pytest.mark.parametrize("codec", ["stochastic", "sign"])
def test_nccl_two_phase_exchange(codec):
    out = _dist.results(_nccl_exchange, 2, codec, {"exchange": "alltoall"}, backend="nccl")
    assert torch.equal(out[0]["params"], out[1]["params"]) and torch.isfinite(out[0]["params"]).all()
    assert out[0]["stats"]["exchange_last_step"].get("alltoall", 0) >= 1
    assert any(float(v.abs().sum()) > 0 for v in out[0]["state"]["server_residuals"].values())


@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 GPUs for 2 nodes x 2 ranks")
def test_nccl_hierarchical_exchange():
    out = _dist.results(_nccl_exchange, 4, "stochastic", {"exchange": "hierarchical", "ranks_per_node": 2},
                        backend="nccl")
    assert all(torch.equal(out[0]["params"], o["params"]) for o in out[1:])
    assert out[0]["stats"]["exchange_last_step"].get("hierarchical", 0) >= 1


def _nccl_exchange(rank, world, codec, extra):
    return _nccl_train(rank, world, codec, 5, **extra)


def _multi_bucket_run(out_path, codec, steps=6):
    """One NCCL rank, a model cut into several DDP buckets, the engine on the GPU: final params."""
    store = dist.FileStore(out_path + ".store", 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(6)]).cuda()
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0], bucket_cap_mb=0.3)
    ddp_qhooks.register(ddp, codec, bits=4 if codec != "sign" else 1, chunk_size=1 << 16)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 256, generator=g).cuda()
        opt.zero_grad()
        ddp(x).square().mean().backward()
        opt.step()
    torch.save(torch.cat([p.detach().flatten() for p in model.parameters()]).cpu(), out_path)
    dist.destroy_process_group()


@pytest.mark.parametrize("codec", ["stochastic", "sign"])
def test_several_buckets_bitwise_equal_to_launch_blocking(codec, tmp_path):
    """Encoding on the compute stream and decoding on the completion thread's stream: any missing
    ordering between them shows up as a difference against fully serialized launches."""
    params = {}
    for blocking in ("0", "1"):
        out = str(tmp_path / f"p{blocking}.pt")
        env = dict(os.environ, CUDA_LAUNCH_BLOCKING=blocking, PYTHONPATH=os.pathsep.join(sys.path))
        subprocess.run([sys.executable, __file__, out, codec], env=env, check=True, timeout=300)
        params[blocking] = torch.load(out)
    assert torch.equal(params["0"], params["1"])


def _hook_args(codec) -> dict:
    """The codec's first registry example that accepts error feedback, else its first without (as
    test_engine._state)."""
    for bits, options in examples(codec):
        try:
            ddp_qhooks.QuantizedHookState(None, codec=codec, bits=bits, **options)
            return dict(bits=bits, **options)
        except ValueError:
            continue
    bits, options = examples(codec)[0]
    return dict(bits=bits, error_feedback=False, **options)


@pytest.mark.parametrize("codec", list(CODECS))
def test_steady_state_syncs_are_the_engines_one(codec, tmp_path):
    """torch's sync debug mode counts what the CPU tests count with a dispatch mode
    (test_engine.test_every_codec_reads_nothing_on_an_accelerator, the read-free path forced on the
    CPU), and copies of host values to the GPU: per step only the engine's one read."""
    _init_nccl_single(tmp_path)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256)).cuda()
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0], bucket_cap_mb=1)
        ddp_qhooks.register(ddp, codec, measure_error=False, **_hook_args(codec))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        x = torch.randn(32, 256, device="cuda")

        def step():
            opt.zero_grad()
            ddp(x).square().mean().backward()
            opt.step()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        steps = 3
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        assert syncs <= steps, (codec, syncs, [str(w.message)[:120] for w in caught][:5])
    finally:
        dist.destroy_process_group()


def test_bf16_model_trains_with_the_hook(tmp_path):
    _init_nccl_single(tmp_path)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).cuda()
        model = model.to(torch.bfloat16)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
        state = ddp_qhooks.register(ddp, "stochastic", bits=4)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(30):
            x = torch.randn(64, 64, generator=g).cuda().to(torch.bfloat16)
            y = torch.randint(0, 10, (64,), generator=g).cuda()
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(ddp(x).float(), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert state.stats()["steps"] == 30 and state.stats()["nonfinite_steps"] == 0
        assert sum(losses[-5:]) < sum(losses[:5])
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # worker of test_several_buckets_bitwise_equal_to_launch_blocking
    _multi_bucket_run(sys.argv[1], sys.argv[2])
