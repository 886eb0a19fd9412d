"""Our reader against tshark's reading of captures written by tcpdump, editcap, mergecap."""

import json
from pathlib import Path

import pytest

from microseg.errors import InputError
from microseg.io.pcap import CaptureError, iter_capture, read_capture
from microseg.packet.batch import LINK_ETHERNET, LINK_RAW

D = Path(__file__).parent / "vectors" / "captures"
EXPECTED = json.loads((D / "expected_tshark.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_matches_tshark(name):
    want = EXPECTED[name]
    b = read_capture(D / name)
    assert len(b) == len(want)
    assert [p.hex() for p in b.packets()] == [w["hex"] for w in want]
    assert b.ts.tolist() == [w["ts_ns"] for w in want]
    assert b.length.tolist() == [w["cap_len"] for w in want]
    assert b.wire_len.tolist() == [w["len"] for w in want]
    assert b.linktype == (LINK_RAW if name.startswith("raw") else LINK_ETHERNET)
    got = [p.hex() for chunk in iter_capture(D / name, batch_size=5) for p in chunk.packets()]
    assert got == [w["hex"] for w in want]


def test_mixed_linktypes_refused_after_the_packets_of_the_first():
    """mergecap put Ethernet packets (interface 0) before raw IP ones (interface 1): the first
    are read, the file stops at the first raw IP packet with a message that says what to do."""
    want = EXPECTED["src.pcap"]
    with pytest.raises(
        CaptureError,
        match=r"interface 1 is link type 101 \(raw IP\) but the "
        r"packets before it are link type 1 \(Ethernet\); .*split it per "
        r"interface first",
    ) as ei:
        read_capture(D / "mixed.pcapng")
    b = ei.value.batch
    assert b.linktype == LINK_ETHERNET and len(b) >= 1
    assert [p.hex() for p in b.packets()] == [w["hex"] for w in want[: len(b)]]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_cut_is_clean(name, tmp_path):
    """Any prefix of a good capture gives the complete packets or a clear InputError."""
    raw = (D / name).read_bytes()
    want = [w["hex"] for w in EXPECTED[name]]
    path = tmp_path / "cut"
    for cut in range(0, len(raw), 7):
        path.write_bytes(raw[:cut])
        try:
            b = read_capture(path)
        except InputError:
            continue
        got = [p.hex() for p in b.packets()]
        assert got == want[: len(got)]


def test_corrupted_files_never_crash(tmp_path):
    """Random byte flips in real captures: a batch or an InputError, nothing else."""
    import numpy as np

    rng = np.random.default_rng(7)
    path = tmp_path / "bad"
    for name in ("src.pcap", "tshark.pcapng", "be.pcapng", "sections.pcapng", "nsec.pcap"):
        raw = np.frombuffer((D / name).read_bytes(), np.uint8)
        for _ in range(150):
            mut = raw.copy()
            k = rng.integers(1, 4)
            pos = rng.integers(0, min(len(raw), 200), size=k)
            mut[pos] = rng.integers(0, 256, size=k)
            path.write_bytes(mut.tobytes())
            try:
                b = read_capture(path)
            except InputError:
                continue
            assert int(b.length.sum()) == b.data.shape[0]
            assert (b.wire_len >= b.length).all()


def test_compiled_walk_equals_reference_on_damaged_pcaps(tmp_path):
    """The compiled record walk against the one-record-at-a-time reference, byte flips and cuts."""
    import numpy as np

    from microseg.io.pcap import TruncatedCaptureError, read_pcap_ref

    rng = np.random.default_rng(11)
    path = tmp_path / "d.pcap"
    for name in ("src.pcap", "nsec.pcap", "snap60.pcap", "raw.pcap"):
        raw = np.frombuffer((D / name).read_bytes(), np.uint8)
        for _ in range(120):
            mut = raw.copy()
            k = rng.integers(0, 4)
            pos = rng.integers(0, len(raw), size=k)
            mut[pos] = rng.integers(0, 256, size=k)
            data = mut[: rng.integers(24, len(raw) + 1)].tobytes()
            path.write_bytes(data)
            try:
                lt, recs, status = read_pcap_ref(data)
            except InputError:
                with pytest.raises(InputError):
                    read_capture(path)
                continue
            try:
                b = read_capture(path)
                assert status is None
            except TruncatedCaptureError as exc:
                assert status == "truncated"
                b = exc.batch
            except CaptureError as exc:  # the packets before the error come with it
                assert status in ("caplen", "wirelen")
                b = exc.batch
            assert b.linktype == lt
            assert [(int(t), int(w), p) for t, w, p in zip(b.ts, b.wire_len, b.packets())] == recs
