"""Checksum helpers and the per-batch L4 checksum verdict, against scapy-computed checksums and
the Linux conntrack vector with a bad TCP checksum."""

from __future__ import annotations

import csv
import os
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment
from scapy.layers.l2 import Dot1Q, Ether
from scapy.layers.vxlan import VXLAN
from scapy.utils import checksum as scapy_checksum

from microseg.packet.batch import Batch
from microseg.packet.checksum import (
    csum_fold,
    csum_partial,
    inet_checksum,
    inet_sum,
    ipv4_header_checksum,
    l4_checksum_ok,
    l4_checksum_ok_ref,
    pseudo_header_sum,
)
from microseg.packet.parse import parse
from test_parse_corpus import mutate, templates
from test_parse_tunnels import jumbogram

VECTORS = os.path.join(os.path.dirname(__file__), "vectors", "conntrack")
M = "02:00:00:00:00:01"


def test_inet_checksum_matches_scapy_on_random_bytes():
    r = random.Random(5)
    for n in list(range(0, 70)) + [1499, 1500, 9001]:
        data = bytes(r.randrange(256) for _ in range(n))
        assert inet_checksum(data) == scapy_checksum(data)
        arr = np.frombuffer(data, np.uint8)
        for start in (0, 1, 3):
            if start <= n:
                want = ~inet_sum(data[start:]) & 0xFFFF if start < n else 0xFFFF
                assert ~csum_fold(csum_partial(arr, start, n, 0)) & 0xFFFF == want


def test_ipv4_header_checksum_matches_scapy():
    r = random.Random(6)
    for _ in range(50):
        opts = b"\x01" * (4 * r.randrange(0, 10))
        pkt = IP(
            src=f"10.{r.randrange(256)}.0.{r.randrange(256)}",
            dst="192.0.2.7",
            ttl=r.randrange(256),
            id=r.randrange(65536),
            options=opts,
        ) / (b"x" * r.randrange(40))
        raw = bytes(pkt)
        ihl = (raw[0] & 15) * 4
        assert ipv4_header_checksum(raw[:ihl]) == IP(raw).chksum


def _good_packets():
    r = random.Random(7)
    pay = lambda: bytes(r.randrange(256) for _ in range(r.randrange(0, 60)))  # noqa: E731
    a4, b4, a6, b6 = "10.1.2.3", "192.0.2.99", "2001:db8::1", "2001:db8:ff::2"
    return [
        Ether(dst=M) / IP(src=a4, dst=b4) / TCP(sport=1, dport=2, flags="PA", seq=9) / pay(),
        Ether(dst=M) / IP(src=a4, dst=b4, options=b"\x01\x01\x01\x01") / UDP(sport=3, dport=4) / pay(),
        Ether(dst=M) / IP(src=a4, dst=b4) / ICMP(type=8, id=4) / pay(),
        Ether(dst=M) / IP(src=a4, dst=b4) / ICMP(type=3, code=3) / IP(src=b4, dst=a4) / UDP(sport=4, dport=3),
        Ether(dst=M) / Dot1Q(vlan=3) / IPv6(src=a6, dst=b6) / TCP(sport=5, dport=6) / pay(),
        Ether(dst=M) / IPv6(src=a6, dst=b6) / IPv6ExtHdrDestOpt() / UDP(sport=7, dport=8) / pay(),
        Ether(dst=M) / IPv6(src=a6, dst=b6) / ICMPv6EchoRequest(id=3) / pay(),
        Ether(dst=M) / IPv6(src=a6, dst=b6) / IPv6ExtHdrFragment(offset=0, m=0) / TCP() / pay(),
        Ether(dst=M)
        / IP(src=a4, dst=b4)
        / UDP(sport=9, dport=4789)
        / VXLAN(vni=5)
        / Ether(dst=M)
        / IP(src="172.16.0.1", dst="172.16.0.2")
        / TCP(sport=10, dport=11)
        / pay(),
        Ether(dst=M) / IP(src=a4, dst=b4) / UDP(sport=9, dport=53) / pay() / (b"\0" * 3),
    ]


def _check_field(raw: bytes, keys, i: int) -> int:
    """Byte offset of the L4 checksum field of packet i (inner packet for tunnels)."""
    l4, proto = int(keys.l4_off[i]), int(keys.proto[i])
    return l4 + {6: 16, 17: 6, 1: 2, 58: 2}[proto]


def test_l4_checksum_ok_on_scapy_packets_and_their_damage():
    pk = [bytes(p) for p in _good_packets()]
    keys = parse(Batch.from_packets(pk))
    assert (keys.error == 0).all()
    assert l4_checksum_ok(Batch.from_packets(pk), keys).all()
    bad = []
    for i, raw in enumerate(pk):
        at = _check_field(raw, keys, i)
        b = bytearray(raw)
        b[at + 1] ^= 0x01  # wrong checksum
        bad.append(bytes(b))
        b = bytearray(raw)
        b[int(keys.l4_off[i]) + 1] ^= 0x40  # damaged header byte, checksum kept
        bad.append(bytes(b))
    batch = Batch.from_packets(bad)
    k2 = parse(batch)
    ok = l4_checksum_ok(batch, k2)
    assert not ok.any()
    assert (l4_checksum_ok_ref(batch, k2) == ok).all()


def test_value_agrees_with_scapy_pseudo_header_checksum():
    """Zero the checksum, let scapy recompute it, and compute it ourselves from the bytes."""
    for p in _good_packets():
        raw = bytes(p)
        keys = parse(Batch.from_packets([raw]))
        l3, l4, proto = int(keys.l3_off[0]), int(keys.l4_off[0]), int(keys.proto[0])
        at = _check_field(raw, keys, 0)
        ver = int(keys.ip_ver[0])
        end = l3 + (int(keys.ip_len[0]) if ver == 4 else 40 + int.from_bytes(raw[l3 + 4 : l3 + 6], "big"))
        if proto == 17:
            end = l4 + int.from_bytes(raw[l4 + 4 : l4 + 6], "big")
        seg = bytearray(raw[l4:end])
        seg[at - l4 : at - l4 + 2] = b"\0\0"
        if ver == 4 and proto == 1:
            ours = inet_checksum(seg)
        elif ver == 4:
            ours = inet_checksum(
                seg, pseudo_header_sum(raw[l3 + 12 : l3 + 16], raw[l3 + 16 : l3 + 20], proto, len(seg))
            )
        else:
            ours = inet_checksum(
                seg, pseudo_header_sum(raw[l3 + 8 : l3 + 24], raw[l3 + 24 : l3 + 40], proto, len(seg))
            )
        if proto == 17 and ours == 0:
            ours = 0xFFFF
        assert ours == int.from_bytes(raw[at : at + 2], "big"), p.summary()


def test_udp_zero_checksum_ok_over_ipv4_only():
    v4 = bytearray(bytes(Ether(dst=M) / IP() / UDP(sport=1, dport=2) / b"abc"))
    v6 = bytearray(bytes(Ether(dst=M) / IPv6() / UDP(sport=1, dport=2) / b"abc"))
    v4[14 + 20 + 6 : 14 + 20 + 8] = b"\0\0"
    v6[14 + 40 + 6 : 14 + 40 + 8] = b"\0\0"
    batch = Batch.from_packets([bytes(v4), bytes(v6)])
    assert l4_checksum_ok(batch, parse(batch)).tolist() == [True, False]


def test_fragments_and_non_ip_have_nothing_to_fail_and_errors_never_pass():
    pk = [
        bytes(Ether(dst=M) / IP(flags="MF") / UDP() / (b"x" * 30)),
        bytes(Ether(dst=M) / IP(frag=3) / (b"x" * 30)),
        bytes(Ether(dst=M, type=0x88CC) / (b"x" * 30)),
        bytes(Ether(dst=M) / IP() / TCP())[:40],
    ]  # truncated: parse error
    batch = Batch.from_packets(pk)
    assert l4_checksum_ok(batch, parse(batch)).tolist() == [True, True, True, False]


def test_kernel_matches_reference_on_damaged_corpus():
    rng = np.random.default_rng(3)
    corpus = [p for p, lt in templates(seed=8, rounds=2) if lt == 1]
    pk = [mutate(corpus[int(i)], 1, rng) for i in rng.integers(0, len(corpus), 6000)] + corpus
    batch = Batch.from_packets(pk)
    keys = parse(batch)
    ok = l4_checksum_ok(batch, keys)
    assert (ok == l4_checksum_ok_ref(batch, keys)).all()
    assert 0 < ok.sum() < len(pk)


def test_keys_from_another_batch_are_refused_or_bounded():
    a = Batch.from_packets([bytes(Ether(dst=M) / IP() / TCP() / (b"x" * 900))])
    b = Batch.from_packets([bytes(Ether(dst=M) / IP() / TCP())])
    with pytest.raises(ValueError):
        l4_checksum_ok(Batch.from_packets([]), parse(a))
    assert l4_checksum_ok(b, parse(a)).tolist() == [False]  # offsets beyond b: no overread


def test_linux_conntrack_vector_bad_checksum():
    from microseg.io.pcap import read_capture

    batch = read_capture(os.path.join(VECTORS, "tcp_bad_checksum.pcap"))
    with open(os.path.join(VECTORS, "tcp_bad_checksum.csv")) as f:
        states = [row["state"] for row in csv.DictReader(f)]
    ok = l4_checksum_ok(batch, parse(batch))
    assert [not x for x in ok.tolist()] == [s == "invalid" for s in states]


# ---------------------------------------------------------------------------------------------
# the 8-byte summation against a plain statement of RFC 1071
# ---------------------------------------------------------------------------------------------
def rfc1071_sum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 section 4.1, word by word: big-endian 16-bit words, an odd last byte padded
    with zero, carries folded back in."""
    s = initial
    for j in range(0, len(data) - 1, 2):
        s += (data[j] << 8) | data[j + 1]
    if len(data) & 1:
        s += data[-1] << 8
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


_bytes = st.one_of(
    st.binary(max_size=9000),
    st.integers(0, 9000).map(lambda n: b"\xff" * n),  # every step carries
    st.integers(0, 9000).map(lambda n: b"\0" * n),
    st.tuples(st.integers(0, 9000), st.integers(0, 2**32 - 1)).map(
        lambda t: np.random.default_rng(t[1]).integers(0, 256, t[0], dtype=np.uint8).tobytes()
    ),
)


@settings(max_examples=300, deadline=None)
@given(_bytes, st.integers(0, 15), st.integers(0, 23), st.sampled_from([0, 1, 0xFFFF, 0x1234567, 2**40 + 5]))
def test_csum_partial_matches_rfc1071_at_any_length_and_alignment(data, shift, pad, acc):
    """Lengths 0..9000 at every start offset modulo 8 and every buffer alignment; the sum
    continued from a partial one, as the pseudo-header's is."""
    buf = np.zeros(shift + pad + len(data) + 16, np.uint8)[shift:]  # start off the allocation's alignment
    buf[pad : pad + len(data)] = np.frombuffer(data, np.uint8)
    buf[pad + len(data) :] = 0xA5  # bytes past the end must not be read
    assert csum_fold(csum_partial(buf, pad, pad + len(data), acc)) == rfc1071_sum(data, acc)
    assert inet_sum(data, acc) == rfc1071_sum(data, acc)


def _segments(rng, n_bytes: int):
    """Well-formed packets of every kind the verdict checks, ``n_bytes`` of payload."""
    pay = rng.integers(0, 256, n_bytes, dtype=np.uint8).tobytes()
    a4, b4, a6, b6 = "10.1.2.3", "192.0.2.99", "2001:db8::1", "2001:db8:ff::2"
    pay4 = pay[: 65535 - 60]
    return [
        Ether(dst=M) / IP(src=a4, dst=b4) / TCP(sport=1, dport=2, flags="PA") / pay4,
        Ether(dst=M) / IP(src=a4, dst=b4) / UDP(sport=3, dport=4) / pay4,
        Ether(dst=M) / IP(src=a4, dst=b4) / ICMP(type=8, id=4) / pay4,
        Ether(dst=M) / IPv6(src=a6, dst=b6) / TCP(sport=5, dport=6) / pay4,
        Ether(dst=M) / IPv6(src=a6, dst=b6) / UDP(sport=7, dport=8) / pay4,
        Ether(dst=M) / IPv6(src=a6, dst=b6) / ICMPv6EchoRequest(id=3) / pay4,
    ]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 9000), st.integers(0, 7))
def test_l4_checksum_ok_matches_reference_on_random_lengths_truncations_and_jumbograms(seed, n_bytes, lead):
    """Packets of 0..9000 payload bytes at every alignment in the batch's buffer, whole,
    damaged (one flipped bit: never ok) and snapped (F2_TRUNCATED: not judged), and RFC 2675
    jumbograms beside them, against the plain-Python verdict and the expected one."""
    rng = np.random.default_rng(seed)
    filler = bytes(Ether(dst=M, type=0x88CC)) + b"\0" * lead  # shifts every later packet's offset
    pk, wl, want = [filler], [len(filler)], [True]  # not IP: nothing to verify
    jumbo_pay = 65_536 + int(rng.integers(0, 3000))
    for raw in [bytes(p) for p in _segments(rng, n_bytes)] + [
        jumbogram(jumbo_pay),
        jumbogram(jumbo_pay, True),
    ]:
        pk.append(raw)
        wl.append(len(raw))
        want.append(True)
        bad = bytearray(raw)
        at = 14 + 40 + 8 if len(raw) > 65_000 else len(raw) - 1 - int(rng.integers(0, max(1, n_bytes)))
        bad[at] ^= 1 << int(rng.integers(0, 8))
        pk.append(bytes(bad))
        wl.append(len(bad))
        want.append(False)
        cut = int(rng.integers(14 + 60 + 8, len(raw))) if len(raw) > 14 + 60 + 9 else None
        if cut is not None:
            pk.append(raw[:cut])
            wl.append(len(raw))
            want.append(True)
    batch = Batch.from_packets(pk, wire_len=np.array(wl))
    keys = parse(batch)
    ok = l4_checksum_ok(batch, keys)
    assert ok.tolist() == l4_checksum_ok_ref(batch, keys).tolist()
    assert ok.tolist() == want
