"""JSON flow logs: one line per connection end and per denied new flow.

Derived per batch from the arrays :meth:`Datapath.process` returns: one vectorised mask
picks the rows that matter (denied packets that would open a flow; allowed TCP packets with
FIN or RST), so allowed established packets cost one comparison each and no Python. For a
connection end the conntrack entry (its original direction and the bytes each way) is read
after the batch; a connection is logged once, when it closes (RST, or FIN seen in both
directions). Nothing of a packet's payload, nor any key, is written.

A connection that never closes (UDP, ICMP, TCP left idle) ends when conntrack's idle timeout
removes it: :meth:`FlowLog.expire` runs conntrack's own round-robin sweep (the agent calls it
between batches instead of the sweep inside each batch) and, just before, reads the entries
that sweep is about to remove, each written as an ``end`` line with ``"close": "timeout"`` and
its bytes each way -- for a connection the kernel fast path carried, the bytes its counters
read back into the entry. An entry removed on the way instead (a packet of the same tuple
arriving after its deadline, or an expired entry evicted for a new connection in a full
table) is counted in ``timeouts_unlogged``, not written.

A line (``record``)::

    {"time": "2026-01-01T12:00:00.123456Z", "ts_ns": ..., "event": "end" | "denied",
     "tenant": "acme", "vni": 5001, "proto": "tcp", "src": "10.0.1.11", "sport": 40000,
     "dst": "10.0.2.21", "dport": 443, "src_workload": "acme/web-1", "dst_workload": ...,
     "verdict": "allow", "reason": "established", "rule": "...", "tcp_state": "LAST_ACK",
     "close": "fin" | "rst" | "timeout", "bytes_orig": N, "bytes_reply": N,
     "packets_orig": null, "packets_reply": null}

The conntrack entry counts bytes each way but not packets, so ``packets_*`` are null for a
connection end (a denied flow's line is one packet: ``packets_orig`` 1). A timeout's line has
``"reason": "timeout"``, ``rule`` null and ``tcp_state`` the state it expired in (null but
for TCP); its time is the sweep's.

Inspection (``--ids``) adds its own lines: ``"event": "ids"`` per alert and ``"event":
"ids_end"`` when a connection's inspection ends, with the ``reason`` (docs/inspection.md).
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import time

import numpy as np

from .. import ctstate
from ..conntrack import const as CK
from ..datapath import reasons as R
from ..datapath.slow import subset
from ..packet import batch as B

PROTOS = {1: "icmp", 6: "tcp", 17: "udp", 47: "gre", 50: "esp", 58: "icmpv6", 132: "sctp"}
_CLOSED = (CK.LAST_ACK, CK.TIME_WAIT, CK.CLOSE)
_FIN, _RST = 0x01, 0x04
ENDED_KEEP_S = 300.0  # how long a logged connection is remembered (retransmitted FINs)


def _iso(ts_ns: int) -> str:
    t = datetime.datetime.fromtimestamp(ts_ns / 1e9, datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ident(e) -> tuple:
    """A conntrack entry's connection, in its original direction: the key under which its
    logged end is remembered (so the close and the timeout sweep write it once)."""
    return tuple(int(e[f]) for f in ("zone", "src_hi", "src_lo", "dst_hi", "dst_lo", "sport", "dport"))


def _addr(hi, lo) -> str:
    return B.addr_to_text(int(hi), int(lo))


class FlowLog:
    """Writes flow records to ``path`` (rotated at ``max_bytes``, ``backups`` old files), or
    to ``sink`` (a callable taking a dict; for tests)."""

    def __init__(self, path: str | None = None, *, max_bytes: int = 64 << 20, backups: int = 5, sink=None):
        self.sink = sink
        self._log = None
        self.lines = 0
        self.timeouts = 0  # end lines for connections conntrack's idle timeout removed
        self.timeouts_unlogged = 0  # expired entries removed elsewhere than in expire()
        self._expired_last: tuple | None = None  # (table, its expired counter after expire())
        self._names: tuple | None = None  # (policy, {(vni, hi, lo): workload}, {vni: tenant})
        self._ended: dict[tuple, float] = {}
        self._next_prune = 0.0
        if path is not None:
            self._log = logging.getLogger(f"microseg.flows.{id(self)}")
            self._log.propagate = False
            self._log.setLevel(logging.INFO)
            h = logging.handlers.RotatingFileHandler(
                path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
            )
            h.setFormatter(logging.Formatter("%(message)s"))
            self._log.addHandler(h)

    def emit(self, rec: dict) -> None:
        self.lines += 1
        if self.sink is not None:
            self.sink(rec)
        if self._log is not None:
            self._log.info(json.dumps(rec, separators=(",", ":")))

    def close(self) -> None:
        if self._log is not None:
            for h in list(self._log.handlers):
                h.close()
                self._log.removeHandler(h)

    # -- per batch --------------------------------------------------------------------------------
    def observe(self, batch, keys, res, dp) -> None:
        """Log what batch ``batch`` (parsed ``keys``, results ``res``) ended or denied."""
        n = res.verdict.shape[0]
        if n == 0 or keys is None:
            return
        st = res.ct & ctstate.STATE_MASK
        allowed = res.verdict == R.ALLOW
        denied = ~allowed & ((st == ctstate.NEW) | (st == 0))
        proto = keys.proto[:n]
        flags = keys.tcp_flags[:n]
        ends = allowed & (proto == 6) & ((flags & (_FIN | _RST)) != 0)
        if not denied.any() and not ends.any():
            return
        pol = dp.policy
        tenants = {int(t.vni): t.name for t in pol.policy.tenants}
        ts = np.asarray(batch.ts, np.int64)
        for i in np.flatnonzero(denied).tolist():
            rec = self._base(keys, res, pol, tenants, i, int(ts[i]), "denied")
            rec.update(
                src=_addr(keys.src_hi[i], keys.src_lo[i]),
                sport=int(keys.sport[i]),
                dst=_addr(keys.dst_hi[i], keys.dst_lo[i]),
                dport=int(keys.dport[i]),
                src_workload=self._wl(pol, res.src_workload[i]),
                dst_workload=self._wl(pol, res.dst_workload[i]),
                packets_orig=1,
                bytes_orig=int(batch.wire_len[i]),
                packets_reply=0,
                bytes_reply=0,
            )
            self.emit(rec)
        rows = np.flatnonzero(ends)
        if rows.size:
            self._ends(batch, keys, res, dp, pol, tenants, ts, rows)

    def _ends(self, batch, keys, res, dp, pol, tenants, ts, rows) -> None:
        ctt = dp.conntrack
        sub = batch.select(rows)
        sel = subset(keys, rows, B.FlowKeys(max(rows.size, 1)))
        ent, rep = ctt.lookup(sub, sel, ts[rows])
        now = time.monotonic()
        if now >= self._next_prune:
            self._ended = {k: v for k, v in self._ended.items() if now - v < ENDED_KEEP_S}
            self._next_prune = now + 30.0
        for j, i in enumerate(rows.tolist()):
            e = int(ent[j])
            if e < 0:
                continue
            rec_e = ctt.ents[e]
            state = int(rec_e["tcp_state"])
            if state not in _CLOSED:
                continue
            ident = _ident(rec_e)
            if ident in self._ended:
                continue
            self._ended[ident] = now
            s_w, d_w = int(res.src_workload[i]), int(res.dst_workload[i])
            if rep[j]:
                s_w, d_w = d_w, s_w
            rec = self._base(keys, res, pol, tenants, i, int(ts[i]), "end")
            rec.update(
                src=_addr(rec_e["src_hi"], rec_e["src_lo"]),
                sport=int(rec_e["sport"]),
                dst=_addr(rec_e["dst_hi"], rec_e["dst_lo"]),
                dport=int(rec_e["dport"]),
                src_workload=self._wl(pol, s_w),
                dst_workload=self._wl(pol, d_w),
                tcp_state=CK.TCP_STATE_NAMES[state],
                close="rst" if int(keys.tcp_flags[i]) & _RST else "fin",
                packets_orig=None,
                bytes_orig=int(rec_e["bytes"][0]),
                packets_reply=None,
                bytes_reply=int(rec_e["bytes"][1]),
            )
            self.emit(rec)

    # -- idle timeouts ----------------------------------------------------------------------------
    def expire(self, table, now_ns: int, budget: int, pol) -> int:
        """Run conntrack ``table``'s expiry over ``budget`` entries (from its cursor, as
        :meth:`ConntrackTable.expire` visits them) at ``now_ns``, first writing an ``end``
        line (``close`` ``timeout``) for each entry that sweep removes. ``pol``: the
        running compiled policy (tenant and workload names). Returns the entries removed."""
        from ..conntrack import const as K
        from ..conntrack import kernels as KN

        cap = int(table.capacity)
        budget = min(int(budget), cap)
        if budget <= 0:
            return 0
        expired = int(table.ctr[K.C_EXPIRED])
        if self._expired_last is not None and self._expired_last[0] is table:
            self.timeouts_unlogged += max(0, expired - self._expired_last[1])
        cur = int(table.meta[KN.M_CURSOR]) % cap
        spans = [(cur, min(cap, cur + budget))]
        if cur + budget > cap:
            spans.append((0, cur + budget - cap))
        status, deadline = table.ents["status"], table.ents["deadline"]
        dead = [
            a + np.flatnonzero(((status[a:b] & CK.ST_USED) != 0) & ((deadline[a:b] - np.int64(now_ns)) <= 0))
            for a, b in spans
        ]
        idx = np.concatenate(dead) if len(dead) > 1 else dead[0]
        if idx.size:
            for e in table.ents[idx]:  # copies: the sweep below frees them
                rec = self._timeout_record(e, pol, int(now_ns))
                if rec is not None:
                    self.timeouts += 1
                    self.emit(rec)
        n = int(table.expire(budget, int(now_ns)))
        self._expired_last = (table, int(table.ctr[K.C_EXPIRED]))
        return n

    def _names_of(self, pol):
        if self._names is None or self._names[0] is not pol:
            tenants = {int(t.vni): t.name for t in pol.policy.tenants}
            vni_of = {t.name: int(t.vni) for t in pol.policy.tenants}
            wl = {}
            for w, qn in zip(pol.policy.workloads, pol.workload_names):
                for a in w.addresses:
                    hi, lo = B.text_to_addr(str(a))
                    wl[(vni_of.get(w.tenant, -1), hi, lo)] = qn
            self._names = (pol, wl, tenants)
        return self._names[1], self._names[2]

    def _timeout_record(self, e, pol, now_ns: int) -> dict | None:
        zone = int(e["zone"])
        ident = _ident(e)
        if self._ended.pop(ident, None) is not None:
            return None  # its close was logged already (an entry in TIME_WAIT, CLOSE ...)
        wl, tenants = self._names_of(pol)
        p = int(e["proto"])
        return {
            "time": _iso(now_ns),
            "ts_ns": now_ns,
            "event": "end",
            "tenant": tenants.get(zone),
            "vni": zone if zone in tenants else None,
            "proto": PROTOS.get(p, str(p)),
            "verdict": "allow",
            "reason": "timeout",
            "rule": None,
            "src": _addr(e["src_hi"], e["src_lo"]),
            "sport": int(e["sport"]),
            "dst": _addr(e["dst_hi"], e["dst_lo"]),
            "dport": int(e["dport"]),
            "src_workload": wl.get((zone, ident[1], ident[2])),
            "dst_workload": wl.get((zone, ident[3], ident[4])),
            "tcp_state": CK.TCP_STATE_NAMES[int(e["tcp_state"])] if p == 6 else None,
            "close": "timeout",
            "packets_orig": None,
            "bytes_orig": int(e["bytes"][0]),
            "packets_reply": None,
            "bytes_reply": int(e["bytes"][1]),
        }

    @staticmethod
    def _wl(pol, idx) -> str | None:
        idx = int(idx)
        return pol.workload_names[idx] if 0 <= idx < len(pol.workload_names) else None

    @staticmethod
    def _base(keys, res, pol, tenants, i, ts_ns, event) -> dict:
        vni = int(keys.tenant[i])
        rule = int(res.rule[i])
        p = int(keys.proto[i])
        return {
            "time": _iso(ts_ns),
            "ts_ns": ts_ns,
            "event": event,
            "tenant": tenants.get(vni),
            "vni": vni if vni >= 0 else None,
            "proto": PROTOS.get(p, str(p)),
            "verdict": R.verdict_name(res.verdict[i]),
            "reason": R.reason_name(res.reason[i]),
            "rule": pol.describe_rule(rule) if rule >= 0 else None,
        }
