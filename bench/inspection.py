"""Benchmark: signature inspection, Suricata against microseg's built-in matcher, in one run.

One capture for everything: the traffic generator's data centre (``microseg generate``,
VXLAN-encapsulated tenants: TLS, DNS, TCP, ICMP, scans, floods) with payload attacks added:
TCP connections from outside ``HOME_NET`` (handshake, then data) whose payload matches a rule
of ``tests/vectors/signatures/et_style.rules`` (path traversal, a libssh banner, a shell
command, cleartext credentials on an admin port). Most carry the attack in their first data
packet; some only in their 16th packet, after the first ``n_inspect`` (8) packets of the flow.

1. **Suricata alone** (``suricata -r``, one thread, IDS mode, its stock multi-pattern matcher):
   wall and CPU seconds of the process, packets from its own end-of-run stats, and packets per
   second over the wall time less its start-up (measured on a one-packet capture).
2. **microseg's matcher**: ``SignatureSet.inspect`` over 256-packet batches (every packet, no
   flow state), with and without the header parse; ``microseg offload`` (first ``n_inspect``
   packets of each flow, then the fast-path table) as its command runs it.
3. **The claim**: host CPU seconds per GB of traffic when every packet is inspected against
   first-N-then-offload, the share of packets the engine had to see, and which attack flows
   each catches (an alert or a drop on the flow), Suricata's included.

Results: ``bench/results/inspect.json``; the table is in docs/benchmarks.md.
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder is first on sys.path; keep it off, so that no file here can
# shadow a standard-library module for the imports below.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from microseg.cache.key import build_keys  # noqa: E402
from microseg.io.pcap import read_capture, write_pcap  # noqa: E402
from microseg.offload import inspect as I  # noqa: E402
from microseg.offload.handoff import FlowInspector  # noqa: E402
from microseg.offload.table import FastPathTable  # noqa: E402
from microseg.packet.batch import Batch  # noqa: E402
from microseg.packet.parse import parse  # noqa: E402

RULES = ROOT / "tests" / "vectors" / "signatures" / "et_style.rules"
ATTACKS = [  # (destination port, payload)
    (80, b"GET /../../../etc/passwd HTTP/1.1\r\nHost: shop\r\n\r\n"),
    (22, b"SSH-2.0-libssh_0.9.6\r\n"),
    (4444, b"echo pwned; /bin/sh -i"),
    (8000, b"POST /login HTTP/1.1\r\n\r\nuser=admin&password=hunter2"),
]


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _cpu() -> float:
    return time.process_time()


def attack_packets(n_flows: int, late_every: int, t0_ns: int, span_ns: int, seed: int):
    """Packets (bytes, ts) of the attack connections and their flows' descriptions."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    rng = np.random.default_rng(seed)
    eth = Ether(src="02:00:00:00:aa:01", dst="02:00:00:00:aa:02")
    out, flows = [], []
    for k in range(n_flows):
        dport, attack = ATTACKS[k % len(ATTACKS)]
        c, s = f"203.0.113.{1 + k % 250}", f"10.{200 + k // 250}.{k % 250}.10"
        sport = 40000 + k
        late = late_every > 0 and k % late_every == late_every - 1
        where = 12 if late else 0  # among the data packets: the flow's 16th packet, or its 4th
        n_data = 14 if late else 6
        t = t0_ns + int(rng.integers(0, span_ns))
        cs, ss = 1000, 50000
        seq = [
            (c, s, sport, dport, "S", cs, 0, b""),
            (s, c, dport, sport, "SA", ss, cs + 1, b""),
            (c, s, sport, dport, "A", cs + 1, ss + 1, b""),
        ]
        cs, ss = cs + 1, ss + 1
        for j in range(n_data):
            if j % 2 == 0:
                data = attack if j == where else bytes(rng.integers(97, 123, 60, dtype=np.uint8))
                seq.append((c, s, sport, dport, "PA", cs, ss, data))
                cs += len(data)
            else:
                data = bytes(rng.integers(97, 123, 40, dtype=np.uint8))
                seq.append((s, c, dport, sport, "PA", ss, cs, data))
                ss += len(data)
        if where % 2:  # the attack must come from the client
            raise AssertionError("attack packet index must be even")
        for a, b, sp, dp, fl, sq, ack, data in seq:
            out.append(
                (bytes(eth / IP(src=a, dst=b) / TCP(sport=sp, dport=dp, flags=fl, seq=sq, ack=ack) / data), t)
            )
            t += 200_000
        flows.append({"client": c, "server": s, "sport": sport, "dport": dport, "late": late})
    return out, flows


def build_capture(folder: Path, flows: int, seed: int, n_attacks: int, late_every: int) -> dict:
    gen = folder / "gen.pcap"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "microseg",
            "generate",
            "-o",
            str(gen),
            "--flows",
            str(flows),
            "--seed",
            str(seed),
        ],
        check=True,
        capture_output=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
    )
    base = read_capture(gen)
    t0, t1 = int(base.ts.min()), int(base.ts.max())
    pk, attack_flows = attack_packets(n_attacks, late_every, t0, max(1, t1 - t0 - 10**9), seed)
    extra = Batch.from_packets([p for p, _ in pk], ts=np.array([t for _, t in pk], np.int64))
    cap = Batch.concat([base, extra], order="ts")
    path = folder / "capture.pcap"
    write_pcap(path, cap)
    return {
        "path": path,
        "packets": len(cap),
        "bytes": int(cap.wire_len.sum()),
        "generated_packets": len(base),
        "attack_flows": attack_flows,
    }


def _attack_key(f):
    return frozenset([(f["client"], f["sport"]), (f["server"], f["dport"])])


def run_suricata(cap: Path, folder: Path, repeat: int) -> dict:
    from test_suricata_diff import suricata_alerts, suricata_config

    exe = shutil.which("suricata")
    if exe is None:
        return {"skipped": "suricata is not on PATH (.ci/suricata.sh installs it)"}
    folder.mkdir(parents=True, exist_ok=True)
    conf = suricata_config(folder)
    text = conf.read_text().replace("mpm-algo: ac\nspm-algo: bm\n", "")  # Suricata's own choice
    conf.write_text(text)
    version = subprocess.run([exe, "-V"], capture_output=True, text=True).stdout.strip()

    def once(pcap: Path):
        (folder / "eve.json").unlink(missing_ok=True)
        c0, w0 = _cpu_children(), time.perf_counter()
        cmd = [exe, "-c", str(conf), "-r", str(pcap), "-S", str(RULES), "-l", str(folder), "-k", "none"]
        subprocess.run(cmd + ["--runmode", "single"], check=True, capture_output=True)
        wall, cpu = time.perf_counter() - w0, _cpu_children() - c0
        events = [json.loads(x) for x in (folder / "eve.json").read_text().splitlines()]
        return wall, cpu, events

    tiny = folder / "one.pcap"
    write_pcap(tiny, read_capture(cap).slice(0, 1))
    starts = [once(tiny) for _ in range(3)]
    start, start_cpu = min(r[0] for r in starts), min(r[1] for r in starts)
    runs = [once(cap) for _ in range(repeat)]
    wall, cpu, events = min(runs, key=lambda r: r[0])
    stats = [e["stats"] for e in events if e.get("event_type") == "stats"][-1]
    pkts = int(stats["decoder"]["pkts"])
    alerts = suricata_alerts(events)
    return {
        "version": version,
        "runs": repeat,
        "wall_s": wall,
        "cpu_s": cpu,
        "startup_wall_s": start,
        "startup_cpu_s": start_cpu,
        "packets": pkts,
        "pps": pkts / max(wall - start, 1e-9),
        "pps_including_startup": pkts / wall,
        "alerts": sum(1 for e in events if e.get("event_type") == "alert"),
        "alert_flows": alerts,
    }


def inspect_all(batch, sigs, size: int = 256) -> dict:
    """Every packet through SignatureSet.inspect, no flow state (microseg inspect's way)."""
    cpu_parse = cpu_insp = 0.0
    hit_flows, verdicts = set(), {"alert": 0, "drop": 0, "pass": 0}
    w0 = time.perf_counter()
    for sub in batch.chunks(size):
        c0 = _cpu()
        k = parse(sub)
        c1 = _cpu()
        r = sigs.inspect(sub, k)
        cpu_parse += c1 - c0
        cpu_insp += _cpu() - c1
        for i in np.flatnonzero(r.verdict):
            verdicts[I.VERDICT_NAMES[int(r.verdict[i])]] += 1
            if r.verdict[i] in (I.ALERT, I.DROP):
                hit_flows.add(_pkt_key(k, int(i)))
    return {
        "wall_s": time.perf_counter() - w0,
        "cpu_parse_s": cpu_parse,
        "cpu_inspect_s": cpu_insp,
        "cpu_s": cpu_parse + cpu_insp,
        "packet_verdicts": verdicts,
        "_flows": hit_flows,
    }


def _pkt_key(k, i: int):
    import ipaddress

    from microseg.packet import batch as B

    def addr(hi, lo):
        v = int(k.u64[hi, i]) << 64 | int(k.u64[lo, i])
        return str(ipaddress.ip_address(v & 0xFFFFFFFF if k.u8[B.IP_VER, i] == 4 else v))

    s, d = addr(B.SRC_HI, B.SRC_LO), addr(B.DST_HI, B.DST_LO)
    return frozenset([(s, int(k.sport[i])), (d, int(k.dport[i]))])


def offload(batch, sigs, n_inspect: int, size: int = 256) -> dict:
    """First ``n_inspect`` packets of each flow, then the fast path (``microseg offload``)."""
    table = FastPathTable()
    fi = FlowInspector(sigs, table, n_inspect=n_inspect)
    hit_flows = set()
    c0, w0 = _cpu(), time.perf_counter()
    for sub in batch.chunks(size):
        k = parse(sub)
        kmat, _, valid = build_keys(k, sub.port)
        flow = table.flow_keys(kmat, valid)
        hit, _, _ = table.lookup(kmat, valid, sub.wire_len, sub.ts, flow)
        res = fi.process(sub, k, kmat, valid, ~hit, None, flow)
        for i in np.flatnonzero((res.verdict == I.ALERT) | (res.verdict == I.DROP)):
            hit_flows.add(_pkt_key(k, int(i)))
    cpu, wall = _cpu() - c0, time.perf_counter() - w0
    st = fi.stats()
    t = st.pop("table")
    return {
        "n_inspect": n_inspect,
        "wall_s": wall,
        "cpu_s": cpu,
        "inspected_packets": int(st["inspected"]),
        "fast_path_packet_share": t["packet_share"],
        "flows": st["flows"],
        "_flows": hit_flows,
    }


def offload_cli(cap: Path, n_inspect: int) -> dict:
    c0, w0 = _cpu_children(), time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "microseg", "offload", str(cap), "--rules", str(RULES)]
        + ["--n-inspect", str(n_inspect), "--json"],
        check=True,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
    )
    rep = json.loads(p.stdout)
    return {
        "wall_s": time.perf_counter() - w0,
        "cpu_s": _cpu_children() - c0,
        "inspected_packets": rep["inspected_packets"],
        "fast_path_packet_share": rep["fast_path"]["packet_share"],
        "dropped_by_signature": rep["dropped_by_signature"],
    }


def caught(attack_flows, hit_flows) -> dict:
    early = [f for f in attack_flows if not f["late"]]
    late = [f for f in attack_flows if f["late"]]
    return {
        "early": sum(_attack_key(f) in hit_flows for f in early),
        "early_of": len(early),
        "late": sum(_attack_key(f) in hit_flows for f in late),
        "late_of": len(late),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--flows", type=int, default=6000, help="benign flows of the generator")
    ap.add_argument("--attacks", type=int, default=40, help="attack connections added")
    ap.add_argument("--late-every", type=int, default=4, help="every Nth attack comes late")
    ap.add_argument("--n-inspect", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement (best kept)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("-o", "--output", default=str(ROOT / "bench" / "results" / "inspect.json"))
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cap = build_capture(folder, args.flows, args.seed, args.attacks, args.late_every)
        batch = read_capture(cap["path"])
        sigs = I.SignatureSet.load(RULES)
        gb = cap["bytes"] / 1e9

        suri = run_suricata(cap["path"], folder / "suricata", args.repeat)
        inspect_all(batch.slice(0, 2048), sigs)  # compile the kernels before timing
        offload(batch.slice(0, 2048), sigs, args.n_inspect)
        full = min((inspect_all(batch, sigs) for _ in range(args.repeat)), key=lambda r: r["cpu_s"])
        off = min(
            (offload(batch, sigs, args.n_inspect) for _ in range(args.repeat)), key=lambda r: r["cpu_s"]
        )
        cli = offload_cli(cap["path"], args.n_inspect)

    n = cap["packets"]
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "model": _cpu_model(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "capture": {k: v for k, v in cap.items() if k not in ("path", "attack_flows")}
        | {
            "attack_flows": len(cap["attack_flows"]),
            "late_attack_flows": sum(f["late"] for f in cap["attack_flows"]),
        },
        "rules": {"file": str(RULES.relative_to(ROOT)), "count": len(sigs)},
        "suricata": {k: v for k, v in suri.items() if k != "alert_flows"},
        "microseg_inspect_all": {k: v for k, v in full.items() if k != "_flows"}
        | {"pps": n / full["cpu_s"], "pps_inspect_only": n / full["cpu_inspect_s"]},
        "microseg_offload": {k: v for k, v in off.items() if k != "_flows"} | {"pps": n / off["cpu_s"]},
        "microseg_offload_cli": cli,
    }
    every = full["cpu_s"] / gb
    first_n = off["cpu_s"] / gb
    result["claim"] = {
        "cpu_s_per_gb_inspect_every_packet": every,
        "cpu_s_per_gb_first_n_then_offload": first_n,
        "ratio": first_n / every,
        "target_ratio_at_most": 0.2,
        "packet_share_inspected_every_packet": 1.0,
        "packet_share_inspected_first_n": off["inspected_packets"] / n,
        "attacks_caught_inspect_every_packet": caught(cap["attack_flows"], full["_flows"]),
        "attacks_caught_first_n_then_offload": caught(cap["attack_flows"], off["_flows"]),
    }
    if "alert_flows" in suri:
        sflows = {frozenset([(f[1], f[2]), (f[3], f[4])]) for f, _ in suri["alert_flows"]}
        result["claim"]["attacks_caught_suricata"] = caught(cap["attack_flows"], sflows)
        result["claim"]["suricata_cpu_s_per_gb"] = suri["cpu_s"] / gb
        result["claim"]["suricata_cpu_s_per_gb_less_startup"] = (suri["cpu_s"] - suri["startup_cpu_s"]) / gb
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
