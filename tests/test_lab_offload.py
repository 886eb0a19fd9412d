"""Live tests of the kernel fast path: established flows offloaded into the agents' XDP
program, with the agent still the authority.

Two hosts, one tenant. Shown with real sockets: a TCP transfer moves its data while the
agent sees only the connection's first packets; the connection's end is seen (FIN reaches
conntrack and the flow leaves the map); a reload that forbids an offloaded connection cuts it;
the map's capacity and the insert rate are honoured and the refusals reported; an agent
killed with SIGKILL leaves no program forwarding (its BPF links go with it) and a clean stop
removes its pins.

Needs root, ``ip netns`` and BPF (XDP on veth, bpffs); skipped otherwise. The lab is always
taken down.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from livelab import BULK, SINK, LiveLab, netns_skip_reason, wait_for

PREFIX = f"msof{os.getpid() % 100000}"

POLICY = """\
version: 1
default_egress: deny
deny_action: drop
tenants:
  - {name: red, vni: 7201}
hosts:
  - {name: h1, address: 198.18.2.1}
  - {name: h2, address: 198.18.2.2}
security_groups:
  - name: svc
    tenant: red
    rules:
      - {direction: ingress, ethertype: IPv4, protocol: tcp, port_range_min: 7000, port_range_max: PORTMAX}
      - {direction: egress, ethertype: IPv4}
workloads:
  - {name: a, tenant: red, host: h1, mac: "02:00:00:21:00:01", ipv4: 10.8.0.1, security_groups: [svc]}
  - {name: b, tenant: red, host: h1, mac: "02:00:00:21:00:02", ipv4: 10.8.0.2, security_groups: [svc]}
  - {name: c, tenant: red, host: h2, mac: "02:00:00:21:00:03", ipv4: 10.8.0.3, security_groups: [svc]}
"""

UP_TIMEOUT = 150
ANSWER_DEADLINE = 30
SILENCE = 4.0


def _bpf_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    from microseg.bpf import KernelFastPath

    ok, why = KernelFastPath.available()
    return None if ok else f"no kernel fast path here: {why}"


_REASON = netns_skip_reason(PREFIX) or _bpf_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


class Lab(LiveLab):
    def __init__(self, root):
        super().__init__(root)
        self.p1 = root / "p1.yaml"
        self.p1.write_text(POLICY.replace("PORTMAX", "7999"))
        self.p2 = root / "p2.yaml"  # 7001 no longer allowed
        self.p2.write_text(
            POLICY.replace(
                "port_range_min: 7000, port_range_max: PORTMAX}",
                "port_range_min: 7000, port_range_max: 7000}\n"
                "      - {direction: ingress, ethertype: IPv4, protocol: tcp, "
                "port_range_min: 7002, port_range_max: 7999}",
            )
        )

    def fastpath(self, host: str) -> dict:
        return self.stats(host)["fastpath"]


def _say(p, text: str) -> str:
    p.stdin.write(text + "\n")
    p.stdin.flush()
    return p.stdout.readline().strip()


@pytest.fixture(scope="module")
def lab(tmp_path_factory, request):
    from microseg.agent import lab as L

    lab = Lab(tmp_path_factory.mktemp("lab"))
    lab.guard(request)
    L.up(
        str(lab.p1),
        lab.state_dir,
        PREFIX,
        "vxlan",
        "info",
        UP_TIMEOUT,
        echo=lambda *_: None,
        offload_args=("--offload-after", "4", "--offload-capacity", "2", "--offload-idle", "60"),
    )
    lab.start_server("red/c", 7000, 7001, 7002)
    lab.start_server("red/b", 7000)
    lab.serve("red/c", SINK, 7100)
    return lab


def _wait_flows(lab, host: str, n: int) -> dict:
    seen: list = []

    def cond():
        fp = lab.fastpath(host)
        seen[:] = [fp]
        return fp if fp["flows"] == n else None

    try:
        return wait_for(cond, 30, f"{host}: {n} flows in the map")
    except AssertionError as exc:
        fp = dict(seen[0]) if seen else {}
        fp.pop("program", None)
        raise AssertionError(f"{exc}; fast path: {fp}") from None


def test_status_names_the_kernel_fast_path(lab):
    from microseg.agent import control

    for h in ("h1", "h2"):
        st = control.request(lab.state["hosts"][h]["control"], "status")
        assert st["fastpath"] == {"kind": "xdp", "reason": None}
        assert lab.fastpath(h)["kind"] == "xdp"


def test_bulk_transfer_is_carried_by_the_kernel_and_its_end_seen(lab):
    lab.answers("red/a", "10.8.0.3", 7000, "warm", ANSWER_DEADLINE)
    before = {h: lab.stats(h) for h in ("h1", "h2")}
    n = 20 << 20
    r = lab.py("red/a", BULK, "10.8.0.3", 7100, n, timeout=120)
    assert r.returncode == 0 and int(r.stdout.strip()) == n, r.stdout + r.stderr
    after = {h: lab.stats(h) for h in ("h1", "h2")}
    for h in ("h1", "h2"):
        seen = after[h]["agent"]["packets"] - before[h]["agent"]["packets"]
        carried = after[h]["fastpath"]["packets"] - before[h]["fastpath"]["packets"]
        # ~15,000 segments one way and their ACKs: the agent saw the handshake, the first
        # packets and the end; the kernel carried the rest
        assert carried > 5000, (h, after[h]["fastpath"])
        assert seen < 200, (h, seen)
        assert after[h]["fastpath"]["removed_end"] > before[h]["fastpath"]["removed_end"]
    # the connection left the map at its FIN; conntrack saw the close
    _wait_flows(lab, "h1", 0)
    from microseg.agent import control

    ct = control.request(lab.state["hosts"]["h1"]["control"], "conntrack", dst="10.8.0.3")
    ends = [e for e in ct["entries"] if e.get("dport") == 7100]
    assert ends and all(e["state"] != "ESTABLISHED" for e in ends), ends
    # and its bytes were read back into conntrack: both directions, the data way beyond n
    assert max(e["bytes"][0] for e in ends) >= n


def test_same_host_flow_is_offloaded_locally(lab):
    s = lab.session("red/a", "10.8.0.2", 7000, 30)
    try:
        for i in range(12):
            assert _say(s, f"m{i}") == f"red/b:m{i}"
        fp = _wait_flows(lab, "h1", 1)
        assert fp["offloaded"] >= 1
        base = lab.fastpath("h1")["packets"]
        for i in range(20):
            assert _say(s, f"k{i}") == f"red/b:k{i}"
        wait_for(lambda: lab.fastpath("h1")["packets"] >= base + 20, 30, "the kernel to count the session")
    finally:
        s.stdin.close()
        s.wait(timeout=30)
    _wait_flows(lab, "h1", 0)


def test_capacity_and_rate_refusals_are_counted_and_traffic_goes_on(lab):
    sessions = [lab.session("red/a", "10.8.0.3", port, 30) for port in (7000, 7001, 7002)]
    try:
        for k in range(10):
            for i, s in enumerate(sessions):
                assert _say(s, f"s{i}-{k}") == f"red/c:s{i}-{k}"
        fp = _wait_flows(lab, "h1", 2)  # capacity 2: the third stays on the agent's path
        assert fp["refused_capacity"] >= 1
        for k in range(5):
            for i, s in enumerate(sessions):
                assert _say(s, f"t{i}-{k}") == f"red/c:t{i}-{k}"
    finally:
        for s in sessions:
            s.stdin.close()
            s.wait(timeout=30)
    _wait_flows(lab, "h1", 0)


def test_reload_cuts_an_offloaded_connection(lab):
    keep = lab.session("red/a", "10.8.0.3", 7000, 30)
    cut = lab.session("red/a", "10.8.0.3", 7001, SILENCE)
    try:
        for k in range(8):
            assert _say(keep, f"a{k}") == f"red/c:a{k}"
            assert _say(cut, f"b{k}") == f"red/c:b{k}"
        _wait_flows(lab, "h1", 2)
        r = lab.microseg("lab", "reload", "--policy", str(lab.p2), "--state-dir", lab.state_dir)
        assert r.returncode == 0, r.stderr
        fp = lab.fastpath("h1")
        assert fp["removed_revoked"] >= 1 and fp["flows"] <= 1
        assert _say(cut, "after") == "TIMEOUT"
        assert _say(keep, "after") == "red/c:after"
    finally:
        for s in (keep, cut):
            s.stdin.close()
            s.wait(timeout=30)
        r = lab.microseg("lab", "reload", "--policy", str(lab.p1), "--state-dir", lab.state_dir)
        assert r.returncode == 0, r.stderr


def _xdp_on(ns: str, ifname: str) -> bool:
    out = subprocess.run(
        ["ip", "-n", ns, "-d", "link", "show", ifname], capture_output=True, text=True
    ).stdout
    return "prog/xdp" in out or " xdp" in out


def test_killed_agent_leaves_nothing_forwarding_and_restart_recovers(lab):
    from microseg.agent import lab as L

    st = lab.state
    ns1 = st["hosts"]["h1"]["ns"]
    assert _xdp_on(ns1, "w0")
    s = lab.session("red/a", "10.8.0.3", 7000, SILENCE)
    try:
        for k in range(10):
            assert _say(s, f"x{k}") == f"red/c:x{k}"
        _wait_flows(lab, "h1", 1)
        os.kill(st["hosts"]["h1"]["pid"], signal.SIGKILL)
        wait_for(lambda: not _xdp_on(ns1, "w0"), 30, "the program to leave w0 with its agent")
        assert _say(s, "dead") == "TIMEOUT"  # nothing forwards the offloaded flow any more
    finally:
        s.stdin.close()
        s.wait(timeout=30)
    L.restart("h1", lab.state_dir, timeout=UP_TIMEOUT)
    assert _xdp_on(ns1, "w0")
    assert lab.answers("red/a", "10.8.0.3", 7000, "back", ANSWER_DEADLINE) == "red/c:back"
    # a clean stop detaches and unpins
    from microseg.agent.kfast import pin_name
    from microseg.bpf.loader import DEFAULT_PIN_ROOT

    pins = os.path.join(DEFAULT_PIN_ROOT, pin_name("h1", ns1))
    assert os.path.isdir(pins)
    L.restart("h1", lab.state_dir, timeout=UP_TIMEOUT)
    assert os.path.isdir(pins)  # the new agent's own
