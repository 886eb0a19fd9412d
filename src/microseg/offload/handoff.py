"""Inspection hand-off: the first packets of each allowed flow are inspected, then the flow is
offloaded to the fast path, kept on the inspected path, or blocked.

Per flow (one entry for both directions: the fast path's flow key with the ingress port left
out and the two endpoints in a fixed order, see :func:`flow_pair_keys`) a small state machine
runs in a Numba kernel over the batch, with a Python step between for the signature scan
(:class:`~microseg.offload.inspect.SignatureSet`; pyahocorasick is a Python API). As in
Suricata, a verdict is the flow's, not one direction's: a ``pass`` match passes both
directions, a ``drop`` match blocks both.

=============  ==================================================================  ==========
state          entered when                                                        offered?
=============  ==================================================================  ==========
INSPECTING     first packet seen; its first ``n_inspect`` packets are inspected     no
CLEAN          ``n_inspect`` packets inspected with no rule matching                yes
PASSED         a ``pass`` rule matched (Suricata passes the whole flow)              yes
ENCRYPTED      the payload cannot be inspected (TLS, QUIC, ESP) and policy allows   yes
ELEPHANT       the flow carried ``elephant_bytes`` while still being inspected      yes
ALERTED        an ``alert`` rule matched: the rest of its first ``n_inspect``        no
               packets are still inspected (a later ``drop`` blocks it, a later
               ``pass`` passes it), and it stays on the inspected path
BLOCKED        a ``drop`` rule matched: this and every later packet is dropped       no
=============  ==================================================================  ==========

A flow in an offered state is offered to the :class:`~microseg.offload.table.FastPathTable`
(at most once per batch); a refused offer (rate, capacity, collision) leaves it on the
inspected path to be offered again with a later packet. Only packets the policy allowed reach
this stage; a packet the policy dropped never creates flow state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit

from ..cache import key as K
from ..cache.core import SlotTable, find_slot, remove_slots
from ..classify import rules as R
from ..lowlevel import bucket_base
from .inspect import ALERT, DROP, ENC_NAMES, ENC_NONE, PASS, SignatureSet, uninspectable
from .table import OFFER_OK, OFFER_PRESENT, FastPathTable, _rows

INSPECTING, CLEAN, PASSED, ENCRYPTED, ELEPHANT, ALERTED, BLOCKED = range(7)
STATE_NAMES = ("inspecting", "clean", "passed", "encrypted", "elephant", "alerted", "blocked")
_OFFERABLE = (CLEAN, PASSED, ENCRYPTED, ELEPHANT)

COUNTERS = (
    "packets",
    "inspected",
    "dropped",
    "alerted_packets",
    "encrypted_packets",
    "offers",
    "offers_accepted",
    "flows_created",
    "flows_evicted",
    "flows_removed",
)
(
    C_PKTS,
    C_INSPECTED,
    C_DROPPED,
    C_ALERTED,
    C_ENCRYPTED,
    C_OFFERS,
    C_ACCEPTED,
    C_CREATED,
    C_EVICTED,
    C_REMOVED,
) = range(len(COUNTERS))


@dataclass
class HandoffResult:
    """Per-packet results (arrays of the batch's length)."""

    drop: np.ndarray  # bool: dropped here (signature drop, or a blocked flow)
    inspected: np.ndarray  # bool: payload went through the signatures
    verdict: np.ndarray  # uint8: inspection verdict (inspect.NONE/PASS/ALERT/DROP)
    sid: np.ndarray  # int64: deciding rule's sid (0 none)
    encrypted: np.ndarray  # uint8: inspect.ENC_* reason (inspected rows only)
    offered: np.ndarray  # bool: this packet offered its flow to the fast path
    outcome: np.ndarray  # uint8: table.OFFER_* for offered rows, 255 otherwise


_IN_PORT_MASK = np.uint64(~(0xFFFF << R.SH_IN_PORT) & 0xFFFFFFFFFFFFFFFF)
_PAIR_SEED = 0x0FF2


@njit(cache=True)
def _pair_keys(fk, valid, out, hashes, rev):
    """One key for both directions of a flow: the ingress port cleared, the endpoints (address,
    port) in ascending order, ICMP echo replies as requests; ``rev``: the endpoints were swapped."""
    m16 = np.uint64(0xFFFF)
    for i in range(fk.shape[0]):
        for w in range(K.W):
            out[i, w] = fk[i, w]
        rev[i] = False
        if not valid[i]:
            hashes[i] = 0
            continue
        out[i, K.K_META] = fk[i, K.K_META] & _IN_PORT_MASK
        l4 = fk[i, K.K_L4]
        kind = (fk[i, K.K_CT] >> np.uint64(K.SH_KIND)) & np.uint64(0xF)
        sp = (l4 >> np.uint64(K.SH_SPORT)) & m16
        dp = (l4 >> np.uint64(K.SH_DPORT)) & m16
        if kind & np.uint64(K.KIND_ICMP):
            t = (l4 >> np.uint64(K.SH_ICMP_TYPE)) & np.uint64(0xFF)
            nt = t
            if t == np.uint64(0):
                nt = np.uint64(8)
            elif t == np.uint64(129):
                nt = np.uint64(128)
            l4 = (l4 & ~(np.uint64(0xFF) << np.uint64(K.SH_ICMP_TYPE))) | (nt << np.uint64(K.SH_ICMP_TYPE))
        a0, a1 = fk[i, K.K_SRC_HI], fk[i, K.K_SRC_LO]
        b0, b1 = fk[i, K.K_DST_HI], fk[i, K.K_DST_LO]
        if a0 > b0 or (a0 == b0 and (a1 > b1 or (a1 == b1 and sp > dp))):
            rev[i] = True
            out[i, K.K_SRC_HI], out[i, K.K_SRC_LO] = b0, b1
            out[i, K.K_DST_HI], out[i, K.K_DST_LO] = a0, a1
            if kind & np.uint64(K.KIND_PORTS):
                l4 = (
                    (l4 & ~((m16 << np.uint64(K.SH_SPORT)) | (m16 << np.uint64(K.SH_DPORT))))
                    | (dp << np.uint64(K.SH_SPORT))
                    | (sp << np.uint64(K.SH_DPORT))
                )
        out[i, K.K_L4] = l4
        hashes[i] = K.hash_row(out, i, _PAIR_SEED)


def flow_pair_keys(fk, valid):
    """``(keys, hashes, reversed)``: the inspection state's key of each packet's flow, the same
    for both directions (from the fast path's flow keys ``fk``)."""
    n = fk.shape[0]
    out = np.empty((n, K.W), np.uint64)
    h = np.empty(n, np.uint64)
    rev = np.empty(n, np.bool_)
    _pair_keys(fk, np.asarray(valid[:n], np.bool_), out, h, rev)
    return out, h, rev


@njit(cache=True)
def _admit(
    fk,
    fh,
    rows,
    wire_len,
    n_inspect,
    keys,
    tag,
    mid,
    stamp,
    state,
    n_insp,
    pkts,
    byts,
    sid,
    nb,
    ways,
    clock,
    slot_of,
    need,
    seq,
    cum,
    ctr,
):
    for j in range(rows.shape[0]):
        i = rows[j]
        s = find_slot(keys, tag, mid, nb, ways, fh[i], 0, fk[i])
        if s < 0:
            base = bucket_base(fh[i], nb, ways)
            s = -1
            lru = base
            for q in range(base, base + ways):
                if tag[q] == np.uint64(0):
                    s = q
                    break
                if stamp[q] < stamp[lru]:
                    lru = q
            if s < 0:
                s = lru
                ctr[C_EVICTED] += 1
            for w in range(K.W):
                keys[s, w] = fk[i, w]
            tag[s] = fh[i]
            mid[s] = 0
            state[s] = INSPECTING
            n_insp[s] = 0
            pkts[s] = 0
            byts[s] = 0
            sid[s] = 0
            ctr[C_CREATED] += 1
        stamp[s] = clock
        slot_of[j] = s
        pkts[s] += 1
        byts[s] += wire_len[i]
        need[j] = False
        if (state[s] == INSPECTING or state[s] == ALERTED) and n_insp[s] < n_inspect:
            need[j] = True
            n_insp[s] += 1
        seq[j] = n_insp[s]
        cum[j] = byts[s]


@njit(cache=True)
def _decide(
    rows,
    rev,
    slot_of,
    need,
    seq,
    cum,
    verdict,
    enc,
    sids,
    n_inspect,
    elephant_bytes,
    state,
    sid,
    batch_mark,
    clock,
    drop,
    offer,
    ctr,
):
    for j in range(rows.shape[0]):
        i = rows[j]
        s = slot_of[j]
        if need[j] and state[s] != INSPECTING and state[s] != ALERTED:
            # an earlier packet of this batch ended the flow's inspection: as if never scanned
            need[j] = False
            verdict[i] = 0
            sids[i] = 0
            enc[i] = ENC_NONE
        if need[j]:
            v = verdict[i]
            if v == DROP:
                state[s] = BLOCKED
                sid[s] = sids[i]
            elif state[s] != BLOCKED:
                if v == PASS:
                    state[s] = PASSED
                    sid[s] = sids[i]
                elif v == ALERT:
                    if state[s] != ALERTED:
                        sid[s] = sids[i]
                    state[s] = ALERTED
                    ctr[C_ALERTED] += 1
                elif state[s] == INSPECTING:
                    if enc[i] != ENC_NONE:
                        state[s] = ENCRYPTED
                    elif seq[j] >= n_inspect:
                        state[s] = CLEAN
            if enc[i] != ENC_NONE:
                ctr[C_ENCRYPTED] += 1
        if state[s] == INSPECTING and elephant_bytes > 0 and cum[j] >= elephant_bytes:
            state[s] = ELEPHANT
        if state[s] == BLOCKED:
            drop[i] = True
            ctr[C_DROPPED] += 1
            continue
        st = state[s]
        d = 1 if rev[j] else 0
        if (st == CLEAN or st == PASSED or st == ENCRYPTED or st == ELEPHANT) and batch_mark[s, d] != clock:
            batch_mark[s, d] = clock  # each direction is its own fast-path entry
            offer[i] = True


class FlowInspector:
    """Per-flow inspection state and the offload decision (see module docstring).

    ``signatures``: a :class:`SignatureSet` or None (then only encrypted traffic is detected and
    flows are clean after ``n_inspect`` packets); ``table``: the :class:`FastPathTable` to
    offer to; ``n_inspect``: packets inspected per flow (default 8); ``elephant_bytes``: bytes
    after which a flow still under inspection is offered anyway (0 disables); ``flows``: size of
    the state table (least recently seen flows are evicted: they start inspection again).
    """

    def __init__(
        self,
        signatures: SignatureSet | None = None,
        table: FastPathTable | None = None,
        n_inspect: int = 8,
        elephant_bytes: int = 1 << 20,
        flows: int = 1 << 18,
        ways: int = 8,
    ):
        if n_inspect < 1:
            raise ValueError("n_inspect must be at least 1")
        self.signatures = signatures
        self.table = table if table is not None else FastPathTable()
        self.n_inspect = int(n_inspect)
        self.elephant_bytes = int(elephant_bytes)
        self.t = SlotTable(flows, ways)
        cap = self.t.capacity
        self.state = np.zeros(cap, np.uint8)
        self.n_insp = np.zeros(cap, np.int32)
        self.pkts = np.zeros(cap, np.int64)
        self.byts = np.zeros(cap, np.int64)
        self.sid = np.zeros(cap, np.int64)
        self.mark = np.zeros((cap, 2), np.uint64)
        self.counters = np.zeros(len(COUNTERS), np.int64)
        self._clock = 1

    def process(self, batch, keys, kmat, valid, allowed, ct_state=None, flow=None) -> HandoffResult:
        """Run the inspected path for the packets in ``allowed & valid`` (policy allowed,
        not served by the fast path). ``flow``: the table's ``flow_keys(kmat, valid)`` if
        already computed. Offers flows to the table with the packets' timestamps."""
        n = keys.n
        res = HandoffResult(
            np.zeros(n, np.bool_),
            np.zeros(n, np.bool_),
            np.zeros(n, np.uint8),
            np.zeros(n, np.int64),
            np.zeros(n, np.uint8),
            np.zeros(n, np.bool_),
            np.full(n, 255, np.uint8),
        )
        rows = np.flatnonzero(np.asarray(allowed[:n], bool) & np.asarray(valid[:n], bool)).astype(np.int64)
        if rows.size == 0:
            return res
        fk, fh = self.table.flow_keys(kmat, valid) if flow is None else flow
        pk, ph, prev = flow_pair_keys(fk, valid)
        rrev = prev[rows]
        wire = np.asarray(batch.wire_len, np.int64)
        slot_of = np.empty(rows.shape[0], np.int64)
        need = np.empty(rows.shape[0], np.bool_)
        seq = np.empty(rows.shape[0], np.int32)
        cum = np.empty(rows.shape[0], np.int64)
        t = self.t
        clock = np.uint64(self._clock)
        self._clock += 1
        _admit(
            pk,
            ph,
            rows,
            wire,
            self.n_inspect,
            t.keys,
            t.tag,
            t.mid,
            t.stamp,
            self.state,
            self.n_insp,
            self.pkts,
            self.byts,
            self.sid,
            t.n_buckets,
            t.ways,
            clock,
            slot_of,
            need,
            seq,
            cum,
            self.counters,
        )
        irows = rows[need]
        if irows.size:
            if self.signatures is not None:
                r = self.signatures.inspect(batch, keys, irows, ct_state)
                res.verdict[:], res.sid[:], res.encrypted[:] = r.verdict, r.sid, r.encrypted
            else:
                res.encrypted[:] = uninspectable(batch, keys, irows)
        _decide(
            rows,
            rrev,
            slot_of,
            need,
            seq,
            cum,
            res.verdict,
            res.encrypted,
            res.sid,
            self.n_inspect,
            self.elephant_bytes,
            self.state,
            self.sid,
            self.mark,
            clock,
            res.drop,
            res.offered,
            self.counters,
        )
        res.inspected[rows[need]] = True
        self.counters[C_PKTS] += rows.size
        self.counters[C_INSPECTED] += int(np.count_nonzero(need))
        orows = np.flatnonzero(res.offered)
        if orows.size:
            out = self.table.offer(kmat, valid, orows, 1, -1, batch.ts, (fk, fh))
            res.outcome[orows] = out
            self.counters[C_OFFERS] += orows.size
            self.counters[C_ACCEPTED] += int(np.count_nonzero((out == OFFER_OK) | (out == OFFER_PRESENT)))
        return res

    def remove(self, kmat, valid, rows=None) -> int:
        """Forget the flows of the given packets (conntrack ended them), here and in the table."""
        rows = np.arange(kmat.shape[0]) if rows is None else _rows(rows, kmat.shape[0])
        rows = rows[np.asarray(valid)[rows]]
        fk, fh = self.table.flow_keys(kmat, valid)
        pk, ph, _ = flow_pair_keys(fk, valid)
        n = int(
            remove_slots(
                pk,
                ph,
                rows.astype(np.int64),
                self.t.keys,
                self.t.tag,
                self.t.mid,
                self.t.n_buckets,
                self.t.ways,
            )
        )
        self.counters[C_REMOVED] += n
        self.table.remove(kmat, valid, rows)
        return n

    def reset(self) -> None:
        """Forget every flow's inspection state (new signatures or policy)."""
        self.t.clear()

    def stats(self) -> dict:
        d: dict[str, Any] = {name: int(v) for name, v in zip(COUNTERS, self.counters)}
        live = self.t.tag != 0
        d["flows"] = {
            STATE_NAMES[s]: int(np.count_nonzero(live & (self.state == s))) for s in range(len(STATE_NAMES))
        }
        d["table"] = self.table.stats()
        return d


__all__ = ["FlowInspector", "HandoffResult", "STATE_NAMES", "ENC_NAMES"]


def handoff_ref(
    flows, wire_len, eligible, verdict, enc, sid, batch_of, n_inspect, elephant_bytes, direction=None
):
    """Plain-Python reference of the per-flow state machine, for tests.

    Per packet: ``flows[i]`` a hashable flow key, the same for both directions of a flow;
    ``direction[i]`` (default all 0) which direction the packet goes (each direction is offered
    at most once per batch, being its own fast-path entry); ``eligible[i]`` allowed and
    cacheable, ``verdict/enc/sid[i]`` what inspection would say, ``batch_of[i]`` its batch
    number. Every offer is assumed accepted. Returns ``(drop, inspected, offered, states)``.
    """
    st = {}
    n = len(flows)
    drop, inspected, offered = [False] * n, [False] * n, [False] * n
    for i in range(n):
        if not eligible[i]:
            continue
        f = st.setdefault(flows[i], {"state": INSPECTING, "n": 0, "bytes": 0, "mark": {}})
        f["bytes"] += int(wire_len[i])
        need = f["state"] in (INSPECTING, ALERTED) and f["n"] < n_inspect
        if need:
            f["n"] += 1
            inspected[i] = True
            v = verdict[i]
            if v == DROP:
                f["state"] = BLOCKED  # Suricata drops the rest of the flow
            elif v == PASS:
                f["state"] = PASSED  # Suricata passes the rest of the flow, both directions
            elif v == ALERT:
                f["state"] = ALERTED  # logged; the flow's first packets are still inspected
            elif f["state"] == INSPECTING:
                if enc[i] != ENC_NONE:
                    f["state"] = ENCRYPTED
                elif f["n"] >= n_inspect:
                    f["state"] = CLEAN
        if f["state"] == INSPECTING and elephant_bytes > 0 and f["bytes"] >= elephant_bytes:
            f["state"] = ELEPHANT
        if f["state"] == BLOCKED:
            drop[i] = True
            continue
        d = 0 if direction is None else int(direction[i])
        if f["state"] in _OFFERABLE and f["mark"].get(d) != batch_of[i]:
            f["mark"][d] = batch_of[i]
            offered[i] = True
    return drop, inspected, offered, {k: v["state"] for k, v in st.items()}
