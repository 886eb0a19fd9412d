"""Verdicts, reasons and check kinds shared by the compiled decision and its reference.

A verdict is a :class:`microseg.classify.rules.Action` value (ALLOW=1, DROP=2, REJECT=3). Every
packet also gets a reason code, so every drop is counted with why.
"""
from ..classify.rules import Action

ALLOW, DROP, REJECT = int(Action.ALLOW), int(Action.DROP), int(Action.REJECT)

# reasons (uint8)
R_POLICY = 0            # NEW traffic allowed by the rules
R_ESTABLISHED = 1       # conntrack: packet of an established connection
R_RELATED = 2           # conntrack: related (e.g. an ICMP error about a tracked connection)
R_ARP = 3               # ARP within a known tenant
R_ND = 4                # IPv6 neighbour discovery (ICMPv6 133-136), as Neutron allows it
R_PARSE_ERROR = 10      # the parser flagged the packet
R_NO_TENANT = 11        # arrived without a tunnel header and no untagged_tenant is set
R_UNKNOWN_VNI = 12      # tunnel VNI/VSID that no tenant has
R_NON_IP = 13           # neither IP nor ARP
R_SPOOFED = 14          # source MAC/IP not the workload's own
R_INVALID = 15          # conntrack state INVALID
R_NO_ENDPOINT = 16      # neither address is a workload of the tenant
R_EGRESS_DENIED = 17    # the sender's egress rules do not allow it
R_INGRESS_DENIED = 18   # the receiver's ingress rules do not allow it
R_MAPPED_ADDRESS = 19   # an IPv6 packet with an IPv4-mapped (::ffff:a.b.c.d) address

REASONS = {
    R_POLICY: "policy", R_ESTABLISHED: "established", R_RELATED: "related", R_ARP: "arp",
    R_ND: "neighbour_discovery", R_PARSE_ERROR: "parse_error", R_NO_TENANT: "no_tenant",
    R_UNKNOWN_VNI: "unknown_vni", R_NON_IP: "non_ip", R_SPOOFED: "spoofed_source",
    R_INVALID: "ct_invalid", R_NO_ENDPOINT: "no_endpoint", R_EGRESS_DENIED: "egress_denied",
    R_INGRESS_DENIED: "ingress_denied", R_MAPPED_ADDRESS: "mapped_address",
}
VERDICTS = {ALLOW: "allow", DROP: "drop", REJECT: "reject"}

# checks a NEW packet may have to pass; each is "some rule of this kind matches"
EG_SG, EG_NP, IN_SG, IN_NP = 0, 1, 2, 3
CHECKS = ("egress security groups", "egress network policies", "ingress security groups",
          "ingress network policies")
N_CHECKS = 4


def reason_name(code: int) -> str:
    return REASONS.get(int(code), f"reason_{int(code)}")


def verdict_name(code: int) -> str:
    return VERDICTS.get(int(code), f"verdict_{int(code)}")
