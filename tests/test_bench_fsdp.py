"""``python -m ddp_qhooks.bench --fsdp`` end to end on loopback with a tiny model: FSDP's fp32
reduce-scatter against ours, and the hierarchical mode (--nodes x --procs-per-node)."""
import json
import os
import subprocess
import sys

import pytest

from ddp_qhooks.tools import bench

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "ddp_qhooks.bench", "--fsdp", "--loopback", "--params", "2e4",
                          "--steps", "2", "--warmup", "1", "--timeout", "150", *args, "--output", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    with open(out / "bench.json") as f:
        return json.load(f), res.stdout


def _mlp_shapes(params):
    """(out, in) of the bench's synthetic MLP layers, from its documented layout 64-w-w-w-w-10."""
    w = bench._width_for(params)
    return [(w, 64), (w, w), (w, w), (w, w), (10, w)]


def test_fsdp_rows_and_bytes(tmp_path):
    result, stdout = _run(["--configs", "fp32", "stochastic:4"], tmp_path)
    assert result["meta"]["fsdp"] is True and result["meta"]["world"] == 2
    assert "under FSDP2" in stdout and "FSDP's fp32 reduce-scatter" in stdout
    rows = {r["config"]: r for r in result["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    # W = 2, each Linear its own FSDP module: dim 0 padded to even, each rank sends its half once in
    # the all-gather (forward only: reshard_after_forward=False) and the other half in the reduce-scatter
    half = sum(-(-o // 2) * (i + 1) for o, i in _mlp_shapes(2e4))
    assert rows["fp32"]["bytes_per_step"] == 2 * 4 * half
    q = rows["stochastic:4"]["bytes_per_step"]
    assert 4 * half < q < 4 * half * (1 + 1 / 8) * 1.1  # gather in fp32, reduce-scatter at ~4 bits
    assert rows["fp32"]["speedup_vs_fp32"] == 1.0 and rows["stochastic:4"]["ideal_speedup"] > 1.5


def test_hierarchical_rows_send_few_bytes_between_hosts(tmp_path):
    result, _ = _run(["--nodes", "2", "--procs-per-node", "2", "--configs", "fp32", "stochastic:4"], tmp_path)
    assert result["meta"]["world"] == 4
    rows = {r["config"]: r for r in result["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert "hierarchical" in rows["stochastic:4"]["note"]
    # flat fp32 FSDP at W = 4: 3 quarter-shards out per all-gather and per reduce-scatter, 2 of the
    # 3 peers on the other host; hierarchical 4-bit: one payload of the rank's half-model shard
    quarter = sum(-(-o // 4) * (i + 1) for o, i in _mlp_shapes(2e4))
    assert rows["fp32"]["bytes_per_step"] == pytest.approx(2 * 3 * 4 * quarter * 2 / 3)
    assert rows["fp32"]["bytes_per_step"] / rows["stochastic:4"]["bytes_per_step"] > 6


def test_fsdp_rejects_ddp_only_configurations(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--fsdp", "--loopback", "--configs", "fp32", "fp16_hook"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "'fp16_hook' is not an FSDP one" in err and "fp32" in err


def test_study_fsdp_table_and_configuration_errors(capsys):
    from ddp_qhooks.tools import study_fsdp
    runs = [{"config": "fp32", "seed": 0, "val_loss": 2.0},
            {"config": "stochastic:4", "seed": 0, "val_loss": 2.02, "bytes_sent": 1000, "fp32_bytes_sent": 7500}]
    lines = study_fsdp.table(runs).splitlines()
    assert lines[3] == "| stochastic:4 | 0 | 2.0200 | +1.00 % | 1,000 | 7,500 | 7.50x |"
    for argv, text in ((["--configs", "fp16_hook"], "not an FSDP configuration"),
                       (["--configs", "stochastic:4,local_steps=4"], "not an FSDP configuration"),
                       (["--steps", "0"], "--steps must be positive")):
        with pytest.raises(SystemExit):
            study_fsdp.main(argv)
        assert text in capsys.readouterr().err
