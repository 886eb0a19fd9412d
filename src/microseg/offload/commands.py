"""`microseg inspect` and `microseg offload`: signatures and the offload decision on a capture."""

from __future__ import annotations

import json
import sys
from collections import Counter

import numpy as np

from ..errors import InputError
from .inspect import ENC_NAMES, VERDICT_NAMES, SignatureSet


def register(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="check a signature file, or run it over a capture",
        description="Load signatures in the supported Suricata subset "
        "(docs/inspection.md). With a capture, inspect every packet "
        "on its own and summarise alerts, drops and encrypted traffic.",
    )
    p.add_argument("rules", help="signature file")
    p.add_argument("capture", nargs="?", help="pcap or pcapng file")
    p.add_argument(
        "--var",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="define a rule variable, e.g. HOME_NET=[10.0.0.0/8] (repeatable)",
    )
    p.add_argument(
        "--lenient", action="store_true", help="skip rules outside the subset (listed) instead of failing"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per matching packet ('sid': the deciding rule, 'sids': every rule "
        "that took effect)",
    )
    p.set_defaults(func=run_inspect)

    o = sub.add_parser(
        "offload",
        help="simulate inspection hand-off and the finite fast path on a capture",
        description="Treat every parsed IP packet as allowed; inspect the first "
        "packets of each flow, offer flows to a fast-path table of "
        "finite capacity and insert rate (time from packet timestamps) "
        "and report the share of packets and bytes it carried.",
    )
    o.add_argument("capture", help="pcap or pcapng file")
    o.add_argument("--rules", help="signature file (default: none, only encrypted traffic detected)")
    o.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="rule variable")
    o.add_argument("--capacity", type=int, default=500_000, help="fast-path flows (default 500000)")
    o.add_argument("--rate", type=float, default=7000.0, help="inserts per second (default 7000)")
    o.add_argument("--burst", type=float, default=None, help="token bucket depth (default rate/100)")
    o.add_argument("--n-inspect", type=int, default=8, help="packets inspected per flow (default 8)")
    o.add_argument(
        "--elephant-bytes",
        type=int,
        default=1 << 20,
        help="offer a flow still under inspection after this many bytes (0: never)",
    )
    o.add_argument("--batch", type=int, default=256, help="packets per batch (default 256)")
    o.add_argument("--json", action="store_true", help="print the report as JSON")
    o.set_defaults(func=run_offload)


def _vars(items):
    out = {}
    for it in items:
        name, sep, value = it.partition("=")
        if not sep or not name.strip():
            raise InputError(f"--var wants NAME=VALUE, not {it!r}")
        out[name.strip().lstrip("$")] = value.strip()
    return out


def _load(path, variables, lenient):
    return SignatureSet.load(path, variables=_vars(variables), strict=not lenient)


def _capture(path):
    from ..io.pcap import read_capture
    from ..packet.parse import parse

    batch = read_capture(path)
    return batch, parse(batch)


def run_inspect(args) -> int:
    sigs = _load(args.rules, args.var, args.lenient)
    for path, line, why in sigs.skipped:
        print(f"skipped {path}:{line}: {why}", file=sys.stderr)
    if args.capture is None:
        print(f"{len(sigs)} rules loaded" + (f", {len(sigs.skipped)} skipped" if sigs.skipped else ""))
        return 0
    batch, keys = _capture(args.capture)
    by_sid = {s.sid: s for s in sigs.signatures}
    counts: Counter[tuple[str, int]] = Counter()
    enc: Counter[str | None] = Counter()  # e != 0: never None
    for lo in range(0, len(batch), 4096):
        hi = min(lo + 4096, len(batch))
        sub = batch.slice(lo, hi)
        from ..packet.parse import parse

        k = parse(sub)
        r = sigs.inspect(sub, k)
        for i in np.flatnonzero((r.verdict != 0) | (r.encrypted != 0)):
            v, sid, e = int(r.verdict[i]), int(r.sid[i]), int(r.encrypted[i])
            sids = [int(x) for x in r.sids.get(int(i), ())]
            for x in sids:  # every rule that took effect, as Suricata logs every alert
                counts[(VERDICT_NAMES[by_sid[x].action], x)] += 1
            if e:
                enc[ENC_NAMES[e]] += 1
            if args.json:
                print(
                    json.dumps(
                        {
                            "packet": lo + int(i),
                            "verdict": VERDICT_NAMES[v],
                            "sid": sid or None,
                            "msg": by_sid[sid].msg if sid in by_sid else None,
                            "matches": int(r.alerts[i]),
                            "sids": sids,
                            "uninspectable": ENC_NAMES[e],
                        }
                    )
                )
    if not args.json:
        print(f"{len(batch)} packets, {len(sigs)} rules")
        for (verdict, sid), n in sorted(counts.items(), key=lambda x: -x[1]):
            print(f"  {verdict:5} sid {sid:<10} {n:8} packets  {by_sid[sid].msg}")
        for name, n in sorted(enc.items()):
            print(f"  uninspectable ({name}): {n} packets")
    return 0


def run_offload(args) -> int:
    from ..cache.key import build_keys
    from ..packet.parse import parse
    from .handoff import FlowInspector
    from .table import FastPathTable

    for name in ("capacity", "n_inspect", "batch"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    if args.rate <= 0 or (args.burst is not None and args.burst < 1):
        raise InputError("--rate must be positive and --burst at least 1")
    sigs = _load(args.rules, args.var, False) if args.rules else None
    from ..io.pcap import read_capture

    batch = read_capture(args.capture)
    table = FastPathTable(args.capacity, args.rate, args.burst)
    fi = FlowInspector(sigs, table, n_inspect=args.n_inspect, elephant_bytes=args.elephant_bytes)
    dropped = 0
    for sub in batch.chunks(args.batch):
        k = parse(sub)
        kmat, _, valid = build_keys(k, sub.port)
        flow = table.flow_keys(kmat, valid)
        hit, _, _ = table.lookup(kmat, valid, sub.wire_len, sub.ts, flow)
        res = fi.process(sub, k, kmat, valid, ~hit, None, flow)
        dropped += int(res.drop.sum())
    st = fi.stats()
    t = st.pop("table")
    report = {
        "packets": int(len(batch)),
        "fast_path": {
            "packet_share": t["packet_share"],
            "byte_share": t["byte_share"],
            "occupancy": t["occupancy"],
            "capacity": t["capacity"],
            "inserts": t["inserts"],
            "refused": t["refused"],
            "exceptions": t["exceptions"],
        },
        "inspected_packets": st["inspected"],
        "dropped_by_signature": dropped,
        "flows": st["flows"],
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    fp = report["fast_path"]
    print(
        f"{report['packets']} packets; fast path carried {fp['packet_share']:.1%} of packets and "
        f"{fp['byte_share']:.1%} of bytes"
    )
    print(
        f"fast-path table: {fp['occupancy']}/{fp['capacity']} flows, {fp['inserts']} inserts, refused: "
        + ", ".join(f"{k} {v}" for k, v in fp["refused"].items())
    )
    print(f"inspected {report['inspected_packets']} packets, dropped {dropped} by signatures")
    print("flows: " + ", ".join(f"{k} {v}" for k, v in report["flows"].items()))
    return 0
