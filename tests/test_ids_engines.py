"""The inspection engines without a lab: which one ``--ids auto`` picks (with and without
Suricata on the machine), rules the built-in matcher refuses, the built-in engine's
decisions on a judged batch (drop, alert, encrypted, packets), Suricata's bypass sids, and
what a blocked connection makes the agent cut (conntrack entry, kernel fast-path entry)."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import numpy as np
import pytest

from microseg.agent import ids as I
from microseg.agent.agent import Agent
from microseg.agent.kfast import KernelOffload, OffloadConfig, _Flow
from microseg.datapath import Datapath, DatapathConfig
from microseg.errors import InputError
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
      - {direction: ingress, ethertype: IPv4, protocol: tcp, port_range_min: 7000, port_range_max: 8999}
      - {direction: egress, ethertype: IPv4}
workloads:
  - {name: a, tenant: red, host: h1, mac: "02:00:00:01:00:01", ipv4: 10.1.0.1, security_groups: [svc]}
  - {name: b, tenant: red, host: h1, mac: "02:00:00:01:00:02", ipv4: 10.1.0.2, security_groups: [svc]}
"""
A_MAC, B_MAC = "02:00:00:01:00:01", "02:00:00:01:00:02"
RULES = """\
drop tcp any any -> any 7200 (msg:"blocked payload"; flow:established,to_server; content:"EVILPAYLOAD"; sid:1; rev:1;)
alert tcp any any -> any 7400 (msg:"marker"; flow:established,to_server; content:"MARKER"; sid:3; rev:1;)
"""
HTTP_RULE = 'alert http any any -> any any (msg:"http"; http.uri; content:"/x"; sid:9;)\n'
T0 = 1_700_000_000 * 10**9


@pytest.fixture
def red(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(POLICY)
    return compile_policy(load_policy(str(p)))


@pytest.fixture
def rules(tmp_path):
    p = tmp_path / "r.rules"
    p.write_text(RULES)
    return str(p)


def _conn(dport, payloads, sport=41000, tls=False):
    """A connection's frames: handshake, then each payload from a (echoed back by b)."""
    a, b = ("10.1.0.1", sport), ("10.1.0.2", dport)
    c, s = 1000, 5000

    def fwd(fl, sq, ak, p=b""):
        return PB.tcp_packet(
            a[0], b[0], a[1], b[1], p, flags=fl, seq=sq, ack=ak, eth_src=A_MAC, eth_dst=B_MAC
        )

    def rev(fl, sq, ak, p=b""):
        return PB.tcp_packet(
            b[0], a[0], b[1], a[1], p, flags=fl, seq=sq, ack=ak, eth_src=B_MAC, eth_dst=A_MAC
        )

    out = [fwd("S", c, 0), rev("SA", s, c + 1), fwd("A", c + 1, s + 1)]
    c, s = c + 1, s + 1
    for p in payloads:
        out += [fwd("PA", c, s, p), rev("PA", s, c + len(p), p)]
        c, s = c + len(p), s + len(p)
    return out


def _judge(red, frames):
    dp = Datapath(red, DatapathConfig())
    b = Batch.from_packets(frames, ts=np.arange(len(frames), dtype=np.int64) * 1000 + T0)
    b = encap(b, "vxlan", 7001, "198.18.0.1", "198.18.0.1")
    res = dp.process(b)
    assert (res.verdict == 1).all(), res.reason
    return dp, b, res


def _tls_record(n=40):
    body = b"\x01" + (n - 4).to_bytes(3, "big") + bytes(n - 4)  # a ClientHello's shape
    return b"\x16\x03\x01" + len(body).to_bytes(2, "big") + body


# -- which engine ---------------------------------------------------------------------------------
def test_auto_without_suricata_runs_the_builtin_matcher(monkeypatch, rules, tmp_path):
    monkeypatch.setattr(I.shutil, "which", lambda name, *a, **k: None)
    eng = I.make("auto", rules, 16, str(tmp_path), "h1", None, [7001])
    assert isinstance(eng, I.BuiltinIds) and eng.engine == "builtin" and eng.active
    st = eng.status()
    assert st["engine"] == "builtin" and "suricata is not installed" in st["note"]
    assert st["signatures"] == 2 and st["ready"]


def test_auto_with_suricata_runs_suricata(monkeypatch, rules, tmp_path):
    monkeypatch.setattr(I, "suricata_version", lambda binary=None: "7.0.10")
    eng = I.make("auto", rules, 16, str(tmp_path), "h1", None, [7001])
    assert isinstance(eng, I.SuricataIds) and eng.engine == "suricata 7.0.10"
    assert eng.status()["note"] == "--ids auto: suricata 7.0.10 is installed"


def test_suricata_asked_for_but_missing_inspects_nothing_and_says_so(monkeypatch, rules, tmp_path):
    monkeypatch.setattr(I.shutil, "which", lambda name, *a, **k: None)
    eng = I.make("suricata", rules, 16, str(tmp_path), "h1", None, [7001])
    assert eng.engine == "none" and not eng.active and "not installed" in eng.status()["note"]


def test_unknown_engine_is_refused(rules, tmp_path):
    with pytest.raises(ValueError, match="--ids must be one of"):
        I.make("snort", rules, 16, str(tmp_path), "h1", None, [7001])


def test_rules_the_builtin_matcher_refuses_name_file_and_line(tmp_path):
    p = tmp_path / "http.rules"
    p.write_text("# one comment\n" + HTTP_RULE)
    with pytest.raises(InputError) as ei:
        I.make("builtin", str(p), 16, str(tmp_path), "h1", None, [7001])
    text = str(ei.value)
    assert "http.rules" in text and ":2" in text, text


@pytest.mark.skipif(os.geteuid() != 0, reason="lab up needs root")
def test_lab_up_refuses_such_rules_before_making_anything(tmp_path):
    p = tmp_path / "http.rules"
    p.write_text(HTTP_RULE)
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY)
    state = tmp_path / "state"
    r = subprocess.run(
        [sys.executable, "-m", "microseg", "lab", "up", "--policy", str(pol), "--state-dir", str(state)]
        + ["--prefix", "msrefuse", "--ids", "builtin", "--ids-rules", str(p)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert "--ids builtin: the built-in matcher refuses the rules" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not (state / "state.json").exists()
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "msrefuse" not in ns


# -- the built-in engine's decisions ------------------------------------------------------------
def test_builtin_drop_blocks_the_flow_and_ends_its_inspection(red, rules):
    frames = _conn(7200, [b"hello", b"xx EVILPAYLOAD xx", b"after"])
    dp, b, res = _judge(red, frames)
    eng = I.BuiltinIds(rules, 16)
    keep = eng.divert(b, res.keys, np.arange(len(b)), res.ct)
    # the packet with the payload is dropped, and every later one of the connection
    assert keep.tolist() == [True] * 5 + [False] * 4
    assert eng.counts["ended_drop"] == 1 and eng.counts["ids_drop"] == 1 and eng.counts["ids_blocked"] == 3
    assert len(eng.blocked) == 1
    (f,) = eng.blocked
    assert eng.hits == {f}
    ((ef, ident, reason, n),) = eng.ended
    assert ef == f and reason == "drop" and n == 6
    assert ident[6:] == (41000, 7200)  # the original direction: a's port, then b's
    alerts = [r for r in eng.events if r["event"] == "ids"]
    assert [(r["sid"], r["action"], r["sport"], r["dport"]) for r in alerts] == [(1, "blocked", 41000, 7200)]
    end = [r for r in eng.events if r["event"] == "ids_end"]
    assert end[0]["reason"] == "drop" and (end[0]["src"], end[0]["dst"]) == ("10.1.0.1", "10.1.0.2")


def test_builtin_alert_is_logged_and_the_flow_goes_on(red, rules):
    dp, b, res = _judge(red, _conn(7400, [b"a MARKER b", b"next"]))
    eng = I.BuiltinIds(rules, 16)
    assert eng.divert(b, res.keys, np.arange(len(b)), res.ct).all()
    assert eng.counts["alerts"] == 1 and eng.ended == [] and not eng.blocked
    (a,) = [r for r in eng.events if r["event"] == "ids"]
    assert a["sid"] == 3 and a["action"] == "allowed" and a["msg"] == "marker"


def test_builtin_tls_ends_as_encrypted_at_its_first_record(red, rules):
    dp, b, res = _judge(red, _conn(8443, [_tls_record(), b"\x17\x03\x03\x00\x05abcde"] * 3))
    eng = I.BuiltinIds(rules, 16)
    assert eng.divert(b, res.keys, np.arange(len(b)), res.ct).all()
    ((_f, _ident, reason, n),) = eng.ended
    assert reason == "encrypted" and n == 4  # handshake, then the first TLS record
    assert eng.counts["packets_to_ids"] == 4


def test_builtin_plain_flow_ends_after_n_packets_both_directions(red, rules):
    dp, b, res = _judge(red, _conn(7500, [b"p%d" % i for i in range(10)]))
    eng = I.BuiltinIds(rules, 8)
    eng.divert(b, res.keys, np.arange(len(b)), res.ct)
    ((_f, _i, reason, n),) = eng.ended
    assert reason == "packets" and n == 8 and eng.counts["packets_to_ids"] == 8
    assert eng.counts["left_ids"] == 1


def test_suricata_eve_records_end_inspection(tmp_path, rules, monkeypatch):
    """tls / ssh records and alerts of bypass rules end a connection's inspection; a
    ``blocked`` alert blocks it (the eve records as Suricata 7 writes them)."""
    monkeypatch.setattr(I, "suricata_version", lambda binary=None: "7.0.10")
    p = tmp_path / "s.rules"
    p.write_text(
        RULES
        + 'alert tcp any any -> any 7300 (msg:"enough"; content:"BYPASSME"; bypass; sid:2;)\n'
        + 'alert tcp any any -> any 7301 (msg:"not bypass"; content:"bypass;x"; sid:4;)\n'
    )
    eng = I.SuricataIds(str(p), 16, str(tmp_path), "h1", None, [7001])
    assert eng.bypass_sids == {2}
    eve = tmp_path / "eve.json"
    eve.write_text("")
    eng._eve = open(eve, "rb")

    def flow(sport, dport):
        a = (*I._ip_key("10.1.0.1"), sport)
        b = (*I._ip_key("10.1.0.2"), dport)
        f = I._flow(7001, 6, a, b)
        eng._seen[f] = [3, (7001, 6, a[0], a[1], b[0], b[1], sport, dport), None]
        return f

    f_tls, f_byp, f_drop = flow(40001, 8443), flow(40002, 7300), flow(40003, 7200)
    base = '"src_ip":"10.1.0.1","dest_ip":"10.1.0.2","proto":"TCP","vlan":[1]'
    with open(eve, "a") as out:
        out.write(
            '{"event_type":"tls","src_port":40001,"dest_port":8443,%s,"tls":{"version":"TLS 1.3"}}\n' % base
        )
        out.write('{"event_type":"alert","src_port":40002,"dest_port":7300,%s,' % base)
        out.write('"alert":{"action":"allowed","signature_id":2,"rev":1,"signature":"enough"}}\n')
        out.write('{"event_type":"alert","src_port":40003,"dest_port":7200,%s,' % base)
        out.write('"alert":{"action":"blocked","signature_id":1,"rev":1,"signature":"blocked payload"}}\n')
    eng._read_eve()
    got = {f: reason for f, _i, reason, _n in eng.ended}
    assert got == {f_tls: "encrypted", f_byp: "bypass", f_drop: "drop"}
    assert set(eng.blocked) == {f_drop}
    assert eng.counts["ended_encrypted"] == eng.counts["ended_bypass"] == eng.counts["ended_drop"] == 1
    eng._eve.close()


# -- what a block cuts --------------------------------------------------------------------------
class _FakeMap:
    def __init__(self):
        self.removed = []

    def remove(self, key):
        self.removed.append(key)
        return None


def test_kfast_offer_now_and_withhold(red):
    dp, b, res = _judge(red, _conn(7200, [b"x"]))
    agent = types.SimpleNamespace(dp=dp)
    kf = KernelOffload(agent, OffloadConfig(after_packets=18))
    ident = (7001, 6, 0, 1, 0, 2, 41000, 7200)
    kf.offer_now(ident)
    assert ident not in kf._count  # no fast path: nothing to offer
    kf.fp = _FakeMap()
    kf.offer_now(ident)
    assert kf._count[ident] == 17  # the next established packet offloads it
    e = int(dp.conntrack.used()[0])
    kf.flows[ident] = _Flow([("k0", 0), ("k1", 1)], e, ident)
    assert kf.withhold(ident) is True
    assert kf.fp.removed == ["k0", "k1"] and ident not in kf.flows
    assert kf.counters["removed_blocked"] == 1
    kf.offer_now(ident)  # blocked: never offered again
    assert kf._count[ident] < 0
    assert kf.withhold(ident) is False


def test_ids_cut_deletes_the_connections_both_ways_and_only_them(red):
    frames = (
        _conn(7200, [b"x"], sport=41000) + _conn(7200, [b"y"], sport=41001) + _conn(7300, [b"z"], sport=41002)
    )
    dp, b, res = _judge(red, frames)
    t = dp.conntrack
    assert len(t) == 3
    kf = KernelOffload(types.SimpleNamespace(dp=dp), OffloadConfig())
    kf.fp = _FakeMap()
    eng = I.BuiltinIds.__new__(I.BuiltinIds)
    I._Inspection.__init__(eng, 16)
    fake = types.SimpleNamespace(kfast=kf, dp=dp, ids=eng)
    a = (*I._ip_key("10.1.0.2"), 7200)  # given from the reply side: the key has no direction
    z = (*I._ip_key("10.1.0.1"), 41000)
    c = (*I._ip_key("10.1.0.1"), 41002)
    d = (*I._ip_key("10.1.0.2"), 7300)
    other_zone = I._flow(7002, 6, (*I._ip_key("10.1.0.1"), 41001), a)
    assert Agent._ids_cut(fake, [I._flow(7001, 6, a, z), I._flow(7001, 6, c, d), other_zone]) == 2
    left = t.entries()
    assert len(left) == 1 and int(left[0]["sport"]) == 41001
    assert eng.counts["cut_connections"] == 2
    assert all(v < 0 for v in kf._count.values()) and len(kf._count) == 6  # withheld both ways
    assert Agent._ids_cut(fake, []) == 0


def test_a_late_block_is_cut_also_after_inspection_ended(tmp_path, rules, monkeypatch):
    """Suricata's alert of a drop rule may arrive after the connection left inspection (and
    went to the kernel fast path): it is still handed to the agent to cut."""
    monkeypatch.setattr(I, "suricata_version", lambda binary=None: "7.0.10")
    eng = I.SuricataIds(rules, 16, str(tmp_path), "h1", None, [7001])
    a = (*I._ip_key("10.1.0.1"), 40003)
    b = (*I._ip_key("10.1.0.2"), 7200)
    f = I._flow(7001, 6, a, b)
    eng._seen[f] = [16, (7001, 6, a[0], a[1], b[0], b[1], 40003, 7200), "packets"]
    eng._alert(
        {
            "src_ip": "10.1.0.1",
            "dest_ip": "10.1.0.2",
            "src_port": 40003,
            "dest_port": 7200,
            "proto": "TCP",
            "vlan": [1],
            "alert": {"action": "blocked", "signature_id": 1},
        }
    )
    assert f in eng.blocked and eng.hits == {f}
    assert eng.counts["ended_drop"] == 0 and eng.ended == []  # its inspection had ended already


def test_metrics_name_the_engine_and_why_inspection_ended(red, rules):
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from microseg.agent.flowlog import FlowLog
    from microseg.agent.metrics import DatapathCollector

    dp, b, res = _judge(
        red, _conn(7200, [b"EVILPAYLOAD"]) + _conn(7500, [b"p%d" % i for i in range(9)], sport=41001)
    )
    eng = I.BuiltinIds(rules, 8, "--ids builtin")
    eng.divert(b, res.keys, np.arange(len(b)), res.ct)
    fl = FlowLog(sink=lambda rec: None)
    fl.lines, fl.timeouts, fl.timeouts_unlogged = 7, 3, 1
    agent = types.SimpleNamespace(ids=eng, flowlog=fl)

    class One:
        def collect(self):
            yield from DatapathCollector._ids(agent)

    reg = CollectorRegistry()
    reg.register(One())
    got = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            got[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert got[("microseg_ids_engine", (("engine", "builtin"), ("note", "--ids builtin")))] == 1
    ended = {dict(k[1])["reason"]: v for k, v in got.items() if k[0] == "microseg_ids_inspection_ended_total"}
    assert ended == {"packets": 1, "bypass": 0, "encrypted": 0, "drop": 1}
    assert got[("microseg_ids_events_total", (("event", "ids_drop"),))] == 1
    assert got[("microseg_ids_blocked_flows", ())] == 1
    assert got[("microseg_flow_log_lines_total", ())] == 7
    assert got[("microseg_flow_log_timeouts_total", (("logged", "yes"),))] == 3
    assert got[("microseg_flow_log_timeouts_total", (("logged", "no"),))] == 1


def test_the_live_suricata_tests_skip_with_a_reason_without_suricata(monkeypatch):
    import shutil

    import test_lab_ids
    import test_lab_ids_decisions

    real = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda name, *a, **k: None if name == "suricata" else real(name, *a, **k)
    )
    for mod in (test_lab_ids, test_lab_ids_decisions):
        reason = mod._reason()
        assert reason is not None and "suricata is not installed" in reason or os.geteuid() != 0, reason


def test_the_agent_refuses_such_rules_at_start_with_a_clear_error(tmp_path):
    p = tmp_path / "http.rules"
    p.write_text(HTTP_RULE)
    closed = []
    fake = types.SimpleNamespace(close=lambda: closed.append(1), host="h1", ids=None)
    model = types.SimpleNamespace(tenants=[types.SimpleNamespace(vni=7001)])
    with pytest.raises(
        InputError, match=r"--ids builtin: the built-in matcher refuses the rules: .*http.rules:1"
    ):
        Agent._ids_start(fake, "builtin", str(p), 16, str(tmp_path), None, model)
    assert closed == [1]
    with pytest.raises(InputError, match="--ids auto needs --ids-rules"):
        Agent._ids_start(fake, "auto", None, 16, str(tmp_path), None, model)


def test_suricata_down_drops_and_does_not_count_towards_n(red, rules, tmp_path, monkeypatch):
    """Fail closed: while Suricata is not ready, frames under inspection are dropped and do not
    count towards N -- a connection never leaves the inspected path uninspected."""
    monkeypatch.setattr(I, "suricata_version", lambda binary=None: "7.0.10")
    eng = I.SuricataIds(rules, 4, str(tmp_path), "h1", None, [7001])
    assert eng.active and not eng.ready
    dp, b, res = _judge(red, _conn(7500, [b"p%d" % i for i in range(5)]))
    keep = eng.divert(b, res.keys, np.arange(len(b)), res.ct)
    assert not keep.any()  # 13 frames, every one dropped, not only the first 4
    assert eng.counts["fail_closed"] == len(b) and eng.ended == []
    assert all(st[0] == 0 for st in eng._seen.values())


class _RecordingMap(_FakeMap):
    def __init__(self):
        super().__init__()
        self.installed = []

    def install(self, key, action):
        self.installed.append((key, action))


def test_a_connection_inspection_is_done_with_is_offloaded_at_its_next_packet(red):
    """offer_now: the kernel fast path takes the connection at its next established packet,
    long before its after_packets (a stand-in for the kernel map records the entries)."""
    dp = Datapath(red, DatapathConfig())
    frames = _conn(7200, [b"one", b"two", b"three"])
    t = [T0 + 1000 * i for i in range(len(frames))]

    def run(part, ts):
        b = encap(
            Batch.from_packets(part, ts=np.asarray(ts, np.int64)), "vxlan", 7001, "198.18.0.1", "198.18.0.1"
        )
        res = dp.process(b)
        assert (res.verdict == 1).all()
        kf.observe(b, res)

    port = lambda i, mac: types.SimpleNamespace(  # noqa: E731
        index=i, port=types.SimpleNamespace(ifindex=10 + i, mtu=1500), mac=mac
    )
    agent = types.SimpleNamespace(
        dp=dp,
        _w_host=np.array([0, 0]),
        _me=0,
        _h_esp=np.array([False]),
        model=types.SimpleNamespace(workloads=list(red.policy.workloads)),
        wports=[port(0, 0x020000010001), port(1, 0x020000010002)],
    )
    kf = KernelOffload(agent, OffloadConfig(after_packets=18))
    kf.fp = _RecordingMap()
    run(frames[:7], t[:7])  # handshake and two echoes: 5 established packets
    assert kf.counters["offloaded"] == 0 and not kf.fp.installed
    ident = (7001, 6, *I._ip_key("10.1.0.1"), *I._ip_key("10.1.0.2"), 41000, 7200)
    assert kf._count[ident] == 5
    kf.offer_now(ident)
    run(frames[7:8], t[7:8])  # the next one
    assert kf.counters["offloaded"] == 1 and ident in kf.flows
    assert sorted(k.port for k, _a in kf.fp.installed) == [10, 11]  # both directions, local
    assert {a.kind for _k, a in kf.fp.installed} == {"local"}
