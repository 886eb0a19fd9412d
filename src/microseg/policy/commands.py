"""`microseg policy check|compile|query|apply`: validate, compile, ask and apply a policy."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import numpy as np

from .. import ctstate
from ..errors import InputError
from ..packet.batch import text_to_addr
from . import verdict as V
from .compiler import compile_policy, connection_keys
from .model import MAX_VNI, PROTOCOLS, Workload, load_policy, parse_mac
from .names import pick_addresses, qualified, resolve_endpoints
from .reference import Reference, explain
from .source import PolicyError

_CT = {
    "new": ctstate.NEW | ctstate.TRACKED,
    "established": ctstate.ESTABLISHED | ctstate.TRACKED,
    "related": ctstate.RELATED | ctstate.TRACKED,
    "invalid": ctstate.INVALID | ctstate.TRACKED,
    "untracked": 0,
}


def register(sub) -> None:
    p = sub.add_parser(
        "policy",
        help="check, compile, query or apply a policy file",
        description="Work with a policy file (format: docs/policy.md).",
    )
    verbs = p.add_subparsers(dest="policy_verb", metavar="ACTION")
    verbs.required = True

    c = verbs.add_parser("check", help="validate a policy and list every problem found")
    c.add_argument("policy", help="policy YAML file")
    c.set_defaults(func=run_check)

    c = verbs.add_parser("compile", help="compile a policy and print its rule set")
    c.add_argument("policy", help="policy YAML file")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=run_compile)

    c = verbs.add_parser(
        "query",
        help="decide one packet and explain the decision",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Decide one packet (as the datapath's policy stage would) "
        "and explain the decision. Exit status: 0 allowed, 1 dropped or "
        "rejected, 2 bad input.",
    )
    c.add_argument("policy", help="policy YAML file")
    c.add_argument(
        "--vni",
        type=int,
        default=argparse.SUPPRESS,
        help="tunnel VNI, -1 for untunnelled (default: the tenant of a workload named "
        "in --src or --dst, else untunnelled)",
    )
    c.add_argument(
        "--src", required=True, help="source: an IP address or a workload, [tenant/][namespace/]name"
    )
    c.add_argument(
        "--dst", required=True, help="destination: an IP address or a workload, [tenant/][namespace/]name"
    )
    c.add_argument("--proto", default="tcp", help="protocol name or number")
    c.add_argument("--sport", type=int, default=40000, help="source port")
    c.add_argument("--dport", type=int, default=0, help="destination port")
    c.add_argument("--icmp-type", type=int, default=None, help="ICMP type (default: echo request)")
    c.add_argument("--icmp-code", type=int, default=0, help="ICMP code")
    c.add_argument("--mac", default=None, help="source MAC (default: none, no L2 header)")
    c.add_argument("--ct", default="new", choices=sorted(_CT), help="conntrack state")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=run_query)

    c = verbs.add_parser("apply", help="decide every packet of a capture (as NEW) and count")
    c.add_argument("policy", help="policy YAML file")
    c.add_argument("capture", help="pcap or pcapng file")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=run_apply)

    c = verbs.add_parser(
        "export",
        help="write the policy of one tenant in another enforcement point's format",
        description="Write the policy of one tenant as an nftables ruleset (table inet microseg, "
        "for a router's forward hook; load it with nft -f). What nftables cannot express is "
        "refused with an error (exit 2).",
    )
    c.add_argument("policy", help="policy YAML file")
    c.add_argument("--format", choices=["nftables"], default="nftables", help="output format")
    c.add_argument("--tenant", help="the tenant to export (required when the policy has several)")
    c.add_argument("-o", "--output", metavar="FILE", help="write here instead of standard output")
    c.set_defaults(func=run_export)


def _load(path):
    return load_policy(path)


def run_check(args) -> int:
    try:
        p = _load(args.policy)
    except PolicyError as exc:
        for e in exc.errors:
            print(f"microseg policy check: error: {e}", file=sys.stderr)
        return 2
    c = compile_policy(p)
    n_rules = sum(len(g.rules) for g in p.security_groups)
    print(
        f"{args.policy}: ok: {len(p.tenants)} tenants, {len(p.hosts)} hosts, "
        f"{len(p.workloads)} workloads, {len(p.security_groups)} security groups "
        f"({n_rules} rules), {len(p.network_policies)} network policies, "
        f"{len(p.admin_policies)} admin network policies; "
        f"{len(c.ruleset)} classifier rules, hash {c.content_hash[:16]}"
    )
    return 0


def namespace_rows(p) -> list:
    """Each namespace with the isolation of its unselected pods (what ``compile`` shows)."""
    return [
        {
            "tenant": t.name,
            "namespace": n.name,
            "declared": not t.implicit_namespace,
            "isolation": n.isolation,
            "unselected_pods": (
                "allowed (Kubernetes: non-isolated)"
                if n.isolation == "kubernetes"
                else "denied (zero trust), egress as default_egress: " + p.default_egress
            ),
        }
        for t in p.tenants
        for n in t.namespaces
    ]


def run_compile(args) -> int:
    c = compile_policy(_load(args.policy))
    rs = c.ruleset
    rows = []
    for i, r in enumerate(rs.rules):
        rows.append(
            {
                "index": i,
                "check": V.CHECKS[r.in_port],
                "tenant": r.tenant,
                "src": None if r.src is None else str(r.src),
                "dst": None if r.dst is None else str(r.dst),
                "proto": r.proto,
                "dport": list(r.dport),
                "icmp_type": r.icmp_type,
                "icmp_code": r.icmp_code,
                "origin": c.describe_rule(i),
            }
        )
    spaces = namespace_rows(c.policy)
    if args.json:
        json.dump(
            {"version": c.version, "content_hash": c.content_hash, "namespaces": spaces, "rules": rows},
            sys.stdout,
            indent=1,
        )
        sys.stdout.write("\n")
        return 0
    print(f"# policy {args.policy}: hash {c.content_hash}, {len(rows)} rules")
    for n in spaces:
        name = n["tenant"] if not n["declared"] else f"{n['tenant']}/{n['namespace']}"
        print(
            f"# namespace {name}: isolation {n['isolation']}: pods no policy selects are "
            f"{n['unselected_pods']}"
        )
    for r in rows:
        port = "" if r["dport"] == [0, 65535] else f" dport {r['dport'][0]}-{r['dport'][1]}"
        icmp = "" if r["icmp_type"] is None else f" type {r['icmp_type']}"
        icmp += "" if r["icmp_code"] is None else f" code {r['icmp_code']}"
        proto = "any" if r["proto"] is None else str(r["proto"])
        print(
            f"{r['index']:5d} vni {r['tenant']:<8} {r['check']:<26} {r['src'] or 'any'} -> "
            f"{r['dst'] or 'any'} proto {proto}{port}{icmp}  # {r['origin']}"
        )
    return 0


def _addr(text, what):
    try:
        return text_to_addr(text.strip())
    except ValueError:
        raise InputError(f"{what}: {text!r} is not an IP address") from None


def _endpoints(p, args):
    """(vni, source address, destination address, source workload, destination workload)."""
    context = None
    vni = getattr(args, "vni", None)
    if vni is not None:
        if not -1 <= vni <= MAX_VNI:
            raise InputError(f"--vni: {vni} is not -1 or a VNI 0..{MAX_VNI}")
        context = next((t.name for t in p.tenants if t.vni == vni), None)
        if vni == -1:
            context = p.untagged_tenant
    s, d = resolve_endpoints(p, [args.src, args.dst], context, ("--src", "--dst"))
    for x, text, what in ((s, args.src, "--src"), (d, args.dst, "--dst")):
        if x is None:
            raise InputError(f"{what}: {text!r} is neither an IP address nor a workload")
    sa, da = pick_addresses(s, d, ("--src", "--dst"))
    if vni is None:
        named = next((x for x in (s, d) if isinstance(x, Workload)), None)
        vni = p.tenant(named.tenant).vni if named is not None else -1
    return (vni, sa, da, s if isinstance(s, Workload) else None, d if isinstance(d, Workload) else None)


def run_query(args) -> int:
    p = _load(args.policy)
    vni, sa, da, sw, dw = _endpoints(p, args)
    s, d = _addr(str(sa), "--src"), _addr(str(da), "--dst")
    proto = args.proto.strip().lower()
    if proto.isdigit() and int(proto) <= 255:
        proto = int(proto)
    elif proto in PROTOCOLS:
        proto = PROTOCOLS[proto]
    else:
        raise InputError(f"--proto: {args.proto!r} is not a protocol name or number")
    for name in ("sport", "dport"):
        if not 0 <= getattr(args, name) <= 65535:
            raise InputError(f"--{name}: {getattr(args, name)} is not a port number")
    for name in ("icmp_type", "icmp_code"):
        v = getattr(args, name)
        if v is not None and not 0 <= v <= 255:
            raise InputError(f"--{name.replace('_', '-')}: {v} is out of range 0..255")
    mac = None
    if args.mac is not None:
        mac = parse_mac(args.mac.strip())
        if mac is None:
            raise InputError(f"--mac: {args.mac!r} is not a MAC address")
    keys = connection_keys(
        [vni],
        [s[0]],
        [s[1]],
        [d[0]],
        [d[1]],
        [proto],
        [args.sport],
        [args.dport],
        None if args.icmp_type is None else [args.icmp_type],
        [args.icmp_code],
        None if mac is None else [mac],
    )
    ct = np.array([_CT[args.ct]], np.uint8)
    c = compile_policy(p)
    v, r, why = c.decide(keys, ct)
    lines = explain(Reference(p), keys.row(0), int(ct[0]))
    if args.json:
        json.dump(
            {
                "vni": vni,
                "src": str(sa),
                "dst": str(da),
                "src_workload": qualified(sw) if sw is not None else None,
                "dst_workload": qualified(dw) if dw is not None else None,
                "verdict": V.verdict_name(v[0]),
                "reason": V.reason_name(why[0]),
                "rule": int(r[0]),
                "rule_origin": c.describe_rule(int(r[0])),
                "explanation": lines,
            },
            sys.stdout,
            indent=1,
        )
        sys.stdout.write("\n")
    else:
        print("\n".join(lines))
        if r[0] >= 0:
            print(f"rule: {int(r[0])} ({c.describe_rule(int(r[0]))})")
    return 0 if v[0] == V.ALLOW else 1


def run_apply(args) -> int:
    from ..io.pcap import read_capture
    from ..packet.parse import parse

    c = compile_policy(_load(args.policy))
    batch = read_capture(args.capture)
    reasons: Counter = Counter()
    rules: Counter = Counter()
    total = 0
    for chunk in batch.chunks(256):
        keys = parse(chunk)
        v, r, why = c.decide(keys)
        total += len(chunk)
        for (vv, ww), n in Counter(zip(v.tolist(), why.tolist())).items():
            reasons[(V.verdict_name(vv), V.reason_name(ww))] += n
        for x, n in Counter(r[r >= 0].tolist()).items():
            rules[c.describe_rule(x)] += n
    if args.json:
        json.dump(
            {
                "packets": total,
                "verdicts": [
                    {"verdict": a, "reason": b, "packets": n} for (a, b), n in sorted(reasons.items())
                ],
                "rules": [{"rule": k, "packets": n} for k, n in rules.most_common()],
            },
            sys.stdout,
            indent=1,
        )
        sys.stdout.write("\n")
        return 0
    print(f"{total} packets (judged as NEW: no connection tracking here)")
    for (a, b), n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"{n:10d}  {a:<6} {b}")
    if rules:
        print("per rule:")
        for k, n in rules.most_common():
            print(f"{n:10d}  {k}")
    return 0


def run_export(args) -> int:
    from .nft import export_nftables

    text = export_nftables(_load(args.policy), args.tenant)
    if args.output is None:
        sys.stdout.write(text)
    else:
        try:
            with open(args.output, "w", encoding="utf-8") as fh:
                fh.write(text)
        except OSError as exc:
            raise InputError(f"cannot write {args.output}: {exc.strerror}") from None
    return 0
