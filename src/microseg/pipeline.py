"""The datapath end to end: the stages wired together over batches.

Per batch (``Datapath.process``), in order::

    parse (tunnels give the tenant)
      -> conntrack (every packet: NEW / ESTABLISHED / RELATED / INVALID)
      -> fast path (ESTABLISHED packets of offloaded flows: one lookup, nothing else)
      -> ESTABLISHED / RELATED / INVALID: port security and the state decide (no rules)
      -> NEW: exact-match cache -> megaflow cache -> slow path (policy decision: tenant, port
         security, security groups and network policies via the classifier)
      -> verdict (allow / drop / reject) -> inspection of a flow's first packets, then offload
      -> output (allowed frames re-encapsulated towards the destination workload's host;
         rejects answered with a TCP RST or an ICMP unreachable towards the sender)

Conntrack runs on every packet, before the fast path and the caches (as in Linux and in Open
vSwitch's ``ct()`` recirculation), so the caches key on the conntrack state too. The caches
front the classifier, so they serve NEW packets; a packet of a tracked connection is answered
from its state and port security in the same compiled pass as the slow path, which measured
cheaper than a cache lookup and insert. The fast path
stands for a SmartNIC flow table with hardware connection tracking: it answers only the
ESTABLISHED packets of offloaded flows (never SYN, FIN or RST), and TCP window checks stay
strict for them. (A Linux flowtable instead turns an offloaded flow's window tracking liberal;
here an out-of-window segment injected into an offloaded flow is still INVALID and dropped.)

Cache keys are the classifier's packet key (:mod:`microseg.cache.key`) with one change: the
``in_port`` field carries the *source identity* (which workload the source MAC belongs to,
:func:`source_identity`), because port security (anti-spoofing) is part of the decision and a
cached answer must not be reused for a frame with another source MAC. A cached value packs the
verdict and its reason in one byte (``verdict | reason << 2``).

Megaflow entries wildcard what the policy provably never looks at: the source port and the TCP
flags when no compiled rule constrains them (security groups and NetworkPolicies have neither),
and the ICMP echo identifier. Everything else is exact, so an entry gives every packet it
covers the answer the slow path would give.

Every drop is counted with its reason (:data:`REASONS`); counters exist per rule, per workload,
per tenant, per cache level and per conntrack state.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from numba import njit

from . import ctstate
from .cache.emc import ExactMatchCache
from .cache.key import K_CT, K_L4, SH_ICMP_ID, SH_SPORT, SH_TCP_FLAGS, W, build_keys
from .cache.megaflow import MegaflowCache
from .conntrack.table import ConntrackTable
from .offload.handoff import FlowInspector
from .offload.inspect import SignatureSet
from .offload.table import FastPathTable
from .packet import batch as B
from .packet.batch import Batch, FlowKeys
from .packet.parse import parse
from .policy import verdict as V
from .policy.compiler import CompiledPolicy, _lookup3, _search1, revoked_connections

# which level answered a packet
L_NONE, L_FAST, L_EMC, L_MEGAFLOW, L_SLOW, L_STATE = 0, 1, 2, 3, 4, 5
LEVELS = {L_FAST: "fast_path", L_STATE: "conntrack_state", L_EMC: "exact_match",
          L_MEGAFLOW: "megaflow", L_SLOW: "slow_path"}

# reasons beyond the policy's own (microseg.policy.verdict.R_*)
R_SIGNATURE = 30        # an inspection signature (or a flow it blocked) dropped the packet
REASONS = dict(V.REASONS)
REASONS[R_SIGNATURE] = "signature"

NO_L2 = 0xFFFF          # source identity of a packet with no Ethernet header (raw IP)
UNKNOWN_MAC = 0xFFFE    # source MAC that no workload of the tenant owns


@dataclass
class DatapathConfig:
    """Settings of one enforcement point. Sizes are entries; rates per second of packet time."""

    batch_size: int = 1024           # per-batch Python costs amortise over more packets (256 in benchmarks too)
    conntrack_capacity: int = 1 << 20
    conntrack_timeouts: dict | None = None
    caches: bool = True
    emc_entries: int = 65536         # one entry per direction and TCP-flag variant of a flow
    megaflow_entries: int = 65536
    offload: bool = True
    offload_capacity: int = 500_000
    offload_rate: float = 7000.0
    inspect_packets: int = 8
    elephant_bytes: int = 1 << 20
    signatures: SignatureSet | None = None
    cut_revoked: bool = True          # a new policy cuts established connections it forbids
    tunnel: str = "vxlan"             # encapsulation of forwarded frames: vxlan | geneve | nvgre
    checksum: bool = True             # conntrack verifies L4 checksums (Linux's default)


@dataclass
class BatchResult:
    """Per-packet results of :meth:`Datapath.process`, in input order."""

    verdict: np.ndarray     # uint8 V.ALLOW / V.DROP / V.REJECT
    reason: np.ndarray      # uint8, REASONS
    rule: np.ndarray        # int32 rule-set index of the deciding rule (-1 none)
    ct: np.ndarray          # uint8 conntrack bits (microseg.ctstate), every packet
    level: np.ndarray       # uint8 L_* (which level answered)
    sid: np.ndarray         # int64 signature id that alerted or dropped (0 none)
    src_workload: np.ndarray  # int32 index into policy.workloads (-1 none)
    dst_workload: np.ndarray  # int32

    @classmethod
    def empty(cls, n: int) -> "BatchResult":
        return cls(np.zeros(n, np.uint8), np.zeros(n, np.uint8), np.full(n, -1, np.int32),
                   np.zeros(n, np.uint8), np.zeros(n, np.uint8), np.zeros(n, np.int64),
                   np.full(n, -1, np.int32), np.full(n, -1, np.int32))

    def __getitem__(self, idx) -> "BatchResult":
        """The results of packets ``idx`` (a slice gives views, for writing in place)."""
        return BatchResult(*(getattr(self, f)[idx] for f in _FIELDS))

    @classmethod
    def concat(cls, parts) -> "BatchResult":
        parts = list(parts)
        if not parts:
            return cls.empty(0)
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.__dataclass_fields__))


_FIELDS = tuple(BatchResult.__dataclass_fields__)


# ---------------------------------------------------------------------------------------------
# Endpoint identities (which workload sent / receives a packet, and whose MAC it carries)
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def _identities(u64, i32, n, t_vni, untagged, a_t, a_hi, a_lo, a_w, m_t, m_mac, m_lo, m_w,
                src_w, dst_w, src_id):
    zero = np.uint64(0)
    for i in range(n):
        src_w[i] = -1
        dst_w[i] = -1
        src_id[i] = UNKNOWN_MAC
        vni = i32[B.TENANT, i]
        ti = untagged if vni == -1 else _search1(t_vni, np.int64(vni))
        if ti < 0:
            continue
        tt = np.int64(ti)
        src_w[i] = _lookup3(a_t, a_hi, a_lo, a_w, tt, u64[B.SRC_HI, i], u64[B.SRC_LO, i])
        dst_w[i] = _lookup3(a_t, a_hi, a_lo, a_w, tt, u64[B.DST_HI, i], u64[B.DST_LO, i])
        if i32[B.L2_OFF, i] < 0:
            src_id[i] = NO_L2
        else:
            owner = _lookup3(m_t, m_mac, m_lo, m_w, tt, u64[B.ETH_SRC, i], zero)
            if 0 <= owner < UNKNOWN_MAC:
                src_id[i] = owner


def source_identity(policy: CompiledPolicy, keys: FlowKeys):
    """``(src_workload, dst_workload, source_id)`` per packet.

    ``source_id`` is the index of the workload that owns the frame's source MAC in its tenant,
    ``UNKNOWN_MAC`` when none does, ``NO_L2`` for raw IP: everything port security looks at
    beyond the addresses, in 16 bits.
    """
    n = keys.n
    src_w = np.empty(n, np.int32)
    dst_w = np.empty(n, np.int32)
    sid = np.empty(n, np.uint16)
    _identities(keys.u64, keys.i32, n, policy._t_vni, policy._untagged, *policy._a, *policy._m,
                src_w, dst_w, sid)
    return src_w, dst_w, sid


def megaflow_mask(policy: CompiledPolicy) -> np.ndarray:
    """The wildcard mask of the datapath's megaflow entries for ``policy`` (see module doc)."""
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


@njit(cache=True)
def _count(verdict, reason, level, ct, rule, src_w, dst_w, tenant, vnis, c_verdict, c_reason,
           c_level, c_ct, c_rule, w_tx, w_rx, w_drop, c_tenant):
    nv = vnis.shape[0]
    for i in range(verdict.shape[0]):
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
        t = _search1(vnis, np.int64(tenant[i])) if nv else -1
        c_tenant[t if t >= 0 else nv, v] += 1


def _subset(keys: FlowKeys, idx: np.ndarray, out: FlowKeys) -> FlowKeys:
    out.resize(idx.shape[0])
    for t in ("u64", "u32", "i32", "u16", "u8"):
        src = getattr(keys, t)
        getattr(out, t)[:, : idx.shape[0]] = src[:, idx]
    return out


# ---------------------------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------------------------
class Counters:
    """Everything the datapath counts, as arrays indexed by code (cheap per batch);
    :meth:`as_dict` names them for reports."""

    def __init__(self, n_rules: int, n_workloads: int, tenant_vnis):
        self.packets = 0
        self.bytes = 0
        self.seconds = 0.0
        self.revoked_connections = 0
        self.verdict = np.zeros(4, np.int64)
        self.reason = np.zeros(256, np.int64)
        self.level = np.zeros(8, np.int64)
        self.ct = np.zeros(256, np.int64)
        self.resize(n_rules, n_workloads, tenant_vnis)

    def resize(self, n_rules: int, n_workloads: int, tenant_vnis) -> None:
        """(Re)shape the per-rule, per-workload and per-tenant counters for a policy."""
        self.rule = np.zeros(n_rules, np.int64)
        self.workload_tx = np.zeros(n_workloads, np.int64)
        self.workload_rx = np.zeros(n_workloads, np.int64)
        self.workload_dropped = np.zeros(n_workloads, np.int64)
        self.vnis = np.asarray(sorted(tenant_vnis), np.int64)
        self.tenant = np.zeros((self.vnis.shape[0] + 1, 4), np.int64)   # last row: other / none

    def add(self, batch: Batch, keys: FlowKeys, res: BatchResult) -> None:
        self.packets += res.verdict.shape[0]
        self.bytes += int(np.asarray(batch.wire_len, np.int64).sum())
        _count(res.verdict, res.reason, res.level, res.ct, res.rule, res.src_workload,
               res.dst_workload, keys.tenant, self.vnis, self.verdict, self.reason, self.level,
               self.ct, self.rule, self.workload_tx, self.workload_rx, self.workload_dropped,
               self.tenant)

    def as_dict(self) -> dict:
        def named(arr, names):
            return {names.get(i, str(i)): int(v) for i, v in enumerate(arr) if v}
        ct_names = {**ctstate.NAMES, 0: "untracked"}
        tenants = {}
        for k in range(self.tenant.shape[0]):
            row = named(self.tenant[k], V.VERDICTS)
            if row:
                tenants[str(int(self.vnis[k])) if k < self.vnis.shape[0] else "other"] = row
        return {"packets": self.packets, "bytes": self.bytes, "seconds": self.seconds,
                "verdicts": named(self.verdict, V.VERDICTS), "reasons": named(self.reason, REASONS),
                "levels": {name: int(self.level[code]) for code, name in LEVELS.items()},
                "conntrack_states": named(self.ct, ct_names), "tenants": tenants,
                "revoked_connections": self.revoked_connections}


# ---------------------------------------------------------------------------------------------
# The datapath
# ---------------------------------------------------------------------------------------------
class Datapath:
    """One enforcement point: a compiled policy plus the stateful stages (see module doc)."""

    def __init__(self, policy: CompiledPolicy, config: DatapathConfig | None = None):
        self.config = cfg = config or DatapathConfig()
        self.policy = policy
        self.conntrack = ConntrackTable(capacity=cfg.conntrack_capacity,
                                        timeouts=cfg.conntrack_timeouts, checksum=cfg.checksum)
        self.emc = ExactMatchCache(cfg.emc_entries, version=policy.version) if cfg.caches else None
        self.megaflow = MegaflowCache(cfg.megaflow_entries, version=policy.version) if cfg.caches else None
        self.fastpath = FastPathTable(cfg.offload_capacity, cfg.offload_rate, version=policy.version)
        self.inspector = FlowInspector(cfg.signatures, self.fastpath, n_inspect=cfg.inspect_packets,
                                       elephant_bytes=cfg.elephant_bytes)
        self._mf_mask = megaflow_mask(policy)
        self._mf_rows = np.zeros((0, W), np.uint64)
        self._keys = FlowKeys(cfg.batch_size)
        self._miss = FlowKeys(cfg.batch_size)
        self.counters = Counters(len(policy.ruleset), len(policy.workload_names),
                                 [t.vni for t in policy.policy.tenants])
        self.policy_swaps = 0

    # -- policy -----------------------------------------------------------------------------------
    def swap_policy(self, new: CompiledPolicy) -> dict:
        """Install ``new`` atomically between batches: caches and the fast path move to its
        version, and (``cut_revoked``) tracked connections it forbids are deleted, so their
        next packets are judged as new ones. Per-rule, per-workload and per-tenant counters
        restart with the new policy (rule indices are its own); the others run on."""
        old, self.policy = self.policy, new
        self._mf_mask = megaflow_mask(new)
        self._mf_rows = np.zeros((0, W), np.uint64)
        self.counters.resize(len(new.ruleset), len(new.workload_names), [t.vni for t in new.policy.tenants])
        out = {"old_version": old.version, "new_version": new.version, "cut": 0}
        if self.emc is not None:
            self.emc.revalidate(new.version)
            self.megaflow.revalidate(new.version)
        self.fastpath.revalidate(new.version)
        self.inspector.reset()
        if self.config.cut_revoked:
            def forbidden(e):
                zone = e["zone"].astype(np.int64)          # the VNI; the default zone: untunnelled
                tenant = np.where(zone == self.conntrack.default_zone, -1, zone)
                sport = np.where(np.isin(e["proto"], (1, 58)), e["icmp_type"], e["sport"])
                dport = np.where(np.isin(e["proto"], (1, 58)), e["icmp_code"], e["dport"])
                return revoked_connections(old, new, tenant, e["src_hi"], e["src_lo"], e["dst_hi"],
                                           e["dst_lo"], e["proto"], sport, dport)
            out["cut"] = self.conntrack.delete_where(forbidden)
            self.counters.revoked_connections += out["cut"]
        self.policy_swaps += 1
        return out

    # -- packets ----------------------------------------------------------------------------------
    def process(self, batch: Batch) -> BatchResult:
        """Run every packet of ``batch`` through the datapath (in chunks of ``batch_size``)."""
        t0 = time.perf_counter()
        n = len(batch)
        out = BatchResult.empty(n)
        size = self.config.batch_size
        for s in range(0, n, size):
            e = min(s + size, n)
            self._chunk(batch.slice(s, e), out[s:e])
        self.counters.seconds += time.perf_counter() - t0
        return out

    def _chunk(self, batch: Batch, res: BatchResult) -> None:
        """One batch through every stage, results written into ``res`` (views of the caller's
        arrays, zeroed). Stages take the whole batch plus a row mask, so the common path copies
        nothing; only the slow path's misses are gathered.

        Conntrack commits on allow: when a packet would open a connection, the policy judges
        it (and every later packet of the batch that has no connection yet) as NEW first, and
        only an allowed packet creates the entry. So a denied SYN leaves nothing that a reply
        later in the same batch could ride on, and every packet's verdict and state are the
        ones it gets when packets come one at a time."""
        pol = self.policy
        cfg = self.config
        n = len(batch)
        keys = parse(batch, self._keys)
        src_w, dst_w, src_id = source_identity(pol, keys)
        res.src_workload[:] = src_w
        res.dst_workload[:] = dst_w
        verdict, reason, rule, level = res.verdict, res.reason, res.rule, res.level
        pre = np.zeros(n, np.bool_)          # rows judged as NEW while conntrack ran

        def decide_new(rows):
            ct_new = np.full(n, ctstate.TRACKED | ctstate.NEW, np.uint8)
            kmat, hashes, valid = build_keys(keys, src_id, ct_new)
            todo = np.zeros(n, np.bool_)
            todo[rows] = True
            level[rows] = L_SLOW
            self._decide(keys, ct_new, todo, valid & todo, kmat, hashes, res)
            pre[rows] = True
            return verdict[rows] == V.ALLOW

        # conntrack sees every packet (the fast path stands for a flow table with hardware
        # connection tracking: window checks stay strict for offloaded flows)
        ct = self.conntrack.process(batch, keys, decide=decide_new)
        res.ct[:] = ct
        kmat, hashes, valid = build_keys(keys, src_id, ct)        # in_port := source identity
        # a row judged as NEW keeps that answer if NEW is what conntrack made of it
        todo = ~(pre & (ct == (ctstate.TRACKED | ctstate.NEW)))

        # fast path: an offloaded flow's ESTABLISHED packets (never SYN/FIN/RST)
        fast = None
        if cfg.offload and self.fastpath.used:
            est = valid & ((ct & ctstate.STATE_MASK) == ctstate.ESTABLISHED)
            fast, fverdict, _ = self.fastpath.lookup(kmat, est, batch.wire_len, batch.ts)
            if fast.any():
                verdict[fast] = fverdict[fast]
                reason[fast] = V.R_ESTABLISHED
                level[fast] = L_FAST
                todo &= ~fast

        # A tracked packet that is not NEW (ESTABLISHED, RELATED, INVALID) is answered by port
        # security and its state alone: no rule is consulted, so no cache is worth its lookup.
        # The caches sit in front of the classifier: NEW (and untracked) packets only.
        st = ct & ctstate.STATE_MASK
        by_state = todo & (st != 0) & (st != ctstate.NEW)
        if todo.any():
            level[todo] = L_SLOW
            level[by_state] = L_STATE
            self._decide(keys, ct, todo, valid & todo & ~by_state, kmat, hashes, res)

        # inspection, then offload, for allowed packets the fast path did not carry
        allowed = verdict == V.ALLOW
        if cfg.offload and allowed.any():
            insp = allowed if fast is None else allowed & ~fast
            h = self.inspector.process(batch, keys, kmat, valid, insp, ct)
            if h.drop.any():
                verdict[h.drop] = V.DROP
                reason[h.drop] = R_SIGNATURE
            res.sid[:] = h.sid
            ends = valid & insp & ((keys.tcp_flags & 0x05) != 0)        # FIN or RST
            if ends.any():
                self.inspector.remove(kmat, valid, np.flatnonzero(ends))
        self.counters.add(batch, keys, res)

    def _decide(self, keys, ct, todo, cacheable, kmat, hashes, res) -> None:
        """Answer the rows ``todo`` (a mask over the batch) from the caches, for the
        ``cacheable`` ones, then from the compiled policy (one call for every miss); the
        policy's answers to cacheable rows are cached. ``level`` of the policy's rows is left
        as the caller set it (slow path or conntrack state)."""
        n = keys.n
        verdict, reason, rule, level = res.verdict, res.reason, res.rule, res.level
        if self.emc is not None and cacheable.any():
            todo = todo.copy()
            cacheable = cacheable.copy()
            e = self.emc.lookup(kmat, hashes, cacheable)
            if e.hit.any():
                _unpack(e.hit, e.verdict, e.rule, L_EMC, verdict, reason, rule, level)
                todo &= ~e.hit
                cacheable &= ~e.hit
            mf = self.megaflow.lookup(kmat, cacheable) if cacheable.any() else None
            if mf is not None and mf.hit.any():
                _unpack(mf.hit, mf.verdict, mf.rule, L_MEGAFLOW, verdict, reason, rule, level)
                todo &= ~mf.hit
                cacheable &= ~mf.hit
                self.emc.insert(kmat, hashes, mf.hit, mf.verdict, mf.rule)
        miss = np.flatnonzero(todo)
        if miss.size == 0:
            return
        mk = keys if miss.size == n else _subset(keys, miss, self._miss)
        v, r, why = self.policy.decide(mk, ct[miss] if miss.size < n else ct)
        verdict[miss], rule[miss], reason[miss] = v, r, why
        if self.emc is not None:
            ins = np.flatnonzero(cacheable)
            if ins.size:
                packed = (verdict | (reason << 2)).astype(np.uint8)
                self.emc.insert(kmat, hashes, ins, packed, rule)
                self.megaflow.insert(kmat, self._mf_masks(n), ins, packed, rule)

    def _mf_masks(self, n: int) -> np.ndarray:
        if self._mf_rows.shape[0] < n:
            self._mf_rows = np.ascontiguousarray(np.broadcast_to(self._mf_mask, (max(n, 256), W)))
        return self._mf_rows[:n]

    # -- reporting --------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters and the state of every stage, as plain data (for reports and JSON)."""
        c = self.counters
        pol = self.policy
        out = c.as_dict()
        rules = [{"index": int(i), "rule": pol.describe_rule(int(i)), "packets": int(p)}
                 for i, p in enumerate(c.rule) if p]
        rules.sort(key=lambda d: -d["packets"])
        looked = sum(out["levels"].values())
        out.update({
            "policy": {"version": pol.version, "hash": pol.content_hash, "rules": len(pol.ruleset)},
            "mpps": c.packets / c.seconds / 1e6 if c.seconds else 0.0,
            "hit_rates": {k: (v / looked if looked else 0.0) for k, v in out["levels"].items()},
            "rules": rules,
            "workloads": {name: {"tx": int(c.workload_tx[i]), "rx": int(c.workload_rx[i]),
                                 "dropped": int(c.workload_dropped[i])}
                          for i, name in enumerate(pol.workload_names)},
            "conntrack": {"entries": len(self.conntrack), **self.conntrack.counters},
            "inspection": self.inspector.stats(),
        })
        if self.emc is not None:
            out["emc"] = self.emc.stats()
            out["megaflow"] = self.megaflow.stats()
        return out


# ---------------------------------------------------------------------------------------------
# Output: forward allowed frames, answer rejected ones
# ---------------------------------------------------------------------------------------------
def reject_reply(packet: bytes, keys_row: dict) -> bytes | None:
    """The answer to a rejected packet, as an Ethernet frame towards its sender: a TCP RST
    (RFC 9293 §3.10.7.1: the reset takes its sequence number from the offending ACK) or an ICMP
    "administratively prohibited" unreachable (ICMPv6 type 1 code 1) quoting the packet. None
    for what must never be answered (a RST, an ICMP error, a non-first fragment)."""
    from .packet import build as PB
    k = keys_row
    src = B.addr_to_text(k["src_hi"], k["src_lo"])
    dst = B.addr_to_text(k["dst_hi"], k["dst_lo"])
    l2 = k["l2_off"]
    mac_a, mac_b = k["eth_src"], k["eth_dst"]
    if k["flags"] & B.F_FRAG and k["frag_off"]:
        return None
    if k["proto"] == 6 and k["flags"] & B.F_PORTS:
        flags = k["tcp_flags"]
        if flags & 0x04:
            return None
        if flags & 0x10:
            seq, ack, fl = k["tcp_ack"], 0, "R"
        else:
            seglen = max(0, k["payload_len"]) + (1 if flags & 0x02 else 0) + (1 if flags & 0x01 else 0)
            seq, ack, fl = 0, (k["tcp_seq"] + seglen) & 0xFFFFFFFF, "RA"
        return PB.tcp_packet(dst, src, k["dport"], k["sport"], flags=fl, seq=seq, ack=ack, win=0,
                             eth_src=mac_b, eth_dst=mac_a)
    if k["flags"] & B.F_ICMP_ERR:
        return None
    ip_pkt = packet[k["l3_off"]:] if k["l3_off"] >= 0 else b""
    if k["ip_ver"] == 4:
        if k["flags"] & B.F_ICMP and k["icmp_type"] not in (0, 8, 13, 14):
            return None
        ihl = (ip_pkt[0] & 0x0F) * 4 if ip_pkt else 20
        body = PB.icmp_error(3, 13, ip_pkt[: ihl + 8])
        l3 = PB.ipv4(dst, src, 1, body)
    elif k["ip_ver"] == 6:
        if k["flags"] & B.F_ICMP and k["icmp_type"] < 128:
            return None
        l3 = PB.ipv6(dst, src, 58, PB.icmpv6_error(1, 1, ip_pkt, src=dst, dst=src))
    else:
        return None
    return PB.ethernet(l3, src=mac_b, dst=mac_a) if l2 >= 0 else l3


class Forwarder:
    """Builds the datapath's output frames for a processed batch.

    Allowed frames leave re-encapsulated (``tunnel``) towards the host of the destination
    workload, outer source the sender's host; frames to an address outside the tenant's
    workloads leave decapsulated (the overlay's exit). Rejected packets get
    :func:`reject_reply` sent back towards the sender's host. Dropped packets leave nothing.
    With an IPsec ``gateway``, its security policy database then decides per frame: protect
    (ESP tunnel mode towards the other site), bypass, or discard.
    """

    def __init__(self, policy: CompiledPolicy, tunnel: str = "vxlan", local_address: str | None = None,
                 gateway=None):
        model = policy.policy
        self.host_addr = [h.address for h in model.hosts]
        index = {h.name: i for i, h in enumerate(model.hosts)}
        self.w_host = np.array([index.get(w.host, -1) for w in model.workloads], np.int32)
        self.vni = {t.name: t.vni for t in model.tenants}
        self.tunnel = tunnel
        self.local = local_address or (self.host_addr[0] if self.host_addr else "192.0.2.1")
        self.gateway = gateway          # microseg.ipsec EspGateway: its SPD picks what leaves in ESP
        self.counters = {"forwarded": 0, "forwarded_plain": 0, "rejects_sent": 0, "esp_sent": 0,
                         "ipsec_dropped": 0}

    def _host(self, w: np.ndarray) -> np.ndarray:
        out = np.full(w.shape[0], -1, np.int32)
        ok = w >= 0
        out[ok] = self.w_host[w[ok]]
        return out

    def output(self, batch: Batch, res: BatchResult) -> Batch:
        from .overlay import encap
        keys = parse(batch)
        allowed = np.flatnonzero(res.verdict == V.ALLOW)
        s_host = self._host(res.src_workload)
        d_host = self._host(res.dst_workload)
        out_parts = []
        inner_off = np.asarray(batch.offset) + np.maximum(keys.l2_off, 0)
        inner_len = np.asarray(batch.length) - np.maximum(keys.l2_off, 0)
        tenant = keys.tenant
        # tunnelled towards a workload's host, grouped by (outer source, outer destination)
        raw = batch.linktype != B.LINK_ETHERNET          # raw IP in, raw IP out (no overlay)
        tun = allowed[(d_host[allowed] >= 0) & (keys.l2_off[allowed] >= 0)] if not raw else allowed[:0]
        plain = np.setdiff1d(allowed, tun, assume_unique=True)
        if tun.size:
            # one encap call per sending host; the remote endpoint is per packet
            host_addr = np.array(self.host_addr + [""], dtype=object)
            for sh in np.unique(s_host[tun]).tolist():
                rows = tun[s_host[tun] == sh]
                inner = Batch(batch.data, inner_off[rows], inner_len[rows].astype(np.int32),
                              inner_len[rows].astype(np.int32), batch.port[rows], batch.ts[rows])
                src = self.host_addr[sh] if sh >= 0 else self.local
                out_parts.append(encap(inner, self.tunnel, np.maximum(tenant[rows], 0), src,
                                       list(host_addr[d_host[rows]])))
            self.counters["forwarded"] += int(tun.size)
        if plain.size:
            rows = plain
            out_parts.append(Batch(batch.data, inner_off[rows], inner_len[rows].astype(np.int32),
                                   inner_len[rows].astype(np.int32), batch.port[rows], batch.ts[rows],
                                   batch.linktype))
            self.counters["forwarded_plain"] += int(plain.size)
        rej = np.flatnonzero(res.verdict == V.REJECT)
        if rej.size:
            replies, r_ts, r_rows = [], [], []
            for i in rej.tolist():
                pkt = batch.packet(i)
                k = keys.row(i)
                inner = pkt[max(k["l2_off"], 0):]
                k2 = dict(k)
                if k["l2_off"] > 0:
                    for f in ("l3_off", "l4_off", "payload_off"):
                        if k2[f] >= 0:
                            k2[f] -= k["l2_off"]
                    k2["l2_off"] = 0
                rep = reject_reply(inner, k2)
                if rep is None:
                    continue
                replies.append(rep)
                r_ts.append(int(batch.ts[i]))
                r_rows.append(i)
            if replies:
                rb = Batch.from_packets(replies, ts=r_ts, linktype=batch.linktype)
                rows = np.array(r_rows)
                back = s_host[rows]
                for h in np.unique(back).tolist():
                    sel = np.flatnonzero(back == h)
                    sub = rb if sel.size == len(rb) else rb.select(sel)
                    if h >= 0 and not raw:
                        out_parts.append(encap(sub, self.tunnel, np.maximum(tenant[rows[sel]], 0),
                                               self.local, self.host_addr[h]))
                    else:
                        out_parts.append(sub)
                self.counters["rejects_sent"] += len(replies)
        out = _merge(out_parts)
        if self.gateway is not None and len(out):
            out, why = self.gateway.encrypt_batch(out, return_reasons=True)
            ok = why == 0
            self.counters["ipsec_dropped"] += int(np.count_nonzero(~ok))
            self.counters["esp_sent"] += int(np.count_nonzero(parse(out).proto == 50))
        return out


def _merge(parts) -> Batch:
    """One Ethernet batch from several, in timestamp order."""
    return Batch.concat(parts, order="ts")
