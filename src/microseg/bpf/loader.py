"""Load, pin, attach and drive the kernel fast path (fastpath.bpf.o) through bpf(2) itself.

No libbpf: a small ELF64 reader finds the programs, the legacy map definitions (SEC("maps"))
and the map relocations; the maps are created with BPF_MAP_CREATE, the relocated
instructions loaded with BPF_PROG_LOAD (the verifier's log kept for the error), both pinned
under a bpffs folder, and the program attached to interfaces over rtnetlink (IFLA_XDP, driver
mode). :class:`KernelFastPath` is the API the agent uses; :data:`FLOW_KEY` and
:data:`FLOW_VALUE` are the C structs' layouts, defined once here.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import platform
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TypeVar

from ..errors import MicrosegError

OBJECT_NAME = "fastpath.bpf.o"
DEFAULT_PIN_ROOT = "/sys/fs/bpf/microseg"
BPFFS_MAGIC = 0xCAFE4A11
T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# the C structs (fastpath.bpf.c), once
# ---------------------------------------------------------------------------------------------
#: struct ms_flow_key: port, zone, saddr[16], daddr[16], sport, dport (wire order), proto,
#: family, tunnel, pad
FLOW_KEY = struct.Struct("<II16s16s2s2sBBBx")
#: struct ms_flow: action, ifindex, mac[6], pad, peer_ip (wire order), mtu, packets, bytes,
#: last_seen, last_tick, tmpl[56]
FLOW_VALUE = struct.Struct("<II6s2x4sIQQQQ56s")
#: struct ms_port: role, zone, mac[6], pad, local_ip (wire order)
PORT_VALUE = struct.Struct("<II6s2x4s")
COUNTERS_OFFSET = 24  # packets, bytes, last_seen inside struct ms_flow
TMPL_LEN = 50

ACT_ENCAP, ACT_LOCAL, ACT_DECAP, ACT_DROP = 1, 2, 3, 4
ROLE_WORKLOAD, ROLE_UNDERLAY = 1, 2
MAX_PORTS = 65536  # ms_ports is an array indexed by ifindex

#: per-CPU counters (ms_stats), in the C enum's order
STATS = (
    "pass_miss",
    "pass_port",
    "pass_not_ip",
    "pass_vlan",
    "pass_malformed",
    "pass_fragment",
    "pass_ip_options",
    "pass_ipv6_ext",
    "pass_tcp_control",
    "pass_icmp_other",
    "pass_proto",
    "pass_not_vxlan",
    "pass_bad_vxlan",
    "pass_mac",
    "pass_peer",
    "pass_action",
    "pass_headroom",
    "pass_too_big",
    "redirect",
    "tx",
    "drop",
)
ST = {name: i for i, name in enumerate(STATS)}

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 0, 1, 2, 3, 4
XDP_NAMES = {0: "aborted", 1: "drop", 2: "pass", 3: "tx", 4: "redirect"}


class BpfError(MicrosegError):
    """The kernel refused a BPF operation, or the object file is not what we expect."""


def _mac(value: bytes | str) -> bytes:
    if isinstance(value, str):
        b = bytes.fromhex(value.replace(":", "").replace("-", ""))
    else:
        b = bytes(value)
    if len(b) != 6:
        raise BpfError(f"bad MAC address {value!r}")
    return b


def _addr16(value: str | bytes) -> tuple[bytes, int]:
    a = ipaddress.ip_address(value)
    return a.packed.ljust(16, b"\0"), a.version


@dataclass(frozen=True)
class FlowKey:
    """One direction of a flow as the program keys it.

    ``port`` is the ingress ifindex (workload port) or the VNI (``tunnel=True``: arrived
    VXLAN-encapsulated on the underlay); ``zone`` the workload port's zone (the VNI for tunnel
    ingress). ICMP echo: ``sport`` the identifier, ``dport`` ``type << 8 | code``.
    """

    port: int
    zone: int
    src: str
    dst: str
    proto: int
    sport: int = 0
    dport: int = 0
    tunnel: bool = False

    def pack(self) -> bytes:
        s, vs = _addr16(self.src)
        d, vd = _addr16(self.dst)
        if vs != vd:
            raise BpfError(f"flow key mixes address families: {self.src} and {self.dst}")
        return FLOW_KEY.pack(
            self.port & 0xFFFFFFFF,
            self.zone & 0xFFFFFFFF,
            s,
            d,
            (self.sport & 0xFFFF).to_bytes(2, "big"),
            (self.dport & 0xFFFF).to_bytes(2, "big"),
            self.proto & 0xFF,
            vs,
            1 if self.tunnel else 0,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> FlowKey:
        port, zone, s, d, sp, dp, proto, fam, tun = FLOW_KEY.unpack(raw)
        n = 4 if fam == 4 else 16
        return cls(
            port,
            zone,
            str(ipaddress.ip_address(s[:n])),
            str(ipaddress.ip_address(d[:n])),
            proto,
            int.from_bytes(sp, "big"),
            int.from_bytes(dp, "big"),
            bool(tun),
        )


@dataclass(frozen=True)
class FlowAction:
    """What a hit does: ``kind`` is ``encap`` (VXLAN headers ``template``, 50 bytes, the UDP
    source port 0 to take it from the flow hash), ``local`` (to workload ``ifindex`` whose
    MAC ``mac`` the frame must be addressed to), ``decap`` (from tunnel peer ``peer_ip`` to
    workload ``ifindex``/``mac``) or ``drop``. ``mtu``: the target's MTU; a frame whose IP
    packet would exceed it there passes to the agent (which answers too big); 0: no limit."""

    kind: str
    ifindex: int = 0
    mac: bytes | str = b"\0" * 6
    peer_ip: str = "0.0.0.0"
    template: bytes = b""
    mtu: int = 0

    def pack(self) -> bytes:
        codes = {"encap": ACT_ENCAP, "local": ACT_LOCAL, "decap": ACT_DECAP, "drop": ACT_DROP}
        if self.kind not in codes:
            raise BpfError(f"unknown fast-path action {self.kind!r} (encap, local, decap, drop)")
        if self.kind == "encap" and len(self.template) != TMPL_LEN:
            raise BpfError(f"an encap action needs a {TMPL_LEN}-byte VXLAN header template")
        return FLOW_VALUE.pack(
            codes[self.kind],
            self.ifindex,
            _mac(self.mac),
            ipaddress.IPv4Address(self.peer_ip).packed,
            self.mtu,
            0,
            0,
            0,
            0,
            bytes(self.template).ljust(56, b"\0"),
        )


def vxlan_template(
    src_mac: bytes | str,
    dst_mac: bytes | str,
    src_ip: str,
    dst_ip: str,
    vni: int,
    *,
    ttl: int = 64,
    sport: int = 0,
) -> bytes:
    """Outer Ethernet / IPv4 (DF) / UDP 4789 / VXLAN headers for an encap action; lengths and
    checksums are the program's to fill. ``sport`` 0: taken from the flow hash."""
    eth = _mac(dst_mac) + _mac(src_mac) + b"\x08\x00"
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        0,
        0,
        0x4000,
        ttl,
        17,
        0,
        ipaddress.IPv4Address(src_ip).packed,
        ipaddress.IPv4Address(dst_ip).packed,
    )
    udp = struct.pack("!HHHH", sport, 4789, 0, 0)
    vx = bytes([0x08, 0, 0, 0]) + (vni & 0xFFFFFF).to_bytes(3, "big") + b"\0"
    return eth + ip + udp + vx


@dataclass(frozen=True)
class FlowStats:
    packets: int
    bytes: int
    #: CLOCK_MONOTONIC_COARSE in ns (bpf_ktime_get_coarse_ns; compare with
    #: :func:`clock_ns`); 0: never hit
    last_seen_ns: int


CLOCK_MONOTONIC_COARSE = 6  # Linux's clock id (the time module does not name it)


def clock_ns() -> int:
    """Now on the clock the program stamps ``last_seen`` with (CLOCK_MONOTONIC_COARSE)."""
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)


# ---------------------------------------------------------------------------------------------
# bpf(2)
# ---------------------------------------------------------------------------------------------
_BPF_NR = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 0, 1, 2, 3
BPF_MAP_GET_NEXT_KEY, BPF_PROG_LOAD, BPF_OBJ_PIN, BPF_OBJ_GET, BPF_PROG_TEST_RUN = 4, 5, 6, 7, 10
BPF_PROG_TYPE_XDP = 6
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY = 1, 2, 6
BPF_ANY = 0
BPF_PSEUDO_MAP_FD = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    nr = _BPF_NR.get(platform.machine())
    if nr is None:
        raise BpfError(f"bpf(2) syscall number unknown for {platform.machine()}")
    r = _libc.syscall(nr, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(r)


def _attr(size: int = 128) -> ctypes.Array:
    return ctypes.create_string_buffer(size)


def _addr(buf: ctypes.Array | None) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def possible_cpus() -> int:
    """Number of possible CPUs (the per-CPU value count), from /sys/devices/system/cpu/possible."""
    try:
        text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


class Map:
    """A BPF map by fd: update, lookup, delete, key iteration."""

    def __init__(self, name: str, fd: int, mtype: int, key_size: int, value_size: int, max_entries: int):
        self.name, self.fd, self.type = name, fd, mtype
        self.key_size, self.value_size, self.max_entries = key_size, value_size, max_entries
        percpu = mtype in (5, BPF_MAP_TYPE_PERCPU_ARRAY, 10)  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU
        self.ncpu = possible_cpus() if percpu else 1
        self._vsize = ((value_size + 7) // 8 * 8) * self.ncpu if percpu else value_size

    @classmethod
    def create(cls, name: str, mtype: int, key_size: int, value_size: int, max_entries: int, flags: int = 0):
        a = _attr()
        struct.pack_into("<IIIII", a, 0, mtype, key_size, value_size, max_entries, flags)
        struct.pack_into("16s", a, 28, name.encode()[:15])
        try:
            fd = _bpf(BPF_MAP_CREATE, a)
        except OSError as exc:
            raise BpfError(f"the kernel refused to create BPF map {name}: {exc.strerror}") from None
        return cls(name, fd, mtype, key_size, value_size, max_entries)

    def _op(self, cmd: int, key: bytes | None, value: ctypes.Array | None, flags: int = 0) -> None:
        kbuf = ctypes.create_string_buffer(bytes(key), self.key_size) if key is not None else None
        a = _attr()
        struct.pack_into("<I4xQQQ", a, 0, self.fd, _addr(kbuf), _addr(value), flags)
        _bpf(cmd, a)

    def _key(self, key: bytes) -> bytes:
        if len(key) != self.key_size:
            raise BpfError(f"map {self.name}: key of {len(key)} bytes, expected {self.key_size}")
        return key

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        if len(value) != self._vsize:
            raise BpfError(f"map {self.name}: value of {len(value)} bytes, expected {self._vsize}")
        v = ctypes.create_string_buffer(bytes(value), self._vsize)
        try:
            self._op(BPF_MAP_UPDATE_ELEM, self._key(key), v, flags)
        except OSError as exc:
            raise BpfError(f"map {self.name}: update failed: {exc.strerror}") from None

    def lookup(self, key: bytes) -> bytes | None:
        v = ctypes.create_string_buffer(self._vsize)
        try:
            self._op(BPF_MAP_LOOKUP_ELEM, self._key(key), v)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise BpfError(f"map {self.name}: lookup failed: {exc.strerror}") from None
        return v.raw

    def lookup_percpu(self, key: bytes) -> list[bytes]:
        raw = self.lookup(key)
        if raw is None:
            return []
        step = (self.value_size + 7) // 8 * 8
        return [raw[i * step : i * step + self.value_size] for i in range(self.ncpu)]

    def delete(self, key: bytes) -> bool:
        try:
            self._op(BPF_MAP_DELETE_ELEM, self._key(key), None)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise BpfError(f"map {self.name}: delete failed: {exc.strerror}") from None
        return True

    def keys(self) -> Iterator[bytes]:
        prev: bytes | None = None
        while True:
            nxt = ctypes.create_string_buffer(self.key_size)
            try:
                self._op(BPF_MAP_GET_NEXT_KEY, prev, nxt)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return
                raise BpfError(f"map {self.name}: iteration failed: {exc.strerror}") from None
            prev = nxt.raw
            yield prev

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:  # deleted while iterating
                yield k, v

    def clear(self) -> None:
        for k in list(self.keys()):
            self.delete(k)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------------------------------------
# the ELF object
# ---------------------------------------------------------------------------------------------
@dataclass
class MapDef:
    name: str
    offset: int  # inside the maps section
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int


@dataclass
class ProgDef:
    name: str
    section: str
    insns: bytearray
    relocs: list[tuple[int, str]]  # (instruction index, map name)


@dataclass
class BpfObject:
    license: str
    maps: dict[str, MapDef]
    progs: dict[str, ProgDef]


def read_object(data: bytes, where: str = OBJECT_NAME) -> BpfObject:
    """Programs, legacy map definitions and map relocations of a BPF ELF64 object."""

    def bad(msg: str) -> BpfError:
        return BpfError(f"{where}: {msg}")

    if data[:4] != b"\x7fELF" or len(data) < 64:
        raise bad("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise bad("not a little-endian ELF64 object")
    (e_machine,) = struct.unpack_from("<H", data, 18)
    if e_machine != 247:
        raise bad(f"not a BPF object (e_machine {e_machine})")
    (e_shoff,) = struct.unpack_from("<Q", data, 40)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 58)
    if e_shentsize != 64 or e_shoff + e_shnum * 64 > len(data):
        raise bad("section table out of bounds")
    secs = []
    for i in range(e_shnum):
        name, stype, flags, _addr_, off, size, link, info, _al, entsize = struct.unpack_from(
            "<IIQQQQIIQQ", data, e_shoff + i * 64
        )
        if stype != 8 and off + size > len(data):  # 8: SHT_NOBITS
            raise bad(f"section {i} out of bounds")
        secs.append((name, stype, flags, off, size, link, info, entsize))

    def cstr(blob: bytes, at: int) -> str:
        end = blob.find(b"\0", at)
        return blob[at : end if end >= 0 else len(blob)].decode("ascii", "replace")

    shstr = data[secs[e_shstrndx][3] : secs[e_shstrndx][3] + secs[e_shstrndx][4]]
    names = [cstr(shstr, s[0]) for s in secs]
    body = [data[s[3] : s[3] + s[4]] for s in secs]
    symtab = next((i for i, s in enumerate(secs) if s[1] == 2), None)  # SHT_SYMTAB
    if symtab is None:
        raise bad("no symbol table")
    strtab = body[secs[symtab][5]]
    syms = []
    for k in range(len(body[symtab]) // 24):
        st_name, st_info, _other, st_shndx, st_value, st_size = struct.unpack_from(
            "<IBBHQQ", body[symtab], k * 24
        )
        syms.append((cstr(strtab, st_name), st_info & 15, st_shndx, st_value, st_size))

    lic = next((i for i, n in enumerate(names) if n == "license"), None)
    license_ = body[lic].split(b"\0")[0].decode() if lic is not None else ""
    maps: dict[str, MapDef] = {}
    msec = next((i for i, n in enumerate(names) if n == "maps"), None)
    by_offset: dict[int, str] = {}
    if msec is not None:
        for name, _t, shndx, value, size in syms:
            if shndx == msec and size >= 20:
                t, ks, vs, me, fl = struct.unpack_from("<IIIII", body[msec], value)
                maps[name] = MapDef(name, value, t, ks, vs, me, fl)
                by_offset[value] = name
    progs: dict[str, ProgDef] = {}
    for i, (_n, stype, flags, _off, _size, _link, _info, _es) in enumerate(secs):
        if stype != 1 or not flags & 4 or not body[i]:  # PROGBITS, SHF_EXECINSTR
            continue
        for name, stt, shndx, value, size in syms:
            if shndx == i and stt == 2 and size:  # STT_FUNC
                if value % 8 or size % 8 or value + size > len(body[i]):
                    raise bad(f"program {name} is not whole instructions")
                progs[name] = ProgDef(name, names[i], bytearray(body[i][value : value + size]), [])
        rel = next((j for j, s in enumerate(secs) if s[1] == 9 and s[6] == i), None)  # SHT_REL
        if rel is None:
            continue
        for k in range(len(body[rel]) // 16):
            r_off, r_info = struct.unpack_from("<QQ", body[rel], k * 16)
            sname, _stt, shndx, value, _sz = syms[r_info >> 32]
            target = next(
                (
                    p
                    for p in progs.values()
                    if p.section == names[i]
                    and _start(syms, p, i) <= r_off < _start(syms, p, i) + len(p.insns)
                ),
                None,
            )
            if target is None:
                raise bad(f"relocation at {r_off} in {names[i]} outside every program")
            if shndx != msec:
                raise bad(f"relocation against {sname!r}: only map references are supported")
            mname = by_offset.get(value, sname)
            if mname not in maps:
                raise bad(f"relocation against unknown map {sname!r}")
            idx = (r_off - _start(syms, target, i)) // 8
            if target.insns[idx * 8] != 0x18:  # BPF_LD | BPF_IMM | BPF_DW
                raise bad(f"relocation in {target.name} not on a 64-bit immediate load")
            target.relocs.append((idx, mname))
    if not progs:
        raise bad("no programs")
    return BpfObject(license_, maps, progs)


def _start(syms: list, prog: ProgDef, shndx: int) -> int:
    for name, stt, sh, value, _size in syms:
        if sh == shndx and stt == 2 and name == prog.name:
            return int(value)
    return 0


def load_program(prog: ProgDef, license_: str, map_fds: dict[str, int], log_size: int = 1 << 22) -> int:
    """BPF_PROG_LOAD of ``prog`` (an XDP program) with its map references resolved."""
    insns = bytearray(prog.insns)
    for idx, mname in prog.relocs:
        o = idx * 8
        insns[o + 1] = (insns[o + 1] & 0x0F) | (BPF_PSEUDO_MAP_FD << 4)
        struct.pack_into("<i", insns, o + 4, map_fds[mname])
    ibuf = ctypes.create_string_buffer(bytes(insns), len(insns))
    lbuf = ctypes.create_string_buffer(license_.encode() + b"\0")

    def attempt(level: int) -> tuple[int, str]:
        logbuf = ctypes.create_string_buffer(log_size if level else 1)
        a = _attr()
        struct.pack_into(
            "<IIQQIIQ",
            a,
            0,
            BPF_PROG_TYPE_XDP,
            len(insns) // 8,
            _addr(ibuf),
            _addr(lbuf),
            level,
            log_size if level else 0,
            _addr(logbuf) if level else 0,
        )
        struct.pack_into("16s", a, 48, prog.name.encode()[:15])
        try:
            return _bpf(BPF_PROG_LOAD, a), ""
        except OSError as exc:
            return -(exc.errno or errno.EINVAL), logbuf.value.decode("utf-8", "replace")

    fd, _ = attempt(0)
    if fd >= 0:
        return fd
    err, log = attempt(1)
    if err >= 0:
        return err
    tail = "\n".join(log.strip().splitlines()[-25:])
    raise BpfError(
        f"the kernel's verifier refused program {prog.name}: {os.strerror(-err)}"
        + (f"\nverifier log (last lines):\n{tail}" if tail else "")
    )


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(path.encode())
    a = _attr()
    struct.pack_into("<QI", a, 0, _addr(p), fd)
    try:
        _bpf(BPF_OBJ_PIN, a)
    except OSError as exc:
        raise BpfError(f"cannot pin {path}: {exc.strerror}") from None


def obj_get(path: str) -> int:
    p = ctypes.create_string_buffer(path.encode())
    a = _attr()
    struct.pack_into("<QI", a, 0, _addr(p), 0)
    try:
        return _bpf(BPF_OBJ_GET, a)
    except OSError as exc:
        raise BpfError(f"cannot open pinned {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class TestRun:
    retval: int
    data: bytes
    duration_ns: int  # mean per run, as the kernel reports it


def test_run(prog_fd: int, frame: bytes, *, ingress_ifindex: int = 0, repeat: int = 1) -> TestRun:
    """BPF_PROG_TEST_RUN: the program on ``frame`` (as received on ``ingress_ifindex``)."""
    din = ctypes.create_string_buffer(bytes(frame), max(1, len(frame)))
    out_size = len(frame) + 512
    dout = ctypes.create_string_buffer(out_size)
    ctx = ctypes.create_string_buffer(struct.pack("<IIIIII", 0, len(frame), 0, ingress_ifindex, 0, 0), 24)
    a = _attr()
    struct.pack_into(
        "<IIIIQQIIIIQQ",
        a,
        0,
        prog_fd,
        0,
        len(frame),
        out_size,
        _addr(din),
        _addr(dout),
        repeat,
        0,
        24 if ingress_ifindex else 0,
        0,
        _addr(ctx) if ingress_ifindex else 0,
        0,
    )
    try:
        _bpf(BPF_PROG_TEST_RUN, a)
    except OSError as exc:
        raise BpfError(f"BPF_PROG_TEST_RUN failed: {exc.strerror}") from None
    retval, _, size_out = struct.unpack_from("<III", a, 4)
    (duration,) = struct.unpack_from("<I", a, 36)
    return TestRun(retval, dout.raw[:size_out], duration)


# ---------------------------------------------------------------------------------------------
# rtnetlink: IFLA_XDP
# ---------------------------------------------------------------------------------------------
RTM_SETLINK, NLMSG_ERROR = 19, 2
IFLA_XDP, IFLA_XDP_FD, IFLA_XDP_FLAGS = 43, 1, 3
NLA_F_NESTED = 0x8000
XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE = 2, 4


def _nla(atype: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("<HH", n, atype) + payload + b"\0" * (-n % 4)


_CLONE_NEWNET = 0x40000000


def _in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn()`` in the network namespace at path ``netns`` (a helper thread setns()es;
    sockets it opens stay in that namespace), or here when ``netns`` is None."""
    if netns is None:
        return fn()
    box: dict = {}

    def body() -> None:
        try:
            fd = os.open(netns, os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise BpfError(f"cannot enter network namespace {netns}: {os.strerror(e)}")
            finally:
                os.close(fd)
            box["r"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["e"] = exc

    t = threading.Thread(target=body, name="microseg-netns")
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box["r"]


BPF_LINK_CREATE = 28
BPF_XDP = 37  # enum bpf_attach_type


def link_xdp(ifindex: int, fd: int, flags: int = XDP_FLAGS_DRV_MODE, netns: str | None = None) -> int:
    """Attach program ``fd`` to ``ifindex`` as a BPF link (``BPF_LINK_CREATE``); returns the
    link's fd. Unlike an rtnetlink attachment, a link that is not pinned lives only as long as
    its fd: when the process that holds it exits, crashed or killed included, the kernel
    detaches the program."""

    def go() -> int:
        attr = _attr()
        struct.pack_into("<IIII", attr, 0, fd, ifindex, BPF_XDP, flags)
        try:
            return _bpf(BPF_LINK_CREATE, attr)
        except OSError as exc:
            raise BpfError(f"cannot attach XDP to ifindex {ifindex}: {exc.strerror or exc}") from None

    return _in_netns(netns, go)


def set_link_xdp(ifindex: int, fd: int, flags: int = XDP_FLAGS_DRV_MODE, netns: str | None = None) -> None:
    """Attach program ``fd`` to ``ifindex`` (``fd`` -1: detach) over rtnetlink."""

    def go() -> None:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            s.bind((0, 0))
            xdp = _nla(IFLA_XDP_FD, struct.pack("<i", fd)) + _nla(IFLA_XDP_FLAGS, struct.pack("<I", flags))
            body = struct.pack("<BxHiII", socket.AF_UNSPEC, 0, ifindex, 0, 0) + _nla(
                IFLA_XDP | NLA_F_NESTED, xdp
            )
            msg = struct.pack("<IHHII", 16 + len(body), RTM_SETLINK, 1 | 4, 1, 0) + body  # REQUEST|ACK
            s.settimeout(5.0)
            s.send(msg)
            while True:
                reply = s.recv(65536)
                off = 0
                while off + 16 <= len(reply):
                    ln, mtype, _fl, seq, _pid = struct.unpack_from("<IHHII", reply, off)
                    if mtype == NLMSG_ERROR and seq == 1:
                        (err,) = struct.unpack_from("<i", reply, off + 16)
                        if err:
                            what = "attach" if fd >= 0 else "detach"
                            raise BpfError(f"cannot {what} XDP on ifindex {ifindex}: {os.strerror(-err)}")
                        return
                    off += max(16, (ln + 3) & ~3)
        except OSError as exc:
            raise BpfError(f"rtnetlink failed for ifindex {ifindex}: {exc.strerror or exc}") from None
        finally:
            s.close()

    _in_netns(netns, go)


# ---------------------------------------------------------------------------------------------
# the fast path
# ---------------------------------------------------------------------------------------------
def object_bytes() -> bytes:
    """The committed, compiled program (package data)."""
    try:
        return resources.files(__package__).joinpath(OBJECT_NAME).read_bytes()
    except OSError as exc:
        raise BpfError(f"the compiled fast path {OBJECT_NAME} is missing: {exc}") from None


def _is_bpffs(path: str) -> bool:
    libc_statfs = ctypes.create_string_buffer(120)
    if _libc.statfs(path.encode(), libc_statfs) != 0:
        return False
    (ftype,) = struct.unpack_from("<q", libc_statfs, 0)
    return (ftype & 0xFFFFFFFF) == BPFFS_MAGIC


def remove_pin_dir(pin_dir: str) -> list[str]:
    """Unpin everything in ``pin_dir`` and remove it, and the pin root above it when that is
    left empty (pins are files in bpffs: an unpinned object lives on only while someone holds
    it). Returns the errors, as text."""
    errors: list[str] = []
    try:
        names = os.listdir(pin_dir)
    except FileNotFoundError:
        return errors
    for name in names:
        path = os.path.join(pin_dir, name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            errors.append(f"cannot unpin {path}: {exc.strerror}")
    for d in (pin_dir, os.path.dirname(pin_dir)):
        if d != pin_dir and d != DEFAULT_PIN_ROOT:
            break
        try:
            os.rmdir(d)
        except OSError:  # not empty (another fast path's pins), or gone already
            break
    return errors


class KernelFastPath:
    """The XDP fast path: load once, attach to ports, install and remove flows.

    Fails closed: :meth:`close` detaches every attachment it made and removes its pins; a load
    that fails half-way undoes what it did.
    """

    def __init__(self, object_data: bytes | None = None):
        self._data = object_data
        self.maps: dict[str, Map] = {}
        self.prog_fds: dict[str, int] = {}
        self.pin_dir: str | None = None
        self._attached: dict[tuple[str | None, int], tuple[str, int]] = {}
        self._links: dict[tuple[str | None, int], int] = {}

    # -- can we? --------------------------------------------------------------------------
    @staticmethod
    def available(pin_root: str = DEFAULT_PIN_ROOT) -> tuple[bool, str]:
        """(True, "") when this process can load and pin the program, else (False, why)."""
        if platform.system() != "Linux":
            return False, "not Linux"
        if platform.machine() not in _BPF_NR:
            return False, f"bpf(2) syscall number unknown for {platform.machine()}"
        if os.geteuid() != 0:
            return False, "needs root (CAP_BPF and CAP_NET_ADMIN)"
        fs = Path(pin_root)
        while not fs.exists() and fs != fs.parent:
            fs = fs.parent
        if not _is_bpffs(str(fs)):
            return False, f"no bpffs at {pin_root} (mount -t bpf bpf /sys/fs/bpf)"
        try:
            m = Map.create("ms_probe", BPF_MAP_TYPE_ARRAY, 4, 4, 1)
        except BpfError as exc:
            return False, str(exc)
        try:
            obj = read_object(object_bytes())
            fd = load_program(obj.progs["xdp_pass"], obj.license, {})
            os.close(fd)
        except BpfError as exc:
            return False, f"the kernel refuses XDP programs: {exc}"
        finally:
            m.close()
        return True, ""

    # -- load / pin -----------------------------------------------------------------------
    def load(self, pin_dir: str | None = None, name: str = "default") -> None:
        """Create the maps, load both programs, pin them under ``pin_dir``
        (default ``/sys/fs/bpf/microseg/<name>``)."""
        if self.prog_fds:
            raise BpfError("the fast path is already loaded")
        data = self._data if self._data is not None else object_bytes()
        obj = read_object(data)
        if obj.license not in ("GPL", "Dual BSD/GPL", "GPL v2", "Dual MIT/GPL"):
            raise BpfError(f"{OBJECT_NAME}: license {obj.license!r} cannot use the helpers it needs")
        for need in ("xdp_fastpath", "xdp_pass"):
            if need not in obj.progs:
                raise BpfError(f"{OBJECT_NAME}: program {need} missing")
        pin_dir = pin_dir or f"{DEFAULT_PIN_ROOT}/{name}"
        try:
            for m in obj.maps.values():
                self.maps[m.name] = Map.create(
                    m.name, m.type, m.key_size, m.value_size, m.max_entries, m.flags
                )
            fds = {n: m.fd for n, m in self.maps.items()}
            for pname in ("xdp_fastpath", "xdp_pass"):
                self.prog_fds[pname] = load_program(obj.progs[pname], obj.license, fds)
            self._check_layout()
            try:
                os.makedirs(pin_dir, exist_ok=True)
            except OSError as exc:
                raise BpfError(f"cannot create {pin_dir}: {exc.strerror}") from None
            if os.listdir(pin_dir):
                raise BpfError(f"{pin_dir} already holds pins (another fast path loaded? close it first)")
            self.pin_dir = pin_dir
            for n, fd in [*self.prog_fds.items(), *((n, m.fd) for n, m in self.maps.items())]:
                obj_pin(fd, os.path.join(pin_dir, n))
        except BaseException:
            self.close()
            raise

    def _check_layout(self) -> None:
        f, p = self.maps.get("ms_flows"), self.maps.get("ms_ports")
        if f is None or p is None or "ms_stats" not in self.maps:
            raise BpfError(f"{OBJECT_NAME}: maps ms_flows, ms_ports, ms_stats expected")
        if (f.key_size, f.value_size, p.value_size) != (FLOW_KEY.size, FLOW_VALUE.size, PORT_VALUE.size):
            raise BpfError(f"{OBJECT_NAME}: map layouts differ from loader.py's (rebuild: make bpf)")

    def _need(self) -> None:
        if not self.prog_fds:
            raise BpfError("the fast path is not loaded")

    @property
    def prog_fd(self) -> int:
        self._need()
        return self.prog_fds["xdp_fastpath"]

    # -- ports ----------------------------------------------------------------------------
    def _port_index(self, ifindex: int) -> bytes:
        self._need()
        if not 0 < ifindex < MAX_PORTS:
            raise BpfError(
                f"ifindex {ifindex} is beyond the fast path's port table ({MAX_PORTS}): "
                "its traffic stays on the agent's path"
            )
        return struct.pack("<I", ifindex)

    def add_workload_port(self, ifindex: int, zone: int, mac: bytes | str) -> None:
        """Declare ``ifindex`` a workload port of ``zone``, whose workload has MAC ``mac``."""
        self._port_index(ifindex)
        self.maps["ms_ports"].update(
            struct.pack("<I", ifindex), PORT_VALUE.pack(ROLE_WORKLOAD, zone, _mac(mac), b"\0" * 4)
        )

    def add_underlay_port(self, ifindex: int, local_ip: str) -> None:
        """Declare ``ifindex`` the underlay, this host's tunnel address ``local_ip``."""
        self._port_index(ifindex)
        self.maps["ms_ports"].update(
            struct.pack("<I", ifindex),
            PORT_VALUE.pack(ROLE_UNDERLAY, 0, b"\0" * 6, ipaddress.IPv4Address(local_ip).packed),
        )

    def remove_port(self, ifindex: int) -> None:
        """Its frames pass to the agent again (role none)."""
        self.maps["ms_ports"].update(self._port_index(ifindex), bytes(PORT_VALUE.size))

    # -- attach ---------------------------------------------------------------------------
    def attach(
        self,
        ifindex: int,
        ifname: str = "",
        *,
        program: str = "xdp_fastpath",
        netns: str | None = None,
        mode: int = XDP_FLAGS_DRV_MODE,
        link: bool = False,
    ) -> None:
        """Attach (native mode) to ``ifindex`` (in network namespace path ``netns``, default
        this process's); ``program="xdp_pass"`` for the workload-side end of a veth. With
        ``link``, as a BPF link held by this process (:func:`link_xdp`): the program then
        leaves the interface when the process ends, however it ends (fail closed)."""
        self._need()
        if program not in self.prog_fds:
            raise BpfError(f"no program {program!r}")
        try:
            if link:
                self._links[(netns, ifindex)] = link_xdp(ifindex, self.prog_fds[program], mode, netns)
            else:
                set_link_xdp(ifindex, self.prog_fds[program], mode, netns)
        except BpfError as exc:
            raise BpfError(f"{ifname or ifindex}: {exc}") from None
        self._attached[(netns, ifindex)] = (ifname or str(ifindex), mode)

    def detach(self, ifindex: int, *, netns: str | None = None) -> None:
        name, mode = self._attached.pop((netns, ifindex), (str(ifindex), XDP_FLAGS_DRV_MODE))
        lfd = self._links.pop((netns, ifindex), None)
        if lfd is not None:
            os.close(lfd)  # the link's last reference: the kernel detaches the program
            return
        try:
            set_link_xdp(ifindex, -1, mode, netns)
        except BpfError as exc:
            if "No such device" not in str(exc):
                raise BpfError(f"{name}: {exc}") from None

    def detach_all(self) -> list[str]:
        """Detach everywhere this instance attached; the errors (as text), if any."""
        errors = []
        for netns, ifindex in list(self._attached):
            try:
                self.detach(ifindex, netns=netns)
            except BpfError as exc:
                errors.append(str(exc))
        return errors

    # -- flows ----------------------------------------------------------------------------
    def install(self, key: FlowKey | bytes, action: FlowAction | bytes) -> None:
        """Offload one direction of a flow (counters start at zero)."""
        self._need()
        k = key.pack() if isinstance(key, FlowKey) else key
        v = action.pack() if isinstance(action, FlowAction) else action
        self.maps["ms_flows"].update(k, v)

    def remove(self, key: FlowKey | bytes) -> FlowStats | None:
        """Take one direction back; its last counters, or None if it was not installed."""
        self._need()
        k = key.pack() if isinstance(key, FlowKey) else key
        v = self.maps["ms_flows"].lookup(k)
        self.maps["ms_flows"].delete(k)
        return None if v is None else FlowStats(*struct.unpack_from("<QQQ", v, COUNTERS_OFFSET))

    def read_flows(self) -> dict[FlowKey, FlowStats]:
        """Every installed direction with its packets, bytes and last-seen time."""
        self._need()
        return {
            FlowKey.unpack(k): FlowStats(*struct.unpack_from("<QQQ", v, COUNTERS_OFFSET))
            for k, v in self.maps["ms_flows"].items()
        }

    def stats(self) -> dict[str, int]:
        """The per-CPU counters summed: passed (per reason), redirected, tx, dropped."""
        self._need()
        m = self.maps["ms_stats"]
        out = {}
        for i, name in enumerate(STATS):
            out[name] = sum(struct.unpack("<Q", v)[0] for v in m.lookup_percpu(struct.pack("<I", i)))
        return out

    def test_run(self, frame: bytes, ingress_ifindex: int, repeat: int = 1) -> TestRun:
        return test_run(self.prog_fd, frame, ingress_ifindex=ingress_ifindex, repeat=repeat)

    # -- teardown -------------------------------------------------------------------------
    def close(self) -> None:
        """Detach everywhere, unpin, close every fd. Safe to call twice; raises at the end if
        something would not detach (the rest is still torn down)."""
        errors = self.detach_all()
        if self.pin_dir is not None:  # load() made it and refuses one that is not empty: all ours
            errors += remove_pin_dir(self.pin_dir)
            self.pin_dir = None
        for fd in self.prog_fds.values():
            os.close(fd)
        self.prog_fds.clear()
        for m in self.maps.values():
            m.close()
        self.maps.clear()
        if errors:
            raise BpfError("; ".join(errors))

    def __enter__(self) -> KernelFastPath:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
