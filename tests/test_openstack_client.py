"""OpenStack security groups as the client and the Neutron API print them (the files in
tests/vectors/policy/openstack, see its README): every shape imports to the same rules, and
the stock `default` group, compiled, decides packets as Neutron would (the compiled policy
and the per-packet reference agree)."""

import json
import os
import re

import numpy as np
import pytest

from microseg import ctstate
from microseg.cli import main
from microseg.packet.batch import text_to_addr
from microseg.policy import openstack
from microseg.policy import verdict as V
from microseg.policy.compiler import compile_policy, connection_keys
from microseg.policy.model import load_policy
from microseg.policy.reference import Reference
from microseg.policy.source import PolicyError, Reporter

OS = os.path.join(os.path.dirname(__file__), "vectors", "policy", "openstack")
DEFAULT_ID = "85cc3048-abc3-43cc-89b3-377341426ac5"  # the api-ref's "default" group
CLIENT_LIST = "client-rule-list-default.json"
CLIENT_SHOW = "client-group-show-default.json"
# every file that describes the api-ref's default group, in some shape
DEFAULT_FILES = [
    CLIENT_LIST,
    CLIENT_SHOW,
    "neutron-api-ref-security-group-show-response.json",
    "neutron-api-ref-security-groups-list-response.json",
    "neutron-api-ref-security-group-rules-list-response.json",
]
# (direction, ethertype, protocol, port_min, port_max, prefix, remote group), sorted
DEFAULT_RULES = [
    ("egress", 4, None, None, None, None, None),
    ("egress", 6, None, None, None, None, None),
    ("ingress", 4, None, None, None, None, DEFAULT_ID),
    ("ingress", 6, None, None, None, None, DEFAULT_ID),
]


def _load(name):
    rep = Reporter()
    out = openstack.load_rules(os.path.join(OS, name), rep)
    assert rep.errors == [], rep.errors
    return out


def _norm(triples):
    return sorted(
        (
            r.direction,
            r.ethertype,
            r.protocol,
            r.port_min,
            r.port_max,
            None if r.remote_prefix is None else str(r.remote_prefix),
            g,
        )
        for r, _, g in triples
    )


def _errors(tmp_path, doc):
    f = tmp_path / "x.json"
    f.write_text(json.dumps(doc, indent=2))
    rep = Reporter()
    out = openstack.load_rules(str(f), rep)
    return out, rep.errors


@pytest.mark.parametrize("name", DEFAULT_FILES)
def test_every_shape_of_the_default_group_gives_its_four_rules(name):
    assert _norm(_load(name)) == DEFAULT_RULES


def test_client_listing_prints_the_placeholder_beside_the_remote_group():
    """The file really is in the client's current layout: IP Range is never empty, so the
    ingress rows carry both a remote group and 0.0.0.0/0 or ::/0."""
    rows = json.load(open(os.path.join(OS, CLIENT_LIST)))
    ingress = [r for r in rows if r["Direction"] == "ingress"]
    assert {(r["Ethertype"], r["IP Range"], r["Remote Security Group"]) for r in ingress} == {
        ("IPv4", "0.0.0.0/0", DEFAULT_ID),
        ("IPv6", "::/0", DEFAULT_ID),
    }
    # and the imported ingress rules have no prefix: only the group's members match
    for rule, _, group in _load(CLIENT_LIST):
        if rule.direction == "ingress":
            assert rule.remote_prefix is None and group == DEFAULT_ID


def test_rule_show_with_the_placeholder():
    ((rule, owner, group),) = _load("client-rule-show-default-ingress-ipv4.json")
    assert (rule.direction, rule.ethertype, rule.remote_prefix, group) == ("ingress", 4, None, DEFAULT_ID)
    assert owner == DEFAULT_ID
    ((rule, owner, group),) = _load("neutron-api-ref-security-group-rule-show-response.json")
    assert (rule.direction, rule.ethertype, rule.remote_prefix, group) == ("egress", 6, None, None)


@pytest.mark.parametrize(
    "prefix,eth", [("10.0.0.0/8", "IPv4"), ("::/0", "IPv4"), ("0.0.0.0/0", "IPv6"), ("0.0.0.0/1", "IPv4")]
)
def test_a_real_prefix_beside_a_group_stays_an_error(tmp_path, prefix, eth):
    rows = [
        {
            "ID": "r1",
            "IP Protocol": None,
            "Ethertype": eth,
            "IP Range": prefix,
            "Port Range": "",
            "Direction": "ingress",
            "Remote Security Group": DEFAULT_ID,
            "Remote Address Group": None,
        }
    ]
    out, errs = _errors(tmp_path, rows)
    assert out == [] and len(errs) == 1
    assert re.search(r"x\.json:6: \[0\] \(rule r1\)\.IP Range: .*not both", errs[0]), errs[0]


def test_placeholder_without_a_group_is_any_address(tmp_path):
    rows = [
        {
            "Direction": "ingress",
            "Ethertype": "IPv4",
            "IP Protocol": "tcp",
            "IP Range": "0.0.0.0/0",
            "Port Range": "22:22",
        }
    ]
    ((rule, _, group),) = openstack.load_rules(_write(tmp_path, rows), Reporter())
    assert rule.remote_prefix is None and group is None and rule.port_min == 22


def _write(tmp_path, doc, name="x.json"):
    f = tmp_path / name
    f.write_text(json.dumps(doc, indent=2))
    return str(f)


def test_groups_list_splits_rules_by_group(tmp_path):
    doc = json.load(open(os.path.join(OS, "neutron-api-ref-security-groups-list-response.json")))
    web = {
        "id": "b0b0b0b0-0000-4000-8000-000000000001",
        "name": "web",
        "security_group_rules": [
            {
                "direction": "ingress",
                "ethertype": "IPv4",
                "protocol": "tcp",
                "port_range_min": 80,
                "port_range_max": 80,
                "remote_ip_prefix": "0.0.0.0/0",
                "remote_group_id": None,
                "security_group_id": "b0b0b0b0-0000-4000-8000-000000000001",
            }
        ],
    }
    doc["security_groups"].append(web)
    triples = openstack.load_rules(_write(tmp_path, doc), Reporter())
    owners = [o for _, o, _ in triples]
    assert owners == [DEFAULT_ID] * 4 + [web["id"]]
    (tmp_path / "p.yaml").write_text(
        "tenants: [{name: t, vni: 1}]\nsecurity_groups:\n"
        f"  - {{name: default, id: {DEFAULT_ID}, tenant: t, rules_file: x.json}}\n"
        f"  - {{name: web, id: {web['id']}, tenant: t, rules_file: x.json}}\n"
    )
    p = load_policy(str(tmp_path / "p.yaml"))
    assert len(p.group("t", "default").rules) == 4
    (r,) = p.group("t", "web").rules
    assert (r.protocol, r.port_min) == (6, 80)
    assert [r.remote_group for r in p.group("t", "default").rules if r.direction == "ingress"] == [
        "default",
        "default",
    ]


def test_api_ref_bulk_create_rules_name_their_remote_group(tmp_path):
    """Both rules belong to a7734e61-... and admit TCP 80/443 from members of 85cc3048-...."""
    path = os.path.join(OS, "neutron-api-ref-security-group-rule-bulk-create-response.json")
    (tmp_path / "p.yaml").write_text(
        "tenants: [{name: t, vni: 1}]\nsecurity_groups:\n"
        f"  - {{name: default, id: {DEFAULT_ID}, tenant: t}}\n"
        f"  - {{name: web, id: a7734e61-b545-452d-a3cd-0189cbd9747a, tenant: t, rules_file: {path}}}\n"
    )
    p = load_policy(str(tmp_path / "p.yaml"))
    assert [
        (r.direction, r.protocol, r.port_min, r.port_max, r.remote_group) for r in p.group("t", "web").rules
    ] == [("ingress", 6, 80, 80, "default"), ("ingress", 6, 443, 443, "default")]


def test_api_ref_rule_with_an_address_group_is_refused():
    rep = Reporter()
    path = os.path.join(OS, "neutron-api-ref-security-group-rule-create-response.json")
    assert openstack.load_rules(path, rep) == []
    (err,) = rep.errors
    assert err.startswith(
        f"{path}:10: security_group_rule (rule 2bc0accf-312e-429a-956e-e4407625eb62)"
        ".remote_address_group_id: remote address groups are not supported"
    )


def test_api_ref_create_response_has_a_misspelt_key_which_is_reported():
    """The api-ref's sample carries a damaged key ("revisio[n_number"): unknown keys are errors,
    so the file is refused at that line, not silently read."""
    rep = Reporter()
    path = os.path.join(OS, "neutron-api-ref-security-group-create-response.json")
    openstack.load_rules(path, rep)
    (err,) = rep.errors
    assert re.match(
        re.escape(path) + r":21: security_group\.security_group_rules\[0\] \(rule "
        r"38ce2d8e-e8f1-48bd-83c2-d33cb9f50c3d\)\.revisio\[n_number: unknown column",
        err,
    )


def test_api_ref_update_response_is_a_group_without_rules():
    assert _load("neutron-api-ref-security-group-update-response.json") == []


@pytest.mark.parametrize(
    "doc,needle",
    [
        ({"ID": 1}, "not a security group or rule listing"),
        (
            {"security_group_rule": {"direction": "ingress"}, "extra": 1},
            "not a security group or rule listing",
        ),
        ("text", "not a security group or rule listing"),
        ({"security_groups": {"id": "x"}}, "security_groups: must be a list"),
        (
            {"security_group": {"id": "g", "rules": "direction='egress', ethertype='IPv4'"}},
            "is text, as clients before python-openstackclient 4.0.0",
        ),
        (
            {"security_group": {"id": "g", "name": "n", "colour": "red", "rules": []}},
            "unknown field of a security group",
        ),
        ({"security_group": {"id": "g", "name": "n"}}, "has no rules"),
        (
            {
                "security_group": {
                    "id": "g",
                    "security_group_rules": [
                        {"direction": "egress", "ethertype": "IPv4", "security_group_id": "other"}
                    ],
                }
            },
            "'other' is not the group the rule is listed in ('g')",
        ),
    ],
)
def test_bad_shapes_are_reported(tmp_path, doc, needle):
    out, errs = _errors(tmp_path, doc)
    assert out == [] and len(errs) == 1 and needle in errs[0], errs
    assert errs[0].startswith(str(tmp_path / "x.json") + ":")


def test_unknown_shape_lists_the_accepted_ones(tmp_path):
    _, (err,) = _errors(tmp_path, {"port": {}})
    for shape in (
        "rule list -f json",
        "rule show -f json",
        "security group show -f json",
        '{"security_group_rules": [...]}',
        '{"security_group_rule": {...}}',
        '{"security_group": {...}}',
        '{"security_groups": [...]}',
    ):
        assert shape in err


def test_unresolved_remote_group_names_the_file_and_line(tmp_path):
    path = os.path.join(OS, CLIENT_LIST)
    (tmp_path / "p.yaml").write_text(
        "tenants: [{name: t, vni: 1}]\n"
        f"security_groups: [{{name: default, tenant: t, rules_file: {path}}}]\n"
    )
    with pytest.raises(PolicyError) as ei:
        load_policy(str(tmp_path / "p.yaml"))
    assert f"{path}:22: Remote Security Group: no security group '{DEFAULT_ID}'" in str(ei.value)


# ---- the default group, compiled, deciding packets ----------------------------------------------
POLICY = """\
tenants: [{{name: proj, vni: 4100}}]
security_groups:
  - {{name: default, id: {gid}, tenant: proj, rules_file: {path}}}
  - {{name: other, tenant: proj, rules: [{{direction: egress}}, {{direction: egress, ethertype: IPv6}}]}}
workloads:
  - {{name: vm-a, tenant: proj, ipv4: 10.0.0.5, ipv6: "fd00::5", security_groups: [default]}}
  - {{name: vm-b, tenant: proj, ipv4: 10.0.0.6, ipv6: "fd00::6", security_groups: [default]}}
  - {{name: vm-c, tenant: proj, ipv4: 10.0.0.7, ipv6: "fd00::7", security_groups: [other]}}
"""
# (src, dst, protocol, dport, expected verdict, reason)
CASES = [
    ("10.0.0.5", "10.0.0.6", 6, 22, V.ALLOW, V.R_POLICY),  # member to member
    ("fd00::6", "fd00::5", 17, 53, V.ALLOW, V.R_POLICY),
    ("10.0.0.6", "10.0.0.5", 1, 0, V.ALLOW, V.R_POLICY),  # ICMP echo
    ("fd00::5", "fd00::6", 58, 0, V.ALLOW, V.R_POLICY),
    ("10.0.0.7", "10.0.0.5", 6, 22, V.DROP, V.R_INGRESS_DENIED),  # not a member
    ("fd00::7", "fd00::6", 6, 443, V.DROP, V.R_INGRESS_DENIED),
    ("203.0.113.9", "10.0.0.5", 6, 80, V.DROP, V.R_INGRESS_DENIED),  # from outside
    ("2001:db8::9", "fd00::5", 6, 80, V.DROP, V.R_INGRESS_DENIED),
    ("10.0.0.5", "198.51.100.1", 6, 443, V.ALLOW, V.R_POLICY),  # egress 0.0.0.0/0
    ("fd00::6", "2001:db8::1", 17, 123, V.ALLOW, V.R_POLICY),  # egress ::/0
    ("10.0.0.5", "10.0.0.7", 6, 22, V.DROP, V.R_INGRESS_DENIED),  # vm-c admits nothing
]


def _decide(p, cases):
    """(verdict, reason) per case from the compiled policy, checked against the reference."""
    cols = [[], [], [], [], []]
    for s, d, proto, *_ in cases:
        (sh, sl), (dh, dl) = text_to_addr(s), text_to_addr(d)
        for c, v in zip(cols, (sh, sl, dh, dl, proto)):
            c.append(v)
    n = len(cases)
    keys = connection_keys([4100] * n, *cols, [40000] * n, [c[3] for c in cases])
    ct = np.full(n, ctstate.NEW | ctstate.TRACKED, np.uint8)
    v, _, why = compile_policy(p).decide(keys, ct)
    got = list(zip(v.tolist(), why.tolist()))
    assert got == [(d.verdict, d.reason) for d in Reference(p).decide(keys, ct)]
    return got


@pytest.mark.parametrize("name", DEFAULT_FILES)
def test_default_group_decides_packets(tmp_path, name):
    (tmp_path / "p.yaml").write_text(POLICY.format(gid=DEFAULT_ID, path=os.path.join(OS, name)))
    p = load_policy(str(tmp_path / "p.yaml"))
    assert _decide(p, CASES) == [(c[4], c[5]) for c in CASES]


def test_one_rule_from_rule_show_decides_packets(tmp_path):
    """Only the IPv4 ingress rule (from `rule show`, placeholder and all): IPv4 between members
    passes, IPv6 between members does not; egress falls to default_egress: allow."""
    path = os.path.join(OS, "client-rule-show-default-ingress-ipv4.json")
    (tmp_path / "p.yaml").write_text(POLICY.format(gid=DEFAULT_ID, path=path) + "default_egress: allow\n")
    p = load_policy(str(tmp_path / "p.yaml"))
    want = [
        (V.ALLOW, V.R_POLICY)
        if c[0].startswith("10.0.0.") and c[1] in ("10.0.0.5", "10.0.0.6") and c[0] != "10.0.0.7"
        else (V.ALLOW, V.R_POLICY)
        if c[1].startswith(("198.", "2001:"))
        else (V.DROP, V.R_INGRESS_DENIED)
        for c in CASES
    ]
    assert want.count((V.ALLOW, V.R_POLICY)) == 4
    assert _decide(p, CASES) == want


def test_query_through_the_cli(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text(POLICY.format(gid=DEFAULT_ID, path=os.path.join(OS, CLIENT_LIST)))
    base = ["policy", "query", str(tmp_path / "p.yaml"), "--vni", "4100"]
    assert main(base + ["--src", "10.0.0.5", "--dst", "10.0.0.6", "--dport", "22"]) == 0
    assert "security group proj/default rule" in capsys.readouterr().out
    assert main(base + ["--src", "10.0.0.7", "--dst", "10.0.0.6", "--dport", "22"]) == 1
    assert "ingress_denied" in capsys.readouterr().out


def test_one_group_without_an_id_gives_all_its_rules(tmp_path):
    """In a file of one group, the rules' own security_group_id does not filter them: the
    group that names the file takes them all."""
    doc = {
        "security_group": {
            "name": "n",
            "security_group_rules": [
                {"direction": "egress", "ethertype": "IPv4", "security_group_id": "abc"}
            ],
        }
    }
    ((rule, owner, _),) = openstack.load_rules(_write(tmp_path, doc), Reporter())
    assert owner is None and rule.direction == "egress"
    (tmp_path / "p.yaml").write_text(
        "tenants: [{name: t, vni: 1}]\nsecurity_groups: [{name: g, tenant: t, rules_file: x.json}]\n"
    )
    assert len(load_policy(str(tmp_path / "p.yaml")).group("t", "g").rules) == 1
