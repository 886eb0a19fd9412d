"""ESP made by microseg is read by independent implementations: scapy's IPsec layer and,
where installed, Wireshark's dissector (tshark with esp_sa entries)."""

import shutil
import subprocess

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.packet import Raw

from microseg.io.pcap import write_pcap
from microseg.ipsec import evp
from microseg.ipsec.gateway import EspGateway
from microseg.ipsec.sa import parse_config
from microseg.packet.batch import LINK_RAW, Batch

BACKENDS = ["cryptography"] + (["evp"] if evp.AVAILABLE else [])
SAS = [
    {
        "name": "v4-128",
        "spi": 0x11223344,
        "key": "000102030405060708090a0b0c0d0e0f",
        "salt": "deadbeef",
        "tunnel_src": "192.0.2.1",
        "tunnel_dst": "192.0.2.2",
    },
    {
        "name": "v4-256",
        "spi": 0x0BADCAFE,
        "key": "42" * 32,
        "salt": "01020304",
        "tunnel_src": "192.0.2.1",
        "tunnel_dst": "192.0.2.2",
    },
    {
        "name": "v6-128",
        "spi": 0x51525354,
        "key": "ab" * 16,
        "salt": "0a0b0c0d",
        "tunnel_src": "2001:db8:1::1",
        "tunnel_dst": "2001:db8:2::1",
    },
    {
        "name": "v6-256-esn",
        "spi": 0x61626364,
        "key": "cd" * 32,
        "salt": "99887766",
        "tunnel_src": "2001:db8:1::1",
        "tunnel_dst": "2001:db8:2::1",
        "esn": True,
    },
]
CFG = parse_config({"sas": SAS})
ESN_HI = 7


def _inners():
    out = []
    for n in (0, 1, 2, 3, 17, 64, 200, 1400):
        out.append(
            bytes(
                IP(src="198.51.100.7", dst="203.0.113.9", tos=0x28)
                / UDP(sport=50123, dport=50321)
                / Raw((bytes(range(256)) * 6)[:n])
            )
        )
        out.append(
            bytes(
                IPv6(src="2001:db8:a::7", dst="2001:db8:b::9")
                / TCP(sport=50001, dport=50002, flags="PA")
                / Raw(b"\x5a" * n)
            )
        )
    return out


def _encrypt(backend, name):
    gw = EspGateway(CFG, backend)
    k = gw.sa_index(name)
    if gw.sa_esn[k]:
        gw.tx_seq[k] = (ESN_HI << 32) + 0xFFFFFFF0 - ESN_HI  # crosses into the next high half
    inners = _inners()
    out = gw.encrypt_batch(Batch.from_packets(inners, linktype=LINK_RAW), sa=name)
    assert len(out) == len(inners)
    return inners, list(out.packets())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sa", SAS, ids=lambda s: s["name"])
def test_scapy_decrypts_our_esp(sa, backend):
    inners, packets = _encrypt(backend, sa["name"])
    v6 = ":" in sa["tunnel_src"]
    outer = IPv6 if v6 else IP
    for inner, pkt in zip(inners, packets):
        p = outer(pkt)
        assert p.src == sa["tunnel_src"] and p.dst == sa["tunnel_dst"]
        e = p[ESP]
        seq = e.seq
        esn_hi = 0
        if sa.get("esn"):
            esn_hi = ESN_HI if seq >= 0x80000000 else ESN_HI + 1
        spec = SecurityAssociation(
            ESP,
            spi=sa["spi"],
            crypt_algo="AES-GCM",
            crypt_key=bytes.fromhex(sa["key"] + sa["salt"]),
            tunnel_header=outer(src=sa["tunnel_src"], dst=sa["tunnel_dst"]),
            esn_en=bool(sa.get("esn")),
            esn=esn_hi,
        )
        dec = spec.decrypt(p)
        assert bytes(dec) == inner
        if not v6:
            assert p.tos == IP(inner).tos if inner[0] >> 4 == 4 else True  # DSCP/ECN copied


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
@pytest.mark.parametrize("sa", SAS[:3], ids=lambda s: s["name"])
def test_tshark_decrypts_our_esp(sa, tmp_path):
    inners, packets = _encrypt(BACKENDS[-1], sa["name"])
    path = tmp_path / "esp.pcap"
    write_pcap(path, Batch.from_packets(packets, linktype=LINK_RAW))
    proto = "IPv6" if ":" in sa["tunnel_src"] else "IPv4"
    uat = (
        f'uat:esp_sa:"{proto}","{sa["tunnel_src"]}","{sa["tunnel_dst"]}",'
        f'"{sa["spi"]:#010x}","AES-GCM with 16 octet ICV [RFC4106]",'
        f'"0x{sa["key"]}{sa["salt"]}","NULL",""'
    )
    res = subprocess.run(
        [
            "tshark",
            "-r",
            str(path),
            "-o",
            "esp.enable_encryption_decode:TRUE",
            "-o",
            uat,
            "-T",
            "fields",
            "-e",
            "esp.sequence",
            "-e",
            "esp.pad_len",
            "-e",
            "esp.icv_bad",
            "-e",
            "esp.decrypted_data",
            "-e",
            "ip.src",
            "-e",
            "ipv6.src",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    rows = [line.split("\t") for line in res.stdout.splitlines()]
    assert len(rows) == len(inners), res.stderr
    for k, (row, inner) in enumerate(zip(rows, inners)):
        seq, pad_len, icv_bad, decrypted, ip_src, ip6_src = row
        assert int(seq) == k + 1
        assert icv_bad in ("", "0", "False")
        pad = -(len(inner) + 2) % 4
        assert int(pad_len) == pad
        nh = 4 if inner[0] >> 4 == 4 else 41
        assert decrypted.replace(":", "") == (inner + bytes(range(1, pad + 1)) + bytes([pad, nh])).hex()
        want = "198.51.100.7" if nh == 4 else "2001:db8:a::7"
        assert want in ip_src.split(",") + ip6_src.split(",")
