"""Numba kernels of the connection table: track a batch, look up, expire, delete, rebuild.

The table is an array of fixed-size entries (``ENTRY_DTYPE``, one record per connection,
fields of one connection side by side so a lookup touches one or two cache lines) plus an
open-addressing index: ``slot_ent`` (entry number or -1) and ``slot_hash`` (low 32 bits of the
hash, which also gives the home slot), linear probing, deletion by backward shift (no
tombstones, so probe sequences never grow with churn). A connection is indexed once, under a
hash of its zone, protocol and two endpoints taken in a canonical order, so a packet of either
direction finds it with one probe sequence; comparing the stored original tuple tells the
direction. The hash is keyed with a per-table random seed.

Entry ``capacity`` (one past the last) is a scratch record: a packet that would open a
connection is first run through the state machine there, and only an accepted one takes a
real entry (evicting an unassured one when the table is full).

The logic mirrors :mod:`.reference` line for line; tests check both give the same states.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .. import ctstate as CS
from ..lowlevel import mix64, prefetch
from ..packet import batch as B
from ..packet import errors as PE
from . import const as K

ENTRY_DTYPE = np.dtype(
    [
        ("src_hi", np.uint64),
        ("src_lo", np.uint64),
        ("dst_hi", np.uint64),
        ("dst_lo", np.uint64),
        ("deadline", np.int64),
        ("bytes", np.uint64, (2,)),
        ("zone", np.uint32),
        ("td_end", np.uint32, (2,)),
        ("td_maxend", np.uint32, (2,)),
        ("td_maxwin", np.uint32, (2,)),
        ("td_maxack", np.uint32, (2,)),
        ("last_seq", np.uint32),
        ("last_ack", np.uint32),
        ("last_end", np.uint32),
        ("sport", np.uint16),
        ("dport", np.uint16),
        ("last_win", np.uint16),
        ("proto", np.uint8),
        ("icmp_type", np.uint8),
        ("icmp_code", np.uint8),
        ("status", np.uint8),
        ("tcp_state", np.uint8),
        ("last_index", np.uint8),
        ("last_dir", np.uint8),
        ("retrans", np.uint8),
        ("last_flags", np.uint8),
        ("last_wscale", np.uint8),
        ("td_scale", np.uint8, (2,)),
        ("tcp_flags", np.uint8, (2,)),
    ],
    align=True,
)

# meta slots
M_COUNT, M_FREE_TOP, M_CURSOR, M_MASK, M_SEED, M_CAPACITY = range(6)
N_META = 6
# Settings, timeouts, counters and table bookkeeping travel as one record: kernels pass it to
# their helpers by pointer, with none of the reference counting that array arguments cost.
PARAM_DTYPE = np.dtype(
    [
        ("T", np.int64, (K.N_TIMEOUTS,)),
        ("cfg", np.int64, (K.N_CFG,)),
        ("ctr", np.int64, (K.N_COUNTERS,)),
        ("meta", np.int64, (N_META,)),
    ],
    align=True,
)

M32 = 0xFFFFFFFF
_U32 = np.uint64(32)
_U8, _U16, _U40, _U48 = np.uint64(8), np.uint64(16), np.uint64(40), np.uint64(48)

TRANS = K.TCP_TRANSITIONS
VALID_FLAGS = K.TCP_VALID_FLAGS
ICMP4_INV, ICMP6_INV = K.ICMP4_INV, K.ICMP6_INV
ICMP4_VALID_NEW, ICMP6_VALID_NEW = K.ICMP4_VALID_NEW, K.ICMP6_VALID_NEW
ICMP4_ERRORS, ICMP6_UNTRACKED = K.ICMP4_ERRORS, K.ICMP6_UNTRACKED

ST_INVALID = CS.TRACKED | CS.INVALID


@njit(cache=True, inline="always")
def _s32(x):
    x &= M32
    return x - 4294967296 if x >= 2147483648 else x


@njit(cache=True, inline="always")
def _before(a, b):
    return _s32(a - b) < 0


@njit(cache=True, inline="always")
def _after(a, b):
    return _s32(b - a) < 0


@njit(cache=True)
def conn_hash(seed, zone, proto, shi, slo, dhi, dlo, sp, dp, ntype, code):
    """Direction-independent hash of a connection (endpoints in canonical order)."""
    swap = False
    if shi != dhi:
        swap = shi > dhi
    elif slo != dlo:
        swap = slo > dlo
    else:
        swap = sp > dp
    if swap:
        shi, slo, dhi, dlo, sp, dp = dhi, dlo, shi, slo, dp, sp
    h = (
        np.uint64(seed)
        ^ (np.uint64(zone) << _U16)
        ^ np.uint64(proto)
        ^ (np.uint64(ntype) << _U40)
        ^ (np.uint64(code) << _U48)
    )
    h = mix64(h ^ np.uint64(shi))
    h = mix64(h ^ np.uint64(slo))
    h = mix64(h ^ np.uint64(dhi))
    h = mix64(h ^ np.uint64(dlo))
    h = mix64(h ^ ((np.uint64(sp) << _U16) | np.uint64(dp)))
    return h


@njit(cache=True, inline="always")
def _icmp_inv(proto, t):
    if proto == K.IPPROTO_ICMP:
        return ICMP4_INV[t] - 1
    return ICMP6_INV[t] - 1


@njit(cache=True, inline="always")
def _match(c, zone, proto, shi, slo, dhi, dlo, sp, dp, it, ic):
    """0: ``c`` is this packet's connection, original direction; 1: reply; -1: neither."""
    if c.zone != zone or c.proto != proto:
        return -1
    if proto == K.IPPROTO_ICMP or proto == K.IPPROTO_ICMPV6:
        if c.sport != sp or c.icmp_code != ic:
            return -1
        if c.src_hi == shi and c.src_lo == slo and c.dst_hi == dhi and c.dst_lo == dlo and c.icmp_type == it:
            return 0
        if (
            c.src_hi == dhi
            and c.src_lo == dlo
            and c.dst_hi == shi
            and c.dst_lo == slo
            and _icmp_inv(proto, c.icmp_type) == it
        ):
            return 1
        return -1
    if (
        c.src_hi == shi
        and c.src_lo == slo
        and c.dst_hi == dhi
        and c.dst_lo == dlo
        and c.sport == sp
        and c.dport == dp
    ):
        return 0
    if (
        c.src_hi == dhi
        and c.src_lo == dlo
        and c.dst_hi == shi
        and c.dst_lo == slo
        and c.sport == dp
        and c.dport == sp
    ):
        return 1
    return -1


@njit(cache=True, inline="always")
def _find(ents, slot_ent, slot_hash, mask, h, zone, proto, shi, slo, dhi, dlo, sp, dp, it, ic):
    """(entry, direction) of the packet's connection, or (-1, 0)."""
    h32 = np.uint32(h & np.uint64(M32))
    pos = np.int64(h32) & mask
    while True:
        e = slot_ent[pos]
        if e < 0:
            return -1, 0
        if slot_hash[pos] == h32:
            d = _match(ents[e], zone, proto, shi, slo, dhi, dlo, sp, dp, it, ic)
            if d >= 0:
                return e, d
        pos = (pos + 1) & mask


@njit(cache=True)
def _index_insert(slot_ent, slot_hash, mask, h, e):
    h32 = np.uint32(h & np.uint64(M32))
    pos = np.int64(h32) & mask
    while slot_ent[pos] >= 0:
        pos = (pos + 1) & mask
    slot_ent[pos] = e
    slot_hash[pos] = h32


@njit(cache=True)
def _entry_hash(c, seed):
    """The index hash of entry ``c`` (the one its packets compute)."""
    hdp = np.int64(c.dport)
    ntype = 0
    if c.proto == K.IPPROTO_ICMP or c.proto == K.IPPROTO_ICMPV6:
        ntype = min(np.int64(c.icmp_type), _icmp_inv(c.proto, c.icmp_type))
        hdp = np.int64(c.sport)
    return conn_hash(
        seed,
        c.zone,
        c.proto,
        c.src_hi,
        c.src_lo,
        c.dst_hi,
        c.dst_lo,
        np.int64(c.sport),
        hdp,
        ntype,
        np.int64(c.icmp_code),
    )


@njit(cache=True, inline="always")
def _stream_ts(c):
    # UDP keeps its "stream after" time in the two td_maxack words TCP uses
    return np.int64((np.uint64(c.td_maxack[1]) << _U32) | np.uint64(c.td_maxack[0]))


@njit(cache=True, inline="always")
def _set_stream_ts(c, t):
    c.td_maxack[0] = t & M32
    c.td_maxack[1] = (t >> 32) & M32


@njit(cache=True)
def _remove(ents, slot_ent, slot_hash, free, prm, e):
    """Delete entry ``e``: backward-shift its index slot, return it to the free stack."""
    mask = prm.meta[M_MASK]
    h = _entry_hash(ents[e], prm.meta[M_SEED])
    i = np.int64(np.uint32(h & np.uint64(M32))) & mask
    while slot_ent[i] != e:
        i = (i + 1) & mask
    j = i
    while True:
        j = (j + 1) & mask
        f = slot_ent[j]
        if f < 0:
            break
        k = np.int64(slot_hash[j]) & mask
        # leave f where it is if its home k lies cyclically in (i, j]
        if i <= j:
            stay = i < k <= j
        else:
            stay = k > i or k <= j
        if stay:
            continue
        slot_ent[i] = f
        slot_hash[i] = slot_hash[j]
        i = j
    slot_ent[i] = -1
    ents[e].status = 0
    free[prm.meta[M_FREE_TOP]] = e
    prm.meta[M_FREE_TOP] += 1
    prm.meta[M_COUNT] -= 1


@njit(cache=True)
def _alloc(ents, slot_ent, slot_hash, free, prm, h, now):
    """A free entry for a new connection with hash ``h``; -1 if the table is full.

    When full, scan a bounded range of index slots from the home slot (Linux's early_drop
    scans NF_CT_EVICTION_RANGE buckets) and evict the first expired or unassured entry.
    """
    if prm.meta[M_COUNT] >= prm.meta[M_CAPACITY]:
        mask = prm.meta[M_MASK]
        pos = np.int64(np.uint32(h & np.uint64(M32))) & mask
        victim = -1
        expired = False
        for k in range(prm.cfg[K.CFG_EVICT_RANGE]):
            e = slot_ent[(pos + k) & mask]
            if e < 0:
                continue
            c = ents[e]
            if c.deadline - now <= 0:
                victim = e
                expired = True
                break
            if (c.status & K.ST_ASSURED) == 0:
                victim = e
                break
        if victim < 0:
            return -1
        _remove(ents, slot_ent, slot_hash, free, prm, victim)
        if expired:
            prm.ctr[K.C_EXPIRED] += 1
        else:
            prm.ctr[K.C_EARLY_DROP] += 1
    prm.meta[M_FREE_TOP] -= 1
    e = free[prm.meta[M_FREE_TOP]]
    prm.meta[M_COUNT] += 1
    return e


# --- TCP ---------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _index(flags):
    if flags & K.TH_RST:
        return K.RST_SET
    if flags & K.TH_SYN:
        return K.SYNACK_SET if flags & K.TH_ACK else K.SYN_SET
    if flags & K.TH_FIN:
        return K.FIN_SET
    if flags & K.TH_ACK:
        return K.ACK_SET
    return K.NONE_SET


@njit(cache=True)
def _options(data, p, length):
    """(has_wscale, wscale, sack_perm) of the options at ``data[p:p+length]`` (tcp_options)."""
    ws, scale, sackp = False, 0, False
    while length > 0:
        op = data[p]
        p += 1
        if op == 0:
            break
        if op == 1:
            length -= 1
            continue
        if length < 2:
            break
        size = np.int64(data[p])
        p += 1
        if size < 2 or size > length:
            break
        if op == 4 and size == 2:
            sackp = True
        elif op == 3 and size == 3:
            scale = min(np.int64(data[p]), K.TCP_MAX_WSCALE)
            ws = True
        p += size - 2
        length -= size
    return ws, scale, sackp


@njit(cache=True)
def _apply_options(c, d, olen, ws, scale, sackp):
    if olen == 0:
        return
    c.td_scale[d] = 0
    f = c.tcp_flags[d] & K.BE_LIBERAL
    if sackp:
        f |= K.SACK_PERM
    if ws:
        f |= K.WINDOW_SCALE
        c.td_scale[d] = scale
    c.tcp_flags[d] = f


@njit(cache=True)
def _sack(data, p, length, sack):
    if length == 0:
        return sack
    if length == 12 and data[p] == 1 and data[p + 1] == 1 and data[p + 2] == 8 and data[p + 3] == 10:
        return sack
    while length > 0:
        op = data[p]
        p += 1
        if op == 0:
            return sack
        if op == 1:
            length -= 1
            continue
        if length < 2:
            return sack
        size = np.int64(data[p])
        p += 1
        if size < 2 or size > length:
            return sack
        if op == 5 and size >= 10 and (size - 2) % 8 == 0:
            for i in range(0, size - 2, 8):
                q = p + i + 4
                tmp = (
                    (np.int64(data[q]) << 24)
                    | (np.int64(data[q + 1]) << 16)
                    | (np.int64(data[q + 2]) << 8)
                    | np.int64(data[q + 3])
                )
                if _after(tmp, sack):
                    sack = tmp
            return sack
        p += size - 2
        length -= size
    return sack


@njit(cache=True)
def _init_sender(c, d, olen, ws, scale, sackp, end, win):
    c.td_end[d] = end
    c.td_maxend[d] = end
    c.td_maxwin[d] = win if win != 0 else 1
    _apply_options(c, d, olen, ws, scale, sackp)
    if d == 1 and not ((c.tcp_flags[1] & K.WINDOW_SCALE) and (c.tcp_flags[0] & K.WINDOW_SCALE)):
        c.td_scale[0] = 0
        c.td_scale[1] = 0


@njit(cache=True)
def _in_window(c, prm, d, idx, flags, seq, ack, win, end, olen, ws, scale, sackp, sackv):
    """1 accept, 0 ignore, -1 invalid (Linux's tcp_in_window)."""
    r = 1 - d
    syn = (flags & K.TH_SYN) != 0
    ackf = (flags & K.TH_ACK) != 0
    rst = (flags & K.TH_RST) != 0
    sack = ack
    win_raw = win
    liberal = (c.tcp_flags[d] & K.BE_LIBERAL) != 0 or prm.cfg[K.CFG_TCP_BE_LIBERAL] != 0
    if c.tcp_flags[r] & K.SACK_PERM:
        sack = sackv
    if c.td_maxwin[d] == 0:
        if syn:
            _init_sender(c, d, olen, ws, scale, sackp, end, win)
            if not ackf:
                return 1
        else:
            c.td_end[d] = end
            swin = (win << np.int64(c.td_scale[d])) & M32
            c.td_maxwin[d] = swin if swin != 0 else 1
            c.td_maxend[d] = (end + np.int64(c.td_maxwin[d])) & M32
            if c.td_maxwin[r] == 0:
                c.td_end[r] = sack
                c.td_maxend[r] = sack
            elif sack == ((np.int64(c.td_end[r]) + 1) & M32):
                c.td_end[r] = (np.int64(c.td_end[r]) + 1) & M32
    elif (
        syn
        and _after(end, np.int64(c.td_end[d]))
        and (c.tcp_state == K.SYN_SENT or c.tcp_state == K.SYN_RECV)
    ):
        _init_sender(c, d, olen, ws, scale, sackp, end, win)
        if d == 1 and not ackf:
            return 1
    s_end = np.int64(c.td_end[d])
    s_maxend = np.int64(c.td_maxend[d])
    s_maxwin = np.int64(c.td_maxwin[d])
    r_end = np.int64(c.td_end[r])
    r_maxend = np.int64(c.td_maxend[r])
    r_maxwin = np.int64(c.td_maxwin[r])
    if not ackf:
        ack = r_end
        sack = r_end
    elif (flags & (K.TH_ACK | K.TH_RST)) == (K.TH_ACK | K.TH_RST) and ack == 0:
        ack = r_end
        sack = r_end
    if rst and seq == 0 and c.tcp_state == K.SYN_SENT:
        seq = s_end
        end = s_end
    maxack_win = s_maxwin if s_maxwin > K.MAXACKWINCONST else K.MAXACKWINCONST
    if not _before(seq, (s_maxend + 1) & M32):
        overshot = (end - s_maxend + 1) & M32
        ack_ok = _after(sack, (r_end - maxack_win - 1) & M32)
        in_recv = r_maxwin != 0 and _after(end, (s_end - r_maxwin - 1) & M32)
        if in_recv and ack_ok and overshot <= r_maxwin and _before(sack, (r_end + 1) & M32):
            c.td_end[d] = end
            c.tcp_flags[d] |= K.DATA_UNACKNOWLEDGED
            return 1 if liberal else 0
        return 1 if liberal else -1
    if not _before(sack, (r_end + 1) & M32):
        return 1 if liberal else -1
    if not (r_maxwin == 0 or _after(end, (s_end - r_maxwin - 1) & M32)):
        return 1 if liberal else 0
    if not _after(sack, (r_end - maxack_win - 1) & M32):
        return 1 if liberal else 0
    if not syn:
        win = (win << np.int64(c.td_scale[d])) & M32
    swin = (win + (sack - ack)) & M32
    if s_maxwin < swin:
        c.td_maxwin[d] = swin
    if _after(end, s_end):
        c.td_end[d] = end
        c.tcp_flags[d] |= K.DATA_UNACKNOWLEDGED
    if ackf:
        if (c.tcp_flags[d] & K.MAXACK_SET) == 0:
            c.td_maxack[d] = ack
            c.tcp_flags[d] |= K.MAXACK_SET
        elif _after(ack, np.int64(c.td_maxack[d])):
            c.td_maxack[d] = ack
    if r_maxwin != 0 and _after(end, s_maxend):
        c.td_maxwin[r] = (r_maxwin + end - s_maxend) & M32
    if _after((sack + win) & M32, (r_maxend - 1) & M32):
        m = (sack + win) & M32
        if win == 0:
            m = (m + 1) & M32
        c.td_maxend[r] = m
    if ack == r_end:
        c.tcp_flags[r] &= ~K.DATA_UNACKNOWLEDGED & 0xFF
    if idx == K.ACK_SET:
        if (
            c.last_dir == d
            and c.last_seq == seq
            and c.last_ack == ack
            and c.last_end == end
            and c.last_win == win_raw
        ):
            if c.retrans < 255:
                c.retrans += 1
        else:
            c.last_dir = d
            c.last_seq = seq
            c.last_ack = ack
            c.last_end = end
            c.last_win = win_raw
            c.retrans = 0
    return 1


@njit(cache=True)
def _tcp_new(c, prm, flags, win, end, olen, ws, scale, sackp):
    idx = _index(flags)
    ns = TRANS[0, idx, K.NONE]
    if ns >= K.S_MAX:
        return False
    if ns == K.SYN_SENT:
        c.td_end[0] = end
        c.td_maxwin[0] = win if win != 0 else 1
        c.td_maxend[0] = end
        _apply_options(c, 0, olen, ws, scale, sackp)
    elif prm.cfg[K.CFG_TCP_LOOSE] == 0:
        return False
    else:
        c.td_end[0] = end
        c.td_maxwin[0] = win if win != 0 else 1
        c.td_maxend[0] = (end + np.int64(c.td_maxwin[0])) & M32
        c.tcp_flags[0] = K.SACK_PERM | K.BE_LIBERAL
        c.tcp_flags[1] = K.SACK_PERM | K.BE_LIBERAL
    c.last_index = K.NONE_SET
    return True


@njit(cache=True, inline="always")
def _established(c):
    return c.tcp_state == K.ESTABLISHED and (c.status & K.ST_ASSURED) != 0


@njit(cache=True)
def _tcp(c, prm, new, d, flags, seq, ack, win, seglen, olen, ws, scale, sackp, sackv, now):
    """1 accept (updated), 0 accept (ignored), -2 reopen, -3 kill, 100+reason invalid."""
    end = (seq + seglen + (1 if flags & K.TH_SYN else 0) + (1 if flags & K.TH_FIN else 0)) & M32
    if new and not _tcp_new(c, prm, flags, win, end, olen, ws, scale, sackp):
        return 100 + K.C_TCP_NEW
    old = np.int64(c.tcp_state)
    idx = _index(flags)
    ns = np.int64(TRANS[d, idx, old])
    skip_window = False
    if ns == K.SYN_SENT and old >= K.TIME_WAIT:
        if ((c.tcp_flags[0] | c.tcp_flags[1]) & K.CLOSE_INIT) != 0 or (
            c.last_dir == d and c.last_index == K.RST_SET
        ):
            return -2
        ns = K.S_IGNORE
    if ns == K.S_IGNORE:
        if idx == K.SYNACK_SET and c.last_index == K.SYN_SET and c.last_dir != d and ack == c.last_end:
            old = K.SYN_SENT
            ns = K.SYN_RECV
            ld = np.int64(c.last_dir)
            c.td_end[ld] = c.last_end
            c.td_maxend[ld] = c.last_end
            c.td_maxwin[ld] = c.last_win if c.last_win != 0 else 1
            c.td_scale[ld] = c.last_wscale
            c.last_flags &= ~K.EXP_CHALLENGE_ACK & 0xFF
            c.tcp_flags[ld] = c.last_flags
            c.td_end[d] = 0
            c.td_maxend[d] = 0
            c.td_maxwin[d] = 0
            c.td_maxack[d] = 0
            c.td_scale[d] = 0
            c.tcp_flags[d] &= K.BE_LIBERAL
        else:
            c.last_index = idx
            c.last_dir = d
            c.last_seq = seq
            c.last_end = end
            c.last_win = win
            if idx == K.SYN_SET and d == 0:
                lf = 0
                c.last_wscale = 0
                if ws:
                    lf |= K.WINDOW_SCALE
                    c.last_wscale = scale
                if sackp:
                    lf |= K.SACK_PERM
                if old == K.LAST_ACK:
                    lf |= K.EXP_CHALLENGE_ACK
                c.last_flags = lf
            if old == K.SYN_SENT and idx == K.ACK_SET and d == 1:
                c.last_ack = ack
            prm.ctr[K.C_IGNORED] += 1
            return 0
    elif ns == K.S_MAX:
        return 100 + K.C_TCP_STATE
    elif ns == K.TIME_WAIT:
        if (
            old == K.LAST_ACK
            and idx == K.ACK_SET
            and c.last_dir != d
            and c.last_index == K.SYN_SET
            and (c.last_flags & K.EXP_CHALLENGE_ACK) != 0
        ):
            c.last_flags &= ~K.EXP_CHALLENGE_ACK & 0xFF
            prm.ctr[K.C_IGNORED] += 1
            return 0
    elif ns == K.SYN_SENT2:
        c.last_flags |= K.SIMULTANEOUS_OPEN
    elif ns == K.SYN_RECV:
        if d == 1 and idx == K.ACK_SET and (c.last_flags & K.SIMULTANEOUS_OPEN) != 0:
            ns = K.ESTABLISHED
    elif ns == K.CLOSE and idx == K.RST_SET:
        st = c.tcp_state
        if st == K.FIN_WAIT or st == K.LAST_ACK or st == K.TIME_WAIT or st == K.CLOSE or st == K.CLOSE_WAIT:
            skip_window = True
        else:
            r = 1 - d
            done = False
            if (c.tcp_flags[r] & K.MAXACK_SET) != 0 and c.last_index != K.SYN_SET:
                maxack = np.int64(c.td_maxack[r])
                if seq == 0 and not _established(c):
                    done = True
                elif _before(seq, maxack) and prm.cfg[K.CFG_IGNORE_INVALID_RST] == 0:
                    return 100 + K.C_TCP_RST
                elif not _established(c) or seq == maxack:
                    done = True
                elif c.last_index == K.ACK_SET and c.last_dir == d and seq == c.last_end:
                    done = True
                else:
                    ns = old
            if not done:
                if (
                    ((c.status & K.ST_SEEN_REPLY) != 0 and c.last_index == K.SYN_SET)
                    or ((c.status & K.ST_ASSURED) == 0 and c.last_index == K.ACK_SET)
                ) and ack == c.last_end:
                    skip_window = True
                elif (
                    old == K.SYN_SENT and c.last_index == K.ACK_SET and c.last_dir == 1 and seq == c.last_ack
                ):
                    skip_window = True
    if not skip_window:
        res = _in_window(c, prm, d, idx, flags, seq, ack, win, end, olen, ws, scale, sackp, sackv)
        if res == 0:
            prm.ctr[K.C_IGNORED] += 1
            return 0
        if res < 0:
            # nf_tcp_handle_invalid: shrink the timeout of an assured connection that
            # sees an out-of-window FIN/RST answered the same way from the other side
            if (c.status & K.ST_ASSURED) != 0 and (idx == K.RST_SET or idx == K.FIN_SET):
                if c.last_dir != d and (c.last_index == K.FIN_SET or c.last_index == K.RST_SET):
                    expires = c.deadline - now
                    if expires >= 120 * K.NS and expires > prm.T[K.T_UNACK]:
                        c.deadline = now + prm.T[K.T_UNACK]
                else:
                    c.last_index = idx
                    c.last_dir = d
            return 100 + K.C_TCP_WINDOW
    c.last_index = idx
    c.last_dir = d
    c.tcp_state = ns
    if old != ns and ns == K.FIN_WAIT:
        c.tcp_flags[d] |= K.CLOSE_INIT
    if c.retrans >= prm.cfg[K.CFG_TCP_MAX_RETRANS] and prm.T[ns] > prm.T[K.T_RETRANS]:
        timeout = prm.T[K.T_RETRANS]
    elif idx == K.RST_SET:
        timeout = prm.T[K.CLOSE]
    elif ((c.tcp_flags[0] | c.tcp_flags[1]) & K.DATA_UNACKNOWLEDGED) != 0 and prm.T[ns] > prm.T[K.T_UNACK]:
        timeout = prm.T[K.T_UNACK]
    elif c.last_win == 0 and prm.T[ns] > prm.T[K.T_RETRANS]:
        timeout = prm.T[K.T_RETRANS]
    else:
        timeout = prm.T[ns]
    if (c.status & K.ST_SEEN_REPLY) == 0:
        if flags & K.TH_RST:
            return -3
        if idx == K.SYN_SET and old == K.SYN_SENT:
            return 1
        if ns == K.ESTABLISHED and timeout > prm.T[K.T_UNACK]:
            timeout = prm.T[K.T_UNACK]
    elif (
        (c.status & K.ST_ASSURED) == 0 and (old == K.SYN_RECV or old == K.ESTABLISHED) and ns == K.ESTABLISHED
    ):
        c.status |= K.ST_ASSURED
    c.deadline = now + timeout
    return 1


# --- one packet ----------------------------------------------------------------------------------
@njit(cache=True)
def _related(
    ents, slot_ent, slot_hash, free, prm, zone, ver, dhi, dlo, i, u64, u16, u8, data, pstart, plen, l4, now
):
    if (u8[B.FLAGS, i] & B.F_ICMP_ERR) == 0:
        prm.ctr[K.C_ICMP_ORPHAN] += 1
        return ST_INVALID
    iproto = np.int64(u8[B.INNER_PROTO, i])
    ishi, islo = u64[B.INNER_SRC_HI, i], u64[B.INNER_SRC_LO, i]
    idhi, idlo = u64[B.INNER_DST_HI, i], u64[B.INNER_DST_LO, i]
    isp, idp = np.int64(u16[B.INNER_SPORT, i]), np.int64(u16[B.INNER_DPORT, i])
    rt = 0
    icode = 0
    ntype = 0
    if iproto == K.IPPROTO_ICMP or iproto == K.IPPROTO_ICMPV6:
        ityp = np.int64(u8[B.INNER_ICMP_TYPE, i])
        inv = _icmp_inv(iproto, ityp)
        if inv < 0:
            prm.ctr[K.C_ICMP_ORPHAN] += 1
            return ST_INVALID
        rt = inv
        q = l4 + 8
        rr = -1
        if ver == 4 and q < plen:
            rr = q + (np.int64(data[pstart + q]) & 15) * 4
        elif ver == 6 and q + 6 < plen and data[pstart + q + 6] == K.IPPROTO_ICMPV6:
            rr = q + 40
        if rr >= 0 and rr + 1 < plen:
            icode = np.int64(data[pstart + rr + 1])
        idp = 0
        ntype = min(rt, ityp)
        # target: the inverted quoted tuple
        h = conn_hash(prm.meta[M_SEED], zone, iproto, idhi, idlo, ishi, islo, isp, isp, ntype, icode)
        e, d = _find(
            ents,
            slot_ent,
            slot_hash,
            prm.meta[M_MASK],
            h,
            zone,
            iproto,
            idhi,
            idlo,
            ishi,
            islo,
            isp,
            0,
            rt,
            icode,
        )
    else:
        if iproto != K.IPPROTO_TCP and iproto != K.IPPROTO_UDP:
            isp = 0
            idp = 0
        h = conn_hash(prm.meta[M_SEED], zone, iproto, idhi, idlo, ishi, islo, idp, isp, 0, 0)
        e, d = _find(
            ents,
            slot_ent,
            slot_hash,
            prm.meta[M_MASK],
            h,
            zone,
            iproto,
            idhi,
            idlo,
            ishi,
            islo,
            idp,
            isp,
            0,
            0,
        )
    if e >= 0 and ents[e].deadline - now <= 0:
        _remove(ents, slot_ent, slot_hash, free, prm, e)
        prm.ctr[K.C_EXPIRED] += 1
        e = -1
    if e < 0:
        prm.ctr[K.C_ICMP_ORPHAN] += 1
        return ST_INVALID
    c = ents[e]
    if d == 0:
        ok = c.dst_hi == dhi and c.dst_lo == dlo
    else:
        ok = c.src_hi == dhi and c.src_lo == dlo
    if not ok:
        prm.ctr[K.C_ICMP_MISMATCH] += 1
        return ST_INVALID
    return CS.TRACKED | CS.RELATED | (CS.REPLY if d == 1 else 0)


@njit(cache=True, inline="always")
def _outer_ok(err, tenant):
    # a UDP datagram to a tunnel port whose payload is not a tunnel header: the parser stops
    # in the payload, but the datagram itself (all the fields conntrack reads) is sound
    return tenant < 0 and (err == PE.TRUNC_TUNNEL or err == PE.BAD_TUNNEL)


# how far ahead the tracking pass prefetches (tried at 1M connections: 4, 8, 16 and 32
# packets ahead: 8 and 16 were best, 4 and 32 slower). Probing past the next slot for the
# entry to prefetch (a loop) cost 17 ns a packet in cache at 10K connections.
PREFETCH_AHEAD = 8


@njit(cache=True)
def process_batch(
    ents,
    ents_bytes,
    slot_ent,
    slot_hash,
    free,
    params,
    u64,
    u32,
    i32,
    u16,
    u8,
    data,
    offset,
    length,
    wire_len,
    ok_arr,
    now_arr,
    commit,
    start,
    n,
    out,
):
    """Track packets ``start..n-1`` in order; ``out[i]`` gets the ctstate bits of packet ``i``.

    Commit on allow: a packet that would open a connection takes an entry only where
    ``commit[i] > 0``; with ``commit[i] == 0`` it is reported NEW and leaves nothing behind (its
    connection was denied, so later packets of the flow find no entry); with ``commit[i] < 0``
    the verdict is not known yet: the kernel stops before changing anything for that packet and
    returns ``i``, so the caller can decide and call again from ``i``. Returns ``n`` when every
    packet was tracked. (A stop can follow the idempotent removal of an expired or reopened
    entry; the call from ``i`` then finds no entry and carries on the same way.)

    A first pass hashes every packet's connection; the tracking pass, in packet order, is
    software-pipelined: at packet ``i`` it prefetches the index slot of packet
    ``i + 2 * PREFETCH_AHEAD`` and the entry that the index of packet ``i + PREFETCH_AHEAD``
    points to (its home slot's, or the next slot's when the home slot holds another hash), so
    a packet's two cache misses (slot, then entry) are both in flight while the packets before
    it are tracked, a steady few at a time. The tracking pass is one loop body with no
    per-packet call taking arrays (each such call would cost reference counting on every
    array argument). ``ents_bytes`` is ``ents`` viewed as bytes, for prefetching.
    """
    prm = params[0]
    mask = prm.meta[M_MASK]
    seed = prm.meta[M_SEED]
    # per-packet hashes of packets start..n-1 (index i - start): the arrays may describe a
    # larger batch of which this call tracks one part
    hs = np.empty(max(n - start, 0), dtype=np.uint64)
    has = np.zeros(max(n - start, 0), dtype=np.bool_)
    esz = ents_bytes.shape[0] // ents.shape[0]
    # pass 1: hash each packet's connection
    for i in range(start, n):
        ver = u8[B.IP_VER, i]
        if ver == 0 or u8[B.ERROR, i] != 0 or (u8[B.FLAGS, i] & B.F_FRAG) != 0:
            continue
        proto = np.int64(u8[B.PROTO, i])
        sp = np.int64(u16[B.SPORT, i])
        dp = np.int64(u16[B.DPORT, i])
        ntype = 0
        ic = 0
        if proto == K.IPPROTO_ICMP or proto == K.IPPROTO_ICMPV6:
            t = np.int64(u8[B.ICMP_TYPE, i])
            inv = _icmp_inv(proto, t)
            l4 = np.int64(i32[B.L4_OFF, i])
            if inv < 0 or l4 < 0 or l4 + 6 > length[i]:
                continue
            sp = (np.int64(data[offset[i] + l4 + 4]) << 8) | np.int64(data[offset[i] + l4 + 5])
            dp = sp
            ntype = min(t, inv)
            ic = np.int64(u8[B.ICMP_CODE, i])
        elif proto != K.IPPROTO_TCP and proto != K.IPPROTO_UDP:
            sp = 0
            dp = 0
        tenant = np.int64(i32[B.TENANT, i])
        zone = tenant if tenant >= 0 else prm.cfg[K.CFG_DEFAULT_ZONE]
        h = conn_hash(
            seed,
            zone,
            proto,
            u64[B.SRC_HI, i],
            u64[B.SRC_LO, i],
            u64[B.DST_HI, i],
            u64[B.DST_LO, i],
            sp,
            dp,
            ntype,
            ic,
        )
        hs[i - start] = h
        has[i - start] = True
    # the first packets' index slots and entries, before the tracking loop reaches them
    for j in range(start, min(n, start + 2 * PREFETCH_AHEAD)):
        if has[j - start]:
            prefetch(slot_ent, np.int64(np.uint32(hs[j - start] & np.uint64(M32))) & mask)
    for j in range(start, min(n, start + PREFETCH_AHEAD)):
        if has[j - start]:
            h32 = np.uint32(hs[j - start] & np.uint64(M32))
            pos = np.int64(h32) & mask
            f = slot_ent[pos]
            if f >= 0 and slot_hash[pos] != h32:
                f = slot_ent[(pos + 1) & mask]
            if f >= 0:
                prefetch(ents_bytes, f * esz)
                prefetch(ents_bytes, f * esz + esz - 1)
    # pass 2: track, in order; 2 * PREFETCH_AHEAD packets ahead prefetch the index slot,
    # PREFETCH_AHEAD packets ahead the entry it points to (the home slot's, or the next
    # slot's where the home slot holds another hash: a hint, a wrong one is harmless)
    for i in range(start, n):
        j = i + 2 * PREFETCH_AHEAD
        if j < n and has[j - start]:
            prefetch(slot_ent, np.int64(np.uint32(hs[j - start] & np.uint64(M32))) & mask)
        j = i + PREFETCH_AHEAD
        if j < n and has[j - start]:
            h32 = np.uint32(hs[j - start] & np.uint64(M32))
            pos = np.int64(h32) & mask
            f = slot_ent[pos]
            if f >= 0 and slot_hash[pos] != h32:
                f = slot_ent[(pos + 1) & mask]
            if f >= 0:
                prefetch(ents_bytes, f * esz)
                prefetch(ents_bytes, f * esz + esz - 1)
        pstart = offset[i]
        plen = length[i]
        wire = wire_len[i]
        ok = ok_arr[i]
        now = now_arr[i]

        ver = u8[B.IP_VER, i]
        if ver == 0:
            out[i] = 0
            continue
        if u8[B.ERROR, i] != 0 and not _outer_ok(u8[B.ERROR, i], i32[B.TENANT, i]):
            prm.ctr[K.C_MALFORMED] += 1
            out[i] = ST_INVALID
            continue
        pflags = u8[B.FLAGS, i]
        if pflags & B.F_FRAG:
            prm.ctr[K.C_FRAGMENT] += 1
            out[i] = ST_INVALID
            continue
        proto = np.int64(u8[B.PROTO, i])
        is_icmp = (proto == K.IPPROTO_ICMP and ver == 4) or (proto == K.IPPROTO_ICMPV6 and ver == 6)
        if proto == K.IPPROTO_ICMP or proto == K.IPPROTO_ICMPV6:
            if not is_icmp:
                prm.ctr[K.C_ICMP_NEW] += 1
                out[i] = ST_INVALID
                continue
        if (
            prm.cfg[K.CFG_CHECKSUM] != 0
            and not ok
            and (proto == K.IPPROTO_TCP or proto == K.IPPROTO_UDP or is_icmp)
        ):
            prm.ctr[K.C_CHECKSUM] += 1
            out[i] = ST_INVALID
            continue
        tenant = np.int64(i32[B.TENANT, i])
        zone = tenant if tenant >= 0 else prm.cfg[K.CFG_DEFAULT_ZONE]
        shi, slo = u64[B.SRC_HI, i], u64[B.SRC_LO, i]
        dhi, dlo = u64[B.DST_HI, i], u64[B.DST_LO, i]
        l4 = np.int64(i32[B.L4_OFF, i])
        sp = np.int64(u16[B.SPORT, i])
        dp = np.int64(u16[B.DPORT, i])
        it = 0
        ic = 0
        ntype = 0
        flags = np.int64(u8[B.TCP_FLAGS, i])
        if is_icmp:
            t = np.int64(u8[B.ICMP_TYPE, i])
            if proto == K.IPPROTO_ICMP:
                if t > K.NR_ICMP_TYPES:
                    prm.ctr[K.C_ICMP_TYPE] += 1
                    out[i] = ST_INVALID
                    continue
                error = ICMP4_ERRORS[t]
            else:
                if ICMP6_UNTRACKED[t]:
                    out[i] = 0
                    continue
                error = t < 128  # ICMPv6 errors are the types below 128
            if error:
                out[i] = _related(
                    ents,
                    slot_ent,
                    slot_hash,
                    free,
                    prm,
                    zone,
                    ver,
                    dhi,
                    dlo,
                    i,
                    u64,
                    u16,
                    u8,
                    data,
                    pstart,
                    plen,
                    l4,
                    now,
                )
                continue
            inv = _icmp_inv(proto, t)
            if inv < 0:
                prm.ctr[K.C_ICMP_NEW] += 1
                out[i] = ST_INVALID
                continue
            it = t
            ic = np.int64(u8[B.ICMP_CODE, i])
            sp = 0
            if l4 >= 0 and l4 + 6 <= plen:
                sp = (np.int64(data[pstart + l4 + 4]) << 8) | np.int64(data[pstart + l4 + 5])
            dp = 0
            ntype = min(t, inv)
        elif proto != K.IPPROTO_TCP and proto != K.IPPROTO_UDP:
            sp = 0
            dp = 0
        if proto == K.IPPROTO_TCP:
            if VALID_FLAGS[flags & ~(K.TH_ECE | K.TH_CWR | K.TH_PSH) & 0x3F] == 0:
                prm.ctr[K.C_TCP_FLAGS] += 1
                out[i] = ST_INVALID
                continue
        hsp = sp
        hdp = sp if is_icmp else dp
        if has[i - start]:
            h = hs[i - start]  # pass 1 hashed the same fields
        else:
            h = conn_hash(seed, zone, proto, shi, slo, dhi, dlo, hsp, hdp, ntype, ic)
        scratch = prm.meta[M_CAPACITY]
        while True:
            e = -1
            d = 0
            h32 = np.uint32(h & np.uint64(M32))
            pos = np.int64(h32) & mask
            while True:
                f = slot_ent[pos]
                if f < 0:
                    break
                if slot_hash[pos] == h32:
                    dd = _match(ents[f], zone, proto, shi, slo, dhi, dlo, sp, dp, it, ic)
                    if dd >= 0:
                        e = f
                        d = dd
                        break
                pos = (pos + 1) & mask
            if e >= 0 and ents[e].deadline - now <= 0:
                _remove(ents, slot_ent, slot_hash, free, prm, e)
                prm.ctr[K.C_EXPIRED] += 1
                e = -1
            new = e < 0
            if new and commit[i] < 0:
                return i  # the caller decides this packet first
            if new:
                e = scratch
                ents[e] = ents[scratch + 1]  # all-zero template
                c = ents[e]
                c.zone = zone
                c.proto = proto
                c.src_hi = shi
                c.src_lo = slo
                c.dst_hi = dhi
                c.dst_lo = dlo
                c.sport = sp
                c.dport = dp
                c.icmp_type = it
                c.icmp_code = ic
                d = 0
            c = ents[e]
            if d == 1:
                info = CS.ESTABLISHED | CS.REPLY
            elif c.status & K.ST_SEEN_REPLY:
                info = CS.ESTABLISHED
            else:
                info = CS.NEW
            if proto == K.IPPROTO_TCP:
                seq = np.int64(u32[B.TCP_SEQ, i])
                ack = np.int64(u32[B.TCP_ACK, i])
                win = np.int64(u16[B.TCP_WIN, i])
                seglen = np.int64(i32[B.PAYLOAD_LEN, i])
                op = pstart + l4 + 20
                olen = np.int64(u8[B.TCP_DOFF, i]) - 20
                if olen < 0 or l4 < 0:
                    olen = 0
                elif l4 + 20 + olen > plen:
                    olen = max(0, plen - l4 - 20)
                ws = False
                scale = 0
                sackp = False
                sackv = ack
                if olen > 0:
                    ws, scale, sackp = _options(data, op, olen)
                    sackv = _sack(data, op, olen, ack)
                res = _tcp(c, prm, new, d, flags, seq, ack, win, seglen, olen, ws, scale, sackp, sackv, now)
                if res == -2:
                    _remove(ents, slot_ent, slot_hash, free, prm, e)
                    prm.ctr[K.C_DELETED] += 1
                    continue
            elif proto == K.IPPROTO_UDP:
                if new:
                    _set_stream_ts(c, now + K.UDP_STREAM_AFTER_NS)
                if c.status & K.ST_SEEN_REPLY:
                    extra = prm.T[K.T_UDP]
                    stream = False
                    if now - _stream_ts(c) > 0:
                        extra = prm.T[K.T_UDP_STREAM]
                        stream = (c.status & K.ST_ASSURED) == 0
                    c.deadline = now + extra
                    if stream:
                        c.status |= K.ST_ASSURED
                else:
                    c.deadline = now + prm.T[K.T_UDP]
                res = 1
            elif is_icmp:
                if proto == K.IPPROTO_ICMP:
                    valid = ICMP4_VALID_NEW[c.icmp_type]
                    tmo = prm.T[K.T_ICMP]
                else:
                    valid = ICMP6_VALID_NEW[c.icmp_type]
                    tmo = prm.T[K.T_ICMPV6]
                if valid == 0:
                    res = 100 + K.C_ICMP_NEW
                else:
                    c.deadline = now + tmo
                    res = 1
            else:
                c.deadline = now + prm.T[K.T_GENERIC]
                res = 1
            if res >= 100:
                prm.ctr[res - 100] += 1
                out[i] = ST_INVALID
                break
            if res == -3:
                if not new:
                    _remove(ents, slot_ent, slot_hash, free, prm, e)
                prm.ctr[K.C_CLOSED] += 1
                out[i] = CS.TRACKED | info
                break
            if new and commit[i] == 0:
                out[i] = CS.TRACKED | info  # denied: nothing is committed
                break
            if new:
                f = _alloc(ents, slot_ent, slot_hash, free, prm, h, now)
                if f < 0:
                    prm.ctr[K.C_TABLE_FULL] += 1
                    out[i] = ST_INVALID
                    break
                ents[f] = ents[scratch]
                e = f
                c = ents[e]
                c.status |= K.ST_USED
                h32 = np.uint32(h & np.uint64(M32))
                pos = np.int64(h32) & mask
                while slot_ent[pos] >= 0:
                    pos = (pos + 1) & mask
                slot_ent[pos] = e
                slot_hash[pos] = h32
                prm.ctr[K.C_CREATED] += 1
            c.bytes[d] += wire
            if d == 1:
                c.status |= K.ST_SEEN_REPLY
            out[i] = CS.TRACKED | info
            break
    return n


@njit(cache=True)
def expire(ents, slot_ent, slot_hash, free, params, budget, now):
    """Visit ``budget`` entries from the cursor on; delete those past their deadline."""
    prm = params[0]
    cap = prm.meta[M_CAPACITY]
    cur = prm.meta[M_CURSOR]
    removed = 0
    for _ in range(min(budget, cap)):
        c = ents[cur]
        if (c.status & K.ST_USED) != 0 and c.deadline - now <= 0:
            _remove(ents, slot_ent, slot_hash, free, prm, cur)
            removed += 1
        cur += 1
        if cur == cap:
            cur = 0
    prm.meta[M_CURSOR] = cur
    prm.ctr[K.C_EXPIRED] += removed
    return removed


@njit(cache=True)
def delete_entries(ents, slot_ent, slot_hash, free, params, idx):
    prm = params[0]
    k = 0
    for j in range(idx.shape[0]):
        e = idx[j]
        if 0 <= e < prm.meta[M_CAPACITY] and (ents[e].status & K.ST_USED) != 0:
            _remove(ents, slot_ent, slot_hash, free, prm, e)
            k += 1
    prm.ctr[K.C_DELETED] += k
    return k


@njit(cache=True)
def lookup_batch(
    ents,
    slot_ent,
    slot_hash,
    params,
    u64,
    i32,
    u16,
    u8,
    data,
    offset,
    length,
    now,
    start,
    n,
    ent_out,
    dir_out,
):
    """Entry and direction of the connection of packets ``start..n-1``, changing nothing
    (-1: none)."""
    prm = params[0]
    for i in range(start, n):
        ent_out[i] = -1
        dir_out[i] = 0
        ver = u8[B.IP_VER, i]
        if ver == 0 or (u8[B.ERROR, i] != 0 and not _outer_ok(u8[B.ERROR, i], i32[B.TENANT, i])):
            continue
        proto = np.int64(u8[B.PROTO, i])
        is_icmp = (proto == K.IPPROTO_ICMP and ver == 4) or (proto == K.IPPROTO_ICMPV6 and ver == 6)
        tenant = np.int64(i32[B.TENANT, i])
        zone = tenant if tenant >= 0 else prm.cfg[K.CFG_DEFAULT_ZONE]
        sp = np.int64(u16[B.SPORT, i])
        dp = np.int64(u16[B.DPORT, i])
        it = 0
        ic = 0
        ntype = 0
        if is_icmp:
            it = np.int64(u8[B.ICMP_TYPE, i])
            inv = _icmp_inv(proto, it)
            if inv < 0:
                continue
            ic = np.int64(u8[B.ICMP_CODE, i])
            l4 = np.int64(i32[B.L4_OFF, i])
            sp = 0
            if l4 >= 0 and l4 + 6 <= length[i]:
                sp = (np.int64(data[offset[i] + l4 + 4]) << 8) | np.int64(data[offset[i] + l4 + 5])
            dp = 0
            ntype = min(it, inv)
        elif proto != K.IPPROTO_TCP and proto != K.IPPROTO_UDP:
            sp = 0
            dp = 0
        shi, slo = u64[B.SRC_HI, i], u64[B.SRC_LO, i]
        dhi, dlo = u64[B.DST_HI, i], u64[B.DST_LO, i]
        h = conn_hash(prm.meta[M_SEED], zone, proto, shi, slo, dhi, dlo, sp, sp if is_icmp else dp, ntype, ic)
        e, d = _find(
            ents, slot_ent, slot_hash, prm.meta[M_MASK], h, zone, proto, shi, slo, dhi, dlo, sp, dp, it, ic
        )
        if e >= 0 and ents[e].deadline - now[i] > 0:
            ent_out[i] = e
            dir_out[i] = d


@njit(cache=True)
def rebuild_index(ents, slot_ent, slot_hash, free, params):
    prm = params[0]
    slot_ent[:] = -1
    cap = prm.meta[M_CAPACITY]
    top = 0
    count = 0
    for e in range(cap - 1, -1, -1):
        c = ents[e]
        if (c.status & K.ST_USED) == 0:
            free[top] = e
            top += 1
            continue
        h = _entry_hash(c, prm.meta[M_SEED])
        _index_insert(slot_ent, slot_hash, prm.meta[M_MASK], h, e)
        count += 1
    prm.meta[M_FREE_TOP] = top
    prm.meta[M_COUNT] = count
