"""The parser's fast path (Ethernet / IPv4 without options / TCP, captured whole) against the
plain-Python reference, on frames that sit on each edge of its conditions: every header byte it
tests changed (with the IPv4 checksum left wrong and made right again), lengths and data
offsets at their limits, Ethernet padding, truncated captures and snapped ones."""

from __future__ import annotations

import numpy as np

from microseg.packet import batch as B
from microseg.packet import build as PB
from microseg.packet.batch import Batch
from microseg.packet.parse import parse
from microseg.packet.parse_ref import parse_batch_ref
from test_parse_corpus import _fix_ipv4_checksum, assert_same


def _frames() -> list[bytes]:
    a, b = "10.1.2.3", "192.168.7.9"
    tcp = [
        PB.tcp(40000, 443, b"\0" * 10, src=a, dst=b),
        PB.tcp(1, 65535, b"", src=a, dst=b, flags="S"),
        PB.tcp(5, 6, b"x" * 3, src=a, dst=b, options=b"\x02\x04\x05\xb4" + b"\x01" * 8),
    ]
    out = [PB.ethernet(PB.ipv4(a, b, 6, t)) for t in tcp]
    out.append(out[0] + b"\0" * 6)  # Ethernet padding after the IP total length
    out.append(PB.ethernet(PB.ipv4(a, b, 17, PB.udp(1, 2, b"\0" * 18, src=a, dst=b))))
    return out


def _check(frames, wire_len=None):
    batch = Batch.from_packets(frames, wire_len=wire_len)
    assert_same(parse(batch), parse_batch_ref(batch), frames)


def test_fast_path_shape_equals_reference():
    frames = _frames()
    keys = parse(Batch.from_packets(frames))
    assert (keys.error == 0).all()
    _check(frames)


def test_every_tested_byte_changed():
    out = []
    for f in _frames():
        for pos in range(min(len(f), 60)):
            for v in {
                0,
                0xFF,
                f[pos] ^ 0x01,
                f[pos] ^ 0x10,
                f[pos] ^ 0x40,
                f[pos] ^ 0x80,
                0x45,
                0x46,
                6,
                0x50,
            }:
                g = bytearray(f)
                g[pos] = v
                out.append(bytes(g))
                _fix_ipv4_checksum(g, 14)
                out.append(bytes(g))
    _check(out)


def test_lengths_and_data_offsets_at_their_limits():
    out = []
    for f in _frames()[:3]:
        total = len(f) - 14
        for t in (0, 19, 20, 39, 40, 41, total - 1, total, total + 1, 0xFFFF):
            for doff in (0, 4, 5, 6, 15):
                g = bytearray(f)
                g[16], g[17] = t >> 8, t & 0xFF
                g[46] = (doff << 4) | (g[46] & 15)
                _fix_ipv4_checksum(g, 14)
                out.append(bytes(g))
    _check(out)


def test_truncated_and_snapped_captures():
    frames = _frames()
    cut = [f[:k] for f in frames for k in range(0, min(len(f), 60))]
    _check(cut)
    wire = np.array([len(f) + extra for f in frames for extra in (0, 1, 100)], np.int32)
    _check([f for f in frames for _ in range(3)], wire_len=wire)
    # a capture snapped inside the TCP header the fast path would read
    snapped = [f[:50] for f in frames]
    _check(snapped, wire_len=np.array([len(f) for f in frames], np.int32))


def test_other_link_types_take_the_general_path():
    f = _frames()[0]
    batch = Batch.from_packets([f[14:]], linktype=B.LINK_RAW)
    assert_same(parse(batch), parse_batch_ref(batch), [f[14:]])
