"""`microseg encap` / `microseg decap` verbs: round trip through files, reports, bad input."""

import json

import pytest
from scapy.all import IP, UDP, Ether, Raw, rdpcap, wrpcap
from scapy.layers.vxlan import VXLAN

from microseg.cli import main
from microseg.io.pcap import read_capture, write_pcap
from microseg.packet import build as B
from microseg.packet.batch import Batch


@pytest.fixture
def capture(tmp_path):
    pk = [B.tcp_packet("10.0.0.1", "10.0.0.2", 1000 + i, 80, b"y" * i) for i in range(30)]
    path = tmp_path / "in.pcap"
    write_pcap(path, Batch.from_packets(pk, ts=[i * 10**6 for i in range(30)]))
    return path, pk


@pytest.mark.parametrize("kind", ["vxlan", "geneve", "nvgre"])
def test_encap_then_decap(tmp_path, capture, capsys, kind):
    src, pk = capture
    enc, dec = tmp_path / "enc.pcap", tmp_path / "dec.pcap"
    assert (
        main(
            [
                "encap",
                "--type",
                kind,
                "--vni",
                "4242",
                "--local",
                "2001:db8::1",
                "--remote",
                "2001:db8::2",
                str(src),
                "-w",
                str(enc),
            ]
        )
        == 0
    )
    assert "encapsulated 30 packets" in capsys.readouterr().out
    assert len(rdpcap(str(enc))) == 30
    assert main(["decap", str(enc), "-w", str(dec), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep == {"packets": 30, "decapsulated": 30, "tenants": {"4242": 30}, "not_decapsulated": {}}
    back = read_capture(dec)
    assert list(back.packets()) == pk
    assert back.ts.tolist() == [i * 10**6 for i in range(30)]


def test_decap_counts_tenants_and_rejects(tmp_path, capsys):
    inner = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP() / Raw(b"z")
    pkts = (
        [
            Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
            / IP()
            / UDP(dport=4789)
            / VXLAN(vni=7)
            / inner
        ]
        * 3
        + [
            Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
            / IP()
            / UDP(dport=4789)
            / VXLAN(vni=8)
            / inner
        ]
        * 2
        + [Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / UDP(dport=53)] * 4
        + [
            Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
            / IP()
            / UDP(dport=4789)
            / VXLAN(vni=9, flags=0)
            / inner
        ]
    )
    wrpcap(str(tmp_path / "t.pcap"), pkts)
    assert main(["decap", str(tmp_path / "t.pcap"), "-w", str(tmp_path / "o.pcap")]) == 0
    out = capsys.readouterr().out
    assert "decapsulated 5 of 10 packets" in out
    assert "tenant 7: 3" in out and "tenant 8: 2" in out
    assert "not decapsulated (not_tunnel): 4" in out
    assert "not decapsulated (bad_tunnel_header): 1" in out
    assert [bytes(p) for p in rdpcap(str(tmp_path / "o.pcap"))] == [bytes(inner)] * 5


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["decap", "{bad}", "-w", "{out}"], "not a pcap"),
        (["decap", "{missing}", "-w", "{out}"], "cannot read"),
        (
            [
                "encap",
                "--type",
                "vxlan",
                "--vni",
                "16777216",
                "--local",
                "1.1.1.1",
                "--remote",
                "2.2.2.2",
                "{good}",
                "-w",
                "{out}",
            ],
            "--vni",
        ),
        (
            [
                "encap",
                "--type",
                "nvgre",
                "--vni",
                "1",
                "--local",
                "1.1.1.1",
                "--remote",
                "zzz",
                "{good}",
                "-w",
                "{out}",
            ],
            "address",
        ),
        (
            [
                "encap",
                "--type",
                "vxlan",
                "--vni",
                "1",
                "--local",
                "1.1.1.1",
                "--remote",
                "2.2.2.2",
                "--local-mac",
                "nope",
                "{good}",
                "-w",
                "{out}",
            ],
            "MAC",
        ),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, capture, capsys, argv, msg):
    (tmp_path / "bad").write_bytes(b"definitely not a capture")
    names = {
        "bad": tmp_path / "bad",
        "missing": tmp_path / "missing.pcap",
        "out": tmp_path / "o.pcap",
        "good": capture[0],
    }
    argv = [a.format(**names) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_help(capsys):
    for verb in ("encap", "decap"):
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0
        assert verb in capsys.readouterr().out
