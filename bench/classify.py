"""Classification benchmark: Mpps on one core per classifier, rule set family and size.

Generates ClassBench-shaped sets ({acl,fw,ipc} x {1K, 10K, 64K} rules, 100,000-header traces)
with bench/gen_rules.py, then for each set measures, in the same run: our decision tree, tuple
space search and NumPy linear scan (build time, structure size, Mpps over the trace, answers
checked against the linear scan), and DPDK's rte_acl through `dpdk-test-acl` (reported as
unavailable where it is not installed). Writes bench/results/classify.json and
docs/img/classify.png.

    python bench/classify.py [--quick] [--sizes 1000,10000,65536] [--families acl,fw,ipc]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from microseg.classify import RuleSet, build
from microseg.classify.classbench import load_rules, load_trace
from microseg.classify.linear import classify_linear

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DPDK_ALGS = ("scalar", "sse", "avx2", "avx512x16")  # avx512 fails fast where unsupported
CORE = 1 if (os.cpu_count() or 1) > 1 else 0


def gen(family: str, n: int, ntrace: int, d: str) -> str:
    prefix = os.path.join(d, f"{family}_{n}")
    if not os.path.exists(prefix + ".rules"):
        subprocess.run(
            [sys.executable, os.path.join(HERE, "gen_rules.py"), family, str(n), str(ntrace), str(n), prefix],
            check=True,
        )
    return prefix


def time_lookup(clf, K, repeats: int, budget_s: float = 2.0) -> float:
    """Best-of-``repeats`` packets/s over K (first call warms up the kernel)."""
    clf.classify_keys(K[:64])
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        clf.classify_keys(K)
        dt = time.perf_counter() - t
        best = min(best, dt)
        if dt > budget_s:
            break
    return K.shape[0] / best


class _Bursts:
    """Calls a classifier once per 256-header burst."""

    def __init__(self, clf, size: int = 256):
        self.clf, self.size = clf, size

    def classify_keys(self, K):
        out = np.empty(K.shape[0], np.int32)
        for s in range(0, K.shape[0], self.size):
            out[s : s + self.size] = self.clf.classify_keys(K[s : s + self.size])
        return out


def run_dpdk(prefix: str, ntrace: int, alg: str, iters: int) -> dict:
    exe = shutil.which("dpdk-test-acl")
    if exe is None:
        return {"available": False, "why": "dpdk-test-acl not installed"}
    cmd = [
        exe,
        "--no-huge",
        "--no-pci",
        "-l",
        str(CORE),
        "-m",
        "2048",
        "--log-level=lib.eal:error",
        "--",
        f"--rulesf={prefix}.rules",
        f"--tracef={prefix}.trace",
        f"--tracenum={ntrace}",
        f"--iter={iters}",
        f"--alg={alg}",
        "--verbose=1",
    ]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"available": False, "why": "timed out"}
    m = re.search(r"search_ip5tuples\s+@lcore.*?([0-9.]+) cycles/pkt, ([0-9.]+) pkt/sec", p.stdout)
    if not m:
        tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or ["no output"]
        return {"available": False, "why": tail[0][:120]}
    return {"available": True, "mpps": float(m.group(2)) / 1e6, "cycles_per_pkt": float(m.group(1))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1K and 10K rules, 20,000 headers")
    ap.add_argument("--sizes", default=None)
    ap.add_argument("--families", default="acl,fw,ipc")
    ap.add_argument("--trace", type=int, default=None, help="headers per trace")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "classify.json"))
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs", "img", "classify.png"))
    args = ap.parse_args(argv)
    sizes = [int(x) for x in (args.sizes or ("1000,10000" if args.quick else "1000,10000,65536")).split(",")]
    ntrace = args.trace or (20000 if args.quick else 100000)
    families = args.families.split(",")
    try:
        os.sched_setaffinity(0, {CORE})
    except (AttributeError, OSError):
        pass
    tmp = tempfile.mkdtemp(prefix="classbench-")
    results = []
    t_start = time.time()
    try:
        for fam in families:
            for n in sizes:
                prefix = gen(fam, n, ntrace, tmp)
                rs = load_rules(prefix + ".rules")
                K = load_trace(prefix + ".trace")
                row = {"family": fam, "rules": n, "headers": int(K.shape[0]), "ours": {}, "dpdk": {}}
                if not results:  # compile the kernels outside the timed builds
                    for algo in ("tree", "tss"):
                        build(
                            RuleSet.from_arrays(rs.val[:64], rs.mask[:64], rs.ports[:64]), algo
                        ).classify_keys(K[:64])
                # oracle answers on a sample (linear scan cost grows with the rule count)
                nlin = int(min(K.shape[0], max(500, 4_000_000 // n)))
                lin = build(rs, "linear")
                ref = classify_linear(rs, K[:nlin])
                row["ours"]["linear"] = {
                    "build_s": 0.0,
                    "bytes": lin.nbytes(),
                    "checked": nlin,
                    "correct": True,
                    "mpps": time_lookup(lin, K[:nlin], 1) / 1e6,
                }
                for algo in ("tree", "tss"):
                    t = time.perf_counter()
                    clf = build(rs, algo)
                    bt = time.perf_counter() - t
                    # TSS slows down with thousands of tuples: time it on fewer headers
                    Kt = K if algo == "tree" or n < 65536 else K[:20000]
                    pps = time_lookup(clf, Kt, args.repeats)
                    ok = bool(np.array_equal(clf.classify_keys(K[:nlin]), ref))
                    row["ours"][algo] = {
                        "build_s": bt,
                        "bytes": clf.nbytes(),
                        "mpps": pps / 1e6,
                        "checked": nlin,
                        "correct": ok,
                        "headers": int(Kt.shape[0]),
                    }
                    if algo == "tree":
                        # the way dpdk-test-acl calls rte_acl: bursts of 256 headers
                        row["ours"]["tree_b256"] = {"mpps": time_lookup(_Bursts(clf), K, args.repeats) / 1e6}
                    del clf
                for alg in DPDK_ALGS:
                    row["dpdk"][alg] = run_dpdk(prefix, int(K.shape[0]), alg, 10 if n < 65536 else 3)
                results.append(row)
                d = {k: v["mpps"] for k, v in row["ours"].items()}
                dd = {k: v["mpps"] for k, v in row["dpdk"].items() if v.get("available")}
                print(
                    f"{fam:4s} {n:6d}  "
                    + "  ".join(f"{k} {v:7.3f}" for k, v in d.items())
                    + "  | rte_acl "
                    + "  ".join(f"{k} {v:6.2f}" for k, v in dd.items())
                    + f"  | tree build {row['ours']['tree']['build_s']:.2f}s "
                    f"{row['ours']['tree']['bytes'] / 2**20:.1f} MiB",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = {
        "benchmark": "classify",
        "machine": {
            "cpu": _cpu(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "pinned_core": CORE,
        "headers": ntrace,
        "quick": args.quick,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall_s": time.time() - t_start,
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    if args.plot:
        plot(out, args.plot)
    return 0


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = sorted({r["family"] for r in out["results"]}, key=["acl", "fw", "ipc"].index)
    fig, axes = plt.subplots(1, len(fams), figsize=(4.2 * len(fams), 3.6), sharey=True, squeeze=False)
    for ax, fam in zip(axes[0], fams):
        rows = [r for r in out["results"] if r["family"] == fam]
        xs = [r["rules"] for r in rows]
        for algo, style in (("tree", "o-"), ("tree_b256", "o:"), ("tss", "s-"), ("linear", "x:")):
            ax.plot(xs, [r["ours"][algo]["mpps"] for r in rows], style, label=f"microseg {algo}")
        for alg, style in (("scalar", "v--"), ("avx2", "^--"), ("avx512x16", "d--")):
            ys = [r["dpdk"].get(alg, {}).get("mpps") for r in rows]
            if any(y is not None for y in ys):
                ax.plot(xs, [np.nan if y is None else y for y in ys], style, label=f"rte_acl {alg}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{fam}")
        ax.set_xlabel("rules")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("Mpps, one core")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
