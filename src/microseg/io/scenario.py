"""Scenario configuration and the policy's intent, reasoned out independently of the datapath.

:class:`ScenarioConfig` is the small knob set of the traffic generator (flow count, traffic mix,
attack shares, tunnel, packet rate, seed). :class:`Intent` answers "should a new connection from
workload S to workload D (or to a bare address) on protocol/port P be let through, and why",
straight from the loaded policy model. It shares no code with the policy compiler or its
per-packet reference: it enumerates the rules of the two endpoints the way the Neutron and
Kubernetes documentation read, so that ground truth built on it can catch either one's bugs.

The rule (documented in ``docs/generator.md``): a new connection passes when

1. the sender's egress allows it: some egress rule of one of its security groups matches
   (ethertype, protocol, destination port or ICMP type/code, remote prefix or remote group);
   a sender whose groups have no egress rule at all, or that has neither groups nor a
   NetworkPolicy selecting it, passes only with ``default_egress: allow``; and, if some
   NetworkPolicy of its namespace selects it for Egress, one of those policies' egress rules
   matches;
2. the receiver, when it is a workload of the tenant, admits it: some ingress rule of its
   groups matches (checked when it has groups or no NetworkPolicy selects it: no rules at all
   means deny) and, if NetworkPolicies select it for Ingress, one of their ingress rules does.

A denied connection gets ``deny_action`` (drop or reject).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import InputError

TCP, UDP, ICMP, ICMP6 = 6, 17, 1, 58
_PROTO_NAMES = {TCP: "tcp", UDP: "udp", ICMP: "icmp", ICMP6: "ipv6-icmp", 132: "sctp"}
TUNNELS = ("vxlan", "geneve", "nvgre", "none")


@dataclass
class ScenarioConfig:
    """What to generate. Shares of flows are fractions of the benign flows; attack shares are
    fractions of all generated packets."""

    seed: int = 1
    flows: int = 2000  # benign flows (allowed and denied)
    tunnel: str = "vxlan"  # vxlan | geneve | nvgre | none
    rate_pps: float = 200_000.0  # mean packet rate (Poisson arrivals)
    start_ns: int = 1_767_225_600_000_000_000  # first timestamp: 2026-01-01T00:00:00Z
    tenants: list | None = None  # restrict to these tenants (default: all)
    tls_share: float = 0.35  # TLS on tcp/443
    dns_share: float = 0.2  # DNS over UDP
    icmp_share: float = 0.05  # ICMP echo
    denied_share: float = 0.1  # flows the policy forbids (benign-looking mistakes)
    ipv6_share: float = 0.1  # flows over IPv6 where both ends have an IPv6 address
    size_alpha: float = 1.2  # Pareto shape of response sizes (heavy tail)
    size_min: int = 800  # Pareto scale (bytes)
    size_max: int = 4_000_000  # cap on one response (bytes)
    scan_share: float = 0.02  # port-scan probes
    spoof_share: float = 0.01  # cross-tenant spoofing
    invalid_share: float = 0.01  # invalid TCP (bad flag combinations, out of window)
    synflood_share: float = 0.02  # SYN flood

    _SHARES = (
        "tls_share",
        "dns_share",
        "icmp_share",
        "denied_share",
        "ipv6_share",
        "scan_share",
        "spoof_share",
        "invalid_share",
        "synflood_share",
    )

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def bad(msg):
            raise InputError(f"scenario: {msg}")

        for name in self._SHARES:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v <= 1.0:
                bad(f"{name} must be a number in 0..1, not {v!r}")
        if self.tls_share + self.dns_share + self.icmp_share > 1.0 + 1e-9:
            bad("tls_share + dns_share + icmp_share must not exceed 1")
        if self.scan_share + self.spoof_share + self.invalid_share + self.synflood_share >= 0.9:
            bad("attack shares must add up to less than 0.9")
        for name, lo, hi in (
            ("seed", 0, 2**63 - 1),
            ("flows", 1, 5_000_000),
            ("size_min", 1, 1 << 30),
            ("size_max", 1, 1 << 31),
            ("start_ns", 0, 2**63 - 1),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                bad(f"{name} must be an integer in {lo}..{hi}, not {v!r}")
        if self.size_max < self.size_min:
            bad("size_max must be at least size_min")
        if (
            not isinstance(self.rate_pps, (int, float))
            or isinstance(self.rate_pps, bool)
            or not 1.0 <= self.rate_pps <= 1e10
        ):
            bad(f"rate_pps must be a number in 1..1e10, not {self.rate_pps!r}")
        if not isinstance(self.size_alpha, (int, float)) or not 0.5 <= self.size_alpha <= 10:
            bad(f"size_alpha must be a number in 0.5..10, not {self.size_alpha!r}")
        if self.tunnel not in TUNNELS:
            bad(f"tunnel must be one of {', '.join(TUNNELS)}, not {self.tunnel!r}")
        if self.tenants is not None and (
            not isinstance(self.tenants, (list, tuple)) or not all(isinstance(t, str) for t in self.tenants)
        ):
            bad("tenants must be a list of tenant names")

    @classmethod
    def from_mapping(cls, data) -> ScenarioConfig:
        """Build from a dict (e.g. a YAML scenario file); unknown keys are an error."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise InputError("scenario: expected a mapping of settings")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise InputError(
                f"scenario: unknown setting(s) {', '.join(unknown)} (expected: {', '.join(sorted(known))})"
            )
        vals = dict(data)
        for k in ("rate_pps", "size_alpha") + cls._SHARES:
            if isinstance(vals.get(k), int) and not isinstance(vals.get(k), bool):
                vals[k] = float(vals[k])
        return cls(**vals)

    @classmethod
    def from_file(cls, path: str) -> ScenarioConfig:
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as exc:
            raise InputError(f"cannot read: {exc.strerror or exc}", path) from None
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise InputError(f"not a YAML scenario: {exc}", path) from None
        try:
            return cls.from_mapping(data)
        except InputError as exc:
            raise InputError(str(exc), path) from None


# ---------------------------------------------------------------------------------------------
# Intent
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    allow: bool
    reason: str  # human text, e.g. "allowed by sg web ingress tcp/80"
    cause: str  # short code: policy | egress_denied | ingress_denied


def _ports_text(lo, hi) -> str:
    if lo is None:
        return ""
    return f"/{lo}" if hi is None or hi == lo else f"/{lo}-{hi}"


def describe_sg_rule(group: str, r) -> str:
    if r.protocol is None:
        what = "any"
    elif r.protocol in (ICMP, ICMP6):
        what = _PROTO_NAMES[r.protocol]
        if r.port_min is not None:
            what += f" type {r.port_min}" + (f" code {r.port_max}" if r.port_max is not None else "")
    else:
        what = _PROTO_NAMES.get(r.protocol, str(r.protocol)) + _ports_text(r.port_min, r.port_max)
    return f"sg {group} {r.direction} {what}"


def describe_np_rule(p, direction: str, r) -> str:
    if r.ports is None:
        what = "any"
    else:
        what = ",".join(
            _PROTO_NAMES.get(pt.protocol, str(pt.protocol)) + _ports_text(pt.lo, pt.hi) for pt in r.ports
        )
    return f"networkpolicy {p.namespace}/{p.name} {direction} {what}"


@dataclass
class Flow5:
    """What a connection attempt looks like to the rules."""

    family: int  # 4 | 6
    proto: int
    dport: int = 0  # TCP/UDP
    icmp_type: int = -1
    icmp_code: int = 0


class Intent:
    """Connection-level decisions for one loaded policy (see the module docstring)."""

    def __init__(self, policy):
        self.p = policy
        self.groups = {(g.tenant, g.name): g for g in policy.security_groups}
        self.by_addr = {}
        for w in policy.workloads:
            for a in w.addresses:
                self.by_addr[(w.tenant, a)] = w
        if getattr(policy, "admin_policies", ()):
            from ..errors import InputError

            raise InputError(
                "the generator's ground truth does not read AdminNetworkPolicy or "
                "BaselineAdminNetworkPolicy: generate with a policy without them",
                getattr(policy, "source", None),
            )
        self.deny_verdict = "reject" if getattr(policy, "deny_action", "drop") == "reject" else "drop"

    # -- helpers ---------------------------------------------------------------------------------
    def _selecting(self, w, direction: str) -> list:
        labels = dict(w.labels)
        out = []
        for p in self.p.network_policies:
            if p.tenant != w.tenant or p.namespace != w.namespace:
                continue
            if not (p.ingress_type if direction == "ingress" else p.egress_type):
                continue
            if p.pod_selector.matches(labels):
                out.append(p)
        return out

    def _sg_rule_matches(self, r, tenant, remote_addr, f: Flow5) -> bool:
        if r.ethertype != f.family:
            return False
        if r.protocol is not None and r.protocol != f.proto:
            return False
        if r.protocol in (TCP, UDP, 132, 33, 136) and r.port_min is not None:
            if not (r.port_min <= f.dport <= r.port_max):
                return False
        if r.protocol in (ICMP, ICMP6):
            if r.port_min is not None and f.icmp_type != r.port_min:
                return False
            if r.port_max is not None and f.icmp_code != r.port_max:
                return False
        if r.remote_group is not None:
            peer = self.by_addr.get((tenant, remote_addr))
            return peer is not None and r.remote_group in peer.security_groups
        if r.remote_prefix is not None:
            return remote_addr.version == r.remote_prefix.version and remote_addr in r.remote_prefix
        return True

    def _np_rule_matches(self, r, w, direction, remote_addr, f: Flow5) -> bool:
        tenant = w.tenant
        peer_w = self.by_addr.get((tenant, remote_addr))
        if r.ports is not None:
            # a named port is the destination pod's own: the local pod for ingress
            dest = w if direction == "ingress" else peer_w

            def port_ok(pt):
                if pt.name is not None:
                    return dest is not None and any(
                        n == pt.name and proto == f.proto and port == f.dport
                        for n, proto, port in dest.named_ports
                    )
                return pt.protocol == f.proto and (pt.lo is None or pt.lo <= f.dport <= pt.hi)

            if f.proto not in (TCP, UDP, 132) or not any(port_ok(pt) for pt in r.ports):
                return False
        if r.peers is None:
            return True
        for peer in r.peers:
            if peer.block is not None:
                if (
                    remote_addr.version == peer.block.version
                    and remote_addr in peer.block
                    and not any(remote_addr in e for e in peer.excepts)
                ):
                    return True
                continue
            if peer_w is None:
                continue
            if peer.namespaces is None:
                ns_ok = peer_w.namespace == w.namespace  # the policy's own namespace
            else:
                ns_ok = peer.namespaces.matches(self.p.namespace_labels(tenant, peer_w.namespace))
            if ns_ok and (peer.pods is None or peer.pods.matches(dict(peer_w.labels))):
                return True
        return False

    def _check(self, w, direction: str, remote_addr, f: Flow5):
        """(ok, text of the deciding rule or None)."""
        nps = self._selecting(w, direction)
        sg_text = None
        if not w.security_groups and not nps and self.p.isolation(w) == "kubernetes":
            return True, "no policy isolates the pod (Kubernetes)"
        check_sg = bool(w.security_groups) or not nps
        if check_sg:
            rules = [
                (g, r)
                for g in w.security_groups
                for r in self.groups[(w.tenant, g)].rules
                if r.direction == direction
            ]
            if direction == "egress" and not rules and self.p.default_egress == "allow":
                sg_text = "default egress allow"
            else:
                for g, r in rules:
                    if self._sg_rule_matches(r, w.tenant, remote_addr, f):
                        sg_text = describe_sg_rule(g, r)
                        break
                if sg_text is None:
                    return False, None
        if nps:
            for p in nps:
                for r in p.ingress if direction == "ingress" else p.egress:
                    if self._np_rule_matches(r, w, direction, remote_addr, f):
                        return True, describe_np_rule(p, direction, r)
            return False, None
        return True, sg_text

    # -- the decision ----------------------------------------------------------------------------
    def decide(self, src, src_addr, dst, dst_addr, f: Flow5) -> Decision:
        """Decision for a new connection from workload ``src`` (address ``src_addr``) to
        ``dst_addr``, which is workload ``dst`` or, with ``dst`` None, no workload of the tenant."""
        ok, eg_text = self._check(src, "egress", dst_addr, f)
        if not ok:
            return Decision(False, "default deny (egress)", "egress_denied")
        if dst is None:
            return Decision(True, f"allowed by {eg_text}", "policy")
        ok, in_text = self._check(dst, "ingress", src_addr, f)
        if not ok:
            return Decision(False, "default deny (ingress)", "ingress_denied")
        return Decision(True, f"allowed by {in_text}", "policy")


def address_of(w, family: int):
    """The first address of ``w`` of the given family (4/6), or None."""
    for a in w.addresses:
        if a.version == family:
            return a
    return None
