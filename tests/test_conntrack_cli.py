"""`microseg conntrack states|list`."""

import json
from pathlib import Path

import pytest

from microseg.cli import main

VEC = Path(__file__).parent / "vectors" / "conntrack"


@pytest.mark.parametrize("name", ["tcp_rst", "icmp_errors", "v6_icmp_errors", "mixed_random"])
def test_states_csv_diffs_clean_against_the_kernel(name, capsys):
    assert main(["conntrack", "states", "--csv", str(VEC / f"{name}.pcap")]) == 0
    assert capsys.readouterr().out == (VEC / f"{name}.csv").read_text()


def test_states_plain_and_reply(capsys):
    assert main(["conntrack", "states", "--reply", str(VEC / "tcp_basic.pcap")]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert lines[:3] == ["new", "established reply", "established"]


def test_list_filters_and_formats(capsys):
    cap = str(VEC / "mixed_random.pcap")
    assert main(["conntrack", "list", "--capture", cap]) == 0
    everything = capsys.readouterr().out.strip().split("\n")
    assert main(["conntrack", "list", "--capture", cap, "--proto", "tcp", "--state", "time_wait"]) == 0
    tw = capsys.readouterr().out.strip().split("\n")
    assert 0 < len(tw) < len(everything)
    assert all(line.startswith("tcp      6 ") and " TIME_WAIT src=" in line for line in tw)
    src = tw[0].split("src=")[1].split()[0]
    assert main(["conntrack", "list", "--capture", cap, "--src", src, "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().split("\n")]
    assert rows and all(r["src"] == src for r in rows)
    assert main(["conntrack", "list", "--capture", cap, "--zone", "3"]) == 0
    assert capsys.readouterr().out == ""


def test_list_icmp_and_unreplied(capsys):
    assert main(["conntrack", "list", "--capture", str(VEC / "v6_icmp_errors.pcap")]) == 0
    out = capsys.readouterr().out
    assert "type=128 code=0 id=4" in out and "type=129 code=0 id=4" in out
    assert "[UNREPLIED]" in out and "[ASSURED]" in out


def test_snapshot_round_trip(tmp_path, capsys):
    snap = str(tmp_path / "t.snap")
    first = str(VEC / "tcp_basic.pcap")
    assert main(["conntrack", "list", "--capture", first, "--save", snap]) == 0
    listed = capsys.readouterr().out
    assert main(["conntrack", "list", "--snapshot", snap]) == 0
    assert capsys.readouterr().out == listed
    # the restored table continues: replaying the SYN reopens the connection in TIME_WAIT
    assert main(["conntrack", "states", "--restore", snap, first, "--save", snap]) == 0
    assert capsys.readouterr().out.split()[0] == "new"


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["conntrack", "list", "--snapshot", "/nonexistent/x"], "no such file"),
        (["conntrack", "list", "--capture", str(VEC / "tcp_basic.csv")], "not a pcap"),
        (["conntrack", "list", "--capture", str(VEC / "tcp_basic.pcap"), "--dst", "x"], "--dst"),
        (["conntrack", "list", "--capture", str(VEC / "tcp_basic.pcap"), "--proto", "foo"], "--proto"),
        (["conntrack", "list", "--capture", str(VEC / "tcp_basic.pcap"), "--state", "up"], "--state"),
        (["conntrack", "states", str(VEC / "tcp_basic.pcap"), "--capacity", "0"], "capacity"),
        (
            ["conntrack", "states", str(VEC / "tcp_basic.pcap"), "--restore", str(VEC / "README.md")],
            "snapshot",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and err.count("\n") == 1
