"""Random rule sets and keys for the cache tests (shared by test_cache_* and test_offload_*)."""

import numpy as np

from microseg.cache import key as K
from microseg.classify.rules import Action, Prefix, Rule, RuleSet

BASES = [0x0A000000, 0x0A010000, 0x0A010200, 0xC0A80000, 0xAC100000]


def random_rule(rng, i):
    def pfx():
        if rng.random() < 0.25:
            return None
        base = int(rng.choice(BASES)) | int(rng.integers(0, 256)) * (rng.random() < 0.3)
        return Prefix.ipv4(base, int(rng.choice([8, 16, 20, 24, 28, 32])))

    def prange():
        c = rng.random()
        if c < 0.4:
            return (0, 65535)
        if c < 0.7:
            p = int(rng.choice([22, 53, 80, 443, 1000, 8080]))
            return (p, p)
        lo = int(rng.integers(0, 2000))
        return (lo, lo + int(rng.integers(0, 3000)))

    kw = dict(
        priority=int(rng.integers(0, 4)),
        action=Action(int(rng.integers(1, 4))),
        rule_id=i,
        src=pfx(),
        dst=pfx(),
        sport=prange(),
        dport=prange(),
    )
    if rng.random() < 0.6:
        kw["proto"] = int(rng.choice([6, 17, 1]))
    if rng.random() < 0.15:
        kw["tcp_flags"], kw["tcp_flags_mask"] = 0x02, 0x12
    if rng.random() < 0.15:
        kw["ct_state"], kw["ct_state_mask"] = int(rng.choice([1, 2])), 0x0F
    if rng.random() < 0.1:
        kw["tenant"] = int(rng.choice([-1, 5, 7]))
    if rng.random() < 0.1:
        kw["icmp_type"] = int(rng.choice([0, 8]))
    return Rule(**kw)


def random_ruleset(rng, n):
    return RuleSet([random_rule(rng, i) for i in range(n)])


def random_keys(rng, n):
    """Keys that land near the rules' prefixes and ports often."""
    src = (rng.choice(BASES, n) | rng.integers(0, 1 << 16, n) & rng.choice([0xFF, 0xFFFF, 0xFFF], n)).astype(
        np.uint64
    )
    dst = (rng.choice(BASES, n) | rng.integers(0, 1 << 16, n) & rng.choice([0xFF, 0xFFFF, 0xFFF], n)).astype(
        np.uint64
    )
    ports = np.array([22, 53, 80, 443, 1000, 1500, 8080, 3000, 40000], np.uint64)
    sp = np.where(rng.random(n) < 0.5, rng.choice(ports, n), rng.integers(0, 65536, n)).astype(np.uint64)
    dp = np.where(rng.random(n) < 0.5, rng.choice(ports, n), rng.integers(0, 65536, n)).astype(np.uint64)
    proto = rng.choice(np.array([6, 17, 1], np.uint64), n)
    flags = rng.choice(np.array([0x02, 0x12, 0x10, 0x18], np.uint64), n)
    itype = rng.choice(np.array([0, 8, 3], np.uint64), n)
    tenant = rng.choice(np.array([0xFFFFFFFF, 5, 7], np.uint64), n)
    ct = rng.choice(np.array([1, 2, 4], np.uint64), n)
    k = np.zeros((n, K.W), np.uint64)
    k[:, K.K_SRC_LO] = np.uint64(0xFFFF << 32) | src
    k[:, K.K_DST_LO] = np.uint64(0xFFFF << 32) | dst
    k[:, K.K_L4] = (
        sp | dp << np.uint64(16) | proto << np.uint64(32) | itype << np.uint64(40) | flags << np.uint64(56)
    )
    k[:, K.K_META] = tenant | np.uint64(0x0800) << np.uint64(48)
    k[:, K.K_CT] = ct
    return k


def perturb(rng, k, m, n_each):
    """Keys that agree with each row of ``k`` under its mask ``m`` (random bits elsewhere)."""
    rep = np.repeat(np.arange(k.shape[0]), n_each)
    noise = random_keys(rng, rep.shape[0])
    flip = rng.integers(0, 2**63, size=noise.shape, dtype=np.uint64) * (rng.random(noise.shape) < 0.2)
    noise ^= flip
    return (k[rep] & m[rep]) | (noise & ~m[rep])


def rule_changes(rng, rs, n_changes):
    """A rule set with a few rules removed, inserted or replaced."""
    rules = list(rs.rules)
    for _ in range(n_changes):
        c = rng.random()
        if c < 0.4 and rules:
            rules.pop(int(rng.integers(0, len(rules))))
        elif c < 0.8:
            rules.insert(int(rng.integers(0, len(rules) + 1)), random_rule(rng, 1000 + len(rules)))
        elif rules:
            rules[int(rng.integers(0, len(rules)))] = random_rule(rng, 2000)
    return RuleSet(rules)
