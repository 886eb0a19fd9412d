"""Linear scan: the simple baseline and the oracle every other classifier is checked against.

NumPy over (packet chunk x rules); a plain-Python per-packet reference sits beside it.
"""

from __future__ import annotations

import numpy as np

from .rules import K_L4, NW, P_DPORT_HI, P_DPORT_LO, P_SPORT_HI, P_SPORT_LO, RuleSet

_CELLS = 1 << 22  # packets x rules evaluated per step (bounds memory)


def match_matrix(rs: RuleSet, K: np.ndarray, rules: np.ndarray | None = None) -> np.ndarray:
    """Boolean ``(len(K), n_rules)``: does rule j (in ``rules`` order) match packet i."""
    val, mask, ports = rs.val, rs.mask, rs.ports
    if rules is not None:
        val, mask, ports = val[rules], mask[rules], ports[rules]
    ok = np.ones((K.shape[0], val.shape[0]), bool)
    for w in range(NW):
        if mask[:, w].any():
            ok &= (K[:, w, None] & mask[None, :, w]) == val[None, :, w]
    sp = (K[:, K_L4] & np.uint64(0xFFFF)).astype(np.int64)
    dp = ((K[:, K_L4] >> np.uint64(16)) & np.uint64(0xFFFF)).astype(np.int64)
    ok &= (ports[None, :, P_SPORT_LO] <= sp[:, None]) & (sp[:, None] <= ports[None, :, P_SPORT_HI])
    ok &= (ports[None, :, P_DPORT_LO] <= dp[:, None]) & (dp[:, None] <= ports[None, :, P_DPORT_HI])
    return ok


def classify_linear(rs: RuleSet, K: np.ndarray) -> np.ndarray:
    """Index of the best matching rule per packet key (-1 none), by brute force."""
    K = np.asarray(K, np.uint64)
    n, m = K.shape[0], len(rs)
    out = np.full(n, -1, np.int32)
    if m == 0 or n == 0:
        return out
    order = rs.order
    step = max(1, _CELLS // m)
    for s in range(0, n, step):
        ok = match_matrix(rs, K[s : s + step], order)
        first = ok.argmax(1)
        hit = ok[np.arange(ok.shape[0]), first]
        out[s : s + step] = np.where(hit, order[first], -1)
    return out


def classify_ref(rs: RuleSet, K: np.ndarray) -> np.ndarray:
    """Plain-Python reference: per packet, scan rules in priority order."""
    out = np.full(K.shape[0], -1, np.int32)
    val = rs.val.tolist()
    mask = rs.mask.tolist()
    ports = rs.ports.tolist()
    for i, k in enumerate(K.tolist()):
        sp, dp = k[K_L4] & 0xFFFF, (k[K_L4] >> 16) & 0xFFFF
        for j in rs.order.tolist():
            if (
                all((k[w] & mask[j][w]) == val[j][w] for w in range(NW))
                and ports[j][0] <= sp <= ports[j][1]
                and ports[j][2] <= dp <= ports[j][3]
            ):
                out[i] = j
                break
    return out
