"""The slow path: what the fast path cannot answer, through the exact-match cache, the
megaflow cache and the compiled policy."""
from __future__ import annotations

import numpy as np
from numba import njit

from ..cache.key import K_CT, K_L4, SH_ICMP_ID, SH_SPORT, SH_TCP_FLAGS, W
from ..packet.batch import FlowKeys
from ..policy.compiler import CompiledPolicy


def megaflow_mask(policy: CompiledPolicy) -> np.ndarray:
    """The wildcard mask of the datapath's megaflow entries for ``policy``: the source port
    and the TCP flags when no compiled rule constrains them (security groups and
    NetworkPolicies have neither), and the ICMP echo identifier; everything else exact, so an
    entry gives every packet it covers the answer the policy would give."""
    rs = policy.ruleset
    m = np.full(W, np.uint64(0xFFFFFFFFFFFFFFFF), np.uint64)
    l4 = int(m[K_L4])
    sport_used = len(rs) and (bool(np.any(rs.mask[:, K_L4] & np.uint64(0xFFFF << SH_SPORT)))
                              or bool(np.any((rs.ports[:, 0] > 0) | (rs.ports[:, 1] < 65535))))
    flags_used = len(rs) and bool(np.any(rs.mask[:, K_L4] & np.uint64(0xFF << SH_TCP_FLAGS)))
    if not sport_used:
        l4 &= ~(0xFFFF << SH_SPORT)
    if not flags_used:
        l4 &= ~(0xFF << SH_TCP_FLAGS)
    m[K_L4] = np.uint64(l4 & 0xFFFFFFFFFFFFFFFF)
    m[K_CT] = np.uint64(int(m[K_CT]) & ~(0xFFFF << SH_ICMP_ID) & 0xFFFFFFFFFFFFFFFF)
    return m


@njit(cache=True)
def _unpack(hit, packed, crule, lvl, verdict, reason, rule, level):
    """Cached answers into the result arrays (a cached byte is ``verdict | reason << 2``)."""
    for i in range(hit.shape[0]):
        if hit[i]:
            verdict[i] = packed[i] & 3
            reason[i] = packed[i] >> 2
            rule[i] = crule[i]
            level[i] = lvl


def subset(keys: FlowKeys, idx: np.ndarray, out: FlowKeys) -> FlowKeys:
    out.resize(idx.shape[0])
    for t in ("u64", "u32", "i32", "u16", "u8"):
        src = getattr(keys, t)
        getattr(out, t)[:, : idx.shape[0]] = src[:, idx]
    return out
