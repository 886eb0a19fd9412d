"""Megaflow masks from the rule set, linear classification and region tests on cache keys.

The classifier's :class:`~microseg.classify.rules.RuleSet` already compiles each rule to a
``(value, mask)`` pair over the packet key plus two port ranges. :class:`RuleMatchTable` holds
those arrays in priority order (row 0 wins), which is what the kernels here scan:

* :func:`megaflow_masks` -- per key, the best rule and a megaflow mask ``M`` such that every
  key ``q`` with ``q & M == k & M`` gets the same best rule (the safety property of a
  tuple-space cache). For the winner it adds the rule's mask and the largest aligned port
  block inside each of its port ranges; for every higher-priority rule that misses and is
  not already excluded by the bits collected so far, the one field that proves the miss at
  the lowest cost in new mask bits: an address prefix down to the first differing bit,
  widened to the next prefix length the rule set uses for that field (as OVS's prefix tries
  do; it keeps the number of distinct masks small), a port block wholly
  outside the range, or the rule's bits in another sub-field (protocol, ICMP type, ICMP code,
  TCP flags, tenant, ingress port, ethertype, conntrack state). Masks stay prefix-shaped per
  address and port field.
* :func:`classify` -- linear first match: the oracle the cache tests compare against.
* :func:`region_intersects` -- whether some key of a cache region ``{q : q & M == k}`` can
  match some rule of a table; revalidation keeps exactly the entries no changed rule touches.

Each kernel has a plain-Python reference (``*_ref``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from ..classify.rules import P_DPORT_HI, P_DPORT_LO, P_SPORT_HI, P_SPORT_LO, RuleSet
from . import key as K
from .key import M64, W

# Sub-fields chosen as a unit to prove that a rule misses (word, bits).
_SUB_WORD = np.array([K.K_L4, K.K_L4, K.K_L4, K.K_L4, K.K_META, K.K_META, K.K_META, K.K_CT], np.int64)
_SUB_BITS = np.array(
    [
        0xFF << K.SH_PROTO,
        0xFF << K.SH_ICMP_TYPE,
        0xFF << K.SH_ICMP_CODE,
        0xFF << K.SH_TCP_FLAGS,
        0xFFFFFFFF << K.SH_TENANT,
        0xFFFF << K.SH_IN_PORT,
        0xFFFF << K.SH_ETHERTYPE,
        M64,
    ],
    np.uint64,
)
M64_U = np.uint64(M64)


def _popcount_arr(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, np.uint64)
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1).astype(np.int64)


@dataclass
class RuleMatchTable:
    """A rule set's match arrays in priority order; ``rule_id[row]`` is the RuleSet index."""

    value: np.ndarray  # (R, W) uint64
    mask: np.ndarray  # (R, W) uint64 (port bits never set: ports are ranges)
    sport: np.ndarray  # (R, 2) int64 inclusive range
    dport: np.ndarray  # (R, 2) int64 inclusive range
    rule_id: np.ndarray  # (R,) int32
    src_lens: np.ndarray  # sorted distinct source prefix lengths (0-128)
    dst_lens: np.ndarray

    @classmethod
    def from_ruleset(cls, rs: RuleSet, rows=None) -> RuleMatchTable:
        """Priority-ordered table of ``rs`` (optionally only the rule indices ``rows``)."""
        order = np.asarray(rs.order, np.int64)
        if rows is not None:
            order = order[np.isin(order, np.asarray(rows, np.int64))]
        value = np.ascontiguousarray(rs.val[order])
        mask = np.ascontiguousarray(rs.mask[order])
        ports = rs.ports[order]
        lens = []
        for wh in (K.K_SRC_HI, K.K_DST_HI):
            plen = (
                _popcount_arr(rs.mask[:, wh]) + _popcount_arr(rs.mask[:, wh + 1])
                if len(rs)
                else np.zeros(0, np.int64)
            )
            lens.append(np.unique(plen).astype(np.int64))
        return cls(
            value,
            mask,
            np.ascontiguousarray(ports[:, [P_SPORT_LO, P_SPORT_HI]]),
            np.ascontiguousarray(ports[:, [P_DPORT_LO, P_DPORT_HI]]),
            order.astype(np.int32),
            lens[0],
            lens[1],
        )

    def __len__(self) -> int:
        return int(self.value.shape[0])

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.value, self.mask, self.sport, self.dport


def changed_rules(old: RuleSet, new: RuleSet) -> RuleMatchTable:
    """The rules that differ between two rule sets (removed, added or changed, both forms),
    as a table for ``revalidate``. Rules are compared by their match arrays and action;
    priority changes count as changes."""

    def sig(rs):
        rows = {}
        for i in range(len(rs)):
            s = (
                rs.val[i].tobytes(),
                rs.mask[i].tobytes(),
                rs.ports[i].tobytes(),
                int(rs.priority[i]),
                int(rs.action[i]),
            )
            rows[s] = rows.get(s, 0) + 1
        return rows

    a, b = sig(old), sig(new)
    diff = [s for s in set(a) | set(b) if a.get(s, 0) != b.get(s, 0)]
    n = len(diff)
    val = np.array([np.frombuffer(s[0], np.uint64) for s in diff], np.uint64).reshape(n, W)
    mask = np.array([np.frombuffer(s[1], np.uint64) for s in diff], np.uint64).reshape(n, W)
    ports = np.array([np.frombuffer(s[2], np.int64) for s in diff], np.int64).reshape(n, 4)
    return RuleMatchTable.from_ruleset(RuleSet.from_arrays(val, mask, ports, version=0))


def rule_index_map(old: RuleSet, new: RuleSet) -> np.ndarray:
    """``int32`` array: index in ``new`` of each rule of ``old`` with the same match arrays,
    priority and action (-1 when it is gone or changed); duplicates pair up in order."""
    pos: dict = {}
    for j in range(len(new)):
        s = (
            new.val[j].tobytes(),
            new.mask[j].tobytes(),
            new.ports[j].tobytes(),
            int(new.priority[j]),
            int(new.action[j]),
        )
        pos.setdefault(s, []).append(j)
    out = np.full(len(old), -1, np.int32)
    for i in range(len(old)):
        s = (
            old.val[i].tobytes(),
            old.mask[i].tobytes(),
            old.ports[i].tobytes(),
            int(old.priority[i]),
            int(old.action[i]),
        )
        if pos.get(s):
            out[i] = pos[s].pop(0)
    return out


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _sport_of(x):
    return np.int64((x >> np.uint64(K.SH_SPORT)) & np.uint64(0xFFFF))


@njit(cache=True, inline="always")
def _dport_of(x):
    return np.int64((x >> np.uint64(K.SH_DPORT)) & np.uint64(0xFFFF))


@njit(cache=True, inline="always")
def _row_matches(k, i, value, mask, sport, dport, r):
    for w in range(W):
        if (k[i, w] & mask[r, w]) != value[r, w]:
            return False
    sp = _sport_of(k[i, K.K_L4])
    if sp < sport[r, 0] or sp > sport[r, 1]:
        return False
    dp = _dport_of(k[i, K.K_L4])
    if dp < dport[r, 0] or dp > dport[r, 1]:
        return False
    return True


@njit(cache=True)
def classify_linear(k, valid, value, mask, sport, dport, out):
    """First matching row per valid key into ``out`` (-1: none or invalid)."""
    for i in range(k.shape[0]):
        out[i] = -1
        if not valid[i]:
            continue
        for r in range(value.shape[0]):
            if _row_matches(k, i, value, mask, sport, dport, r):
                out[i] = r
                break


_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


@njit(cache=True, inline="always")
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return np.int64((x * _H01) >> np.uint64(56))


@njit(cache=True, inline="always")
def _msb(x):
    """Index of the highest set bit of a non-zero uint64."""
    b = 0
    for sh in (32, 16, 8, 4, 2, 1):
        if x >> np.uint64(sh):
            x >>= np.uint64(sh)
            b += sh
    return b


@njit(cache=True, inline="always")
def _port_block_bits(x, lo, hi, inside, lens):
    """16-bit mask of the largest aligned block around port ``x`` wholly inside [lo, hi]
    (``inside``) or wholly outside it, its prefix length rounded up to one in ``lens``."""
    for L in range(17):
        span = (1 << (16 - L)) - 1
        b0 = x & ~span & 0xFFFF
        b1 = b0 | span
        if (inside and b0 >= lo and b1 <= hi) or (not inside and (b1 < lo or b0 > hi)):
            for j in range(lens.shape[0]):
                if lens[j] >= L:
                    return (0xFFFF ^ ((1 << (16 - lens[j])) - 1)) & 0xFFFF
            return (0xFFFF ^ span) & 0xFFFF
    return 0xFFFF


@njit(cache=True, inline="always")
def _plen_mask(plen):
    """(hi, lo) words of a 128-bit prefix mask of length ``plen``."""
    if plen <= 0:
        return np.uint64(0), np.uint64(0)
    if plen < 64:
        return M64_U ^ ((np.uint64(1) << np.uint64(64 - plen)) - np.uint64(1)), np.uint64(0)
    if plen == 64:
        return M64_U, np.uint64(0)
    if plen >= 128:
        return M64_U, M64_U
    return M64_U, M64_U ^ ((np.uint64(1) << np.uint64(128 - plen)) - np.uint64(1))


@njit(cache=True, inline="always")
def _addr_miss_bits(khi, klo, vhi, vlo, mhi, mlo, lens):
    """Prefix mask (hi, lo) proving the key misses the rule's address: down to the first
    differing bit under the rule's mask, widened to the next length in ``lens``; (0, 0) if the
    key does not differ."""
    d = (khi ^ vhi) & mhi
    if d:
        need = 64 - _msb(d)
    else:
        d = (klo ^ vlo) & mlo
        if not d:
            return np.uint64(0), np.uint64(0)
        need = 128 - _msb(d)
    for j in range(lens.shape[0]):
        if lens[j] >= need:
            return _plen_mask(lens[j])
    return _plen_mask(need)


@njit(cache=True)
def derive_masks(
    k, valid, value, mask, sport, dport, sub_word, sub_bits, src_lens, dst_lens, port_lens, winner, out
):
    """Winning row (``winner``, -1 none) and safe megaflow mask (``out``) per key."""
    n = k.shape[0]
    R = value.shape[0]
    m = np.zeros(W, np.uint64)
    for i in range(n):
        winner[i] = -1
        if not valid[i]:
            for w in range(W):
                out[i, w] = M64_U
            continue
        for w in range(W):
            m[w] = 0
        sp = _sport_of(k[i, K.K_L4])
        dp = _dport_of(k[i, K.K_L4])
        for r in range(R):
            # bits already in the mask that differ from the rule prove this miss for free
            proven = False
            for w in range(W):
                if ((k[i, w] ^ value[r, w]) & mask[r, w] & m[w]) != np.uint64(0):
                    proven = True
                    break
            if proven:
                continue
            if _row_matches(k, i, value, mask, sport, dport, r):
                winner[i] = r
                for w in range(W):
                    m[w] |= mask[r, w]
                if sport[r, 0] != 0 or sport[r, 1] != 0xFFFF:
                    m[K.K_L4] |= np.uint64(
                        _port_block_bits(sp, sport[r, 0], sport[r, 1], True, port_lens)
                    ) << np.uint64(K.SH_SPORT)
                if dport[r, 0] != 0 or dport[r, 1] != 0xFFFF:
                    m[K.K_L4] |= np.uint64(
                        _port_block_bits(dp, dport[r, 0], dport[r, 1], True, port_lens)
                    ) << np.uint64(K.SH_DPORT)
                break
            best_cost = 1 << 30
            best_w0 = -1
            best_b0 = np.uint64(0)
            best_w1 = -1
            best_b1 = np.uint64(0)
            for a in range(2):
                if best_cost == 0:
                    break
                wh = 2 * a
                bh, bl = _addr_miss_bits(
                    k[i, wh],
                    k[i, wh + 1],
                    value[r, wh],
                    value[r, wh + 1],
                    mask[r, wh],
                    mask[r, wh + 1],
                    src_lens if a == 0 else dst_lens,
                )
                if bh | bl:
                    c = _popcount(bh & ~m[wh]) + _popcount(bl & ~m[wh + 1])
                    if c < best_cost:
                        best_cost, best_w0, best_b0, best_w1, best_b1 = c, wh, bh, wh + 1, bl
            for s in range(sub_word.shape[0]):
                if best_cost == 0:
                    break
                w = sub_word[s]
                rb = mask[r, w] & sub_bits[s]
                if rb and ((k[i, w] ^ value[r, w]) & rb):
                    c = _popcount(rb & ~m[w])
                    if c < best_cost:
                        best_cost, best_w0, best_b0, best_w1, best_b1 = c, w, rb, -1, np.uint64(0)
            if best_cost > 0 and (sp < sport[r, 0] or sp > sport[r, 1]):
                b = np.uint64(_port_block_bits(sp, sport[r, 0], sport[r, 1], False, port_lens)) << np.uint64(
                    K.SH_SPORT
                )
                c = _popcount(b & ~m[K.K_L4])
                if c < best_cost:
                    best_cost, best_w0, best_b0, best_w1, best_b1 = c, K.K_L4, b, -1, np.uint64(0)
            if best_cost > 0 and (dp < dport[r, 0] or dp > dport[r, 1]):
                b = np.uint64(_port_block_bits(dp, dport[r, 0], dport[r, 1], False, port_lens)) << np.uint64(
                    K.SH_DPORT
                )
                c = _popcount(b & ~m[K.K_L4])
                if c < best_cost:
                    best_cost, best_w0, best_b0, best_w1, best_b1 = c, K.K_L4, b, -1, np.uint64(0)
            if best_w0 < 0:  # a miss on bits no field covers: fall back to exact
                for w in range(W):
                    m[w] = M64_U
                continue
            m[best_w0] |= best_b0
            if best_w1 >= 0:
                m[best_w1] |= best_b1
        for w in range(W):
            out[i, w] = m[w]


@njit(cache=True, inline="always")
def _range_overlap(kv, km, shift, lo, hi):
    v = np.int64((kv >> np.uint64(shift)) & np.uint64(0xFFFF))
    mm = np.int64((km >> np.uint64(shift)) & np.uint64(0xFFFF))
    a = v & mm
    b = a | (0xFFFF ^ mm)
    return a <= hi and b >= lo


@njit(cache=True)
def region_intersects(k, m, i, value, mask, sport, dport):
    """True if some key q with ``q & m[i] == k[i] & m[i]`` matches some row of the table
    (conservative where a port mask is not prefix-shaped: may answer True wrongly, never
    False wrongly)."""
    for r in range(value.shape[0]):
        hit = True
        for w in range(W):
            if ((k[i, w] ^ value[r, w]) & m[i, w] & mask[r, w]) != np.uint64(0):
                hit = False
                break
        if not hit:
            continue
        if not _range_overlap(k[i, K.K_L4], m[i, K.K_L4], K.SH_SPORT, sport[r, 0], sport[r, 1]):
            continue
        if not _range_overlap(k[i, K.K_L4], m[i, K.K_L4], K.SH_DPORT, dport[r, 0], dport[r, 1]):
            continue
        return True
    return False


def _rule_ids(t: RuleMatchTable, row: np.ndarray) -> np.ndarray:
    """RuleSet indices of table rows (-1 stays -1)."""
    out = np.full(row.shape[0], -1, np.int32)
    hit = row >= 0
    out[hit] = t.rule_id[row[hit]]
    return out


def _table(t) -> RuleMatchTable:
    return t if isinstance(t, RuleMatchTable) else RuleMatchTable.from_ruleset(t)


def classify(table, k, valid=None) -> np.ndarray:
    """Best rule per key as a RuleSet index (``int32``, -1 none): linear first match."""
    t = _table(table)
    valid = np.ones(k.shape[0], np.bool_) if valid is None else valid
    row = np.empty(k.shape[0], np.int32)
    classify_linear(np.ascontiguousarray(k, np.uint64), valid, *t.arrays(), row)
    return _rule_ids(t, row)


def megaflow_masks(table, k, valid=None, port_lens=(16,)):
    """``(best_rule, masks)`` per key: RuleSet indices (-1 none) and ``(n, W)`` safe masks.
    Invalid keys get an all-ones mask and -1. ``table``: a RuleSet or RuleMatchTable.
    ``port_lens``: the port prefix lengths a mask may use (a needed block is widened to the
    next one). The default, exact ports or none, keeps distinct masks (= hash probes per
    lookup) about ten times fewer on ClassBench sets than ``range(17)``, at some more entries."""
    pl = np.unique(np.asarray(list(port_lens) + [16], np.int64))
    t = _table(table)
    k = np.ascontiguousarray(k, np.uint64)
    valid = np.ones(k.shape[0], np.bool_) if valid is None else valid
    row = np.empty(k.shape[0], np.int32)
    out = np.empty_like(k)
    derive_masks(k, valid, *t.arrays(), _SUB_WORD, _SUB_BITS, t.src_lens, t.dst_lens, pl, row, out)
    return _rule_ids(t, row), out


# ----------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------
def _ports(x):
    return (x >> K.SH_SPORT) & 0xFFFF, (x >> K.SH_DPORT) & 0xFFFF


def row_matches_ref(t, key, r) -> bool:
    if any((int(key[w]) & int(t.mask[r, w])) != int(t.value[r, w]) for w in range(W)):
        return False
    sp, dp = _ports(int(key[K.K_L4]))
    return t.sport[r, 0] <= sp <= t.sport[r, 1] and t.dport[r, 0] <= dp <= t.dport[r, 1]


def _block_ref(x, lo, hi, inside, lens):
    for L in range(17):
        span = (1 << (16 - L)) - 1
        b0 = x & ~span & 0xFFFF
        b1 = b0 | span
        if (inside and lo <= b0 and b1 <= hi) or (not inside and (b1 < lo or b0 > hi)):
            q = min(q for q in list(lens) + [16] if q >= L)
            return 0xFFFF ^ ((1 << (16 - q)) - 1)
    return 0xFFFF


def _addr_bits_ref(kv, rv, rm, lens):
    d = (kv ^ rv) & rm
    if not d:
        return 0
    need = 129 - d.bit_length()
    plen = next((int(x) for x in lens if x >= need), need)
    return ((1 << 128) - 1) ^ ((1 << (128 - plen)) - 1)


def derive_mask_ref(table, key, port_lens=(16,)):
    """Reference of :func:`derive_masks` for one key: ``(winning row, mask tuple)``."""
    t = _table(table)
    key = [int(x) for x in key]
    m = [0] * W
    sp, dp = _ports(key[K.K_L4])
    for r in range(len(t)):
        rv = [int(x) for x in t.value[r]]
        rm = [int(x) for x in t.mask[r]]
        if any((key[w] ^ rv[w]) & rm[w] & m[w] for w in range(W)):
            continue  # the mask so far already proves this rule misses
        (slo, shi), (dlo, dhi) = (int(x) for x in t.sport[r]), (int(x) for x in t.dport[r])
        if row_matches_ref(t, key, r):
            for w in range(W):
                m[w] |= rm[w]
            if (slo, shi) != (0, 0xFFFF):
                m[K.K_L4] |= _block_ref(sp, slo, shi, True, port_lens) << K.SH_SPORT
            if (dlo, dhi) != (0, 0xFFFF):
                m[K.K_L4] |= _block_ref(dp, dlo, dhi, True, port_lens) << K.SH_DPORT
            return r, tuple(m)
        cands = []  # (cost, [(word, bits)]), in the kernel's order
        for a, lens in ((0, t.src_lens), (1, t.dst_lens)):
            wh = 2 * a
            bits = _addr_bits_ref(
                key[wh] << 64 | key[wh + 1], rv[wh] << 64 | rv[wh + 1], rm[wh] << 64 | rm[wh + 1], lens
            )
            if bits:
                parts = [(wh, bits >> 64), (wh + 1, bits & M64)]
                cands.append((sum(bin(b & ~m[w] & M64).count("1") for w, b in parts), parts))
        for w, sb in zip(_SUB_WORD.tolist(), _SUB_BITS.tolist()):
            rb = rm[w] & sb
            if rb and (key[w] ^ rv[w]) & rb:
                cands.append((bin(rb & ~m[w] & M64).count("1"), [(w, rb)]))
        for x, lo, hi, sh in ((sp, slo, shi, K.SH_SPORT), (dp, dlo, dhi, K.SH_DPORT)):
            if not lo <= x <= hi:
                b = _block_ref(x, lo, hi, False, port_lens) << sh
                cands.append((bin(b & ~m[K.K_L4] & M64).count("1"), [(K.K_L4, b)]))
        if not cands:
            m = [M64] * W
            continue
        best = min(range(len(cands)), key=lambda j: (cands[j][0], j))
        for w, b in cands[best][1]:
            m[w] |= b
    return -1, tuple(m)
