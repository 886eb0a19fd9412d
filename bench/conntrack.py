"""Connection tracking benchmark: new connections/s and established-connection packets/s on one
core at several table sizes, bytes per connection, and a Python dict-based tracker (the
plain-Python reference) as the baseline in the same run.

Packets are synthetic parsed keys (TCP over IPv4, distinct flows), so the numbers are those of
the tracker alone: parsing and checksums are measured by their own benchmarks. Rates are
given per second of the process's CPU time (the machine is shared, so wall time over-counts
whenever another process holds the core) and per wall second.

    python bench/conntrack.py            # 10K, 1M and 10M connections (about 3 minutes)
    python bench/conntrack.py --quick    # 10K and 100K
    python bench/conntrack.py --connections 1000000 --out /tmp/ct.json   # one size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from numba import njit

from microseg.conntrack import ConntrackTable
from microseg.conntrack.reference import ReferenceConntrack
from microseg.packet import batch as B
from microseg.packet.batch import Batch, FlowKeys

SYN, SYNACK, ACK, DATA = 0, 1, 2, 3
NS = 1_000_000_000


@njit(cache=True)
def fill_keys(u64, u32, i32, u16, u8, flows, start, n, kind, rnd):
    """Keys of packets for ``flows[start:start+n]``: flow i is 10.x.y.z:port -> 192.0.2.1:80."""
    for j in range(n):
        f = flows[start + j]
        a = np.uint64(0xFFFF00000000 | (0x0A000000 + (f >> 14)))
        b = np.uint64(0xFFFF00000000 | 0xC0000201)
        sp = 1024 + (f & 0x3FFF)
        rev = kind == SYNACK
        u64[B.SRC_LO, j] = b if rev else a
        u64[B.DST_LO, j] = a if rev else b
        u64[B.SRC_HI, j] = 0
        u64[B.DST_HI, j] = 0
        u16[B.SPORT, j] = 80 if rev else sp
        u16[B.DPORT, j] = sp if rev else 80
        u16[B.TCP_WIN, j] = 65535
        u8[B.IP_VER, j] = 4
        u8[B.PROTO, j] = 6
        u8[B.FLAGS, j] = B.F_PORTS
        u8[B.TCP_DOFF, j] = 20
        u8[B.ERROR, j] = 0
        i32[B.TENANT, j] = -1
        i32[B.L3_OFF, j] = 14
        i32[B.L4_OFF, j] = 34
        if kind == SYN:
            u8[B.TCP_FLAGS, j] = 0x02
            u32[B.TCP_SEQ, j] = 1000
            u32[B.TCP_ACK, j] = 0
            i32[B.PAYLOAD_LEN, j] = 0
        elif kind == SYNACK:
            u8[B.TCP_FLAGS, j] = 0x12
            u32[B.TCP_SEQ, j] = 5000
            u32[B.TCP_ACK, j] = 1001
            i32[B.PAYLOAD_LEN, j] = 0
        elif kind == ACK:
            u8[B.TCP_FLAGS, j] = 0x10
            u32[B.TCP_SEQ, j] = 1001
            u32[B.TCP_ACK, j] = 5001
            i32[B.PAYLOAD_LEN, j] = 0
        else:
            u8[B.TCP_FLAGS, j] = 0x18
            u32[B.TCP_SEQ, j] = 1001 + 100 * rnd
            u32[B.TCP_ACK, j] = 5001
            i32[B.PAYLOAD_LEN, j] = 100


def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        model, cpus = info.get("Model name", "").strip(), info.get("CPU(s)", "").strip()
    except (OSError, subprocess.SubprocessError):
        model, cpus = platform.processor(), str(os.cpu_count())
    return {"cpu": model, "cpus": cpus, "python": platform.python_version()}


class Runner:
    """Feeds a tracker batches of synthetic keys; times only the tracker's calls."""

    def __init__(self, batch_size: int):
        self.bs = batch_size
        self.keys = FlowKeys(batch_size).resize(batch_size)
        n = batch_size
        self.batch = Batch(
            np.zeros(64, np.uint8),
            np.zeros(n, np.int64),
            np.full(n, 54, np.int32),
            np.full(n, 54, np.int32),
            np.zeros(n, np.uint16),
            np.zeros(n, np.int64),
        )
        self.ok = np.ones(n, np.bool_)

    def run(self, tracker, flows, kind, now, rnd=0):
        cpu = wall = 0.0
        k, bs = self.keys, self.bs
        states = np.zeros(256, np.int64)
        for s in range(0, flows.shape[0], bs):
            n = min(bs, flows.shape[0] - s)
            k.resize(n)
            fill_keys(*k.arrays(), flows, s, n, kind, rnd)
            b = self.batch if n == bs else self.batch.slice(0, n)
            c0, w0 = time.process_time(), time.perf_counter()
            out = tracker.process(b, k, now_ns=now, csum_ok=self.ok[:n])
            cpu += time.process_time() - c0
            wall += time.perf_counter() - w0
            states += np.bincount(out, minlength=256)
        return cpu, wall, states


def bench_size(n: int, batch_size: int, lookups: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    r = Runner(batch_size)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = ConntrackTable(capacity=n, expire_budget=64)
    flows = np.arange(n, dtype=np.int64)
    warm = ConntrackTable(capacity=1024)  # compile outside the timed runs
    r.run(warm, flows[:1024], SYN, NS)
    cpu_new, wall_new, st = r.run(t, flows, SYN, NS)
    assert st[33] == n and len(t) == n, "every SYN opens a connection"
    r.run(t, flows, SYNACK, NS)
    r.run(t, flows, ACK, NS)
    pick = rng.integers(0, n, lookups)
    cpu_est, wall_est, st = r.run(t, pick, DATA, 2 * NS, rnd=1)
    assert st[34] == lookups, "every data packet is ESTABLISHED"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "connections": n,
        "batch": batch_size,
        "lookups": int(lookups),
        "new_per_s_cpu": n / cpu_new,
        "new_per_s_wall": n / wall_new,
        "established_per_s_cpu": lookups / cpu_est,
        "established_per_s_wall": lookups / wall_est,
        "table_bytes": t.nbytes,
        "bytes_per_connection": t.nbytes / n,
        "rss_growth_bytes": (rss - rss0) * 1024,
    }


def bench_baseline(n: int, batch_size: int, lookups: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    r = Runner(batch_size)
    ref = ReferenceConntrack()
    flows = np.arange(n, dtype=np.int64)
    cpu_new, wall_new, _ = r.run(ref, flows, SYN, NS)
    r.run(ref, flows, SYNACK, NS)
    r.run(ref, flows, ACK, NS)
    cpu_est, wall_est, st = r.run(ref, rng.integers(0, n, lookups), DATA, 2 * NS, rnd=1)
    assert st[34] == lookups
    return {
        "connections": n,
        "new_per_s_cpu": n / cpu_new,
        "new_per_s_wall": n / wall_new,
        "established_per_s_cpu": lookups / cpu_est,
        "established_per_s_wall": lookups / wall_est,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10K and 100K connections only")
    ap.add_argument("--batch", type=int, default=1024, help="packets per process() call")
    ap.add_argument(
        "--connections",
        type=int,
        nargs="+",
        metavar="N",
        help="table sizes to measure instead of the default ones (the first also gives the speed-up line)",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "conntrack.json"))
    args = ap.parse_args(argv)
    sizes = [10_000, 100_000] if args.quick else [10_000, 1_000_000, 10_000_000]
    if args.connections:
        if any(n < 1024 for n in args.connections):
            ap.error("--connections: at least 1024 connections per table")
        sizes = args.connections
    res = {"machine": machine(), "batch": args.batch, "sizes": [], "baseline": None}
    base_n = 10_000
    res["baseline"] = bench_baseline(base_n, args.batch, base_n)
    print(
        f"python dict baseline, {base_n} connections: "
        f"{res['baseline']['new_per_s_cpu']:,.0f} new/s, "
        f"{res['baseline']['established_per_s_cpu']:,.0f} established pkts/s (CPU time)"
    )
    for n in sizes:
        row = bench_size(n, args.batch, min(n, 2_000_000) if n > 10_000 else 10 * n)
        res["sizes"].append(row)
        print(
            f"{n:>11,} connections: {row['new_per_s_cpu'] / 1e6:6.2f} M new/s "
            f"({row['new_per_s_wall'] / 1e6:.2f} wall), "
            f"{row['established_per_s_cpu'] / 1e6:6.2f} M established pkts/s "
            f"({row['established_per_s_wall'] / 1e6:.2f} wall), "
            f"{row['bytes_per_connection']:.0f} B/connection",
            flush=True,
        )
    small = res["sizes"][0]
    if small["connections"] == base_n:
        res["speedup_vs_baseline_at_10k"] = {
            "new": small["new_per_s_cpu"] / res["baseline"]["new_per_s_cpu"],
            "established": small["established_per_s_cpu"] / res["baseline"]["established_per_s_cpu"],
        }
        print(
            "speed-up over the dict baseline at 10K: "
            f"{res['speedup_vs_baseline_at_10k']['new']:.0f}x new, "
            f"{res['speedup_vs_baseline_at_10k']['established']:.0f}x established"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
