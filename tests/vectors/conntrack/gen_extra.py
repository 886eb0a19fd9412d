"""Extra conntrack traces, beyond the original set: simultaneous open, window edges, RST and
close variants, reopening from TIME_WAIT, ICMP and ICMPv6 errors of every kind, generic
protocols. Writes OUTDIR/NAME.pcap; the states in NAME.csv come from running the kernel
oracle (see README.md) on each capture.

Usage: gen_extra.py OUTDIR
"""

import os
import sys

from scapy.all import (
    ICMP,
    IP,
    TCP,
    UDP,
    Ether,
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    ICMPv6PacketTooBig,
    ICMPv6TimeExceeded,
    IPv6,
    Raw,
    wrpcap,
)

A4, B4, C4, R4 = "192.0.2.10", "198.51.100.20", "198.51.100.77", "203.0.113.1"
A6, B6, R6 = "2001:db8:a::10", "2001:db8:b::20", "2001:db8:ff::1"


def eth():
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


class Conn:
    """Both sides' next sequence numbers, so segments are in window unless asked otherwise."""

    def __init__(self, a, b, sport, dport, v6=False, isn=1000, risn=5000, opts=None, ropts=None):
        self.a, self.b, self.sp, self.dp, self.v6 = a, b, sport, dport, v6
        self.seq = {0: isn, 1: risn}
        self.opts = {0: opts or [], 1: ropts or []}

    def ip(self, d):
        src, dst = (self.a, self.b) if d == 0 else (self.b, self.a)
        return IPv6(src=src, dst=dst, hlim=64) if self.v6 else IP(src=src, dst=dst, ttl=64)

    def pkt(self, d, flags, data=b"", seq=None, ack=None, win=64240, opts=None, advance=True):
        sp, dp = (self.sp, self.dp) if d == 0 else (self.dp, self.sp)
        s = self.seq[d] if seq is None else seq
        a = self.seq[1 - d] if ack is None else ack
        if opts is None:
            opts = self.opts[d] if "S" in flags else []
        p = (
            eth()
            / self.ip(d)
            / TCP(
                sport=sp,
                dport=dp,
                flags=flags,
                seq=s & 0xFFFFFFFF,
                ack=(a & 0xFFFFFFFF) if "A" in flags else 0,
                window=win,
                options=opts,
            )
        )
        if data:
            p = p / Raw(data)
        if seq is None and advance:
            self.seq[d] += len(data) + ("S" in flags) + ("F" in flags)
        return p

    def handshake(self):
        return [self.pkt(0, "S"), self.pkt(1, "SA"), self.pkt(0, "A")]


def udp(a, b, sp, dp, v6=False, n=20):
    ip = IPv6(src=a, dst=b, hlim=64) if v6 else IP(src=a, dst=b, ttl=64)
    return eth() / ip / UDP(sport=sp, dport=dp) / Raw(b"u" * n)


def quote4(p, n=28):
    return bytes(p[IP])[:n]


def cases():
    c = {}
    # simultaneous open: both sides send SYN, then both SYN/ACK, then ACKs
    t = Conn(A4, B4, 41000, 41001)
    s0, s1 = t.pkt(0, "S"), t.pkt(1, "S")
    c["tcp_simultaneous_open"] = [
        s0,
        s1,
        t.pkt(0, "SA", seq=t.seq[0] - 1),
        t.pkt(1, "SA", seq=t.seq[1] - 1),
        t.pkt(0, "A"),
        t.pkt(1, "A"),
        t.pkt(0, "PA", b"s" * 10),
        t.pkt(1, "A"),
    ]
    # window edges with scaling: the receiver's window is 1000 << 7 = 128000 bytes
    ws = [("MSS", 1460), ("WScale", 7), ("SAckOK", b"")]
    t = Conn(A4, B4, 41002, 80, isn=10, risn=900000, opts=ws, ropts=ws)
    edge = t.handshake()
    edge.append(t.pkt(1, "A", win=1000))  # server announces 1000 << 7
    right = t.seq[0] + 1000 * 128
    edge.append(t.pkt(0, "PA", b"e", seq=right))  # starts exactly at the right edge
    edge.append(t.pkt(0, "PA", b"f", seq=right + 1))  # one past it
    edge.append(t.pkt(0, "PA", b"g" * 100, seq=right - 50))  # overlaps the edge
    edge.append(t.pkt(0, "A", ack=t.seq[1] + 1))  # ACKs data never sent
    edge.append(t.pkt(0, "A", ack=t.seq[1] - 70000))  # ACK far below the window
    edge.append(t.pkt(0, "PA", b"h" * 20, seq=t.seq[0] - 200000))  # old data, below the window
    edge.append(t.pkt(1, "A", win=0))  # zero window
    edge.append(t.pkt(0, "PA", b"z"))  # window probe
    edge.append(t.pkt(0, "A", opts=[("SAck", (t.seq[1] - 10, t.seq[1]))]))  # SACK block
    edge += [t.pkt(0, "PA", b"ok" * 10), t.pkt(1, "A")]
    c["tcp_window_edges"] = edge
    # close variants: server closes first, FIN retransmitted, data after the close
    t = Conn(A4, B4, 41003, 80)
    cl = t.handshake() + [t.pkt(0, "PA", b"q" * 30), t.pkt(1, "PA", b"r" * 40)]
    fin = t.pkt(1, "FA")
    cl += [
        fin,
        fin.copy(),
        t.pkt(0, "A"),
        t.pkt(0, "FA"),
        t.pkt(1, "A"),
        t.pkt(0, "A"),
        t.pkt(0, "PA", b"late"),
    ]
    c["tcp_close_variants"] = cl
    # TIME_WAIT then a new SYN on the same ports reopens the connection
    t = Conn(A4, B4, 41004, 80)
    tw = t.handshake() + [t.pkt(0, "FA"), t.pkt(1, "FA"), t.pkt(0, "A")]
    t.seq = {0: 777777, 1: 888888}
    tw += [t.pkt(0, "S"), t.pkt(1, "SA"), t.pkt(0, "A")]
    c["tcp_timewait_reopen"] = tw
    # SYN inside an established connection, then a challenge ACK from the server, an RST
    t = Conn(A4, B4, 41005, 80)
    ch = t.handshake() + [t.pkt(0, "PA", b"d" * 10), t.pkt(1, "A")]
    ch += [
        t.pkt(0, "S", seq=123456, advance=False),
        t.pkt(1, "A"),
        t.pkt(0, "R", seq=t.seq[0]),
        t.pkt(0, "PA", b"after"),
    ]
    c["tcp_syn_in_established"] = ch
    # RST variants: refused connection (RST+ACK answering a SYN), RST with a stale sequence
    # number on an established connection, RST+ACK with ack 0
    t = Conn(A4, B4, 41006, 80)
    rv = [t.pkt(0, "S"), t.pkt(1, "RA", seq=0, ack=t.seq[0]), t.pkt(0, "A")]
    t = Conn(A4, B4, 41007, 80)
    rv += t.handshake() + [t.pkt(0, "PA", b"x" * 50), t.pkt(1, "A")]
    rv += [
        t.pkt(1, "R", seq=t.seq[1] - 100000),
        t.pkt(0, "PA", b"y"),
        t.pkt(1, "RA", ack=0),
        t.pkt(0, "PA", b"w"),
    ]
    c["tcp_rst_variants"] = rv
    # SYN/ACK before any SYN, answered; ACK-only flow opened mid-stream from the server side
    t = Conn(A4, B4, 41008, 80)
    c["tcp_pickup_variants"] = [
        t.pkt(1, "PA", b"m" * 30),
        t.pkt(0, "A"),
        t.pkt(1, "FA"),
        t.pkt(0, "FA"),
        t.pkt(1, "A"),
    ]
    # ICMPv4 errors: quoting TCP (related), frag needed, from a router, to the wrong host,
    # quoting an echo request, quoting an ICMP error (never related)
    t = Conn(A4, B4, 41009, 80)
    syn = t.pkt(0, "S")
    e = [syn, eth() / IP(src=B4, dst=A4, ttl=64) / ICMP(type=3, code=1) / quote4(syn)]
    e += [t.pkt(1, "SA"), t.pkt(0, "A")]
    data = t.pkt(0, "PA", b"p" * 1400)
    e += [
        data,
        eth() / IP(src=R4, dst=A4, ttl=64) / ICMP(type=3, code=4, nexthopmtu=1280) / quote4(data),
        eth() / IP(src=R4, dst=A4, ttl=64) / ICMP(type=11) / quote4(data),
    ]
    e += [eth() / IP(src=B4, dst=C4, ttl=64) / ICMP(type=3, code=3) / quote4(data)]
    echo = eth() / IP(src=A4, dst=B4, ttl=64) / ICMP(type=8, id=99, seq=1)
    e += [echo, eth() / IP(src=R4, dst=A4, ttl=64) / ICMP(type=11) / quote4(echo)]
    err = e[1]
    e += [eth() / IP(src=R4, dst=B4, ttl=64) / ICMP(type=11) / bytes(err[IP])[:48]]
    e += [t.pkt(1, "A")]
    c["icmp_errors"] = e
    # other ICMP messages: timestamp request/reply, address mask, router advertisement (not
    # trackable), an unknown type, echo with a nonzero code
    o = [
        eth() / IP(src=A4, dst=B4, ttl=64) / ICMP(type=13, id=5),
        eth() / IP(src=B4, dst=A4, ttl=64) / ICMP(type=14, id=5),
        eth() / IP(src=A4, dst=B4, ttl=64) / ICMP(type=17, id=6),
        eth() / IP(src=A4, dst=B4, ttl=64) / ICMP(type=9),
        eth() / IP(src=A4, dst=B4, ttl=64) / ICMP(type=42),
        eth() / IP(src=A4, dst=B4, ttl=64) / ICMP(type=8, code=1, id=7),
        eth() / IP(src=B4, dst=A4, ttl=64) / ICMP(type=0, code=1, id=7),
        eth() / IP(src=B4, dst=A4, ttl=64) / ICMP(type=0, code=0, id=7),
    ]
    bad = eth() / IP(src=A4, dst=B4, ttl=64) / ICMP(type=8, id=8, chksum=0x1234)
    o.append(bad)
    c["icmp_other"] = o
    # ICMPv6 errors: packet too big quoting TCP, time exceeded quoting UDP, unreachable quoting
    # an echo request, one quoting an unknown flow, an unanswered echo reply, and neighbour
    # solicitation (never tracked)
    t = Conn(A6, B6, 42000, 443, v6=True)
    big = t.pkt(0, "PA", b"b" * 1300)
    q6 = udp(A6, B6, 6000, 7000, v6=True)
    ereq = eth() / IPv6(src=A6, dst=B6, hlim=64) / ICMPv6EchoRequest(id=4, seq=1)
    unk = udp(A6, B6, 6001, 7001, v6=True)
    v = t.handshake() + [
        big,
        eth() / IPv6(src=R6, dst=A6, hlim=64) / ICMPv6PacketTooBig(mtu=1280) / bytes(big[IPv6])[:1232],
        q6,
        eth() / IPv6(src=R6, dst=A6, hlim=64) / ICMPv6TimeExceeded() / bytes(q6[IPv6])[:48],
        ereq,
        eth() / IPv6(src=B6, dst=A6, hlim=64) / ICMPv6DestUnreach(code=1) / bytes(ereq[IPv6])[:48],
        eth() / IPv6(src=B6, dst=A6, hlim=64) / ICMPv6DestUnreach(code=4) / bytes(unk[IPv6])[:48],
        eth() / IPv6(src=B6, dst=A6, hlim=64) / ICMPv6EchoReply(id=77, seq=1),
        eth() / IPv6(src=B6, dst="ff02::1:ff00:10", hlim=255) / ICMPv6ND_NS(tgt=A6),
        eth() / IPv6(src=B6, dst=A6, hlim=64) / ICMPv6EchoReply(id=4, seq=1),
    ]
    c["v6_icmp_errors"] = v
    # UDP corner cases and a protocol conntrack tracks generically (ESP)
    good = udp(A4, B4, 7100, 7200)
    zero = udp(A4, B4, 7101, 7200)
    zero[UDP].chksum = 0
    badc = udp(A4, B4, 7102, 7200)
    badc[UDP].chksum = 0xBEEF
    esp = lambda s, d, spi: (
        eth() / IP(src=s, dst=d, ttl=64, proto=50) / Raw(spi.to_bytes(4, "big") + b"\0\0\0\1" + b"e" * 32)
    )
    esp6 = lambda s, d, spi: (
        eth() / IPv6(src=s, dst=d, hlim=64, nh=50) / Raw(spi.to_bytes(4, "big") + b"\0\0\0\1" + b"e" * 32)
    )
    c["udp_generic"] = [
        good,
        udp(B4, A4, 7200, 7100),
        zero,
        badc,
        udp(B4, A4, 7200, 7102),
        udp(A4, B4, 7103, 4789, n=30),
        udp(B4, A4, 4789, 7103, n=30),
        esp(A4, B4, 0x100),
        esp(B4, A4, 0x200),
        esp(A4, B4, 0x101),
        esp6(A6, B6, 0x300),
        esp6(B6, A6, 0x301),
    ]
    return c


if __name__ == "__main__":
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for name, pk in cases().items():
        wrpcap(os.path.join(out, name + ".pcap"), pk)
        print(name, len(pk))
