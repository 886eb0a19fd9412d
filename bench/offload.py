"""Benchmark: the kernel fast path against the agent's own path, in one run.

1. **Per packet, in isolation.** The XDP program under ``BPF_PROG_TEST_RUN`` with repeat (a
   64-byte frame of an offloaded flow, a hit, and one of no flow, a miss) against the agent's
   userspace datapath on the same kind of packet: ``Datapath.process`` on 1024-packet
   batches of established, encapsulated frames (what the agent hands it), per packet of CPU.
2. **Per packet, live.** ``microseg lab up`` with a two-host policy, one TCP bulk transfer
   between workloads on the two hosts, once with the agents' offload off and once on (the
   order alternating over ``--rounds``): the agents' CPU seconds (``/proc/PID/stat``, both
   hosts) per packet of the transfer (with offload on: the packets the agents judged plus
   those the kernel carried), and the transfer's rate. The issue's target: with offload on,
   established traffic costs the agent at most 5% of the CPU per packet it costs with
   offload off.
3. **The offload share on the lab demo's traffic** (``microseg lab demo --json``).

Needs root, ``ip netns`` and BPF; what cannot run is reported "skipped: reason". Results:
``bench/results/offload.json``; the table is in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

POLICY = """\
version: 1
default_egress: deny
deny_action: drop
tenants:
  - {name: red, vni: 7301}
hosts:
  - {name: h1, address: 198.18.3.1}
  - {name: h2, address: 198.18.3.2}
security_groups:
  - name: svc
    tenant: red
    rules:
      - {direction: ingress, ethertype: IPv4, protocol: tcp, port_range_min: 7100, port_range_max: 7100}
      - {direction: egress, ethertype: IPv4}
workloads:
  - {name: a, tenant: red, host: h1, mac: "02:00:00:31:00:01", ipv4: 10.9.0.1, security_groups: [svc]}
  - {name: b, tenant: red, host: h2, mac: "02:00:00:31:00:02", ipv4: 10.9.0.2, security_groups: [svc]}
"""

SINK = textwrap.dedent("""\
    import socket, sys
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 7100)); s.listen(4)
    print("READY", flush=True)
    while True:
        c, _ = s.accept()
        n = 0
        for d in iter(lambda: c.recv(1 << 16), b""):
            n += len(d)
        c.sendall(str(n).encode()); c.close()
""")

BULK = textwrap.dedent("""\
    import socket, sys, time
    s = socket.create_connection(("10.9.0.2", 7100), timeout=60)
    chunk = b"z" * 65536
    t = time.perf_counter()
    for _ in range(int(sys.argv[1]) // len(chunk)):
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    n = int(s.recv(100))
    print(n, time.perf_counter() - t)
""")


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
def isolated(repeat: int) -> dict:
    """The program's ns per packet (hit, miss) and the userspace datapath's, same frame kind."""
    import numpy as np

    from microseg.bpf import FlowAction, FlowKey, KernelFastPath
    from microseg.bpf.loader import _in_netns
    from microseg.datapath import Datapath, DatapathConfig
    from microseg.overlay import encap
    from microseg.packet import build as PB
    from microseg.packet.batch import Batch
    from microseg.packet.parse import parse
    from microseg.policy.compiler import compile_policy
    from microseg.policy.model import parse_policy

    out: dict = {}
    ok, why = KernelFastPath.available()
    ns = f"msbo{os.getpid() % 100000}"
    if not ok:
        out["program"] = f"skipped: {why}"
    else:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            for cmd in (
                ["link", "add", "wa", "type", "veth", "peer", "name", "wb"],
                ["link", "set", "wa", "up"],
                ["link", "set", "wb", "up"],
            ):
                subprocess.run(["ip", "-n", ns, *cmd], check=True)
            path = f"/run/netns/{ns}"
            idx = _in_netns(
                path,
                lambda: (
                    __import__("socket").if_nametoindex("wa"),
                    __import__("socket").if_nametoindex("wb"),
                ),
            )
            fp = KernelFastPath()
            fp.load(name=f"bench-{ns}")
            try:
                fp.add_workload_port(idx[0], 7301, "02:00:00:31:00:01")
                fp.add_workload_port(idx[1], 7301, "02:00:00:31:00:02")
                fp.install(
                    FlowKey(idx[0], 7301, "10.9.0.1", "10.9.0.2", 17, 40000, 7100),
                    FlowAction("local", ifindex=idx[1], mac="02:00:00:31:00:02"),
                )
                frame = PB.udp_packet(
                    "10.9.0.1",
                    "10.9.0.2",
                    40000,
                    7100,
                    b"x" * 18,
                    eth_src="02:00:00:31:00:01",
                    eth_dst="02:00:00:31:00:02",
                )
                miss = bytearray(frame)
                miss[26] ^= 1
                runs = {"hit": [], "miss": []}
                for _ in range(5):
                    for name, f in (("hit", frame), ("miss", bytes(miss))):
                        r = _in_netns(path, lambda f=f: fp.test_run(f, idx[0], repeat=repeat))
                        runs[name].append(r.duration_ns)
                out["program"] = {
                    "frame_bytes": len(frame),
                    "repeat": repeat,
                    **{f"{k}_ns": {"min": min(v), "median": statistics.median(v)} for k, v in runs.items()},
                }
            finally:
                fp.close()
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    # the userspace datapath on established, encapsulated frames (what the agent hands it)
    compiled = compile_policy(parse_policy(POLICY))
    dp = Datapath(compiled, DatapathConfig(conntrack_capacity=1 << 16))
    n = 1024
    syn = PB.tcp_packet(
        "10.9.0.1",
        "10.9.0.2",
        40000,
        7100,
        b"",
        flags="S",
        seq=1,
        eth_src="02:00:00:31:00:01",
        eth_dst="02:00:00:31:00:02",
    )
    sa = PB.tcp_packet(
        "10.9.0.2",
        "10.9.0.1",
        7100,
        40000,
        b"",
        flags="SA",
        seq=100,
        ack=2,
        eth_src="02:00:00:31:00:02",
        eth_dst="02:00:00:31:00:01",
    )
    data = [
        PB.tcp_packet(
            "10.9.0.1",
            "10.9.0.2",
            40000,
            7100,
            b"y" * 10,
            flags="PA",
            seq=2,
            ack=101,
            eth_src="02:00:00:31:00:01",
            eth_dst="02:00:00:31:00:02",
        )
    ] * n
    t0 = 1_000_000_000
    for i, pk in enumerate([[syn], [sa]]):
        b = encap(Batch.from_packets(pk, ts=[t0 + i]), "vxlan", 7301, "198.18.3.1", "198.18.3.2")
        dp.process(b)
    b = encap(Batch.from_packets(data, ts=[t0 + 10] * n), "vxlan", 7301, "198.18.3.1", "198.18.3.2")
    keys = parse(b)
    dp.process(b, keys)  # warm
    best = []
    for _ in range(7):
        c = time.process_time()
        for _ in range(50):
            res = dp.process(b, parse(b))
        best.append((time.process_time() - c) / (50 * n) * 1e9)
    from microseg.policy import verdict as V

    if int(np.count_nonzero(res.verdict == V.ALLOW)) != n:
        raise SystemExit(f"the established batch was not allowed: reasons {np.unique(res.reason)}")
    out["userspace_datapath_ns"] = {"min": min(best), "median": statistics.median(best)}
    return out


# ---------------------------------------------------------------------------------------------
def live(rounds: int, size: int) -> dict:
    from microseg.agent import lab as L

    rows: dict = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        pol = Path(tmp) / "p.yaml"
        pol.write_text(POLICY)
        for r in range(rounds):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                state = str(Path(tmp) / f"st-{mode}")
                prefix = f"msbo{mode}{os.getpid() % 10000}"
                L.up(
                    str(pol),
                    state,
                    prefix,
                    "vxlan",
                    "warning",
                    180,
                    echo=lambda *_: None,
                    offload=mode == "on",
                )
                procs = []
                try:
                    d = json.loads((Path(state) / "state.json").read_text())
                    ns = {q: w["ns"] for q, w in d["workloads"].items()}
                    sink = subprocess.Popen(
                        ["ip", "netns", "exec", ns["red/b"], sys.executable, "-c", SINK],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    procs.append(sink)
                    assert sink.stdout.readline().strip() == "READY"
                    pids = [h["pid"] for h in d["hosts"].values()]
                    s0 = L.stats(state)["hosts"]
                    c0 = sum(_cpu(p) for p in pids)
                    res = subprocess.run(
                        ["ip", "netns", "exec", ns["red/a"], sys.executable, "-c", BULK, str(size)],
                        capture_output=True,
                        text=True,
                        timeout=300,
                    )
                    c1 = sum(_cpu(p) for p in pids)
                    s1 = L.stats(state)["hosts"]
                    got, secs = res.stdout.split()
                    judged = sum(s1[h]["agent"]["packets"] - s0[h]["agent"]["packets"] for h in s1)
                    carried = sum(s1[h]["fastpath"]["packets"] - s0[h]["fastpath"]["packets"] for h in s1)
                    rows[mode].append(
                        {
                            "bytes": int(got),
                            "seconds": float(secs),
                            "gbit_s": int(got) * 8 / float(secs) / 1e9,
                            "agent_cpu_s": c1 - c0,
                            "agent_packets": judged,
                            "kernel_packets": carried,
                            "agent_cpu_us_per_packet": (c1 - c0) / max(1, judged + carried) * 1e6,
                            "kind": s1["h1"]["fastpath"]["kind"],
                        }
                    )
                finally:
                    for p in procs:
                        p.kill()
                        p.wait()
                    L.down(state, echo=lambda *_: None)
    med = {
        m: {k: statistics.median(x[k] for x in v) for k in v[0] if k != "kind"} | {"kind": v[0]["kind"]}
        for m, v in rows.items()
        if v
    }
    out = {"rounds": rows, "median": med}
    if "on" in med and "off" in med:
        out["cpu_per_packet_on_over_off"] = (
            med["on"]["agent_cpu_us_per_packet"] / med["off"]["agent_cpu_us_per_packet"]
        )
    return out


def demo_share() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "microseg",
                "lab",
                "demo",
                "--json",
                "--state-dir",
                tmp + "/st",
                "--prefix",
                f"msbod{os.getpid() % 10000}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
    if r.returncode not in (0, 1):
        return {"skipped": r.stderr.strip()[-300:]}
    return json.loads(r.stdout)["offload"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bytes", type=int, default=200 << 20, help="per transfer (default 200 MiB)")
    ap.add_argument("--repeat", type=int, default=1_000_000, help="BPF_PROG_TEST_RUN repeats")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "offload.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/offload.py: skipped: needs root (namespaces, BPF)")
        return 0
    res = {
        "machine": {
            "cpu": subprocess.run(
                ["sh", "-c", "lscpu | sed -n 's/^Model name: *//p'"], capture_output=True, text=True
            ).stdout.strip(),
            "cores": os.cpu_count(),
            "kernel": platform.release(),
            "load_before": os.getloadavg(),
        },
        "isolated": isolated(args.repeat),
        "live": live(args.rounds, args.bytes),
        "lab_demo": demo_share(),
    }
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
