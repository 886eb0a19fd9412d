"""What the datapath counts: per verdict, reason, answering level, conntrack state, rule,
workload and tenant, as arrays indexed by code (cheap per batch); :meth:`Counters.as_dict`
names them for reports.

:func:`count_rows` counts the packets the slow path answered; the fast kernel counts the
packets it answers with the same code written out in its loop.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .. import ctstate
from ..packet import batch as B
from ..policy.compiler import tenant_index
from . import reasons as R


@njit(cache=True)
def count_rows(
    rows,
    verdict,
    reason,
    level,
    ct,
    rule,
    src_w,
    dst_w,
    tenant,
    vnis,
    c_verdict,
    c_reason,
    c_level,
    c_ct,
    c_rule,
    w_tx,
    w_rx,
    w_drop,
    c_tenant,
):
    """Count the packets ``rows`` (indices) of a batch."""
    nv = vnis.shape[0]
    for j in range(rows.shape[0]):
        i = rows[j]
        t = tenant_index(vnis, np.int64(tenant[i])) if nv else -1
        v = verdict[i]
        c_verdict[v] += 1
        c_reason[reason[i]] += 1
        c_level[level[i]] += 1
        c_ct[ct[i] & 15] += 1
        r = rule[i]
        if 0 <= r < c_rule.shape[0]:
            c_rule[r] += 1
        s, d = src_w[i], dst_w[i]
        if v == 1:
            if 0 <= s < w_tx.shape[0]:
                w_tx[s] += 1
            if 0 <= d < w_rx.shape[0]:
                w_rx[d] += 1
        elif 0 <= s < w_drop.shape[0]:
            w_drop[s] += 1
        c_tenant[t if t >= 0 else nv, v] += 1


@njit(cache=True)
def count_parsed(u8, n, tunnel, unfollowed):
    """Tunnels followed and not followed (by type) of packets ``0..n-1``, in one pass;
    returns how many were snapped inside their headers or payload."""
    truncated = 0
    for i in range(n):
        tunnel[u8[B.TUN_TYPE, i]] += 1
        unfollowed[u8[B.TUN_UNFOLLOWED, i]] += 1
        if u8[B.FLAGS2, i] & B.F2_TRUNCATED:
            truncated += 1
    return truncated


class Counters:
    """Everything the datapath counts (see the module docstring)."""

    def __init__(self, n_rules: int, n_workloads: int, tenant_vnis):
        self.packets = 0
        self.bytes = 0
        self.seconds = 0.0
        self.revoked_connections = 0
        self.verdict = np.zeros(4, np.int64)
        self.reason = np.zeros(256, np.int64)
        self.level = np.zeros(8, np.int64)
        self.ct = np.zeros(256, np.int64)
        self.tunnel = np.zeros(256, np.int64)  # by TUN_TYPE of the reported packet
        self.unfollowed = np.zeros(256, np.int64)  # by TUN_UNFOLLOWED (tunnels not stepped into)
        self.truncated = 0  # snapped inside their headers or payload
        self.resize(n_rules, n_workloads, tenant_vnis)

    def resize(self, n_rules: int, n_workloads: int, tenant_vnis) -> None:
        """(Re)shape the per-rule, per-workload and per-tenant counters for a policy."""
        self.rule = np.zeros(n_rules, np.int64)
        self.workload_tx = np.zeros(n_workloads, np.int64)
        self.workload_rx = np.zeros(n_workloads, np.int64)
        self.workload_dropped = np.zeros(n_workloads, np.int64)
        self.vnis = np.asarray(sorted(tenant_vnis), np.int64)
        self.tenant = np.zeros((self.vnis.shape[0] + 1, 4), np.int64)  # last row: other / none

    def arrays(self) -> tuple:
        """The per-packet counter arrays, in the order the kernels take them."""
        return (
            self.verdict,
            self.reason,
            self.level,
            self.ct,
            self.rule,
            self.workload_tx,
            self.workload_rx,
            self.workload_dropped,
            self.tenant,
        )

    def add(self, batch, keys, res) -> None:
        """Count every packet of a processed batch."""
        n = res.verdict.shape[0]
        self.packets += n
        self.bytes += int(np.asarray(batch.wire_len, np.int64).sum())
        self.add_rows(np.arange(n), res, keys.tenant)

    def add_parsed(self, keys) -> None:
        """Count what the parser saw in a batch: tunnels followed and not, snapped packets."""
        if keys.n:
            self.truncated += int(count_parsed(keys.u8, keys.n, self.tunnel, self.unfollowed))

    def add_rows(self, rows, res, tenant) -> None:
        """Count packets ``rows`` (indices into ``res``, a :class:`BatchResult`)."""
        if rows.shape[0]:
            count_rows(
                rows,
                res.verdict,
                res.reason,
                res.level,
                res.ct,
                res.rule,
                res.src_workload,
                res.dst_workload,
                tenant,
                self.vnis,
                *self.arrays(),
            )

    def as_dict(self) -> dict:
        def named(arr, names):
            return {names.get(i, str(i)): int(v) for i, v in enumerate(arr) if v}

        ct_names = {**ctstate.NAMES, 0: "untracked"}
        tenants = {}
        for k in range(self.tenant.shape[0]):
            row = named(self.tenant[k], R.VERDICTS)
            if row:
                tenants[str(int(self.vnis[k])) if k < self.vnis.shape[0] else "other"] = row
        return {
            "packets": self.packets,
            "bytes": self.bytes,
            "seconds": self.seconds,
            "verdicts": named(self.verdict, R.VERDICTS),
            "reasons": named(self.reason, R.REASONS),
            "levels": {name: int(self.level[code]) for code, name in R.LEVELS.items()},
            "conntrack_states": named(self.ct, ct_names),
            "tenants": tenants,
            "tunnels": {
                B.TUN_NAMES.get(i) or f"tunnel_{i}": int(v) for i, v in enumerate(self.tunnel) if v and i
            },
            "tunnels_not_followed": {
                B.TUN_NAMES.get(i) or f"tunnel_{i}": int(v) for i, v in enumerate(self.unfollowed) if v and i
            },
            "truncated_packets": self.truncated,
            "revoked_connections": self.revoked_connections,
        }
