"""Live tests: a small lab in network namespaces, real sockets through the agents.

Two hosts, two tenants whose workloads use the same addresses, one security group per tenant
that allows TCP 7000-7999 only (so 8080 is denied) and ICMP in red only. Everything is driven
with real sockets inside the workloads' namespaces. Every wait is a condition with a deadline;
the only waits that run to their end are the ones that prove something does *not* arrive.

Needs root and ``ip netns``; skipped otherwise. The lab is always taken down (fixture
finalizer, and at interpreter exit should the run be interrupted).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from livelab import PING, LiveLab, netns_skip_reason

PREFIX = f"mst{os.getpid() % 100000}"

POLICY = """\
version: 1
default_egress: deny
deny_action: drop
tenants:
  - {name: red, vni: 7001}
  - {name: blue, vni: 7002}
hosts:
  - {name: h1, address: 198.18.0.1}
  - {name: h2, address: 198.18.0.2}
security_groups:
  - name: svc
    tenant: red
    rules:
      - {direction: ingress, ethertype: IPv4, protocol: tcp, port_range_min: 7000, port_range_max: RED_MAX}
      - {direction: ingress, ethertype: IPv4, protocol: icmp}
      - {direction: egress, ethertype: IPv4}
  - name: svc
    tenant: blue
    rules:
      - {direction: ingress, ethertype: IPv4, protocol: tcp, port_range_min: 7000, port_range_max: 7999}
      - {direction: egress, ethertype: IPv4}
workloads:
  - {name: a, tenant: red, host: h1, mac: "02:00:00:01:00:01", ipv4: 10.1.0.1, security_groups: [svc]}
  - {name: b, tenant: red, host: h1, mac: "02:00:00:01:00:02", ipv4: 10.1.0.2, security_groups: [svc]}
  - {name: c, tenant: red, host: h2, mac: "02:00:00:01:00:03", ipv4: 10.1.0.3, security_groups: [svc]}
  - {name: a, tenant: blue, host: h2, mac: "02:00:00:02:00:01", ipv4: 10.1.0.1, security_groups: [svc]}
  - {name: c, tenant: blue, host: h1, mac: "02:00:00:02:00:03", ipv4: 10.1.0.3, security_groups: [svc]}
"""

UP_TIMEOUT = 150  # agents import and load their kernels; generous on a loaded machine
ANSWER_DEADLINE = 30  # an allowed path must answer within this (retries included)
SILENCE = 4.0  # how long a denied connection is given to (wrongly) get through


_REASON = netns_skip_reason(PREFIX)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def _netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _root_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines())


class Lab(LiveLab):
    def __init__(self, root):
        super().__init__(root)
        self.p1 = root / "p1.yaml"
        self.p2 = root / "p2.yaml"
        self.bad = root / "bad.yaml"
        self.p1.write_text(POLICY.replace("RED_MAX", "7999"))
        # P2 forbids red's port 7001 (7000 stays allowed)
        self.p2.write_text(
            POLICY.replace(
                "port_range_min: 7000, port_range_max: RED_MAX}",
                "port_range_min: 7000, port_range_max: 7000}\n"
                "      - {direction: ingress, ethertype: IPv4, protocol: tcp, "
                "port_range_min: 7002, port_range_max: 7999}",
            )
        )
        self.bad.write_text(
            POLICY.replace("RED_MAX", "7999").replace("tenant: blue, host: h2", "tenant: nosuch, host: h2")
        )

    def answers(self, workload, addr, port, msg, deadline=ANSWER_DEADLINE) -> str:
        return super().answers(workload, addr, port, msg, deadline)

    def cli(self, verb: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.microseg("lab", verb, "--state-dir", self.state_dir, *args, timeout=timeout)


def _say(p: subprocess.Popen, text: str) -> str:
    p.stdin.write(text + "\n")
    p.stdin.flush()
    return p.stdout.readline().strip()


@pytest.fixture(scope="module")
def lab(tmp_path_factory, request):
    from microseg.agent import lab as L

    lab = Lab(tmp_path_factory.mktemp("lab"))
    lab.links_before = _root_links()
    lab.guard(request)
    L.up(str(lab.p1), lab.state_dir, PREFIX, "vxlan", "info", UP_TIMEOUT, echo=lambda *_: None)
    for w in ("red/b", "red/c", "blue/c"):
        lab.start_server(w, 7000, 7001, 8080)
    return lab


# ---------------------------------------------------------------------------------------------
def test_lab_is_up(lab):
    r = lab.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert set(s["hosts"]) == {"h1", "h2"}
    assert all(h["ready"] for h in s["hosts"].values())
    assert set(s["workloads"]) == {"red/a", "red/b", "red/c", "blue/a", "blue/c"}
    assert all(ns.startswith(PREFIX + "-") for ns in lab.state["namespaces"])
    assert set(lab.state["namespaces"]) <= set(_netns_list())


def test_up_twice_is_refused(lab):
    from microseg.agent import lab as L

    with pytest.raises(L.LabError, match="already up"):
        L.up(str(lab.p1), lab.state_dir, PREFIX + "x")


def test_tcp_same_host(lab):
    assert lab.answers("red/a", "10.1.0.2", 7000, "hello") == "red/b:hello"


def test_tcp_across_hosts(lab):
    assert lab.answers("red/a", "10.1.0.3", 7000, "over the underlay") == "red/c:over the underlay"
    assert lab.answers("red/c", "10.1.0.2", 7001, "and back") == "red/b:and back"


def test_denied_port_times_out(lab):
    lab.answers("red/a", "10.1.0.3", 7000, "path works")  # the path itself is fine
    rc, out = lab.tcp("red/a", "10.1.0.3", 8080, "denied", timeout=SILENCE)
    assert (rc, out) == (3, "TIMEOUT")
    rc, out = lab.tcp("red/a", "10.1.0.2", 8080, "denied", timeout=SILENCE)  # same host too
    assert (rc, out) == (3, "TIMEOUT")


def test_overlapping_tenants_stay_apart(lab):
    # 10.1.0.3 is red/c (on h2) in red and blue/c (on h1) in blue: each tenant reaches its own
    assert lab.answers("red/a", "10.1.0.3", 7000, "who") == "red/c:who"
    assert lab.answers("blue/a", "10.1.0.3", 7000, "who") == "blue/c:who"
    # 10.1.0.2 exists only in red: blue/a gets no ARP answer for it ...
    rc, out = lab.tcp("blue/a", "10.1.0.2", 7000, "cross", timeout=SILENCE)
    assert rc != 0, out
    # ... and with red/b's MAC forced into its neighbour table, the frame is still not red's
    subprocess.run(
        [
            "ip",
            "-n",
            lab.ns("blue/a"),
            "neigh",
            "replace",
            "10.1.0.2",
            "lladdr",
            "02:00:00:01:00:02",
            "dev",
            "eth0",
            "nud",
            "permanent",
        ],
        check=True,
    )
    rc, out = lab.tcp("blue/a", "10.1.0.2", 7000, "cross", timeout=SILENCE)
    assert (rc, out) == (3, "TIMEOUT")


def test_ping_where_icmp_is_allowed(lab):
    r = lab.py("red/a", PING, "10.1.0.3", 3.0)  # red allows ICMP in
    for _ in range(5):
        if r.returncode == 0:
            break
        r = lab.py("red/a", PING, "10.1.0.3", 3.0)
    assert r.returncode == 0, r.stdout
    assert lab.py("blue/a", PING, "10.1.0.3", 3.0).returncode == 3  # blue does not


def test_lab_exec_passes_the_exit_status(lab):
    r = lab.cli("exec", "red/a", "--", "sh", "-c", "ip -o addr show dev eth0; exit 7")
    assert r.returncode == 7
    assert "10.1.0.1/32" in r.stdout
    r = lab.cli("exec", "a", "--", "true")
    assert r.returncode == 2 and "ambiguous" in r.stderr


def test_stats(lab):
    lab.answers("red/a", "10.1.0.3", 7000, "count me")
    r = lab.cli("stats", "--json")
    assert r.returncode == 0, r.stderr
    hosts = json.loads(r.stdout)["hosts"]
    pids = {n: h["pid"] for n, h in lab.state["hosts"].items()}
    for name in ("h1", "h2"):
        h = hosts[name]
        assert h["agent"]["pid"] == pids[name]
        assert h["agent"]["packets"] > 0 and h["agent"]["bytes"] > 0
        assert h["agent"]["cpu_seconds"] > 0
        fp = h["fastpath"]
        assert fp["kind"] in ("xdp", "software") and fp["flows"] >= 0
        assert fp["packets"] >= 0 and fp["bytes"] >= 0
        assert (fp["kind"] == "software") == bool(fp.get("reason"))
        assert h["verdicts"]["allow"] > 0
        assert h["conntrack"]["entries"] >= 0
    # the denied connections were dropped by the destination's ingress rules (on h2 and h1)
    assert hosts["h2"]["drops"].get("ingress_denied", 0) > 0


def test_invalid_reload_is_refused_and_the_policy_kept(lab):
    from microseg.agent import control

    h1 = lab.state["hosts"]["h1"]
    before = control.request(h1["control"], "status")["policy"]
    r = control.request(h1["control"], "reload", policy=str(lab.bad))
    assert r["ok"] is False and "nosuch" in r["error"]
    assert control.request(h1["control"], "status")["policy"] == before
    assert lab.answers("red/a", "10.1.0.3", 7000, "still") == "red/c:still"


def test_reload_cuts_a_forbidden_established_flow(lab):
    kept = lab.session("red/a", "10.1.0.3", 7000, timeout=10)
    cut = lab.session("red/a", "10.1.0.3", 7001, timeout=SILENCE + 2)
    assert _say(kept, "one") == "red/c:one"
    assert _say(cut, "one") == "red/c:one"
    r = lab.cli("reload", "--policy", str(lab.p2))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "h1: policy" in r.stdout and "h2: policy" in r.stdout
    assert _say(kept, "two") == "red/c:two"  # 7000 is still allowed: it carries on
    assert _say(cut, "two") == "TIMEOUT"  # 7001 is not any more: cut
    rc, out = lab.tcp("red/a", "10.1.0.3", 7001, "new", timeout=SILENCE)
    assert (rc, out) == (3, "TIMEOUT")
    for p in (kept, cut):
        p.stdin.close()
        p.wait(timeout=10)


def test_a_connection_survives_an_agent_restart(lab):
    kept = lab.session("red/a", "10.1.0.3", 7000, timeout=ANSWER_DEADLINE)  # h1 -> h2
    assert _say(kept, "before") == "red/c:before"
    old_pid = lab.state["hosts"]["h2"]["pid"]
    r = lab.cli("restart", "h2", "--timeout", str(UP_TIMEOUT), timeout=UP_TIMEOUT + 60)
    assert r.returncode == 0, r.stdout + r.stderr
    new_pid = lab.state["hosts"]["h2"]["pid"]
    assert new_pid != old_pid
    restored = int(r.stdout.split(" connections restored")[0].rsplit(" ", 1)[1])
    assert restored >= 1, r.stdout
    # the same socket, after the restart: the new agent knows the connection
    assert _say(kept, "after") == "red/c:after"
    assert lab.answers("red/a", "10.1.0.3", 7000, "new one") == "red/c:new one"
    kept.stdin.close()
    kept.wait(timeout=10)


def test_every_agent_serves_metrics_and_writes_flow_logs(lab):
    """`lab status --json` names each host's metrics socket and flow log; the socket answers
    Prometheus text from the machine's own namespace."""
    import http.client
    import socket as _socket

    class _Conn(http.client.HTTPConnection):
        def __init__(self, path):
            super().__init__("localhost")
            self.path = path

        def connect(self):
            self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(self.path)

    r = lab.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    for name, h in json.loads(r.stdout)["hosts"].items():
        assert h["metrics_url"].startswith("unix:"), h
        assert h["flow_log"].endswith(".flows.jsonl"), h
        path = h["metrics_url"][len("unix:") :]
        end = time.monotonic() + ANSWER_DEADLINE
        body = b""
        while time.monotonic() < end:
            try:
                c = _Conn(path)
                c.request("GET", "/metrics")
                resp = c.getresponse()
                body = resp.read()
                if resp.status == 200 and b"microseg_" in body:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert b"microseg_" in body, f"{name}: no metrics from {path}"


def test_killing_an_agent_stops_its_traffic(lab):
    lab.answers("red/a", "10.1.0.3", 7000, "before")
    pid = lab.state["hosts"]["h2"]["pid"]
    os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + 20
    while (
        time.monotonic() < end
        and os.path.exists(f"/proc/{pid}/cmdline")
        and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    ):
        time.sleep(0.05)
    rc, out = lab.tcp("red/a", "10.1.0.3", 7000, "after", timeout=SILENCE)  # to h2
    assert (rc, out) == (3, "TIMEOUT")
    rc, out = lab.tcp("blue/a", "10.1.0.3", 7000, "local", timeout=SILENCE)  # on h2 itself
    assert rc != 0, out
    assert lab.answers("red/a", "10.1.0.2", 7000, "h1 alone") == "red/b:h1 alone"  # h1 goes on


def test_down_leaves_nothing(lab):
    from microseg.agent import lab as L

    state = lab.state
    pids = [h["pid"] for h in state["hosts"].values()]
    assert L.down(lab.state_dir, echo=lambda *_: None) == 0
    lab.down_done = True
    assert not [ns for ns in _netns_list() if ns.startswith(PREFIX)]
    assert not any(os.path.exists(f"/run/netns/{ns}") for ns in state["namespaces"])
    assert _root_links() == lab.links_before
    for pid in pids:
        assert (
            not os.path.exists(f"/proc/{pid}/cmdline")
            or open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
        )
    for p in lab.servers:
        assert p.wait(timeout=10) is not None  # killed with their namespaces
    assert not os.path.exists(os.path.join(lab.state_dir, "state.json"))
    assert not os.listdir(lab.state_dir) if os.path.isdir(lab.state_dir) else True
