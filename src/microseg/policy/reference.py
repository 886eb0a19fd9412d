"""Plain-Python, per-packet policy decision straight from the model: the tests' oracle and the
explanation behind ``microseg trace``.

It shares no code with the compiler: rules are matched as the security-group and
NetworkPolicy semantics read, one packet at a time. The order of the checks is documented in
``docs/policy.md`` and mirrored by :meth:`CompiledPolicy.decide`.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from .. import ctstate
from ..packet import batch as B
from . import verdict as V
from .k8s import NAMESPACE_NAME_LABEL
from .model import ICMP_PROTOCOLS, PORT_PROTOCOLS, Policy, Workload

ND_TYPES = range(133, 137)          # router/neighbour solicitation/advertisement
DEFAULT_EGRESS = ("default_egress",)


@dataclass
class Check:
    kind: int                       # verdict.EG_SG ... IN_NP
    workload: Workload
    matches: list                   # origin keys of every rule that matches


@dataclass
class RefDecision:
    verdict: int
    reason: int
    rule_origins: set = field(default_factory=set)   # acceptable origins of the reported rule
    src: Workload | None = None
    dst: Workload | None = None
    tenant: str | None = None
    checks: list = field(default_factory=list)


def _addr(hi: int, lo: int):
    if hi == 0 and (lo >> 32) == 0xFFFF:
        return ipaddress.IPv4Address(lo & 0xFFFFFFFF)
    return ipaddress.IPv6Address((hi << 64) | lo)


class Reference:
    """Per-packet decisions for one :class:`Policy`."""

    def __init__(self, policy: Policy):
        self.p = policy
        self.by_vni = {t.vni: t for t in policy.tenants}
        self.by_addr = {(w.tenant, a): w for w in policy.workloads for a in w.addresses}
        self.by_mac = {(w.tenant, w.mac): w for w in policy.workloads if w.mac is not None}
        self.groups = {(g.tenant, g.name): g for g in policy.security_groups}
        self.tenant_labels = {t.name: {**dict(t.labels), NAMESPACE_NAME_LABEL: t.name}
                              for t in policy.tenants}

    # ---- which checks apply to a workload ---------------------------------------------------
    def _selecting(self, w: Workload, egress: bool) -> list:
        labels = w.label_dict()
        return [p for p in self.p.network_policies
                if p.namespace == w.tenant and (p.egress_type if egress else p.ingress_type)
                and p.pod_selector.matches(labels)]

    def _sg_rules(self, w: Workload, direction: str) -> list:
        out = []
        for gname in w.security_groups:
            g = self.groups[(w.tenant, gname)]
            out.extend(((("sg", g.tenant, g.name, i), r) for i, r in enumerate(g.rules)
                        if r.direction == direction))
        return out

    def checks(self, w: Workload, egress: bool):
        """[(kind, rules)] that must each have a match; rules are (origin, matcher) pairs."""
        out = []
        sel = self._selecting(w, egress)
        if egress:
            if w.security_groups:
                rules = self._sg_rules(w, "egress")
                if not rules and self.p.default_egress == "allow":
                    rules = [(DEFAULT_EGRESS, None)]
                out.append((V.EG_SG, rules))
            if sel:
                out.append((V.EG_NP, [(("np", p.namespace, p.name, "egress", i), r)
                                      for p in sel for i, r in enumerate(p.egress)]))
            if not out:
                out.append((V.EG_SG, [(DEFAULT_EGRESS, None)] if self.p.default_egress == "allow" else []))
        else:
            if w.security_groups or not sel:
                out.append((V.IN_SG, self._sg_rules(w, "ingress")))
            if sel:
                out.append((V.IN_NP, [(("np", p.namespace, p.name, "ingress", i), r)
                                      for p in sel for i, r in enumerate(p.ingress)]))
        return out

    # ---- rule matching ------------------------------------------------------------------------
    def _sg_match(self, r, w: Workload, remote, pkt) -> bool:
        if r is None:                                   # default egress allow
            return True
        if r.ethertype != pkt["ver"]:
            return False
        if r.protocol is not None and r.protocol != pkt["proto"]:
            return False
        if r.protocol in PORT_PROTOCOLS and r.port_min is not None:
            if not pkt["ports"] or not r.port_min <= pkt["dport"] <= r.port_max:
                return False
        if r.protocol in ICMP_PROTOCOLS:
            if r.port_min is not None and not (pkt["icmp"] and pkt["icmp_type"] == r.port_min):
                return False
            if r.port_max is not None and not (pkt["icmp"] and pkt["icmp_code"] == r.port_max):
                return False
        if r.remote_prefix is not None:
            return remote in r.remote_prefix
        if r.remote_group is not None:
            peer = self.by_addr.get((w.tenant, remote))
            return peer is not None and r.remote_group in peer.security_groups
        return True

    def _np_match(self, r, w: Workload, remote, pkt) -> bool:
        if r.ports is not None:
            ok = False
            for port in r.ports:
                if port.protocol != pkt["proto"]:
                    continue
                if port.lo is None or (pkt["ports"] and port.lo <= pkt["dport"] <= port.hi):
                    ok = True
                    break
            if not ok:
                return False
        if r.peers is None:
            return True
        for peer in r.peers:
            if peer.block is not None:
                if remote.version == peer.block.version and remote in peer.block and \
                        not any(remote in e for e in peer.excepts):
                    return True
                continue
            other = self.by_addr.get((w.tenant, remote))
            if other is None:
                continue
            if peer.namespaces is None:
                ns_ok = other.tenant == w.tenant        # the policy's own namespace
            else:
                ns_ok = peer.namespaces.matches(self.tenant_labels[other.tenant])
            if ns_ok and (peer.pods is None or peer.pods.matches(other.label_dict())):
                return True
        return False

    def _run_checks(self, w, egress, remote, pkt, dec: RefDecision) -> bool:
        ok = True
        for kind, rules in self.checks(w, egress):
            m = []
            for origin, r in rules:
                hit = self._sg_match(r, w, remote, pkt) if kind in (V.EG_SG, V.IN_SG) \
                    else self._np_match(r, w, remote, pkt)
                if hit:
                    m.append(origin)
            dec.checks.append(Check(kind, w, m))
            ok = ok and bool(m)
        return ok

    # ---- the decision -------------------------------------------------------------------------
    def decide_row(self, row: dict, ct: int) -> RefDecision:
        """Decision for one packet given as ``FlowKeys.row(i)`` and its conntrack state bits."""
        if row["error"]:
            return RefDecision(V.DROP, V.R_PARSE_ERROR)
        vni = row["tenant"]
        if vni == -1:
            if self.p.untagged_tenant is None:
                return RefDecision(V.DROP, V.R_NO_TENANT)
            tenant = self.p.untagged_tenant
        else:
            t = self.by_vni.get(vni)
            if t is None:
                return RefDecision(V.DROP, V.R_UNKNOWN_VNI)
            tenant = t.name
        if row["ip_ver"] not in (4, 6):
            if row["flags"] & B.F_ARP:
                return RefDecision(V.ALLOW, V.R_ARP, tenant=tenant)
            return RefDecision(V.DROP, V.R_NON_IP, tenant=tenant)
        if row["ip_ver"] == 6 and any(row[h] == 0 and row[l] >> 32 == 0xFFFF for h, l in
                                      (("src_hi", "src_lo"), ("dst_hi", "dst_lo"))):
            return RefDecision(V.DROP, V.R_MAPPED_ADDRESS, tenant=tenant)
        src = _addr(row["src_hi"], row["src_lo"])
        dst = _addr(row["dst_hi"], row["dst_lo"])
        sw = self.by_addr.get((tenant, src))
        dw = self.by_addr.get((tenant, dst))
        dec = RefDecision(V.DROP, V.R_POLICY, src=sw, dst=dw, tenant=tenant)
        if self.p.anti_spoofing and row["l2_off"] >= 0:
            mac = row["eth_src"]
            owner = self.by_mac.get((tenant, mac))
            if (sw is not None and sw.mac is not None and sw.mac != mac) or \
                    (owner is not None and owner is not sw):
                dec.reason = V.R_SPOOFED
                return dec
        pkt = {"ver": 4 if isinstance(src, ipaddress.IPv4Address) else 6, "proto": row["proto"],
               "ports": bool(row["flags"] & B.F_PORTS), "dport": row["dport"],
               "icmp": bool(row["flags"] & B.F_ICMP), "icmp_type": row["icmp_type"],
               "icmp_code": row["icmp_code"]}
        if pkt["ver"] == 6 and pkt["proto"] == 58 and pkt["icmp"] and pkt["icmp_type"] in ND_TYPES:
            dec.verdict, dec.reason = V.ALLOW, V.R_ND
            return dec
        if ct & ctstate.INVALID:
            dec.reason = V.R_INVALID
            return dec
        if ct & ctstate.ESTABLISHED:
            dec.verdict, dec.reason = V.ALLOW, V.R_ESTABLISHED
            return dec
        if ct & ctstate.RELATED:
            dec.verdict, dec.reason = V.ALLOW, V.R_RELATED
            return dec
        if sw is None and dw is None:
            dec.reason = V.R_NO_ENDPOINT
            return dec
        deny = V.REJECT if self.p.deny_action == "reject" else V.DROP
        if sw is not None and not self._run_checks(sw, True, dst, pkt, dec):
            dec.verdict, dec.reason = deny, V.R_EGRESS_DENIED
            return dec
        if dw is not None and not self._run_checks(dw, False, src, pkt, dec):
            dec.verdict, dec.reason = deny, V.R_INGRESS_DENIED
            return dec
        dec.verdict, dec.reason = V.ALLOW, V.R_POLICY
        ing = [c for c in dec.checks if c.kind in (V.IN_SG, V.IN_NP)]
        decisive = ing[0] if ing else dec.checks[0]
        dec.rule_origins = set(decisive.matches)
        return dec

    def decide(self, keys, ct_state=None):
        """Reference decisions for a whole FlowKeys (a list of RefDecision)."""
        out = []
        for i in range(keys.n):
            ct = 0 if ct_state is None else int(ct_state[i])
            out.append(self.decide_row(keys.row(i), ct))
        return out


def _check_text(kind: int, origin) -> str:
    if origin == DEFAULT_EGRESS:
        return "default_egress: allow"
    if origin[0] == "sg":
        return f"security group {origin[1]}/{origin[2]} rule {origin[3]}"
    return f"NetworkPolicy {origin[1]}/{origin[2]} {origin[3]}[{origin[4]}]"


def explain(ref: Reference, row: dict, ct: int) -> list[str]:
    """Human-readable lines saying how the reference decided one packet."""
    d = ref.decide_row(row, ct)
    lines = []
    vni = row["tenant"]
    lines.append(f"tenant: {d.tenant or '-'} (VNI {vni if vni >= 0 else 'none'})")
    if row["ip_ver"] in (4, 6) and not row["error"]:
        def who(w):
            return f" = {w.tenant}/{w.name}" if w is not None else " (not a workload)"
        lines.append(f"src {_addr(row['src_hi'], row['src_lo'])}{who(d.src)}, "
                     f"dst {_addr(row['dst_hi'], row['dst_lo'])}{who(d.dst)}")
        lines.append(f"conntrack: {ctstate.state_name(ct)}")
    for c in d.checks:
        side = "egress of" if c.kind in (V.EG_SG, V.EG_NP) else "ingress of"
        what = "security groups" if c.kind in (V.EG_SG, V.IN_SG) else "network policies"
        if c.matches:
            lines.append(f"{side} {c.workload.tenant}/{c.workload.name}, {what}: allowed by "
                         + "; ".join(_check_text(c.kind, o) for o in c.matches))
        else:
            lines.append(f"{side} {c.workload.tenant}/{c.workload.name}, {what}: no rule allows it")
    lines.append(f"verdict: {V.verdict_name(d.verdict)} ({V.reason_name(d.reason)})")
    return lines
