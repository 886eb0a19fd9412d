"""A policy as an nftables ruleset (``microseg policy export --format nftables``).

nftables sees no VNI, so one export covers one tenant. The ruleset is one ``table inet
microseg`` with a ``forward`` base chain that takes the decision steps of ``docs/policy.md``
in the same order (IPv4-mapped IPv6 addresses, anti-spoofing, neighbour discovery,
conntrack, no endpoint), then sends each NEW packet through the egress chain of its source
workload and the ingress chain of its destination workload (maps from address to chain). A
side's chain jumps to its security-group chain (a match returns, the end denies), then walks
the Kubernetes chain: admin policies in priority order (Allow returns, Deny denies, Pass goes
to the NetworkPolicy chain), the NetworkPolicies selecting the workload, the baseline, and
the namespace's isolation. Security-group remote groups and pod-selector peers are named sets
of addresses; named ports are expanded per destination.
"""

from __future__ import annotations

import re

from ..errors import InputError
from .k8s import admin_peer_matches
from .model import ICMP_PROTOCOLS, PORT_PROTOCOLS, Policy, Workload, format_mac

# IPv6 extension headers (and AH): nftables' ``meta l4proto`` looks past them, microseg does not.
EXT_HEADERS = frozenset({0, 43, 44, 51, 60})
ND_TYPES = "nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert"
TABLE = "microseg"


def _ident(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


class _Sets:
    """Named address sets, one per (family, content), named after their first user."""

    def __init__(self):
        self.by_content: dict = {}
        self.names: set = set()
        self.decl: list = []

    def get(self, hint: str, family: int, addrs) -> str:
        key = (family, tuple(sorted(addrs)))
        name = self.by_content.get(key)
        if name is None:
            base = _ident(f"{hint}_v{family}")[:200]
            name, i = base, 1
            while name in self.names:
                i += 1
                name = f"{base}_{i}"
            self.names.add(name)
            self.by_content[key] = name
            t = "ipv4_addr" if family == 4 else "ipv6_addr"
            elems = ", ".join(str(a) for a in key[1])
            body = f"\tset {name} {{\n\t\ttype {t}\n"
            if elems:
                body += f"\t\telements = {{ {elems} }}\n"
            self.decl.append(body + "\t}")
        return name


class _Export:
    def __init__(self, policy: Policy, tenant: str):
        self.p = policy
        self.t = tenant
        self.wls = [w for w in policy.workloads if w.tenant == tenant]
        self.groups = {g.name: g for g in policy.security_groups if g.tenant == tenant}
        self.sets = _Sets()
        self.chains: list = []
        self.chain_names: dict = {}
        self.deny = "goto deny"

    # ---- helpers --------------------------------------------------------------------------
    def nsl(self, w: Workload) -> dict:
        return self.p.namespace_labels(w.tenant, w.namespace)

    def chain_name(self, w: Workload, what: str) -> str:
        key = (what, w.namespace, w.name)
        if key not in self.chain_names:
            base = name = _ident(f"{what}_{w.namespace}_{w.name}")
            i = 1
            while name in self.chain_names.values():
                i += 1
                name = f"{base}_{i}"
            self.chain_names[key] = name
        return self.chain_names[key]

    def addr_match(self, egress: bool, family: int, what: str) -> str:
        field = ("ip" if family == 4 else "ip6") + (" daddr " if egress else " saddr ")
        return field + what

    def remote_clauses(self, egress: bool, remote, hint: str) -> list:
        """nft match texts (without the port part) for one remote: ('any',) | ('net', n,
        excepts) | ('addrs', [addresses])."""
        if remote[0] == "any":
            return [""]
        if remote[0] == "net":
            n, excepts = remote[1], remote[2]
            text = self.addr_match(egress, n.version, str(n))
            ex = [str(e) for e in excepts if e.version == n.version]
            if ex:
                text += " " + self.addr_match(egress, n.version, "!= { " + ", ".join(ex) + " }")
            return [text]
        out = []
        for fam in (4, 6):
            addrs = sorted({a for a in remote[1] if a.version == fam})
            if addrs:
                out.append(self.addr_match(egress, fam, "@" + self.sets.get(hint, fam, addrs)))
        return out

    @staticmethod
    def port_text(proto: int, lo, hi) -> str:
        text = f"meta l4proto {proto}"
        if lo is not None:
            hi = lo if hi is None else hi
            text += f" th dport {lo}" if lo == hi else f" th dport {lo}-{hi}"
        return text

    @staticmethod
    def in_remote(remote, x: Workload, a) -> bool:
        if remote[0] == "any":
            return True
        if remote[0] == "net":
            return a.version == remote[1].version and a in remote[1] and not any(a in e for e in remote[2])
        return a in remote[1]

    def k8s_rule(self, w: Workload, egress: bool, remotes: list, ports, verdict: str, hint: str) -> list:
        """nft rules for one NetworkPolicy or admin rule: any remote AND any port."""
        out = []
        for port in ports if ports is not None else [None]:
            pairs = []  # (remote, port text)
            if port is None:
                pairs = [(r, "") for r in remotes]
            elif port.name is None:
                pairs = [(r, self.port_text(port.protocol, port.lo, port.hi)) for r in remotes]
            elif not egress:  # resolves on the selected workload itself
                for proto, num in w.resolve_port(port.name, port.protocol):
                    pairs += [(r, self.port_text(proto, num, num)) for r in remotes]
            else:  # resolves on each destination workload
                by_res: dict = {}
                for x in self.wls:
                    for res in x.resolve_port(port.name, port.protocol):
                        by_res.setdefault(res, []).append(x)
                for (proto, num), xs in sorted(by_res.items()):
                    for r in remotes:
                        addrs = [a for x in xs for a in x.addresses if self.in_remote(r, x, a)]
                        if addrs:
                            pairs.append((("addrs", addrs), self.port_text(proto, num, num)))
            for r, ptext in pairs:
                for rtext in self.remote_clauses(egress, r, hint):
                    out.append(" ".join(x for x in (rtext, ptext, verdict) if x))
        return out

    # ---- security groups ------------------------------------------------------------------
    def sg_rule(self, w: Workload, egress: bool, r) -> list:
        if r.ethertype == 6 and r.protocol in EXT_HEADERS:
            raise InputError(
                f"cannot export to nftables: security group rule {r.origin or ''} matches IPv6 "
                f"protocol {r.protocol} (an extension header), which nftables' meta l4proto looks past"
            )
        parts = [f"meta nfproto ipv{r.ethertype}"]
        if r.protocol is not None:
            parts.append(f"meta l4proto {r.protocol}")
        if r.protocol in PORT_PROTOCOLS and r.port_min is not None:
            hi = r.port_min if r.port_max is None else r.port_max
            parts.append(f"th dport {r.port_min}" if r.port_min == hi else f"th dport {r.port_min}-{hi}")
        if r.protocol in ICMP_PROTOCOLS:
            kw = "icmp" if r.protocol == 1 else "icmpv6"
            if r.port_min is not None:
                parts.append(f"{kw} type {r.port_min}")
            if r.port_max is not None:
                parts.append(f"{kw} code {r.port_max}")
        if r.remote_prefix is not None:
            parts.append(self.addr_match(egress, r.ethertype, str(r.remote_prefix)))
        elif r.remote_group is not None:
            members = [a for x in self.wls if r.remote_group in x.security_groups for a in x.addresses]
            addrs = [a for a in members if a.version == r.ethertype]
            name = self.sets.get(f"sg_{r.remote_group}", r.ethertype, addrs)
            parts.append(self.addr_match(egress, r.ethertype, "@" + name))
        return [" ".join(parts) + " return"]

    # ---- one side of a workload -----------------------------------------------------------
    def side(self, w: Workload, egress: bool) -> str:
        d = "egress" if egress else "ingress"
        name = self.chain_name(w, "eg" if egress else "in")
        body = []
        if w.security_groups:
            rules = [(g, r) for g in w.security_groups for r in self.groups[g].rules if r.direction == d]
            if rules or not (egress and self.p.default_egress == "allow"):
                sg_chain = name + "_sg"
                sg_body = [f"# security groups {', '.join(w.security_groups)}, {d}"]
                for _g, r in rules:
                    sg_body += self.sg_rule(w, egress, r)
                sg_body.append(self.deny)
                self.chains.append((sg_chain, sg_body))
                body.append(f"jump {sg_chain}")
        admins = [
            a
            for a in self.p.admin_policies
            if a.tenant == self.t and not a.baseline and a.selects(self.nsl(w), w.label_dict())
        ]
        rest = self.rest(w, egress)
        if admins:
            rest_chain = name + "_np"
            self.chains.append((rest_chain, rest))
            for a in admins:
                body.append(f"# AdminNetworkPolicy {a.name} (priority {a.priority})")
                for i, r in enumerate(a.egress if egress else a.ingress):
                    verdict = {"Allow": "return", "Deny": self.deny, "Pass": f"goto {rest_chain}"}[r.action]
                    body += self.k8s_rule(
                        w, egress, self.admin_remotes(r), r.ports, verdict, f"anp_{a.name}_{d}{i}"
                    )
            body.append(f"goto {rest_chain}")
        else:
            body += rest
        self.chains.append((name, body))
        return name

    def admin_remotes(self, r) -> list:
        out: list[tuple] = []
        for peer in r.peers:
            if peer.networks:
                out += [("net", n, ()) for n in peer.networks]
            else:
                xs = [x for x in self.wls if admin_peer_matches(peer, self.nsl(x), x.label_dict())]
                out.append(("addrs", [a for x in xs for a in x.addresses]))
        return out

    def np_remotes(self, w: Workload, r) -> list:
        if r.peers is None:
            return [("any",)]
        out: list[tuple] = []
        for peer in r.peers:
            if peer.block is not None:
                out.append(("net", peer.block, peer.excepts))
                continue
            xs = []
            for x in self.wls:
                if peer.namespaces is None:
                    ns_ok = x.namespace == w.namespace
                else:
                    ns_ok = peer.namespaces.matches(self.nsl(x))
                if ns_ok and (peer.pods is None or peer.pods.matches(x.label_dict())):
                    xs.append(x)
            out.append(("addrs", [a for x in xs for a in x.addresses]))
        return out

    def rest(self, w: Workload, egress: bool) -> list:
        """NetworkPolicies, else the baseline, else the isolation default."""
        d = "egress" if egress else "ingress"
        sel = [
            p
            for p in self.p.network_policies
            if p.tenant == w.tenant
            and p.namespace == w.namespace
            and (p.egress_type if egress else p.ingress_type)
            and p.pod_selector.matches(w.label_dict())
        ]
        body = []
        if sel:
            for p in sel:
                body.append(f"# NetworkPolicy {p.namespace}/{p.name} {d}")
                for i, r in enumerate(p.egress if egress else p.ingress):
                    body += self.k8s_rule(
                        w,
                        egress,
                        self.np_remotes(w, r),
                        r.ports,
                        "return",
                        f"np_{p.namespace}_{p.name}_{d}{i}",
                    )
            body.append(self.deny)
            return body
        for a in self.p.admin_policies:
            if a.tenant == self.t and a.baseline and a.selects(self.nsl(w), w.label_dict()):
                body.append(f"# BaselineAdminNetworkPolicy {a.name}")
                for i, r in enumerate(a.egress if egress else a.ingress):
                    verdict = "return" if r.action == "Allow" else self.deny
                    body += self.k8s_rule(
                        w, egress, self.admin_remotes(r), r.ports, verdict, f"banp_{a.name}_{d}{i}"
                    )
        if w.security_groups or self.p.isolation(w) == "kubernetes":
            body.append("return")  # non-isolated, or the security groups decide
        elif egress and self.p.default_egress == "allow":
            body.append("return")  # zero trust: default_egress allow
        else:
            body.append(self.deny)  # zero trust
        return body

    # ---- the whole table ------------------------------------------------------------------
    def text(self) -> str:
        eg: dict[int, list] = {4: [], 6: []}
        ing: dict[int, list] = {4: [], 6: []}
        for w in self.wls:
            e, i = self.side(w, True), self.side(w, False)
            for a in w.addresses:
                eg[a.version].append(f"{a} : jump {e}")
                ing[a.version].append(f"{a} : jump {i}")
        fwd = [
            "type filter hook forward priority filter; policy drop;",
            "ip6 saddr ::ffff:0.0.0.0/96 drop",
            "ip6 daddr ::ffff:0.0.0.0/96 drop",
        ]
        if self.p.anti_spoofing:
            for w in self.wls:
                if w.mac is None:
                    continue
                mac = format_mac(w.mac)
                for fam, kw in ((4, "ip"), (6, "ip6")):
                    mine = [str(a) for a in w.addresses if a.version == fam]
                    if mine:
                        fwd.append(f"{kw} saddr {{ {', '.join(mine)} }} ether saddr != {mac} drop")
                        fwd.append(f"ether saddr {mac} {kw} saddr != {{ {', '.join(mine)} }} drop")
                    else:
                        fwd.append(f"ether saddr {mac} meta nfproto ipv{fam} drop")
        fwd += [
            f"icmpv6 type {{ {ND_TYPES} }} accept",
            "ct state invalid drop",
            "ct state established,related accept",
            "ip saddr != @workloads_v4 ip daddr != @workloads_v4 drop",
            "ip6 saddr != @workloads_v6 ip6 daddr != @workloads_v6 drop",
            "ip saddr vmap @egress_v4",
            "ip6 saddr vmap @egress_v6",
            "ip daddr vmap @ingress_v4",
            "ip6 daddr vmap @ingress_v6",
            "accept",
        ]
        deny = (
            ["meta l4proto tcp reject with tcp reset", "reject"]
            if self.p.deny_action == "reject"
            else ["drop"]
        )
        source = " ".join(self.p.source.split())
        out = [
            f"# microseg policy {source}, tenant {self.t}: deny_action {self.p.deny_action}, "
            f"default_egress {self.p.default_egress}",
            f"table inet {TABLE}",
            f"delete table inet {TABLE}",
            f"table inet {TABLE} {{",
        ]
        for fam in (4, 6):
            addrs = sorted({a for w in self.wls for a in w.addresses if a.version == fam})
            t = "ipv4_addr" if fam == 4 else "ipv6_addr"
            out.append(f"\tset workloads_v{fam} {{\n\t\ttype {t}")
            if addrs:
                out.append(f"\t\telements = {{ {', '.join(map(str, addrs))} }}")
            out.append("\t}")
            for mname, elems in ((f"egress_v{fam}", eg[fam]), (f"ingress_v{fam}", ing[fam])):
                out.append(f"\tmap {mname} {{\n\t\ttype {t} : verdict")
                if elems:
                    out.append(f"\t\telements = {{ {', '.join(elems)} }}")
                out.append("\t}")
        out += self.sets.decl
        for name, body in [("deny", deny)] + sorted(self.chains):
            out.append(f"\tchain {name} {{")
            out += [f"\t\t{line}" for line in body]
            out.append("\t}")
        out.append("\tchain forward {")
        out += [f"\t\t{line}" for line in fwd]
        out.append("\t}")
        out.append("}")
        return "\n".join(out) + "\n"


def export_nftables(policy: Policy, tenant: str | None = None) -> str:
    """The nftables ruleset (text for ``nft -f``) of one tenant of ``policy``.

    Raises :class:`InputError` (one line) where the policy says something the ruleset cannot.
    """
    names = [t.name for t in policy.tenants]
    if tenant is None:
        if len(names) != 1:
            raise InputError(
                f"the policy has {len(names)} tenants ({', '.join(names)}): give --tenant "
                "(nftables sees no VNI, so one ruleset covers one tenant)"
            )
        tenant = names[0]
    if tenant not in names:
        raise InputError(f"no tenant {tenant!r} in the policy (it has: {', '.join(names)})")
    return _Export(policy, tenant).text()
