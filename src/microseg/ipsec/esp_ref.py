"""Plain-Python reference for ESP tunnel mode, one packet at a time (the oracle for the kernels).

Same behaviour as :class:`~microseg.ipsec.gateway.EspGateway`, written for clarity: the replay
window is a set of sequence numbers, the AEAD is ``cryptography``'s ``AESGCM``, lifetimes are
a small object per SA, and SAs live in a dict by name (installed, replaced, removed).
"""

from __future__ import annotations

import ipaddress
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .esp import BAD_ICV, EXPIRED, MALFORMED, MIN_ESP, NO_POLICY, NOT_ESP, OK, REPLAY, UNKNOWN_SPI
from .sa import ACTION_BYPASS, ACTION_PROTECT, SAConfig, SecurityAssociation, seconds_ns

M32, M64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF


def pad_length(n: int) -> int:
    """Padding that 4-byte aligns payload + pad length + next header (RFC 4303 2.4)."""
    return -(n + 2) % 4


def infer_esn(top: int, seql: int, w: int) -> int | None:
    """RFC 4303 Appendix A2.2: the 64-bit number a received low half stands for."""
    tl, th = top & M32, top >> 32
    if tl >= w - 1:  # window within one subspace
        sh = th if seql >= tl - w + 1 else th + 1
        if sh > M32:
            return None  # past the end of the 64-bit space
    else:  # window spans two subspaces
        if seql >= (tl - w + 1) % (1 << 32):
            if th == 0:
                return None
            sh = th - 1
        else:
            sh = th
    return (sh << 32) | seql


class RefWindow:
    def __init__(self, size: int):
        self.size, self.top = size, 0
        self.seen: set[int] = set()

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


class RefLife:
    """One SA's lifetime state (RFC 4301 4.4.2.1): per-direction counts, a clock, two flags.

    Events are tuples (kind, sa name, limit, direction, at)."""

    def __init__(self, sa: SecurityAssociation, now=None):
        self.sa = sa
        self.count = {"encrypt": [0, 0], "decrypt": [0, 0]}  # packets, bytes
        self.start = now
        self.soft: tuple[str, str, int] | None = None  # (limit, direction, at)
        self.hard: tuple[str, str, int] | None = None

    def _end(self, limit, d, t, events):
        self.hard = (limit, d, t)
        events.append(("hard", self.sa.name, limit, d, t))

    def use(self, d: str, nbytes: int, t: int, events: list) -> bool:
        """Count one packet; False when the SA has ended or this packet would pass a hard
        limit. Reaching a hard limit exactly ends the SA after this packet; soft fires once."""
        sa = self.sa
        if self.hard:
            return False
        if self.start is None:
            self.start = t
        el = t - self.start
        c = self.count[d]
        hard_ns, soft_ns = seconds_ns(sa.hard_seconds), seconds_ns(sa.soft_seconds)
        if hard_ns and el >= hard_ns:
            self._end("seconds", d, t, events)
            return False
        if sa.hard_packets and c[0] >= sa.hard_packets:
            self._end("packets", d, t, events)
            return False
        if sa.hard_bytes and c[1] + nbytes > sa.hard_bytes:
            self._end("bytes", d, t, events)
            return False
        c[0] += 1
        c[1] += nbytes
        if self.soft is None:
            why = (
                "seconds"
                if soft_ns and el >= soft_ns
                else "packets"
                if sa.soft_packets and c[0] >= sa.soft_packets
                else "bytes"
                if sa.soft_bytes and c[1] >= sa.soft_bytes
                else None
            )
            if why:
                self.soft = (why, d, t)
                events.append(("soft", sa.name, why, d, t))
        if sa.hard_packets and c[0] >= sa.hard_packets:
            self._end("packets", d, t, events)
        elif sa.hard_bytes and c[1] >= sa.hard_bytes:
            self._end("bytes", d, t, events)
        return True

    def clock(self, now: int, events: list) -> None:
        """Seconds limits at ``now`` without a packet (the gateway's ``expire``)."""
        if self.start is None or self.hard:
            return
        sa, el = self.sa, now - self.start
        if self.soft is None and sa.soft_seconds and el >= seconds_ns(sa.soft_seconds):
            self.soft = ("seconds", "clock", now)
            events.append(("soft", sa.name, "seconds", "clock", now))
        if sa.hard_seconds and el >= seconds_ns(sa.hard_seconds):
            self._end("seconds", "clock", now, events)


class RefGateway:
    def __init__(self, config: SAConfig, iv_base=None, now=None):
        self.config = config
        self.sas = list(config.sas)
        n = len(self.sas)
        self.iv_base = [int(x) for x in iv_base] if iv_base is not None else [0] * n
        self.tx_seq = [0] * n
        self.dead = [False] * n
        self.win = [RefWindow(sa.replay_window) for sa in self.sas]
        self.aead = [AESGCM(sa.key) for sa in self.sas]
        self.lt = [RefLife(sa, now) for sa in self.sas]
        self.fails = [0] * n  # consecutive authentication failures
        self.removed = [False] * n
        self.successor: dict[str, str] = {}
        self.events: list = []

    @property
    def life(self) -> list:
        """[tx packets, tx bytes, rx packets, rx bytes] per SA, as the gateway's counters."""
        return [lt.count["encrypt"] + lt.count["decrypt"] for lt in self.lt]

    # -- SAs at run time (make-before-break) ----------------------------------------------------
    def add_sa(self, sa: SecurityAssociation, now=None, iv_base: int = 0) -> int:
        self.sas.append(sa)
        self.iv_base.append(iv_base)
        self.tx_seq.append(0)
        self.dead.append(False)
        self.win.append(RefWindow(sa.replay_window))
        self.aead.append(AESGCM(sa.key))
        self.lt.append(RefLife(sa, now))
        self.fails.append(0)
        self.removed.append(False)
        return len(self.sas) - 1

    def rekey(self, pairs: dict, now=None, iv_base=None) -> None:
        for k, (old, sa) in enumerate(pairs.items()):
            self.add_sa(sa, now, 0 if iv_base is None else iv_base[k])
            self.successor[old] = sa.name

    def remove_sa(self, name: str) -> None:
        self.removed[self._live_index(name)] = True

    def _live_index(self, name: str):
        for k, sa in enumerate(self.sas):
            if sa.name == name and not self.removed[k]:
                return k
        return None

    def _outbound(self, name: str) -> int:
        chain = [name]
        while chain[-1] in self.successor and self.successor[chain[-1]] not in chain:
            chain.append(self.successor[chain[-1]])
        for nm in reversed(chain):
            k = self._live_index(nm)
            if k is not None:
                return k
        raise KeyError(name)

    def expire(self, now: int) -> list:
        new: list[tuple] = []
        for k, lt in enumerate(self.lt):
            if not self.removed[k]:
                lt.clock(now, new)
        self.events += new
        return new

    def _policy(self, src, dst, proto) -> tuple[int | None, int]:
        for p in self.config.policies:
            if p.src is not None and (src.version != p.src.version or src not in p.src):
                continue
            if p.dst is not None and (dst.version != p.dst.version or dst not in p.dst):
                continue
            if p.proto >= 0 and p.proto != proto:
                continue
            if p.action != ACTION_PROTECT:
                return p.action, -1
            assert p.sa is not None  # a protect policy names its SA (checked on load)
            return p.action, self._outbound(p.sa)
        return None, -1

    def encrypt(
        self, pkt: bytes, linktype: int, sa: int | str | None = None, iv: int | None = None, t: int = 0
    ):
        """(reason, ESP packet or None). ``iv`` overrides the counter (for known answers);
        ``t`` is the packet's time (ns)."""
        if isinstance(sa, str):
            sa = self._outbound(sa)
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
        if self.lt[sa].hard:
            return EXPIRED, None
        if self.dead[sa] or self.tx_seq[sa] >= (M64 if s.esn else M32):
            self.dead[sa] = True
            return EXPIRED, None
        if not self.lt[sa].use("encrypt", L, t, self.events):
            return EXPIRED, None
        self.tx_seq[sa] += 1
        seq = self.tx_seq[sa]
        inner = ip[:L]
        pad = pad_length(L)
        plain = inner + bytes(range(1, pad + 1)) + bytes([pad, 4 if v == 4 else 41])
        ivb = struct.pack("!Q", ((self.iv_base[sa] + seq) & M64) if iv is None else iv)
        aad = (
            struct.pack("!II", s.spi, seq & M32)
            if not s.esn
            else struct.pack("!III", s.spi, seq >> 32, seq & M32)
        )
        ct = self.aead[sa].encrypt(s.salt + ivb, plain, aad)
        body = struct.pack("!II", s.spi, seq & M32) + ivb + ct
        hdr: bytes | bytearray
        if s.ip_version == 4:
            hdr = bytearray(
                struct.pack(
                    "!BBHHHBBH4s4s",
                    0x45,
                    tos,
                    20 + len(body),
                    seq & 0xFFFF,
                    0,
                    64,
                    50,
                    0,
                    ipaddress.ip_address(s.tunnel_src).packed,
                    ipaddress.ip_address(s.tunnel_dst).packed,
                )
            )
            hdr[10:12] = struct.pack("!H", _csum(bytes(hdr)))
        else:
            hdr = struct.pack(
                "!IHBB16s16s",
                (6 << 28) | (tos << 20),
                len(body),
                50,
                64,
                ipaddress.ip_address(s.tunnel_src).packed,
                ipaddress.ip_address(s.tunnel_dst).packed,
            )
        l2 = b""
        if l3:
            l2 = pkt[: l3 - 2] + struct.pack("!H", 0x0800 if s.ip_version == 4 else 0x86DD)
        return OK, l2 + bytes(hdr) + body

    def decrypt(self, pkt: bytes, linktype: int, t: int = 0):
        """(reason, inner packet or None); ``t`` is the packet's time (ns)."""
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
        dst_text = str(ipaddress.ip_address(dst))
        sa = next(
            (
                k
                for k, s in enumerate(self.sas)
                if s.spi == spi and s.tunnel_dst == dst_text and not self.removed[k]
            ),
            None,
        )
        if sa is None:
            return UNKNOWN_SPI, None
        s = self.sas[sa]
        if (len(esp) - 32) % 4:
            return MALFORMED, None
        w = self.win[sa]
        seq = infer_esn(w.top, seql, s.replay_window) if s.esn else seql
        if seq is None or not w.ok(seq):
            return REPLAY, None
        if self.lt[sa].hard:
            return EXPIRED, None
        plain = self._open(sa, esp, seq)
        if plain is None:
            self.fails[sa] += 1
            if not (
                s.esn and s.resync_after and self.fails[sa] >= s.resync_after and seq >> 32 < M32
            ):  # no higher value to try
                return BAD_ICV, None
            # RFC 4303 A3.2: this packet, with the next high-order values; commit only one
            # that authenticates
            self.fails[sa] = 0
            for j in range(1, s.resync_tries + 1):
                if (seq >> 32) + j > M32:
                    break
                plain = self._open(sa, esp, seq + (j << 32))
                if plain is not None:
                    seq += j << 32
                    break
            if plain is None:
                return BAD_ICV, None
        self.fails[sa] = 0
        w.add(seq)
        padlen, nh = plain[-2], plain[-1]
        L = len(plain) - 2 - padlen
        if L < 0 or plain[L : L + padlen] != bytes(range(1, padlen + 1)):
            return MALFORMED, None
        inner = plain[:L]
        if nh == 4:
            if L < 20 or inner[0] >> 4 != 4 or not 20 <= struct.unpack_from("!H", inner, 2)[0] <= L:
                return MALFORMED, None
            inner = inner[: struct.unpack_from("!H", inner, 2)[0]]
        elif nh == 41:
            if L < 40 or inner[0] >> 4 != 6 or struct.unpack_from("!H", inner, 4)[0] + 40 > L:
                return MALFORMED, None
            inner = inner[: struct.unpack_from("!H", inner, 4)[0] + 40]
        else:
            return MALFORMED, None
        if not self.lt[sa].use("decrypt", len(inner), t, self.events):
            return EXPIRED, None
        l2 = pkt[: l3 - 2] + struct.pack("!H", 0x0800 if nh == 4 else 0x86DD) if l3 else b""
        return OK, l2 + inner

    def _open(self, sa: int, esp: bytes, seq: int):
        """The ESP payload's plaintext under the 64-bit ``seq``, or None if it fails to verify."""
        s = self.sas[sa]
        aad = esp[:8] if not s.esn else struct.pack("!III", s.spi, seq >> 32, seq & M32)
        try:
            return self.aead[sa].decrypt(s.salt + esp[8:16], esp[16:], aad)
        except InvalidTag:
            return None
