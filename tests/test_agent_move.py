"""A workload moving to another host with its connections, live: ``microseg lab move``.

A store lab (a real one-member etcd started by the lab) of three hosts, one workload on each.
A TCP connection from ``red/a`` (host h1) to ``red/b`` (host h2) carries messages; ``red/b``
then moves to h3: its ``host`` key changes in the store, h2's agent closes the port and hands
the workload's conntrack entries off through the store, the host end of its veth moves into
h3's namespace, and h3's agent opens it and imports the handoff. Right after the move (before
any new packet of the connection) h3's conntrack holds the connection as ESTABLISHED with the
bytes counted on h2, and the same socket keeps exchanging messages. Every wait has a
deadline; the lab (etcd included) is always taken down.

Needs root, ``ip netns`` and an etcd server; skipped otherwise.
"""

from __future__ import annotations

import os

import pytest

from livelab import LiveLab, store_skip_reason, wait_for

PREFIX = f"msmv{os.getpid() % 100000}"

POLICY = """\
version: 1
default_egress: deny
deny_action: drop
tenants:
  - {name: red, vni: 7201}
hosts:
  - {name: h1, address: 198.18.2.1}
  - {name: h2, address: 198.18.2.2}
  - {name: h3, address: 198.18.2.3}
security_groups:
  - name: svc
    tenant: red
    rules:
      - {direction: ingress, ethertype: IPv4, protocol: tcp, port_range_min: 7000, port_range_max: 7999}
      - {direction: egress, ethertype: IPv4}
workloads:
  - {name: a, tenant: red, host: h1, mac: "02:00:00:04:00:01", ipv4: 10.4.0.1, security_groups: [svc]}
  - {name: b, tenant: red, host: h2, mac: "02:00:00:04:00:02", ipv4: 10.4.0.2, security_groups: [svc]}
  - {name: c, tenant: red, host: h3, mac: "02:00:00:04:00:03", ipv4: 10.4.0.3, security_groups: [svc]}
"""

UP_TIMEOUT = 150
DEADLINE = 60


_REASON = store_skip_reason(PREFIX)


class MoveLab(LiveLab):
    log_names = ("h1", "h2", "h3")


needs_lab = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


@pytest.fixture(scope="module")
def lab(tmp_path_factory, request):
    from microseg.agent import lab as L

    root = tmp_path_factory.mktemp("movelab")
    lab = MoveLab(root)
    lab.guard(request)
    policy = root / "p.yaml"
    policy.write_text(POLICY)
    L.up(str(policy), lab.state_dir, PREFIX, "vxlan", "info", UP_TIMEOUT, echo=lambda *_: None, store=True)
    lab.start_server("red/b", 7001)
    return lab


def _conn(lab, host: str) -> list:
    r = lab.control(host, "conntrack", src="10.4.0.1", dst="10.4.0.2", proto="tcp", zone=7201)
    assert r["ok"], r
    return r["entries"]


@needs_lab
def test_connection_survives_a_move(lab):
    from microseg.agent import lab as L

    s = lab.session("red/a", "10.4.0.2", 7001, 30.0)

    def say(msg: str) -> str:
        s.stdin.write(msg + "\n")
        s.stdin.flush()
        return s.stdout.readline().strip()

    for i in range(5):
        assert say(f"before{i}") == f"red/b:before{i}"
    before = wait_for(lambda: _conn(lab, "h2"), DEADLINE, "the connection in h2's conntrack")
    assert len(before) == 1 and before[0]["state"] == "ESTABLISHED" and before[0]["assured"]
    assert not _conn(lab, "h3")

    st = L.move("red/b", "h3", lab.state_dir, timeout=DEADLINE)
    assert "red/b" in st["ports"], st
    assert st["handoffs"]["red/b"].startswith("imported from h2"), st["handoffs"]
    assert st["moves"]["arrived"] == 1 and st["moves"]["handoff_entries"] >= 1, st["moves"]
    # right after the move, before the connection sent anything new: the entry came with
    # the handoff (a mid-stream pickup would have no entry yet, and count from zero)
    after = _conn(lab, "h3")
    assert len(after) == 1 and after[0]["state"] == "ESTABLISHED" and after[0]["assured"], after
    assert after[0]["bytes"][0] >= before[0]["bytes"][0] > 0
    assert after[0]["bytes"][1] >= before[0]["bytes"][1] > 0
    assert (after[0]["sport"], after[0]["dport"]) == (before[0]["sport"], before[0]["dport"])
    # the old host let go: no port, no connections, its handoff written and taken
    h2 = lab.status("h2")
    assert "red/b" not in h2["ports"] and h2["moves"]["departed"] == 1, h2
    assert h2["moves"]["handoff_written"] == 1
    assert not _conn(lab, "h2")
    # the handoff was taken: its key is gone
    from microseg.store import StoreClient
    from microseg.store import handoff as H

    client = StoreClient(lab.state["store"]["endpoint"])
    assert client.get(H.handoff_key("/microseg/v1/", "red/b")) is None
    # the same socket carries on
    for i in range(3):
        assert say(f"after{i}") == f"red/b:after{i}"
    # and new connections reach b on its new host
    assert lab.answers("red/a", "10.4.0.2", 7001, "fresh", DEADLINE) == "red/b:fresh"
    st = lab.state
    assert st["workloads"]["red/b"]["host"] == "h3" and "red/b" in st["hosts"]["h3"]["ports"]
    s.stdin.close()


def test_handoff_values_decode_or_say_why():
    """The handoff format: entries round-trip, the size is bounded, and a value that is not
    a handoff is refused with a clear error (never a traceback)."""
    import numpy as np

    from microseg.conntrack import kernels as KN
    from microseg.errors import InputError
    from microseg.store import handoff as H

    e = np.zeros(3, KN.ENTRY_DTYPE)
    e["sport"] = [1, 2, 3]
    e["deadline"] = [30, 10, 20]
    meta, back = H.decode(H.encode(e, workload="red/b", from_host="h2", to_host="h3"), "red/b")
    assert meta["from"] == "h2" and meta["count"] == 3 and (back == e).all()
    many = np.zeros(H.MAX_ENTRIES + 5, KN.ENTRY_DTYPE)
    many["deadline"] = np.arange(many.shape[0])
    value = H.encode(many, workload="red/b", from_host="h2", to_host="h3")
    meta, back = H.decode(value)
    assert meta["dropped"] == 5 and back.shape[0] == H.MAX_ENTRIES and back["deadline"].min() == 5
    assert len(value) < H.MAX_VALUE
    bad = {
        b"not json": "not JSON",
        b"[1]": "not a handoff",
        b'{"format": 2, "entries": ""}': "not a handoff",
        b'{"format": 1, "entries": "!!"}': "do not decode",
        b'{"format": 1, "entries": "aGVsbG8="}': "do not decode",
    }
    for v, why in bad.items():
        with pytest.raises(InputError, match=why):
            H.decode(v)
    with pytest.raises(InputError, match="not 'red/c'"):
        H.decode(H.encode(e, workload="red/b", from_host="h2", to_host="h3"), "red/c")
