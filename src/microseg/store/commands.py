"""`microseg store apply|get|status`: the policy in etcd (docs/store.md)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Any

from ..errors import InputError
from ..policy.model import Policy
from ..policy.source import PolicyError
from . import layout
from .etcd import DEFAULT_ENDPOINT, StoreClient, StoreError
from .ops import MAX_TXN_BYTES, MAX_TXN_OPS

ENV_ENDPOINT = "MICROSEG_STORE"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "store",
        help="write, read and watch over the policy in etcd",
        description="The policy in etcd, one key per resource (docs/store.md). Exit status: 0 "
        "done, 1 etcd refused or did not answer, 2 invalid input.",
    )
    verbs = p.add_subparsers(dest="store_verb", metavar="ACTION")
    verbs.required = True

    def common(c: argparse.ArgumentParser) -> None:
        c.add_argument(
            "--endpoint",
            default=os.environ.get(ENV_ENDPOINT, DEFAULT_ENDPOINT),
            help=f"etcd client URL(s), comma-separated (default: ${ENV_ENDPOINT} or {DEFAULT_ENDPOINT})",
        )
        c.add_argument("--prefix", default=layout.DEFAULT_PREFIX, help="key prefix (default %(default)s)")

    c = verbs.add_parser(
        "apply",
        help="validate a policy file and write it (one transaction, or batches and a commit); "
        "print the revision",
    )
    c.add_argument("policy", help="policy YAML file")
    c.add_argument(
        "--sa",
        action="append",
        default=[],
        metavar="FILE",
        help="an IPsec SA file to store beside the policy (as ipsec/<file name without extension>)",
    )
    c.add_argument(
        "--txn-ops",
        type=int,
        default=MAX_TXN_OPS,
        metavar="N",
        help="operations per transaction, at most etcd's --max-txn-ops (default %(default)s)",
    )
    c.add_argument(
        "--txn-bytes",
        type=int,
        default=MAX_TXN_BYTES,
        metavar="N",
        help="bytes of keys and values per transaction, under etcd's --max-request-bytes "
        "(default %(default)s)",
    )
    c.add_argument("--json", action="store_true", help="machine-readable output")
    common(c)
    c.set_defaults(func=run_apply)

    c = verbs.add_parser("get", help="print the stored policy and its revision")
    fmt = c.add_mutually_exclusive_group()
    fmt.add_argument("--yaml", action="store_true", help="a policy file (the default)")
    fmt.add_argument("--json", action="store_true", help='{"revision": N, "policy": {...}}')
    c.add_argument("--host", default=None, help="only what this host needs (as its agent reads it)")
    common(c)
    c.set_defaults(func=run_get)

    c = verbs.add_parser("status", help="which agent runs which revision (their status keys)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    common(c)
    c.set_defaults(func=run_status)


def _errors(verb: str, exc: PolicyError) -> int:
    for e in exc.errors:
        print(f"microseg store {verb}: error: {e}", file=sys.stderr)
    return 2


def _store_error(verb: str, exc: StoreError) -> int:
    print(f"microseg store {verb}: error: {exc}", file=sys.stderr)
    return 1


def content_hash(policy: Policy) -> str:
    """The hash a compiled policy from the store carries (the canonical order's)."""
    canon = json.dumps(layout.canonical(policy).to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def run_apply(args: argparse.Namespace) -> int:
    from ..ipsec import sa as sa_mod
    from ..policy.model import load_policy
    from .ops import commit, plan_apply, resources

    if args.txn_ops < 4 or args.txn_bytes < 4096:
        print(
            "microseg store apply: error: --txn-ops is at least 4 and --txn-bytes at least 4096",
            file=sys.stderr,
        )
        return 2
    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        return _errors("apply", exc)
    sa_files = {}
    for path in args.sa:
        try:
            sa_mod.load_config(path)
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (InputError, OSError, UnicodeDecodeError) as exc:
            print(f"microseg store apply: error: {exc}", file=sys.stderr)
            return 2
        name = os.path.splitext(os.path.basename(path))[0]
        if not layout.parse_key(f"{layout.IPSEC}{name}") or "/" in name:
            print(f"microseg store apply: error: {path}: {name!r} cannot be a key name", file=sys.stderr)
            return 2
        sa_files[name] = text
    digest = content_hash(policy)
    try:
        client = StoreClient(args.endpoint)
        plan = plan_apply(client, resources(policy, sa_files), args.prefix)
        revision = commit(
            client, plan, os.path.abspath(args.policy), digest, max_ops=args.txn_ops, max_bytes=args.txn_bytes
        )
    except StoreError as exc:
        return _store_error("apply", exc)
    if args.json:
        print(
            json.dumps(
                {
                    "revision": revision,
                    "written": sorted(plan.puts),
                    "deleted": plan.deletes,
                    "unchanged": plan.unchanged,
                    "content_hash": digest,
                    "transactions": plan.transactions,
                    "read": plan.read,
                }
            )
        )
    else:
        print(
            f"revision {revision}: {len(plan.puts)} written, {len(plan.deletes)} deleted, "
            f"{plan.unchanged} unchanged (hash {digest[:16]}"
            + (f", {plan.transactions} transactions" if plan.transactions > 1 else "")
            + ")"
        )
    return 0


def policy_document(policy: Policy) -> dict:
    """The policy as one policy-file document (the stored values, put together)."""
    res = layout.policy_resources(policy)
    doc: dict = dict(res.pop(layout.SETTINGS))
    sections: dict = {s: [] for s in ("tenants", "hosts", "security_groups", "workloads", "network_policies")}
    for key in sorted(res):
        section = key.split("/", 1)[0]
        sections["network_policies" if section in layout.KINDS else section].append(res[key])
    doc.update(sections)
    return doc


def run_get(args: argparse.Namespace) -> int:
    from .ops import read_policy

    prefix = layout.normalise_prefix(args.prefix)
    try:
        policy, revision = read_policy(StoreClient(args.endpoint), prefix, host=args.host)
    except PolicyError as exc:
        return _errors("get", exc)
    except StoreError as exc:
        return _store_error("get", exc)
    doc = policy_document(policy)
    if args.json:
        print(json.dumps({"revision": revision, "prefix": prefix, "policy": doc}, indent=1))
        return 0
    import yaml

    where = f" for host {args.host}" if args.host else ""
    print(f"# etcd {args.endpoint} {prefix}: revision {revision}{where}")
    digest = content_hash(policy)[:16]
    print(f"# {len(policy.tenants)} tenants, {len(policy.workloads)} workloads, hash {digest}")
    sys.stdout.write(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100))
    return 0


def run_status(args: argparse.Namespace) -> int:
    from .ops import read_status

    try:
        client = StoreClient(args.endpoint)
        rows = read_status(client, args.prefix)
        store_revision = client.revision()
    except StoreError as exc:
        return _store_error("status", exc)
    if args.json:
        print(json.dumps({"revision": store_revision, "agents": rows}, indent=1))
        return 0
    print(f"store revision {store_revision}; {len(rows)} agents")
    if rows:
        now = time.time()
        w = max(4, *(len(r["host"]) for r in rows))
        print(f"{'HOST':<{w}}  {'REVISION':>8}  {'AGE':>6}  HEALTH")
        for r in rows:
            t = r.get("time")
            age = f"{now - t:.0f}s" if isinstance(t, (int, float)) else "?"
            print(f"{r['host']:<{w}}  {r.get('revision', '?')!s:>8}  {age:>6}  {r.get('health', '?')}")
    return 0
