"""VXLAN, GENEVE and NVGRE encapsulation and decapsulation over whole batches.

Encapsulation wraps each inner frame in outer Ethernet / IPv4 or IPv6 / UDP (VXLAN, GENEVE)
or GRE (NVGRE) headers. The outer headers are built once per batch as a template and a
compiled pass copies it in front of every frame, patching lengths, the VNI, the entropy
(UDP source port in 49152-65535 for VXLAN / GENEVE, as RFC 7348 section 5 advises; FlowID
for NVGRE, RFC 7637 section 3.2) taken from the inner flow's hash, and the checksums: the
IPv4 header checksum always, the UDP checksum 0 over IPv4 (allowed) and computed over IPv6.
IPv4 outer headers carry DF, so an overlay never depends on fragmentation.

Decapsulation strips the outermost tunnel of every packet without copying: the inner batch
shares the outer one's buffer. Packets that are not tunnelled, or whose outer headers are
malformed, get an error code (``DECAP_*``) and an empty inner frame; nothing is dropped
silently. Accepted:

* outer Ethernet (up to two VLAN tags) or raw IP; IPv4 (header checksum verified, no
  fragments) or IPv6 (hop-by-hop, routing and destination options headers skipped);
* VXLAN on UDP 4789 with the I flag (RFC 7348); GENEVE on UDP 6081, version 0, options
  skipped by their lengths, inner Ethernet, IPv4 or IPv6 (RFC 8926). A GENEVE option with
  the critical bit is dropped (we understand no options; RFC 8926 section 3.5), and so is a
  GENEVE OAM (O bit) packet, which is not tenant traffic;
* NVGRE: GRE version 0 with the K bit and protocol 0x6558; VSID = key >> 8 (RFC 7637).

UDP checksums of the outer datagram are not verified here: the inner headers carry their
own checksums, which later stages check.
"""

from __future__ import annotations

import functools
import ipaddress

import numpy as np
from numba import njit

from ..errors import InputError
from ..lowlevel import rd16, rd32
from ..packet import build as B
from ..packet.batch import LINK_ETHERNET, LINK_RAW, TUN_GENEVE, TUN_NVGRE, TUN_VXLAN, Batch
from ..packet.build import csum_add, csum_final

VXLAN_PORT = 4789
GENEVE_PORT = 6081
ETH_TEB = 0x6558  # transparent Ethernet bridging: what VXLAN/GENEVE/NVGRE carry
KINDS = {"vxlan": TUN_VXLAN, "geneve": TUN_GENEVE, "nvgre": TUN_NVGRE}

# decap error codes
DECAP_OK = 0
DECAP_NOT_TUNNEL = 1  # a packet that carries no VXLAN / GENEVE / NVGRE tunnel
DECAP_TRUNCATED = 2  # outer or tunnel header, or the inner frame, cut short
DECAP_BAD_OUTER = 3  # outer IP header malformed (version, length, IPv4 checksum)
DECAP_FRAGMENT = 4  # outer IP fragment: cannot be decapsulated on its own
DECAP_BAD_TUNNEL = 5  # VXLAN I flag missing, GENEVE version / option lengths wrong, GRE bad
DECAP_CRITICAL_OPTION = 6  # GENEVE critical option we do not understand (RFC 8926: drop)
DECAP_OAM = 7  # GENEVE control (O bit) packet
DECAP_INNER_TYPE = 8  # GENEVE protocol type other than Ethernet / IPv4 / IPv6
DECAP_INNER_MIX = 9  # inner IP packet in a batch whose other inner frames are Ethernet
DECAP_NAMES = {
    DECAP_OK: "ok",
    DECAP_NOT_TUNNEL: "not_tunnel",
    DECAP_TRUNCATED: "truncated",
    DECAP_BAD_OUTER: "bad_outer_ip",
    DECAP_FRAGMENT: "outer_fragment",
    DECAP_BAD_TUNNEL: "bad_tunnel_header",
    DECAP_CRITICAL_OPTION: "geneve_critical_option",
    DECAP_OAM: "geneve_oam",
    DECAP_INNER_TYPE: "unsupported_inner_type",
    DECAP_INNER_MIX: "inner_type_mix",
}

# inner frame kinds (decap)
INNER_ETH, INNER_IP = 0, 1


# ---------------------------------------------------------------------------------------------
# encap
# ---------------------------------------------------------------------------------------------
def _entropy(batch: Batch) -> np.ndarray:
    """Per-packet 32-bit hash of the inner flow (the parser's FLOW_HASH)."""
    from ..packet.parse import parse

    return parse(batch).flow_hash.astype(np.int64)


def outer_template(
    kind: str,
    outer_src: str,
    outer_dst: str,
    *,
    inner_ip: int = 0,
    src_mac="02:00:00:00:00:01",
    dst_mac="02:00:00:00:00:02",
    ttl: int = 64,
    dport: int | None = None,
    geneve_options: bytes = b"",
) -> tuple[bytes, dict]:
    """Outer headers with zero VNI / port / lengths / checksums, and where to patch them.

    ``inner_ip`` is 0 for an Ethernet inner frame, else 4 or 6 (GENEVE only).
    """
    if kind not in KINDS:
        raise InputError(f"unknown tunnel type {kind!r} (vxlan, geneve or nvgre)")
    try:
        s, d = ipaddress.ip_address(outer_src), ipaddress.ip_address(outer_dst)
    except ValueError as exc:
        raise InputError(f"bad tunnel endpoint address: {exc}") from None
    if s.version != d.version:
        raise InputError(f"tunnel endpoints {outer_src} and {outer_dst} differ in address family")
    if len(geneve_options) % 4 or len(geneve_options) > 252:
        raise InputError("GENEVE options must be a multiple of 4 bytes, at most 252")
    if geneve_options and kind != "geneve":
        raise InputError("options are only carried by GENEVE")
    if inner_ip and kind != "geneve":
        raise InputError(f"{kind} carries Ethernet frames; raw IP input needs GENEVE")
    if kind == "vxlan":
        tun = bytes([0x08, 0, 0, 0, 0, 0, 0, 0])
    elif kind == "geneve":
        ptype = {0: ETH_TEB, 4: 0x0800, 6: 0x86DD}[inner_ip]
        tun = bytes([len(geneve_options) // 4, 0]) + ptype.to_bytes(2, "big") + bytes(4)
        tun += bytes(geneve_options)
    else:
        tun = bytes([0x20, 0x00]) + ETH_TEB.to_bytes(2, "big") + bytes(4)
    if kind == "nvgre":
        l4 = tun
        proto = B.PROTO_GRE
    else:
        port = dport if dport is not None else (VXLAN_PORT if kind == "vxlan" else GENEVE_PORT)
        l4 = b"\0\0" + int(port).to_bytes(2, "big") + b"\0\0\0\0" + tun
        proto = B.PROTO_UDP
    if s.version == 4:
        l3 = B.ipv4(str(s), str(d), proto, l4, ttl=ttl, df=True)
        l3len = 20
    else:
        l3 = B.ipv6(str(s), str(d), proto, l4, hlim=ttl)
        l3len = 40
    hdr = B.ethernet(l3, 0x0800 if s.version == 4 else 0x86DD, src=src_mac, dst=dst_mac)
    l3_off = 14
    l4_off = l3_off + l3len
    tun_off = l4_off + (0 if kind == "nvgre" else 8)
    where = {
        "ver": s.version,
        "l3": l3_off,
        "l4": l4_off,
        "tun": tun_off,
        "len": len(hdr),
        "kind": KINDS[kind],
    }
    return hdr, where


@njit(cache=True)
def _encap_kernel(data, offset, length, tmpl, tidx, ver, l3, l4, tun, kind, vni, entropy, out, out_off):
    hl = tmpl.shape[1]
    for i in range(offset.shape[0]):
        p = out_off[i]
        ln = length[i]
        out[p : p + hl] = tmpl[tidx[i]]
        src = offset[i]
        out[p + hl : p + hl + ln] = data[src : src + ln]
        v = vni[i]
        e = entropy[i]
        if kind == 3:  # NVGRE key: VSID << 8 | FlowID
            out[p + tun + 4] = (v >> 16) & 0xFF
            out[p + tun + 5] = (v >> 8) & 0xFF
            out[p + tun + 6] = v & 0xFF
            out[p + tun + 7] = e & 0xFF
        else:
            out[p + tun + 4] = (v >> 16) & 0xFF
            out[p + tun + 5] = (v >> 8) & 0xFF
            out[p + tun + 6] = v & 0xFF
            sport = 49152 + (e & 0x3FFF)
            out[p + l4] = sport >> 8
            out[p + l4 + 1] = sport & 0xFF
            ulen = hl - l4 + ln
            out[p + l4 + 4] = (ulen >> 8) & 0xFF
            out[p + l4 + 5] = ulen & 0xFF
        if ver == 4:
            tot = hl - l3 + ln
            out[p + l3 + 2] = (tot >> 8) & 0xFF
            out[p + l3 + 3] = tot & 0xFF
            out[p + l3 + 10] = 0
            out[p + l3 + 11] = 0
            c = csum_final(csum_add(out, p + l3, 20, np.int64(0)))
            out[p + l3 + 10] = c >> 8
            out[p + l3 + 11] = c & 0xFF
        else:
            plen = hl - l3 - 40 + ln
            out[p + l3 + 4] = (plen >> 8) & 0xFF
            out[p + l3 + 5] = plen & 0xFF
            if kind != 3:  # UDP over IPv6: checksum required
                seg = hl - l4 + ln
                acc = csum_add(out, p + l3 + 8, 32, np.int64(0))
                acc += 17 + seg
                out[p + l4 + 6] = 0
                out[p + l4 + 7] = 0
                c = csum_final(csum_add(out, p + l4, seg, acc))
                if c == 0:
                    c = np.uint16(0xFFFF)
                out[p + l4 + 6] = c >> 8
                out[p + l4 + 7] = c & 0xFF


@functools.lru_cache(maxsize=4096)
def _templates(kind, outer_src, pairs, inner_ip, src_mac, ttl, dport, geneve_options):
    """The stacked header templates of ``pairs`` and their patch offsets (cached: a host
    sends towards the same few endpoints batch after batch). Read-only results."""
    tmpls = [
        outer_template(
            kind,
            outer_src,
            dst,
            inner_ip=inner_ip,
            src_mac=src_mac,
            dst_mac=dmac,
            ttl=ttl,
            dport=dport,
            geneve_options=geneve_options,
        )
        for dst, dmac in pairs
    ]
    stack = np.stack([np.frombuffer(t, np.uint8) for t, _ in tmpls])
    stack.setflags(write=False)
    return stack, tmpls[0][1]


def _vni_array(vni, n: int, kind: str) -> np.ndarray:
    arr = np.asarray(vni)
    if arr.ndim == 0:
        arr = np.full(n, arr)
    if arr.shape != (n,) or arr.dtype.kind not in "iu":
        raise InputError(f"VNI: expected an integer or {n} integers")
    if n and (arr.min() < 0 or arr.max() > 0xFFFFFF):
        name = "VSID" if kind == "nvgre" else "VNI"
        raise InputError(f"{name} must lie in 0..16777215")
    return arr.astype(np.int64)


def _endpoint_pairs(outer_dst, dst_mac, n: int):
    """Distinct (remote address, next-hop MAC) pairs and each packet's index into them."""
    single = lambda v: isinstance(v, (str, bytes, int))  # noqa: E731
    if (
        isinstance(outer_dst, (list, tuple))
        and len(outer_dst) == n
        and n
        and all(isinstance(v, str) for v in outer_dst)
        and len(set(outer_dst)) == 1
    ):
        outer_dst = outer_dst[0]  # one remote for every packet (the common case): no sorting
    if single(outer_dst) and single(dst_mac):
        return [(outer_dst, dst_mac)], np.zeros(n, np.int64)
    cols = []
    for name, v in (("remote address", outer_dst), ("remote MAC", dst_mac)):
        arr = np.asarray([v] if single(v) else list(v))
        if arr.ndim != 1 or arr.shape[0] not in (1, n) or arr.shape[0] == 0:
            raise InputError(f"{name}: expected one value or {n}")
        vals, inv = np.unique(arr.astype(str), return_inverse=True)
        cols.append((vals, np.broadcast_to(inv.ravel(), (n,))))
    (dvals, di), (mvals, mi) = cols
    key = di.astype(np.int64) * len(mvals) + mi
    ukey, tidx = np.unique(key, return_inverse=True)
    if n == 0:
        ukey = np.zeros(1, np.int64)
    pairs = [(str(dvals[k // len(mvals)]), str(mvals[k % len(mvals)])) for k in ukey.tolist()]
    return pairs, tidx.ravel()


def encap(
    batch: Batch,
    kind: str,
    vni,
    outer_src: str,
    outer_dst,
    *,
    src_mac="02:00:00:00:00:01",
    dst_mac="02:00:00:00:00:02",
    ttl: int = 64,
    dport: int | None = None,
    geneve_options: bytes = b"",
    entropy=None,
) -> Batch:
    """Encapsulate every frame of ``batch``; ``vni`` is one value or one per packet.

    ``outer_dst`` (the remote tunnel endpoint) and ``dst_mac`` (its next hop) are one value or
    one per packet; one header template is built per distinct pair.

    ``entropy`` (one 32-bit value per packet) overrides the inner-flow hash that picks the
    UDP source port / NVGRE FlowID. Returns an Ethernet batch; timestamps and ports are kept.
    A frame the capture cut short is encapsulated as captured (outer lengths count only the
    bytes present).
    """
    n = len(batch)
    inner_ip = 0
    if batch.linktype == LINK_RAW:
        if kind != "geneve":
            raise InputError(f"{kind} carries Ethernet frames; raw IP input needs GENEVE")
        offs = np.asarray(batch.offset)[np.asarray(batch.length) > 0]
        vers = np.unique(batch.data[offs] >> 4) if offs.size else np.array([4])
        if vers.size > 1 or int(vers[0]) not in (4, 6):
            raise InputError("raw IP input for GENEVE must be all IPv4 or all IPv6")
        inner_ip = int(vers[0])
    elif batch.linktype != LINK_ETHERNET:
        raise InputError(f"link type {batch.linktype} cannot be encapsulated")
    pairs, tidx = _endpoint_pairs(outer_dst, dst_mac, n)
    args = (kind, outer_src, tuple(pairs), inner_ip, src_mac, ttl, dport, bytes(geneve_options))
    try:
        tmpl, w = _templates(*args)
    except TypeError:  # an unhashable argument (a MAC as a list, say): build it uncached
        tmpl, w = _templates.__wrapped__(*args)
    vnis = _vni_array(vni, n, kind)
    length = np.asarray(batch.length, np.int64)
    hl = w["len"]
    if n and int(length.max()) + hl - w["l3"] > 0xFFFF:
        raise InputError("a frame too long to encapsulate (outer IP length over 65535)")
    if entropy is None:
        ent = _entropy(batch) if n else np.zeros(0, np.int64)
    else:
        ent = np.asarray(entropy, np.int64) & 0xFFFFFFFF
        if ent.shape != (n,):
            raise InputError(f"entropy: expected {n} values")
    new_len = (length + hl).astype(np.int32)
    out_off = np.zeros(n, np.int64)
    if n:
        np.cumsum(new_len[:-1], out=out_off[1:])
    out = np.empty(int(new_len.sum(dtype=np.int64)), np.uint8)
    _encap_kernel(
        batch.data,
        np.asarray(batch.offset, np.int64),
        length,
        tmpl,
        np.asarray(tidx, np.int64).ravel(),
        w["ver"],
        w["l3"],
        w["l4"],
        w["tun"],
        w["kind"],
        vnis,
        ent,
        out,
        out_off,
    )
    return Batch(
        data=out,
        offset=out_off,
        length=new_len,
        wire_len=new_len.copy(),
        port=np.asarray(batch.port, np.uint16).copy(),
        ts=np.asarray(batch.ts, np.int64).copy(),
        linktype=LINK_ETHERNET,
    )


# ---------------------------------------------------------------------------------------------
# decap
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def decap_one(d, b, ln, linktype):
    """Strip the outermost tunnel of packet ``d[b:b+ln]``.

    Returns (error, tunnel type, tenant, inner start, inner length, inner kind); the inner
    start is relative to ``b``.
    """
    pos = 0
    end = ln
    tun = 0
    vni = -1
    gptype = 0
    if linktype == 101:
        if end < 1:
            return DECAP_TRUNCATED, 0, -1, 0, 0, 0
        ver = np.int64(d[b]) >> 4
        if ver != 4 and ver != 6:
            return DECAP_NOT_TUNNEL, 0, -1, 0, 0, 0
    else:
        if end < 14:
            return DECAP_TRUNCATED, 0, -1, 0, 0, 0
        et = rd16(d, b + 12)
        pos = 14
        nv = 0
        while (et == 0x8100 or et == 0x88A8) and nv < 2:
            if end - pos < 4:
                return DECAP_TRUNCATED, 0, -1, 0, 0, 0
            et = rd16(d, b + pos + 2)
            pos += 4
            nv += 1
        if et == 0x0800:
            ver = 4
        elif et == 0x86DD:
            ver = 6
        else:
            return DECAP_NOT_TUNNEL, 0, -1, 0, 0, 0
    o = b + pos
    if ver == 4:
        if end - pos < 20:
            return DECAP_TRUNCATED, 0, -1, 0, 0, 0
        if (np.int64(d[o]) >> 4) != 4:
            return DECAP_BAD_OUTER, 0, -1, 0, 0, 0
        ihl = (np.int64(d[o]) & 15) * 4
        tot = rd16(d, o + 2)
        if ihl < 20 or tot < ihl:
            return DECAP_BAD_OUTER, 0, -1, 0, 0, 0
        if tot > end - pos:
            return DECAP_TRUNCATED, 0, -1, 0, 0, 0
        if csum_final(csum_add(d, o, ihl, np.int64(0))) != 0:
            return DECAP_BAD_OUTER, 0, -1, 0, 0, 0
        proto = np.int64(d[o + 9])
        if (proto == 17 or proto == 47) and (rd16(d, o + 6) & 0x3FFF) != 0:
            return DECAP_FRAGMENT, 0, -1, 0, 0, 0
        end = pos + tot
        pos += ihl
    else:
        if end - pos < 40:
            return DECAP_TRUNCATED, 0, -1, 0, 0, 0
        if (np.int64(d[o]) >> 4) != 6:
            return DECAP_BAD_OUTER, 0, -1, 0, 0, 0
        plen = rd16(d, o + 4)
        if plen > end - pos - 40:
            return DECAP_TRUNCATED, 0, -1, 0, 0, 0
        proto = np.int64(d[o + 6])
        end = pos + 40 + plen
        pos += 40
        n_ext = 0
        while proto == 0 or proto == 43 or proto == 60 or proto == 44:
            if proto == 44:
                return DECAP_FRAGMENT, 0, -1, 0, 0, 0
            if end - pos < 8 or n_ext == 8:
                return DECAP_TRUNCATED if end - pos < 8 else DECAP_BAD_OUTER, 0, -1, 0, 0, 0
            hl = (np.int64(d[b + pos + 1]) + 1) * 8
            if hl > end - pos:
                return DECAP_TRUNCATED, 0, -1, 0, 0, 0
            proto = np.int64(d[b + pos])
            pos += hl
            n_ext += 1
    o = b + pos
    kind = INNER_ETH
    if proto == 17:
        if end - pos < 8:
            return DECAP_TRUNCATED, 0, -1, 0, 0, 0
        dport = rd16(d, o + 2)
        if dport != VXLAN_PORT and dport != GENEVE_PORT:
            return DECAP_NOT_TUNNEL, 0, -1, 0, 0, 0
        ulen = rd16(d, o + 4)
        if ulen < 8:
            return DECAP_BAD_OUTER, 0, -1, 0, 0, 0
        if ulen > end - pos:
            return DECAP_TRUNCATED, 0, -1, 0, 0, 0
        end = pos + ulen
        u = pos + 8
        if end - u < 8:
            return DECAP_TRUNCATED, 0, -1, 0, 0, 0
        if dport == VXLAN_PORT:
            tun = TUN_VXLAN
            if not (d[b + u] & 0x08):
                return DECAP_BAD_TUNNEL, tun, -1, 0, 0, 0
            vni = rd32(d, b + u + 4) >> 8  # the 24-bit VNI and the reserved byte
            pos = u + 8
        else:
            tun = TUN_GENEVE
            g0 = np.int64(d[b + u])
            g1 = np.int64(d[b + u + 1])
            optlen = (g0 & 0x3F) * 4
            if (g0 >> 6) != 0 or optlen > end - u - 8:
                return DECAP_BAD_TUNNEL, tun, -1, 0, 0, 0
            vni = rd32(d, b + u + 4) >> 8  # the 24-bit VNI and the reserved byte
            q = u + 8
            qend = q + optlen
            critical = (g1 & 0x40) != 0
            while q < qend:  # walk the options: lengths must add up
                if qend - q < 4:
                    return DECAP_BAD_TUNNEL, tun, vni, 0, 0, 0
                if d[b + q + 2] & 0x80:
                    critical = True
                q += 4 + (np.int64(d[b + q + 3]) & 0x1F) * 4
            if q != qend:
                return DECAP_BAD_TUNNEL, tun, vni, 0, 0, 0
            if g1 & 0x80:
                return DECAP_OAM, tun, vni, 0, 0, 0
            if critical:
                return DECAP_CRITICAL_OPTION, tun, vni, 0, 0, 0
            gptype = rd16(d, b + u + 2)
            if gptype == 0x0800 or gptype == 0x86DD:
                kind = INNER_IP
            elif gptype != ETH_TEB:
                return DECAP_INNER_TYPE, tun, vni, 0, 0, 0
            pos = qend
    elif proto == 47:
        if end - pos < 4:
            return DECAP_TRUNCATED, 0, -1, 0, 0, 0
        gf = rd16(d, o)
        if rd16(d, o + 2) != ETH_TEB or not (gf & 0x2000):
            return DECAP_NOT_TUNNEL, 0, -1, 0, 0, 0
        tun = TUN_NVGRE
        if gf & 0x4007:
            return DECAP_BAD_TUNNEL, tun, -1, 0, 0, 0
        hlen = 8
        key_at = 4
        if gf & 0x8000:
            hlen += 4
            key_at += 4
        if gf & 0x1000:
            hlen += 4
        if end - pos < hlen:
            return DECAP_TRUNCATED, tun, -1, 0, 0, 0
        vni = rd32(d, o + key_at) >> 8  # the 24-bit VSID and the FlowID byte
        pos += hlen
    else:
        return DECAP_NOT_TUNNEL, 0, -1, 0, 0, 0
    need = 14 if kind == INNER_ETH else 20
    if end - pos < need:
        return DECAP_TRUNCATED, tun, vni, 0, 0, 0
    if kind == INNER_IP:
        iv = np.int64(d[b + pos]) >> 4
        if (iv == 4) != (gptype == 0x0800) or (iv != 4 and iv != 6):
            return DECAP_INNER_TYPE, tun, vni, 0, 0, 0
    return DECAP_OK, tun, vni, pos, end - pos, kind


@njit(cache=True)
def _decap_kernel(data, offset, length, linktype, err, tun, tenant, ioff, ilen, ikind):
    size = data.shape[0]
    for i in range(offset.shape[0]):
        b = offset[i]
        ln = np.int64(length[i])
        if b < 0 or b > size or ln < 0:
            b = 0
            ln = 0
        elif ln > size - b:
            ln = size - b
        e, t, v, s, l, k = decap_one(data, b, ln, linktype)
        err[i] = e
        tun[i] = t
        tenant[i] = v if e == 0 else -1
        ioff[i] = b + s
        ilen[i] = l
        ikind[i] = k


class DecapResult(tuple):
    """``(inner, tenant, error)``: unpacks as a 3-tuple; also has ``tun_type``."""

    def __new__(cls, inner, tenant, error, tun_type):
        self = super().__new__(cls, (inner, tenant, error))
        self.tun_type = tun_type
        return self

    inner = property(lambda self: self[0])
    tenant = property(lambda self: self[1])
    error = property(lambda self: self[2])

    @property
    def ok(self) -> np.ndarray:
        return self[2] == DECAP_OK

    def counts(self) -> dict:
        """{'tenants': {vni: packets}, 'errors': {reason: packets}} for reports."""
        t = self[1][self.ok]
        vals, cnt = np.unique(t, return_counts=True)
        ev, ec = np.unique(self[2][~self.ok], return_counts=True)
        return {
            "tenants": {int(v): int(c) for v, c in zip(vals, cnt)},
            "errors": {DECAP_NAMES[int(v)]: int(c) for v, c in zip(ev, ec)},
        }


def decap(batch: Batch) -> DecapResult:
    """Strip the outermost VXLAN / GENEVE / NVGRE tunnel of every packet (no copy).

    Returns ``(inner, tenant, error)``: ``inner`` has one entry per input packet (empty where
    ``error != 0``) sharing ``batch.data``; ``tenant`` is the VNI / VSID (-1 on error);
    ``error`` a ``DECAP_*`` code per packet. The inner batch is Ethernet, or raw IP when every
    decapsulated packet carried IP (GENEVE); an IP inner packet among Ethernet ones is
    ``DECAP_INNER_MIX``.
    """
    if batch.linktype not in (LINK_ETHERNET, LINK_RAW):
        raise InputError(f"link type {batch.linktype} cannot be decapsulated")
    n = len(batch)
    err = np.empty(n, np.uint8)
    tun = np.empty(n, np.uint8)
    tenant = np.empty(n, np.int32)
    ioff = np.empty(n, np.int64)
    ilen = np.empty(n, np.int32)
    ikind = np.empty(n, np.uint8)
    _decap_kernel(
        batch.data,
        np.asarray(batch.offset, np.int64),
        np.asarray(batch.length),
        batch.linktype,
        err,
        tun,
        tenant,
        ioff,
        ilen,
        ikind,
    )
    ok = err == DECAP_OK
    ip_inner = ok & (ikind == INNER_IP)
    linktype = LINK_ETHERNET
    if ip_inner.any():
        if ip_inner.sum() == ok.sum():
            linktype = LINK_RAW
        else:
            err[ip_inner] = DECAP_INNER_MIX
            tenant[ip_inner] = -1
            ok &= ~ip_inner
    ilen[~ok] = 0
    snapped = np.asarray(batch.wire_len, np.int64) - np.asarray(batch.length, np.int64)
    wire = np.where(ok, ilen + np.maximum(snapped, 0), 0).astype(np.int32)
    inner = Batch(
        data=batch.data,
        offset=ioff,
        length=ilen,
        wire_len=wire,
        port=np.asarray(batch.port, np.uint16).copy(),
        ts=np.asarray(batch.ts, np.int64).copy(),
        linktype=linktype,
    )
    return DecapResult(inner, tenant, err, tun)
