"""Policy files: the examples load; every invalid input names its file, line and field."""

import glob
import os

import pytest

from microseg.errors import InputError
from microseg.policy.model import format_mac, load_policy, parse_policy
from microseg.policy.source import PolicyError, load_documents

VEC = os.path.join(os.path.dirname(__file__), "vectors", "policy")
INVALID = sorted(
    f
    for f in glob.glob(os.path.join(VEC, "invalid", "*.yaml"))
    if open(f).readline().startswith("# expect: ")
)


def test_example_loads():
    p = load_policy(os.path.join(VEC, "example.yaml"))
    assert [t.name for t in p.tenants] == ["acme", "globex"]
    assert len(p.workloads) == 7
    web1 = p.workloads[0]
    assert format_mac(web1.mac) == "02:00:00:00:01:01"
    assert [str(a) for a in web1.addresses] == ["192.168.1.10", "fd00:1::10"]
    # the same addresses exist in both tenants
    g = [w for w in p.workloads if w.tenant == "globex" and w.name == "g-web"][0]
    assert g.addresses == web1.addresses
    web = p.group("acme", "web")
    assert web.rules[2].remote_group == "bastion"
    assert web.rules[3].protocol == 1 and web.rules[3].port_min == 8 and web.rules[3].port_max is None
    assert p.group("globex", "open").rules[1].protocol == 58
    names = [(n.namespace, n.name) for n in p.network_policies]
    assert names == [("acme", "api-allow-web"), ("acme", "db-from-api"), ("globex", "globex-app")]
    api = p.network_policies[0]
    assert api.ingress_type and api.egress_type
    db = p.network_policies[1]
    assert db.ingress_type and not db.egress_type  # policyTypes defaulted
    assert p.default_egress == "allow" and p.deny_action == "drop" and p.anti_spoofing


@pytest.mark.parametrize("path", INVALID, ids=[os.path.basename(f) for f in INVALID])
def test_invalid_inputs_name_file_line_field(path):
    loc, text = open(path).readline()[len("# expect: ") :].strip().split(" | ", 1)
    with pytest.raises(InputError) as ei:
        load_policy(path)
    errors = getattr(ei.value, "errors", [str(ei.value)])
    want = os.path.join(os.path.dirname(path), loc)
    assert any(e.startswith(want) and text in e for e in errors), (want, text, errors)


def test_all_errors_are_reported_at_once():
    text = """
tenants: [{name: acme, vni: 5001}]
workloads:
  - {name: a, tenant: nope, ipv4: 10.0.0.1}
  - {name: b, tenant: acme, ipv4: 10.0.0.300}
  - {name: c, tenant: acme, ipv4: 10.0.0.3, mac: zz}
"""
    with pytest.raises(PolicyError) as ei:
        parse_policy(text, "p.yaml")
    errs = ei.value.errors
    assert len(errs) == 3
    assert errs[0].startswith("p.yaml:4: workloads[0].tenant:")
    assert errs[1].startswith("p.yaml:5: workloads[1].ipv4:")
    assert errs[2].startswith("p.yaml:6: workloads[2].mac:")
    assert "(and 2 more)" in str(ei.value)


def test_unquoted_mac_keeps_its_text():
    # YAML 1.1 reads 12:34:56:00:01:01 as a base-60 integer; the loader keeps the text.
    p = parse_policy(
        "tenants: [{name: t, vni: 1}]\n"
        "workloads: [{name: w, tenant: t, ipv4: 10.0.0.1, mac: 12:34:56:00:01:01}]\n"
    )
    assert format_mac(p.workloads[0].mac) == "12:34:56:00:01:01"


@pytest.mark.parametrize(
    "text,needle",
    [
        ("", "the policy is empty"),
        ("- a\n- b\n", "must be a mapping"),
        ("tenants: 5\n", "tenants: must be a list"),
        ("a: &x [*x]\n", "recursive alias"),
        ("tenants: [{name: t, vni: 1}]\n---\ntenants: []\n", "expected one YAML document"),
        ("tenants: [{name: 'bad name', vni: 1}]\n", "is not a name"),
        ("tenants: [{name: t, vni: true}]\n", "is not a 24-bit VNI"),
        ("tenants: [{name: t, vni: 1}]\nuntagged_tenant: u\n", "no tenant named 'u'"),
        ("tenants: [{name: t, vni: 1}]\nanti_spoofing: maybe\n", "is not true or false"),
        ("version: 2\ntenants: [{name: t, vni: 1}]\n", "version"),
    ],
)
def test_malformed_top_level(text, needle):
    with pytest.raises(InputError) as ei:
        parse_policy(text, "x.yaml")
    assert "x.yaml" in str(ei.value) and needle in str(ei.value)


def test_alias_bomb_is_refused():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    with pytest.raises(PolicyError) as ei:
        load_documents("\n".join(lines) + "\n", "bomb.yaml")
    assert "too many values" in str(ei.value)


def test_unreadable_file():
    with pytest.raises(InputError) as ei:
        load_policy(os.path.join(VEC, "does-not-exist.yaml"))
    assert "cannot read" in str(ei.value)


def test_binary_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError) as ei:
        load_policy(str(f))
    assert "UTF-8" in str(ei.value)


def test_mutated_policies_fail_cleanly():
    """Damaged policy files load or raise InputError; nothing else escapes."""
    import random

    rng = random.Random(1)
    srcs = [
        open(os.path.join(VEC, n)).read()
        for n in ("example.yaml", "k8s_policy.yaml", "openstack_policy.yaml")
    ]
    toks = [
        "",
        "{}",
        "[]",
        "null",
        "-1",
        "99999999999",
        "true",
        '"x"',
        "[1, 2]",
        "{a: b}",
        "0.5",
        "::",
        "1.2.3.4/99",
        "Ingress",
        "tcp",
        "*a",
        "&a x",
        "!!binary aGk=",
        "2001-01-01",
        "'",
        "{",
        ":",
    ]
    outcomes = {"ok": 0, "error": 0}
    for _ in range(400):
        lines = rng.choice(srcs).split("\n")
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(lines))
            line = lines[i]
            r = rng.random()
            if r < 0.35 and ":" in line:
                lines[i] = line[: line.index(":") + 1] + " " + rng.choice(toks)
            elif r < 0.55 and line:
                j = rng.randrange(len(line))
                lines[i] = line[:j] + line[j + 1 :]
            elif r < 0.7:
                lines[i] = line.replace(",", rng.choice([", bogus: 1,", ", name: dup,"]), 1)
            elif r < 0.85:
                del lines[i]
            else:
                lines.insert(i, rng.choice(lines))
        try:
            parse_policy("\n".join(lines), "m.yaml", VEC)
            outcomes["ok"] += 1
        except InputError as exc:
            assert str(exc).startswith(("m.yaml", VEC)), str(exc)
            outcomes["error"] += 1
    assert outcomes["ok"] > 20 and outcomes["error"] > 100
