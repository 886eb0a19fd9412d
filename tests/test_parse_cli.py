"""`microseg parse`: --json agrees with scapy's dissection of multi-protocol captures (tunnels,
VLANs, IPv6 extension headers, ICMP errors, ARP, fragments); --flows and the table; bad input."""

from __future__ import annotations

import json
import os

import pytest
from scapy.contrib.geneve import GENEVE
from scapy.layers.inet import GRE, ICMP, IP, TCP, UDP, IPerror
from scapy.layers.inet6 import IPerror6, IPv6, _ICMPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.layers.sctp import SCTP
from scapy.layers.vxlan import VXLAN
from scapy.utils import wrpcap

from microseg.cli import main
from microseg.packet.parse_ref import parse_packet_ref
from test_parse_corpus import templates

VECTORS = os.path.join(os.path.dirname(__file__), "vectors")


def scapy_view(raw: bytes, linktype: int = 1) -> dict:
    """What scapy says about the innermost packet: the fields `parse --json` prints."""
    pkt = Ether(raw) if linktype == 1 else (IPv6(raw) if raw[0] >> 4 == 6 else IP(raw))
    out = dict(
        tenant=None, src=None, dst=None, proto=None, sport=None, dport=None, icmp_type=None, icmp_code=None
    )
    layer = pkt
    tags = 0
    fragment = False
    while layer is not None and layer.__class__.__name__ not in ("Raw", "Padding", "NoPayload"):
        if isinstance(layer, (IPerror, IPerror6)):
            break  # the header an ICMP error quotes
        if isinstance(layer, Dot1Q):  # Dot1AD is a Dot1Q
            tags += 1
            if tags > 2:
                break  # documented limit: two VLAN tags
        if isinstance(layer, Ether):
            tags = 0
        if isinstance(layer, (VXLAN, GENEVE)):
            if out["dport"] not in (4789, 6081) or fragment:
                break  # scapy also binds on the source port
            out = dict.fromkeys(out) | {"tenant": layer.vni}
        elif isinstance(layer, GRE):
            if fragment or not (
                (layer.proto == 0x6558 and layer.key_present)
                or (layer.proto in (0x0800, 0x86DD) and out["tenant"] is None)
            ):
                break  # NVGRE and GRE carrying IP are followed
            vni = layer.key >> 8 if layer.proto == 0x6558 else out["tenant"]
            out = dict.fromkeys(out) | {"tenant": vni}
        elif isinstance(layer, ARP):
            if layer.ptype != 0x0800 or layer.plen != 4:
                break
            out.update(src=layer.psrc, dst=layer.pdst)
        elif type(layer) in (IP, IPv6):
            if out["proto"] is not None:  # IP in IP: a tunnel, the inner one counts
                if fragment or out["tenant"] is not None:
                    break  # ... unless it is a tenant's own packet
                out = dict.fromkeys(out) | {"tenant": out["tenant"]}
            if type(layer) is IP:
                out.update(src=layer.src, dst=layer.dst, proto=layer.proto)
                fragment = bool(layer.frag or layer.flags.MF)
            else:
                out.update(src=layer.src, dst=layer.dst, proto=layer.nh)
                fragment = False
        elif type(layer) in (TCP, UDP, SCTP):
            out.update(sport=layer.sport, dport=layer.dport)
        elif type(layer) is ICMP or isinstance(layer, _ICMPv6):
            out.update(icmp_type=layer.type, icmp_code=layer.code)
        elif hasattr(layer, "nh") and out["proto"] is not None:
            out["proto"] = layer.nh  # an IPv6 extension header: next one
        layer = layer.payload if layer.payload else None
    return out


def _run(capsys, *argv):
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    pk = [p for p, lt in templates(seed=11, rounds=2) if lt == 1]
    path = tmp_path_factory.mktemp("parse") / "mixed.pcap"
    wrpcap(str(path), [Ether(p) for p in pk])
    return str(path), pk


def test_json_agrees_with_scapy(capsys, capture):
    path, pk = capture
    code, out, err = _run(capsys, "parse", path, "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == len(pk)
    for raw, row in zip(pk, rows):
        want = scapy_view(raw)
        got = {k: row[k] for k in want}
        if row["error"] is None:
            assert got == want, Ether(raw).summary()
        else:  # the two deliberate errors (hop-by-hop not first, 3 nested tunnels)
            assert row["error"] in ("bad_ipv6_ext", "tunnel_depth")
    assert row.keys() == {
        "tenant",
        "src",
        "dst",
        "proto",
        "sport",
        "dport",
        "icmp_type",
        "icmp_code",
        "error",
        "tunnel",
        "inner_not_followed",
        "truncated",
        "arp_op",
        "arp_sha",
        "arp_tha",
    }


def _json_rows(capsys, path):
    code, out, err = _run(capsys, "parse", str(path), "--json")
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_json_tunnels_followed_and_not(capsys, tmp_path):
    from scapy.layers.inet6 import IPv6 as V6

    inner = IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1000, dport=443)
    e = Ether(dst="02:00:00:00:00:01")
    outer = IP(src="192.0.2.1", dst="192.0.2.2")
    pk = [
        e / outer / inner,  # IP in IP
        e / V6(src="2001:db8::1", dst="2001:db8::2") / GRE(proto=0x0800) / inner,
        e / outer / GRE(proto=0x88BE, seqnum_present=1) / bytes.fromhex("100100640000000a") / e / inner,
        e / outer / UDP(sport=5000, dport=6635) / bytes.fromhex("000641ff") / inner,
        e / outer / UDP(sport=5000, dport=4790) / bytes.fromhex("0c00000100001200") / inner,
        e / outer / UDP(sport=5000, dport=4789) / VXLAN(vni=9) / e / outer / inner,
        e / inner,
    ]
    path = tmp_path / "tun.pcap"
    wrpcap(str(path), pk)
    rows = _json_rows(capsys, path)
    got = [(r["tunnel"], r["inner_not_followed"], r["src"], r["tenant"]) for r in rows]
    assert got == [
        ("ipip", False, "10.0.0.1", None),
        ("gre", False, "10.0.0.1", None),
        ("erspan", True, "192.0.2.1", None),
        ("mpls", True, "192.0.2.1", None),
        ("vxlan-gpe", True, "192.0.2.1", None),
        ("ipip", True, "192.0.2.1", 9),  # a tenant's own IP in IP: not opened
        (None, False, "10.0.0.1", None),
    ]
    assert all(r["error"] is None and r["truncated"] is False for r in rows)
    assert rows[2]["proto"] == 47 and rows[3]["dport"] == 6635
    code, out, _ = _run(capsys, "parse", str(path))
    assert code == 0
    assert "erspan (inner not followed)" in out and "vxlan-gpe (inner not followed)" in out
    assert "ipip" in out and " gre " in out


def test_json_arp_fields_null_when_unreadable(capsys, tmp_path):
    e = Ether(dst="ff:ff:ff:ff:ff:ff", src="02:00:00:00:00:05")
    pk = [
        e / ARP(op=1, hwsrc="02:00:00:00:00:05", psrc="10.0.0.5", pdst="10.0.0.6"),
        e
        / ARP(
            hwtype=32,
            hwlen=20,
            op=2,
            hwsrc=b"\x01" * 20,
            hwdst=b"\x02" * 20,
            psrc="10.0.0.7",
            pdst="10.0.0.8",
        ),  # IP over InfiniBand
        e / ARP(ptype=0x86DD, plen=16, op=1, psrc="2001:db8::1", pdst="2001:db8::2"),
        Ether(dst="ff:ff:ff:ff:ff:ff", type=0x0806) / bytes(ARP(op=2))[:6],
    ]  # cut inside the op
    path = tmp_path / "arp.pcap"
    wrpcap(str(path), pk)
    rows = _json_rows(capsys, path)
    pick = [(r["arp_op"], r["arp_sha"], r["arp_tha"], r["src"], r["dst"], r["error"]) for r in rows]
    assert pick[0] == (1, "02:00:00:00:00:05", "00:00:00:00:00:00", "10.0.0.5", "10.0.0.6", None)
    assert pick[1] == (2, None, None, "10.0.0.7", "10.0.0.8", None)
    assert pick[2] == (1, None, None, None, None, "bad_arp")
    assert pick[3] == (None, None, None, None, None, "trunc_arp")
    for r in rows[1:]:
        assert "::" not in (r["src"], r["dst"]) and r["arp_sha"] != "00:00:00:00:00:00"
    code, out, _ = _run(capsys, "parse", str(path), "--flows", "--json")
    flows = [json.loads(line) for line in out.splitlines()]
    assert "::" not in {f["src"] for f in flows} | {f["dst"] for f in flows}


def test_json_and_table_say_truncated(capsys, tmp_path):
    from scapy.utils import PcapWriter

    full = (
        Ether(dst="02:00:00:00:00:01")
        / IP(src="10.0.0.1", dst="10.0.0.2")
        / TCP(sport=7, dport=8)
        / (b"x" * 200)
    )
    path = tmp_path / "snap.pcap"
    w = PcapWriter(str(path))
    w.write(full)
    w.close()
    raw = path.read_bytes()  # rewrite the record as a 96-byte snap of the frame
    hdr = bytearray(raw[24:40])
    hdr[8:12] = (96).to_bytes(4, "little")
    path.write_bytes(raw[:24] + bytes(hdr) + raw[40 : 40 + 96])
    (row,) = _json_rows(capsys, path)
    assert row["truncated"] is True and row["error"] is None and row["dport"] == 8
    code, out, _ = _run(capsys, "parse", str(path))
    assert "truncated" in out


def test_json_on_linux_conntrack_and_esp_vectors(capsys):
    for name in (
        "conntrack/icmp_error_related.pcap",
        "conntrack/v6_icmp.pcap",
        "conntrack/mixed_random.pcap",
        "ipsec/esp.pcap",
    ):
        path = os.path.join(VECTORS, name)
        code, out, err = _run(capsys, "parse", path, "--json")
        assert code == 0, err
        from microseg.io.pcap import read_capture

        batch = read_capture(path)
        rows = [json.loads(line) for line in out.splitlines()]
        assert len(rows) == len(batch)
        for i, row in enumerate(rows):
            want = scapy_view(batch.packet(i))
            if row["error"] in ("bad_tunnel", "trunc_tunnel"):
                # UDP to port 4789 that is not VXLAN: we keep the outer packet, scapy's VXLAN
                # dissector still names a VNI; compare the rest
                want["tenant"] = None
                want.update(
                    src=row["src"],
                    dst=row["dst"],
                    proto=17,
                    sport=row["sport"],
                    dport=4789,
                    icmp_type=None,
                    icmp_code=None,
                )
            got = {k: row[k] for k in want}
            assert got == want, (name, i)


def test_errors_reported_by_name(capsys, tmp_path):
    good = bytes(Ether(dst="02:00:00:00:00:01") / IP(src="10.0.0.1", dst="10.0.0.2") / TCP())
    bad_csum = bytearray(good)
    bad_csum[24] ^= 0xFF
    pk = [good, good[:30], bytes(bad_csum), good[: 14 + 20 + 10]]
    path = tmp_path / "bad.pcap"
    wrpcap(str(path), [Ether(p) for p in pk])
    code, out, _ = _run(capsys, "parse", str(path), "--json")
    assert code == 0
    errs = [json.loads(line)["error"] for line in out.splitlines()]
    assert errs == [None, "trunc_ipv4", "bad_ipv4_checksum", "bad_ipv4_len"]
    assert errs == [None if parse_packet_ref(p)["error"] == 0 else e for p, e in zip(pk, errs)]


def test_table_output(capsys, capture):
    path, pk = capture
    code, out, _ = _run(capsys, "parse", path)
    assert code == 0
    assert f"{len(pk)} packets" in out
    assert "vxlan" in out and "geneve" in out and "nvgre" in out and "arp" in out
    assert "tunnel_depth 2" in out  # summary line counts errors by reason


def test_flows(capsys, tmp_path):
    a = Ether(dst="02:00:00:00:00:01") / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1000, dport=443)
    b = Ether(dst="02:00:00:00:00:01") / IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=443, dport=1000)
    t = (
        Ether(dst="02:00:00:00:00:01")
        / IP(src="192.0.2.1", dst="192.0.2.2")
        / UDP(sport=5, dport=4789)
        / VXLAN(vni=7)
        / a
    )
    pk = [a, a / b"x" * 1, b, t, t, t]
    path = tmp_path / "flows.pcap"
    wrpcap(str(path), pk)
    code, out, _ = _run(capsys, "parse", str(path), "--flows", "--json")
    assert code == 0
    flows = [json.loads(line) for line in out.splitlines()]
    assert flows[0] == {
        "tenant": 7,
        "src": "10.0.0.1",
        "dst": "10.0.0.2",
        "proto": 6,
        "sport": 1000,
        "dport": 443,
        "packets": 3,
        "bytes": 3 * len(t),
    }
    assert {(f["src"], f["packets"], f["bytes"]) for f in flows[1:]} == {
        ("10.0.0.1", 2, len(a) + len(a / b"x")),
        ("10.0.0.2", 1, len(b)),
    }
    code, out, _ = _run(capsys, "parse", str(path), "--flows")
    assert code == 0 and "3 flows, 6 packets" in out


@pytest.mark.parametrize("content", [None, b"", b"not a capture at all"])
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, content):
    path = tmp_path / "x.pcap"
    if content is not None:
        path.write_bytes(content)
    code, out, err = _run(capsys, "parse", str(path))
    assert code == 2
    assert err.startswith("microseg parse: error:") and err.count("\n") == 1
    assert "Traceback" not in err


def test_raw_ip_capture(capsys, tmp_path):
    path = tmp_path / "raw.pcap"
    pk = [
        IP(src="10.9.8.7", dst="10.0.0.1") / UDP(sport=53, dport=999),
        IPv6(src="2001:db8::5", dst="2001:db8::6") / TCP(sport=22, dport=2222),
    ]
    wrpcap(str(path), pk, linktype=101)
    code, out, _ = _run(capsys, "parse", str(path), "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["src"], r["sport"], r["proto"]) for r in rows] == [
        ("10.9.8.7", 53, 17),
        ("2001:db8::5", 22, 6),
    ]
    for p, r in zip(pk, rows):
        assert {k: r[k] for k in scapy_view(bytes(p), 101)} == scapy_view(bytes(p), 101)
