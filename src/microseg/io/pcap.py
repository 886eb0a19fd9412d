"""Capture files: read pcap / pcapng into a :class:`~microseg.packet.batch.Batch`, write pcap.

Reading memory-maps the file, walks the record (or block) headers in a compiled pass that
yields per-packet offset / length / timestamp arrays, and copies the packet bytes straight
into one contiguous batch buffer. No Python object is made per packet.

Formats read:

* pcap, magic ``a1b2c3d4`` (microsecond) and ``a1b23c4d`` (nanosecond), either byte order;
* pcapng sections in either byte order: SHB, IDB (``if_tsresol``, ``if_tsoffset``), EPB, SPB
  and the obsolete Packet Block; other block types are skipped.

Link types (see ``LINKTYPES``): Ethernet (1), Linux cooked v1 (113) and v2 (276), BSD
loopback (0), OpenBSD loopback (108) and raw IP (101; 12 and 14, the DLT_RAW numbers of the
BSDs, and 228 / 229, raw IPv4 / IPv6, all become 101: the version nibble tells IPv4 from IPv6).
Any other link type is refused with its name and what to do; in a pcapng file only the
interfaces that carry a packet count, so an unused interface of any link type is ignored.
All packets of one capture share one link type: a pcapng file whose packets come from
interfaces of different link types is refused at the first packet of the second one, with
the packets before it delivered.

What is read the way libpcap reads it, and where it differs:

* a record longer than the file's (or the interface's) snap length is not an error: it is
  read, up to libpcap's own limit of 262144 bytes, and flagged (``CaptureReader.beyond_snaplen``
  and a warning when one is asked for); only a record beyond 262144 bytes is an error, as in
  libpcap. Such a record is kept whole, as Wireshark keeps it; libpcap 1.10 keeps its first
  snap-length bytes (with the original length, so the packet reads as snapped) and refuses
  it in a pcapng file.
* the packets before an error are never lost: :func:`iter_capture` yields them before it
  raises, :func:`read_capture` raises a :class:`CaptureError` that carries them in ``.batch``.
* a capture cut inside its last record raises :class:`TruncatedCaptureError` (a
  ``CaptureError``) that says how many packets were complete and carries them; with
  ``lenient=True`` (or the older ``allow_truncated=True``, which stays silent) those packets
  are returned instead (a capture still being written, or copied while it was), and a
  warning says where the file was cut.

Every other malformed file is an :class:`~microseg.errors.InputError` that names the file and
the record and byte where it went wrong. Timestamps come out in nanoseconds since the epoch.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys

import numpy as np
from numba import njit

from ..errors import InputError
from ..lowlevel import rd16_bo, rd32_bo
from ..packet.batch import (
    LINK_ETHERNET,
    LINK_LINUX_SLL,
    LINK_LINUX_SLL2,
    LINK_LOOP,
    LINK_NULL,
    LINK_RAW,
    Batch,
)

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BOM = 0x1A2B3C4D
PCAPNG_IDB = 1
PCAPNG_OPB = 2
PCAPNG_SPB = 3
PCAPNG_EPB = 6

# Link types a capture may have (pcap LINKTYPE_* numbers), and what the batch calls them.
LINKTYPES = {
    0: LINK_NULL,  # BSD loopback: 4-byte address family, writer's byte order
    1: LINK_ETHERNET,
    12: LINK_RAW,  # DLT_RAW of most BSDs; libpcap reads it as raw IP
    14: LINK_RAW,  # DLT_RAW of OpenBSD
    101: LINK_RAW,
    108: LINK_LOOP,  # OpenBSD loopback: address family in network byte order
    113: LINK_LINUX_SLL,  # Linux cooked v1 (tcpdump -i any before libpcap 1.10)
    228: LINK_RAW,  # raw IPv4
    229: LINK_RAW,  # raw IPv6
    276: LINK_LINUX_SLL2,  # Linux cooked v2 (tcpdump -i any)
}
MAX_SNAPLEN = 262144  # libpcap's limit on a record's captured length
DEFAULT_CHUNK = 1 << 16  # records per walk call

# Names of link types, for messages (from the tcpdump.org LINKTYPE_ registry).
LINKTYPE_WORDS = {
    0: "BSD loopback",
    1: "Ethernet",
    2: "3Mb experimental Ethernet",
    3: "AX.25 amateur radio",
    4: "ProNET token ring",
    5: "Chaos",
    6: "IEEE 802.5 Token Ring",
    7: "ARCNET",
    8: "SLIP",
    9: "PPP",
    10: "FDDI",
    12: "raw IP",
    14: "raw IP",
    15: "BSD/OS SLIP",
    16: "BSD/OS PPP",
    18: "OpenBSD pfsync",
    19: "Linux classical IP over ATM",
    50: "PPP in HDLC-like framing",
    51: "PPPoE",
    99: "Symantec firewall",
    100: "LLC/SNAP-encapsulated ATM",
    101: "raw IP",
    104: "Cisco HDLC",
    105: "IEEE 802.11",
    106: "Linux classical IP over ATM",
    107: "Frame Relay",
    108: "OpenBSD loopback",
    109: "OpenBSD IPsec encapsulation",
    112: "NetBSD HDLC",
    113: "Linux cooked v1",
    114: "Apple LocalTalk",
    117: "OpenBSD pflog",
    119: "IEEE 802.11 with Prism header",
    122: "IP over Fibre Channel",
    123: "SunATM",
    127: "IEEE 802.11 with radiotap header",
    129: "Linux ARCNET",
    138: "Apple IP over IEEE 1394",
    139: "SS7 MTP2 with pseudo-header",
    140: "SS7 MTP2",
    141: "SS7 MTP3",
    142: "SS7 SCCP",
    143: "DOCSIS",
    144: "Linux IrDA",
    **{147 + k: f"user-defined {k}" for k in range(16)},
    163: "IEEE 802.11 with AVS header",
    165: "BACnet MS/TP",
    166: "PPP with pppd direction",
    169: "GPRS LLC",
    177: "Linux LAPD",
    187: "Bluetooth HCI UART (H4)",
    189: "Linux USB",
    192: "Per-Packet Information (PPI)",
    195: "IEEE 802.15.4 with FCS",
    196: "SITA",
    197: "Endace ERF",
    201: "Bluetooth HCI H4 with pseudo-header",
    202: "AX.25 with KISS header",
    203: "LAPD",
    204: "PPP with direction",
    205: "Cisco HDLC with direction",
    206: "Frame Relay with direction",
    209: "Linux IPMB",
    215: "IEEE 802.15.4 non-ASK PHY",
    220: "Linux USB (memory-mapped)",
    224: "Fibre Channel FC-2",
    225: "Fibre Channel FC-2 with frame delimiters",
    226: "Solaris ipnet",
    227: "CAN (SocketCAN)",
    228: "raw IPv4",
    229: "raw IPv6",
    230: "IEEE 802.15.4 without FCS",
    231: "D-Bus",
    235: "DVB-CI",
    236: "MUX27010",
    237: "STANAG 5066 D_PDU",
    239: "Linux netfilter log (NFLOG)",
    240: "netANALYZER",
    241: "netANALYZER transparent",
    242: "IP over InfiniBand",
    243: "MPEG-2 transport stream",
    244: "ng40",
    245: "NFC LLCP",
    247: "InfiniBand",
    248: "SCTP",
    249: "Windows USB (USBPcap)",
    250: "RTAC serial",
    251: "Bluetooth LE link layer",
    253: "Linux netlink",
    254: "Bluetooth Linux monitor",
    255: "Bluetooth BR/EDR baseband",
    256: "Bluetooth LE with pseudo-header",
    257: "PROFIBUS data link",
    258: "Apple PKTAP",
    259: "Ethernet passive optical network",
    260: "IPMI HPM.2",
    261: "Z-Wave R1/R2",
    262: "Z-Wave R3",
    263: "WattStopper DLM",
    264: "ISO 14443",
    265: "IEC 62106 RDS",
    266: "Darwin USB",
    268: "SDLC",
    270: "LoRaTap",
    271: "Linux vsock",
    272: "Nordic BLE sniffer",
    273: "DOCSIS 3.1 XRA-31",
    274: "Ethernet mPackets",
    275: "DisplayPort AUX",
    276: "Linux cooked v2",
    278: "OpenVizsla",
    279: "Elektrobit EBHSCR",
    280: "VPP graph dispatch",
    281: "Broadcom DSA tag",
    282: "Broadcom DSA tag (prepended)",
    283: "IEEE 802.15.4 TAP",
    284: "Marvell DSA tag",
    285: "Marvell EDSA tag",
    286: "ELEE lawful intercept",
    287: "Z-Wave serial",
    288: "USB 2.0",
    289: "ATSC ALP",
    290: "Event Tracing for Windows",
    11: "RFC 1483 LLC-encapsulated ATM",
    102: "BSD/OS SLIP",
    103: "BSD/OS PPP",
    130: "Juniper multi-link PPP",
    131: "Juniper multi-link Frame Relay",
    132: "Juniper encryption services PIC",
    133: "Juniper GGSN PIC",
    134: "Juniper FRF.16 Frame Relay",
    135: "Juniper ATM2 PIC",
    136: "Juniper advanced services PIC",
    137: "Juniper ATM1 PIC",
    164: "Juniper passive monitor PIC",
    167: "Juniper PPPoE",
    168: "Juniper PPPoE/ATM",
    170: "GPF-T",
    171: "GPF-F",
    174: "Juniper PIC peer",
    175: "Ethernet with Endace ERF header",
    176: "Packet-over-SONET with Endace ERF header",
    178: "Juniper Ethernet",
    179: "Juniper PPP",
    180: "Juniper Frame Relay",
    181: "Juniper Cisco HDLC",
    182: "FRF.16 Frame Relay",
    183: "Juniper voice PIC",
    184: "ARINC 429",
    185: "ARINC 653 interpartition communication",
    186: "USB with FreeBSD header",
    188: "IEEE 802.16 MAC common part sublayer",
    190: "CAN 2.0B",
    191: "IEEE 802.15.4 with Linux padding",
    193: "IEEE 802.16 MAC common part sublayer with radiotap header",
    194: "Juniper integrated service module",
    198: "Ethernet with u10 Networks pseudo-header",
    199: "IPMB with Kontron pseudo-header",
    200: "Juniper secure tunnel",
    216: "Linux evdev events",
    219: "MPLS with label as link-layer header",
    221: "DECT",
    222: "AOS space data link protocol",
    223: "WirelessHART",
    232: "Juniper virtual server",
    233: "Juniper SRX E2E",
    234: "Juniper Fibre Channel",
    238: "Juniper ATM CEMIC",
    246: "pfsync",
    267: "OpenBSD OpenFlow",
    269: "TI LLN sniffer",
}
# Link types whose frames are 802.11 or other radio: no relabelling makes them Ethernet.
_RADIO = {105, 119, 127, 163, 188, 191, 192, 193, 195, 215, 230, 251, 256, 272, 283}
_ACCEPTED_WORDS = (
    "Ethernet, Linux cooked v1/v2, BSD and OpenBSD loopback, raw IP "
    "(link types 1, 113, 276, 0, 108, 101, 12, 14, 228, 229)"
)


def linktype_words(lt: int) -> str:
    """``link type 105 (IEEE 802.11)``."""
    return f"link type {lt} ({LINKTYPE_WORDS.get(lt, 'unknown')})"


def linktype_refusal(lt: int) -> str:
    """Why a link type is refused and what to do, as one sentence."""
    if lt in _RADIO:
        todo = (
            "capture on the wired side instead (an Ethernet interface, or Linux `any`, "
            "which gives Linux cooked frames)"
        )
    else:
        todo = (
            "if its frames are really Ethernet, relabel them with `editcap -T ether IN "
            "OUT`; otherwise capture on an Ethernet interface or on Linux `any`"
        )
    return f"{linktype_words(lt)} is not read by microseg (it reads {_ACCEPTED_WORDS}); {todo}"


# walk status codes
_DONE = 0  # reached the end of the file or the record limit
_STOP = 1  # pcapng: a block Python must handle (SHB or IDB) starts at pos
_E_TRUNC_HDR = -1  # record / block header cut short
_E_TRUNC_DATA = -2  # record data cut short
_E_CAPLEN_MAX = -3  # captured length beyond libpcap's limit (MAX_SNAPLEN)
_E_BLOCK_LEN = -4  # pcapng block length malformed
_E_TRAILER = -5  # pcapng trailing block length differs from the leading one
_E_IFACE = -6  # EPB / OPB names an interface with no IDB
_E_CAPLEN = -7  # EPB / OPB captured length beyond the block
_E_WIRELEN = -8  # original length beyond 2^31 - 1: not a real packet
_INT32_MAX = 0x7FFFFFFF
_MAX_TS_S = (2**63 - 1) // 1_000_000_000 - 1  # latest second an int64 ns timestamp holds


class CaptureError(InputError):
    """A capture went wrong after ``n_read`` complete packets; ``batch`` holds them (all of
    them from :func:`read_capture`; none from :func:`iter_capture`, which yielded them)."""

    def __init__(self, message: str, path: str | None, batch: Batch, n_read: int | None = None):
        super().__init__(message, path)
        self.batch = batch
        self.n_read = len(batch) if n_read is None else n_read


class TruncatedCaptureError(CaptureError):
    """The capture ends inside a record; ``batch`` holds the ``n_read`` complete packets."""


# ---------------------------------------------------------------------------------------------
# compiled walkers
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def _walk_pcap(buf, pos, end, big, ts_mult, maxlen, max_n, off, caplen, wirelen, ts):
    """Walk classic pcap records from ``pos``; fill up to ``max_n`` entries.

    A record may be longer than the file's snap length (the caller flags those); only one
    beyond ``maxlen`` stops the walk. Returns (status, pos, n): ``pos`` is where the next
    record (or the bad one) starts.
    """
    n = 0
    while n < max_n and pos < end:
        if end - pos < 16:
            return _E_TRUNC_HDR, pos, n
        sec = rd32_bo(buf, pos, big)
        frac = rd32_bo(buf, pos + 4, big)
        incl = rd32_bo(buf, pos + 8, big)
        orig = rd32_bo(buf, pos + 12, big)
        if incl > maxlen:
            return _E_CAPLEN_MAX, pos, n
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
def _walk_pcapng(
    buf,
    pos,
    end,
    big,
    n_ifaces,
    snaplens,
    iface_base,
    maxlen,
    max_n,
    start,
    off,
    caplen,
    wirelen,
    tsraw,
    iface,
):
    """Walk pcapng blocks from ``pos`` (inside a section whose byte order is ``big``).

    Packet blocks (EPB, SPB, OPB) fill the output arrays (``start``: where the block begins);
    SHB and IDB stop the walk with ``_STOP`` so that the caller parses them; other blocks are
    skipped. ``snaplens`` holds the snap length of each interface of the current section
    (0 = none): it cuts simple packet blocks, as the format says; an EPB longer than it is
    read in full (the caller flags it). Returns (status, pos, n).
    """
    n = 0
    while n < max_n and pos < end:
        if end - pos < 12:
            return _E_TRUNC_HDR, pos, n
        btype = rd32_bo(buf, pos, big)
        if btype == 0x0A0D0D0A or btype == 1:
            return _STOP, pos, n
        blen = rd32_bo(buf, pos + 4, big)
        if blen < 12 or (blen & 3) != 0:
            return _E_BLOCK_LEN, pos, n
        if blen > end - pos:
            return _E_TRUNC_DATA, pos, n
        if rd32_bo(buf, pos + blen - 4, big) != blen:
            return _E_TRAILER, pos, n
        body = pos + 8
        body_len = blen - 12
        if btype == 6 or btype == 2:  # enhanced / obsolete packet block
            if body_len < 20:
                return _E_BLOCK_LEN, pos, n
            if btype == 6:
                ifc = rd32_bo(buf, body, big)
            else:
                ifc = rd16_bo(buf, body, big)
            if ifc >= n_ifaces:
                return _E_IFACE, pos, n
            incl = rd32_bo(buf, body + 12, big)
            orig = rd32_bo(buf, body + 16, big)
            if incl > body_len - 20:
                return _E_CAPLEN, pos, n
            if incl > maxlen:
                return _E_CAPLEN_MAX, pos, n
            if orig > _INT32_MAX:
                return _E_WIRELEN, pos, n
            start[n] = pos
            off[n] = body + 20
            caplen[n] = incl
            wirelen[n] = orig if orig > incl else incl
            tsraw[n] = (np.uint64(rd32_bo(buf, body + 4, big)) << np.uint64(32)) | np.uint64(
                rd32_bo(buf, body + 8, big)
            )
            iface[n] = iface_base + ifc
            n += 1
        elif btype == 3:  # simple packet block: interface 0, no timestamp
            if body_len < 4:
                return _E_BLOCK_LEN, pos, n
            if n_ifaces < 1:
                return _E_IFACE, pos, n
            orig = rd32_bo(buf, body, big)
            if orig > _INT32_MAX:
                return _E_WIRELEN, pos, n
            incl = body_len - 4
            if orig < incl:
                incl = orig
            sl = snaplens[0]
            if sl > 0 and incl > sl:
                incl = sl
            if incl > maxlen:
                return _E_CAPLEN_MAX, pos, n
            start[n] = pos
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
        out[d : d + ln] = buf[s : s + ln]


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
        out[pos : pos + ln] = data[o : o + ln]
        pos += ln
    return pos


# ---------------------------------------------------------------------------------------------
# reader
# ---------------------------------------------------------------------------------------------
class _Malformed(Exception):
    """A malformed block met while parsing pcapng headers in Python (message only)."""


class _Truncation(Exception):
    def __init__(self, what):
        super().__init__(what)
        self.what = what


def _stderr_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class CaptureReader:
    """One pcap or pcapng file, read in order, a chunk of records at a time.

    :meth:`batches` yields batches, :meth:`read_all` returns one; both close the file at the
    end. After reading, ``n_read`` (complete packets), ``beyond_snaplen`` (records longer than
    their snap length, read in full), ``first_beyond`` (the first one's 1-based record
    number) and ``truncated`` (where the file was cut, or None) describe what was met.

    ``lenient=True`` accepts a file cut inside its last record (and warns); ``allow_truncated``
    accepts it silently. ``warn`` receives one line (``PATH: ...``) at the end of the file if
    anything was flagged; it defaults to printing ``warning: ...`` on stderr when lenient, and
    to nothing otherwise.
    """

    def __init__(
        self, path, *, lenient: bool = False, allow_truncated: bool = False, warn=None, populate: bool = False
    ):
        self.path = os.fspath(path)
        self.allow_truncated = bool(allow_truncated or lenient)
        self.warn = warn if warn is not None else (_stderr_warning if lenient else None)
        self.n_read = 0
        self.truncated: str | None = None
        self.linktype: int | None = None
        self.beyond_snaplen = 0
        self.first_beyond: int | None = None
        self._beyond_snap = 0  # the snap length the first such record exceeded
        self._error: str | None = None  # an error met after the records returned so far
        self._done_error: str | None = None  # that error, once raised
        self._warned = False
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    raise InputError("empty file, not a capture", self.path)
                flags = mmap.MAP_SHARED
                if populate and hasattr(mmap, "MAP_POPULATE"):
                    flags |= mmap.MAP_POPULATE  # fault the whole file in at once
                self._mm = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
        except InputError:
            raise
        except IsADirectoryError:
            raise InputError("is a directory, not a capture file", self.path) from None
        except OSError as exc:
            raise InputError(f"cannot read: {exc.strerror or exc}", self.path) from None
        self.buf = np.frombuffer(self._mm, dtype=np.uint8)
        self.size = size
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self):
        size = self.size
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

    def __enter__(self) -> CaptureReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- pcap ----------------------------------------------------------------------------------
    def _init_pcap(self, magic_le, magic_be):
        self.format = "pcap"
        self.big = magic_le not in (PCAP_MAGIC_US, PCAP_MAGIC_NS)
        magic = magic_be if self.big else magic_le
        self.nanosecond = magic == PCAP_MAGIC_NS
        if self.size < 24:
            raise InputError(f"pcap file header cut short ({self.size} of 24 bytes)", self.path)
        e = ">" if self.big else "<"
        major, minor, _zone, _sigfigs, snaplen, network = struct.unpack_from(e + "HHiIII", self._mm, 4)
        if major != 2:
            raise InputError(f"unsupported pcap version {major}.{minor}", self.path)
        # libpcap takes a snap length of 0 or beyond its limit as its limit
        self.snaplen = snaplen if 0 < snaplen < MAX_SNAPLEN else MAX_SNAPLEN
        lt = network & 0xFFFF  # the upper bits carry FCS information, not the type
        if lt not in LINKTYPES:
            raise InputError(linktype_refusal(lt), self.path)
        self.raw_linktype = lt
        self.linktype = LINKTYPES[lt]
        self.pos = 24

    # -- pcapng --------------------------------------------------------------------------------
    def _init_pcapng(self):
        self.format = "pcapng"
        self.pos = 0
        self.big = False
        # per interface, over all sections: raw link type, snap length, if_tsresol code (None
        # if unsupported), if_tsoffset in seconds
        self.ifaces: list[tuple[int, int, int | None, int]] = []
        self.section_ifaces: list[int] = []  # snaplens of this section's interfaces
        self.iface_base = 0
        self._first_raw_lt: int | None = None
        self._iface_arrays()
        try:
            self._handle_blocks()
        except _Truncation as t:
            self.truncated = t.what
        except _Malformed as m:
            raise InputError(str(m), self.path) from None

    def _iface_arrays(self):
        self._kind = np.array([LINKTYPES.get(lt, -1) for lt, _, _, _ in self.ifaces] or [-1], np.int64)
        self._snap = np.array([s for _, s, _, _ in self.ifaces] or [0], np.int64)
        self._badres = np.array([r is None for _, _, r, _ in self.ifaces] or [False], bool)

    def _handle_blocks(self):
        """Parse SHB / IDB blocks at ``pos`` until a block the compiled walk handles."""
        mm, end = self._mm, self.size
        try:
            while self.pos < end:
                if end - self.pos < 12:
                    return
                if struct.unpack_from("<I", mm, self.pos)[0] == PCAPNG_SHB:
                    if end - self.pos < 28:
                        raise _Truncation(f"pcapng section header at byte {self.pos} cut short")
                    bom = struct.unpack_from("<I", mm, self.pos + 8)[0]
                    if bom == PCAPNG_BOM:
                        self.big = False
                    elif bom == 0x4D3C2B1A:
                        self.big = True
                    else:
                        raise _Malformed(
                            f"pcapng section header at byte {self.pos} has a bad byte-order magic"
                        )
                    e = ">" if self.big else "<"
                    blen, _, major = struct.unpack_from(e + "IIH", mm, self.pos + 4)
                    if major != 1:
                        raise _Malformed(
                            f"unsupported pcapng version {major} in the section header at byte {self.pos}"
                        )
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
                    raise _Malformed(f"pcapng interface block at byte {self.pos} too short")
                lt, _, snaplen = struct.unpack_from(e + "HHI", mm, self.pos + 8)
                tsres, tsoff = self._idb_options(self.pos + 16, self.pos + blen - 4, e)
                # an interface's link type and resolution only matter once a packet uses it
                self.ifaces.append((lt, snaplen, tsres, tsoff))
                self.section_ifaces.append(snaplen)
                self.pos += blen
        finally:
            self._iface_arrays()

    def _check_block(self, blen, e):
        if blen < 12 or blen % 4:
            raise _Malformed(f"pcapng block at byte {self.pos} has a bad length {blen}")
        if blen > self.size - self.pos:
            raise _Truncation(f"file cut short inside the pcapng block at byte {self.pos}")
        if struct.unpack_from(e + "I", self._mm, self.pos + blen - 4)[0] != blen:
            raise _Malformed(f"pcapng block at byte {self.pos}: trailing length differs")

    def _idb_options(self, p, end, e):
        """if_tsresol (code 9) as an exponent code (None: unsupported) and if_tsoffset (code
        14) in seconds."""
        tsres, tsoff = 6, 0
        mm = self._mm
        while p + 4 <= end:
            code, olen = struct.unpack_from(e + "HH", mm, p)
            if code == 0:
                break
            if p + 4 + olen > end:
                raise _Malformed(f"pcapng interface option runs past its block at byte {p}")
            if code == 9 and olen >= 1:
                tsres = mm[p + 4]
                if (tsres & 0x7F) > (63 if tsres & 0x80 else 19):
                    tsres = None
            elif code == 14 and olen >= 8:
                tsoff = struct.unpack_from(e + "q", mm, p + 4)[0]
            p += 4 + ((olen + 3) & ~3)
        return tsres, tsoff

    # -- shared --------------------------------------------------------------------------------
    def next_records(self, max_n: int):
        """Up to ``max_n`` records: (src offsets, caplen, wirelen, ts ns). Empty at the end.

        A malformed record ends the walk: the records before it are returned first, and the
        next call raises the InputError. A file cut short ends the walk and sets ``truncated``.
        """
        if self._error is not None:
            msg, self._error = self._error, None
            self._done_error = msg
            raise InputError(msg, self.path)
        if self.truncated is not None or self._done_error is not None:
            return _empty_rec()
        if self.format == "pcap":
            rec = self._next_pcap(max_n)
        else:
            rec = self._next_pcapng(max_n)
        n = rec[0].shape[0]
        if n == 0 and self._error is not None:
            return self.next_records(max_n)
        self.n_read += n
        return rec

    def _fail_at(self, j: int, byte: int, msg: str) -> int:
        """An error at the ``j``-th record of the current call: keep the ones before it."""
        done = self.n_read + j
        self._error = f"record {done + 1} at byte {byte}: {msg} (after {done} good packets)"
        self.truncated = None
        return j

    def _flag(self, caplen, limit):
        over = (limit > 0) & (caplen > limit)
        k = int(np.count_nonzero(over))
        if k:
            if self.first_beyond is None:
                j = int(np.argmax(over))
                self.first_beyond = self.n_read + j + 1
                self._beyond_snap = int(limit if np.ndim(limit) == 0 else limit[j])
            self.beyond_snaplen += k

    def _next_pcap(self, max_n):
        off = np.empty(max_n, np.int64)
        caplen = np.empty(max_n, np.int32)
        wirelen = np.empty(max_n, np.int32)
        ts = np.empty(max_n, np.int64)
        status, pos, n = _walk_pcap(
            self.buf,
            self.pos,
            self.size,
            self.big,
            1 if self.nanosecond else 1000,
            MAX_SNAPLEN,
            max_n,
            off,
            caplen,
            wirelen,
            ts,
        )
        self.pos = pos
        self._status(status, n)
        self._flag(caplen[:n], self.snaplen)
        return off[:n], caplen[:n], wirelen[:n], ts[:n]

    def _next_pcapng(self, max_n):
        start = np.empty(max_n, np.int64)
        off = np.empty(max_n, np.int64)
        caplen = np.empty(max_n, np.int32)
        wirelen = np.empty(max_n, np.int32)
        tsraw = np.empty(max_n, np.uint64)
        iface = np.empty(max_n, np.int32)
        n = 0
        while n < max_n and self.pos < self.size:
            snaplens = np.array(self.section_ifaces or [0], dtype=np.int64)
            status, pos, k = _walk_pcapng(
                self.buf,
                self.pos,
                self.size,
                self.big,
                len(self.section_ifaces),
                snaplens,
                self.iface_base,
                MAX_SNAPLEN,
                max_n - n,
                start[n:],
                off[n:],
                caplen[n:],
                wirelen[n:],
                tsraw[n:],
                iface[n:],
            )
            self.pos = pos
            n += k
            if status == _STOP:
                try:
                    self._handle_blocks()
                except _Truncation as t:
                    self.truncated = t.what
                    break
                except _Malformed as m:
                    self._error = f"{m} (after {self.n_read + n} good packets)"
                    break
                continue
            self._status(status, n)
            break
        n = self._check_ifaces(start, iface, n)
        ts, n = self._pcapng_ts(start, tsraw, iface, n)
        self._flag(caplen[:n], self._snap[iface[:n]])
        return off[:n], caplen[:n], wirelen[:n], ts

    def _check_ifaces(self, start, iface, n):
        """Cut the records at the first one whose interface cannot be read with the others."""
        if n == 0:
            return 0
        ifc = iface[:n]
        kinds = self._kind[ifc]
        want = self.linktype if self.linktype is not None else int(kinds[0])
        first_lt = self._first_raw_lt if self.linktype is not None else self.ifaces[int(ifc[0])][0]
        bad = (kinds != want) | (kinds < 0) | self._badres[ifc]
        if bad.any():
            j = int(np.argmax(bad))
            i = int(ifc[j])
            lt, _, res, _ = self.ifaces[i]
            if kinds[j] < 0:
                msg = f"interface {i}: {linktype_refusal(lt)}"
            elif res is None:
                msg = f"interface {i} has an unsupported if_tsresol"
            else:
                msg = (
                    f"interface {i} is {linktype_words(lt)} but the packets before it are "
                    f"{linktype_words(first_lt)}; microseg reads one link type "
                    "per capture: split it per interface first, e.g. `tshark -r IN -Y "
                    f"'frame.interface_id == {i}' -w OUT`"
                )
            n = self._fail_at(j, int(start[j]), msg)
        if n and self.linktype is None:
            self.linktype = want
            self._first_raw_lt = first_lt
        return n

    def _pcapng_ts(self, start, tsraw, iface, n):
        """Nanosecond timestamps of the first ``n`` records, cut at the first out of range."""
        tsraw, iface = tsraw[:n], iface[:n]
        ts = np.zeros(n, np.int64)
        bad = np.zeros(n, bool)
        for i in np.unique(iface).tolist():
            sel = iface == i
            _, _, res, offset_s = self.ifaces[i]
            raw = tsraw[sel]
            if res & 0x80:  # 2^-k units
                k = res & 0x7F
                sec = raw >> np.uint64(k)
                frac = (raw & np.uint64((1 << k) - 1)).astype(np.float64)
                ns_frac = np.floor(frac * (1e9 / (1 << k))).astype(np.int64)
            else:  # 10^-k units
                unit = np.uint64(10**res)
                sec = raw // unit
                rem = raw % unit
                ns_frac = (
                    (rem * np.uint64(10 ** (9 - res))) if res <= 9 else (rem // np.uint64(10 ** (res - 9)))
                ).astype(np.int64)
            limit = _MAX_TS_S - offset_s
            if offset_s < -_MAX_TS_S or limit < 0:
                out = np.ones(sec.shape[0], bool)
            else:
                out = sec > np.uint64(limit)
            bad[sel] = out
            ts[sel] = np.where(out, 0, (sec.astype(np.int64) + offset_s) * 1_000_000_000 + ns_frac)
        if bad.any():
            j = int(np.argmax(bad))
            n = self._fail_at(j, int(start[j]), f"interface {int(iface[j])}: timestamp out of range")
        return ts[:n], n

    def _caplen_at(self, pos):
        e = ">" if self.big else "<"
        if self.format == "pcap":
            return struct.unpack_from(e + "I", self._mm, pos + 8)[0]
        btype, blen = struct.unpack_from(e + "II", self._mm, pos)
        if btype in (PCAPNG_EPB, PCAPNG_OPB):
            return struct.unpack_from(e + "I", self._mm, pos + 20)[0]
        return blen - 16

    def _status(self, status, n_new):
        if status >= 0:
            return
        done = self.n_read + n_new
        where = f"record {done + 1} at byte {self.pos}"
        if status in (_E_TRUNC_HDR, _E_TRUNC_DATA):
            self.truncated = f"file cut short inside {where}"
            return
        if status == _E_CAPLEN_MAX:
            what = (
                f"captured length {self._caplen_at(self.pos)} beyond libpcap's limit of {MAX_SNAPLEN} bytes"
            )
        else:
            what = {
                _E_BLOCK_LEN: "malformed block length",
                _E_TRAILER: "trailing block length differs from the leading one",
                _E_IFACE: "refers to an interface with no interface description block",
                _E_CAPLEN: "captured length runs past its block",
                _E_WIRELEN: "original length implausibly large",
            }[status]
        self._error = f"{where}: {what} (after {done} good packets)"

    def _warnings(self):
        """Tell ``warn`` (once) what was flagged while reading."""
        if self.warn is None or self._warned:
            return
        self._warned = True
        notes = []
        if self.beyond_snaplen:
            k = self.beyond_snaplen
            notes.append(
                f"{k} record{'s' if k > 1 else ''} longer than the snap length "
                f"{self._beyond_snap}, read in full (first: record "
                f"{self.first_beyond})"
            )
        if self.truncated is not None and self.allow_truncated:
            notes.append(f"{self.truncated}; {self.n_read} complete packets read")
        if notes:
            self.warn(f"{self.path}: " + "; ".join(notes))

    def _batch(self, rec) -> Batch:
        return _copy_batch(self, *rec)

    def batches(self, batch_size: int = 256):
        """Yield consecutive batches of at most ``batch_size`` packets, then raise the error
        that ended the file, if any (a :class:`CaptureError` with an empty ``.batch``)."""
        try:
            while True:
                try:
                    rec = self.next_records(batch_size)
                except InputError as exc:
                    self._warnings()
                    assert self._done_error is not None  # next_records sets it as it raises
                    raise CaptureError(
                        self._done_error, self.path, self._batch(_empty_rec()), self.n_read
                    ) from exc
                if rec[0].shape[0] == 0:
                    break
                yield self._batch(rec)
            self._warnings()
            if self.truncated is not None and not self.allow_truncated:
                raise TruncatedCaptureError(
                    f"{self.truncated}; {self.n_read} complete packets read",
                    self.path,
                    self._batch(_empty_rec()),
                    self.n_read,
                )
        finally:
            self.close()

    def read_all(self) -> Batch:
        """All packets as one batch; an error raises a :class:`CaptureError` carrying the
        packets before it."""
        parts, err = [], None
        try:
            while True:
                try:
                    rec = self.next_records(DEFAULT_CHUNK)
                except InputError:
                    err = self._done_error
                    break
                if rec[0].shape[0] == 0:
                    break
                parts.append(rec)
            batch = self._batch(_concat(parts or [_empty_rec()]))
        finally:
            self.close()
        self._warnings()
        if err is not None:
            raise CaptureError(err, self.path, batch)
        if self.truncated is not None and not self.allow_truncated:
            raise TruncatedCaptureError(
                f"{self.truncated}; {len(batch)} complete packets read", self.path, batch
            )
        return batch

    def close(self):
        self.buf = None
        mm = getattr(self, "_mm", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # a view is still alive; the mapping goes away with it


def _copy_batch(reader: CaptureReader, off, caplen, wirelen, ts) -> Batch:
    n = off.shape[0]
    dst = np.zeros(n, np.int64)
    if n:
        np.cumsum(caplen[:-1], out=dst[1:])
    total = int(dst[-1] + caplen[-1]) if n else 0
    data = np.empty(total, np.uint8)
    if n:
        _gather(reader.buf, off, caplen, data, dst)
    lt = reader.linktype
    if lt is None:  # a pcapng file with no packet: its first readable interface
        kinds = [LINKTYPES[i[0]] for i in getattr(reader, "ifaces", []) if i[0] in LINKTYPES]
        lt = kinds[0] if kinds else LINK_ETHERNET
    return Batch(
        data=data,
        offset=dst,
        length=caplen.copy(),
        wire_len=wirelen.copy(),
        port=np.zeros(n, np.uint16),
        ts=ts.copy(),
        linktype=lt,
    )


def _concat(parts):
    if len(parts) == 1:
        return parts[0]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))


def read_capture(path, allow_truncated: bool = False, *, lenient: bool = False, warn=None) -> Batch:
    """Read a whole pcap or pcapng file into one batch (see the module docstring).

    An error after some packets raises :class:`CaptureError` carrying them; a file cut inside
    its last record raises :class:`TruncatedCaptureError`, unless ``lenient`` (warns) or
    ``allow_truncated`` (silent). ``warn`` is as for :class:`CaptureReader`.
    """
    return CaptureReader(
        path, lenient=lenient, allow_truncated=allow_truncated, warn=warn, populate=True
    ).read_all()


def iter_capture(
    path, batch_size: int = 256, allow_truncated: bool = False, *, lenient: bool = False, warn=None
):
    """Yield the capture as consecutive batches of at most ``batch_size`` packets.

    Only the current chunk's records are indexed at a time, so the file may be larger than
    memory. The packets before an error are yielded first, then the error is raised (a
    :class:`CaptureError`; :class:`TruncatedCaptureError` for a file cut short, unless
    ``lenient`` or ``allow_truncated``).
    """
    if batch_size < 1:
        raise InputError(f"batch size must be positive, got {batch_size}")
    reader = CaptureReader(path, lenient=lenient, allow_truncated=allow_truncated, warn=warn)
    yield from reader.batches(batch_size)


def _empty_rec():
    return (np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64))


# ---------------------------------------------------------------------------------------------
# writer
# ---------------------------------------------------------------------------------------------
class PcapWriter:
    """Streaming pcap writer (little-endian, version 2.4): ``write(batch)`` appends records.

    The link type comes from the first batch unless given; later batches must match it.
    Timestamps are written in microseconds, or nanoseconds with ``nanosecond=True``.
    """

    def __init__(
        self, path, linktype: int | None = None, nanosecond: bool = False, snaplen: int = MAX_SNAPLEN
    ):
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
            raise InputError(
                f"batch link type {batch.linktype} differs from the file's {self.linktype}", self.path
            )
        n = len(batch)
        if n == 0:
            return
        length = np.asarray(batch.length, np.int32)
        if int(length.max()) > self.snaplen:
            raise InputError(
                f"a packet of {int(length.max())} bytes exceeds the snap length {self.snaplen}", self.path
            )
        ts = np.asarray(batch.ts, np.int64)
        if int(ts.min()) < 0 or int(ts.max()) // 1_000_000_000 > 0xFFFFFFFF:
            raise InputError("timestamps out of the range pcap can store", self.path)
        sec = ts // 1_000_000_000
        frac = ts % 1_000_000_000
        if not self.nanosecond:
            frac //= 1000
        wire = np.maximum(np.asarray(batch.wire_len, np.int32), length)
        out = np.empty(16 * n + int(length.sum(dtype=np.int64)), np.uint8)
        _emit_pcap(batch.data, np.asarray(batch.offset, np.int64), length, wire, sec, frac, out, 0)
        self._f.write(out.data)
        self.count += n

    def close(self) -> None:
        if not self._f.closed:
            if self.linktype is None:
                self._header(LINK_ETHERNET)
            self._f.close()

    def __enter__(self) -> PcapWriter:
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
    where status is None, "truncated", "caplen" (a record beyond libpcap's 262144-byte limit)
    or "wirelen"; records longer than the snap length are read in full. Raises InputError for
    a bad header."""
    if len(data) < 24:
        raise InputError("pcap file header cut short")
    for e in ("<", ">"):
        magic = struct.unpack_from(e + "I", data)[0]
        if magic in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
            break
    else:
        raise InputError("not a pcap file")
    major, _, _, _, _snaplen, network = struct.unpack_from(e + "HHiIII", data, 4)
    if major != 2:
        raise InputError("unsupported version")
    if network & 0xFFFF not in LINKTYPES:
        raise InputError(linktype_refusal(network & 0xFFFF))
    lt = LINKTYPES[network & 0xFFFF]
    mult = 1 if magic == PCAP_MAGIC_NS else 1000
    pos = 24
    out: list[tuple[int, int, bytes]] = []
    while pos < len(data):
        if len(data) - pos < 16:
            return lt, out, "truncated"
        sec, frac, incl, orig = struct.unpack_from(e + "IIII", data, pos)
        if incl > MAX_SNAPLEN:
            return lt, out, "caplen"
        if len(data) - pos - 16 < incl:
            return lt, out, "truncated"
        if orig > _INT32_MAX:
            return lt, out, "wirelen"
        out.append(
            (sec * 1_000_000_000 + frac * mult, max(orig, incl), bytes(data[pos + 16 : pos + 16 + incl]))
        )
        pos += 16 + incl
    return lt, out, None
