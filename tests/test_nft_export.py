"""`microseg policy export --format nftables`: the generated ruleset, and the Linux kernel as a
verdict oracle. A routed namespace topology (a router with a veth per workload) loads the
exported ruleset in the router's forward hook; a probe matrix of real TCP, UDP and ICMP
sockets between the workloads must see exactly the verdicts microseg decides for the same
packets as NEW."""

import concurrent.futures
import ctypes
import errno
import ipaddress
import os
import re
import selectors
import shutil
import socket
import struct
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from microseg import ctstate
from microseg.cli import main
from microseg.errors import InputError
from microseg.packet.batch import text_to_addr
from microseg.policy import verdict as V
from microseg.policy.compiler import compile_policy, connection_keys
from microseg.policy.model import Workload, format_mac, load_policy, parse_policy
from microseg.policy.nft import export_nftables

VECTORS = Path(__file__).parent / "vectors"
EXAMPLE = VECTORS / "policy" / "example.yaml"
CLUSTERS = VECTORS / "k8s" / "clusters"
# (policy file, tenant, top-level settings changed; "dual_stack" gives every pod an IPv6 address)
SCENARIOS = [
    (EXAMPLE, "acme", ""),
    (EXAMPLE, "acme", "default_egress: deny\ndeny_action: reject\n"),
    (CLUSTERS / "npapi-anp-priority.yaml", "cluster1", "deny_action: reject\n"),
    (CLUSTERS / "npapi-anp-np-banp.yaml", "cluster1", "dual_stack\n"),
    (CLUSTERS / "website-test-network-policy.yaml", None, ""),
    (CLUSTERS / "recipes-11-dns.yaml", None, "deny_action: reject\n"),
]
ROUTER_V4, ROUTER_V6 = "169.254.0.1", "fe80::1"
DROP_TIMEOUT = 0.6  # seconds a probe waits before it counts as dropped
RECHECK_TIMEOUT = 3.0  # a probe seen dropped against an allow or reject is tried again this long
CLONE_NEWNET = 0x40000000
IP_RECVERR, IPV6_RECVERR = 11, 25  # <linux/in.h>, <linux/in6.h>
PREFIX = f"msnft{os.getpid() % 100000}"


def _policy(path, extra):
    text = path.read_text()
    for line in extra.splitlines():
        if line == "dual_stack":
            text = re.sub(
                r"ipv4: 10\.244\.(\d+)\.(\d+)", r'ipv4: 10.244.\1.\2, ipv6: "fd00:244:\1::\2"', text
            )
            continue
        key = line.split(":")[0]
        text, n = re.subn(rf"^{key}:.*$", line, text, flags=re.M)
        if not n:
            text += "\n" + line + "\n"
    return parse_policy(text, str(path), str(path.parent))


def _live_reason():
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables)"
    if shutil.which("nft") is None:
        return "needs nft (Debian package nftables)"
    if shutil.which("ip") is None:
        return "needs ip (iproute2)"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True)
    if r.returncode != 0:
        return "ip netns does not work here"
    return None


LIVE = _live_reason()
needs_live = pytest.mark.skipif(LIVE is not None, reason=LIVE or "")


# ---- the text, without the kernel ---------------------------------------------------------------
def test_several_tenants_need_one_named():
    p = load_policy(str(EXAMPLE))
    with pytest.raises(InputError, match="give --tenant"):
        export_nftables(p)
    with pytest.raises(InputError, match="no tenant 'nope'"):
        export_nftables(p, "nope")
    text = export_nftables(p, "acme")
    assert "table inet microseg {" in text
    assert "ct state established,related accept" in text and "ct state invalid drop" in text
    assert "set sg_db_v4" in text  # a remote group is a named set, not a rule per member
    assert "192.168.1.20 : jump eg_acme_db_1" in text and "g-web" not in text
    assert "reject" not in text.split("chain deny {")[1].split("}")[0]


def test_deny_action_and_extension_headers(tmp_path):
    p = _policy(CLUSTERS / "npapi-anp-priority.yaml", "deny_action: reject\n")
    deny = export_nftables(p).split("chain deny {")[1].split("}")[0]
    assert "reject with tcp reset" in deny and "drop" not in deny
    text = EXAMPLE.read_text().replace(
        "      - {direction: egress, ethertype: IPv6}\n",
        "      - {direction: egress, ethertype: IPv6, protocol: ipv6-route}\n",
    )
    p = parse_policy(text, str(EXAMPLE), str(EXAMPLE.parent))
    with pytest.raises(InputError, match="extension header"):
        export_nftables(p, "acme")
    assert main(["policy", "export", str(EXAMPLE), "--tenant", "acme", "-o", str(tmp_path / "a.nft")]) == 0
    assert (tmp_path / "a.nft").read_text() == export_nftables(load_policy(str(EXAMPLE)), "acme")
    assert main(["policy", "export", str(EXAMPLE)]) == 2


@needs_live
@pytest.mark.parametrize("path", sorted(CLUSTERS.glob("*.yaml")) + [EXAMPLE], ids=lambda p: p.stem)
def test_ruleset_loads(path, tmp_path):
    p = load_policy(str(path))
    for t in p.tenants:
        f = tmp_path / f"{t.name}.nft"
        f.write_text(export_nftables(p, t.name))
        r = subprocess.run(["nft", "-c", "-f", str(f)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


# ---- the topology -------------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd):
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _run(*cmd, stdin=None):
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


def _mac(w, i):
    return format_mac(w.mac) if w.mac is not None else f"02:fd:00:00:{i >> 8:02x}:{i & 255:02x}"


class Topology:
    """A router namespace and one namespace per workload, each behind its own veth."""

    def __init__(self, tag, workloads):
        self.router = f"{PREFIX}{tag}r"
        self.ns = {}  # workload -> namespace name
        self.made = []
        self.fds = {}
        self.wls = workloads

    def build(self):
        _run("ip", "netns", "add", self.router)
        self.made.append(self.router)
        _run(
            "ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.default.accept_dad=0",
            # rejects are ICMP errors: no rate limit on them
            "net.ipv4.icmp_ratelimit=0", "net.ipv6.icmp.ratelimit=0", "net.ipv4.icmp_msgs_per_sec=100000",
        )  # fmt: skip
        rbatch = []
        for i, w in enumerate(self.wls):
            ns = f"{PREFIX}{self.router[len(PREFIX) : -1]}w{i}"
            _run("ip", "netns", "add", ns)
            self.made.append(ns)
            self.ns[w] = ns
            _run(
                "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647",
                "net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0",
            )  # fmt: skip
            rdev, rmac = f"v{i}", f"02:fe:00:00:{i >> 8:02x}:{i & 255:02x}"
            _run(
                "ip", "-n", self.router, "link", "add", rdev, "address", rmac, "type", "veth",
                "peer", "name", "eth0", "netns", ns, "address", _mac(w, i),
            )  # fmt: skip
            wb = ["link set lo up", "link set eth0 up"]
            rbatch += [f"link set {rdev} up", f"addr add {ROUTER_V4}/32 dev {rdev}"]
            rbatch.append(f"addr add {ROUTER_V6}/64 dev {rdev} nodad")
            wb += [
                f"neigh replace {ROUTER_V4} lladdr {rmac} dev eth0 nud permanent",
                f"route add {ROUTER_V4}/32 dev eth0",
                f"route add default via {ROUTER_V4} dev eth0",
                f"neigh replace {ROUTER_V6} lladdr {rmac} dev eth0 nud permanent",
                f"route add ::/0 via {ROUTER_V6} dev eth0",
            ]
            for a in w.addresses:
                plen = 32 if a.version == 4 else 128
                wb.insert(2, f"addr add {a}/{plen} dev eth0" + (" nodad" if a.version == 6 else ""))
                rbatch.append(f"route add {a}/{plen} dev {rdev}")
                rbatch.append(f"neigh replace {a} lladdr {_mac(w, i)} dev {rdev} nud permanent")
            _run("ip", "-n", ns, "-batch", "-", stdin="\n".join(wb) + "\n")
        _run("ip", "-n", self.router, "-batch", "-", stdin="\n".join(rbatch) + "\n")
        for ns in self.made:
            self.fds[ns] = os.open(f"/run/netns/{ns}", os.O_RDONLY)

    def load(self, text, path):
        path.write_text(text)
        _run("ip", "netns", "exec", self.router, "nft", "-f", str(path))

    def teardown(self):
        for fd in self.fds.values():
            os.close(fd)
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class Listeners:
    """TCP listeners (the kernel completes the handshake) and UDP echo sockets on every
    address and probed port of every workload."""

    def __init__(self, topo, tcp_ports, udp_ports):
        self.socks = []
        self.sel = selectors.DefaultSelector()
        self.stop = threading.Event()
        jobs = [(w, a) for w in topo.wls for a in w.addresses]

        def make(w, a):
            _setns(topo.fds[topo.ns[w]])
            fam = socket.AF_INET if a.version == 4 else socket.AF_INET6
            out = []
            for port in tcp_ports:
                s = socket.socket(fam, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((str(a), port))
                s.listen(128)
                out.append(s)
            for port in udp_ports:
                s = socket.socket(fam, socket.SOCK_DGRAM)
                s.bind((str(a), port))
                s.setblocking(False)
                out.append(s)
            return out

        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            for socks in ex.map(lambda j: make(*j), jobs):
                self.socks += socks
        for s in self.socks:
            if s.type == socket.SOCK_DGRAM:
                self.sel.register(s, selectors.EVENT_READ)
        self.thread = threading.Thread(target=self._echo, daemon=True)
        self.thread.start()

    def _echo(self):
        while not self.stop.is_set():
            for key, _ in self.sel.select(0.1):
                try:
                    data, peer = key.fileobj.recvfrom(2048)
                    key.fileobj.sendto(data, peer)
                except OSError:
                    pass

    def close(self):
        self.stop.set()
        self.thread.join()
        for s in self.socks:
            s.close()


def _probe(topo, src, dst, proto, port, family, timeout):
    """'allow', 'drop' or 'reject' as real sockets see it."""
    _setns(topo.fds[topo.ns[src]])
    sa = next(str(a) for a in src.addresses if a.version == family)
    da = next(str(a) for a in dst.addresses if a.version == family)
    fam = socket.AF_INET if family == 4 else socket.AF_INET6
    if proto == "tcp":
        s = socket.socket(fam, socket.SOCK_STREAM)
    elif proto == "udp":
        s = socket.socket(fam, socket.SOCK_DGRAM)
    else:
        s = socket.socket(
            fam, socket.SOCK_DGRAM, socket.IPPROTO_ICMP if family == 4 else socket.IPPROTO_ICMPV6
        )
        # ICMP errors about an echo request reach a ping socket only with RECVERR
        if family == 4:
            s.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        else:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    try:
        s.settimeout(timeout)
        s.bind((sa, 0))
        try:
            if proto == "tcp":
                s.connect((da, port))
                return "allow"
            s.connect((da, port if proto == "udp" else 0))
            if proto == "udp":
                s.send(b"probe")
            else:
                s.send(struct.pack("!BBHHH", 8 if family == 4 else 128, 0, 0, 0, 1) + b"probe")
            s.recv(2048)
            return "allow"
        except TimeoutError:
            return "drop"
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES):
                return "reject"
            raise
    finally:
        s.close()


def _ports(policy, tenant):
    """Ports worth probing: every port the tenant's rules name (range ends), resolved named
    ports, and one that no rule names."""
    tcp, udp = {7}, {7}
    for g in policy.security_groups:
        for r in g.rules:
            if g.tenant == tenant and r.protocol in (6, 17) and r.port_min is not None:
                (tcp if r.protocol == 6 else udp).update({r.port_min, r.port_max})
    rules = [r for p in policy.network_policies if p.tenant == tenant for r in p.ingress + p.egress]
    rules += [r for a in policy.admin_policies if a.tenant == tenant for r in a.ingress + a.egress]
    for r in rules:
        for port in r.ports or ():
            if port.name is None and port.lo is not None and port.protocol in (6, 17):
                (tcp if port.protocol == 6 else udp).update({port.lo, port.hi})
    for w in policy.workloads:
        for _n, proto, num in w.named_ports if w.tenant == tenant else ():
            if proto in (6, 17):
                (tcp if proto == 6 else udp).add(num)
    return sorted(tcp), sorted(udp)


def _outsiders(policy, tenant):
    """Addresses that are no workload's: one inside each prefix the tenant's rules name (so
    ipBlocks, their excepts and remote prefixes are probed from both sides) and one outside
    them all, as namespaces of their own."""
    nets = [r.remote_prefix for g in policy.security_groups if g.tenant == tenant for r in g.rules]
    for p in policy.network_policies:
        for r in p.ingress + p.egress if p.tenant == tenant else ():
            for peer in r.peers or ():
                nets += [peer.block, *peer.excepts]
    for a in policy.admin_policies:
        for r in a.ingress + a.egress if a.tenant == tenant else ():
            nets += [n for peer in r.peers for n in peer.networks]
    taken = {a for w in policy.workloads if w.tenant == tenant for a in w.addresses}
    picks = []
    for n in nets:
        if n is not None and n.prefixlen > 0 and n.network_address + 1 not in taken:
            picks.append(n.network_address + 1)
    picks = list(dict.fromkeys(picks))[:4] + [ipaddress.ip_address("203.0.113.9")]
    six = ipaddress.ip_address("2001:db8::9")
    out = [Workload(f"outside-{i}", tenant, None, None, (a,), namespace="-") for i, a in enumerate(picks)]
    return out[:-1] + [
        Workload(f"outside-{len(picks) - 1}", tenant, None, None, (picks[-1], six), namespace="-")
    ]


def _name(policy, w):
    return str(w.addresses[0]) if w.namespace == "-" else policy.qualified_name(w)


def _expected(policy, tenant, probes, wls):
    """microseg's verdict for each probe's first packet, as NEW."""
    vni = policy.tenant(tenant).vni
    cols = {k: [] for k in ("sh", "sl", "dh", "dl", "proto", "dport", "mac")}
    for src, dst, proto, port, family in probes:
        sh, sl = text_to_addr(str(next(a for a in src.addresses if a.version == family)))
        dh, dl = text_to_addr(str(next(a for a in dst.addresses if a.version == family)))
        number = {"tcp": 6, "udp": 17, "icmp": 1 if family == 4 else 58}[proto]
        mac = int(_mac(src, wls.index(src)).replace(":", ""), 16)
        for k, v in zip(cols, (sh, sl, dh, dl, number, port, mac)):
            cols[k].append(v)
    n = len(probes)
    keys = connection_keys(
        np.full(n, vni),
        *(np.array(cols[k], np.uint64) for k in ("sh", "sl", "dh", "dl")),
        np.array(cols["proto"]),
        np.full(n, 40000),
        np.array(cols["dport"]),
        eth_src=np.array(cols["mac"], np.uint64),
    )
    ct = np.full(n, ctstate.TRACKED | ctstate.NEW, np.uint8)
    v, _, _ = compile_policy(policy).decide(keys, ct)
    return [{V.ALLOW: "allow", V.DROP: "drop", V.REJECT: "reject"}[int(x)] for x in v]


@needs_live
@pytest.mark.parametrize(
    "scenario", SCENARIOS, ids=lambda s: "-".join([s[0].stem] + [x.split(":")[0] for x in s[2].splitlines()])
)
def test_kernel_verdicts_equal_microseg(scenario, tmp_path, request):
    path, tenant, extra = scenario
    policy = _policy(path, extra)
    tenant = tenant or policy.tenants[0].name
    wls = [w for w in policy.workloads if w.tenant == tenant] + _outsiders(policy, tenant)
    topo = Topology(str(SCENARIOS.index(scenario)), wls)
    request.addfinalizer(topo.teardown)
    topo.build()
    topo.load(export_nftables(policy, tenant), tmp_path / "ruleset.nft")
    tcp, udp = _ports(policy, tenant)
    listeners = Listeners(topo, tcp, udp)
    request.addfinalizer(listeners.close)
    probes = []
    for src in wls:
        for dst in wls:
            if src is dst:
                continue
            for family in (4, 6):
                if not any(a.version == family for a in src.addresses) or not any(
                    a.version == family for a in dst.addresses
                ):
                    continue
                probes += [(src, dst, "tcp", p, family) for p in tcp]
                probes += [(src, dst, "udp", p, family) for p in udp]
                probes.append((src, dst, "icmp", 0, family))
    want = _expected(policy, tenant, probes, wls)
    with concurrent.futures.ThreadPoolExecutor(64) as ex:
        got = list(ex.map(lambda pr: _probe(topo, *pr, DROP_TIMEOUT), probes))
        again = [i for i, (g, w) in enumerate(zip(got, want)) if g == "drop" and w != "drop"]
        for i, g in zip(again, ex.map(lambda i: _probe(topo, *probes[i], RECHECK_TIMEOUT), again)):
            got[i] = g
    bad = [
        f"{_name(policy, s)} -> {_name(policy, d)} {proto}/{port} IPv{fam}: kernel {g}, microseg {w}"
        for (s, d, proto, port, fam), g, w in zip(probes, got, want)
        if g != w
    ]
    assert not bad, f"{len(bad)} of {len(probes)} probes differ:\n" + "\n".join(bad[:40])
    assert {"allow", "drop" if policy.deny_action == "drop" else "reject"} <= set(got), set(got)
