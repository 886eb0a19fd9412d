"""Plain-Python reference parser: the oracle the Numba kernel in :mod:`.parse` is tested against.

One packet at a time, written for reading rather than speed. The rules it implements (and the
kernel must match field for field) are described in :mod:`microseg.packet.parse`.
"""

from __future__ import annotations

from ..lowlevel import rd16_py, rd32_py
from . import batch as B
from . import errors as E

ETH_IPV4, ETH_IPV6, ETH_ARP, ETH_VLAN, ETH_QINQ, ETH_TEB = 0x0800, 0x86DD, 0x0806, 0x8100, 0x88A8, 0x6558
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_GRE, IPPROTO_ESP = 1, 6, 17, 47, 50
IPPROTO_ICMPV6, IPPROTO_SCTP = 58, 132
IPPROTO_IPIP, IPPROTO_IPV6, IPPROTO_ETHERIP, IPPROTO_MPLS = 4, 41, 97, 137
V6_HOPOPTS, V6_ROUTING, V6_FRAGMENT, V6_DSTOPTS = 0, 43, 44, 60
VXLAN_PORT, GENEVE_PORT = 4789, 6081
# tunnels recognised but not stepped into, by UDP destination port and by GRE protocol
UDP_TUNNEL_PORTS = {
    VXLAN_PORT: B.TUN_VXLAN,
    GENEVE_PORT: B.TUN_GENEVE,
    4790: B.TUN_VXLAN_GPE,
    6635: B.TUN_MPLS,
    2152: B.TUN_GTPU,
}
GRE_UNFOLLOWED = {0x88BE: B.TUN_ERSPAN, 0x22EB: B.TUN_ERSPAN, 0x8847: B.TUN_MPLS, 0x8848: B.TUN_MPLS}
IP_UNFOLLOWED = {IPPROTO_MPLS: B.TUN_MPLS, IPPROTO_ETHERIP: B.TUN_ETHERIP}
JUMBO_OPTION = 0xC2
LOOPBACK_AF_INET6 = B.AF_INET6_VALUES
MAX_VLANS = 2
MAX_EXT_HEADERS = 8
MAX_TUNNEL_DEPTH = 2
ICMP4_ERRORS = (3, 4, 5, 11, 12)
ICMP6_ERRORS = (1, 2, 3, 4)
ICMP4_ID_TYPES = (0, 8, 13, 14, 15, 16, 17, 18)  # echo, timestamp, info, address mask
ICMP6_ID_TYPES = (128, 129)

M64 = 0xFFFFFFFFFFFFFFFF
HASH_K = (
    0x9E3779B97F4A7C15,
    0xBF58476D1CE4E5B9,
    0x94D049BB133111EB,
    0xD6E8FEB86659FD93,
    0xC2B2AE3D27D4EB4F,
    0x165667B19E3779F9,
)
V4_PREFIX = B.V4_MAPPED_LO_PREFIX

_DEFAULTS = {name: 0 for name in B.FIELDS}
_DEFAULTS.update(tenant=-1, l2_off=-1, l3_off=-1, l4_off=-1, payload_off=-1, outer_l3_off=-1)


class _Stop(Exception):
    """Parsing ends here with an error code (fields filled so far stay)."""

    def __init__(self, code: int):
        self.code = code


def _mac(p: bytes, o: int) -> int:
    return int.from_bytes(p[o : o + 6], "big")


def _v6(p: bytes, o: int) -> tuple[int, int]:
    return int.from_bytes(p[o : o + 8], "big"), int.from_bytes(p[o + 8 : o + 16], "big")


def inet_sum(p: bytes, start: int, stop: int) -> int:
    """Ones'-complement sum (folded to 16 bits) of ``p[start:stop]``."""
    s = 0
    for i in range(start, stop - 1, 2):
        s += (p[i] << 8) | p[i + 1]
    if (stop - start) & 1:
        s += p[stop - 1] << 8
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def flow_hash(f: dict) -> int:
    """The FLOW_HASH of a parsed packet: a 32-bit mix of tenant, addresses, protocol, ports/echo id."""
    words = (
        f["src_hi"],
        f["src_lo"],
        f["dst_hi"],
        f["dst_lo"],
        (f["tenant"] & 0xFFFFFFFF) | (f["proto"] << 32),
        (f["sport"] << 16) | f["dport"] | (f["icmp_id"] << 32),
    )
    x = 0
    for w, k in zip(words, HASH_K):
        x ^= (w * k) & M64
    x = ((x ^ (x >> 29)) * HASH_K[0]) & M64
    return (x ^ (x >> 32)) & 0xFFFFFFFF


class _Parser:
    """One packet. ``cap`` is what was captured; each layer gets ``end``, where it ends as the
    headers say (to begin with, the frame's length on the wire: beyond ``cap`` when the capture
    was snapped). Header reads must fit in ``min(end, cap)``; lengths in headers are held to
    ``end``."""

    def __init__(self, pkt: bytes, linktype: int, wire_len: int | None = None):
        self.p = pkt
        self.f = dict(_DEFAULTS)
        self.linktype = linktype
        self.cap = len(pkt)
        self.wire = max(self.cap, self.cap if wire_len is None else int(wire_len))
        self.end = self.wire  # the end of the layer parsed last

    def lim(self, end: int) -> int:
        """How far the layer that ends at ``end`` can be read."""
        self.end = end
        return min(end, self.cap)

    # -- layers ----------------------------------------------------------------------------
    def run(self) -> dict:
        f = self.f
        try:
            layer = self.link(self.wire)
            depth = 0
            while layer is not None:
                kind, pos, end = layer[:3]
                if len(layer) == 5:  # a tunnel header was parsed: step into its payload
                    if depth == MAX_TUNNEL_DEPTH:
                        raise _Stop(E.TUNNEL_DEPTH)
                    outer = f["outer_l3_off"] if depth else f["l3_off"]
                    self.decap(layer[3], layer[4], outer)
                    depth += 1
                    if kind == "ipv4":
                        f["ethertype"] = ETH_IPV4
                    elif kind == "ipv6":
                        f["ethertype"] = ETH_IPV6
                if kind == "eth":
                    layer = self.ethernet(pos, end)
                elif kind == "ethertype":
                    layer = self.ethertype(layer[3], pos, end)
                elif kind == "ipv4":
                    layer = self.ipv4(pos, end)
                else:
                    layer = self.ipv6(pos, end)
        except _Stop as stop:
            f["error"] = stop.code
        if self.end > self.cap:
            f["flags2"] |= B.F2_TRUNCATED
        f["flow_hash"] = flow_hash(f)
        return f

    def link(self, end: int):
        """The link-layer header of the batch's link type: the first layer to parse, or None."""
        p, f, lt = self.p, self.f, self.linktype
        if lt == B.LINK_ETHERNET:
            return ("eth", 0, end)
        if lt in (B.LINK_RAW, B.LINK_RAW_DLT12, B.LINK_RAW_DLT14):
            return self.raw_ip(0, end)
        if lt == B.LINK_IPV4:
            f["ethertype"] = ETH_IPV4
            return ("ipv4", 0, end)
        if lt == B.LINK_IPV6:
            f["ethertype"] = ETH_IPV6
            return ("ipv6", 0, end)
        if lt in (B.LINK_NULL, B.LINK_LOOP):
            if self.cap < 4:
                raise _Stop(E.TRUNC_LINK)
            if lt == B.LINK_LOOP:
                family = int.from_bytes(p[:4], "big")
            else:  # the writer's byte order, whichever it was
                family = int.from_bytes(p[:4], "little")
                if family > 0xFFFF:
                    family = int.from_bytes(p[:4], "big")
            if family == B.AF_INET:
                f["ethertype"] = ETH_IPV4
                return ("ipv4", 4, end)
            if family in LOOPBACK_AF_INET6:
                f["ethertype"] = ETH_IPV6
                return ("ipv6", 4, end)
            return None
        # Linux cooked capture: v1 has the protocol at offset 14 of 16, v2 at 0 of 20
        hlen, at = (16, 14) if lt == B.LINK_LINUX_SLL else (20, 0)
        if self.cap < hlen:
            raise _Stop(E.TRUNC_LINK)
        return ("ethertype", hlen, end, rd16_py(p, at))

    def decap(self, tun: int, vni: int, outer_l3: int) -> None:
        f = self.f
        for k in f:
            f[k] = _DEFAULTS[k]
        f["tenant"], f["tun_type"], f["outer_l3_off"] = vni, tun, outer_l3

    def raw_ip(self, pos: int, end: int):
        p, f = self.p, self.f
        if self.cap - pos >= 1 and (p[pos] >> 4) == 6:
            f["ethertype"] = ETH_IPV6
            return ("ipv6", pos, end)
        f["ethertype"] = ETH_IPV4
        return ("ipv4", pos, end)

    def ethernet(self, pos: int, end: int):
        p, f = self.p, self.f
        f["l2_off"] = pos
        if self.lim(end) - pos < 14:
            raise _Stop(E.TRUNC_ETH)
        f["eth_dst"] = _mac(p, pos)
        f["eth_src"] = _mac(p, pos + 6)
        return self.ethertype(rd16_py(p, pos + 12), pos + 14, end)

    def ethertype(self, etype: int, pos: int, end: int):
        """VLAN tags and what the ethertype names, after Ethernet or a cooked header."""
        p, f = self.p, self.f
        lim = self.lim(end)
        while etype in (ETH_VLAN, ETH_QINQ) and f["n_vlans"] < MAX_VLANS:
            if lim - pos < 4:
                f["ethertype"] = etype
                raise _Stop(E.TRUNC_VLAN)
            f["vlan0" if f["n_vlans"] == 0 else "vlan1"] = rd16_py(p, pos)
            f["n_vlans"] += 1
            etype = rd16_py(p, pos + 2)
            pos += 4
        f["ethertype"] = etype
        if etype == ETH_IPV4:
            return ("ipv4", pos, end)
        if etype == ETH_IPV6:
            return ("ipv6", pos, end)
        if etype == ETH_ARP:
            self.arp(pos, end)
        return None

    def arp(self, pos: int, end: int) -> None:
        """ARP for IPv4 over any hardware: addresses at offsets that follow from the lengths."""
        p, f = self.p, self.f
        f["flags"] |= B.F_ARP
        f["l3_off"] = pos
        lim = self.lim(end)
        if lim - pos < 8:
            raise _Stop(E.TRUNC_ARP)
        hln, pln = p[pos + 4], p[pos + 5]
        f["arp_op"] = rd16_py(p, pos + 6)
        if rd16_py(p, pos + 2) != ETH_IPV4 or pln != 4:
            raise _Stop(E.BAD_ARP)
        sha, spa = pos + 8, pos + 8 + hln
        tha, tpa = spa + 4, spa + 4 + hln
        if lim - pos < 8 + 2 * (hln + 4):
            raise _Stop(E.TRUNC_ARP)
        if hln == 6:
            f["arp_sha"], f["arp_tha"] = _mac(p, sha), _mac(p, tha)
            f["flags2"] |= B.F2_ARP_HW
        f["src_lo"] = V4_PREFIX | rd32_py(p, spa)
        f["dst_lo"] = V4_PREFIX | rd32_py(p, tpa)

    def ipv4(self, pos: int, end: int):
        p, f = self.p, self.f
        f["l3_off"] = pos
        lim = self.lim(end)
        if lim - pos < 20:
            raise _Stop(E.TRUNC_IPV4)
        if p[pos] >> 4 != 4:
            raise _Stop(E.BAD_IPV4_VER)
        ihl = (p[pos] & 15) * 4
        total = rd16_py(p, pos + 2)
        frag = rd16_py(p, pos + 6)
        f["ip_ver"] = 4
        f["ip_len"] = total
        f["ttl"] = p[pos + 8]
        f["proto"] = proto = p[pos + 9]
        f["src_lo"] = V4_PREFIX | rd32_py(p, pos + 12)
        f["dst_lo"] = V4_PREFIX | rd32_py(p, pos + 16)
        off = frag & 0x1FFF
        mf = bool(frag & 0x2000)
        if off or mf:
            f["flags"] |= B.F_FRAG | (B.F_MF if mf else 0)
            f["frag_off"] = off
        if ihl < 20:
            raise _Stop(E.BAD_IPV4_IHL)
        if lim - pos < ihl:
            raise _Stop(E.TRUNC_IPV4)
        if total == 0 and proto == IPPROTO_TCP and not (off or mf):
            total = f["ip_len"] = end - pos  # a TCP super-frame: the frame says how long
            f["flags2"] |= B.F2_BIG_TCP
        if total < ihl or total > end - pos:
            raise _Stop(E.BAD_IPV4_LEN)
        if inet_sum(p, pos, pos + ihl) != 0xFFFF:
            raise _Stop(E.BAD_IPV4_CSUM)
        end = pos + total
        self.lim(end)
        l4 = pos + ihl
        if off:
            self.opaque(l4, end)
            return None
        return self.l4(proto, l4, end, 4, mf)

    def jumbo_length(self, pos: int, lim: int):
        """The jumbo payload length (RFC 2675) in the hop-by-hop header at ``pos``, or None."""
        p = self.p
        if lim - pos < 2 or (p[pos + 1] + 1) * 8 > lim - pos:
            return None
        q, hend = pos + 2, pos + (p[pos + 1] + 1) * 8
        while q < hend:
            if p[q] == 0:  # Pad1
                q += 1
                continue
            if hend - q < 2:
                return None
            if p[q] == JUMBO_OPTION:
                return rd32_py(p, q + 2) if p[q + 1] == 4 and hend - q >= 6 else None
            q += 2 + p[q + 1]
        return None

    def ipv6(self, pos: int, end: int):
        p, f = self.p, self.f
        f["l3_off"] = pos
        lim = self.lim(end)
        if lim - pos < 40:
            raise _Stop(E.TRUNC_IPV6)
        if p[pos] >> 4 != 6:
            raise _Stop(E.BAD_IPV6_VER)
        plen = rd16_py(p, pos + 4)
        f["ip_ver"] = 6
        f["ip_len"] = plen + 40
        f["ttl"] = p[pos + 7]
        f["src_hi"], f["src_lo"] = _v6(p, pos + 8)
        f["dst_hi"], f["dst_lo"] = _v6(p, pos + 24)
        nh = p[pos + 6]
        f["proto"] = nh
        if plen == 0 and nh == V6_HOPOPTS:
            jumbo = self.jumbo_length(pos + 40, lim)
            if jumbo is not None:
                f["ip_len"] = min(jumbo + 40, 0xFFFFFFFF)
                f["flags2"] |= B.F2_JUMBO
                if jumbo <= 0xFFFF:
                    raise _Stop(E.BAD_IPV6_EXT)
                plen = jumbo
        elif plen == 0 and nh == IPPROTO_TCP and end - pos - 40 >= 20:
            plen = end - pos - 40  # BIG TCP without a jumbo header
            f["ip_len"] = plen + 40
            f["flags2"] |= B.F2_BIG_TCP
        if plen > end - pos - 40:
            raise _Stop(E.BAD_IPV6_LEN)
        end = pos + 40 + plen
        lim = self.lim(end)
        q = pos + 40
        count = 0
        off, more = 0, False
        while nh in (V6_HOPOPTS, V6_ROUTING, V6_FRAGMENT, V6_DSTOPTS):
            if count == MAX_EXT_HEADERS or (nh == V6_HOPOPTS and count > 0):
                raise _Stop(E.BAD_IPV6_EXT)
            count += 1
            if nh == V6_FRAGMENT:
                if lim - q < 8:
                    raise _Stop(E.BAD_IPV6_EXT)
                fo = rd16_py(p, q + 2)
                off, more = fo >> 3, bool(fo & 1)
                f["flags"] |= B.F_FRAG | (B.F_MF if more else 0)
                f["frag_off"] = off
                nh = p[q]
                q += 8
            else:
                if lim - q < 2:
                    raise _Stop(E.BAD_IPV6_EXT)
                hlen = (p[q + 1] + 1) * 8
                if lim - q < hlen:
                    raise _Stop(E.BAD_IPV6_EXT)
                nh = p[q]
                q += hlen
            f["proto"] = nh
            if off:
                break
        if off:
            self.opaque(q, end)
            return None
        return self.l4(nh, q, end, 6, more)

    def opaque(self, pos: int, end: int) -> None:
        """A payload we do not look into (non-first fragment)."""
        self.f["payload_off"] = pos
        self.f["payload_len"] = end - pos

    def l4(self, proto: int, pos: int, end: int, ver: int, partial: bool):
        """Transport header at ``pos``; returns a tunnel tuple when one is found, else None."""
        p, f = self.p, self.f
        f["l4_off"] = pos
        lim = min(end, self.cap)
        if proto == IPPROTO_TCP:
            if lim - pos < 20:
                raise _Stop(E.TRUNC_TCP)
            f["sport"], f["dport"] = rd16_py(p, pos), rd16_py(p, pos + 2)
            f["flags"] |= B.F_PORTS
            f["tcp_seq"], f["tcp_ack"] = rd32_py(p, pos + 4), rd32_py(p, pos + 8)
            f["tcp_doff"] = doff = (p[pos + 12] >> 4) * 4
            f["tcp_flags"] = p[pos + 13]
            f["tcp_win"] = rd16_py(p, pos + 14)
            if doff < 20 or doff > end - pos:
                raise _Stop(E.BAD_TCP_DOFF)
            self.opaque(pos + doff, end)
            return None
        if proto == IPPROTO_UDP:
            if lim - pos < 8:
                raise _Stop(E.TRUNC_UDP)
            sport, dport, ulen = rd16_py(p, pos), rd16_py(p, pos + 2), rd16_py(p, pos + 4)
            f["sport"], f["dport"] = sport, dport
            f["flags"] |= B.F_PORTS
            if ulen == 0 and f["flags2"] & B.F2_JUMBO and end - pos > 0xFFFF:
                ulen = end - pos  # RFC 2675: a jumbo datagram's UDP length is 0
            if ulen < 8 or (not partial and ulen > end - pos):
                raise _Stop(E.BAD_UDP_LEN)
            if partial:
                self.opaque(pos + 8, end)
                f["tun_unfollowed"] = UDP_TUNNEL_PORTS.get(dport, B.TUN_NONE)
                return None
            end = pos + ulen
            self.lim(end)
            self.opaque(pos + 8, end)
            if dport == VXLAN_PORT:
                return self.vxlan(pos + 8, end)
            if dport == GENEVE_PORT:
                return self.geneve(pos + 8, end)
            f["tun_unfollowed"] = UDP_TUNNEL_PORTS.get(dport, B.TUN_NONE)
            return None
        if proto == IPPROTO_SCTP:
            if lim - pos < 12:
                raise _Stop(E.TRUNC_SCTP)
            f["sport"], f["dport"] = rd16_py(p, pos), rd16_py(p, pos + 2)
            f["flags"] |= B.F_PORTS
            self.opaque(pos + 12, end)
            return None
        if (proto == IPPROTO_ICMP and ver == 4) or (proto == IPPROTO_ICMPV6 and ver == 6):
            self.icmp(pos, end, ver, partial)
            return None
        if proto == IPPROTO_ESP:
            if lim - pos < 8:
                raise _Stop(E.TRUNC_ESP)
            f["esp_spi"], f["esp_seq"] = rd32_py(p, pos), rd32_py(p, pos + 4)
            f["flags"] |= B.F_ESP
            self.opaque(pos + 8, end)
            return None
        if proto == IPPROTO_GRE:
            return self.gre(pos, end, partial)
        self.opaque(pos, end)
        if proto in (IPPROTO_IPIP, IPPROTO_IPV6):
            if partial or f["tenant"] >= 0:  # a fragment, or a tenant's own tunnel
                f["tun_unfollowed"] = B.TUN_IPIP
                return None
            return ("ipv4" if proto == IPPROTO_IPIP else "ipv6", pos, end, B.TUN_IPIP, -1)
        f["tun_unfollowed"] = IP_UNFOLLOWED.get(proto, B.TUN_NONE)
        return None

    def icmp(self, pos: int, end: int, ver: int, partial: bool) -> None:
        p, f = self.p, self.f
        lim = min(end, self.cap)
        if lim - pos < 8:
            raise _Stop(E.TRUNC_ICMP)
        t = p[pos]
        f["icmp_type"], f["icmp_code"] = t, p[pos + 1]
        f["flags"] |= B.F_ICMP
        self.opaque(pos + 8, end)
        if t in (ICMP4_ID_TYPES if ver == 4 else ICMP6_ID_TYPES):
            f["icmp_id"] = rd16_py(p, pos + 4)
        elif t in (ICMP4_ERRORS if ver == 4 else ICMP6_ERRORS) and not partial:
            self.icmp_quoted(pos + 8, lim, ver)

    def icmp_quoted(self, q: int, end: int, ver: int) -> None:
        """The IP header (and first 8 bytes after it) that an ICMP error message quotes (``end``:
        how far the message can be read)."""
        p, f = self.p, self.f
        if ver == 4:
            if end - q < 20:
                raise _Stop(E.TRUNC_ICMP_INNER)
            ihl = (p[q] & 15) * 4
            if p[q] >> 4 != 4 or ihl < 20:
                raise _Stop(E.BAD_ICMP_INNER)
            if end - q < ihl:
                raise _Stop(E.TRUNC_ICMP_INNER)
            proto = p[q + 9]
            src = (0, V4_PREFIX | rd32_py(p, q + 12))
            dst = (0, V4_PREFIX | rd32_py(p, q + 16))
            later_fragment = (rd16_py(p, q + 6) & 0x1FFF) != 0
            r = q + ihl
        else:
            if end - q < 40:
                raise _Stop(E.TRUNC_ICMP_INNER)
            if p[q] >> 4 != 6:
                raise _Stop(E.BAD_ICMP_INNER)
            src, dst = _v6(p, q + 8), _v6(p, q + 24)
            proto = p[q + 6]
            r = q + 40
            count = 0
            later_fragment = False
            while proto in (V6_HOPOPTS, V6_ROUTING, V6_FRAGMENT, V6_DSTOPTS):
                if count == MAX_EXT_HEADERS:
                    raise _Stop(E.BAD_ICMP_INNER)
                count += 1
                if proto == V6_FRAGMENT:
                    if end - r < 8:
                        raise _Stop(E.TRUNC_ICMP_INNER)
                    later_fragment = (rd16_py(p, r + 2) >> 3) != 0
                    proto = p[r]
                    r += 8
                    if later_fragment:
                        break
                else:
                    if end - r < 2:
                        raise _Stop(E.TRUNC_ICMP_INNER)
                    hlen = (p[r + 1] + 1) * 8
                    if end - r < hlen:
                        raise _Stop(E.TRUNC_ICMP_INNER)
                    proto = p[r]
                    r += hlen
        f["inner_proto"] = proto
        f["inner_src_hi"], f["inner_src_lo"] = src
        f["inner_dst_hi"], f["inner_dst_lo"] = dst
        if not later_fragment:
            icmp = IPPROTO_ICMP if ver == 4 else IPPROTO_ICMPV6
            if proto in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP):
                if end - r < 8:
                    raise _Stop(E.TRUNC_ICMP_INNER)
                f["inner_sport"], f["inner_dport"] = rd16_py(p, r), rd16_py(p, r + 2)
            elif proto == icmp:
                if end - r < 8:
                    raise _Stop(E.TRUNC_ICMP_INNER)
                t = p[r]
                f["inner_icmp_type"] = t
                if t in (ICMP4_ID_TYPES if ver == 4 else ICMP6_ID_TYPES):
                    f["inner_sport"] = rd16_py(p, r + 4)
        f["flags"] |= B.F_ICMP_ERR

    def gre(self, pos: int, end: int, partial: bool):
        p, f = self.p, self.f
        lim = min(end, self.cap)
        if lim - pos < 4:
            raise _Stop(E.TRUNC_GRE)
        fl = rd16_py(p, pos)
        if fl & 0x4007:  # routing present, or version != 0
            raise _Stop(E.BAD_GRE)
        proto = rd16_py(p, pos + 2)
        f["gre_proto"] = proto
        f["flags"] |= B.F_GRE
        hlen = 4 + (4 if fl & 0x8000 else 0)
        has_key = bool(fl & 0x2000)
        key_at = pos + hlen
        hlen += (4 if has_key else 0) + (4 if fl & 0x1000 else 0)
        if lim - pos < hlen:
            raise _Stop(E.TRUNC_GRE)
        if has_key:
            f["gre_key"] = rd32_py(p, key_at)
        self.opaque(pos + hlen, end)
        if proto == ETH_TEB and has_key:
            tunnel = ("eth", pos + hlen, end, B.TUN_NVGRE, f["gre_key"] >> 8)
        elif proto in (ETH_IPV4, ETH_IPV6):
            tunnel = ("ipv4" if proto == ETH_IPV4 else "ipv6", pos + hlen, end, B.TUN_GRE, -1)
        else:
            f["tun_unfollowed"] = GRE_UNFOLLOWED.get(proto, B.TUN_NONE)
            return None
        if partial or (tunnel[3] == B.TUN_GRE and f["tenant"] >= 0):  # inside a tenant's packet
            f["tun_unfollowed"] = tunnel[3]
            return None
        return tunnel

    def vxlan(self, pos: int, end: int):
        p = self.p
        if min(end, self.cap) - pos < 8:
            raise _Stop(E.TRUNC_TUNNEL)
        if not p[pos] & 0x08:
            raise _Stop(E.BAD_TUNNEL)
        vni = rd32_py(p, pos + 4) >> 8
        return ("eth", pos + 8, end, B.TUN_VXLAN, vni)

    def geneve(self, pos: int, end: int):
        p = self.p
        if min(end, self.cap) - pos < 8:
            raise _Stop(E.TRUNC_TUNNEL)
        optlen = (p[pos] & 0x3F) * 4
        proto = rd16_py(p, pos + 2)
        if p[pos] >> 6 != 0 or optlen > end - pos - 8:
            raise _Stop(E.BAD_TUNNEL)
        vni = rd32_py(p, pos + 4) >> 8
        inner = pos + 8 + optlen
        if proto == ETH_TEB:
            return ("eth", inner, end, B.TUN_GENEVE, vni)
        if proto == ETH_IPV4:
            return ("ipv4", inner, end, B.TUN_GENEVE, vni)
        if proto == ETH_IPV6:
            return ("ipv6", inner, end, B.TUN_GENEVE, vni)
        raise _Stop(E.BAD_TUNNEL)


def parse_packet_ref(pkt: bytes, linktype: int = B.LINK_ETHERNET, wire_len: int | None = None) -> dict:
    """Parse one packet (``wire_len``: its length on the wire, when the capture was snapped);
    returns every FlowKeys field (by name) as a Python int."""
    return _Parser(bytes(pkt), linktype, wire_len).run()


def parse_batch_ref(batch: B.Batch) -> B.FlowKeys:
    """Parse a whole batch packet by packet into a new FlowKeys (slow; for tests)."""
    n = len(batch)
    keys = B.FlowKeys(max(n, 1)).resize(n)
    for i in range(n):
        row = parse_packet_ref(batch.packet(i), batch.linktype, int(batch.wire_len[i]))
        for name, (table, r) in B.FIELDS.items():
            getattr(keys, table)[r, i] = row[name]
    return keys
