"""Import OpenStack security-group rules as the OpenStack client or the Neutron API prints them.

Accepted inputs (JSON, read with line numbers):

* ``openstack security group rule list [GROUP] -f json``: a list of objects keyed by column
  title. Client versions differ: recent ones print ``ID, IP Protocol, Ethertype, IP Range,
  Port Range, Direction, Remote Security Group, Remote Address Group[, Security Group]``;
  older ones print ``Direction``/``Ethertype`` only with ``--long``; some spell the remote
  prefix ``Remote IP Prefix``. ``Port Range`` is ``"80:80"``, ``"22:24"``, ``""`` or, for ICMP,
  ``"type=3"`` / ``"type=3:code=1"``.
* The Neutron API's ``{"security_group_rules": [...]}`` (or a bare list of such objects) with
  ``direction, ethertype, protocol, port_range_min, port_range_max, remote_ip_prefix,
  remote_group_id, security_group_id``.
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
    "description", "Description", "project_id", "tenant_id", "Project", "created_at",
    "updated_at", "revision_number", "tags", "name", "normalized_cidr", "belongs_to_default_sg",
    "Used in default Security Group", "Used in custom Security Group"}

_PORTS_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_ICMP_RE = re.compile(r"^\s*type=(\d+)(?::code=(\d+))?\s*$")


def _load(path: str):
    text = read_text(path)
    try:
        docs = load_documents(text, path)
    except PolicyError:
        try:                          # JSON that YAML cannot read (tab indentation): no lines
            docs = [json.loads(text)]
        except ValueError as exc:
            raise PolicyError([f"{path}:{getattr(exc, 'lineno', '?')}: not JSON: {exc}"]) from None
    if len(docs) != 1:
        raise PolicyError([f"{path}: expected one JSON document, found {len(docs)}"])
    return docs[0]


def load_rules(path: str, rep: Reporter) -> list:
    """Rules in ``path`` as ``(SGRule, owner_group or None, remote_group or None)`` triples.

    Problems go to ``rep`` as ``file:line: field: message``; bad rows are skipped.
    """
    from .model import Fields, make_sg_rule, parse_protocol

    doc = _load(path)
    if isinstance(doc, dict) and "security_group_rules" in doc:
        doc = doc["security_group_rules"]
    if not isinstance(doc, list):
        rep.error(path, getattr(doc, "line", None), "",
                  "expected a JSON list of rules (openstack security group rule list -f json)")
        return []
    out = []
    for i, row in enumerate(doc):
        where = f"[{i}]"
        line = doc.line_of(i) if isinstance(doc, Seq) else None
        if not isinstance(row, dict):
            rep.error(path, line, where, "a rule must be a JSON object")
            continue
        if not isinstance(row, Map):
            m = Map(0)
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
            where = f"[{i}] (rule {rid})"
            f.where = where
        for k in row:
            if k not in _KNOWN:
                f.fail(row.line_of(k), str(k), "unknown column")
        if text("address_group") is not None:
            f.fail(row.line_of(col("address_group")), col("address_group"),
                   "remote address groups are not supported")
            continue
        direction = text("direction")
        if direction is None:
            f.fail(line, "Direction",
                   "missing: list the rules with a client that prints Direction (older clients: --long)")
            continue
        if direction.lower() not in ("ingress", "egress"):
            f.fail(row.line_of(col("direction")), col("direction"), f"{direction!r} is not ingress or egress")
            continue
        pk = col("protocol")
        ok, proto = parse_protocol(row.get(pk) if pk else None, text("protocol"))
        if not ok:
            f.fail(row.line_of(pk), pk, f"{text('protocol')!r} is not a protocol name or number 0..255")
            continue
        prefix = text("prefix")
        eth = text("ethertype")
        if eth is None:
            if prefix is None:
                f.fail(line, "Ethertype",
                       "missing, and no IP range to infer it from (older clients: --long)")
                continue
            eth = "IPv6" if ":" in prefix else "IPv4"
        if eth.lower() not in ("ipv4", "ipv6"):
            f.fail(row.line_of(col("ethertype")), col("ethertype"), f"{eth!r} is not IPv4 or IPv6")
            continue
        ethertype = 4 if eth.lower() == "ipv4" else 6
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
                f.fail(row.line_of(col("ports")), "Port Range", f"{pr!r} is not a port range "
                       "(\"80:80\", \"\", or for ICMP \"type=N[:code=M]\")")
                continue
            if pmin > 65535 or pmax is not None and pmax > 65535:
                f.fail(row.line_of(col("ports")), "Port Range", f"{pr!r} is out of range")
                continue
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
                continue
        remote_group = text("remote_group")
        origin = f"{path}:{row.line}" if row.line else f"{path}:{where}"
        rule = make_sg_rule(rep, path, f, direction.lower(), ethertype, proto, pmin, pmax,
                            prefix, remote_group, origin)
        if rule is None:
            continue
        out.append((rule, text("group"), remote_group))
    return out
