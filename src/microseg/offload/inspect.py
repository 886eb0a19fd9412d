"""Inspection of a flow's first packets: content signatures and traffic that cannot be inspected.

Two parts, both batch functions over ``(Batch, FlowKeys)`` and a selection of rows:

* :func:`uninspectable` (Numba kernel, plain-Python reference :func:`uninspectable_ref`): per
  packet, why its payload cannot be inspected: ``ENC_TLS`` (a TLS record header on TCP:
  ClientHello, ServerHello, application data...), ``ENC_QUIC`` (UDP port 443 with a QUIC long
  header, or a short header with the fixed bit set), ``ENC_ESP`` (IP protocol 50, or ESP in
  UDP on port 4500 -- non-ESP marker and keepalives excepted), else ``ENC_NONE``.
* :class:`SignatureSet`: rules in a subset of Suricata's syntax (see ``docs/inspection.md``),
  compiled into one Aho-Corasick automaton (pyahocorasick) over every rule's longest content,
  case-folded; a packet's payload is scanned once, and only the rules whose pattern occurred
  (plus the rules without content) are checked in full: header, ``flow``, ``dsize`` and every
  content with its modifiers (``nocase``, ``offset``, ``depth``, ``distance``, ``within``,
  negation), with backtracking over earlier matches as Suricata does.

Addresses are resolved per family as Suricata does (a negation only removes addresses of its
own family; a family with only negations starts from the whole family), ports likewise; a rule
with content needs a payload. Verdict per packet, Suricata's default action order: a matching
``pass`` rule wins (``PASS``), then ``drop`` (``DROP``), then ``alert`` (``ALERT``); ``NONE``
when no rule matched. Within an action the rule with the lowest ``priority`` value (explicit,
else its ``classtype``'s), then the earliest in the file, gives the ``sid``; ``sids`` lists
every rule that took effect, as Suricata logs every alert. Rules the parser cannot handle
raise :class:`~microseg.errors.InputError` naming file and line (or, with ``strict=False``, are
skipped and listed in ``SignatureSet.skipped``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

import ahocorasick
import numpy as np
from numba import njit

from ..ctstate import ESTABLISHED, REPLY, TRACKED
from ..errors import InputError
from ..packet import batch as B

# verdicts and uninspectable reasons
NONE, PASS, ALERT, DROP = 0, 1, 2, 3
VERDICT_NAMES = {NONE: "none", PASS: "pass", ALERT: "alert", DROP: "drop"}
ENC_NONE, ENC_TLS, ENC_QUIC, ENC_ESP = 0, 1, 2, 3
ENC_NAMES = {ENC_NONE: None, ENC_TLS: "tls", ENC_QUIC: "quic", ENC_ESP: "esp"}

_ACTIONS = {"pass": PASS, "alert": ALERT, "drop": DROP}
_ACTION_ORDER = {PASS: 0, DROP: 1, ALERT: 2}
_PROTOS = {"tcp": (6,), "udp": (17,), "icmp": (1, 58), "ip": None}
_FULL = (1 << 128) - 1
_V4 = 0xFFFF << 32

DEFAULT_VARS = {
    "HOME_NET": "[192.168.0.0/16,10.0.0.0/8,172.16.0.0/12]",
    "EXTERNAL_NET": "!$HOME_NET",
    "HTTP_SERVERS": "$HOME_NET",
    "SMTP_SERVERS": "$HOME_NET",
    "SQL_SERVERS": "$HOME_NET",
    "DNS_SERVERS": "$HOME_NET",
    "TELNET_SERVERS": "$HOME_NET",
    "AIM_SERVERS": "$EXTERNAL_NET",
    "DC_SERVERS": "$HOME_NET",
    "DNP3_SERVER": "$HOME_NET",
    "DNP3_CLIENT": "$HOME_NET",
    "MODBUS_CLIENT": "$HOME_NET",
    "MODBUS_SERVER": "$HOME_NET",
    "ENIP_CLIENT": "$HOME_NET",
    "ENIP_SERVER": "$HOME_NET",
    "HTTP_PORTS": "80",
    "SHELLCODE_PORTS": "!80",
    "ORACLE_PORTS": "1521",
    "SSH_PORTS": "22",
    "DNP3_PORTS": "20000",
    "MODBUS_PORTS": "502",
    "FILE_DATA_PORTS": "[$HTTP_PORTS,110,143]",
    "FTP_PORTS": "21",
    "GENEVE_PORTS": "6081",
    "VXLAN_PORTS": "4789",
    "TEREDO_PORTS": "3544",
}

# Keywords that only describe a rule (its alert record), in Suricata as here: kept as metadata.
_META_KEYWORDS = {"reference", "metadata", "gid", "target"}
# ``classtype`` gives a rule its priority unless ``priority`` is set: the classtypes and
# priorities of the classification.config that Suricata ships.
CLASSTYPE_PRIORITY = {
    "not-suspicious": 3,
    "unknown": 3,
    "bad-unknown": 2,
    "attempted-recon": 2,
    "successful-recon-limited": 2,
    "successful-recon-largescale": 2,
    "attempted-dos": 2,
    "successful-dos": 2,
    "attempted-user": 1,
    "unsuccessful-user": 1,
    "successful-user": 1,
    "attempted-admin": 1,
    "successful-admin": 1,
    "rpc-portmap-decode": 2,
    "shellcode-detect": 1,
    "string-detect": 3,
    "suspicious-filename-detect": 2,
    "suspicious-login": 2,
    "system-call-detect": 2,
    "tcp-connection": 4,
    "trojan-activity": 1,
    "unusual-client-port-connection": 2,
    "network-scan": 3,
    "denial-of-service": 2,
    "non-standard-protocol": 2,
    "protocol-command-decode": 3,
    "web-application-activity": 2,
    "web-application-attack": 1,
    "misc-activity": 3,
    "misc-attack": 2,
    "icmp-event": 3,
    "inappropriate-content": 1,
    "policy-violation": 1,
    "default-login-attempt": 2,
    "targeted-activity": 1,
    "exploit-kit": 1,
    "external-ip-check": 2,
    "domain-c2": 1,
    "pup-activity": 2,
    "credential-theft": 1,
    "social-engineering": 2,
    "coin-mining": 2,
    "command-and-control": 1,
}
# Content modifiers and keywords the subset does not implement, with a hint.
_UNSUPPORTED_HINT = {
    "pcre": "regular expressions are not supported",
    "flowbits": "flowbits (state across rules) are not supported",
    "byte_test": "byte_test is not supported",
    "byte_jump": "byte_jump is not supported",
    "byte_extract": "byte_extract is not supported",
    "isdataat": "isdataat is not supported",
    "threshold": "threshold is not supported",
    "detection_filter": "detection_filter is not supported",
    "rawbytes": "rawbytes is not supported",
    "noalert": "noalert only makes sense with flowbits, which are not supported",
}


@dataclass
class Content:
    pattern: bytes
    negated: bool = False
    nocase: bool = False
    offset: int | None = None
    depth: int | None = None
    distance: int | None = None
    within: int | None = None
    fast_pattern: bool = False

    @property
    def relative(self) -> bool:
        return self.distance is not None or self.within is not None


@dataclass
class Signature:
    """One parsed rule."""

    action: int
    protos: tuple | None
    src: tuple  # (IPv4 intervals, IPv6 intervals): what the address matches, per family
    sport: tuple | None  # port ranges, None = any port
    dst: tuple
    dport: tuple | None
    bidirectional: bool
    sid: int
    rev: int = 0
    msg: str = ""
    priority: int = 3
    contents: list = field(default_factory=list)
    flow_dir: int = 0  # 0 any, 1 to_server, 2 to_client
    flow_state: int = 0  # 0 any, 1 established, 2 not_established
    dsize: tuple | None = None
    classtype: str | None = None
    line: int = 0
    text: str = ""


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------
class _RuleError(Exception):
    pass


_MAX_NESTING = 64  # Suricata's limit on address and port list recursion


def _split_list(text: str) -> list[str]:
    """Top-level comma-separated items of a ``[...]`` body (nested brackets kept whole)."""
    items: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "[":
            depth += 1
            if depth >= _MAX_NESTING:
                raise _RuleError(f"lists nested more than {_MAX_NESTING} deep")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise _RuleError("unbalanced ']'")
        if ch == "," and depth == 0:
            items.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise _RuleError("unbalanced '['")
    items.append("".join(cur).strip())
    if any(not it for it in items):
        raise _RuleError(f"empty item in list [{text}]")
    return items


_FULL4 = ((0, (1 << 32) - 1),)
_FULL6 = ((0, _FULL),)
_FULL_PORTS = ((0, 65535),)


def _norm(ivs) -> tuple:
    """Sorted, merged, disjoint ``(lo, hi)`` intervals."""
    out: list[list[int]] = []
    for lo, hi in sorted(ivs):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def _subtract(a, b) -> tuple:
    """Intervals ``a`` minus intervals ``b`` (both normalised)."""
    out = []
    for lo, hi in a:
        cur = lo
        for blo, bhi in b:
            if bhi < cur or blo > hi:
                continue
            if blo > cur:
                out.append((cur, blo - 1))
            cur = max(cur, bhi + 1)
            if cur > hi:
                break
        if cur <= hi:
            out.append((cur, hi))
    return tuple(out)


def _strip_neg(text: str) -> tuple[bool, str]:
    text = text.strip()
    if not text.startswith("!"):
        return False, text
    text = text[1:].strip()
    if text.startswith("!"):
        raise _RuleError(f"double negation '!!{text[1:]}' is not supported")
    return True, text


def _var(text: str, variables: dict, seen: tuple, kind: str) -> tuple[str, tuple]:
    name = text[1:]
    if name not in variables:
        raise _RuleError(f"undefined {kind} variable ${name}")
    if name in seen:
        raise _RuleError(f"variable ${name} refers to itself")
    return variables[name], seen + (name,)


def _addr_collect(text: str, variables: dict, seen: tuple, acc: dict) -> None:
    """Flatten an address expression into positive and negated blocks per family, the way
    Suricata's address parser does: an item or variable is positive or negated; a negated list
    ``![...]`` (or ``!$VAR``) is first resolved on its own, and what it covers is negated."""
    neg, text = _strip_neg(text)
    if text.startswith("$"):
        body, seen2 = _var(text, variables, seen, "address")
        if neg:
            v4, v6 = _addr_merge(_addr_acc(body, variables, seen2))
            acc["n4"] += v4
            acc["n6"] += v6
        else:
            _addr_collect(body, variables, seen2, acc)
    elif text == "any":
        if neg:
            raise _RuleError("'!any' matches nothing (the complete address space is negated)")
        acc["p4"] += _FULL4
        acc["p6"] += _FULL6
    elif text.startswith("["):
        if not text.endswith("]"):
            raise _RuleError(f"unbalanced address list {text!r}")
        if neg:
            v4, v6 = _addr_merge(_addr_acc(text, variables, seen))
            acc["n4"] += v4
            acc["n6"] += v6
        else:
            for item in _split_list(text[1:-1]):
                _addr_collect(item, variables, seen, acc)
    else:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise _RuleError(f"bad address {text!r}") from None
        fam = "4" if net.version == 4 else "6"
        acc[("n" if neg else "p") + fam].append((int(net.network_address), int(net.broadcast_address)))


def _addr_acc(text: str, variables: dict, seen: tuple) -> dict:
    acc: dict = {"p4": [], "p6": [], "n4": [], "n6": []}
    _addr_collect(text, variables, seen, acc)
    return acc


def _addr_merge(acc: dict) -> tuple[tuple, tuple]:
    """Positive minus negated blocks, per family. A family with negated blocks but no positive
    ones starts from the whole family (``!1.2.3.4`` is every IPv4 address but 1.2.3.4, and no
    IPv6 address); a family with neither is empty."""
    n4, n6 = _norm(acc["n4"]), _norm(acc["n6"])
    if n4 == _FULL4:
        raise _RuleError("the complete IPv4 address space is negated: the address matches nothing")
    p4 = _norm(acc["p4"]) or (_FULL4 if n4 else ())
    p6 = _norm(acc["p6"]) or (_FULL6 if n6 else ())
    v4, v6 = _subtract(p4, n4), _subtract(p6, n6)
    if not v4 and not v6:
        raise _RuleError("no addresses left after merging addresses and negated addresses")
    return v4, v6


def _parse_addr(text: str, variables: dict, seen=()) -> tuple[tuple, tuple]:
    """``(ipv4 intervals, ipv6 intervals)``: sorted disjoint ``(lo, hi)`` per address family
    (IPv4 as 32-bit numbers, IPv6 as 128-bit ones)."""
    try:
        return _addr_merge(_addr_acc(text, variables, seen))
    except RecursionError:
        raise _RuleError("address lists and variables nested too deep") from None


def _port_collect(text: str, variables: dict, seen: tuple, acc: dict, negated: bool, last: bool) -> None:
    """Flatten a port expression into positive and negated ranges the way Suricata's port
    parser does: outside a negated list ``!x`` is negated; inside one (``![...]``) every item is
    negated, and an item's own ``!`` only counts on the list's last item, where it cancels the
    list's (``![!80]`` is port 80, ``![1:100,!50]`` leaves nothing, ``![!50,1:100]`` is every
    port but 1-100). A variable is negated when exactly one of its ``!`` and the list's is."""
    neg, text = _strip_neg(text)
    negative = neg if not negated else (not neg or not last)
    if text.startswith("$"):
        body, seen2 = _var(text, variables, seen, "port")
        _port_collect(body, variables, seen2, acc, negated != neg, True)
    elif text.startswith("["):
        if not text.endswith("]"):
            raise _RuleError(f"unbalanced port list {text!r}")
        items = _split_list(text[1:-1])
        for k, item in enumerate(items):
            _port_collect(item, variables, seen, acc, negated or neg, k == len(items) - 1)
    elif text == "any":
        acc["n" if negative else "p"].append(_FULL_PORTS[0])
    else:
        m = re.fullmatch(r"(\d*)\s*:\s*(\d*)|(\d+)", text)
        if not m or (m.group(3) is None and not (m.group(1) or m.group(2))):
            raise _RuleError(f"bad port {text!r}")
        if m.group(3) is not None:
            lo = hi = int(m.group(3))
        else:
            lo = int(m.group(1)) if m.group(1) else 0
            hi = int(m.group(2)) if m.group(2) else 65535
        if not 0 <= lo <= hi <= 65535:
            raise _RuleError(f"bad port range {text!r}")
        acc["n" if negative else "p"].append((lo, hi))


def _parse_port(text: str, variables: dict, seen=()) -> tuple | None:
    """Sorted disjoint ``(lo, hi)`` port ranges, or None for any port: the positive ranges (all
    ports when there are only negated ones) minus the negated ones."""
    acc: dict = {"p": [], "n": []}
    try:
        _port_collect(text, variables, seen, acc, False, True)
    except RecursionError:
        raise _RuleError("port lists and variables nested too deep") from None
    n = _norm(acc["n"])
    if n == _FULL_PORTS:
        raise _RuleError("the complete port space is negated (e.g. '!any'): the port matches nothing")
    p = _norm(acc["p"]) or _FULL_PORTS
    out = _subtract(p, n)
    if not out:
        raise _RuleError("no ports left after merging ports with negated ports")
    return None if out == _FULL_PORTS else out


def _content_bytes(text: str) -> bytes:
    out = bytearray()
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "|":
            j = text.find("|", i + 1)
            if j < 0:
                raise _RuleError("unterminated |hex| block in content")
            hx = text[i + 1 : j].replace(" ", "")
            if len(hx) % 2 or not re.fullmatch(r"[0-9A-Fa-f]*", hx):
                raise _RuleError(f"bad hex in content: |{text[i + 1 : j]}|")
            out += bytes.fromhex(hx)
            i = j + 1
        elif ch == "\\":
            if i + 1 >= n or text[i + 1] not in '\\;":|':
                raise _RuleError(f"bad escape in content near {text[i : i + 2]!r}")
            out.append(ord(text[i + 1]))
            i += 2
        elif ch in '";':
            raise _RuleError(f"unescaped {ch!r} in content (write \\{ch} or |{ord(ch):02x}|)")
        else:
            b = ch.encode("utf-8")
            out += b
            i += 1
    if not out:
        raise _RuleError("empty content")
    return bytes(out)


def _split_options(body: str) -> list[tuple[str, str | None]]:
    """``key:value;`` pairs of the option block; quoted values keep escaped ``;``/``"``."""
    opts: list[tuple[str, str | None]] = []
    i, n = 0, len(body)
    while i < n:
        while i < n and body[i] in " \t":
            i += 1
        if i >= n:
            break
        j = i
        while j < n and body[j] not in ":;":
            j += 1
        key = body[i:j].strip()
        if not key:
            raise _RuleError(f"empty option near {body[i : i + 20]!r}")
        if j >= n:
            raise _RuleError(f"option {key!r} is not terminated by ';'")
        if body[j] == ";":
            opts.append((key, None))
            i = j + 1
            continue
        k, inq, val = j + 1, False, []
        while k < n:
            ch = body[k]
            if ch == "\\" and k + 1 < n:
                val.append(body[k : k + 2])
                k += 2
                continue
            if ch == '"':
                inq = not inq
            elif ch == ";" and not inq:
                break
            val.append(ch)
            k += 1
        if k >= n:
            raise _RuleError(
                f"option {key!r} is not terminated by ';'" + (" (unclosed quote)" if inq else "")
            )
        opts.append((key, "".join(val).strip()))
        i = k + 1
    return opts


def _unquote(v: str | None, key: str) -> str:
    if v is None or len(v) < 2 or not (v.startswith('"') and v.endswith('"')):
        raise _RuleError(f"{key} needs a quoted string")
    return v[1:-1]


def _int(v, key, lo=None):
    try:
        x = int(str(v).strip())
    except (TypeError, ValueError):
        raise _RuleError(f"{key} needs an integer, not {v!r}") from None
    if lo is not None and x < lo:
        raise _RuleError(f"{key} must be >= {lo}")
    return x


def _header_tokens(head: str) -> list[str]:
    toks: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in head:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch.isspace() and depth == 0:
            if cur:
                toks.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        toks.append("".join(cur))
    return toks


def parse_rule(text: str, variables: dict | None = None, line: int = 0) -> Signature:
    """Parse one rule (raises ``_RuleError`` with a message; :class:`SignatureSet` adds where)."""
    variables = DEFAULT_VARS if variables is None else variables
    text = text.strip()
    p = text.find("(")
    if p < 0 or not text.endswith(")"):
        raise _RuleError("rule needs an option block '( ... )' at the end")
    head, body = text[:p], text[p + 1 : -1]
    t = _header_tokens(head)
    if len(t) != 7:
        raise _RuleError(f"header needs 7 fields (action proto src sport dir dst dport), got {len(t)}")
    action, proto, src, sport, direction, dst, dport = t
    if action not in _ACTIONS:
        raise _RuleError(f"unsupported action {action!r} (supported: alert, drop, pass)")
    if proto not in _PROTOS:
        raise _RuleError(
            f"unsupported protocol {proto!r} (supported: tcp, udp, icmp, ip; "
            "application-layer protocols are not)"
        )
    if direction not in ("->", "<>"):
        raise _RuleError(f"bad direction {direction!r} (use -> or <>)")
    sig = Signature(
        action=_ACTIONS[action],
        protos=_PROTOS[proto],
        src=_parse_addr(src, variables),
        sport=_parse_port(sport, variables),
        dst=_parse_addr(dst, variables),
        dport=_parse_port(dport, variables),
        bidirectional=direction == "<>",
        sid=-1,
        line=line,
        text=text,
    )
    if proto in ("icmp", "ip") and (sig.sport is not None or sig.dport is not None):
        raise _RuleError(f"ports given for protocol {proto!r}, which has none")
    last = None
    priority_set = False
    fast_patterns = 0
    for key, val in _split_options(body):
        key = key.lower()
        if key == "msg":
            sig.msg = _unquote(val, "msg").replace('\\"', '"').replace("\\;", ";").replace("\\\\", "\\")
        elif key == "content":
            if val is None:
                raise _RuleError("content needs a value")
            neg = val.startswith("!")
            pat = _content_bytes(_unquote(val[1:].strip() if neg else val, "content"))
            last = Content(pat, negated=neg)
            sig.contents.append(last)
        elif key in ("nocase", "offset", "depth", "distance", "within", "fast_pattern"):
            if last is None:
                raise _RuleError(f"{key} needs a preceding content")
            if key == "nocase":
                if last.nocase:
                    raise _RuleError("nocase given twice for one content")
                last.nocase = True
            elif key == "fast_pattern":
                if val is not None and val.strip() != "only":
                    raise _RuleError("fast_pattern with a chop range is not supported")
                if last.fast_pattern:
                    raise _RuleError("fast_pattern given twice for one content")
                fast_patterns += 1
                if fast_patterns > 1:
                    raise _RuleError("fast_pattern can be used on only one content in a rule")
                last.fast_pattern = True
            elif getattr(last, key) is not None:
                raise _RuleError(f"{key} given twice for one content")
            elif key in ("offset", "depth"):
                if last.relative:
                    raise _RuleError(f"{key} cannot be mixed with distance/within on one content")
                x = _int(val, key, 0)
                setattr(last, key, x)
                if key == "depth" and x < len(last.pattern):
                    raise _RuleError(
                        f"depth {last.depth} is shorter than the content ({len(last.pattern)} bytes)"
                    )
            else:
                if last.offset is not None or last.depth is not None:
                    raise _RuleError(f"{key} cannot be mixed with offset/depth on one content")
                if last is sig.contents[0]:
                    raise _RuleError(f"{key} needs a previous content to be relative to")
                x = _int(val, key, 0 if key == "within" else None)
                setattr(last, key, x)
                if key == "within" and x < len(last.pattern):
                    raise _RuleError(
                        f"within {last.within} is shorter than the content ({len(last.pattern)} bytes)"
                    )
        elif key == "sid":
            sig.sid = _int(val, "sid", 1)
        elif key == "rev":
            sig.rev = _int(val, "rev", 0)
        elif key == "priority":
            sig.priority = _int(val, "priority", 1)
            priority_set = True
        elif key == "classtype":
            name = (val or "").strip()
            if name not in CLASSTYPE_PRIORITY:
                raise _RuleError(
                    f"unknown classtype {name!r} (known: those of Suricata's stock classification.config)"
                )
            sig.classtype = name
        elif key == "flow":
            if val is None:
                raise _RuleError("flow needs options")
            dirs, states = set(), set()
            for f in (x.strip() for x in val.split(",")):
                if f in ("to_server", "from_client"):
                    dirs.add(1)
                elif f in ("to_client", "from_server"):
                    dirs.add(2)
                elif f in ("established", "not_established", "stateless"):
                    states.add(f)
                elif f == "no_stream":
                    pass  # match packets, not the reassembled stream: what is done anyway
                elif f == "only_stream":
                    raise _RuleError(
                        "unsupported flow option 'only_stream': packets are inspected one by one, "
                        "there is no reassembled stream to match"
                    )
                else:
                    raise _RuleError(f"unsupported flow option {f!r}")
            if len(dirs) > 1:
                raise _RuleError("flow cannot be both to_server and to_client")
            if len(states) > 1:
                raise _RuleError("flow options " + ", ".join(sorted(states)) + " cannot be combined")
            sig.flow_dir = dirs.pop() if dirs else 0
            st = states.pop() if states else "stateless"
            sig.flow_state = {"established": 1, "not_established": 2, "stateless": 0}[st]
        elif key == "dsize":
            if sig.dsize is not None:
                raise _RuleError("dsize given twice in one rule")
            m = re.fullmatch(r"\s*(<|>)?\s*(\d+)\s*(?:<>\s*(\d+))?\s*", val or "")
            if not m or (m.group(1) and m.group(3) is not None):
                raise _RuleError(f"bad dsize {val!r} (N, <N, >N or N<>M)")
            if m.group(3) is not None:
                lo, hi = int(m.group(2)), int(m.group(3))
                if lo >= hi:
                    raise _RuleError(f"bad dsize range {val!r} (N<>M needs N < M)")
                sig.dsize = ("<>", lo, hi)
            else:
                sig.dsize = (m.group(1) or "=", int(m.group(2)), 0)
        elif key in _META_KEYWORDS:
            pass
        elif key in _UNSUPPORTED_HINT:
            raise _RuleError(f"unsupported keyword {key!r}: {_UNSUPPORTED_HINT[key]}")
        else:
            raise _RuleError(
                f"unsupported keyword {key!r} (sticky buffers, app-layer and "
                "other keywords are outside the supported subset)"
            )
    if sig.sid < 0:
        raise _RuleError("rule has no sid")
    if sig.contents and all(c.negated for c in sig.contents) and any(c.relative for c in sig.contents):
        raise _RuleError("relative modifiers need a positive content before them")
    if not priority_set and sig.classtype is not None:
        sig.priority = CLASSTYPE_PRIORITY[sig.classtype]
    _check_dsize(sig)
    return sig


def _check_dsize(sig: Signature) -> None:
    """Refuse contents that cannot fit in the payload sizes ``dsize`` allows, by Suricata's
    rule: the largest size is N for ``N`` and ``<N``, M for ``N<>M`` (none for ``>N``); the
    first content counts its length plus distance, and each later relative positive content
    adds its length plus distance; a later relative negated content must end (distance plus
    within after the counted bytes) inside it; the counted bytes, and with the largest offset,
    may not exceed it. Later contents without distance/within are not counted."""
    if sig.dsize is None or not sig.contents or sig.dsize[0] == ">":
        return
    edge = sig.dsize[2] if sig.dsize[0] == "<>" else sig.dsize[1]
    total = max_off = 0
    for j, c in enumerate(sig.contents):
        if j > 0:
            if not c.relative:
                continue
            if c.negated:
                check = total + (c.distance or 0) + (c.within or 0)
                if check > edge:
                    raise _RuleError(
                        f"the contents need {check} bytes of payload, more than dsize allows ({edge})"
                    )
                continue
        total += len(c.pattern) + (c.distance or 0)
        max_off = max(max_off, c.offset or 0)
    need = total if total > edge else total + max_off
    if need > edge:
        raise _RuleError(f"the contents need {need} bytes of payload, more than dsize allows ({edge})")


# ---------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------
_LOWER = bytes.maketrans(bytes(range(65, 91)), bytes(range(97, 123)))


def port_in(port: int, spec: tuple | None) -> bool:
    """Is the port in a parsed port spec (None: any port)?"""
    return spec is None or any(lo <= port <= hi for lo, hi in spec)


def addr_in(addr: int, spec: tuple, ipv6: bool | None = None) -> bool:
    """Is the address in a parsed address spec? ``addr`` is 128 bits, IPv4 as ``::ffff:a.b.c.d``
    (as the parser stores it); ``ipv6`` says the family (default: IPv4 when IPv4-mapped). An
    address is only ever matched against its own family's part of the spec."""
    if ipv6 is None:
        ipv6 = addr >> 32 != 0xFFFF
    if ipv6:
        return any(lo <= addr <= hi for lo, hi in spec[1])
    a = addr & 0xFFFFFFFF
    return any(lo <= a <= hi for lo, hi in spec[0])


def _find_all(hay: bytes, pat: bytes, start: int, stop: int):
    """Start positions of ``pat`` lying wholly in ``hay[start:stop]``."""
    start = max(start, 0)
    stop = min(stop, len(hay))
    if stop - start < len(pat):
        return
    i = hay.find(pat, start, stop)
    while i >= 0:
        yield i
        i = hay.find(pat, i + 1, stop)


def _window(c: Content, prev_end: int, n: int):
    if c.relative:
        lo = prev_end + (c.distance or 0)
        hi = lo + c.within if c.within is not None else n
    else:
        lo = c.offset or 0
        hi = lo + c.depth if c.depth is not None else n
    return lo, hi


def contents_match(contents, payload: bytes, lowered: bytes, budget=None) -> bool:
    """Do the contents match the payload (with backtracking over earlier matches)?"""
    n = len(payload)
    steps = [0]

    def rec(j: int, prev_end: int) -> bool:
        if j == len(contents):
            return True
        steps[0] += 1
        if steps[0] > 10000:  # pathological rule/payload pair: stop, no match
            return False
        c = contents[j]
        hay, pat = (lowered, c.pattern.translate(_LOWER)) if c.nocase else (payload, c.pattern)
        lo, hi = _window(c, prev_end, n)
        if c.negated:
            for _ in _find_all(hay, pat, lo, hi):
                return False
            return rec(j + 1, prev_end)
        for pos in _find_all(hay, pat, lo, hi):
            if rec(j + 1, pos + len(pat)):
                return True
            if not any(x.relative for x in contents[j + 1 :]):
                return False  # later contents do not depend on where this one matched
        return False

    return rec(0, 0)


def _dsize_ok(d, n: int) -> bool:
    op, a, b = d
    if op == "=":
        return n == a
    if op == "<":
        return n < a
    if op == ">":
        return n > a
    return a < n < b


@dataclass
class InspectionResult:
    """Per-packet results for the inspected rows (arrays of the batch's length)."""

    verdict: np.ndarray  # uint8: NONE / PASS / ALERT / DROP
    sid: np.ndarray  # int64: sid of the deciding rule, 0 when none
    alerts: np.ndarray  # int32: number of matching rules
    encrypted: np.ndarray  # uint8: ENC_* reason the payload is not inspectable
    sids: dict = field(default_factory=dict)  # row -> sids of every rule that took effect


class SignatureSet:
    """Compiled signatures: one automaton over all fast patterns (see module docstring)."""

    def __init__(self, signatures, skipped=()):
        self.signatures: list[Signature] = list(signatures)
        self.skipped: list[tuple[str, int, str]] = list(skipped)
        seen = {}
        for s in self.signatures:
            if s.sid in seen:
                raise InputError(f"duplicate sid {s.sid} (first on line {seen[s.sid]})", None, None)
            seen[s.sid] = s.line
        self._order = sorted(
            range(len(self.signatures)),
            key=lambda i: (_ACTION_ORDER[self.signatures[i].action], self.signatures[i].priority, i),
        )
        self._rank = {i: r for r, i in enumerate(self._order)}
        self._always = []
        self._ac = ahocorasick.Automaton()
        words = {}
        for i, s in enumerate(self.signatures):
            pos = [c for c in s.contents if not c.negated]
            if not pos:
                self._always.append(i)
                continue
            fp = next((c for c in pos if c.fast_pattern), None) or max(pos, key=lambda c: len(c.pattern))
            words.setdefault(fp.pattern.translate(_LOWER).decode("latin-1"), []).append(i)
        for w, ids in words.items():
            self._ac.add_word(w, tuple(ids))
        self._has_words = bool(words)
        if self._has_words:
            self._ac.make_automaton()

    def __len__(self) -> int:
        return len(self.signatures)

    @classmethod
    def from_text(
        cls, text: str, path: str = "<rules>", variables: dict | None = None, strict: bool = True
    ) -> SignatureSet:
        """Parse rules from text: one per line, ``#`` comments, ``\\`` continues a line."""
        vs = dict(DEFAULT_VARS)
        vs.update(variables or {})
        sigs, skipped = [], []
        buf, start = "", 0
        lines = text.splitlines()
        for ln, raw in enumerate(lines, 1):
            s = raw.rstrip()
            if not buf:
                start = ln
                if not s.strip() or s.lstrip().startswith("#"):
                    continue
            if s.endswith("\\"):
                buf += s[:-1] + " "
                if ln < len(lines):
                    continue
                s = ""
            rule, buf = (buf + s).strip(), ""
            try:
                sigs.append(parse_rule(rule, vs, start))
            except _RuleError as exc:
                if strict:
                    raise InputError(str(exc), path, start) from None
                skipped.append((path, start, str(exc)))
        try:
            return cls(sigs, skipped)
        except InputError as exc:
            raise InputError(str(exc), path) from None

    @classmethod
    def load(cls, path, variables: dict | None = None, strict: bool = True) -> SignatureSet:
        try:
            with open(path, encoding="utf-8", errors="strict") as fh:
                text = fh.read()
        except OSError as exc:
            raise InputError(f"cannot read rules: {exc.strerror}", str(path)) from None
        except UnicodeDecodeError:
            raise InputError("rule file is not UTF-8 text", str(path)) from None
        return cls.from_text(text, str(path), variables, strict)

    # -- per packet --------------------------------------------------------------------------
    def _header_ok(self, s: Signature, proto, src, dst, sp, dp, has_ports, ipv6) -> bool:
        if s.protos is not None and proto not in s.protos:
            return False
        ports_any = s.sport is None and s.dport is None
        if not has_ports and not ports_any:
            return False

        def one(a_src, a_dst, p_s, p_d):
            return (
                addr_in(a_src, s.src, ipv6)
                and addr_in(a_dst, s.dst, ipv6)
                and (ports_any or (port_in(p_s, s.sport) and port_in(p_d, s.dport)))
            )

        if one(src, dst, sp, dp):
            return True
        return s.bidirectional and one(dst, src, dp, sp)

    def match_packet(
        self,
        payload: bytes,
        proto: int,
        src: int,
        dst: int,
        sport: int,
        dport: int,
        has_ports: bool = True,
        reply: bool = False,
        established: bool | None = None,
        ipv6: bool | None = None,
    ):
        """Matching signatures' indices in decision order (for one packet's fields; ``ipv6``:
        the packet's family, by default IPv6 unless the addresses are IPv4-mapped)."""
        lowered = payload.translate(_LOWER)
        cand = set(self._always)
        if self._has_words and payload:
            for _, ids in self._ac.iter(lowered.decode("latin-1")):
                cand.update(ids)
        out = []
        for i in sorted(cand, key=self._rank.__getitem__):
            s = self.signatures[i]
            if not self._header_ok(s, proto, src, dst, sport, dport, has_ports, ipv6):
                continue
            if s.flow_dir and (s.flow_dir == 2) != reply:
                continue
            if s.flow_state:
                if established is None:
                    # state unknown: fail closed (a drop/alert rule applies, a pass rule does not)
                    if s.action == PASS:
                        continue
                elif (s.flow_state == 1) != established:
                    continue
            if s.dsize is not None and not _dsize_ok(s.dsize, len(payload)):
                continue
            if s.contents and (not payload or not contents_match(s.contents, payload, lowered)):
                continue  # payload keywords (negated contents too) need a payload
            out.append(i)
        return out

    def inspect(self, batch, keys, rows=None, ct_state=None) -> InspectionResult:
        """Inspect the chosen packets (bool mask or indices; default all). ``ct_state``
        (conntrack bits per packet) gives direction (``REPLY`` = to_client) and ``established``;
        without it packets count as to_server with unknown state."""
        n = keys.n
        res = InspectionResult(
            np.zeros(n, np.uint8), np.zeros(n, np.int64), np.zeros(n, np.int32), np.zeros(n, np.uint8)
        )
        rows = _rows(rows, n)
        res.encrypted[:] = uninspectable(batch, keys, rows)
        u64, i32, u16, u8 = keys.u64, keys.i32, keys.u16, keys.u8
        for i in rows:
            i = int(i)
            if u8[B.ERROR, i] != 0 or u8[B.IP_VER, i] not in (4, 6):
                continue
            po, pl = int(i32[B.PAYLOAD_OFF, i]), int(i32[B.PAYLOAD_LEN, i])
            o, ln = int(batch.offset[i]), int(batch.length[i])
            payload = b"" if po < 0 or pl <= 0 else batch.data[o + po : o + min(ln, po + pl)].tobytes()
            reply, est = False, None
            if ct_state is not None:
                c = int(ct_state[i])
                reply = bool(c & REPLY)
                est = bool(c & ESTABLISHED) if c & TRACKED or c & ESTABLISHED else None
            hits = self.match_packet(
                payload,
                int(u8[B.PROTO, i]),
                int(u64[B.SRC_HI, i]) << 64 | int(u64[B.SRC_LO, i]),
                int(u64[B.DST_HI, i]) << 64 | int(u64[B.DST_LO, i]),
                int(u16[B.SPORT, i]),
                int(u16[B.DPORT, i]),
                bool(u8[B.FLAGS, i] & B.F_PORTS),
                reply,
                est,
                int(u8[B.IP_VER, i]) == 6,
            )
            if hits:
                s = self.signatures[hits[0]]
                res.verdict[i] = s.action
                res.sid[i] = s.sid
                res.alerts[i] = len(hits)
                res.sids[i] = self.logged_sids(hits)
        return res

    def logged_sids(self, hits) -> tuple[int, ...]:
        """The sids Suricata would log for a packet whose matching rules are ``hits`` (decision
        order): every matching drop and alert rule, or nothing but the first when that is a
        ``pass`` rule (a pass match ends the packet's inspection, and is reported here only so
        the verdict has a sid)."""
        if hits and self.signatures[hits[0]].action == PASS:
            return (self.signatures[hits[0]].sid,)
        return tuple(self.signatures[h].sid for h in hits)


def _rows(rows, n):
    if rows is None:
        return np.arange(n, dtype=np.int64)
    rows = np.asarray(rows)
    if rows.dtype == np.bool_:
        return np.flatnonzero(rows[:n]).astype(np.int64)
    return rows.astype(np.int64, copy=False)


# ---------------------------------------------------------------------------------------------
# Traffic that cannot be inspected
# ---------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _quic_version_ok(v):
    return (
        v == 0
        or v == 1
        or v == 0x6B3343CF
        or (v & 0xFFFFFF00) == 0xFF000000
        or (v & 0x0F0F0F0F) == 0x0A0A0A0A
    )


@njit(cache=True)
def _uninspectable(data, offset, length, u8, u16, i32, rows, out):
    for j in range(rows.shape[0]):
        i = rows[j]
        out[i] = ENC_NONE
        if u8[B.ERROR, i] != 0:
            continue
        proto = u8[B.PROTO, i]
        if proto == 50:
            out[i] = ENC_ESP
            continue
        po = i32[B.PAYLOAD_OFF, i]
        pl = i32[B.PAYLOAD_LEN, i]
        if po < 0 or pl <= 0 or not (u8[B.FLAGS, i] & B.F_PORTS):
            continue
        if po + pl > length[i]:
            pl = length[i] - po
            if pl <= 0:
                continue
        p = offset[i] + po
        sp = u16[B.SPORT, i]
        dp = u16[B.DPORT, i]
        if proto == 6:
            if pl >= 5:
                ct = data[p]
                if ct >= 20 and ct <= 24 and data[p + 1] == 3 and data[p + 2] <= 4:
                    rl = (np.int64(data[p + 3]) << 8) | np.int64(data[p + 4])
                    if rl >= 1 and rl <= 18432:
                        if ct != 22 or pl < 6 or data[p + 5] <= 24:
                            out[i] = ENC_TLS
        elif proto == 17:
            if sp == 4500 or dp == 4500:
                if pl >= 8 and not (
                    data[p] == 0 and data[p + 1] == 0 and data[p + 2] == 0 and data[p + 3] == 0
                ):
                    out[i] = ENC_ESP
            elif sp == 443 or dp == 443:
                b0 = data[p]
                if b0 & 0x80:
                    if pl >= 7:
                        v = (
                            (np.int64(data[p + 1]) << 24)
                            | (np.int64(data[p + 2]) << 16)
                            | (np.int64(data[p + 3]) << 8)
                            | np.int64(data[p + 4])
                        )
                        if _quic_version_ok(v) and data[p + 5] <= 20 and (b0 & 0x40 or v == 0):
                            out[i] = ENC_QUIC
                elif b0 & 0x40 and pl >= 21:
                    out[i] = ENC_QUIC


def uninspectable(batch, keys, rows=None) -> np.ndarray:
    """``ENC_*`` reason per packet (uint8, batch length; rows not chosen are ``ENC_NONE``)."""
    n = keys.n
    out = np.zeros(n, np.uint8)
    _uninspectable(batch.data, batch.offset, batch.length, keys.u8, keys.u16, keys.i32, _rows(rows, n), out)
    return out


def uninspectable_ref(packet_payload: bytes, proto: int, sport: int, dport: int, has_ports: bool) -> int:
    """Reference for one packet: its payload bytes (as captured) and header fields."""
    if proto == 50:
        return ENC_ESP
    p = packet_payload
    if not p or not has_ports:
        return ENC_NONE
    if proto == 6:
        if len(p) >= 5 and 20 <= p[0] <= 24 and p[1] == 3 and p[2] <= 4 and 1 <= (p[3] << 8 | p[4]) <= 18432:
            if p[0] != 22 or len(p) < 6 or p[5] <= 24:
                return ENC_TLS
        return ENC_NONE
    if proto == 17:
        if 4500 in (sport, dport):
            return ENC_ESP if len(p) >= 8 and p[:4] != b"\0\0\0\0" else ENC_NONE
        if 443 in (sport, dport):
            if p[0] & 0x80:
                if len(p) >= 7:
                    v = int.from_bytes(p[1:5], "big")
                    ok = (
                        v in (0, 1, 0x6B3343CF)
                        or v & 0xFFFFFF00 == 0xFF000000
                        or v & 0x0F0F0F0F == 0x0A0A0A0A
                    )
                    if ok and p[5] <= 20 and (p[0] & 0x40 or v == 0):
                        return ENC_QUIC
            elif p[0] & 0x40 and len(p) >= 21:
                return ENC_QUIC
    return ENC_NONE
