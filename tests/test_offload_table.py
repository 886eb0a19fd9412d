"""Fast-path table: token-bucket and capacity limits against a plain-Python model, lookup
accounting, exception packets, removal, expiry and policy revalidation."""

import numpy as np
import pytest

from microseg.cache import key as K
from microseg.cache import match as M
from microseg.classify.rules import Prefix, Rule, RuleSet
from microseg.offload import table as T
from test_cache_util import random_keys


def unique_keys(rng, n):
    k = np.unique(random_keys(rng, n * 2) & T.FLOW_MASK, axis=0)
    rng.shuffle(k)
    return np.ascontiguousarray(k[:n])


def model(ts, present_first, rate, burst, capacity, bucket_of, ways):
    """Token bucket, capacity and per-bucket ways, as the table documents them."""
    tokens, last, used, seen, out = burst, -1.0, 0, set(), []
    fill = {}
    for i, t in enumerate(ts):
        if t > last:
            tokens = min(burst, tokens + (t - last) * rate * 1e-9)
            last = t
        key = present_first[i]
        if key in seen:
            out.append(T.OFFER_PRESENT)
        elif tokens < 1.0:
            out.append(T.OFFER_RATE)
        elif used >= capacity:
            out.append(T.OFFER_CAPACITY)
        elif fill.get(bucket_of[i], 0) >= ways:
            out.append(T.OFFER_COLLISION)
        else:
            tokens -= 1.0
            used += 1
            seen.add(key)
            fill[bucket_of[i]] = fill.get(bucket_of[i], 0) + 1
            out.append(T.OFFER_OK)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_rate_and_capacity_match_the_model(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    keys = unique_keys(rng, 1500)
    pick = rng.integers(0, keys.shape[0], n)  # repeats: re-offers of present flows
    k = keys[pick]
    ts = np.cumsum(rng.exponential(1e9 / 20000, n)).astype(np.int64)  # ~20000 offers/s
    tab = T.FastPathTable(capacity=900, rate=7000, burst=50)
    valid = np.ones(n, bool)
    out = np.concatenate(
        [tab.offer(k, valid, np.arange(s, min(s + 256, n)), 1, pick, ts) for s in range(0, n, 256)]
    )
    _, fh = tab.flow_keys(k, valid)
    bucket = (fh & np.uint64(tab.t.n_buckets - 1)).tolist()
    want = model(ts.tolist(), pick.tolist(), 7000.0, 50.0, 900, bucket, tab.t.ways)
    assert out.tolist() == want
    st = tab.stats()
    assert st["refused"]["rate"] > 0 and st["refused"]["capacity"] > 0
    assert st["occupancy"] == 900 and st["inserts"] == 900
    assert st["refused_collision"] == want.count(T.OFFER_COLLISION)


def test_lookup_accounting_and_exceptions():
    rng = np.random.default_rng(5)
    k = unique_keys(rng, 100)
    valid = np.ones(100, bool)
    tab = T.FastPathTable(capacity=1000, rate=1e6, burst=1e6)
    assert (tab.offer(k, valid, np.arange(50), 1, np.arange(50), np.zeros(100, np.int64)) == T.OFFER_OK).all()
    # the same flows with other TCP flags / conntrack bits are the same fast-path flows
    q = k.copy()
    q[:, K.K_L4] = (q[:, K.K_L4] & np.uint64(0x00FFFFFFFFFFFFFF)) | np.uint64(0x10 << K.SH_TCP_FLAGS)
    q[:, K.K_CT] |= np.uint64(0x22)
    wire = np.full(100, 1000, np.int64)
    wire[50:] = 100
    hit, v, f = tab.lookup(q, valid, wire, np.full(100, 5, np.int64))
    assert hit[:50].all() and not hit[50:].any() and np.array_equal(f[:50], np.arange(50))
    st = tab.stats()
    assert st["packet_share"] == 0.5 and st["byte_share"] == pytest.approx(50000 / 55000)
    # SYN / FIN / RST on a TCP flow go to the slow path (conntrack must see them)
    syn = q[:50].copy()
    tcp = ((syn[:, K.K_L4] >> np.uint64(32)) & np.uint64(0xFF)) == 6
    syn[:, K.K_L4] |= np.uint64(0x01 << K.SH_TCP_FLAGS)
    hit, _, _ = tab.lookup(syn, valid[:50], wire[:50], np.full(50, 6, np.int64))
    assert not hit[tcp].any() and hit[~tcp].all() and tab.stats()["exceptions"] == tcp.sum()


def test_remove_expire_revalidate():
    rng = np.random.default_rng(6)
    k = unique_keys(rng, 200)
    valid = np.ones(200, bool)
    tab = T.FastPathTable(capacity=1000, rate=1e6, burst=1e6)
    ts = np.where(np.arange(200) < 100, 1_000, 9_000_000_000).astype(np.int64)
    tab.offer(k, valid, np.arange(200), 1, 0, ts)
    assert tab.used == 200
    assert tab.remove(k, valid, np.arange(10)) == 10 and tab.used == 190
    assert tab.expire(now_ns=10_000_000_000, idle_ns=5_000_000_000) == 90 and tab.used == 100
    hit, _, _ = tab.lookup(k, valid, np.ones(200, np.int64), np.zeros(200, np.int64))
    assert not hit[:100].any() and hit[100:].all()
    # a policy change touching 10.1.0.0/16 removes only the flows it can match
    rs_old = RuleSet([Rule(src=Prefix.parse("10.0.0.0/8"))])
    rs_new = RuleSet([Rule(src=Prefix.parse("10.0.0.0/8")), Rule(dst=Prefix.parse("10.1.0.0/16"))])
    changed = M.changed_rules(rs_old, rs_new)
    touched = M.classify(changed, k) >= 0
    n = tab.revalidate(2, changed)
    assert n == int((touched & (np.arange(200) >= 100)).sum()) and n > 0
    hit, _, _ = tab.lookup(k, valid, np.ones(200, np.int64), np.zeros(200, np.int64))
    assert np.array_equal(hit, ~touched & (np.arange(200) >= 100))
    assert tab.revalidate(3) == tab.stats()["invalidated"] - n and tab.used == 0
