"""What the agent answers by itself: ICMP too-big for frames the underlay cannot carry
(checked with scapy's dissectors, RFC 1191 / RFC 8201 fields), and the IPsec policy lookup
it uses to know which hosts are behind ESP (held equal to what the gateway's encryption
actually does)."""

from __future__ import annotations

import ipaddress

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, IPerror, TCPerror, UDPerror
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.layers.l2 import Ether

from microseg.datapath.output import too_big_reply
from microseg.ipsec.gateway import EspGateway
from microseg.ipsec.sa import ACTION_PROTECT, parse_config
from microseg.packet import build as PB
from microseg.packet.batch import Batch

A, B_ = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def _v4(df: bool, payload=b"x" * 1400, proto="udp", frag_off=0):
    if proto == "udp":
        seg = PB.udp(40000, 53, payload, src="10.0.0.1", dst="10.0.0.2")
        l3 = PB.ipv4("10.0.0.1", "10.0.0.2", 17, seg, df=df, frag_off=frag_off)
    else:
        l3 = PB.ipv4("10.0.0.1", "10.0.0.2", 1, PB.icmp_error(3, 3, b"\x45" + bytes(27)), df=df)
    return PB.ethernet(l3, src=A, dst=B_)


def test_ipv4_df_gets_fragmentation_needed_with_the_mtu():
    frame = _v4(df=True)
    r = Ether(too_big_reply(frame, 1396))
    assert (r.src, r.dst) == (B_, A)
    assert (r[IP].src, r[IP].dst) == ("10.0.0.2", "10.0.0.1")
    assert (r[ICMP].type, r[ICMP].code, r[ICMP].nexthopmtu) == (3, 4, 1396)
    # the quote: the offending header and the first 8 bytes after it (RFC 792)
    q = r[IPerror]
    assert (q.src, q.dst, q[UDPerror].sport, q[UDPerror].dport) == ("10.0.0.1", "10.0.0.2", 40000, 53)
    # checksums as scapy recomputes them
    again = Ether(bytes(r))
    del again[IP].chksum, again[ICMP].chksum
    assert bytes(Ether(bytes(again))) == bytes(r)


def test_no_answer_without_df_for_fragments_and_icmp_errors():
    assert too_big_reply(_v4(df=False), 1396) is None
    assert too_big_reply(_v4(df=True, frag_off=10), 1396) is None
    assert too_big_reply(_v4(df=True, proto="icmp"), 1396) is None
    assert too_big_reply(b"\x00" * 13, 1396) is None
    assert too_big_reply(PB.arp_packet(1, A, "10.0.0.1", b"\0" * 6, "10.0.0.2"), 1396) is None


def test_ipv6_gets_packet_too_big():
    seg = PB.tcp(40000, 443, b"y" * 1400, src="2001:db8::1", dst="2001:db8::2", flags="PA")
    frame = PB.ethernet(PB.ipv6("2001:db8::1", "2001:db8::2", 6, seg), src=A, dst=B_)
    r = Ether(too_big_reply(frame, 1396))
    assert (r[IPv6].src, r[IPv6].dst) == ("2001:db8::2", "2001:db8::1")
    p = r[ICMPv6PacketTooBig]
    assert p.mtu == 1396
    assert len(bytes(r[IPv6])) <= 1280  # RFC 4443 2.4(c)
    assert p[TCPerror].dport == 443
    again = Ether(bytes(r))
    del again[ICMPv6PacketTooBig].cksum
    assert bytes(Ether(bytes(again))) == bytes(r)
    # multicast destinations get nothing
    frame = PB.ethernet(PB.ipv6("2001:db8::1", "ff02::1", 17, b"\0" * 8), src=A, dst=B_)
    assert too_big_reply(frame, 1396) is None


_HOSTS = [f"198.18.0.{i}" for i in range(1, 6)]


@st.composite
def _spd(draw):
    pols = []
    for _k in range(draw(st.integers(1, 5))):
        pol = {}
        if draw(st.booleans()):
            pol["src"] = f"{draw(st.sampled_from(_HOSTS))}/{draw(st.sampled_from([32, 30, 24]))}"
        if draw(st.booleans()):
            pol["dst"] = f"{draw(st.sampled_from(_HOSTS))}/{draw(st.sampled_from([32, 29, 16]))}"
        if draw(st.booleans()):
            pol["proto"] = draw(st.sampled_from([17, 47, 6]))
        what = draw(st.sampled_from(["protect", "bypass", "discard"]))
        if what == "protect":
            pol["sa"] = "s"
        else:
            pol["action"] = what
        pols.append(pol)
    return pols


@settings(max_examples=60, deadline=None)
@given(_spd(), st.sampled_from(_HOSTS), st.sampled_from(_HOSTS), st.sampled_from([17, 47]))
def test_policy_lookup_is_what_encryption_does(pols, src, dst, proto):
    doc = {
        "sas": [
            {
                "name": "s",
                "spi": 0x1234,
                "key": "00" * 16,
                "salt": "01020304",
                "tunnel_src": "192.0.2.1",
                "tunnel_dst": "192.0.2.2",
            }
        ],
        "policies": pols,
    }
    gw = EspGateway(parse_config(doc))
    payload = PB.udp(1, 4789, b"z" * 20, src=src, dst=dst) if proto == 17 else b"\0" * 8 + b"z" * 20
    frame = PB.ethernet(PB.ipv4(src, dst, proto, payload))
    out, why = gw.encrypt_batch(Batch.from_packets([frame]), return_reasons=True)
    action, _sa = gw.action_for(src, dst, proto)
    esp = len(out) == 1 and out.packet(0)[23] == 50
    assert esp == (action == ACTION_PROTECT)
    assert (int(np.asarray(why)[0]) == 0) == (len(out) == 1)
    assert ipaddress.ip_address(src)  # addresses stay plain text in the lookup
