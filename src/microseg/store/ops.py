"""Writing and reading the whole policy, and the agents' status keys.

* :func:`plan_apply` + :func:`commit` (or :func:`apply_policy`): the resources of a policy
  written as one etcd transaction, which also deletes the resources that vanished and is
  guarded by the revision the store was read at: if any resource (or the ``meta`` key) changed
  after that read, nothing is written and :class:`~microseg.store.etcd.Conflict` is raised, so
  two applies never interleave. Only resources whose value changed are written.
* :func:`read_policy`: every resource (or those one host needs), assembled and validated.
* :func:`publish_status` / :func:`read_status`: ``<prefix>status/<host>`` under a lease.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from ..policy.model import Policy
from . import layout
from .etcd import (
    KV,
    Conflict,
    StoreClient,
    StoreError,
    StoreUnavailable,
    cmp_mod,
    op_delete,
    op_put,
    prefix_end,
)

log = logging.getLogger("microseg.store")


def connect(client: StoreClient | str) -> StoreClient:
    return client if isinstance(client, StoreClient) else StoreClient(client)


def resource_values(policy: Policy, sa_files: dict[str, str] | None = None) -> dict[str, bytes]:
    """The stored values of ``policy`` (and of SA files, name -> text): relative key -> bytes."""
    out = {k: layout.encode_value(v) for k, v in layout.policy_resources(policy).items()}
    for name, text in (sa_files or {}).items():
        out[f"{layout.IPSEC}{name}"] = text.encode("utf-8")
    return out


def read_values(client: StoreClient, prefix: str) -> tuple[dict[str, KV], int]:
    """The resource keys under ``prefix`` (relative key -> KV) and the revision of the read."""
    kvs, revision = client.range_prefix(prefix)
    out = {}
    for kv in kvs:
        rel = kv.key[len(prefix) :]
        if layout.parse_key(rel) is not None:
            out[rel] = kv
    return out, revision


@dataclass
class Plan:
    """What an apply writes: computed from a read at ``base_revision``."""

    prefix: str
    base_revision: int
    meta_revision: int  # mod revision of the meta key at the read (0: none)
    puts: dict = field(default_factory=dict)  # relative key -> value, new or changed
    deletes: list = field(default_factory=list)  # relative keys that vanished
    unchanged: int = 0

    @property
    def empty(self) -> bool:
        return not self.puts and not self.deletes


def plan_apply(client: StoreClient, values: dict[str, bytes], prefix: str = layout.DEFAULT_PREFIX) -> Plan:
    prefix = layout.normalise_prefix(prefix)
    current, revision = read_values(client, prefix)
    meta = client.get(prefix + layout.META)
    plan = Plan(prefix, revision, meta.mod_revision if meta is not None else 0)
    for rel, value in sorted(values.items()):
        kv = current.get(rel)
        if kv is not None and kv.value == value:
            plan.unchanged += 1
        else:
            plan.puts[rel] = value
    plan.deletes = sorted(rel for rel in current if rel not in values)
    return plan


def commit(client: StoreClient, plan: Plan, source: str = "", content_hash: str = "") -> int:
    """Write ``plan`` in one transaction; the new revision (the read's when nothing changed).

    Raises :class:`Conflict` when the store changed after the plan's read."""
    if plan.empty:
        log.info("store %s: nothing changed since revision %d", plan.prefix, plan.base_revision)
        return plan.base_revision
    p = plan.prefix
    guard = plan.base_revision + 1
    compare = [
        cmp_mod(p + layout.META, "EQUAL", plan.meta_revision),
        # nothing under the prefix changed since the read, the agents' status keys and
        # conntrack handoffs aside
        cmp_mod(p, "LESS", guard, range_end=p + layout.HANDOFF),
        cmp_mod(prefix_end(p + layout.HANDOFF), "LESS", guard, range_end=p + layout.STATUS),
        cmp_mod(prefix_end(p + layout.STATUS), "LESS", guard, range_end=prefix_end(p)),
    ]
    nonce = uuid.uuid4().hex
    meta = {
        "apply": nonce,
        "source": source,
        "content_hash": content_hash,
        "base_revision": plan.base_revision,
        "written": len(plan.puts),
        "deleted": len(plan.deletes),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    ops = [op_put(p + rel, v) for rel, v in plan.puts.items()]
    ops += [op_delete(p + rel) for rel in plan.deletes]
    ops.append(op_put(p + layout.META, json.dumps(meta, sort_keys=True)))
    try:
        ok, revision = client.txn(compare, ops)
    except StoreUnavailable:
        # the answer was lost (a member died, an election): the transaction may have been
        # applied; the meta key says whether it was this one
        kv = client.get(p + layout.META)
        if kv is not None and json.loads(kv.value).get("apply") == nonce:
            return kv.mod_revision
        raise
    except StoreError as exc:
        msg = str(exc)
        if "too many operations" in msg:
            raise StoreError(
                f"{msg}: this apply changes {len(ops)} keys in one transaction; "
                f"start etcd with --max-txn-ops {len(ops)} or more"
            ) from None
        if "too large" in msg:
            raise StoreError(f"{msg}: start etcd with a larger --max-request-bytes") from None
        raise
    if not ok:
        raise Conflict(
            f"the store changed after it was read at revision {plan.base_revision} "
            f"(now {revision}); nothing was written: apply again"
        )
    log.info("store %s: revision %d: %d written, %d deleted", p, revision, len(plan.puts), len(plan.deletes))
    return revision


def apply_policy(
    client: StoreClient | str,
    policy: Policy,
    prefix: str = layout.DEFAULT_PREFIX,
    sa_files: dict[str, str] | None = None,
    content_hash: str = "",
) -> tuple[int, Plan]:
    """Plan and commit ``policy`` (already validated); ``(revision, plan)``."""
    client = connect(client)
    plan = plan_apply(client, resource_values(policy, sa_files), prefix)
    return commit(client, plan, policy.source, content_hash), plan


def read_policy(
    client: StoreClient | str, prefix: str = layout.DEFAULT_PREFIX, host: str | None = None
) -> tuple[Policy, int]:
    """The stored policy (only what ``host`` needs, if given) and the revision it was read at.

    Raises :class:`~microseg.policy.source.PolicyError` naming the keys of invalid resources."""
    client = connect(client)
    prefix = layout.normalise_prefix(prefix)
    kvs, revision = read_values(client, prefix)
    values = {rel: kv.value for rel, kv in kvs.items()}
    if host is not None:
        values = {k: values[k] for k in layout.host_keys(values, host)}
    return layout.assemble(prefix, values), revision


def read_sa_configs(client: StoreClient | str, prefix: str = layout.DEFAULT_PREFIX) -> dict:
    """The SA files in the store: name -> :class:`~microseg.ipsec.sa.SAConfig`."""
    client = connect(client)
    prefix = layout.normalise_prefix(prefix)
    kvs, _ = read_values(client, prefix)
    return layout.sa_configs(prefix, {rel: kv.value for rel, kv in kvs.items()})


# ---------------------------------------------------------------------------------------------
# Agents' status
# ---------------------------------------------------------------------------------------------
def publish_status(
    client: StoreClient | str,
    host: str,
    revision: int,
    health: str,
    ttl: int = 10,
    *,
    prefix: str = layout.DEFAULT_PREFIX,
    lease: int = 0,
    detail: dict | None = None,
) -> int:
    """Write ``<prefix>status/<host>`` (applied revision, health, time, ``detail``) under a
    lease of ``ttl`` seconds; the lease's ID.

    Pass the returned ``lease`` back on the next call to reuse it (it is refreshed; a new one
    is granted when it has expired), and call ``client.keepalive(lease)`` more often than
    ``ttl`` to keep the key between changes. When the agent stops refreshing, etcd deletes the
    key after ``ttl`` seconds, so ``microseg store status`` lists only live agents."""
    client = connect(client)
    prefix = layout.normalise_prefix(prefix)
    if lease and client.keepalive(lease) <= 0:
        lease = 0
    if not lease:
        lease = client.grant(ttl)
    doc = {
        "host": host,
        "revision": int(revision),
        "health": health,
        "time": time.time(),
        "ttl": int(ttl),
    }
    if detail:
        doc["detail"] = detail
    client.put(prefix + layout.STATUS + host, json.dumps(doc, sort_keys=True), lease=lease)
    return lease


def read_status(client: StoreClient | str, prefix: str = layout.DEFAULT_PREFIX) -> list[dict]:
    """Every agent's status (sorted by host); an unreadable value is shown as such."""
    client = connect(client)
    prefix = layout.normalise_prefix(prefix)
    kvs, _ = client.range_prefix(prefix + layout.STATUS)
    out = []
    for kv in kvs:
        host = kv.key[len(prefix + layout.STATUS) :]
        try:
            doc = json.loads(kv.value)
            if not isinstance(doc, dict):
                raise ValueError
        except ValueError:
            doc = {"health": "unreadable status value"}
        doc["host"] = host
        doc["lease"] = kv.lease
        out.append(doc)
    return sorted(out, key=lambda d: d["host"])
