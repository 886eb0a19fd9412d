"""Set-associative hash table in NumPy arrays, shared by the caches and the offload table.

``ways`` slots per bucket, bucket = ``hash & (n_buckets - 1)``. A slot holds a key row of
``W`` words, its hash (0 = empty), a mask id (megaflow; 0 elsewhere), a verdict, a rule index,
the policy version it was computed under, an auxiliary ``int64`` (flow id) and a use stamp.
Insertion updates an equal entry in place, else fills an empty slot, else replaces a stale
one (older policy version), else evicts the least recently used one. No tombstones: removal
just clears the slot, so a table never degrades with churn.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..lowlevel import bucket_base, pow2_at_least
from .key import W
from .match import region_intersects

# insert outcomes
INS_UPDATED, INS_EMPTY, INS_STALE, INS_EVICTED = 0, 1, 2, 3


class SlotTable:
    """The arrays of one table (see module docstring), one array per field.

    (One record per slot was measured too: with the lookups' independent loads overlapping,
    it was no faster, on small tables or on a million slots, and took more memory.)
    """

    def __init__(self, entries: int, ways: int = 4):
        if entries <= 0 or ways <= 0:
            raise ValueError("table size and ways must be positive")
        self.ways = int(ways)
        self.n_buckets = pow2_at_least(max(1, -(-int(entries) // self.ways)))
        cap = self.n_buckets * self.ways
        self.keys = np.zeros((cap, W), np.uint64)
        self.tag = np.zeros(cap, np.uint64)
        self.mid = np.zeros(cap, np.int32)
        self.verdict = np.zeros(cap, np.uint8)
        self.rule = np.full(cap, -1, np.int32)
        self.version = np.zeros(cap, np.uint32)
        self.aux = np.zeros(cap, np.int64)
        self.stamp = np.zeros(cap, np.uint64)

    @property
    def capacity(self) -> int:
        return int(self.tag.shape[0])

    def arrays(
        self,
    ) -> tuple[
        np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray
    ]:
        return (self.keys, self.tag, self.mid, self.verdict, self.rule, self.version, self.aux, self.stamp)

    def used(self) -> int:
        return int(np.count_nonzero(self.tag))

    def clear(self) -> None:
        self.tag[:] = 0


@njit(cache=True, inline="always")
def find_slot(keys, tag, mid, nb, ways, h, m, krow):
    """Slot holding (hash h, mask id m, key krow), or -1."""
    base = bucket_base(h, nb, ways)
    for s in range(base, base + ways):
        if tag[s] == h and mid[s] == m:
            same = True
            for w in range(W):
                if keys[s, w] != krow[w]:
                    same = False
                    break
            if same:
                return s
    return -1


@njit(cache=True)
def remove_slots(kmat, hashes, rows, keys, tag, mid, nb, ways):
    """Clear the slots holding the keys of ``rows`` (mask id 0); returns how many were found.
    Shared by the exact-match cache, the fast-path table and the inspection hand-off."""
    n = 0
    for j in range(rows.shape[0]):
        i = rows[j]
        s = find_slot(keys, tag, mid, nb, ways, hashes[i], 0, kmat[i])
        if s >= 0:
            tag[s] = 0
            n += 1
    return n


@njit(cache=True)
def insert_slot(
    keys, tag, mid, verdict, rule, version, aux, stamp, nb, ways, h, m, krow, v, r, ver, a, clock, cur_version
):
    """Insert or update; returns (slot, outcome, previous mask id of a replaced entry)."""
    base = bucket_base(h, nb, ways)
    s = find_slot(keys, tag, mid, nb, ways, h, m, krow)
    outcome = INS_UPDATED
    prev = -1
    if s < 0:
        empty = -1
        stale = -1
        lru = base
        for t in range(base, base + ways):
            if tag[t] == np.uint64(0):
                if empty < 0:
                    empty = t
            elif version[t] != cur_version:
                if stale < 0:
                    stale = t
            if stamp[t] < stamp[lru]:
                lru = t
        if empty >= 0:
            s, outcome = empty, INS_EMPTY
        elif stale >= 0:
            s, outcome, prev = stale, INS_STALE, mid[stale]
        else:
            s, outcome, prev = lru, INS_EVICTED, mid[lru]
        for w in range(W):
            keys[s, w] = krow[w]
        tag[s] = h
        mid[s] = m
    verdict[s] = v
    rule[s] = r
    version[s] = ver
    aux[s] = a
    stamp[s] = clock
    return s, outcome, prev


@njit(cache=True)
def revalidate_slots(
    keys,
    tag,
    mid,
    version,
    rule,
    masks,
    old_version,
    new_version,
    value,
    mask,
    sport,
    dport,
    rule_map,
    dropped_mid_count,
):
    """Re-stamp entries of ``old_version`` whose region no changed rule can touch (and map
    their rule index through ``rule_map`` when it is not empty); clear the others, counting
    them per mask id. Returns (kept, dropped)."""
    kept = 0
    dropped = 0
    one = np.empty((1, W), np.uint64)
    om = np.empty((1, W), np.uint64)
    for s in range(tag.shape[0]):
        if tag[s] == np.uint64(0) or version[s] != old_version:
            continue
        for w in range(W):
            one[0, w] = keys[s, w]
            om[0, w] = masks[mid[s], w]
        if region_intersects(one, om, 0, value, mask, sport, dport):
            tag[s] = 0
            dropped_mid_count[mid[s]] += 1
            dropped += 1
        else:
            version[s] = new_version
            if rule_map.shape[0] > 0 and rule[s] >= 0:
                rule[s] = rule_map[rule[s]] if rule[s] < rule_map.shape[0] else -1
            kept += 1
    return kept, dropped
