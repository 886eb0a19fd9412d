"""The ESP tunnel gateway as a pipeline stage: SA state plus ``encrypt_batch`` / ``decrypt_batch``.

State per SA lives in NumPy arrays (send sequence counter, IV counter, receive window, lifetime
counters) so the kernels in :mod:`microseg.ipsec.esp` update it in place. The AEAD back end is
OpenSSL's EVP called from the compiled loop when a libcrypto is found (``backend="evp"``), else
``cryptography``'s ``AESGCM`` once per packet (``backend="cryptography"``); both give the same
bytes. ``bench/ipsec.py`` measures the two.

IVs are a per-SA 64-bit counter: it never repeats within a gateway (the SA stops before its
sequence counter wraps) and starts at a random value for each gateway, so two gateways keyed
from the same static SA file (e.g. two runs of ``microseg ipsec encrypt``) are unlikely to
reuse a (key, nonce) pair. Static keys are for tests and labs; deployments rekey per SA.

Lifetimes (RFC 4301 4.4.2.1) are counted by the kernels; the gateway turns their new-event
bits into :class:`LifetimeEvent` records (``events``, ``event_counts``, the ``on_event``
callback), offers :meth:`EspGateway.expire` as the timer, and installs and removes SAs at run
time for a make-before-break rekey (:meth:`EspGateway.rekey`, :meth:`EspGateway.remove_sa`).
ESN re-synchronisation (RFC 4303 A3) retries a packet with the next high-order values once an
SA's count of consecutive authentication failures reaches its trigger.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..packet.batch import LINK_ETHERNET, LINK_RAW, Batch, text_to_addr
from . import esp, evp
from .esp import (
    DIR_CLOCK,
    DIR_DECRYPT,
    DIR_ENCRYPT,
    F_HARD,
    F_HARD_NEW,
    F_SOFT,
    F_SOFT_NEW,
    F_STARTED,
    L_FLAGS,
    L_HARD_AT,
    L_RX_FAIL,
    L_SOFT_AT,
    L_START,
    L_WHY,
    N_REASONS,
    REASONS,
)
from .sa import ACTION_PROTECT, SAConfig, SecurityAssociation, seconds_ns

try:  # cryptography >= 45 writes into a caller's buffer
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM as _AESGCM

    _HAS_INTO = hasattr(_AESGCM, "encrypt_into") and hasattr(_AESGCM, "decrypt_into")
except ImportError:  # pragma: no cover
    _HAS_INTO = False

_ALL = (1 << 128) - 1
_U64 = (1 << 64) - 1


def _prefix_arrays(net):
    if net is None:
        return (0, 0), (0, 0)
    if net.version == 4:
        value = (0xFFFF << 32) | int(net.network_address)
        plen = 96 + net.prefixlen
    else:
        value, plen = int(net.network_address), net.prefixlen
    mask = _ALL ^ ((1 << (128 - plen)) - 1)
    return (value >> 64, value & _U64), (mask >> 64, mask & _U64)


_LIMITS = {esp.WHY_BYTES: "bytes", esp.WHY_PACKETS: "packets", esp.WHY_SECONDS: "seconds"}
_DIRS = {DIR_ENCRYPT: "encrypt", DIR_DECRYPT: "decrypt", DIR_CLOCK: "clock"}


@dataclass(frozen=True)
class LifetimeEvent:
    """A soft or hard expiry of one SA (RFC 4301 4.4.2.1): which limit, in which direction
    (``clock``: found by :meth:`EspGateway.expire`), at which timestamp (ns)."""

    kind: str  # "soft" | "hard"
    sa: str
    spi: int
    limit: str  # "bytes" | "packets" | "seconds"
    direction: str  # "encrypt" | "decrypt" | "clock"
    at: int

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "sa": self.sa,
            "spi": self.spi,
            "limit": self.limit,
            "direction": self.direction,
            "at": self.at,
        }


def _limits_row(sa: SecurityAssociation) -> list:
    row = [0] * esp.N_LIMITS
    row[esp.LIM_HARD_BYTES], row[esp.LIM_SOFT_BYTES] = sa.hard_bytes, sa.soft_bytes
    row[esp.LIM_HARD_PKTS], row[esp.LIM_SOFT_PKTS] = sa.hard_packets, sa.soft_packets
    row[esp.LIM_HARD_NS] = seconds_ns(sa.hard_seconds)
    row[esp.LIM_SOFT_NS] = seconds_ns(sa.soft_seconds)
    row[esp.LIM_RESYNC_AFTER], row[esp.LIM_RESYNC_TRIES] = sa.resync_after, sa.resync_tries
    return row


def _remap_bitmap(row, top: int, window: int, words: int) -> np.ndarray:
    """A receive window's bits laid out again for a ring of ``words`` 64-bit words."""
    new = np.zeros(words, np.uint64)
    nb_old, nb_new = row.shape[0] * 64, words * 64
    for d in range(min(window, top)):
        seq = top - d
        b = seq % nb_old
        if (int(row[b >> 6]) >> (b & 63)) & 1:
            c = seq % nb_new
            new[c >> 6] |= np.uint64(1 << (c & 63))
    return new


def _check_linktype(batch):
    if batch.linktype not in (LINK_ETHERNET, LINK_RAW):
        raise InputError(f"ESP needs Ethernet or raw IP packets, not link type {batch.linktype}")


class EspGateway:
    """ESP tunnel endpoint for the SAs of one :class:`~microseg.ipsec.sa.SAConfig`.

    ``now`` (ns) starts every SA's lifetime clock at installation; without it, an SA's clock
    starts at its first packet. ``on_event(event)`` is called for each :class:`LifetimeEvent`
    after the batch (or :meth:`expire` call) that caused it; ``events`` keeps them all.
    """

    # per-SA arrays, laid out by _build
    sa_window: np.ndarray
    tx_seq: np.ndarray
    iv_base: np.ndarray
    dead: np.ndarray
    life: np.ndarray
    rx_top: np.ndarray
    rx_bitmap: np.ndarray

    def __init__(self, config: SAConfig, backend: str = "auto", now: int | None = None, on_event=None):
        if backend == "auto":
            backend = "evp" if evp.AVAILABLE else "cryptography"
        if backend == "evp" and not evp.AVAILABLE:
            raise RuntimeError(f"EVP back end unavailable: {evp.REASON}")
        if backend not in ("evp", "cryptography"):
            raise ValueError(f"unknown AEAD back end {backend!r}")
        self.backend = backend
        self.config = config
        self.on_event = on_event
        self.events: list[LifetimeEvent] = []
        self.event_counts = {"soft": 0, "hard": 0}
        self.successor: dict[str, str] = {}  # rekeyed SA name -> the SA that replaced it
        self.tx_drops = np.zeros(N_REASONS, np.int64)
        self.rx_drops = np.zeros(N_REASONS, np.int64)
        self.resync_counts = {"attempts": 0, "resynchronised": 0}
        # SPD (the SA of each protect policy is found again after every rekey)
        pols = config.policies
        m = len(pols)
        self._pol_names = [p.sa if p.action == ACTION_PROTECT else None for p in pols]
        self.pol_src = np.zeros((m, 2), np.uint64)
        self.pol_smask = np.zeros((m, 2), np.uint64)
        self.pol_dst = np.zeros((m, 2), np.uint64)
        self.pol_dmask = np.zeros((m, 2), np.uint64)
        self.pol_proto = np.array([p.proto for p in pols], np.int64)
        self.pol_action = np.array([p.action for p in pols], np.int64)
        for k, p in enumerate(pols):
            (self.pol_src[k], self.pol_smask[k]) = _prefix_arrays(p.src)
            (self.pol_dst[k], self.pol_dmask[k]) = _prefix_arrays(p.dst)
        self._scratch = np.zeros(4, np.int32)
        self.sas: list[SecurityAssociation] = []
        self._build(list(config.sas), [-1] * len(config.sas), now)

    def __repr__(self) -> str:
        return f"<EspGateway {len(self.names)} SAs, {len(self.config.policies)} policies, {self.backend}>"

    def action_for(self, src: str, dst: str, proto: int) -> tuple[int, str | None]:
        """The security policy database's answer for an outbound packet ``src`` -> ``dst`` of
        protocol ``proto``, as :meth:`encrypt_batch` finds it (first match wins, no match:
        discard): ``(action, SA name)`` with the ``ACTION_*`` codes of :mod:`.sa`."""
        from .sa import ACTION_DISCARD

        s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        for p in self.config.policies:
            if p.src is not None and (p.src.version != s.version or s not in p.src):
                continue
            if p.dst is not None and (p.dst.version != d.version or d not in p.dst):
                continue
            if p.proto >= 0 and p.proto != proto:
                continue
            return p.action, p.sa
        return ACTION_DISCARD, None

    # -- the SA table ---------------------------------------------------------------------------
    def _build(self, sas: list, rows: list, now) -> None:
        """Lay out the SA arrays for ``sas``; ``rows[k]`` is the current index whose state SA k
        keeps, or -1 for a new SA (fresh counters, clock started at ``now`` if given)."""
        n = len(sas)
        old: tuple[np.ndarray, ...] | None = None
        if self.sas:
            old = (
                self.tx_seq,
                self.iv_base,
                self.dead,
                self.life,
                self.rx_top,
                self.rx_bitmap,
                self.sa_window,
            )
        self.sas = list(sas)
        self.names = [sa.name for sa in sas]
        self.sa_spi = np.array([sa.spi for sa in sas], np.uint64)
        self.sa_ver = np.array([sa.ip_version for sa in sas], np.int64)
        self.sa_esn = np.array([sa.esn for sa in sas], np.uint8)
        self.sa_window = np.array([sa.replay_window for sa in sas], np.int64)
        self.sa_salt = np.array([list(sa.salt) for sa in sas], np.uint8).reshape(n, 4)
        self.sa_src = np.zeros((n, 16), np.uint8)
        self.sa_dst = np.zeros((n, 16), np.uint8)
        self.sa_dhi = np.zeros(n, np.uint64)
        self.sa_dlo = np.zeros(n, np.uint64)
        for k, sa in enumerate(sas):
            s, d = ipaddress.ip_address(sa.tunnel_src).packed, ipaddress.ip_address(sa.tunnel_dst).packed
            self.sa_src[k, : len(s)] = list(s)
            self.sa_dst[k, : len(d)] = list(d)
            self.sa_dhi[k], self.sa_dlo[k] = text_to_addr(sa.tunnel_dst)
        self.sa_limits = np.array([_limits_row(sa) for sa in sas], np.uint64).reshape(n, esp.N_LIMITS)
        order = np.argsort(self.sa_spi, kind="stable")
        self.spi_sorted = self.sa_spi[order].copy()
        self.spi_idx = order.astype(np.int64)
        # mutable state
        self.tx_seq = np.zeros(n, np.uint64)
        self.iv_base = np.frombuffer(os.urandom(8 * n), np.uint64).copy()
        self.dead = np.zeros(n, np.uint8)
        self.life = np.zeros((n, esp.N_LIFE), np.uint64)
        self.rx_top = np.zeros(n, np.uint64)
        words = max(1, max((-(-sa.replay_window // 64) for sa in sas), default=1))
        self.rx_bitmap = np.zeros((n, words), np.uint64)
        for k, r in enumerate(rows):
            if r < 0:
                if now is not None:
                    self.life[k, L_START] = np.int64(now).astype(np.uint64)
                    self.life[k, L_FLAGS] = F_STARTED
                continue
            assert old is not None  # rows >= 0 name SAs of the previous layout
            o_seq, o_iv, o_dead, o_life, o_top, o_bm, o_win = old
            self.tx_seq[k], self.iv_base[k], self.dead[k] = o_seq[r], o_iv[r], o_dead[r]
            self.life[k] = o_life[r]
            self.rx_top[k] = o_top[r]
            if o_bm.shape[1] == words:
                self.rx_bitmap[k] = o_bm[r]
            else:  # the ring's size changed with the set of SAs: same bits, new places
                self.rx_bitmap[k] = _remap_bitmap(o_bm[r], int(o_top[r]), int(o_win[r]), words)
        self._keys = [sa.key for sa in sas]
        self._enc = self._dec = None
        self._resync_any = any(sa.resync_after for sa in sas)
        self.pol_sa = np.array(
            [-1 if nm is None else self._outbound(nm, missing=-1) for nm in self._pol_names], np.int64
        )

    def _chain(self, name: str) -> list:
        chain, seen = [name], {name}
        while chain[-1] in self.successor and self.successor[chain[-1]] not in seen:
            chain.append(self.successor[chain[-1]])
            seen.add(chain[-1])
        return chain

    def _outbound(self, name: str, missing=None):
        """Index of the SA that outbound traffic for ``name`` uses now: the newest installed SA
        of its rekey chain."""
        for nm in reversed(self._chain(name)):
            if nm in self.names:
                return self.names.index(nm)
        if missing is not None:
            return missing
        raise KeyError(name)

    def _check_new(self, sas, leaving=()) -> None:
        names = {n for n in self.names if n not in leaving}
        spis = {(sa.tunnel_dst, sa.spi): sa.name for sa in self.sas if sa.name not in leaving}
        for sa in sas:
            if not isinstance(sa, SecurityAssociation):
                raise TypeError(f"expected a SecurityAssociation, got {type(sa).__name__}")
            if sa.name in names:
                raise ValueError(f"an SA named {sa.name!r} is already installed")
            if (sa.tunnel_dst, sa.spi) in spis:
                raise ValueError(
                    f"SPI {sa.spi:#x} to {sa.tunnel_dst} is already used by {spis[(sa.tunnel_dst, sa.spi)]!r}"
                )
            if sa.ip_version != ipaddress.ip_address(sa.tunnel_dst).version:
                raise ValueError(f"SA {sa.name!r}: tunnel addresses of different IP versions")
            names.add(sa.name)
            spis[(sa.tunnel_dst, sa.spi)] = sa.name

    def add_sa(self, sa: SecurityAssociation, now: int | None = None) -> int:
        """Install one more SA (inbound at once; outbound when named or rekeyed to)."""
        self._check_new([sa])
        self._build(self.sas + [sa], list(range(len(self.sas))) + [-1], now)
        return len(self.sas) - 1

    def rekey(self, pairs: dict, now: int | None = None) -> None:
        """Make-before-break rekey: ``pairs`` maps installed SA names to their replacements
        (typically both SAs of a pair, outbound and inbound). The new SAs are installed;
        outbound traffic that used an old SA (its policies, or ``sa=`` naming it) switches to
        its replacement; inbound accepts the old and the new SPIs until the old SA is removed
        (:meth:`remove_sa`) or reaches a hard limit."""
        new = list(pairs.values())
        for old in pairs:
            if old not in self.names:
                raise KeyError(old)
            if old in self.successor:
                raise ValueError(
                    f"SA {old!r} was already replaced by {self.successor[old]!r}: rekey that one"
                )
        self._check_new(new)
        self.successor.update({old: sa.name for old, sa in pairs.items()})
        self._build(self.sas + new, list(range(len(self.sas))) + [-1] * len(new), now)

    def remove_sa(self, name: str) -> None:
        """Remove an SA: its SPI is unknown from now on (the break after the make)."""
        if name not in self.names:
            raise KeyError(name)
        keep = [k for k, nm in enumerate(self.names) if nm != name]
        names = [self.names[k] for k in keep]
        for pol, nm in zip(self.config.policies, self._pol_names):
            if nm is not None and not any(x in names for x in self._chain(nm)):
                raise ValueError(
                    f"policy {pol.name!r} protects with {name!r}, which no installed "
                    f"SA replaces: rekey it first"
                )
        self._build([self.sas[k] for k in keep], keep, None)

    def sa_index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(name) from None

    # -- AEAD contexts, made on first use ------------------------------------------------------
    def _contexts(self, encrypt: bool):
        attr = "_enc" if encrypt else "_dec"
        if getattr(self, attr) is None:
            if self.backend == "evp":
                ctxs = [evp.Context(k, encrypt) for k in self._keys]
                ptrs = np.array([c.ptr for c in ctxs], np.intp)
                setattr(self, attr, (ctxs, ptrs))
            else:
                from cryptography.hazmat.primitives.ciphers.aead import AESGCM

                setattr(self, attr, ([AESGCM(k) for k in self._keys], None))
        return getattr(self, attr)

    # -- lifetime events -----------------------------------------------------------------------
    def _collect_events(self) -> list:
        """Turn the kernels' new-event bits into LifetimeEvents, in the order of their
        timestamps (an SA's soft event before its hard one; equal times: SA order)."""
        new = []
        flags = self.life[:, L_FLAGS]
        for k in np.flatnonzero(flags & np.uint64(F_SOFT_NEW | F_HARD_NEW)).tolist():
            fl, why = int(self.life[k, L_FLAGS]), int(self.life[k, L_WHY])
            for kind, bit, cause, col in (
                ("soft", F_SOFT_NEW, why & 0xFF, L_SOFT_AT),
                ("hard", F_HARD_NEW, (why >> 8) & 0xFF, L_HARD_AT),
            ):
                if fl & bit:
                    at = int(self.life[k, col].astype(np.int64))
                    new.append(
                        LifetimeEvent(
                            kind,
                            self.names[k],
                            int(self.sa_spi[k]),
                            _LIMITS[cause & 0xF],
                            _DIRS[cause & 0xF0],
                            at,
                        )
                    )
                    self.event_counts[kind] += 1
            self.life[k, L_FLAGS] = fl & ~(F_SOFT_NEW | F_HARD_NEW)
        new.sort(key=lambda e: e.at)  # stable: an SA's soft event stays before its hard
        self.events.extend(new)
        if self.on_event is not None:
            for ev in new:
                self.on_event(ev)
        return new

    def pop_events(self) -> list:
        """The events so far, oldest first; the list starts again empty."""
        out, self.events = self.events, []
        return out

    def expire(self, now: int) -> list:
        """Apply the seconds lifetimes at ``now`` (ns) to every SA whose clock has started, as
        a timer would between packets; returns the new events."""
        if esp.expire_at(self.life, self.sa_limits, np.int64(now)):
            return self._collect_events()
        return []

    @staticmethod
    def _times(batch: Batch, now):
        return batch.ts if now is None else np.full(len(batch), now, np.int64)

    # -- stage functions ------------------------------------------------------------------------
    def encrypt_batch(
        self, batch: Batch, sa: str | int | None = None, return_reasons: bool = False, now: int | None = None
    ):
        """Encapsulate a batch of inner packets; returns the ESP batch (dropped packets left out).

        ``sa`` forces one SA for every packet (after a rekey, a name means its replacement);
        otherwise the policies decide (no match: drop). With ``return_reasons`` the
        per-input-packet reason codes come back too. ``now`` (ns) stands for every packet's
        timestamp in the seconds lifetimes.
        """
        _check_linktype(batch)
        forced = -1 if sa is None else (sa if isinstance(sa, int) else self._outbound(sa))
        ts = self._times(batch, now)
        if self.backend == "evp":
            _, ptrs = self._contexts(True)
            out, off, ln, wl, pt, t, reason, bad, events = esp.encrypt_evp(
                ptrs,
                self._scratch,
                self.tx_drops,
                batch.port,
                batch.ts,
                ts,
                batch.data,
                batch.offset,
                batch.length,
                int(batch.linktype),
                forced,
                self.pol_src,
                self.pol_smask,
                self.pol_dst,
                self.pol_dmask,
                self.pol_proto,
                self.pol_action,
                self.pol_sa,
                self.sa_spi,
                self.sa_ver,
                self.sa_esn,
                self.sa_salt,
                self.sa_src,
                self.sa_dst,
                self.sa_limits,
                self.tx_seq,
                self.iv_base,
                self.life,
                self.dead,
            )
            if bad:
                raise RuntimeError("EVP encryption failed")
            if events:
                self._collect_events()
            res = Batch(out, off, ln, wl, pt, t, batch.linktype)
            return (res, reason) if return_reasons else res
        (out, out_off, out_len, reason, sa_of, nonce, aad, aad_len, enc_off, enc_len) = esp.encap_prepare(
            batch.data,
            batch.offset,
            batch.length,
            int(batch.linktype),
            forced,
            self.pol_src,
            self.pol_smask,
            self.pol_dst,
            self.pol_dmask,
            self.pol_proto,
            self.pol_action,
            self.pol_sa,
            self.sa_spi,
            self.sa_ver,
            self.sa_esn,
            self.sa_salt,
            self.sa_src,
            self.sa_dst,
            self.sa_limits,
            self.tx_seq,
            self.iv_base,
            self.life,
            self.dead,
            ts,
        )
        self._seal(out, sa_of, nonce, aad, aad_len, enc_off, enc_len)
        res = self._result(batch, out, out_off, out_len, reason, self.tx_drops)
        if esp.pending_events(self.life):
            self._collect_events()
        return (res, reason) if return_reasons else res

    def _seal(self, out, sa_of, nonce, aad, aad_len, enc_off, enc_len):
        """AEAD pass: encrypt each region in place, tag after it (sa_of < 0: skip)."""
        if self.backend == "evp":
            _, ptrs = self._contexts(True)
            if esp.seal_evp(ptrs, sa_of, out, enc_off, enc_len, nonce, aad, aad_len, self._scratch):
                raise RuntimeError("EVP encryption failed")
            return
        aeads, _ = self._contexts(True)
        mv, nmv, amv = memoryview(out), memoryview(nonce.reshape(-1)), memoryview(aad.reshape(-1))
        eo, el, so, al = enc_off.tolist(), enc_len.tolist(), sa_of.tolist(), aad_len.tolist()
        for i in np.flatnonzero(sa_of >= 0).tolist():
            a, b, k, aead = eo[i], eo[i] + el[i], 12 * i, aeads[so[i]]
            if _HAS_INTO:  # in place, as the EVP path does
                aead.encrypt_into(nmv[k : k + 12], mv[a:b], amv[k : k + al[i]], mv[a : b + esp.ICV_LEN])
            else:
                mv[a : b + esp.ICV_LEN] = aead.encrypt(nmv[k : k + 12], mv[a:b], amv[k : k + al[i]])

    def _open(self, batch, reason, sa_of, ct_src, ct_len, out, out_off, l2len, nonce, aad, aad_len):
        """AEAD pass: decrypt each ciphertext into the output buffer; 1 where the tag verified."""
        if self.backend == "evp":
            _, ptrs = self._contexts(False)
            return esp.open_evp(
                ptrs,
                reason,
                sa_of,
                batch.data,
                ct_src,
                ct_len,
                out,
                out_off,
                l2len,
                nonce,
                aad,
                aad_len,
                self._scratch,
            )
        from cryptography.exceptions import InvalidTag

        aeads, _ = self._contexts(False)
        ok = np.zeros(len(reason), np.uint8)
        dmv, mv = memoryview(batch.data), memoryview(out)
        nmv, amv = memoryview(nonce.reshape(-1)), memoryview(aad.reshape(-1))
        cs, cl, so, al = ct_src.tolist(), ct_len.tolist(), sa_of.tolist(), aad_len.tolist()
        dst = (out_off + l2len).tolist()
        for i in np.flatnonzero(reason == esp.OK).tolist():
            a, m, k, q, aead = cs[i], cl[i], 12 * i, dst[i], aeads[so[i]]
            try:
                if _HAS_INTO:
                    aead.decrypt_into(
                        nmv[k : k + 12], dmv[a : a + m + esp.ICV_LEN], amv[k : k + al[i]], mv[q : q + m]
                    )
                else:
                    mv[q : q + m] = aead.decrypt(
                        nmv[k : k + 12], dmv[a : a + m + esp.ICV_LEN], amv[k : k + al[i]]
                    )
            except InvalidTag:
                continue
            ok[i] = 1
        return ok

    def decrypt_batch(self, batch: Batch, details: bool = False, now: int | None = None):
        """Decapsulate a batch of ESP packets: (inner packets, reason code per input packet).

        With ``details`` a third item maps ``seq`` (64-bit), ``iv``, ``pad_length``,
        ``next_header`` and ``plaintext`` (the whole decrypted ESP payload, or None) to one
        entry per input packet; for tests and tracing, not the hot path. ``now`` (ns) stands
        for every packet's timestamp in the seconds lifetimes.
        """
        _check_linktype(batch)
        ts = self._times(batch, now)
        if self.backend == "evp" and not details and not self._resync_any:
            _, ptrs = self._contexts(False)
            out, off, ln, wl, pt, t, reason, events = esp.decrypt_evp(
                ptrs,
                self._scratch,
                self.rx_drops,
                batch.port,
                batch.ts,
                ts,
                batch.data,
                batch.offset,
                batch.length,
                int(batch.linktype),
                self.spi_sorted,
                self.spi_idx,
                self.sa_ver,
                self.sa_dhi,
                self.sa_dlo,
                self.sa_esn,
                self.sa_window,
                self.sa_salt,
                self.sa_limits,
                self.rx_top,
                self.rx_bitmap,
                self.life,
            )
            if events:
                self._collect_events()
            return Batch(out, off, ln, wl, pt, t, batch.linktype), reason
        res, reason, info = self._decrypt_steps(batch, ts, details, self.rx_drops, True)
        if esp.pending_events(self.life):
            self._collect_events()
        return (res, reason, info) if details else (res, reason)

    def _decrypt_steps(self, batch, ts, details, counts, allow_resync):
        """decrypt_batch one pass at a time: prepare, AEAD, finish (stopping for ESN
        re-synchronisation attempts), compact. Returns (batch, reasons, info or None)."""
        (reason, sa_of, seq64, l2len, ct_src, ct_len, out, out_off, nonce, aad, aad_len) = esp.decap_prepare(
            batch.data,
            batch.offset,
            batch.length,
            int(batch.linktype),
            self.spi_sorted,
            self.spi_idx,
            self.sa_ver,
            self.sa_dhi,
            self.sa_dlo,
            self.sa_esn,
            self.sa_window,
            self.sa_salt,
            self.rx_top,
            self.rx_bitmap,
            self.life,
        )
        ok = self._open(batch, reason, sa_of, ct_src, ct_len, out, out_off, l2len, nonce, aad, aad_len)
        n = len(reason)
        info = None
        if details:  # read before decap_finish wipes the plaintext of refused packets
            info = {
                "seq": seq64,
                "iv": nonce[:, 4:].copy(),
                "pad_length": np.full(n, -1, np.int64),
                "next_header": np.full(n, -1, np.int64),
                "plaintext": [None] * n,
            }
            for i in np.flatnonzero(ok):
                q, m = int(out_off[i] + l2len[i]), int(ct_len[i])
                info["plaintext"][i] = out[q : q + m].tobytes()
                info["pad_length"][i], info["next_header"][i] = out[q + m - 2], out[q + m - 1]
        out_len = np.zeros(n, np.int64)
        args = (
            reason,
            ok,
            sa_of,
            seq64,
            l2len,
            ct_len,
            out,
            out_off,
            self.sa_esn,
            self.sa_window,
            self.sa_limits,
            self.rx_top,
            self.rx_bitmap,
            self.life,
            ts,
            out_len,
        )
        stop = esp.decap_finish(*args, 0, allow_resync)
        while stop < n:
            k = stop
            if details:  # it failed under the first guess: no plaintext to show
                info["plaintext"][k] = None
                info["pad_length"][k] = info["next_header"][k] = -1
            got = self._resync(
                batch.slice(k, k + 1), ts[k : k + 1], int(sa_of[k]), int(seq64[k]), details, counts
            )
            if got is None:
                stop = esp.decap_finish(*args, k + 1, True)
                continue
            # re-synchronised at packet k: the rest of the batch is read under the new window
            head = self._result(batch.slice(0, k), out, out_off[:k], out_len[:k], reason[:k], counts)
            if out_off[k] < out.shape[0]:
                out[out_off[k] :] = 0  # plaintext of packets after k, decrypted too early
            rest = self._decrypt_steps(batch.slice(k + 1, n), ts[k + 1 :], details, counts, True)
            parts = [head, got[0], rest[0]]
            reason = np.concatenate([reason[:k], got[1], rest[1]])
            if details:
                info = {
                    key: (
                        np.concatenate([info[key][:k], got[2][key], rest[2][key]])
                        if key != "plaintext"
                        else info[key][:k] + got[2][key] + rest[2][key]
                    )
                    for key in info
                }
            return _concat(parts, batch.linktype), reason, info
        return self._result(batch, out, out_off, out_len, reason, counts), reason, info

    def _resync(self, one: Batch, ts, s: int, seq: int, details: bool, counts):
        """RFC 4303 A3.2: retry one packet that failed authentication with the next high-order
        values of its SA's sequence number (up to the SA's ``tries``), from a window placed just
        before each candidate. The first that authenticates is committed (its window, its
        lifetime counts); if none does, nothing changed but the failure count, which restarts."""
        self.life[s, L_RX_FAIL] = 0
        self.resync_counts["attempts"] += 1
        top, bitmap = self.rx_top[s], self.rx_bitmap[s].copy()
        hi, lo = seq >> 32, seq & 0xFFFFFFFF
        for j in range(1, int(self.sa_limits[s, esp.LIM_RESYNC_TRIES]) + 1):
            if hi + j > 0xFFFFFFFF:
                break
            cand = ((hi + j) << 32) | lo
            self.rx_top[s] = cand - 1
            self.rx_bitmap[s] = 0
            scratch = np.zeros_like(counts)
            got = self._decrypt_steps(one, ts, details, scratch, False)
            if got[1][0] != esp.BAD_ICV:
                counts += scratch
                self.resync_counts["resynchronised"] += 1
                return got
            self.life[s, L_RX_FAIL] = 0
        self.rx_top[s] = top
        self.rx_bitmap[s] = bitmap
        return None

    @staticmethod
    def _result(batch, out, out_off, out_len, reason, counts):
        off, ln, wl, pt, t = esp.compact(reason, out_off, out_len, batch.port, batch.ts, counts)
        return Batch(out, off, ln, wl, pt, t, batch.linktype)

    # -- reporting ------------------------------------------------------------------------------
    def drop_counts(self) -> dict:
        """Drops by reason name, for each direction (only non-zero entries)."""

        def named(a):
            return {REASONS[k]: int(v) for k, v in enumerate(a) if k != esp.OK and v}

        return {"encrypt": named(self.tx_drops), "decrypt": named(self.rx_drops)}

    def sa_stats(self) -> list[dict]:
        """Per-SA counters and lifetime state (never key material)."""
        out = []
        for k, n in enumerate(self.names):
            fl, why = int(self.life[k, L_FLAGS]), int(self.life[k, L_WHY])
            started = bool(fl & F_STARTED)
            out.append(
                {
                    "name": n,
                    "spi": int(self.sa_spi[k]),
                    "tx_packets": int(self.life[k, 0]),
                    "tx_bytes": int(self.life[k, 1]),
                    "rx_packets": int(self.life[k, 2]),
                    "rx_bytes": int(self.life[k, 3]),
                    "tx_seq": int(self.tx_seq[k]),
                    "rx_top": int(self.rx_top[k]),
                    "stopped": bool(self.dead[k]),
                    "started_at": int(self.life[k, L_START].astype(np.int64)) if started else None,
                    "soft_expired": _LIMITS[why & 0xF] if fl & F_SOFT else None,
                    "hard_expired": _LIMITS[(why >> 8) & 0xF] if fl & F_HARD else None,
                    "replaced_by": self.successor.get(n),
                }
            )
        return out


def _concat(parts, linktype) -> Batch:
    parts = [p for p in parts if len(p)]
    if not parts:
        return Batch(
            np.zeros(0, np.uint8),
            np.zeros(0, np.int64),
            np.zeros(0, np.int32),
            np.zeros(0, np.int32),
            np.zeros(0, np.uint16),
            np.zeros(0, np.int64),
            linktype,
        )
    return parts[0] if len(parts) == 1 else Batch.concat(parts, order=None)


def encrypt_batch(batch: Batch, gateway: EspGateway, sa=None) -> Batch:
    """Pipeline stage: ESP-encapsulate ``batch`` with ``gateway``'s SAs and policies."""
    return gateway.encrypt_batch(batch, sa=sa)


def decrypt_batch(batch: Batch, gateway: EspGateway):
    """Pipeline stage: ESP-decapsulate ``batch``; returns (inner batch, reason per packet)."""
    return gateway.decrypt_batch(batch)


def decrypt_inbound(gateway: EspGateway | None, batch: Batch):
    """Replace the ESP packets of ``batch`` by their decrypted inner frames (in place in the
    packet order); packets that fail (bad ICV, replay, unknown SPI...) are dropped and
    counted by the gateway. Returns the batch and its parsed keys: the keys of the packets
    that were not ESP are reused, only the decrypted frames are parsed (they are new
    packets), so the datapath parses nothing again."""
    from ..datapath.slow import subset
    from ..packet import batch as B
    from ..packet.batch import FlowKeys
    from ..packet.parse import parse

    keys = parse(batch)
    if gateway is None:
        return batch, keys
    esp = np.flatnonzero((keys.proto == 50) & ((keys.flags & B.F_ESP) != 0))
    if esp.size == 0:
        return batch, keys
    inner, why = gateway.decrypt_batch(batch.select(esp))
    ok = esp[why == 0]
    keep = np.setdiff1d(np.arange(len(batch)), esp)
    order = np.argsort(np.concatenate([keep, ok]), kind="stable")
    both = B.Batch.concat([batch.select(keep), inner], order=None)
    ikeys = parse(inner)
    n = len(both)
    merged = FlowKeys(max(n, 1))
    merged.n = n
    kept = subset(keys, keep, FlowKeys(max(keep.size, 1)))
    for t in ("u64", "u32", "i32", "u16", "u8"):
        whole = np.concatenate([getattr(kept, t)[:, : keep.size], getattr(ikeys, t)[:, : ikeys.n]], axis=1)
        getattr(merged, t)[:, :n] = whole[:, order]
    return both.select(order), merged
