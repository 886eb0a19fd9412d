"""Every code the datapath reports, in one place: verdicts, reasons, answering levels.

The policy's verdicts and reasons (:mod:`microseg.policy.verdict`) plus the datapath's own
(inspection), so that reports, counters, traces and the ground-truth check name every code
the same way. Import reasons from here, not from the stage that produced them.
"""

from __future__ import annotations

from ..policy import verdict as _policy_codes
from ..policy.verdict import (  # noqa: F401  (re-exported: the one table of codes)
    ALLOW,
    DROP,
    R_ARP,
    R_EGRESS_DENIED,
    R_ESTABLISHED,
    R_INGRESS_DENIED,
    R_INVALID,
    R_MAPPED_ADDRESS,
    R_ND,
    R_NO_ENDPOINT,
    R_NO_TENANT,
    R_NON_IP,
    R_NON_ISOLATED,
    R_PARSE_ERROR,
    R_POLICY,
    R_RELATED,
    R_SPOOFED,
    R_UNKNOWN_VNI,
    REJECT,
    VERDICTS,
)

# reasons beyond the policy's own
R_SIGNATURE = 30  # an inspection signature (or a flow it blocked) dropped the packet

REASONS = dict(_policy_codes.REASONS)
REASONS[R_SIGNATURE] = "signature"

# which level answered a packet
L_NONE, L_FAST, L_EMC, L_MEGAFLOW, L_SLOW, L_STATE = 0, 1, 2, 3, 4, 5
LEVELS = {
    L_FAST: "fast_path",
    L_STATE: "conntrack_state",
    L_EMC: "exact_match",
    L_MEGAFLOW: "megaflow",
    L_SLOW: "slow_path",
}


def reason_name(code: int) -> str:
    return REASONS.get(int(code), f"reason_{int(code)}")


def verdict_name(code: int) -> str:
    return VERDICTS.get(int(code), f"verdict_{int(code)}")


def is_pass_reason(code: int) -> bool:
    """Reasons under which a packet passes (below 10); every other one stops it."""
    return int(code) < 10
