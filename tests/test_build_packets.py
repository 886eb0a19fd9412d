"""Packet builders checked against scapy's dissection (fields and recomputed checksums)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.all import ARP, ICMP, IP, TCP, UDP, Dot1AD, Dot1Q, Ether, IPv6
from scapy.layers.inet import IPerror, TCPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoRequest, ICMPv6PacketTooBig

from microseg.packet import build as B
from microseg.packet.batch import LINK_RAW


def _recomputed(pkt, layer):
    """The checksum scapy computes for ``layer`` of ``pkt`` when asked to rebuild it."""
    p = pkt.copy()
    del p[layer].chksum
    return Ether(bytes(p))[layer].chksum if p.haslayer(Ether) else p.__class__(bytes(p))[layer].chksum


def test_checksum_rfc1071_example():
    # RFC 1071 section 3 example words sum to 0xddf2 -> checksum 0x220d
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert B.checksum(data) == 0x220D
    assert B.checksum(b"\x01") == ~0x0100 & 0xFFFF


def test_tcp_ipv4_vlan():
    raw = B.tcp_packet(
        "10.1.2.3",
        "10.4.5.6",
        43210,
        443,
        b"hello",
        flags="PA",
        seq=1000,
        ack=2000,
        win=512,
        options=bytes.fromhex("020405b4"),
        vlans=[100],
        ttl=33,
    )
    p = Ether(raw)
    assert p[Dot1Q].vlan == 100
    ip, t = p[IP], p[TCP]
    assert (ip.src, ip.dst, ip.ttl, ip.len, ip.proto) == ("10.1.2.3", "10.4.5.6", 33, 49, 6)
    assert (t.sport, t.dport, t.seq, t.ack, t.window, str(t.flags)) == (43210, 443, 1000, 2000, 512, "PA")
    assert t.options == [("MSS", 1460)]
    assert bytes(t.payload) == b"hello"
    assert ip.chksum == _recomputed(p, IP)
    assert t.chksum == _recomputed(p, TCP)


def test_qinq_tags():
    raw = B.udp_packet("10.0.0.1", "10.0.0.2", 1, 2, vlans=[7, 8])
    # with two tags the outer one is 802.1Q unless 802.1ad is asked for
    p = Ether(B.ethernet(raw[14 + 8 :], vlans=[7, 8], vlan_tpid=B.ETH_QINQ))
    assert p[Dot1AD].vlan == 7 and p[Dot1Q].vlan == 8 and p[UDP].dport == 2


def test_ipv4_options_and_fragment_fields():
    raw = B.ipv4(
        "1.1.1.1",
        "2.2.2.2",
        17,
        b"x" * 16,
        options=b"\x94\x04\x00\x00",
        ident=77,
        mf=True,
        frag_off=3,
        df=False,
    )
    p = IP(raw)
    assert p.ihl == 6 and p.options[0].option == 20  # router alert
    assert p.id == 77 and p.frag == 3 and p.flags.MF
    q = IP(raw)
    del q.chksum
    assert IP(bytes(q)).chksum == p.chksum


@pytest.mark.parametrize("src,dst", [("10.0.0.1", "10.0.0.2"), ("2001:db8::1", "2001:db8:1::9")])
def test_udp_checksum(src, dst):
    raw = B.udp_packet(src, dst, 5353, 53, b"\x00" * 13)
    p = Ether(raw)
    assert p[UDP].len == 21 and p[UDP].chksum == _recomputed(p, UDP)


def test_ipv6_tcp():
    raw = B.tcp_packet("2001:db8::1", "2001:db8::2", 1, 2, b"abc", flags="S", ttl=9)
    p = Ether(raw)
    assert p[IPv6].hlim == 9 and p[IPv6].plen == 23 and p[IPv6].nh == 6
    assert p[TCP].chksum == _recomputed(p, TCP)


def test_icmp_echo_and_error():
    p = Ether(B.icmp_echo_packet("10.0.0.1", "10.0.0.2", 7, 9, b"ping"))
    assert (p[ICMP].type, p[ICMP].id, p[ICMP].seq) == (8, 7, 9)
    assert p[ICMP].chksum == _recomputed(p, ICMP)
    quoted = B.ipv4("10.0.0.2", "10.0.0.1", 6, B.tcp(80, 1234, src="10.0.0.2", dst="10.0.0.1"))
    err = B.ipv4("192.0.2.1", "10.0.0.2", 1, B.icmp_error(3, 4, quoted, param=1400))
    q = IP(err)
    assert q[ICMP].type == 3 and q[ICMP].code == 4 and q[ICMP].nexthopmtu == 1400
    assert q[IPerror].src == "10.0.0.2" and q[TCPerror].dport == 1234
    assert q[ICMP].chksum == _recomputed(q, ICMP)


def test_icmpv6_echo_and_errors():
    p = Ether(B.icmp_echo_packet("fe80::1", "fe80::2", 3, 4, b"x"))
    assert p[ICMPv6EchoRequest].id == 3 and p[ICMPv6EchoRequest].seq == 4
    c = p[ICMPv6EchoRequest].cksum
    q = p.copy()
    del q[ICMPv6EchoRequest].cksum
    assert Ether(bytes(q))[ICMPv6EchoRequest].cksum == c
    quoted = bytes(p[IPv6])
    e = IPv6(
        B.ipv6(
            "2001:db8::ff",
            "fe80::1",
            58,
            B.icmpv6_error(2, 0, quoted, src="2001:db8::ff", dst="fe80::1", param=1280),
        )
    )
    assert e[ICMPv6PacketTooBig].mtu == 1280
    c = e[ICMPv6PacketTooBig].cksum
    del e[ICMPv6PacketTooBig].cksum
    assert IPv6(bytes(e))[ICMPv6PacketTooBig].cksum == c
    u = IPv6(
        B.ipv6("2001:db8::ff", "fe80::1", 58, B.icmpv6_error(1, 4, quoted, src="2001:db8::ff", dst="fe80::1"))
    )
    assert u[ICMPv6DestUnreach].code == 4


def test_arp():
    p = Ether(B.arp_packet(1, "02:00:00:00:00:0a", "10.0.0.1", "00:00:00:00:00:00", "10.0.0.9"))
    assert p.dst == "ff:ff:ff:ff:ff:ff" and p[ARP].op == 1
    assert (p[ARP].psrc, p[ARP].pdst, p[ARP].hwsrc) == ("10.0.0.1", "10.0.0.9", "02:00:00:00:00:0a")


def test_bad_arguments():
    with pytest.raises(ValueError):
        B.mac("zz")
    with pytest.raises(ValueError):
        B.tcp_flags("SX")
    with pytest.raises(ValueError):
        B.ipv4("1.1.1.1", "2.2.2.2", 6, b"", options=b"\x01" * 44)
    with pytest.raises(ValueError):
        B.build_batch(2, "10.0.0.1", "2001:db8::1")
    with pytest.raises(ValueError):
        B.build_batch(2, "10.0.0.1", "10.0.0.2", sport=[1, 2, 3])
    with pytest.raises(ValueError):
        B.build_batch(1, "10.0.0.1", "10.0.0.2", proto=47)


# ---------------------------------------------------------------------------------------------
# build_batch: every packet equals the one-off builder's, and scapy agrees on the fields
# ---------------------------------------------------------------------------------------------
def _one(i, proto, src, dst, sport, dport, plen, seq, ack, flags, win, ttl, vlan, l2):
    payload = bytes(plen)
    vl = [vlan] if vlan is not None else []
    if proto == 6:
        seg = B.tcp(sport, dport, payload, src=src, dst=dst, seq=seq, ack=ack, flags=flags, win=win)
    elif proto == 17:
        seg = B.udp(sport, dport, payload, src=src, dst=dst)
    elif proto == 1:
        seg = B.icmp_echo(sport, dport, payload)
    else:
        seg = B.icmpv6_echo(sport, dport, payload, src=src, dst=dst)
    if ":" in src:
        l3 = B.ipv6(src, dst, proto, seg, hlim=ttl)
    else:
        l3 = B.ipv4(src, dst, proto, seg, ttl=ttl, df=True, ident=i)
    return B.ethernet(l3, vlans=vl) if l2 else l3


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_build_batch_equals_single_builders(data):
    v6 = data.draw(st.booleans())
    proto = data.draw(st.sampled_from([6, 17, 58 if v6 else 1]))
    n = data.draw(st.integers(0, 6))
    l2 = data.draw(st.booleans())
    vlan = data.draw(st.one_of(st.none(), st.integers(0, 4095))) if l2 else None
    if v6:
        srcs = [f"2001:db8::{data.draw(st.integers(0, 0xFFFF)):x}" for _ in range(n)]
        dsts = [f"fd00:{data.draw(st.integers(0, 0xFFFF)):x}::1" for _ in range(n)]
    else:
        srcs = [f"10.0.{data.draw(st.integers(0, 255))}.{data.draw(st.integers(0, 255))}" for _ in range(n)]
        dsts = [f"192.168.1.{data.draw(st.integers(0, 255))}" for _ in range(n)]
    ints = lambda lo, hi: [data.draw(st.integers(lo, hi)) for _ in range(n)]
    sport, dport, plen = ints(0, 65535), ints(0, 65535), ints(0, 300)
    seq, ack, flags, win, ttl = (
        ints(0, 2**32 - 1),
        ints(0, 2**32 - 1),
        ints(0, 255),
        ints(0, 65535),
        ints(1, 255),
    )
    ident = list(range(n))
    b = (
        B.build_batch(
            n,
            srcs or "10.0.0.1" if not v6 else (srcs or "::1"),
            dsts or ("10.0.0.2" if not v6 else "::2"),
            proto,
            sport,
            dport,
            plen,
            tcp_flags_=flags,
            seq=seq,
            ack=ack,
            win=win,
            ttl=ttl,
            ident=ident,
            l2=l2,
            vlan=vlan,
        )
        if n
        else None
    )
    if n == 0:
        return
    want = [
        _one(
            i,
            proto,
            srcs[i],
            dsts[i],
            sport[i],
            dport[i],
            plen[i],
            seq[i],
            ack[i],
            flags[i],
            win[i],
            ttl[i],
            vlan,
            l2,
        )
        for i in range(n)
    ]
    assert list(b.packets()) == want
    assert b.linktype == (1 if l2 else LINK_RAW)


def test_build_batch_large_and_scapy():
    n = 2000
    rng = np.random.default_rng(1)
    src = rng.integers(0x0A000000, 0x0AFFFFFF, n, dtype=np.uint64)
    b = B.build_batch(
        n, src, "10.9.9.9", 17, rng.integers(1024, 65535, n), 4789, rng.integers(0, 1400, n), ts=np.arange(n)
    )
    assert len(b) == n and b.ts[-1] == n - 1
    for i in (0, 17, 1999):
        p = Ether(b.packet(i))
        assert p[IP].src == str(__import__("ipaddress").IPv4Address(int(src[i])))
        c = p[UDP].chksum
        del p[UDP].chksum
        del p[IP].chksum
        q = Ether(bytes(p))
        assert q[UDP].chksum == c and q[IP].chksum == Ether(b.packet(i))[IP].chksum
