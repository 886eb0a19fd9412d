"""Parse-error codes (the ``error`` column of FlowKeys). 0 means the packet parsed cleanly.

A code names the first problem the parser met; the fields parsed before it stay filled. A
header cut short by a snapped capture is a ``TRUNC_*`` code too (and ``F2_TRUNCATED`` is set);
lengths that only the snap made short are no error. The short names are what
`microseg parse --json` prints.
"""

OK = 0
TRUNC_ETH = 1  # shorter than an Ethernet header
TRUNC_VLAN = 2  # VLAN tag cut short
TRUNC_ARP = 3  # ARP body cut short
BAD_ARP = 4  # ARP for a protocol other than IPv4 (type 0x0800, 4-byte addresses)
TRUNC_IPV4 = 5  # IPv4 header cut short
BAD_IPV4_VER = 6  # version field is not 4
BAD_IPV4_IHL = 7  # IHL < 5
BAD_IPV4_LEN = 8  # total length < header length, or beyond the frame (as on the wire)
BAD_IPV4_CSUM = 9  # header checksum wrong
TRUNC_IPV6 = 10  # IPv6 header cut short
BAD_IPV6_VER = 11  # version field is not 6
BAD_IPV6_LEN = 12  # payload (or jumbo) length beyond the frame (as on the wire)
BAD_IPV6_EXT = 13  # extension header chain cut short, too long, or malformed (also a
# jumbo payload length <= 65535)
TRUNC_TCP = 14
BAD_TCP_DOFF = 15  # data offset < 5 or beyond the segment
TRUNC_UDP = 16
BAD_UDP_LEN = 17  # UDP length < 8 or beyond the datagram
TRUNC_ICMP = 18
TRUNC_ICMP_INNER = 19  # ICMP error whose quoted header is cut short
TRUNC_ESP = 20
TRUNC_GRE = 21
BAD_GRE = 22  # GRE version or flags we do not handle
TRUNC_TUNNEL = 23  # VXLAN / GENEVE header cut short
BAD_TUNNEL = 24  # VXLAN I flag missing, GENEVE version/option length wrong, ...
TUNNEL_DEPTH = 25  # more nested tunnels than the parser follows
TRUNC_SCTP = 26  # SCTP common header cut short
BAD_ICMP_INNER = 27  # ICMP error quoting a header with the wrong IP version or IHL < 5
TRUNC_LINK = 28  # shorter than its loopback or Linux cooked-capture header

NAMES = {
    OK: None,
    TRUNC_ETH: "trunc_eth",
    TRUNC_VLAN: "trunc_vlan",
    TRUNC_ARP: "trunc_arp",
    BAD_ARP: "bad_arp",
    TRUNC_IPV4: "trunc_ipv4",
    BAD_IPV4_VER: "bad_ipv4_version",
    BAD_IPV4_IHL: "bad_ipv4_ihl",
    BAD_IPV4_LEN: "bad_ipv4_len",
    BAD_IPV4_CSUM: "bad_ipv4_checksum",
    TRUNC_IPV6: "trunc_ipv6",
    BAD_IPV6_VER: "bad_ipv6_version",
    BAD_IPV6_LEN: "bad_ipv6_len",
    BAD_IPV6_EXT: "bad_ipv6_ext",
    TRUNC_TCP: "trunc_tcp",
    BAD_TCP_DOFF: "bad_tcp_doff",
    TRUNC_UDP: "trunc_udp",
    BAD_UDP_LEN: "bad_udp_len",
    TRUNC_ICMP: "trunc_icmp",
    TRUNC_ICMP_INNER: "trunc_icmp_inner",
    TRUNC_ESP: "trunc_esp",
    TRUNC_GRE: "trunc_gre",
    BAD_GRE: "bad_gre",
    TRUNC_TUNNEL: "trunc_tunnel",
    BAD_TUNNEL: "bad_tunnel",
    TUNNEL_DEPTH: "tunnel_depth",
    TRUNC_SCTP: "trunc_sctp",
    BAD_ICMP_INNER: "bad_icmp_inner",
    TRUNC_LINK: "trunc_link",
}


def name(code: int):
    """Short name of an error code (None for OK); unknown codes print as ``error_<n>``."""
    return NAMES.get(int(code), f"error_{int(code)}")
