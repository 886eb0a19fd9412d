"""Plain-Python reference for ESP tunnel mode, one packet at a time (the oracle for the kernels).

Same behaviour as :class:`~microseg.ipsec.gateway.EspGateway`, written for clarity: the replay
window is a set of sequence numbers, the AEAD is ``cryptography``'s ``AESGCM``.
"""
from __future__ import annotations

import ipaddress
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .esp import (BAD_ICV, EXPIRED, MALFORMED, MIN_ESP, NO_POLICY, NOT_ESP, OK, REPLAY,
                  UNKNOWN_SPI)
from .sa import ACTION_BYPASS, ACTION_PROTECT, SAConfig

M32, M64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF


def pad_length(n: int) -> int:
    """Padding that 4-byte aligns payload + pad length + next header (RFC 4303 2.4)."""
    return -(n + 2) % 4


def infer_esn(top: int, seql: int, w: int) -> int | None:
    """RFC 4303 Appendix A2.2: the 64-bit number a received low half stands for."""
    tl, th = top & M32, top >> 32
    if tl >= w - 1:                                   # window within one subspace
        sh = th if seql >= tl - w + 1 else th + 1
        if sh > M32:
            return None                               # past the end of the 64-bit space
    else:                                             # window spans two subspaces
        if seql >= (tl - w + 1) % (1 << 32):
            if th == 0:
                return None
            sh = th - 1
        else:
            sh = th
    return (sh << 32) | seql


class RefWindow:
    def __init__(self, size: int):
        self.size, self.top, self.seen = size, 0, set()

    def ok(self, seq: int) -> bool:
        if seq == 0:
            return False
        if self.size == 0 or seq > self.top:
            return True
        return self.top - seq < self.size and seq not in self.seen

    def add(self, seq: int) -> None:
        self.top = max(self.top, seq)
        if self.size:
            self.seen.add(seq)
            self.seen = {s for s in self.seen if self.top - s < self.size}


def _l3(pkt: bytes, linktype: int):
    if linktype == 101:
        return (0, pkt[0] >> 4) if pkt else (-1, 0)
    if len(pkt) < 14:
        return -1, 0
    et, l3 = struct.unpack_from("!H", pkt, 12)[0], 14
    if et in (0x8100, 0x88A8):
        if len(pkt) < 18:
            return -1, 0
        et, l3 = struct.unpack_from("!H", pkt, 16)[0], 18
    return {0x0800: (l3, 4), 0x86DD: (l3, 6)}.get(et, (-1, 0))


def _csum(b: bytes) -> int:
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


class RefGateway:
    def __init__(self, config: SAConfig, iv_base=None):
        self.config = config
        self.sas = list(config.sas)
        n = len(self.sas)
        self.iv_base = [int(x) for x in iv_base] if iv_base is not None else [0] * n
        self.tx_seq = [0] * n
        self.dead = [False] * n
        self.win = [RefWindow(sa.replay_window) for sa in self.sas]
        self.life = [[0, 0, 0, 0] for _ in range(n)]
        self.aead = [AESGCM(sa.key) for sa in self.sas]

    def _policy(self, src, dst, proto):
        for p in self.config.policies:
            if p.src is not None and (src.version != p.src.version or src not in p.src):
                continue
            if p.dst is not None and (dst.version != p.dst.version or dst not in p.dst):
                continue
            if p.proto >= 0 and p.proto != proto:
                continue
            return p.action, (self.sas.index(self.config.by_name(p.sa))
                              if p.action == ACTION_PROTECT else -1)
        return None, -1

    def encrypt(self, pkt: bytes, linktype: int, sa: int | None = None, iv: int | None = None):
        """(reason, ESP packet or None). ``iv`` overrides the counter (for known answers)."""
        l3, v = _l3(pkt, linktype)
        if l3 < 0 or v not in (4, 6):
            return NO_POLICY, None
        ip = pkt[l3:]
        if v == 4:
            if len(ip) < 20 or ip[0] >> 4 != 4 or ip[0] & 15 < 5:
                return MALFORMED, None
            L = struct.unpack_from("!H", ip, 2)[0]
            if L < (ip[0] & 15) * 4 or L > len(ip):
                return MALFORMED, None
            proto, src, dst, tos = ip[9], ip[12:16], ip[16:20], ip[1]
        else:
            if len(ip) < 40 or ip[0] >> 4 != 6:
                return MALFORMED, None
            L = struct.unpack_from("!H", ip, 4)[0] + 40
            if L > len(ip):
                return MALFORMED, None
            proto, src, dst = ip[6], ip[8:24], ip[24:40]
            tos = ((ip[0] & 15) << 4) | (ip[1] >> 4)
        if sa is None:
            action, sa = self._policy(ipaddress.ip_address(src), ipaddress.ip_address(dst), proto)
            if action == ACTION_BYPASS:
                return OK, pkt
            if action != ACTION_PROTECT:
                return NO_POLICY, None
        s = self.sas[sa]
        if self.dead[sa] or self.tx_seq[sa] >= (M64 if s.esn else M32):
            self.dead[sa] = True
            return EXPIRED, None
        if s.lifetime_packets and self.life[sa][0] + 1 > s.lifetime_packets:
            return EXPIRED, None
        if s.lifetime_bytes and self.life[sa][1] + L > s.lifetime_bytes:
            return EXPIRED, None
        self.tx_seq[sa] += 1
        seq = self.tx_seq[sa]
        self.life[sa][0] += 1
        self.life[sa][1] += L
        inner = ip[:L]
        pad = pad_length(L)
        plain = inner + bytes(range(1, pad + 1)) + bytes([pad, 4 if v == 4 else 41])
        ivb = struct.pack("!Q", ((self.iv_base[sa] + seq) & M64) if iv is None else iv)
        aad = struct.pack("!II", s.spi, seq & M32) if not s.esn else \
            struct.pack("!III", s.spi, seq >> 32, seq & M32)
        ct = self.aead[sa].encrypt(s.salt + ivb, plain, aad)
        body = struct.pack("!II", s.spi, seq & M32) + ivb + ct
        if s.ip_version == 4:
            hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(body), seq & 0xFFFF,
                                        0, 64, 50, 0,
                                        ipaddress.ip_address(s.tunnel_src).packed,
                                        ipaddress.ip_address(s.tunnel_dst).packed))
            hdr[10:12] = struct.pack("!H", _csum(bytes(hdr)))
        else:
            hdr = struct.pack("!IHBB16s16s", (6 << 28) | (tos << 20), len(body), 50, 64,
                              ipaddress.ip_address(s.tunnel_src).packed,
                              ipaddress.ip_address(s.tunnel_dst).packed)
        l2 = b""
        if l3:
            l2 = pkt[:l3 - 2] + struct.pack("!H", 0x0800 if s.ip_version == 4 else 0x86DD)
        return OK, l2 + bytes(hdr) + body

    def decrypt(self, pkt: bytes, linktype: int):
        """(reason, inner packet or None)."""
        l3, v = _l3(pkt, linktype)
        if l3 < 0 or v not in (4, 6):
            return NOT_ESP, None
        ip = pkt[l3:]
        if v == 4:
            if len(ip) < 20 or ip[0] >> 4 != 4:
                return MALFORMED, None
            ihl, tot = (ip[0] & 15) * 4, struct.unpack_from("!H", ip, 2)[0]
            if ihl < 20 or tot < ihl or tot > len(ip):
                return MALFORMED, None
            if ip[9] != 50:
                return NOT_ESP, None
            if _csum(ip[:ihl]) != 0 or struct.unpack_from("!H", ip, 6)[0] & 0x3FFF:
                return MALFORMED, None
            dst, esp = ip[16:20], ip[ihl:tot]
        else:
            if len(ip) < 40 or ip[0] >> 4 != 6:
                return MALFORMED, None
            tot = struct.unpack_from("!H", ip, 4)[0] + 40
            if tot > len(ip):
                return MALFORMED, None
            nh, e = ip[6], 40
            while nh in (0, 43, 60):
                if e + 8 > tot:
                    return MALFORMED, None
                nh, e = ip[e], e + (ip[e + 1] + 1) * 8
            if e > tot or nh == 44:
                return MALFORMED, None
            if nh != 50:
                return NOT_ESP, None
            dst, esp = ip[24:40], ip[e:tot]
        if len(esp) < MIN_ESP:
            return MALFORMED, None
        spi, seql = struct.unpack_from("!II", esp)
        dst = str(ipaddress.ip_address(dst))
        sa = next((k for k, s in enumerate(self.sas) if s.spi == spi and s.tunnel_dst == dst), None)
        if sa is None:
            return UNKNOWN_SPI, None
        s = self.sas[sa]
        if (len(esp) - 32) % 4:
            return MALFORMED, None
        w = self.win[sa]
        seq = infer_esn(w.top, seql, s.replay_window) if s.esn else seql
        if seq is None or not w.ok(seq):
            return REPLAY, None
        aad = esp[:8] if not s.esn else struct.pack("!III", spi, seq >> 32, seql)
        try:
            plain = self.aead[sa].decrypt(s.salt + esp[8:16], esp[16:], aad)
        except InvalidTag:
            return BAD_ICV, None
        w.add(seq)
        padlen, nh = plain[-2], plain[-1]
        L = len(plain) - 2 - padlen
        if L < 0 or plain[L:L + padlen] != bytes(range(1, padlen + 1)):
            return MALFORMED, None
        inner = plain[:L]
        if nh == 4:
            if L < 20 or inner[0] >> 4 != 4 or not 20 <= struct.unpack_from("!H", inner, 2)[0] <= L:
                return MALFORMED, None
            inner = inner[:struct.unpack_from("!H", inner, 2)[0]]
        elif nh == 41:
            if L < 40 or inner[0] >> 4 != 6 or struct.unpack_from("!H", inner, 4)[0] + 40 > L:
                return MALFORMED, None
            inner = inner[:struct.unpack_from("!H", inner, 4)[0] + 40]
        else:
            return MALFORMED, None
        if s.lifetime_packets and self.life[sa][2] + 1 > s.lifetime_packets:
            return EXPIRED, None
        if s.lifetime_bytes and self.life[sa][3] + len(inner) > s.lifetime_bytes:
            return EXPIRED, None
        self.life[sa][2] += 1
        self.life[sa][3] += len(inner)
        l2 = pkt[:l3 - 2] + struct.pack("!H", 0x0800 if nh == 4 else 0x86DD) if l3 else b""
        return OK, l2 + inner
