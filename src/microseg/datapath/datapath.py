"""The datapath end to end: the stages wired together over batches (see the package
docstring for the order)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .. import ctstate
from ..cache.emc import ExactMatchCache
from ..cache.key import W, build_keys
from ..cache.megaflow import MegaflowCache
from ..conntrack.table import ConntrackTable
from ..offload.handoff import FlowInspector
from ..offload.inspect import SignatureSet
from ..offload.table import FastPathTable
from ..packet.batch import Batch, FlowKeys
from ..packet.parse import parse
from ..policy.compiler import CompiledPolicy, revoked_connections
from . import reasons as V
from .counters import Counters
from .fast import source_identity
from .reasons import L_EMC, L_FAST, L_MEGAFLOW, L_SLOW, L_STATE, R_SIGNATURE
from .slow import _unpack, megaflow_mask
from .slow import subset as _subset


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


