"""Workloads named on the command line (`microseg trace`, `microseg policy query`).

A workload is written ``[tenant/][namespace/]name``. A tenant without declared namespaces
has one, named after the tenant, so ``acme/web-1`` and ``acme/acme/web-1`` are the same
workload; in a tenant that declares namespaces, ``cluster1/prod/db`` or, where it is
unambiguous, ``prod/db`` or ``cluster1/db``.
A bare ``name`` is looked up in the packet's tenant when one is known (given, or taken from
the other endpoint); otherwise it must be unique across tenants, and a name several tenants
use is an error that lists the qualified candidates. A value that reads as an IP address is
an address, never a name.
"""

from __future__ import annotations

import ipaddress

from ..errors import InputError
from .model import Policy, Workload

FORM = "[tenant/][namespace/]name"


def namespaces(policy: Policy, tenant: str) -> tuple:
    """The names of the namespaces of ``tenant``."""
    return tuple(n.name for n in policy.tenant(tenant).namespaces)


def workload_namespace(w: Workload) -> str:
    return w.namespace or w.tenant


def qualified(w: Workload) -> str:
    """``tenant/name``, or ``tenant/namespace/name`` where the namespace is not the tenant's own."""
    ns = workload_namespace(w)
    return f"{w.tenant}/{w.name}" if ns == w.tenant else f"{w.tenant}/{ns}/{w.name}"


def _address(text: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _qualified(policy: Policy, text: str, what: str) -> Workload:
    parts = text.split("/")
    if len(parts) > 3 or any(p == "" for p in parts):
        raise InputError(f"{what}: {text!r} is not a workload name ({FORM})")
    tenant, name = parts[0], parts[-1]
    tenants = [t.name for t in policy.tenants]
    if len(parts) == 2:  # tenant/name or namespace/name
        found = [
            w
            for w in policy.workloads
            if w.name == name
            and (
                w.tenant == tenant or (workload_namespace(w) == tenant and workload_namespace(w) != w.tenant)
            )
        ]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise InputError(
                f"{what}: {text!r} names several workloads: {', '.join(qualified(w) for w in found)}"
            )
        if tenant not in tenants and not any(workload_namespace(w) == tenant for w in policy.workloads):
            raise InputError(
                f"{what}: {text!r}: no tenant or namespace {tenant!r} "
                f"(tenants: {', '.join(tenants) or 'none'})"
            )
    if tenant not in tenants:
        raise InputError(f"{what}: {text!r}: no tenant {tenant!r} (tenants: {', '.join(tenants) or 'none'})")
    ns = parts[1] if len(parts) == 3 else None
    if ns is not None and ns not in namespaces(policy, tenant):
        raise InputError(
            f"{what}: {text!r}: tenant {tenant!r} has no namespace {ns!r} "
            f"(its namespaces: {', '.join(namespaces(policy, tenant))})"
        )
    found = [
        w
        for w in policy.workloads
        if w.tenant == tenant and w.name == name and (ns is None or workload_namespace(w) == ns)
    ]
    if not found:
        where = f"namespace {tenant}/{ns}" if ns is not None else f"tenant {tenant!r}"
        raise InputError(f"{what}: {text!r}: no workload {name!r} in {where}")
    if len(found) > 1:
        raise InputError(
            f"{what}: {text!r} names several workloads: {', '.join(qualified(w) for w in found)}"
        )
    return found[0]


def _bare(policy: Policy, name: str, tenant: str | None, what: str) -> Workload | None:
    everywhere = [w for w in policy.workloads if w.name == name]
    if not everywhere:
        return None
    found = everywhere if tenant is None else [w for w in everywhere if w.tenant == tenant]
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputError(
            f"{what}: no workload {name!r} in tenant {tenant!r}; other tenants have "
            f"{', '.join(qualified(w) for w in everywhere)} (write {FORM})"
        )
    raise InputError(
        f"{what}: {name!r} is ambiguous: {', '.join(qualified(w) for w in found)} (write {FORM})"
    )


def resolve_endpoints(policy: Policy, texts, tenant: str | None = None, what=("src", "dst")):
    """Each text as an ``ipaddress`` address, a :class:`Workload`, or None (neither).

    ``tenant`` is the packet's tenant when the caller knows it; without it, the tenant of
    the first qualified name, else of the first bare name that is unique, is the tenant the
    other bare names are looked up in. Raises InputError (prefixed with ``what``) for a
    malformed or unknown qualified name and for an ambiguous or other-tenant bare name.
    """
    out = []
    for text, w in zip(texts, what):
        t = text.strip()
        a = _address(t)
        if a is not None:
            out.append(a)
        elif "/" in t:
            out.append(_qualified(policy, t, w))
        else:
            out.append(t)  # bare: resolved below
    ctx = tenant
    if ctx is None:
        ctx = next((x.tenant for x in out if isinstance(x, Workload)), None)
    if ctx is None:
        for x in out:
            if isinstance(x, str):
                ws = [w for w in policy.workloads if w.name == x]
                if len(ws) == 1:
                    ctx = ws[0].tenant
                    break
    return [_bare(policy, x, ctx, w) if isinstance(x, str) else x for x, w in zip(out, what)]


def pick_addresses(src, dst, what=("src", "dst")):
    """(source, destination) addresses of one family for two endpoints (address or Workload).

    A workload gives its first address of the other endpoint's family (its first address when
    both are workloads and the destination has that family too).
    """

    def addrs(x):
        return list(x.addresses) if isinstance(x, Workload) else [x]

    if isinstance(src, Workload) or isinstance(dst, Workload):
        for s in addrs(src):
            for d in addrs(dst):
                if s.version == d.version:
                    return s, d

        def fam(x):
            return "/".join(f"IPv{v}" for v in sorted({a.version for a in addrs(x)}))

        name = {id(x): qualified(x) for x in (src, dst) if isinstance(x, Workload)}
        raise InputError(
            f"{what[0]} {name.get(id(src), src)} ({fam(src)}) and {what[1]} "
            f"{name.get(id(dst), dst)} ({fam(dst)}) share no address family"
        )
    if src.version != dst.version:
        raise InputError(f"{what[0]} and {what[1]} must be of one IP version")
    return src, dst
