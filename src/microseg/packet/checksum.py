"""Internet checksums (RFC 1071): plain-Python helpers, Numba helpers, and the per-batch L4
checksum verdict that connection tracking uses (Linux marks bad-checksum packets INVALID).

:func:`l4_checksum_ok` checks the innermost packet that :func:`microseg.packet.parse.parse`
described: TCP, UDP and ICMP over IPv4; TCP, UDP and ICMPv6 over IPv6, with the pseudo-header
(the destination in it is the IPv6 header's, as Linux netfilter uses). UDP checksum 0 means
"none" over IPv4 and is accepted; over IPv6 it is refused (RFC 8200), as Linux conntrack does.
A packet with a parse error is never "ok". Packets with nothing to verify (not IP, other
protocols, fragments other than a whole atomic one) are "ok": there is no checksum to fail.
So are segments the capture does not hold whole (``F2_TRUNCATED``: a snapped capture) and TCP
super-frames whose IP length field is 0 (``F2_BIG_TCP``: Linux BIG TCP / TSO frames carry the
offload's partial sum, not a checksum). RFC 2675 jumbograms are verified, with the 32-bit
upper-layer length in the pseudo-header (and UDP length 0 meaning "the rest of the jumbogram").
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..lowlevel import rd32u_le, rd64_le
from .batch import (
    ERROR,
    F2_BIG_TCP,
    F2_JUMBO,
    F2_TRUNCATED,
    F_FRAG,
    F_MF,
    FLAGS,
    FLAGS2,
    FRAG_OFF,
    IP_LEN,
    IP_VER,
    L3_OFF,
    L4_OFF,
    PROTO,
    Batch,
    FlowKeys,
)

__all__ = [
    "inet_sum",
    "inet_checksum",
    "ipv4_header_checksum",
    "pseudo_header_sum",
    "csum_partial",
    "csum_fold",
    "l4_checksum_ok",
    "l4_checksum_ok_ref",
]


# ---------------------------------------------------------------------------------------------
# plain Python
# ---------------------------------------------------------------------------------------------
def inet_sum(data, initial: int = 0) -> int:
    """Ones'-complement sum of ``data`` as big-endian 16-bit words (odd length zero-padded),
    folded to 16 bits; ``initial`` is a partial sum to continue from."""
    b = bytes(data)
    if len(b) & 1:
        b += b"\0"
    s = initial + int(np.frombuffer(b, dtype=">u2").sum(dtype=np.uint64)) if b else initial
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def inet_checksum(data, initial: int = 0) -> int:
    """The Internet checksum of ``data``: the complement of its ones'-complement sum."""
    return ~inet_sum(data, initial) & 0xFFFF


def ipv4_header_checksum(header) -> int:
    """Checksum an IPv4 header should carry (its own checksum field counted as zero)."""
    h = bytearray(header)
    h[10:12] = b"\0\0"
    return inet_checksum(h)


def pseudo_header_sum(src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Sum of the TCP/UDP/ICMPv6 pseudo-header for 4- or 16-byte ``src``/``dst`` addresses."""
    if len(src) == 4:
        return inet_sum(src + dst + bytes((0, proto)) + length.to_bytes(2, "big"))
    return inet_sum(src + dst + length.to_bytes(4, "big") + bytes((0, 0, 0, proto)))


# ---------------------------------------------------------------------------------------------
# Numba
# ---------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _fold_swap(s):
    """A sum of little-endian words (64-bit, end-around carry) as the 16-bit sum of the
    big-endian words: folded, then byte-swapped (RFC 1071 2.B: the ones'-complement sum does
    not depend on byte order but for a swap). Zero only when ``s`` is."""
    m16 = np.uint64(0xFFFF)
    s = (s & np.uint64(0xFFFFFFFF)) + (s >> np.uint64(32))
    s = (s & m16) + (s >> np.uint64(16))
    s = (s & m16) + (s >> np.uint64(16))
    s = (s & m16) + (s >> np.uint64(16))
    return np.int64(((s & np.uint64(0xFF)) << np.uint64(8)) | (s >> np.uint64(8)))


@njit(cache=True)
def csum_partial(d, start, stop, acc):
    """Add ``d[start:stop]`` (uint8 array, big-endian 16-bit words, odd tail zero-padded) to the
    unfolded 64-bit sum ``acc``. The caller guarantees ``0 <= start <= stop <= len(d)``.

    As Linux's ``csum_partial``: eight bytes a step, read as little-endian 64-bit words and
    added into two 64-bit accumulators with end-around carry (a ones'-complement sum modulo
    2**64 - 1), the last 15 bytes at most in 8-, 4-, 2- and 1-byte pieces; then folded and
    byte-swapped (:func:`_fold_swap`). The value returned is not a word-by-word sum but is
    congruent to it modulo 0xFFFF and zero only when it is, so :func:`csum_fold` of it (and of
    anything added to it) is the same."""
    k = np.uint64(start)
    end = np.uint64(stop)
    one, two, four, eight = np.uint64(1), np.uint64(2), np.uint64(4), np.uint64(8)
    sixteen, thirtytwo, m32 = np.uint64(16), np.uint64(32), np.uint64(0xFFFFFFFF)
    s0 = np.uint64(0)
    s1 = np.uint64(0)
    while k + sixteen <= end:  # two independent carry chains
        w0 = rd64_le(d, k)
        w1 = rd64_le(d, k + eight)
        s0 += w0
        s0 += np.uint64(s0 < w0)
        s1 += w1
        s1 += np.uint64(s1 < w1)
        k += sixteen
    s0 += s1
    s0 += np.uint64(s0 < s1)
    t = np.uint64(0)  # the last 15 bytes at most: no carry out
    if k + eight <= end:
        w0 = rd64_le(d, k)
        t += (w0 & m32) + (w0 >> thirtytwo)
        k += eight
    if k + four <= end:
        t += rd32u_le(d, k)
        k += four
    if k + two <= end:
        t += np.uint64(d[k]) | (np.uint64(d[k + one]) << np.uint64(8))
        k += two
    if k < end:
        t += np.uint64(d[k])
    s0 += t
    s0 += np.uint64(s0 < t)
    return np.int64(acc) + _fold_swap(s0)


@njit(cache=True)
def csum_fold(acc):
    """Fold an unfolded sum to 16 bits (the ones'-complement sum; 0xFFFF means 'checks')."""
    s = np.int64(acc)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


@njit(cache=True)
def _l4_ok_kernel(data, offset, length, u32, u16, i32, u8, out):
    n = offset.shape[0]
    one, two, four, eight = np.uint64(1), np.uint64(2), np.uint64(4), np.uint64(8)
    sixteen, thirtytwo, m32 = np.uint64(16), np.uint64(32), np.uint64(0xFFFFFFFF)
    for i in range(n):
        out[i] = True
        if u8[ERROR, i] != 0:
            out[i] = False
            continue
        ver = u8[IP_VER, i]
        proto = u8[PROTO, i]
        fl = u8[FLAGS, i]
        if ver == 0 or ((fl & F_FRAG) and ((fl & F_MF) or u16[FRAG_OFF, i] != 0)):
            continue
        if not (proto == 6 or proto == 17 or (proto == 1 and ver == 4) or (proto == 58 and ver == 6)):
            continue
        if u8[FLAGS2, i] & (F2_TRUNCATED | F2_BIG_TCP):
            continue
        b = offset[i]
        ln = np.int64(length[i])
        l3 = np.int64(i32[L3_OFF, i])
        l4 = np.int64(i32[L4_OFF, i])
        # keys from another batch must not send us outside this one: re-check the bounds
        if l3 < 0 or l4 < l3 + 20 or l4 + 8 > ln or b < 0 or b + ln > data.shape[0]:
            out[i] = False
            continue
        end = l3 + np.int64(u32[IP_LEN, i])
        seg = end - l4
        if proto == 17:
            ulen = (np.int64(data[b + l4 + 4]) << 8) | np.int64(data[b + l4 + 5])
            if ulen != 0 or not (u8[FLAGS2, i] & F2_JUMBO):  # RFC 2675: 0 in a jumbogram
                seg = ulen
        if seg < 8 or l4 + seg > ln:
            out[i] = False
            continue
        if proto == 17:
            if data[b + l4 + 6] == 0 and data[b + l4 + 7] == 0:
                out[i] = ver == 4
                continue
        # the segment, then the pseudo-header's addresses (none for ICMP over IPv4), summed
        # here rather than through csum_partial: a call that takes the array costs more in
        # reference counting than a short segment's sum
        lo, hi = b + l4, b + l4 + seg
        s = np.uint64(0)
        s1 = np.uint64(0)  # two independent carry chains
        for part in range(2):
            if part == 1:
                if ver == 4:
                    if proto == 1:
                        break
                    lo, hi = b + l3 + 12, b + l3 + 20
                else:
                    lo, hi = b + l3 + 8, b + l3 + 40
            k = np.uint64(lo)
            stop = np.uint64(hi)
            while k + sixteen <= stop:
                w0 = rd64_le(data, k)
                w1 = rd64_le(data, k + eight)
                s += w0
                s += np.uint64(s < w0)
                s1 += w1
                s1 += np.uint64(s1 < w1)
                k += sixteen
            t = np.uint64(0)  # the last 15 bytes at most
            if k + eight <= stop:
                w0 = rd64_le(data, k)
                t += (w0 & m32) + (w0 >> thirtytwo)
                k += eight
            if k + four <= stop:
                t += rd32u_le(data, k)
                k += four
            if k + two <= stop:
                t += np.uint64(data[k]) | (np.uint64(data[k + one]) << np.uint64(8))
                k += two
            if k < stop:
                t += np.uint64(data[k])
            s += t
            s += np.uint64(s < t)
        s += s1
        s += np.uint64(s < s1)
        ph = 0 if ver == 4 and proto == 1 else proto + seg  # the pseudo-header's rest
        out[i] = csum_fold(_fold_swap(s) + ph) == 0xFFFF


def l4_checksum_ok(batch: Batch, keys: FlowKeys, out: np.ndarray | None = None) -> np.ndarray:
    """Per packet: False where the innermost TCP/UDP/ICMP/ICMPv6 checksum is wrong or the packet
    failed to parse; True otherwise (see the module docstring). ``keys`` from ``parse(batch)``."""
    n = len(batch)
    if keys.n != n:
        raise ValueError(f"keys describe {keys.n} packets, the batch has {n}")
    if out is None:
        out = np.empty(n, dtype=np.bool_)
    _l4_ok_kernel(batch.data, batch.offset, batch.length, keys.u32, keys.u16, keys.i32, keys.u8, out[:n])
    return out[:n]


def l4_checksum_ok_ref(batch: Batch, keys: FlowKeys) -> np.ndarray:
    """Plain-Python statement of :func:`l4_checksum_ok`, for tests."""
    out = np.ones(len(batch), dtype=np.bool_)
    for i in range(len(batch)):
        f = keys.row(i)
        p = batch.packet(i)
        if f["error"]:
            out[i] = False
            continue
        ver, proto = f["ip_ver"], f["proto"]
        partial = f["flags"] & F_FRAG and (f["flags"] & F_MF or f["frag_off"])
        if ver == 0 or partial or proto not in ((6, 17, 1) if ver == 4 else (6, 17, 58)):
            continue
        if f["flags2"] & (F2_TRUNCATED | F2_BIG_TCP):
            continue
        l3, l4 = f["l3_off"], f["l4_off"]
        if l3 < 0 or l4 < l3 + 20 or l4 + 8 > len(p):
            out[i] = False
            continue
        end = l3 + f["ip_len"]
        if proto == 17:
            ulen = int.from_bytes(p[l4 + 4 : l4 + 6], "big")
            if ulen or not f["flags2"] & F2_JUMBO:
                end = l4 + ulen
        if end - l4 < 8 or end > len(p):
            out[i] = False
            continue
        seg = p[l4:end]
        if proto == 17:
            if seg[6:8] == b"\0\0":
                out[i] = ver == 4
                continue
        if ver == 4 and proto == 1:
            out[i] = inet_sum(seg) == 0xFFFF
        elif ver == 4:
            out[i] = (
                inet_sum(seg, pseudo_header_sum(p[l3 + 12 : l3 + 16], p[l3 + 16 : l3 + 20], proto, len(seg)))
                == 0xFFFF
            )
        else:
            out[i] = (
                inet_sum(seg, pseudo_header_sum(p[l3 + 8 : l3 + 24], p[l3 + 24 : l3 + 40], proto, len(seg)))
                == 0xFFFF
            )
    return out
