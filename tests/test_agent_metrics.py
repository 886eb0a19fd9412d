"""The agent's observability: Prometheus metrics read from the datapath's counters, JSON flow
logs derived per batch, and (with root and network namespaces) a live agent's endpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from livelab import netns_skip_reason, wait_for
from microseg.agent.flowlog import FlowLog
from microseg.agent.metrics import (
    BatchObserver,
    DatapathCollector,
    MetricsServer,
    parse_address,
    registry_for,
    scrape_unix,
)
from microseg.datapath import Datapath, DatapathConfig
from microseg.errors import InputError
from microseg.io.generator import generate, load_policy
from microseg.io.scenario import ScenarioConfig
from microseg.overlay import encap
from microseg.packet import build as PB
from microseg.packet.batch import Batch
from microseg.policy.compiler import compile_policy
from microseg.policy.model import load_policy as load_policy_file

_NOT_YET = (OSError, ValueError, KeyError)  # the agent still starting

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
      - {direction: egress, ethertype: IPv4}
workloads:
  - {name: a, tenant: red, host: h1, mac: "02:00:00:01:00:01", ipv4: 10.1.0.1, security_groups: [svc]}
  - {name: b, tenant: red, host: h1, mac: "02:00:00:01:00:02", ipv4: 10.1.0.2, security_groups: [svc]}
"""
A_MAC, B_MAC = "02:00:00:01:00:01", "02:00:00:01:00:02"


def _samples(text: str) -> dict:
    """{(name, frozenset(labels)): value} of an exposition."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _by(samples: dict, name: str, label: str, **fixed) -> dict:
    out = {}
    for (n, labels), v in samples.items():
        d = dict(labels)
        if n == name and all(d.get(k) == x for k, x in fixed.items()):
            out[d[label]] = int(v)
    return out


@pytest.fixture(scope="module")
def generated():
    policy = load_policy()
    return compile_policy(policy), generate(policy, ScenarioConfig(flows=300, seed=11))


def test_exposition_equals_datapath_stats(generated):
    compiled, gen = generated
    dp = Datapath(compiled, DatapathConfig())
    obs = BatchObserver()
    batch = gen.batch
    for s in range(0, len(batch), 2048):
        part = batch.slice(s, min(s + 2048, len(batch)))
        t0 = time.perf_counter()
        res = dp.process(part)
        obs.observe(part, res, time.perf_counter() - t0)
    dp.swap_policy(compile_policy(compiled.policy))  # one swap, counted
    st = dp.stats()
    text = generate_latest(registry_for(DatapathCollector(dp, observer=obs))).decode()
    m = _samples(text)

    assert _by(m, "microseg_packets_total", "verdict") == st["verdicts"]
    assert sum(_by(m, "microseg_bytes_total", "verdict").values()) == st["bytes"]
    assert m[("microseg_datapath_packets_total", frozenset())] == st["packets"] == len(batch)
    assert _by(m, "microseg_reason_packets_total", "reason") == st["reasons"]
    drops = _by(m, "microseg_drops_total", "reason", source="datapath")
    assert sum(drops.values()) == len(batch) - st["verdicts"].get("allow", 0)
    assert _by(m, "microseg_level_packets_total", "level") == st["levels"]
    assert _by(m, "microseg_conntrack_state_packets_total", "state") == st["conntrack_states"]
    # per tenant: by VNI, as the stats name them
    tenants: dict = {}
    for (n, labels), v in m.items():
        d = dict(labels)
        if n == "microseg_tenant_packets_total":
            tenants.setdefault(d["vni"] or "other", {})[d["verdict"]] = int(v)
    assert tenants == {k: v for k, v in st["tenants"].items()} or not st["tenants"]
    # per workload (the swap restarted them: all zero, none exposed)
    for name, w in st["workloads"].items():
        for d in ("tx", "rx", "dropped"):
            key = ("microseg_workload_packets_total", frozenset({"workload": name, "direction": d}.items()))
            assert int(m.get(key, 0)) == w[d]
    assert m[("microseg_conntrack_entries", frozenset())] == st["conntrack"]["entries"] > 0
    for k, v in st["conntrack"].items():
        if k != "entries":
            assert m[("microseg_conntrack_events_total", frozenset({"event": k}.items()))] == v
    assert m[("microseg_policy_version", frozenset())] == st["policy"]["version"]
    assert m[("microseg_policy_swaps_total", frozenset())] == 1
    assert m[("microseg_revoked_connections_total", frozenset())] == st["revoked_connections"]
    assert m[("microseg_batch_seconds_count", frozenset())] == obs.batches
    assert ("microseg_batch_seconds_bucket", frozenset({"le": "+Inf"}.items())) in m


def test_per_workload_and_tenant_counters(generated):
    compiled, gen = generated
    dp = Datapath(compiled, DatapathConfig())
    dp.process(gen.batch)
    st = dp.stats()
    m = _samples(generate_latest(registry_for(DatapathCollector(dp))).decode())
    seen = 0
    for name, w in st["workloads"].items():
        got = _by(m, "microseg_workload_packets_total", "direction", workload=name)
        assert got == {d: w[d] for d in ("tx", "rx", "dropped") if w[d]}
        seen += sum(got.values())
    assert seen > 0
    tenants: dict = {}
    for (n, labels), v in m.items():
        d = dict(labels)
        if n == "microseg_tenant_packets_total":
            tenants.setdefault(d["vni"] or "other", {})[d["verdict"]] = int(v)
    assert tenants == st["tenants"]


def test_cache_offload_and_conntrack_state_metrics(generated):
    compiled, gen = generated
    dp = Datapath(compiled, DatapathConfig(caches=True, offload=True, offload_rate=1e6))
    dp.process(gen.batch)
    st = dp.stats()
    m = _samples(generate_latest(registry_for(DatapathCollector(dp))).decode())
    for cache, key in (("exact_match", "emc"), ("megaflow", "megaflow")):
        ev = _by(m, f"microseg_cache_{cache}_events_total", "event")
        assert ev["hits"] == st[key]["hits"] and ev["misses"] == st[key]["misses"]
        assert m[(f"microseg_cache_{cache}_entries", frozenset())] == st[key]["entries"]
    off = _by(m, "microseg_offload_events_total", "event")
    assert off["inserts"] == st["inspection"]["table"]["inserts"] > 0
    ins = _by(m, "microseg_inspection_events_total", "event")
    assert ins["inspected"] == st["inspection"]["inspected"]
    by_state = {
        dict(k)["proto"] + "/" + dict(k)["state"]: v
        for (n, k), v in m.items()
        if n == "microseg_conntrack_entries_by_state"
    }
    assert sum(by_state.values()) == st["conntrack"]["entries"] > 0
    assert any(k.startswith("tcp/") and not k.endswith("/-") for k in by_state)


def test_metrics_address_is_loopback_or_unix(tmp_path):
    assert parse_address("9464") == ("tcp", "127.0.0.1", 9464)
    assert parse_address("127.0.0.1:0") == ("tcp", "127.0.0.1", 0)
    assert parse_address("[::1]:9464") == ("tcp", "::1", 9464)
    assert parse_address(f"unix:{tmp_path}/m.sock") == ("unix", f"{tmp_path}/m.sock")
    for bad in ("0.0.0.0:9464", "10.0.0.1:80", "[::]:1", "example.org:80", "x"):
        with pytest.raises(InputError):
            parse_address(bad)


def test_served_over_tcp_and_unix(tmp_path, generated):
    import urllib.request

    compiled, gen = generated
    dp = Datapath(compiled, DatapathConfig())
    dp.process(gen.batch.slice(0, 500))
    reg = registry_for(DatapathCollector(dp))
    for addr in ("127.0.0.1:0", f"unix:{tmp_path}/metrics.sock"):
        srv = MetricsServer(addr, reg)
        try:
            if srv.path:
                assert os.stat(srv.path).st_mode & 0o777 == 0o600
                text = scrape_unix(srv.path)
            else:
                with urllib.request.urlopen(srv.url, timeout=10) as r:
                    text = r.read().decode()
            m = _samples(text)
            assert m[("microseg_datapath_packets_total", frozenset())] == 500
        finally:
            srv.close()
        assert not srv.path or not os.path.exists(srv.path)


# -- flow logs -------------------------------------------------------------------------------------
def _tunnelled(frames, t0):
    b = Batch.from_packets(frames, ts=np.arange(len(frames), dtype=np.int64) * 1000 + t0)
    return encap(b, "vxlan", 7001, "198.18.0.1", "198.18.0.1")


def _tcp(src, dst, sport, dport, flags, seq, ack, payload=b"", smac=A_MAC, dmac=B_MAC):
    return PB.tcp_packet(
        src, dst, sport, dport, payload, flags=flags, seq=seq, ack=ack, eth_src=smac, eth_dst=dmac
    )


@pytest.fixture
def red(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(POLICY)
    return compile_policy(load_policy_file(str(p)))


def test_flow_log_denied_syn_one_line(red, tmp_path):
    dp = Datapath(red, DatapathConfig())
    path = tmp_path / "flows.jsonl"
    fl = FlowLog(str(path))
    b = _tunnelled([_tcp("10.1.0.1", "10.1.0.2", 40000, 8080, "S", 100, 0)], 1_700_000_000 * 10**9)
    res = dp.process(b)
    fl.observe(b, res.keys, res, dp)
    fl.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["event"] == "denied" and rec["verdict"] == "drop"
    assert rec["reason"] == "ingress_denied"
    assert rec["tenant"] == "red" and rec["vni"] == 7001 and rec["proto"] == "tcp"
    assert (rec["src"], rec["sport"], rec["dst"], rec["dport"]) == ("10.1.0.1", 40000, "10.1.0.2", 8080)
    assert (rec["src_workload"], rec["dst_workload"]) == ("red/a", "red/b")
    assert rec["time"].startswith("2023-11-14T")
    assert "payload" not in rec and "key" not in rec


def test_flow_log_closed_connection_both_directions(red):
    dp = Datapath(red, DatapathConfig())
    out: list = []
    fl = FlowLog(sink=out.append)
    a, b = ("10.1.0.1", 41000), ("10.1.0.2", 7000)
    c, s = 1000, 5000  # initial sequence numbers
    fwd = lambda fl_, sq, ak, p=b"": _tcp(a[0], b[0], a[1], b[1], fl_, sq, ak, p)  # noqa: E731
    rev = lambda fl_, sq, ak, p=b"": _tcp(b[0], a[0], b[1], a[1], fl_, sq, ak, p, B_MAC, A_MAC)  # noqa: E731
    frames = [
        fwd("S", c, 0),
        rev("SA", s, c + 1),
        fwd("A", c + 1, s + 1),
        fwd("PA", c + 1, s + 1, b"hello"),
        rev("PA", s + 1, c + 6, b"world!!"),
        fwd("FA", c + 6, s + 8),
        rev("A", s + 8, c + 7),
    ]
    t0 = 1_700_000_000 * 10**9
    b1 = _tunnelled(frames, t0)
    r1 = dp.process(b1)
    assert (r1.verdict == 1).all(), r1.reason
    fl.observe(b1, r1.keys, r1, dp)
    assert out == []  # one FIN: not closed yet
    b2 = _tunnelled([rev("FA", s + 8, c + 7), fwd("A", c + 7, s + 9)], t0 + 10**6)
    r2 = dp.process(b2)
    assert (r2.verdict == 1).all()
    fl.observe(b2, r2.keys, r2, dp)
    b3 = _tunnelled([rev("FA", s + 8, c + 7)], t0 + 2 * 10**6)  # a retransmitted FIN: no new line
    r3 = dp.process(b3)
    fl.observe(b3, r3.keys, r3, dp)
    assert len(out) == 1
    rec = out[0]
    assert rec["event"] == "end" and rec["close"] == "fin" and rec["verdict"] == "allow"
    assert (rec["src"], rec["sport"], rec["dst"], rec["dport"]) == (a[0], a[1], b[0], b[1])
    assert (rec["src_workload"], rec["dst_workload"]) == ("red/a", "red/b")
    # the entry counts wire bytes each way, up to the last packet of the closing batch
    w1, w2 = b1.wire_len.astype(int).tolist(), b2.wire_len.astype(int).tolist()
    d1 = (1, 0, 1, 1, 0, 1, 0)
    assert rec["bytes_orig"] == sum(w for w, d in zip(w1, d1) if d) + w2[1]
    assert rec["bytes_reply"] == sum(w for w, d in zip(w1, d1) if not d) + w2[0]
    assert rec["tcp_state"] in ("LAST_ACK", "TIME_WAIT")


def test_flow_log_rst_and_rotation(red, tmp_path):
    dp = Datapath(red, DatapathConfig())
    path = tmp_path / "flows.jsonl"
    fl = FlowLog(str(path), max_bytes=600, backups=2)
    t0 = 1_700_000_000 * 10**9
    for k in range(8):
        sp = 42000 + k
        frames = [
            _tcp("10.1.0.1", "10.1.0.2", sp, 7001, "S", 10, 0),
            _tcp("10.1.0.2", "10.1.0.1", 7001, sp, "SA", 20, 11, smac=B_MAC, dmac=A_MAC),
            _tcp("10.1.0.1", "10.1.0.2", sp, 7001, "A", 11, 21),
            _tcp("10.1.0.1", "10.1.0.2", sp, 7001, "R", 11, 0),
        ]
        bt = _tunnelled(frames, t0 + k * 10**7)
        res = dp.process(bt)
        fl.observe(bt, res.keys, res, dp)
    fl.close()
    assert fl.lines == 8
    files = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("flows.jsonl"))
    assert files == ["flows.jsonl", "flows.jsonl.1", "flows.jsonl.2"]
    recs = [json.loads(x) for f in files for x in (tmp_path / f).read_text().splitlines()]
    assert recs and all(r["event"] == "end" and r["close"] == "rst" for r in recs)


# -- live ------------------------------------------------------------------------------------------
def test_live_agent_metrics_and_flow_log(tmp_path):
    """One host namespace with one workload port and a bare underlay; the agent serves its
    metrics on a Unix socket and logs a denied connection attempt."""
    reason = netns_skip_reason(f"msm{os.getpid() % 100000}")
    if reason:
        pytest.skip(reason)
    from microseg.agent import control

    pre = f"msm{os.getpid() % 100000}"
    host_ns, wl_ns = f"{pre}-h", f"{pre}-w"
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    sock, msock, flows = tmp_path / "agent.sock", tmp_path / "metrics.sock", tmp_path / "flows.jsonl"
    logf = open(tmp_path / "agent.log", "wb")
    proc = None

    def ip(*args, ns=None):
        cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
        subprocess.run(cmd, check=True, capture_output=True)

    try:
        ip("netns", "add", host_ns)
        ip("netns", "add", wl_ns)
        ip("link", "add", "w0", "type", "veth", "peer", "name", "eth0", "netns", wl_ns, ns=host_ns)
        ip("link", "add", "ul", "type", "veth", "peer", "name", "ulp", ns=host_ns)  # a bare underlay
        for dev in ("w0", "ul", "ulp", "lo"):
            ip("link", "set", dev, "up", ns=host_ns)
        ip("link", "set", "eth0", "address", A_MAC, ns=wl_ns)
        ip("addr", "add", "10.1.0.1/32", "dev", "eth0", ns=wl_ns)
        ip("link", "set", "eth0", "up", ns=wl_ns)
        ip("link", "set", "lo", "up", ns=wl_ns)
        ip("route", "add", "default", "dev", "eth0", ns=wl_ns)
        cmd = ["ip", "netns", "exec", host_ns, sys.executable, "-m", "microseg", "agent"]
        cmd += ["--policy", str(policy), "--host", "h1", "--port", "red/a=w0", "--underlay", "ul"]
        cmd += ["--control", str(sock), "--metrics", f"unix:{msock}", "--flow-log", str(flows)]
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)

        def ready():
            if proc.poll() is not None:
                raise AssertionError(
                    f"agent exited {proc.returncode}: {(tmp_path / 'agent.log').read_text()}"
                )
            try:
                return control.request(str(sock), "status", timeout=5.0).get("ready")
            except control.ControlError:
                return False

        wait_for(ready, 150, "agent ready", tolerate=_NOT_YET)
        st = control.request(str(sock), "status", timeout=5.0)
        assert st["metrics_url"] == f"unix:{msock}" and st["flow_log"] == str(flows)
        assert os.stat(msock).st_mode & 0o777 == 0o600
        m = _samples(scrape_unix(str(msock)))
        assert m[("microseg_agent_ready", frozenset())] == 1
        # a connection attempt the policy denies (red/b accepts 7000-7999 only)
        attempt = "import socket; s = socket.socket(); s.settimeout(1.0)\ntry: s.connect(('10.1.0.2', 8080))\nexcept OSError: pass"

        def denied_logged():
            subprocess.run(["ip", "netns", "exec", wl_ns, sys.executable, "-c", attempt], capture_output=True)
            lines = flows.read_text().splitlines() if flows.exists() else []
            return [r for r in map(json.loads, lines) if r["event"] == "denied" and r["dport"] == 8080]

        recs = wait_for(denied_logged, 60, "a denied flow in the flow log", tolerate=_NOT_YET)
        assert recs[0]["reason"] == "ingress_denied" and recs[0]["src_workload"] == "red/a"
        m = _samples(scrape_unix(str(msock)))
        drops = _by(m, "microseg_drops_total", "reason", source="datapath")
        assert drops.get("ingress_denied", 0) >= 1
        stats = control.request(str(sock), "stats", timeout=5.0)
        assert m[("microseg_datapath_packets_total", frozenset())] <= stats["datapath"]["packets"]
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(10)
        logf.close()
        for ns in (wl_ns, host_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    assert not msock.exists()
