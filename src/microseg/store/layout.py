"""The policy as store resources: key layout, one value per resource, and assembly back.

Keys, under a prefix (default ``/microseg/v1/``)::

    settings                                        default_egress, deny_action, untagged_tenant,
                                                    anti_spoofing
    tenants/<tenant>                                a tenant with its namespaces
    hosts/<host>
    workloads/<tenant>/<namespace>/<name>
    security_groups/<tenant>/<name>
    network_policies/<tenant>/<namespace>/<name>    a NetworkPolicy document
    admin_network_policies/<tenant>/<name>          an AdminNetworkPolicy document
    baseline_admin_network_policies/<tenant>/<name> a BaselineAdminNetworkPolicy (named default)
    ipsec/<name>                                    an SA file (docs/ipsec.md)
    meta                                            the last apply: revision guard, source, hash
    status/<host>                                   an agent's status, under its lease

A value is the text (JSON as microseg writes it, or YAML) of the same fields as the entry in
a policy file: a tenant is one ``tenants:`` item, a NetworkPolicy is the Kubernetes document.
:func:`assemble` puts the values of a set of keys back into one policy document and validates
it with :func:`~microseg.policy.model.parse_policy`, so the store is validated exactly as the
file; every error is rewritten to name the key (``KEY:LINE: field: message``). A network
policy needs its tenant, which the policy file gives beside a ``file:`` entry: the assembled
document does the same, each document in a file of its own in a temporary folder.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import Any

from ..ipsec import sa as sa_mod
from ..policy import k8s
from ..policy.model import Policy, format_mac, parse_policy
from ..policy.source import Map, PolicyError, load_documents
from .etcd import prefix_end

DEFAULT_PREFIX = "/microseg/v1/"

SETTINGS = "settings"
META = "meta"
STATUS = "status/"
PENDING = "pending"  # a chunked apply being written (store.ops: the commit protocol)
DIGEST = "digest"  # per resource group, the content hash of the last commit (store.ops)
HANDOFF = "handoff/"  # conntrack handoffs of moving workloads (store.handoff)
IPSEC = "ipsec/"
# section -> (number of name parts after it, policy-file section)
SECTIONS = {
    "tenants": 1,
    "hosts": 1,
    "workloads": 3,
    "security_groups": 2,
    "network_policies": 3,
    "admin_network_policies": 2,
    "baseline_admin_network_policies": 2,
}
KINDS = {
    "network_policies": "NetworkPolicy",
    "admin_network_policies": "AdminNetworkPolicy",
    "baseline_admin_network_policies": "BaselineAdminNetworkPolicy",
}
SETTING_KEYS = ("default_egress", "deny_action", "untagged_tenant", "anti_spoofing")
_PROTO_NAMES = {v: k for k, v in k8s.PROTOCOLS.items()}


def normalise_prefix(prefix: str) -> str:
    if not prefix.startswith("/"):
        prefix = "/" + prefix
    return prefix if prefix.endswith("/") else prefix + "/"


@dataclass(frozen=True)
class ResourceKey:
    """A key relative to the prefix, split into its section and name parts."""

    section: str  # "settings", "tenants", ..., "ipsec"
    parts: tuple = ()

    @property
    def tenant(self) -> str | None:
        if self.section in ("settings", "hosts", "tenants", "ipsec"):
            return self.parts[0] if self.section == "tenants" else None
        return self.parts[0]

    def __str__(self) -> str:
        return "/".join((self.section, *self.parts)) if self.parts else self.section


def parse_key(rel: str) -> ResourceKey | None:
    """The resource a key (relative to the prefix) names; None for keys that are none
    (``meta``, ``status/...``, anything else)."""
    if rel == SETTINGS:
        return ResourceKey(SETTINGS)
    section, _, rest = rel.partition("/")
    if section == "ipsec" and rest and "/" not in rest:
        return ResourceKey("ipsec", (rest,))
    n = SECTIONS.get(section)
    if n is None or not rest:
        return None
    parts = tuple(rest.split("/"))
    if len(parts) != n or not all(parts):
        return None
    return ResourceKey(section, parts)


GLOBAL = ""  # the group of the resources of no tenant: settings, hosts, SA files
_TENANT_SECTIONS = tuple(s for s in SECTIONS if s not in ("tenants", "hosts"))


def group_of(rk: ResourceKey) -> str:
    """The group a resource belongs to: its tenant, or :data:`GLOBAL`."""
    t = rk.tenant
    return GLOBAL if t is None else t


def group_ranges(prefix: str, group: str) -> list[tuple[str, str | None]]:
    """The key ranges ``(key, range_end)`` that hold a group's resources (``range_end``
    None: the key alone)."""
    if group == GLOBAL:
        keys = [prefix + SETTINGS, prefix + "hosts/", prefix + IPSEC]
        return [(keys[0], None), (keys[1], prefix_end(keys[1])), (keys[2], prefix_end(keys[2]))]
    out: list[tuple[str, str | None]] = [(f"{prefix}tenants/{group}", None)]
    for section in _TENANT_SECTIONS:
        k = f"{prefix}{section}/{group}/"
        out.append((k, prefix_end(k)))
    return out


# ---------------------------------------------------------------------------------------------
# Policy -> resources
# ---------------------------------------------------------------------------------------------
def _selector(s: k8s.Selector) -> dict:
    d: dict = {}
    if s.labels:
        d["matchLabels"] = dict(s.labels)
    if s.exprs:
        d["matchExpressions"] = [
            {"key": k, "operator": o, **({"values": list(v)} if v else {})} for k, o, v in s.exprs
        ]
    return d


def _np_port(p: k8s.Port) -> dict:
    d: dict = {"protocol": _PROTO_NAMES[p.protocol]}
    if p.name is not None:
        d["port"] = p.name
    elif p.lo is not None:
        d["port"] = p.lo
        if p.hi is not None and p.hi != p.lo:
            d["endPort"] = p.hi
    return d


def _np_peer(p: k8s.Peer) -> dict:
    if p.block is not None:
        b: dict = {"cidr": str(p.block)}
        if p.excepts:
            b["except"] = [str(e) for e in p.excepts]
        return {"ipBlock": b}
    d = {}
    if p.pods is not None:
        d["podSelector"] = _selector(p.pods)
    if p.namespaces is not None:
        d["namespaceSelector"] = _selector(p.namespaces)
    return d


def network_policy_document(p: k8s.NetworkPolicy) -> dict:
    """A NetworkPolicy of the model as its Kubernetes document."""

    def rules(rs: tuple, peer_key: str) -> list:
        out = []
        for r in rs:
            d = {}
            if r.peers is not None:
                d[peer_key] = [_np_peer(x) for x in r.peers]
            if r.ports is not None:
                d["ports"] = [_np_port(x) for x in r.ports]
            out.append(d)
        return out

    spec: dict = {
        "podSelector": _selector(p.pod_selector),
        "policyTypes": [t for t, on in (("Ingress", p.ingress_type), ("Egress", p.egress_type)) if on],
    }
    if p.ingress:
        spec["ingress"] = rules(p.ingress, "from")
    if p.egress:
        spec["egress"] = rules(p.egress, "to")
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": p.name, "namespace": p.namespace},
        "spec": spec,
    }


def _admin_peer(p: k8s.AdminPeer) -> dict:
    if p.networks:
        return {"networks": [str(n) for n in p.networks]}
    if p.pods is not None and p.pod_namespaces is not None:
        return {"pods": {"namespaceSelector": _selector(p.pod_namespaces), "podSelector": _selector(p.pods)}}
    return {"namespaces": _selector(p.namespaces or k8s.Selector())}


def _admin_port(p: k8s.Port) -> dict:
    if p.name is not None:
        return {"namedPort": p.name}
    proto = _PROTO_NAMES[p.protocol]
    if p.lo == p.hi:
        return {"portNumber": {"protocol": proto, "port": p.lo}}
    return {"portRange": {"protocol": proto, "start": p.lo, "end": p.hi}}


def admin_policy_document(p: k8s.AdminPolicy) -> dict:
    """An AdminNetworkPolicy or BaselineAdminNetworkPolicy of the model as its document."""

    def rules(rs: tuple, peer_key: str) -> list:
        out = []
        for r in rs:
            d = {"name": r.name, "action": r.action, peer_key: [_admin_peer(x) for x in r.peers]}
            if r.ports is not None:
                d["ports"] = [_admin_port(x) for x in r.ports]
            out.append(d)
        return out

    spec: dict = {}
    if not p.baseline:
        spec["priority"] = p.priority
    spec["subject"] = _admin_peer(p.subject)
    if p.ingress:
        spec["ingress"] = rules(p.ingress, "from")
    if p.egress:
        spec["egress"] = rules(p.egress, "to")
    return {"apiVersion": k8s.ADMIN_API, "kind": p.kind, "metadata": {"name": p.name}, "spec": spec}


_IP_TEXT: dict = {}  # (version, integer, prefix length or -1) -> the address's text


def _ip_text(a: Any) -> str:
    """``str(a)`` of an ipaddress address or network, remembered: the standard library
    formats in Python, and an apply writes the same rule prefixes and addresses many times."""
    if isinstance(a, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        key = (a.version, int(a.network_address), a.prefixlen)
    else:
        key = (a.version, int(a), -1)
    got = _IP_TEXT.get(key)
    if got is None:
        if len(_IP_TEXT) > 1 << 18:
            _IP_TEXT.clear()
        got = _IP_TEXT[key] = str(a)
    return got


def _sg_rule(r: Any) -> dict:
    d: dict = {"direction": r.direction, "ethertype": f"IPv{r.ethertype}"}
    if r.protocol is not None:
        d["protocol"] = r.protocol
    if r.port_min is not None:
        d["port_range_min"] = r.port_min
    if r.port_max is not None:
        d["port_range_max"] = r.port_max
    if r.remote_prefix is not None:
        d["remote_ip_prefix"] = _ip_text(r.remote_prefix)
    if r.remote_group is not None:
        d["remote_group_id"] = r.remote_group
    return d


def policy_resources(policy: Policy) -> dict[str, dict]:
    """Every resource of ``policy``: relative key -> value (the policy file's fields)."""
    out: dict[str, dict] = {}
    settings: dict = {
        "default_egress": policy.default_egress,
        "deny_action": policy.deny_action,
        "anti_spoofing": policy.anti_spoofing,
    }
    if policy.untagged_tenant is not None:
        settings["untagged_tenant"] = policy.untagged_tenant
    out[SETTINGS] = settings
    for t in policy.tenants:
        d: dict = {"name": t.name, "vni": t.vni}
        if t.labels:
            d["labels"] = dict(t.labels)
        if t.implicit_namespace:
            iso = t.namespaces[0].isolation if t.namespaces else "deny"
            if iso != "deny":
                d["isolation"] = iso
        else:
            d["namespaces"] = [
                {"name": n.name, **({"labels": dict(n.labels)} if n.labels else {}), "isolation": n.isolation}
                for n in t.namespaces
            ]
        out[f"tenants/{t.name}"] = d
    for h in policy.hosts:
        out[f"hosts/{h.name}"] = {"name": h.name, "address": h.address}
    for g in policy.security_groups:
        d = {"name": g.name, "tenant": g.tenant}
        if g.id is not None:
            d["id"] = g.id
        d["rules"] = [_sg_rule(r) for r in g.rules]
        out[f"security_groups/{g.tenant}/{g.name}"] = d
    implicit = {t.name for t in policy.tenants if t.implicit_namespace}
    for w in policy.workloads:
        d = {"name": w.name, "tenant": w.tenant}
        if w.tenant not in implicit:
            d["namespace"] = w.namespace
        if w.host is not None:
            d["host"] = w.host
        if w.mac is not None:
            d["mac"] = format_mac(w.mac)
        d["addresses"] = [_ip_text(a) for a in w.addresses]
        if w.labels:
            d["labels"] = dict(w.labels)
        if w.security_groups:
            d["security_groups"] = list(w.security_groups)
        if w.named_ports:
            d["named_ports"] = [
                {"name": n, "port": port, "protocol": _PROTO_NAMES[proto]} for n, proto, port in w.named_ports
            ]
        out[f"workloads/{w.tenant}/{w.namespace}/{w.name}"] = d
    for p in policy.network_policies:
        out[f"network_policies/{p.tenant}/{p.namespace}/{p.name}"] = network_policy_document(p)
    for a in policy.admin_policies:
        section = "baseline_admin_network_policies" if a.baseline else "admin_network_policies"
        out[f"{section}/{a.tenant}/{a.name}"] = admin_policy_document(a)
    return out


def encode_value(value: dict) -> bytes:
    """A resource's value as stored: JSON, one field per line (errors then name useful lines).

    The bytes of ``json.dumps(value, indent=1, ensure_ascii=False) + "\\n"``, built without
    the standard library's pure-Python indenting encoder (two to three times faster: an apply
    encodes every resource of the file to compare the groups' hashes)."""
    out: list[str] = []
    _encode(value, "", out)
    out.append("\n")
    return "".join(out).encode("utf-8")


def _encode(v: Any, indent: str, out: list[str]) -> None:
    t = type(v)
    if t is str:
        out.append(encode_basestring(v))
    elif t is dict or t is list or t is tuple:
        if not v:
            out.append("{}" if t is dict else "[]")
            return
        inner = indent + " "
        out.append("{\n" if t is dict else "[\n")
        first = True
        for item in v.items() if t is dict else v:
            if not first:
                out.append(",\n")
            first = False
            out.append(inner)
            if t is dict:
                out.append(encode_basestring(item[0]))
                out.append(": ")
                item = item[1]
            _encode(item, inner, out)
        out.append("\n" + indent + ("}" if t is dict else "]"))
    elif v is True:
        out.append("true")
    elif v is False:
        out.append("false")
    elif v is None:
        out.append("null")
    elif t is int:
        out.append(int.__repr__(v))
    else:
        out.append(json.dumps(v))  # floats (and anything else) as the standard encoder writes them


def canonical(policy: Policy) -> Policy:
    """``policy`` with every section in the store's order (by key), as :func:`assemble` gives
    it back: a store holds a set of resources, so the order of a file's lists is not kept."""

    def by(items: Iterable[Any], key: Callable[[Any], Any]) -> tuple:
        return tuple(sorted(items, key=key))

    return replace(
        policy,
        tenants=by(policy.tenants, lambda t: f"tenants/{t.name}"),
        hosts=by(policy.hosts, lambda h: f"hosts/{h.name}"),
        security_groups=by(policy.security_groups, lambda g: f"security_groups/{g.tenant}/{g.name}"),
        workloads=by(policy.workloads, lambda w: f"workloads/{w.tenant}/{w.namespace}/{w.name}"),
        network_policies=by(
            policy.network_policies, lambda p: f"network_policies/{p.tenant}/{p.namespace}/{p.name}"
        ),
    )


# ---------------------------------------------------------------------------------------------
# Resources -> policy
# ---------------------------------------------------------------------------------------------
@dataclass
class Parsed:
    """One stored value, loaded (``doc``) or refused (``errors``)."""

    key: ResourceKey
    text: str
    doc: object = None
    errors: list = field(default_factory=list)


def load_value(prefix: str, rk: ResourceKey, value: bytes, fast: bool = False) -> Parsed:
    """Load one value as YAML/JSON; errors name ``prefix + key``.

    With ``fast``, a value that is a JSON object naming the resource its key names (what
    ``store apply`` writes) is loaded with the JSON parser alone (``doc`` a dict, without
    line numbers): :func:`assemble` parses it again as part of the policy anyway. Any other
    value (YAML, a name that differs, the settings) is loaded as YAML, for the errors' lines."""
    if fast and rk.section != SETTINGS:
        try:
            text = value.decode("utf-8")
            doc = json.loads(text)
        except ValueError:  # (UnicodeDecodeError too) loaded below, for its error
            doc = None
        if type(doc) is dict and _names_key(rk, doc):
            return Parsed(rk, text, doc=doc)
    name = prefix + str(rk)
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Parsed(rk, "", errors=[f"{name}: not UTF-8 text (byte {exc.start})"])
    try:
        docs = load_documents(text, name)
    except PolicyError as exc:
        return Parsed(rk, text, errors=list(exc.errors))
    if len(docs) != 1 or docs[0] is None:
        return Parsed(rk, text, errors=[f"{name}: expected one YAML or JSON document, found {len(docs)}"])
    doc = docs[0]
    if not isinstance(doc, Map):
        return Parsed(rk, text, errors=[f"{name}:{getattr(doc, 'line', 1)}: must be a mapping"])
    if any(re.match(r"^(---|\.\.\.|%)", ln) for ln in text.splitlines()):
        return Parsed(rk, text, errors=[f"{name}: write the value without YAML document markers"])
    return Parsed(rk, text, doc=doc)


def _names_key(rk: ResourceKey, doc: dict) -> bool:
    """Does a JSON value name the resource of its key (as :func:`_identity_errors` checks)?
    False when it does not, or cannot be told without the YAML loader's view."""
    s, parts = rk.section, rk.parts

    def same(d: dict, k: str, want: str) -> bool:
        got = d.get(k)
        return type(got) is str and got == want

    if s in ("tenants", "hosts"):
        return same(doc, "name", parts[0])
    if s == "security_groups":
        return same(doc, "tenant", parts[0]) and same(doc, "name", parts[1])
    if s == "workloads":
        return same(doc, "tenant", parts[0]) and same(doc, "name", parts[2])
    if s in KINDS:
        meta = doc.get("metadata")
        return (
            doc.get("kind") == KINDS[s]
            and type(meta) is dict
            and same(meta, "name", parts[-1])
            and (s != "network_policies" or same(meta, "namespace", parts[1]))
        )
    return False


def _identity_errors(prefix: str, p: Parsed) -> list[str]:
    """The key names a resource: its value must name the same one."""
    name = prefix + str(p.key)
    doc = p.doc
    assert isinstance(doc, Map)
    s, parts = p.key.section, p.key.parts
    errs = []

    def check(node: Map, fieldname: str, want: str, shown: str | None = None) -> None:
        got = node.raw.get(fieldname) if node.raw.get(fieldname) is not None else node.get(fieldname)
        if got is None:
            errs.append(f"{name}:{node.line}: {shown or fieldname}: is required (the key says {want!r})")
        elif str(got) != want:
            errs.append(
                f"{name}:{node.line_of(fieldname)}: {shown or fieldname}: "
                f"{str(got)!r} does not match the key ({want!r})"
            )

    if s in ("tenants", "hosts"):
        check(doc, "name", parts[0])
    elif s == "security_groups":
        check(doc, "tenant", parts[0])
        check(doc, "name", parts[1])
    elif s == "workloads":
        check(doc, "tenant", parts[0])
        check(doc, "name", parts[2])  # the namespace is checked once the tenant is known
    elif s in KINDS:
        kind = doc.get("kind")
        if kind != KINDS[s]:
            errs.append(f"{name}:{doc.line_of('kind')}: kind: {kind!r} is not {KINDS[s]} (the key's section)")
            return errs
        meta = doc.get("metadata")
        if isinstance(meta, Map):
            check(meta, "name", parts[-1], "metadata.name")
            if s == "network_policies":
                check(meta, "namespace", parts[1], "metadata.namespace")
    elif s == SETTINGS:
        for k in doc:
            if k not in SETTING_KEYS:
                errs.append(
                    f"{name}:{doc.line_of(k)}: {k}: unknown field (expected one of: "
                    f"{', '.join(sorted(SETTING_KEYS))})"
                )
    return errs


_SECTION_ORDER = ("tenants", "hosts", "security_groups", "workloads")
_ITEM_RE = re.compile(r"^(tenants|hosts|security_groups|workloads|network_policies)\[\d+\]\.?")


def assemble(prefix: str, values: dict[str, bytes], source: str | None = None) -> Policy:
    """Validate the resources ``values`` (relative key -> stored value) as one policy.

    Raises :class:`PolicyError` with every problem, each naming its key (``prefix + key``).
    Keys that name no resource, ``meta`` and ``status/...`` are ignored; so is ``ipsec/``
    (:func:`sa_configs` reads those).
    """
    source = source or f"etcd:{prefix}"
    parsed: list[Parsed] = []
    for rel in sorted(values):
        rk = parse_key(rel)
        if rk is None or rk.section == "ipsec":
            continue
        parsed.append(load_value(prefix, rk, values[rel], fast=True))
    errors = [e for p in parsed for e in p.errors]
    for p in parsed:
        if isinstance(p.doc, Map):  # (a dict: JSON that names its key, checked on loading)
            errors.extend(_identity_errors(prefix, p))
    if any(p.errors for p in parsed):
        raise PolicyError(errors)  # a value that does not load cannot be assembled

    lines: list[str] = []
    where: list[tuple[str, int]] = []  # per assembled line: (key, line in the value)

    def emit(text: str, key: str, line: int) -> None:
        lines.append(text)
        where.append((key, line))

    settings = next((p for p in parsed if p.key.section == SETTINGS), None)
    if settings is not None:
        doc = settings.doc
        assert isinstance(doc, Map)
        for k in SETTING_KEYS:
            if k in doc:
                emit(f"{k}: {_scalar(doc, k)}", prefix + SETTINGS, doc.line_of(k))
    with tempfile.TemporaryDirectory(prefix="microseg-store-") as tmp:
        files: dict[str, str] = {}
        for section in (*_SECTION_ORDER, "network_policies"):
            emit(f"{section}:", "", 0)
            items = 0
            for p in parsed:
                key = prefix + str(p.key)
                if section == "network_policies":
                    if p.key.section not in KINDS:
                        continue
                    fname = os.path.join(tmp, f"{len(files)}.yaml")
                    with open(fname, "w", encoding="utf-8") as f:
                        f.write(p.text)
                    files[fname] = key
                    entry = {"file": os.path.basename(fname), "tenant": p.key.parts[0]}
                    emit(f"  - {json.dumps(entry)}", key, 1)
                    items += 1
                    continue
                if p.key.section != section:
                    continue
                vlines = p.text.splitlines() or ["{}"]
                # a value's own lines, indented under "  - ", keep their line numbers
                first = True
                for i, ln in enumerate(vlines, start=1):
                    emit(("  - " if first else "    ") + ln, key, i)
                    first = False
                items += 1
            if items == 0:
                lines[-1] += " []"
        text = "\n".join(lines) + "\n"
        try:
            policy = parse_policy(text, source, tmp)
        except PolicyError as exc:
            raise PolicyError(errors + [_rewrite(e, source, where, files) for e in exc.errors]) from None
    errors += _namespace_errors(prefix, policy, parsed)
    if errors:
        raise PolicyError(errors)
    return replace(policy, source=source)


def _scalar(doc: Map, k: str) -> str:
    """A setting's value as YAML text that loads back to the same value and source text."""
    v, raw = doc[k], doc.raw.get(k)
    if isinstance(v, str):
        return json.dumps(raw if raw is not None else v)
    if raw is not None and not isinstance(v, (Map, list)):
        return raw  # a plain scalar (true, 12, ...): the same text reads the same
    return json.dumps(v)


def _rewrite(msg: str, source: str, where: Any, files: Any) -> str:
    """An error of the assembled document as an error of the key it came from."""
    for fname, key in files.items():
        if msg.startswith(fname + ":"):
            return key + msg[len(fname) :]
    m = re.match(re.escape(source) + r":(\d+): (.*)$", msg, re.S)
    if m is None:
        return msg
    n = int(m.group(1))
    rest = m.group(2)
    if not 1 <= n <= len(where) or not where[n - 1][0]:
        return msg
    key, line = where[n - 1]
    rest = _ITEM_RE.sub("", rest, count=1)
    if rest.startswith(": "):
        rest = rest[2:]
    return f"{key}:{line}: {rest}"


def _namespace_errors(prefix: str, policy: Policy, parsed: list[Parsed]) -> list[str]:
    """A workload's namespace (defaulted by its tenant) must be the one its key names."""
    errs = []
    keys = [p for p in parsed if p.key.section == "workloads"]
    for w, p in zip(policy.workloads, keys):
        if w.namespace != p.key.parts[1]:
            doc = p.doc
            if not isinstance(doc, Map):  # loaded as JSON: load it again for its lines
                doc = load_value(prefix, p.key, p.text.encode("utf-8")).doc
            assert isinstance(doc, Map)
            errs.append(
                f"{prefix}{p.key}:{doc.line_of('namespace')}: namespace: the workload is in "
                f"namespace {w.namespace!r}, the key says {p.key.parts[1]!r}"
            )
    return errs


def sa_configs(prefix: str, values: dict[str, bytes]) -> dict:
    """The SA files stored under ``ipsec/``: name -> :class:`~microseg.ipsec.sa.SAConfig`
    (raises :class:`PolicyError` naming the keys of invalid ones)."""
    out, errors = {}, []
    for rel in sorted(values):
        rk = parse_key(rel)
        if rk is None or rk.section != "ipsec":
            continue
        p = load_value(prefix, rk, values[rel])
        if p.errors:
            errors.extend(p.errors)
            continue
        try:
            out[rk.parts[0]] = sa_mod.parse_config(p.doc, prefix + rel)
        except sa_mod.InputError as exc:
            errors.append(str(exc))
    if errors:
        raise PolicyError(errors)
    return out


# ---------------------------------------------------------------------------------------------
# What one host needs
# ---------------------------------------------------------------------------------------------
def value_field(value: bytes, name: str) -> Any:
    """One top-level field of a stored value, read cheaply (None when absent or unreadable)."""
    try:
        doc = json.loads(value)
    except ValueError:
        try:
            docs = load_documents(value.decode("utf-8"), "value")
        except Exception:  # noqa: BLE001 - an unreadable value has no field
            return None
        doc = docs[0] if len(docs) == 1 else None
    return doc.get(name) if isinstance(doc, dict) else None


def host_keys(values: dict[str, bytes], host: str) -> set[str]:
    """The keys host ``host`` needs (see docs/store.md, "What a host reads"):

    * the tenants of the workloads placed on ``host`` (its ``host`` field), and the
      ``untagged_tenant`` of the settings;
    * for those tenants: the tenant, all its workloads (peers on other hosts included: groups
      and selectors refer to them), its security groups and its network and admin policies;
    * the settings, ``host`` itself and the hosts those workloads are placed on;
    * the SA files.
    """
    workload_hosts: dict[str, str | None] = {}
    tenants: set[str] = set()
    for rel, value in values.items():
        rk = parse_key(rel)
        if rk is None or rk.section != "workloads":
            continue
        h = value_field(value, "host")
        workload_hosts[rel] = h = h if isinstance(h, str) else None
        if h == host:
            tenants.add(rk.parts[0])
    if SETTINGS in values:
        u = value_field(values[SETTINGS], "untagged_tenant")
        if isinstance(u, str):
            tenants.add(u)
    return tenant_keys(values, host, tenants, workload_hosts)


def tenant_keys(
    values: dict[str, bytes], host: str, tenants: set[str], workload_hosts: dict[str, str | None]
) -> set[str]:
    """The keys of ``values`` host ``host`` needs once it is known to need ``tenants``
    (``workload_hosts``: workload key -> its ``host`` field): the settings, the SA files,
    every resource of those tenants, ``host`` and the hosts their workloads are placed on."""
    out = {SETTINGS} & values.keys()
    hosts = {host}
    for rel in values:
        rk = parse_key(rel)
        if rk is None:
            continue
        if rk.section == "ipsec":
            out.add(rel)
        elif rk.section != "hosts" and rk.tenant in tenants:
            out.add(rel)
            if rk.section == "workloads" and workload_hosts.get(rel):
                hosts.add(workload_hosts[rel])  # type: ignore[arg-type]
    out |= {f"hosts/{h}" for h in hosts} & values.keys()
    return out
