"""Kubernetes network policy documents: parsing, validation and label selectors.

* NetworkPolicy (networking.k8s.io/v1). A namespace lives inside a tenant (a tenant without
  declared namespaces has one, named after it). Semantics follow the Kubernetes documentation:
  a pod selected by some policy of a given type (Ingress/Egress) is isolated in that direction
  and admits only what the union of those policies allows; ``policyTypes`` defaults to
  Ingress, plus Egress when the policy has egress rules; an empty ``from``/``to`` means every
  peer, empty ``ports`` every port; a port's protocol defaults to TCP; a named port resolves
  per destination pod (its ``named_ports``) and admits nothing where it resolves nowhere.
* AdminNetworkPolicy and BaselineAdminNetworkPolicy (policy.networking.k8s.io/v1alpha1, the
  network-policy-api project), cluster-scoped -- here: scoped to one tenant. Admin policies
  are evaluated before NetworkPolicies in priority order (lower number first), their rules in
  order, the first match deciding: Allow and Deny are final, Pass hands the packet on to the
  NetworkPolicies. The baseline policy (one, named ``default``) applies after them, to a pod
  no NetworkPolicy isolates in that direction.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .source import Map, Reporter, Seq

DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132}
# IANA service name, as Kubernetes validates a container port's name: 1-15 characters of
# lower-case letters, digits and '-', at least one letter, no '-' at either end nor twice in a row.
PORT_NAME_RE = re.compile(r"^(?=.{1,15}$)(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*$")
ADMIN_API = "policy.networking.k8s.io/v1alpha1"
ADMIN_ACTIONS = ("Allow", "Deny", "Pass")
BASELINE_ACTIONS = ("Allow", "Deny")
MAX_ADMIN_PRIORITY = 1000
MAX_ADMIN_RULES = 100
ANY_PROTOCOL = 0  # an admin policy's namedPort: whatever protocol the destination's port has
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def valid_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS_SUBDOMAIN_RE.match(prefix)):
        return False
    return bool(_LABEL_NAME_RE.match(name))


def valid_label_value(value: str) -> bool:
    return value == "" or bool(_LABEL_NAME_RE.match(value))


@dataclass(frozen=True)
class Selector:
    """A label selector: matchLabels (pairs) AND every matchExpression (key, op, values)."""

    labels: tuple = ()
    exprs: tuple = ()

    def matches(self, labels: dict) -> bool:
        for k, v in self.labels:
            if labels.get(k) != v:
                return False
        for key, op, values in self.exprs:
            present = key in labels
            if op == "In" and not (present and labels[key] in values):
                return False
            if op == "NotIn" and present and labels[key] in values:
                return False
            if op == "Exists" and not present:
                return False
            if op == "DoesNotExist" and present:
                return False
        return True

    def to_dict(self) -> dict:
        return {
            "matchLabels": dict(self.labels),
            "matchExpressions": [{"key": k, "operator": o, "values": list(v)} for k, o, v in self.exprs],
        }


@dataclass(frozen=True)
class Peer:
    pods: Selector | None = None  # with ``namespaces`` None: pods of the policy's namespace
    namespaces: Selector | None = None  # with ``pods`` None: every pod of matching namespaces
    block: object = None  # ipaddress network (ipBlock.cidr)
    excepts: tuple = ()  # ipaddress networks inside ``block``

    def to_dict(self) -> dict:
        if self.block is not None:
            return {"ipBlock": {"cidr": str(self.block), "except": [str(e) for e in self.excepts]}}
        d = {}
        if self.pods is not None:
            d["podSelector"] = self.pods.to_dict()
        if self.namespaces is not None:
            d["namespaceSelector"] = self.namespaces.to_dict()
        return d


@dataclass(frozen=True)
class Port:
    protocol: int  # 6 / 17 / 132
    lo: int | None = None  # None: every port of the protocol (unless ``name``)
    hi: int | None = None
    name: str | None = None  # named port: resolved per destination workload
    # (protocol ANY_PROTOCOL: the named port's own)

    def to_list(self) -> list:
        return [self.protocol, self.name] if self.name is not None else [self.protocol, self.lo, self.hi]


@dataclass(frozen=True)
class Rule:
    peers: tuple | None  # None: every peer
    ports: tuple | None  # None: every port and protocol
    origin: str = ""


@dataclass(frozen=True)
class NetworkPolicy:
    name: str
    namespace: str
    pod_selector: Selector
    ingress_type: bool  # policyTypes contains Ingress
    egress_type: bool
    ingress: tuple  # Rule
    egress: tuple
    origin: str = ""
    tenant: str = ""  # the tenant whose namespace this is (set by the loader)

    def to_dict(self) -> dict:
        def rules(rs):
            return [
                {
                    "peers": None if r.peers is None else [p.to_dict() for p in r.peers],
                    "ports": None if r.ports is None else [p.to_list() for p in r.ports],
                }
                for r in rs
            ]

        return {
            "name": self.name,
            "namespace": self.namespace,
            "tenant": self.tenant,
            "podSelector": self.pod_selector.to_dict(),
            "policyTypes": [
                t for t, on in (("Ingress", self.ingress_type), ("Egress", self.egress_type)) if on
            ],
            "ingress": rules(self.ingress),
            "egress": rules(self.egress),
        }


class _P:
    """Error helper bound to a file and a path prefix."""

    def __init__(self, rep: Reporter, path: str):
        self.rep, self.path, self.ok = rep, path, True

    def err(self, line, field, message):
        self.ok = False
        self.rep.error(self.path, line, field, message)


def _line(node, key=None):
    if isinstance(node, Map):
        return node.line_of(key) if key is not None else node.line
    if isinstance(node, Seq):
        return node.line_of(key) if key is not None else node.line
    return None


def _check_keys(p: _P, node: Map, allowed, where):
    for k in node:
        if k not in allowed:
            p.err(
                node.line_of(k),
                f"{where}.{k}",
                f"unknown field (expected one of: {', '.join(sorted(allowed))})",
            )


def _selector(p: _P, node, where) -> Selector | None:
    if node is None:
        return Selector()
    if not isinstance(node, Map):
        p.err(_line(node), where, "must be a label selector (matchLabels / matchExpressions)")
        return None
    _check_keys(p, node, {"matchLabels", "matchExpressions"}, where)
    labels, exprs = [], []
    ml = node.get("matchLabels")
    if ml is not None:
        if not isinstance(ml, Map):
            p.err(node.line_of("matchLabels"), f"{where}.matchLabels", "must be a mapping")
        else:
            for k, v in ml.items():
                text = "" if v is None else str(ml.raw.get(k, v))
                if not valid_label_key(str(k)) or isinstance(v, (Map, Seq)) or not valid_label_value(text):
                    p.err(ml.line_of(k), f"{where}.matchLabels.{k}", f"{k}: {text!r} is not a valid label")
                    continue
                labels.append((str(k), text))
    me = node.get("matchExpressions")
    if me is not None:
        if not isinstance(me, Seq):
            p.err(node.line_of("matchExpressions"), f"{where}.matchExpressions", "must be a list")
        else:
            for i, e in enumerate(me):
                w = f"{where}.matchExpressions[{i}]"
                if not isinstance(e, Map):
                    p.err(me.line_of(i), w, "must be a mapping with key, operator, values")
                    continue
                _check_keys(p, e, {"key", "operator", "values"}, w)
                key, op, values = e.get("key"), e.get("operator"), e.get("values")
                if not isinstance(key, str) or not valid_label_key(key):
                    p.err(e.line_of("key"), f"{w}.key", f"{key!r} is not a label key")
                    continue
                if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
                    p.err(
                        e.line_of("operator"),
                        f"{w}.operator",
                        f"{op!r} is not one of: In, NotIn, Exists, DoesNotExist",
                    )
                    continue
                if values is not None and not isinstance(values, Seq):
                    p.err(e.line_of("values"), f"{w}.values", "must be a list")
                    continue
                vals = (
                    ()
                    if values is None
                    else tuple(
                        str(values.raw[j] if values.raw[j] is not None else v) for j, v in enumerate(values)
                    )
                )
                if op in ("In", "NotIn") and not vals:
                    p.err(e.line_of("operator"), f"{w}.values", f"operator {op} needs values")
                    continue
                if op in ("Exists", "DoesNotExist") and vals:
                    p.err(e.line_of("values"), f"{w}.values", f"operator {op} takes no values")
                    continue
                exprs.append((key, op, tuple(sorted(set(vals)))))
    return Selector(tuple(sorted(labels)), tuple(exprs))


def _peer(p: _P, node, where) -> Peer | None:
    if not isinstance(node, Map):
        p.err(_line(node), where, "a peer must be a mapping (podSelector / namespaceSelector / ipBlock)")
        return None
    _check_keys(p, node, {"podSelector", "namespaceSelector", "ipBlock"}, where)
    if "ipBlock" in node:
        if "podSelector" in node or "namespaceSelector" in node:
            p.err(node.line, where, "ipBlock cannot be combined with podSelector or namespaceSelector")
            return None
        b = node["ipBlock"]
        w = f"{where}.ipBlock"
        if not isinstance(b, Map):
            p.err(node.line_of("ipBlock"), w, "must be a mapping with cidr (and except)")
            return None
        _check_keys(p, b, {"cidr", "except"}, w)
        try:
            cidr = ipaddress.ip_network(str(b.get("cidr")).strip(), strict=False)
        except ValueError:
            p.err(b.line_of("cidr"), f"{w}.cidr", f"{b.get('cidr')!r} is not a CIDR")
            return None
        excepts = []
        ex = b.get("except")
        if ex is not None and not isinstance(ex, Seq):
            p.err(b.line_of("except"), f"{w}.except", "must be a list of CIDRs")
            return None
        for i, e in enumerate(ex or ()):
            try:
                n = ipaddress.ip_network(str(e).strip(), strict=False)
            except ValueError:
                p.err(_line(ex, i), f"{w}.except[{i}]", f"{e!r} is not a CIDR")
                continue
            if n.version != cidr.version or not n.subnet_of(cidr) or n == cidr:  # type: ignore[arg-type]
                p.err(_line(ex, i), f"{w}.except[{i}]", f"{n} is not strictly inside {cidr}")
                continue
            excepts.append(n)
        return Peer(block=cidr, excepts=tuple(excepts))
    if "podSelector" not in node and "namespaceSelector" not in node:
        p.err(node.line, where, "a peer needs podSelector, namespaceSelector or ipBlock")
        return None
    pods = _selector(p, node.get("podSelector"), f"{where}.podSelector") if "podSelector" in node else None
    nss = (
        _selector(p, node.get("namespaceSelector"), f"{where}.namespaceSelector")
        if "namespaceSelector" in node
        else None
    )
    return Peer(pods=pods, namespaces=nss)


def _port(p: _P, node, where) -> Port | None:
    if not isinstance(node, Map):
        p.err(_line(node), where, "a port must be a mapping (protocol, port, endPort)")
        return None
    _check_keys(p, node, {"protocol", "port", "endPort"}, where)
    proto = node.get("protocol") or "TCP"
    if proto not in PROTOCOLS:
        p.err(node.line_of("protocol"), f"{where}.protocol", f"{proto!r} is not TCP, UDP or SCTP")
        return None
    port, end = node.get("port"), node.get("endPort")
    if port is None:
        if end is not None:
            p.err(node.line_of("endPort"), f"{where}.endPort", "endPort needs port")
            return None
        return Port(PROTOCOLS[proto])
    if isinstance(port, str):
        text = str(node.raw.get("port", port))
        if text.isdigit():
            p.err(
                node.line_of("port"),
                f"{where}.port",
                f"{text!r} is a string: a port name "
                f"needs a letter (for the port number write {text} without quotes)",
            )
            return None
        if not PORT_NAME_RE.match(text):
            p.err(
                node.line_of("port"),
                f"{where}.port",
                f"{text!r} is neither a port number nor "
                "a port name (at most 15 lower-case letters, digits and '-')",
            )
        if end is not None:
            p.err(node.line_of("endPort"), f"{where}.endPort", "endPort needs a numeric port")
            return None
        return Port(PROTOCOLS[proto], name=text)
    if isinstance(port, bool) or not isinstance(port, int):
        p.err(node.line_of("port"), f"{where}.port", f"{port!r} is not a port number or name")
        return None
    if not 1 <= port <= 65535:
        p.err(node.line_of("port"), f"{where}.port", f"{port} is out of range 1..65535")
        return None
    hi = port
    if end is not None:
        if isinstance(end, bool) or not isinstance(end, int) or not port <= end <= 65535:
            p.err(
                node.line_of("endPort"), f"{where}.endPort", f"{end!r} must be a port number >= port ({port})"
            )
            return None
        hi = end
    return Port(PROTOCOLS[proto], port, hi)


def _rules(p: _P, spec: Map, key: str, peer_key: str, path: str, where: str) -> tuple:
    seq = spec.get(key)
    if seq is None:
        return ()
    if not isinstance(seq, Seq):
        p.err(spec.line_of(key), f"{where}.{key}", "must be a list of rules")
        return ()
    out = []
    for i, r in enumerate(seq):
        w = f"{where}.{key}[{i}]"
        if r is None:
            r = Map(seq.line_of(i))
        if not isinstance(r, Map):
            p.err(seq.line_of(i), w, f"a rule must be a mapping ({peer_key}, ports)")
            continue
        _check_keys(p, r, {peer_key, "ports"}, w)
        peers = r.get(peer_key)
        plist: tuple | None = None
        if peers is not None:
            if not isinstance(peers, Seq):
                p.err(r.line_of(peer_key), f"{w}.{peer_key}", "must be a list of peers")
                continue
            got = [_peer(p, pn, f"{w}.{peer_key}[{j}]") for j, pn in enumerate(peers)]
            plist = tuple(x for x in got if x is not None) if peers else None
        ports = r.get("ports")
        qlist: tuple | None = None
        if ports is not None:
            if not isinstance(ports, Seq):
                p.err(r.line_of("ports"), f"{w}.ports", "must be a list of ports")
                continue
            qgot = [_port(p, qn, f"{w}.ports[{j}]") for j, qn in enumerate(ports)]
            qlist = tuple(x for x in qgot if x is not None) if ports else None
        out.append(Rule(plist, qlist, f"{path}:{seq.line_of(i)}"))
    return tuple(out)


def parse_documents(
    docs, path: str, rep: Reporter, default_namespace: str | None = None, where: str = ""
) -> list:
    """NetworkPolicies in ``docs`` (NetworkPolicy, NetworkPolicyList or List documents)."""
    out = []
    for d, doc in enumerate(docs):
        base = where or (f"document {d + 1}" if len(docs) > 1 else "")
        if doc is None:
            continue
        p = _P(rep, path)
        if not isinstance(doc, Map):
            p.err(_line(doc), base, "a NetworkPolicy must be a mapping")
            continue
        kind = doc.get("kind")
        if kind in ("AdminNetworkPolicy", "BaselineAdminNetworkPolicy"):
            pol = _admin_policy(p, doc, path, base)
            if pol is not None:
                out.append(pol)
            continue
        if kind in ("NetworkPolicyList", "List", "AdminNetworkPolicyList", "BaselineAdminNetworkPolicyList"):
            items = doc.get("items")
            if not isinstance(items, Seq):
                p.err(doc.line_of("items"), f"{base}.items" if base else "items", "must be a list")
                continue
            for i, item in enumerate(items):
                out.extend(
                    parse_documents(
                        [item], path, rep, default_namespace, f"{base}.items[{i}]" if base else f"items[{i}]"
                    )
                )
            continue
        pol = _policy(p, doc, path, default_namespace, base)
        if pol is not None:
            out.append(pol)
    return out


def _policy(p: _P, doc: Map, path: str, default_namespace, where: str):
    pre = f"{where}." if where else ""
    kind = doc.get("kind")
    if kind != "NetworkPolicy":
        p.err(
            doc.line_of("kind"),
            f"{pre}kind",
            f"{kind!r} is not NetworkPolicy, AdminNetworkPolicy or BaselineAdminNetworkPolicy",
        )
        return None
    api = doc.get("apiVersion")
    if api not in ("networking.k8s.io/v1", None):
        p.err(doc.line_of("apiVersion"), f"{pre}apiVersion", f"{api!r} is not networking.k8s.io/v1")
    _check_keys(p, doc, {"apiVersion", "kind", "metadata", "spec", "status"}, where or "policy")
    meta = doc.get("metadata")
    if not isinstance(meta, Map):
        p.err(doc.line_of("metadata"), f"{pre}metadata", "is required (name, namespace)")
        return None
    name = meta.get("name")
    if not isinstance(name, str) or len(name) > 253 or not DNS_SUBDOMAIN_RE.match(name):
        p.err(meta.line_of("name"), f"{pre}metadata.name", f"{name!r} is not a valid name")
        return None
    ns = meta.get("namespace", default_namespace)
    if ns is None:
        p.err(
            meta.line,
            f"{pre}metadata.namespace",
            "is required (or give namespace: beside the file in the policy)",
        )
        return None
    if not isinstance(ns, str) or not DNS_LABEL_RE.match(ns):
        p.err(meta.line_of("namespace"), f"{pre}metadata.namespace", f"{ns!r} is not a namespace name")
        return None
    spec = doc.get("spec")
    if spec is None:
        spec = Map(doc.line)
    if not isinstance(spec, Map):
        p.err(doc.line_of("spec"), f"{pre}spec", "must be a mapping")
        return None
    _check_keys(p, spec, {"podSelector", "policyTypes", "ingress", "egress"}, f"{pre}spec")
    sel = _selector(p, spec.get("podSelector"), f"{pre}spec.podSelector")
    ingress = _rules(p, spec, "ingress", "from", path, f"{pre}spec")
    egress = _rules(p, spec, "egress", "to", path, f"{pre}spec")
    types = spec.get("policyTypes")
    if not types:  # absent or empty: defaulted, as the API server does
        ing_t, eg_t = True, bool(spec.get("egress"))
    elif not isinstance(types, Seq) or any(t not in ("Ingress", "Egress") for t in types):
        p.err(
            spec.line_of("policyTypes"),
            f"{pre}spec.policyTypes",
            f"{types!r} must be a list of Ingress and/or Egress",
        )
        return None
    else:
        ing_t, eg_t = "Ingress" in types, "Egress" in types
    if not p.ok or sel is None:
        return None
    return NetworkPolicy(
        name, ns, sel, ing_t, eg_t, ingress if ing_t else (), egress if eg_t else (), f"{path}:{doc.line}"
    )


# ---------------------------------------------------------------------------------------------
# AdminNetworkPolicy / BaselineAdminNetworkPolicy (policy.networking.k8s.io/v1alpha1)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdminPeer:
    """Who an admin rule is about: every pod of the namespaces matching ``namespaces``, or the
    pods matching ``pods`` in the namespaces matching ``pod_namespaces``, or (egress) the
    addresses in ``networks``."""

    namespaces: Selector | None = None
    pods: Selector | None = None
    pod_namespaces: Selector | None = None
    networks: tuple = ()  # ipaddress networks

    def to_dict(self) -> dict:
        if self.networks:
            return {"networks": [str(n) for n in self.networks]}
        if self.pods is not None and self.pod_namespaces is not None:
            return {
                "pods": {
                    "namespaceSelector": self.pod_namespaces.to_dict(),
                    "podSelector": self.pods.to_dict(),
                }
            }
        return {"namespaces": (self.namespaces or Selector()).to_dict()}


@dataclass(frozen=True)
class AdminRule:
    name: str
    action: str  # Allow / Deny / Pass
    peers: tuple  # AdminPeer (at least one)
    ports: tuple | None  # Port (named ones resolve per destination); None: all
    origin: str = ""


@dataclass(frozen=True)
class AdminPolicy:
    name: str
    baseline: bool  # BaselineAdminNetworkPolicy
    priority: int  # lower first; 0 for the baseline
    subject: AdminPeer  # namespaces, or pods in namespaces
    ingress: tuple  # AdminRule
    egress: tuple
    origin: str = ""
    tenant: str = ""  # the cluster: set by the loader

    @property
    def kind(self) -> str:
        return "BaselineAdminNetworkPolicy" if self.baseline else "AdminNetworkPolicy"

    def selects(self, namespace_labels: dict, pod_labels: dict) -> bool:
        return _peer_matches(self.subject, namespace_labels, pod_labels)

    def to_dict(self) -> dict:
        def rules(rs):
            return [
                {
                    "name": r.name,
                    "action": r.action,
                    "peers": [p.to_dict() for p in r.peers],
                    "ports": None if r.ports is None else [p.to_list() for p in r.ports],
                }
                for r in rs
            ]

        return {
            "kind": self.kind,
            "name": self.name,
            "tenant": self.tenant,
            "priority": self.priority,
            "subject": self.subject.to_dict(),
            "ingress": rules(self.ingress),
            "egress": rules(self.egress),
        }


def _peer_matches(peer: AdminPeer, namespace_labels: dict, pod_labels: dict) -> bool:
    """Does a pod (its namespace's labels and its own) belong to ``peer``? (Not for networks.)"""
    if peer.namespaces is not None:
        return peer.namespaces.matches(namespace_labels)
    if peer.pods is not None and peer.pod_namespaces is not None:
        return peer.pod_namespaces.matches(namespace_labels) and peer.pods.matches(pod_labels)
    return False


admin_peer_matches = _peer_matches


def _admin_peer(p: _P, node, where, egress: bool) -> AdminPeer | None:
    keys = {"namespaces", "pods"} | ({"networks", "nodes"} if egress else set())
    if not isinstance(node, Map):
        p.err(_line(node), where, f"a peer must be a mapping with one of: {', '.join(sorted(keys))}")
        return None
    _check_keys(p, node, keys, where)
    given = [k for k in node if k in keys]
    if len(given) != 1:
        p.err(node.line, where, f"a peer needs exactly one of: {', '.join(sorted(keys))}")
        return None
    k = given[0]
    if k == "nodes":
        p.err(
            node.line_of(k),
            f"{where}.nodes",
            "node peers are not supported (microseg knows "
            "no Kubernetes nodes): use networks with the nodes' addresses",
        )
        return None
    if k == "networks":
        seq = node.get("networks")
        if not isinstance(seq, Seq) or not seq:
            p.err(node.line_of(k), f"{where}.networks", "must be a non-empty list of CIDRs")
            return None
        nets = []
        for i, c in enumerate(seq):
            try:
                nets.append(ipaddress.ip_network(str(c).strip(), strict=False))
            except ValueError:
                p.err(seq.line_of(i), f"{where}.networks[{i}]", f"{c!r} is not a CIDR")
        return AdminPeer(networks=tuple(nets)) if len(nets) == len(seq) else None
    if k == "namespaces":
        sel = _selector(p, node.get("namespaces"), f"{where}.namespaces")
        return None if sel is None else AdminPeer(namespaces=sel)
    pods = node.get("pods")
    w = f"{where}.pods"
    if not isinstance(pods, Map):
        p.err(node.line_of("pods"), w, "must be a mapping with namespaceSelector and podSelector")
        return None
    _check_keys(p, pods, {"namespaceSelector", "podSelector"}, w)
    if "podSelector" not in pods or "namespaceSelector" not in pods:
        p.err(pods.line, w, "needs both namespaceSelector and podSelector")
        return None
    nss = _selector(p, pods.get("namespaceSelector"), f"{w}.namespaceSelector")
    sel = _selector(p, pods.get("podSelector"), f"{w}.podSelector")
    if nss is None or sel is None:
        return None
    return AdminPeer(pods=sel, pod_namespaces=nss)


def _admin_port(p: _P, node, where) -> Port | None:
    if not isinstance(node, Map):
        p.err(_line(node), where, "a port must be a mapping with portNumber, namedPort or portRange")
        return None
    keys = {"portNumber", "namedPort", "portRange"}
    _check_keys(p, node, keys, where)
    given = [k for k in node if k in keys]
    if len(given) != 1:
        p.err(node.line, where, "a port needs exactly one of: namedPort, portNumber, portRange")
        return None
    k = given[0]
    v = node.get(k)
    if k == "namedPort":
        text = str(node.raw.get(k, v))
        if not isinstance(v, str) or not PORT_NAME_RE.match(text):
            p.err(node.line_of(k), f"{where}.namedPort", f"{text!r} is not a port name")
            return None
        return Port(ANY_PROTOCOL, name=text)  # the destination's port of that name
    w = f"{where}.{k}"
    if not isinstance(v, Map):
        p.err(node.line_of(k), w, "must be a mapping")
        return None
    _check_keys(p, v, {"protocol", "port"} if k == "portNumber" else {"protocol", "start", "end"}, w)
    proto = v.get("protocol") or "TCP"
    if proto not in PROTOCOLS:
        p.err(v.line_of("protocol"), f"{w}.protocol", f"{proto!r} is not TCP, UDP or SCTP")
        return None
    nums = []
    for f in ("port",) if k == "portNumber" else ("start", "end"):
        x = v.get(f)
        if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= 65535:
            p.err(v.line_of(f) or v.line, f"{w}.{f}", f"{x!r} is not a port number 1..65535")
            return None
        nums.append(x)
    if len(nums) == 2 and nums[0] > nums[1]:
        p.err(v.line_of("start"), f"{w}.start", f"start {nums[0]} is above end {nums[1]}")
        return None
    return Port(PROTOCOLS[proto], nums[0], nums[-1])


def _admin_rules(
    p: _P, spec: Map, key: str, peer_key: str, path: str, where: str, actions, egress: bool
) -> tuple:
    seq = spec.get(key)
    if seq is None:
        return ()
    if not isinstance(seq, Seq):
        p.err(spec.line_of(key), f"{where}.{key}", "must be a list of rules")
        return ()
    if len(seq) > MAX_ADMIN_RULES:
        p.err(spec.line_of(key), f"{where}.{key}", f"at most {MAX_ADMIN_RULES} rules")
        return ()
    out = []
    for i, r in enumerate(seq):
        w = f"{where}.{key}[{i}]"
        if not isinstance(r, Map):
            p.err(seq.line_of(i), w, f"a rule must be a mapping (name, action, {peer_key}, ports)")
            continue
        _check_keys(p, r, {"name", "action", peer_key, "ports"}, w)
        action = r.get("action")
        if action not in actions:
            p.err(
                r.line_of("action") or r.line,
                f"{w}.action",
                f"{action!r} is not one of: {', '.join(actions)}",
            )
            continue
        peers = r.get(peer_key)
        if not isinstance(peers, Seq) or not peers:
            p.err(r.line_of(peer_key) or r.line, f"{w}.{peer_key}", "must be a non-empty list of peers")
            continue
        plist = [_admin_peer(p, pn, f"{w}.{peer_key}[{j}]", egress) for j, pn in enumerate(peers)]
        ports = r.get("ports")
        qlist: tuple | None = None
        if ports is not None:
            if not isinstance(ports, Seq) or not ports:
                p.err(r.line_of("ports"), f"{w}.ports", "must be a non-empty list of ports")
                continue
            qgot = [_admin_port(p, qn, f"{w}.ports[{j}]") for j, qn in enumerate(ports)]
            if any(q is None for q in qgot):
                continue
            qlist = tuple(qgot)
        if any(x is None for x in plist):
            continue
        name = r.get("name")
        out.append(
            AdminRule(
                str(name) if name is not None else f"{key}[{i}]",
                str(action),
                tuple(plist),
                qlist,
                f"{path}:{seq.line_of(i)}",
            )
        )
    return tuple(out)


def _admin_policy(p: _P, doc: Map, path: str, where: str):
    pre = f"{where}." if where else ""
    kind = doc.get("kind")
    baseline = kind == "BaselineAdminNetworkPolicy"
    api = doc.get("apiVersion")
    if api != ADMIN_API:
        p.err(doc.line_of("apiVersion") or doc.line, f"{pre}apiVersion", f"{api!r} is not {ADMIN_API}")
    _check_keys(p, doc, {"apiVersion", "kind", "metadata", "spec", "status"}, where or "policy")
    meta = doc.get("metadata")
    if not isinstance(meta, Map):
        p.err(doc.line_of("metadata") or doc.line, f"{pre}metadata", "is required (name)")
        return None
    name = meta.get("name")
    if not isinstance(name, str) or len(name) > 253 or not DNS_SUBDOMAIN_RE.match(name):
        p.err(meta.line_of("name") or meta.line, f"{pre}metadata.name", f"{name!r} is not a valid name")
        return None
    if baseline and name != "default":
        p.err(
            meta.line_of("name"),
            f"{pre}metadata.name",
            f"a BaselineAdminNetworkPolicy must be named default, not {name!r}",
        )
        return None
    if "namespace" in meta:
        p.err(
            meta.line_of("namespace"),
            f"{pre}metadata.namespace",
            f"{kind} is cluster-scoped: it has no namespace",
        )
        return None
    spec = doc.get("spec")
    if not isinstance(spec, Map):
        p.err(doc.line_of("spec") or doc.line, f"{pre}spec", "is required (subject, ingress, egress)")
        return None
    _check_keys(
        p, spec, {"subject", "ingress", "egress"} | (set() if baseline else {"priority"}), f"{pre}spec"
    )
    priority = 0
    if not baseline:
        given = spec.get("priority")
        if isinstance(given, bool) or not isinstance(given, int) or not 0 <= given <= MAX_ADMIN_PRIORITY:
            p.err(
                spec.line_of("priority") or spec.line,
                f"{pre}spec.priority",
                f"{given!r} is not an integer 0..{MAX_ADMIN_PRIORITY}",
            )
            return None
        priority = given
    subj = spec.get("subject")
    if subj is None:
        p.err(spec.line, f"{pre}spec.subject", "is required (namespaces or pods)")
        return None
    subject = _admin_peer(p, subj, f"{pre}spec.subject", egress=False)
    actions = BASELINE_ACTIONS if baseline else ADMIN_ACTIONS
    ingress = _admin_rules(p, spec, "ingress", "from", path, f"{pre}spec", actions, False)
    egress = _admin_rules(p, spec, "egress", "to", path, f"{pre}spec", actions, True)
    if not p.ok or subject is None:
        return None
    return AdminPolicy(name, baseline, priority, subject, ingress, egress, f"{path}:{doc.line}")
