"""PyTorch Lightning and Hugging Face Accelerate: run the examples as 2-process CPU jobs.

Each test is skipped when its framework is not installed (``pip install lightning accelerate``)
or Fashion-MNIST is missing.  Every job gets a fresh port.
"""
import json
import os
import subprocess
import sys

import _dist  # tests/conftest.py puts tests/ on sys.path
import pytest
import torch

from ddp_qhooks.tools import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

pytestmark = pytest.mark.skipif(not data.available(), reason="Fashion-MNIST not installed (dataset-fashion-mnist)")


def _run(cmd, cwd, port=None, timeout=240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if port is not None:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return subprocess.run([sys.executable, *cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _records(proc, tag) -> dict:
    """{rank: record} of the ``<tag> {json}`` lines the examples print."""
    out, decoder, start = {}, json.JSONDecoder(), 0
    while (start := proc.stdout.find(tag + " {", start)) >= 0:
        start += len(tag) + 1
        rec, _ = decoder.raw_decode(proc.stdout, start)
        out[rec["rank"]] = rec
    return out


def _check_ok(proc, steps) -> dict:
    log = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, log
    stats = _records(proc, "hook-stats")
    assert sorted(stats) == [0, 1], log
    for rec in stats.values():
        assert rec["steps"] == steps, log
        assert rec["compression_ratio"] > 3, log  # 8-bit payloads + headers vs fp32
    assert "test accuracy" in proc.stdout, log
    return stats


def _lightning(tmp_path, *args):
    return _run([os.path.join(EXAMPLES, "lightning_train.py"), "--batch", "32", *args], tmp_path, port=_dist.free_port())


def _accelerate(tmp_path, *args):
    cmd = ["-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={_dist.free_port()}", os.path.join(EXAMPLES, "accelerate_train.py"), "--batch", "32", *args]
    return _run(cmd, tmp_path)


def test_lightning_quantized_strategy_and_checkpoint_resume(tmp_path):
    pytest.importorskip("lightning")
    ckpt = str(tmp_path / "run.ckpt")
    first = _check_ok(_lightning(tmp_path, "--max-steps", "4", "--save-ckpt", ckpt), steps=4)

    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["ddp_qhooks"]
    assert saved["world_size"] == 2 and [s["rank"] for s in saved["ranks"]] == [0, 1]
    assert all(s["step"] == 4 and s["residuals"] for s in saved["ranks"])

    proc = _lightning(tmp_path, "--max-steps", "7", "--resume", ckpt)
    _check_ok(proc, steps=7)  # 4 restored + 3 new
    start = _records(proc, "hook-start")
    for r in (0, 1):  # every rank resumes with its OWN residuals
        assert start[r]["steps"] == 4
        assert start[r]["residual_norm"] == pytest.approx(first[r]["residual_norm"], rel=1e-9)
    assert first[0]["residual_norm"] != pytest.approx(first[1]["residual_norm"], rel=1e-6)


def test_lightning_plain_ddp_strategy_on_cpu_is_detected(tmp_path):
    pytest.importorskip("lightning")
    proc = _lightning(tmp_path, "--max-steps", "3", "--strategy", "plain-ddp")
    log = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode != 0, log
    assert "UNCOMPRESSED" in proc.stderr and "QuantizedDDPStrategy" in proc.stderr, log
    assert "hook-stats" not in proc.stdout, log


def test_accelerate_accumulation_and_save_state(tmp_path):
    pytest.importorskip("accelerate")
    ckpt = tmp_path / "state"
    # 2 micro-batches per optimizer step: no_sync on the first, so the hook runs once per step
    first = _check_ok(_accelerate(tmp_path, "--accumulate", "2", "--max-steps", "4", "--save-state", str(ckpt)), steps=4)
    for r in (0, 1):
        saved = torch.load(ckpt / f"ddp_qhooks_rank{r}.pt", map_location="cpu", weights_only=True)
        assert saved["rank"] == r and saved["step"] == 4 and saved["world_size"] == 2

    proc = _accelerate(tmp_path, "--accumulate", "2", "--max-steps", "6", "--resume", str(ckpt))
    _check_ok(proc, steps=6)
    start = _records(proc, "hook-start")
    for r in (0, 1):
        assert start[r]["steps"] == 4
        assert start[r]["residual_norm"] == pytest.approx(first[r]["residual_norm"], rel=1e-9)
