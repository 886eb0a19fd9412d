"""Constants shared by the conntrack kernel, its plain-Python reference and the table.

Values follow Linux nf_conntrack (``nf_conntrack_proto_tcp.c``, ``..._udp.c``, ``..._icmp.c``,
``..._icmpv6.c``, ``..._generic.c``); timeouts are Linux's defaults.
"""

from __future__ import annotations

import numpy as np

NS = 1_000_000_000

# TCP conntrack states, numbered as Linux numbers them.
NONE, SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE, SYN_SENT2 = range(10)
S_MAX = 10  # sIV: invalid transition
S_IGNORE = 11  # sIG: ignore the packet (no state change)
TCP_STATE_NAMES = [
    "NONE",
    "SYN_SENT",
    "SYN_RECV",
    "ESTABLISHED",
    "FIN_WAIT",
    "CLOSE_WAIT",
    "LAST_ACK",
    "TIME_WAIT",
    "CLOSE",
    "SYN_SENT2",
]

# Which flags a segment carries, as Linux's get_conntrack_index() classifies them.
SYN_SET, SYNACK_SET, FIN_SET, ACK_SET, RST_SET, NONE_SET = range(6)

# TCP flag bits
TH_FIN, TH_SYN, TH_RST, TH_PSH, TH_ACK, TH_URG, TH_ECE, TH_CWR = 1, 2, 4, 8, 16, 32, 64, 128

# Per-direction window-tracking flags (ip_ct_tcp_state.flags) and last_flags bits.
WINDOW_SCALE, SACK_PERM, CLOSE_INIT, BE_LIBERAL = 0x01, 0x02, 0x04, 0x08
DATA_UNACKNOWLEDGED, MAXACK_SET, EXP_CHALLENGE_ACK, SIMULTANEOUS_OPEN = 0x10, 0x20, 0x40, 0x80
TCP_MAX_WSCALE = 14
MAXACKWINCONST = 66000

# Connection status bits.
ST_SEEN_REPLY, ST_ASSURED, ST_USED = 0x01, 0x02, 0x80

_sNO, _sSS, _sSR, _sES, _sFW, _sCW, _sLA, _sTW, _sCL, _sS2 = range(10)
_sIV, _sIG = S_MAX, S_IGNORE
# tcp_conntracks[dir][index][old_state] -> new state (Linux's table).
TCP_TRANSITIONS = np.array(
    [
        [  # original direction
            [_sSS, _sSS, _sIG, _sIG, _sIG, _sIG, _sIG, _sSS, _sSS, _sS2],  # syn
            [_sIV, _sIV, _sSR, _sIV, _sIV, _sIV, _sIV, _sIV, _sIV, _sSR],  # synack
            [_sIV, _sIV, _sFW, _sFW, _sLA, _sLA, _sLA, _sTW, _sCL, _sIV],  # fin
            [_sES, _sIV, _sES, _sES, _sCW, _sCW, _sTW, _sTW, _sCL, _sIV],  # ack
            [_sIV, _sCL, _sCL, _sCL, _sCL, _sCL, _sCL, _sCL, _sCL, _sCL],  # rst
            [_sIV] * 10,  # none
        ],
        [  # reply direction
            [_sIV, _sS2, _sIV, _sIV, _sIV, _sIV, _sIV, _sSS, _sIV, _sS2],
            [_sIV, _sSR, _sIG, _sIG, _sIG, _sIG, _sIG, _sIG, _sIG, _sSR],
            [_sIV, _sIV, _sFW, _sFW, _sLA, _sLA, _sLA, _sTW, _sCL, _sIV],
            [_sIV, _sIG, _sSR, _sES, _sCW, _sCW, _sTW, _sTW, _sCL, _sIG],
            [_sIV, _sCL, _sCL, _sCL, _sCL, _sCL, _sCL, _sCL, _sCL, _sCL],
            [_sIV] * 10,
        ],
    ],
    dtype=np.uint8,
)

# Valid flag combinations once PSH, ECE and CWR are masked off (tcp_valid_flags).
TCP_VALID_FLAGS = np.zeros(64, dtype=np.uint8)
for _f in (
    TH_SYN,
    TH_SYN | TH_URG,
    TH_SYN | TH_ACK,
    TH_RST,
    TH_RST | TH_ACK,
    TH_FIN | TH_ACK,
    TH_FIN | TH_ACK | TH_URG,
    TH_ACK,
    TH_ACK | TH_URG,
):
    TCP_VALID_FLAGS[_f] = 1

# Timeout slots (index into the timeouts array, nanoseconds). 0-9 are the TCP states.
T_RETRANS, T_UNACK, T_UDP, T_UDP_STREAM, T_ICMP, T_ICMPV6, T_GENERIC = 10, 11, 12, 13, 14, 15, 16
N_TIMEOUTS = 17
# Linux defaults, seconds; names follow the nf_conntrack_*_timeout_* sysctls.
DEFAULT_TIMEOUTS = {
    "tcp_syn_sent": 120,
    "tcp_syn_recv": 60,
    "tcp_established": 432000,
    "tcp_fin_wait": 120,
    "tcp_close_wait": 60,
    "tcp_last_ack": 30,
    "tcp_time_wait": 120,
    "tcp_close": 10,
    "tcp_syn_sent2": 120,
    "tcp_max_retrans": 300,
    "tcp_unacknowledged": 300,
    "udp": 30,
    "udp_stream": 120,
    "icmp": 30,
    "icmpv6": 30,
    "generic": 600,
}
_TIMEOUT_SLOT = {
    "tcp_syn_sent": SYN_SENT,
    "tcp_syn_recv": SYN_RECV,
    "tcp_established": ESTABLISHED,
    "tcp_fin_wait": FIN_WAIT,
    "tcp_close_wait": CLOSE_WAIT,
    "tcp_last_ack": LAST_ACK,
    "tcp_time_wait": TIME_WAIT,
    "tcp_close": CLOSE,
    "tcp_syn_sent2": SYN_SENT2,
    "tcp_max_retrans": T_RETRANS,
    "tcp_unacknowledged": T_UNACK,
    "udp": T_UDP,
    "udp_stream": T_UDP_STREAM,
    "icmp": T_ICMP,
    "icmpv6": T_ICMPV6,
    "generic": T_GENERIC,
}
UDP_STREAM_AFTER_NS = 2 * NS  # a replied UDP flow still active after 2 s becomes a stream


def timeout_array(overrides: dict | None = None) -> np.ndarray:
    """Timeouts in nanoseconds indexed by slot; ``overrides`` maps names above to seconds."""
    vals: dict[str, float] = dict(DEFAULT_TIMEOUTS)
    for k, v in (overrides or {}).items():
        if k not in vals:
            raise ValueError(f"unknown timeout {k!r}; known: {', '.join(sorted(vals))}")
        if not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"timeout {k!r} must be a positive number of seconds")
        vals[k] = v
    out = np.zeros(N_TIMEOUTS, dtype=np.int64)
    for k, v in vals.items():
        out[_TIMEOUT_SLOT[k]] = int(round(v * NS))
    return out


# Counters: why packets were found INVALID (or dropped), then table events.
REASONS = [
    "malformed",  # parse error in an IP packet
    "fragment",  # IP fragment (reassembly happens before conntrack)
    "checksum",  # bad TCP/UDP/ICMP checksum (nf_conntrack_checksum=1)
    "tcp_flags",  # invalid TCP flag combination
    "tcp_new",  # TCP segment that cannot open a connection (not SYN, not a pickable ACK)
    "tcp_state",  # TCP segment invalid in the connection's state
    "tcp_window",  # sequence or acknowledgement outside the tracked window
    "tcp_rst",  # RST with an out-of-window sequence number
    "icmp_new",  # ICMP message that cannot create a connection
    "icmp_type",  # unknown ICMP type
    "icmp_orphan",  # ICMP error quoting no tracked connection
    "icmp_mismatch",  # ICMP error whose outer destination does not match the connection
    "table_full",  # no room and nothing evictable: packet dropped
    "created",
    "early_drop",
    "expired",
    "deleted",
    "ignored",
    "closed",
]
R = {name: i for i, name in enumerate(REASONS)}
N_REASONS = 13  # the first N_REASONS entries are per-packet INVALID reasons
N_COUNTERS = len(REASONS)
(
    C_MALFORMED,
    C_FRAGMENT,
    C_CHECKSUM,
    C_TCP_FLAGS,
    C_TCP_NEW,
    C_TCP_STATE,
    C_TCP_WINDOW,
    C_TCP_RST,
    C_ICMP_NEW,
    C_ICMP_TYPE,
    C_ICMP_ORPHAN,
    C_ICMP_MISMATCH,
    C_TABLE_FULL,
    C_CREATED,
    C_EARLY_DROP,
    C_EXPIRED,
    C_DELETED,
    C_IGNORED,
    C_CLOSED,
) = range(N_COUNTERS)

# The zone of untunnelled packets (tenant -1). Tenants' zones are their VNIs / VSIDs (24
# bits), so this one, just past them, is shared with no tenant: the one source of truth for
# the conntrack table, its reference and the datapath.
UNTAGGED_ZONE = 1 << 24

# Settings (cfg array) slots.
(
    CFG_DEFAULT_ZONE,
    CFG_TCP_LOOSE,
    CFG_TCP_BE_LIBERAL,
    CFG_TCP_MAX_RETRANS,
    CFG_EVICT_RANGE,
    CFG_CHECKSUM,
    CFG_IGNORE_INVALID_RST,
) = range(7)
N_CFG = 7

IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 1, 6, 17, 58

# ICMP type -> reply type + 1 (0: not invertible), Linux's invmap.
ICMP4_INV = np.zeros(256, dtype=np.int16)
for _a, _b in ((8, 0), (13, 14), (15, 16), (17, 18)):
    ICMP4_INV[_a], ICMP4_INV[_b] = _b + 1, _a + 1
ICMP6_INV = np.zeros(256, dtype=np.int16)
for _a, _b in ((128, 129), (139, 140)):
    ICMP6_INV[_a], ICMP6_INV[_b] = _b + 1, _a + 1
ICMP4_VALID_NEW = np.zeros(256, dtype=np.uint8)
ICMP4_VALID_NEW[[8, 13, 15, 17]] = 1
ICMP6_VALID_NEW = np.zeros(256, dtype=np.uint8)
ICMP6_VALID_NEW[[128, 139]] = 1
ICMP4_ERRORS = np.zeros(256, dtype=np.uint8)
ICMP4_ERRORS[[3, 4, 5, 11, 12]] = 1
ICMP6_UNTRACKED = np.zeros(256, dtype=np.uint8)  # MLD and neighbour discovery
ICMP6_UNTRACKED[[130, 131, 132, 133, 134, 135, 136, 143]] = 1
NR_ICMP_TYPES = 18
