"""`microseg encap` and `microseg decap`: overlay tunnels over capture files."""

from __future__ import annotations

import json
import sys

import numpy as np

from ..errors import InputError
from ..io.pcap import PcapWriter, iter_capture
from ..packet.batch import Batch
from .tunnel import DECAP_INNER_MIX, DECAP_NAMES, KINDS, decap, encap

CHUNK = 4096


def register(sub) -> None:
    p = sub.add_parser(
        "encap",
        help="wrap every frame of a capture in a VXLAN/GENEVE/NVGRE tunnel",
        description="Encapsulate each frame of IN in outer Ethernet / IP / UDP "
        "(VXLAN, GENEVE) or GRE (NVGRE) headers and write OUT as pcap. "
        "The UDP source port (NVGRE FlowID) follows the inner flow.",
    )
    p.add_argument("input", metavar="IN", help="pcap or pcapng file")
    p.add_argument("-w", "--write", required=True, metavar="OUT", help="output pcap file")
    p.add_argument("--type", required=True, choices=sorted(KINDS), dest="kind", help="tunnel type")
    p.add_argument("--vni", required=True, type=int, help="VNI (VXLAN/GENEVE) or VSID (NVGRE), 0..16777215")
    p.add_argument("--local", required=True, metavar="IP", help="outer source address (IPv4 or IPv6)")
    p.add_argument("--remote", required=True, metavar="IP", help="outer destination address")
    p.add_argument("--local-mac", default="02:00:00:00:00:01", help="outer source MAC")
    p.add_argument("--remote-mac", default="02:00:00:00:00:02", help="outer destination MAC")
    p.add_argument("--ttl", type=int, default=64, help="outer TTL / hop limit (default 64)")
    p.add_argument("--nanosecond", action="store_true", help="write nanosecond timestamps")
    p.set_defaults(func=run_encap)

    d = sub.add_parser(
        "decap",
        help="strip the outer tunnel of every packet of a capture",
        description="Strip the outermost VXLAN / GENEVE / NVGRE tunnel of each "
        "packet of IN, write the inner frames to OUT as pcap, and "
        "report packets per tenant; packets that are not tunnelled "
        "or are malformed are counted by reason, not written.",
    )
    d.add_argument("input", metavar="IN", help="pcap or pcapng file")
    d.add_argument("-w", "--write", required=True, metavar="OUT", help="output pcap file")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.add_argument("--nanosecond", action="store_true", help="write nanosecond timestamps")
    d.set_defaults(func=run_decap)


def _check_args(args):
    if not 0 <= args.vni <= 0xFFFFFF:
        raise InputError(f"--vni {args.vni}: must lie in 0..16777215")
    if not 1 <= args.ttl <= 255:
        raise InputError(f"--ttl {args.ttl}: must lie in 1..255")
    from ..packet.build import mac

    for name in ("local_mac", "remote_mac"):
        try:
            mac(getattr(args, name))
        except ValueError:
            raise InputError(
                f"--{name.replace('_', '-')} {getattr(args, name)!r}: not a MAC address"
            ) from None


def run_encap(args) -> int:
    _check_args(args)
    n = 0
    with PcapWriter(args.write, nanosecond=args.nanosecond) as w:
        for chunk in iter_capture(args.input, CHUNK):
            out = encap(
                chunk,
                args.kind,
                args.vni,
                args.local,
                args.remote,
                src_mac=args.local_mac,
                dst_mac=args.remote_mac,
                ttl=args.ttl,
            )
            w.write(out)
            n += len(out)
    print(
        f"encapsulated {n} packets in {args.kind} (VNI {args.vni}, {args.local} -> "
        f"{args.remote}) to {args.write}"
    )
    return 0


def run_decap(args) -> int:
    total = 0
    written = 0
    tenants: dict[int, int] = {}
    errors: dict[str, int] = {}
    with PcapWriter(args.write, nanosecond=args.nanosecond) as w:
        for chunk in iter_capture(args.input, CHUNK):
            r = decap(chunk)
            inner, tenant, err = r
            total += len(chunk)
            ok = err == 0
            if ok.any() and w.linktype is not None and inner.linktype != w.linktype:
                err = err.copy()
                err[ok] = DECAP_INNER_MIX  # this chunk's inner kind differs from the file's
                ok[:] = False
            if ok.any():
                idx = np.flatnonzero(ok)
                w.write(
                    Batch(
                        inner.data,
                        inner.offset[idx],
                        inner.length[idx],
                        inner.wire_len[idx],
                        inner.port[idx],
                        inner.ts[idx],
                        inner.linktype,
                    )
                )
                written += int(ok.sum())
                vals, cnt = np.unique(tenant[ok], return_counts=True)
                for v, c in zip(vals.tolist(), cnt.tolist()):
                    tenants[v] = tenants.get(v, 0) + c
            ev, ec = np.unique(err[~ok], return_counts=True)
            for v, c in zip(ev.tolist(), ec.tolist()):
                errors[DECAP_NAMES[v]] = errors.get(DECAP_NAMES[v], 0) + c
    report = {"packets": total, "decapsulated": written, "tenants": tenants, "not_decapsulated": errors}
    if args.json:
        json.dump(
            {**report, "tenants": {str(k): v for k, v in sorted(tenants.items())}}, sys.stdout, indent=2
        )
        sys.stdout.write("\n")
    else:
        print(f"decapsulated {written} of {total} packets to {args.write}")
        for t, c in sorted(tenants.items()):
            print(f"  tenant {t}: {c}")
        for reason, c in sorted(errors.items()):
            print(f"  not decapsulated ({reason}): {c}")
    return 0
