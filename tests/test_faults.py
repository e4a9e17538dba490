"""Faults in real multi-process jobs: a worker killed under ``torchrun --max-restarts`` (the job
restarts, resumes from its last checkpoint with the hook state, and ends bit for bit where an
uninterrupted run ends), and a rank that dies or stalls mid-training (the other ranks raise within
the process-group timeout instead of hanging).

Every process runs outside pytest (tests/_fault_worker.py) in its own session and carries a
per-test tag in its environment; whatever the outcome, ``_reap`` SIGKILLs every process with that
tag, so nothing survives a test (the fault jobs' ranks also die with their launcher, and it with
pytest).  Every wait has a hard wall-clock bound: a hang fails the test instead of hanging the suite.

Time on two shared cores: the six dead/stalled-rank jobs are forked by one launcher (one torch
import instead of eighteen) and start together with the module, so their ten-second timeouts pass
while the torchrun test computes; their verdicts rest on the times the ranks recorded.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest
from _dist import free_port  # tests/conftest.py puts tests/ on sys.path
from test_examples import FMNIST, ROOT, _final, _hashes, needs_data

pytestmark = pytest.mark.slow
WORKER = os.path.join(ROOT, "tests", "_fault_worker.py")
TAG = "DDPQ_FAULT_TEST_TAG"


# -- process bookkeeping ------------------------------------------------------------------------
def _env(tag: str, **extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", TAG: tag, **extra}


def _environ(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    return dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item and item)


def _tagged(tag: str) -> list[int]:
    mine = tag.encode()
    return [int(d) for d in os.listdir("/proc") if d.isdigit() and _environ(int(d)).get(TAG.encode()) == mine]


def _reap(tag: str, procs=()) -> None:
    """SIGKILL every process started with this tag (torchrun's workers run in sessions of their own,
    so killing the agent's group would not reach them), then collect our direct children."""
    for _ in range(3):
        pids = _tagged(tag)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    assert not _tagged(tag), "processes of this test survived SIGKILL"


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


# -- (a) torchrun --max-restarts ----------------------------------------------------------------
def _latest(ckpt) -> int:
    try:
        with open(os.path.join(ckpt, "latest.json")) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError):
        return -1


@needs_data
def test_torchrun_restarts_a_killed_worker_and_resumes_bitwise(tmp_path):
    """SIGKILL rank 1 after the step-20 checkpoint: torchrun restarts the group, it resumes from the
    last complete checkpoint, and finishes with the parameters and hook byte counters of an
    uninterrupted run with the same arguments.  The interrupted run goes through _fault_worker.py,
    which runs the example unchanged but sleeps 0.1 s after each optimizer step (no tensor touched;
    the reference is the plain example), so steps 20..40 leave the test a window of seconds, not
    milliseconds, to kill a worker mid-run."""
    args = ["--cpu", "--max-steps", "40", "--checkpoint-every", "10", "--log-every", "10", "--codec", "stochastic",
            "--bits", "4", "--block-size", "layer", "--batch-size", "16", "--timeout", "60", "--resume"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    tag = uuid.uuid4().hex
    ckpt, ref_ckpt = tmp_path / "ckpt", tmp_path / "ref_ckpt"
    procs = []
    try:
        with open(tmp_path / "ref.log", "w") as ref_log, open(tmp_path / "elastic.log", "w") as log:
            # the uninterrupted reference, concurrently (plain example, no sleep)
            procs.append(subprocess.Popen(torchrun + [FMNIST] + args + ["--checkpoint-dir", str(ref_ckpt)], cwd=ROOT,
                                          env=_env(tag), stdout=ref_log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
            # no TORCH_DISABLE_SHARE_RDZV_TCP_STORE here: torch 2.13's torchrun hands every attempt the
            # same store, and without ddp_qhooks.launch's per-attempt prefix a restarted rank can read
            # the dead attempt's Gloo address ("connectFullMesh ... Connection refused", 4 runs of 7)
            agent = subprocess.Popen(torchrun + ["--max-restarts=2", WORKER, "fmnist"] + args
                                     + ["--checkpoint-dir", str(ckpt)], cwd=ROOT,
                                     env=_env(tag, FAULT_STEP_SLEEP="0.1"),
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(agent)
            deadline = time.monotonic() + 150
            while _latest(ckpt) < 20:
                assert agent.poll() is None, "torchrun ended before the step-20 checkpoint"
                assert time.monotonic() < deadline, "no checkpoint for step >= 20 within 150 s"
                time.sleep(0.02)
            killed_after = _latest(ckpt)
            workers = {int(env[b"LOCAL_RANK"]): c for c in _children(agent.pid)
                       if b"LOCAL_RANK" in (env := _environ(c))}
            assert sorted(workers) == [0, 1], f"torchrun's workers not found: {workers}"
            os.kill(workers[1], signal.SIGKILL)
            rc = agent.wait(timeout=180)
            ref_rc = procs[0].wait(timeout=180)
    finally:
        _reap(tag, procs)
    out, ref = (tmp_path / "elastic.log").read_text(), (tmp_path / "ref.log").read_text()
    assert ref_rc == 0, ref[-4000:]
    assert rc == 0, out[-6000:]
    assert killed_after < 40
    # the kill was noticed (torchrun logs the first failed worker: the killed one, -9, or rank 0
    # if its broken collective made it exit first) and the group restarted once
    assert re.search(r"failed \(exitcode: -?\d+\) local_rank: [01]", out), out[-6000:]
    attempts = sorted(re.findall(r"\[rank (\d)\] attempt (\d)", out))
    assert attempts == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")], out
    m = re.search(r"resumed from (\S+)/step(\d+) at step (\d+)", out)
    assert m, out[-6000:]
    assert m.group(1) == str(ckpt) and m.group(2) == m.group(3)
    # the last complete checkpoint (step 20, or 30 if it was complete when the kill landed)
    assert killed_after <= int(m.group(2)) < 40
    hashes, ref_hashes = _hashes(out.split(m.group(0))[1]), _hashes(ref)
    assert set(hashes) == {0, 1} and len(set(hashes.values())) == 1, hashes  # ranks agree
    assert hashes == ref_hashes  # ... with the uninterrupted run, bit for bit
    final, ref_final = _final(out), _final(ref)
    assert final["step"] == 40
    # the hook's counters were restored with its residuals: same bytes as without the restart
    assert final["wire_bytes_sent"] == ref_final["wire_bytes_sent"] > 0


# -- (b, c) a rank that dies or stalls ----------------------------------------------------------
TIMEOUT_S = 10.0  # process-group timeout of these jobs (torch's default would be 30 minutes)
MARGIN_S = 15.0   # survivors must raise within TIMEOUT_S + MARGIN_S of the fault
START_S = 120.0   # hard bound on reaching the fault (all jobs start at once on 2 busy cores)

# id: (world, exchange, ranks_per_node, fault, where, faulty rank)
DEAD = {
    "allgather-2ranks-sigkill": (2, "allgather", None, "kill", "step", 1),
    "alltoall-3ranks-exit-in-phase2": (3, "alltoall", None, "exit", "phase2", 2),
    "hierarchical-4ranks-exit": (4, "hierarchical", 2, "exit", "step", 3),
}
STALLED = {
    "allgather-2ranks": (2, "allgather", None, "stall", "step", 1),
    # the survivors wait on the two-phase exchange's second group (exchange.new_group)
    "alltoall-3ranks-in-phase2": (3, "alltoall", None, "stall", "phase2", 2),
    # the survivors wait on the hierarchical exchange's subgroups (exchange.subgroups)
    "hierarchical-4ranks-in-cross-node-phase": (4, "hierarchical", 2, "stall", "phase2", 3),
}


def _records(path) -> list[dict]:
    recs = []
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("{") and line.endswith("}\n"):
                    recs.append(json.loads(line))
    except OSError:
        pass
    return recs


class _Job:
    """One job of ``world`` ranks; its files are written by tests/_fault_worker.py (jobs)."""

    def __init__(self, name, out_dir, port, world, exchange, ranks_per_node, fault, where, fault_rank, fault_step=3):
        self.name, self.dir, self.world, self.exchange = name, str(out_dir), world, exchange
        self.fault_rank, self.stall = fault_rank, fault == "stall"
        self.survivors = [r for r in range(world) if r != fault_rank]
        os.makedirs(out_dir)
        extra = [] if ranks_per_node is None else ["--ranks-per-node", str(ranks_per_node)]
        self.spec = {"out_dir": self.dir, "world": world, "args": [
            "--port", str(port), "--exchange", exchange, "--timeout", str(TIMEOUT_S), "--fault", fault,
            "--where", where, "--fault-rank", str(fault_rank), "--fault-step", str(fault_step)] + extra}

    def recs(self) -> dict:
        return {r: _records(os.path.join(self.dir, f"rank{r}.out")) for r in range(self.world)}

    def exits(self) -> dict:
        """rank -> {"code", "t"} of the ranks that have exited (recorded by the launcher)."""
        return {x["rank"]: x for x in _records(os.path.join(self.dir, "exits.out"))}

    def fault(self, recs) -> dict | None:
        return next((x for x in recs[self.fault_rank] if x["event"] == "fault"), None)

    def settled(self, launched: float) -> bool:
        """Nothing more to wait for: every survivor raised (or ended) and a dead rank's exit status
        is in, or the hard bound passed (START_S to reach the fault, then TIMEOUT_S + MARGIN_S)."""
        recs, exits, now = self.recs(), self.exits(), time.time()
        ended = [r for r in self.survivors if r in exits or any(x["event"] in ("raised", "done") for x in recs[r])]
        fault = self.fault(recs)
        if fault is None:
            return bool(ended) or now > launched + START_S
        if len(ended) == len(self.survivors) and (self.stall or self.fault_rank in exits):
            return True
        return now > fault["t"] + TIMEOUT_S + MARGIN_S

    def logs(self) -> str:
        def tail(name):
            try:
                with open(os.path.join(self.dir, name)) as f:
                    return f.read()[-3000:]
            except OSError:
                return ""
        return f"job {self.name}:\n" + tail("exits.out") + "".join(
            f"--- rank {r}:\n" + tail(f"rank{r}.out") + tail(f"rank{r}.err") for r in range(self.world))


class _FaultJobs:
    """All six jobs, forked by one launcher and started at once; ``collect()`` waits until each has
    settled (every wait bounded), then kills every process."""

    def __init__(self, base):
        self.base, self.tag = base, uuid.uuid4().hex
        ports: set = set()
        while len(ports) < len(DEAD) + len(STALLED):  # one port per job
            ports.add(free_port())
        self.jobs = {name: _Job(name, base / name, port, *spec)
                     for (name, spec), port in zip({**DEAD, **STALLED}.items(), sorted(ports))}
        with open(base / "spec.json", "w") as f:
            json.dump([job.spec for job in self.jobs.values()], f)
        with open(base / "launcher.err", "w") as err:
            self.launcher = subprocess.Popen([sys.executable, WORKER, "jobs", str(base / "spec.json")], cwd=ROOT,
                                             env=_env(self.tag), stdout=subprocess.DEVNULL, stderr=err,
                                             start_new_session=True)
        self.launched = time.time()
        self.collected = False

    def collect(self) -> dict:
        if not self.collected:
            try:
                jobs = list(self.jobs.values())
                while self.launcher.poll() is None and not all(job.settled(self.launched) for job in jobs):
                    time.sleep(0.05)
            finally:
                self.close()
        launcher_err = (self.base / "launcher.err").read_text()
        assert "Traceback" not in launcher_err, launcher_err
        return self.jobs

    def close(self) -> None:
        if not self.collected:
            self.collected = True
            _reap(self.tag, [self.launcher])


@pytest.fixture(scope="module")
def fault_jobs(tmp_path_factory):
    jobs = _FaultJobs(tmp_path_factory.mktemp("faults"))
    try:
        yield jobs
    finally:
        jobs.close()


@pytest.fixture(scope="module", autouse=True)
def _start_fault_jobs_first(request):
    """Start the fault jobs before this module's first test when any of their tests is selected:
    they spend most of their life waiting for a timeout, a wait the torchrun test's work then
    fills.  Their verdicts rest on the times the processes recorded, not on when they are read."""
    if any("fault_jobs" in item.fixturenames for item in request.session.items if item.module is request.module):
        request.getfixturevalue("fault_jobs")


def _check_survivors_raised(job: _Job) -> list[float]:
    recs, exits, logs = job.recs(), job.exits(), job.logs()
    for r in range(job.world):  # the job really ran the exchange it is about
        modes = [x["modes"] for x in recs[r] if x["event"] == "step"]
        assert modes and all(m == {job.exchange: 1} for m in modes), f"rank {r}: {modes}\n{logs}"
    fault = job.fault(recs)
    assert fault, "the faulty rank never reached its fault\n" + logs
    if not job.stall:
        assert exits.get(job.fault_rank, {}).get("code") in (3, -signal.SIGKILL), logs
    delays = []
    for r in job.survivors:
        raised = [x for x in recs[r] if x["event"] == "raised"]
        assert raised, (f"rank {r} did not raise within {TIMEOUT_S + MARGIN_S:.0f} s of rank {fault['rank']}'s "
                        f"{fault['kind']} (hang?)\n{logs}")
        x = raised[0]
        delay = x["t"] - fault["t"]
        delays.append(round(delay, 2))
        assert x["step"] == fault["step"] and x["phase"] == "backward", x
        assert "RuntimeError" in x["mro"], x  # DistBackendError is a RuntimeError too
        # the collective's own message, not DDP failing to read an exception as a tensor
        assert "Unable to cast" not in x["msg"], x["msg"][:500]
        assert delay <= TIMEOUT_S + MARGIN_S, (r, delay, x)
        if job.stall:  # freed by the timeout itself, which the message names, while the staller lives
            assert delay >= TIMEOUT_S - 1, (r, delay, x)
            assert re.search(rf"Timed out waiting {int(TIMEOUT_S * 1000)}ms", x["msg"]), x
            assert job.fault_rank not in exits or exits[job.fault_rank]["t"] > x["t"], logs
        else:  # a closed connection, or a group's timeout where the peer it waits for lingers
            assert re.search(rf"Connection (reset|closed) by peer|Timed out waiting {int(TIMEOUT_S * 1000)}ms",
                             x["msg"]), x
    print(f"\n{job.name}: survivors {job.survivors} raised {delays} s after the fault; e.g. "
          f"{next(x for x in recs[job.survivors[0]] if x['event'] == 'raised')['msg'][:300]!r}")
    return delays


@pytest.mark.parametrize("name", list(DEAD))
def test_survivors_raise_when_a_rank_dies(fault_jobs, name):
    _check_survivors_raised(fault_jobs.collect()[name])


@pytest.mark.parametrize("name", list(STALLED))
def test_survivors_raise_within_the_group_timeout_when_a_rank_stalls(fault_jobs, name):
    """The stalled rank keeps its sockets open, so only a timeout frees the others; in the
    two-phase and hierarchical jobs that is the timeout of the groups the library created itself
    (they must inherit the default group's 10 s, not torch's 30-minute default)."""
    _check_survivors_raised(fault_jobs.collect()[name])
