"""Exact-match cache: kernel == plain-Python reference under collisions, versions, revalidation."""

import numpy as np
import pytest

from microseg.cache import key as K
from microseg.cache import match as M
from microseg.cache.emc import EMCRef, ExactMatchCache
from microseg.classify.linear import classify_linear as oracle
from test_cache_util import random_keys, random_ruleset, rule_changes


@pytest.mark.parametrize("seed", range(4))
def test_kernel_matches_reference_under_collisions(seed):
    rng = np.random.default_rng(seed)
    universe = random_keys(rng, 300)  # 300 flows into 64 slots: constant replacement
    hashes = K.hash_keys(universe)
    emc, ref = ExactMatchCache(64, 4), EMCRef(64, 4)
    for step in range(40):
        idx = rng.integers(0, 300, 32)
        k, h = universe[idx], hashes[idx]
        valid = rng.random(32) < 0.95
        res = emc.lookup(k, h, valid)
        for j in range(32):
            want = ref.lookup(tuple(k[j].tolist()), int(h[j])) if valid[j] else None
            assert bool(res.hit[j]) == (want is not None)
            if want is not None:
                assert (int(res.verdict[j]), int(res.rule[j]), int(res.flow[j])) == want
        ref.clock += 1
        miss = np.flatnonzero(~res.hit & valid)
        v = rng.integers(0, 3, 32).astype(np.uint8)
        r = rng.integers(-1, 50, 32).astype(np.int32)
        f = idx.astype(np.int64)
        emc.insert(k, h, miss, v, r, f)
        for j in miss:
            ref.insert(tuple(k[j].tolist()), int(h[j]), int(v[j]), int(r[j]), int(f[j]))
        ref.clock += 1
        if step == 20:
            emc.revalidate(5)
            ref.version = 5
            ref.buckets = [[None] * ref.ways for _ in range(ref.nb)]
    st = emc.stats()
    assert st["hits"] > 0 and st["evictions"] > 0 and st["uncacheable"] > 0
    assert st["entries"] <= emc.capacity


def test_hit_miss_counters_and_flow_ids():
    rng = np.random.default_rng(1)
    k = random_keys(rng, 100)
    k = np.unique(k, axis=0)
    h = K.hash_keys(k)
    n = k.shape[0]
    valid = np.ones(n, bool)
    emc = ExactMatchCache(4096)
    r = emc.lookup(k, h, valid)
    assert not r.hit.any()
    emc.insert(k, h, ~r.hit, 1, np.arange(n), np.arange(n) + 1000)
    r = emc.lookup(k, h, valid)
    assert (
        r.hit.all() and np.array_equal(r.flow, np.arange(n) + 1000) and np.array_equal(r.rule, np.arange(n))
    )
    st = emc.stats()
    assert (st["hits"], st["misses"], st["inserts"]) == (n, n, n)
    # conntrack ended half the flows
    assert emc.remove(k, h, np.arange(n // 2)) == n // 2
    r = emc.lookup(k, h, valid)
    assert not r.hit[: n // 2].any() and r.hit[n // 2 :].all()


def test_stale_entries_are_misses():
    rng = np.random.default_rng(2)
    k = random_keys(rng, 50)
    h = K.hash_keys(k)
    valid = np.ones(50, bool)
    emc = ExactMatchCache(1024, version=3)
    emc.insert(k, h, valid, 1, 0, version=2)  # computed under an older policy
    r = emc.lookup(k, h, valid)
    assert not r.hit.any() and emc.stats()["stale"] == 50
    emc.insert(k, h, valid, 2, 0)
    assert emc.lookup(k, h, valid).hit.all()


@pytest.mark.parametrize("seed", range(3))
def test_incremental_revalidation_keeps_only_unaffected_entries(seed):
    rng = np.random.default_rng(50 + seed)
    rs = random_ruleset(rng, 50)
    k = np.unique(random_keys(rng, 600), axis=0)
    h = K.hash_keys(k)
    valid = np.ones(k.shape[0], bool)
    emc = ExactMatchCache(4096, version=rs.version)
    win = oracle(rs, k)
    emc.insert(k, h, valid, rs.actions(win), win)
    rs2 = rule_changes(rng, rs, 3)
    kept, dropped = emc.revalidate(rs2.version, M.changed_rules(rs, rs2), M.rule_index_map(rs, rs2))
    assert kept > 0 and kept + dropped == k.shape[0]
    r = emc.lookup(k, h, valid)
    truth = oracle(rs2, k)
    assert np.array_equal(r.rule[r.hit], truth[r.hit])
    assert np.array_equal(r.verdict[r.hit], rs2.actions(truth[r.hit]))
    # everything dropped was touched by a changed rule
    changed = M.changed_rules(rs, rs2)
    touched = M.classify(changed, k) >= 0
    assert np.array_equal(~r.hit, touched)
