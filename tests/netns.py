"""Simulated hosts for multi-node tests: Linux network namespaces joined by a veth pair.

Each "node" is a network namespace with its own veth interface and address in the benchmarking
range 198.18.0.0/15 (RFC 2544: never routed to the outside), `lo` up, no default route and no
DNS, so every packet a node sends stays between the namespaces or on its own loopback. A node's
processes run under `ip netns exec NS unshare --uts`, with their own hostname (mrnode0,
mrnode1, ...) and `/etc/netns/NS/hosts` (which `ip netns exec` bind-mounts over /etc/hosts)
mapping every node name to its address: `SLURM_JOB_NODELIST=mrnode[0-1]` resolves inside the
namespaces as it would on a cluster, and torchrun's rank-0 agent advertises its own hostname.

Names carry this process's pid (unique per test session); `TwoHosts.close` removes the namespaces,
the veth pair and the /etc/netns files, after killing whatever still runs inside, and is
registered with atexit as well. Creating namespaces needs root and iproute2: `unavailable()`
says why they cannot be created here (the tests skip with that reason).
"""
from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SUBNET = "198.18.0"  # /24 inside the RFC 2544 benchmarking range 198.18.0.0/15
NETNS_ETC = Path("/etc/netns")
PREFIX = "mrmn"  # megareuse multi-node: namespaces are PREFIX<pid>n<i>, veths PREFIX<pid>v<i>
TOOLS = ("ip", "unshare", "hostname")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def unavailable() -> Optional[str]:
    """Why network namespaces cannot be created here (None: they can)."""
    if os.geteuid() != 0:
        return "multi-node tests need root to create network namespaces (CI runs as root)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"multi-node tests need {', '.join(missing)} (iproute2, util-linux, hostname)"
    probe = f"{PREFIX}{os.getpid()}probe"
    made = _ip("netns", "add", probe, check=False)
    _ip("netns", "delete", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    return None


def netns_pids(netns: str) -> list[int]:
    proc = _ip("netns", "pids", netns, check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def remove_stale() -> None:
    """Delete namespaces (and a veth never moved into one) left by an earlier session that was
    killed outright (its pid is gone); never touches a live session's, nor a namespace that
    still holds a process."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        match = re.match(rf"({PREFIX}(\d+)n\d+)\b", line)
        if not match or Path(f"/proc/{match.group(2)}").exists() or netns_pids(match.group(1)):
            continue
        _ip("netns", "delete", match.group(1), check=False)
        shutil.rmtree(NETNS_ETC / match.group(1), ignore_errors=True)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        match = re.match(rf"\d+: ({PREFIX}(\d+)v\d+)[@:]", line)
        if match and not Path(f"/proc/{match.group(2)}").exists():
            _ip("link", "delete", match.group(1), check=False)


@dataclass(frozen=True)
class Node:
    index: int
    netns: str
    ifname: str  # the veth end inside this node's namespace (GLOO_SOCKET_IFNAME)
    addr: str
    hostname: str


class NodeProcess:
    """One command started inside a node; its output goes to a log file."""

    def __init__(self, hosts: "TwoHosts", node: Node, cmd: list[str], env: dict, log: Path, cwd: Path):
        self.hosts, self.node, self.log = hosts, node, log
        wrapped = ["ip", "netns", "exec", node.netns, "unshare", "--uts", "sh", "-c",
                   'hostname "$0" && exec "$@"', node.hostname, *cmd]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(wrapped, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def poll(self) -> Optional[int]:
        return self.proc.poll()

    def wait(self, timeout: float) -> int:
        """The exit status; past `timeout` seconds every process in the node is killed and the
        test fails with the log's tail."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.hosts.kill_node(self.node.index)
            self.proc.wait(timeout=30)
            raise AssertionError(f"node {self.node.index} still running after {timeout:.0f}s; killed. "
                                 f"Log tail:\n{self.output()[-4000:]}") from None


class TwoHosts:
    """Two simulated hosts, mrnode0 (198.18.0.1) and mrnode1 (198.18.0.2), on one veth pair."""

    def __init__(self):
        pid = os.getpid()
        self.nodes = [Node(i, f"{PREFIX}{pid}n{i}", f"{PREFIX}{pid}v{i}", f"{SUBNET}.{i + 1}", f"mrnode{i}")
                      for i in range(2)]
        self.procs: list[NodeProcess] = []
        self._made_etc = False
        self._closed = True

    def __enter__(self) -> "TwoHosts":
        self.create()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ set-up and teardown
    def create(self) -> None:
        remove_stale()
        self._closed = False
        atexit.register(self.close)
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        a, b = self.nodes
        for node in self.nodes:
            _ip("netns", "add", node.netns)
        _ip("link", "add", a.ifname, "type", "veth", "peer", "name", b.ifname)
        hosts = "127.0.0.1\tlocalhost\n" + "".join(f"{n.addr}\t{n.hostname}\n" for n in self.nodes)
        if not NETNS_ETC.exists():
            NETNS_ETC.mkdir()
            self._made_etc = True
        for node in self.nodes:
            _ip("link", "set", node.ifname, "netns", node.netns)
            _ip("-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", node.ifname)
            _ip("-n", node.netns, "link", "set", "lo", "up")
            _ip("-n", node.netns, "link", "set", node.ifname, "up")
            etc = NETNS_ETC / node.netns
            etc.mkdir(exist_ok=True)
            (etc / "hosts").write_text(hosts)
            # no name server outside: lookups of unknown names fail at once on the node's loopback
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")

    def close(self) -> None:
        """Kill everything inside, delete the namespaces, the veth pair and /etc/netns files."""
        if self._closed:
            return
        self._closed = True
        for node in self.nodes:
            self.kill_node(node.index)
        for proc in self.procs:  # anything that never entered a namespace (ip netns exec failed)
            if proc.poll() is None:
                try:
                    os.killpg(proc.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.proc.wait(timeout=30)
        for node in self.nodes:
            _ip("netns", "delete", node.netns, check=False)  # takes its veth end (and the peer) along
            _ip("link", "delete", node.ifname, check=False)  # only if it never left the root namespace
            shutil.rmtree(NETNS_ETC / node.netns, ignore_errors=True)
        if self._made_etc:
            try:
                NETNS_ETC.rmdir()
            except OSError:
                pass  # someone else's namespace files appeared meanwhile

    # ------------------------------------------------------------------ processes
    def start(self, index: int, cmd: list[str], env: dict, log: Path, cwd: Path) -> NodeProcess:
        """Start `cmd` on node `index` (own session, output to `log`)."""
        proc = NodeProcess(self, self.nodes[index], cmd, env, log, cwd)
        self.procs.append(proc)
        return proc

    def pids(self, index: int) -> list[int]:
        return netns_pids(self.nodes[index].netns)

    def traffic(self, index: int) -> tuple[int, int]:
        """Bytes (received, sent) so far on the node's veth interface."""
        node = self.nodes[index]
        proc = _ip("-n", node.netns, "-s", "-j", "link", "show", "dev", node.ifname)
        stats = json.loads(proc.stdout)[0]["stats64"]
        return stats["rx"]["bytes"], stats["tx"]["bytes"]

    def routes(self, index: int) -> list[str]:
        """The node's IPv4 and IPv6 routes, one line each."""
        node = self.nodes[index]
        return [line for family in ("-4", "-6") for line in
                _ip("-n", node.netns, family, "route", "show", "table", "all").stdout.splitlines()]

    def cut(self, index: int) -> None:
        """Take the node's veth down: the network drops with no connection closed (no RST, no FIN)."""
        node = self.nodes[index]
        _ip("-n", node.netns, "link", "set", node.ifname, "down")

    def kill_node(self, index: int, timeout: float = 30) -> None:
        """SIGKILL every process inside the node, as if it lost power; returns once none is left.

        torchrun starts each worker in a session of its own, so killing the agent's process
        group is not enough: every process whose network namespace is the node's is killed."""
        deadline = time.monotonic() + timeout
        while pids := self.pids(index):
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {index}: processes {pids} survive SIGKILL")
            time.sleep(0.1)
        for proc in self.procs:
            if proc.node.index == index and proc.poll() is None:
                proc.proc.wait(timeout=10)


def wait_all(procs: list[NodeProcess], timeout: float) -> list[int]:
    """Exit statuses of all `procs`, waiting at most `timeout` seconds in total."""
    deadline = time.monotonic() + timeout
    return [proc.wait(max(1.0, deadline - time.monotonic())) for proc in procs]
