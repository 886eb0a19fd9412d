"""Policy decision benchmark: CompiledPolicy.decide against the per-packet reference.

A generated data centre (tenants x workloads with security groups, remote-group rules and a
NetworkPolicy per tenant) and random traffic between its workloads. Reports packets/s of the
compiled decision with two classifiers (tuple space search, decision tree) for all-NEW
traffic (the worst case) and a mix where most packets belong to established connections,
against the plain-Python reference measured in the same run, plus compile time. Writes bench/results/policy.json.

    python bench/policy.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import yaml

from microseg import ctstate
from microseg.packet import batch as B
from microseg.packet.batch import FlowKeys
from microseg.policy.compiler import compile_policy
from microseg.policy.model import parse_policy
from microseg.policy.reference import Reference


def make_policy(tenants: int, per_tenant: int) -> dict:
    roles = ["web", "web", "api", "db", "bastion"]
    doc = {
        "tenants": [],
        "hosts": [{"name": f"h{i}", "address": f"10.255.0.{i + 1}"} for i in range(4)],
        "security_groups": [],
        "workloads": [],
        "network_policies": [],
        "default_egress": "allow",
    }
    for t in range(tenants):
        tn = f"t{t}"
        doc["tenants"].append({"name": tn, "vni": 5000 + t})
        doc["security_groups"] += [
            {
                "name": "web",
                "tenant": tn,
                "rules": [
                    {"direction": "ingress", "protocol": "tcp", "port_range_min": 80, "port_range_max": 80},
                    {"direction": "ingress", "protocol": "tcp", "port_range_min": 443, "port_range_max": 443},
                    {
                        "direction": "ingress",
                        "ethertype": "IPv6",
                        "protocol": "tcp",
                        "port_range_min": 443,
                        "port_range_max": 443,
                    },
                    {
                        "direction": "ingress",
                        "protocol": "tcp",
                        "port_range_min": 22,
                        "port_range_max": 22,
                        "remote_group_id": "bastion",
                    },
                    {"direction": "ingress", "protocol": "icmp", "remote_ip_prefix": "10.0.0.0/8"},
                ],
            },
            {
                "name": "db",
                "tenant": tn,
                "rules": [
                    {
                        "direction": "ingress",
                        "protocol": "tcp",
                        "port_range_min": 5432,
                        "port_range_max": 5432,
                        "remote_group_id": "web",
                    }
                ],
            },
            {
                "name": "bastion",
                "tenant": tn,
                "rules": [{"direction": "egress"}, {"direction": "egress", "ethertype": "IPv6"}],
            },
        ]
        for w in range(per_tenant):
            role = roles[w % len(roles)]
            wl = {
                "name": f"w{w}",
                "tenant": tn,
                "host": f"h{w % 4}",
                "mac": "02:%02x:%02x:%02x:00:01" % (t, w >> 8, w & 0xFF),
                "ipv4": f"10.{w >> 8}.{w & 0xFF}.1",
                "ipv6": f"fd00::{w + 1:x}",
                "labels": {"app": role},
            }
            if role != "api":
                wl["security_groups"] = [role]
            doc["workloads"].append(wl)
        doc["network_policies"].append(
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": "api", "namespace": tn},
                "spec": {
                    "podSelector": {"matchLabels": {"app": "api"}},
                    "ingress": [
                        {
                            "from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                            "ports": [{"port": 8080}],
                        }
                    ],
                },
            }
        )
    return doc


def make_traffic(policy, n: int, rng, established_share: float):
    wl = policy.workloads
    k = FlowKeys(n).resize(n)
    ct = np.empty(n, np.uint8)
    by_tenant = {}
    for w in wl:
        by_tenant.setdefault(w.tenant, []).append(w)
    vni = {t.name: t.vni for t in policy.tenants}
    tnames = list(by_tenant)
    for i in range(n):
        t = tnames[rng.integers(len(tnames))]
        ws = by_tenant[t]
        a, b = ws[rng.integers(len(ws))], ws[rng.integers(len(ws))]
        v6 = rng.random() < 0.2
        sa = [x for x in a.addresses if x.version == (6 if v6 else 4)][0]
        da = [x for x in b.addresses if x.version == (6 if v6 else 4)][0]
        if rng.random() < 0.1:  # from outside
            sa = type(sa)(int(sa) ^ 0x0F000000) if not v6 else type(sa)(int(sa) + (1 << 100))
        k.i32[B.TENANT, i] = vni[t]
        k.u64[B.SRC_HI, i], k.u64[B.SRC_LO, i] = B.text_to_addr(str(sa))
        k.u64[B.DST_HI, i], k.u64[B.DST_LO, i] = B.text_to_addr(str(da))
        k.u8[B.IP_VER, i] = 6 if v6 else 4
        k.u16[B.ETHERTYPE, i] = 0x86DD if v6 else 0x0800
        k.i32[B.L2_OFF, i] = 0
        k.u64[B.ETH_SRC, i] = a.mac
        if rng.random() < 0.9:
            k.u8[B.PROTO, i] = 6
            k.u8[B.FLAGS, i] = B.F_PORTS
            k.u16[B.SPORT, i] = rng.integers(1024, 65535)
            k.u16[B.DPORT, i] = [80, 443, 22, 5432, 8080, 25][rng.integers(6)]
        else:
            k.u8[B.PROTO, i] = 58 if v6 else 1
            k.u8[B.FLAGS, i] = B.F_ICMP
            k.u8[B.ICMP_TYPE, i] = 128 if v6 else 8
        u = rng.random()
        ct[i] = (ctstate.ESTABLISHED if u < established_share else ctstate.NEW) | ctstate.TRACKED
    return k, ct


def _slice(k: FlowKeys, s: int, e: int) -> FlowKeys:
    out = FlowKeys(e - s).resize(e - s)
    for t in ("u64", "u32", "i32", "u16", "u8"):
        getattr(out, t)[:, : e - s] = getattr(k, t)[:, s:e]
    return out


def run(quick: bool) -> dict:
    rng = np.random.default_rng(1)
    sizes = [50] if quick else [25, 100]
    n = 16384 if quick else 32768
    reps = 3 if quick else 7
    algos = ("tss", "tree")
    results = {"machine": platform.processor() or platform.machine(), "cases": []}
    for per in sizes:
        doc = make_policy(4, per)
        policy = parse_policy(yaml.safe_dump(doc, sort_keys=False), "bench.yaml")
        ref = Reference(policy)
        compiled, compile_s = {}, {}
        for algo in algos:
            compile_policy(policy, algo)  # warm the kernels' caches
            t0 = time.perf_counter()
            compiled[algo] = compile_policy(policy, algo)
            compile_s[algo] = time.perf_counter() - t0
        for mix, est in (("all_new", 0.0), ("mostly_established", 0.8)):
            keys, ct = make_traffic(policy, n, rng, est)
            m = 2000
            sub = _slice(keys, 0, m)
            cases = {
                a: {
                    "workloads": 4 * per,
                    "rules": len(compiled[a].ruleset),
                    "algo": a,
                    "compile_s": round(compile_s[a], 3),
                    "traffic": mix,
                    "packets": n,
                }
                for a in algos
            }
            for bs in (256, 4096):
                chunks = [(_slice(keys, s, min(s + bs, n)), ct[s : min(s + bs, n)]) for s in range(0, n, bs)]
                best = {a: float("inf") for a in algos}
                best_ref = float("inf")
                for _ in range(reps):  # interleaved, so load changes hit every contender
                    for a in algos:
                        c = compiled[a]
                        c.decide(*chunks[0])
                        t0 = time.perf_counter()
                        for kk, cc in chunks:
                            c.decide(kk, cc)
                        best[a] = min(best[a], time.perf_counter() - t0)
                    if bs == 256 and _ < 2:
                        t0 = time.perf_counter()
                        for i in range(m):
                            ref.decide_row(sub.row(i), int(ct[i]))
                        best_ref = min(best_ref, time.perf_counter() - t0)
                if bs == 256:
                    ref_pps = m / best_ref
                for a in algos:
                    cases[a][f"decide_pps_batch{bs}"] = round(n / best[a])
                    cases[a][f"speedup_vs_reference_batch{bs}"] = round(n / best[a] / ref_pps, 1)
            for a in algos:
                cases[a]["reference_pps"] = round(ref_pps)
                cases[a]["tss_over_tree_batch256"] = round(
                    cases["tss"]["decide_pps_batch256"] / cases["tree"]["decide_pps_batch256"], 2
                )
                results["cases"].append(cases[a])
                print(json.dumps(cases[a]), flush=True)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run (one policy size, fewer packets)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "policy.json"))
    args = ap.parse_args()
    res = run(args.quick)
    res["quick"] = args.quick
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
