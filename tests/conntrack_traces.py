"""Random packet traces for the conntrack tests: real packets (microseg.packet.build), parsed
by the real parser, mixing valid conversations with mangled sequence numbers, odd flags, TCP
options, ICMP errors, bad checksums and long pauses."""

from __future__ import annotations

import numpy as np

from microseg.packet import build as PB
from microseg.packet.batch import Batch
from microseg.packet.parse import parse

NS = 1_000_000_000
V4 = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
V6 = ["2001:db8::1", "2001:db8::2"]
FLAGS = [
    "S",
    "S",
    "SA",
    "SA",
    "A",
    "A",
    "A",
    "PA",
    "PA",
    "FA",
    "FA",
    "R",
    "RA",
    "F",
    "",
    "SF",
    "SR",
    "FPU",
    "SU",
    "AU",
    "SEC",
    "PAE",
]


def _opts(rng, seq):
    k = rng.integers(0, 7)
    if k == 0:  # MSS, window scale, SACK permitted
        return b"\x02\x04\x05\xb4" + b"\x03\x03" + bytes([int(rng.integers(0, 16))]) + b"\x04\x02\x01\x01"
    if k == 1:  # SACK block near the sequence space in use
        left = (seq + int(rng.integers(-3000, 3000))) & 0xFFFFFFFF
        right = (left + int(rng.integers(1, 200000))) & 0xFFFFFFFF
        return b"\x01\x01\x05\x0a" + left.to_bytes(4, "big") + right.to_bytes(4, "big")
    if k == 2:  # timestamps
        return b"\x01\x01\x08\x0a" + bytes(8)
    if k == 3:  # garbage
        return bytes(rng.integers(0, 256, int(rng.integers(1, 11)) * 4, dtype=np.uint8))
    return b""


def random_trace(seed: int, n: int = 300, nflows: int = 4):
    """(batch, keys) of ``n`` packets over ``nflows`` flows, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    flows = []
    for _ in range(nflows):
        v6 = rng.random() < 0.3
        hosts = V6 if v6 else V4
        a, b = rng.choice(len(hosts), 2, replace=False)
        proto = rng.choice(["tcp", "tcp", "tcp", "udp", "icmp"])
        flows.append(
            dict(
                a=hosts[a],
                b=hosts[b],
                sp=int(rng.integers(1024, 1100)),
                dp=int(rng.choice([80, 443, 53])),
                proto=proto,
                seq=[int(rng.integers(0, 1 << 32)), int(rng.integers(0, 1 << 32))],
                ident=int(rng.integers(0, 4)),
            )
        )
    pkts, ts, sent = [], [], []
    now = 1_000 * NS
    for _ in range(n):
        f = flows[int(rng.integers(0, nflows))]
        d = int(rng.integers(0, 2))
        src, dst = (f["a"], f["b"]) if d == 0 else (f["b"], f["a"])
        sp, dp = (f["sp"], f["dp"]) if d == 0 else (f["dp"], f["sp"])
        r = rng.random()
        if r < 0.06 and sent:
            # an ICMP error quoting an earlier packet, from its receiver or a router
            q = sent[int(rng.integers(0, len(sent)))]
            qsrc, qdst, qip = q
            esrc = qdst if rng.random() < 0.7 else ("10.9.9.9" if ":" not in qdst else "2001:db8::99")
            edst = qsrc if rng.random() < 0.9 else qdst
            if ":" in qdst:
                body = PB.icmpv6_error(1, 4, qip[:48], src=esrc, dst=edst)
                p = PB.ethernet(PB.ipv6(esrc, edst, 58, body))
            else:
                body = PB.icmp_error(int(rng.choice([3, 11])), 3, qip[:28])
                p = PB.ethernet(PB.ipv4(esrc, edst, 1, body))
        elif f["proto"] == "tcp":
            flags = FLAGS[int(rng.integers(0, len(FLAGS)))]
            seq = f["seq"][d] + int(
                rng.choice([0, 0, 0, 0, -1, 1, -70000, 10_000_000, int(rng.integers(0, 1 << 32))])
            )
            ack = f["seq"][1 - d] + int(rng.choice([0, 0, 0, 1, -1, 70000, int(rng.integers(0, 1 << 32))]))
            payload = bytes(int(rng.choice([0, 0, 0, 1, 100, 1400])))
            win = int(rng.choice([0, 1, 512, 29200, 65535]))
            opts = _opts(rng, seq & 0xFFFFFFFF)
            p = PB.tcp_packet(
                src,
                dst,
                sp,
                dp,
                payload,
                flags=flags,
                seq=seq & 0xFFFFFFFF,
                ack=ack & 0xFFFFFFFF,
                win=win,
                options=opts,
            )
            if seq == f["seq"][d] and rng.random() < 0.8:
                f["seq"][d] = (seq + len(payload) + ("S" in flags) + ("F" in flags)) & 0xFFFFFFFF
            if rng.random() < 0.03:  # corrupt the TCP checksum
                p = bytearray(p)
                off = 14 + (20 if ":" not in src else 40) + 16
                p[off] ^= 0x5A
                p = bytes(p)
        elif f["proto"] == "udp":
            p = PB.udp_packet(src, dst, sp, dp, bytes(int(rng.integers(0, 50))))
        else:
            p = PB.icmp_echo_packet(src, dst, ident=f["ident"], seq=int(rng.integers(0, 9)), reply=bool(d))
        ip = p[14:]
        sent.append((src, dst, ip))
        pkts.append(p)
        now += int(
            rng.choice(
                [0, 1_000_000, NS, 3 * NS, 35 * NS, 130 * NS, 400 * NS],
                p=[0.3, 0.3, 0.2, 0.1, 0.05, 0.03, 0.02],
            )
        )
        ts.append(now)
    batch = Batch.from_packets(pkts, ts=ts)
    return batch, parse(batch)
