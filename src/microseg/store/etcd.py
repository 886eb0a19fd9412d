"""etcd through its HTTP/JSON gateway, with the ``etcd3gw`` client.

:class:`StoreClient` holds one ``etcd3gw`` client per endpoint (``http://host:port``, several
separated by commas for a cluster) and moves to the next endpoint when one does not answer,
so a member going down costs one retry, not an outage. Every call goes through
``etcd3gw.Etcd3Client.post`` on the v3 API (``/kv/range``, ``/kv/txn``, ``/lease/...``) with
etcd3gw's base64 helpers; int64 fields come back as JSON strings and are read with ``int``.

:class:`WatchStream` is the one place that reads a response stream itself: etcd3gw's
``Watcher`` drops the responses that cancel a watch (a start revision that has been
compacted) and the errors that end a stream, so a watch behind a compaction, or on a member
that died, would wait forever without saying so. The stream is opened with the client's own
session and URL, each line is one gateway message, and cancellation and end of stream are
raised (:class:`Compacted`, :class:`StoreUnavailable`) for the watcher to act on.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import etcd3gw
import requests
from etcd3gw import exceptions as gw_exceptions
from etcd3gw.utils import _decode, _encode, _increment_last_byte

from ..errors import MicrosegError

DEFAULT_ENDPOINT = "http://127.0.0.1:2379"
DEFAULT_TIMEOUT = 5.0


class StoreError(MicrosegError):
    """etcd refused a request (the message is etcd's)."""


class StoreUnavailable(StoreError):
    """No endpoint answered."""


class Conflict(StoreError):
    """A guarded transaction found the store changed since it was read."""


RANGES_PER_TXN = 64  # reads in one transaction of StoreClient.ranges (etcd's default limit: 128)


class Compacted(StoreError):
    """A watch asked for a revision that etcd has compacted away."""

    def __init__(self, message: str, compact_revision: int):
        super().__init__(message)
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int = 0
    lease: int = 0


def prefix_end(prefix: str) -> str:
    """The end of the key range that starts with ``prefix`` (etcd's ``range_end``)."""
    return _increment_last_byte(prefix)


def parse_endpoints(endpoint: str) -> list[tuple[str, str, int]]:
    """``[(scheme, host, port)]`` of ``http://h:p[,http://h2:p2...]`` (bare ``h:p`` too)."""
    out = []
    for part in endpoint.split(","):
        part = part.strip()
        if not part:
            continue
        if "://" not in part:
            part = "http://" + part
        u = urlsplit(part)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise StoreError(f"{part!r} is not an etcd endpoint (http://host:port)")
        try:
            port = u.port or 2379
        except ValueError:
            raise StoreError(f"{part!r} has a bad port") from None
        out.append((u.scheme, u.hostname, port))
    if not out:
        raise StoreError("no etcd endpoint given")
    return out


def _etcd_message(exc: gw_exceptions.Etcd3Exception) -> str:
    text = exc.detail_text or ""
    try:
        doc = json.loads(text)
        return str(doc.get("message") or doc.get("error") or text)
    except (ValueError, AttributeError):
        return text.strip() or type(exc).__name__


class StoreClient:
    """etcd on one or more endpoints; requests fail over from one endpoint to the next."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = DEFAULT_TIMEOUT):
        self.endpoint = endpoint
        self.timeout = timeout
        self._clients = [
            etcd3gw.client(host=h, port=p, protocol=s, timeout=timeout, api_path="/v3/")
            for s, h, p in parse_endpoints(endpoint)
        ]
        self._current = 0
        self._lock = threading.Lock()

    @property
    def urls(self) -> list[str]:
        return [c.base_url for c in self._clients]

    def _order(self) -> list:
        with self._lock:
            start = self._current
        n = len(self._clients)
        return [(start + i) % n for i in range(n)]

    def call(self, path: str, payload: dict) -> dict:
        """POST ``payload`` to the v3 API ``path`` on the first endpoint that answers.

        While members answer that they have no leader (an election after a member died),
        the request is tried again for up to ``timeout`` seconds; when no member answers at
        all, :class:`StoreUnavailable` comes at once."""
        deadline = time.monotonic() + self.timeout
        delay = 0.05
        while True:
            last: Exception | None = None
            leaderless = False
            for i in self._order():
                c = self._clients[i]
                try:
                    result = c.post(c.get_url(path), data=json.dumps(payload))
                except (gw_exceptions.ConnectionFailedError, gw_exceptions.ConnectionTimeoutError) as exc:
                    last = exc
                    continue
                except gw_exceptions.Etcd3Exception as exc:
                    msg = _etcd_message(exc)
                    if _unavailable(msg):
                        last, leaderless = exc, True
                        continue
                    raise StoreError(msg) from None
                with self._lock:
                    self._current = i
                return result
            if not leaderless or time.monotonic() + delay > deadline:
                raise StoreUnavailable(f"etcd at {self.endpoint} does not answer ({_short(last)})")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def current(self) -> etcd3gw.Etcd3Client:
        """The etcd3gw client of the endpoint that answered last."""
        with self._lock:
            return self._clients[self._current]

    def rotate(self) -> None:
        """Prefer the next endpoint from now on (after a stream on this one broke)."""
        with self._lock:
            self._current = (self._current + 1) % len(self._clients)

    # -- key-value ------------------------------------------------------------------------------
    def range_prefix(self, prefix: str) -> tuple[list[KV], int]:
        """Every key under ``prefix`` (sorted by key) and the store revision they were read at."""
        r = self.call("/kv/range", {"key": _encode(prefix), "range_end": _encode(prefix_end(prefix))})
        return [_kv(x) for x in r.get("kvs", ())], int(r["header"]["revision"])

    def range(
        self,
        key: str,
        range_end: str | None = None,
        *,
        revision: int = 0,
        keys_only: bool = False,
    ) -> tuple[list[KV], int]:
        """The keys in ``[key, range_end)`` (``key`` alone without ``range_end``), at
        ``revision`` (0: now), and the revision of the read. A revision compacted away raises
        :class:`Compacted`."""
        payload: dict[str, Any] = {"key": _encode(key)}
        if range_end is not None:
            payload["range_end"] = _encode(range_end)
        if revision:
            payload["revision"] = int(revision)
        if keys_only:
            payload["keys_only"] = True
        try:
            r = self.call("/kv/range", payload)
        except StoreError as exc:
            if "compacted" in str(exc) and not isinstance(exc, StoreUnavailable):
                raise Compacted(str(exc), revision) from None
            raise
        return [_kv(x) for x in r.get("kvs", ())], int(r["header"]["revision"])

    def txn_responses(
        self, compare: list, success: list, failure: list | None = None
    ) -> tuple[bool, int, list]:
        """One transaction; ``(succeeded, revision, responses)``, each response etcd's
        (``{"response_range": {...}}`` and so on)."""
        r = self.call("/kv/txn", {"compare": compare, "success": success, "failure": failure or []})
        return bool(r.get("succeeded", False)), int(r["header"]["revision"]), list(r.get("responses", ()))

    def ranges(self, ranges: list[tuple[str, str | None]], revision: int) -> list[list[KV]]:
        """The keys of each ``(key, range_end)`` at ``revision``, in one request (a
        transaction of reads, each pinned to ``revision``). A revision compacted away raises
        :class:`Compacted`."""
        ops = [op_range(k, e, revision=revision) for k, e in ranges]
        out = []
        for i in range(0, len(ops), RANGES_PER_TXN):
            try:
                _ok, _rev, responses = self.txn_responses([], ops[i : i + RANGES_PER_TXN])
            except StoreError as exc:
                if "compacted" in str(exc) and not isinstance(exc, StoreUnavailable):
                    raise Compacted(str(exc), revision) from None
                raise
            out += [range_result(r)[0] for r in responses]
        return out

    def get(self, key: str) -> KV | None:
        r = self.call("/kv/range", {"key": _encode(key)})
        kvs = r.get("kvs")
        return _kv(kvs[0]) if kvs else None

    def put(self, key: str, value: bytes | str, lease: int = 0) -> int:
        payload: dict[str, str | int] = {"key": _encode(key), "value": _encode(value)}
        if lease:
            payload["lease"] = lease
        return int(self.call("/kv/put", payload)["header"]["revision"])

    def delete(self, key: str) -> int:
        return int(self.call("/kv/deleterange", {"key": _encode(key)})["header"]["revision"])

    def txn(self, compare: list, success: list, failure: list | None = None) -> tuple[bool, int]:
        """One transaction; ``(succeeded, revision)``. Operations as :func:`op_put` and friends."""
        r = self.call("/kv/txn", {"compare": compare, "success": success, "failure": failure or []})
        return bool(r.get("succeeded", False)), int(r["header"]["revision"])

    def compact(self, revision: int) -> None:
        self.call("/kv/compaction", {"revision": revision, "physical": True})

    def revision(self) -> int:
        """The store's current revision (a count-only read)."""
        r = self.call("/kv/range", {"key": _encode("\0"), "count_only": True})
        return int(r["header"]["revision"])

    # -- leases ---------------------------------------------------------------------------------
    def grant(self, ttl: int) -> int:
        return int(self.call("/lease/grant", {"TTL": int(ttl), "ID": 0})["ID"])

    def keepalive(self, lease: int) -> int:
        """Refresh ``lease``; its TTL, or -1 when it has expired."""
        r = self.call("/lease/keepalive", {"ID": lease})
        return int(r.get("result", {}).get("TTL", -1))

    def revoke(self, lease: int) -> None:
        self.call("/kv/lease/revoke", {"ID": lease})


def _short(exc: BaseException | None) -> str:
    """The gist of a connection failure ("connection refused", "timed out")."""
    if exc is None:
        return "no endpoint"
    text = _etcd_message(exc) if isinstance(exc, gw_exceptions.Etcd3Exception) else str(exc)
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if m:
        return m.group(1).strip().lower()
    if isinstance(exc, gw_exceptions.ConnectionTimeoutError) or "timed out" in text.lower():
        return "timed out"
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _unavailable(message: str) -> bool:
    """etcd's errors that mean 'ask another member' (no leader, shutting down, timeouts)."""
    m = message.lower()
    return any(
        s in m for s in ("no leader", "stopped", "timed out", "leader changed", "not capable", "unhealthy")
    )


def _kv(x: dict) -> KV:
    return KV(
        _decode(x["key"]).decode("utf-8", "replace"),
        _decode(x.get("value", "")),
        int(x.get("mod_revision", 0)),
        int(x.get("create_revision", 0)),
        int(x.get("lease", 0)),
    )


def op_put(key: str, value: bytes | str, lease: int = 0) -> dict:
    req: dict[str, str | int] = {"key": _encode(key), "value": _encode(value)}
    if lease:
        req["lease"] = lease
    return {"request_put": req}


def op_range(key: str, range_end: str | None = None, *, count_only: bool = False, revision: int = 0) -> dict:
    """A read inside a transaction (see :func:`range_result`), at ``revision`` (0: the
    transaction's)."""
    req: dict[str, Any] = {"key": _encode(key)}
    if range_end is not None:
        req["range_end"] = _encode(range_end)
    if count_only:
        req["count_only"] = True
    if revision:
        req["revision"] = int(revision)
    return {"request_range": req}


def range_result(response: dict) -> tuple[list[KV], int]:
    """The keys and the count of one :func:`op_range`'s response."""
    r = response.get("response_range", {})
    return [_kv(x) for x in r.get("kvs", ())], int(r.get("count", 0))


def op_delete(key: str) -> dict:
    return {"request_delete_range": {"key": _encode(key)}}


def cmp_mod(key: str, result: str, revision: int, range_end: str | None = None) -> dict:
    """Compare the mod revision of ``key`` (or of every key in ``[key, range_end)``)."""
    c = {"key": _encode(key), "target": "MOD", "result": result, "mod_revision": revision}
    if range_end is not None:
        c["range_end"] = _encode(range_end)
    return c


@dataclass
class Event:
    type: str  # "PUT" | "DELETE"
    kv: KV


class WatchStream:
    """A watch on ``[prefix, prefix_end)`` from ``start_revision``; iterate for batches.

    Each item is ``(revision, [Event])``: every event of one gateway message (etcd never splits
    one revision's events across messages), ``revision`` the highest among them. Iteration
    raises :class:`Compacted` when etcd cancels the watch for compaction and
    :class:`StoreUnavailable` when the stream breaks; :meth:`close` ends it from another
    thread.
    """

    def __init__(self, client: StoreClient, prefix: str, start_revision: int, timeout: float = 5.0):
        self.client = client
        c = client.current()
        self.url = c.base_url
        create: dict[str, Any] = {
            "key": _encode(prefix),
            "range_end": _encode(prefix_end(prefix)),
            "start_revision": start_revision,
        }
        self._closed = False
        self._broken = ""
        self._client = c
        try:
            self._resp = c.session.post(
                c.get_url("/watch"),
                json={"create_request": create},
                # etcd's "require leader": a member cut off from the leader cancels the
                # watch instead of leaving it silent (the gateway passes Grpc-Metadata-*)
                headers={"Grpc-Metadata-hasleader": "true"},
                stream=True,
                # etcd answers a watch's creation at once: a member that accepts the
                # connection and then says nothing is as good as down
                timeout=(timeout, timeout),
            )
        except requests.exceptions.RequestException as exc:
            raise StoreUnavailable(f"etcd at {self.url} does not answer: {type(exc).__name__}") from None
        if self._resp.status_code != 200:
            text = self._resp.text
            self._resp.close()
            raise StoreUnavailable(f"etcd at {self.url} refused the watch: {text.strip()[:200]}")
        try:
            # from now on the stream may rightly be idle for hours: no read timeout (the
            # watcher's probe notices a silent member instead)
            self._resp.raw._fp.fp.raw._sock.settimeout(None)
        except AttributeError:
            pass  # another transport: idle streams then break after `timeout` and resume
        # requests reads what has arrived for chunk_size=None; its stubs allow only an int
        self._lines = self._resp.iter_lines(chunk_size=None)  # type: ignore[call-overload]

    def _messages(self) -> Iterator[dict]:
        try:
            for line in self._lines:
                if not line.strip():
                    continue
                doc = json.loads(line)
                if "error" in doc:
                    err = doc["error"]
                    raise StoreUnavailable(f"watch on {self.url}: {err.get('message', err)}")
                yield doc.get("result", {})
        except (requests.exceptions.RequestException, OSError, ValueError, AttributeError) as exc:
            # (AttributeError: urllib3 reading a response whose socket close() took away)
            if self._closed and not self._broken:
                return
            raise StoreUnavailable(
                self._broken or f"the watch stream from {self.url} broke: {type(exc).__name__}"
            ) from None
        if self._broken:
            raise StoreUnavailable(self._broken)

    def __iter__(self) -> Iterator[tuple[int, list]]:
        for msg in self._messages():
            yield from self._batch(msg)
        if not self._closed:
            raise StoreUnavailable(f"the watch stream from {self.url} ended")

    def _batch(self, msg: dict) -> Iterator[tuple[int, list]]:
        if msg.get("canceled"):
            compact = int(msg.get("compact_revision", 0))
            if compact:
                raise Compacted(f"required revision has been compacted (compacted up to {compact})", compact)
            raise StoreUnavailable(f"etcd cancelled the watch: {msg.get('cancel_reason', '')}")
        events = msg.get("events")
        if not events:
            return
        out = [Event(e.get("type", "PUT"), _kv(e["kv"])) for e in events]
        yield max(e.kv.mod_revision for e in out), out

    def probe(self, timeout: float) -> bool:
        """Does the stream's member answer a status request within ``timeout`` seconds?"""
        try:
            r = requests.post(self._client.get_url("/maintenance/status"), json={}, timeout=timeout)
            return r.status_code == 200
        except requests.exceptions.RequestException:
            return False

    def close(self, broken: str = "") -> None:
        """End the stream (safe from another thread, and twice); with ``broken``, the reader
        gets :class:`StoreUnavailable` with that message instead of a quiet end."""
        if self._closed:
            return
        self._broken = broken
        self._closed = True
        try:
            # shut the socket down (through a duplicate of its descriptor, as etcd3gw's own
            # Watcher.stop does) so that a reader blocked in recv() returns at once
            s = socket.fromfd(self._resp.raw._fp.fileno(), socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.shutdown(socket.SHUT_RDWR)
            finally:
                s.close()
        except Exception:  # noqa: BLE001 - already closed, or another transport
            pass
        try:
            self._resp.close()
        except Exception:  # noqa: BLE001
            pass
