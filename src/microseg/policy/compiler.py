"""Compile a :class:`~microseg.policy.model.Policy` into the classifier's rule set, decide whole
batches with it, and swap compiled policies atomically.

Compilation flattens every security-group rule, admin-policy rule, NetworkPolicy rule and the
default-egress allowance into classifier :class:`~microseg.classify.rules.Rule` objects, one
per (local address, remote prefix, port/protocol; named ports resolved); a rule whose remote
is a set of workloads (a ``remote_group_id``, a pod or namespace selector peer, the pods a
named port resolves on) becomes one *set rule* per local address instead, matched after the
classifier with a membership test (:mod:`.addrsets`). A
rule's ``tenant`` is the tenant's VNI and its ``in_port`` field carries the *check* it belongs
to (``verdict.EG_SG`` ... ``IN_DEF``): the decision builds, for each NEW packet, one classifier
key per check that applies to its sender and receiver, with the check number in the in-port
bits, and classifies them all in one call. The winner of each check is then folded per side
(``_side``): security groups pass when some rule matches; the Kubernetes chain takes the first
admin rule's action (its priority encodes evaluation order; Pass goes on), else whether some
NetworkPolicy rule matches, else the baseline's first rule, else the zero-trust default.
OR within a check (union of rules) falls out of "first match" classification.

Everything before the rules (parse errors, tenant from VNI, ARP/non-IP, IPv4-mapped addresses
in IPv6 packets, anti-spoofing, ND,
conntrack state, unknown endpoints) runs in one Numba kernel over the batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import itertools
import json
import threading
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numba import njit

from .. import ctstate
from ..classify import build as build_classifier
from ..classify import keys as ckeys
from ..classify.classifier import Classifier
from ..classify.rules import (
    K_L4,
    K_META,
    NW,
    SH_ICMP_TYPE,
    SH_IN_PORT,
    SH_TENANT,
    Action,
    Prefix,
    Rule,
    RuleSet,
)
from ..errors import InputError, MicrosegError
from ..packet import batch as B
from ..packet.batch import FlowKeys
from . import verdict as V
from .addrsets import SetTables, build_tables, set_pass
from .k8s import admin_peer_matches
from .model import ICMP_PROTOCOLS, PORT_PROTOCOLS, Policy, Workload, load_policy
from .reference import DEFAULT_EGRESS

# The classifier's own default (the decision tree); bench/policy.py compares it with tuple
# space search on policy rule sets, measured side by side.
DEFAULT_ALGO = "tree"
_REVALIDATE_CHUNK = 1 << 16
_versions = itertools.count(1)
_version_lock = threading.Lock()

# kernel-side constants
_ERROR, _IP_VER, _PROTO, _ICMP_TYPE, _FLAGS = B.ERROR, B.IP_VER, B.PROTO, B.ICMP_TYPE, B.FLAGS
_TENANT, _L2_OFF = B.TENANT, B.L2_OFF
_SRC_HI, _SRC_LO, _DST_HI, _DST_LO, _ETH_SRC = B.SRC_HI, B.SRC_LO, B.DST_HI, B.DST_LO, B.ETH_SRC
_F_ARP, _F_ICMP, _F_PORTS = B.F_ARP, B.F_ICMP, B.F_PORTS
_CT_INVALID, _CT_EST, _CT_REL = ctstate.INVALID, ctstate.ESTABLISHED, ctstate.RELATED
_PENDING = 255
_ALLOW, _DROP = V.ALLOW, V.DROP
_R_POLICY, _R_EST, _R_REL, _R_ARP, _R_ND = V.R_POLICY, V.R_ESTABLISHED, V.R_RELATED, V.R_ARP, V.R_ND
_R_PARSE, _R_NO_TENANT, _R_UNKNOWN_VNI, _R_NON_IP = (
    V.R_PARSE_ERROR,
    V.R_NO_TENANT,
    V.R_UNKNOWN_VNI,
    V.R_NON_IP,
)
_R_SPOOFED, _R_INVALID, _R_NO_ENDPOINT = V.R_SPOOFED, V.R_INVALID, V.R_NO_ENDPOINT
_R_EG_DENIED, _R_IN_DENIED, _R_MAPPED = V.R_EGRESS_DENIED, V.R_INGRESS_DENIED, V.R_MAPPED_ADDRESS
_R_NON_ISOLATED = V.R_NON_ISOLATED
N_KINDS, SIDE = V.N_CHECKS, V.SIDE
EG_SG, EG_NP, EG_ANP, EG_BANP, EG_DEF = V.EG_SG, V.EG_NP, V.EG_ANP, V.EG_BANP, V.EG_DEF
A_ALLOW, A_PASS = V.A_ALLOW, V.A_PASS
_SH32, _MAPPED = np.uint64(32), np.uint64(0xFFFF)
_NO_PORTS = np.uint64(~0xFFFFFFFF & ((1 << 64) - 1))
_NO_ICMP = np.uint64(~(0xFFFF << SH_ICMP_TYPE) & ((1 << 64) - 1))
_META_KEEP = np.uint64(~((0xFFFFFFFF << SH_TENANT) | (0xFFFF << SH_IN_PORT)) & ((1 << 64) - 1))


def _net128(addr) -> tuple[int, int]:
    """(hi, lo) of an address in the 128-bit key space (IPv4 mapped)."""
    if addr.version == 4:
        return 0, 0xFFFF00000000 | int(addr)
    v = int(addr)
    return v >> 64, v & 0xFFFFFFFFFFFFFFFF


_HM = np.uint64(0x9E3779B97F4A7C15)


@njit(cache=True, inline="always")
def _h3(t, h, l):
    x = (np.uint64(t) * _HM) ^ h
    x = ((x ^ (x >> np.uint64(29))) * _HM) ^ l
    x = (x ^ (x >> np.uint64(32))) * _HM
    return x ^ (x >> np.uint64(29))


@njit(cache=True)
def _lookup3(ht, hh, hl, hv, t, h, l):
    """Value stored under key (t, h, l) in an open-addressing table, or -1."""
    mask = ht.shape[0] - 1
    s = np.int64(_h3(t, h, l) & np.uint64(mask))
    while ht[s] >= 0:
        if ht[s] == t and hh[s] == h and hl[s] == l:
            return hv[s]
        s = (s + 1) & mask
    return -1


@njit(cache=True)
def _fill3(ht, hh, hl, hv, kt, kh, kl, kv):
    mask = ht.shape[0] - 1
    for i in range(kt.shape[0]):
        s = np.int64(_h3(kt[i], kh[i], kl[i]) & np.uint64(mask))
        while ht[s] >= 0:
            s = (s + 1) & mask
        ht[s], hh[s], hl[s], hv[s] = kt[i], kh[i], kl[i], kv[i]


# The columns (tenant, hi, lo, value) of a :func:`_table3` hash table.
Table3 = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _table3(rows) -> Table3:
    """Read-only hash table (keys t >= 0, hi, lo -> int32 value) for (t, hi, lo, value) rows."""
    cap = 2
    while cap < 2 * len(rows):
        cap *= 2
    ht = np.full(cap, -1, np.int64)
    hh, hl, hv = np.zeros(cap, np.uint64), np.zeros(cap, np.uint64), np.zeros(cap, np.int32)
    cols = [
        np.array([r[c] for r in rows], dt)
        for c, dt in ((0, np.int64), (1, np.uint64), (2, np.uint64), (3, np.int32))
    ]
    _fill3(ht, hh, hl, hv, *cols)
    return _ro(ht), _ro(hh), _ro(hl), _ro(hv)


@njit(cache=True)
def _search1(a, v):
    lo, hi = 0, a.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    if lo < a.shape[0] and a[lo] == v:
        return lo
    return -1


# Public names of the lookups over :class:`EndpointTables` (callable from Numba kernels).
lookup_endpoint = _lookup3  # (t, hi, lo, value) table, tenant index, hi, lo -> value or -1
tenant_index = _search1  # sorted tenant VNIs, VNI -> tenant index or -1


class EndpointTables(NamedTuple):
    """The read-only tables a datapath needs to name a packet's endpoints, as a compiled
    policy publishes them (:attr:`CompiledPolicy.endpoint_tables`).

    ``tenant_vnis``: the tenants' VNIs, sorted; a tenant's index is its position
    (:func:`tenant_index`). ``untagged``: the index of the tenant of untunnelled packets, -1
    none. ``addresses``: ``(tenant, hi, lo, workload)`` columns of an open-addressing table
    from a tenant index and a 128-bit address to the workload that holds it; ``macs``: the
    same from ``(tenant index, MAC, 0)`` to the workload that owns the MAC; both probed with
    :func:`lookup_endpoint`. ``workload_mac``: each workload's MAC, -1 none.
    ``anti_spoofing``: whether port security checks source MAC and address.
    """

    tenant_vnis: np.ndarray
    untagged: int
    addresses: Table3
    macs: Table3
    workload_mac: np.ndarray
    anti_spoofing: bool


@njit(cache=True)
def _prepare(
    u64,
    i32,
    u16,
    u8,
    n,
    ct,
    K,
    t_vni,
    untagged,
    a_t,
    a_hi,
    a_lo,
    a_w,
    m_t,
    m_mac,
    m_lo,
    m_w,
    w_mac,
    need,
    anti_spoof,
    out_k,
    out_pkt,
    out_kind,
    verdict,
    reason,
    src_w,
    dst_w,
):
    """Everything up to the rule checks; returns the number of check rows written."""
    zero = np.uint64(0)
    m = 0
    for i in range(n):
        src_w[i] = -1
        dst_w[i] = -1
        if u8[_ERROR, i] != 0:
            verdict[i] = _DROP
            reason[i] = _R_PARSE
            continue
        vni = i32[_TENANT, i]
        if vni == -1:
            if untagged < 0:
                verdict[i] = _DROP
                reason[i] = _R_NO_TENANT
                continue
            ti = untagged
        else:
            ti = _search1(t_vni, np.int64(vni))
            if ti < 0:
                verdict[i] = _DROP
                reason[i] = _R_UNKNOWN_VNI
                continue
        ipv = u8[_IP_VER, i]
        if ipv != 4 and ipv != 6:
            if u8[_FLAGS, i] & _F_ARP:
                verdict[i] = _ALLOW
                reason[i] = _R_ARP
            else:
                verdict[i] = _DROP
                reason[i] = _R_NON_IP
            continue
        if ipv == 6 and (
            (u64[_SRC_HI, i] == 0 and (u64[_SRC_LO, i] >> _SH32) == _MAPPED)
            or (u64[_DST_HI, i] == 0 and (u64[_DST_LO, i] >> _SH32) == _MAPPED)
        ):
            verdict[i] = _DROP
            reason[i] = _R_MAPPED
            continue
        tt = np.int64(ti)
        sw = _lookup3(a_t, a_hi, a_lo, a_w, tt, u64[_SRC_HI, i], u64[_SRC_LO, i])
        dw = _lookup3(a_t, a_hi, a_lo, a_w, tt, u64[_DST_HI, i], u64[_DST_LO, i])
        src_w[i] = sw
        dst_w[i] = dw
        if anti_spoof and i32[_L2_OFF, i] >= 0:
            mac = u64[_ETH_SRC, i]
            owner = _lookup3(m_t, m_mac, m_lo, m_w, tt, mac, zero)
            if (sw >= 0 and w_mac[sw] >= 0 and np.uint64(w_mac[sw]) != mac) or (owner >= 0 and owner != sw):
                verdict[i] = _DROP
                reason[i] = _R_SPOOFED
                continue
        proto = u8[_PROTO, i]
        if (
            ipv == 6
            and proto == 58
            and (u8[_FLAGS, i] & _F_ICMP)
            and u8[_ICMP_TYPE, i] >= 133
            and u8[_ICMP_TYPE, i] <= 136
        ):
            verdict[i] = _ALLOW
            reason[i] = _R_ND
            continue
        c = ct[i]
        if c & _CT_INVALID:
            verdict[i] = _DROP
            reason[i] = _R_INVALID
            continue
        if c & _CT_EST:
            verdict[i] = _ALLOW
            reason[i] = _R_EST
            continue
        if c & _CT_REL:
            verdict[i] = _ALLOW
            reason[i] = _R_REL
            continue
        if sw < 0 and dw < 0:
            verdict[i] = _DROP
            reason[i] = _R_NO_ENDPOINT
            continue
        verdict[i] = 0
        reason[i] = _PENDING
        meta = (K[i, K_META] & _META_KEEP) | np.uint64(np.uint32(t_vni[ti]))
        l4 = K[i, K_L4]
        if not (u8[_FLAGS, i] & _F_PORTS):
            l4 &= _NO_PORTS
        if not (u8[_FLAGS, i] & _F_ICMP):
            l4 &= _NO_ICMP
        for kind in range(N_KINDS):
            w = sw if kind < SIDE else dw
            if w < 0 or need[kind, w] == 0:
                continue
            for q in range(NW):
                out_k[m, q] = K[i, q]
            out_k[m, K_L4] = l4
            out_k[m, K_META] = meta | (np.uint64(kind) << np.uint64(SH_IN_PORT))
            out_pkt[m] = i
            out_kind[m] = kind
            m += 1
        if m > 0 and out_pkt[m - 1] == i:
            continue
        # no check applies to either side: pods that no policy isolates (Kubernetes)
        verdict[i] = _ALLOW
        reason[i] = _R_NON_ISOLATED
    return m


@njit(cache=True, inline="always")
def _side(win, act, base):
    """(allowed, deciding rule or -1) of one side from the winning rule of each check
    (``win``: -2 no such check, -1 no rule matched): security groups AND the Kubernetes chain
    (admin first match: Allow/Deny final, Pass on; NetworkPolicies; baseline; default)."""
    ok = True
    rule = -1
    sg = win[base + EG_SG]
    if sg != -2:
        if sg < 0:
            ok = False
        else:
            rule = sg
    decided = False
    kok = True
    krule = -1
    a = win[base + EG_ANP]
    if a >= 0 and act[a] != A_PASS:
        decided = True
        kok = act[a] == A_ALLOW
        krule = a if kok else -1
    if not decided:
        n = win[base + EG_NP]
        if n != -2:
            decided = True
            kok = n >= 0
            krule = n
    if not decided:
        b = win[base + EG_BANP]
        if b >= 0:
            decided = True
            kok = act[b] == A_ALLOW
            krule = b if kok else -1
    if not decided:
        d = win[base + EG_DEF]
        if d != -2:
            kok = d >= 0
            krule = d
    if rule < 0:
        rule = krule
    return ok and kok, rule


@njit(cache=True)
def _finish(idx, act, out_pkt, out_kind, m, verdict, reason, rule, deny):
    win = np.empty(N_KINDS, np.int64)
    r = 0
    while r < m:
        i = out_pkt[r]
        win[:] = -2
        s = r
        while s < m and out_pkt[s] == i:
            win[out_kind[s]] = idx[s]
            s += 1
        eg_ok, eg_rule = _side(win, act, 0)
        in_ok, in_rule = _side(win, act, SIDE)
        if not eg_ok:
            verdict[i] = deny
            reason[i] = _R_EG_DENIED
        elif not in_ok:
            verdict[i] = deny
            reason[i] = _R_IN_DENIED
        else:
            verdict[i] = _ALLOW
            rule[i] = in_rule if in_rule >= 0 else eg_rule
            reason[i] = _R_POLICY if rule[i] >= 0 else _R_NON_ISOLATED
        r = s


@dataclass(frozen=True)
class Decision:
    """Per-packet results of :meth:`CompiledPolicy.decide` with ``detail=True``."""

    verdict: np.ndarray  # uint8: verdict.ALLOW / DROP / REJECT
    rule: np.ndarray  # int32: rule-set index of the deciding rule, -1 none
    reason: np.ndarray  # uint8: verdict.R_*
    src_workload: np.ndarray  # int32: index into policy.workloads, -1 unknown
    dst_workload: np.ndarray  # int32
    # the checks the rule set was consulted for, as the code ran them: packet, check kind
    # (verdict.CHECKS), the rule that decided it (-1: none matched)
    check_packet: np.ndarray | None = None
    check_kind: np.ndarray | None = None
    check_rule: np.ndarray | None = None

    def checks(self, i: int) -> list[tuple[int, int]]:
        """(check kind, deciding rule or -1) of every check packet ``i`` went through."""
        if self.check_packet is None or self.check_kind is None or self.check_rule is None:
            return []
        sel = np.flatnonzero(self.check_packet == i)
        return [(int(self.check_kind[j]), int(self.check_rule[j])) for j in sel]


class CompiledPolicy:
    """An immutable compiled policy: rule set, classifier, lookup tables, version and hash.

    ``decide(keys, ct_state)`` gives verdict, rule index and reason for every packet of a
    parsed batch. ``origins[ruleset.rule_id[i]]`` names where rule ``i`` came from.

    Kernels elsewhere in the datapath read the tenant, address and MAC tables through
    :attr:`endpoint_tables` (probed with :func:`tenant_index` and :func:`lookup_endpoint`).
    """

    __slots__ = (
        "policy",
        "version",
        "content_hash",
        "ruleset",
        "classifier",
        "origins",
        "workload_names",
        "_t_vni",
        "_untagged",
        "_a",
        "_m",
        "_w_mac",
        "_need",
        "_act",
        "_anti_spoof",
        "_deny",
        "n_classifier_rules",
        "shares_classifier",
        "address_sets",
        "sets",
        "_frozen",
    )
    policy: Policy
    version: int
    content_hash: str
    ruleset: RuleSet
    origins: tuple
    workload_names: tuple
    classifier: Classifier
    _t_vni: np.ndarray
    _untagged: int
    _a: Table3
    _m: Table3
    _w_mac: np.ndarray
    _need: np.ndarray
    _act: np.ndarray
    _anti_spoof: bool
    _deny: int
    n_classifier_rules: int
    shares_classifier: bool
    address_sets: bool
    sets: SetTables

    def __init__(
        self,
        policy: Policy,
        algo: str = DEFAULT_ALGO,
        address_sets: bool = True,
        reuse: CompiledPolicy | None = None,
    ):
        s = object.__setattr__
        s(self, "policy", policy)
        canon = json.dumps(policy.to_dict(), sort_keys=True, separators=(",", ":"))
        s(self, "content_hash", hashlib.sha256(canon.encode()).hexdigest())
        with _version_lock:
            s(self, "version", next(_versions))
        tenants = sorted(policy.tenants, key=lambda t: t.vni)
        t_index = {t.name: i for i, t in enumerate(tenants)}
        wl = policy.workloads
        s(self, "workload_names", tuple(policy.qualified_name(w) for w in wl))
        s(self, "_t_vni", _ro(np.array([t.vni for t in tenants], np.int64)))
        s(self, "_untagged", t_index[policy.untagged_tenant] if policy.untagged_tenant else -1)
        s(
            self,
            "_a",
            _table3([(t_index[w.tenant], *_net128(a), wi) for wi, w in enumerate(wl) for a in w.addresses]),
        )
        s(
            self,
            "_m",
            _table3([(t_index[w.tenant], w.mac, 0, wi) for wi, w in enumerate(wl) if w.mac is not None]),
        )
        s(self, "_w_mac", _ro(np.array([-1 if w.mac is None else w.mac for w in wl], np.int64)))
        s(self, "_anti_spoof", bool(policy.anti_spoofing))
        s(self, "_deny", V.REJECT if policy.deny_action == "reject" else V.DROP)
        s(self, "address_sets", bool(address_sets))
        known = None if reuse is None else {_rule_key(r): r for r in reuse.ruleset.rules}
        flat = _flatten(policy, address_sets, known)
        s(self, "_need", _ro(flat.need))
        s(self, "_act", _ro(flat.actions if flat.actions.size else np.zeros(1, np.uint8)))
        s(self, "origins", tuple(flat.origins))
        nc = flat.n_classifier
        rs = RuleSet(flat.rules, version=self.version)  # set rules after the classifier's
        s(self, "ruleset", rs)
        s(self, "n_classifier_rules", nc)
        if nc == len(rs):
            crs = rs
        else:
            crs = RuleSet.from_arrays(
                rs.val[:nc],
                rs.mask[:nc],
                rs.ports[:nc],
                rs.priority[:nc],
                rs.action[:nc],
                rs.rule_id[:nc],
                version=self.version,
            )
        shared = (
            reuse is not None
            and reuse.classifier.algo == algo
            and reuse.n_classifier_rules == nc
            and reuse.ruleset.rules[: reuse.n_classifier_rules] == rs.rules[:nc]
        )
        if shared:
            assert reuse is not None
            s(self, "classifier", reuse.classifier)
        else:
            s(self, "classifier", build_classifier(crs, algo))
        s(self, "shares_classifier", bool(shared))
        s(
            self,
            "sets",
            build_tables(rs, nc, flat.set_kind, flat.set_local, flat.set_of, flat.sets, len(wl)),
        )
        s(self, "_frozen", True)

    def __setattr__(self, name, value):
        raise AttributeError("CompiledPolicy is immutable")

    def __repr__(self) -> str:
        return (
            f"<CompiledPolicy v{self.version} {self.content_hash[:12]} "
            f"rules={len(self.ruleset)} workloads={len(self.policy.workloads)}>"
        )

    @property
    def endpoint_tables(self) -> EndpointTables:
        """The tenant, address and MAC tables (read-only) for kernels elsewhere in the
        datapath; see :class:`EndpointTables`."""
        return EndpointTables(self._t_vni, self._untagged, self._a, self._m, self._w_mac, self._anti_spoof)

    def describe_rule(self, idx: int) -> str:
        """Where rule-set index ``idx`` came from (for counters and traces)."""
        if idx < 0:
            return "-"
        return origin_text(self.origins[int(self.ruleset.rule_id[idx])])

    def rule_members(self, idx: int) -> tuple | None:
        """The qualified names of the workloads whose addresses rule-set index ``idx`` admits
        as its remote, when it is a set rule (None for a classifier rule: its remote is the
        prefix in the rule set)."""
        st = self.sets
        if idx < self.n_classifier_rules or idx >= len(self.ruleset):
            return None
        row = int(np.flatnonzero(st.index == idx)[0])
        return tuple(self.workload_names[w] for w in st.members(int(st.set[row])))

    def updated(self, policy: Policy) -> CompiledPolicy:
        """``policy`` compiled as a new version that shares this one's classifier when its
        classifier rules are the same (what a change of memberships or labels leaves); the
        set rules and membership bits are rebuilt, in time and memory linear in the
        workloads."""
        return CompiledPolicy(policy, self.classifier.algo, self.address_sets, self)

    def with_members(self, tenant: str, group: str, workloads) -> CompiledPolicy:
        """A new version in which exactly ``workloads`` (names as ``[tenant/][namespace/]name``
        or the workload itself, of ``tenant``) carry security group ``group`` of ``tenant``,
        and every other workload of the tenant does not. The rules of every group are
        unchanged, so the remote-group sets change and, where the joining or leaving
        workloads' own rules are set rules, nothing else: the classifier is shared
        (:attr:`shares_classifier`). Conntrack revalidation sees a new version."""
        p = self.policy
        try:
            p.group(tenant, group)
        except KeyError:
            raise InputError(f"tenant {tenant!r} has no security group {group!r}") from None
        names: dict = {}
        for w in p.workloads:
            if w.tenant == tenant:
                for name in {w.name, p.qualified_name(w), f"{w.namespace}/{w.name}"}:
                    names.setdefault(name, []).append(w)
        want = set()
        for x in workloads:
            if isinstance(x, Workload):
                want.add(id(x))
                continue
            hits = names.get(str(x), [])
            if len(hits) != 1:
                raise InputError(f"{x!r} names {len(hits)} workloads of tenant {tenant!r}")
            want.add(id(hits[0]))
        new_wl = []
        for w in p.workloads:
            if w.tenant != tenant:
                new_wl.append(w)
                continue
            sgs = tuple(g for g in w.security_groups if g != group)
            if id(w) in want:
                sgs = sgs + (group,)
            new_wl.append(w if sgs == w.security_groups else dataclasses.replace(w, security_groups=sgs))
        return self.updated(dataclasses.replace(p, workloads=tuple(new_wl)))

    def decide(self, keys: FlowKeys, ct_state=None, detail: bool = False):
        """(verdict uint8, rule int32, reason uint8) for each packet of ``keys``.

        ``ct_state``: conntrack bits per packet (:mod:`microseg.ctstate`); None or 0 means
        untracked, which is judged like NEW. With ``detail`` a :class:`Decision` is returned.
        """
        n = keys.n
        ct = np.zeros(n, np.uint8) if ct_state is None else np.ascontiguousarray(ct_state, np.uint8)
        if ct.shape != (n,):
            raise InputError(f"ct_state has shape {ct.shape}, expected ({n},)")
        K = ckeys.from_flowkeys(keys, ct)
        u64, u32, i32, u16, u8 = keys.arrays()
        verdict = np.empty(n, np.uint8)
        reason = np.empty(n, np.uint8)
        rule = np.full(n, -1, np.int32)
        src_w = np.empty(n, np.int32)
        dst_w = np.empty(n, np.int32)
        out_k = np.empty((N_KINDS * n, NW), np.uint64)
        out_pkt = np.empty(N_KINDS * n, np.int32)
        out_kind = np.empty(N_KINDS * n, np.uint8)
        a_t, a_hi, a_lo, a_w = self._a
        m_t, m_mac, m_lo, m_w = self._m
        m = int(
            _prepare(
                u64,
                i32,
                u16,
                u8,
                n,
                ct,
                K,
                self._t_vni,
                self._untagged,
                a_t,
                a_hi,
                a_lo,
                a_w,
                m_t,
                m_mac,
                m_lo,
                m_w,
                self._w_mac,
                self._need,
                self._anti_spoof,
                out_k,
                out_pkt,
                out_kind,
                verdict,
                reason,
                src_w,
                dst_w,
            )
        )
        idx = np.zeros(0, np.int32)
        if m:
            idx = np.array(self.classifier.classify_keys(out_k[:m]), np.int32)
            st = self.sets
            if st.n_rules:
                set_pass(
                    out_k,
                    out_pkt,
                    out_kind,
                    m,
                    idx,
                    src_w,
                    dst_w,
                    max(st.n_workloads, 1),
                    st.start,
                    st.val,
                    st.mask,
                    st.ports,
                    st.prio,
                    st.set,
                    st.index,
                    st.bits,
                    self.ruleset.priority,
                )
            _finish(
                idx,
                self._act,
                out_pkt,
                out_kind,
                m,
                verdict,
                reason,
                rule,
                np.uint8(self._deny),
            )
        if detail:
            return Decision(
                verdict,
                rule,
                reason,
                src_w,
                dst_w,
                out_pkt[:m].copy(),
                out_kind[:m].copy(),
                np.where(idx[:m] >= 0, idx[:m], -1).astype(np.int32),
            )
        return verdict, rule, reason

    # ---- connection revalidation --------------------------------------------------------------
    def allows_connections(
        self,
        tenant,
        src_hi,
        src_lo,
        dst_hi,
        dst_lo,
        proto,
        sport=None,
        dport=None,
        icmp_type=None,
        icmp_code=None,
    ) -> np.ndarray:
        """Would a NEW packet of each connection's original direction be allowed? (bool array)

        Columns are arrays of one length: ``tenant`` is the VNI (-1 untunnelled), addresses
        are the 128-bit (hi, lo) halves (IPv4 mapped), ``sport``/``dport`` are ports for
        TCP/UDP/SCTP/DCCP/UDPLite, and for ICMP the type/code of the original packet (default
        echo request). MACs are unknown here, so anti-spoofing is not re-checked.
        """
        cols = [tenant, src_hi, src_lo, dst_hi, dst_lo, proto, sport, dport, icmp_type, icmp_code]
        n = np.asarray(tenant).shape[0]
        out = np.zeros(n, bool)
        for s in range(0, n, _REVALIDATE_CHUNK):  # bounded scratch for big tables
            part = [None if c is None else np.asarray(c)[s : s + _REVALIDATE_CHUNK] for c in cols]
            keys = connection_keys(*part)
            verdict, _, _ = self.decide(keys, np.full(keys.n, ctstate.NEW, np.uint8))
            out[s : s + keys.n] = verdict == V.ALLOW
        return out


def _ro(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def connection_keys(
    tenant,
    src_hi,
    src_lo,
    dst_hi,
    dst_lo,
    proto,
    sport=None,
    dport=None,
    icmp_type=None,
    icmp_code=None,
    eth_src=None,
) -> FlowKeys:
    """A FlowKeys holding one packet per connection's original direction (see above).

    ``eth_src`` (48-bit integers) adds an Ethernet source; without it the packets have no L2
    header, as after a raw-IP capture.
    """
    tenant = np.asarray(tenant, np.int64)
    n = tenant.shape[0]

    def col(a, dt, default=0):
        if a is None:
            return np.full(n, default, dt)
        a = np.asarray(a)
        if a.shape != (n,):
            raise InputError(f"connection column has shape {a.shape}, expected ({n},)")
        return a.astype(dt)

    k = FlowKeys(max(n, 1)).resize(n)
    k.i32[B.TENANT, :n] = col(tenant, np.int32)
    k.u64[B.SRC_HI, :n], k.u64[B.SRC_LO, :n] = col(src_hi, np.uint64), col(src_lo, np.uint64)
    k.u64[B.DST_HI, :n], k.u64[B.DST_LO, :n] = col(dst_hi, np.uint64), col(dst_lo, np.uint64)
    pr = col(proto, np.uint8)
    v4 = (k.u64[B.SRC_HI, :n] == 0) & ((k.u64[B.SRC_LO, :n] >> np.uint64(32)) == np.uint64(0xFFFF))
    k.u8[B.IP_VER, :n] = np.where(v4, 4, 6)
    k.u16[B.ETHERTYPE, :n] = np.where(v4, 0x0800, 0x86DD)
    k.u8[B.PROTO, :n] = pr
    has_ports = np.isin(pr, list(PORT_PROTOCOLS))
    icmp = ((pr == 1) & v4) | ((pr == 58) & ~v4)
    k.u16[B.SPORT, :n] = np.where(has_ports, col(sport, np.uint16), 0)
    k.u16[B.DPORT, :n] = np.where(has_ports, col(dport, np.uint16), 0)
    default_type = np.where(v4, 8, 128)
    k.u8[B.ICMP_TYPE, :n] = np.where(icmp, col(icmp_type, np.int64, -1), 0)
    k.u8[B.ICMP_TYPE, :n] = np.where(
        icmp & (col(icmp_type, np.int64, -1) < 0), default_type, k.u8[B.ICMP_TYPE, :n]
    )
    k.u8[B.ICMP_CODE, :n] = np.where(icmp, col(icmp_code, np.uint8), 0)
    k.u8[B.FLAGS, :n] = np.where(has_ports, B.F_PORTS, 0) | np.where(icmp, B.F_ICMP, 0)
    if eth_src is None:
        k.i32[B.L2_OFF, :n] = -1
        k.i32[B.L3_OFF, :n] = 0
    else:
        k.u64[B.ETH_SRC, :n] = col(eth_src, np.uint64)
        k.i32[B.L2_OFF, :n] = 0
        k.i32[B.L3_OFF, :n] = 14
    return k


def revoked_connections(
    old: CompiledPolicy | None,
    new: CompiledPolicy,
    tenant,
    src_hi,
    src_lo,
    dst_hi,
    dst_lo,
    proto,
    sport=None,
    dport=None,
    icmp_type=None,
    icmp_code=None,
) -> np.ndarray:
    """Connections (arrays as in :meth:`CompiledPolicy.allows_connections`) that ``new``
    forbids. With ``old`` given, only those ``old`` allowed (what the policy change revoked);
    connections neither allows are not reported again.
    """
    args = (tenant, src_hi, src_lo, dst_hi, dst_lo, proto, sport, dport, icmp_type, icmp_code)
    forbidden = ~new.allows_connections(*args)
    if old is not None and forbidden.any():
        if old.content_hash == new.content_hash:
            return np.zeros_like(forbidden)
        forbidden &= old.allows_connections(*args)
    return forbidden


# ---- flattening ---------------------------------------------------------------------------------
def origin_text(o: tuple) -> str:
    if o == DEFAULT_EGRESS:
        return "default_egress: allow"
    if o[0] == "sg":
        return f"security group {o[1]}/{o[2]} rule {o[3]}"
    if o[0] == "np":
        return f"NetworkPolicy {o[1]}/{o[2]} {o[3]}[{o[4]}]"
    return str(o)


_FULL4 = ipaddress.ip_network("0.0.0.0/0")
_FULL6 = ipaddress.ip_network("::/0")


def _cover(addresses) -> list:
    """The fewest prefixes covering exactly ``addresses`` (adjacent peers share one rule)."""
    out: list = []
    for version in (4, 6):
        fam = [a for a in addresses if a.version == version]
        if fam:
            out.extend(ipaddress.collapse_addresses(fam))
    return out


def _block_prefixes(block, excepts) -> list:
    nets = [block]
    for e in excepts:
        nxt = []
        for n in nets:
            if e.subnet_of(n):
                nxt.extend(n.address_exclude(e))
            elif n.subnet_of(e):
                continue
            else:
                nxt.append(n)
        nets = nxt
    return nets


class _Flat(NamedTuple):
    """What :func:`_flatten` returns: ``need[N_CHECKS, n_workloads]`` (uint8), the classifier
    rules then the set rules (one list, classifier rules first), the action of each rule
    (verdict.A_*), the origins (``rule_id`` indexes them), the number of classifier rules, and
    per set rule its check, local workload and set (index into ``sets``, tuples of workload
    indices)."""

    need: np.ndarray
    rules: list
    actions: np.ndarray
    origins: list
    n_classifier: int
    set_kind: list
    set_local: list
    set_of: list
    sets: list


def _origins(policy: Policy) -> list:
    """Every rule origin of the model, in model order: a rule's ``rule_id`` (its index here)
    depends on the model's rules only, not on who is a member of what."""
    out: list = [DEFAULT_EGRESS]
    for g in policy.security_groups:
        out.extend(("sg", g.tenant, g.name, i) for i in range(len(g.rules)))
    for p in policy.network_policies:
        for d in ("egress", "ingress"):
            out.extend(
                ("np", p.namespace, p.name, d, i)
                for i in range(len(p.egress if d == "egress" else p.ingress))
            )
    for a in policy.admin_policies:
        kind = "banp" if a.baseline else "anp"
        for d in ("egress", "ingress"):
            out.extend(
                (kind, a.tenant, a.name, d, i) for i in range(len(a.egress if d == "egress" else a.ingress))
            )
    return out


def _rule_key(r: Rule) -> tuple:
    """What :func:`_flatten` knows a rule by (its ``make_rule`` arguments)."""
    return (
        r.in_port,
        r.tenant,
        r.src,
        r.dst,
        r.proto,
        r.dport,
        r.icmp_type,
        r.icmp_code,
        r.rule_id,
        r.priority,
        r.ct_state_mask,
    )


def _flatten(policy: Policy, address_sets: bool = True, known: dict | None = None) -> _Flat:
    """Flatten ``policy`` into classifier rules and set rules (see :mod:`.addrsets`); with
    ``address_sets`` false, remote groups and selector peers expand into one classifier rule
    per (local address, remote prefix of the members), as before address sets. ``known``
    (:func:`_rule_key` -> rule, an earlier compile's) lends rule objects that are equal to
    the ones this flattening would build."""
    known = known or {}
    wl = policy.workloads
    need = np.zeros((V.N_CHECKS, max(len(wl), 1)), np.uint8)
    vni = {t.name: t.vni for t in policy.tenants}
    groups = {(g.tenant, g.name): g for g in policy.security_groups}
    w_index = {id(w): i for i, w in enumerate(wl)}
    members: dict = {}
    for w in wl:
        for g in w.security_groups:
            members.setdefault((w.tenant, g), []).append(w)
    by_tenant: dict = {}
    for w in wl:
        by_tenant.setdefault(w.tenant, []).append(w)
    ns_labels: dict = {}

    def nsl(x):
        key = (x.tenant, x.namespace)
        if key not in ns_labels:
            ns_labels[key] = policy.namespace_labels(*key)
        return ns_labels[key]

    origins = _origins(policy)
    origin_id = {o: i for i, o in enumerate(origins)}
    rules: list = []
    actions: list = []
    seen: set = set()
    s_rules: list = []
    s_actions: list = []
    s_kind: list = []
    s_local: list = []
    s_of: list = []
    s_seen: set = set()
    sets: list = []
    set_id: dict = {}
    pods_set: dict = {}  # id(list of workloads) -> (that list, its set id or -1)
    resolved: dict = {}  # (id(list of workloads), port name, protocol) -> (list, {port: pods})

    prefixes: dict = {}

    def prefix(x):
        """Prefix of an address or network (cached: the same ones recur in many rules)."""
        p = prefixes.get(x)
        if p is None:
            net = ipaddress.ip_network(x)
            p = None if net.prefixlen == 0 else Prefix.from_network(net)
            prefixes[x] = p
        return p

    def make_rule(kind, w, lp, rp, proto, dport, icmp_type, icmp_code, origin, priority, is_set=False):
        """The rule object (an equal one of ``known`` when there is one: building and
        validating rules is most of the cost of a compile). A set rule's copy in the rule set
        asks for conntrack INVALID, which no packet reaching the rules has, so a consumer that
        matches the rule set alone never takes it for "any remote" (it fails closed); the set
        pass ignores the conntrack word."""
        egress = V.is_egress(kind)
        src, dst = (lp, rp) if egress else (rp, lp)
        dp = dport or (0, 65535)
        ct = ctstate.INVALID if is_set else 0
        key = (
            kind,
            vni[w.tenant],
            src,
            dst,
            proto,
            dp,
            icmp_type,
            icmp_code,
            origin_id[origin],
            priority,
            ct,
        )
        r = known.get(key)
        if r is None:
            r = Rule(
                priority=priority,
                action=Action.ALLOW,
                rule_id=origin_id[origin],
                tenant=vni[w.tenant],
                in_port=kind,
                src=src,
                dst=dst,
                proto=proto,
                dport=dp,
                icmp_type=icmp_type,
                icmp_code=icmp_code,
                ct_state=ct,
                ct_state_mask=ct,
            )
        return r

    def emit(
        kind, w, local, remote, proto, dport, icmp_type, icmp_code, origin, priority=0, action=V.A_ALLOW
    ):
        """remote: ipaddress network, address or None (any address of local's family).
        Within a check the highest ``priority`` matching rule decides (admin rules' order)."""
        if remote is not None and remote.version != local.version:
            return
        lp = prefix(local)
        rp = None if remote is None else prefix(remote)
        key = (kind, vni[w.tenant], lp, rp, proto, dport, icmp_type, icmp_code)
        if key in seen:
            return  # an earlier rule with the same match decides it
        seen.add(key)
        rules.append(make_rule(kind, w, lp, rp, proto, dport, icmp_type, icmp_code, origin, priority))
        actions.append(action)

    def emit_set(
        kind, w, local, remote, pods, proto, dport, icmp_type, icmp_code, origin, priority=0, action=V.A_ALLOW
    ):
        """Like :func:`emit`, the remote being an address of one of ``pods`` (workloads of
        ``w``'s tenant; inside ``remote`` when that is given): one set rule."""
        if remote is not None and remote.version != local.version:
            return
        if not address_sets:
            net = None if remote is None else ipaddress.ip_network(remote)
            addrs = [
                a
                for x in pods
                for a in x.addresses
                if a.version == local.version and (net is None or a in net)
            ]
            for rem in _cover(addrs):
                emit(kind, w, local, rem, proto, dport, icmp_type, icmp_code, origin, priority, action)
            return
        got = pods_set.get(id(pods))
        if got is not None and got[0] is pods:
            sid = got[1]
        else:
            content = tuple(sorted({w_index[id(x)] for x in pods}))
            sid = set_id.get(content, -1) if content else -1
            if sid < 0 and content:
                sid = set_id[content] = len(sets)
                sets.append(content)
            pods_set[id(pods)] = (pods, sid)  # the list is kept: its id is not reused
        if sid < 0:
            return  # nobody to admit: the rule matches nothing
        lp = prefix(local)
        rp = None if remote is None else prefix(remote)
        key = (kind, vni[w.tenant], lp, rp, sid, proto, dport, icmp_type, icmp_code)
        if key in s_seen:
            return
        s_seen.add(key)
        s_rules.append(make_rule(kind, w, lp, rp, proto, dport, icmp_type, icmp_code, origin, priority, True))
        s_actions.append(action)
        s_kind.append(kind)
        s_local.append(w_index[id(w)])
        s_of.append(sid)

    def sg_rule(kind, w, r, origin):
        if r is None:  # default egress allow-all
            for a in w.addresses:
                emit(kind, w, a, None, None, None, None, None, origin)
            return
        dport = icmp_type = icmp_code = None
        if r.protocol in PORT_PROTOCOLS and r.port_min is not None:
            dport = (r.port_min, r.port_max)
        if r.protocol in ICMP_PROTOCOLS:
            icmp_type, icmp_code = r.port_min, r.port_max
        for a in w.addresses:
            if a.version != r.ethertype:
                continue
            if r.remote_group is not None:
                pods = members.get((w.tenant, r.remote_group), ())
                emit_set(kind, w, a, None, pods, r.protocol, dport, icmp_type, icmp_code, origin)
            else:
                emit(kind, w, a, r.remote_prefix, r.protocol, dport, icmp_type, icmp_code, origin)

    def in_nets(x, nets, excepts=()):
        """Does a workload have an address inside ``nets`` (and outside ``excepts``)?"""
        return any(
            any(a.version == n.version and a in n for n in nets)
            and not any(a.version == e.version and a in e for e in excepts)
            for a in x.addresses
        )

    def port_rules(kind, w, egress, remotes, ports, origin, priority=0, action=V.A_ALLOW):
        """Emit for each remote ``(network or None, workloads behind it, is a set)`` and each
        port. A set remote (a selector peer) admits the addresses of its workloads. Numbered
        ports use the remote as given; a named port resolves on the destination workload
        (the local one for ingress, the remote pod for egress)."""
        numbered = (
            [(None, None)]
            if ports is None
            else [(p.protocol, None if p.lo is None else (p.lo, p.hi)) for p in ports if p.name is None]
        )
        named = [] if ports is None else [p for p in ports if p.name is not None]
        for a in w.addresses:
            for rem, pods, is_set in remotes:
                for proto, dport in numbered:
                    if is_set:
                        emit_set(kind, w, a, rem, pods, proto, dport, None, None, origin, priority, action)
                    else:
                        emit(kind, w, a, rem, proto, dport, None, None, origin, priority, action)
                for p in named:
                    if not egress:
                        for proto, port in w.resolve_port(p.name, p.protocol):
                            if is_set:
                                emit_set(
                                    kind,
                                    w,
                                    a,
                                    rem,
                                    pods,
                                    proto,
                                    (port, port),
                                    None,
                                    None,
                                    origin,
                                    priority,
                                    action,
                                )
                            else:
                                emit(
                                    kind, w, a, rem, proto, (port, port), None, None, origin, priority, action
                                )
                        continue
                    # egress: the destination pods grouped by what the name resolves to
                    rk = (id(pods), p.name, p.protocol)
                    got = resolved.get(rk)
                    if got is not None and got[0] is pods:
                        by_port = got[1]
                    else:
                        by_port = {}
                        for x in pods:
                            for pp in x.resolve_port(p.name, p.protocol):
                                by_port.setdefault(pp, []).append(x)
                        resolved[rk] = (pods, by_port)
                    for (proto, port), xs in by_port.items():
                        emit_set(
                            kind, w, a, rem, xs, proto, (port, port), None, None, origin, priority, action
                        )

    np_cache: dict = {}

    def np_remotes(r, w, egress):
        """[(remote network or None, [workloads it stands for], is a set)] of a
        NetworkPolicy rule (the same for every pod of one namespace)."""
        ck = (id(r), w.tenant, w.namespace, egress)
        got = np_cache.get(ck)
        if got is not None:
            return got
        tenant_pods = by_tenant.get(w.tenant, ())
        out: list = []
        if r.peers is None:
            out = [(None, list(tenant_pods) if egress else [], False)]
        else:
            for peer in r.peers:
                if peer.block is not None:
                    pods = (
                        [x for x in tenant_pods if in_nets(x, [peer.block], peer.excepts)] if egress else []
                    )
                    nets = _block_prefixes(peer.block, peer.excepts)
                    out.extend((n, pods, False) for n in nets)
                    continue
                peers = []
                for x in tenant_pods:  # peers outside the tenant never share its VNI
                    if peer.namespaces is None:
                        ns_ok = x.namespace == w.namespace
                    else:
                        ns_ok = peer.namespaces.matches(nsl(x))
                    if ns_ok and (peer.pods is None or peer.pods.matches(x.label_dict())):
                        peers.append(x)
                out.append((None, peers, True))
        np_cache[ck] = out
        return out

    admin_cache: dict = {}

    def admin_remotes(r, w):
        ck = (id(r), w.tenant)
        got = admin_cache.get(ck)
        if got is not None:
            return got
        tenant_pods = by_tenant.get(w.tenant, ())
        out: list = []
        for peer in r.peers:
            if peer.networks:
                pods = [x for x in tenant_pods if in_nets(x, peer.networks)]
                out.extend((n, pods, False) for n in peer.networks)
                continue
            pods = [x for x in tenant_pods if admin_peer_matches(peer, nsl(x), x.label_dict())]
            out.append((None, pods, True))
        admin_cache[ck] = out
        return out

    allow_default = policy.default_egress == "allow"

    def admin_rules(wi, w, labels, egress, baseline):
        """The rules of the (baseline) admin policies whose subject is ``w``, in evaluation
        order: the first has the highest priority, so the first match decides."""
        kind = (0 if egress else V.SIDE) + (V.EG_BANP if baseline else V.EG_ANP)
        d = "egress" if egress else "ingress"
        order = 0
        for a in policy.admin_policies:
            if a.tenant != w.tenant or a.baseline != baseline or not a.selects(nsl(w), labels):
                continue
            for i, r in enumerate(a.egress if egress else a.ingress):
                need[kind, wi] = 1
                origin = ("banp" if baseline else "anp", a.tenant, a.name, d, i)
                port_rules(
                    kind,
                    w,
                    egress,
                    admin_remotes(r, w),
                    r.ports,
                    origin,
                    priority=_ADMIN_TOP - order,
                    action=V.ADMIN_ACTIONS[r.action],
                )
                order += 1

    for wi, w in enumerate(wl):
        labels = w.label_dict()
        for egress in (True, False):
            d = "egress" if egress else "ingress"
            base = 0 if egress else V.SIDE
            # security groups (Neutron): some rule of the workload's groups allows it
            if w.security_groups:
                need[base + V.EG_SG, wi] = 1
                sg = [
                    (("sg", g.tenant, g.name, i), r)
                    for gn in w.security_groups
                    for g in (groups[(w.tenant, gn)],)
                    for i, r in enumerate(g.rules)
                    if r.direction == d
                ]
                for o, r in sg:
                    sg_rule(base + V.EG_SG, w, r, o)
                if not sg and egress and allow_default:
                    sg_rule(base + V.EG_SG, w, None, DEFAULT_EGRESS)
            # the Kubernetes chain: admin policies, NetworkPolicies, baseline, default
            admin_rules(wi, w, labels, egress, baseline=False)
            sel = [
                p
                for p in policy.network_policies
                if p.tenant == w.tenant
                and p.namespace == w.namespace
                and (p.egress_type if egress else p.ingress_type)
                and p.pod_selector.matches(labels)
            ]
            if sel:
                need[base + V.EG_NP, wi] = 1
                for p in sel:
                    for i, r in enumerate(p.egress if egress else p.ingress):
                        port_rules(
                            base + V.EG_NP,
                            w,
                            egress,
                            np_remotes(r, w, egress),
                            r.ports,
                            ("np", p.namespace, p.name, d, i),
                        )
                continue  # isolated: the baseline is not reached
            admin_rules(wi, w, labels, egress, baseline=True)
            if not w.security_groups and policy.isolation(w) == "deny":
                need[base + V.EG_DEF, wi] = 1  # zero trust: unselected means denied
                if egress and allow_default:
                    sg_rule(base + V.EG_DEF, w, None, DEFAULT_EGRESS)
    return _Flat(
        need,
        rules + s_rules,
        np.array(actions + s_actions, np.uint8),
        origins,
        len(rules),
        s_kind,
        s_local,
        s_of,
        sets,
    )


_ADMIN_TOP = 1 << 40  # admin rules: the first in evaluation order has the highest priority


def compile_policy(
    policy: Policy,
    algo: str = DEFAULT_ALGO,
    address_sets: bool = True,
    previous: CompiledPolicy | None = None,
) -> CompiledPolicy:
    """Compile ``policy`` (a new, higher version each call) for classifier ``algo``.

    Remote groups and selector peers compile to address sets (:mod:`.addrsets`); with
    ``address_sets=False`` they expand into one classifier rule per (local address, remote
    prefix), the older form (for comparisons). With ``previous`` given, its classifier is
    shared when the new classifier rules are the same (a change of memberships only moves set
    bits and set rules, see :meth:`CompiledPolicy.with_members`)."""
    return CompiledPolicy(policy, algo, address_sets, previous)


class PolicyHolder:
    """The datapath's reference to the live compiled policy.

    Readers take ``holder.current`` once per batch; :meth:`swap` replaces it in one assignment,
    so a batch sees either the old or the new policy, never a mix.
    """

    __slots__ = ("_current", "_lock")

    def __init__(self, compiled: CompiledPolicy | None = None):
        self._current = compiled
        self._lock = threading.Lock()

    @property
    def current(self) -> CompiledPolicy | None:
        return self._current

    def swap(self, new: CompiledPolicy) -> CompiledPolicy | None:
        """Install ``new`` (its version must be higher); returns the policy it replaced."""
        if not isinstance(new, CompiledPolicy):
            raise MicrosegError("swap() needs a CompiledPolicy")
        with self._lock:
            old = self._current
            if old is not None and new.version <= old.version:
                raise MicrosegError(f"policy version {new.version} is not newer than {old.version}")
            self._current = new
        return old

    def load(self, path: str, algo: str | None = None) -> CompiledPolicy | None:
        """Load, validate and compile ``path``, then swap it in (the old one stays on error).
        The running policy's classifier is shared when the new classifier rules are the same
        (a reload that only changes memberships or labels rebuilds the address sets only)."""
        return self.swap(compile_policy(load_policy(path), algo or DEFAULT_ALGO, previous=self._current))
