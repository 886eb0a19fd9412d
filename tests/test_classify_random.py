"""Kernels against references on random rule sets with every field, and TSS updates."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microseg import ctstate
from microseg.classify import Action, Prefix, Rule, RuleSet, build, keys
from microseg.classify.linear import classify_linear, classify_ref
from microseg.classify.rules import K_L4, NW
from microseg.classify.tss import TupleSpace, range_to_prefixes
from microseg.packet.batch import FlowKeys

V4 = 0xFFFF << 32


def rand_prefix(rng, v6):
    if v6:
        ln = int(rng.choice([0, 1, 32, 48, 64, 65, 100, 127, 128]))
        a = int(rng.integers(0, 1 << 62)) << 66 | int(rng.integers(0, 1 << 62))
        a = (0x20010DB8 << 96 | a & ((1 << 96) - 1)) if rng.random() < 0.7 else a
        return Prefix(a >> 64, a & ((1 << 64) - 1), ln)
    ln = int(rng.choice([0, 1, 8, 16, 24, 31, 32]))
    return Prefix.ipv4(int(rng.choice([0x0A000000, 0xC0A80000, 0])) | int(rng.integers(0, 1 << 16)), ln)


def rand_range(rng):
    c = rng.random()
    if c < 0.3:
        return (0, 65535)
    if c < 0.5:
        p = int(rng.choice([0, 1, 80, 443, 65535, 65534]))
        return (p, p)
    lo = int(rng.choice([0, 1, 1023, 1024, int(rng.integers(0, 65536))]))
    hi = int(rng.choice([65535, lo, min(65535, lo + int(rng.integers(0, 3000)))]))
    return (lo, max(lo, hi))


def rand_rule(rng, i):
    v6 = rng.random() < 0.3
    kw = dict(priority=int(rng.choice([0, 0, 1, 5, -3])), rule_id=i, action=Action(int(rng.integers(1, 4))))
    if rng.random() < 0.7:
        kw["src"] = rand_prefix(rng, v6)
    if rng.random() < 0.7:
        kw["dst"] = rand_prefix(rng, v6)
    if rng.random() < 0.3:
        kw["tenant"] = int(rng.choice([-1, 5000, 5001]))
    if rng.random() < 0.2:
        kw["in_port"] = int(rng.choice([0, 1, 2]))
    if rng.random() < 0.3:
        kw["ethertype"] = 0x86DD if v6 else 0x0800
    if rng.random() < 0.6:
        kw["proto"] = int(rng.choice([6, 17, 1, 58]))
        if rng.random() < 0.1:
            kw["proto_mask"] = 0xF0
    if rng.random() < 0.6:
        kw["sport"] = rand_range(rng)
    if rng.random() < 0.7:
        kw["dport"] = rand_range(rng)
    if rng.random() < 0.1:
        kw["icmp_type"] = int(rng.choice([0, 8, 3]))
        if rng.random() < 0.5:
            kw["icmp_code"] = int(rng.choice([0, 1]))
    if rng.random() < 0.15:
        kw["tcp_flags_mask"] = int(rng.choice([0x02, 0x12, 0x04, 0xFF]))
        kw["tcp_flags"] = int(rng.integers(0, 256)) & kw["tcp_flags_mask"]
    if rng.random() < 0.2:
        kw["ct_state_mask"] = int(rng.choice([ctstate.STATE_MASK, ctstate.ESTABLISHED, ctstate.REPLY]))
        kw["ct_state"] = (
            int(rng.choice([ctstate.NEW, ctstate.ESTABLISHED, ctstate.REPLY, 0])) & kw["ct_state_mask"]
        )
    return Rule(**kw)


def rand_keys(rng, rs, n):
    """Keys built mostly from the rules' own values (so they hit), with random other bits."""
    K = rng.integers(0, 1 << 63, size=(n, NW), dtype=np.int64).astype(np.uint64) * np.uint64(2)
    K[:, 0] = np.where(rng.random(n) < 0.6, 0, K[:, 0])
    K[:, 1] = np.where(rng.random(n) < 0.6, (K[:, 1] & np.uint64(0xFFFFFFFF)) | np.uint64(V4), K[:, 1])
    K[:, K_L4] &= np.uint64(0xFFFFFFFFFFFFFFFF)
    K[:, 5] &= np.uint64(0x86DDFFFF00000000 | 0xFFFFFFFF)
    K[:, 6] &= np.uint64(0x3F)
    m = len(rs)
    for i in range(n):
        if m and rng.random() < 0.8:
            j = int(rng.integers(0, m))
            free = ~rs.mask[j] & K[i]
            K[i] = rs.val[j] | free
            if rng.random() < 0.3:
                K[i, int(rng.integers(0, NW))] ^= np.uint64(1) << np.uint64(int(rng.integers(0, 64)))
        sp = int(rng.choice([0, 1, 80, 1023, 1024, 65535, int(rng.integers(0, 65536))]))
        dp = int(rng.choice([0, 443, 65534, 65535, int(rng.integers(0, 65536))]))
        if m and rng.random() < 0.6:
            j = int(rng.integers(0, m))
            sp = int(rng.integers(rs.ports[j, 0], rs.ports[j, 1] + 1))
            dp = int(rng.integers(rs.ports[j, 2], rs.ports[j, 3] + 1))
        K[i, K_L4] = (K[i, K_L4] & ~np.uint64(0xFFFFFFFF)) | np.uint64(sp | dp << 16)
    return K


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 60))
def test_all_algorithms_agree_with_reference(seed, n):
    rng = np.random.default_rng(seed)
    rs = RuleSet([rand_rule(rng, i) for i in range(n)])
    K = rand_keys(rng, rs, 150)
    want = classify_ref(rs, K)
    np.testing.assert_array_equal(classify_linear(rs, K), want)
    for algo, kw in (
        ("tss", {}),
        ("tree", {}),
        ("tree", {"binth": 1, "spfac": 1.5}),
        ("tree", {"partitions": False, "prune_at": 0}),
    ):
        np.testing.assert_array_equal(build(rs, algo, **kw).classify_keys(K), want, err_msg=f"{algo} {kw}")


def test_larger_random_set_tree_and_tss():
    rng = np.random.default_rng(7)
    rs = RuleSet([rand_rule(rng, i) for i in range(1500)])
    K = rand_keys(rng, rs, 3000)
    want = classify_linear(rs, K)
    assert (want >= 0).mean() > 0.5
    np.testing.assert_array_equal(build(rs, "tree").classify_keys(K), want)
    np.testing.assert_array_equal(build(rs, "tss").classify_keys(K), want)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1))
def test_tss_incremental_add_remove(seed):
    rng = np.random.default_rng(seed)
    rules = [rand_rule(rng, i) for i in range(40)]
    tss = TupleSpace(RuleSet(rules[:20]))
    live = list(range(20))
    idx_rule = dict(enumerate(rules[:20]))
    for r in rules[20:]:
        if live and rng.random() < 0.4:
            x = live.pop(int(rng.integers(0, len(live))))
            tss.remove(x)
        i = tss.add(r)
        idx_rule[i] = r
        live.append(i)
    live.sort()
    ref = RuleSet([idx_rule[i] for i in live])
    K = rand_keys(rng, ref, 300)
    want = classify_ref(ref, K)
    want = np.where(want >= 0, np.array(live + [-1])[want], -1)
    np.testing.assert_array_equal(tss.classify_keys(K), want)


def test_tss_remove_unknown_raises():
    tss = TupleSpace(RuleSet([Rule()]))
    tss.remove(0)
    for bad in (0, 5, -1):
        try:
            tss.remove(bad)
        except KeyError:
            pass
        else:
            raise AssertionError("remove of a dead index must raise")


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_tss_wildcards_are_exact_megaflows(seed):
    rng = np.random.default_rng(seed)
    rs = RuleSet([rand_rule(rng, i) for i in range(30)])
    K = rand_keys(rng, rs, 100)
    tss = TupleSpace(rs)
    got, wc = tss.classify_keys(K, wildcards=True)
    noise = rand_keys(rng, rs, 100)
    K2 = (K & wc) | (noise & ~wc)
    np.testing.assert_array_equal(tss.classify_keys(K2), got)
    np.testing.assert_array_equal(classify_linear(rs, K2), got)


@settings(max_examples=30, deadline=None)
@given(lo=st.integers(0, 65535), span=st.integers(0, 65535))
def test_range_to_prefixes_covers_exactly(lo, span):
    hi = min(65535, lo + span)
    ps = range_to_prefixes(lo, hi)
    covered = np.zeros(65536, np.int32)
    for v, m in ps:
        covered[v : v + ((~m) & 0xFFFF) + 1] += 1
    assert covered[lo : hi + 1].min() == 1 and covered.sum() == hi - lo + 1


def test_keys_from_flowkeys_kernel_matches_reference():
    rng = np.random.default_rng(3)
    fk = FlowKeys(64).resize(50)
    for a in fk.arrays():
        a[:] = rng.integers(0, np.iinfo(a.dtype).max, size=a.shape, dtype=a.dtype, endpoint=True)
    ct = rng.integers(0, 64, 50).astype(np.uint8)
    port = rng.integers(0, 65536, 50).astype(np.uint16)
    np.testing.assert_array_equal(keys.from_flowkeys(fk, ct, port), keys.from_flowkeys_ref(fk, ct, port))
    np.testing.assert_array_equal(keys.from_flowkeys(fk), keys.from_flowkeys_ref(fk))


def test_classify_flowkeys_uses_tenant_port_ct():
    rs = RuleSet(
        [
            Rule(
                tenant=7, ct_state=ctstate.ESTABLISHED, ct_state_mask=ctstate.STATE_MASK, action=Action.ALLOW
            ),
            Rule(in_port=3, action=Action.REJECT),
            Rule(tenant=-1, dport=(22, 22), proto=6),
        ]
    )
    fk = FlowKeys(4).resize(4)
    fk.i32[0] = [7, 7, -1, -1]  # TENANT row 0
    fk.u8[2] = 6  # PROTO
    fk.u16[4] = [0, 0, 22, 23]  # DPORT
    ct = np.array([ctstate.ESTABLISHED, ctstate.NEW, 0, 0], np.uint8)
    port = np.array([0, 3, 0, 0], np.uint16)
    for algo in ("tree", "tss", "linear"):
        clf = build(rs, algo)
        got = clf.classify(fk, ct_state=ct, in_port=port)
        assert got.tolist() == [0, 1, 2, -1]
        assert rs.actions(got).tolist() == [Action.ALLOW, Action.REJECT, Action.DROP, Action.DROP]
