"""slurm/*.sbatch on a real (throw-away) two-node SLURM cluster started on this machine.

Needs root and the Debian packages slurm-wlm + munge (skipped otherwise).  The two nodes are
emulated (`slurmd -N n1`, `slurmd -N n2`, both NodeAddr 127.0.0.1), so the jobs really go through
sbatch -> srun -> one task/agent per node, with 2 ranks in total on the CPU.
"""
import os
import re
from pathlib import Path

import pytest

from _slurm import slurm_cluster

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_ARGS = ["--codec", "stochastic", "--bits", "4", "--cpu", "--batch-size", "32", "--log-every", "2"]
SHA_RE = re.compile(r"^\[rank (\d+)\] params_sha256 ([0-9a-f]{64})\s*$", re.M)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with slurm_cluster(tmp_path_factory.mktemp("slurm"), nodes=2) as c:
        yield c


def submit(cluster, script, ckpt_dir, *args, timeout=150):
    env = {"REPO_DIR": str(REPO), "CKPT_DIR": str(ckpt_dir), "OMP_NUM_THREADS": "1"}
    rc, out = cluster.sbatch_wait(REPO / "slurm" / script, *args, env=env, timeout=timeout, cwd=REPO)
    assert rc == 0, f"sbatch --wait {script} exited {rc}; job output:\n{out}\n{cluster.debug_info()}"
    return out


def check_trained(out: str, steps: int) -> None:
    finals = [line for line in out.splitlines() if line.startswith("final")]
    assert finals and "test_acc" in finals[-1], f"no 'final ... test_acc' line:\n{out}"
    assert re.search(rf"\bstep {steps}\b", finals[-1]), f"did not reach step {steps}:\n{finals[-1]}"
    shas = dict(SHA_RE.findall(out))
    assert set(shas) == {"0", "1"}, f"expected params_sha256 from ranks 0 and 1, got {shas}:\n{out}"
    assert len(set(shas.values())) == 1, f"ranks ended with different parameters: {shas}"


def test_torchrun_sbatch_two_nodes(cluster, tmp_path):
    out = submit(cluster, "torchrun.sbatch", tmp_path / "ckpt", *EXAMPLE_ARGS, "--max-steps", "6",
                 "--checkpoint-every", "3")
    # one agent per node, the first node hosting the rendezvous store
    assert re.search(r"^\[node n1 id 0\] 1 worker\(s\).*is_host=1", out, re.M), out
    assert re.search(r"^\[node n2 id 1\] 1 worker\(s\).*is_host=0", out, re.M), out
    check_trained(out, 6)
    assert (tmp_path / "ckpt" / "latest.json").exists()


def test_srun_sbatch_two_nodes(cluster, tmp_path):
    out = submit(cluster, "srun.sbatch", tmp_path / "ckpt", *EXAMPLE_ARGS, "--max-steps", "6",
                 "--checkpoint-every", "3")
    assert "2 ranks, MASTER_ADDR=127.0.0.1" in out, out
    assert re.search(r"^\[node n1\] GLOO_SOCKET_IFNAME=lo", out, re.M), out
    assert re.search(r"^\[node n2\] GLOO_SOCKET_IFNAME=lo", out, re.M), out
    check_trained(out, 6)


def test_srun_sbatch_resumes_from_checkpoint(cluster, tmp_path):
    """A requeued job re-runs the same script with the same CKPT_DIR: it must continue, not restart."""
    ckpt = tmp_path / "ckpt"
    first = submit(cluster, "srun.sbatch", ckpt, *EXAMPLE_ARGS, "--max-steps", "4", "--checkpoint-every", "2")
    check_trained(first, 4)
    assert "resumed from" not in first
    second = submit(cluster, "srun.sbatch", ckpt, *EXAMPLE_ARGS, "--max-steps", "8", "--checkpoint-every", "2")
    m = re.search(r"^resumed from (\S+) at step (\d+)", second, re.M)
    assert m, f"second run did not resume:\n{second}"
    assert int(m.group(2)) == 4 and os.path.commonpath([m.group(1), str(ckpt)]) == str(ckpt), m.group(0)
    assert not re.search(r"^step\s+2\b", second, re.M), "second run redid steps before the checkpoint"
    check_trained(second, 8)


def test_train_fsdp_sbatch_two_nodes_resumes(cluster, tmp_path):
    """FSDP2 across the two nodes; a second job with the same CKPT_DIR continues from the first's
    DCP checkpoint and both ranks end with the same full parameters."""
    ckpt = tmp_path / "ckpt"
    args = ["--cpu", "--steps", "4", "--checkpoint-every", "2", "--log-every", "2"]
    first = submit(cluster, "train_fsdp.sbatch", ckpt, *args)
    assert re.search(r"^\[stochastic\] 4-bit: final loss", first, re.M), first
    assert (ckpt / "latest.json").exists() and "resumed from" not in first
    second = submit(cluster, "train_fsdp.sbatch", ckpt, *[a if a != "4" else "6" for a in args])
    m = re.search(r"^resumed from (\S+) at step (\d+)", second, re.M)
    assert m and int(m.group(2)) == 4, second
    assert not re.search(r"^\[stochastic\] step\s+2\b", second, re.M), "the resumed job redid steps"
    shas = dict(SHA_RE.findall(second))
    assert set(shas) == {"0", "1"} and len(set(shas.values())) == 1, second
