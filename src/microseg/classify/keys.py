"""Packet keys: the ``(n, NW)`` uint64 words every classifier looks up (layout in ``rules``).

Built from the parser's :class:`~microseg.packet.batch.FlowKeys` (plus conntrack state and
ingress port), or from raw header columns (ClassBench traces carry no packets).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..errors import InputError
from ..packet import batch as B
from .rules import (
    K_CT,
    K_DST_HI,
    K_DST_LO,
    K_L4,
    K_META,
    K_SRC_HI,
    K_SRC_LO,
    NW,
    SH_DPORT,
    SH_ETHERTYPE,
    SH_ICMP_CODE,
    SH_ICMP_TYPE,
    SH_IN_PORT,
    SH_PROTO,
    SH_TCP_FLAGS,
    V4_MAPPED,
)

_SRC_HI, _SRC_LO, _DST_HI, _DST_LO = B.SRC_HI, B.SRC_LO, B.DST_HI, B.DST_LO
_TENANT = B.TENANT
_ETHERTYPE, _SPORT, _DPORT = B.ETHERTYPE, B.SPORT, B.DPORT
_PROTO, _ICMP_TYPE, _ICMP_CODE, _TCP_FLAGS = B.PROTO, B.ICMP_TYPE, B.ICMP_CODE, B.TCP_FLAGS


@njit(cache=True)
def _from_flowkeys(u64, i32, u16, u8, n, ct, in_port, out):
    for i in range(n):
        out[i, K_SRC_HI] = u64[_SRC_HI, i]
        out[i, K_SRC_LO] = u64[_SRC_LO, i]
        out[i, K_DST_HI] = u64[_DST_HI, i]
        out[i, K_DST_LO] = u64[_DST_LO, i]
        out[i, K_L4] = (
            np.uint64(u16[_SPORT, i])
            | (np.uint64(u16[_DPORT, i]) << SH_DPORT)
            | (np.uint64(u8[_PROTO, i]) << SH_PROTO)
            | (np.uint64(u8[_ICMP_TYPE, i]) << SH_ICMP_TYPE)
            | (np.uint64(u8[_ICMP_CODE, i]) << SH_ICMP_CODE)
            | (np.uint64(u8[_TCP_FLAGS, i]) << SH_TCP_FLAGS)
        )
        t = np.uint64(np.uint32(i32[_TENANT, i]))
        out[i, K_META] = (
            t | (np.uint64(in_port[i]) << SH_IN_PORT) | (np.uint64(u16[_ETHERTYPE, i]) << SH_ETHERTYPE)
        )
        out[i, K_CT] = np.uint64(ct[i])


def _col(a, n, dtype, name):
    if a is None:
        return np.zeros(n, dtype)
    a = np.asarray(a)
    if a.ndim == 0:
        return np.full(n, a, dtype)
    if a.shape != (n,):
        raise InputError(f"{name} has shape {a.shape}, expected ({n},)")
    return np.ascontiguousarray(a, dtype=dtype)


def from_flowkeys(keys, ct_state=None, in_port=None, out=None) -> np.ndarray:
    """Packet keys for a parsed batch. ``in_port`` is ``batch.port``; missing columns are 0."""
    n = keys.n
    ct = _col(ct_state, n, np.uint8, "ct_state")
    port = _col(in_port, n, np.uint16, "in_port")
    if out is None or out.shape[0] < n:
        out = np.empty((n, NW), np.uint64)
    _from_flowkeys(keys.u64, keys.i32, keys.u16, keys.u8, n, ct, port, out)
    return out[:n]


def from_flowkeys_ref(keys, ct_state=None, in_port=None) -> np.ndarray:
    """Plain-Python reference for :func:`from_flowkeys`."""
    n = keys.n
    ct = _col(ct_state, n, np.uint8, "ct_state")
    port = _col(in_port, n, np.uint16, "in_port")
    out = np.zeros((n, NW), np.uint64)
    for i in range(n):
        r = keys.row(i)
        out[i] = [
            r["src_hi"],
            r["src_lo"],
            r["dst_hi"],
            r["dst_lo"],
            r["sport"]
            | r["dport"] << 16
            | r["proto"] << 32
            | r["icmp_type"] << 40
            | r["icmp_code"] << 48
            | r["tcp_flags"] << 56,
            (r["tenant"] & 0xFFFFFFFF) | int(port[i]) << 32 | r["ethertype"] << 48,
            int(ct[i]),
        ]
    return out


def from_headers(
    n=None,
    *,
    src_hi=None,
    src_lo=None,
    dst_hi=None,
    dst_lo=None,
    sport=None,
    dport=None,
    proto=None,
    icmp_type=None,
    icmp_code=None,
    tcp_flags=None,
    tenant=-1,
    in_port=None,
    ethertype=None,
    ct_state=None,
) -> np.ndarray:
    """Packet keys from header columns (arrays or scalars; ``n`` when all are scalars)."""
    cols = dict(
        src_hi=src_hi,
        src_lo=src_lo,
        dst_hi=dst_hi,
        dst_lo=dst_lo,
        sport=sport,
        dport=dport,
        proto=proto,
        icmp_type=icmp_type,
        icmp_code=icmp_code,
        tcp_flags=tcp_flags,
        tenant=tenant,
        in_port=in_port,
        ethertype=ethertype,
        ct_state=ct_state,
    )
    if n is None:
        lens = {np.asarray(v).shape[0] for v in cols.values() if v is not None and np.ndim(v)}
        if len(lens) != 1:
            raise InputError("header columns need one common length (or pass n)")
        n = lens.pop()
    c = {}
    for k, v in cols.items():
        if k == "tenant":
            c[k] = _col(v, n, np.int64, k).astype(np.uint64) & np.uint64(0xFFFFFFFF)
        else:
            c[k] = _col(v, n, np.uint64, k)
    out = np.empty((n, NW), np.uint64)
    out[:, K_SRC_HI] = c["src_hi"]
    out[:, K_SRC_LO] = c["src_lo"]
    out[:, K_DST_HI] = c["dst_hi"]
    out[:, K_DST_LO] = c["dst_lo"]
    sh = lambda a, s: a << np.uint64(s)  # noqa: E731
    out[:, K_L4] = (
        c["sport"]
        | sh(c["dport"], SH_DPORT)
        | sh(c["proto"], SH_PROTO)
        | sh(c["icmp_type"], SH_ICMP_TYPE)
        | sh(c["icmp_code"], SH_ICMP_CODE)
        | sh(c["tcp_flags"], SH_TCP_FLAGS)
    )
    out[:, K_META] = c["tenant"] | sh(c["in_port"], SH_IN_PORT) | sh(c["ethertype"], SH_ETHERTYPE)
    out[:, K_CT] = c["ct_state"]
    return out


def from_ipv4_tuples(src, dst, sport, dport, proto) -> np.ndarray:
    """Packet keys for IPv4 5-tuples (32-bit integer addresses), e.g. a ClassBench trace."""
    src = np.asarray(src, np.uint64)
    dst = np.asarray(dst, np.uint64)
    m = np.uint64(V4_MAPPED)
    return from_headers(
        src_hi=np.zeros(src.shape[0], np.uint64),
        src_lo=src | m,
        dst_hi=0,
        dst_lo=dst | m,
        sport=sport,
        dport=dport,
        proto=proto,
        ethertype=0x0800,
    )
