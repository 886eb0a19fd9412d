"""CompiledPolicy.decide (Numba + classifier) against the per-packet reference, on random
policies and random packets (IPv4, IPv6, ICMP, fragments, damaged, cross-tenant), plus the
semantics the reference encodes, checked on hand-built cases."""

import os

import numpy as np
import pytest
import yaml

from microseg import ctstate
from microseg.packet import batch as B
from microseg.packet.batch import FlowKeys, text_to_addr
from microseg.policy import verdict as V
from microseg.policy.compiler import compile_policy, connection_keys
from microseg.policy.model import load_policy, parse_policy
from microseg.policy.reference import Reference

VEC = os.path.join(os.path.dirname(__file__), "vectors", "policy")
V4 = [f"10.0.0.{i}" for i in range(1, 13)]
V6 = [f"fd00::{i:x}" for i in range(1, 13)]
PREFIX4 = ["10.0.0.0/29", "10.0.0.8/30", "0.0.0.0/0", "10.0.0.5/32", "10.0.0.0/24", "192.168.0.0/16"]
PREFIX6 = ["fd00::/125", "fd00::8/126", "::/0", "fd00::5/128", "fd00::/64"]
LABELS = {"app": ["web", "db", "api"], "tier": ["fe", "be"]}


# ---- random policies ----------------------------------------------------------------------------
def random_policy(rng) -> dict:
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    nt = int(rng.integers(1, 4))
    tenants = [{"name": f"t{i}", "vni": 100 + i} for i in range(nt)]
    for t in tenants:
        if rng.random() < 0.6:
            t["labels"] = {"env": pick(["prod", "dev"])}
    groups, workloads, nps, admin_files = [], [], [], {}
    for t in tenants:
        if rng.random() < 0.5:  # a Kubernetes cluster: namespaces inside
            t["namespaces"] = [{"name": f"{t['name']}-n{k}"} for k in range(int(rng.integers(1, 4)))]
            for ns in t["namespaces"]:
                if rng.random() < 0.6:
                    ns["labels"] = {"purpose": pick(["prod", "test"])}
                if rng.random() < 0.25:
                    ns["isolation"] = pick(["deny", "kubernetes"])
            if rng.random() < 0.3:
                t["isolation"] = pick(["deny", "kubernetes"])
    for t in tenants:
        ns_names = [n["name"] for n in t.get("namespaces", [])] or [t["name"]]
        names = [f"sg{j}" for j in range(int(rng.integers(0, 4)))]
        for g in names:
            rules = []
            for _ in range(int(rng.integers(0, 5))):
                r = {"direction": pick(["ingress", "egress"])}
                eth = pick(["IPv4", "IPv6"])
                if rng.random() < 0.7:
                    r["ethertype"] = eth
                else:
                    eth = "IPv4"
                proto = pick([None, "tcp", "udp", "icmp", "sctp", "6", "47", "any"])
                if proto == "icmp" and eth == "IPv6" and rng.random() < 0.5:
                    proto = "ipv6-icmp"
                if proto is not None:
                    r["protocol"] = proto
                if proto in ("tcp", "udp", "sctp", "6") and rng.random() < 0.6:
                    lo = int(rng.integers(20, 90))
                    r["port_range_min"], r["port_range_max"] = lo, lo + int(rng.integers(0, 20))
                if proto in ("icmp", "ipv6-icmp") and rng.random() < 0.6:
                    r["port_range_min"] = pick([0, 3, 8, 128, 129])
                    if rng.random() < 0.5:
                        r["port_range_max"] = pick([0, 1])
                u = rng.random()
                if u < 0.4:
                    r["remote_ip_prefix"] = pick(PREFIX4 if eth == "IPv4" else PREFIX6)
                elif u < 0.7:
                    r["remote_group_id"] = pick(names)
                rules.append(r)
            groups.append({"name": g, "tenant": t["name"], "rules": rules})
        used4, used6 = set(), set()
        for j in range(int(rng.integers(1, 8))):
            w = {"name": f"w{j}", "tenant": t["name"]}
            a4 = [a for a in rng.permutation(V4)[: int(rng.integers(0, 3))] if a not in used4]
            a6 = [a for a in rng.permutation(V6)[: int(rng.integers(0, 2))] if a not in used6]
            if not a4 and not a6:
                a4 = [a for a in V4 if a not in used4][:1]
            used4.update(a4)
            used6.update(a6)
            if a4:
                w["ipv4"] = [str(a) for a in a4]
            if a6:
                w["ipv6"] = [str(a) for a in a6]
            if rng.random() < 0.7:
                w["mac"] = "02:00:00:%02x:%02x:%02x" % (int(t["vni"]) & 0xFF, j, int(rng.integers(256)))
            w["labels"] = {k: pick(v) for k, v in LABELS.items() if rng.random() < 0.6}
            sg_p = 0.7 if "namespaces" not in t else 0.25
            if names and rng.random() < sg_p:
                w["security_groups"] = sorted({pick(names) for _ in range(int(rng.integers(1, 3)))})
            if "namespaces" in t:
                w["namespace"] = pick(ns_names)
            if rng.random() < 0.5:
                w["named_ports"] = [{"name": "http", "port": int(rng.integers(20, 90))}]
                if rng.random() < 0.5:
                    w["named_ports"].append({"name": "dns", "port": 53, "protocol": pick(["UDP", "TCP"])})
            workloads.append(w)
        for j in range(int(rng.integers(0, 4))):
            spec = {"podSelector": _selector(rng, pick)}
            for key, peer_key in (("ingress", "from"), ("egress", "to")):
                if rng.random() < 0.6:
                    spec[key] = [_np_rule(rng, pick, peer_key) for _ in range(int(rng.integers(0, 3)))]
            if rng.random() < 0.5:
                types = [x for x in ("Ingress", "Egress") if rng.random() < 0.6]
                if types:
                    spec["policyTypes"] = types
            nps.append(
                {
                    "apiVersion": "networking.k8s.io/v1",
                    "kind": "NetworkPolicy",
                    "metadata": {"name": f"np{j}", "namespace": pick(ns_names)},
                    "spec": spec,
                }
            )
        if "namespaces" in t and rng.random() < 0.7:
            docs = [_admin_policy(rng, pick, f"anp{j}", False) for j in range(int(rng.integers(1, 4)))]
            if rng.random() < 0.6:
                docs.append(_admin_policy(rng, pick, "default", True))
            fname = f"admin-{t['name']}.yaml"
            admin_files[fname] = yaml.safe_dump_all(docs, sort_keys=False)
            nps.append({"file": fname, "tenant": t["name"]})
    doc = {
        "tenants": tenants,
        "security_groups": groups,
        "workloads": workloads,
        "network_policies": nps,
        "default_egress": pick(["allow", "deny"]),
        "deny_action": pick(["drop", "reject"]),
        "anti_spoofing": bool(rng.random() < 0.7),
    }
    if rng.random() < 0.5:
        doc["untagged_tenant"] = tenants[0]["name"]
    doc["_files"] = admin_files
    return doc


def _admin_policy(rng, pick, name, baseline):
    def ns_sel():
        return pick(
            [
                {},
                {"matchLabels": {"purpose": pick(["prod", "test"])}},
                {"matchExpressions": [{"key": "purpose", "operator": "DoesNotExist"}]},
            ]
        )

    def peer(egress):
        u = rng.random()
        if u < 0.4:
            return {"namespaces": ns_sel()}
        if u < 0.8 or not egress:
            return {"pods": {"namespaceSelector": ns_sel(), "podSelector": _selector(rng, pick)}}
        return {"networks": [pick(["10.0.0.0/29", "10.0.0.8/30", "0.0.0.0/0", "fd00::/125"])]}

    def port():
        u = rng.random()
        if u < 0.4:
            return {"portNumber": {"protocol": pick(["TCP", "UDP"]), "port": int(rng.integers(20, 90))}}
        if u < 0.7:
            lo = int(rng.integers(20, 90))
            return {
                "portRange": {
                    "protocol": pick(["TCP", "UDP"]),
                    "start": lo,
                    "end": lo + int(rng.integers(0, 30)),
                }
            }
        return {"namedPort": pick(["http", "dns", "nope"])}

    actions = ["Allow", "Deny"] if baseline else ["Allow", "Deny", "Pass"]
    spec = {
        "subject": {"namespaces": ns_sel()}
        if rng.random() < 0.5
        else {"pods": {"namespaceSelector": ns_sel(), "podSelector": _selector(rng, pick)}}
    }
    if not baseline:
        spec["priority"] = int(rng.integers(0, 5))
    for key, pk in (("ingress", "from"), ("egress", "to")):
        if rng.random() < 0.7:
            rules = []
            for i in range(int(rng.integers(1, 4))):
                r = {
                    "name": f"r{i}",
                    "action": pick(actions),
                    pk: [peer(key == "egress") for _ in range(int(rng.integers(1, 3)))],
                }
                if rng.random() < 0.5:
                    r["ports"] = [port() for _ in range(int(rng.integers(1, 3)))]
                rules.append(r)
            spec[key] = rules
    return {
        "apiVersion": "policy.networking.k8s.io/v1alpha1",
        "kind": "BaselineAdminNetworkPolicy" if baseline else "AdminNetworkPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }


def load_random(rng, tmp_path, name="random.yaml"):
    """A random policy written out (admin policies in files beside it) and loaded."""
    doc = random_policy(rng)
    files = doc.pop("_files")
    d = tmp_path / name.replace(".yaml", "")
    d.mkdir(parents=True, exist_ok=True)
    for fname, text in files.items():
        (d / fname).write_text(text)
    return parse_policy(yaml.safe_dump(doc, sort_keys=False), str(d / name), str(d))


def _selector(rng, pick):
    sel = {}
    if rng.random() < 0.5:
        sel["matchLabels"] = {k: pick(v) for k, v in LABELS.items() if rng.random() < 0.5}
    if rng.random() < 0.3:
        k = pick(list(LABELS))
        op = pick(["In", "NotIn", "Exists", "DoesNotExist"])
        e = {"key": k, "operator": op}
        if op in ("In", "NotIn"):
            e["values"] = sorted({pick(LABELS[k]) for _ in range(2)})
        sel["matchExpressions"] = [e]
    return sel


def _np_rule(rng, pick, peer_key):
    r = {}
    if rng.random() < 0.7:
        peers = []
        for _ in range(int(rng.integers(1, 3))):
            u = rng.random()
            if u < 0.35:
                fam6 = rng.random() < 0.3
                b = {
                    "cidr": pick(
                        ["fd00::/64", "fd00::/124"] if fam6 else ["10.0.0.0/24", "10.0.0.0/28", "0.0.0.0/0"]
                    )
                }
                if rng.random() < 0.5:
                    b["except"] = [pick(["fd00::4/126"] if fam6 else ["10.0.0.4/30", "10.0.0.8/31"])]
                peers.append({"ipBlock": b})
            elif u < 0.7:
                peers.append({"podSelector": _selector(rng, pick)})
            elif u < 0.85:
                peers.append({"namespaceSelector": pick([{}, {"matchLabels": {"env": "prod"}}])})
            else:
                peers.append(
                    {
                        "podSelector": _selector(rng, pick),
                        "namespaceSelector": {"matchLabels": {"env": pick(["prod", "dev"])}},
                    }
                )
        r[peer_key] = peers
    if rng.random() < 0.6:
        ports = []
        for _ in range(int(rng.integers(1, 3))):
            p = {}
            if rng.random() < 0.8:
                p["protocol"] = pick(["TCP", "UDP", "SCTP"])
            if rng.random() < 0.15:
                p["port"] = pick(["http", "dns", "nope"])
            elif rng.random() < 0.7:
                p["port"] = int(rng.integers(20, 90))
                if rng.random() < 0.4:
                    p["endPort"] = p["port"] + int(rng.integers(0, 15))
            ports.append(p)
        r["ports"] = ports
    return r


# ---- random packets -------------------------------------------------------------------------------
PROTOS = [6, 17, 1, 58, 132, 47]
CT = [
    0,
    ctstate.NEW | ctstate.TRACKED,
    ctstate.NEW,
    ctstate.ESTABLISHED | ctstate.TRACKED,
    ctstate.ESTABLISHED | ctstate.REPLY | ctstate.TRACKED,
    ctstate.RELATED | ctstate.TRACKED,
    ctstate.INVALID | ctstate.TRACKED,
]


def random_keys(rng, policy, n):
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    k = FlowKeys(n).resize(n)
    ct = np.zeros(n, np.uint8)
    vnis = [t.vni for t in policy.tenants]
    macs = [w.mac for w in policy.workloads if w.mac is not None] or [0x020000000001]
    ext4, ext6 = ["192.168.3.4", "10.0.0.200", "8.8.8.8"], ["fd00::99", "2001:db8::1"]
    for i in range(n):
        u = rng.random()
        k.i32[B.TENANT, i] = pick(vnis) if u < 0.85 else (-1 if u < 0.95 else 9999)
        v6 = rng.random() < 0.35
        pool = (V6 + ext6) if v6 else (V4 + ext4)
        s, d = pick(pool), pick(pool)
        k.u64[B.SRC_HI, i], k.u64[B.SRC_LO, i] = text_to_addr(s)
        k.u64[B.DST_HI, i], k.u64[B.DST_LO, i] = text_to_addr(d)
        if v6 and rng.random() < 0.03:  # IPv4-mapped address inside an IPv6 packet
            k.u64[B.SRC_HI, i], k.u64[B.SRC_LO, i] = 0, 0xFFFF00000000 | 0x0A000001
        k.u8[B.IP_VER, i] = 6 if v6 else 4
        k.u16[B.ETHERTYPE, i] = 0x86DD if v6 else 0x0800
        proto = pick(PROTOS)
        if proto == 1 and v6:
            proto = 58
        if proto == 58 and not v6:
            proto = 1
        k.u8[B.PROTO, i] = proto
        flags = 0
        if proto in (6, 17, 132):
            if rng.random() < 0.9:
                flags |= B.F_PORTS
                k.u16[B.SPORT, i] = int(rng.integers(1, 65535))
                k.u16[B.DPORT, i] = int(rng.integers(18, 110))
            else:
                flags |= B.F_FRAG  # a later fragment: no ports
        if proto in (1, 58):
            flags |= B.F_ICMP
            k.u8[B.ICMP_TYPE, i] = pick([0, 3, 8, 128, 129, 133, 135, 136, 137])
            k.u8[B.ICMP_CODE, i] = pick([0, 0, 1, 4])
        u = rng.random()
        if u < 0.03:
            k.u8[B.ERROR, i] = int(rng.integers(1, 26))
        elif u < 0.07:
            k.u8[B.IP_VER, i] = 0
            k.u16[B.ETHERTYPE, i] = pick([0x0806, 0x88CC])
            flags = B.F_ARP if k.u16[B.ETHERTYPE, i] == 0x0806 else 0
        k.u8[B.FLAGS, i] = flags
        if rng.random() < 0.8:
            k.i32[B.L2_OFF, i] = 0
            owner = [w for w in policy.workloads if any(str(a) == s for a in w.addresses) and w.mac]
            u = rng.random()
            k.u64[B.ETH_SRC, i] = (
                owner[0].mac if owner and u < 0.75 else pick(macs) if u < 0.9 else int(rng.integers(1 << 40))
            )
        else:
            k.i32[B.L2_OFF, i] = -1
        ct[i] = pick(CT)
    return k, ct


def _compare(compiled, ref, keys, ct):
    verdict, rule, reason = compiled.decide(keys, ct)
    for i in range(keys.n):
        d = ref.decide_row(keys.row(i), int(ct[i]))
        assert (int(verdict[i]), int(reason[i])) == (d.verdict, d.reason), (i, keys.row(i), ct[i], d)
        if d.verdict == V.ALLOW and d.reason == V.R_POLICY:
            assert rule[i] >= 0
            assert compiled.origins[int(compiled.ruleset.rule_id[rule[i]])] in d.rule_origins
        else:
            assert rule[i] == -1
    return verdict, reason


@pytest.mark.parametrize("seed", range(48))
def test_decide_matches_reference_on_random_policies(seed, tmp_path):
    rng = np.random.default_rng(seed)
    policy = load_random(rng, tmp_path, f"random-{seed}.yaml")
    compiled = compile_policy(policy)
    keys, ct = random_keys(rng, policy, 300)
    _compare(compiled, Reference(policy), keys, ct)


@pytest.mark.parametrize("algo", ["tss", "linear"])
@pytest.mark.parametrize("seed", [3, 8, 15])
def test_decide_is_the_same_with_every_classifier(seed, algo, tmp_path):
    rng = np.random.default_rng(seed)
    policy = load_random(rng, tmp_path)
    keys, ct = random_keys(rng, policy, 300)
    _compare(compile_policy(policy, algo), Reference(policy), keys, ct)


def test_random_policies_reach_every_reason(tmp_path):
    """The random cases above are not vacuous: together they produce every verdict/reason,
    and they exercise every check kind (admin, baseline, default included)."""
    seen = set()
    kinds = set()
    for seed in range(48):
        rng = np.random.default_rng(seed)
        policy = load_random(rng, tmp_path, f"r{seed}.yaml")
        kinds |= set(np.flatnonzero(compile_policy(policy)._need.any(axis=1)).tolist())
        keys, ct = random_keys(rng, policy, 300)
        v, _, r = compile_policy(policy).decide(keys, ct)
        seen |= set(zip(v.tolist(), r.tolist()))
    reasons = {r for _, r in seen}
    assert reasons == set(V.REASONS)
    assert kinds == set(range(V.N_CHECKS))
    assert {v for v, _ in seen} == {V.ALLOW, V.DROP, V.REJECT}


def test_example_policy_against_reference():
    policy = load_policy(os.path.join(VEC, "example.yaml"))
    rng = np.random.default_rng(7)
    keys, ct = random_keys(rng, policy, 2000)
    _compare(compile_policy(policy), Reference(policy), keys, ct)


@pytest.mark.parametrize("name", ["example.yaml", "openstack_policy.yaml", "k8s_policy.yaml"])
def test_vector_policies_against_reference(name):
    policy = load_policy(os.path.join(VEC, name))
    rng = np.random.default_rng(11)
    keys, ct = random_keys(rng, policy, 600)
    # use the policy's own addresses as well as the fixed pools
    addrs = [a for w in policy.workloads for a in w.addresses]
    for i in range(keys.n):
        if rng.random() < 0.6:
            a, b = addrs[int(rng.integers(len(addrs)))], addrs[int(rng.integers(len(addrs)))]
            if a.version == b.version:
                keys.u64[B.SRC_HI, i], keys.u64[B.SRC_LO, i] = text_to_addr(str(a))
                keys.u64[B.DST_HI, i], keys.u64[B.DST_LO, i] = text_to_addr(str(b))
                keys.u8[B.IP_VER, i] = a.version
    _compare(compile_policy(policy), Reference(policy), keys, ct)


def test_empty_batch_and_empty_policy():
    policy = parse_policy("tenants: [{name: t, vni: 1}]\n")
    c = compile_policy(policy)
    v, r, why = c.decide(FlowKeys(4).resize(0))
    assert v.shape == r.shape == why.shape == (0,)
    keys = _keys([("10.0.0.1", "10.0.0.2", 6, 80)], tenant=1)
    v, r, why = c.decide(keys)
    assert (v[0], why[0]) == (V.DROP, V.R_NO_ENDPOINT)


def test_ct_state_shape_is_checked():
    c = compile_policy(parse_policy("tenants: [{name: t, vni: 1}]\n"))
    from microseg.errors import InputError

    with pytest.raises(InputError):
        c.decide(_keys([("10.0.0.1", "10.0.0.2", 6, 80)], tenant=1), np.zeros(3, np.uint8))


# ---- semantics on hand-built packets --------------------------------------------------------------
def _keys(flows, tenant, eth_src=None):
    """flows: (src, dst, proto, dport or (icmp_type, icmp_code))."""
    src = [text_to_addr(f[0]) for f in flows]
    dst = [text_to_addr(f[1]) for f in flows]
    proto = [f[2] for f in flows]
    dport = [f[3] if not isinstance(f[3], tuple) else 0 for f in flows]
    itype = [f[3][0] if isinstance(f[3], tuple) else 0 for f in flows]
    icode = [f[3][1] if isinstance(f[3], tuple) else 0 for f in flows]
    n = len(flows)
    return connection_keys(
        np.full(n, tenant),
        [s[0] for s in src],
        [s[1] for s in src],
        [d[0] for d in dst],
        [d[1] for d in dst],
        proto,
        np.full(n, 40000),
        dport,
        itype,
        icode,
        eth_src,
    )


def _decide(policy, flows, tenant, ct=None, eth_src=None):
    c = compile_policy(policy)
    keys = _keys(flows, tenant, eth_src)
    ct = None if ct is None else np.asarray(ct, np.uint8)
    v, r, why = c.decide(keys, ct)
    ref = Reference(policy)
    for i in range(keys.n):
        d = ref.decide_row(keys.row(i), 0 if ct is None else int(ct[i]))
        assert (v[i], why[i]) == (d.verdict, d.reason)
    return [(V.verdict_name(a), V.reason_name(b)) for a, b in zip(v, why)], [c.describe_rule(x) for x in r]


EX = None


def _example():
    global EX
    if EX is None:
        EX = load_policy(os.path.join(VEC, "example.yaml"))
    return EX


def test_cross_tenant_isolation_with_overlapping_addresses():
    p = _example()
    # 192.168.1.10 is acme/web-1 in VNI 5001 and globex/g-web in VNI 5002.
    flows = [("192.168.1.5", "192.168.1.10", 6, 22)]  # bastion -> web-1 ssh
    assert _decide(p, flows, 5001)[0] == [("allow", "policy")]
    # the same bytes in globex's VNI: no bastion there, g-web's group does not open 22
    assert _decide(p, flows, 5002)[0] == [("drop", "ingress_denied")]
    # globex's open group allows DNS from anywhere; acme's web does not
    dns = [("8.8.8.8", "192.168.1.10", 17, 53)]
    assert _decide(p, dns, 5002)[0] == [("allow", "policy")]
    assert _decide(p, dns, 5001)[0] == [("drop", "ingress_denied")]
    # unknown VNI and untunnelled packets never reach a workload
    assert _decide(p, flows, 5003)[0] == [("drop", "unknown_vni")]
    assert _decide(p, flows, -1)[0] == [("drop", "no_tenant")]


def test_egress_and_ingress_must_both_allow():
    p = _example()
    res, rules = _decide(
        p,
        [
            ("192.168.1.10", "192.168.1.20", 6, 5432),  # web-1 -> db-1: SG ok, NP db-from-api: no
            ("192.168.1.30", "192.168.1.20", 6, 5432),  # api-1 -> db-1: NP ok, SG db: no
            ("192.168.1.10", "192.168.1.30", 6, 8080),  # web-1 -> api-1: web egress only to db
            ("192.168.1.5", "192.168.1.30", 6, 8080),  # bastion -> api-1: NP peers web/10/8 only
            ("192.168.1.5", "192.168.1.10", 6, 80),  # bastion -> web-1:80 (0.0.0.0/0)
            ("10.9.9.9", "192.168.1.30", 17, 9005),  # external -> api-1 udp range via ipBlock
            ("10.1.2.3", "192.168.1.30", 17, 9005),  # ... but 10.1/16 is excepted
        ],
        5001,
    )
    assert res == [
        ("drop", "ingress_denied"),
        ("drop", "ingress_denied"),
        ("drop", "egress_denied"),
        ("drop", "ingress_denied"),
        ("allow", "policy"),
        ("allow", "policy"),
        ("drop", "ingress_denied"),
    ]
    assert rules[4] == "security group acme/web rule 0"
    assert rules[5] == "NetworkPolicy acme/api-allow-web ingress[0]"


def test_icmp_type_code_and_ipv6():
    p = _example()
    res, _ = _decide(
        p,
        [
            ("192.168.7.7", "192.168.1.10", 1, (8, 0)),  # echo request from 192.168/16: allowed
            ("192.168.7.7", "192.168.1.10", 1, (8, 3)),  # any code
            ("192.168.7.7", "192.168.1.10", 1, (13, 0)),  # timestamp: not allowed
            ("10.7.7.7", "192.168.1.10", 1, (8, 0)),  # outside the prefix
            ("fd00:9::1", "fd00:1::10", 6, 80),  # IPv6 rule (no prefix: any IPv6)
            ("fd00:9::1", "fd00:1::10", 6, 443),
            ("fd00:1::10", "fd00:1::5", 6, 80),  # web-1 egress over IPv6: web's egress is db only
        ],
        5001,
    )
    assert [r[1] for r in res] == [
        "policy",
        "policy",
        "ingress_denied",
        "ingress_denied",
        "policy",
        "ingress_denied",
        "egress_denied",
    ]
    res, _ = _decide(
        p,
        [
            ("fd00:9::1", "fd00:1::10", 58, (128, 0)),  # globex open: any ICMPv6
            ("fd00:9::1", "fd00:1::10", 58, (135, 0)),  # ND always passes
            ("192.168.9.9", "192.168.1.10", 1, (8, 0)),
        ],
        5002,
    )
    assert res == [("allow", "policy"), ("allow", "neighbour_discovery"), ("drop", "ingress_denied")]


def test_stateful_semantics():
    p = _example()
    flows = [("192.168.1.10", "192.168.1.5", 6, 40000)] * 5  # a reply web-1 -> bastion
    ct = [
        ctstate.NEW | ctstate.TRACKED,
        ctstate.ESTABLISHED | ctstate.REPLY | ctstate.TRACKED,
        ctstate.RELATED | ctstate.TRACKED,
        ctstate.INVALID | ctstate.TRACKED,
        0,
    ]
    res, _ = _decide(p, flows, 5001, ct)
    assert res == [
        ("drop", "egress_denied"),
        ("allow", "established"),
        ("allow", "related"),
        ("drop", "ct_invalid"),
        ("drop", "egress_denied"),
    ]
    ok = [("192.168.1.5", "192.168.1.10", 6, 22)]
    assert _decide(p, ok, 5001, [ctstate.INVALID | ctstate.TRACKED])[0] == [("drop", "ct_invalid")]


def test_default_egress_and_reject():
    base = """
tenants: [{name: t, vni: 1}]
security_groups:
  - {name: noeg, tenant: t, rules: [{direction: ingress, protocol: tcp, port_range_min: 80, port_range_max: 80}]}
workloads:
  - {name: a, tenant: t, ipv4: 10.0.0.1}
  - {name: b, tenant: t, ipv4: 10.0.0.2, security_groups: [noeg]}
"""
    flows = [
        ("10.0.0.1", "8.8.8.8", 17, 53),
        ("10.0.0.2", "8.8.8.8", 17, 53),
        ("10.0.0.1", "10.0.0.2", 6, 80),
        ("8.8.8.8", "10.0.0.1", 6, 80),
    ]
    res, rules = _decide(parse_policy(base + "default_egress: allow\n"), flows, 1)
    assert res == [
        ("allow", "policy"),
        ("allow", "policy"),
        ("allow", "policy"),
        ("drop", "ingress_denied"),
    ]  # a has no groups: default-deny ingress
    assert rules[0] == "default_egress: allow"
    res, _ = _decide(parse_policy(base + "default_egress: deny\ndeny_action: reject\n"), flows, 1)
    assert res == [
        ("reject", "egress_denied"),
        ("reject", "egress_denied"),
        ("reject", "egress_denied"),
        ("reject", "ingress_denied"),
    ]


def test_k8s_isolation_and_union():
    p = load_policy(os.path.join(VEC, "k8s_policy.yaml"))
    res, rules = _decide(
        p,
        [
            ("172.17.1.20", "172.17.0.10", 6, 6379),  # fe -> db redis: podSelector role=frontend
            ("172.17.1.20", "172.17.0.10", 6, 6380),  # wrong port
            ("172.17.2.9", "172.17.0.10", 6, 6379),  # ipBlock 172.17/16 (external)
            ("172.17.1.9", "172.17.0.10", 6, 6379),  # ... but except 172.17.1/24
            ("10.0.0.30", "172.17.0.10", 6, 6379),  # worker: namespaceSelector project=myproject
            ("172.17.0.10", "10.0.0.5", 6, 5978),  # db egress to 10.0.0.0/24:5978
            ("172.17.0.10", "10.0.0.5", 6, 5979),
            ("172.17.1.20", "10.0.0.9", 6, 32100),  # fe egress port range (endPort)
            ("172.17.1.20", "10.0.0.9", 6, 32769),
            ("172.17.1.20", "10.0.0.30", 17, 9),  # fe -> worker: role NotIn frontend, no tier
            ("172.17.1.20", "10.0.0.40", 17, 9),  # fe -> batch: has tier -> egress denied
            ("10.0.0.50", "10.0.0.30", 6, 80),  # default-deny-ingress selects every pod
            ("10.0.0.50", "8.8.8.8", 6, 80),  # plain: no egress policy: default_egress allow
        ],
        8001,
    )
    assert [r[1] for r in res] == [
        "policy",
        "ingress_denied",
        "policy",
        "ingress_denied",
        "policy",
        "policy",
        "egress_denied",
        "policy",
        "egress_denied",
        "ingress_denied",
        "egress_denied",
        "ingress_denied",
        "policy",
    ]
    # fe -> worker passes fe's egress (multi-port-egress to[1] or allow-all-egress) but
    # worker is isolated for ingress by default-deny-ingress.
    assert rules[9] == "-"
    # In tenant "other" (VNI 8002) the same addresses are other's: 172.17.1.20 is o-fe, and
    # 172.17.0.10 is no workload at all, so shop's db is out of reach whatever the rules say.
    c = compile_policy(p)
    d = c.decide(_keys([("172.17.1.20", "172.17.0.10", 6, 6379)], 8002), detail=True)
    assert c.workload_names[d.src_workload[0]] == "other/o-fe" and d.dst_workload[0] == -1
    assert d.reason[0] == V.R_POLICY  # o-fe's default egress allow, towards outside


def test_ipv6_ipblock_and_fragments():
    p = load_policy(os.path.join(VEC, "k8s_policy.yaml"))
    res, _ = _decide(
        p,
        [
            ("fd00:10::20", "fd00:10::99", 6, 32000),  # fe: fd00:10::/64 block
            ("fd00:10::20", "fd00:11::1", 6, 32000),
        ],
        8001,
    )
    assert [r[1] for r in res] == ["policy", "egress_denied"]
    # a later fragment has no ports: port rules cannot match it
    keys = _keys([("172.17.1.20", "172.17.0.10", 6, 6379)] * 2, 8001)
    keys.u8[B.FLAGS, 1] = B.F_FRAG
    keys.u16[B.DPORT, 1] = 0
    c = compile_policy(p)
    v, _, why = c.decide(keys)
    assert list(why) == [V.R_POLICY, V.R_INGRESS_DENIED]


def test_anti_spoofing():
    p = _example()
    web1, bastion = 0x020000000101, 0x020000000104
    flows = [("192.168.1.10", "192.168.1.5", 6, 22)] * 3 + [("192.168.1.99", "192.168.1.10", 6, 80)] * 2
    res, _ = _decide(p, flows, 5001, eth_src=[web1, bastion, 0x0A0000000001, bastion, 0x0A0000000001])
    assert [r[1] for r in res] == [
        "egress_denied",  # web-1's own MAC: policy decides (web egress: db only)
        "spoofed_source",  # web-1's address from bastion's MAC
        "spoofed_source",  # web-1's address from an unknown MAC
        "spoofed_source",  # bastion's MAC with an address that is not bastion's
        "policy",
    ]  # unknown MAC and address (routed in from outside)
    text = open(os.path.join(VEC, "example.yaml")).read() + "anti_spoofing: false\n"
    res, _ = _decide(parse_policy(text, "p.yaml", VEC), flows[1:2], 5001, eth_src=[bastion])
    assert res == [("drop", "egress_denied")]


def test_non_ip_and_arp():
    p = _example()
    keys = _keys([("192.168.1.5", "192.168.1.10", 6, 22)] * 3, 5001)
    keys.u8[B.IP_VER, :] = 0
    keys.u8[B.FLAGS, 0] = B.F_ARP
    keys.u8[B.FLAGS, 1] = 0
    keys.u8[B.ERROR, 2] = 3
    v, r, why = compile_policy(p).decide(keys)
    assert list(why) == [V.R_ARP, V.R_NON_IP, V.R_PARSE_ERROR]
    assert list(v) == [V.ALLOW, V.DROP, V.DROP] and list(r) == [-1, -1, -1]


def test_untagged_tenant():
    text = open(os.path.join(VEC, "example.yaml")).read() + "untagged_tenant: globex\n"
    res, _ = _decide(parse_policy(text, "p.yaml", VEC), [("8.8.8.8", "192.168.1.10", 17, 53)], -1)
    assert res == [("allow", "policy")]
