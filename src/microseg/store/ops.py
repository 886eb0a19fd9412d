"""Writing and reading the whole policy, and the agents' status keys.

* :func:`plan_apply` + :func:`commit` (or :func:`apply_policy`): the resources of a policy
  written as one etcd transaction, or, when they do not fit in one (etcd's default limits:
  128 operations, 1.5 MiB), as batches under a ``pending`` key and one small commit
  transaction that agents take as the policy version. Vanished resources are deleted; every
  transaction is guarded by the revision the store was read at (or by the apply's previous
  transaction): if anything else was written in between, nothing more is written and
  :class:`~microseg.store.etcd.Conflict` is raised, so two applies never interleave. Only
  resources whose value changed are written. The plan reads only the resource groups whose
  content hash differs from the last commit's ``digest``, when nothing was written since.
* :func:`read_policy`: the last committed resources (or those one host needs), assembled and
  validated.
* :func:`publish_status` / :func:`read_status`: ``<prefix>status/<host>`` under a lease.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import pickle
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..policy.model import Policy
from . import layout
from .etcd import (
    KV,
    Compacted,
    Conflict,
    StoreClient,
    StoreError,
    StoreUnavailable,
    cmp_mod,
    op_delete,
    op_put,
    op_range,
    prefix_end,
    range_result,
)

log = logging.getLogger("microseg.store")

MAX_TXN_OPS = 128  # etcd's default --max-txn-ops
MAX_TXN_BYTES = 1 << 20  # under etcd's default --max-request-bytes (1.5 MiB)
DIGEST_MAX_GROUPS = 16  # an apply changing more groups reads everything


def connect(client: StoreClient | str) -> StoreClient:
    return client if isinstance(client, StoreClient) else StoreClient(client)


def resource_values(policy: Policy, sa_files: dict[str, str] | None = None) -> dict[str, bytes]:
    """The stored values of ``policy`` (and of SA files, name -> text): relative key -> bytes."""
    res = resources(policy, sa_files)
    return {rel: res[rel] for rel in res}


DIGEST_FORMAT = 2  # what a group's hash is taken over (bump when encode_value's output changes)


class Resources(Mapping[str, bytes]):
    """The stored values of a policy, encoded only when asked for (relative key -> bytes).

    An apply needs every value's bytes only to plan from a full read; planning from the
    digest needs each group's hash (:meth:`digests`), taken over the values' documents (no
    encoding to JSON), and the bytes of the changed groups only."""

    def __init__(self, docs: dict[str, dict], texts: dict[str, bytes] | None = None):
        self._docs = docs
        self._texts = dict(texts or {})  # values stored as given (SA files)
        self._bytes: dict[str, bytes] = {}
        self._digests: tuple[dict[str, list[str]], dict[str, str]] | None = None

    def __getitem__(self, rel: str) -> bytes:
        got = self._bytes.get(rel)
        if got is None:
            text = self._texts.get(rel)
            got = text if text is not None else layout.encode_value(self._docs[rel])
            self._bytes[rel] = got
        return got

    def __iter__(self) -> Iterator[str]:
        yield from self._docs
        yield from (k for k in self._texts if k not in self._docs)

    def __len__(self) -> int:
        return len(self._docs.keys() | self._texts.keys())

    def __contains__(self, rel: object) -> bool:
        return rel in self._docs or rel in self._texts

    def digests(self) -> tuple[dict[str, list[str]], dict[str, str]]:
        """The keys by group and each group's content hash (see :func:`group_digests`)."""
        if self._digests is None:
            texts, docs = self._texts, self._docs
            self._digests = _digests(
                (rel, _fingerprint_raw(texts[rel]) if rel in texts else _fingerprint_doc(docs[rel]))
                for rel in self
            )
        return self._digests


def resources(policy: Policy, sa_files: dict[str, str] | None = None) -> Resources:
    """The stored values of ``policy`` and of SA files (name -> text), lazily encoded."""
    texts = {f"{layout.IPSEC}{name}": text.encode("utf-8") for name, text in (sa_files or {}).items()}
    # building some 100,000 small dicts beside a large parsed policy sets off the collector's
    # full passes over that policy (half the time, measured); nothing here makes cycles
    paused = gc.isenabled()
    gc.disable()
    try:
        docs = layout.policy_resources(policy)
    finally:
        if paused:
            gc.enable()
    return Resources(docs, texts)


def _fingerprint_doc(doc: Any) -> bytes:
    """What a resource's hash is taken over: its document, pickled without the memo (so the
    bytes depend on the content alone, not on which strings are shared objects). Pickling
    is exact (the document comes back from it), and ``encode_value`` is a function of the
    document, so equal fingerprints mean equal stored bytes; pickling is three times faster
    than even the C JSON encoder."""
    f = io.BytesIO()
    p = pickle.Pickler(f, 5)
    p.fast = True  # no memo: content alone (a resource's document has no cycles)
    p.dump(doc)
    return b"d" + f.getvalue()


def _fingerprint_raw(value: bytes) -> bytes:
    return b"r" + value


def _fingerprint(rel: str, value: bytes) -> bytes:
    """The fingerprint of a stored value: that of its JSON document (as :class:`Resources`
    takes it), the bytes themselves for SA files and values that are not JSON."""
    if not rel.startswith(layout.IPSEC):
        try:
            doc = json.loads(value)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            return _fingerprint_doc(doc)
    return _fingerprint_raw(value)


def _digests(items: Iterable[tuple[str, bytes]]) -> tuple[dict[str, list[str]], dict[str, str]]:
    keys: dict[str, list[str]] = {}
    fps: dict[str, bytes] = {}
    for rel, fp in items:
        rk = layout.parse_key(rel)
        if rk is None:
            raise ValueError(f"{rel!r} names no resource")
        keys.setdefault(layout.group_of(rk), []).append(rel)
        fps[rel] = fp
    digests = {}
    for g, rels in keys.items():
        rels.sort()
        h = hashlib.blake2b(digest_size=16)
        for rel in rels:
            v = fps[rel]
            h.update(f"{rel}\0{len(v)}\0".encode())
            h.update(v)
        digests[g] = h.hexdigest()
    return keys, digests


def resource_kvs(prefix: str, kvs: Iterable[KV]) -> dict[str, KV]:
    """Those of ``kvs`` (keys under ``prefix``) that name a resource: relative key -> KV."""
    out = {}
    for kv in kvs:
        rel = kv.key[len(prefix) :]
        if layout.parse_key(rel) is not None:
            out[rel] = kv
    return out


def read_committed(client: StoreClient, prefix: str) -> tuple[dict[str, KV], int]:
    """The resource keys under ``prefix`` (relative key -> KV) and the revision of the read;
    while an apply is being written in batches (the ``pending`` key exists), the resources
    as they were just before its first batch: what the agents run. :class:`StoreError` if
    that revision has been compacted away."""
    kvs, revision = client.range_prefix(prefix)
    pending = next((kv for kv in kvs if kv.key == prefix + layout.PENDING), None)
    if pending is not None:
        revision = pending.create_revision - 1
        try:
            kvs, _ = client.range(prefix, prefix_end(prefix), revision=revision)
        except Compacted:
            raise StoreError(
                f"an apply is being written (since revision {revision + 1}) and the revision before "
                "it has been compacted: read again once the apply has committed"
            ) from None
    return resource_kvs(prefix, kvs), revision


@dataclass
class Plan:
    """What an apply writes: computed from a read at ``base_revision``."""

    prefix: str
    base_revision: int
    meta_revision: int  # mod revision of the meta key at the read (0: none)
    puts: dict = field(default_factory=dict)  # relative key -> value, new or changed
    deletes: list = field(default_factory=list)  # relative keys that vanished
    unchanged: int = 0
    digests: dict = field(default_factory=dict)  # group -> content hash, once written
    count: int = 0  # keys in the guarded ranges once written (the digest's check)
    read: str = "full"  # how the store was read: "digest" (changed groups only) or "full"
    read_keys: int = 0  # values read to plan
    transactions: int = 0  # transactions the commit took (set by commit)

    @property
    def empty(self) -> bool:
        return not self.puts and not self.deletes


def group_digests(values: Mapping[str, bytes]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The resource keys by group (tenant, or :data:`~microseg.store.layout.GLOBAL`) and each
    group's content hash: BLAKE2b over its keys and their values' fingerprints (a resource's
    document as loaded from its JSON, an SA file's text), in key order."""
    if isinstance(values, Resources):
        return values.digests()
    return _digests((rel, _fingerprint(rel, v)) for rel, v in values.items())


def _guarded(p: str) -> list[tuple[str, str]]:
    """The ranges an apply guards: everything under the prefix but the agents' status keys
    and the conntrack handoffs."""
    return [
        (p, p + layout.HANDOFF),
        (prefix_end(p + layout.HANDOFF), p + layout.STATUS),
        (prefix_end(p + layout.STATUS), prefix_end(p)),
    ]


def _guard(p: str, revision: int, meta_revision: int) -> list[dict]:
    """Compares: nothing in the guarded ranges written after ``revision``, ``meta`` as read."""
    return [cmp_mod(p + layout.META, "EQUAL", meta_revision)] + [
        cmp_mod(a, "LESS", revision + 1, range_end=b) for a, b in _guarded(p)
    ]


def _diff(plan: Plan, values: Mapping[str, bytes], keys: Iterable[str], current: dict[str, bytes]) -> None:
    """Compare the values of ``keys`` (of ``values``) with ``current``, the store's."""
    wanted = set()
    for rel in sorted(keys):
        wanted.add(rel)
        value = values[rel]
        if current.get(rel) == value:
            plan.unchanged += 1
        else:
            plan.puts[rel] = value
    plan.deletes += sorted(rel for rel in current if rel not in wanted)
    plan.read_keys += len(current)


def plan_apply(
    client: StoreClient,
    values: Mapping[str, bytes],
    prefix: str = layout.DEFAULT_PREFIX,
    *,
    digest: bool = True,
) -> Plan:
    """What writing ``values`` (relative key -> value) changes, from a read of the store.

    With ``digest`` (the default) and a store whose last commit recorded its groups' content
    hashes (the ``digest`` key), only the groups whose hash differs are read, in one
    transaction that also checks that nothing was written since that commit (no key of the
    guarded ranges modified after it, and as many keys as it left); otherwise, or when more
    than :data:`DIGEST_MAX_GROUPS` groups changed, every key is read. ``values`` from
    :func:`resources` are encoded only where compared (the changed groups' on a digest read)."""
    prefix = layout.normalise_prefix(prefix)
    groups, digests = group_digests(values)
    if digest:
        plan = _plan_by_digest(client, prefix, values, groups, digests)
        if plan is not None:
            return plan
    return _plan_full(client, prefix, values, digests)


def _plan_full(client: StoreClient, p: str, values: Mapping[str, bytes], digests: dict[str, str]) -> Plan:
    kvs, revision = client.range_prefix(p)
    current: dict[str, bytes] = {}
    guarded: set[str] = set()
    meta_revision = 0
    for kv in kvs:
        rel = kv.key[len(p) :]
        if rel.startswith((layout.HANDOFF, layout.STATUS)):
            continue
        guarded.add(rel)
        if rel == layout.META:
            meta_revision = kv.mod_revision
        elif layout.parse_key(rel) is not None:
            current[rel] = kv.value
    plan = Plan(p, revision, meta_revision, digests=digests, read="full")
    _diff(plan, values, values.keys(), current)
    after = (guarded | set(plan.puts) | {layout.META, layout.DIGEST}) - set(plan.deletes) - {layout.PENDING}
    plan.count = len(after)
    return plan


def _plan_by_digest(
    client: StoreClient,
    p: str,
    values: Mapping[str, bytes],
    groups: dict[str, list[str]],
    digests: dict[str, str],
) -> Plan | None:
    dg = client.get(p + layout.DIGEST)
    meta = client.get(p + layout.META)
    if dg is None or meta is None or meta.mod_revision != dg.mod_revision:
        return None  # no digest, or one an apply of its own did not write
    try:
        doc = json.loads(dg.value)
        if doc["format"] != DIGEST_FORMAT:
            return None  # hashed another way: read everything (the commit records this one)
        recorded = {str(k): str(v) for k, v in doc["groups"].items()}
        count = int(doc["count"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    changed = sorted(g for g in recorded.keys() | digests.keys() if recorded.get(g) != digests.get(g))
    if len(changed) > DIGEST_MAX_GROUPS:
        return None
    ranges = _guarded(p)
    compare = _guard(p, dg.mod_revision, meta.mod_revision)
    compare.append(cmp_mod(p + layout.DIGEST, "EQUAL", dg.mod_revision))
    success = [op_range(a, b, count_only=True) for a, b in ranges]
    for g in changed:
        success += [op_range(k, e) for k, e in layout.group_ranges(p, g)]
    ok, revision, responses = client.txn_responses(compare, success)
    if not ok:
        return None  # written since that commit: read everything
    if sum(range_result(r)[1] for r in responses[: len(ranges)]) != count:
        return None  # a key deleted since (a write would have failed the compare)
    got = resource_kvs(p, (kv for r in responses[len(ranges) :] for kv in range_result(r)[0]))
    current = {rel: kv.value for rel, kv in got.items()}
    plan = Plan(p, revision, meta.mod_revision, digests=digests, read="digest")
    _diff(plan, values, [rel for g in changed for rel in groups.get(g, ())], current)
    plan.unchanged += sum(len(rels) for g, rels in groups.items() if g not in changed)
    plan.count = count + sum(1 for rel in plan.puts if rel not in current) - len(plan.deletes)
    return plan


def _batches(ops: list[tuple[dict, int]], max_ops: int, max_bytes: int) -> list[list[dict]]:
    out: list[list[dict]] = [[]]
    size = 0
    for op, n in ops:
        if out[-1] and (len(out[-1]) >= max_ops or size + n > max_bytes):
            out.append([])
            size = 0
        out[-1].append(op)
        size += n
    return out


def commit(
    client: StoreClient,
    plan: Plan,
    source: str = "",
    content_hash: str = "",
    *,
    max_ops: int = MAX_TXN_OPS,
    max_bytes: int = MAX_TXN_BYTES,
) -> int:
    """Write ``plan``; the revision of its commit (the read's when nothing changed).

    A plan that fits in one transaction of ``max_ops`` operations and ``max_bytes`` bytes is
    written as one. A larger one is written in batches that fit, under a ``pending`` key, and
    committed by a last transaction that writes ``meta`` and ``digest`` and deletes
    ``pending`` (docs/store.md, "Transactions"); agents act on the commit only. Every
    transaction is guarded by the one before (nothing else written in between).

    Raises :class:`Conflict` when the store changed after the plan's read."""
    if plan.empty:
        log.info("store %s: nothing changed since revision %d", plan.prefix, plan.base_revision)
        return plan.base_revision
    p = plan.prefix
    nonce = uuid.uuid4().hex
    meta_doc = {
        "apply": nonce,
        "source": source,
        "content_hash": content_hash,
        "base_revision": plan.base_revision,
        "written": len(plan.puts),
        "deleted": len(plan.deletes),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    digest = json.dumps(
        {"format": DIGEST_FORMAT, "count": plan.count, "groups": plan.digests}, sort_keys=True
    )
    writes = [(op_put(p + rel, v), len(p) + len(rel) + len(v)) for rel, v in plan.puts.items()]
    writes += [(op_delete(p + rel), len(p) + len(rel)) for rel in plan.deletes]
    room = max_bytes - len(digest) - 1024  # what the commit's own keys leave
    batches = _batches(writes, max(1, max_ops - 3), max(1, room))
    meta_doc["batches"] = plan.transactions = len(batches)
    finish = [
        op_put(p + layout.META, json.dumps(meta_doc, sort_keys=True)),
        op_put(p + layout.DIGEST, digest),
        # also ends what an apply that died half-way left pending (this plan read its batches
        # and overwrites them)
        op_delete(p + layout.PENDING),
    ]
    if len(batches) == 1:
        revision = _txn(
            client, p, _guard(p, plan.base_revision, plan.meta_revision), batches[0] + finish, nonce
        )
        if revision is None:
            raise Conflict(
                f"the store changed after it was read at revision {plan.base_revision}; "
                "nothing was written: apply again"
            )
    else:
        revision = plan.base_revision
        n = len(batches)
        for i, batch in enumerate(batches, start=1):
            last = i == n
            ops = list(batch)
            if last:
                ops += finish
            else:
                pending = {
                    "apply": nonce,
                    "batch": i,
                    "of": n,
                    "base_revision": plan.base_revision,
                    "source": source,
                    "time": meta_doc["time"],
                }
                ops.append(op_put(p + layout.PENDING, json.dumps(pending, sort_keys=True)))
            got = _txn(client, p, _guard(p, revision, plan.meta_revision), ops, nonce, None if last else i)
            if got is None:
                if i == 1:
                    raise Conflict(
                        f"the store changed after it was read at revision {plan.base_revision}; "
                        "nothing was written: apply again"
                    )
                raise Conflict(
                    f"the store changed while the apply was written (before batch {i} of {n}); "
                    f"{i - 1} batches were written but not committed (agents keep the policy of "
                    f"revision {plan.meta_revision or plan.base_revision}): apply again"
                )
            revision = got
    log.info(
        "store %s: revision %d: %d written, %d deleted (read: %s)",
        p,
        revision,
        len(plan.puts),
        len(plan.deletes),
        plan.read,
    )
    return revision


def _txn(
    client: StoreClient, p: str, compare: list, ops: list, nonce: str, batch: int | None = None
) -> int | None:
    """One guarded transaction of an apply: its revision, None when the guard failed. When
    the answer is lost (a member died mid-request), the ``pending`` key (a batch) or ``meta``
    (the commit) says whether this transaction landed."""
    try:
        ok, revision = client.txn(compare, ops)
    except StoreUnavailable:
        kv = client.get(p + (layout.PENDING if batch is not None else layout.META))
        try:
            doc = json.loads(kv.value) if kv is not None else {}
        except ValueError:
            doc = {}
        if isinstance(doc, dict) and doc.get("apply") == nonce and doc.get("batch") == batch:
            return kv.mod_revision  # type: ignore[union-attr]
        raise
    except StoreError as exc:
        msg = str(exc)
        if "too many operations" in msg:
            raise StoreError(
                f"{msg}: this etcd allows fewer than {len(ops)} operations in a transaction; "
                "apply with a smaller --txn-ops"
            ) from None
        if "too large" in msg or "larger than max" in msg:
            raise StoreError(
                f"{msg}: this etcd takes smaller requests than this transaction's; "
                "apply with a smaller --txn-bytes"
            ) from None
        raise
    return revision if ok else None


def apply_policy(
    client: StoreClient | str,
    policy: Policy,
    prefix: str = layout.DEFAULT_PREFIX,
    sa_files: dict[str, str] | None = None,
    content_hash: str = "",
    *,
    max_ops: int = MAX_TXN_OPS,
    max_bytes: int = MAX_TXN_BYTES,
) -> tuple[int, Plan]:
    """Plan and commit ``policy`` (already validated); ``(revision, plan)``."""
    client = connect(client)
    plan = plan_apply(client, resources(policy, sa_files), prefix)
    return commit(client, plan, policy.source, content_hash, max_ops=max_ops, max_bytes=max_bytes), plan


def read_policy(
    client: StoreClient | str, prefix: str = layout.DEFAULT_PREFIX, host: str | None = None
) -> tuple[Policy, int]:
    """The stored policy as last committed (only what ``host`` needs, if given) and the
    revision it was read at.

    Raises :class:`~microseg.policy.source.PolicyError` naming the keys of invalid resources."""
    client = connect(client)
    prefix = layout.normalise_prefix(prefix)
    kvs, revision = read_committed(client, prefix)
    values = {rel: kv.value for rel, kv in kvs.items()}
    if host is not None:
        values = {k: values[k] for k in layout.host_keys(values, host)}
    return layout.assemble(prefix, values), revision


def read_sa_configs(client: StoreClient | str, prefix: str = layout.DEFAULT_PREFIX) -> dict:
    """The SA files in the store: name -> :class:`~microseg.ipsec.sa.SAConfig`."""
    client = connect(client)
    prefix = layout.normalise_prefix(prefix)
    kvs, _ = read_committed(client, prefix)
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
