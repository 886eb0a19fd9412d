"""Regenerate the parser vectors: `mixed.pcap` (scapy-built, every protocol the parser knows)
and `mixed_tshark.tsv`, what Wireshark's dissectors say about each frame.

Run from the repository root with tshark installed:

    .venv/bin/python tests/vectors/parse/make_vectors.py

IP reassembly is off so that first fragments are dissected as they are (the parser does not
reassemble either). Frames whose reading is a choice of ours rather than a fact (three VLAN
tags, plain IP-in-GRE, three nested tunnels, a misplaced hop-by-hop header) are left out.
"""

from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))

FIELDS = [
    "frame.number",
    "frame.protocols",
    "ip.src",
    "ip.dst",
    "ip.proto",
    "ipv6.src",
    "ipv6.dst",
    "ipv6.nxt",
    "tcp.srcport",
    "tcp.dstport",
    "udp.srcport",
    "udp.dstport",
    "sctp.srcport",
    "sctp.dstport",
    "icmp.type",
    "icmp.code",
    "icmpv6.type",
    "icmpv6.code",
    "vxlan.vni",
    "geneve.vni",
    "gre.key",
    "arp.src.proto_ipv4",
    "arp.dst.proto_ipv4",
    "esp.spi",
    "esp.sequence",
    "ipv6.hopopts.nxt",
    "ipv6.routing.nxt",
    "ipv6.fraghdr.nxt",
    "ipv6.dstopts.nxt",
]


def main() -> None:
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap

    from microseg.packet.parse_ref import parse_packet_ref
    from test_parse_corpus import templates

    frames = []
    for raw, lt in templates(seed=31, rounds=3):
        if lt != 1:
            continue
        f = parse_packet_ref(raw)
        if f["error"] or f["n_vlans"] == 2 and f["ethertype"] in (0x8100, 0x88A8):
            continue
        if f["proto"] == 47 and not f["tun_type"]:
            continue
        frames.append(raw)
    pcap = os.path.join(HERE, "mixed.pcap")
    wrpcap(pcap, [Ether(p) for p in frames])
    out = subprocess.run(
        [
            "tshark",
            "-n",
            "-r",
            pcap,
            "-o",
            "ip.defragment:FALSE",
            "-o",
            "ipv6.defragment:FALSE",
            "-T",
            "fields",
            "-E",
            "header=y",
            "-E",
            "separator=/t",
            "-E",
            "occurrence=a",
            "-E",
            "aggregator=,",
        ]
        + sum((["-e", f] for f in FIELDS), []),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with open(os.path.join(HERE, "mixed_tshark.tsv"), "w") as fh:
        fh.write(out)
    print(f"{len(frames)} frames")


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(HERE, "..", "..", "tests"))
    main()
