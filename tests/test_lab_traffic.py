"""Live traffic through the lab: UDP, IPv6, reject answers, ICMP errors as RELATED, spoofed
sources and MACs, and `microseg lab demo` itself.

The built-in data centre (four hosts, three tenants, two of them sharing addresses, IPv4 and
IPv6 workloads, ``deny_action: drop``) runs in one lab for the first class; a small policy
with ``deny_action: reject`` (``tests/vectors/lab/reject.yaml``) in another for the second.
Every probe is a real socket (or, for forged frames, an ``AF_PACKET`` socket) inside a
workload's namespace, run by the demo's own probe script. Waits are conditions with deadlines;
the only ones that run to their end prove that something does *not* arrive.

Needs root and ``ip netns``; skipped otherwise. Each lab is taken down by its fixture's
finalizer, also on failure, and at interpreter exit should the run be interrupted.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from livelab import LiveLab, netns_skip_reason, sigterm_interrupts, wait_for

# per process: under pytest-xdist each worker that gets a class's tests builds its own lab
PREFIX = f"mstf{os.getpid() % 100000}"
PREFIX_REJECT = f"mstj{os.getpid() % 100000}"
PREFIX_DEMO = f"mstd{os.getpid() % 100000}"
REJECT_POLICY = Path(__file__).parent / "vectors" / "lab" / "reject.yaml"

UP_TIMEOUT = 150  # agents import and load their kernels; generous on a loaded machine
ANSWER_DEADLINE = 30  # an allowed path must answer within this (retries included)
SILENCE = 3.0  # how long a denied probe is given to (wrongly) get through

_REASON = netns_skip_reason(PREFIX)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def _netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


class TrafficLab(LiveLab):
    """A lab plus the demo's probe, server and watcher scripts."""

    def __init__(self, root, log_names=()):
        super().__init__(root)
        self.log_names = tuple(log_names)

    def serve(self, workload: str, tcp=(), udp=()) -> None:
        from microseg.agent.labdemo import SERVE

        v6 = any(":" in a for a in self.state["workloads"][workload]["addresses"])
        spec = json.dumps({"tcp": list(tcp), "udp": list(udp), "v6": v6})
        p = subprocess.Popen(
            self._in(workload, SERVE, workload, spec),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.servers.append(p)
        line = p.stdout.readline()
        assert line.strip() == "READY", f"server in {workload} did not start: {line!r}"

    def probe(self, workload: str, timeout: float = SILENCE, **spec) -> dict:
        from microseg.agent.labdemo import probe_script

        spec.setdefault("timeout", timeout)
        if "payload" in spec and isinstance(spec["payload"], bytes):
            spec["payload"] = spec["payload"].hex()
        return probe_script(self.ns(workload), spec, float(spec["timeout"]))

    def reply(self, workload: str, kind: str, addr: str, port: int, msg: bytes = b"hello") -> dict:
        """The first reply of a probe that must get one, retrying until the deadline."""
        end = time.monotonic() + ANSWER_DEADLINE
        last = None
        while time.monotonic() < end:
            last = self.probe(
                workload,
                min(3.0, max(0.5, end - time.monotonic())),
                kind=kind,
                addr=addr,
                port=port,
                payload=msg,
            )
            if last.get("result") == "reply":
                return last
            time.sleep(0.1)
        raise AssertionError(
            f"{workload} -> {addr}:{port}/{kind}: no reply within {ANSWER_DEADLINE} s (last: {last})"
        )

    def host_stats(self, host: str) -> dict:
        """The agent's own stats (lab stats plus the datapath's conntrack states)."""
        from microseg.agent import control

        return control.request(self.state["hosts"][host]["control"], "stats", timeout=10.0)

    def counter(self, host: str, *path: str) -> int:
        v = self.host_stats(host)
        for k in path:
            v = v.get(k, {}) if isinstance(v, dict) else {}
        return int(v) if isinstance(v, int) else 0

    def frame(
        self, workload: str, watch: str, *, src_mac: str, src: str, port: int, expect_seen: bool, family=4
    ):
        """Send forged frames from ``workload`` towards ``watch`` (its MAC and IPv4 address)
        while ``watch``'s interface is watched: "seen" or "unseen". Frames that should arrive
        are waited for until the deadline, ones that should not for SILENCE seconds."""
        from microseg.agent.labdemo import forged_frame

        r = forged_frame(
            self.state,
            workload,
            watch,
            src_mac=src_mac,
            src=src,
            port=port,
            wait=ANSWER_DEADLINE if expect_seen else SILENCE,
            track=self.servers,
            family=family,
        )
        assert r["sent"].get("result") == "sent", r
        return r["result"]


def _lab_fixture(request, tmp_path_factory, policy, prefix, name, log_names):
    from microseg.agent import lab as L

    lab = TrafficLab(tmp_path_factory.mktemp(name), log_names)
    request.addfinalizer(lab.teardown)
    atexit.register(lab.teardown)  # also when the run is interrupted
    sigterm_interrupts(request)  # a CI job\'s SIGTERM: finalizers still run
    L.up(policy, lab.state_dir, prefix, "vxlan", "info", UP_TIMEOUT, echo=lambda *_: None)
    return lab


# =============================================================================================
# the built-in data centre (deny_action: drop)
# =============================================================================================
@pytest.fixture(scope="class")
def dc(request, tmp_path_factory):
    lab = _lab_fixture(request, tmp_path_factory, None, PREFIX, "dc", ("compute-1", "compute-3"))
    lab.serve("acme/dns", udp=[53])
    lab.serve("globex/dns", udp=[53])
    lab.serve("acme/web-1", tcp=[443], udp=[53])
    lab.serve("acme/web-3", tcp=[443])
    lab.serve("acme/app-1", tcp=[443])
    lab.serve("acme/app-2", tcp=[443])
    lab.serve("globex/web-1", tcp=[443])
    lab.serve("acme/db-1", tcp=[5432])
    # shop/coredns runs no server: UDP 53 is allowed to it and closed
    return lab


def _ok(r: dict, ident: str, peer: str) -> None:
    assert r["result"] == "reply", r
    assert r["ident"] == ident, r  # the right workload answered ...
    assert r["peer"] == peer, r  # ... from the address asked
    assert r["echo"], r


class TestDataCentre:
    # --- UDP ----------------------------------------------------------------------------------
    def test_udp_same_host(self, dc):
        # acme/web-1 and acme/dns both on compute-1
        _ok(dc.reply("acme/web-1", "udp", "10.0.0.53", 53, b"query"), "acme/dns", "10.0.0.53")

    def test_udp_across_hosts(self, dc):
        # acme/app-2 on compute-4 -> acme/dns on compute-1
        _ok(dc.reply("acme/app-2", "udp", "10.0.0.53", 53, b"query"), "acme/dns", "10.0.0.53")

    def test_udp_overlapping_tenants_get_their_own_server(self, dc):
        # 10.0.0.53 is acme/dns (compute-1) in acme and globex/dns (compute-2) in globex
        _ok(dc.reply("acme/bastion", "udp", "10.0.0.53", 53, b"q"), "acme/dns", "10.0.0.53")
        _ok(dc.reply("globex/bastion", "udp", "10.0.0.53", 53, b"q"), "globex/dns", "10.0.0.53")

    # --- IPv6 ---------------------------------------------------------------------------------
    def test_ipv6_tcp_across_hosts_and_on_one_host(self, dc):
        hello = b"\x16\x03\x01 ipv6"
        _ok(dc.reply("acme/lb-1", "tcp", "fd00:10::1:13", 443, hello), "acme/web-3", "fd00:10::1:13")
        _ok(dc.reply("acme/web-3", "tcp", "fd00:10::2:22", 443, hello), "acme/app-2", "fd00:10::2:22")

    def test_ipv6_udp_across_hosts_and_on_one_host(self, dc):
        _ok(dc.reply("acme/web-2", "udp", "fd00:10::53", 53, b"aaaa?"), "acme/dns", "fd00:10::53")
        _ok(dc.reply("acme/web-1", "udp", "fd00:10::53", 53, b"aaaa?"), "acme/dns", "fd00:10::53")

    def test_ipv6_overlapping_tenants_get_their_own_server(self, dc):
        # fd00:10::1:11 is acme/web-1 (compute-1) and globex/web-1 (compute-3)
        _ok(dc.reply("acme/lb-1", "tcp", "fd00:10::1:11", 443, b"v6"), "acme/web-1", "fd00:10::1:11")
        _ok(dc.reply("globex/bastion", "tcp", "fd00:10::1:11", 443, b"v6"), "globex/web-1", "fd00:10::1:11")

    # --- datagrams larger than the MTU: IP fragments, reassembled before conntrack ---------------
    @pytest.mark.parametrize(
        "src,addr,size",
        [
            ("acme/web-1", "10.0.0.53", 3000),  # one host
            ("acme/app-2", "10.0.0.53", 3000),  # across hosts and sites
            ("acme/web-2", "fd00:10::53", 3000),  # IPv6 fragments
        ],
    )
    def test_udp_datagram_larger_than_the_mtu(self, dc, src, addr, size):
        payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        end = time.monotonic() + 30
        r: dict = {}
        while time.monotonic() < end:
            r = dc.probe(src, kind="udp", addr=addr, port=53, payload=payload)
            if r["result"] == "reply":
                break
        _ok(r, "acme/dns", addr)

    # --- denied: dropped ----------------------------------------------------------------------
    def test_denied_connections_are_dropped(self, dc):
        dc.reply("acme/app-1", "tcp", "10.0.3.31", 5432, b"the path works")  # app may reach db
        before = dc.counter("compute-1", "drops", "egress_denied")
        # acme/web-1 may not reach the database, nor the DNS server send first
        r = dc.probe("acme/web-1", kind="tcp", addr="10.0.3.31", port=5432, payload=b"x")
        assert r["result"] == "timeout", r
        r = dc.probe("acme/dns", kind="udp", addr="10.0.1.11", port=53, payload=b"x")
        assert r["result"] == "timeout", r
        # IPv6: the load balancer may not skip the web tier
        r = dc.probe("acme/lb-1", kind="tcp", addr="fd00:10::2:21", port=443, payload=b"x")
        assert r["result"] == "timeout", r
        wait_for(
            lambda: dc.counter("compute-1", "drops", "egress_denied") >= before + 2,
            ANSWER_DEADLINE,
            "compute-1's egress_denied drops to move",
        )

    # --- an ICMP error for a tracked flow is RELATED ------------------------------------------
    def test_icmp_error_of_a_tracked_flow_is_delivered_as_related(self, dc):
        """UDP to a closed port that the policy allows (shop/coredns:53, no server): the
        destination's kernel answers ICMP port unreachable, which the agents pass as RELATED
        to the UDP flow, so the connected client gets ECONNREFUSED."""
        before = dc.counter("compute-3", "datapath", "conntrack_states", "related")

        def refused():
            r = dc.probe("shop/frontend-1", kind="udp", addr="10.244.3.53", port=53, payload=b"q")
            return r if r["result"] == "refused" else None

        r = wait_for(refused, ANSWER_DEADLINE, "ECONNREFUSED from shop/coredns:53")
        assert r["errno"] == 111, r
        wait_for(
            lambda: dc.counter("compute-3", "datapath", "conntrack_states", "related") > before,
            ANSWER_DEADLINE,
            "compute-3 (coredns's host) to count a RELATED packet",
        )

    # --- forged frames ------------------------------------------------------------------------
    def test_a_frame_with_the_senders_own_addresses_gets_through(self, dc):
        # the control for the two tests below: the watcher sees an honest raw frame
        w = dc.state["workloads"]["acme/web-1"]
        seen = dc.frame(
            "acme/web-1", "acme/dns", src_mac=w["mac"], src="10.0.1.11", port=53, expect_seen=True
        )
        assert seen == "seen"

    def test_spoofed_source_ip_is_dropped(self, dc):
        # acme/web-1 (its own MAC) claims acme/web-2's address
        w = dc.state["workloads"]["acme/web-1"]
        before = dc.counter("compute-1", "drops", "spoofed_source")
        seen = dc.frame(
            "acme/web-1", "acme/dns", src_mac=w["mac"], src="10.0.1.12", port=53, expect_seen=False
        )
        assert seen == "unseen"
        wait_for(
            lambda: dc.counter("compute-1", "drops", "spoofed_source") >= before + 3,
            ANSWER_DEADLINE,
            "compute-1's spoofed_source drops to move by the 3 frames",
        )

    def test_spoofed_ipv6_source_is_dropped(self, dc):
        w = dc.state["workloads"]["acme/web-1"]
        kw = dict(src_mac=w["mac"], port=53, family=6)
        assert dc.frame("acme/web-1", "acme/dns", src="fd00:10::1:11", expect_seen=True, **kw) == "seen"
        before = dc.counter("compute-1", "drops", "spoofed_source")
        assert dc.frame("acme/web-1", "acme/dns", src="fd00:10::1:12", expect_seen=False, **kw) == "unseen"
        wait_for(
            lambda: dc.counter("compute-1", "drops", "spoofed_source") >= before + 3,
            ANSWER_DEADLINE,
            "compute-1's spoofed_source drops to move by the 3 IPv6 frames",
        )

    def test_spoofed_source_mac_is_dropped(self, dc):
        # acme/web-1 sends as acme/web-2 (its MAC and address): the port is web-1's
        web2 = dc.state["workloads"]["acme/web-2"]
        before = dc.counter("compute-1", "drops", "port_mac")
        seen = dc.frame(
            "acme/web-1", "acme/dns", src_mac=web2["mac"], src="10.0.1.12", port=53, expect_seen=False
        )
        assert seen == "unseen"
        wait_for(
            lambda: dc.counter("compute-1", "drops", "port_mac") >= before + 3,
            ANSWER_DEADLINE,
            "compute-1's port_mac drops to move by the 3 frames",
        )
        # lab stats --json shows the same counters
        r = dc.microseg("lab", "stats", "--state-dir", dc.state_dir, "--json")
        assert r.returncode == 0, r.stderr
        drops = json.loads(r.stdout)["hosts"]["compute-1"]["drops"]
        assert drops["port_mac"] >= before + 3 and drops.get("spoofed_source", 0) >= 0

    def test_a_frame_to_the_other_tenants_mac_stays_in_its_tenant(self, dc):
        # globex/app-1 (compute-1) sends to acme/db-1's MAC and address (compute-1 too)
        w = dc.state["workloads"]["globex/app-1"]
        seen = dc.frame(
            "globex/app-1", "acme/db-1", src_mac=w["mac"], src="10.0.2.21", port=5432, expect_seen=False
        )
        assert seen == "unseen"


# =============================================================================================
# deny_action: reject
# =============================================================================================
@pytest.fixture(scope="class")
def rj(request, tmp_path_factory):
    lab = _lab_fixture(request, tmp_path_factory, str(REJECT_POLICY), PREFIX_REJECT, "rj", ("h1", "h2"))
    for w in ("red/b", "red/c"):
        lab.serve(w, tcp=[7000, 8080], udp=[7000, 8080])
    return lab


class TestReject:
    def _quick(self, rj, *args, **spec) -> dict:
        # an answer must come before the socket's timeout (SILENCE): the agent answers at once
        return rj.probe(*args, timeout=SILENCE, **spec)

    @pytest.mark.parametrize("addr", ["10.7.0.3", "10.7.0.2", "fd00:7::3", "fd00:7::2"])
    def test_allowed_paths_answer(self, rj, addr):
        peer = {"3": "red/c", "2": "red/b"}[addr[-1]]
        _ok(rj.reply("red/a", "tcp", addr, 7000, b"hi"), peer, addr)
        _ok(rj.reply("red/a", "udp", addr, 7000, b"hi"), peer, addr)

    @pytest.mark.parametrize("addr", ["10.7.0.3", "10.7.0.2", "fd00:7::3", "fd00:7::2"])
    def test_denied_tcp_gets_a_reset(self, rj, addr):
        rj.reply("red/a", "tcp", addr, 7000, b"path")  # the path works
        r = self._quick(rj, "red/a", kind="tcp", addr=addr, port=8080, payload=b"denied")
        assert r["result"] == "refused", r  # ECONNREFUSED: a RST answered the SYN

    @pytest.mark.parametrize(
        "addr,result",
        [
            ("10.7.0.3", "unreachable"),
            ("10.7.0.2", "unreachable"),
            ("fd00:7::3", "prohibited"),
            ("fd00:7::2", "prohibited"),
        ],
    )
    def test_denied_udp_gets_an_icmp_unreachable(self, rj, addr, result):
        """The agent answers ICMP "administratively prohibited" (type 3 code 13; ICMPv6 type 1
        code 1): a connected UDP socket gets EHOSTUNREACH (IPv4) or EACCES (IPv6)."""
        rj.reply("red/a", "udp", addr, 7000, b"path")
        r = self._quick(rj, "red/a", kind="udp", addr=addr, port=8080, payload=b"denied")
        assert r["result"] == result, r

    @pytest.mark.parametrize("addr", ["10.7.0.3", "10.7.0.2", "fd00:7::3", "fd00:7::2"])
    def test_the_destinations_port_unreachable_is_related_not_rejected(self, rj, addr):
        """UDP 7001 is allowed and closed: the answer is the destination kernel's ICMP(v6)
        port unreachable, passed as RELATED (ECONNREFUSED), not the agent's reject
        (administratively prohibited: EHOSTUNREACH / EACCES)."""
        host = "h2" if addr.endswith("3") else "h1"
        before = rj.counter(host, "datapath", "conntrack_states", "related")

        def answered():
            r = rj.probe("red/a", kind="udp", addr=addr, port=7001, payload=b"anyone?")
            return r if r["result"] != "timeout" else None

        r = wait_for(answered, ANSWER_DEADLINE, f"an answer from {addr}:7001")
        assert r["result"] == "refused", r
        wait_for(
            lambda: rj.counter(host, "datapath", "conntrack_states", "related") > before,
            ANSWER_DEADLINE,
            f"{host} to count a RELATED packet",
        )

    @pytest.mark.parametrize("addr", ["10.7.0.3", "fd00:7::3"])
    def test_denied_ping_gets_an_icmp_unreachable(self, rj, addr):
        rj.reply("red/a", "udp", addr, 7000, b"path")
        r = self._quick(rj, "red/a", kind="ping", addr=addr)
        assert r["result"] == "unreachable", r
        # administratively prohibited: ICMP type 3 code 13, ICMPv6 type 1 code 1
        assert (r["icmp_type"], r["icmp_code"]) == ((1, 1) if ":" in addr else (3, 13)), r

    def test_rejects_are_counted(self, rj):
        r = rj.microseg("lab", "stats", "--state-dir", rj.state_dir, "--json")
        assert r.returncode == 0, r.stderr
        hosts = json.loads(r.stdout)["hosts"]
        assert sum(h["verdicts"].get("reject", 0) for h in hosts.values()) > 0, hosts
        assert sum(h["drops"].get("ingress_denied", 0) for h in hosts.values()) > 0, hosts


# =============================================================================================
# `microseg lab demo`
# =============================================================================================
def test_lab_demo(tmp_path):
    state = tmp_path / "demo"
    t0 = time.monotonic()
    try:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "microseg",
                "lab",
                "demo",
                "--prefix",
                PREFIX_DEMO,
                "--state-dir",
                str(state),
                "--timeout",
                str(UP_TIMEOUT),
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=UP_TIMEOUT + 240,
        )
    finally:
        if (state / "state.json").exists():  # the demo did not take its lab down
            from microseg.agent import lab as L

            L.down(str(state), echo=lambda *_: None)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(r.stdout)
    s = report["summary"]
    assert s["probes"] == len(report["probes"]) >= 30
    assert s["matched"] == s["probes"] and s["mismatched"] == 0
    assert s["expected_allowed"] > 0 and s["expected_denied"] > 0
    cats = s["by_category"]
    for c in ("tcp", "tls", "dns", "udp", "ping", "scan", "spoof-ip", "spoof-mac", "cross-tenant", "raw"):
        assert cats[c]["probes"] >= 1 and cats[c]["matched"] == cats[c]["probes"], (c, cats)
    assert all(p["match"] for p in report["probes"])
    scan = next(p for p in report["probes"] if p["kind"] == "scan")
    assert scan["observed"]["verdicts"] == scan["expected"]["verdicts"]
    assert scan["expected"]["verdicts"]["drop"] > scan["expected"]["verdicts"]["allow"] > 0
    cs = report["cross_site"]
    assert cs["probes"], cs
    if cs["underlay"] == "esp":  # the lab gave the agents SAs between the sites
        assert cs["esp_sent"] > 0 and cs["esp_received"] > 0, cs
    for p in report["probes"]:
        assert (p["path"]["kind"] == "cross-site") == (p["name"] in report["cross_site"]["probes"])
    assert set(report["hosts"]) == {"compute-1", "compute-2", "compute-3", "compute-4"}
    for h in report["hosts"].values():
        assert h["running"] and h["packets"] > 0
    drops = _drops_sum(report["hosts"])
    assert drops.get("spoofed_source", 0) > 0 and drops.get("port_mac", 0) > 0
    assert report["seconds"]["probes"] < 90, report["seconds"]
    assert not [ns for ns in _netns_list() if ns.startswith(PREFIX_DEMO + "-")]
    assert not (state / "state.json").exists()
    print(f"lab demo: {s['probes']} probes, {elapsed:.1f} s in all")


def _drops_sum(hosts: dict) -> dict:
    out: dict[str, int] = {}
    for h in hosts.values():
        for k, v in h["drops"].items():
            out[k] = out.get(k, 0) + v
    return out
