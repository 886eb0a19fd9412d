"""IP reassembly before conntrack (``microseg.agent.defrag``), held to scapy's fragmenters:
whatever order and duplicates the fragments come in, the datagram comes back byte for byte
as scapy built it before fragmenting; overlaps, timeouts and oversize datagrams are dropped
and counted."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6
from scapy.layers.l2 import Ether

from microseg.agent.defrag import Reassembler, fragment_fields

MACS = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}


def _v4(n: int, df=False):
    return (
        IP(src="10.0.0.1", dst="10.0.0.2", id=4242, flags="DF" if df else 0)
        / UDP(sport=5353, dport=53)
        / (bytes(range(256)) * (n // 256 + 1))[:n]
    )


def _feed(r, frames, zone=7, now=0.0):
    out = []
    for i, f in enumerate(frames):
        got = r.add(f, zone, i, now=now)
        if got is not None:
            out.append(got)
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(1500, 9000), st.sampled_from([64, 512, 1000, 1400]), st.randoms(), st.booleans())
def test_ipv4_fragments_reassemble_to_the_original(n, size, rnd, dup):
    pkt = _v4(n)
    frags = [bytes(Ether(**MACS) / f) for f in fragment(pkt, fragsize=size)]
    order = list(frags) + ([rnd.choice(frags)] if dup else [])
    rnd.shuffle(order)
    r = Reassembler()
    out = _feed(r, order)
    # a duplicate that comes after the datagram completed opens a new one, which times out
    assert len(out) == 1 and (dup or r.pending == {})
    whole, tokens = out[0]
    # scapy's reading of our datagram: the original, with a fresh header checksum
    ours = Ether(whole)[IP]
    assert bytes(ours[UDP]) == bytes(IP(bytes(pkt))[UDP])
    assert (ours.len, ours.flags, ours.frag, ours.id) == (len(bytes(pkt)), 0, 0, 4242)
    ref = IP(bytes(ours))
    del ref.chksum
    assert IP(bytes(ref)).chksum == ours.chksum
    assert len(set(tokens)) == len(tokens) == len(frags)  # each fragment once


@settings(max_examples=40, deadline=None)
@given(st.integers(1500, 9000), st.sampled_from([1280, 1400]), st.randoms())
def test_ipv6_fragments_reassemble_to_the_original(n, size, rnd):
    body = UDP(sport=5353, dport=53) / (b"q" * n)
    pkt = IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrFragment(id=77) / body
    frags = [bytes(Ether(**MACS) / f) for f in fragment6(pkt, size)]
    assert len(frags) > 1
    rnd.shuffle(frags)
    out = _feed(Reassembler(), frags)
    assert len(out) == 1
    ours = Ether(out[0][0])[IPv6]
    assert ours.nh == 17 and ours.plen == len(bytes(body))
    assert bytes(ours.payload) == bytes(IPv6(bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / body))[UDP])


def test_not_a_fragment_passes_alone():
    frame = bytes(Ether(**MACS) / _v4(100))
    assert fragment_fields(frame, 1) is None
    assert Reassembler().add(frame, 1, "t", now=0) == (frame, ["t"])


def test_overlap_drops_the_whole_datagram():
    frags = [bytes(Ether(**MACS) / f) for f in fragment(_v4(3000), fragsize=1000)]
    evil = Ether(frags[1])
    evil[IP].frag -= 1  # overlaps the first by 8 bytes
    del evil[IP].chksum
    r = Reassembler()
    assert _feed(r, [frags[0], bytes(evil)] + frags[1:]) == []
    assert r.drops["frag_overlap"] == 1


def test_timeout_and_room_and_size_limits():
    frags = [bytes(Ether(**MACS) / f) for f in fragment(_v4(3000), fragsize=1000)]
    r = Reassembler(timeout_s=30)
    assert r.add(frags[0], 1, 0, now=0.0) is None
    assert r.add(frags[1], 1, 1, now=31.0) is None  # the first one timed out: a new datagram
    assert r.drops["frag_timeout"] == 1
    small = Reassembler(max_bytes=1500)
    assert small.add(frags[0], 1, 0, now=0) is None
    assert small.add(bytes(Ether(**MACS) / fragment(_v4(3000), fragsize=1000)[0]), 2, 0, now=0) is None
    assert small.drops["frag_no_room"] == 1
    huge = Ether(**MACS) / IP(src="10.0.0.1", dst="10.0.0.2", id=1, frag=8189, proto=17) / (b"x" * 64)
    big = Reassembler()
    assert big.add(bytes(huge), 1, 0, now=0) is None
    assert big.drops["frag_too_big"] == 1


def test_zones_keep_datagrams_apart():
    frags = [bytes(Ether(**MACS) / f) for f in fragment(_v4(3000), fragsize=1000)]
    r = Reassembler()
    out = []
    for i, f in enumerate(frags):
        for zone in (1, 2):
            got = r.add(f, zone, (zone, i), now=0)
            if got:
                out.append(got)
    assert len(out) == 2 and {t[0] for _, toks in out for t in toks} == {1, 2}
    assert all(len({t[0] for t in toks}) == 1 for _, toks in out)
    random.seed(0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1500, 9000), st.sampled_from([576, 1000, 1396]), st.randoms())
def test_ipv4_fragmentation_for_a_smaller_path(n, mtu, rnd):
    """What a router does with a DF-clear packet too big for the next hop: fragments that fit,
    which scapy reassembles (and so do we) into the original; a fragment is fragmented again."""
    from scapy.layers.inet import defragment

    from microseg.agent.defrag import fragment_ipv4

    pkt = _v4(n)
    frame = bytes(Ether(**MACS) / pkt)
    frags = fragment_ipv4(frame, mtu)
    assert frags and all(len(f) - 14 <= mtu for f in frags)
    assert bytes(defragment([Ether(f)[IP] for f in frags])[0]) == bytes(IP(bytes(pkt)))
    # refragment the first of scapy's 1400-byte fragments: offsets and MF carry over
    first = bytes(Ether(**MACS) / fragment(pkt, fragsize=1400)[0])
    again = fragment_ipv4(first, 576) + [bytes(Ether(**MACS) / f) for f in fragment(pkt, fragsize=1400)[1:]]
    rnd.shuffle(again)
    out = _feed(Reassembler(), again)
    assert len(out) == 1 and bytes(Ether(out[0][0])[UDP]) == bytes(IP(bytes(pkt))[UDP])
    assert fragment_ipv4(bytes(Ether(**MACS) / _v4(n, df=True)), mtu) is None
