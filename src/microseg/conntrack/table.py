"""`ConntrackTable`: the connection table the pipeline calls, a batch at a time."""

from __future__ import annotations

import os
import secrets
import zipfile

import numpy as np

from ..errors import InputError
from ..packet import batch as B
from ..packet import errors as PE
from ..packet.checksum import l4_checksum_ok
from . import const as K
from . import kernels as KN

SNAPSHOT_FORMAT = 1
_ENTRY_FIELDS = tuple(KN.ENTRY_DTYPE.names or ())


def _index_slots(capacity: int) -> int:
    slots = 1
    while slots < 2 * capacity:
        slots <<= 1
    return max(slots, 16)


def checksum_ok(batch, keys) -> np.ndarray:
    """Per-packet L4 checksum verdict (True where it is right), from the packet module.

    A UDP datagram to a tunnel port whose payload is no tunnel header carries a parse error,
    yet conntrack tracks the datagram itself: its checksum is verified as a plain datagram's.
    """
    ok = np.asarray(l4_checksum_ok(batch, keys), dtype=np.bool_)
    err, tenant = keys.error, keys.tenant
    outer = ((err == PE.TRUNC_TUNNEL) | (err == PE.BAD_TUNNEL)) & (tenant < 0)
    if outer.any():
        k2 = keys.copy()
        k2.u8[B.ERROR, : k2.n][outer] = PE.OK
        ok = ok.copy()
        ok[outer] = np.asarray(l4_checksum_ok(batch, k2), dtype=np.bool_)[outer]
    return ok


class ConntrackTable:
    """Connections in NumPy arrays, tracked by Numba kernels (see the package docstring)."""

    def __init__(
        self,
        capacity: int = 65536,
        timeouts: dict | None = None,
        *,
        default_zone: int = K.UNTAGGED_ZONE,
        tcp_loose: bool = True,
        tcp_be_liberal: bool = False,
        tcp_max_retrans: int = 3,
        checksum: bool = True,
        evict_range: int = 64,
        expire_budget: int = 512,
        seed: int | None = None,
    ):
        capacity = int(capacity)
        if capacity < 1 or capacity > (1 << 30):
            raise ValueError("capacity must be between 1 and 2**30 connections")
        if not 0 <= int(default_zone) < (1 << 32):
            raise ValueError("default_zone must fit in 32 bits")
        if evict_range < 1 or expire_budget < 0 or not 0 <= tcp_max_retrans <= 255:
            raise ValueError("evict_range >= 1, expire_budget >= 0, 0 <= tcp_max_retrans <= 255")
        self.capacity = capacity
        self.params = np.zeros(1, dtype=KN.PARAM_DTYPE)
        p = self.params[0]
        self.timeouts, self.cfg, self.ctr, self.meta = p["T"], p["cfg"], p["ctr"], p["meta"]
        self.timeouts[:] = K.timeout_array(timeouts)
        self.cfg[K.CFG_DEFAULT_ZONE] = int(default_zone)
        self.cfg[K.CFG_TCP_LOOSE] = int(bool(tcp_loose))
        self.cfg[K.CFG_TCP_BE_LIBERAL] = int(bool(tcp_be_liberal))
        self.cfg[K.CFG_TCP_MAX_RETRANS] = int(tcp_max_retrans)
        self.cfg[K.CFG_EVICT_RANGE] = int(evict_range)
        self.cfg[K.CFG_CHECKSUM] = int(bool(checksum))
        self.expire_budget = int(expire_budget)
        slots = _index_slots(capacity)
        # entries (+ scratch + zero template), 64-byte aligned: one 128-byte entry, two lines
        size = (capacity + 2) * KN.ENTRY_DTYPE.itemsize
        raw = np.zeros(size + 64, dtype=np.uint8)
        off = (-raw.ctypes.data) % 64
        self.ents = raw[off : off + size].view(KN.ENTRY_DTYPE)
        self.ents_bytes = self.ents.view(np.uint8)
        # index slots: entry number and 32 hash bits side by side, one cache line for both
        self.slots = np.zeros(slots, dtype=np.dtype([("ent", np.int32), ("hash", np.uint32)]))
        self.slots["ent"] = -1
        self.slot_ent, self.slot_hash = self.slots["ent"], self.slots["hash"]
        self.free = np.arange(capacity - 1, -1, -1, dtype=np.int32)
        self.meta[KN.M_FREE_TOP] = capacity
        self.meta[KN.M_MASK] = slots - 1
        seed = secrets.randbits(62) if seed is None else int(seed)
        self.meta[KN.M_SEED] = seed & ((1 << 62) - 1)
        self.meta[KN.M_CAPACITY] = capacity
        self.last_now = 0

    # -- sizes and counters ----------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.meta[KN.M_COUNT])

    @property
    def default_zone(self) -> int:
        """The zone of untunnelled packets (tenant -1)."""
        return int(self.cfg[K.CFG_DEFAULT_ZONE])

    @property
    def nbytes(self) -> int:
        """Memory held by the table, everything included."""
        return int(self.ents.nbytes + self.slots.nbytes + self.free.nbytes + self.params.nbytes)

    @property
    def bytes_per_entry(self) -> float:
        return self.nbytes / self.capacity

    @property
    def counters(self) -> dict:
        """Invalid-packet reasons and table events, by name."""
        return {name: int(self.ctr[i]) for i, name in enumerate(K.REASONS)}

    @property
    def drops(self) -> dict:
        """Only the per-packet INVALID / drop reasons."""
        return {name: int(self.ctr[i]) for i, name in enumerate(K.REASONS[: K.N_REASONS])}

    # -- the hot path ----------------------------------------------------------------------------
    def process(self, batch, keys, now_ns=None, csum_ok=None, decide=None) -> np.ndarray:
        """Track a parsed batch in packet order; returns one ctstate ``uint8`` per packet.

        ``now_ns`` (scalar or per-packet) defaults to the packets' timestamps; ``csum_ok``
        (bool per packet) defaults to :func:`microseg.packet.checksum.l4_checksum_ok`.

        ``decide`` makes the table commit on allow, as Linux confirms a connection only when
        its first packet has passed every hook (and Open vSwitch only on ``ct(commit)``):
        ``decide(rows)`` gets the indices of packets that may open a connection (each to be
        judged as NEW) and returns one bool per row, True where the packet is allowed. Only
        allowed packets create entries; a denied one is still reported NEW, and the packets
        after it in the batch see the table as if it had never come -- so the states never
        depend on where batches are cut. Without ``decide`` every new connection is committed.
        """
        n = len(keys)
        out = np.zeros(n, dtype=np.uint8)
        if n == 0:
            return out
        if len(batch) < n:
            raise ValueError("keys describe more packets than the batch holds")
        now = self._now(batch, n, now_ns)
        if csum_ok is None:
            csum_ok = checksum_ok(batch, keys) if self.cfg[K.CFG_CHECKSUM] else np.ones(n, np.bool_)
        ok = np.ascontiguousarray(csum_ok, dtype=np.bool_)
        u64, u32, i32, u16, u8 = keys.arrays()
        commit = np.full(n, 1 if decide is None else -1, dtype=np.int8)
        start = 0
        while True:
            stop = KN.process_batch(
                self.ents,
                self.ents_bytes,
                self.slot_ent,
                self.slot_hash,
                self.free,
                self.params,
                u64,
                u32,
                i32,
                u16,
                u8,
                batch.data,
                batch.offset,
                batch.length,
                batch.wire_len,
                ok,
                now,
                commit,
                start,
                n,
                out,
            )
            if stop >= n:
                break
            # Packet ``stop`` would open a connection. Decide it together with every later
            # undecided packet that has no entry yet (one policy call for the rest of the
            # batch); a packet whose entry an earlier one removes stops the kernel again.
            ent = np.empty(n, dtype=np.int64)
            rep = np.empty(n, dtype=np.uint8)
            KN.lookup_batch(
                self.ents,
                self.slot_ent,
                self.slot_hash,
                self.params,
                u64,
                i32,
                u16,
                u8,
                batch.data,
                batch.offset,
                batch.length,
                now,
                stop,
                n,
                ent,
                rep,
            )
            rows = stop + np.flatnonzero((commit[stop:] < 0) & (ent[stop:] < 0))
            if rows.size == 0 or rows[0] != stop:
                rows = np.concatenate(([stop], rows)).astype(np.int64)
            allowed = np.asarray(decide(rows), dtype=np.bool_)
            if allowed.shape != rows.shape:
                raise ValueError("decide must return one bool per row")
            commit[rows] = allowed
            start = stop
        self.last_now = max(self.last_now, int(now[n - 1]))
        if self.expire_budget:
            self.expire(self.expire_budget, self.last_now)
        return out

    def _now(self, batch, n, now_ns):
        if now_ns is None:
            return np.ascontiguousarray(batch.ts[:n], dtype=np.int64)
        now = np.asarray(now_ns, dtype=np.int64)
        if now.ndim == 0:
            return np.full(n, int(now), dtype=np.int64)
        if now.shape[0] < n:
            raise ValueError("now_ns has fewer values than packets")
        return np.ascontiguousarray(now[:n])

    def lookup(self, batch, keys, now_ns=None):
        """(entry index, reply-direction flag) per packet, updating nothing (-1: no entry)."""
        n = len(keys)
        ent = np.full(n, -1, dtype=np.int64)
        rep = np.zeros(n, dtype=np.uint8)
        if n:
            now = self._now(batch, n, now_ns)
            u64, u32, i32, u16, u8 = keys.arrays()
            KN.lookup_batch(
                self.ents,
                self.slot_ent,
                self.slot_hash,
                self.params,
                u64,
                i32,
                u16,
                u8,
                batch.data,
                batch.offset,
                batch.length,
                now,
                0,
                n,
                ent,
                rep,
            )
        return ent, rep.astype(bool)

    def expire(self, budget: int, now_ns: int | None = None) -> int:
        """Visit ``budget`` entries (round robin) and delete the expired ones; bounded work."""
        now = self.last_now if now_ns is None else int(now_ns)
        return int(
            KN.expire(self.ents, self.slot_ent, self.slot_hash, self.free, self.params, int(budget), now)
        )

    # -- inspection and deletion -----------------------------------------------------------------
    def used(self) -> np.ndarray:
        """Indices of the entries in use."""
        return np.flatnonzero(self.ents["status"][: self.capacity] & K.ST_USED)

    def entries(self) -> np.ndarray:
        """A copy of the entries in use (structured array, fields of ``ENTRY_DTYPE``)."""
        return self.ents[self.used()].copy()

    def delete(self, indices) -> int:
        """Delete entries by index (as :meth:`used` / :meth:`lookup` give them)."""
        idx = np.ascontiguousarray(indices, dtype=np.int64)
        return int(KN.delete_entries(self.ents, self.slot_ent, self.slot_hash, self.free, self.params, idx))

    def delete_where(self, predicate) -> int:
        """Delete every connection for which ``predicate(entries) -> bool mask`` is true.

        ``entries`` is the structured array of :meth:`entries`; the policy uses this to cut
        established connections that a new rule set forbids.
        """
        idx = self.used()
        if idx.size == 0:
            return 0
        mask = np.asarray(predicate(self.ents[idx]), dtype=bool)
        if mask.shape != idx.shape:
            raise ValueError("predicate must return one bool per entry")
        return self.delete(idx[mask])

    # -- snapshot / restore ----------------------------------------------------------------------
    def snapshot(self, path) -> int:
        """Write the connections in use (and the settings) to ``path``; returns the count."""
        ents = self.entries()
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "wb") as f:
            np.savez(
                f,
                format=np.int64(SNAPSHOT_FORMAT),
                entries=ents,
                cfg=self.cfg,
                timeouts=self.timeouts,
                counters=self.ctr,
                capacity=np.int64(self.capacity),
                last_now=np.int64(self.last_now),
                fields=np.array(_ENTRY_FIELDS),
            )
        os.replace(tmp, path)
        return int(ents.shape[0])

    @classmethod
    def restore(cls, path, capacity: int | None = None, **kw) -> ConntrackTable:
        """A table holding the connections of a snapshot, continuing exactly where they were."""
        try:
            with np.load(path, allow_pickle=False) as z:
                fmt = int(z["format"])
                ents, cfg, timeouts = z["entries"], z["cfg"], z["timeouts"]
                counters, cap, last_now = z["counters"], int(z["capacity"]), int(z["last_now"])
        except FileNotFoundError:
            raise InputError("no such file", path=str(path)) from None
        except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise InputError(f"not a conntrack snapshot ({exc.__class__.__name__})", path=str(path)) from None
        if (
            fmt != SNAPSHOT_FORMAT
            or ents.dtype != KN.ENTRY_DTYPE
            or cfg.shape != (K.N_CFG,)
            or timeouts.shape != (K.N_TIMEOUTS,)
            or counters.shape != (K.N_COUNTERS,)
        ):
            raise InputError("conntrack snapshot of an unknown format or version", path=str(path))
        cap = max(int(capacity or cap), ents.shape[0], 1)
        t = cls(capacity=cap, **kw)
        if not kw:
            t.cfg[:] = cfg
            t.timeouts[:] = timeouts
        n = ents.shape[0]
        t.ents[:n] = ents
        t.ents["status"][:n] |= K.ST_USED
        t.ctr[:] = counters
        t.last_now = last_now
        KN.rebuild_index(t.ents, t.slot_ent, t.slot_hash, t.free, t.params)
        return t
