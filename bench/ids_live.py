"""Benchmark: the live inspection chain, Suricata on a connection's first packets then offload,
against Suricata on every packet, on the same lab and traffic (seed 002's ITO claim, live).

``microseg lab up`` with ``bench/live_policy.yaml`` (two hosts, a client and a server) and
the agents' IDS on (``--ids-rules``: an ET-style HTTP rule set that catches an ``sqlmap``
User-Agent and a request for ``/etc/passwd``), twice:

* **first N**: ``--ids-packets 16`` (the agent's default): each connection's first 16
  packets go through Suricata, then the connection takes the normal path, where the kernel
  fast path takes it over;
* **every packet**: ``--ids-packets`` larger than any connection and the kernel fast path
  off, so Suricata sees everything.

The same traffic each time: ``--connections`` TCP connections from the client to the server's
port 5201, each an HTTP-like request followed by ``--bytes`` of data, plus two attack
requests (one per rule) at the start of their connections. Measured: bytes moved and the wall
time, the CPU seconds of both agents and both Suricata processes (``/proc/PID/stat``) and the
machine's softirq time, per GB moved; the share of the frames the agents sent to Suricata; and
whether both attacks raised their alerts.

Then, in each lab, ``--tls-connections`` TLS connections (python's ``ssl``, TLS 1.3, to an echo
server on port 5301), each a handshake and ``--tls-echoes`` echoed messages: how many of their
frames went to Suricata per connection and why their inspection ended (the agents'
``ended_*`` counts) -- Suricata's ``tls`` record (``encryption-handling: bypass``) ends it
before N, in the every-packet lab too. Needs root, ``ip netns``, Suricata (and ``openssl`` for
the TLS probe); what cannot run is reported "skipped: reason". Results:
``bench/results/ids_live.json``; the table is in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

RULES = """\
alert http any any -> any any (msg:"bench: sqlmap user agent"; flow:established,to_server; \
http.user_agent; content:"sqlmap"; nocase; sid:9300001; rev:1;)
alert http any any -> any any (msg:"bench: passwd in uri"; flow:established,to_server; \
http.uri; content:"/etc/passwd"; sid:9300002; rev:1;)
"""

SINK = textwrap.dedent("""\
    import socket, threading
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("10.77.0.2", 5201)); s.listen(64)
    print("READY", flush=True)
    def conn(c):
        n = 0
        with c:
            for d in iter(lambda: c.recv(1 << 16), b""):
                n += len(d)
            c.sendall(str(n).encode())
    while True:
        c, _ = s.accept()
        threading.Thread(target=conn, args=(c,), daemon=True).start()
""")

CLIENT = textwrap.dedent("""\
    import json, socket, sys, time
    conns, size = int(sys.argv[1]), int(sys.argv[2])
    heads = [b"GET /etc/passwd HTTP/1.1\\r\\nHost: s\\r\\n\\r\\n",
             b"GET / HTTP/1.1\\r\\nHost: s\\r\\nUser-Agent: sqlmap/1.7\\r\\n\\r\\n"]
    body = b"d" * 65536
    moved, t0 = 0, time.perf_counter()
    for i in range(conns):
        s = socket.create_connection(("10.77.0.2", 5201), timeout=60)
        head = heads[i] if i < len(heads) else b"POST /upload HTTP/1.1\\r\\nHost: s\\r\\n\\r\\n"
        s.sendall(head)
        for _ in range(size // len(body)):
            s.sendall(body)
        s.shutdown(socket.SHUT_WR)
        moved += int(s.recv(100) or 0)
        s.close()
    print(json.dumps({"bytes": moved, "seconds": time.perf_counter() - t0}))
""")


TLS_ECHO = textwrap.dedent("""\
    import socket, ssl, sys, threading
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[1], sys.argv[2])
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("10.77.0.2", 5301)); s.listen(64)
    print("READY", flush=True)
    def conn(c):
        try:
            with ctx.wrap_socket(c, server_side=True) as t:
                for d in iter(lambda: t.recv(65536), b""):
                    t.sendall(d)
        except OSError:
            pass
    while True:
        c, _ = s.accept()
        threading.Thread(target=conn, args=(c,), daemon=True).start()
""")

TLS_CLIENT = textwrap.dedent("""\
    import json, socket, ssl, sys
    conns, echoes = int(sys.argv[1]), int(sys.argv[2])
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ok = 0
    for i in range(conns):
        with ctx.wrap_socket(socket.create_connection(("10.77.0.2", 5301), timeout=30),
                             server_hostname="s") as t:
            for _ in range(echoes):
                t.sendall(b"x" * 200)
                got = 0
                while got < 200:
                    got += len(t.recv(65536))
            ok += 1
    print(json.dumps({"connections": ok}))
""")


def _cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _softirq() -> float:
    with open("/proc/stat") as f:
        cpu = f.readline().split()
    return int(cpu[7]) / os.sysconf("SC_CLK_TCK")


def tls_probe(ns: dict, hosts: dict, tmp: str, conns: int, echoes: int, procs: list) -> dict:
    """TLS connections through the chain: frames to Suricata per connection, why inspection ended."""
    from microseg.agent import control

    if shutil.which("openssl") is None:
        return {"skipped": "openssl is not installed (the TLS server's certificate)"}
    cert, key = os.path.join(tmp, "c.pem"), os.path.join(tmp, "k.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert]
        + ["-days", "2", "-subj", "/CN=s"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    srv = subprocess.Popen(
        ["ip", "netns", "exec", ns["bench/server"], sys.executable, "-c", TLS_ECHO, cert, key],
        stdout=subprocess.PIPE,
        text=True,
    )
    procs.append(srv)
    assert srv.stdout is not None and srv.stdout.readline().strip() == "READY"

    def ids_stats():
        return {n: control.request(h["control"], "stats").get("ids", {}) for n, h in hosts.items()}

    keys = ("packets_to_ids", "ended_packets", "ended_bypass", "ended_encrypted", "ended_drop")
    b = ids_stats()
    r = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns["bench/client"],
            sys.executable,
            "-c",
            TLS_CLIENT,
            str(conns),
            str(echoes),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    done = json.loads(r.stdout)["connections"]
    # the last records may still be on their way through eve.json: wait for every end
    deadline = time.monotonic() + 30
    while True:
        a = ids_stats()
        d = {n: {k: a[n].get(k, 0) - b[n].get(k, 0) for k in keys} for n in a}
        if all(sum(v[k] for k in keys[1:]) >= done for v in d.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return {
        "connections": done,
        "echoes": echoes,
        "per_host": d,
        "frames_to_suricata_per_connection": {n: v["packets_to_ids"] / done for n, v in d.items()},
    }


def run_one(
    mode: str,
    policy: str,
    rules: str,
    conns: int,
    size: int,
    tmp: str,
    tls_conns: int = 0,
    tls_echoes: int = 0,
) -> dict:
    from microseg.agent import control
    from microseg.agent import lab as L

    state = os.path.join(tmp, f"st-{mode}")
    prefix = f"msbi{mode[0]}{os.getpid() % 10000}"
    every = mode == "every"
    L.up(
        policy,
        state,
        prefix,
        "vxlan",
        "warning",
        240,
        echo=lambda *_: None,
        offload=not every,
        ids_rules=rules,
        ids_packets=1 << 30 if every else 16,
    )
    procs = []
    try:
        d = json.loads(Path(state, "state.json").read_text())
        ns = {q: w["ns"] for q, w in d["workloads"].items()}
        hosts = d["hosts"]

        def ids_status():
            return {n: control.request(h["control"], "status").get("ids", {}) for n, h in hosts.items()}

        end = time.monotonic() + 120
        while time.monotonic() < end and not all(s.get("ready") for s in ids_status().values()):
            time.sleep(0.5)
        st = ids_status()
        if not all(s.get("ready") for s in st.values()):
            return {"skipped": f"Suricata not ready: {st}"}
        sink = subprocess.Popen(
            ["ip", "netns", "exec", ns["bench/server"], sys.executable, "-c", SINK],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(sink)
        assert sink.stdout.readline().strip() == "READY"
        pids = [h["pid"] for h in hosts.values()]
        spids = [s["pid"] for s in st.values() if s.get("pid")]
        s0 = L.stats(state)["hosts"]
        c0, i0, q0 = sum(map(_cpu, pids)), sum(map(_cpu, spids)), _softirq()
        r = subprocess.run(
            ["ip", "netns", "exec", ns["bench/client"], sys.executable, "-c", CLIENT, str(conns), str(size)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        c1, i1, q1 = sum(map(_cpu, pids)), sum(map(_cpu, spids)), _softirq()
        s1 = L.stats(state)["hosts"]
        moved = json.loads(r.stdout)
        ids = {n: control.request(h["control"], "stats").get("ids", {}) for n, h in hosts.items()}
        frames = sum(s1[h]["agent"]["packets"] - s0[h]["agent"]["packets"] for h in s1) + sum(
            s1[h]["fastpath"]["packets"] - s0[h]["fastpath"]["packets"] for h in s1
        )
        to_ids = sum(x.get("packets_to_ids", 0) for x in ids.values())
        sids = set()
        for h in hosts.values():
            eve = control.request(h["control"], "status").get("ids", {}).get("eve")
            if eve and os.path.exists(eve):
                for line in Path(eve).read_text().splitlines():
                    e = json.loads(line)
                    if e.get("event_type") == "alert":
                        sids.add(e["alert"]["signature_id"])
        gb = moved["bytes"] / 1e9
        tls = tls_probe(ns, hosts, tmp, tls_conns, tls_echoes, procs) if tls_conns else None
        return {
            "fastpath": {
                h: {"kind": s1[h]["fastpath"]["kind"], "reason": s1[h]["fastpath"].get("reason")} for h in s1
            },
            **({"tls": tls} if tls is not None else {}),
            "bytes": moved["bytes"],
            "seconds": moved["seconds"],
            "gbit_s": moved["bytes"] * 8 / moved["seconds"] / 1e9,
            "agent_cpu_s": c1 - c0,
            "suricata_cpu_s": i1 - i0,
            "softirq_s": q1 - q0,
            "host_cpu_s_per_gb": (c1 - c0 + i1 - i0 + q1 - q0) / gb,
            "frames_through_hosts": frames,
            "frames_to_suricata": to_ids,
            "share_to_suricata": to_ids / frames if frames else None,
            "alerts": sorted(sids),
            "both_attacks_caught": {9300001, 9300002} <= sids,
        }
    finally:
        for p in procs:
            p.kill()
            p.wait()
        L.down(state, echo=lambda *_: None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--bytes", type=int, default=8 << 20, help="per connection (default 8 MiB)")
    ap.add_argument("--tls-connections", type=int, default=20, help="TLS probe connections (0: none)")
    ap.add_argument("--tls-echoes", type=int, default=50, help="echoed messages per TLS connection")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ids_live.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/ids_live.py: skipped: needs root")
        return 0
    if shutil.which("suricata") is None:
        print("bench/ids_live.py: skipped: Suricata is not installed (.ci/suricata.sh installs it)")
        return 0
    ver = subprocess.run(["suricata", "-V"], capture_output=True, text=True).stdout.strip()
    res: dict = {
        "machine": {"cores": os.cpu_count(), "kernel": platform.release(), "load": os.getloadavg()},
        "suricata": ver,
        "connections": args.connections,
        "bytes_per_connection": args.bytes,
    }
    with tempfile.TemporaryDirectory() as tmp:
        rules = os.path.join(tmp, "bench.rules")
        Path(rules).write_text(RULES)
        policy = str(ROOT / "bench" / "live_policy.yaml")
        for mode in ("first", "every"):
            res[mode] = run_one(
                mode, policy, rules, args.connections, args.bytes, tmp, args.tls_connections, args.tls_echoes
            )
            print(mode, json.dumps(res[mode]), flush=True)
    if "host_cpu_s_per_gb" in res["first"] and "host_cpu_s_per_gb" in res["every"]:
        res["cpu_per_gb_first_over_every"] = (
            res["first"]["host_cpu_s_per_gb"] / res["every"]["host_cpu_s_per_gb"]
        )
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
