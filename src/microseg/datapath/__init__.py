"""The datapath: every packet between workloads checked against its tenant's policy and
tracked statefully, a batch at a time.

Per batch (:meth:`Datapath.process`), in order::

    parse (once; the keys travel with the batch to output and reports)
      -> fast kernel (fast.py): identities, conntrack, port security and the state's verdict
         for ESTABLISHED / RELATED / INVALID packets, counters -- one compiled call
      -> slow path (slow.py), for what the fast kernel cannot answer (NEW and untracked
         packets): exact-match cache -> megaflow cache -> compiled policy
      -> inspection of a flow's first packets, then offload (optional)
      -> output (output.py): allowed frames re-encapsulated towards the destination
         workload's host; rejects answered with a TCP RST or an ICMP unreachable

Modules: ``datapath`` (Datapath, DatapathConfig, BatchResult), ``fast``, ``slow``,
``output`` (Forwarder, reject replies), ``counters``, ``reasons`` (every verdict, reason
and level code), ``reference`` (the whole datapath one packet at a time, the tests' oracle).
"""

from .counters import Counters
from .datapath import BatchResult, Datapath, DatapathConfig
from .fast import NO_L2, UNKNOWN_MAC, source_identity
from .output import Forwarder, reject_reply
from .reasons import L_EMC, L_FAST, L_MEGAFLOW, L_NONE, L_SLOW, L_STATE, LEVELS, R_SIGNATURE, REASONS
from .slow import megaflow_mask

__all__ = [
    "BatchResult",
    "Counters",
    "Datapath",
    "DatapathConfig",
    "Forwarder",
    "LEVELS",
    "L_EMC",
    "L_FAST",
    "L_MEGAFLOW",
    "L_NONE",
    "L_SLOW",
    "L_STATE",
    "NO_L2",
    "REASONS",
    "R_SIGNATURE",
    "UNKNOWN_MAC",
    "megaflow_mask",
    "reject_reply",
    "source_identity",
]
