"""Compiled policies are immutable and versioned, swap atomically, and tell which existing
connections a new policy forbids."""

import os
import threading

import numpy as np
import pytest

from microseg.errors import MicrosegError
from microseg.packet import batch as B
from microseg.packet.batch import text_to_addr
from microseg.policy import verdict as V
from microseg.policy.compiler import (
    CompiledPolicy,
    PolicyHolder,
    compile_policy,
    connection_keys,
    revoked_connections,
)
from microseg.policy.model import load_policy, parse_policy

VEC = os.path.join(os.path.dirname(__file__), "vectors", "policy")
BASE = """
tenants: [{name: t, vni: 10}]
security_groups:
  - name: web
    tenant: t
    rules:
      - {direction: ingress, protocol: tcp, port_range_min: 80, port_range_max: 80}
      - {direction: ingress, protocol: tcp, port_range_min: 22, port_range_max: 22}
      - {direction: ingress, protocol: icmp}
workloads:
  - {name: a, tenant: t, ipv4: 10.0.0.1, security_groups: [web]}
  - {name: b, tenant: t, ipv4: 10.0.0.2, ipv6: "fd00::2", security_groups: [web]}
default_egress: allow
"""


def test_versions_hash_and_immutability():
    p = parse_policy(BASE)
    c1, c2 = compile_policy(p), compile_policy(p)
    assert c2.version > c1.version
    assert c1.content_hash == c2.content_hash and len(c1.content_hash) == 64
    c3 = compile_policy(parse_policy(BASE.replace("port_range_max: 22", "port_range_max: 23")))
    assert c3.content_hash != c1.content_hash
    with pytest.raises(AttributeError):
        c1.version = 99
    with pytest.raises(AttributeError):
        c1.ruleset = None
    with pytest.raises(ValueError):
        c1.ruleset.val[0, 0] = 1
    with pytest.raises(ValueError):
        c1._need[0, 0] = 0
    assert c1.ruleset.version == c1.version


def test_holder_swaps_in_one_assignment():
    p = parse_policy(BASE)
    old, new = compile_policy(p), compile_policy(p)
    h = PolicyHolder(old)
    assert h.current is old
    assert h.swap(new) is old and h.current is new
    with pytest.raises(MicrosegError):
        h.swap(old)  # older version: refused, current kept
    assert h.current is new
    with pytest.raises(MicrosegError):
        h.swap("not a policy")


def test_holder_load_keeps_old_on_error(tmp_path):
    good = tmp_path / "p.yaml"
    good.write_text(BASE)
    h = PolicyHolder()
    assert h.load(str(good)) is None
    first = h.current
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE + "workloads: oops\n")
    with pytest.raises(MicrosegError):
        h.load(str(bad))
    assert h.current is first


def test_readers_see_whole_policies_during_swaps():
    """A reader that takes .current once per batch always sees one consistent policy."""
    allow22 = compile_policy(parse_policy(BASE))
    deny22 = parse_policy(
        BASE.replace("port_range_min: 22, port_range_max: 22", "port_range_min: 2222, port_range_max: 2222")
    )
    h = PolicyHolder(allow22)
    keys = _conn([("10.0.0.1", "10.0.0.2", 6, 22)] * 64, 10)
    stop = threading.Event()
    seen = []

    def reader():
        while not stop.is_set():
            pol = h.current
            v, _, _ = pol.decide(keys)
            seen.append((pol.content_hash, len(set(v.tolist())), int(v[0])))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(6):
            h.swap(compile_policy(deny22))
            h.swap(compile_policy(parse_policy(BASE)))
    finally:
        stop.set()
        t.join()
    assert seen and all(n == 1 for _, n, _ in seen)  # never a mix inside a batch
    for hsh, _, v in seen:
        assert v == (V.ALLOW if hsh == allow22.content_hash else V.DROP)


def _conn(flows, tenant):
    src = [text_to_addr(f[0]) for f in flows]
    dst = [text_to_addr(f[1]) for f in flows]
    n = len(flows)
    return connection_keys(
        np.full(n, tenant),
        [s[0] for s in src],
        [s[1] for s in src],
        [d[0] for d in dst],
        [d[1] for d in dst],
        [f[2] for f in flows],
        np.full(n, 40000),
        [f[3] for f in flows],
    )


def _cols(flows, tenant):
    k = _conn(flows, tenant)
    return (k.tenant, k.src_hi, k.src_lo, k.dst_hi, k.dst_lo, k.proto, k.sport, k.dport)


def test_revoked_connections():
    old = compile_policy(parse_policy(BASE))
    new = compile_policy(
        parse_policy(
            BASE.replace(
                "      - {direction: ingress, protocol: tcp, port_range_min: 22, port_range_max: 22}\n", ""
            )
        )
    )
    flows = [
        ("10.0.0.1", "10.0.0.2", 6, 22),  # ssh: allowed before, forbidden now
        ("10.0.0.1", "10.0.0.2", 6, 80),  # http: allowed by both
        ("10.0.0.1", "10.0.0.2", 6, 25),  # smtp: forbidden by both
        ("10.0.0.2", "10.0.0.1", 1, 0),  # ICMP echo: allowed by both
        ("fd00::9", "fd00::2", 6, 22),  # IPv6: the rules are IPv4 (the default ethertype)
        ("10.0.0.1", "10.0.0.2", 6, 22),
    ]
    cols = _cols(flows, 10)
    assert list(new.allows_connections(*cols)) == [False, True, False, True, False, False]
    assert list(revoked_connections(old, new, *cols)) == [True, False, False, False, False, True]
    assert list(revoked_connections(None, new, *cols)) == [True, False, True, False, True, True]
    assert not revoked_connections(old, old, *cols).any()
    # another tenant's VNI: the connection is not this tenant's and was never allowed
    assert not revoked_connections(old, new, *_cols(flows[:1], 11)).any()


def test_revalidation_in_chunks(monkeypatch):
    from microseg.policy import compiler

    monkeypatch.setattr(compiler, "_REVALIDATE_CHUNK", 4)
    c = compile_policy(parse_policy(BASE))
    flows = [("10.0.0.1", "10.0.0.2", 6, p) for p in (22, 80, 25, 443, 22, 23, 80, 81, 22)]
    assert list(c.allows_connections(*_cols(flows, 10))) == [p in (22, 80) for _, _, _, p in flows]
    assert c.allows_connections(*_cols([], 10)).shape == (0,)


def test_revalidation_equals_decide_as_new():
    """allows_connections is decide() on NEW packets: check on the example policy."""
    c = compile_policy(load_policy(os.path.join(VEC, "example.yaml")))
    rng = np.random.default_rng(3)
    addrs = [str(a) for w in c.policy.workloads for a in w.addresses if a.version == 4]
    flows = [
        (
            addrs[rng.integers(len(addrs))],
            addrs[rng.integers(len(addrs))],
            int(rng.choice([6, 17, 1])),
            int(rng.choice([22, 53, 80, 5432, 8080, 9005])),
        )
        for _ in range(200)
    ]
    for vni in (5001, 5002):
        cols = _cols(flows, vni)
        keys = _conn(flows, vni)
        from microseg import ctstate

        v, _, _ = c.decide(keys, np.full(keys.n, ctstate.NEW, np.uint8))
        assert (c.allows_connections(*cols) == (v == V.ALLOW)).all()
        assert (c.allows_connections(*cols)).any() and not (c.allows_connections(*cols)).all()


def test_connection_keys_icmp_defaults():
    k = _conn(
        [("10.0.0.1", "10.0.0.2", 1, 0), ("fd00::1", "fd00::2", 58, 0), ("10.0.0.1", "10.0.0.2", 47, 0)], 1
    )
    assert list(k.icmp_type) == [8, 128, 0]
    assert list(k.flags) == [B.F_ICMP, B.F_ICMP, 0]
    assert list(k.ip_ver) == [4, 6, 4]
    assert isinstance(compile_policy(parse_policy(BASE)), CompiledPolicy)
