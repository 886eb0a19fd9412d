"""ClassBench loader errors, the `microseg classify` verb, and the rule model's guards."""

import os

import numpy as np
import pytest

from microseg import cli
from microseg.classify import Action, Prefix, Rule, RuleSet, build
from microseg.classify.classbench import load_rules, load_trace
from microseg.errors import InputError

VEC = os.path.join(os.path.dirname(__file__), "vectors", "classbench")
GOOD = "@10.0.0.0/8 0.0.0.0/0 0 : 65535 80 : 80 0x06/0xff\n"


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    "bad,needle",
    [
        ("10.0.0.0/8 0.0.0.0/0 0 : 65535 80 : 80 0x06/0xff", "start with '@'"),
        ("@10.0.0.0/33 0.0.0.0/0 0 : 65535 80 : 80 0x06/0xff", "bad prefix"),
        ("@10.0.0.256/8 0.0.0.0/0 0 : 65535 80 : 80 0x06/0xff", "bad IPv4"),
        ("@10.0.0.0/8 0.0.0.0/0 0 : 65536 80 : 80 0x06/0xff", "bad port"),
        ("@10.0.0.0/8 0.0.0.0/0 9 : 8 80 : 80 0x06/0xff", "empty port range"),
        ("@10.0.0.0/8 0.0.0.0/0 0 : 65535 80 : 80 0x06", "protocol"),
        ("@10.0.0.0/8 0.0.0.0/0 0 : 65535 80 : 80 0x16/0x0f", "outside its mask"),
        ("@10.0.0.0/8 0.0.0.0/0 0 65535 80 : 80 0x06/0xff", "want"),
        ("@10.0.0.0/8 0.0.0.0/0 0 : 65535 80 : 80 0x06/0xff 0x0100/0x0100", "TCP flag bits"),
    ],
)
def test_bad_rule_lines_name_file_and_line(tmp_path, bad, needle):
    p = write(tmp_path, "r.rules", GOOD + "\n" + bad + "\n")
    with pytest.raises(InputError) as e:
        load_rules(p)
    assert e.value.path == p and e.value.line == 3
    assert needle in str(e.value) and str(e.value).startswith(f"{p}:3: ")


@pytest.mark.parametrize(
    "bad", ["1 2 3 4", "1 2 3 4 256", "4294967296 1 2 3 6", "1 2 65536 3 6", "a 2 3 4 6", "-1 2 3 4 6"]
)
def test_bad_trace_lines(tmp_path, bad):
    p = write(tmp_path, "t.trace", "1 2 3 4 6\n" + bad + "\n")
    with pytest.raises(InputError) as e:
        load_trace(p)
    assert e.value.line == 2


def test_flags_field_and_extra_trace_columns(tmp_path):
    r = write(
        tmp_path, "r.rules", "@0.0.0.0/0 0.0.0.0/0 0 : 65535 0 : 65535 0x06/0xff 0x0002/0x0012\n" + GOOD
    )
    t = write(tmp_path, "t.trace", "167772161 1 5 80 6 99 extra\n167772161 1 5 81 6\n")
    rs = load_rules(r)
    K = load_trace(t)
    # trace headers carry no TCP flags (0): the SYN-only rule 0 cannot match
    assert build(rs, "tree").classify_keys(K).tolist() == [1, -1]


def test_cli_prints_first_match_per_header(tmp_path, capsys):
    rules, trace = os.path.join(VEC, "acl_1000.rules"), os.path.join(VEC, "acl_1000.trace")
    want = build(load_rules(rules), "linear").classify_keys(load_trace(trace, 300))
    small = write(tmp_path, "s.trace", "".join(open(trace).readlines()[:300]))
    for algo in ("tree", "tss", "linear"):
        assert cli.main(["classify", "--rules", rules, "--trace", small, "--algo", algo]) == 0
        got = [int(x) for x in capsys.readouterr().out.split()]
        assert got == want.tolist()


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    bad = write(tmp_path, "b.rules", GOOD + "@1.2.3/8 0.0.0.0/0 0 : 1 0 : 1 0x06/0xff\n")
    t = write(tmp_path, "t.trace", "1 2 3 4 6\n")
    assert cli.main(["classify", "--rules", bad, "--trace", t]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}:2:" in err and "Traceback" not in err
    assert cli.main(["classify", "--rules", str(tmp_path / "missing"), "--trace", t]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_empty_files(tmp_path, capsys):
    r = write(tmp_path, "e.rules", "")
    t = write(tmp_path, "e.trace", "1 2 3 4 6\n")
    assert cli.main(["classify", "--rules", r, "--trace", t]) == 0
    assert capsys.readouterr().out.split() == ["-1"]


def test_prefix_forms():
    p = Prefix.parse("10.1.2.3/8")
    assert (p.hi, p.length, str(p)) == (0, 104, "10.0.0.0/8") and p.is_ipv4
    assert Prefix.parse("10.1.2.3").length == 128
    q = Prefix.parse("2001:db8::1/32")
    assert str(q) == "2001:db8::/32" and not q.is_ipv4
    assert Prefix.parse("0.0.0.0/0").length == 96 and Prefix.parse("::/0").length == 0
    with pytest.raises(InputError):
        Prefix.parse("10.0.0.0/40")


@pytest.mark.parametrize(
    "kw",
    [
        dict(sport=(5, 4)),
        dict(dport=(0, 70000)),
        dict(proto=256),
        dict(tenant=-2),
        dict(in_port=65536),
        dict(tcp_flags=300),
        dict(priority=True),
        dict(icmp_type=-1),
        dict(action=9),
    ],
)
def test_rule_validation(kw):
    with pytest.raises((InputError, ValueError)):
        Rule(**kw)


def test_ruleset_is_immutable_and_versioned():
    rs = RuleSet([Rule(priority=1, dst="10.0.0.0/8", action=Action.ALLOW), Rule(priority=2)])
    rs2 = RuleSet([Rule()])
    assert rs2.version > rs.version
    assert rs.rank.tolist() == [1, 0] and rs.order.tolist() == [1, 0]
    with pytest.raises(ValueError):
        rs.val[0, 0] = 1
    with pytest.raises(AttributeError):
        rs.version = 5
    assert rs.actions(np.array([-1, 0, 1])).tolist() == [Action.DROP, Action.ALLOW, Action.DROP]
    with pytest.raises(InputError):
        build(rs, "nope")
    with pytest.raises(InputError):
        build(rs, "tree").classify_keys(np.zeros((3, 2), np.uint64))
