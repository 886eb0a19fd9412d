"""Rule model: rules are data; a compiled :class:`RuleSet` is immutable and versioned.

A :class:`Rule` matches on tenant, ingress port, ethertype, source/destination prefixes
(128-bit, IPv4 as IPv4-mapped ``::ffff:a.b.c.d`` so an IPv4 /n is a /96+n), protocol
(value/mask), source/destination port ranges, ICMP type/code, TCP flag bits (value/mask)
and conntrack-state bits (value/mask, see :mod:`microseg.ctstate`). A field left at its
default matches anything.

Priority: a larger ``priority`` wins; among equal priorities the earlier rule (lower index in
the rule set) wins. ClassBench files give every rule priority 0, so "first match wins".

Every classifier works on a *packet key*: ``NW`` unsigned 64-bit words per packet (layout
below, ``K_*``). A compiled rule is the same words as (value, mask) pairs plus the two port
ranges, so a rule matches key ``k`` iff ``k & mask == value`` word by word and both ports lie
in their ranges. The key words double as the flow key of the exact-match/megaflow caches.
"""

from __future__ import annotations

import enum
import ipaddress
import itertools
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

# ---- packet key layout (NW uint64 words per packet) -----------------------------------------
K_SRC_HI, K_SRC_LO, K_DST_HI, K_DST_LO = 0, 1, 2, 3
K_L4 = 4  # sport bits 0-15, dport 16-31, proto 32-39, icmp type 40-47, icmp code 48-55,
# tcp flags 56-63
K_META = 5  # tenant (int32 as uint32, -1 = untunnelled) bits 0-31, in_port 32-47,
# ethertype 48-63
K_CT = 6  # conntrack state bits 0-7
NW = 7

SH_SPORT, SH_DPORT, SH_PROTO, SH_ICMP_TYPE, SH_ICMP_CODE, SH_TCP_FLAGS = 0, 16, 32, 40, 48, 56
SH_TENANT, SH_IN_PORT, SH_ETHERTYPE = 0, 32, 48
SH_CT = 0

# columns of RuleSet.ports
P_SPORT_LO, P_SPORT_HI, P_DPORT_LO, P_DPORT_HI = 0, 1, 2, 3

V4_MAPPED = 0xFFFF << 32
U64 = (1 << 64) - 1


class Action(enum.IntEnum):
    """What a matching rule asks for. No match means default deny (the caller's choice)."""

    ALLOW = 1
    DROP = 2
    REJECT = 3


@dataclass(frozen=True)
class Prefix:
    """A 128-bit prefix: ``hi``/``lo`` 64-bit halves of the (masked) address and a length.

    IPv4 prefixes use the IPv4-mapped form, so ``Prefix.parse("10.0.0.0/8").length == 104``.
    """

    hi: int
    lo: int
    length: int

    def __post_init__(self):
        if not 0 <= self.length <= 128:
            raise InputError(f"prefix length {self.length} out of range 0..128")
        m = _len_mask(self.length)
        v = ((self.hi << 64) | self.lo) & m
        object.__setattr__(self, "hi", v >> 64)
        object.__setattr__(self, "lo", v & U64)

    @classmethod
    def parse(cls, text: str) -> Prefix:
        """ "10.0.0.0/8", "10.1.2.3" (a /32), "2001:db8::/32"; host bits are cleared."""
        try:
            net = ipaddress.ip_network(str(text).strip(), strict=False)
        except ValueError as exc:
            raise InputError(f"bad prefix {text!r}: {exc}") from None
        return cls.from_network(net)

    @classmethod
    def from_network(cls, net) -> Prefix:
        if net.version == 4:
            v = V4_MAPPED | int(net.network_address)
            return cls(0, v, 96 + net.prefixlen)
        v = int(net.network_address)
        return cls(v >> 64, v & U64, net.prefixlen)

    @classmethod
    def ipv4(cls, addr: int, length: int) -> Prefix:
        """An IPv4 prefix from a 32-bit integer address and a length 0..32."""
        if not 0 <= length <= 32:
            raise InputError(f"IPv4 prefix length {length} out of range 0..32")
        return cls(0, V4_MAPPED | (int(addr) & 0xFFFFFFFF), 96 + length)

    @property
    def is_ipv4(self) -> bool:
        return self.length >= 96 and self.hi == 0 and (self.lo >> 32) == 0xFFFF

    def masks(self) -> tuple[int, int]:
        m = _len_mask(self.length)
        return m >> 64, m & U64

    def __str__(self) -> str:
        if self.is_ipv4:
            return f"{ipaddress.IPv4Address(self.lo & 0xFFFFFFFF)}/{self.length - 96}"
        return f"{ipaddress.IPv6Address((self.hi << 64) | self.lo)}/{self.length}"


def _len_mask(length: int) -> int:
    return ((1 << 128) - 1) ^ ((1 << (128 - length)) - 1)


def _prefix(p) -> Prefix | None:
    if p is None or isinstance(p, Prefix):
        return p
    return Prefix.parse(p)


def _check(name, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= int(v) <= hi:
        raise InputError(f"{name} {v!r} out of range {lo}..{hi}")


@dataclass(frozen=True)
class Rule:
    """One L2-L4 rule. ``None`` / full ranges / zero masks match anything."""

    priority: int = 0
    action: Action = Action.DROP
    rule_id: int = 0  # cookie naming the source rule (policy compiler's)
    tenant: int | None = None  # VNI/VSID; -1 = packets that came in no tunnel
    in_port: int | None = None
    ethertype: int | None = None
    src: Prefix | None = None
    dst: Prefix | None = None
    proto: int | None = None
    proto_mask: int = 0xFF  # only used when proto is set
    sport: tuple[int, int] = (0, 65535)
    dport: tuple[int, int] = (0, 65535)
    icmp_type: int | None = None
    icmp_code: int | None = None
    tcp_flags: int = 0
    tcp_flags_mask: int = 0
    ct_state: int = 0
    ct_state_mask: int = 0

    def __post_init__(self):
        object.__setattr__(self, "src", _prefix(self.src))
        object.__setattr__(self, "dst", _prefix(self.dst))
        object.__setattr__(self, "action", Action(self.action))
        object.__setattr__(self, "sport", tuple(int(x) for x in self.sport))
        object.__setattr__(self, "dport", tuple(int(x) for x in self.dport))
        _check("priority", self.priority, -(1 << 62), 1 << 62)
        _check("rule_id", self.rule_id, -(1 << 63), (1 << 63) - 1)
        if self.tenant is not None:
            _check("tenant", self.tenant, -1, (1 << 32) - 1)
        if self.in_port is not None:
            _check("in_port", self.in_port, 0, 65535)
        if self.ethertype is not None:
            _check("ethertype", self.ethertype, 0, 65535)
        if self.proto is not None:
            _check("proto", self.proto, 0, 255)
        _check("proto_mask", self.proto_mask, 0, 255)
        for name in ("sport", "dport"):
            r = getattr(self, name)
            if len(r) != 2:
                raise InputError(f"{name} must be a (lo, hi) pair")
            _check(name, r[0], 0, 65535)
            _check(name, r[1], 0, 65535)
            if r[0] > r[1]:
                raise InputError(f"{name} range {r[0]}:{r[1]} is empty")
        for name in ("icmp_type", "icmp_code"):
            if getattr(self, name) is not None:
                _check(name, getattr(self, name), 0, 255)
        for name in ("tcp_flags", "tcp_flags_mask", "ct_state", "ct_state_mask"):
            _check(name, getattr(self, name), 0, 255)

    def words(self) -> tuple[list[int], list[int]]:
        """(value, mask) as ``NW`` key words (ports are ranges, not in the masks)."""
        val, msk = [0] * NW, [0] * NW
        for wh, wl, p in ((K_SRC_HI, K_SRC_LO, self.src), (K_DST_HI, K_DST_LO, self.dst)):
            if p is not None:
                mh, ml = p.masks()
                val[wh], msk[wh], val[wl], msk[wl] = p.hi & mh, mh, p.lo & ml, ml
        l4v = l4m = 0
        if self.proto is not None:
            l4m |= self.proto_mask << SH_PROTO
            l4v |= (self.proto & self.proto_mask) << SH_PROTO
        if self.icmp_type is not None:
            l4m |= 0xFF << SH_ICMP_TYPE
            l4v |= self.icmp_type << SH_ICMP_TYPE
        if self.icmp_code is not None:
            l4m |= 0xFF << SH_ICMP_CODE
            l4v |= self.icmp_code << SH_ICMP_CODE
        l4m |= self.tcp_flags_mask << SH_TCP_FLAGS
        l4v |= (self.tcp_flags & self.tcp_flags_mask) << SH_TCP_FLAGS
        mv = mm = 0
        if self.tenant is not None:
            mm |= 0xFFFFFFFF << SH_TENANT
            mv |= (self.tenant & 0xFFFFFFFF) << SH_TENANT
        if self.in_port is not None:
            mm |= 0xFFFF << SH_IN_PORT
            mv |= self.in_port << SH_IN_PORT
        if self.ethertype is not None:
            mm |= 0xFFFF << SH_ETHERTYPE
            mv |= self.ethertype << SH_ETHERTYPE
        val[K_L4], msk[K_L4], val[K_META], msk[K_META] = l4v, l4m, mv, mm
        msk[K_CT] = self.ct_state_mask
        val[K_CT] = self.ct_state & self.ct_state_mask
        return val, msk


_versions = itertools.count(1)


class RuleSet:
    """An immutable compiled rule set: read-only arrays plus a version number.

    Arrays (``n`` = number of rules, in rule order):
      ``val``, ``mask``: ``(n, NW)`` uint64 key words; ``ports``: ``(n, 4)`` int64 port ranges
      (``P_*`` columns); ``priority`` int64; ``action`` uint8; ``rule_id`` int64;
      ``rank`` int32: 0 for the rule that beats all others (priority desc, then index);
      ``order``: rule indices by rank (``order[rank[i]] == i``).
    A classifier returns rule *indices* (``-1`` = no match); ``actions(idx)`` maps them to
    actions with ``-1`` becoming ``default`` (DROP: default deny).
    """

    __slots__ = ("rules", "version", "val", "mask", "ports", "priority", "action", "rule_id", "rank", "order")
    rules: tuple
    version: int
    val: np.ndarray
    mask: np.ndarray
    ports: np.ndarray
    priority: np.ndarray
    action: np.ndarray
    rule_id: np.ndarray
    rank: np.ndarray
    order: np.ndarray

    def __init__(self, rules=(), version: int | None = None):
        rules = tuple(rules)
        for r in rules:
            if not isinstance(r, Rule):
                raise InputError(f"not a Rule: {r!r}")
        n = len(rules)
        val = np.zeros((n, NW), np.uint64)
        mask = np.zeros((n, NW), np.uint64)
        ports = np.zeros((n, 4), np.int64)
        for i, r in enumerate(rules):
            v, m = r.words()
            val[i] = v
            mask[i] = m
            ports[i] = (r.sport[0], r.sport[1], r.dport[0], r.dport[1])
        prio = np.array([r.priority for r in rules], np.int64)
        self._init(
            rules,
            val,
            mask,
            ports,
            prio,
            np.array([int(r.action) for r in rules], np.uint8),
            np.array([r.rule_id for r in rules], np.int64),
            version,
        )

    def _init(self, rules, val, mask, ports, prio, action, rule_id, version):
        n = val.shape[0]
        order = np.lexsort((np.arange(n), -prio)).astype(np.int32)
        rank = np.empty(n, np.int32)
        rank[order] = np.arange(n, dtype=np.int32)
        s = object.__setattr__
        s(self, "rules", rules)
        s(self, "version", int(next(_versions) if version is None else version))
        for name, arr in (
            ("val", val),
            ("mask", mask),
            ("ports", ports),
            ("priority", prio),
            ("action", action),
            ("rule_id", rule_id),
            ("rank", rank),
            ("order", order),
        ):
            arr = np.ascontiguousarray(arr)
            arr.setflags(write=False)
            s(self, name, arr)

    @classmethod
    def from_arrays(
        cls, val, mask, ports, priority=None, action=None, rule_id=None, version: int | None = None
    ) -> RuleSet:
        """Compile straight from arrays (large generated sets; no Rule objects kept)."""
        val = np.asarray(val, np.uint64)
        mask = np.asarray(mask, np.uint64)
        ports = np.asarray(ports, np.int64)
        n = val.shape[0]
        if val.shape != (n, NW) or mask.shape != (n, NW) or ports.shape != (n, 4):
            raise InputError("rule arrays have inconsistent shapes")
        if np.any(val & ~mask):
            raise InputError("rule value has bits outside its mask")
        if n and (
            ports.min() < 0
            or ports.max() > 65535
            or np.any(ports[:, 0] > ports[:, 1])
            or np.any(ports[:, 2] > ports[:, 3])
        ):
            raise InputError("bad port range in rule arrays")
        prio = np.zeros(n, np.int64) if priority is None else np.asarray(priority, np.int64)
        act = np.full(n, int(Action.DROP), np.uint8) if action is None else np.asarray(action, np.uint8)
        rid = np.arange(n, dtype=np.int64) if rule_id is None else np.asarray(rule_id, np.int64)
        self = cls.__new__(cls)
        self._init((), val, mask, ports, prio, act, rid, version)
        return self

    def __setattr__(self, name, value):
        raise AttributeError("RuleSet is immutable")

    def __len__(self) -> int:
        return int(self.val.shape[0])

    def __repr__(self) -> str:
        return f"RuleSet(n={len(self)}, version={self.version})"

    def actions(self, idx: np.ndarray, default: Action = Action.DROP) -> np.ndarray:
        """Per-packet action codes (uint8) for classifier results; -1 gives ``default``."""
        idx = np.asarray(idx)
        out = np.full(idx.shape, int(default), np.uint8)
        hit = idx >= 0
        out[hit] = self.action[idx[hit]]
        return out

    def nbytes(self) -> int:
        return sum(
            getattr(self, a).nbytes
            for a in ("val", "mask", "ports", "priority", "action", "rule_id", "rank", "order")
        )
