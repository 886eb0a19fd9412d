"""A batch's packets grouped by connection, both directions as one, in NumPy.

The inspection chain (:mod:`.ids`) and the kernel fast-path manager (:mod:`.kfast`) keep
per-connection state in dicts. Looking each packet up costs a Python tuple and a dict probe
per packet; grouping the batch first costs one sort of at most a batch of rows and leaves
one probe per connection of the batch (a bulk transfer's 1,024-frame batch is one or a few
connections).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ctstate import REPLY

_DTYPE = np.dtype(
    [
        ("tenant", "<i8"),
        ("proto", "<i8"),
        ("a_hi", "<u8"),
        ("a_lo", "<u8"),
        ("a_port", "<i8"),
        ("b_hi", "<u8"),
        ("b_lo", "<u8"),
        ("b_port", "<i8"),
    ]
)

_MIX = np.uint64(0x9E3779B97F4A7C15)
_SMALL = 32  # up to this many rows, a dict of tuples is cheaper than the sorts


@dataclass
class Groups:
    """``rows`` grouped: group ``g`` holds positions ``members(g)`` of ``rows`` (ascending,
    so in packet order); groups are numbered in the order of their first packet."""

    rows: np.ndarray
    first: np.ndarray  # position in rows of each group's first packet
    order: np.ndarray  # positions in rows, group by group
    starts: np.ndarray  # where each group begins in order
    sizes: np.ndarray
    flows: list  # per group: (tenant, proto, *lower end, *upper end), ends as (hi, lo, port)

    def __len__(self) -> int:
        return len(self.flows)

    def members(self, g: int) -> np.ndarray:
        s = int(self.starts[g])
        return self.order[s : s + int(self.sizes[g])]

    def ident(self, g: int, keys, ct) -> tuple:
        """Group ``g``'s connection in its original direction (:func:`ident` of its first
        packet)."""
        return ident(keys, ct, int(self.rows[self.first[g]]))


def ident(keys, ct, i: int) -> tuple:
    """Packet ``i``'s connection in its original direction (as conntrack and the kernel fast
    path key it), from its conntrack state ``ct`` (None: the packet's own direction)."""
    s = (int(keys.src_hi[i]), int(keys.src_lo[i]), int(keys.sport[i]))
    d = (int(keys.dst_hi[i]), int(keys.dst_lo[i]), int(keys.dport[i]))
    if ct is not None and int(ct[i]) & REPLY:
        s, d = d, s
    return (int(keys.tenant[i]), int(keys.proto[i]), s[0], s[1], d[0], d[1], s[2], d[2])


def group(keys, rows: np.ndarray) -> Groups:
    """Packets ``rows`` of a batch (parsed ``keys``) grouped by connection: same tenant and
    protocol and the same two ends, in either direction."""
    rows = np.asarray(rows, np.int64)
    n = rows.size
    if n <= _SMALL:
        return _group_small(keys, rows)
    sh, sl, sp = keys.src_hi[rows].astype(np.uint64), keys.src_lo[rows].astype(np.uint64), keys.sport[rows]
    dh, dl, dp = keys.dst_hi[rows].astype(np.uint64), keys.dst_lo[rows].astype(np.uint64), keys.dport[rows]
    src_first = (sh < dh) | ((sh == dh) & ((sl < dl) | ((sl == dl) & (sp <= dp))))
    cols = (
        keys.tenant[rows].astype(np.int64),
        keys.proto[rows].astype(np.int64),
        np.where(src_first, sh, dh),
        np.where(src_first, sl, dl),
        np.where(src_first, sp, dp).astype(np.int64),
        np.where(src_first, dh, sh),
        np.where(src_first, dl, sl),
        np.where(src_first, dp, sp).astype(np.int64),
    )
    if n == 0:
        e = np.zeros(0, np.int64)
        return Groups(rows, e, e, e, e, [])
    # group on a 64-bit mix of the columns (a sort of integers), then check every row against
    # its group's first; a collision (never seen in practice) takes the exact, slower path
    h = np.zeros(n, np.uint64)
    with np.errstate(over="ignore"):
        for c in cols:
            h = (h ^ c.astype(np.uint64)) * _MIX
            h ^= h >> np.uint64(29)
    _u, first, inv = np.unique(h, return_index=True, return_inverse=True)
    inv = inv.reshape(-1)
    if not all((c == c[first][inv]).all() for c in cols):
        rec = np.empty(n, _DTYPE)
        for name, c in zip(_DTYPE.names or (), cols, strict=True):
            rec[name] = c
        _r, first, inv = np.unique(rec, return_index=True, return_inverse=True)
        inv = inv.reshape(-1)
    # number the groups by their first packet
    by_first = np.argsort(first, kind="stable")
    rank = np.empty_like(by_first)
    rank[by_first] = np.arange(by_first.size)
    inv = rank[inv]
    first = first[by_first]
    sizes = np.bincount(inv, minlength=first.size)
    order = np.argsort(inv, kind="stable")
    starts = np.zeros(first.size, np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    at = [c[first].tolist() for c in cols]
    flows = list(zip(*at, strict=True))
    return Groups(rows, first.astype(np.int64), order.astype(np.int64), starts, sizes.astype(np.int64), flows)


def _group_small(keys, rows: np.ndarray) -> Groups:
    """:func:`group` for a few rows: one tuple and dict probe per row."""
    k = keys
    cols = [k.tenant[rows], k.proto[rows], k.src_hi[rows], k.src_lo[rows], k.sport[rows]]
    cols += [k.dst_hi[rows], k.dst_lo[rows], k.dport[rows]]
    at: dict[tuple, list[int]] = {}
    for j, (t, p, sh, sl, sp, dh, dl, dp) in enumerate(zip(*(c.tolist() for c in cols), strict=True)):
        a, b = (sh, sl, sp), (dh, dl, dp)
        at.setdefault((t, p, *min(a, b), *max(a, b)), []).append(j)
    flows = list(at)
    sizes = np.array([len(m) for m in at.values()], np.int64)
    order = np.array([j for m in at.values() for j in m], np.int64)
    first = np.array([m[0] for m in at.values()], np.int64)
    starts = np.zeros(len(flows), np.int64)
    if len(flows) > 1:
        np.cumsum(sizes[:-1], out=starts[1:])
    return Groups(rows, first, order, starts, sizes, flows)
