"""Verdicts, reasons and check kinds shared by the compiled decision and its reference.

A verdict is a :class:`microseg.classify.rules.Action` value (ALLOW=1, DROP=2, REJECT=3). Every
packet also gets a reason code, so every drop is counted with why.
"""

from ..classify.rules import Action

ALLOW, DROP, REJECT = int(Action.ALLOW), int(Action.DROP), int(Action.REJECT)

# reasons (uint8)
R_POLICY = 0  # NEW traffic allowed by the rules
R_ESTABLISHED = 1  # conntrack: packet of an established connection
R_RELATED = 2  # conntrack: related (e.g. an ICMP error about a tracked connection)
R_ARP = 3  # ARP within a known tenant
R_ND = 4  # IPv6 neighbour discovery (ICMPv6 133-136), as Neutron allows it
R_NON_ISOLATED = 5  # NEW traffic no rule had to allow: Kubernetes pods no policy isolates
R_PARSE_ERROR = 10  # the parser flagged the packet
R_NO_TENANT = 11  # arrived without a tunnel header and no untagged_tenant is set
R_UNKNOWN_VNI = 12  # tunnel VNI/VSID that no tenant has
R_NON_IP = 13  # neither IP nor ARP
R_SPOOFED = 14  # source MAC/IP not the workload's own
R_INVALID = 15  # conntrack state INVALID
R_NO_ENDPOINT = 16  # neither address is a workload of the tenant
R_EGRESS_DENIED = 17  # the sender's egress rules do not allow it
R_INGRESS_DENIED = 18  # the receiver's ingress rules do not allow it
R_MAPPED_ADDRESS = 19  # an IPv6 packet with an IPv4-mapped (::ffff:a.b.c.d) address

REASONS = {
    R_POLICY: "policy",
    R_ESTABLISHED: "established",
    R_RELATED: "related",
    R_ARP: "arp",
    R_ND: "neighbour_discovery",
    R_NON_ISOLATED: "non_isolated",
    R_PARSE_ERROR: "parse_error",
    R_NO_TENANT: "no_tenant",
    R_UNKNOWN_VNI: "unknown_vni",
    R_NON_IP: "non_ip",
    R_SPOOFED: "spoofed_source",
    R_INVALID: "ct_invalid",
    R_NO_ENDPOINT: "no_endpoint",
    R_EGRESS_DENIED: "egress_denied",
    R_INGRESS_DENIED: "ingress_denied",
    R_MAPPED_ADDRESS: "mapped_address",
}
VERDICTS = {ALLOW: "allow", DROP: "drop", REJECT: "reject"}

# Checks a NEW packet may have to pass, per side (the sender's egress, the receiver's ingress).
# Security groups (SG): some rule matches. The Kubernetes chain, in order: admin network
# policies (ANP: the first matching rule's action; Pass goes on), NetworkPolicies (NP: some rule
# of the policies selecting the pod matches), the baseline admin policy (BANP: the first
# matching rule's action), then the default of an unselected pod (DEF: a zero-trust namespace's
# default deny, or default_egress). Egress kinds are below IN_SG.
EG_SG, EG_NP, EG_ANP, EG_BANP, EG_DEF, IN_SG, IN_NP, IN_ANP, IN_BANP, IN_DEF = range(10)
CHECKS = (
    "egress security groups",
    "egress network policies",
    "egress admin network policies",
    "egress baseline admin network policy",
    "egress default",
    "ingress security groups",
    "ingress network policies",
    "ingress admin network policies",
    "ingress baseline admin network policy",
    "ingress default",
)
N_CHECKS = 10
SIDE = 5  # kinds below SIDE are the sender's egress, the rest the receiver's ingress

# what a matching rule of an admin check does (the other checks' rules only allow)
A_ALLOW, A_DENY, A_PASS = 1, 2, 3
ADMIN_ACTIONS = {"Allow": A_ALLOW, "Deny": A_DENY, "Pass": A_PASS}


def is_egress(kind: int) -> bool:
    return kind < SIDE


def reason_name(code: int) -> str:
    return REASONS.get(int(code), f"reason_{int(code)}")


def verdict_name(code: int) -> str:
    return VERDICTS.get(int(code), f"verdict_{int(code)}")
