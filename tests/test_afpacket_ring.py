"""The receive rings' walks on synthetic rings (no root needed): the TPACKET_V2 walk follows
the kernel's slot order (frame i of block i // per_block), wraps at the ring's end, stops at
the first frame the kernel still owns and at the caller's limit, and reads the tpacket2_hdr
fields where the kernel puts them."""

from __future__ import annotations

import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from microseg.io.afpacket import walk_frames

BLOCK, FRAME, BLOCKS = 8192, 2048, 3
PER = BLOCK // FRAME
N = PER * BLOCKS


def _ring(user: set[int]):
    ring = np.zeros(BLOCK * BLOCKS, np.uint8)
    for i in range(N):
        base = (i // PER) * BLOCK + (i % PER) * FRAME
        hdr = struct.pack(
            "<IIIHHIIHH", 1 if i in user else 0, 100 + i, 60 + i, 80, 94, 1_700_000_000 + i, i, i & 0xFFF, 0
        )
        ring[base : base + len(hdr)] = np.frombuffer(hdr, np.uint8)
    return ring


def _walk(ring, start, limit):
    cols = [np.zeros(64, t) for t in (np.int64, np.int32, np.int32, np.int64, np.uint32, np.uint32)]
    slots = np.zeros(64, np.int64)
    n = walk_frames(ring, start, N, limit, PER, BLOCK, FRAME, *cols, slots)
    return n, cols, slots


@settings(max_examples=200, deadline=None)
@given(st.integers(0, N - 1), st.integers(0, N), st.integers(1, N + 3))
def test_v2_walk_follows_slots_wraps_and_stops(start, ready, limit):
    user = {(start + k) % N for k in range(ready)}
    n, (off, ln, wl, ts, status, vlan), slots = _walk(_ring(user), start, limit)
    assert n == min(ready, limit, N)
    for k in range(n):
        i = (start + k) % N
        base = (i // PER) * BLOCK + (i % PER) * FRAME
        assert slots[k] == base and off[k] == base + 80
        assert (ln[k], wl[k], status[k], vlan[k]) == (60 + i, 100 + i, 1, i & 0xFFF)
        assert ts[k] == (1_700_000_000 + i) * 1_000_000_000 + i
