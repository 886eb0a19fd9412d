"""Importers: OpenStack security-group rule listings (several client formats) and Kubernetes
NetworkPolicy documents."""

import json
import os
import re

import pytest

from microseg.policy import openstack
from microseg.policy.model import load_policy, parse_policy
from microseg.policy.source import PolicyError, Reporter

VEC = os.path.join(os.path.dirname(__file__), "vectors", "policy")
OS = os.path.join(VEC, "openstack")
WEB_ID = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
DEFAULT_ID = "5f1d2c3b-4a59-4e6f-9071-8293a4b5c6d7"


def _norm(triples):
    return [
        (
            r.direction,
            r.ethertype,
            r.protocol,
            r.port_min,
            r.port_max,
            None if r.remote_prefix is None else str(r.remote_prefix),
            g,
            owner,
        )
        for r, owner, g in triples
    ]


def _load(name):
    rep = Reporter()
    out = openstack.load_rules(os.path.join(OS, name), rep)
    assert rep.errors == []
    return out


def test_client_formats_agree():
    """Recent client, old client with --long, 'Remote IP Prefix' spelling and the Neutron API."""
    full = [t for t in _norm(_load("rule_list_all.json")) if t[-1] == WEB_ID]
    want = [t[:-1] for t in full]
    for name in (
        "rule_list_web_long_old.json",
        "rule_list_web_remote_ip_prefix.json",
        "neutron_api_web.json",
    ):
        got = [t[:-1] for t in _norm(_load(name))]
        assert got == want, name
    assert want == [
        ("ingress", 4, 6, 80, 80, None, None),  # 0.0.0.0/0 means any IPv4
        ("ingress", 6, 6, 443, 443, None, None),
        ("ingress", 4, 1, 8, None, "10.0.0.0/8", None),  # ICMP echo request, any code
        ("ingress", 4, 17, 5000, 5010, "192.168.0.0/16", None),
        ("ingress", 6, 58, 128, None, None, None),
    ]


def test_full_listing_is_split_by_group():
    p = load_policy(os.path.join(VEC, "openstack_policy.yaml"))
    default, web = p.group("demo", "default"), p.group("demo", "web")
    assert len(default.rules) == 4 and len(web.rules) == 5
    # "Remote Security Group" holds the group's ID; it resolves to the group's name
    assert [r.remote_group for r in default.rules if r.direction == "ingress"] == ["default", "default"]
    assert [r.direction for r in default.rules] == ["egress", "egress", "ingress", "ingress"]
    # workloads may name a group by ID
    assert p.workloads[0].security_groups == ("default", "web")
    assert all(
        r.origin.startswith(os.path.join(VEC, "openstack", "rule_list_all.json") + ":") for r in web.rules
    )


def test_icmp_port_range_forms():
    rows = [
        {"Direction": "ingress", "Ethertype": "IPv4", "IP Protocol": "icmp", "Port Range": ""},
        {"Direction": "ingress", "Ethertype": "IPv4", "IP Protocol": "icmp", "Port Range": "type=3:code=1"},
        {"Direction": "ingress", "Ethertype": "IPv6", "IP Protocol": "icmp", "Port Range": "type=135"},
        {"Direction": "egress", "Ethertype": "IPv4", "IP Protocol": "1", "Port Range": "type=0"},
    ]
    got = [(r.protocol, r.port_min, r.port_max) for r, _, _ in _rows(rows)]
    # "icmp" in an IPv6 rule is ICMPv6, as Neutron treats it
    assert got == [(1, None, None), (1, 3, 1), (58, 135, None), (1, 0, None)]


def _rows(rows, tmp=None):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(rows, f, indent=2)
    rep = Reporter()
    try:
        out = openstack.load_rules(f.name, rep)
    finally:
        os.unlink(f.name)
    if rep.errors:
        raise PolicyError(rep.errors)
    return out


@pytest.mark.parametrize(
    "row,needle",
    [
        (
            {"Direction": "ingress", "Ethertype": "IPv4", "IP Protocol": "tcp", "Port Range": "80"},
            "is not a port range",
        ),
        (
            {"Direction": "ingress", "Ethertype": "IPv4", "IP Protocol": "tcp", "Port Range": "type=8"},
            "is not a port range",
        ),
        (
            {"Direction": "ingress", "Ethertype": "IPv4", "IP Protocol": "icmp", "Port Range": ":code=0"},
            "is not a port range",
        ),
        ({"Direction": "sideways", "Ethertype": "IPv4"}, "is not ingress or egress"),
        ({"Direction": "ingress", "Ethertype": "IPv5"}, "is not IPv4 or IPv6"),
        ({"Direction": "ingress", "IP Protocol": "tcp"}, "no IP range to infer it from"),
        ({"Direction": "ingress", "Ethertype": "IPv4", "IP Protocol": "carrier-pigeon"}, "not a protocol"),
        (
            {"Direction": "ingress", "Ethertype": "IPv4", "IP Range": "::/0"},
            "is IPv6 but the rule's ethertype is IPv4",
        ),
        (
            {"Direction": "ingress", "Ethertype": "IPv4", "Remote Address Group": "aa-bb"},
            "remote address groups are not supported",
        ),
        ({"Direction": "ingress", "Ethertype": "IPv4", "Colour": "red"}, "unknown column"),
        (
            {"direction": "ingress", "ethertype": "IPv4", "protocol": "tcp", "port_range_min": "x"},
            "is not a port number",
        ),
        (
            {"Direction": "ingress", "Ethertype": "IPv4", "IP Protocol": "tcp", "Port Range": "90:80"},
            "is above",
        ),
    ],
)
def test_bad_rows_are_reported_with_line(row, needle):
    with pytest.raises(PolicyError) as ei:
        _rows([{"ID": "r1", **row}])
    assert needle in str(ei.value)
    assert re.search(r"\.json:\d+: \[0\] \(rule r1\)", str(ei.value))


def test_ethertype_inferred_from_ip_range():
    ((r, _, _),) = _rows(
        [{"Direction": "ingress", "IP Protocol": "tcp", "IP Range": "fd00::/8", "Port Range": "22:22"}]
    )
    assert r.ethertype == 6 and str(r.remote_prefix) == "fd00::/8"


def test_not_a_list(tmp_path):
    f = tmp_path / "x.json"
    f.write_text('{"ID": 1}')
    rep = Reporter()
    assert openstack.load_rules(str(f), rep) == []
    assert "not a security group or rule listing: expected a list of rules" in rep.errors[0]


def test_tab_indented_json_still_loads(tmp_path):
    f = tmp_path / "x.json"
    f.write_text(
        '[\n\t{"Direction": "ingress", "Ethertype": "IPv4", "IP Protocol": "tcp",\n'
        '\t "Port Range": "22:22", "IP Range": null}\n]\n'
    )
    rep = Reporter()
    ((r, _, _),) = openstack.load_rules(str(f), rep)
    assert rep.errors == [] and r.port_min == 22


# ---- Kubernetes -----------------------------------------------------------------------------
def test_k8s_documents():
    p = load_policy(os.path.join(VEC, "k8s_policy.yaml"))
    nps = {n.name: n for n in p.network_policies}
    assert set(nps) == {"default-deny-ingress", "backend-policy", "multi-port-egress", "allow-all-egress"}
    dd = nps["default-deny-ingress"]
    assert dd.ingress_type and not dd.egress_type and dd.ingress == ()
    be = nps["backend-policy"]
    (rule,) = be.ingress
    assert [str(x.block) for x in rule.peers if x.block] == ["172.17.0.0/16"]
    assert [str(e) for e in rule.peers[0].excepts] == ["172.17.1.0/24"]
    assert rule.ports[0].protocol == 6 and (rule.ports[0].lo, rule.ports[0].hi) == (6379, 6379)
    mp = nps["multi-port-egress"]
    assert not mp.ingress_type and mp.egress_type
    assert (mp.egress[0].ports[0].lo, mp.egress[0].ports[0].hi) == (32000, 32768)
    assert mp.egress[1].ports is None
    ae = nps["allow-all-egress"]
    assert ae.egress[0].peers is None and ae.egress[0].ports is None


def test_k8s_selector_semantics():
    from microseg.policy.k8s import Selector

    s = Selector((("app", "web"),), (("tier", "NotIn", ("db",)), ("env", "Exists", ())))
    assert s.matches({"app": "web", "env": "x"})
    assert s.matches({"app": "web", "env": "x", "tier": "fe"})
    assert not s.matches({"app": "web", "env": "x", "tier": "db"})
    assert not s.matches({"app": "web"})
    assert Selector().matches({}) and Selector().matches({"a": "b"})
    assert Selector((), (("x", "DoesNotExist", ()),)).matches({"y": "1"})
    assert not Selector((), (("x", "In", ("1",)),)).matches({})


def test_k8s_empty_policy_types_default():
    text = (
        "tenants: [{name: t, vni: 1}]\nnetwork_policies:\n"
        "  - {apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {name: n, namespace: t},\n"
        "     spec: {podSelector: {}, policyTypes: [], egress: [{}]}}\n"
    )
    (n,) = parse_policy(text).network_policies
    assert n.ingress_type and n.egress_type


def test_k8s_list_kind_and_default_namespace(tmp_path):
    (tmp_path / "np.yaml").write_text("""
apiVersion: v1
kind: List
items:
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: a}
  spec: {podSelector: {}, egress: [{}]}
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: b, namespace: t2}
  spec: {podSelector: {}}
""")
    (tmp_path / "p.yaml").write_text(
        "tenants: [{name: t1, vni: 1}, {name: t2, vni: 2}]\n"
        "network_policies: [{file: np.yaml, namespace: t1}]\n"
    )
    p = load_policy(str(tmp_path / "p.yaml"))
    assert [(n.namespace, n.name, n.ingress_type, n.egress_type) for n in p.network_policies] == [
        ("t1", "a", True, True),
        ("t2", "b", True, False),
    ]


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("{podSelector: {}, policyTypes: [Sideways]}", "policyTypes"),
        (
            "{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]}",
            "cannot be combined",
        ),
        ("{podSelector: {}, ingress: [{from: [{}]}]}", "needs podSelector, namespaceSelector or ipBlock"),
        ("{podSelector: {}, ingress: [{ports: [{protocol: ICMP}]}]}", "is not TCP, UDP or SCTP"),
        ("{podSelector: {}, ingress: [{ports: [{port: '80'}]}]}", "is a string: a port name needs a letter"),
        ("{podSelector: {}, ingress: [{ports: [{endPort: 90}]}]}", "endPort needs port"),
        ("{podSelector: {}, ingress: [{ports: [{port: 0}]}]}", "out of range"),
        ("{podSelector: {matchExpressions: [{key: a, operator: In}]}}", "needs values"),
        ("{podSelector: {matchExpressions: [{key: a, operator: Exists, values: [x]}]}}", "takes no values"),
        ("{podSelector: {matchLabels: {'a b': c}}}", "is not a valid label"),
        ("{podSelector: {}, egress: [{to: [{ipBlock: {cidr: nope}}]}]}", "is not a CIDR"),
        ("{podSelector: {}, egress: [{too: []}]}", "unknown field"),
    ],
)
def test_k8s_invalid(spec, needle):
    text = (
        "tenants: [{name: t, vni: 1}]\nnetwork_policies:\n"
        "  - {apiVersion: networking.k8s.io/v1, kind: NetworkPolicy,\n"
        f"     metadata: {{name: n, namespace: t}}, spec: {spec}}}\n"
    )
    with pytest.raises(PolicyError) as ei:
        parse_policy(text, "p.yaml")
    assert needle in str(ei.value) and str(ei.value).startswith("p.yaml:")


def test_k8s_wrong_kind_and_missing_file(tmp_path):
    (tmp_path / "d.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: s}\n")
    (tmp_path / "p.yaml").write_text(
        "tenants: [{name: t, vni: 1}]\nnetwork_policies: [{file: d.yaml, namespace: t}, {file: gone.yaml}]\n"
    )
    with pytest.raises(PolicyError) as ei:
        load_policy(str(tmp_path / "p.yaml"))
    errs = ei.value.errors
    assert any("d.yaml:2: kind: 'Service' is not NetworkPolicy" in e for e in errs)
    assert any("p.yaml:2: network_policies[1].file:" in e and "cannot read" in e for e in errs)
