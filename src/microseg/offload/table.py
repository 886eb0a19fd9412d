"""The fast-path flow table: finite capacity, finite insert rate, batch lookup kernel.

It stands for the flow table of a SmartNIC or an eBPF/TC fast path: flows that need no more
inspection are offloaded to it, and their packets then skip the slow path. Two limits make it
realistic and are reported: a capacity (default 500,000 flows) and an insert rate (default
7,000 inserts/s) enforced by a token bucket driven by packet timestamps, so results do not
depend on the speed of the machine replaying a capture. An insert beyond either is refused and
counted by reason (``rate``, ``capacity``, ``collision`` when the key's bucket is full).

Entries are keyed by the *flow key*: the cache key (:mod:`microseg.cache.key`) without TCP
flags and conntrack bits, one entry per direction. A lookup hit counts the packet and its
bytes on the fast path; packets carrying SYN, FIN or RST are never served by the fast path
(``exceptions``) so that conntrack still sees a flow open and close, as hardware conntrack
offloads do. Entries leave when conntrack ends the flow (:meth:`FastPathTable.remove`), after
an idle time (:meth:`FastPathTable.expire`), or on a policy change
(:meth:`FastPathTable.revalidate`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from ..cache import key as K
from ..cache.core import SlotTable, find_slot, remove_slots
from ..cache.emc import _rows
from ..cache.match import region_intersects
from ..lowlevel import bucket_base

# The flow key: everything but TCP flags (L4 bits 56-63) and conntrack state (CT bits 0-7).
FLOW_MASK = np.full(K.W, 0xFFFFFFFFFFFFFFFF, np.uint64)
FLOW_MASK[K.K_L4] = np.uint64(0x00FFFFFFFFFFFFFF)
FLOW_MASK[K.K_CT] = np.uint64(0xFFFFFFFFFFFFFF00)
_FLOW_SEED = 0x0FF1

COUNTERS = (
    "lookups",
    "hits",
    "hit_bytes",
    "bytes",
    "exceptions",
    "inserts",
    "refreshed",
    "refused_rate",
    "refused_capacity",
    "refused_collision",
    "removed",
    "expired",
    "invalidated",
)
(
    C_LOOKUPS,
    C_HITS,
    C_HIT_BYTES,
    C_BYTES,
    C_EXC,
    C_INSERTS,
    C_REFRESHED,
    C_REF_RATE,
    C_REF_CAP,
    C_REF_COLL,
    C_REMOVED,
    C_EXPIRED,
    C_INVALIDATED,
) = range(len(COUNTERS))
# offer outcomes
OFFER_OK, OFFER_PRESENT, OFFER_RATE, OFFER_CAPACITY, OFFER_COLLISION = 0, 1, 2, 3, 4
_TCP_EXC = np.uint64((0x02 | 0x01 | 0x04) << K.SH_TCP_FLAGS)  # SYN, FIN, RST


@njit(cache=True)
def flow_hashes(kmat, valid, fmask, out_keys, out_hash):
    """Flow keys (``kmat & fmask``) and their hashes."""
    for i in range(kmat.shape[0]):
        if not valid[i]:
            out_hash[i] = 0
            for w in range(K.W):
                out_keys[i, w] = 0
            continue
        for w in range(K.W):
            out_keys[i, w] = kmat[i, w] & fmask[w]
        out_hash[i] = K.hash_row(out_keys, i, _FLOW_SEED)


@njit(cache=True)
def _fp_lookup(
    fk,
    fh,
    valid,
    l4,
    wire_len,
    ts,
    keys,
    tag,
    mid,
    verdict,
    version,
    aux,
    stamp,
    pkts,
    byts,
    nb,
    ways,
    cur,
    hit,
    o_v,
    o_f,
    ctr,
):
    for i in range(fk.shape[0]):
        hit[i] = False
        ctr[C_LOOKUPS] += 1
        ctr[C_BYTES] += wire_len[i]
        if not valid[i]:
            continue
        s = find_slot(keys, tag, mid, nb, ways, fh[i], 0, fk[i])
        if s < 0 or version[s] != cur:
            continue
        if (l4[i] >> np.uint64(32)) & np.uint64(0xFF) == np.uint64(6) and l4[i] & _TCP_EXC:
            ctr[C_EXC] += 1
            continue
        hit[i] = True
        o_v[i] = verdict[s]
        o_f[i] = aux[s]
        stamp[s] = np.uint64(ts[i]) if ts[i] > 0 else stamp[s]
        pkts[s] += 1
        byts[s] += wire_len[i]
        ctr[C_HITS] += 1
        ctr[C_HIT_BYTES] += wire_len[i]


@njit(cache=True)
def _fp_offer(
    fk,
    fh,
    rows,
    v,
    f,
    ts,
    keys,
    tag,
    mid,
    verdict,
    version,
    aux,
    stamp,
    pkts,
    byts,
    nb,
    ways,
    cur,
    capacity,
    used,
    rate,
    burst,
    bucket,
    out,
    ctr,
):
    """Token bucket state ``bucket`` = [tokens, last_ts]; returns the new live count."""
    for j in range(rows.shape[0]):
        i = rows[j]
        t = ts[i]
        if t > bucket[1]:
            bucket[0] = min(burst, bucket[0] + (t - bucket[1]) * rate * 1e-9)
            bucket[1] = t
        s = find_slot(keys, tag, mid, nb, ways, fh[i], 0, fk[i])
        if s >= 0:
            verdict[s] = v[j]
            aux[s] = f[j]
            version[s] = cur
            stamp[s] = np.uint64(t)
            out[j] = OFFER_PRESENT
            ctr[C_REFRESHED] += 1
            continue
        if bucket[0] < 1.0:
            out[j] = OFFER_RATE
            ctr[C_REF_RATE] += 1
            continue
        if used >= capacity:
            out[j] = OFFER_CAPACITY
            ctr[C_REF_CAP] += 1
            continue
        base = bucket_base(fh[i], nb, ways)
        s = -1
        for q in range(base, base + ways):
            if tag[q] == np.uint64(0):
                s = q
                break
        if s < 0:
            out[j] = OFFER_COLLISION
            ctr[C_REF_COLL] += 1
            continue
        bucket[0] -= 1.0
        for w in range(K.W):
            keys[s, w] = fk[i, w]
        tag[s] = fh[i]
        mid[s] = 0
        verdict[s] = v[j]
        aux[s] = f[j]
        version[s] = cur
        stamp[s] = np.uint64(t)
        pkts[s] = 0
        byts[s] = 0
        used += 1
        out[j] = OFFER_OK
        ctr[C_INSERTS] += 1
    return used


@njit(cache=True)
def _fp_expire(tag, stamp, cutoff):
    n = 0
    for s in range(tag.shape[0]):
        if tag[s] != np.uint64(0) and stamp[s] < cutoff:
            tag[s] = 0
            n += 1
    return n


@njit(cache=True)
def _fp_revalidate(keys, tag, version, new_version, full, value, mask, sport, dport):
    one = np.empty((1, K.W), np.uint64)
    n = 0
    for s in range(tag.shape[0]):
        if tag[s] == np.uint64(0):
            continue
        for w in range(K.W):
            one[0, w] = keys[s, w]
        if region_intersects(one, full, 0, value, mask, sport, dport):
            tag[s] = 0
            n += 1
        else:
            version[s] = new_version
    return n


class FastPathTable:
    """Finite fast-path table (see module docstring)."""

    def __init__(
        self,
        capacity: int = 500_000,
        rate: float = 7000.0,
        burst: float | None = None,
        ways: int = 8,
        version: int = 0,
    ):
        if capacity <= 0 or rate <= 0:
            raise ValueError("capacity and rate must be positive")
        self.capacity = int(capacity)
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, self.rate / 100.0)
        self.t = SlotTable(int(capacity * 1.25) + 1, ways)
        self.pkts = np.zeros(self.t.capacity, np.int64)
        self.byts = np.zeros(self.t.capacity, np.int64)
        self.version = int(version)
        self.counters = np.zeros(len(COUNTERS), np.int64)
        self.bucket = np.array([self.burst, -1.0], np.float64)
        self.used = 0

    def flow_keys(self, kmat, valid):
        """``(flow_keys, flow_hashes)`` for cache keys."""
        n = kmat.shape[0]
        fk = np.empty((n, K.W), np.uint64)
        fh = np.empty(n, np.uint64)
        flow_hashes(kmat, valid, FLOW_MASK, fk, fh)
        return fk, fh

    def lookup(self, kmat, valid, wire_len, ts, flow=None):
        """Per packet ``(hit, verdict, flow_id)``; counts packets/bytes on the fast path.
        ``flow``: precomputed :meth:`flow_keys` result."""
        n = kmat.shape[0]
        fk, fh = self.flow_keys(kmat, valid) if flow is None else flow
        hit = np.empty(n, np.bool_)
        v = np.zeros(n, np.uint8)
        f = np.full(n, -1, np.int64)
        t = self.t
        _fp_lookup(
            fk,
            fh,
            valid,
            np.ascontiguousarray(kmat[:, K.K_L4]),
            np.asarray(wire_len, np.int64),
            np.asarray(ts, np.int64),
            t.keys,
            t.tag,
            t.mid,
            t.verdict,
            t.version,
            t.aux,
            t.stamp,
            self.pkts,
            self.byts,
            t.n_buckets,
            t.ways,
            np.uint32(self.version),
            hit,
            v,
            f,
            self.counters,
        )
        return hit, v, f

    def offer(self, kmat, valid, rows, verdict, flow, ts, flowkeys=None) -> np.ndarray:
        """Offer the chosen packets' flows (one row per flow is enough); returns the
        ``OFFER_*`` outcome per chosen row, in order."""
        rows = _rows(rows, kmat.shape[0])
        rows = rows[np.asarray(valid)[rows]]
        fk, fh = self.flow_keys(kmat, valid) if flowkeys is None else flowkeys
        out = np.empty(rows.shape[0], np.uint8)
        v = _per(verdict, rows, np.uint8)
        f = _per(flow, rows, np.int64)
        t = self.t
        self.used = int(
            _fp_offer(
                fk,
                fh,
                rows,
                v,
                f,
                np.asarray(ts, np.int64),
                t.keys,
                t.tag,
                t.mid,
                t.verdict,
                t.version,
                t.aux,
                t.stamp,
                self.pkts,
                self.byts,
                t.n_buckets,
                t.ways,
                np.uint32(self.version),
                self.capacity,
                self.used,
                self.rate,
                self.burst,
                self.bucket,
                out,
                self.counters,
            )
        )
        return out

    def remove(self, kmat, valid, rows=None) -> int:
        """Remove the flows of the given packets (conntrack ended them)."""
        rows = np.arange(kmat.shape[0]) if rows is None else _rows(rows, kmat.shape[0])
        rows = rows[np.asarray(valid)[rows]]
        fk, fh = self.flow_keys(kmat, valid)
        n = int(
            remove_slots(fk, fh, rows, self.t.keys, self.t.tag, self.t.mid, self.t.n_buckets, self.t.ways)
        )
        self.used -= n
        self.counters[C_REMOVED] += n
        return n

    def expire(self, now_ns: int, idle_ns: int) -> int:
        """Remove entries idle (no fast-path hit, no offer) for ``idle_ns`` or more."""
        n = int(_fp_expire(self.t.tag, self.t.stamp, np.uint64(max(0, int(now_ns) - int(idle_ns)))))
        self.used -= n
        self.counters[C_EXPIRED] += n
        return n

    def revalidate(self, new_version: int, changed=None) -> int:
        """Policy change: without ``changed`` remove every entry; with a
        :class:`~microseg.cache.match.RuleMatchTable` of changed rules remove the flows those
        rules can match and keep the rest. Returns the number removed."""
        self.version = int(new_version)
        if changed is None:
            n = self.used
            self.t.clear()
        else:
            n = int(
                _fp_revalidate(
                    self.t.keys,
                    self.t.tag,
                    self.t.version,
                    np.uint32(self.version),
                    FLOW_MASK.reshape(1, K.W),
                    *changed.arrays(),
                )
            )
        self.used -= n
        self.counters[C_INVALIDATED] += n
        return n

    def stats(self) -> dict:
        d: dict[str, Any] = {name: int(v) for name, v in zip(COUNTERS, self.counters)}
        d.update(
            occupancy=self.used,
            capacity=self.capacity,
            occupancy_share=self.used / self.capacity,
            rate=self.rate,
            burst=self.burst,
            packet_share=d["hits"] / d["lookups"] if d["lookups"] else 0.0,
            byte_share=d["hit_bytes"] / d["bytes"] if d["bytes"] else 0.0,
            refused={
                "rate": d["refused_rate"],
                "capacity": d["refused_capacity"],
                "collision": d["refused_collision"],
            },
        )
        return d


def _per(x, rows, dtype):
    x = np.asarray(x)
    if x.ndim == 0:
        return np.full(rows.shape[0], x, dtype)
    return np.ascontiguousarray(x[rows], dtype=dtype)
