"""Plain-Python statements of encap and decap, one packet at a time: the oracle for tests."""

from __future__ import annotations

import struct

from ..packet import build as B
from .tunnel import (
    DECAP_BAD_OUTER,
    DECAP_BAD_TUNNEL,
    DECAP_CRITICAL_OPTION,
    DECAP_FRAGMENT,
    DECAP_INNER_TYPE,
    DECAP_NOT_TUNNEL,
    DECAP_OAM,
    DECAP_OK,
    DECAP_TRUNCATED,
    ETH_TEB,
    GENEVE_PORT,
    INNER_ETH,
    INNER_IP,
    KINDS,
    VXLAN_PORT,
)


def encap_one(
    frame: bytes,
    kind: str,
    vni: int,
    outer_src: str,
    outer_dst: str,
    entropy: int,
    *,
    inner_ip: int = 0,
    src_mac="02:00:00:00:00:01",
    dst_mac="02:00:00:00:00:02",
    ttl: int = 64,
    dport: int | None = None,
    geneve_options: bytes = b"",
) -> bytes:
    """One frame encapsulated with the single-packet builders."""
    if kind == "vxlan":
        tun = struct.pack("!B3xI", 0x08, vni << 8)
    elif kind == "geneve":
        ptype = {0: ETH_TEB, 4: 0x0800, 6: 0x86DD}[inner_ip]
        tun = struct.pack("!BBHI", len(geneve_options) // 4, 0, ptype, vni << 8) + geneve_options
    else:
        tun = struct.pack("!HHI", 0x2000, ETH_TEB, (vni << 8) | (entropy & 0xFF))
    v6 = ":" in outer_src
    if kind == "nvgre":
        l4, proto = tun + frame, B.PROTO_GRE
    else:
        port = dport if dport is not None else (VXLAN_PORT if kind == "vxlan" else GENEVE_PORT)
        l4 = B.udp(
            49152 + (entropy & 0x3FFF), port, tun + frame, src=outer_src, dst=outer_dst, zero_checksum=not v6
        )
        proto = B.PROTO_UDP
    if v6:
        l3 = B.ipv6(outer_src, outer_dst, proto, l4, hlim=ttl)
    else:
        l3 = B.ipv4(outer_src, outer_dst, proto, l4, ttl=ttl, df=True)
    return B.ethernet(l3, 0x86DD if v6 else 0x0800, src=src_mac, dst=dst_mac)


def decap_one(pkt: bytes, linktype: int = 1):
    """(error, tunnel type, tenant, inner start, inner length, inner kind), as the kernel."""
    fail = lambda e, t=0, v=-1: (e, t, v, 0, 0, 0)  # noqa: E731
    end = len(pkt)
    pos = 0
    if linktype == 101:
        if end < 1:
            return fail(DECAP_TRUNCATED)
        ver = pkt[0] >> 4
        if ver not in (4, 6):
            return fail(DECAP_NOT_TUNNEL)
    else:
        if end < 14:
            return fail(DECAP_TRUNCATED)
        et = int.from_bytes(pkt[12:14], "big")
        pos = 14
        for _ in range(2):
            if et not in (0x8100, 0x88A8):
                break
            if end - pos < 4:
                return fail(DECAP_TRUNCATED)
            et = int.from_bytes(pkt[pos + 2 : pos + 4], "big")
            pos += 4
        if et not in (0x0800, 0x86DD):
            return fail(DECAP_NOT_TUNNEL)
        ver = 4 if et == 0x0800 else 6
    if ver == 4:
        if end - pos < 20:
            return fail(DECAP_TRUNCATED)
        ihl = (pkt[pos] & 15) * 4
        tot = int.from_bytes(pkt[pos + 2 : pos + 4], "big")
        if pkt[pos] >> 4 != 4 or ihl < 20 or tot < ihl:
            return fail(DECAP_BAD_OUTER)
        if tot > end - pos:
            return fail(DECAP_TRUNCATED)
        if B.checksum(pkt[pos : pos + ihl]) != 0:
            return fail(DECAP_BAD_OUTER)
        proto = pkt[pos + 9]
        if proto in (17, 47) and int.from_bytes(pkt[pos + 6 : pos + 8], "big") & 0x3FFF:
            return fail(DECAP_FRAGMENT)
        end, pos = pos + tot, pos + ihl
    else:
        if end - pos < 40:
            return fail(DECAP_TRUNCATED)
        if pkt[pos] >> 4 != 6:
            return fail(DECAP_BAD_OUTER)
        plen = int.from_bytes(pkt[pos + 4 : pos + 6], "big")
        if plen > end - pos - 40:
            return fail(DECAP_TRUNCATED)
        proto = pkt[pos + 6]
        end, pos = pos + 40 + plen, pos + 40
        n_ext = 0
        while proto in (0, 43, 60, 44):
            if proto == 44:
                return fail(DECAP_FRAGMENT)
            if end - pos < 8:
                return fail(DECAP_TRUNCATED)
            if n_ext == 8:
                return fail(DECAP_BAD_OUTER)
            hl = (pkt[pos + 1] + 1) * 8
            if hl > end - pos:
                return fail(DECAP_TRUNCATED)
            proto = pkt[pos]
            pos += hl
            n_ext += 1
    kind = INNER_ETH
    gptype = 0
    if proto == 17:
        if end - pos < 8:
            return fail(DECAP_TRUNCATED)
        dport = int.from_bytes(pkt[pos + 2 : pos + 4], "big")
        if dport not in (VXLAN_PORT, GENEVE_PORT):
            return fail(DECAP_NOT_TUNNEL)
        ulen = int.from_bytes(pkt[pos + 4 : pos + 6], "big")
        if ulen < 8:
            return fail(DECAP_BAD_OUTER)
        if ulen > end - pos:
            return fail(DECAP_TRUNCATED)
        end, u = pos + ulen, pos + 8
        if end - u < 8:
            return fail(DECAP_TRUNCATED)
        vni = int.from_bytes(pkt[u + 4 : u + 7], "big")
        if dport == VXLAN_PORT:
            tun = KINDS["vxlan"]
            if not pkt[u] & 0x08:
                return fail(DECAP_BAD_TUNNEL, tun)
            pos = u + 8
        else:
            tun = KINDS["geneve"]
            optlen = (pkt[u] & 0x3F) * 4
            if pkt[u] >> 6 or optlen > end - u - 8:
                return fail(DECAP_BAD_TUNNEL, tun)
            q, qend = u + 8, u + 8 + optlen
            critical = bool(pkt[u + 1] & 0x40)
            while q < qend:
                if qend - q < 4:
                    return fail(DECAP_BAD_TUNNEL, tun, vni)
                critical |= bool(pkt[q + 2] & 0x80)
                q += 4 + (pkt[q + 3] & 0x1F) * 4
            if q != qend:
                return fail(DECAP_BAD_TUNNEL, tun, vni)
            if pkt[u + 1] & 0x80:
                return fail(DECAP_OAM, tun, vni)
            if critical:
                return fail(DECAP_CRITICAL_OPTION, tun, vni)
            gptype = int.from_bytes(pkt[u + 2 : u + 4], "big")
            if gptype in (0x0800, 0x86DD):
                kind = INNER_IP
            elif gptype != ETH_TEB:
                return fail(DECAP_INNER_TYPE, tun, vni)
            pos = qend
    elif proto == 47:
        if end - pos < 4:
            return fail(DECAP_TRUNCATED)
        gf = int.from_bytes(pkt[pos : pos + 2], "big")
        if int.from_bytes(pkt[pos + 2 : pos + 4], "big") != ETH_TEB or not gf & 0x2000:
            return fail(DECAP_NOT_TUNNEL)
        tun = KINDS["nvgre"]
        if gf & 0x4007:
            return fail(DECAP_BAD_TUNNEL, tun)
        key_at = 8 if gf & 0x8000 else 4
        hlen = 8 + (4 if gf & 0x8000 else 0) + (4 if gf & 0x1000 else 0)
        if end - pos < hlen:
            return fail(DECAP_TRUNCATED, tun)
        vni = int.from_bytes(pkt[pos + key_at : pos + key_at + 3], "big")
        pos += hlen
    else:
        return fail(DECAP_NOT_TUNNEL)
    if end - pos < (14 if kind == INNER_ETH else 20):
        return fail(DECAP_TRUNCATED, tun, vni)
    if kind == INNER_IP:
        iv = pkt[pos] >> 4
        if (iv == 4) != (gptype == 0x0800) or iv not in (4, 6):
            return fail(DECAP_INNER_TYPE, tun, vni)
    return DECAP_OK, tun, vni, pos, end - pos, kind
