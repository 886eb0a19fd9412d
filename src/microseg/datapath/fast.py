"""The fast path: endpoint identities (which workload sends and receives each packet, and
whose MAC it carries)."""
from __future__ import annotations

import numpy as np
from numba import njit

from ..packet import batch as B
from ..packet.batch import FlowKeys
from ..policy.compiler import CompiledPolicy, lookup_endpoint, tenant_index

NO_L2 = 0xFFFF          # source identity of a packet with no Ethernet header (raw IP)
UNKNOWN_MAC = 0xFFFE    # source MAC that no workload of the tenant owns


@njit(cache=True)
def _identities(u64, i32, n, t_vni, untagged, a_t, a_hi, a_lo, a_w, m_t, m_mac, m_lo, m_w,
                src_w, dst_w, src_id):
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
    _identities(keys.u64, keys.i32, n, t.tenant_vnis, t.untagged, *t.addresses, *t.macs,
                src_w, dst_w, sid)
    return src_w, dst_w, sid
