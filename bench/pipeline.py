"""Benchmark: the whole datapath (parse -> fast kernel: identities, conntrack, state verdicts,
counters -> slow path: caches, policy -> inspection/offload), one core, 1024-packet batches.

* the demo's traffic mix: the default configuration, the fast path disabled (every packet
  decided by the compiled policy, as the previous design did), caches and offload on;
* the demo's established traffic alone (replayed through the warm datapath);
* 10K, 1M and 10M connections (``--connections``): established traffic (one in-window data
  segment per connection, random order, for at most 2M connections drawn over all of them),
  new connections per second (the SYNs, each judged by the policy and committed) and a SYN
  flood towards a denied port, each beside bare conntrack on the same parsed packets and
  beside the fast path disabled; connections are set up one client's 60,000 at a time, so
  10M of them fit in a few GB (the tables themselves: 148 bytes per entry of capacity);
* sweeps the seed papers use: 1, 10, 100 and 1000 tunnels (one VNI per tenant) and 1K, 10K,
  24K, 36K, 48K and 64K rules, caches on and off.

Every figure is the median of ``--repeat`` timed runs over a fresh datapath after one warm-up
run (JIT compiled), timed as the process's CPU time (the datapath is single-threaded), which
keeps other load on a shared machine out of the figure. Results: bench/results/pipeline.json, docs/img/pipeline.png, and a table
printed in markdown for docs/benchmarks.md.

Usage: python bench/pipeline.py [--quick] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from microseg import ctstate  # noqa: E402
from microseg.conntrack.table import ConntrackTable, checksum_ok  # noqa: E402
from microseg.datapath import Datapath, DatapathConfig  # noqa: E402
from microseg.io.generator import generate, load_policy  # noqa: E402
from microseg.io.scenario import ScenarioConfig  # noqa: E402
from microseg.packet import build as PB  # noqa: E402
from microseg.packet.batch import Batch  # noqa: E402
from microseg.packet.parse import parse  # noqa: E402
from microseg.policy.compiler import compile_policy  # noqa: E402
from microseg.policy.model import load_policy as load_policy_file  # noqa: E402

RESULTS = os.path.join(HERE, "results", "pipeline.json")
PLOT = os.path.join(HERE, "..", "docs", "img", "pipeline.png")


def machine() -> str:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def timed(compiled, batch, cfg: DatapathConfig, repeat: int, warm=True) -> dict:
    """Median Mpps over fresh datapaths (after one warm-up run for the JIT)."""
    if warm:
        Datapath(compiled, cfg).process(batch.slice(0, min(len(batch), 4096)))
    rates = []
    stats = None
    for _ in range(repeat):
        dp = Datapath(compiled, cfg)
        t = time.process_time()
        dp.process(batch)
        el = time.process_time() - t
        rates.append(len(batch) / el / 1e6)
        stats = dp.stats()
    return {
        "mpps": statistics.median(rates),
        "runs": rates,
        "packets": len(batch),
        "levels": stats["levels"],
        "offload_share": stats["inspection"]["table"]["packet_share"],
    }


def established_replay(compiled, batch, cfg: DatapathConfig, repeat: int) -> dict:
    """Run ``batch`` once, then replay its ESTABLISHED packets through the warm datapath."""
    rates = []
    for _ in range(repeat):
        dp = Datapath(compiled, cfg)
        res = dp.process(batch)
        est = np.flatnonzero(((res.ct & ctstate.STATE_MASK) == ctstate.ESTABLISHED) & (res.verdict == 1))
        again = batch.select(est)
        t = time.process_time()
        r2 = dp.process(again)
        el = time.process_time() - t
        assert np.all(r2.verdict == 1), "established replay: every packet should pass"
        rates.append(len(again) / el / 1e6)
        stats = dp.stats()
    return {
        "mpps": statistics.median(rates),
        "runs": rates,
        "packets": int(est.size),
        "levels": stats["levels"],
    }


# ---------------------------------------------------------------------------------------------
# many connections: established traffic, new connections, the SYN flood
# ---------------------------------------------------------------------------------------------
PORTS = 60000  # connections per client workload (source ports 1024..)


def conn_policy_yaml(clients: int) -> str:
    """One tenant (untunnelled traffic is its own), ``clients`` client workloads and one
    server that admits TCP 443 from them; port 22 is denied (the SYN flood's target)."""
    lines = [
        "version: 1",
        "default_egress: allow",
        "untagged_tenant: t0",
        "tenants: [{name: t0, vni: 10000}]",
        "hosts: [{name: h0, address: 192.168.100.11}]",
        "security_groups:",
        "  - {name: srv, tenant: t0, rules: [{direction: ingress, protocol: tcp, port_range_min: 443, "
        "port_range_max: 443, remote_group_id: cli}]}",
        "  - {name: cli, tenant: t0, rules: [{direction: egress}]}",
        "workloads:",
        "  - {name: s, tenant: t0, host: h0, mac: '02:00:00:01:00:01', ipv4: 10.1.0.1, "
        "security_groups: [srv]}",
    ]
    for c in range(clients):
        lines.append(
            f"  - {{name: c{c}, tenant: t0, host: h0, mac: '02:00:00:02:{c >> 8 & 255:02x}:{c & 255:02x}', "
            f"ipv4: {_client_addr(c)}, security_groups: [cli]}}"
        )
    return "\n".join(lines) + "\n"


def _client_addr(c: int) -> str:
    return f"10.2.{c // 200}.{c % 200 + 1}"


def _client_macs(c: int) -> tuple[str, str]:
    return f"02:00:00:02:{c >> 8 & 255:02x}:{c & 255:02x}", "02:00:00:01:00:01"


def handshake(c: int, k: int, dport: int = 443) -> list:
    """The three-way handshakes of client ``c``'s ``k`` connections (source ports 1024..):
    its SYNs, the server's SYN-ACKs and the ACKs, one batch each."""
    sp = 1024 + np.arange(k)
    cm, sm = _client_macs(c)
    ca = _client_addr(c)
    kw: dict[str, Any] = {"eth_src": cm, "eth_dst": sm}
    back: dict[str, Any] = {"eth_src": sm, "eth_dst": cm}
    return [
        PB.build_batch(k, ca, "10.1.0.1", 6, sp, dport, 0, tcp_flags_=0x02, seq=1000, **kw),
        PB.build_batch(k, "10.1.0.1", ca, 6, dport, sp, 0, tcp_flags_=0x12, seq=5000, ack=1001, **back),
        PB.build_batch(k, ca, "10.1.0.1", 6, sp, dport, 0, tcp_flags_=0x10, seq=1001, ack=5001, **kw),
    ]


class Clock:
    """Packet timestamps that only move forward: 100 ns apart, 1 us between batches."""

    def __init__(self):
        self.t = 1_000_000_000

    def stamp(self, b):
        b.ts[:] = self.t + np.arange(len(b), dtype=np.int64) * 100
        self.t += len(b) * 100 + 1000
        return b


def setup_chunks(conns: int, clock: Clock, dport: int = 443):
    """Per client workload (60,000 connections each), its SYNs, SYN-ACKs and ACKs, time-stamped
    in the order they are yielded. Built one client at a time, so the set-up of 10M
    connections never holds more than one client's 180,000 packets."""
    for c in range(-(-conns // PORTS)):
        k = min(PORTS, conns - c * PORTS)
        yield [clock.stamp(b) for b in handshake(c, k, dport)]


def data_sample(conns: int, sample: int, clock: Clock, payload: int = 64):
    """One in-window data segment for each of ``sample`` connections drawn at random over all
    ``conns`` (all of them when ``sample >= conns``), in a random order."""
    rng = np.random.default_rng(5)
    pick = np.arange(conns) if sample >= conns else np.sort(rng.choice(conns, sample, replace=False))
    parts = []
    for c in np.unique(pick // PORTS):
        sp = 1024 + pick[pick // PORTS == c] - c * PORTS
        cm, sm = _client_macs(int(c))
        parts.append(
            PB.build_batch(
                sp.size,
                _client_addr(int(c)),
                "10.1.0.1",
                6,
                sp,
                443,
                payload,
                tcp_flags_=0x18,
                seq=1001,
                ack=5001,
                eth_src=cm,
                eth_dst=sm,
                fill=0x61,
            )
        )
    d = Batch.concat(parts, order=None)
    return clock.stamp(d.select(rng.permutation(len(d))))


def _cpu(f):
    t = time.process_time()
    out = f()
    return time.process_time() - t, out


def _chunks1024(b):
    """``b`` as the datapath's 1024-packet batches, parsed, with the checksum verdict given."""
    k = parse(b)
    return [
        (b.slice(s, min(s + 1024, len(b))), _sl(k, s, 1024), np.ones(min(1024, len(b) - s), np.bool_))
        for s in range(0, len(b), 1024)
    ]


EST_SAMPLE = 2_000_000  # established packets replayed at most (drawn over every connection)


def connections_case(conns: int, repeat: int, tmp: str) -> dict:
    """Through the whole datapath (default configuration), against bare conntrack and the
    fast path disabled on the same packets: new connections/s (the SYNs, each judged by the
    policy and committed), established traffic (data segments of up to ``EST_SAMPLE``
    connections drawn over all of them, random order), and a SYN flood towards a denied port
    (nothing committed). The connections are established a client's 60,000 at a time."""
    path = os.path.join(tmp, f"conns_{conns}.yaml")
    clients = -(-conns // PORTS)
    with open(path, "w") as f:
        f.write(conn_policy_yaml(clients))
    compiled = compile_policy(load_policy_file(path))
    sample = min(conns, EST_SAMPLE)
    flood_n = min(conns, 200_000)
    cap = max(1 << 16, 2 * conns)
    out = {"connections": conns, "packets": sample}
    rows = {}
    for name, cfg in (
        ("datapath", DatapathConfig(conntrack_capacity=cap)),
        ("fast_path_off", DatapathConfig(conntrack_capacity=cap, fast_path=False)),
    ):
        est, new, fl = [], [], []
        warm = Datapath(compiled, cfg)  # compile the kernels on a throwaway datapath
        for b in handshake(0, 2048):
            warm.process(b)
        for _ in range(repeat):
            dp = Datapath(compiled, cfg)
            clock = Clock()
            syn_s = 0.0
            for syn, synack, ack in setup_chunks(conns, clock):
                el, r = _cpu(lambda: dp.process(syn))
                assert np.all(r.verdict == 1)
                syn_s += el
                dp.process(synack)
                dp.process(ack)
            assert len(dp.conntrack) == conns
            new.append(conns / syn_s)
            data = data_sample(conns, sample, clock)
            dp.process(data)  # first data segment: ESTABLISHED
            clock.stamp(data)
            el, r = _cpu(lambda: dp.process(data))  # again: an in-window retransmission
            assert np.all(r.verdict == 1) and np.all(r.ct & 2)
            est.append(len(data) / el)
            before = len(dp.conntrack)
            flood = Batch.concat(
                [
                    clock.stamp(handshake(c, min(PORTS, flood_n - c * PORTS), 22)[0])
                    for c in range(-(-flood_n // PORTS))
                ],
                order=None,
            )
            el, r = _cpu(lambda: dp.process(flood))
            assert np.all(r.verdict != 1) and len(dp.conntrack) == before
            fl.append(len(flood) / el)
            dp = data = flood = r = None  # free the table before the next one is built
        rows[name] = {
            "established_mpps": statistics.median(est) / 1e6,
            "new_per_s": statistics.median(new),
            "synflood_mpps": statistics.median(fl) / 1e6,
        }

    # bare conntrack: the table alone on the same parsed packets in the same 1024-packet
    # batches, checksums verified beforehand (the limit of this design: the datapath adds
    # parse, the checksum pass, identities and verdicts)
    est, new = [], []
    warm_table = ConntrackTable(capacity=1 << 16)  # compile the table's kernels first
    for b in handshake(0, 2048):
        for wb, wk, wo in _chunks1024(b):
            warm_table.process(wb, wk, csum_ok=wo)
    for _ in range(repeat):
        t = ConntrackTable(capacity=cap)
        clock = Clock()
        syn_s = 0.0
        for chunk in setup_chunks(conns, clock):
            parts = [_chunks1024(b) for b in chunk]
            el, _ = _cpu(lambda: [t.process(b, k, csum_ok=o) for b, k, o in parts[0]])
            syn_s += el
            for p in parts[1:]:
                for b, k, o in p:
                    t.process(b, k, csum_ok=o)
        assert len(t) == conns
        new.append(conns / syn_s)
        data = data_sample(conns, sample, clock)
        for b, k, o in _chunks1024(data):
            t.process(b, k, csum_ok=o)
        clock.stamp(data)
        dparts = _chunks1024(data)
        el, _ = _cpu(lambda: [t.process(b, k, csum_ok=o) for b, k, o in dparts])
        est.append(len(data) / el)
        t = dparts = None
    rows["bare_conntrack"] = {
        "established_mpps": statistics.median(est) / 1e6,
        "new_per_s": statistics.median(new),
    }
    # what the datapath spends outside conntrack, per packet: parse and the checksum pass
    from microseg.datapath.datapath import SEGMENT
    from microseg.packet.batch import FlowKeys

    buf = FlowKeys(SEGMENT)
    el, _ = _cpu(
        lambda: [parse(data.slice(s, min(s + SEGMENT, len(data))), buf) for s in range(0, len(data), SEGMENT)]
    )
    out["parse_ns"] = el / len(data) * 1e9
    dkeys = parse(data)
    el, _ = _cpu(lambda: checksum_ok(data, dkeys))
    out["checksum_ns"] = el / len(data) * 1e9
    out.update(rows)
    out["ratio_to_bare"] = rows["datapath"]["established_mpps"] / rows["bare_conntrack"]["established_mpps"]
    return out


def _sl(keys, s, size):
    """The keys of packets s..s+size-1 as a compact FlowKeys (bare conntrack's batches)."""
    from microseg.datapath.slow import subset
    from microseg.packet.batch import FlowKeys

    idx = np.arange(s, min(s + size, keys.n))
    return subset(keys, idx, FlowKeys(size))


# ---------------------------------------------------------------------------------------------
# synthetic policies for the sweeps
# ---------------------------------------------------------------------------------------------
def policy_yaml(tenants: int, rules: int) -> str:
    """``tenants`` tenants (one VNI each) with a client and a server workload on 4 hosts;
    ``rules`` security-group rules in all, most of them for remote prefixes that no traffic
    comes from (filler, as large real rule sets are), one per tenant that the traffic uses."""
    lines = ["version: 1", "default_egress: allow", "tenants:"]
    for t in range(tenants):
        lines.append(f"  - {{name: t{t}, vni: {10000 + t}}}")
    lines.append("hosts:")
    for h in range(4):
        lines.append(f"  - {{name: h{h}, address: 192.168.100.{11 + h}}}")
    lines.append("security_groups:")
    filler = max(0, rules - tenants)
    per = [filler // tenants + (1 if t < filler % tenants else 0) for t in range(tenants)]
    rng = np.random.default_rng(rules * 7 + tenants)
    for t in range(tenants):
        lines.append(f"  - name: srv\n    tenant: t{t}\n    rules:")
        lines.append(
            "      - {direction: ingress, protocol: tcp, port_range_min: 443, port_range_max: 443, remote_group_id: cli}"
        )
        for k in range(per[t]):
            a = rng.integers(0, 1 << 24)
            plen = int(rng.choice([32, 28, 24, 20]))
            addr = f"172.{16 + (a >> 20 & 15)}.{a >> 8 & 255}.{a & 255}"
            p = int(rng.integers(1024, 60000))
            lines.append(
                f"      - {{direction: ingress, protocol: {'tcp' if k % 3 else 'udp'}, port_range_min: {p}, "
                f"port_range_max: {p + int(rng.choice([0, 0, 7, 63]))}, remote_ip_prefix: {addr}/{plen}}}"
            )
        lines.append(f"  - {{name: cli, tenant: t{t}, rules: [{{direction: egress}}]}}")
    lines.append("workloads:")
    for t in range(tenants):
        lines.append(
            f"  - {{name: c, tenant: t{t}, host: h{t % 4}, mac: '02:00:00:{t >> 8 & 255:02x}:{t & 255:02x}:01', "
            f"ipv4: 10.0.0.1, security_groups: [cli]}}"
        )
        lines.append(
            f"  - {{name: s, tenant: t{t}, host: h{(t + 1) % 4}, mac: '02:00:00:{t >> 8 & 255:02x}:{t & 255:02x}:02', "
            f"ipv4: 10.0.0.2, security_groups: [srv]}}"
        )
    return "\n".join(lines) + "\n"


def _load(tmp: str, tenants: int, rules: int):
    path = os.path.join(tmp, f"p_{tenants}_{rules}.yaml")
    with open(path, "w") as f:
        f.write(policy_yaml(tenants, rules))
    return load_policy_file(path)


def sweep_setup(tenants: int, rules: int, flows: int, tmp: str) -> dict:
    """One row of a sweep: the policy of ``tenants`` tenants and ``rules`` rules compiled, and
    its traffic (verdicts checked against the generator's truth)."""
    t = time.perf_counter()
    compiled = compile_policy(_load(tmp, tenants, rules))
    build = time.perf_counter() - t
    # The traffic comes from the same data centre without the filler rules (the generator
    # reasons about every rule in Python): the flows it draws are allowed by the one rule per
    # tenant both policies share, so the traffic and its verdicts are the same.
    policy = _load(tmp, tenants, tenants)
    cfg = ScenarioConfig(
        seed=3,
        flows=flows,
        tls_share=0.0,
        dns_share=0.0,
        icmp_share=0.0,
        denied_share=0.0,
        ipv6_share=0.0,
        scan_share=0.0,
        spoof_share=0.0,
        invalid_share=0.0,
        synflood_share=0.0,
        size_min=4000,
        size_max=60000,
    )
    gen = generate(policy, cfg)
    check = Datapath(compiled, DatapathConfig(offload=False)).process(gen.batch)
    assert np.array_equal(check.verdict, gen.truth.verdict), "sweep traffic: verdicts differ"
    return {
        "tenants": tenants,
        "rules": len(compiled.ruleset),
        "rules_asked": rules,
        "policy_build_s": build,
        "packets": len(gen.batch),
        "_compiled": compiled,
        "_batch": gen.batch,
    }


def sweep(rows: list, repeat: int) -> list:
    """Time every row of a sweep, caches on and off, round-robin: run k of every row, then run
    k+1 of every row, so a change in the machine's load reaches all rows alike instead of
    passing for a trend along the sweep. Each row's figure is its median."""
    runs: dict = {(i, c): [] for i in range(len(rows)) for c in (True, False)}
    for k in range(repeat):
        for i, row in enumerate(rows):
            for caches in (True, False):
                cfg = DatapathConfig(caches=caches, offload=False)
                r = timed(row["_compiled"], row["_batch"], cfg, 1, warm=k == 0)
                runs[(i, caches)].append(r["mpps"])
    out = []
    for i, row in enumerate(rows):
        row = {k: v for k, v in row.items() if not k.startswith("_")}
        for caches in (True, False):
            name = "caches_on" if caches else "caches_off"
            row[name] = statistics.median(runs[(i, caches)])
            row[name + "_runs"] = runs[(i, caches)]
        out.append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--connections",
        type=int,
        nargs="+",
        default=[10_000, 1_000_000, 10_000_000],
        help="table sizes of the established / new-connection rows",
    )
    ap.add_argument("--no-sweeps", action="store_true", help="skip the tunnel and rule sweeps")
    args = ap.parse_args()
    repeat = 1 if args.quick else args.repeat
    flows = 600 if args.quick else 3000
    results = {
        "machine": machine(),
        "batch_size": 1024,
        "timing": "process CPU time",
        "repeat": repeat,
        "date": time.strftime("%Y-%m-%d"),
    }

    policy = load_policy()
    compiled = compile_policy(policy)
    gen = generate(policy, ScenarioConfig(seed=1, flows=flows))
    mix = {"default": timed(compiled, gen.batch, DatapathConfig(), repeat)}
    print(f"demo mix default: {mix['default']['mpps']:.3f} Mpps", flush=True)
    mix["fast_path_off"] = timed(compiled, gen.batch, DatapathConfig(fast_path=False), repeat)
    print(f"demo mix fast path off: {mix['fast_path_off']['mpps']:.3f} Mpps", flush=True)
    for caches in (True, False):
        for offload in (True, False):
            if not caches and not offload:
                continue  # the default
            name = f"caches_{'on' if caches else 'off'}_offload_{'on' if offload else 'off'}"
            mix[name] = timed(compiled, gen.batch, DatapathConfig(caches=caches, offload=offload), repeat)
            print(f"demo mix {name}: {mix[name]['mpps']:.3f} Mpps", flush=True)
    results["demo_mix"] = {"packets": len(gen.batch), "configs": mix}
    results["established_replay"] = {}
    for offload in (False, True):
        name = f"offload_{'on' if offload else 'off'}"
        est = established_replay(compiled, gen.batch, DatapathConfig(offload=offload), repeat)
        results["established_replay"][name] = est
        print(
            f"demo established replay {name}: {est['mpps']:.3f} Mpps over {est['packets']} packets",
            flush=True,
        )
    results["connections"] = []
    sizes = (10_000, 100_000) if args.quick else tuple(args.connections)
    with tempfile.TemporaryDirectory() as tmp:
        for conns in sizes:
            r = connections_case(conns, 1 if conns > 2_000_000 else repeat, tmp)
            results["connections"].append(r)
            print(
                f"{conns:,} connections: established {r['datapath']['established_mpps']:.2f} Mpps "
                f"(bare conntrack {r['bare_conntrack']['established_mpps']:.2f}, fast path off "
                f"{r['fast_path_off']['established_mpps']:.2f}), new {r['datapath']['new_per_s'] / 1e6:.2f} M/s "
                f"(bare {r['bare_conntrack']['new_per_s'] / 1e6:.2f}), SYN flood "
                f"{r['datapath']['synflood_mpps']:.2f} Mpps",
                flush=True,
            )

    tunnels = () if args.no_sweeps else (1, 10, 100) if args.quick else (1, 10, 100, 1000)
    rule_counts = (
        () if args.no_sweeps else (1000, 10000) if args.quick else (1000, 10000, 24000, 36000, 48000, 64000)
    )
    sweep_flows = 300 if args.quick else 2000
    results["tunnels"] = []
    results["rules"] = []
    with tempfile.TemporaryDirectory() as tmp:
        results["tunnels"] = sweep([sweep_setup(t, max(1000, t), sweep_flows, tmp) for t in tunnels], repeat)
        for r in results["tunnels"]:
            print(
                f"tunnels {r['tenants']}: caches on {r['caches_on']:.3f}, off {r['caches_off']:.3f} Mpps",
                flush=True,
            )
        results["rules"] = sweep([sweep_setup(4, n, sweep_flows, tmp) for n in rule_counts], repeat)
        for r in results["rules"]:
            print(
                f"rules {r['rules']}: caches on {r['caches_on']:.3f}, off {r['caches_off']:.3f} Mpps "
                f"(policy built in {r['policy_build_s']:.1f} s)",
                flush=True,
            )

    def drop(rows, key):
        if not rows:
            return 0.0
        a, b = rows[0][key], rows[-1][key]
        return (a - b) / a if a else 0.0

    results["loss"] = {
        "tunnels_caches_off": drop(results["tunnels"], "caches_off"),
        "tunnels_caches_on": drop(results["tunnels"], "caches_on"),
        "rules_caches_off": drop(results["rules"], "caches_off"),
        "rules_caches_on": drop(results["rules"], "caches_on"),
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(results, f, indent=2)
    if results["tunnels"]:
        plot(results)
    print_markdown(results)
    return 0


def plot(results) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, xlabel in ((axes[0], "tunnels", "tunnels (VNIs)"), (axes[1], "rules", "rules")):
        rows = results[key]
        x = [r["tenants"] if key == "tunnels" else r["rules"] for r in rows]
        for col, label in (("caches_on", "caches on"), ("caches_off", "caches off")):
            ax.plot(x, [r[col] for r in rows], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("Mpps, one core")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("microseg datapath: throughput vs tunnels and rules")
    fig.tight_layout()
    os.makedirs(os.path.dirname(PLOT), exist_ok=True)
    fig.savefig(PLOT, dpi=110)


def print_markdown(r) -> None:
    print(f"\nMachine: {r['machine']}; 1024-packet batches; CPU time; median of {r['repeat']} run(s).\n")
    print("| traffic | configuration | Mpps |\n| --- | --- | ---: |")
    for name, v in r["demo_mix"]["configs"].items():
        print(
            f"| demo mix ({r['demo_mix']['packets']:,} pkts) | {name.replace('_', ' ')} | {v['mpps']:.2f} |"
        )
    for name, v in r["established_replay"].items():
        print(
            f"| demo, established only ({v['packets']:,} pkts) | {name.replace('_', ' ')} | {v['mpps']:.2f} |"
        )
    print(
        "\n| connections | datapath est. Mpps | bare conntrack | ratio | fast path off | new conns/s "
        "(datapath / bare) | SYN flood Mpps | parse ns/pkt | checksum ns/pkt |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for x in r["connections"]:
        d, b, o = x["datapath"], x["bare_conntrack"], x["fast_path_off"]
        print(
            f"| {x['connections']:,} | {d['established_mpps']:.2f} | {b['established_mpps']:.2f} | "
            f"{x['ratio_to_bare']:.2f} | {o['established_mpps']:.2f} | {d['new_per_s'] / 1e6:.2f} M / "
            f"{b['new_per_s'] / 1e6:.2f} M | {d['synflood_mpps']:.2f} | {x['parse_ns']:.0f} | "
            f"{x['checksum_ns']:.0f} |"
        )
    if r["tunnels"]:
        print("\n| tunnels | rules | caches on Mpps | caches off Mpps |\n| --- | --- | --- | --- |")
        for x in r["tunnels"]:
            print(f"| {x['tenants']} | {x['rules']} | {x['caches_on']:.3f} | {x['caches_off']:.3f} |")
    if r["rules"]:
        print("\n| rules | policy build s | caches on Mpps | caches off Mpps |\n| --- | --- | --- | --- |")
        for x in r["rules"]:
            print(
                f"| {x['rules']} | {x['policy_build_s']:.1f} | {x['caches_on']:.3f} | {x['caches_off']:.3f} |"
            )
    if r["tunnels"] and r["rules"]:
        print(
            f"\nLoss, caches off (default) / on: {r['loss']['tunnels_caches_off']:.1%} / "
            f"{r['loss']['tunnels_caches_on']:.1%} from 1 to {r['tunnels'][-1]['tenants']} tunnels, "
            f"{r['loss']['rules_caches_off']:.1%} / {r['loss']['rules_caches_on']:.1%} from "
            f"{r['rules'][0]['rules']} to {r['rules'][-1]['rules']} rules."
        )


if __name__ == "__main__":
    sys.exit(main())
