"""Snapped captures (captured length < length on the wire, as `tcpdump -s` writes them): the
headers that were captured decode as in the full capture, lengths come from the headers,
the packet says it was truncated, and conntrack gives the Linux kernel's states as on the
full capture."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from microseg import ctstate as CS
from microseg.conntrack import ConntrackTable
from microseg.io.pcap import read_capture
from microseg.packet import batch as B
from microseg.packet import errors as E
from microseg.packet.batch import Batch
from microseg.packet.checksum import l4_checksum_ok, l4_checksum_ok_ref
from microseg.packet.parse import parse
from microseg.packet.parse_ref import parse_batch_ref, parse_packet_ref
from test_parse_corpus import assert_same, templates

VEC = Path(__file__).parent / "vectors" / "conntrack"
CASES = sorted(p.stem for p in VEC.glob("*.pcap"))
SNAP = 96
# what a header cut by the snap is reported as
CUT_CODES = {
    E.TRUNC_ETH,
    E.TRUNC_VLAN,
    E.TRUNC_ARP,
    E.TRUNC_IPV4,
    E.TRUNC_IPV6,
    E.BAD_IPV6_EXT,
    E.TRUNC_TCP,
    E.TRUNC_UDP,
    E.TRUNC_SCTP,
    E.TRUNC_ICMP,
    E.TRUNC_ICMP_INNER,
    E.TRUNC_ESP,
    E.TRUNC_GRE,
    E.TRUNC_TUNNEL,
    E.TRUNC_LINK,
}
M = "02:00:00:00:00:01"


def snapped(packets, snap: int, linktype: int = B.LINK_ETHERNET) -> Batch:
    """The batch a capture with snap length ``snap`` holds of ``packets``."""
    return Batch.from_packets(
        [p[:snap] for p in packets], linktype=linktype, wire_len=[len(p) for p in packets]
    )


def without_truncated_bit(keys) -> np.ndarray:
    return keys.flags2 & ~np.uint8(B.F2_TRUNCATED)


def assert_same_but_truncated(full, snap, i=None):
    """Every field of ``snap`` equals ``full``'s, except the truncated bit."""
    rows = range(full.n) if i is None else [i]
    for j in rows:
        a, b = full.row(j), snap.row(j)
        a["flags2"] &= ~B.F2_TRUNCATED
        b["flags2"] &= ~B.F2_TRUNCATED
        assert a == b, (j, {k: (a[k], b[k]) for k in a if a[k] != b[k]})


# ---------------------------------------------------------------------------------------------
# crafted
# ---------------------------------------------------------------------------------------------
def test_snapped_tcp_keeps_ports_and_lengths():
    p = bytes(
        Ether(dst=M) / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=4000, dport=80, seq=7) / (b"x" * 1000)
    )
    full = parse(Batch.from_packets([p]))
    snap = parse(snapped([p], 64))
    assert full.error[0] == 0 and snap.error[0] == 0
    assert snap.flags2[0] == B.F2_TRUNCATED and full.flags2[0] == 0
    assert (snap.sport[0], snap.dport[0], snap.tcp_seq[0]) == (4000, 80, 7)
    assert snap.payload_len[0] == full.payload_len[0] == 1000
    assert snap.ip_len[0] == 1040
    assert_same_but_truncated(full, snap)
    # the same bytes without the wire length: a capture that lies about the IP length
    lying = parse(Batch.from_packets([p[:64]]))
    assert lying.error[0] == E.BAD_IPV4_LEN and lying.flags2[0] == 0


def test_length_errors_truncation_cannot_explain():
    base = Ether(dst=M) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / (b"u" * 300)
    p = bytearray(bytes(base))
    # IP total length beyond the frame on the wire
    q = bytes(
        Ether(dst=M) / IP(src="10.0.0.1", dst="10.0.0.2", len=2000) / UDP(sport=1, dport=2) / (b"u" * 300)
    )
    assert parse(snapped([q], 80)).error[0] == E.BAD_IPV4_LEN
    # total length shorter than the header
    r = bytes(Ether(dst=M) / IP(src="10.0.0.1", dst="10.0.0.2", len=12) / UDP() / (b"u" * 300))
    assert parse(snapped([r], 80)).error[0] == E.BAD_IPV4_LEN
    # UDP length beyond the IP datagram, IPv6 payload length beyond the frame
    p[14 + 20 + 4 : 14 + 20 + 6] = (1000).to_bytes(2, "big")
    assert parse(snapped([bytes(p)], 80)).error[0] == E.BAD_UDP_LEN
    v6 = bytearray(bytes(Ether(dst=M) / IPv6() / UDP(sport=1, dport=2) / (b"u" * 300)))
    v6[14 + 4 : 14 + 6] = (5000).to_bytes(2, "big")
    assert parse(snapped([bytes(v6)], 80)).error[0] == E.BAD_IPV6_LEN
    # the same packets intact and merely snapped: no error
    for pkt in (bytes(base), bytes(Ether(dst=M) / IPv6() / UDP(sport=1, dport=2) / (b"u" * 300))):
        k = parse(snapped([pkt], 70))
        assert k.error[0] == 0 and k.flags2[0] == B.F2_TRUNCATED and k.payload_len[0] == 300


def test_header_cut_by_the_snap_is_a_truncation_error():
    p = bytes(Ether(dst=M) / IPv6(src="2001:db8::1", dst="2001:db8::2") / TCP(dport=9) / (b"y" * 50))
    k = parse(snapped([p], 14 + 40 + 10))
    assert k.error[0] == E.TRUNC_TCP and k.flags2[0] & B.F2_TRUNCATED
    assert B.addr_to_text(int(k.src_hi[0]), int(k.src_lo[0])) == "2001:db8::1"
    assert k.ip_len[0] == 40 + 20 + 50
    # TCP options cut, fixed header whole: decoded, no error
    p = bytes(
        Ether(dst=M)
        / IP()
        / TCP(dport=9, options=[("MSS", 1460), ("WScale", 7), ("SAckOK", b"")])
        / (b"y" * 50)
    )
    k = parse(snapped([p], 14 + 20 + 22))
    assert k.error[0] == 0 and k.tcp_doff[0] == 32 and k.payload_len[0] == 50


def test_padding_cut_is_not_truncation():
    p = bytes(Ether(dst=M) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / b"ab") + bytes(16)
    k = parse(snapped([p], len(p) - 10))
    assert k.error[0] == 0 and k.flags2[0] == 0 and k.payload_len[0] == 2


def test_checksum_of_a_truncated_segment_is_not_judged():
    good = bytes(Ether(dst=M) / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2) / (b"z" * 400))
    bad = bytearray(good)
    bad[-1] ^= 0xFF  # wrong checksum, in the part the snap drops
    b = snapped([good, bytes(bad)], 100)
    k = parse(b)
    assert l4_checksum_ok(b, k).tolist() == [True, True] == l4_checksum_ok_ref(b, k).tolist()
    full = Batch.from_packets([good, bytes(bad)])
    assert l4_checksum_ok(full, parse(full)).tolist() == [True, False]
    # a captured segment is still verified when only padding was cut
    pad = bytes(bad) + bytes(20)
    b = Batch.from_packets([pad[: len(bad)]], wire_len=[len(pad)])
    assert l4_checksum_ok(b, parse(b)).tolist() == [False]


# ---------------------------------------------------------------------------------------------
# every snap length of every template
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus():
    return [(p, lt) for p, lt in templates(seed=3, rounds=2)]


def test_every_snap_of_every_template(corpus):
    """Kernel == reference on every snap length; what was captured decodes as in full."""
    for lt in sorted({lt for _, lt in corpus}):
        pk = [p for p, l in corpus if l == lt]
        cuts = [(p, k) for p in pk for k in range(len(p))]
        batch = Batch.from_packets([p[:k] for p, k in cuts], linktype=lt, wire_len=[len(p) for p, _ in cuts])
        keys = parse(batch)
        assert_same(keys, parse_batch_ref(batch), [p[:k] for p, k in cuts])
        full = {p: parse_packet_ref(p, lt) for p in pk}
        for j, (p, k) in enumerate(cuts):
            f, s = full[p], keys.row(j)
            if s["error"] == f["error"] == 0:
                # nothing the parser reads was cut: the same packet, truncated or not
                assert {**s, "flags2": s["flags2"] & ~B.F2_TRUNCATED} == f, (lt, p.hex(), k)
            elif s["error"] != f["error"]:
                assert s["error"] in CUT_CODES, (E.name(s["error"]), p.hex(), k)
                assert s["flags2"] & B.F2_TRUNCATED
                if f["tun_type"] == 0 and f["l4_off"] >= 0 and k >= f["l4_off"] and not f["error"]:
                    for name in (
                        "src_hi",
                        "src_lo",
                        "dst_hi",
                        "dst_lo",
                        "proto",
                        "ip_ver",
                        "ttl",
                        "ip_len",
                        "l3_off",
                        "l4_off",
                        "frag_off",
                        "ethertype",
                        "vlan0",
                    ):
                        assert s[name] == f[name], (name, p.hex(), k)
        assert (keys.flags2 & B.F2_TRUNCATED).any()


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_snapped_mutations_match_reference(corpus, data):
    """Damaged packets with a wire length beyond what was captured."""
    from test_parse_corpus import mutate

    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    pk, wl = [], []
    for _ in range(50):
        p, lt = corpus[int(rng.integers(0, len(corpus)))]
        if lt != B.LINK_ETHERNET:
            continue
        m = mutate(p, lt, rng)
        cut = int(rng.integers(0, len(m) + 1))
        pk.append(m[:cut])
        wl.append(len(m) + int(rng.choice([0, 0, 1, 100, 70000])))
    batch = Batch.from_packets(pk, wire_len=wl)
    assert_same(parse(batch), parse_batch_ref(batch), pk)


# ---------------------------------------------------------------------------------------------
# the Linux conntrack vectors, snapped with editcap
# ---------------------------------------------------------------------------------------------
needs_editcap = pytest.mark.skipif(shutil.which("editcap") is None, reason="editcap is not installed")


def _editcap_snap(src: Path, dst: Path, snap: int = SNAP) -> Batch:
    subprocess.run(["editcap", "-s", str(snap), str(src), str(dst)], check=True, capture_output=True)
    return read_capture(dst)


def _kernel_states(name):
    return [r.split(",")[1] for r in (VEC / f"{name}.csv").read_text().split()[1:]]


@needs_editcap
@pytest.mark.parametrize("name", CASES)
def test_snapped_vector_same_conntrack_states(tmp_path, name):
    full = read_capture(VEC / f"{name}.pcap")
    snap = _editcap_snap(VEC / f"{name}.pcap", tmp_path / "snap.pcap")
    assert len(snap) == len(full)
    assert np.array_equal(snap.wire_len, full.wire_len)
    kf, ks = parse(full), parse(snap)
    cut = ks.error != kf.error  # a header conntrack needs is past the snap
    # only ICMPv6 errors, whose quoted IPv6 header does not fit in 96 bytes, lose one
    assert (ks.error[cut] == E.TRUNC_ICMP_INNER).all()
    assert (ks.proto[cut] == 58).all()
    states_full = [CS.state_name(s) for s in ConntrackTable(4096).process(full, kf)]
    states_snap = [CS.state_name(s) for s in ConntrackTable(4096).process(snap, ks)]
    want = _kernel_states(name)
    assert states_full == want
    for i, (w, g) in enumerate(zip(want, states_snap)):
        if cut[i]:
            assert g == "invalid"  # cannot be matched to the connection it quotes
        else:
            assert g == w, (i, w, g)


@needs_editcap
def test_snapped_vectors_cover_truncation(tmp_path):
    """The vectors the test above snaps do have packets longer than the snap length, with
    data (sequence tracking), and their decoded fields equal the full capture's."""
    n_trunc = n_data = 0
    for name in CASES:
        full = read_capture(VEC / f"{name}.pcap")
        snap = _editcap_snap(VEC / f"{name}.pcap", tmp_path / f"{name}.pcap")
        kf, ks = parse(full), parse(snap)
        trunc = (ks.flags2 & B.F2_TRUNCATED) != 0
        assert np.array_equal(trunc, snap.length < snap.wire_len)
        same = ks.error == kf.error
        for i in np.flatnonzero(same):
            assert_same_but_truncated(kf, ks, int(i))
        n_trunc += int(trunc.sum())
        n_data += int((trunc & (ks.proto == 6) & (ks.payload_len > SNAP)).sum())
        ok_full = l4_checksum_ok(full, kf)
        ok_snap = l4_checksum_ok(snap, ks)
        assert ok_snap[trunc & (ks.error == 0)].all()
        assert np.array_equal(ok_snap[~trunc], ok_full[~trunc])
    assert n_trunc > 300 and n_data > 100
