"""The reader against libpcap: tcpdump's own test captures, and hand-made files for the link
types it accepts and the edge cases libpcap settles (the snap length and its 262144-byte limit,
unused pcapng interfaces, errors at the end of a file, files cut short), through the reader
and through `microseg parse`."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from scapy.all import IP, UDP, IPv6, raw

from microseg.cli import main
from microseg.errors import InputError
from microseg.io.pcap import (
    LINKTYPES,
    MAX_SNAPLEN,
    CaptureError,
    CaptureReader,
    TruncatedCaptureError,
    iter_capture,
    linktype_words,
    read_capture,
)
from microseg.packet.batch import (
    LINK_ETHERNET,
    LINK_LINUX_SLL,
    LINK_LINUX_SLL2,
    LINK_LOOP,
    LINK_NULL,
    LINK_RAW,
    addr_to_text,
)
from microseg.packet.parse import parse

D = Path(__file__).parent / "vectors" / "tcpdump"
EXPECTED = json.loads((D / "expected_libpcap.json").read_text())
needs_tcpdump = pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump is not installed")
needs_tshark = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")


def _digest(pkt: bytes) -> str:
    return hashlib.sha256(pkt).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# tcpdump's captures, as libpcap reads them
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tcpdump_capture_as_libpcap_reads_it(name):
    want = EXPECTED[name]
    lt = want["linktype"]
    if lt not in LINKTYPES:
        with pytest.raises(
            InputError,
            match=re.escape(linktype_words(lt)) + r" is not read by microseg \(it reads Ethernet.*; .*`",
        ):
            read_capture(D / name)
        return
    r = CaptureReader(D / name)
    b = r.read_all()
    assert b.linktype == LINKTYPES[lt]
    assert len(b) == len(want["packets"])
    beyond = 0
    for i, (ts, incl, orig, digest) in enumerate(want["packets"]):
        pkt = b.packet(i)
        assert _digest(pkt[:incl]) == digest, i
        assert int(b.ts[i]) == ts
        assert int(b.wire_len[i]) == max(orig, len(pkt))
        if len(pkt) > incl:  # libpcap kept the snap length's worth; we kept it all
            assert incl == want["snaplen"]
            beyond += 1
        else:
            assert len(pkt) == incl
    assert r.beyond_snaplen == beyond
    assert r.truncated is None


def test_corpus_covers_what_it_is_for():
    """The corpus has every accepted family, refused types, and records beyond the snap length."""
    kinds = {v["linktype"] for v in EXPECTED.values()}
    assert {0, 1, 101, 113, 228, 229} <= kinds
    assert len(kinds - set(LINKTYPES)) >= 5
    assert any(n.endswith(".pcapng") and EXPECTED[n]["linktype"] == 113 for n in EXPECTED)
    beyond = [
        n
        for n, v in EXPECTED.items()
        if v["linktype"] in LINKTYPES
        and any(len(read_capture(D / n).packet(i)) > p[1] for i, p in enumerate(v["packets"]))
    ]
    assert len(beyond) >= 4
    assert 30 <= len(EXPECTED) <= 70
    assert sum(f.stat().st_size for f in D.glob("*.pcap*")) < 4 << 20
    assert "BSD" in (D / "README.md").read_text()


@pytest.mark.parametrize(
    "name", sorted(n for n, v in EXPECTED.items() if v["linktype"] in LINKTYPES and v["packets"])
)
def test_tcpdump_capture_parses(name):
    """Every packet of every accepted link type goes through the parser; most of them are IP."""
    b = read_capture(D / name)
    keys = parse(b)
    assert keys.n == len(b)
    if EXPECTED[name]["linktype"] in (0, 113, 228, 229):
        assert int(np.count_nonzero(keys.ip_ver[: keys.n])) >= (keys.n + 1) // 2


# ---------------------------------------------------------------------------------------------
# hand-made captures of each accepted link type
# ---------------------------------------------------------------------------------------------
_IP4 = raw(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1000, dport=53) / b"hello")
_IP6 = raw(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=1000, dport=53) / b"hello")


def _sll(proto):
    return struct.pack(">HHH8sH", 0, 1, 6, bytes.fromhex("020000000001") + bytes(2), proto)


def _sll2(proto):
    return struct.pack(">HHIHBB8s", proto, 0, 2, 1, 0, 6, bytes.fromhex("020000000001") + bytes(2))


# link type, frame of the IPv4 packet, frame of the IPv6 packet, the batch's link type
LINK_CASES = [
    (0, struct.pack("<I", 2) + _IP4, struct.pack("<I", 24) + _IP6, LINK_NULL),
    (0, struct.pack(">I", 2) + _IP4, struct.pack(">I", 30) + _IP6, LINK_NULL),  # other order
    (108, struct.pack(">I", 2) + _IP4, struct.pack(">I", 24) + _IP6, LINK_LOOP),
    (113, _sll(0x0800) + _IP4, _sll(0x86DD) + _IP6, LINK_LINUX_SLL),
    (276, _sll2(0x0800) + _IP4, _sll2(0x86DD) + _IP6, LINK_LINUX_SLL2),
    (101, _IP4, _IP6, LINK_RAW),
    (12, _IP4, _IP6, LINK_RAW),
    (14, _IP4, _IP6, LINK_RAW),
    (228, _IP4, None, LINK_RAW),
    (229, None, _IP6, LINK_RAW),
    (
        1,
        bytes.fromhex("020000000002020000000001") + b"\x08\x00" + _IP4,
        bytes.fromhex("020000000002020000000001") + b"\x86\xdd" + _IP6,
        LINK_ETHERNET,
    ),
]


def _pcap(lt, frames, snaplen=65535, e="<"):
    return struct.pack(e + "IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, lt) + b"".join(
        struct.pack(e + "IIII", 1_700_000_000 + i, i, len(f), len(f)) + f for i, f in enumerate(frames)
    )


def _block(btype, body, e="<"):
    body += b"\0" * (-len(body) % 4)
    return struct.pack(e + "II", btype, 12 + len(body)) + body + struct.pack(e + "I", 12 + len(body))


def _shb(e="<"):
    return _block(0x0A0D0D0A, struct.pack(e + "IHHq", 0x1A2B3C4D, 1, 0, -1), e)


def _idb(lt, snap=0, e="<"):
    return _block(1, struct.pack(e + "HHI", lt, 0, snap), e)


def _epb(ifc, data, e="<", ts=0):
    return _block(6, struct.pack(e + "IIIII", ifc, ts >> 32, ts & 0xFFFFFFFF, len(data), len(data)) + data, e)


@pytest.mark.parametrize("lt,f4,f6,kind", LINK_CASES)
def test_each_accepted_link_type_is_read_and_parsed(tmp_path, lt, f4, f6, kind):
    frames = [f for f in (f4, f6) if f is not None]
    (tmp_path / "a.pcap").write_bytes(_pcap(lt, frames))
    (tmp_path / "a.pcapng").write_bytes(_shb() + _idb(lt) + b"".join(_epb(0, f) for f in frames))
    for name in ("a.pcap", "a.pcapng"):
        b = read_capture(tmp_path / name)
        assert b.linktype == kind and list(b.packets()) == frames
        keys = parse(b)
        got = [
            (addr_to_text(int(keys.src_hi[i]), int(keys.src_lo[i])), int(keys.dport[i]))
            for i in range(keys.n)
        ]
        want = [a for f, a in ((f4, ("10.0.0.1", 53)), (f6, ("2001:db8::1", 53))) if f]
        assert got == want


@needs_tshark
@pytest.mark.parametrize("lt,f4,f6,kind", [c for c in LINK_CASES if c[0] != 1])
def test_tshark_reads_the_link_types_as_we_do(tmp_path, lt, f4, f6, kind):
    frames = [f for f in (f4, f6) if f is not None]
    (tmp_path / "a.pcap").write_bytes(_pcap(lt, frames))
    out = subprocess.run(
        [
            "tshark",
            "-r",
            str(tmp_path / "a.pcap"),
            "-T",
            "fields",
            "-e",
            "ip.src",
            "-e",
            "ipv6.src",
            "-e",
            "udp.dstport",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    want = [a for f, a in ((f4, "10.0.0.1\t\t53"), (f6, "\t2001:db8::1\t53")) if f]
    assert out.splitlines() == want


@pytest.mark.parametrize(
    "lt,words",
    [(105, "IEEE 802.11"), (127, "IEEE 802.11 with radiotap"), (9, "PPP"), (113 + 1000, "unknown")],
)
def test_refusal_names_the_link_type_and_what_to_do(tmp_path, lt, words):
    (tmp_path / "w.pcap").write_bytes(_pcap(lt, [_IP4]))
    (tmp_path / "w.pcapng").write_bytes(_shb() + _idb(lt) + _epb(0, _IP4))
    for name in ("w.pcap", "w.pcapng"):
        with pytest.raises(
            InputError,
            match=rf"link type {lt} \({re.escape(words)}.*\) is not "
            r"read by microseg \(it reads .*\); .*(capture on|`editcap -T ether)",
        ):
            read_capture(tmp_path / name)


def test_fcs_bits_of_the_link_type_field_are_ignored(tmp_path):
    (tmp_path / "f.pcap").write_bytes(_pcap(0x30000000 | 101, [_IP4]))
    assert read_capture(tmp_path / "f.pcap").linktype == LINK_RAW


# ---------------------------------------------------------------------------------------------
# pcapng interfaces
# ---------------------------------------------------------------------------------------------
def test_unused_interfaces_of_any_link_type_are_ignored(tmp_path):
    eth = LINK_CASES[-1][1]
    opt_bad_res = struct.pack("<HHB3x", 9, 1, 0x7F) + struct.pack("<HH", 0, 0)
    data = (
        _shb()
        + _idb(105)
        + _idb(1)
        + _idb(4242)
        + _block(1, struct.pack("<HHI", 1, 0, 0) + opt_bad_res)
        + _epb(1, eth)
        + _epb(1, eth[:30])
    )
    (tmp_path / "u.pcapng").write_bytes(data)
    b = read_capture(tmp_path / "u.pcapng")
    assert b.linktype == LINK_ETHERNET and list(b.packets()) == [eth, eth[:30]]


def test_interfaces_of_one_family_mix(tmp_path):
    """Raw IP under 101, 228 and 229 is one link type for the batch."""
    data = _shb() + _idb(228) + _idb(229) + _idb(101) + _epb(0, _IP4) + _epb(1, _IP6) + _epb(2, _IP4)
    (tmp_path / "r.pcapng").write_bytes(data)
    b = read_capture(tmp_path / "r.pcapng")
    assert b.linktype == LINK_RAW and list(b.packets()) == [_IP4, _IP6, _IP4]


def test_interfaces_that_mix_link_types_stop_at_the_first_other_packet(tmp_path):
    eth = LINK_CASES[-1][1]
    head = _shb() + _idb(1) + _idb(113) + _epb(0, eth) + _epb(0, eth)
    data = head + _epb(1, _sll(0x0800) + _IP4) + _epb(0, eth)
    (tmp_path / "m.pcapng").write_bytes(data)
    msg = (
        rf"record 3 at byte {len(head)}: interface 1 is link type 113 \(Linux cooked v1\) but "
        r"the packets before it are link type 1 \(Ethernet\); microseg reads one link type "
        r"per capture: split it per interface first, e\.g\. `tshark -r IN -Y "
        r"'frame\.interface_id == 1' -w OUT` \(after 2 good packets\)"
    )
    with pytest.raises(CaptureError, match=msg) as ei:
        read_capture(tmp_path / "m.pcapng")
    assert list(ei.value.batch.packets()) == [eth, eth]
    got = []
    with pytest.raises(CaptureError, match=msg):
        for chunk in iter_capture(tmp_path / "m.pcapng", batch_size=64):
            got += list(chunk.packets())
    assert got == [eth, eth]


# ---------------------------------------------------------------------------------------------
# snap length, and the packets before an error
# ---------------------------------------------------------------------------------------------
@needs_tcpdump
def test_beyond_snaplen_against_libpcap(tmp_path):
    """libpcap reads a record longer than the snap length, keeping the snap length's worth; we
    keep it whole. Both agree on the packets, their order and their original lengths."""
    frames = [bytes(range(40)), bytes(range(100)), bytes(64), bytes(range(200, 0, -1))]
    (tmp_path / "s.pcap").write_bytes(_pcap(1, frames, snaplen=64))
    subprocess.run(
        ["tcpdump", "-r", str(tmp_path / "s.pcap"), "-w", str(tmp_path / "lp.pcap")],
        capture_output=True,
        check=True,
    )
    lp = read_capture(tmp_path / "lp.pcap")
    r = CaptureReader(tmp_path / "s.pcap")
    ours = r.read_all()
    assert list(ours.packets()) == frames
    assert [p[:64] for p in ours.packets()] == list(lp.packets())
    assert ours.wire_len.tolist() == lp.wire_len.tolist()
    assert (r.beyond_snaplen, r.first_beyond) == (2, 2)


@needs_tcpdump
@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_error_at_the_end_keeps_what_libpcap_keeps(tmp_path, fmt):
    """A record beyond 262144 bytes: libpcap fails there after the packets before it; so do we."""
    good = [LINK_CASES[-1][1], bytes(MAX_SNAPLEN), LINK_CASES[-1][2]]
    huge = bytes(MAX_SNAPLEN + 1)
    if fmt == "pcap":
        data = _pcap(1, good + [huge], snaplen=0)
    else:
        data = _shb() + _idb(1) + b"".join(_epb(0, f) for f in good + [huge])
    path = tmp_path / f"h.{fmt}"
    path.write_bytes(data)
    p = subprocess.run(
        ["tcpdump", "-r", str(path), "-w", str(tmp_path / "lp.pcap")], capture_output=True, text=True
    )
    assert p.returncode != 0 and "262145" in p.stderr
    libpcap = list(read_capture(tmp_path / "lp.pcap").packets())
    with pytest.raises(
        CaptureError,
        match=r"record 4 at byte \d+: captured length 262145 beyond "
        r"libpcap's limit of 262144 bytes \(after 3 good packets\)",
    ) as ei:
        read_capture(path)
    assert list(ei.value.batch.packets()) == libpcap == good


def test_errors_in_the_middle_of_a_pcapng_keep_the_packets_before(tmp_path):
    eth = LINK_CASES[-1][1]
    good = _shb() + _idb(1) + _epb(0, eth) + _epb(0, eth[:20])
    cases = {
        "bad block length": (good + struct.pack("<II", 6, 13) + bytes(8), "malformed block length"),
        "bad interface block": (good + _block(1, b"\x01\x00"), "interface block at byte"),
        "bad timestamp": (
            good
            + _block(
                1,
                struct.pack("<HHI", 1, 0, 0)
                + struct.pack("<HHB3x", 9, 1, 0)
                + struct.pack("<HHq", 14, 8, 2**62)
                + bytes(4),
            )
            + _epb(1, eth, ts=2**63),
            "interface 1: timestamp out of range",
        ),
        "unknown interface": (good + _epb(7, eth), "no interface description block"),
    }
    for what, (data, msg) in cases.items():
        (tmp_path / "e.pcapng").write_bytes(data)
        with pytest.raises(CaptureError, match=msg) as ei:
            read_capture(tmp_path / "e.pcapng")
        assert list(ei.value.batch.packets()) == [eth, eth[:20]], what
        assert "after 2 good packets" in str(ei.value), what


def test_lenient_reads_a_truncated_capture_and_warns(tmp_path):
    frames = [LINK_CASES[-1][1]] * 3
    data = _pcap(1, frames)
    (tmp_path / "t.pcap").write_bytes(data[:-10])
    with pytest.raises(TruncatedCaptureError, match="2 complete packets"):
        read_capture(tmp_path / "t.pcap")
    seen = []
    b = read_capture(tmp_path / "t.pcap", lenient=True, warn=seen.append)
    assert list(b.packets()) == frames[:2]
    assert seen == [
        f"{tmp_path / 't.pcap'}: file cut short inside record 3 at byte "
        f"{len(data) - 16 - len(frames[2])}; 2 complete packets read"
    ]
    assert sum(len(x) for x in iter_capture(tmp_path / "t.pcap", 1, lenient=True, warn=seen.append)) == 2
    assert len(seen) == 2


def test_lenient_default_warning_goes_to_stderr(tmp_path, capsys):
    data = _pcap(1, [LINK_CASES[-1][1]] * 2)
    (tmp_path / "t.pcap").write_bytes(data[:-3])
    assert len(read_capture(tmp_path / "t.pcap", lenient=True)) == 1
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "file cut short inside record 2" in err
    assert err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# `microseg parse`: packets before an error printed, --lenient
# ---------------------------------------------------------------------------------------------
def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("mode", [[], ["--json"], ["--flows"], ["--flows", "--json"]])
def test_parse_prints_the_packets_before_an_error(tmp_path, capsys, mode):
    eth = LINK_CASES[-1][1]
    path = tmp_path / "h.pcap"
    path.write_bytes(
        _pcap(1, [eth, LINK_CASES[-1][2], eth])
        + struct.pack("<IIII", 0, 0, MAX_SNAPLEN + 1, MAX_SNAPLEN + 1)
        + bytes(MAX_SNAPLEN + 1)
    )
    rc, out, err = _run(["parse", *mode, str(path)], capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("microseg parse: error: ")
    assert "record 4" in err and "after 3 good packets" in err
    if mode == ["--json"]:
        assert [json.loads(x)["src"] for x in out.splitlines()] == ["10.0.0.1", "2001:db8::1", "10.0.0.1"]
    elif mode == []:
        assert "3 packets" in out and out.count("10.0.0.1") == 2
    elif mode == ["--flows", "--json"]:
        assert sum(json.loads(x)["packets"] for x in out.splitlines()) == 3
    else:
        assert "2 flows, 3 packets" in out


def test_parse_lenient(tmp_path, capsys):
    eth = LINK_CASES[-1][1]
    path = tmp_path / "t.pcap"
    path.write_bytes(_pcap(1, [eth, eth, eth])[:-5])
    rc, out, err = _run(["parse", "--json", str(path)], capsys)
    assert rc == 2 and len(out.splitlines()) == 2
    assert err.count("\n") == 1 and "2 complete packets read (--lenient prints them" in err
    rc, out, err = _run(["parse", "--json", "--lenient", str(path)], capsys)
    assert rc == 0 and len(out.splitlines()) == 2
    assert err == (
        f"microseg parse: warning: {path}: file cut short inside record 3 at byte "
        f"{24 + 2 * (16 + len(eth))}; 2 complete packets read\n"
    )


def test_parse_flags_records_beyond_the_snap_length(tmp_path, capsys):
    path = tmp_path / "s.pcap"
    eth = LINK_CASES[-1][1]
    path.write_bytes(_pcap(1, [eth, eth[:20]], snaplen=40))
    rc, out, err = _run(["parse", "--json", str(path)], capsys)
    assert rc == 0 and len(out.splitlines()) == 2
    assert err == (
        f"microseg parse: warning: {path}: 1 record longer than the snap length 40, "
        "read in full (first: record 1)\n"
    )


def test_parse_refuses_a_link_type_in_words(tmp_path, capsys):
    path = tmp_path / "w.pcap"
    path.write_bytes(_pcap(105, [_IP4]))
    rc, out, err = _run(["parse", str(path)], capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1
    assert "link type 105 (IEEE 802.11) is not read by microseg" in err
