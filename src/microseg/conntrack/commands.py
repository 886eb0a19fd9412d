"""`microseg conntrack states|list`: per-packet states of a capture, and the connection table.

``states FILE`` prints one line per packet (new / established / related / invalid /
untracked, nftables' spelling); ``--csv`` prints ``index,state`` like the kernel vectors so the
two can be diffed. ``list`` prints the table the way ``conntrack -L`` does, from a snapshot or
after processing a capture, filtered by zone, address, protocol or TCP state; ``--save`` writes
a snapshot that ``--restore`` (or ``list --snapshot``) reads back.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from .. import ctstate as CS
from ..errors import InputError
from ..packet.batch import addr_to_text, text_to_addr
from . import const as K
from .table import ConntrackTable

PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
PROTO_NUMBERS = {
    "icmp": 1,
    "tcp": 6,
    "udp": 17,
    "icmpv6": 58,
    "ipv6-icmp": 58,
    "esp": 50,
    "gre": 47,
    "sctp": 132,
}
CHUNK = 4096


def register(sub) -> None:
    p = sub.add_parser(
        "conntrack",
        help="connection tracking: per-packet states, the table",
        description="Track the connections of a capture with Linux nf_conntrack semantics.",
    )
    verbs = p.add_subparsers(dest="ct_verb", metavar="VERB")
    verbs.required = True

    s = verbs.add_parser(
        "states",
        help="one state per packet of a capture",
        description="Print the conntrack state of every packet of FILE: new, "
        "established, related, invalid (or untracked), as nftables "
        "spells them.",
    )
    s.add_argument("file", metavar="FILE", help="pcap or pcapng capture")
    s.add_argument("--csv", action="store_true", help="print 'index,state' lines with a header")
    s.add_argument("--reply", action="store_true", help="append ' reply' to reply-direction lines")
    _table_args(s)
    s.set_defaults(func=run_states)

    ls = verbs.add_parser(
        "list",
        help="list tracked connections (like conntrack -L)",
        description="List connections from a snapshot or after tracking a "
        "capture, one per line in conntrack -L's format.",
    )
    src = ls.add_mutually_exclusive_group(required=True)
    src.add_argument("--snapshot", metavar="SNAP", help="a snapshot written by --save")
    src.add_argument("--capture", metavar="FILE", help="track this capture first")
    ls.add_argument("--zone", type=int, help="only this zone")
    ls.add_argument("--src", metavar="ADDR", help="original source address")
    ls.add_argument("--dst", metavar="ADDR", help="original destination address")
    ls.add_argument("--proto", metavar="PROTO", help="tcp, udp, icmp, icmpv6 or a number")
    ls.add_argument("--state", metavar="STATE", help="TCP state (ESTABLISHED, SYN_SENT, TIME_WAIT, ...)")
    ls.add_argument("--json", action="store_true", help="one JSON object per connection")
    ls.add_argument(
        "--counters", action="store_true", help="print the drop and event counters after the list"
    )
    _table_args(ls, restore=False)
    ls.set_defaults(func=run_list)


def _table_args(p, restore: bool = True) -> None:
    p.add_argument("--capacity", type=int, default=1 << 16, help="table size (default 65536)")
    p.add_argument(
        "--default-zone",
        type=int,
        default=K.UNTAGGED_ZONE,
        help="zone of untunnelled packets (default 2**24, just past the 24-bit VNIs, so no tenant shares it)",
    )
    if restore:
        p.add_argument("--restore", metavar="SNAP", help="start from this snapshot")
    p.add_argument("--save", metavar="SNAP", help="write a snapshot of the table at the end")


def _new_table(args) -> ConntrackTable:
    if getattr(args, "restore", None):
        return ConntrackTable.restore(args.restore, capacity=args.capacity)
    try:
        return ConntrackTable(capacity=args.capacity, default_zone=args.default_zone)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _track(args, table: ConntrackTable, path: str):
    from ..io.pcap import iter_capture
    from ..packet.batch import FlowKeys
    from ..packet.parse import parse

    keys = FlowKeys(CHUNK)
    for batch in iter_capture(path, batch_size=CHUNK):
        parse(batch, keys)
        yield table.process(batch, keys)


def _save(args, table: ConntrackTable) -> None:
    if args.save:
        try:
            table.snapshot(args.save)
        except OSError as exc:
            raise InputError(f"cannot write snapshot ({exc.strerror})", path=args.save) from None


def run_states(args) -> int:
    table = _new_table(args)
    out = sys.stdout
    if args.csv:
        out.write("index,state\n")
    i = 0
    for states in _track(args, table, args.file):
        lines = []
        for s in states.tolist():
            name = CS.state_name(s)
            if args.reply and s & CS.REPLY:
                name += " reply"
            lines.append(f"{i},{name}" if args.csv else name)
            i += 1
        if lines:
            out.write("\n".join(lines) + "\n")
    _save(args, table)
    return 0


def _addr_filter(text: str, what: str):
    try:
        return text_to_addr(text)
    except ValueError:
        raise InputError(f"{what}: not an IP address: {text!r}") from None


def _proto_filter(text: str) -> int:
    t = text.lower()
    if t in PROTO_NUMBERS:
        return PROTO_NUMBERS[t]
    if t.isdigit() and int(t) < 256:
        return int(t)
    raise InputError(f"--proto: unknown protocol {text!r}")


def select(
    entries: np.ndarray, now: int, zone=None, src=None, dst=None, proto=None, state=None
) -> np.ndarray:
    """Entries alive at ``now`` matching the filters (conntrack -L's -s/-d/-p/--state/-w)."""
    m = entries["deadline"] - now > 0
    if zone is not None:
        m &= entries["zone"] == zone
    if src is not None:
        m &= (entries["src_hi"] == src[0]) & (entries["src_lo"] == src[1])
    if dst is not None:
        m &= (entries["dst_hi"] == dst[0]) & (entries["dst_lo"] == dst[1])
    if proto is not None:
        m &= entries["proto"] == proto
    if state is not None:
        m &= (entries["proto"] == K.IPPROTO_TCP) & (entries["tcp_state"] == state)
    return entries[m]


def describe(e, now: int) -> dict:
    """One connection as a dict (the fields conntrack -L prints)."""
    proto = int(e["proto"])
    src, dst = (
        addr_to_text(int(e["src_hi"]), int(e["src_lo"])),
        addr_to_text(int(e["dst_hi"]), int(e["dst_lo"])),
    )
    d = {
        "proto": PROTO_NAMES.get(proto, "unknown"),
        "protonum": proto,
        "timeout": max(0, (int(e["deadline"]) - now) // K.NS),
        "zone": int(e["zone"]),
        "src": src,
        "dst": dst,
        "assured": bool(e["status"] & K.ST_ASSURED),
        "unreplied": not (e["status"] & K.ST_SEEN_REPLY),
        "bytes": [int(e["bytes"][0]), int(e["bytes"][1])],
    }
    if proto == K.IPPROTO_TCP:
        d["state"] = K.TCP_STATE_NAMES[int(e["tcp_state"])]
    if proto in (K.IPPROTO_TCP, K.IPPROTO_UDP):
        d["sport"], d["dport"] = int(e["sport"]), int(e["dport"])
    elif proto in (K.IPPROTO_ICMP, K.IPPROTO_ICMPV6):
        inv = K.ICMP4_INV if proto == K.IPPROTO_ICMP else K.ICMP6_INV
        t = int(e["icmp_type"])
        d.update(type=t, code=int(e["icmp_code"]), id=int(e["sport"]), reply_type=int(inv[t]) - 1)
    return d


def format_line(d: dict) -> str:
    """conntrack -L's line for one connection."""
    head = f"{d['proto']:<8} {d['protonum']} {d['timeout']} "
    if "state" in d:
        head += d["state"] + " "

    def tup(src, dst, rev):
        s = f"src={src} dst={dst} "
        if "sport" in d:
            a, b = (d["dport"], d["sport"]) if rev else (d["sport"], d["dport"])
            s += f"sport={a} dport={b} "
        elif "type" in d:
            s += f"type={d['reply_type'] if rev else d['type']} code={d['code']} id={d['id']} "
        return s

    line = head + tup(d["src"], d["dst"], False) + f"bytes={d['bytes'][0]} "
    if d["unreplied"]:
        line += "[UNREPLIED] "
    line += tup(d["dst"], d["src"], True) + f"bytes={d['bytes'][1]} "
    if d["assured"]:
        line += "[ASSURED] "
    line += "mark=0"
    if d["zone"]:
        line += f" zone={d['zone']}"
    return line


def run_list(args) -> int:
    src = _addr_filter(args.src, "--src") if args.src else None
    dst = _addr_filter(args.dst, "--dst") if args.dst else None
    proto = _proto_filter(args.proto) if args.proto else None
    state = None
    if args.state:
        name = args.state.upper()
        if name not in K.TCP_STATE_NAMES:
            raise InputError(
                f"--state: unknown TCP state {args.state!r}; known: " + ", ".join(K.TCP_STATE_NAMES[1:])
            )
        state = K.TCP_STATE_NAMES.index(name)
    if args.snapshot:
        table = ConntrackTable.restore(args.snapshot, capacity=args.capacity)
    else:
        table = _new_table(args)
        for _ in _track(args, table, args.capture):
            pass
    _save(args, table)
    now = table.last_now
    rows = select(table.entries(), now, args.zone, src, dst, proto, state)
    out = sys.stdout
    for e in rows:
        d = describe(e, now)
        out.write((json.dumps(d) if args.json else format_line(d)) + "\n")
    if args.counters:
        c = table.counters
        out.write(
            (
                "counters " + json.dumps(c)
                if args.json
                else "counters: " + " ".join(f"{k}={v}" for k, v in c.items() if v)
            )
            + "\n"
        )
    print(f"conntrack: {len(rows)} flow entries have been shown.", file=sys.stderr)
    return 0


__all__ = ["register", "run_states", "run_list", "select", "describe", "format_line"]
