"""Benchmark: live enforcement between two workloads on two hosts, five enforcement points.

One run builds, in network namespaces, the same shape of topology for each enforcement point
(the two kernel peers share one): an underlay
namespace with a bridge joining two host namespaces, a VXLAN overlay (VNI 7001) between the
hosts, and one workload namespace behind each host on a veth (MTU 1450, TSO and GSO off on the
workload's side, as ``microseg lab`` sets them). The policy is ``bench/live_policy.yaml``: the
client may open TCP and UDP connections to the server's port 5201 (iperf3) and TCP ones to
5301 (the connection-rate test); replies ride on conntrack; the rest is dropped. The
enforcement points:

* ``agent``: ``microseg lab up`` on that policy (its Python API, a private state directory,
  prefix ``msbl``), as the lab starts it by default: one ``microseg agent`` per host owns the
  host's ports (AF_PACKET rings) and does the overlay itself, and, where the lab and the
  kernel have one, puts its XDP fast path below it, which then carries a flow's packets
  after its first few without the agent. CPU: both agents' utime+stime (``/proc/PID/stat``);
  the XDP program's work is softirq time, in no process (see ``softirq``), and each row says
  which share of the packets the fast path carried (from ``lab stats``).
* ``agent-sw``: the same with the lab's offload off (prefix ``msbs``): the agents judge and
  forward every packet themselves (skipped where the lab has no such option).
* ``ovs``: Open vSwitch's userspace datapath, one ``ovsdb-server`` + ``ovs-vswitchd`` per host
  namespace: ``br-int`` (``datapath_type=netdev``, the workload's veth as an AF_PACKET port,
  a VXLAN tunnel port) with ``ct()`` flows for the same policy (the allowed ports NEW, then
  ``+est``/``+rel`` both ways, the rest dropped), ``br-phy`` holding the underlay veth and
  the tunnel endpoint's address. ``tx`` checksum offload is off in the workloads (AF_PACKET
  would see CHECKSUM_PARTIAL frames). CPU: both ``ovs-vswitchd`` processes' utime+stime.
* ``kernel``: the host namespaces route (kernel VXLAN device between them, static
  neighbours), with the ruleset of ``microseg policy export --format nftables`` loaded in
  each host's forward hook. The kernel does this work in softirq context, which no process
  owns, so its CPU is the whole machine's (``/proc/stat`` user+nice+system+irq+softirq) over
  the test minus the load generators' own CPU (iperf3 or the connection test's client and
  server, from their rusage): that figure also holds whatever else the machine ran.
* ``none``: the same routed kernel topology with no ruleset (the ceiling).

Tests, each ``--seconds`` long: iperf3 TCP (Gbit/s, one stream), iperf3 UDP at 64-byte and
1400-byte payloads with no rate limit (packets/s received by the server, loss), and TCP
connections per second (a Python client in the client namespace connects, waits for the
server's close and closes, in a loop; the server accepts and closes). For each test the
packets are the frames that crossed the underlay (both directions, counted on the underlay
bridge's ports), and "CPU s per Mpkt" is the enforcement point's CPU (both hosts) per million
of them; "machine" is the whole machine's CPU minus the load generators' for every peer,
which for the agent and OVS adds the kernel's work on their veths and sockets, and
"softirq" the machine's softirq time per million of them. This kernel has no
CONFIG_IRQ_TIME_ACCOUNTING (the run records it): softirq work done on the way out of a
system call is then also charged to the calling process, so the load generators' rusage holds
part of the forwarding work and "machine minus load generators" undercounts the kernel peers;
and when other work keeps the machine's cores busy, the machine's busy time is simply its
cores times the test's length, so that figure then says little (the softirq one says more).

Before a peer is measured, one connection to the allowed port must pass and one to a port the
policy denies (5302/tcp, a server listening there too) must be dropped (the kernel without a
ruleset must let it through); a peer that fails either is skipped.

The machine is shared, so every figure is the median of ``--rounds`` rounds, the peers
interleaved within each test of each round (their order rotating), and the run records the
spread, the idle CPU of the machine measured before each round and the CPU time stolen by the
hypervisor. Peers that cannot run (not root, no iperf3, no Open vSwitch, no nft) are reported
"skipped: reason". Everything the run makes (namespaces, veths, bridges, OVS daemons, iperf3
and test processes) is removed also on failure, and leftovers of an earlier run with the same
prefixes are removed first; nothing is created in, or changed on, the machine's own
namespace.

Usage: python bench/live.py [--rounds N] [--seconds S] [--peers agent,agent-sw,ovs,kernel,none]
Results: bench/results/live.json, and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

POLICY = os.path.join(HERE, "live_policy.yaml")
RESULTS = os.path.join(HERE, "results", "live.json")
WORK = os.path.join(tempfile.gettempdir(), "microseg-bench-live")
LAB_PREFIX, LAB_SW_PREFIX, KERNEL_PREFIX, OVS_PREFIX = "msbl", "msbs", "msbk", "msbo"

# from bench/live_policy.yaml
VNI = 7001
HOSTS = {"host-a": "192.168.77.1", "host-b": "192.168.77.2"}
CLIENT = {"name": "bench/client", "host": "host-a", "ip": "10.77.0.1", "mac": "02:00:0a:4d:00:01"}
SERVER = {"name": "bench/server", "host": "host-b", "ip": "10.77.0.2", "mac": "02:00:0a:4d:00:02"}
IPERF_PORT, CONN_PORT = 5201, 5301
UNDERLAY_MTU, WORKLOAD_MTU = 1500, 1450

TESTS = ("tcp", "udp64", "udp1400", "conn")
PEERS = ("agent", "agent-sw", "ovs", "kernel", "none")
LABELS = {
    "agent": "microseg agent, lab defaults",
    "agent-sw": "microseg agent, lab offload off",
    "ovs": "Open vSwitch 3.1 userspace (netdev, AF_PACKET, ct)",
    "kernel": "Linux kernel, routed + nftables export",
    "none": "Linux kernel, routed, no ruleset",
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Skip(Exception):
    """This peer (or test) cannot run here; the message says why."""


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def sh(*cmd: str, stdin: str | None = None, check: bool = True, env=None) -> str:
    r = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True, env=env)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {(r.stderr or r.stdout).strip() or 'failed'}")
    return r.stdout


def nsx(ns: str, *cmd: str, **kw) -> str:
    return sh("ip", "netns", "exec", ns, *cmd, **kw)


def ip_batch(ns: str, lines: list[str]) -> None:
    sh("ip", "-n", ns, "-batch", "-", stdin="\n".join(lines) + "\n")


def netns_list() -> list[str]:
    out = sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(ns: str) -> list[int]:
    return [int(x) for x in sh("ip", "netns", "pids", ns, check=False).split()]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_pids(pids: list[int], grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL what is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = [p for p in pids if alive(p)]
        if not pids:
            return


def remove_namespaces(prefix: str) -> None:
    """Stop every process in, then delete, every namespace named ``PREFIX-...``."""
    mine = [ns for ns in netns_list() if ns.startswith(prefix + "-")]
    pids = sorted({p for ns in mine for p in netns_pids(ns)})
    if pids:
        stop_pids(pids)
    for ns in mine:
        sh("ip", "netns", "del", ns, check=False)


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu() -> dict:
    """The whole machine's CPU so far, seconds: busy (user+nice+system+irq+softirq), steal, idle."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
    return {
        "busy": (user + nice + system + irq + softirq) / CLK_TCK,
        "softirq": softirq / CLK_TCK,
        "steal": steal / CLK_TCK,
        "idle": (idle + iowait) / CLK_TCK,
    }


def link_packets(ns: str, dev: str) -> int:
    """Frames received by ``dev`` (in namespace ``ns``)."""
    info = json.loads(sh("ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev))
    return int(info[0]["stats64"]["rx"]["packets"])


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        out = sh("lscpu", check=False)
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("Hypervisor vendor:"):
                cpu += f" ({line.split(':', 1)[1].strip()} guest)"
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "iperf3": _version(["iperf3", "--version"]),
        "ovs": _version(["ovs-vswitchd", "--version"]),
        "nft": _version(["nft", "--version"]),
        "irq_time_accounting": _kernel_option("CONFIG_IRQ_TIME_ACCOUNTING"),
    }


def _source() -> dict:
    """The commit the measured code is at (and whether the tree differs from it)."""
    root = os.path.join(HERE, "..")
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "src"],
            capture_output=True,
            text=True,
        )
    except OSError:
        return {}
    return {"commit": head.stdout.strip() or None, "src_modified": bool(dirty.stdout.strip())}


def _kernel_option(name: str) -> bool | None:
    """Is a kernel build option set (from /proc/config.gz; None when unknown)? Without
    CONFIG_IRQ_TIME_ACCOUNTING, softirq work done in a process's context is charged to it."""
    import gzip

    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            text = f.read()
    except OSError:
        return None
    return f"\n{name}=y" in "\n" + text


def _version(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    r = subprocess.run(cmd, capture_output=True, text=True)
    return (r.stdout or r.stderr).splitlines()[0].strip() if (r.stdout or r.stderr) else None


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


# ---------------------------------------------------------------------------------------------
# processes in the workloads (load generators): started, reaped with their rusage
# ---------------------------------------------------------------------------------------------
class Proc:
    """A load generator in a namespace (``ip netns exec`` execs, so the pid is the program's);
    ``wait`` reaps it and keeps its CPU time (rusage)."""

    live: set = set()  # every one not yet reaped, stopped in the run's finally

    def __init__(self, ns: str, cmd: list[str], out: str | None = None):
        """``out``: a file for the program's stdout (and ``out + ".err"`` for its stderr);
        without it, both are pipes (for short, line-by-line output)."""
        self.out = out
        if out:
            stdout, stderr = open(out, "w"), open(out + ".err", "w")
        else:
            stdout = stderr = subprocess.PIPE
        try:
            self.p = subprocess.Popen(
                ["ip", "netns", "exec", ns, *cmd],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                text=True,
                start_new_session=True,
            )
        finally:
            if out:
                stdout.close()
                stderr.close()
        self.cpu = 0.0
        self.rc: int | None = None
        Proc.live.add(self)

    def wait_line(self, marker: str, timeout: float) -> None:
        """Read the program's stdout until a line holding ``marker`` (it is ready)."""
        import select

        deadline = time.monotonic() + timeout
        fd = self.p.stdout.fileno()
        buf = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.1)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                buf += chunk
                if marker.encode() in buf:
                    return
            elif self._reap(False):
                break
        err = self.p.stderr.read() if self._reap(False) else ""
        raise RuntimeError(
            f"not ready ({marker!r}): {buf.decode(errors='replace').strip()} {err.strip()}"[:600]
        )

    def _reap(self, block: bool) -> bool:
        if self.rc is not None:
            return True
        pid, status, ru = os.wait4(self.p.pid, 0 if block else os.WNOHANG)
        if not pid:
            return False
        self.p.returncode = self.rc = os.waitstatus_to_exitcode(status)
        self.cpu = ru.ru_utime + ru.ru_stime
        Proc.live.discard(self)
        return True

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while not self._reap(False):
            if time.monotonic() > deadline:
                try:
                    os.killpg(self.p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._reap(True)
                break
            time.sleep(0.02)
        return self.rc

    def stop(self) -> None:
        if self.rc is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            self.wait(3.0)

    def output(self) -> tuple[str, str]:
        """The stdout and stderr a program with ``out`` wrote."""
        with open(self.out) as f, open(self.out + ".err") as g:
            return f.read(), g.read()


CONN_SERVER = r"""
import signal, socket, sys
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(4096)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.close()
"""

CONN_CLIENT = r"""
import json, socket, sys, time
ip, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
n = fail = 0
t0 = time.monotonic()
end = t0 + secs
while time.monotonic() < end:
    c = socket.socket()
    c.settimeout(3.0)
    try:
        c.connect((ip, port))
        c.recv(1)
        n += 1
    except OSError:
        fail += 1
    finally:
        c.close()
print(json.dumps({"connections": n, "failures": fail, "seconds": time.monotonic() - t0}))
"""


# ---------------------------------------------------------------------------------------------
# the peers
# ---------------------------------------------------------------------------------------------
class Peer:
    name = ""
    client_ns = server_ns = underlay_ns = ""
    underlay_ports: tuple = ()

    def build(self) -> None: ...

    def teardown(self) -> None: ...

    def prepare(self) -> None:
        """Before each test (the kernel peers share one topology)."""

    def enforcement_cpu(self) -> float | None:
        """CPU seconds of the enforcement point's processes so far; None: the kernel's."""
        return None

    def underlay_packets(self) -> int:
        return sum(link_packets(self.underlay_ns, d) for d in self.underlay_ports)

    def counters(self) -> dict:
        """The enforcement point's own packet counters (deltas go into each row)."""
        return {}


class AgentPeer(Peer):
    """``microseg lab up`` on the policy. ``offload``: None, the lab's default (its agents
    put a kernel XDP fast path below them where the lab and the kernel have one); False, the
    agents forward every packet themselves (a lab without that option is skipped)."""

    def __init__(self, name: str, prefix: str, offload: bool | None):
        self.name = name
        self.prefix = prefix
        self.offload = offload
        self.state_dir = os.path.join(WORK, f"lab-{prefix}")
        self.pids: list[int] = []
        self.fastpath: dict = {}

    def build(self) -> None:
        import inspect

        from microseg.agent import lab

        kw = {}
        if self.offload is not None:
            if "offload" not in inspect.signature(lab.up).parameters:
                raise Skip("this lab has no kernel fast path to turn off (lab.up has no offload option)")
            kw["offload"] = self.offload
        d = lab.up(POLICY, state_dir=self.state_dir, prefix=self.prefix, echo=lambda *_: None, **kw)
        self.client_ns = d["workloads"][CLIENT["name"]]["ns"]
        self.server_ns = d["workloads"][SERVER["name"]]["ns"]
        self.underlay_ns = d["underlay"]
        self.underlay_ports = ("h0", "h1")
        self.pids = [h["pid"] for h in d["hosts"].values()]
        fp = [h.get("fastpath") or {} for h in lab.stats(self.state_dir)["hosts"].values()]
        self.fastpath = {
            "kind": sorted({f.get("kind", "none") for f in fp}),
            "reason": sorted({str(f["reason"]) for f in fp if f.get("reason")}),
        }

    def teardown(self) -> None:
        from microseg.agent import lab

        if os.path.exists(os.path.join(self.state_dir, lab.STATE_FILE)):
            lab.down(self.state_dir, echo=lambda *_: None)

    def enforcement_cpu(self) -> float:
        return sum(proc_cpu(p) for p in self.pids)

    def counters(self) -> dict:
        """Packets the agents judged and packets their fast path carried without them."""
        from microseg.agent import lab

        hosts = lab.stats(self.state_dir)["hosts"].values()
        return {
            "agent_packets": sum(h["agent"].get("packets", 0) for h in hosts),
            "fastpath_packets": sum((h.get("fastpath") or {}).get("packets", 0) for h in hosts),
        }


class NetnsTopology:
    """Underlay namespace with a bridge, two host namespaces on it (``ul``), a workload
    namespace behind each host (``eth0`` there, ``w0`` on the host). Addresses and routes are
    the caller's."""

    def __init__(self, prefix: str, tx_csum: bool):
        self.prefix = prefix
        self.tx_csum = tx_csum
        self.underlay = f"{prefix}-underlay"
        self.host = {h: f"{prefix}-host-{h}" for h in HOSTS}
        self.wl = {w["name"]: f"{prefix}-wl-{w['name'].split('/')[1]}" for w in (CLIENT, SERVER)}

    def build(self) -> None:
        if shutil.which("ethtool") is None:
            raise Skip("no ethtool (the workloads' offloads must be set)")
        for ns in [self.underlay, *self.host.values(), *self.wl.values()]:
            sh("ip", "netns", "add", ns)
            ip_batch(ns, ["link set lo up"])
            nsx(
                ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            )
        ip_batch(self.underlay, ["link add br0 type bridge", "link set br0 up"])
        for i, ns in enumerate(ns for _, ns in sorted(self.host.items())):
            sh(*f"ip -n {self.underlay} link add h{i} type veth peer name ul netns {ns}".split())
            ip_batch(self.underlay, [f"link set h{i} master br0 up"])
            ip_batch(ns, [f"link set ul mtu {UNDERLAY_MTU} up"])
        for w in (CLIENT, SERVER):
            ns, hns = self.wl[w["name"]], self.host[w["host"]]
            sh("ip", "-n", hns, "link", "add", "w0", "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip_batch(hns, [f"link set w0 mtu {WORKLOAD_MTU} up"])
            ip_batch(ns, [f"link set eth0 address {w['mac']} mtu {WORKLOAD_MTU}"])
            offloads = ["tso", "off", "gso", "off"] + ([] if self.tx_csum else ["tx", "off"])
            nsx(ns, "ethtool", "-K", "eth0", *offloads)
            ip_batch(
                ns, ["link set eth0 up", f"addr add {w['ip']}/32 dev eth0", "route add default dev eth0"]
            )

    def teardown(self) -> None:
        remove_namespaces(self.prefix)


class KernelTopology(NetnsTopology):
    """The hosts route: kernel VXLAN between them (``vx0``, addresses 172.30.0.1/2 on it, the
    peer's neighbour entry static), ``w0`` towards the workload with a static neighbour, and
    the workload's neighbour entry for the other workload pointing at its host's ``w0``."""

    VX = {"host-a": ("172.30.0.1", "02:77:ee:00:00:01"), "host-b": ("172.30.0.2", "02:77:ee:00:00:02")}

    def __init__(self):
        super().__init__(KERNEL_PREFIX, tx_csum=True)
        self.nft_file = os.path.join(WORK, "ruleset.nft")
        self.ruleset = False

    def build(self) -> None:
        super().build()
        wl_of = {CLIENT["host"]: CLIENT, SERVER["host"]: SERVER}
        for h, ns in self.host.items():
            other = next(o for o in HOSTS if o != h)
            me, peer = wl_of[h], wl_of[other]
            vip, vmac = self.VX[h]
            pip, pmac = self.VX[other]
            nsx(
                ns, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            )  # fmt: skip
            ip_batch(
                ns,
                [
                    f"addr add {HOSTS[h]}/24 dev ul",
                    f"link add vx0 address {vmac} mtu {WORKLOAD_MTU} type vxlan id {VNI} "
                    f"local {HOSTS[h]} remote {HOSTS[other]} dstport 4789 dev ul nolearning",
                    "link set vx0 up",
                    f"addr add {vip}/24 dev vx0",
                    f"neigh replace {pip} lladdr {pmac} dev vx0 nud permanent",
                    f"route add {peer['ip']}/32 via {pip} dev vx0",
                    f"route add {me['ip']}/32 dev w0",
                    f"neigh replace {me['ip']} lladdr {me['mac']} dev w0 nud permanent",
                ],
            )
            w0mac = json.loads(sh("ip", "-n", ns, "-j", "link", "show", "dev", "w0"))[0]["address"]
            ip_batch(
                self.wl[me["name"]], [f"neigh replace {peer['ip']} lladdr {w0mac} dev eth0 nud permanent"]
            )

    def load_ruleset(self) -> None:
        if not os.path.exists(self.nft_file):
            text = sh(sys.executable, "-m", "microseg", "policy", "export", "--format", "nftables", POLICY)
            with open(self.nft_file, "w") as f:
                f.write(text)
        for ns in self.host.values():
            nsx(ns, "nft", "-f", self.nft_file)
        self.ruleset = True

    def unload_ruleset(self) -> None:
        for ns in self.host.values():
            nsx(ns, "nft", "delete", "table", "inet", "microseg", check=False)
        self.ruleset = False


class KernelPeer(Peer):
    def __init__(self, name: str, topo: KernelTopology):
        self.name = name
        self.topo = topo
        self.client_ns = topo.wl[CLIENT["name"]]
        self.server_ns = topo.wl[SERVER["name"]]
        self.underlay_ns = topo.underlay
        self.underlay_ports = ("h0", "h1")

    def build(self) -> None:
        if self.name == "kernel":
            if shutil.which("nft") is None:
                raise Skip("no nft (nftables)")
            self.topo.load_ruleset()  # once, to see that it loads
            self.topo.unload_ruleset()

    def prepare(self) -> None:
        if self.name == "kernel" and not self.topo.ruleset:
            self.topo.load_ruleset()
        elif self.name == "none" and self.topo.ruleset:
            self.topo.unload_ruleset()


class OvsPeer(Peer):
    """One ovsdb-server + ovs-vswitchd per host namespace (run directories under WORK)."""

    name = "ovs"
    PHY_MAC = {"host-a": "02:77:0f:00:00:01", "host-b": "02:77:0f:00:00:02"}

    def __init__(self):
        self.topo = NetnsTopology(OVS_PREFIX, tx_csum=False)
        self.client_ns = self.topo.wl[CLIENT["name"]]
        self.server_ns = self.topo.wl[SERVER["name"]]
        self.underlay_ns = self.topo.underlay
        self.underlay_ports = ("h0", "h1")
        self.dirs = {h: os.path.join(WORK, f"ovs-{h}") for h in HOSTS}
        self.vswitchd: list[int] = []

    def _env(self, h: str) -> dict:
        d = self.dirs[h]
        return dict(os.environ, OVS_RUNDIR=d, OVS_LOGDIR=d, OVS_DBDIR=d, OVS_SYSCONFDIR=d)

    def vsctl(self, h: str, *args: str) -> str:
        return sh("ovs-vsctl", f"--db=unix:{self.dirs[h]}/db.sock", "--timeout=20", *args, env=self._env(h))

    def appctl(self, h: str, *args: str, check: bool = True) -> str:
        d = self.dirs[h]
        with open(os.path.join(d, "ovs-vswitchd.pid")) as f:
            pid = f.read().strip()
        return sh("ovs-appctl", "-t", f"{d}/ovs-vswitchd.{pid}.ctl", *args, env=self._env(h), check=check)

    def flows(self) -> str:
        z = VNI
        c, s = CLIENT["ip"], SERVER["ip"]
        allow = [("tcp", IPERF_PORT), ("udp", IPERF_PORT), ("tcp", CONN_PORT)]
        lines = [
            "table=0,priority=100,arp,actions=NORMAL",
            f"table=0,priority=100,ip,actions=ct(table=1,zone={z})",
            "table=0,priority=0,actions=drop",
            "table=1,priority=110,ct_state=+trk+inv,actions=drop",
        ]
        for proto, port in allow:
            lines.append(
                f"table=1,priority=100,ct_state=+trk+new,{proto},nw_src={c},nw_dst={s},"
                f"tp_dst={port},actions=ct(commit,zone={z}),NORMAL"
            )
        lines += [
            "table=1,priority=90,ct_state=+trk+est,ip,actions=NORMAL",
            "table=1,priority=90,ct_state=+trk+rel,ip,actions=NORMAL",
            "table=1,priority=0,actions=drop",
        ]
        return "\n".join(lines) + "\n"

    def build(self) -> None:
        for tool in ("ovsdb-tool", "ovsdb-server", "ovs-vswitchd", "ovs-vsctl", "ovs-ofctl", "ovs-appctl"):
            if shutil.which(tool) is None:
                raise Skip(f"no {tool} (apt-get install openvswitch-switch)")
        schema = "/usr/share/openvswitch/vswitch.ovsschema"
        if not os.path.exists(schema):
            raise Skip(f"no {schema}")
        self.topo.build()
        for h, ns in self.topo.host.items():
            d, env = self.dirs[h], self._env(h)
            os.makedirs(d, exist_ok=True)
            sh("ovsdb-tool", "create", f"{d}/conf.db", schema, env=env)
            nsx(
                ns, "ovsdb-server", f"--remote=punix:{d}/db.sock", f"--pidfile={d}/ovsdb-server.pid",
                "--detach", f"--log-file={d}/ovsdb-server.log", f"{d}/conf.db", env=env,
            )  # fmt: skip
            self.vsctl(h, "--no-wait", "init")
            nsx(
                ns, "ovs-vswitchd", f"unix:{d}/db.sock", f"--pidfile={d}/ovs-vswitchd.pid", "--detach",
                f"--log-file={d}/ovs-vswitchd.log", env=env,
            )  # fmt: skip
            other = next(o for o in HOSTS if o != h)
            self.vsctl(
                h, "add-br", "br-phy", "--", "set", "bridge", "br-phy", "datapath_type=netdev",
                f"other-config:hwaddr={self.PHY_MAC[h]}", "--", "add-port", "br-phy", "ul",
            )  # fmt: skip
            self.vsctl(
                h, "add-br", "br-int", "--", "set", "bridge", "br-int", "datapath_type=netdev",
                "fail-mode=secure", "--", "add-port", "br-int", "w0", "--", "add-port", "br-int", "vx0",
                "--", "set", "interface", "vx0", "type=vxlan", f"options:remote_ip={HOSTS[other]}",
                f"options:local_ip={HOSTS[h]}", f"options:key={VNI}",
            )  # fmt: skip
            ip_batch(ns, [f"addr add {HOSTS[h]}/24 dev br-phy", f"link set br-phy mtu {UNDERLAY_MTU} up"])
            sh("ovs-ofctl", "del-flows", "br-int", env=env)
            sh("ovs-ofctl", "add-flows", "br-int", "-", stdin=self.flows(), env=env)
            self.appctl(h, "ovs/route/add", f"{HOSTS[other]}/32", "br-phy", check=False)
            self.appctl(h, "tnl/neigh/set", "br-phy", HOSTS[other], self.PHY_MAC[other])
        # each workload knows the other's MAC (an L2 overlay: NORMAL learns, floods the first)
        for w, o in ((CLIENT, SERVER), (SERVER, CLIENT)):
            ip_batch(
                self.topo.wl[w["name"]], [f"neigh replace {o['ip']} lladdr {o['mac']} dev eth0 nud permanent"]
            )
        self.vswitchd = [_read_pid(f"{self.dirs[h]}/ovs-vswitchd.pid") for h in HOSTS]

    def teardown(self) -> None:
        for d in self.dirs.values():
            for name in ("ovs-vswitchd", "ovsdb-server"):
                pid = _read_pid(f"{d}/{name}.pid", missing_ok=True)
                if pid and alive(pid):
                    stop_pids([pid])
        self.topo.teardown()

    def enforcement_cpu(self) -> float:
        return sum(proc_cpu(p) for p in self.vswitchd)


def _read_pid(path: str, missing_ok: bool = False) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        if missing_ok:
            return None
        raise


def cleanup_leftovers() -> None:
    """What an earlier run (crashed or killed) may have left: the lab (by its state file),
    the OVS daemons (by their pid files), then every namespace with one of our prefixes."""
    from microseg.agent import lab

    for prefix in (LAB_PREFIX, LAB_SW_PREFIX):
        state = os.path.join(WORK, f"lab-{prefix}")
        if os.path.exists(os.path.join(state, lab.STATE_FILE)):
            try:
                lab.down(state, echo=lambda *_: None)
            except Exception as exc:  # noqa: BLE001 - go on with the namespaces
                print(f"live: lab down of a previous run: {exc}", file=sys.stderr)
    for h in HOSTS:
        d = os.path.join(WORK, f"ovs-{h}")
        for name in ("ovs-vswitchd", "ovsdb-server"):
            pid = _read_pid(f"{d}/{name}.pid", missing_ok=True)
            if pid and alive(pid):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        ours = name.encode() in f.read()
                except OSError:
                    ours = False
                if ours:
                    stop_pids([pid])
    for prefix in (LAB_PREFIX, LAB_SW_PREFIX, KERNEL_PREFIX, OVS_PREFIX):
        remove_namespaces(prefix)
    shutil.rmtree(WORK, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# one measurement
# ---------------------------------------------------------------------------------------------
def measure(peer: Peer, test: str, seconds: float) -> dict:
    peer.prepare()
    if test == "conn":
        server = Proc(peer.server_ns, [sys.executable, "-c", CONN_SERVER, SERVER["ip"], str(CONN_PORT)])
        client_cmd = [sys.executable, "-c", CONN_CLIENT, SERVER["ip"], str(CONN_PORT), str(seconds)]
        marker = "ready"
    else:
        server = Proc(
            peer.server_ns, ["iperf3", "-s", "-1", "--forceflush", "-B", SERVER["ip"], "-p", str(IPERF_PORT)]
        )
        client_cmd = ["iperf3", "-c", SERVER["ip"], "-p", str(IPERF_PORT), "-t", str(seconds), "-J"]
        if test.startswith("udp"):
            client_cmd += ["-u", "-b", "0", "-l", test[3:]]
        marker = "listening"
    try:
        server.wait_line(marker, 10.0)
        c0 = peer.counters()
        pk0, m0, e0, t0 = peer.underlay_packets(), machine_cpu(), peer.enforcement_cpu(), time.monotonic()
        client = Proc(peer.client_ns, client_cmd, out=os.path.join(WORK, f"{peer.name}-{test}.out"))
        client.wait(seconds + 30)
        if test == "conn":
            server.stop()
        else:
            server.wait(10.0)
        el = time.monotonic() - t0
        pk1, m1, e1 = peer.underlay_packets(), machine_cpu(), peer.enforcement_cpu()
        c1 = peer.counters()
    finally:
        server.stop()
    out, err = client.output()
    loadgen = client.cpu + server.cpu
    machine = m1["busy"] - m0["busy"]
    packets = pk1 - pk0
    enforcement = (e1 - e0) if e0 is not None else machine - loadgen
    row = {
        "seconds": el,
        "underlay_packets": packets,
        "enforcement_cpu_s": enforcement,
        "enforcement_cpu_kind": "process" if e0 is not None else "machine minus load generators",
        "machine_cpu_s": machine,
        "machine_softirq_s": m1["softirq"] - m0["softirq"],
        "steal_s": m1["steal"] - m0["steal"],
        "loadgen_cpu_s": loadgen,
        "cpu_s_per_mpkt": enforcement / packets * 1e6 if packets else None,
        "machine_cpu_s_per_mpkt": (machine - loadgen) / packets * 1e6 if packets else None,
        "softirq_s_per_mpkt": (m1["softirq"] - m0["softirq"]) / packets * 1e6 if packets else None,
        **{k: c1[k] - c0[k] for k in c0},
    }
    if c0.get("agent_packets") is not None:
        seen = row["agent_packets"] + row["fastpath_packets"]
        row["fastpath_share"] = row["fastpath_packets"] / seen if seen else None
    if test == "conn":
        r = json.loads(out)
        row.update(r, conn_per_s=r["connections"] / r["seconds"])
        return row
    if client.rc != 0:
        raise RuntimeError(f"iperf3 client exited {client.rc}: {out[-300:]} {err[-300:]}")
    d = json.loads(out)
    if "error" in d:
        raise RuntimeError(f"iperf3: {d['error']}")
    e = d["end"]
    if test == "tcp":
        row.update(
            gbps=e["sum_received"]["bits_per_second"] / 1e9,
            sender_gbps=e["sum_sent"]["bits_per_second"] / 1e9,
            retransmits=e["sum_sent"].get("retransmits"),
        )
    else:
        rx = e["sum_received"]
        got = rx["packets"] - rx["lost_packets"]
        row.update(
            payload=int(test[3:]),
            sent_packets=e["sum_sent"]["packets"],
            received_packets=got,
            received_pps=got / rx["seconds"] if rx["seconds"] else 0.0,
            sent_pps=e["sum_sent"]["packets"] / e["sum_sent"]["seconds"],
            loss=rx["lost_packets"] / rx["packets"] if rx["packets"] else None,
        )
    return row


DENIED_PORT = 5302  # not allowed by bench/live_policy.yaml

SMOKE_CLIENT = r"""
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print("ok" if s.recv(1) == b"" else "data")
except socket.timeout:
    print("timeout")
except OSError as exc:
    print("error", exc)
"""


def smoke(peer: Peer) -> str:
    """One connection to the allowed port, so a broken peer is skipped, not measured, and one
    to a port the policy denies (a server listens there too): an enforcing peer must drop it.
    Returns what the denied connection got ("timeout": dropped)."""
    servers = [
        Proc(peer.server_ns, [sys.executable, "-c", CONN_SERVER, SERVER["ip"], str(port)])
        for port in (CONN_PORT, DENIED_PORT)
    ]
    path = os.path.join(WORK, f"{peer.name}-smoke.out")

    def attempt(port: int, timeout: float) -> str:
        c = Proc(
            peer.client_ns,
            [sys.executable, "-c", SMOKE_CLIENT, SERVER["ip"], str(port), str(timeout)],
            out=path,
        )
        c.wait(timeout + 15.0)
        return " ".join(c.output()).strip()

    try:
        for srv in servers:
            srv.wait_line("ready", 10.0)
        for _attempt in range(10):
            out = attempt(CONN_PORT, 5.0)
            if out == "ok":
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"no TCP connection from client to server: {out}")
        denied = attempt(DENIED_PORT, 2.0)
        if peer.name != "none" and denied != "timeout":
            raise RuntimeError(
                f"port {DENIED_PORT}, which the policy denies, answered ({denied}): not enforced"
            )
        return "dropped" if denied == "timeout" else denied
    finally:
        for srv in servers:
            srv.stop()


def idle_cpu(seconds: float) -> dict:
    m0, t0 = machine_cpu(), time.monotonic()
    time.sleep(seconds)
    m1, el = machine_cpu(), time.monotonic() - t0
    return {
        "busy_cores": (m1["busy"] - m0["busy"]) / el,
        "steal_cores": (m1["steal"] - m0["steal"]) / el,
        "loadavg": loadavg(),
    }


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
COMMON_METRICS = ("cpu_s_per_mpkt", "machine_cpu_s_per_mpkt", "softirq_s_per_mpkt", "fastpath_share")
UDP_METRICS = ("received_pps", "loss", "sent_pps", *COMMON_METRICS)
METRICS = {
    "tcp": ("gbps", "retransmits", *COMMON_METRICS),
    "udp64": UDP_METRICS,
    "udp1400": UDP_METRICS,
    "conn": ("conn_per_s", "failures", *COMMON_METRICS),
}


def summarize(rows: list[dict], test: str) -> dict:
    out = {"n": len(rows)}
    for k in METRICS[test]:
        vals = [r[k] for r in rows if r.get(k) is not None]
        if vals:
            out[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return out


def run(args) -> dict:
    result: dict = {
        "benchmark": "live enforcement between two workloads on two hosts (bench/live.py)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine_info(),
        "source": _source(),
        "setup": {
            "policy": "bench/live_policy.yaml",
            "rounds": args.rounds,
            "seconds_per_test": args.seconds,
            "overlay": f"VXLAN VNI {VNI}, underlay MTU {UNDERLAY_MTU}, workload MTU {WORKLOAD_MTU}",
            "workload_offloads": "TSO and GSO off on the workloads' eth0 (as microseg lab sets "
            "them); tx checksum offload also off for Open vSwitch (and wherever the lab turns it "
            "off for its fast path)",
            "packets": "frames received by the underlay bridge's ports (both directions)",
            "cpu_s_per_mpkt": "the enforcement point's CPU (both hosts) per million underlay "
            "frames: agent and ovs-vswitchd processes' utime+stime; for the kernel peers the "
            "whole machine's busy time minus the load generators'",
            "machine_cpu_s_per_mpkt": "the whole machine's busy time minus the load generators', "
            "per million underlay frames, for every peer",
            "softirq_s_per_mpkt": "the whole machine's softirq time per million underlay frames "
            "(where the kernel forwards, and where an XDP fast path runs)",
            "fastpath_share": "agent peers: packets the fast path carried / (those + packets the "
            "agents judged), from lab stats",
            "statistic": "median over rounds (min and max beside it); peers interleaved in "
            "each test of each round, their order rotating",
        },
        "peers": {},
        "rounds": [],
    }
    if os.geteuid() != 0:
        for p in args.peers:
            result["peers"][p] = {"label": LABELS[p], "skipped": "needs root (network namespaces)"}
        return result
    if shutil.which("ip") is None:
        for p in args.peers:
            result["peers"][p] = {"label": LABELS[p], "skipped": "no ip (iproute2)"}
        return result
    tests = [t for t in TESTS if t == "conn" or shutil.which("iperf3")]
    result["setup"]["tests"] = tests
    if "tcp" not in tests:
        result["setup"]["iperf3"] = "skipped: no iperf3 (apt-get install iperf3)"

    cleanup_leftovers()
    os.makedirs(WORK, mode=0o700, exist_ok=True)
    peers: dict[str, Peer] = {}
    built: list = []
    try:
        kt = KernelTopology() if {"kernel", "none"} & set(args.peers) else None
        for name in args.peers:
            peer: Peer
            info: dict = {"label": LABELS[name]}
            result["peers"][name] = info
            try:
                if name in ("agent", "agent-sw"):
                    peer = AgentPeer(
                        name, *((LAB_PREFIX, None) if name == "agent" else (LAB_SW_PREFIX, False))
                    )
                    built.append(peer)
                elif name == "ovs":
                    peer = OvsPeer()
                    built.append(peer)
                else:
                    if kt not in built:
                        built.append(kt)
                        kt.build()
                    peer = KernelPeer(name, kt)
                peer.build()
                peer.prepare()
                info["denied_port"] = f"{DENIED_PORT}/tcp: {smoke(peer)}"
                peers[name] = peer
                if isinstance(peer, AgentPeer):
                    info["fastpath"] = peer.fastpath
                print(f"live: {name} ready", flush=True)
            except Skip as exc:
                info["skipped"] = str(exc)
            except Exception as exc:  # noqa: BLE001 - the peer is skipped, the others run
                info["skipped"] = f"setup failed: {type(exc).__name__}: {exc}"[:600]
            if "skipped" in info:
                print(f"live: {name} skipped: {info['skipped']}", flush=True)
        names = [n for n in args.peers if n in peers]
        for test in tests if args.warmup else ():  # not recorded: JIT, caches, ARP
            for name in names:
                try:
                    measure(peers[name], test, 1.0)
                except Exception as exc:  # noqa: BLE001 - the measured rounds will say
                    print(f"live: warm-up {test} {name}: {exc}", flush=True)
        for r in range(args.rounds):
            rnd = {"round": r, "idle": idle_cpu(2.0), "tests": {}}
            result["rounds"].append(rnd)
            for test in tests:
                order = names[r % len(names) :] + names[: r % len(names)] if names else []
                rnd["tests"][test] = {}
                for name in order:
                    try:
                        row = measure(peers[name], test, args.seconds)
                    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                        row = {"error": f"{type(exc).__name__}: {exc}"[:600]}
                    rnd["tests"][test][name] = row
                    print(f"live: round {r} {test:<7} {name:<8} {_short(test, row)}", flush=True)
    finally:
        for p in reversed(built):
            try:
                p.teardown()
            except Exception as exc:  # noqa: BLE001 - the rest is still removed
                print(f"live: teardown of {getattr(p, 'name', p)}: {exc}", file=sys.stderr)
        for proc in list(Proc.live):
            proc.stop()
        cleanup_leftovers()
    for name in peers:
        info = result["peers"][name]
        info["tests"] = {}
        for test in TESTS:
            if test not in tests:
                info["tests"][test] = {"skipped": "no iperf3"}
                continue
            rows = [
                rnd["tests"][test][name]
                for rnd in result["rounds"]
                if "error" not in rnd["tests"][test][name]
            ]
            errors = [
                rnd["tests"][test][name]["error"]
                for rnd in result["rounds"]
                if "error" in rnd["tests"][test][name]
            ]
            info["tests"][test] = summarize(rows, test) if rows else {"n": 0}
            if errors:
                info["tests"][test]["errors"] = errors
    idle = [rnd["idle"]["busy_cores"] for rnd in result["rounds"]]
    steal = [rnd["idle"]["steal_cores"] for rnd in result["rounds"]]
    if idle:
        result["noise"] = {
            "idle_busy_cores": {"median": statistics.median(idle), "min": min(idle), "max": max(idle)},
            "idle_steal_cores": {"median": statistics.median(steal), "min": min(steal), "max": max(steal)},
            "loadavg_at_rounds": [rnd["idle"]["loadavg"] for rnd in result["rounds"]],
        }
    return result


def _short(test: str, row: dict) -> str:
    if "error" in row:
        return "error: " + row["error"][:200]
    cpu = row.get("cpu_s_per_mpkt")
    cpu_s = f"{cpu:.2f} CPU s/Mpkt" if cpu is not None else "-"
    if row.get("fastpath_share") is not None:
        cpu_s += f", fast path {row['fastpath_share']:.0%}"
    if test == "tcp":
        return f"{row['gbps']:.3f} Gbit/s, {row['retransmits']} retr, {cpu_s}"
    if test == "conn":
        return f"{row['conn_per_s']:.0f} conn/s, {row['failures']} failed, {cpu_s}"
    return f"{row['received_pps'] / 1e3:.1f} kpps received, loss {row['loss']:.1%}, {cpu_s}"


def _med(info: dict, test: str, key: str, fmt: str) -> str:
    t = info.get("tests", {}).get(test, {})
    if key in t:
        return fmt.format(t[key]["median"])
    return "skipped: " + t["skipped"] if "skipped" in t else "-"


def _fastpath_note(info: dict) -> str:
    fp = info.get("fastpath")
    if not fp:
        return ""
    return f" (fast path: {', '.join(fp['kind'])})"


def table(result: dict) -> str:
    """Medians; "CPU" is the enforcement point's own (for the kernel peers, marked †, the
    machine's busy time minus the load generators'), "softirq" the machine's softirq time."""
    head = (
        "| enforcement point | TCP Gbit/s | UDP 64 B kpps (loss) | UDP 1400 B kpps (loss) | conn/s "
        "| CPU s/Mpkt TCP | CPU s/Mpkt UDP 64 B | softirq s/Mpkt TCP | softirq s/Mpkt UDP 64 B "
        "| fast path share TCP, conn |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for name, info in result["peers"].items():
        if "skipped" in info:
            lines.append(f"| {info['label']} | skipped: {info['skipped']} |  |  |  |  |  |  |  |  |")
            continue

        def udp(test: str) -> str:
            t = info.get("tests", {}).get(test, {})
            if "received_pps" not in t:
                return "skipped: " + t["skipped"] if "skipped" in t else "-"
            return f"{t['received_pps']['median'] / 1e3:.1f} ({t['loss']['median']:.0%})"

        mark = " †" if name in ("kernel", "none") else ""
        share = "-"
        if "fastpath_share" in info.get("tests", {}).get("tcp", {}):
            share = _med(info, "tcp", "fastpath_share", "{:.0%}") + ", "
            share += _med(info, "conn", "fastpath_share", "{:.0%}")
        cells = [
            info["label"] + _fastpath_note(info),
            _med(info, "tcp", "gbps", "{:.2f}"),
            udp("udp64"),
            udp("udp1400"),
            _med(info, "conn", "conn_per_s", "{:.0f}"),
            _med(info, "tcp", "cpu_s_per_mpkt", "{:.2f}") + mark,
            _med(info, "udp64", "cpu_s_per_mpkt", "{:.2f}") + mark,
            _med(info, "tcp", "softirq_s_per_mpkt", "{:.2f}"),
            _med(info, "udp64", "softirq_s_per_mpkt", "{:.2f}"),
            share,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each test")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated subset of " + ",".join(PEERS))
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument(
        "--no-warmup", dest="warmup", action="store_false", help="skip the 1 s warm-up of each test"
    )
    args = ap.parse_args(argv)
    args.peers = [p for p in args.peers.split(",") if p]
    bad = [p for p in args.peers if p not in PEERS]
    if bad:
        ap.error(f"unknown peers: {', '.join(bad)}")
    args.seconds = max(1.0, args.seconds)

    def _term(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _term)
    result = run(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    m = result["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, kernel {m['kernel']}")
    if "noise" in result:
        n = result["noise"]
        print(
            f"idle load before the rounds: {n['idle_busy_cores']['median']:.2f} cores busy "
            f"(min {n['idle_busy_cores']['min']:.2f}, max {n['idle_busy_cores']['max']:.2f}), "
            f"steal {n['idle_steal_cores']['median']:.2f}"
        )
    print(table(result))
    print(f"results: {os.path.relpath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
