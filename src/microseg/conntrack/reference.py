"""Plain-Python reference connection tracker: the oracle the Numba kernel is tested against.

One packet at a time, one Python object per connection, a ``dict`` from both directions' tuples
to the connection: written to be read side by side with Linux's ``nf_conntrack_proto_tcp.c``
(``nf_conntrack_tcp_packet``, ``tcp_in_window``, ``tcp_new``), ``..._icmp.c`` and ``..._udp.c``.
It has no capacity limit and no early drop; expiry happens on lookup (the kernel's behaviour
for a connection that is looked up after its deadline). Also the dict-based baseline of the
benchmark.
"""

from __future__ import annotations

import numpy as np

from .. import ctstate as CS
from ..packet import batch as B
from ..packet import errors as PE
from . import const as K

M32 = 0xFFFFFFFF


def _s32(x: int) -> int:
    x &= M32
    return x - (1 << 32) if x & 0x80000000 else x


def before(a: int, b: int) -> bool:
    return _s32(a - b) < 0


def after(a: int, b: int) -> bool:
    return _s32(b - a) < 0


def conntrack_index(flags: int) -> int:
    if flags & K.TH_RST:
        return K.RST_SET
    if flags & K.TH_SYN:
        return K.SYNACK_SET if flags & K.TH_ACK else K.SYN_SET
    if flags & K.TH_FIN:
        return K.FIN_SET
    if flags & K.TH_ACK:
        return K.ACK_SET
    return K.NONE_SET


class Seen:
    __slots__ = ("td_end", "td_maxend", "td_maxwin", "td_maxack", "td_scale", "flags")

    def __init__(self):
        self.td_end = self.td_maxend = self.td_maxwin = self.td_maxack = 0
        self.td_scale = self.flags = 0

    def reset(self):
        self.td_end = self.td_maxend = self.td_maxwin = self.td_maxack = self.td_scale = 0
        self.flags &= K.BE_LIBERAL


class Conn:
    __slots__ = (
        "zone",
        "proto",
        "src",
        "dst",
        "sport",
        "dport",
        "icmp_type",
        "icmp_code",
        "status",
        "deadline",
        "stream_ts",
        "state",
        "seen",
        "last_index",
        "last_dir",
        "last_seq",
        "last_ack",
        "last_end",
        "last_win",
        "last_wscale",
        "last_flags",
        "retrans",
        "packets",
        "bytes",
    )
    zone: int
    proto: int
    src: tuple
    dst: tuple
    sport: int
    dport: int
    icmp_type: int
    icmp_code: int

    def __init__(self):
        self.status = 0
        self.deadline = self.stream_ts = 0
        self.state = K.NONE
        self.seen = [Seen(), Seen()]
        self.last_index = K.NONE_SET
        self.last_dir = self.last_seq = self.last_ack = self.last_end = self.last_win = 0
        self.last_wscale = self.last_flags = self.retrans = 0
        self.packets = [0, 0]
        self.bytes = [0, 0]


class Pkt:
    """The fields of one packet the tracker reads."""

    __slots__ = (
        "zone",
        "ver",
        "proto",
        "src",
        "dst",
        "sport",
        "dport",
        "flags",
        "seq",
        "ack",
        "win",
        "seglen",
        "opts",
        "itype",
        "icode",
        "icmp_id",
        "ok",
        "err",
        "pflags",
        "inner",
        "wire",
        "tenant",
    )
    zone: int
    ver: int
    proto: int
    src: tuple
    dst: tuple
    sport: int
    dport: int
    flags: int
    seq: int
    ack: int
    win: int
    seglen: int
    opts: bytes
    itype: int
    icode: int
    icmp_id: int
    ok: bool
    err: int
    pflags: int
    inner: tuple | None
    wire: int
    tenant: int


def tcp_options(opts: bytes, st: Seen) -> None:
    """Window scale and SACK-permitted options into ``st`` (Linux's tcp_options)."""
    length = len(opts)
    if not length:
        return
    st.td_scale = 0
    st.flags &= K.BE_LIBERAL
    p = 0
    while length > 0:
        op = opts[p]
        p += 1
        if op == 0:
            return
        if op == 1:
            length -= 1
            continue
        if length < 2:
            return
        size = opts[p]
        p += 1
        if size < 2 or size > length:
            return
        if op == 4 and size == 2:
            st.flags |= K.SACK_PERM
        elif op == 3 and size == 3:
            st.td_scale = min(opts[p], K.TCP_MAX_WSCALE)
            st.flags |= K.WINDOW_SCALE
        p += size - 2
        length -= size


def tcp_sack(opts: bytes, sack: int) -> int:
    """Highest right edge of the SACK blocks (Linux's tcp_sack)."""
    length = len(opts)
    if not length:
        return sack
    if length == 12 and opts[:4] == b"\x01\x01\x08\x0a":
        return sack
    p = 0
    while length > 0:
        op = opts[p]
        p += 1
        if op == 0:
            return sack
        if op == 1:
            length -= 1
            continue
        if length < 2:
            return sack
        size = opts[p]
        p += 1
        if size < 2 or size > length:
            return sack
        if op == 5 and size >= 10 and (size - 2) % 8 == 0:
            for i in range(0, size - 2, 8):
                tmp = int.from_bytes(opts[p + i + 4 : p + i + 8], "big")
                if after(tmp, sack):
                    sack = tmp
            return sack
        p += size - 2
        length -= size
    return sack


class ReferenceConntrack:
    """Dict-of-objects tracker with the same observable behaviour as the Numba table."""

    def __init__(
        self,
        timeouts: dict | None = None,
        default_zone: int = K.UNTAGGED_ZONE,
        tcp_loose: bool = True,
        tcp_be_liberal: bool = False,
        tcp_max_retrans: int = 3,
        checksum: bool = True,
    ):
        self.t = [int(x) for x in K.timeout_array(timeouts)]
        self.default_zone = default_zone
        self.loose, self.liberal, self.max_retrans = tcp_loose, tcp_be_liberal, tcp_max_retrans
        self.checksum = checksum
        self.conns: dict = {}
        self.counters = [0] * K.N_COUNTERS

    # -- tuples --------------------------------------------------------------------------------
    @staticmethod
    def _tuples(c: Conn):
        if c.proto in (K.IPPROTO_ICMP, K.IPPROTO_ICMPV6):
            inv = K.ICMP4_INV if c.proto == K.IPPROTO_ICMP else K.ICMP6_INV
            rt = int(inv[c.icmp_type]) - 1
            return (
                (c.zone, c.proto, c.src, c.dst, c.sport, 0, c.icmp_type, c.icmp_code),
                (c.zone, c.proto, c.dst, c.src, c.sport, 0, rt, c.icmp_code),
            )
        return (
            (c.zone, c.proto, c.src, c.dst, c.sport, c.dport, 0, 0),
            (c.zone, c.proto, c.dst, c.src, c.dport, c.sport, 0, 0),
        )

    def _find(self, tup, now):
        hit = self.conns.get(tup)
        if hit is None:
            return None, 0
        c = hit
        if c.deadline - now <= 0:
            self._delete(c)
            self.counters[K.C_EXPIRED] += 1
            return None, 0
        return c, (0 if self._tuples(c)[0] == tup else 1)

    def _delete(self, c: Conn):
        for t in self._tuples(c):
            self.conns.pop(t, None)

    def entries(self):
        seen, out = set(), []
        for c in self.conns.values():
            if id(c) not in seen:
                seen.add(id(c))
                out.append(c)
        return out

    # -- packets -------------------------------------------------------------------------------
    def _pkt(self, batch, keys, i, ok) -> Pkt:
        u64, u32, i32, u16, u8 = keys.arrays()
        p = Pkt()
        tenant = int(i32[B.TENANT, i])
        p.tenant = tenant
        p.zone = tenant if tenant >= 0 else self.default_zone
        p.ver, p.proto, p.err, p.pflags = (
            int(u8[B.IP_VER, i]),
            int(u8[B.PROTO, i]),
            int(u8[B.ERROR, i]),
            int(u8[B.FLAGS, i]),
        )
        p.src = (int(u64[B.SRC_HI, i]), int(u64[B.SRC_LO, i]))
        p.dst = (int(u64[B.DST_HI, i]), int(u64[B.DST_LO, i]))
        p.sport, p.dport = int(u16[B.SPORT, i]), int(u16[B.DPORT, i])
        p.flags = int(u8[B.TCP_FLAGS, i])
        p.seq, p.ack, p.win = int(u32[B.TCP_SEQ, i]), int(u32[B.TCP_ACK, i]), int(u16[B.TCP_WIN, i])
        p.seglen = int(i32[B.PAYLOAD_LEN, i])
        p.itype, p.icode = int(u8[B.ICMP_TYPE, i]), int(u8[B.ICMP_CODE, i])
        p.ok = bool(ok[i])
        p.wire = int(batch.wire_len[i])
        pkt = batch.packet(i)
        l4 = int(i32[B.L4_OFF, i])
        p.opts = b""
        p.icmp_id = 0
        if p.proto == K.IPPROTO_TCP and l4 >= 0:
            doff = int(u8[B.TCP_DOFF, i])
            p.opts = pkt[l4 + 20 : l4 + doff] if doff > 20 else b""
        if p.proto in (K.IPPROTO_ICMP, K.IPPROTO_ICMPV6) and l4 >= 0 and len(pkt) >= l4 + 6:
            p.icmp_id = int.from_bytes(pkt[l4 + 4 : l4 + 6], "big")
        p.inner = None
        if p.pflags & B.F_ICMP_ERR:
            iproto = int(u8[B.INNER_PROTO, i])
            isrc = (int(u64[B.INNER_SRC_HI, i]), int(u64[B.INNER_SRC_LO, i]))
            idst = (int(u64[B.INNER_DST_HI, i]), int(u64[B.INNER_DST_LO, i]))
            isp, idp = int(u16[B.INNER_SPORT, i]), int(u16[B.INNER_DPORT, i])
            ityp, icode = int(u8[B.INNER_ICMP_TYPE, i]), 0
            if iproto in (K.IPPROTO_ICMP, K.IPPROTO_ICMPV6):
                q = l4 + 8
                r = -1
                if p.ver == 4 and q < len(pkt):
                    r = q + (pkt[q] & 15) * 4
                elif p.ver == 6 and q + 6 < len(pkt) and pkt[q + 6] == K.IPPROTO_ICMPV6:
                    r = q + 40
                icode = pkt[r + 1] if 0 <= r and r + 1 < len(pkt) else 0
                idp = 0
            elif iproto not in (K.IPPROTO_TCP, K.IPPROTO_UDP):
                isp = idp = 0
            p.inner = (iproto, isrc, idst, isp, idp, ityp, icode)
        return p

    def process(self, batch, keys, now_ns=None, csum_ok=None, decide=None):
        """States of a batch, packet by packet. ``decide(rows) -> bools`` (as for the table)
        is asked about each packet at the moment it would commit a new connection, one row at
        a time: a denied packet is reported NEW and leaves no connection behind."""
        n = len(keys)
        if now_ns is None:
            now = batch.ts[:n]
        else:
            now = np.broadcast_to(np.asarray(now_ns, np.int64), (n,))
        if csum_ok is None:
            csum_ok = np.ones(n, dtype=bool)
        out = np.zeros(n, dtype=np.uint8)
        for i in range(n):
            allow = (
                None if decide is None else (lambda i=i: bool(np.asarray(decide(np.array([i], np.int64)))[0]))
            )
            out[i] = self._one(self._pkt(batch, keys, i, csum_ok), int(now[i]), allow)
        return out

    def _invalid(self, reason):
        self.counters[reason] += 1
        return CS.TRACKED | CS.INVALID

    def _one(self, p: Pkt, now: int, allow=None) -> int:
        if p.ver == 0:
            return 0
        if p.err and not (p.tenant < 0 and p.err in (PE.TRUNC_TUNNEL, PE.BAD_TUNNEL)):
            return self._invalid(K.C_MALFORMED)
        if p.pflags & B.F_FRAG:
            return self._invalid(K.C_FRAGMENT)
        proto = p.proto
        icmp = proto in (K.IPPROTO_ICMP, K.IPPROTO_ICMPV6) and ((proto == K.IPPROTO_ICMP) == (p.ver == 4))
        if self.checksum and not p.ok and (proto in (K.IPPROTO_TCP, K.IPPROTO_UDP) or icmp):
            return self._invalid(K.C_CHECKSUM)
        itype = icode = 0
        sport, dport = p.sport, p.dport
        if icmp:
            if proto == K.IPPROTO_ICMP:
                if p.itype > K.NR_ICMP_TYPES:
                    return self._invalid(K.C_ICMP_TYPE)
                if K.ICMP4_ERRORS[p.itype]:
                    return self._related(p, now)
            else:
                if K.ICMP6_UNTRACKED[p.itype]:
                    return 0
                if p.itype < 128:
                    return self._related(p, now)
            inv = K.ICMP4_INV if proto == K.IPPROTO_ICMP else K.ICMP6_INV
            if not inv[p.itype]:
                return self._invalid(K.C_ICMP_NEW)
            itype, icode, sport, dport = p.itype, p.icode, p.icmp_id, 0
        elif proto not in (K.IPPROTO_TCP, K.IPPROTO_UDP):
            sport = dport = 0
        if proto == K.IPPROTO_TCP:
            if not K.TCP_VALID_FLAGS[p.flags & ~(K.TH_ECE | K.TH_CWR | K.TH_PSH) & 0x3F]:
                return self._invalid(K.C_TCP_FLAGS)
        tup = (p.zone, proto, p.src, p.dst, sport, dport, itype, icode)
        while True:  # a TCP reopen deletes the connection and looks up again
            c, d = self._find(tup, now)
            new = c is None
            if new:
                c = Conn()
                c.zone, c.proto, c.src, c.dst = p.zone, proto, p.src, p.dst
                c.sport, c.dport, c.icmp_type, c.icmp_code = sport, dport, itype, icode
                d = 0
            if d == 1:
                info = CS.ESTABLISHED | CS.REPLY
            elif c.status & K.ST_SEEN_REPLY:
                info = CS.ESTABLISHED
            else:
                info = CS.NEW
            if proto == K.IPPROTO_TCP:
                r = self._tcp(c, new, d, p, now)
                if r == -2:
                    self._delete(c)
                    self.counters[K.C_DELETED] += 1
                    continue
            elif proto == K.IPPROTO_UDP:
                r = self._udp(c, new, now)
            elif icmp:
                valid = K.ICMP4_VALID_NEW if proto == K.IPPROTO_ICMP else K.ICMP6_VALID_NEW
                if not valid[c.icmp_type]:
                    r = K.C_ICMP_NEW + 100
                else:
                    c.deadline = now + self.t[K.T_ICMP if proto == K.IPPROTO_ICMP else K.T_ICMPV6]
                    r = 1
            else:
                c.deadline = now + self.t[K.T_GENERIC]
                r = 1
            if r >= 100:
                return self._invalid(r - 100)
            if r == -3:  # killed (RST with no reply seen): the packet still passes
                self._delete(c)
                self.counters[K.C_CLOSED] += 1
            elif new:
                if allow is not None and not allow():
                    return CS.TRACKED | info  # denied first packet: nothing committed
                for t in self._tuples(c):
                    self.conns[t] = c
                self.counters[K.C_CREATED] += 1
            if r != -3:
                c.packets[d] += 1
                c.bytes[d] += p.wire
                if d == 1:
                    c.status |= K.ST_SEEN_REPLY
            return CS.TRACKED | info

    def _related(self, p: Pkt, now: int) -> int:
        if p.inner is None:
            return self._invalid(K.C_ICMP_ORPHAN)
        iproto, isrc, idst, isp, idp, ityp, icode = p.inner
        rt = 0
        if iproto in (K.IPPROTO_ICMP, K.IPPROTO_ICMPV6):
            inv = K.ICMP4_INV if iproto == K.IPPROTO_ICMP else K.ICMP6_INV
            if not inv[ityp]:
                return self._invalid(K.C_ICMP_ORPHAN)
            rt = int(inv[ityp]) - 1
            target = (p.zone, iproto, idst, isrc, isp, 0, rt, icode)
        else:
            target = (p.zone, iproto, idst, isrc, idp, isp, 0, 0)
        c, d = self._find(target, now)
        if c is None:
            return self._invalid(K.C_ICMP_ORPHAN)
        ct_dst = c.dst if d == 0 else c.src
        if ct_dst != p.dst:
            return self._invalid(K.C_ICMP_MISMATCH)
        return CS.TRACKED | CS.RELATED | (CS.REPLY if d else 0)

    def _udp(self, c: Conn, new: bool, now: int) -> int:
        t = self.t
        if new:
            c.stream_ts = now + K.UDP_STREAM_AFTER_NS
        if c.status & K.ST_SEEN_REPLY:
            extra, stream = t[K.T_UDP], False
            if now - c.stream_ts > 0:
                extra = t[K.T_UDP_STREAM]
                stream = not (c.status & K.ST_ASSURED)
            c.deadline = now + extra
            if stream:
                c.status |= K.ST_ASSURED
        else:
            c.deadline = now + t[K.T_UDP]
        return 1

    # -- TCP -----------------------------------------------------------------------------------
    def _tcp_new(self, c: Conn, p: Pkt) -> bool:
        idx = conntrack_index(p.flags)
        ns = int(K.TCP_TRANSITIONS[0, idx, K.NONE])
        if ns >= K.S_MAX:
            return False
        end = self._end(p)
        s0 = c.seen[0]
        if ns == K.SYN_SENT:
            s0.td_end = end
            s0.td_maxwin = p.win or 1
            s0.td_maxend = end
            tcp_options(p.opts, s0)
        elif not self.loose:
            return False
        else:
            s0.td_end = end
            s0.td_maxwin = p.win or 1
            s0.td_maxend = (end + s0.td_maxwin) & M32
            c.seen[0].flags = c.seen[1].flags = K.SACK_PERM | K.BE_LIBERAL
        c.last_index = K.NONE_SET
        return True

    @staticmethod
    def _end(p: Pkt) -> int:
        return (p.seq + p.seglen + (1 if p.flags & K.TH_SYN else 0) + (1 if p.flags & K.TH_FIN else 0)) & M32

    def _established(self, c: Conn) -> bool:
        return c.state == K.ESTABLISHED and bool(c.status & K.ST_ASSURED)

    def _tcp(self, c: Conn, new: bool, d: int, p: Pkt, now: int) -> int:
        """1 accept (state updated), 0 accept (ignored), -2 reopen, -3 kill, 100+reason invalid."""
        if new and not self._tcp_new(c, p):
            return 100 + K.C_TCP_NEW
        t = self.t
        old = c.state
        idx = conntrack_index(p.flags)
        ns = int(K.TCP_TRANSITIONS[d, idx, old])
        seq, ackv = p.seq, p.ack
        skip_window = False
        if ns == K.SYN_SENT and old >= K.TIME_WAIT:
            if ((c.seen[d].flags | c.seen[1 - d].flags) & K.CLOSE_INIT) or (
                c.last_dir == d and c.last_index == K.RST_SET
            ):
                return -2
            ns = K.S_IGNORE
        if ns == K.S_IGNORE:
            if idx == K.SYNACK_SET and c.last_index == K.SYN_SET and c.last_dir != d and ackv == c.last_end:
                old, ns = K.SYN_SENT, K.SYN_RECV
                ld = c.seen[c.last_dir]
                ld.td_end = ld.td_maxend = c.last_end
                ld.td_maxwin = c.last_win or 1
                ld.td_scale = c.last_wscale
                c.last_flags &= ~K.EXP_CHALLENGE_ACK
                ld.flags = c.last_flags
                c.seen[d].reset()
            else:
                c.last_index, c.last_dir, c.last_seq = idx, d, seq
                c.last_end = self._end(p)
                c.last_win = p.win
                if idx == K.SYN_SET and d == 0:
                    c.last_flags = c.last_wscale = 0
                    tmp = Seen()
                    tcp_options(p.opts, tmp)
                    if tmp.flags & K.WINDOW_SCALE:
                        c.last_flags |= K.WINDOW_SCALE
                        c.last_wscale = tmp.td_scale
                    if tmp.flags & K.SACK_PERM:
                        c.last_flags |= K.SACK_PERM
                    if old == K.LAST_ACK:
                        c.last_flags |= K.EXP_CHALLENGE_ACK
                if old == K.SYN_SENT and idx == K.ACK_SET and d == 1:
                    c.last_ack = ackv
                self.counters[K.C_IGNORED] += 1
                return 0
        elif ns == K.S_MAX:
            return 100 + K.C_TCP_STATE
        elif ns == K.TIME_WAIT:
            if (
                old == K.LAST_ACK
                and idx == K.ACK_SET
                and c.last_dir != d
                and c.last_index == K.SYN_SET
                and c.last_flags & K.EXP_CHALLENGE_ACK
            ):
                c.last_flags &= ~K.EXP_CHALLENGE_ACK
                self.counters[K.C_IGNORED] += 1
                return 0
        elif ns == K.SYN_SENT2:
            c.last_flags |= K.SIMULTANEOUS_OPEN
        elif ns == K.SYN_RECV:
            if d == 1 and idx == K.ACK_SET and c.last_flags & K.SIMULTANEOUS_OPEN:
                ns = K.ESTABLISHED
        elif ns == K.CLOSE and idx == K.RST_SET:
            if c.state in (K.FIN_WAIT, K.LAST_ACK, K.TIME_WAIT, K.CLOSE, K.CLOSE_WAIT):
                skip_window = True
            else:
                other = c.seen[1 - d]
                done = False
                if other.flags & K.MAXACK_SET and c.last_index != K.SYN_SET:
                    if seq == 0 and not self._established(c):
                        done = True
                    elif before(seq, other.td_maxack) and not False:
                        return 100 + K.C_TCP_RST
                    elif not self._established(c) or seq == other.td_maxack:
                        done = True
                    elif c.last_index == K.ACK_SET and c.last_dir == d and seq == c.last_end:
                        done = True
                    else:
                        ns = old
                if not done:
                    if (
                        ((c.status & K.ST_SEEN_REPLY) and c.last_index == K.SYN_SET)
                        or (not (c.status & K.ST_ASSURED) and c.last_index == K.ACK_SET)
                    ) and ackv == c.last_end:
                        skip_window = True
                    elif (
                        old == K.SYN_SENT
                        and c.last_index == K.ACK_SET
                        and c.last_dir == 1
                        and seq == c.last_ack
                    ):
                        skip_window = True
        if not skip_window:
            res = self._in_window(c, d, idx, p)
            if res == 0:
                self.counters[K.C_IGNORED] += 1
                return 0
            if res < 0:
                self._handle_invalid(c, d, idx, now)
                return 100 + K.C_TCP_WINDOW
        c.last_index, c.last_dir = idx, d
        c.state = ns
        if old != ns and ns == K.FIN_WAIT:
            c.seen[d].flags |= K.CLOSE_INIT
        if c.retrans >= self.max_retrans and t[ns] > t[K.T_RETRANS]:
            timeout = t[K.T_RETRANS]
        elif idx == K.RST_SET:
            timeout = t[K.CLOSE]
        elif (c.seen[0].flags | c.seen[1].flags) & K.DATA_UNACKNOWLEDGED and t[ns] > t[K.T_UNACK]:
            timeout = t[K.T_UNACK]
        elif c.last_win == 0 and t[ns] > t[K.T_RETRANS]:
            timeout = t[K.T_RETRANS]
        else:
            timeout = t[ns]
        if not (c.status & K.ST_SEEN_REPLY):
            if p.flags & K.TH_RST:
                return -3
            if idx == K.SYN_SET and old == K.SYN_SENT:
                return 1
            if ns == K.ESTABLISHED and timeout > t[K.T_UNACK]:
                timeout = t[K.T_UNACK]
        elif not (c.status & K.ST_ASSURED) and old in (K.SYN_RECV, K.ESTABLISHED) and ns == K.ESTABLISHED:
            c.status |= K.ST_ASSURED
        c.deadline = now + timeout
        return 1

    def _handle_invalid(self, c: Conn, d: int, idx: int, now: int) -> None:
        if not (c.status & K.ST_ASSURED):
            return
        if idx not in (K.RST_SET, K.FIN_SET):
            return
        if c.last_dir != d and c.last_index in (K.FIN_SET, K.RST_SET):
            expires = c.deadline - now
            if expires < 120 * K.NS:
                return
            if expires > self.t[K.T_UNACK]:
                c.deadline = now + self.t[K.T_UNACK]
        else:
            c.last_index, c.last_dir = idx, d

    def _in_window(self, c: Conn, d: int, idx: int, p: Pkt) -> int:
        """1 accept, 0 ignore, -1 invalid (Linux's tcp_in_window)."""
        sender, receiver = c.seen[d], c.seen[1 - d]
        flags = p.flags
        syn, ackf, rst = flags & K.TH_SYN, flags & K.TH_ACK, flags & K.TH_RST
        seq = p.seq
        ack = sack = p.ack
        win_raw = win = p.win
        end = self._end(p)
        liberal = bool(sender.flags & K.BE_LIBERAL) or self.liberal
        if receiver.flags & K.SACK_PERM:
            sack = tcp_sack(p.opts, sack)
        if sender.td_maxwin == 0:
            if syn:
                self._init_sender(sender, receiver, p, end, win, d)
                if not ackf:
                    return 1
            else:
                sender.td_end = end
                swin = (win << sender.td_scale) & M32
                sender.td_maxwin = swin or 1
                sender.td_maxend = (end + sender.td_maxwin) & M32
                if receiver.td_maxwin == 0:
                    receiver.td_end = receiver.td_maxend = sack
                elif sack == (receiver.td_end + 1) & M32:
                    receiver.td_end = (receiver.td_end + 1) & M32
        elif syn and after(end, sender.td_end) and c.state in (K.SYN_SENT, K.SYN_RECV):
            self._init_sender(sender, receiver, p, end, win, d)
            if d == 1 and not ackf:
                return 1
        if not ackf:
            ack = sack = receiver.td_end
        elif (flags & (K.TH_ACK | K.TH_RST)) == (K.TH_ACK | K.TH_RST) and ack == 0:
            ack = sack = receiver.td_end
        if rst and seq == 0 and c.state == K.SYN_SENT:
            seq = end = sender.td_end
        maxack_win = sender.td_maxwin if sender.td_maxwin > K.MAXACKWINCONST else K.MAXACKWINCONST
        if not before(seq, (sender.td_maxend + 1) & M32):
            overshot = (end - sender.td_maxend + 1) & M32
            ack_ok = after(sack, (receiver.td_end - maxack_win - 1) & M32)
            in_recv_win = bool(receiver.td_maxwin) and after(
                end, (sender.td_end - receiver.td_maxwin - 1) & M32
            )
            if (
                in_recv_win
                and ack_ok
                and overshot <= receiver.td_maxwin
                and before(sack, (receiver.td_end + 1) & M32)
            ):
                sender.td_end = end
                sender.flags |= K.DATA_UNACKNOWLEDGED
                return 1 if liberal else 0
            return 1 if liberal else -1
        if not before(sack, (receiver.td_end + 1) & M32):
            return 1 if liberal else -1
        in_recv_win = (not receiver.td_maxwin) or after(end, (sender.td_end - receiver.td_maxwin - 1) & M32)
        if not in_recv_win:
            return 1 if liberal else 0
        if not after(sack, (receiver.td_end - maxack_win - 1) & M32):
            return 1 if liberal else 0
        if not syn:
            win = (win << sender.td_scale) & M32
        swin = (win + (sack - ack)) & M32
        if sender.td_maxwin < swin:
            sender.td_maxwin = swin
        if after(end, sender.td_end):
            sender.td_end = end
            sender.flags |= K.DATA_UNACKNOWLEDGED
        if ackf:
            if not (sender.flags & K.MAXACK_SET):
                sender.td_maxack = ack
                sender.flags |= K.MAXACK_SET
            elif after(ack, sender.td_maxack):
                sender.td_maxack = ack
        if receiver.td_maxwin != 0 and after(end, sender.td_maxend):
            receiver.td_maxwin = (receiver.td_maxwin + end - sender.td_maxend) & M32
        if after((sack + win) & M32, (receiver.td_maxend - 1) & M32):
            receiver.td_maxend = (sack + win) & M32
            if win == 0:
                receiver.td_maxend = (receiver.td_maxend + 1) & M32
        if ack == receiver.td_end:
            receiver.flags &= ~K.DATA_UNACKNOWLEDGED
        if idx == K.ACK_SET:
            if (
                c.last_dir == d
                and c.last_seq == seq
                and c.last_ack == ack
                and c.last_end == end
                and c.last_win == win_raw
            ):
                c.retrans = min(c.retrans + 1, 255)
            else:
                c.last_dir, c.last_seq, c.last_ack = d, seq, ack
                c.last_end, c.last_win = end, win_raw
                c.retrans = 0
        return 1

    @staticmethod
    def _init_sender(sender: Seen, receiver: Seen, p: Pkt, end: int, win: int, d: int) -> None:
        sender.td_end = sender.td_maxend = end
        sender.td_maxwin = win or 1
        tcp_options(p.opts, sender)
        if d == 1 and not (sender.flags & K.WINDOW_SCALE and receiver.flags & K.WINDOW_SCALE):
            sender.td_scale = receiver.td_scale = 0
