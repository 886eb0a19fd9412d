"""L2-L4 classification: rule model, classifiers over packet batches, ClassBench loader.

Interface (what the policy compiler and the flow caches build on):

* :class:`~microseg.classify.rules.Rule` (data) and
  :class:`~microseg.classify.rules.RuleSet` (immutable compiled arrays + ``version``). A larger
  ``priority`` wins; equal priorities go to the earlier rule. Actions ALLOW/DROP/REJECT and an
  integer ``rule_id`` cookie ride along; ``ruleset.actions(idx)`` maps results to actions with
  no match meaning DROP (default deny).
* ``build(ruleset, algo) -> Classifier`` with ``algo`` one of ``ALGOS``: ``"tree"`` (partitioned
  decision tree, the lookup-optimised one, default), ``"tss"`` (tuple space search, incremental
  ``add``/``remove``), ``"linear"`` (NumPy brute force, the oracle).
* ``clf.classify(keys, ct_state=None, in_port=None) -> int32[n]``: rule index per packet of a
  parsed :class:`~microseg.packet.batch.FlowKeys` (``in_port`` is ``batch.port``), -1 = none.
* ``clf.classify_keys(K)``: the same on raw packet keys, ``(n, NW)`` uint64 words built by
  :mod:`microseg.classify.keys` (``from_flowkeys``, ``from_headers``, ``from_ipv4_tuples``).
  These words are also the natural exact-match cache key.
* Wildcard tracking: ``TupleSpace.classify_keys(K, wildcards=True)`` also returns, per packet,
  the union of the masks of the tuples it visited: a megaflow mask under which every key gets
  the same answer.

A classifier never changes its rule set; to change policy, build a new one off the hot path
and swap the reference. TSS alone also offers in-place updates on its own copy:
``clf.impl.add(rule) -> index`` and ``clf.impl.remove(index)`` (or use
:class:`~microseg.classify.tss.TupleSpace` directly).
"""

from __future__ import annotations

from . import keys
from .classifier import ALGOS, Classifier, build
from .rules import NW, Action, Prefix, Rule, RuleSet

__all__ = ["NW", "Action", "Prefix", "Rule", "RuleSet", "ALGOS", "Classifier", "build", "keys"]
