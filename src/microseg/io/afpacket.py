"""AF_PACKET ports: a ``TPACKET_V3`` memory-mapped receive ring in, ``sendmmsg`` out.

One :class:`AfPacketPort` is one interface. Receive: the kernel fills blocks of the ring
(``PACKET_RX_RING``) and hands a block to user space when it is full or when its retire
timeout expires; :meth:`AfPacketPort.recv` takes every block the kernel has handed over and
turns them into one :class:`~microseg.packet.batch.Batch` whose buffer *is* the ring (no copy):
one compiled pass walks the ``tpacket3_hdr`` chain of each block and fills the offset, length,
wire length, timestamp and status arrays. The blocks go back to the kernel with
:meth:`AfPacketPort.release`, which the caller calls once it has finished with the batch
(everything it sends on is copied out of the ring by then).

Transmit: :meth:`AfPacketPort.send` hands a whole batch to the kernel with one ``sendmmsg``
call (through ``ctypes``), one ``iovec`` per frame pointing into the batch's own buffer, built
column-wise with NumPy. ``sendmmsg`` rather than ``PACKET_TX_RING``: the frames the datapath
sends already lie in one contiguous buffer (the Forwarder's or the decapsulator's output), so
``sendmmsg`` sends them without another copy, with no frame-size limit per slot and no status
words to poll; a TX ring would copy every frame into its slots and still need a ``send()`` to
kick it. (Not yet measured against a TX ring; see docs/agent.md.)

The traps such a port must handle:

* **Checksum offload** (``TP_STATUS_CSUMNOTREADY``): a frame a local stack sent through a veth
  (or a tap) with ``CHECKSUM_PARTIAL`` carries, in its L4 checksum field, only the
  pseudo-header sum; the NIC that would have finished it is never reached. The ring's status
  word says so per frame (the ``PACKET_AUXDATA`` control message carries the same bits for
  ``recvmsg`` readers, which a ring does not use). :attr:`RxBurst.csum_partial` marks such
  frames, and :func:`complete_l4_checksums` finishes their checksum. The agent does that as
  soon as it has copied them out of the ring: the frame is then valid for connection tracking
  (Linux conntrack trusts ``CHECKSUM_PARTIAL`` frames, which are the local stack's own) and
  complete when it leaves the host, since the receiver's stack will verify it.
* **Segmentation offload**: with GSO/TSO/GRO on, a port can deliver super-frames far larger
  than the MTU. :meth:`AfPacketPort.disable_offloads` turns them off on the port (with the
  ``SIOCETHTOOL`` ioctl that ``ethtool -K`` uses; no ``ethtool`` binary is needed) and
  :attr:`RxBurst.oversize` marks frames that are larger than the port's MTU all the same
  (a veth's peer may still segment-offload; see docs/agent.md), which the agent drops.
* **Own transmissions**: ``PACKET_IGNORE_OUTGOING`` keeps the frames this socket (or any
  other on the host) sends out of its own ring.
* **Frames before bind**: the socket is created with protocol 0 (it receives nothing), the
  ring is set up, and only then is it bound to the interface with ``ETH_P_ALL``, so no frame
  of another interface slips in between.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import socket
import struct
from dataclasses import dataclass

import numpy as np
from numba import njit

from ..lowlevel import pow2_at_least, rd32_le
from ..packet.batch import (
    F_FRAG,
    F_MF,
    FLAGS,
    FRAG_OFF,
    IP_LEN,
    IP_VER,
    L3_OFF,
    L4_OFF,
    LINK_ETHERNET,
    PROTO,
    Batch,
)
from ..packet.checksum import csum_fold, csum_partial

__all__ = [
    "AfPacketPort",
    "RxBurst",
    "complete_l4_checksums",
    "walk_blocks",
    "walk_frames",
    "interface_mtu",
    "TP_STATUS_CSUMNOTREADY",
    "TP_STATUS_CSUM_VALID",
    "TP_STATUS_VLAN_VALID",
]

SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_IGNORE_OUTGOING = 23
PACKET_MR_PROMISC = 1
TPACKET_V2, TPACKET_V3 = 1, 2
TPACKET2_HDRLEN = 52  # struct tpacket2_hdr + struct sockaddr_ll, as the kernel aligns it
ETH_P_ALL = 0x0003

TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
TP_STATUS_LOSING = 1 << 2
TP_STATUS_CSUMNOTREADY = 1 << 3
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_CSUM_VALID = 1 << 7

SIOCETHTOOL = 0x8946
SIOCGIFMTU = 0x8921
# legacy ethtool commands (still served by every kernel): set TSO, GSO, GRO
ETHTOOL_STSO = 0x1F
ETHTOOL_SGSO = 0x24
ETHTOOL_SGRO = 0x2C
ETHTOOL_STXCSUM = 0x17  # transmit checksum offload
OFFLOADS = {"tso": ETHTOOL_STSO, "gso": ETHTOOL_SGSO, "gro": ETHTOOL_SGRO, "tx": ETHTOOL_STXCSUM}
# each legacy "set" command's "get" is the number before it
SEGMENTATION = ("tso", "gso", "gro")

# struct tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1
BLK_STATUS, BLK_NUM_PKTS, BLK_FIRST = 8, 12, 16


# ---------------------------------------------------------------------------------------------
# The ring walk
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def walk_blocks(ring, blocks, offset, length, wire_len, ts, status, vlan):
    """Walk the ``tpacket3_hdr`` chain of each block (``blocks``: byte offsets into ``ring``)
    into the per-packet arrays; returns how many packets were written (at most the arrays'
    size; a header that points outside its block ends that block)."""
    k = 0
    cap = offset.shape[0]
    size = ring.shape[0]
    for bi in range(blocks.shape[0]):
        b = blocks[bi]
        num = rd32_le(ring, b + BLK_NUM_PKTS)
        p = b + rd32_le(ring, b + BLK_FIRST)
        for _ in range(num):
            if k >= cap or p + 40 > size:
                break
            nxt = rd32_le(ring, p)
            snap = rd32_le(ring, p + 12)
            mac = np.int64(ring[p + 24]) | (np.int64(ring[p + 25]) << 8)
            if p + mac + snap > size:
                break
            offset[k] = p + mac
            length[k] = snap
            wire_len[k] = rd32_le(ring, p + 16)
            ts[k] = rd32_le(ring, p + 4) * np.int64(1_000_000_000) + rd32_le(ring, p + 8)
            status[k] = rd32_le(ring, p + 20)
            vlan[k] = rd32_le(ring, p + 32)
            k += 1
            if nxt == 0:
                break
            p += nxt
    return k


@njit(cache=True)
def walk_frames(
    ring,
    start,
    nframes,
    limit,
    per_block,
    block_size,
    frame_size,
    offset,
    length,
    wire_len,
    ts,
    status,
    vlan,
    slots,
):
    """Walk a ``TPACKET_V2`` ring of ``nframes`` frames from frame ``start`` while the frames
    are the user's (``TP_STATUS_USER``), at most ``limit`` of them, into the per-packet arrays
    (``slots``: each frame's byte offset, to give it back); returns how many."""
    k = 0
    cap = min(offset.shape[0], limit, nframes)
    i = start
    while k < cap:
        base = (i // per_block) * block_size + (i % per_block) * frame_size
        st = rd32_le(ring, base)
        if not st & 1:
            break
        snap = rd32_le(ring, base + 8)
        mac = np.int64(ring[base + 12]) | (np.int64(ring[base + 13]) << 8)
        if mac + snap > frame_size:  # never from a sane kernel: keep what lies in the slot
            snap = max(0, frame_size - mac)
        offset[k] = base + mac
        length[k] = snap
        wire_len[k] = rd32_le(ring, base + 4)
        ts[k] = rd32_le(ring, base + 16) * np.int64(1_000_000_000) + rd32_le(ring, base + 20)
        status[k] = st
        vlan[k] = np.int64(ring[base + 24]) | (np.int64(ring[base + 25]) << 8)
        slots[k] = base
        k += 1
        i = (i + 1) % nframes
    return k


@dataclass
class RxBurst:
    """What one :meth:`AfPacketPort.recv` got: the frames, as a batch over the ring, plus
    the kernel's per-frame status word and what the port makes of it."""

    batch: Batch
    status: np.ndarray  # uint32 tp_status per frame
    vlan_tci: np.ndarray  # uint32 tp_vlan_tci (meaningful where TP_STATUS_VLAN_VALID)
    mtu: int

    @property
    def csum_partial(self) -> np.ndarray:
        """Frames whose L4 checksum the sender's stack left to offload (valid, unfinished)."""
        return (self.status & TP_STATUS_CSUMNOTREADY) != 0

    @property
    def vlan_stripped(self) -> np.ndarray:
        """Frames whose VLAN tag the kernel moved out of the frame (into ``vlan_tci``)."""
        return (self.status & TP_STATUS_VLAN_VALID) != 0

    @property
    def oversize(self) -> np.ndarray:
        """Frames larger than the port's MTU allows (segmentation-offload super-frames)."""
        return np.asarray(self.batch.wire_len) > self.mtu + 14


# ---------------------------------------------------------------------------------------------
# Transmit descriptors
# ---------------------------------------------------------------------------------------------
class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", _MsgHdr), ("len", ctypes.c_uint)]


_IOV_DT = np.dtype(_IoVec)
_MMSG_DT = np.dtype(_MMsgHdr)
_libc = ctypes.CDLL(None, use_errno=True)
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_sendmmsg.restype = ctypes.c_int


def interface_mtu(ifname: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16si12x", ifname.encode(), 0)
        return struct.unpack("16si12x", fcntl.ioctl(s.fileno(), SIOCGIFMTU, req))[1]


def _ethtool_value(ifname: str, cmd: int, value: int) -> int:
    buf = ctypes.create_string_buffer(struct.pack("II", cmd, value))
    ifr = struct.pack("16sP", ifname.encode(), ctypes.addressof(buf)) + b"\0" * 16
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifr)
    return struct.unpack("II", buf.raw[:8])[1]


def set_offload(ifname: str, what: str, on: bool) -> None:
    """``ethtool -K IFNAME WHAT on|off`` through the ``SIOCETHTOOL`` ioctl (OSError if the
    driver refuses)."""
    _ethtool_value(ifname, OFFLOADS[what], int(on))


def get_offload(ifname: str, what: str) -> bool:
    """Is offload ``what`` on (``ethtool -k``)?"""
    return bool(_ethtool_value(ifname, OFFLOADS[what] - 1, 0))


class AfPacketPort:
    """One interface: an RX ring and ``sendmmsg`` transmit (see module doc).

    ``port_id`` goes into every received frame's ``Batch.port``. ``block_size`` x
    ``block_count`` is the ring (it must hold what arrives while the caller is busy).
    ``ring_version`` 2 (the default) is a ``TPACKET_V2`` ring: every frame is the user's as
    soon as the kernel has written it, so a frame waits for nothing; 3 is ``TPACKET_V3``,
    whose blocks are handed over when full or when ``retire_ms`` expires -- fewer wake-ups
    under load, but the kernel's timer counts in ticks (4 ms at HZ=250), which every frame of
    light traffic then waits: measured in the lab, TCP connection set-up through two agents fell
    to a few dozen a second. Not thread-safe; one reader.
    """

    def __init__(
        self,
        ifname: str,
        port_id: int = 0,
        *,
        block_size: int = 1 << 17,
        block_count: int = 32,
        frame_size: int = 2048,
        retire_ms: int = 1,
        promiscuous: bool = True,
        ring_version: int = 2,
    ):
        self.ifname = ifname
        self.port_id = int(port_id)
        self.block_size = int(block_size)
        self.block_count = int(block_count)
        self.mtu = interface_mtu(ifname)
        self.counters = {
            "rx_packets": 0,
            "rx_bytes": 0,
            "tx_packets": 0,
            "tx_bytes": 0,
            "tx_errors": 0,
            "rx_csum_partial": 0,
        }
        if ring_version not in (2, 3):
            raise ValueError("ring_version is 2 (TPACKET_V2) or 3 (TPACKET_V3)")
        self.ring_version = ring_version
        if ring_version == 2:
            # a slot holds a whole frame of the MTU (VLAN tag included) behind its header
            need = TPACKET2_HDRLEN + 16 + self.mtu + 18
            frame_size = max(int(frame_size), pow2_at_least(need))
            self.block_size = max(self.block_size, frame_size)
        self.frame_size = int(frame_size)
        self.per_block = self.block_size // self.frame_size
        self.frame_count = self.per_block * self.block_count
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # receives nothing yet
        try:
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2 if ring_version == 2 else TPACKET_V3)
            try:
                sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            except OSError:  # kernels before 4.20; our own frames are then filtered by type
                pass
            if ring_version == 2:
                req = struct.pack("4I", self.block_size, self.block_count, self.frame_size, self.frame_count)
            else:
                req = struct.pack(
                    "7I",
                    self.block_size,
                    self.block_count,
                    frame_size,
                    self.block_size * self.block_count // frame_size,
                    int(retire_ms),
                    0,
                    0,
                )
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
            self._mm = mmap.mmap(
                sock.fileno(),
                self.block_size * self.block_count,
                mmap.MAP_SHARED,
                mmap.PROT_READ | mmap.PROT_WRITE,
            )
            sock.bind((ifname, ETH_P_ALL))
            self.ifindex = socket.if_nametoindex(ifname)
            self.mac = sock.getsockname()[4]
            if promiscuous:
                mreq = struct.pack("iHH8s", self.ifindex, PACKET_MR_PROMISC, 0, b"")
                sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.ring = np.frombuffer(self._mm, dtype=np.uint8)
        self._ring32 = np.frombuffer(self._mm, dtype=np.uint32)
        self._cur = 0
        self._held: list[int] = []
        self._held_slots = np.zeros(0, np.int64)
        cap = self.block_size * self.block_count // 64 + 1  # more than can ever fit
        self._slots = np.empty(cap, np.int64)
        self._cols = (
            np.empty(cap, np.int64),
            np.empty(cap, np.int32),
            np.empty(cap, np.int32),
            np.empty(cap, np.int64),
            np.empty(cap, np.uint32),
            np.empty(cap, np.uint32),
        )

    # -- receive --------------------------------------------------------------------------------
    def fileno(self) -> int:
        return self.sock.fileno()

    def _frame_base(self, i: int) -> int:
        return (i // self.per_block) * self.block_size + (i % self.per_block) * self.frame_size

    def ready(self) -> bool:
        """True when the kernel has handed over the next frame (V2) or block (V3)."""
        if self.ring_version == 2:
            return bool(self._ring32[self._frame_base(self._cur) // 4] & TP_STATUS_USER)
        off = (self._cur * self.block_size + BLK_STATUS) // 4
        return bool(self._ring32[off] & TP_STATUS_USER)

    def recv(self, max_blocks: int | None = None) -> RxBurst | None:
        """Every block the kernel has handed over (up to ``max_blocks``), as one burst, or
        None when there is none. The blocks stay ours until :meth:`release`."""
        if self._held or self._held_slots.size:
            raise RuntimeError("release() the previous burst first")
        if self.ring_version == 2:
            return self._recv_frames(max_blocks)
        blocks: list[int] = []
        limit = self.block_count if max_blocks is None else min(max_blocks, self.block_count)
        while len(blocks) < limit:
            base = self._cur * self.block_size
            if not self._ring32[(base + BLK_STATUS) // 4] & TP_STATUS_USER:
                break
            blocks.append(base)
            self._cur = (self._cur + 1) % self.block_count
        if not blocks:
            return None
        self._held = blocks
        off, ln, wl, ts, st, vl = self._cols
        n = walk_blocks(self.ring, np.asarray(blocks, np.int64), off, ln, wl, ts, st, vl)
        return self._burst(n)

    def _recv_frames(self, max_blocks: int | None) -> RxBurst | None:
        off, ln, wl, ts, st, vl = self._cols
        limit = self.frame_count if max_blocks is None else min(self.frame_count, max_blocks * self.per_block)
        n = walk_frames(
            self.ring,
            self._cur,
            self.frame_count,
            limit,
            self.per_block,
            self.block_size,
            self.frame_size,
            off,
            ln,
            wl,
            ts,
            st,
            vl,
            self._slots,
        )
        if n == 0:
            return None
        self._held_slots = self._slots[:n].copy()
        self._cur = (self._cur + n) % self.frame_count
        return self._burst(n)

    def _burst(self, n: int) -> RxBurst:
        off, ln, wl, ts, st, vl = self._cols
        port = np.full(n, self.port_id, np.uint16)
        batch = Batch(
            self.ring, off[:n].copy(), ln[:n].copy(), wl[:n].copy(), port, ts[:n].copy(), LINK_ETHERNET
        )
        burst = RxBurst(batch, st[:n].copy(), vl[:n].copy(), self.mtu)
        self.counters["rx_packets"] += n
        self.counters["rx_bytes"] += int(batch.wire_len.sum(dtype=np.int64))
        self.counters["rx_csum_partial"] += int(np.count_nonzero(burst.csum_partial))
        return burst

    def release(self) -> None:
        """Give the blocks of the last burst back to the kernel (the burst's batch must not be
        read after this)."""
        for base in self._held:
            self._ring32[(base + BLK_STATUS) // 4] = TP_STATUS_KERNEL
        self._held = []
        if self._held_slots.size:
            self._ring32[self._held_slots // 4] = TP_STATUS_KERNEL
            self._held_slots = np.zeros(0, np.int64)

    def kernel_stats(self) -> dict:
        """The socket's ``PACKET_STATISTICS`` (packets, drops, queue freezes) since the last
        call: drops are frames the kernel found no room for in the ring."""
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12)
        packets, drops, freezes = struct.unpack("3I", raw)
        return {"packets": packets, "drops": drops, "freezes": freezes}

    # -- transmit -------------------------------------------------------------------------------
    def send(self, batch: Batch, rows: np.ndarray | None = None) -> int:
        """Send the frames of ``batch`` (or its ``rows``) out of this interface with
        ``sendmmsg``; returns how many the kernel took. A frame the kernel refuses (too big
        for the MTU, interface down) is counted in ``tx_errors`` and skipped."""
        data = np.ascontiguousarray(batch.data)
        off = np.asarray(batch.offset, np.int64)
        ln = np.asarray(batch.length, np.int64)
        if rows is not None:
            off, ln = off[rows], ln[rows]
        n = off.shape[0]
        if n == 0:
            return 0
        iov = np.zeros(n, _IOV_DT)
        iov["base"] = np.uint64(data.ctypes.data) + off.astype(np.uint64)
        iov["len"] = ln.astype(np.uint64)
        msgs = np.zeros(n, _MMSG_DT)
        step = np.uint64(_IOV_DT.itemsize)
        msgs["hdr"]["iov"] = np.uint64(iov.ctypes.data) + np.arange(n, dtype=np.uint64) * step
        msgs["hdr"]["iovlen"] = 1
        fd = self.sock.fileno()
        base = msgs.ctypes.data
        sent = 0
        i = 0
        while i < n:
            r = _sendmmsg(fd, base + i * _MMSG_DT.itemsize, n - i, 0)
            if r < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                self.counters["tx_errors"] += 1
                i += 1  # the frame at i was refused: skip it, send the rest
                continue
            sent += r
            i += r
        self.counters["tx_packets"] += sent
        self.counters["tx_bytes"] += int(ln.sum()) if sent == n else int(np.sum(msgs["len"]))
        del data
        return sent

    # -- offloads, lifetime ---------------------------------------------------------------------
    def disable_offloads(self) -> dict:
        """Turn TSO, GSO and GRO off on this interface; returns ``{name: error or None}`` (no
        error where the driver refuses the change but the offload is off already, as on a veth
        whose peer runs XDP)."""
        out: dict[str, str | None] = {}
        for what in SEGMENTATION:
            try:
                set_offload(self.ifname, what, False)
                out[what] = None
            except OSError as exc:
                try:
                    off = not get_offload(self.ifname, what)
                except OSError:
                    off = False
                out[what] = None if off else (os.strerror(exc.errno) if exc.errno else str(exc))
        return out

    def close(self) -> None:
        self._held = []
        # drop the views of the ring so that the mapping can close
        self.ring = np.empty(0, np.uint8)
        self._ring32 = np.empty(0, np.uint32)
        try:
            self._mm.close()
        except (BufferError, ValueError):  # a batch still references the ring: let GC do it
            pass
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------
# Checksum completion
# ---------------------------------------------------------------------------------------------
@njit(cache=True)
def _complete(data, offset, length, rows, u32, u16, i32, u8):
    done = 0
    for j in range(rows.shape[0]):
        i = rows[j]
        ver = u8[IP_VER, i]
        proto = u8[PROTO, i]
        fl = u8[FLAGS, i]
        if ver == 0 or ((fl & F_FRAG) and ((fl & F_MF) or u16[FRAG_OFF, i] != 0)):
            continue
        if proto == 6:
            field = 16
        elif proto == 17:
            field = 6
        elif (proto == 1 and ver == 4) or (proto == 58 and ver == 6):
            field = 2
        else:
            continue
        b = offset[i]
        ln = np.int64(length[i])
        l3 = np.int64(i32[L3_OFF, i])
        l4 = np.int64(i32[L4_OFF, i])
        if l3 < 0 or l4 < l3 + 20:
            continue
        end = l3 + np.int64(u32[IP_LEN, i])
        if end > ln or l4 + field + 2 > end:
            continue
        seg = end - l4
        data[b + l4 + field] = 0
        data[b + l4 + field + 1] = 0
        s = csum_partial(data, b + l4, b + end, 0)
        if ver == 4:
            if proto != 1:
                s = csum_partial(data, b + l3 + 12, b + l3 + 20, s) + proto + seg
        else:
            s = csum_partial(data, b + l3 + 8, b + l3 + 40, s) + proto + seg
        c = (~csum_fold(s)) & 0xFFFF
        if c == 0 and proto == 17:
            c = 0xFFFF
        data[b + l4 + field] = c >> 8
        data[b + l4 + field + 1] = c & 0xFF
        done += 1
    return done


def complete_l4_checksums(batch: Batch, keys, rows) -> int:
    """Write the full L4 checksum (TCP, UDP, ICMP, ICMPv6 of the innermost packet ``keys``
    describes) of packets ``rows`` into the batch's buffer, in place; returns how many were
    written. For frames marked ``csum_partial``: the field held the pseudo-header sum only."""
    rows = np.asarray(rows, np.int64)
    if rows.size == 0:
        return 0
    return int(
        _complete(
            batch.data,
            np.asarray(batch.offset, np.int64),
            np.asarray(batch.length),
            rows,
            keys.u32,
            keys.u16,
            keys.i32,
            keys.u8,
        )
    )
