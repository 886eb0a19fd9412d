"""Import OpenStack security-group rules as the OpenStack client or the Neutron API prints them.

Accepted inputs (JSON, read with line numbers):

* ``openstack security group rule list [GROUP] -f json``: a list of objects keyed by column
  title. Client versions differ: recent ones print ``ID, IP Protocol, Ethertype, IP Range,
  Port Range, Direction, Remote Security Group, Remote Address Group[, Security Group]``;
  older ones print ``Direction``/``Ethertype`` only with ``--long``; some spell the remote
  prefix ``Remote IP Prefix``. ``Port Range`` is ``"80:80"``, ``"22:24"``, ``""`` or, for ICMP,
  ``"type=3"`` / ``"type=3:code=1"``. Since python-openstackclient 4.0.0 (Launchpad bug
  1735575) ``IP Range`` shows ``0.0.0.0/0`` or ``::/0`` where the rule has no prefix, remote
  group rules included; that placeholder next to a remote group is read as "no prefix".
* ``openstack security group rule show RULE -f json``: one rule object with the SDK's keys
  (``ether_type``; ``remote_ip_prefix`` filled in the same way).
* ``openstack security group show GROUP -f json``: one group object whose ``rules`` holds the
  Neutron API's rule objects.
* The Neutron API's ``{"security_group_rules": [...]}``, ``{"security_group_rule": {...}}``,
  ``{"security_group": {...}}`` and ``{"security_groups": [...]}`` (rule objects with
  ``direction, ethertype, protocol, port_range_min, port_range_max, remote_ip_prefix,
  remote_group_id, security_group_id``), or a bare list of rule objects.
"""

from __future__ import annotations

import json
import re

from .source import Map, PolicyError, Reporter, Seq, load_documents, read_text

_ALIASES = {
    "id": ("ID", "id"),
    "protocol": ("IP Protocol", "protocol", "Protocol"),
    "ethertype": ("Ethertype", "ethertype", "ether_type", "EtherType"),
    "prefix": ("IP Range", "Remote IP Prefix", "remote_ip_prefix", "Remote IP prefix"),
    "ports": ("Port Range",),
    "pmin": ("port_range_min", "Port Range Min"),
    "pmax": ("port_range_max", "Port Range Max"),
    "direction": ("Direction", "direction"),
    "remote_group": ("Remote Security Group", "remote_group_id", "Remote Group"),
    "address_group": ("Remote Address Group", "remote_address_group_id"),
    "group": ("Security Group", "security_group_id", "Security Group ID"),
}
_KNOWN = {k for names in _ALIASES.values() for k in names} | {
    "description",
    "Description",
    "project_id",
    "tenant_id",
    "Project",
    "created_at",
    "updated_at",
    "revision_number",
    "tags",
    "name",
    "normalized_cidr",
    "belongs_to_default_sg",
    "Used in default Security Group",
    "Used in custom Security Group",
}
# the keys of a group object: the Neutron API's, and `openstack security group show`'s
# (which renames security_group_rules to rules and shared to is_shared)
_GROUP_KEYS = {
    "id",
    "name",
    "description",
    "project_id",
    "tenant_id",
    "created_at",
    "updated_at",
    "revision_number",
    "tags",
    "stateful",
    "shared",
    "is_shared",
    "belongs_to_default_sg",
    "rules",
    "security_group_rules",
}
# what the client prints in IP Range (and rule show in remote_ip_prefix) for a rule without one
_PLACEHOLDER = {4: "0.0.0.0/0", 6: "::/0"}

SHAPES = (
    "a list of rules (openstack security group rule list -f json, or Neutron API rule "
    "objects), a rule (openstack security group rule show -f json), a group (openstack "
    'security group show -f json), or the Neutron API\'s {"security_group_rules": [...]}, '
    '{"security_group_rule": {...}}, {"security_group": {...}}, {"security_groups": [...]}'
)

_PORTS_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_ICMP_RE = re.compile(r"^\s*type=(\d+)(?::code=(\d+))?\s*$")


def _load(path: str):
    text = read_text(path)
    try:
        docs = load_documents(text, path)
    except PolicyError:
        try:  # JSON that YAML cannot read (tab indentation): no lines
            docs = [json.loads(text)]
        except ValueError as exc:
            raise PolicyError([f"{path}:{getattr(exc, 'lineno', '?')}: not JSON: {exc}"]) from None
    if len(docs) != 1:
        raise PolicyError([f"{path}: expected one JSON document, found {len(docs)}"])
    return docs[0]


def _key_line(node, key):
    return node.line_of(key) if isinstance(node, Map) else None


def _item_line(seq, i):
    return seq.line_of(i) if isinstance(seq, Seq) else None


def _is_rule(doc) -> bool:
    return isinstance(doc, dict) and ("direction" in doc or "Direction" in doc)


def _is_group(doc) -> bool:
    return (
        isinstance(doc, dict)
        and ("rules" in doc or "security_group_rules" in doc)
        and any(k in doc for k in ("id", "name"))
    )


def _rows(doc, path: str, rep: Reporter) -> list:
    """The rule objects of ``doc`` as ``(row, where, line, nested, owner, container)``.

    A ``nested`` row sits in a group object: it belongs to ``owner`` (None when the document
    holds that one group only), and its ``security_group_id``, if any, must be ``container``
    (the group's ID, when it has one). A row that is not nested belongs to the group its own
    ``Security Group`` / ``security_group_id`` names, if any.
    """
    if isinstance(doc, list):
        return [(row, f"[{i}]", _item_line(doc, i), False, None, None) for i, row in enumerate(doc)]
    if isinstance(doc, dict):
        keys = set(doc)
        if "security_group_rules" in doc and keys <= {"security_group_rules", "security_group_rules_links"}:
            seq = doc["security_group_rules"]
            if not isinstance(seq, list):
                rep.error(
                    path,
                    _key_line(doc, "security_group_rules"),
                    "security_group_rules",
                    "must be a list of rules",
                )
                return []
            return [
                (row, f"security_group_rules[{i}]", _item_line(seq, i), False, None, None)
                for i, row in enumerate(seq)
            ]
        if keys == {"security_group_rule"}:
            row = doc["security_group_rule"]
            return [(row, "security_group_rule", _key_line(doc, "security_group_rule"), False, None, None)]
        if keys == {"security_group"}:
            return _group_rows(
                doc["security_group"],
                "security_group",
                _key_line(doc, "security_group"),
                path,
                rep,
                single=True,
            )
        if "security_groups" in doc and keys <= {"security_groups", "security_groups_links"}:
            seq = doc["security_groups"]
            if not isinstance(seq, list):
                rep.error(
                    path,
                    _key_line(doc, "security_groups"),
                    "security_groups",
                    "must be a list of security groups",
                )
                return []
            out = []
            for i, g in enumerate(seq):
                out.extend(
                    _group_rows(g, f"security_groups[{i}]", _item_line(seq, i), path, rep, single=False)
                )
            return out
        if _is_group(doc):
            return _group_rows(doc, "", getattr(doc, "line", None), path, rep, single=True)
        if _is_rule(doc):
            return [(doc, "", getattr(doc, "line", None), False, None, None)]
    rep.error(
        path, getattr(doc, "line", None), "", f"not a security group or rule listing: expected {SHAPES}"
    )
    return []


def _group_rows(g, where: str, line, path: str, rep: Reporter, single: bool) -> list:
    """The rules of one group object (the API's, or `openstack security group show`'s)."""
    if not isinstance(g, dict):
        rep.error(path, line, where, "a security group must be a JSON object")
        return []
    line = getattr(g, "line", None) or line
    gid = g.get("id")
    gid = None if gid in (None, "") else str(gid)
    name = g.get("name")
    name = None if name in (None, "") else str(name)
    label = gid or name
    gwhere = f"{where} (group {label})" if label and where else (where or f"(group {label})")
    bad = False
    for k in g:
        if k not in _GROUP_KEYS:
            rep.error(
                path,
                _key_line(g, k),
                f"{gwhere}.{k}",
                f"unknown field of a security group (expected one of: {', '.join(sorted(_GROUP_KEYS))})",
            )
            bad = True
    key = "rules" if "rules" in g else "security_group_rules"
    rules = g.get(key)
    if key not in g:
        rep.error(path, line, gwhere, "has no rules (rules or security_group_rules)")
        return []
    if isinstance(rules, str):
        rep.error(
            path,
            _key_line(g, key),
            f"{gwhere}.{key}",
            "is text, as clients before python-openstackclient 4.0.0 print it; list the "
            "rules with `openstack security group rule list GROUP -f json` instead",
        )
        return []
    if not isinstance(rules, list):
        rep.error(path, _key_line(g, key), f"{gwhere}.{key}", "must be a list of rules")
        return []
    if bad:
        return []
    owner = None if single else label
    prefix = f"{where}.{key}" if where else key
    return [(row, f"{prefix}[{i}]", _item_line(rules, i), True, owner, gid) for i, row in enumerate(rules)]


def load_rules(path: str, rep: Reporter) -> list:
    """Rules in ``path`` as ``(SGRule, owner_group or None, remote_group or None)`` triples.

    ``owner_group`` is the ID (or, without one, the name) of the group the file says the rule
    belongs to, None when the file holds one group only or does not say. Problems go to
    ``rep`` as ``file:line: field: message``; bad rows are skipped.
    """
    out = []
    for row, where, line, nested, owner, container in _rows(_load(path), path, rep):
        got = _rule(row, where, line, nested, owner, container, path, rep)
        if got is not None:
            out.append(got)
    return out


def _rule(row, where: str, line, nested: bool, owner, container, path: str, rep: Reporter):
    from .model import Fields, make_sg_rule, parse_protocol

    if not isinstance(row, dict):
        rep.error(path, line, where, "a rule must be a JSON object")
        return None
    if not isinstance(row, Map):
        m = Map(line or 0)
        m.update(row)
        row = m
    f = Fields(rep, path, row, where)

    def col(name):
        for k in _ALIASES[name]:
            if k in row:
                return k
        return None

    def text(name):
        k = col(name)
        v = row.get(k) if k else None
        return None if v is None or v == "" else str(v).strip()

    rid = text("id")
    if rid is not None:
        where = f"{where} (rule {rid})" if where else f"(rule {rid})"
        f.where = where
    for k in row:
        if k not in _KNOWN:
            f.fail(row.line_of(k), str(k), "unknown column")
    if text("address_group") is not None:
        f.fail(
            row.line_of(col("address_group")), col("address_group"), "remote address groups are not supported"
        )
        return None
    own = text("group")
    if container is not None and own is not None and own != container:
        f.fail(
            row.line_of(col("group")),
            col("group"),
            f"{own!r} is not the group the rule is listed in ({container!r})",
        )
        return None
    if not nested:
        owner = own
    direction = text("direction")
    if direction is None:
        f.fail(
            line,
            "Direction",
            "missing: list the rules with a client that prints Direction (older clients: --long)",
        )
        return None
    if direction.lower() not in ("ingress", "egress"):
        f.fail(row.line_of(col("direction")), col("direction"), f"{direction!r} is not ingress or egress")
        return None
    pk = col("protocol")
    ok, proto = parse_protocol(row.get(pk) if pk else None, text("protocol"))
    if not ok:
        f.fail(row.line_of(pk), pk, f"{text('protocol')!r} is not a protocol name or number 0..255")
        return None
    prefix = text("prefix")
    eth = text("ethertype")
    if eth is None:
        if prefix is None:
            f.fail(line, "Ethertype", "missing, and no IP range to infer it from (older clients: --long)")
            return None
        eth = "IPv6" if ":" in prefix else "IPv4"
    if eth.lower() not in ("ipv4", "ipv6"):
        f.fail(row.line_of(col("ethertype")), col("ethertype"), f"{eth!r} is not IPv4 or IPv6")
        return None
    ethertype = 4 if eth.lower() == "ipv4" else 6
    remote_group = text("remote_group")
    if remote_group is not None and prefix is not None:
        if prefix != _PLACEHOLDER[ethertype]:
            f.fail(
                row.line_of(col("prefix")),
                col("prefix"),
                f"{prefix!r} together with {col('remote_group')} {remote_group!r}: a rule has "
                f"an IP range or a remote group, not both (only the client's placeholder "
                f"{_PLACEHOLDER[ethertype]} for an IPv{ethertype} rule may stand beside a group)",
            )
            return None
        prefix = None  # the client's "no prefix" placeholder
    pmin = pmax = None
    pr = text("ports")
    if pr is not None:
        m_ports, m_icmp = _PORTS_RE.match(pr), _ICMP_RE.match(pr)
        if m_ports and (proto is None or proto not in (1, 58)):
            pmin, pmax = int(m_ports.group(1)), int(m_ports.group(2))
        elif m_icmp and proto in (1, 58):
            pmin = int(m_icmp.group(1))
            pmax = int(m_icmp.group(2)) if m_icmp.group(2) is not None else None
        else:
            f.fail(
                row.line_of(col("ports")),
                "Port Range",
                f'{pr!r} is not a port range ("80:80", "", or for ICMP "type=N[:code=M]")',
            )
            return None
        if pmin > 65535 or pmax is not None and pmax > 65535:
            f.fail(row.line_of(col("ports")), "Port Range", f"{pr!r} is out of range")
            return None
    else:
        for key, name in (("pmin", "port_range_min"), ("pmax", "port_range_max")):
            v = text(key)
            if v is None:
                continue
            if not v.isdigit() or int(v) > 65535:
                f.fail(row.line_of(col(key)), name, f"{v!r} is not a port number")
                break
            if key == "pmin":
                pmin = int(v)
            else:
                pmax = int(v)
        if not f.ok:
            return None
    origin = f"{path}:{row.line}" if row.line else f"{path}:{where}"
    rule = make_sg_rule(
        rep, path, f, direction.lower(), ethertype, proto, pmin, pmax, prefix, remote_group, origin
    )
    if rule is None:
        return None
    return rule, owner, remote_group
