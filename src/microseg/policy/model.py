"""The policy model (tenants, hosts, workloads, security groups, network policies) and its loader.

:func:`load_policy` reads the YAML format described in ``docs/policy.md`` and validates every
field; a problem is reported as ``file:line: field: message`` (all problems at once, via
:class:`~microseg.policy.source.PolicyError`). The model is made of frozen dataclasses and
tuples, so a loaded policy cannot change under the compiler.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from ..errors import InputError
from . import k8s, openstack
from .source import Map, Reporter, Seq, load_documents, read_text

NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,62}[A-Za-z0-9])?$")
MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}([:-][0-9A-Fa-f]{2}){5}$")
MAX_VNI = (1 << 24) - 1

# Neutron's protocol names (plus the legacy "icmpv6" alias).
PROTOCOLS = {
    "ah": 51,
    "dccp": 33,
    "egp": 8,
    "esp": 50,
    "gre": 47,
    "icmp": 1,
    "igmp": 2,
    "ipip": 4,
    "ipv6-encap": 41,
    "ipv6-frag": 44,
    "ipv6-icmp": 58,
    "icmpv6": 58,
    "ipv6-nonxt": 59,
    "ipv6-opts": 60,
    "ipv6-route": 43,
    "ospf": 89,
    "pgm": 113,
    "rsvp": 46,
    "sctp": 132,
    "tcp": 6,
    "udp": 17,
    "udplite": 136,
    "vrrp": 112,
}
PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "ipv6-icmp", 132: "sctp", 33: "dccp", 136: "udplite"}
PORT_PROTOCOLS = frozenset({6, 17, 33, 132, 136})  # protocols whose rules may give ports
ICMP_PROTOCOLS = frozenset({1, 58})
IPV6_ONLY_PROTOCOLS = frozenset({43, 44, 58, 59, 60})  # routing, fragment, ICMPv6, no-next, options


ISOLATIONS = ("kubernetes", "deny")


@dataclass(frozen=True)
class Namespace:
    """A Kubernetes namespace inside a tenant: its pods share the tenant's pod network (VNI).

    ``isolation`` is what happens to a pod no NetworkPolicy selects in a direction:
    ``kubernetes`` (non-isolated: everything allowed in that direction, the Kubernetes
    semantics) or ``deny`` (zero trust: denied unless a security group or ``default_egress``
    allows it).
    """

    name: str
    labels: tuple = ()  # sorted (key, value) pairs, kubernetes.io/metadata.name excluded
    isolation: str = "kubernetes"


@dataclass(frozen=True)
class Tenant:
    name: str
    vni: int
    labels: tuple = ()  # sorted (key, value) pairs
    namespaces: tuple = ()  # Namespace; a tenant without any has one implicit
    implicit_namespace: bool = True  # no namespaces: declared: one named after the tenant

    def namespace(self, name: str) -> Namespace | None:
        for ns in self.namespaces:
            if ns.name == name:
                return ns
        return None


@dataclass(frozen=True)
class Host:
    name: str
    address: str


@dataclass(frozen=True)
class Workload:
    name: str
    tenant: str
    host: str | None
    mac: int | None  # 48-bit integer, None when not given
    addresses: tuple  # ipaddress.IPv4Address / IPv6Address, in file order
    labels: tuple = ()  # sorted (key, value) pairs
    security_groups: tuple = ()  # names of security groups of the same tenant
    namespace: str = ""  # a namespace of the tenant ("" only before loading)
    named_ports: tuple = ()  # (name, protocol number, port), as a container's ports

    def label_dict(self) -> dict:
        return dict(self.labels)

    def resolve_port(self, name: str, protocol: int) -> list:
        """``[(protocol, port)]`` of this workload's named port ``name``: the one of
        ``protocol``, or, for ``k8s.ANY_PROTOCOL``, every protocol's (empty: none)."""
        return [
            (proto, port)
            for n, proto, port in self.named_ports
            if n == name and (protocol == k8s.ANY_PROTOCOL or proto == protocol)
        ]


@dataclass(frozen=True)
class SGRule:
    """One Neutron security-group rule, normalised.

    ``protocol`` is None for any; for TCP/UDP/SCTP/DCCP/UDPLite ``port_min..port_max`` is the
    destination-port range (None = any); for ICMP ``port_min`` is the type and ``port_max`` the
    code (None = any). Exactly one or none of ``remote_prefix`` / ``remote_group`` is set; with
    none the remote is any address of the rule's ethertype.
    """

    direction: str  # "ingress" | "egress"
    ethertype: int  # 4 | 6
    protocol: int | None
    port_min: int | None
    port_max: int | None
    remote_prefix: object = None  # ipaddress network or None
    remote_group: str | None = None  # security-group name (same tenant)
    origin: str = ""  # "file:line" it came from


@dataclass(frozen=True)
class SecurityGroup:
    name: str
    tenant: str
    id: str | None
    rules: tuple  # SGRule


@dataclass(frozen=True)
class Policy:
    tenants: tuple  # Tenant
    hosts: tuple  # Host
    security_groups: tuple  # SecurityGroup
    workloads: tuple  # Workload
    network_policies: tuple  # k8s.NetworkPolicy
    default_egress: str = "deny"  # "allow" | "deny"
    deny_action: str = "drop"  # "drop" | "reject"
    untagged_tenant: str | None = None  # tenant of packets that arrive without a tunnel header
    anti_spoofing: bool = True
    source: str = "<policy>"
    admin_policies: tuple = ()  # k8s.AdminPolicy (AdminNetworkPolicy and Baseline...)

    def qualified_name(self, w: Workload) -> str:
        """``tenant/name``, or ``tenant/namespace/name`` where the namespace is not the
        tenant's own (as ``microseg.policy.names`` reads them)."""
        return f"{w.tenant}/{w.name}" if w.namespace == w.tenant else f"{w.tenant}/{w.namespace}/{w.name}"

    def namespace_labels(self, tenant: str, namespace: str) -> dict:
        """The labels a namespaceSelector sees: the namespace's own plus
        ``kubernetes.io/metadata.name`` (for an implicit namespace, the tenant's labels)."""
        t = self.tenant(tenant)
        ns = t.namespace(namespace)
        labels = dict(ns.labels) if ns is not None else {}
        labels[k8s.NAMESPACE_NAME_LABEL] = namespace
        return labels

    def isolation(self, w: Workload) -> str:
        """How the namespace of ``w`` treats a pod no NetworkPolicy selects (``ISOLATIONS``)."""
        ns = self.tenant(w.tenant).namespace(w.namespace)
        return ns.isolation if ns is not None else "deny"

    def tenant(self, name: str) -> Tenant:
        """The tenant called ``name`` (KeyError if none)."""
        for t in self.tenants:
            if t.name == name:
                return t
        raise KeyError(name)

    def group(self, tenant: str, name: str) -> SecurityGroup:
        """Security group ``name`` of ``tenant`` (KeyError if none)."""
        for g in self.security_groups:
            if g.tenant == tenant and g.name == name:
                return g
        raise KeyError((tenant, name))

    def to_dict(self) -> dict:
        """A canonical, JSON-ready form (the content hash is taken over it)."""

        def net(n: object) -> str | None:
            return None if n is None else str(n)

        return {
            "tenants": [
                {
                    "name": t.name,
                    "vni": t.vni,
                    "labels": dict(t.labels),
                    **(
                        {}
                        if t.implicit_namespace
                        else {
                            "namespaces": [
                                {"name": n.name, "labels": dict(n.labels), "isolation": n.isolation}
                                for n in t.namespaces
                            ]
                        }
                    ),
                }
                for t in self.tenants
            ],
            "hosts": [{"name": h.name, "address": h.address} for h in self.hosts],
            "security_groups": [
                {
                    "name": g.name,
                    "tenant": g.tenant,
                    "id": g.id,
                    "rules": [
                        {
                            "direction": r.direction,
                            "ethertype": f"IPv{r.ethertype}",
                            "protocol": r.protocol,
                            "port_range_min": r.port_min,
                            "port_range_max": r.port_max,
                            "remote_ip_prefix": net(r.remote_prefix),
                            "remote_group": r.remote_group,
                        }
                        for r in g.rules
                    ],
                }
                for g in self.security_groups
            ],
            "workloads": [
                {
                    "name": w.name,
                    "tenant": w.tenant,
                    "host": w.host,
                    "mac": None if w.mac is None else format_mac(w.mac),
                    "addresses": [str(a) for a in w.addresses],
                    "labels": dict(w.labels),
                    "security_groups": list(w.security_groups),
                    "namespace": w.namespace,
                    "named_ports": [list(p) for p in w.named_ports],
                }
                for w in self.workloads
            ],
            "network_policies": [p.to_dict() for p in self.network_policies],
            "admin_policies": [p.to_dict() for p in self.admin_policies],
            "default_egress": self.default_egress,
            "deny_action": self.deny_action,
            "untagged_tenant": self.untagged_tenant,
            "anti_spoofing": self.anti_spoofing,
        }


def format_mac(v: int) -> str:
    return ":".join(f"{(v >> s) & 0xFF:02x}" for s in range(40, -8, -8))


# ---------------------------------------------------------------------------------------------
# Field readers: each reports through the Reporter and returns None on a bad value.
# ---------------------------------------------------------------------------------------------
class Fields:
    """Reads the fields of one mapping, reporting problems with file, line and field path."""

    def __init__(self, rep: Reporter, path: str, node: Any, where: str) -> None:
        self.rep, self.path, self.where = rep, path, where
        self.node = node if isinstance(node, Map) else None
        self.ok = True
        if self.node is None:
            self.fail(getattr(node, "line", None), "", f"must be a mapping, not {_kind(node)}")

    def fail(self, line: int | None, key: str, message: str) -> None:
        self.ok = False
        name = f"{self.where}.{key}" if key and self.where else (key or self.where)
        self.rep.error(self.path, line, name, message)

    def line(self, key: Any = None) -> int | None:
        if self.node is None:
            return None
        return self.node.line_of(key) if key is not None else self.node.line

    def has(self, key: str) -> bool:
        return self.node is not None and key in self.node and self.node[key] is not None

    def check_keys(self, allowed: Iterable[str]) -> None:
        if self.node is None:
            return
        for k in self.node:
            if k not in allowed:
                self.fail(
                    self.node.line_of(k),
                    str(k),
                    f"unknown field (expected one of: {', '.join(sorted(allowed))})",
                )

    def raw(self, key: str) -> Any:
        return self.node.raw.get(key) if self.node is not None else None

    def get(self, key: str, default: Any = None) -> Any:
        if self.node is None or key not in self.node or self.node[key] is None:
            return default
        return self.node[key]

    def string(
        self, key: str, required: bool = False, pattern: re.Pattern | None = None, what: str = "a name"
    ) -> str | None:
        v = self.get(key)
        if v is None:
            if required:
                self.fail(self.line(), key, "is required")
            return None
        if isinstance(v, (Map, Seq)):
            self.fail(self.line(key), key, f"must be {what}, not {_kind(v)}")
            return None
        s = str(self.raw(key) if self.raw(key) is not None else v)
        if pattern is not None and not pattern.match(s):
            self.fail(self.line(key), key, f"{s!r} is not {what}")
            return None
        return s

    def integer(
        self, key: str, lo: int, hi: int, required: bool = False, what: str = "an integer"
    ) -> int | None:
        v = self.get(key)
        if v is None:
            if required:
                self.fail(self.line(), key, "is required")
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raw = self.raw(key)
            if isinstance(raw, str) and re.fullmatch(r"[0-9]+", raw.strip()):
                v = int(raw)
            else:
                self.fail(self.line(key), key, f"{raw if raw is not None else v!r} is not {what}")
                return None
        elif isinstance(self.raw(key), str) and ":" in self.raw(key):
            self.fail(self.line(key), key, f"{self.raw(key)!r} is not {what} (quote it if it is text)")
            return None
        if not lo <= v <= hi:
            self.fail(self.line(key), key, f"{v} is out of range {lo}..{hi}")
            return None
        return v

    def choice(
        self, key: str, choices: Iterable[str], default: str | None = None, required: bool = False
    ) -> str | None:
        v = self.get(key)
        if v is None:
            if required:
                self.fail(self.line(), key, "is required")
            return default
        s = str(v)
        for c in choices:
            if s.lower() == c.lower():
                return c
        self.fail(self.line(key), key, f"{s!r} is not one of: {', '.join(choices)}")
        return None

    def boolean(self, key: str, default: bool) -> bool:
        v = self.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            self.fail(self.line(key), key, f"{v!r} is not true or false")
            return default
        return v

    def seq(self, key: str, required: bool = False) -> Seq:
        v = self.get(key)
        if v is None:
            if required:
                self.fail(self.line(), key, "is required")
            return Seq(self.line() or 0)
        if not isinstance(v, Seq):
            self.fail(self.line(key), key, f"must be a list, not {_kind(v)}")
            return Seq(self.line() or 0)
        return v

    def labels(self, key: str) -> tuple:
        v = self.get(key)
        if v is None:
            return ()
        if not isinstance(v, Map):
            self.fail(self.line(key), key, f"must be a mapping of label to value, not {_kind(v)}")
            return ()
        out = []
        for k, val in v.items():
            if isinstance(val, (Map, Seq)):
                self.fail(v.line_of(k), f"{key}.{k}", "a label value must be a plain value")
                continue
            text = v.raw.get(k, "") if val is not None else ""
            if not k8s.valid_label_key(str(k)):
                self.fail(v.line_of(k), f"{key}.{k}", "is not a valid label key")
                continue
            if not k8s.valid_label_value(text):
                self.fail(v.line_of(k), f"{key}.{k}", f"{text!r} is not a valid label value")
                continue
            out.append((str(k), text))
        return tuple(sorted(out))


def _kind(v: Any) -> str:
    if isinstance(v, Map):
        return "a mapping"
    if isinstance(v, Seq):
        return "a list"
    if v is None:
        return "empty"
    return f"{type(v).__name__} {v!r}"


def parse_mac(text: str) -> int | None:
    if not MAC_RE.match(text):
        return None
    return int(text.replace(":", "").replace("-", ""), 16)


def parse_protocol(value: Any, raw: Any) -> tuple[bool, int | None]:
    """(ok, number) of a Neutron protocol field: a name, a number 0-255, 'any' or empty."""
    if value is None:
        return True, None
    text = str(raw if raw is not None else value).strip().lower()
    if text in ("", "any", "null", "none"):
        return True, None
    if text.isdigit():
        n = int(text)
        return (True, n) if 0 <= n <= 255 else (False, None)
    if text in PROTOCOLS:
        return True, PROTOCOLS[text]
    return False, None


def make_sg_rule(
    rep: Reporter,
    path: str,
    f: Fields,
    direction: str,
    ethertype: int,
    protocol: int | None,
    pmin: int | None,
    pmax: int | None,
    prefix_text: str | None,
    remote_group: str | None,
    origin: str,
) -> SGRule | None:
    """Check a rule's fields together as Neutron does and build the normalised rule."""

    def line(key: str | None = None) -> int | None:
        return f.line(key)

    if protocol is not None and ethertype == 6 and protocol == 1:
        protocol = 58  # Neutron maps "icmp" in IPv6 rules to ICMPv6
    if protocol in IPV6_ONLY_PROTOCOLS and ethertype == 4:
        f.fail(line("protocol"), "protocol", f"protocol {protocol} is IPv6-only: it needs ethertype IPv6")
        return None
    if pmin is not None or pmax is not None:
        if protocol is None:
            f.fail(
                line("port_range_min"),
                "port_range_min",
                "a port range needs a protocol (tcp, udp, sctp, ...)",
            )
            return None
        if protocol in ICMP_PROTOCOLS:
            if pmin is None:
                f.fail(
                    line("port_range_max"),
                    "port_range_max",
                    "an ICMP code (port_range_max) needs a type (port_range_min)",
                )
                return None
            if pmin > 255 or (pmax is not None and pmax > 255):
                f.fail(line("port_range_min"), "port_range_min", "ICMP type and code must be 0..255")
                return None
        elif protocol in PORT_PROTOCOLS:
            if pmin == 0 or pmax == 0:
                key = "port_range_min" if pmin == 0 else "port_range_max"
                f.fail(line(key), key, "port 0 is not a valid port")
                return None
            if pmin is None or pmax is None:
                key, other = (
                    ("port_range_min", "port_range_max")
                    if pmax is None
                    else ("port_range_max", "port_range_min")
                )
                f.fail(line(key), key, f"needs {other} too (equal bounds for one port)")
                return None
            if pmin > pmax:
                f.fail(
                    line("port_range_min"),
                    "port_range_min",
                    f"port_range_min {pmin} is above port_range_max {pmax}",
                )
                return None
        else:
            f.fail(line("port_range_min"), "port_range_min", f"protocol {protocol} has no ports")
            return None
    prefix = None
    if prefix_text is not None:
        if remote_group is not None:
            f.fail(
                line("remote_ip_prefix"),
                "remote_ip_prefix",
                "give remote_ip_prefix or remote_group_id, not both",
            )
            return None
        try:
            prefix = ipaddress.ip_network(prefix_text.strip(), strict=False)
        except ValueError:
            f.fail(f.line("remote_ip_prefix"), "remote_ip_prefix", f"{prefix_text!r} is not an IP prefix")
            return None
        if prefix.version != ethertype:
            f.fail(
                f.line("remote_ip_prefix"),
                "remote_ip_prefix",
                f"{prefix} is IPv{prefix.version} but the rule's ethertype is IPv{ethertype}",
            )
            return None
        if prefix.prefixlen == 0:
            prefix = None  # any address of the ethertype
    return SGRule(direction, ethertype, protocol, pmin, pmax, prefix, remote_group, origin)


def _sg_rule(rep: Reporter, path: str, node: Any, where: str) -> tuple[SGRule | None, str | None]:
    f = Fields(rep, path, node, where)
    if not f.ok:
        return None, None
    f.check_keys(
        {
            "direction",
            "ethertype",
            "protocol",
            "port_range_min",
            "port_range_max",
            "remote_ip_prefix",
            "remote_group_id",
            "description",
            "id",
        }
    )
    direction = f.choice("direction", ("ingress", "egress"), required=True)
    eth = f.choice("ethertype", ("IPv4", "IPv6"), default="IPv4")
    ok, proto = parse_protocol(f.get("protocol"), f.raw("protocol"))
    if not ok:
        f.fail(
            f.line("protocol"), "protocol", f"{f.get('protocol')!r} is not a protocol name or number 0..255"
        )
    pmin = f.integer("port_range_min", 0, 65535, what="a port number")
    pmax = f.integer("port_range_max", 0, 65535, what="a port number")
    prefix = f.string("remote_ip_prefix", what="an IP prefix")
    group = f.string("remote_group_id", what="a security group")
    if not f.ok or direction is None or eth is None:
        return None, None
    rule = make_sg_rule(
        rep,
        path,
        f,
        direction,
        4 if eth == "IPv4" else 6,
        proto,
        pmin,
        pmax,
        prefix,
        group,
        f"{path}:{f.line()}",
    )
    return rule, group


def _resolve_path(base_dir: str, p: str) -> str:
    return p if os.path.isabs(p) else os.path.join(base_dir, p)


TOP_KEYS = {
    "tenants",
    "hosts",
    "security_groups",
    "workloads",
    "network_policies",
    "default_egress",
    "deny_action",
    "untagged_tenant",
    "anti_spoofing",
    "version",
}


def load_policy(path: str) -> Policy:
    """Load and validate the policy file at ``path`` (raises PolicyError / InputError)."""
    return parse_policy(read_text(path), path, os.path.dirname(path) or ".")


def parse_policy(text: str, path: str = "<policy>", base_dir: str = ".") -> Policy:
    """Validate policy YAML ``text``; relative file references resolve against ``base_dir``."""
    rep = Reporter()
    docs = load_documents(text, path)
    if not docs or docs == [None]:
        rep.error(path, None, "", "the policy is empty")
    elif len(docs) != 1:
        rep.error(path, None, "", f"expected one YAML document, found {len(docs)}")
    rep.raise_if_any()
    top = Fields(rep, path, docs[0], "")
    rep.raise_if_any()
    top.check_keys(TOP_KEYS)
    if top.has("version"):
        top.integer("version", 1, 1, what="policy format version 1")

    # tenants ---------------------------------------------------------------------------------
    tenants: list[Tenant] = []
    by_vni: dict[int, str] = {}
    for i, node in enumerate(top.seq("tenants", required=True)):
        f = Fields(rep, path, node, f"tenants[{i}]")
        if not f.ok:
            continue
        f.check_keys({"name", "vni", "labels", "namespaces", "isolation"})
        name = f.string("name", required=True, pattern=NAME_RE)
        vni = f.integer("vni", 0, MAX_VNI, required=True, what="a 24-bit VNI")
        labels = f.labels("labels")
        declared = f.has("namespaces")
        t_iso = f.choice("isolation", ISOLATIONS, default="kubernetes" if declared else "deny")
        namespaces: list[Namespace] = []
        for j, nnode in enumerate(f.seq("namespaces")):
            nf = Fields(rep, path, nnode, f"{f.where}.namespaces[{j}]")
            if not nf.ok:
                continue
            nf.check_keys({"name", "labels", "isolation"})
            nname = nf.string(
                "name",
                required=True,
                pattern=k8s.DNS_LABEL_RE,
                what="a namespace name (lower-case DNS label)",
            )
            nlabels = tuple(kv for kv in nf.labels("labels") if kv[0] != k8s.NAMESPACE_NAME_LABEL)
            iso = nf.choice("isolation", ISOLATIONS, default=t_iso)
            if nname is None or iso is None:
                continue
            if any(n.name == nname for n in namespaces):
                nf.fail(nf.line("name"), "name", f"namespace {nname!r} is defined twice in tenant {name!r}")
                continue
            namespaces.append(Namespace(nname, nlabels, iso))
        if declared and not namespaces and f.ok:
            f.fail(
                f.line("namespaces"),
                "namespaces",
                "lists no namespace (leave it out for one namespace named after the tenant)",
            )
        if name is None or vni is None or t_iso is None:
            continue
        if any(t.name == name for t in tenants):
            f.fail(f.line("name"), "name", f"tenant {name!r} is defined twice")
            continue
        if vni in by_vni:
            f.fail(f.line("vni"), "vni", f"VNI {vni} is already used by tenant {by_vni[vni]!r}")
            continue
        by_vni[vni] = name
        if not declared:
            namespaces = [Namespace(name, labels, t_iso)]
        tenants.append(Tenant(name, vni, labels, tuple(namespaces), not declared))
    tenant_names = {t.name for t in tenants}
    tenants_by_name = {t.name: t for t in tenants}

    def tenant_ref(f: Fields, key: str = "tenant") -> str | None:
        t = f.string(key, required=True, pattern=NAME_RE)
        if t is not None and t not in tenant_names:
            f.fail(f.line(key), key, f"no tenant named {t!r}")
            return None
        return t

    # hosts -----------------------------------------------------------------------------------
    hosts: list[Host] = []
    for i, node in enumerate(top.seq("hosts")):
        f = Fields(rep, path, node, f"hosts[{i}]")
        if not f.ok:
            continue
        f.check_keys({"name", "address"})
        name = f.string("name", required=True, pattern=NAME_RE)
        addr = f.string("address", required=True, what="an IP address")
        if addr is not None:
            try:
                addr = str(ipaddress.ip_address(addr.strip()))
            except ValueError:
                f.fail(f.line("address"), "address", f"{addr!r} is not an IP address")
                addr = None
        if name is None or addr is None:
            continue
        if any(h.name == name for h in hosts):
            f.fail(f.line("name"), "name", f"host {name!r} is defined twice")
            continue
        hosts.append(Host(name, addr))
    host_names = {h.name for h in hosts}

    # security groups: names first (rules may refer to groups defined later) ------------------
    sg_nodes = []
    groups_by_ref: dict = {}  # (tenant, name or id) -> name
    for i, node in enumerate(top.seq("security_groups")):
        f = Fields(rep, path, node, f"security_groups[{i}]")
        if not f.ok:
            continue
        f.check_keys({"name", "tenant", "id", "rules", "rules_file", "description"})
        name = f.string("name", required=True, pattern=NAME_RE)
        tenant = tenant_ref(f)
        gid = f.string("id", what="an ID")
        if name is None or tenant is None:
            continue
        if (tenant, name) in groups_by_ref:
            f.fail(f.line("name"), "name", f"security group {name!r} is defined twice in tenant {tenant!r}")
            continue
        if gid is not None and (tenant, gid) in groups_by_ref:
            f.fail(f.line("id"), "id", f"security group ID {gid!r} is used twice in tenant {tenant!r}")
            continue
        groups_by_ref[(tenant, name)] = name
        if gid is not None:
            groups_by_ref[(tenant, gid)] = name
        sg_nodes.append((f, name, tenant, gid))

    groups = []
    for f, name, tenant, gid in sg_nodes:
        rules = []
        rule_seq = f.seq("rules")
        for j, rnode in enumerate(rule_seq):
            rule, group = _sg_rule(rep, path, rnode, f"{f.where}.rules[{j}]")
            if rule is None:
                continue
            if group is not None:
                target = groups_by_ref.get((tenant, group))
                if target is None:
                    rep.error(
                        path,
                        rule_seq.line_of(j),
                        f"{f.where}.rules[{j}].remote_group_id",
                        f"no security group {group!r} in tenant {tenant!r}",
                    )
                    continue
                rule = replace(rule, remote_prefix=None, remote_group=target)
            rules.append(rule)
        rf = f.string("rules_file", what="a file name")
        if rf is not None:
            fpath = _resolve_path(base_dir, rf)
            try:
                imported = openstack.load_rules(fpath, rep)
            except InputError as exc:
                rep.error(path, f.line("rules_file"), f"{f.where}.rules_file", str(exc))
                imported = []
            for rule, owner, group in imported:
                if owner is not None and owner not in (name, gid):
                    continue  # a rule of another group in a full listing
                if group is not None:
                    target = groups_by_ref.get((tenant, group))
                    if target is None:
                        rep.error(
                            fpath,
                            _origin_line(rule.origin),
                            "Remote Security Group",
                            f"no security group {group!r} in tenant {tenant!r}",
                        )
                        continue
                    rule = replace(rule, remote_prefix=None, remote_group=target)
                rules.append(rule)
        groups.append(SecurityGroup(name, tenant, gid, tuple(rules)))

    # workloads -------------------------------------------------------------------------------
    workloads: list[Workload] = []
    seen_addr: dict = {}
    seen_mac: dict = {}
    for i, node in enumerate(top.seq("workloads")):
        f = Fields(rep, path, node, f"workloads[{i}]")
        if not f.ok:
            continue
        f.check_keys(
            {
                "name",
                "tenant",
                "host",
                "mac",
                "ipv4",
                "ipv6",
                "addresses",
                "labels",
                "security_groups",
                "description",
                "namespace",
                "named_ports",
            }
        )
        name = f.string("name", required=True, pattern=NAME_RE)
        tenant = tenant_ref(f)
        namespace = None
        if tenant is not None:
            tobj = tenants_by_name[tenant]
            ns_text = f.string("namespace", pattern=k8s.DNS_LABEL_RE, what="a namespace name")
            if ns_text is None and not f.has("namespace"):
                if tobj.implicit_namespace:
                    namespace = tenant
                elif tobj.namespace("default") is not None:
                    namespace = "default"
                else:
                    f.fail(
                        f.line(),
                        "namespace",
                        f"is required: tenant {tenant!r} declares "
                        f"namespaces {', '.join(n.name for n in tobj.namespaces)}",
                    )
            elif ns_text is not None:
                if tobj.namespace(ns_text) is None:
                    f.fail(
                        f.line("namespace"),
                        "namespace",
                        f"no namespace {ns_text!r} in tenant "
                        f"{tenant!r} (it has: {', '.join(n.name for n in tobj.namespaces)})",
                    )
                else:
                    namespace = ns_text
        named_ports = _named_ports(f)
        host = f.string("host", pattern=NAME_RE)
        if host is not None and host not in host_names:
            f.fail(f.line("host"), "host", f"no host named {host!r}")
        mac = None
        mtext = f.string("mac", what="a MAC address")
        if mtext is not None:
            mac = parse_mac(mtext.strip())
            if mac is None:
                f.fail(f.line("mac"), "mac", f"{mtext!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
            elif mac & (1 << 40):
                f.fail(f.line("mac"), "mac", f"{mtext} is a multicast address")
                mac = None
        addrs = []
        for key, version in (("ipv4", 4), ("ipv6", 6), ("addresses", None)):
            v = f.get(key)
            if v is None:
                continue
            items = (
                list(zip(v, v.raw, v.item_lines)) if isinstance(v, Seq) else [(v, f.raw(key), f.line(key))]
            )
            for val, raw, line in items:
                text = str(raw if raw is not None else val).strip()
                try:
                    a = ipaddress.ip_address(text)
                except ValueError:
                    f.fail(line, key, f"{text!r} is not an IP address")
                    continue
                if version is not None and a.version != version:
                    f.fail(line, key, f"{a} is not an IPv{version} address")
                    continue
                if a.is_multicast or a.is_unspecified or (a.version == 6 and a.ipv4_mapped):
                    f.fail(line, key, f"{a} cannot be a workload address")
                    continue
                if a in addrs:
                    f.fail(line, key, f"{a} is listed twice")
                    continue
                addrs.append(a)
        labels = f.labels("labels")
        sgs = []
        sg_seq = f.seq("security_groups")
        for j, ref in enumerate(sg_seq):
            ref_text = str(sg_seq.raw[j] if sg_seq.raw[j] is not None else ref)
            if tenant is None:
                continue
            target = groups_by_ref.get((tenant, ref_text))
            if target is None:
                f.fail(
                    sg_seq.line_of(j),
                    f"security_groups[{j}]",
                    f"no security group {ref_text!r} in tenant {tenant!r}",
                )
                continue
            if target not in sgs:
                sgs.append(target)
        if name is None or tenant is None:
            continue
        if not addrs and f.ok:
            f.fail(f.line(), "ipv4", "a workload needs at least one address (ipv4, ipv6 or addresses)")
        if any(w.name == name and w.tenant == tenant and w.namespace == namespace for w in workloads):
            where_ns = tenant if namespace == tenant else f"{tenant}/{namespace}"
            f.fail(f.line("name"), "name", f"workload {name!r} is defined twice in {where_ns!r}")
            continue
        for a in addrs:
            other = seen_addr.get((tenant, a))
            if other is not None:
                f.fail(
                    f.line(), "addresses", f"{a} is already used by workload {other!r} in tenant {tenant!r}"
                )
        if mac is not None:
            other = seen_mac.get((tenant, mac))
            if other is not None:
                f.fail(f.line("mac"), "mac", f"MAC {mtext} is already used by workload {other!r}")
        if not f.ok:
            continue
        for a in addrs:
            seen_addr[(tenant, a)] = name
        if mac is not None:
            seen_mac[(tenant, mac)] = name
        if namespace is None:
            continue
        workloads.append(
            Workload(name, tenant, host, mac, tuple(addrs), labels, tuple(sgs), namespace, named_ports)
        )

    # network policies ------------------------------------------------------------------------
    nps, admins = [], []
    for i, node in enumerate(top.seq("network_policies")):
        where = f"network_policies[{i}]"
        if isinstance(node, Map) and "file" in node and "kind" not in node:
            f = Fields(rep, path, node, where)
            f.check_keys({"file", "namespace", "tenant"})
            fname = f.string("file", required=True, what="a file name")
            ns = f.string("namespace", pattern=k8s.DNS_LABEL_RE, what="a namespace name")
            tname = tenant_ref(f) if f.has("tenant") else None
            if fname is None:
                continue
            fpath = _resolve_path(base_dir, fname)
            try:
                text_np = read_text(fpath)
                docs_np = load_documents(text_np, fpath)
            except InputError as exc:
                rep.error(path, f.line("file"), f"{where}.file", str(exc))
                continue
            got = k8s.parse_documents(docs_np, fpath, rep, default_namespace=ns)
            where_line = (path, f.line())
        else:
            tname = None
            got = k8s.parse_documents([node], path, rep, default_namespace=None, where=where)
            where_line = (path, node.line if isinstance(node, Map) else None)
        for p in got:
            if isinstance(p, k8s.AdminPolicy):
                t = _admin_tenant(rep, p, tname, tenants, where_line)
                if t is not None:
                    admins.append(replace(p, tenant=t))
                continue
            t = _policy_tenant(rep, p, tname, tenants)
            if t is not None:
                nps.append(replace(p, tenant=t))
    seen_np = set()
    for p in nps:
        if (p.tenant, p.namespace, p.name) in seen_np:
            rep.error(
                p.origin.rsplit(":", 1)[0],
                _origin_line(p.origin),
                "metadata.name",
                f"NetworkPolicy {p.namespace}/{p.name} is defined twice",
            )
        seen_np.add((p.tenant, p.namespace, p.name))
    seen_admin = set()
    for adm in admins:
        akey = (adm.tenant, adm.baseline, adm.name)
        if akey in seen_admin:
            rep.error(
                adm.origin.rsplit(":", 1)[0],
                _origin_line(adm.origin),
                "metadata.name",
                f"{adm.kind} {adm.name} is defined twice in tenant {adm.tenant!r}",
            )
        seen_admin.add(akey)
    for tn in tenants:
        base = [x for x in admins if x.tenant == tn.name and x.baseline]
        if len(base) > 1:
            rep.error(
                base[1].origin.rsplit(":", 1)[0],
                _origin_line(base[1].origin),
                "metadata.name",
                f"tenant {tn.name!r} has more than one "
                "BaselineAdminNetworkPolicy (the API allows one, named default)",
            )

    default_egress = top.choice("default_egress", ("allow", "deny"), default="deny")
    deny_action = top.choice("deny_action", ("drop", "reject"), default="drop")
    untagged = None
    if top.has("untagged_tenant"):
        untagged = tenant_ref(top, "untagged_tenant")
    anti_spoofing = top.boolean("anti_spoofing", True)
    rep.raise_if_any()
    admins.sort(key=lambda a: (a.tenant, a.baseline, a.priority, a.name))
    return Policy(
        tuple(tenants),
        tuple(hosts),
        tuple(groups),
        tuple(workloads),
        tuple(nps),
        default_egress or "deny",
        deny_action or "drop",
        untagged,
        anti_spoofing,
        path,
        tuple(admins),
    )


def _named_ports(f: Fields) -> tuple:
    """A workload's ``named_ports`` (a container's ``ports`` list): (name, protocol, port)."""
    out: list[tuple[str, int, int]] = []
    seq = f.seq("named_ports")
    for j, node in enumerate(seq):
        pf = Fields(f.rep, f.path, node, f"{f.where}.named_ports[{j}]")
        if not pf.ok:
            continue
        pf.check_keys({"name", "port", "containerPort", "protocol"})
        name = pf.string(
            "name",
            required=True,
            pattern=k8s.PORT_NAME_RE,
            what="a port name (IANA service name: at most 15 lower-case letters, "
            "digits and '-', with a letter)",
        )
        key = "containerPort" if pf.has("containerPort") else "port"
        port = pf.integer(key, 1, 65535, required=True, what="a port number")
        proto = pf.choice("protocol", tuple(k8s.PROTOCOLS), default="TCP")
        if name is None or port is None or proto is None:
            continue
        number = k8s.PROTOCOLS[proto]
        if any(n == name and p == number for n, p, _ in out):
            pf.fail(pf.line("name"), "name", f"named port {name!r}/{proto} is listed twice")
            continue
        out.append((name, number, port))
    return tuple(out)


def _policy_tenant(
    rep: Reporter, p: k8s.NetworkPolicy, tname: str | None, tenants: list[Tenant]
) -> str | None:
    """The tenant a NetworkPolicy belongs to: the one named beside its file, else the only
    tenant with a namespace of that name."""
    where = (p.origin.rsplit(":", 1)[0], _origin_line(p.origin), "metadata.namespace")
    if tname is not None:
        t = next(t for t in tenants if t.name == tname)
        if t.namespace(p.namespace) is None:
            rep.error(
                *where,
                f"namespace {p.namespace!r} is not a namespace of tenant {tname!r} "
                f"(it has: {', '.join(n.name for n in t.namespaces)})",
            )
            return None
        return tname
    owners = [t.name for t in tenants if t.namespace(p.namespace) is not None]
    if len(owners) == 1:
        return owners[0]
    if not owners:
        rep.error(*where, f"namespace {p.namespace!r} is not a tenant nor a namespace of one")
    else:
        rep.error(
            *where,
            f"namespace {p.namespace!r} exists in tenants {', '.join(owners)}: give tenant: beside the file",
        )
    return None


def _admin_tenant(
    rep: Reporter, p: k8s.AdminPolicy, tname: str | None, tenants: list[Tenant], where_line: tuple
) -> str | None:
    """Admin policies are cluster-scoped: the cluster is the tenant named beside the file, or
    the only tenant that declares namespaces, or the only tenant."""
    if tname is not None:
        return tname
    declared = [t.name for t in tenants if not t.implicit_namespace]
    cands = declared if declared else [t.name for t in tenants]
    if len(cands) == 1:
        return cands[0]
    rep.error(
        where_line[0],
        where_line[1],
        "tenant",
        f"{p.kind} {p.name} is cluster-scoped: give tenant: beside its file (one of {', '.join(cands)})",
    )
    return None


def _origin_line(origin: str) -> int | None:
    tail = origin.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None
