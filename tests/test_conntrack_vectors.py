"""Per-packet states agree exactly with the Linux kernel's (tests/vectors/conntrack/*.csv)."""

from pathlib import Path

import numpy as np
import pytest

from microseg import ctstate as CS
from microseg.conntrack import ConntrackTable
from microseg.conntrack.reference import ReferenceConntrack
from microseg.conntrack.table import checksum_ok
from microseg.io.pcap import read_capture
from microseg.packet.parse import parse

VEC = Path(__file__).parent / "vectors" / "conntrack"
CASES = sorted(p.stem for p in VEC.glob("*.pcap"))


def kernel_states(name):
    rows = (VEC / f"{name}.csv").read_text().split()[1:]
    return [r.split(",")[1] for r in rows]


def test_all_listed_vectors_present():
    listed = {
        "tcp_basic",
        "tcp_rst",
        "tcp_midstream",
        "tcp_out_of_window",
        "tcp_bad_flags",
        "tcp_synack_first",
        "tcp_retransmit",
        "tcp_bad_checksum",
        "udp_basic",
        "icmp_echo",
        "icmp_error_related",
        "v6_tcp_basic",
        "v6_icmp",
        "mixed_random",
    }
    assert listed <= set(CASES)
    assert len(CASES) > len(listed)  # plus the cases added here


@pytest.mark.parametrize("name", CASES)
def test_kernel_vector(name):
    batch = read_capture(VEC / f"{name}.pcap")
    keys = parse(batch)
    want = kernel_states(name)
    assert len(want) == len(batch)
    got = [CS.state_name(s) for s in ConntrackTable(4096).process(batch, keys)]
    diff = [(i, w, g) for i, (w, g) in enumerate(zip(want, got)) if w != g]
    assert not diff, f"{len(diff)} packets differ, first: {diff[:5]}"
    ref = ReferenceConntrack().process(batch, keys, csum_ok=checksum_ok(batch, keys))
    assert [CS.state_name(s) for s in ref] == want


@pytest.mark.parametrize("size", [1, 3, 64])
def test_batching_does_not_change_states(size):
    batch = read_capture(VEC / "mixed_random.pcap")
    want = kernel_states("mixed_random")
    t = ConntrackTable(4096)
    got = []
    for part in batch.chunks(size):
        got += [CS.state_name(s) for s in t.process(part, parse(part))]
    assert got == want


def test_reply_bit_marks_reply_direction():
    batch = read_capture(VEC / "tcp_basic.pcap")
    st = ConntrackTable(64).process(batch, parse(batch))
    # handshake: SYN (original), SYN/ACK (reply), ACK (original)
    assert [bool(s & CS.REPLY) for s in st[:3]] == [False, True, False]
    assert all(s & CS.TRACKED for s in st)
    assert np.all((st & CS.STATE_MASK) != 0)


def _denier(seed):
    """A decide() that denies a pseudo-random half of the connections, by 5-tuple (so the
    same connection is denied whoever asks, whichever batch it is in)."""

    def decide_for(keys):
        def decide(rows):
            h = (
                keys.sport[rows].astype(np.int64) * 31
                + keys.dport[rows].astype(np.int64)
                + keys.src_lo[rows].astype(np.int64) % 1009
                + keys.proto[rows]
                + seed
            )
            return (h % 2) == 0

        return decide

    return decide_for


@pytest.mark.parametrize(
    "name", ["mixed_random", "mixed_random_s23", "tcp_timewait_reopen", "icmp_echo", "udp_generic"]
)
@pytest.mark.parametrize("size", [1, 2, 5, 64, 4096])
@pytest.mark.parametrize("seed", [0, 1])
def test_commit_on_allow_matches_the_reference_in_any_batching(name, size, seed):
    """With a policy in the loop, the table commits only what is allowed: its states agree
    with the reference tracker's (asked packet by packet) however the capture is cut."""
    batch = read_capture(VEC / f"{name}.pcap")
    keys = parse(batch)
    ok = checksum_ok(batch, keys)
    deny = _denier(seed)
    want = ReferenceConntrack().process(batch, keys, csum_ok=ok, decide=deny(keys))
    t = ConntrackTable(4096)
    got = []
    for s in range(0, len(batch), size):
        part = batch.slice(s, min(s + size, len(batch)))
        k = parse(part)
        got += list(t.process(part, k, decide=deny(k)))
    assert got == list(want)
    # the entries left are those the reference keeps: the allowed connections still open
    ref = ReferenceConntrack()
    ref.process(batch, keys, csum_ok=ok, decide=deny(keys))
    assert len(t) == len(ref.entries())
