"""Mutation fuzzing kept in the suite: every verb that reads a capture, a policy, a signature,
SA, snapshot or ClassBench file gets mutated inputs (tools/fuzz.py's mutators and verb table,
fixed seeds, a few seconds of it), in process through `microseg.cli.main` and a handful as
real processes. Each run must exit 0 or 2 (or a code the verb documents), print at most one
error line and never a traceback. `make fuzz` runs the long version (docs/fuzzing.md)."""

from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from microseg.cli import build_parser, main
from microseg.errors import InputError
from microseg.io.pcap import CaptureError, read_capture

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("microseg_fuzz", ROOT / "tools" / "fuzz.py")
fuzz = importlib.util.module_from_spec(_spec)
sys.modules["microseg_fuzz"] = fuzz
_spec.loader.exec_module(fuzz)

TCPDUMP = ROOT / "tests" / "vectors" / "tcpdump"


def _unknown(failures):
    """Failures other than the known ones (fuzz.KNOWN: bugs outside the capture reader, each
    reproduced by an expected-failure test, matched on stderr so that anything else still fails)."""
    return [f for f in failures if not fuzz.known(f)]


def _report(failures):
    return "\n".join(
        f"{f['verb']}: {f['reason']}: microseg {' '.join(f['argv'])}\n{f['stderr'][-600:]}" for f in failures
    )


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return fuzz.make_seeds(tmp_path_factory.mktemp("fuzz"), quick=True)


def _leaf_verbs(parser, prefix=()):
    """Every runnable verb of the command line, as a tuple of words."""
    import argparse

    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _leaf_verbs(sub, prefix + (name,))
    return out or [prefix]


def test_the_table_covers_every_verb_that_reads_a_file(seeds):
    covered = {tuple(b("F", "O")[:3]) for _, _, b in fuzz.verbs(seeds)}
    covered = {v for argv in covered for v in (argv[:1], argv[:2], argv[:3])}
    missing = [v for v in _leaf_verbs(build_parser()) if v not in covered]
    # demo reads nothing but its built-in data; the live verbs (agent, lab, store, ctl) act on
    # interfaces, namespaces, a server or a running agent, so a mutated file that happens to be valid would
    # start real work: they get the broken policies of the test below instead.
    assert [v for v in missing if v[0] not in LIVE] == [("demo",)]


LIVE = ("agent", "lab", "store", "ctl")
BROKEN = sorted((Path(__file__).parent / "vectors" / "policy" / "invalid").glob("*.yaml"))


@pytest.mark.parametrize("path", BROKEN[::3], ids=lambda p: p.name)
@pytest.mark.parametrize(
    "argv",
    [
        ["agent", "--policy", "{}", "--host", "h1", "--underlay", "lo"],
        ["lab", "up", "--policy", "{}"],
        ["store", "apply", "{}", "--endpoint", "http://127.0.0.1:9"],
    ],
    ids=lambda a: " ".join(a[:2]),
)
def test_live_verbs_refuse_a_broken_policy_before_acting(path, argv, capsys):
    """The policy is validated before any interface, namespace or server is touched: exit
    2, one error line, no traceback."""
    rc = main([a.replace("{}", str(path)) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") >= 1 and "Traceback" not in err, err
    assert all(line.startswith("microseg ") for line in err.strip().splitlines()), err


def test_judge_catches_what_it_must():
    ok = "microseg parse: error: f.pcap: record 3 at byte 99: ... (after 2 good packets)\n"
    assert fuzz.judge(2, "", ok) is None
    assert fuzz.judge(0, "x\n", "microseg parse: warning: f.pcap: cut short\n") is None
    assert fuzz.judge(2, "", "Traceback (most recent call last):\n  ...\n" + ok) == "printed a traceback"
    assert fuzz.judge(2, "", ok + ok) == "2 error lines"
    assert fuzz.judge(2, "", ok + '  in "<unicode string>", position 3\n').startswith("exit code 2 without")
    assert fuzz.judge(1, "", "") == "exit code 1"
    assert fuzz.judge(1, "", "", verb="policy query") is None
    assert fuzz.judge(None, "", "", ValueError("boom")) == "raised ValueError: boom"
    assert fuzz.judge(0, "", ok) == "an error line with exit code 0"
    many = "".join(f"microseg policy check: error: p.yaml:{i}: bad\n" for i in range(3))
    assert fuzz.judge(2, "", many, verb="policy check") is None


def test_mutators_are_deterministic_and_change_things():
    data = (TCPDUMP / "vxlan.pcap").read_bytes()
    a = [fuzz.mutate_capture(data, np.random.default_rng([3, i])) for i in range(20)]
    b = [fuzz.mutate_capture(data, np.random.default_rng([3, i])) for i in range(20)]
    assert a == b and sum(x != data for x in a) >= 18
    text = (ROOT / "tests" / "vectors" / "policy" / "example.yaml").read_bytes()
    t = [fuzz.mutate_text(text, np.random.default_rng([4, i])) for i in range(20)]
    assert sum(x != text for x in t) >= 18


def test_cli_fuzz_in_process(seeds):
    counts, failures = fuzz.fuzz_cli(seeds, per_verb=6, seed=20240607)
    bad = _unknown(failures)
    assert not bad, _report(bad)
    assert sum(c["0"] for c in counts.values()) >= 15  # many inputs still read ...
    assert sum(c["2"] for c in counts.values()) >= 15  # ... and many are refused


@pytest.mark.parametrize("verb", ["parse --json", "run --policy P", "policy check", "ipsec decrypt"])
def test_cli_fuzz_as_a_process(seeds, tmp_path, verb):
    name, kind, build = next(v for v in fuzz.verbs(seeds) if v[0] == verb)
    rng = np.random.default_rng([11, len(verb)])
    pool = fuzz.seeds_of(seeds, kind)
    src = Path(pool[int(rng.integers(0, len(pool)))])
    f = tmp_path / f"in{src.suffix}"
    f.write_bytes(fuzz.mutate_for(kind, src.read_bytes(), rng, []))
    rc, out, err, _ = fuzz.run_subprocess(build(str(f), str(tmp_path / "o")))
    why = fuzz.judge(rc, out, err, verb=verb)
    assert why is None or fuzz.known({"stderr": err}), f"{why}\n{err[-800:]}"


def test_datapath_fuzz_a_little(seeds):
    stats, failures = fuzz.fuzz_datapath(seeds, 8192, seed=3, batch=2048)
    assert not failures, failures[0]["traceback"]
    assert stats["packets"] == 8192 and stats["forwarded"] > 0


@pytest.mark.parametrize(
    "name",
    ["vxlan.pcap", "mptcp-v1.pcap", "quic_handshake.pcap", "LINKTYPE_RAW_ipv6.pcap", "various_gre.pcap"],
)
def test_a_bad_record_never_loses_the_packets_before_it(tmp_path, name):
    """Each record of a corpus capture in turn gets an impossible length: the reader must
    deliver exactly the records before it, and name the bad one."""
    data = (TCPDUMP / name).read_bytes()
    good = list(read_capture(TCPDUMP / name).packets())
    e, recs = fuzz._pcap_records(data)
    path = tmp_path / "x.pcap"
    for k, (pos, _) in enumerate(recs[:40]):
        bad = bytearray(data)
        bad[pos + 8 : pos + 12] = struct.pack(e + "I", 0xFFFFFFFF)
        path.write_bytes(bytes(bad))
        with pytest.raises(CaptureError, match=rf"record {k + 1} at byte {pos}: ") as ei:
            read_capture(path)
        assert list(ei.value.batch.packets()) == good[:k]


def test_reader_on_many_mutated_corpus_files(tmp_path):
    """The reader alone on mutated tcpdump captures: a batch or one InputError, and the
    batch is always well formed."""
    names = sorted(p.name for p in TCPDUMP.glob("*.pcap*"))
    path = tmp_path / "m.pcap"
    for i in range(300):
        rng = np.random.default_rng([5, i])
        data = (TCPDUMP / names[i % len(names)]).read_bytes()
        path.write_bytes(fuzz.mutate_capture(data, rng))
        try:
            b = read_capture(path)
        except CaptureError as exc:
            b = exc.batch
        except InputError as exc:
            assert "\n" not in str(exc)
            continue
        assert int(b.length.sum()) == b.data.shape[0]
        assert (b.wire_len >= b.length).all() and (b.length <= 262144).all()


# ---------------------------------------------------------------------------------------------
# what the fuzzer found outside the reader (fuzz.KNOWN)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("verb", [["policy", "check"], ["policy", "compile"]])
def test_policy_with_a_control_character_gives_one_error_line(tmp_path, capsys, verb):
    p = tmp_path / "ctl.yaml"
    p.write_bytes(b"version: 1\ntenants: []\x00\n")
    rc = main([*verb, str(p)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err


_SA = """sas:
  - name: a
    spi: 0x0A0B0001
    key: "7b3c0c8f1d9e2a4b6c5d8e9f0a1b2c3d4e5f60718293a4b5c6d7e8f901234567"
    salt: "5ea7c0de"
    tunnel_src: 198.51.100.1
    tunnel_dst: 198.51.100.2
policies:
  - {dst: 0.0.0.0/0, sa: SA}
"""


@pytest.mark.parametrize("value", ["{name: a}", "[a]"])
def test_sa_file_policy_naming_a_mapping_or_list_as_sa(tmp_path, capsys, value):
    p = tmp_path / "sa.yaml"
    p.write_text(_SA.replace("SA}", value + "}"))
    rc = main(["ipsec", "sa", "list", "--sa", str(p)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
