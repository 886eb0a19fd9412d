"""Capture I/O, packet building and overlay tunnels: throughput against peers in the same run.

Peers: dpkt's pcap / pcapng readers and pcap writer, scapy (rdpcap, packet building), and our
own plain-Python references (one packet at a time) for encap / decap. Writes
``bench/results/io_overlay.json``; ``--quick`` makes a small run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from microseg.io.pcap import iter_capture, read_capture, write_pcap
from microseg.overlay import decap, encap, ref
from microseg.packet import build as B
from microseg.packet.parse import parse


def best(fn, repeat=3):
    """Best wall time of ``repeat`` runs (the least disturbed by other load)."""
    t = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return min(t)


def traffic(n, seed=1):
    rng = np.random.default_rng(seed)
    return B.build_batch(
        n,
        rng.integers(0x0A000000, 0x0AFFFFFF, n, dtype=np.uint64),
        rng.integers(0xC0A80000, 0xC0A8FFFF, n, dtype=np.uint64),
        6,
        rng.integers(1024, 65535, n),
        443,
        rng.integers(0, 1400, n),
        ts=1_700_000_000 * 10**9 + np.arange(n) * 1000,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small run (seconds)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "io_overlay.json"))
    args = ap.parse_args()
    n = 20_000 if args.quick else 100_000
    n_slow = 1_000 if args.quick else 3_000  # for the per-packet Python peers
    import dpkt
    from scapy.all import rdpcap
    from scapy.layers.inet import IP, TCP, Ether
    from scapy.packet import Raw

    res = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "packets": n,
        "peer_packets_per_packet_python": n_slow,
        "rows": [],
    }

    def row(name, ours_s, ours_n, peer, peer_s, peer_n):
        ours_pps = ours_n / ours_s
        peer_pps = peer_n / peer_s
        r = {
            "what": name,
            "ours_pps": ours_pps,
            "peer": peer,
            "peer_pps": peer_pps,
            "speedup": ours_pps / peer_pps,
        }
        res["rows"].append(r)
        print(
            f"{name:34s} ours {ours_pps / 1e6:8.3f} Mpps   {peer:28s} {peer_pps / 1e6:8.3f} Mpps"
            f"   x{r['speedup']:.1f}",
            flush=True,
        )

    batch = traffic(n)
    with tempfile.TemporaryDirectory() as d:
        pcap = Path(d) / "t.pcap"
        write_pcap(pcap, batch.slice(0, 10))
        read_capture(pcap)
        write_pcap(pcap, batch)
        pcapng = Path(d) / "t.pcapng"
        with open(pcapng, "wb") as f:
            w = dpkt.pcapng.Writer(f)
            for i in range(n):
                w.writepkt(batch.packet(i), ts=1_700_000_000 + i * 1e-6)
        read_capture(pcapng)

        def dpkt_read(path, reader):
            with open(path, "rb") as f:
                for _ in reader(f):
                    pass

        t = best(lambda: read_capture(pcap))
        row("read pcap", t, n, "dpkt.pcap.Reader", best(lambda: dpkt_read(pcap, dpkt.pcap.Reader)), n)
        t = best(lambda: read_capture(pcapng))
        row("read pcapng", t, n, "dpkt.pcapng.Reader", best(lambda: dpkt_read(pcapng, dpkt.pcapng.Reader)), n)
        t = best(lambda: sum(len(b) for b in iter_capture(pcap, 256)))
        small = Path(d) / "s.pcap"
        write_pcap(small, batch.slice(0, n_slow))
        row(
            "iter pcap (256-packet batches)",
            t,
            n,
            "scapy rdpcap",
            best(lambda: rdpcap(str(small)), 1),
            n_slow,
        )

        out = Path(d) / "o.pcap"

        def dpkt_write():
            with open(out, "wb") as f:
                w = dpkt.pcap.Writer(f)
                for i in range(n):
                    w.writepkt(batch.packet(i), ts=i * 1e-6)

        row("write pcap", best(lambda: write_pcap(out, batch)), n, "dpkt.pcap.Writer", best(dpkt_write), n)

    rng = np.random.default_rng(2)
    src = rng.integers(0x0A000000, 0x0AFFFFFF, n, dtype=np.uint64)
    sport = rng.integers(1024, 65535, n)
    plen = rng.integers(0, 1400, n)
    B.build_batch(4, src[:4], "10.9.9.9", 6, sport[:4], 80, plen[:4])

    def scapy_build():
        for i in range(n_slow):
            bytes(
                Ether()
                / IP(src="10.0.0.1", dst="10.9.9.9")
                / TCP(sport=int(sport[i]), dport=80)
                / Raw(bytes(int(plen[i])))
            )

    def builders():
        for i in range(n_slow):
            B.tcp_packet("10.0.0.1", "10.9.9.9", int(sport[i]), 80, bytes(int(plen[i])))

    t = best(lambda: B.build_batch(n, src, "10.9.9.9", 6, sport, 80, plen))
    row("build_batch TCP/IPv4", t, n, "scapy build", best(scapy_build, 1), n_slow)
    row("build_batch TCP/IPv4", t, n, "our one-off builders", best(builders, 1), n_slow)

    ends = ("192.0.2.1", "198.51.100.2")
    ends6 = ("2001:db8::1", "2001:db8::2")
    small = batch.slice(0, n_slow)
    ent = parse(small).flow_hash
    for kind in ("vxlan", "geneve", "nvgre"):
        for e in (ends, ends6):
            encap(batch.slice(0, 4), kind, 5, *e)
            t = best(lambda: encap(batch, kind, 5, *e))
            fam = "v6" if ":" in e[0] else "v4"

            def ref_encap():
                for i in range(n_slow):
                    ref.encap_one(small.packet(i), kind, 5, *e, int(ent[i]))

            row(f"encap {kind}/{fam} (incl. parse)", t, n, "per-packet reference", best(ref_encap, 1), n_slow)
    ent_all = parse(batch).flow_hash
    t = best(lambda: encap(batch, "vxlan", 5, *ends, entropy=ent_all))

    def ref_encap_given():
        for i in range(n_slow):
            ref.encap_one(small.packet(i), "vxlan", 5, *ends, int(ent[i]))

    row("encap vxlan/v4 (hash given)", t, n, "per-packet reference", best(ref_encap_given, 1), n_slow)
    for kind in ("vxlan", "geneve", "nvgre"):
        enc = encap(batch, kind, 5, *ends)
        enc_small = enc.slice(0, n_slow)
        decap(enc.slice(0, 4))
        t = best(lambda: decap(enc))

        def ref_decap():
            for i in range(n_slow):
                ref.decap_one(enc_small.packet(i), 1)

        row(f"decap {kind}/v4", t, n, "per-packet reference", best(ref_decap, 1), n_slow)

    avg = float(batch.length.mean())
    res["avg_packet_bytes"] = avg
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"average packet {avg:.0f} bytes; wrote {args.out}")


if __name__ == "__main__":
    main()
