"""Slow links on one Linux machine: one network namespace per simulated host, rate-limited with tc.

    with NetSim(nodes=2, rate="200mbit") as net:
        procs = [net.popen(node, [sys.executable, "worker.py"], env) for node in range(2)]
        ...
        print(net.bytes_sent(0))          # tc's counter of bytes that left host 0

Topology: 2 nodes are joined by one veth pair; 3 or more hang off a Linux bridge that lives in its
own namespace (one veth pair per node).  Every node's egress is shaped with a ``tbf`` qdisc
(``netem`` is not available on every kernel, ``tbf`` is), so a node sends at most ``rate``; the
qdisc's byte counter is the ground truth for bytes on the wire (IP + TCP headers included).
Addresses are 198.18.<id>.<node+1>/24, from the range reserved for benchmarks (RFC 2544), on links
this module creates and deletes itself.

Needs root and iproute2 (``ip``, ``tc``).  Teardown always runs: on exit of the ``with`` block (also
after an exception), at interpreter exit, and on SIGINT / SIGTERM.
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import threading

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit|bps|kbps|mbps|gbps)$", re.IGNORECASE)
_UNIT_BITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
              "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}
_live: "set[NetSim]" = set()
_lock = threading.Lock()


class NetSimError(RuntimeError):
    pass


def parse_rate(rate: str) -> float:
    """Bits per second of a tc rate string such as ``200mbit`` or ``1gbit``."""
    m = _RATE.match(str(rate).strip())
    if not m:
        raise ValueError(f"netsim rate must look like 200mbit, 1gbit, 500kbit or 10mbps (tc units), got {rate!r}")
    bps = float(m.group(1)) * _UNIT_BITS[m.group(2).lower()]
    if bps <= 0:
        raise ValueError(f"netsim rate must be positive, got {rate!r}")
    return bps


def check_environment() -> None:
    """Raise NetSimError naming what is missing (root, iproute2, Linux)."""
    if not os.path.isdir("/proc/self/ns"):
        raise NetSimError("--netsim needs Linux network namespaces (not available on this system)")
    if os.geteuid() != 0:
        raise NetSimError("--netsim needs root (it creates network namespaces and tc qdiscs); run it as root, "
                          "or benchmark without --netsim")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise NetSimError(f"--netsim needs iproute2 ({' and '.join(missing)} not found): apt-get install iproute2")


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise NetSimError(f"`{' '.join(cmd)}` failed: {res.stderr.strip() or res.stdout.strip()}")
    return res


class NetSim:
    """``nodes`` simulated hosts joined by links shaped to ``rate`` (tc units) in each direction."""

    def __init__(self, nodes: int = 2, rate: str = "200mbit", latency: str = "50ms"):
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 2:
            raise ValueError(f"netsim needs at least 2 nodes, got {nodes!r}")
        self.bits_per_s = parse_rate(rate)
        self.rate = rate
        self.latency = latency
        self.nodes = nodes
        self.tag = f"dqh{os.getpid() % 100000}x{id(self) % 1000}"
        self.subnet = 18 + (os.getpid() % 200)  # 198.18.<subnet>.0/24: differs between concurrent runs
        self.namespaces: list[str] = []
        self.created: list[str] = []
        self._up = False

    # -- naming ------------------------------------------------------------------------------------
    def ns(self, node: int) -> str:
        return f"{self.tag}n{node}"

    def ifname(self, node: int) -> str:
        return f"v{self.tag[-6:]}{node}"[:15]

    def addr(self, node: int) -> str:
        return f"198.18.{self.subnet}.{node + 1}"

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> "NetSim":
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        check_environment()
        with _lock:
            if not _live:
                _install_handlers()
            _live.add(self)
        try:
            for node in range(self.nodes):
                self._add_ns(self.ns(node))
            if self.nodes == 2:
                a, b = self.ifname(0), self.ifname(1)
                _run("ip", "link", "add", a, "netns", self.ns(0), "type", "veth", "peer", "name", b, "netns", self.ns(1))
            else:
                bridge_ns = f"{self.tag}br"
                self._add_ns(bridge_ns)
                res = _run("ip", "-n", bridge_ns, "link", "add", "br0", "type", "bridge", check=False)
                if res.returncode != 0:
                    raise NetSimError(f"this kernel cannot create a Linux bridge ({res.stderr.strip()}); "
                                      "--netsim works with 2 nodes here")
                _run("ip", "-n", bridge_ns, "link", "set", "br0", "up")
                for node in range(self.nodes):
                    port = f"p{self.tag[-6:]}{node}"[:15]
                    _run("ip", "link", "add", self.ifname(node), "netns", self.ns(node), "type", "veth",
                         "peer", "name", port, "netns", bridge_ns)
                    _run("ip", "-n", bridge_ns, "link", "set", port, "master", "br0")
                    _run("ip", "-n", bridge_ns, "link", "set", port, "up")
            burst = max(64 * 1024, int(self.bits_per_s / 8 / 250))  # tbf needs burst >= rate / HZ
            for node in range(self.nodes):
                ns, dev = self.ns(node), self.ifname(node)
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                _run("ip", "-n", ns, "addr", "add", f"{self.addr(node)}/24", "dev", dev)
                _run("ip", "-n", ns, "link", "set", dev, "up")
                _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate,
                     "burst", str(burst), "latency", self.latency)
            self._up = True
        except BaseException:
            self.down()
            raise

    def _add_ns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self.created.append(name)

    def down(self) -> None:
        """Delete every namespace this object created (links and qdiscs go with them)."""
        for name in reversed(self.created):
            _run("ip", "netns", "del", name, check=False)
        self.created = []
        self._up = False
        with _lock:
            _live.discard(self)

    # -- use ---------------------------------------------------------------------------------------
    def popen(self, node: int, argv: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
        """Start a process inside ``node``'s namespace, with GLOO_SOCKET_IFNAME set to its link."""
        env = dict(os.environ if env is None else env)
        env.setdefault("GLOO_SOCKET_IFNAME", self.ifname(node))
        env.setdefault("TP_SOCKET_IFNAME", self.ifname(node))
        return subprocess.Popen(["ip", "netns", "exec", self.ns(node)] + list(argv), env=env, **kw)

    def bytes_sent(self, node: int) -> int:
        """tc's counter of bytes sent by ``node`` on its link since the qdisc was created."""
        out = _run("tc", "-n", self.ns(node), "-s", "qdisc", "show", "dev", self.ifname(node)).stdout
        m = re.search(r"Sent (\d+) bytes", out)
        if not m:
            raise NetSimError(f"no byte counter in tc output: {out!r}")
        return int(m.group(1))

    def exists(self) -> bool:
        names = _run("ip", "netns", "list", check=False).stdout
        return any(line.split()[0] == self.ns(0) for line in names.splitlines() if line.strip())


def tc_bytes_sent_here(ifname: str) -> int | None:
    """Bytes sent on ``ifname`` in the *current* namespace per tc (for workers inside a NetSim)."""
    if shutil.which("tc") is None:
        return None
    res = _run("tc", "-s", "qdisc", "show", "dev", ifname, check=False)
    m = re.search(r"Sent (\d+) bytes", res.stdout)
    return int(m.group(1)) if m else None


def _teardown_all() -> None:
    with _lock:
        live = list(_live)
    for net in live:
        net.down()


def _install_handlers() -> None:
    atexit.register(_teardown_all)
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)

        def handler(signum, frame, previous=previous):
            _teardown_all()
            if callable(previous):
                previous(signum, frame)
            else:
                raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread: rely on atexit and the with block
            pass
