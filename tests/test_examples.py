"""The files in examples/ run as users would run them: the README snippet, the Fashion-MNIST
example with checkpoint/resume, and torchrun with two nodes, one per network-namespace "host"."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from ddp_qhooks.tools import data

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = os.path.join(ROOT, "examples", "train_fmnist.py")
needs_data = pytest.mark.skipif(not data.available(), reason="Debian package dataset-fashion-mnist not installed")


def _run(argv, timeout=300, env=None):
    res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res.stdout


def _hashes(out: str) -> dict:
    return {int(r): h for r, h in re.findall(r"\[rank (\d+)\] params_sha256 ([0-9a-f]{64})", out)}


def _final(out: str) -> dict:
    line = next(line for line in out.splitlines() if line.startswith("final "))
    words = line.split()[1:]
    return {k: float(v) for k, v in zip(words[::2], words[1::2])}


def test_readme_quickstart_is_the_example_and_runs_under_torchrun():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    m = re.search(r"```python\n(# examples/quickstart.py.*?)```", readme, re.S)
    assert m, "README lost its quickstart block"
    with open(os.path.join(ROOT, "examples", "quickstart.py")) as f:
        assert m.group(1) == f.read()
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                os.path.join(ROOT, "examples", "quickstart.py")])
    lines = re.findall(r"rank (\d): loss ([\d.]+), 200 steps, ([\d.]+)x smaller", out)
    assert sorted(r for r, _, _ in lines) == ["0", "1"], out
    assert all(float(loss) < 0.2 and float(ratio) > 7 for _, loss, ratio in lines)


def test_minimal_example_spawns_local_workers():
    out = _run([sys.executable, os.path.join(ROOT, "examples", "train_minimal.py"), "--steps", "30", "--log-every", "10",
                "--bits", "4"])
    assert "final loss" in out and "ratio" in out


def test_lm_example_trains_with_one_bit_adam():
    """The AdamW recipe with 1-bit Adam (sign, a 10-step 2-bit warm-up): the loss falls from the
    untrained ~ln(vocabulary) and the run sends > 20x fewer bytes than fp32 all-reduce would."""
    out = _run([sys.executable, os.path.join(ROOT, "examples", "train_lm.py"), "--codec", "sign", "--onebit-adam",
                "10", "--steps", "40", "--log-every", "20"])
    final = _final(out)
    assert final["val_loss"] < 3.6 and final["fewer_bytes_than_fp32"] > 20, out


@needs_data
def test_fmnist_example_trains_checkpoints_and_resumes_bitwise(tmp_path):
    """Stop after 40 steps, resume to 80: the parameters equal an uninterrupted 80-step run bit for bit
    (layer-wise scales, so nothing depends on how DDP buckets parameters after the restart)."""
    common = [sys.executable, FMNIST, "--codec", "stochastic", "--bits", "4", "--block-size", "layer",
              "--log-every", "20", "--batch-size", "32"]
    ckpt = tmp_path / "ckpt"
    first = _run(common + ["--max-steps", "40", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "20"])
    assert "step    20" in first and "step_time" in first and "ratio" in first
    assert sorted(os.listdir(ckpt)) == ["latest.json", "step20", "step40"]
    assert sorted(os.listdir(ckpt / "step40")) == ["rank0.pt", "rank1.pt"]
    resumed = _run(common + ["--max-steps", "80", "--checkpoint-dir", str(ckpt), "--resume"])
    assert f"resumed from {ckpt / 'step40'} at step 40" in resumed
    straight = _run(common + ["--max-steps", "80"])
    h_resumed, h_straight = _hashes(resumed), _hashes(straight)
    assert set(h_resumed) == {0, 1} and len(set(h_resumed.values())) == 1  # ranks agree
    assert h_resumed == h_straight
    final = _final(resumed)
    assert final["step"] == 80 and final["test_acc"] > 0.55 and 7 < final["compression_ratio"] < 8.1
    # the hook's byte counters continue across the restart as well
    assert final["wire_bytes_sent"] == _final(straight)["wire_bytes_sent"]


@needs_data
def test_fmnist_example_local_sgd_non_iid_resumes_bitwise(tmp_path):
    """--local-steps (DiLoCo with 4-bit pseudo-gradients) on a non-IID split: stop at 24 steps, resume
    to 48, equal to a straight run; bytes are those of 6 synchronizations, 8x below fp32 DDP's."""
    common = [sys.executable, FMNIST, "--codec", "stochastic", "--bits", "4", "--block-size", "layer",
              "--local-steps", "8", "--noniid", "0.9", "--log-every", "8", "--batch-size", "32"]
    ckpt = tmp_path / "ckpt"
    first = _run(common + ["--max-steps", "24", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "24"])
    assert "local SGD H=8" in first and "non-IID 0.9" in first
    resumed = _run(common + ["--max-steps", "48", "--checkpoint-dir", str(ckpt), "--resume"])
    straight = _run(common + ["--max-steps", "48"])
    assert _hashes(resumed) == _hashes(straight) and len(set(_hashes(straight).values())) == 1
    final = _final(straight)
    assert final["wire_bytes_sent"] == _final(resumed)["wire_bytes_sent"]
    assert 55 < final["fp32_allreduce_wire_bytes"] / final["wire_bytes_sent"] < 70  # 8 steps per sync x ~8x smaller


@needs_data
def test_fmnist_resume_with_another_world_size_redistributes_or_resets_residuals(tmp_path):
    ckpt = tmp_path / "ckpt"
    base = [sys.executable, FMNIST, "--codec", "sign", "--batch-size", "32", "--checkpoint-dir", str(ckpt)]
    _run(base + ["--max-steps", "10"])
    shutil.copytree(ckpt, tmp_path / "one_file")
    # every rank's file is there: the hook redistributes the residuals over the 3 new ranks
    res = subprocess.run(base + ["--max-steps", "15", "--resume", "--world-size", "3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "residuals REDISTRIBUTED" in res.stderr
    assert len(set(_hashes(res.stdout).values())) == 1 and len(_hashes(res.stdout)) == 3
    # only rank 0's file (no shared file system): residuals reset, with a warning saying so
    one = tmp_path / "one_file"
    for f in one.glob("step*/rank1.pt"):
        f.unlink()
    base[base.index(str(ckpt))] = str(one)
    res = subprocess.run(base + ["--max-steps", "15", "--resume", "--world-size", "3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "residuals RESET" in res.stderr


def test_fmnist_example_without_dataset_names_the_package(tmp_path):
    res = subprocess.run([sys.executable, FMNIST, "--data", str(tmp_path), "--max-steps", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "dataset-fashion-mnist" in res.stderr and str(tmp_path) in res.stderr


@needs_data
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="network namespaces need root (CI runs as root)")
def test_torchrun_two_nodes_in_network_namespaces(tmp_path):
    """torchrun --nnodes=2: one agent per namespace "host", joined by a rate-limited veth pair; both
    nodes finish and hold identical parameters."""
    from ddp_qhooks.tools.netsim import NetSim

    with NetSim(nodes=2, rate="1gbit", latency="20ms") as net:
        port = 29000 + os.getpid() % 1000
        procs = []
        for node in range(2):
            argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                    "--nproc-per-node=1", f"--master-addr={net.addr(0)}", f"--master-port={port}",
                    f"--local-addr={net.addr(node)}", FMNIST, "--codec", "stochastic", "--bits", "4",
                    "--max-steps", "12", "--log-every", "6", "--batch-size", "32", "--cpu", "--timeout", "120",
                    "--checkpoint-dir", str(tmp_path / f"ckpt{node}")]
            procs.append(net.popen(node, argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = []
        try:
            for p in procs:
                outs.append(p.communicate(timeout=300)[0])
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        sent = [net.bytes_sent(n) for n in range(2)]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    assert "(gloo, torchrun)" in outs[0] and "final step 12" in outs[0]
    h0, h1 = _hashes(outs[0]), _hashes(outs[1])
    assert set(h0) == {0} and set(h1) == {1} and h0[0] == h1[1]
    # the gradients really crossed the link: at least 12 steps x one 4-bit payload of the model
    assert min(sent) > 12 * 18378 / 2
    # each node checkpointed its own rank
    assert (tmp_path / "ckpt0" / "step12" / "rank0.pt").exists() and (tmp_path / "ckpt1" / "step12" / "rank1.pt").exists()
