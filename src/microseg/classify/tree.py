"""Partitioned decision tree (HiCuts-style cuts, EffiCuts/CutSplit-style partitioning).

Build (off the hot path, a Numba kernel): rules are split into a few partitions by which
fields are *small* for them (source/destination prefix at least a /16, port range at most
1024 wide), so that no tree has to cut a field on which many of its rules are wildcards.
Each partition gets its own tree. A node cuts ``nb`` contiguous bits of one key word
(addresses, protocol, tenant, ... as value/mask bits) or the top ``nb`` not-yet-cut bits of a
port (ranges), so its children are indexed by ``(key[word] >> shift) & (2**nb - 1)``. The
dimension and the number of bits are chosen per node: the cut that leaves the fewest rules in
its fullest child, with the number of bits grown while the rule copies stay within
``spfac`` times the node's rules (HiCuts' space measure). Identical neighbouring children
share one node. Leaves hold at most ``binth`` rules, sorted by rank.

Lookup (a Numba kernel over the batch): for each tree in order of its best rule, unless that
rule cannot beat the match already found, walk to a leaf and scan it until the first match or
a rule ranked below the current best.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .rules import K_DST_HI, K_DST_LO, K_L4, K_META, K_SRC_HI, K_SRC_LO, NW, RuleSet

_NOCUT = -1
# cut dimensions: 0..NW-1 are key words cut as mask bits (K_L4 only above bit 32);
# NW = source port (K_L4 bits 0-15), NW+1 = destination port (K_L4 bits 16-31), as ranges
D_SPORT, D_DPORT = NW, NW + 1
_MAXNB = 8


@njit(cache=True)
def _top_bit(x):
    b = -1
    while x:
        x >>= np.uint64(1)
        b += 1
    return b


@njit(cache=True)
def _eval_mask(val, mask, R, w, shift, nb, cnt):
    """Per-child rule counts of cutting bits [shift, shift+nb) of word w; returns sum."""
    M = np.uint64((1 << nb) - 1)
    ncs = 1 << nb
    for c in range(ncs + 1):
        cnt[c] = 0
    allc = 0
    total = 0
    sh = np.uint64(shift)
    for q in range(R.shape[0]):
        r = R[q]
        mv = (mask[r, w] >> sh) & M
        vv = (val[r, w] >> sh) & M
        if mv == M:
            cnt[vv] += 1
            cnt[vv + np.uint64(1)] -= 1
            total += 1
        elif mv == 0:
            allc += 1
            total += ncs
        else:
            free = M ^ mv
            # prefix-shaped mask (ones on top): a contiguous block of children
            if (free & (free + np.uint64(1))) == 0:
                lo = np.int64(vv)
                hi = lo + np.int64(free)
                cnt[lo] += 1
                cnt[hi + 1] -= 1
                total += hi - lo + 1
                continue
            for c in range(ncs):
                if (np.uint64(c) & mv) == vv:
                    cnt[c] += 1
                    cnt[c + 1] -= 1
                    total += 1
    return allc, total


@njit(cache=True)
def _eval_range(ports, R, col, rlo, k, nb, cnt):
    """Per-child counts of cutting a port region [rlo, rlo+2**k) into 2**nb pieces."""
    ncs = 1 << nb
    for c in range(ncs + 1):
        cnt[c] = 0
    sh = k - nb
    rhi = rlo + (1 << k) - 1
    total = 0
    for q in range(R.shape[0]):
        r = R[q]
        a = max(ports[r, col], rlo)
        b = min(ports[r, col + 1], rhi)
        lo = (a - rlo) >> sh
        hi = (b - rlo) >> sh
        cnt[lo] += 1
        cnt[hi + 1] -= 1
        total += hi - lo + 1
    return 0, total


@njit(cache=True)
def _maxc(cnt, ncs, allc, mask_kind):
    """Largest child count from the difference array ``cnt`` (turned into counts in place)."""
    run = 0
    best = 0
    for c in range(ncs):
        run += cnt[c]
        v = run + allc
        cnt[c] = v
        if v > best:
            best = v
    return best


@njit(cache=True)
def _useful_bits(val, mask, R, w, fixed):
    anym = np.uint64(0)
    allm = ~np.uint64(0)
    ones = np.uint64(0)
    zeros = np.uint64(0)
    for q in range(R.shape[0]):
        r = R[q]
        m = mask[r, w]
        anym |= m
        allm &= m
        ones |= val[r, w]
        zeros |= (~val[r, w]) & m
    uniform = allm & ~(ones & zeros)
    u = anym & ~uniform & ~fixed
    if w == K_L4:
        u &= np.uint64(0xFFFFFFFF00000000)
    return u


@njit(cache=True)
def _choose(val, mask, ports, R, fixed, sp_lo, sp_k, dp_lo, dp_k, spfac, cnt):
    """Best cut for node rules R: (dim, shift, nb, maxc) or dim = -1."""
    m = R.shape[0]
    bdim = -1
    bshift = 0
    bnb = 0
    bmax = m
    bsum = 0
    budget = spfac * m
    for d in range(NW + 2):
        h = 0
        if d < NW:
            u = _useful_bits(val, mask, R, d, fixed[d])
            if u == 0:
                continue
            h = _top_bit(u)
            # stop the window at the first already-cut bit below h
            floor = 32 if d == K_L4 else 0
            lim = 0
            while (
                lim < _MAXNB and h - lim >= floor and ((fixed[d] >> np.uint64(h - lim)) & np.uint64(1)) == 0
            ):
                lim += 1
        else:
            k = sp_k if d == D_SPORT else dp_k
            lim = min(k, _MAXNB)
        if lim == 0:
            continue
        cm = m
        csum = 0
        cnb = 0
        for nb in range(1, lim + 1):
            if d < NW:
                allc, tot = _eval_mask(val, mask, R, d, h - nb + 1, nb, cnt)
            elif d == D_SPORT:
                allc, tot = _eval_range(ports, R, 0, sp_lo, sp_k, nb, cnt)
            else:
                allc, tot = _eval_range(ports, R, 2, dp_lo, dp_k, nb, cnt)
            if nb > 1 and tot + (1 << nb) > budget:
                break
            mx = _maxc(cnt, 1 << nb, allc, d < NW)
            if mx < cm:
                cm = mx
                csum = tot
                cnb = nb
        if cnb == 0:
            continue
        if cm < bmax or (cm == bmax and bdim >= 0 and csum < bsum):
            bdim = d
            bnb = cnb
            bmax = cm
            bsum = csum
            if d < NW:
                bshift = h - cnb + 1
            elif d == D_SPORT:
                bshift = sp_k - cnb
            else:
                bshift = 16 + dp_k - cnb
    return bdim, bshift, bnb, bmax


@njit(cache=True)
def _child_lists(val, mask, ports, R, dim, shift, nb, sp_lo, sp_k, dp_lo, dp_k):
    """CSR (offsets, rules) of the children of cutting R."""
    ncs = 1 << nb
    off = np.zeros(ncs + 1, np.int64)
    M = np.uint64(ncs - 1)
    for pass_ in range(2):
        if pass_ == 1:
            for c in range(ncs):
                off[c + 1] += off[c]
            buf = np.empty(off[ncs], np.int64)
            pos = off[:ncs].copy()
        for q in range(R.shape[0]):
            r = R[q]
            if dim < NW:
                sh = np.uint64(shift)
                mv = (mask[r, dim] >> sh) & M
                vv = (val[r, dim] >> sh) & M
                lo = 0
                hi = ncs - 1
                if mv == M:
                    lo = hi = np.int64(vv)
                elif mv != 0:
                    free = M ^ mv
                    if (free & (free + np.uint64(1))) == 0:
                        lo = np.int64(vv)
                        hi = lo + np.int64(free)
                    else:
                        for c in range(ncs):
                            if (np.uint64(c) & mv) == vv:
                                if pass_ == 0:
                                    off[c + 1] += 1
                                else:
                                    buf[pos[c]] = r
                                    pos[c] += 1
                        continue
            else:
                col = 0 if dim == D_SPORT else 2
                rlo = sp_lo if dim == D_SPORT else dp_lo
                k = sp_k if dim == D_SPORT else dp_k
                s = k - nb
                a = max(ports[r, col], rlo)
                b = min(ports[r, col + 1], rlo + (1 << k) - 1)
                lo = (a - rlo) >> s
                hi = (b - rlo) >> s
            for c in range(lo, hi + 1):
                if pass_ == 0:
                    off[c + 1] += 1
                else:
                    buf[pos[c]] = r
                    pos[c] += 1
    return off, buf


@njit(cache=True)
def _prune(val, mask, ports, R, fixed, reg):
    """Drop rules of R covered, inside this node's region, by a better rule of R."""
    m = R.shape[0]
    keep = np.ones(m, np.bool_)
    sp_lo = reg[0]
    sp_hi = reg[0] + (1 << reg[1]) - 1
    dp_lo = reg[2]
    dp_hi = reg[2] + (1 << reg[3]) - 1
    for b in range(1, m):
        j = R[b]
        js0 = max(ports[j, 0], sp_lo)
        js1 = min(ports[j, 1], sp_hi)
        jd0 = max(ports[j, 2], dp_lo)
        jd1 = min(ports[j, 3], dp_hi)
        for a in range(b):
            if not keep[a]:
                continue
            i = R[a]
            if ports[i, 0] > js0 or ports[i, 1] < js1 or ports[i, 2] > jd0 or ports[i, 3] < jd1:
                continue
            cov = True
            for w in range(NW):
                mi = mask[i, w] & ~fixed[w]
                if (mi & ~mask[j, w]) != 0 or ((val[i, w] ^ val[j, w]) & mi) != 0:
                    cov = False
                    break
            if cov:
                keep[b] = False
                break
    return R[keep]


@njit(cache=True)
def _grow(a, need):
    if need <= a.shape[0]:
        return a
    b = np.empty(max(need, 2 * a.shape[0]), a.dtype)
    b[: a.shape[0]] = a
    return b


@njit(cache=True)
def _build(val, mask, ports, R0, binth, spfac, max_depth, max_entries, prune_at):
    """One tree over rules R0 (ranks, ascending). Node 0 is the root."""
    nw = np.empty(64, np.int64)  # word (or -1 leaf)
    nsh = np.empty(64, np.int64)  # shift
    nm = np.empty(64, np.uint64)  # child index mask
    na = np.empty(64, np.int64)  # child base / leaf start
    nbn = np.empty(64, np.int64)  # leaf length
    child = np.empty(256, np.int64)
    leaf = np.empty(max(16, R0.shape[0]), np.int64)
    nn = 1
    nc = 0
    nl = 0
    cnt = np.zeros((1 << _MAXNB) + 2, np.int64)
    # work stack
    s_node = [0]
    s_rules = [R0]
    s_fixed = [np.zeros(NW, np.uint64)]
    s_reg = [np.array([0, 16, 0, 16, 0], np.int64)]  # sp_lo, sp_k, dp_lo, dp_k, depth
    while len(s_node) > 0:
        node = s_node.pop()
        R = s_rules.pop()
        fixed = s_fixed.pop()
        reg = s_reg.pop()
        if R.shape[0] <= prune_at:
            R = _prune(val, mask, ports, R, fixed, reg)
        m = R.shape[0]
        dim = -1
        if m > binth and reg[4] < max_depth and nl < max_entries:
            dim, shift, nb, mx = _choose(
                val, mask, ports, R, fixed, reg[0], reg[1], reg[2], reg[3], spfac, cnt
            )
            if mx >= m:
                dim = -1
        if dim < 0 and m > prune_at:
            R = _prune(val, mask, ports, R, fixed, reg)
            m = R.shape[0]
            if m > binth and reg[4] < max_depth and nl < max_entries:
                dim, shift, nb, mx = _choose(
                    val, mask, ports, R, fixed, reg[0], reg[1], reg[2], reg[3], spfac, cnt
                )
                if mx >= m:
                    dim = -1
        if dim < 0:
            leaf = _grow(leaf, nl + m)
            leaf[nl : nl + m] = R
            nw[node] = -1
            na[node] = nl
            nbn[node] = m
            nl += m
            continue
        ncs = 1 << nb
        off, buf = _child_lists(val, mask, ports, R, dim, shift, nb, reg[0], reg[1], reg[2], reg[3])
        base = nc
        child = _grow(child, nc + ncs)
        nc += ncs
        nw[node] = dim if dim < NW else K_L4
        nsh[node] = shift
        nm[node] = np.uint64(ncs - 1)
        na[node] = base
        nbn[node] = 0
        prev = -1
        for c in range(ncs):
            cs = buf[off[c] : off[c + 1]]
            if prev >= 0 and off[c + 1] - off[c] == off[c] - off[c - 1]:
                same = True
                ps = buf[off[c - 1] : off[c]]
                for q in range(cs.shape[0]):
                    if cs[q] != ps[q]:
                        same = False
                        break
                if same:
                    child[base + c] = prev
                    continue
            nid = nn
            nn += 1
            if nn > nw.shape[0]:
                nw = _grow(nw, nn)
                nsh = _grow(nsh, nn)
                nm = _grow(nm, nn)
                na = _grow(na, nn)
                nbn = _grow(nbn, nn)
            child[base + c] = nid
            prev = nid
            f2 = fixed.copy()
            r2 = reg.copy()
            r2[4] += 1
            if dim < NW:
                f2[dim] |= np.uint64(ncs - 1) << np.uint64(shift)
            elif dim == D_SPORT:
                r2[1] = reg[1] - nb
                r2[0] = reg[0] + (c << r2[1])
            else:
                r2[3] = reg[3] - nb
                r2[2] = reg[2] + (c << r2[3])
            s_node.append(nid)
            s_rules.append(cs.copy())
            s_fixed.append(f2)
            s_reg.append(r2)
    return nw[:nn], nsh[:nn], nm[:nn], na[:nn], nbn[:nn], child[:nc], leaf[:nl]


_LEAF = 0xF
_MAX_LEAF = (1 << 24) - 1


def _pack_nodes(nw, nsh, nbits, na, nbn):
    """One int64 per node: inner ``word | shift << 4 | bits << 10 | child_base << 28``,
    leaf ``0xF | count << 4 | record_start << 28``."""
    inner = nw >= 0
    if nbn.size and nbn.max() > _MAX_LEAF:
        raise ValueError("decision tree leaf too large")
    return np.where(inner, nw | nsh << 4 | nbits << 10 | na << 28, _LEAF | nbn << 4 | na << 28)


_REC = 16


def _pack_leaves(leaf, val, mask, ports):
    """Leaf entries as inline 128-byte records: line 1 holds the usual rejectors."""
    rec = np.zeros((leaf.shape[0], _REC), np.uint64)
    v, m = val[leaf], mask[leaf]
    p = ports[leaf].astype(np.uint64)
    rec[:, 0], rec[:, 1] = v[:, K_SRC_LO], m[:, K_SRC_LO]
    rec[:, 2], rec[:, 3] = v[:, K_DST_LO], m[:, K_DST_LO]
    rec[:, 4], rec[:, 5] = v[:, K_L4], m[:, K_L4]
    rec[:, 6] = p[:, 0] | p[:, 1] << np.uint64(16) | p[:, 2] << np.uint64(32) | p[:, 3] << np.uint64(48)
    rec[:, 7] = leaf.astype(np.uint64)
    rec[:, 8], rec[:, 9] = v[:, K_META], m[:, K_META]
    rec[:, 10], rec[:, 11] = v[:, K_SRC_HI], m[:, K_SRC_HI]
    rec[:, 12], rec[:, 13] = v[:, K_DST_HI], m[:, K_DST_HI]
    rec[:, 14], rec[:, 15] = v[:, NW - 1], m[:, NW - 1]
    return rec


@njit(cache=True)
def _lookup(K, n, troot, tbest, cw, rec, order, best, out):
    """Tree by tree, packet by packet: independent walks let the CPU overlap their misses.

    A node is one packed word (see ``_pack_nodes``) stored in its parent's child slots, so a
    step of the walk is a single load.
    """
    nt = troot.shape[0]
    big = np.int64(1) << 62
    M16 = np.uint64(0xFFFF)
    for i in range(n):
        best[i] = big
    for t in range(nt):
        root = troot[t]
        tb = tbest[t]
        for i in range(n):
            if tb >= best[i]:
                continue
            a = root
            while (a & 0xF) != _LEAF:
                c = np.int64(
                    (K[i, a & 0xF] >> np.uint64((a >> 4) & 0x3F)) & np.uint64((1 << ((a >> 10) & 0xF)) - 1)
                )
                a = cw[(a >> 28) + c]
            s = a >> 28
            e = s + ((a >> 4) & 0xFFFFFF)
            k1 = K[i, 1]
            k3 = K[i, 3]
            k4 = K[i, 4]
            sp = k4 & M16
            dp = (k4 >> np.uint64(16)) & M16
            bi = best[i]
            for j in range(s, e):
                r = np.int64(rec[j, 7])
                if r >= bi:
                    break
                if (
                    (k1 & rec[j, 1]) != rec[j, 0]
                    or (k3 & rec[j, 3]) != rec[j, 2]
                    or (k4 & rec[j, 5]) != rec[j, 4]
                ):
                    continue
                pw = rec[j, 6]
                if (
                    sp < (pw & M16)
                    or sp > ((pw >> np.uint64(16)) & M16)
                    or dp < ((pw >> np.uint64(32)) & M16)
                    or dp > (pw >> np.uint64(48))
                ):
                    continue
                if (
                    (K[i, 5] & rec[j, 9]) == rec[j, 8]
                    and (K[i, 0] & rec[j, 11]) == rec[j, 10]
                    and (K[i, 2] & rec[j, 13]) == rec[j, 12]
                    and (K[i, 6] & rec[j, 15]) == rec[j, 14]
                ):
                    best[i] = r
                    break
    for i in range(n):
        out[i] = order[best[i]] if best[i] < big else -1


def _popcount(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    c = np.zeros(a.shape, np.int64)
    while np.any(a):
        c += (a & np.uint64(1)).astype(np.int64)
        a >>= np.uint64(1)
    return c


def partition(rs: RuleSet, min_part: int | None = None, port_bits: bool = False) -> np.ndarray:
    """Partition label per rule (bit 0 src small, 1 dst small, 2 sport small, 3 dport small)."""
    n = len(rs)
    if n == 0:
        return np.zeros(0, np.int64)
    lab = np.zeros(n, np.int64)
    for bit, (wh, wl) in enumerate(((K_SRC_HI, K_SRC_LO), (K_DST_HI, K_DST_LO))):
        plen = _popcount(rs.mask[:, wh]) + _popcount(rs.mask[:, wl])
        v4 = (plen >= 96) & (rs.val[:, wh] == 0) & ((rs.val[:, wl] >> np.uint64(32)) == 0xFFFF)
        small = np.where(v4, plen >= 96 + 16, plen >= 48)
        lab |= small.astype(np.int64) << bit
    # port smallness splits only the rules with two large addresses (e.g. any -> any:80)
    ports = lab == 0 if not port_bits else np.ones(n, bool)
    lab |= (ports & ((rs.ports[:, 1] - rs.ports[:, 0]) < 1024)).astype(np.int64) << 2
    lab |= (ports & ((rs.ports[:, 3] - rs.ports[:, 2]) < 1024)).astype(np.int64) << 3
    if min_part is None:
        min_part = max(32, n // 40)
    # fold small partitions into their largest sub-partition (fewer small fields)
    counts = np.bincount(lab, minlength=16)
    for c in sorted(range(16), key=lambda c: -bin(c).count("1")):
        if c == 0 or counts[c] == 0 or counts[c] >= min_part:
            continue
        subs = [s for s in range(16) if s != c and (s & c) == s]
        tgt = max(subs, key=lambda s: (counts[s], bin(s).count("1")))
        lab[lab == c] = tgt
        counts[tgt] += counts[c]
        counts[c] = 0
    return lab


class DecisionTree:
    """The partitioned decision tree over a RuleSet (see module docstring)."""

    algo = "tree"

    def __init__(
        self,
        rs: RuleSet,
        binth: int = 8,
        spfac: float = 8.0,
        max_depth: int = 24,
        partitions: bool = True,
        prune_at: int = 256,
        min_part: int | None = None,
        port_bits: bool = False,
    ):
        self.ruleset = rs
        order = rs.order.astype(np.int64)
        # rule data in rank order: leaf entries are ranks
        self.val = np.ascontiguousarray(rs.val[order])
        self.mask = np.ascontiguousarray(rs.mask[order])
        self.ports = np.ascontiguousarray(rs.ports[order])
        self.order = order
        n = len(rs)
        lab = partition(rs, min_part, port_bits) if partitions else np.zeros(n, np.int64)
        lab_r = lab[order]
        parts = []
        for p in np.unique(lab_r):
            R = np.flatnonzero(lab_r == p).astype(np.int64)
            parts.append((int(R[0]), R))
        parts.sort()
        nws, nshs, nms, nas, nbns, childs, leaves, roots, bests = [], [], [], [], [], [], [], [], []
        noff = coff = loff = 0
        self.stats = []
        for best, R in parts:
            nw, nsh, nm, na, nbn, child, leaf = _build(
                self.val,
                self.mask,
                self.ports,
                R,
                int(binth),
                float(spfac),
                int(max_depth),
                int(24 * max(R.shape[0], 1024)),
                int(prune_at),
            )
            inner = nw >= 0
            na = na.copy()
            na[inner] += coff
            na[~inner] += loff
            nws.append(nw)
            nshs.append(nsh)
            nms.append(nm)
            nas.append(na)
            nbns.append(nbn)
            childs.append(child + noff)
            leaves.append(leaf)
            roots.append(noff)
            bests.append(best)
            self.stats.append(
                {
                    "rules": int(R.shape[0]),
                    "nodes": int(nw.shape[0]),
                    "leaf_entries": int(leaf.shape[0]),
                    "max_leaf": int(nbn[~inner].max()) if (~inner).any() else 0,
                }
            )
            noff += nw.shape[0]
            coff += child.shape[0]
            loff += leaf.shape[0]
        cat = lambda xs, dt: np.ascontiguousarray(np.concatenate(xs) if xs else np.zeros(0, dt), dt)  # noqa: E731
        nw = cat(nws, np.int64)
        nsh = cat(nshs, np.int64)
        nm = cat(nms, np.uint64)
        na = cat(nas, np.int64)
        nbn = cat(nbns, np.int64)
        nbits = np.zeros(nw.shape[0], np.int64)
        inner = nw >= 0
        nbits[inner] = _popcount(nm[inner])
        words = _pack_nodes(nw, nsh, nbits, na, nbn)
        self.cw = np.ascontiguousarray(words[cat(childs, np.int64)])  # child slots hold nodes
        leaf = cat(leaves, np.int64)
        self.troot = np.ascontiguousarray(words[np.array(roots, np.int64)])
        self.tbest = np.array(bests, np.int64)
        self.rec = _pack_leaves(leaf, self.val, self.mask, self.ports)
        del self.val, self.mask, self.ports

    @property
    def n_trees(self) -> int:
        return int(self.troot.shape[0])

    def classify_keys(self, K: np.ndarray) -> np.ndarray:
        K = np.ascontiguousarray(K, np.uint64)
        out = np.empty(K.shape[0], np.int32)
        best = np.empty(K.shape[0], np.int64)
        _lookup(K, K.shape[0], self.troot, self.tbest, self.cw, self.rec, self.order, best, out)
        return out

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.cw, self.rec, self.troot, self.tbest, self.order))
