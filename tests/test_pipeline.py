"""The datapath end to end: every verdict and conntrack state against the generator's ground
truth (derived from the scenario, not from our stages), in every cache/offload configuration;
policy swaps; rejects; port security under caching; forwarding; the demo/run/trace verbs."""

import json
import textwrap

import numpy as np
import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from microseg import ctstate
from microseg.cli import main
from microseg.datapath import (
    L_EMC,
    L_FAST,
    L_MEGAFLOW,
    L_SLOW,
    L_STATE,
    R_SIGNATURE,
    Datapath,
    DatapathConfig,
    Forwarder,
    megaflow_mask,
)
from microseg.io.generator import generate, load_policy
from microseg.io.pcap import read_capture, write_pcap
from microseg.io.scenario import ScenarioConfig
from microseg.offload.inspect import SignatureSet
from microseg.packet import build as PB
from microseg.packet.batch import Batch
from microseg.policy import verdict as V
from microseg.policy.compiler import compile_policy
from microseg.policy.model import load_policy as load_policy_file


@pytest.fixture(scope="module")
def demo():
    policy = load_policy()
    return policy, compile_policy(policy), generate(policy, ScenarioConfig(flows=400, seed=7))


@pytest.mark.parametrize("caches", [True, False])
@pytest.mark.parametrize("offload", [True, False])
def test_every_verdict_and_state_matches_ground_truth(demo, caches, offload):
    _, compiled, gen = demo
    dp = Datapath(
        compiled, DatapathConfig(caches=caches, offload=offload, offload_rate=1e6 if offload else 7000.0)
    )
    res = dp.process(gen.batch)
    truth = gen.truth
    assert np.array_equal(res.verdict, truth.verdict)
    has = truth.ct != 0
    mask = ctstate.STATE_MASK | ctstate.REPLY
    assert np.array_equal(res.ct[has] & mask, truth.ct[has] & mask)
    levels = np.bincount(res.level, minlength=5)
    assert levels[L_SLOW] > 0 and levels[L_STATE] > 0
    new = (res.ct & ctstate.STATE_MASK) == ctstate.NEW
    assert not np.any(np.isin(res.level[~new], [L_EMC, L_MEGAFLOW]))  # caches front the rules
    assert (levels[L_EMC] + levels[L_MEGAFLOW] > 0) == caches
    assert (levels[L_FAST] > 0) == offload
    st = dp.stats()
    assert st["packets"] == len(gen.batch)
    assert sum(st["verdicts"].values()) == len(gen.batch)
    # every packet that is not allowed is counted under a reason other than a pass reason
    dropped = res.verdict != V.ALLOW
    assert np.all(np.isin(res.reason[dropped], [r for r in V.REASONS if r >= 10] + [R_SIGNATURE]))


def test_results_do_not_depend_on_batch_size(demo):
    _, compiled, gen = demo
    a = Datapath(compiled, DatapathConfig(batch_size=256)).process(gen.batch)
    b = Datapath(compiled, DatapathConfig(batch_size=37)).process(gen.batch)
    assert np.array_equal(a.verdict, b.verdict) and np.array_equal(a.ct, b.ct)


def test_megaflow_mask_wildcards_only_what_no_rule_reads(demo):
    _, compiled, _ = demo
    m = megaflow_mask(compiled)
    from microseg.cache.key import K_L4, SH_DPORT, SH_SPORT

    assert int(m[K_L4]) >> SH_SPORT & 0xFFFF == 0  # no security group matches source ports
    assert int(m[K_L4]) >> SH_DPORT & 0xFFFF == 0xFFFF


POLICY = """
tenants: [{name: acme, vni: 5001}, {name: globex, vni: 5002}]
hosts: [{name: h1, address: 192.168.100.1}, {name: h2, address: 192.168.100.2}]
security_groups:
  - name: web
    tenant: acme
    rules:
      - {direction: ingress, protocol: tcp, port_range_min: 80, port_range_max: 80}
      - {direction: ingress, protocol: udp, port_range_min: 53, port_range_max: 53}
  - {name: client, tenant: acme, rules: [{direction: egress}]}
workloads:
  - {name: c1, tenant: acme, host: h1, mac: "02:00:00:00:00:11", ipv4: 10.0.0.1, security_groups: [client]}
  - {name: w1, tenant: acme, host: h2, mac: "02:00:00:00:00:22", ipv4: 10.0.0.2, security_groups: [web]}
deny_action: {deny}
"""
NO_WEB = POLICY.replace("port_range_min: 80, port_range_max: 80", "port_range_min: 81, port_range_max: 81")
C_MAC, W_MAC = "02:00:00:00:00:11", "02:00:00:00:00:22"


def _policy(tmp_path, text=POLICY, deny="drop", name="p.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).replace("{deny}", deny))
    return compile_policy(load_policy_file(str(p)))


def _vx(frames, vni=5001, ts0=1_000_000_000, src="192.168.100.1", dst="192.168.100.2"):
    from microseg.overlay import encap

    b = Batch.from_packets(frames, ts=[ts0 + 1000 * i for i in range(len(frames))])
    return encap(b, "vxlan", vni, src, dst)


def _handshake(sport=40000):
    return [
        PB.tcp_packet("10.0.0.1", "10.0.0.2", sport, 80, flags="S", seq=100, eth_src=C_MAC, eth_dst=W_MAC),
        PB.tcp_packet(
            "10.0.0.2", "10.0.0.1", 80, sport, flags="SA", seq=900, ack=101, eth_src=W_MAC, eth_dst=C_MAC
        ),
        PB.tcp_packet(
            "10.0.0.1", "10.0.0.2", sport, 80, flags="A", seq=101, ack=901, eth_src=C_MAC, eth_dst=W_MAC
        ),
    ]


def _data(sport=40000, seq=101, ack=901, payload=b"GET / HTTP/1.1\r\n\r\n"):
    return PB.tcp_packet(
        "10.0.0.1", "10.0.0.2", sport, 80, payload, flags="PA", seq=seq, ack=ack, eth_src=C_MAC, eth_dst=W_MAC
    )


@pytest.mark.parametrize("cut", [True, False])
def test_policy_swap_cuts_established_connections_it_forbids(tmp_path, cut):
    old = _policy(tmp_path)
    new = _policy(tmp_path, NO_WEB, name="q.yaml")
    dp = Datapath(old, DatapathConfig(cut_revoked=cut))
    r = dp.process(_vx(_handshake()))
    assert list(r.verdict) == [V.ALLOW] * 3
    out = dp.swap_policy(new)
    assert out["cut"] == (1 if cut else 0)
    r = dp.process(_vx([_data()], ts0=2_000_000_000))
    if cut:
        # the connection is gone: the segment is picked up mid-stream as NEW and denied
        assert r.verdict[0] == V.DROP and r.ct[0] & ctstate.NEW
    else:
        assert r.verdict[0] == V.ALLOW and r.ct[0] & ctstate.ESTABLISHED
    assert dp.stats()["policy"]["version"] == new.version


def test_cached_answers_never_outlive_a_policy_swap(tmp_path):
    old = _policy(tmp_path)
    new = _policy(tmp_path, NO_WEB, name="q.yaml")
    dp = Datapath(old, DatapathConfig(caches=True, offload=False))
    syns = [
        PB.tcp_packet("10.0.0.1", "10.0.0.2", 40000 + i, 80, flags="S", seq=1, eth_src=C_MAC, eth_dst=W_MAC)
        for i in range(4)
    ]
    assert dp.process(_vx(syns[:1])).verdict[0] == V.ALLOW
    r = dp.process(_vx(syns[1:], ts0=1_500_000_000))
    assert list(r.verdict) == [V.ALLOW] * 3 and list(r.level) == [L_MEGAFLOW] * 3  # source port wildcarded
    dp.swap_policy(new)
    syns2 = [
        PB.tcp_packet("10.0.0.1", "10.0.0.2", 41000 + i, 80, flags="S", seq=1, eth_src=C_MAC, eth_dst=W_MAC)
        for i in range(4)
    ]
    r = dp.process(_vx(syns2, ts0=3_000_000_000))
    assert list(r.verdict) == [V.DROP] * 4


def test_spoofed_source_mac_is_not_served_from_the_cache(tmp_path):
    dp = Datapath(_policy(tmp_path), DatapathConfig(caches=True))
    ok = PB.tcp_packet("10.0.0.1", "10.0.0.2", 40000, 80, flags="S", seq=1, eth_src=C_MAC, eth_dst=W_MAC)
    spoof = PB.tcp_packet(
        "10.0.0.1", "10.0.0.2", 40000, 80, flags="S", seq=1, eth_src="02:00:00:00:00:99", eth_dst=W_MAC
    )
    r = dp.process(_vx([ok, ok, spoof]))
    assert list(r.verdict) == [V.ALLOW, V.ALLOW, V.DROP]
    assert r.reason[2] == V.R_SPOOFED


def test_unknown_vni_is_dropped_and_counted(tmp_path):
    dp = Datapath(_policy(tmp_path), DatapathConfig())
    r = dp.process(_vx(_handshake()[:1], vni=7777))
    assert r.verdict[0] == V.DROP and r.reason[0] == V.R_UNKNOWN_VNI
    assert dp.stats()["reasons"]["unknown_vni"] == 1


def test_rejects_are_answered_towards_the_sender(tmp_path):
    compiled = _policy(tmp_path, deny="reject")
    dp = Datapath(compiled, DatapathConfig())
    syn = PB.tcp_packet("10.0.0.1", "10.0.0.2", 40000, 22, flags="S", seq=1000, eth_src=C_MAC, eth_dst=W_MAC)
    dns = PB.udp_packet("10.0.0.1", "10.0.0.2", 5353, 5353, b"x" * 20, eth_src=C_MAC, eth_dst=W_MAC)
    b = _vx([syn, dns])
    r = dp.process(b)
    assert list(r.verdict) == [V.REJECT, V.REJECT]
    out = Forwarder(compiled).output(b, r)
    assert len(out) == 2
    rst = Ether(out.packet(0))
    assert rst[IP].dst == "192.168.100.1" and rst[VXLAN].vni == 5001  # back to the sender's host
    inner = rst[VXLAN].payload
    assert inner[IP].src == "10.0.0.2" and inner[IP].dst == "10.0.0.1"
    assert inner[TCP].flags == "RA" and inner[TCP].ack == 1001 and inner[TCP].dport == 40000
    icmp = Ether(out.packet(1))[VXLAN].payload
    assert icmp[ICMP].type == 3 and icmp[ICMP].code == 13
    from scapy.layers.inet import UDPerror

    assert icmp[ICMP].payload[UDPerror].sport == 5353  # the quoted datagram


def test_allowed_frames_leave_towards_the_destination_host(demo):
    policy, compiled, gen = demo
    dp = Datapath(compiled, DatapathConfig())
    sub = gen.batch.slice(0, 3000)
    r = dp.process(sub)
    fw = Forwarder(compiled)
    out = fw.output(sub, r)
    hosts = {h.name: h.address for h in policy.hosts}
    by_addr = {}
    for w in policy.workloads:
        for a in w.addresses:
            by_addr[(w.tenant, str(a))] = hosts[w.host]
    vni_name = {t.vni: t.name for t in policy.tenants}
    n_allowed = int(np.count_nonzero(r.verdict == V.ALLOW))
    assert fw.counters["forwarded"] + fw.counters["forwarded_plain"] == n_allowed
    checked = 0
    for i in range(min(len(out), 400)):
        f = Ether(out.packet(i))
        if VXLAN not in f:
            continue
        inner = f[VXLAN].payload
        dst = inner[IP].dst if IP in inner else inner.payload.dst
        assert f[IP].dst == by_addr[(vni_name[f[VXLAN].vni], dst)]
        checked += 1
    assert checked > 100


def test_signature_drop_blocks_a_flow(tmp_path):
    rules = tmp_path / "s.rules"
    rules.write_text('drop tcp any any -> any 80 (msg:"bad"; content:"evil"; sid:7;)\n')
    dp = Datapath(_policy(tmp_path), DatapathConfig(offload=True, signatures=SignatureSet.load(str(rules))))
    frames = _handshake() + [
        _data(payload=b"GET /evil HTTP/1.1\r\n\r\n"),
        _data(seq=101 + 23, payload=b"more"),
    ]
    r = dp.process(_vx(frames))
    assert list(r.verdict[:3]) == [V.ALLOW] * 3
    assert r.verdict[3] == V.DROP and r.reason[3] == R_SIGNATURE and r.sid[3] == 7
    assert r.verdict[4] == V.DROP  # the flow stays blocked


# -- command line ---------------------------------------------------------------------------------
def test_run_verb_writes_output_and_report_and_checks_truth(demo, tmp_path, capsys):
    _, _, gen = demo
    paths = gen.write(str(tmp_path / "in.pcap"))
    from microseg.io.generator import builtin_policy_path

    rc = main(
        [
            "run",
            "--policy",
            builtin_policy_path(),
            paths["pcap"],
            "-w",
            str(tmp_path / "out.pcap"),
            "--report",
            str(tmp_path / "r.json"),
            "--truth",
            paths["truth_npz"],
            "--quiet",
        ]
    )
    assert rc == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["packets"] == len(gen.batch)
    assert rep["ground_truth"]["verdict_mismatches"] == 0
    assert len(read_capture(str(tmp_path / "out.pcap"))) > 0


def test_run_verb_rejects_bad_inputs_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"this is not a capture at all")
    from microseg.io.generator import builtin_policy_path

    assert main(["run", "--policy", builtin_policy_path(), str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0]
    pol = tmp_path / "p.yaml"
    pol.write_text("tenants: [{name: a, vni: x}]\n")
    write_pcap(str(tmp_path / "ok.pcap"), Batch.from_packets([]))
    assert main(["run", "--policy", str(pol), str(tmp_path / "ok.pcap")]) == 2
    err = capsys.readouterr().err
    assert "p.yaml:1" in err and "Traceback" not in err


def test_trace_explains_each_stage(tmp_path, capsys):
    p = tmp_path / "p.yaml"
    p.write_text(textwrap.dedent(POLICY).replace("{deny}", "drop"))
    assert main(["trace", "--policy", str(p), "--json", "src=c1 dst=w1 tcp dport=80"]) == 0
    out = json.loads(capsys.readouterr().out)
    stages = [s["stage"] for s in out["steps"]]
    for s in ("parse", "tenant", "conntrack", "slow path", "verdict", "output"):
        assert s in stages
    assert out["verdict"] == "allow" and out["ct"] == "new"
    assert (
        main(["trace", "--policy", str(p), "--json", "--state", "established", "src=c1 dst=w1 tcp dport=80"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "allow" and out["ct"] == "established"
    assert (
        main(["trace", "--policy", str(p), "--json", "src=c1 dst=w1 tcp dport=22"]) == 1
    )  # not allowed: exit 1
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "drop"
    assert main(["trace", "--policy", str(p), "src=c1 dst=nowhere"]) == 2
    assert "neither an address nor a workload" in capsys.readouterr().err


def test_frames_to_the_other_site_leave_in_esp_and_decrypt_back(demo):
    from microseg.app import builtin_path
    from microseg.ipsec.gateway import EspGateway
    from microseg.ipsec.sa import load_config

    policy, compiled, gen = demo
    sub = gen.batch.slice(0, 2000)
    r = Datapath(compiled, DatapathConfig()).process(sub)
    plain = Forwarder(compiled).output(sub, r)
    cfg = load_config(builtin_path("sites.yaml"))
    fw = Forwarder(compiled, gateway=EspGateway(cfg))
    sealed = fw.output(sub, r)
    assert len(sealed) == len(plain)
    from microseg.packet.parse import parse

    k = parse(sealed)
    esp = np.flatnonzero(k.proto == 50)
    assert esp.size == fw.counters["esp_sent"] > 0
    site_b = {"192.168.100.13", "192.168.100.14"}
    for i in range(len(plain)):  # exactly the frames towards site B are sealed
        to_b = Ether(plain.packet(i))[IP].dst in site_b
        assert (i in set(esp.tolist())) == to_b
    opened, why = EspGateway(cfg).decrypt_batch(sealed.select(esp))
    assert np.all(why == 0)
    assert [opened.packet(j) for j in range(len(opened))] == [plain.packet(int(i)) for i in esp]


def _fast_rows_match_policy(compiled, batch, cfg):
    res = Datapath(compiled, cfg).process(batch)
    fast = res.level == L_STATE
    v, r, why = compiled.decide(res.keys, res.ct)
    assert np.array_equal(res.verdict[fast], v[fast])
    assert np.array_equal(res.reason[fast], why[fast])
    assert np.all(res.rule[fast] == -1) and np.all(r[fast] == -1)
    # and the slow path's rows are the policy's too (no cache, no offload: nothing else)
    slow = res.level == L_SLOW
    assert np.array_equal(res.verdict[slow], v[slow]) or cfg.caches
    return int(np.count_nonzero(fast))


@pytest.mark.parametrize("batch_size", [1, 7, 1024])
def test_fast_kernel_answers_tracked_packets_as_the_policy_does(demo, batch_size):
    """What the fast kernel answers from port security and conntrack state alone is exactly
    what CompiledPolicy.decide gives the same packet in the same state."""
    _, compiled, gen = demo
    sub = gen.batch.slice(0, 6000) if batch_size == 1 else gen.batch
    assert _fast_rows_match_policy(compiled, sub, DatapathConfig(batch_size=batch_size)) > 1000


def test_fast_kernel_on_mutated_traffic_matches_the_policy(demo):
    """Damaged copies of the demo's packets (random bytes overwritten, lengths cut): parse
    errors, checksum failures, spoofed MACs, unknown VNIs, INVALID states."""
    _, compiled, gen = demo
    rng = np.random.default_rng(11)
    base = gen.batch.slice(0, 8000)
    data = base.data.copy()
    off = np.asarray(base.offset)
    ln = np.asarray(base.length)
    hit = rng.random(len(base)) < 0.5
    for i in np.flatnonzero(hit):
        k = int(rng.integers(1, 4))
        pos = off[i] + rng.integers(0, ln[i], k)
        data[pos] = rng.integers(0, 256, k)
    length = np.where(rng.random(len(base)) < 0.05, np.maximum(ln - rng.integers(0, 60, len(base)), 1), ln)
    mutated = Batch(data, off, length.astype(np.int32), length.astype(np.int32), base.port, base.ts)
    both = Batch.concat([base, mutated], order="ts")
    assert _fast_rows_match_policy(compiled, both, DatapathConfig()) > 1000


def test_fast_path_off_gives_the_same_results(demo):
    """With the fast kernel's verdicts turned off every packet is decided by the compiled
    policy in the slow path: the same verdicts, reasons, rules and states."""
    _, compiled, gen = demo
    a = Datapath(compiled, DatapathConfig()).process(gen.batch)
    b = Datapath(compiled, DatapathConfig(fast_path=False)).process(gen.batch)
    for f in ("verdict", "reason", "rule", "ct", "level"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f


@pytest.mark.parametrize("n", [0, 1, 7, 1000])
def test_fast_kernel_tenant_table_agrees_with_the_policy_tenant_index(n):
    """The fast kernel's hashed VNI -> tenant lookup gives what the compiled policy's
    tenant_index gives, for every tenant and for VNIs no tenant has."""
    from numba import njit

    from microseg.datapath.fast import _tenant_of, tenant_table
    from microseg.policy.compiler import tenant_index

    @njit
    def both(keys, vals, vnis, probe, out):
        for j in range(probe.shape[0]):
            out[0, j] = _tenant_of(keys, vals, probe[j])
            out[1, j] = tenant_index(vnis, probe[j])

    rng = np.random.default_rng(n)
    vnis = np.sort(rng.choice(1 << 24, n, replace=False)).astype(np.int64)
    probe = np.concatenate([vnis, rng.integers(0, 1 << 24, 500), [0, (1 << 24) - 1]]).astype(np.int64)
    out = np.empty((2, probe.shape[0]), np.int64)
    both(*tenant_table(vnis), vnis, probe, out)
    assert np.array_equal(out[0], out[1])
    assert np.array_equal(out[0, :n], np.arange(n))
