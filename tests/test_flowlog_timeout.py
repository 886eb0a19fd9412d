"""Flow-log lines for connections conntrack's idle timeout removes (``FlowLog.expire``): a
small conntrack table, packets with chosen timestamps, and the sweep's clock given by hand."""

from __future__ import annotations

import numpy as np
import pytest

from microseg.agent.flowlog import FlowLog
from microseg.datapath import Datapath, DatapathConfig
from microseg.overlay import encap
from microseg.packet import build as PB
from microseg.packet.batch import Batch
from microseg.policy.compiler import compile_policy
from microseg.policy.model import load_policy

POLICY = """\
version: 1
default_egress: deny
deny_action: drop
tenants:
  - {name: red, vni: 7001}
hosts:
  - {name: h1, address: 198.18.0.1}
security_groups:
  - name: svc
    tenant: red
    rules:
      - {direction: ingress, ethertype: IPv4, protocol: tcp, port_range_min: 7000, port_range_max: 7999}
      - {direction: ingress, ethertype: IPv4, protocol: udp, port_range_min: 53, port_range_max: 53}
      - {direction: egress, ethertype: IPv4}
workloads:
  - {name: a, tenant: red, host: h1, mac: "02:00:00:01:00:01", ipv4: 10.1.0.1, security_groups: [svc]}
  - {name: b, tenant: red, host: h1, mac: "02:00:00:01:00:02", ipv4: 10.1.0.2, security_groups: [svc]}
"""
A_MAC, B_MAC = "02:00:00:01:00:01", "02:00:00:01:00:02"
T0 = 1_700_000_000 * 10**9
S = 10**9
TIMEOUTS = {"tcp_established": 50, "udp": 20, "tcp_time_wait": 5}


@pytest.fixture
def red(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(POLICY)
    return compile_policy(load_policy(str(p)))


def _batch(frames, t):
    b = Batch.from_packets(frames, ts=np.arange(len(frames), dtype=np.int64) * 1000 + t)
    return encap(b, "vxlan", 7001, "198.18.0.1", "198.18.0.1")


def _tcp(fwd, flags, seq, ack, payload=b"", sport=41000):
    a, b = ("10.1.0.1", sport), ("10.1.0.2", 7000)
    if fwd:
        return PB.tcp_packet(
            a[0], b[0], a[1], b[1], payload, flags=flags, seq=seq, ack=ack, eth_src=A_MAC, eth_dst=B_MAC
        )
    return PB.tcp_packet(
        b[0], a[0], b[1], a[1], payload, flags=flags, seq=seq, ack=ack, eth_src=B_MAC, eth_dst=A_MAC
    )


def _udp(payload=b"q"):
    return PB.udp_packet("10.1.0.1", "10.1.0.2", 5555, 53, payload, eth_src=A_MAC, eth_dst=B_MAC)


def _established(sport=41000):
    c, s = 1000, 5000
    return [
        _tcp(True, "S", c, 0, sport=sport),
        _tcp(False, "SA", s, c + 1, sport=sport),
        _tcp(True, "A", c + 1, s + 1, sport=sport),
        _tcp(True, "PA", c + 1, s + 1, b"hello", sport=sport),
        _tcp(False, "PA", s + 1, c + 6, b"world!!", sport=sport),
    ]


def _dp(red, capacity=64, budget=0):
    dp = Datapath(red, DatapathConfig(conntrack_capacity=capacity, conntrack_timeouts=TIMEOUTS))
    dp.conntrack.expire_budget = budget  # as the agent runs it with a flow log: no sweep in a batch
    return dp


def _run(dp, fl, frames, t):
    b = _batch(frames, t)
    r = dp.process(b)
    assert (r.verdict == 1).all(), r.reason
    fl.observe(b, r.keys, r, dp)
    return r


def test_idle_connections_get_a_timeout_end_line_with_their_bytes(red):
    dp = _dp(red)
    out: list = []
    fl = FlowLog(sink=out.append)
    _run(dp, fl, [*_established(), _udp(b"query"), _udp(b"more")], T0)
    t = dp.conntrack
    assert len(t) == 2
    before = {int(e["proto"]): (int(e["bytes"][0]), int(e["bytes"][1])) for e in t.entries()}
    # not yet idle long enough: nothing removed, nothing written
    assert fl.expire(t, T0 + 10 * S, 64, dp.policy) == 0
    assert out == [] and len(t) == 2
    # past the UDP timeout (20 s), not the TCP one (50 s)
    assert fl.expire(t, T0 + 21 * S, 64, dp.policy) == 1
    assert len(out) == 1 and len(t) == 1
    u = out[0]
    assert u["event"] == "end" and u["close"] == "timeout" and u["reason"] == "timeout"
    assert u["proto"] == "udp" and u["tenant"] == "red" and u["vni"] == 7001
    assert (u["src"], u["sport"], u["dst"], u["dport"]) == ("10.1.0.1", 5555, "10.1.0.2", 53)
    assert (u["src_workload"], u["dst_workload"]) == ("red/a", "red/b")
    assert (u["bytes_orig"], u["bytes_reply"]) == before[17] and u["bytes_orig"] > 0
    assert u["tcp_state"] is None and u["ts_ns"] == T0 + 21 * S
    # and the TCP one at 50 s, in the state it expired in, its bytes each way
    assert fl.expire(t, T0 + 51 * S, 64, dp.policy) == 1
    tc = out[1]
    assert tc["proto"] == "tcp" and tc["close"] == "timeout" and tc["tcp_state"] == "ESTABLISHED"
    assert (tc["bytes_orig"], tc["bytes_reply"]) == before[6]
    assert before[6][0] > 0 and before[6][1] > 0
    assert len(t) == 0 and fl.timeouts == 2 and fl.timeouts_unlogged == 0


def test_bytes_read_back_into_the_entry_are_the_lines_bytes(red):
    """A connection the kernel fast path carried: its counters are read back into the
    conntrack entry (bytes, deadline), and the timeout line reports those."""
    dp = _dp(red)
    out: list = []
    fl = FlowLog(sink=out.append)
    _run(dp, fl, _established(), T0)
    t = dp.conntrack
    e = int(t.used()[0])
    t.ents["bytes"][e, 0] += np.uint64(1_000_000)  # what the kernel carried, as kfast adds it
    t.ents["bytes"][e, 1] += np.uint64(2_000_000)
    t.ents["deadline"][e] += np.int64(30 * S)  # its last packet 30 s later
    want = (int(t.ents["bytes"][e, 0]), int(t.ents["bytes"][e, 1]))
    assert fl.expire(t, T0 + 51 * S, 64, dp.policy) == 0  # kept alive by the read-back
    assert fl.expire(t, T0 + 81 * S, 64, dp.policy) == 1
    assert (out[0]["bytes_orig"], out[0]["bytes_reply"]) == want


def test_a_closed_connection_is_not_logged_again_when_its_entry_expires(red):
    dp = _dp(red)
    out: list = []
    fl = FlowLog(sink=out.append)
    c, s = 1000, 5000
    _run(dp, fl, _established(), T0)
    _run(
        dp,
        fl,
        [_tcp(True, "FA", c + 6, s + 8), _tcp(False, "FA", s + 8, c + 7), _tcp(True, "A", c + 7, s + 9)],
        T0 + S,
    )
    assert [r["close"] for r in out] == ["fin"]
    t = dp.conntrack
    assert len(t) == 1  # TIME_WAIT
    assert fl.expire(t, T0 + 60 * S, 64, dp.policy) == 1
    assert [r["close"] for r in out] == ["fin"] and len(t) == 0 and fl.timeouts == 0


def test_the_sweep_visits_its_budget_round_robin_and_logs_exactly_what_it_removes(red):
    dp = _dp(red, capacity=64)
    out: list = []
    fl = FlowLog(sink=out.append)
    frames = []
    for i in range(20):
        frames += _established(sport=42000 + i)[:3]
    _run(dp, fl, frames, T0)
    t = dp.conntrack
    assert len(t) == 20
    removed = 0
    for _ in range(16):  # 16 sweeps of 8 entries: twice round the 64 entries
        n = fl.expire(t, T0 + 51 * S, 8, dp.policy)
        assert n == len(out) - removed  # a line for each entry removed, no more, no fewer
        removed += n
    assert removed == 20 and len(t) == 0
    assert sorted(r["sport"] for r in out) == list(range(42000, 42020))


def test_an_entry_removed_elsewhere_is_counted_unlogged(red):
    dp = _dp(red)
    out: list = []
    fl = FlowLog(sink=out.append)
    _run(dp, fl, [_udp()], T0)
    t = dp.conntrack
    assert fl.expire(t, T0 + S, 64, dp.policy) == 0
    # the next packet of the same tuple comes after the deadline: conntrack replaces the entry
    # on the way, before any sweep saw it expired
    _run(dp, fl, [_udp()], T0 + 30 * S)
    assert t.counters["expired"] == 1 and len(t) == 1
    fl.expire(t, T0 + 31 * S, 64, dp.policy)
    assert out == [] and fl.timeouts_unlogged == 1


def test_the_agent_takes_the_sweep_out_of_the_batch_and_runs_it_on_its_clock(red, monkeypatch):
    import time
    import types

    from microseg.agent.agent import Agent

    dp = Datapath(red, DatapathConfig(conntrack_capacity=64, conntrack_timeouts=TIMEOUTS))
    t = dp.conntrack
    budget = t.expire_budget
    assert budget > 0
    out: list = []
    fl = FlowLog(sink=out.append)
    _run(dp, fl, [_udp()], T0)
    fake = types.SimpleNamespace(dp=dp, flowlog=fl, _ct_budget=None, _next_expire=0.0, EXPIRE_INTERVAL_S=0.25)
    monkeypatch.setattr(time, "time_ns", lambda: T0 + 5 * S)
    Agent._expire_logged(fake)
    assert t.expire_budget == 0 and fake._ct_budget == budget  # no sweep inside a batch now
    assert out == [] and len(t) == 1
    monkeypatch.setattr(time, "time_ns", lambda: T0 + 21 * S)
    Agent._expire_logged(fake)  # within its interval: nothing
    assert out == []
    fake._next_expire = 0.0
    Agent._expire_logged(fake)
    assert [r["close"] for r in out] == ["timeout"] and len(t) == 0
    # a later batch of packets past every deadline sweeps nothing by itself
    _run(dp, fl, [_udp(b"again")], T0 + 22 * S)
    assert len(t) == 1
    _run(dp, fl, _established(sport=43000)[:3], T0 + 100 * S)
    assert len(t) == 2  # the UDP entry (expired at T0 + 42 s) is left for the agent's sweep
