"""Benchmark: the whole datapath (parse -> conntrack -> fast path -> EMC -> megaflow -> policy
slow path -> inspection/offload), one core, 256-packet batches.

* the demo's traffic mix, with and without the caches and the offload;
* established traffic alone (the packets conntrack called ESTABLISHED in a first pass,
  replayed through the warm datapath: in-window retransmissions, still ESTABLISHED);
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

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from microseg import ctstate  # noqa: E402
from microseg.io.generator import generate, load_policy  # noqa: E402
from microseg.io.scenario import ScenarioConfig  # noqa: E402
from microseg.packet.batch import Batch  # noqa: E402
from microseg.datapath import Datapath, DatapathConfig  # noqa: E402
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
    return {"mpps": statistics.median(rates), "runs": rates, "packets": len(batch),
            "levels": stats["levels"], "offload_share": stats["inspection"]["table"]["packet_share"]}


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
    return {"mpps": statistics.median(rates), "runs": rates, "packets": int(est.size),
            "levels": stats["levels"]}


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
        lines.append("      - {direction: ingress, protocol: tcp, port_range_min: 443, port_range_max: 443, remote_group_id: cli}")
        for k in range(per[t]):
            a = rng.integers(0, 1 << 24)
            plen = int(rng.choice([32, 28, 24, 20]))
            addr = f"172.{16 + (a >> 20 & 15)}.{a >> 8 & 255}.{a & 255}"
            p = int(rng.integers(1024, 60000))
            lines.append(f"      - {{direction: ingress, protocol: {'tcp' if k % 3 else 'udp'}, port_range_min: {p}, "
                         f"port_range_max: {p + int(rng.choice([0, 0, 7, 63]))}, remote_ip_prefix: {addr}/{plen}}}")
        lines.append(f"  - {{name: cli, tenant: t{t}, rules: [{{direction: egress}}]}}")
    lines.append("workloads:")
    for t in range(tenants):
        lines.append(f"  - {{name: c, tenant: t{t}, host: h{t % 4}, mac: '02:00:00:{t >> 8 & 255:02x}:{t & 255:02x}:01', "
                     f"ipv4: 10.0.0.1, security_groups: [cli]}}")
        lines.append(f"  - {{name: s, tenant: t{t}, host: h{(t + 1) % 4}, mac: '02:00:00:{t >> 8 & 255:02x}:{t & 255:02x}:02', "
                     f"ipv4: 10.0.0.2, security_groups: [srv]}}")
    return "\n".join(lines) + "\n"


def _load(tmp: str, tenants: int, rules: int):
    path = os.path.join(tmp, f"p_{tenants}_{rules}.yaml")
    with open(path, "w") as f:
        f.write(policy_yaml(tenants, rules))
    return load_policy_file(path)


def sweep_case(tenants: int, rules: int, flows: int, repeat: int, tmp: str) -> dict:
    t = time.perf_counter()
    compiled = compile_policy(_load(tmp, tenants, rules))
    build = time.perf_counter() - t
    # The traffic comes from the same data centre without the filler rules (the generator
    # reasons about every rule in Python): the flows it draws are allowed by the one rule per
    # tenant both policies share, so the traffic and its verdicts are the same.
    policy = _load(tmp, tenants, tenants)
    cfg = ScenarioConfig(seed=3, flows=flows, tls_share=0.0, dns_share=0.0, icmp_share=0.0,
                         denied_share=0.0, ipv6_share=0.0, scan_share=0.0, spoof_share=0.0,
                         invalid_share=0.0, synflood_share=0.0, size_min=4000, size_max=60000)
    gen = generate(policy, cfg)
    check = Datapath(compiled, DatapathConfig(offload=False)).process(gen.batch)
    assert np.array_equal(check.verdict, gen.truth.verdict), "sweep traffic: verdicts differ"
    out = {"tenants": tenants, "rules": len(compiled.ruleset), "rules_asked": rules,
           "policy_build_s": build, "packets": len(gen.batch)}
    for caches in (True, False):
        r = timed(compiled, gen.batch, DatapathConfig(caches=caches, offload=False), repeat)
        out["caches_on" if caches else "caches_off"] = r["mpps"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    repeat = 1 if args.quick else args.repeat
    flows = 600 if args.quick else 3000
    results = {"machine": machine(), "batch_size": 1024, "timing": "process CPU time", "repeat": repeat, "date": time.strftime("%Y-%m-%d")}

    policy = load_policy()
    compiled = compile_policy(policy)
    gen = generate(policy, ScenarioConfig(seed=1, flows=flows))
    mix = {}
    for caches in (True, False):
        for offload in (True, False):
            name = f"caches_{'on' if caches else 'off'}_offload_{'on' if offload else 'off'}"
            mix[name] = timed(compiled, gen.batch, DatapathConfig(caches=caches, offload=offload), repeat)
            print(f"demo mix {name}: {mix[name]['mpps']:.3f} Mpps", flush=True)
    results["demo_mix"] = {"packets": len(gen.batch), "configs": mix}
    results["established"] = {}
    for bs in (256, 1024):
        for offload in (False, True):
            name = f"batch_{bs}_offload_{'on' if offload else 'off'}"
            est = established_replay(compiled, gen.batch, DatapathConfig(batch_size=bs, offload=offload), repeat)
            results["established"][name] = est
            print(f"established replay {name}: {est['mpps']:.3f} Mpps over {est['packets']} packets", flush=True)

    tunnels = (1, 10, 100) if args.quick else (1, 10, 100, 1000)
    rule_counts = (1000, 10000) if args.quick else (1000, 10000, 24000, 36000, 48000, 64000)
    sweep_flows = 300 if args.quick else 2000
    results["tunnels"] = []
    results["rules"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in tunnels:
            r = sweep_case(t, max(1000, t), sweep_flows, repeat, tmp)
            results["tunnels"].append(r)
            print(f"tunnels {t}: caches on {r['caches_on']:.3f}, off {r['caches_off']:.3f} Mpps", flush=True)
        for n in rule_counts:
            r = sweep_case(4, n, sweep_flows, repeat, tmp)
            results["rules"].append(r)
            print(f"rules {r['rules']}: caches on {r['caches_on']:.3f}, off {r['caches_off']:.3f} Mpps "
                  f"(policy built in {r['policy_build_s']:.1f} s)", flush=True)

    def drop(rows, key):
        a, b = rows[0][key], rows[-1][key]
        return (a - b) / a if a else 0.0
    results["loss"] = {"tunnels_caches_on": drop(results["tunnels"], "caches_on"),
                       "rules_caches_on": drop(results["rules"], "caches_on")}
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(results, f, indent=2)
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
    print(f"\nMachine: {r['machine']}; 1024-packet batches unless stated; CPU time; median of {r['repeat']} run(s).\n")
    print("| traffic | caches | offload | Mpps |\n| --- | --- | --- | --- |")
    for name, v in r["demo_mix"]["configs"].items():
        parts = name.split("_")
        print(f"| demo mix ({r['demo_mix']['packets']} pkts) | {parts[1]} | {parts[3]} | {v['mpps']:.3f} |")
    for name, v in r["established"].items():
        parts = name.split("_")
        print(f"| established only ({v['packets']} pkts), batch {parts[1]} | on | {parts[3]} | {v['mpps']:.3f} |")
    print("\n| tunnels | rules | caches on Mpps | caches off Mpps |\n| --- | --- | --- | --- |")
    for x in r["tunnels"]:
        print(f"| {x['tenants']} | {x['rules']} | {x['caches_on']:.3f} | {x['caches_off']:.3f} |")
    print("\n| rules | policy build s | caches on Mpps | caches off Mpps |\n| --- | --- | --- | --- |")
    for x in r["rules"]:
        print(f"| {x['rules']} | {x['policy_build_s']:.1f} | {x['caches_on']:.3f} | {x['caches_off']:.3f} |")
    print(f"\nLoss with caches on: {r['loss']['tunnels_caches_on']:.1%} from 1 to {r['tunnels'][-1]['tenants']} "
          f"tunnels, {r['loss']['rules_caches_on']:.1%} from {r['rules'][0]['rules']} to {r['rules'][-1]['rules']} rules.")


if __name__ == "__main__":
    sys.exit(main())
