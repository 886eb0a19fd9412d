"""JSON flow logs: one line per connection end and per denied new flow.

Derived per batch from the arrays :meth:`Datapath.process` returns: one vectorised mask
picks the rows that matter (denied packets that would open a flow; allowed TCP packets with
FIN or RST), so allowed established packets cost one comparison each and no Python. For a
connection end the conntrack entry (its original direction and the bytes each way) is read
after the batch; a connection is logged once, when it closes (RST, or FIN seen in both
directions). Nothing of a packet's payload, nor any key, is written.

A line (``record``)::

    {"time": "2026-01-01T12:00:00.123456Z", "ts_ns": ..., "event": "end" | "denied",
     "tenant": "acme", "vni": 5001, "proto": "tcp", "src": "10.0.1.11", "sport": 40000,
     "dst": "10.0.2.21", "dport": 443, "src_workload": "acme/web-1", "dst_workload": ...,
     "verdict": "allow", "reason": "established", "rule": "...", "tcp_state": "LAST_ACK",
     "close": "fin" | "rst", "bytes_orig": N, "bytes_reply": N,
     "packets_orig": null, "packets_reply": null}

The conntrack entry counts bytes each way but not packets, so ``packets_*`` are null for a
connection end (a denied flow's line is one packet: ``packets_orig`` 1).
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


def _addr(hi, lo) -> str:
    return B.addr_to_text(int(hi), int(lo))


class FlowLog:
    """Writes flow records to ``path`` (rotated at ``max_bytes``, ``backups`` old files), or
    to ``sink`` (a callable taking a dict; for tests)."""

    def __init__(self, path: str | None = None, *, max_bytes: int = 64 << 20, backups: int = 5, sink=None):
        self.sink = sink
        self._log = None
        self.lines = 0
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
            ident = (
                int(rec_e["zone"]),
                int(rec_e["src_hi"]),
                int(rec_e["src_lo"]),
                int(rec_e["dst_hi"]),
                int(rec_e["dst_lo"]),
                int(rec_e["sport"]),
                int(rec_e["dport"]),
            )
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
