"""The fast path: one compiled call per batch answers tracked traffic.

:func:`fast_kernel` names every packet's endpoints (tenant, source and destination workload,
the owner of the source MAC), runs connection tracking (the conntrack table's own kernel:
Linux's window tracking, commit on allow), gives each ESTABLISHED, RELATED and INVALID packet
its verdict from port security and its state, and counts it. Only what needs the policy's
rules leaves it, gathered once: NEW and untracked packets (:mod:`.slow`), and the packets that
would open a connection, which the caller judges while the kernel waits.
:func:`source_identity` is the identity part alone, for traces.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .. import ctstate as CS
from ..conntrack import kernels as KN
from ..lowlevel import mix_word, pow2_at_least
from ..packet import batch as B
from ..packet.batch import FlowKeys
from ..policy.compiler import CompiledPolicy, lookup_endpoint, tenant_index
from . import reasons as V
from .reasons import L_STATE

NO_L2 = 0xFFFF  # source identity of a packet with no Ethernet header (raw IP)
UNKNOWN_MAC = 0xFFFE  # source MAC that no workload of the tenant owns


@njit(cache=True)
def _identities(
    u64, i32, n, t_vni, untagged, a_t, a_hi, a_lo, a_w, m_t, m_mac, m_lo, m_w, src_w, dst_w, src_id
):
    zero = np.uint64(0)
    for i in range(n):
        src_w[i] = -1
        dst_w[i] = -1
        src_id[i] = UNKNOWN_MAC
        vni = i32[B.TENANT, i]
        ti = untagged if vni == -1 else tenant_index(t_vni, np.int64(vni))
        if ti < 0:
            continue
        tt = np.int64(ti)
        src_w[i] = lookup_endpoint(a_t, a_hi, a_lo, a_w, tt, u64[B.SRC_HI, i], u64[B.SRC_LO, i])
        dst_w[i] = lookup_endpoint(a_t, a_hi, a_lo, a_w, tt, u64[B.DST_HI, i], u64[B.DST_LO, i])
        if i32[B.L2_OFF, i] < 0:
            src_id[i] = NO_L2
        else:
            owner = lookup_endpoint(m_t, m_mac, m_lo, m_w, tt, u64[B.ETH_SRC, i], zero)
            if 0 <= owner < UNKNOWN_MAC:
                src_id[i] = owner


def source_identity(policy: CompiledPolicy, keys: FlowKeys):
    """``(src_workload, dst_workload, source_id)`` per packet.

    ``source_id`` is the index of the workload that owns the frame's source MAC in its tenant,
    ``UNKNOWN_MAC`` when none does, ``NO_L2`` for raw IP: everything port security looks at
    beyond the addresses, in 16 bits.
    """
    n = keys.n
    src_w = np.empty(n, np.int32)
    dst_w = np.empty(n, np.int32)
    sid = np.empty(n, np.uint16)
    t = policy.endpoint_tables
    _identities(keys.u64, keys.i32, n, t.tenant_vnis, t.untagged, *t.addresses, *t.macs, src_w, dst_w, sid)
    return src_w, dst_w, sid


@njit(cache=True, inline="always")
def _set_size(n):
    """The length of an open-addressing set for ``n`` keys: the least power of two that is
    at least ``2 * n`` and 16."""
    size = 16
    while size < 2 * n:
        size <<= 1
    return size


@njit(cache=True)
def _pending(
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
    commit,
    stop,
    end,
    ent_tmp,
    dir_tmp,
    ckey,
    pending,
    follow,
):
    """What the caller judges as NEW when packet ``stop`` would open a connection: ``stop``
    itself and, of the packets ``stop+1..end-1`` that have no connection and no verdict yet,
    the first of each connection (``pending``; every ICMP or other packet that is not TCP or
    UDP counts as its own connection). The other packets with no connection (``follow``) find
    the entry that first packet creates if it is allowed; where it is not, the caller judges
    them too (:func:`denied_followers`). Returns ``(pending count, follow count)``;
    ``ckey[i]`` is the key of each such packet's connection (:func:`_conn_key`).

    The guess can only cost time, never a verdict: the kernel stops at any packet that would
    open a connection while it has no verdict (a packet whose first packet was not an opener,
    or whose entry ended meanwhile), and the policy's answer to a NEW packet depends on the
    packet alone, not on when it is asked."""
    KN.lookup_batch(
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
        stop,
        end,
        ent_tmp,
        dir_tmp,
    )
    seen = np.zeros(_set_size(end - stop), np.uint64)
    k = 0
    nf = 0
    for i in range(stop, end):
        if i == stop or (commit[i] < 0 and ent_tmp[i] < 0):
            key = _conn_key(u64, i32, u16, u8, i)
            ckey[i] = key
            if key != np.uint64(0) and not _first_sight(seen, key):
                follow[nf] = i
                nf += 1
                continue
            pending[k] = i
            k += 1
    return k, nf


@njit(cache=True)
def denied_followers(rows, commit, follow, ckey, out):
    """Of ``follow`` (see :func:`_pending`), the packets whose connection's first packet among
    ``rows`` was denied (``commit`` 0) into ``out``; returns their count."""
    size = _set_size(rows.shape[0])
    seen = np.zeros(size, np.uint64)
    any_denied = False
    for j in range(rows.shape[0]):
        i = rows[j]
        if commit[i] == 0 and ckey[i] != np.uint64(0):
            _first_sight(seen, ckey[i])
            any_denied = True
    m = 0
    if any_denied:
        mask = size - 1
        for j in range(follow.shape[0]):
            key = ckey[follow[j]]
            h = np.int64(key & np.uint64(mask))
            while seen[h] != 0:
                if seen[h] == key:
                    out[m] = follow[j]
                    m += 1
                    break
                h = (h + 1) & mask
    return m


def tenant_table(tenant_vnis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tenants' VNIs (sorted, a tenant's index is its position: ``tenant_index``) as an
    open-addressing table ``(keys, values)`` from VNI to tenant index, probed by
    :func:`_tenant_of` in the fast kernel: one probe instead of a binary search whose ten
    unpredictable steps at 1,000 tenants cost as much as the rest of a packet's identities."""
    vnis = np.asarray(tenant_vnis, np.int64)
    size = max(16, pow2_at_least(2 * vnis.shape[0]))
    keys = np.full(size, -1, np.int64)
    vals = np.full(size, -1, np.int32)
    _fill_tenants(vnis, keys, vals)
    return keys, vals


@njit(cache=True, inline="always")
def _tenant_slot(vni, mask):
    return np.int64(mix_word(np.uint64(0), np.uint64(vni)) & np.uint64(mask))


@njit(cache=True)
def _fill_tenants(vnis, keys, vals):
    mask = keys.shape[0] - 1
    for i in range(vnis.shape[0]):
        j = _tenant_slot(vnis[i], mask)
        while keys[j] >= 0:
            j = (j + 1) & mask
        keys[j] = vnis[i]
        vals[j] = i


@njit(cache=True, inline="always")
def _tenant_of(keys, vals, vni):
    """The tenant index of ``vni`` in a :func:`tenant_table`, -1 none."""
    mask = keys.shape[0] - 1
    j = _tenant_slot(vni, mask)
    while keys[j] >= 0:
        if keys[j] == vni:
            return np.int64(vals[j])
        j = (j + 1) & mask
    return np.int64(-1)


# ---------------------------------------------------------------------------------------------
# The fast kernel: one compiled call per batch for tracked traffic
# ---------------------------------------------------------------------------------------------
# control words (an int64 array shared by the kernel and its caller)
(
    C_POS,
    C_N,
    C_BATCH,
    C_FIRST,
    C_UNTAGGED,
    C_ANTI_SPOOF,
    C_COUNT,
    C_ONE_CHUNK,
    C_EXPIRE,
    C_LAST_NOW,
    C_STATUS,
    C_N_PENDING,
    C_N_SLOW,
    C_CHUNK_START,
    C_CHUNK_END,
    C_FAST,
    C_N_FOLLOW,
) = range(17)
N_CTL = 17
# C_STATUS after a call
DONE, STOP, CHUNK_DONE = 0, 1, 2

_NEW = CS.TRACKED | CS.NEW
NO_TENANT, UNKNOWN_VNI = -1, -2  # tenant row of a packet whose tenant is not known
LOOKAHEAD = 4  # chunks after a stop whose packets with no connection are judged with it


_SH32, _MAPPED = np.uint64(32), np.uint64(0xFFFF)


@njit(cache=True, inline="always")
def _conn_key(u64, i32, u16, u8, i):
    """A hash of packet ``i``'s TCP or UDP connection, the same for both directions (never
    0); 0 for any other packet. Collisions only merge guesses (see the stop in fast_kernel)."""
    ver = u8[B.IP_VER, i]
    proto = u8[B.PROTO, i]
    if ver == 0 or u8[B.ERROR, i] != 0 or (u8[B.FLAGS, i] & B.F_FRAG) or (proto != 6 and proto != 17):
        return np.uint64(0)
    a_hi, a_lo, a_p = u64[B.SRC_HI, i], u64[B.SRC_LO, i], np.uint64(u16[B.SPORT, i])
    b_hi, b_lo, b_p = u64[B.DST_HI, i], u64[B.DST_LO, i], np.uint64(u16[B.DPORT, i])
    if a_hi > b_hi or (a_hi == b_hi and (a_lo > b_lo or (a_lo == b_lo and a_p > b_p))):
        a_hi, a_lo, a_p, b_hi, b_lo, b_p = b_hi, b_lo, b_p, a_hi, a_lo, a_p
    h = mix_word(np.uint64(np.int64(i32[B.TENANT, i]) & 0xFFFFFFFF) | (np.uint64(proto) << _SH32), a_hi)
    h = mix_word(mix_word(mix_word(mix_word(mix_word(h, a_lo), a_p), b_hi), b_lo), b_p)
    return h | np.uint64(1)


@njit(cache=True, inline="always")
def _first_sight(seen, key):
    """Add ``key`` to the open-addressing set ``seen`` (a power of two long, 0 = empty);
    True when it was not there."""
    m = seen.shape[0] - 1
    j = np.int64(key & np.uint64(m))
    while seen[j] != 0:
        if seen[j] == key:
            return False
        j = (j + 1) & m
    seen[j] = key
    return True


@njit(cache=True)
def fast_kernel(
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
    now,
    csum_ok,
    t_key,
    t_val,
    a_t,
    a_hi,
    a_lo,
    a_w,
    m_t,
    m_mac,
    m_lo,
    m_w,
    w_mac,
    commit,
    ct,
    tix,
    owner,
    src_w,
    dst_w,
    src_id,
    verdict,
    reason,
    rule,
    level,
    ent_tmp,
    dir_tmp,
    pending,
    follow,
    ckey,
    slow,
    vnis,
    c_verdict,
    c_reason,
    c_level,
    c_ct,
    c_rule,
    w_tx,
    w_rx,
    w_drop,
    c_tenant,
    ctl,
):
    """Packets ``ctl[C_POS]..ctl[C_N]-1`` of a parsed batch, in chunks of ``ctl[C_BATCH]``.

    First call (``ctl[C_FIRST]``): every packet's tenant, workloads and source-MAC owner.
    Then per chunk: conntrack (the table's own kernel, Linux's window tracking, commit on
    allow), the conntrack sweep, and the verdict of every tracked packet that is not NEW
    (the policy's checks before its rules), counted at once when ``ctl[C_COUNT]``
    (tenant rows of the counters are the policy's tenant indices). What needs the policy's
    rules -- NEW and untracked packets -- is appended to ``slow`` (``ctl[C_N_SLOW]`` rows).

    Returns to the caller with ``ctl[C_STATUS]``: ``STOP`` when a packet would open a
    connection (``pending[:ctl[C_N_PENDING]]`` are that packet and the first later one of
    each connection of its chunk with none yet, ``follow[:ctl[C_N_FOLLOW]]`` the other later
    ones, ``ckey`` their connections' keys: the caller judges them as NEW, writes ``commit``
    and calls again), ``CHUNK_DONE`` after each chunk when ``ctl[C_ONE_CHUNK]``, ``DONE`` at the end.
    """
    n = ctl[C_N]
    bs = ctl[C_BATCH]
    untagged = ctl[C_UNTAGGED]
    zero = np.uint64(0)
    if ctl[C_FIRST]:
        ctl[C_FIRST] = 0
        for i in range(n):
            src_w[i] = -1
            dst_w[i] = -1
            owner[i] = -1
            src_id[i] = UNKNOWN_MAC
            vni = i32[B.TENANT, i]
            ti = untagged if vni == -1 else _tenant_of(t_key, t_val, np.int64(vni))
            if ti < 0:
                tix[i] = NO_TENANT if vni == -1 else UNKNOWN_VNI
                continue
            tix[i] = ti
            tt = np.int64(ti)
            src_w[i] = lookup_endpoint(a_t, a_hi, a_lo, a_w, tt, u64[B.SRC_HI, i], u64[B.SRC_LO, i])
            dst_w[i] = lookup_endpoint(a_t, a_hi, a_lo, a_w, tt, u64[B.DST_HI, i], u64[B.DST_LO, i])
            if i32[B.L2_OFF, i] < 0:
                src_id[i] = NO_L2
            else:
                o = lookup_endpoint(m_t, m_mac, m_lo, m_w, tt, u64[B.ETH_SRC, i], zero)
                owner[i] = o
                if 0 <= o < UNKNOWN_MAC:
                    src_id[i] = o
    anti_spoof = ctl[C_ANTI_SPOOF] != 0
    count = ctl[C_COUNT] != 0
    nv = vnis.shape[0]
    fast_on = ctl[C_FAST] != 0  # 0: every packet to the slow path (for comparison)
    pos = ctl[C_POS]
    ns = ctl[C_N_SLOW]
    while pos < n:
        cs = (pos // bs) * bs
        ce = min(cs + bs, n)
        # the conntrack kernel (software-pipelined prefetch, see its docstring) is compiled
        # into this one; the kernel cache follows every source file (microseg.kernelcache),
        # so a change there recompiles this kernel too
        stop = KN.process_batch(
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
            csum_ok,
            now,
            commit,
            pos,
            ce,
            ct,
        )
        if stop < ce:
            # packet ``stop`` would open a connection: the caller judges it, and the packets
            # after it that have no connection yet, as NEW (see _pending)
            k, nf = _pending(
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
                commit,
                stop,
                min(n, stop + LOOKAHEAD * bs),
                ent_tmp,
                dir_tmp,
                ckey,
                pending,
                follow,
            )
            ctl[C_N_PENDING] = k
            ctl[C_N_FOLLOW] = nf
            ctl[C_POS] = stop
            ctl[C_N_SLOW] = ns
            ctl[C_STATUS] = STOP
            return
        last = ctl[C_LAST_NOW]
        if now[ce - 1] > last:
            last = now[ce - 1]
            ctl[C_LAST_NOW] = last
        if ctl[C_EXPIRE] > 0:
            KN.expire(ents, slot_ent, slot_hash, free, params, ctl[C_EXPIRE], last)
        for i in range(cs, ce):
            c = ct[i]
            st = c & CS.STATE_MASK
            if c != 0 and st != CS.NEW and fast_on:
                # a tracked packet that is not NEW: the policy's checks before its rules
                # (CompiledPolicy.decide) settle it; written out here, not called, because a
                # per-packet call taking arrays costs reference counting on each of them
                v = V.ALLOW
                t = tix[i]
                ipv = u8[B.IP_VER, i]
                if u8[B.ERROR, i] != 0:
                    v, r = V.DROP, V.R_PARSE_ERROR
                elif t == NO_TENANT:
                    v, r = V.DROP, V.R_NO_TENANT
                elif t == UNKNOWN_VNI:
                    v, r = V.DROP, V.R_UNKNOWN_VNI
                elif ipv != 4 and ipv != 6:
                    if u8[B.FLAGS, i] & B.F_ARP:
                        r = V.R_ARP
                    else:
                        v, r = V.DROP, V.R_NON_IP
                elif ipv == 6 and (
                    (u64[B.SRC_HI, i] == 0 and (u64[B.SRC_LO, i] >> _SH32) == _MAPPED)
                    or (u64[B.DST_HI, i] == 0 and (u64[B.DST_LO, i] >> _SH32) == _MAPPED)
                ):
                    v, r = V.DROP, V.R_MAPPED_ADDRESS
                elif (
                    anti_spoof
                    and i32[B.L2_OFF, i] >= 0
                    and (
                        (
                            src_w[i] >= 0
                            and w_mac[src_w[i]] >= 0
                            and np.uint64(w_mac[src_w[i]]) != u64[B.ETH_SRC, i]
                        )
                        or (owner[i] >= 0 and owner[i] != src_w[i])
                    )
                ):
                    v, r = V.DROP, V.R_SPOOFED
                elif (
                    ipv == 6
                    and u8[B.PROTO, i] == 58
                    and (u8[B.FLAGS, i] & B.F_ICMP)
                    and u8[B.ICMP_TYPE, i] >= 133
                    and u8[B.ICMP_TYPE, i] <= 136
                ):
                    r = V.R_ND
                elif c & CS.INVALID:
                    v, r = V.DROP, V.R_INVALID
                elif c & CS.ESTABLISHED:
                    r = V.R_ESTABLISHED
                else:
                    r = V.R_RELATED
                verdict[i] = v
                reason[i] = r
                rule[i] = -1
                level[i] = L_STATE
            elif not (commit[i] >= 0 and c == _NEW):
                slow[ns] = i  # the policy's rules decide (caches first)
                ns += 1
                continue
            if count:
                # the counters of counters.count_rows, for this packet
                vv = verdict[i]
                c_verdict[vv] += 1
                c_reason[reason[i]] += 1
                c_level[level[i]] += 1
                c_ct[c & 15] += 1
                rr = rule[i]
                if 0 <= rr < c_rule.shape[0]:
                    c_rule[rr] += 1
                sw, dw = src_w[i], dst_w[i]
                if vv == 1:
                    if 0 <= sw < w_tx.shape[0]:
                        w_tx[sw] += 1
                    if 0 <= dw < w_rx.shape[0]:
                        w_rx[dw] += 1
                elif 0 <= sw < w_drop.shape[0]:
                    w_drop[sw] += 1
                trow = tix[i] if (i32[B.TENANT, i] >= 0 and tix[i] >= 0) else nv
                c_tenant[trow, vv] += 1
        pos = ce
        ctl[C_POS] = pos
        if ctl[C_ONE_CHUNK]:
            ctl[C_CHUNK_START] = cs
            ctl[C_CHUNK_END] = ce
            ctl[C_N_SLOW] = ns
            ctl[C_STATUS] = CHUNK_DONE if pos < n else DONE
            return
    ctl[C_CHUNK_START] = (max(n - 1, 0) // bs) * bs
    ctl[C_CHUNK_END] = n
    ctl[C_N_SLOW] = ns
    ctl[C_STATUS] = DONE
