"""``microseg lab demo``: the live counterpart of ``microseg demo``.

It brings a lab up with the built-in data centre (``microseg/data/datacenter.yaml``), starts
a small server in every workload a probe targets, runs real traffic between the workloads
from inside their namespaces -- TCP with payload, DNS-like queries over UDP, ping, TLS-like
flows (a ClientHello to 443), a port scan, frames with a spoofed source address or MAC, and
attempts across the two tenants that share addresses -- and compares what got through with
what the compiled policy decides for the same 5-tuple as NEW (``CompiledPolicy.decide`` on
``connection_keys``; a frame whose source MAC is not its port's workload's is dropped by the
agent's port binding before the policy is asked). Then it prints the agents' counters and
takes the lab down, always (also on an error or Ctrl-C).

A probe is one small Python script run with ``ip netns exec WORKLOAD-NS python -I -c``
(:data:`PROBE`, :data:`SERVE`, :data:`SNIFF`): no dependency beyond the standard library in
the workloads, raw frames through an ``AF_PACKET`` socket. Probes run in parallel on a thread
pool; a denied probe is given :data:`SILENCE` seconds, an expected one is retried until
:data:`ANSWER_DEADLINE`.

The probes between hosts of different sites (:data:`SITES`, the two sites of
``microseg/data/sites.yaml``) are listed apart in the report: their underlay leg is where the
IPsec ESP between sites goes; the report says how that leg travelled (``"underlay"``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import lab as L

SILENCE = 2.0  # how long a probe that should be stopped is given to (wrongly) get through
ANSWER_DEADLINE = 15.0  # an expected answer may take this long, retries included
WORKERS = 8

# the IDS probe (Suricata in the datapath, `lab up --ids-rules`): an attack only an ET-style
# HTTP rule catches -- a scanner's User-Agent header, a keyword (http.user_agent) the
# built-in signature matcher does not take
IDS_SID = 9200001
IDS_RULES = (
    'alert http any any -> any any (msg:"microseg demo: SQL injection scanner user agent"; '
    'flow:established,to_server; http.user_agent; content:"sqlmap"; nocase; '
    f"classtype:web-application-attack; sid:{IDS_SID}; rev:1;)\n"
)
IDS_REQUEST = (
    b"GET /products?id=1 HTTP/1.1\r\nHost: shop.internal\r\n"
    b"User-Agent: sqlmap/1.7.2#stable (https://sqlmap.org)\r\nAccept: */*\r\n\r\n"
)
IDS_DEADLINE = 30.0

# the built-in data centre's two sites (microseg/data/sites.yaml): traffic between them is
# what the IPsec gateway protects
SITES = {"compute-1": "A", "compute-2": "A", "compute-3": "B", "compute-4": "B"}


def underlay_between_sites(d: dict) -> str:
    """How the lab's agents carry traffic between the sites: ``esp`` when the lab gave them
    security associations (its state's ``ipsec``), else ``clear``."""
    return "esp" if d.get("ipsec") else "clear"


# ---------------------------------------------------------------------------------------------
# scripts run inside the workloads (standard library only)
# ---------------------------------------------------------------------------------------------
# servers on TCP and UDP ports; every reply is b"<tenant/name>\n" + the request
SERVE = textwrap.dedent("""\
    import json, socket, sys, threading
    ident, spec = sys.argv[1].encode() + b"\\n", json.loads(sys.argv[2])
    fams = [socket.AF_INET] + ([socket.AF_INET6] if spec.get("v6") else [])
    def conn(c):
        with c:
            try:
                for d in iter(lambda: c.recv(65536), b""):
                    c.sendall(ident + d)
            except OSError:
                pass
    def tcp(s):
        while True:
            c, _ = s.accept()
            threading.Thread(target=conn, args=(c,), daemon=True).start()
    def udp(s):
        while True:
            d, a = s.recvfrom(65536)
            try:
                s.sendto(ident + d, a)
            except OSError:
                pass
    for fam in fams:
        any_ = "::" if fam == socket.AF_INET6 else "0.0.0.0"
        for port in spec.get("tcp", []):
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((any_, port)); s.listen(64)
            threading.Thread(target=tcp, args=(s,), daemon=True).start()
        for port in spec.get("udp", []):
            s = socket.socket(fam, socket.SOCK_DGRAM)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((any_, port))
            threading.Thread(target=udp, args=(s,), daemon=True).start()
    print("READY", flush=True)
    threading.Event().wait()
""")

# one probe, described by a JSON object (argv[1]); prints one JSON line:
# {"result": "reply" | "timeout" | "refused" | "reset" | "unreachable" | "prohibited" |
#  "error" | "sent" | "scanned", ...}
PROBE = textwrap.dedent("""\
    import errno, json, os, select, socket, struct, sys, time
    spec = json.loads(sys.argv[1])
    kind, addr, timeout = spec["kind"], spec.get("addr", ""), float(spec.get("timeout", 2.0))
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    ERRS = {errno.ECONNREFUSED: "refused", errno.ECONNRESET: "reset",
            errno.EHOSTUNREACH: "unreachable", errno.ENETUNREACH: "unreachable",
            errno.EACCES: "prohibited", errno.EPERM: "prohibited"}
    def out(**kw):
        print(json.dumps(kw), flush=True); sys.exit(0)
    def oserr(e):
        out(result=ERRS.get(e.errno, "error"), errno=e.errno, error=str(e))
    def csum(b):
        if len(b) % 2:
            b += b"\\0"
        s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
        while s >> 16:
            s = (s >> 16) + (s & 0xFFFF)
        return ~s & 0xFFFF
    def answer(data, payload, peer):
        ident, _, rest = data.partition(b"\\n")
        out(result="reply", ident=ident.decode(errors="replace"), echo=rest == payload, peer=peer)
    if kind in ("tcp", "udp"):
        payload = bytes.fromhex(spec["payload"])
        s = socket.socket(fam, socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
        s.settimeout(timeout)
        try:
            s.connect((addr, spec["port"]))
            s.send(payload)
            data = s.recv(65536)
            if kind == "tcp":
                end = time.monotonic() + timeout
                while data.count(b"\\n") == 0 or len(data.partition(b"\\n")[2]) < len(payload):
                    s.settimeout(max(0.05, end - time.monotonic()))
                    more = s.recv(65536)
                    if not more:
                        break
                    data += more
            answer(data, payload, s.getpeername()[0])
        except socket.timeout:
            out(result="timeout")
        except OSError as e:
            oserr(e)
    elif kind == "ping":
        v6 = fam == socket.AF_INET6
        s = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
        ident = os.getpid() & 0xFFFF
        body = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, ident, 1) + b"microseg lab demo"
        if not v6:  # the kernel fills in ICMPv6 checksums
            body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
        s.sendto(body, (addr, 0))
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            s.settimeout(max(0.01, end - time.monotonic()))
            try:
                d, a = s.recvfrom(2048)
            except socket.timeout:
                break
            off = 0 if v6 else (d[0] & 15) * 4
            t, code = d[off], d[off + 1]
            if t == (129 if v6 else 0) and d[off + 4:off + 6] == struct.pack("!H", ident):
                out(result="reply", peer=a[0])
            if t == (1 if v6 else 3):
                out(result="unreachable", icmp_type=t, icmp_code=code, peer=a[0])
        out(result="timeout")
    elif kind == "scan":
        socks, res = {}, {}
        for port in spec["ports"]:
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setblocking(False)
            e = s.connect_ex((addr, port))
            if e not in (0, errno.EINPROGRESS):
                res[port] = ERRS.get(e, "error"); s.close()
            else:
                socks[s.fileno()] = (s, port)
        p = select.poll()
        for fd in socks:
            p.register(fd, select.POLLOUT)
        end = time.monotonic() + timeout
        while socks and time.monotonic() < end:
            for fd, _ in p.poll(max(1, int((end - time.monotonic()) * 1000))):
                s, port = socks.pop(fd)
                p.unregister(fd)
                e = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                res[port] = "open" if e == 0 else ERRS.get(e, "error")
                s.close()
        for s, port in socks.values():
            res[port] = "timeout"
        out(result="scanned", ports={str(k): v for k, v in sorted(res.items())})
    elif kind == "raw":
        # one Ethernet frame with whatever source MAC and address the spec says
        mac = lambda m: bytes.fromhex(m.replace(":", ""))
        v6 = fam == socket.AF_INET6
        src, dst = socket.inet_pton(fam, spec["src"]), socket.inet_pton(fam, addr)
        payload = bytes.fromhex(spec["payload"])
        proto, sport, dport = spec["proto"], spec.get("sport", 40000), spec["port"]
        if proto == 17:
            l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
            at = 6
        else:  # a TCP SYN carrying data
            l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 64240, 0, 0) + payload
            at = 16
        if v6:
            pseudo = src + dst + struct.pack("!IxxxB", len(l4), proto)
        else:
            pseudo = src + dst + struct.pack("!BBH", 0, proto, len(l4))
        c = csum(pseudo + l4) or (0xFFFF if proto == 17 else 0)
        l4 = l4[:at] + struct.pack("!H", c) + l4[at + 2:]
        if v6:
            ip = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, src, dst)
            etype = b"\\x86\\xdd"
        else:
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0x4000, 64, proto, 0, src, dst)
            ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
            etype = b"\\x08\\x00"
        frame = mac(spec["dst_mac"]) + mac(spec["src_mac"]) + etype + ip + l4
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        s.bind(("eth0", 0))
        for i in range(int(spec.get("count", 3))):
            s.send(frame)
            time.sleep(float(spec.get("gap", 0.3)))
        out(result="sent", bytes=len(frame))
    else:
        out(result="error", error="unknown probe kind " + kind)
""")

# "READY", then one JSON line: {"result": "seen" | "unseen"}
SNIFF = textwrap.dedent("""\
    # watches eth0 for a frame holding a token until it comes, stdin closes or the time is up
    import json, select, socket, sys, time
    token, timeout = bytes.fromhex(sys.argv[1]), float(sys.argv[2])
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    s.bind(("eth0", 0))
    print("READY", flush=True)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r, _, _ = select.select([s, sys.stdin], [], [], max(0.01, end - time.monotonic()))
        if s in r:
            f = s.recv(65536)
            if token in f:
                print(json.dumps({"result": "seen", "src_mac": f[6:12].hex(":")}), flush=True)
                sys.exit(0)
        elif sys.stdin in r and not sys.stdin.readline():
            break
    print(json.dumps({"result": "unseen"}), flush=True)
""")


def client_hello(server_name: str) -> bytes:
    """A TLS 1.2/1.3-looking ClientHello record with SNI (what a TLS detector reads; no
    handshake follows)."""
    sni = server_name.encode()
    ext_sni = b"\x00\x00" + (len(sni) + 5).to_bytes(2, "big") + (len(sni) + 3).to_bytes(2, "big")
    ext_sni += b"\x00" + len(sni).to_bytes(2, "big") + sni
    ext_versions = b"\x00\x2b\x00\x05\x04\x03\x04\x03\x03"
    ext = ext_sni + ext_versions
    suites = b"\x13\x01\x13\x02\xc0\x2b\xc0\x2f"
    body = b"\x03\x03" + bytes(range(32)) + b"\x00" + len(suites).to_bytes(2, "big") + suites
    body += b"\x01\x00" + len(ext).to_bytes(2, "big") + ext
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs


def dns_query(name: str, qtype: int = 1, qid: int = 0x4D53) -> bytes:
    """A DNS query (RD set) for ``name``."""
    q = b"".join(len(p).to_bytes(1, "big") + p.encode() for p in name.split(".")) + b"\x00"
    return (
        qid.to_bytes(2, "big")
        + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        + q
        + qtype.to_bytes(2, "big")
        + b"\x00\x01"
    )


# ---------------------------------------------------------------------------------------------
# the probes
# ---------------------------------------------------------------------------------------------
@dataclass
class Probe:
    """One attempt: ``src`` sends to ``dst`` (an address; ``dst_workload`` the tenant's workload
    that has it, None for none). For raw frames ``src_addr``/``src_mac`` are what the frame
    claims and ``watch`` the workload whose interface is watched for it."""

    name: str
    kind: str  # tcp | udp | dns | tls | ping | scan | spoof-ip | spoof-mac | cross-tenant | raw
    src: str
    dst: str
    proto: int
    port: int = 0
    ports: tuple = ()
    src_addr: str | None = None
    src_mac: str | None = None
    watch: str | None = None
    payload: bytes = b""
    dst_workload: str | None = None
    category: str = ""  # what the report groups it under (default: the kind)
    expected: dict = field(default_factory=dict)  # verdict, reason (per port for a scan)
    observed: dict = field(default_factory=dict)
    match: bool = False
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.category = self.category or self.kind

    @property
    def family(self) -> int:
        return ipaddress.ip_address(self.dst).version


def builtin_probes(d: dict) -> list[Probe]:
    """The demo's probes on the built-in data centre (``d``: the lab's state)."""
    W = d["workloads"]

    def a(q: str, v: int = 4) -> str:
        return next(x for x in W[q]["addresses"] if ipaddress.ip_address(x).version == v)

    P: list[Probe] = []

    def at(kind: str, s: str, t: str, v: int, port: int | None) -> str:
        addr = a(t, v)
        where = addr if port is None else (f"[{addr}]:{port}" if v == 6 else f"{addr}:{port}")
        return f"{kind} {s} -> {t} {where}"

    def tcp(s: str, t: str, port: int, msg: str, v: int = 4, cat: str = "") -> None:
        P.append(
            Probe(at("tcp", s, t, v, port), "tcp", s, a(t, v), 6, port, payload=msg.encode(), category=cat)
        )

    def tls(s: str, t: str, v: int = 4, cat: str = "") -> None:
        hello = client_hello(f"{W[t]['name']}.{W[t]['tenant']}.internal")
        P.append(Probe(at("tls", s, t, v, 443), "tls", s, a(t, v), 6, 443, payload=hello, category=cat))

    def dns(s: str, t: str, v: int = 4, cat: str = "") -> None:
        q = dns_query(f"{W[s]['name']}.{W[s]['tenant']}.internal", 28 if v == 6 else 1)
        P.append(Probe(at("dns", s, t, v, 53), "dns", s, a(t, v), 17, 53, payload=q, category=cat))

    def udp(s: str, t: str, port: int, v: int = 4) -> None:
        P.append(Probe(at("udp", s, t, v, port), "udp", s, a(t, v), 17, port, payload=b"datagram"))

    def ping(s: str, t: str, v: int = 4) -> None:
        P.append(Probe(at("ping", s, t, v, None), "ping", s, a(t, v), 1 if v == 4 else 58))

    # TCP with payload
    tcp("acme/lb-1", "acme/web-1", 80, "GET / HTTP/1.1\r\nHost: web-1\r\n\r\n")
    tcp("acme/app-1", "acme/db-1", 5432, "SELECT 1;")
    tcp("acme/bastion", "acme/db-2", 22, "SSH-2.0-OpenSSH_9.6\r\n")
    tcp("acme/web-1", "acme/db-1", 5432, "SELECT * FROM secrets;")  # web may not talk to db
    tcp("acme/lb-1", "acme/app-1", 443, "skip the web tier")  # nor lb to app
    tcp("globex/web-2", "globex/app-1", 9000, "globex api")
    tcp("globex/app-1", "globex/db-1", 3306, "mysql")
    tcp("shop/frontend-1", "shop/backend-1", 8080, "GET /cart")
    tcp("shop/backend-2", "shop/redis-1", 6379, "PING\r\n")
    tcp("shop/frontend-2", "shop/redis-1", 6379, "FLUSHALL\r\n")  # only the backend may
    # TLS-like
    tls("acme/lb-1", "acme/web-2")
    tls("acme/web-1", "acme/app-2")
    tls("acme/web-2", "acme/app-1")
    tls("acme/lb-1", "acme/web-3", 6)
    tls("acme/web-3", "acme/app-2", 6)
    tls("shop/frontend-2", "shop/frontend-1")
    tls("acme/db-2", "acme/web-2")  # a database calling out
    # DNS over UDP
    dns("acme/web-1", "acme/dns")
    dns("acme/app-2", "acme/dns")
    dns("acme/db-1", "acme/dns")
    dns("acme/web-2", "acme/dns", 6)
    dns("globex/web-1", "globex/dns")
    dns("shop/frontend-1", "shop/coredns")
    udp("acme/dns", "acme/web-1", 53)  # the DNS server may not send first
    udp("acme/lb-1", "acme/web-1", 9999)
    # ping
    ping("acme/bastion", "acme/web-2")
    ping("acme/lb-1", "acme/web-3")
    ping("globex/bastion", "globex/web-2")
    ping("acme/web-1", "acme/app-1")
    ping("acme/lb-1", "acme/web-1", 6)
    # a port scan from the bastion: only 22 and 80 are open to it
    scan: tuple[int, ...] = (21, 22, 23, 25, 53, 80, 110, 135, 139, 143, 443, 445, 993, 1433, 3306)
    scan += (3389, 5432, 5900, 6379, 8000, 8080, 8443, 9000, 9200, 11211, 27017)
    P.append(
        Probe(
            f"scan acme/bastion -> acme/web-1 {a('acme/web-1')}",
            "scan",
            "acme/bastion",
            a("acme/web-1"),
            6,
            ports=scan,
        )
    )
    # overlapping addresses: the answer comes from the sender's tenant
    tls("globex/bastion", "globex/web-1", cat="cross-tenant")
    tls("globex/bastion", "globex/web-1", 6, cat="cross-tenant")
    dns("globex/bastion", "globex/dns", cat="cross-tenant")
    # spoofed sources: raw frames (the first one uses the sender's own addresses: the check
    # that such a frame gets through when nothing is forged)
    P.append(_raw("raw", "acme/web-1", "acme/dns", 17, 53, W, W["acme/web-1"]["mac"], a("acme/web-1")))
    P.append(_raw("spoof-ip", "acme/web-1", "acme/dns", 17, 53, W, W["acme/web-1"]["mac"], a("acme/web-2")))
    P.append(_raw("raw", "acme/web-1", "acme/dns", 17, 53, W, W["acme/web-1"]["mac"], a("acme/web-1", 6)))
    P.append(
        _raw("spoof-ip", "acme/web-1", "acme/dns", 17, 53, W, W["acme/web-1"]["mac"], a("acme/web-2", 6))
    )
    P.append(
        _raw(
            "spoof-ip",
            "shop/frontend-1",
            "shop/redis-1",
            6,
            6379,
            W,
            W["shop/frontend-1"]["mac"],
            a("shop/backend-1"),
        )
    )
    P.append(_raw("spoof-mac", "acme/web-1", "acme/dns", 17, 53, W, W["acme/web-2"]["mac"], a("acme/web-2")))
    P.append(_raw("spoof-mac", "acme/web-1", "acme/dns", 17, 53, W, "02:de:ad:be:ef:01", a("acme/web-1")))
    # across tenants: acme's db-1 address does not exist in globex; a frame sent straight
    # to acme/db-1's MAC stays in globex
    tcp("globex/app-1", "acme/db-1", 5432, "SELECT 1;", cat="cross-tenant")
    P.append(
        _raw(
            "cross-tenant",
            "globex/app-1",
            "acme/db-1",
            17,
            5432,
            W,
            W["globex/app-1"]["mac"],
            a("globex/app-1"),
        )
    )
    return P


def _raw(kind: str, s: str, t: str, proto: int, port: int, W: dict, mac: str, src_addr: str) -> Probe:
    v = ipaddress.ip_address(src_addr).version
    dst = next(x for x in W[t]["addresses"] if ipaddress.ip_address(x).version == v)
    if v == 6:
        dst = f"[{dst}]"
    what = {"raw": "own addresses", "spoof-ip": f"as {src_addr}", "spoof-mac": f"as {mac}"}.get(kind, "")
    return Probe(
        f"{kind} {s} -> {t} {dst}:{port}" + (f" ({what})" if what else ""),
        kind,
        s,
        dst.strip("[]"),
        proto,
        port,
        src_addr=src_addr,
        src_mac=mac,
        watch=t,
    )


# ---------------------------------------------------------------------------------------------
# expectation: the compiled policy's decision for the same 5-tuple as NEW
# ---------------------------------------------------------------------------------------------
def expectations(policy_path: str, d: dict, probes: list[Probe]) -> None:
    """Fill each probe's ``expected`` (and ``dst_workload``) from the compiled policy."""
    import numpy as np

    from .. import ctstate
    from ..packet.batch import text_to_addr
    from ..policy import verdict as V
    from ..policy.compiler import compile_policy, connection_keys
    from ..policy.model import load_policy

    policy = load_policy(policy_path)
    compiled = compile_policy(policy)
    W = d["workloads"]
    rows: list[tuple[Probe, int]] = []  # (probe, dport)
    for p in probes:
        t = W[p.src]["tenant"]
        p.dst_workload = next((q for q, w in W.items() if w["tenant"] == t and p.dst in w["addresses"]), None)
        for port in p.ports or (p.port,):
            rows.append((p, port))
    cols: dict[str, list[int]] = {k: [] for k in ("vni", "sh", "sl", "dh", "dl", "proto", "dport", "mac")}
    for p, port in rows:
        w = W[p.src]
        src = p.src_addr or next(x for x in w["addresses"] if ipaddress.ip_address(x).version == p.family)
        sh, sl = text_to_addr(src)
        dh, dl = text_to_addr(p.dst)
        mac = int((p.src_mac or w["mac"]).replace(":", ""), 16)
        for k, v in zip(cols, (w["vni"], sh, sl, dh, dl, p.proto, port, mac)):
            cols[k].append(v)
    n = len(rows)
    u64 = {k: np.array(cols[k], np.uint64) for k in ("sh", "sl", "dh", "dl", "mac")}
    keys = connection_keys(
        np.array(cols["vni"]),
        u64["sh"],
        u64["sl"],
        u64["dh"],
        u64["dl"],
        np.array(cols["proto"]),
        np.full(n, 40000),
        np.array(cols["dport"]),
        eth_src=u64["mac"],
    )
    verdict, _rule, reason = compiled.decide(keys, np.full(n, ctstate.TRACKED | ctstate.NEW, np.uint8))
    for i, (p, port) in enumerate(rows):
        e: dict[str, Any] = {
            "verdict": V.VERDICTS[int(verdict[i])],
            "reason": V.REASONS.get(int(reason[i]), str(reason[i])),
        }
        if p.src_mac is not None and p.src_mac != W[p.src]["mac"]:
            # the agent binds each port to its workload's MAC (port security) before the
            # policy sees the frame
            e = {"verdict": "drop", "reason": "port_mac", "policy": e}
        if p.ports:
            p.expected.setdefault("ports", {})[str(port)] = e
        else:
            p.expected = e
    for p in probes:
        if p.ports:
            v = Counter(e["verdict"] for e in p.expected["ports"].values())
            p.expected["verdicts"] = dict(sorted(v.items()))


# ---------------------------------------------------------------------------------------------
# running probes
# ---------------------------------------------------------------------------------------------
def _netns_py(ns: str, code: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", ns, sys.executable, "-I", "-c", code, *args]


def probe_script(ns: str, spec: dict, timeout: float) -> dict:
    """Run :data:`PROBE` in namespace ``ns``; its JSON answer."""
    try:
        r = subprocess.run(
            _netns_py(ns, PROBE, json.dumps(spec)), capture_output=True, text=True, timeout=timeout + 30
        )
    except subprocess.TimeoutExpired:
        return {"result": "error", "error": "the probe did not finish"}
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"result": "error", "error": (r.stderr or r.stdout).strip()[-300:]}


def forged_frame(
    d: dict,
    sender: str,
    watch: str,
    *,
    src_mac: str,
    src: str,
    port: int,
    proto: int = 17,
    wait: float = SILENCE,
    count: int = 3,
    track: list | None = None,
    family: int = 4,
) -> dict:
    """Send ``count`` raw frames from workload ``sender`` to workload ``watch`` (its MAC and
    address of ``family``) claiming source MAC ``src_mac`` and address ``src``, while ``watch``'s
    interface is watched for them; after the last one is sent, wait up to ``wait`` seconds for
    one to show up. ``{"verdict": "allow" | "drop" | "error", "result": "seen" | "unseen", ...}``
    (``track``: a list the watcher's process is added to, for whoever stops stragglers)."""
    w = d["workloads"][watch]
    token = os.urandom(8).hex()
    sniff = subprocess.Popen(
        _netns_py(w["ns"], SNIFF, token.encode().hex(), str(wait + 120.0)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if track is not None:
        track.append(sniff)
    try:
        assert sniff.stdout is not None and sniff.stdin is not None
        line = sniff.stdout.readline().strip()
        if line != "READY":
            return {
                "verdict": "error",
                "result": "error",
                "error": f"the watcher in {watch} did not start: {line}",
            }
        spec = {
            "kind": "raw",
            "addr": next(a for a in w["addresses"] if ipaddress.ip_address(a).version == family),
            "port": port,
            "proto": proto,
            "src": src,
            "src_mac": src_mac,
            "dst_mac": w["mac"],
            "payload": ("microseg-" + token).encode().hex(),
            "count": count,
            "gap": 0.3,
        }
        sent = probe_script(d["workloads"][sender]["ns"], spec, 10.0)
        end = time.monotonic() + wait
        while sniff.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        try:
            out, _ = sniff.communicate(timeout=30)  # closes its stdin: it stops watching
            seen = json.loads(out.strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, ValueError, IndexError):
            seen = {"result": "error"}
    finally:
        if sniff.poll() is None:
            sniff.kill()
            sniff.wait(timeout=10)
    ok = sent.get("result") == "sent"
    return {
        "verdict": _VERDICT_OF.get(seen.get("result", ""), "error") if ok else "error",
        "sent": sent,
        "at": watch,
        **seen,
    }


_VERDICT_OF = {
    "reply": "allow",
    "open": "allow",
    "seen": "allow",
    "timeout": "drop",
    "unseen": "drop",
    "refused": "reject",
    "reset": "reject",
    "unreachable": "reject",
    "prohibited": "reject",
}


class Runner:
    """Runs probes in a lab (its state ``d``); keeps the servers it started."""

    def __init__(self, d: dict):
        self.d = d
        self.servers: list[subprocess.Popen] = []
        self.lock = threading.Lock()

    def ns(self, q: str) -> str:
        return str(self.d["workloads"][q]["ns"])

    def start_servers(self, probes: list[Probe]) -> None:
        want: dict[str, dict[str, set]] = {}
        for p in probes:
            if p.dst_workload is None or p.kind in ("ping",) or p.watch:
                continue
            s = want.setdefault(p.dst_workload, {"tcp": set(), "udp": set()})
            s["tcp" if p.proto == 6 else "udp"].update(p.ports or (p.port,))
        with ThreadPoolExecutor(WORKERS) as ex:
            list(
                ex.map(
                    lambda item: self.serve(item[0], sorted(item[1]["tcp"]), sorted(item[1]["udp"])),
                    want.items(),
                )
            )

    def serve(self, q: str, tcp: list[int], udp: list[int]) -> None:
        v6 = any(":" in x for x in self.d["workloads"][q]["addresses"])
        spec = json.dumps({"tcp": tcp, "udp": udp, "v6": v6})
        p = subprocess.Popen(
            _netns_py(self.ns(q), SERVE, q, spec), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        with self.lock:
            self.servers.append(p)
        assert p.stdout is not None
        line = p.stdout.readline()
        if line.strip() != "READY":
            raise L.LabError(f"the server in {q} did not start: {line.strip()} {p.stdout.read()[-300:]}")

    def stop_servers(self) -> None:
        for p in self.servers:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        self.servers.clear()

    def run(self, p: Probe) -> Probe:
        t0 = time.monotonic()
        try:
            if p.watch:
                self._run_raw(p)
            else:
                self._run_socket(p)
        except Exception as exc:  # a probe that breaks is a mismatch, not a crash of the demo
            p.observed = {"verdict": "error", "result": "error", "error": f"{type(exc).__name__}: {exc}"}
        p.seconds = round(time.monotonic() - t0, 3)
        self._judge(p)
        return p

    def _run_socket(self, p: Probe) -> None:
        spec: dict[str, Any] = {"kind": p.kind, "addr": p.dst, "port": p.port, "payload": p.payload.hex()}
        if p.kind in ("dns", "udp"):
            spec["kind"] = "udp"
        elif p.kind == "tls":
            spec["kind"] = "tcp"
        if p.ports:
            spec["ports"] = list(p.ports)
        allow = (p.expected.get("verdict") == "allow") or any(
            e["verdict"] == "allow" for e in p.expected.get("ports", {}).values()
        )
        end = time.monotonic() + ANSWER_DEADLINE
        attempts = 0
        while True:
            attempts += 1
            left = end - time.monotonic()
            spec["timeout"] = SILENCE if not allow else max(0.5, min(SILENCE, left))
            r = probe_script(self.ns(p.src), spec, spec["timeout"])
            if p.ports:
                got = {k: _VERDICT_OF.get(v, v) for k, v in r.get("ports", {}).items()}
                done = all(
                    got.get(k) == "allow" for k, e in p.expected["ports"].items() if e["verdict"] == "allow"
                )
            else:
                done = r.get("result") == "reply"
            # an answer that should come is retried (a loaded machine, a first ARP); one that
            # should not is tried once
            if done or not allow or time.monotonic() + 0.5 > end:
                break
            time.sleep(0.2)
        r["attempts"] = attempts
        if p.ports:
            r["ports"] = {k: _VERDICT_OF.get(v, v) for k, v in r.get("ports", {}).items()}
        p.observed = {"verdict": _VERDICT_OF.get(r.get("result", ""), "error"), **r}

    def _run_raw(self, p: Probe) -> None:
        assert p.watch is not None and p.src_addr is not None and p.src_mac is not None
        wait = ANSWER_DEADLINE if p.expected.get("verdict") == "allow" else SILENCE
        p.observed = forged_frame(
            self.d,
            p.src,
            p.watch,
            src_mac=p.src_mac,
            src=p.src_addr,
            port=p.port,
            proto=p.proto,
            wait=wait,
            track=self.servers,
            family=p.family,
        )

    def _judge(self, p: Probe) -> None:
        o, e = p.observed, p.expected
        if p.ports:
            mism = {
                k: {"expected": x["verdict"], "observed": o.get("ports", {}).get(k)}
                for k, x in e["ports"].items()
            }
            mism = {k: v for k, v in mism.items() if v["expected"] != v["observed"]}
            o["mismatched_ports"] = mism
            o["verdicts"] = dict(sorted(Counter(o.get("ports", {}).values()).items()))
            p.match = not mism and o.get("result") == "scanned"
            return
        p.match = o.get("verdict") == e.get("verdict")
        if p.match and o["verdict"] == "allow" and "ident" in o:
            # the answer must come from the workload the sender's tenant has at that address
            p.match = o["ident"] == p.dst_workload and bool(o.get("echo"))


# ---------------------------------------------------------------------------------------------
# the demo
# ---------------------------------------------------------------------------------------------
def _path(d: dict, p: Probe) -> dict:
    a = d["workloads"][p.src]["host"]
    target = p.watch or p.dst_workload
    b = d["workloads"][target]["host"] if target else None
    if b is None:
        kind = "no-target"
    elif a == b:
        kind = "same-host"
    elif SITES.get(a) and SITES.get(a) == SITES.get(b):
        kind = "same-site"
    else:
        kind = "cross-site"
    out = {"from_host": a, "to_host": b, "kind": kind}
    if kind == "cross-site":
        out["underlay"] = underlay_between_sites(d)
    return out


def _host_stats(state_dir: str, d: dict) -> dict:
    from . import control

    out: dict[str, Any] = {}
    for name, h in L.stats(state_dir)["hosts"].items():
        a = h["agent"]
        if not a.get("running"):
            out[name] = {"running": False, "error": a.get("error")}
            continue
        out[name] = {
            "running": True,
            "packets": a["packets"],
            "bytes": a["bytes"],
            "cpu_seconds": a["cpu_seconds"],
            "verdicts": h["verdicts"],
            "drops": dict(sorted(h["drops"].items())),
            "conntrack_entries": h["conntrack"]["entries"],
            "fastpath": {
                k: h["fastpath"][k]
                for k in ("kind", "flows", "packets", "bytes", "offloaded", "reason")
                if k in h["fastpath"]
            },
        }
        try:  # the agent's own stats: IPsec between the sites, where it runs it
            ipsec = control.request(d["hosts"][name]["control"], "stats", timeout=10.0).get("ipsec")
        except control.ControlError:
            ipsec = None
        if ipsec:
            out[name]["ipsec"] = {
                k: ipsec[k] for k in ("esp_sent", "esp_received", "dropped_out", "drops") if k in ipsec
            }
    return out


def run_demo(
    state_dir: str = L.DEFAULT_STATE_DIR,
    prefix: str = L.DEFAULT_PREFIX,
    tunnel: str = "vxlan",
    timeout: float = 180.0,
    log_level: str = "info",
    echo: Callable[[str], None] = print,
) -> dict:
    """Up, probe, stats, down (always); the report."""
    t0 = time.monotonic()
    echo(f"lab demo: bringing the built-in data centre up (prefix {prefix}, {tunnel})")
    # no policy file: the built-in data centre, with whatever `lab up` gives it by default;
    # Suricata in the datapath where it is installed
    rules_dir = None
    ids_rules = None
    if shutil.which("suricata"):
        rules_dir = tempfile.mkdtemp(prefix="microseg-demo-ids-")
        ids_rules = os.path.join(rules_dir, "demo.rules")
        with open(ids_rules, "w") as f:
            f.write(IDS_RULES)
    try:
        d = L.up(None, state_dir, prefix, tunnel, log_level, timeout, echo=echo, ids_rules=ids_rules)
    except BaseException:
        if rules_dir:
            shutil.rmtree(rules_dir, ignore_errors=True)
        raise
    report: dict[str, Any] = {}
    runner = Runner(d)
    try:
        t_up = time.monotonic() - t0
        probes = builtin_probes(d)
        expectations(d["policy"], d, probes)
        runner.start_servers(probes)
        echo(f"lab demo: up in {t_up:.1f} s; {len(probes)} probes")
        t1 = time.monotonic()
        ex = ThreadPoolExecutor(WORKERS)
        try:
            done = list(ex.map(runner.run, probes))
        finally:  # on Ctrl-C: no probe starts any more, the running ones end within seconds
            ex.shutdown(wait=True, cancel_futures=True)
        t_probes = time.monotonic() - t1
        ids = ids_probe(d, done) if ids_rules else {"skipped": "suricata is not installed"}
        stats = _host_stats(state_dir, d)
        report = _report(d, done, stats, t_up, t_probes)
        report["ids"] = ids
    finally:
        runner.stop_servers()
        L.down(state_dir, echo=lambda *_: None)
        if rules_dir:
            shutil.rmtree(rules_dir, ignore_errors=True)
        echo("lab demo: lab down")
    report["seconds"]["total"] = round(time.monotonic() - t0, 2)
    return report


def _ids_alerts(d: dict, host: str) -> list[dict]:
    try:
        with open(d["hosts"][host]["flow_log"]) as f:
            recs = [json.loads(x) for x in f if '"ids"' in x]
    except (OSError, ValueError):
        return []
    return [r for r in recs if r.get("event") == "ids" and r.get("sid") == IDS_SID]


def ids_probe(d: dict, done: list[Probe]) -> dict:
    """An HTTP request with a scanner's User-Agent along a TCP probe that got through: caught
    (alerted) by Suricata in the agents' datapath, which the agents' flow logs show."""
    from . import control

    cand = [
        p
        for p in done
        if p.kind == "tcp" and p.match and p.expected.get("verdict") == "allow" and p.family == 4
    ]
    if not cand:
        return {"skipped": "no allowed TCP probe to carry the request"}
    p = cand[0]
    src_host = d["workloads"][p.src]["host"]
    try:
        engine = control.request(d["hosts"][src_host]["control"], "status", timeout=10.0)["ids"]["engine"]
    except (control.ControlError, KeyError):
        engine = "?"
    if not engine.startswith("suricata"):
        return {"skipped": f"the agents run {engine}, not Suricata"}
    name = f"http {p.src} -> {p.dst}:{p.port} User-Agent: sqlmap (an ET-style http.user_agent rule)"
    spec = {"kind": "tcp", "addr": p.dst, "port": p.port, "payload": IDS_REQUEST.hex(), "timeout": 3.0}
    got = probe_script(d["workloads"][p.src]["ns"], spec, 5.0)
    end = time.monotonic() + IDS_DEADLINE
    alerts: list[dict] = []
    while time.monotonic() < end and not alerts:
        alerts = _ids_alerts(d, src_host)
        if not alerts:
            time.sleep(0.3)
    return {
        "probe": name,
        "engine": engine,
        "sid": IDS_SID,
        "result": got.get("result"),
        "caught": bool(alerts),
        "by": f"{engine} on {src_host}" if alerts else None,
        "msg": alerts[0].get("msg") if alerts else None,
    }


def _report(d: dict, probes: list[Probe], stats: dict, t_up: float, t_probes: float) -> dict:
    rows = []
    for p in probes:
        row: dict[str, Any] = {
            "name": p.name,
            "kind": p.kind,
            "category": p.category,
            "src": p.src,
            "dst": p.dst,
            "dst_workload": p.dst_workload,
            "family": p.family,
            "proto": {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp"}.get(p.proto, str(p.proto)),
            "path": _path(d, p),
            "expected": p.expected,
            "observed": p.observed,
            "match": p.match,
            "seconds": p.seconds,
        }
        if p.ports:
            row["ports"] = list(p.ports)
        else:
            row["port"] = p.port
        if p.src_addr is not None:
            row["claimed_src"] = p.src_addr
            row["claimed_mac"] = p.src_mac
        rows.append(row)
    kinds: dict[str, dict[str, int]] = {}
    for r in rows:
        k = kinds.setdefault(r["category"], {"probes": 0, "matched": 0})
        k["probes"] += 1
        k["matched"] += int(r["match"])
    cross = [r["name"] for r in rows if r["path"]["kind"] == "cross-site"]
    matched = sum(r["match"] for r in rows)
    return {
        "lab": {
            "prefix": d["prefix"],
            "tunnel": d["tunnel"],
            "hosts": len(d["hosts"]),
            "workloads": len(d["workloads"]),
            "policy": "built-in data centre",
        },
        "summary": {
            "probes": len(rows),
            "matched": matched,
            "mismatched": len(rows) - matched,
            "expected_allowed": sum(r["expected"].get("verdict") == "allow" for r in rows),
            "expected_denied": sum(r["expected"].get("verdict") in ("drop", "reject") for r in rows),
            "by_category": kinds,
        },
        "probes": rows,
        "cross_site": {
            "sites": {s: sorted(h for h, x in SITES.items() if x == s) for s in sorted(set(SITES.values()))},
            "probes": cross,
            "underlay": underlay_between_sites(d),
            "ipsec": d.get("ipsec"),  # the SA file the agents run with (None: none)
            "esp_sent": sum(h.get("ipsec", {}).get("esp_sent", 0) for h in stats.values()),
            "esp_received": sum(h.get("ipsec", {}).get("esp_received", 0) for h in stats.values()),
            "note": (
                "the agents carry their underlay leg in IPsec ESP"
                if d.get("ipsec")
                else "no IPsec between the sites in this lab: their underlay leg travels in the clear"
            ),
        },
        "hosts": stats,
        "offload": _offload_share(stats),
        "seconds": {"up": round(t_up, 2), "probes": round(t_probes, 2)},
    }


def _offload_share(stats: dict) -> dict:
    """How much of the traffic the kernel fast path carried without the agents."""
    up = [h for h in stats.values() if h.get("running")]
    kernel_p = sum(h["fastpath"].get("packets", 0) for h in up)
    kernel_b = sum(h["fastpath"].get("bytes", 0) for h in up)
    agent_p = sum(h["packets"] for h in up)
    agent_b = sum(h["bytes"] for h in up)
    kinds = sorted({h["fastpath"].get("kind", "none") for h in up})
    return {
        "kinds": kinds,
        "offloaded_connections": sum(h["fastpath"].get("offloaded", 0) for h in up),
        "kernel_packets": kernel_p,
        "agent_packets": agent_p,
        "packet_share": round(kernel_p / (kernel_p + agent_p), 4) if kernel_p + agent_p else 0.0,
        "byte_share": round(kernel_b / (kernel_b + agent_b), 4) if kernel_b + agent_b else 0.0,
    }


def _fmt_observed(r: dict) -> str:
    o = r["observed"]
    if r["kind"] == "scan":
        return ", ".join(f"{k} {v}" for k, v in o.get("verdicts", {}).items()) or o.get("verdict", "?")
    text = o.get("verdict", "?")
    if o.get("ident"):
        text += f" by {o['ident']}"
    elif o.get("result") not in (None, "reply", "timeout", "seen", "unseen"):
        text += f" ({o.get('result')})"
    return text


def _fmt_expected(r: dict) -> str:
    e = r["expected"]
    if r["kind"] == "scan":
        return ", ".join(f"{k} {v}" for k, v in e["verdicts"].items())
    text = f"{e['verdict']} ({e['reason']})"
    if e["verdict"] == "allow" and r["dst_workload"]:
        text = f"allow by {r['dst_workload']}"
    return text


def print_report(report: dict, out: Callable[[str], None] = print) -> None:
    s, lab = report["summary"], report["lab"]
    out(
        f"microseg lab demo: {lab['policy']}, {lab['hosts']} hosts, {lab['workloads']} workloads, "
        f"{lab['tunnel']} (prefix {lab['prefix']})"
    )
    out(
        f"probes: {s['probes']} in {report['seconds']['probes']:.1f} s: {s['matched']} as the policy "
        f"expects, {s['mismatched']} not ({s['expected_allowed']} expected through, "
        f"{s['expected_denied']} expected stopped)"
    )
    out("")
    out(f"  {'':2} {'probe':<72} {'path':<10} {'expected':<32} observed")
    for r in report["probes"]:
        mark = "ok" if r["match"] else "!!"
        path = r["path"]["kind"]
        out(f"  {mark:2} {r['name'][:72]:<72} {path:<10} {_fmt_expected(r)[:32]:<32} {_fmt_observed(r)}")
        if r["kind"] == "scan" and r["observed"].get("mismatched_ports"):
            out(f"       ports not as expected: {r['observed']['mismatched_ports']}")
    out("")
    out(
        "by category: "
        + ", ".join(f"{k} {v['matched']}/{v['probes']}" for k, v in report["summary"]["by_category"].items())
    )
    cs = report["cross_site"]
    sites = "; ".join(f"site {k}: {', '.join(v)}" for k, v in cs["sites"].items())
    out(f"cross-site probes ({sites}): {len(cs['probes'])}, underlay {cs['underlay']} ({cs['note']})")
    if cs["underlay"] == "esp":
        out(f"  ESP packets: {cs['esp_sent']} sent, {cs['esp_received']} received by the agents")
    out("")
    out("agents:")
    for name, h in report["hosts"].items():
        if not h.get("running"):
            out(f"  {name}: agent not running ({h.get('error')})")
            continue
        drops = ", ".join(f"{k} {v}" for k, v in h["drops"].items()) or "-"
        out(
            f"  {name}: {h['packets']} packets judged ({h['bytes']} bytes), "
            f"conntrack {h['conntrack_entries']} entries; drops: {drops}"
        )
        if h.get("ipsec"):
            x = h["ipsec"]
            out(
                f"    ESP: {x.get('esp_sent', 0)} sent, {x.get('esp_received', 0)} received, "
                f"{x.get('dropped_out', 0)} not sent; drops: "
                + (", ".join(f"{k} {v}" for k, v in sorted(x.get("drops", {}).items())) or "-")
            )
    o = report.get("offload")
    if o:
        out(
            f"offload ({', '.join(o['kinds'])}): {o['offloaded_connections']} connections offloaded; "
            f"the kernel carried {o['kernel_packets']} packets ({o['packet_share']:.1%} of packets, "
            f"{o['byte_share']:.1%} of bytes), the agents judged {o['agent_packets']} (probes are "
            "short: a connection is offloaded after its first packets, so elephants gain most)"
        )
    ids = report.get("ids")
    if ids:
        if ids.get("skipped"):
            out(f"IDS probe: skipped ({ids['skipped']})")
        else:
            out(
                f"IDS probe: {ids['probe']}: "
                + (
                    f"caught by {ids['by']}: sid {ids['sid']} {ids['msg']!r}"
                    if ids["caught"]
                    else "NOT caught"
                )
            )
    t = report["seconds"]
    out(f"lab up {t['up']:.1f} s, probes {t['probes']:.1f} s, total {t.get('total', 0):.1f} s")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(
    state_dir: str = L.DEFAULT_STATE_DIR,
    prefix: str = L.DEFAULT_PREFIX,
    tunnel: str = "vxlan",
    timeout: float = 180.0,
    as_json: bool = False,
    log_level: str = "info",
) -> int:
    """``microseg lab demo``: 0 when every probe went as the policy expects, 1 otherwise."""
    L._need_root()
    # a SIGTERM stops the demo as Ctrl-C does: the lab still comes down
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        progress = (lambda m: print(m, file=sys.stderr, flush=True)) if as_json else print
        report = run_demo(state_dir, prefix, tunnel, timeout, log_level, echo=progress)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if as_json:
        print(json.dumps(report, indent=1, sort_keys=True))
    else:
        print_report(report)
    ids_missed = bool(report.get("ids")) and not report["ids"].get("skipped") and not report["ids"]["caught"]
    return 0 if report["summary"]["mismatched"] == 0 and not ids_missed else 1


__all__ = ["PROBE", "SERVE", "SNIFF", "Probe", "builtin_probes", "expectations", "main", "run_demo"]
