"""Traffic generator benchmark: packets/s of `generate()` against building the same packets
one at a time with scapy, measured in the same run.

For each scenario size, `generate()` (planning, NumPy expansion, compiled assembly) is timed
end to end (best of a few runs, after a warm-up). The peer rebuilds a sample of the very same
packets with scapy from their header fields (VXLAN / Ethernet / IPv4-IPv6 / TCP-UDP-ICMP /
payload, checksums and lengths left to scapy) and checks that scapy's bytes equal ours. The
compiled assembly pass is also timed against its plain-Python reference on a small scenario.
Writes bench/results/generator.json.

    python bench/generator.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from microseg.io import generator as G


def _fields(g, idx):
    """Header fields and payload of packets ``idx`` (read back with scapy; not timed)."""
    from scapy.all import IP, TCP, UDP, Ether, IPv6, raw
    from scapy.layers.vxlan import VXLAN

    out = []
    for i in idx:
        b = g.batch.packet(int(i))
        p = Ether(b)
        o = p[IP]
        e = Ether(bytes(p[VXLAN].payload))
        ip = e[IP] if IP in e else e[IPv6]
        if TCP in e:
            l4 = (
                "tcp",
                e[TCP].sport,
                e[TCP].dport,
                e[TCP].seq,
                e[TCP].ack,
                int(e[TCP].flags),
                e[TCP].window,
                bytes(e[TCP].payload),
            )
        elif UDP in e:
            l4 = ("udp", e[UDP].sport, e[UDP].dport, bytes(e[UDP].payload))
        else:  # ICMP / ICMPv6: echo or error
            x = ip.payload
            rb = raw(x)
            l4 = (
                "icmp" if IP in e else "icmp6",
                rb[0],
                rb[1],
                int.from_bytes(rb[4:6], "big"),
                int.from_bytes(rb[6:8], "big"),
                rb[8:],
            )
        v4 = IP in e
        out.append(
            (
                (p.src, p.dst, o.src, o.dst, o.id, p[UDP].sport, p[VXLAN].vni),
                (e.src, e.dst, v4, ip.src, ip.dst, ip.id if v4 else ip.fl),
                l4,
                b,
            )
        )
    return out


def _scapy_build(rows):
    from scapy.all import ICMP, IP, TCP, UDP, Ether, IPv6, Raw, raw
    from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest
    from scapy.layers.vxlan import VXLAN

    out = []
    for (osrc, odst, oip_s, oip_d, oid, osport, vni), (s, d, v4, a, z, ident), l4, _ in rows:
        inner = Ether(src=s, dst=d)
        inner /= (
            IP(src=a, dst=z, id=ident, flags="DF", ttl=64) if v4 else IPv6(src=a, dst=z, fl=ident, hlim=64)
        )
        if l4[0] == "tcp":
            inner /= TCP(sport=l4[1], dport=l4[2], seq=l4[3], ack=l4[4], flags=l4[5], window=l4[6]) / Raw(
                l4[7]
            )
        elif l4[0] == "udp":
            inner /= UDP(sport=l4[1], dport=l4[2]) / Raw(l4[3])
        elif l4[0] == "icmp":
            if l4[1] in (0, 8):
                inner /= ICMP(type=l4[1], id=l4[3], seq=l4[4]) / Raw(l4[5])
            else:
                inner /= ICMP(type=l4[1], code=l4[2]) / Raw(l4[5])
        elif l4[1] in (128, 129):
            cls = ICMPv6EchoRequest if l4[1] == 128 else ICMPv6EchoReply
            inner /= cls(id=l4[3], seq=l4[4], data=l4[5])
        else:
            inner /= ICMPv6DestUnreach(code=l4[2]) / Raw(l4[5])
        pkt = (
            Ether(src=osrc, dst=odst)
            / IP(src=oip_s, dst=oip_d, id=oid, flags="DF", ttl=64)
            / UDP(sport=osport, dport=4789, chksum=0)
            / VXLAN(vni=vni, flags=0x08)
            / inner
        )
        out.append(raw(pkt))
    return out


def best_of(fn, runs):
    best, res = float("inf"), None
    for _ in range(runs):
        t = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t)
    return best, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, fewer repetitions")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "generator.json"))
    args = ap.parse_args()
    policy = G.load_policy()
    G.generate(policy, {"flows": 30, "seed": 1})  # compile / load caches
    sizes = [2000] if args.quick else [2000, 20000]
    sample = 1000 if args.quick else 3000
    runs = 2 if args.quick else 3
    rows = []
    for flows in sizes:
        t_gen, g = best_of(lambda: G.generate(policy, {"flows": flows, "seed": 7}), runs)
        n = len(g.batch)
        idx = np.linspace(0, n - 1, min(sample, n)).astype(np.int64)
        fields = _fields(g, idx)
        t_scapy, built = best_of(lambda: _scapy_build(fields), 1 if not args.quick else 1)
        same = sum(b == f[3] for b, f in zip(built, fields))
        rows.append(
            {
                "flows": flows,
                "packets": n,
                "bytes": int(g.batch.data.nbytes),
                "generate_s": round(t_gen, 3),
                "generate_pps": round(n / t_gen),
                "generate_gbit_s": round(g.batch.data.nbytes * 8 / t_gen / 1e9, 3),
                "scapy_sample": len(idx),
                "scapy_pps": round(len(idx) / t_scapy),
                "scapy_identical": int(same),
                "speedup": round((n / t_gen) / (len(idx) / t_scapy), 1),
            }
        )
        print(rows[-1], flush=True)
    # the compiled assembly pass against its plain-Python reference
    t_k, gk = best_of(lambda: G.generate(policy, {"flows": 15, "seed": 3}), runs)
    t_r, gr = best_of(lambda: G.generate(policy, {"flows": 15, "seed": 3}, assembler=G.assemble_ref), 1)
    assert np.array_equal(gk.batch.data, gr.batch.data)
    asm = {
        "flows": 15,
        "packets": len(gk.batch),
        "bytes": int(gk.batch.data.nbytes),
        "generate_s_compiled": round(t_k, 4),
        "generate_s_reference_assembly": round(t_r, 4),
        "ratio": round(t_r / t_k, 1),
    }
    print(asm)
    res = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_avg": os.getloadavg(),
        },
        "quick": args.quick,
        "rows": rows,
        "assembly": asm,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
