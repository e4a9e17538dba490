"""The benchmark CLI end to end: local processes (smoke test, JSON schema) and, as root, the
netsim mode on real rate-limited links between network namespaces (tc byte counters)."""
import json
import math
import os
import shutil
import subprocess
import sys

import _dist  # tests/conftest.py puts tests/ on sys.path
import pytest

from ddp_qhooks.tools import bench

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "ddp_qhooks.bench", *args, "--output", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    with open(out / "bench.json") as f:
        return json.load(f), res.stdout, out


def test_smoke_local_processes_and_json_schema(tmp_path):
    result, stdout, out = _run(["--params", "2e5", "--steps", "3", "--warmup", "3", "--timeout", "120",
                                "--configs", "fp32", "fp16_hook", "powersgd", "quant_pertensor", "stochastic:4",
                                "sign", "topk:8,ratio=0.05", "stochastic:4,local_steps=4", "--timeline"], tmp_path)
    assert set(result) == {"meta", "rows"}
    for key in ("task", "params", "world", "backend", "steps", "warmup", "compute_s", "torch", "configs"):
        assert key in result["meta"]
    assert result["meta"]["world"] == 2 and result["meta"]["backend"] == "gloo"
    rows = {r["config"]: r for r in result["rows"]}
    assert list(rows) == ["fp32", "fp16_hook", "powersgd", "quant_pertensor", "stochastic:4", "sign", "topk:8,ratio=0.05",
                          "stochastic:4,local_steps=4"]
    local = rows["stochastic:4,local_steps=4"]  # local SGD: one 4-bit exchange every 4 steps, averaged over whole rounds
    assert local["status"] == "ok" and local["kind"] == "local" and "H=4" in local["note"]
    assert local["bytes_per_step"] == pytest.approx(rows["stochastic:4"]["bytes_per_step"] / 4, rel=0.01)
    assert local["fewer_bytes_than_fp32"] == pytest.approx(rows["fp32"]["bytes_per_step"] / local["bytes_per_step"])
    for r in rows.values():
        assert set(bench.RESULT_KEYS) <= set(r)
    # torch's per-tensor quantization hook indexes the all_gather future as a stacked tensor: fails on Gloo
    assert rows["quant_pertensor"]["status"] == "failed" and "Error" in rows["quant_pertensor"]["error"]
    for name in ("fp32", "fp16_hook", "powersgd", "stochastic:4", "sign", "topk:8,ratio=0.05"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["step_p10_s"] <= r["step_s"] <= r["step_p90_s"]
        assert math.isfinite(r["final_loss"]) and r["bytes_per_step"] > 0
    assert rows["fp32"]["speedup_vs_fp32"] == 1.0
    numel = result["meta"]["params"]
    assert rows["fp32"]["bytes_per_step"] == pytest.approx(4 * numel)          # ring allreduce at W=2
    # (W-1) x payload: 4 bits per value + 8 bytes (min, scale) per block of 256 values (the default), per parameter
    w = bench._width_for(2e5)
    shapes = [64 * w, w] + [w * w, w] * 3 + [10 * w, 10]
    assert sum(shapes) == numel
    blocks = sum(math.ceil(n / 256) for n in shapes)
    assert rows["stochastic:4"]["bytes_per_step"] == pytest.approx(numel / 2 + 8 * blocks, rel=0.01)
    assert rows["stochastic:4"]["bytes_source"].startswith("package")
    assert "fails on this backend" in stdout
    for name in ("stochastic:4", "sign"):  # time inside the hook and the last step's per-bucket timeline
        r = rows[name]
        assert 0 < r["hook_s"] < r["step_s"] and r["callback_s"] > 0
        assert r["timeline"] and all(e["enter"] <= e["launched"] <= e["received"] <= e["done"] for e in r["timeline"])
    assert rows["fp32"]["hook_s"] is None and "bucket" in stdout and "hook ms" in stdout  # --timeline printed
    for name in ("bench.json", "bench.csv", "bench.md"):
        assert (out / name).exists()
    assert (out / "bench.md").read_text().count("\n|") >= 8


def _span(bucket, enter, launched, received, done=None):
    return {"bucket": bucket, "numel": 10, "mode": "allgather", "callback_s": 0.0, "enter": enter,
            "launched": launched, "received": received, "done": received if done is None else done}


def test_encode_hidden_is_the_overlap_of_encoding_with_earlier_collectives():
    # bucket 1 encodes during [2, 6]; bucket 0's collective is in flight during [1, 4]: half hidden
    assert bench.encode_hidden([_span(0, 0, 1, 4), _span(1, 2, 6, 9)]) == pytest.approx(0.5)
    # bucket 2 encodes during [6, 10]; in flight: bucket 0 [1, 7] and bucket 1 [6, 8] overlap -> union [6, 8]
    # counted once: bucket 1 hidden 2 of 4 (bucket 0 in flight [2, 6] -> 4 of 4), bucket 2: [6, 7] u [6, 8] = 2 of 4
    tl = [_span(0, 0, 1, 7), _span(1, 2, 6, 8), _span(2, 6, 10, 12)]
    assert bench.encode_hidden(tl) == pytest.approx((4 + 2) / 8)
    assert bench.encode_hidden([_span(0, 0, 1, 2), _span(1, 3, 4, 5)]) == 0.0  # collective done before
    assert bench.encode_hidden([_span(0, 0, 1, 2)]) is None
    text = bench.format_timeline("x", tl)
    assert text.count("bucket") == 3 and "E" in text and "~" in text


def test_local_sgd_configurations_are_checked_before_starting():
    assert bench.parse_config("stochastic:4,local_steps=16,outer=average")["local"] == {"local_steps": 16, "outer": "average"}
    for spec, msg in (("stochastic:4,outer=average", "need local_steps"), ("stochastic:4,local_steps=0", "local_steps"),
                      ("stochastic:4,local_steps=8,outer=adam", "outer must be one of")):
        with pytest.raises(ValueError, match=msg):
            bench.parse_config(spec)


def test_bad_configuration_fails_before_starting(tmp_path):
    res = subprocess.run([sys.executable, "-m", "ddp_qhooks.bench", "--configs", "fp32", "nosuchcodec:4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "nosuchcodec" in res.stderr and "stochastic" in res.stderr


def _netns_list():
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.mark.skipif(os.name != "posix" or not shutil.which("ip") or not shutil.which("tc"), reason="needs iproute2")
def test_netsim_bytes_on_the_wire_and_teardown(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("netsim needs root (CI runs as root)")
    before = _netns_list()
    result, stdout, _ = _run(["--params", "5e5", "--steps", "3", "--warmup", "2", "--netsim", "50mbit",
                              "--timeout", "120", "--configs", "fp32", "stochastic:8", "stochastic:2"], tmp_path)
    assert _netns_list() == before, "netsim left namespaces behind"
    rows = {r["config"]: r for r in result["rows"]}
    assert result["meta"]["netsim"] == "50mbit" and len(result["meta"]["tc_bytes_total"]) == 2
    for r in rows.values():
        assert r["status"] == "ok" and r["tc_bytes_per_step"] > 0
        # the package's accounting (plus TCP/IP framing) matches what tc saw leave the host
        assert abs(r["tc_vs_accounted"]) < 0.03, r
    # measured on the wire: fp32 allreduce moves ~4x the bytes of 8-bit all-gather payloads at W=2
    measured = rows["fp32"]["tc_bytes_per_step"] / rows["stochastic:8"]["tc_bytes_per_step"]
    expected = rows["fp32"]["bytes_per_step"] / rows["stochastic:8"]["bytes_per_step"]
    assert measured == pytest.approx(expected, rel=0.04)
    assert rows["stochastic:2"]["speedup_vs_fp32"] > 3  # a slow link: compression pays


def test_netsim_refuses_clearly_without_root(monkeypatch):
    from ddp_qhooks.tools import netsim
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(netsim.NetSimError, match="root"):
        netsim.check_environment()
    with pytest.raises(ValueError, match="200mbit"):
        netsim.parse_rate("fast")


def test_under_torchrun(tmp_path):
    """Launched by torchrun (env:// rendezvous), every configuration runs in the same processes and
    rank 0 writes the outputs."""
    out = tmp_path / "tr"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_dist.free_port()}",
                          "-m", "ddp_qhooks.bench", "--params", "2e5", "--steps", "2", "--warmup", "2",
                          "--configs", "fp32", "stochastic:4", "quant_pertensor", "--output", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    assert result["meta"]["launch"] == "torchrun" and result["meta"]["world"] == 2
    rows = {r["config"]: r for r in result["rows"]}
    assert rows["fp32"]["status"] == "ok" and rows["stochastic:4"]["status"] == "ok"
    assert rows["quant_pertensor"]["status"] == "failed" and "torchrun" in rows["quant_pertensor"]["error"]


def test_several_ranks_per_host_compare_link_bytes_not_per_rank_counts():
    """With 2 ranks per simulated host, tc sees the host's link bytes: no per-rank comparison, and
    the ideal speedup uses the bytes that crossed the link."""
    def row(config, step_s, acct, tc):
        return {"config": config, "status": "ok", "step_s": step_s, "compute_s": 0.05, "bytes_per_step": acct,
                "tc_bytes_per_step": tc, "compression_ratio": None if config == "fp32" else 8.0}
    rows = [row("fp32", 1.05, 30e6, 32e6), row("hier", 0.25, 1.2e6, 4e6)]
    bench._derive(rows, ranks_per_host=2)
    assert all(r.get("tc_vs_accounted") is None for r in rows)
    assert rows[1]["ideal_speedup"] == pytest.approx(1.05 / (0.05 + 1.0 * 4 / 32))
    rows = [row("fp32", 1.05, 30e6, 32e6), row("hier", 0.25, 4e6, 4.2e6)]
    bench._derive(rows, ranks_per_host=1)
    assert rows[1]["tc_vs_accounted"] == pytest.approx(4.2 / (4 * bench.TCP_FRAMING) - 1)
    assert rows[1]["ideal_speedup"] == pytest.approx(1.05 / (0.05 + 1.0 * 4 / 30))
