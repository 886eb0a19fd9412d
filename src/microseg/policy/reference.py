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
from .k8s import admin_peer_matches
from .model import ICMP_PROTOCOLS, PORT_PROTOCOLS, Policy, Workload

ND_TYPES = range(133, 137)  # router/neighbour solicitation/advertisement
DEFAULT_EGRESS = ("default_egress",)


@dataclass
class Check:
    kind: int  # verdict.EG_SG ... IN_DEF
    workload: Workload
    matches: list  # origin keys of every rule that matches


@dataclass
class RefDecision:
    verdict: int
    reason: int
    rule_origins: set = field(default_factory=set)  # acceptable origins of the reported rule
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

    def ns_labels(self, w: Workload) -> dict:
        return self.p.namespace_labels(w.tenant, w.namespace)

    # ---- which policies apply to a workload ---------------------------------------------------
    def _selecting(self, w: Workload, egress: bool) -> list:
        labels = w.label_dict()
        return [
            p
            for p in self.p.network_policies
            if p.tenant == w.tenant
            and p.namespace == w.namespace
            and (p.egress_type if egress else p.ingress_type)
            and p.pod_selector.matches(labels)
        ]

    def _admins(self, w: Workload, baseline: bool) -> list:
        """Admin policies of ``w``'s tenant whose subject is ``w``, in evaluation order."""
        nsl, labels = self.ns_labels(w), w.label_dict()
        return [
            a
            for a in self.p.admin_policies
            if a.tenant == w.tenant and a.baseline == baseline and a.selects(nsl, labels)
        ]

    def _sg_rules(self, w: Workload, direction: str) -> list:
        out: list = []
        for gname in w.security_groups:
            g = self.groups[(w.tenant, gname)]
            out.extend(
                ((("sg", g.tenant, g.name, i), r) for i, r in enumerate(g.rules) if r.direction == direction)
            )
        return out

    # ---- rule matching ------------------------------------------------------------------------
    def _sg_match(self, r, w: Workload, remote, pkt) -> bool:
        if r is None:  # default egress allow
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

    @staticmethod
    def _port_match(ports, dest: Workload | None, pkt) -> bool:
        """Does the packet's protocol and destination port match one of ``ports`` (None: all)?
        A named port resolves on the destination workload (none: it matches nothing)."""
        if ports is None:
            return True
        for port in ports:
            if port.name is not None:
                if (
                    dest is not None
                    and pkt["ports"]
                    and (pkt["proto"], pkt["dport"]) in dest.resolve_port(port.name, port.protocol)
                ):
                    return True
                continue
            if port.protocol != pkt["proto"]:
                continue
            if port.lo is None or (pkt["ports"] and port.lo <= pkt["dport"] <= port.hi):
                return True
        return False

    def _np_match(self, r, w: Workload, egress: bool, remote, pkt) -> bool:
        other = self.by_addr.get((w.tenant, remote))
        if not self._port_match(r.ports, other if egress else w, pkt):
            return False
        if r.peers is None:
            return True
        for peer in r.peers:
            if peer.block is not None:
                if (
                    remote.version == peer.block.version
                    and remote in peer.block
                    and not any(remote in e for e in peer.excepts)
                ):
                    return True
                continue
            if other is None:
                continue
            if peer.namespaces is None:
                ns_ok = other.namespace == w.namespace  # the policy's own namespace
            else:
                ns_ok = peer.namespaces.matches(self.ns_labels(other))
            if ns_ok and (peer.pods is None or peer.pods.matches(other.label_dict())):
                return True
        return False

    def _admin_match(self, r, w: Workload, egress: bool, remote, pkt) -> bool:
        other = self.by_addr.get((w.tenant, remote))
        if not self._port_match(r.ports, other if egress else w, pkt):
            return False
        for peer in r.peers:
            if peer.networks:
                if any(remote.version == n.version and remote in n for n in peer.networks):
                    return True
            elif other is not None and admin_peer_matches(peer, self.ns_labels(other), other.label_dict()):
                return True
        return False

    # ---- one side: the sender's egress or the receiver's ingress -----------------------------
    def _side(self, w: Workload, egress: bool, remote, pkt, dec: RefDecision) -> bool:
        """Security groups AND the Kubernetes chain (admin, NetworkPolicies, baseline,
        default), as ``docs/policy.md`` orders them. Records the checks that count."""
        base = 0 if egress else V.SIDE
        d = "egress" if egress else "ingress"
        ok = True
        if w.security_groups:
            rules = self._sg_rules(w, d)
            if not rules and egress and self.p.default_egress == "allow":
                rules = [(DEFAULT_EGRESS, None)]
            m = [o for o, r in rules if self._sg_match(r, w, remote, pkt)]
            dec.checks.append(Check(base + V.EG_SG, w, m))
            ok = bool(m)
        return self._k8s(w, egress, remote, pkt, dec) and ok

    def _k8s(self, w, egress, remote, pkt, dec) -> bool:
        base = 0 if egress else V.SIDE
        d = "egress" if egress else "ingress"
        for a in self._admins(w, baseline=False):
            for i, r in enumerate(a.egress if egress else a.ingress):
                if self._admin_match(r, w, egress, remote, pkt):
                    if r.action == "Pass":
                        break  # on to the NetworkPolicies
                    dec.checks.append(
                        Check(
                            base + V.EG_ANP,
                            w,
                            [("anp", a.tenant, a.name, d, i)] if r.action == "Allow" else [],
                        )
                    )
                    return r.action == "Allow"
            else:
                continue
            break  # Pass: skip the remaining admin policies
        sel = self._selecting(w, egress)
        if sel:
            m = [
                ("np", p.namespace, p.name, d, i)
                for p in sel
                for i, r in enumerate(p.egress if egress else p.ingress)
                if self._np_match(r, w, egress, remote, pkt)
            ]
            dec.checks.append(Check(base + V.EG_NP, w, m))
            return bool(m)
        for a in self._admins(w, baseline=True):
            for i, r in enumerate(a.egress if egress else a.ingress):
                if self._admin_match(r, w, egress, remote, pkt):
                    dec.checks.append(
                        Check(
                            base + V.EG_BANP,
                            w,
                            [("banp", a.tenant, a.name, d, i)] if r.action == "Allow" else [],
                        )
                    )
                    return r.action == "Allow"
        if w.security_groups or self.p.isolation(w) == "kubernetes":
            return True  # non-isolated (or the groups decide)
        # a zero-trust namespace: unselected pods are denied, egress unless default_egress
        dm: list = [DEFAULT_EGRESS] if egress and self.p.default_egress == "allow" else []
        dec.checks.append(Check(base + V.EG_DEF, w, dm))
        return bool(dm)

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
        if row["ip_ver"] == 6 and any(
            row[h] == 0 and row[l] >> 32 == 0xFFFF for h, l in (("src_hi", "src_lo"), ("dst_hi", "dst_lo"))
        ):
            return RefDecision(V.DROP, V.R_MAPPED_ADDRESS, tenant=tenant)
        src = _addr(row["src_hi"], row["src_lo"])
        dst = _addr(row["dst_hi"], row["dst_lo"])
        sw = self.by_addr.get((tenant, src))
        dw = self.by_addr.get((tenant, dst))
        dec = RefDecision(V.DROP, V.R_POLICY, src=sw, dst=dw, tenant=tenant)
        if self.p.anti_spoofing and row["l2_off"] >= 0:
            mac = row["eth_src"]
            owner = self.by_mac.get((tenant, mac))
            if (sw is not None and sw.mac is not None and sw.mac != mac) or (
                owner is not None and owner is not sw
            ):
                dec.reason = V.R_SPOOFED
                return dec
        pkt = {
            "ver": 4 if isinstance(src, ipaddress.IPv4Address) else 6,
            "proto": row["proto"],
            "ports": bool(row["flags"] & B.F_PORTS),
            "dport": row["dport"],
            "icmp": bool(row["flags"] & B.F_ICMP),
            "icmp_type": row["icmp_type"],
            "icmp_code": row["icmp_code"],
        }
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
        if sw is not None and not self._side(sw, True, dst, pkt, dec):
            dec.verdict, dec.reason = deny, V.R_EGRESS_DENIED
            return dec
        if dw is not None and not self._side(dw, False, src, pkt, dec):
            dec.verdict, dec.reason = deny, V.R_INGRESS_DENIED
            return dec
        dec.verdict = V.ALLOW
        counted = [c for c in dec.checks if c.matches]
        if not counted:
            dec.reason = V.R_NON_ISOLATED  # no rule had to allow it
            return dec
        dec.reason = V.R_POLICY
        ing = [c for c in counted if not V.is_egress(c.kind)]
        decisive = (ing or counted)[0]
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
    if origin[0] == "anp":
        return f"AdminNetworkPolicy {origin[2]} {origin[3]}[{origin[4]}]"
    if origin[0] == "banp":
        return f"BaselineAdminNetworkPolicy {origin[2]} {origin[3]}[{origin[4]}]"
    return f"NetworkPolicy {origin[1]}/{origin[2]} {origin[3]}[{origin[4]}]"


def explain(ref: Reference, row: dict, ct: int) -> list[str]:
    """Human-readable lines saying how the reference decided one packet."""
    d = ref.decide_row(row, ct)
    lines = []
    vni = row["tenant"]
    lines.append(f"tenant: {d.tenant or '-'} (VNI {vni if vni >= 0 else 'none'})")
    if row["ip_ver"] in (4, 6) and not row["error"]:

        def who(w):
            return f" = {ref.p.qualified_name(w)}" if w is not None else " (not a workload)"

        lines.append(
            f"src {_addr(row['src_hi'], row['src_lo'])}{who(d.src)}, "
            f"dst {_addr(row['dst_hi'], row['dst_lo'])}{who(d.dst)}"
        )
        lines.append(f"conntrack: {ctstate.state_name(ct)}")
    for c in d.checks:
        side, _, what = V.CHECKS[c.kind].partition(" ")
        name = ref.p.qualified_name(c.workload)
        if c.matches:
            lines.append(
                f"{side} of {name}, {what}: allowed by "
                + "; ".join(_check_text(c.kind, o) for o in c.matches)
            )
        else:
            lines.append(f"{side} of {name}, {what}: no rule allows it")
    if d.reason == V.R_NON_ISOLATED:
        lines.append("no policy isolates these pods in this direction (Kubernetes: allowed)")
    lines.append(f"verdict: {V.verdict_name(d.verdict)} ({V.reason_name(d.reason)})")
    return lines
