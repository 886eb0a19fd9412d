"""Ground truth of the generator and the built-in data centre.

The expectations here are read by hand off ``microseg/data/datacenter.yaml`` and
``k8s-policy.yaml`` (not computed by any microseg code), then the generated truth is checked
against them, against the construction rules, and finally against the datapath's own policy
reference and conntrack (which must agree with a truth that never ran them).
"""

import ipaddress

import numpy as np
import pytest

from microseg import ctstate
from microseg.errors import InputError
from microseg.io import generator as G
from microseg.io.scenario import Flow5, Intent, address_of

TCP, UDP = 6, 17


@pytest.fixture(scope="module")
def policy():
    return G.load_policy()


@pytest.fixture(scope="module")
def gen(policy):
    return G.generate(policy, {"flows": 300, "seed": 17, "ipv6_share": 0.2})


def _w(policy, tenant, name):
    return next(w for w in policy.workloads if w.tenant == tenant and w.name == name)


def test_builtin_datacenter(policy):
    assert [t.name for t in policy.tenants] == ["acme", "globex", "shop"]
    assert len({t.vni for t in policy.tenants}) == 3
    assert len(policy.hosts) == 4
    assert 18 <= len(policy.workloads) <= 24
    assert {w.host for w in policy.workloads} == {h.name for h in policy.hosts}
    acme = {a for w in policy.workloads if w.tenant == "acme" for a in w.addresses}
    globex = {a for w in policy.workloads if w.tenant == "globex" for a in w.addresses}
    assert len(acme & globex) >= 4  # overlapping private ranges
    assert globex - acme  # and addresses only globex has
    names = {sg.name for sg in policy.security_groups}
    assert {"web", "app", "db", "bastion"} <= names
    assert {p.namespace for p in policy.network_policies} == {"shop"}
    assert any(not p.pod_selector.labels for p in policy.network_policies)  # default deny


# (tenant, src, dst, proto, port, allowed) read off the YAML files by hand
HAND_READ = [
    ("acme", "lb-1", "web-1", TCP, 443, True),
    ("acme", "lb-1", "web-2", TCP, 80, True),
    ("acme", "web-1", "app-1", TCP, 443, True),
    ("acme", "app-2", "db-1", TCP, 5432, True),
    ("acme", "web-1", "db-1", TCP, 5432, False),  # web's egress has no db rule
    ("acme", "app-1", "db-1", TCP, 22, False),  # app's egress: only 5432 and dns
    ("acme", "bastion", "db-2", TCP, 22, True),
    ("acme", "db-1", "web-1", TCP, 80, False),  # db may only ask dns
    ("acme", "db-1", "dns", UDP, 53, True),
    ("acme", "lb-1", "app-1", TCP, 443, False),  # lb may only reach web
    ("acme", "web-2", "app-1", TCP, 8080, False),
    ("globex", "web-1", "app-1", TCP, 9000, True),
    ("globex", "app-1", "db-1", TCP, 3306, True),
    ("globex", "web-2", "db-1", TCP, 3306, False),
    ("globex", "bastion", "web-2", TCP, 443, True),
    ("shop", "frontend-1", "backend-1", TCP, 8080, True),
    ("shop", "backend-1", "frontend-2", TCP, 8080, False),  # frontend admits 443 only
    ("shop", "backend-2", "frontend-1", TCP, 443, True),
    ("shop", "backend-1", "redis-1", TCP, 6379, True),
    ("shop", "frontend-2", "redis-1", TCP, 6379, False),
    ("shop", "redis-1", "coredns", UDP, 53, True),
    ("shop", "frontend-1", "backend-2", TCP, 9000, False),
]


@pytest.mark.parametrize("tenant,src,dst,proto,port,allowed", HAND_READ)
def test_intent_matches_the_hand_read_policy(policy, tenant, src, dst, proto, port, allowed):
    s, d = _w(policy, tenant, src), _w(policy, tenant, dst)
    dec = Intent(policy).decide(s, address_of(s, 4), d, address_of(d, 4), Flow5(4, proto, port))
    assert dec.allow == allowed, dec.reason
    if allowed and tenant == "shop":
        assert dec.reason.startswith("allowed by networkpolicy shop/")
    elif allowed:
        assert dec.reason.startswith("allowed by sg ")


def test_intent_reason_names_the_rule(policy):
    s, d = _w(policy, "acme", "lb-1"), _w(policy, "acme", "web-3")
    dec = Intent(policy).decide(s, address_of(s, 4), d, address_of(d, 4), Flow5(4, TCP, 80))
    assert dec.reason == "allowed by sg web ingress tcp/80"
    s = _w(policy, "acme", "web-1")
    dec = Intent(policy).decide(s, address_of(s, 4), d, address_of(d, 4), Flow5(4, TCP, 80))
    assert (dec.allow, dec.reason, dec.cause) == (False, "default deny (egress)", "egress_denied")


def test_truth_covers_every_packet(gen):
    t = gen.truth
    n = len(gen.batch)
    assert len(t) == n and n > 3000
    for k in G.GroundTruth.FIELDS:
        assert getattr(t, k).shape == (n,)
    assert set(np.unique(t.verdict)) <= {G.ALLOW, G.DROP, G.REJECT}
    assert t.reason.max() < len(t.reasons) and t.label.max() < len(t.labels)
    assert t.cause.max() < len(t.causes)
    assert all(t.reasons) and all(t.labels)
    assert set(np.unique(t.flow)) == set(range(len(gen.flows)))
    counts = np.bincount(t.flow, minlength=len(gen.flows))
    assert [f["packets"] for f in gen.flows] == counts.tolist()
    labels = set(t.summary()["by_label"])
    assert {"tcp", "tls", "dns", "icmp", "port scan", "cross-tenant", "invalid tcp", "syn flood"} <= labels


def test_truth_follows_the_construction_rules(gen, policy):
    t = gen.truth
    lab = {name: i for i, name in enumerate(t.labels)}
    own = {(w.tenant, a) for w in policy.workloads for a in w.addresses}
    vni_tenant = {tn.vni: tn.name for tn in policy.tenants}
    for fl in gen.flows:
        idx = np.flatnonzero(t.flow == fl["flow"])
        v, ct = t.verdict[idx], t.ct[idx]
        state = ct & ctstate.STATE_MASK
        tenant = vni_tenant[fl["vni"]]
        src_own = (tenant, ipaddress.ip_address(fl["src_addr"])) in own
        dst_own = (tenant, ipaddress.ip_address(fl["dst_addr"])) in own
        if fl["label"] == "cross-tenant":
            assert len(idx) == 1 and v[0] != G.ALLOW
            assert not (src_own and dst_own)  # one end is not in the tenant
            if not src_own:
                assert ct[0] == 0 and t.causes[t.cause[idx[0]]] == "spoofed_source"
            continue
        assert src_own and dst_own
        if fl["label"] == "invalid tcp":
            assert len(idx) == 1 and v[0] == G.DROP and state[0] == ctstate.INVALID
            continue
        if fl["verdict"] != "allow":
            assert np.all(v != G.ALLOW) and np.all(state == ctstate.NEW)
            assert fl["reason"].startswith("default deny")
            continue
        assert state[0] == ctstate.NEW and v[0] == G.ALLOW
        ok = v == G.ALLOW
        if "icmp_error" in fl:  # query, then port unreachable
            assert state.tolist() == [ctstate.NEW, ctstate.RELATED]
            continue
        assert np.all(state[ok][1:] == ctstate.ESTABLISHED)
        assert np.all(state[~ok] == ctstate.INVALID)  # out-of-window segments
        reply = t.dir[idx] == 1
        assert np.all((ct[reply] & ctstate.REPLY) > 0) and np.all((ct[~reply] & ctstate.REPLY) == 0)
    assert np.all(t.label[t.cause == t.causes.index("ct_invalid")] == lab["invalid tcp"])


def test_port_scan_probes_every_port_once(gen):
    scans = [f for f in gen.flows if f["label"] == "port scan"]
    assert scans
    by_pair = {}
    for f in scans:
        by_pair.setdefault((f["tenant"], f["src"], f["dst"]), []).append(f["dport"])
    for ports in by_pair.values():
        assert len(ports) == len(set(ports))
    for f in scans:
        want = 3 if f["verdict"] == "allow" else 1  # SYN [, SYN/ACK, RST]
        assert f["packets"] == want


def test_syn_flood_uses_fresh_source_ports(gen):
    fl = [f for f in gen.flows if f["label"] == "syn flood"]
    keys = [(f["tenant"], f["src_addr"], f["dst_addr"], f["dport"], f["sport"]) for f in fl]
    assert len(keys) == len(set(keys)) and all(f["packets"] == 1 for f in fl)
    all_keys = [
        (f["tenant"], f["src_addr"], f["dst_addr"], f["proto"], f["dport"], f["sport"])
        for f in gen.flows
        if f["proto"] in (TCP, UDP)
    ]
    assert len(all_keys) == len(set(all_keys))  # no tuple is reused by two flows


def test_reject_policy_rejects(tmp_path):
    src = open(G.builtin_policy_path(), encoding="utf-8").read()
    (tmp_path / "k8s-policy.yaml").write_text(
        open(G.builtin_policy_path().replace("datacenter.yaml", "k8s-policy.yaml")).read()
    )
    path = tmp_path / "dc.yaml"
    path.write_text(src.replace("deny_action: drop", "deny_action: reject"))
    g = G.generate(str(path), {"flows": 100, "seed": 2, "denied_share": 0.5})
    t = g.truth
    denied = np.isin(t.cause, [t.causes.index("egress_denied"), t.causes.index("ingress_denied")])
    assert denied.any() and np.all(t.verdict[denied] == G.REJECT)
    assert np.all(t.verdict[t.ct == ctstate.INVALID] == G.DROP)


def test_tenant_subset(policy):
    g = G.generate(policy, {"flows": 40, "seed": 1, "tenants": ["shop"], "spoof_share": 0.05})
    assert {f["tenant"] for f in g.flows} == {"shop"}
    assert set(np.unique(g.truth.tenant)) == {5003}


def test_truth_agrees_with_the_datapath_reference(gen, policy):
    """The policy's per-packet reference and the conntrack table, given the packets, reach the
    verdicts and states the scenario says -- though the truth never ran either."""
    import importlib.util

    from microseg.conntrack import ConntrackTable
    from microseg.packet.parse import parse
    from microseg.policy.reference import Reference
    from microseg.policy.verdict import reason_name

    checksum = importlib.util.find_spec("microseg.packet.checksum") is not None
    keys = parse(gen.batch)
    t = gen.truth
    states = ConntrackTable(capacity=1 << 16, checksum=checksum).process(gen.batch, keys)
    tracked = t.ct != 0
    assert np.array_equal(states[tracked] & (ctstate.STATE_MASK | ctstate.REPLY), t.ct[tracked])
    decisions = Reference(policy).decide(keys, t.ct)
    assert [d.verdict for d in decisions] == t.verdict.tolist()
    assert [reason_name(d.reason) for d in decisions] == [t.causes[c] for c in t.cause]


ONE_TENANT = """
tenants: [{name: solo, vni: 42}]
hosts:
  - {name: h1, address: 192.168.1.1}
  - {name: h2, address: 192.168.1.2}
security_groups:
  - name: web
    tenant: solo
    rules:
      - {direction: ingress, protocol: tcp, port_range_min: 80, port_range_max: 80}
      - {direction: egress, protocol: tcp, port_range_min: 80, port_range_max: 80}
workloads:
  - {name: a, tenant: solo, host: h1, mac: "02:00:00:00:00:0a", ipv4: 10.1.0.1, security_groups: [web]}
  - {name: b, tenant: solo, host: h2, mac: "02:00:00:00:00:0b", ipv4: 10.1.0.2, security_groups: [web]}
"""


def test_a_custom_single_tenant_policy(tmp_path):
    path = tmp_path / "solo.yaml"
    path.write_text(ONE_TENANT)
    with pytest.raises(InputError, match="another tenant"):
        G.generate(str(path), {"flows": 20, "spoof_share": 0.05})
    g = G.generate(str(path), {"flows": 30, "seed": 4, "spoof_share": 0.0})
    t = g.truth
    assert set(np.unique(t.tenant)) == {42}
    allowed = [f for f in g.flows if f["verdict"] == "allow" and f["label"] not in ("port scan",)]
    assert allowed and all(f["proto"] == TCP and f["dport"] == 80 for f in allowed)
    assert {f["reason"] for f in allowed} == {"allowed by sg web ingress tcp/80"}


def test_workloads_without_mac_or_on_one_host(tmp_path):
    path = tmp_path / "nomac.yaml"
    path.write_text(ONE_TENANT.replace('mac: "02:00:00:00:00:0a", ', ""))
    g = G.generate(str(path), {"flows": 20, "seed": 1, "spoof_share": 0.0})
    from microseg.packet.parse import parse

    keys = parse(g.batch)
    macs = {int(m) for m in keys.eth_src} | {int(m) for m in keys.eth_dst}
    assert 0x02000000000B in macs and len(macs) == 2  # b's own and a generated one
    path.write_text(ONE_TENANT.replace("host: h2", "host: h1"))
    with pytest.raises(InputError, match="different hosts"):
        G.generate(str(path), {"flows": 5, "spoof_share": 0.0})
