"""The slow path: what the fast kernel cannot answer (NEW and untracked packets), through the
exact-match cache, the megaflow cache and the compiled policy.

:class:`SlowPath` takes the rows to decide as indices into the batch and works on them
alone: cache keys are built for those rows only, the policy's misses are gathered once into a
compact ``FlowKeys``, and answers are scattered back. The caches key on the classifier's
packet key plus conntrack state, with the *source identity* (which workload owns the source
MAC, :func:`.fast.source_identity`) in the ``in_port`` field, because port security is part
of the decision and a cached answer must not serve a frame with another source MAC. A cached
value packs the verdict and its reason in one byte (``verdict | reason << 2``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..cache.emc import ExactMatchCache
from ..cache.key import K_CT, K_L4, SH_ICMP_ID, SH_SPORT, SH_TCP_FLAGS, W, build_keys_at
from ..cache.megaflow import MegaflowCache
from ..packet.batch import FlowKeys
from ..policy.compiler import CompiledPolicy
from .reasons import L_EMC, L_MEGAFLOW


def megaflow_mask(policy: CompiledPolicy) -> np.ndarray:
    """The wildcard mask of the datapath's megaflow entries for ``policy``: the source port
    and the TCP flags when no compiled rule constrains them (security groups and
    NetworkPolicies have neither), and the ICMP echo identifier; everything else exact, so an
    entry gives every packet it covers the answer the policy would give."""
    rs = policy.ruleset
    m = np.full(W, np.uint64(0xFFFFFFFFFFFFFFFF), np.uint64)
    l4 = int(m[K_L4])
    sport_used = len(rs) and (
        bool(np.any(rs.mask[:, K_L4] & np.uint64(0xFFFF << SH_SPORT)))
        or bool(np.any((rs.ports[:, 0] > 0) | (rs.ports[:, 1] < 65535)))
    )
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


@njit(cache=True)
def _take_rows(src, idx, dst):
    """``dst[:, j] = src[:, idx[j]]``, one field (row) at a time: each row of the output is
    written in order (a packet at a time would write to every row's stream for each packet)."""
    m = idx.shape[0]
    for r in range(src.shape[0]):
        for j in range(m):
            dst[r, j] = src[r, idx[j]]


@njit(cache=True)
def _gather(su64, su32, si32, su16, su8, idx, du64, du32, di32, du16, du8):
    _take_rows(su64, idx, du64)
    _take_rows(su32, idx, du32)
    _take_rows(si32, idx, di32)
    _take_rows(su16, idx, du16)
    _take_rows(su8, idx, du8)


def subset(keys: FlowKeys, idx: np.ndarray, out: FlowKeys) -> FlowKeys:
    """The keys of packets ``idx`` (indices), compacted into ``out`` (one compiled pass)."""
    idx = np.ascontiguousarray(idx, np.int64)
    out.resize(idx.shape[0])
    _gather(*keys.arrays(), idx, *out.arrays())
    return out


class SlowPath:
    """Caches (optional) in front of the compiled policy, for rows of a batch."""

    def __init__(
        self,
        policy: CompiledPolicy,
        caches: bool = True,
        emc_entries: int = 65536,
        megaflow_entries: int = 65536,
        batch_size: int = 1024,
    ):
        self.policy = policy
        self.emc = ExactMatchCache(emc_entries, version=policy.version) if caches else None
        self.megaflow = MegaflowCache(megaflow_entries, version=policy.version) if caches else None
        self.mask = megaflow_mask(policy)
        self._keys = FlowKeys(batch_size)

    def swap_policy(self, new: CompiledPolicy) -> None:
        """Move to ``new``: cached answers of the old version are never served again."""
        self.policy = new
        self.mask = megaflow_mask(new)
        if self.emc is not None:
            self.emc.revalidate(new.version)
        if self.megaflow is not None:
            self.megaflow.revalidate(new.version)

    def decide(
        self, keys: FlowKeys, rows: np.ndarray, ct_rows: np.ndarray, src_id: np.ndarray, res, level
    ) -> None:
        """Answer packets ``rows`` (indices into the batch; conntrack bits ``ct_rows``, one per
        row) into ``res`` (a :class:`~.datapath.BatchResult`): from the caches where they
        hold the answer, else from the policy (one call for every miss), whose answers to
        cacheable rows are then cached. ``level`` is the level of the policy's answers."""
        m = rows.shape[0]
        if m == 0:
            return
        verdict = np.empty(m, np.uint8)
        reason = np.empty(m, np.uint8)
        rule = np.full(m, -1, np.int32)
        lvl = np.full(m, level, np.uint8)
        if self.emc is not None:
            assert self.megaflow is not None  # the two caches are built together
            kmat, hashes, valid = build_keys_at(keys, rows, src_id, ct_rows)
            e = self.emc.lookup(kmat, hashes, valid)
            hit = e.hit
            if hit.any():
                _unpack(hit, e.verdict, e.rule, L_EMC, verdict, reason, rule, lvl)
                rest = valid & ~hit
            else:
                rest = valid
            if rest.any():
                mf = self.megaflow.lookup(kmat, rest)
                if mf.hit.any():
                    _unpack(mf.hit, mf.verdict, mf.rule, L_MEGAFLOW, verdict, reason, rule, lvl)
                    self.emc.insert(kmat, hashes, mf.hit, mf.verdict, mf.rule)
                    hit = hit | mf.hit
            miss = np.flatnonzero(~hit)
        else:
            miss = np.arange(m)
        if miss.size:
            sub = subset(keys, rows[miss], self._keys)
            v, r, why = self.policy.decide(sub, ct_rows[miss])
            verdict[miss], rule[miss], reason[miss] = v, r, why
            if self.emc is not None:
                assert self.megaflow is not None
                ins = miss[valid[miss]]
                if ins.size:
                    packed = (verdict | (reason << 2)).astype(np.uint8)
                    self.emc.insert(kmat, hashes, ins, packed, rule)
                    self.megaflow.insert_masked(kmat, self.mask, ins, packed, rule)
        res.verdict[rows] = verdict
        res.reason[rows] = reason
        res.rule[rows] = rule
        res.level[rows] = lvl
