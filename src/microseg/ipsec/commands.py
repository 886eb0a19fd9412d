"""`microseg ipsec ...`: list SAs, ESP-encrypt or -decrypt a capture (tunnel mode, AES-GCM)."""

from __future__ import annotations

import json
import os
import sys

from ..errors import InputError
from .esp import REASONS


def _load(path):
    from .sa import load_config

    return load_config(path)


def _limit(v, seconds: bool = False) -> str:
    """A lifetime limit for the table: '-' for none, else a short number (10k, 1.5M, 2G)."""
    if not v:
        return "-"
    if seconds:
        return f"{v:g}"
    for div, unit in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if v >= div and (v * 10) % div == 0:
            q = v / div
            return f"{q:g}{unit}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def cmd_sa_list(args) -> int:
    cfg = _load(args.sa)
    rows = [sa.summary() for sa in cfg.sas]
    if args.json:
        pols = [
            {
                "name": p.name,
                "src": str(p.src) if p.src else "any",
                "dst": str(p.dst) if p.dst else "any",
                "proto": p.proto,
                "action": ("protect", "bypass", "discard")[p.action],
                "sa": p.sa,
            }
            for p in cfg.policies
        ]
        print(json.dumps({"sas": rows, "policies": pols}, indent=1))
        return 0
    print(
        f"{'name':<12} {'spi':>10} {'aead':<12} {'tunnel':<40} {'esn':<4} {'window':>6} "
        f"{'bytes soft/hard':>17} {'packets soft/hard':>17} {'seconds soft/hard':>17}"
    )
    for r in rows:
        tunnel = f"{r['tunnel_src']} -> {r['tunnel_dst']}"
        life = r["lifetime"]
        limits = " ".join(
            f"{_limit(life['soft_' + k], k == 'seconds')}/{_limit(life['hard_' + k], k == 'seconds')}".rjust(
                17
            )
            for k in ("bytes", "packets", "seconds")
        )
        print(
            f"{r['name']:<12} {r['spi']:#010x} {r['aead']:<12} {tunnel:<40} "
            f"{'yes' if r['esn'] else 'no':<4} {r['replay_window']:>6} {limits}"
        )
        if r["esn_resync"]:
            print(
                f"{'':<12} ESN re-synchronisation after {r['esn_resync']['after']} consecutive "
                f"authentication failures, {r['esn_resync']['tries']} high-order value(s) tried"
            )
    for p in cfg.policies:
        what = ("protect via " + p.sa) if p.sa else ("bypass", "bypass", "discard")[p.action]
        print(
            f"policy {p.name}: {p.src or 'any'} -> {p.dst or 'any'} proto "
            f"{'any' if p.proto < 0 else p.proto}: {what}"
        )
    return 0


def _run(args, encrypt: bool) -> int:
    from ..io.pcap import PcapWriter, iter_capture
    from .gateway import EspGateway

    cfg = _load(args.sa)
    sa = None
    if encrypt:
        if args.use is not None:
            cfg.by_name(args.use)
            sa = args.use
        elif not cfg.policies:
            if len(cfg.sas) != 1:
                raise InputError("several SAs and no policies: name the SA with --use", path=cfg.path)
            sa = cfg.sas[0].name
    for path in args.input:  # fail before the output file is created
        if not os.path.isfile(path):
            raise InputError("no such capture file", path=path)
    gw = EspGateway(cfg)
    n_in = n_out = 0
    with PcapWriter(args.write) as w:
        for path in args.input:  # several inputs: one gateway, in the order given
            for batch in iter_capture(path, batch_size=args.batch):
                n_in += len(batch)
                out = gw.encrypt_batch(batch, sa=sa) if encrypt else gw.decrypt_batch(batch)[0]
                n_out += len(out)
                w.write(out)
    drops = gw.drop_counts()["encrypt" if encrypt else "decrypt"]
    report = {
        "packets_in": n_in,
        "packets_out": n_out,
        "dropped": drops,
        "sas": [s for s in gw.sa_stats() if s["tx_packets"] or s["rx_packets"]],
        "lifetime_events": [e.as_dict() for e in gw.events],
    }
    if any(gw.resync_counts.values()):
        report["esn_resync"] = dict(gw.resync_counts)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        verb = "encrypted" if encrypt else "decrypted"
        print(
            f"{n_in} packets in, {n_out} {verb}, {n_in - n_out} dropped"
            + (": " + ", ".join(f"{k} {v}" for k, v in sorted(drops.items())) if drops else ""),
            file=sys.stderr,
        )
        for e in gw.events:
            print(
                f"SA {e.sa} ({e.spi:#010x}): {e.kind} lifetime reached ({e.limit}, "
                f"{e.direction}) at {e.at / 1e9:.6f}",
                file=sys.stderr,
            )
    return 0


def cmd_encrypt(args) -> int:
    return _run(args, True)


def cmd_decrypt(args) -> int:
    return _run(args, False)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ipsec",
        help="IPsec ESP tunnel gateway (AES-GCM, RFC 4106)",
        description="ESP tunnel mode with AES-GCM: list SAs, encrypt or "
        "decrypt a capture. Keys are never printed.",
    )
    sub = p.add_subparsers(dest="ipsec_verb", metavar="ACTION")
    sub.required = True
    sa = sub.add_parser("sa", help="security associations")
    sa_sub = sa.add_subparsers(dest="sa_verb", metavar="ACTION")
    sa_sub.required = True
    ls = sa_sub.add_parser("list", help="list the SAs and policies of an SA file (no keys)")
    ls.add_argument("--sa", required=True, metavar="FILE", help="SA file (YAML or JSON)")
    ls.add_argument("--json", action="store_true", help="JSON output")
    ls.set_defaults(func=cmd_sa_list)
    for name, func, what in (
        ("encrypt", cmd_encrypt, "ESP-encapsulate the packets of a capture"),
        ("decrypt", cmd_decrypt, "decapsulate the ESP packets of a capture"),
    ):
        c = sub.add_parser(name, help=what, description=what + ". Drops are counted by reason.")
        c.add_argument("--sa", required=True, metavar="FILE", help="SA file (YAML or JSON)")
        c.add_argument(
            "input",
            metavar="IN.pcap",
            nargs="+",
            help="input captures (pcap or pcapng), processed in order by one gateway",
        )
        c.add_argument("-w", "--write", required=True, metavar="OUT.pcap", help="output pcap")
        if name == "encrypt":
            c.add_argument(
                "--use", metavar="NAME", help="protect every packet with this SA instead of the policies"
            )
        c.add_argument("--batch", type=int, default=256, help="packets per batch (default 256)")
        c.add_argument("--json", action="store_true", help="print the report as JSON")
        c.set_defaults(func=func)


__all__ = ["register", "REASONS"]
