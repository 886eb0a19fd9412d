"""compile_policy(policy, previous=...) gives what a full compile gives.

An agent that recompiles after a change of one tenant can hand the last compiled policy in
as ``previous``: its rule objects that equal the new ones are lent instead of being built and
validated again, and its classifier is kept when the classifier rules are the same. The
result must not depend on it: after each of a chain of random changes (a rule's ports, a
rule added or dropped, a remote group, a workload moved to another host, its groups, a
workload added or removed), the compile from the previous one holds the same arrays and
decides random packets as a compile from scratch does.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from microseg import ctstate
from microseg.packet import batch as B
from microseg.packet.batch import FlowKeys, text_to_addr
from microseg.policy.compiler import CompiledPolicy, compile_policy
from microseg.policy.model import parse_policy


def _spec(rng) -> dict:
    tenants = []
    for _ in range(int(rng.integers(2, 4))):
        groups = {}
        for g in range(int(rng.integers(1, 4))):
            groups[f"g{g}"] = [_rule(rng, g) for _ in range(int(rng.integers(1, 6)))]
        workloads = {
            f"w{i}": {
                "host": f"h{int(rng.integers(0, 4))}",
                "groups": sorted({f"g{int(rng.integers(0, len(groups)))}"}),
            }
            for i in range(int(rng.integers(2, 7)))
        }
        tenants.append({"groups": groups, "workloads": workloads})
    return {"tenants": tenants}


def _rule(rng, g: int) -> dict:
    r = {
        "direction": "ingress" if rng.random() < 0.7 else "egress",
        "protocol": ["tcp", "udp", "icmp"][int(rng.integers(0, 3))],
    }
    if r["protocol"] != "icmp":
        lo = int(rng.integers(20, 90))
        r["port_range_min"], r["port_range_max"] = lo, lo + int(rng.integers(0, 5))
    if rng.random() < 0.4:
        r["remote_group_id"] = f"g{g}"
    elif rng.random() < 0.5:
        r["remote_ip_prefix"] = f"192.168.{int(rng.integers(0, 4))}.0/24"
    return r


def _text(spec: dict) -> str:
    out = ["version: 1", "default_egress: allow", "tenants:"]
    out += [f"  - {{name: t{t}, vni: {300 + t}}}" for t in range(len(spec["tenants"]))]
    out.append("hosts:")
    out += [f"  - {{name: h{h}, address: 10.99.0.{h + 1}}}" for h in range(4)]
    out.append("security_groups:")
    for t, ten in enumerate(spec["tenants"]):
        for g, rules in ten["groups"].items():
            out += [f"  - name: {g}", f"    tenant: t{t}", "    rules:"]
            for r in rules:
                fields = ", ".join(f"{k}: {v}" for k, v in r.items())
                out.append(f"      - {{ethertype: IPv4, {fields}}}")
    out.append("workloads:")
    n = 0
    for t, ten in enumerate(spec["tenants"]):
        for name, w in ten["workloads"].items():
            n += 1
            out.append(
                f"  - {{name: {name}, tenant: t{t}, host: {w['host']}, mac: '02:00:00:00:{t:02x}:{n:02x}', "
                f"ipv4: 10.{t}.0.{n}, security_groups: [{', '.join(w['groups'])}]}}"
            )
    return "\n".join(out) + "\n"


def _mutate(rng, spec: dict) -> str:
    """One random change of one tenant's resources (what a store apply of one tenant does)."""
    ten = spec["tenants"][int(rng.integers(0, len(spec["tenants"])))]
    gname = sorted(ten["groups"])[int(rng.integers(0, len(ten["groups"])))]
    rules = ten["groups"][gname]
    wname = sorted(ten["workloads"])[int(rng.integers(0, len(ten["workloads"])))]
    kind = ["port", "add", "drop", "remote", "move", "groups", "new", "gone"][int(rng.integers(0, 8))]
    if kind == "port":
        r = rules[int(rng.integers(0, len(rules)))]
        if "port_range_max" in r:
            r["port_range_max"] = r["port_range_min"] + int(rng.integers(0, 9))
        else:
            r["protocol"] = "tcp"
            r["port_range_min"] = r["port_range_max"] = 443
    elif kind == "add":
        rules.append(_rule(rng, int(gname[1:])))
    elif kind == "drop" and len(rules) > 1:
        rules.pop(int(rng.integers(0, len(rules))))
    elif kind == "remote":
        r = rules[int(rng.integers(0, len(rules)))]
        r.pop("remote_ip_prefix", None)
        if r.pop("remote_group_id", None) is None:
            r["remote_group_id"] = gname
    elif kind == "move":
        ten["workloads"][wname]["host"] = f"h{int(rng.integers(0, 4))}"
    elif kind == "groups":
        ten["workloads"][wname]["groups"] = sorted({gname, *ten["workloads"][wname]["groups"][:1]})
    elif kind == "new":
        ten["workloads"][f"w{len(ten['workloads']) + 10}"] = {"host": "h1", "groups": [gname]}
    elif kind == "gone" and len(ten["workloads"]) > 1:
        del ten["workloads"][wname]
    return kind


def _packets(rng, policy, n: int = 300):
    k = FlowKeys(n).resize(n)
    addrs = [(w.tenant, str(a)) for w in policy.workloads for a in w.addresses]
    vni = {t.name: t.vni for t in policy.tenants}
    for i in range(n):
        t, s = addrs[int(rng.integers(len(addrs)))]
        same = [a for tt, a in addrs if tt == t]
        d = same[int(rng.integers(len(same)))] if rng.random() < 0.9 else "192.168.1.7"
        if rng.random() < 0.5:
            s, d = d, s
        k.i32[B.TENANT, i] = vni[t]
        k.u64[B.SRC_HI, i], k.u64[B.SRC_LO, i] = text_to_addr(s)
        k.u64[B.DST_HI, i], k.u64[B.DST_LO, i] = text_to_addr(d)
        k.u8[B.IP_VER, i] = 4
        k.u16[B.ETHERTYPE, i] = 0x0800
        proto = [6, 17, 1][int(rng.integers(0, 3))]
        k.u8[B.PROTO, i] = proto
        if proto in (6, 17):
            k.u8[B.FLAGS, i] = B.F_PORTS
            k.u16[B.SPORT, i] = int(rng.integers(1024, 65535))
            k.u16[B.DPORT, i] = int(rng.integers(18, 100))
        else:
            k.u8[B.FLAGS, i] = B.F_ICMP
            k.u8[B.ICMP_TYPE, i] = 8
        k.i32[B.L2_OFF, i] = -1
    return k, np.full(n, ctstate.NEW | ctstate.TRACKED, np.uint8)


def _assert_same(a: CompiledPolicy, b: CompiledPolicy) -> None:
    assert a.content_hash == b.content_hash
    assert a.workload_names == b.workload_names and a.origins == b.origins
    assert a.n_classifier_rules == b.n_classifier_rules
    assert a.ruleset.rules == b.ruleset.rules
    for f in ("val", "mask", "ports", "priority", "action", "rule_id"):
        assert np.array_equal(getattr(a.ruleset, f), getattr(b.ruleset, f)), f
    assert np.array_equal(a._need, b._need) and np.array_equal(a._act, b._act)
    for f in ("start", "val", "mask", "ports", "prio", "set", "index", "bits"):
        assert np.array_equal(getattr(a.sets, f), getattr(b.sets, f)), f
    assert a.sets.n_workloads == b.sets.n_workloads


@pytest.mark.parametrize("seed", range(12))
def test_compile_from_previous_equals_a_full_compile(seed):
    rng = np.random.default_rng(seed)
    spec = _spec(rng)
    policy = parse_policy(_text(spec), "p.yaml")
    running = compile_policy(policy)
    kinds = []
    for _ in range(8):
        spec = copy.deepcopy(spec)
        kinds.append(_mutate(rng, spec))
        policy = parse_policy(_text(spec), "p.yaml")
        reused = compile_policy(policy, previous=running)
        full = compile_policy(policy)
        _assert_same(reused, full)
        keys, ct = _packets(rng, policy)
        got, want = reused.decide(keys, ct), full.decide(keys, ct)
        for x, y in zip(got, want):
            assert np.array_equal(x, y), kinds
        running = reused
    assert len(set(kinds)) > 1


def test_previous_lends_rules_and_keeps_the_classifier():
    """The reuse is real: equal rules are the previous compile's objects, and a change of
    membership only (a workload's groups) keeps its classifier."""
    rng = np.random.default_rng(7)
    spec = _spec(rng)
    first = compile_policy(parse_policy(_text(spec), "p.yaml"))
    spec["tenants"][0]["groups"]["g0"][0]["direction"] = "egress"
    second = compile_policy(parse_policy(_text(spec), "p.yaml"), previous=first)
    ids = {id(r) for r in first.ruleset.rules}
    assert any(id(r) in ids for r in second.ruleset.rules)
    same = compile_policy(second.policy, previous=second)
    assert same.shares_classifier and same.classifier is second.classifier
    _assert_same(same, compile_policy(second.policy))
