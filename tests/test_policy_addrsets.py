"""Address sets: remote-group rules and selector peers compile to set rules matched once.

Random policies built around remote groups and selectors (overlapping groups, a workload in
several groups, IPv4 and IPv6, groups that admit themselves, empty groups, admin policies with
selector peers at several priorities, named ports) are decided by the compiled policy, with
and without address sets and with the slow path's caches on and off, and compared with the
plain-Python reference, packet by packet; a membership update (``with_members``) must decide
as a full recompile of the changed model, and as its reference.
"""

import ipaddress
import time

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microseg import ctstate
from microseg.datapath.datapath import BatchResult
from microseg.datapath.fast import source_identity
from microseg.datapath.reasons import L_EMC, L_MEGAFLOW, L_SLOW
from microseg.datapath.slow import SlowPath
from microseg.errors import InputError
from microseg.packet import batch as B
from microseg.packet.batch import FlowKeys, text_to_addr
from microseg.policy import verdict as V
from microseg.policy.compiler import compile_policy, connection_keys, revoked_connections
from microseg.policy.model import parse_policy
from microseg.policy.reference import Reference

V4 = [f"10.0.{i // 7}.{(i * 37) % 250 + 1}" for i in range(40)]
V6 = [f"fd00::{(i * 53) % 4000 + 1:x}" for i in range(40)]
EXT = ["192.168.9.9", "10.0.0.250", "fd00::ffff", "2001:db8::5"]
LABELS = {"app": ["web", "db", "api"], "tier": ["fe", "be"]}


def _sel(rng, pick):
    sel = {}
    if rng.random() < 0.6:
        sel["matchLabels"] = {k: pick(v) for k, v in LABELS.items() if rng.random() < 0.5}
    if rng.random() < 0.3:
        k = pick(list(LABELS))
        op = pick(["In", "NotIn", "Exists", "DoesNotExist"])
        e = {"key": k, "operator": op}
        if op in ("In", "NotIn"):
            e["values"] = sorted({pick(LABELS[k]) for _ in range(2)})
        sel["matchExpressions"] = [e]
    return sel


def random_set_policy(rng) -> tuple[dict, dict]:
    """A policy document (and admin-policy files) where most rules name groups or selectors."""
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    nt = int(rng.integers(1, 3))
    tenants = [{"name": f"t{i}", "vni": 200 + i} for i in range(nt)]
    groups, workloads, nps, files = [], [], [], {}
    for t in tenants:
        k8s = rng.random() < 0.5
        if k8s:
            t["namespaces"] = [{"name": f"{t['name']}-n{k}"} for k in range(int(rng.integers(1, 3)))]
            for ns in t["namespaces"]:
                if rng.random() < 0.6:
                    ns["labels"] = {"purpose": pick(["prod", "test"])}
                if rng.random() < 0.3:
                    ns["isolation"] = "deny"
        ns_names = [n["name"] for n in t.get("namespaces", [])] or [t["name"]]
        names = [f"g{j}" for j in range(int(rng.integers(1, 5)))]
        for g in names:
            rules = []
            for _ in range(int(rng.integers(0, 4))):
                eth = pick(["IPv4", "IPv6"])
                r = {"direction": pick(["ingress", "ingress", "egress"]), "ethertype": eth}
                proto = pick([None, "tcp", "udp", "icmp"])
                if proto is not None:
                    r["protocol"] = proto
                if proto in ("tcp", "udp") and rng.random() < 0.6:
                    lo = int(rng.integers(20, 90))
                    r["port_range_min"], r["port_range_max"] = lo, lo + int(rng.integers(0, 10))
                if proto == "icmp" and rng.random() < 0.5:
                    r["port_range_min"] = pick([8, 128, 0])
                u = rng.random()
                if u < 0.7:
                    r["remote_group_id"] = pick(names + [g, g])  # often the group itself
                elif u < 0.85:
                    r["remote_ip_prefix"] = pick(
                        ["10.0.0.0/24", "0.0.0.0/0"] if eth == "IPv4" else ["fd00::/116"]
                    )
                rules.append(r)
            groups.append({"name": g, "tenant": t["name"], "rules": rules})
        n_w = int(rng.integers(2, 12))
        pool4 = list(rng.permutation(V4))
        pool6 = list(rng.permutation(V6))
        for j in range(n_w):
            w = {"name": f"w{j}", "tenant": t["name"]}
            a4 = [str(pool4.pop()) for _ in range(int(rng.integers(0, 3)))]
            a6 = [str(pool6.pop()) for _ in range(int(rng.integers(0, 2)))]
            if not a4 and not a6:
                a4 = [str(pool4.pop())]
            if a4:
                w["ipv4"] = a4
            if a6:
                w["ipv6"] = a6
            w["labels"] = {k: pick(v) for k, v in LABELS.items() if rng.random() < 0.7}
            if rng.random() < (0.4 if k8s else 0.85):
                # overlapping groups: some workloads in several
                w["security_groups"] = sorted(
                    {pick(names[:-1] or names) for _ in range(int(rng.integers(1, 4)))}
                )
            if k8s:
                w["namespace"] = pick(ns_names)
            if rng.random() < 0.5:
                w["named_ports"] = [{"name": "http", "port": int(rng.integers(20, 90))}]
            workloads.append(w)
        for j in range(int(rng.integers(0, 3)) if k8s else 0):
            spec = {"podSelector": _sel(rng, pick)}
            for key, pk in (("ingress", "from"), ("egress", "to")):
                if rng.random() < 0.7:
                    rules = []
                    for _ in range(int(rng.integers(1, 3))):
                        peers = []
                        for _ in range(int(rng.integers(1, 3))):
                            u = rng.random()
                            if u < 0.5:
                                peers.append({"podSelector": _sel(rng, pick)})
                            elif u < 0.75:
                                peers.append(
                                    {"namespaceSelector": pick([{}, {"matchLabels": {"purpose": "prod"}}])}
                                )
                            elif u < 0.9:
                                peers.append({"podSelector": _sel(rng, pick), "namespaceSelector": {}})
                            else:
                                peers.append({"ipBlock": {"cidr": pick(["10.0.0.0/24", "fd00::/116"])}})
                        r = {pk: peers}
                        if rng.random() < 0.5:
                            r["ports"] = [
                                pick(
                                    [
                                        {"protocol": "TCP", "port": int(rng.integers(20, 90))},
                                        {"port": "http"},
                                        {"protocol": "UDP"},
                                    ]
                                )
                            ]
                        rules.append(r)
                    spec[key] = rules
            nps.append(
                {
                    "apiVersion": "networking.k8s.io/v1",
                    "kind": "NetworkPolicy",
                    "metadata": {"name": f"np{j}", "namespace": pick(ns_names)},
                    "spec": spec,
                }
            )
        if k8s and rng.random() < 0.8:

            def admin_peer(egress):
                peers = [
                    {"pods": {"namespaceSelector": {}, "podSelector": _sel(rng, pick)}},
                    {"namespaces": pick([{}, {"matchLabels": {"purpose": "prod"}}])},
                ]
                if egress:  # classifier rules among the set rules of one check
                    peers.append({"networks": [pick(["10.0.0.0/22", "fd00::/116", "0.0.0.0/0"])]})
                return pick(peers)

            def admin_rules(key, pk, actions):
                out = []
                for i in range(int(rng.integers(1, 4))):
                    r = {
                        "name": f"r{i}",
                        "action": pick(actions),
                        pk: [admin_peer(key == "egress") for _ in range(int(rng.integers(1, 3)))],
                    }
                    if rng.random() < 0.4:
                        r["ports"] = [{"portNumber": {"protocol": "TCP", "port": int(rng.integers(20, 90))}}]
                    out.append(r)
                return out

            docs = []
            for j in range(int(rng.integers(1, 4))):
                spec = {"priority": int(rng.integers(0, 4)), "subject": {"namespaces": {}}}
                for key, pk in (("ingress", "from"), ("egress", "to")):
                    if rng.random() < 0.8:
                        spec[key] = admin_rules(key, pk, ["Allow", "Deny", "Pass"])
                docs.append(
                    {
                        "apiVersion": "policy.networking.k8s.io/v1alpha1",
                        "kind": "AdminNetworkPolicy",
                        "metadata": {"name": f"anp{j}"},
                        "spec": spec,
                    }
                )
            if rng.random() < 0.5:
                spec = {"subject": {"namespaces": {}}}
                for key, pk in (("ingress", "from"), ("egress", "to")):
                    spec[key] = admin_rules(key, pk, ["Allow", "Deny"])
                docs.append(
                    {
                        "apiVersion": "policy.networking.k8s.io/v1alpha1",
                        "kind": "BaselineAdminNetworkPolicy",
                        "metadata": {"name": "default"},
                        "spec": spec,
                    }
                )
            fname = f"admin-{t['name']}.yaml"
            files[fname] = yaml.safe_dump_all(docs, sort_keys=False)
            nps.append({"file": fname, "tenant": t["name"]})
    doc = {
        "tenants": tenants,
        "security_groups": groups,
        "workloads": workloads,
        "network_policies": nps,
        "default_egress": pick(["allow", "deny"]),
        "deny_action": pick(["drop", "reject"]),
        "anti_spoofing": False,
    }
    return doc, files


def load(doc, files, tmp_path):
    d = tmp_path / f"p{abs(hash(yaml.safe_dump(doc))) % 10**8}"
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
    return parse_policy(yaml.safe_dump(doc, sort_keys=False), str(d / "p.yaml"), str(d))


def random_packets(rng, policy, n):
    """NEW packets, mostly between the policy's workloads (same family), some from outside."""
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    k = FlowKeys(n).resize(n)
    addrs = {4: [], 6: []}
    for w in policy.workloads:
        for a in w.addresses:
            addrs[a.version].append((w.tenant, str(a)))
    vni = {t.name: t.vni for t in policy.tenants}
    for i in range(n):
        fam = 6 if (rng.random() < 0.35 and addrs[6]) or not addrs[4] else 4
        t, s = pick(addrs[fam])
        d = pick([a for tt, a in addrs[fam] if tt == t])
        if rng.random() < 0.1:
            s = pick([x for x in EXT if ipaddress.ip_address(x).version == fam])
        elif rng.random() < 0.1:
            d = pick([x for x in EXT if ipaddress.ip_address(x).version == fam])
        if rng.random() < 0.5:
            s, d = d, s
        k.i32[B.TENANT, i] = vni[t]
        k.u64[B.SRC_HI, i], k.u64[B.SRC_LO, i] = text_to_addr(s)
        k.u64[B.DST_HI, i], k.u64[B.DST_LO, i] = text_to_addr(d)
        k.u8[B.IP_VER, i] = fam
        k.u16[B.ETHERTYPE, i] = 0x86DD if fam == 6 else 0x0800
        proto = pick([6, 6, 17, 1 if fam == 4 else 58])
        k.u8[B.PROTO, i] = proto
        if proto in (6, 17):
            k.u8[B.FLAGS, i] = B.F_PORTS
            k.u16[B.SPORT, i] = int(rng.integers(1024, 65535))
            k.u16[B.DPORT, i] = int(rng.integers(18, 100))
        else:
            k.u8[B.FLAGS, i] = B.F_ICMP
            k.u8[B.ICMP_TYPE, i] = pick([8, 0, 128, 129])
        k.i32[B.L2_OFF, i] = -1
    return k, np.full(n, ctstate.NEW | ctstate.TRACKED, np.uint8)


def check(compiled, ref, keys, ct, verdict=None, rule=None, reason=None):
    if verdict is None:
        verdict, rule, reason = compiled.decide(keys, ct)
    for i in range(keys.n):
        d = ref.decide_row(keys.row(i), int(ct[i]))
        assert (int(verdict[i]), int(reason[i])) == (d.verdict, d.reason), (i, keys.row(i), d)
        if d.verdict == V.ALLOW and d.reason == V.R_POLICY:
            assert rule[i] >= 0
            assert compiled.origins[int(compiled.ruleset.rule_id[rule[i]])] in d.rule_origins
        else:
            assert rule[i] == -1
    return verdict


def through_slow_path(compiled, keys, ct, slow=None):
    """Decide every row through the slow path with its caches on (twice: the second pass is
    answered by the caches); returns both passes' results and the slow path."""
    slow = slow or SlowPath(compiled, caches=True, batch_size=max(keys.n, 1))
    _, _, sid = source_identity(compiled, keys)
    rows = np.arange(keys.n, dtype=np.int64)
    out = []
    for _ in range(2):
        res = BatchResult.empty(keys.n)
        slow.decide(keys, rows, ct, sid, res, L_SLOW)
        out.append(res)
    return out, slow


SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1))
def test_sets_decide_as_the_reference(seed, tmp_path):
    rng = np.random.default_rng(seed)
    policy = load(*random_set_policy(rng), tmp_path)
    ref = Reference(policy)
    keys, ct = random_packets(rng, policy, 250)
    sets = compile_policy(policy)
    v = check(sets, ref, keys, ct)
    expanded = compile_policy(policy, address_sets=False)
    assert expanded.sets.n_rules == 0
    assert np.array_equal(check(expanded, ref, keys, ct), v)
    # caches on: the first pass fills them, the second is answered from them
    (first, second), _ = through_slow_path(sets, keys, ct)
    for res in (first, second):
        check(sets, ref, keys, ct, res.verdict, res.rule, res.reason)
    assert np.isin(second.level, [L_EMC, L_MEGAFLOW]).all()


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1))
def test_membership_update_equals_a_recompile(seed, tmp_path):
    rng = np.random.default_rng(seed)
    policy = load(*random_set_policy(rng), tmp_path)
    old = compile_policy(policy)
    t = policy.tenants[int(rng.integers(len(policy.tenants)))].name
    names = [g.name for g in policy.security_groups if g.tenant == t]
    group = names[int(rng.integers(len(names)))]
    tw = [w for w in policy.workloads if w.tenant == t]
    chosen = [w.name for w in tw if rng.random() < 0.5]  # may be empty: the group empties
    new = old.with_members(t, group, chosen)
    assert new.version > old.version
    assert {w.name for w in new.policy.workloads if w.tenant == t and group in w.security_groups} == set(
        chosen
    )
    full = compile_policy(new.policy)
    ref = Reference(new.policy)
    keys, ct = random_packets(rng, new.policy, 250)
    vn = check(new, ref, keys, ct)
    assert np.array_equal(vn, full.decide(keys, ct)[0])
    # the caches move to the new version: nothing the old membership decided is served
    (_, warm), slow = through_slow_path(old, keys, ct)
    slow.swap_policy(new)
    (first, second), _ = through_slow_path(new, keys, ct, slow)
    for res in (first, second):
        check(new, ref, keys, ct, res.verdict, res.rule, res.reason)
    # revalidation: what the update revoked is what the old allowed and the new forbids
    cols = (
        keys.i32[B.TENANT, : keys.n],
        keys.u64[B.SRC_HI, : keys.n],
        keys.u64[B.SRC_LO, : keys.n],
        keys.u64[B.DST_HI, : keys.n],
        keys.u64[B.DST_LO, : keys.n],
        keys.u8[B.PROTO, : keys.n],
        keys.u16[B.SPORT, : keys.n],
        keys.u16[B.DPORT, : keys.n],
        keys.u8[B.ICMP_TYPE, : keys.n],
        keys.u8[B.ICMP_CODE, : keys.n],
    )
    revoked = revoked_connections(old, new, *cols)
    a_old = old.allows_connections(*cols)
    a_new = new.allows_connections(*cols)
    assert np.array_equal(revoked, a_old & ~a_new)


def _self_admitting(n, rng=None, seed=1):
    """One security group of ``n`` workloads with scattered addresses that admits itself."""
    rng = rng or np.random.default_rng(seed)
    addrs = rng.choice(1 << 22, size=n, replace=False) * 3 + 7  # no two adjacent: nothing merges
    wl = [
        {
            "name": f"w{i}",
            "tenant": "t",
            "ipv4": str(ipaddress.IPv4Address((10 << 24) + int(a))),
            "security_groups": ["self"],
        }
        for i, a in enumerate(addrs)
    ]
    wl.append({"name": "outsider", "tenant": "t", "ipv4": "192.168.0.1", "security_groups": ["other"]})
    doc = {
        "tenants": [{"name": "t", "vni": 7}],
        "security_groups": [
            {
                "name": "self",
                "tenant": "t",
                "rules": [
                    {"direction": "ingress", "remote_group_id": "self"},
                    {"direction": "egress", "remote_group_id": "self"},
                ],
            },
            {"name": "other", "tenant": "t", "rules": [{"direction": "egress"}, {"direction": "ingress"}]},
        ],
        "workloads": wl,
    }
    return parse_policy(yaml.safe_dump(doc))


def _pair_keys(policy, pairs):
    a = [policy.workloads[i].addresses[0] for i, _ in pairs]
    b = [policy.workloads[j].addresses[0] for _, j in pairs]
    sa = [text_to_addr(str(x)) for x in a]
    sb = [text_to_addr(str(x)) for x in b]
    n = len(pairs)
    return connection_keys(
        np.full(n, 7),
        [x[0] for x in sa],
        [x[1] for x in sa],
        [x[0] for x in sb],
        [x[1] for x in sb],
        np.full(n, 6),
        np.full(n, 40000),
        np.full(n, 22),
    )


def test_a_large_self_admitting_group_is_linear():
    n = 2000
    policy = _self_admitting(n)
    t0 = time.perf_counter()
    c = compile_policy(policy)
    took = time.perf_counter() - t0
    assert len(c.ruleset) <= 2 * (n + 1) + 2  # one set rule per member and direction
    assert c.sets.n_sets == 1
    assert c.sets.bits.nbytes <= (n + 1 + 7) // 8
    assert took < 60
    rng = np.random.default_rng(3)
    pairs = [(int(rng.integers(n)), int(rng.integers(n))) for _ in range(500)] + [(0, n), (n, 1)]
    keys = _pair_keys(policy, pairs)
    v, rule, why = c.decide(keys, np.full(keys.n, ctstate.NEW, np.uint8))
    assert (v[:500] == V.ALLOW).all() and (why[:500] == V.R_POLICY).all()
    assert v[500] == V.DROP and why[500] == V.R_EGRESS_DENIED
    assert v[501] == V.DROP and why[501] == V.R_INGRESS_DENIED
    assert c.describe_rule(int(rule[0])) == "security group t/self rule 0"
    assert c.rule_members(int(rule[0])) == tuple(f"t/w{i}" for i in range(n))
    assert c.rule_members(0) is None
    check(c, Reference(policy), keys, np.full(keys.n, ctstate.NEW, np.uint8))


def test_membership_change_shares_the_classifier():
    n = 300
    policy = _self_admitting(n)
    c = compile_policy(policy)
    members = [w.name for w in policy.workloads if "self" in w.security_groups]
    smaller = c.with_members("t", "self", members[1:] + ["outsider"])
    assert smaller.shares_classifier and smaller.classifier is c.classifier
    assert smaller.ruleset.rules[0] is c.ruleset.rules[0]  # rule objects lent, not rebuilt
    assert smaller.version > c.version
    pairs = [(0, 1), (1, 2), (n, 1), (1, n), (0, n)]
    keys = _pair_keys(policy, pairs)
    ct = np.full(keys.n, ctstate.NEW, np.uint8)
    check(smaller, Reference(smaller.policy), keys, ct)
    v_old = c.decide(keys, ct)[0]
    v_new = smaller.decide(keys, ct)[0]
    assert list(v_old == V.ALLOW) == [True, True, False, False, False]
    # w0 left (and outsider keeps "other": it allows everything; it joined "self" too)
    assert list(v_new == V.ALLOW) == [False, True, True, True, False]
    with pytest.raises(InputError):
        c.with_members("t", "nope", [])
    with pytest.raises(InputError):
        c.with_members("t", "self", ["nobody"])


def test_set_rules_in_the_rule_set_match_nothing_alone():
    """The rule set's rows for set rules carry an impossible conntrack state, so matching the
    rule set without the sets fails closed rather than reading them as "any remote"."""
    policy = _self_admitting(20)
    c = compile_policy(policy)
    assert c.n_classifier_rules < len(c.ruleset)
    ct = c.ruleset.val[c.n_classifier_rules :, 6]
    assert (ct == ctstate.INVALID).all()
    assert len(c.classifier.ruleset) == c.n_classifier_rules


def test_empty_group_and_selector_admit_nothing_and_fill_on_update(tmp_path):
    doc = {
        "tenants": [{"name": "t", "vni": 9}],
        "security_groups": [
            {
                "name": "db",
                "tenant": "t",
                "rules": [
                    {"direction": "ingress", "remote_group_id": "app"},
                    {"direction": "ingress", "ethertype": "IPv6", "remote_group_id": "app"},
                ],
            },
            {
                "name": "app",
                "tenant": "t",
                "rules": [{"direction": "egress"}, {"direction": "egress", "ethertype": "IPv6"}],
            },
        ],
        "workloads": [
            {"name": "d", "tenant": "t", "ipv4": "10.0.0.1", "ipv6": "fd00::1", "security_groups": ["db"]},
            {"name": "a", "tenant": "t", "ipv4": "10.0.0.2", "ipv6": "fd00::2", "security_groups": []},
        ],
        "default_egress": "allow",
    }
    policy = parse_policy(yaml.safe_dump(doc))
    c = compile_policy(policy)
    flows = [("10.0.0.2", "10.0.0.1"), ("fd00::2", "fd00::1")]
    src = [text_to_addr(s) for s, _ in flows]
    dst = [text_to_addr(d) for _, d in flows]
    keys = connection_keys(
        [9, 9],
        [s[0] for s in src],
        [s[1] for s in src],
        [d[0] for d in dst],
        [d[1] for d in dst],
        [6, 6],
        None,
        [80, 80],
    )
    ct = np.full(2, ctstate.NEW, np.uint8)
    assert (c.decide(keys, ct)[0] != V.ALLOW).all()
    c2 = c.with_members("t", "app", ["a"])
    v = check(c2, Reference(c2.policy), keys, ct)
    assert (v == V.ALLOW).all()  # both families: a's addresses are the set's


def test_datapath_with_caches_follows_a_membership_update():
    """Through the whole datapath with its caches on: NEW connections between members are
    allowed and cached (megaflow entries wildcard only the source port); after a member leaves
    the group, its new connections are judged by the new sets, never by a cached answer of
    the old version, and its tracked connections are cut."""
    from microseg.datapath import Datapath, DatapathConfig
    from microseg.packet import build as PB
    from microseg.packet.batch import Batch

    policy = _self_admitting(30)
    policy = type(policy)(**{**policy.__dict__, "untagged_tenant": "t"})
    c = compile_policy(policy)
    ip = [str(w.addresses[0]) for w in policy.workloads]

    def syns(pairs, sport0):
        frames = [
            PB.tcp_packet(ip[i], ip[j], sport0 + k, 22, flags="S", seq=1) for k, (i, j) in enumerate(pairs)
        ]
        return Batch.from_packets(frames, ts=[10**9 + 1000 * k for k in range(len(frames))])

    dp = Datapath(c, DatapathConfig(caches=True))
    pairs = [(0, 1), (2, 0), (3, 4)]
    r = dp.process(syns(pairs, 40000))
    assert (r.verdict == V.ALLOW).all() and (r.level == L_SLOW).all()
    r = dp.process(syns(pairs, 41000))  # other source ports: the megaflow entries answer
    assert (r.verdict == V.ALLOW).all() and (r.level == L_MEGAFLOW).all()
    new = c.with_members("t", "self", [f"w{i}" for i in range(1, 30)])
    out = dp.swap_policy(new)
    assert out["cut"] == 4  # w0's connections: (0, 1) and (2, 0), two each
    for sport in (50000, 51000):
        r = dp.process(syns(pairs, sport))
        assert list(r.verdict) == [V.DROP, V.DROP, V.ALLOW]
        assert list(r.reason[:2]) == [V.R_EGRESS_DENIED, V.R_EGRESS_DENIED]  # w2 -> w0: w2 egress
    assert r.level[2] == L_MEGAFLOW  # the new version's own entry
