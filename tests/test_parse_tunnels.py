"""IP in IP and GRE carrying IP (followed: the inner packet is reported), tunnels the parser
recognises but does not follow (the carrier is reported, the tunnel named), and the unusual
but valid lengths: RFC 2675 jumbograms and BIG TCP super-frames. tshark's dissector tables
are the reference for the port and protocol numbers."""

from __future__ import annotations

import shutil
import struct
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import GRE, ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, Jumbo
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from microseg.packet import batch as B
from microseg.packet import errors as E
from microseg.packet.batch import Batch
from microseg.packet.checksum import l4_checksum_ok, l4_checksum_ok_ref
from microseg.packet.parse import parse
from microseg.packet.parse_ref import parse_batch_ref, parse_packet_ref
from test_parse_corpus import (
    ERSPAN_II,
    ERSPAN_III,
    GTPU_HEADER,
    MPLS_LABEL,
    VXLAN_GPE,
    assert_same,
    mutate,
)

M = "02:00:00:00:00:01"
IN4 = IP(src="10.0.0.1", dst="10.0.0.2", ttl=9) / TCP(sport=1111, dport=443, seq=5) / (b"i" * 20)
IN6 = IPv6(src="2001:db8::a", dst="2001:db8::b", hlim=8) / UDP(sport=2222, dport=53) / (b"j" * 20)
OUT4 = IP(src="192.0.2.1", dst="192.0.2.2")
OUT6 = IPv6(src="2001:db8:ffff::1", dst="2001:db8:ffff::2")


def one(pkt, linktype=B.LINK_ETHERNET, wire_len=None) -> dict:
    raw = bytes(pkt)
    keys = parse(
        Batch.from_packets([raw], linktype=linktype, wire_len=None if wire_len is None else [wire_len])
    )
    row = keys.row(0)
    assert row == parse_packet_ref(raw, linktype, wire_len)
    return row


def inner_only(row: dict) -> dict:
    """The fields that describe the innermost packet (not the tunnel bookkeeping)."""
    return {
        k: v
        for k, v in row.items()
        if k
        not in (
            "tenant",
            "tun_type",
            "outer_l3_off",
            "l2_off",
            "eth_src",
            "eth_dst",
            "flow_hash",
            "l3_off",
            "l4_off",
            "payload_off",
        )
    }


@pytest.mark.parametrize("outer", ["4", "6"])
@pytest.mark.parametrize("inner", ["4", "6"])
@pytest.mark.parametrize("how", ["ipip", "gre", "gre_key"])
def test_ip_in_ip_and_gre_report_the_inner_packet(outer, inner, how):
    o = OUT4 if outer == "4" else OUT6
    i = IN4 if inner == "4" else IN6
    if how == "ipip":
        pkt, tun, hl = Ether(dst=M) / o / i, B.TUN_IPIP, 0
    elif how == "gre":
        pkt, tun, hl = Ether(dst=M) / o / GRE(proto=0x0800 if inner == "4" else 0x86DD) / i, B.TUN_GRE, 4
    else:
        pkt = (
            Ether(dst=M)
            / o
            / GRE(
                proto=0x0800 if inner == "4" else 0x86DD,
                key_present=1,
                key=0x12345678,
                seqnum_present=1,
                chksum_present=1,
            )
            / i
        )
        tun, hl = B.TUN_GRE, 16
    r = one(pkt)
    alone = one(i, B.LINK_RAW)
    assert r["error"] == 0 and r["tun_type"] == tun and r["tenant"] == -1
    assert r["outer_l3_off"] == 14 and r["l2_off"] == -1 and r["eth_src"] == 0
    start = 14 + len(bytes(o)) - len(bytes(o.payload)) + hl
    assert r["l3_off"] == start and r["l4_off"] == start + alone["l4_off"]
    assert inner_only(r) == inner_only(alone)
    assert r["gre_key"] == 0 and r["gre_proto"] == 0 and r["tun_unfollowed"] == 0
    assert r["flow_hash"] == alone["flow_hash"]  # same tenant (-1), same 5-tuple


def test_ip_in_ip_inside_an_overlay_is_the_tenants_packet():
    """Inside VXLAN the tenant's own IP-in-IP or GRE packet is what policy judges (its MAC
    and addresses are the tenant's): named, not followed, the VNI kept."""
    vx = Ether(dst=M) / OUT4 / UDP(sport=5555, dport=4789) / VXLAN(vni=777) / Ether(src=M, dst=M)
    for carried, tun in (
        (IP(src="172.16.0.1", dst="172.16.0.2") / IN4, B.TUN_IPIP),
        (IPv6(src="2001:db8:1::1", dst="2001:db8:1::2") / IN6, B.TUN_IPIP),
        (IP(src="172.16.0.1", dst="172.16.0.2") / GRE(proto=0x0800) / IN4, B.TUN_GRE),
    ):
        r = one(vx / carried)
        assert (r["tenant"], r["tun_type"], r["tun_unfollowed"], r["error"]) == (777, B.TUN_VXLAN, tun, 0)
        assert B.addr_to_text(r["src_hi"], r["src_lo"]) in ("172.16.0.1", "2001:db8:1::1")
        assert r["eth_src"] == 0x020000000001 and r["l2_off"] == 14 + 20 + 8 + 8
    # a host-level IP-in-IP carrying an overlay is followed through both
    r = one(
        Ether(dst=M)
        / OUT4
        / IP(src="198.51.100.1", dst="198.51.100.2")
        / UDP(sport=5, dport=4789)
        / VXLAN(vni=5)
        / Ether(dst=M)
        / IN4
    )
    assert (r["tenant"], r["tun_type"], r["outer_l3_off"], r["dport"]) == (5, B.TUN_VXLAN, 14, 443)
    # two tunnels followed, a third is too deep
    r = one(
        Ether(dst=M)
        / OUT4
        / IP()
        / UDP(sport=5, dport=4789)
        / VXLAN(vni=7)
        / Ether(dst=M)
        / IP()
        / UDP(sport=5, dport=4789)
        / VXLAN(vni=8)
        / Ether()
        / IN4
    )
    assert r["error"] == E.TUNNEL_DEPTH


@pytest.mark.parametrize(
    "layers,name,proto",
    [
        (lambda: OUT4 / GRE(proto=0x88BE, seqnum_present=1) / ERSPAN_II / Ether() / IN4, "erspan", 47),
        (lambda: OUT6 / GRE(proto=0x88BE) / Ether() / IN4, "erspan", 47),  # type I
        (lambda: OUT4 / GRE(proto=0x22EB, seqnum_present=1) / ERSPAN_III / Ether() / IN4, "erspan", 47),
        (lambda: OUT4 / GRE(proto=0x8847) / MPLS_LABEL / IN4, "mpls", 47),
        (lambda: OUT4 / GRE(proto=0x8848) / MPLS_LABEL / IN4, "mpls", 47),
        (lambda: OUT4 / UDP(sport=40000, dport=6635) / MPLS_LABEL / IN4, "mpls", 17),
        (lambda: OUT6 / UDP(sport=40000, dport=4790) / VXLAN_GPE / IN4, "vxlan-gpe", 17),
        (lambda: OUT4 / UDP(sport=2152, dport=2152) / GTPU_HEADER / IN4, "gtp-u", 17),
        (lambda: IP(src="192.0.2.1", dst="192.0.2.2", proto=137) / MPLS_LABEL / IN4, "mpls", 137),
        (lambda: IP(src="192.0.2.1", dst="192.0.2.2", proto=97) / b"\x30\x00" / Ether() / IN4, "etherip", 97),
        (lambda: IP(src="192.0.2.1", dst="192.0.2.2", flags="MF") / IN4, "ipip", 4),
        (lambda: OUT6 / IPv6ExtHdrFragment(m=1, nh=47) / GRE(proto=0x0800) / IN4, "gre", 47),
    ],
)
def test_tunnels_not_followed_report_the_carrier(layers, name, proto):
    r = one(Ether(dst=M) / layers())
    assert r["error"] == 0 and B.TUN_NAMES[r["tun_unfollowed"]] == name
    assert r["tun_type"] == 0 and r["tenant"] == -1 and r["outer_l3_off"] == -1
    assert r["proto"] == proto and r["l3_off"] == 14 and r["l2_off"] == 0
    assert B.addr_to_text(r["src_hi"], r["src_lo"]) in ("192.0.2.1", "2001:db8:ffff::1")


def test_gre_that_is_no_tunnel_stays_as_it_was():
    for g in (GRE(proto=0x6558), GRE(proto=0x0806), GRE(proto=0x880B)):  # TEB without key, ARP, PPP
        r = one(Ether(dst=M) / OUT4 / g / (b"k" * 30))
        assert (r["tun_type"], r["tun_unfollowed"], r["error"]) == (0, 0, 0)
        assert r["flags"] & B.F_GRE and r["gre_proto"] == g.proto


def test_tunnels_in_raw_ip_and_cooked_captures():
    from test_parse_corpus import sll2

    r = one(bytes(OUT4 / IN4), B.LINK_RAW)
    assert (r["tun_type"], r["outer_l3_off"], r["l3_off"], r["dport"]) == (B.TUN_IPIP, 0, 20, 443)
    r = one(sll2(bytes(OUT6 / GRE(proto=0x86DD) / IN6), 0x86DD), B.LINK_LINUX_SLL2)
    assert (r["tun_type"], r["outer_l3_off"], r["l3_off"], r["dport"]) == (B.TUN_GRE, 20, 64, 53)


needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")


@needs_tshark
def test_tunnel_numbers_are_wiresharks():
    """Every number the parser treats as a tunnel is one tshark's dissector tables bind to
    the same tunnel protocol."""
    out = subprocess.run(["tshark", "-G", "decodes"], check=True, capture_output=True, text=True).stdout
    table = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            table[(parts[0], parts[1])] = parts[2]
    want = {
        ("udp.port", "4789"): "vxlan",
        ("udp.port", "6081"): "geneve",
        ("udp.port", "4790"): "vxlan_gpe",
        ("udp.port", "6635"): "mpls",
        ("udp.port", "2152"): "gtp",
        ("gre.proto", str(0x88BE)): "erspan",
        ("gre.proto", str(0x22EB)): "erspan",
        ("gre.proto", str(0x8847)): "mpls",
        ("gre.proto", str(0x8848)): "mpls",
        ("gre.proto", str(0x6558)): "eth",
        ("gre.proto", str(0x0800)): "ip",
        ("gre.proto", str(0x86DD)): "ipv6",
        ("ip.proto", "4"): "ip",
        ("ip.proto", "41"): "ipv6",
        ("ip.proto", "137"): "mpls",
        ("ip.proto", "97"): "etherip",
    }
    for key, proto in want.items():
        assert table.get(key) == proto, (key, table.get(key))


# ---------------------------------------------------------------------------------------------
# jumbograms and BIG TCP
# ---------------------------------------------------------------------------------------------
def jumbogram(payload_len: int, udp: bool = False, jumbo_len: int | None = None) -> bytes:
    """An Ethernet IPv6 jumbogram (RFC 2675) with a TCP or UDP payload of ``payload_len``."""
    l4 = (UDP(sport=7, dport=9, len=0) if udp else TCP(sport=7, dport=9, seq=1000)) / (b"J" * payload_len)
    seg = bytes(l4)
    hbh = bytes(IPv6ExtHdrHopByHop(nh=17 if udp else 6, options=[Jumbo(jumboplen=0)]))
    n = len(hbh) + len(seg) if jumbo_len is None else jumbo_len
    hbh = hbh[:4] + struct.pack(">I", n) + hbh[8:]
    ip6 = IPv6(src="2001:db8::1", dst="2001:db8::2", nh=0, plen=0)
    full = bytes(ip6)[:40] + hbh + seg
    # fill in the L4 checksum over the 32-bit upper-layer length
    from microseg.packet.checksum import inet_checksum, pseudo_header_sum

    seg = bytearray(seg)
    at = 6 if udp else 16
    seg[at : at + 2] = b"\0\0"
    c = inet_checksum(seg, pseudo_header_sum(full[8:24], full[24:40], 17 if udp else 6, len(seg)))
    seg[at : at + 2] = c.to_bytes(2, "big")
    return bytes(Ether(dst=M, type=0x86DD)) + full[:48] + bytes(seg)


def test_ipv6_jumbogram():
    for udp in (False, True):
        p = jumbogram(70_000, udp)
        r = one(p)
        assert r["error"] == 0 and r["flags2"] == B.F2_JUMBO, E.name(r["error"])
        assert r["ip_len"] == 40 + 8 + (8 if udp else 20) + 70_000
        assert r["payload_len"] == 70_000 and r["proto"] == (17 if udp else 6)
        assert r["dport"] == 9
        b = Batch.from_packets([p])
        k = parse(b)
        assert l4_checksum_ok(b, k).tolist() == [True] == l4_checksum_ok_ref(b, k).tolist()
        bad = bytearray(p)
        bad[-1] ^= 1
        b = Batch.from_packets([bytes(bad)])
        assert l4_checksum_ok(b, parse(b)).tolist() == [False]
    # RFC 2675: a jumbo length that fits in the payload length field is an error, as is
    # one beyond the frame
    assert one(jumbogram(100, jumbo_len=65535 - 10))["error"] == E.BAD_IPV6_EXT
    assert one(jumbogram(70_000, jumbo_len=80_000))["error"] == E.BAD_IPV6_LEN
    # snapped: the lengths still come from the jumbo option
    p = jumbogram(70_000)
    r = one(p[:200], wire_len=len(p))
    assert (r["error"], r["payload_len"], r["flags2"]) == (0, 70_000, B.F2_JUMBO | B.F2_TRUNCATED)


def test_big_tcp_super_frames():
    pay = b"G" * 100_000
    v4 = bytearray(
        bytes(
            Ether(dst=M)
            / IP(src="10.0.0.1", dst="10.0.0.2", flags="DF", len=0)
            / TCP(sport=5201, dport=40000, seq=77)
            / pay[:1000]
        )
    )
    v4 = bytes(v4[: 14 + 40]) + pay  # total length 0, the frame as long as it is
    from microseg.packet.checksum import ipv4_header_checksum

    hdr = bytearray(v4[14:34])
    hdr[2:4] = b"\0\0"
    hdr[10:12] = ipv4_header_checksum(hdr).to_bytes(2, "big")
    v4 = v4[:14] + bytes(hdr) + v4[34:]
    r = one(v4)
    assert r["error"] == 0 and r["flags2"] == B.F2_BIG_TCP
    assert (r["ip_len"], r["payload_len"], r["sport"], r["tcp_seq"]) == (20 + 20 + 100_000, 100_000, 5201, 77)
    v6 = (
        bytearray(
            bytes(
                Ether(dst=M)
                / IPv6(src="2001:db8::1", dst="2001:db8::2", plen=0)
                / TCP(sport=5201, dport=40000)
            )
        )[: 14 + 60]
        + pay
    )
    r = one(bytes(v6))
    assert r["error"] == 0 and r["flags2"] == B.F2_BIG_TCP
    assert (r["ip_len"], r["payload_len"]) == (40 + 20 + 100_000, 100_000)
    # snapped, as a capture of a GSO frame usually is: the wire length gives the size
    r = one(v4[:128], wire_len=len(v4))
    assert (r["error"], r["payload_len"], r["flags2"]) == (0, 100_000, B.F2_BIG_TCP | B.F2_TRUNCATED)
    # super-frame checksums are the offload's partial sums: not judged
    b = Batch.from_packets([v4, bytes(v6)])
    assert l4_checksum_ok(b, parse(b)).all()
    # total length 0 on something that is not a TCP super-frame stays a length error
    for bad in (
        Ether(dst=M) / IP(len=0, proto=17) / UDP() / pay[:100],
        Ether(dst=M) / IP(len=0, flags="MF", proto=6) / TCP() / pay[:100],
    ):
        assert one(bad)["error"] == E.BAD_IPV4_LEN


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_kernel_matches_reference_on_damaged_jumbos_and_tunnels(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    base = [
        jumbogram(66_000),
        jumbogram(66_000, True),
        bytes(Ether(dst=M) / OUT4 / IN4),
        bytes(Ether(dst=M) / OUT6 / GRE(proto=0x86DD) / IN6),
        bytes(Ether(dst=M) / OUT4 / GRE(proto=0x88BE, seqnum_present=1) / ERSPAN_II / Ether() / IN4),
        bytes(Ether(dst=M) / OUT4 / UDP(dport=4789) / VXLAN(vni=3) / Ether() / OUT6 / IN4),
        bytes(Ether(dst=M) / IP(dst="10.9.9.9") / ICMP(type=3) / OUT4 / IN4),
    ]
    pk, wl = [], []
    for _ in range(20):
        p = base[int(rng.integers(0, len(base)))]
        if len(p) > 2000:  # keep the head of the jumbos: where the parser reads
            cut = int(rng.integers(0, 400))
            m = bytearray(p[:cut])
            for _ in range(int(rng.integers(0, 3))):
                if m:
                    m[int(rng.integers(0, len(m)))] = int(rng.integers(0, 256))
            pk.append(bytes(m))
            wl.append(len(p) + int(rng.choice([0, -1, 1, 65536])))
        else:
            m = mutate(p, B.LINK_ETHERNET, rng)
            pk.append(m)
            wl.append(len(m) + int(rng.choice([0, 0, 30])))
    batch = Batch.from_packets(pk, wire_len=np.maximum(wl, 0))
    assert_same(parse(batch), parse_batch_ref(batch), pk)


@needs_tshark
def test_jumbograms_agree_with_tshark(tmp_path):
    """tshark reads the same jumbo length, TCP payload length and checksum verdicts (good on
    the whole frames, not verified on the snapped one)."""
    from test_parse_linktypes import write_pcap

    p, q = jumbogram(70_000), jumbogram(70_000, True)
    frames, wire = [p, q, p[:200]], [len(p), len(q), len(p)]
    write_pcap(tmp_path / "j.pcap", frames, 1, wire)
    out = subprocess.run(
        [
            "tshark",
            "-n",
            "-r",
            str(tmp_path / "j.pcap"),
            "-o",
            "tcp.check_checksum:TRUE",
            "-o",
            "udp.check_checksum:TRUE",
            "-T",
            "fields",
            "-e",
            "ipv6.opt.jumbo",
            "-e",
            "tcp.len",
            "-e",
            "tcp.checksum.status",
            "-e",
            "udp.checksum.status",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    rows = [line.split("\t") for line in out]
    batch = Batch.from_packets(frames, wire_len=wire)
    keys = parse(batch)
    ok = l4_checksum_ok(batch, keys)
    for i, (jumbo, tcp_len, tcp_ok, udp_ok) in enumerate(rows):
        assert int(jumbo) + 40 == keys.ip_len[i]
        if tcp_len:
            assert int(tcp_len) == keys.payload_len[i]
        status = tcp_ok or udp_ok  # 1 good, 2 unverified
        assert (status == "1") == (ok[i] and not keys.flags2[i] & B.F2_TRUNCATED)
    assert [bool(k & B.F2_TRUNCATED) for k in keys.flags2] == [False, False, True]
