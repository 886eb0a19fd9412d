"""A plain-Python model of fastpath.bpf.c: what the program does to one frame.

:func:`run` takes the maps' contents (flows and ports, as the loader packs them), a frame and
its ingress ifindex, and returns the verdict, the frame as it leaves, the redirect target and
the counters the program moves. The equivalence test holds the kernel's BPF_PROG_TEST_RUN to
it, frame for frame; keep the two in step.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..lowlevel import rd16_py
from .loader import (
    ACT_DECAP,
    ACT_DROP,
    ACT_ENCAP,
    ACT_LOCAL,
    FLOW_KEY,
    FLOW_VALUE,
    MAX_PORTS,
    PORT_VALUE,
    ROLE_UNDERLAY,
    ROLE_WORKLOAD,
    ST,
    TMPL_LEN,
    XDP_DROP,
    XDP_PASS,
    XDP_REDIRECT,
    XDP_TX,
)

IPV6_EXT = {0, 43, 44, 50, 51, 60, 135, 139, 140, 253, 254}


@dataclass
class Result:
    verdict: int
    frame: bytes
    redirect_ifindex: int | None = None  # XDP_REDIRECT: where the frame goes
    reason: str = ""  # the ms_stats counter moved
    flow_key: bytes | None = None  # the entry whose counters moved (packets + 1, bytes + nbytes)
    nbytes: int = 0
    extra: dict = field(default_factory=dict)


def parse(frame: bytes, off: int) -> tuple[str, dict]:
    """The program's parse(): ("", fields) for fast-path material, else (reason, {})."""
    n = len(frame)
    e = off
    if e + 14 > n:
        return "pass_malformed", {}
    et = rd16_py(frame, e + 12)
    if et in (0x8100, 0x88A8):
        return "pass_vlan", {}
    avail = n - (e + 14)
    ip = e + 14
    if et == 0x0800:
        if ip + 20 > n or frame[ip] >> 4 != 4:
            return "pass_malformed", {}
        if frame[ip] & 15 != 5:
            return "pass_ip_options", {}
        tot = rd16_py(frame, ip + 2)
        if tot < 20 or tot > avail:
            return "pass_malformed", {}
        if rd16_py(frame, ip + 6) & 0x3FFF:
            return "pass_fragment", {}
        proto = frame[ip + 9]
        l4len = tot - 20
        fam, s, d = 4, frame[ip + 12 : ip + 16], frame[ip + 16 : ip + 20]
        l4 = ip + 20
        if proto not in (6, 17, 1):
            return "pass_proto", {}
    elif et == 0x86DD:
        if ip + 40 > n or frame[ip] >> 4 != 6:
            return "pass_malformed", {}
        plen = rd16_py(frame, ip + 4)
        if plen > avail - 40:
            return "pass_malformed", {}
        proto = frame[ip + 6]
        if proto not in (6, 17, 58):
            return ("pass_ipv6_ext" if proto in IPV6_EXT else "pass_proto"), {}
        l4len = plen
        fam, s, d = 6, frame[ip + 8 : ip + 24], frame[ip + 24 : ip + 40]
        l4 = ip + 40
    else:
        return "pass_not_ip", {}
    if proto == 6:
        if l4len < 20 or l4 + 20 > n:
            return "pass_malformed", {}
        doff = frame[l4 + 12] >> 4
        if doff < 5 or doff * 4 > l4len:
            return "pass_malformed", {}
        if frame[l4 + 13] & 0x07:
            return "pass_tcp_control", {}
        sp, dp = frame[l4 : l4 + 2], frame[l4 + 2 : l4 + 4]
    elif proto == 17:
        if l4len < 8 or l4 + 8 > n:
            return "pass_malformed", {}
        ulen = rd16_py(frame, l4 + 4)
        if ulen < 8 or ulen > l4len:
            return "pass_malformed", {}
        sp, dp = frame[l4 : l4 + 2], frame[l4 + 2 : l4 + 4]
    else:
        if l4len < 8 or l4 + 8 > n:
            return "pass_malformed", {}
        t = frame[l4]
        if (proto == 1 and t not in (8, 0)) or (proto == 58 and t not in (128, 129)):
            return "pass_icmp_other", {}
        sp, dp = frame[l4 + 4 : l4 + 6], frame[l4 : l4 + 2]
    return "", {
        "family": fam,
        "saddr": bytes(s),
        "daddr": bytes(d),
        "sport": bytes(sp),
        "dport": bytes(dp),
        "proto": proto,
    }


def key_bytes(port: int, zone: int, f: dict, tunnel: int) -> bytes:
    return FLOW_KEY.pack(
        port & 0xFFFFFFFF,
        zone & 0xFFFFFFFF,
        f["saddr"].ljust(16, b"\0"),
        f["daddr"].ljust(16, b"\0"),
        f["sport"],
        f["dport"],
        f["proto"],
        f["family"],
        tunnel,
    )


def flow_port(key: bytes) -> int:
    """The UDP source port (host order) the program derives from the flow key's hash."""
    h = 0x9E3779B9
    for w in struct.unpack("<12I", key):
        h = ((h ^ w) * 0x01000193) & 0xFFFFFFFF
    h ^= h >> 16
    return 49152 | (h & 0x3FFF)


def ipv4_header_checksum(hdr: bytes) -> int:
    s = sum(struct.unpack("!10H", hdr[:20]))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _forward(res: Result, ingress: int, target: int) -> Result:
    if target == ingress:
        res.verdict, res.reason = XDP_TX, "tx"
    else:
        res.verdict, res.reason, res.redirect_ifindex = XDP_REDIRECT, "redirect", target
    return res


def run(
    flows: dict[bytes, bytes], ports: dict[int, bytes], frame: bytes, ingress: int, *, headroom: int = 256
) -> Result:
    """The program on ``frame`` received on ``ingress``. ``flows`` and ``ports`` map packed
    keys to packed values (loader.FLOW_KEY / FLOW_VALUE, ifindex -> PORT_VALUE); ``headroom``
    is what bpf_xdp_adjust_head may grow into (BPF_PROG_TEST_RUN gives 256)."""
    frame = bytes(frame)

    def passed(reason: str) -> Result:
        return Result(XDP_PASS, frame, reason=reason)

    pv = ports.get(ingress)
    if pv is None:
        return passed("pass_port")
    role, zone, pmac, local_ip = PORT_VALUE.unpack(pv)
    n = len(frame)
    if ingress >= MAX_PORTS:
        return passed("pass_port")
    if role == ROLE_WORKLOAD:
        why, f = parse(frame, 0)
        if why:
            return passed(why)
        if frame[6:12] != pmac:
            return passed("pass_mac")
        key = key_bytes(ingress, zone, f, 0)
        val = flows.get(key)
        if val is None:
            return passed("pass_miss")
        action, ifindex, mac, _peer, mtu, _p, _b, _l, _j, tmpl = FLOW_VALUE.unpack(val)
        if action == ACT_DROP:
            return Result(XDP_DROP, frame, reason="drop", flow_key=key, nbytes=n)
        if action == ACT_ENCAP:
            if mtu and n + TMPL_LEN - 14 > mtu:
                return passed("pass_too_big")
            if headroom < TMPL_LEN:
                return passed("pass_headroom")
            h = bytearray(tmpl[:TMPL_LEN])
            struct.pack_into("!H", h, 16, n + 36)
            h[24:26] = b"\0\0"
            sport = rd16_py(h, 34) or flow_port(key)
            struct.pack_into("!H", h, 34, sport)
            struct.pack_into("!H", h, 38, n + 16)
            h[40:42] = b"\0\0"
            struct.pack_into("!H", h, 24, ipv4_header_checksum(bytes(h[14:34])))
            res = Result(XDP_PASS, bytes(h) + frame, flow_key=key, nbytes=n)
            return _forward(res, ingress, ifindex)
        if action != ACT_LOCAL:
            return passed("pass_action")
        if frame[0:6] != mac:
            return passed("pass_mac")
        if mtu and n - 14 > mtu:
            return passed("pass_too_big")
        return _forward(Result(XDP_PASS, frame, flow_key=key, nbytes=n), ingress, ifindex)
    if role != ROLE_UNDERLAY:
        return passed("pass_port")
    o = frame
    if n < 14:
        return passed("pass_malformed")
    et = rd16_py(o, 12)
    if et in (0x8100, 0x88A8):
        return passed("pass_vlan")
    if et != 0x0800:
        return passed("pass_not_vxlan")
    if n < 34 or o[14] >> 4 != 4:
        return passed("pass_malformed")
    if o[14] & 15 != 5:
        return passed("pass_ip_options")
    if o[23] != 17:
        return passed("pass_not_vxlan")
    tot = rd16_py(o, 16)
    if tot + 14 != n:
        return passed("pass_malformed")
    if rd16_py(o, 20) & 0x3FFF:
        return passed("pass_fragment")
    if o[30:34] != local_ip:
        return passed("pass_not_vxlan")
    if n < TMPL_LEN:
        return passed("pass_malformed")
    if rd16_py(o, 36) != 4789:
        return passed("pass_not_vxlan")
    if rd16_py(o, 38) != tot - 20:
        return passed("pass_malformed")
    if o[42] != 0x08 or o[43] or o[44] or o[45] or o[49]:
        return passed("pass_bad_vxlan")
    vni = (o[46] << 16) | (o[47] << 8) | o[48]
    why, f = parse(frame, TMPL_LEN)
    if why:
        return passed(why)
    key = key_bytes(vni, vni, f, 1)
    val = flows.get(key)
    if val is None:
        return passed("pass_miss")
    action, ifindex, mac, peer, mtu, _p, _b, _l, _j, _t = FLOW_VALUE.unpack(val)
    if action == ACT_DROP:
        return Result(XDP_DROP, frame, reason="drop", flow_key=key, nbytes=n)
    if action != ACT_DECAP:
        return passed("pass_action")
    if peer != o[26:30]:
        return passed("pass_peer")
    if n < TMPL_LEN + 14:
        return passed("pass_malformed")
    if o[TMPL_LEN : TMPL_LEN + 6] != mac:
        return passed("pass_mac")
    if mtu and n - TMPL_LEN - 14 > mtu:
        return passed("pass_too_big")
    return _forward(Result(XDP_PASS, frame[TMPL_LEN:], flow_key=key, nbytes=n), ingress, ifindex)


def stat_index(reason: str) -> int:
    return ST[reason]
