"""Megaflow masks and cache: kernel == reference, and the safety property against the
classifier's own linear oracle on random rule sets, ClassBench sets, and after rule changes."""

import numpy as np
import pytest

from microseg.cache import match as M
from microseg.cache.megaflow import MegaflowCache
from microseg.classify import classbench as CB
from microseg.classify.linear import classify_linear as oracle
from microseg.classify.rules import Prefix, Rule, RuleSet
from test_cache_util import perturb, random_keys, random_ruleset, rule_changes

VEC = "tests/vectors/classbench"


@pytest.mark.parametrize("seed", range(4))
def test_derive_kernel_matches_reference(seed):
    rng = np.random.default_rng(seed)
    rs = random_ruleset(rng, 40)
    k = random_keys(rng, 150)
    t = M.RuleMatchTable.from_ruleset(rs)
    for lens in ((16,), range(17)):
        win, masks = M.megaflow_masks(t, k, port_lens=lens)
        for i in range(k.shape[0]):
            row, m = M.derive_mask_ref(t, k[i], port_lens=lens)
            assert (t.rule_id[row] if row >= 0 else -1) == win[i]
            assert m == tuple(int(x) for x in masks[i])


def check_safe(rs, k, masks, win, rng, n_each=20):
    q = perturb(rng, k, masks, n_each)
    rep = np.repeat(np.arange(k.shape[0]), n_each)
    assert np.array_equal(oracle(rs, q), win[rep])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("lens", [(16,), tuple(range(17))])
def test_masks_are_safe_on_random_rule_sets(seed, lens):
    rng = np.random.default_rng(100 + seed)
    rs = random_ruleset(rng, int(rng.integers(1, 80)))
    k = random_keys(rng, 300)
    win, masks = M.megaflow_masks(rs, k, port_lens=lens)
    assert np.array_equal(win, oracle(rs, k))
    check_safe(rs, k, masks, win, rng)


def test_masks_are_wildcards_not_exact():
    rs = RuleSet(
        [
            Rule(dst=Prefix.parse("10.0.0.0/8"), dport=(80, 80), proto=6),
            Rule(src=Prefix.parse("192.168.0.0/16")),
        ]
    )
    k = random_keys(np.random.default_rng(0), 200)
    _, masks = M.megaflow_masks(rs, k)
    # at most: both prefixes, protocol, dport -> far from an exact 7-word mask
    bits = np.unpackbits(masks.view(np.uint8), axis=1).sum(1)
    assert bits.max() <= 128 + 128 + 8 + 16 and bits.min() >= 1


@pytest.mark.parametrize("fam", ["acl", "fw", "ipc"])
def test_classbench_cache_agrees_with_oracle(fam):
    rs = CB.load_rules(f"{VEC}/{fam}_1000.rules")
    k = CB.load_trace(f"{VEC}/{fam}_1000.trace", limit=6000)
    valid = np.ones(k.shape[0], bool)
    truth = oracle(rs, k)
    mf = MegaflowCache()
    half = k.shape[0] // 2
    win, masks = M.megaflow_masks(rs, k[:half])
    assert np.array_equal(win, truth[:half])
    mf.insert(k[:half], masks, np.ones(half, bool), rs.actions(win), win)
    res = mf.lookup(k, valid)
    assert res.hit[:half].all()
    assert res.hit[half:].sum() > 50  # new headers hit shared megaflows
    assert np.array_equal(res.rule[res.hit], truth[res.hit])
    assert np.array_equal(res.verdict[res.hit], rs.actions(truth[res.hit]))
    check_safe(rs, k[:300], masks[:300], win[:300], np.random.default_rng(1), 10)


@pytest.mark.parametrize("seed", range(5))
def test_incremental_revalidation_is_sound(seed):
    rng = np.random.default_rng(300 + seed)
    rs = random_ruleset(rng, 60)
    k = random_keys(rng, 800)
    valid = np.ones(k.shape[0], bool)
    mf = MegaflowCache(entries=4096, version=rs.version)
    win, masks = M.megaflow_masks(rs, k)
    mf.insert(k, masks, valid, rs.actions(win), win)
    n_before = mf.stats()["entries"]
    rs2 = rule_changes(rng, rs, 3)
    kept, dropped = mf.revalidate(rs2.version, M.changed_rules(rs, rs2), M.rule_index_map(rs, rs2))
    assert kept + dropped == n_before and kept > 0
    q = np.concatenate([k, perturb(rng, k, masks, 3)])
    res = mf.lookup(q, np.ones(q.shape[0], bool))
    truth = oracle(rs2, q)
    hit = res.hit
    assert hit.sum() > 0
    assert np.array_equal(res.rule[hit], truth[hit])
    assert np.array_equal(res.verdict[hit], rs2.actions(truth[hit]))


def test_full_revalidation_and_staleness():
    rng = np.random.default_rng(9)
    rs = random_ruleset(rng, 20)
    k = random_keys(rng, 100)
    valid = np.ones(100, bool)
    mf = MegaflowCache(version=1)
    win, masks = M.megaflow_masks(rs, k)
    mf.insert(k, masks, valid, rs.actions(win), win)
    assert mf.lookup(k, valid).hit.all()
    assert mf.revalidate(2) == (0, mf.stats()["revalidated_dropped"])
    assert not mf.lookup(k, valid).hit.any() and mf.n_active == 0
    # an entry computed under an older version is never served
    mf.insert(k, masks, valid, rs.actions(win), win, version=1)
    r = mf.lookup(k, valid)
    assert not r.hit.any() and mf.stats()["stale"] > 0
    mf.insert(k, masks, valid, rs.actions(win), win)
    assert mf.lookup(k, valid).hit.all()


def test_masks_refcounted_and_table_full_counted():
    rng = np.random.default_rng(4)
    k = random_keys(rng, 64)
    masks = np.zeros_like(k)
    masks[:, 0] = np.arange(64, dtype=np.uint64) + np.uint64(1)  # 64 distinct masks
    mf = MegaflowCache(entries=1024, max_masks=16)
    mf.insert(k, masks, np.ones(64, bool), 1, 0)
    st = mf.stats()
    assert st["masks"] == 16 and st["mask_table_full"] == 48
    # masks stay interned while an entry uses them; evicting all entries frees them
    assert mf.revalidate(1) == (0, 16)
    assert mf.n_active == 0
    mf.insert(k[:4], masks[:4], np.ones(4, bool), 1, 0)
    assert mf.stats()["masks"] == 4


def test_invalid_keys_never_hit():
    rs = RuleSet([Rule()])
    k = random_keys(np.random.default_rng(2), 10)
    valid = np.zeros(10, bool)
    mf = MegaflowCache()
    win, masks = M.megaflow_masks(rs, k)
    mf.insert(k, masks, np.ones(10, bool), 1, win, valid=valid)
    assert mf.stats()["entries"] == 0
    assert not mf.lookup(k, valid).hit.any() and mf.stats()["uncacheable"] == 10


def test_table_subset_keeps_priority_order():
    rs = RuleSet([Rule(priority=p, rule_id=i) for i, p in enumerate([0, 5, 1, 5])])
    t = M.RuleMatchTable.from_ruleset(rs)
    assert t.rule_id.tolist() == [1, 3, 2, 0]
    assert M.RuleMatchTable.from_ruleset(rs, rows=[0, 3]).rule_id.tolist() == [3, 0]


def test_no_change_keeps_everything_and_empty_rule_set_is_one_entry():
    rng = np.random.default_rng(12)
    rs = random_ruleset(rng, 30)
    k = random_keys(rng, 200)
    valid = np.ones(200, bool)
    mf = MegaflowCache(version=1)
    win, masks = M.megaflow_masks(rs, k)
    mf.insert(k, masks, valid, rs.actions(win), win)
    n = mf.stats()["entries"]
    assert len(M.changed_rules(rs, rs)) == 0
    assert mf.revalidate(2, M.changed_rules(rs, rs), M.rule_index_map(rs, rs)) == (n, 0)
    assert mf.lookup(k, valid).hit.all()
    empty = RuleSet([])
    win, masks = M.megaflow_masks(empty, k)
    assert (win == -1).all() and not masks.any()
    mf2 = MegaflowCache()
    mf2.insert(k, masks, valid, 2, win)
    assert mf2.stats()["entries"] == 1 and mf2.lookup(random_keys(rng, 50), np.ones(50, bool)).hit.all()
