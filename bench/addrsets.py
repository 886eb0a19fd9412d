"""Address sets benchmark: a security group of N workloads that admits itself.

One tenant, N workloads with scattered IPv4 addresses (no two adjacent, so no prefix merges
them), all in the group ``default`` with Neutron's stock rules: ingress from the group itself,
egress anywhere; plus a few workloads outside the group. For N in 250, 500, 1000, 2000, 4000
it measures, for the compiled form with address sets ("sets") and the older expansion into
one classifier rule per (local address, member address) pair ("pairs",
``compile_policy(..., address_sets=False)``, the code before address sets, in the same run):

* compile time, the tracemalloc peak of the compile (Python and NumPy allocations), and the
  compiled arrays' bytes (rule set, classifier, set tables);
* decision throughput: ``CompiledPolicy.decide`` on batches of NEW packets between random
  workloads (members and outsiders);
* membership updates with ``with_members``: an outsider joins the group (its own classifier
  rules stay the same: the classifier is shared) and a member leaves it (it loses the
  group's egress rule: the classifier is rebuilt).

The pair expansion grows as N**2; it is measured up to ``--pairs-max`` workloads (default
500: 1000 takes minutes and a gigabyte) and extrapolated quadratically beyond (marked
``extrapolated_from`` in the results). Writes bench/results/addrsets.json.

    python bench/addrsets.py [--quick] [--pairs-max N]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import time
import tracemalloc

import numpy as np
import yaml

from microseg import ctstate
from microseg.packet import batch as B
from microseg.packet.batch import FlowKeys
from microseg.policy.compiler import compile_policy
from microseg.policy.model import parse_policy

OUTSIDERS = 8


def make_policy(n: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    offs = rng.choice(1 << 21, size=n + OUTSIDERS, replace=False) * 4 + 1  # scattered, never adjacent
    wl = []
    for i, off in enumerate(offs):
        w = {"name": f"w{i}", "tenant": "t", "ipv4": str(ipaddress.IPv4Address((10 << 24) + int(off)))}
        w["security_groups"] = ["default"] if i < n else ["other"]
        wl.append(w)
    doc = {
        "tenants": [{"name": "t", "vni": 100}],
        "security_groups": [
            {
                "name": "default",
                "tenant": "t",
                "rules": [
                    {"direction": "ingress", "remote_group_id": "default"},
                    {"direction": "egress"},
                ],
            },
            {
                "name": "other",
                "tenant": "t",
                "rules": [
                    {"direction": "ingress", "protocol": "tcp", "port_range_min": 80, "port_range_max": 80},
                    {"direction": "egress"},
                ],
            },
        ],
        "workloads": wl,
    }
    return parse_policy(yaml.safe_dump(doc, sort_keys=False), "addrsets.yaml")


def make_traffic(policy, n: int, rng) -> tuple[FlowKeys, np.ndarray]:
    wl = policy.workloads
    k = FlowKeys(n).resize(n)
    src = rng.integers(len(wl), size=n)
    dst = rng.integers(len(wl), size=n)
    lo = np.array([0xFFFF00000000 | int(w.addresses[0]) for w in wl], np.uint64)
    k.i32[B.TENANT, :n] = 100
    k.u64[B.SRC_HI, :n] = 0
    k.u64[B.DST_HI, :n] = 0
    k.u64[B.SRC_LO, :n] = lo[src]
    k.u64[B.DST_LO, :n] = lo[dst]
    k.u8[B.IP_VER, :n] = 4
    k.u16[B.ETHERTYPE, :n] = 0x0800
    k.u8[B.PROTO, :n] = 6
    k.u8[B.FLAGS, :n] = B.F_PORTS
    k.u16[B.SPORT, :n] = rng.integers(1024, 65535, size=n)
    k.u16[B.DPORT, :n] = rng.choice([22, 80, 443, 5432], size=n)
    k.i32[B.L2_OFF, :n] = -1
    return k, np.full(n, ctstate.NEW | ctstate.TRACKED, np.uint8)


def _slice(k: FlowKeys, s: int, e: int) -> FlowKeys:
    out = FlowKeys(e - s).resize(e - s)
    for t in ("u64", "u32", "i32", "u16", "u8"):
        getattr(out, t)[:, : e - s] = getattr(k, t)[:, s:e]
    return out


def compiled_bytes(c) -> dict:
    return {
        "ruleset": int(c.ruleset.nbytes()),
        "classifier": int(c.classifier.nbytes()),
        "sets": int(c.sets.nbytes()),
        "endpoint_and_check_tables": int(
            sum(a.nbytes for a in (*c._a, *c._m, c._w_mac, c._need, c._act, c._t_vni))
        ),
    }


def measure_compile(policy, address_sets: bool, reps: int) -> tuple[object, dict]:
    """Compile time (best of ``reps``, without tracing), then one more compile under
    tracemalloc for its peak."""
    took = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        c = compile_policy(policy, address_sets=address_sets)
        took = min(took, time.perf_counter() - t0)
        del c
    tracemalloc.start()
    c = compile_policy(policy, address_sets=address_sets)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    nb = compiled_bytes(c)
    return c, {
        "compile_s": round(took, 3),
        "tracemalloc_peak_mib": round(peak / 2**20, 2),
        "arrays_mib": round(sum(nb.values()) / 2**20, 3),
        "arrays_bytes": nb,
        "classifier_rules": int(c.n_classifier_rules),
        "set_rules": int(c.sets.n_rules),
        "sets": int(c.sets.n_sets) if c.sets.n_rules else 0,
    }


def measure_decide(compiled: list, chunks, reps: int) -> list:
    """Mpps of each compiled policy's decide over ``chunks``, best of ``reps`` runs taken
    interleaved (so changes of load hit every contender)."""
    best = [float("inf")] * len(compiled)
    for c in compiled:
        c.decide(*chunks[0])
    for _ in range(reps):
        for j, c in enumerate(compiled):
            t0 = time.perf_counter()
            for kk, cc in chunks:
                c.decide(kk, cc)
            best[j] = min(best[j], time.perf_counter() - t0)
    n = sum(kk.n for kk, _ in chunks)
    return [round(n / b / 1e6, 3) for b in best]


def run(quick: bool, pairs_max: int) -> dict:
    sizes = [250, 500] if quick else [250, 500, 1000, 2000, 4000]
    n_pk = 16384 if quick else 65536
    bs = 1024
    reps = 3 if quick else 7
    rng = np.random.default_rng(7)
    compile_policy(make_policy(20))  # warm the kernels' caches
    compile_policy(make_policy(20), address_sets=False)
    out = {"machine": platform.processor() or platform.machine(), "batch": bs, "packets": n_pk, "cases": []}
    for n in sizes:
        policy = make_policy(n)
        keys, ct = make_traffic(policy, n_pk, rng)
        chunks = [(_slice(keys, s, min(s + bs, n_pk)), ct[s : min(s + bs, n_pk)]) for s in range(0, n_pk, bs)]
        sets, sm = measure_compile(policy, True, 3)
        members = [w.name for w in policy.workloads if "default" in w.security_groups]
        for what, names in (("join", members + [f"w{n}"]), ("leave", members[1:])):
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                upd = sets.with_members("t", "default", names)
                best = min(best, time.perf_counter() - t0)
            sm[f"update_{what}_s"] = round(best, 3)
            sm[f"update_{what}_shares_classifier"] = bool(upd.shares_classifier)
        case = {"workloads": n, "sets": sm}
        if n <= pairs_max:
            pairs, pm = measure_compile(policy, False, 1)
            v1, r1, w1 = sets.decide(keys, ct)
            v2, _, w2 = pairs.decide(keys, ct)
            assert np.array_equal(v1, v2) and np.array_equal(w1, w2), "the two forms disagree"
            sm["decide_mpps"], pm["decide_mpps"] = measure_decide([sets, pairs], chunks, reps)
            pm["measured"] = True
            del pairs
        else:
            (sm["decide_mpps"],) = measure_decide([sets], chunks, reps)
            pm = {"measured": False}
        case["pairs"] = pm
        out["cases"].append(case)
        print(json.dumps(case), flush=True)
    # extrapolate the pair expansion quadratically from the largest measured size
    meas = [c for c in out["cases"] if c["pairs"]["measured"]]
    if meas:
        base = meas[-1]
        n0 = base["workloads"]
        for c in out["cases"]:
            if not c["pairs"]["measured"]:
                f = (c["workloads"] / n0) ** 2
                p = base["pairs"]
                n = c["workloads"]
                c["pairs"].update(
                    {
                        # exact: N**2 ingress pairs, N egress rules, the outsiders' two each
                        "classifier_rules": n * n + n + 2 * OUTSIDERS,
                        "compile_s": round(p["compile_s"] * f, 1),
                        "tracemalloc_peak_mib": round(p["tracemalloc_peak_mib"] * f, 1),
                        "arrays_mib": round(p["arrays_mib"] * f, 1),
                        "extrapolated_from": n0,
                    }
                )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small run (250 and 500 workloads)")
    ap.add_argument("--pairs-max", type=int, default=500, help="largest N compiled with the pair expansion")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "addrsets.json"))
    args = ap.parse_args()
    res = run(args.quick, args.pairs_max)
    res["quick"] = args.quick
    res["pairs_max"] = args.pairs_max
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
