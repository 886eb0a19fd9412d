"""`microseg policy ...` verbs, and the decision on packets that went through the real parser."""

import json
import os

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import raw

from microseg.cli import main
from microseg.packet.batch import Batch
from microseg.packet.parse import parse
from microseg.policy import verdict as V
from microseg.policy.compiler import compile_policy
from microseg.policy.model import load_policy
from microseg.policy.reference import Reference

VEC = os.path.join(os.path.dirname(__file__), "vectors", "policy")
EXAMPLE = os.path.join(VEC, "example.yaml")


def _vx(vni, inner):
    return raw(
        Ether(src="02:aa:00:00:00:01", dst="02:aa:00:00:00:02")
        / IP(src="10.0.0.1", dst="10.0.0.2")
        / UDP(sport=49152, dport=4789)
        / VXLAN(vni=vni)
        / inner
    )


def _e(mac):
    return Ether(src=mac, dst="02:00:00:00:ff:ff")


PACKETS = [
    _vx(
        5001,
        _e("02:00:00:00:01:04")
        / IP(src="192.168.1.5", dst="192.168.1.10")
        / TCP(sport=40000, dport=22, flags="S"),
    ),
    _vx(
        5001,
        _e("02:00:00:00:01:04")
        / IP(src="192.168.1.5", dst="192.168.1.10")
        / TCP(sport=40000, dport=23, flags="S"),
    ),
    _vx(5002, _e("02:00:00:00:09:09") / IP(src="8.8.8.8", dst="192.168.1.10") / UDP(sport=53, dport=53)),
    _vx(5001, _e("02:00:00:00:01:04") / IP(src="192.168.1.5", dst="192.168.1.10") / ICMP(type=8)),
    _vx(5001, _e("02:00:00:00:01:04") / IPv6(src="fd00:1::5", dst="fd00:1::10") / TCP(dport=80, flags="S")),
    _vx(5001, _e("02:00:00:00:01:01") / IP(src="192.168.1.5", dst="192.168.1.10") / TCP(dport=22)),  # spoofed
    _vx(5001, _e("02:00:00:00:01:04") / ARP(psrc="192.168.1.5", pdst="192.168.1.10")),
    _vx(5003, _e("02:00:00:00:01:04") / IP(src="192.168.1.5", dst="192.168.1.10") / TCP(dport=22)),
    raw(Ether() / IP(src="192.168.1.5", dst="192.168.1.10") / TCP(dport=22)),
    _vx(5001, _e("02:00:00:00:01:04") / IP(src="192.168.1.5", dst="192.168.1.10") / TCP(dport=22))[:60],
    _vx(5001, _e("02:00:00:00:01:04") / IP(src="192.168.1.5", dst="192.168.1.10", frag=100) / TCP(dport=22)),
]
EXPECT = [
    (V.ALLOW, V.R_POLICY),
    (V.DROP, V.R_INGRESS_DENIED),
    (V.ALLOW, V.R_POLICY),
    (V.ALLOW, V.R_POLICY),
    (V.ALLOW, V.R_POLICY),
    (V.DROP, V.R_SPOOFED),
    (V.ALLOW, V.R_ARP),
    (V.DROP, V.R_UNKNOWN_VNI),
    (V.DROP, V.R_NO_TENANT),
    (V.DROP, V.R_PARSE_ERROR),
    (V.DROP, V.R_INGRESS_DENIED),
]


def test_parsed_packets_decide_as_expected():
    p = load_policy(EXAMPLE)
    keys = parse(Batch.from_packets(PACKETS))
    v, r, why = compile_policy(p).decide(keys)
    assert list(zip(v.tolist(), why.tolist())) == EXPECT
    ref = Reference(p)
    for i in range(keys.n):
        d = ref.decide_row(keys.row(i), 0)
        assert (d.verdict, d.reason) == EXPECT[i]


def test_check_ok_and_errors(capsys):
    assert main(["policy", "check", EXAMPLE]) == 0
    out = capsys.readouterr().out
    assert "ok: 2 tenants" in out and "7 workloads" in out
    bad = os.path.join(VEC, "invalid", "duplicate_address.yaml")
    assert main(["policy", "check", bad]) == 2
    err = capsys.readouterr().err
    assert "duplicate_address.yaml:5: workloads[1].addresses" in err
    assert "Traceback" not in err


def test_check_lists_every_problem(tmp_path, capsys):
    f = tmp_path / "p.yaml"
    f.write_text(
        "tenants: [{name: t, vni: 1}]\nworkloads:\n"
        "  - {name: a, tenant: x, ipv4: 10.0.0.1}\n  - {name: b, tenant: t, ipv4: nope}\n"
    )
    assert main(["policy", "check", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "p.yaml:3:" in err[0] and "p.yaml:4:" in err[1]


def test_compile_json(capsys):
    assert main(["policy", "compile", EXAMPLE, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["content_hash"]) == 64 and doc["rules"]
    # the example has security groups, NetworkPolicies and default_egress (no admin policies)
    assert {r["check"] for r in doc["rules"]} == {
        V.CHECKS[k] for k in (V.EG_SG, V.EG_NP, V.EG_DEF, V.IN_SG, V.IN_NP)
    }
    assert main(["policy", "compile", EXAMPLE]) == 0
    assert "security group acme/web rule 0" in capsys.readouterr().out


def test_query(capsys):
    args = [
        "policy",
        "query",
        EXAMPLE,
        "--vni",
        "5001",
        "--src",
        "192.168.1.5",
        "--dst",
        "192.168.1.10",
        "--dport",
        "22",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "acme/bastion" in out and "verdict: allow (policy)" in out
    assert main(args[:-1] + ["23", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"] == "drop" and doc["reason"] == "ingress_denied"
    assert main(args + ["--ct", "invalid"]) == 1
    assert "ct_invalid" in capsys.readouterr().out
    assert (
        main(
            [
                "policy",
                "query",
                EXAMPLE,
                "--vni",
                "5001",
                "--src",
                "192.168.7.7",
                "--dst",
                "192.168.1.10",
                "--proto",
                "icmp",
                "--icmp-type",
                "8",
            ]
        )
        == 0
    )
    capsys.readouterr()


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--src", "1.2.3"], "is neither an IP address nor a workload"),
        (["--dst", "::1"], "one IP version"),
        (["--proto", "bogus"], "is not a protocol"),
        (["--dport", "70000"], "is not a port number"),
        (["--mac", "xx"], "is not a MAC address"),
        (["--icmp-type", "300"], "out of range"),
    ],
)
def test_query_bad_input(extra, needle, capsys):
    base = {"--src": "10.0.0.1", "--dst": "10.0.0.2"}
    args = ["policy", "query", EXAMPLE]
    for k, v in base.items():
        if k not in extra:
            args += [k, v]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_missing_policy_file(capsys):
    assert main(["policy", "compile", os.path.join(VEC, "nope.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_apply_capture(tmp_path, capsys):
    from microseg.io.pcap import write_pcap

    cap = tmp_path / "c.pcap"
    write_pcap(str(cap), Batch.from_packets(PACKETS))
    assert main(["policy", "apply", EXAMPLE, str(cap), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["packets"] == len(PACKETS)
    got = {(d["verdict"], d["reason"]): d["packets"] for d in doc["verdicts"]}
    assert got[("allow", "policy")] == 4 and got[("drop", "spoofed_source")] == 1
    assert sum(got.values()) == len(PACKETS)
    assert main(["policy", "apply", EXAMPLE, str(cap)]) == 0
    assert "per rule:" in capsys.readouterr().out
