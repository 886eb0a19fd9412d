"""Flow-cache hierarchy in front of the slow path.

* :mod:`.key` -- cache keys (the classifier's packet key plus flow identity) and hashes.
* :mod:`.emc` -- exact-match cache: one hash probe per packet.
* :mod:`.megaflow` -- wildcarded entries, one hash probe per distinct mask.
* :mod:`.match` -- megaflow masks derived from the rule set, and revalidation helpers.

Typical use per batch (sans-IO; the pipeline owns the order)::

    kmat, h, valid = build_keys(flowkeys, batch.port, ct_state)
    e = emc.lookup(kmat, h, valid)
    m = megaflow.lookup(kmat, valid & ~e.hit)
    miss = valid & ~e.hit & ~m.hit
    best, masks = megaflow_masks(ruleset, kmat, miss)     # slow path (or the classifier)
    megaflow.insert(kmat, masks, miss, ruleset.actions(best), best)
    emc.insert(kmat, h, valid & ~e.hit, verdict, rule, flow_id)
"""

from .emc import ExactMatchCache
from .key import W, build_keys, hash_keys
from .match import RuleMatchTable, changed_rules, megaflow_masks, rule_index_map
from .megaflow import MegaflowCache

__all__ = [
    "ExactMatchCache",
    "MegaflowCache",
    "RuleMatchTable",
    "W",
    "build_keys",
    "changed_rules",
    "hash_keys",
    "megaflow_masks",
    "rule_index_map",
]
