"""`microseg parse FILE [--json] [--flows]`: what the parser sees in a capture.

Per packet (innermost packet of tunnels): a table, or with ``--json`` one JSON object per line
with ``tenant``, ``src``, ``dst``, ``proto``, ``sport``, ``dport``, ``icmp_type``, ``icmp_code``,
``error``, ``tunnel`` (the innermost tunnel seen), ``inner_not_followed`` (true when that
tunnel is one the parser does not step into, so the packet shown is its carrier),
``truncated`` (the capture was snapped inside the packet) and ``arp_op``, ``arp_sha``,
``arp_tha`` -- null where a field does not apply or could not be read (ARP addresses of
unusual sizes stay null rather than printing as ``::`` or 0). ``--flows`` sums packets and
bytes per (tenant, addresses, protocol, ports) instead.
"""

from __future__ import annotations

import json
import sys
from typing import Literal

import numpy as np

from ..errors import InputError
from ..io.pcap import TruncatedCaptureError, iter_capture
from . import errors as PE
from .batch import (
    F2_ARP_HW,
    F2_TRUNCATED,
    F_ARP,
    F_ICMP,
    F_PORTS,
    TUN_NAMES,
    FlowKeys,
    addr_to_text,
)
from .parse import parse

CHUNK = 4096
TABLE_ROWS = 1000  # rows per rendered table block (keeps memory flat on big files)
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 47: "gre", 50: "esp", 58: "icmpv6", 132: "sctp"}
TCP_FLAG_NAMES = "FSRPAUEC"


def register(sub) -> None:
    p = sub.add_parser(
        "parse",
        help="show the parsed headers of every packet of a capture",
        description="Parse every packet of FILE (pcap or pcapng) down to the "
        "innermost packet of VXLAN / GENEVE / NVGRE tunnels and print "
        "its tenant, addresses, protocol, ports, ICMP type and parse "
        "error, as a table or as JSON lines.",
    )
    p.add_argument("file", metavar="FILE", help="pcap or pcapng capture")
    p.add_argument("--json", action="store_true", help="one JSON object per packet (or flow)")
    p.add_argument(
        "--flows", action="store_true", help="one line per flow (tenant, 5-tuple) with packet and byte counts"
    )
    p.add_argument(
        "--lenient",
        action="store_true",
        help="read a capture cut short inside its last record: print its complete "
        "packets, warn on stderr and exit 0",
    )
    p.set_defaults(func=run_parse)


class _AddrText:
    """Text of 128-bit addresses, memoised (captures repeat the same few addresses)."""

    def __init__(self):
        self._memo: dict = {}

    def __call__(self, hi: int, lo: int) -> str:
        key = (hi, lo)
        s = self._memo.get(key)
        if s is None:
            if len(self._memo) > 1 << 16:
                self._memo.clear()
            s = self._memo[key] = addr_to_text(hi, lo)
        return s


def _columns(keys: FlowKeys) -> dict:
    n = keys.n
    return {
        name: getattr(keys, name)[:n].tolist()
        for name in (
            "tenant",
            "src_hi",
            "src_lo",
            "dst_hi",
            "dst_lo",
            "proto",
            "sport",
            "dport",
            "icmp_type",
            "icmp_code",
            "error",
            "ip_ver",
            "flags",
            "tcp_flags",
            "tun_type",
            "arp_op",
            "vlan0",
            "n_vlans",
            "ethertype",
            "flags2",
            "tun_unfollowed",
            "arp_sha",
            "arp_tha",
        )
    }


def _mac_text(v: int) -> str:
    return ":".join(f"{(v >> s) & 0xFF:02x}" for s in range(40, -8, -8))


def _arp_read(c: dict, i: int) -> tuple[bool, bool]:
    """(op read, addresses read) of an ARP packet: the op needs the fixed 8 bytes, the
    addresses an IPv4 ARP whose body was all there (the last thing the parser reads)."""
    if not c["flags"][i] & F_ARP:
        return False, False
    err = c["error"][i]
    return err != PE.TRUNC_ARP, err == PE.OK


def _tunnel(c: dict, i: int):
    """(name, inner not followed) of the innermost tunnel seen."""
    skipped = c["tun_unfollowed"][i]
    if skipped:
        return TUN_NAMES.get(skipped, f"tunnel_{skipped}"), True
    return TUN_NAMES.get(c["tun_type"][i]), False


def _records(keys: FlowKeys, text: _AddrText):
    """The JSON record of each packet of a parsed batch."""
    c = _columns(keys)
    for i in range(keys.n):
        fl, ver = c["flags"][i], c["ip_ver"][i]
        arp_op, arp_addr = _arp_read(c, i)
        has_addr = ver != 0 or arp_addr
        arp_hw = arp_addr and bool(c["flags2"][i] & F2_ARP_HW)
        tenant = c["tenant"][i]
        ports = bool(fl & F_PORTS)
        icmp = bool(fl & F_ICMP)
        tunnel, not_followed = _tunnel(c, i)
        yield (
            {
                "tenant": tenant if tenant >= 0 else None,
                "src": text(c["src_hi"][i], c["src_lo"][i]) if has_addr else None,
                "dst": text(c["dst_hi"][i], c["dst_lo"][i]) if has_addr else None,
                "proto": c["proto"][i] if ver else None,
                "sport": c["sport"][i] if ports else None,
                "dport": c["dport"][i] if ports else None,
                "icmp_type": c["icmp_type"][i] if icmp else None,
                "icmp_code": c["icmp_code"][i] if icmp else None,
                "error": PE.name(c["error"][i]),
                "tunnel": tunnel,
                "inner_not_followed": not_followed,
                "truncated": bool(c["flags2"][i] & F2_TRUNCATED),
                "arp_op": c["arp_op"][i] if arp_op else None,
                "arp_sha": _mac_text(c["arp_sha"][i]) if arp_hw else None,
                "arp_tha": _mac_text(c["arp_tha"][i]) if arp_hw else None,
            },
            c,
            i,
        )


def _info(c: dict, i: int) -> str:
    parts = []
    tun = TUN_NAMES.get(c["tun_type"][i])
    if tun:
        parts.append(tun)
    skipped = c["tun_unfollowed"][i]
    if skipped:
        parts.append(f"{TUN_NAMES.get(skipped, f'tunnel_{skipped}')} (inner not followed)")
    if c["n_vlans"][i]:
        parts.append(f"vlan {c['vlan0'][i] & 0xFFF}")
    fl = c["flags"][i]
    if fl & F_ARP:
        if _arp_read(c, i)[0]:
            parts.append({1: "arp request", 2: "arp reply"}.get(c["arp_op"][i], f"arp op {c['arp_op'][i]}"))
        else:
            parts.append("arp")
    elif c["ip_ver"][i] == 0:
        parts.append(f"ethertype 0x{c['ethertype'][i]:04x}")
    if c["proto"][i] == 6 and fl & F_PORTS:
        tf = c["tcp_flags"][i]
        parts.append("[" + "".join(ch for b, ch in enumerate(TCP_FLAG_NAMES) if tf >> b & 1) + "]")
    if fl & F_ICMP:
        parts.append(f"type {c['icmp_type'][i]} code {c['icmp_code'][i]}")
    if c["flags2"][i] & F2_TRUNCATED:
        parts.append("truncated")
    return " ".join(parts)


def _print_table(batches, console) -> tuple[int, dict]:
    from rich.table import Table

    text = _AddrText()
    total, table, first = 0, None, True
    errors: dict[str, int] = {}

    def new_table(header: bool):
        t = Table(show_header=header, box=None, pad_edge=False)
        just: Literal["left", "right"]
        for name, width, just in (
            ("#", 7, "right"),
            ("tenant", 8, "right"),
            ("src", 24, "left"),
            ("sport", 5, "right"),
            ("dst", 24, "left"),
            ("dport", 5, "right"),
            ("proto", 6, "left"),
            ("info", 28, "left"),
            ("error", 16, "left"),
        ):
            t.add_column(name, min_width=width, justify=just, no_wrap=True, overflow="fold")
        return t

    def cell(v):
        return "" if v is None else str(v)

    for keys in batches:
        for rec, c, i in _records(keys, text):
            if table is None:
                table = new_table(first)
                first = False
            proto = rec["proto"]
            table.add_row(
                str(total),
                cell(rec["tenant"]),
                cell(rec["src"]),
                cell(rec["sport"]),
                cell(rec["dst"]),
                cell(rec["dport"]),
                PROTO_NAMES.get(proto, cell(proto)),
                _info(c, i),
                cell(rec["error"]),
            )
            if rec["error"]:
                errors[rec["error"]] = errors.get(rec["error"], 0) + 1
            total += 1
            if table.row_count == TABLE_ROWS:
                console.print(table)
                table = None
    if table is not None:
        console.print(table)
    return total, errors


_FLOW_DTYPE = np.dtype(
    [
        ("tenant", "<i4"),
        ("src_hi", "<u8"),
        ("src_lo", "<u8"),
        ("dst_hi", "<u8"),
        ("dst_lo", "<u8"),
        ("proto", "u1"),
        ("sport", "<u2"),
        ("dport", "<u2"),
        ("ver", "u1"),
        ("arp", "u1"),
    ]
)


def _flow_keys(keys: FlowKeys) -> np.ndarray:
    n = keys.n
    k = np.zeros(n, dtype=_FLOW_DTYPE)
    for name in ("tenant", "src_hi", "src_lo", "dst_hi", "dst_lo", "proto", "sport", "dport"):
        k[name] = getattr(keys, name)[:n]
    k["ver"] = keys.ip_ver[:n]
    k["arp"] = ((keys.flags[:n] & F_ARP) != 0) & (keys.error[:n] == PE.OK)  # addresses read
    return k


def _reduce(k: np.ndarray, pkts: np.ndarray, nbytes: np.ndarray):
    uniq, inv = np.unique(k, return_inverse=True)
    inv = inv.reshape(-1)
    return (
        uniq,
        np.bincount(inv, weights=pkts, minlength=len(uniq)).astype(np.int64),
        np.bincount(inv, weights=nbytes, minlength=len(uniq)).astype(np.int64),
    )


def _flows(pairs):
    """Per-flow packet and byte totals over (batch, keys) pairs, biggest flows first."""
    parts = []
    for batch, keys in pairs:
        n = len(batch)
        parts.append(_reduce(_flow_keys(keys), np.ones(n), batch.wire_len[:n].astype(np.float64)))
        if len(parts) >= 64:
            parts = [_reduce(*(np.concatenate(x) for x in zip(*parts)))]
    if not parts:
        return []
    uniq, pk, by = _reduce(*(np.concatenate(x) for x in zip(*parts)))
    order = np.lexsort((-by, -pk))
    text = _AddrText()
    out = []
    for j in order.tolist():
        u = uniq[j]
        has_addr = u["ver"] != 0 or u["arp"]
        ports = u["ver"] != 0 and int(u["proto"]) in (6, 17, 132)
        out.append(
            {
                "tenant": int(u["tenant"]) if u["tenant"] >= 0 else None,
                "src": text(int(u["src_hi"]), int(u["src_lo"])) if has_addr else None,
                "dst": text(int(u["dst_hi"]), int(u["dst_lo"])) if has_addr else None,
                "proto": int(u["proto"]) if u["ver"] else None,
                "sport": int(u["sport"]) if ports else None,
                "dport": int(u["dport"]) if ports else None,
                "packets": int(pk[j]),
                "bytes": int(by[j]),
            }
        )
    return out


def _console(out):
    from rich.console import Console

    c = Console(file=out)
    if not c.is_terminal:  # a pipe or file: do not squeeze columns into 80 characters
        c = Console(file=out, width=200)
    return c


def _parsed(path, reading: _Reading | None = None):
    """(batch, parsed keys) of each chunk of the capture. With ``reading``, an error after
    some packets is kept there (raised by ``reading.done()`` once those packets are out)
    instead of stopping the caller's output."""
    keys = FlowKeys(CHUNK)
    lenient = reading.lenient if reading is not None else False
    chunks = iter_capture(path, batch_size=CHUNK, lenient=lenient, warn=_warn)
    first = True
    while True:
        try:
            batch = next(chunks)
        except StopIteration:
            return
        except InputError as exc:
            if reading is None or first:  # nothing read: no output, just the error
                raise
            reading.error = exc
            return
        first = False
        yield batch, parse(batch, keys)


def _warn(message: str) -> None:
    print(f"microseg parse: warning: {message}", file=sys.stderr)


class _Reading:
    """Reading options of one `parse` run, and the error that ended its capture, if any."""

    def __init__(self, args):
        self.path = args.file
        self.lenient = bool(getattr(args, "lenient", False))
        self.error: InputError | None = None

    def __iter__(self):
        return _parsed(self.path, self)

    def done(self) -> None:
        """Raise the error that ended the capture (after everything before it was printed)."""
        exc = self.error
        if isinstance(exc, TruncatedCaptureError):
            raise InputError(f"{exc} (--lenient prints them and exits 0)") from None
        if exc is not None:
            raise exc


def run_parse(args) -> int:
    out = sys.stdout
    reading = _Reading(args)
    if args.flows:
        flows = _flows(reading)
        if args.json:
            for f in flows:
                out.write(json.dumps(f) + "\n")
            reading.done()
            return 0
        from rich.table import Table

        t = Table(box=None, pad_edge=False)
        for name in ("tenant", "src", "sport", "dst", "dport", "proto", "packets", "bytes"):
            t.add_column(
                name,
                justify="right" if name in ("tenant", "sport", "dport", "packets", "bytes") else "left",
                no_wrap=True,
            )
        for f in flows:
            t.add_row(
                *(
                    "" if f[k] is None else str(PROTO_NAMES.get(f[k], f[k]) if k == "proto" else f[k])
                    for k in ("tenant", "src", "sport", "dst", "dport", "proto", "packets", "bytes")
                )
            )
        console = _console(out)
        console.print(t)
        console.print(f"{len(flows)} flows, {sum(f['packets'] for f in flows)} packets")
        reading.done()
        return 0
    if args.json:
        text = _AddrText()
        for _, keys in reading:
            out.write("".join(json.dumps(rec) + "\n" for rec, _, _ in _records(keys, text)))
        reading.done()
        return 0
    console = _console(out)
    total, errors = _print_table((k for _, k in reading), console)
    summary = f"{total} packets"
    if errors:
        summary += ", parse errors: " + ", ".join(f"{k} {v}" for k, v in sorted(errors.items()))
    console.print(summary)
    reading.done()
    return 0
