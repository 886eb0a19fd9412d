"""Flow keys for the caches and the fast path: the classifier's packet key, plus flow identity.

The caches use the packet key of :mod:`microseg.classify.rules` (``NW`` = 7 ``uint64`` words:
addresses, an ``L4`` word with ports/protocol/ICMP type and code/TCP flags, a ``META`` word with
tenant/ingress port/ethertype, a ``CT`` word with conntrack state in bits 0-7), so a megaflow
mask derived from the rules applies to cache keys unchanged. Bits no rule can match are used
for what an exact flow key needs beyond that, in the ``CT`` word:

* bits 8-11: L4 kind (``KIND_PORTS``: ports meaningful, ``KIND_ICMP``, ``KIND_FRAG``);
* bits 16-31: the ICMP echo identifier.

:func:`build_keys` fills the keys, their 64-bit hashes (never 0) and a ``valid`` mask in one
pass: a packet is cacheable when it parsed cleanly as IPv4 or IPv6; others never hit or enter
a cache and go to the slow path.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..classify import rules as R
from ..lowlevel import GOLDEN, fmix64, fmix64_py, mix_word, mix_word_py
from ..packet import batch as B

W = R.NW
K_SRC_HI, K_SRC_LO, K_DST_HI, K_DST_LO = R.K_SRC_HI, R.K_SRC_LO, R.K_DST_HI, R.K_DST_LO
K_L4, K_META, K_CT = R.K_L4, R.K_META, R.K_CT
SH_SPORT, SH_DPORT, SH_PROTO = R.SH_SPORT, R.SH_DPORT, R.SH_PROTO
SH_ICMP_TYPE, SH_ICMP_CODE, SH_TCP_FLAGS = R.SH_ICMP_TYPE, R.SH_ICMP_CODE, R.SH_TCP_FLAGS
SH_TENANT, SH_IN_PORT, SH_ETHERTYPE = R.SH_TENANT, R.SH_IN_PORT, R.SH_ETHERTYPE
SH_KIND, SH_ICMP_ID = 8, 16  # in the CT word, above the conntrack state byte

KIND_PORTS, KIND_ICMP, KIND_FRAG = 1, 2, 4

M64 = 0xFFFFFFFFFFFFFFFF


@njit(cache=True, inline="always")
def _fmix(h):
    h = fmix64(h)
    if h == np.uint64(0):
        h = np.uint64(1)
    return h


@njit(cache=True, inline="always")
def hash_row(k, i, seed):
    """Hash of row ``i`` of key matrix ``k``, mixed with ``seed``: per word one multiply and
    one shift-xor, then murmur3's finaliser."""
    h = np.uint64(seed) * GOLDEN + np.uint64(k.shape[1])
    for w in range(k.shape[1]):
        h = mix_word(h, k[i, w])
    return _fmix(h)


@njit(cache=True, inline="always")
def hash_masked(k, i, masks, m, seed):
    """Hash of ``k[i] & masks[m]`` mixed with ``seed`` (the megaflow mask id)."""
    h = np.uint64(seed) * GOLDEN + np.uint64(k.shape[1])
    for w in range(k.shape[1]):
        h = mix_word(h, k[i, w] & masks[m, w])
    return _fmix(h)


@njit(cache=True, inline="always")
def _key_row(u64, i32, u16, u8, i, j, port, ct, out, hashes, valid):
    """Row ``j`` of the keys from packet ``i`` (ingress port / in_port field ``port``,
    conntrack bits ``ct``)."""
    ver = u8[B.IP_VER, i]
    ok = u8[B.ERROR, i] == 0 and (ver == 4 or ver == 6)
    valid[j] = ok
    if not ok:
        for w in range(W):
            out[j, w] = 0
        hashes[j] = 0
        return
    flags = u8[B.FLAGS, i]
    kind = 0
    if flags & B.F_PORTS:
        kind |= KIND_PORTS
    if flags & B.F_ICMP:
        kind |= KIND_ICMP
    if flags & B.F_FRAG:
        kind |= KIND_FRAG
    out[j, K_SRC_HI] = u64[B.SRC_HI, i]
    out[j, K_SRC_LO] = u64[B.SRC_LO, i]
    out[j, K_DST_HI] = u64[B.DST_HI, i]
    out[j, K_DST_LO] = u64[B.DST_LO, i]
    out[j, K_L4] = (
        (np.uint64(u16[B.SPORT, i]) << np.uint64(SH_SPORT))
        | (np.uint64(u16[B.DPORT, i]) << np.uint64(SH_DPORT))
        | (np.uint64(u8[B.PROTO, i]) << np.uint64(SH_PROTO))
        | (np.uint64(u8[B.ICMP_TYPE, i]) << np.uint64(SH_ICMP_TYPE))
        | (np.uint64(u8[B.ICMP_CODE, i]) << np.uint64(SH_ICMP_CODE))
        | (np.uint64(u8[B.TCP_FLAGS, i]) << np.uint64(SH_TCP_FLAGS))
    )
    out[j, K_META] = (
        (np.uint64(np.uint32(i32[B.TENANT, i])) << np.uint64(SH_TENANT))
        | (np.uint64(port) << np.uint64(SH_IN_PORT))
        | (np.uint64(u16[B.ETHERTYPE, i]) << np.uint64(SH_ETHERTYPE))
    )
    icmp_id = np.uint64(u16[B.ICMP_ID, i]) if flags & B.F_ICMP else np.uint64(0)
    out[j, K_CT] = (
        np.uint64(ct) | (np.uint64(kind) << np.uint64(SH_KIND)) | (icmp_id << np.uint64(SH_ICMP_ID))
    )
    hashes[j] = hash_row(out, j, 0)


@njit(cache=True)
def _build_keys(u64, i32, u16, u8, n, port, ct, out, hashes, valid):
    for i in range(n):
        _key_row(u64, i32, u16, u8, i, i, port[i], ct[i], out, hashes, valid)


@njit(cache=True)
def _build_keys_at(u64, i32, u16, u8, rows, port, ct, out, hashes, valid):
    for j in range(rows.shape[0]):
        i = rows[j]
        _key_row(u64, i32, u16, u8, i, j, port[i], ct[j], out, hashes, valid)


def build_keys(keys, port=None, ct_state=None, out=None):
    """Cache keys for a parsed batch.

    ``keys``: :class:`~microseg.packet.batch.FlowKeys`; ``port``: the batch's ingress ports
    (default 0); ``ct_state``: conntrack state bits per packet (default 0). Returns
    ``(kmat, hashes, valid)``: ``(n, W)`` uint64 keys (a valid classifier key), uint64 hashes,
    and the bool mask of cacheable packets.
    """
    n = keys.n
    port = np.zeros(n, np.uint16) if port is None else np.ascontiguousarray(port[:n], dtype=np.uint16)
    ct = np.zeros(n, np.uint8) if ct_state is None else np.ascontiguousarray(ct_state[:n], dtype=np.uint8)
    if out is None or out.shape[0] < n:
        out = np.empty((n, W), np.uint64)
    kmat = out[:n]
    hashes = np.empty(n, np.uint64)
    valid = np.empty(n, np.bool_)
    _build_keys(keys.u64, keys.i32, keys.u16, keys.u8, n, port, ct, kmat, hashes, valid)
    return kmat, hashes, valid


def build_keys_at(keys, rows, port, ct_state):
    """Cache keys of the packets ``rows`` (indices) only, one key row per index: as
    :func:`build_keys`, with ``port`` indexed by packet and ``ct_state`` by row."""
    rows = np.ascontiguousarray(rows, np.int64)
    m = rows.shape[0]
    kmat = np.empty((m, W), np.uint64)
    hashes = np.empty(m, np.uint64)
    valid = np.empty(m, np.bool_)
    _build_keys_at(
        keys.u64,
        keys.i32,
        keys.u16,
        keys.u8,
        rows,
        np.ascontiguousarray(port, np.uint16),
        np.ascontiguousarray(ct_state, np.uint8),
        kmat,
        hashes,
        valid,
    )
    return kmat, hashes, valid


@njit(cache=True)
def _hash_rows(k, out):
    for i in range(k.shape[0]):
        out[i] = hash_row(k, i, 0)


def hash_keys(kmat) -> np.ndarray:
    """Hashes of ready-made key rows (keys built elsewhere, e.g. from ClassBench headers)."""
    kmat = np.ascontiguousarray(kmat, np.uint64)
    out = np.empty(kmat.shape[0], np.uint64)
    _hash_rows(kmat, out)
    return out


# ----------------------------------------------------------------------------------------------
# Plain-Python references (the oracle for the kernels above)
# ----------------------------------------------------------------------------------------------
def hash_words_ref(words, seed=0):
    """Reference hash of a sequence of 64-bit ints (same value as :func:`hash_row`)."""
    words = [int(x) for x in words]
    h = (int(seed) * 0x9E3779B97F4A7C15 + len(words)) & M64
    for x in words:
        h = mix_word_py(h, x)
    return fmix64_py(h) or 1


def key_ref(row: dict, port: int = 0, ct: int = 0):
    """Reference key of one packet given ``FlowKeys.row(i)``: a tuple of W ints, or None."""
    if row["error"] != 0 or row["ip_ver"] not in (4, 6):
        return None
    flags, kind = row["flags"], 0
    kind |= KIND_PORTS if flags & B.F_PORTS else 0
    kind |= KIND_ICMP if flags & B.F_ICMP else 0
    kind |= KIND_FRAG if flags & B.F_FRAG else 0
    l4 = (
        row["sport"] << SH_SPORT
        | row["dport"] << SH_DPORT
        | row["proto"] << SH_PROTO
        | row["icmp_type"] << SH_ICMP_TYPE
        | row["icmp_code"] << SH_ICMP_CODE
        | row["tcp_flags"] << SH_TCP_FLAGS
    )
    meta = (row["tenant"] & 0xFFFFFFFF) << SH_TENANT | port << SH_IN_PORT | row["ethertype"] << SH_ETHERTYPE
    icmp_id = row["icmp_id"] if flags & B.F_ICMP else 0
    ctw = ct | kind << SH_KIND | icmp_id << SH_ICMP_ID
    return (row["src_hi"], row["src_lo"], row["dst_hi"], row["dst_lo"], l4, meta, ctw)
