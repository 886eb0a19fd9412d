"""Security associations (SAD) and security policies (SPD), loaded from YAML or JSON.

An SA file is a mapping with a list ``sas``; each SA has at least ``spi``, ``key`` (hex, 16, 24
or 32 bytes: AES-GCM-128/192/256), ``salt`` (hex, 4 bytes, RFC 4106), ``tunnel_src`` and
``tunnel_dst``; optional ``name``, ``esn`` (bool), ``replay_window`` (packets, 0 disables the
check only when written out explicitly), ``lifetime`` (a mapping of ``soft_bytes``,
``hard_bytes``, ``soft_packets``, ``hard_packets``, ``soft_seconds``, ``hard_seconds``; 0 or
absent = no limit; RFC 4301 4.4.2.1), ``esn_resync`` (``{after: N, tries: M}``: RFC 4303
Appendix A3 re-synchronisation after N consecutive authentication failures). The older
``lifetime_bytes`` and ``lifetime_packets`` still mean ``hard_bytes`` and ``hard_packets``.
Keys nobody asked for are ignored, except inside ``lifetime`` and ``esn_resync``, where a
misspelt limit must not pass silently. Errors name the file, the line (when the loader knows
it) and the field. An optional list ``policies`` maps inner
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
MAX_RESYNC_TRIES = 16
MAX_SECONDS = 9_000_000_000  # ~285 years: the limit in nanoseconds still fits an int64
LIFETIME_KEYS = ("soft_bytes", "hard_bytes", "soft_packets", "hard_packets", "soft_seconds", "hard_seconds")
ACTION_PROTECT, ACTION_BYPASS, ACTION_DISCARD = 0, 1, 2
_ACTIONS = {"protect": ACTION_PROTECT, "bypass": ACTION_BYPASS, "discard": ACTION_DISCARD}
_PROTOS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "sctp": 132, "any": -1}


def seconds_ns(v) -> int:
    """A lifetime in seconds (int or float) as integer nanoseconds, the timestamps' unit."""
    return int(v) * 1_000_000_000 if isinstance(v, int) else int(round(v * 1e9))


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
    hard_bytes: int = 0  # lifetimes (RFC 4301 4.4.2.1), 0 = none; bytes are inner
    soft_bytes: int = 0  # IP packet bytes, counted per direction
    hard_packets: int = 0
    soft_packets: int = 0
    hard_seconds: float = 0  # from the SA's installation (or its first packet)
    soft_seconds: float = 0
    resync_after: int = 0  # ESN re-synchronisation (RFC 4303 A3), 0 = off
    resync_tries: int = 1

    @property
    def lifetime_bytes(self) -> int:
        return self.hard_bytes

    @property
    def lifetime_packets(self) -> int:
        return self.hard_packets

    def lifetime(self) -> dict:
        """The six limits by their SA-file names (0 = none)."""
        return {k: getattr(self, k) for k in LIFETIME_KEYS}

    @property
    def aead(self) -> str:
        return f"AES-GCM-{len(self.key) * 8}"

    @property
    def ip_version(self) -> int:
        return ipaddress.ip_address(self.tunnel_src).version

    def __repr__(self) -> str:  # dataclass repr=False on fields already hides them; be explicit
        return (
            f"SecurityAssociation(name={self.name!r}, spi={self.spi:#010x}, aead={self.aead}, "
            f"tunnel_src={self.tunnel_src!r}, tunnel_dst={self.tunnel_dst!r}, esn={self.esn}, "
            f"replay_window={self.replay_window}, key=<hidden>)"
        )

    __str__ = __repr__

    def summary(self) -> dict:
        """Everything but the key material, for listings and JSON output."""
        return {
            "name": self.name,
            "spi": self.spi,
            "aead": self.aead,
            "tunnel_src": self.tunnel_src,
            "tunnel_dst": self.tunnel_dst,
            "esn": self.esn,
            "replay_window": self.replay_window,
            "lifetime": self.lifetime(),
            "esn_resync": (
                {"after": self.resync_after, "tries": self.resync_tries} if self.resync_after else None
            ),
        }


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
        raise InputError(
            f"no SA named {name!r} (have: {', '.join(s.name for s in self.sas)})", path=self.path
        )


def _line(node, key=None):
    """1-based line of ``node[key]`` (or of ``node``) when the loader recorded it, else None."""
    if key is not None and hasattr(node, "line_of"):
        return node.line_of(key) or None
    return getattr(node, "line", None) or None


def _int(value, where, path, lo, hi, line=None):
    if isinstance(value, bool):
        raise InputError(f"{where}: expected an integer, got {value!r}", path=path, line=line)
    if isinstance(value, str):
        try:
            value = int(value.strip(), 0)
        except ValueError:
            raise InputError(f"{where}: expected an integer, got {value!r}", path=path, line=line) from None
    if not isinstance(value, int):
        raise InputError(f"{where}: expected an integer, got {type(value).__name__}", path=path, line=line)
    if not lo <= value <= hi:
        raise InputError(f"{where}: {value} is out of range {lo}..{hi}", path=path, line=line)
    return value


def _seconds(value, where, path, line=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where}: expected a number of seconds, got {value!r}", path=path, line=line)
    if not 0 <= value <= MAX_SECONDS:  # also refuses NaN
        raise InputError(f"{where}: {value} is out of range 0..{MAX_SECONDS}", path=path, line=line)
    return value


def _hex(value, where, path, sizes, line=None):
    # Never echo the value: it may be key material.
    if not isinstance(value, str):
        raise InputError(f"{where}: expected a hex string", path=path, line=line)
    text = value.strip().replace(" ", "").replace(":", "")
    if text[:2].lower() == "0x":
        text = text[2:]
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise InputError(f"{where}: not a valid hex string", path=path, line=line) from None
    if len(raw) not in sizes:
        want = " or ".join(str(s) for s in sizes)
        raise InputError(f"{where}: expected {want} bytes, got {len(raw)}", path=path, line=line)
    return raw


def _addr(value, where, path, line=None):
    try:
        return str(ipaddress.ip_address(str(value).strip()))
    except ValueError:
        raise InputError(f"{where}: not an IP address: {value!r}", path=path, line=line) from None


def _bool(value, where, path, line=None):
    if isinstance(value, bool):
        return value
    raise InputError(f"{where}: expected true or false, got {value!r}", path=path, line=line)


def _prefix(value, where, path, line=None):
    if value is None or value == "any":
        return None
    try:
        return ipaddress.ip_network(str(value).strip(), strict=False)
    except ValueError:
        raise InputError(f"{where}: not an address prefix: {value!r}", path=path, line=line) from None


def _lifetime(entry, where, path) -> dict:
    """The six limits of one SA from ``lifetime:`` (and the older ``lifetime_bytes/packets``)."""
    out = dict.fromkeys(LIFETIME_KEYS, 0)
    lt = entry.get("lifetime")
    if lt is not None:
        if not isinstance(lt, dict):
            raise InputError(
                f"{where}.lifetime: expected a mapping of {', '.join(LIFETIME_KEYS)}",
                path=path,
                line=_line(entry, "lifetime"),
            )
        for k, v in lt.items():
            at = f"{where}.lifetime.{k}"
            if k not in LIFETIME_KEYS:
                raise InputError(
                    f"{at}: unknown limit (expected one of {', '.join(LIFETIME_KEYS)})",
                    path=path,
                    line=_line(lt, k),
                )
            if v is None:
                continue
            if k.endswith("_seconds"):
                out[k] = _seconds(v, at, path, _line(lt, k))
            else:
                out[k] = _int(v, at, path, 0, 2**63 - 1, _line(lt, k))
    for old, new in (("lifetime_bytes", "hard_bytes"), ("lifetime_packets", "hard_packets")):
        if entry.get(old):
            if out[new]:
                raise InputError(
                    f"{where}: give {old} or lifetime.{new}, not both", path=path, line=_line(entry, old)
                )
            out[new] = _int(entry[old], f"{where}.{old}", path, 0, 2**63 - 1, _line(entry, old))
    for what in ("bytes", "packets", "seconds"):
        soft, hard = out["soft_" + what], out["hard_" + what]
        if soft and hard and soft >= hard:
            line = (
                _line(lt, "soft_" + what)
                if isinstance(lt, dict) and "soft_" + what in lt
                else _line(entry, "lifetime")
            )
            raise InputError(
                f"{where}.lifetime.soft_{what}: {soft} must be below hard_{what} "
                f"({hard}): the soft limit warns before the hard one ends the SA",
                path=path,
                line=line,
            )
    return out


def _resync(entry, where, path, esn: bool) -> tuple[int, int]:
    rs = entry.get("esn_resync")
    if rs is None or rs is False:
        return 0, 1
    at = f"{where}.esn_resync"
    if not isinstance(rs, dict):
        raise InputError(
            f"{at}: expected a mapping {{after: N, tries: M}}", path=path, line=_line(entry, "esn_resync")
        )
    for k in rs:
        if k not in ("after", "tries"):
            raise InputError(f"{at}.{k}: unknown field (expected after, tries)", path=path, line=_line(rs, k))
    if "after" not in rs:
        raise InputError(f"{at}: missing field 'after'", path=path, line=_line(entry, "esn_resync"))
    after = _int(rs["after"], f"{at}.after", path, 1, 2**31 - 1, _line(rs, "after"))
    tries = _int(rs.get("tries", 1), f"{at}.tries", path, 1, MAX_RESYNC_TRIES, _line(rs, "tries"))
    if not esn:
        raise InputError(
            f"{at}: needs esn: true (only 64-bit sequence numbers lose their high half)",
            path=path,
            line=_line(entry, "esn_resync"),
        )
    return after, tries


def parse_sa(entry, i: int, path: str | None = None) -> SecurityAssociation:
    where = f"sas[{i}]"
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected a mapping", path=path, line=_line(entry))
    for req in ("spi", "key", "salt", "tunnel_src", "tunnel_dst"):
        if req not in entry:
            raise InputError(f"{where}: missing field '{req}'", path=path, line=_line(entry))
    name = entry.get("name", f"sa{i}")
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}.name: expected a non-empty string", path=path, line=_line(entry, "name"))
    where = f"sas[{i}] ({name})"

    def at(k):
        return _line(entry, k)

    spi = _int(entry["spi"], f"{where}.spi", path, 256, 0xFFFFFFFF, at("spi"))  # 1..255 reserved
    key = _hex(entry["key"], f"{where}.key", path, (16, 24, 32), at("key"))
    salt = _hex(entry["salt"], f"{where}.salt", path, (4,), at("salt"))
    src = _addr(entry["tunnel_src"], f"{where}.tunnel_src", path, at("tunnel_src"))
    dst = _addr(entry["tunnel_dst"], f"{where}.tunnel_dst", path, at("tunnel_dst"))
    if ipaddress.ip_address(src).version != ipaddress.ip_address(dst).version:
        raise InputError(
            f"{where}: tunnel_src and tunnel_dst are of different IP versions",
            path=path,
            line=at("tunnel_dst"),
        )
    esn = _bool(entry.get("esn", False), f"{where}.esn", path, at("esn"))
    window = _int(
        entry.get("replay_window", DEFAULT_REPLAY_WINDOW),
        f"{where}.replay_window",
        path,
        0,
        MAX_REPLAY_WINDOW,
        at("replay_window"),
    )
    if esn and window == 0:
        raise InputError(
            f"{where}.replay_window: ESN needs an anti-replay window (RFC 4303 2.2.1)",
            path=path,
            line=at("replay_window"),
        )
    life = _lifetime(entry, where, path)
    after, tries = _resync(entry, where, path, esn)
    return SecurityAssociation(
        name=name,
        spi=spi,
        key=key,
        salt=salt,
        tunnel_src=src,
        tunnel_dst=dst,
        esn=esn,
        replay_window=window,
        resync_after=after,
        resync_tries=tries,
        **life,
    )


def parse_policy(entry, i: int, names: set, path: str | None = None) -> Policy:
    where = f"policies[{i}]"
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected a mapping", path=path, line=_line(entry))

    def at(k):
        return _line(entry, k)

    src = _prefix(entry.get("src"), f"{where}.src", path, at("src"))
    dst = _prefix(entry.get("dst"), f"{where}.dst", path, at("dst"))
    if src is not None and dst is not None and src.version != dst.version:
        raise InputError(f"{where}: src and dst are of different IP versions", path=path, line=at("dst"))
    proto = entry.get("proto", "any")
    if isinstance(proto, str) and proto.lower() in _PROTOS:
        proto = _PROTOS[proto.lower()]
    else:
        proto = _int(proto, f"{where}.proto", path, 0, 255, at("proto"))
    sa = entry.get("sa")
    if sa is not None and not isinstance(sa, str):
        raise InputError(
            f"{where}.sa: must be the name of an SA, not {type(sa).__name__}", path=path, line=at("sa")
        )
    action = entry.get("action", "protect" if sa is not None else None)
    if not isinstance(action, str) or action not in _ACTIONS:
        raise InputError(
            f"{where}.action: expected protect, bypass or discard, got {action!r}",
            path=path,
            line=at("action"),
        )
    if _ACTIONS[action] == ACTION_PROTECT:
        if sa not in names:
            raise InputError(f"{where}.sa: no SA named {sa!r}", path=path, line=at("sa"))
    elif sa is not None:
        raise InputError(f"{where}: 'sa' given with action {action}", path=path, line=at("sa"))
    return Policy(
        src=src,
        dst=dst,
        proto=proto,
        action=_ACTIONS[action],
        sa=sa,
        name=str(entry.get("name", f"policy{i}")),
    )


def parse_config(doc, path: str | None = None) -> SAConfig:
    """Validate a decoded SA document (mapping with ``sas`` and optional ``policies``)."""
    if not isinstance(doc, dict):
        raise InputError("expected a mapping with a list 'sas'", path=path, line=_line(doc))
    if "sas" not in doc:
        raise InputError("missing field 'sas'", path=path, line=_line(doc))
    if not isinstance(doc["sas"], list) or not doc["sas"]:
        raise InputError("'sas' must be a non-empty list", path=path, line=_line(doc, "sas"))
    entries = doc["sas"]
    sas = [parse_sa(e, i, path) for i, e in enumerate(entries)]
    seen_names: set[str] = set()
    seen_spi: dict[tuple[str, int], str] = {}
    for i, sa in enumerate(sas):
        line = entries.line_of(i) if hasattr(entries, "line_of") else None
        if sa.name in seen_names:
            raise InputError(f"sas[{i}]: duplicate SA name {sa.name!r}", path=path, line=line)
        seen_names.add(sa.name)
        k = (sa.tunnel_dst, sa.spi)
        if k in seen_spi:
            raise InputError(
                f"sas[{i}] ({sa.name}): SPI {sa.spi:#x} to {sa.tunnel_dst} already used by {seen_spi[k]!r}",
                path=path,
                line=line,
            )
        seen_spi[k] = sa.name
    pols = doc.get("policies") or []
    if not isinstance(pols, list):
        raise InputError("'policies' must be a list", path=path, line=_line(doc, "policies"))
    policies = [parse_policy(e, i, seen_names, path) for i, e in enumerate(pols)]
    return SAConfig(tuple(sas), tuple(policies), path)


def _with_lines(text: str, path: str):
    """The document again with the line of every value (None when that loader refuses it)."""
    from ..policy.source import load_documents

    try:
        docs = load_documents(text, path)
    except InputError:
        return None
    return docs[0] if len(docs) == 1 else None


def load_config(path: str | os.PathLike) -> SAConfig:
    """Read and validate an SA file (YAML or JSON); errors name the file and, where known, the line."""
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
        raise InputError(
            f"not valid {'JSON' if path.endswith('.json') else 'YAML'}: {type(exc).__name__}",
            path=path,
            line=line,
        ) from None
    # the same document once more through the line-recording loader, for file:line errors
    lined = _with_lines(raw.decode("utf-8"), path)
    if lined is not None and lined == doc:
        doc = lined
    return parse_config(doc, path)
