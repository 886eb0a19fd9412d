"""The agent's view of the store: load once, then watch, fail static.

:class:`PolicyWatcher` reads every resource under the prefix (:meth:`~PolicyWatcher.load`),
keeps them, and watches the prefix from the revision it read, in a thread of its own
(:meth:`~PolicyWatcher.start`). After each batch of events (one gateway message, never part of
a transaction) it works out the keys its host needs (:func:`~microseg.store.layout.host_keys`;
every resource without a host); only when their values changed does it assemble and validate
them and call back with ``(Policy, revision)``, so changes that touch other tenants cost no
recompilation.

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
from .etcd import Compacted, StoreClient, StoreError, WatchStream
from .ops import connect, read_values

log = logging.getLogger("microseg.store")

Callback = Callable[[Policy, int], None]


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
        self._values: dict[str, bytes] = {}  # every resource key -> value, at self._revision
        self._revision = 0  # the last revision processed (the watch resumes after it)
        self._loaded = False
        self._field_cache: dict = {}
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
        self.stats = {"reconnects": 0, "resyncs": 0, "compactions": 0, "recompiles": 0, "skipped": 0}
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
            value = self._values.get(rel)
        if value is None:
            return None
        host = layout.value_field(value, "host")
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
        kvs, revision = read_values(self.client, self.prefix)
        self._values = {rel: kv.value for rel, kv in kvs.items()}
        self._revision = revision
        self._loaded = True
        self.stats["resyncs"] += 1
        with self._lock:
            self._connected = True
            self._error = ""
        return self._evaluate(self._content_revision(kvs, revision))

    def _content_revision(self, kvs: dict, read_revision: int) -> int:
        """The revision a fresh read's policy stands for: the last apply's (the meta key every
        apply writes) or a later write of one of this host's keys -- not the read's own, which
        other hosts' status keys move on."""
        meta = self.client.get(self.prefix + layout.META)
        mods = [kvs[k].mod_revision for k in self._relevant() if k in kvs]
        if meta is not None:
            mods.append(meta.mod_revision)
        return min(max(mods, default=read_revision), read_revision)

    def _relevant(self) -> dict[str, bytes]:
        if self.host is None:
            return dict(self._values)
        keys = layout.host_keys(self._values, self.host, self._field_cache)
        return {k: self._values[k] for k in keys}

    def _evaluate(self, revision: int) -> Policy | None:
        """Judge the relevant values; the new policy when they changed and validate."""
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
                    self._revision = max(self._revision, revision)
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
        for e in events:
            rel = e.kv.key[len(self.prefix) :]
            if not e.kv.key.startswith(self.prefix) or layout.parse_key(rel) is None:
                continue
            if e.type == "DELETE":
                self._values.pop(rel, None)
            else:
                self._values[rel] = e.kv.value

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
