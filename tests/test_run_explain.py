"""`run` says in one line why most of a capture was stopped, and what setting changes it."""

import json

from microseg.cli import main
from microseg.io.pcap import write_pcap
from microseg.packet import build as PB
from microseg.packet.batch import Batch

POLICY = """
tenants: [{name: acme, vni: 5001}]
hosts: [{name: h1, address: 192.168.100.1}]
workloads:
  - {name: c1, tenant: acme, host: h1, ipv4: 10.0.0.1}
  - {name: w1, tenant: acme, host: h1, ipv4: 10.0.0.2}
default_egress: allow
"""


def _capture(tmp_path):
    frames = [PB.tcp_packet("10.0.0.1", "10.0.0.2", 40000 + i, 80, flags="S", seq=1) for i in range(10)]
    cap = tmp_path / "plain.pcap"
    write_pcap(str(cap), Batch.from_packets(frames, ts=[10**9 + i for i in range(10)]))
    return cap


def test_untunnelled_capture_without_untagged_tenant_names_the_setting(tmp_path, capsys):
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY)
    rep = tmp_path / "r.json"
    rc = main(["run", "--policy", str(pol), str(_capture(tmp_path)), "--report", str(rep), "--quiet"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "100% of the packets were stopped as no_tenant" in err
    assert "untagged_tenant: acme" in err
    assert len(err.strip().splitlines()) == 1
    assert json.loads(rep.read_text())["explanation"] == [err.strip().split("note: ", 1)[1]]


def test_no_note_when_most_packets_pass(tmp_path, capsys):
    pol = tmp_path / "p.yaml"
    pol.write_text(
        POLICY.replace("ipv4: 10.0.0.2}", "ipv4: 10.0.0.2, security_groups: [web]}")
        + "untagged_tenant: acme\nsecurity_groups:\n  - {name: web, tenant: acme, rules: "
        "[{direction: ingress, protocol: tcp, port_range_min: 80, port_range_max: 80}]}\n"
    )
    rep = tmp_path / "r.json"
    assert main(["run", "--policy", str(pol), str(_capture(tmp_path)), "--report", str(rep), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert json.loads(rep.read_text())["explanation"] == []


def test_report_counts_tunnels_followed_and_not_and_snapped_packets(tmp_path):
    """IP-in-IP is followed (its inner packet judged), ERSPAN is not (the outer packet is
    judged and the report says so), and a packet snapped by the capture is counted."""
    from scapy.layers.inet import GRE, IP, TCP
    from scapy.layers.l2 import Ether

    eth = dict(src="02:00:00:00:aa:01", dst="02:00:00:00:aa:02")
    inner = IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=80, flags="S")
    frames = [
        bytes(Ether(**eth) / IP(src="198.51.100.1", dst="198.51.100.2") / inner),  # IP in IP
        bytes(
            Ether(**eth)
            / IP(src="198.51.100.1", dst="198.51.100.2")
            / GRE(proto=0x88BE)
            / (b"\0" * 8)
            / Ether(**eth)
            / inner
        ),  # ERSPAN type II
        bytes(Ether(**eth) / inner / (b"x" * 200)),
    ]
    wire = [len(f) for f in frames]
    frames[2] = frames[2][:60]  # snapped, as by tcpdump -s 60
    cap = tmp_path / "mix.pcap"
    write_pcap(str(cap), Batch.from_packets(frames, ts=[10**9 + i for i in range(3)], wire_len=wire))
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY + "untagged_tenant: acme\n")
    rep = tmp_path / "r.json"
    assert main(["run", "--policy", str(pol), str(cap), "--report", str(rep), "--quiet"]) == 0
    r = json.loads(rep.read_text())
    assert r["tunnels"] == {"ipip": 1}
    assert r["tunnels_not_followed"] == {"erspan": 1}
    assert r["truncated_packets"] == 1
