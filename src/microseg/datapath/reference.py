"""The whole datapath as a plain-Python model, one packet at a time: the references chained.

For every packet, in order: the reference parser (:mod:`microseg.packet.parse_ref`), the
reference connection tracker (:mod:`microseg.conntrack.reference`) committing a connection only
when the reference policy (:mod:`microseg.policy.reference`) allows its first packet, then the
reference policy's decision on the state conntrack gave. A policy swap cuts the connections
the new policy forbids and the old one allowed, judged from each connection's opening packet.

It is what :class:`microseg.datapath.Datapath` must agree with whatever its batch size, its
caches and its fast path: the tests feed both the same packets, cut into batches at random
places, and compare verdict, reason and conntrack state packet by packet. Inspection
(signatures) is not modelled: compare with a datapath that has no signatures.
"""

from __future__ import annotations

import numpy as np

from .. import ctstate
from ..conntrack import const as K
from ..conntrack.reference import ReferenceConntrack
from ..conntrack.table import checksum_ok
from ..packet import batch as B
from ..packet.parse_ref import parse_batch_ref
from ..policy import verdict as V
from ..policy.reference import Reference

_NEW = ctstate.TRACKED | ctstate.NEW


class ReferenceDatapath:
    """Per-packet model of :class:`~microseg.datapath.Datapath` for one compiled policy."""

    def __init__(
        self, compiled, *, timeouts: dict | None = None, checksum: bool = True, cut_revoked: bool = True
    ):
        self.compiled = compiled
        self.ref = Reference(compiled.policy)
        self.index = {id(w): i for i, w in enumerate(compiled.policy.workloads)}
        self.conntrack = ReferenceConntrack(timeouts=timeouts, checksum=checksum)
        self.checksum = checksum
        self.cut_revoked = cut_revoked

    # -- policy -----------------------------------------------------------------------------
    def _opening_allowed(self, ref: Reference, c) -> bool:
        """Would ``ref`` let the first packet of connection ``c`` through as NEW?"""
        tenant = -1 if c.zone == self.conntrack.default_zone else c.zone
        icmp = c.proto in (K.IPPROTO_ICMP, K.IPPROTO_ICMPV6)
        ver = 4 if c.src[0] == 0 and (c.src[1] >> 32) == 0xFFFF else 6
        row = {
            "error": 0,
            "tenant": tenant,
            "ip_ver": ver,
            "l2_off": -1,
            "eth_src": 0,
            "src_hi": c.src[0],
            "src_lo": c.src[1],
            "dst_hi": c.dst[0],
            "dst_lo": c.dst[1],
            "proto": c.proto,
            "sport": 0 if icmp else c.sport,
            "dport": 0 if icmp else c.dport,
            "icmp_type": c.icmp_type if icmp else 0,
            "icmp_code": c.icmp_code if icmp else 0,
            "flags": B.F_ICMP if icmp else (B.F_PORTS if c.proto in (6, 17, 132, 33, 136) else 0),
        }
        return ref.decide_row(row, _NEW).verdict == V.ALLOW

    def swap_policy(self, new) -> int:
        """Install ``new``; returns how many connections were cut."""
        old_ref, new_ref = self.ref, Reference(new.policy)
        cut = 0
        if self.cut_revoked and new.content_hash != self.compiled.content_hash:
            for c in self.conntrack.entries():
                if not self._opening_allowed(new_ref, c) and self._opening_allowed(old_ref, c):
                    self.conntrack._delete(c)
                    cut += 1
        self.compiled, self.ref = new, new_ref
        self.index = {id(w): i for i, w in enumerate(new.policy.workloads)}
        return cut

    # -- packets ----------------------------------------------------------------------------
    def process(self, batch) -> dict:
        """``verdict``, ``reason``, ``ct``, ``src_workload``, ``dst_workload`` per packet."""
        n = len(batch)
        out: dict[str, np.ndarray] = {
            "verdict": np.zeros(n, np.uint8),
            "reason": np.zeros(n, np.uint8),
            "ct": np.zeros(n, np.uint8),
            "src_workload": np.full(n, -1, np.int32),
            "dst_workload": np.full(n, -1, np.int32),
        }
        for i in range(n):
            one = batch.slice(i, i + 1)
            keys = parse_batch_ref(one)
            row = keys.row(0)
            ok = checksum_ok(one, keys) if self.checksum else np.ones(1, np.bool_)

            def decide(rows, row=row):
                return np.array([self.ref.decide_row(row, _NEW).verdict == V.ALLOW])

            st = int(self.conntrack.process(one, keys, csum_ok=ok, decide=decide)[0])
            d = self.ref.decide_row(row, st)
            out["verdict"][i], out["reason"][i], out["ct"][i] = d.verdict, d.reason, st
            if d.src is not None:
                out["src_workload"][i] = self.index[id(d.src)]
            if d.dst is not None:
                out["dst_workload"][i] = self.index[id(d.dst)]
        return out
