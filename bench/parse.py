"""Parser throughput: packets per second on one core, 256-packet batches, against a per-packet
Python baseline (dpkt) and our own plain-Python reference in the same run.

Traffic kinds: 64-byte IPv4/TCP, 1514-byte IPv4/TCP, IPv6/UDP, and VXLAN-encapsulated IPv4/TCP
(4096 flows each). Rates are given from memory (batches already in RAM) and from a pcap file
(read + parse). Both wall-clock and this thread's CPU time are reported: the CPU-time rate is
what one core does when the machine is shared. Writes ``bench/results/parse.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from microseg.io.pcap import iter_capture, read_capture, write_pcap
from microseg.packet import build as PB
from microseg.packet.batch import Batch, FlowKeys
from microseg.packet.parse import _parse_kernel, parse
from microseg.packet.parse_ref import parse_packet_ref

BATCH = 256
FLOWS = 4096


def _frame(kind: str, sport: int) -> bytes:
    a4, b4 = "10.0.%d.%d" % (sport >> 8 & 255, sport & 255), "192.168.1.1"
    if kind == "ipv4_tcp_64":
        return PB.ethernet(PB.ipv4(a4, b4, 6, PB.tcp(sport, 443, b"\0" * 10, src=a4, dst=b4)))
    if kind == "ipv4_tcp_1514":
        return PB.ethernet(PB.ipv4(a4, b4, 6, PB.tcp(sport, 443, b"\0" * 1460, src=a4, dst=b4)))
    if kind == "ipv6_udp_128":
        a6, b6 = "2001:db8::%x" % sport, "2001:db8:1::1"
        return PB.ethernet(PB.ipv6(a6, b6, 17, PB.udp(sport, 53, b"\0" * 66, src=a6, dst=b6)))
    if kind == "vxlan_ipv4_tcp_114":
        inner = PB.ethernet(PB.ipv4(a4, b4, 6, PB.tcp(sport, 443, b"\0" * 10, src=a4, dst=b4)))
        vx = bytes((0x08, 0, 0, 0)) + (1000 + sport % 16).to_bytes(3, "big") + b"\0"
        return PB.ethernet(
            PB.ipv4(
                "192.0.2.1",
                "192.0.2.2",
                17,
                PB.udp(49152 + sport % 16384, 4789, vx + inner, src="192.0.2.1", dst="192.0.2.2"),
            )
        )
    raise ValueError(kind)


KINDS = ("ipv4_tcp_64", "ipv4_tcp_1514", "ipv6_udp_128", "vxlan_ipv4_tcp_114")


def traffic(kind: str, n: int) -> Batch:
    frames = [_frame(kind, 1024 + f) for f in range(FLOWS)]
    order = np.random.default_rng(1).integers(0, FLOWS, n)
    return Batch.from_packets([frames[i] for i in order])


def timed(fn, repeat: int):
    """Best (wall, cpu) seconds of ``repeat`` runs: the least disturbed by other load."""
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - t0)
    return min(wall), min(cpu)


def dpkt_parse(packets, vxlan: bool):
    """What a per-packet Python parser does for the same fields (dpkt decodes, we pick fields)."""
    import dpkt

    out = 0
    for buf in packets:
        eth = dpkt.ethernet.Ethernet(buf)
        ip = eth.data
        l4 = ip.data
        if vxlan and isinstance(l4, dpkt.udp.UDP) and l4.dport == 4789:
            vni = int.from_bytes(l4.data[4:7], "big")
            ip = dpkt.ethernet.Ethernet(l4.data[8:]).data
            l4 = ip.data
            out += vni
        out += hash((ip.src, ip.dst, ip.p if hasattr(ip, "p") else ip.nxt, l4.sport, l4.dport))
    return out


def machine() -> dict:
    info = {"python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in lscpu.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU(s)", "Hypervisor vendor", "L2 cache"):
                info[k.strip()] = v.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small run (seconds)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "parse.json"))
    args = ap.parse_args()
    n = 32_768 if args.quick else 262_144
    n_slow = 2_000 if args.quick else 20_000
    repeat = 3 if args.quick else 7
    keys = FlowKeys(BATCH)
    res = {
        "machine": machine(),
        "batch": BATCH,
        "packets": n,
        "flows": FLOWS,
        "timer": "best of %d runs; *_cpu uses this thread's CPU time" % repeat,
        "rows": [],
    }

    # per-call cost: parse() of an empty batch (Python wrapper + Numba dispatch, no packets)
    empty = Batch.from_packets([])
    parse(empty, keys)
    calls = 20_000 if not args.quick else 2_000
    w, c = timed(lambda: [parse(empty, keys) for _ in range(calls)], repeat)
    res["call_overhead_us"] = {"wall": w / calls * 1e6, "cpu": c / calls * 1e6}
    a = keys.arrays()
    w, c = timed(
        lambda: [
            _parse_kernel(empty.data, empty.offset, empty.length, empty.wire_len, 1, *a) for _ in range(calls)
        ],
        repeat,
    )
    res["kernel_dispatch_us"] = {"wall": w / calls * 1e6, "cpu": c / calls * 1e6}
    print(
        f"per call: parse() {res['call_overhead_us']['cpu']:.2f} us, bare kernel dispatch "
        f"{res['kernel_dispatch_us']['cpu']:.2f} us (CPU time)",
        flush=True,
    )

    with tempfile.TemporaryDirectory() as tmp:
        for kind in KINDS:
            batch = traffic(kind, n)
            chunks = list(batch.chunks(BATCH))
            parse(chunks[0], keys)
            assert (parse(batch).error == 0).all()

            def mem():
                for ch in chunks:
                    parse(ch, keys)

            mw, mc = timed(mem, repeat)

            big = FlowKeys(4096)
            big_chunks = list(batch.chunks(4096))

            def mem4096():
                for ch in big_chunks:
                    parse(ch, big)

            bw, bc = timed(mem4096, repeat)

            path = Path(tmp) / f"{kind}.pcap"
            write_pcap(path, batch)
            read_capture(path)

            def from_file():
                b = read_capture(path)
                for ch in b.chunks(BATCH):
                    parse(ch, keys)

            fw, fc = timed(from_file, max(2, repeat // 2))

            def streamed():
                for b in iter_capture(path, batch_size=BATCH):
                    parse(b, keys)

            sw, sc = timed(streamed, max(2, repeat // 2))

            pk = [batch.packet(i) for i in range(n_slow)]
            dw, dc = timed(lambda: dpkt_parse(pk, kind.startswith("vxlan")), 2)
            rw, rc = timed(lambda: [parse_packet_ref(p) for p in pk], 1)

            row = {
                "kind": kind,
                "frame_bytes": int(batch.length[0]),
                "mem_mpps": n / mw / 1e6,
                "mem_mpps_cpu": n / mc / 1e6,
                "mem_batch4096_mpps_cpu": n / bc / 1e6,
                "pcap_read_parse_mpps": n / fw / 1e6,
                "pcap_read_parse_mpps_cpu": n / fc / 1e6,
                "pcap_stream256_mpps_cpu": n / sc / 1e6,
                "dpkt_mpps": n_slow / dw / 1e6,
                "dpkt_mpps_cpu": n_slow / dc / 1e6,
                "python_ref_mpps_cpu": n_slow / rc / 1e6,
            }
            row["speedup_vs_dpkt_cpu"] = row["mem_mpps_cpu"] / row["dpkt_mpps_cpu"]
            res["rows"].append(row)
            print(
                f"{kind:20s} memory {row['mem_mpps_cpu']:6.1f} Mpps cpu ({row['mem_mpps']:5.1f} wall)"
                f" | 4096-batches {row['mem_batch4096_mpps_cpu']:6.1f}"
                f" | pcap read+parse {row['pcap_read_parse_mpps_cpu']:5.1f}"
                f" (streamed {row['pcap_stream256_mpps_cpu']:4.1f})"
                f" | dpkt {row['dpkt_mpps_cpu']:5.3f} | ref {row['python_ref_mpps_cpu']:5.3f}"
                f" | x{row['speedup_vs_dpkt_cpu']:.0f} vs dpkt",
                flush=True,
            )

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
