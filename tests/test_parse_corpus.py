"""Kernel == reference, field for field, on well-formed packets of every kind and on >100,000
truncated, bit-flipped, length-corrupted and random packets. Also holds the packet corpus the
other parser tests import."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
from scapy.contrib.geneve import GENEVE
from scapy.layers.inet import GRE, ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import ESP
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.layers.sctp import SCTP
from scapy.layers.vxlan import VXLAN

from microseg.packet import batch as B
from microseg.packet.batch import Batch, FlowKeys
from microseg.packet.parse import parse
from microseg.packet.parse_ref import parse_batch_ref, parse_packet_ref

TABLES = ("u64", "u32", "i32", "u16", "u8")
DST_MAC = "02:00:00:00:00:01"


def _ip4(r):
    return f"{r.choice([10, 172, 192, 8])}.{r.randrange(256)}.{r.randrange(256)}.{r.randrange(1, 255)}"


def _ip6(r):
    return "2001:db8:%x::%x:%x" % (r.randrange(1 << 16), r.randrange(1 << 16), r.randrange(1, 1 << 16))


def _mac(r):
    return "02:%02x:%02x:%02x:%02x:%02x" % tuple(r.randrange(256) for _ in range(5))


def _l4(r, v6=False):
    """A random transport layer (with payload) for an inner or plain packet."""
    k = r.randrange(5)
    pay = bytes(r.randrange(256) for _ in range(r.choice([0, 1, 7, 33])))
    if k == 0:
        opts = r.choice([[], [("MSS", 1460)], [("NOP", None), ("WScale", 7), ("SAckOK", b"")]])
        return (
            TCP(
                sport=r.randrange(1, 65536),
                dport=r.randrange(1, 65536),
                seq=r.getrandbits(32),
                ack=r.getrandbits(32),
                flags=r.randrange(256),
                window=r.randrange(65536),
                options=opts,
            )
            / pay
        )
    if k == 1:
        return UDP(sport=r.randrange(1, 65536), dport=r.choice([53, 123, 4500, r.randrange(65536)])) / pay
    if k == 2:
        if v6:
            return ICMPv6EchoRequest(id=r.randrange(65536), seq=r.randrange(65536)) / pay
        return ICMP(type=r.choice([0, 8, 13]), id=r.randrange(65536)) / pay
    if k == 3:
        return SCTP(sport=r.randrange(65536), dport=r.randrange(65536)) / pay
    return ESP(spi=r.getrandbits(32), seq=r.getrandbits(32)) / pay


def _ip(r, v6=None, inner=None):
    v6 = r.random() < 0.4 if v6 is None else v6
    inner = _l4(r, v6) if inner is None else inner
    if v6:
        return IPv6(src=_ip6(r), dst=_ip6(r), hlim=r.randrange(256)) / inner
    opts = [IPOption_RR()] if r.random() < 0.15 else []
    return IP(src=_ip4(r), dst=_ip4(r), ttl=r.randrange(256), options=opts) / inner


def _eth(r, payload):
    return Ether(src=_mac(r), dst=_mac(r)) / payload


def templates(seed: int = 1, rounds: int = 4) -> list[tuple[bytes, int]]:
    """Well-formed packets of every kind the parser knows, as (bytes, linktype)."""
    r = random.Random(seed)
    out = []
    for _ in range(rounds):
        eth = lambda p: _eth(r, p)  # noqa: E731
        pk = [
            eth(_ip(r, False)),
            eth(_ip(r, True)),
            eth(_ip(r, False)),
            eth(_ip(r, True)),
            Ether(src=_mac(r), dst=DST_MAC) / Dot1Q(vlan=r.randrange(4096), prio=r.randrange(8)) / _ip(r),
            Ether(src=_mac(r), dst=DST_MAC)
            / Dot1AD(vlan=r.randrange(4096))
            / Dot1Q(vlan=r.randrange(4096))
            / _ip(r),
            Ether(dst=DST_MAC) / Dot1Q(vlan=1) / Dot1Q(vlan=2) / Dot1Q(vlan=3) / _ip(r),
            eth(ARP(op=r.choice([1, 2]), hwsrc=_mac(r), hwdst=_mac(r), psrc=_ip4(r), pdst=_ip4(r))),
            eth(
                IP(src=_ip4(r), dst=_ip4(r), flags="MF", frag=0)
                / UDP(sport=7, dport=9, len=1000)
                / (b"a" * 64)
            ),
            eth(IP(src=_ip4(r), dst=_ip4(r), frag=r.randrange(1, 8000)) / (b"b" * 40)),
            eth(
                IPv6(src=_ip6(r), dst=_ip6(r))
                / IPv6ExtHdrHopByHop()
                / IPv6ExtHdrRouting(addresses=[_ip6(r)])
                / IPv6ExtHdrDestOpt()
                / _l4(r, True)
            ),
            eth(
                IPv6(src=_ip6(r), dst=_ip6(r))
                / IPv6ExtHdrFragment(m=1, offset=0, nh=17)
                / UDP(sport=5, dport=6, len=3000)
                / (b"c" * 48)
            ),
            eth(
                IPv6(src=_ip6(r), dst=_ip6(r))
                / IPv6ExtHdrFragment(m=r.randrange(2), offset=r.randrange(1, 8000), nh=6)
                / (b"d" * 48)
            ),
            eth(IPv6(src=_ip6(r), dst=_ip6(r)) / IPv6ExtHdrDestOpt() / IPv6ExtHdrHopByHop() / _l4(r, True)),
            eth(
                IP(src=_ip4(r), dst=_ip4(r))
                / ICMP(type=3, code=r.randrange(16))
                / IP(src=_ip4(r), dst=_ip4(r))
                / _l4(r)
            ),
            eth(
                IP(src=_ip4(r), dst=_ip4(r))
                / ICMP(type=11)
                / IP(src=_ip4(r), dst=_ip4(r))
                / ICMP(type=8, id=r.randrange(65536))
            ),
            eth(
                IP(src=_ip4(r), dst=_ip4(r))
                / ICMP(type=5)
                / IP(src=_ip4(r), dst=_ip4(r), frag=5)
                / (b"e" * 8)
            ),
            eth(
                IPv6(src=_ip6(r), dst=_ip6(r))
                / ICMPv6DestUnreach(code=4)
                / IPv6(src=_ip6(r), dst=_ip6(r))
                / _l4(r, True)
            ),
            eth(
                IPv6(src=_ip6(r), dst=_ip6(r))
                / ICMPv6PacketTooBig()
                / IPv6(src=_ip6(r), dst=_ip6(r))
                / IPv6ExtHdrFragment(nh=58)
                / ICMPv6EchoRequest(id=r.randrange(65536))
            ),
            eth(
                IPv6(src=_ip6(r), dst=_ip6(r))
                / ICMPv6TimeExceeded()
                / IPv6(src=_ip6(r), dst=_ip6(r))
                / IPv6ExtHdrDestOpt()
                / UDP(sport=1, dport=2)
            ),
            eth(IPv6(src=_ip6(r), dst=_ip6(r)) / ICMPv6EchoReply(id=r.randrange(65536))),
            eth(
                IP(src=_ip4(r), dst=_ip4(r))
                / GRE(
                    proto=0x0800,
                    chksum_present=r.randrange(2),
                    key_present=r.randrange(2),
                    key=r.getrandbits(32),
                    seqnum_present=r.randrange(2),
                )
                / _ip(r, False)
            ),
            eth(IP(src=_ip4(r), dst=_ip4(r), proto=89) / (b"f" * 30)),
            Ether(type=0x88CC) / (b"\x02\x07\x04" + b"g" * 40),
            eth(
                _ip(
                    r,
                    r.random() < 0.3,
                    UDP(sport=r.randrange(65536), dport=4789) / VXLAN(vni=r.randrange(1 << 24)) / eth(_ip(r)),
                )
            ),
            eth(
                _ip(
                    r,
                    None,
                    UDP(sport=r.randrange(49152, 65536), dport=4789)
                    / VXLAN(vni=r.randrange(1 << 24))
                    / eth(ARP(psrc=_ip4(r), pdst=_ip4(r), hwsrc=_mac(r))),
                )
            ),
            eth(
                _ip(
                    r,
                    None,
                    UDP(sport=r.randrange(49152, 65536), dport=6081)
                    / GENEVE(vni=r.randrange(1 << 24), proto=0x6558, options=b"\x01\x02\x03\x01" + b"h" * 4)
                    / eth(_ip(r)),
                )
            ),
            eth(
                _ip(
                    r,
                    None,
                    UDP(sport=r.randrange(49152, 65536), dport=6081)
                    / GENEVE(vni=r.randrange(1 << 24), proto=0x0800)
                    / _ip(r, False),
                )
            ),
            eth(
                _ip(
                    r,
                    None,
                    UDP(sport=r.randrange(49152, 65536), dport=6081)
                    / GENEVE(vni=r.randrange(1 << 24), proto=0x86DD)
                    / _ip(r, True),
                )
            ),
            eth(_ip(r, None, GRE(proto=0x6558, key_present=1, key=r.getrandbits(32)) / eth(_ip(r)))),
            eth(
                IP(src=_ip4(r), dst=_ip4(r))
                / UDP(sport=r.randrange(49152, 65536), dport=4789)
                / VXLAN(vni=r.randrange(1 << 24))
                / eth(
                    IP(src=_ip4(r), dst=_ip4(r))
                    / UDP(sport=r.randrange(49152, 65536), dport=6081)
                    / GENEVE(vni=r.randrange(1 << 24))
                    / eth(_ip(r))
                )
            ),
            eth(
                IP()
                / UDP(sport=r.randrange(49152, 65536), dport=4789)
                / VXLAN(vni=1)
                / eth(
                    IP()
                    / UDP(sport=r.randrange(49152, 65536), dport=4789)
                    / VXLAN(vni=2)
                    / eth(
                        IP() / UDP(sport=r.randrange(49152, 65536), dport=4789) / VXLAN(vni=3) / eth(_ip(r))
                    )
                )
            ),
            eth(
                IP()
                / UDP(sport=r.randrange(49152, 65536), dport=4789)
                / VXLAN(vni=1)
                / eth(IP() / ICMP(type=3) / IP(src=_ip4(r)) / UDP(sport=r.randrange(65536)))
            ),
            Ether(dst=DST_MAC) / Dot1Q(vlan=10) / ARP(psrc=_ip4(r)),
            # IP in IP and GRE carrying IP: followed
            eth(IP(src=_ip4(r), dst=_ip4(r)) / _ip(r, False)),
            eth(IP(src=_ip4(r), dst=_ip4(r)) / _ip(r, True)),
            eth(IPv6(src=_ip6(r), dst=_ip6(r)) / _ip(r, False)),
            eth(IPv6(src=_ip6(r), dst=_ip6(r)) / IPv6ExtHdrDestOpt() / _ip(r, True)),
            eth(
                IPv6(src=_ip6(r), dst=_ip6(r))
                / GRE(proto=0x86DD, key_present=r.randrange(2), key=r.getrandbits(32))
                / _ip(r, True)
            ),
            eth(
                IP()
                / UDP(sport=r.randrange(49152, 65536), dport=4789)
                / VXLAN(vni=r.randrange(1 << 24))
                / eth(IP(src=_ip4(r), dst=_ip4(r)) / _ip(r))
            ),
            # tunnels recognised but not followed, and GRE that is no tunnel at all
            eth(
                IP(src=_ip4(r), dst=_ip4(r))
                / GRE(proto=0x88BE, seqnum_present=1, sequence_number=r.getrandbits(32))
                / ERSPAN_II
                / eth(_ip(r))
            ),
            eth(
                IPv6(src=_ip6(r), dst=_ip6(r))
                / GRE(proto=0x22EB, seqnum_present=1)
                / ERSPAN_III
                / eth(_ip(r))
            ),
            eth(IP(src=_ip4(r), dst=_ip4(r)) / GRE(proto=0x8847) / MPLS_LABEL / _ip(r, False)),
            eth(IP(src=_ip4(r), dst=_ip4(r)) / GRE(proto=0x6558) / eth(_ip(r))),
            eth(_ip(r, None, UDP(sport=r.randrange(49152, 65536), dport=6635) / MPLS_LABEL / _ip(r, False))),
            eth(_ip(r, None, UDP(sport=r.randrange(49152, 65536), dport=4790) / VXLAN_GPE / _ip(r, False))),
            eth(_ip(r, None, UDP(sport=2152, dport=2152) / GTPU_HEADER / _ip(r, False))),
            eth(IP(src=_ip4(r), dst=_ip4(r), proto=137) / MPLS_LABEL / _ip(r, False)),
            eth(IP(src=_ip4(r), dst=_ip4(r), proto=97) / b"\x30\x00" / eth(_ip(r))),
            eth(IP(src=_ip4(r), dst=_ip4(r), flags="MF") / _ip(r, False)),
            eth(
                IP(src=_ip4(r), dst=_ip4(r), flags="MF")
                / UDP(sport=r.randrange(65536), dport=4789, len=200)
                / VXLAN(vni=r.randrange(1 << 24))
                / eth(_ip(r))
            ),
            # ARP over hardware whose addresses are not 6 bytes (IP over InfiniBand: 20)
            eth(
                ARP(
                    hwtype=32,
                    hwlen=20,
                    op=r.choice([1, 2]),
                    psrc=_ip4(r),
                    pdst=_ip4(r),
                    hwsrc=b"\x01" * 20,
                    hwdst=b"\x00" * 20,
                )
            ),
        ]
        out += [(bytes(p), B.LINK_ETHERNET) for p in pk]
        out += [(bytes(_ip(r, v6)), B.LINK_RAW) for v6 in (False, True, False, True)]
        out += [(bytes(_ip(r, False)), B.LINK_IPV4), (bytes(_ip(r, True)), B.LINK_IPV6)]
        out += [(bytes(_ip(r, r.random() < 0.5)), lt) for lt in (B.LINK_RAW_DLT12, B.LINK_RAW_DLT14)]
        for v6 in (False, True):
            l3 = bytes(_ip(r, v6))
            out.append((struct.pack("<I", r.choice([24, 28, 30]) if v6 else 2) + l3, B.LINK_NULL))
            out.append((struct.pack(">I", r.choice([24, 28, 30]) if v6 else 2) + l3, B.LINK_NULL))
            out.append((struct.pack(">I", 24 if v6 else 2) + l3, B.LINK_LOOP))
        out.append((struct.pack("<I", 7) + bytes(_ip(r)), B.LINK_NULL))  # not IP
        for payload, etype in (
            (_ip(r, False), 0x0800),
            (_ip(r, True), 0x86DD),
            (ARP(op=2, psrc=_ip4(r), pdst=_ip4(r), hwsrc=_mac(r)), 0x0806),
            (Dot1Q(vlan=r.randrange(4096)) / _ip(r), 0x8100),
            (b"\x00" * 30, 0x0004),
        ):
            out.append((sll(bytes(payload), etype, r), B.LINK_LINUX_SLL))
            out.append((sll2(bytes(payload), etype, r), B.LINK_LINUX_SLL2))
    return out


# headers the parser recognises but does not step into (their bytes only have to be plausible)
ERSPAN_II = bytes.fromhex("100100640000000a")  # version 1, VLAN 1, session 100
ERSPAN_III = bytes.fromhex("2001006400000000000000000000")[:12]
MPLS_LABEL = bytes.fromhex("000641ff")  # label 100, bottom of stack, TTL 255
VXLAN_GPE = bytes.fromhex("0c00000100001200")  # next protocol 1 (IPv4), VNI 18
GTPU_HEADER = bytes.fromhex("30ff0000000004d2")[:4] + (0).to_bytes(4, "big")


def sll(payload: bytes, protocol: int, r=None, hatype: int = 1, pkttype: int = 0) -> bytes:
    """A Linux cooked capture v1 header (16 bytes, link-layer address of 6 of 8) + payload."""
    addr = bytes(r.randrange(256) for _ in range(6)) if r else bytes(range(1, 7))
    return struct.pack(">HHH8sH", pkttype, hatype, 6, addr, protocol) + payload


def sll2(payload: bytes, protocol: int, r=None, hatype: int = 1, pkttype: int = 0, ifindex: int = 2) -> bytes:
    """A Linux cooked capture v2 header (20 bytes) + payload."""
    addr = bytes(r.randrange(256) for _ in range(6)) if r else bytes(range(1, 7))
    return struct.pack(">HHIHBB8s", protocol, 0, ifindex, hatype, pkttype, 6, addr) + payload


def _fix_ipv4_checksum(buf: bytearray, l3: int) -> None:
    if l3 < 0 or l3 + 20 > len(buf) or buf[l3] >> 4 != 4:
        return
    ihl = (buf[l3] & 15) * 4
    if ihl < 20 or l3 + ihl > len(buf):
        return
    buf[l3 + 10] = buf[l3 + 11] = 0
    s = sum((buf[k] << 8) | buf[k + 1] for k in range(l3, l3 + ihl, 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    c = ~s & 0xFFFF
    buf[l3 + 10], buf[l3 + 11] = c >> 8, c & 0xFF


def mutate(pkt: bytes, linktype: int, rng: np.random.Generator) -> bytes:
    """One random damage: truncation, byte flips, a corrupted 16-bit field, or several."""
    info = parse_packet_ref(pkt, linktype)
    buf = bytearray(pkt)
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(0, 5))
        if not buf:
            break
        if k == 0:  # truncate
            del buf[int(rng.integers(0, len(buf))) :]
        elif k == 1:  # flip bits in a header byte
            pos = int(rng.integers(0, min(len(buf), 140)))
            buf[pos] ^= int(rng.integers(1, 256))
        elif k == 2 and len(buf) > 1:  # corrupt a 16-bit field (lengths, types, ports)
            pos = int(rng.integers(0, min(len(buf), 140) - 1))
            val = int(
                rng.choice([0, 1, 7, 8, 20, 40, 0xFFFF, len(buf), len(buf) + 1, int(rng.integers(0, 65536))])
            )
            buf[pos], buf[pos + 1] = val >> 8, val & 0xFF
        elif k == 3:  # set one byte to an interesting value (next-header, IHL, flags ...)
            pos = int(rng.integers(0, min(len(buf), 140)))
            buf[pos] = int(
                rng.choice([0, 4, 6, 17, 43, 44, 45, 47, 50, 58, 60, 0x08, 0x40, 0x45, 0x4F, 0x60, 0xFF])
            )
        else:  # append junk
            buf += rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
    if rng.random() < 0.6:  # keep IPv4 checksums right so parsing goes deeper
        _fix_ipv4_checksum(buf, info["outer_l3_off"])
        _fix_ipv4_checksum(buf, info["l3_off"])
    return bytes(buf)


def random_packets(n: int, rng: np.random.Generator) -> list[bytes]:
    """Random bytes, half behind a plausible Ethernet header so they reach L3/L4."""
    out = []
    prefixes = [
        b"",
        b"\x00" * 12 + b"\x08\x00\x45",
        b"\x00" * 12 + b"\x86\xdd\x60",
        b"\x00" * 12 + b"\x81\x00",
        b"\x00" * 12 + b"\x08\x06\x00\x01\x08\x00\x06\x04",
        b"\x00" * 12 + b"\x88\xa8",
    ]
    for _ in range(n):
        pre = prefixes[int(rng.integers(0, len(prefixes)))]
        body = rng.integers(0, 256, int(rng.integers(0, 120)), dtype=np.uint8).tobytes()
        out.append(pre + body)
    return out


def assert_same(keys: FlowKeys, ref: FlowKeys, packets=None) -> None:
    assert keys.n == ref.n
    for t in TABLES:
        a, b = getattr(keys, t)[:, : keys.n], getattr(ref, t)[:, : ref.n]
        if not np.array_equal(a, b):
            col = int(np.flatnonzero((a != b).any(axis=0))[0])
            kr, rr = keys.row(col), ref.row(col)
            diff = {f: (kr[f], rr[f]) for f in kr if kr[f] != rr[f]}
            pkt = packets[col].hex() if packets is not None else "?"
            raise AssertionError(f"packet {col} differs (kernel, ref): {diff}\n{pkt}")


@pytest.fixture(scope="module")
def corpus():
    return templates()


def _check(packets, linktype):
    batch = Batch.from_packets(packets, linktype=linktype)
    keys = parse(batch)
    assert_same(keys, parse_batch_ref(batch), packets)
    return keys


def _link_types(corpus):
    return sorted({lt for _, lt in corpus})


def test_templates_parse_cleanly(corpus):
    """Well-formed templates parse without error, except the deliberate 3-deep tunnel and
    the hop-by-hop header placed after another extension header (one of each per round)."""
    assert set(_link_types(corpus)) == set(B.SUPPORTED_LINKTYPES)
    for lt in _link_types(corpus):
        pk = [p for p, l in corpus if l == lt]
        keys = _check(pk, lt)
        errs = set(keys.error.tolist())
        assert errs <= {0, 13, 25}, errs
        assert (keys.error == 25).sum() == (4 if lt == B.LINK_ETHERNET else 0)
        assert (keys.error == 13).sum() == (4 if lt == B.LINK_ETHERNET else 0)
        assert not (keys.flags2 & B.F2_TRUNCATED).any()


@pytest.mark.parametrize("seed", range(4))
def test_kernel_matches_reference_on_mutations(corpus, seed):
    rng = np.random.default_rng(seed)
    eth = [p for p, lt in corpus if lt == B.LINK_ETHERNET]
    n = 20_000
    pk = [mutate(eth[int(i)], B.LINK_ETHERNET, rng) for i in rng.integers(0, len(eth), n)]
    keys = _check(pk, B.LINK_ETHERNET)
    # the mutations reach every error path and still leave many packets clean
    assert len(set(keys.error.tolist())) >= 20
    assert (keys.error == 0).sum() > n // 10
    for lt in _link_types(corpus):
        if lt != B.LINK_ETHERNET:
            other = [p for p, l in corpus if l == lt]
            pk = [mutate(other[int(i)], lt, rng) for i in rng.integers(0, len(other), 1_000)]
            _check(pk, lt)


def test_kernel_matches_reference_on_random_bytes():
    rng = np.random.default_rng(99)
    pk = random_packets(20_000, rng)
    _check(pk, B.LINK_ETHERNET)
    _check(pk[:5_000], B.LINK_RAW)


def test_keys_reused_and_resized(corpus):
    pk = [p for p, lt in corpus if lt == B.LINK_ETHERNET]
    keys = FlowKeys(4)
    parse(Batch.from_packets(pk), keys)
    assert keys.n == len(pk) and keys.capacity >= len(pk)
    first = keys.copy()
    parse(Batch.from_packets(pk[:3]), keys)  # stale columns beyond n must not leak
    assert keys.n == 3
    for t in TABLES:
        assert np.array_equal(getattr(keys, t)[:, :3], getattr(first, t)[:, :3])


def test_out_of_range_offsets_do_not_read_outside_buffer():
    pkt = bytes(Ether(dst=DST_MAC) / IP() / TCP())
    batch = Batch.from_packets([pkt, pkt])
    batch.length[1] = 10_000  # claims more bytes than the buffer holds
    batch.offset[0] = 1 << 40  # points past the buffer
    keys = parse(batch)
    assert keys.error[0] == 1  # nothing there: cut short
    assert keys.error[1] == 0 and keys.dport[1] == 80


def test_empty_batch():
    keys = parse(Batch.from_packets([]))
    assert keys.n == 0


def test_every_truncation_of_every_template(corpus):
    """Each template cut at every length: reaches every 'cut short' error path."""
    for lt in _link_types(corpus):
        pk = [p[:k] for p, l in corpus if l == lt for k in range(len(p))]
        keys = _check(pk, lt)
        if lt == B.LINK_ETHERNET:
            from microseg.packet import errors as E

            seen = set(keys.error.tolist())
            for code in (
                E.TRUNC_ETH,
                E.TRUNC_VLAN,
                E.TRUNC_ARP,
                E.TRUNC_IPV4,
                E.TRUNC_IPV6,
                E.BAD_IPV4_LEN,
                E.BAD_IPV6_LEN,
            ):
                assert code in seen, E.name(code)
        elif lt in (B.LINK_NULL, B.LINK_LOOP, B.LINK_LINUX_SLL, B.LINK_LINUX_SLL2):
            from microseg.packet import errors as E

            assert E.TRUNC_LINK in set(keys.error.tolist())


def _cut_consistently(pkt: bytes, cut: int, l3: int) -> bytes:
    """``pkt[:cut]`` with the IP length field rewritten to match, so L4 sees the cut."""
    buf = bytearray(pkt[:cut])
    if buf[l3] >> 4 == 4:
        total = cut - l3
        buf[l3 + 2], buf[l3 + 3] = total >> 8, total & 0xFF
        _fix_ipv4_checksum(buf, l3)
    else:
        plen = cut - l3 - 40
        buf[l3 + 4], buf[l3 + 5] = plen >> 8, plen & 0xFF
    return bytes(buf)


def test_every_l4_truncation_with_consistent_ip_length(corpus):
    from microseg.packet import errors as E

    pk = []
    for p, lt in corpus:
        f = parse_packet_ref(p, lt)
        if lt != B.LINK_ETHERNET or f["error"] or f["l4_off"] < 0:
            continue
        if f["tun_type"] in (B.TUN_GRE, B.TUN_IPIP):
            l3 = f["outer_l3_off"]  # cut the outer packet: reaches the tunnel headers
        elif f["tun_type"]:
            continue
        else:
            l3 = f["l3_off"]
        start = l3 + (20 if p[l3] >> 4 == 4 else 40)
        pk += [_cut_consistently(p, k, l3) for k in range(start, len(p))]
    keys = _check(pk, B.LINK_ETHERNET)
    seen = set(keys.error.tolist())
    for code in (
        E.TRUNC_TCP,
        E.TRUNC_UDP,
        E.TRUNC_SCTP,
        E.TRUNC_ICMP,
        E.TRUNC_ICMP_INNER,
        E.TRUNC_ESP,
        E.TRUNC_GRE,
        E.BAD_UDP_LEN,
        E.BAD_TCP_DOFF,
        E.BAD_IPV6_EXT,
    ):
        assert code in seen, E.name(code)
