"""Security associations (SAD) and security policies (SPD), loaded from YAML or JSON.

An SA file is a mapping with a list ``sas``; each SA has at least ``spi``, ``key`` (hex, 16, 24
or 32 bytes: AES-GCM-128/192/256), ``salt`` (hex, 4 bytes, RFC 4106), ``tunnel_src`` and
``tunnel_dst``; optional ``name``, ``esn`` (bool), ``replay_window`` (packets, 0 disables the
check only when written out explicitly), ``lifetime_bytes`` and ``lifetime_packets`` (hard
limits, 0 = none). Keys nobody asked for are ignored. An optional list ``policies`` maps inner
traffic to SAs, first match wins: ``{src: PREFIX, dst: PREFIX, proto: tcp|udp|icmp|N, sa: NAME}``
or ``action: bypass|discard`` instead of ``sa``. Traffic no policy matches is discarded.

Keys never appear in a repr, an error message or a listing.
"""
from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field

from ..errors import InputError

MAX_REPLAY_WINDOW = 4096
DEFAULT_REPLAY_WINDOW = 64
ACTION_PROTECT, ACTION_BYPASS, ACTION_DISCARD = 0, 1, 2
_ACTIONS = {"protect": ACTION_PROTECT, "bypass": ACTION_BYPASS, "discard": ACTION_DISCARD}
_PROTOS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "sctp": 132, "any": -1}


@dataclass(frozen=True)
class SecurityAssociation:
    """One SA's configuration (state lives in :class:`~microseg.ipsec.gateway.EspGateway`)."""

    name: str
    spi: int
    key: bytes = field(repr=False)
    salt: bytes = field(repr=False)
    tunnel_src: str
    tunnel_dst: str
    esn: bool = False
    replay_window: int = DEFAULT_REPLAY_WINDOW
    lifetime_bytes: int = 0
    lifetime_packets: int = 0

    @property
    def aead(self) -> str:
        return f"AES-GCM-{len(self.key) * 8}"

    @property
    def ip_version(self) -> int:
        return ipaddress.ip_address(self.tunnel_src).version

    def __repr__(self) -> str:  # dataclass repr=False on fields already hides them; be explicit
        return (f"SecurityAssociation(name={self.name!r}, spi={self.spi:#010x}, aead={self.aead}, "
                f"tunnel_src={self.tunnel_src!r}, tunnel_dst={self.tunnel_dst!r}, esn={self.esn}, "
                f"replay_window={self.replay_window}, key=<hidden>)")

    __str__ = __repr__

    def summary(self) -> dict:
        """Everything but the key material, for listings and JSON output."""
        return {"name": self.name, "spi": self.spi, "aead": self.aead,
                "tunnel_src": self.tunnel_src, "tunnel_dst": self.tunnel_dst, "esn": self.esn,
                "replay_window": self.replay_window, "lifetime_bytes": self.lifetime_bytes,
                "lifetime_packets": self.lifetime_packets}


@dataclass(frozen=True)
class Policy:
    """One SPD entry: inner src/dst prefixes (and protocol, -1 = any) -> action (and SA)."""

    src: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    proto: int
    action: int
    sa: str | None = None
    name: str = ""


@dataclass(frozen=True)
class SAConfig:
    sas: tuple[SecurityAssociation, ...]
    policies: tuple[Policy, ...]
    path: str | None = None

    def by_name(self, name: str) -> SecurityAssociation:
        for sa in self.sas:
            if sa.name == name:
                return sa
        raise InputError(f"no SA named {name!r} (have: {', '.join(s.name for s in self.sas)})",
                         path=self.path)


def _int(value, where, path, lo, hi):
    if isinstance(value, bool):
        raise InputError(f"{where}: expected an integer, got {value!r}", path=path)
    if isinstance(value, str):
        try:
            value = int(value.strip(), 0)
        except ValueError:
            raise InputError(f"{where}: expected an integer, got {value!r}", path=path) from None
    if not isinstance(value, int):
        raise InputError(f"{where}: expected an integer, got {type(value).__name__}", path=path)
    if not lo <= value <= hi:
        raise InputError(f"{where}: {value} is out of range {lo}..{hi}", path=path)
    return value


def _hex(value, where, path, sizes):
    # Never echo the value: it may be key material.
    if not isinstance(value, str):
        raise InputError(f"{where}: expected a hex string", path=path)
    text = value.strip().replace(" ", "").replace(":", "")
    if text[:2].lower() == "0x":
        text = text[2:]
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise InputError(f"{where}: not a valid hex string", path=path) from None
    if len(raw) not in sizes:
        want = " or ".join(str(s) for s in sizes)
        raise InputError(f"{where}: expected {want} bytes, got {len(raw)}", path=path)
    return raw


def _addr(value, where, path):
    try:
        return str(ipaddress.ip_address(str(value).strip()))
    except ValueError:
        raise InputError(f"{where}: not an IP address: {value!r}", path=path) from None


def _bool(value, where, path):
    if isinstance(value, bool):
        return value
    raise InputError(f"{where}: expected true or false, got {value!r}", path=path)


def _prefix(value, where, path):
    if value is None or value == "any":
        return None
    try:
        return ipaddress.ip_network(str(value).strip(), strict=False)
    except ValueError:
        raise InputError(f"{where}: not an address prefix: {value!r}", path=path) from None


def parse_sa(entry, i: int, path: str | None = None) -> SecurityAssociation:
    where = f"sas[{i}]"
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected a mapping", path=path)
    for req in ("spi", "key", "salt", "tunnel_src", "tunnel_dst"):
        if req not in entry:
            raise InputError(f"{where}: missing field '{req}'", path=path)
    name = entry.get("name", f"sa{i}")
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}.name: expected a non-empty string", path=path)
    where = f"sas[{i}] ({name})"
    spi = _int(entry["spi"], f"{where}.spi", path, 256, 0xFFFFFFFF)  # 1..255 reserved (RFC 4303)
    key = _hex(entry["key"], f"{where}.key", path, (16, 24, 32))
    salt = _hex(entry["salt"], f"{where}.salt", path, (4,))
    src = _addr(entry["tunnel_src"], f"{where}.tunnel_src", path)
    dst = _addr(entry["tunnel_dst"], f"{where}.tunnel_dst", path)
    if ipaddress.ip_address(src).version != ipaddress.ip_address(dst).version:
        raise InputError(f"{where}: tunnel_src and tunnel_dst are of different IP versions", path=path)
    esn = _bool(entry.get("esn", False), f"{where}.esn", path)
    window = _int(entry.get("replay_window", DEFAULT_REPLAY_WINDOW), f"{where}.replay_window",
                  path, 0, MAX_REPLAY_WINDOW)
    if esn and window == 0:
        raise InputError(f"{where}.replay_window: ESN needs an anti-replay window (RFC 4303 2.2.1)",
                         path=path)
    lb = _int(entry.get("lifetime_bytes", 0) or 0, f"{where}.lifetime_bytes", path, 0, 2**63 - 1)
    lp = _int(entry.get("lifetime_packets", 0) or 0, f"{where}.lifetime_packets", path, 0, 2**63 - 1)
    return SecurityAssociation(name=name, spi=spi, key=key, salt=salt, tunnel_src=src,
                               tunnel_dst=dst, esn=esn, replay_window=window,
                               lifetime_bytes=lb, lifetime_packets=lp)


def parse_policy(entry, i: int, names: set, path: str | None = None) -> Policy:
    where = f"policies[{i}]"
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected a mapping", path=path)
    src = _prefix(entry.get("src"), f"{where}.src", path)
    dst = _prefix(entry.get("dst"), f"{where}.dst", path)
    if src is not None and dst is not None and src.version != dst.version:
        raise InputError(f"{where}: src and dst are of different IP versions", path=path)
    proto = entry.get("proto", "any")
    if isinstance(proto, str) and proto.lower() in _PROTOS:
        proto = _PROTOS[proto.lower()]
    else:
        proto = _int(proto, f"{where}.proto", path, 0, 255)
    sa = entry.get("sa")
    action = entry.get("action", "protect" if sa is not None else None)
    if action not in _ACTIONS:
        raise InputError(f"{where}.action: expected protect, bypass or discard, got {action!r}",
                         path=path)
    if _ACTIONS[action] == ACTION_PROTECT:
        if sa not in names:
            raise InputError(f"{where}.sa: no SA named {sa!r}", path=path)
    elif sa is not None:
        raise InputError(f"{where}: 'sa' given with action {action}", path=path)
    return Policy(src=src, dst=dst, proto=proto, action=_ACTIONS[action], sa=sa,
                  name=str(entry.get("name", f"policy{i}")))


def parse_config(doc, path: str | None = None) -> SAConfig:
    """Validate a decoded SA document (mapping with ``sas`` and optional ``policies``)."""
    if not isinstance(doc, dict):
        raise InputError("expected a mapping with a list 'sas'", path=path)
    if "sas" not in doc:
        raise InputError("missing field 'sas'", path=path)
    if not isinstance(doc["sas"], list) or not doc["sas"]:
        raise InputError("'sas' must be a non-empty list", path=path)
    sas = [parse_sa(e, i, path) for i, e in enumerate(doc["sas"])]
    seen_names, seen_spi = set(), {}
    for i, sa in enumerate(sas):
        if sa.name in seen_names:
            raise InputError(f"sas[{i}]: duplicate SA name {sa.name!r}", path=path)
        seen_names.add(sa.name)
        k = (sa.tunnel_dst, sa.spi)
        if k in seen_spi:
            raise InputError(f"sas[{i}] ({sa.name}): SPI {sa.spi:#x} to {sa.tunnel_dst} already "
                             f"used by {seen_spi[k]!r}", path=path)
        seen_spi[k] = sa.name
    pols = doc.get("policies") or []
    if not isinstance(pols, list):
        raise InputError("'policies' must be a list", path=path)
    policies = [parse_policy(e, i, seen_names, path) for i, e in enumerate(pols)]
    return SAConfig(tuple(sas), tuple(policies), path)


def load_config(path: str | os.PathLike) -> SAConfig:
    """Read and validate an SA file (YAML or JSON; JSON is YAML, so one parser reads both)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise InputError(f"cannot read SA file: {exc.strerror}", path=path) from None
    try:
        if path.endswith(".json"):
            doc = json.loads(raw)
        else:
            import yaml
            doc = yaml.safe_load(raw)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        line = getattr(exc, "lineno", None) if line is None else line + 1
        raise InputError(f"not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                         f"{type(exc).__name__}", path=path, line=line) from None
    return parse_config(doc, path)
