"""Tuple space search in the style of Open vSwitch's classifier.

Rules are grouped by their mask (a "tuple": which bits of each key word they look at; port
ranges are split into prefixes first, as OVS does with port masks). Each tuple is an
open-addressing hash table from masked key to the best rule with that exact masked value.
Tuples are visited in order of the best rule they hold and the search stops as soon as a
tuple's best cannot beat the match found so far, so high-priority hits end early.

Adds and removes are incremental: they touch one hash slot per (tuple, prefix) and re-sort
the tuple order (O(T log T) for T tuples), with no rebuild. The union of the masks of the
tuples a lookup visited is an exact megaflow mask for that packet (OVS's wildcard
tracking): every key that agrees with it on those bits gets the same answer.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..lowlevel import mix_word
from .rules import K_L4, NW, Rule, RuleSet

_EMPTY, _LIVE, _TOMB = 0, 1, 2


def range_to_prefixes(lo: int, hi: int, bits: int = 16) -> list[tuple[int, int]]:
    """Cover ``[lo, hi]`` with aligned blocks: a list of (value, mask) over ``bits`` bits."""
    out = []
    full = (1 << bits) - 1
    while lo <= hi:
        size = lo & -lo if lo else 1 << bits
        while size > hi - lo + 1:
            size >>= 1
        out.append((lo, full ^ (size - 1)))
        lo += size
    return out


@njit(cache=True, inline="always")
def _hash(k0, k1, k2, k3, k4, k5, k6):
    h = np.uint64(0x243F6A8885A308D3)
    for x in (k0, k1, k2, k3, k4, k5, k6):
        h = mix_word(h, x)
    return h


@njit(cache=True)
def _find(pkey, pstate, base, cap, key):
    """Slot holding ``key`` in the table at ``base`` (size ``cap``), or -1-(free slot)."""
    h = _hash(key[0], key[1], key[2], key[3], key[4], key[5], key[6])
    m = np.uint64(cap - 1)
    s = np.int64(h & m)
    free = -1
    for _ in range(cap):
        st = pstate[base + s]
        if st == _EMPTY:
            return -1 - (s if free < 0 else free)
        if st == _TOMB:
            if free < 0:
                free = s
        else:
            eq = True
            for w in range(7):
                if pkey[base + s, w] != key[w]:
                    eq = False
                    break
            if eq:
                return s
        s = (s + 1) & (cap - 1)
    return -1 - free


@njit(cache=True)
def _lookup(K, n, tmask, tprio, tidx, tbase, tcap, order, nt, pkey, pstate, pprio, pidx, out, wc, track):
    for i in range(n):
        bp = np.int64(0)
        bi = np.int64(-1)
        for w in range(7):
            if track:
                wc[i, w] = 0
        for j in range(nt):
            t = order[j]
            if bi >= 0 and (tprio[t] < bp or (tprio[t] == bp and tidx[t] > bi)):
                break
            k0 = K[i, 0] & tmask[t, 0]
            k1 = K[i, 1] & tmask[t, 1]
            k2 = K[i, 2] & tmask[t, 2]
            k3 = K[i, 3] & tmask[t, 3]
            k4 = K[i, 4] & tmask[t, 4]
            k5 = K[i, 5] & tmask[t, 5]
            k6 = K[i, 6] & tmask[t, 6]
            if track:
                for w in range(7):
                    wc[i, w] |= tmask[t, w]
            cap = tcap[t]
            base = tbase[t]
            s = np.int64(_hash(k0, k1, k2, k3, k4, k5, k6) & np.uint64(cap - 1))
            for _ in range(cap):
                st = pstate[base + s]
                if st == _EMPTY:
                    break
                if st == _LIVE:
                    r = base + s
                    if (
                        pkey[r, 0] == k0
                        and pkey[r, 1] == k1
                        and pkey[r, 2] == k2
                        and pkey[r, 3] == k3
                        and pkey[r, 4] == k4
                        and pkey[r, 5] == k5
                        and pkey[r, 6] == k6
                    ):
                        p = pprio[r]
                        x = pidx[r]
                        if bi < 0 or p > bp or (p == bp and x < bi):
                            bp = p
                            bi = x
                        break
                s = (s + 1) & (cap - 1)
        out[i] = bi


@njit(cache=True)
def _rehash(pkey, pstate, pprio, pidx, obase, ocap, nbase, ncap):
    for s in range(ocap):
        if pstate[obase + s] == _LIVE:
            key = pkey[obase + s]
            f = _find(pkey, pstate, nbase, ncap, key)
            d = nbase + (-1 - f)
            pkey[d] = key
            pstate[d] = _LIVE
            pprio[d] = pprio[obase + s]
            pidx[d] = pidx[obase + s]
        pstate[obase + s] = _EMPTY


class TupleSpace:
    """Tuple space search classifier with incremental ``add``/``remove``.

    Rule indices are those of the rule set it was built from; ``add`` appends new ones.
    """

    algo = "tss"

    def __init__(self, ruleset: RuleSet):
        self.ruleset = ruleset
        self._prio: list[int] = []
        self._live: list[bool] = []
        self._tuples: dict[tuple, int] = {}
        self._tkeys: list[dict] = []  # per tuple: key -> sorted [(-prio, idx), ...]
        self._tb: list = []  # per tuple: best (-prio, idx) it holds
        self._vm: list = []  # per rule: (val, mask, ports)
        nt0 = 16
        self.tmask = np.zeros((nt0, NW), np.uint64)
        self.tprio = np.zeros(nt0, np.int64)
        self.tidx = np.zeros(nt0, np.int64)
        self.tbase = np.zeros(nt0, np.int64)
        self.tcap = np.zeros(nt0, np.int64)
        self.tused = np.zeros(nt0, np.int64)
        self._alloc = 0
        self._pool(1024)
        self.order = np.zeros(0, np.int32)
        for j in range(len(ruleset)):
            self._add(ruleset.val[j], ruleset.mask[j], ruleset.ports[j], int(ruleset.priority[j]))
        self._resort()

    # -- storage ----------------------------------------------------------------------------
    def _pool(self, cap):
        old = getattr(self, "pkey", None)
        pkey = np.zeros((cap, NW), np.uint64)
        pstate = np.zeros(cap, np.uint8)
        pprio = np.zeros(cap, np.int64)
        pidx = np.zeros(cap, np.int64)
        if old is not None:
            k = self._alloc
            pkey[:k], pstate[:k], pprio[:k], pidx[:k] = (
                self.pkey[:k],
                self.pstate[:k],
                self.pprio[:k],
                self.pidx[:k],
            )
        self.pkey, self.pstate, self.pprio, self.pidx = pkey, pstate, pprio, pidx

    def _region(self, cap):
        if self._alloc + cap > self.pkey.shape[0]:
            live = int(self.tcap[: len(self._tkeys)].sum())
            if live + cap <= self.pkey.shape[0] // 2:
                self._compact()
            if self._alloc + cap > self.pkey.shape[0]:
                self._pool(max(2 * self.pkey.shape[0], self._alloc + cap))
        b = self._alloc
        self._alloc += cap
        return b

    def _compact(self):
        nt = len(self._tkeys)
        old = (self.pkey, self.pstate, self.pprio, self.pidx)
        self.pkey = np.zeros_like(old[0])
        self.pstate = np.zeros_like(old[1])
        self.pprio = np.zeros_like(old[2])
        self.pidx = np.zeros_like(old[3])
        b = 0
        for t in range(nt):
            c = int(self.tcap[t])
            ob = int(self.tbase[t])
            for a, o in zip((self.pkey, self.pstate, self.pprio, self.pidx), old):
                a[b : b + c] = o[ob : ob + c]
            self.tbase[t] = b
            b += c
        self._alloc = b

    def _tuple(self, mask) -> int:
        mk = tuple(int(x) for x in mask)
        t = self._tuples.get(mk)
        if t is not None:
            return t
        t = len(self._tkeys)
        if t == self.tmask.shape[0]:
            for name in ("tmask", "tprio", "tidx", "tbase", "tcap", "tused"):
                a = getattr(self, name)
                b = np.zeros((2 * a.shape[0],) + a.shape[1:], a.dtype)
                b[: a.shape[0]] = a
                setattr(self, name, b)
        self._tuples[mk] = t
        self._tkeys.append({})
        self._tb.append(None)
        self.tmask[t] = mask
        self.tcap[t] = 8
        self.tbase[t] = self._region(8)
        self.tused[t] = 0
        return t

    def _grow(self, t):
        cap = int(self.tcap[t])
        live = len(self._tkeys[t])
        ncap = cap * 2 if live * 2 >= cap else cap
        nb = self._region(ncap)
        _rehash(self.pkey, self.pstate, self.pprio, self.pidx, int(self.tbase[t]), cap, nb, ncap)
        self.tbase[t], self.tcap[t], self.tused[t] = nb, ncap, live

    def _set(self, t, key, best):
        """Store ``best`` = (-prio, idx) for ``key`` in tuple ``t`` (None: delete)."""
        if best is not None and (self.tused[t] + 1) * 2 > self.tcap[t]:
            self._grow(t)
        base, cap = int(self.tbase[t]), int(self.tcap[t])
        f = _find(self.pkey, self.pstate, base, cap, key)
        if best is None:
            if f >= 0:
                self.pstate[base + f] = _TOMB
            return
        if f < 0:
            f = -1 - f
            if self.pstate[base + f] == _EMPTY:
                self.tused[t] += 1
            self.pkey[base + f] = key
            self.pstate[base + f] = _LIVE
        self.pprio[base + f] = -best[0]
        self.pidx[base + f] = best[1]

    @staticmethod
    def _expand(val, mask, ports):
        for sv, sm in range_to_prefixes(int(ports[0]), int(ports[1])):
            for dv, dm in range_to_prefixes(int(ports[2]), int(ports[3])):
                v = np.array(val, np.uint64)
                m = np.array(mask, np.uint64)
                v[K_L4] |= np.uint64(sv | dv << 16)
                m[K_L4] |= np.uint64(sm | dm << 16)
                yield v, m

    def _add(self, val, mask, ports, prio) -> int:
        idx = len(self._prio)
        self._prio.append(prio)
        self._live.append(True)
        self._vm.append((np.array(val, np.uint64), np.array(mask, np.uint64), tuple(ports)))
        ent = (-prio, idx)
        for v, m in self._expand(val, mask, ports):
            t = self._tuple(m)
            kt = tuple(int(x) for x in v)
            lst = self._tkeys[t].setdefault(kt, [])
            lst.append(ent)
            lst.sort()
            if lst[0] == ent:
                self._set(t, v, ent)
            if self._tb[t] is None or ent < self._tb[t]:
                self._tb[t] = ent
                self.tprio[t], self.tidx[t] = prio, idx
        return idx

    def _resort(self):
        nt = len(self._tkeys)
        live = np.array([t for t in range(nt) if self._tkeys[t]], np.int64)
        if live.size == 0:
            self.order = np.zeros(0, np.int32)
            return
        o = np.lexsort((self.tidx[live], -self.tprio[live]))
        self.order = live[o].astype(np.int32)

    # -- public -------------------------------------------------------------------------------
    def add(self, rule: Rule) -> int:
        """Insert ``rule``; returns its index (what ``classify`` reports for it)."""
        v, m = rule.words()
        idx = self._add(
            np.array(v, np.uint64),
            np.array(m, np.uint64),
            (rule.sport[0], rule.sport[1], rule.dport[0], rule.dport[1]),
            int(rule.priority),
        )
        self._resort()
        return idx

    def remove(self, idx: int) -> None:
        """Delete rule ``idx`` (as returned by ``add`` or its rule-set index)."""
        if not 0 <= idx < len(self._prio) or not self._live[idx]:
            raise KeyError(idx)
        self._live[idx] = False
        ent = (-self._prio[idx], idx)
        val, mask, ports = self._vm[idx]
        for v, m in self._expand(val, mask, ports):
            t = self._tuples[tuple(int(x) for x in m)]
            tk = self._tkeys[t]
            kt = tuple(int(x) for x in v)
            lst = tk[kt]
            first = lst[0] == ent
            lst.remove(ent)
            if not lst:
                del tk[kt]
                self._set(t, v, None)
            elif first:
                self._set(t, v, lst[0])
            if self._tb[t] == ent:
                self._tb[t] = min((lst[0] for lst in tk.values()), default=None)
                if self._tb[t] is not None:
                    self.tprio[t], self.tidx[t] = -self._tb[t][0], self._tb[t][1]
        self._resort()

    @property
    def n_tuples(self) -> int:
        return int(self.order.shape[0])

    def classify_keys(self, K: np.ndarray, wildcards: bool = False):
        """Best rule index per key (-1 none); with ``wildcards`` also the megaflow masks."""
        K = np.ascontiguousarray(K, np.uint64)
        n = K.shape[0]
        out = np.empty(n, np.int64)
        wc = np.zeros((n if wildcards else 1, NW), np.uint64)
        _lookup(
            K,
            n,
            self.tmask,
            self.tprio,
            self.tidx,
            self.tbase,
            self.tcap,
            self.order,
            self.order.shape[0],
            self.pkey,
            self.pstate,
            self.pprio,
            self.pidx,
            out,
            wc,
            wildcards,
        )
        out = out.astype(np.int32)
        return (out, wc) if wildcards else out

    def nbytes(self) -> int:
        return sum(
            a.nbytes
            for a in (
                self.tmask,
                self.tprio,
                self.tidx,
                self.tbase,
                self.tcap,
                self.tused,
                self.pkey,
                self.pstate,
                self.pprio,
                self.pidx,
                self.order,
            )
        )
