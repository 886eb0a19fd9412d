"""Connection-tracking state bits, shared by conntrack, the classifier and the policy.

One ``uint8`` per packet. Exactly one of NEW / ESTABLISHED / RELATED / INVALID is set once a
packet has been tracked (TRACKED); REPLY marks the reply direction, as Linux's
``IP_CT_IS_REPLY`` does. The names printed are nftables' spellings.
"""

NEW = 1
ESTABLISHED = 2
RELATED = 4
INVALID = 8
REPLY = 16
TRACKED = 32

STATE_MASK = NEW | ESTABLISHED | RELATED | INVALID
NAMES = {NEW: "new", ESTABLISHED: "established", RELATED: "related", INVALID: "invalid"}


def state_name(bits: int) -> str:
    """nftables' name of the state in ``bits`` ("untracked" when none is set)."""
    return NAMES.get(int(bits) & STATE_MASK, "untracked")
