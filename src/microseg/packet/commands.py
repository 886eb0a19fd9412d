"""`microseg parse FILE [--json] [--flows]`: what the parser sees in a capture.

Per packet (innermost packet of tunnels): a table, or with ``--json`` one JSON object per line
with ``tenant``, ``src``, ``dst``, ``proto``, ``sport``, ``dport``, ``icmp_type``, ``icmp_code``
and ``error`` (null where a field does not apply). ``--flows`` sums packets and bytes per
(tenant, addresses, protocol, ports) instead.
"""
from __future__ import annotations

import json
import sys

import numpy as np

from ..io.pcap import iter_capture
from . import errors as PE
from .batch import (
    F_ARP, F_ICMP, F_PORTS, TUN_NAMES, FlowKeys, addr_to_text,
)
from .parse import parse

CHUNK = 4096
TABLE_ROWS = 1000            # rows per rendered table block (keeps memory flat on big files)
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 47: "gre", 50: "esp", 58: "icmpv6", 132: "sctp"}
TCP_FLAG_NAMES = "FSRPAUEC"


def register(sub) -> None:
    p = sub.add_parser("parse", help="show the parsed headers of every packet of a capture",
                       description="Parse every packet of FILE (pcap or pcapng) down to the "
                                   "innermost packet of VXLAN / GENEVE / NVGRE tunnels and print "
                                   "its tenant, addresses, protocol, ports, ICMP type and parse "
                                   "error, as a table or as JSON lines.")
    p.add_argument("file", metavar="FILE", help="pcap or pcapng capture")
    p.add_argument("--json", action="store_true", help="one JSON object per packet (or flow)")
    p.add_argument("--flows", action="store_true",
                   help="one line per flow (tenant, 5-tuple) with packet and byte counts")
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
    return {name: getattr(keys, name)[:n].tolist() for name in (
        "tenant", "src_hi", "src_lo", "dst_hi", "dst_lo", "proto", "sport", "dport", "icmp_type",
        "icmp_code", "error", "ip_ver", "flags", "tcp_flags", "tun_type", "arp_op", "vlan0",
        "n_vlans", "ethertype")}


def _records(keys: FlowKeys, text: _AddrText):
    """The JSON record of each packet of a parsed batch."""
    c = _columns(keys)
    for i in range(keys.n):
        fl, ver = c["flags"][i], c["ip_ver"][i]
        has_addr = ver != 0 or fl & F_ARP
        tenant = c["tenant"][i]
        ports = bool(fl & F_PORTS)
        icmp = bool(fl & F_ICMP)
        yield {
            "tenant": tenant if tenant >= 0 else None,
            "src": text(c["src_hi"][i], c["src_lo"][i]) if has_addr else None,
            "dst": text(c["dst_hi"][i], c["dst_lo"][i]) if has_addr else None,
            "proto": c["proto"][i] if ver else None,
            "sport": c["sport"][i] if ports else None,
            "dport": c["dport"][i] if ports else None,
            "icmp_type": c["icmp_type"][i] if icmp else None,
            "icmp_code": c["icmp_code"][i] if icmp else None,
            "error": PE.name(c["error"][i]),
        }, c, i


def _info(c: dict, i: int) -> str:
    parts = []
    tun = TUN_NAMES.get(c["tun_type"][i])
    if tun:
        parts.append(tun)
    if c["n_vlans"][i]:
        parts.append(f"vlan {c['vlan0'][i] & 0xFFF}")
    fl = c["flags"][i]
    if fl & F_ARP:
        parts.append({1: "arp request", 2: "arp reply"}.get(c["arp_op"][i], f"arp op {c['arp_op'][i]}"))
    elif c["ip_ver"][i] == 0:
        parts.append(f"ethertype 0x{c['ethertype'][i]:04x}")
    if c["proto"][i] == 6 and fl & F_PORTS:
        tf = c["tcp_flags"][i]
        parts.append("[" + "".join(ch for b, ch in enumerate(TCP_FLAG_NAMES) if tf >> b & 1) + "]")
    if fl & F_ICMP:
        parts.append(f"type {c['icmp_type'][i]} code {c['icmp_code'][i]}")
    return " ".join(parts)


def _print_table(batches, console) -> tuple[int, dict]:
    from rich.table import Table
    text = _AddrText()
    total, errors, table, first = 0, {}, None, True

    def new_table(header: bool):
        t = Table(show_header=header, box=None, pad_edge=False)
        for name, width, just in (("#", 7, "right"), ("tenant", 8, "right"), ("src", 24, "left"),
                                  ("sport", 5, "right"), ("dst", 24, "left"), ("dport", 5, "right"),
                                  ("proto", 6, "left"), ("info", 28, "left"), ("error", 16, "left")):
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
            table.add_row(str(total), cell(rec["tenant"]), cell(rec["src"]), cell(rec["sport"]),
                          cell(rec["dst"]), cell(rec["dport"]),
                          PROTO_NAMES.get(proto, cell(proto)), _info(c, i), cell(rec["error"]))
            if rec["error"]:
                errors[rec["error"]] = errors.get(rec["error"], 0) + 1
            total += 1
            if table.row_count == TABLE_ROWS:
                console.print(table)
                table = None
    if table is not None:
        console.print(table)
    return total, errors


_FLOW_DTYPE = np.dtype([("tenant", "<i4"), ("src_hi", "<u8"), ("src_lo", "<u8"), ("dst_hi", "<u8"),
                        ("dst_lo", "<u8"), ("proto", "u1"), ("sport", "<u2"), ("dport", "<u2"),
                        ("ver", "u1"), ("arp", "u1")])


def _flow_keys(keys: FlowKeys) -> np.ndarray:
    n = keys.n
    k = np.zeros(n, dtype=_FLOW_DTYPE)
    for name in ("tenant", "src_hi", "src_lo", "dst_hi", "dst_lo", "proto", "sport", "dport"):
        k[name] = getattr(keys, name)[:n]
    k["ver"] = keys.ip_ver[:n]
    k["arp"] = (keys.flags[:n] & F_ARP) != 0
    return k


def _reduce(k: np.ndarray, pkts: np.ndarray, nbytes: np.ndarray):
    uniq, inv = np.unique(k, return_inverse=True)
    inv = inv.reshape(-1)
    return (uniq, np.bincount(inv, weights=pkts, minlength=len(uniq)).astype(np.int64),
            np.bincount(inv, weights=nbytes, minlength=len(uniq)).astype(np.int64))


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
        out.append({
            "tenant": int(u["tenant"]) if u["tenant"] >= 0 else None,
            "src": text(int(u["src_hi"]), int(u["src_lo"])) if has_addr else None,
            "dst": text(int(u["dst_hi"]), int(u["dst_lo"])) if has_addr else None,
            "proto": int(u["proto"]) if u["ver"] else None,
            "sport": int(u["sport"]) if ports else None,
            "dport": int(u["dport"]) if ports else None,
            "packets": int(pk[j]),
            "bytes": int(by[j]),
        })
    return out


def _console(out):
    from rich.console import Console
    c = Console(file=out)
    if not c.is_terminal:            # a pipe or file: do not squeeze columns into 80 characters
        c = Console(file=out, width=200)
    return c


def _parsed(path):
    keys = FlowKeys(CHUNK)
    for batch in iter_capture(path, batch_size=CHUNK):
        yield batch, parse(batch, keys)


def run_parse(args) -> int:
    out = sys.stdout
    if args.flows:
        flows = _flows(_parsed(args.file))
        if args.json:
            for f in flows:
                out.write(json.dumps(f) + "\n")
            return 0
        from rich.table import Table
        t = Table(box=None, pad_edge=False)
        for name in ("tenant", "src", "sport", "dst", "dport", "proto", "packets", "bytes"):
            t.add_column(name, justify="right" if name in ("tenant", "sport", "dport", "packets", "bytes") else "left",
                         no_wrap=True)
        for f in flows:
            t.add_row(*("" if f[k] is None else str(PROTO_NAMES.get(f[k], f[k]) if k == "proto" else f[k])
                        for k in ("tenant", "src", "sport", "dst", "dport", "proto", "packets", "bytes")))
        console = _console(out)
        console.print(t)
        console.print(f"{len(flows)} flows, {sum(f['packets'] for f in flows)} packets")
        return 0
    if args.json:
        text = _AddrText()
        for _, keys in _parsed(args.file):
            out.write("".join(json.dumps(rec) + "\n" for rec, _, _ in _records(keys, text)))
        return 0
    console = _console(out)
    total, errors = _print_table((k for _, k in _parsed(args.file)), console)
    summary = f"{total} packets"
    if errors:
        summary += ", parse errors: " + ", ".join(f"{k} {v}" for k, v in sorted(errors.items()))
    console.print(summary)
    return 0
