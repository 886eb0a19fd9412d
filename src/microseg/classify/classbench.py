"""ClassBench filter and trace files (the formats DPDK's test-acl also reads).

Filter line: ``@a.b.c.d/len e.f.g.h/len sport_lo : sport_hi dport_lo : dport_hi 0xPP/0xMM``
with an optional ``0xFFFF/0xFFFF`` flags field (TCP flag bits, value/mask). Earlier rules win,
so every rule gets priority 0 and the rule index is the file line order.
Trace line: ``src dst sport dport proto`` as decimal integers; extra columns are ignored.
Malformed lines raise :class:`~microseg.errors.InputError` naming the file and line.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from . import keys as _keys
from .rules import (
    K_DST_HI,
    K_DST_LO,
    K_L4,
    K_META,
    K_SRC_HI,
    K_SRC_LO,
    NW,
    SH_ETHERTYPE,
    SH_PROTO,
    SH_TCP_FLAGS,
    U64,
    V4_MAPPED,
    RuleSet,
)


def _ipv4(tok: str) -> int:
    parts = tok.split(".")
    if len(parts) != 4 or not all(p.isdigit() and int(p) <= 255 for p in parts):
        raise ValueError(f"bad IPv4 address {tok!r}")
    a = 0
    for p in parts:
        a = a << 8 | int(p)
    return a


def _prefix(tok: str) -> tuple[int, int]:
    addr, sep, ln = tok.partition("/")
    if not sep or not ln.isdigit() or int(ln) > 32:
        raise ValueError(f"bad prefix {tok!r} (want a.b.c.d/0..32)")
    n = int(ln)
    m32 = (0xFFFFFFFF << (32 - n)) & 0xFFFFFFFF
    mask = (U64 << (32 - n)) & U64  # the 32 mapped bits above plus n address bits
    return (V4_MAPPED | (_ipv4(addr) & m32)) & mask, mask


def _port(tok: str) -> int:
    if not tok.isdigit() or int(tok) > 65535:
        raise ValueError(f"bad port {tok!r}")
    return int(tok)


def _hexpair(tok: str, bits: int, what: str) -> tuple[int, int]:
    vt, sep, mt = tok.partition("/")
    try:
        v, m = int(vt, 16), int(mt, 16)
    except ValueError:
        raise ValueError(f"bad {what} {tok!r} (want 0xVV/0xMM)") from None
    if not sep or not 0 <= v < (1 << bits) or not 0 <= m < (1 << bits):
        raise ValueError(f"bad {what} {tok!r}")
    if v & ~m:
        raise ValueError(f"{what} value {v:#x} has bits outside its mask {m:#x}")
    return v, m


def parse_rule_line(line: str):
    """(val, mask, ports) of one filter line; ValueError on malformed input."""
    t = line.split()
    if not t[0].startswith("@"):
        raise ValueError("filter line must start with '@'")
    t[0] = t[0][1:]
    if len(t) not in (9, 10) or t[3] != ":" or t[6] != ":":
        raise ValueError("want '@src/len dst/len lo : hi lo : hi proto/mask [flags/mask]'")
    sv, sm = _prefix(t[0])
    dv, dm = _prefix(t[1])
    ports = [_port(t[2]), _port(t[4]), _port(t[5]), _port(t[7])]
    if ports[0] > ports[1] or ports[2] > ports[3]:
        raise ValueError("empty port range (lo > hi)")
    pv, pm = _hexpair(t[8], 8, "protocol")
    fv = fm = 0
    if len(t) == 10:
        fv, fm = _hexpair(t[9], 16, "flags")
        if fm > 0xFF:
            raise ValueError(f"flags mask {fm:#x} goes beyond the 8 TCP flag bits")
    val = [0] * NW
    mask = [0] * NW
    val[K_SRC_LO], mask[K_SRC_LO] = sv, sm
    val[K_DST_LO], mask[K_DST_LO] = dv, dm
    mask[K_SRC_HI] = mask[K_DST_HI] = U64  # IPv4-mapped: the high word is 0
    val[K_L4] = pv << SH_PROTO | fv << SH_TCP_FLAGS
    mask[K_L4] = pm << SH_PROTO | fm << SH_TCP_FLAGS
    val[K_META], mask[K_META] = 0x0800 << SH_ETHERTYPE, 0xFFFF << SH_ETHERTYPE
    return val, mask, ports


def load_rules(path) -> RuleSet:
    """Read a ClassBench filter file into a RuleSet (rule i = i-th non-blank line)."""
    vals, masks, ports = [], [], []
    try:
        f = open(path, encoding="ascii", errors="replace")
    except OSError as exc:
        raise InputError(f"cannot read rules: {exc.strerror}", str(path)) from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                v, m, p = parse_rule_line(line)
            except ValueError as exc:
                raise InputError(str(exc), str(path), lineno) from None
            vals.append(v)
            masks.append(m)
            ports.append(p)
    n = len(vals)
    return RuleSet.from_arrays(
        np.array(vals, np.uint64).reshape(n, NW),
        np.array(masks, np.uint64).reshape(n, NW),
        np.array(ports, np.int64).reshape(n, 4),
    )


_LIMITS = (0xFFFFFFFF, 0xFFFFFFFF, 65535, 65535, 255)
_NAMES = ("source address", "destination address", "source port", "destination port", "protocol")


def load_trace_tuples(path, limit: int | None = None) -> np.ndarray:
    """The ``(n, 5)`` int64 columns src, dst, sport, dport, proto of a trace file."""
    try:
        f = open(path, encoding="ascii", errors="replace")
    except OSError as exc:
        raise InputError(f"cannot read trace: {exc.strerror}", str(path)) from None
    rows: list = []
    with f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            t = line.split()
            if not t or t[0].startswith("#"):
                continue
            if len(t) < 5:
                raise InputError("want 'src dst sport dport proto' (decimal)", str(path), lineno)
            row = []
            for tok, hi, name in zip(t[:5], _LIMITS, _NAMES):
                if not tok.isdigit() or int(tok) > hi:
                    raise InputError(f"bad {name} {tok!r}", str(path), lineno)
                row.append(int(tok))
            rows.append(row)
    return np.array(rows, np.int64).reshape(len(rows), 5)


def load_trace(path, limit: int | None = None) -> np.ndarray:
    """Packet keys ``(n, NW)`` for the headers of a trace file (IPv4, ethertype 0x0800)."""
    T = load_trace_tuples(path, limit)
    return _keys.from_ipv4_tuples(T[:, 0], T[:, 1], T[:, 2], T[:, 3], T[:, 4])
