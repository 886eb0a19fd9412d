"""Packet batches and the parsed-header table (`FlowKeys`) that travels beside them.

A :class:`Batch` is one contiguous ``uint8`` buffer plus per-packet arrays (offset, captured
length, wire length, ingress port, timestamp in ns). It is the unit every stage works on, the
way DPDK bursts and VPP vectors are.

:class:`FlowKeys` is a struct of arrays. To keep kernel calls cheap (one Numba dispatch per
batch, a handful of arguments), its columns are grouped by dtype into five 2-D arrays of shape
``(n_fields, capacity)``: ``u64``, ``u32``, ``i32``, ``u16`` and ``u8``. Each field is one
contiguous row; ``keys.sport`` is a view of ``keys.u16[SPORT]``. Kernels take the five arrays
and index rows with the module constants below (Numba freezes module globals as constants).

Addresses are 128-bit, stored as two ``uint64`` (hi, lo). IPv4 uses the IPv4-mapped form
``::ffff:a.b.c.d`` so that IPv4 and IPv6 share one width and one comparison.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------------------------------------
# Row indices, one table per dtype. Add new fields at the end of a table and bump N_*.
# ---------------------------------------------------------------------------------------------
# uint64 rows
SRC_HI, SRC_LO, DST_HI, DST_LO = 0, 1, 2, 3
INNER_SRC_HI, INNER_SRC_LO, INNER_DST_HI, INNER_DST_LO = 4, 5, 6, 7  # ICMP error: quoted header
ETH_SRC, ETH_DST = 8, 9  # innermost frame's MACs, as 48-bit integers
ARP_SHA, ARP_THA = 10, 11  # ARP sender/target hardware addresses
N_U64 = 12

# uint32 rows
TCP_SEQ, TCP_ACK = 0, 1
ESP_SPI, ESP_SEQ = 2, 3
GRE_KEY = 4
FLOW_HASH = 5  # symmetric-free 5-tuple hash (filled by parser)
IP_LEN = 6  # IPv4 total length / IPv6 payload length + 40, also
# of jumbograms and BIG TCP super-frames (> 65535)
N_U32 = 7

# int32 rows (offsets are relative to the packet's first byte; -1 = absent)
TENANT = 0  # VNI / VSID of the tunnel that carried the packet, -1 none
L2_OFF, L3_OFF, L4_OFF, PAYLOAD_OFF = 1, 2, 3, 4  # of the innermost packet
PAYLOAD_LEN = 5
OUTER_L3_OFF = 6  # outermost IP header (tunnel endpoint), -1 if none
N_I32 = 7

# uint16 rows
ETHERTYPE = 0  # innermost, after VLAN tags
VLAN0, VLAN1 = 1, 2  # TCI of outer and inner tag, 0 if absent
SPORT, DPORT = 3, 4  # TCP/UDP ports (0 where none, see F_PORTS)
ICMP_ID = 5
TCP_WIN = 6
FRAG_OFF = 7  # IPv4/IPv6 fragment offset in 8-byte units
U16_SPARE = 8  # was IP_LEN (now a u32 row); kept so later rows
# keep their numbers; always 0
GRE_PROTO = 9
ARP_OP = 10
INNER_SPORT, INNER_DPORT = 11, 12  # ICMP error: quoted ports (or echo id in INNER_SPORT)
N_U16 = 13

# uint8 rows
ERROR = 0  # parse-error code, see microseg.packet.errors
IP_VER = 1  # 0 (not IP), 4, 6 -- innermost
PROTO = 2  # innermost L4 protocol after IPv6 extension headers
TTL = 3
ICMP_TYPE, ICMP_CODE = 4, 5
TCP_FLAGS = 6  # FIN=1 SYN=2 RST=4 PSH=8 ACK=16 URG=32 ECE=64 CWR=128
TCP_DOFF = 7  # TCP header length in bytes
N_VLANS = 8
TUN_TYPE = 9  # see TUN_* below
FLAGS = 10  # bit set, see F_* below
INNER_PROTO = 11  # ICMP error: quoted protocol
INNER_ICMP_TYPE = 12  # ICMP error quoting ICMP: quoted type
FLAGS2 = 13  # bit set, see F2_* below
TUN_UNFOLLOWED = 14  # tunnel the reported packet carries but the parser
# does not step into (TUN_*, 0 none)
N_U8 = 15

# FLAGS bits
F_PORTS = 1  # SPORT/DPORT are meaningful (TCP, UDP, SCTP... first fragment)
F_ICMP = 2  # ICMP_TYPE/CODE meaningful (ICMP or ICMPv6)
F_ICMP_ERR = 4  # ICMP error with a parsed quoted header (INNER_* meaningful)
F_FRAG = 8  # a fragment (first or later)
F_MF = 16  # more-fragments bit set
F_ARP = 32  # an ARP packet
F_ESP = 64  # ESP_SPI/ESP_SEQ meaningful
F_GRE = 128  # GRE_PROTO (and GRE_KEY if present) meaningful

# FLAGS2 bits
F2_TRUNCATED = 1  # the capture was snapped (length < wire_len) inside the packet as its own
# headers describe it; lengths come from the headers, not the capture
F2_JUMBO = 2  # IPv6 jumbogram (RFC 2675): length from the hop-by-hop jumbo option
F2_BIG_TCP = 4  # IPv4 total length 0 / IPv6 payload length 0 on a TCP super-frame
# (Linux BIG TCP, GSO/TSO): length from the frame
F2_ARP_HW = 8  # ARP with 6-byte hardware addresses: ARP_SHA / ARP_THA meaningful

# tunnel types. Followed (TUN_TYPE: the tunnel that carried the reported packet):
TUN_NONE, TUN_VXLAN, TUN_GENEVE, TUN_NVGRE = 0, 1, 2, 3
TUN_IPIP = 4  # IPv4/IPv6 in IPv4/IPv6 (IP protocol 4 or 41), outside any overlay
TUN_GRE = 5  # GRE carrying IPv4 or IPv6 (protocol 0x0800 / 0x86DD), outside any overlay
# not followed (TUN_UNFOLLOWED: the reported packet is the carrier):
TUN_ERSPAN = 16  # GRE 0x88BE (ERSPAN type I/II), 0x22EB (type III)
TUN_MPLS = 17  # MPLS over UDP (port 6635), over GRE (0x8847 / 0x8848), in IP (proto 137)
TUN_VXLAN_GPE = 18  # UDP port 4790
TUN_GTPU = 19  # GTP-U, UDP port 2152
TUN_ETHERIP = 20  # EtherIP, IP protocol 97
TUN_NAMES = {
    TUN_NONE: None,
    TUN_VXLAN: "vxlan",
    TUN_GENEVE: "geneve",
    TUN_NVGRE: "nvgre",
    TUN_IPIP: "ipip",
    TUN_GRE: "gre",
    TUN_ERSPAN: "erspan",
    TUN_MPLS: "mpls",
    TUN_VXLAN_GPE: "vxlan-gpe",
    TUN_GTPU: "gtp-u",
    TUN_ETHERIP: "etherip",
}

# link types (pcap LINKTYPE_* numbering)
LINK_NULL = 0  # BSD loopback: 4-byte address family in the writer's byte order
LINK_ETHERNET = 1
LINK_RAW_DLT12 = 12  # raw IP under the DLT_RAW number of most BSDs (libpcap maps it to 101)
LINK_RAW_DLT14 = 14  # raw IP under OpenBSD's DLT_RAW number (libpcap maps it to 101)
LINK_RAW = 101  # raw IPv4/IPv6, no L2 header
LINK_LOOP = 108  # OpenBSD loopback: 4-byte address family in network byte order
LINK_LINUX_SLL = 113  # Linux cooked capture v1: 16-byte header, protocol at offset 14
LINK_IPV4 = 228  # raw IPv4 only
LINK_IPV6 = 229  # raw IPv6 only
LINK_LINUX_SLL2 = 276  # Linux cooked capture v2: 20-byte header, protocol at offset 0
RAW_LINKTYPES = (LINK_RAW_DLT12, LINK_RAW_DLT14, LINK_RAW, LINK_IPV4, LINK_IPV6)
SUPPORTED_LINKTYPES = (
    LINK_NULL,
    LINK_ETHERNET,
    LINK_RAW_DLT12,
    LINK_RAW_DLT14,
    LINK_RAW,
    LINK_LOOP,
    LINK_LINUX_SLL,
    LINK_IPV4,
    LINK_IPV6,
    LINK_LINUX_SLL2,
)
LINK_NAMES = {
    LINK_NULL: "null",
    LINK_ETHERNET: "ethernet",
    LINK_RAW_DLT12: "raw",
    LINK_RAW_DLT14: "raw",
    LINK_RAW: "raw",
    LINK_LOOP: "loop",
    LINK_LINUX_SLL: "linux_sll",
    LINK_IPV4: "ipv4",
    LINK_IPV6: "ipv6",
    LINK_LINUX_SLL2: "linux_sll2",
}
# address families of BSD loopback headers that carry IPv6 (AF_INET6 on NetBSD/OpenBSD,
# FreeBSD, macOS); AF_INET is 2 everywhere
AF_INET = 2
AF_INET6_VALUES = (24, 28, 30)

_TABLES = {
    "u64": (
        np.uint64,
        {
            "src_hi": SRC_HI,
            "src_lo": SRC_LO,
            "dst_hi": DST_HI,
            "dst_lo": DST_LO,
            "inner_src_hi": INNER_SRC_HI,
            "inner_src_lo": INNER_SRC_LO,
            "inner_dst_hi": INNER_DST_HI,
            "inner_dst_lo": INNER_DST_LO,
            "eth_src": ETH_SRC,
            "eth_dst": ETH_DST,
            "arp_sha": ARP_SHA,
            "arp_tha": ARP_THA,
        },
        N_U64,
    ),
    "u32": (
        np.uint32,
        {
            "tcp_seq": TCP_SEQ,
            "tcp_ack": TCP_ACK,
            "esp_spi": ESP_SPI,
            "esp_seq": ESP_SEQ,
            "gre_key": GRE_KEY,
            "flow_hash": FLOW_HASH,
            "ip_len": IP_LEN,
        },
        N_U32,
    ),
    "i32": (
        np.int32,
        {
            "tenant": TENANT,
            "l2_off": L2_OFF,
            "l3_off": L3_OFF,
            "l4_off": L4_OFF,
            "payload_off": PAYLOAD_OFF,
            "payload_len": PAYLOAD_LEN,
            "outer_l3_off": OUTER_L3_OFF,
        },
        N_I32,
    ),
    "u16": (
        np.uint16,
        {
            "ethertype": ETHERTYPE,
            "vlan0": VLAN0,
            "vlan1": VLAN1,
            "sport": SPORT,
            "dport": DPORT,
            "icmp_id": ICMP_ID,
            "tcp_win": TCP_WIN,
            "frag_off": FRAG_OFF,
            "gre_proto": GRE_PROTO,
            "arp_op": ARP_OP,
            "inner_sport": INNER_SPORT,
            "inner_dport": INNER_DPORT,
        },
        N_U16,
    ),
    "u8": (
        np.uint8,
        {
            "error": ERROR,
            "ip_ver": IP_VER,
            "proto": PROTO,
            "ttl": TTL,
            "icmp_type": ICMP_TYPE,
            "icmp_code": ICMP_CODE,
            "tcp_flags": TCP_FLAGS,
            "tcp_doff": TCP_DOFF,
            "n_vlans": N_VLANS,
            "tun_type": TUN_TYPE,
            "flags": FLAGS,
            "inner_proto": INNER_PROTO,
            "inner_icmp_type": INNER_ICMP_TYPE,
            "flags2": FLAGS2,
            "tun_unfollowed": TUN_UNFOLLOWED,
        },
        N_U8,
    ),
}
FIELDS = {name: (table, row) for table, (_, rows, _) in _TABLES.items() for name, row in rows.items()}

V4_MAPPED_HI = np.uint64(0)
V4_MAPPED_LO_PREFIX = 0x0000FFFF00000000


class FlowKeys:
    """Parsed headers of a batch, one column per field (see module docstring).

    Allocate once with a capacity and reuse across batches (``keys.resize(n)`` is free while
    ``n <= capacity``): allocation per 256-packet batch would cost more than parsing it.
    """

    __slots__ = ("u64", "u32", "i32", "u16", "u8", "n", "_cap")

    def __init__(self, capacity: int = 256):
        self._cap = int(capacity)
        self.n = 0
        for table, (dt, _, rows) in _TABLES.items():
            object.__setattr__(self, table, np.zeros((rows, self._cap), dtype=dt))

    @property
    def capacity(self) -> int:
        return self._cap

    def resize(self, n: int) -> FlowKeys:
        """Make room for ``n`` packets (grows the backing arrays only when needed)."""
        if n > self._cap:
            cap = max(n, 2 * self._cap)
            for table, (dt, _, rows) in _TABLES.items():
                object.__setattr__(self, table, np.zeros((rows, cap), dtype=dt))
            self._cap = cap
        self.n = int(n)
        return self

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The five backing arrays, in the order kernels take them."""
        return self.u64, self.u32, self.i32, self.u16, self.u8

    def __len__(self) -> int:
        return self.n

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            table, row = FIELDS[name]
        except KeyError:
            raise AttributeError(name) from None
        return getattr(self, table)[row, : self.n]

    def row(self, i: int) -> dict:
        """All fields of packet ``i`` as Python ints (for tests, tracing and JSON output)."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        return {name: int(getattr(self, t)[r, i]) for name, (t, r) in FIELDS.items()}

    def copy(self) -> FlowKeys:
        k = FlowKeys(max(self.n, 1))
        k.n = self.n
        for t in _TABLES:
            getattr(k, t)[:, : self.n] = getattr(self, t)[:, : self.n]
        return k


@dataclass
class Batch:
    """A batch of packets in one contiguous buffer.

    ``data[offset[i] : offset[i] + length[i]]`` is packet ``i`` as captured; ``wire_len[i]`` is its
    length on the wire (> length when the capture was snapped). ``linktype`` says where the
    packets start (pcap numbering, one of ``SUPPORTED_LINKTYPES``): Ethernet (1), raw IP (101
    and its aliases), BSD loopback (0, 108) or Linux cooked capture (113, 276).
    """

    data: np.ndarray  # uint8, contiguous
    offset: np.ndarray  # int64
    length: np.ndarray  # int32, captured length
    wire_len: np.ndarray  # int32
    port: np.ndarray  # uint16, ingress port
    ts: np.ndarray  # int64, nanoseconds since the epoch
    linktype: int = LINK_ETHERNET

    def __len__(self) -> int:
        return int(self.offset.shape[0])

    def packet(self, i: int) -> bytes:
        o = int(self.offset[i])
        return self.data[o : o + int(self.length[i])].tobytes()

    def packets(self):
        for i in range(len(self)):
            yield self.packet(i)

    @classmethod
    def from_packets(cls, packets, ts=None, port=None, linktype: int = LINK_ETHERNET, wire_len=None) -> Batch:
        """Build a batch from an iterable of ``bytes`` (copies them into one buffer)."""
        packets = [bytes(p) for p in packets]
        n = len(packets)
        length = np.fromiter((len(p) for p in packets), dtype=np.int32, count=n)
        offset = np.zeros(n, dtype=np.int64)
        if n:
            np.cumsum(length[:-1], out=offset[1:])
        data = np.frombuffer(b"".join(packets), dtype=np.uint8).copy() if n else np.zeros(0, np.uint8)
        return cls(
            data=data,
            offset=offset,
            length=length,
            wire_len=np.asarray(wire_len, dtype=np.int32) if wire_len is not None else length.copy(),
            port=np.asarray(port, dtype=np.uint16) if port is not None else np.zeros(n, np.uint16),
            ts=np.asarray(ts, dtype=np.int64) if ts is not None else np.zeros(n, np.int64),
            linktype=linktype,
        )

    def slice(self, start: int, stop: int) -> Batch:
        """Packets ``start:stop`` as a batch sharing this one's buffer (no copy)."""
        return Batch(
            self.data,
            self.offset[start:stop],
            self.length[start:stop],
            self.wire_len[start:stop],
            self.port[start:stop],
            self.ts[start:stop],
            self.linktype,
        )

    def chunks(self, size: int = 256):
        """Iterate over consecutive sub-batches of at most ``size`` packets."""
        for s in range(0, len(self), size):
            yield self.slice(s, min(s + size, len(self)))

    @classmethod
    def concat(cls, parts, order: str | None = "ts") -> Batch:
        """One batch (one new buffer) from several of the same link type; with
        ``order="ts"`` packets are sorted by timestamp (stable), else kept part after part."""
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.from_packets([])
        linktype = parts[0].linktype
        if any(p.linktype != linktype for p in parts):
            raise ValueError("cannot concatenate batches of different link types")
        src = np.concatenate(
            [
                np.asarray(p.offset, np.int64) + base
                for p, base in zip(parts, np.cumsum([0] + [p.data.shape[0] for p in parts[:-1]]))
            ]
        )
        data = np.concatenate([p.data for p in parts])
        length = np.concatenate([np.asarray(p.length, np.int32) for p in parts])
        wire = np.concatenate([np.asarray(p.wire_len, np.int32) for p in parts])
        port = np.concatenate([np.asarray(p.port, np.uint16) for p in parts])
        ts = np.concatenate([np.asarray(p.ts, np.int64) for p in parts])
        if order == "ts":
            idx = np.argsort(ts, kind="stable")
            src, length, wire, port, ts = src[idx], length[idx], wire[idx], port[idx], ts[idx]
        return cls.gather(data, src, length, wire, port, ts, linktype)

    @classmethod
    def gather(cls, data, src_offset, length, wire_len, port, ts, linktype) -> Batch:
        """Copy the packets ``data[src_offset[i] : src_offset[i] + length[i]]`` into a new
        contiguous batch (vectorised: no per-packet Python)."""
        length = np.asarray(length, np.int32)
        n = length.shape[0]
        offset = np.zeros(n, np.int64)
        if n:
            np.cumsum(length[:-1], out=offset[1:])
        total = int(length.sum(dtype=np.int64))
        idx = np.repeat(np.asarray(src_offset, np.int64) - offset, length) + np.arange(total, dtype=np.int64)
        return cls(
            np.asarray(data, np.uint8)[idx],
            offset,
            length,
            np.asarray(wire_len, np.int32),
            np.asarray(port, np.uint16),
            np.asarray(ts, np.int64),
            linktype,
        )

    def select(self, mask_or_index) -> Batch:
        """A compacted copy holding only the chosen packets (boolean mask or index array)."""
        idx = (
            np.flatnonzero(mask_or_index)
            if np.asarray(mask_or_index).dtype == bool
            else np.asarray(mask_or_index)
        )
        return Batch.gather(
            self.data,
            np.asarray(self.offset)[idx],
            np.asarray(self.length)[idx],
            np.asarray(self.wire_len)[idx],
            np.asarray(self.port)[idx],
            np.asarray(self.ts)[idx],
            self.linktype,
        )


def addr_to_text(hi: int, lo: int) -> str:
    """Text form of a 128-bit address; IPv4-mapped values print as dotted quads."""
    if hi == 0 and (lo >> 32) == 0xFFFF:
        return str(ipaddress.IPv4Address(lo & 0xFFFFFFFF))
    return str(ipaddress.IPv6Address((hi << 64) | lo))


def text_to_addr(text: str) -> tuple[int, int]:
    """(hi, lo) of an IPv4 or IPv6 address in text form (IPv4 maps to ::ffff:a.b.c.d)."""
    a = ipaddress.ip_address(text)
    if a.version == 4:
        return 0, V4_MAPPED_LO_PREFIX | int(a)
    v = int(a)
    return v >> 64, v & 0xFFFFFFFFFFFFFFFF
