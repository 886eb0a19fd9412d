"""The agent's view of the store: load once, then watch, fail static.

:class:`PolicyWatcher` reads what its host needs (:meth:`~PolicyWatcher.load`): the settings,
hosts and SA files, every workload's host (an index, to learn about moves) and every resource
of the host's tenants, at one revision; it holds only those, and watches the prefix from that
revision in a thread of its own (:meth:`~PolicyWatcher.start`). Each batch of events (one
gateway message, never part of a transaction) updates what it holds; a tenant that becomes the
host's is read at the batch's revision, one that stops being the host's is let go. Only when a
held value changed does it work out the host's keys, and only when their values changed does
it assemble and validate them and call back with ``(Policy, revision)``, so changes that touch
other tenants cost no recompilation. While an apply is being written in batches (the
``pending`` key exists) it judges nothing; the apply's commit is judged whole.

* **Fail static.** When etcd does not answer, the stream breaks, or the member loses its
  leader, the last good policy stays (the callback is simply not called), the state becomes
  ``unreachable`` (:meth:`~PolicyWatcher.status`, ``on_state``), and the watcher retries with
  exponential backoff, moving to the next endpoint each time. When the store answers again
  the watch resumes from the last revision it processed, so nothing in between is missed.
* **Compaction.** If etcd has compacted that revision away ("required revision has been
  compacted"), the watcher reads everything afresh at the current revision (a resync) and
  carries on from there.
* **Invalid resources.** If the keys a host needs do not validate, the errors (each naming its
  key, as the policy loader names a file's lines) go into the state ``invalid``; the last good
  policy stays until a valid set arrives.
* **Silent members.** A probe asks the stream's member for its status every
  ``probe_interval`` seconds (0: never) and breaks the stream when it fails twice running.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..policy.model import Policy
from ..policy.source import PolicyError
from . import layout
from .etcd import Compacted, StoreClient, StoreError, WatchStream, prefix_end
from .ops import connect, resource_kvs

log = logging.getLogger("microseg.store")

Callback = Callable[[Policy, int], None]
_NONE = object()  # no such workload


def _group(rel: str) -> str | None:
    rk = layout.parse_key(rel)
    return None if rk is None else layout.group_of(rk)


def _untagged(settings: bytes | None) -> str | None:
    u = layout.value_field(settings, "untagged_tenant") if settings is not None else None
    return u if isinstance(u, str) else None


class PolicyWatcher:
    """The policy a host needs from etcd at ``endpoint`` under ``prefix``, kept up to date.

    ``host=None`` means every resource. ``backoff`` is (first, longest) retry delay in
    seconds. Use :meth:`load` for the first policy, then :meth:`start` to watch (or
    :meth:`start` alone: the callback then also receives the first valid policy), and
    :meth:`stop` to end; the watcher is also a context manager that stops on exit.
    """

    def __init__(
        self,
        endpoint: StoreClient | str,
        prefix: str = layout.DEFAULT_PREFIX,
        host: str | None = None,
        *,
        backoff: tuple[float, float] = (0.1, 5.0),
        probe_interval: float = 5.0,
    ):
        self.client = connect(endpoint)
        self.prefix = layout.normalise_prefix(prefix)
        self.host = host
        self.backoff = backoff
        self.probe_interval = probe_interval
        self._lock = threading.RLock()
        # the resources held, at self._revision: the settings, hosts and SA files, and every
        # resource of the tenants held (with host=None: every resource)
        self._values: dict[str, bytes] = {}
        self._held: set[str] = set()  # the tenants whose resources are held (with a host)
        self._whost: dict[str, str | None] = {}  # every workload's key -> its host field
        self._on_host: dict[str, int] = {}  # tenant -> its workloads on this host
        self._untagged: str | None = None  # the settings' untagged_tenant
        self._pending = False  # an apply is being written in batches: judge at its commit
        self._dirty = False  # a held value changed since the last judgement
        self._revision = 0  # the last revision processed (the watch resumes after it)
        self._loaded = False
        self._last_input: dict | None = None  # the relevant values last judged
        self._policy: Policy | None = None
        self._policy_revision = 0
        self._sa: dict = {}
        self._connected = False
        self._watching = False  # a watch stream is open
        self._errors: list[str] = []  # the invalid resources, when the last input was refused
        self._error = ""  # why the store is unreachable
        self._since = time.time()
        self._state = "starting"
        self.stats = {
            "reconnects": 0,
            "resyncs": 0,
            "compactions": 0,
            "recompiles": 0,
            "skipped": 0,
            "buffered": 0,  # batches of events held back until an apply's commit
            "tenant_reads": 0,  # tenants read when they became this host's
        }
        self._callback: Callback | None = None
        self._on_state: Callable[[dict], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prober: threading.Thread | None = None
        self._stream: WatchStream | None = None

    # -- what the agent reads -------------------------------------------------------------------
    @property
    def policy(self) -> Policy | None:
        """The last good policy (None before the first)."""
        return self._policy

    @property
    def policy_revision(self) -> int:
        """The store revision at which the last good policy was read."""
        return self._policy_revision

    @property
    def revision(self) -> int:
        """The last store revision the watcher has processed (it may have needed nothing)."""
        return self._revision

    @property
    def sa_configs(self) -> dict:
        """The SA files of the last good read: name -> SAConfig."""
        return self._sa

    def workload_host(self, workload: str) -> str | None:
        """The ``host`` the store gives workload ``workload`` (``tenant/name`` or
        ``tenant/namespace/name``, as ``qualified`` names it) at the last revision processed,
        whichever host's it is: the agent a workload leaves learns where it went. None when
        there is no such workload or it has no host."""
        tenant, _, rest = workload.partition("/")
        ns, _, name = rest.rpartition("/")
        rel = f"workloads/{tenant}/{ns or tenant}/{name}"
        with self._lock:
            host = self._whost.get(rel)
        return host if isinstance(host, str) and host else None

    def status(self) -> dict:
        """``state`` (``starting``, ``ok``, ``invalid``, ``unreachable``, ``stopped``),
        ``connected`` (the last request to etcd succeeded), ``watching`` (a watch stream is
        open), the revisions, the errors and since when, for the agent's status key."""
        with self._lock:
            return {
                "state": self._state,
                "connected": self._connected,
                "watching": self._watching,
                "revision": self._revision,
                "policy_revision": self._policy_revision,
                "pending": self._pending,
                "tenants": len(self._held) if self.host is not None else len(self._groups()),
                "held_keys": len(self._values),
                "errors": list(self._errors),
                "error": self._error,
                "since": self._since,
                "stats": dict(self.stats),
            }

    def health(self) -> str:
        """One word and, when not ``ok``, why: what :func:`~microseg.store.publish_status`
        takes as ``health``."""
        s = self.status()
        if s["state"] == "invalid":
            return f"invalid: {s['errors'][0]}" if s["errors"] else "invalid"
        if s["state"] == "unreachable":
            return f"unreachable: {s['error']}"
        return s["state"]

    # -- reading ---------------------------------------------------------------------------------
    def load(self) -> tuple[Policy, int]:
        """Read every resource now; ``(policy, revision)`` of what this host needs.

        Raises :class:`~microseg.policy.source.PolicyError` (errors naming keys) when the
        resources do not validate and :class:`~microseg.store.etcd.StoreError` when etcd
        cannot be read; a previous good policy then stays in place."""
        if self._thread is not None:
            raise RuntimeError("load() reads before start(); the running watch keeps .policy current")
        self._resync()
        if self._errors:
            raise PolicyError(self._errors)
        assert self._policy is not None
        return self._policy, self._policy_revision

    def _resync(self) -> Policy | None:
        """Read what this host needs afresh: the last committed state (docs/store.md, "The
        commit"), every workload's host, the settings, hosts and SA files, then the resources
        of this host's tenants, all at one revision."""
        committed = 0  # read now; the revision before an apply being written, if one is
        for _attempt in range(3):
            try:
                kvs, revision = self._read_all(committed)
            except Compacted:
                if committed:
                    raise StoreError(
                        f"an apply is being written (since revision {committed + 1}) and the revision "
                        "before it has been compacted: waiting for its commit"
                    ) from None
                continue  # compacted between reads pinned to one revision: read again
            pending = kvs.get(layout.PENDING)
            if pending is None or committed:
                break
            committed = pending.create_revision - 1
        else:
            raise StoreError("the store was compacted under every fresh read; trying again")
        self._revision = revision
        self._loaded = True
        self.stats["resyncs"] += 1
        with self._lock:
            self._connected = True
            self._error = ""
            self._pending = False  # a pending key read at `revision` arrives as an event
            self._dirty = True
        relevant = self._relevant()
        mods = [kvs[k].mod_revision for k in relevant if k in kvs]
        meta = kvs.get(layout.META)
        if meta is not None:
            mods.append(meta.mod_revision)
        # the revision the policy stands for: the last apply's (the meta key every apply
        # writes) or a later write of one of this host's keys -- not the read's own, which
        # other hosts' status keys move on
        return self._evaluate(min(max(mods, default=revision), revision))

    def _read_all(self, revision: int) -> tuple[dict, int]:
        """Read at ``revision`` (0: now) and replace the state; the keys read (relative key
        -> KV) and the revision of the read."""
        p = self.prefix
        kvs: dict = {}

        def take(got: list) -> None:
            for kv in got:
                kvs[kv.key[len(p) :]] = kv

        if self.host is None:
            got, rev = self.client.range(p, prefix_end(p), revision=revision)
            take(got)
        else:
            got, rev = self.client.range(p + layout.META, revision=revision)
            take(got)
            revision = revision or rev  # the reads below are pinned to the first one's
            w = p + "workloads/"
            ranges = [(p + layout.PENDING, None), *layout.group_ranges(p, layout.GLOBAL), (w, prefix_end(w))]
            for got in self.client.ranges(ranges, revision):  # one request for them all
                take(got)
            rev = revision
        values: dict[str, bytes] = {}
        with self._lock:
            self._whost, self._on_host = {}, {}
            for rel, kv in kvs.items():
                rk = layout.parse_key(rel)
                if rk is None:
                    continue
                values[rel] = kv.value
                if rk.section == "workloads":
                    self._set_workload(rel, rk.parts[0], kv.value)
            self._untagged = _untagged(values.get(layout.SETTINGS))
        held: set[str] = set()  # (every resource is held without a host: see _groups)
        if self.host is not None:
            held = self._wanted()
            values = {rel: v for rel, v in values.items() if _group(rel) == layout.GLOBAL}
            read = self._read_tenants(held, rev)
            values.update({rel: kv.value for rel, kv in read.items()})
            kvs.update(read)
        with self._lock:
            self._values, self._held = values, held
        return kvs, rev

    def _read_tenants(self, tenants: set[str], revision: int) -> dict:
        """Every resource of ``tenants`` at ``revision``: relative key -> KV."""
        p = self.prefix
        ranges = [r for t in sorted(tenants) for r in layout.group_ranges(p, t)]
        self.stats["tenant_reads"] += len(tenants)
        # one request for them all (a transaction of reads pinned to `revision`): a workload
        # moving in waits for one round trip to etcd, not one per range
        got = self.client.ranges(ranges, revision) if ranges else []
        return resource_kvs(p, (kv for kvs in got for kv in kvs))

    def _set_workload(self, rel: str, tenant: str, value: bytes | None) -> None:
        """Note a workload's host (``value`` None: deleted), keeping the count per tenant of
        the workloads on this host."""
        old: object = self._whost.pop(rel, _NONE)
        new: object = _NONE
        if value is not None:
            h = layout.value_field(value, "host")
            self._whost[rel] = h if isinstance(h, str) else None
            new = self._whost[rel]
        if self.host is None or old == new:
            return
        if old == self.host:
            n = self._on_host.get(tenant, 0) - 1
            if n > 0:
                self._on_host[tenant] = n
            else:
                self._on_host.pop(tenant, None)
        if new == self.host:
            self._on_host[tenant] = self._on_host.get(tenant, 0) + 1

    def _groups(self) -> set[str]:
        """The tenants of the values held (without a host, every tenant in the store): derived
        when asked for, not after every batch of events."""
        return {g for rel in self._values if (g := _group(rel)) not in (None, layout.GLOBAL)}

    def _wanted(self) -> set[str]:
        """The tenants this host needs: those of its workloads, and the untagged tenant."""
        out = set(self._on_host)
        if self._untagged is not None:
            out.add(self._untagged)
        return out

    def _relevant(self) -> dict[str, bytes]:
        """The values this host's policy is made of (docs/store.md, "What a host reads")."""
        if self.host is None:
            return dict(self._values)
        keys = layout.tenant_keys(self._values, self.host, self._held, self._whost)
        return {k: self._values[k] for k in keys}

    def _evaluate(self, revision: int) -> Policy | None:
        """Judge the relevant values; the new policy when they changed and validate."""
        if not self._dirty:
            self.stats["skipped"] += 1
            self._set_state("invalid" if self._errors else "ok")
            return None
        self._dirty = False
        values = self._relevant()
        if values == self._last_input:
            self.stats["skipped"] += 1
            self._set_state("invalid" if self._errors else "ok")
            return None
        self._last_input = values
        try:
            policy = layout.assemble(self.prefix, values)
            sa = layout.sa_configs(self.prefix, values)
        except PolicyError as exc:
            with self._lock:
                self._errors = list(exc.errors)
            log.warning(
                "store %s: revision %d refused, keeping revision %d: %s",
                self.prefix,
                revision,
                self._policy_revision,
                "; ".join(exc.errors),
            )
            self._set_state("invalid", force=True)
            return None
        with self._lock:
            self._errors = []
            self._policy, self._policy_revision, self._sa = policy, revision, sa
        self.stats["recompiles"] += 1
        self._set_state("ok")
        return policy

    def _set_state(self, state: str, force: bool = False) -> None:
        with self._lock:
            if state == self._state and not force:
                return
            self._state, self._since = state, time.time()
            snapshot = self.status()
        cb = self._on_state
        if cb is not None:
            try:
                cb(snapshot)
            except Exception:  # noqa: BLE001 - a reporting hook must not stop the watch
                log.exception("store watcher: on_state callback failed")

    def _deliver(self, policy: Policy | None) -> None:
        if policy is None or self._callback is None:
            return
        try:
            self._callback(policy, self._policy_revision)
        except Exception:  # noqa: BLE001 - the agent's problem, not the watch's
            log.exception("store watcher: callback failed for revision %d", self._policy_revision)

    # -- watching --------------------------------------------------------------------------------
    def start(self, callback: Callback, on_state: Callable[[dict], None] | None = None) -> None:
        """Watch from the loaded revision in a background thread; ``callback(policy,
        revision)`` on each relevant valid change, ``on_state(status())`` when the state
        changes."""
        if self._thread is not None:
            raise RuntimeError("the watcher is already running")
        self._callback, self._on_state = callback, on_state
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"store-watch {self.host or '*'}", daemon=True)
        self._thread.start()
        if self.probe_interval > 0:
            self._prober = threading.Thread(target=self._probe, name="store-probe", daemon=True)
            self._prober.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the watch and wait for the thread (the last good policy stays readable)."""
        self._stop.set()
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.close()
        for t in (self._thread, self._prober):
            if t is not None:
                t.join(timeout)
        self._thread = self._prober = None
        self._set_state("stopped")

    def __enter__(self) -> PolicyWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        delay = self.backoff[0]
        resync = not self._loaded
        while not self._stop.is_set():
            stream = None
            try:
                if resync:
                    self._deliver(self._resync())
                    resync = False
                stream = WatchStream(self.client, self.prefix, self._revision + 1)
                with self._lock:
                    self._stream = stream
                    self._connected = self._watching = True
                    self._error = ""
                if self._stop.is_set():
                    break
                self._set_state("invalid" if self._errors else "ok")
                delay = self.backoff[0]
                for revision, events in stream:
                    self._apply(events)
                    self._settle(revision)
                    self._revision = max(self._revision, revision)
                    if self._pending:
                        # an apply is being written in batches: its commit is judged whole
                        self.stats["buffered"] += 1
                        continue
                    self._deliver(self._evaluate(revision))
            except Compacted as exc:
                self.stats["compactions"] += 1
                log.warning("store %s: %s; reading everything again", self.prefix, exc)
                resync = True
            except StoreError as exc:
                if self._stop.is_set():
                    break
                self._unreachable(str(exc))
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff[1])
            except Exception as exc:  # noqa: BLE001 - keep the last good policy whatever happens
                log.exception("store watcher: unexpected error")
                self._unreachable(f"{type(exc).__name__}: {exc}")
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff[1])
            finally:
                with self._lock:
                    self._stream = None
                    self._watching = False
                if stream is not None:
                    stream.close()

    def _unreachable(self, message: str) -> None:
        with self._lock:
            self._connected = False
            self._error = message
            self.stats["reconnects"] += 1
        self.client.rotate()
        if self._state != "unreachable":
            log.warning(
                "store %s: %s; enforcing revision %d until it answers",
                self.prefix,
                message,
                self._policy_revision,
            )
        self._set_state("unreachable")

    def _apply(self, events: list) -> None:
        """Apply one batch of events to what is held: every workload's host, the values of
        the settings, hosts, SA files and the tenants held; the rest is passed over."""
        p = self.prefix
        with self._lock:
            for e in events:
                if not e.kv.key.startswith(p):
                    continue
                rel = e.kv.key[len(p) :]
                value = None if e.type == "DELETE" else e.kv.value
                if rel == layout.PENDING:
                    self._pending = value is not None
                    continue
                rk = layout.parse_key(rel)
                if rk is None:
                    continue
                if rk.section == "workloads":
                    self._set_workload(rel, rk.parts[0], value)
                elif rk.section == layout.SETTINGS:
                    self._untagged = _untagged(value)
                group = layout.group_of(rk)
                if self.host is not None and group != layout.GLOBAL and group not in self._held:
                    continue  # another host's tenant
                if value is None:
                    self._dirty |= self._values.pop(rel, None) is not None
                elif self._values.get(rel) != value:
                    self._values[rel] = value
                    self._dirty = True

    def _settle(self, revision: int) -> None:
        """After a batch: take in the tenants that became this host's (read at ``revision``,
        the state the batch left), let go of those that are no longer."""
        if self.host is None:
            return  # every resource is held
        wanted = self._wanted()
        if wanted == self._held:
            return
        gone, new = self._held - wanted, wanted - self._held
        read = self._read_tenants(new, revision) if new else {}
        with self._lock:
            if gone:
                self._values = {rel: v for rel, v in self._values.items() if _group(rel) not in gone}
            self._values.update({rel: kv.value for rel, kv in read.items()})
            self._held = wanted
            self._dirty = True

    def _probe(self) -> None:
        """Break the stream when its member stops answering (a silent partition)."""
        failures = 0
        while not self._stop.wait(self.probe_interval):
            with self._lock:
                stream = self._stream
            if stream is None:
                failures = 0
                continue
            if stream.probe(timeout=max(1.0, self.probe_interval)):
                failures = 0
                continue
            failures += 1
            if failures >= 2:
                failures = 0
                stream.close(broken=f"etcd at {stream.url} stopped answering")
