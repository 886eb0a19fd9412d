"""ESP tunnel mode (RFC 4303) with AES-GCM (RFC 4106): batch kernels.

Encapsulation and decapsulation each run as compiled passes over a whole batch:

* ``encap_prepare`` parses the inner packets, applies the SPD, assigns sequence numbers and IVs,
  and writes outer IP header, ESP header, IV, inner packet, padding and trailer into one output
  buffer, plus a nonce (salt || IV) and AAD (SPI || seq, or SPI || seq_hi || seq_lo with ESN)
  per packet;
* ``decap_prepare`` parses outer headers, finds the SA by (SPI, tunnel destination), infers the
  high sequence bits (ESN, RFC 4303 Appendix A) and rejects replays before any crypto;
* the AEAD pass (``seal_evp`` / ``open_evp`` here, or a ``cryptography`` loop in
  :mod:`microseg.ipsec.gateway`) encrypts in place or decrypts into the output buffer;
* ``decap_finish`` re-checks and updates the anti-replay window in packet order (only for
  packets whose ICV verified), enforces lifetimes, and checks padding and the inner header;
  with ESN re-synchronisation configured (RFC 4303 A3) it stops at the packet that reaches
  the SA's count of consecutive authentication failures, so that the gateway can retry it
  with the next high-order values.

Lifetimes (RFC 4301 4.4.2.1) are counted per SA and per packet inside these passes: bytes and
packets per direction, seconds from the SA's start, in the packets' own timestamps (never a
clock read in the datapath). A soft limit sets a flag and a "new event" bit once; a hard limit
ends the SA for both directions. The gateway turns the new-event bits into events.

Every packet ends with a reason code (``OK`` or why it was dropped).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..lowlevel import rd16, rd32u, rd64, wr16, wr32
from . import evp


def _register_memcpy():
    import ctypes

    import llvmlite.binding as llvm
    from numba import types

    libc = ctypes.CDLL(None)
    llvm.add_symbol("microseg_memcpy", ctypes.cast(libc.memcpy, ctypes.c_void_p).value)
    return types.ExternalFunction("microseg_memcpy", types.intp(types.intp, types.intp, types.intp))


# Numba compiles slice copies to a byte loop; packet bodies go through libc's memcpy instead.
_memcpy = _register_memcpy()


@njit(cache=True, inline="always")
def _copy(dst, dpos, src, spos, n):
    if n > 0:
        _memcpy(dst.ctypes.data + dpos, src.ctypes.data + spos, n)


OK = 0
MALFORMED = 1  # cut short, bad lengths, bad padding, fragment, inner header not IP
UNKNOWN_SPI = 2  # no inbound SA for (SPI, tunnel destination)
REPLAY = 3  # sequence number seen before, or left of the window
BAD_ICV = 4  # integrity check failed
EXPIRED = 5  # lifetime (bytes/packets) reached, or sequence counter exhausted
NOT_ESP = 6  # decrypt input that is not an ESP packet
NO_POLICY = 7  # encrypt input that no policy protects (discard / no match / not IP)
REASONS = {
    OK: "ok",
    MALFORMED: "malformed",
    UNKNOWN_SPI: "unknown_spi",
    REPLAY: "replay",
    BAD_ICV: "bad_icv",
    EXPIRED: "expired",
    NOT_ESP: "not_esp",
    NO_POLICY: "no_policy",
}
N_REASONS = 8

ESP_HDR = 8
IV_LEN = 8
ICV_LEN = 16
MIN_ESP = ESP_HDR + IV_LEN + 4 + ICV_LEN  # header, IV, smallest aligned trailer, ICV
IPPROTO_ESP = 50
U32_MAX = 0xFFFFFFFF

# columns of ``sa_limits`` (per-SA configuration, uint64; 0 = no limit)
LIM_HARD_BYTES, LIM_HARD_PKTS, LIM_SOFT_BYTES, LIM_SOFT_PKTS = 0, 1, 2, 3
LIM_HARD_NS, LIM_SOFT_NS = 4, 5  # seconds, in timestamp units (ns)
LIM_RESYNC_AFTER, LIM_RESYNC_TRIES = 6, 7
N_LIMITS = 8

# columns of ``life`` (per-SA lifetime state, uint64; timestamps stored as their int64 bits)
L_TX_PKTS, L_TX_BYTES, L_RX_PKTS, L_RX_BYTES = 0, 1, 2, 3
L_START = 4  # when the SA's clock started (installation, else its first packet)
L_FLAGS = 5  # F_* bits below
L_SOFT_AT, L_HARD_AT = 6, 7  # timestamps of the soft / hard expiry
L_WHY = 8  # soft cause in bits 0-7, hard cause in bits 8-15 (WHY_* | DIR_*)
L_RX_FAIL = 9  # consecutive packets that failed authentication (ESN re-sync trigger)
# the next packet count, byte count and time (int64 bits) at which something can happen: a
# packet below all three is just counted, inline; only the others take _life_use
L_NEXT_PKTS, L_NEXT_BYTES, L_NEXT_T = 10, 11, 12
N_LIFE = 13
I64_MAX = 0x7FFFFFFFFFFFFFFF

F_STARTED, F_SOFT, F_HARD, F_SOFT_NEW, F_HARD_NEW = 1, 2, 4, 8, 16
WHY_BYTES, WHY_PACKETS, WHY_SECONDS = 1, 2, 3
DIR_ENCRYPT, DIR_DECRYPT, DIR_CLOCK = 16, 32, 48

ACTION_PROTECT, ACTION_BYPASS, ACTION_DISCARD = 0, 1, 2


@njit(cache=True)
def _l3_start(d, o, n, linktype):
    """Offset (from o) of the IP header and its version, or (-1, 0)."""
    if linktype == 101:
        if n < 1:
            return -1, 0
        return 0, np.int64(d[o] >> 4)
    if n < 14:
        return -1, 0
    l3 = 14
    et = rd16(d, o + 12)
    if et == 0x8100 or et == 0x88A8:
        if n < 18:
            return -1, 0
        et = rd16(d, o + 16)
        l3 = 18
    if et == 0x0800:
        return l3, 4
    if et == 0x86DD:
        return l3, 6
    return -1, 0


@njit(cache=True)
def _ipv4_csum(d, o, hl=20):
    s = np.int64(0)
    for k in range(0, hl, 2):
        s += rd16(d, o + k)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


@njit(cache=True)
def _addr_of(d, o, ver):
    """(hi, lo) of the address at o, IPv4 in the ::ffff:0:0/96 mapped form."""
    if ver == 4:
        return np.uint64(0), np.uint64(0x0000FFFF00000000) | rd32u(d, o)
    return rd64(d, o), rd64(d, o + 8)


# ---------------------------------------------------------------------------------------------
# lifetimes (RFC 4301 4.4.2.1)
# ---------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _hard_expire(life, s, why, t):
    life[s, L_FLAGS] |= np.uint64(F_HARD | F_HARD_NEW)
    life[s, L_HARD_AT] = np.uint64(t)
    life[s, L_WHY] |= np.uint64(why) << np.uint64(8)


@njit(cache=True, inline="always")
def _next_limit(soft, hard, soft_done):
    v = np.uint64(0xFFFFFFFFFFFFFFFF)
    if soft > 0 and not soft_done:
        v = soft
    if hard > 0 and hard < v:
        v = hard
    return v


@njit(cache=True)
def life_next(life, lim, s):
    """Recompute SA ``s``'s L_NEXT_* thresholds (all 0, i.e. 'look closer', for an SA whose
    clock has not started or that has ended)."""
    fl = life[s, L_FLAGS]
    if fl & np.uint64(F_HARD) or not fl & np.uint64(F_STARTED):
        life[s, L_NEXT_PKTS] = 0
        life[s, L_NEXT_BYTES] = 0
        life[s, L_NEXT_T] = 0
        return
    soft_done = (fl & np.uint64(F_SOFT)) != 0
    life[s, L_NEXT_PKTS] = _next_limit(lim[s, LIM_SOFT_PKTS], lim[s, LIM_HARD_PKTS], soft_done)
    life[s, L_NEXT_BYTES] = _next_limit(lim[s, LIM_SOFT_BYTES], lim[s, LIM_HARD_BYTES], soft_done)
    ns = _next_limit(lim[s, LIM_SOFT_NS], lim[s, LIM_HARD_NS], soft_done)
    start = np.int64(life[s, L_START])
    if ns >= np.uint64(I64_MAX) or (start > 0 and np.int64(ns) > I64_MAX - start):
        life[s, L_NEXT_T] = np.uint64(I64_MAX)
    else:
        life[s, L_NEXT_T] = np.uint64(start + np.int64(ns))


@njit(cache=True)
def _life_use(life, lim, s, cp, cb, nbytes, t, d):
    """Count one packet of ``nbytes`` at time ``t`` on SA ``s`` (``cp``/``cb``: the direction's
    packet and byte columns, ``d`` its DIR_*). False when the SA is or becomes hard-expired:
    a hard limit is never passed; the packet that would pass it ends the SA, and so does the
    packet that reaches it exactly (after being counted). A soft limit fires once.

    The kernels call it only for packets at or past an L_NEXT_* threshold (an SA's first
    packet, or one that reaches a limit): as a call it pays Numba's reference counting of its
    array arguments, which an inlined body would pay on every packet."""
    fl = life[s, L_FLAGS]
    if fl & np.uint64(F_HARD):
        return False
    if not fl & np.uint64(F_STARTED):
        life[s, L_START] = np.uint64(t)
        fl |= np.uint64(F_STARTED)
        life[s, L_FLAGS] = fl
    el = np.int64(t) - np.int64(life[s, L_START])
    nb = np.uint64(nbytes)
    why = 0
    if lim[s, LIM_HARD_NS] > 0 and el >= np.int64(lim[s, LIM_HARD_NS]):
        why = WHY_SECONDS
    elif lim[s, LIM_HARD_PKTS] > 0 and life[s, cp] >= lim[s, LIM_HARD_PKTS]:
        why = WHY_PACKETS
    elif lim[s, LIM_HARD_BYTES] > 0 and life[s, cb] + nb > lim[s, LIM_HARD_BYTES]:
        why = WHY_BYTES
    if why:
        _hard_expire(life, s, why | d, t)
        life_next(life, lim, s)
        return False
    life[s, cp] += np.uint64(1)
    life[s, cb] += nb
    if not fl & np.uint64(F_SOFT):
        why = 0
        if lim[s, LIM_SOFT_NS] > 0 and el >= np.int64(lim[s, LIM_SOFT_NS]):
            why = WHY_SECONDS
        elif lim[s, LIM_SOFT_PKTS] > 0 and life[s, cp] >= lim[s, LIM_SOFT_PKTS]:
            why = WHY_PACKETS
        elif lim[s, LIM_SOFT_BYTES] > 0 and life[s, cb] >= lim[s, LIM_SOFT_BYTES]:
            why = WHY_BYTES
        if why:
            life[s, L_FLAGS] |= np.uint64(F_SOFT | F_SOFT_NEW)
            life[s, L_SOFT_AT] = np.uint64(t)
            life[s, L_WHY] |= np.uint64(why | d)
    if lim[s, LIM_HARD_PKTS] > 0 and life[s, cp] >= lim[s, LIM_HARD_PKTS]:
        _hard_expire(life, s, WHY_PACKETS | d, t)
    elif lim[s, LIM_HARD_BYTES] > 0 and life[s, cb] >= lim[s, LIM_HARD_BYTES]:
        _hard_expire(life, s, WHY_BYTES | d, t)
    life_next(life, lim, s)
    return True


@njit(cache=True)
def expire_at(life, lim, now):
    """The clock's part of the lifetimes, without packets: soft and hard seconds at ``now`` for
    every started SA (as a timer would). Returns the number of SAs with a new event."""
    for s in range(life.shape[0]):
        fl = life[s, L_FLAGS]
        if not fl & np.uint64(F_STARTED) or fl & np.uint64(F_HARD):
            continue
        el = np.int64(now) - np.int64(life[s, L_START])
        if not fl & np.uint64(F_SOFT) and lim[s, LIM_SOFT_NS] > 0 and el >= np.int64(lim[s, LIM_SOFT_NS]):
            life[s, L_FLAGS] |= np.uint64(F_SOFT | F_SOFT_NEW)
            life[s, L_SOFT_AT] = np.uint64(now)
            life[s, L_WHY] |= np.uint64(WHY_SECONDS | DIR_CLOCK)
        if lim[s, LIM_HARD_NS] > 0 and el >= np.int64(lim[s, LIM_HARD_NS]):
            _hard_expire(life, s, WHY_SECONDS | DIR_CLOCK, now)
        life_next(life, lim, s)
    return pending_events(life)


@njit(cache=True)
def pending_events(life):
    """Number of SAs whose soft or hard expiry has not been reported yet."""
    k = 0
    for s in range(life.shape[0]):
        if life[s, L_FLAGS] & np.uint64(F_SOFT_NEW | F_HARD_NEW):
            k += 1
    return k


# ---------------------------------------------------------------------------------------------
# encapsulation
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def encap_prepare(
    data,
    offset,
    length,
    linktype,
    forced_sa,
    pol_src,
    pol_smask,
    pol_dst,
    pol_dmask,
    pol_proto,
    pol_action,
    pol_sa,
    sa_spi,
    sa_ver,
    sa_esn,
    sa_salt,
    sa_src,
    sa_dst,
    sa_limits,
    tx_seq,
    iv_base,
    life,
    dead,
    ts=None,
):
    """SPD lookup, lifetimes, sequence/IV assignment and header building (see module doc).

    Returns (out, out_off, out_len, reason, sa_of, nonce, aad, aad_len, enc_off, enc_len).
    ``sa_of`` is -1 for a bypassed packet (copied unchanged). State arrays are updated.
    ``ts`` gives each packet's time for the seconds lifetimes; without it time stands still.
    """
    n = offset.shape[0]
    reason = np.zeros(n, np.uint8)
    sa_of = np.full(n, -1, np.int64)
    l3 = np.zeros(n, np.int64)
    ilen = np.zeros(n, np.int64)
    ver = np.zeros(n, np.int64)
    out_len = np.zeros(n, np.int64)
    seqs = np.zeros(n, np.uint64)
    npol = pol_action.shape[0]
    for i in range(n):
        o = offset[i]
        cap = np.int64(length[i])
        s3, v = _l3_start(data, o, cap, linktype)
        if s3 < 0:
            reason[i] = NO_POLICY
            continue
        p = o + s3
        rem = cap - s3
        if v == 4:
            if rem < 20 or (data[p] >> 4) != 4 or (data[p] & 0xF) < 5:
                reason[i] = MALFORMED
                continue
            L = rd16(data, p + 2)
            if L < (data[p] & 0xF) * 4 or L > rem:
                reason[i] = MALFORMED
                continue
            proto = np.int64(data[p + 9])
            sh, sl = _addr_of(data, p + 12, 4)
            dh, dl = _addr_of(data, p + 16, 4)
        elif v == 6:
            if rem < 40 or (data[p] >> 4) != 6:
                reason[i] = MALFORMED
                continue
            L = rd16(data, p + 4) + 40
            if L > rem:
                reason[i] = MALFORMED
                continue
            proto = np.int64(data[p + 6])
            sh, sl = _addr_of(data, p + 8, 6)
            dh, dl = _addr_of(data, p + 24, 6)
        else:
            reason[i] = NO_POLICY
            continue
        s = forced_sa
        if s < 0:
            act = ACTION_DISCARD
            for k in range(npol):
                if (sh & pol_smask[k, 0]) != pol_src[k, 0] or (sl & pol_smask[k, 1]) != pol_src[k, 1]:
                    continue
                if (dh & pol_dmask[k, 0]) != pol_dst[k, 0] or (dl & pol_dmask[k, 1]) != pol_dst[k, 1]:
                    continue
                if pol_proto[k] >= 0 and pol_proto[k] != proto:
                    continue
                act = pol_action[k]
                s = pol_sa[k]
                break
            if act == ACTION_BYPASS:
                out_len[i] = cap
                continue
            if act != ACTION_PROTECT:
                reason[i] = NO_POLICY
                continue
        if life[s, L_FLAGS] & np.uint64(F_HARD):
            reason[i] = EXPIRED
            continue
        # sequence counter: a counter that would wrap stops the SA (RFC 4303 3.3.3)
        smax = np.uint64(0xFFFFFFFFFFFFFFFF) if sa_esn[s] else np.uint64(U32_MAX)
        if dead[s] or tx_seq[s] >= smax:
            dead[s] = 1
            reason[i] = EXPIRED
            continue
        t = np.int64(0) if ts is None else np.int64(ts[i])
        if (
            life[s, L_TX_PKTS] + np.uint64(1) < life[s, L_NEXT_PKTS]
            and life[s, L_TX_BYTES] + np.uint64(L) < life[s, L_NEXT_BYTES]
            and t < np.int64(life[s, L_NEXT_T])
        ):
            life[s, L_TX_PKTS] += np.uint64(1)  # far from every limit: just count
            life[s, L_TX_BYTES] += np.uint64(L)
        elif not _life_use(life, sa_limits, s, L_TX_PKTS, L_TX_BYTES, L, t, DIR_ENCRYPT):
            reason[i] = EXPIRED
            continue
        tx_seq[s] += np.uint64(1)
        seqs[i] = tx_seq[s]
        sa_of[i] = s
        l3[i] = s3
        ilen[i] = L
        ver[i] = v
        pad = (4 - (L + 2) % 4) % 4
        outer = 20 if sa_ver[s] == 4 else 40
        out_len[i] = s3 + outer + ESP_HDR + IV_LEN + L + pad + 2 + ICV_LEN
    out_off = np.zeros(n, np.int64)
    total = np.int64(0)
    for i in range(n):
        out_off[i] = total
        if reason[i] == OK:
            total += out_len[i]
        else:
            out_len[i] = 0
    out = np.empty(total, np.uint8)
    nonce = np.zeros((n, 12), np.uint8)
    aad = np.zeros((n, 12), np.uint8)
    aad_len = np.zeros(n, np.int64)
    enc_off = np.zeros(n, np.int64)
    enc_len = np.zeros(n, np.int64)
    for i in range(n):
        if reason[i] != OK:
            continue
        o = offset[i]
        q = out_off[i]
        s = sa_of[i]
        if s < 0:  # bypass: unchanged copy
            _copy(out, q, data, o, out_len[i])
            continue
        s3 = l3[i]
        L = ilen[i]
        v = ver[i]
        p = o + s3
        if s3 > 0:  # keep the L2 header, retag the ethertype for the outer IP version
            _copy(out, q, data, o, s3)
            wr16(out, q + s3 - 2, 0x0800 if sa_ver[s] == 4 else 0x86DD)
        h = q + s3
        tos = data[p + 1] if v == 4 else ((data[p] & 0xF) << 4) | (data[p + 1] >> 4)
        pad = (4 - (L + 2) % 4) % 4
        esp_len = ESP_HDR + IV_LEN + L + pad + 2 + ICV_LEN
        seq = seqs[i]
        if sa_ver[s] == 4:
            out[h] = 0x45
            out[h + 1] = tos
            wr16(out, h + 2, 20 + esp_len)
            wr16(out, h + 4, np.int64(seq & np.uint64(0xFFFF)))
            out[h + 6] = 0
            out[h + 7] = 0
            out[h + 8] = 64
            out[h + 9] = IPPROTO_ESP
            out[h + 10] = 0
            out[h + 11] = 0
            for k in range(4):
                out[h + 12 + k] = sa_src[s, k]
                out[h + 16 + k] = sa_dst[s, k]
            wr16(out, h + 10, _ipv4_csum(out, h))
            e = h + 20
        else:
            out[h] = 0x60 | (tos >> 4)
            out[h + 1] = (tos & 0xF) << 4
            out[h + 2] = 0
            out[h + 3] = 0
            wr16(out, h + 4, esp_len)
            out[h + 6] = IPPROTO_ESP
            out[h + 7] = 64
            for k in range(16):
                out[h + 8 + k] = sa_src[s, k]
                out[h + 24 + k] = sa_dst[s, k]
            e = h + 40
        wr32(out, e, sa_spi[s])
        wr32(out, e + 4, seq & np.uint64(U32_MAX))
        iv = iv_base[s] + seq  # per-SA counter from a random start: never repeats
        wr32(out, e + 8, iv >> np.uint64(32))
        wr32(out, e + 12, iv & np.uint64(U32_MAX))
        c = e + 16
        _copy(out, c, data, p, L)
        for k in range(pad):
            out[c + L + k] = k + 1
        out[c + L + pad] = pad
        out[c + L + pad + 1] = 4 if v == 4 else 41
        for k in range(4):
            nonce[i, k] = sa_salt[s, k]
        for k in range(8):
            nonce[i, 4 + k] = out[e + 8 + k]
        wr32(aad[i], 0, sa_spi[s])
        if sa_esn[s]:
            wr32(aad[i], 4, seq >> np.uint64(32))
            wr32(aad[i], 8, seq & np.uint64(U32_MAX))
            aad_len[i] = 12
        else:
            wr32(aad[i], 4, seq)
            aad_len[i] = 8
        enc_off[i] = c
        enc_len[i] = L + pad + 2
    return out, out_off, out_len, reason, sa_of, nonce, aad, aad_len, enc_off, enc_len


# ---------------------------------------------------------------------------------------------
# anti-replay window (RFC 4303 3.4.3; ESN: Appendix A)
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def infer_seq(top, seql, window, esn):
    """Full 64-bit sequence number for a received low half; 0 means 'cannot be valid'."""
    seql = np.uint64(seql)
    if not esn:
        return seql
    w = np.uint64(window)
    tl = top & np.uint64(U32_MAX)
    th = top >> np.uint64(32)
    if tl >= w - np.uint64(1):
        # case A: window within one subspace
        if seql >= tl - w + np.uint64(1):
            sh = th
        else:
            if th == np.uint64(U32_MAX):
                return np.uint64(0)  # past the end of the 64-bit space
            sh = th + np.uint64(1)
    else:
        # case B: window spans two subspaces
        if seql >= (tl - w + np.uint64(1)) & np.uint64(U32_MAX):
            if th == 0:
                return np.uint64(0)
            sh = th - np.uint64(1)
        else:
            sh = th
    return (sh << np.uint64(32)) | seql


@njit(cache=True)
def replay_check(top, bitmap, seq, window):
    """True when ``seq`` is acceptable: new, or inside the window and not yet seen."""
    if seq == 0:
        return False
    if window == 0:
        return True
    if seq > top:
        return True
    w = np.uint64(window)
    if top - seq >= w:
        return False
    nb = np.uint64(bitmap.shape[0] * 64)
    b = seq % nb
    return (bitmap[np.int64(b >> np.uint64(6))] >> (b & np.uint64(63))) & np.uint64(1) == 0


@njit(cache=True)
def replay_update(top, bitmap, seq, window):
    """Record ``seq`` (already checked); returns the new top of the window."""
    if window == 0:
        return top if top > seq else seq
    nb = np.uint64(bitmap.shape[0] * 64)
    if seq > top:
        d = seq - top
        if d >= nb:
            bitmap[:] = 0
        else:
            for k in range(np.int64(d)):  # d < nb: no wrap even at 2**64 - 1
                b = (top + np.uint64(1) + np.uint64(k)) % nb
                bitmap[np.int64(b >> np.uint64(6))] &= ~(np.uint64(1) << (b & np.uint64(63)))
        top = seq
    b = seq % nb
    bitmap[np.int64(b >> np.uint64(6))] |= np.uint64(1) << (b & np.uint64(63))
    return top


# ---------------------------------------------------------------------------------------------
# decapsulation
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def _find_sa(spi_sorted, spi_idx, spi, sa_ver, sa_dhi, sa_dlo, ver, dhi, dlo):
    lo, hi = 0, spi_sorted.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if spi_sorted[mid] < spi:
            lo = mid + 1
        else:
            hi = mid
    while lo < spi_sorted.shape[0] and spi_sorted[lo] == spi:
        s = spi_idx[lo]
        if sa_ver[s] == ver and sa_dhi[s] == dhi and sa_dlo[s] == dlo:
            return s
        lo += 1
    return -1


@njit(cache=True)
def decap_prepare(
    data,
    offset,
    length,
    linktype,
    spi_sorted,
    spi_idx,
    sa_ver,
    sa_dhi,
    sa_dlo,
    sa_esn,
    sa_window,
    sa_salt,
    rx_top,
    rx_bitmap,
    life,
):
    """Parse, find the SA, pre-check replay and expiry, lay out the output (see module doc).

    Returns (reason, sa_of, seq64, l2len, ct_src, ct_len, out, out_off, nonce, aad, aad_len).
    """
    n = offset.shape[0]
    reason = np.zeros(n, np.uint8)
    sa_of = np.full(n, -1, np.int64)
    seq64 = np.zeros(n, np.uint64)
    l2len = np.zeros(n, np.int64)
    ct_src = np.zeros(n, np.int64)
    ct_len = np.zeros(n, np.int64)
    esp_at = np.zeros(n, np.int64)
    for i in range(n):
        o = offset[i]
        cap = np.int64(length[i])
        s3, v = _l3_start(data, o, cap, linktype)
        if s3 < 0:
            reason[i] = NOT_ESP
            continue
        p = o + s3
        rem = cap - s3
        if v == 4:
            if rem < 20 or (data[p] >> 4) != 4:
                reason[i] = MALFORMED
                continue
            ihl = np.int64(data[p] & 0xF) * 4
            tot = rd16(data, p + 2)
            if ihl < 20 or tot < ihl or tot > rem or rem < ihl:
                reason[i] = MALFORMED
                continue
            if data[p + 9] != IPPROTO_ESP:
                reason[i] = NOT_ESP
                continue
            if _ipv4_csum(data, p, ihl) != 0:
                reason[i] = MALFORMED
                continue
            if (rd16(data, p + 6) & 0x3FFF) != 0:  # a fragment: no reassembly here
                reason[i] = MALFORMED
                continue
            dh, dl = _addr_of(data, p + 16, 4)
            e = p + ihl
            elen = tot - ihl
        elif v == 6:
            if rem < 40 or (data[p] >> 4) != 6:
                reason[i] = MALFORMED
                continue
            tot = rd16(data, p + 4) + 40
            if tot > rem:
                reason[i] = MALFORMED
                continue
            dh, dl = _addr_of(data, p + 24, 6)
            nh = np.int64(data[p + 6])
            e = p + 40
            bad = False
            while nh == 0 or nh == 43 or nh == 60:
                if e + 8 > p + tot:
                    bad = True
                    break
                nh2 = np.int64(data[e])
                e += (np.int64(data[e + 1]) + 1) * 8
                nh = nh2
            if bad or e > p + tot or nh == 44:
                reason[i] = MALFORMED
                continue
            if nh != IPPROTO_ESP:
                reason[i] = NOT_ESP
                continue
            elen = p + tot - e
        else:
            reason[i] = NOT_ESP
            continue
        if elen < MIN_ESP:
            reason[i] = MALFORMED
            continue
        spi = rd32u(data, e)
        s = _find_sa(spi_sorted, spi_idx, spi, sa_ver, sa_dhi, sa_dlo, v, dh, dl)
        if s < 0:
            reason[i] = UNKNOWN_SPI
            continue
        if (elen - ESP_HDR - IV_LEN - ICV_LEN) % 4 != 0:
            reason[i] = MALFORMED
            continue
        seq = infer_seq(rx_top[s], rd32u(data, e + 4), sa_window[s], sa_esn[s])
        if not replay_check(rx_top[s], rx_bitmap[s], seq, sa_window[s]):
            reason[i] = REPLAY
            continue
        if life[s, L_FLAGS] & np.uint64(F_HARD):  # no crypto for an SA that has ended
            reason[i] = EXPIRED
            continue
        sa_of[i] = s
        seq64[i] = seq
        l2len[i] = s3
        esp_at[i] = e
        ct_src[i] = e + ESP_HDR + IV_LEN
        ct_len[i] = elen - ESP_HDR - IV_LEN - ICV_LEN
    out_off = np.zeros(n, np.int64)
    total = np.int64(0)
    for i in range(n):
        out_off[i] = total
        if reason[i] == OK:
            total += l2len[i] + ct_len[i]
    out = np.empty(total, np.uint8)  # every byte is written below or by the AEAD pass
    nonce = np.zeros((n, 12), np.uint8)
    aad = np.zeros((n, 12), np.uint8)
    aad_len = np.zeros(n, np.int64)
    for i in range(n):
        if reason[i] != OK:
            continue
        s = sa_of[i]
        e = esp_at[i]
        for k in range(4):
            nonce[i, k] = sa_salt[s, k]
        for k in range(8):
            nonce[i, 4 + k] = data[e + 8 + k]
            aad[i, k] = data[e + k]
        if sa_esn[s]:
            wr32(aad[i], 4, seq64[i] >> np.uint64(32))
            for k in range(4):
                aad[i, 8 + k] = data[e + 4 + k]
            aad_len[i] = 12
        else:
            aad_len[i] = 8
        if l2len[i] > 0:
            _copy(out, out_off[i], data, offset[i], l2len[i])
    return reason, sa_of, seq64, l2len, ct_src, ct_len, out, out_off, nonce, aad, aad_len


@njit(cache=True)
def decap_finish(
    reason,
    ok,
    sa_of,
    seq64,
    l2len,
    ct_len,
    out,
    out_off,
    sa_esn,
    sa_window,
    sa_limits,
    rx_top,
    rx_bitmap,
    life,
    ts,
    out_len,
    start,
    allow_resync,
):
    """Window update in packet order, lifetimes, trailer and inner-header checks, from packet
    ``start`` on; ``out_len`` receives the inner packets' lengths (with L2).

    ``ok[i]`` is 1 when packet i's ICV verified. Returns the index of the packet where it
    stopped for an ESN re-synchronisation attempt (only with ``allow_resync``), else n.
    """
    n = reason.shape[0]
    stop = n
    for i in range(start, n):
        if reason[i] != OK:
            continue
        s = sa_of[i]
        seq = seq64[i]
        if sa_esn[s]:
            # inferred again from the window as it is now: an earlier packet of this batch
            # may have moved it (the crypto used the first guess: a different one cannot verify)
            now_seq = infer_seq(rx_top[s], seq & np.uint64(U32_MAX), sa_window[s], True)
            if now_seq != seq:
                if not replay_check(rx_top[s], rx_bitmap[s], now_seq, sa_window[s]):
                    reason[i] = REPLAY
                    continue
                ok[i] = 0
                seq = now_seq
                seq64[i] = seq
        # checked again in packet order: an earlier packet of this batch may have taken seq
        if not replay_check(rx_top[s], rx_bitmap[s], seq, sa_window[s]):
            reason[i] = REPLAY
            continue
        if life[s, L_FLAGS] & np.uint64(F_HARD):
            reason[i] = EXPIRED
            continue
        if not ok[i]:
            reason[i] = BAD_ICV
            life[s, L_RX_FAIL] += np.uint64(1)
            after = sa_limits[s, LIM_RESYNC_AFTER]
            if (
                allow_resync
                and sa_esn[s]
                and after > 0
                and life[s, L_RX_FAIL] >= after
                and (seq >> np.uint64(32)) < np.uint64(U32_MAX)
            ):
                stop = i
                break
            continue
        life[s, L_RX_FAIL] = 0
        q = out_off[i] + l2len[i]
        m = ct_len[i]
        padlen = np.int64(out[q + m - 2])
        nh = out[q + m - 1]
        L = m - 2 - padlen
        bad = L < 0
        if not bad:
            for k in range(padlen):
                if out[q + L + k] != k + 1:
                    bad = True
                    break
        if not bad:
            if nh == 4:
                bad = L < 20 or (out[q] >> 4) != 4 or rd16(out, q + 2) > L or rd16(out, q + 2) < 20
                if not bad:
                    L = rd16(out, q + 2)  # drops TFC padding, if any
            elif nh == 41:
                bad = L < 40 or (out[q] >> 4) != 6 or rd16(out, q + 4) + 40 > L
                if not bad:
                    L = rd16(out, q + 4) + 40
            else:
                bad = True  # not tunnel mode (59 = dummy: dropped too)
        # the packet authenticated: it moves the window even if its content is then refused
        rx_top[s] = replay_update(rx_top[s], rx_bitmap[s], seq, sa_window[s])
        if bad:
            reason[i] = MALFORMED
            continue
        t = np.int64(ts[i])
        if (
            life[s, L_RX_PKTS] + np.uint64(1) < life[s, L_NEXT_PKTS]
            and life[s, L_RX_BYTES] + np.uint64(L) < life[s, L_NEXT_BYTES]
            and t < np.int64(life[s, L_NEXT_T])
        ):
            life[s, L_RX_PKTS] += np.uint64(1)  # far from every limit: just count
            life[s, L_RX_BYTES] += np.uint64(L)
        elif not _life_use(life, sa_limits, s, L_RX_PKTS, L_RX_BYTES, L, t, DIR_DECRYPT):
            reason[i] = EXPIRED
            continue
        if l2len[i] > 0:
            wr16(out, q - 2, 0x0800 if nh == 4 else 0x86DD)
        out_len[i] = l2len[i] + L
    # plaintext of dropped packets (unauthenticated, or refused after) does not stay around
    last = stop + 1 if stop < n else n
    for i in range(start, last):
        if reason[i] != OK and sa_of[i] >= 0:
            q = out_off[i] + l2len[i]
            for k in range(ct_len[i]):
                out[q + k] = 0
    return stop


@njit(cache=True)
def compact(reason, out_off, out_len, port, ts, counts, stop=-1):
    """Count reasons into ``counts``; offsets, lengths, ports, timestamps of the kept packets
    (of the first ``stop`` packets when ``stop`` >= 0)."""
    n = reason.shape[0] if stop < 0 else stop
    k = 0
    for i in range(n):
        counts[reason[i]] += 1
        if reason[i] == OK:
            k += 1
    off = np.empty(k, np.int64)
    ln = np.empty(k, np.int32)
    wl = np.empty(k, np.int32)
    pt = np.empty(k, np.uint16)
    t = np.empty(k, np.int64)
    j = 0
    for i in range(n):
        if reason[i] == OK:
            off[j] = out_off[i]
            ln[j] = out_len[i]
            wl[j] = out_len[i]
            pt[j] = port[i]
            t[j] = ts[i]
            j += 1
    return off, ln, wl, pt, t


# ---------------------------------------------------------------------------------------------
# AEAD through OpenSSL's EVP, called from the compiled loop
# ---------------------------------------------------------------------------------------------
if evp.AVAILABLE:
    _e_init, _e_upd, _e_fin = evp.encrypt_init, evp.encrypt_update, evp.encrypt_final
    _d_init, _d_upd, _d_fin = evp.decrypt_init, evp.decrypt_update, evp.decrypt_final
    _ctrl = evp.cipher_ctrl

    @njit(cache=True)
    def seal_evp(ctxs, sa_of, out, enc_off, enc_len, nonce, aad, aad_len, scratch):
        """Encrypt ``out[enc_off:enc_off+enc_len]`` in place and append the 16-byte tag."""
        outl = scratch.ctypes.data
        base = out.ctypes.data
        nb = nonce.ctypes.data
        ab = aad.ctypes.data
        bad = 0
        for i in range(sa_of.shape[0]):
            s = sa_of[i]
            if s < 0 or enc_len[i] == 0:
                continue
            c = ctxs[s]
            p = base + enc_off[i]
            r = _e_init(c, 0, 0, 0, nb + 12 * i)
            r &= _e_upd(c, 0, outl, ab + 12 * i, np.int32(aad_len[i]))
            r &= _e_upd(c, p, outl, p, np.int32(enc_len[i]))
            r &= _e_fin(c, p + enc_len[i], outl)
            r &= _ctrl(c, 0x10, 16, p + enc_len[i])
            if r != 1:
                bad += 1
        return bad

    @njit(cache=True)
    def open_evp(
        ctxs, reason, sa_of, data, ct_src, ct_len, out, out_off, l2len, nonce, aad, aad_len, scratch
    ):
        """Decrypt each ciphertext into the output buffer; ok[i] = 1 when the tag verified."""
        n = reason.shape[0]
        ok = np.zeros(n, np.uint8)
        outl = scratch.ctypes.data
        din = data.ctypes.data
        dout = out.ctypes.data
        nb = nonce.ctypes.data
        ab = aad.ctypes.data
        for i in range(n):
            if reason[i] != OK:
                continue
            c = ctxs[sa_of[i]]
            src = din + ct_src[i]
            dst = dout + out_off[i] + l2len[i]
            m = ct_len[i]
            r = _d_init(c, 0, 0, 0, nb + 12 * i)
            r &= _d_upd(c, 0, outl, ab + 12 * i, np.int32(aad_len[i]))
            r &= _d_upd(c, dst, outl, src, np.int32(m))
            r &= _ctrl(c, 0x11, 16, src + m)
            r &= _d_fin(c, dst + m, outl)
            ok[i] = 1 if r == 1 else 0
        return ok

    @njit(cache=True)
    def encrypt_evp(
        ctxs,
        scratch,
        counts,
        port,
        ts,
        clock,
        data,
        offset,
        length,
        linktype,
        forced_sa,
        pol_src,
        pol_smask,
        pol_dst,
        pol_dmask,
        pol_proto,
        pol_action,
        pol_sa,
        sa_spi,
        sa_ver,
        sa_esn,
        sa_salt,
        sa_src,
        sa_dst,
        sa_limits,
        tx_seq,
        iv_base,
        life,
        dead,
    ):
        """encap_prepare + seal_evp + compact in one dispatch (the per-batch cost counts at 64 B).
        ``clock``: each packet's time for the lifetimes (``ts``, or the caller's ``now``).
        Also returns the number of SAs with a lifetime event to report."""
        (out, out_off, out_len, reason, sa_of, nonce, aad, aad_len, enc_off, enc_len) = encap_prepare(
            data,
            offset,
            length,
            linktype,
            forced_sa,
            pol_src,
            pol_smask,
            pol_dst,
            pol_dmask,
            pol_proto,
            pol_action,
            pol_sa,
            sa_spi,
            sa_ver,
            sa_esn,
            sa_salt,
            sa_src,
            sa_dst,
            sa_limits,
            tx_seq,
            iv_base,
            life,
            dead,
            clock,
        )
        bad = seal_evp(ctxs, sa_of, out, enc_off, enc_len, nonce, aad, aad_len, scratch)
        off, ln, wl, pt, t = compact(reason, out_off, out_len, port, ts, counts)
        return out, off, ln, wl, pt, t, reason, bad, pending_events(life)

    @njit(cache=True)
    def decrypt_evp(
        ctxs,
        scratch,
        counts,
        port,
        ts,
        clock,
        data,
        offset,
        length,
        linktype,
        spi_sorted,
        spi_idx,
        sa_ver,
        sa_dhi,
        sa_dlo,
        sa_esn,
        sa_window,
        sa_salt,
        sa_limits,
        rx_top,
        rx_bitmap,
        life,
    ):
        """decap_prepare + open_evp + decap_finish + compact in one dispatch (no ESN
        re-synchronisation: the gateway takes the step-by-step path when an SA has it)."""
        (reason, sa_of, seq64, l2len, ct_src, ct_len, out, out_off, nonce, aad, aad_len) = decap_prepare(
            data,
            offset,
            length,
            linktype,
            spi_sorted,
            spi_idx,
            sa_ver,
            sa_dhi,
            sa_dlo,
            sa_esn,
            sa_window,
            sa_salt,
            rx_top,
            rx_bitmap,
            life,
        )
        ok = open_evp(
            ctxs, reason, sa_of, data, ct_src, ct_len, out, out_off, l2len, nonce, aad, aad_len, scratch
        )
        out_len = np.zeros(reason.shape[0], np.int64)
        decap_finish(
            reason,
            ok,
            sa_of,
            seq64,
            l2len,
            ct_len,
            out,
            out_off,
            sa_esn,
            sa_window,
            sa_limits,
            rx_top,
            rx_bitmap,
            life,
            clock,
            out_len,
            0,
            False,
        )
        off, ln, wl, pt, t = compact(reason, out_off, out_len, port, ts, counts)
        return out, off, ln, wl, pt, t, reason, pending_events(life)
