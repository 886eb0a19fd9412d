"""IP reassembly before conntrack, as Linux's ``nf_defrag_ipv4`` / ``nf_defrag_ipv6`` do.

Conntrack and the policy need a datagram's ports, which only its first fragment carries, and
Linux tracks the whole datagram, never a fragment: the agent therefore gathers the fragments
of a datagram, judges the reassembled datagram once, and forwards the original fragments
with that verdict (so nothing on the wire grows beyond what the sender sent, as Linux's
refragmentation to the largest fragment size keeps it).

The reassembler works on Ethernet frames (a workload's, or one decapsulated from the
overlay). A datagram is keyed by (zone, source, destination, protocol, identification), as
RFC 791 and RFC 8200 say. It is dropped whole, and counted, on an overlapping or
inconsistent fragment (RFC 5722; Linux drops overlaps for IPv4 too), when it would exceed
65,535 bytes, when it is not complete after ``timeout_s`` (Linux's ``ipfrag_time``, 30 s), or
when the buffers would exceed ``max_bytes`` (``ipfrag_high_thresh``, 4 MiB) or
``max_datagrams``. IPv6 fragments are reassembled when the fragment header directly follows
the fixed header (other extension headers before it: dropped as ``frag_unsupported``).
"""

from __future__ import annotations

import dataclasses
import struct
import time

from ..packet import build as PB

REASONS = (
    "frag_overlap",
    "frag_too_big",
    "frag_timeout",
    "frag_no_room",
    "frag_unsupported",
    "frag_malformed",
)


@dataclasses.dataclass
class _Datagram:
    first_seen: float
    l2: bytes = b""  # the Ethernet header of the first fragment
    header: bytes = b""  # the first fragment's IP header (IPv6: fixed header)
    parts: dict = dataclasses.field(default_factory=dict)  # offset -> payload
    total: int = -1  # payload length, known from the last fragment
    frames: list = dataclasses.field(default_factory=list)  # (token, frame) as they came
    size: int = 0
    bad: str = ""
    nh: int = 0  # IPv6: the next header of the reassembled datagram


@dataclasses.dataclass
class Fragment:
    """One fragment's fields (:func:`fragment_fields`)."""

    key: tuple
    version: int
    offset: int  # bytes
    more: bool
    header: bytes  # IPv4 header with options / IPv6 fixed header
    payload: bytes
    next_header: int  # IPv6: the fragment header's next header


def fragment_fields(frame: bytes, zone: int) -> Fragment | str | None:
    """The fragment in Ethernet ``frame`` (None: not a fragment; a reason name when it is one
    that cannot be reassembled)."""
    if len(frame) < 34:
        return None
    et = int.from_bytes(frame[12:14], "big")
    ip = frame[14:]
    if et == 0x0800 and ip[0] >> 4 == 4:
        ihl = (ip[0] & 0x0F) * 4
        total = int.from_bytes(ip[2:4], "big")
        flags = int.from_bytes(ip[6:8], "big")
        more, off = bool(flags & 0x2000), (flags & 0x1FFF) * 8
        if not more and off == 0:
            return None
        if ihl < 20 or total < ihl or total > len(ip):
            return "frag_malformed"
        if more and (total - ihl) % 8:
            return "frag_malformed"  # only the last fragment may end off an 8-byte boundary
        key = (zone, 4, ip[12:16], ip[16:20], ip[9], ip[4:6])
        return Fragment(key, 4, off, more, ip[:ihl], ip[ihl:total], ip[9])
    if et == 0x86DD and len(ip) >= 40 and ip[0] >> 4 == 6:
        nh = ip[6]
        plen = int.from_bytes(ip[4:6], "big")
        if nh != 44:
            if nh in (0, 43, 60) and len(ip) >= 48:
                return "frag_unsupported" if _has_fragment_header(ip) else None
            return None
        if len(ip) < 48 or 40 + plen > len(ip) or plen < 8:
            return "frag_malformed"
        fh = ip[40:48]
        offm = int.from_bytes(fh[2:4], "big")
        more, off = bool(offm & 1), (offm >> 3) * 8
        body = ip[48 : 40 + plen]
        if more and len(body) % 8:
            return "frag_malformed"
        key = (zone, 6, ip[8:24], ip[24:40], fh[0], fh[4:8])
        return Fragment(key, 6, off, more, ip[:40], body, fh[0])
    return None


def _has_fragment_header(ip: bytes) -> bool:
    nh, pos = ip[6], 40
    for _ in range(8):
        if nh == 44:
            return True
        if nh not in (0, 43, 60) or pos + 8 > len(ip):
            return False
        nh, pos = ip[pos], pos + (ip[pos + 1] + 1) * 8
    return False


class Reassembler:
    """Fragments in, whole datagrams out (see the module doc)."""

    def __init__(self, timeout_s: float = 30.0, max_bytes: int = 4 << 20, max_datagrams: int = 4096):
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.max_datagrams = max_datagrams
        self.pending: dict[tuple, _Datagram] = {}
        self.bytes = 0
        self.drops = dict.fromkeys(REASONS, 0)
        self.reassembled = 0

    def add(self, frame: bytes, zone: int, token, now: float | None = None):
        """Offer one Ethernet frame. Returns None while its datagram is incomplete (or
        dropped: counted in ``drops``), else ``(whole frame, [token of each fragment, in
        arrival order])``. A frame that is no fragment comes back as it is, alone."""
        now = time.monotonic() if now is None else now
        self.expire(now)
        f = fragment_fields(frame, zone)
        if f is None:
            return frame, [token]
        if isinstance(f, str):
            self.drops[f] += 1
            return None
        d = self.pending.get(f.key)
        if d is None:
            if len(self.pending) >= self.max_datagrams or self.bytes + len(frame) > self.max_bytes:
                self.drops["frag_no_room"] += 1
                return None
            d = self.pending[f.key] = _Datagram(now)
        if d.bad:
            return None
        end = f.offset + len(f.payload)
        if end > 65535 - (20 if f.version == 4 else 0):
            return self._fail(f.key, d, "frag_too_big")
        for o, p in d.parts.items():
            if f.offset < o + len(p) and o < end:
                if o == f.offset and p == f.payload:
                    return None  # an exact duplicate: ignored, as Linux does
                return self._fail(f.key, d, "frag_overlap")
        if not f.more:
            if d.total >= 0 and d.total != end:
                return self._fail(f.key, d, "frag_malformed")
            d.total = end
        if d.total >= 0 and end > d.total:
            return self._fail(f.key, d, "frag_malformed")
        if f.offset == 0:
            d.l2, d.header, d.nh = frame[:14], f.header, f.next_header
        d.parts[f.offset] = f.payload
        d.frames.append(token)
        d.size += len(frame)
        self.bytes += len(frame)
        if d.total < 0 or not d.header or sum(len(p) for p in d.parts.values()) != d.total:
            return None
        del self.pending[f.key]
        self.bytes -= d.size
        payload = b"".join(d.parts[o] for o in sorted(d.parts))
        self.reassembled += 1
        return d.l2 + _whole(d, payload), list(d.frames)

    def _fail(self, key, d: _Datagram, why: str):
        self.drops[why] += 1
        d.bad = why
        d.parts.clear()
        self.bytes -= d.size
        d.size = 0
        return None

    def expire(self, now: float) -> None:
        for key in [k for k, d in self.pending.items() if now - d.first_seen > self.timeout_s]:
            d = self.pending.pop(key)
            if not d.bad:
                self.drops["frag_timeout"] += 1
            self.bytes -= d.size

    def stats(self) -> dict:
        return {"pending": len(self.pending), "bytes": self.bytes, "reassembled": self.reassembled}


def _whole(d: _Datagram, payload: bytes) -> bytes:
    h = d.header
    if h[0] >> 4 == 4:
        ihl = len(h)
        hdr = bytearray(h)
        struct.pack_into("!H", hdr, 2, ihl + len(payload))
        struct.pack_into("!H", hdr, 6, int.from_bytes(h[6:8], "big") & 0x4000)  # DF kept, MF/offset 0
        struct.pack_into("!H", hdr, 10, 0)
        struct.pack_into("!H", hdr, 10, PB.checksum(bytes(hdr)))
        return bytes(hdr) + payload
    hdr = bytearray(h)
    struct.pack_into("!H", hdr, 4, len(payload))
    hdr[6] = d.nh
    return bytes(hdr) + payload


def fragment_ipv4(frame: bytes, mtu: int) -> list[bytes] | None:
    """Split the IPv4 packet of Ethernet ``frame`` into fragments whose IP packets fit
    ``mtu`` bytes, as a router does with a packet that does not fit its next hop and has DF
    clear (RFC 791; a fragment may be fragmented again: offsets and the last MF carry over;
    options are copied only into the first fragment, except those with the copied flag).
    None when it cannot be (DF set, not IPv4, a header that leaves no room)."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[14] >> 4 != 4:
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    total = int.from_bytes(ip[2:4], "big")
    flags = int.from_bytes(ip[6:8], "big")
    if flags & 0x4000 or ihl < 20 or total > len(ip) or total <= mtu:
        return None
    opts = ip[20:ihl]
    copied = bytearray()
    i = 0
    while i < len(opts):  # the options later fragments keep (copied flag, RFC 791)
        t = opts[i]
        if t == 0:
            break
        if t == 1:
            i += 1
            continue
        ln = opts[i + 1] if i + 1 < len(opts) else 0
        if ln < 2:
            break
        if t & 0x80:
            copied += opts[i : i + ln]
        i += ln
    copied += b"\0" * (-len(copied) % 4)
    base_off = (flags & 0x1FFF) * 8
    last_mf = bool(flags & 0x2000)
    payload = ip[ihl:total]
    out = []
    pos = 0
    while pos < len(payload):
        hdr_opts = opts if pos == 0 else bytes(copied)
        hlen = 20 + len(hdr_opts)
        room = (mtu - hlen) // 8 * 8
        if room <= 0:
            return None
        piece = payload[pos : pos + room]
        more = pos + len(piece) < len(payload) or last_mf
        hdr = bytearray(ip[:20])
        hdr[0] = 0x40 | (hlen // 4)
        struct.pack_into("!H", hdr, 2, hlen + len(piece))
        struct.pack_into("!H", hdr, 6, (0x2000 if more else 0) | ((base_off + pos) // 8))
        struct.pack_into("!H", hdr, 10, 0)
        h = bytes(hdr) + bytes(hdr_opts)
        h = h[:10] + struct.pack("!H", PB.checksum(h)) + h[12:]
        out.append(frame[:14] + h + piece)
        pos += len(piece)
    return out
