"""Capture files: read pcap / pcapng into a :class:`~microseg.packet.batch.Batch`, write pcap.

Reading memory-maps the file, walks the record (or block) headers in a compiled pass that
yields per-packet offset / length / timestamp arrays, and copies the packet bytes straight
into one contiguous batch buffer. No Python object is made per packet.

Formats read:

* pcap, magic ``a1b2c3d4`` (microsecond) and ``a1b23c4d`` (nanosecond), either byte order;
* pcapng sections in either byte order: SHB, IDB (``if_tsresol``, ``if_tsoffset``), EPB, SPB
  and the obsolete Packet Block; other block types are skipped.

Link types Ethernet (1) and raw IP (101, and 228 / 229 raw IPv4 / IPv6, which become 101).
All packets of one capture must share one link type; a pcapng file whose interfaces mix
them is refused. Timestamps come out in nanoseconds since the epoch.

A file that is not a capture, is empty, has a record longer than its snap length, or is cut
short raises :class:`~microseg.errors.InputError`. A capture cut inside its last record
raises :class:`TruncatedCaptureError` (an ``InputError``) that says how many packets were
complete and carries them in ``.batch``; pass ``allow_truncated=True`` to get those packets
back instead, the way tcpdump reads a capture that was still being written.
"""
from __future__ import annotations

import mmap
import os
import struct

import numpy as np
from numba import njit

from ..errors import InputError
from ..packet.batch import LINK_ETHERNET, LINK_RAW, Batch

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BOM = 0x1A2B3C4D
PCAPNG_IDB = 1
PCAPNG_OPB = 2
PCAPNG_SPB = 3
PCAPNG_EPB = 6

# Link types a capture may have, and what the batch calls them.
LINKTYPES = {1: LINK_ETHERNET, 101: LINK_RAW, 228: LINK_RAW, 229: LINK_RAW}
MAX_SNAPLEN = 262144        # libpcap's ceiling; used where a file gives no snap length
DEFAULT_CHUNK = 1 << 16     # records per walk call

# walk status codes
_DONE = 0            # reached the end of the file or the record limit
_STOP = 1            # pcapng: a block Python must handle (SHB or IDB) starts at pos
_E_TRUNC_HDR = -1    # record / block header cut short
_E_TRUNC_DATA = -2   # record data cut short
_E_SNAPLEN = -3      # captured length beyond the snap length
_E_BLOCK_LEN = -4    # pcapng block length malformed
_E_TRAILER = -5      # pcapng trailing block length differs from the leading one
_E_IFACE = -6        # EPB / OPB names an interface with no IDB
_E_CAPLEN = -7       # EPB / OPB captured length beyond the block
_E_WIRELEN = -8      # original length beyond 2^31 - 1: not a real packet
_INT32_MAX = 0x7FFFFFFF
_MAX_TS_S = (2**63 - 1) // 1_000_000_000 - 1   # latest second an int64 ns timestamp holds


class TruncatedCaptureError(InputError):
    """The capture ends inside a record; ``batch`` holds the ``n_read`` complete packets."""

    def __init__(self, message: str, path: str | None, batch: Batch):
        super().__init__(message, path)
        self.batch = batch
        self.n_read = len(batch)


# ---------------------------------------------------------------------------------------------
# compiled walkers
# ---------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _u16(buf, p, big):
    if big:
        return (np.int64(buf[p]) << 8) | np.int64(buf[p + 1])
    return np.int64(buf[p]) | (np.int64(buf[p + 1]) << 8)


@njit(cache=True, inline="always")
def _u32(buf, p, big):
    if big:
        return ((np.int64(buf[p]) << 24) | (np.int64(buf[p + 1]) << 16)
                | (np.int64(buf[p + 2]) << 8) | np.int64(buf[p + 3]))
    return (np.int64(buf[p]) | (np.int64(buf[p + 1]) << 8)
            | (np.int64(buf[p + 2]) << 16) | (np.int64(buf[p + 3]) << 24))


@njit(cache=True)
def _walk_pcap(buf, pos, end, big, ts_mult, snaplen, max_n, off, caplen, wirelen, ts):
    """Walk classic pcap records from ``pos``; fill up to ``max_n`` entries.

    Returns (status, pos, n): ``pos`` is where the next record (or the bad one) starts.
    """
    n = 0
    while n < max_n and pos < end:
        if end - pos < 16:
            return _E_TRUNC_HDR, pos, n
        sec = _u32(buf, pos, big)
        frac = _u32(buf, pos + 4, big)
        incl = _u32(buf, pos + 8, big)
        orig = _u32(buf, pos + 12, big)
        if incl > snaplen:
            return _E_SNAPLEN, pos, n
        if end - pos - 16 < incl:
            return _E_TRUNC_DATA, pos, n
        if orig > _INT32_MAX:
            return _E_WIRELEN, pos, n
        off[n] = pos + 16
        caplen[n] = incl
        wirelen[n] = orig if orig > incl else incl
        ts[n] = sec * 1000000000 + frac * ts_mult
        n += 1
        pos += 16 + incl
    return _DONE, pos, n


@njit(cache=True)
def _walk_pcapng(buf, pos, end, big, n_ifaces, snaplens, iface_base, max_n,
                 off, caplen, wirelen, tsraw, iface):
    """Walk pcapng blocks from ``pos`` (inside a section whose byte order is ``big``).

    Packet blocks (EPB, SPB, OPB) fill the output arrays; SHB and IDB stop the walk with
    ``_STOP`` so that the caller parses them; other blocks are skipped. ``snaplens`` holds the
    snap length of each interface of the current section (0 = none). Returns
    (status, pos, n).
    """
    n = 0
    while n < max_n and pos < end:
        if end - pos < 12:
            return _E_TRUNC_HDR, pos, n
        btype = _u32(buf, pos, big)
        if btype == 0x0A0D0D0A or btype == 1:
            return _STOP, pos, n
        blen = _u32(buf, pos + 4, big)
        if blen < 12 or (blen & 3) != 0:
            return _E_BLOCK_LEN, pos, n
        if blen > end - pos:
            return _E_TRUNC_DATA, pos, n
        if _u32(buf, pos + blen - 4, big) != blen:
            return _E_TRAILER, pos, n
        body = pos + 8
        body_len = blen - 12
        if btype == 6 or btype == 2:          # enhanced / obsolete packet block
            if body_len < 20:
                return _E_BLOCK_LEN, pos, n
            if btype == 6:
                ifc = _u32(buf, body, big)
            else:
                ifc = _u16(buf, body, big)
            if ifc >= n_ifaces:
                return _E_IFACE, pos, n
            incl = _u32(buf, body + 12, big)
            orig = _u32(buf, body + 16, big)
            if incl > body_len - 20 or incl > _INT32_MAX:
                return _E_CAPLEN, pos, n
            if orig > _INT32_MAX:
                return _E_WIRELEN, pos, n
            sl = snaplens[ifc]
            if sl > 0 and incl > sl:
                return _E_SNAPLEN, pos, n
            off[n] = body + 20
            caplen[n] = incl
            wirelen[n] = orig if orig > incl else incl
            tsraw[n] = (np.uint64(_u32(buf, body + 4, big)) << np.uint64(32)) | np.uint64(
                _u32(buf, body + 8, big))
            iface[n] = iface_base + ifc
            n += 1
        elif btype == 3:                      # simple packet block: interface 0, no timestamp
            if body_len < 4:
                return _E_BLOCK_LEN, pos, n
            if n_ifaces < 1:
                return _E_IFACE, pos, n
            orig = _u32(buf, body, big)
            if orig > _INT32_MAX:
                return _E_WIRELEN, pos, n
            incl = body_len - 4
            if orig < incl:
                incl = orig
            sl = snaplens[0]
            if sl > 0 and incl > sl:
                incl = sl
            off[n] = body + 4
            caplen[n] = incl
            wirelen[n] = orig if orig > incl else incl
            tsraw[n] = np.uint64(0)
            iface[n] = iface_base
            n += 1
        pos += blen
    return _DONE, pos, n


@njit(cache=True)
def _gather(buf, src_off, length, out, dst_off):
    for i in range(src_off.shape[0]):
        s = src_off[i]
        d = dst_off[i]
        ln = length[i]
        out[d:d + ln] = buf[s:s + ln]


@njit(cache=True)
def _emit_pcap(data, offset, length, wire_len, sec, frac, out, pos0):
    """Write pcap record headers (little-endian) and packet bytes into ``out`` from ``pos0``."""
    pos = pos0
    for i in range(offset.shape[0]):
        vals = (sec[i], frac[i], np.int64(length[i]), np.int64(wire_len[i]))
        for k in range(4):
            v = vals[k]
            out[pos] = v & 0xFF
            out[pos + 1] = (v >> 8) & 0xFF
            out[pos + 2] = (v >> 16) & 0xFF
            out[pos + 3] = (v >> 24) & 0xFF
            pos += 4
        o = offset[i]
        ln = length[i]
        out[pos:pos + ln] = data[o:o + ln]
        pos += ln
    return pos


# ---------------------------------------------------------------------------------------------
# reader
# ---------------------------------------------------------------------------------------------
def _linktype(raw: int, path: str) -> int:
    lt = raw & 0xFFFF
    if lt not in LINKTYPES:
        raise InputError(f"unsupported link type {lt} (supported: Ethernet 1, raw IP 101/228/229)",
                         path)
    return LINKTYPES[lt]


class _Walker:
    """Incremental record walk over one mapped capture file (pcap or pcapng)."""

    def __init__(self, path, populate: bool = False):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    raise InputError("empty file, not a capture", self.path)
                flags = mmap.MAP_SHARED
                if populate and hasattr(mmap, "MAP_POPULATE"):
                    flags |= mmap.MAP_POPULATE     # fault the whole file in at once
                self._mm = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
        except InputError:
            raise
        except IsADirectoryError:
            raise InputError("is a directory, not a capture file", self.path) from None
        except OSError as exc:
            raise InputError(f"cannot read: {exc.strerror or exc}", self.path) from None
        self.buf = np.frombuffer(self._mm, dtype=np.uint8)
        self.size = size
        self.n_read = 0
        self.truncated: str | None = None
        self.linktype: int | None = None
        if size < 4:
            raise InputError(f"too short to be a capture ({size} bytes)", self.path)
        magic_le = struct.unpack_from("<I", self._mm, 0)[0]
        magic_be = struct.unpack_from(">I", self._mm, 0)[0]
        if magic_le in (PCAP_MAGIC_US, PCAP_MAGIC_NS) or magic_be in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
            self._init_pcap(magic_le, magic_be)
        elif magic_le == PCAPNG_SHB:
            self._init_pcapng()
        else:
            raise InputError(f"not a pcap or pcapng file (starts with 0x{magic_be:08x})", self.path)

    # -- pcap ----------------------------------------------------------------------------------
    def _init_pcap(self, magic_le, magic_be):
        self.format = "pcap"
        self.big = magic_le not in (PCAP_MAGIC_US, PCAP_MAGIC_NS)
        magic = magic_be if self.big else magic_le
        self.nanosecond = magic == PCAP_MAGIC_NS
        if self.size < 24:
            raise InputError(f"pcap file header cut short ({self.size} of 24 bytes)", self.path)
        e = ">" if self.big else "<"
        major, minor, _zone, _sigfigs, snaplen, network = struct.unpack_from(e + "HHiIII",
                                                                              self._mm, 4)
        if major != 2:
            raise InputError(f"unsupported pcap version {major}.{minor}", self.path)
        self.snaplen = snaplen if snaplen > 0 else MAX_SNAPLEN
        self.linktype = _linktype(network, self.path)
        self.pos = 24

    # -- pcapng --------------------------------------------------------------------------------
    def _init_pcapng(self):
        self.format = "pcapng"
        self.pos = 0
        self.big = False
        self.ifaces: list[tuple[int, int, int, int]] = []   # (linktype, snaplen, tsresol exp, offset s)
        self.section_ifaces: list[int] = []                  # snaplens of this section's interfaces
        self.iface_base = 0
        try:
            self._handle_blocks()
        except _Truncation as t:
            self.truncated = t.what

    def _handle_blocks(self):
        """Parse SHB / IDB blocks at ``pos`` until a block the compiled walk handles."""
        mm, end = self._mm, self.size
        while self.pos < end:
            if end - self.pos < 12:
                return
            if struct.unpack_from("<I", mm, self.pos)[0] == PCAPNG_SHB:
                if end - self.pos < 28:
                    raise InputError(f"pcapng section header cut short at byte {self.pos}", self.path)
                bom = struct.unpack_from("<I", mm, self.pos + 8)[0]
                if bom == PCAPNG_BOM:
                    self.big = False
                elif bom == 0x4D3C2B1A:
                    self.big = True
                else:
                    raise InputError(f"pcapng section header at byte {self.pos} has a bad "
                                     "byte-order magic", self.path)
                e = ">" if self.big else "<"
                blen, _, major = struct.unpack_from(e + "IIH", mm, self.pos + 4)
                if major != 1:
                    raise InputError(f"unsupported pcapng version {major}", self.path)
                self._check_block(blen, e)
                self.iface_base = len(self.ifaces)
                self.section_ifaces = []
                self.pos += blen
                continue
            e = ">" if self.big else "<"
            btype, blen = struct.unpack_from(e + "II", mm, self.pos)
            if btype != PCAPNG_IDB:
                return
            self._check_block(blen, e)
            if blen < 20:
                raise InputError(f"pcapng interface block at byte {self.pos} too short", self.path)
            lt, _, snaplen = struct.unpack_from(e + "HHI", mm, self.pos + 8)
            tsres, tsoff = self._idb_options(self.pos + 16, self.pos + blen - 4, e)
            if lt not in LINKTYPES:
                raise InputError(f"unsupported link type {lt} on interface {len(self.ifaces)} "
                                 "(supported: Ethernet 1, raw IP 101/228/229)", self.path)
            self.ifaces.append((LINKTYPES[lt], snaplen, tsres, tsoff))
            self.section_ifaces.append(snaplen)
            self.pos += blen

    def _check_block(self, blen, e):
        if blen < 12 or blen % 4:
            raise InputError(f"pcapng block at byte {self.pos} has a bad length {blen}", self.path)
        if blen > self.size - self.pos:
            raise self._truncated(f"pcapng block at byte {self.pos} cut short")
        if struct.unpack_from(e + "I", self._mm, self.pos + blen - 4)[0] != blen:
            raise InputError(f"pcapng block at byte {self.pos}: trailing length differs",
                             self.path)

    def _idb_options(self, p, end, e):
        """if_tsresol (code 9) as a signed exponent code and if_tsoffset (code 14) in seconds."""
        tsres, tsoff = 6, 0
        mm = self._mm
        while p + 4 <= end:
            code, olen = struct.unpack_from(e + "HH", mm, p)
            if code == 0:
                break
            if p + 4 + olen > end:
                raise InputError(f"pcapng interface option runs past its block at byte {p}",
                                 self.path)
            if code == 9 and olen >= 1:
                tsres = mm[p + 4]
                if (tsres & 0x7F) > (63 if tsres & 0x80 else 19):
                    raise InputError(f"unsupported if_tsresol 0x{tsres:02x} in the interface "
                                     f"block at byte {self.pos}", self.path)
            elif code == 14 and olen >= 8:
                tsoff = struct.unpack_from(e + "q", mm, p + 4)[0]
            p += 4 + ((olen + 3) & ~3)
        return tsres, tsoff

    # -- shared --------------------------------------------------------------------------------
    def _truncated(self, what: str) -> "_Truncation":
        return _Truncation(what)

    def next_records(self, max_n: int):
        """Up to ``max_n`` records: (src offsets, caplen, wirelen, ts ns). Empty at the end.

        Raises InputError for malformed records. A file cut short ends the walk and sets
        ``truncated`` to a description; the records before the cut are still returned.
        """
        if self.truncated is not None:
            return _empty_rec()
        if self.format == "pcap":
            return self._next_pcap(max_n)
        return self._next_pcapng(max_n)

    def _next_pcap(self, max_n):
        off = np.empty(max_n, np.int64)
        caplen = np.empty(max_n, np.int32)
        wirelen = np.empty(max_n, np.int32)
        ts = np.empty(max_n, np.int64)
        status, pos, n = _walk_pcap(self.buf, self.pos, self.size, self.big,
                                    1 if self.nanosecond else 1000, self.snaplen, max_n,
                                    off, caplen, wirelen, ts)
        self.pos = pos
        self._status(status, n)
        return off[:n], caplen[:n], wirelen[:n], ts[:n]

    def _next_pcapng(self, max_n):
        off = np.empty(max_n, np.int64)
        caplen = np.empty(max_n, np.int32)
        wirelen = np.empty(max_n, np.int32)
        tsraw = np.empty(max_n, np.uint64)
        iface = np.empty(max_n, np.int32)
        n = 0
        while n < max_n and self.pos < self.size:
            snaplens = np.array(self.section_ifaces or [0], dtype=np.int64)
            status, pos, k = _walk_pcapng(self.buf, self.pos, self.size, self.big,
                                          len(self.section_ifaces), snaplens, self.iface_base,
                                          max_n - n, off[n:], caplen[n:], wirelen[n:],
                                          tsraw[n:], iface[n:])
            self.pos = pos
            n += k
            if status == _STOP:
                try:
                    self._handle_blocks()
                except _Truncation as t:
                    self.truncated = t.what
                    break
                continue
            self._status(status, n)
            if status != _STOP:
                break
        ts = self._pcapng_ts(tsraw[:n], iface[:n])
        if n:
            kinds = {self.ifaces[i][0] for i in np.unique(iface[:n]).tolist()}
            if self.linktype is not None:
                kinds.add(self.linktype)
            if len(kinds) > 1:
                raise InputError("capture mixes link types across interfaces "
                                 f"({', '.join(sorted(_LT_NAMES[k] for k in kinds))}); "
                                 "split it per interface first", self.path)
            self.linktype = kinds.pop()
        return off[:n], caplen[:n], wirelen[:n], ts

    def _pcapng_ts(self, tsraw, iface):
        ts = np.empty(tsraw.shape[0], np.int64)
        for i in np.unique(iface).tolist():
            sel = iface == i
            _, _, res, offset_s = self.ifaces[i]
            raw = tsraw[sel]
            top = int(raw.max())
            if res & 0x80:                     # 2^-k units
                k = res & 0x7F
                sec = (raw >> np.uint64(k)).astype(np.int64)
                frac = (raw & np.uint64((1 << k) - 1)).astype(np.float64)
                ns_frac = np.floor(frac * (1e9 / (1 << k))).astype(np.int64)
                top_s = top >> k
            else:                              # 10^-k units
                unit = 10 ** res
                sec = (raw // np.uint64(unit)).astype(np.int64)
                rem = raw % np.uint64(unit)
                ns_frac = ((rem * np.uint64(10 ** (9 - res))) if res <= 9
                           else (rem // np.uint64(10 ** (res - 9)))).astype(np.int64)
                top_s = top // unit
            if top_s + offset_s > _MAX_TS_S or offset_s < -_MAX_TS_S:
                raise InputError(f"interface {i}: timestamps out of range", self.path)
            ts[sel] = (sec + offset_s) * 1_000_000_000 + ns_frac
        return ts

    def _status(self, status, n_new):
        if status >= 0:
            return
        done = self.n_read + n_new
        where = f"record {done + 1} at byte {self.pos}"
        if status in (_E_TRUNC_HDR, _E_TRUNC_DATA):
            self.truncated = f"file cut short inside {where}"
            return
        msgs = {
            _E_SNAPLEN: "captured length beyond the snap length",
            _E_BLOCK_LEN: "malformed block length",
            _E_TRAILER: "trailing block length differs from the leading one",
            _E_IFACE: "refers to an interface with no interface description block",
            _E_CAPLEN: "captured length runs past its block",
            _E_WIRELEN: "original length implausibly large",
        }
        raise InputError(f"{where}: {msgs[status]} (after {done} good packets)", self.path)

    def close(self):
        self.buf = None
        try:
            self._mm.close()
        except BufferError:
            pass   # a view is still alive; the mapping goes away with it


_LT_NAMES = {LINK_ETHERNET: "Ethernet", LINK_RAW: "raw IP"}


class _Truncation(Exception):
    def __init__(self, what):
        super().__init__(what)
        self.what = what


def _copy_batch(walker: _Walker, off, caplen, wirelen, ts) -> Batch:
    n = off.shape[0]
    dst = np.zeros(n, np.int64)
    if n:
        np.cumsum(caplen[:-1], out=dst[1:])
    total = int(dst[-1] + caplen[-1]) if n else 0
    data = np.empty(total, np.uint8)
    if n:
        _gather(walker.buf, off, caplen, data, dst)
    lt = walker.linktype if walker.linktype is not None else LINK_ETHERNET
    return Batch(data=data, offset=dst, length=caplen.copy(), wire_len=wirelen.copy(),
                 port=np.zeros(n, np.uint16), ts=ts.copy(), linktype=lt)


def _concat(parts):
    if len(parts) == 1:
        return parts[0]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))


def read_capture(path, allow_truncated: bool = False) -> Batch:
    """Read a whole pcap or pcapng file into one batch (see the module docstring)."""
    w = _Walker(path, populate=True)
    try:
        parts = []
        while True:
            rec = w.next_records(DEFAULT_CHUNK)
            if rec[0].shape[0] == 0:
                break
            w.n_read += rec[0].shape[0]
            parts.append(rec)
        batch = _copy_batch(w, *_concat(parts or [_empty_rec()]))
    finally:
        w.close()
    if w.truncated is not None and not allow_truncated:
        raise TruncatedCaptureError(f"{w.truncated}; {len(batch)} complete packets read",
                                    w.path, batch)
    return batch


def iter_capture(path, batch_size: int = 256, allow_truncated: bool = False):
    """Yield the capture as consecutive batches of at most ``batch_size`` packets.

    Only the current chunk's records are indexed at a time, so the file may be larger than
    memory. A capture cut short raises :class:`TruncatedCaptureError` after the complete
    packets were yielded (its ``.batch`` is then empty), unless ``allow_truncated``.
    """
    if batch_size < 1:
        raise InputError(f"batch size must be positive, got {batch_size}")
    w = _Walker(path)
    try:
        while True:
            rec = w.next_records(batch_size)
            if rec[0].shape[0] == 0:
                break
            w.n_read += rec[0].shape[0]
            yield _copy_batch(w, *rec)
        if w.truncated is not None and not allow_truncated:
            raise TruncatedCaptureError(f"{w.truncated}; {w.n_read} complete packets read",
                                        w.path, _copy_batch(w, *_empty_rec()))
    finally:
        w.close()


def _empty_rec():
    return (np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32),
            np.zeros(0, np.int64))


# ---------------------------------------------------------------------------------------------
# writer
# ---------------------------------------------------------------------------------------------
class PcapWriter:
    """Streaming pcap writer (little-endian, version 2.4): ``write(batch)`` appends records.

    The link type comes from the first batch unless given; later batches must match it.
    Timestamps are written in microseconds, or nanoseconds with ``nanosecond=True``.
    """

    def __init__(self, path, linktype: int | None = None, nanosecond: bool = False,
                 snaplen: int = MAX_SNAPLEN):
        self.path = os.fspath(path)
        self.nanosecond = bool(nanosecond)
        self.snaplen = int(snaplen)
        self.linktype = linktype
        self.count = 0
        try:
            self._f = open(self.path, "wb")
        except OSError as exc:
            raise InputError(f"cannot write: {exc.strerror or exc}", self.path) from None
        if linktype is not None:
            self._header(linktype)

    def _header(self, linktype):
        self.linktype = int(linktype)
        magic = PCAP_MAGIC_NS if self.nanosecond else PCAP_MAGIC_US
        self._f.write(struct.pack("<IHHiIII", magic, 2, 4, 0, 0, self.snaplen, self.linktype))

    def write(self, batch: Batch) -> None:
        if self.linktype is None:
            self._header(batch.linktype)
        elif batch.linktype != self.linktype:
            raise InputError(f"batch link type {batch.linktype} differs from the file's "
                             f"{self.linktype}", self.path)
        n = len(batch)
        if n == 0:
            return
        length = np.asarray(batch.length, np.int32)
        if int(length.max()) > self.snaplen:
            raise InputError(f"a packet of {int(length.max())} bytes exceeds the snap length "
                             f"{self.snaplen}", self.path)
        ts = np.asarray(batch.ts, np.int64)
        if int(ts.min()) < 0 or int(ts.max()) // 1_000_000_000 > 0xFFFFFFFF:
            raise InputError("timestamps out of the range pcap can store", self.path)
        sec = ts // 1_000_000_000
        frac = ts % 1_000_000_000
        if not self.nanosecond:
            frac //= 1000
        wire = np.maximum(np.asarray(batch.wire_len, np.int32), length)
        out = np.empty(16 * n + int(length.sum(dtype=np.int64)), np.uint8)
        _emit_pcap(batch.data, np.asarray(batch.offset, np.int64), length, wire, sec, frac,
                   out, 0)
        self._f.write(out.data)
        self.count += n

    def close(self) -> None:
        if not self._f.closed:
            if self.linktype is None:
                self._header(LINK_ETHERNET)
            self._f.close()

    def __enter__(self) -> "PcapWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_pcap(path, batch: Batch, nanosecond: bool = False) -> None:
    """Write ``batch`` as a pcap file (microsecond timestamps unless ``nanosecond``)."""
    with PcapWriter(path, linktype=batch.linktype, nanosecond=nanosecond) as w:
        w.write(batch)


# ---------------------------------------------------------------------------------------------
# plain-Python reference (tests hold the compiled walk to it)
# ---------------------------------------------------------------------------------------------
def read_pcap_ref(data: bytes):
    """Classic pcap, one record at a time: ``(linktype, [(ts_ns, wire_len, bytes)], status)``
    where status is None, "truncated" or an error string; raises InputError for a bad header."""
    if len(data) < 24:
        raise InputError("pcap file header cut short")
    for e in ("<", ">"):
        magic = struct.unpack_from(e + "I", data)[0]
        if magic in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
            break
    else:
        raise InputError("not a pcap file")
    major, _, _, _, snaplen, network = struct.unpack_from(e + "HHiIII", data, 4)
    if major != 2:
        raise InputError("unsupported version")
    lt = _linktype(network, None)
    limit = snaplen or MAX_SNAPLEN
    mult = 1 if magic == PCAP_MAGIC_NS else 1000
    pos, out = 24, []
    while pos < len(data):
        if len(data) - pos < 16:
            return lt, out, "truncated"
        sec, frac, incl, orig = struct.unpack_from(e + "IIII", data, pos)
        if incl > limit:
            return lt, out, "snaplen"
        if len(data) - pos - 16 < incl:
            return lt, out, "truncated"
        if orig > _INT32_MAX:
            return lt, out, "wirelen"
        out.append((sec * 1_000_000_000 + frac * mult, max(orig, incl),
                    bytes(data[pos + 16:pos + 16 + incl])))
        pos += 16 + incl
    return lt, out, None
