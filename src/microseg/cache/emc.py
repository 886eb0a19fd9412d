"""Exact-match cache (EMC): full flow key -> (verdict, rule index, policy version, flow id).

Like the EMC of Open vSwitch's userspace datapath: one hash lookup per packet, a fixed-size
table (default 8192 entries, 4-way set-associative), entries replaced on collision (empty,
then stale, then least recently used). Sans-IO, batch in, arrays out::

    kmat, hashes, valid = build_keys(keys, batch.port)      # microseg.cache.key
    res = emc.lookup(kmat, hashes, valid)                   # res.hit, res.verdict, res.rule, res.flow
    ...slow path for ~res.hit...
    emc.insert(kmat, hashes, rows, verdict, rule, flow)     # rows: bool mask or index array

Every entry carries the policy version it was computed under; a lookup treats an entry of
another version as a miss (counted ``stale``). :meth:`ExactMatchCache.revalidate` moves to a
new version, either dropping everything or, given the rules that changed, dropping only the
entries those rules can match and re-stamping the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numba import njit

from .core import (
    INS_EVICTED,
    INS_STALE,
    INS_UPDATED,
    SlotTable,
    find_slot,
    insert_slot,
    remove_slots,
    revalidate_slots,
)
from .key import M64, W

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
    C_KEPT,
    C_DROPPED,
    C_FLUSHES,
) = range(len(COUNTERS))


@dataclass
class CacheResult:
    """Per-packet lookup results (arrays of the batch's length)."""

    hit: np.ndarray  # bool
    verdict: np.ndarray  # uint8 (valid where hit)
    rule: np.ndarray  # int32 (valid where hit)
    flow: np.ndarray  # int64 (valid where hit; megaflow: -1)


@njit(cache=True)
def _emc_lookup(
    kmat,
    hashes,
    valid,
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
    o_f,
    ctr,
):
    for i in range(kmat.shape[0]):
        hit[i] = False
        o_v[i] = 0
        o_r[i] = -1
        o_f[i] = -1
        if not valid[i]:
            ctr[C_UNCACHEABLE] += 1
            continue
        s = find_slot(keys, tag, mid, nb, ways, hashes[i], 0, kmat[i])
        if s >= 0 and version[s] == cur:
            hit[i] = True
            o_v[i] = verdict[s]
            o_r[i] = rule[s]
            o_f[i] = aux[s]
            stamp[s] = clock
            ctr[C_HITS] += 1
        else:
            if s >= 0:
                ctr[C_STALE] += 1
            ctr[C_MISSES] += 1


@njit(cache=True)
def _emc_insert(
    kmat,
    hashes,
    sel,
    v,
    r,
    f,
    ver,
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
    for i in range(kmat.shape[0]):
        if not sel[i]:
            continue
        _, outcome, _ = insert_slot(
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
            hashes[i],
            0,
            kmat[i],
            v[i],
            r[i],
            ver,
            f[i],
            clock,
            cur,
        )
        if outcome == INS_UPDATED:
            ctr[C_UPDATES] += 1
        else:
            ctr[C_INSERTS] += 1
            if outcome == INS_EVICTED:
                ctr[C_EVICTIONS] += 1
            elif outcome == INS_STALE:
                ctr[C_STALE_REPLACED] += 1


def _rule_map(rule_map):
    return np.zeros(0, np.int32) if rule_map is None else np.ascontiguousarray(rule_map, np.int32)


def _rows(rows, n):
    rows = np.asarray(rows)
    if rows.dtype == np.bool_:
        return np.flatnonzero(rows[:n]).astype(np.int64)
    return rows.astype(np.int64, copy=False)


def _select(rows, n):
    """Bool mask of length ``n`` from a bool mask or an index array."""
    rows = np.asarray(rows)
    if rows.dtype == np.bool_:
        return rows[:n]
    sel = np.zeros(n, np.bool_)
    sel[rows.astype(np.int64, copy=False)] = True
    return sel


def _col(x, n, dtype, default=0):
    """A per-packet column of length ``n`` (scalar broadcast; no copy when already typed)."""
    if x is None:
        return np.full(n, default, dtype)
    x = np.asarray(x)
    if x.ndim == 0:
        return np.full(n, x, dtype)
    if x.shape[0] < n:
        raise ValueError(f"per-packet values have {x.shape[0]} rows, the batch has {n}")
    return np.ascontiguousarray(x[:n], dtype=dtype)


def _per_row(x, rows, dtype, default=0):
    if x is None:
        return np.full(rows.shape[0], default, dtype)
    x = np.asarray(x)
    if x.ndim == 0:
        return np.full(rows.shape[0], x, dtype)
    return np.ascontiguousarray(x[rows], dtype=dtype)


class ExactMatchCache:
    """Exact-match flow cache over :mod:`microseg.cache.key` rows (see module docstring)."""

    def __init__(self, entries: int = 8192, ways: int = 4, version: int = 0):
        self.t = SlotTable(entries, ways)
        self.version = int(version)
        self.counters = np.zeros(len(COUNTERS), np.int64)
        self._clock = 1
        self._full_mask = np.full((1, W), M64, np.uint64)

    @property
    def capacity(self) -> int:
        return self.t.capacity

    def lookup(self, kmat, hashes, valid) -> CacheResult:
        n = kmat.shape[0]
        res = CacheResult(
            np.empty(n, np.bool_), np.empty(n, np.uint8), np.empty(n, np.int32), np.empty(n, np.int64)
        )
        t = self.t
        _emc_lookup(
            kmat,
            hashes,
            valid,
            *t.arrays(),
            t.n_buckets,
            t.ways,
            np.uint32(self.version),
            np.uint64(self._clock),
            res.hit,
            res.verdict,
            res.rule,
            res.flow,
            self.counters,
        )
        self._clock += 1
        return res

    def insert(self, kmat, hashes, rows, verdict, rule, flow=None, valid=None, version=None) -> None:
        """Insert the chosen packets' keys. ``rows``: bool mask or indices into the batch;
        ``verdict``/``rule``/``flow``: scalars or per-packet arrays (batch-indexed). Invalid
        (uncacheable) rows are skipped when ``valid`` is given."""
        n = kmat.shape[0]
        sel = _select(rows, n)
        if valid is not None:
            sel = sel & np.asarray(valid[:n], np.bool_)
        t = self.t
        ver = self.version if version is None else int(version)
        _emc_insert(
            kmat,
            hashes,
            sel,
            _col(verdict, n, np.uint8),
            _col(rule, n, np.int32, -1),
            _col(flow, n, np.int64, -1),
            np.uint32(ver),
            *t.arrays(),
            t.n_buckets,
            t.ways,
            np.uint32(self.version),
            np.uint64(self._clock),
            self.counters,
        )
        self._clock += 1

    def revalidate(
        self, new_version: int, changed: RuleMatchTable | None = None, rule_map=None
    ) -> tuple[int, int]:
        """Move to ``new_version``. Without ``changed`` every entry is dropped. With
        ``changed`` (a :class:`~microseg.cache.match.RuleMatchTable` of the rules added, removed
        or modified, old and new forms: :func:`~microseg.cache.match.changed_rules`), entries no
        such rule can match are kept and re-stamped, the rest dropped; ``rule_map`` (old rule
        index -> new, :func:`~microseg.cache.match.rule_index_map`) renumbers kept entries'
        rule indices. Returns ``(kept, dropped)``."""
        old, self.version = self.version, int(new_version)
        t = self.t
        if changed is None:
            dropped = t.used()
            t.clear()
            self.counters[C_FLUSHES] += 1
            self.counters[C_DROPPED] += dropped
            return 0, dropped
        per_mid = np.zeros(1, np.int64)
        kept, dropped = revalidate_slots(
            t.keys,
            t.tag,
            t.mid,
            t.version,
            t.rule,
            self._full_mask,
            np.uint32(old),
            np.uint32(self.version),
            *changed.arrays(),
            _rule_map(rule_map),
            per_mid,
        )
        self.counters[C_KEPT] += kept
        self.counters[C_DROPPED] += dropped
        return int(kept), int(dropped)

    def remove(self, kmat, hashes, rows=None) -> int:
        """Drop the entries of the given keys (e.g. a flow conntrack ended); returns how many."""
        rows = np.arange(kmat.shape[0]) if rows is None else _rows(rows, kmat.shape[0])
        return int(
            remove_slots(
                kmat, hashes, rows, self.t.keys, self.t.tag, self.t.mid, self.t.n_buckets, self.t.ways
            )
        )

    def stats(self) -> dict:
        d: dict[str, int | float] = {name: int(v) for name, v in zip(COUNTERS, self.counters)}
        d.update(entries=self.t.used(), capacity=self.capacity, version=self.version)
        looked = d["hits"] + d["misses"]
        d["hit_rate"] = d["hits"] / looked if looked else 0.0
        return d


class EMCRef:
    """Plain-Python reference of :class:`ExactMatchCache` (dict + per-bucket order) for tests."""

    def __init__(self, entries: int = 8192, ways: int = 4, version: int = 0):
        t = SlotTable(entries, ways)
        self.nb, self.ways, self.version = t.n_buckets, t.ways, version
        self.buckets = [[None] * ways for _ in range(self.nb)]  # slot: [key, h, v, r, f, ver, stamp]
        self.clock = 1

    def _bucket(self, h):
        return self.buckets[h & (self.nb - 1)]

    def lookup(self, key, h):
        for e in self._bucket(h):
            if e is not None and e[0] == key:
                if e[5] == self.version:
                    e[6] = self.clock
                    return e[2], e[3], e[4]
                return None
        return None

    def insert(self, key, h, v, r, f):
        b = self._bucket(h)
        for e in b:
            if e is not None and e[0] == key:
                e[2:7] = [v, r, f, self.version, self.clock]
                return
        slots = range(self.ways)
        empty = [s for s in slots if b[s] is None]
        stale = [s for s in slots if b[s] is not None and b[s][5] != self.version]
        if empty:
            s = empty[0]
        elif stale:
            s = stale[0]
        else:
            s = min(slots, key=lambda s: (b[s][6], s))
        b[s] = [key, h, v, r, f, self.version, self.clock]
