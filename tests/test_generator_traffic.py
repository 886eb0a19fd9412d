"""Traffic generator: determinism, well-formed packets (checked by scapy), TCP arithmetic,
TLS/DNS payloads, attack proportions, timestamps, output files and the CLI."""

import json
import shutil
import struct
import subprocess

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.all import DNS, GRE, ICMP, IP, TCP, UDP, Ether, IPv6, checksum, raw
from scapy.contrib.geneve import GENEVE
from scapy.layers.inet import in4_chksum
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, in6_chksum
from scapy.layers.vxlan import VXLAN

from microseg import ctstate
from microseg.errors import InputError
from microseg.io import generator as G
from microseg.io.scenario import ScenarioConfig

SMALL = dict(flows=150, seed=11)


@pytest.fixture(scope="module")
def policy():
    return G.load_policy()


@pytest.fixture(scope="module")
def gen(policy):
    return G.generate(policy, SMALL)


@pytest.fixture(scope="module")
def tcp_view(gen):
    return _tcp_view(gen)


@pytest.fixture
def scapy_tls():
    """scapy's TLS dissector, bound to port 443 only for the test that uses it (dissecting
    every tcp/443 packet as TLS would slow the other tests down)."""
    from scapy.layers.tls.handshake import TLSClientHello
    from scapy.layers.tls.record import TLS
    from scapy.packet import split_layers

    yield TLS, TLSClientHello
    split_layers(TCP, TLS, sport=443)
    split_layers(TCP, TLS, dport=443)


def _inner(p, tunnel):
    """The inner Ethernet frame of a tunnelled packet (scapy), and the tunnel's VNI."""
    if tunnel == "vxlan":
        return p[VXLAN].payload, p[VXLAN].vni
    if tunnel == "geneve":
        return p[GENEVE].payload, p[GENEVE].vni
    if tunnel == "nvgre":
        return p[GRE].payload, p[GRE].key >> 8
    return p, -1


def _recomputed(layer_pkt, cls, fields):
    """Serialise ``layer_pkt`` again with ``fields`` of layer ``cls`` left for scapy to fill."""
    q = layer_pkt.copy()
    for f in fields:
        setattr(q[cls], f, None)
    return raw(q)


def _l4_checksum_ok(ib: bytes, e) -> bool:
    """Check the L4 checksum over the bytes as they are (scapy computes the sum; no
    re-serialisation of dissected payloads such as TLS)."""
    if IP in e:
        start = 14 + 4 * e[IP].ihl
        l4 = bytearray(ib[start : 14 + e[IP].len])
        proto = e[IP].proto
    else:
        start = 54
        l4 = bytearray(ib[start:])
        proto = e[IPv6].nh
    pos = {6: 16, 17: 6, 1: 2, 58: 2}[proto]
    want = int.from_bytes(l4[pos : pos + 2], "big")
    l4[pos : pos + 2] = b"\0\0"
    if proto == 1:
        got = checksum(bytes(l4))
    elif IP in e:
        got = in4_chksum(proto, e[IP], bytes(l4))
    else:
        got = in6_chksum(proto, e[IPv6], bytes(l4))
    if proto == 17 and got == 0:
        got = 0xFFFF
    return got == want


def _check_wellformed(b: bytes, tunnel: str, host_addrs: set):
    p = Ether(b)
    if tunnel != "none":
        outer = p[IP]
        assert outer.src in host_addrs and outer.dst in host_addrs
        assert outer.len == len(b) - 14
        assert _recomputed(p, IP, ["chksum"]) == b
        if tunnel != "nvgre":
            assert p[UDP].len == len(b) - 34 and p[UDP].chksum == 0
    inner, vni = _inner(p, tunnel)
    assert isinstance(inner, Ether), "no inner Ethernet frame"
    ib = raw(inner)
    e = Ether(ib)
    if IP in e:
        assert e[IP].len == len(ib) - 14
        assert _recomputed(e, IP, ["chksum"]) == ib
    else:
        assert e[IPv6].plen == len(ib) - 54
    assert _l4_checksum_ok(ib, e)
    if TCP in e:
        assert e[TCP].dataofs == 5
    elif UDP in e:
        assert e[UDP].len == len(ib) - (34 if IP in e else 54)
    else:
        assert any(x in e for x in (ICMP, ICMPv6EchoRequest, ICMPv6EchoReply, ICMPv6DestUnreach))
    return e, vni


# ---------------------------------------------------------------------------------------------
def test_same_seed_same_bytes(policy, gen):
    again = G.generate(policy, SMALL)
    assert np.array_equal(gen.batch.data, again.batch.data)
    assert np.array_equal(gen.batch.offset, again.batch.offset)
    assert np.array_equal(gen.batch.ts, again.batch.ts)
    for k in G.GroundTruth.FIELDS:
        assert np.array_equal(getattr(gen.truth, k), getattr(again.truth, k))
    assert gen.flows == again.flows
    other = G.generate(policy, {**SMALL, "seed": 12})
    assert other.batch.data.shape != gen.batch.data.shape or not np.array_equal(
        other.batch.data, gen.batch.data
    )


@pytest.mark.parametrize("tunnel", ["vxlan", "geneve", "nvgre"])
def test_every_packet_is_well_formed(policy, tunnel):
    g = gen_t = G.generate(policy, {"flows": 30, "seed": 3, "tunnel": tunnel, "ipv6_share": 0.3})
    hosts = {h.address for h in policy.hosts}
    for i in range(len(g.batch)):
        _, vni = _check_wellformed(g.batch.packet(i), tunnel, hosts)
        assert vni == gen_t.truth.tenant[i]


def test_inner_headers_match_the_flow_table(gen, policy):
    """The inner addresses and ports of every packet are those of its flow (either way)."""
    for i in range(0, len(gen.batch), 3):
        e, _ = _inner(Ether(gen.batch.packet(i)), "vxlan")
        fl = gen.flows[gen.truth.flow[i]]
        ip = e[IP] if IP in e else e[IPv6]
        ends = (ip.src, ip.dst) if gen.truth.dir[i] == 0 else (ip.dst, ip.src)
        assert ends == (fl["src_addr"], fl["dst_addr"])
        if isinstance(ip.payload, (TCP, UDP)):  # not an ICMP error's quote
            l4 = ip.payload
            ports = (l4.sport, l4.dport) if gen.truth.dir[i] == 0 else (l4.dport, l4.sport)
            assert ports == (fl["sport"], fl["dport"])


def _tcp_view(g):
    """Per packet: (flow, dir, flags, seq, ack, payload length, window) read back by scapy."""
    out = []
    for i in range(len(g.batch)):
        e, _ = _inner(Ether(g.batch.packet(i)), "vxlan")
        if TCP in e:
            t = e[TCP]
            out.append(
                (
                    i,
                    int(g.truth.flow[i]),
                    int(g.truth.dir[i]),
                    int(t.flags),
                    t.seq,
                    t.ack,
                    len(t.payload),
                    t.window,
                )
            )
    return out


def test_tcp_sequence_and_ack_arithmetic(gen, tcp_view):
    reasons = gen.truth.reasons
    oow = {i for i, r in enumerate(reasons) if "out of window" in r}
    bad = {i for i, r in enumerate(reasons) if "bad flags" in r}
    nxt, acked, checked, n_oow = {}, {}, 0, 0
    for i, f, d, flags, seq, ack, plen, _win in tcp_view:
        r = int(gen.truth.reason[i])
        if r in bad:
            continue
        st = nxt.setdefault(f, [None, None])
        if flags & G.SYN:
            if st[d] is not None:  # a retransmitted SYN repeats its ISN
                assert (seq + 1) % 2**32 == st[d]
            st[d] = (seq + 1) % 2**32
        elif r in oow:
            assert seq == (st[d] + G.OOW_DELTA) % 2**32
            n_oow += 1
            continue
        else:
            assert seq == st[d], f"packet {i}: seq {seq} expected {st[d]}"
            st[d] = (seq + plen + (1 if flags & G.FIN else 0)) % 2**32
            checked += 1
        if flags & G.ACK:
            assert ack == st[1 - d], f"packet {i}: ack {ack} expected {st[1 - d]}"
            acked[(f, d)] = ack
        # never more in flight than the peer's window allows (conntrack's window check)
        if (f, 1 - d) in acked:
            assert (st[d] - acked[(f, 1 - d)]) % 2**32 <= G.WINDOW
    assert checked > 1000 and n_oow > 0


def test_conversations_open_and_close_like_a_kernel(gen, tcp_view):
    """Allowed TCP conversations: SYN, SYN/ACK, ACK first; FIN/ACK, ACK, FIN/ACK, ACK last."""
    by_flow = {}
    for i, f, d, flags, *_ in tcp_view:
        by_flow.setdefault(f, []).append((d, flags, i))
    n = 0
    for f, pk in by_flow.items():
        if gen.flows[f]["label"] not in ("tcp", "tls") or gen.flows[f]["verdict"] != "allow":
            continue
        n += 1
        assert [(d, fl) for d, fl, _ in pk[:3]] == [(0, G.SYN), (1, G.SYN | G.ACK), (0, G.ACK)]
        tail = [(d, fl) for d, fl, _ in pk[-4:]]
        assert tail == [(0, G.FIN | G.ACK), (1, G.ACK), (1, G.FIN | G.ACK), (0, G.ACK)]
        assert gen.truth.ct[pk[0][2]] == ctstate.NEW
        for d, _fl, i in pk[1:]:
            want = ctstate.ESTABLISHED | (ctstate.REPLY if d else 0)
            if "out of window" not in gen.truth.reasons[gen.truth.reason[i]]:
                assert gen.truth.ct[i] == want
    assert n > 50


def _streams(g, flow):
    """Reassembled payload of each direction of a TCP flow (in-window segments only)."""
    data = {0: b"", 1: b""}
    for i in np.flatnonzero(g.truth.flow == flow):
        if "out of window" in g.truth.reasons[g.truth.reason[i]]:
            continue
        e, _ = _inner(Ether(g.batch.packet(int(i))), "vxlan")
        data[int(g.truth.dir[i])] += bytes(e[TCP].payload)
    return data


def test_tls_streams_are_whole_records(gen, scapy_tls):
    TLS, TLSClientHello = scapy_tls
    tls = [f["flow"] for f in gen.flows if f["label"] == "tls" and f["verdict"] == "allow"]
    assert len(tls) > 10
    for f in tls[:15]:
        fl = gen.flows[f]
        for _d, s in _streams(gen, f).items():
            pos, types = 0, []
            while pos < len(s):
                ctype, ver, ln = struct.unpack_from("!BHH", s, pos)
                assert ctype in (0x14, 0x16, 0x17) and ver in (0x0301, 0x0303)
                types.append(ctype)
                pos += 5 + ln
            assert pos == len(s)
            assert types[0] == 0x16 and 0x17 in types
        hello = TLS(_streams(gen, f)[0])
        ch = hello.msg[0]
        assert isinstance(ch, TLSClientHello)
        sni = [e for e in ch.ext if e.type == 0][0].servernames[0].servername.decode()
        assert sni == f"{fl['dst']}.{fl['tenant']}.internal"
        sh = TLS(_streams(gen, f)[1])
        assert sh.msg[0].msgtype == 2 and sh.msg[0].sid == ch.sid


def test_dns_queries_and_answers_parse(gen):
    seen = 0
    queries = {}
    for i in range(len(gen.batch)):
        if gen.truth.labels[gen.truth.label[i]] != "dns":
            continue
        e, _ = _inner(Ether(gen.batch.packet(i)), "vxlan")
        ip = e[IP] if IP in e else e[IPv6]
        if not isinstance(ip.payload, UDP):  # port unreachable: tested below
            continue
        dns = DNS(bytes(e[UDP].payload))
        f = int(gen.truth.flow[i])
        if gen.truth.dir[i] == 0:
            assert dns.qr == 0 and dns.qdcount == 1
            queries[f] = (dns.id, dns.qd[0].qname)
        else:
            assert dns.qr == 1 and (dns.id, dns.qd[0].qname) == queries[f]
            seen += 1
    assert seen > 5


def test_heavy_tailed_sizes(policy):
    g = G.generate(
        policy,
        {"flows": 400, "seed": 2, "tls_share": 0.0, "dns_share": 0.0, "icmp_share": 0.0, "denied_share": 0.0},
    )
    sizes = np.array([f["bytes"] for f in g.flows if "bytes" in f])
    assert sizes.size > 300
    assert np.max(sizes) > 30 * np.median(sizes)  # elephants among the mice
    assert np.mean(sizes <= 4 * 800) > 0.5


def test_attack_proportions(policy):
    shares = {"scan_share": 0.05, "spoof_share": 0.03, "invalid_share": 0.04, "synflood_share": 0.08}
    g = G.generate(policy, {"flows": 200, "seed": 5, **shares})
    n = len(g.batch)
    counts = g.truth.summary()["by_label"]
    for label, key in (
        ("port scan", "scan_share"),
        ("cross-tenant", "spoof_share"),
        ("invalid tcp", "invalid_share"),
        ("syn flood", "synflood_share"),
    ):
        assert abs(counts[label] - shares[key] * n) <= 0.01 * n + 3, label
    none = G.generate(
        policy,
        {
            "flows": 50,
            "seed": 5,
            "scan_share": 0.0,
            "spoof_share": 0.0,
            "invalid_share": 0.0,
            "synflood_share": 0.0,
        },
    )
    labels = set(none.truth.summary()["by_label"])
    assert not labels & {"port scan", "cross-tenant", "invalid tcp", "syn flood"}


def test_invalid_tcp_uses_the_flag_combinations_linux_rejects(gen, tcp_view):
    bad = {i for i, r in enumerate(gen.truth.reasons) if "bad flags" in r}
    flags = set()
    for i, _f, _d, fl, *_ in tcp_view:
        if int(gen.truth.reason[i]) in bad:
            flags.add(fl)
            assert gen.truth.ct[i] == ctstate.INVALID and gen.truth.verdict[i] == G.DROP
    assert flags and flags <= set(G.BAD_FLAGS)


def test_timestamps_follow_the_rate(policy):
    g = G.generate(policy, {"flows": 100, "seed": 4, "rate_pps": 50_000.0})
    ts = g.batch.ts
    assert np.all(np.diff(ts) > 0)
    assert ts[0] == ScenarioConfig().start_ns
    rate = (len(ts) - 1) / ((ts[-1] - ts[0]) / 1e9)
    assert 0.8 * 50_000 < rate < 1.2 * 50_000


def test_ipv6_share(policy):
    g = G.generate(policy, {"flows": 120, "seed": 9, "ipv6_share": 0.6})
    v6 = [f for f in g.flows if f["family"] == 6]
    assert len(v6) > 30
    assert any(f["label"] == "tls" for f in v6)


def test_assembler_kernel_matches_reference(policy):
    cfg = {"flows": 12, "seed": 21, "tunnel": "geneve", "ipv6_share": 0.5}
    a = G.generate(policy, cfg)
    b = G.generate(policy, cfg, assembler=G.assemble_ref)
    assert np.array_equal(a.batch.data, b.batch.data)


def test_parser_reads_what_was_generated(gen):
    from microseg.packet import batch as B
    from microseg.packet.parse import parse

    keys = parse(gen.batch)
    assert np.all(keys.error == 0)
    assert np.array_equal(keys.tenant, gen.truth.tenant)
    assert np.all(keys.tun_type == B.TUN_VXLAN)


def test_untunnelled_needs_an_untagged_tenant(policy, tmp_path):
    with pytest.raises(InputError, match="untagged_tenant"):
        G.generate(policy, {"flows": 10, "tunnel": "none"})
    src = open(G.builtin_policy_path(), encoding="utf-8").read()
    (tmp_path / "k8s-policy.yaml").write_text(
        open(G.builtin_policy_path().replace("datacenter.yaml", "k8s-policy.yaml")).read()
    )
    path = tmp_path / "dc.yaml"
    path.write_text(src.replace("anti_spoofing: true", "anti_spoofing: true\nuntagged_tenant: acme"))
    g = G.generate(str(path), {"flows": 40, "seed": 1, "tunnel": "none"})
    assert np.all(g.truth.tenant == -1)
    assert {f["tenant"] for f in g.flows} == {"acme"}
    for i in range(len(g.batch)):
        _check_wellformed(g.batch.packet(i), "none", set())


def test_outputs_written_and_read_back(gen, tmp_path):
    from microseg.io.pcap import read_capture

    paths = gen.write(str(tmp_path / "dc.pcap"))
    back = read_capture(paths["pcap"])
    assert len(back) == len(gen.batch)
    assert np.array_equal(back.ts, gen.batch.ts)
    assert all(back.packet(i) == gen.batch.packet(i) for i in range(0, len(back), 7))
    lines = open(paths["truth"], encoding="utf-8").read().splitlines()
    assert len(lines) == len(gen.batch)
    for i in (0, len(lines) // 2, len(lines) - 1):
        assert json.loads(lines[i]) == gen.truth.record(i)
    t2 = G.GroundTruth.load_npz(paths["truth_npz"])
    for k in G.GroundTruth.FIELDS:
        assert np.array_equal(getattr(t2, k), getattr(gen.truth, k))
    flows = [json.loads(x) for x in open(paths["flows"], encoding="utf-8")]
    assert flows == json.loads(json.dumps(gen.flows))


def test_cli_generate(tmp_path, capsys):
    from microseg.cli import main

    out = tmp_path / "x.pcap"
    assert main(["generate", "-o", str(out), "--flows", "20", "--seed", "3", "--tunnel", "nvgre"]) == 0
    assert out.exists() and (tmp_path / "x.truth.jsonl").exists()
    assert "packets" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("flows: 10\nbogus: 1\n")
    assert main(["generate", "-o", str(out), "--scenario", str(bad)]) == 2
    assert "bogus" in capsys.readouterr().err
    bad.write_text("tls_share: 2\n")
    assert main(["generate", "-o", str(out), "--scenario", str(bad)]) == 2
    assert main(["generate", "-o", str(tmp_path / "no" / "x.pcap"), "--flows", "5"]) == 2
    assert main(["generate", "-o", str(out), "--policy", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.parametrize(
    "bad",
    [
        {"flows": 0},
        {"tls_share": -0.1},
        {"tunnel": "gre"},
        {"rate_pps": 0},
        {"tenants": ["nosuch"]},
        {"scan_share": 0.5, "synflood_share": 0.5},
    ],
)
def test_bad_scenarios_are_refused(policy, bad):
    with pytest.raises(InputError):
        G.generate(policy, {"flows": 5, **bad})


def test_icmp_errors_quote_the_original_datagram(policy):
    """DNS to a server that is down: the ICMP port unreachable quotes the query byte for byte
    and is RELATED (reply direction) to the query's connection."""
    g = G.generate(policy, {"flows": 400, "seed": 8, "dns_share": 0.6, "ipv6_share": 0.3})
    t = g.truth
    rel = np.flatnonzero((t.ct & ctstate.RELATED) > 0)
    assert len(rel) >= 3
    fams = set()
    for i in rel:
        assert t.ct[i] == ctstate.RELATED | ctstate.REPLY and t.verdict[i] == G.ALLOW
        assert t.causes[t.cause[i]] == "related"
        first = np.flatnonzero(t.flow == t.flow[i])[0]
        assert first < i
        orig = raw(_inner(Ether(g.batch.packet(int(first))), "vxlan")[0])[14:]
        err = _inner(Ether(g.batch.packet(int(i))), "vxlan")[0]
        if IP in err:
            assert (err[ICMP].type, err[ICMP].code) == (3, 3)
            quoted = raw(err)[14 + 20 + 8 :]
        else:
            assert (err[ICMPv6DestUnreach].type, err[ICMPv6DestUnreach].code) == (1, 4)
            quoted = raw(err)[14 + 40 + 8 :]
        assert quoted == orig
        fams.add(IP in err)
    assert fams == {True, False}


_POLICY = []


def _builtin():
    if not _POLICY:
        _POLICY.append(G.load_policy())
    return _POLICY[0]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    flows=st.integers(1, 25),
    tunnel=st.sampled_from(["vxlan", "geneve", "nvgre"]),
    mix=st.sampled_from([(0.35, 0.2, 0.05), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)]),
    denied=st.sampled_from([0.0, 0.5, 1.0]),
    v6=st.sampled_from([0.0, 1.0]),
    attacks=st.sampled_from([(0, 0, 0, 0), (0.1, 0.05, 0.05, 0.1), (0.3, 0.2, 0.1, 0.2)]),
    size=st.sampled_from([(1.2, 800, 4_000_000), (0.6, 1, 50_000), (3.0, 5000, 5000)]),
)
def test_random_scenarios_hold_the_invariants(seed, flows, tunnel, mix, denied, v6, attacks, size):
    from microseg.packet.parse import parse

    cfg = {
        "seed": seed,
        "flows": flows,
        "tunnel": tunnel,
        "tls_share": mix[0],
        "dns_share": mix[1],
        "icmp_share": mix[2],
        "denied_share": denied,
        "ipv6_share": v6,
        "scan_share": attacks[0],
        "spoof_share": attacks[1],
        "invalid_share": attacks[2],
        "synflood_share": attacks[3],
        "size_alpha": size[0],
        "size_min": size[1],
        "size_max": size[2],
    }
    g = G.generate(_builtin(), cfg)
    n = len(g.batch)
    assert len(g.truth) == n and np.all(np.diff(g.batch.ts) > 0)
    keys = parse(g.batch)
    assert np.all(keys.error == 0)
    assert np.array_equal(keys.tenant, g.truth.tenant)
    counts = g.truth.summary()["by_label"]
    for label, share in zip(("port scan", "cross-tenant", "invalid tcp", "syn flood"), attacks):
        assert abs(counts.get(label, 0) - share * n) <= 0.01 * n + 3
    hosts = {h.address for h in _builtin().hosts}
    for i in range(0, n, max(1, n // 15)):
        _check_wellformed(g.batch.packet(i), tunnel, hosts)


@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs Wireshark's tshark")
def test_wireshark_finds_no_errors(policy, tmp_path):
    """tshark, with checksum validation on, reports no error (malformed packet, bad checksum)
    and reads the TLS handshakes and DNS queries."""
    g = G.generate(policy, {"flows": 200, "seed": 13, "tunnel": "geneve", "ipv6_share": 0.3})
    path = str(tmp_path / "g.pcap")
    g.write(path)
    prefs = ["-o", "tcp.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE"]
    out = subprocess.run(
        ["tshark", "-r", path, *prefs, "-q", "-z", "expert"], capture_output=True, text=True, timeout=120
    ).stdout
    assert "Errors (" not in out and "Bad checksum" not in out, out
    sni = subprocess.run(
        [
            "tshark",
            "-r",
            path,
            "-Y",
            "tls.handshake.type == 1",
            "-T",
            "fields",
            "-e",
            "tls.handshake.extensions_server_name",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.split()
    tls = [f for f in g.flows if f["label"] == "tls" and f["verdict"] == "allow"]
    clean = [f for f in tls if "out_of_window" not in f]  # a 10 MB seq jump upsets reassembly
    assert len(clean) <= len(sni) <= len(tls) and clean
    assert all(s.endswith(".internal") for s in sni)
