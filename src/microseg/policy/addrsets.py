"""Address sets: remote-group and selector peers matched once, not once per address pair.

A security-group rule with ``remote_group_id``, and a NetworkPolicy or admin-policy peer that
selects pods (``podSelector``, ``namespaceSelector``, ``pods``, ``namespaces``), admits the
addresses of a set of workloads. Expanded into the classifier, such a rule costs one classifier
rule per (local address x remote prefix of the members), so a group of N workloads that admits
itself costs about N**2 rules. Here it compiles to one *set rule* per local address: the same
match as a classifier rule (tenant, check, local address, protocol, ports, ICMP type/code, and
optionally a remote prefix) plus "the remote workload is a member of set s".

The datapath already resolves each packet's source and destination to a workload of its tenant
(:func:`~microseg.policy.compiler.lookup_endpoint`); an address that is no workload's is in no
set, and a workload's addresses are its own within its tenant, so "the remote address is one
of the members' addresses" is exactly "the remote workload is a member". Membership is a bit
matrix, sets x workloads (:class:`SetTables.bits`): memory linear in the workloads for each
distinct set.

Set rules are evaluated as their own pass (:func:`set_pass`) after the classifier, per check
row: the local workload's rules of that check, in priority order, the first whose match and
membership hold. It replaces the classifier's winner only when it has a higher priority (the
classifier's rules come first in the rule set, so on equal priority they win, which is the
classifier's own "highest priority, then earliest" order over the union of both kinds). A set
rule whose membership test fails therefore never shadows another rule of its check, and the
admin policies' first-match order is kept. A membership change (:meth:`CompiledPolicy
.with_members`) builds new tables and shares the classifier when its rules are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from ..classify.rules import K_CT, K_L4, NW, P_DPORT_HI, P_DPORT_LO, P_SPORT_HI, P_SPORT_LO, RuleSet
from . import verdict as V

_SIDE = V.SIDE
_N_KINDS = V.N_CHECKS
_SH_DPORT = np.uint64(16)
_PORT = np.uint64(0xFFFF)


@dataclass(frozen=True)
class SetTables:
    """The read-only arrays of a compiled policy's set rules.

    ``start[kind * n_workloads + w] .. start[... + 1]``: the rows of local workload ``w``'s set
    rules for check ``kind``, highest priority first. Per row: ``val``/``mask`` (``(R, NW)``
    key words, conntrack word zero), ``ports`` (``(R, 4)`` as :class:`RuleSet` columns),
    ``prio``, ``set`` (row of ``bits``) and ``index`` (the rule's index in the compiled
    policy's rule set). ``bits``: ``(S, ceil(n_workloads / 8))`` uint8, bit ``w & 7`` of byte
    ``w >> 3`` of row ``s`` set when workload ``w`` is a member of set ``s``.
    """

    n_workloads: int
    start: np.ndarray
    val: np.ndarray
    mask: np.ndarray
    ports: np.ndarray
    prio: np.ndarray
    set: np.ndarray
    index: np.ndarray
    bits: np.ndarray

    @property
    def n_rules(self) -> int:
        return int(self.val.shape[0])

    @property
    def n_sets(self) -> int:
        return int(self.bits.shape[0])

    def nbytes(self) -> int:
        return sum(
            int(getattr(self, a).nbytes)
            for a in ("start", "val", "mask", "ports", "prio", "set", "index", "bits")
        )

    def members(self, s: int) -> np.ndarray:
        """Workload indices of set ``s``."""
        bits = np.unpackbits(self.bits[s], bitorder="little")[: self.n_workloads]
        return np.flatnonzero(bits)


def _ro(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def membership_bits(sets, n_workloads: int) -> np.ndarray:
    """The bit matrix of ``sets`` (iterables of workload indices)."""
    width = max((n_workloads + 7) // 8, 1)
    dense = np.zeros((max(len(sets), 1), width * 8), np.uint8)
    for s, members in enumerate(sets):
        idx = np.fromiter(members, np.int64)
        dense[s, idx] = 1
    return np.packbits(dense, axis=1, bitorder="little")


def build_tables(rs: RuleSet, first: int, kinds, local, set_of, sets, n_workloads: int) -> SetTables:
    """Tables for the set rules ``rs[first:]``: ``kinds[j]`` is the check of rule ``first +
    j``, ``local[j]`` its local workload, ``set_of[j]`` its set (index into ``sets``, lists of
    workload indices)."""
    n = len(rs) - first
    nw = max(n_workloads, 1)
    idx = np.arange(first, first + n, dtype=np.int64)
    kind = np.asarray(kinds, np.int64).reshape(n)
    loc = np.asarray(local, np.int64).reshape(n)
    prio = rs.priority[first:]
    group = kind * nw + loc
    order = np.lexsort((idx, -prio, group)) if n else np.zeros(0, np.int64)
    counts = np.bincount(group, minlength=_N_KINDS * nw) if n else np.zeros(_N_KINDS * nw, np.int64)
    start = np.zeros(_N_KINDS * nw + 1, np.int64)
    np.cumsum(counts, out=start[1:])
    val = rs.val[first:][order].copy()
    mask = rs.mask[first:][order].copy()
    val[:, K_CT] = 0  # the rule set's copy never matches (see compiler); the match ignores ct
    mask[:, K_CT] = 0
    ports = rs.ports[first:][order][:, [P_SPORT_LO, P_SPORT_HI, P_DPORT_LO, P_DPORT_HI]]
    return SetTables(
        n_workloads,
        _ro(start),
        _ro(val.reshape(n, NW)),
        _ro(mask.reshape(n, NW)),
        _ro(np.ascontiguousarray(ports, np.int64).reshape(n, 4)),
        _ro(prio[order].astype(np.int64)),
        _ro(np.asarray(set_of, np.int32).reshape(n)[order]),
        _ro(idx[order].astype(np.int32)),
        _ro(membership_bits(sets, n_workloads)),
    )


@njit(cache=True)
def set_pass(
    out_k,
    out_pkt,
    out_kind,
    m,
    idx,
    src_w,
    dst_w,
    nw,
    start,
    val,
    mask,
    ports,
    prio,
    sset,
    sidx,
    bits,
    rs_prio,
):
    """Per check row ``r < m``: replace ``idx[r]`` (the classifier's winner, -1 none) with the
    first set rule of the row's local workload and check whose match and membership hold, if
    it has a higher priority than the classifier's winner."""
    for r in range(m):
        kind = out_kind[r]
        i = out_pkt[r]
        if kind < _SIDE:
            lw = src_w[i]
            rw = dst_w[i]
        else:
            lw = dst_w[i]
            rw = src_w[i]
        if rw < 0 or lw < 0:
            continue  # an address that is no workload's is in no set
        g = np.int64(kind) * nw + lw
        a = start[g]
        b = start[g + 1]
        if a == b:
            continue
        c = idx[r]
        best = rs_prio[c] if c >= 0 else np.int64(0)
        l4 = out_k[r, K_L4]
        sp = np.int64(l4 & _PORT)
        dp = np.int64((l4 >> _SH_DPORT) & _PORT)
        byte = rw >> 3
        bit = np.uint8(1 << (rw & 7))
        for s in range(a, b):
            if c >= 0 and prio[s] <= best:
                break  # rows are in priority order: none of the rest beats the classifier's
            ok = True
            for q in range(NW):
                if (out_k[r, q] & mask[s, q]) != val[s, q]:
                    ok = False
                    break
            if not ok:
                continue
            if sp < ports[s, 0] or sp > ports[s, 1] or dp < ports[s, 2] or dp > ports[s, 3]:
                continue
            if bits[sset[s], byte] & bit:
                idx[r] = sidx[s]
                break


__all__ = ["SetTables", "build_tables", "membership_bits", "set_pass"]
