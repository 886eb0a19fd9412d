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
) = range(16)
N_CTL = 16
# C_STATUS after a call
DONE, STOP, CHUNK_DONE = 0, 1, 2

_NEW = CS.TRACKED | CS.NEW
NO_TENANT, UNKNOWN_VNI = -1, -2  # tenant row of a packet whose tenant is not known


_SH32, _MAPPED = np.uint64(32), np.uint64(0xFFFF)


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
    t_vni,
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
    connection (``pending[:ctl[C_N_PENDING]]`` are that packet and every later one of its
    chunk with no connection yet: the caller judges them as NEW, writes ``commit`` and calls
    again), ``CHUNK_DONE`` after each chunk when ``ctl[C_ONE_CHUNK]``, ``DONE`` at the end.
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
            ti = untagged if vni == -1 else tenant_index(t_vni, np.int64(vni))
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
            # packet ``stop`` would open a connection: it and every later packet of the chunk
            # that has no connection and no verdict yet are judged as NEW by the caller
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
                ce,
                ent_tmp,
                dir_tmp,
            )
            k = 0
            pending[k] = stop
            k += 1
            for i in range(stop + 1, ce):
                if commit[i] < 0 and ent_tmp[i] < 0:
                    pending[k] = i
                    k += 1
            ctl[C_N_PENDING] = k
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
