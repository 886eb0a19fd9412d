"""The packet parser: one compiled kernel call fills a :class:`FlowKeys` for a whole batch.

What it reads, outermost first:

* Link layer (the batch's pcap link type): Ethernet II (1) with up to two 802.1Q / 802.1ad
  tags (a third tag is left as the ethertype); raw IP (101, and 12 / 14, the DLT numbers
  libpcap maps to it: the version nibble picks IPv4 or IPv6; 228 IPv4, 229 IPv6); BSD loopback
  (0: a 4-byte address family in the writer's byte order, either accepted; 108: in network
  order; AF_INET 2, AF_INET6 24 / 28 / 30); Linux cooked capture v1 (113: 16-byte header,
  protocol at offset 14) and v2 (276: 20 bytes, protocol at offset 0), whose protocol field is
  an ethertype (VLAN tags, IPv4, IPv6 and ARP follow as after Ethernet). Only Ethernet has an
  L2 header: ``l2_off`` is -1 for the others, MACs are 0.
* ARP for IPv4 (any hardware type): op, sender/target IPs in ``src``/``dst``, and the
  sender/target MACs when hardware addresses are 6 bytes (``F2_ARP_HW``). ARP for another
  protocol is ``BAD_ARP`` (op read, addresses not).
* IPv4: options skipped by IHL, header checksum verified, total length checked against the
  frame (Ethernet padding is ignored: later layers end at the IP total length). Total length 0
  on a TCP packet that is no fragment is a super-frame (Linux BIG TCP, TSO): its length is the
  rest of the frame (``F2_BIG_TCP``). Fragments set ``F_FRAG`` (and ``F_MF``); a non-first
  fragment's payload is not parsed.
* IPv6: hop-by-hop (first only), routing, fragment and destination-options headers walked, at
  most 8; ``proto`` is the protocol after them. Any fragment header sets ``F_FRAG`` (an atomic
  fragment, offset 0 without M, is still parsed through). ``ip_len`` is the payload length
  plus 40. Payload length 0 with a hop-by-hop jumbo payload option is an RFC 2675 jumbogram
  (``F2_JUMBO``; a jumbo length <= 65535 is ``BAD_IPV6_EXT``); payload length 0 with TCP next
  is a BIG TCP super-frame, its length the rest of the frame (``F2_BIG_TCP``).
* TCP, UDP (length 0 in a jumbogram: the rest of it), SCTP (ports), ICMP / ICMPv6 (type,
  code, id of echo-like messages; for error messages the quoted IP header's addresses,
  protocol and ports or echo id go to ``inner_*`` with ``F_ICMP_ERR``), ESP (SPI, sequence),
  GRE (protocol, key).
* Tunnels, followed into the inner packet: VXLAN (UDP port 4789, I flag required), GENEVE (UDP
  port 6081, version 0, options skipped, inner Ethernet, IPv4 or IPv6), NVGRE (GRE protocol
  0x6558 with a key; VSID = key >> 8), IP in IP (IPv4 or IPv6 protocol 4 or 41: ``TUN_IPIP``)
  and GRE carrying IPv4 / IPv6 (0x0800 / 0x86DD: ``TUN_GRE``) as hosts use them between
  each other (Calico's IPIP mode): these have no VNI, ``tenant`` stays -1. ``tenant`` is the
  VNI/VSID of the innermost tunnel, ``tun_type`` its type, ``outer_l3_off`` the outermost IP
  header; every other field describes the innermost packet. At most two tunnels are
  followed; a third is a ``TUNNEL_DEPTH`` error.
* Tunnels recognised but not followed: the reported packet is the carrier, and
  ``tun_unfollowed`` names the tunnel: ERSPAN (GRE 0x88BE, 0x22EB), MPLS (UDP port 6635, GRE
  0x8847 / 0x8848, IP protocol 137), VXLAN-GPE (UDP port 4790), GTP-U (UDP port 2152), EtherIP
  (IP protocol 97), the followed kinds when they ride in the first fragment of a fragmented
  packet, and IP in IP or GRE inside an overlay that gave a tenant: that is the tenant's own
  packet (its addresses and MAC are the ones policy and port security can vouch for), not
  something to look through.

Snapped packets (captured length < wire length): the headers that were captured are decoded;
lengths (``ip_len``, ``payload_len``) come from the headers, which are checked against the
length on the wire, not the captured one, and ``F2_TRUNCATED`` says the capture ended inside
the packet as its headers describe it. A header cut by the snap is still a ``TRUNC_*`` error.

The first problem met stops parsing with an error code (:mod:`.errors`); the fields parsed
before it stay filled. Every read is checked against the captured length, so truncated or
hostile bytes only ever produce an error code. Absent offsets are -1, ``tenant`` is -1 when no
tunnel carried the packet, everything else absent is 0. ``flow_hash`` mixes tenant, addresses,
protocol and ports (or ICMP id) of the innermost packet.

:mod:`.parse_ref` is the plain-Python statement of the same rules; tests hold the two equal.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..errors import InputError
from ..lowlevel import prefetch, rd8, rd16, rd32, rd32_le, rd48, rd64
from . import errors as E
from .batch import (
    AF_INET,
    ARP_OP,
    ARP_SHA,
    ARP_THA,
    DPORT,
    DST_HI,
    DST_LO,
    ESP_SEQ,
    ESP_SPI,
    ETH_DST,
    ETH_SRC,
    ETHERTYPE,
    F2_ARP_HW,
    F2_BIG_TCP,
    F2_JUMBO,
    F2_TRUNCATED,
    F_ARP,
    F_ESP,
    F_FRAG,
    F_GRE,
    F_ICMP,
    F_ICMP_ERR,
    F_MF,
    F_PORTS,
    FLAGS,
    FLAGS2,
    FLOW_HASH,
    FRAG_OFF,
    GRE_KEY,
    GRE_PROTO,
    ICMP_CODE,
    ICMP_ID,
    ICMP_TYPE,
    INNER_DPORT,
    INNER_DST_HI,
    INNER_DST_LO,
    INNER_ICMP_TYPE,
    INNER_PROTO,
    INNER_SPORT,
    INNER_SRC_HI,
    INNER_SRC_LO,
    IP_LEN,
    IP_VER,
    L2_OFF,
    L3_OFF,
    L4_OFF,
    LINK_ETHERNET,
    LINK_IPV4,
    LINK_IPV6,
    LINK_LINUX_SLL,
    LINK_LOOP,
    LINK_NULL,
    LINK_RAW,
    LINK_RAW_DLT12,
    LINK_RAW_DLT14,
    N_I32,
    N_U8,
    N_U16,
    N_U32,
    N_U64,
    N_VLANS,
    OUTER_L3_OFF,
    PAYLOAD_LEN,
    PAYLOAD_OFF,
    PROTO,
    SPORT,
    SRC_HI,
    SRC_LO,
    SUPPORTED_LINKTYPES,
    TCP_ACK,
    TCP_DOFF,
    TCP_FLAGS,
    TCP_SEQ,
    TCP_WIN,
    TENANT,
    TTL,
    TUN_ERSPAN,
    TUN_ETHERIP,
    TUN_GENEVE,
    TUN_GRE,
    TUN_GTPU,
    TUN_IPIP,
    TUN_MPLS,
    TUN_NVGRE,
    TUN_TYPE,
    TUN_UNFOLLOWED,
    TUN_VXLAN,
    TUN_VXLAN_GPE,
    VLAN0,
    VLAN1,
    Batch,
    FlowKeys,
)

__all__ = ["parse", "SUPPORTED_LINKTYPES"]

# layer kinds of the parse loop (_K_COOKED: a cooked header's protocol field read, VLAN tags or
# the L3 header next; _K_NONE: nothing the parser reads follows the link-layer header)
_K_ETH, _K_V4, _K_V6, _K_COOKED, _K_NONE = 0, 1, 2, 3, 4
_MAX_VLANS = 2
_MAX_EXT = 8
_MAX_DEPTH = 2
_V4_PREFIX = 0x0000FFFF00000000

_H_K = tuple(
    np.uint64(k)
    for k in (
        0x9E3779B97F4A7C15,
        0xBF58476D1CE4E5B9,
        0x94D049BB133111EB,
        0xD6E8FEB86659FD93,
        0xC2B2AE3D27D4EB4F,
        0x165667B19E3779F9,
    )
)
_S29 = np.uint64(29)
_S32 = np.uint64(32)
_S16 = np.uint64(16)
_M32 = np.uint64(0xFFFFFFFF)


_PREFETCH_AHEAD = 6  # packets; headers of big frames come from memory, not cache


@njit(cache=True)
def _is_v6_ext(nh):
    return nh == 0 or nh == 43 or nh == 44 or nh == 60


@njit(cache=True)
def _icmp_has_id(t, ver):
    if ver == 4:
        return t == 0 or t == 8 or (t >= 13 and t <= 18)
    return t == 128 or t == 129


@njit(cache=True)
def _icmp_is_error(t, ver):
    if ver == 4:
        return t == 3 or t == 4 or t == 5 or t == 11 or t == 12
    return t >= 1 and t <= 4


@njit(cache=True)
def _udp_tunnel(dport):
    """The tunnel a UDP destination port names, for datagrams the parser does not step into."""
    if dport == 4789:
        return TUN_VXLAN
    if dport == 6081:
        return TUN_GENEVE
    if dport == 4790:
        return TUN_VXLAN_GPE
    if dport == 6635:
        return TUN_MPLS
    if dport == 2152:
        return TUN_GTPU
    return 0


@njit(cache=True)
def _icmp_quoted(d, b, q, end, ver, u64, u16, u8, i):
    """Quoted header of an ICMP error at ``q``; returns an error code."""
    if ver == 4:
        if end - q < 20:
            return E.TRUNC_ICMP_INNER
        ihl = (rd8(d, b + q) & 15) * 4
        if (rd8(d, b + q) >> 4) != 4 or ihl < 20:
            return E.BAD_ICMP_INNER
        if end - q < ihl:
            return E.TRUNC_ICMP_INNER
        proto = rd8(d, b + q + 9)
        s_hi = np.uint64(0)
        s_lo = np.uint64(_V4_PREFIX | rd32(d, b + q + 12))
        d_hi = np.uint64(0)
        d_lo = np.uint64(_V4_PREFIX | rd32(d, b + q + 16))
        later = (rd16(d, b + q + 6) & 0x1FFF) != 0
        r = q + ihl
    else:
        if end - q < 40:
            return E.TRUNC_ICMP_INNER
        if (rd8(d, b + q) >> 4) != 6:
            return E.BAD_ICMP_INNER
        s_hi = rd64(d, b + q + 8)
        s_lo = rd64(d, b + q + 16)
        d_hi = rd64(d, b + q + 24)
        d_lo = rd64(d, b + q + 32)
        proto = rd8(d, b + q + 6)
        r = q + 40
        count = 0
        later = False
        while _is_v6_ext(proto):
            if count == _MAX_EXT:
                return E.BAD_ICMP_INNER
            count += 1
            if proto == 44:
                if end - r < 8:
                    return E.TRUNC_ICMP_INNER
                later = (rd16(d, b + r + 2) >> 3) != 0
                proto = rd8(d, b + r)
                r += 8
                if later:
                    break
            else:
                if end - r < 2:
                    return E.TRUNC_ICMP_INNER
                hlen = (rd8(d, b + r + 1) + 1) * 8
                if end - r < hlen:
                    return E.TRUNC_ICMP_INNER
                proto = rd8(d, b + r)
                r += hlen
    u8[INNER_PROTO, i] = proto
    u64[INNER_SRC_HI, i] = s_hi
    u64[INNER_SRC_LO, i] = s_lo
    u64[INNER_DST_HI, i] = d_hi
    u64[INNER_DST_LO, i] = d_lo
    if not later:
        if proto == 6 or proto == 17 or proto == 132:
            if end - r < 8:
                return E.TRUNC_ICMP_INNER
            u16[INNER_SPORT, i] = rd16(d, b + r)
            u16[INNER_DPORT, i] = rd16(d, b + r + 2)
        elif (proto == 1 and ver == 4) or (proto == 58 and ver == 6):
            if end - r < 8:
                return E.TRUNC_ICMP_INNER
            t = rd8(d, b + r)
            u8[INNER_ICMP_TYPE, i] = t
            if _icmp_has_id(t, ver):
                u16[INNER_SPORT, i] = rd16(d, b + r + 4)
    u8[FLAGS, i] |= F_ICMP_ERR
    return E.OK


@njit(cache=True)
def _flow_hash(src_hi, src_lo, dst_hi, dst_lo, tenant, proto, sport, dport, icmp_id):
    """Six independent multiplies (they overlap in the pipeline), then one finishing round."""
    x = (
        (src_hi * _H_K[0])
        ^ (src_lo * _H_K[1])
        ^ (dst_hi * _H_K[2])
        ^ (dst_lo * _H_K[3])
        ^ ((np.uint64(np.int64(tenant) & 0xFFFFFFFF) | (np.uint64(proto) << _S32)) * _H_K[4])
        ^ (((np.uint64(sport) << _S16) | np.uint64(dport) | (np.uint64(icmp_id) << _S32)) * _H_K[5])
    )
    x = (x ^ (x >> _S29)) * _H_K[0]
    return (x ^ (x >> _S32)) & _M32


@njit(cache=True)
def _jumbo_option(d, b, pos, lim):
    """Payload length of the jumbo payload option (RFC 2675) in the hop-by-hop header at
    ``pos``, or -1 when the header is not all there or has no such option."""
    if lim - pos < 2:
        return -1
    hend = pos + (rd8(d, b + pos + 1) + 1) * 8
    if hend > lim:
        return -1
    q = pos + 2
    while q < hend:
        t = rd8(d, b + q)
        if t == 0:  # Pad1
            q += 1
            continue
        if hend - q < 2:
            return -1
        olen = rd8(d, b + q + 1)
        if t == 0xC2:
            if olen != 4 or hend - q < 6:
                return -1
            return rd32(d, b + q + 2)
        q += 2 + olen
    return -1


@njit(cache=True)
def _parse_kernel(data, offset, length, wire_len, linktype, u64, u32, i32, u16, u8):
    n = offset.shape[0]
    for r in range(N_U64):
        row64 = u64[r]
        for j in range(n):
            row64[j] = 0
    for r in range(N_U32):
        row32 = u32[r]
        for j in range(n):
            row32[j] = 0
    for r in range(N_I32):
        rowi = i32[r]
        fill = 0 if r == PAYLOAD_LEN else -1
        for j in range(n):
            rowi[j] = fill
    for r in range(N_U16):
        row16 = u16[r]
        for j in range(n):
            row16[j] = 0
    for r in range(N_U8):
        row8 = u8[r]
        for j in range(n):
            row8[j] = 0
    size = data.shape[0]
    d = data
    raw = linktype == LINK_RAW or linktype == LINK_RAW_DLT12 or linktype == LINK_RAW_DLT14
    for i in range(n):
        if i + _PREFETCH_AHEAD < n:
            pb = offset[i + _PREFETCH_AHEAD]
            if pb >= 0 and pb + 128 <= size:
                prefetch(data, pb)
                prefetch(data, pb + 64)
        b = offset[i]
        ln = np.int64(length[i])
        if b < 0 or b > size or ln < 0:
            b = 0
            ln = 0
        elif ln > size - b:
            ln = size - b
        # cap: bytes captured; end: where the current layer ends as the headers say (the frame
        # on the wire to start with: beyond cap when the capture was snapped); lim: what can
        # be read of the current layer. Header reads check lim, lengths in headers check end.
        cap = ln
        end = np.int64(wire_len[i])
        if end < cap:
            end = cap
        # Fast path: the common shape, Ethernet (no tag) / IPv4 without options, no fragment,
        # checksum right / TCP, captured whole. Each test below is one the general path makes
        # on the same bytes, so what it writes is what the general path would; anything else
        # (including every error) falls through to the general path.
        if linktype == LINK_ETHERNET and cap >= 54 and end == cap and rd16(d, b + 12) == 0x0800:
            total = rd16(d, b + 16)
            if (
                rd8(d, b + 14) == 0x45
                and rd8(d, b + 23) == 6
                and (rd16(d, b + 20) & 0x3FFF) == 0
                and total >= 40
                and total <= cap - 14
            ):
                s = rd32(d, b + 14) + rd32(d, b + 18) + rd32(d, b + 22) + rd32(d, b + 26) + rd32(d, b + 30)
                s = (s & 0xFFFF) + (s >> 16)
                s = (s & 0xFFFF) + (s >> 16)
                s = (s & 0xFFFF) + (s >> 16)
                doff = (rd8(d, b + 46) >> 4) * 4
                if s == 0xFFFF and doff >= 20 and doff <= total - 20:
                    src_lo = np.uint64(_V4_PREFIX | rd32(d, b + 26))
                    dst_lo = np.uint64(_V4_PREFIX | rd32(d, b + 30))
                    sport = rd16(d, b + 34)
                    dport = rd16(d, b + 36)
                    u64[ETH_DST, i] = rd64(d, b) >> _S16
                    u64[ETH_SRC, i] = rd64(d, b + 6) >> _S16
                    u64[SRC_LO, i] = src_lo
                    u64[DST_LO, i] = dst_lo
                    u32[IP_LEN, i] = total
                    u32[TCP_SEQ, i] = rd32(d, b + 38)
                    u32[TCP_ACK, i] = rd32(d, b + 42)
                    i32[L2_OFF, i] = 0
                    i32[L3_OFF, i] = 14
                    i32[L4_OFF, i] = 34
                    i32[PAYLOAD_OFF, i] = 34 + doff
                    i32[PAYLOAD_LEN, i] = total - 20 - doff
                    u16[ETHERTYPE, i] = 0x0800
                    u16[SPORT, i] = sport
                    u16[DPORT, i] = dport
                    u16[TCP_WIN, i] = rd16(d, b + 48)
                    u8[IP_VER, i] = 4
                    u8[PROTO, i] = 6
                    u8[TTL, i] = rd8(d, b + 22)
                    u8[FLAGS, i] = F_PORTS
                    u8[TCP_DOFF, i] = doff
                    u8[TCP_FLAGS, i] = rd8(d, b + 47)
                    u32[FLOW_HASH, i] = _flow_hash(
                        np.uint64(0), src_lo, np.uint64(0), dst_lo, -1, 6, sport, dport, 0
                    )
                    continue
        lim = cap
        err = 0
        pos = 0
        depth = 0
        kind = _K_ETH
        etype = 0
        if linktype == LINK_ETHERNET:
            kind = _K_ETH
        elif raw:
            if cap >= 1 and (rd8(d, b) >> 4) == 6:
                kind = _K_V6
                u16[ETHERTYPE, i] = 0x86DD
            else:
                kind = _K_V4
                u16[ETHERTYPE, i] = 0x0800
        elif linktype == LINK_IPV4:
            kind = _K_V4
            u16[ETHERTYPE, i] = 0x0800
        elif linktype == LINK_IPV6:
            kind = _K_V6
            u16[ETHERTYPE, i] = 0x86DD
        elif linktype == LINK_NULL or linktype == LINK_LOOP:
            kind = _K_NONE
            if cap < 4:
                err = E.TRUNC_LINK
            else:
                fam = rd32(d, b)
                if linktype == LINK_NULL:
                    # the writer's byte order: read little-endian, and a family needs 16 bits,
                    # so a value above that was written big-endian
                    le = rd32_le(d, b)
                    if le <= 0xFFFF:
                        fam = le
                pos = 4
                if fam == AF_INET:
                    kind = _K_V4
                    u16[ETHERTYPE, i] = 0x0800
                elif fam == 24 or fam == 28 or fam == 30:
                    kind = _K_V6
                    u16[ETHERTYPE, i] = 0x86DD
        else:  # Linux cooked capture, v1 or v2
            hl = 16 if linktype == LINK_LINUX_SLL else 20
            if cap < hl:
                kind = _K_NONE
                err = E.TRUNC_LINK
            else:
                kind = _K_COOKED
                etype = rd16(d, b + 14) if linktype == LINK_LINUX_SLL else rd16(d, b)
                pos = hl
        while kind != _K_NONE:
            # ---- L2 --------------------------------------------------------------------
            if kind == _K_ETH or kind == _K_COOKED:
                if kind == _K_ETH:
                    i32[L2_OFF, i] = pos
                    if lim - pos < 14:
                        err = E.TRUNC_ETH
                        break
                    # 14 bytes are there: read each MAC as 8 bytes (two wide loads) and drop 2
                    u64[ETH_DST, i] = rd64(d, b + pos) >> _S16
                    u64[ETH_SRC, i] = rd64(d, b + pos + 6) >> _S16
                    etype = rd16(d, b + pos + 12)
                    pos += 14
                nv = 0
                while (etype == 0x8100 or etype == 0x88A8) and nv < _MAX_VLANS:
                    if lim - pos < 4:
                        u16[ETHERTYPE, i] = etype
                        err = E.TRUNC_VLAN
                        break
                    u16[VLAN0 + nv, i] = rd16(d, b + pos)
                    nv += 1
                    u8[N_VLANS, i] = nv
                    etype = rd16(d, b + pos + 2)
                    pos += 4
                if err:
                    break
                u16[ETHERTYPE, i] = etype
                if etype == 0x0800:
                    kind = _K_V4
                elif etype == 0x86DD:
                    kind = _K_V6
                elif etype == 0x0806:
                    u8[FLAGS, i] |= F_ARP
                    i32[L3_OFF, i] = pos
                    if lim - pos < 8:
                        err = E.TRUNC_ARP
                        break
                    o = b + pos
                    hln = rd8(d, o + 4)
                    u16[ARP_OP, i] = rd16(d, o + 6)
                    if rd16(d, o + 2) != 0x0800 or rd8(d, o + 5) != 4:
                        err = E.BAD_ARP
                        break
                    if lim - pos < 16 + 2 * hln:
                        err = E.TRUNC_ARP
                        break
                    if hln == 6:
                        u64[ARP_SHA, i] = rd48(d, o + 8)
                        u64[ARP_THA, i] = rd48(d, o + 18)
                        u8[FLAGS2, i] |= F2_ARP_HW
                    u64[SRC_LO, i] = _V4_PREFIX | rd32(d, o + 8 + hln)
                    u64[DST_LO, i] = _V4_PREFIX | rd32(d, o + 12 + 2 * hln)
                    break
                else:
                    break

            # ---- L3 --------------------------------------------------------------------
            partial = False
            if kind == _K_V4:
                i32[L3_OFF, i] = pos
                if lim - pos < 20:
                    err = E.TRUNC_IPV4
                    break
                o = b + pos
                v = rd8(d, o)
                if (v >> 4) != 4:
                    err = E.BAD_IPV4_VER
                    break
                ihl = (v & 15) * 4
                total = rd16(d, o + 2)
                frag = rd16(d, o + 6)
                proto = rd8(d, o + 9)
                u8[IP_VER, i] = 4
                u32[IP_LEN, i] = total
                u8[TTL, i] = rd8(d, o + 8)
                u8[PROTO, i] = proto
                u64[SRC_LO, i] = _V4_PREFIX | rd32(d, o + 12)
                u64[DST_LO, i] = _V4_PREFIX | rd32(d, o + 16)
                foff = frag & 0x1FFF
                if frag & 0x3FFF:
                    partial = True
                    fl = F_FRAG
                    if frag & 0x2000:
                        fl |= F_MF
                    u8[FLAGS, i] |= fl
                    u16[FRAG_OFF, i] = foff
                if ihl < 20:
                    err = E.BAD_IPV4_IHL
                    break
                if lim - pos < ihl:
                    err = E.TRUNC_IPV4
                    break
                if total == 0 and proto == 6 and not partial:
                    # a TCP super-frame (Linux BIG TCP, TSO): the frame gives the length
                    total = end - pos
                    u32[IP_LEN, i] = total
                    u8[FLAGS2, i] |= F2_BIG_TCP
                if total < ihl or total > end - pos:
                    err = E.BAD_IPV4_LEN
                    break
                s = np.int64(0)
                for k in range(0, ihl, 4):
                    s += rd32(d, o + k)
                s = (s & 0xFFFF) + (s >> 16)
                s = (s & 0xFFFF) + (s >> 16)
                s = (s & 0xFFFF) + (s >> 16)
                if s != 0xFFFF:
                    err = E.BAD_IPV4_CSUM
                    break
                end = pos + total
                lim = min(end, cap)
                pos += ihl
                ver = 4
                if foff:
                    i32[PAYLOAD_OFF, i] = pos
                    i32[PAYLOAD_LEN, i] = end - pos
                    break
            else:
                i32[L3_OFF, i] = pos
                if lim - pos < 40:
                    err = E.TRUNC_IPV6
                    break
                o = b + pos
                if (rd8(d, o) >> 4) != 6:
                    err = E.BAD_IPV6_VER
                    break
                plen = rd16(d, o + 4)
                u8[IP_VER, i] = 6
                u32[IP_LEN, i] = plen + 40
                u8[TTL, i] = rd8(d, o + 7)
                u64[SRC_HI, i] = rd64(d, o + 8)
                u64[SRC_LO, i] = rd64(d, o + 16)
                u64[DST_HI, i] = rd64(d, o + 24)
                u64[DST_LO, i] = rd64(d, o + 32)
                proto = rd8(d, o + 6)
                u8[PROTO, i] = proto
                if plen == 0 and proto == 0:
                    jumbo = _jumbo_option(d, b, pos + 40, lim)
                    if jumbo >= 0:
                        u32[IP_LEN, i] = min(jumbo + 40, 0xFFFFFFFF)
                        u8[FLAGS2, i] |= F2_JUMBO
                        if jumbo <= 0xFFFF:
                            err = E.BAD_IPV6_EXT
                            break
                        plen = jumbo
                elif plen == 0 and proto == 6 and end - pos - 40 >= 20:
                    # Linux BIG TCP over IPv6 without the jumbo header: length from the frame
                    plen = end - pos - 40
                    u32[IP_LEN, i] = plen + 40
                    u8[FLAGS2, i] |= F2_BIG_TCP
                if plen > end - pos - 40:
                    err = E.BAD_IPV6_LEN
                    break
                end = pos + 40 + plen
                lim = min(end, cap)
                pos += 40
                ver = 6
                count = 0
                foff = 0
                while _is_v6_ext(proto):
                    if count == _MAX_EXT or (proto == 0 and count > 0):
                        err = E.BAD_IPV6_EXT
                        break
                    count += 1
                    if proto == 44:
                        if lim - pos < 8:
                            err = E.BAD_IPV6_EXT
                            break
                        fo = rd16(d, b + pos + 2)
                        foff = fo >> 3
                        fl = F_FRAG
                        partial = (fo & 1) != 0 or foff != 0
                        if fo & 1:
                            fl |= F_MF
                        u8[FLAGS, i] |= fl
                        u16[FRAG_OFF, i] = foff
                        proto = rd8(d, b + pos)
                        pos += 8
                    else:
                        if lim - pos < 2:
                            err = E.BAD_IPV6_EXT
                            break
                        hlen = (rd8(d, b + pos + 1) + 1) * 8
                        if lim - pos < hlen:
                            err = E.BAD_IPV6_EXT
                            break
                        proto = rd8(d, b + pos)
                        pos += hlen
                    u8[PROTO, i] = proto
                    if foff:
                        break
                if err:
                    break
                if foff:
                    i32[PAYLOAD_OFF, i] = pos
                    i32[PAYLOAD_LEN, i] = end - pos
                    break

            # ---- L4 --------------------------------------------------------------------
            i32[L4_OFF, i] = pos
            o = b + pos
            tun = 0
            vni = 0
            nkind = _K_ETH
            if proto == 6:
                if lim - pos < 20:
                    err = E.TRUNC_TCP
                    break
                u16[SPORT, i] = rd16(d, o)
                u16[DPORT, i] = rd16(d, o + 2)
                u8[FLAGS, i] |= F_PORTS
                u32[TCP_SEQ, i] = rd32(d, o + 4)
                u32[TCP_ACK, i] = rd32(d, o + 8)
                doff = (rd8(d, o + 12) >> 4) * 4
                u8[TCP_DOFF, i] = doff
                u8[TCP_FLAGS, i] = rd8(d, o + 13)
                u16[TCP_WIN, i] = rd16(d, o + 14)
                if doff < 20 or doff > end - pos:
                    err = E.BAD_TCP_DOFF
                    break
                i32[PAYLOAD_OFF, i] = pos + doff
                i32[PAYLOAD_LEN, i] = end - pos - doff
                break
            elif proto == 17:
                if lim - pos < 8:
                    err = E.TRUNC_UDP
                    break
                dport = rd16(d, o + 2)
                u16[SPORT, i] = rd16(d, o)
                u16[DPORT, i] = dport
                u8[FLAGS, i] |= F_PORTS
                ulen = rd16(d, o + 4)
                if ulen == 0 and (u8[FLAGS2, i] & F2_JUMBO) and end - pos > 0xFFFF:
                    ulen = end - pos  # RFC 2675: a jumbo datagram's UDP length is 0
                if ulen < 8 or (not partial and ulen > end - pos):
                    err = E.BAD_UDP_LEN
                    break
                i32[PAYLOAD_OFF, i] = pos + 8
                if partial:
                    i32[PAYLOAD_LEN, i] = end - pos - 8
                    u8[TUN_UNFOLLOWED, i] = _udp_tunnel(dport)
                    break
                end = pos + ulen
                lim = min(end, cap)
                i32[PAYLOAD_LEN, i] = ulen - 8
                u = pos + 8
                if dport == 4789:
                    if lim - u < 8:
                        err = E.TRUNC_TUNNEL
                        break
                    if not (rd8(d, b + u) & 0x08):
                        err = E.BAD_TUNNEL
                        break
                    tun = TUN_VXLAN
                    vni = rd32(d, b + u + 4) >> 8
                    pos = u + 8
                elif dport == 6081:
                    if lim - u < 8:
                        err = E.TRUNC_TUNNEL
                        break
                    g0 = rd8(d, b + u)
                    optlen = (g0 & 0x3F) * 4
                    gproto = rd16(d, b + u + 2)
                    if (g0 >> 6) != 0 or optlen > end - u - 8:
                        err = E.BAD_TUNNEL
                        break
                    if gproto == 0x6558:
                        nkind = _K_ETH
                    elif gproto == 0x0800:
                        nkind = _K_V4
                    elif gproto == 0x86DD:
                        nkind = _K_V6
                    else:
                        err = E.BAD_TUNNEL
                        break
                    tun = TUN_GENEVE
                    vni = rd32(d, b + u + 4) >> 8
                    pos = u + 8 + optlen
                else:
                    u8[TUN_UNFOLLOWED, i] = _udp_tunnel(dport)
                    break
            elif proto == 132:
                if lim - pos < 12:
                    err = E.TRUNC_SCTP
                    break
                u16[SPORT, i] = rd16(d, o)
                u16[DPORT, i] = rd16(d, o + 2)
                u8[FLAGS, i] |= F_PORTS
                i32[PAYLOAD_OFF, i] = pos + 12
                i32[PAYLOAD_LEN, i] = end - pos - 12
                break
            elif (proto == 1 and ver == 4) or (proto == 58 and ver == 6):
                if lim - pos < 8:
                    err = E.TRUNC_ICMP
                    break
                t = rd8(d, o)
                u8[ICMP_TYPE, i] = t
                u8[ICMP_CODE, i] = rd8(d, o + 1)
                u8[FLAGS, i] |= F_ICMP
                i32[PAYLOAD_OFF, i] = pos + 8
                i32[PAYLOAD_LEN, i] = end - pos - 8
                if _icmp_has_id(t, ver):
                    u16[ICMP_ID, i] = rd16(d, o + 4)
                elif _icmp_is_error(t, ver) and not partial:
                    err = _icmp_quoted(d, b, pos + 8, lim, ver, u64, u16, u8, i)
                    break
                break
            elif proto == 50:
                if lim - pos < 8:
                    err = E.TRUNC_ESP
                    break
                u32[ESP_SPI, i] = rd32(d, o)
                u32[ESP_SEQ, i] = rd32(d, o + 4)
                u8[FLAGS, i] |= F_ESP
                i32[PAYLOAD_OFF, i] = pos + 8
                i32[PAYLOAD_LEN, i] = end - pos - 8
                break
            elif proto == 47:
                if lim - pos < 4:
                    err = E.TRUNC_GRE
                    break
                gf = rd16(d, o)
                if gf & 0x4007:
                    err = E.BAD_GRE
                    break
                gproto = rd16(d, o + 2)
                u16[GRE_PROTO, i] = gproto
                u8[FLAGS, i] |= F_GRE
                hlen = 4
                if gf & 0x8000:
                    hlen += 4
                key_at = hlen
                has_key = (gf & 0x2000) != 0
                if has_key:
                    hlen += 4
                if gf & 0x1000:
                    hlen += 4
                if lim - pos < hlen:
                    err = E.TRUNC_GRE
                    break
                key = 0
                if has_key:
                    key = rd32(d, o + key_at)
                    u32[GRE_KEY, i] = key
                i32[PAYLOAD_OFF, i] = pos + hlen
                i32[PAYLOAD_LEN, i] = end - pos - hlen
                if gproto == 0x6558 and has_key:
                    tun = TUN_NVGRE
                    vni = key >> 8
                elif gproto == 0x0800 or gproto == 0x86DD:
                    tun = TUN_GRE
                    vni = -1
                    nkind = _K_V4 if gproto == 0x0800 else _K_V6
                    if i32[TENANT, i] >= 0:  # a tenant's own tunnel: theirs to open
                        u8[TUN_UNFOLLOWED, i] = tun
                        break
                elif gproto == 0x88BE or gproto == 0x22EB:
                    u8[TUN_UNFOLLOWED, i] = TUN_ERSPAN
                    break
                elif gproto == 0x8847 or gproto == 0x8848:
                    u8[TUN_UNFOLLOWED, i] = TUN_MPLS
                    break
                else:
                    break
                if partial:
                    u8[TUN_UNFOLLOWED, i] = tun
                    break
                pos = pos + hlen
            elif proto == 4 or proto == 41:
                i32[PAYLOAD_OFF, i] = pos
                i32[PAYLOAD_LEN, i] = end - pos
                if partial or i32[TENANT, i] >= 0:
                    u8[TUN_UNFOLLOWED, i] = TUN_IPIP
                    break
                tun = TUN_IPIP
                vni = -1
                nkind = _K_V4 if proto == 4 else _K_V6
            else:
                i32[PAYLOAD_OFF, i] = pos
                i32[PAYLOAD_LEN, i] = end - pos
                if proto == 137:
                    u8[TUN_UNFOLLOWED, i] = TUN_MPLS
                elif proto == 97:
                    u8[TUN_UNFOLLOWED, i] = TUN_ETHERIP
                break

            # ---- a tunnel: step into its inner frame ------------------------------------
            if depth == _MAX_DEPTH:
                err = E.TUNNEL_DEPTH
                break
            if depth:
                outer = i32[OUTER_L3_OFF, i]
            else:
                outer = i32[L3_OFF, i]
            # forget the outer packet: exactly the fields the layers that lead to a tunnel
            # (Ethernet, VLAN, IPv4/IPv6, UDP, GRE) can have written; the rest are still clear
            u64[ETH_SRC, i] = 0
            u64[ETH_DST, i] = 0
            u64[SRC_HI, i] = 0
            u64[SRC_LO, i] = 0
            u64[DST_HI, i] = 0
            u64[DST_LO, i] = 0
            u32[GRE_KEY, i] = 0
            u32[IP_LEN, i] = 0
            i32[L2_OFF, i] = -1
            i32[L3_OFF, i] = -1
            i32[L4_OFF, i] = -1
            i32[PAYLOAD_OFF, i] = -1
            i32[PAYLOAD_LEN, i] = 0
            u16[ETHERTYPE, i] = 0
            u16[VLAN0, i] = 0
            u16[VLAN1, i] = 0
            u16[SPORT, i] = 0
            u16[DPORT, i] = 0
            u16[FRAG_OFF, i] = 0
            u16[GRE_PROTO, i] = 0
            u8[IP_VER, i] = 0
            u8[PROTO, i] = 0
            u8[TTL, i] = 0
            u8[N_VLANS, i] = 0
            u8[FLAGS, i] = 0
            u8[FLAGS2, i] = 0
            i32[TENANT, i] = vni
            u8[TUN_TYPE, i] = tun
            i32[OUTER_L3_OFF, i] = outer
            depth += 1
            kind = nkind
            if kind == _K_V4:
                u16[ETHERTYPE, i] = 0x0800
            elif kind == _K_V6:
                u16[ETHERTYPE, i] = 0x86DD
        if end > cap:
            u8[FLAGS2, i] |= F2_TRUNCATED
        u8[0, i] = err
        u32[FLOW_HASH, i] = _flow_hash(
            u64[SRC_HI, i],
            u64[SRC_LO, i],
            u64[DST_HI, i],
            u64[DST_LO, i],
            i32[TENANT, i],
            u8[PROTO, i],
            u16[SPORT, i],
            u16[DPORT, i],
            u16[ICMP_ID, i],
        )


def parse(batch: Batch, keys: FlowKeys | None = None) -> FlowKeys:
    """Parse every packet of ``batch`` into ``keys`` (reused if given, else allocated)."""
    offset = batch.offset
    n = offset.shape[0]
    if keys is None:
        keys = FlowKeys(max(n, 1))
    if n > keys._cap:
        keys.resize(n)
    keys.n = n
    lt = int(batch.linktype)
    if lt not in SUPPORTED_LINKTYPES:
        raise InputError(
            f"link type {lt} is not supported (Ethernet, raw IP, BSD loopback or Linux cooked capture only)"
        )
    wire = batch.wire_len
    if wire.shape[0] != n:
        raise InputError(f"the batch has {n} packets but {wire.shape[0]} wire lengths")
    _parse_kernel(batch.data, offset, batch.length, wire, lt, keys.u64, keys.u32, keys.i32, keys.u16, keys.u8)
    return keys
