"""Verdicts never depend on where batches are cut.

The batched datapath (caches, fast path and compiled kernels) is held equal, packet by packet,
to :class:`microseg.datapath.reference.ReferenceDatapath` -- the reference parser, conntrack and
policy chained, one packet at a time -- on random multi-tenant traffic: colluding endpoints on
either side of a denied port, replies racing denied SYNs, replies sent in another tenant's
VNI or untunnelled, retransmissions, RSTs, FINs, spoofed MACs, and policy swaps between
batches; whatever the batch size and however the input is cut.
"""

import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microseg import ctstate
from microseg.datapath import BatchResult, Datapath, DatapathConfig, Forwarder
from microseg.datapath.reference import ReferenceDatapath
from microseg.overlay import encap
from microseg.packet import build as PB
from microseg.packet.batch import Batch
from microseg.policy import verdict as V
from microseg.policy.compiler import compile_policy
from microseg.policy.model import load_policy

POLICY = """
tenants: [{name: acme, vni: 5001}, {name: globex, vni: 5002}, {name: zero, vni: 0}]
untagged_tenant: globex
hosts: [{name: h1, address: 192.168.100.1}, {name: h2, address: 192.168.100.2}]
security_groups:
  - name: web
    tenant: acme
    rules:
      - {direction: ingress, protocol: tcp, port_range_min: {web_port}, port_range_max: {web_port}}
      - {direction: ingress, protocol: udp, port_range_min: 53, port_range_max: 53}
      - {direction: ingress, protocol: icmp}
  - name: db
    tenant: acme
    rules:
      - {direction: ingress, protocol: tcp, port_range_min: 5432, port_range_max: 5432, remote_group_id: {db_peer}}
  - {name: web_clients, tenant: acme, rules: [{direction: egress}]}
  - {name: api, tenant: acme, rules: [{direction: egress}]}
  - {name: gweb, tenant: globex, rules: [{direction: ingress, protocol: tcp, port_range_min: 80, port_range_max: 80}, {direction: egress}]}
  - {name: zweb, tenant: zero, rules: [{direction: ingress, protocol: tcp, port_range_min: 80, port_range_max: 80}, {direction: egress}]}
workloads:
  - {name: c1, tenant: acme, host: h1, mac: "02:00:00:00:00:01", ipv4: 10.1.0.1, security_groups: [web_clients]}
  - {name: w1, tenant: acme, host: h2, mac: "02:00:00:00:00:02", ipv4: 10.1.0.2, security_groups: [web]}
  - {name: d1, tenant: acme, host: h2, mac: "02:00:00:00:00:03", ipv4: 10.1.0.3, security_groups: [db]}
  - {name: a1, tenant: acme, host: h1, mac: "02:00:00:00:00:04", ipv4: 10.1.0.4, security_groups: [api]}
  - {name: g1, tenant: globex, host: h1, mac: "02:00:00:00:00:11", ipv4: 10.1.0.1, security_groups: [gweb]}
  - {name: g2, tenant: globex, host: h2, mac: "02:00:00:00:00:12", ipv4: 10.1.0.2, security_groups: [gweb]}
  - {name: z1, tenant: zero, host: h1, mac: "02:00:00:00:00:21", ipv4: 10.1.0.1, security_groups: [zweb]}
  - {name: z2, tenant: zero, host: h2, mac: "02:00:00:00:00:22", ipv4: 10.1.0.2, security_groups: [zweb]}
default_egress: allow
"""
MAC = {
    "c1": "02:00:00:00:00:01",
    "w1": "02:00:00:00:00:02",
    "d1": "02:00:00:00:00:03",
    "a1": "02:00:00:00:00:04",
    "g1": "02:00:00:00:00:11",
    "g2": "02:00:00:00:00:12",
    "z1": "02:00:00:00:00:21",
    "z2": "02:00:00:00:00:22",
}
IP = {
    "c1": "10.1.0.1",
    "w1": "10.1.0.2",
    "d1": "10.1.0.3",
    "a1": "10.1.0.4",
    "g1": "10.1.0.1",
    "g2": "10.1.0.2",
    "z1": "10.1.0.1",
    "z2": "10.1.0.2",
}
HOST = {"h1": "192.168.100.1", "h2": "192.168.100.2"}
ON = {"c1": "h1", "w1": "h2", "d1": "h2", "a1": "h1", "g1": "h1", "g2": "h2", "z1": "h1", "z2": "h2"}
VNI = {"acme": 5001, "globex": 5002, "zero": 0, "untagged": None}

# (tenant the flow is sent in, client, server, protocol, server port): allowed and denied ones
FLOWS = [
    ("acme", "c1", "w1", "tcp", 80),  # allowed (80 becomes 81 in the second policy)
    ("acme", "a1", "d1", "tcp", 5432),  # denied: db admits only web (then api, in the second)
    ("acme", "c1", "d1", "tcp", 5432),  # denied: c1 is not in web
    ("acme", "c1", "w1", "udp", 53),  # allowed
    ("acme", "a1", "d1", "udp", 53),  # denied
    ("acme", "c1", "w1", "icmp", 0),  # allowed echo
    ("acme", "a1", "d1", "icmp", 0),  # denied echo
    ("globex", "g1", "g2", "tcp", 80),  # allowed, same addresses as acme's c1 -> w1
    ("untagged", "g1", "g2", "tcp", 80),  # untunnelled: the untagged tenant (globex)
    ("zero", "z1", "z2", "tcp", 80),  # VNI 0: a zone of its own, not the untagged one
    ("zero", "z2", "z1", "tcp", 22),  # denied in zero
]
KINDS = [
    "syn",
    "synack",
    "ack",
    "data_c",
    "data_s",
    "fin_c",
    "fin_s",
    "rst_c",
    "rst_s",
    "retransmit",
    "req",
    "resp",
    "spoof",
]


def _policy(tmp_path_factory, name, web_port=80, db_peer="web"):
    d = tmp_path_factory.mktemp("pol")
    p = d / f"{name}.yaml"
    p.write_text(textwrap.dedent(POLICY).replace("{web_port}", str(web_port)).replace("{db_peer}", db_peer))
    return compile_policy(load_policy(str(p)))


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    return (_policy(tmp_path_factory, "p1"), _policy(tmp_path_factory, "p2", web_port=81, db_peer="api"))


class Traffic:
    """Turns (flow, kind, tenant override) events into frames with plausible TCP sequence
    numbers, so that handshakes really establish and data really is in window."""

    def __init__(self):
        self.state = {}
        self.sent = []

    def frame(self, flow_i: int, kind: str, cross: str | None):
        tenant, cl, sv, proto, port = FLOWS[flow_i]
        s = self.state.setdefault(
            flow_i, {"c": 1000 + 7919 * flow_i, "s": 5000 + 104729 * flow_i, "sport": 40000 + flow_i}
        )
        sport = s["sport"]
        tenant = cross or tenant
        fwd = kind in ("syn", "ack", "data_c", "fin_c", "rst_c", "req", "spoof")
        src, dst = (cl, sv) if fwd else (sv, cl)
        mac_src = "02:00:00:00:00:99" if kind == "spoof" else MAC[src]
        if kind == "retransmit":
            if not self.sent:
                kind = "syn"
            else:
                return self.sent[(flow_i * 31) % len(self.sent)]
        if proto == "tcp":
            c, sv_seq = s["c"], s["s"]
            flags, seq, ack, payload = {
                "syn": ("S", c - 1, 0, b""),
                "spoof": ("S", c - 1, 0, b""),
                "synack": ("SA", sv_seq - 1, c, b""),
                "ack": ("A", c, sv_seq, b""),
                "data_c": ("PA", c, sv_seq, b"x" * 10),
                "data_s": ("PA", sv_seq, c, b"y" * 20),
                "fin_c": ("FA", c, sv_seq, b""),
                "fin_s": ("FA", sv_seq, c, b""),
                "rst_c": ("R", c, 0, b""),
                "rst_s": ("RA", sv_seq, c, b""),
                "req": ("PA", c, sv_seq, b"r" * 5),
                "resp": ("PA", sv_seq, c, b"s" * 5),
            }[kind]
            if kind in ("data_c", "req"):
                s["c"] = (c + len(payload)) & 0xFFFFFFFF
            elif kind in ("data_s", "resp"):
                s["s"] = (sv_seq + len(payload)) & 0xFFFFFFFF
            elif kind == "fin_c":
                s["c"] = (c + 1) & 0xFFFFFFFF
            elif kind == "fin_s":
                s["s"] = (sv_seq + 1) & 0xFFFFFFFF
            sp, dp = (sport, port) if fwd else (port, sport)
            pkt = PB.tcp_packet(
                IP[src],
                IP[dst],
                sp,
                dp,
                payload,
                flags=flags,
                seq=seq,
                ack=ack,
                eth_src=mac_src,
                eth_dst=MAC[dst],
            )
        elif proto == "udp":
            sp, dp = (sport, port) if fwd else (port, sport)
            pkt = PB.udp_packet(IP[src], IP[dst], sp, dp, b"q" * 12, eth_src=mac_src, eth_dst=MAC[dst])
        else:
            pkt = PB.icmp_echo_packet(
                IP[src], IP[dst], ident=sport, seq=1, reply=not fwd, eth_src=mac_src, eth_dst=MAC[dst]
            )
        vni = VNI[tenant]
        if vni is not None:
            one = Batch.from_packets([pkt])
            pkt = encap(one, "vxlan", vni, HOST[ON[src]], HOST[ON[dst]]).packet(0)
        self.sent.append(pkt)
        return pkt


events = st.lists(
    st.tuples(
        st.integers(0, len(FLOWS) - 1),
        st.sampled_from(KINDS),
        st.sampled_from([None, None, None, None, "acme", "globex", "zero", "untagged"]),
    ),
    min_size=1,
    max_size=60,
)


def _batch(evts):
    t = Traffic()
    frames = [t.frame(f, k, c) for f, k, c in evts]
    return Batch.from_packets(frames, ts=[1_000_000_000 + 1_000_000 * i for i in range(len(frames))])


def _run_batched(policies, batch, cuts, swaps, cfg):
    dp = Datapath(policies[0], cfg)
    fw = [Forwarder(p) for p in policies]
    cur = 0
    parts, outs = [], []
    bounds = [0] + sorted(set(c for c in cuts if 0 < c < len(batch))) + [len(batch)]
    for k in range(len(bounds) - 1):
        if k and swaps[k % len(swaps)]:
            cur ^= 1
            dp.swap_policy(policies[cur])
        piece = batch.slice(bounds[k], bounds[k + 1])
        r = dp.process(piece)
        parts.append(r)
        outs.append(fw[cur].output(piece, r))
    return BatchResult.concat(parts), bounds, outs


def _run_reference(policies, batch, bounds, swaps):
    ref = ReferenceDatapath(policies[0])
    cur = 0
    out = {"verdict": [], "reason": [], "ct": []}
    for k in range(len(bounds) - 1):
        if k and swaps[k % len(swaps)]:
            cur ^= 1
            ref.swap_policy(policies[cur])
        r = ref.process(batch.slice(bounds[k], bounds[k + 1]))
        for f in out:
            out[f].append(r[f])
    return {f: np.concatenate(v) for f, v in out.items()}


def _frames(b):
    return sorted(zip(np.asarray(b.ts).tolist(), b.packets()))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    evts=events,
    cuts=st.lists(st.integers(0, 60), max_size=6),
    swaps=st.lists(st.booleans(), min_size=1, max_size=4),
    batch_size=st.sampled_from([1, 2, 3, 7, 64, 1024]),
    caches=st.booleans(),
    offload=st.booleans(),
)
def test_batched_datapath_equals_per_packet_model(policies, evts, cuts, swaps, batch_size, caches, offload):
    batch = _batch(evts)
    cfg = DatapathConfig(
        batch_size=batch_size, caches=caches, offload=offload, offload_rate=1e9, inspect_packets=1
    )
    res, bounds, outs = _run_batched(policies, batch, cuts, swaps, cfg)
    ref = _run_reference(policies, batch, bounds, swaps)
    for i in range(len(batch)):
        got = (int(res.verdict[i]), int(res.reason[i]), int(res.ct[i]))
        want = (int(ref["verdict"][i]), int(ref["reason"][i]), int(ref["ct"][i]))
        assert got == want, f"packet {i} ({evts[i]}): datapath {got}, per-packet model {want}"
    # the same frames leave as when every packet is its own batch (no swaps: same policy)
    if not any(swaps):
        one = _run_batched(
            policies,
            batch,
            list(range(len(batch))),
            [False],
            DatapathConfig(batch_size=1, caches=False, offload=False),
        )
        assert np.array_equal(one[0].verdict, res.verdict)
        got_out = sorted(f for o in outs for f in _frames(o))
        want_out = sorted(f for o in one[2] for f in _frames(o))
        assert got_out == want_out


def _vx(frames, vni=5001, src="192.168.100.1", dst="192.168.100.2"):
    b = Batch.from_packets(frames, ts=[1_000_000_000 + 1000 * i for i in range(len(frames))])
    return encap(b, "vxlan", vni, src, dst)


def _denied_flow():
    a, d = "10.1.0.4", "10.1.0.3"
    am, dm = MAC["a1"], MAC["d1"]
    return [
        PB.tcp_packet(a, d, 40000, 5432, flags="S", seq=100, eth_src=am, eth_dst=dm),
        PB.tcp_packet(d, a, 5432, 40000, flags="SA", seq=900, ack=101, eth_src=dm, eth_dst=am),
        PB.tcp_packet(a, d, 40000, 5432, flags="A", seq=101, ack=901, eth_src=am, eth_dst=dm),
        PB.tcp_packet(a, d, 40000, 5432, b"hello", flags="PA", seq=101, ack=901, eth_src=am, eth_dst=dm),
        PB.tcp_packet(d, a, 5432, 40000, b"data", flags="PA", seq=901, ack=106, eth_src=dm, eth_dst=am),
    ]


@pytest.mark.parametrize("batch_size", [1, 5, 1024])
def test_denied_syn_opens_nothing_for_the_rest_of_its_batch(policies, batch_size):
    """The issue's crafted repro: a denied api -> db:5432 SYN, then SYN-ACK, ACK and data in
    one VXLAN flow. All five are dropped, whatever the batch, and nothing leaves."""
    b = _vx(_denied_flow())
    dp = Datapath(policies[0], DatapathConfig(batch_size=batch_size))
    r = dp.process(b)
    assert list(r.verdict) == [V.DROP] * 5
    assert not np.any(r.ct & ctstate.ESTABLISHED)
    assert len(Forwarder(policies[0]).output(b, r)) == 0
    assert len(dp.conntrack) == 0


def test_mptcp_capture_under_untagged_tenant_is_not_waved_through(tmp_path):
    """The issue's first repro, rebuilt: an untunnelled capture whose SYNs are denied
    (no_endpoint) must not have its other packets allowed as established."""
    pol = tmp_path / "p.yaml"
    pol.write_text(
        textwrap.dedent(POLICY)
        .replace("{web_port}", "80")
        .replace("{db_peer}", "web")
        .replace("untagged_tenant: globex", "untagged_tenant: acme")
    )
    compiled = compile_policy(load_policy(str(pol)))
    a, b_ = "203.0.113.1", "203.0.113.2"  # no workload of acme has these
    ma, mb = "02:00:00:00:aa:01", "02:00:00:00:aa:02"
    frames = [
        PB.tcp_packet(a, b_, 5000, 80, flags="S", seq=1, eth_src=ma, eth_dst=mb),
        PB.tcp_packet(b_, a, 80, 5000, flags="SA", seq=10, ack=2, eth_src=mb, eth_dst=ma),
        PB.tcp_packet(a, b_, 5000, 80, flags="A", seq=2, ack=11, eth_src=ma, eth_dst=mb),
    ]
    for i in range(20):  # data both ways, in window
        k = i // 2
        if i % 2 == 0:
            frames.append(
                PB.tcp_packet(
                    a,
                    b_,
                    5000,
                    80,
                    b"z" * 8,
                    flags="PA",
                    seq=2 + 8 * k,
                    ack=11 + 8 * k,
                    eth_src=ma,
                    eth_dst=mb,
                )
            )
        else:
            frames.append(
                PB.tcp_packet(
                    b_,
                    a,
                    80,
                    5000,
                    b"z" * 8,
                    flags="PA",
                    seq=11 + 8 * k,
                    ack=10 + 8 * k,
                    eth_src=mb,
                    eth_dst=ma,
                )
            )
    batch = Batch.from_packets(frames, ts=[10**9 + 1000 * i for i in range(len(frames))])
    r = Datapath(compiled, DatapathConfig()).process(batch)
    assert r.verdict[0] == V.DROP and r.reason[0] == V.R_NO_ENDPOINT
    assert not np.any(r.verdict == V.ALLOW)
    assert not np.any(r.ct & ctstate.ESTABLISHED)


def test_cross_tenant_reply_is_never_established(policies):
    """A VNI-0 tenant's SYN, then a SYN-ACK of the same addresses and ports sent untunnelled
    (the untagged tenant's zone) or in another tenant's VNI: never the ESTABLISHED reply."""
    z1, z2 = IP["z1"], IP["z2"]
    syn = PB.tcp_packet(z1, z2, 41000, 80, flags="S", seq=100, eth_src=MAC["z1"], eth_dst=MAC["z2"])
    sa = PB.tcp_packet(z2, z1, 80, 41000, flags="SA", seq=900, ack=101, eth_src=MAC["g2"], eth_dst=MAC["g1"])
    frames = [
        encap(Batch.from_packets([syn]), "vxlan", 0, HOST["h1"], HOST["h2"]).packet(0),
        sa,
        encap(Batch.from_packets([sa]), "vxlan", 5001, HOST["h2"], HOST["h1"]).packet(0),
    ]
    batch = Batch.from_packets(frames, ts=[10**9, 10**9 + 1000, 10**9 + 2000])
    for bs in (1, 1024):
        dp = Datapath(policies[0], DatapathConfig(batch_size=bs))
        r = dp.process(batch)
        assert r.verdict[0] == V.ALLOW and r.ct[0] & ctstate.NEW
        for i in (1, 2):
            assert not r.ct[i] & ctstate.ESTABLISHED, f"packet {i} taken as the reply"
            assert r.ct[i] & (ctstate.INVALID | ctstate.NEW)
        zones = set(dp.conntrack.entries()["zone"].tolist())
        assert zones == {0}
