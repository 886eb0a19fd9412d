"""Packet builders: bytes with correct lengths and checksums, and a vectorised batch builder.

The single-packet builders compose, innermost first::

    seg = tcp(1234, 80, flags="S", src="10.0.0.1", dst="10.0.0.2")
    pkt = ethernet(ipv4("10.0.0.1", "10.0.0.2", 6, seg), vlans=[10])

``tcp`` / ``udp`` / ``icmpv6`` need the IP addresses for the pseudo-header checksum. The
``*_packet`` helpers do the composition in one call and pick IPv4 or IPv6 from the address.

:func:`build_batch` writes many packets of one shape (Ethernet [+ VLAN] / IPv4 or IPv6 / TCP,
UDP or ICMP echo), with per-packet addresses, ports, sizes and TCP fields, straight into a
:class:`~microseg.packet.batch.Batch` in one compiled pass: what generators and benchmarks use.
"""

from __future__ import annotations

import ipaddress
import struct

import numpy as np
from numba import njit

from .batch import LINK_ETHERNET, LINK_RAW, Batch
from .checksum import csum_fold, csum_partial, inet_checksum, pseudo_header_sum

ETH_IPV4, ETH_IPV6, ETH_ARP, ETH_VLAN, ETH_QINQ = 0x0800, 0x86DD, 0x0806, 0x8100, 0x88A8
PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_GRE, PROTO_ICMPV6 = 1, 6, 17, 47, 58

TCP_FLAG_BITS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10, "U": 0x20, "E": 0x40, "C": 0x80}


# ---------------------------------------------------------------------------------------------
# checksums (microseg.packet.checksum does the arithmetic)
# ---------------------------------------------------------------------------------------------
def checksum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 Internet checksum of ``data`` (odd length padded), ``initial`` a partial sum."""
    return inet_checksum(data, initial)


def l4_checksum(src: str, dst: str, proto: int, segment: bytes) -> int:
    """Checksum of a TCP/UDP/ICMPv6 ``segment`` (its checksum field zero) with the pseudo-header."""
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if a.version != b.version:
        raise ValueError(f"address families differ: {src} and {dst}")
    return inet_checksum(segment, pseudo_header_sum(a.packed, b.packed, proto, len(segment)))


@njit(cache=True, inline="always")
def csum_add(d, start, length, acc):
    """Add the 16-bit big-endian words of ``d[start:start+length]`` to the unfolded ``acc``."""
    return csum_partial(d, start, start + length, acc)


@njit(cache=True, inline="always")
def csum_final(acc):
    """The checksum field value for an unfolded sum: its folded ones' complement."""
    return np.uint16(~csum_fold(acc) & 0xFFFF)


# ---------------------------------------------------------------------------------------------
# single packets
# ---------------------------------------------------------------------------------------------
def mac(value) -> bytes:
    """A MAC address from ``"aa:bb:cc:dd:ee:ff"``, 6 bytes or a 48-bit integer."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 6:
            raise ValueError("a MAC address is 6 bytes")
        return bytes(value)
    if isinstance(value, int):
        return value.to_bytes(6, "big")
    parts = str(value).replace("-", ":").split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC address {value!r}")
    return bytes(int(p, 16) for p in parts)


def ethernet(
    payload: bytes,
    ethertype: int | None = None,
    src="02:00:00:00:00:01",
    dst="02:00:00:00:00:02",
    vlans=(),
    vlan_tpid: int = ETH_VLAN,
) -> bytes:
    """Ethernet II frame. ``ethertype`` defaults from the payload's IP version nibble.

    ``vlans`` are VLAN IDs or full TCIs (int), outermost first; with two tags the outer uses
    ``vlan_tpid`` = 0x88a8 for 802.1ad when asked.
    """
    if ethertype is None:
        ethertype = ETH_IPV6 if payload and payload[0] >> 4 == 6 else ETH_IPV4
    hdr = mac(dst) + mac(src)
    vlans = list(vlans)
    for k, tci in enumerate(vlans):
        tpid = vlan_tpid if (k == 0 and len(vlans) > 1) else ETH_VLAN
        hdr += struct.pack("!HH", tpid, tci & 0xFFFF)
    return hdr + struct.pack("!H", ethertype) + bytes(payload)


def ipv4(
    src: str,
    dst: str,
    proto: int,
    payload: bytes,
    ttl: int = 64,
    ident: int = 0,
    tos: int = 0,
    df: bool = False,
    mf: bool = False,
    frag_off: int = 0,
    options: bytes = b"",
) -> bytes:
    """IPv4 packet with a correct header checksum. ``frag_off`` is in 8-byte units."""
    if len(options) % 4:
        options = bytes(options) + b"\0" * (-len(options) % 4)
    ihl = 5 + len(options) // 4
    if ihl > 15:
        raise ValueError("IPv4 options longer than 40 bytes")
    total = ihl * 4 + len(payload)
    if total > 0xFFFF:
        raise ValueError("IPv4 packet longer than 65535 bytes")
    flags = (0x4000 if df else 0) | (0x2000 if mf else 0) | (frag_off & 0x1FFF)
    hdr = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        tos,
        total,
        ident,
        flags,
        ttl,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    hdr += options
    c = checksum(hdr)
    return hdr[:10] + struct.pack("!H", c) + hdr[12:] + bytes(payload)


def ipv6(src: str, dst: str, nh: int, payload: bytes, hlim: int = 64, tc: int = 0, flow: int = 0) -> bytes:
    """IPv6 packet (``payload`` may start with extension headers; ``nh`` names the first)."""
    if len(payload) > 0xFFFF:
        raise ValueError("IPv6 payload longer than 65535 bytes (no jumbograms)")
    first = (6 << 28) | ((tc & 0xFF) << 20) | (flow & 0xFFFFF)
    return (
        struct.pack("!IHBB", first, len(payload), nh, hlim)
        + ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + bytes(payload)
    )


def ip(src: str, dst: str, proto: int, payload: bytes, **kw) -> bytes:
    """IPv4 or IPv6 by the address family of ``src``."""
    if ipaddress.ip_address(src).version == 4:
        return ipv4(src, dst, proto, payload, **kw)
    return ipv6(src, dst, proto, payload, **kw)


def tcp_flags(flags) -> int:
    """Flag bits from an int or letters ``"SA"`` (F S R P A U E C)."""
    if isinstance(flags, int):
        return flags & 0xFF
    bits = 0
    for ch in str(flags).upper():
        if ch not in TCP_FLAG_BITS:
            raise ValueError(f"unknown TCP flag {ch!r}")
        bits |= TCP_FLAG_BITS[ch]
    return bits


def tcp(
    sport: int,
    dport: int,
    payload: bytes = b"",
    *,
    src: str,
    dst: str,
    seq: int = 0,
    ack: int = 0,
    flags="S",
    win: int = 65535,
    urg: int = 0,
    options: bytes = b"",
) -> bytes:
    """TCP segment with a correct checksum over the ``src``/``dst`` pseudo-header."""
    if len(options) % 4:
        options = bytes(options) + b"\0" * (-len(options) % 4)
    doff = 5 + len(options) // 4
    if doff > 15:
        raise ValueError("TCP options longer than 40 bytes")
    seg = (
        struct.pack(
            "!HHIIBBHHH",
            sport,
            dport,
            seq & 0xFFFFFFFF,
            ack & 0xFFFFFFFF,
            doff << 4,
            tcp_flags(flags),
            win,
            0,
            urg,
        )
        + options
        + bytes(payload)
    )
    c = l4_checksum(src, dst, PROTO_TCP, seg)
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def udp(
    sport: int, dport: int, payload: bytes = b"", *, src: str, dst: str, zero_checksum: bool = False
) -> bytes:
    """UDP datagram; checksum computed (0 only when asked, which IPv4 allows)."""
    length = 8 + len(payload)
    seg = struct.pack("!HHHH", sport, dport, length, 0) + bytes(payload)
    if zero_checksum:
        return seg
    c = l4_checksum(src, dst, PROTO_UDP, seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", c) + seg[8:]


def icmp(type_: int, code: int, rest: bytes = b"\0\0\0\0", payload: bytes = b"") -> bytes:
    """ICMPv4 message: type, code, checksum, 4 bytes ``rest`` of header, ``payload``."""
    msg = struct.pack("!BBH", type_, code, 0) + bytes(rest) + bytes(payload)
    return msg[:2] + struct.pack("!H", checksum(msg)) + msg[4:]


def icmp_echo(ident: int, seq: int, payload: bytes = b"", reply: bool = False) -> bytes:
    return icmp(0 if reply else 8, 0, struct.pack("!HH", ident, seq), payload)


def icmp_error(type_: int, code: int, quoted: bytes, param: int = 0) -> bytes:
    """ICMPv4 error (3 unreachable, 11 time exceeded, 12 parameter problem...) quoting an IP
    packet; ``param`` fills the 4-byte field (next-hop MTU for 3/4, pointer for 12)."""
    if type_ == 3 and code == 4:
        rest = struct.pack("!HH", 0, param)
    elif type_ == 12:
        rest = struct.pack("!B3x", param)
    else:
        rest = struct.pack("!I", param)
    return icmp(type_, code, rest, bytes(quoted[:548]))


def icmpv6(type_: int, code: int, rest: bytes, payload: bytes, *, src: str, dst: str) -> bytes:
    msg = struct.pack("!BBH", type_, code, 0) + bytes(rest) + bytes(payload)
    c = l4_checksum(src, dst, PROTO_ICMPV6, msg)
    return msg[:2] + struct.pack("!H", c) + msg[4:]


def icmpv6_echo(
    ident: int, seq: int, payload: bytes = b"", *, src: str, dst: str, reply: bool = False
) -> bytes:
    return icmpv6(129 if reply else 128, 0, struct.pack("!HH", ident, seq), payload, src=src, dst=dst)


def icmpv6_error(type_: int, code: int, quoted: bytes, *, src: str, dst: str, param: int = 0) -> bytes:
    """ICMPv6 error (1 unreachable, 2 packet too big (param = MTU), 3 time exceeded,
    4 parameter problem (param = pointer)) quoting as much of the packet as fits 1280 bytes."""
    return icmpv6(type_, code, struct.pack("!I", param), bytes(quoted[:1232]), src=src, dst=dst)


def arp(op: int, sha, spa: str, tha, tpa: str) -> bytes:
    """ARP body for Ethernet/IPv4 (op 1 request, 2 reply)."""
    return (
        struct.pack("!HHBBH", 1, ETH_IPV4, 6, 4, op)
        + mac(sha)
        + ipaddress.IPv4Address(spa).packed
        + mac(tha)
        + ipaddress.IPv4Address(tpa).packed
    )


def _l2(l3: bytes, l2: bool, eth_src, eth_dst, vlans) -> bytes:
    return ethernet(l3, src=eth_src, dst=eth_dst, vlans=vlans) if l2 else l3


def tcp_packet(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    payload: bytes = b"",
    *,
    flags="S",
    seq: int = 0,
    ack: int = 0,
    win: int = 65535,
    options: bytes = b"",
    ttl: int = 64,
    l2: bool = True,
    eth_src="02:00:00:00:00:01",
    eth_dst="02:00:00:00:00:02",
    vlans=(),
) -> bytes:
    """A whole Ethernet (or raw with ``l2=False``) / IP / TCP packet."""
    seg = tcp(
        sport, dport, payload, src=src, dst=dst, seq=seq, ack=ack, flags=flags, win=win, options=options
    )
    return _l2(_ip_ttl(src, dst, PROTO_TCP, seg, ttl), l2, eth_src, eth_dst, vlans)


def udp_packet(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    payload: bytes = b"",
    *,
    ttl: int = 64,
    l2: bool = True,
    eth_src="02:00:00:00:00:01",
    eth_dst="02:00:00:00:00:02",
    vlans=(),
) -> bytes:
    seg = udp(sport, dport, payload, src=src, dst=dst)
    return _l2(_ip_ttl(src, dst, PROTO_UDP, seg, ttl), l2, eth_src, eth_dst, vlans)


def icmp_echo_packet(
    src: str,
    dst: str,
    ident: int = 1,
    seq: int = 1,
    payload: bytes = b"",
    *,
    reply: bool = False,
    ttl: int = 64,
    l2: bool = True,
    eth_src="02:00:00:00:00:01",
    eth_dst="02:00:00:00:00:02",
    vlans=(),
) -> bytes:
    """ICMP echo over IPv4 or ICMPv6 echo over IPv6, by the address family."""
    if ipaddress.ip_address(src).version == 4:
        l3 = ipv4(src, dst, PROTO_ICMP, icmp_echo(ident, seq, payload, reply), ttl=ttl)
    else:
        l3 = ipv6(
            src, dst, PROTO_ICMPV6, icmpv6_echo(ident, seq, payload, src=src, dst=dst, reply=reply), hlim=ttl
        )
    return _l2(l3, l2, eth_src, eth_dst, vlans)


def arp_packet(op: int, sha, spa: str, tha, tpa: str, vlans=()) -> bytes:
    dst = "ff:ff:ff:ff:ff:ff" if op == 1 else tha
    return ethernet(arp(op, sha, spa, tha, tpa), ETH_ARP, src=sha, dst=dst, vlans=vlans)


def _ip_ttl(src, dst, proto, seg, ttl):
    if ipaddress.ip_address(src).version == 4:
        return ipv4(src, dst, proto, seg, ttl=ttl)
    return ipv6(src, dst, proto, seg, hlim=ttl)


# ---------------------------------------------------------------------------------------------
# many packets at once
# ---------------------------------------------------------------------------------------------
def _addrs(value, n: int, name: str):
    """(version, hi u64[n], lo u64[n]) from a string, a list of strings, a uint32 array (IPv4)
    or an (n, 2) uint64 array of (hi, lo) (IPv6)."""
    if isinstance(value, str):
        a = ipaddress.ip_address(value)
        v = int(a)
        return (a.version, np.full(n, v >> 64, np.uint64), np.full(n, v & 0xFFFFFFFFFFFFFFFF, np.uint64))
    arr = np.asarray(value)
    if arr.dtype.kind in "iu" and arr.ndim == 1:
        if arr.shape[0] != n:
            raise ValueError(f"{name}: {arr.shape[0]} addresses for {n} packets")
        if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
            raise ValueError(f"{name}: IPv4 addresses as integers must fit 32 bits")
        return 4, np.zeros(n, np.uint64), arr.astype(np.uint64)
    if arr.dtype.kind in "iu" and arr.ndim == 2 and arr.shape == (n, 2):
        return 6, arr[:, 0].astype(np.uint64), arr[:, 1].astype(np.uint64)
    addrs = [ipaddress.ip_address(str(x)) for x in arr.tolist()]
    if len(addrs) != n:
        raise ValueError(f"{name}: {len(addrs)} addresses for {n} packets")
    vers = {a.version for a in addrs}
    if len(vers) != 1:
        raise ValueError(f"{name}: mixes IPv4 and IPv6")
    ints = [int(a) for a in addrs]
    return (
        vers.pop(),
        np.array([x >> 64 for x in ints], np.uint64),
        np.array([x & 0xFFFFFFFFFFFFFFFF for x in ints], np.uint64),
    )


def _col(value, n, dtype, name, lo=0, hi=None):
    arr = np.asarray(value)
    if arr.ndim == 0:
        arr = np.full(n, arr)
    if arr.shape != (n,):
        raise ValueError(f"{name}: expected a scalar or {n} values")
    if arr.size and (arr.min() < lo or (hi is not None and arr.max() > hi)):
        raise ValueError(f"{name}: values must lie in [{lo}, {hi}]")
    return arr.astype(dtype)


@njit(cache=True)
def _build_kernel(
    out,
    offset,
    ver,
    l2len,
    proto,
    eth,
    vlan,
    src_hi,
    src_lo,
    dst_hi,
    dst_lo,
    sport,
    dport,
    plen,
    seq,
    ack,
    flags,
    win,
    ttl,
    ident,
    fill,
):
    n = offset.shape[0]
    for i in range(n):
        p = offset[i]
        # L2
        if l2len > 0:
            for k in range(12):
                out[p + k] = eth[k]
            q = p + 12
            if l2len == 18:
                out[q] = 0x81
                out[q + 1] = 0x00
                out[q + 2] = (vlan >> 8) & 0xFF
                out[q + 3] = vlan & 0xFF
                q += 4
            et = 0x0800 if ver == 4 else 0x86DD
            out[q] = et >> 8
            out[q + 1] = et & 0xFF
        l3 = p + l2len
        if proto == 6:
            l4len = 20
        elif proto == 17 or proto == 1 or proto == 58:
            l4len = 8
        else:
            l4len = 0
        seglen = l4len + plen[i]
        # L3 + pseudo-header sum
        acc = np.int64(0)
        if ver == 4:
            h = l3
            tot = 20 + seglen
            out[h] = 0x45
            out[h + 1] = 0
            out[h + 2] = (tot >> 8) & 0xFF
            out[h + 3] = tot & 0xFF
            out[h + 4] = (ident[i] >> 8) & 0xFF
            out[h + 5] = ident[i] & 0xFF
            out[h + 6] = 0x40  # DF
            out[h + 7] = 0
            out[h + 8] = ttl[i]
            out[h + 9] = proto
            out[h + 10] = 0
            out[h + 11] = 0
            s = src_lo[i]
            d = dst_lo[i]
            for k in range(4):
                out[h + 12 + k] = (s >> np.uint64(24 - 8 * k)) & np.uint64(0xFF)
                out[h + 16 + k] = (d >> np.uint64(24 - 8 * k)) & np.uint64(0xFF)
            c = csum_final(csum_add(out, h, 20, 0))
            out[h + 10] = c >> 8
            out[h + 11] = c & 0xFF
            if proto != 1:  # ICMPv4 has no pseudo-header
                acc = csum_add(out, h + 12, 8, acc)
            l4 = h + 20
        else:
            h = l3
            out[h] = 0x60
            out[h + 1] = 0
            out[h + 2] = 0
            out[h + 3] = 0
            out[h + 4] = (seglen >> 8) & 0xFF
            out[h + 5] = seglen & 0xFF
            out[h + 6] = proto
            out[h + 7] = ttl[i]
            for k in range(8):
                sh = np.uint64(56 - 8 * k)
                out[h + 8 + k] = (src_hi[i] >> sh) & np.uint64(0xFF)
                out[h + 16 + k] = (src_lo[i] >> sh) & np.uint64(0xFF)
                out[h + 24 + k] = (dst_hi[i] >> sh) & np.uint64(0xFF)
                out[h + 32 + k] = (dst_lo[i] >> sh) & np.uint64(0xFF)
            acc = csum_add(out, h + 8, 32, acc)
            l4 = h + 40
        if proto != 1:
            acc += proto + seglen
        # L4
        if proto == 6:
            out[l4] = sport[i] >> 8
            out[l4 + 1] = sport[i] & 0xFF
            out[l4 + 2] = dport[i] >> 8
            out[l4 + 3] = dport[i] & 0xFF
            for k in range(4):
                out[l4 + 4 + k] = (seq[i] >> (24 - 8 * k)) & 0xFF
                out[l4 + 8 + k] = (ack[i] >> (24 - 8 * k)) & 0xFF
            out[l4 + 12] = 0x50
            out[l4 + 13] = flags[i]
            out[l4 + 14] = win[i] >> 8
            out[l4 + 15] = win[i] & 0xFF
            for k in range(16, 20):
                out[l4 + k] = 0
            ck = l4 + 16
        elif proto == 17:
            out[l4] = sport[i] >> 8
            out[l4 + 1] = sport[i] & 0xFF
            out[l4 + 2] = dport[i] >> 8
            out[l4 + 3] = dport[i] & 0xFF
            out[l4 + 4] = (seglen >> 8) & 0xFF
            out[l4 + 5] = seglen & 0xFF
            out[l4 + 6] = 0
            out[l4 + 7] = 0
            ck = l4 + 6
        else:  # ICMP / ICMPv6 echo request: id, seq
            out[l4] = 8 if proto == 1 else 128
            out[l4 + 1] = 0
            out[l4 + 2] = 0
            out[l4 + 3] = 0
            out[l4 + 4] = sport[i] >> 8
            out[l4 + 5] = sport[i] & 0xFF
            out[l4 + 6] = dport[i] >> 8
            out[l4 + 7] = dport[i] & 0xFF
            ck = l4 + 2
        out[l4 + l4len : l4 + l4len + plen[i]] = fill
        c = csum_final(csum_add(out, l4, seglen, acc))
        if proto == 17 and c == 0:
            c = np.uint16(0xFFFF)
        out[ck] = c >> 8
        out[ck + 1] = c & 0xFF


def build_batch(
    n: int,
    src,
    dst,
    proto: int = PROTO_TCP,
    sport=1024,
    dport=80,
    payload_len=0,
    *,
    tcp_flags_=0x02,
    seq=0,
    ack=0,
    win=65535,
    ttl=64,
    ident=0,
    l2: bool = True,
    eth_src="02:00:00:00:00:01",
    eth_dst="02:00:00:00:00:02",
    vlan: int | None = None,
    ts=None,
    port=None,
    fill: int = 0,
) -> Batch:
    """Build ``n`` packets of one shape into a batch in one compiled pass.

    ``proto`` is 6 (TCP), 17 (UDP) or ICMP echo request (1 over IPv4, 58 over IPv6; ``sport``
    is then the echo id and ``dport`` the sequence number). Every per-packet argument is a
    scalar or an array of ``n``: ``src``/``dst`` (see :func:`_addrs`), ports, ``payload_len``
    (payload filled with byte ``fill``), TCP ``seq``/``ack``/``tcp_flags_``/``win``, ``ttl``
    and the IPv4 ``ident``. IPv4 packets carry DF; all checksums are correct.
    """
    n = int(n)
    if n < 0:
        raise ValueError("n must be >= 0")
    ver, src_hi, src_lo = _addrs(src, n, "src")
    ver2, dst_hi, dst_lo = _addrs(dst, n, "dst")
    if ver != ver2:
        raise ValueError("src and dst address families differ")
    if ver == 4 and n and (np.any(src_hi) or np.any(dst_hi)):
        raise ValueError("IPv4 addresses out of range")
    if ver == 4 and proto == PROTO_ICMPV6 or ver == 6 and proto == PROTO_ICMP:
        raise ValueError("ICMP echo: use proto 1 with IPv4 and 58 with IPv6")
    if proto not in (PROTO_TCP, PROTO_UDP, PROTO_ICMP, PROTO_ICMPV6):
        raise ValueError(f"proto {proto}: TCP (6), UDP (17), ICMP (1) or ICMPv6 (58) only")
    l3len = 20 if ver == 4 else 40
    l4len = 20 if proto == PROTO_TCP else 8
    plen = _col(payload_len, n, np.int64, "payload_len", 0, 0xFFFF - l3len - l4len)
    l2len = (18 if vlan is not None else 14) if l2 else 0
    length = (l2len + l3len + l4len + plen).astype(np.int32)
    offset = np.zeros(n, np.int64)
    if n:
        np.cumsum(length[:-1], out=offset[1:])
    out = np.empty(int(length.sum(dtype=np.int64)), np.uint8)
    eth = np.frombuffer(mac(eth_dst) + mac(eth_src), np.uint8)
    _build_kernel(
        out,
        offset,
        ver,
        l2len,
        proto,
        eth,
        int(vlan or 0) & 0xFFFF,
        src_hi,
        src_lo,
        dst_hi,
        dst_lo,
        _col(sport, n, np.int64, "sport", 0, 0xFFFF),
        _col(dport, n, np.int64, "dport", 0, 0xFFFF),
        plen,
        _col(seq, n, np.int64, "seq", 0, 0xFFFFFFFF),
        _col(ack, n, np.int64, "ack", 0, 0xFFFFFFFF),
        _col(
            tcp_flags(tcp_flags_) if isinstance(tcp_flags_, str) else tcp_flags_,
            n,
            np.int64,
            "tcp_flags",
            0,
            0xFF,
        ),
        _col(win, n, np.int64, "win", 0, 0xFFFF),
        _col(ttl, n, np.int64, "ttl", 0, 0xFF),
        _col(ident, n, np.int64, "ident", 0, 0xFFFF),
        int(fill) & 0xFF,
    )
    return Batch(
        data=out,
        offset=offset,
        length=length,
        wire_len=length.copy(),
        port=_col(0 if port is None else port, n, np.uint16, "port", 0, 0xFFFF),
        ts=_col(0 if ts is None else ts, n, np.int64, "ts", -(2**63), 2**63 - 1),
        linktype=LINK_ETHERNET if l2 else LINK_RAW,
    )
