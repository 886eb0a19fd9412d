"""Flow caches, inspection and offload: throughput against the slow path they stand in for.

Same run, same machine, each number beside its baseline:

1. Cache hierarchy (EMC -> megaflow -> slow path with mask derivation and inserts) against
   classifying every packet with the classifier (tuple space search and decision tree), and
   an EMC alone in front of the decision tree, on ClassBench sets with a Zipf-popular packet
   stream over the trace's headers.
2. Megaflow masks derived from the rules against the classifier's own wildcard tracking
   (tuple space search): distinct masks, entries and hit rate each gives on the same stream.
3. Signature inspection (one Aho-Corasick pass + candidate checks) against checking every rule
   on every packet.
4. Fast-path table lookup kernel against the EMC lookup kernel (same key, same batch).
5. Offload simulation: share of packets and bytes on the fast path, occupancy and refused
   offers, for the default limits (500,000 flows, 7,000 inserts/s) and variations.

    python bench/cache_offload.py [--quick]
Writes bench/results/cache_offload.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from microseg.cache import ExactMatchCache, MegaflowCache, hash_keys, megaflow_masks
from microseg.cache.match import RuleMatchTable
from microseg.classify import build
from microseg.classify.classbench import load_rules, load_trace
from microseg.offload.handoff import FlowInspector
from microseg.offload.inspect import SignatureSet
from microseg.offload.table import FastPathTable
from microseg.packet import batch as B
from microseg.packet.batch import Batch, FlowKeys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VEC = os.path.join(ROOT, "tests", "vectors", "classbench")
BATCH = 256


def zipf_stream(n_flows, n_pkts, s, rng):
    w = 1.0 / np.arange(1, n_flows + 1) ** s
    w /= w.sum()
    perm = rng.permutation(n_flows)
    return perm[rng.choice(n_flows, n_pkts, p=w)]


def best_of(fn, repeats, budget_s=8.0):
    """Best wall time of ``repeats`` runs (fewer when one run takes more than ``budget_s``)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        if best > budget_s:
            break
    return best


def bench_hierarchy(family, size, n_pkts, repeats, rng):
    rs = load_rules(os.path.join(VEC, f"{family}_{size}.rules"))
    flows = load_trace(os.path.join(VEC, f"{family}_{size}.trace"))
    idx = zipf_stream(flows.shape[0], n_pkts, 1.1, rng)
    K = np.ascontiguousarray(flows[idx])
    H = hash_keys(K)
    V = np.ones(K.shape[0], bool)
    table = RuleMatchTable.from_ruleset(rs)
    tss, tree = build(rs, "tss"), build(rs, "tree")
    truth = tss.classify_keys(K)

    def run_classifier(clf):
        for s in range(0, K.shape[0], BATCH):
            clf.classify_keys(K[s : s + BATCH])

    state = {}

    def run_caches(masks_from="rules"):
        emc, mf = ExactMatchCache(8192), MegaflowCache(65536)
        slow = 0
        got = np.empty(K.shape[0], np.int32)
        for s in range(0, K.shape[0], BATCH):
            k, h, v = K[s : s + BATCH], H[s : s + BATCH], V[s : s + BATCH]
            e = emc.lookup(k, h, v)
            m = mf.lookup(k, v & ~e.hit)
            miss = ~e.hit & ~m.hit
            rule = np.where(e.hit, e.rule, m.rule)
            if miss.any():
                km = np.ascontiguousarray(k[miss])
                if masks_from == "rules":
                    best, masks = megaflow_masks(table, km)
                else:
                    best, masks = tss.impl.classify_keys(km, wildcards=True)
                mf.insert(km, masks, np.ones(km.shape[0], bool), rs.actions(best), best)
                rule[miss] = best
                slow += int(miss.sum())
            emc.insert(k, h, ~e.hit, rs.actions(rule), rule)
            got[s : s + BATCH] = rule
        state[masks_from] = (emc.stats(), mf.stats(), slow, got)

    def run_emc_then(clf):
        emc = ExactMatchCache(8192)
        got = np.empty(K.shape[0], np.int32)
        for s in range(0, K.shape[0], BATCH):
            k, h, v = K[s : s + BATCH], H[s : s + BATCH], V[s : s + BATCH]
            e = emc.lookup(k, h, v)
            rule = e.rule
            miss = ~e.hit
            if miss.any():
                rule[miss] = clf.classify_keys(np.ascontiguousarray(k[miss]))
            emc.insert(k, h, miss, rs.actions(rule), rule)
            got[s : s + BATCH] = rule
        state["emc_" + clf.algo] = got

    run_caches("rules")  # warm up kernels
    run_emc_then(tree)
    t_tss = best_of(lambda: run_classifier(tss), repeats)
    t_tree = best_of(lambda: run_classifier(tree), repeats)
    t_cache = best_of(lambda: run_caches("rules"), repeats)
    t_cache_tss = best_of(lambda: run_caches("tss"), repeats)
    t_emc_tree = best_of(lambda: run_emc_then(tree), repeats)
    t_emc_tss = best_of(lambda: run_emc_then(tss), repeats)
    out = {
        "family": family,
        "rules": size,
        "packets": int(K.shape[0]),
        "flows": int(flows.shape[0]),
        "batch": BATCH,
        "mpps": {
            "tss": K.shape[0] / t_tss / 1e6,
            "tree": K.shape[0] / t_tree / 1e6,
            "caches": K.shape[0] / t_cache / 1e6,
            "caches_tss_wildcards": K.shape[0] / t_cache_tss / 1e6,
            "emc_then_tree": K.shape[0] / t_emc_tree / 1e6,
            "emc_then_tss": K.shape[0] / t_emc_tss / 1e6,
        },
        "emc_then_classifier_wrong_answers": int(np.count_nonzero(state["emc_tree"] != truth))
        + int(np.count_nonzero(state["emc_tss"] != truth)),
    }
    for name in ("rules", "tss"):
        e, m, slow, got = state[name]
        wrong = int(np.count_nonzero(got != truth))
        out[f"masks_from_{name}"] = {
            "emc_hit_rate": e["hit_rate"],
            "megaflow_hits": m["hits"],
            "slow_path_share": slow / K.shape[0],
            "megaflow_masks": m["masks"],
            "megaflow_entries": m["entries"],
            "probes_per_lookup": m["probes_per_lookup"],
            "mask_table_full": m["mask_table_full"],
            "wrong_answers": wrong,
        }
    out["speedup_vs_tss"] = out["mpps"]["caches"] / out["mpps"]["tss"]
    return out


def make_rules(n, rng):
    alpha = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
    lines, pats = [], []
    for i in range(n):
        p = bytes(rng.choice(alpha, int(rng.integers(8, 16))))
        pats.append(p)
        extra = ""
        if i % 3 == 0:
            q = bytes(rng.choice(alpha, 4)).decode()
            extra = f' content:"{q}"; distance:0; within:64;'
        nocase = " nocase;" if i % 2 else ""
        lines.append(
            f'alert tcp any any -> any any (msg:"r{i}"; content:"{p.decode()}";{nocase}{extra} sid:{i + 1};)'
        )
    return "\n".join(lines), pats


def make_packets(n, pats, rng, hit_share=0.02):
    alpha = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ./=&", np.uint8)
    pkts = []
    for _ in range(n):
        pay = bytearray(rng.choice(alpha, int(rng.integers(200, 1400))).tobytes())
        if rng.random() < hit_share:
            p = pats[int(rng.integers(0, len(pats)))]
            o = int(rng.integers(0, len(pay) - len(p)))
            pay[o : o + len(p)] = p
        pkts.append(bytes(pay))
    return pkts


def bench_inspection(n_rules, n_pkts, repeats, rng):
    text, pats = make_rules(n_rules, rng)
    t = time.perf_counter()
    sigs = SignatureSet.from_text(text)
    t_build = time.perf_counter() - t
    payloads = make_packets(n_pkts, pats, rng)
    nbytes = sum(len(p) for p in payloads)

    def scan():
        hits = 0
        for p in payloads:
            hits += bool(sigs.match_packet(p, 6, 1, 2, 1000, 80))
        return hits

    def naive(ps):
        hits = 0
        from microseg.offload.inspect import _LOWER, contents_match

        for p in ps:
            low = p.translate(_LOWER)
            hits += any(contents_match(s.contents, p, low) for s in sigs.signatures)
        return hits

    hits = scan()
    t_ac = best_of(scan, repeats)
    few = payloads[: max(20, n_pkts // 20)]
    t_naive = best_of(lambda: naive(few), 1)
    assert naive(few[:10]) == sum(bool(sigs.match_packet(p, 6, 1, 2, 1000, 80)) for p in few[:10])
    pps_ac, pps_naive = n_pkts / t_ac, len(few) / t_naive
    return {
        "rules": n_rules,
        "packets": n_pkts,
        "matching_packets": hits,
        "build_s": t_build,
        "aho_corasick": {"pps": pps_ac, "MBps": nbytes / t_ac / 1e6},
        "every_rule": {"pps": pps_naive},
        "speedup": pps_ac / pps_naive,
    }


def bench_table_lookup(n_flows, n_pkts, repeats, rng):
    fam_keys = load_trace(os.path.join(VEC, "acl_10000.trace"))
    reps = int(np.ceil(n_flows / fam_keys.shape[0]))
    keys = np.concatenate([fam_keys] * reps)[:n_flows].copy()
    keys[:, 6] = np.arange(n_flows, dtype=np.uint64) << np.uint64(16)  # distinct flows
    idx = zipf_stream(n_flows, n_pkts, 1.0, rng)
    K = np.ascontiguousarray(keys[idx])
    V = np.ones(n_pkts, bool)
    wire = np.full(n_pkts, 500, np.int64)
    ts = np.zeros(n_pkts, np.int64)
    tab = FastPathTable(capacity=500_000, rate=1e12, burst=1e12)
    tab.offer(
        keys, np.ones(n_flows, bool), np.arange(n_flows), 1, np.arange(n_flows), np.zeros(n_flows, np.int64)
    )
    emc = ExactMatchCache(1 << 20)
    H = hash_keys(K)
    emc.insert(keys, hash_keys(keys), np.ones(n_flows, bool), 1, 0)

    def fp():
        for s in range(0, n_pkts, BATCH):
            tab.lookup(K[s : s + BATCH], V[s : s + BATCH], wire[s : s + BATCH], ts[s : s + BATCH])

    def em():
        for s in range(0, n_pkts, BATCH):
            emc.lookup(K[s : s + BATCH], H[s : s + BATCH], V[s : s + BATCH])

    fp()
    em()
    t_fp, t_em = best_of(fp, repeats), best_of(em, repeats)
    return {
        "flows": n_flows,
        "packets": n_pkts,
        "fastpath_mpps": n_pkts / t_fp / 1e6,
        "emc_mpps": n_pkts / t_em / 1e6,
        "fastpath_hits": tab.stats()["hits"] // (repeats + 1),
    }


def synth_traffic(n_flows, seconds, rng, min_pkts=4):
    """Flows with Poisson arrivals, Pareto sizes (at least ``min_pkts``), 1 ms between a
    flow's packets."""
    start = rng.uniform(0, seconds, n_flows)
    size = np.minimum((rng.pareto(1.2, n_flows) + 1) * min_pkts, 20000).astype(np.int64)
    fid = np.repeat(np.arange(n_flows), size)
    seq = np.concatenate([np.arange(s) for s in size])
    t = start[fid] + seq * 1e-3
    order = np.argsort(t, kind="stable")
    fid, seq, t = fid[order], seq[order], t[order]
    big = size[fid] > 200
    wire = np.where(big, 1400, np.where(rng.random(fid.shape[0]) < 0.5, 80, 600)).astype(np.int32)
    return fid, seq, (t * 1e9).astype(np.int64), wire


def bench_offload(configs, rng):
    fk = FlowKeys(BATCH)
    results = []
    traffic = {}
    for n_flows, seconds, min_pkts, cap, rate in configs:
        if (n_flows, seconds, min_pkts) not in traffic:
            traffic[(n_flows, seconds, min_pkts)] = synth_traffic(n_flows, seconds, rng, min_pkts)
        fid, seq, ts, wire = traffic[(n_flows, seconds, min_pkts)]
        peak = 0
        n = fid.shape[0]
        tab = FastPathTable(capacity=cap, rate=rate)
        fi = FlowInspector(None, tab, n_inspect=8, flows=1 << 18)
        t0 = time.perf_counter()
        for s in range(0, n, BATCH):
            e = min(s + BATCH, n)
            m = e - s
            f = fid[s:e]
            fk.resize(m)
            for t in (fk.u64, fk.u32, fk.i32, fk.u16, fk.u8):
                t[:, :m] = 0
            fk.u8[B.IP_VER, :m] = 4
            fk.u8[B.PROTO, :m] = 6
            fk.u8[B.FLAGS, :m] = B.F_PORTS
            fk.u8[B.TCP_FLAGS, :m] = np.where(seq[s:e] == 0, 0x02, 0x10)
            fk.u64[B.SRC_LO, :m] = np.uint64(0xFFFF0A000000) | (f.astype(np.uint64) >> np.uint64(16))
            fk.u64[B.DST_LO, :m] = np.uint64(0xFFFF0B000000) | (f.astype(np.uint64) & np.uint64(0xFFFF))
            fk.u16[B.SPORT, :m] = 1024 + (f % 60000)
            fk.u16[B.DPORT, :m] = 443
            fk.i32[B.TENANT, :m] = -1
            fk.i32[B.PAYLOAD_OFF, :m] = -1
            batch = Batch(
                np.zeros(1, np.uint8),
                np.zeros(m, np.int64),
                np.zeros(m, np.int32),
                wire[s:e],
                np.zeros(m, np.uint16),
                ts[s:e],
            )
            from microseg.cache.key import build_keys

            kmat, _, valid = build_keys(fk)
            flow = tab.flow_keys(kmat, valid)
            hit, _, _ = tab.lookup(kmat, valid, batch.wire_len, batch.ts, flow)
            fi.process(batch, fk, kmat, valid, ~hit, None, flow)
            if (s // BATCH) % 64 == 0:
                peak = max(peak, tab.used)
                tab.expire(int(ts[e - 1]), 2 * 10**9)
        dt = time.perf_counter() - t0
        st = tab.stats()
        results.append(
            {
                "capacity": cap,
                "rate": rate,
                "packets": n,
                "flows": n_flows,
                "seconds": seconds,
                "new_flows_per_s": n_flows / seconds,
                "min_pkts_per_flow": min_pkts,
                "packet_share": st["packet_share"],
                "byte_share": st["byte_share"],
                "peak_occupancy": max(peak, st["occupancy"]),
                "inserts": st["inserts"],
                "offers_refused": st["refused"],
                "flows_by_state": fi.stats()["flows"],
                "sim_mpps": n / dt / 1e6,
            }
        )
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(1)
    q = args.quick
    t0 = time.time()
    res = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": sys.version.split()[0],
        },
        "quick": q,
    }
    try:
        res["machine"]["cpu"] = next(
            l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    sets = [("acl", 1000), ("fw", 1000)] if q else [("acl", 1000), ("fw", 1000), ("ipc", 1000), ("fw", 10000)]
    res["hierarchy"] = []
    for fam, size in sets:
        r = bench_hierarchy(fam, size, 50_000 if q else 100_000, 1 if q else 2, rng)
        print(
            f"hierarchy {fam}_{size}: caches {r['mpps']['caches']:.2f} Mpps, tss {r['mpps']['tss']:.2f}, "
            f"tree {r['mpps']['tree']:.2f}, emc+tree {r['mpps']['emc_then_tree']:.2f}, "
            f"emc+tss {r['mpps']['emc_then_tss']:.2f}; masks {r['masks_from_rules']['megaflow_masks']} "
            f"(tss wildcards {r['masks_from_tss']['megaflow_masks']}); wrong {r['masks_from_rules']['wrong_answers']}",
            flush=True,
        )
        res["hierarchy"].append(r)
    res["inspection"] = [
        bench_inspection(n, 500 if q else 1000, 1 if q else 2, rng)
        for n in ((200, 2000) if not q else (200,))
    ]
    for r in res["inspection"]:
        print(
            f"inspection {r['rules']} rules: {r['aho_corasick']['pps']:.0f} pkt/s "
            f"({r['aho_corasick']['MBps']:.1f} MB/s) vs every rule {r['every_rule']['pps']:.0f} pkt/s",
            flush=True,
        )
    res["table_lookup"] = bench_table_lookup(
        100_000 if q else 400_000, 200_000 if q else 1_000_000, 1 if q else 2, rng
    )
    print("table lookup", res["table_lookup"], flush=True)
    if q:
        cfgs = [(5_000, 5, 4, 500_000, 7000.0), (20_000, 2, 8, 500_000, 7000.0)]
    else:
        cfgs = [
            (30_000, 10, 4, 500_000, 7000.0),
            (50_000, 5, 8, 500_000, 7000.0),
            (50_000, 5, 8, 500_000, 70_000.0),
            (50_000, 5, 8, 5_000, 70_000.0),
        ]
    res["offload"] = bench_offload(cfgs, rng)
    for r in res["offload"]:
        print("offload", r, flush=True)
    res["wall_s"] = time.time() - t0
    out = os.path.join(HERE, "results", "cache_offload.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"wrote {out} in {res['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
