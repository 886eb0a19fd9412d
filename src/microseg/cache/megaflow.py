"""Megaflow cache: wildcarded entries, one hash lookup per distinct mask (tuple-space search).

Like the dpcls of Open vSwitch's userspace datapath: every entry is ``(mask id, key & mask)
-> (verdict, rule index, policy version)``; a lookup tries the active masks in order of their
hit counts, one hash probe each, until one hits. Masks are interned (at most ``max_masks``
distinct ones) and reference-counted, so a mask leaves the lookup order with its last entry.

The mask of an entry must make it safe: every packet that agrees with the packet that
installed it under the mask must get the same classification. :func:`megaflow_masks` in
:mod:`microseg.cache.match` derives such masks from the rule set; the slow path calls it (or
the classifier's own wildcard tracking) and passes the masks to :meth:`MegaflowCache.insert`::

    res = mf.lookup(kmat, valid)                      # after an EMC miss
    winner, masks = megaflow_masks(table, kmat, miss_mask)
    mf.insert(kmat, masks, rows, verdict, rule)

Versioning and revalidation work as in :mod:`microseg.cache.emc`; revalidation tests each
entry's whole region ``{q : q & M == k}`` against the changed rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numba import njit

from .core import INS_EVICTED, INS_STALE, INS_UPDATED, SlotTable, find_slot, insert_slot, revalidate_slots
from .emc import CacheResult, _per_row, _rows, _rule_map
from .key import W, hash_keys, hash_masked

if TYPE_CHECKING:
    from .match import RuleMatchTable

COUNTERS = (
    "hits",
    "misses",
    "stale",
    "uncacheable",
    "inserts",
    "updates",
    "evictions",
    "stale_replaced",
    "mask_probes",
    "mask_table_full",
    "revalidated_kept",
    "revalidated_dropped",
    "flushes",
)
(
    C_HITS,
    C_MISSES,
    C_STALE,
    C_UNCACHEABLE,
    C_INSERTS,
    C_UPDATES,
    C_EVICTIONS,
    C_STALE_REPLACED,
    C_PROBES,
    C_MASK_FULL,
    C_KEPT,
    C_DROPPED,
    C_FLUSHES,
) = range(len(COUNTERS))


@njit(cache=True)
def _mf_lookup(
    kmat,
    valid,
    masks,
    order,
    n_active,
    mask_hits,
    keys,
    tag,
    mid,
    verdict,
    rule,
    version,
    aux,
    stamp,
    nb,
    ways,
    cur,
    clock,
    hit,
    o_v,
    o_r,
    ctr,
):
    tmp = np.empty(W, np.uint64)
    for i in range(kmat.shape[0]):
        hit[i] = False
        if not valid[i]:
            ctr[C_UNCACHEABLE] += 1
            continue
        for j in range(n_active):
            m = order[j]
            for w in range(W):
                tmp[w] = kmat[i, w] & masks[m, w]
            h = hash_masked(kmat, i, masks, m, m)
            ctr[C_PROBES] += 1
            s = find_slot(keys, tag, mid, nb, ways, h, m, tmp)
            if s >= 0:
                if version[s] == cur:
                    hit[i] = True
                    o_v[i] = verdict[s]
                    o_r[i] = rule[s]
                    stamp[s] = clock
                    mask_hits[m] += 1
                    break
                ctr[C_STALE] += 1
        if hit[i]:
            ctr[C_HITS] += 1
        else:
            ctr[C_MISSES] += 1


@njit(cache=True)
def _mf_insert(
    kmat,
    rows,
    row_mid,
    v,
    r,
    ver,
    masks,
    refs,
    keys,
    tag,
    mid,
    verdict,
    rule,
    version,
    aux,
    stamp,
    nb,
    ways,
    cur,
    clock,
    ctr,
):
    tmp = np.empty(W, np.uint64)
    for j in range(rows.shape[0]):
        i = rows[j]
        m = row_mid[j]
        if m < 0:
            continue
        for w in range(W):
            tmp[w] = kmat[i, w] & masks[m, w]
        h = hash_masked(kmat, i, masks, m, m)
        _, outcome, prev = insert_slot(
            keys,
            tag,
            mid,
            verdict,
            rule,
            version,
            aux,
            stamp,
            nb,
            ways,
            h,
            m,
            tmp,
            v[j],
            r[j],
            ver,
            -1,
            clock,
            cur,
        )
        if outcome == INS_UPDATED:
            ctr[C_UPDATES] += 1
            continue
        ctr[C_INSERTS] += 1
        refs[m] += 1
        if prev >= 0:
            refs[prev] -= 1
        if outcome == INS_EVICTED:
            ctr[C_EVICTIONS] += 1
        elif outcome == INS_STALE:
            ctr[C_STALE_REPLACED] += 1


class MegaflowCache:
    """Tuple-space megaflow cache (see module docstring)."""

    def __init__(self, entries: int = 65536, ways: int = 8, max_masks: int = 512, version: int = 0):
        self.t = SlotTable(entries, ways)
        self.version = int(version)
        self.max_masks = int(max_masks)
        self.masks = np.zeros((self.max_masks, W), np.uint64)
        self.refs = np.zeros(self.max_masks, np.int64)
        self.mask_hits = np.zeros(self.max_masks, np.int64)
        self.order = np.zeros(self.max_masks, np.int32)
        self.n_active = 0
        self._ids: dict[bytes, int] = {}
        self._dirty = False
        self._since_sort = 0
        self.counters = np.zeros(len(COUNTERS), np.int64)
        self._clock = 1

    @property
    def capacity(self) -> int:
        return self.t.capacity

    def lookup(self, kmat, valid) -> CacheResult:
        n = kmat.shape[0]
        res = CacheResult(
            np.empty(n, np.bool_), np.zeros(n, np.uint8), np.full(n, -1, np.int32), np.full(n, -1, np.int64)
        )
        t = self.t
        _mf_lookup(
            kmat,
            valid,
            self.masks,
            self.order,
            self.n_active,
            self.mask_hits,
            *t.arrays(),
            t.n_buckets,
            t.ways,
            np.uint32(self.version),
            np.uint64(self._clock),
            res.hit,
            res.verdict,
            res.rule,
            self.counters,
        )
        self._clock += 1
        return res

    def _intern(self, masks: np.ndarray) -> np.ndarray:
        """Mask id per row (-1 where the mask table is full)."""
        mh = hash_keys(masks)
        uh, first, inv = np.unique(mh, return_index=True, return_inverse=True)
        ids = np.empty(len(uh), np.int32)
        for u in range(len(uh)):
            row = masks[first[u]]
            b = row.tobytes()
            mid = self._ids.get(b)
            if mid is None:
                taken = set(self._ids.values())
                mid = next((int(f) for f in np.flatnonzero(self.refs == 0) if int(f) not in taken), -1)
                if mid >= 0:
                    self.masks[mid] = row
                    self.mask_hits[mid] = 0
                    self._ids[b] = mid
                    self._dirty = True
            ids[u] = mid
        out = ids[np.asarray(inv).reshape(-1)]
        # distinct masks with equal hashes (vanishingly rare): intern those rows one by one
        same = np.flatnonzero(out >= 0)
        if same.size and not np.array_equal(self.masks[out[same]], masks[same]):
            for j in same:
                if not np.array_equal(self.masks[out[j]], masks[j]):
                    out[j] = self._intern_one(masks[j])
        return out

    def _intern_one(self, row) -> int:
        b = row.tobytes()
        if b in self._ids:
            return self._ids[b]
        taken = set(self._ids.values())
        mid = next((int(f) for f in np.flatnonzero(self.refs == 0) if int(f) not in taken), -1)
        if mid >= 0:
            self.masks[mid] = row
            self.mask_hits[mid] = 0
            self._ids[b] = mid
            self._dirty = True
        return mid

    def _refresh(self, force: bool = False) -> None:
        """Forget masks without entries; order the rest by hit count (most hit first). Runs
        when the mask set changed, and every 32 calls to keep the order current."""
        self._since_sort += 1
        if not (
            force
            or self._dirty
            or self._since_sort >= 32
            or np.any(self.refs[self.order[: self.n_active]] <= 0)
        ):
            return
        self._dirty = False
        self._since_sort = 0
        for b, mid in list(self._ids.items()):
            if self.refs[mid] <= 0:
                del self._ids[b]
                self.refs[mid] = 0
        live = np.fromiter(self._ids.values(), np.int32, len(self._ids))
        live = live[np.argsort(-self.mask_hits[live], kind="stable")]
        self.n_active = len(live)
        self.order[: self.n_active] = live

    def insert(self, kmat, masks, rows, verdict, rule, valid=None, version=None) -> None:
        """Insert entries for the chosen packets: ``masks`` is ``(n, W)`` (batch-indexed, as
        :func:`~microseg.cache.match.megaflow_masks` returns); other arguments as in
        :meth:`ExactMatchCache.insert`."""
        rows = _rows(rows, kmat.shape[0])
        if valid is not None:
            rows = rows[np.asarray(valid)[rows]]
        if rows.size == 0:
            return
        row_mid = self._intern(np.ascontiguousarray(masks[rows]))
        self.counters[C_MASK_FULL] += int(np.count_nonzero(row_mid < 0))
        t = self.t
        ver = self.version if version is None else int(version)
        _mf_insert(
            kmat,
            rows,
            row_mid,
            _per_row(verdict, rows, np.uint8),
            _per_row(rule, rows, np.int32, -1),
            np.uint32(ver),
            self.masks,
            self.refs,
            *t.arrays(),
            t.n_buckets,
            t.ways,
            np.uint32(self.version),
            np.uint64(self._clock),
            self.counters,
        )
        self._clock += 1
        self._refresh()

    def insert_masked(self, kmat, mask, rows, verdict, rule, version=None) -> None:
        """As :meth:`insert` for rows that share one wildcard ``mask`` (``W`` words): the mask
        is interned once, not per row. ``verdict``/``rule`` are indexed like ``kmat``."""
        rows = _rows(rows, kmat.shape[0])
        if rows.size == 0:
            return
        mid = self._intern_one(np.ascontiguousarray(mask, np.uint64))
        if mid < 0:
            self.counters[C_MASK_FULL] += int(rows.size)
            return
        t = self.t
        ver = self.version if version is None else int(version)
        _mf_insert(
            kmat,
            rows,
            np.full(rows.shape[0], mid, np.int32),
            _per_row(verdict, rows, np.uint8),
            _per_row(rule, rows, np.int32, -1),
            np.uint32(ver),
            self.masks,
            self.refs,
            *t.arrays(),
            t.n_buckets,
            t.ways,
            np.uint32(self.version),
            np.uint64(self._clock),
            self.counters,
        )
        self._clock += 1
        self._refresh()

    def revalidate(
        self, new_version: int, changed: RuleMatchTable | None = None, rule_map=None
    ) -> tuple[int, int]:
        """As :meth:`ExactMatchCache.revalidate`, over each entry's wildcarded region."""
        old, self.version = self.version, int(new_version)
        t = self.t
        if changed is None:
            dropped = t.used()
            t.clear()
            self.refs[:] = 0
            self._refresh(force=True)
            self.counters[C_FLUSHES] += 1
            self.counters[C_DROPPED] += dropped
            return 0, dropped
        per_mid = np.zeros(self.max_masks, np.int64)
        kept, dropped = revalidate_slots(
            t.keys,
            t.tag,
            t.mid,
            t.version,
            t.rule,
            self.masks,
            np.uint32(old),
            np.uint32(self.version),
            *changed.arrays(),
            _rule_map(rule_map),
            per_mid,
        )
        self.refs -= per_mid
        self._refresh(force=True)
        self.counters[C_KEPT] += kept
        self.counters[C_DROPPED] += dropped
        return int(kept), int(dropped)

    def stats(self) -> dict:
        d: dict[str, int | float] = {name: int(v) for name, v in zip(COUNTERS, self.counters)}
        d.update(entries=self.t.used(), capacity=self.capacity, masks=self.n_active, version=self.version)
        looked = d["hits"] + d["misses"]
        d["hit_rate"] = d["hits"] / looked if looked else 0.0
        d["probes_per_lookup"] = d["mask_probes"] / looked if looked else 0.0
        return d
