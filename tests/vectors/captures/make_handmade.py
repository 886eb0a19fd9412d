"""Hand-built pcapng variants (big-endian, two sections, tsresol/tsoffset, SPB, OPB, odd blocks)."""

import struct

from scapy.all import rdpcap

pk = [bytes(p) for p in rdpcap("src.pcap")]


def block(e, btype, body):
    body += b"\0" * (-len(body) % 4)
    n = 12 + len(body)
    return struct.pack(e + "II", btype, n) + body + struct.pack(e + "I", n)


def opt(e, code, val):
    return struct.pack(e + "HH", code, len(val)) + val + b"\0" * (-len(val) % 4)


def shb(e):
    return block(
        e,
        0x0A0D0D0A,
        struct.pack(e + "IHHq", 0x1A2B3C4D, 1, 0, -1) + opt(e, 1, b"hand made") + opt(e, 0, b""),
    )


def idb(e, lt, snap, opts=b""):
    return block(e, 1, struct.pack(e + "HHI", lt, 0, snap) + opts + (opt(e, 0, b"") if opts else b""))


def epb(e, ifc, ts, data, orig=None):
    return block(
        e,
        6,
        struct.pack(e + "IIIII", ifc, ts >> 32, ts & 0xFFFFFFFF, len(data), orig or len(data))
        + data
        + b"\0" * (-len(data) % 4)
        + opt(e, 1, b"pkt comment")
        + opt(e, 0, b""),
    )


def spb(e, data):
    return block(e, 3, struct.pack(e + "I", len(data)) + data)


def opb(e, ifc, ts, data):
    return block(
        e, 2, struct.pack(e + "HHIIII", ifc, 0, ts >> 32, ts & 0xFFFFFFFF, len(data), len(data)) + data
    )


# big-endian, one section, ms resolution with a 100 s offset, an ISB and a custom block between packets
e = ">"
out = shb(e) + idb(e, 1, 0, opt(e, 9, bytes([3])) + opt(e, 14, struct.pack(e + "q", 100)))
for i, p in enumerate(pk[:6]):
    out += epb(e, 0, 1_700_000_000_000 + i * 1500, p)
    if i == 2:
        out += block(e, 5, struct.pack(e + "III", 0, 0, 0))  # interface statistics
        out += block(e, 0x00000099, b"unknown kind")
open("be.pcapng", "wb").write(out)

# two sections, the second big-endian; binary resolution 2^-20; SPB and OPB; two interfaces
out = shb("<") + idb("<", 1, 65535, opt("<", 9, bytes([6])))
out += epb("<", 0, 1_700_000_000_000_000, pk[0]) + spb("<", pk[1])
out += shb(">") + idb(">", 1, 65535, opt(">", 9, bytes([0x94]))) + idb(">", 1, 128)
out += epb(">", 0, (1_700_000_005 << 20) | (1 << 19), pk[2]) + opb(">", 0, (1_700_000_006 << 20) | 3, pk[3])
out += epb(">", 1, 1_700_000_007_000_001, pk[4], orig=len(pk[4]) + 10)
open("sections.pcapng", "wb").write(out)
