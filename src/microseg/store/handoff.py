"""Conntrack handoff through the store: a workload's connections, from the host it left to the
host it moved to (docs/store.md, "Workload moves").

The old host's agent writes ``handoff/<tenant>/<name>`` (``<tenant>/<namespace>/<name>`` for a
workload in a Kubernetes namespace: the workload as ``qualified`` names it) under a lease of
:data:`HANDOFF_TTL_S` seconds, so a handoff nobody takes disappears by itself; the new host's
agent reads it, deletes it and imports the entries. The value is JSON::

    {"format": 1, "workload": "red/b", "from": "h2", "to": "h3", "time": ...,
     "count": 12, "dropped": 0, "entries": "<base64 of a compressed npz>"}

``entries`` holds one array, ``entries``, of conntrack's own entry records
(``ENTRY_DTYPE``, the snapshot's), and ``fields``, their names, so a decoder of another
layout refuses it. At most :data:`MAX_ENTRIES` connections travel (the most recently seen; the
rest are counted in ``dropped`` and picked up mid-stream, where the policy allows, by the new
host): 128 bytes each before compression, well inside etcd's 1.5 MiB request limit.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
import zipfile

import numpy as np

from ..conntrack import kernels as KN
from ..errors import InputError
from .etcd import StoreClient, cmp_mod, op_delete
from .layout import HANDOFF

FORMAT = 1
MAX_ENTRIES = 4096
MAX_VALUE = 1 << 20  # bytes of a value the decoder accepts
HANDOFF_TTL_S = 300
_FIELDS = list(KN.ENTRY_DTYPE.names or ())


def handoff_key(prefix: str, workload: str) -> str:
    return f"{prefix}{HANDOFF}{workload}"


def encode(entries: np.ndarray, *, workload: str, from_host: str, to_host: str) -> bytes:
    """The handoff value for ``entries`` (a structured array of ``ENTRY_DTYPE``)."""
    entries = np.asarray(entries)
    if entries.dtype != KN.ENTRY_DTYPE:
        raise ValueError("entries must be conntrack entry records")
    dropped = 0
    if entries.shape[0] > MAX_ENTRIES:
        # keep the connections whose deadline lies furthest ahead (the most recently seen)
        keep = np.argsort(entries["deadline"])[-MAX_ENTRIES:]
        dropped = int(entries.shape[0] - MAX_ENTRIES)
        entries = entries[np.sort(keep)]
    buf = io.BytesIO()
    np.savez_compressed(buf, entries=entries, fields=np.array(_FIELDS))
    doc = {
        "format": FORMAT,
        "workload": workload,
        "from": from_host,
        "to": to_host,
        "time": time.time(),
        "count": int(entries.shape[0]),
        "dropped": dropped,
        "entries": base64.b64encode(buf.getvalue()).decode("ascii"),
    }
    return json.dumps(doc, sort_keys=True).encode()


def decode(value: bytes, workload: str | None = None) -> tuple[dict, np.ndarray]:
    """``(metadata, entries)`` of a handoff value; InputError, saying why, for anything that
    is not a handoff this version wrote (for ``workload``, when given)."""
    if len(value) > MAX_VALUE:
        raise InputError(f"handoff: {len(value)} bytes, more than {MAX_VALUE}")
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"handoff: not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("entries"), str):
        raise InputError(f"handoff: not a handoff of format {FORMAT}")
    if workload is not None and doc.get("workload") != workload:
        raise InputError(f"handoff: for workload {doc.get('workload')!r}, not {workload!r}")
    try:
        raw = base64.b64decode(doc["entries"], validate=True)
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            entries, fields = z["entries"], z["fields"]
    except (binascii.Error, ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"handoff: the entries do not decode ({exc.__class__.__name__})") from None
    if entries.dtype != KN.ENTRY_DTYPE or list(fields) != _FIELDS or entries.ndim != 1:
        raise InputError("handoff: entries of another conntrack layout or version")
    if entries.shape[0] > MAX_ENTRIES:
        raise InputError(f"handoff: {entries.shape[0]} entries, more than {MAX_ENTRIES}")
    meta = {k: v for k, v in doc.items() if k != "entries"}
    return meta, entries


def write(client: StoreClient, prefix: str, workload: str, value: bytes, ttl: int = HANDOFF_TTL_S) -> int:
    """Put the handoff under a lease of ``ttl`` seconds; the store revision."""
    lease = client.grant(ttl)
    return client.put(handoff_key(prefix, workload), value, lease=lease)


def take(client: StoreClient, prefix: str, workload: str) -> bytes | None:
    """Read and delete the workload's handoff in one step (None: there is none yet). The
    delete is guarded by the value's revision, so a handoff written in between stays."""
    key = handoff_key(prefix, workload)
    kv = client.get(key)
    if kv is None:
        return None
    ok, _rev = client.txn([cmp_mod(key, "EQUAL", kv.mod_revision)], [op_delete(key)])
    return kv.value if ok else None
