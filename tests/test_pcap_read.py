"""pcap / pcapng reading and writing, checked against scapy and dpkt as independent peers."""

import struct

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Ether, IPv6, PcapNgWriter, Raw, rdpcap, wrpcap

from microseg.errors import InputError
from microseg.io.pcap import (
    MAX_SNAPLEN,
    CaptureError,
    CaptureReader,
    PcapWriter,
    TruncatedCaptureError,
    iter_capture,
    read_capture,
    write_pcap,
)
from microseg.packet.batch import LINK_ETHERNET, LINK_RAW, Batch


def _pkts(n=40):
    out = []
    for i in range(n):
        if i % 3 == 0:
            p = (
                Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                / IPv6(src="2001:db8::1", dst="2001:db8::2")
                / UDP(sport=i, dport=53)
            )
        else:
            p = (
                Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
                / IP(src=f"10.0.0.{i}", dst="10.0.1.1")
                / TCP(sport=1000 + i, dport=80)
            )
        p = p / Raw(b"x" * (i * 7 % 300))
        p.time = 1_700_000_000 + i * 0.25 + 0.000123
        out.append(p)
    return out


def _ns(p):
    return int(round(float(p.time) * 1e6)) * 1000


def test_read_scapy_pcap(tmp_path):
    pkts = _pkts()
    wrpcap(str(tmp_path / "a.pcap"), pkts)
    b = read_capture(tmp_path / "a.pcap")
    assert len(b) == len(pkts)
    assert list(b.packets()) == [bytes(p) for p in pkts]
    assert b.ts.tolist() == [_ns(p) for p in pkts]
    assert b.linktype == LINK_ETHERNET
    assert (b.wire_len == b.length).all()
    assert b.data.flags["C_CONTIGUOUS"] and b.data.dtype == np.uint8


def test_read_scapy_pcapng(tmp_path):
    pkts = _pkts()
    with PcapNgWriter(str(tmp_path / "a.pcapng")) as w:
        for p in pkts:
            w.write(p)
    b = read_capture(tmp_path / "a.pcapng")
    assert list(b.packets()) == [bytes(p) for p in pkts]
    assert b.ts.tolist() == [_ns(p) for p in pkts]


def test_write_read_back_by_scapy_and_dpkt(tmp_path):
    import dpkt

    pkts = _pkts()
    ts = [1_700_000_000_123_456_789 + i * 1001 for i in range(len(pkts))]
    b = Batch.from_packets([bytes(p) for p in pkts], ts=ts)
    for ns in (False, True):
        path = tmp_path / f"w{ns}.pcap"
        write_pcap(path, b, nanosecond=ns)
        got = rdpcap(str(path))
        assert [bytes(p) for p in got] == list(b.packets())
        with open(path, "rb") as f:
            rd = dpkt.pcap.Reader(f)
            recs = list(rd)
        assert [bytes(buf) for _, buf in recs] == list(b.packets())
        back = read_capture(path)
        want = np.array(ts) if ns else np.array(ts) // 1000 * 1000
        assert back.ts.tolist() == want.tolist()
        assert list(back.packets()) == list(b.packets())


def test_streaming_writer_and_iter(tmp_path):
    pkts = [bytes(p) for p in _pkts(100)]
    b = Batch.from_packets(pkts, ts=np.arange(100) * 10**9)
    with PcapWriter(tmp_path / "s.pcap") as w:
        for chunk in b.chunks(17):
            w.write(chunk)
    assert w.count == 100
    sizes = [len(x) for x in iter_capture(tmp_path / "s.pcap", batch_size=32)]
    assert sizes == [32, 32, 32, 4]
    got = [p for x in iter_capture(tmp_path / "s.pcap", batch_size=32) for p in x.packets()]
    assert got == pkts


def test_raw_ip_linktype(tmp_path):
    pkts = [IP(dst="1.2.3.4") / UDP() for _ in range(3)]
    wrpcap(str(tmp_path / "r.pcap"), pkts, linktype=101)
    b = read_capture(tmp_path / "r.pcap")
    assert b.linktype == LINK_RAW and list(b.packets()) == [bytes(p) for p in pkts]
    write_pcap(tmp_path / "r2.pcap", b)
    assert [bytes(p) for p in rdpcap(str(tmp_path / "r2.pcap"))] == [bytes(p) for p in pkts]


def test_big_endian_pcap(tmp_path):
    pkts = [bytes(p) for p in _pkts(5)]
    hdr = struct.pack(">IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 65535, 1)
    recs = b"".join(
        struct.pack(">IIII", 100 + i, 999_999_999 - i, len(p), len(p) + 4) + p for i, p in enumerate(pkts)
    )
    (tmp_path / "be.pcap").write_bytes(hdr + recs)
    b = read_capture(tmp_path / "be.pcap")
    assert list(b.packets()) == pkts
    assert b.ts.tolist() == [(100 + i) * 10**9 + 999_999_999 - i for i in range(5)]
    assert (b.wire_len == b.length + 4).all()


@pytest.mark.parametrize(
    "content,msg",
    [
        (b"", "empty"),
        (b"\xd4\xc3", "too short"),
        (b"hello world, this is not a capture file at all", "not a pcap"),
        (struct.pack("<IHH", 0xA1B2C3D4, 2, 4), "header cut short"),
    ],
)
def test_not_a_capture(tmp_path, content, msg):
    (tmp_path / "x").write_bytes(content)
    with pytest.raises(InputError, match=msg):
        read_capture(tmp_path / "x")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        read_capture(tmp_path / "nope.pcap")
    with pytest.raises(InputError, match="directory"):
        read_capture(tmp_path)


def test_truncated_last_record(tmp_path):
    pkts = _pkts(10)
    wrpcap(str(tmp_path / "t.pcap"), pkts)
    raw = (tmp_path / "t.pcap").read_bytes()
    for cut in (5, 20):  # inside the record data, inside the record header
        path = tmp_path / f"cut{cut}.pcap"
        last = len(bytes(pkts[-1]))
        path.write_bytes(raw[: len(raw) - last - 16 + cut])
        with pytest.raises(TruncatedCaptureError, match="9 complete packets") as ei:
            read_capture(path)
        assert len(ei.value.batch) == 9
        assert isinstance(ei.value, InputError)
        b = read_capture(path, allow_truncated=True)
        assert list(b.packets()) == [bytes(p) for p in pkts[:9]]
        with pytest.raises(TruncatedCaptureError):
            list(iter_capture(path, 4))
        assert sum(len(x) for x in iter_capture(path, 4, allow_truncated=True)) == 9


def test_record_beyond_snaplen_is_read_in_full_and_flagged(tmp_path):
    """As libpcap, a record longer than the file's snap length is read, not refused (whole,
    as Wireshark keeps it; libpcap keeps the snap length's worth)."""
    hdr = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 64, 1)
    recs = [bytes(range(60)), bytes(100), bytes(range(64)), b"\xff" * 70]
    raw = hdr + b"".join(struct.pack("<IIII", 0, 0, len(p), len(p)) + p for p in recs)
    (tmp_path / "s.pcap").write_bytes(raw)
    seen = []
    b = read_capture(tmp_path / "s.pcap", warn=seen.append)
    assert list(b.packets()) == recs
    assert seen == [
        f"{tmp_path / 's.pcap'}: 2 records longer than the snap length 64, read in full (first: record 2)"
    ]
    with CaptureReader(tmp_path / "s.pcap") as r:
        assert sum(len(x) for x in r.batches(3)) == 4
        assert (r.beyond_snaplen, r.first_beyond) == (2, 2)
    assert read_capture(tmp_path / "s.pcap").length.tolist() == [60, 100, 64, 70]  # silent


def test_record_beyond_libpcap_limit_keeps_the_packets_before(tmp_path):
    hdr = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 0, 1)
    ok = [bytes(60), bytes(range(200)), bytes(MAX_SNAPLEN)]
    raw = hdr + b"".join(struct.pack("<IIII", 0, 0, len(p), len(p)) + p for p in ok)
    bad_at = len(raw)
    raw += struct.pack("<IIII", 0, 0, MAX_SNAPLEN + 1, MAX_SNAPLEN + 1) + bytes(MAX_SNAPLEN + 1)
    (tmp_path / "h.pcap").write_bytes(raw)
    with pytest.raises(
        CaptureError,
        match=f"record 4 at byte {bad_at}: captured length 262145 "
        r"beyond libpcap's limit of 262144 bytes \(after 3 good packets\)",
    ) as ei:
        read_capture(tmp_path / "h.pcap")
    assert list(ei.value.batch.packets()) == ok and ei.value.n_read == 3
    got = []
    with pytest.raises(CaptureError, match="record 4"):
        for chunk in iter_capture(tmp_path / "h.pcap", batch_size=2):
            got += list(chunk.packets())
    assert got == ok


def test_unsupported_linktype(tmp_path):
    hdr = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 105)
    (tmp_path / "w.pcap").write_bytes(hdr)
    with pytest.raises(
        InputError,
        match=r"link type 105 \(IEEE 802.11\) is not read by "
        r"microseg .*capture on the wired side",
    ):
        read_capture(tmp_path / "w.pcap")
    (tmp_path / "p.pcap").write_bytes(hdr[:20] + struct.pack("<I", 9))
    with pytest.raises(InputError, match=r"link type 9 \(PPP\) .*`editcap -T ether IN OUT`"):
        read_capture(tmp_path / "p.pcap")


def test_empty_capture_has_no_packets(tmp_path):
    write_pcap(tmp_path / "e.pcap", Batch.from_packets([]))
    b = read_capture(tmp_path / "e.pcap")
    assert len(b) == 0 and b.data.shape == (0,)


def _block(btype, body, e="<"):
    body += b"\0" * (-len(body) % 4)
    return struct.pack(e + "II", btype, 12 + len(body)) + body + struct.pack(e + "I", 12 + len(body))


_SHB = _block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))


def _idb(lt=1, snap=0):
    return _block(1, struct.pack("<HHI", lt, 0, snap))


def _epb(ifc, data, caplen=None):
    return _block(
        6, struct.pack("<IIIII", ifc, 0, 0, len(data) if caplen is None else caplen, len(data)) + data
    )


@pytest.mark.parametrize(
    "content,msg",
    [
        (_SHB + _epb(0, bytes(60)), "no interface description"),
        (_SHB + _idb() + _epb(1, bytes(60)), "no interface description"),
        (_SHB + _idb() + _epb(0, bytes(60), caplen=200), "runs past its block"),
        (_SHB + _idb() + _epb(0, bytes(60))[:-4] + b"\x01\x02\x03\x04", "trailing block length"),
        (_SHB + _idb() + struct.pack("<II", 6, 13) + bytes(8), "block length"),
        (_SHB + _idb(lt=105) + _epb(0, bytes(60)), r"link type 105 \(IEEE 802.11\) is not read"),
        (_SHB[:8] + b"\x11\x22\x33\x44" + _SHB[12:], "byte-order magic"),
        (
            _SHB + _idb() + _idb(lt=101) + _epb(0, bytes(60)) + _epb(1, bytes(20)),
            r"interface 1 is link type 101 \(raw IP\) but the packets before it are link type 1 "
            r"\(Ethernet\); microseg reads one link type per capture",
        ),
    ],
)
def test_pcapng_malformed(tmp_path, content, msg):
    (tmp_path / "x.pcapng").write_bytes(content)
    with pytest.raises(InputError, match=msg):
        read_capture(tmp_path / "x.pcapng")


def test_pcapng_defaults_and_skips(tmp_path):
    """No if_tsresol means microseconds; unknown blocks between packets are skipped."""
    body = struct.pack("<IIIII", 0, 0x18B, 0xCD0C3F40, 4, 4) + b"abcd"
    data = _SHB + _idb() + _block(6, body) + _block(0x99, b"????") + _epb(0, b"efgh")
    (tmp_path / "d.pcapng").write_bytes(data)
    b = read_capture(tmp_path / "d.pcapng")
    assert list(b.packets()) == [b"abcd", b"efgh"]
    assert b.ts[0] == ((0x18B << 32) | 0xCD0C3F40) * 1000


def test_pcapng_record_beyond_interface_snaplen(tmp_path):
    """An EPB longer than its interface's snap length is read and flagged; an SPB is cut to
    the snap length, as the format defines it."""
    spb = _block(3, struct.pack("<I", 60) + bytes(range(60)))
    data = _SHB + _idb(snap=32) + _epb(0, bytes(range(50))) + _epb(0, bytes(20)) + spb
    (tmp_path / "s.pcapng").write_bytes(data)
    seen = []
    r = CaptureReader(tmp_path / "s.pcapng", warn=seen.append)
    b = r.read_all()
    assert list(b.packets()) == [bytes(range(50)), bytes(20), bytes(range(32))]
    assert b.wire_len.tolist() == [50, 20, 60]
    assert (r.beyond_snaplen, r.first_beyond) == (1, 1)
    assert seen == [
        f"{tmp_path / 's.pcapng'}: 1 record longer than the snap length 32, read in full (first: record 1)"
    ]


def test_pcapng_cut_inside_a_block_header_block(tmp_path):
    """A file cut inside an interface block after some packets: the packets, then the cut."""
    data = _SHB + _idb() + _epb(0, b"abcd") + _idb()
    (tmp_path / "c.pcapng").write_bytes(data[:-6])
    with pytest.raises(TruncatedCaptureError, match="1 complete packets read") as ei:
        read_capture(tmp_path / "c.pcapng")
    assert list(ei.value.batch.packets()) == [b"abcd"]
    assert list(read_capture(tmp_path / "c.pcapng", lenient=True, warn=lambda m: None).packets()) == [b"abcd"]
