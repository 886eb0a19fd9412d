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
"""
from __future__ import annotations

import ipaddress
import os

import numpy as np

from ..errors import InputError
from ..packet.batch import LINK_ETHERNET, LINK_RAW, Batch, text_to_addr
from . import esp, evp
from .esp import N_REASONS, REASONS
from .sa import ACTION_PROTECT, SAConfig

try:   # cryptography >= 45 writes into a caller's buffer
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM as _AESGCM
    _HAS_INTO = hasattr(_AESGCM, "encrypt_into") and hasattr(_AESGCM, "decrypt_into")
except ImportError:     # pragma: no cover
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


def _check_linktype(batch):
    if batch.linktype not in (LINK_ETHERNET, LINK_RAW):
        raise InputError(f"ESP needs Ethernet or raw IP packets, not link type {batch.linktype}")


class EspGateway:
    """ESP tunnel endpoint for the SAs of one :class:`~microseg.ipsec.sa.SAConfig`."""

    def __init__(self, config: SAConfig, backend: str = "auto"):
        if backend == "auto":
            backend = "evp" if evp.AVAILABLE else "cryptography"
        if backend == "evp" and not evp.AVAILABLE:
            raise RuntimeError(f"EVP back end unavailable: {evp.REASON}")
        if backend not in ("evp", "cryptography"):
            raise ValueError(f"unknown AEAD back end {backend!r}")
        self.backend = backend
        self.config = config
        sas = config.sas
        n = len(sas)
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
            self.sa_src[k, :len(s)] = list(s)
            self.sa_dst[k, :len(d)] = list(d)
            self.sa_dhi[k], self.sa_dlo[k] = text_to_addr(sa.tunnel_dst)
        self.sa_limits = np.array([[sa.lifetime_bytes, sa.lifetime_packets] for sa in sas],
                                  np.uint64).reshape(n, 2)
        order = np.argsort(self.sa_spi, kind="stable")
        self.spi_sorted = self.sa_spi[order].copy()
        self.spi_idx = order.astype(np.int64)
        # mutable state
        self.tx_seq = np.zeros(n, np.uint64)
        self.iv_base = np.frombuffer(os.urandom(8 * n), np.uint64).copy()
        self.dead = np.zeros(n, np.uint8)
        self.life = np.zeros((n, 4), np.uint64)
        self.rx_top = np.zeros(n, np.uint64)
        words = max(1, max((-(-sa.replay_window // 64) for sa in sas), default=1))
        self.rx_bitmap = np.zeros((n, words), np.uint64)
        self.tx_drops = np.zeros(N_REASONS, np.int64)
        self.rx_drops = np.zeros(N_REASONS, np.int64)
        # SPD
        pols = config.policies
        m = len(pols)
        self.pol_src = np.zeros((m, 2), np.uint64)
        self.pol_smask = np.zeros((m, 2), np.uint64)
        self.pol_dst = np.zeros((m, 2), np.uint64)
        self.pol_dmask = np.zeros((m, 2), np.uint64)
        self.pol_proto = np.array([p.proto for p in pols], np.int64)
        self.pol_action = np.array([p.action for p in pols], np.int64)
        self.pol_sa = np.array([self.names.index(p.sa) if p.action == ACTION_PROTECT else -1
                                for p in pols], np.int64)
        for k, p in enumerate(pols):
            (self.pol_src[k], self.pol_smask[k]) = _prefix_arrays(p.src)
            (self.pol_dst[k], self.pol_dmask[k]) = _prefix_arrays(p.dst)
        self._scratch = np.zeros(4, np.int32)
        self._keys = [sa.key for sa in sas]
        self._enc = self._dec = None

    def __repr__(self) -> str:
        return f"<EspGateway {len(self.names)} SAs, {len(self.config.policies)} policies, {self.backend}>"

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

    def sa_index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(name) from None

    # -- stage functions ------------------------------------------------------------------------
    def encrypt_batch(self, batch: Batch, sa: str | int | None = None, return_reasons: bool = False):
        """Encapsulate a batch of inner packets; returns the ESP batch (dropped packets left out).

        ``sa`` forces one SA for every packet; otherwise the policies decide (no match: drop).
        With ``return_reasons`` the per-input-packet reason codes come back too.
        """
        _check_linktype(batch)
        forced = -1 if sa is None else (sa if isinstance(sa, int) else self.sa_index(sa))
        if self.backend == "evp":
            _, ptrs = self._contexts(True)
            out, off, ln, wl, pt, t, reason, bad = esp.encrypt_evp(
                ptrs, self._scratch, self.tx_drops, batch.port, batch.ts, batch.data,
                batch.offset, batch.length, int(batch.linktype), forced,
                self.pol_src, self.pol_smask, self.pol_dst, self.pol_dmask, self.pol_proto,
                self.pol_action, self.pol_sa, self.sa_spi, self.sa_ver, self.sa_esn, self.sa_salt,
                self.sa_src, self.sa_dst, self.sa_limits, self.tx_seq, self.iv_base, self.life,
                self.dead)
            if bad:
                raise RuntimeError("EVP encryption failed")
            res = Batch(out, off, ln, wl, pt, t, batch.linktype)
            return (res, reason) if return_reasons else res
        (out, out_off, out_len, reason, sa_of, nonce, aad, aad_len, enc_off, enc_len) = \
            esp.encap_prepare(batch.data, batch.offset, batch.length, int(batch.linktype), forced,
                              self.pol_src, self.pol_smask, self.pol_dst, self.pol_dmask,
                              self.pol_proto, self.pol_action, self.pol_sa,
                              self.sa_spi, self.sa_ver, self.sa_esn, self.sa_salt, self.sa_src,
                              self.sa_dst, self.sa_limits, self.tx_seq, self.iv_base, self.life,
                              self.dead)
        self._seal(out, sa_of, nonce, aad, aad_len, enc_off, enc_len)
        res = self._result(batch, out, out_off, out_len, reason, self.tx_drops)
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
            if _HAS_INTO:   # in place, as the EVP path does
                aead.encrypt_into(nmv[k:k + 12], mv[a:b], amv[k:k + al[i]], mv[a:b + esp.ICV_LEN])
            else:
                mv[a:b + esp.ICV_LEN] = aead.encrypt(nmv[k:k + 12], mv[a:b], amv[k:k + al[i]])

    def decrypt_batch(self, batch: Batch, details: bool = False):
        """Decapsulate a batch of ESP packets: (inner packets, reason code per input packet).

        With ``details`` a third item maps ``seq`` (64-bit), ``iv``, ``pad_length``,
        ``next_header`` and ``plaintext`` (the whole decrypted ESP payload, or None) to one
        entry per input packet; for tests and tracing, not the hot path.
        """
        _check_linktype(batch)
        if self.backend == "evp" and not details:
            _, ptrs = self._contexts(False)
            out, off, ln, wl, pt, t, reason = esp.decrypt_evp(
                ptrs, self._scratch, self.rx_drops, batch.port, batch.ts, batch.data,
                batch.offset, batch.length, int(batch.linktype), self.spi_sorted, self.spi_idx,
                self.sa_ver, self.sa_dhi, self.sa_dlo, self.sa_esn, self.sa_window, self.sa_salt,
                self.sa_limits, self.rx_top, self.rx_bitmap, self.life)
            return Batch(out, off, ln, wl, pt, t, batch.linktype), reason
        (reason, sa_of, seq64, l2len, ct_src, ct_len, out, out_off, nonce, aad, aad_len) = \
            esp.decap_prepare(batch.data, batch.offset, batch.length, int(batch.linktype),
                              self.spi_sorted, self.spi_idx, self.sa_ver, self.sa_dhi,
                              self.sa_dlo, self.sa_esn, self.sa_window, self.sa_salt,
                              self.rx_top, self.rx_bitmap)
        if self.backend == "evp":
            _, ptrs = self._contexts(False)
            ok = esp.open_evp(ptrs, reason, sa_of, batch.data, ct_src, ct_len, out, out_off, l2len,
                              nonce, aad, aad_len, self._scratch)
        else:
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
                        aead.decrypt_into(nmv[k:k + 12], dmv[a:a + m + esp.ICV_LEN],
                                          amv[k:k + al[i]], mv[q:q + m])
                    else:
                        mv[q:q + m] = aead.decrypt(nmv[k:k + 12], dmv[a:a + m + esp.ICV_LEN],
                                                   amv[k:k + al[i]])
                except InvalidTag:
                    continue
                ok[i] = 1
        info = None
        if details:     # read before decap_finish wipes the plaintext of refused packets
            n = len(reason)
            info = {"seq": seq64, "iv": nonce[:, 4:].copy(),
                    "pad_length": np.full(n, -1, np.int64),
                    "next_header": np.full(n, -1, np.int64), "plaintext": [None] * n}
            for i in np.flatnonzero(ok):
                q, m = int(out_off[i] + l2len[i]), int(ct_len[i])
                info["plaintext"][i] = out[q:q + m].tobytes()
                info["pad_length"][i], info["next_header"][i] = out[q + m - 2], out[q + m - 1]
        out_len = esp.decap_finish(reason, ok, sa_of, seq64, l2len, ct_len, out, out_off,
                                   self.sa_window, self.sa_limits, self.rx_top, self.rx_bitmap,
                                   self.life)
        res = self._result(batch, out, out_off, out_len, reason, self.rx_drops)
        return (res, reason, info) if details else (res, reason)

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
        """Per-SA counters (never key material)."""
        return [{"name": n, "spi": int(self.sa_spi[k]), "tx_packets": int(self.life[k, 0]),
                 "tx_bytes": int(self.life[k, 1]), "rx_packets": int(self.life[k, 2]),
                 "rx_bytes": int(self.life[k, 3]), "tx_seq": int(self.tx_seq[k]),
                 "rx_top": int(self.rx_top[k]), "stopped": bool(self.dead[k])}
                for k, n in enumerate(self.names)]


def encrypt_batch(batch: Batch, gateway: EspGateway, sa=None) -> Batch:
    """Pipeline stage: ESP-encapsulate ``batch`` with ``gateway``'s SAs and policies."""
    return gateway.encrypt_batch(batch, sa=sa)


def decrypt_batch(batch: Batch, gateway: EspGateway):
    """Pipeline stage: ESP-decapsulate ``batch``; returns (inner batch, reason per packet)."""
    return gateway.decrypt_batch(batch)
