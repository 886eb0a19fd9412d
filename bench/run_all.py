"""Run every benchmark in bench/ one after another (`make bench`; `--quick` for a short pass).

Each benchmark writes its own JSON to bench/results/ and prints its table; the tables in
docs/benchmarks.md are copied from those runs. A benchmark that fails is reported and the
others still run; the exit code says whether all of them succeeded.
"""

import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = [
    "parse",
    "io_overlay",
    "generator",
    "classify",
    "conntrack",
    "policy",
    "cache_offload",
    "ipsec",
    "pipeline",
]


def main(argv) -> int:
    quick = "--quick" in argv
    failed = []
    for name in ORDER:
        path = os.path.join(HERE, name + ".py")
        if not os.path.exists(path):
            continue
        cmd = [sys.executable, path] + (["--quick"] if quick else [])
        print(f"\n=== {name} ({' '.join(os.path.basename(c) for c in cmd[1:])})", flush=True)
        t = time.perf_counter()
        rc = subprocess.call(cmd, cwd=os.path.dirname(HERE))
        print(f"=== {name}: exit {rc} after {time.perf_counter() - t:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print("failed: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
