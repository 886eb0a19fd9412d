"""`microseg inspect` and `microseg offload` on a small capture; bad input exits 2 with one line."""

import json

import numpy as np
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from microseg.cli import main
from microseg.io.pcap import write_pcap
from microseg.packet.batch import Batch

SIG = "tests/vectors/signatures"


def _capture(tmp_path):
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    pk = [eth / IP(src="1.1.1.1", dst="2.2.2.2") / TCP(sport=1, dport=2) / b"exec /bin/sh now"]
    pk += [
        eth / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=5, dport=6, flags="A") / (b"x%d" % i)
        for i in range(12)
    ]
    pk += [
        eth
        / IP(src="10.0.0.1", dst="10.0.0.3")
        / TCP(sport=5, dport=443)
        / (bytes.fromhex("160301002a010000260303") + b"\0" * 38)
    ]
    b = Batch.from_packets([bytes(p) for p in pk], ts=np.arange(len(pk)) * 10**6)
    path = tmp_path / "c.pcap"
    write_pcap(str(path), b)
    return str(path)


def test_inspect_capture(tmp_path, capsys):
    cap = _capture(tmp_path)
    assert main(["inspect", f"{SIG}/et_style.rules", cap]) == 0
    out = capsys.readouterr().out
    assert "alert sid 9000004" in out and "uninspectable (tls): 1 packets" in out
    assert main(["inspect", "--json", f"{SIG}/et_style.rules", cap]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rows[0] == {
        "packet": 0,
        "verdict": "alert",
        "sid": 9000004,
        "sids": [9000004],
        "msg": "Shell command in payload",
        "matches": 1,
        "uninspectable": None,
    }
    assert rows[1]["packet"] == 13 and rows[1]["uninspectable"] == "tls"


def test_offload_capture(tmp_path, capsys):
    cap = _capture(tmp_path)
    assert (
        main(
            ["offload", cap, "--rules", f"{SIG}/et_style.rules", "--n-inspect", "4", "--json", "--batch", "4"]
        )
        == 0
    )
    rep = json.loads(capsys.readouterr().out)
    assert rep["packets"] == 14
    assert rep["flows"]["clean"] == 1 and rep["flows"]["encrypted"] == 1 and rep["flows"]["alerted"] == 1
    assert rep["fast_path"]["inserts"] == 2 and rep["fast_path"]["packet_share"] == 5 / 14


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["inspect", f"{SIG}/unsupported.rules"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unsupported.rules:4: unsupported keyword 'pcre'" in err[0]
    assert main(["inspect", f"{SIG}/et_style.rules", "--var", "nonsense"]) == 2
    assert main(["offload", str(tmp_path / "missing.pcap")]) == 2
    assert main(["offload", _capture(tmp_path), "--capacity", "0"]) == 2
    assert main(["inspect", "--lenient", f"{SIG}/unsupported.rules"]) == 0
    assert "0 rules loaded, 15 skipped" in capsys.readouterr().out
