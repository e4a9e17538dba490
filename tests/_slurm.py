"""A throw-away two-node SLURM cluster on this machine, for testing the slurm/*.sbatch scripts.

`slurm_cluster(tmp_path, nodes=2)` (a context manager) writes a slurm.conf into a temporary
directory, starts its own munged (private key and socket), slurmctld and one `slurmd -N nK` per
emulated node (all nodes share this host and NodeAddr 127.0.0.1, each slurmd on its own port),
waits until every node is idle and yields a `SlurmCluster` whose `sbatch_wait(script, *args)`
submits with `sbatch --wait` and returns (exit code, text of the job's output file).  Every
daemon it started is stopped by PID on exit, also when starting or a test failed.

Needs root (the daemons run as root; slurmd launches jobs as the submitting user) and the Debian
packages `slurm-wlm` and `munge` (`apt-get install -y slurm-wlm munge`); otherwise the caller is
skipped via pytest.skip.  Nothing outside the temporary directories is touched: the system munge
key and /etc/slurm are not used.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel")

# variables that would leak a surrounding job/launcher into the submitted jobs
_DROP_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "TORCHELASTIC_")
_DROP_NAMES = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "GROUP_RANK", "ROLE_RANK", "NODE_RANK"}


def skip_reason() -> str | None:
    """Why a SLURM cluster cannot be started here, or None if it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "starting a SLURM cluster needs root"
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
    if missing:
        return f"SLURM/munge binaries missing ({', '.join(missing)}); apt-get install -y slurm-wlm munge"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _die_with_parent() -> None:
    """In the forked child: SIGTERM when the process that started the daemon dies, so a killed
    pytest (timeout, SIGKILL) does not leave a cluster running.  (Does not work for a daemon that
    runs under another uid, seen with munged as user munge here, hence munged runs as root.)"""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"({exc})"
    return "\n".join(lines[-n:])


class SlurmCluster:
    def __init__(self, root: Path, nodes: int = 2):
        self.root = Path(root)
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.conf = self.root / "slurm.conf"
        self.log_dir = self.root / "log"
        self.out_dir = self.root / "jobs"
        self.host = socket.gethostname().split(".")[0]
        self._procs: list[tuple[str, subprocess.Popen, Path]] = []
        self._munge_dir: Path | None = None
        self._jobs = itertools.count()
        self._job_names: list[str] = []
        self.last_job_id: str | None = None

    # ----------------------------------------------------------------- environment
    def env(self, extra: dict | None = None) -> dict:
        """os.environ without any surrounding SLURM/launcher variables, plus SLURM_CONF (and `extra`)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_DROP_PREFIXES) and k not in _DROP_NAMES}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra or {})
        return env

    # ----------------------------------------------------------------- start / stop
    def _spawn(self, name: str, argv: list[str], **kw) -> subprocess.Popen:
        log = self.log_dir / f"{name}.stdio"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                    env=self.env(), start_new_session=True, preexec_fn=_die_with_parent, **kw)
        self._procs.append((name, proc, log))
        return proc

    def _write_conf(self, munge_socket: Path) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        hw = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
        # first line: NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..; keep everything but NodeName
        hw = " ".join(t for t in hw.splitlines()[0].split() if not t.startswith("NodeName="))
        state, spool = self.root / "state", self.root / "spool"
        state.mkdir()
        for n in self.nodes:
            (spool / n).mkdir(parents=True)  # SlurmdSpoolDir must exist beforehand
        lines = [
            "ClusterName=qhooks-test",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket}",
            f"StateSaveLocation={state}",
            f"SlurmdSpoolDir={spool}/%n",
            f"SlurmctldPidFile={self.root}/slurmctld.pid",
            f"SlurmdPidFile={self.root}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.log_dir}/slurmctld.log",
            f"SlurmdLogFile={self.log_dir}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "SlurmdParameters=config_overrides",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "MinJobAge=4",       # else `sbatch --wait` polls only every 30 s
            "KillWait=5",        # scancel: SIGTERM -> SIGKILL after 5 s (default 30)
            "InactiveLimit=0",
        ]
        for n, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={port} {hw} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _start_munge(self) -> Path:
        # own directory under /tmp: a short path (unix socket paths are limited to 108 bytes), and
        # munged wants the socket's directory and all its ancestors executable for all (pytest's
        # 0700 tmp dirs are not).  The key is private to this cluster: the system's /etc/munge is
        # left alone.  munged runs as root (it allows that) so that it, like the slurm daemons,
        # dies with this process.
        self._munge_dir = Path(tempfile.mkdtemp(prefix="qh-munge-", dir="/tmp"))
        os.chmod(self._munge_dir, 0o755)
        key = self._munge_dir / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(128))
        sock = self._munge_dir / "munge.socket"
        d = self._munge_dir
        self._spawn("munged", [_which("munged"), "--foreground", f"--socket={sock}", f"--key-file={key}",
                               f"--log-file={d}/munged.log", f"--pid-file={d}/munged.pid",
                               f"--seed-file={d}/munged.seed"])
        self._wait(lambda: sock.exists(), 10, "munged did not create its socket")
        return sock

    def start(self) -> "SlurmCluster":
        self.log_dir.mkdir(parents=True)
        self.out_dir.mkdir()
        sock = self._start_munge()
        self._write_conf(sock)
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for n in self.nodes:
            self._spawn(f"slurmd-{n}", [_which("slurmd"), "-D", "-N", n, "-f", str(self.conf)])
        self._wait(self._all_idle, 30, "SLURM nodes did not become idle")
        return self

    def _node_states(self) -> dict:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=self.env(), timeout=10)
        if r.returncode != 0:
            return {}
        return dict(line.split()[:2] for line in r.stdout.splitlines() if len(line.split()) >= 2)

    def _all_idle(self) -> bool:
        states = self._node_states()
        return all(states.get(n) == "idle" for n in self.nodes)

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            dead = [(name, p.returncode) for name, p, _ in self._procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{what}: daemon(s) exited early {dead}\n{self.debug_info()}")
            if cond():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} within {timeout:.0f} s (node states {self._node_states()})\n{self.debug_info()}")
            time.sleep(0.2)

    def debug_info(self) -> str:
        parts = []
        for name, _, stdio in self._procs:
            parts.append(f"--- {name} (stdout/stderr) ---\n{_tail(stdio)}")
        for log in sorted(self.log_dir.glob("*.log")):
            parts.append(f"--- {log.name} ---\n{_tail(log)}")
        return "\n".join(parts)

    def stop(self) -> None:
        # cancel whatever we submitted that may still run (timed-out tests), so no job outlives the cluster
        if self._job_names and any(name == "slurmctld" and p.poll() is None for name, p, _ in self._procs):
            subprocess.run(["scancel", "--full", "-n", ",".join(self._job_names)], env=self.env(),
                           capture_output=True, timeout=20)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                r = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env(), capture_output=True, text=True, timeout=10)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.5)
        # slurmd first, then slurmctld, munged last (the others authenticate through it)
        order = sorted(self._procs, key=lambda t: {"munged": 2, "slurmctld": 1}.get(t[0], 0))
        for group in (0, 1, 2):
            batch = [(n, p) for n, p, _ in order if {"munged": 2, "slurmctld": 1}.get(n, 0) == group and p.poll() is None]
            for _, p in batch:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
            for _, p in batch:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
                    p.wait(timeout=10)
        self._procs.clear()
        if self._munge_dir is not None:
            shutil.rmtree(self._munge_dir, ignore_errors=True)
            self._munge_dir = None

    # ----------------------------------------------------------------- jobs
    def sbatch_wait(self, script, *args, env: dict | None = None, timeout: float = 120,
                    sbatch_args=(), cwd=None) -> tuple[int, str]:
        """`sbatch --wait [sbatch_args] script args`; returns (exit code, the job's output file).

        `env` is added to this process's environment (minus any SLURM_*/launcher variables) and
        exported to the job.  On timeout the job is cancelled and TimeoutError raised."""
        k = next(self._jobs)
        name = f"qh-test-{os.getpid()}-{k}"
        self._job_names.append(name)
        out = self.out_dir / f"job-{k}.out"
        argv = ["sbatch", "--wait", "--parsable", f"--job-name={name}", f"--output={out}",
                *map(str, sbatch_args), os.path.abspath(script), *map(str, args)]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env(env), cwd=cwd)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            subprocess.run(["scancel", "--full", "-n", name], env=self.env(), capture_output=True, timeout=20)
            raise TimeoutError(f"job {name} did not finish within {timeout} s; output so far:\n"
                               f"{out.read_text(errors='replace') if out.exists() else '(none)'}\n{self.debug_info()}")
        self.last_job_id = stdout.strip().split(";")[0] or None
        text = out.read_text(errors="replace") if out.exists() else ""
        if proc.returncode != 0 and stderr.strip():
            text += f"\n[sbatch stderr]\n{stderr}"
        return proc.returncode, text


@contextlib.contextmanager
def slurm_cluster(tmp_path, nodes: int = 2):
    """Start a throw-away SLURM cluster with `nodes` emulated nodes; skip when that is impossible."""
    reason = skip_reason()
    if reason:
        import pytest
        pytest.skip(reason)
    cluster = SlurmCluster(Path(tmp_path), nodes)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
