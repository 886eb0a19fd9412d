"""The datapath end to end: :class:`Datapath` wires the stages together over batches (the
package docstring gives the order), :class:`DatapathConfig` its settings,
:class:`BatchResult` what it says about each packet."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import ctstate
from ..cache.key import build_keys_at
from ..conntrack import const as CK
from ..conntrack.table import ConntrackTable, checksum_ok
from ..offload.handoff import FlowInspector
from ..offload.inspect import SignatureSet
from ..offload.table import FastPathTable
from ..packet.batch import Batch, FlowKeys
from ..packet.parse import parse
from ..policy.compiler import CompiledPolicy, revoked_connections
from . import fast as F
from . import reasons as V
from .counters import Counters
from .reasons import L_FAST, L_SLOW, L_STATE, R_SIGNATURE
from .slow import SlowPath, subset

_NEW = ctstate.TRACKED | ctstate.NEW
SEGMENT = 16384  # packets parsed at a time when the caller gives no keys (see process)


@dataclass
class DatapathConfig:
    """Settings of one enforcement point. Sizes are entries; rates per second of packet time.

    The defaults are the fastest configuration that gives the same verdicts (measured in
    ``bench/pipeline.py``, see docs/benchmarks.md): the flow caches and the software offload
    model cost more than they save on this design and are off unless asked for."""

    batch_size: int = 1024  # per-batch Python costs amortise over more packets
    conntrack_capacity: int = 1 << 20
    conntrack_timeouts: dict | None = None
    caches: bool = False  # exact-match + megaflow caches in front of the policy
    emc_entries: int = 65536  # one entry per direction and TCP-flag variant of a flow
    megaflow_entries: int = 65536
    offload: bool = False  # inspection hand-off and the fast-path (SmartNIC) model
    offload_capacity: int = 500_000
    offload_rate: float = 7000.0
    inspect_packets: int = 8
    elephant_bytes: int = 1 << 20
    signatures: SignatureSet | None = None  # inspected only with ``offload``
    cut_revoked: bool = True  # a new policy cuts established connections it forbids
    tunnel: str = "vxlan"  # encapsulation of forwarded frames: vxlan | geneve | nvgre
    checksum: bool = True  # conntrack verifies L4 checksums (Linux's default)
    fast_path: bool = True  # False: tracked packets too are decided by the compiled
    # policy in the slow path (for comparison; same verdicts)


_ARRAYS = ("verdict", "reason", "rule", "ct", "level", "sid", "src_workload", "dst_workload")


def forbidden_connections(new, table, e, old=None) -> np.ndarray:
    """Which conntrack entries ``e`` (records of ``table``) policy ``new`` forbids as NEW
    connections (and ``old``, when given, allowed): what a policy swap cuts. The zone is the
    tenant's VNI; the table's default zone is untunnelled traffic."""
    zone = e["zone"].astype(np.int64)
    tenant = np.where(zone == table.default_zone, -1, zone)
    icmp = np.isin(e["proto"], (1, 58))
    sport = np.where(icmp, e["icmp_type"], e["sport"])
    dport = np.where(icmp, e["icmp_code"], e["dport"])
    return revoked_connections(
        old, new, tenant, e["src_hi"], e["src_lo"], e["dst_hi"], e["dst_lo"], e["proto"], sport, dport
    )


@dataclass
class BatchResult:
    """Per-packet results of :meth:`Datapath.process`, in input order, and the parsed headers
    of the batch (``keys``), which travel on to output and reports."""

    verdict: np.ndarray  # uint8 V.ALLOW / V.DROP / V.REJECT
    reason: np.ndarray  # uint8, reasons.REASONS
    rule: np.ndarray  # int32 rule-set index of the deciding rule (-1 none)
    ct: np.ndarray  # uint8 conntrack bits (microseg.ctstate), every packet
    level: np.ndarray  # uint8 L_* (which level answered)
    sid: np.ndarray  # int64 signature id that alerted or dropped (0 none)
    src_workload: np.ndarray  # int32 index into policy.workloads (-1 none)
    dst_workload: np.ndarray  # int32
    keys: FlowKeys | None = None  # the batch's parsed headers (None where not kept)

    @classmethod
    def empty(cls, n: int) -> BatchResult:
        return cls(
            np.zeros(n, np.uint8),
            np.zeros(n, np.uint8),
            np.full(n, -1, np.int32),
            np.zeros(n, np.uint8),
            np.zeros(n, np.uint8),
            np.zeros(n, np.int64),
            np.full(n, -1, np.int32),
            np.full(n, -1, np.int32),
        )

    def __getitem__(self, idx) -> BatchResult:
        """The results of packets ``idx`` (a slice gives views, for writing in place)."""
        keys = None
        if self.keys is not None:
            rows = np.arange(self.keys.n)[idx]
            keys = subset(self.keys, np.atleast_1d(rows), FlowKeys(max(np.size(rows), 1)))
        return BatchResult(**{f: getattr(self, f)[idx] for f in _ARRAYS}, keys=keys)

    @classmethod
    def concat(cls, parts) -> BatchResult:
        parts = list(parts)
        if not parts:
            return cls.empty(0)
        cols: dict[str, Any] = {f: np.concatenate([getattr(p, f) for p in parts]) for f in _ARRAYS}
        out = cls(**cols)
        if all(p.keys is not None for p in parts):
            n = sum(p.keys.n for p in parts)
            k = FlowKeys(max(n, 1))
            k.n = n
            for t in ("u64", "u32", "i32", "u16", "u8"):
                np.concatenate(
                    [getattr(p.keys, t)[:, : p.keys.n] for p in parts], axis=1, out=getattr(k, t)[:, :n]
                )
            out.keys = k
        return out


class Datapath:
    """One enforcement point: a compiled policy plus the stateful stages (see the package
    docstring)."""

    def __init__(self, policy: CompiledPolicy, config: DatapathConfig | None = None):
        self.config = cfg = config or DatapathConfig()
        self.policy = policy
        self.conntrack = ConntrackTable(
            capacity=cfg.conntrack_capacity, timeouts=cfg.conntrack_timeouts, checksum=cfg.checksum
        )
        self.slow = SlowPath(policy, cfg.caches, cfg.emc_entries, cfg.megaflow_entries, cfg.batch_size)
        self.fastpath = FastPathTable(cfg.offload_capacity, cfg.offload_rate, version=policy.version)
        self.inspector = FlowInspector(
            cfg.signatures, self.fastpath, n_inspect=cfg.inspect_packets, elephant_bytes=cfg.elephant_bytes
        )
        self._chunk_keys = FlowKeys(cfg.batch_size)
        self._segment_keys = FlowKeys(SEGMENT)
        self._ctl = np.zeros(F.N_CTL, np.int64)
        self.counters = Counters(
            len(policy.ruleset), len(policy.workload_names), [t.vni for t in policy.policy.tenants]
        )
        self.policy_swaps = 0
        self._tenants = F.tenant_table(policy.endpoint_tables.tenant_vnis)

    @property
    def emc(self):
        return self.slow.emc

    @property
    def megaflow(self):
        return self.slow.megaflow

    # -- policy -----------------------------------------------------------------------------------
    def swap_policy(self, new: CompiledPolicy) -> dict:
        """Install ``new`` atomically between batches: caches and the fast path move to its
        version, and (``cut_revoked``) tracked connections it forbids are deleted, so their
        next packets are judged as new ones. Per-rule, per-workload and per-tenant counters
        restart with the new policy (rule indices are its own); the others run on."""
        old, self.policy = self.policy, new
        self._tenants = F.tenant_table(new.endpoint_tables.tenant_vnis)
        self.slow.swap_policy(new)
        self.counters.resize(len(new.ruleset), len(new.workload_names), [t.vni for t in new.policy.tenants])
        out = {"old_version": old.version, "new_version": new.version, "cut": 0}
        self.fastpath.revalidate(new.version)
        self.inspector.reset()
        if self.config.cut_revoked:
            table = self.conntrack
            out["cut"] = table.delete_where(lambda e: forbidden_connections(new, table, e, old))
            self.counters.revoked_connections += out["cut"]
        self.policy_swaps += 1
        return out

    # -- packets ----------------------------------------------------------------------------------
    def process(self, batch: Batch, keys: FlowKeys | None = None) -> BatchResult:
        """Run every packet of ``batch`` through the datapath (in batches of ``batch_size``).

        ``keys``: the batch's parsed headers if the caller has them (``parse(batch)``), else
        the batch is parsed here; either way once, and ``result.keys`` carries them on
        (except for a batch of more than ``SEGMENT`` packets parsed here: see below)."""
        t0 = time.perf_counter()
        n = len(batch)
        res = BatchResult.empty(n)
        if keys is not None and keys.n != n:
            raise ValueError(f"keys describe {keys.n} packets, the batch has {n}")
        if keys is None and n > SEGMENT:
            # A large batch is parsed and run a segment at a time into one reused buffer, so
            # its keys stay in cache between the parser and the fast kernel (a million
            # packets' keys are 190 MB); the keys of such a batch are not kept.
            seg = self._segment_keys
            for s in range(0, n, SEGMENT):
                e = min(s + SEGMENT, n)
                part = batch.slice(s, e)
                view = BatchResult(*(getattr(res, f)[s:e] for f in _ARRAYS))
                pk = parse(part, seg)
                self._run(part, pk, view)
                self.counters.add_parsed(pk)
        else:
            if keys is None:
                keys = parse(batch)
            res.keys = keys
            if n:
                self._run(batch, keys, res)
        c = self.counters
        c.packets += n
        c.bytes += int(np.asarray(batch.wire_len, np.int64).sum())
        if res.keys is not None:
            c.add_parsed(res.keys)
        c.seconds += time.perf_counter() - t0
        return res

    def _run(self, batch: Batch, keys: FlowKeys, res: BatchResult) -> None:
        """The fast kernel over the whole batch; the slow path for what it hands back.

        Conntrack commits on allow: when a packet would open a connection, the kernel stops
        and the packet (with every later packet of its chunk that has no connection yet) is
        judged as NEW first; only an allowed packet creates the entry. So a denied SYN leaves
        nothing that a reply later in the same batch could ride on, and every packet's
        verdict and state are the ones it gets when packets come one at a time."""
        cfg = self.config
        ctt = self.conntrack
        tab = self.policy.endpoint_tables
        n = len(batch)
        now = np.ascontiguousarray(batch.ts, np.int64)
        ok = checksum_ok(batch, keys) if ctt.cfg[CK.CFG_CHECKSUM] else np.ones(n, np.bool_)
        commit = np.full(n, -1, np.int8)
        tix = np.empty(n, np.int32)
        owner = np.empty(n, np.int32)
        src_id = np.empty(n, np.uint16)
        ent_tmp = np.empty(n, np.int64)
        dir_tmp = np.empty(n, np.uint8)
        pending = np.empty(n, np.int64)
        follow = np.empty(n, np.int64)
        ckey = np.zeros(n, np.uint64)
        more = np.empty(n, np.int64)
        slow = np.empty(n, np.int64)
        offload = cfg.offload
        ctl = self._ctl
        ctl[:] = 0
        ctl[F.C_N] = n
        ctl[F.C_BATCH] = max(1, int(cfg.batch_size))
        ctl[F.C_FIRST] = 1
        ctl[F.C_UNTAGGED] = tab.untagged
        ctl[F.C_ANTI_SPOOF] = int(tab.anti_spoofing)
        ctl[F.C_COUNT] = 0 if offload else 1
        ctl[F.C_ONE_CHUNK] = 1 if offload else 0
        ctl[F.C_EXPIRE] = ctt.expire_budget
        ctl[F.C_LAST_NOW] = ctt.last_now
        ctl[F.C_FAST] = int(cfg.fast_path)
        c = self.counters
        if not np.array_equal(c.vnis, tab.tenant_vnis):  # the kernel's tenant rows
            raise ValueError("counters and policy disagree on the tenants")
        args = (
            ctt.ents,
            ctt.ents_bytes,
            ctt.slot_ent,
            ctt.slot_hash,
            ctt.free,
            ctt.params,
            *keys.arrays(),
            batch.data,
            batch.offset,
            batch.length,
            batch.wire_len,
            now,
            ok,
            *self._tenants,
            *tab.addresses,
            *tab.macs,
            tab.workload_mac,
            commit,
            res.ct,
            tix,
            owner,
            res.src_workload,
            res.dst_workload,
            src_id,
            res.verdict,
            res.reason,
            res.rule,
            res.level,
            ent_tmp,
            dir_tmp,
            pending,
            follow,
            ckey,
            slow,
            c.vnis,
            *c.arrays(),
            ctl,
        )
        tenant = keys.tenant
        while True:
            F.fast_kernel(*args)
            status = ctl[F.C_STATUS]
            if status == F.STOP:
                rows = pending[: ctl[F.C_N_PENDING]].copy()
                self.slow.decide(keys, rows, np.full(rows.shape[0], _NEW, np.uint8), src_id, res, L_SLOW)
                allowed = res.verdict[rows] == V.ALLOW
                commit[rows] = allowed
                nf = int(ctl[F.C_N_FOLLOW])
                if nf and not allowed.all():
                    # later packets of a connection whose first packet was denied would open
                    # it themselves: judge them now rather than stop at each
                    m = F.denied_followers(rows, commit, follow[:nf], ckey, more)
                    if m:
                        mr = more[:m].copy()
                        self.slow.decide(keys, mr, np.full(m, _NEW, np.uint8), src_id, res, L_SLOW)
                        commit[mr] = res.verdict[mr] == V.ALLOW
                continue
            ns = int(ctl[F.C_N_SLOW])
            if ns:
                rows = slow[:ns].copy()
                ctl[F.C_N_SLOW] = 0
                self.slow.decide(keys, rows, res.ct[rows], src_id, res, L_SLOW)
                if not cfg.fast_path:
                    st = res.ct[rows] & ctstate.STATE_MASK
                    res.level[rows[(st != 0) & (st != ctstate.NEW)]] = L_STATE
                if not offload:
                    c.add_rows(rows, res, tenant)
            if offload:
                cs, ce = int(ctl[F.C_CHUNK_START]), int(ctl[F.C_CHUNK_END])
                self._offload(batch, keys, res, cs, ce, src_id)
                c.add_rows(np.arange(cs, ce), res, tenant)
            if status == F.DONE:
                break
        ctt.last_now = int(ctl[F.C_LAST_NOW])

    def _offload(self, batch, keys, res, cs, ce, src_id) -> None:
        """Packets ``cs..ce-1``: the fast path answers an offloaded flow's ESTABLISHED
        packets (never SYN/FIN/RST), then inspection of allowed flows' first packets and the
        offer of clean, passed, encrypted and elephant flows to the fast path."""
        rows = np.arange(cs, ce)
        ct = res.ct[cs:ce]
        verdict, reason, level = res.verdict[cs:ce], res.reason[cs:ce], res.level[cs:ce]
        kmat, _, valid = build_keys_at(keys, rows, src_id, ct)
        chunk = batch.slice(cs, ce)
        fast = None
        if self.fastpath.used:
            est = valid & ((ct & ctstate.STATE_MASK) == ctstate.ESTABLISHED)
            fast, fverdict, _ = self.fastpath.lookup(kmat, est, chunk.wire_len, chunk.ts)
            if fast.any():
                verdict[fast] = fverdict[fast]
                reason[fast] = V.R_ESTABLISHED
                level[fast] = L_FAST
        allowed = verdict == V.ALLOW
        if allowed.any():
            insp = allowed if fast is None else allowed & ~fast
            ck = subset(keys, rows, self._chunk_keys)
            h = self.inspector.process(chunk, ck, kmat, valid, insp, ct)
            if h.drop.any():
                verdict[h.drop] = V.DROP
                reason[h.drop] = R_SIGNATURE
            res.sid[cs:ce] = h.sid
            ends = valid & insp & ((ck.tcp_flags & 0x05) != 0)  # FIN or RST
            if ends.any():
                self.inspector.remove(kmat, valid, np.flatnonzero(ends))

    # -- reporting --------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters and the state of every stage, as plain data (for reports and JSON)."""
        c = self.counters
        pol = self.policy
        out = c.as_dict()
        rules: list[dict[str, Any]] = [
            {"index": int(i), "rule": pol.describe_rule(int(i)), "packets": int(p)}
            for i, p in enumerate(c.rule)
            if p
        ]
        rules.sort(key=lambda d: -d["packets"])
        looked = sum(out["levels"].values())
        out.update(
            {
                "policy": {"version": pol.version, "hash": pol.content_hash, "rules": len(pol.ruleset)},
                "mpps": c.packets / c.seconds / 1e6 if c.seconds else 0.0,
                "hit_rates": {k: (v / looked if looked else 0.0) for k, v in out["levels"].items()},
                "rules": rules,
                "workloads": {
                    name: {
                        "tx": int(c.workload_tx[i]),
                        "rx": int(c.workload_rx[i]),
                        "dropped": int(c.workload_dropped[i]),
                    }
                    for i, name in enumerate(pol.workload_names)
                },
                "conntrack": {"entries": len(self.conntrack), **self.conntrack.counters},
                "inspection": self.inspector.stats(),
            }
        )
        if self.emc is not None:
            out["emc"] = self.emc.stats()
            out["megaflow"] = self.megaflow.stats()
        return out
