"""Field-level checks of the kernel against scapy's view of the same bytes, the ESP vectors, and
crafted malformed packets (error codes); hypothesis drives kernel == reference on damage."""

from __future__ import annotations

import ipaddress
import json
import os

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.contrib.geneve import GENEVE
from scapy.layers.inet import GRE, ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.layers.vxlan import VXLAN

from microseg.packet import batch as B
from microseg.packet import errors as E
from microseg.packet.batch import Batch, FlowKeys, text_to_addr
from microseg.packet.parse import parse
from microseg.packet.parse_ref import parse_batch_ref, parse_packet_ref
from test_parse_corpus import assert_same, mutate, templates

M1, M2 = "02:00:00:00:00:01", "02:00:00:00:00:02"
VECTORS = os.path.join(os.path.dirname(__file__), "vectors")


def one(pkt, linktype=1) -> dict:
    raw = bytes(pkt)
    keys = parse(Batch.from_packets([raw], linktype=linktype))
    row = keys.row(0)
    assert row == parse_packet_ref(raw, linktype)
    return row


def addr(row, which="src"):
    return B.addr_to_text(row[f"{which}_hi"], row[f"{which}_lo"])


def mac_int(m):
    return int(m.replace(":", ""), 16)


def test_tcp_over_ipv4_every_field():
    p = (
        Ether(src=M1, dst=M2)
        / IP(src="10.1.1.1", dst="10.2.2.2", ttl=33, options=b"\x01" * 8)
        / TCP(
            sport=40000,
            dport=443,
            seq=0xDEADBEEF,
            ack=0x01020304,
            flags="SECU",
            window=4321,
            options=[("MSS", 1400), ("NOP", None), ("NOP", None)],
        )
        / (b"p" * 17)
    )
    r = one(p)
    s = Ether(bytes(p))
    assert r["error"] == 0 and r["ip_ver"] == 4 and r["ethertype"] == 0x0800
    assert (r["eth_src"], r["eth_dst"]) == (mac_int(M1), mac_int(M2))
    assert (addr(r), addr(r, "dst")) == ("10.1.1.1", "10.2.2.2")
    assert (r["src_hi"], r["src_lo"]) == text_to_addr("10.1.1.1")
    assert (r["ttl"], r["proto"], r["ip_len"]) == (33, 6, s[IP].len)
    assert (r["sport"], r["dport"], r["tcp_seq"], r["tcp_ack"]) == (40000, 443, 0xDEADBEEF, 0x01020304)
    assert (r["tcp_flags"], r["tcp_win"], r["tcp_doff"]) == (int(s[TCP].flags), 4321, s[TCP].dataofs * 4)
    assert (r["l2_off"], r["l3_off"], r["l4_off"]) == (0, 14, 14 + 28)
    assert (r["payload_off"], r["payload_len"]) == (14 + 28 + 28, 17)
    assert r["flags"] == B.F_PORTS and r["tenant"] == -1 and r["outer_l3_off"] == -1
    assert r["tun_type"] == 0 and r["flow_hash"] != 0


def test_ethernet_padding_is_not_payload():
    p = Ether(dst=M1) / IP(src="1.1.1.1", dst="2.2.2.2") / UDP(sport=1, dport=2) / b"ab"
    raw = bytes(p) + b"\0" * 16  # padded to the 60-byte minimum
    r = parse_packet_ref(raw)
    k = parse(Batch.from_packets([raw])).row(0)
    assert k == r and r["payload_len"] == 2 and r["error"] == 0


def test_vlan_and_qinq():
    r = one(Ether(dst=M1) / Dot1AD(vlan=100, prio=5) / Dot1Q(vlan=200) / IPv6(src="::1", dst="::2") / UDP())
    assert (r["n_vlans"], r["vlan0"] & 0xFFF, r["vlan1"] & 0xFFF, r["vlan0"] >> 13) == (2, 100, 200, 5)
    assert r["l3_off"] == 22 and r["ethertype"] == 0x86DD and r["ip_ver"] == 6
    r = one(Ether(dst=M1) / Dot1Q(vlan=1) / Dot1Q(vlan=2) / Dot1Q(vlan=3) / IP())
    assert (r["n_vlans"], r["ethertype"], r["ip_ver"], r["error"]) == (2, 0x8100, 0, 0)


def test_arp():
    p = Ether(dst=M1) / ARP(op=2, hwsrc=M1, hwdst=M2, psrc="10.0.0.5", pdst="10.0.0.6")
    r = one(p)
    assert r["flags"] == B.F_ARP and r["arp_op"] == 2 and r["ip_ver"] == 0
    assert (r["arp_sha"], r["arp_tha"]) == (mac_int(M1), mac_int(M2))
    assert (addr(r), addr(r, "dst")) == ("10.0.0.5", "10.0.0.6")
    assert one(Ether(dst=M1) / ARP(ptype=0x86DD))["error"] == E.BAD_ARP
    assert one(Ether(dst=M1) / ARP())["error"] == 0


def test_ipv4_fragments():
    first = one(Ether(dst=M1) / IP(flags="MF", id=7) / UDP(sport=5, dport=6, len=2000) / (b"x" * 100))
    assert first["flags"] == B.F_FRAG | B.F_MF | B.F_PORTS and first["frag_off"] == 0
    assert (first["sport"], first["dport"], first["error"]) == (5, 6, 0)
    later = one(Ether(dst=M1) / IP(frag=185, proto=17) / (b"x" * 100))
    assert later["flags"] == B.F_FRAG and later["frag_off"] == 185 and later["l4_off"] == -1
    assert (later["sport"], later["payload_off"], later["payload_len"]) == (0, 34, 100)
    last = one(Ether(dst=M1) / IP(frag=3, proto=6) / (b"x" * 8))
    assert last["flags"] == B.F_FRAG and last["frag_off"] == 3


def test_ipv6_extension_chain_and_fragments():
    p = (
        Ether(dst=M1)
        / IPv6(src="2001:db8::1", dst="2001:db8::2", hlim=9)
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrRouting(addresses=["2001:db8::3"])
        / IPv6ExtHdrFragment(m=1, offset=0, id=1)
        / TCP(sport=1, dport=2)
    )
    r = one(p)
    s = Ether(bytes(p))
    assert (r["proto"], r["ttl"], r["error"]) == (6, 9, 0)
    assert r["l4_off"] == 14 + 40 + 8 + 24 + 8
    assert r["flags"] == B.F_FRAG | B.F_MF | B.F_PORTS and r["ip_len"] == s[IPv6].plen + 40
    later = one(Ether(dst=M1) / IPv6() / IPv6ExtHdrFragment(nh=17, offset=100) / (b"y" * 40))
    assert (later["frag_off"], later["proto"], later["l4_off"], later["payload_len"]) == (100, 17, -1, 40)
    assert (
        one(Ether(dst=M1) / IPv6() / IPv6ExtHdrRouting() / IPv6ExtHdrHopByHop() / UDP())["error"]
        == E.BAD_IPV6_EXT
    )
    deep = Ether(dst=M1) / IPv6()
    for _ in range(9):
        deep = deep / IPv6ExtHdrRouting()
    assert one(deep / UDP())["error"] == E.BAD_IPV6_EXT


def test_icmp_echo_and_errors():
    r = one(Ether(dst=M1) / IP() / ICMP(type=8, code=0, id=0x1234, seq=9))
    assert (r["icmp_type"], r["icmp_code"], r["icmp_id"], r["flags"]) == (8, 0, 0x1234, B.F_ICMP)
    q = (
        Ether(dst=M1)
        / IP(src="9.9.9.9", dst="1.1.1.1")
        / ICMP(type=3, code=3)
        / IP(src="1.1.1.1", dst="8.8.8.8")
        / UDP(sport=5353, dport=53)
    )
    r = one(q)
    assert r["flags"] == B.F_ICMP | B.F_ICMP_ERR and r["inner_proto"] == 17
    assert (addr(r, "inner_src"), addr(r, "inner_dst")) == ("1.1.1.1", "8.8.8.8")
    assert (r["inner_sport"], r["inner_dport"]) == (5353, 53)
    r = one(Ether(dst=M1) / IP() / ICMP(type=11) / IP() / ICMP(type=8, id=77))
    assert (r["inner_proto"], r["inner_icmp_type"], r["inner_sport"]) == (1, 8, 77)
    r = one(
        Ether(dst=M1)
        / IPv6(src="2001:db8::9")
        / ICMPv6DestUnreach(code=4)
        / IPv6(src="2001:db8::1", dst="2001:db8::2")
        / TCP(sport=80, dport=9999)
    )
    assert r["flags"] == B.F_ICMP | B.F_ICMP_ERR and (r["icmp_type"], r["icmp_code"]) == (1, 4)
    assert (addr(r, "inner_src"), r["inner_proto"], r["inner_sport"], r["inner_dport"]) == (
        "2001:db8::1",
        6,
        80,
        9999,
    )
    r = one(Ether(dst=M1) / IPv6() / ICMPv6EchoRequest(id=5))
    assert (r["icmp_type"], r["icmp_id"]) == (128, 5)
    quoted = bytes(IP(src="1.1.1.1", dst="8.8.8.8") / UDP(sport=5353, dport=53))[:24]
    r = one(Ether(dst=M1) / IP() / ICMP(type=3, code=3) / quoted)
    assert r["error"] == E.TRUNC_ICMP_INNER and not r["flags"] & B.F_ICMP_ERR
    assert one(Ether(dst=M1) / IP() / ICMP(type=3) / IPv6())["error"] == E.BAD_ICMP_INNER


def test_esp_and_gre():
    r = one(
        Ether(dst=M1) / IP() / GRE(key_present=1, key=0xAABBCCDD, seqnum_present=1, proto=0x1234) / (b"x" * 9)
    )
    assert r["flags"] == B.F_GRE and (r["gre_proto"], r["gre_key"]) == (0x1234, 0xAABBCCDD)
    assert r["payload_off"] == 14 + 20 + 12 and r["payload_len"] == 9 and r["tun_type"] == 0
    assert r["tun_unfollowed"] == 0
    assert one(Ether(dst=M1) / IP() / GRE(version=1) / b"xxxx")["error"] == E.BAD_GRE
    assert one(Ether(dst=M1) / IP() / GRE(routing_present=1) / b"xxxx")["error"] == E.BAD_GRE


def test_esp_vectors():
    """SPI and sequence number of every frame of the shared ESP vectors (scapy + tshark made)."""
    from microseg.io.pcap import read_capture

    with open(os.path.join(VECTORS, "ipsec", "vectors.json")) as f:
        vec = json.load(f)
    spi = {sa["name"]: int(sa["spi"], 0) if isinstance(sa["spi"], str) else sa["spi"] for sa in vec["sas"]}
    batch = read_capture(os.path.join(VECTORS, "ipsec", "esp.pcap"))
    keys = parse(batch)
    assert len(batch) == len(vec["packets"])
    for p in vec["packets"]:
        i = p["index"]
        assert keys.error[i] == 0 and keys.flags[i] & B.F_ESP and keys.proto[i] == 50
        assert (int(keys.esp_spi[i]), int(keys.esp_seq[i])) == (spi[p["sa"]], p["seq"])
    # the inner packets they carry parse as raw IP, agreeing with scapy
    inner = [bytes.fromhex(p["inner_hex"]) for p in vec["packets"]]
    ik = parse(Batch.from_packets(inner, linktype=B.LINK_RAW))
    for i, raw in enumerate(inner):
        s = IPv6(raw) if raw[0] >> 4 == 6 else IP(raw)
        assert ik.error[i] == 0
        assert B.addr_to_text(int(ik.src_hi[i]), int(ik.src_lo[i])) == str(ipaddress.ip_address(s.src))
        l4 = s[TCP] if TCP in s else s[UDP]
        assert (int(ik.sport[i]), int(ik.dport[i])) == (l4.sport, l4.dport)


def test_tunnels():
    inner = Ether(src=M1, dst=M2) / IP(src="172.16.0.1", dst="172.16.0.2") / TCP(sport=7, dport=8)
    r = one(
        Ether(dst=M1)
        / IP(src="192.0.2.1", dst="192.0.2.2")
        / UDP(sport=999, dport=4789)
        / VXLAN(vni=0xABCDE)
        / inner
    )
    assert (r["tun_type"], r["tenant"], r["outer_l3_off"], r["l2_off"], r["l3_off"]) == (
        B.TUN_VXLAN,
        0xABCDE,
        14,
        50,
        64,
    )
    assert (addr(r), r["sport"], r["dport"], r["eth_src"]) == ("172.16.0.1", 7, 8, mac_int(M1))
    r = one(
        Ether(dst=M1)
        / IPv6()
        / UDP(dport=6081)
        / GENEVE(vni=77, options=b"\x00\x01\x02\x02" + b"o" * 8)
        / inner
    )
    assert (r["tun_type"], r["tenant"], r["outer_l3_off"], r["l2_off"]) == (
        B.TUN_GENEVE,
        77,
        14,
        14 + 40 + 8 + 8 + 12,
    )
    r = one(
        Ether(dst=M1)
        / IP()
        / UDP(dport=6081)
        / GENEVE(vni=78, proto=0x86DD)
        / IPv6(src="2001:db8::7")
        / UDP(sport=1, dport=2)
    )
    assert (r["tenant"], r["l2_off"], r["ethertype"], addr(r)) == (78, -1, 0x86DD, "2001:db8::7")
    r = one(Ether(dst=M1) / IP() / GRE(key_present=1, key=(5000 << 8) | 0x2A, proto=0x6558) / inner)
    assert (r["tun_type"], r["tenant"], r["gre_key"], r["flags"]) == (B.TUN_NVGRE, 5000, 0, B.F_PORTS)
    # VXLAN without the I flag, GENEVE version 1, unknown GENEVE protocol: error, outer kept
    for bad in (VXLAN(flags=0, vni=1),):
        r = one(Ether(dst=M1) / IP() / UDP(dport=4789) / bad / inner)
        assert (r["error"], r["tenant"], r["dport"]) == (E.BAD_TUNNEL, -1, 4789)
    r = one(Ether(dst=M1) / IP() / UDP(dport=6081) / GENEVE(version=1) / inner)
    assert r["error"] == E.BAD_TUNNEL
    r = one(Ether(dst=M1) / IP() / UDP(dport=6081) / GENEVE(proto=0x1234) / inner)
    assert r["error"] == E.BAD_TUNNEL
    r = one(Ether(dst=M1) / IP() / UDP(dport=4789) / b"\x08\x00")
    assert r["error"] == E.TRUNC_TUNNEL
    # two levels followed, a third refused
    lvl2 = Ether(dst=M1) / IP(src="10.0.0.1") / UDP(dport=4789) / VXLAN(vni=2) / inner
    r = one(Ether(dst=M1) / IP() / UDP(dport=4789) / VXLAN(vni=1) / lvl2)
    assert (r["tenant"], r["outer_l3_off"], addr(r), r["error"]) == (2, 14, "172.16.0.1", 0)
    r = one(
        Ether(dst=M1)
        / IP()
        / UDP(dport=4789)
        / VXLAN(vni=1)
        / Ether(dst=M1)
        / IP()
        / UDP(dport=4789)
        / VXLAN(vni=2)
        / lvl2
    )
    assert (r["error"], r["tenant"], addr(r)) == (E.TUNNEL_DEPTH, 2, "10.0.0.1")


def test_error_codes_for_crafted_headers():
    good = bytes(Ether(dst=M1) / IP(src="1.2.3.4", dst="5.6.7.8") / TCP(sport=1, dport=2))

    def patched(at, val):
        b = bytearray(good)
        b[at] = val
        return bytes(b)

    assert parse_packet_ref(good[:13])["error"] == E.TRUNC_ETH
    assert parse_packet_ref(patched(14, 0x55))["error"] == E.BAD_IPV4_VER
    assert parse_packet_ref(patched(14, 0x44))["error"] == E.BAD_IPV4_IHL
    assert parse_packet_ref(patched(17, 0xFF))["error"] == E.BAD_IPV4_LEN
    assert parse_packet_ref(patched(22, 0x01))["error"] == E.BAD_IPV4_CSUM
    tcp_doff = bytes(Ether(dst=M1) / IP() / TCP(dataofs=4))
    assert parse_packet_ref(tcp_doff)["error"] == E.BAD_TCP_DOFF
    assert parse_packet_ref(bytes(Ether(dst=M1) / IP() / UDP(len=4)))["error"] == E.BAD_UDP_LEN
    assert parse_packet_ref(bytes(Ether(dst=M1) / IPv6(plen=500) / UDP()))["error"] == E.BAD_IPV6_LEN
    assert parse_packet_ref(bytes(Ether(dst=M1) / Dot1Q())[:16])["error"] == E.TRUNC_VLAN
    for code, name in E.NAMES.items():
        assert E.name(code) == name


def test_flow_hash_properties():
    def h(p):
        return one(p)["flow_hash"]

    a = Ether(dst=M1) / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1000, dport=80)
    same = (
        Ether(dst=M2)
        / IP(src="10.0.0.1", dst="10.0.0.2", ttl=3)
        / TCP(sport=1000, dport=80, flags="A")
        / b"x"
    )
    assert h(a) == h(same)
    assert h(a) != h(Ether(dst=M1) / IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=80, dport=1000))
    assert h(a) != h(Ether(dst=M1) / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1001, dport=80))
    vx = lambda vni: Ether(dst=M1) / IP() / UDP(dport=4789) / VXLAN(vni=vni) / a  # noqa: E731
    assert h(vx(1)) != h(vx(2))
    # spread: distinct flows give distinct low bits
    base = bytes(Ether(dst=M1) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=0, dport=53))
    rows = [base[:34] + s.to_bytes(2, "big") + base[36:] for s in range(1024, 3072)]
    keys = parse(Batch.from_packets(rows))
    assert (keys.error == 0).all()
    assert len(np.unique(keys.flow_hash & 0xFFF)) > 1200  # 2048 flows into 4096 buckets


def test_raw_ip_linktype():
    r = one(IP(src="10.0.0.9", dst="10.0.0.1") / UDP(sport=3, dport=4), B.LINK_RAW)
    assert (r["l2_off"], r["l3_off"], r["ethertype"], addr(r)) == (-1, 0, 0x0800, "10.0.0.9")
    r = one(IPv6(src="2001:db8::9") / TCP(), B.LINK_RAW)
    assert (r["l3_off"], r["ip_ver"], r["ethertype"]) == (0, 6, 0x86DD)
    assert one(b"", B.LINK_RAW)["error"] == E.TRUNC_IPV4
    assert one(b"\x70" + b"\0" * 30, B.LINK_RAW)["error"] == E.BAD_IPV4_VER


def test_unsupported_linktype_is_input_error():
    import pytest

    from microseg.errors import InputError

    for lt in (105, 127, 9):  # 802.11, radiotap, PPP
        batch = Batch.from_packets([b"\0" * 20], linktype=lt)
        with pytest.raises(InputError):
            parse(batch)


_CORPUS = [p for p, lt in templates(seed=21, rounds=1) if lt == 1]


@settings(max_examples=300, deadline=None)
@given(
    idx=st.integers(0, len(_CORPUS) - 1),
    seed=st.integers(0, 2**32 - 1),
    cuts=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    trunc=st.one_of(st.none(), st.integers(0, 300)),
)
def test_hypothesis_kernel_equals_reference(idx, seed, cuts, trunc):
    buf = bytearray(mutate(_CORPUS[idx], 1, np.random.default_rng(seed)))
    for pos, val in cuts:
        if pos < len(buf):
            buf[pos] = val
    if trunc is not None:
        del buf[trunc:]
    batch = Batch.from_packets([bytes(buf), _CORPUS[idx]])
    keys = parse(batch, FlowKeys(1))
    assert_same(keys, parse_batch_ref(batch), [bytes(buf), _CORPUS[idx]])
