"""Inspection hand-off and the finite fast-path offload table.

* :mod:`.inspect` -- content signatures (a Suricata subset, Aho-Corasick prefilter) and the
  detection of payloads that cannot be inspected (TLS, QUIC, ESP).
* :mod:`.handoff` -- per-flow state: the first ``n_inspect`` packets are inspected, then the
  flow is offloaded, kept on the inspected path, or blocked.
* :mod:`.table` -- the fast-path table with finite capacity and insert rate; batch lookup.

Per batch, after the policy verdict (sans-IO)::

    hit, verdict, flow = table.lookup(kmat, valid, batch.wire_len, batch.ts)   # fast path
    ...slow path for ~hit (caches, classifier, conntrack, policy) -> allowed...
    res = inspector.process(batch, flowkeys, kmat, valid, allowed & ~hit, ct_state)
    # res.drop: blocked by a signature; res.offered / res.outcome: offload attempts
"""

from .handoff import FlowInspector, HandoffResult
from .inspect import SignatureSet, uninspectable
from .table import FastPathTable

__all__ = ["FastPathTable", "FlowInspector", "HandoffResult", "SignatureSet", "uninspectable"]
